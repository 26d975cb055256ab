//! The agent's two kinds of pass as state machines without IO: an incremental **cycle**
//! (pre-copy, then freeze attempts, then commit) and a **sync pass** (steps of hash windows,
//! each step committed).
//!
//! The driver (`source::agent`, and the simulator) does what an action says: read and send a
//! pass, freeze and cut, send `Begin`/`Flush`/`Commit` through the [`SourceSession`], and
//! reports what happened back. The machines decide what comes next and what the committed
//! point says (its number, epoch, time, whether it is consistent, how far a sync got).
//!
//! # A cycle
//!
//! ```text
//! start ─▶ PreCopy ─pass_sent─▶ Flush ─flushed─▶ Freeze(n)   (freezing, attempts left)
//!                         └───────────────────────▶ Commit      (no freeze, or none left)
//! Freeze(n) ─frozen(Read)──────▶ SendFrozen ─frozen_sent─▶ Commit (consistent unless a guard thawed)
//!           ─frozen(DidNotFit)─▶ PreCopy (of the frozen cut) ─▶ Flush ─▶ Freeze(n+1)
//!                                                         └──────▶ Commit (none left)
//!           ─frozen(NotFrozen)─▶ Commit (fuzzy: the pre-copy pass's point)
//! ```
//!
//! # A sync pass
//!
//! ```text
//! Begin(step) ─▶ Window … Window ─▶ Commit(step, synced_to = step end) ─▶ Begin(next step) … Done
//! ```
//!
//! A window is compared with an all-zero replica (initial sync: nothing to ask) or with the
//! replica's hashes (verify sync: ask first).

use std::collections::VecDeque;

use crate::{
    extent::DirtyBitmaps,
    plan,
    session::{SourceSession, SyncShape},
    wire::{Begin, OpenCycleReport, PointInfo},
};

/// What the cycle's driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CycleAction {
    /// Read and send a pass while the system runs: the in-flight set with a fresh cut (the
    /// first), or the cut of a freeze whose remainder did not fit; then call
    /// [`Cycle::pass_sent`].
    PreCopy,
    /// Send `Flush` for this many frames; then call [`Cycle::flushed`].
    Flush {
        /// Frames sent in the cycle so far.
        frames: u64,
    },
    /// Freeze (alone or with the group), cut, and read the remainder into memory if it fits
    /// the budget; thaw; then call [`Cycle::frozen`].
    Freeze {
        /// 1-based.
        attempt: u32,
    },
    /// Send the frames read while frozen; then call [`Cycle::frozen_sent`].
    SendFrozen,
    /// Send `Commit` with this point.
    Commit {
        /// Frames sent in the cycle.
        frames: u64,
        /// The point.
        point: PointInfo,
    },
}

