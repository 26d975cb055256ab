//! `blkmirror mount` and `blkmirror drill`: a point attached as a local block device, and a
//! drill that proves it recovers, beside a running receiver.
//!
//! # Attaching a point
//!
//! The machine class this runs on has FUSE and loop devices but no NBD kernel module. An
//! [`Attachment`] chains three parts that exist everywhere qemu-utils is installed:
//!
//! 1. the export's own NBD server ([`crate::dr::export`]), in this process, on a Unix socket in
//!    a private directory;
//! 2. `qemu-storage-daemon` with its NBD client and a FUSE export: the point as a regular file;
//! 3. a loop device over that file.
//!
//! The export is always copy-on-write here ([`export::Overlay`]): mounting a crash-consistent file
//! system replays its journal, and those writes go to the overlay, never to the replica.
//! Everything is undone when the attachment is dropped, in reverse order.
//!
//! # Drills
//!
//! A drill attaches a point, then: finds its file system; mounts and unmounts it (the journal
//! replay a real recovery would do); checks it read-only (`e2fsck -fn`, `xfs_repair -n`);
//! mounts it read-only and runs the operator's health check against the mount. The recovery
//! time is from the drill's start to the health check's success. The result goes to the audit
//! log and to `VOLUME/drill.json`, which the receiver's status and metrics read.

use std::{
    fs,
    io::Read as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::dr::{
    audit::{AuditLog, Event},
    export::{self, ExportDisk, ListenAddr, PointView},
    ops::{OpsError, PointSelector, describe},
    volume::Volume,
};

/// How long qemu-storage-daemon may take to show the FUSE file.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// The file a drill's result is kept in, in the volume's directory.
pub const DRILL_RECORD: &str = "drill.json";
/// The format of [`DrillRecord`].
pub const DRILL_FORMAT: u32 = 1;

fn environment(message: impl Into<String>) -> OpsError {
    OpsError::Environment(message.into())
}

/// Runs a helper program; its output on failure.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("{program}: {error}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn check_tools() -> Result<(), OpsError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(environment(
            "attaching a point needs root (it makes a loop device and mounts it)",
        ));
    }
    for (tool, package) in [
        ("qemu-storage-daemon", "qemu-utils"),
        ("losetup", "mount"),
        ("blkid", "util-linux"),
    ] {
        let found = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
        if !found {
            return Err(environment(format!(
                "{tool} is not installed (package {package}); it is needed to attach a point \
                 without the NBD kernel module"
            )));
        }
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Which qemu accelerator a boot drill uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BootAccel {
    /// KVM when `/dev/kvm` can be opened, else software emulation.
    #[default]
    Auto,
    /// KVM (hardware virtualization).
    Kvm,
    /// Software emulation (TCG): slower, and works inside VMs whose nested KVM does not.
    Tcg,
}

/// How a drill boots the point (`drill --boot`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootOptions {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// Its initramfs.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub append: String,
    /// The text on the guest's serial console that means healthy.
    pub healthy: String,
    /// How long the boot may take to print it.
    pub timeout: Duration,
    /// The accelerator.
    pub accel: BootAccel,
    /// Guest memory in MiB.
    pub memory_mib: u32,
}

impl BootOptions {
    /// The kernel command line when none is given: the first virtio disk as root, the serial
    /// console.
    pub fn default_append() -> &'static str {
        if cfg!(target_arch = "aarch64") {
            "console=ttyAMA0 root=/dev/vda rw panic=-1"
        } else {
            "console=ttyS0 root=/dev/vda rw panic=-1"
        }
    }

    fn qemu() -> (&'static str, &'static str, &'static str) {
        if cfg!(target_arch = "aarch64") {
            ("qemu-system-aarch64", "virt", "qemu-system-arm")
        } else {
            ("qemu-system-x86_64", "q35", "qemu-system-x86")
        }
    }

    /// Usage and environment errors, before anything is recorded.
    fn check(&self) -> Result<(), OpsError> {
        let (binary, _, package) = Self::qemu();
        if !on_path(binary) {
            return Err(environment(format!(
                "{binary} is not installed (package {package}); `drill --boot` needs it"
            )));
        }
        for file in std::iter::once(&self.kernel).chain(&self.initrd) {
            if !file.is_file() {
                return Err(OpsError::Usage(format!("{} is not a file", file.display())));
            }
        }
        if self.healthy.is_empty() {
            return Err(OpsError::Usage("--boot-healthy must not be empty".into()));
        }
        Ok(())
    }
}

