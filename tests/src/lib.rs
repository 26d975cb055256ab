//! Helpers for blkmirror's root-only integration tests: guards that always clean up what a
//! test made (loop devices, mounts, bpffs pins, scratch directories), and small wrappers to run
//! the real `blkmirror` binary.
//!
//! Tests `panic!` with context instead of returning errors, so failures keep their location.

use std::{
    cell::Cell,
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader},
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

pub mod ceph;
pub mod mirror;

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Panics unless running as root: these tests load eBPF and create loop devices.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the blkmirror kernel tests need root (they load eBPF and create loop devices); run them as root"
    );
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Discards (`zero == false`) or zeroes (`blkdiscard -z`) `len` bytes at `offset` of `device`.
pub fn blkdiscard(device: &Path, zero: bool, offset: u64, len: u64) {
    let (offset, len) = (offset.to_string(), len.to_string());
    let device = device.to_str().expect("utf-8 path");
    let mut args = vec!["-o", &offset, "-l", &len, device];
    if zero {
        args.insert(0, "-z");
    }
    sh("blkdiscard", &args);
}

/// A scratch directory, removed on drop.
pub struct Scratch {
    /// Its path.
    pub path: PathBuf,
}

impl Scratch {
    /// Creates a fresh directory under /tmp (or `$BLKMIRROR_TEST_DIR`).
    pub fn new() -> Self {
        let base =
            std::env::var_os("BLKMIRROR_TEST_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let path = base.join(unique("blkmirror-test"));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A loop device over a sparse file; detached on drop.
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
    /// The backing file.
    pub backing: PathBuf,
}

impl LoopDevice {
    /// A loop device of `size` bytes backed by a new sparse file in `dir`.
    pub fn new(dir: &Path, size: u64) -> Self {
        Self::with_options(dir, size, None)
    }

    /// Like [`Self::new`], with an `sfdisk` script to partition it first (attached with `-P`).
    pub fn with_options(dir: &Path, size: u64, sfdisk_script: Option<&str>) -> Self {
        let backing = dir.join(unique("disk.img"));
        File::create(&backing)
            .and_then(|f| f.set_len(size))
            .unwrap_or_else(|e| panic!("creating {}: {e}", backing.display()));
        if let Some(script) = sfdisk_script {
            let mut child = Command::new("sfdisk")
                .arg("--quiet")
                .arg(&backing)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .expect("sfdisk (fdisk package) must be installed");
            use std::io::Write as _;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(script.as_bytes())
                .expect("writing sfdisk script");
            assert!(child.wait().expect("sfdisk").success(), "sfdisk failed");
        }
        let backing_str = backing.to_str().expect("utf-8 path");
        let mut args = vec!["-f", "--show"];
        if sfdisk_script.is_some() {
            args.push("-P");
        }
        args.push(backing_str);
        let path = PathBuf::from(sh("losetup", &args).trim());
        let device = Self { path, backing };
        if sfdisk_script.is_some() {
            // Partition nodes may need a nudge to appear.
            let p1 = device.partition(1);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !p1.exists() && Instant::now() < deadline {
                let _ = Command::new("partx").arg("-a").arg(&device.path).output();
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(p1.exists(), "{} did not appear", p1.display());
        }
        device
    }

    /// A loop device over an existing file (detached, and the file removed, on drop).
    pub fn attach(file: &Path) -> Self {
        let path = PathBuf::from(
            sh(
                "losetup",
                &["-f", "--show", file.to_str().expect("utf-8 path")],
            )
            .trim(),
        );
        Self {
            path,
            backing: file.to_owned(),
        }
    }

    /// The node of partition `n`.
    pub fn partition(&self, n: u32) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.path.display()))
    }

    /// The device path as a string.
    pub fn as_str(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }
}

impl LoopDevice {
    /// Whether the loop device is still ours: attached to our backing file. Loop numbers are
    /// reused at once, so after a detach the same node may belong to another test.
    pub fn is_ours(&self) -> bool {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
            .is_ok_and(|file| Path::new(file.trim()) == self.backing)
    }

    /// Detaches the device now (if it is still ours).
    pub fn detach(&self) {
        if self.is_ours() {
            self.remove_completion_logs();
            sh("losetup", &["-d", self.as_str()]);
        }
    }

