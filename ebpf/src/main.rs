//! blkmirror's kernel-side change tracker.
//!
//! One instance of this object is loaded per tracked device. It has two programs on the same
//! kernel event, the completion of (part of) a block request, `block_rq_complete`:
//!
//! * `block_rq_complete` on the classic tracepoint reads the trace record (fields located via
//!   tracefs). It works on every kernel.
//! * `block_rq_complete_raw` on the raw tracepoint reads `struct request` directly (offsets and
//!   `REQ_OP_*` values from the kernel's BTF). It tells write-zeroes apart exactly.
//!
//! Both record into the same bitmaps (an atomic OR is idempotent). Running both is not only
//! about precision: the kernel skips a classic tracepoint program while *any* tracing program
//! runs on that CPU, and a raw tracepoint program while *the same* program runs there (an
//! interrupt completing IO in the middle). A completion is therefore lost only if both were
//! skipped, and userspace sees that in both programs' `recursion_misses` counters.
//!
//! Userspace fills in the globals below before loading (`EbpfLoader::override_global`).
//!
//! See `blkmirror-common` for the epoch protocol and why it never loses a completed write.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_or, atomic_xadd};

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
};
use blkmirror_common::{
    BIG_EXTENTS_PER_CPU, BigExtent, BigList, FLAG_ZONED, KIND_DISCARD, KIND_WRITE, KIND_ZEROES,
    MAX_WORDS_PER_EVENT, SLOTS, TrackState, bitmap_base, chunk_span,
};

/// `BPF_F_MMAPABLE`: userspace maps the arrays into its address space.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Whole-disk kernel `dev_t` to track (`major << 20 | minor`).
#[unsafe(no_mangle)]
static TARGET_DEV: u64 = 0;
/// First tracked sector (absolute).
#[unsafe(no_mangle)]
static START_SECTOR: u64 = 0;
/// Number of tracked sectors.
#[unsafe(no_mangle)]
static NR_SECTORS: u64 = 0;
/// log2 of the chunk size in sectors.
#[unsafe(no_mangle)]
static CHUNK_SHIFT: u64 = 7;
/// Words in one kind bitmap (see `blkmirror_common::words_per_kind`).
#[unsafe(no_mangle)]
static WORDS_PER_KIND: u64 = 0;
/// `FLAG_*` bits.
#[unsafe(no_mangle)]
static FLAGS: u64 = 0;

// Byte offsets of the `block_rq_complete` trace record fields, from tracefs.
#[unsafe(no_mangle)]
static OFF_DEV: u64 = 8;
#[unsafe(no_mangle)]
static OFF_SECTOR: u64 = 16;
#[unsafe(no_mangle)]
static OFF_NR_SECTOR: u64 = 24;
#[unsafe(no_mangle)]
static OFF_ERROR: u64 = 28;
#[unsafe(no_mangle)]
static OFF_RWBS: u64 = 34;

// Kernel struct member offsets and `REQ_OP_*` values, from BTF (raw tracepoint hook only).
#[unsafe(no_mangle)]
static OFF_RQ_CMD_FLAGS: u64 = 0;
#[unsafe(no_mangle)]
static OFF_RQ_SECTOR: u64 = 0;
#[unsafe(no_mangle)]
static OFF_RQ_Q: u64 = 0;
#[unsafe(no_mangle)]
static OFF_Q_DISK: u64 = 0;
#[unsafe(no_mangle)]
static OFF_DISK_MAJOR: u64 = 0;
#[unsafe(no_mangle)]
static OFF_DISK_FIRST_MINOR: u64 = 0;
/// 1 when `gendisk.first_minor` directly follows `gendisk.major`: one 8-byte read gets both.
#[unsafe(no_mangle)]
static DISK_DEV_ADJACENT: u64 = 0;
/// 1: `OFF_RQ_Q` is `request.rq_disk`, a pointer to the disk itself (kernels before 5.15).
#[unsafe(no_mangle)]
static DISK_IN_RQ: u64 = 0;
#[unsafe(no_mangle)]
static OP_READ: u64 = 0;
#[unsafe(no_mangle)]
static OP_WRITE: u64 = 1;
#[unsafe(no_mangle)]
static OP_FLUSH: u64 = 2;
#[unsafe(no_mangle)]
static OP_DISCARD: u64 = 3;
#[unsafe(no_mangle)]
static OP_SECURE_ERASE: u64 = 5;
#[unsafe(no_mangle)]
static OP_WRITE_ZEROES: u64 = 9;
#[unsafe(no_mangle)]
static OP_DRV_OUT: u64 = 35;

