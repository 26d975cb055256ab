//! Simulated agents for load tests: many volumes replicated at once, each by a task that
//! speaks the real protocol over real QUIC to real receivers (the session machine
//! [`SourceSession`], the sync pass [`SyncPass`], the frame builder [`FrameBuilder`], mutual
//! TLS), with the device and its tracker replaced by a model in memory.
//!
//! A simulated device starts as zeros. Each cycle writes a random set of chunks with content
//! that is a function of (volume, version, chunk), half random and half zeros, so it
//! compresses about as much as real data does; the model remembers each chunk's version, and
//! [`SimulatedDevice::image`] rebuilds the device to compare with a restore. What changed
//! since the last acknowledged cycle is the in-flight set, sent again by the next cycle after
//! a failure, as the real agent's is.
//!
//! What is measured: each commit's latency (from `Begin` to `Committed`), which includes the
//! receiver's publish to the object store when it has one. Connection failures move the
//! agent to the next receiver of its list, as `--receiver A,B,C` does.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use blkmirror_protocol::{
    frames::{Compare, FrameBuilder},
    pass::{SyncAction, SyncPass, WindowCompare},
    session::{Answer, SourceRecord, SourceSession},
    wire::{
        self, AgentMessage, Begin, DataFrame, DataFrameRef, Hello, MAX_HASHES_PER_REQUEST,
        PROTOCOL_VERSION, PointInfo, ReceiverMessage,
    },
};

use crate::link::net::{self, NetError};
use crate::source::agent::AgentError;

/// One simulated agent's volume and workload.
#[derive(Debug, Clone)]
pub struct SimulatedAgent {
    /// The volume name.
    pub volume: String,
    /// Device size in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk: u64,
    /// Cycles to commit after the initial sync.
    pub cycles: u32,
    /// Chunks each cycle writes: at least the first, fewer than the second.
    pub changed_chunks: (u64, u64),
    /// The pause between cycles.
    pub interval: Duration,
    /// The receivers, tried in this order (then around again).
    pub receivers: Vec<SocketAddr>,
    /// Seeds the workload.
    pub seed: u64,
}

/// What one simulated agent did.
#[derive(Debug, Clone, Default)]
pub struct SimulatedReport {
    /// Each committed cycle's latency, from `Begin` to `Committed`.
    pub commits: Vec<Duration>,
    /// How long the initial sync took.
    pub initial_sync: Duration,
    /// Connections that failed and were made again (to the next receiver).
    pub reconnects: u32,
    /// Bytes of chunk data sent.
    pub data_bytes: u64,
    /// The last committed cycle.
    pub committed_seq: u64,
    /// The device at the end.
    pub device: SimulatedDevice,
}

/// A device modelled in memory: each written chunk's version.
#[derive(Debug, Clone, Default)]
pub struct SimulatedDevice {
    /// Seeds the content.
    pub seed: u64,
    /// Size and chunk size.
    pub size: u64,
    /// Chunk size.
    pub chunk: u64,
    /// Chunk → version (absent: zeros).
    pub versions: BTreeMap<u64, u64>,
}

impl SimulatedDevice {
    /// The content of `chunk` at `version`: random in its first half, zeros after.
    pub fn content(&self, chunk: u64, version: u64) -> Vec<u8> {
        let len = self.chunk.min(self.size - chunk * self.chunk) as usize;
        let mut state = (self.seed ^ chunk.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_add(version.wrapping_mul(0xbf58_476d_1ce4_e5b9))
            | 1;
        let mut out = vec![0u8; len];
        for byte in out.iter_mut().take(len / 2) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = (state >> 24) as u8;
        }
        out
    }

    /// The chunk's current content.
    pub fn chunk_now(&self, chunk: u64) -> Vec<u8> {
        match self.versions.get(&chunk) {
            Some(&version) => self.content(chunk, version),
            None => vec![0; self.chunk.min(self.size - chunk * self.chunk) as usize],
        }
    }

