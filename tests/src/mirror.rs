//! Helpers for the replication tests: identities, a receiver process on 127.0.0.1, agent runs,
//! and a file-writing workload. Every process is killed on drop.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use std::process::Command;

use crate::{PinRoot, Scratch, blkmirror, parse_lines, sh, signal};

/// An identity made by `blkmirror keygen`.
pub struct Id {
    /// Its directory.
    pub dir: PathBuf,
    /// Its fingerprint.
    pub fingerprint: String,
}

impl Id {
    /// Runs `blkmirror keygen --out DIR/NAME`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let out = dir.join(name);
        let output = blkmirror()
            .args(["keygen", "--out"])
            .arg(&out)
            .output()
            .expect("running keygen");
        assert!(
            output.status.success(),
            "keygen failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let fingerprint = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        assert_eq!(fingerprint.len(), 64, "fingerprint {fingerprint:?}");
        Self {
            dir: out,
            fingerprint,
        }
    }
}

/// A running `blkmirror receiver`; killed (SIGKILL) on drop.
pub struct Receiver {
    child: Child,
    /// The address it listens on.
    pub addr: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its identity.
    pub fingerprint: String,
    log: Arc<Mutex<String>>,
    args: Vec<String>,
}

impl Receiver {
    /// Starts a receiver on 127.0.0.1 (`port` 0: any free port) with `allow` grants.
    pub fn start(data_dir: &Path, id: &Id, allow: &[String], port: u16) -> Self {
        Self::start_with(data_dir, id, allow, port, &[])
    }

    /// Like [`Self::start`], with extra arguments (retention, window).
    pub fn start_with(
        data_dir: &Path,
        id: &Id,
        allow: &[String],
        port: u16,
        extra: &[&str],
    ) -> Self {
        let mut args = vec![
            "receiver".to_owned(),
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--data-dir".to_owned(),
            data_dir.display().to_string(),
            "--identity".to_owned(),
            id.dir.display().to_string(),
        ];
        for grant in allow {
            args.push("--allow".to_owned());
            args.push(grant.clone());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Self::spawn(args, data_dir, &id.fingerprint)
    }

    /// Starts `blkmirror receiver --config FILE` (whose `data_dir` must be `data_dir` and whose
    /// `listen` should be `127.0.0.1:0`).
    pub fn start_config(config: &Path, data_dir: &Path, id: &Id) -> Self {
        let args = vec![
            "receiver".to_owned(),
            "--config".to_owned(),
            config.display().to_string(),
        ];
        Self::spawn(args, data_dir, &id.fingerprint)
    }

    /// Like [`Self::start_config`], with extra environment variables (test hooks).
    pub fn start_config_env(config: &Path, data_dir: &Path, id: &Id, env: &[(&str, &str)]) -> Self {
        let args = vec![
            "receiver".to_owned(),
            "--config".to_owned(),
            config.display().to_string(),
        ];
        let mut program = blkmirror();
        program.envs(env.iter().copied());
        Self::spawn_program(program, args, data_dir, &id.fingerprint)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Like [`Self::start`], run under `wrapper` (e.g. `strace -f -o FILE`).
    pub fn start_wrapped(wrapper: &[&str], data_dir: &Path, id: &Id, allow: &[String]) -> Self {
        let mut args: Vec<String> = wrapper.iter().map(|s| (*s).to_owned()).collect();
        args.push(crate::blkmirror_bin().display().to_string());
        args.extend(
            [
                "receiver",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data_dir.to_str().expect("utf-8"),
                "--identity",
                id.dir.to_str().expect("utf-8"),
            ]
            .map(str::to_owned),
        );
        for grant in allow {
            args.push("--allow".to_owned());
            args.push(grant.clone());
        }
        let program = args.remove(0);
        Self::spawn_program(Command::new(program), args, data_dir, &id.fingerprint)
    }

    fn spawn(args: Vec<String>, data_dir: &Path, fingerprint: &str) -> Self {
        Self::spawn_program(blkmirror(), args, data_dir, fingerprint)
    }

    fn spawn_program(
        mut program: Command,
        args: Vec<String>,
        data_dir: &Path,
        fingerprint: &str,
    ) -> Self {
        let mut child = program
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the receiver");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split(' ').next().unwrap_or_default().to_owned();
                    let _ = tx.send(addr);
                }
                if let Ok(mut text) = sink.lock() {
                    text.push_str(&line);
                    text.push('\n');
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "the receiver did not start: {}",
                    log.lock().map(|s| s.clone()).unwrap_or_default()
                )
            });
        Self {
            child,
            addr,
            data_dir: data_dir.to_owned(),
            fingerprint: fingerprint.to_owned(),
            log,
            args,
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    }

