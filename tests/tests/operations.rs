//! Running as an operator would, as root: an agent configured by file with two devices, its
//! control socket (`blkmirror status`) and Prometheus endpoint scraped for real, and the
//! receiver's.

use std::{
    fs,
    io::{Read as _, Write as _},
    time::{Duration, Instant},
};

use blkmirror_tests::{
    LoopDevice, blkmirror,
    mirror::{ChildGuard, Site, assert_same, free_port, scrape_metrics, write_random},
    require_root,
};

const MIB: u64 = 1 << 20;

fn status_json(socket: &std::path::Path) -> serde_json::Value {
    let out = blkmirror()
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .expect("status");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// Writes `SCRATCH/agent.toml` for `site`: identity, state, pins and receiver from the site,
/// then `top` (more top-level keys), then one `[[device]]` per `(path, volume, extra keys)`.
fn agent_config(
    site: &Site,
    top: &str,
    devices: &[(&std::path::Path, &str, &str)],
) -> std::path::PathBuf {
    let mut text = format!(
        "identity = \"{}\"\nstate_dir = \"{}\"\npin_root = \"{}\"\n{top}\n[receiver]\naddress = \"{}\"\nfingerprint = \"{}\"\n",
        site.agent.dir.display(),
        site.scratch.path.join("state").display(),
        site.pins.path.display(),
        site.receiver.addr,
        site.receiver.fingerprint,
    );
    for (path, volume, extra) in devices {
        text.push_str(&format!(
            "[[device]]\npath = \"{}\"\nvolume = \"{volume}\"\ninterval = \"1s\"\n{extra}\n",
            path.display()
        ));
    }
    let config = site.scratch.path.join("agent.toml");
    fs::write(&config, text).expect("config");
    config
}

/// Polls `check` every `every` until it gives a value, while `agent` keeps running; fails
/// after `seconds` with `what`.
fn poll_running<T>(
    agent: &mut ChildGuard,
    seconds: u64,
    every: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            agent.0.try_wait().expect("wait").is_none(),
            "the agent exited"
        );
        assert!(Instant::now() < deadline, "{what} within {seconds} s");
        std::thread::sleep(every);
    }
}