/// Boots the export on `socket` under qemu and waits for the health text on its serial
/// console. The guest writes into the attachment's overlay, never into the replica.
fn boot_guest(socket: &Path, name: &str, boot: &BootOptions) -> Result<((), String), String> {
    let (binary, machine, _) = BootOptions::qemu();
    let kvm = match boot.accel {
        BootAccel::Kvm => true,
        BootAccel::Tcg => false,
        BootAccel::Auto => fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
    };
    // One vCPU under software emulation: with two on a busy host, one vCPU thread starves,
    // the guest's RCU stalls, and the guest hung past the 3-minute timeout (seen in a CI run
    // whose first drill of the same kernel booted in 5.6 s).
    let vcpus = if kvm { "2" } else { "1" };
    let mut command = Command::new(binary);
    command
        .args(["-accel", if kvm { "kvm" } else { "tcg" }])
        .args(["-cpu", if kvm { "host" } else { "max" }])
        .args(["-M", machine, "-smp", vcpus, "-nographic", "-no-reboot"])
        .args(["-m", &boot.memory_mib.to_string()])
        .arg("-kernel")
        .arg(&boot.kernel)
        .args(["-append", &boot.append])
        .arg("-drive")
        .arg(format!(
            "file=nbd+unix:///{name}?socket={},format=raw,if=none,id=point",
            socket.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=point"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(initrd) = &boot.initrd {
        command.arg("-initrd").arg(initrd);
    }
    let started = Instant::now();
    let mut child = command
        .spawn()
        .map_err(|error| format!("{binary}: {error}"))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    for stream in [
        Box::new(stdout) as Box<dyn std::io::Read + Send>,
        Box::new(stderr),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stream)
                .split(b'\n')
                .map_while(Result::ok)
            {
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut last: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let deadline = started + boot.timeout;
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.contains(&boot.healthy) {
                    break Ok(());
                }
                last.push_back(line.trim().to_owned());
                if last.len() > 12 {
                    last.pop_front();
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                break Err(format!(
                    "no {:?} on the guest's console within {}",
                    boot.healthy,
                    blkmirror_protocol::units::format_duration(boot.timeout)
                ));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err(format!(
                    "the guest stopped without printing {:?}",
                    boot.healthy
                ));
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let seconds = started.elapsed().as_secs_f64();
    match outcome {
        Ok(()) => Ok((
            (),
            format!(
                "healthy after {seconds:.1} s ({}, {})",
                if kvm { "kvm" } else { "software emulation" },
                boot.kernel.display()
            ),
        )),
        Err(message) => Err(format!(
            "{message}; last console lines: {}",
            last.iter()
                .filter(|l| !l.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join(" | ")
        )),
    }
}

/// A point attached as a loop device (see the module docs); detached on drop.
pub struct Attachment {
    /// Stops the export's accept loop when the attachment goes (its clients end with the
    /// daemon), so the view, its pin and its overlay go with the last client.
    stop: Arc<std::sync::atomic::AtomicBool>,
    dir: PathBuf,
    daemon: Option<Child>,
    fuse_file: PathBuf,
    loop_device: Option<PathBuf>,
    disk: Arc<ExportDisk>,
}

impl Attachment {
    /// Attaches `disk` (a view with an overlay) as a writable loop device.
    pub fn attach(disk: Arc<ExportDisk>, name: &str) -> Result<Self, OpsError> {
        check_tools()?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("blkmirror-attach-{}-{nanos}", std::process::id()));
        fs::create_dir(&dir)
            .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)))
            .map_err(|source| OpsError::Target {
                what: "creating",
                path: dir.clone(),
                source,
            })?;
        let mut attachment = Self {
            stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            fuse_file: dir.join("point.raw"),
            dir,
            daemon: None,
            loop_device: None,
            disk,
        };
        attachment.start(name)?;
        Ok(attachment)
    }

    fn start(&mut self, name: &str) -> Result<(), OpsError> {
        let socket = self.dir.join("nbd.sock");
        let (listener, _) = export::bind(&ListenAddr::Unix(socket.clone()), name)?;
        let (disk, export_name, stop) = (self.disk.clone(), name.to_owned(), self.stop.clone());
        std::thread::spawn(move || export::serve_until(&listener, &disk, &export_name, &stop));
        fs::write(&self.fuse_file, b"").map_err(|source| OpsError::Target {
            what: "creating",
            path: self.fuse_file.clone(),
            source,
        })?;
        let log = self.dir.join("qemu-storage-daemon.log");
        let log_file = fs::File::create(&log).map_err(|source| OpsError::Target {
            what: "creating",
            path: log.clone(),
            source,
        })?;
        let daemon = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=nbd,server.type=unix,server.path={},export={name},node-name=point",
                socket.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=file,node-name=point,mountpoint={},writable=on",
                self.fuse_file.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|error| environment(format!("qemu-storage-daemon: {error}")))?;
        self.daemon = Some(daemon);
        let size = self.disk.view().size();
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        while fs::metadata(&self.fuse_file).map_or(0, |m| m.len()) != size {
            let exited = self
                .daemon
                .as_mut()
                .and_then(|daemon| daemon.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                return Err(environment(format!(
                    "qemu-storage-daemon did not attach the point: {}",
                    fs::read_to_string(&log).unwrap_or_default().trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let file = self.fuse_file.to_str().expect("a temp path is UTF-8");
        let device = run("losetup", &["-f", "--show", file]).map_err(environment)?;
        self.loop_device = Some(PathBuf::from(device.trim()));
        Ok(())
    }

    /// The loop device.
    pub fn device(&self) -> &Path {
        self.loop_device.as_deref().expect("attached")
    }

    /// The device as a string argument.
    fn device_arg(&self) -> &str {
        self.device().to_str().expect("/dev/loopN is UTF-8")
    }

    /// The private directory (for mount points).
    fn private_dir(&self) -> &Path {
        &self.dir
    }

    /// The export's Unix socket (more clients may connect: they share the overlay).
    fn socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(device) = self.loop_device.take() {
            let _ = Command::new("losetup").arg("-d").arg(&device).output();
        }
        if let Some(mut daemon) = self.daemon.take() {
            // SIGTERM lets it unmount its FUSE file; a lazy unmount catches one that did not.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(daemon.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.fuse_file)
            .output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A mount made by this module; unmounted on drop (lazily if busy).
struct Mounted(PathBuf);

impl Mounted {
    fn mount(device: &str, target: &Path, options: &str) -> Result<Self, String> {
        run(
            "mount",
            &[
                "-o",
                options,
                device,
                target.to_str().ok_or("a UTF-8 mount point")?,
            ],
        )?;
        Ok(Self(target.to_owned()))
    }

    fn unmount(self) -> Result<(), String> {
        let target = self.0.clone();
        std::mem::forget(self);
        run("umount", &[target.to_str().unwrap_or_default()]).map(|_| ())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if Command::new("umount")
            .arg(&self.0)
            .output()
            .is_ok_and(|o| !o.status.success())
        {
            let _ = Command::new("umount").arg("-l").arg(&self.0).output();
        }
    }
}

fn open_disk(
    data_dir: &Path,
    volume: &str,
    at: &PointSelector,
    store: Option<&crate::dr::objstore::StoreConfig>,
) -> Result<Arc<ExportDisk>, OpsError> {
    if let Some(store) = store {
        // From the store there is no volume directory: the overlay (unlinked at once) goes in
        // the temporary directory.
        let view = crate::dr::storeview::StorePointView::open(store, volume, at)?;
        let overlay = export::overlay_for(&view, &std::env::temp_dir())?;
        return Ok(Arc::new(ExportDisk::new(view, Some(overlay))));
    }
    let view = PointView::open(data_dir, volume, at)?;
    let overlay = export::overlay_for(&view, &Volume::dir_of(data_dir, volume))?;
    Ok(Arc::new(ExportDisk::new(view, Some(overlay))))
}

/// Appends one event to the data directory's audit log (a failure to is warned about: the
/// action itself has happened).
pub(crate) fn audit(
    data_dir: &Path,
    event: &'static str,
    volume: &str,
    outcome: &str,
    detail: serde_json::Value,
) {
    let record = AuditLog::in_dir(data_dir).append(Event {
        event,
        volume: Some(volume.to_owned()),
        outcome: outcome.to_owned(),
        detail,
        ..Event::default()
    });
    if let Err(error) = record {
        eprintln!("blkmirror: warning: audit log: {error}");
    }
}

/// SIGINT and SIGTERM, caught from the moment this is made.
///
/// Made before anything is announced: a caller that reads the announcement and signals at
/// once must find the handler installed, not the default action (which would leave the mount
/// and its loop device behind).
pub(crate) struct StopSignals {
    runtime: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(crate) fn install() -> Result<Self, OpsError> {
        use tokio::signal::unix::{SignalKind, signal};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| OpsError::Environment(format!("a signal runtime: {error}")))?;
        let (term, int) = runtime.block_on(async {
            (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            )
        });
        let caught = |error: std::io::Error| {
            OpsError::Environment(format!("catching SIGTERM and SIGINT: {error}"))
        };
        Ok(Self {
            term: term.map_err(caught)?,
            int: int.map_err(caught)?,
            runtime,
        })
    }

    /// Waits for SIGINT or SIGTERM (one that came since [`StopSignals::install`] counts).
    pub(crate) fn wait(mut self) {
        self.runtime.block_on(async {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
        });
    }
}

/// `blkmirror mount VOLUME --at POINT DIR`: mounts the point read-only at `target` until
/// SIGINT or SIGTERM.
pub fn mount(
    data_dir: &Path,
    volume: &str,
    at: &PointSelector,
    target: &Path,
    store: Option<&crate::dr::objstore::StoreConfig>,
) -> Result<(), OpsError> {
    if !target.is_dir() {
        return Err(OpsError::Usage(format!(
            "{}: not a directory (make the mount point first)",
            target.display()
        )));
    }
    check_tools()?;
    let stop = StopSignals::install()?;
    let disk = open_disk(data_dir, volume, at, store)?;
    let point = disk.view().point().clone();
    let attachment = Attachment::attach(disk, volume)?;
    // The loop device is writable (over the overlay): a dirty journal is replayed into the
    // overlay, and the mount is read-only.
    let mounted = Mounted::mount(attachment.device_arg(), target, "ro").map_err(environment)?;
    if store.is_none() || data_dir.is_dir() {
        audit(
            data_dir,
            "mount",
            volume,
            "ok",
            serde_json::json!({
                "seq": point.seq,
                "target": target.display().to_string(),
                "user": export::current_user(),
            }),
        );
    }
    eprintln!(
        "blkmirror: volume {volume} {} mounted read-only at {} (SIGINT or SIGTERM unmounts)",
        describe(&point),
        target.display()
    );
    println!("{}", target.display());
    let _ = std::io::Write::flush(&mut std::io::stdout());
    stop.wait();
    let unmounted = mounted.unmount();
    drop(attachment);
    unmounted.map_err(environment)?;
    eprintln!("blkmirror: {} unmounted", target.display());
    Ok(())
}

/// One step of a drill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillStep {
    /// `attach`, `filesystem`, `journal replay`, `fsck`, `mount`, `check`.
    pub step: String,
    /// Whether it passed.
    pub ok: bool,
    /// How long it took.
    pub ms: u64,
    /// What it found (the file system type, a tool's complaint).
    pub detail: String,
}

/// The result of a drill, as kept in `VOLUME/drill.json` and printed by `drill --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillRecord {
    /// [`DRILL_FORMAT`].
    pub format: u32,
    /// The volume.
    pub volume: String,
    /// The point drilled.
    pub seq: u64,
    /// When the drill started (Unix milliseconds).
    pub time_unix_ms: u64,
    /// Whether the point recovered.
    pub ok: bool,
    /// From the drill's start to the health check's success (or to the failure).
    pub recovery_ms: u64,
    /// Why it failed, when it did.
    pub failure: Option<String>,
    /// The steps.
    pub steps: Vec<DrillStep>,
    /// The last successful drill (Unix milliseconds), this one or an earlier one.
    pub last_success_unix_ms: Option<u64>,
}

/// Reads the drill record of volume `volume`, if any.
pub fn read_drill_record(data_dir: &Path, volume: &str) -> Option<DrillRecord> {
    let path = Volume::dir_of(data_dir, volume).join(DRILL_RECORD);
    let text = fs::read_to_string(path).ok()?;
    serde_json::from_str::<DrillRecord>(&text)
        .ok()
        .filter(|record| record.format == DRILL_FORMAT)
}

/// The options of `blkmirror drill`.
#[derive(Clone, Debug)]
pub struct DrillOptions {
    /// The receiver's data directory.
    pub data_dir: PathBuf,
    /// The volume.
    pub volume: String,
    /// The point.
    pub at: PointSelector,
    /// A shell command run against the mount (`$BLKMIRROR_DRILL_MOUNT`); exit 0 is healthy.
    pub check: Option<String>,
    /// How long the check may take.
    pub check_timeout: Duration,
    /// Boot the point under qemu after the file-system steps.
    pub boot: Option<BootOptions>,
    /// Print the record as JSON.
    pub json: bool,
    /// Who asked for it through the control socket (a queued request), for the audit log.
    pub requested_by: Option<String>,
    /// Drill the point in this object store instead of the data directory; the record is then
    /// kept in the store (`volumes/VOLUME/drill.json`), where every receiver's site sees it.
    pub store: Option<crate::dr::objstore::StoreConfig>,
}

/// The key of a volume's drill record in the object store.
pub fn store_drill_key(volume: &str) -> String {
    format!("volumes/{volume}/{DRILL_RECORD}")
}

/// The drill record of `volume` in the store, if any (a damaged one counts as none).
fn read_store_drill_record(
    store: &crate::dr::objstore::StoreConfig,
    volume: &str,
) -> Result<Option<DrillRecord>, OpsError> {
    let (runtime, client) = crate::dr::fromstore::open(store, volume)?;
    let found = runtime
        .block_on(client.get(&store_drill_key(volume), 1 << 20))
        .map_err(|error| {
            crate::dr::fromstore::classify(crate::dr::objpoints::PointStoreError::Store(error))
        })?;
    Ok(found.and_then(|(bytes, _)| serde_json::from_slice(&bytes).ok()))
}

/// Keeps `record` as the volume's drill record in the store.
fn write_store_drill_record(
    store: &crate::dr::objstore::StoreConfig,
    record: &DrillRecord,
) -> Result<(), OpsError> {
    let (runtime, client) = crate::dr::fromstore::open(store, &record.volume)?;
    let text = serde_json::to_vec_pretty(record).expect("serializes");
    runtime
        .block_on(client.put(&store_drill_key(&record.volume), text))
        .map_err(|error| {
            crate::dr::fromstore::classify(crate::dr::objpoints::PointStoreError::Store(error))
        })
}

struct Drill {
    started: Instant,
    steps: Vec<DrillStep>,
}

impl Drill {
    /// Runs `step`, records it, and returns its value or the failure message.
    fn step<T>(
        &mut self,
        name: &str,
        run: impl FnOnce() -> Result<(T, String), String>,
    ) -> Result<T, String> {
        let started = Instant::now();
        let result = run();
        let ms = started.elapsed().as_millis() as u64;
        let (ok, detail) = match &result {
            Ok((_, detail)) => (true, detail.clone()),
            Err(message) => (false, message.clone()),
        };
        eprintln!(
            "blkmirror: drill: {name}: {} in {ms} ms{}",
            if ok { "ok" } else { "FAILED" },
            if detail.is_empty() {
                String::new()
            } else {
                format!(" ({detail})")
            }
        );
        self.steps.push(DrillStep {
            step: name.to_owned(),
            ok,
            ms,
            detail,
        });
        result
            .map(|(value, _)| value)
            .map_err(|message| format!("{name}: {message}"))
    }
}

/// Runs `command` through `sh -c` in `dir`, killed after `timeout`.
fn health_check(
    command: &str,
    dir: &Path,
    volume: &str,
    seq: u64,
    timeout: Duration,
) -> Result<(), String> {
    let mut child = Command::new("sh")
        .args(["-c", command])
        .current_dir(dir)
        .env("BLKMIRROR_DRILL_MOUNT", dir)
        .env("BLKMIRROR_DRILL_VOLUME", volume)
        .env("BLKMIRROR_DRILL_POINT", seq.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("sh: {error}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{command:?} did not finish within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut output = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut output);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut output);
    }
    let tail: String = output
        .trim()
        .chars()
        .rev()
        .take(400)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} exited with {status}: {tail}"))
    }
}

/// `blkmirror drill`: proves that a point recovers, without touching the replica.
pub fn drill(options: &DrillOptions) -> Result<(), OpsError> {
    let time_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut drill = Drill {
        started: Instant::now(),
        steps: Vec::new(),
    };
    // Usage and environment errors (no such volume or point, not root, no qemu-utils) are
    // not drill results: nothing is recorded.
    check_tools()?;
    if let Some(boot) = &options.boot {
        boot.check()?;
    }
    let disk = open_disk(
        &options.data_dir,
        &options.volume,
        &options.at,
        options.store.as_ref(),
    )?;
    let point = disk.view().point().clone();
    eprintln!(
        "blkmirror: drill of volume {} {}",
        options.volume,
        describe(&point)
    );
    let result = run_drill(&mut drill, options, disk, point.seq);
    let recovery_ms = match &result {
        Ok(healthy_ms) => *healthy_ms,
        Err(_) => drill.started.elapsed().as_millis() as u64,
    };
    let result = result.map(|_| ());
    let previous = match &options.store {
        Some(store) => read_store_drill_record(store, &options.volume)?,
        None => read_drill_record(&options.data_dir, &options.volume),
    };
    let record = DrillRecord {
        format: DRILL_FORMAT,
        volume: options.volume.clone(),
        seq: point.seq,
        time_unix_ms,
        ok: result.is_ok(),
        recovery_ms,
        failure: result.as_ref().err().cloned(),
        steps: drill.steps,
        last_success_unix_ms: if result.is_ok() {
            Some(time_unix_ms)
        } else {
            previous.and_then(|p| p.last_success_unix_ms)
        },
    };
    if let Some(store) = &options.store {
        write_store_drill_record(store, &record)?;
    } else {
        let path = Volume::dir_of(&options.data_dir, &options.volume).join(DRILL_RECORD);
        let text = serde_json::to_string_pretty(&record).expect("serializes");
        crate::durable::write_atomic(&path, text.as_bytes()).map_err(|source| {
            OpsError::Target {
                what: "writing",
                path: path.clone(),
                source,
            }
        })?;
    }
    // From the store, the data directory may not exist (a DR machine without a receiver).
    if options.store.is_none() || options.data_dir.is_dir() {
        audit(
            &options.data_dir,
            "drill",
            &options.volume,
            result.as_ref().err().map_or("ok", String::as_str),
            serde_json::json!({
                "seq": point.seq,
                "recovery_ms": recovery_ms,
                "steps": record.steps,
                "user": export::current_user(),
                "requested_by": options.requested_by,
                "from_store": options.store.as_ref().map(|store| format!("{} bucket {}", store.endpoint, store.bucket)),
            }),
        );
    }
    if options.json {
        println!("{}", serde_json::to_string(&record).expect("serializes"));
    }
    match result {
        Ok(()) => {
            eprintln!(
                "blkmirror: drill passed: volume {} point {} recovered in {:.1} s",
                options.volume,
                point.seq,
                recovery_ms as f64 / 1000.0
            );
            Ok(())
        }
        Err(failure) => Err(OpsError::DrillFailed(format!(
            "drill of volume {} point {} failed: {failure}",
            options.volume, point.seq
        ))),
    }
}

fn run_drill(
    drill: &mut Drill,
    options: &DrillOptions,
    disk: Arc<ExportDisk>,
    seq: u64,
) -> Result<u64, String> {
    let attachment = drill.step("attach", || {
        Attachment::attach(disk, &options.volume)
            .map(|a| {
                let detail = a.device().display().to_string();
                (a, detail)
            })
            .map_err(|e| e.to_string())
    })?;
    let device = attachment.device_arg().to_owned();
    let fstype = drill.step("filesystem", || {
        let found = run("blkid", &["-p", "-o", "value", "-s", "TYPE", &device])
            .map(|out| out.trim().to_owned())
            .unwrap_or_default();
        match (found.is_empty(), &options.boot) {
            (false, _) => Ok((Some(found.clone()), found)),
            // A whole disk with a partition table: the boot is the check.
            (true, Some(_)) => Ok((
                None,
                "none on the whole disk (a partition table?); the boot checks it".to_owned(),
            )),
            (true, None) => Err("no file system found on the point".to_owned()),
        }
    })?;
    if let Some(fstype) = fstype {
        check_file_system(drill, options, &attachment, &device, &fstype, seq)?;
    }
    if let Some(boot) = &options.boot {
        drill.step("boot", || {
            boot_guest(&attachment.socket(), &options.volume, boot)
        })?;
    }
    // Recovered: the file system mounted and the application's check passed, or the guest
    // booted to its health signal.
    let healthy_ms = drill.started.elapsed().as_millis() as u64;
    drop(attachment);
    Ok(healthy_ms)
}

/// The file-system steps of a drill: journal replay, fsck, a read-only mount and the check.
fn check_file_system(
    drill: &mut Drill,
    options: &DrillOptions,
    attachment: &Attachment,
    device: &str,
    fstype: &str,
    seq: u64,
) -> Result<(), String> {
    let mount_point = attachment.private_dir().join("mnt");
    fs::create_dir_all(&mount_point).map_err(|e| e.to_string())?;
    drill.step("journal replay", || {
        // A read-write mount and unmount: what a recovered host would do at boot. Its writes
        // go to the overlay.
        let mounted = Mounted::mount(device, &mount_point, "rw")?;
        mounted.unmount()?;
        Ok(((), String::new()))
    })?;
    drill.step("fsck", || {
        let (program, args): (&str, Vec<&str>) = match fstype {
            "ext2" | "ext3" | "ext4" => ("e2fsck", vec!["-fn", device]),
            "xfs" => ("xfs_repair", vec!["-n", device]),
            other => return Ok(((), format!("no read-only checker for {other}; skipped"))),
        };
        run(program, &args).map(|_| ((), format!("{program} clean")))
    })?;
    let mounted = drill.step("mount", || {
        Mounted::mount(device, &mount_point, "ro").map(|m| (m, "read-only".to_owned()))
    })?;
    if let Some(command) = &options.check {
        drill.step("check", || {
            health_check(
                command,
                &mount_point,
                &options.volume,
                seq,
                options.check_timeout,
            )
            .map(|()| ((), String::new()))
        })?;
    }
    mounted.unmount()
}

/// Whether a drill of a volume scheduled `every` is due at `now_unix_ms`: never drilled, or
/// the last drill (passed or failed) started at least `every` ago. Pure.
pub fn is_due(record: Option<&DrillRecord>, every: Duration, now_unix_ms: u64) -> bool {
    record.is_none_or(|r| now_unix_ms.saturating_sub(r.time_unix_ms) >= every.as_millis() as u64)
}

/// Whether a volume scheduled `every` is overdue: no successful drill, or the last one is
/// older than `every`. Pure.
pub fn is_overdue(record: Option<&DrillRecord>, every: Duration, now_unix_ms: u64) -> bool {
    record
        .and_then(|r| r.last_success_unix_ms)
        .is_none_or(|success| now_unix_ms.saturating_sub(success) > every.as_millis() as u64)
}

/// The directory, in the data directory, where the receiver daemon queues the drills that
/// operators ask for through the control socket (one file per volume); `drill --due`, started
/// by `blkmirror-drills.path` when it is not empty, runs them.
pub const DRILL_REQUESTS: &str = "drill-requests";
/// A drill's health-check time limit when neither `--check-timeout` nor a schedule gives one.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest request file read.
const MAX_DRILL_REQUEST: u64 = 4096;

/// A drill an operator asked for through the control socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillRequest {
    /// The volume.
    pub volume: String,
    /// The point (`--at`), as the operator gave it (checked by the daemon).
    pub at: String,
    /// Who asked (their user name and role).
    pub user: String,
    /// When (Unix milliseconds): a drill record that started later answers it.
    pub requested_unix_ms: u64,
}

/// Where volume `volume`'s queued request is.
pub fn drill_request_path(data_dir: &Path, volume: &str) -> PathBuf {
    data_dir.join(DRILL_REQUESTS).join(format!("{volume}.json"))
}

/// Queues `request` for the drill runner, unless one for the volume is queued already (then
/// the caller waits for that one). Returns the request in the queue.
pub fn queue_drill(data_dir: &Path, request: &DrillRequest) -> Result<DrillRequest, OpsError> {
    let path = drill_request_path(data_dir, &request.volume);
    if let Ok(Some(queued)) = read_drill_request(&path) {
        return Ok(queued);
    }
    let dir = data_dir.join(DRILL_REQUESTS);
    let target = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| OpsError::Target { what, path, source }
    };
    fs::create_dir_all(&dir).map_err(target("making", &dir))?;
    let text = serde_json::to_vec(request).expect("serializes");
    crate::dr::storage::LocalDisk::shared()
        .write_atomic(&path, &text)
        .map_err(target("writing", &path))?;
    Ok(request.clone())
}

