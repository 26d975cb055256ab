//! Replication end to end, as root: the real eBPF tracker on loop devices, the real `blkmirror`
//! agent and receiver over QUIC on 127.0.0.1, real file systems.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use blkmirror::{
    link::identity::{Fingerprint, Identity},
    link::net,
};
use blkmirror_protocol::wire::{
    self, AgentMessage, Begin, Codec, DataFrame, Hello, PROTOCOL_VERSION, ReceiverMessage,
};
use blkmirror_tests::{
    LoopDevice, Mount, PinRoot, Scratch,
    mirror::{
        AgentSetup, ChildGuard, Id, Receiver, Site, ThawOnDrop, Workload, assert_same, committed,
        digest, fsck_clean, guard_running, is_frozen, last_point, write_random,
    },
    require_root, signal,
};

const MIB: u64 = 1 << 20;

fn mirror_filesystem(fstype: &str, size: u64) {
    require_root();
    // The replica is compared with the device after incremental cycles only, so no other test
    // of this binary may attach or detach a tracker meanwhile: on Linux 6.18 that makes the
    // kernel skip this tracker for a completion, and a completion in several parts can mask
    // the skip from the statistics cross-check (ARCHITECTURE.md). Seen once in a CI
    // rehearsal on 2026-12-06: the ext4 replica differed at 19 MiB after the unmount's cycle.
    let _quiet = blkmirror_tests::QuietHooks::take();
    let site = Site::new("fs");
    let dev = LoopDevice::new(&site.scratch.path, size);
    let mount = Mount::mkfs_and_mount(&dev.path, fstype, &site.scratch.path);
    let agent = site.setup(&dev.path, "fs");
    let mut workload = Workload::start(&mount.target);
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        let lines = agent.once_ok(&[]);
        let point = last_point(&lines);
        assert_eq!(
            point["consistent"], true,
            "a point of a mounted file system must be frozen: {point}"
        );
        assert!(
            point["freeze_ms"].as_u64().expect("freeze_ms") < 2000,
            "{point}"
        );
        // The receiver is idle now: the image is exactly this point.
        fsck_clean(
            &site.receiver.image("fs"),
            fstype,
            &site.scratch.path,
            &format!("round-{round}"),
        );
    }
    let files = workload.stop();
    assert!(files > 10, "the workload wrote only {files} files");
    mount.unmount();
    let lines = agent.once_ok(&[]);
    assert_eq!(
        last_point(&lines)["consistent"],
        false,
        "no mount, no freeze"
    );
    assert_same(&dev.path, &site.receiver.image("fs"));
}

#[test]
fn ext4_replica_equals_device_and_mid_workload_points_pass_e2fsck() {
    mirror_filesystem("ext4", 256 * MIB);
}

#[test]
fn xfs_replica_equals_device_and_mid_workload_points_pass_xfs_repair() {
    mirror_filesystem("xfs", 512 * MIB);
}

