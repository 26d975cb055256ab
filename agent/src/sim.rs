//! A deterministic simulation of replication, in the spirit of FoundationDB's simulator and
//! TigerBeetle's VOPR: the real session state machines ([`SourceSession`],
//! [`ReceiverSession`]) and the real volume store ([`Volume`]: journal, apply, points, hashes)
//! run against a simulated source device under a random writer, a link that drops, a receiver
//! that crashes, a tracker that loses its history, and now and then a hostile (granted) agent.
//! Everything random comes from one seed, so a failing seed replays exactly and prints its
//! trace.
//!
//! # What is simulated, and what is real
//!
//! * Real: both session machines, [`Volume`] and its files (on tmpfs when there is one),
//!   [`PointReader`] for restores.
//! * Simulated: the device (one fill byte per chunk, from a small alphabet, so contents recur
//!   the way real blocks do), the tracker (a dirty set, cut into the agent's durable in-flight
//!   set), the network (a connection is a sequence of messages; it can drop before any of them),
//!   process crashes at message boundaries (a crashed receiver loses its open cycle but not
//!   its files; a crashed agent keeps what it persisted), and source host reboots (the
//!   tracker's history is lost: a new generation, and a verify sync).
//! * Not yet: torn or lost writes after the last fsync (the store does its own file IO; a
//!   storage interface for it is the next step), the QUIC layer itself (duplicates and
//!   reordering of packets are quinn's to hide), clocks.
//!
//! # Invariants, checked after every connection and at the end
//!
//! * The image equals the newest point whenever the volume is settled, and each point the
//!   volume lists was committed with exactly that content.
//! * Every committed complete point stays listed (retention keeps all in a run) and restores
//!   byte for byte, its stored hashes included.
//! * Once faults stop, the replica converges to the source.
//!
//! `cargo xtask simulate --seeds N` runs more seeds than the unit test does.

use std::{
    cell::Cell,
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
};

use blkmirror_protocol::{
    session::{Answer, ControlStep, ReceiverSession, SessionError, SourceRecord, SourceSession},
    wire::{
        self, AgentMessage, Begin, CheckedData, ChunkHash, Hello, PROTOCOL_VERSION, PointInfo,
        ReceiverMessage, RefusalCode, Welcome,
    },
};

use crate::dr::volume::{PointReader, StoreError, Volume};

/// Bugs of the past, re-introduced on demand to prove that the simulator finds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// A direct (unjournaled) `Begin` is obeyed on a volume with history, wiping its points
    /// (hardening issue, finding 1).
    DirectBeginAfterHistory,
    /// An interrupted direct sync step leaves the hashes of the chunks it wrote stale: neither
    /// its abort nor the next open of the volume records them (hardening issue, finding 2, as
    /// it was before the fix).
    StaleHashesAfterAbort,
}

thread_local! {
    static BUG: Cell<Option<Bug>> = const { Cell::new(None) };
}

/// Whether `bug` is re-introduced on this thread (only ever in this module's runs).
pub fn bug(bug: Bug) -> bool {
    BUG.with(|b| b.get() == Some(bug))
}

const CHUNK: u64 = 4096;
const CHUNKS: u64 = 24;
const SIZE: u64 = CHUNK * CHUNKS;
/// Chunks per hash request (and per direct sync step).
const WINDOW_CHUNKS: u64 = 8;
const VOLUME: &str = "sim";

/// splitmix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `per_mille`/1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// Why a connection ended early.
#[derive(Debug)]
enum Cut {
    /// The link dropped; the receiver notices and aborts the open cycle.
    LinkDown,
    /// The receiver process died; it restarts from its files.
    ReceiverCrash,
    /// The agent process died; it restarts from its state file.
    AgentCrash,
    /// The receiver refused (a hostile agent, or a session it would not serve).
    Refused(RefusalCode, String),
    /// The tracker lost history in the middle of a cycle.
    TrackingLost,
}