/// Reads a queued request: `Ok(None)` if there is none, `Err` with what is wrong with a bad one.
pub fn read_drill_request(path: &Path) -> Result<Option<DrillRequest>, String> {
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.to_string()),
    };
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(&file, MAX_DRILL_REQUEST + 1),
        &mut text,
    )
    .map_err(|error| error.to_string())?;
    if text.len() as u64 > MAX_DRILL_REQUEST {
        return Err(format!("larger than {MAX_DRILL_REQUEST} bytes"));
    }
    let request: DrillRequest = serde_json::from_str(&text).map_err(|error| error.to_string())?;
    blkmirror_protocol::wire::check_volume_name(&request.volume)
        .map_err(|error| error.to_string())?;
    if path.file_stem().and_then(|stem| stem.to_str()) != Some(request.volume.as_str()) {
        return Err(format!(
            "names volume {:?}, not the one of its file",
            request.volume
        ));
    }
    crate::dr::ops::parse_selector(&request.at)?;
    Ok(Some(request))
}

/// `blkmirror drill --due`: runs the drills operators asked for (queued by the receiver
/// daemon), then those whose schedule is due, each with its schedule's check, timeout and
/// boot. Fails if any drill failed.
pub fn run_due(
    data_dir: &Path,
    schedules: &[crate::command::config::DrillSchedule],
    json: bool,
) -> Result<(), OpsError> {
    let now = crate::command::status::now_ms();
    let mut failed = Vec::new();
    let mut ran = 0;
    let mut requested = 0;
    let queue = data_dir.join(DRILL_REQUESTS);
    let mut queued: Vec<PathBuf> = fs::read_dir(&queue)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
                .collect()
        })
        .unwrap_or_default();
    queued.sort();
    for path in queued {
        let request = read_drill_request(&path);
        // Taken off the queue whatever happens: a request that cannot run must not start
        // the runner again and again.
        let _ = fs::remove_file(&path);
        let request = match request {
            Ok(Some(request)) => request,
            Ok(None) => continue,
            Err(why) => {
                eprintln!("blkmirror: {}: dropped: {why}", path.display());
                continue;
            }
        };
        requested += 1;
        let schedule = schedules.iter().find(|s| s.volume == request.volume);
        eprintln!(
            "blkmirror: drill of volume {} requested by {} at {}",
            request.volume,
            request.user,
            blkmirror_protocol::units::format_utc(request.requested_unix_ms)
        );
        let result = drill(&DrillOptions {
            data_dir: data_dir.to_owned(),
            volume: request.volume.clone(),
            at: crate::dr::ops::parse_selector(&request.at).map_err(OpsError::Usage)?,
            check: schedule.and_then(|s| s.check.clone()),
            check_timeout: schedule.map_or(DEFAULT_CHECK_TIMEOUT, |s| s.check_timeout),
            boot: schedule.and_then(|s| s.boot.clone()),
            json,
            requested_by: Some(request.user.clone()),
            store: None,
        });
        if let Err(error) = result {
            eprintln!("blkmirror: {error}");
            failed.push(request.volume.clone());
        }
    }
    for schedule in schedules {
        let record = read_drill_record(data_dir, &schedule.volume);
        if !is_due(record.as_ref(), schedule.every, now) {
            continue;
        }
        ran += 1;
        let result = drill(&DrillOptions {
            data_dir: data_dir.to_owned(),
            volume: schedule.volume.clone(),
            at: schedule.at.clone(),
            check: schedule.check.clone(),
            check_timeout: schedule.check_timeout,
            boot: schedule.boot.clone(),
            json,
            requested_by: None,
            store: None,
        });
        if let Err(error) = result {
            eprintln!("blkmirror: {error}");
            failed.push(schedule.volume.clone());
        }
    }
    eprintln!(
        "blkmirror: {requested} requested drill(s) run; {} drill schedule(s), {ran} due and run, \
         {} failed",
        schedules.len(),
        failed.len()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(OpsError::DrillFailed(format!(
            "drills failed for: {}",
            failed.join(", ")
        )))
    }
}

