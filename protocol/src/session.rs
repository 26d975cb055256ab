//! Both sides of a replication session, without IO.
//!
//! [`SourceSession`] decides what the agent says on the control stream and what it concludes
//! from the receiver's replies, the way quinn-proto decides for quinn: it is handed events (a
//! `Welcome`, a reply, a tracking loss, a sync that starts) and returns the message to send,
//! the state to persist, and where the session goes next. The driver (`source::agent` in the
//! `blkmirror` crate) owns the sockets, the tracker, the device reads and the state file, and
//! does what it is told.
//!
//! # States
//!
//! ```text
//!              hello()                 on_reply(Welcome)
//!   Idle ───────────────▶ AwaitWelcome ──────────────────▶ Idle ──┐
//!    ▲                                                           │ hash_request / begin /
//!    │                      on_reply(Hashes | Ready |            │ flush / commit
//!    └──────────────────────  Flushed | Committed) ◀── Await* ◀──┘
//! ```
//!
//! One request is outstanding at a time: a reply that does not answer it (another kind,
//! another cycle, another count) is a protocol error, as is any request made while one is
//! outstanding. [`SourceRecord`] is what must survive a restart; every transition that
//! changes it returns `persist: true`, and the driver writes it before it acts further.
//!
//! # Decisions kept here
//!
//! * **Reconciling at connect** ([`SourceSession::on_reply`] with `Welcome`): a new, empty
//!   volume where we had committed cycles, a receiver ahead of our record (it committed the
//!   cycle whose reply we lost: nothing to resend), or behind it (verify).
//! * **Whether a sync is due, and from where**: a resumable sync continues at the offset the
//!   receiver reports only within the same tracker generation and the same committed cycle.
//! * **How a sync writes**: straight into the image in resumable steps while the replica has
//!   no point in time to protect, one journaled cycle once it has one (the receiver refuses
//!   direct steps then).
//! * **What a commit settles**: the in-flight set is cleared, and a complete point ends the
//!   sync in the same record, so a crash cannot leave a finished sync looking unfinished.
//!
//! # The receiver's control stream
//!
//! [`ReceiverSession`] orders what an agent may say: `Hello` first and once, in this
//! protocol, with a well-formed volume and geometry; then any number of hash requests and
//! cycles. Each message becomes a [`ControlStep`] for the driver (`dr::receiver`), which checks
//! grants, claims and opens the volume, and carries out `Begin`, `Flush` and `Commit` on the
//! volume store (which keeps the rules of what a cycle may do to the replica's history).
//! [`frames_verdict`] decides whether the data frames an agent announced have arrived.
//!
//! ```text
//!   AwaitHello ──Hello (checked)──▶ Serving ──HashRequest | Begin | Flush | Commit──▶ Serving
//!              step: Admit                  step: Serve
//!        │                            │
//!        └──anything else──▶ Ended    └──Hello──▶ Ended   (Ended refuses everything)
//! ```

use crate::wire::{
    self, AgentMessage, Begin, ChunkHash, Hello, OpenCycleReport, PROTOCOL_VERSION, PointInfo,
    ReceiverMessage, RefusalCode, Welcome,
};

/// What the agent keeps across restarts about its progress with the receiver.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceRecord {
    /// The last cycle the receiver committed, as far as we know.
    pub committed_seq: u64,
    /// The tracker's history cannot be trusted: a full compare is due.
    pub needs_full_sync: bool,
    /// The tracker generation a sync started in, until the sync completes.
    pub sync_generation: Option<u64>,
    /// The committed cycle when that sync started: only a step committed after it belongs to
    /// this sync and may be resumed from (`None`: unknown, so the sync starts over).
    pub sync_base_seq: Option<u64>,
    /// The highest term a receiver has told us for this volume (0: none yet).
    pub term: u64,
}

/// Why a session cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The receiver said something that does not answer what was asked.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The receiver refused, or speaks another protocol.
    #[error("refused by the receiver ({code:?}): {message}")]
    Refused {
        /// Why.
        code: RefusalCode,
        /// The receiver's words.
        message: String,
    },
}

/// What connecting concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcomed {
    /// Where a sync must start, if one is due before the next cycle.
    pub sync_from: Option<u64>,
    /// The in-flight set is already committed on the receiver: drop it.
    pub clear_inflight: bool,
    /// The record changed: persist it.
    pub persist: bool,
    /// What the operator should read about it.
    pub notes: Vec<String>,
}

/// A reply that answered the outstanding request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The receiver's chunk hashes from `first_chunk` on.
    Hashes {
        /// The first chunk.
        first_chunk: u64,
        /// One per chunk asked for.
        hashes: Vec<ChunkHash>,
    },
    /// The cycle is open.
    Ready,
    /// The announced frames are journaled.
    Flushed,
    /// The cycle is committed: clear the in-flight set and persist the record.
    Committed {
        /// The cycle.
        seq: u64,
    },
}

/// How a sync pass writes into the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncShape {
    /// Straight into the image, in resumable steps (only while it has no point in time).
    pub direct: bool,
    /// Bytes per step (a multiple of the hash window; the whole device when journaled).
    pub step_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Awaiting {
    Nothing,
    Welcome,
    Hashes { first_chunk: u64, count: u32 },
    Ready { seq: u64 },
    Flushed { frames: u64 },
    Committed { seq: u64, complete: bool },
}