/// How a freeze attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezeOutcome {
    /// Nothing was frozen or cut (the freeze failed, or the group round failed): the point
    /// is the pre-copy pass's, not consistent.
    NotFrozen,
    /// Frozen and cut, but the remainder would not fit the budget: thawed without reading.
    DidNotFit {
        /// When the cut was taken (Unix ms).
        cut_time_unix_ms: u64,
        /// The tracker's epoch of the cut.
        epoch: u64,
    },
    /// Frozen, cut, and the remainder read into memory.
    Read {
        /// When the cut was taken (Unix ms).
        cut_time_unix_ms: u64,
        /// The tracker's epoch of the cut.
        epoch: u64,
        /// The freeze guard thawed before the agent did (the budget was overrun): the data
        /// read may not be consistent.
        by_guard: bool,
        /// How long the file system was frozen.
        held_ms: u64,
        /// The consistency group's cut, if the whole group froze together.
        group_cut: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CycleState {
    PreCopy,
    Flush,
    Freeze,
    SendFrozen,
    Commit,
}

/// One incremental cycle (see the module docs).
#[derive(Debug, Clone)]
pub struct Cycle {
    seq: u64,
    generation: u64,
    size: u64,
    freezes: bool,
    attempts: u32,
    attempt: u32,
    state: CycleState,
    frames: u64,
    bytes: u64,
    epoch: u64,
    cut_time_unix_ms: u64,
    consistent: bool,
    freeze_ms: u64,
    group_cut: Option<u64>,
}

impl Cycle {
    /// Cycle `seq` of a device of `size` bytes, whose first cut was taken in `epoch` of
    /// tracker `generation`. With `freezes`, up to `attempts` freezes try to make the point
    /// consistent. Returns the machine and its first action.
    pub fn start(
        seq: u64,
        generation: u64,
        epoch: u64,
        size: u64,
        freezes: bool,
        attempts: u32,
    ) -> (Self, CycleAction) {
        let cycle = Self {
            seq,
            generation,
            size,
            freezes,
            attempts,
            attempt: 0,
            state: CycleState::PreCopy,
            frames: 0,
            bytes: 0,
            epoch,
            cut_time_unix_ms: 0,
            consistent: false,
            freeze_ms: 0,
            group_cut: None,
        };
        (cycle, CycleAction::PreCopy)
    }

    /// Continues an interrupted cycle (see [`Resumption`]): the frames and bytes the
    /// receiver journaled count toward this cycle's.
    pub fn resumed(mut self, resumption: &Resumption) -> Self {
        self.frames = resumption.frames;
        self.bytes = resumption.bytes;
        self
    }

    /// The cycle's number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Freeze attempts so far.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    fn expect(&self, state: CycleState, event: &str) {
        assert_eq!(
            self.state, state,
            "cycle {}: {event} in state {:?} (a driver bug)",
            self.seq, self.state
        );
    }

    /// A pre-copy pass sent `frames` frames carrying `bytes` bytes; it is `now_unix_ms`.
    ///
    /// A point that no freeze makes consistent is dated when its first pass has been read:
    /// everything it holds was written before that.
    pub fn pass_sent(&mut self, frames: u64, bytes: u64, now_unix_ms: u64) -> CycleAction {
        self.expect(CycleState::PreCopy, "pass_sent");
        if self.cut_time_unix_ms == 0 {
            self.cut_time_unix_ms = now_unix_ms;
        }
        self.frames += frames;
        self.bytes += bytes;
        if self.freezes && self.attempt < self.attempts {
            // A freeze follows: the pre-copy pass must have arrived first, so that the
            // remainder is cut after the link drained and the freeze stays short.
            self.state = CycleState::Flush;
            CycleAction::Flush {
                frames: self.frames,
            }
        } else {
            // Nothing is frozen: `Commit` waits for the frames itself, so a `Flush` would only
            // add a round trip (200 ms on a distant link).
            self.commit()
        }
    }

    /// The receiver has journaled every frame so far: the next freeze attempt.
    pub fn flushed(&mut self) -> CycleAction {
        self.expect(CycleState::Flush, "flushed");
        self.attempt += 1;
        self.state = CycleState::Freeze;
        CycleAction::Freeze {
            attempt: self.attempt,
        }
    }

    /// How the freeze attempt went.
    pub fn frozen(&mut self, outcome: FreezeOutcome) -> CycleAction {
        self.expect(CycleState::Freeze, "frozen");
        match outcome {
            FreezeOutcome::NotFrozen => self.commit(),
            FreezeOutcome::DidNotFit {
                cut_time_unix_ms,
                epoch,
            } => {
                // The cut moved on: whatever else happens, the point is at least this new.
                self.cut_time_unix_ms = cut_time_unix_ms;
                self.epoch = epoch;
                self.state = CycleState::PreCopy;
                CycleAction::PreCopy
            }
            FreezeOutcome::Read {
                cut_time_unix_ms,
                epoch,
                by_guard,
                held_ms,
                group_cut,
            } => {
                self.cut_time_unix_ms = cut_time_unix_ms;
                self.epoch = epoch;
                self.consistent = !by_guard;
                self.freeze_ms = held_ms;
                self.group_cut = group_cut;
                self.state = CycleState::SendFrozen;
                CycleAction::SendFrozen
            }
        }
    }

    /// The frames read while frozen were sent: `frames` frames carrying `bytes` bytes.
    pub fn frozen_sent(&mut self, frames: u64, bytes: u64) -> CycleAction {
        self.expect(CycleState::SendFrozen, "frozen_sent");
        self.frames += frames;
        self.bytes += bytes;
        self.commit()
    }

    fn commit(&mut self) -> CycleAction {
        self.state = CycleState::Commit;
        CycleAction::Commit {
            frames: self.frames,
            point: PointInfo {
                seq: self.seq,
                generation: self.generation,
                epoch: self.epoch,
                time_unix_ms: self.cut_time_unix_ms,
                bytes: self.bytes,
                consistent: self.consistent,
                freeze_ms: self.freeze_ms,
                complete: true,
                synced_to: self.size,
                group_cut: self.group_cut.filter(|_| self.consistent),
                received_unix_ms: 0,
                // The driver knows the application hooks' outcome and sets it.
                app_consistent: false,
            },
        }
    }
}

