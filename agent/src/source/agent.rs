//! The agent: cuts epochs, reads what changed, ships it to the receiver, and records what the
//! receiver committed.
//!
//! # A cycle
//!
//! 1. **Pre-copy pass.** Cut the tracker. Add the cut to the durable *in-flight set* (the
//!    agent's state file), then release the kernel slot. Read the in-flight set and send it.
//! 2. **Frozen pass** (when the device holds a mounted file system). Freeze it, cut, and if the
//!    remainder fits the freeze budget, read it into memory, thaw, and send it. Otherwise thaw
//!    at once, send the remainder as another pre-copy pass, and try again. The point is
//!    crash-consistent because the final cut and its reads happened with the file system
//!    frozen. Without a file system the point is marked `consistent: false` (fuzzy).
//! 3. **Commit.** The receiver journals, syncs, applies, then acknowledges. Only then does the
//!    agent record the cycle number as committed and empty the in-flight set.
//!
//! A crash anywhere re-sends at most the in-flight set of the one uncommitted cycle; a cycle
//! the receiver committed but the agent did not record is recognised from the receiver's
//! `Welcome` and not re-sent.
//!
//! # Syncs
//!
//! When the receiver has no complete replica, or the tracker cannot vouch for the history
//! (`needs_verify`), the agent cuts once (everything after that cut is tracked) and then reads
//! the whole device window by window. For an existing replica it asks for the receiver's chunk
//! hashes first and sends only chunks that differ. Each group of windows is committed as an
//! *incomplete* step, so an interrupted sync resumes where it stopped. A final incremental
//! cycle then makes the replica a complete point.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::{
    command::status::{LinkStats, PointSummary, StatusBoard, SyncProgress, VolumeState},
    link::identity::{Fingerprint, Identity, ReceiverPins},
    link::net::{self, NetError},
    source::app_hooks::{AppHooks, HookContext},
    source::freeze::{self, FreezeError, Frozen},
    source::group::{ConsistencyGroup, GroupError},
    source::read::{BlockReader, Engine, ReadError},
    tracker::device,
    tracker::track::{TrackError, TrackOptions, Tracker},
};
use blkmirror_protocol::cubic::PathMemory;
use blkmirror_protocol::frames::{Compare, FrameBuilder, FrameStats};
use blkmirror_protocol::pass::{
    Cycle, CycleAction, FreezeOutcome, Resumption, SyncAction, SyncPass, WindowCompare,
};
use blkmirror_protocol::session::{Answer, SessionError, SourceRecord, SourceSession};
use blkmirror_protocol::{
    extent::{ChangeKind, DirtyBitmaps, Extent, Geometry},
    plan::{self, CompressionPolicy, PassPlan, Progress, RateLimit},
    units, wire,
    wire::{
        AgentMessage, Begin, DataFrameRef, Hello, PROTOCOL_VERSION, PointInfo, ReceiverMessage,
        RefusalCode,
    },
};

/// Version of the agent's state file.
const STATE_FORMAT: u32 = 1;
/// The most a frozen pass holds in memory.
const MAX_FROZEN_BYTES: u64 = 256 << 20;
/// How much longer than an interval a group member waits for the others at the freeze.
const GROUP_WAIT: Duration = Duration::from_secs(60);
/// Freeze attempts per cycle before the point is given up as fuzzy.
const FREEZE_ATTEMPTS: u32 = 4;
/// Read rate assumed before one is measured.
const DEFAULT_READ_RATE: f64 = 100e6;

/// Compression of data frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    /// zstd where it pays (backs off on incompressible data), at a level chosen from the
    /// measured link and CPU: higher while the link is the bottleneck, lower while compression
    /// is (`protocol::plan::CompressionPolicy`).
    Auto,
    /// zstd level 1 where it pays, whatever the link.
    Fast,
    /// Never compress.
    Off,
}

/// File-system freezing for consistent points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FreezeMode {
    /// Freeze the device's mounted file system, if there is one.
    Auto,
    /// Never freeze: every point is fuzzy (`consistent: false`).
    Off,
}

/// Everything the agent needs.
pub struct AgentConfig {
    /// The device to protect.
    pub device: PathBuf,
    /// The volume name at the receiver.
    pub volume: String,
    /// `HOST:PORT` of the receiver, or several, comma-separated (receivers sharing an object
    /// store: the agent moves to the next when one fails).
    pub receiver: String,
    /// The receivers' certificate fingerprints (any of them is accepted from any receiver).
    pub receiver_fingerprint: ReceiverPins,
    /// Our identity.
    pub identity: Identity,
    /// Time from one cycle's start to the next one's (back to back when a cycle takes longer).
    pub interval: Duration,
    /// Run one cycle (with the initial sync if needed), then exit.
    pub once: bool,
    /// Bandwidth cap in bytes per second.
    pub max_rate: Option<u64>,
    /// Tracking options (chunk size, pins, state directory, hooks).
    pub track: TrackOptions,
    /// Data streams per pass.
    pub streams: usize,
    /// Reads in flight.
    pub queue_depth: u32,
    /// Read engine.
    pub engine: Engine,
    /// Compression.
    pub compression: Compression,
    /// Freezing.
    pub freeze: FreezeMode,
    /// Longest freeze.
    pub freeze_budget: Duration,
    /// Flow-control window.
    pub window: u64,
    /// Congestion controller.
    pub congestion: net::Congestion,
    /// Device bytes covered by one committed step of a sync.
    pub sync_step: u64,
    /// Print JSON lines.
    pub json: bool,
    /// Where status is reported (control socket, metrics, systemd).
    pub status: Arc<StatusBoard>,
    /// The consistency group this device is frozen and cut with, if any.
    pub group: Option<Arc<ConsistencyGroup>>,
    /// `pre_freeze` / `post_thaw` around each freeze.
    pub app_hooks: AppHooks,
}

/// Agent errors. [`AgentError::retryable`] tells which ones a reconnect can fix.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Tracking.
    #[error(transparent)]
    Track(#[from] TrackError),
    /// Reading the device.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The network.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The receiver refused.
    #[error("the receiver refused: {message} ({code:?})")]
    Refused {
        /// Why.
        code: RefusalCode,
        /// The receiver's words.
        message: String,
    },
    /// The TLS handshake failed: one side does not admit the other's certificate.
    #[error(
        "TLS handshake with {receiver} failed: the receiver does not admit this agent's \
         certificate ({agent}), or the receiver's certificate is not {pinned}; check both \
         fingerprints ({detail})"
    )]
    Handshake {
        /// The receiver address.
        receiver: String,
        /// Our fingerprint.
        agent: Fingerprint,
        /// The receiver fingerprints we pin.
        pinned: ReceiverPins,
        /// What quinn said.
        detail: String,
    },
    /// The receiver closed the connection with an error.
    #[error("the receiver closed the connection: {0}")]
    Closed(String),
    /// The device is not the one the replica was made from.
    #[error(
        "{device} is {found}, but volume {volume} was replicated from {expected}; refusing to \
         overwrite the replica with another device (use another volume name, or remove {state})"
    )]
    DeviceMismatch {
        /// The device path.
        device: PathBuf,
        /// Its identity now.
        found: String,
        /// The identity in the state file.
        expected: String,
        /// The volume.
        volume: String,
        /// The state file.
        state: PathBuf,
    },
    /// The state file.
    #[error("agent state {path}: {message}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Freezing.
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    /// A consistency group could not freeze together.
    #[error("{0}")]
    Group(String),
    /// The receiver's answer made no sense.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Tracking lost history during a cycle: a verify sync is due.
    #[error("tracking needs a verify: {0}")]
    NeedsVerify(String),
    /// A signal asked us to stop.
    #[error("stopped by signal")]
    Stopped,
}

impl From<SessionError> for AgentError {
    fn from(error: SessionError) -> Self {
        match error {
            SessionError::Protocol(message) => Self::Protocol(message),
            SessionError::Refused { code, message } => Self::Refused { code, message },
        }
    }
}

impl AgentError {
    /// Whether reconnecting and trying again can help.
    pub fn retryable(&self) -> bool {
        match self {
            AgentError::Net(error) => !error.is_handshake_refusal(),
            AgentError::Closed(_) => true,
            AgentError::Refused { code, .. } => matches!(
                code,
                RefusalCode::DiskFull | RefusalCode::Storage | RefusalCode::Sequence
            ),
            _ => false,
        }
    }
}