/// The agent's session state machine (see the module docs).
#[derive(Debug, Clone)]
pub struct SourceSession {
    record: SourceRecord,
    awaiting: Awaiting,
    /// The receiver's volume has a complete point (then every sync is journaled).
    replica_has_point: bool,
    /// The receiver's volume was created by this connection and no sync has finished since.
    new_replica: bool,
    /// The size of the device (from `Hello`), to check what the receiver reports against.
    size: u64,
    /// The receiver kept our interrupted cycle open, and this connection may continue it.
    resumable: Option<OpenCycleReport>,
}

impl SourceSession {
    /// A session resuming from `record` (the default for a first run).
    pub fn new(record: SourceRecord) -> Self {
        Self {
            record,
            awaiting: Awaiting::Nothing,
            replica_has_point: false,
            new_replica: false,
            size: 0,
            resumable: None,
        }
    }

    /// The record to persist.
    pub fn record(&self) -> &SourceRecord {
        &self.record
    }

    /// Whether the receiver's volume has a complete point in time.
    pub fn replica_has_point(&self) -> bool {
        self.replica_has_point
    }

    /// Whether a sync now would be the initial one (the receiver's volume is new and no sync
    /// has finished); otherwise it is a verify sync.
    pub fn initial_sync(&self) -> bool {
        self.new_replica && !self.replica_has_point
    }

    /// The number of the next cycle.
    pub fn next_seq(&self) -> u64 {
        self.record.committed_seq + 1
    }

    fn ask(
        &mut self,
        awaiting: Awaiting,
        message: AgentMessage,
    ) -> Result<AgentMessage, SessionError> {
        if self.awaiting != Awaiting::Nothing {
            return Err(SessionError::Protocol(format!(
                "{message:?} asked while {:?} is outstanding",
                self.awaiting
            )));
        }
        self.awaiting = awaiting;
        Ok(message)
    }

    /// The opening message of a connection.
    pub fn hello(&mut self, hello: Hello) -> Result<AgentMessage, SessionError> {
        self.awaiting = Awaiting::Nothing;
        self.resumable = None;
        self.size = hello.size_bytes;
        self.ask(Awaiting::Welcome, AgentMessage::Hello(hello))
    }

    /// Asks for `count` chunk hashes from `first_chunk`.
    pub fn hash_request(
        &mut self,
        first_chunk: u64,
        count: u32,
    ) -> Result<AgentMessage, SessionError> {
        self.ask(
            Awaiting::Hashes { first_chunk, count },
            AgentMessage::HashRequest { first_chunk, count },
        )
    }

    /// Opens a cycle.
    pub fn begin(&mut self, begin: Begin) -> Result<AgentMessage, SessionError> {
        let message = self.ask(
            Awaiting::Ready { seq: begin.seq },
            AgentMessage::Begin(begin),
        )?;
        // From now on the replica may hold data, so it is no longer all zeros: a sync that
        // starts over on this connection (the tracker lost its history in the middle of the
        // initial one) compares hashes instead of skipping the source's zero chunks, which the
        // replica may hold as data by then (the simulator found this, seed 102346). The pass
        // under way keeps what it was told when it began.
        self.new_replica = false;
        Ok(message)
    }

    /// The interrupted cycle the receiver kept open, if the next cycle may continue it instead
    /// of starting over: it is the next cycle, no sync is due, and the receiver's report is
    /// well formed. Taking it means the caller sends [`Self::resume`] (or starts afresh with
    /// [`Self::begin`], which the receiver takes as abandoning the journal).
    pub fn take_resumable(&mut self) -> Option<OpenCycleReport> {
        self.resumable.take()
    }

    /// Continues the open cycle `seq` (from [`Self::take_resumable`]).
    pub fn resume(&mut self, seq: u64) -> Result<AgentMessage, SessionError> {
        self.ask(Awaiting::Ready { seq }, AgentMessage::Resume { seq })
    }

    /// Asks the receiver to confirm that `frames` data frames of the open cycle are journaled.
    pub fn flush(&mut self, frames: u64) -> Result<AgentMessage, SessionError> {
        self.ask(Awaiting::Flushed { frames }, AgentMessage::Flush { frames })
    }

    /// Commits the open cycle after `frames` data frames, as `point`.
    pub fn commit(&mut self, frames: u64, point: PointInfo) -> Result<AgentMessage, SessionError> {
        self.ask(
            Awaiting::Committed {
                seq: point.seq,
                complete: point.complete,
            },
            AgentMessage::Commit { frames, point },
        )
    }

