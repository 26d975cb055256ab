//! Recovery at the DR site, as root: `blkmirror export` serves points of a real ext4 volume,
//! replicated by the real agent and receiver, over NBD to the real qemu tools (`qemu-img`,
//! `qemu-io`, `qemu-storage-daemon`), while replication goes on.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use blkmirror_tests::{
    LoopDevice, Mount, blkmirror,
    mirror::{
        ChildGuard, Site, UnmountOnDrop, digest, free_port, last_point, qemu_io, scrape_metrics,
        start_export, stop_export,
    },
    parse_lines, require_root, run_ok, sh,
};

const MIB: u64 = 1 << 20;

/// A running `blkmirror export`; killed on drop.
struct Export {
    _child: ChildGuard,
    uri: String,
    /// From the spawn to the URI on standard output (the export accepts clients then).
    ready: Duration,
    log: PathBuf,
}

impl Export {
    fn start(data: &str, volume: &str, at: &str, extra: &[&str], log: PathBuf) -> Self {
        let started = Instant::now();
        let mut child = ChildGuard(
            blkmirror()
                .args([
                    "export",
                    volume,
                    "--at",
                    at,
                    "--listen",
                    "127.0.0.1:0",
                    "--data-dir",
                    data,
                ])
                .args(extra)
                .stdout(Stdio::piped())
                .stderr(fs::File::create(&log).expect("export log"))
                .spawn()
                .expect("blkmirror export"),
        );
        let stdout = child.0.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let uri = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_default()
            .trim()
            .to_owned();
        assert!(
            uri.starts_with("nbd://"),
            "no URI from the export: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        Self {
            ready: started.elapsed(),
            _child: child,
            uri,
            log,
        }
    }

    fn port(&self) -> String {
        let rest = self.uri.trim_start_matches("nbd://127.0.0.1:");
        rest.split('/').next().expect("port").to_owned()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `qemu-img compare` of the export and a file: true when their contents are identical.
fn same_as(export: &Export, file: &Path) -> bool {
    let output = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &export.uri])
        .arg(file)
        .output()
        .expect("qemu-img");
    match output.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare failed: {}\nexport: {}",
            String::from_utf8_lossy(&output.stderr),
            export.log()
        ),
    }
}

/// The export as a regular file through FUSE (`qemu-storage-daemon` with the NBD client and a
/// FUSE export: the machine has no NBD kernel module); unmounted and stopped on drop.
struct FuseFile {
    daemon: ChildGuard,
    path: PathBuf,
}