/// The shared [`TrackState`] (one element).
#[map]
static STATE: Array<TrackState> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The chunk bitmaps: `SLOTS * KINDS * WORDS_PER_KIND` words; userspace sizes it before load.
#[map]
static DIRTY: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Requests too long to expand here, per CPU and slot (index = slot), classic hook.
#[map]
static BIG: PerCpuArray<BigList> = PerCpuArray::with_max_entries(SLOTS as u32, 0);

/// The same for the raw hook: per-CPU data is only safe without atomics because a program
/// never nests with itself, so each program has its own lists.
#[map]
static BIG_RAW: PerCpuArray<BigList> = PerCpuArray::with_max_entries(SLOTS as u32, 0);

/// Per-CPU statistics (`STAT_*` in `blkmirror-common`).
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(blkmirror_common::STATS as u32, 0);

#[inline(always)]
fn count_stat(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: this CPU's element; the same program never nests on one CPU, and the two
        // hooks count into different elements.
        unsafe { *counter += 1 };
    }
}

/// Adds `value` to this CPU's element `index` of `STATS`.
#[inline(always)]
fn add_stat(index: u32, value: u64) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: as in `count_stat`.
        unsafe { *counter += value };
    }
}

#[inline(always)]
fn global(value: &'static u64) -> u64 {
    // SAFETY: reading a plain static; volatile so the compiler keeps the load from .rodata,
    // which userspace rewrote before loading.
    unsafe { core::ptr::read_volatile(value) }
}

/// Atomic add whose result is unused (`BPF_ATOMIC | BPF_ADD`).
#[inline(always)]
fn atomic_add(ptr: *mut u64, value: u64) {
    // SAFETY: `ptr` points into a map value obtained from a successful lookup.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, value) };
}

/// Counts an event that could not be recorded: userspace turns it into needs_verify.
#[inline(always)]
fn count_overflow() {
    if let Some(state) = STATE.get_ptr_mut(0) {
        // SAFETY: the state map has one element, and we only take a field address.
        atomic_add(unsafe { &raw mut (*state).overflow }, 1);
    }
}

/// Counts an invocation's start (or, with the exit index, its end) in this CPU's `STATS`
/// element. The add is atomic (`BPF_XADD`, the only form the v1 instruction set of this
/// object allows) and sequentially consistent for the compiler, so the epoch this invocation
/// reads afterwards is not loaded before it. On x86 the kernel turns it into `lock add`, a full
/// barrier, which is what lets userspace wait for these counts instead of an RCU grace period
/// (see `blkmirror_common::STAT_CLASSIC_ENTERS`); elsewhere userspace does not rely on them.
/// Only in the atomic programs (kernels before 5.12 refuse the byte-map ones otherwise).
#[inline(always)]
fn count_invocation(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: this CPU's element of the map (the lookup checked the index); the program
        // cannot migrate while it runs.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(counter, 1) };
    }
}

#[tracepoint]
pub fn block_rq_complete(ctx: TracePointContext) -> u32 {
    count_invocation(blkmirror_common::STAT_CLASSIC_ENTERS);
    if try_block_rq_complete::<false>(&ctx).is_err() {
        count_overflow();
    }
    count_invocation(blkmirror_common::STAT_CLASSIC_EXITS);
    0
}

/// The classic hook for kernels without BPF atomic OR (byte map, see [`mark_bytes`]). A
/// separate program, because kernels before 5.12 reject an atomic OR instruction anywhere in
/// a program, reachable or not.
#[tracepoint]
pub fn block_rq_complete_bytes(ctx: TracePointContext) -> u32 {
    if try_block_rq_complete::<true>(&ctx).is_err() {
        count_overflow();
    }
    0
}