    /// Handles the reply to the outstanding request. `Welcome` is answered by
    /// [`Self::on_welcome`]; everything else here.
    pub fn on_reply(&mut self, reply: ReceiverMessage) -> Result<Answer, SessionError> {
        let awaiting = std::mem::replace(&mut self.awaiting, Awaiting::Nothing);
        match (awaiting, reply) {
            (_, ReceiverMessage::Refused { code, message }) => {
                Err(SessionError::Refused { code, message })
            }
            (
                Awaiting::Hashes { first_chunk, count },
                ReceiverMessage::Hashes {
                    first_chunk: got,
                    hashes,
                },
            ) if got == first_chunk && hashes.len() == count as usize => Ok(Answer::Hashes {
                first_chunk,
                hashes,
            }),
            (Awaiting::Ready { seq }, ReceiverMessage::Ready { seq: got }) if got == seq => {
                Ok(Answer::Ready)
            }
            (Awaiting::Flushed { frames }, ReceiverMessage::Flushed { frames: got })
                if got == frames =>
            {
                Ok(Answer::Flushed)
            }
            (Awaiting::Committed { seq, complete }, ReceiverMessage::Committed { seq: got })
                if got == seq =>
            {
                self.record.committed_seq = seq;
                if complete {
                    self.replica_has_point = true;
                    self.new_replica = false;
                    self.record.sync_generation = None;
                    self.record.sync_base_seq = None;
                }
                Ok(Answer::Committed { seq })
            }
            (awaiting, reply) => Err(SessionError::Protocol(format!(
                "expected the answer to {awaiting:?}, got {reply:?}"
            ))),
        }
    }

    /// Handles the reply to `Hello`: checks the protocol, reconciles the record with what the
    /// receiver has, and decides whether a sync is due. `tracker_generation` is the tracker's
    /// current generation.
    pub fn on_welcome(
        &mut self,
        reply: ReceiverMessage,
        tracker_generation: u64,
    ) -> Result<Welcomed, SessionError> {
        let awaiting = std::mem::replace(&mut self.awaiting, Awaiting::Nothing);
        let welcome = match (awaiting, reply) {
            (_, ReceiverMessage::Refused { code, message }) => {
                return Err(SessionError::Refused { code, message });
            }
            (Awaiting::Welcome, ReceiverMessage::Welcome(welcome)) => welcome,
            (awaiting, reply) => {
                return Err(SessionError::Protocol(format!(
                    "expected Welcome (awaiting {awaiting:?}), got {reply:?}"
                )));
            }
        };
        if welcome.protocol != PROTOCOL_VERSION {
            return Err(SessionError::Refused {
                code: RefusalCode::Protocol,
                message: format!("receiver speaks protocol {}", welcome.protocol),
            });
        }
        // Terms only go up: a receiver behind the highest term we have seen lost the record
        // of a failover or a reprotect, and must not be written.
        if welcome.term < self.record.term {
            return Err(SessionError::Refused {
                code: RefusalCode::Forbidden,
                message: format!(
                    "the receiver says this volume is at term {}, but it has been at term {}: \
                     its authority record is stale (a data directory restored from an old \
                     backup, or another receiver); not writing to it",
                    welcome.term, self.record.term
                ),
            });
        }
        let before = self.record.clone();
        let mut notes = Vec::new();
        let mut clear_inflight = false;
        // A failback rewrote this device after the term this record knows: whatever recorded
        // it (`failback pull`'s state) is not this record, so what differs from the replica is
        // unknown here. Compare everything; the hash compare moves only what differs.
        if welcome.failback_term > self.record.term {
            notes.push(format!(
                "a failback at term {} rewrote this device, and this agent state does not record \
                 it (it was on the rewritten device, or the failback was cut off); verifying the \
                 replica",
                welcome.failback_term
            ));
            self.record.needs_full_sync = true;
        }
        if welcome.term > self.record.term {
            if self.record.term > 0 {
                notes.push(format!(
                    "the volume's term went from {} to {} (a failover and a reprotect at the DR \
                     site)",
                    self.record.term, welcome.term
                ));
            }
            self.record.term = welcome.term;
        }
        if welcome.new_volume && self.record.committed_seq > 0 {
            notes.push(format!(
                "the receiver has a new, empty volume (we had committed cycle {}); a full \
                 sync follows",
                self.record.committed_seq
            ));
            self.record.committed_seq = 0;
            self.record.needs_full_sync = true;
        } else if welcome.committed_seq > self.record.committed_seq {
            // The receiver committed our last cycle, but we did not hear it: nothing to resend.
            self.record.committed_seq = welcome.committed_seq;
            clear_inflight = true;
        } else if welcome.committed_seq < self.record.committed_seq {
            notes.push(format!(
                "the receiver's volume is at cycle {}, behind our record of {}; verifying it",
                welcome.committed_seq, self.record.committed_seq
            ));
            self.record.committed_seq = welcome.committed_seq;
            self.record.needs_full_sync = true;
        }
        // The receiver says whether the volume has history: then every sync is journaled (it
        // refuses direct steps), even when the last cycle was an unfinished verify sync.
        self.replica_has_point = welcome.history;
        self.new_replica = welcome.new_volume;
        let sync_from = self.sync_due(&welcome, tracker_generation);
        // Continue the interrupted cycle only as the next cycle of an incremental session: a
        // sync starts over (its `Begin` abandons the journal), and a report that breaks the
        // rules is ignored (the cycle is then re-sent whole).
        self.resumable = welcome.open_cycle.filter(|open| {
            sync_from.is_none()
                && open.seq == self.record.committed_seq + 1
                && welcome.committed_seq == self.record.committed_seq
                && open.check(self.size).is_ok()
        });
        Ok(Welcomed {
            sync_from,
            clear_inflight,
            persist: self.record != before || clear_inflight,
            notes,
        })
    }

