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
    scratch_loop_with(cleanup, dir, size, false)
}

/// Like [`scratch_loop`]; with `direct_io` the loop device reads and writes its backing file
/// with O_DIRECT, so its speed is the disk's, not the page cache's.
pub fn scratch_loop_with(
    cleanup: &mut Cleanup,
    dir: &Path,
    size: u64,
    direct_io: bool,
) -> Result<String> {
    let image = dir.join("scratch.img");
    fs::File::create(&image)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("creating {}", image.display()))?;
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(format!(
            "--direct-io={}",
            if direct_io { "on" } else { "off" }
        ))
        .arg(&image)
        .output()
        .context("losetup")?;
    if !out.status.success() {
        bail!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let detach = device.clone();
    cleanup.push(format!("detach {device}"), move || {
        remove_completion_log(&detach);
        let _ = Command::new("losetup").args(["-d", &detach]).status();
    });
    Ok(device)
}

/// Removes the tracker's completion log (the tracefs instance `blkmirror-MAJ-MIN`) of a device,
/// which, like the pins, outlives the tracker process.
fn remove_completion_log(device: &str) {
    let name = Path::new(device)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Ok(dev) = fs::read_to_string(format!("/sys/block/{name}/dev")) else {
        return;
    };
    let instance = format!(
        "/sys/kernel/tracing/instances/blkmirror-{}",
        dev.trim().replace(':', "-")
    );
    let _ = fs::write(
        format!("{instance}/events/block/block_rq_complete/enable"),
        "0",
    );
    let _ = fs::remove_dir(&instance);
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

/// A background writer: creates, rewrites and deletes files until stopped.
struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<u64>>,
}

