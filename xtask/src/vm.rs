//! `cargo xtask vm-test`: the real `blkmirror` on other kernels and on ARM64, in qemu.
//!
//! For each kernel × arch: fetch the Debian kernel package (private apt configuration under
//! [`CACHE`], the machine's own sources untouched), keep only the kernel image and the virtio
//! modules a boot needs, build an initramfs with busybox, the `blkmirror` binary of that arch
//! and its libraries, and boot it under software emulation with a virtio scratch disk. In the
//! guest, `blkmirror vm-selftest` checks the tracker (exact chunks of O_DIRECT writes, a
//! discard as `discard`, the hooks chosen), then `agent --once` mirrors the disk to a receiver
//! in the same guest over 127.0.0.1 and `cmp` checks the replica.

use std::{
    collections::BTreeSet,
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{exec, root};

/// Where kernels, busybox and apt state are cached.
pub const CACHE: &str = "/var/cache/blkmirror-vm";

/// The default matrix: Debian's 5.10, 6.1, 6.12 and newest (7.x) kernels.
pub const DEFAULT_KERNELS: [&str; 4] = ["5.10", "6.1", "6.12", "7"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchChoice {
    #[value(name = "x86_64")]
    X86_64,
    Aarch64,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

fn apt_options(config: &str) -> Vec<String> {
    let dir = format!("{CACHE}/{config}");
    let mut options: Vec<String> = [
        format!("Dir::Etc::sourcelist={dir}/sources.list"),
        format!("Dir::Etc::sourceparts={dir}/parts"),
        format!("Dir::State::lists={dir}/lists"),
        format!("Dir::Cache={dir}/cache"),
        format!("Dir::Cache::archives={dir}/cache/archives"),
        "Acquire::Languages=none".to_owned(),
    ]
    .into_iter()
    .flat_map(|o| ["-o".to_owned(), o])
    .collect();
    if config == "apt" {
        for arch in ["amd64", "arm64"] {
            options.push("-o".to_owned());
            options.push(format!("APT::Architectures::={arch}"));
        }
    }
    options
}

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Writes a private apt configuration and updates its lists (at most once a day).
fn apt_config(config: &str, suites: &[(&str, &str)]) -> Result<Vec<String>> {
    let dir = PathBuf::from(format!("{CACHE}/{config}"));
    for sub in ["parts", "lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    let sources: String = suites
        .iter()
        .map(|(base, suite)| {
            format!("deb [signed-by={KEYRING}] http://deb.debian.org/{base} {suite} main\n")
        })
        .collect();
    let list = dir.join("sources.list");
    let changed = fs::read_to_string(&list).ok().as_deref() != Some(&sources);
    fs::write(&list, &sources)?;
    let stamp = dir.join("updated");
    let fresh = fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(86400));
    let options = apt_options(config);
    if changed || !fresh {
        exec(
            Command::new("apt-get")
                .args(&options)
                .arg("update")
                .arg("-q"),
        )?;
        fs::write(&stamp, b"")?;
    }
    Ok(options)
}

/// qemu-system for both arches, from bookworm-backports so that it matches the machine's
/// qemu-utils 10.0 (bookworm's own qemu 7.2 would replace it).
pub fn ensure_qemu() -> Result<()> {
    let have = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("qemu-system-x86_64") && have("qemu-system-aarch64") {
        return Ok(());
    }
    let options = apt_config(
        "apt-install",
        &[
            ("debian", "bookworm"),
            ("debian", "bookworm-updates"),
            ("debian", "bookworm-backports"),
            ("debian-security", "bookworm-security"),
        ],
    )?;
    exec(
        Command::new("apt-get")
            .args(&options)
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args([
                "-t",
                "bookworm-backports",
                "qemu-system-x86",
                "qemu-system-arm",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn kernel_apt() -> Result<Vec<String>> {
    apt_config(
        "apt",
        &[
            ("debian", "bullseye"),
            ("debian", "bookworm"),
            ("debian-security", "bookworm-security"),
            ("debian", "trixie"),
            ("debian", "trixie-backports"),
        ],
    )
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The newest Debian version of `linux-image-ARCH` whose upstream version starts with
/// `prefix` (`6.1` matches 6.1.x, `7` any 7.x).
fn resolve_version(apt: &[String], arch: Arch, prefix: &str) -> Result<String> {
    let package = format!("linux-image-{0}:{0}", arch.debian());
    let text = output(
        Command::new("apt-cache")
            .args(apt)
            .args(["madison", &package]),
    )?;
    let mut versions: Vec<String> = text
        .lines()
        .filter_map(|line| line.split('|').nth(1).map(|v| v.trim().to_owned()))
        .filter(|v| v.starts_with(&format!("{prefix}.")))
        .collect();
    // Packages listed in the bullseye-security archive for arm64 have no files there
    // (platform notes); prefer versions from the main archives by trying each in order.
    versions.dedup();
    versions
        .into_iter()
        .next()
        .with_context(|| format!("no Debian kernel {prefix}.x for {}", arch.debian()))
}

fn depends(apt: &[String], package: &str, version: &str) -> Result<Vec<String>> {
    let text = output(
        Command::new("apt-cache")
            .args(apt)
            .args(["show", &format!("{package}={version}")]),
    )?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("Depends: "))
        .unwrap_or_default()
        .split(',')
        .filter_map(|d| d.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// A kernel ready to boot.
struct Kernel {
    /// Upstream-ish release (`uname -r`).
    release: String,
    /// What qemu boots: `vmlinux` (x86_64, PVH) or `Image` (arm64).
    image: PathBuf,
    /// Decompressed modules in load order.
    modules: Vec<PathBuf>,
}

fn fetch_kernel(apt: &[String], arch: Arch, prefix: &str) -> Result<Kernel> {
    let version = resolve_version(apt, arch, prefix)?;
    // `kernels-2`: the module set grew by ext4 and crc32c (the boot kit mounts a root file
    // system); older caches lack them.
    let dir = PathBuf::from(format!("{CACHE}/kernels-2/{}-{version}", arch.debian()));
    let ready = dir.join("ready");
    if !ready.exists() {
        eprintln!(
            "vm-test: fetching Debian kernel {version} ({})",
            arch.debian()
        );
        let _ = fs::remove_dir_all(&dir);
        let work = dir.join("work");
        fs::create_dir_all(&work)?;
        let meta = format!("linux-image-{}:{}", arch.debian(), arch.debian());
        let image_package = depends(apt, &meta, &version)?
            .into_iter()
            .find(|d| d.starts_with("linux-image-"))
            .context("the kernel metapackage names no linux-image package")?;
        let mut packages = vec![image_package.clone()];
        // From 6.17 on, linux-image-X is empty: the kernel and modules are in linux-binary-X
        // and linux-modules-X.
        for dep in depends(apt, &format!("{image_package}:{}", arch.debian()), &version)? {
            if dep.starts_with("linux-binary-") || dep.starts_with("linux-modules-") {
                packages.push(dep);
            }
        }
        for package in &packages {
            exec(
                Command::new("apt-get")
                    .current_dir(&work)
                    .args(apt)
                    .args(["download", "-q"])
                    .arg(format!("{package}:{}={version}", arch.debian())),
            )?;
        }
        for deb in fs::read_dir(&work)?.flatten() {
            if deb.path().extension().is_some_and(|e| e == "deb") {
                exec(
                    Command::new("dpkg")
                        .arg("-x")
                        .arg(deb.path())
                        .arg(work.join("root")),
                )?;
                fs::remove_file(deb.path())?;
            }
        }
        let tree = work.join("root");
        let modules_root = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|p| tree.join(p))
            .find(|p| p.is_dir())
            .context("no modules directory in the kernel package")?;
        let release = fs::read_dir(&modules_root)?
            .flatten()
            .next()
            .context("no kernel release directory")?
            .file_name()
            .to_string_lossy()
            .into_owned();
        let vmlinuz = [
            tree.join(format!("boot/vmlinuz-{release}")),
            modules_root.join(&release).join("vmlinuz"),
        ]
        .into_iter()
        .find(|p| p.exists())
        .context("no vmlinuz in the kernel packages")?;
        let raw = fs::read(&vmlinuz)?;
        let image = match arch {
            Arch::X86_64 => {
                let vmlinux = extract_vmlinux(&raw)?;
                let path = dir.join("vmlinux");
                fs::write(&path, vmlinux)?;
                path
            }
            Arch::Aarch64 => {
                let path = dir.join("Image");
                if raw.starts_with(&[0x1f, 0x8b]) {
                    let mut out = Vec::new();
                    flate2_gunzip(&raw, &mut out)?;
                    fs::write(&path, out)?;
                } else {
                    fs::write(&path, &raw)?;
                }
                path
            }
        };
        let modules = collect_modules(&modules_root.join(&release), &dir.join("modules"))?;
        fs::write(dir.join("modules.order"), modules.join("\n"))?;
        fs::write(dir.join("release"), &release)?;
        let _ = image;
        fs::remove_dir_all(&work)?;
        fs::write(&ready, b"")?;
    }
    let release = fs::read_to_string(dir.join("release"))?;
    let order = fs::read_to_string(dir.join("modules.order"))?;
    Ok(Kernel {
        release,
        image: dir.join(match arch {
            Arch::X86_64 => "vmlinux",
            Arch::Aarch64 => "Image",
        }),
        modules: order
            .lines()
            .filter(|l| !l.is_empty())
            .map(|m| dir.join("modules").join(format!("{m}.ko")))
            .collect(),
    })
}

fn flate2_gunzip(data: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let mut child = Command::new("gzip")
        .args(["-dc"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    child.stdout.take().context("stdout")?.read_to_end(out)?;
    let _ = writer.join();
    child.wait()?;
    Ok(())
}

/// The uncompressed kernel inside an x86 bzImage: its payload is xz (5.10, 6.1) or zstd.
fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>> {
    let find = |magic: &[u8]| bzimage.windows(magic.len()).position(|w| w == magic);
    let (offset, tool, args): (usize, &str, &[&str]) =
        if let Some(at) = find(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            (at, "xz", &["-dcq"])
        } else if let Some(at) = find(&[0x28, 0xb5, 0x2f, 0xfd]) {
            (at, "zstd", &["-dcq", "--long=31"])
        } else {
            bail!("no xz or zstd payload in the kernel image");
        };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {tool}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let payload = bzimage[offset..].to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &payload));
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .context("stdout")?
        .read_to_end(&mut out)?;
    let _ = writer.join();
    // Trailing bytes after the payload make the decompressor complain: judge by the output.
    let _ = child.wait();
    if !out.starts_with(b"\x7fELF") {
        bail!("the decompressed kernel is not an ELF vmlinux");
    }
    Ok(out)
}

/// Finds the virtio block and PCI modules and their dependencies (from each module's own
/// `depends=`, as there is no modules.dep in the package), writes them decompressed to `out`,
/// and returns their names in load order. Built-in modules are skipped.
fn collect_modules(release_dir: &Path, out: &Path) -> Result<Vec<String>> {
    fs::create_dir_all(out)?;
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![release_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                for ext in [".ko", ".ko.xz", ".ko.zst"] {
                    if let Some(stem) = name.strip_suffix(ext) {
                        files.insert(stem.replace('-', "_"), path.clone());
                    }
                }
            }
        }
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        files: &std::collections::BTreeMap<String, PathBuf>,
        out: &Path,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let Some(path) = files.get(name) else {
            return Ok(()); // built in
        };
        let bytes = decompress_module(path)?;
        let deps = bytes
            .windows(8)
            .position(|w| w == b"depends=")
            .map(|at| {
                let rest = &bytes[at + 8..];
                let end = rest.iter().position(|&b| b == 0).unwrap_or(0);
                String::from_utf8_lossy(&rest[..end]).into_owned()
            })
            .unwrap_or_default();
        for dep in deps.split(',').filter(|d| !d.is_empty()) {
            visit(&dep.replace('-', "_"), files, out, seen, order)?;
        }
        fs::write(out.join(format!("{name}.ko")), bytes)?;
        order.push(name.to_owned());
        Ok(())
    }
    // ext4 for the boot kit's root file system; crc32c is what ext4's metadata checksums
    // ask the crypto API for (a missing module counts as built in).
    for wanted in [
        "virtio_pci",
        "virtio_blk",
        "crc32c_generic",
        "crc32c_intel",
        "ext4",
    ] {
        visit(wanted, &files, out, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn decompress_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some(("xz", vec!["-dc"]))
    } else if name.ends_with(".zst") {
        Some(("zstd", vec!["-dcq"]))
    } else {
        None
    };
    match tool {
        None => Ok(fs::read(path)?),
        Some((tool, args)) => {
            let out = Command::new(tool).args(args).arg(path).output()?;
            if !out.status.success() {
                bail!("decompressing {}", path.display());
            }
            Ok(out.stdout)
        }
    }
}

fn busybox(apt: &[String], arch: Arch) -> Result<PathBuf> {
    let path = PathBuf::from(format!("{CACHE}/busybox-{}", arch.debian()));
    if path.exists() {
        return Ok(path);
    }
    let work = PathBuf::from(format!("{CACHE}/busybox-work"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    exec(
        Command::new("apt-get")
            .current_dir(&work)
            .args(apt)
            .args(["download", "-q"])
            .arg(format!("busybox-static:{}", arch.debian())),
    )?;
    let deb = fs::read_dir(&work)?
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "deb"))
        .context("busybox-static was not downloaded")?
        .path();
    exec(
        Command::new("dpkg")
            .arg("-x")
            .arg(&deb)
            .arg(work.join("root")),
    )?;
    let bin = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| work.join("root").join(p))
        .find(|p| p.exists())
        .context("no busybox in busybox-static")?;
    fs::copy(bin, &path)?;
    fs::remove_dir_all(&work)?;
    Ok(path)
}

/// The `blkmirror` binary for `arch`, stripped, and its shared libraries (host path, guest
/// path).
fn guest_binary(arch: Arch, dir: &Path) -> Result<(PathBuf, Vec<(PathBuf, String)>)> {
    let (target_dir, strip, libdir) = match arch {
        Arch::X86_64 => {
            exec(crate::cargo().args(["build", "--locked", "-p", "blkmirror"]))?;
            ("target/debug", "strip", "/lib/x86_64-linux-gnu")
        }
        Arch::Aarch64 => {
            exec(crate::cargo().args([
                "build",
                "--locked",
                "-p",
                "blkmirror",
                "--target",
                "aarch64-unknown-linux-gnu",
            ]))?;
            (
                "target/aarch64-unknown-linux-gnu/debug",
                "aarch64-linux-gnu-strip",
                "/usr/aarch64-linux-gnu/lib",
            )
        }
    };
    let binary = dir.join(format!("blkmirror-{}", arch.name()));
    fs::copy(root().join(target_dir).join("blkmirror"), &binary)?;
    exec(Command::new(strip).arg(&binary))?;
    let dynamic = output(Command::new("readelf").args(["-d", "-l"]).arg(&binary))?;
    let mut libs = Vec::new();
    for line in dynamic.lines() {
        if let Some(rest) = line.split("Shared library: [").nth(1) {
            let name = rest.trim_end_matches(']');
            libs.push((PathBuf::from(libdir).join(name), format!("lib/{name}")));
        }
        if let Some(rest) = line.split("Requesting program interpreter: ").nth(1) {
            let interp = rest.trim_end_matches(']').trim();
            let host = match arch {
                Arch::X86_64 => PathBuf::from(interp),
                Arch::Aarch64 => PathBuf::from(libdir)
                    .join(Path::new(interp).file_name().context("interpreter name")?),
            };
            libs.push((host, interp.trim_start_matches('/').to_owned()));
        }
    }
    Ok((binary, libs))
}

/// A `newc` cpio archive, as the kernel unpacks an initramfs.
struct Cpio {
    data: Vec<u8>,
    inode: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn new() -> Self {
        Self {
            data: Vec::new(),
            inode: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            body.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.inode += 1;
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_owned()) {
            self.entry(name, 0o040755, &[]);
        }
    }

    fn file(&mut self, name: &str, mode: u32, body: &[u8]) {
        // Parent directories first.
        let mut prefix = String::new();
        for part in name
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |s| s.1)
        {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.dir(&prefix.clone());
        }
        self.entry(name, 0o100000 | mode, body);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}

const GUEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin LD_LIBRARY_PATH=/lib
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo "BLKMIRROR-VM: kernel $(uname -r) $(uname -m)"
for m in $(cat /modules.order); do
  insmod /modules/$m.ko || echo "BLKMIRROR-VM: note: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
if [ ! -b /dev/vda ]; then
  echo "BLKMIRROR-VM: FAIL track: no /dev/vda (virtio modules?)"
else
  ip link set lo up
  blkmirror vm-selftest /dev/vda 2>&1
  blkmirror keygen --out /tmp/agent > /tmp/agent.fp 2>/dev/null
  blkmirror keygen --out /tmp/recv > /tmp/recv.fp 2>/dev/null
  blkmirror receiver --listen 127.0.0.1:7443 --data-dir /tmp/data --identity /tmp/recv \
    --allow "$(cat /tmp/agent.fp)=vm" 2>/tmp/receiver.log &
  i=0
  while ! grep -q listening /tmp/receiver.log && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
  if blkmirror agent --device /dev/vda --volume vm --receiver 127.0.0.1:7443 \
      --receiver-fingerprint "$(cat /tmp/recv.fp)" --identity /tmp/agent --once \
      --pin-root /sys/fs/bpf/blkmirror-agent --state-dir /tmp/agent-state 2>/tmp/agent.log; then
    if cmp /dev/vda /tmp/data/vm/image.raw; then
      echo "BLKMIRROR-VM: PASS mirror: agent --once over 127.0.0.1, the replica equals the disk"
    else
      echo "BLKMIRROR-VM: FAIL mirror: the replica differs from the disk"
    fi
  else
    echo "BLKMIRROR-VM: FAIL mirror: $(grep error /tmp/agent.log | tail -1)"
  fi
fi
echo "BLKMIRROR-VM: END"
poweroff -f
"#;

/// The boot kit's `/init`: loads the modules, mounts the `root=` device (default `/dev/vda`)
/// and hands over to its `/sbin/init`, as a distribution's initramfs would.
const BOOT_KIT_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod /modules/$m.ko 2>/dev/null; done
root=$(sed -n 's/.*root=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$root" ] || root=/dev/vda
i=0
while [ ! -b "$root" ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
if ! mount -t ext4 -o rw "$root" /newroot; then
  echo "blkmirror-boot-kit: cannot mount $root"
  poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/init
"#;

/// `cargo xtask boot-kit`: a kernel, an initramfs that boots an ext4 root file system from
/// the first virtio disk, and a static busybox to build such file systems with, for the root
/// test of `blkmirror drill --boot` (Debian's 6.1 kernel of this machine's architecture).
/// Writes `vmlinuz`, `initrd.cpio` and `busybox` into `out`.
pub fn boot_kit(out: &Path) -> Result<()> {
    crate::demo::require_root()?;
    ensure_qemu()?;
    let arch = if cfg!(target_arch = "aarch64") {
        Arch::Aarch64
    } else {
        Arch::X86_64
    };
    let apt = kernel_apt()?;
    let kernel = fetch_kernel(&apt, arch, "6.1")?;
    let busybox = busybox(&apt, arch)?;
    let mut cpio = Cpio::new();
    for dir in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        cpio.dir(dir);
    }
    cpio.file("bin/busybox", 0o755, &fs::read(&busybox)?);
    let mut order = Vec::new();
    for module in &kernel.modules {
        let name = module
            .file_stem()
            .and_then(|n| n.to_str())
            .context("module name")?
            .to_owned();
        cpio.file(&format!("modules/{name}.ko"), 0o644, &fs::read(module)?);
        order.push(name);
    }
    cpio.file("modules.order", 0o644, order.join("\n").as_bytes());
    cpio.file("init", 0o755, BOOT_KIT_INIT.as_bytes());
    fs::create_dir_all(out)?;
    fs::write(out.join("initrd.cpio"), cpio.finish())?;
    fs::copy(&kernel.image, out.join("vmlinuz"))?;
    fs::copy(&busybox, out.join("busybox"))?;
    eprintln!(
        "boot-kit: {} ({}) with {} module(s) in {}",
        kernel.release,
        arch.name(),
        order.len(),
        out.display()
    );
    Ok(())
}

/// The result of one guest.
struct Outcome {
    kernel: String,
    arch: Arch,
    hooks: String,
    passed: bool,
    reason: String,
    seconds: f64,
}

fn boot(arch: Arch, kernel: &Kernel, initrd: &Path, disk: &Path) -> Result<(String, f64)> {
    let drive = format!(
        "file={},if=none,format=raw,id=d0,discard=unmap",
        disk.display()
    );
    let mut command = match arch {
        Arch::X86_64 => {
            let mut c = Command::new("qemu-system-x86_64");
            c.args(["-accel", "tcg", "-cpu", "max", "-M", "q35"])
                .arg("-kernel")
                .arg(&kernel.image)
                .args(["-append", "console=ttyS0 panic=-1 rdinit=/init quiet"]);
            c
        }
        Arch::Aarch64 => {
            let mut c = Command::new("qemu-system-aarch64");
            c.args(["-accel", "tcg", "-M", "virt", "-cpu", "max,pauth-impdef=on"])
                .arg("-kernel")
                .arg(&kernel.image)
                .args(["-append", "console=ttyAMA0 panic=-1 rdinit=/init quiet"]);
            c
        }
    };
    command
        .args(["-m", "1024", "-smp", "2", "-nographic", "-no-reboot"])
        .arg("-initrd")
        .arg(initrd)
        .args(["-drive", &drive, "-device", "virtio-blk-pci,drive=d0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn().context("starting qemu")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stdout.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    });
    let deadline = Duration::from_secs(600);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = reader.join().unwrap_or_default();
    Ok((text, started.elapsed().as_secs_f64()))
}

fn judge(text: &str) -> (bool, String, String) {
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split("BLKMIRROR-VM: ").nth(1))
        .map(str::trim)
        .collect();
    let hooks = lines
        .iter()
        .filter_map(|l| l.strip_prefix("hook: "))
        .filter(|h| !h.starts_with("completeness"))
        .map(|h| h.split(" (").next().unwrap_or(h))
        .collect::<Vec<_>>()
        .join(" + ");
    let failures: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("FAIL "))
        .collect();
    let passes = lines.iter().filter(|l| l.starts_with("PASS ")).count();
    let ended = lines.contains(&"END");
    if !failures.is_empty() {
        (false, failures.join("; "), hooks)
    } else if !ended {
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        (
            false,
            format!(
                "the guest did not finish; last console lines: {:?}",
                tail.into_iter().rev().collect::<Vec<_>>()
            ),
            hooks,
        )
    } else if passes < 4 {
        (false, format!("only {passes} of 4 checks passed"), hooks)
    } else {
        (
            true,
            "tracker exact, discard kind, sectors cross-checked, mirror equal".into(),
            hooks,
        )
    }
}

/// Runs the matrix; returns (passed, failed) combinations. Fails only if the machinery fails.
pub fn run(arch: ArchChoice, kernels: &[String]) -> Result<(usize, usize)> {
    crate::demo::require_root()?;
    ensure_qemu()?;
    let apt = kernel_apt()?;
    let arches = match arch {
        ArchChoice::X86_64 => vec![Arch::X86_64],
        ArchChoice::Aarch64 => vec![Arch::Aarch64],
        ArchChoice::All => vec![Arch::X86_64, Arch::Aarch64],
    };
    let kernels: Vec<String> = if kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|k| (*k).to_owned()).collect()
    } else {
        kernels.to_vec()
    };
    let work = std::env::temp_dir().join(format!("blkmirror-vm-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let result = (|| -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::new();
        for &arch in &arches {
            let (binary, libs) = guest_binary(arch, &work)?;
            let busybox = busybox(&apt, arch)?;
            for prefix in &kernels {
                let kernel = match fetch_kernel(&apt, arch, prefix) {
                    Ok(kernel) => kernel,
                    Err(error) => {
                        outcomes.push(Outcome {
                            kernel: prefix.clone(),
                            arch,
                            hooks: String::new(),
                            passed: false,
                            reason: format!("could not fetch the kernel: {error:#}"),
                            seconds: 0.0,
                        });
                        continue;
                    }
                };
                let mut cpio = Cpio::new();
                for dir in ["bin", "dev", "proc", "sys", "tmp", "run", "lib", "modules"] {
                    cpio.dir(dir);
                }
                cpio.file("bin/busybox", 0o755, &fs::read(&busybox)?);
                cpio.file("bin/blkmirror", 0o755, &fs::read(&binary)?);
                for (host, guest) in &libs {
                    let body =
                        fs::read(host).with_context(|| format!("reading {}", host.display()))?;
                    cpio.file(guest, 0o755, &body);
                }
                let mut order = Vec::new();
                for module in &kernel.modules {
                    let name = module
                        .file_stem()
                        .and_then(|n| n.to_str())
                        .context("module name")?
                        .to_owned();
                    cpio.file(&format!("modules/{name}.ko"), 0o644, &fs::read(module)?);
                    order.push(name);
                }
                cpio.file("modules.order", 0o644, order.join("\n").as_bytes());
                cpio.file("init", 0o755, GUEST_INIT.as_bytes());
                let initrd = work.join("initrd.cpio");
                fs::write(&initrd, cpio.finish())?;
                let disk = work.join("disk.img");
                fs::File::create(&disk)?.set_len(64 << 20)?;
                eprintln!(
                    "vm-test: booting {} on {} (software emulation)",
                    kernel.release,
                    arch.name()
                );
                let (text, seconds) = boot(arch, &kernel, &initrd, &disk)?;
                fs::write(
                    work.join(format!("console-{}-{}.log", arch.name(), kernel.release)),
                    &text,
                )?;
                let (passed, reason, hooks) = judge(&text);
                println!(
                    "{} {} {}: {} ({seconds:.0}s) hooks: {}",
                    if passed { "PASS" } else { "FAIL" },
                    kernel.release,
                    arch.name(),
                    reason,
                    if hooks.is_empty() { "-" } else { &hooks }
                );
                outcomes.push(Outcome {
                    kernel: kernel.release,
                    arch,
                    hooks,
                    passed,
                    reason,
                    seconds,
                });
            }
        }
        Ok(outcomes)
    })();
    let outcomes = result?;
    println!();
    println!("| kernel | arch | hooks | result |");
    println!("|---|---|---|---|");
    for o in &outcomes {
        println!(
            "| {} | {} | {} | {} ({:.0} s) |",
            o.kernel,
            o.arch.name(),
            if o.hooks.is_empty() { "-" } else { &o.hooks },
            if o.passed {
                "PASS".to_owned()
            } else {
                format!("FAIL: {}", o.reason)
            },
            o.seconds
        );
    }
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    if failed > 0 {
        eprintln!("vm-test: console logs kept in {}", work.display());
    } else {
        let _ = fs::remove_dir_all(&work);
    }
    Ok((outcomes.len() - failed, failed))
}