    /// Removes the trackers' completion logs (tracefs instances `blkmirror-MAJ-MIN`) of the
    /// device and its partitions: like pins, they outlive the tracker process.
    fn remove_completion_logs(&self) {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let sys = PathBuf::from(format!("/sys/block/{name}"));
        let mut nodes = vec![sys.join("dev")];
        if let Ok(entries) = fs::read_dir(&sys) {
            nodes.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&name))
                    .map(|e| e.path().join("dev")),
            );
        }
        for node in nodes {
            let Ok(dev) = fs::read_to_string(&node) else {
                continue;
            };
            let Some((major, minor)) = dev
                .trim()
                .split_once(':')
                .and_then(|(major, minor)| Some((major.parse().ok()?, minor.parse().ok()?)))
            else {
                continue;
            };
            // The agent's own removal: the tracefs path and the disable-first order in one place.
            use blkmirror::tracker::completion_log::CompletionLog;
            let _ = CompletionLog::remove(&CompletionLog::dir(
                Path::new(blkmirror::tracker::environment::TRACEFS),
                major,
                minor,
            ));
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.is_ours() {
            self.remove_completion_logs();
            let _ = Command::new("losetup").arg("-d").arg(&self.path).output();
        }
        let _ = fs::remove_file(&self.backing);
    }
}

/// A mounted file system; unmounted on drop.
pub struct Mount {
    /// The mount point.
    pub target: PathBuf,
}

impl Mount {
    /// Makes a file system of type `fstype` on `device` and mounts it on a new directory in `dir`.
    pub fn mkfs_and_mount(device: &Path, fstype: &str, dir: &Path) -> Self {
        let dev = device.to_str().expect("utf-8 path");
        match fstype {
            "ext4" => sh("mkfs.ext4", &["-q", "-F", dev]),
            "xfs" => sh("mkfs.xfs", &["-q", "-f", dev]),
            other => panic!("unsupported fs {other}"),
        };
        let target = dir.join(unique("mnt"));
        fs::create_dir_all(&target).expect("mount point");
        sh("mount", &[dev, target.to_str().expect("utf-8 path")]);
        Self { target }
    }
}

impl Mount {
    /// Unmounts now (asserting success); the drop then has nothing left to do.
    pub fn unmount(&self) {
        sh("umount", &[self.target.to_str().expect("utf-8 path")]);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.target).output();
        let _ = fs::remove_dir(&self.target);
    }
}

/// Held shared by every [`PinRoot`] (a test whose trackers attach and detach programs on
/// `block_rq_complete`), and exclusively by a [`QuietHooks`] test.
static HOOK_CHURN: RwLock<()> = RwLock::new(());

thread_local! {
    /// Whether this thread holds [`HOOK_CHURN`] exclusively (its own pin roots then take nothing).
    static QUIET_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Keeps other tests of this binary from attaching or detaching tracker programs while it is
/// held (they wait in [`PinRoot::new`]), and waits for those that are running to end.
///
/// Why: on Linux 6.18, adding or removing any probe on the `block_rq_complete` tracepoint (a
/// tracker's program, a trace event) makes the kernel skip the programs already attached for
/// the completions of that moment. The tracker's disk-statistics cross-check notices and the
/// agent falls back to a verify sync, which is right, but a test that asserts an incremental
/// path (a resumed cycle, no verify, exactly these chunks) cannot pass then. Measured: with
/// four trackers under random writes, 84 attach/detach pairs of a fifth made the kernel skip
/// 84 of 1,345,223 completions of one of them, that ftrace saw.
pub struct QuietHooks {
    _guard: RwLockWriteGuard<'static, ()>,
}

impl QuietHooks {
    /// Takes the exclusive hold; call it first, before the test's [`PinRoot`].
    ///
    /// Holding the lock is not enough on its own: the kernel detaches a link whose last bpffs
    /// pin was removed later, from a work queue, so the programs of a test that just ended can
    /// still be attached. This waits while the number of tracker links on the machine goes
    /// down (a link that stays, pinned by something else, is no churn), at most 10 s.
    pub fn take() -> Self {
        let guard = HOOK_CHURN.write().unwrap_or_else(|e| e.into_inner());
        QUIET_HERE.with(|here| here.set(true));
        let started = Instant::now();
        let (mut last, mut since) = (attached_tracker_links(), Instant::now());
        while last > 0
            && since.elapsed() < Duration::from_millis(300)
            && started.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(10));
            let now = attached_tracker_links();
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        Self { _guard: guard }
    }
}