/// `STATE_DIR/agent-VOLUME.json`: what survives a restart of the agent.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentState {
    pub(crate) format: u32,
    pub(crate) volume: String,
    pub(crate) source_id: String,
    /// The last cycle the receiver committed, as far as we know.
    pub(crate) committed_seq: u64,
    /// The tracker history cannot be trusted: a full compare is due.
    pub(crate) needs_full_sync: bool,
    /// A sync started in this tracker generation and has not completed.
    pub(crate) sync_generation: Option<u64>,
    /// The committed cycle when that sync started (absent in files of earlier releases: such a
    /// sync starts over).
    #[serde(default)]
    pub(crate) sync_base_seq: Option<u64>,
    /// Cut but not yet committed: `[offset, length, kind]`.
    pub(crate) inflight: Vec<[u64; 3]>,
    /// The highest term a receiver has told for this volume (absent in files of earlier
    /// releases: 0, none).
    #[serde(default)]
    pub(crate) term: u64,
    /// The journaled cycle this agent began and has not seen committed: what a restarted
    /// agent needs to resume it instead of sending it again (absent when none is open, and in
    /// files of earlier releases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) open_cycle: Option<OpenCycleRecord>,
}

/// The durable form of [`OpenCycle`].
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OpenCycleRecord {
    pub(crate) seq: u64,
    /// The tracker generation the cycle began under: a resume is only sound if every write
    /// since then was tracked.
    pub(crate) generation: u64,
    /// Every cut taken since the cycle began: `[offset, length, kind]`.
    pub(crate) redirtied: Vec<[u64; 3]>,
}

/// The journaled cycle this agent began and has not seen committed, with every cut taken
/// since its first one: what a resume of it must send again (see
/// `protocol::pass::Resumption`). Written to the state file with the in-flight set, so a
/// restarted agent resumes it too.
struct OpenCycle {
    seq: u64,
    generation: u64,
    redirtied: DirtyBitmaps,
}

impl OpenCycle {
    fn record(&self) -> OpenCycleRecord {
        OpenCycleRecord {
            seq: self.seq,
            generation: self.generation,
            redirtied: extent_records(&self.redirtied),
        }
    }
}

fn extent_records(set: &DirtyBitmaps) -> Vec<[u64; 3]> {
    set.extents()
        .iter()
        .map(|e| [e.offset, e.length, e.kind.index()])
        .collect()
}

fn bitmaps_of(geometry: Geometry, records: &[[u64; 3]]) -> DirtyBitmaps {
    let mut set = DirtyBitmaps::new(geometry);
    for &[offset, length, kind] in records {
        set.add_extent(&Extent {
            offset,
            length,
            kind: ChangeKind::from_index(kind),
        });
    }
    set
}

impl AgentState {
    /// The session's part of the state.
    fn record(&self) -> SourceRecord {
        SourceRecord {
            committed_seq: self.committed_seq,
            needs_full_sync: self.needs_full_sync,
            sync_generation: self.sync_generation,
            sync_base_seq: self.sync_base_seq,
            term: self.term,
        }
    }

