//! The whole DR lifecycle as root, on loop devices with ext4 and a writer: replicate A → B, a
//! disaster while A keeps writing, failover at B (tracked) and writes there, A refused, then
//! `failback serve` / `failback pull` moving only what differs, A equal to B byte for byte,
//! and forward replication resuming without a full sync.

use std::{
    fs, io::Read as _, os::unix::fs::FileExt as _, path::Path, process::Stdio, time::Duration,
};

use blkmirror_tests::{
    LoopDevice, Mount, blkmirror,
    mirror::{
        ChildGuard, Site, Workload, digest, free_port, last_point, qemu_io, start_export,
        stop_export, write_random,
    },
    require_root, run_ok, sh, signal,
};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * 1024;

/// Files of a round: 20 files of 40-100 KiB, unlike any other round's.
fn write_round(dir: &Path, round: u64) {
    fs::create_dir_all(dir).expect("dir");
    for file in 0..20u64 {
        let len = 40_000 + file * 3_000 + round * 111;
        let body: Vec<u8> = (0..len).map(|i| ((i * (round + 7)) ^ file) as u8).collect();
        fs::write(dir.join(format!("f{file}")), body).expect("write");
    }
    sh("sync", &[]);
}

/// Restores the receiver's newest point to `replica` and checks that it is `device`.
fn assert_replica_is(data: &str, replica: &Path, device: &Path) {
    let _ = fs::remove_file(replica);
    run_ok(&[
        "restore",
        "fs",
        "--at",
        "latest",
        "--to",
        replica.to_str().expect("utf-8"),
        "--data-dir",
        data,
    ]);
    assert_eq!(
        digest(replica),
        digest(device),
        "the replica is not the source"
    );
}

/// A distant, lossy link for the link emulator: 40 ms RTT, 1% loss, 100 Mbit/s each way.
fn distant_lossy_link() -> blkmirror_wan::LinkSpec {
    blkmirror_wan::LinkSpec {
        rate_bits: 100_000_000,
        delay: Duration::from_millis(20),
        loss: 0.01,
        ..blkmirror_wan::LinkSpec::default()
    }
}

/// Chunks whose content differs between two devices of the same size.
fn differing_chunks(a: &Path, b: &Path, size: u64) -> u64 {
    let (a, b) = (
        fs::File::open(a).expect("open a"),
        fs::File::open(b).expect("open b"),
    );
    let (mut x, mut y) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    let mut differ = 0;
    let mut offset = 0;
    while offset < size {
        a.read_exact_at(&mut x, offset).expect("read a");
        b.read_exact_at(&mut y, offset).expect("read b");
        differ += u64::from(x != y);
        offset += CHUNK;
    }
    differ
}