impl From<SessionError> for Cut {
    fn from(error: SessionError) -> Self {
        match error {
            SessionError::Refused { code, message } => Cut::Refused(code, message),
            SessionError::Protocol(message) => Cut::Refused(RefusalCode::Protocol, message),
        }
    }
}

/// A violated invariant.
#[derive(Debug)]
pub struct Violation {
    /// The seed that found it.
    pub seed: u64,
    /// What was violated.
    pub what: String,
    /// The steps that led there.
    pub trace: Vec<String>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {}: {}", self.seed, self.what)?;
        writeln!(f, "trace ({} steps):", self.trace.len())?;
        for step in &self.trace {
            writeln!(f, "  {step}")?;
        }
        Ok(())
    }
}

struct World {
    rng: Rng,
    seed: u64,
    dir: PathBuf,
    /// Fill byte of each source chunk (0: all zeros).
    source: Vec<u8>,
    /// Chunks written since the last cut.
    dirty: BTreeSet<u64>,
    tracker_generation: u64,
    /// The agent's state file.
    record: SourceRecord,
    inflight: BTreeSet<u64>,
    /// The receiver process's open volume (`None` while it is down or before a connection).
    volume: Option<Volume>,
    /// What the image must hold: the last commit plus a direct step's writes.
    model: Vec<u8>,
    /// A journaled cycle's writes, until its commit.
    pending: BTreeMap<u64, u8>,
    /// Content of every complete point committed.
    points: BTreeMap<u64, Vec<u8>>,
    faults: bool,
    trace: Vec<String>,
}

fn chunk_bytes(fill: u8) -> Vec<u8> {
    vec![fill; CHUNK as usize]
}

fn chunk_hash(fill: u8) -> ChunkHash {
    if fill == 0 {
        [0; 32]
    } else {
        wire::chunk_hash(&chunk_bytes(fill))
    }
}

fn store_refusal(error: StoreError) -> ReceiverMessage {
    let code = match &error {
        StoreError::Refused(_) => RefusalCode::Forbidden,
        StoreError::Sequence(_) => RefusalCode::Sequence,
        StoreError::DiskFull(_) => RefusalCode::DiskFull,
        _ => RefusalCode::Storage,
    };
    ReceiverMessage::Refused {
        code,
        message: error.to_string(),
    }
}

impl World {
    fn new(seed: u64, dir: &Path) -> Self {
        Self {
            rng: Rng(seed),
            seed,
            dir: dir.to_owned(),
            source: vec![0; CHUNKS as usize],
            dirty: BTreeSet::new(),
            tracker_generation: 1,
            record: SourceRecord {
                needs_full_sync: true,
                ..SourceRecord::default()
            },
            inflight: BTreeSet::new(),
            volume: None,
            model: vec![0; CHUNKS as usize],
            pending: BTreeMap::new(),
            points: BTreeMap::new(),
            faults: true,
            trace: Vec::new(),
        }
    }

    fn note(&mut self, step: impl Into<String>) {
        self.trace.push(step.into());
    }

    fn violation(&self, what: impl Into<String>) -> Violation {
        Violation {
            seed: self.seed,
            what: what.into(),
            trace: self.trace.clone(),
        }
    }

    /// The random writer: a few chunks get new content (from a four-value alphabet).
    fn write(&mut self) {
        let count = 1 + self.rng.below(4);
        let mut written = String::new();
        for _ in 0..count {
            let chunk = self.rng.below(CHUNKS);
            let fill = [0u8, 0x11, 0x22, 0x33][self.rng.below(4) as usize];
            self.source[chunk as usize] = fill;
            self.dirty.insert(chunk);
            let _ = write!(written, " {chunk}={fill:#x}");
        }
        self.note(format!("write{written}"));
    }