#[test]
fn receiver_killed_at_any_instant_restarts_at_a_committed_point() {
    require_root();
    let mut site = Site::new("raw");
    let dev = LoopDevice::new(&site.scratch.path, 96 * MIB);
    write_random(&dev.path, 0, 8 * MIB);
    site.setup(&dev.path, "raw").once_ok(&[]);
    // How long one undisturbed cycle of this size takes here: the kills are spread over it, so
    // they land while journaling, while committing and while applying.
    write_random(&dev.path, 0, 40 * MIB);
    let timed = Instant::now();
    site.setup(&dev.path, "raw")
        .once_ok(&["--compression", "off"]);
    let cycle = timed.elapsed();
    let mut previous = digest(&dev.path);
    let (mut before, mut after) = (0, 0);
    for (round, fraction) in [0.3, 0.6, 0.8, 0.9, 0.97, 1.02].into_iter().enumerate() {
        let round = round as u64;
        write_random(&dev.path, (round % 3) * 24 * MIB, 40 * MIB);
        let next = digest(&dev.path);
        let round_started = Instant::now();
        let setup = site.setup(&dev.path, "raw");
        if round % 2 == 1 {
            // Tracking lost: this cycle is a verify sync of a replica that is at a point, which
            // must be just as atomic.
            let mut untrack = blkmirror_tests::blkmirror();
            untrack.arg("untrack").arg(&dev.path);
            untrack.args(blkmirror_tests::state_args(
                &site.pins,
                &site.scratch.path.join("state"),
            ));
            assert!(untrack.status().expect("untrack").success());
        }
        let mut args = setup.args(&["--once", "--compression", "off"]);
        args.retain(|a| a != "--json");
        // Whatever fails below, the agent must not stay stopped (it holds the loop device).
        let mut agent = ChildGuard(
            blkmirror_tests::blkmirror()
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("agent"),
        );
        std::thread::sleep(cycle.mul_f64(fraction));
        site.receiver.kill();
        signal(agent.0.id(), libc::SIGSTOP);
        site.receiver.restart();
        let image = digest(&site.receiver.image("raw"));
        if image != previous && image != next {
            signal(agent.0.id(), libc::SIGCONT);
            let _ = agent.0.kill();
            let _ = agent.0.wait();
            let mut stderr = String::new();
            if let Some(mut pipe) = agent.0.stderr.take() {
                use std::io::Read as _;
                let _ = pipe.read_to_string(&mut stderr);
            }
            panic!(
                "round {round}: after a SIGKILL the image is neither the previous point nor the \
                 new one; receiver: {}\nagent: {stderr}",
                site.receiver.log()
            );
        }
        if image == previous {
            before += 1;
        } else {
            after += 1;
        }
        signal(agent.0.id(), libc::SIGCONT);
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = agent.0.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "the agent did not finish");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = agent.0.stderr.take() {
            use std::io::Read as _;
            let _ = pipe.read_to_string(&mut stderr);
        }
        eprintln!("round {round} took {:?}", round_started.elapsed());
        assert!(
            status.success(),
            "round {round}: agent failed: {status}: {stderr}"
        );
        assert_eq!(
            digest(&site.receiver.image("raw")),
            next,
            "round {round}: the next cycle must complete"
        );
        previous = next;
    }
    eprintln!(
        "receiver kills ({cycle:?} per cycle): {before} left the previous point, {after} the new one"
    );
}

#[test]
fn agent_killed_mid_cycle_resends_only_what_was_not_committed() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let site = Site::new("raw");
    let dev = LoopDevice::new(&site.scratch.path, 64 * MIB);
    let agent = site.setup(&dev.path, "raw");
    agent.once_ok(&[]);
    // A: committed.
    write_random(&dev.path, 0, 8 * MIB);
    let lines = agent.once_ok(&["--compression", "off"]);
    assert_eq!(last_point(&lines)["read_bytes"], 8 * MIB);
    // B: the agent is killed while sending it (capped at 2 MiB/s, it needs ~8 s).
    write_random(&dev.path, 32 * MIB, 16 * MIB);
    let mut slow = agent.spawn(&[
        "--max-rate",
        "2MiB",
        "--compression",
        "off",
        "--interval",
        "1h",
    ]);
    std::thread::sleep(Duration::from_millis(2500));
    slow.kill().expect("kill");
    let output = slow.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        !text.contains("\"kind\":\"cycle\""),
        "the slow cycle was not supposed to finish: {text}"
    );
    // The restart sends B, and not A again; what the receiver had journaled of B before the
    // kill is not sent again either (the restarted agent resumes the cycle).
    let lines = agent.once_ok(&["--compression", "off"]);
    let cycle = last_point(&lines);
    let read = cycle["read_bytes"].as_u64().expect("read_bytes");
    let resumed = cycle["resumed_bytes"].as_u64().expect("resumed_bytes");
    assert!(
        (16 * MIB..=16 * MIB + MIB).contains(&(read + resumed)),
        "after the restart the agent read {read} bytes and resumed {resumed} that the \
         receiver had kept; B is 16 MiB and A (8 MiB) was committed"
    );
    assert_same(&dev.path, &site.receiver.image("raw"));
}

