//! Failback: making the returned original source equal to the promoted DR-site device again,
//! moving only what differs. Pure: the messages, their checks, and the plan.
//!
//! # Who knows what
//!
//! After a failover at point `P`, three sets of chunks can differ between the original source
//! (A) and the promoted device at the DR site (B):
//!
//! * **B's changes since promotion**, from the tracker the failover started on B.
//! * **A's committed changes after `P`** (when an older point than the newest was promoted):
//!   the receiver's undo deltas name them, and the failover recorded them.
//! * **A's unreplicated changes**: what A wrote after its last committed cycle. A's agent state
//!   (its in-flight set) and A's pinned tracker name them. These writes are discarded by the
//!   failback: A takes B's content for those chunks.
//!
//! Their union is the *plan*. When either side's tracking has a gap (a tracker that was not
//! adopted, a counted loss, a full sync still due) the plan is every chunk, and the hash
//! compare below keeps the link to what differs; both sides then read their whole device.
//!
//! # Exchange (one bidirectional stream, A connects to B)
//!
//! ```text
//! A: Hello (volume, geometry, term seen, A's unreplicated chunks or "untracked")
//! B: Plan (term, point, head, round, the chunk ranges) | Refused
//! A: Hashes (A's hash of each planned chunk, in plan order, batches of at most 4096) ...
//! B: Data | Zero for each planned chunk whose hash differs, in plan order ... then Sent
//! A: Written (after its device is synced and its agent state records what to resend)
//! B: (with a pre-copy: another Plan, round 2, for the final delta, and so on)
//! B: Complete (the new term: the source is primary again) | Refused
//! ```
//!
//! Every list is bounded before allocation ([`MAX_FAILBACK_RANGES`], [`MAX_HASH_BATCH`]), and a
//! data frame must name the next planned chunk that B has not yet passed, with exactly that
//! chunk's length ([`DataCursor`]).

use serde::{Deserialize, Serialize};

use crate::wire::ChunkHash;

/// The failback protocol version.
pub const FAILBACK_PROTOCOL: u32 = 3;

/// The most chunk ranges one list may hold. A longer set is sent as "untracked" (A) or planned
/// as the whole device (B): the hash compare still moves only what differs.
pub const MAX_FAILBACK_RANGES: usize = 16_384;

/// The most hashes in one [`FailbackRequest::Hashes`].
pub const MAX_HASH_BATCH: usize = 4096;

/// A half-open range of chunk indices `[first, end)`.
pub type ChunkRange = (u64, u64);

/// A → B.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailbackRequest {
    /// First message.
    Hello(FailbackHello),
    /// A's hashes of the next planned chunks, in plan order.
    Hashes(Vec<ChunkHash>),
    /// A has written and synced everything sent, and recorded it for forward replication.
    Written {
        /// Chunks written.
        chunks: u64,
    },
}

/// What A says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailbackHello {
    /// [`FAILBACK_PROTOCOL`].
    pub protocol: u32,
    /// The volume.
    pub volume: String,
    /// A's device size in bytes.
    pub size: u64,
    /// The chunk size both sides count in.
    pub chunk_bytes: u64,
    /// The highest term A's agent has seen.
    pub term: u64,
    /// The last cycle A's agent knows committed.
    pub committed_seq: u64,
    /// The chunks A changed that the receiver never committed; `None` when A's tracking has a
    /// gap (then every chunk is compared).
    pub unreplicated: Option<Vec<ChunkRange>>,
}

/// B → A.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailbackReply {
    /// What will be compared.
    Plan(FailbackPlan),
    /// A planned chunk whose content differs: B's content.
    Data {
        /// Chunk index.
        chunk: u64,
        /// Its bytes (the chunk's length), zstd-compressed when `zstd`.
        data: Vec<u8>,
        /// Whether `data` is compressed (only when that saves an eighth or more).
        zstd: bool,
    },
    /// A planned chunk that differs and is all zeros at B.
    Zero {
        /// Chunk index.
        chunk: u64,
    },
    /// Every planned chunk was compared.
    Sent {
        /// Chunks sent (`Data` and `Zero`).
        chunks: u64,
    },
    /// The roles are swapped: the source is primary under `term`.
    Complete {
        /// The new term.
        term: u64,
    },
    /// The failback cannot go on.
    Refused {
        /// Why, and what to do.
        message: String,
    },
}