/// The drill status of every volume under `data_dir` that has a drill record or a schedule.
pub fn drill_summaries(
    data_dir: &Path,
    schedules: &[crate::command::config::DrillSchedule],
    now_unix_ms: u64,
) -> Vec<(String, crate::command::status::DrillSummary)> {
    let mut volumes: std::collections::BTreeSet<String> =
        schedules.iter().map(|s| s.volume.clone()).collect();
    if let Ok(entries) = fs::read_dir(data_dir) {
        for entry in entries.flatten() {
            if entry.path().join(DRILL_RECORD).is_file()
                && let Some(name) = entry.file_name().to_str()
            {
                volumes.insert(name.to_owned());
            }
        }
    }
    volumes
        .into_iter()
        .map(|volume| {
            let record = read_drill_record(data_dir, &volume);
            let every = schedules
                .iter()
                .find(|s| s.volume == volume)
                .map(|s| s.every);
            let summary = crate::command::status::DrillSummary {
                seq: record.as_ref().map_or(0, |r| r.seq),
                time_unix_ms: record.as_ref().map_or(0, |r| r.time_unix_ms),
                ok: record.as_ref().is_some_and(|r| r.ok),
                recovery_seconds: record
                    .as_ref()
                    .map_or(0.0, |r| r.recovery_ms as f64 / 1000.0),
                failure: record.as_ref().and_then(|r| r.failure.clone()),
                last_success_unix_ms: record.as_ref().and_then(|r| r.last_success_unix_ms),
                every_s: every.map(|e| e.as_secs()),
                overdue: every.is_some_and(|e| is_overdue(record.as_ref(), e, now_unix_ms)),
            };
            (volume, summary)
        })
        .collect()
}

