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
//! * Real: both session machines and the agent's pass machines ([`Cycle`], [`SyncPass`]);
//!   [`Volume`] (journal, apply, undo deltas, hashes) and
//!   [`PointReader`] for restores, over the [`crate::dr::storage::Storage`] interface; the
//!   receiver's commit path with its audit entries and status board
//!   ([`crate::dr::receiver::commit_and_record`]); the audit log's files and hash chain.
//! * Simulated:
//!   * the device (one fill byte per chunk, from a small alphabet, so contents recur the way
//!     real blocks do) under a random writer, and the tracker (a dirty set, cut into the
//!     agent's durable in-flight set);
//!   * freezes: a cycle freezes now and then, and the seed picks the outcome (the freeze
//!     fails, the remainder is too big, or it is read while frozen); the application writes
//!     right before a freeze and right after the thaw;
//!   * the network: control messages in order (one QUIC stream), data frames on several
//!     streams, so they arrive in any order until a `Flush` or `Commit` (which the receiver
//!     holds until they have). The real agent sends a cycle's first frames before its
//!     `Begin` is answered; the real receiver holds them until the `Begin` opened the cycle
//!     on that connection, so the simulator delivers the `Begin` first; a connection can drop before any message, losing what is on
//!     its way; a journaled cycle it interrupts is kept by the receiver and resumed by the
//!     agent (when it began it, before a crash of its process too) with `Resume`;
//!   * the receiver's disk ([`disk`]): a power cut loses or tears any write not yet synced
//!     and keeps only a prefix of the directory changes not yet synced;
//!   * process deaths: at message boundaries, and, through the disk's fuse, in the middle of
//!     an operation (N storage operations from now), also during the recovery that follows;
//!     the receiver's service restarts it and it recovers at once; a restore may run while
//!     it is down;
//!   * source host reboots (the tracker's history is lost: a new generation, a verify sync)
//!     and a hostile (granted) agent;
//!   * the receiver's clock, which moves on and now and then steps back, and the agent's
//!     clock, a minute off either way.
//! * Not simulated: the QUIC layer itself (packet loss, duplicates and reordering inside a
//!   stream are quinn's to hide), the audit log under power cuts (it is on real files), a
//!   full disk.
//!
//! # Invariants, checked after every connection and at the end
//!
//! * The image equals the newest point whenever the volume is settled, and each point the
//!   volume lists was committed with exactly that content.
//! * Every committed complete point stays listed (retention keeps all in a run), restores
//!   byte for byte with its stored hashes, also after power cuts; points are dated in order.
//! * A point marked consistent holds exactly the source at its frozen cut.
//! * The status board reports no point that `points` does not list.
//! * The audit chain verifies.
//! * A committed chunk version is re-sent at most once per fault since its commit (plus once
//!   when a read landed after the tracker's cut, which pre-copy cannot tell apart).
//! * A resumed cycle sends no chunk version its journal already held (unless a cut since the
//!   cycle began named the chunk, or the read landed after a cut), and the default run
//!   resumes some cycles at all.
//! * Once faults stop, the replica converges to the source.
//!
//! # What it found
//!
//! Besides the two re-introduced bugs ([`Bug`]): a replay that applied a commit record not
//! yet durable (seed 673), a replay that trusted an undo delta whose name was not yet durable
//! (seed 611), point dates that went backwards with the receiver's clock (seed 44), and a
//! journal whose new directory entry was not durable when its commit was applied (seed 1901);
//! all four are fixed.
//!
//! `cargo xtask simulate --seeds N` runs more seeds than the unit test does.

mod disk;

use std::{
    cell::Cell,
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use blkmirror_protocol::{
    extent::{ChangeKind, DirtyBitmaps, Geometry},
    pass::{Cycle, CycleAction, FreezeOutcome, Resumption, SyncAction, SyncPass, WindowCompare},
    session::{Answer, ControlStep, ReceiverSession, SessionError, SourceRecord, SourceSession},
    wire::{
        self, AgentMessage, Begin, CheckedData, ChunkHash, Hello, PROTOCOL_VERSION,
        ReceiverMessage, RefusalCode,
    },
};

use crate::{
    command::status::StatusBoard,
    dr::{
        audit::AuditLog,
        receiver::commit_and_record,
        storage::Disk,
        volume::{PointReader, Recovery, StoreError, Volume},
    },
};
use disk::{Chooser, SimDisk};

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
/// The agent's name in the journal (the receiver records its certificate's fingerprint).
const SIM_AGENT: &str = "sim-agent";

/// Where the simulated receiver keeps its volumes (on the simulated disk).
const DATA_DIR: &str = "/sim/data";
/// The simulated receiver clock's start (Unix ms): 2026-01-01.
const EPOCH_MS: u64 = 1_767_225_600_000;

/// splitmix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Chooser for Rng {
    fn below(&mut self, n: u64) -> u64 {
        Rng::below(self, n)
    }
}

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

/// A data frame on its way to the receiver.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    chunk: u64,
    fill: u8,
    version: u64,
    direct: bool,
}