    /// Where a sync has to start after `welcome`, if one is due.
    fn sync_due(&self, welcome: &Welcome, tracker_generation: u64) -> Option<u64> {
        if self.record.needs_full_sync || self.new_replica {
            return Some(0);
        }
        // A step of *this* sync: an incomplete point committed after it started. A step of an
        // earlier sync (say, before the source host rebooted and the tracker lost its history)
        // says nothing of what changed since.
        let resumable = welcome
            .last_point
            .as_ref()
            .filter(|point| !point.complete)
            .filter(|point| {
                self.record
                    .sync_base_seq
                    .is_some_and(|base| point.seq > base)
            })
            .map(|point| point.synced_to);
        if let Some(generation) = self.record.sync_generation {
            if generation == tracker_generation
                && welcome.committed_seq == self.record.committed_seq
            {
                return Some(resumable.unwrap_or(0));
            }
            return Some(0);
        }
        match &welcome.last_point {
            None => Some(0),
            Some(point) if !point.complete => Some(0),
            Some(_) => None,
        }
    }

    /// The tracker lost history (or was replaced): a verify sync from the start is due.
    pub fn tracking_lost(&mut self) -> u64 {
        self.record.needs_full_sync = true;
        0
    }

    /// Where a sync asked to start at `from` really starts: a resumed pass only continues
    /// within the sync it belongs to.
    pub fn sync_start(&self, from: u64) -> u64 {
        if from > 0 && self.record.sync_generation.is_some() {
            from
        } else {
            0
        }
    }

    /// Whether a sync from `from` must first take a fresh cut and start a new sync record
    /// (then call [`Self::sync_started`] once the cut is taken).
    pub fn sync_needs_fresh_cut(&self, from: u64) -> bool {
        from == 0 || self.record.sync_generation.is_none()
    }

    /// A sync started in `tracker_generation`, after a cut: everything written since is
    /// tracked, everything before is compared. Clear the in-flight set and persist.
    pub fn sync_started(&mut self, tracker_generation: u64) {
        self.record.sync_generation = Some(tracker_generation);
        self.record.sync_base_seq = Some(self.record.committed_seq);
        self.record.needs_full_sync = false;
    }

    /// How a sync pass over `size` bytes writes, with hash windows of `window` bytes and the
    /// configured step `sync_step` for direct steps.
    pub fn sync_shape(&self, size: u64, window: u64, sync_step: u64) -> SyncShape {
        let window = window.max(1);
        if self.replica_has_point {
            SyncShape {
                direct: false,
                step_bytes: size.div_ceil(window) * window,
            }
        } else {
            SyncShape {
                direct: true,
                step_bytes: sync_step.max(window) / window * window,
            }
        }
    }
}

/// Why the receiver ends a session: the code and message it sends in `Refused`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code.
    pub code: RefusalCode,
    /// What was wrong.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code`.
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// What the receiver's driver does for one control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlStep {
    /// Admit the agent for `hello.volume` (grant, claim, open), then answer `Welcome`.
    Admit(Hello),
    /// Serve this request of an admitted agent: a `HashRequest`, `Begin`, `Flush` or `Commit`
    /// (never `Hello`). `Flush` and `Commit` wait for the announced frames
    /// ([`frames_verdict`]); the volume store decides what a `Begin` or `Commit` may do.
    Serve(AgentMessage),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ControlPhase {
    AwaitHello,
    Serving,
    /// A refusal ended the session; nothing more is served on it.
    Ended,
}

/// The receiver's control-stream state machine (see the module docs).
#[derive(Debug, Clone)]
pub struct ReceiverSession {
    phase: ControlPhase,
}

impl Default for ReceiverSession {
    fn default() -> Self {
        Self::new()
    }
}

impl ReceiverSession {
    /// A session waiting for `Hello`.
    pub fn new() -> Self {
        Self {
            phase: ControlPhase::AwaitHello,
        }
    }

    /// Orders and checks one control message from the agent. A refusal ends the session.
    pub fn on_message(&mut self, message: AgentMessage) -> Result<ControlStep, Refusal> {
        let step = self.step(message);
        if step.is_err() {
            self.phase = ControlPhase::Ended;
        }
        step
    }

    fn step(&mut self, message: AgentMessage) -> Result<ControlStep, Refusal> {
        match (self.phase, message) {
            (ControlPhase::Ended, _) => Err(Refusal::new(
                RefusalCode::Sequence,
                "the session was refused; reconnect",
            )),
            (ControlPhase::AwaitHello, AgentMessage::Hello(hello)) => {
                if hello.protocol != PROTOCOL_VERSION {
                    return Err(Refusal::new(
                        RefusalCode::Protocol,
                        format!(
                            "agent speaks protocol {}, this receiver speaks {PROTOCOL_VERSION}",
                            hello.protocol
                        ),
                    ));
                }
                wire::check_hello(&hello)
                    .map_err(|error| Refusal::new(RefusalCode::BadFrame, error.to_string()))?;
                self.phase = ControlPhase::Serving;
                Ok(ControlStep::Admit(hello))
            }
            (ControlPhase::AwaitHello, _) => {
                Err(Refusal::new(RefusalCode::Sequence, "expected Hello first"))
            }
            (ControlPhase::Serving, AgentMessage::Hello(_)) => {
                Err(Refusal::new(RefusalCode::Sequence, "second Hello"))
            }
            (ControlPhase::Serving, request) => Ok(ControlStep::Serve(request)),
        }
    }
}