/// `blkmirror failover VOLUME --at POINT --to DEV|FILE`: writes the point to the target (as
/// `restore` does, checking every chunk), then raises the volume's term and makes the DR site
/// primary, so the receiver refuses the old source from then on (see
/// [`crate::dr::authority`]). The write comes first: a failover whose target fails changes
/// nothing. Cycles the receiver applies meanwhile only add later points; the promoted point is
/// the one written.
pub fn failover(
    data_dir: &Path,
    volume: &str,
    at: &PointSelector,
    to: &Path,
    force: bool,
    again: bool,
    track: Option<&crate::tracker::track::TrackOptions>,
) -> Result<(), OpsError> {
    let (current, point) = failover_point(data_dir, volume, at, again)?;
    crate::dr::ops::restore(
        data_dir,
        volume,
        &PointSelector::Seq(point.seq),
        to,
        force,
        false,
    )?;
    // Track the promoted device from now on, so a failback moves only what differs. Before
    // the term changes: a failover that cannot track changes nothing.
    let is_device = std::fs::metadata(to).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_block_device()
    });
    let tracked = match track {
        Some(track) if is_device => Some(crate::dr::failback::track_promoted(
            data_dir,
            volume,
            to,
            point.seq,
            current.term + 1,
            track,
        )?),
        _ => None,
    };
    let user = export::current_user();
    let term = raise_term_as(
        data_dir,
        volume,
        &point,
        &to.display().to_string(),
        &user,
        again,
        tracked.is_some(),
    )?;
    eprintln!(
        "blkmirror: volume {volume} failed over: {} is now at {}; term {}, the DR site is \
         primary, and the receiver refuses the old source's cycles from now on; {}",
        describe(&point),
        to.display(),
        term,
        match &tracked {
            Some(promoted) => format!(
                "{} is tracked (generation {:016x}), so a failback moves only what differs \
                 ({} chunk(s) committed after this point count too)",
                to.display(),
                promoted.generation,
                blkmirror_protocol::failback::covered(&promoted.after_point)
            ),
            None => "the target is not tracked, so a failback compares every chunk".to_owned(),
        }
    );
    Ok(())
}