impl FuseFile {
    fn mount(export: &Export, volume: &str, path: PathBuf) -> Self {
        fs::write(&path, b"").expect("FUSE mount point");
        let daemon = ChildGuard(
            Command::new("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(format!(
                    "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},\
                     export={volume},node-name=point,read-only=on",
                    export.port()
                ))
                .arg("--export")
                .arg(format!(
                    "type=fuse,id=file,node-name=point,mountpoint={},writable=off",
                    path.display()
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("qemu-storage-daemon"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while fs::metadata(&path).map(|m| m.len()).unwrap_or(0) == 0 {
            assert!(Instant::now() < deadline, "the FUSE export never appeared");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { daemon, path }
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        // SIGTERM lets the daemon unmount; a lazy unmount catches one that did not.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.daemon.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.daemon.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
        let _ = fs::remove_file(&self.path);
    }
}

/// A read-only loop device over a file; detached on drop.
struct ReadOnlyLoop(PathBuf);

impl ReadOnlyLoop {
    fn attach(file: &Path) -> Self {
        Self(PathBuf::from(
            sh(
                "losetup",
                &["-r", "-f", "--show", file.to_str().expect("utf-8")],
            )
            .trim(),
        ))
    }
}

impl Drop for ReadOnlyLoop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).output();
    }
}

fn body(round: u64, file: u64) -> Vec<u8> {
    (0..(8192 + file * 4096 + round * 777))
        .map(|i| (i * (round + 3) + file) as u8)
        .collect()
}

fn write_round(mount: &Path, round: u64) {
    let dir = mount.join(format!("round-{round}"));
    fs::create_dir_all(&dir).expect("dir");
    for file in 0..20 {
        fs::write(dir.join(format!("f{file}")), body(round, file)).expect("write");
    }
    if round > 0 {
        fs::remove_dir_all(mount.join(format!("round-{}", round - 1))).expect("rm");
    }
}

fn pins(data: &str, volume: &str) -> usize {
    fs::read_dir(Path::new(data).join(volume).join("pins"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

#[test]
fn an_exported_point_equals_its_restore_mounts_and_holds_still_while_replication_goes_on() {
    require_root();
    // Only the newest point is kept: an exported point survives only by its pin, and the
    // receiver keeps undo deltas only because of it.
    let site = Site::with_receiver_args(
        "fs",
        &[
            "--keep-all",
            "0s",
            "--keep-hourly",
            "0s",
            "--keep-daily",
            "0s",
        ],
    );
    let data = site.receiver.data_dir.to_str().expect("utf-8").to_owned();
    let dev = LoopDevice::new(&site.scratch.path, 128 * MIB);
    let mount = Mount::mkfs_and_mount(&dev.path, "ext4", &site.scratch.path);
    let agent = site.setup(&dev.path, "fs");
    write_round(&mount.target, 0);
    let a = last_point(&agent.once_ok(&[]))["seq"]
        .as_u64()
        .expect("seq");
    let restored_a = site.scratch.path.join("restored-a.img");
    let restore_started = Instant::now();
    run_ok(&[
        "restore",
        "fs",
        "--at",
        &format!("seq:{a}"),
        "--to",
        restored_a.to_str().expect("utf-8"),
        "--data-dir",
        &data,
    ]);
    let restore_took = restore_started.elapsed();

    // The export of point A is ready in seconds, and is byte for byte its restore.
    let export = Export::start(
        &data,
        "fs",
        &format!("seq:{a}"),
        &[],
        site.scratch.path.join("export-a.log"),
    );
    eprintln!(
        "export ready in {:?}; the full restore of the same point took {restore_took:?}",
        export.ready
    );
    assert!(
        export.ready < Duration::from_secs(10),
        "export took {:?}",
        export.ready
    );
    assert_eq!(pins(&data, "fs"), 1, "the export pins its point");
    assert!(
        same_as(&export, &restored_a),
        "the export differs from the restore"
    );

    // Two more cycles commit with the export open; each would prune point A without its pin.
    for round in 1..3 {
        write_round(&mount.target, round);
        agent.once_ok(&[]);
    }
    let listed = parse_lines(&run_ok(&["points", "fs", "--data-dir", &data, "--json"]));
    let seqs: Vec<u64> = listed
        .iter()
        .map(|p| p["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(
        seqs.len(),
        2,
        "the exported point and the newest: {listed:?}"
    );
    assert_eq!(seqs[0], a, "{listed:?}");
    assert!(
        same_as(&export, &restored_a),
        "the exported point changed while the receiver committed: {}",
        export.log()
    );

    // A mount through FUSE and a read-only loop device shows point A's files.
    let fuse = FuseFile::mount(&export, "fs", site.scratch.path.join("point-a.raw"));
    let loop_device = ReadOnlyLoop::attach(&fuse.path);
    let target = site.scratch.path.join("point-a-mnt");
    fs::create_dir_all(&target).expect("mount point");
    sh(
        "mount",
        &[
            "-o",
            "ro,noload",
            loop_device.0.to_str().expect("utf-8"),
            target.to_str().expect("utf-8"),
        ],
    );
    let mounted = UnmountOnDrop(target.clone());
    for file in [0, 7, 19] {
        assert_eq!(
            fs::read(target.join(format!("round-0/f{file}"))).expect("a file of point A"),
            body(0, file)
        );
    }
    assert!(
        !target.join("round-2").exists(),
        "point A has no later files"
    );
    drop(mounted);
    drop(loop_device);
    drop(fuse);

    // A killed export leaves its pin; the next commit removes it, and point A goes.
    let export_log = export.log();
    drop(export);
    assert_eq!(
        pins(&data, "fs"),
        1,
        "the killed export's pin is still there"
    );
    write_round(&mount.target, 3);
    let newest = last_point(&agent.once_ok(&[]))["seq"]
        .as_u64()
        .expect("seq");
    assert_eq!(
        pins(&data, "fs"),
        0,
        "a dead export's pin is removed at the next commit"
    );
    let listed = parse_lines(&run_ok(&["points", "fs", "--data-dir", &data, "--json"]));
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(
        export_log.contains("disconnected"),
        "the export logs its clients: {export_log}"
    );

    // A writable export of the newest point takes writes into its overlay; the replica and
    // the point are untouched, and a commit goes on beside it.
    let replica = site.receiver.image("fs");
    let replica_before = digest(&replica);
    let writable = Export::start(
        &data,
        "fs",
        "latest",
        &["--writable"],
        site.scratch.path.join("export-writable.log"),
    );
    let out = qemu_io(
        &writable.uri,
        &[
            "write -P 0x5a 1M 3M",
            "read -P 0x5a 1M 3M",
            "write -P 0x33 100k 8k",
            "flush",
        ],
    );
    assert!(out.contains("wrote"), "{out}");
    // A separate connection sees the writes (one overlay for every client).
    qemu_io(
        &writable.uri,
        &["read -P 0x5a 1M 3M", "read -P 0x33 100k 8k"],
    );
    assert_eq!(digest(&replica), replica_before, "the replica was written");
    write_round(&mount.target, 4);
    agent.once_ok(&[]);
    qemu_io(&writable.uri, &["read -P 0x5a 1M 3M"]);
    drop(writable);
    run_ok(&[
        "verify",
        "fs",
        "--at",
        &format!("seq:{newest}"),
        "--data-dir",
        &data,
    ]);

    // Exports are audited, and the chain verifies.
    let audit = fs::read_to_string(Path::new(&data).join("audit.log")).expect("audit log");
    assert_eq!(audit.matches("\"event\":\"export\"").count(), 2, "{audit}");
    run_ok(&["audit", "verify", "--data-dir", &data]);
}

/// Whether anything is mounted at `target`.
fn is_mounted(target: &Path) -> bool {
    let target = fs::canonicalize(target).unwrap_or_else(|_| target.to_owned());
    fs::read_to_string("/proc/self/mounts")
        .expect("mounts")
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(target.to_str().expect("utf-8")))
}

/// Loop devices over the FUSE file of an attachment made by process `pid`
/// (`blkmirror-attach-PID-*`): none may outlive it. (Other tests drill at the same time.)
fn attachment_loops(pid: u32) -> String {
    let ours = format!("blkmirror-attach-{pid}-");
    sh("losetup", &["-a"])
        .lines()
        .filter(|line| line.contains(&ours))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_drill_proves_a_point_recovers_beside_a_commit_and_mount_serves_its_files() {
    require_root();
    let metrics_port = free_port();
    let site = Site::with_receiver_args(
        "fs,raw",
        &["--metrics-listen", &format!("127.0.0.1:{metrics_port}")],
    );
    let data = site.receiver.data_dir.to_str().expect("utf-8").to_owned();
    let dev = LoopDevice::new(&site.scratch.path, 128 * MIB);
    let mount = Mount::mkfs_and_mount(&dev.path, "ext4", &site.scratch.path);
    let agent = site.setup(&dev.path, "fs");
    write_round(&mount.target, 0);
    let a = last_point(&agent.once_ok(&[]))["seq"]
        .as_u64()
        .expect("seq");
    let expected = site.scratch.path.join("expected-f3");
    fs::write(&expected, body(0, 3)).expect("expected file");
    let replica = site.receiver.image("fs");
    let replica_before = digest(&replica);

    // A drill whose health check takes a while, with a commit in the middle of it.
    write_round(&mount.target, 1);
    let check = format!(
        "sleep 3; test \"$BLKMIRROR_DRILL_POINT\" = {a} && cmp -s round-0/f3 {}",
        expected.display()
    );
    let drill = blkmirror()
        .args([
            "drill",
            "fs",
            "--at",
            &format!("seq:{a}"),
            "--check",
            &check,
            "--data-dir",
            &data,
            "--json",
        ])
        .stdout(fs::File::create(site.scratch.path.join("drill.out")).expect("out"))
        .stderr(fs::File::create(site.scratch.path.join("drill.err")).expect("err"))
        .spawn()
        .expect("drill");
    let mut drill = ChildGuard(drill);
    let drill_pid = drill.0.id();
    std::thread::sleep(Duration::from_millis(1500));
    let b = last_point(&agent.once_ok(&[]))["seq"]
        .as_u64()
        .expect("seq");
    let status = drill.0.wait().expect("drill");
    let stderr = fs::read_to_string(site.scratch.path.join("drill.err")).expect("drill.err");
    assert!(status.success(), "drill failed: {stderr}");
    let record: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(site.scratch.path.join("drill.out")).expect("drill.out"),
    )
    .expect("drill --json");
    assert_eq!(record["ok"], true, "{record}");
    assert_eq!(record["seq"].as_u64(), Some(a), "{record}");
    let steps: Vec<&str> = record["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["step"].as_str().expect("step"))
        .collect();
    assert_eq!(
        steps,
        [
            "attach",
            "filesystem",
            "journal replay",
            "fsck",
            "mount",
            "check"
        ],
        "{record}"
    );
    let recovery_ms = record["recovery_ms"].as_u64().expect("recovery_ms");
    assert!((3000..120_000).contains(&recovery_ms), "{record}");
    eprintln!("drill of point {a}: recovered in {recovery_ms} ms ({stderr})");
    assert!(b > a, "the commit went on during the drill");
    assert!(
        attachment_loops(drill_pid).is_empty(),
        "{}",
        attachment_loops(drill_pid)
    );

    // The drill is recorded beside the volume and in the audit log.
    let kept: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(Path::new(&data).join("fs/drill.json")).expect("drill.json"),
    )
    .expect("json");
    assert_eq!(kept["ok"], true);
    let success = kept["last_success_unix_ms"].as_u64().expect("success time");
    // The receiver reads it into its metrics (within its 5 s refresh).
    let wanted = format!(
        "blkmirror_drill_last_success_timestamp_seconds{{volume=\"fs\"}} {}",
        success as f64 / 1000.0
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = scrape_metrics(metrics_port);
        if metrics.contains(&wanted)
            && metrics.contains("blkmirror_drill_recovery_seconds{volume=\"fs\"}")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no {wanted:?} in:\n{metrics}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // A failing health check fails the drill (exit 8) and keeps the last success.
    let failed = blkmirror()
        .args([
            "drill",
            "fs",
            "--check",
            "echo unhealthy; exit 3",
            "--data-dir",
            &data,
        ])
        .output()
        .expect("drill");
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(8), "{stderr}");
    assert!(stderr.contains("unhealthy"), "{stderr}");
    let kept: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(Path::new(&data).join("fs/drill.json")).expect("drill.json"),
    )
    .expect("json");
    assert_eq!(kept["ok"], false);
    assert_eq!(kept["last_success_unix_ms"].as_u64(), Some(success));

    // A volume with no file system does not recover: the drill says so.
    let raw = LoopDevice::new(&site.scratch.path, 32 * MIB);
    blkmirror_tests::mirror::write_random(&raw.path, 0, 32 * MIB);
    site.setup(&raw.path, "raw").once_ok(&[]);
    let failed = blkmirror()
        .args(["drill", "raw", "--data-dir", &data])
        .output()
        .expect("drill");
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(8), "{stderr}");
    assert!(stderr.contains("no file system"), "{stderr}");

    // `mount` serves point A's files until SIGTERM, then leaves nothing behind.
    let target = site.scratch.path.join("point-a");
    fs::create_dir_all(&target).expect("mount point");
    let mut mounted = ChildGuard(
        blkmirror()
            .args(["mount", "fs"])
            .arg(&target)
            .args(["--at", &format!("seq:{a}"), "--data-dir", &data])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mount"),
    );
    let stdout = mounted.0.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("mount line");
    assert_eq!(line.trim(), target.to_str().expect("utf-8"));
    assert!(is_mounted(&target));
    assert_eq!(fs::read(target.join("round-0/f3")).expect("f3"), body(0, 3));
    assert!(
        !target.join("round-1").exists(),
        "point A has no later files"
    );
    assert!(
        fs::write(target.join("new-file"), b"x").is_err(),
        "the mount is read-only"
    );
    let mount_pid = mounted.0.id();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(mount_pid as i32, libc::SIGTERM) };
    let status = mounted.0.wait().expect("mount");
    assert!(status.success(), "mount exited with {status}");
    assert!(!is_mounted(&target), "still mounted after SIGTERM");
    assert!(
        attachment_loops(mount_pid).is_empty(),
        "{}",
        attachment_loops(mount_pid)
    );

    // Nothing of this wrote the replica: it is still the newest point (b), as replicated.
    assert_ne!(
        digest(&replica),
        replica_before,
        "cycle b changed the replica"
    );
    run_ok(&["verify", "fs", "--at", "all", "--data-dir", &data]);
    // `drill --due` runs what receiver.toml schedules, once per interval.
    let config = site.scratch.path.join("receiver.toml");
    fs::write(
        &config,
        format!(
            "identity = \"{}\"\ndata_dir = \"{data}\"\n[[agent]]\nfingerprint = \"{}\"\n\
             volumes = [\"fs\", \"raw\"]\n[[drill]]\nvolume = \"fs\"\nevery = \"1h\"\n\
             check = \"test -d round-1\"\n",
            site.scratch.path.join("receiver-id").display(),
            site.agent.fingerprint
        ),
    )
    .expect("receiver.toml");
    let config_arg = config.to_str().expect("utf-8");
    // fs was drilled seconds ago: nothing is due. Without its record it is, once.
    for (expect, forget) in [
        ("0 due and run, 0 failed", true),
        ("1 due and run, 0 failed", false),
        ("0 due and run, 0 failed", false),
    ] {
        let due = blkmirror()
            .args(["drill", "--due", "--config", config_arg])
            .output()
            .expect("drill --due");
        let stderr = String::from_utf8_lossy(&due.stderr);
        assert!(due.status.success(), "{stderr}");
        assert!(stderr.contains(expect), "no {expect:?} in: {stderr}");
        if forget {
            fs::remove_file(Path::new(&data).join("fs/drill.json")).expect("forget the drill");
        }
    }
    let audit = fs::read_to_string(Path::new(&data).join("audit.log")).expect("audit log");
    assert_eq!(audit.matches("\"event\":\"drill\"").count(), 4, "{audit}");
    assert_eq!(audit.matches("\"event\":\"mount\"").count(), 1, "{audit}");
    run_ok(&["audit", "verify", "--data-dir", &data]);
}

#[test]
fn after_a_failover_the_old_source_is_refused_until_reprotected() {
    require_root();
    let site = Site::new("fs");
    let data = site.receiver.data_dir.to_str().expect("utf-8").to_owned();
    let dev = LoopDevice::new(&site.scratch.path, 128 * MIB);
    let mount = Mount::mkfs_and_mount(&dev.path, "ext4", &site.scratch.path);
    let agent = site.setup(&dev.path, "fs");

    // 1. Replicate A -> B under a writer.
    let mut workload = blkmirror_tests::mirror::Workload::start(&mount.target);
    write_round(&mount.target, 0);
    agent.once_ok(&[]);
    let a = last_point(&agent.once_ok(&[]))["seq"]
        .as_u64()
        .expect("seq");
    // 2. Disaster: no agent runs, and A keeps writing for a while.
    write_round(&mount.target, 1);
    std::thread::sleep(Duration::from_millis(500));

    // 3. Failover at B to a file, which is mounted and written (the application runs there).
    let promoted = site.scratch.path.join("promoted.img");
    let out = blkmirror()
        .args(["failover", "fs", "--at", &format!("seq:{a}"), "--to"])
        .arg(&promoted)
        .args(["--data-dir", &data])
        .output()
        .expect("failover");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failover failed: {stderr}");
    assert!(stderr.contains("term 2"), "{stderr}");
    let b = LoopDevice::attach(&promoted);
    let b_mount = site.scratch.path.join("b");
    fs::create_dir_all(&b_mount).expect("mount point");
    sh("mount", &[b.as_str(), b_mount.to_str().expect("utf-8")]);
    let unmount_b = UnmountOnDrop(b_mount.clone());
    assert_eq!(
        fs::read(b_mount.join("round-0/f5")).expect("f5"),
        body(0, 5)
    );
    fs::write(b_mount.join("written-at-b"), b"promoted").expect("write at B");
    drop(unmount_b);
    let replica_seq = site.receiver.meta("fs")["committed_seq"].clone();

    // 4. A comes back: its agent is refused (exit 6) with what happened and what to run.
    let (output, _) = agent.once(&[], Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(6), "{stderr}");
    for expected in [
        "failed over",
        "term 2",
        &format!("point {a}"),
        "reprotect fs",
    ] {
        assert!(stderr.contains(expected), "no {expected:?} in: {stderr}");
    }
    assert_eq!(
        site.receiver.meta("fs")["committed_seq"],
        replica_seq,
        "the refused source changed the replica"
    );
    let points = run_ok(&["points", "fs", "--data-dir", &data]);
    assert!(points.contains("FAILED OVER"), "{points}");

    // A failover of a failover needs --again, and raises the term.
    let out = blkmirror()
        .args(["failover", "fs", "--to"])
        .arg(site.scratch.path.join("second.img"))
        .args(["--data-dir", &data])
        .output()
        .expect("failover");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--again"));
    let out = blkmirror()
        .args(["failover", "fs", "--again", "--to"])
        .arg(site.scratch.path.join("second.img"))
        .args(["--data-dir", &data])
        .output()
        .expect("failover");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("term 3"));