/// What the agent says when the kernel did not show the tracker a completion (Linux 6.18 skips
/// tracing programs during RCU grace periods and probe changes; see ARCHITECTURE.md) and the
/// completion log could not give it back (it no longer reached back far enough). The agent
/// then verifies the replica, which is right, but a test of an incremental path (a resumed
/// cycle, no verify) did not test that path.
pub const KERNEL_SKIPPED: &str = "the completion log cannot fill the gap";

/// What the agent says when the kernel skipped the tracker but the completion log still held
/// the completions: the cycle goes on incrementally, with them added.
pub const KERNEL_SKIPPED_RECOVERED: &str = "the completion log still held every completion";

/// Runs `attempt` (given its number, from 1) until it returns `Some`, at most 3 times. An
/// attempt returns `None` only when the agent reported [`KERNEL_SKIPPED`], after checking
/// that the verify it fell back to ended right; three in a row fail the test.
pub fn retry_if_the_kernel_skipped<T>(name: &str, mut attempt: impl FnMut(u32) -> Option<T>) -> T {
    for number in 1..=3 {
        if let Some(value) = attempt(number) {
            return value;
        }
        eprintln!(
            "{name}: attempt {number}: the kernel did not run the tracker for a write, and the \
             agent verified instead of taking the path under test; trying again"
        );
    }
    panic!("{name}: the kernel skipped the tracker in 3 attempts in a row")
}

/// How many BPF links on this machine attach a tracker program (the kernel names them after
/// the first 15 bytes of `block_rq_complete…`).
pub fn attached_tracker_links() -> usize {
    let trackers: std::collections::HashSet<u32> = aya::programs::loaded_programs()
        .flatten()
        .filter(|program| program.name().starts_with(b"block_rq_compl"))
        .map(|program| program.id())
        .collect();
    aya::programs::loaded_links()
        .flatten()
        .filter(|link| trackers.contains(&link.program_id()))
        .count()
}

impl Drop for QuietHooks {
    fn drop(&mut self) {
        QUIET_HERE.with(|here| here.set(false));
    }
}

/// A private pin root in bpffs; removed (with everything below it) on drop, which detaches the
/// test's tracker programs.
pub struct PinRoot {
    /// Its path.
    pub path: PathBuf,
    /// Held until the pins are gone (see [`QuietHooks`]); `None` inside a quiet test.
    _churn: Option<RwLockReadGuard<'static, ()>>,
}

impl PinRoot {
    /// A fresh pin root under /sys/fs/bpf (mounting bpffs if needed). Waits while another test
    /// of this binary holds [`QuietHooks`].
    pub fn new() -> Self {
        let churn = (!QUIET_HERE.with(Cell::get))
            .then(|| HOOK_CHURN.read().unwrap_or_else(|e| e.into_inner()));
        blkmirror::tracker::environment::ensure_bpffs().expect("bpffs");
        let path = PathBuf::from("/sys/fs/bpf").join(unique("blkmirror-test"));
        Self {
            path,
            _churn: churn,
        }
    }
}

impl Default for PinRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        if let Ok(entries) = fs::read_dir(&self.path) {
            for dir in entries.flatten() {
                if let Ok(files) = fs::read_dir(dir.path()) {
                    for file in files.flatten() {
                        let _ = fs::remove_file(file.path());
                    }
                }
                let _ = fs::remove_dir(dir.path());
            }
        }
        let _ = fs::remove_dir(&self.path);
    }
}