/// A failover's checks before it writes anything: one point, and no failover in force
/// unless `again`. Returns the authority as it is and the point to promote.
fn failover_point(
    data_dir: &Path,
    volume: &str,
    at: &PointSelector,
    again: bool,
) -> Result<
    (
        crate::dr::authority::Authority,
        crate::dr::stored::StoredPoint,
    ),
    OpsError,
> {
    if *at == PointSelector::All {
        return Err(OpsError::Usage(
            "a failover promotes one point, not --at all".into(),
        ));
    }
    let disk = crate::dr::storage::LocalDisk::shared();
    let current = crate::dr::authority::read(&disk, &Volume::dir_of(data_dir, volume))?;
    current.may_fail_over(again).map_err(OpsError::Usage)?;
    let reader = crate::dr::volume::PointReader::open(data_dir, volume)?;
    let point = crate::dr::ops::select(reader.points(), at)
        .map_err(OpsError::Usage)?
        .remove(0);
    Ok((current, point))
}

/// `blkmirror failover VOLUME --at POINT --to export --listen ADDR`: promotes the point into
/// a writable export with no copy first. Its writes go to an overlay kept in the volume's
/// directory (the receiver's replica is never written), and the export is served until SIGINT
/// or SIGTERM; `export VOLUME --promoted` serves it again, and `failback serve --export` sends
/// what differs back to the source.
pub fn failover_to_export(
    volume: &str,
    at: &PointSelector,
    force: bool,
    again: bool,
    serve: &export::ExportOptions,
) -> Result<(), OpsError> {
    let (term, message) = promote_export(
        &serve.data_dir,
        volume,
        at,
        force,
        again,
        &export::current_user(),
    )?;
    eprintln!("blkmirror: {message}");
    export::export_promoted(serve).map_err(|error| {
        OpsError::Usage(format!(
            "volume {volume} is failed over to an export (term {term}), but serving it failed: \
             {error}; serve it with `blkmirror export {volume} --promoted --listen ADDR`"
        ))
    })
}