    /// Before each message: maybe a fault.
    fn weather(&mut self) -> Result<(), Cut> {
        if !self.faults {
            return Ok(());
        }
        if self.rng.chance(25) {
            self.note("link down");
            self.end_session();
            return Err(Cut::LinkDown);
        }
        if self.rng.chance(15) {
            self.note("receiver crash");
            self.volume = None;
            self.pending.clear();
            return Err(Cut::ReceiverCrash);
        }
        if self.rng.chance(8) {
            // The host restarts: the tracker's pins are gone with its history, so the agent
            // starts with a new generation and must verify.
            self.note("source host reboots");
            self.tracker_generation += 1;
            self.dirty.clear();
            self.record.needs_full_sync = true;
            self.end_session();
            return Err(Cut::AgentCrash);
        }
        if self.rng.chance(10) {
            self.note("agent crash");
            self.end_session();
            return Err(Cut::AgentCrash);
        }
        if self.rng.chance(20) {
            self.write();
        }
        Ok(())
    }

    /// The receiver's side of one control message.
    fn deliver(
        &mut self,
        control: &mut ReceiverSession,
        message: AgentMessage,
    ) -> Result<ReceiverMessage, Cut> {
        self.weather()?;
        self.note(format!("agent -> {}", describe(&message)));
        let step = match control.on_message(message) {
            Ok(step) => step,
            Err(refusal) => {
                return Ok(ReceiverMessage::Refused {
                    code: refusal.code,
                    message: refusal.message,
                });
            }
        };
        let reply = match step {
            ControlStep::Admit(hello) => {
                let (volume, new_volume) = match Volume::open_or_create(&self.dir, &hello) {
                    Ok((volume, new_volume, _)) => (volume, new_volume),
                    Err(error) => return Ok(store_refusal(error)),
                };
                self.note("receiver opens the volume");
                let volume = self.volume.insert(volume);
                ReceiverMessage::Welcome(Welcome {
                    protocol: PROTOCOL_VERSION,
                    new_volume,
                    committed_seq: volume.meta().committed_seq,
                    last_point: volume.last_point_for_agent(),
                    history: volume.has_history(),
                })
            }
            ControlStep::Serve(AgentMessage::HashRequest { first_chunk, count }) => {
                let volume = self.volume.as_ref().expect("admitted");
                match volume.hashes(first_chunk, count) {
                    Ok(hashes) => ReceiverMessage::Hashes {
                        first_chunk,
                        hashes,
                    },
                    Err(error) => store_refusal(error),
                }
            }
            ControlStep::Serve(AgentMessage::Begin(begin)) => {
                let volume = self.volume.as_mut().expect("admitted");
                self.pending.clear();
                match volume.begin(begin.seq, begin.bytes_estimate, begin.direct, begin.from) {
                    Ok(()) => ReceiverMessage::Ready { seq: begin.seq },
                    Err(error) => store_refusal(error),
                }
            }
            ControlStep::Serve(AgentMessage::Flush { frames }) => {
                ReceiverMessage::Flushed { frames }
            }
            ControlStep::Serve(AgentMessage::Hello(_)) => ReceiverMessage::Refused {
                code: RefusalCode::Sequence,
                message: "second Hello".into(),
            },
            ControlStep::Serve(AgentMessage::Commit { point, .. }) => {
                let volume = self.volume.as_mut().expect("admitted");
                let direct = volume.meta().unsettled;
                match volume.commit(point) {
                    Ok(()) => {
                        for (chunk, fill) in std::mem::take(&mut self.pending) {
                            self.model[chunk as usize] = fill;
                        }
                        let meta = volume.meta();
                        let seq = meta.committed_seq;
                        if meta.points.last().is_some_and(|p| p.seq == seq) {
                            self.points.insert(seq, self.model.clone());
                        }
                        self.note(format!(
                            "receiver commits {seq}{}",
                            if direct { " (direct step)" } else { "" }
                        ));
                        ReceiverMessage::Committed { seq }
                    }
                    Err(error) => {
                        self.pending.clear();
                        store_refusal(error)
                    }
                }
            }
        };
        self.note(format!("receiver -> {}", describe_reply(&reply)));
        Ok(reply)
    }