    /// SIGKILLs it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again with the same arguments (and the same port).
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port();
        let mut args = self.args.clone();
        if let Some(listen) = args.iter().position(|a| a == "--listen") {
            args[listen + 1] = format!("127.0.0.1:{port}");
        }
        let log = self.log.lock().map(|s| s.clone()).unwrap_or_default();
        let mut fresh = Self::spawn(args, &self.data_dir.clone(), &self.fingerprint.clone());
        if let Ok(mut text) = fresh.log.lock() {
            text.insert_str(0, &log);
        }
        std::mem::swap(self, &mut fresh);
        // `fresh` now holds the dead process; its drop is harmless.
    }

    /// Everything it logged.
    pub fn log(&self) -> String {
        self.log.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The image of `volume`.
    pub fn image(&self, volume: &str) -> PathBuf {
        self.data_dir.join(volume).join("image.raw")
    }

    /// The metadata of `volume`.
    pub fn meta(&self, volume: &str) -> serde_json::Value {
        let text = fs::read_to_string(self.data_dir.join(volume).join("volume.json"))
            .expect("volume.json");
        serde_json::from_str(&text).expect("volume.json is JSON")
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How an agent run is set up.
pub struct AgentSetup<'a> {
    /// The device.
    pub device: &'a Path,
    /// The volume name.
    pub volume: &'a str,
    /// The receiver.
    pub receiver: &'a Receiver,
    /// The agent's identity.
    pub id: &'a Id,
    /// Pins.
    pub pins: &'a PinRoot,
    /// State directory.
    pub state_dir: &'a Path,
    /// Pin this receiver fingerprint instead of the receiver's own.
    pub receiver_fingerprint: Option<&'a str>,
    /// Send to this address (a link emulator in front of the receiver) instead of the
    /// receiver's own.
    pub via: Option<String>,
}

impl AgentSetup<'_> {
    /// The arguments of `blkmirror agent` for this setup, plus `extra`.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "agent",
            "--device",
            self.device.to_str().expect("utf-8"),
            "--volume",
            self.volume,
            "--receiver",
            self.via.as_deref().unwrap_or(&self.receiver.addr),
            "--receiver-fingerprint",
            self.receiver_fingerprint
                .unwrap_or(&self.receiver.fingerprint),
            "--identity",
            self.id.dir.to_str().expect("utf-8"),
            "--json",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(crate::state_args(self.pins, self.state_dir));
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }

    /// Runs `agent --once` to completion (killed after `timeout`); returns the output and its
    /// JSON lines.
    pub fn once(&self, extra: &[&str], timeout: Duration) -> (Output, Vec<serde_json::Value>) {
        self.once_env(extra, &[], timeout)
    }

    /// Like [`Self::once`], with extra environment variables.
    pub fn once_env(
        &self,
        extra: &[&str],
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> (Output, Vec<serde_json::Value>) {
        let mut args = self.args(extra);
        args.push("--once".to_owned());
        let child = blkmirror()
            .args(&args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the agent");
        let pid = child.id();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let watchdog = std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if flag.load(Ordering::SeqCst) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            crate::signal(pid, libc::SIGKILL);
            true
        });
        let output = child.wait_with_output().expect("agent output");
        done.store(true, Ordering::SeqCst);
        let killed = watchdog.join().unwrap_or(false);
        assert!(
            !killed,
            "agent --once did not finish within {timeout:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let lines = parse_lines(&String::from_utf8_lossy(&output.stdout));
        (output, lines)
    }

    /// Like [`Self::once`], and asserts success; returns the JSON lines.
    pub fn once_ok(&self, extra: &[&str]) -> Vec<serde_json::Value> {
        let (output, lines) = self.once(extra, Duration::from_secs(180));
        assert!(
            output.status.success(),
            "agent --once failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        lines
    }

    /// Starts a long-running agent (no `--once`).
    pub fn spawn(&self, extra: &[&str]) -> Child {
        blkmirror()
            .args(self.args(extra))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the agent")
    }
}

/// The committed-point lines of an agent's output.
pub fn committed(lines: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    lines.iter().filter(|l| l["event"] == "committed").collect()
}

/// The last committed line of a complete point.
pub fn last_point(lines: &[serde_json::Value]) -> &serde_json::Value {
    committed(lines)
        .into_iter()
        .rev()
        .find(|l| l["complete"] == true)
        .unwrap_or_else(|| panic!("no complete point in {lines:?}"))
}

/// Asserts two files (or devices) have equal content.
pub fn assert_same(a: &Path, b: &Path) {
    let output = std::process::Command::new("cmp")
        .arg(a)
        .arg(b)
        .output()
        .expect("running cmp");
    assert!(
        output.status.success(),
        "{} and {} differ: {}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&output.stdout)
    );
}

/// A BLAKE3 digest of a whole file or device.
pub fn digest(path: &Path) -> String {
    let data = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    blake3_hex(&data)
}

fn blake3_hex(data: &[u8]) -> String {
    blkmirror_protocol::wire::chunk_hash(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A thread that keeps creating, rewriting, fsync-ing and deleting files in a directory until
/// stopped.
pub struct Workload {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Workload {
    /// Starts writing in `dir`.
    pub fn start(dir: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let dir = dir.join("workload");
        fs::create_dir_all(&dir).expect("workload dir");
        let thread = std::thread::spawn(move || {
            let mut round = 0u64;
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            while !flag.load(Ordering::SeqCst) {
                let name = dir.join(format!("f{}", round % 40));
                let len = 4096 + (seed % (256 * 1024)) as usize;
                let data: Vec<u8> = (0..len)
                    .map(|i| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(i as u64);
                        (seed >> 56) as u8
                    })
                    .collect();
                if let Ok(mut file) = fs::File::create(&name) {
                    let _ = file.write_all(&data);
                    if round.is_multiple_of(3) {
                        let _ = file.sync_all();
                    }
                }
                if round.is_multiple_of(7) {
                    let _ = fs::remove_file(dir.join(format!("f{}", (round + 13) % 40)));
                }
                round += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            round
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops it; returns how many files it wrote.
    pub fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .map(|t| t.join().expect("workload thread"))
            .unwrap_or(0)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes `len` bytes of random data at `offset` of `device` (O_DIRECT).
pub fn write_random(device: &Path, offset: u64, len: u64) {
    let status = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", device.display()),
            "bs=64K",
            &format!("seek={}", offset / 65536),
            &format!("count={}", len / 65536),
            "oflag=direct",
            "conv=notrunc",
            "status=none",
        ])
        .args(["iflag=fullblock"])
        .status()
        .expect("dd");
    assert!(status.success(), "dd failed");
}

/// A child process that is continued and killed on drop unless it has exited: a stopped
/// agent must never outlive its test (it holds the loop device).
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            signal(self.0.id(), libc::SIGCONT);
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The two identities and a receiver granting `agent` the `volumes`.
pub struct Site {
    /// Scratch directory.
    pub scratch: Scratch,
    /// Pins.
    pub pins: PinRoot,
    /// The agent's identity.
    pub agent: Id,
    /// The receiver.
    pub receiver: Receiver,
}

impl Site {
    pub fn new(volumes: &str) -> Self {
        Self::with_receiver_args(volumes, &[])
    }

    /// Like [`Self::new`], with extra receiver arguments.
    pub fn with_receiver_args(volumes: &str, extra: &[&str]) -> Self {
        let scratch = Scratch::new();
        let agent = Id::new(&scratch.path, "agent-id");
        let receiver_id = Id::new(&scratch.path, "receiver-id");
        let receiver = Receiver::start_with(
            &scratch.path.join("data"),
            &receiver_id,
            &[format!("{}={volumes}", agent.fingerprint)],
            0,
            extra,
        );
        Self {
            pins: PinRoot::new(),
            scratch,
            agent,
            receiver,
        }
    }

    pub fn setup<'a>(&'a self, device: &'a Path, volume: &'a str) -> AgentSetup<'a> {
        AgentSetup {
            device,
            volume,
            receiver: &self.receiver,
            id: &self.agent,
            pins: &self.pins,
            state_dir: self.scratch.path.join("state").leak(),
            receiver_fingerprint: None,
            via: None,
        }
    }
}

/// Unmounts a mount on drop (and so detaches its automatic loop device), then removes its
/// directory if it is empty: every test's mount guard.
pub struct UnmountOnDrop(pub std::path::PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Checks a copy of the image with the file system's own checker (read-only).
pub fn fsck_clean(image: &Path, fstype: &str, scratch: &Path, label: &str) {
    let copy = scratch.join(format!("copy-{label}.img"));
    sh(
        "cp",
        &[
            "--sparse=always",
            image.to_str().expect("utf-8"),
            copy.to_str().expect("utf-8"),
        ],
    );
    if fstype == "xfs" {
        // A frozen XFS keeps its log dirty (crash-consistent: the log is replayed at mount), and
        // `xfs_repair -n` refuses a dirty log. Replay it the way a restore would: mount the
        // copy once (its own loop device, auto-detached at unmount).
        let target = scratch.join(format!("replay-{label}"));
        std::fs::create_dir_all(&target).expect("mount point");
        let replay = UnmountOnDrop(target.clone());
        sh(
            "mount",
            &[
                "-o",
                "loop,nouuid",
                copy.to_str().expect("utf-8"),
                target.to_str().expect("utf-8"),
            ],
        );
        drop(replay);
    }
    let output = match fstype {
        "ext4" => Command::new("e2fsck").arg("-fn").arg(&copy).output(),
        "xfs" => Command::new("xfs_repair")
            .args(["-n", "-f"])
            .arg(&copy)
            .output(),
        other => panic!("no checker for {other}"),
    }
    .expect("running the checker");
    assert!(
        output.status.success(),
        "{fstype} check of the point {label} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_file(&copy);
}

/// Thaws the file system at its path on drop, whatever happened: a test must never leave a
/// frozen file system behind.
pub struct ThawOnDrop<'a>(pub &'a Path);

impl Drop for ThawOnDrop<'_> {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Whether the file system at `mount` is frozen, asked without blocking: FIFREEZE on a frozen
/// file system fails with EBUSY; on a thawed one it succeeds and is undone at once.
pub fn is_frozen(mount: &Path) -> bool {
    let output = Command::new("fsfreeze")
        .arg("-f")
        .arg(mount)
        .output()
        .expect("fsfreeze");
    if output.status.success() {
        let _ = Command::new("fsfreeze").arg("-u").arg(mount).status();
        false
    } else {
        true
    }
}

/// Whether a `blkmirror thaw-guard` for `mount` is running.
pub fn guard_running(mount: &Path) -> bool {
    let wanted = format!("thaw-guard\0{}", mount.display());
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| {
            std::fs::read(entry.path().join("cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&wanted))
        })
}

/// `GET /metrics` from a metrics endpoint on 127.0.0.1; asserts a 200 answer.
pub fn scrape_metrics(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response");
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    text
}

/// A TCP port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts `blkmirror ARGS` (an export that prints its NBD URI first) and returns it with the URI.
pub fn start_export(args: &[&str], log: &Path) -> (ChildGuard, String) {
    let mut child = ChildGuard(
        blkmirror()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(fs::File::create(log).expect("log"))
            .spawn()
            .expect("export"),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("the URI line");
    assert!(
        line.starts_with("nbd"),
        "no NBD URI: {line:?}; {}",
        fs::read_to_string(log).unwrap_or_default()
    );
    (child, line.trim().to_owned())
}

/// Stops an export with SIGTERM and checks that it exited cleanly; returns its log.
pub fn stop_export(mut export: ChildGuard, log: &Path) -> String {
    crate::signal(export.0.id(), libc::SIGTERM);
    let status = export.0.wait().expect("export");
    let text = fs::read_to_string(log).unwrap_or_default();
    assert!(status.success(), "the export exited with {status}: {text}");
    text
}

/// `qemu-io` commands against an NBD URI (the real NBD client); panics when one fails.
pub fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut command = std::process::Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    let out = command.arg(uri).output().expect("qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-io exits 0 after a failed pattern check: its output says so.
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "qemu-io {commands:?}: {text}"
    );
    text
}