#[test]
fn verify_resync_after_losing_the_pins_moves_about_what_changed() {
    require_root();
    let site = Site::new("raw");
    let dev = LoopDevice::new(&site.scratch.path, 128 * MIB);
    write_random(&dev.path, 0, 128 * MIB);
    let agent = site.setup(&dev.path, "raw");
    agent.once_ok(&["--compression", "off"]);
    assert_same(&dev.path, &site.receiver.image("raw"));
    // Tracking is lost (as after a reboot), then ~1% of the device changes unseen.
    let mut untrack = blkmirror_tests::blkmirror();
    untrack.arg("untrack").arg(&dev.path);
    untrack.args(blkmirror_tests::state_args(
        &site.pins,
        &site.scratch.path.join("state"),
    ));
    assert!(untrack.status().expect("untrack").success());
    let changed = 20 * 65536;
    for i in 0..20 {
        write_random(&dev.path, (i * 97 + 5) % 2000 * 65536, 65536);
    }
    let lines = agent.once_ok(&["--compression", "off"]);
    let sent: u64 = committed(&lines)
        .iter()
        .map(|l| l["sent_bytes"].as_u64().expect("sent_bytes"))
        .sum();
    assert!(
        (changed..=3 * changed).contains(&sent),
        "verify sync sent {sent} bytes for {changed} changed (128 MiB device)"
    );
    assert_same(&dev.path, &site.receiver.image("raw"));
}