#[test]
fn two_devices_from_a_config_file_with_status_and_metrics() {
    require_root();
    let receiver_metrics = free_port();
    let site = Site::with_receiver_args(
        "one,two",
        &["--metrics-listen", &format!("127.0.0.1:{receiver_metrics}")],
    );
    let one = LoopDevice::new(&site.scratch.path, 32 * MIB);
    let two = LoopDevice::new(&site.scratch.path, 48 * MIB);
    write_random(&one.path, 0, 4 * MIB);
    write_random(&two.path, 8 * MIB, 4 * MIB);
    let socket = site.scratch.path.join("agent.sock");
    let metrics = free_port();
    let config = agent_config(
        &site,
        &format!(
            "control_socket = \"{}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"",
            socket.display()
        ),
        &[
            (&one.path, "one", ""),
            (&two.path, "two", "chunk_size = \"128KiB\""),
        ],
    );
    let check = blkmirror()
        .args(["config", "check"])
        .arg(&config)
        .output()
        .expect("config check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("2 device(s)"));

    let mut agent = ChildGuard(
        blkmirror()
            .args(["agent", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("agent"),
    );
    // Both volumes reach continuous replication with a point.
    let status = poll_running(
        &mut agent,
        120,
        Duration::from_millis(200),
        "both volumes continuous",
        || {
            if !socket.exists() {
                return None;
            }
            let status = status_json(&socket);
            let volumes = status["volumes"].as_array().cloned().unwrap_or_default();
            (volumes.len() == 2
                && volumes
                    .iter()
                    .all(|v| v["state"] == "continuous" && v["last_point"].is_object()))
            .then_some(status)
        },
    );
    assert_eq!(status["role"], "agent");
    let one_status = &status["volumes"][0];
    assert_eq!(one_status["volume"], "one");
    assert!(one_status["lag_seconds"].as_f64().expect("lag") < 60.0);
    assert!(one_status["sent_bytes_total"].as_u64().expect("sent") > 0);
    let human = blkmirror()
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .expect("status");
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("continuous") && human.contains("two"),
        "{human}"
    );
    // --watch: text frames every second when not on a terminal, indicatif lines on one.
    let watch = std::process::Command::new("timeout")
        .args([
            "3",
            blkmirror_tests::blkmirror_bin().to_str().expect("utf-8"),
            "status",
            "--watch",
            "--socket",
        ])
        .arg(&socket)
        .output()
        .expect("status --watch");
    let frames = String::from_utf8_lossy(&watch.stdout);
    assert!(frames.matches("\n--\n").count() >= 2, "{frames}");
    let command = format!(
        "timeout 3 {} status --watch --socket {}",
        blkmirror_tests::blkmirror_bin().display(),
        socket.display()
    );
    let tty = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("script");
    let drawn = String::from_utf8_lossy(&tty.stdout);
    assert!(
        drawn.contains("agent one") && drawn.contains("agent two") && drawn.contains("continuous"),
        "{drawn}"
    );
    // The socket is root-only.
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        fs::metadata(&socket).expect("socket").permissions().mode() & 0o777,
        0o600
    );

    // Metrics, scraped from the real endpoints.
    let text = scrape_metrics(metrics);
    for needle in [
        "blkmirror_lag_seconds{volume=\"one\"}",
        "blkmirror_lag_seconds{volume=\"two\"}",
        "blkmirror_backlog_bytes{volume=\"one\"}",
        "blkmirror_cycle_duration_seconds_count{volume=\"two\"}",
        "blkmirror_freeze_duration_seconds_sum{volume=\"one\"}",
        "blkmirror_tracking_loss_total{volume=\"one\"}",
        "blkmirror_tracking_skips_recovered_total{volume=\"one\"}",
        "blkmirror_build_info{version=",
    ] {
        assert!(text.contains(needle), "no {needle} in\n{text}");
    }
    let sent: f64 = text
        .lines()
        .find(|l| l.starts_with("blkmirror_sent_bytes_total{volume=\"two\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("sent bytes of two");
    assert!(sent >= 4.0 * MIB as f64 / 2.0, "sent {sent}");
    let receiver_text = scrape_metrics(receiver_metrics);
    assert!(
        receiver_text.contains("blkmirror_lag_seconds{volume=\"one\"}"),
        "{receiver_text}"
    );
    assert!(receiver_text.contains("role=\"receiver\""));

    // A change on one device reaches the replica; then a clean stop.
    write_random(&one.path, 16 * MIB, 2 * MIB);
    std::thread::sleep(Duration::from_secs(4));
    blkmirror_tests::signal(agent.0.id(), libc::SIGTERM);
    let code = agent.0.wait().expect("agent");
    assert!(code.success(), "agent exit {code}");
    assert!(!socket.exists(), "the control socket outlived the agent");
    assert_same(&one.path, &site.receiver.image("one"));
    assert_same(&two.path, &site.receiver.image("two"));
}

#[test]
fn a_bad_config_file_exits_78_with_every_problem_named() {
    let scratch = blkmirror_tests::Scratch::new();
    let config = scratch.path.join("agent.toml");
    fs::write(
        &config,
        "identity = \"/nonexistent\"\n[receiver]\naddress = \"x\"\nfingerprint = \"nope\"\n[[device]]\npath = \"/dev/null\"\nvolume = \"a b\"\ninterval = \"often\"\n",
    )
    .expect("write");
    for args in [vec!["config", "check"], vec!["agent", "--once", "--config"]] {
        let out = blkmirror().args(&args).arg(&config).output().expect("run");
        assert_eq!(out.status.code(), Some(78), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for key in [
            "receiver.fingerprint",
            "receiver.address",
            "device[0].volume",
            "device[0].interval",
        ] {
            assert!(stderr.contains(key), "{args:?}: no {key} in {stderr}");
        }
    }
    fs::write(&config, "identity = \"/x\"\nunknown_key = 1\n").expect("write");
    let out = blkmirror()
        .args(["config", "check", "--kind", "agent"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_key"));
}

/// Checks the ext4 image `image` (`e2fsck -fy`: a frozen point is clean, exit 0; anything
/// else replays a journal or repairs, which is reported), then reads its `/counter`.
fn counter_in(image: &std::path::Path) -> u64 {
    let fsck = std::process::Command::new("e2fsck")
        .arg("-fy")
        .arg(image)
        .output()
        .expect("e2fsck");
    assert_eq!(
        fsck.status.code(),
        Some(0),
        "{} is not a clean frozen point: {}",
        image.display(),
        String::from_utf8_lossy(&fsck.stdout)
    );
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /counter"])
        .arg(image)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no counter in {}: {:?}", image.display(), out))
}

#[test]
fn a_consistency_group_freezes_and_cuts_its_devices_at_one_instant() {
    require_root();
    let site = Site::new("db,wal");
    let db = LoopDevice::new(&site.scratch.path, 64 * MIB);
    let wal = LoopDevice::new(&site.scratch.path, 64 * MIB);
    let db_mount = blkmirror_tests::Mount::mkfs_and_mount(&db.path, "ext4", &site.scratch.path);
    let wal_mount = blkmirror_tests::Mount::mkfs_and_mount(&wal.path, "ext4", &site.scratch.path);
    let config = agent_config(
        &site,
        "",
        &[
            (&db.path, "db", "consistency_group = \"app\""),
            (&wal.path, "wal", "consistency_group = \"app\""),
        ],
    );
    // An application writing one counter to both disks: first the WAL, then the database,
    // each synced. At any instant, wal == db or wal == db + 1.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let (wal_file, db_file) = (
            wal_mount.target.join("counter"),
            db_mount.target.join("counter"),
        );
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                // Written whole and renamed into place, so a frozen image holds an old or a
                // new counter, never a truncated one.
                for path in [&wal_file, &db_file] {
                    let tmp = path.with_extension("tmp");
                    let mut file = fs::File::create(&tmp).expect("counter");
                    file.write_all(n.to_string().as_bytes()).expect("write");
                    file.sync_all().expect("fsync");
                    fs::rename(&tmp, path).expect("rename");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            n
        })
    };
    let mut agent = ChildGuard(
        blkmirror()
            .args(["agent", "--json", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("agent"),
    );
    // Let a few group cuts happen.
    let data = site.receiver.data_dir.to_str().expect("utf-8").to_owned();
    let points_of = |volume: &str| -> Vec<serde_json::Value> {
        let out = blkmirror()
            .args(["points", volume, "--json", "--data-dir", &data])
            .output()
            .expect("points");
        blkmirror_tests::parse_lines(&String::from_utf8_lossy(&out.stdout))
    };
    let shared: Vec<u64> = poll_running(
        &mut agent,
        120,
        Duration::from_millis(500),
        "3 group cuts",
        || {
            let cuts = |volume: &str| -> Vec<u64> {
                points_of(volume)
                    .iter()
                    .filter_map(|p| p["group_cut"].as_u64())
                    .collect()
            };
            let db_cuts = cuts("db");
            let shared: Vec<u64> = cuts("wal")
                .into_iter()
                .filter(|c| db_cuts.contains(c))
                .collect();
            (shared.len() >= 3).then_some(shared)
        },
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.join().expect("writer");
    blkmirror_tests::signal(agent.0.id(), libc::SIGTERM);
    let mut stderr = String::new();
    agent
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .ok();
    assert!(agent.0.wait().expect("agent").success(), "{stderr}");

    // Every shared group cut restores to one instant of the application on both disks.
    for cut in &shared[shared.len() - 3..] {
        let mut counters = Vec::new();
        for volume in ["db", "wal"] {
            let image = site.scratch.path.join(format!("{volume}-{cut}.img"));
            let out = blkmirror()
                .args(["restore", volume, "--at", &format!("group:{cut}"), "--to"])
                .arg(&image)
                .args(["--data-dir", &data])
                .output()
                .expect("restore");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            counters.push(counter_in(&image));
            fs::remove_file(&image).expect("rm");
        }
        let (db_n, wal_n) = (counters[0], counters[1]);
        assert!(
            wal_n == db_n || wal_n == db_n + 1,
            "group cut {cut}: db at {db_n}, wal at {wal_n}: not one instant"
        );
        assert!(db_n > 0, "the writer had not started at cut {cut}");
    }
    assert!(written > 100, "the writer wrote only {written} counters");
}

/// Waits until the receiver's log contains `text`.
fn wait_log(receiver: &blkmirror_tests::mirror::Receiver, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !receiver.log().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} in the receiver log:\n{}",
            receiver.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_receiver_reloads_its_grants_on_sighup_and_keeps_running_on_a_bad_file() {
    require_root();
    let scratch = blkmirror_tests::Scratch::new();
    let agent_id = blkmirror_tests::mirror::Id::new(&scratch.path, "agent-id");
    let receiver_id = blkmirror_tests::mirror::Id::new(&scratch.path, "receiver-id");
    let data = scratch.path.join("data");
    let config = scratch.path.join("receiver.toml");
    let write_config = |volumes: &str| {
        fs::write(
            &config,
            format!(
                "identity = \"{}\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[agent]]\nfingerprint = \"{}\"\nvolumes = {volumes}\n",
                receiver_id.dir.display(),
                data.display(),
                agent_id.fingerprint
            ),
        )
        .expect("config")
    };
    write_config("[\"one\"]");
    let receiver = blkmirror_tests::mirror::Receiver::start_config(&config, &data, &receiver_id);
    let pins = blkmirror_tests::PinRoot::new();
    let dev = LoopDevice::new(&scratch.path, 32 * MIB);
    write_random(&dev.path, 0, 2 * MIB);
    let state_dir = scratch.path.join("state");
    let agent = blkmirror_tests::mirror::AgentSetup {
        device: &dev.path,
        volume: "two",
        receiver: &receiver,
        id: &agent_id,
        pins: &pins,
        state_dir: &state_dir,
        receiver_fingerprint: None,
        via: None,
    };
    // Not granted yet.
    let (output, _) = agent.once(&[], Duration::from_secs(60));
    assert_eq!(
        output.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Granted by a reload.
    write_config("[\"one\", \"two\"]");
    blkmirror_tests::signal(receiver.pid(), libc::SIGHUP);
    wait_log(&receiver, "configuration reloaded");
    agent.once_ok(&[]);
    assert_same(&dev.path, &receiver.image("two"));

    // A broken file is refused; the running grants stay and the receiver keeps serving.
    fs::write(&config, "identity = 3\n").expect("config");
    blkmirror_tests::signal(receiver.pid(), libc::SIGHUP);
    wait_log(&receiver, "configuration reload refused");
    write_random(&dev.path, 4 * MIB, MIB);
    agent.once_ok(&[]);
    assert_same(&dev.path, &receiver.image("two"));

    let log = fs::read_to_string(data.join("audit.log")).expect("audit");
    let reloads: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"event\":\"config-reload\""))
        .collect();
    assert_eq!(reloads.len(), 2, "{log}");
    assert!(reloads[0].contains("\"outcome\":\"ok\""), "{}", reloads[0]);
    assert!(!reloads[1].contains("\"outcome\":\"ok\""), "{}", reloads[1]);
    assert!(
        log.contains("\"event\":\"refused\""),
        "the first refusal is not audited"
    );
}

#[test]
fn logs_carry_journald_priorities_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt as _;
    let scratch = blkmirror_tests::Scratch::new();
    let id = blkmirror_tests::mirror::Id::new(&scratch.path, "receiver-id");
    let log_path = scratch.path.join("stderr.log");
    let log = fs::File::create(&log_path).expect("log file");
    let meta = log.metadata().expect("stat");
    // What systemd sets when it connects stderr to the journal: DEV:INODE of that stream.
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let fingerprint = "ab".repeat(32);
    let child = blkmirror()
        .args(["receiver", "--listen", "127.0.0.1:0", "--identity"])
        .arg(&id.dir)
        .arg("--data-dir")
        .arg(scratch.path.join("data"))
        .args(["--allow", &format!("{fingerprint}=v")])
        .env("JOURNAL_STREAM", &stream)
        .stderr(log)
        .spawn()
        .expect("receiver");
    let mut child = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("listening on") {
            break text;
        }
        assert!(Instant::now() < deadline, "no listening line: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.0.kill();
    let line = text
        .lines()
        .find(|l| l.contains("listening on"))
        .expect("line");
    assert!(
        line.starts_with("<6>blkmirror receiver: listening on"),
        "{line}"
    );
    // Without the journal, plain lines.
    let plain = blkmirror()
        .args(["receiver", "--listen", "127.0.0.1:0", "--identity"])
        .arg(&id.dir)
        .arg("--data-dir")
        .arg(scratch.path.join("data"))
        .args(["--allow", &format!("{fingerprint}=v")])
        .env("JOURNAL_STREAM", "1:2")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("receiver");
    let mut plain = ChildGuard(plain);
    let mut first = String::new();
    let mut stderr = std::io::BufReader::new(plain.0.stderr.take().expect("stderr"));
    std::io::BufRead::read_line(&mut stderr, &mut first).expect("line");
    let _ = plain.0.kill();
    assert!(
        first.starts_with("blkmirror receiver: listening on"),
        "{first}"
    );
}