/// B's plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailbackPlan {
    /// The term of the failover being reversed.
    pub term: u64,
    /// The point that was promoted.
    pub point_seq: u64,
    /// The receiver's newest committed cycle: A's agent resumes from it.
    pub head_seq: u64,
    /// 1, then 2 for the final delta after a pre-copy.
    pub round: u32,
    /// Every chunk is compared (a tracking gap on either side).
    pub compare_all: bool,
    /// The chunks to compare, sorted, disjoint, not touching.
    pub chunks: Vec<ChunkRange>,
}

/// Why a failback message is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FailbackError {
    /// A message that breaks the protocol.
    #[error("failback protocol: {0}")]
    Protocol(String),
    /// The two sides do not describe the same volume.
    #[error("{0}")]
    Mismatch(String),
}

fn protocol(message: impl Into<String>) -> FailbackError {
    FailbackError::Protocol(message.into())
}

/// The number of chunks of a device.
pub fn chunk_count(size: u64, chunk_bytes: u64) -> u64 {
    size.div_ceil(chunk_bytes)
}

/// The length of chunk `index` (the last one may be short; 0 past the end).
pub fn chunk_len(size: u64, chunk_bytes: u64, index: u64) -> u64 {
    chunk_bytes.min(size.saturating_sub(index.saturating_mul(chunk_bytes)))
}

/// A chunk's bytes for a `Data` frame: zstd (level 1, cheap) when that saves at least an
/// eighth, else as they are. Returns the payload and whether it is compressed.
pub fn pack(data: &[u8]) -> (Vec<u8>, bool) {
    match zstd::bulk::compress(data, 1) {
        Ok(packed) if packed.len() <= data.len() - data.len() / 8 => (packed, true),
        _ => (data.to_vec(), false),
    }
}

/// A `Data` frame's bytes, decompressed without ever growing past `len` (the planned chunk's
/// length), and checked to be exactly that long.
pub fn unpack(data: Vec<u8>, zstd: bool, len: u64) -> Result<Vec<u8>, FailbackError> {
    let data = if zstd {
        zstd::bulk::decompress(&data, len as usize)
            .map_err(|error| protocol(format!("a compressed chunk does not unpack: {error}")))?
    } else {
        data
    };
    if data.len() as u64 != len {
        return Err(protocol(format!(
            "a chunk carries {} bytes, not its {len}",
            data.len()
        )));
    }
    Ok(data)
}

/// Sorts and merges `ranges` (overlapping or touching ones become one) after checking each lies
/// inside `[0, chunks)` and is not empty.
pub fn normalize(
    mut ranges: Vec<ChunkRange>,
    chunks: u64,
) -> Result<Vec<ChunkRange>, FailbackError> {
    for &(first, end) in &ranges {
        if first >= end || end > chunks {
            return Err(protocol(format!(
                "chunk range [{first}, {end}) is empty or outside the device's {chunks} chunks"
            )));
        }
    }
    ranges.sort_unstable();
    let mut merged: Vec<ChunkRange> = Vec::with_capacity(ranges.len());
    for (first, end) in ranges {
        match merged.last_mut() {
            Some(last) if first <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((first, end)),
        }
    }
    Ok(merged)
}

/// The number of chunks `ranges` (normalized) cover.
pub fn covered(ranges: &[ChunkRange]) -> u64 {
    ranges.iter().map(|(first, end)| end - first).sum()
}