#[inline(always)]
fn try_block_rq_complete<const BYTES: bool>(ctx: &TracePointContext) -> Result<(), ()> {
    // SAFETY: offsets come from the tracepoint's format file; the helper checks the read.
    let dev: u32 = unsafe { ctx.read_at(global(&OFF_DEV) as usize) }.map_err(|_| ())?;
    if u64::from(dev) != global(&TARGET_DEV) {
        return Ok(());
    }
    // SAFETY: as above.
    let sector: u64 = unsafe { ctx.read_at(global(&OFF_SECTOR) as usize) }.map_err(|_| ())?;
    // SAFETY: as above.
    let nr_sector: u32 = unsafe { ctx.read_at(global(&OFF_NR_SECTOR) as usize) }.map_err(|_| ())?;
    // SAFETY: as above.
    let error: i32 = unsafe { ctx.read_at(global(&OFF_ERROR) as usize) }.map_err(|_| ())?;
    // SAFETY: as above.
    let rwbs: [u8; 2] = unsafe { ctx.read_at(global(&OFF_RWBS) as usize) }.map_err(|_| ())?;

    // rwbs: an optional leading 'F' (preflush), then the operation letter.
    let op = if rwbs[0] == b'F' { rwbs[1] } else { rwbs[0] };
    let kind = match op {
        b'W' => KIND_WRITE,
        b'D' => KIND_DISCARD,
        // On a non-zoned device the only data-changing 'N' request with a range is
        // write-zeroes. On a zoned device it may be a zone append: read the data back.
        b'N' if global(&FLAGS) & FLAG_ZONED == 0 => KIND_ZEROES,
        b'N' => KIND_WRITE,
        _ => return Ok(()),
    };
    count_stat(blkmirror_common::STAT_CLASSIC_WRITE_REQS);
    // The record's `nr_sector` is `nr_bytes >> 9`, what the block layer adds to the disk's
    // write or discard sectors right after the tracepoint.
    add_stat(
        blkmirror_common::STAT_CLASSIC_WRITE_SECTORS,
        u64::from(nr_sector),
    );
    record::<BYTES>(
        sector,
        u64::from(nr_sector),
        kind,
        error != 0,
        &BIG,
        blkmirror_common::STAT_CLASSIC_EVENTS,
    )
}

#[raw_tracepoint(tracepoint = "block_rq_complete")]
pub fn block_rq_complete_raw(ctx: RawTracePointContext) -> i32 {
    count_invocation(blkmirror_common::STAT_RAW_ENTERS);
    if try_block_rq_complete_raw::<false>(&ctx).is_err() {
        count_overflow();
    }
    count_invocation(blkmirror_common::STAT_RAW_EXITS);
    0
}

/// The raw hook with a byte map (see [`block_rq_complete_bytes`]).
#[raw_tracepoint(tracepoint = "block_rq_complete")]
pub fn block_rq_complete_raw_bytes(ctx: RawTracePointContext) -> i32 {
    if try_block_rq_complete_raw::<true>(&ctx).is_err() {
        count_overflow();
    }
    0
}

/// Reads a kernel value at `base + offset` (both plain numbers: no pointer arithmetic on
/// typed pointers, which newer verifiers refuse).
#[inline(always)]
fn read_kernel<T>(base: u64, offset: u64) -> Result<T, ()> {
    // SAFETY: bpf_probe_read_kernel copes with any address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel((base + offset) as *const T) }.map_err(|_| ())
}

#[inline(always)]
fn try_block_rq_complete_raw<const BYTES: bool>(ctx: &RawTracePointContext) -> Result<(), ()> {
    // TP_PROTO(struct request *rq, blk_status_t error, unsigned int nr_bytes)
    let rq: u64 = ctx.arg(0);
    let error: u64 = ctx.arg(1);
    let nr_bytes: u64 = ctx.arg(2);
    let q: u64 = read_kernel(rq, global(&OFF_RQ_Q))?;
    let state = STATE.get_ptr_mut(0).ok_or(())?;
    // SAFETY: the single state element; `queue` is a plain cache written only here.
    let known_queue = unsafe { core::ptr::read_volatile(&raw const (*state).queue) };
    if q != known_queue {
        if !is_target_disk(q)? {
            return Ok(());
        }
        // SAFETY: as above; racing writers store the same value.
        unsafe { core::ptr::write_volatile(&raw mut (*state).queue, q) };
    }
    let flags: u32 = read_kernel(rq, global(&OFF_RQ_CMD_FLAGS))?;
    let op = u64::from(flags & 0xff);
    if op == global(&OP_READ) || op == global(&OP_FLUSH) {
        return Ok(());
    }
    count_stat(blkmirror_common::STAT_RAW_WRITE_REQS);
    // The sectors the block layer adds to the disk's statistics for this completion, right
    // after the tracepoint: `nr_bytes >> 9` into the write group (odd operations: writes,
    // secure erase, write-zeroes, zone append) or the discard group. Passthrough requests
    // are not in the statistics.
    if (op & 1 == 1 && op != global(&OP_DRV_OUT)) || op == global(&OP_DISCARD) {
        add_stat(blkmirror_common::STAT_RAW_WRITE_SECTORS, nr_bytes >> 9);
    }
    if nr_bytes == 0 {
        return Ok(());
    }
    // A passthrough write could have written anywhere: we cannot say where.
    if op == global(&OP_DRV_OUT) {
        return Err(());
    }
    let kind = if op == global(&OP_WRITE) {
        KIND_WRITE
    } else if op == global(&OP_DISCARD) || op == global(&OP_SECURE_ERASE) {
        KIND_DISCARD
    } else if op == global(&OP_WRITE_ZEROES) {
        KIND_ZEROES
    } else {
        // Zone append, zone resets, anything newer: read back whatever is there now.
        KIND_WRITE
    };
    let sector: u64 = read_kernel(rq, global(&OFF_RQ_SECTOR))?;
    record::<BYTES>(
        sector,
        nr_bytes.div_ceil(512),
        kind,
        error != 0,
        &BIG_RAW,
        blkmirror_common::STAT_RAW_EVENTS,
    )
}