    fn set_record(&mut self, record: &SourceRecord) {
        self.committed_seq = record.committed_seq;
        self.needs_full_sync = record.needs_full_sync;
        self.sync_generation = record.sync_generation;
        self.sync_base_seq = record.sync_base_seq;
        self.term = record.term;
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Counts of one pass.
#[derive(Debug, Default, Clone, Copy)]
struct PassStats {
    frames: u64,
    read_bytes: u64,
    data_bytes: u64,
    wire_bytes: u64,
    zero_bytes: u64,
    same_bytes: u64,
    /// Bytes a resumed cycle did not send again: the receiver had journaled them before the
    /// connection broke.
    resumed_bytes: u64,
}

impl PassStats {
    /// Adds what a frame builder produced.
    fn add_frames(&mut self, frames: FrameStats) {
        self.frames += frames.frames;
        self.read_bytes += frames.read_bytes;
        self.data_bytes += frames.data_bytes;
        self.zero_bytes += frames.zero_bytes;
        self.same_bytes += frames.same_bytes;
    }

    fn add(&mut self, other: PassStats) {
        self.frames += other.frames;
        self.read_bytes += other.read_bytes;
        self.data_bytes += other.data_bytes;
        self.wire_bytes += other.wire_bytes;
        self.zero_bytes += other.zero_bytes;
        self.same_bytes += other.same_bytes;
        self.resumed_bytes += other.resumed_bytes;
    }
}

/// The control stream of one connection.
struct Link {
    connection: quinn::Connection,
    send: quinn::SendStream,
    /// Away while a [`PendingBegin`] reads the answer to a `Begin`.
    recv: Option<quinn::RecvStream>,
}

/// The control stream went with a reply's task that ended without handing it back.
fn control_stream_lost() -> AgentError {
    AgentError::Closed("the control stream was lost with a reply's task".into())
}

/// What a task that read one reply hands back: the stream, and what it read.
type ReadReply = (quinn::RecvStream, Result<Option<ReceiverMessage>, NetError>);

/// A `Begin` sent without waiting for its `Ready` (see [`Agent::begin_pipelined`]).
struct PendingBegin {
    /// The cycle that `Ready` opens.
    open: OpenCycle,
    /// The state file as the task writes it on `Ready`.
    persisted: AgentState,
    /// Reads the reply and, on `Ready`, writes `persisted`.
    task: tokio::task::JoinHandle<(ReadReply, Result<(), AgentError>)>,
}

impl Link {
    async fn request(&mut self, message: &AgentMessage) -> Result<ReceiverMessage, AgentError> {
        net::write_frame(&mut self.send, message).await?;
        self.reply().await
    }

    async fn reply(&mut self) -> Result<ReceiverMessage, AgentError> {
        let Some(recv) = self.recv.as_mut() else {
            return Err(control_stream_lost());
        };
        let read = net::read_frame::<ReceiverMessage>(recv).await;
        self.interpret(read)
    }

    /// A reply read from the control stream, as the answer or the error it means.
    fn interpret(
        &self,
        read: Result<Option<ReceiverMessage>, NetError>,
    ) -> Result<ReceiverMessage, AgentError> {
        let reply = match read {
            Ok(Some(reply)) => reply,
            Ok(None) => return Err(self.closed_error()),
            Err(NetError::Read(_)) => return Err(self.closed_error()),
            Err(error) => return Err(error.into()),
        };
        match reply {
            ReceiverMessage::Refused { code, message } => {
                Err(AgentError::Refused { code, message })
            }
            other => Ok(other),
        }
    }

    fn closed_error(&self) -> AgentError {
        match self.connection.close_reason() {
            Some(error) => refusal_in_close(AgentError::Net(NetError::Connection(error))),
            None => AgentError::Closed("control stream ended".into()),
        }
    }
}

/// The receiver's verdict in an error that looks like a lost connection. A refusal met on a
/// data stream (a full disk in the middle of a verify sync, a bad frame) has no control frame
/// to ride in: the receiver closes the connection with the refusal's code, and whichever
/// stream of ours notices first reports only that the connection went. Read as a refusal, it
/// is handled as one (`--once` stops on a full disk instead of retrying forever).
fn refusal_in_close(error: AgentError) -> AgentError {
    let close = match &error {
        AgentError::Net(NetError::Connection(quinn::ConnectionError::ApplicationClosed(close)))
        | AgentError::Net(NetError::Write(quinn::WriteError::ConnectionLost(
            quinn::ConnectionError::ApplicationClosed(close),
        ))) => close,
        _ => return error,
    };
    let reason = String::from_utf8_lossy(&close.reason).into_owned();
    match RefusalCode::from_close_code(close.error_code.into_inner()) {
        Some(code) => AgentError::Refused {
            code,
            message: reason,
        },
        None => AgentError::Closed(reason),
    }
}

/// The agent.
pub struct Agent {
    config: AgentConfig,
    tracker: Tracker,
    reader: BlockReader,
    state: AgentState,
    state_path: PathBuf,
    /// What the last connection observed of the path to the receiver, shared by this run's
    /// connections and kept beside the state file for the next run.
    path: net::PathSlot,
    mount: Option<PathBuf>,
    size: u64,
    chunk: u64,
    read_rate: f64,
    compression: CompressionPolicy,
    rate: Option<Arc<Mutex<RateLimit>>>,
    started: Instant,
    shutdown: watch::Receiver<bool>,
    /// The replication session's decisions (pure; this driver executes them).
    session: SourceSession,
    /// The journaled cycle this agent began and has not seen committed (also in the state
    /// file).
    open_cycle: Option<OpenCycle>,
    /// How `pre_freeze` went before the last freeze attempt (`None`: no hook, or no attempt):
    /// the committed point is application-consistent when it was `Some(true)` and the point
    /// is frozen.
    last_pre_freeze: Option<bool>,
    /// How long the receiver took to commit the last point (from the `Commit` sent to its
    /// answer): the share of a cycle that is the receiver's journal, apply and fsyncs.
    last_commit: Duration,
    /// Whether the completion log reached back less than a cut needs at the last cut (warned
    /// once until it reaches far enough again).
    log_reach_short: bool,
}

/// Room beyond the interval that the completion log should reach back at a cut: the window
/// starts a second before the previous cut's statistics read, and a cycle's own time adds to
/// the gap between cuts.
const LOG_REACH_MARGIN: Duration = Duration::from_secs(5);

/// Whether a completion log reaching back `reach` (`None`: to its start) is too short for
/// cuts `interval` apart.
fn log_reach_is_short(reach: Option<Duration>, interval: Duration) -> bool {
    reach.is_some_and(|reach| reach < interval + LOG_REACH_MARGIN)
}

fn say(message: impl std::fmt::Display) {
    tracing::info!(target: "blkmirror agent", "{message}");
}

fn warn(message: impl std::fmt::Display) {
    tracing::warn!(target: "blkmirror agent", "{message}");
}

impl Agent {
    /// Opens tracking, the reader and the state file. Prints what was chosen.
    pub fn open(config: AgentConfig, shutdown: watch::Receiver<bool>) -> Result<Self, AgentError> {
        let compression = if config.compression == Compression::Fast {
            CompressionPolicy::fixed()
        } else {
            CompressionPolicy::adaptive()
        };
        wire::check_volume_name(&config.volume).map_err(|error| AgentError::State {
            path: config.track.state_dir.clone(),
            message: error.to_string(),
        })?;
        let (tracker, open_verify) = Tracker::open(&config.device, &config.track)?;
        let device = tracker.device().clone();
        let source_id = device::stable_identity(&device);
        let size = device.size_bytes();
        let chunk = tracker.geometry().chunk_bytes();
        let state_path = config
            .track
            .state_dir
            .join(format!("agent-{}.json", config.volume));
        let mut state = load_state(&state_path)?.unwrap_or_else(|| AgentState {
            format: STATE_FORMAT,
            volume: config.volume.clone(),
            source_id: source_id.clone(),
            needs_full_sync: true,
            ..AgentState::default()
        });
        if state.source_id != source_id {
            return Err(AgentError::DeviceMismatch {
                device: config.device.clone(),
                found: source_id,
                expected: state.source_id,
                volume: config.volume.clone(),
                state: state_path,
            });
        }
        config.status.update(&config.volume, |s| {
            s.source = config.device.display().to_string();
            s.interval_s = config.interval.as_secs();
            s.tracking_generation = Some(format!("{:016x}", tracker.generation()));
        });
        if let Some(verify) = &open_verify {
            say(format!(
                "tracking history incomplete ({}); a verify sync follows",
                verify.reason
            ));
            state.needs_full_sync = true;
            config
                .status
                .update(&config.volume, |s| s.tracking_loss_total += 1);
        }
        // A cycle the last process began: resumable only if the tracker has seen every write
        // since (the same generation, and no loss found at open).
        let open_cycle = state
            .open_cycle
            .take()
            .filter(|open| {
                open.generation == tracker.generation()
                    && open_verify.is_none()
                    && !state.needs_full_sync
            })
            .map(|open| OpenCycle {
                seq: open.seq,
                generation: open.generation,
                redirtied: bitmaps_of(tracker.geometry(), &open.redirtied),
            });
        state.open_cycle = open_cycle.as_ref().map(OpenCycle::record);
        store_state(&state_path, &state)?;
        let piece = (chunk as usize).max(1 << 20);
        let mut reader = BlockReader::open(
            &config.device,
            size,
            config.queue_depth,
            piece,
            config.engine,
        )?;
        if let Some(note) = reader.take_note() {
            say(note);
        }
        let mount = match config.freeze {
            FreezeMode::Auto => freeze::mount_point(&device),
            FreezeMode::Off => None,
        };
        say(format!(
            "protecting {} ({}, {}) as volume {} on {}; hooks: {}; reads: {} x{}; points: {}",
            config.device.display(),
            source_id,
            units::format_size(size),
            config.volume,
            config.receiver,
            tracker.hooks().join(", "),
            reader.engine(),
            config.queue_depth,
            match &mount {
                Some(path) => format!("crash-consistent (freezes {})", path.display()),
                None if config.freeze == FreezeMode::Off => {
                    "fuzzy (freezing turned off)".to_owned()
                }
                None => "fuzzy (no mounted file system to freeze)".to_owned(),
            }
        ));
        let started = Instant::now();
        let rate = config
            .max_rate
            .map(|rate| Arc::new(Mutex::new(RateLimit::new(rate, Duration::ZERO))));
        let path = net::PathSlot::new(load_path_memory(&state_path, &config.receiver, now_ms()));
        Ok(Self {
            config,
            tracker,
            reader,
            state_path,
            path,
            mount,
            size,
            chunk,
            read_rate: DEFAULT_READ_RATE,
            open_cycle,
            last_pre_freeze: None,
            last_commit: Duration::ZERO,
            log_reach_short: false,
            compression,
            rate,
            started,
            session: SourceSession::new(state.record()),
            state,
            shutdown,
        })
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Writes what the connections observed of the path beside the state file, for the next
    /// run to resume from. Only an optimisation: a failure is logged, not fatal.
    fn keep_path_memory(&self) {
        let Some(memory) = self.path.get() else {
            return;
        };
        if let Some(window) = self.path.take_resumed() {
            say(format!(
                "the connection resumed a window of {} KiB from the last one over this path \
                 (round trip {} ms)",
                window / 1024,
                memory.floor.as_millis()
            ));
        }
        let saved = SavedPath {
            receiver: self.config.receiver.clone(),
            floor_us: u64::try_from(memory.floor.as_micros()).unwrap_or(u64::MAX),
            window: memory.window,
            saved_unix_ms: now_ms(),
        };
        let path = path_memory_file(&self.state_path);
        let bytes = serde_json::to_vec(&saved).expect("serializing a path memory");
        if let Err(error) = crate::durable::write_atomic(&path, &bytes) {
            warn(format!("could not keep {}: {error}", path.display()));
        }
    }

    /// Writes the state file: the session's record and the in-flight set.
    fn persist(&mut self) -> Result<(), AgentError> {
        self.state.set_record(self.session.record());
        self.state.open_cycle = self.open_cycle.as_ref().map(OpenCycle::record);
        store_state(&self.state_path, &self.state)
    }

    /// Runs until `--once` is done or a signal stops it. Reconnects on network trouble.
    pub async fn run(&mut self) -> Result<(), AgentError> {
        let (endpoint, client_config) = net::client_endpoint(
            &self.config.identity,
            &self.config.receiver_fingerprint,
            self.config.window,
            self.config.congestion,
            self.path.clone(),
        )?;
        // Receivers that share an object store can each serve the volume: a failure moves the
        // agent to the next one (the one holding the volume's lease takes it; another refuses
        // until that lease runs out, then fetches the volume from the store).
        let receivers: Vec<String> = self.config.receiver.split(',').map(str::to_owned).collect();
        let mut current = 0;
        let mut attempt = 0;
        loop {
            if self.stopping() {
                return Ok(());
            }
            let outcome = match self
                .connect(&endpoint, &client_config, &receivers[current])
                .await
            {
                Ok(link) => {
                    attempt = 0;
                    self.session(link).await.map_err(refusal_in_close)
                }
                Err(error) => Err(error),
            };
            self.keep_path_memory();
            match outcome {
                Ok(()) => {
                    endpoint.close(quinn::VarInt::from_u32(0), b"done");
                    endpoint.wait_idle().await;
                    return Ok(());
                }
                Err(AgentError::Stopped) => return Ok(()),
                // `--once` reports a full receiver instead of waiting for space.
                Err(AgentError::Refused {
                    code: RefusalCode::DiskFull,
                    message,
                }) if self.config.once => {
                    return Err(AgentError::Refused {
                        code: RefusalCode::DiskFull,
                        message,
                    });
                }
                Err(AgentError::Net(error)) if error.is_handshake_refusal() => {
                    return Err(AgentError::Handshake {
                        receiver: self.config.receiver.clone(),
                        agent: self.config.identity.fingerprint(),
                        pinned: self.config.receiver_fingerprint.clone(),
                        detail: error.to_string(),
                    });
                }
                Err(error) if error.retryable() => {
                    // Back off once per round of the receivers.
                    let delay = plan::reconnect_delay(attempt / receivers.len() as u32);
                    attempt += 1;
                    if receivers.len() > 1 {
                        current = (current + 1) % receivers.len();
                        warn(format!(
                            "{error}; trying receiver {} in {}s",
                            receivers[current],
                            delay.as_secs()
                        ));
                    } else {
                        warn(format!("{error}; retrying in {}s", delay.as_secs()));
                    }
                    self.config.status.update(&self.config.volume, |s| {
                        s.state = VolumeState::Disconnected;
                        s.last_error = Some(error.to_string());
                        s.rate_bytes_per_s = 0;
                    });
                    let mut shutdown = self.shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn connect(
        &self,
        endpoint: &quinn::Endpoint,
        client_config: &quinn::ClientConfig,
        receiver: &str,
    ) -> Result<Link, AgentError> {
        let connect_error = |message: String| {
            AgentError::Net(NetError::Connect {
                addr: receiver.to_owned(),
                message,
            })
        };
        let addr = tokio::net::lookup_host(receiver)
            .await
            .map_err(|error| connect_error(error.to_string()))?
            .next()
            .ok_or_else(|| connect_error("no address".into()))?;
        let connecting = endpoint
            .connect_with(client_config.clone(), addr, "blkmirror")
            .map_err(|error| connect_error(error.to_string()))?;
        let connection = connecting.await.map_err(NetError::from)?;
        let (send, recv) = connection.open_bi().await.map_err(NetError::from)?;
        Ok(Link {
            connection,
            send,
            recv: Some(recv),
        })
    }

    async fn session(&mut self, mut link: Link) -> Result<(), AgentError> {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            volume: self.config.volume.clone(),
            source_id: self.state.source_id.clone(),
            size_bytes: self.size,
            chunk_bytes: self.chunk,
        };
        let hello = self.session.hello(hello)?;
        let reply = link.request(&hello).await?;
        let last_point = match &reply {
            ReceiverMessage::Welcome(welcome) => welcome.last_point.clone(),
            _ => None,
        };
        let welcomed = self.session.on_welcome(reply, self.tracker.generation())?;
        for note in &welcomed.notes {
            say(format!("volume {}: {note}", self.config.volume));
        }
        if welcomed.clear_inflight {
            self.state.inflight.clear();
        }
        self.persist()?;
        // Decided once from the receiver's view at connect; later only a tracking loss
        // (`NeedsVerify`) starts another sync.
        let mut sync_from = welcomed.sync_from;
        self.config.status.update(&self.config.volume, |s| {
            s.state = VolumeState::Continuous;
            s.last_error = None;
            if let Some(point) = last_point.as_ref().filter(|p| p.complete) {
                s.last_point.get_or_insert(PointSummary::from(point));
            }
        });
        loop {
            if let Some(from) = sync_from.take() {
                let started = Instant::now();
                let state = if self.session.initial_sync() {
                    VolumeState::InitialSync
                } else {
                    VolumeState::VerifyResync
                };
                self.config
                    .status
                    .update(&self.config.volume, |s| s.state = state);
                match self.full_sync(&mut link, from).await {
                    Ok(()) => {}
                    Err(AgentError::Stopped) => {
                        link.connection
                            .close(quinn::VarInt::from_u32(0), b"agent stopping");
                        return Err(AgentError::Stopped);
                    }
                    Err(error) => return Err(error),
                }
                say(format!(
                    "sync pass finished in {:.1}s; taking the first complete point",
                    started.elapsed().as_secs_f64()
                ));
            }
            let cycle_started = Instant::now();
            match self.cycle(&mut link).await {
                Ok(()) => {}
                Err(AgentError::Stopped) => {
                    link.connection
                        .close(quinn::VarInt::from_u32(0), b"agent stopping");
                    return Err(AgentError::Stopped);
                }
                Err(AgentError::NeedsVerify(reason)) => {
                    say(format!(
                        "tracking lost history ({reason}); starting a verify sync"
                    ));
                    let generation = format!("{:016x}", self.tracker.generation());
                    self.config.status.update(&self.config.volume, |s| {
                        s.tracking_loss_total += 1;
                        s.tracking_generation = Some(generation);
                    });
                    sync_from = Some(0);
                    continue;
                }
                Err(error) => return Err(error),
            }
            if self.config.once {
                link.connection.close(quinn::VarInt::from_u32(0), b"done");
                return Ok(());
            }
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(plan::wait_before_next_cycle(
                    self.config.interval,
                    cycle_started.elapsed(),
                )) => {}
                _ = shutdown.changed() => {
                    link.connection.close(quinn::VarInt::from_u32(0), b"agent stopping");
                    return Err(AgentError::Stopped);
                }
                // A receiver that restarted (a stateless reset answers the next keep-alive) or
                // went silent: reconnect now, and show `disconnected` meanwhile, instead of
                // finding out at the next cycle.
                error = link.connection.closed() => {
                    return Err(AgentError::Net(NetError::Connection(error)));
                }
            }
        }
    }

    /// Reports how far back the completion log reaches (status, metric), and warns when it
    /// became too short for the interval: a kernel skip would then cost a verify sync.
    fn note_log_reach(&mut self) {
        let reach = match self.tracker.completion_log_reach() {
            Ok(reach) => reach,
            Err(why) => {
                tracing::debug!(target: "blkmirror agent", "completion log reach: {why}");
                None
            }
        };
        let held = self.tracker.completion_log_held_bytes();
        self.config.status.update(&self.config.volume, |s| {
            s.completion_log_reach_s = reach.map(|r| r.as_secs_f64());
            s.completion_log_held_bytes = held;
        });
        let short = log_reach_is_short(reach, self.config.interval);
        if short && !self.log_reach_short {
            warn(format_args!(
                "{}: the completion log holds only the last {:.1} s of this disk's completions, \
                 less than the {} s between cuts and a margin: a completion the kernel skips \
                 the tracker for would cost a verify sync. Raise the device's \
                 `completion_log` (a size per CPU), or shorten the interval",
                self.config.volume,
                reach.unwrap_or_default().as_secs_f64(),
                self.config.interval.as_secs()
            ));
        }
        self.log_reach_short = short;
    }

    /// Cuts the tracker and moves the cut into the durable in-flight set. Returns the cut's
    /// extents (and the epoch).
    fn take_cut(&mut self) -> Result<(Vec<Extent>, u64), AgentError> {
        let cut = self.cut_into_inflight();
        self.persist_and_release()?;
        cut
    }

    /// Cuts the tracker and adds the cut to the in-flight set in memory only. The kernel slot
    /// keeps the cut until [`Self::persist_and_release`]: a crash in between loses nothing (the
    /// restarted agent finds the slot again). This is what runs while a file system is frozen:
    /// the state file may live on that file system (`/var/lib/blkmirror` on a protected root
    /// disk), and a write to it would block until the thaw.
    fn cut_into_inflight(&mut self) -> Result<(Vec<Extent>, u64), AgentError> {
        let cut = self.tracker.cut()?;
        self.note_log_reach();
        if let Some(recovered) = &cut.recovered {
            warn(format_args!("{}: {recovered}", self.config.volume));
            self.config.status.update(&self.config.volume, |s| {
                s.tracking_skips_recovered_total += 1;
            });
        }
        if let Some(verify) = cut.needs_verify {
            self.session.tracking_lost();
            return Err(AgentError::NeedsVerify(verify.reason));
        }
        if !cut.extents.is_empty() {
            if let Some(open) = self.open_cycle.as_mut() {
                open.redirtied.union(&cut.bitmaps);
            }
            let mut set = self.inflight_bitmaps();
            set.union(&cut.bitmaps);
            self.state.inflight = extent_records(&set);
        }
        let backlog: u64 = self.state.inflight.iter().map(|e| e[1]).sum();
        self.config
            .status
            .update(&self.config.volume, |s| s.backlog_bytes = backlog);
        let changed: u64 = cut.extents.iter().map(|e| e.length).sum();
        self.config
            .status
            .cut(&self.config.volume, changed, now_ms());
        Ok((cut.extents, cut.epoch))
    }

    /// Makes the in-flight set durable, then releases the tracker's last cut (in this order:
    /// the cut is always in the kernel or on disk).
    fn persist_and_release(&mut self) -> Result<(), AgentError> {
        self.persist()?;
        self.tracker.release()?;
        Ok(())
    }

    fn inflight_bitmaps(&self) -> DirtyBitmaps {
        bitmaps_of(self.tracker.geometry(), &self.state.inflight)
    }

    async fn begin(
        &mut self,
        link: &mut Link,
        seq: u64,
        estimate: u64,
        direct: bool,
        from: u64,
    ) -> Result<(), AgentError> {
        let message = self.session.begin(Begin {
            seq,
            bytes_estimate: estimate,
            direct,
            from,
        })?;
        self.session.on_reply(link.request(&message).await?)?;
        Ok(())
    }

    /// Sends `Begin` for cycle `seq` and returns without waiting for `Ready`, so the cycle's
    /// first frames follow at once (the receiver holds them until the cycle is open): a round
    /// trip less per cycle. A task reads the answer and, on `Ready`, writes the open cycle to
    /// the state file at once, as a waiting `Begin` did: an agent killed in the middle of the
    /// pass resumes the cycle after its restart. Nothing else writes the state file until
    /// [`Self::settle_begin`] (the pre-copy pass does not).
    async fn begin_pipelined(
        &mut self,
        link: &mut Link,
        seq: u64,
        estimate: u64,
    ) -> Result<PendingBegin, AgentError> {
        let message = self.session.begin(Begin {
            seq,
            bytes_estimate: estimate,
            direct: false,
            from: 0,
        })?;
        let open = OpenCycle {
            seq,
            generation: self.tracker.generation(),
            redirtied: DirtyBitmaps::new(self.tracker.geometry()),
        };
        let mut persisted = self.state.clone();
        persisted.set_record(self.session.record());
        persisted.open_cycle = Some(open.record());
        net::write_frame(&mut link.send, &message).await?;
        let mut recv = link.recv.take().ok_or_else(control_stream_lost)?;
        let (path, state) = (self.state_path.clone(), persisted.clone());
        let task = tokio::spawn(async move {
            let read = net::read_frame::<ReceiverMessage>(&mut recv).await;
            let stored = match &read {
                Ok(Some(ReceiverMessage::Ready { seq: ready })) if *ready == seq => {
                    tokio::task::spawn_blocking(move || store_state(&path, &state))
                        .await
                        .unwrap_or_else(|error| Err(AgentError::Protocol(error.to_string())))
                }
                _ => Ok(()),
            };
            ((recv, read), stored)
        });
        Ok(PendingBegin {
            open,
            persisted,
            task,
        })
    }

    /// Takes the answer to a pipelined `Begin`: the cycle is open from now on (and was
    /// written to the state file as the answer came).
    async fn settle_begin(
        &mut self,
        link: &mut Link,
        pending: PendingBegin,
    ) -> Result<(), AgentError> {
        let ((recv, read), stored) = pending
            .task
            .await
            .map_err(|error| AgentError::Protocol(format!("the Begin's reply task: {error}")))?;
        link.recv = Some(recv);
        self.session.on_reply(link.interpret(read)?)?;
        stored?;
        self.open_cycle = Some(pending.open);
        self.state.set_record(self.session.record());
        self.state.open_cycle = self.open_cycle.as_ref().map(OpenCycle::record);
        if self.state != pending.persisted {
            // Something changed the state since the Begin: the file must say it too.
            tokio::task::block_in_place(|| self.persist())?;
        }
        Ok(())
    }

    async fn flush(&mut self, link: &mut Link, frames: u64) -> Result<(), AgentError> {
        let message = self.session.flush(frames)?;
        self.session.on_reply(link.request(&message).await?)?;
        Ok(())
    }

    async fn commit(
        &mut self,
        link: &mut Link,
        frames: u64,
        point: PointInfo,
    ) -> Result<(), AgentError> {
        let message = self.session.commit(frames, point)?;
        // A commit clears the in-flight set, and a complete point ends the sync, in the same
        // write of the state file: a crash cannot leave a finished sync looking unfinished.
        let asked = Instant::now();
        self.session.on_reply(link.request(&message).await?)?;
        self.last_commit = asked.elapsed();
        self.state.inflight.clear();
        self.open_cycle = None;
        self.persist()
    }

    /// One incremental cycle: pre-copy, frozen final pass (if possible), commit.
    async fn cycle(&mut self, link: &mut Link) -> Result<(), AgentError> {
        let started = Instant::now();
        let seq = self.session.next_seq();
        // The receiver kept this cycle's journal when the last connection broke: continue it
        // if this agent began it (this process, or the one before it: the state file says what
        // was cut since), else begin it afresh.
        let resumption = self
            .session
            .take_resumable()
            .filter(|open| {
                self.open_cycle
                    .as_ref()
                    .is_some_and(|mine| mine.seq == open.seq)
            })
            .map(|open| Resumption::new(&open, self.chunk, self.size));
        if resumption.is_none() {
            self.open_cycle = None;
        }
        // Pass 1: whatever is in flight plus a fresh cut, read while the system runs (less,
        // when resuming, what the journal already holds).
        let (_, epoch) = tokio::task::block_in_place(|| self.take_cut())?;
        let inflight = self.inflight_bitmaps();
        let mut plan = match (&resumption, &self.open_cycle) {
            (Some(resumption), Some(open)) => {
                let remaining = resumption.plan(&inflight, &open.redirtied);
                say(format!(
                    "resuming cycle {seq}: the receiver kept {} frames ({}); {} of {} chunks \
                     in flight are still to send",
                    resumption.frames,
                    units::format_size(resumption.bytes),
                    remaining.dirty_chunks(),
                    inflight.dirty_chunks()
                ));
                PassPlan::from_extents(&remaining.extents(), self.size)
            }
            _ => PassPlan::from_extents(&inflight.extents(), self.size),
        };
        let mut pending_begin = None;
        if resumption.is_some() {
            let message = self.session.resume(seq)?;
            self.session.on_reply(link.request(&message).await?)?;
        } else {
            // The state file says no cycle is open (the cut above wrote it so): until `Ready`
            // comes, a restarted agent begins afresh.
            pending_begin = Some(
                self.begin_pipelined(link, seq, plan.data_estimate())
                    .await?,
            );
        }
        let freezes = self.mount.is_some() || self.config.group.is_some();
        let (cycle, mut action) = Cycle::start(
            seq,
            self.tracker.generation(),
            epoch,
            self.size,
            freezes,
            FREEZE_ATTEMPTS,
        );
        let mut cycle = match &resumption {
            Some(resumption) => cycle.resumed(resumption),
            None => cycle,
        };
        let mut totals = PassStats {
            resumed_bytes: resumption.as_ref().map_or(0, |r| r.bytes),
            ..PassStats::default()
        };
        let mut read_while_frozen = None;
        self.last_pre_freeze = None;
        loop {
            action = match action {
                CycleAction::PreCopy => {
                    let pass_started = Instant::now();
                    let sent = self.send_pass(link, seq, &plan, Compare::Nothing).await;
                    if let Some(pending) = pending_begin.take() {
                        // Also when the pass failed: a cycle the receiver opened is resumed
                        // after a reconnect. The receiver's refusal of the Begin explains a
                        // pass that failed with the connection.
                        let settled = self.settle_begin(link, pending).await;
                        if let Err(error) = settled
                            && (sent.is_ok() || matches!(error, AgentError::Refused { .. }))
                        {
                            return Err(error);
                        }
                    }
                    let stats = sent?;
                    if cycle.attempt() == 0 && stats.read_bytes >= 1 << 20 {
                        self.read_rate =
                            stats.read_bytes as f64 / pass_started.elapsed().as_secs_f64();
                    }
                    totals.add(stats);
                    cycle.pass_sent(stats.frames, stats.data_bytes + stats.zero_bytes, now_ms())
                }
                CycleAction::Flush { frames } => {
                    self.flush(link, frames).await?;
                    cycle.flushed()
                }
                CycleAction::Freeze { attempt } => {
                    if self.stopping() {
                        return Err(AgentError::Stopped);
                    }
                    let outcome = self.freeze_attempt(seq, attempt)?;
                    if let Some((next_plan, frames)) = outcome.1 {
                        plan = next_plan;
                        read_while_frozen = frames;
                    }
                    cycle.frozen(outcome.0)
                }
                CycleAction::SendFrozen => {
                    let (frames, stats) = read_while_frozen.take().expect("read while frozen");
                    let stats = self.send_frames(link, frames, stats).await?;
                    totals.add(stats);
                    cycle.frozen_sent(stats.frames, stats.data_bytes + stats.zero_bytes)
                }
                CycleAction::Commit { frames, mut point } => {
                    point.app_consistent = point.consistent && self.last_pre_freeze == Some(true);
                    self.commit(link, frames, point.clone()).await?;
                    let path = self.link_stats(link);
                    self.report("cycle", &point, &totals, started.elapsed(), &path);
                    return Ok(());
                }
            };
        }
    }

    /// One freeze attempt of a cycle: freezes (alone or with the group), cuts, reads the
    /// remainder if it fits the budget, thaws. Returns the outcome for [`Cycle::frozen`], with
    /// the cut's plan and, if read, its frames.
    #[allow(clippy::type_complexity)]
    fn freeze_attempt(
        &mut self,
        seq: u64,
        attempt: u32,
    ) -> Result<
        (
            FreezeOutcome,
            Option<(PassPlan, Option<(Vec<Vec<u8>>, PassStats)>)>,
        ),
        AgentError,
    > {
        let (volume, device, mount) = (
            self.config.volume.clone(),
            self.config.device.clone(),
            self.mount.clone(),
        );
        let context = HookContext {
            volume: &volume,
            device: &device,
            mount: mount.as_deref(),
            cycle: seq,
        };
        let hooks = self.config.app_hooks.clone();
        let pre_freeze = tokio::task::block_in_place(|| hooks.before_freeze(context));
        if pre_freeze == Some(false) {
            warn(format!(
                "{volume}: pre_freeze failed; freezing anyway: this point is crash-consistent, \
                 not application-consistent"
            ));
        }
        self.last_pre_freeze = pre_freeze;
        let pass = tokio::task::block_in_place(|| match self.config.group.clone() {
            Some(group) => self.group_frozen_pass(&group, seq),
            None => {
                let mount = self.mount.clone().expect("a mount without a group");
                self.frozen_pass(&mount, seq)
            }
        });
        // Whatever happened: post_thaw releases the application.
        tokio::task::block_in_place(|| hooks.after_thaw(context, pre_freeze));
        let frozen = match pass {
            Ok(frozen) => frozen,
            // Nothing was cut: the point is the pre-copy pass's, unfrozen.
            Err(AgentError::Freeze(error)) => {
                say(format!("{error}; this point is fuzzy (not frozen)"));
                return Ok((FreezeOutcome::NotFrozen, None));
            }
            Err(AgentError::Group(error)) => {
                say(format!("{error}; this point is fuzzy (not frozen)"));
                return Ok((FreezeOutcome::NotFrozen, None));
            }
            Err(error) => return Err(error),
        };
        match frozen.frames {
            Some(frames) => {
                if frozen.by_guard {
                    say(
                        "the freeze overran its budget and the guard thawed it; this point is \
                         not consistent",
                    );
                }
                let outcome = FreezeOutcome::Read {
                    cut_time_unix_ms: frozen.cut_time,
                    epoch: frozen.epoch,
                    by_guard: frozen.by_guard,
                    held_ms: frozen.held.as_millis() as u64,
                    group_cut: frozen.group_cut,
                };
                Ok((outcome, Some((frozen.plan, Some((frames, frozen.stats))))))
            }
            None => {
                say(format!(
                    "freeze attempt {attempt}: {} left to read does not fit the {}ms budget; \
                     another pre-copy pass first",
                    units::format_size(frozen.plan.read_bytes()),
                    self.config.freeze_budget.as_millis()
                ));
                let outcome = FreezeOutcome::DidNotFit {
                    cut_time_unix_ms: frozen.cut_time,
                    epoch: frozen.epoch,
                };
                Ok((outcome, Some((frozen.plan, None))))
            }
        }
    }

    /// Freezes, cuts, and reads the remainder into memory if it fits the budget; thaws.
    fn frozen_pass(&mut self, mount: &Path, seq: u64) -> Result<FrozenPass, AgentError> {
        let budget = self.config.freeze_budget;
        let frozen = Frozen::freeze(mount, budget)?;
        let cut_time = now_ms();
        let read = self.read_remainder(seq, Instant::now() + budget);
        let thawed = thaw_reporting(frozen);
        // Only now, thawed, can the state file be written (it may be on this file system).
        self.persist_and_release()?;
        let (plan, frames, stats, epoch) = read?;
        Ok(FrozenPass {
            plan,
            frames,
            stats,
            held: thawed.held,
            by_guard: thawed.by_guard,
            cut_time,
            epoch,
            group_cut: None,
        })
    }

    /// Like [`Self::frozen_pass`], with the whole consistency group frozen at once: waits for
    /// the other members, cuts and reads while all are frozen, and takes the group's verdict.
    /// A group whose members do not all arrive in time falls back to freezing alone.
    fn group_frozen_pass(
        &mut self,
        group: &ConsistencyGroup,
        seq: u64,
    ) -> Result<FrozenPass, AgentError> {
        let mount = self.mount.clone();
        let wait = self.config.interval + GROUP_WAIT;
        let volume = self.config.volume.clone();
        let outcome = group.round(&volume, mount.as_deref(), wait, |remaining| {
            let cut_time = now_ms();
            let result = self.read_remainder(seq, Instant::now() + remaining);
            let fits = matches!(result, Ok((_, Some(_), _, _)));
            ((result, cut_time), fits)
        });
        match outcome {
            Ok(((result, cut_time), verdict)) => {
                // The round is over and every member thawed: the state file can be written.
                // (A round that ends in an error never froze, so it cut nothing.)
                self.persist_and_release()?;
                let (plan, frames, stats, epoch) = result?;
                if !verdict.ok {
                    say(format!(
                        "consistency group {}: not every member's remainder fit the freeze \
                         budget (or a guard thawed); another pre-copy pass first",
                        group.name()
                    ));
                }
                let (frames, stats) = if verdict.ok {
                    (frames, stats)
                } else {
                    (None, PassStats::default())
                };
                Ok(FrozenPass {
                    plan,
                    frames,
                    stats,
                    held: verdict.held,
                    by_guard: verdict.by_guard,
                    cut_time,
                    epoch,
                    group_cut: verdict.ok.then_some(verdict.cut),
                })
            }
            Err(error @ GroupError::Timeout { .. }) => match mount {
                Some(mount) => {
                    say(format!(
                        "{error}; freezing this volume alone (its point is consistent, but not \
                         with the group)"
                    ));
                    self.frozen_pass(&mount, seq)
                }
                None => Err(AgentError::Group(error.to_string())),
            },
            Err(error) => Err(AgentError::Group(error.to_string())),
        }
    }

    /// While frozen: cuts and, if reading the remainder can finish by `deadline` (the end of
    /// the freeze budget), reads it into memory (the frames are `None` if it cannot).
    #[allow(clippy::type_complexity)]
    fn read_remainder(
        &mut self,
        seq: u64,
        deadline: Instant,
    ) -> Result<(PassPlan, Option<Vec<Vec<u8>>>, PassStats, u64), AgentError> {
        // Frozen: nothing may be written to the state file here (see `cut_into_inflight`).
        let (extents, epoch) = self.cut_into_inflight()?;
        // Lets tests kill the agent or overrun the budget while the file system is frozen.
        crate::test_hooks::hold_freeze();
        let plan = PassPlan::from_extents(&extents, self.size);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let fits = plan.read_bytes() <= MAX_FROZEN_BYTES
            && plan::fits_freeze(plan.read_bytes(), self.read_rate, remaining);
        if !fits {
            return Ok((plan, None, PassStats::default(), epoch));
        }
        let mut frames = Vec::new();
        let mut stats = PassStats::default();
        self.produce(&plan, seq, &Compare::Nothing, &mut stats, &mut |frame| {
            frames.push(frame);
            Ok(())
        })?;
        Ok((plan, Some(frames), stats, epoch))
    }

    /// A whole-device pass from `from`, committed in steps.
    async fn full_sync(&mut self, link: &mut Link, from: u64) -> Result<(), AgentError> {
        // A sync's `Begin` abandons whatever cycle the receiver kept open; a restarted agent
        // must not take a journaled sync step for that cycle.
        if self.open_cycle.take().is_some() {
            tokio::task::block_in_place(|| self.persist())?;
        }
        if self.session.sync_needs_fresh_cut(from) {
            // Everything written after this cut is tracked; everything before it is read below.
            tokio::task::block_in_place(|| -> Result<(), AgentError> {
                let _ = self.tracker.cut()?;
                self.session.sync_started(self.tracker.generation());
                self.state.inflight.clear();
                self.persist()?;
                self.tracker.release()?;
                Ok(())
            })?;
        }
        // A replica with history is verified in one journaled cycle, so a crash leaves it at
        // its last point or at the synced one, never a mix (the journal holds only the chunks
        // that differ). An initial sync has no point to protect: it writes straight into the
        // image in resumable steps, each telling the receiver where it starts.
        let window = self.chunk * u64::from(wire::MAX_HASHES_PER_REQUEST);
        let mut pass = SyncPass::new(
            &self.session,
            from,
            self.size,
            self.chunk,
            window,
            self.config.sync_step,
        );
        let new_replica = pass.initial();
        say(format!(
            "{} sync of {} from offset {}: {}",
            if new_replica { "initial" } else { "verify" },
            units::format_size(self.size),
            pass.from(),
            if new_replica {
                "sending every non-zero chunk"
            } else {
                "comparing chunk hashes, sending only chunks that differ"
            }
        ));
        let mut progress = Progress {
            total: self.size - pass.from(),
            done: 0,
            started: self.started.elapsed(),
        };
        let mut last_report = Instant::now();
        let mut totals = PassStats::default();
        // The open step: its number, when it began, what it sent.
        let mut step = (0, Instant::now(), PassStats::default());
        loop {
            let action = pass.next(
                self.session.next_seq(),
                self.tracker.generation(),
                self.tracker.epoch(),
                now_ms(),
            );
            match action {
                SyncAction::Begin(begin) => {
                    step = (begin.seq, Instant::now(), PassStats::default());
                    self.begin(
                        link,
                        begin.seq,
                        begin.bytes_estimate,
                        begin.direct,
                        begin.from,
                    )
                    .await?;
                }
                SyncAction::Window {
                    start,
                    end,
                    compare,
                } => {
                    if self.stopping() {
                        return Err(AgentError::Stopped);
                    }
                    let compare = match compare {
                        WindowCompare::ZeroReplica => Compare::ZeroReplica,
                        WindowCompare::AskHashes { first_chunk, count } => {
                            let message = self.session.hash_request(first_chunk, count)?;
                            hashes_compare(
                                self.session.on_reply(link.request(&message).await?)?,
                                count,
                            )?
                        }
                    };
                    let plan = PassPlan {
                        read: vec![(start, end - start)],
                        ..PassPlan::default()
                    };
                    let stats = self.send_pass(link, step.0, &plan, compare).await?;
                    pass.window_sent(stats.frames, stats.data_bytes + stats.zero_bytes);
                    step.2.add(stats);
                    progress.done += end - start;
                    if last_report.elapsed() >= Duration::from_secs(2) {
                        last_report = Instant::now();
                        self.report_progress(&progress, &totals, &step.2);
                    }
                }
                SyncAction::Commit { frames, point } => {
                    self.commit(link, frames, point.clone()).await?;
                    totals.add(step.2);
                    let path = self.link_stats(link);
                    self.report("sync-step", &point, &step.2, step.1.elapsed(), &path);
                }
                SyncAction::Done => break,
            }
        }
        self.report_progress(&progress, &PassStats::default(), &totals);
        Ok(())
    }

    fn report_progress(&self, progress: &Progress, before: &PassStats, current: &PassStats) {
        let now = self.started.elapsed();
        let sent = before.wire_bytes + current.wire_bytes;
        let eta = progress
            .eta(now)
            .map_or("?".to_owned(), |eta| format!("{}s", eta.as_secs()));
        self.config.status.update(&self.config.volume, |s| {
            s.sync = Some(SyncProgress {
                done_bytes: progress.done,
                total_bytes: progress.total,
                eta_s: progress.eta(now).map(|eta| eta.as_secs()),
            });
            s.rate_bytes_per_s = progress.rate(now) as u64;
        });
        let line = format!(
            "sync: {} of {} ({:.0}%), {}/s, ETA {eta}, {} sent",
            units::format_size(progress.done),
            units::format_size(progress.total),
            progress.done as f64 * 100.0 / progress.total.max(1) as f64,
            units::format_size(progress.rate(now) as u64),
            units::format_size(sent),
        );
        if self.config.json {
            println!(
                "{}",
                serde_json::json!({
                    "event": "progress",
                    "volume": self.config.volume,
                    "done_bytes": progress.done,
                    "total_bytes": progress.total,
                    "rate_bytes_per_s": progress.rate(now) as u64,
                    "eta_s": progress.eta(now).map(|eta| eta.as_secs()),
                    "sent_bytes": sent,
                })
            );
        }
        say(line);
    }

    /// Puts what quinn measures of the path into the status.
    /// The connection's path as the status board shows it (and returns it).
    fn link_stats(&self, link: &Link) -> LinkStats {
        let path = link.connection.stats().path;
        let stats = LinkStats {
            rtt_ms: path.rtt.as_secs_f64() * 1000.0,
            congestion_window_bytes: path.cwnd,
            sent_packets: path.sent_packets,
            lost_packets: path.lost_packets,
            congestion_events: path.congestion_events,
        };
        self.config.status.link(&self.config.volume, stats.clone());
        stats
    }

    fn report(
        &self,
        kind: &str,
        point: &PointInfo,
        stats: &PassStats,
        took: Duration,
        path: &LinkStats,
    ) {
        if kind == "cycle" {
            self.config
                .status
                .shipped(&self.config.volume, stats.read_bytes, took.as_secs_f64());
        }
        self.config.status.committed(
            &self.config.volume,
            PointSummary::from(point),
            point.complete,
            stats.wire_bytes,
            took.as_secs_f64(),
        );
        if self.config.json {
            println!(
                "{}",
                serde_json::json!({
                    "event": "committed",
                    "kind": kind,
                    "volume": self.config.volume,
                    "seq": point.seq,
                    "generation": point.generation,
                    "epoch": point.epoch,
                    "time_unix_ms": point.time_unix_ms,
                    "bytes": point.bytes,
                    "read_bytes": stats.read_bytes,
                    "sent_bytes": stats.wire_bytes,
                    "same_bytes": stats.same_bytes,
                    "resumed_bytes": stats.resumed_bytes,
                    "zstd_level": (self.config.compression != Compression::Off)
                        .then(|| self.compression.level()),
                    "consistent": point.consistent,
                    "app_consistent": point.app_consistent,
                    "freeze_ms": point.freeze_ms,
                    "complete": point.complete,
                    "synced_to": point.synced_to,
                    "duration_ms": took.as_millis() as u64,
                    "commit_ms": self.last_commit.as_millis() as u64,
                    "rtt_ms": path.rtt_ms,
                    "congestion_window_bytes": path.congestion_window_bytes,
                    "lost_packets": path.lost_packets,
                    "congestion_events": path.congestion_events,
                })
            );
        } else {
            println!(
                "committed {kind} {} of volume {}: {} changed, {} read, {} sent, {}, {:.2}s",
                point.seq,
                self.config.volume,
                units::format_size(point.bytes),
                units::format_size(stats.read_bytes),
                units::format_size(stats.wire_bytes),
                if !point.complete {
                    format!("sync step (replica whole up to {})", point.synced_to)
                } else if point.app_consistent {
                    format!(
                        "application-consistent (pre_freeze ok, frozen {} ms)",
                        point.freeze_ms
                    )
                } else if point.consistent {
                    format!("crash-consistent (frozen {} ms)", point.freeze_ms)
                } else {
                    "fuzzy (not frozen)".to_owned()
                },
                took.as_secs_f64()
            );
        }
    }

    /// Reads `plan` and sends it on several data streams.
    async fn send_pass(
        &mut self,
        link: &mut Link,
        seq: u64,
        plan: &PassPlan,
        compare: Compare,
    ) -> Result<PassStats, AgentError> {
        let (tx, rx) = mpsc::channel::<Vec<u8>>(64);
        let senders = self.spawn_senders(link, rx).await?;
        let mut stats = PassStats::default();
        let produced = tokio::task::block_in_place(|| {
            self.produce(plan, seq, &compare, &mut stats, &mut |frame| {
                tx.blocking_send(frame)
                    .map_err(|_| ReadError::Sink("the data streams closed".into()))
            })
        });
        drop(tx);
        // A sender's error (the connection broke) explains a producer's "streams closed".
        stats.wire_bytes = join_senders(senders).await?;
        produced?;
        Ok(stats)
    }

    /// Sends frames already in memory.
    async fn send_frames(
        &mut self,
        link: &mut Link,
        frames: Vec<Vec<u8>>,
        mut stats: PassStats,
    ) -> Result<PassStats, AgentError> {
        let (tx, rx) = mpsc::channel::<Vec<u8>>(64);
        let senders = self.spawn_senders(link, rx).await?;
        for frame in frames {
            if tx.send(frame).await.is_err() {
                break;
            }
        }
        drop(tx);
        stats.wire_bytes = join_senders(senders).await?;
        Ok(stats)
    }

    async fn spawn_senders(
        &self,
        link: &Link,
        rx: mpsc::Receiver<Vec<u8>>,
    ) -> Result<Vec<tokio::task::JoinHandle<Result<u64, AgentError>>>, AgentError> {
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let mut senders = Vec::new();
        for _ in 0..self.config.streams.max(1) {
            let mut stream = link.connection.open_uni().await.map_err(NetError::from)?;
            let rx = rx.clone();
            let rate = self.rate.clone();
            let started = self.started;
            senders.push(tokio::spawn(async move {
                let mut sent = 0u64;
                loop {
                    let frame = rx.lock().await.recv().await;
                    let Some(frame) = frame else { break };
                    if let Some(rate) = &rate {
                        let wait = rate
                            .lock()
                            .expect("rate lock")
                            .take(frame.len() as u64, started.elapsed());
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                    }
                    sent += frame.len() as u64;
                    net::write_encoded(&mut stream, frame).await?;
                }
                let _ = stream.finish();
                Ok(sent)
            }));
        }
        Ok(senders)
    }

    /// Reads the plan and turns it into encoded data frames (blocking).
    fn produce(
        &mut self,
        plan: &PassPlan,
        seq: u64,
        compare: &Compare,
        stats: &mut PassStats,
        sink: &mut dyn FnMut(Vec<u8>) -> Result<(), ReadError>,
    ) -> Result<(), ReadError> {
        let compression =
            (self.config.compression != Compression::Off).then_some(&mut self.compression);
        let mut builder = FrameBuilder::new(seq, self.chunk, compare, compression);
        // Time spent waiting for the data streams to take a frame: the link's share of the
        // pass, which (with the time spent compressing) sets the compression level.
        let blocked = std::cell::Cell::new(Duration::ZERO);
        let mut emit = |frame: DataFrameRef<'_>| {
            let started = Instant::now();
            let sent = sink(wire::encode(&frame));
            blocked.set(blocked.get() + started.elapsed());
            sent
        };
        for &(offset, length) in &plan.zero {
            builder.zero_range(offset, length, &mut emit)?;
        }
        // Each second of the pass: how long the producer worked and waited, and how much CPU
        // the machine had idle.
        let mut window = LevelWindow::start(idle_cpu_ticks());
        let read = self.reader.read(&plan.read, &mut |offset, data| {
            let started = Instant::now();
            let waited_before = blocked.get();
            let built = builder.piece(offset, data, &mut emit);
            let waited = blocked.get() - waited_before;
            window.work += started.elapsed().saturating_sub(waited);
            window.waited += waited;
            let elapsed = window.started.elapsed();
            if elapsed >= Duration::from_secs(1) {
                let idle = idle_cpu_ticks();
                let idle_cores = match (window.idle_ticks, idle) {
                    (Some(then), Some(now)) => {
                        now.saturating_sub(then) as f64 / CLOCK_TICKS / elapsed.as_secs_f64()
                    }
                    // Unknown: assume the machine has nothing to spare.
                    _ => 0.0,
                };
                builder.observe(elapsed, window.work, window.waited, idle_cores);
                window = LevelWindow::start(idle);
            }
            built
        });
        stats.add_frames(builder.stats);
        read.map(|_| ())
    }
}

/// What the producer measures over one second of a pass, for the compression level.
struct LevelWindow {
    started: Instant,
    /// Compressing and framing.
    work: Duration,
    /// Waiting for the data streams to take a frame.
    waited: Duration,
    /// The machine's idle CPU ticks when the window started.
    idle_ticks: Option<u64>,
}

impl LevelWindow {
    fn start(idle_ticks: Option<u64>) -> Self {
        Self {
            started: Instant::now(),
            work: Duration::ZERO,
            waited: Duration::ZERO,
            idle_ticks,
        }
    }
}

/// Clock ticks per second in `/proc/stat` (`USER_HZ`, 100 on Linux's architectures).
const CLOCK_TICKS: f64 = 100.0;

/// The machine's idle CPU time so far (idle and iowait, all CPUs), in clock ticks, from the
/// first line of `/proc/stat`; `None` where it cannot be read.
fn idle_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    Some(fields.get(3)? + fields.get(4).copied().unwrap_or(0))
}

/// Thaws; a failure is reported and the freeze counted as overrun (the guard thaws at its
/// deadline), but never stops the cycle: the cut is taken and its data must still be sent.
fn thaw_reporting(frozen: Frozen) -> freeze::Thawed {
    let held = frozen.elapsed();
    frozen.thaw().unwrap_or_else(|error| {
        say(format!("{error}; the thaw guard will thaw it"));
        freeze::Thawed {
            held,
            by_guard: true,
        }
    })
}

struct FrozenPass {
    plan: PassPlan,
    frames: Option<Vec<Vec<u8>>>,
    stats: PassStats,
    held: Duration,
    by_guard: bool,
    cut_time: u64,
    epoch: u64,
    /// The consistency group's cut, when the whole group was frozen for this pass.
    group_cut: Option<u64>,
}

async fn join_senders(
    senders: Vec<tokio::task::JoinHandle<Result<u64, AgentError>>>,
) -> Result<u64, AgentError> {
    let mut total = 0;
    let mut failure = None;
    for sender in senders {
        match sender.await {
            Ok(Ok(sent)) => total += sent,
            Ok(Err(error)) => failure = failure.or(Some(error)),
            Err(error) => failure = failure.or(Some(AgentError::Protocol(error.to_string()))),
        }
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(total),
    }
}

pub(crate) fn load_state(path: &Path) -> Result<Option<AgentState>, AgentError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(AgentError::State {
                path: path.to_owned(),
                message: error.to_string(),
            });
        }
    };
    let state: AgentState = serde_json::from_str(&text).map_err(|error| AgentError::State {
        path: path.to_owned(),
        message: error.to_string(),
    })?;
    if state.format != STATE_FORMAT {
        return Err(AgentError::State {
            path: path.to_owned(),
            message: format!("format {} (this build reads {STATE_FORMAT})", state.format),
        });
    }
    Ok(Some(state))
}

