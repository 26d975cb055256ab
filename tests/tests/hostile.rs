//! A compromised source against the real receiver: real QUIC on 127.0.0.1, a valid and granted
//! identity (what ransomware on the source host holds), and every message in every session
//! state. Whatever it sends, every point committed before it must still restore byte for byte,
//! `verify --at all` must pass, the receiver's memory must stay bounded, and an honest agent
//! must still be served. Also: unauthenticated floods and a revoked agent.
//!
//! No kernel is involved (the "source" is a model of the volume in memory), but the tests run
//! with the others as root, in a scratch directory they remove.

use std::{
    fs,
    net::UdpSocket,
    path::Path,
    process::Output,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use blkmirror::{
    link::identity::{Fingerprint, Identity},
    link::net,
};
use blkmirror_protocol::wire::{
    self, AgentMessage, Begin, Codec, DataFrame, Hello, PROTOCOL_VERSION, PointInfo,
    ReceiverMessage, RefusalCode,
};
use blkmirror_tests::{
    Scratch, blkmirror,
    mirror::{Id, Receiver},
    require_root,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const CHUNK: u64 = 65536;
const VOLUME: &str = "vol";

fn hello() -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        volume: VOLUME.into(),
        source_id: "test:hostile-source".into(),
        size_bytes: SIZE,
        chunk_bytes: CHUNK,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A small deterministic generator (xorshift64*), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A receiver granting `agent` the volume, in a scratch directory.
struct Site {
    scratch: Scratch,
    agent: Id,
    data: std::path::PathBuf,
    receiver: Receiver,
}

impl Site {
    fn new() -> Self {
        let scratch = Scratch::new();
        let agent = Id::new(&scratch.path, "agent-id");
        let receiver_id = Id::new(&scratch.path, "receiver-id");
        let data = scratch.path.join("data");
        let receiver = Receiver::start(
            &data,
            &receiver_id,
            &[format!("{}={VOLUME}", agent.fingerprint)],
            0,
        );
        Self {
            scratch,
            agent,
            data,
            receiver,
        }
    }
}

/// One QUIC connection speaking the protocol by hand.
struct Client {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Client {
    async fn connect(receiver: &Receiver, id: &Id) -> Option<Self> {
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
            .ok()?
            .await
            .ok()?;
        let (send, recv) = connection.open_bi().await.ok()?;
        Some(Self {
            endpoint,
            connection,
            send,
            recv,
        })
    }

    /// Sends `message` and reads one reply (None: closed, refused, or no reply in time).
    async fn request(&mut self, message: &AgentMessage) -> Option<ReceiverMessage> {
        net::write_frame(&mut self.send, message).await.ok()?;
        tokio::time::timeout(
            Duration::from_secs(10),
            net::read_frame::<ReceiverMessage>(&mut self.recv),
        )
        .await
        .ok()?
        .ok()?
    }

    /// Opens journaled cycle `seq`; the receiver must answer `Ready`.
    async fn begin_journaled(&mut self, seq: u64) {
        let ready = self
            .request(&AgentMessage::Begin(Begin {
                seq,
                bytes_estimate: 0,
                direct: false,
                from: 0,
            }))
            .await;
        assert!(
            matches!(ready, Some(ReceiverMessage::Ready { .. })),
            "{ready:?}"
        );
    }

    async fn send_only(&mut self, message: &AgentMessage) {
        let _ = net::write_frame(&mut self.send, message).await;
    }

    async fn data(&self, frames: &[DataFrame]) {
        let Ok(mut stream) = self.connection.open_uni().await else {
            return;
        };
        let mut bytes = Vec::new();
        for frame in frames {
            bytes.extend(wire::encode(frame));
        }
        let _ = stream.write_all(&bytes).await;
        let _ = stream.finish();
    }

    async fn close(self) {
        self.connection.close(quinn::VarInt::from_u32(0), b"");
        self.endpoint.wait_idle().await;
    }

    /// Connects and says `Hello`. The receiver may not have seen the last connection of this
    /// volume end yet (the tests drop theirs without waiting): its refusal is retried for a
    /// while, as an agent retries it.
    async fn greeted(receiver: &Receiver, id: &Id) -> (Self, wire::Welcome) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut client = Client::connect(receiver, id).await.expect("connect");
            let reply = client.request(&AgentMessage::Hello(hello())).await;
            match reply {
                Some(ReceiverMessage::Refused { ref message, .. })
                    if message.contains("in use by another connection")
                        && tokio::time::Instant::now() < deadline =>
                {
                    client.close().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                reply => return (client, Client::welcome(reply)),
            }
        }
    }

    fn welcome(reply: Option<ReceiverMessage>) -> wire::Welcome {
        match reply {
            Some(ReceiverMessage::Welcome(welcome)) => welcome,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }
}

/// Asserts that `reply` is a refusal with `code`.
fn assert_refused(reply: &Option<ReceiverMessage>, code: RefusalCode) {
    assert!(
        matches!(reply, Some(ReceiverMessage::Refused { code: got, .. }) if *got == code),
        "expected a refusal ({code:?}), got {reply:?}"
    );
}

/// An honest cycle: journaled, the given writes, committed as a complete point. Applies the
/// writes to `model` and returns the committed cycle number.
async fn honest_cycle(
    receiver: &Receiver,
    id: &Id,
    writes: &[(u64, u8, u64)],
    model: &mut [u8],
) -> u64 {
    let (mut client, welcome) = Client::greeted(receiver, id).await;
    let seq = welcome.committed_seq + 1;
    client.begin_journaled(seq).await;
    let frames: Vec<DataFrame> = writes
        .iter()
        .map(|&(offset, byte, len)| {
            model[offset as usize..(offset + len) as usize].fill(byte);
            DataFrame::Write {
                seq,
                offset,
                codec: Codec::Raw,
                raw_len: len as u32,
                data: vec![byte; len as usize],
            }
        })
        .collect();
    client.data(&frames).await;
    let committed = client
        .request(&AgentMessage::Commit {
            frames: frames.len() as u64,
            point: PointInfo {
                seq,
                time_unix_ms: now_ms(),
                complete: true,
                consistent: true,
                synced_to: SIZE,
                ..PointInfo::default()
            },
        })
        .await;
    assert!(
        matches!(committed, Some(ReceiverMessage::Committed { seq: got }) if got == seq),
        "{committed:?}\n{}",
        receiver.log()
    );
    client.close().await;
    seq
}

fn run_cli(args: &[&str]) -> Output {
    blkmirror().args(args).output().expect("blkmirror")
}

/// Restores point `seq` to a file and returns its content.
fn restore(data_dir: &Path, scratch: &Path, seq: u64) -> Vec<u8> {
    let to = scratch.join(format!("restore-{seq}.img"));
    let output = run_cli(&[
        "restore",
        VOLUME,
        "--at",
        &format!("seq:{seq}"),
        "--to",
        to.to_str().expect("utf-8"),
        "--force",
        "--data-dir",
        data_dir.to_str().expect("utf-8"),
    ]);
    assert!(
        output.status.success(),
        "restore of point {seq}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let content = fs::read(&to).expect("restored file");
    fs::remove_file(&to).expect("remove");
    content
}

/// The receiver's peak resident memory (VmHWM), in bytes.
fn peak_memory(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// One hostile session: a random sequence of messages and frames, drawn from `rng`.
async fn random_session(receiver: &Receiver, id: &Id, rng: &mut Rng, committed: u64) {
    let Some(mut client) = Client::connect(receiver, id).await else {
        return;
    };
    if rng.below(8) != 0 {
        let mut hello = hello();
        match rng.below(12) {
            0 => hello.source_id = "test:\u{1b}[31mforged\nline".into(),
            1 => hello.size_bytes = SIZE * 2,
            2 => hello.protocol = 2,
            3 => hello.volume = "../etc".into(),
            _ => {}
        }
        client.send_only(&AgentMessage::Hello(hello)).await;
    }
    let seq_near = |rng: &mut Rng| match rng.below(4) {
        0 => rng.next(),
        1 => committed.saturating_sub(rng.below(3)),
        _ => committed + 1 + rng.below(2),
    };
    for _ in 0..rng.below(12) {
        let aligned = |rng: &mut Rng, limit: u64| rng.below(limit / 512 + 2) * 512;
        match rng.below(10) {
            0 => {
                client
                    .send_only(&AgentMessage::Begin(Begin {
                        seq: seq_near(rng),
                        bytes_estimate: rng.next() >> rng.below(64),
                        direct: rng.below(2) == 0,
                        from: rng.next(),
                    }))
                    .await
            }
            1 => {
                client
                    .send_only(&AgentMessage::Commit {
                        frames: rng.below(5),
                        point: PointInfo {
                            seq: seq_near(rng),
                            time_unix_ms: rng.next(),
                            complete: rng.below(2) == 0,
                            consistent: rng.below(2) == 0,
                            synced_to: rng.next(),
                            received_unix_ms: rng.next(),
                            ..PointInfo::default()
                        },
                    })
                    .await
            }
            2 => {
                client
                    .send_only(&AgentMessage::Flush {
                        frames: rng.below(5),
                    })
                    .await
            }
            3 => {
                client
                    .send_only(&AgentMessage::HashRequest {
                        first_chunk: rng.below(400),
                        count: rng.below(6000) as u32,
                    })
                    .await
            }
            4 => client.send_only(&AgentMessage::Hello(hello())).await,
            5 | 6 => {
                let seq = seq_near(rng);
                let frames: Vec<DataFrame> = (0..1 + rng.below(4))
                    .map(|_| {
                        let len = aligned(rng, 2 * MIB).max(512);
                        DataFrame::Write {
                            seq,
                            offset: aligned(rng, SIZE + MIB),
                            codec: if rng.below(4) == 0 {
                                Codec::Zstd
                            } else {
                                Codec::Raw
                            },
                            raw_len: len as u32,
                            data: vec![rng.next() as u8; (len as usize).min(1 << 20)],
                        }
                    })
                    .collect();
                client.data(&frames).await;
            }
            7 => {
                let seq = seq_near(rng);
                let offset = aligned(rng, SIZE);
                client
                    .data(&[DataFrame::Zero {
                        seq,
                        offset,
                        length: if rng.below(2) == 0 {
                            SIZE - offset.min(SIZE)
                        } else {
                            u64::MAX - 511
                        },
                    }])
                    .await
            }
            // A cycle this agent left open (it vanishes mid-session below), or none at all.
            8 => {
                client
                    .send_only(&AgentMessage::Resume { seq: seq_near(rng) })
                    .await
            }
            _ => tokio::time::sleep(Duration::from_millis(rng.below(50))).await,
        }
    }
    // Sometimes wait for what the receiver says, sometimes vanish mid-session.
    if rng.below(2) == 0 {
        let _ = tokio::time::timeout(
            Duration::from_millis(300),
            net::read_frame::<ReceiverMessage>(&mut client.recv),
        )
        .await;
    }
    client.close().await;
}

#[test]
fn a_granted_hostile_agent_cannot_touch_any_committed_point() {
    require_root();
    let Site {
        scratch,
        agent,
        data,
        receiver,
    } = Site::new();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut model = vec![0u8; SIZE as usize];
    let mut points = Vec::new();
    runtime.block_on(async {
        for (round, writes) in [
            vec![(0, 1u8, MIB), (8 * MIB, 2, 512 * 1024)],
            vec![(MIB / 2, 3, MIB), (15 * MIB, 4, MIB)],
            vec![(4 * MIB, 5, 65536), (0, 6, 4096)],
        ]
        .into_iter()
        .enumerate()
        {
            let seq = honest_cycle(&receiver, &agent, &writes, &mut model).await;
            assert_eq!(seq, round as u64 + 1);
            points.push((seq, model.clone()));
        }
    });
    let committed = points.len() as u64;

    runtime.block_on(async {
        // The history wipe of the hardening issue: a direct Begin on a volume with points.
        let (mut client, welcome) = Client::greeted(&receiver, &agent).await;
        assert!(welcome.history);
        let reply = client
            .request(&AgentMessage::Begin(Begin {
                seq: committed + 1,
                bytes_estimate: 0,
                direct: true,
                from: 0,
            }))
            .await;
        assert_refused(&reply, RefusalCode::Forbidden);
        client.close().await;

        // A half-finished cycle: Begin, data, and the agent vanishes.
        let (mut client, _) = Client::greeted(&receiver, &agent).await;
        client
            .request(&AgentMessage::Begin(Begin {
                seq: committed + 1,
                bytes_estimate: 1 << 40,
                direct: false,
                from: 0,
            }))
            .await;
        client
            .data(&[DataFrame::Zero {
                seq: committed + 1,
                offset: 0,
                length: SIZE,
            }])
            .await;
        drop(client);

        // A cycle the agent leaves after one frame has been journaled.
        let (mut client, _) = Client::greeted(&receiver, &agent).await;
        client.begin_journaled(committed + 1).await;
        client
            .data(&[DataFrame::Zero {
                seq: committed + 1,
                offset: 0,
                length: SIZE,
            }])
            .await;
        let flushed = client.request(&AgentMessage::Flush { frames: 1 }).await;
        assert_eq!(flushed, Some(ReceiverMessage::Flushed { frames: 1 }));
        drop(client);

        // The receiver kept that cycle for this agent to resume; a `Resume` of any other
        // cycle is refused, and the refusal abandons the kept cycle.
        let (mut client, welcome) = Client::greeted(&receiver, &agent).await;
        let open = welcome.open_cycle.expect("the interrupted cycle is kept");
        assert_eq!((open.seq, open.frames), (committed + 1, 1));
        assert_eq!(open.journaled, vec![(0, SIZE)]);
        let reply = client
            .request(&AgentMessage::Resume { seq: committed + 5 })
            .await;
        assert_refused(&reply, RefusalCode::Sequence);
        client.close().await;
        let (mut client, welcome) = Client::greeted(&receiver, &agent).await;
        assert_eq!(welcome.open_cycle, None);
        let reply = client
            .request(&AgentMessage::Resume { seq: committed + 1 })
            .await;
        assert_refused(&reply, RefusalCode::Sequence);
        client.close().await;

        // A reconnect storm.
        for _ in 0..30 {
            if let Some(mut client) = Client::connect(&receiver, &agent).await {
                client.send_only(&AgentMessage::Hello(hello())).await;
                drop(client);
            }
        }

        // Random sessions in every state.
        let mut rng = Rng(0x5eed_0b5e_55ed_u64);
        for _ in 0..120 {
            random_session(&receiver, &agent, &mut rng, committed).await;
        }

        // Bad data as a new point is what a compromised source can do: a whole-volume Zero
        // and overlapping writes, committed as point 4 with a time far in the future.
        let (mut client, welcome) = Client::greeted(&receiver, &agent).await;
        let seq = welcome.committed_seq + 1;
        client.begin_journaled(seq).await;
        let frames = [
            DataFrame::Zero {
                seq,
                offset: 0,
                length: SIZE,
            },
            DataFrame::Write {
                seq,
                offset: 0,
                codec: Codec::Raw,
                raw_len: 8192,
                data: vec![0x66; 8192],
            },
        ];
        client.data(&frames[..1]).await;
        client.request(&AgentMessage::Flush { frames: 1 }).await;
        client.data(&frames[1..]).await;
        let reply = client
            .request(&AgentMessage::Commit {
                frames: 2,
                point: PointInfo {
                    seq,
                    time_unix_ms: u64::MAX / 4,
                    complete: true,
                    ..PointInfo::default()
                },
            })
            .await;
        assert!(
            matches!(reply, Some(ReceiverMessage::Committed { .. })),
            "{reply:?}"
        );
        client.close().await;
    });

    // Every point that existed before the attack restores byte for byte.
    for (seq, content) in &points {
        assert!(
            restore(&data, &scratch.path, *seq) == *content,
            "point {seq} changed under the hostile agent"
        );
    }
    let verify = run_cli(&[
        "verify",
        VOLUME,
        "--at",
        "all",
        "--data-dir",
        data.to_str().expect("utf-8"),
    ]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let listing = run_cli(&[
        "points",
        VOLUME,
        "--json",
        "--data-dir",
        data.to_str().expect("utf-8"),
    ]);
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("\"seq\":4"), "{listing}");
    // The future time stamp was held at the receiver's clock.
    let meta = receiver.meta(VOLUME);
    let last = &meta["points"]
        .as_array()
        .expect("points")
        .last()
        .cloned()
        .expect("point");
    assert!(
        last["time_unix_ms"].as_u64().expect("time") <= now_ms(),
        "{last}"
    );
    // No control character reached the log.
    assert!(
        !receiver.log().contains('\u{1b}'),
        "an escape reached the log"
    );
    // Memory stayed bounded.
    let peak = peak_memory(receiver.pid());
    eprintln!(
        "receiver peak memory under the hostile agent: {} MiB",
        peak >> 20
    );
    assert!(peak < 512 * MIB, "receiver peak memory {} MiB", peak >> 20);
    // And an honest agent is still served.
    runtime.block_on(async {
        let mut model = points.last().expect("points").1.clone();
        model.fill(0);
        model[..8192].fill(0x66);
        honest_cycle(&receiver, &agent, &[(MIB, 9, 4096)], &mut model).await;
    });
    let audit = fs::read_to_string(data.join("audit.log")).expect("audit");
    assert!(
        audit.contains("Forbidden"),
        "the refused direct Begin is not audited"
    );
}

/// A restarted receiver keeps an interrupted cycle for the agent that began it only: another
/// agent granted the same volume (a compromised host that holds the volume's grant, or a
/// second source misconfigured onto it) is not told of it, cannot resume it, and its
/// connection abandons it. Nothing of it reaches a point.
#[test]
fn a_cycle_kept_over_a_receiver_restart_is_resumed_by_its_own_agent_only() {
    require_root();
    let scratch = Scratch::new();
    let honest = Id::new(&scratch.path, "honest-id");
    let hostile = Id::new(&scratch.path, "hostile-id");
    let receiver_id = Id::new(&scratch.path, "receiver-id");
    let data = scratch.path.join("data");
    let mut receiver = Receiver::start(
        &data,
        &receiver_id,
        &[
            format!("{}={VOLUME}", honest.fingerprint),
            format!("{}={VOLUME}", hostile.fingerprint),
        ],
        0,
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut model = vec![0u8; SIZE as usize];
    let committed = runtime.block_on(honest_cycle(&receiver, &honest, &[(0, 1, MIB)], &mut model));
    let point = model.clone();
    // The honest agent journals two frames of the next cycle (a Flush makes them reach the
    // journal file), then the receiver is killed.
    let seq = committed + 1;
    runtime.block_on(async {
        let (mut client, _) = Client::greeted(&receiver, &honest).await;
        client.begin_journaled(seq).await;
        let frames: Vec<DataFrame> = [(2 * MIB, 7u8), (4 * MIB, 8)]
            .into_iter()
            .map(|(offset, byte)| DataFrame::Write {
                seq,
                offset,
                codec: Codec::Raw,
                raw_len: CHUNK as u32,
                data: vec![byte; CHUNK as usize],
            })
            .collect();
        client.data(&frames).await;
        let flushed = client.request(&AgentMessage::Flush { frames: 2 }).await;
        assert!(
            matches!(flushed, Some(ReceiverMessage::Flushed { frames: 2 })),
            "{flushed:?}"
        );
        drop(client);
    });
    receiver.restart();
    assert!(
        receiver.log().contains(&format!(
            "kept uncommitted cycle {seq} (2 journaled frames)"
        )),
        "{}",
        receiver.log()
    );
    runtime.block_on(async {
        // Its own agent is told of the kept cycle...
        let (client, welcome) = Client::greeted(&receiver, &honest).await;
        let open = welcome
            .open_cycle
            .expect("the kept cycle is reported to its agent");
        assert_eq!((open.seq, open.frames), (seq, 2));
        drop(client);
        // ... the other is not, cannot resume it, and abandons it by connecting.
        let (mut client, welcome) = Client::greeted(&receiver, &hostile).await;
        assert!(welcome.open_cycle.is_none(), "{:?}", welcome.open_cycle);
        let resumed = client.request(&AgentMessage::Resume { seq }).await;
        assert_refused(&resumed, RefusalCode::Sequence);
        drop(client);
        let (client, welcome) = Client::greeted(&receiver, &honest).await;
        assert!(welcome.open_cycle.is_none(), "{:?}", welcome.open_cycle);
        assert_eq!(welcome.committed_seq, committed);
        client.close().await;
    });
    assert!(restore(&data, &scratch.path, committed) == point);
    assert_eq!(
        fs::metadata(data.join(VOLUME).join("journal")).map_or(0, |m| m.len()),
        0,
        "the abandoned journal is emptied"
    );
}

/// Finding 7 of the hardening issue: every failed handshake appended an audit entry (3
/// fsyncs), with no address validation, so anyone could grow the log at will.
#[test]
fn unauthenticated_and_spoofed_handshakes_cannot_flood_the_audit_log() {
    require_root();
    let Site {
        scratch,
        agent,
        data,
        receiver,
    } = Site::new();
    let stranger = Id::new(&scratch.path, "stranger-id");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let handshake_entries = || {
        fs::read_to_string(data.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"stage\":\"handshake\""))
            .count()
    };
    // Bare Initial packets from addresses that never answer: capture one real Initial and
    // replay it from 200 other sockets.
    let relay = UdpSocket::bind("127.0.0.1:0").expect("relay");
    relay
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let relay_addr = relay.local_addr().expect("addr");
    let client = std::thread::spawn({
        let stranger_dir = stranger.dir.clone();
        let fingerprint = receiver.fingerprint.clone();
        // Aimed at the relay, which only records the first datagram.
        let addr = relay_addr.to_string();
        move || {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            runtime.block_on(async {
                let identity = Identity::load(&stranger_dir).expect("identity");
                let fingerprint = Fingerprint::parse(&fingerprint).expect("fingerprint");
                let (endpoint, config) = net::client_endpoint(
                    &identity,
                    &fingerprint.clone().into(),
                    MIB,
                    net::Congestion::default(),
                    net::PathSlot::default(),
                )
                .expect("endpoint");
                let connecting = endpoint
                    .connect_with(config, addr.parse().expect("addr"), "blkmirror")
                    .expect("connect");
                let _ = tokio::time::timeout(Duration::from_secs(2), connecting).await;
            });
        }
    });
    let mut initial = vec![0u8; 2048];
    let (len, _) = relay.recv_from(&mut initial).expect("an Initial packet");
    initial.truncate(len);
    client.join().expect("client");
    let target: std::net::SocketAddr = receiver.addr.parse().expect("addr");
    for _ in 0..200 {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("socket");
        socket.send_to(&initial, target).expect("send");
    }
    // Certificates the receiver does not admit, 300 times.
    runtime.block_on(async {
        for _ in 0..300 {
            // In TLS 1.3 the client learns of the refusal after its side of the handshake.
            if let Some(client) = Client::connect(&receiver, &stranger).await {
                let closed =
                    tokio::time::timeout(Duration::from_secs(5), client.connection.closed()).await;
                assert!(closed.is_ok(), "a stranger's connection stayed open");
            }
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let entries = handshake_entries();
    assert!(
        (1..=blkmirror::dr::receiver::RefusalThrottle::PER_WINDOW as usize).contains(&entries),
        "{entries} handshake entries in the audit log"
    );
    // The admitted agent is still served, and the audit chain holds.
    runtime.block_on(async {
        let mut model = vec![0u8; SIZE as usize];
        honest_cycle(&receiver, &agent, &[(0, 1, 4096)], &mut model).await;
    });
    let verify = run_cli(&[
        "audit",
        "verify",
        "--log",
        data.join("audit.log").to_str().expect("utf-8"),
    ]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// Finding 8: a revoked agent's connection that had not yet claimed a volume survived the
/// reload and went on to get `Welcome` and hashes.
#[test]
fn a_reload_closes_a_revoked_agents_connection_that_holds_no_volume_yet() {
    require_root();
    let scratch = Scratch::new();
    let agent = Id::new(&scratch.path, "agent-id");
    let other = Id::new(&scratch.path, "other-id");
    let receiver_id = Id::new(&scratch.path, "receiver-id");
    let data = scratch.path.join("data");
    let config = scratch.path.join("receiver.toml");
    let write_config = |agents: &[&Id]| {
        let mut text = format!(
            "identity = \"{}\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            receiver_id.dir.display(),
            data.display()
        );
        for id in agents {
            text.push_str(&format!(
                "[[agent]]\nfingerprint = \"{}\"\nvolumes = [\"{VOLUME}\"]\n",
                id.fingerprint
            ));
        }
        fs::write(&config, text).expect("config");
    };
    write_config(&[&agent, &other]);
    let receiver = Receiver::start_config(&config, &data, &receiver_id);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        // Authenticated, no Hello yet.
        let mut client = Client::connect(&receiver, &agent).await.expect("connect");
        write_config(&[&other]);
        blkmirror_tests::signal(receiver.pid(), libc::SIGHUP);
        let closed =
            tokio::time::timeout(Duration::from_secs(10), client.connection.closed()).await;
        assert!(
            closed.is_ok(),
            "the revoked agent's connection stayed open:\n{}",
            receiver.log()
        );
        let reply = client.request(&AgentMessage::Hello(hello())).await;
        assert!(
            !matches!(reply, Some(ReceiverMessage::Welcome(_))),
            "{reply:?}"
        );
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !receiver.log().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "{}", receiver.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        receiver.log().contains("closed_sessions"),
        "{}",
        receiver.log()
    );
}

/// The retention lock cannot be shortened by a reload: the file is refused and audited, and
/// the running configuration stays.
#[test]
fn a_reload_cannot_shorten_the_retention_lock() {
    require_root();
    let scratch = Scratch::new();
    let agent = Id::new(&scratch.path, "agent-id");
    let receiver_id = Id::new(&scratch.path, "receiver-id");
    let data = scratch.path.join("data");
    let config = scratch.path.join("receiver.toml");
    let write_config = |locked: &str| {
        fs::write(
            &config,
            format!(
                "identity = \"{}\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[retention]\nlocked = \"{locked}\"\n[[agent]]\nfingerprint = \"{}\"\nvolumes = [\"{VOLUME}\"]\n",
                receiver_id.dir.display(),
                data.display(),
                agent.fingerprint
            ),
        )
        .expect("config")
    };
    write_config("2h");
    let receiver = Receiver::start_config(&config, &data, &receiver_id);
    write_config("1h");
    blkmirror_tests::signal(receiver.pid(), libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !receiver.log().contains("reload refused") {
        assert!(Instant::now() < deadline, "{}", receiver.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        receiver.log().contains("cannot be shortened"),
        "{}",
        receiver.log()
    );
    // A longer lock is taken.
    write_config("3h");
    blkmirror_tests::signal(receiver.pid(), libc::SIGHUP);
    while !receiver.log().contains("\"locked_s\":10800") {
        assert!(Instant::now() < deadline, "{}", receiver.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let audit = fs::read_to_string(data.join("audit.log")).expect("audit");
    assert!(audit.contains("cannot be shortened"), "{audit}");
}

/// A damaged `volume.json` used to stop the whole receiver from starting. Now that volume is
/// marked failed in `status`, audited once, and the others are served.
#[test]
fn a_broken_volume_is_shown_failed_and_the_others_are_served() {
    require_root();
    let scratch = Scratch::new();
    let agent = Id::new(&scratch.path, "agent-id");
    let receiver_id = Id::new(&scratch.path, "receiver-id");
    let data = scratch.path.join("data");
    let socket = scratch.path.join("receiver.sock");
    let mut receiver = Receiver::start_with(
        &data,
        &receiver_id,
        &[format!("{}={VOLUME},other", agent.fingerprint)],
        0,
        &["--control-socket", socket.to_str().expect("utf-8")],
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut model = vec![0u8; SIZE as usize];
    runtime.block_on(async {
        honest_cycle(&receiver, &agent, &[(0, 1, 4096)], &mut model).await;
    });
    // Another volume, then damage it while the receiver is down.
    let other = data.join("other");
    fs::create_dir_all(&other).expect("dir");
    let meta = fs::read_to_string(data.join(VOLUME).join("volume.json")).expect("meta");
    fs::write(
        other.join("volume.json"),
        meta.replace(
            &format!("\"volume\": \"{VOLUME}\""),
            "\"volume\": \"other\"",
        )
        .replace("\"chunk_bytes\": 65536", "\"chunk_bytes\": 0"),
    )
    .expect("damaged meta");
    receiver.restart();
    let status = blkmirror()
        .args(["status", "--json", "--socket"])
        .arg(&socket)
        .output()
        .expect("status");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    let volumes = status["volumes"].as_array().expect("volumes");
    let broken = volumes
        .iter()
        .find(|v| v["volume"] == "other")
        .unwrap_or_else(|| panic!("no status for the broken volume: {status}"));
    assert_eq!(broken["state"], "failed", "{broken}");
    assert!(
        broken["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("chunk size 0")),
        "{broken}"
    );
    // The healthy volume is still served.
    runtime.block_on(async {
        honest_cycle(&receiver, &agent, &[(4096, 2, 4096)], &mut model).await;
    });
    let audit = fs::read_to_string(data.join("audit.log")).expect("audit");
    assert_eq!(
        audit.matches("\"event\":\"volume-failed\"").count(),
        1,
        "{audit}"
    );
}