/// Whether the request queue `q` belongs to the tracked whole disk (`q->disk` major:minor).
#[inline(always)]
fn is_target_disk(q: u64) -> Result<bool, ()> {
    // Before 5.15 the request names its disk (`rq_disk`, read into `q` by the caller).
    let disk: u64 = if global(&DISK_IN_RQ) != 0 {
        q
    } else {
        read_kernel(q, global(&OFF_Q_DISK))?
    };
    if disk == 0 {
        return Ok(false);
    }
    let (major, minor) = if global(&DISK_DEV_ADJACENT) != 0 {
        let pair: u64 = read_kernel(disk, global(&OFF_DISK_MAJOR))?;
        (pair & 0xffff_ffff, pair >> 32)
    } else {
        let major: u32 = read_kernel(disk, global(&OFF_DISK_MAJOR))?;
        let minor: u32 = read_kernel(disk, global(&OFF_DISK_FIRST_MINOR))?;
        (u64::from(major), u64::from(minor))
    };
    Ok((major << 20 | minor) == global(&TARGET_DEV))
}

/// Clips the request `[sector, sector + nr)` to the tracked range and records it into the
/// current epoch's slot. A failed request may have changed any part of its range: it is
/// recorded as a write, so its content is read back.
///
/// The program runs inside an RCU read-side critical section; userspace waits for a grace
/// period after changing the epoch, so the slot chosen here stays valid until we return.
#[inline(always)]
fn record<const BYTES: bool>(
    sector: u64,
    nr: u64,
    kind: u64,
    failed: bool,
    big: &PerCpuArray<BigList>,
    stat: u32,
) -> Result<(), ()> {
    let kind = if failed { KIND_WRITE } else { kind };
    let start = global(&START_SECTOR);
    let tracked = global(&NR_SECTORS);
    let req_end = sector.saturating_add(nr);
    if nr == 0 || req_end <= start || sector >= start + tracked {
        return Ok(());
    }
    // Relative to the tracked range, clipped at its start (chunk_span clips the end).
    let (rel, len) = if sector < start {
        (0, req_end - start)
    } else {
        (sector - start, nr)
    };
    count_stat(stat);
    let state = STATE.get_ptr_mut(0).ok_or(())?;
    // SAFETY: `state` points to the single, always-present element; volatile keeps the load.
    let epoch = unsafe { core::ptr::read_volatile(&raw const (*state).epoch) };
    let slot = epoch % SLOTS as u64;

    let span = chunk_span(rel, len, tracked, global(&CHUNK_SHIFT)).ok_or(())?;
    let words = global(&WORDS_PER_KIND);
    if (span.end - 1) / 64 - span.first / 64 + 1 > MAX_WORDS_PER_EVENT {
        return push_big(big, slot, rel, len, kind);
    }
    if kind == KIND_WRITE || span.full_first == span.full_end {
        return set_bits::<BYTES>(bitmap_base(slot, KIND_WRITE, words), span.first, span.end);
    }
    // Partly covered chunks at either end keep data that must be read: they are writes. There
    // is at most one at each end.
    if span.first < span.full_first {
        set_bit::<BYTES>(bitmap_base(slot, KIND_WRITE, words), span.first)?;
    }
    if span.full_end < span.end {
        set_bit::<BYTES>(bitmap_base(slot, KIND_WRITE, words), span.full_end)?;
    }
    set_bits::<BYTES>(
        bitmap_base(slot, kind, words),
        span.full_first,
        span.full_end,
    )
}