/// The `blkmirror` binary next to the test executable (`cargo build -p blkmirror` builds it).
pub fn blkmirror_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = dir.join("blkmirror");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p blkmirror` (the README's test command does)",
        bin.display()
    );
    bin
}

/// A `blkmirror` command.
pub fn blkmirror() -> Command {
    Command::new(blkmirror_bin())
}

/// Arguments that point a `track`/`untrack` at the test's pins and state.
pub fn state_args(pins: &PinRoot, state_dir: &Path) -> Vec<String> {
    vec![
        "--pin-root".into(),
        pins.path.display().to_string(),
        "--state-dir".into(),
        state_dir.display().to_string(),
    ]
}

/// Runs `blkmirror track DEVICE --json --count N` to completion and returns its JSON lines.
pub fn track_once(
    pins: &PinRoot,
    state_dir: &Path,
    device: &Path,
    count: u64,
    extra: &[&str],
) -> (Output, Vec<serde_json::Value>) {
    let output = blkmirror()
        .arg("track")
        .arg(device)
        .args([
            "--json",
            "--interval",
            "50ms",
            "--count",
            &count.to_string(),
        ])
        .args(extra)
        .args(state_args(pins, state_dir))
        .output()
        .expect("running blkmirror");
    let lines = parse_lines(&String::from_utf8_lossy(&output.stdout));
    (output, lines)
}

/// Runs `blkmirror ARGS`, asserting success; its standard output.
pub fn run_ok(args: &[&str]) -> String {
    let output = blkmirror().args(args).output().expect("running blkmirror");
    assert!(
        output.status.success(),
        "blkmirror {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Parses JSON lines, panicking on anything else.
pub fn parse_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// A running `blkmirror track --json`, its stdout lines delivered through a channel. Killed on
/// drop.
pub struct TrackProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl TrackProcess {
    /// Starts tracking `device`, and waits until the start-up line appeared on stderr.
    pub fn start(pins: &PinRoot, state_dir: &Path, device: &Path, extra: &[&str]) -> Self {
        let mut child = blkmirror()
            .arg("track")
            .arg(device)
            .args(["--json"])
            .args(extra)
            .args(state_args(pins, state_dir))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning blkmirror");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err_text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let sink = err_text.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("tracking ") {
                    let _ = ready_tx.send(());
                }
                if let Ok(mut text) = sink.lock() {
                    text.push_str(&line);
                    text.push('\n');
                }
            }
        });
        let mut process = Self {
            child,
            lines: rx,
            stderr: err_text,
        };
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let status = process.child.try_wait();
            panic!(
                "blkmirror track did not start ({status:?}): {}",
                process.stderr_text()
            );
        }
        process
    }

    /// Collects JSON lines until `done` says so or `timeout` passes.
    pub fn collect_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    out.push(
                        serde_json::from_str(&line)
                            .unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}")),
                    );
                    if done(&out) {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        out
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Everything printed on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for TrackProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 4 KiB-aligned buffer of `len` bytes, without unsafe code: over-allocate and slice.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer.
    pub fn new(len: usize) -> Self {
        let storage = vec![0u8; len + 4096];
        let start = storage.as_ptr().align_offset(4096);
        Self {
            storage,
            start,
            len,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Opens a block device for O_DIRECT reads and writes.
pub fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {} with O_DIRECT: {e}", path.display()))
}

/// Writes `len` bytes of `fill` at `offset` with O_DIRECT (both 4 KiB aligned).
pub fn write_direct(path: &Path, offset: u64, len: usize, fill: u8) {
    let file = open_direct(path);
    let mut buf = AlignedBuf::new(len);
    buf.as_mut_slice().fill(fill);
    file.write_all_at(buf.as_slice(), offset)
        .unwrap_or_else(|e| panic!("writing {} at {offset}: {e}", path.display()));
}

/// Reads the whole of `path` (buffered) and returns it.
pub fn read_all(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Extents of kind `kind` from JSON lines, as (offset, length) in bytes.
pub fn extents_of(lines: &[serde_json::Value], kind: &str) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter(|l| l["kind"] == kind)
        .map(|l| {
            (
                l["offset"].as_u64().expect("offset"),
                l["length"].as_u64().expect("length"),
            )
        })
        .collect()
}

/// The CPU time (user and system) process `pid` has used so far, from `/proc/PID/stat`
/// (`None` once it is gone).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count fields after its end.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / per_second))
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is a child we spawned.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Removes a directory tree on drop (a test's scratch folder outside `Scratch`).
pub struct RemoveDir(pub std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