struct World {
    rng: Rng,
    seed: u64,
    /// The receiver's disk (in memory; it can lose what was not synced).
    disk: SimDisk,
    storage: Disk,
    data_dir: PathBuf,
    /// The receiver's clock (Unix ms); it steps back now and then, as NTP does.
    clock: Arc<AtomicU64>,
    /// The receiver's audit log (real files in the scratch directory) and status board.
    audit: AuditLog,
    status: Arc<StatusBoard>,
    /// The cycle whose commit the receiver was executing when it died, if it was.
    committing: Option<u64>,
    /// Version of each source chunk's content (every write makes a new one), the version of
    /// it the last commit made durable, and the versions sent in the open cycle.
    version: Vec<u64>,
    next_version: u64,
    committed_version: Vec<u64>,
    pending_version: BTreeMap<u64, u64>,
    /// Data frames sent and not yet arrived.
    in_flight: Vec<InFlight>,
    /// Faults so far.
    fault_count: u64,
    /// A cycle that claims a consistent point, and the source as it was at its frozen cut:
    /// the point must hold exactly that.
    expect_consistent: Option<(u64, Vec<u8>)>,
    /// Versions from this one on were written after the newest cut of the tracker, and the
    /// chunk versions sent that way: a read that lands after the cut ships a write that the
    /// next cycle ships again (pre-copy cannot tell), so each may be re-sent once more than
    /// the faults allow.
    read_cut: u64,
    read_after_cut: BTreeSet<(u64, u64)>,
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
    /// The volume the receiver kept when a connection broke in the middle of a journaled
    /// cycle, for the agent to resume.
    kept: Option<Volume>,
    /// The journaled cycle the agent began: its number and every chunk cut since its first
    /// cut (in its state file: lost only with the tracker's history, when the host reboots).
    agent_open_cycle: Option<(u64, BTreeSet<u64>)>,
    /// When a cycle was resumed: the chunk versions its journal held then, less the chunks cut
    /// again since the cycle began. Sending one of them again (unless it was read after a cut)
    /// breaks the resume invariant.
    journaled_at_resume: BTreeMap<u64, u64>,
    /// The agent process died while `agent_open_cycle` was open (counted when it resumes).
    open_cycle_outlived_agent: bool,
    /// The receiver process died and kept the open cycle's journal (counted when it resumes).
    open_cycle_outlived_receiver: bool,
    /// What the image must hold: the last commit plus a direct step's writes.
    model: Vec<u8>,
    /// A journaled cycle's writes, until its commit.
    pending: BTreeMap<u64, u8>,
    /// The same frames in journal order, with their versions: a receiver restarted in the
    /// middle of the cycle keeps the first of them (as many as its journal holds whole).
    journal_order: Vec<(u64, u8, u64)>,
    /// Content of every complete point committed.
    points: BTreeMap<u64, Vec<u8>>,
    faults: bool,
    /// Per chunk: re-sends of its committed version, and the fault count at that commit.
    resent_of: Vec<u64>,
    faults_at_commit: Vec<u64>,
    /// An invariant found broken in the middle of a step (reported by the next check).
    broken: Option<String>,
    trace: Vec<String>,
}

/// Resumed cycles that went on to commit, over every seed run in this process: the test
/// checks that the resume path is exercised at all.
static RESUMED_COMMITS: AtomicU64 = AtomicU64::new(0);

/// Of those, the cycles the agent resumed after its process had died in the middle of them.
static RESUMED_AFTER_AGENT_CRASH: AtomicU64 = AtomicU64::new(0);

/// Of those, the cycles resumed from a journal that a restarted receiver kept.
static RESUMED_AFTER_RECEIVER_CRASH: AtomicU64 = AtomicU64::new(0);

/// The simulated chunks `chunks` as the agent's dirty bitmaps (written).
fn bitmaps(chunks: &BTreeSet<u64>) -> DirtyBitmaps {
    let mut set = DirtyBitmaps::new(Geometry {
        nr_sectors: SIZE / 512,
        chunk_shift: (CHUNK / 512).trailing_zeros() as u64,
    });
    for &chunk in chunks {
        set.set_range(ChangeKind::Write, chunk, chunk + 1);
    }
    set
}

fn chunk_bytes(fill: u8) -> Vec<u8> {
    vec![fill; CHUNK as usize]
}