/// ORs `mask` into word `index` of the DIRTY array.
#[inline(always)]
fn or_word<const BYTES: bool>(index: u64, mask: u64) -> Result<(), ()> {
    if BYTES {
        return mark_bytes(index, mask);
    }
    let word = DIRTY.get_ptr_mut(index as u32).ok_or(())?;
    // SAFETY: `word` points into the DIRTY array (the lookup checked the index); the update is
    // a single atomic instruction, so concurrent CPUs cannot lose each other's bits.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(word, mask) };
    Ok(())
}

/// The byte-map form of [`or_word`] (kernels without BPF atomic OR, before 5.12): bitmap word `index` is 8 `u64` (64 bytes, one per chunk)
/// from `index * 8` on. Writers only ever store ones (userspace clears a slot only after the
/// epoch moved on and a grace period passed), so plain stores from several CPUs cannot lose
/// each other's marks: no atomic instruction is needed.
#[inline(always)]
fn mark_bytes(index: u64, mask: u64) -> Result<(), ()> {
    let base = index * 8;
    if mask == u64::MAX {
        let mut j = 0;
        while j < 8 {
            let word = DIRTY.get_ptr_mut((base + j) as u32).ok_or(())?;
            // SAFETY: `word` points into the DIRTY array (the lookup checked the index).
            unsafe { core::ptr::write_volatile(word, 0x0101_0101_0101_0101) };
            j += 1;
        }
        return Ok(());
    }
    let mut bit = 0;
    while bit < 64 {
        if (mask >> bit) & 1 != 0 {
            let word = DIRTY.get_ptr_mut((base + bit / 8) as u32).ok_or(())?;
            // SAFETY: `word` points to an 8-byte element of the DIRTY array; `bit % 8` < 8
            // stays inside it.
            unsafe { core::ptr::write_volatile(word.cast::<u8>().add((bit % 8) as usize), 1) };
        }
        bit += 1;
    }
    Ok(())
}

/// Sets bit `chunk` of the bitmap starting at word `base`.
#[inline(always)]
fn set_bit<const BYTES: bool>(base: u64, chunk: u64) -> Result<(), ()> {
    or_word::<BYTES>(base + chunk / 64, 1u64 << (chunk % 64))
}

/// Sets bits `[first, end)` of the bitmap starting at word `base`; at most
/// `MAX_WORDS_PER_EVENT` words (checked by the caller).
///
/// The loop body has no data-dependent branch except its exit, so the verifier's work grows
/// linearly with the bound: first and last words are handled outside the loop.
#[inline(always)]
fn set_bits<const BYTES: bool>(base: u64, first: u64, end: u64) -> Result<(), ()> {
    if first >= end {
        return Ok(());
    }
    let first_word = first / 64;
    let last_word = (end - 1) / 64;
    let head = u64::MAX << (first % 64);
    let tail = u64::MAX >> (63 - (end - 1) % 64);
    if first_word == last_word {
        return or_word::<BYTES>(base + first_word, head & tail);
    }
    or_word::<BYTES>(base + first_word, head)?;
    or_word::<BYTES>(base + last_word, tail)?;
    let middle = last_word - first_word - 1;
    let mut i = 0;
    while i < MAX_WORDS_PER_EVENT {
        if i >= middle {
            break;
        }
        or_word::<BYTES>(base + first_word + 1 + i, u64::MAX)?;
        i += 1;
    }
    Ok(())
}

#[inline(always)]
fn push_big(
    big: &PerCpuArray<BigList>,
    slot: u64,
    start: u64,
    len: u64,
    kind: u64,
) -> Result<(), ()> {
    let list = big.get_ptr_mut(slot as u32).ok_or(())?;
    // SAFETY: `list` is this CPU's element of this program's own list; the kernel never nests a
    // program with itself on one CPU, and userspace touches the lists only after an RCU grace
    // period, so the access is exclusive.
    unsafe {
        let index = (*list).count;
        (*list).count = index + 1;
        if index >= BIG_EXTENTS_PER_CPU as u64 {
            return Err(());
        }
        let entry = (*list).entries.as_mut_ptr().add(index as usize);
        *entry = BigExtent { start, len, kind };
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