/// Whether the data frames an agent announced have all been journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramesVerdict {
    /// All of them: go on.
    Arrived,
    /// Not yet: wait (within the frame timeout).
    Wait,
    /// More arrived than were announced: the agent is lying or broken.
    Refuse(Refusal),
}

/// Compares the frames journaled so far with the count the agent announced.
pub fn frames_verdict(journaled: u64, announced: u64) -> FramesVerdict {
    match journaled.cmp(&announced) {
        std::cmp::Ordering::Equal => FramesVerdict::Arrived,
        std::cmp::Ordering::Less => FramesVerdict::Wait,
        std::cmp::Ordering::Greater => FramesVerdict::Refuse(Refusal::new(
            RefusalCode::Sequence,
            format!("{journaled} data frames arrived, the agent announced {announced}"),
        )),
    }
}

/// What this connection's control stream has done about cycles, as its data streams see it
/// (see [`data_frame_verdict`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CyclesOpened {
    /// The last `Begin` the control stream read; its answer may not be ready yet.
    pub announced: Option<u64>,
    /// The last cycle the control stream opened (`Begin` or `Resume` answered `Ready`).
    pub opened: Option<u64>,
}

impl CyclesOpened {
    /// Whether a frame of cycle `frame_seq` may be journaled: this connection opened its
    /// cycle, and no `Begin` read since has ended it.
    pub fn admits(&self, frame_seq: u64) -> bool {
        self.opened == Some(frame_seq)
            && self
                .announced
                .is_none_or(|announced| announced <= frame_seq)
    }
}

/// What a receiver does with a data frame of cycle `frame_seq` that arrived on a data stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameAdmission {
    /// The cycle is open on this connection: check the frame against the volume and journal
    /// it.
    Journal,
    /// This connection's `Begin` of the frame's cycle is being carried out: wait for it,
    /// within the frame timeout.
    AwaitReady,
    /// The frame is of the cycle that comes next, whose `Begin` has not been read yet (it
    /// travels on the control stream, which a lost packet may hold back): wait a short
    /// grace for it.
    AwaitBegin,
    /// No `Begin` of this connection opens the frame's cycle: refuse the frame.
    Refuse,
}