    /// One data frame of the open cycle.
    fn frame(&mut self, chunk: u64, fill: u8, direct: bool) -> Result<(), Cut> {
        self.weather()?;
        let offset = chunk * CHUNK;
        let data = if fill == 0 {
            CheckedData::Zero {
                offset,
                length: CHUNK,
            }
        } else {
            CheckedData::Write {
                offset,
                data: chunk_bytes(fill),
            }
        };
        let journaled = self.volume.as_mut().expect("admitted").journal(data);
        self.note(format!("agent -> frame {chunk}={fill:#x}"));
        if let Err(error) = journaled {
            self.note(format!("receiver refuses frame: {error}"));
            self.end_session();
            return Err(Cut::Refused(RefusalCode::Sequence, error.to_string()));
        }
        if direct {
            self.model[chunk as usize] = fill;
        } else {
            self.pending.insert(chunk, fill);
        }
        Ok(())
    }

    fn ask(
        &mut self,
        session: &mut SourceSession,
        control: &mut ReceiverSession,
        message: AgentMessage,
    ) -> Result<Answer, Cut> {
        let reply = self.deliver(control, message)?;
        Ok(session.on_reply(reply)?)
    }

    fn persist(&mut self, session: &SourceSession) {
        self.record = session.record().clone();
    }

    /// One connection of the agent: hello, a sync if due, then a few cycles.
    fn connection(&mut self, hostile: bool) -> Result<(), Cut> {
        let mut session = SourceSession::new(self.record.clone());
        let mut control = ReceiverSession::new();
        let hello = session.hello(Hello {
            protocol: PROTOCOL_VERSION,
            volume: VOLUME.into(),
            source_id: "sim-device".into(),
            size_bytes: SIZE,
            chunk_bytes: CHUNK,
        })?;
        let reply = self.deliver(&mut control, hello)?;
        let welcomed = session.on_welcome(reply, self.tracker_generation)?;
        if welcomed.clear_inflight {
            self.inflight.clear();
        }
        self.persist(&session);
        if hostile {
            return self.hostile(&mut session, &mut control);
        }
        let mut sync_from = welcomed.sync_from;
        for _ in 0..1 + self.rng.below(4) {
            if let Some(from) = sync_from.take() {
                self.sync(&mut session, &mut control, from)?;
            }
            match self.cycle(&mut session, &mut control) {
                Err(Cut::TrackingLost) => {
                    sync_from = Some(session.tracking_lost());
                    self.persist(&session);
                }
                other => other?,
            }
            self.write();
        }
        Ok(())
    }

    /// A granted but hostile agent: a direct step over a volume, whatever its history.
    fn hostile(
        &mut self,
        session: &mut SourceSession,
        control: &mut ReceiverSession,
    ) -> Result<(), Cut> {
        self.note("hostile agent: direct Begin");
        let seq = session.next_seq();
        let begin = session.begin(Begin {
            seq,
            bytes_estimate: SIZE,
            direct: true,
            from: 0,
        })?;
        self.ask(session, control, begin)?;
        for chunk in 0..CHUNKS {
            self.frame(chunk, 0x77, true)?;
        }
        Err(Cut::LinkDown)
    }