/// An interrupted cycle that the receiver kept open, as a new connection continues it (the
/// receiver's [`OpenCycleReport`]).
///
/// # Which chunks need not be sent again
///
/// The journal holds frames read after the cycle's first cut. A chunk they cover wholly holds
/// its content as of that read; if the chunk was written after the read, the write is in a
/// later cut of the tracker. So the resumed cycle skips a journaled chunk unless a cut taken
/// after the cycle's first one (during the interrupted connection or at the resume) names it:
/// the driver keeps the union of those cuts (`redirtied`) and passes it to
/// [`Resumption::plan`]. The journal may then hold two versions of a chunk; the receiver
/// applies it in order, so the later one wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumption {
    /// The cycle.
    pub seq: u64,
    /// Frames the receiver journaled.
    pub frames: u64,
    /// Bytes the journaled frames cover.
    pub bytes: u64,
    /// Chunk ranges `[first, end)` the journaled frames cover wholly.
    pub chunks: Vec<(u64, u64)>,
}

impl Resumption {
    /// The resumption of `report` on a device of `size` bytes in chunks of `chunk` bytes
    /// (the report is checked: [`OpenCycleReport::check`]).
    pub fn new(report: &OpenCycleReport, chunk: u64, size: u64) -> Self {
        let chunk = chunk.max(1);
        let last_chunk_end = size.div_ceil(chunk);
        let mut chunks: Vec<(u64, u64)> = Vec::new();
        for &(offset, length) in &report.journaled {
            let end = offset + length;
            let first = offset.div_ceil(chunk);
            // The device's last chunk may be short: covering up to the end of the device
            // covers it.
            let end_chunk = if end >= size {
                last_chunk_end
            } else {
                end / chunk
            };
            if first >= end_chunk {
                continue;
            }
            match chunks.last_mut() {
                Some(last) if last.1 >= first => last.1 = last.1.max(end_chunk),
                _ => chunks.push((first, end_chunk)),
            }
        }
        Self {
            seq: report.seq,
            frames: report.frames,
            bytes: report.journaled.iter().map(|r| r.1).sum(),
            chunks,
        }
    }

    /// What the resumed cycle's first pass sends: the in-flight set (which holds the resume's
    /// cut) less the chunks the journal covers, except those `redirtied` (every cut taken
    /// since the cycle began, the resume's included).
    pub fn plan(&self, inflight: &DirtyBitmaps, redirtied: &DirtyBitmaps) -> DirtyBitmaps {
        let mut remaining = inflight.clone();
        for &(first, end) in &self.chunks {
            for chunk in (first..end).filter(|&c| redirtied.kind_of(c).is_none()) {
                remaining.clear_range(chunk, chunk + 1);
            }
        }
        remaining
    }

    /// Chunks the resumed cycle skips.
    pub fn skipped(&self, inflight: &DirtyBitmaps, redirtied: &DirtyBitmaps) -> u64 {
        inflight.dirty_chunks() - self.plan(inflight, redirtied).dirty_chunks()
    }
}