/// Checks A's hello against B's device and volume.
pub fn check_hello(
    hello: &FailbackHello,
    volume: &str,
    size: u64,
    chunk_bytes: u64,
) -> Result<(), FailbackError> {
    if hello.protocol != FAILBACK_PROTOCOL {
        return Err(FailbackError::Mismatch(format!(
            "failback protocol {} is not this side's {FAILBACK_PROTOCOL}; run the same release \
             on both sites",
            hello.protocol
        )));
    }
    if hello.volume != volume {
        return Err(FailbackError::Mismatch(format!(
            "this failback serves volume {volume}, not {:?}",
            hello.volume.chars().take(80).collect::<String>()
        )));
    }
    if hello.size != size {
        return Err(FailbackError::Mismatch(format!(
            "the source device has {} bytes, the promoted device {size}: they must be the same \
             size",
            hello.size
        )));
    }
    if hello.chunk_bytes != chunk_bytes {
        return Err(FailbackError::Mismatch(format!(
            "the source counts in {}-byte chunks, the promoted device in {chunk_bytes}: pass the \
             same --chunk-size on both sides",
            hello.chunk_bytes
        )));
    }
    if let Some(ranges) = &hello.unreplicated
        && ranges.len() > MAX_FAILBACK_RANGES
    {
        return Err(protocol(format!(
            "{} unreplicated ranges (at most {MAX_FAILBACK_RANGES})",
            ranges.len()
        )));
    }
    Ok(())
}

/// What B knows when it plans.
#[derive(Clone, Debug, Default)]
pub struct PlanInput {
    /// The device's chunk count.
    pub chunks: u64,
    /// B's changes since promotion; `None` when B's tracking has a gap.
    pub promoted_changes: Option<Vec<ChunkRange>>,
    /// The chunks committed after the promoted point (from the receiver's deltas).
    pub after_point: Vec<ChunkRange>,
    /// A's unreplicated chunks; `None` when A's tracking has a gap.
    pub unreplicated: Option<Vec<ChunkRange>>,
}

/// The chunks to compare and whether that is every chunk. Errors only on ranges outside the
/// device.
pub fn plan(input: PlanInput) -> Result<(bool, Vec<ChunkRange>), FailbackError> {
    let everything = || {
        (
            true,
            if input.chunks == 0 {
                Vec::new()
            } else {
                vec![(0, input.chunks)]
            },
        )
    };
    let (Some(promoted), Some(unreplicated)) = (&input.promoted_changes, &input.unreplicated)
    else {
        return Ok(everything());
    };
    let mut all = Vec::with_capacity(promoted.len() + unreplicated.len() + input.after_point.len());
    all.extend_from_slice(promoted);
    all.extend_from_slice(unreplicated);
    all.extend_from_slice(&input.after_point);
    let merged = normalize(all, input.chunks)?;
    if merged.len() > MAX_FAILBACK_RANGES {
        return Ok(everything());
    }
    Ok((false, merged))
}

/// Walks a plan's chunks in order.
#[derive(Clone, Debug)]
pub struct PlanWalk {
    ranges: Vec<ChunkRange>,
    range: usize,
    next: u64,
}

impl PlanWalk {
    /// Starts at the first planned chunk.
    pub fn new(ranges: Vec<ChunkRange>) -> Self {
        let next = ranges.first().map_or(0, |range| range.0);
        Self {
            ranges,
            range: 0,
            next,
        }
    }

    /// Chunks not yet walked.
    pub fn remaining(&self) -> u64 {
        let Some(&(_, end)) = self.ranges.get(self.range) else {
            return 0;
        };
        (end - self.next) + covered(&self.ranges[self.range + 1..])
    }

    /// The next chunk without moving on.
    pub fn peek(&self) -> Option<u64> {
        self.ranges.get(self.range).map(|_| self.next)
    }

    /// Skips the planned chunks before `chunk` (whole ranges at a time).
    pub fn skip_to(&mut self, chunk: u64) {
        while let Some(&(first, end)) = self.ranges.get(self.range) {
            if chunk < end {
                self.next = self.next.max(first).max(chunk);
                return;
            }
            self.range += 1;
            if let Some(&(first, _)) = self.ranges.get(self.range) {
                self.next = first;
            }
        }
    }
}