    /// A sync pass from `from`, as the agent runs it.
    fn sync(
        &mut self,
        session: &mut SourceSession,
        control: &mut ReceiverSession,
        from: u64,
    ) -> Result<(), Cut> {
        if session.sync_needs_fresh_cut(from) {
            self.dirty.clear();
            self.inflight.clear();
            session.sync_started(self.tracker_generation);
            self.persist(session);
        }
        let from = session.sync_start(from);
        let shape = session.sync_shape(SIZE, WINDOW_CHUNKS * CHUNK, WINDOW_CHUNKS * CHUNK);
        let initial = session.initial_sync();
        self.note(format!(
            "sync from {from} ({}{})",
            if shape.direct { "direct" } else { "journaled" },
            if initial { ", initial" } else { "" }
        ));
        let mut start = from - from % shape.step_bytes;
        while start < SIZE {
            let end = (start + shape.step_bytes).min(SIZE);
            let seq = session.next_seq();
            let begin = session.begin(Begin {
                seq,
                bytes_estimate: end - start,
                direct: shape.direct,
                from: start,
            })?;
            self.ask(session, control, begin)?;
            let mut frames = 0;
            let mut window = start;
            while window < end {
                let window_end = (window + WINDOW_CHUNKS * CHUNK).min(end);
                let first = window / CHUNK;
                let count = ((window_end - window) / CHUNK) as u32;
                let replica = if initial {
                    vec![[0u8; 32]; count as usize]
                } else {
                    let request = session.hash_request(first, count)?;
                    match self.ask(session, control, request)? {
                        Answer::Hashes { hashes, .. } => hashes,
                        other => {
                            return Err(Cut::Refused(RefusalCode::Protocol, format!("{other:?}")));
                        }
                    }
                };
                for (index, hash) in replica.iter().enumerate() {
                    let chunk = first + index as u64;
                    let fill = self.source[chunk as usize];
                    if chunk_hash(fill) != *hash {
                        self.frame(chunk, fill, shape.direct)?;
                        frames += 1;
                    }
                }
                window = window_end;
            }
            let point = PointInfo {
                seq,
                complete: !shape.direct,
                synced_to: end,
                generation: self.tracker_generation,
                time_unix_ms: 1,
                ..PointInfo::default()
            };
            let commit = session.commit(frames, point)?;
            self.ask(session, control, commit)?;
            self.persist(session);
            start = end;
        }
        Ok(())
    }

    /// One incremental cycle: cut into the in-flight set, send it, commit.
    fn cycle(
        &mut self,
        session: &mut SourceSession,
        control: &mut ReceiverSession,
    ) -> Result<(), Cut> {
        if self.faults && self.rng.chance(30) {
            self.note("tracker loses history");
            self.tracker_generation += 1;
            return Err(Cut::TrackingLost);
        }
        self.inflight.extend(std::mem::take(&mut self.dirty));
        self.persist(session);
        let seq = session.next_seq();
        let begin = session.begin(Begin {
            seq,
            bytes_estimate: self.inflight.len() as u64 * CHUNK,
            direct: false,
            from: 0,
        })?;
        self.ask(session, control, begin)?;
        let chunks: Vec<u64> = self.inflight.iter().copied().collect();
        for &chunk in &chunks {
            let fill = self.source[chunk as usize];
            self.frame(chunk, fill, false)?;
        }
        let flush = session.flush(chunks.len() as u64)?;
        self.ask(session, control, flush)?;
        let point = PointInfo {
            seq,
            complete: true,
            generation: self.tracker_generation,
            time_unix_ms: 1,
            ..PointInfo::default()
        };
        let commit = session.commit(chunks.len() as u64, point)?;
        self.ask(session, control, commit)?;
        self.inflight.clear();
        self.persist(session);
        Ok(())
    }

    /// The receiver's side of a connection's end: the session aborts its open cycle and
    /// releases the volume (the next connection opens it again, as the receiver does).
    fn end_session(&mut self) {
        if let Some(mut volume) = self.volume.take() {
            volume.abort();
        }
        self.pending.clear();
    }

    /// Reads the receiver's image file.
    fn image(&self) -> Vec<u8> {
        let bytes = std::fs::read(self.dir.join(VOLUME).join("image.raw")).unwrap_or_default();
        bytes.chunks(CHUNK as usize).map(|chunk| chunk[0]).collect()
    }