/// How a sync window is compared with the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowCompare {
    /// The replica is all zeros (initial sync): send every non-zero chunk, ask nothing.
    ZeroReplica,
    /// Ask the replica's hashes of these chunks first; send the chunks that differ.
    AskHashes {
        /// The first chunk.
        first_chunk: u64,
        /// How many.
        count: u32,
    },
}

/// What the sync pass's driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncAction {
    /// Open a step: send this `Begin`.
    Begin(Begin),
    /// Read `[start, end)`, compare it as said, send what differs; then call
    /// [`SyncPass::window_sent`].
    Window {
        /// First byte.
        start: u64,
        /// End byte.
        end: u64,
        /// How to compare.
        compare: WindowCompare,
    },
    /// Send `Commit` with this point: the step is done.
    Commit {
        /// Frames sent in the step.
        frames: u64,
        /// The step's point (complete for a journaled sync, which is one step).
        point: PointInfo,
    },
    /// The pass is complete.
    Done,
}

#[derive(Debug, Clone)]
struct OpenStep {
    seq: u64,
    end: u64,
    frames: u64,
    bytes: u64,
    windows: VecDeque<(u64, u64)>,
}

/// One sync pass (see the module docs).
#[derive(Debug, Clone)]
pub struct SyncPass {
    shape: SyncShape,
    initial: bool,
    from: u64,
    chunk: u64,
    window: u64,
    steps: VecDeque<(u64, u64)>,
    open: Option<OpenStep>,
}

impl SyncPass {
    /// A sync pass of a device of `size` bytes in chunks of `chunk` bytes, asked to start at
    /// `from`, with hash windows of `window` bytes and direct steps of `sync_step` bytes. Call
    /// after [`SourceSession::sync_started`] when [`SourceSession::sync_needs_fresh_cut`] said
    /// so.
    pub fn new(
        session: &SourceSession,
        from: u64,
        size: u64,
        chunk: u64,
        window: u64,
        sync_step: u64,
    ) -> Self {
        // A resumed pass starts where the receiver said: the end of the last step committed,
        // or the start of the step an interruption left unsettled.
        let from = session.sync_start(from);
        let shape = session.sync_shape(size, window, sync_step);
        Self {
            shape,
            initial: session.initial_sync(),
            from,
            chunk: chunk.max(1),
            window,
            steps: plan::sync_windows(from, size, shape.step_bytes).into(),
            open: None,
        }
    }

    /// Whether this is the initial sync of a new replica (else a verify sync).
    pub fn initial(&self) -> bool {
        self.initial
    }

    /// Whether the steps write straight into the image.
    pub fn direct(&self) -> bool {
        self.shape.direct
    }

    /// Where the pass starts.
    pub fn from(&self) -> u64 {
        self.from
    }

    /// The next action. `seq` is the session's next cycle number; `generation`, `epoch` and
    /// `now_unix_ms` go into a step's point.
    pub fn next(&mut self, seq: u64, generation: u64, epoch: u64, now_unix_ms: u64) -> SyncAction {
        let Some(open) = self.open.as_mut() else {
            let Some((start, end)) = self.steps.pop_front() else {
                return SyncAction::Done;
            };
            self.open = Some(OpenStep {
                seq,
                end,
                frames: 0,
                bytes: 0,
                windows: plan::sync_windows(start, end, self.window).into(),
            });
            // The data of a sync step is unknown until read: the receiver checks its space as
            // the journal grows.
            return SyncAction::Begin(Begin {
                seq,
                bytes_estimate: 0,
                direct: self.shape.direct,
                from: start,
            });
        };
        if let Some((start, end)) = open.windows.pop_front() {
            let compare = if self.initial {
                WindowCompare::ZeroReplica
            } else {
                WindowCompare::AskHashes {
                    first_chunk: start / self.chunk,
                    count: (end - start).div_ceil(self.chunk) as u32,
                }
            };
            return SyncAction::Window {
                start,
                end,
                compare,
            };
        }
        let open = self.open.take().expect("an open step");
        SyncAction::Commit {
            frames: open.frames,
            point: PointInfo {
                seq: open.seq,
                generation,
                epoch,
                time_unix_ms: now_unix_ms,
                bytes: open.bytes,
                consistent: false,
                freeze_ms: 0,
                complete: false,
                synced_to: open.end,
                group_cut: None,
                received_unix_ms: 0,
                app_consistent: false,
            },
        }
    }

