//! Points in time on the receiver, as root: real ext4 on a loop device replicated by the real
//! agent and receiver; `points`, `restore`, `verify` and `audit verify` run as an operator
//! would, beside the live receiver.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use blkmirror_tests::{
    LoopDevice, Mount, PinRoot, Scratch, blkmirror,
    ceph::{CephCluster, SECRET_KEY},
    mirror::{
        AgentSetup, ChildGuard, Id, Receiver, Site, digest, guard_running, last_point, qemu_io,
        start_export, write_random,
    },
    parse_lines, require_root, run_ok, sh,
};

const MIB: u64 = 1 << 20;

fn run(args: &[&str]) -> Output {
    blkmirror().args(args).output().expect("running blkmirror")
}

/// Runs `blkmirror restore VOLUME --at AT --to TO --data-dir DATA`, expecting it to fail with
/// `code` and a message containing `says`.
fn restore_refused(volume: &str, at: &str, to: &str, data: &str, code: i32, says: &str) {
    let out = run(&[
        "restore",
        volume,
        "--at",
        at,
        "--to",
        to,
        "--data-dir",
        data,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert!(stderr.contains(says), "no {says:?} in: {stderr}");
}

/// Reads `device` with O_DIRECT (the agent's view, not a stale page cache) into `to`.
fn copy_device(device: &Path, to: &Path) {
    sh(
        "dd",
        &[
            &format!("if={}", device.display()),
            &format!("of={}", to.display()),
            "bs=1M",
            "iflag=direct",
            "conv=sparse",
            "status=none",
        ],
    );
}

fn e2fsck_clean(image: &Path) {
    let output = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .expect("e2fsck");
    assert!(
        output.status.success(),
        "e2fsck -fn {} failed:\n{}{}",
        image.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `agent --once` with the freeze held for a while and copies the device while it is
/// frozen: the copy is the source exactly as the point's final cut saw it.
fn cycle_with_copy(
    agent: &AgentSetup,
    device: &Path,
    mount: &Path,
    copy: &Path,
) -> serde_json::Value {
    let mut args = agent.args(&["--once", "--freeze-budget", "30s"]);
    args.retain(|a| a != "--json");
    args.push("--json".into());
    let child = ChildGuard(
        blkmirror()
            .args(&args)
            .env("BLKMIRROR_TEST_FREEZE_HOLD_MS", "3000")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agent"),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while !guard_running(mount) {
        assert!(
            Instant::now() < deadline,
            "the agent never froze {}",
            mount.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The guard is started just before FIFREEZE; the freeze is held for 3 s after the cut.
    std::thread::sleep(Duration::from_millis(500));
    copy_device(device, copy);
    let mut child = child;
    let mut stdout = String::new();
    child
        .0
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("agent stdout");
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("agent stderr");
    let status = child.0.wait().expect("agent");
    assert!(status.success(), "agent failed: {stderr}");
    let lines = parse_lines(&stdout);
    let point = last_point(&lines).clone();
    assert_eq!(point["consistent"], true, "{point}\n{stderr}");
    assert!(!guard_running(mount), "the thaw guard outlived the agent");
    point
}

/// Four points of the ext4 file system mounted at `mount`, each with different files; with
/// each, a copy of the source at its cut (in `scratch`).
fn four_points(
    agent: &AgentSetup,
    mount: &Path,
    scratch: &Path,
) -> Vec<(serde_json::Value, PathBuf)> {
    let mut points = Vec::new();
    for round in 0..4u64 {
        let dir = mount.join(format!("round-{round}"));
        fs::create_dir_all(&dir).expect("dir");
        for file in 0..20u64 {
            let body: Vec<u8> = (0..(8192 + file * 4096 + round * 777))
                .map(|i| (i * (round + 3) + file) as u8)
                .collect();
            fs::write(dir.join(format!("f{file}")), body).expect("write");
        }
        if round > 0 {
            fs::remove_dir_all(mount.join(format!("round-{}", round - 1))).expect("rm");
        }
        let copy = scratch.join(format!("source-at-{round}.img"));
        let point = cycle_with_copy(agent, agent.device, mount, &copy);
        points.push((point, copy));
    }
    points
}

/// Checks that `points --json` listed exactly the cycles' `points`, oldest first, each
/// consistent; returns their numbers.
fn assert_lists_the_points(
    listed: &[serde_json::Value],
    points: &[(serde_json::Value, PathBuf)],
) -> Vec<u64> {
    let seqs: Vec<u64> = listed
        .iter()
        .map(|p| p["seq"].as_u64().expect("seq"))
        .collect();
    let expected: Vec<u64> = points
        .iter()
        .map(|(p, _)| p["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, expected, "{listed:?}");
    assert!(listed.iter().all(|p| p["consistent"] == true), "{listed:?}");
    seqs
}

/// `--at TIME` to the millisecond of a listed point (`points --json` gives the time to the
/// second and the milliseconds apart).
fn time_of(listed: &serde_json::Value) -> String {
    let ms = listed["time_unix_ms"].as_u64().expect("ms");
    format!(
        "{}.{:03}Z",
        listed["time"].as_str().expect("time").trim_end_matches('Z'),
        ms % 1000
    )
}

#[test]
fn older_points_of_an_ext4_volume_restore_exactly_and_pass_e2fsck() {
    require_root();
    let site = Site::new("fs");
    let dev = LoopDevice::new(&site.scratch.path, 128 * MIB);
    let mount = Mount::mkfs_and_mount(&dev.path, "ext4", &site.scratch.path);
    let data = site.receiver.data_dir.to_str().expect("utf-8").to_owned();

    let points = four_points(
        &site.setup(&dev.path, "fs"),
        &mount.target,
        &site.scratch.path,
    );

    // `points` lists all four, newest last, each consistent.
    let listed = parse_lines(&run_ok(&["points", "fs", "--data-dir", &data, "--json"]));
    assert_lists_the_points(&listed, &points);
    let human = run_ok(&["points", "fs", "--data-dir", &data]);
    assert!(
        human.contains("consistent") && human.contains("4 point(s)"),
        "{human}"
    );

    // Every point restores to exactly the source at its cut, and is a clean ext4.
    for (index, (point, copy)) in points.iter().enumerate() {
        let seq = point["seq"].as_u64().expect("seq");
        let restored = site.scratch.path.join(format!("restored-{index}.img"));
        let out = run_ok(&[
            "restore",
            "fs",
            "--at",
            &format!("seq:{seq}"),
            "--to",
            restored.to_str().expect("utf-8"),
            "--data-dir",
            &data,
        ]);
        assert!(out.contains("restored volume fs"), "{out}");
        assert_eq!(
            digest(&restored),
            digest(copy),
            "point {seq} differs from the source at its cut"
        );
        e2fsck_clean(&restored);
        fs::remove_file(&restored).expect("rm");
    }

    // By time (to the millisecond): the newest point at or before the second point's cut is
    // the second point.
    let time = time_of(&listed[1]);
    let by_time = site.scratch.path.join("by-time.img");
    let restored = parse_lines(&run_ok(&[
        "restore",
        "fs",
        "--at",
        &time,
        "--to",
        by_time.to_str().expect("utf-8"),
        "--data-dir",
        &data,
        "--json",
    ]));
    assert_eq!(restored[0]["seq"], points[1].0["seq"], "{restored:?}");
    assert_eq!(digest(&by_time), digest(&points[1].1));

    // A mounted device is refused (opened O_EXCL).
    restore_refused("fs", "latest", dev.as_str(), &data, 2, "in use");

    // A target that exists is refused without --force.
    restore_refused(
        "fs",
        "latest",
        by_time.to_str().expect("utf-8"),
        &data,
        2,
        "--force",
    );
    // A point that does not exist is refused with the oldest one named.
    restore_refused(
        "fs",
        "2001-01-01T00:00:00Z",
        "/tmp/never",
        &data,
        2,
        "oldest",
    );

    // The deltas cost about what the cycles changed, not a copy per point.
    let deltas: u64 = fs::read_dir(Path::new(&data).join("fs/points"))
        .expect("points dir")
        .flatten()
        .map(|e| e.metadata().expect("meta").len())
        .sum();
    let changed: u64 = listed[1..]
        .iter()
        .map(|p| p["bytes"].as_u64().expect("bytes"))
        .sum();
    eprintln!("deltas of 3 older points: {deltas} bytes for {changed} bytes shipped");
    assert!(
        deltas <= changed + 4 * MIB,
        "deltas {deltas} vs changed {changed}"
    );

    // verify: all points are intact; a flipped byte in a delta is found and refuses restore.
    let verified = parse_lines(&run_ok(&[
        "verify",
        "fs",
        "--at",
        "all",
        "--data-dir",
        &data,
        "--json",
    ]));
    assert_eq!(verified.len(), 4);
    assert!(verified.iter().all(|v| v["ok"] == true), "{verified:?}");
    let delta = fs::read_dir(Path::new(&data).join("fs/points"))
        .expect("points dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| fs::metadata(p).map(|m| m.len() > 200_000).unwrap_or(false))
        .expect("a delta with data");
    let mut bytes = fs::read(&delta).expect("delta");
    let at = bytes.len() - 5000;
    bytes[at] ^= 0x55;
    fs::write(&delta, &bytes).expect("corrupt");
    let verify = run(&["verify", "fs", "--at", "all", "--data-dir", &data]);
    let report = String::from_utf8_lossy(&verify.stdout).into_owned();
    assert_eq!(verify.status.code(), Some(7), "{report}");
    assert!(report.contains("CORRUPT"), "{report}");
    // The point that reads the flipped chunk (a chunk an older delta also holds is not read
    // for the older points).
    let corrupt_seq = report
        .lines()
        .find(|l| l.contains("CORRUPT"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse::<u64>().ok())
        .expect("a corrupt point in the report");
    let target = site.scratch.path.join("corrupt.img");
    let refused = run(&[
        "restore",
        "fs",
        "--at",
        &format!("seq:{corrupt_seq}"),
        "--to",
        target.to_str().expect("utf-8"),
        "--data-dir",
        &data,
    ]);
    assert_eq!(
        refused.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!target.exists(), "a corrupt restore left its target behind");
    assert!(
        !site
            .scratch
            .path
            .join("corrupt.img.blkmirror-partial")
            .exists(),
        "a corrupt restore left its partial file behind"
    );
    // Finding 12 of the hardening issue: a restore to a device wrote chunks before it found
    // the corruption, then said nothing was restored. The point is checked first now.
    let target_dev = LoopDevice::new(&site.scratch.path, 128 * MIB);
    blkmirror_tests::mirror::write_random(&target_dev.path, 0, 4 * MIB);
    let before = blkmirror_tests::mirror::digest(&target_dev.path);
    let refused = run(&[
        "restore",
        "fs",
        "--at",
        &format!("seq:{corrupt_seq}"),
        "--to",
        target_dev.path.to_str().expect("utf-8"),
        "--data-dir",
        &data,
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains("was not written"), "{stderr}");
    assert_eq!(
        blkmirror_tests::mirror::digest(&target_dev.path),
        before,
        "a refused restore wrote to the device"
    );
    bytes[at] ^= 0x55;
    fs::write(&delta, &bytes).expect("repair");

    // The audit log holds the connects, commits, restores and verifies, chained.
    let audit = run_ok(&["audit", "verify", "--data-dir", &data, "--json"]);
    let audit: serde_json::Value = serde_json::from_str(audit.trim()).expect("json");
    let log = fs::read_to_string(Path::new(&data).join("audit.log")).expect("audit log");
    for event in ["receiver-start", "connect", "commit", "restore", "verify"] {
        assert!(
            log.contains(&format!("\"event\":\"{event}\"")),
            "no {event} in the audit log"
        );
    }
    assert_eq!(audit["entries"].as_u64(), Some(log.lines().count() as u64));
    // An edit is detected.
    fs::write(
        Path::new(&data).join("audit.log"),
        log.replacen("\"outcome\":\"ok\"", "\"outcome\":\"OK\"", 1),
    )
    .expect("edit");
    let broken = run(&["audit", "verify", "--data-dir", &data]);
    assert_eq!(broken.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&broken.stderr).contains("edited"));
    drop(mount);
}

/// The same four ext4 points on the object-store backend: a receiver with a `[store]`
/// publishes them to a real Ceph cluster (three OSDs, three replicas), and with the receiver
/// gone, `points`, `restore` (each point to a file, by time, to a device) and `verify` with
/// `--from-store` give what the data directory gives; a damaged chunk in the store is found by
/// `verify` and refused by `restore`, which leaves a device untouched and no file behind.
#[test]
fn older_points_of_an_ext4_volume_restore_exactly_from_the_object_store_too() {
    require_root();
    let cluster = CephCluster::start();
    cluster.create_bucket("points");
    let scratch = Scratch::new();
    let dir = &scratch.path;
    let agent_id = Id::new(dir, "agent-id");
    let receiver_id = Id::new(dir, "receiver-id");
    let credentials = dir.join("store-credentials.toml");
    cluster.write_credentials(&credentials, SECRET_KEY, 0o600);
    let data = dir.join("data");
    let config = dir.join("receiver.toml");
    fs::write(
        &config,
        format!(
            "identity = \"{}\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
             [[agent]]\nfingerprint = \"{}\"\nvolumes = [\"fs\"]\n\
             [store]\nendpoint = \"{}\"\nbucket = \"points\"\ncredentials = \"{}\"\n\
             allow_http = true\n",
            receiver_id.dir.display(),
            data.display(),
            agent_id.fingerprint,
            cluster.endpoint,
            credentials.display()
        ),
    )
    .expect("receiver.toml");
    let mut receiver = Receiver::start_config(&config, &data, &receiver_id);
    let dev = LoopDevice::new(dir, 128 * MIB);
    let mount = Mount::mkfs_and_mount(&dev.path, "ext4", dir);
    let pins = PinRoot::new();
    let state = dir.join("state");
    let agent = AgentSetup {
        device: &dev.path,
        volume: "fs",
        receiver: &receiver,
        id: &agent_id,
        pins: &pins,
        state_dir: &state,
        receiver_fingerprint: None,
        via: None,
    };
    let points = four_points(&agent, &mount.target, dir);
    // From here on, the store alone.
    receiver.kill();
    let store = config.to_str().expect("utf-8");

    let listed = parse_lines(&run_ok(&["points", "fs", "--from-store", store, "--json"]));
    let seqs = assert_lists_the_points(&listed, &points);
    assert_eq!(listed[0]["manifest"], "full", "{listed:?}");
    assert!(
        listed[1..].iter().all(|p| p["manifest"] == "delta"),
        "{listed:?}"
    );
    let human = run_ok(&["points", "fs", "--from-store", store]);
    assert!(
        human.contains("consistent") && human.contains("delta manifest"),
        "{human}"
    );

    for (index, (point, copy)) in points.iter().enumerate() {
        let seq = point["seq"].as_u64().expect("seq");
        let restored = dir.join(format!("restored-{index}.img"));
        let out = run_ok(&[
            "restore",
            "fs",
            "--from-store",
            store,
            "--at",
            &format!("seq:{seq}"),
            "--to",
            restored.to_str().expect("utf-8"),
        ]);
        assert!(out.contains("from the object store"), "{out}");
        assert_eq!(
            digest(&restored),
            digest(copy),
            "point {seq} from the store differs from the source at its cut"
        );
        e2fsck_clean(&restored);
        fs::remove_file(&restored).expect("rm");
    }

    let by_time = dir.join("by-time.img");
    let restored = parse_lines(&run_ok(&[
        "restore",
        "fs",
        "--from-store",
        store,
        "--at",
        &time_of(&listed[1]),
        "--to",
        by_time.to_str().expect("utf-8"),
        "--json",
        "--data-dir",
        data.to_str().expect("utf-8"),
    ]));
    let restored = restored
        .iter()
        .find(|line| line["event"] == "restored")
        .expect("a restored line");
    assert_eq!(restored["seq"], points[1].0["seq"], "{restored}");
    assert_eq!(digest(&by_time), digest(&points[1].1));
    // Run on a receiver's machine, it is in that receiver's audit log (whose shipper carries
    // it to the store's shared chain).
    let log = fs::read_to_string(data.join("audit.log")).expect("the audit log");
    assert!(
        log.lines()
            .any(|l| l.contains("\"event\":\"restore\"") && l.contains("from_store")),
        "no restore from the store in the audit log:\n{log}"
    );

    // The same refusals as from the data directory.
    let refused = |at: &str, to: &str, says: &str| {
        let out = run(&[
            "restore",
            "fs",
            "--from-store",
            store,
            "--at",
            at,
            "--to",
            to,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(says), "no {says:?} in: {stderr}");
    };
    refused("latest", dev.as_str(), "in use");
    refused("latest", by_time.to_str().expect("utf-8"), "--force");
    refused("2001-01-01T00:00:00Z", "/tmp/never", "oldest");

    // To a device, whole.
    let target_dev = LoopDevice::new(dir, 128 * MIB);
    run_ok(&[
        "restore",
        "fs",
        "--from-store",
        store,
        "--at",
        "latest",
        "--to",
        target_dev.as_str(),
    ]);
    assert_eq!(digest(&target_dev.path), digest(&points[3].1));

    let verified = parse_lines(&run_ok(&[
        "verify",
        "fs",
        "--from-store",
        store,
        "--at",
        "all",
        "--json",
    ]));
    assert_eq!(
        verified[0]["points"].as_array().map(Vec::len),
        Some(4),
        "{verified:?}"
    );

    // An export from the store, with no receiver: `qemu-img compare` (the real NBD client)
    // finds it equal to the source at its cut. Writable over an overlay: a write reads back
    // through NBD, and the point in the store is not changed by it.
    let log = dir.join("export-from-store.log");
    let (export, uri) = start_export(
        &[
            "export",
            "fs",
            "--from-store",
            store,
            "--at",
            &format!("seq:{}", seqs[1]),
            "--listen",
            "127.0.0.1:0",
        ],
        &log,
    );
    let compare = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &uri])
        .arg(&points[1].1)
        .output()
        .expect("qemu-img");
    assert_eq!(
        compare.status.code(),
        Some(0),
        "the export from the store differs from point {}: {}{}",
        seqs[1],
        String::from_utf8_lossy(&compare.stdout),
        String::from_utf8_lossy(&compare.stderr)
    );
    drop(export);
    let refused = run(&[
        "export",
        "fs",
        "--from-store",
        store,
        "--writable",
        "--listen",
        "127.0.0.1:0",
    ]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(said.contains("--overlay-dir"), "{said}");
    let log = dir.join("writable-export-from-store.log");
    let (export, uri) = start_export(
        &[
            "export",
            "fs",
            "--from-store",
            store,
            "--writable",
            "--overlay-dir",
            dir.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
        ],
        &log,
    );
    qemu_io(&uri, &["write -P 0x5a 1M 100k", "read -P 0x5a 1M 100k"]);
    drop(export);

    // A drill from the store: attach, file system check, mount, health check; the record is
    // kept in the store.
    let drilled = parse_lines(&run_ok(&[
        "drill",
        "fs",
        "--from-store",
        store,
        "--at",
        "latest",
        "--check",
        "test -f round-3/f19 && ! test -e round-2",
        "--json",
    ]));
    assert_eq!(drilled[0]["ok"], true, "{drilled:?}");
    assert_eq!(drilled[0]["seq"].as_u64(), Some(seqs[3]), "{drilled:?}");
    let kept = cluster
        .get_object("points", "volumes/fs/drill.json")
        .expect("the drill record in the store");
    let kept: serde_json::Value = serde_json::from_slice(&kept).expect("a drill record");
    assert_eq!(kept["seq"].as_u64(), Some(seqs[3]), "{kept}");
    assert_eq!(kept["ok"], true, "{kept}");

    // Mounted from the store: the first point's files, read-only, until SIGTERM.
    let target = dir.join("first-point-mnt");
    fs::create_dir_all(&target).expect("mount point");
    let mut mounted = ChildGuard(
        blkmirror()
            .args(["mount", "fs"])
            .arg(&target)
            .args(["--from-store", store, "--at", &format!("seq:{}", seqs[0])])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mount"),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(mounted.0.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("the mount's line");
    assert_eq!(line.trim(), target.to_str().expect("utf-8"));
    let first_file: Vec<u8> = (0..8192u64).map(|i| (i * 3) as u8).collect();
    assert_eq!(
        fs::read(target.join("round-0/f0")).expect("a file of the first point"),
        first_file
    );
    assert!(
        !target.join("round-1").exists(),
        "the first point has no later files"
    );
    assert!(
        fs::write(target.join("new-file"), b"x").is_err(),
        "the mount is read-only"
    );
    blkmirror_tests::signal(mounted.0.id(), libc::SIGTERM);
    let status = mounted.0.wait().expect("mount");
    assert!(status.success(), "mount --from-store exited with {status}");
    let mounts = fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    assert!(
        !mounts.contains(target.to_str().expect("utf-8")),
        "still mounted after SIGTERM"
    );

    // The store's restore is still the point (the writable export wrote its overlay only).
    let again = dir.join("again.img");
    run_ok(&[
        "restore",
        "fs",
        "--from-store",
        store,
        "--at",
        "latest",
        "--to",
        again.to_str().expect("utf-8"),
    ]);
    assert_eq!(digest(&again), digest(&points[3].1));
    fs::remove_file(&again).expect("rm");

    // One damaged chunk of the newest point: verify finds it; a restore to a device checks
    // the point first and leaves the device as it was; a restore to a file leaves none.
    cluster.damage_first_chunk_of_newest_point("points", "fs");
    let verify = run(&["verify", "fs", "--from-store", store, "--at", "latest"]);
    let said = String::from_utf8_lossy(&verify.stderr);
    assert_eq!(verify.status.code(), Some(7), "{said}");
    write_random(&target_dev.path, 0, 4 * MIB);
    let before = digest(&target_dev.path);
    let restore = run(&[
        "restore",
        "fs",
        "--from-store",
        store,
        "--at",
        "latest",
        "--to",
        target_dev.as_str(),
    ]);
    let said = String::from_utf8_lossy(&restore.stderr);
    assert_eq!(restore.status.code(), Some(7), "{said}");
    assert!(said.contains("was not written"), "{said}");
    assert_eq!(
        digest(&target_dev.path),
        before,
        "a refused restore wrote to the device"
    );
    let file = dir.join("damaged.img");
    let restore = run(&[
        "restore",
        "fs",
        "--from-store",
        store,
        "--at",
        "latest",
        "--to",
        file.to_str().expect("utf-8"),
    ]);
    assert_eq!(restore.status.code(), Some(7));
    assert!(!file.exists(), "a damaged restore left its target behind");
    // The older points do not read the damaged chunk (the newest point wrote it anew).
    let older = dir.join("older.img");
    run_ok(&[
        "restore",
        "fs",
        "--from-store",
        store,
        "--at",
        &format!("seq:{}", seqs[0]),
        "--to",
        older.to_str().expect("utf-8"),
    ]);
    assert_eq!(digest(&older), digest(&points[0].1));
    drop(mount);
    retention_in_the_store_spares_the_chunks_of_a_running_restore(&cluster, dir, &agent_id);
}

/// A receiver that keeps only the newest point, in its data directory and in the store: a
/// restore from the store of point B, held after it read B's manifest, goes on while cycle C
/// drops B from the store, and still writes B exactly (the dropped manifest's chunks stay
/// until a collection a grace period later).
fn retention_in_the_store_spares_the_chunks_of_a_running_restore(
    cluster: &CephCluster,
    dir: &Path,
    agent_id: &Id,
) {
    cluster.create_bucket("newest");
    let receiver_id = Id::new(dir, "newest-receiver-id");
    let data = dir.join("newest-data");
    let config = dir.join("newest.toml");
    let text = fs::read_to_string(dir.join("receiver.toml"))
        .expect("receiver.toml")
        .replace("bucket = \"points\"", "bucket = \"newest\"")
        .replace("volumes = [\"fs\"]", "volumes = [\"raw\"]")
        .replace(
            &dir.join("data").display().to_string(),
            &data.display().to_string(),
        )
        .replace(
            &dir.join("receiver-id").display().to_string(),
            &receiver_id.dir.display().to_string(),
        )
        // Retention from the first publish: this receiver is the volume's first holder, so
        // there is nothing of a previous one to settle (the `[store]` section is the last).
        + "takeover_settle = \"0s\"\n\
           [retention]\nall = \"1s\"\nhourly = \"0s\"\ndaily = \"0s\"\n";
    fs::write(&config, text).expect("newest.toml");
    let store = config.to_str().expect("utf-8");
    let receiver = Receiver::start_config(&config, &data, &receiver_id);
    let dev = LoopDevice::new(dir, 64 * MIB);
    let pins = PinRoot::new();
    let state = dir.join("newest-state");
    let agent = AgentSetup {
        device: &dev.path,
        volume: "raw",
        receiver: &receiver,
        id: agent_id,
        pins: &pins,
        state_dir: &state,
        receiver_fingerprint: None,
        via: None,
    };
    write_random(&dev.path, 0, 8 * MIB);
    agent.once_ok(&[]);
    // One cycle a second after the last (past the one-second retention), then the store
    // holds its point only; returns the point.
    let cycle_leaving_only_its_point = |what: &str| {
        std::thread::sleep(Duration::from_millis(1_100));
        let seq = last_point(&agent.once_ok(&[]))["seq"]
            .as_u64()
            .expect("seq");
        let listed = parse_lines(&run_ok(&["points", "raw", "--from-store", store, "--json"]));
        assert_eq!(
            listed.iter().map(|p| p["seq"].as_u64()).collect::<Vec<_>>(),
            [Some(seq)],
            "{what}: {listed:?}"
        );
        seq
    };
    write_random(&dev.path, 8 * MIB, 4 * MIB);
    let b = cycle_leaving_only_its_point("only B is kept");
    let source_at_b = dir.join("newest-source-at-b.img");
    copy_device(&dev.path, &source_at_b);
    let target = dir.join("newest-restore-b.img");
    let log = dir.join("newest-restore.log");
    let mut restore = ChildGuard(
        blkmirror()
            .args([
                "restore",
                "raw",
                "--from-store",
                store,
                "--at",
                &format!("seq:{b}"),
                "--to",
                target.to_str().expect("utf-8"),
            ])
            .env("BLKMIRROR_TEST_RESTORE_HOLD_MS", "8000")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log"))
            .spawn()
            .expect("restore"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("restoring volume raw")
    {
        assert!(Instant::now() < deadline, "the restore never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Cycle C while the restore holds: B leaves the store.
    write_random(&dev.path, 0, 8 * MIB);
    cycle_leaving_only_its_point("B was not dropped from the store");
    assert!(
        restore.0.try_wait().expect("wait").is_none(),
        "the restore ended before C dropped B: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let status = restore.0.wait().expect("restore");
    assert!(
        status.success(),
        "the restore of B failed once B was dropped: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(
        digest(&target),
        digest(&source_at_b),
        "the restore of B is not B"
    );
}

/// A FIFO a restore writes into; its reader is started on demand.
struct Fifo(PathBuf);

impl Drop for Fifo {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn retention_prunes_old_points_but_never_the_newest_or_one_being_restored() {
    require_root();
    // Keep only the newest point (every tier zero), so each cycle prunes the one before.
    let site = Site::with_receiver_args(
        "raw",
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
    let dev = LoopDevice::new(&site.scratch.path, 64 * MIB);
    let agent = site.setup(&dev.path, "raw");
    write_random(&dev.path, 0, 4 * MIB);
    agent.once_ok(&[]);
    write_random(&dev.path, 8 * MIB, 4 * MIB);
    let lines = agent.once_ok(&[]);
    let b = last_point(&lines)["seq"].as_u64().expect("seq");
    let listed = parse_lines(&run_ok(&["points", "raw", "--data-dir", &data, "--json"]));
    assert_eq!(listed.len(), 1, "only the newest point is kept: {listed:?}");
    assert_eq!(listed[0]["seq"].as_u64(), Some(b));
    let source_at_b = site.scratch.path.join("source-at-b.img");
    copy_device(&dev.path, &source_at_b);

    // A FIFO is neither a block device nor a regular file: restore refuses it.
    let fifo = Fifo(site.scratch.path.join("restore.fifo"));
    sh("mkfifo", &[fifo.0.to_str().expect("utf-8")]);
    restore_refused(
        "raw",
        "latest",
        fifo.0.to_str().expect("utf-8"),
        &data,
        2,
        "neither a block device nor a regular file",
    );
    drop(fifo);

    // A restore of B that takes a while (held 6 s after it opened the volume, by a test hook).
    let target = site.scratch.path.join("restore-b.img");
    let mut restore = ChildGuard(
        blkmirror()
            .args([
                "restore",
                "raw",
                "--at",
                &format!("seq:{b}"),
                "--to",
                target.to_str().expect("utf-8"),
                "--data-dir",
                &data,
            ])
            .env("BLKMIRROR_TEST_RESTORE_HOLD_MS", "6000")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("restore"),
    );
    let pid = restore.0.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(pid.as_str()))
    {
        assert!(
            Instant::now() < deadline,
            "the restore never locked the volume"
        );
        assert!(
            restore.0.try_wait().expect("wait").is_none(),
            "the restore exited early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // A new cycle C meanwhile: its commit waits for the restore, so B is not pruned under it.
    write_random(&dev.path, 16 * MIB, 4 * MIB);
    let agent_run = std::thread::scope(|scope| {
        let handle = scope.spawn(|| agent.once_ok(&[]));
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            !handle.is_finished(),
            "cycle C committed while a restore was reading"
        );
        let listed = parse_lines(&run_ok(&["points", "raw", "--data-dir", &data, "--json"]));
        assert!(
            listed.iter().any(|p| p["seq"].as_u64() == Some(b)),
            "B was pruned while a restore of it was running: {listed:?}"
        );
        handle.join().expect("agent thread")
    });
    let c = last_point(&agent_run)["seq"].as_u64().expect("seq");
    let status = restore.0.wait().expect("restore");
    let mut stderr = String::new();
    if let Some(mut pipe) = restore.0.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(status.success(), "the held restore failed: {stderr}");
    assert_eq!(
        digest(&target),
        digest(&source_at_b),
        "restore of B is not B"
    );
    // Now B is gone and C, the newest, is kept.
    let listed = parse_lines(&run_ok(&["points", "raw", "--data-dir", &data, "--json"]));
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["seq"].as_u64(), Some(c));
    let log = fs::read_to_string(Path::new(&data).join("audit.log")).expect("audit");
    assert!(
        log.contains("\"event\":\"prune\""),
        "no prune in the audit log"
    );
    // To block devices: one as large is written whole; a smaller one is refused.
    let target_dev = LoopDevice::new(&site.scratch.path, 64 * MIB);
    run_ok(&[
        "restore",
        "raw",
        "--at",
        "latest",
        "--to",
        target_dev.as_str(),
        "--data-dir",
        &data,
    ]);
    assert_eq!(digest(&target_dev.path), digest(&dev.path));
    let small = LoopDevice::new(&site.scratch.path, 32 * MIB);
    restore_refused("raw", "latest", small.as_str(), &data, 2, "the point needs");
    // The newest point restores to the device as it is now.
    let now = site.scratch.path.join("now.img");
    run_ok(&[
        "restore",
        "raw",
        "--at",
        "latest",
        "--to",
        now.to_str().expect("utf-8"),
        "--data-dir",
        &data,
    ]);
    assert_eq!(digest(&now), digest(&dev.path));
}