    /// The invariants (see the module docs).
    fn check(&mut self) -> Result<(), Violation> {
        if !self.dir.join(VOLUME).join("volume.json").exists() {
            return Ok(());
        }
        // A restore takes a shared lock and reads the files, as `blkmirror restore` does.
        let reader = match PointReader::open(&self.dir, VOLUME) {
            Ok(reader) => reader,
            Err(error) => return Err(self.violation(format!("the volume cannot be read: {error}"))),
        };
        let meta = reader.meta().clone();
        if !meta.unsettled
            && meta
                .points
                .last()
                .is_some_and(|p| p.seq == meta.committed_seq)
        {
            let image = self.image();
            if image != self.model {
                return Err(self.violation(format!(
                    "the settled image {image:?} is not the newest point {:?}",
                    self.model
                )));
            }
        }
        let listed: BTreeSet<u64> = meta.points.iter().map(|p| p.seq).collect();
        for (&seq, content) in &self.points {
            if !listed.contains(&seq) && !meta.unsettled {
                return Err(self.violation(format!(
                    "committed point {seq} is gone (points now {listed:?})"
                )));
            }
            if meta.unsettled || !listed.contains(&seq) {
                continue;
            }
            let mut restored = Vec::new();
            let bad = reader.read_point(seq, true, |_, data| {
                restored.push(data.map_or(0, |d| d[0]));
                Ok(())
            });
            match bad {
                Ok(bad) if bad.is_empty() && restored == *content => {}
                Ok(bad) => {
                    return Err(self.violation(format!(
                        "point {seq} restores as {restored:?} (corrupt chunks at {bad:?}), \
                         committed as {content:?}"
                    )));
                }
                Err(error) => {
                    return Err(self.violation(format!("point {seq} cannot be read: {error}")));
                }
            }
        }
        if meta.unsettled && !self.points.is_empty() {
            return Err(self.violation(
                "a volume with committed points was left unsettled (its history is gone)",
            ));
        }
        Ok(())
    }

    fn run(mut self, bug: Option<Bug>) -> Result<(), Violation> {
        BUG.with(|b| b.set(bug));
        let result = self.run_inner();
        BUG.with(|b| b.set(None));
        result
    }

    fn run_inner(&mut self) -> Result<(), Violation> {
        let rounds = 4 + self.rng.below(8);
        for _ in 0..rounds {
            let hostile = self.rng.chance(120);
            let outcome = self.connection(hostile);
            self.end_session();
            // The source keeps running while the agent is away.
            if self.rng.chance(500) {
                self.write();
            }
            if let Err(cut) = outcome {
                match &cut {
                    Cut::Refused(code, message) => {
                        self.note(format!("connection ends: refused ({code:?}): {message}"));
                    }
                    other => self.note(format!("connection ends: {other:?}")),
                }
                if matches!(cut, Cut::TrackingLost) {
                    self.record.needs_full_sync = true;
                }
                if matches!(cut, Cut::Refused(..)) {
                    self.end_session();
                }
            }
            self.check()?;
        }
        // Faults stop: the replica must converge.
        self.faults = false;
        self.note("faults stop");
        for _ in 0..4 {
            let outcome = self.connection(false);
            self.end_session();
            if let Err(cut) = outcome {
                return Err(self.violation(format!("no progress without faults: {cut:?}")));
            }
            self.check()?;
        }
        self.inflight.extend(std::mem::take(&mut self.dirty));
        let mut session = SourceSession::new(self.record.clone());
        let mut control = ReceiverSession::new();
        let hello = session
            .hello(Hello {
                protocol: PROTOCOL_VERSION,
                volume: VOLUME.into(),
                source_id: "sim-device".into(),
                size_bytes: SIZE,
                chunk_bytes: CHUNK,
            })
            .expect("hello");
        let welcome = self.deliver(&mut control, hello).expect("no faults");
        let welcomed = session
            .on_welcome(welcome, self.tracker_generation)
            .map_err(|error| self.violation(format!("{error}")))?;
        if let Some(from) = welcomed.sync_from {
            self.sync(&mut session, &mut control, from)
                .map_err(|cut| self.violation(format!("{cut:?}")))?;
        }
        self.cycle(&mut session, &mut control)
            .map_err(|cut| self.violation(format!("{cut:?}")))?;
        self.end_session();
        self.check()?;
        let image = self.image();
        if image != self.source {
            return Err(self.violation(format!(
                "after the faults stopped the replica {image:?} did not converge to the \
                 source {:?}",
                self.source
            )));
        }
        Ok(())
    }
}