#[test]
fn unknown_agents_wrong_receivers_and_other_volumes_are_refused() {
    require_root();
    let site = Site::new("vol-a");
    let dev = LoopDevice::new(&site.scratch.path, 16 * MIB);
    let stranger = Id::new(&site.scratch.path, "stranger");
    let expect_refusal = |setup: &AgentSetup<'_>, words: &str| {
        let (output, _) = setup.once(&[], Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(6), "{stderr}");
        assert!(stderr.contains(words), "expected {words:?} in: {stderr}");
    };
    let mut as_stranger = site.setup(&dev.path, "vol-a");
    as_stranger.id = &stranger;
    expect_refusal(&as_stranger, "handshake");
    assert!(
        site.receiver.log().contains("refused connection"),
        "{}",
        site.receiver.log()
    );
    expect_refusal(&site.setup(&dev.path, "vol-b"), "not granted");
    assert!(!site.receiver.data_dir.join("vol-b").exists());
    // Both refusals reach the audit log: the stranger's at the handshake, the grant by volume.
    // (The receiver appends after the refused agent has gone, so give it a moment.)
    let audit_path = site.receiver.data_dir.join("audit.log");
    let refusals_audited = |audit: &str| {
        let refused: Vec<&str> = audit
            .lines()
            .filter(|l| l.contains("\"event\":\"refused\""))
            .collect();
        refused
            .iter()
            .any(|l| l.contains("\"stage\":\"handshake\""))
            && refused
                .iter()
                .any(|l| l.contains("\"volume\":\"vol-b\"") && l.contains("not granted"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let audit = std::fs::read_to_string(&audit_path).unwrap_or_default();
        if refusals_audited(&audit) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "refusals missing from the audit log:\n{audit}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The agent pins the receiver: another receiver fingerprint is refused by the agent.
    let wrong = Receiver::start(
        &site.scratch.path.join("data2"),
        &stranger,
        &[format!("{}=vol-a", site.agent.fingerprint)],
        0,
    );
    let mut to_wrong = site.setup(&dev.path, "vol-a");
    to_wrong.receiver = &wrong;
    to_wrong.receiver_fingerprint = Some(&site.receiver.fingerprint);
    expect_refusal(&to_wrong, "handshake");
    site.setup(&dev.path, "vol-a").once_ok(&[]);
}

#[test]
fn a_device_other_than_the_replicas_source_is_refused() {
    require_root();
    let site = Site::new("vol");
    let one = LoopDevice::new(&site.scratch.path, 16 * MIB);
    let two = LoopDevice::new(&site.scratch.path, 16 * MIB);
    site.setup(&one.path, "vol").once_ok(&[]);
    let (output, _) = site
        .setup(&two.path, "vol")
        .once(&[], Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");
    // With a fresh agent state, the receiver refuses it too.
    let mut fresh = site.setup(&two.path, "vol");
    fresh.state_dir = site.scratch.path.join("state-2").leak();
    let (output, _) = fresh.once(&[], Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("was made from"), "{stderr}");
}

#[test]
fn full_receiver_refuses_the_cycle_and_keeps_its_point() {
    // An incremental cycle is what this asserts: a hook missed under another test's attach
    // would turn it into a verify sync (the case below).
    let _quiet = blkmirror_tests::QuietHooks::take();
    full_receiver_refuses(false);
}

#[test]
fn full_receiver_refuses_a_verify_sync_and_keeps_its_point() {
    full_receiver_refuses(true);
}

/// A receiver on a 200 MiB file system is sent 120 MiB of changes, by an incremental cycle or
/// (tracking lost first) by a verify sync: `--once` must exit 1 naming the full disk, and the
/// replica must stay at its point.
fn full_receiver_refuses(lose_tracking: bool) {
    require_root();
    let scratch = Scratch::new();
    let small = LoopDevice::new(&scratch.path, 200 * MIB);
    let data = Mount::mkfs_and_mount(&small.path, "ext4", &scratch.path);
    let agent_id = Id::new(&scratch.path, "a");
    let receiver_id = Id::new(&scratch.path, "r");
    let receiver = Receiver::start(
        &data.target.join("data"),
        &receiver_id,
        &[format!("{}=vol", agent_id.fingerprint)],
        0,
    );
    let pins = PinRoot::new();
    let dev = LoopDevice::new(&scratch.path, 256 * MIB);
    write_random(&dev.path, 0, 8 * MIB);
    let setup = AgentSetup {
        device: &dev.path,
        volume: "vol",
        receiver: &receiver,
        id: &agent_id,
        pins: &pins,
        state_dir: scratch.path.join("state").leak(),
        receiver_fingerprint: None,
        via: None,
    };
    setup.once_ok(&["--compression", "off"]);
    let image = digest(&receiver.image("vol"));
    if lose_tracking {
        let mut untrack = blkmirror_tests::blkmirror();
        untrack.arg("untrack").arg(&dev.path);
        untrack.args(blkmirror_tests::state_args(
            &pins,
            &scratch.path.join("state"),
        ));
        assert!(untrack.status().expect("untrack").success());
    }
    write_random(&dev.path, 64 * MIB, 120 * MIB);
    let (output, _) = setup.once(&["--compression", "off"], Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("disk full"), "{stderr}");
    assert_eq!(digest(&receiver.image("vol")), image, "the replica moved");
    assert_eq!(receiver.meta("vol")["committed_seq"], 2);
}

/// A client speaking the protocol by hand, to send what no agent would.
async fn hostile_session(
    receiver: &Receiver,
    id: &Id,
    hello: Hello,
    attack: impl AsyncFnOnce(&quinn::Connection, &mut quinn::SendStream, &mut quinn::RecvStream),
) -> String {
    let (endpoint, connection, mut send, mut recv) = session_by_hand(receiver, id, hello).await;
    attack(&connection, &mut send, &mut recv).await;
    let reason = tokio::time::timeout(Duration::from_secs(20), connection.closed())
        .await
        .expect("the receiver must close a hostile connection");
    endpoint.close(quinn::VarInt::from_u32(0), b"");
    reason.to_string()
}

/// A connection admitted with `hello`: the endpoint, the connection and its control stream.
async fn session_by_hand(
    receiver: &Receiver,
    id: &Id,
    hello: Hello,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let identity = Identity::load(&id.dir).expect("identity");
    let fingerprint = Fingerprint::parse(&receiver.fingerprint).expect("fingerprint");
    let (endpoint, config) = net::client_endpoint(
        &identity,
        &fingerprint.clone().into(),
        8 * MIB,
        net::Congestion::default(),
        net::PathSlot::default(),
    )
    .expect("endpoint");
    let connection = endpoint
        .connect_with(config, receiver.addr.parse().expect("addr"), "blkmirror")
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, mut recv) = connection.open_bi().await.expect("control stream");
    net::write_frame(&mut send, &AgentMessage::Hello(hello))
        .await
        .expect("hello");
    let welcome = net::read_frame::<ReceiverMessage>(&mut recv)
        .await
        .expect("welcome")
        .expect("welcome");
    assert!(
        matches!(welcome, ReceiverMessage::Welcome(_)),
        "{welcome:?}"
    );
    (endpoint, connection, send, recv)
}

/// A 16 MiB device of `site` replicated once as volume `vol`: the device, the `Hello` a
/// session by hand opens the volume with, and the next cycle's number.
fn replicated_for_a_session_by_hand(site: &Site) -> (LoopDevice, Hello, u64) {
    let dev = LoopDevice::new(&site.scratch.path, 16 * MIB);
    write_random(&dev.path, 0, 4 * MIB);
    site.setup(&dev.path, "vol").once_ok(&[]);
    let meta = site.receiver.meta("vol");
    let seq = meta["committed_seq"].as_u64().expect("seq") + 1;
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        volume: "vol".into(),
        source_id: meta["source_id"].as_str().expect("source").to_owned(),
        size_bytes: 16 * MIB,
        chunk_bytes: 65536,
    };
    (dev, hello, seq)
}

/// The agent sends a cycle's first frames right after its `Begin`, without waiting for
/// `Ready`: a frame that reaches the receiver before its `Begin` was read waits for it and
/// lands in the cycle. (The frames of a cycle that no `Begin` opens are refused: see
/// `malformed_frames_are_refused_without_touching_the_image`.)
#[test]
fn a_frame_that_arrives_before_its_begin_waits_for_it_and_is_committed() {
    require_root();
    let site = Site::new("vol");
    let (_dev, hello, seq) = replicated_for_a_session_by_hand(&site);
    let frame = DataFrame::Write {
        seq,
        offset: 8192,
        codec: Codec::Raw,
        raw_len: 4096,
        data: vec![0xee; 4096],
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let committed = runtime.block_on(async {
        let (endpoint, connection, mut send, mut recv) =
            session_by_hand(&site.receiver, &site.agent, hello).await;
        // The frame first; the Begin well after it has arrived.
        send_data(&connection, &wire::encode(&frame)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        begin(&mut send, &mut recv, seq).await;
        net::write_frame(
            &mut send,
            &AgentMessage::Commit {
                frames: 1,
                point: wire::PointInfo {
                    seq,
                    complete: true,
                    synced_to: 16 * MIB,
                    ..wire::PointInfo::default()
                },
            },
        )
        .await
        .expect("commit");
        let reply = tokio::time::timeout(
            Duration::from_secs(20),
            net::read_frame::<ReceiverMessage>(&mut recv),
        )
        .await
        .expect("the receiver answers the commit");
        endpoint.close(quinn::VarInt::from_u32(0), b"");
        reply
    });
    assert!(
        matches!(committed, Ok(Some(ReceiverMessage::Committed { seq: got })) if got == seq),
        "{committed:?}"
    );
    assert_eq!(site.receiver.meta("vol")["committed_seq"], seq);
    let image = std::fs::read(site.receiver.image("vol")).expect("image");
    assert!(image[8192..12288].iter().all(|&byte| byte == 0xee));
}

async fn begin(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, seq: u64) {
    net::write_frame(
        send,
        &AgentMessage::Begin(Begin {
            seq,
            bytes_estimate: 0,
            direct: false,
            from: 0,
        }),
    )
    .await
    .expect("begin");
    let ready = net::read_frame::<ReceiverMessage>(recv)
        .await
        .expect("ready");
    assert!(
        matches!(ready, Some(ReceiverMessage::Ready { .. })),
        "{ready:?}"
    );
}

async fn send_data(connection: &quinn::Connection, bytes: &[u8]) {
    let mut stream = connection.open_uni().await.expect("data stream");
    let _ = stream.write_all(bytes).await;
    let _ = stream.finish();
}

#[test]
fn malformed_frames_are_refused_without_touching_the_image() {
    require_root();
    let site = Site::new("vol");
    let (dev, hello, seq) = replicated_for_a_session_by_hand(&site);
    let before = digest(&site.receiver.image("vol"));
    let write = |offset: u64, seq: u64| DataFrame::Write {
        seq,
        offset,
        codec: Codec::Raw,
        raw_len: 4096,
        data: vec![0xee; 4096],
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut reasons = Vec::new();
    runtime.block_on(async {
        // A length prefix far over the limit.
        reasons.push(
            hostile_session(
                &site.receiver,
                &site.agent,
                hello.clone(),
                async |c, s, r| {
                    begin(s, r, seq).await;
                    send_data(c, &u32::MAX.to_le_bytes()).await;
                },
            )
            .await,
        );
        // A write past the end of the volume (after a valid one, which must not land either).
        reasons.push(
            hostile_session(
                &site.receiver,
                &site.agent,
                hello.clone(),
                async |c, s, r| {
                    begin(s, r, seq).await;
                    let mut bytes = wire::encode(&write(0, seq));
                    bytes.extend(wire::encode(&write(16 * MIB, seq)));
                    send_data(c, &bytes).await;
                    let _ = net::write_frame(
                        s,
                        &AgentMessage::Commit {
                            frames: 2,
                            point: wire::PointInfo::default(),
                        },
                    )
                    .await;
                },
            )
            .await,
        );
        // Bytes that decode to nothing.
        reasons.push(
            hostile_session(
                &site.receiver,
                &site.agent,
                hello.clone(),
                async |c, s, r| {
                    begin(s, r, seq).await;
                    let mut bytes = 7u32.to_le_bytes().to_vec();
                    bytes.extend([0xff; 7]);
                    send_data(c, &bytes).await;
                },
            )
            .await,
        );
        // A frame for another cycle; and data before any Begin.
        reasons.push(
            hostile_session(
                &site.receiver,
                &site.agent,
                hello.clone(),
                async |c, s, r| {
                    begin(s, r, seq).await;
                    send_data(c, &wire::encode(&write(0, seq + 5))).await;
                },
            )
            .await,
        );
        reasons.push(
            hostile_session(
                &site.receiver,
                &site.agent,
                hello.clone(),
                async |c, _, _| {
                    send_data(c, &wire::encode(&write(0, seq))).await;
                },
            )
            .await,
        );
        // Frames of the next cycle, waiting for a Begin that never comes, on more streams
        // than an agent has: the receiver holds 32 at most.
        let flood = hostile_session(
            &site.receiver,
            &site.agent,
            hello.clone(),
            async |c, _, _| {
                for stream in 0..40u64 {
                    send_data(c, &wire::encode(&write(stream * 65536, seq))).await;
                }
            },
        )
        .await;
        assert!(flood.contains("wait for their cycle's Begin"), "{flood}");
        reasons.push(flood);
        // A compressed payload that inflates beyond its declared length.
        reasons.push(
            hostile_session(
                &site.receiver,
                &site.agent,
                hello.clone(),
                async |c, s, r| {
                    begin(s, r, seq).await;
                    let bomb = DataFrame::Write {
                        seq,
                        offset: 0,
                        codec: Codec::Zstd,
                        raw_len: 512,
                        data: zstd_of_zeros(1 << 20),
                    };
                    send_data(c, &wire::encode(&bomb)).await;
                },
            )
            .await,
        );
        // A hash request far over the limit, and a Commit without a cycle.
        reasons.push(
            hostile_session(
                &site.receiver,
                &site.agent,
                hello.clone(),
                async |_, s, _| {
                    let _ = net::write_frame(
                        s,
                        &AgentMessage::HashRequest {
                            first_chunk: 0,
                            count: 1_000_000,
                        },
                    )
                    .await;
                },
            )
            .await,
        );
        reasons.push(
            hostile_session(
                &site.receiver,
                &site.agent,
                hello.clone(),
                async |_, s, _| {
                    let _ = net::write_frame(
                        s,
                        &AgentMessage::Commit {
                            frames: 0,
                            point: wire::PointInfo::default(),
                        },
                    )
                    .await;
                },
            )
            .await,
        );
    });
    for reason in &reasons {
        assert!(
            !reason.contains("timed out"),
            "a hostile connection must be closed by the receiver: {reasons:?}"
        );
    }
    assert_eq!(digest(&site.receiver.image("vol")), before, "{reasons:?}");
    assert_eq!(site.receiver.meta("vol")["committed_seq"], seq - 1);
    // The receiver still serves honest agents.
    write_random(&dev.path, 0, MIB);
    site.setup(&dev.path, "vol").once_ok(&[]);
    assert_same(&dev.path, &site.receiver.image("vol"));
}

fn zstd_of_zeros(len: usize) -> Vec<u8> {
    zstd::bulk::compress(&vec![0u8; len], 1).expect("zstd")
}

#[test]
fn continuous_agent_ships_only_changes_and_stops_cleanly_on_sigterm() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let site = Site::new("raw");
    let dev = LoopDevice::new(&site.scratch.path, 128 * MIB);
    write_random(&dev.path, 0, 16 * MIB);
    let agent = site.setup(&dev.path, "raw");
    let mut child = agent.spawn(&["--interval", "300ms", "--compression", "off"]);
    // The writes below are timed to span several cycles: start them once the initial sync
    // has committed (on a loaded machine it can take seconds, and writes made during it are
    // shipped by the sync, not by cycles).
    let deadline = Instant::now() + Duration::from_secs(120);
    while site
        .receiver
        .data_dir
        .join("raw/volume.json")
        .exists()
        .then(|| site.receiver.meta("raw")["committed_seq"].as_u64())
        .flatten()
        .unwrap_or(0)
        < 1
    {
        assert!(
            Instant::now() < deadline,
            "the initial sync never committed"
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the agent exited during its sync"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut written = 0;
    for i in 0..12 {
        std::thread::sleep(Duration::from_millis(250));
        write_random(&dev.path, (20 + i * 7) * MIB, MIB);
        written += MIB;
    }
    std::thread::sleep(Duration::from_millis(800));
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent ignored SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("output");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = blkmirror_tests::parse_lines(&String::from_utf8_lossy(&output.stdout));
    let points = committed(&lines);
    let syncs = points.iter().filter(|l| l["kind"] == "sync-step").count();
    let cycles: Vec<_> = points.iter().filter(|l| l["kind"] == "cycle").collect();
    assert_eq!(syncs, 1, "only the first cycle may be a sync: {points:?}");
    assert!(cycles.len() >= 4, "too few cycles: {points:?}");
    let read: u64 = cycles
        .iter()
        .map(|l| l["read_bytes"].as_u64().expect("read_bytes"))
        .sum();
    assert!(
        read <= written + 2 * MIB,
        "cycles read {read} bytes for {written} written: {points:?}"
    );
    agent.once_ok(&[]);
    assert_same(&dev.path, &site.receiver.image("raw"));
}

#[test]
fn a_receiver_that_is_down_at_start_is_retried() {
    require_root();
    let mut site = Site::new("raw");
    let dev = LoopDevice::new(&site.scratch.path, 16 * MIB);
    write_random(&dev.path, 0, MIB);
    site.receiver.kill();
    let setup = site.setup(&dev.path, "raw");
    let mut args = setup.args(&["--once"]);
    args.retain(|a| a != "--json");
    let mut agent = ChildGuard(
        blkmirror_tests::blkmirror()
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agent"),
    );
    // Longer than a handshake's timeout (the QUIC idle timeout), so the agent sees the
    // connection fail and goes through its back-off.
    std::thread::sleep(Duration::from_secs(18));
    assert!(
        agent.0.try_wait().expect("wait").is_none(),
        "the agent gave up while the receiver was down"
    );
    site.receiver.restart();
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = agent.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the agent did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = agent.0.stderr.take() {
        use std::io::Read as _;
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("retrying in"), "{stderr}");
    assert_same(&dev.path, &site.receiver.image("raw"));
}

#[test]
fn a_frozen_file_system_is_thawed_when_the_agent_dies_or_overruns_its_budget() {
    require_root();
    let site = Site::new("fs");
    let dev = LoopDevice::new(&site.scratch.path, 128 * MIB);
    let mount = Mount::mkfs_and_mount(&dev.path, "ext4", &site.scratch.path);
    let _thaw = ThawOnDrop(&mount.target);
    let agent = site.setup(&dev.path, "fs");
    agent.once_ok(&[]);

    // SIGKILL while frozen: the guard process sees its pipe close and thaws at once.
    std::fs::write(mount.target.join("a"), b"changed").expect("write");
    let mut args = agent.args(&["--once", "--freeze-budget", "2s"]);
    args.retain(|a| a != "--json");
    let mut child = ChildGuard(
        blkmirror_tests::blkmirror()
            .args(&args)
            .env("BLKMIRROR_TEST_FREEZE_HOLD_MS", "60000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("agent"),
    );
    // The guard process exists exactly while a freeze is armed (probing with FIFREEZE here
    // would race with the agent's own).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !guard_running(&mount.target) {
        assert!(
            Instant::now() < deadline,
            "the agent never froze the file system"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "the agent exited"
    );
    child.0.kill().expect("kill");
    child.0.wait().expect("wait");
    let killed = Instant::now();
    while is_frozen(&mount.target) {
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "the file system stayed frozen after the agent died"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A freeze longer than the budget: the guard thaws, the point is not called consistent.
    std::fs::write(mount.target.join("b"), b"changed").expect("write");
    let (output, lines) = agent.once_env(
        &["--freeze-budget", "1s"],
        &[("BLKMIRROR_TEST_FREEZE_HOLD_MS", "3000")],
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let point = last_point(&lines);
    assert_eq!(point["consistent"], false, "{point} {stderr}");
    assert!(!is_frozen(&mount.target));
    // And a normal cycle afterwards is consistent again.
    std::fs::write(mount.target.join("c"), b"changed").expect("write");
    let lines = agent.once_ok(&[]);
    assert_eq!(last_point(&lines)["consistent"], true);
}

/// Finding 5 of the hardening issue: with the state directory on the protected, mounted file
/// system (`/var/lib/blkmirror` on a protected root disk), the agent wrote its state file while
/// that file system was frozen; the write blocked until the guard thawed it, so every point was
/// fuzzy and the host's writers stalled for seconds in each cycle.
#[test]
fn the_state_directory_on_the_protected_file_system_still_gets_consistent_points() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let site = Site::new("root");
    let dev = LoopDevice::new(&site.scratch.path, 128 * MIB);
    let mount = Mount::mkfs_and_mount(&dev.path, "ext4", &site.scratch.path);
    let _thaw = ThawOnDrop(&mount.target);
    let state = mount.target.join("var/lib/blkmirror");
    std::fs::create_dir_all(&state).expect("state directory");
    let agent = AgentSetup {
        state_dir: &state,
        ..site.setup(&dev.path, "root")
    };
    agent.once_ok(&[]);
    for round in 0..3 {
        std::fs::write(
            mount.target.join(format!("file-{round}")),
            vec![round as u8; 100_000],
        )
        .expect("write");
        let (output, lines) = agent.once(&["--freeze-budget", "2s"], Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        let point = last_point(&lines);
        assert_eq!(point["consistent"], true, "round {round}: {point} {stderr}");
        assert!(
            point["freeze_ms"].as_u64().expect("freeze_ms") < 2000,
            "round {round}: the freeze ran into its budget: {point}"
        );
        assert!(!stderr.contains("guard thawed"), "{stderr}");
    }
    // The state file on the protected file system records the last commit.
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("agent-root.json")).expect("state file"))
            .expect("state json");
    assert_eq!(
        recorded["committed_seq"],
        site.receiver.meta("root")["committed_seq"]
    );
}

/// Finding 2 of the hardening issue, with the real agent: SIGKILL during the initial sync,
/// then run it again. The resume skipped chunks that already matched, so their stored hashes
/// were never updated: `verify --at all` reported thousands of corrupt chunks and `restore`
/// refused a correct image.
#[test]
fn an_initial_sync_killed_half_way_resumes_to_points_that_verify() {
    require_root();
    let site = Site::new("vol");
    let dev = LoopDevice::new(&site.scratch.path, 256 * MIB);
    write_random(&dev.path, 0, 256 * MIB);
    let agent = site.setup(&dev.path, "vol");
    // 16 KiB chunks: a hash window (4096 chunks) of 64 MiB, so the sync has four steps.
    let opts = [
        "--chunk-size",
        "16KiB",
        "--compression",
        "off",
        "--sync-step",
        "64MiB",
    ];
    let mut args = agent.args(&opts);
    args.push("--once".into());
    args.retain(|a| a != "--json");
    let mut child = ChildGuard(
        blkmirror_tests::blkmirror()
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("agent"),
    );
    // Kill it once a step has committed and the next is writing.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let meta = std::fs::read_to_string(site.receiver.data_dir.join("vol/volume.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        if meta.is_some_and(|m| m["committed_seq"].as_u64() >= Some(1) && m["unsettled"] == true) {
            break;
        }
        assert!(Instant::now() < deadline, "the sync never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    child.0.kill().expect("kill");
    child.0.wait().expect("wait");
    agent.once_ok(&opts);
    agent.once_ok(&opts);
    assert_same(&dev.path, &site.receiver.image("vol"));
    let data = site.receiver.data_dir.to_str().expect("utf-8");
    let verify = blkmirror_tests::blkmirror()
        .args(["verify", "vol", "--at", "all", "--data-dir", data])
        .output()
        .expect("verify");
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let restored = site.scratch.path.join("restored.img");
    let restore = blkmirror_tests::blkmirror()
        .args(["restore", "vol", "--at", "latest", "--to"])
        .arg(&restored)
        .args(["--data-dir", data])
        .output()
        .expect("restore");
    assert!(
        restore.status.success(),
        "{}",
        String::from_utf8_lossy(&restore.stderr)
    );
    assert_same(&dev.path, &restored);
}