impl Writer {
    fn start(dir: &Path) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let dir = dir.to_owned();
        let thread = thread::spawn(move || {
            let mut files = 0u64;
            while !flag.load(Ordering::SeqCst) {
                let name = dir.join(format!("report-{}.bin", files % 30));
                let data: Vec<u8> = (0..(64 << 10) + (files % 16) * 32768)
                    .map(|i| ((i * 31 + files * 7) % 253) as u8)
                    .collect();
                if let Ok(mut file) = fs::File::create(&name) {
                    use std::io::Write as _;
                    let _ = file.write_all(&data);
                    let _ = file.sync_all();
                }
                if files % 5 == 4 {
                    let _ = fs::remove_file(dir.join(format!("report-{}.bin", (files + 11) % 30)));
                }
                files += 1;
                thread::sleep(Duration::from_millis(30));
            }
            files
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn keygen(binary: &Path, dir: &Path) -> Result<String> {
    let out = Command::new(binary)
        .args(["keygen", "--out"])
        .arg(dir)
        .stderr(Stdio::null())
        .output()
        .context("blkmirror keygen")?;
    if !out.status.success() {
        bail!("blkmirror keygen failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Starts a receiver on 127.0.0.1 (any free port) with its data in `data_dir`, its identity
/// in `dir/receiver-id`, admitting `agent_fingerprint` for `volume`; stopped by `cleanup`.
/// Returns its address.
pub fn start_receiver(
    cleanup: &mut Cleanup,
    binary: &Path,
    dir: &Path,
    data_dir: &Path,
    agent_fingerprint: &str,
    volume: &str,
    extra: &[&str],
) -> Result<String> {
    start_receiver_with_pid(
        cleanup,
        binary,
        dir,
        data_dir,
        agent_fingerprint,
        volume,
        extra,
    )
    .map(|(addr, _)| addr)
}

/// [`start_receiver`], also returning the receiver's process id (to read its CPU time).
pub fn start_receiver_with_pid(
    cleanup: &mut Cleanup,
    binary: &Path,
    dir: &Path,
    data_dir: &Path,
    agent_fingerprint: &str,
    volume: &str,
    extra: &[&str],
) -> Result<(String, u32)> {
    use std::io::BufRead as _;
    let mut child = Command::new(binary)
        .args(["receiver", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .arg("--identity")
        .arg(dir.join("receiver-id"))
        .arg("--allow")
        .arg(format!("{agent_fingerprint}={volume}"))
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .context("starting blkmirror receiver")?;
    let stderr = child.stderr.take().context("receiver stderr")?;
    let pid = child.id();
    cleanup.push("stop the receiver", move || {
        let _ = Command::new("kill").arg(pid.to_string()).status();
        let _ = child.wait();
    });
    let mut lines = std::io::BufReader::new(stderr).lines();
    let first = lines
        .next()
        .transpose()?
        .context("the receiver exited before listening")?;
    let addr = first
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .with_context(|| format!("unexpected receiver output: {first}"))?
        .to_owned();
    // Keep draining its log so it never blocks on a full pipe.
    thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    Ok((addr, pid))
}

pub fn run() -> Result<()> {
    require_root()?;
    let binary = release_binary()?;
    let mut cleanup = Cleanup::new();
    let (dir, pins) = scratch_space(&mut cleanup, "demo")?;
    let state = dir.join("state");

    println!("== blkmirror demo: a live ext4 disk mirrored to a DR receiver on this machine ==");
    let device = scratch_loop(&mut cleanup, &dir, 512 << 20)?;
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
    println!("1. Production side: a 512 MiB scratch disk {device} with ext4, mounted on");
    println!(
        "   {}, and a writer creating and deleting files on it.",
        mnt.display()
    );
    let mut writer = Writer::start(&mnt);

    let agent_fp = keygen(&binary, &dir.join("agent-id"))?;
    let receiver_fp = keygen(&binary, &dir.join("receiver-id"))?;
    let addr = start_receiver(
        &mut cleanup,
        &binary,
        &dir,
        &dir.join("dr-site"),
        &agent_fp,
        "demo",
        &[],
    )?;
    println!("2. Both sides made an identity (`blkmirror keygen`) and pinned each other's");
    println!("   fingerprint. The receiver listens on {addr} (QUIC, mutual TLS) and admits");
    println!(
        "   this agent for volume `demo` only. Replica: {}/dr-site/demo/image.raw",
        dir.display()
    );

    println!("3. `blkmirror agent` runs: an eBPF program records which 64 KiB chunks change; the");
    println!("   first cycle copies the disk (only non-zero chunks), then every 2 s a cycle ships");
    println!("   just what changed. Each point is taken with the file system frozen for a few ms,");
    println!("   so it is crash-consistent:");
    let agent_args = |extra: &[&str]| {
        let mut command = Command::new(&binary);
        command
            .args([
                "agent",
                "--device",
                &device,
                "--volume",
                "demo",
                "--receiver",
                &addr,
            ])
            .args(["--receiver-fingerprint", &receiver_fp])
            .arg("--identity")
            .arg(dir.join("agent-id"))
            .arg("--pin-root")
            .arg(&pins)
            .arg("--state-dir")
            .arg(&state)
            .args(extra);
        command
    };
    let mut agent = agent_args(&["--interval", "2s"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::null())
        .spawn()
        .context("starting blkmirror agent")?;
    thread::sleep(Duration::from_secs(12));
    exec(Command::new("kill").args(["-TERM", &agent.id().to_string()]))?;
    let status = agent.wait().context("waiting for the agent")?;
    if !status.success() {
        bail!("blkmirror agent failed: {status}");
    }
    let files = writer.stop();
    println!("   (the agent stopped cleanly on SIGTERM; the writer wrote {files} files meanwhile)");

    println!("4. The receiver keeps every point of the last hour (`blkmirror points demo`):");
    let data_dir = dir.join("dr-site");
    exec(
        Command::new(&binary)
            .args(["points", "demo", "--data-dir"])
            .arg(&data_dir),
    )?;
    let listed = Command::new(&binary)
        .args(["points", "demo", "--json", "--data-dir"])
        .arg(&data_dir)
        .output()
        .context("blkmirror points")?;
    let seqs: Vec<u64> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|p| p["seq"].as_u64())
        .collect();
    let (Some(&oldest), Some(&newest)) = (seqs.first(), seqs.last()) else {
        bail!("the receiver kept no point");
    };
    println!(
        "   Restoring the oldest and the newest, both taken while the writer was running, and \
         checking each with e2fsck:"
    );
    let image = data_dir.join("demo/image.raw");
    for seq in [oldest, newest] {
        let copy = dir.join(format!("point-{seq}.img"));
        exec(
            Command::new(&binary)
                .args(["restore", "demo", "--at", &format!("seq:{seq}"), "--to"])
                .arg(&copy)
                .arg("--data-dir")
                .arg(&data_dir),
        )?;
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&copy)
            .output()
            .context("e2fsck")?;
        if !fsck.status.success() {
            bail!(
                "e2fsck found problems in point {seq}:\n{}",
                String::from_utf8_lossy(&fsck.stdout)
            );
        }
        let _ = fs::remove_file(&copy);
        println!("   point {seq}: e2fsck -fn clean.");
    }

    println!("5. The writer stopped and the disk is unmounted; one last cycle (`agent --once`):");
    exec(Command::new("umount").arg(&mnt))?;
    let status = agent_args(&["--once"])
        .stderr(Stdio::null())
        .status()
        .context("running blkmirror agent --once")?;
    if !status.success() {
        bail!("blkmirror agent --once failed: {status}");
    }
    let same = Command::new("cmp")
        .arg(&device)
        .arg(&image)
        .status()
        .context("cmp")?;
    if !same.success() {
        bail!("the replica differs from the disk");
    }
    println!("   cmp: the replica equals the disk, byte for byte.");
    println!("6. Done. The demo now stops the receiver, removes the kernel tracker's pins, the");
    println!("   loop device and the scratch files.");
    Ok(())
}