    // Reprotect: the source is primary again (term 4) and its next cycle commits.
    run_ok(&["reprotect", "fs", "--data-dir", &data]);
    workload.stop();
    let lines = agent.once_ok(&[]);
    assert!(last_point(&lines)["seq"].as_u64().expect("seq") > a);

    // Terms on the agent's side: it has now seen term 4. A receiver whose authority record
    // went back (a data directory restored from an old backup) is not written.
    let authority = Path::new(&data).join("fs/authority.json");
    let current = fs::read_to_string(&authority).expect("authority.json");
    assert!(current.contains("\"term\": 4"), "{current}");
    fs::write(
        &authority,
        r#"{"format":1,"term":1,"primary":"source","history":[]}"#,
    )
    .expect("a stale authority");
    let (output, _) = agent.once(&[], Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("term 1, but it has been at term 4"),
        "{stderr}"
    );
    fs::write(&authority, current).expect("authority back");
    agent.once_ok(&[]);

    let audit = fs::read_to_string(Path::new(&data).join("audit.log")).expect("audit log");
    assert_eq!(
        audit.matches("\"event\":\"failover\"").count(),
        2,
        "{audit}"
    );
    assert_eq!(
        audit.matches("\"event\":\"reprotect\"").count(),
        1,
        "{audit}"
    );
    run_ok(&["audit", "verify", "--data-dir", &data]);
}

