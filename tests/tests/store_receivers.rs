//! Receivers that publish their points to a real distributed object store: the Ceph cluster
//! of `store.rs` (three OSDs, three replicas, a RADOS gateway), a real agent on a loop device
//! with the real eBPF tracker, and `blkmirror receiver --config` with a `[store]` section.
//!
//! What it proves: every point the agent is told is committed is on the store; the store
//! alone restores each point byte for byte, with no receiver and no data directory; a store
//! that goes away refuses the cycle without losing it, and the agent finishes once the store
//! is back; a second receiver on the same store may not write a volume the first one holds.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    time::{Duration, Instant},
};

use blkmirror_tests::{
    LoopDevice, PinRoot, Scratch, blkmirror,
    ceph::{CephCluster, SECRET_KEY},
    mirror::{AgentSetup, ChildGuard, Id, Receiver, assert_same, write_random},
    parse_lines, require_root,
};

const MIB: u64 = 1 << 20;
const VOLUME: &str = "vol";
const BUCKET: &str = "dr-site";

fn run(args: &[&str]) -> Output {
    blkmirror().args(args).output().expect("running blkmirror")
}

fn run_ok(args: &[&str]) -> String {
    let output = run(args);
    assert!(
        output.status.success(),
        "blkmirror {args:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Receiver B keeps only its newest point (retention `all` of one second, no hourly or daily
/// points), in its data directory and in the store, and collects the store's garbage every
/// two seconds with the default grace of an hour (which condemns nothing this young). Its
/// retention runs from its first publish after it takes a volume over (no settle time; E's
/// shows the settle).
const B_RETENTION_AND_GC: &str = "gc_every = \"2s\"\ntakeover_settle = \"0s\"\n\
    [retention]\nall = \"1s\"\nhourly = \"0s\"\ndaily = \"0s\"\n";

/// Receiver E keeps only its newest point too, but its retention waits an hour after it takes
/// a volume's lease: what the previous holder sent may still land.
const E_RETENTION_SETTLING: &str = "takeover_settle = \"1h\"\n\
    [retention]\nall = \"1s\"\nhourly = \"0s\"\ndaily = \"0s\"\n";

/// `blkmirror store gc --config CONFIG --json`, again while a receiver's collection holds the
/// store-wide turn.
fn store_gc(config: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = run(&[
            "store",
            "gc",
            "--config",
            config.to_str().expect("utf-8"),
            "--json",
        ]);
        let said = String::from_utf8_lossy(&output.stderr);
        if output.status.success() {
            return parse_lines(&String::from_utf8_lossy(&output.stdout))
                .pop()
                .expect("a report");
        }
        assert!(
            said.contains("another collection holds") && Instant::now() < deadline,
            "store gc: {said}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Writes a receiver.toml with a `[store]` section (and `extra` after it) and returns its
/// path.
fn receiver_config(
    dir: &Path,
    name: &str,
    id: &Id,
    agent: &Id,
    cluster: &CephCluster,
    credentials: &Path,
    extra: &str,
) -> (PathBuf, PathBuf) {
    let data = dir.join(format!("{name}-data"));
    let config = dir.join(format!("{name}.toml"));
    fs::write(
        &config,
        format!(
            "identity = \"{}\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
             control_socket = \"{}\"\n\
             [[agent]]\nfingerprint = \"{}\"\nvolumes = [\"{VOLUME}\"]\n\
             [store]\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\ncredentials = \"{}\"\n\
             allow_http = true\nlease = \"10s\"\n{extra}",
            id.dir.display(),
            data.display(),
            dir.join(format!("{name}.sock")).display(),
            agent.fingerprint,
            cluster.endpoint,
            credentials.display()
        ),
    )
    .expect("receiver.toml");
    (config, data)
}

/// The points in the store, as `points --from-store --json` lists them.
fn store_points(config: &Path) -> Vec<serde_json::Value> {
    parse_lines(&run_ok(&[
        "points",
        VOLUME,
        "--from-store",
        config.to_str().expect("utf-8"),
        "--json",
    ]))
}

fn restore_from_store(config: &Path, at: &str, to: &Path) -> serde_json::Value {
    let lines = parse_lines(&run_ok(&[
        "restore",
        VOLUME,
        "--from-store",
        config.to_str().expect("utf-8"),
        "--at",
        at,
        "--to",
        to.to_str().expect("utf-8"),
        "--json",
    ]));
    lines
        .into_iter()
        .find(|line| line["event"] == "restored")
        .expect("a restored line")
}

fn wait_for(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < until, "{what} within {deadline:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An agent of `device` as volume [`VOLUME`] to `receiver`.
fn setup<'a>(
    device: &'a Path,
    receiver: &'a Receiver,
    id: &'a Id,
    pins: &'a PinRoot,
    state_dir: &'a Path,
) -> AgentSetup<'a> {
    AgentSetup {
        device,
        volume: VOLUME,
        receiver,
        id,
        pins,
        state_dir,
        receiver_fingerprint: None,
        via: None,
    }
}

/// `agent --once` in the background, its standard error in `log`.
fn spawn_once(agent: &AgentSetup, log: &Path) -> ChildGuard {
    let mut args = agent.args(&[]);
    args.push("--once".to_owned());
    let child: Child = blkmirror()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).expect("agent log"))
        .spawn()
        .expect("spawning the agent");
    ChildGuard(child)
}

/// Waits for an agent of [`spawn_once`] to finish, asserts it succeeded, and returns what it
/// said.
fn wait_ok(mut child: ChildGuard, log: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("agent status") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not finish once the store was back: {}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let said = fs::read_to_string(log).unwrap_or_default();
    assert!(status.success(), "agent: {status}: {said}");
    said
}

fn committed_seq(data: &Path) -> u64 {
    fs::read_to_string(data.join(VOLUME).join("volume.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|meta| meta["committed_seq"].as_u64())
        .unwrap_or(0)
}

#[test]
fn every_acknowledged_point_is_on_the_store_and_restores_from_it_alone() {
    require_root();
    let mut cluster = CephCluster::start();
    eprintln!("Ceph started in {:.1} s", cluster.started_in.as_secs_f64());
    cluster.create_bucket(BUCKET);
    let scratch = Scratch::new();
    let dir = &scratch.path;
    let agent_id = Id::new(dir, "agent-id");
    let a_id = Id::new(dir, "receiver-a-id");
    let b_id = Id::new(dir, "receiver-b-id");
    let c_id = Id::new(dir, "receiver-c-id");

    // The credentials file must be root's alone; config check says so, then reaches the store.
    let credentials = dir.join("store-credentials.toml");
    cluster.write_credentials(&credentials, SECRET_KEY, 0o644);
    let (config_a, data_a) =
        receiver_config(dir, "a", &a_id, &agent_id, &cluster, &credentials, "");
    let check = run(&["config", "check", config_a.to_str().expect("utf-8")]);
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success(), "a readable secret was accepted");
    assert!(said.contains("chmod 600"), "{said}");
    fs::set_permissions(&credentials, fs::Permissions::from_mode(0o600)).expect("chmod");
    let checked = run_ok(&["config", "check", config_a.to_str().expect("utf-8")]);
    assert!(
        checked.contains(&format!("bucket {BUCKET} reachable")),
        "{checked}"
    );
    // A wrong secret is found by the check, not by the first cycle.
    let wrong = dir.join("wrong-credentials.toml");
    cluster.write_credentials(&wrong, "not-the-secret", 0o600);
    let (config_wrong, _) = receiver_config(dir, "wrong", &a_id, &agent_id, &cluster, &wrong, "");
    let check = run(&["config", "check", config_wrong.to_str().expect("utf-8")]);
    assert!(!check.status.success(), "a wrong secret passed the check");
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(said.contains(&format!("bucket {BUCKET}")), "{said}");

    let mut receiver_a = Receiver::start_config(&config_a, &data_a, &a_id);
    let device = LoopDevice::new(dir, 32 * MIB);
    // The last quarter stays zeros: chunks the store records without storing.
    write_random(&device.path, 0, 24 * MIB);
    let pins = PinRoot::new();
    let agent_state = dir.join("agent-state");
    let agent = setup(&device.path, &receiver_a, &agent_id, &pins, &agent_state);
    agent.once_ok(&[]);
    let first_seq = committed_seq(&data_a);
    let first_copy = dir.join("first.img");
    fs::write(
        &first_copy,
        fs::read(&device.path).expect("reading the device"),
    )
    .expect("copying the device");
    let points = store_points(&config_a);
    assert_eq!(points.len(), 1, "{points:?}");
    assert_eq!(points[0]["seq"].as_u64(), Some(first_seq), "{points:?}");
    assert_eq!(points[0]["manifest"], "full", "{points:?}");
    assert!(
        receiver_a.log().contains("published to the object store"),
        "{}",
        receiver_a.log()
    );

    // A cycle costs the store what it changed: a delta of the changed chunks.
    write_random(&device.path, 4 * MIB, MIB);
    write_random(&device.path, 28 * MIB, MIB / 4);
    agent.once_ok(&[]);
    let second_seq = committed_seq(&data_a);
    let points = store_points(&config_a);
    assert_eq!(points.len(), 2, "{points:?}");
    let delta = &points[1];
    assert_eq!(delta["seq"].as_u64(), Some(second_seq), "{points:?}");
    assert_eq!(delta["manifest"], "delta", "{points:?}");
    // At most 48 references of 41 bytes, and the head.
    let manifest_bytes = delta["manifest_bytes"].as_u64().unwrap_or(0);
    assert!(
        (41..=48 * 41 + 1024).contains(&manifest_bytes),
        "1.25 MiB changed, a delta manifest of {manifest_bytes} bytes"
    );

    // The store alone restores both points, byte for byte.
    let latest = dir.join("latest.img");
    let restored = restore_from_store(&config_a, "latest", &latest);
    assert_eq!(restored["seq"].as_u64(), Some(second_seq), "{restored}");
    assert_same(&device.path, &latest);
    let first = dir.join("first-from-store.img");
    restore_from_store(&config_a, &format!("seq:{first_seq}"), &first);
    assert_same(&first_copy, &first);

    // The store is unreachable when an agent comes: it is refused before it sends anything,
    // retries, and finishes once the store is back.
    cluster.stop_gateway();
    write_random(&device.path, 8 * MIB, 2 * MIB);
    let agent_log = dir.join("agent-store-down.log");
    let child = spawn_once(&agent, &agent_log);
    wait_for(
        "the receiver refusing for want of its store",
        Duration::from_secs(120),
        || receiver_a.log().contains(": not published: "),
    );
    assert_eq!(committed_seq(&data_a), second_seq, "a cycle was taken");
    cluster.start_gateway();
    let said = wait_ok(child, &agent_log);
    assert!(
        said.contains("the receiver's object store failed"),
        "{said}"
    );
    let third_seq = committed_seq(&data_a);
    assert!(third_seq > second_seq, "no cycle after the outage");

    // A store node dies: everything from here on runs on the other two OSDs (pools keep
    // three replicas, and take writes with two).
    cluster.kill_osd(2);

    // The store goes away after a cycle is committed on the receiver and before it is
    // published: the cycle is not acknowledged; the agent retries, and once the store is back
    // the receiver publishes it first and welcomes the agent with it.
    receiver_a.kill();
    let hold = dir.join("hold-publish");
    let mut receiver_a = Receiver::start_config_env(
        &config_a,
        &data_a,
        &a_id,
        &[(
            "BLKMIRROR_TEST_PUBLISH_HOLD_FILE",
            hold.to_str().expect("utf-8"),
        )],
    );
    let agent = setup(&device.path, &receiver_a, &agent_id, &pins, &agent_state);
    fs::write(&hold, b"").expect("hold file");
    write_random(&device.path, 12 * MIB, 2 * MIB);
    let agent_log = dir.join("agent-store-gone.log");
    let child = spawn_once(&agent, &agent_log);
    wait_for(
        "a committed cycle held before its publish",
        Duration::from_secs(120),
        || receiver_a.log().contains("holding the publish"),
    );
    let held_seq = committed_seq(&data_a);
    assert!(held_seq > third_seq, "the held cycle is not committed");
    cluster.stop_gateway();
    fs::remove_file(&hold).expect("releasing the hold");
    wait_for(
        "the publish of the committed cycle failing",
        Duration::from_secs(120),
        || receiver_a.log().contains(": not published: "),
    );
    cluster.start_gateway();
    let said = wait_ok(child, &agent_log);
    assert!(
        said.contains("the receiver's object store failed"),
        "{said}"
    );
    let final_seq = committed_seq(&data_a);
    assert!(final_seq >= held_seq, "the held cycle was lost");
    let points = store_points(&config_a);
    assert!(
        points.iter().any(|p| p["seq"].as_u64() == Some(held_seq)),
        "the held cycle is not on the store: {points:?}"
    );
    assert_eq!(
        points.last().and_then(|p| p["seq"].as_u64()),
        Some(final_seq),
        "{points:?}"
    );
    let after_outage = dir.join("after-outage.img");
    restore_from_store(&config_a, "latest", &after_outage);
    assert_same(&device.path, &after_outage);

    // The store loses the pack of a chunk no cycle has changed since the first (20 MiB in).
    // Once the receiver reads the store's indexes again (every few minutes, or here at its
    // restart), the next full manifest stores it again from the replica, which repairs the
    // earlier points too.
    let lost_pack = lose_the_pack_of(&cluster, final_seq, 20 * MIB / 65536);
    eprintln!("deleted pack {lost_pack} from the store");
    receiver_a.kill();
    let mut receiver_a = Receiver::start_config(&config_a, &data_a, &a_id);
    let agent = setup(&device.path, &receiver_a, &agent_id, &pins, &agent_state);
    let mut cycles = 0;
    loop {
        assert!(cycles < 40, "no full manifest after {cycles} cycles");
        // In the zeros at the end of the first sync: no chunk of the lost pack changes.
        write_random(&device.path, 26 * MIB, 64 * 1024);
        agent.once_ok(&[]);
        cycles += 1;
        let points = store_points(&config_a);
        if points.last().is_some_and(|p| p["manifest"] == "full") {
            break;
        }
    }
    let log_a = receiver_a.log();
    assert!(
        log_a.contains("storing them again from the replica"),
        "{log_a}"
    );
    eprintln!("the lost chunks were stored again after {cycles} cycle(s)");
    let repaired = dir.join("repaired.img");
    restore_from_store(&config_a, "latest", &repaired);
    assert_same(&device.path, &repaired);
    // The point before the loss reads again too. (Chunks of the lost pack that later points
    // changed are gone from the earlier points: only those points held them.)
    let before_loss = dir.join("before-loss-repaired.img");
    restore_from_store(&config_a, &format!("seq:{final_seq}"), &before_loss);
    assert_same(&after_outage, &before_loss);
    let status = parse_lines(&run_ok(&[
        "status",
        "--json",
        "--socket",
        dir.join("a.sock").to_str().expect("utf-8"),
    ]));
    let store = &status[0]["store"];
    assert_eq!(store["reachable"], true, "{status:?}");
    assert!(store["published"].as_u64() >= Some(1), "{status:?}");
    // The receiver's memory for the store: its view holds the volume's chunks (56 bytes each
    // at least), and it remembers the map of the point it published.
    let view_chunks = store["view_chunks"].as_u64().unwrap_or(0);
    assert!(view_chunks > 0, "{status:?}");
    assert!(
        store["view_bytes"].as_u64().unwrap_or(0) >= 56 * view_chunks,
        "{status:?}"
    );
    assert!(
        store["remembered_chunks"].as_u64().unwrap_or(0) > 0,
        "{status:?}"
    );

    // Receiver A dies. Its agent, given both receivers, is refused by B while A's lease
    // lasts, then B takes the lease, fetches the volume's newest point from the store, and the
    // agent carries on from it with an ordinary cycle: no full sync.
    let (config_b, data_b) = receiver_config(
        dir,
        "b",
        &b_id,
        &agent_id,
        &cluster,
        &credentials,
        B_RETENTION_AND_GC,
    );
    let receiver_b = Receiver::start_config(&config_b, &data_b, &b_id);
    let before_failover = committed_seq(&data_a);
    receiver_a.kill();
    write_random(&device.path, 16 * MIB, MIB);
    let both = format!("{},{}", receiver_a.addr, receiver_b.addr);
    let both_pins = format!("{},{}", a_id.fingerprint, b_id.fingerprint);
    let failover = AgentSetup {
        receiver_fingerprint: Some(&both_pins),
        via: Some(both),
        ..setup(&device.path, &receiver_a, &agent_id, &pins, &agent_state)
    };
    let (output, lines) = failover.once(&[], Duration::from_secs(240));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "agent: {}: {said}", output.status);
    let b_log = receiver_b.log();
    assert!(
        b_log.contains(&format!(
            "fetched point {before_failover} from the object store"
        )),
        "{b_log}"
    );
    let b_seq = committed_seq(&data_b);
    assert!(b_seq > before_failover, "B committed nothing: {b_log}");
    let kinds: Vec<&str> = lines
        .iter()
        .filter(|line| line["event"] == "committed")
        .filter_map(|line| line["kind"].as_str())
        .collect();
    assert!(
        kinds == ["cycle"] || said.contains(blkmirror_tests::KERNEL_SKIPPED),
        "after the fail-over: {kinds:?}: {said}"
    );
    let points = store_points(&config_b);
    assert_eq!(
        points.last().and_then(|p| p["seq"].as_u64()),
        Some(b_seq),
        "{points:?}"
    );
    let after_failover = dir.join("after-failover.img");
    restore_from_store(&config_b, "latest", &after_failover);
    assert_same(&device.path, &after_failover);

    // Another device under the same volume name, through a third receiver: refused while B's
    // lease lasts, and once it has run out, by the store's record of the volume's source.
    let (config_c, data_c) =
        receiver_config(dir, "c", &c_id, &agent_id, &cluster, &credentials, "");
    let receiver_c = Receiver::start_config(&config_c, &data_c, &c_id);
    let other_device = LoopDevice::new(dir, 8 * MIB);
    write_random(&other_device.path, 0, 8 * MIB);
    let other_pins = PinRoot::new();
    let other_state = dir.join("other-agent-state");
    let other = setup(
        &other_device.path,
        &receiver_c,
        &agent_id,
        &other_pins,
        &other_state,
    );
    let (output, _) = other.once(&[], Duration::from_secs(120));
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(6), "another source: {said}");
    assert!(said.contains("in the object store was made from"), "{said}");
    for (name, log) in [("B", receiver_b.log()), ("C", receiver_c.log())] {
        for line in log.lines().filter(|l| l.contains("object store")) {
            eprintln!("receiver {name}: {line}");
        }
    }
    assert_eq!(committed_seq(&data_c), 0, "receiver C took a cycle");
    assert_eq!(
        store_points(&config_b),
        points,
        "the store's points changed"
    );

    // The grants live in the store: A seeded them with its [[agent]] list, and every
    // receiver enforces the store's. A file that grants the volume to another agent is
    // published; B and C both apply it, and B refuses the agent. Publishing B's own list
    // puts the grant back.
    let other_agent = Id::new(dir, "other-agent-id");
    let grants_file = dir.join("grants.toml");
    fs::write(
        &grants_file,
        fs::read_to_string(&config_b)
            .expect("receiver.toml")
            .replace(&agent_id.fingerprint, &other_agent.fingerprint),
    )
    .expect("grants.toml");
    let grants_path = grants_file.to_str().expect("utf-8");
    let shown = parse_lines(&run_ok(&[
        "store",
        "grants",
        "--config",
        grants_path,
        "--json",
    ]));
    assert_eq!(shown[0]["store"]["version"].as_u64(), Some(1), "{shown:?}");
    assert_eq!(shown[0]["file_matches"], false, "{shown:?}");
    assert_eq!(
        shown[0]["differences"].as_array().map(Vec::len),
        Some(2),
        "{shown:?}"
    );
    let published = parse_lines(&run_ok(&[
        "store",
        "grants",
        "--config",
        grants_path,
        "--publish",
        "--json",
    ]));
    assert_eq!(published[0]["store"]["version"].as_u64(), Some(2));
    let grants_version = |name: &str| {
        let status = parse_lines(&run_ok(&[
            "status",
            "--json",
            "--socket",
            dir.join(format!("{name}.sock")).to_str().expect("utf-8"),
        ]));
        status[0]["store"]["grants_version"].as_u64()
    };
    for name in ["b", "c"] {
        wait_for(
            &format!("receiver {name} applying the store's grants version 2"),
            Duration::from_secs(30),
            || grants_version(name) == Some(2),
        );
    }
    let only_b = setup(&device.path, &receiver_b, &agent_id, &pins, &agent_state);
    let (output, _) = only_b.once(&[], Duration::from_secs(120));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a revoked agent was served: {said}"
    );
    assert!(said.contains("does not admit this agent"), "{said}");
    assert!(
        receiver_b.log().contains("the store's grants changed"),
        "{}",
        receiver_b.log()
    );
    let published = parse_lines(&run_ok(&[
        "store",
        "grants",
        "--config",
        config_b.to_str().expect("utf-8"),
        "--publish",
        "--json",
    ]));
    assert_eq!(published[0]["store"]["version"].as_u64(), Some(3));
    assert_eq!(published[0]["file_matches"], true);
    for name in ["b", "c"] {
        wait_for(
            &format!("receiver {name} applying the store's grants version 3"),
            Duration::from_secs(30),
            || grants_version(name) == Some(3),
        );
    }
    // The record deleted by hand: a receiver puts back the version in force (3, B's list),
    // not an older list it started with.
    delete_store_object(&cluster, blkmirror::dr::grantstore::GRANTS_KEY);
    wait_for(
        "a receiver putting the grants in force back into the store",
        Duration::from_secs(30),
        || {
            let shown = run(&[
                "store",
                "grants",
                "--config",
                config_b.to_str().expect("utf-8"),
                "--json",
            ]);
            shown.status.success() && {
                let shown = parse_lines(&String::from_utf8_lossy(&shown.stdout));
                shown[0]["store"]["version"].as_u64() == Some(3) && shown[0]["file_matches"] == true
            }
        },
    );

    // Retention on the store: B keeps its newest point only, so its first publish dropped
    // every older point from the store (A's default retention had kept them all).
    assert_eq!(points.len(), 1, "{points:?}");
    assert!(
        b_log.contains("older point(s) from the object store"),
        "{b_log}"
    );
    // Another cycle overwrites most of what the first point wrote; its publish drops the
    // point before it.
    write_random(&device.path, 0, 16 * MIB);
    let (output, _) = failover.once(&[], Duration::from_secs(120));
    assert!(
        output.status.success(),
        "agent: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let b_seq = committed_seq(&data_b);
    let points = store_points(&config_b);
    assert_eq!(
        points.iter().map(|p| p["seq"].as_u64()).collect::<Vec<_>>(),
        [Some(b_seq)],
        "{points:?}"
    );
    // The dropped point's name stays taken on Ceph too: a receiver that lost the lease while
    // paused cannot create it when it resumes.
    assert_dropped_point_is_fenced(&cluster, "vol", b_seq - 1);
    // B collects on its own (with an hour's grace: nothing is old enough to condemn yet).
    let b_socket = dir.join("b.sock");
    wait_for(
        "receiver B's first collection",
        Duration::from_secs(30),
        || {
            let status = parse_lines(&run_ok(&[
                "status",
                "--json",
                "--socket",
                b_socket.to_str().expect("utf-8"),
            ]));
            status[0]["store"]["last_gc"].is_object()
        },
    );
    // By hand, with a grace of a second: the first collection repacks the first point's pack
    // (more than half its chunks were overwritten by the points since, all dropped) and
    // condemns what only dropped points used; the second deletes them.
    let (gc_config, _) = receiver_config(
        dir,
        "gc",
        &c_id,
        &agent_id,
        &cluster,
        &credentials,
        "gc_grace = \"1s\"\n",
    );
    let first = store_gc(&gc_config);
    eprintln!("store gc: {first}");
    assert!(first["repacked"].as_u64() >= Some(1), "{first}");
    std::thread::sleep(Duration::from_millis(1_500));
    let second = store_gc(&gc_config);
    eprintln!("store gc again: {second}");
    assert!(second["deleted"].as_u64() >= Some(1), "{second}");
    let dry = parse_lines(&run_ok(&[
        "store",
        "gc",
        "--config",
        gc_config.to_str().expect("utf-8"),
        "--dry-run",
        "--json",
    ]));
    let (before, after) = (
        first["pack_bytes"].as_u64().unwrap_or(0),
        dry[0]["pack_bytes"].as_u64().unwrap_or(u64::MAX),
    );
    eprintln!("packs: {before} bytes before the collections, {after} after");
    assert!(after + 10 * MIB <= before, "{before} -> {after}");
    let after_gc = dir.join("after-gc.img");
    restore_from_store(&config_b, "latest", &after_gc);
    assert_same(&device.path, &after_gc);
    let usage = parse_lines(&run_ok(&[
        "store",
        "usage",
        "--config",
        gc_config.to_str().expect("utf-8"),
        "--json",
    ]));
    eprintln!("store usage: {}", usage[0]);
    assert_eq!(usage[0]["volumes"][0]["newest"].as_u64(), Some(b_seq));
    assert!(
        usage[0]["dedup_ratio"].as_f64() >= Some(1.0),
        "{}",
        usage[0]
    );

    // One audit chain in the store holds the logs of A, B and C, with both grants changes as
    // each receiver applied them; each receiver's own log agrees with its copy there. An
    // entry edited in the store is found (exit 7).
    let store_audit_with = |more: &[&str]| {
        let mut args = vec![
            "store",
            "audit",
            "--config",
            config_b.to_str().expect("utf-8"),
            "--json",
        ];
        args.extend_from_slice(more);
        let output = run(&args);
        assert!(
            output.status.success(),
            "store audit: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        parse_lines(&String::from_utf8_lossy(&output.stdout))
            .pop()
            .expect("a report")
    };
    let store_audit = |log: &Path| store_audit_with(&["--log", log.to_str().expect("utf-8")]);
    wait_for(
        "the grants changes of B and C in the audit chain",
        Duration::from_secs(30),
        || {
            store_audit(&data_b.join("audit.log"))["chain"]["events"]["grants-change"].as_u64()
                >= Some(4)
        },
    );
    let mut receivers_in_chain = Vec::new();
    for data in [&data_a, &data_b, &data_c] {
        let report = store_audit(&data.join("audit.log"));
        let local = &report["local"];
        assert!(local["in_store"].as_u64() >= Some(2), "{report}");
        assert!(local["in_store"].as_u64() <= local["local_entries"].as_u64());
        receivers_in_chain.push(local["chain"].as_str().expect("a chain id").to_owned());
    }
    let report = store_audit(&data_b.join("audit.log"));
    eprintln!("audit chain: {}", report["chain"]);
    let logs = report["chain"]["logs"].as_array().expect("logs");
    for chain in &receivers_in_chain {
        assert!(
            logs.iter().any(|log| log["chain"] == chain.as_str()),
            "{chain} is not in {logs:?}"
        );
    }
    assert!(
        report["chain"]["events"]["commit"].as_u64() >= Some(3),
        "{report}"
    );
    tamper_with_the_first_audit_block(&cluster, |text| {
        text.replacen("\"receiver-start\"", "\"receiver-stopp\"", 1)
    });
    let audit = run(&[
        "store",
        "audit",
        "--config",
        config_b.to_str().expect("utf-8"),
    ]);
    let said = String::from_utf8_lossy(&audit.stderr);
    assert_eq!(audit.status.code(), Some(7), "an edited chain: {said}");
    assert!(
        said.contains("block 1") && said.contains("edited"),
        "{said}"
    );
    tamper_with_the_first_audit_block(&cluster, |text| {
        text.replacen("\"receiver-stopp\"", "\"receiver-start\"", 1)
    });
    let before_segments = store_audit(&data_b.join("audit.log"));
    // Segments on the real store (runs of 2 blocks here, by a test hook; 1,024 otherwise): a
    // check reads them instead of their blocks, so an edit of block 1 under its segment goes
    // unread, and the chain checks as before.
    let segmented = blkmirror()
        .env("BLKMIRROR_TEST_SEGMENT_BLOCKS", "2")
        .args(["store", "audit", "--write-segments", "--config"])
        .arg(&config_b)
        .output()
        .expect("store audit --write-segments");
    let said = String::from_utf8_lossy(&segmented.stderr);
    assert!(segmented.status.success(), "{said}");
    assert!(
        !said.contains("audit chain: 0 new segment"),
        "no segment written: {said}"
    );
    let segments = cluster.with_bucket(BUCKET, async |client| {
        client
            .list(blkmirror::dr::auditchain::SEGMENTS)
            .await
            .expect("listing segments")
            .len()
    });
    let blocks_then = before_segments["chain"]["blocks"].as_u64().expect("blocks");
    assert!(
        segments as u64 >= blocks_then / 2,
        "{segments} segments, {blocks_then} blocks"
    );
    tamper_with_the_first_audit_block(&cluster, |text| {
        text.replacen("\"receiver-start\"", "\"receiver-stopp\"", 1)
    });
    let through_segments = store_audit(&data_b.join("audit.log"));
    assert!(
        through_segments["chain"]["blocks"].as_u64() >= Some(blocks_then),
        "{through_segments}"
    );
    tamper_with_the_first_audit_block(&cluster, |text| {
        text.replacen("\"receiver-stopp\"", "\"receiver-start\"", 1)
    });
    // A checkpoint of the whole chain, for a later check that reads only what came after.
    let checkpoint = dir.join("audit.checkpoint");
    let checkpoint_arg = ["--checkpoint", checkpoint.to_str().expect("utf-8")];
    let first_check = store_audit_with(&checkpoint_arg);
    assert_eq!(first_check["from_block"].as_u64(), Some(1), "{first_check}");
    let checkpoint_blocks = first_check["chain"]["blocks"].as_u64().expect("blocks");

    // A failover at B (term 2) reaches the store: E, a receiver new to the volume, takes
    // the term from there and refuses the old source with the failover's message (no split
    // brain across receivers). A reprotect at B (term 3) lets the source back in, through E.
    let store_term = || {
        cluster
            .get_object(BUCKET, &format!("volumes/{VOLUME}/authority.json"))
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|record| record["term"].as_u64())
    };
    let data_b_path = data_b.to_str().expect("utf-8");
    let promoted = dir.join("promoted.img");
    let out = run(&[
        "failover",
        VOLUME,
        "--to",
        promoted.to_str().expect("utf-8"),
        "--data-dir",
        data_b_path,
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failover: {said}");
    assert!(said.contains("term 2"), "{said}");
    wait_for(
        "B recording term 2 in the store",
        Duration::from_secs(30),
        || store_term() == Some(2),
    );
    let e_id = Id::new(dir, "receiver-e-id");
    let (config_e, data_e) = receiver_config(
        dir,
        "e",
        &e_id,
        &agent_id,
        &cluster,
        &credentials,
        E_RETENTION_SETTLING,
    );
    let points_before_e = store_points(&config_b).len();
    let receiver_e = Receiver::start_config(&config_e, &data_e, &e_id);
    // B's lease on the volume runs out first (10 s after its last session).
    std::thread::sleep(Duration::from_secs(11));
    let only_e = setup(&device.path, &receiver_e, &agent_id, &pins, &agent_state);
    let (output, _) = only_e.once(&[], Duration::from_secs(120));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "E took the old source: {said}");
    assert!(said.contains("was failed over"), "{said}");
    let e_term = fs::read_to_string(data_e.join(VOLUME).join("authority.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|record| record["term"].as_u64());
    assert_eq!(e_term, Some(2), "E did not take the store's term");
    run_ok(&["reprotect", VOLUME, "--data-dir", data_b_path]);
    wait_for(
        "B recording term 3 in the store",
        Duration::from_secs(30),
        || store_term() == Some(3),
    );
    write_random(&device.path, 20 * MIB, MIB);
    let (output, _) = only_e.once(&[], Duration::from_secs(240));
    assert!(
        output.status.success(),
        "after the reprotect: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let e_seq = committed_seq(&data_e);
    let points = store_points(&config_b);
    assert_eq!(
        points.last().and_then(|p| p["seq"].as_u64()),
        Some(e_seq),
        "{points:?}"
    );
    // E's retention would keep its newest point only, but E took the lease within its
    // settle time: it dropped nothing, and said why.
    assert_eq!(points.len(), points_before_e + 1, "{points:?}");
    let e_log = receiver_e.log();
    assert!(
        e_log.contains("retention on the object store waits"),
        "{e_log}"
    );
    let after_reprotect = dir.join("after-reprotect.img");
    restore_from_store(&config_b, "latest", &after_reprotect);
    assert_same(&device.path, &after_reprotect);

    // The check from the checkpoint reads only the blocks since (the failover, the reprotect,
    // E's start and cycles) and comes to the same result as a whole check.
    let whole = store_audit_with(&[]);
    let from_checkpoint = store_audit_with(&checkpoint_arg);
    assert_eq!(
        from_checkpoint["from_block"].as_u64(),
        Some(checkpoint_blocks + 1),
        "{from_checkpoint}"
    );
    assert!(
        from_checkpoint["chain"]["blocks"].as_u64() > Some(checkpoint_blocks),
        "{from_checkpoint}"
    );
    assert!(
        from_checkpoint["chain"]["blocks"].as_u64() >= whole["chain"]["blocks"].as_u64(),
        "{from_checkpoint} {whole}"
    );
    assert!(
        from_checkpoint["chain"]["events"]["failover"].as_u64() >= Some(1),
        "{from_checkpoint}"
    );

    // Every point verifies from the store alone. Then one byte of a pack is damaged, in a
    // chunk the newest point reads: verify and restore find it (exit 7), and the restore
    // leaves no file behind.
    let config_b_path = config_b.to_str().expect("utf-8");
    let verified = parse_lines(&run_ok(&[
        "verify",
        VOLUME,
        "--from-store",
        config_b_path,
        "--at",
        "all",
        "--json",
    ]));
    assert_eq!(
        verified[0]["points"].as_array().map(Vec::len),
        Some(points.len()),
        "{verified:?}"
    );
    cluster.damage_first_chunk_of_newest_point(BUCKET, VOLUME);
    let verify = run(&[
        "verify",
        VOLUME,
        "--from-store",
        config_b_path,
        "--at",
        "all",
    ]);
    let said = String::from_utf8_lossy(&verify.stderr);
    assert_eq!(
        verify.status.code(),
        Some(7),
        "verify of a damaged pack: {said}"
    );
    let damaged = dir.join("damaged.img");
    let restore = run(&[
        "restore",
        VOLUME,
        "--from-store",
        config_b_path,
        "--at",
        "latest",
        "--to",
        damaged.to_str().expect("utf-8"),
    ]);
    let said = String::from_utf8_lossy(&restore.stderr);
    assert_eq!(
        restore.status.code(),
        Some(7),
        "restore of a damaged pack: {said}"
    );
    assert!(
        !damaged.exists(),
        "a damaged restore left {}",
        damaged.display()
    );
    assert!(
        !dir.join("damaged.img.blkmirror-partial").exists(),
        "a damaged restore left its partial file"
    );

    // Encryption at rest: receiver D publishes into a bucket of its own with a key from
    // `store keygen`. `config check` says so, the store restores the device with the key,
    // and without it (or with another) the store is refused with the reason.
    cluster.create_bucket("sealed");
    let key = dir.join("store.key");
    run_ok(&["store", "keygen", "--out", key.to_str().expect("utf-8")]);
    assert_eq!(
        fs::metadata(&key).expect("the key").permissions().mode() & 0o777,
        0o600
    );
    let again = run(&["store", "keygen", "--out", key.to_str().expect("utf-8")]);
    assert!(!again.status.success(), "a key file was overwritten");
    let sealed_config = |name: &str, id: &Id, key_line: &str| {
        let (config, data) = receiver_config(dir, name, id, &agent_id, &cluster, &credentials, "");
        let text = fs::read_to_string(&config).expect("receiver.toml");
        let text = text.replace(
            &format!("bucket = \"{BUCKET}\""),
            &format!("bucket = \"sealed\"\n{key_line}"),
        );
        fs::write(&config, text).expect("receiver.toml");
        (config, data)
    };
    let d_id = Id::new(dir, "receiver-d-id");
    let (config_d, data_d) = sealed_config(
        "d",
        &d_id,
        &format!("encryption_key = \"{}\"", key.display()),
    );
    let checked = run_ok(&["config", "check", config_d.to_str().expect("utf-8")]);
    assert!(
        checked.contains("the first publish makes it an encrypted store"),
        "{checked}"
    );
    let receiver_d = Receiver::start_config(&config_d, &data_d, &d_id);
    let sealed_device = LoopDevice::new(dir, 8 * MIB);
    write_random(&sealed_device.path, 0, 6 * MIB);
    let sealed_pins = PinRoot::new();
    let sealed_state = dir.join("sealed-agent-state");
    setup(
        &sealed_device.path,
        &receiver_d,
        &agent_id,
        &sealed_pins,
        &sealed_state,
    )
    .once_ok(&[]);
    let checked = run_ok(&["config", "check", config_d.to_str().expect("utf-8")]);
    assert!(
        checked.contains("chunks encrypted with this key"),
        "{checked}"
    );
    let sealed_copy = dir.join("sealed.img");
    restore_from_store(&config_d, "latest", &sealed_copy);
    assert_same(&sealed_device.path, &sealed_copy);
    let (no_key, _) = sealed_config("nokey", &d_id, "");
    let other_key = dir.join("other.key");
    run_ok(&[
        "store",
        "keygen",
        "--out",
        other_key.to_str().expect("utf-8"),
    ]);
    let (wrong_key, _) = sealed_config(
        "wrongkey",
        &d_id,
        &format!("encryption_key = \"{}\"", other_key.display()),
    );
    for (config, reason) in [
        (&no_key, "has no encryption_key"),
        (&wrong_key, "is not the key of the store's chunks"),
    ] {
        let listed = run(&[
            "points",
            VOLUME,
            "--from-store",
            config.to_str().expect("utf-8"),
        ]);
        let said = String::from_utf8_lossy(&listed.stderr);
        assert!(!listed.status.success() && said.contains(reason), "{said}");
    }
}

/// Deletes from the store the pack that holds chunk `chunk` of point `seq` of [`VOLUME`] (a
/// fault of the store, or a hand); returns its key.
fn lose_the_pack_of(cluster: &CephCluster, seq: u64, chunk: u64) -> String {
    use blkmirror::dr::{layout, objpoints};
    cluster.with_bucket(BUCKET, async |client| {
        let (map, _) = objpoints::read_point(client, VOLUME, seq)
            .await
            .expect("reading the point");
        let view = objpoints::load_view(client)
            .await
            .expect("the store's view");
        let (pack, _) = view
            .locations
            .get(&map.chunks[&chunk])
            .expect("the chunk is in a pack");
        let key = layout::pack_key(&pack);
        client.delete(&key).await.expect("deleting the pack");
        key
    })
}

/// Deletes object `key` from the test's bucket, as an operator with the store's credentials
/// could.
fn delete_store_object(cluster: &CephCluster, key: &str) {
    cluster.with_bucket(BUCKET, async |client| {
        client.delete(key).await.expect("deleting from the store")
    });
}

/// Point `seq` of `volume` was dropped by retention: its manifest is a tombstone, and a late
/// conditional create of it (by a writer deposed while paused) is refused.
fn assert_dropped_point_is_fenced(cluster: &CephCluster, volume: &str, seq: u64) {
    use blkmirror::dr::{layout, objstore::Created};
    cluster.with_bucket(BUCKET, async |client| {
        let key = layout::manifest_key(volume, seq);
        let (bytes, _) = client
            .get(&key, 4096)
            .await
            .expect("reading the dropped point's manifest")
            .expect("a tombstone where the dropped point was");
        assert_eq!(bytes, layout::TOMBSTONE, "point {seq} of {volume}");
        let late = client
            .put_if_absent(&key, b"a deposed writer's manifest".to_vec())
            .await
            .expect("the late create");
        assert_eq!(late, Created::AlreadyExists, "point {seq} of {volume}");
    });
}

/// Rewrites block 1 of the store's audit chain with `edit`.
fn tamper_with_the_first_audit_block(cluster: &CephCluster, edit: impl Fn(&str) -> String) {
    use blkmirror::dr::auditchain;
    cluster.with_bucket(BUCKET, async |client| {
        let key = auditchain::block_key(1);
        let (bytes, _) = client
            .get(&key, auditchain::MAX_BLOCK_BYTES)
            .await
            .expect("block 1")
            .expect("block 1 exists");
        let text = String::from_utf8(bytes).expect("text");
        let edited = edit(&text);
        assert_ne!(edited, text, "nothing to edit");
        client
            .put(&key, edited.into_bytes())
            .await
            .expect("rewriting block 1");
    });
}

/// Random content, fast: xorshift64 words.
fn random_chunk(seed: u64, bytes: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(bytes);
    while out.len() < bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(bytes);
    out
}

/// `cargo xtask bench store`: a restore from the store against the store's own bulk read,
/// measured in the same run. A volume of `BLKMIRROR_BENCH_STORE_MIB` MiB (256 by default) of
/// random 64 KiB chunks is committed to the Ceph cluster as a receiver publishes it; then, in
/// alternating rounds, every pack object is read whole with 16 reads in flight (the baseline:
/// what the store delivers to one client) and `blkmirror restore --from-store` writes the
/// point to a file on tmpfs (so no disk is in the way). The restored file must equal the
/// volume.
#[test]
#[ignore = "a benchmark: cargo xtask bench store"]
fn bench_restore_from_the_store_against_its_bulk_read() {
    use blkmirror::dr::{
        layout::ChunkMap,
        objpoints::{self, ManifestToCreate, PackSettings, Upload},
        objstore::ObjectStoreClient,
    };
    use std::collections::BTreeMap;
    require_root();
    let mib: u64 = std::env::var("BLKMIRROR_BENCH_STORE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let rounds: u32 = std::env::var("BLKMIRROR_BENCH_STORE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let cluster = CephCluster::start();
    cluster.create_bucket(BUCKET);
    let scratch = Scratch::new();
    let store = cluster.store_config(BUCKET);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let client = ObjectStoreClient::connect(&store).expect("client");
    let chunk = 64 * 1024u64;
    let chunks = mib * MIB / chunk;
    let hasher_seed = 7;
    let mut expected = blake3::Hasher::new();
    let committed = Instant::now();
    let packs = runtime.block_on(async {
        let mut view = objpoints::load_view(&client).await.expect("view");
        let mut upload = Upload::default();
        let settings = PackSettings {
            level: None,
            ..PackSettings::default()
        };
        for first in (0..chunks).step_by(1024) {
            let batch: BTreeMap<u64, Vec<u8>> = (first..(first + 1024).min(chunks))
                .map(|c| (c, random_chunk(hasher_seed + c, chunk as usize)))
                .collect();
            for content in batch.values() {
                expected.update(content);
            }
            objpoints::upload_changes(&client, &mut view, &batch, settings, &mut upload)
                .await
                .expect("upload");
        }
        let point = blkmirror_protocol::wire::PointInfo {
            seq: 1,
            complete: true,
            consistent: true,
            time_unix_ms: 1_700_000_000_000,
            ..Default::default()
        };
        objpoints::create_manifest(
            &client,
            &view,
            ChunkMap::default(),
            ManifestToCreate {
                volume: VOLUME,
                size_bytes: mib * MIB,
                chunk_bytes: chunk,
                point,
            },
            upload,
            settings,
        )
        .await
        .expect("manifest");
        client.list("packs").await.expect("packs")
    });
    let pack_bytes: u64 = packs.iter().map(|(_, size, _)| size).sum();
    eprintln!(
        "committed {mib} MiB as {} pack(s), {} bytes, in {:.1} s",
        packs.len(),
        pack_bytes,
        committed.elapsed().as_secs_f64()
    );
    let credentials = scratch.path.join("credentials.toml");
    cluster.write_credentials(&credentials, SECRET_KEY, 0o600);
    let id = Id::new(&scratch.path, "receiver-id");
    let (config, _) = receiver_config(&scratch.path, "r", &id, &id, &cluster, &credentials, "");
    let target = PathBuf::from(format!(
        "/dev/shm/blkmirror-bench-{}.img",
        std::process::id()
    ));
    let mut bulk = Vec::new();
    let mut restore = Vec::new();
    for round in 0..rounds {
        let started = Instant::now();
        let read: u64 = runtime.block_on(async {
            let mut total = 0;
            let mut keys = packs.iter().map(|(key, _, _)| key.clone());
            let mut in_flight = tokio::task::JoinSet::new();
            loop {
                while in_flight.len() < 16 {
                    let Some(key) = keys.next() else { break };
                    let client = client.clone();
                    in_flight.spawn(async move { client.get(&key, 1 << 30).await });
                }
                let Some(done) = in_flight.join_next().await else {
                    break;
                };
                let (bytes, _) = done.expect("task").expect("get").expect("a pack");
                total += bytes.len() as u64;
            }
            total
        });
        let bulk_rate = read as f64 / started.elapsed().as_secs_f64();
        let _ = fs::remove_file(&target);
        let restored = restore_from_store(&config, "latest", &target);
        let seconds = restored["duration_ms"].as_u64().expect("duration") as f64 / 1000.0;
        let restore_rate = (mib * MIB) as f64 / seconds;
        eprintln!(
            "round {round}: store bulk read {:.1} MB/s ({read} bytes), restore {:.1} MB/s \
             ({} ranged reads; setup {} ms, reads {} ms), ratio {:.2}",
            bulk_rate / 1e6,
            restore_rate / 1e6,
            restored["requests"],
            restored["setup_ms"],
            restored["read_ms"],
            restore_rate / bulk_rate
        );
        bulk.push(bulk_rate);
        restore.push(restore_rate);
    }
    let mut content = blake3::Hasher::new();
    content.update(&fs::read(&target).expect("restored file"));
    let _ = fs::remove_file(&target);
    assert_eq!(content.finalize(), expected.finalize(), "restored content");
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    // Each round's pair was measured back to back: the median of their ratios is the figure
    // (the store's own rate wanders between rounds on a shared machine).
    let mut ratios: Vec<f64> = restore.iter().zip(&bulk).map(|(r, b)| r / b).collect();
    let (bulk, restore) = (median(&mut bulk), median(&mut restore));
    eprintln!(
        "median of {rounds}: store bulk read {:.1} MB/s, restore from the store {:.1} MB/s; \
         median ratio of the rounds {:.2} (goal 0.8)",
        bulk / 1e6,
        restore / 1e6,
        median(&mut ratios)
    );
}
