//! What the blkmirror kernel tracker and userspace must agree on byte for byte.
//!
//! # The tracking model
//!
//! A tracked device is a whole disk's kernel `dev_t` plus a sector range (a partition is the
//! whole disk plus its range: the block tracepoints report partition IO with the whole disk's
//! `dev` and absolute sectors). The range is cut into *chunks* of `2^chunk_shift` sectors.
//!
//! For each tracked device the kernel program keeps [`SLOTS`] *epoch slots*. Each slot holds
//! [`KINDS`] bitmaps with one bit per chunk (written, discarded, zeroed) plus, per CPU, a short
//! list of [`BigExtent`]s for requests too long to expand in the kernel. A request that completes
//! while the epoch is `e` lands in slot `e % SLOTS`.
//!
//! # Why a cut never loses a write
//!
//! Userspace *cuts* by storing `e + 1` into [`TrackState::epoch`] and then waiting for an RCU
//! grace period (`membarrier(MEMBARRIER_CMD_GLOBAL)`, which calls `synchronize_rcu()`). Every
//! tracepoint program runs inside an RCU read-side critical section, so when the grace period
//! ends, every invocation that could have read the old epoch has finished its stores into the old
//! slot, and every later invocation sees the new epoch. Only then does userspace read and clear
//! the old slot. Hence:
//!
//! * a request that completed before the cut is in slot `e` (or, if its program ran after the
//!   store, in slot `e + 1`: later, never lost);
//! * a request that completes after userspace began reading a chunk for epoch `e` runs its
//!   program after the cut, so it lands in epoch `e + 1` or later, and the chunk is read again.
//!
//! The bitmaps are only ever changed with atomic OR by the program and cleared by userspace
//! while no program can touch them. Requests the program cannot record (a full big-extent list)
//! and invocations the kernel skipped (BPF recursion protection, visible in the program's
//! `recursion_misses`) are counted, and userspace then declares the device `needs_verify`.
//!
//! The kernel can also skip tracing programs *without* counting anything (seen on this
//! project's CI kernel for completions run in soft-interrupt context on top of one particular
//! task). So the programs also count every write-like request of the whole disk, and userspace
//! compares that with the disk's own completed-request counters (`/sys/dev/block/M:m/stat`),
//! which the block layer bumps *after* the tracepoint: more requests in the statistics than
//! the programs saw means something was missed, and the device needs a verify.
//!
//! Everything here is `#[repr(C)]`, plain old data, and `no_std`, so the same definitions
//! compile for `bpfel-unknown-none` and for userspace.
#![no_std]

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Number of epoch slots (double buffering: one being written, one being drained).
pub const SLOTS: usize = 2;

/// Kind index of a write (or anything whose resulting content must be read back).
pub const KIND_WRITE: u64 = 0;
/// Kind index of a discard (`blkdiscard`, `fstrim`, filesystem discards).
pub const KIND_DISCARD: u64 = 1;
/// Kind index of a write-zeroes request (`blkdiscard -z`, `fallocate` zero range).
pub const KIND_ZEROES: u64 = 2;
/// Number of change kinds, hence bitmaps per slot.
pub const KINDS: usize = 3;

/// Requests covering more bitmap words than this are not expanded in the kernel (verifier
/// budget); they are queued as a [`BigExtent`] and expanded by userspace instead. 256 words are
/// 16384 chunks: 1 GiB at 64 KiB chunks.
pub const MAX_WORDS_PER_EVENT: u64 = 256;

/// Capacity of one CPU's big-extent list in one slot. When it is full, the request is counted in
/// [`TrackState::overflow`] and the device needs a full verify.
pub const BIG_EXTENTS_PER_CPU: usize = 128;

/// Magic in [`TrackState::magic`]: identifies a blkmirror state map and its layout version.
/// Bump the low byte whenever the layout of any type here changes.
pub const STATE_MAGIC: u64 = 0x626c_6b6d_6972_0004; // "blkmir" + layout v4