impl Iterator for PlanWalk {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let &(_, end) = self.ranges.get(self.range)?;
        let chunk = self.next;
        self.next += 1;
        if self.next >= end {
            self.range += 1;
            if let Some(&(first, _)) = self.ranges.get(self.range) {
                self.next = first;
            }
        }
        Some(chunk)
    }
}

/// A's check of B's data frames: each names a planned chunk after the previous one, with that
/// chunk's exact length; `Sent` must count what arrived.
#[derive(Clone, Debug)]
pub struct DataCursor {
    walk: PlanWalk,
    size: u64,
    chunk_bytes: u64,
    received: u64,
}

impl DataCursor {
    /// For the plan of a device of `size` bytes.
    pub fn new(ranges: Vec<ChunkRange>, size: u64, chunk_bytes: u64) -> Self {
        Self {
            walk: PlanWalk::new(ranges),
            size,
            chunk_bytes,
            received: 0,
        }
    }

    /// Checks a frame for `chunk` carrying `len` bytes (`None`: a zero chunk); returns the byte
    /// offset to write at and the chunk's length.
    pub fn accept(&mut self, chunk: u64, len: Option<usize>) -> Result<(u64, u64), FailbackError> {
        if self.walk.peek().is_some_and(|next| next <= chunk) {
            self.walk.skip_to(chunk);
        }
        if self.walk.peek() != Some(chunk) {
            return Err(protocol(format!(
                "chunk {chunk} is not in the plan (or comes out of order)"
            )));
        }
        self.walk.next();
        let expected = chunk_len(self.size, self.chunk_bytes, chunk);
        if let Some(len) = len
            && len as u64 != expected
        {
            return Err(protocol(format!(
                "chunk {chunk} carries {len} bytes, not its {expected}"
            )));
        }
        self.received += 1;
        Ok((chunk * self.chunk_bytes, expected))
    }

    /// Checks B's final count.
    pub fn finish(&self, sent: u64) -> Result<u64, FailbackError> {
        if sent != self.received {
            return Err(protocol(format!(
                "the promoted side says it sent {sent} chunks, {} arrived",
                self.received
            )));
        }
        Ok(self.received)
    }
}

/// B's check of A's hash batches: never more hashes than planned chunks.
pub fn check_hash_batch(batch_len: usize, remaining: u64) -> Result<(), FailbackError> {
    if batch_len == 0 || batch_len > MAX_HASH_BATCH {
        return Err(protocol(format!(
            "a hash batch of {batch_len} (1 to {MAX_HASH_BATCH})"
        )));
    }
    if batch_len as u64 > remaining {
        return Err(protocol(format!(
            "{batch_len} hashes for {remaining} remaining planned chunks"
        )));
    }
    Ok(())
}

/// Everything a side does with a peer's failback frame before it acts on it; for the
/// `frame_decoder` fuzz target (through `wire::fuzz_decode`).
pub fn fuzz_check(body: &[u8]) {
    const SIZE: u64 = 1 << 30;
    const CHUNK: u64 = 65_536;
    let chunks = chunk_count(SIZE, CHUNK);
    if let Ok(request) = crate::wire::decode::<FailbackRequest>(body) {
        match request {
            FailbackRequest::Hello(hello) => {
                if check_hello(&hello, "vol", SIZE, CHUNK).is_ok()
                    && let Some(ranges) = hello.unreplicated
                {
                    let _ = normalize(ranges, chunks);
                }
            }
            FailbackRequest::Hashes(hashes) => {
                let _ = check_hash_batch(hashes.len(), chunks);
            }
            FailbackRequest::Written { .. } => {}
        }
    }
    if let Ok(reply) = crate::wire::decode::<FailbackReply>(body) {
        let mut cursor = DataCursor::new(vec![(0, 3), (100, chunks)], SIZE, CHUNK);
        match reply {
            FailbackReply::Plan(plan) => {
                let _ = normalize(plan.chunks, chunks);
            }
            FailbackReply::Data { chunk, data, zstd } => {
                if let Ok(data) = unpack(data, zstd, chunk_len(SIZE, CHUNK, chunk)) {
                    let _ = cursor.accept(chunk, Some(data.len()));
                }
                let _ = cursor.accept(chunk.saturating_add(1), None);
            }
            FailbackReply::Zero { chunk } => {
                let _ = cursor.accept(chunk, None);
            }
            FailbackReply::Sent { chunks } => {
                let _ = cursor.finish(chunks);
            }
            FailbackReply::Complete { .. } | FailbackReply::Refused { .. } => {}
        }
    }
}