fn describe(message: &AgentMessage) -> String {
    match message {
        AgentMessage::Hello(_) => "Hello".into(),
        AgentMessage::HashRequest { first_chunk, count } => {
            format!("HashRequest {first_chunk}+{count}")
        }
        AgentMessage::Begin(begin) => format!(
            "Begin {} ({}, from {})",
            begin.seq,
            if begin.direct { "direct" } else { "journaled" },
            begin.from
        ),
        AgentMessage::Flush { frames } => format!("Flush {frames}"),
        AgentMessage::Commit { frames, point } => format!(
            "Commit {} ({frames} frames, {})",
            point.seq,
            if point.complete { "complete" } else { "step" }
        ),
    }
}

fn describe_reply(reply: &ReceiverMessage) -> String {
    match reply {
        ReceiverMessage::Welcome(welcome) => format!(
            "Welcome (committed {}, history {}, new {})",
            welcome.committed_seq, welcome.history, welcome.new_volume
        ),
        ReceiverMessage::Hashes {
            first_chunk,
            hashes,
        } => {
            format!("Hashes {first_chunk}+{}", hashes.len())
        }
        ReceiverMessage::Ready { seq } => format!("Ready {seq}"),
        ReceiverMessage::Flushed { frames } => format!("Flushed {frames}"),
        ReceiverMessage::Committed { seq } => format!("Committed {seq}"),
        ReceiverMessage::Refused { code, message } => format!("Refused {code:?}: {message}"),
    }
}

/// A scratch directory for one run, on tmpfs when there is one (the store syncs often).
fn scratch(seed: u64) -> crate::testing::TempDir {
    let base = Path::new("/dev/shm");
    if base.is_dir() {
        crate::testing::TempDir::new_in(base, &format!("sim-{seed}"))
    } else {
        crate::testing::TempDir::new(&format!("sim-{seed}"))
    }
}

/// Runs one seed, with `bug` re-introduced if given.
pub fn run_seed(seed: u64, bug: Option<Bug>) -> Result<(), Violation> {
    let dir = scratch(seed);
    World::new(seed, &dir.0).run(bug)
}

/// Runs `seeds` seeds from `first`; returns the first violation, with the shortest trace
/// among the failing seeds.
pub fn run_seeds(first: u64, seeds: u64, bug: Option<Bug>) -> Result<u64, Violation> {
    let mut shortest: Option<Violation> = None;
    let mut failures = 0;
    for seed in first..first + seeds {
        if let Err(violation) = run_seed(seed, bug) {
            failures += 1;
            if shortest
                .as_ref()
                .is_none_or(|s| violation.trace.len() < s.trace.len())
            {
                shortest = Some(violation);
            }
            if failures >= 20 {
                break;
            }
        }
    }
    match shortest {
        Some(violation) => Err(violation),
        None => Ok(seeds),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds per run of the unit tests (`cargo xtask simulate --seeds N` sets more), from
    /// `BLKMIRROR_SIM_FIRST_SEED` (0).
    fn seeds() -> (u64, u64) {
        let var = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(default)
        };
        (
            var("BLKMIRROR_SIM_FIRST_SEED", 0),
            var("BLKMIRROR_SIM_SEEDS", 1000),
        )
    }

    #[test]
    fn replication_survives_random_faults_for_every_seed() {
        let (first, count) = seeds();
        match run_seeds(first, count, None) {
            Ok(ran) => eprintln!("simulated {ran} seeds from {first}: no violation"),
            Err(violation) => panic!("{violation}"),
        }
    }

    #[test]
    fn the_simulator_finds_a_direct_begin_that_wipes_history() {
        let found = run_seeds(seeds().0, seeds().1, Some(Bug::DirectBeginAfterHistory))
            .expect_err("the re-introduced bug must be found");
        eprintln!("{found}");
        assert!(
            found.what.contains("gone") || found.what.contains("unsettled"),
            "{found}"
        );
    }

    #[test]
    fn the_simulator_finds_stale_hashes_after_an_interrupted_direct_step() {
        let found = run_seeds(seeds().0, seeds().1, Some(Bug::StaleHashesAfterAbort))
            .expect_err("the re-introduced bug must be found");
        eprintln!("{found}");
        assert!(
            found.what.contains("restores as") || found.what.contains("converge"),
            "{found}"
        );
    }
}