/// Bit in [`TrackState::hooks`]: the classic `block/block_rq_complete` tracepoint is attached.
pub const HOOK_CLASSIC: u64 = 1;
/// Bit in [`TrackState::hooks`]: the raw `block_rq_complete` tracepoint is attached.
pub const HOOK_RAW: u64 = 2;

/// Index in the per-CPU `STATS` array: requests on the tracked range seen by the classic hook.
pub const STAT_CLASSIC_EVENTS: u32 = 0;
/// Index in the per-CPU `STATS` array: requests on the tracked range seen by the raw hook.
pub const STAT_RAW_EVENTS: u32 = 1;
/// Index in `STATS`: write-like requests (write, discard, write-zeroes, ...) on the whole disk
/// seen by the classic hook, for the cross-check against the disk's own I/O statistics.
pub const STAT_CLASSIC_WRITE_REQS: u32 = 2;
/// Index in `STATS`: the same for the raw hook.
pub const STAT_RAW_WRITE_REQS: u32 = 3;
/// Index in `STATS`: invocations of the classic program that began. With
/// [`STAT_CLASSIC_EXITS`] it is userspace's grace period after an epoch change: it reads the
/// enter counts, then waits until each CPU's exit count reaches them; any invocation that
/// began later reads the new epoch (the program's increment is an atomic that is a full
/// barrier, made before it reads the epoch). This replaces `membarrier(MEMBARRIER_CMD_GLOBAL)`, an RCU grace
/// period, which on Linux 6.18 made the kernel skip the tracing programs for some completions
/// while it ran (measured: 5 of 40 runs of 1536 sequential writes lost one with a tracker
/// cutting every second, none without it). The ordering needs the kernel's `lock add` of x86;
/// on other architectures, with older pins (4 `STATS` entries) and with the byte-map programs,
/// userspace still waits for a grace period.
pub const STAT_CLASSIC_ENTERS: u32 = 4;
/// Index in `STATS`: invocations of the classic program that returned.
pub const STAT_CLASSIC_EXITS: u32 = 5;
/// Index in `STATS`: invocations of the raw program that began.
pub const STAT_RAW_ENTERS: u32 = 6;
/// Index in `STATS`: invocations of the raw program that returned.
pub const STAT_RAW_EXITS: u32 = 7;
/// Index in `STATS`: sectors of the whole disk's write-like completions seen by the classic
/// hook, counted per completion part as the block layer counts the disk's write and discard
/// sectors (`nr_bytes >> 9`, right after the tracepoint). Unlike request counts, this sum
/// cannot run ahead of the disk's: a request completed in several parts, or an empty
/// pre-flush write (which the block layer leaves out of its request count), adds the same to
/// both sides. So "the disk's sectors ahead of the hooks'" proves a skipped completion that no
/// other completion can hide.
pub const STAT_CLASSIC_WRITE_SECTORS: u32 = 8;
/// Index in `STATS`: the same sectors seen by the raw hook.
pub const STAT_RAW_WRITE_SECTORS: u32 = 9;
/// Index in `STATS`, written only by userspace (in CPU 0's element; the programs never touch
/// it): the disk's completed write and discard sectors when the hooks had been attached, the
/// baseline of the sector cross-check, or `u64::MAX` when the disk keeps no statistics.
pub const STAT_DISK_SECTORS_BASE: u32 = 10;
/// Index in `STATS`, written only by userspace (CPU 0's element): the sectors the disk
/// completed beyond the hooks' count that were already reported (an `i64` stored as `u64`).
pub const STAT_UNSEEN_SECTORS_ACKED: u32 = 11;
/// Index in `STATS`, written only by userspace (CPU 0's element): the CLOCK_MONOTONIC time,
/// in microseconds, at which the last released cut read the disk's statistics (0: unknown). A
/// skip the cross-check finds later happened after it, so the tracker reads its completion log
/// from there, also in a process that adopted the pins.
pub const STAT_RELEASED_CUT_US: u32 = 12;
/// Entries in the `STATS` array.
pub const STATS: usize = 13;
/// Entries in the `STATS` array of pins made before the sector counters: their programs count
/// invocations but no sectors. The agent replaces such pins (a new tracking generation), since
/// their request count can hide a skipped completion.
pub const STATS_BEFORE_SECTORS: usize = 8;