    /// The whole device.
    pub fn image(&self) -> Vec<u8> {
        let mut image = vec![0u8; self.size as usize];
        for (&chunk, &version) in &self.versions {
            let start = (chunk * self.chunk) as usize;
            let content = self.content(chunk, version);
            image[start..start + content.len()].copy_from_slice(&content);
        }
        image
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A connection's control stream.
struct Control {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Control {
    async fn request(&mut self, message: &AgentMessage) -> Result<ReceiverMessage, AgentError> {
        net::write_frame(&mut self.send, message).await?;
        match net::read_frame::<ReceiverMessage>(&mut self.recv).await {
            Ok(Some(ReceiverMessage::Refused { code, message })) => {
                Err(AgentError::Refused { code, message })
            }
            Ok(Some(reply)) => Ok(reply),
            Ok(None) | Err(NetError::Read(_)) => Err(AgentError::Closed(
                self.connection
                    .close_reason()
                    .map_or_else(|| "control stream ended".into(), |r| r.to_string()),
            )),
            Err(error) => Err(error.into()),
        }
    }

    /// Sends `frames` on one data stream.
    async fn send_frames(&self, frames: Vec<DataFrame>) -> Result<u64, AgentError> {
        let mut stream = self.connection.open_uni().await.map_err(NetError::from)?;
        let mut sent = 0;
        for frame in &frames {
            let encoded = wire::encode(frame);
            sent += encoded.len() as u64;
            net::write_encoded(&mut stream, encoded).await?;
        }
        let _ = stream.finish();
        Ok(sent)
    }
}

/// The state of one simulated agent across connections.
struct Runner<'a> {
    agent: &'a SimulatedAgent,
    session: SourceSession,
    device: SimulatedDevice,
    /// Chunks written since the last acknowledged cycle.
    inflight: BTreeSet<u64>,
    rng: Rng,
    report: SimulatedReport,
}

/// Runs one simulated agent to the end of its cycles, moving between receivers on retryable
/// failures (giving up after `patience` without a commit).
pub async fn run(
    endpoint: &quinn::Endpoint,
    client_config: &quinn::ClientConfig,
    agent: &SimulatedAgent,
    patience: Duration,
) -> Result<SimulatedReport, AgentError> {
    let mut runner = Runner {
        agent,
        session: SourceSession::new(SourceRecord::default()),
        device: SimulatedDevice {
            seed: agent.seed,
            size: agent.size,
            chunk: agent.chunk,
            versions: BTreeMap::new(),
        },
        inflight: BTreeSet::new(),
        rng: Rng(agent.seed | 1),
        report: SimulatedReport::default(),
    };
    let mut attempt = 0usize;
    let mut last_progress = Instant::now();
    loop {
        let receiver = agent.receivers[attempt % agent.receivers.len().max(1)];
        let before = runner.report.commits.len();
        let outcome = match connect(endpoint, client_config, receiver).await {
            Ok(control) => runner.session(control).await,
            Err(error) => Err(error),
        };
        match outcome {
            Ok(()) => {
                runner.report.device = runner.device;
                runner.report.committed_seq = runner.session.record().committed_seq;
                return Ok(runner.report);
            }
            Err(error) if error.retryable() => {
                if runner.report.commits.len() > before {
                    last_progress = Instant::now();
                }
                if last_progress.elapsed() > patience {
                    return Err(error);
                }
                runner.report.reconnects += 1;
                attempt += 1;
                if attempt.is_multiple_of(agent.receivers.len().max(1)) {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            Err(error) => return Err(error),
        }
    }
}

async fn connect(
    endpoint: &quinn::Endpoint,
    client_config: &quinn::ClientConfig,
    receiver: SocketAddr,
) -> Result<Control, AgentError> {
    let connecting = endpoint
        .connect_with(client_config.clone(), receiver, "blkmirror")
        .map_err(|error| {
            AgentError::Net(NetError::Connect {
                addr: receiver.to_string(),
                message: error.to_string(),
            })
        })?;
    let connection = connecting.await.map_err(NetError::from)?;
    let (send, recv) = connection.open_bi().await.map_err(NetError::from)?;
    Ok(Control {
        connection,
        send,
        recv,
    })
}

impl Runner<'_> {
    async fn session(&mut self, mut control: Control) -> Result<(), AgentError> {
        let hello = self.session.hello(Hello {
            protocol: PROTOCOL_VERSION,
            volume: self.agent.volume.clone(),
            source_id: format!("simulated-{:016x}", self.agent.seed),
            size_bytes: self.agent.size,
            chunk_bytes: self.agent.chunk,
        })?;
        let reply = control.request(&hello).await?;
        let welcomed = self.session.on_welcome(reply, 1)?;
        if welcomed.clear_inflight {
            self.inflight.clear();
        }
        if let Some(from) = welcomed.sync_from {
            let started = Instant::now();
            self.sync(&mut control, from).await?;
            if self.report.initial_sync.is_zero() {
                self.report.initial_sync = started.elapsed();
            }
        }
        while self.report.commits.len() < self.agent.cycles as usize {
            if !self.report.commits.is_empty() || !self.inflight.is_empty() {
                tokio::time::sleep(self.agent.interval).await;
            }
            self.cycle(&mut control).await?;
        }
        control
            .connection
            .close(quinn::VarInt::from_u32(0), b"done");
        Ok(())
    }

    /// A sync pass from `from`: every non-zero chunk for a new replica, the chunks whose
    /// hashes differ otherwise.
    async fn sync(&mut self, control: &mut Control, from: u64) -> Result<(), AgentError> {
        if self.session.sync_needs_fresh_cut(from) {
            self.session.sync_started(1);
            self.inflight.clear();
        }
        let window = self.agent.chunk * u64::from(MAX_HASHES_PER_REQUEST);
        let mut pass = SyncPass::new(
            &self.session,
            from,
            self.agent.size,
            self.agent.chunk,
            window,
            64 << 20,
        );
        loop {
            let seq = self.session.next_seq();
            match pass.next(seq, 1, seq, now_ms()) {
                SyncAction::Begin(begin) => {
                    let message = self.session.begin(begin)?;
                    let reply = control.request(&message).await?;
                    self.session.on_reply(reply)?;
                }
                SyncAction::Window {
                    start,
                    end,
                    compare,
                } => {
                    let compare = match compare {
                        WindowCompare::ZeroReplica => Compare::ZeroReplica,
                        WindowCompare::AskHashes { first_chunk, count } => {
                            let message = self.session.hash_request(first_chunk, count)?;
                            let reply = control.request(&message).await?;
                            crate::source::agent::hashes_compare(
                                self.session.on_reply(reply)?,
                                count,
                            )?
                        }
                    };
                    let chunks = (start / self.agent.chunk)..end.div_ceil(self.agent.chunk);
                    let (frames, bytes) = self.frames(seq, &compare, chunks)?;
                    let count = frames.len() as u64;
                    self.report.data_bytes += bytes;
                    control.send_frames(frames).await?;
                    pass.window_sent(count, bytes);
                }
                SyncAction::Commit { frames, point } => {
                    let message = self.session.commit(frames, point)?;
                    let reply = control.request(&message).await?;
                    self.session.on_reply(reply)?;
                }
                SyncAction::Done => return Ok(()),
            }
        }
    }

    /// Frames carrying `chunks` as the device holds them now, compared as `compare` says.
    fn frames(
        &self,
        seq: u64,
        compare: &Compare,
        chunks: impl Iterator<Item = u64>,
    ) -> Result<(Vec<DataFrame>, u64), AgentError> {
        let mut builder = FrameBuilder::new(seq, self.agent.chunk, compare, None);
        let mut frames = Vec::new();
        let mut emit = |frame: DataFrameRef<'_>| {
            frames.push(frame.to_owned());
            Ok::<(), AgentError>(())
        };
        for chunk in chunks {
            let content = self.device.chunk_now(chunk);
            builder.piece(chunk * self.agent.chunk, &content, &mut emit)?;
        }
        let bytes = builder.stats.data_bytes;
        Ok((frames, bytes))
    }

    /// One cycle: new writes join the in-flight set, which is sent and committed.
    async fn cycle(&mut self, control: &mut Control) -> Result<(), AgentError> {
        let chunks = self.agent.size.div_ceil(self.agent.chunk);
        let (low, high) = self.agent.changed_chunks;
        let writes = low + self.rng.below(high.saturating_sub(low).max(1));
        for _ in 0..writes {
            let chunk = self.rng.below(chunks);
            let version = self.rng.below(u64::MAX - 1) + 1;
            self.device.versions.insert(chunk, version);
            self.inflight.insert(chunk);
        }
        let seq = self.session.next_seq();
        let started = Instant::now();
        let (frames, bytes) =
            self.frames(seq, &Compare::Nothing, self.inflight.clone().into_iter())?;
        let message = self.session.begin(Begin {
            seq,
            bytes_estimate: bytes,
            direct: false,
            from: 0,
        })?;
        let reply = control.request(&message).await?;
        self.session.on_reply(reply)?;
        let count = frames.len() as u64;
        control.send_frames(frames).await?;
        let point = PointInfo {
            seq,
            generation: 1,
            epoch: seq,
            time_unix_ms: now_ms(),
            bytes,
            consistent: false,
            freeze_ms: 0,
            complete: true,
            synced_to: 0,
            group_cut: None,
            received_unix_ms: 0,
            app_consistent: false,
        };
        let message = self.session.commit(count, point)?;
        let reply = control.request(&message).await?;
        match self.session.on_reply(reply)? {
            Answer::Committed { .. } => {
                self.report.commits.push(started.elapsed());
                self.report.data_bytes += bytes;
                self.inflight.clear();
                Ok(())
            }
            other => Err(AgentError::Closed(format!(
                "a commit answered with {other:?}"
            ))),
        }
    }
}

/// Latency percentiles of `samples`: (p50, p95, p99, max).
pub fn percentiles(samples: &[Duration]) -> (Duration, Duration, Duration, Duration) {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let at = |q: f64| {
        if sorted.is_empty() {
            Duration::ZERO
        } else {
            sorted[((sorted.len() - 1) as f64 * q).round() as usize]
        }
    };
    (at(0.5), at(0.95), at(0.99), at(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_device_is_its_chunks_versions() {
        let mut device = SimulatedDevice {
            seed: 7,
            size: 10 * 4096 + 2048,
            chunk: 4096,
            versions: BTreeMap::new(),
        };
        assert!(device.image().iter().all(|&b| b == 0));
        device.versions.insert(3, 9);
        device.versions.insert(10, 1);
        let image = device.image();
        assert_eq!(&image[3 * 4096..4 * 4096], device.content(3, 9).as_slice());
        assert_eq!(device.content(10, 1).len(), 2048);
        assert_ne!(device.content(3, 9), device.content(3, 10));
        assert_ne!(device.content(3, 9), device.content(4, 9));
        // Half random, half zeros: it compresses about 2:1.
        assert!(device.content(3, 9)[2048..].iter().all(|&b| b == 0));
        let (p50, p95, p99, max) = percentiles(&[
            Duration::from_millis(3),
            Duration::from_millis(1),
            Duration::from_millis(2),
        ]);
        assert_eq!(
            (p50, p95, p99, max),
            (
                Duration::from_millis(2),
                Duration::from_millis(3),
                Duration::from_millis(3),
                Duration::from_millis(3)
            )
        );
    }
}