/// What the agent keeps of the path to its receiver between runs (`agent-VOLUME.path.json`),
/// for Careful Resume (see [`blkmirror_protocol::cubic`]).
#[derive(Debug, Serialize, Deserialize)]
struct SavedPath {
    /// The `--receiver` it was observed with: another receiver is another path.
    receiver: String,
    /// The floor round trip, microseconds.
    floor_us: u64,
    /// The congestion window, bytes.
    window: u64,
    /// When it was kept.
    saved_unix_ms: u64,
}

impl SavedPath {
    /// How long a memory of the path is trusted: past this, the path may have changed for
    /// other reasons than what its round trip shows.
    const LIFETIME_MS: u64 = 3_600_000;
    /// A window or round trip beyond these is not a path this agent observed.
    const MAX_WINDOW: u64 = 1 << 30;
    const MAX_FLOOR_US: u64 = 10_000_000;
}

fn path_memory_file(state_path: &Path) -> PathBuf {
    state_path.with_extension("path.json")
}

/// The path memory kept by an earlier run, when it is for `receiver`, recent and plausible;
/// anything else (missing, unreadable, stale, another receiver) starts from slow start.
fn load_path_memory(state_path: &Path, receiver: &str, now_unix_ms: u64) -> Option<PathMemory> {
    let bytes = std::fs::read(path_memory_file(state_path)).ok()?;
    let saved: SavedPath = serde_json::from_slice(&bytes).ok()?;
    let fresh = now_unix_ms.saturating_sub(saved.saved_unix_ms) < SavedPath::LIFETIME_MS
        && saved.saved_unix_ms <= now_unix_ms;
    let plausible = (1..=SavedPath::MAX_FLOOR_US).contains(&saved.floor_us)
        && (1..=SavedPath::MAX_WINDOW).contains(&saved.window);
    (saved.receiver == receiver && fresh && plausible).then(|| PathMemory {
        floor: Duration::from_micros(saved.floor_us),
        window: saved.window,
    })
}