    /// A window's frames were sent: `frames` frames carrying `bytes` bytes.
    pub fn window_sent(&mut self, frames: u64, bytes: u64) {
        if let Some(open) = self.open.as_mut() {
            open.frames += frames;
            open.bytes += bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::{ChangeKind, Geometry};
    use crate::session::SourceRecord;

    /// A device of 10 chunks of 4 KiB, the last one 2 KiB short.
    fn short_tail() -> Geometry {
        Geometry {
            nr_sectors: (10 * 4096 - 2048) / 512,
            chunk_shift: 3,
        }
    }

    fn chunks(set: &DirtyBitmaps) -> Vec<u64> {
        (0..set.geometry().chunks())
            .filter(|&c| set.kind_of(c).is_some())
            .collect()
    }

    #[test]
    fn a_resumed_cycle_skips_only_whole_journaled_chunks_not_cut_again() {
        let geometry = short_tail();
        let size = geometry.size_bytes();
        let report = OpenCycleReport {
            seq: 7,
            frames: 3,
            journaled: vec![
                // Chunks 0 and 1 whole.
                (0, 8192),
                // Half of chunk 3: not skippable.
                (3 * 4096, 2048),
                // Chunks 5 and 6 whole, and chunk 7 from its second half on only.
                (5 * 4096, 2 * 4096),
                (7 * 4096 + 512, 3584),
                // The short last chunk, to the end of the device.
                (9 * 4096, size - 9 * 4096),
            ],
        };
        report.check(size).unwrap();
        let resumption = Resumption::new(&report, 4096, size);
        assert_eq!(resumption.chunks, vec![(0, 2), (5, 7), (9, 10)]);
        assert_eq!(resumption.frames, 3);
        assert_eq!(
            resumption.bytes,
            8192 + 2048 + 8192 + 3584 + (size - 9 * 4096)
        );
        let mut inflight = DirtyBitmaps::new(geometry);
        inflight.set_range(ChangeKind::Write, 0, 10);
        // Chunk 5 was cut again after the cycle began: the journal may hold an older copy.
        let mut redirtied = DirtyBitmaps::new(geometry);
        redirtied.set_range(ChangeKind::Write, 5, 6);
        let plan = resumption.plan(&inflight, &redirtied);
        assert_eq!(chunks(&plan), vec![2, 3, 4, 5, 7, 8]);
        assert_eq!(resumption.skipped(&inflight, &redirtied), 4);
        // A chunk the journal covers but that is not in flight is not added.
        let mut sparse = DirtyBitmaps::new(geometry);
        sparse.set_range(ChangeKind::Write, 2, 3);
        assert_eq!(chunks(&resumption.plan(&sparse, &redirtied)), vec![2]);
    }

    #[test]
    fn a_resumed_cycle_counts_the_journaled_frames_and_bytes() {
        let report = OpenCycleReport {
            seq: 4,
            frames: 10,
            journaled: vec![(0, 1 << 20)],
        };
        let resumption = Resumption::new(&report, 65536, 8 << 20);
        let (cycle, action) = Cycle::start(4, 1, 2, 8 << 20, false, 0);
        assert_eq!(action, CycleAction::PreCopy);
        let mut cycle = cycle.resumed(&resumption);
        match cycle.pass_sent(5, 4096, 1000) {
            CycleAction::Commit { frames, point } => {
                assert_eq!(frames, 15);
                assert_eq!(point.bytes, (1 << 20) + 4096);
                assert_eq!(point.seq, 4);
            }
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    fn cycle(freezes: bool) -> Cycle {
        let (cycle, first) = Cycle::start(7, 2, 10, 4096, freezes, 3);
        assert_eq!(first, CycleAction::PreCopy);
        cycle
    }

    fn committed(action: CycleAction) -> (u64, PointInfo) {
        match action {
            CycleAction::Commit { frames, point } => (frames, point),
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    #[test]
    fn a_cycle_without_freezing_commits_the_pre_copy_pass_as_a_fuzzy_point() {
        let mut cycle = cycle(false);
        // No Flush: the commit waits for the frames itself.
        let (frames, point) = committed(cycle.pass_sent(4, 100, 1_000));
        assert_eq!(frames, 4);
        assert_eq!((point.seq, point.epoch, point.time_unix_ms), (7, 10, 1_000));
        assert!(point.complete && !point.consistent);
        assert_eq!((point.bytes, point.synced_to), (100, 4096));
    }

    #[test]
    fn a_freeze_that_reads_the_remainder_makes_a_consistent_point_at_its_cut() {
        let mut cycle = cycle(true);
        cycle.pass_sent(4, 100, 1_000);
        assert_eq!(cycle.flushed(), CycleAction::Freeze { attempt: 1 });
        let read = FreezeOutcome::Read {
            cut_time_unix_ms: 2_000,
            epoch: 11,
            by_guard: false,
            held_ms: 30,
            group_cut: Some(5),
        };
        assert_eq!(cycle.frozen(read), CycleAction::SendFrozen);
        let (frames, point) = committed(cycle.frozen_sent(2, 50));
        assert_eq!(frames, 6);
        assert!(point.consistent);
        assert_eq!(
            (point.epoch, point.time_unix_ms, point.freeze_ms),
            (11, 2_000, 30)
        );
        assert_eq!((point.bytes, point.group_cut), (150, Some(5)));
    }

    #[test]
    fn a_guard_thaw_is_not_consistent_and_carries_no_group_cut() {
        let mut cycle = cycle(true);
        cycle.pass_sent(0, 0, 1_000);
        cycle.flushed();
        cycle.frozen(FreezeOutcome::Read {
            cut_time_unix_ms: 2_000,
            epoch: 11,
            by_guard: true,
            held_ms: 900,
            group_cut: Some(5),
        });
        let (_, point) = committed(cycle.frozen_sent(1, 1));
        assert!(!point.consistent);
        assert_eq!(point.group_cut, None);
    }

    #[test]
    fn remainders_that_never_fit_end_after_the_last_attempt_with_the_newest_cut() {
        let mut cycle = cycle(true);
        cycle.pass_sent(1, 10, 1_000);
        for attempt in 1..=3 {
            assert_eq!(cycle.flushed(), CycleAction::Freeze { attempt });
            let outcome = FreezeOutcome::DidNotFit {
                cut_time_unix_ms: 1_000 + u64::from(attempt),
                epoch: 10 + u64::from(attempt),
            };
            assert_eq!(cycle.frozen(outcome), CycleAction::PreCopy);
            if attempt < 3 {
                assert_eq!(
                    cycle.pass_sent(1, 10, 5_000),
                    CycleAction::Flush {
                        frames: 1 + u64::from(attempt)
                    }
                );
            }
        }
        // No attempt is left after the last pass: it commits without a Flush.
        let (frames, point) = committed(cycle.pass_sent(1, 10, 5_000));
        assert_eq!(frames, 4);
        assert!(!point.consistent);
        assert_eq!((point.epoch, point.time_unix_ms), (13, 1_003));
    }

    #[test]
    fn a_failed_freeze_commits_the_pre_copy_point() {
        let mut cycle = cycle(true);
        cycle.pass_sent(3, 30, 1_000);
        cycle.flushed();
        let (frames, point) = committed(cycle.frozen(FreezeOutcome::NotFrozen));
        assert_eq!(frames, 3);
        assert!(!point.consistent);
        assert_eq!(point.epoch, 10);
    }

    #[test]
    #[should_panic(expected = "a driver bug")]
    fn events_out_of_order_are_a_driver_bug() {
        let mut cycle = cycle(true);
        cycle.flushed();
    }

    fn session(has_point: bool, new_replica: bool) -> SourceSession {
        use crate::wire::{PROTOCOL_VERSION, ReceiverMessage, Welcome};
        let mut session = SourceSession::new(SourceRecord {
            committed_seq: 4,
            sync_generation: Some(1),
            sync_base_seq: Some(0),
            ..SourceRecord::default()
        });
        session
            .hello(crate::wire::Hello {
                protocol: PROTOCOL_VERSION,
                volume: "v".into(),
                source_id: "s".into(),
                size_bytes: 1 << 20,
                chunk_bytes: 4096,
            })
            .unwrap();
        let last = has_point.then(|| PointInfo {
            seq: 4,
            complete: true,
            generation: 1,
            synced_to: 1 << 20,
            ..PointInfo::default()
        });
        session
            .on_welcome(
                ReceiverMessage::Welcome(Welcome {
                    protocol: PROTOCOL_VERSION,
                    new_volume: new_replica,
                    committed_seq: 4,
                    last_point: last,
                    history: has_point,
                    open_cycle: None,
                    term: 1,
                    failback_term: 0,
                }),
                1,
            )
            .unwrap();
        session
    }

    /// Drives a pass to its end; returns the actions (windows as `(start, end, asked)`).
    fn drive(mut pass: SyncPass, mut seq: u64) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            match pass.next(seq, 1, 2, 3) {
                SyncAction::Begin(begin) => out.push(format!(
                    "begin {} {} {}",
                    begin.seq, begin.from, begin.direct
                )),
                SyncAction::Window {
                    start,
                    end,
                    compare,
                } => {
                    out.push(format!(
                        "window {start}..{end} {}",
                        matches!(compare, WindowCompare::AskHashes { .. })
                    ));
                    pass.window_sent(1, end - start);
                }
                SyncAction::Commit { frames, point } => {
                    out.push(format!(
                        "commit {} {frames} {} {}",
                        point.seq, point.synced_to, point.complete
                    ));
                    seq += 1;
                }
                SyncAction::Done => return out,
            }
        }
    }

    #[test]
    fn an_initial_sync_runs_direct_steps_of_windows_asking_nothing() {
        let session = session(false, true);
        let pass = SyncPass::new(&session, 0, 100, 10, 20, 40);
        assert!(pass.initial() && pass.direct());
        assert_eq!(
            drive(pass, 5),
            [
                "begin 5 0 true",
                "window 0..20 false",
                "window 20..40 false",
                "commit 5 2 40 false",
                "begin 6 40 true",
                "window 40..60 false",
                "window 60..80 false",
                "commit 6 2 80 false",
                "begin 7 80 true",
                "window 80..100 false",
                "commit 7 1 100 false",
            ]
        );
    }

    #[test]
    fn a_resumed_sync_continues_where_the_receiver_said_and_compares_hashes() {
        let session = session(false, false);
        let pass = SyncPass::new(&session, 40, 100, 10, 20, 40);
        assert!(!pass.initial());
        assert_eq!(pass.from(), 40);
        let actions = drive(pass, 5);
        assert_eq!(actions[0], "begin 5 40 true");
        assert_eq!(actions[1], "window 40..60 true");
    }

    #[test]
    fn a_verify_sync_of_a_replica_with_history_is_one_journaled_step() {
        let session = session(true, false);
        let pass = SyncPass::new(&session, 0, 100, 10, 20, 40);
        assert!(!pass.direct());
        let actions = drive(pass, 5);
        assert_eq!(actions.first().unwrap(), "begin 5 0 false");
        assert_eq!(actions.last().unwrap(), "commit 5 5 100 false");
        // 100 bytes in windows of 20: one Begin, five windows, one Commit.
        assert_eq!(actions.len(), 7);
    }
}