/// Flag in the `FLAGS` global: the device is zoned, so an `N` request may be a zone append
/// (data), and is recorded as a write rather than as zeroes.
pub const FLAG_ZONED: u64 = 1;

/// Per-device shared state, one element of the mmap-able `STATE` array map.
///
/// Fields written by the kernel program are only ever changed with atomic instructions;
/// userspace accesses them through atomics on the mmap-ed map.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct TrackState {
    /// [`STATE_MAGIC`] once userspace initialised the map; zero before.
    pub magic: u64,
    /// Current epoch. Written only by userspace. Requests complete into slot `epoch % SLOTS`.
    pub epoch: u64,
    /// The last epoch whose slot userspace has read and cleared.
    pub released: u64,
    /// Requests the program could not record (big-extent list full). Never decreases.
    pub overflow: u64,
    /// Random identity of this tracking generation, chosen when the pins were created.
    pub generation: u64,
    /// Whole-disk kernel `dev_t` (`major << 20 | minor`) this state tracks.
    pub dev: u64,
    /// First tracked sector (absolute, on the whole disk).
    pub start_sector: u64,
    /// Number of tracked sectors.
    pub nr_sectors: u64,
    /// log2 of the chunk size in 512-byte sectors.
    pub chunk_shift: u64,
    /// Number of `u64` words in one kind bitmap.
    pub words_per_kind: u64,
    /// Wall-clock time (seconds since the Unix epoch) the generation was created.
    pub created_unix: u64,
    /// The `overflow` count userspace has already reported (userspace-owned).
    pub overflow_acked: u64,
    /// The classic program's `recursion_misses` already accounted for (userspace-owned).
    pub misses_acked: u64,
    /// The raw program's `recursion_misses` already accounted for (userspace-owned).
    pub raw_misses_acked: u64,
    /// Which hooks are attached: [`HOOK_CLASSIC`], [`HOOK_RAW`].
    pub hooks: u64,
    /// Bit 0: the classic program missed events in the last interval; bit 1: the raw one did
    /// (userspace-owned; a completion skipped by both programs straddles at most two).
    pub recent_misses: u64,
    /// The disk's completed write and discard requests (from its `stat` file) when the hooks
    /// had been attached (userspace-owned).
    pub disk_stat_base: u64,
    /// Requests the disk completed that no hook saw, as already reported (userspace-owned,
    /// an `i64` stored as `u64`).
    pub unseen_acked: u64,
    /// The tracked disk's `struct request_queue` address, learnt by the raw hook from the
    /// first request it matched, so later requests of the disk skip the `q->disk` lookups
    /// (kernel-owned; a cache: a request with another queue is still checked in full).
    pub queue: u64,
    /// Non-zero when the dirty map is a *byte map*: one byte per chunk (8 `u64` per bitmap
    /// word) for kernels whose verifier has no BPF atomic OR (before Linux 5.12).
    pub byte_map: u64,
}

/// A request too long to expand into bitmap bits in the kernel, kept for userspace.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct BigExtent {
    /// First sector, relative to the tracked range.
    pub start: u64,
    /// Number of sectors.
    pub len: u64,
    /// One of [`KIND_WRITE`], [`KIND_DISCARD`], [`KIND_ZEROES`].
    pub kind: u64,
}

/// One CPU's list of big extents for one slot: an element of the per-CPU `BIG` array (index =
/// slot). Per-CPU data needs no atomics: the kernel never runs this program twice at once on one
/// CPU (it skips and counts a nested invocation instead).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BigList {
    /// Entries claimed, possibly more than [`BIG_EXTENTS_PER_CPU`] (the rest overflowed).
    pub count: u64,
    /// The entries; only the first `min(count, BIG_EXTENTS_PER_CPU)` are valid.
    pub entries: [BigExtent; BIG_EXTENTS_PER_CPU],
}

