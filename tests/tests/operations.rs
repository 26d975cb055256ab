//! Running as an operator would, as root: an agent configured by file with two devices, its
//! control socket (`blkmirror status`) and Prometheus endpoint scraped for real, and the
//! receiver's.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use blkmirror_tests::{
    LoopDevice, blkmirror,
    mirror::{ChildGuard, Site, assert_same, write_random},
    require_root,
};

const MIB: u64 = 1 << 20;

fn scrape(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response");
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    text
}

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
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
    let config = site.scratch.path.join("agent.toml");
    fs::write(
        &config,
        format!(
            r#"
identity = "{identity}"
state_dir = "{state}"
pin_root = "{pins}"
control_socket = "{socket}"
metrics_listen = "127.0.0.1:{metrics}"
[receiver]
address = "{address}"
fingerprint = "{fingerprint}"
[[device]]
path = "{one}"
volume = "one"
interval = "1s"
[[device]]
path = "{two}"
volume = "two"
interval = "1s"
chunk_size = "128KiB"
"#,
            identity = site.agent.dir.display(),
            state = site.scratch.path.join("state").display(),
            pins = site.pins.path.display(),
            socket = socket.display(),
            address = site.receiver.addr,
            fingerprint = site.receiver.fingerprint,
            one = one.path.display(),
            two = two.path.display(),
        ),
    )
    .expect("config");
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
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if socket.exists() {
            let status = status_json(&socket);
            let volumes = status["volumes"].as_array().cloned().unwrap_or_default();
            if volumes.len() == 2
                && volumes
                    .iter()
                    .all(|v| v["state"] == "continuous" && v["last_point"].is_object())
            {
                break status;
            }
        }
        assert!(
            agent.0.try_wait().expect("wait").is_none(),
            "the agent exited"
        );
        assert!(
            Instant::now() < deadline,
            "the volumes never became continuous"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
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
    // The socket is root-only.
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        fs::metadata(&socket).expect("socket").permissions().mode() & 0o777,
        0o600
    );

    // Metrics, scraped from the real endpoints.
    let text = scrape(metrics);
    for needle in [
        "blkmirror_lag_seconds{volume=\"one\"}",
        "blkmirror_lag_seconds{volume=\"two\"}",
        "blkmirror_backlog_bytes{volume=\"one\"}",
        "blkmirror_cycle_duration_seconds_count{volume=\"two\"}",
        "blkmirror_freeze_duration_seconds_sum{volume=\"one\"}",
        "blkmirror_tracking_loss_total{volume=\"one\"}",
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
    let receiver_text = scrape(receiver_metrics);
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
    let dir = std::env::temp_dir().join(format!("blkmirror-badcfg-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("agent.toml");
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
    fs::remove_dir_all(&dir).expect("cleanup");
}