/// Runs `failback serve` for B's copy (`copy`: `--device B` or `--export`) and `failback
/// pull` for A; returns the pull's JSON report. With `refused_meanwhile`, checks that the old
/// source's agent is refused while the serve waits.
#[allow(clippy::too_many_arguments)]
fn fail_back(
    site: &Site,
    agent: &blkmirror_tests::mirror::AgentSetup<'_>,
    a: &Path,
    copy: &[&str],
    data: &str,
    b_state: &str,
    refused_meanwhile: bool,
    link: Option<blkmirror_wan::LinkSpec>,
) -> serde_json::Value {
    let pins = site.pins.path.to_str().expect("utf-8");
    let port = free_port();
    let serve_log = site.scratch.path.join("serve.log");
    let mut serve = ChildGuard(
        blkmirror()
            .args(["failback", "serve", "fs"])
            .args(copy)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--identity")
            .arg(site.scratch.path.join("receiver-id"))
            .args(["--allow", &site.agent.fingerprint, "--json"])
            .args([
                "--data-dir",
                data,
                "--pin-root",
                pins,
                "--state-dir",
                b_state,
            ])
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&serve_log).expect("log"))
            .spawn()
            .expect("failback serve"),
    );
    std::thread::sleep(Duration::from_millis(500));
    if refused_meanwhile {
        // The old source's agent, started during the failback, is still refused: the roles
        // swap only when the data has moved.
        let (output, _) = agent.once(&[], Duration::from_secs(120));
        assert_eq!(output.status.code(), Some(6));
    }
    // Through the project's link emulator when a link is given (the field setting).
    let relay = link.map(|spec| {
        blkmirror_wan::Relay::start(
            "127.0.0.1:0".parse().expect("address"),
            format!("127.0.0.1:{port}").parse().expect("address"),
            spec,
            spec,
            7,
        )
        .expect("starting the link emulator")
    });
    let from = relay
        .as_ref()
        .map_or_else(|| format!("127.0.0.1:{port}"), |r| r.address().to_string());
    let pull = blkmirror()
        .args(["failback", "pull", "--device"])
        .arg(a)
        .args(["--volume", "fs", "--from", &from])
        .args(["--receiver-fingerprint", &site.receiver.fingerprint])
        .arg("--identity")
        .arg(&site.agent.dir)
        .args(["--json", "--pin-root", pins, "--state-dir"])
        .arg(agent.state_dir)
        .output()
        .expect("failback pull");
    let pull_err = String::from_utf8_lossy(&pull.stderr);
    assert!(
        pull.status.success(),
        "pull failed: {pull_err}\nserve: {}",
        fs::read_to_string(&serve_log).unwrap_or_default()
    );
    let status = serve.0.wait().expect("serve");
    let serve_err = fs::read_to_string(&serve_log).unwrap_or_default();
    assert!(status.success(), "serve failed: {serve_err}");
    let report: serde_json::Value =
        serde_json::from_slice(&pull.stdout).expect("the pull's JSON report");
    eprintln!("failback: {report}\n{pull_err}{serve_err}");
    report
}

