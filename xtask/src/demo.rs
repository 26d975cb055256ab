//! `cargo xtask demo`: blkmirror's tracker on a scratch ext4 loop device with a live writer.
//!
//! Everything it makes (a sparse file under /tmp, a loop device, a mount, bpffs pins) is
//! removed at the end, also when a step fails.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{exec, root, setup::run_quiet};

/// Undo actions, run in reverse order on drop.
pub struct Cleanup {
    actions: Vec<(String, Box<dyn FnOnce()>)>,
}

impl Cleanup {
    pub fn new() -> Self {
        Self {
            actions: Vec::new(),
        }
    }

    pub fn push(&mut self, what: impl Into<String>, action: impl FnOnce() + 'static) {
        self.actions.push((what.into(), Box::new(action)));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        while let Some((what, action)) = self.actions.pop() {
            eprintln!("xtask: cleanup: {what}");
            action();
        }
    }
}

pub fn require_root() -> Result<()> {
    if run_quiet("id", &["-u"]).is_none_or(|uid| uid.trim() != "0") {
        bail!("this task needs root (it creates loop devices and loads eBPF); run it with sudo");
    }
    Ok(())
}

/// A fresh scratch directory under the temp dir, and a private bpffs pin root, both removed
/// by `cleanup` (removing the pins detaches whatever tracker used them).
pub fn scratch_space(cleanup: &mut Cleanup, task: &str) -> Result<(PathBuf, PathBuf)> {
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("blkmirror-{task}-{id}"));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let remove_dir = dir.clone();
    cleanup.push(format!("remove {}", dir.display()), move || {
        let _ = fs::remove_dir_all(&remove_dir);
    });
    let pins = PathBuf::from(format!("/sys/fs/bpf/blkmirror-{task}-{id}"));
    let remove_pins = pins.clone();
    cleanup.push(format!("remove pins under {}", pins.display()), move || {
        remove_pin_root(&remove_pins);
    });
    Ok((dir, pins))
}

/// A sparse file attached as a loop device, detached by `cleanup`.
pub fn scratch_loop(cleanup: &mut Cleanup, dir: &Path, size: u64) -> Result<String> {
    let image = dir.join("scratch.img");
    fs::File::create(&image)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("creating {}", image.display()))?;
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&image)
        .output()
        .context("losetup")?;
    if !out.status.success() {
        bail!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let detach = device.clone();
    cleanup.push(format!("detach {device}"), move || {
        let _ = Command::new("losetup").args(["-d", &detach]).status();
    });
    Ok(device)
}

/// Removes a private pin root and everything pinned below it (which detaches the programs).
pub fn remove_pin_root(root: &Path) {
    if let Ok(dirs) = fs::read_dir(root) {
        for dir in dirs.flatten() {
            if let Ok(files) = fs::read_dir(dir.path()) {
                for file in files.flatten() {
                    let _ = fs::remove_file(file.path());
                }
            }
            let _ = fs::remove_dir(dir.path());
        }
    }
    let _ = fs::remove_dir(root);
}

pub fn release_binary() -> Result<PathBuf> {
    exec(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args([
            "build",
            "--release",
            "--locked",
            "-p",
            "blkmirror",
        ]),
    )?;
    Ok(root().join("target/release/blkmirror"))
}

pub fn run() -> Result<()> {
    require_root()?;
    let binary = release_binary()?;
    let mut cleanup = Cleanup::new();
    let (dir, pins) = scratch_space(&mut cleanup, "demo")?;
    let state = dir.join("state");

    println!("== blkmirror demo: change tracking without a kernel module ==");
    let device = scratch_loop(&mut cleanup, &dir, 512 << 20)?;
    println!("1. Made a 512 MiB scratch disk {device} and put ext4 on it.");
    exec(Command::new("mkfs.ext4").args(["-q", "-F", &device]))?;
    let mnt = dir.join("mnt");
    fs::create_dir_all(&mnt)?;
    exec(Command::new("mount").arg(&device).arg(&mnt))?;
    let umount = mnt.clone();
    cleanup.push(format!("unmount {}", mnt.display()), move || {
        let _ = Command::new("umount")
            .arg(&umount)
            .stderr(Stdio::null())
            .status();
    });

    println!("2. Started `blkmirror track {device}`: an eBPF program on the block layer records");
    println!("   every write, discard and zeroing; each second it cuts an epoch and prints the");
    println!("   changed extents (merged 64 KiB chunks, offsets in bytes on the disk).");
    let mut tracker = Command::new(&binary)
        .args(["track", &device, "--interval", "1s", "--count", "6"])
        .arg("--pin-root")
        .arg(&pins)
        .arg("--state-dir")
        .arg(&state)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting blkmirror track")?;
    thread::sleep(Duration::from_millis(1500));

    println!("3. A live writer: a 4 MiB file, fsync'd ...");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    fs::write(mnt.join("report.bin"), &data)?;
    exec(&mut Command::new("sync"))?;
    thread::sleep(Duration::from_millis(1200));
    println!("   ... then it is deleted and the file system trimmed (discards):");
    fs::remove_file(mnt.join("report.bin"))?;
    exec(&mut Command::new("sync"))?;
    exec(Command::new("fstrim").arg(&mnt))?;
    thread::sleep(Duration::from_millis(1200));
    println!("   ... and 1 MiB zeroed on the raw disk with `blkdiscard -z` past the file system:");
    exec(Command::new("umount").arg(&mnt))?;
    exec(Command::new("blkdiscard").args([
        "-f",
        "-z",
        "-o",
        &(500u64 << 20).to_string(),
        "-l",
        "1048576",
        &device,
    ]))?;

    let status = tracker.wait().context("waiting for blkmirror track")?;
    if !status.success() {
        bail!("blkmirror track failed: {status}");
    }
    println!(
        "4. Done. The tracker stays pinned in the kernel between runs (pins under {});",
        pins.display()
    );
    println!("   the demo removes them now, with the loop device and the scratch files.");
    println!(
        "   Replication of these extents to a DR receiver is not built yet (issue: replication)."
    );
    Ok(())
}