impl Default for BigList {
    fn default() -> Self {
        Self {
            count: 0,
            entries: [BigExtent::default(); BIG_EXTENTS_PER_CPU],
        }
    }
}

/// Implements `aya::Pod` for types whose zerocopy derives prove the two things `Pod` asks for:
/// `IntoBytes` (no padding, so every byte the kernel copies is defined) and `FromBytes` (valid
/// for any bits the kernel writes). A type without them does not compile here.
#[cfg(feature = "user")]
macro_rules! pod_from_zerocopy {
    ($($ty:ty),*) => {$(
        const _: () = {
            const fn proven<T: FromBytes + IntoBytes + Immutable>() {}
            proven::<$ty>();
        };
        // SAFETY: the `proven` call above only compiles if zerocopy's derives showed that the
        // type has no padding and accepts any bit pattern, which is what `aya::Pod` requires.
        unsafe impl aya::Pod for $ty {}
    )*};
}
#[cfg(feature = "user")]
pod_from_zerocopy!(BigList, TrackState, BigExtent);

/// How one request maps onto chunks.
///
/// Chunks `[first, end)` are touched. Chunks `[full_first, full_end)` are covered entirely
/// (the last chunk of a device whose size is not a multiple of the chunk size counts as covered
/// when the request reaches the end of the device). `full_first == full_end` means no chunk is
/// fully covered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSpan {
    /// First touched chunk.
    pub first: u64,
    /// One past the last touched chunk.
    pub end: u64,
    /// First fully covered chunk.
    pub full_first: u64,
    /// One past the last fully covered chunk.
    pub full_end: u64,
}

/// Maps the request `[start, start + len)` (sectors relative to the tracked range) onto chunks
/// of `2^chunk_shift` sectors in a range of `nr_sectors` sectors. The request is clipped to the
/// range; `None` when nothing of it lies inside.
///
/// Used by the kernel program and by userspace, so both classify a request identically.
#[inline(always)]
pub fn chunk_span(start: u64, len: u64, nr_sectors: u64, chunk_shift: u64) -> Option<ChunkSpan> {
    if len == 0 || start >= nr_sectors || chunk_shift >= 64 {
        return None;
    }
    let end = if len > nr_sectors - start {
        nr_sectors
    } else {
        start + len
    };
    let chunk = 1u64 << chunk_shift;
    let first = start >> chunk_shift;
    let last_end = ((end - 1) >> chunk_shift) + 1;
    // A chunk is fully covered if the request starts at or before its start and ends at or after
    // its end, where the end of the last chunk is clipped to the device.
    let full_first = if start & (chunk - 1) == 0 {
        first
    } else {
        first + 1
    };
    let full_end = if end & (chunk - 1) == 0 || end == nr_sectors {
        last_end
    } else {
        last_end - 1
    };
    let full_end = if full_end < full_first {
        full_first
    } else {
        full_end
    };
    Some(ChunkSpan {
        first,
        end: last_end,
        full_first,
        full_end,
    })
}

/// Number of chunks in a range of `nr_sectors` sectors.
#[inline(always)]
pub fn chunk_count(nr_sectors: u64, chunk_shift: u64) -> u64 {
    if chunk_shift >= 64 {
        return u64::from(nr_sectors > 0);
    }
    let chunk = 1u64 << chunk_shift;
    nr_sectors / chunk + u64::from(!nr_sectors.is_multiple_of(chunk))
}

/// Number of `u64` words in one kind bitmap of a range of `nr_sectors` sectors.
#[inline(always)]
pub fn words_per_kind(nr_sectors: u64, chunk_shift: u64) -> u64 {
    chunk_count(nr_sectors, chunk_shift).div_ceil(64)
}