/// The promotion of `failover --to export` (here or in the receiver daemon, for an admin on
/// its control socket): the kept overlay and `promoted.json`, then the next term. Returns the
/// term and what to tell the operator; serving the export is the caller's.
pub fn promote_export(
    data_dir: &Path,
    volume: &str,
    at: &PointSelector,
    force: bool,
    again: bool,
    user: &str,
) -> Result<(u64, String), OpsError> {
    let (current, point) = failover_point(data_dir, volume, at, again)?;
    // The overlay and the record first: a failover that cannot make them changes nothing.
    let promoted = crate::dr::failback::promote_to_export(
        data_dir,
        volume,
        point.seq,
        current.term + 1,
        force,
    )?;
    let term = raise_term_as(data_dir, volume, &point, "export", user, again, true)?;
    Ok((
        term,
        format!(
            "volume {volume} failed over: {} is now a writable export; term {term}, the DR site \
             is primary, and the receiver refuses the old source's cycles from now on; its \
             writes are kept in {} ({} chunk(s) committed after this point count for a \
             failback too)",
            describe(&point),
            promoted.device.display(),
            blkmirror_protocol::failback::covered(&promoted.after_point)
        ),
    ))
}

/// The second half of a failover, once the point is written at `to`: the next term, the DR
/// site primary, durably and audited. Returns the new term.
pub fn raise_term(
    data_dir: &Path,
    volume: &str,
    point: &crate::dr::stored::StoredPoint,
    to: &str,
    user: &str,
    again: bool,
) -> Result<u64, OpsError> {
    raise_term_as(data_dir, volume, point, to, user, again, false)
}

fn raise_term_as(
    data_dir: &Path,
    volume: &str,
    point: &crate::dr::stored::StoredPoint,
    to: &str,
    user: &str,
    again: bool,
    tracked: bool,
) -> Result<u64, OpsError> {
    let disk = crate::dr::storage::LocalDisk::shared();
    let dir = Volume::dir_of(data_dir, volume);
    let next = {
        let _lock = crate::dr::volume::lock_volume(&disk, &dir, false)?;
        let next = crate::dr::authority::read(&disk, &dir)?
            .failover(point.seq, to, user, crate::command::status::now_ms(), again)
            .map_err(OpsError::Usage)?;
        crate::dr::authority::write(&disk, &dir, &next)?;
        next
    };
    audit(
        data_dir,
        "failover",
        volume,
        "ok",
        serde_json::json!({
            "term": next.term,
            "seq": point.seq,
            "to": to,
            "tracked": tracked,
            "user": user,
        }),
    );
    Ok(next.term)
}