pub(crate) fn store_state(path: &Path, state: &AgentState) -> Result<(), AgentError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|error| AgentError::State {
            path: dir.to_owned(),
            message: error.to_string(),
        })?;
    }
    let text = serde_json::to_vec(state).expect("state serializes");
    crate::durable::write_atomic(path, &text).map_err(|error| AgentError::State {
        path: path.to_owned(),
        message: error.to_string(),
    })
}

/// A sync window's comparison from the receiver's answer to its hash request (the agent's and
/// the load generator's sessions ask the same way).
pub(crate) fn hashes_compare(answer: Answer, count: u32) -> Result<Compare, AgentError> {
    match answer {
        Answer::Hashes {
            first_chunk,
            hashes,
        } => Ok(Compare::Hashes {
            first_chunk,
            hashes,
        }),
        other => Err(AgentError::Protocol(format!(
            "expected {count} hashes, got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run resumes the path of the run before only for the same receiver, within the
    /// lifetime, and from a file that holds plausible values; anything else is slow start.
    #[test]
    fn a_kept_path_memory_is_used_only_when_it_fits() {
        let dir = crate::testing::TempDir::new("path-memory");
        let state_path = dir.0.join("agent-v.json");
        let write = |receiver: &str, floor_us: u64, window: u64, saved_unix_ms: u64| {
            let saved = SavedPath {
                receiver: receiver.into(),
                floor_us,
                window,
                saved_unix_ms,
            };
            std::fs::write(
                path_memory_file(&state_path),
                serde_json::to_vec(&saved).unwrap(),
            )
            .unwrap();
        };
        let now = 1_800_000_000_000;
        assert_eq!(load_path_memory(&state_path, "dr:7000", now), None);
        write("dr:7000", 200_000, 3 << 20, now - 60_000);
        assert_eq!(
            load_path_memory(&state_path, "dr:7000", now),
            Some(PathMemory {
                floor: Duration::from_millis(200),
                window: 3 << 20
            })
        );
        assert_eq!(load_path_memory(&state_path, "other:7000", now), None);
        write(
            "dr:7000",
            200_000,
            3 << 20,
            now - 2 * SavedPath::LIFETIME_MS,
        );
        assert_eq!(load_path_memory(&state_path, "dr:7000", now), None);
        write("dr:7000", 200_000, 3 << 20, now + 60_000);
        assert_eq!(load_path_memory(&state_path, "dr:7000", now), None);
        write("dr:7000", 0, 3 << 20, now);
        assert_eq!(load_path_memory(&state_path, "dr:7000", now), None);
        write("dr:7000", 200_000, u64::MAX, now);
        assert_eq!(load_path_memory(&state_path, "dr:7000", now), None);
        std::fs::write(path_memory_file(&state_path), b"{\"receiver\": 3").unwrap();
        assert_eq!(load_path_memory(&state_path, "dr:7000", now), None);
    }

    #[test]
    fn a_log_is_short_when_it_does_not_reach_an_interval_and_the_margin_back() {
        let minute = Duration::from_secs(60);
        assert!(!log_reach_is_short(None, minute));
        assert!(!log_reach_is_short(Some(Duration::from_secs(65)), minute));
        assert!(log_reach_is_short(Some(Duration::from_secs(64)), minute));
        assert!(log_reach_is_short(
            Some(Duration::ZERO),
            Duration::from_secs(1)
        ));
    }
}