/// Index of the first word of the bitmap of `kind` in `slot` in the `DIRTY` array.
#[inline(always)]
pub fn bitmap_base(slot: u64, kind: u64, words_per_kind: u64) -> u64 {
    (slot * KINDS as u64 + kind) * words_per_kind
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn aligned_request_covers_its_chunks() {
        // 128-sector chunks (64 KiB), request covers chunks 1 and 2 exactly.
        let span = chunk_span(128, 256, 1 << 20, 7).unwrap();
        assert_eq!(
            span,
            ChunkSpan {
                first: 1,
                end: 3,
                full_first: 1,
                full_end: 3
            }
        );
    }

    #[test]
    fn unaligned_request_has_partial_ends() {
        let span = chunk_span(130, 256, 1 << 20, 7).unwrap();
        assert_eq!(
            span,
            ChunkSpan {
                first: 1,
                end: 4,
                full_first: 2,
                full_end: 3
            }
        );
    }

    #[test]
    fn small_request_inside_one_chunk_covers_nothing() {
        let span = chunk_span(1, 8, 1 << 20, 7).unwrap();
        assert_eq!(span.first, 0);
        assert_eq!(span.end, 1);
        assert_eq!(span.full_first, span.full_end);
    }

    #[test]
    fn request_to_short_last_chunk_covers_it() {
        // 300 sectors: chunks of 128 → 3 chunks, the last one 44 sectors long.
        let span = chunk_span(256, 44, 300, 7).unwrap();
        assert_eq!(
            span,
            ChunkSpan {
                first: 2,
                end: 3,
                full_first: 2,
                full_end: 3
            }
        );
    }

    #[test]
    fn request_outside_range_is_ignored() {
        assert_eq!(chunk_span(300, 8, 300, 7), None);
        assert_eq!(chunk_span(0, 0, 300, 7), None);
    }

    #[test]
    fn request_past_end_is_clipped() {
        let span = chunk_span(200, 1000, 300, 7).unwrap();
        assert_eq!(
            span,
            ChunkSpan {
                first: 1,
                end: 3,
                full_first: 2,
                full_end: 3
            }
        );
    }

    #[test]
    fn counts() {
        assert_eq!(chunk_count(300, 7), 3);
        assert_eq!(chunk_count(256, 7), 2);
        assert_eq!(words_per_kind(64 * 128, 7), 1);
        assert_eq!(words_per_kind(64 * 128 + 1, 7), 2);
        // 1 TiB at 64 KiB chunks: 16 Mi chunks, 256 Ki words.
        assert_eq!(words_per_kind(1 << 31, 7), 1 << 18);
    }

    proptest! {
        /// Against a sector-by-sector model: a chunk is touched iff some sector of the clipped
        /// request lies in it, and fully covered iff every sector of the chunk (within the
        /// range) lies in the request.
        #[test]
        fn span_matches_sector_model(
            nr_sectors in 1u64..2000,
            start in 0u64..2100,
            len in 0u64..2100,
            chunk_shift in 0u64..9,
        ) {
            let chunk = 1u64 << chunk_shift;
            let chunks = chunk_count(nr_sectors, chunk_shift);
            let req_end = (start + len).min(nr_sectors);
            let span = chunk_span(start, len, nr_sectors, chunk_shift);
            if len == 0 || start >= nr_sectors {
                prop_assert!(span.is_none());
                return Ok(());
            }
            let span = span.unwrap();
            for c in 0..chunks {
                let c_start = c * chunk;
                let c_end = ((c + 1) * chunk).min(nr_sectors);
                let touched = c_start < req_end && start < c_end;
                let full = start <= c_start && c_end <= req_end;
                prop_assert_eq!(touched, span.first <= c && c < span.end, "chunk {} touched", c);
                prop_assert_eq!(full, span.full_first <= c && c < span.full_end, "chunk {} full", c);
            }
            prop_assert!(span.end <= chunks);
        }
    }
}