#[test]
fn failback_moves_only_what_differs_and_forward_replication_resumes() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let site = Site::new("fs");
    let data = site.receiver.data_dir.to_str().expect("utf-8").to_owned();
    let a = LoopDevice::new(&site.scratch.path, 256 * MIB);
    let b = LoopDevice::new(&site.scratch.path, 256 * MIB);
    let a_mount = Mount::mkfs_and_mount(&a.path, "ext4", &site.scratch.path);
    let agent = site.setup(&a.path, "fs");
    let pins = site.pins.path.to_str().expect("utf-8").to_owned();
    let b_state = site.scratch.path.join("state-b");
    let b_state = b_state.to_str().expect("utf-8");

    // 1. Replicate A -> B under a writer.
    let mut workload = Workload::start(&a_mount.target);
    write_round(&a_mount.target.join("r0"), 0);
    agent.once_ok(&[]);
    let first = last_point(&agent.once_ok(&[]))["seq"]
        .as_u64()
        .expect("seq");

    // 2. Disaster: the continuous agent is killed while A writes, and A keeps writing after.
    let mut running = ChildGuard(
        blkmirror()
            .args(agent.args(&["--interval", "1s"]))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("agent"),
    );
    write_round(&a_mount.target.join("r1"), 1);
    // At least one cycle after `first` commits before the kill, so that the failover below
    // promotes an older point than the newest.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while site.receiver.meta("fs")["committed_seq"].as_u64() <= Some(first)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    write_round(&a_mount.target.join("r1b"), 4);
    signal(running.0.id(), libc::SIGKILL);
    let _ = running.0.wait();
    let mut agent_out = String::new();
    if let Some(mut stdout) = running.0.stdout.take() {
        let _ = stdout.read_to_string(&mut agent_out);
    }
    write_round(&a_mount.target.join("r2"), 2);
    fs::remove_dir_all(a_mount.target.join("r0")).expect("rm r0");
    workload.stop();
    a_mount.unmount();
    let head = site.receiver.meta("fs")["committed_seq"]
        .as_u64()
        .expect("committed_seq");
    assert!(head > first, "no cycle after {first}: {agent_out}");

    // 3. Failover at B of the older point onto a block device, tracked from the promotion on;
    //    the application then runs at B.
    let out = blkmirror()
        .args([
            "failover",
            "fs",
            "--at",
            &format!("seq:{first}"),
            "--to",
            b.as_str(),
        ])
        .args([
            "--data-dir",
            &data,
            "--pin-root",
            &pins,
            "--state-dir",
            b_state,
        ])
        .output()
        .expect("failover");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failover failed: {stderr}");
    assert!(stderr.contains("is tracked"), "{stderr}");
    {
        let b_mount = site.scratch.path.join("b");
        fs::create_dir_all(&b_mount).expect("mount point");
        sh("mount", &[b.as_str(), b_mount.to_str().expect("utf-8")]);
        let _unmount = blkmirror_tests::mirror::UnmountOnDrop(b_mount.clone());
        write_round(&b_mount.join("written-at-b"), 3);
        fs::remove_dir_all(b_mount.join("r1")).ok();
        fs::write(b_mount.join("marker"), b"B was primary").expect("marker");
    }

    // 4. A comes back and is refused, and the refusal names the failback.
    let (output, _) = agent.once(&[], Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("failback pull"), "{stderr}");

    // What truly differs (the test may read both devices; the failback may not).
    let differ = differing_chunks(&a.path, &b.path, 256 * MIB);
    let device_chunks = 256 * MIB / CHUNK;
    assert!(
        differ > 0 && differ < device_chunks / 2,
        "{differ} chunks differ"
    );

    // 5. Failback: serve at B, pull at A, over a distant lossy link (40 ms, 1% loss,
    //    100 Mbit/s, through the link emulator).
    let wan = distant_lossy_link();
    let report = fail_back(
        &site,
        &agent,
        &a.path,
        &["--device", b.as_str()],
        &data,
        b_state,
        true,
        Some(wan),
    );

    // 6. A equals B byte for byte, and the failback moved about what differs.
    assert_eq!(digest(&a.path), digest(&b.path), "A differs from B");
    let planned = report["planned_chunks"].as_u64().expect("planned");
    let sent = report["sent_chunks"].as_u64().expect("sent");
    let wire = report["wire_rx_bytes"].as_u64().expect("wire");
    assert!(
        !report["compare_all"].as_bool().expect("compare_all"),
        "{report}"
    );
    assert_eq!(sent, differ, "{report}");
    assert!(
        planned < device_chunks / 2,
        "planned {planned} of {device_chunks} chunks: not proportional to the changes"
    );
    assert!(
        wire as f64 <= 1.5 * (differ * CHUNK) as f64 + MIB as f64,
        "{wire} bytes on the wire for {differ} differing chunks"
    );

    // 7. Forward replication resumes from the receiver's newest point, incrementally.
    let lines = agent.once_ok(&[]);
    let point = last_point(&lines);
    assert_eq!(point["kind"], "cycle", "{lines:?}");
    assert!(point["seq"].as_u64().expect("seq") > head);
    assert!(
        point["read_bytes"].as_u64().expect("read") <= (planned + 64) * CHUNK,
        "{point}"
    );
    let replica = site.scratch.path.join("replica.img");
    assert_replica_is(&data, &replica, &a.path);
    let authority =
        fs::read_to_string(Path::new(&data).join("fs/authority.json")).expect("authority");
    assert!(authority.contains("\"failback\""), "{authority}");
    assert!(authority.contains("\"primary\": \"source\""), "{authority}");

    // 8. A failover of the failed-back volume, untracked this time: the failback falls back
    //    to comparing every chunk by hash, and still moves only what differs.
    let out = blkmirror()
        .args([
            "failover",
            "fs",
            "--no-track",
            "--to",
            b.as_str(),
            "--data-dir",
            &data,
        ])
        .output()
        .expect("failover");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failover failed: {stderr}");
    assert!(stderr.contains("compares every chunk"), "{stderr}");
    {
        let b_mount = site.scratch.path.join("b2");
        fs::create_dir_all(&b_mount).expect("mount point");
        sh("mount", &[b.as_str(), b_mount.to_str().expect("utf-8")]);
        let _unmount = blkmirror_tests::mirror::UnmountOnDrop(b_mount.clone());
        write_round(&b_mount.join("second-failover"), 5);
    }
    let differ = differing_chunks(&a.path, &b.path, 256 * MIB);
    let report = fail_back(
        &site,
        &agent,
        &a.path,
        &["--device", b.as_str()],
        &data,
        b_state,
        false,
        None,
    );
    assert!(
        report["compare_all"].as_bool().expect("compare_all"),
        "{report}"
    );
    assert_eq!(
        report["planned_chunks"].as_u64(),
        Some(device_chunks),
        "{report}"
    );
    assert_eq!(report["sent_chunks"].as_u64(), Some(differ), "{report}");
    assert_eq!(digest(&a.path), digest(&b.path), "A differs from B");
    // After a gap the forward direction compares too (a verify sync), then cycles go on.
    let lines = agent.once_ok(&[]);
    assert!(
        lines.iter().any(|line| line["event"] == "committed"
            && line["read_bytes"].as_u64() == Some(256 * MIB)
            && line["sent_bytes"].as_u64() < Some(8 * MIB)),
        "no compare of the whole device that sent little: {lines:?}"
    );
    assert_replica_is(&data, &replica, &a.path);

    // 9. A planned switchback with the application still running at B: `--live` pre-copies
    //    while B is mounted and written, waits for the unmount, then sends the final delta.
    let out = blkmirror()
        .args(["failover", "fs", "--to", b.as_str()])
        .args([
            "--data-dir",
            &data,
            "--pin-root",
            &pins,
            "--state-dir",
            b_state,
        ])
        .output()
        .expect("failover");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b_mount = site.scratch.path.join("b3");
    fs::create_dir_all(&b_mount).expect("mount point");
    sh("mount", &[b.as_str(), b_mount.to_str().expect("utf-8")]);
    let unmount_b = blkmirror_tests::mirror::UnmountOnDrop(b_mount.clone());
    write_round(&b_mount.join("before-pre-copy"), 6);
    let mut b_writer = Workload::start(&b_mount);
    let port = free_port();
    let serve_log = site.scratch.path.join("serve-live.log");
    let mut serve = ChildGuard(
        blkmirror()
            .args(["failback", "serve", "fs", "--live", "--device", b.as_str()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--identity")
            .arg(site.scratch.path.join("receiver-id"))
            .args(["--allow", &site.agent.fingerprint, "--json"])
            .args([
                "--data-dir",
                &data,
                "--pin-root",
                &pins,
                "--state-dir",
                b_state,
            ])
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&serve_log).expect("log"))
            .spawn()
            .expect("failback serve --live"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let pull_out = site.scratch.path.join("pull-live.out");
    let pull_err = site.scratch.path.join("pull-live.err");
    let mut pull = ChildGuard(
        blkmirror()
            .args(["failback", "pull", "--device", a.as_str(), "--volume", "fs"])
            .args(["--from", &format!("127.0.0.1:{port}")])
            .args(["--receiver-fingerprint", &site.receiver.fingerprint])
            .arg("--identity")
            .arg(&site.agent.dir)
            .args(["--json", "--pin-root", &pins, "--state-dir"])
            .arg(agent.state_dir)
            .stdout(fs::File::create(&pull_out).expect("out"))
            .stderr(fs::File::create(&pull_err).expect("err"))
            .spawn()
            .expect("failback pull"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !fs::read_to_string(&serve_log)
        .unwrap_or_default()
        .contains("pre-copy done")
    {
        assert!(
            std::time::Instant::now() < deadline && matches!(serve.0.try_wait(), Ok(None)),
            "no pre-copy: {}",
            fs::read_to_string(&serve_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The application stops at B: its last writes, then the unmount.
    b_writer.stop();
    write_round(&b_mount.join("after-pre-copy"), 7);
    drop(unmount_b);
    let pull_status = pull.0.wait().expect("pull");
    let serve_status = serve.0.wait().expect("serve");
    let serve_text = fs::read_to_string(&serve_log).unwrap_or_default();
    let pull_text = fs::read_to_string(&pull_err).unwrap_or_default();
    assert!(
        pull_status.success(),
        "pull: {pull_text}\nserve: {serve_text}"
    );
    assert!(serve_status.success(), "serve: {serve_text}");
    assert!(serve_text.contains("round 2"), "{serve_text}");
    eprintln!("live failback:\n{pull_text}{serve_text}");
    assert_eq!(
        digest(&a.path),
        digest(&b.path),
        "A differs from B after the final delta"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&fs::read(&pull_out).expect("report")).expect("JSON report");
    assert!(
        !report["compare_all"].as_bool().expect("compare_all"),
        "{report}"
    );
    assert!(
        report["planned_chunks"].as_u64().expect("planned") < device_chunks / 2,
        "{report}"
    );
    let lines = agent.once_ok(&[]);
    assert_eq!(last_point(&lines)["kind"], "cycle", "{lines:?}");
    assert_replica_is(&data, &replica, &a.path);

    // 10. A protected root disk keeps the agent's state on the device the failback rewrites:
    //     after it, the agent finds a state that does not record the failback. It must verify,
    //     not trust that state.
    let out = blkmirror()
        .args(["failover", "fs", "--to", b.as_str()])
        .args([
            "--data-dir",
            &data,
            "--pin-root",
            &pins,
            "--state-dir",
            b_state,
        ])
        .output()
        .expect("failover");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    write_random(&b.path, 64 * MIB, MIB);
    let state_file = agent.state_dir.join("agent-fs.json");
    let before_failback = fs::read(&state_file).expect("agent state");
    fail_back(
        &site,
        &agent,
        &a.path,
        &["--device", b.as_str()],
        &data,
        b_state,
        false,
        None,
    );
    fs::write(&state_file, before_failback).expect("an agent state from before the failback");
    let (output, lines) = agent.once(&[], Duration::from_secs(300));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("rewrote this device"), "{stderr}");
    assert!(
        lines
            .iter()
            .any(|line| line["read_bytes"].as_u64() == Some(256 * MIB)),
        "no whole-device compare: {lines:?}"
    );
    assert_replica_is(&data, &replica, &a.path);

    let audit = fs::read_to_string(Path::new(&data).join("audit.log")).expect("audit log");
    assert_eq!(
        audit.matches("\"event\":\"failback\"").count(),
        4,
        "{audit}"
    );
    run_ok(&["audit", "verify", "--data-dir", &data]);
}

#[test]
fn a_failover_to_an_export_serves_at_once_keeps_its_writes_and_fails_back_only_them() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let site = Site::new("fs");
    let data = site.receiver.data_dir.to_str().expect("utf-8").to_owned();
    let size = 128 * MIB;
    let a = LoopDevice::new(&site.scratch.path, size);
    let a_mount = Mount::mkfs_and_mount(&a.path, "ext4", &site.scratch.path);
    let agent = site.setup(&a.path, "fs");
    let b_state = site.scratch.path.join("state-b");
    let b_state = b_state.to_str().expect("utf-8");

    // A point, a later cycle, and writes on A that never leave it (the disaster).
    write_round(&a_mount.target.join("r0"), 0);
    agent.once_ok(&[]);
    let first = last_point(&agent.once_ok(&[]))["seq"]
        .as_u64()
        .expect("seq");
    write_round(&a_mount.target.join("r1"), 1);
    agent.once_ok(&[]);
    write_round(&a_mount.target.join("r2"), 2);
    a_mount.unmount();

    // Failover of the older point into an export: served at once, no copy.
    let socket = site.scratch.path.join("promoted.sock");
    let log = site.scratch.path.join("failover.log");
    let listen = format!("unix:{}", socket.display());
    let failover_args = [
        "failover",
        "fs",
        "--at",
        &format!("seq:{first}"),
        "--to",
        "export",
        "--listen",
        &listen,
        "--data-dir",
        &data,
    ];
    let started = std::time::Instant::now();
    let (export, uri) = start_export(&failover_args, &log);
    eprintln!("failover to an export: serving in {:?}", started.elapsed());
    // The application writes at the DR site (through the real NBD client), and flushes.
    qemu_io(
        &uri,
        &[
            "write -P 0xab 1M 192k",
            "write -P 0xcd 70M 64k",
            "write -P 0xef 100M 4k",
            "flush",
        ],
    );
    let text = stop_export(export, &log);
    assert!(text.contains("term 2"), "{text}");
    assert!(text.contains("overlay keeps"), "{text}");
    // The replica was not written: its newest point still reads back as committed.
    run_ok(&["verify", "fs", "--data-dir", &data]);

    // The old source is refused while the export is primary.
    let (output, _) = agent.once(&[], Duration::from_secs(120));
    assert_eq!(
        output.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Served again after the restart, the writes are there; a second server is refused.
    let log2 = site.scratch.path.join("promoted.log");
    let socket2 = site.scratch.path.join("promoted2.sock");
    let listen2 = format!("unix:{}", socket2.display());
    let promoted_args = [
        "export",
        "fs",
        "--promoted",
        "--listen",
        &listen2,
        "--data-dir",
        &data,
    ];
    let (export, uri) = start_export(&promoted_args, &log2);
    qemu_io(&uri, &["read -P 0xab 1M 192k", "read -P 0xcd 70M 64k"]);
    let busy = blkmirror()
        .args(["export", "fs", "--promoted", "--listen", "127.0.0.1:0"])
        .args(["--data-dir", &data])
        .output()
        .expect("a second export");
    let busy_err = String::from_utf8_lossy(&busy.stderr);
    assert_eq!(busy.status.code(), Some(2), "{busy_err}");
    assert!(busy_err.contains("in use"), "{busy_err}");
    // The whole promoted copy, as the application sees it (the failback must make A this).
    let expected = site.scratch.path.join("expected.img");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&expected)
        .output()
        .expect("qemu-img convert");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stop_export(export, &log2);
    let differ = differing_chunks(&a.path, &expected, size);

    // Failback from the export, over a distant lossy link: only what its overlay names, the
    // chunks the source committed after the point, and A's unreplicated writes are compared.
    let wan = distant_lossy_link();
    let report = fail_back(
        &site,
        &agent,
        &a.path,
        &["--export"],
        &data,
        b_state,
        false,
        Some(wan),
    );
    assert_eq!(digest(&a.path), digest(&expected), "A is not the export");
    assert!(!report["compare_all"].as_bool().expect("compare_all"));
    assert_eq!(report["sent_chunks"].as_u64(), Some(differ), "{report}");
    let planned = report["planned_chunks"].as_u64().expect("planned");
    assert!(
        planned <= differ * 3 / 2 + 8 && planned < size / CHUNK / 4,
        "planned {planned} for {differ} differing chunks"
    );
    assert!(
        !Path::new(&data).join("fs/promoted-export").exists(),
        "the overlay outlived the failback"
    );
    // Forward replication resumes, and the replica is A.
    agent.once_ok(&[]);
    assert_replica_is(&data, &site.scratch.path.join("replica.img"), &a.path);
    let gone = blkmirror()
        .args(["export", "fs", "--promoted", "--listen", "127.0.0.1:0"])
        .args(["--data-dir", &data])
        .output()
        .expect("export --promoted");
    assert_eq!(gone.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no promoted export"));
}