/// `blkmirror reprotect VOLUME`: makes the source primary again, under a new term. What the
/// DR site wrote since the failover stays where the failover put it; it is not replicated back.
pub fn reprotect(data_dir: &Path, volume: &str) -> Result<(), OpsError> {
    crate::dr::volume::PointReader::open(data_dir, volume)?;
    let disk = crate::dr::storage::LocalDisk::shared();
    let dir = Volume::dir_of(data_dir, volume);
    let user = export::current_user();
    let next = {
        let _lock = crate::dr::volume::lock_volume(&disk, &dir, false)?;
        let next = crate::dr::authority::read(&disk, &dir)?
            .reprotect(&user, crate::command::status::now_ms())
            .map_err(OpsError::Usage)?;
        crate::dr::authority::write(&disk, &dir, &next)?;
        next
    };
    audit(
        data_dir,
        "reprotect",
        volume,
        "ok",
        serde_json::json!({ "term": next.term, "user": user }),
    );
    eprintln!(
        "blkmirror: volume {volume}: term {}, the source is primary again; the receiver takes \
         its cycles from its next connection. What the DR site wrote since the failover is not \
         replicated back",
        next.term
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drill_request_is_queued_once_and_a_bad_one_is_refused_with_what_is_wrong() {
        let tmp = crate::testing::TempDir::new("drill-requests");
        let request = DrillRequest {
            volume: "v".into(),
            at: "seq:3".into(),
            user: "alice (uid 1000), operator".into(),
            requested_unix_ms: 5,
        };
        assert_eq!(queue_drill(&tmp.0, &request).unwrap(), request);
        // A second request joins the first.
        let later = DrillRequest {
            user: "bob".into(),
            requested_unix_ms: 9,
            ..request.clone()
        };
        assert_eq!(queue_drill(&tmp.0, &later).unwrap(), request);
        let path = drill_request_path(&tmp.0, "v");
        assert_eq!(read_drill_request(&path), Ok(Some(request.clone())));
        assert_eq!(read_drill_request(&tmp.0.join("none.json")), Ok(None));
        let planted = |name: &str, text: String| {
            let path = tmp.0.join(DRILL_REQUESTS).join(name);
            fs::write(&path, text).unwrap();
            read_drill_request(&path).unwrap_err()
        };
        let json = |volume: &str, at: &str| {
            serde_json::to_string(&DrillRequest {
                volume: volume.into(),
                at: at.into(),
                ..request.clone()
            })
            .unwrap()
        };
        assert!(planted("w.json", json("v", "latest")).contains("not the one of its file"));
        assert!(planted("x.json", json("x", "--check=id")).contains("point"));
        assert!(planted("y.json", "x".repeat(5000)).contains("larger than"));
        assert!(
            planted(
                "z.json",
                json("z", "latest").replace('}', ",\"check\":\"id\"}")
            )
            .contains("unknown field")
        );
        assert!(planted("...json", json("..", "latest")).contains("volume"));
    }

    fn record(time_unix_ms: u64, ok: bool, last_success_unix_ms: Option<u64>) -> DrillRecord {
        DrillRecord {
            format: DRILL_FORMAT,
            volume: "v".into(),
            seq: 3,
            time_unix_ms,
            ok,
            recovery_ms: 1500,
            failure: (!ok).then(|| "fsck: e2fsck failed".into()),
            steps: Vec::new(),
            last_success_unix_ms,
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);
    const HOUR_MS: u64 = 3_600_000;

    #[test]
    fn a_drill_is_due_an_interval_after_the_last_attempt_and_overdue_after_the_last_success() {
        let now = 100 * HOUR_MS;
        assert!(is_due(None, HOUR, now));
        assert!(is_overdue(None, HOUR, now));
        let recent_failure = record(now - HOUR_MS / 2, false, Some(now - 3 * HOUR_MS));
        // A failed drill is retried after the interval, not at once...
        assert!(!is_due(Some(&recent_failure), HOUR, now));
        assert!(is_due(Some(&recent_failure), HOUR, now + HOUR_MS / 2));
        // ...and the volume is overdue meanwhile: its last success is 3 h old.
        assert!(is_overdue(Some(&recent_failure), HOUR, now));
        let success = record(now - HOUR_MS / 2, true, Some(now - HOUR_MS / 2));
        assert!(!is_overdue(Some(&success), HOUR, now));
        assert!(is_overdue(Some(&success), HOUR, now + HOUR_MS));
        // Never a success: overdue whatever the attempts.
        assert!(is_overdue(Some(&record(now, false, None)), HOUR, now));
    }

    #[test]
    fn summaries_cover_scheduled_and_drilled_volumes() {
        let tmp = crate::testing::TempDir::new("drill-summaries");
        let now = 100 * HOUR_MS;
        fs::create_dir_all(tmp.0.join("drilled")).unwrap();
        fs::write(
            tmp.0.join("drilled").join(DRILL_RECORD),
            serde_json::to_string(&record(now - 2 * HOUR_MS, true, Some(now - 2 * HOUR_MS)))
                .unwrap(),
        )
        .unwrap();
        fs::create_dir_all(tmp.0.join("plain")).unwrap();
        let schedules = vec![
            crate::command::config::DrillSchedule {
                volume: "drilled".into(),
                every: HOUR,
                at: PointSelector::Latest,
                check: None,
                check_timeout: HOUR,
                boot: None,
            },
            crate::command::config::DrillSchedule {
                volume: "never".into(),
                every: HOUR,
                at: PointSelector::Latest,
                check: None,
                check_timeout: HOUR,
                boot: None,
            },
        ];
        let summaries = drill_summaries(&tmp.0, &schedules, now);
        let names: Vec<&str> = summaries.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(names, ["drilled", "never"]);
        let drilled = &summaries[0].1;
        assert!(drilled.ok && drilled.overdue, "{drilled:?}");
        assert_eq!(drilled.recovery_seconds, 1.5);
        assert_eq!(drilled.every_s, Some(3600));
        let never = &summaries[1].1;
        assert!(never.overdue && never.time_unix_ms == 0, "{never:?}");
        // Without a schedule, a drilled volume is shown but never overdue.
        let unscheduled = drill_summaries(&tmp.0, &[], now);
        assert_eq!(unscheduled.len(), 1);
        assert!(!unscheduled[0].1.overdue);
    }
}