/// The boot kit `cargo xtask boot-kit` makes (a Debian kernel, an initramfs that mounts an
/// ext4 root from the first virtio disk, a static busybox); `cargo xtask test` passes its
/// directory in `BLKMIRROR_BOOT_KIT`.
fn boot_kit() -> PathBuf {
    let dir = std::env::var_os("BLKMIRROR_BOOT_KIT").map_or_else(
        || PathBuf::from("/var/cache/blkmirror-vm/boot-kit"),
        PathBuf::from,
    );
    assert!(
        dir.join("vmlinuz").is_file() && dir.join("initrd.cpio").is_file(),
        "no boot kit in {}: run `sudo cargo xtask boot-kit` first (`cargo xtask test` does)",
        dir.display()
    );
    dir
}

#[test]
fn a_boot_drill_boots_the_point_under_qemu_and_catches_a_corrupt_application() {
    require_root();
    let kit = boot_kit();
    let site = Site::new("os");
    let data = site.receiver.data_dir.to_str().expect("utf-8").to_owned();
    let dev = LoopDevice::new(&site.scratch.path, 128 * MIB);
    let mount = Mount::mkfs_and_mount(&dev.path, "ext4", &site.scratch.path);
    // A tiny operating system on the protected disk: busybox and an init that checks the
    // application's data and says so on the console.
    let root = &mount.target;
    for dir in ["bin", "sbin", "proc", "sys", "dev", "app"] {
        fs::create_dir_all(root.join(dir)).expect("dir");
    }
    fs::copy(kit.join("busybox"), root.join("bin/busybox")).expect("busybox");
    fs::write(
        root.join("sbin/init"),
        "#!/bin/busybox sh\n\
         cd /app\n\
         if /bin/busybox sha256sum -c data.sha256 >/dev/null 2>&1; then\n\
         \x20 echo \"APP-HEALTHY generation $(/bin/busybox cat generation)\"\n\
         else\n\
         \x20 echo APP-CORRUPT\n\
         fi\n\
         /bin/busybox poweroff -f\n",
    )
    .expect("init");
    sh(
        "chmod",
        &["755", root.join("sbin/init").to_str().expect("utf-8")],
    );
    let app = root.join("app");
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    fs::write(app.join("data"), &body).expect("data");
    let out = std::process::Command::new("sha256sum")
        .arg("data")
        .current_dir(&app)
        .output()
        .expect("sha256sum");
    fs::write(app.join("data.sha256"), &out.stdout).expect("sum");
    fs::write(app.join("generation"), "1").expect("generation");
    sh("sync", &[]);
    let agent = site.setup(&dev.path, "os");
    let good = last_point(&agent.once_ok(&[]))["seq"]
        .as_u64()
        .expect("seq");
    // The application corrupts its data; the next point holds that.
    fs::write(app.join("data"), b"garbage").expect("corrupt");
    fs::write(app.join("generation"), "2").expect("generation");
    sh("sync", &[]);
    let bad = last_point(&agent.once_ok(&[]))["seq"]
        .as_u64()
        .expect("seq");
    let replica = site.receiver.image("os");
    let replica_before = digest(&replica);

    let drill = |seq: u64| {
        blkmirror()
            .args(["drill", "os", "--at", &format!("seq:{seq}"), "--boot"])
            .arg(kit.join("vmlinuz"))
            .arg("--boot-initrd")
            .arg(kit.join("initrd.cpio"))
            // This machine is itself a VM whose nested KVM cannot run the guest.
            .args(["--boot-accel", "tcg", "--boot-healthy", "APP-HEALTHY"])
            .args(["--boot-timeout", "3m", "--data-dir", &data, "--json"])
            .output()
            .expect("drill")
    };
    let out = drill(good);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the boot drill failed: {stderr}");
    assert!(stderr.contains("drill: boot: ok"), "{stderr}");
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).expect("record");
    let steps: Vec<&str> = record["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["step"].as_str().expect("name"))
        .collect();
    assert_eq!(
        steps,
        [
            "attach",
            "filesystem",
            "journal replay",
            "fsck",
            "mount",
            "boot"
        ],
        "{record}"
    );
    eprintln!("boot drill: {stderr}");

    // The corrupt point boots, and the drill fails on its console's word.
    let out = drill(bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{stderr}");
    assert!(stderr.contains("APP-CORRUPT"), "{stderr}");
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(Path::new(&data).join("os/drill.json")).expect("record"))
            .expect("record");
    assert_eq!(record["ok"], false);
    assert!(
        record["last_success_unix_ms"].as_u64().is_some(),
        "{record}"
    );

    // The guest wrote into the overlay only.
    assert_eq!(
        digest(&replica),
        replica_before,
        "a boot drill wrote the replica"
    );
    drop(mount);
}