/// Well-formed failback frames, to seed the fuzzer's corpus.
pub fn corpus_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::wire::encode;
    vec![
        (
            "failback-hello",
            encode(&FailbackRequest::Hello(FailbackHello {
                protocol: FAILBACK_PROTOCOL,
                volume: "vol".into(),
                size: 1 << 30,
                chunk_bytes: 65_536,
                term: 2,
                committed_seq: 7,
                unreplicated: Some(vec![(3, 9), (100, 101)]),
            })),
        ),
        (
            "failback-hashes",
            encode(&FailbackRequest::Hashes(vec![[7u8; 32]; 3])),
        ),
        (
            "failback-plan",
            encode(&FailbackReply::Plan(FailbackPlan {
                term: 2,
                point_seq: 5,
                head_seq: 7,
                round: 1,
                compare_all: false,
                chunks: vec![(0, 3), (100, 140)],
            })),
        ),
        (
            "failback-data",
            encode(&FailbackReply::Data {
                chunk: 2,
                data: vec![9u8; 65_536],
                zstd: false,
            }),
        ),
        (
            "failback-data-zstd",
            encode(&FailbackReply::Data {
                chunk: 2,
                data: pack(&[9u8; 65_536]).0,
                zstd: true,
            }),
        ),
        ("failback-zero", encode(&FailbackReply::Zero { chunk: 101 })),
        ("failback-sent", encode(&FailbackReply::Sent { chunks: 2 })),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_merges_touching_and_rejects_outside() {
        assert_eq!(
            normalize(vec![(5, 7), (0, 2), (2, 3), (6, 9)], 10).unwrap(),
            vec![(0, 3), (5, 9)]
        );
        assert!(normalize(vec![(3, 3)], 10).is_err());
        assert!(normalize(vec![(8, 11)], 10).is_err());
    }

    #[test]
    fn plan_is_the_union_unless_a_side_has_a_gap() {
        let input = PlanInput {
            chunks: 100,
            promoted_changes: Some(vec![(10, 12)]),
            after_point: vec![(11, 15), (90, 91)],
            unreplicated: Some(vec![(50, 51)]),
        };
        assert_eq!(
            plan(input.clone()).unwrap(),
            (false, vec![(10, 15), (50, 51), (90, 91)])
        );
        let gap_b = PlanInput {
            promoted_changes: None,
            ..input.clone()
        };
        assert_eq!(plan(gap_b).unwrap(), (true, vec![(0, 100)]));
        let gap_a = PlanInput {
            unreplicated: None,
            ..input
        };
        assert_eq!(plan(gap_a).unwrap(), (true, vec![(0, 100)]));
        // Nothing changed anywhere: nothing to compare.
        let quiet = PlanInput {
            chunks: 100,
            promoted_changes: Some(vec![]),
            after_point: vec![],
            unreplicated: Some(vec![]),
        };
        assert_eq!(plan(quiet).unwrap(), (false, vec![]));
    }

    #[test]
    fn too_many_ranges_become_a_compare_of_everything() {
        let many: Vec<ChunkRange> = (0..=MAX_FAILBACK_RANGES as u64)
            .map(|i| (i * 2, i * 2 + 1))
            .collect();
        let chunks = 4 * MAX_FAILBACK_RANGES as u64;
        let input = PlanInput {
            chunks,
            promoted_changes: Some(many),
            after_point: vec![],
            unreplicated: Some(vec![]),
        };
        assert_eq!(plan(input).unwrap(), (true, vec![(0, chunks)]));
    }

    #[test]
    fn walk_visits_every_planned_chunk_once() {
        let walk = PlanWalk::new(vec![(1, 3), (7, 8)]);
        assert_eq!(walk.remaining(), 3);
        assert_eq!(walk.collect::<Vec<_>>(), vec![1, 2, 7]);
        assert_eq!(PlanWalk::new(vec![]).next(), None);
        let mut walk = PlanWalk::new(vec![(1, 3), (7, 9), (20, 30)]);
        walk.skip_to(8);
        assert_eq!(walk.peek(), Some(8));
        walk.skip_to(10);
        assert_eq!(walk.peek(), Some(20));
        walk.skip_to(25);
        assert_eq!(walk.remaining(), 5);
        walk.skip_to(3);
        assert_eq!(walk.peek(), Some(25), "never backwards");
        walk.skip_to(30);
        assert_eq!(walk.peek(), None);
    }

    #[test]
    fn data_cursor_takes_planned_chunks_in_order_with_their_length() {
        // 10 chunks of 4 KiB, the last one 1 KiB.
        let size = 9 * 4096 + 1024;
        let mut cursor = DataCursor::new(vec![(2, 4), (9, 10)], size, 4096);
        assert_eq!(cursor.accept(2, Some(4096)).unwrap(), (2 * 4096, 4096));
        // Skipping chunk 3 is fine (it matched); going back is not.
        assert!(cursor.clone().accept(2, None).is_err());
        assert!(cursor.clone().accept(5, None).is_err());
        assert!(cursor.clone().accept(9, Some(4096)).is_err());
        assert_eq!(cursor.accept(9, Some(1024)).unwrap(), (9 * 4096, 1024));
        assert!(cursor.clone().accept(10, None).is_err());
        assert!(cursor.finish(3).is_err());
        assert_eq!(cursor.finish(2).unwrap(), 2);
    }

    #[test]
    fn hello_checks_name_the_mismatch() {
        let hello = FailbackHello {
            protocol: FAILBACK_PROTOCOL,
            volume: "vol".into(),
            size: 1 << 20,
            chunk_bytes: 65536,
            term: 2,
            committed_seq: 4,
            unreplicated: Some(vec![]),
        };
        assert!(check_hello(&hello, "vol", 1 << 20, 65536).is_ok());
        let error = check_hello(&hello, "vol", 2 << 20, 65536).unwrap_err();
        assert!(error.to_string().contains("same size"), "{error}");
        let error = check_hello(&hello, "other", 1 << 20, 65536).unwrap_err();
        assert!(error.to_string().contains("volume other"), "{error}");
        let error = check_hello(&hello, "vol", 1 << 20, 4096).unwrap_err();
        assert!(error.to_string().contains("--chunk-size"), "{error}");
    }

    #[test]
    fn chunks_pack_when_it_pays_and_unpack_only_to_their_length() {
        let text: Vec<u8> = (0..65_536u32).map(|i| (i % 7) as u8).collect();
        let (packed, zstd) = pack(&text);
        assert!(zstd && packed.len() < text.len() / 8);
        assert_eq!(unpack(packed.clone(), true, 65_536).unwrap(), text);
        // A bomb cannot grow past the planned length, and a short chunk is refused.
        assert!(unpack(packed.clone(), true, 4096).is_err());
        assert!(unpack(vec![1; 10], false, 4096).is_err());
        assert!(unpack(vec![1; 10], true, 4096).is_err());
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        let (kept, zstd) = pack(&random);
        assert!(!zstd && kept == random, "random bytes travel as they are");
        assert_eq!(chunk_len(100, 64, u64::MAX), 0);
    }

    #[test]
    fn hash_batches_are_bounded_by_the_plan() {
        assert!(check_hash_batch(3, 3).is_ok());
        assert!(check_hash_batch(4, 3).is_err());
        assert!(check_hash_batch(0, 3).is_err());
        assert!(check_hash_batch(MAX_HASH_BATCH + 1, u64::MAX).is_err());
    }
}