/// The hash the receiver reports for a chunk of `fill` (as the agent computes it).
fn chunk_hash(fill: u8) -> ChunkHash {
    wire::chunk_hash(&chunk_bytes(fill))
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
        let data_dir = PathBuf::from(DATA_DIR);
        let disk = SimDisk::with_root(&data_dir);
        Self {
            rng: Rng(seed),
            seed,
            storage: Arc::new(disk.clone()),
            disk,
            data_dir,
            clock: Arc::new(AtomicU64::new(EPOCH_MS)),
            audit: AuditLog::in_dir(dir),
            status: Arc::new(StatusBoard::new("receiver")),
            committing: None,
            version: vec![0; CHUNKS as usize],
            next_version: 1,
            committed_version: vec![0; CHUNKS as usize],
            pending_version: BTreeMap::new(),
            in_flight: Vec::new(),
            fault_count: 0,
            expect_consistent: None,
            read_cut: 1,
            read_after_cut: BTreeSet::new(),
            source: vec![0; CHUNKS as usize],
            dirty: BTreeSet::new(),
            tracker_generation: 1,
            record: SourceRecord {
                needs_full_sync: true,
                ..SourceRecord::default()
            },
            inflight: BTreeSet::new(),
            volume: None,
            kept: None,
            agent_open_cycle: None,
            journaled_at_resume: BTreeMap::new(),
            open_cycle_outlived_agent: false,
            open_cycle_outlived_receiver: false,
            model: vec![0; CHUNKS as usize],
            pending: BTreeMap::new(),
            journal_order: Vec::new(),
            points: BTreeMap::new(),
            faults: true,
            resent_of: vec![0; CHUNKS as usize],
            faults_at_commit: vec![0; CHUNKS as usize],
            broken: None,
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
        let chunks: Vec<u64> = (0..count).map(|_| self.rng.below(CHUNKS)).collect();
        self.write_chunks(&chunks);
    }

    /// The writer gives `chunks` new content.
    fn write_chunks(&mut self, chunks: &[u64]) {
        let mut written = String::new();
        for &chunk in chunks {
            let fill = [0u8, 0x11, 0x22, 0x33][self.rng.below(4) as usize];
            self.source[chunk as usize] = fill;
            self.version[chunk as usize] = self.next_version;
            self.next_version += 1;
            self.dirty.insert(chunk);
            let _ = write!(written, " {chunk}={fill:#x}");
        }
        self.note(format!("write{written}"));
    }

    /// Before each message: the receiver's clock moves on, and maybe a fault.
    fn weather(&mut self) -> Result<(), Cut> {
        self.clock
            .fetch_add(self.rng.below(2_000), Ordering::Relaxed);
        if !self.faults {
            return Ok(());
        }
        if self.rng.chance(5) {
            let back = 1 + self.rng.below(600_000);
            self.clock.fetch_sub(back, Ordering::Relaxed);
            self.note(format!("the receiver's clock steps back {back} ms"));
        }
        if self.rng.chance(25) {
            self.note("link down");
            self.fault_count += 1;
            self.end_session(true);
            return Err(Cut::LinkDown);
        }
        if self.rng.chance(15) {
            self.note("receiver crash");
            return Err(self.receiver_dies());
        }
        if self.volume.is_some() && self.rng.chance(12) {
            let operations = self.rng.below(40);
            self.note(format!(
                "the receiver will die {operations} storage operations from now"
            ));
            self.disk.arm(operations);
        }
        if self.rng.chance(8) {
            // The host restarts: the tracker's pins are gone with its history, so the agent
            // starts with a new generation and must verify.
            self.note("source host reboots");
            self.fault_count += 1;
            self.tracker_generation += 1;
            self.dirty.clear();
            self.record.needs_full_sync = true;
            self.agent_open_cycle = None;
            self.end_session(true);
            return Err(Cut::AgentCrash);
        }
        if self.rng.chance(10) {
            self.note("agent crash");
            self.fault_count += 1;
            // The open cycle survives: the agent writes it to its state file at the cycle's
            // `Begin` and with every cut (as `persist` does here), and a restarted agent of
            // the same tracker generation resumes it.
            self.open_cycle_outlived_agent |= self.agent_open_cycle.is_some();
            self.end_session(true);
            return Err(Cut::AgentCrash);
        }
        if self.rng.chance(20) {
            self.write();
        }
        Ok(())
    }

    /// The agent's cut time: the receiver's clock a little earlier, off by up to a minute
    /// either way (the clocks of two hosts never agree).
    fn agent_time(&mut self) -> u64 {
        let now = self.clock.load(Ordering::Relaxed);
        (now + self.rng.below(120_000)).saturating_sub(60_000 + self.rng.below(5_000))
    }

    fn clock_fn(&self) -> crate::dr::volume::Clock {
        let clock = self.clock.clone();
        Arc::new(move || clock.load(Ordering::Relaxed))
    }

    fn volume_json(&self) -> PathBuf {
        self.data_dir.join(VOLUME).join("volume.json")
    }

    /// The receiver process dies (a crash, or its fuse went off in the middle of an
    /// operation), maybe with a power cut, and its service restarts it: it recovers the
    /// volume at once, as the receiver's start-up does. Now and then someone runs a restore
    /// while it is down.
    fn receiver_dies(&mut self) -> Cut {
        self.fault_count += 1;
        // The process is gone: no abort, nothing more reaches the disk.
        if let Some(volume) = self.volume.take() {
            volume.die();
        }
        if let Some(volume) = self.kept.take() {
            volume.die();
        }
        for attempt in 0..8 {
            let power_cut = self.rng.chance(400);
            let lost = self.disk.restart(power_cut, &mut self.rng);
            if power_cut {
                self.note(format!("power cut at the receiver: {lost}"));
            }
            self.status = Arc::new(StatusBoard::new("receiver"));
            if self.rng.chance(200) {
                self.note("a restore runs while the receiver is down");
                if let Err(what) = self.check_points(true) {
                    self.broken.get_or_insert(what);
                }
            }
            // Deaths in the middle of recovery, but not forever: the check below is that a
            // recovery left alone finishes, and a run of 8 armed deaths (about 1 in 60,000
            // crashes) is bad luck, not a stuck receiver (seed 200728).
            if attempt < 4 && self.rng.chance(300) {
                let operations = self.rng.below(30);
                self.note(format!(
                    "the restarted receiver will die {operations} storage operations from now"
                ));
                self.disk.arm(operations);
            }
            match self.recover() {
                Ok(()) => return Cut::ReceiverCrash,
                Err(_) if self.disk.dead() => {
                    self.note("the receiver dies again while it recovers")
                }
                Err(error) => {
                    let what = format!("the volume does not recover after a crash: {error}");
                    self.broken.get_or_insert(what);
                    return Cut::ReceiverCrash;
                }
            }
        }
        self.broken
            .get_or_insert_with(|| "the receiver never finished recovering".into());
        Cut::ReceiverCrash
    }

    /// The receiver's start-up recovery of the volume, and what the model learns from it: a
    /// commit that was under way when the receiver died either happened or did not.
    fn recover(&mut self) -> Result<(), StoreError> {
        if !self.storage.exists(&self.volume_json()) {
            self.committing = None;
            self.forget_open_cycle();
            return Ok(());
        }
        let (volume, recovery) =
            Volume::open_on(&self.storage, self.clock_fn(), &self.data_dir, VOLUME)?;
        let meta = volume.meta().clone();
        if let Some(seq) = self.committing.take()
            && meta.committed_seq == seq
        {
            self.settle_commit(seq, meta.points.last().is_some_and(|p| p.seq == seq));
        }
        if let Recovery::Kept { seq, frames } = recovery {
            // The journal keeps its first `frames` frames, for the agent to resume: the model's
            // open cycle is those.
            if frames > self.journal_order.len() as u64 {
                self.broken.get_or_insert_with(|| {
                    format!(
                        "the restarted receiver kept {frames} frames of cycle {seq}, but only {} \
                         were journaled",
                        self.journal_order.len()
                    )
                });
            }
            self.journal_order.truncate(frames as usize);
            self.pending.clear();
            self.pending_version.clear();
            for &(chunk, fill, version) in &self.journal_order {
                self.pending.insert(chunk, fill);
                self.pending_version.insert(chunk, version);
            }
            self.kept = Some(volume);
            self.open_cycle_outlived_receiver = true;
        } else {
            self.forget_open_cycle();
        }
        if meta.unsettled {
            // The image is at no point in time until the sync completes: what a direct step
            // wrote before the crash may or may not be there.
            self.model = self.image();
        }
        self.note(format!(
            "receiver restarts: {recovery:?}, committed {}",
            meta.committed_seq
        ));
        Ok(())
    }

    /// The open cycle's journal is gone (aborted, refused, or never kept): the model forgets
    /// what it had journaled.
    fn forget_open_cycle(&mut self) {
        self.pending.clear();
        self.pending_version.clear();
        self.journal_order.clear();
    }

    /// A commit of cycle `seq` happened: the model takes its writes.
    fn settle_commit(&mut self, seq: u64, listed: bool) {
        self.journal_order.clear();
        for (chunk, fill) in std::mem::take(&mut self.pending) {
            self.model[chunk as usize] = fill;
        }
        for (chunk, version) in std::mem::take(&mut self.pending_version) {
            let chunk = chunk as usize;
            self.committed_version[chunk] = version;
            self.resent_of[chunk] = 0;
            self.faults_at_commit[chunk] = self.fault_count;
        }
        if let Some((expected_seq, source)) = self.expect_consistent.take()
            && expected_seq == seq
            && source != self.model
        {
            self.broken.get_or_insert_with(|| {
                format!(
                    "point {seq} is marked consistent but holds {:?}, not the source at its \
                     frozen cut {source:?}",
                    self.model
                )
            });
        }
        if listed {
            self.points.insert(seq, self.model.clone());
        }
    }

    /// The receiver's side of one control message.
    fn deliver(
        &mut self,
        control: &mut ReceiverSession,
        message: AgentMessage,
    ) -> Result<ReceiverMessage, Cut> {
        self.weather()?;
        if matches!(
            message,
            AgentMessage::Flush { .. } | AgentMessage::Commit { .. }
        ) {
            self.arrive(true)?;
        }
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
                let opened = match self.kept.take() {
                    Some(kept) => {
                        self.note("receiver hands over the kept volume");
                        Ok((kept, false, Recovery::Clean))
                    }
                    None => Volume::open_or_create_on(
                        &self.storage,
                        self.clock_fn(),
                        &self.data_dir,
                        &hello,
                    ),
                };
                if self.disk.dead() {
                    return Err(self.receiver_dies());
                }
                let (volume, new_volume) = match opened {
                    Ok((volume, new_volume, _)) => (volume, new_volume),
                    Err(error) => return Ok(store_refusal(error)),
                };
                self.note("receiver opens the volume");
                let volume = self.volume.insert(volume);
                ReceiverMessage::Welcome(volume.welcome(new_volume))
            }
            ControlStep::Serve(AgentMessage::HashRequest { first_chunk, count }) => {
                let volume = self.volume.as_ref().expect("admitted");
                let hashes = volume.hashes(first_chunk, count);
                if self.disk.dead() {
                    return Err(self.receiver_dies());
                }
                match hashes {
                    Ok(hashes) => ReceiverMessage::Hashes {
                        first_chunk,
                        hashes,
                    },
                    Err(error) => store_refusal(error),
                }
            }
            ControlStep::Serve(AgentMessage::Begin(begin)) => {
                // A receiver that dies inside the Begin may come back with the journal it kept
                // before (the new one was never made durable): what that journal held stays
                // what a restart may find (seed 51810).
                let kept_before = std::mem::take(&mut self.journal_order);
                self.forget_open_cycle();
                self.journaled_at_resume.clear();
                let volume = self.volume.as_mut().expect("admitted");
                let begun = volume.begin_held(
                    begin.seq,
                    begin.bytes_estimate,
                    begin.direct,
                    begin.from,
                    Some(SIM_AGENT),
                );
                if self.disk.dead() {
                    self.journal_order = kept_before;
                    return Err(self.receiver_dies());
                }
                match begun {
                    Ok(()) => ReceiverMessage::Ready { seq: begin.seq },
                    Err(error) => store_refusal(error),
                }
            }
            ControlStep::Serve(AgentMessage::Resume { seq }) => {
                let volume = self.volume.as_mut().expect("admitted");
                match volume.resume(seq) {
                    Ok(_) => {
                        self.journaled_at_resume = self.pending_version.clone();
                        ReceiverMessage::Ready { seq }
                    }
                    Err(error) => store_refusal(error),
                }
            }
            ControlStep::Serve(AgentMessage::Flush { frames }) => {
                // As the receiver does: what arrived is written out of the journal's buffer.
                let written = self.volume.as_mut().expect("admitted").write_out_journal();
                if self.disk.dead() {
                    return Err(self.receiver_dies());
                }
                match written {
                    Ok(()) => ReceiverMessage::Flushed { frames },
                    Err(error) => store_refusal(error),
                }
            }
            ControlStep::Serve(AgentMessage::Hello(_)) => ReceiverMessage::Refused {
                code: RefusalCode::Sequence,
                message: "second Hello".into(),
            },
            ControlStep::Serve(AgentMessage::Commit { point, .. }) => {
                let volume = self.volume.as_mut().expect("admitted");
                let direct = volume.meta().unsettled;
                let seq = volume.open_cycle().map_or(0, |(seq, _)| seq);
                self.committing = Some(seq);
                let committed =
                    commit_and_record(volume, point, "sim-agent", &self.audit, &self.status);
                if self.disk.dead() {
                    return Err(self.receiver_dies());
                }
                self.committing = None;
                match committed {
                    Ok(seq) => {
                        let meta = volume.meta();
                        let listed = meta.points.last().is_some_and(|p| p.seq == seq);
                        self.settle_commit(seq, listed);
                        self.note(format!(
                            "receiver commits {seq}{}",
                            if direct { " (direct step)" } else { "" }
                        ));
                        ReceiverMessage::Committed { seq }
                    }
                    Err(error) => {
                        self.forget_open_cycle();
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
        // A hostile agent's 0x77 is no version of the source.
        let version = if self.source[chunk as usize] == fill {
            self.version[chunk as usize]
        } else {
            u64::MAX
        };
        self.frame_of(chunk, fill, version, direct)
    }

    /// A data frame carrying version `version` of `chunk` (content `fill`).
    fn frame_of(&mut self, chunk: u64, fill: u8, version: u64, direct: bool) -> Result<(), Cut> {
        self.weather()?;
        self.note(format!("agent -> frame {chunk}={fill:#x}"));
        let at = chunk as usize;
        if version == self.committed_version[at] {
            self.resent_of[at] += 1;
            let allowed = self.fault_count - self.faults_at_commit[at]
                + u64::from(self.read_after_cut.contains(&(chunk, version)));
            if self.resent_of[at] > allowed {
                self.broken.get_or_insert_with(|| {
                    format!(
                        "chunk {chunk}'s committed content was re-sent {} times with {allowed} \
                         faults since its commit",
                        self.resent_of[at]
                    )
                });
            }
        }
        if self.journaled_at_resume.get(&chunk) == Some(&version)
            && !self.read_after_cut.contains(&(chunk, version))
        {
            self.broken.get_or_insert_with(|| {
                format!(
                    "a resumed cycle re-sent chunk {chunk}'s version {version}, which its \
                     journal already held"
                )
            });
        }
        if version != u64::MAX && version >= self.read_cut {
            self.read_after_cut.insert((chunk, version));
        }
        self.in_flight.push(InFlight {
            chunk,
            fill,
            version,
            direct,
        });
        // Frames travel on several streams: now and then some of them arrive.
        if self.rng.chance(300) {
            self.arrive(false)?;
        }
        Ok(())
    }

    /// Data frames in flight arrive at the receiver, in any order: all of them (before a
    /// `Flush` or `Commit`, which the receiver holds until they have), or a random part.
    fn arrive(&mut self, all: bool) -> Result<(), Cut> {
        let mut frames = std::mem::take(&mut self.in_flight);
        for i in (1..frames.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            frames.swap(i, j);
        }
        let stay = if all {
            0
        } else {
            self.rng.below(frames.len() as u64 + 1) as usize
        };
        self.in_flight = frames.split_off(frames.len() - stay);
        for frame in frames {
            self.journal_frame(frame)?;
        }
        Ok(())
    }

    /// The receiver journals one data frame (a direct step writes it into the image).
    fn journal_frame(&mut self, frame: InFlight) -> Result<(), Cut> {
        let InFlight {
            chunk,
            fill,
            version,
            direct,
        } = frame;
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
        self.note(format!("receiver journals frame {chunk}={fill:#x}"));
        if self.disk.dead() {
            return Err(self.receiver_dies());
        }
        if let Err(error) = journaled {
            self.note(format!("receiver refuses frame: {error}"));
            self.end_session(false);
            return Err(Cut::Refused(RefusalCode::Sequence, error.to_string()));
        }
        if direct {
            self.model[chunk as usize] = fill;
        } else {
            self.pending.insert(chunk, fill);
            self.journal_order.push((chunk, fill, version));
        }
        self.pending_version.insert(chunk, version);
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
        self.fault_count += 1;
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
        self.sync_pass(session, control, from)
    }

    fn sync_pass(
        &mut self,
        session: &mut SourceSession,
        control: &mut ReceiverSession,
        from: u64,
    ) -> Result<(), Cut> {
        // A sync's `Begin` abandons whatever cycle the receiver kept.
        self.agent_open_cycle = None;
        if session.sync_needs_fresh_cut(from) {
            self.dirty.clear();
            self.read_cut = self.next_version;
            self.inflight.clear();
            session.sync_started(self.tracker_generation);
            self.persist(session);
        }
        let window = WINDOW_CHUNKS * CHUNK;
        let mut pass = SyncPass::new(session, from, SIZE, CHUNK, window, window);
        self.note(format!(
            "sync from {} ({}{})",
            pass.from(),
            if pass.direct() { "direct" } else { "journaled" },
            if pass.initial() { ", initial" } else { "" }
        ));
        loop {
            let now = self.agent_time();
            match pass.next(session.next_seq(), self.tracker_generation, 0, now) {
                SyncAction::Begin(begin) => {
                    let begin = session.begin(begin)?;
                    self.ask(session, control, begin)?;
                }
                SyncAction::Window {
                    start,
                    end,
                    compare,
                } => {
                    let first = start / CHUNK;
                    let count = (end - start).div_ceil(CHUNK);
                    let replica = match compare {
                        // An initial sync knows the replica is all zeros: it asks nothing.
                        WindowCompare::ZeroReplica => vec![chunk_hash(0); count as usize],
                        WindowCompare::AskHashes { first_chunk, count } => {
                            let request = session.hash_request(first_chunk, count)?;
                            match self.ask(session, control, request)? {
                                Answer::Hashes { hashes, .. } => hashes,
                                other => {
                                    return Err(Cut::Refused(
                                        RefusalCode::Protocol,
                                        format!("{other:?}"),
                                    ));
                                }
                            }
                        }
                    };
                    let mut frames = 0;
                    for (index, hash) in replica.iter().enumerate() {
                        let chunk = first + index as u64;
                        let fill = self.source[chunk as usize];
                        if chunk_hash(fill) != *hash {
                            self.frame(chunk, fill, pass.direct())?;
                            frames += 1;
                        }
                    }
                    pass.window_sent(frames, frames * CHUNK);
                }
                SyncAction::Commit { frames, point } => {
                    let commit = session.commit(frames, point)?;
                    self.ask(session, control, commit)?;
                    self.persist(session);
                }
                SyncAction::Done => return Ok(()),
            }
        }
    }

    /// One incremental cycle, driven by the agent's [`Cycle`] machine: a pre-copy pass of the
    /// in-flight set, and, when the source "has a mount", freeze attempts whose outcome the
    /// seed decides (fails, does not fit, or reads the remainder while frozen).
    fn cycle(
        &mut self,
        session: &mut SourceSession,
        control: &mut ReceiverSession,
    ) -> Result<(), Cut> {
        if self.faults && self.rng.chance(30) {
            self.note("tracker loses history");
            self.fault_count += 1;
            self.tracker_generation += 1;
            return Err(Cut::TrackingLost);
        }
        self.expect_consistent = None;
        let seq = session.next_seq();
        // As the agent does: continue the cycle the receiver kept, if this agent began
        // it; otherwise begin it afresh.
        let resumption = session
            .take_resumable()
            .filter(|open| {
                self.agent_open_cycle
                    .as_ref()
                    .is_some_and(|(s, _)| *s == open.seq)
            })
            .map(|open| Resumption::new(&open, CHUNK, SIZE));
        if resumption.is_none() {
            self.agent_open_cycle = None;
        }
        let cut = std::mem::take(&mut self.dirty);
        if let Some((_, redirtied)) = self.agent_open_cycle.as_mut() {
            redirtied.extend(cut.iter().copied());
        }
        self.inflight.extend(cut);
        self.read_cut = self.next_version;
        self.persist(session);
        let freezes = self.rng.chance(500);
        let (cycle, mut action) = Cycle::start(seq, self.tracker_generation, 0, SIZE, freezes, 3);
        let resumed = resumption.is_some();
        let redirtied = self.agent_open_cycle.as_ref().map(|(_, r)| r.clone());
        let (mut cycle, mut plan) = match (&resumption, redirtied) {
            (Some(resumption), Some(redirtied)) => {
                // The real planning function, over bitmaps of the simulated chunks.
                let remaining = resumption.plan(&bitmaps(&self.inflight), &bitmaps(&redirtied));
                let plan: Vec<u64> = (0..CHUNKS)
                    .filter(|&c| remaining.kind_of(c).is_some())
                    .collect();
                self.note(format!(
                    "agent resumes cycle {seq} after {} journaled frames: sends {plan:?}",
                    resumption.frames
                ));
                let resume = session.resume(seq)?;
                self.ask(session, control, resume)?;
                // A chunk cut again since the cycle began is re-sent on purpose: the agent
                // cannot tell whether the journal holds its copy from before or after that cut.
                self.journaled_at_resume
                    .retain(|chunk, _| !redirtied.contains(chunk));
                (cycle.resumed(resumption), plan)
            }
            _ => {
                let begin = session.begin(Begin {
                    seq,
                    bytes_estimate: self.inflight.len() as u64 * CHUNK,
                    direct: false,
                    from: 0,
                })?;
                self.ask(session, control, begin)?;
                self.agent_open_cycle = Some((seq, BTreeSet::new()));
                self.open_cycle_outlived_agent = false;
                self.open_cycle_outlived_receiver = false;
                (cycle, self.inflight.iter().copied().collect())
            }
        };
        // Chunks read while frozen: (chunk, content, version), and the source at that cut.
        let mut read_while_frozen: Vec<(u64, u8, u64)> = Vec::new();
        let mut frozen_source = None;
        loop {
            action = match action {
                CycleAction::PreCopy => {
                    for &chunk in &plan {
                        let fill = self.source[chunk as usize];
                        self.frame(chunk, fill, false)?;
                    }
                    let sent = plan.len() as u64;
                    let now = self.agent_time();
                    cycle.pass_sent(sent, sent * CHUNK, now)
                }
                CycleAction::Flush { frames } => {
                    let flush = session.flush(frames)?;
                    self.ask(session, control, flush)?;
                    cycle.flushed()
                }
                CycleAction::Freeze { attempt } => {
                    let outcome = self.rng.below(3);
                    // The application keeps writing until the freeze.
                    if self.faults && self.rng.chance(500) {
                        self.write();
                    }
                    if outcome == 0 {
                        self.note(format!("freeze attempt {attempt} fails"));
                        cycle.frozen(FreezeOutcome::NotFrozen)
                    } else {
                        // Frozen: the cut joins the in-flight set (persisted after the thaw).
                        let cut: Vec<u64> = std::mem::take(&mut self.dirty).into_iter().collect();
                        self.inflight.extend(cut.iter().copied());
                        if let Some((_, redirtied)) = self.agent_open_cycle.as_mut() {
                            redirtied.extend(cut.iter().copied());
                        }
                        self.read_cut = self.next_version;
                        self.persist(session);
                        let cut_time_unix_ms = self.agent_time();
                        if outcome == 1 {
                            self.note(format!("freeze attempt {attempt}: cut {cut:?}, too big"));
                            plan = cut;
                            cycle.frozen(FreezeOutcome::DidNotFit {
                                cut_time_unix_ms,
                                epoch: 0,
                            })
                        } else {
                            self.note(format!("freeze attempt {attempt}: cut {cut:?}, read"));
                            read_while_frozen = cut
                                .iter()
                                .map(|&c| (c, self.source[c as usize], self.version[c as usize]))
                                .collect();
                            frozen_source = Some(self.source.clone());
                            // Thawed: the application writes again, often where it just had.
                            if self.faults && !cut.is_empty() && self.rng.chance(700) {
                                let chunk = cut[self.rng.below(cut.len() as u64) as usize];
                                self.write_chunks(&[chunk]);
                            }
                            cycle.frozen(FreezeOutcome::Read {
                                cut_time_unix_ms,
                                epoch: 0,
                                by_guard: false,
                                held_ms: 1,
                                group_cut: None,
                            })
                        }
                    }
                }
                CycleAction::SendFrozen => {
                    let read = std::mem::take(&mut read_while_frozen);
                    for &(chunk, fill, version) in &read {
                        self.frame_of(chunk, fill, version, false)?;
                    }
                    let sent = read.len() as u64;
                    cycle.frozen_sent(sent, sent * CHUNK)
                }
                CycleAction::Commit { frames, point } => {
                    if point.consistent {
                        self.expect_consistent = frozen_source.take().map(|source| (seq, source));
                    }
                    let commit = session.commit(frames, point)?;
                    self.ask(session, control, commit)?;
                    self.inflight.clear();
                    self.agent_open_cycle = None;
                    self.journaled_at_resume.clear();
                    if resumed {
                        RESUMED_COMMITS.fetch_add(1, Ordering::Relaxed);
                        if self.open_cycle_outlived_agent {
                            RESUMED_AFTER_AGENT_CRASH.fetch_add(1, Ordering::Relaxed);
                        }
                        if self.open_cycle_outlived_receiver {
                            RESUMED_AFTER_RECEIVER_CRASH.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    self.open_cycle_outlived_agent = false;
                    self.open_cycle_outlived_receiver = false;
                    self.persist(session);
                    return Ok(());
                }
            };
        }
    }

    /// The receiver's side of a connection's end, as the receiver does it: a journaled cycle
    /// with frames is kept for the agent to resume when the connection broke (`keep`), and
    /// aborted when the receiver refused; the volume is released (the next connection opens
    /// it again, or takes the kept one).
    fn end_session(&mut self, keep: bool) {
        if let Some(mut volume) = self.volume.take() {
            if keep && volume.open_cycle_report().is_some() {
                self.note("receiver keeps the open cycle");
                // As the receiver does; a failure there only costs frames at a restart.
                let _ = volume.write_out_journal();
                self.kept = Some(volume);
            } else {
                volume.abort();
            }
        }
        if self.disk.dead() {
            self.receiver_dies();
        }
        if self.kept.is_none() {
            self.forget_open_cycle();
        }
        self.expect_consistent = None;
        // What was still on its way is lost with the connection.
        self.in_flight.clear();
        // Between connections the receiver is idle: it cannot die in the middle of work.
        self.disk.disarm();
    }

    /// Reads the receiver's image file.
    fn image(&self) -> Vec<u8> {
        let bytes = self
            .disk
            .content(&self.data_dir.join(VOLUME).join("image.raw"))
            .unwrap_or_default();
        bytes.chunks(CHUNK as usize).map(|chunk| chunk[0]).collect()
    }

    /// The invariants (see the module docs).
    fn check(&mut self) -> Result<(), Violation> {
        if let Some(what) = self.broken.take() {
            return Err(self.violation(what));
        }
        self.check_points(false)
            .map_err(|what| self.violation(what))?;
        if self.audit.path().exists() {
            self.audit.verify().map_err(|error| {
                self.violation(format!("the audit chain does not verify: {error}"))
            })?;
        }
        Ok(())
    }

    /// The replica's points as `restore` and `status` see them. With `may_refuse` (the
    /// receiver is down), the reader may refuse to read a volume it would find between two
    /// points, but whatever it reads must be right.
    fn check_points(&mut self, may_refuse: bool) -> Result<(), String> {
        if !self.storage.exists(&self.volume_json()) {
            return Ok(());
        }
        // A restore takes a shared lock and reads the files, as `blkmirror restore` does.
        let reader = match PointReader::open_on(&self.storage, &self.data_dir, VOLUME) {
            Ok(reader) => reader,
            Err(error) if may_refuse && error.to_string().contains("not yet applied") => {
                self.note(format!("the restore is refused: {error}"));
                return Ok(());
            }
            Err(error) => return Err(format!("the volume cannot be read: {error}")),
        };
        let meta = reader.meta().clone();
        if !may_refuse
            && !meta.unsettled
            && meta
                .points
                .last()
                .is_some_and(|p| p.seq == meta.committed_seq)
        {
            let image = self.image();
            if image != self.model {
                return Err(format!(
                    "the settled image {image:?} is not the newest point {:?}",
                    self.model
                ));
            }
        }
        let listed: BTreeMap<u64, u64> = meta
            .points
            .iter()
            .map(|p| (p.seq, p.time_unix_ms))
            .collect();
        if let Some(pair) = meta
            .points
            .windows(2)
            .find(|w| w[1].time_unix_ms < w[0].time_unix_ms)
        {
            return Err(format!(
                "point {} is dated before point {} ({} < {} ms): `--at` would pick the wrong one",
                pair[1].seq, pair[0].seq, pair[1].time_unix_ms, pair[0].time_unix_ms
            ));
        }
        let snapshot = self.status.snapshot(self.clock.load(Ordering::Relaxed));
        for status in &snapshot.volumes {
            if let Some(point) = &status.last_point
                && listed.get(&point.seq) != Some(&point.time_unix_ms)
            {
                return Err(format!(
                    "status reports point {} ({} ms), which `points` does not list (it lists \
                     {listed:?})",
                    point.seq, point.time_unix_ms
                ));
            }
        }
        for (&seq, content) in &self.points {
            if !listed.contains_key(&seq) && !meta.unsettled {
                return Err(format!(
                    "committed point {seq} is gone (points now {:?})",
                    listed.keys().collect::<Vec<_>>()
                ));
            }
            if meta.unsettled || !listed.contains_key(&seq) {
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
                    return Err(format!(
                        "point {seq} restores as {restored:?} (corrupt chunks at {bad:?}), \
                         committed as {content:?}"
                    ));
                }
                Err(error) => return Err(format!("point {seq} cannot be read: {error}")),
            }
        }
        if meta.unsettled && !self.points.is_empty() {
            return Err(
                "a volume with committed points was left unsettled (its history is gone)".into(),
            );
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
            self.end_session(!matches!(outcome, Err(Cut::Refused(..))));
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
                    self.end_session(false);
                }
            }
            self.check()?;
        }
        // Faults stop: the replica must converge.
        self.faults = false;
        self.note("faults stop");
        for _ in 0..4 {
            let outcome = self.connection(false);
            self.end_session(true);
            if let Err(cut) = outcome {
                return Err(self.violation(format!("no progress without faults: {cut:?}")));
            }
            self.check()?;
        }
        self.inflight.extend(std::mem::take(&mut self.dirty));
        self.read_cut = self.next_version;
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
        self.end_session(true);
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
        AgentMessage::Resume { seq } => format!("Resume {seq}"),
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

    /// Seeds for the tests that re-introduce a bug: both are found well within 200 (at seeds
    /// 24 and 95), and a search that stops there leaves the CI budget to the fault run.
    fn bug_seeds() -> u64 {
        seeds().1.min(200)
    }

    #[test]
    fn replication_survives_random_faults_for_every_seed() {
        let (first, count) = seeds();
        match run_seeds(first, count, None) {
            Ok(ran) => eprintln!(
                "simulated {ran} seeds from {first}: no violation; {} resumed cycles committed \
                 ({} of them resumed by a restarted agent, {} from a journal a restarted \
                 receiver kept)",
                RESUMED_COMMITS.load(Ordering::Relaxed),
                RESUMED_AFTER_AGENT_CRASH.load(Ordering::Relaxed),
                RESUMED_AFTER_RECEIVER_CRASH.load(Ordering::Relaxed)
            ),
            Err(violation) => panic!("{violation}"),
        }
        // The default run covers interrupted cycles that the receiver kept and the agent
        // resumed (a few per hundred seeds), also over restarts of either process.
        if count >= 200 {
            assert!(RESUMED_COMMITS.load(Ordering::Relaxed) > 0);
            assert!(RESUMED_AFTER_AGENT_CRASH.load(Ordering::Relaxed) > 0);
            assert!(RESUMED_AFTER_RECEIVER_CRASH.load(Ordering::Relaxed) > 0);
        }
    }

    #[test]
    fn the_simulator_finds_a_direct_begin_that_wipes_history() {
        let found = run_seeds(seeds().0, bug_seeds(), Some(Bug::DirectBeginAfterHistory))
            .expect_err("the re-introduced bug must be found");
        eprintln!("{found}");
        // Points wiped: a committed point is gone, the volume is left unsettled, or status
        // still reports the point that `points` lost (whichever the seed meets first).
        assert!(
            found.what.contains("gone")
                || found.what.contains("unsettled")
                || found.what.contains("does not list"),
            "{found}"
        );
    }

    #[test]
    fn the_simulator_finds_stale_hashes_after_an_interrupted_direct_step() {
        let found = run_seeds(seeds().0, bug_seeds(), Some(Bug::StaleHashesAfterAbort))
            .expect_err("the re-introduced bug must be found");
        eprintln!("{found}");
        assert!(
            found.what.contains("restores as") || found.what.contains("converge"),
            "{found}"
        );
    }
}