/// The admission of a data frame of cycle `frame_seq`, given what the control stream has done
/// (`cycles`) and the volume's last committed cycle.
///
/// An agent sends a cycle's first frames right after its `Begin`, without waiting for
/// `Ready` (one round trip less per cycle: 200 ms on a distant link). A frame may therefore
/// arrive before its `Begin` has been read or carried out, and it waits for it. Only the
/// next cycle is waited for, and only a `Begin` read on this connection opens it: a frame can
/// never land in a journal this connection did not open or resume (a cycle kept from a
/// broken connection that the agent begins afresh, say).
pub fn data_frame_verdict(
    frame_seq: u64,
    cycles: CyclesOpened,
    committed_seq: u64,
) -> FrameAdmission {
    if cycles.admits(frame_seq) {
        FrameAdmission::Journal
    } else if cycles.announced == Some(frame_seq) {
        FrameAdmission::AwaitReady
    } else if committed_seq.checked_add(1) == Some(frame_seq) {
        FrameAdmission::AwaitBegin
    } else {
        FrameAdmission::Refuse
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_waits_only_for_a_begin_of_the_next_cycle_on_its_own_connection() {
        let nothing = CyclesOpened::default();
        // Cycle 8 comes next: its frames may come before its Begin is read...
        assert_eq!(
            data_frame_verdict(8, nothing, 7),
            FrameAdmission::AwaitBegin
        );
        // ...or while it is carried out...
        let announced = CyclesOpened {
            announced: Some(8),
            opened: None,
        };
        assert_eq!(
            data_frame_verdict(8, announced, 7),
            FrameAdmission::AwaitReady
        );
        // ...and are journaled once it is open.
        let opened = CyclesOpened {
            announced: Some(8),
            opened: Some(8),
        };
        assert_eq!(data_frame_verdict(8, opened, 7), FrameAdmission::Journal);
        // A cycle resumed on this connection (no Begin).
        let resumed = CyclesOpened {
            announced: None,
            opened: Some(8),
        };
        assert_eq!(data_frame_verdict(8, resumed, 7), FrameAdmission::Journal);
        // Frames of any other cycle are refused at once: a committed one, one far ahead, and
        // the last cycle's after the next one was announced.
        assert_eq!(data_frame_verdict(7, opened, 7), FrameAdmission::Refuse);
        assert_eq!(data_frame_verdict(13, nothing, 7), FrameAdmission::Refuse);
        assert_eq!(data_frame_verdict(13, opened, 7), FrameAdmission::Refuse);
        assert_eq!(
            data_frame_verdict(u64::MAX, nothing, u64::MAX),
            FrameAdmission::Refuse
        );
        let next = CyclesOpened {
            announced: Some(9),
            opened: Some(8),
        };
        assert_eq!(data_frame_verdict(8, next, 8), FrameAdmission::Refuse);
        assert_eq!(data_frame_verdict(9, next, 8), FrameAdmission::AwaitReady);
    }

    fn welcome(
        new_volume: bool,
        committed_seq: u64,
        last_point: Option<PointInfo>,
    ) -> ReceiverMessage {
        let history = last_point.as_ref().is_some_and(|p| p.complete);
        ReceiverMessage::Welcome(Welcome {
            protocol: PROTOCOL_VERSION,
            new_volume,
            committed_seq,
            last_point,
            history,
            open_cycle: None,
            term: 1,
            failback_term: 0,
        })
    }

    fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            volume: "v".into(),
            source_id: "s".into(),
            size_bytes: 1 << 20,
            chunk_bytes: 65536,
        }
    }

    fn connected(
        record: SourceRecord,
        reply: ReceiverMessage,
        generation: u64,
    ) -> (SourceSession, Welcomed) {
        let mut session = SourceSession::new(record);
        session.hello(hello()).unwrap();
        let welcomed = session.on_welcome(reply, generation).unwrap();
        (session, welcomed)
    }

    #[test]
    fn the_agent_learns_the_term_and_refuses_a_receiver_behind_it() {
        let record = SourceRecord {
            committed_seq: 4,
            ..SourceRecord::default()
        };
        let with_term = |term: u64| {
            let ReceiverMessage::Welcome(mut w) = welcome(false, 4, None) else {
                unreachable!()
            };
            w.term = term;
            ReceiverMessage::Welcome(w)
        };
        let (session, welcomed) = connected(record.clone(), with_term(3), 1);
        assert_eq!(session.record().term, 3);
        assert!(welcomed.persist, "a new term is persisted");
        // The same term again: nothing to note or persist.
        let (_, again) = connected(session.record().clone(), with_term(3), 1);
        assert!(!again.persist && again.notes.is_empty());
        // A higher term is noted; a lower one is refused.
        let (raised, noted) = connected(session.record().clone(), with_term(5), 1);
        assert_eq!(raised.record().term, 5);
        assert!(noted.notes.iter().any(|n| n.contains("from 3 to 5")));
        let mut stale = SourceSession::new(raised.record().clone());
        stale.hello(hello()).unwrap();
        let refused = stale.on_welcome(with_term(2), 1);
        assert!(
            matches!(&refused, Err(SessionError::Refused { code: RefusalCode::Forbidden, message }) if message.contains("stale")),
            "{refused:?}"
        );
    }

    #[test]
    fn an_agent_state_that_missed_a_failback_verifies() {
        let record = SourceRecord {
            committed_seq: 4,
            term: 2,
            ..SourceRecord::default()
        };
        let with_terms = |term: u64, failback_term: u64| {
            let ReceiverMessage::Welcome(mut w) = welcome(false, 6, None) else {
                unreachable!()
            };
            w.term = term;
            w.failback_term = failback_term;
            ReceiverMessage::Welcome(w)
        };
        // The state predates the failback at term 3 (it came back with the rewritten disk).
        let (session, welcomed) = connected(record.clone(), with_terms(3, 3), 1);
        assert!(session.record().needs_full_sync);
        assert!(
            welcomed
                .notes
                .iter()
                .any(|n| n.contains("failback at term 3"))
        );
        // `failback pull` recorded term 3: cycles go on incrementally.
        let recorded = SourceRecord {
            term: 3,
            committed_seq: 6,
            ..record
        };
        let (session, _) = connected(recorded, with_terms(3, 3), 1);
        assert!(!session.record().needs_full_sync);
    }

    fn begin(seq: u64, direct: bool) -> Begin {
        Begin {
            seq,
            bytes_estimate: 0,
            direct,
            from: 0,
        }
    }

    /// An incomplete point: a sync step that reached `synced_to`.
    fn sync_step(seq: u64, synced_to: u64) -> PointInfo {
        PointInfo {
            seq,
            synced_to,
            ..PointInfo::default()
        }
    }

    fn complete(seq: u64) -> PointInfo {
        PointInfo {
            seq,
            complete: true,
            ..PointInfo::default()
        }
    }

    fn welcome_with_open_cycle(committed: u64, open: OpenCycleReport) -> ReceiverMessage {
        let ReceiverMessage::Welcome(mut welcome) =
            welcome(false, committed, Some(complete(committed)))
        else {
            unreachable!()
        };
        welcome.open_cycle = Some(open);
        ReceiverMessage::Welcome(welcome)
    }

    #[test]
    fn only_the_next_cycle_of_an_incremental_session_is_resumed() {
        let record = SourceRecord {
            committed_seq: 4,
            ..SourceRecord::default()
        };
        let open = |seq: u64, journaled: Vec<(u64, u64)>| OpenCycleReport {
            seq,
            frames: 2,
            journaled,
        };
        // The next cycle, well reported: resumable, once.
        let (mut session, welcomed) = connected(
            record.clone(),
            welcome_with_open_cycle(4, open(5, vec![(0, 65536)])),
            1,
        );
        assert_eq!(welcomed.sync_from, None);
        assert_eq!(session.take_resumable().map(|o| o.seq), Some(5));
        assert_eq!(session.take_resumable(), None);
        let resume = session.resume(5).unwrap();
        assert_eq!(resume, AgentMessage::Resume { seq: 5 });
        assert_eq!(
            session.on_reply(ReceiverMessage::Ready { seq: 5 }),
            Ok(Answer::Ready)
        );
        // Another cycle's journal, or a report that breaks the rules (a range past the
        // device): begin afresh.
        for report in [
            open(6, vec![(0, 65536)]),
            open(5, vec![(0, 2 << 20)]),
            open(5, vec![(65536, 512), (0, 512)]),
        ] {
            let (mut session, _) = connected(record.clone(), welcome_with_open_cycle(4, report), 1);
            assert_eq!(session.take_resumable(), None);
        }
        // A sync is due: it begins afresh too.
        let behind = SourceRecord {
            needs_full_sync: true,
            ..record
        };
        let (mut session, welcomed) =
            connected(behind, welcome_with_open_cycle(4, open(5, vec![])), 1);
        assert_eq!(welcomed.sync_from, Some(0));
        assert_eq!(session.take_resumable(), None);
    }

    #[test]
    fn a_new_volume_gets_an_initial_sync_written_directly() {
        let (mut session, welcomed) = connected(SourceRecord::default(), welcome(true, 0, None), 1);
        assert_eq!(welcomed.sync_from, Some(0));
        assert!(session.initial_sync());
        assert!(session.sync_shape(1 << 30, 1 << 20, 64 << 20).direct);
        // Once a step has begun, the replica may hold data: a sync that starts over on this
        // connection is a verify sync, still written directly (there is no point yet).
        session
            .begin(Begin {
                seq: 1,
                bytes_estimate: 0,
                direct: true,
                from: 0,
            })
            .unwrap();
        assert!(!session.initial_sync());
        assert!(session.sync_shape(1 << 30, 1 << 20, 64 << 20).direct);
    }

    #[test]
    fn a_receiver_that_committed_our_unacknowledged_cycle_clears_the_inflight_set() {
        let record = SourceRecord {
            committed_seq: 4,
            ..SourceRecord::default()
        };
        let (session, welcomed) = connected(record, welcome(false, 5, Some(complete(5))), 1);
        assert!(welcomed.clear_inflight && welcomed.persist);
        assert_eq!(welcomed.sync_from, None);
        assert_eq!(session.next_seq(), 6);
    }

    #[test]
    fn a_receiver_behind_our_record_or_replaced_by_an_empty_volume_is_verified() {
        let record = SourceRecord {
            committed_seq: 9,
            ..SourceRecord::default()
        };
        let (session, welcomed) =
            connected(record.clone(), welcome(false, 7, Some(complete(7))), 1);
        assert_eq!(welcomed.sync_from, Some(0));
        assert_eq!(session.record().committed_seq, 7);
        assert!(session.record().needs_full_sync);
        // A volume with history is verified in one journaled cycle, never directly.
        let shape = session.sync_shape(10 << 20, 1 << 20, 4 << 20);
        assert!(!shape.direct);
        assert_eq!(shape.step_bytes, 10 << 20);

        let (session, welcomed) = connected(record, welcome(true, 0, None), 1);
        assert_eq!(welcomed.sync_from, Some(0));
        assert_eq!(session.record().committed_seq, 0);
        assert_eq!(welcomed.notes.len(), 1);
    }

    #[test]
    fn an_interrupted_sync_resumes_only_in_the_same_generation_and_cycle() {
        let step = sync_step(3, 8 << 20);
        let record = SourceRecord {
            committed_seq: 3,
            sync_generation: Some(42),
            sync_base_seq: Some(1),
            ..SourceRecord::default()
        };
        let (session, welcomed) =
            connected(record.clone(), welcome(false, 3, Some(step.clone())), 42);
        assert_eq!(welcomed.sync_from, Some(8 << 20));
        assert_eq!(session.sync_start(8 << 20), 8 << 20);
        assert!(!session.sync_needs_fresh_cut(8 << 20));
        // Another tracker generation: what was written meanwhile is unknown.
        let (_, welcomed) = connected(record, welcome(false, 3, Some(step)), 43);
        assert_eq!(welcomed.sync_from, Some(0));
    }

    #[test]
    fn a_complete_commit_ends_the_sync_in_the_same_record() {
        let (mut session, _) = connected(SourceRecord::default(), welcome(true, 0, None), 7);
        session.sync_started(7);
        assert_eq!(session.record().sync_generation, Some(7));
        session.begin(begin(1, true)).unwrap();
        assert_eq!(
            session.on_reply(ReceiverMessage::Ready { seq: 1 }),
            Ok(Answer::Ready)
        );
        session
            .commit(
                3,
                PointInfo {
                    seq: 1,
                    ..PointInfo::default()
                },
            )
            .unwrap();
        session
            .on_reply(ReceiverMessage::Committed { seq: 1 })
            .unwrap();
        // A sync step: the sync goes on.
        assert_eq!(session.record().sync_generation, Some(7));
        assert!(!session.replica_has_point());
        session.begin(begin(2, false)).unwrap();
        session.on_reply(ReceiverMessage::Ready { seq: 2 }).unwrap();
        session.commit(0, complete(2)).unwrap();
        assert_eq!(
            session.on_reply(ReceiverMessage::Committed { seq: 2 }),
            Ok(Answer::Committed { seq: 2 })
        );
        assert_eq!(session.record().sync_generation, None);
        assert_eq!(session.record().committed_seq, 2);
        assert!(session.replica_has_point());
        // From now on a sync is journaled.
        assert!(!session.sync_shape(1 << 20, 1 << 20, 1 << 20).direct);
    }

    #[test]
    fn replies_that_do_not_answer_the_request_are_protocol_errors() {
        let (mut session, _) = connected(SourceRecord::default(), welcome(true, 0, None), 1);
        session.begin(begin(1, true)).unwrap();
        assert!(matches!(
            session.on_reply(ReceiverMessage::Ready { seq: 2 }),
            Err(SessionError::Protocol(_))
        ));
        session.flush(5).unwrap();
        assert!(session.flush(5).is_err(), "two requests outstanding");
        assert!(matches!(
            session.on_reply(ReceiverMessage::Committed { seq: 1 }),
            Err(SessionError::Protocol(_))
        ));
        session.hash_request(10, 4).unwrap();
        assert!(matches!(
            session.on_reply(ReceiverMessage::Hashes {
                first_chunk: 10,
                hashes: vec![[0; 32]; 3],
            }),
            Err(SessionError::Protocol(_))
        ));
        session.commit(1, complete(1)).unwrap();
        assert_eq!(
            session.on_reply(ReceiverMessage::Refused {
                code: RefusalCode::Forbidden,
                message: "no".into()
            }),
            Err(SessionError::Refused {
                code: RefusalCode::Forbidden,
                message: "no".into()
            })
        );
        // An unanswered commit leaves the record alone.
        assert_eq!(session.record().committed_seq, 0);
    }

    #[test]
    fn another_protocol_version_is_a_refusal() {
        let mut session = SourceSession::new(SourceRecord::default());
        session.hello(hello()).unwrap();
        let reply = ReceiverMessage::Welcome(Welcome {
            protocol: PROTOCOL_VERSION + 1,
            new_volume: false,
            committed_seq: 0,
            last_point: None,
            history: false,
            open_cycle: None,
            term: 1,
            failback_term: 0,
        });
        assert!(matches!(
            session.on_welcome(reply, 1),
            Err(SessionError::Refused {
                code: RefusalCode::Protocol,
                ..
            })
        ));
    }

    #[test]
    fn the_receiver_wants_one_checked_hello_first() {
        let mut session = ReceiverSession::new();
        let refused = session
            .on_message(AgentMessage::Flush { frames: 0 })
            .unwrap_err();
        assert_eq!(refused.code, RefusalCode::Sequence);
        let mut bad = hello();
        bad.chunk_bytes = 3;
        assert_eq!(
            ReceiverSession::new()
                .on_message(AgentMessage::Hello(bad))
                .unwrap_err()
                .code,
            RefusalCode::BadFrame
        );
        let mut old = hello();
        old.protocol = PROTOCOL_VERSION - 1;
        assert_eq!(
            ReceiverSession::new()
                .on_message(AgentMessage::Hello(old))
                .unwrap_err()
                .code,
            RefusalCode::Protocol
        );
        assert_eq!(
            session.on_message(AgentMessage::Hello(hello())),
            Err(Refusal::new(
                RefusalCode::Sequence,
                "the session was refused; reconnect"
            )),
            "a refused session stays refused"
        );
        let mut session = ReceiverSession::new();
        assert_eq!(
            session.on_message(AgentMessage::Hello(hello())),
            Ok(ControlStep::Admit(hello()))
        );
        assert_eq!(
            session.on_message(AgentMessage::Flush { frames: 4 }),
            Ok(ControlStep::Serve(AgentMessage::Flush { frames: 4 }))
        );
        assert_eq!(
            session
                .on_message(AgentMessage::Hello(hello()))
                .unwrap_err()
                .message,
            "second Hello"
        );
    }

    #[test]
    fn announced_frames_are_awaited_and_extra_frames_refused() {
        assert_eq!(frames_verdict(3, 3), FramesVerdict::Arrived);
        assert_eq!(frames_verdict(2, 3), FramesVerdict::Wait);
        assert!(matches!(frames_verdict(4, 3), FramesVerdict::Refuse(_)));
    }

    /// Found by the simulator (seed 1818): a sync restarted from 0 after the source host
    /// rebooted was cut off before its first step committed; on reconnect the receiver's last
    /// point was a step of the *earlier* sync, and resuming from its offset skipped every chunk
    /// below it that changed while the tracker was down.
    #[test]
    fn a_step_of_an_earlier_sync_is_not_resumed_from() {
        let step = sync_step(2, 64 << 10);
        // The host rebooted: a new generation, and a verify sync from the start.
        let record = SourceRecord {
            committed_seq: 2,
            needs_full_sync: true,
            sync_generation: Some(1),
            sync_base_seq: Some(0),
            term: 0,
        };
        let (mut session, welcomed) = connected(record, welcome(false, 2, Some(step.clone())), 2);
        assert_eq!(welcomed.sync_from, Some(0));
        assert!(session.sync_needs_fresh_cut(0));
        session.sync_started(2);
        // Cut off before the new sync committed a step: it starts over, not at 64 KiB.
        let (_, welcomed) = connected(session.record().clone(), welcome(false, 2, Some(step)), 2);
        assert_eq!(welcomed.sync_from, Some(0));
        // Once a step of this sync has committed, that one is resumed from.
        let ours = sync_step(3, 32 << 10);
        let mut record = session.record().clone();
        record.committed_seq = 3;
        let (_, welcomed) = connected(record, welcome(false, 3, Some(ours)), 2);
        assert_eq!(welcomed.sync_from, Some(32 << 10));
    }
}