#[test]
fn the_receiver_daemon_serves_the_exports_of_its_configuration() {
    require_root();
    use blkmirror_tests::mirror::{AgentSetup, Id, Receiver, write_random};
    let scratch = blkmirror_tests::Scratch::new();
    let agent_id = Id::new(&scratch.path, "agent-id");
    let receiver_id = Id::new(&scratch.path, "receiver-id");
    let data = scratch.path.join("data");
    let socket = scratch.path.join("cfg.sock");
    let config = scratch.path.join("receiver.toml");
    fs::write(
        &config,
        format!(
            "identity = \"{}\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
             [[agent]]\nfingerprint = \"{}\"\nvolumes = [\"cfg\"]\n\
             [[export]]\nvolume = \"cfg\"\nlisten = \"unix:{}\"\n",
            receiver_id.dir.display(),
            data.display(),
            agent_id.fingerprint,
            socket.display()
        ),
    )
    .expect("config");
    let receiver = Receiver::start_config(&config, &data, &receiver_id);
    // No volume yet: the export waits for a reload.
    assert!(!socket.exists());
    assert!(
        receiver.log().contains("export of volume cfg not started"),
        "{}",
        receiver.log()
    );
    let dev = LoopDevice::new(&scratch.path, 64 * MIB);
    write_random(&dev.path, 0, 64 * MIB);
    let pins = blkmirror_tests::PinRoot::new();
    let agent = AgentSetup {
        device: &dev.path,
        volume: "cfg",
        receiver: &receiver,
        id: &agent_id,
        pins: &pins,
        state_dir: &scratch.path.join("state"),
        receiver_fingerprint: None,
        via: None,
    };
    let first = last_point(&agent.once_ok(&[]))["seq"]
        .as_u64()
        .expect("seq");
    blkmirror_tests::signal(receiver.pid(), libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no export: {}", receiver.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let uri = format!("nbd+unix:///cfg?socket={}", socket.display());
    let restored = scratch.path.join("first.img");
    run_ok(&[
        "restore",
        "cfg",
        "--at",
        &format!("seq:{first}"),
        "--to",
        restored.to_str().expect("utf-8"),
        "--data-dir",
        data.to_str().expect("utf-8"),
    ]);
    let compare = |file: &Path| {
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &uri])
            .arg(file)
            .output()
            .expect("qemu-img")
    };
    let out = compare(&restored);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Replication goes on; the export keeps serving the point it started with, pinned.
    write_random(&dev.path, 0, 4 * MIB);
    let second = last_point(&agent.once_ok(&[]))["seq"]
        .as_u64()
        .expect("seq");
    assert!(second > first);
    let out = compare(&restored);
    assert!(out.status.success(), "the export moved with the commit");
    assert_eq!(pins_of(&data, "cfg"), 1, "the exported point is pinned");
    let audit = fs::read_to_string(data.join("audit.log")).expect("audit log");
    assert!(audit.contains("\"event\":\"export\""), "{audit}");

    // A failover into an export; once its own server stops, the daemon serves the promoted
    // export from its configuration, with the writes made on it, and holds it.
    let data_arg = data.to_str().expect("utf-8");
    let failover_listen = format!("unix:{}", scratch.path.join("failover.sock").display());
    let failover_log = scratch.path.join("failover.log");
    let (failover, uri) = start_export(
        &[
            "failover",
            "cfg",
            "--to",
            "export",
            "--listen",
            &failover_listen,
            "--data-dir",
            data_arg,
        ],
        &failover_log,
    );
    qemu_io(&uri, &["write -P 0x5a 0 64k", "flush"]);
    stop_export(failover, &failover_log);
    let promoted_socket = scratch.path.join("promoted.sock");
    let mut text = fs::read_to_string(&config).expect("config");
    text.push_str(&format!(
        "[[export]]\nvolume = \"cfg\"\nlisten = \"unix:{}\"\npromoted = true\n",
        promoted_socket.display()
    ));
    fs::write(&config, text).expect("config");
    blkmirror_tests::signal(receiver.pid(), libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !promoted_socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no promoted export: {}",
            receiver.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let promoted_uri = format!("nbd+unix:///cfg?socket={}", promoted_socket.display());
    qemu_io(
        &promoted_uri,
        &["read -P 0x5a 0 64k", "write -P 0x6b 64k 64k", "flush"],
    );
    let busy = blkmirror()
        .args([
            "export",
            "cfg",
            "--promoted",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .expect("export --promoted");
    let busy_err = String::from_utf8_lossy(&busy.stderr);
    assert_eq!(busy.status.code(), Some(2), "{busy_err}");
    assert!(busy_err.contains("in use"), "{busy_err}");
    // Once the receiver stops, the promoted export is free again, with both writes.
    drop(receiver);
    let again_listen = format!("unix:{}", scratch.path.join("again.sock").display());
    let again_log = scratch.path.join("again.log");
    let (again, uri) = start_export(
        &[
            "export",
            "cfg",
            "--promoted",
            "--listen",
            &again_listen,
            "--data-dir",
            data_arg,
        ],
        &again_log,
    );
    qemu_io(&uri, &["read -P 0x5a 0 64k", "read -P 0x6b 64k 64k"]);
    stop_export(again, &again_log);
}

fn pins_of(data: &Path, volume: &str) -> usize {
    fs::read_dir(data.join(volume).join("pins"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}
