//! blkmirror's kernel-side change tracker.
//!
//! One instance of this program is loaded per tracked device and attached to the classic
//! `block/block_rq_complete` tracepoint. It fires when a block request (or part of one)
//! completes, so everything it records has reached the device's queue completion path: a
//! write that completed after userspace cut an epoch lands in the next epoch.
//!
//! Userspace fills in the globals below before loading (`EbpfLoader::set_global`): which
//! device and sector range to track, the chunk size, and the byte offsets of the tracepoint
//! record's fields, read from tracefs on the running kernel (never hard-coded here).
//!
//! See `blkmirror-common` for the epoch protocol and why it never loses a completed write.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_or, atomic_xadd};

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::{Array, PerCpuArray},
    programs::TracePointContext,
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
/// Byte offsets of the `block_rq_complete` record fields, from tracefs.
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

/// The shared [`TrackState`] (one element).
#[map]
static STATE: Array<TrackState> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The chunk bitmaps: `SLOTS * KINDS * WORDS_PER_KIND` words; userspace sizes it before load.
#[map]
static DIRTY: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Requests too long to expand here, per CPU and slot (index = slot).
#[map]
static BIG: PerCpuArray<BigList> = PerCpuArray::with_max_entries(SLOTS as u32, 0);

#[inline(always)]
fn global(value: &'static u64) -> u64 {
    // SAFETY: reading a plain static; volatile so the compiler keeps the load from .rodata,
    // which userspace rewrote before loading.
    unsafe { core::ptr::read_volatile(value) }
}

/// Atomic add whose result is unused (`BPF_ATOMIC | BPF_ADD`, available on every kernel).
#[inline(always)]
fn atomic_add(ptr: *mut u64, value: u64) {
    // SAFETY: `ptr` points into a map value obtained from a successful lookup.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, value) };
}

#[tracepoint]
pub fn block_rq_complete(ctx: TracePointContext) -> u32 {
    match try_block_rq_complete(&ctx) {
        Ok(()) => 0,
        Err(()) => {
            // Anything we failed to record is counted: userspace turns it into needs_verify.
            if let Some(state) = STATE.get_ptr_mut(0) {
                // SAFETY: the state map has one element, and we only take a field address.
                atomic_add(unsafe { &raw mut (*state).overflow }, 1);
            }
            0
        }
    }
}

#[inline(always)]
fn try_block_rq_complete(ctx: &TracePointContext) -> Result<(), ()> {
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
    let mut kind = match op {
        b'W' => KIND_WRITE,
        b'D' => KIND_DISCARD,
        // On a non-zoned device the only data-changing 'N' request is write-zeroes. On a zoned
        // device it may be a zone append, so we must read the data back.
        b'N' if global(&FLAGS) & FLAG_ZONED == 0 => KIND_ZEROES,
        b'N' => KIND_WRITE,
        _ => return Ok(()),
    };
    // A failed request may have changed part of its range: read it back.
    if error != 0 {
        kind = KIND_WRITE;
    }

    let start = global(&START_SECTOR);
    let nr = global(&NR_SECTORS);
    let req_end = sector.saturating_add(u64::from(nr_sector));
    if nr_sector == 0 || req_end <= start || sector >= start + nr {
        return Ok(());
    }
    // Relative to the tracked range, clipped at its start (chunk_span clips the end).
    let (rel, len) = if sector < start {
        (0, req_end - start)
    } else {
        (sector - start, u64::from(nr_sector))
    };
    record(rel, len, kind)
}

/// Records one request into the current epoch's slot.
///
/// The whole program runs inside an RCU read-side critical section; userspace waits for a grace
/// period after changing the epoch, so the slot read here stays valid until we return.
#[inline(always)]
fn record(rel: u64, len: u64, kind: u64) -> Result<(), ()> {
    let state = STATE.get_ptr_mut(0).ok_or(())?;
    // SAFETY: `state` points to the single, always-present element; volatile keeps the load.
    let epoch = unsafe { core::ptr::read_volatile(&raw const (*state).epoch) };
    record_in_slot(epoch % SLOTS as u64, rel, len, kind)
}

#[inline(always)]
fn record_in_slot(slot: u64, rel: u64, len: u64, kind: u64) -> Result<(), ()> {
    let nr = global(&NR_SECTORS);
    let shift = global(&CHUNK_SHIFT);
    let span = chunk_span(rel, len, nr, shift).ok_or(())?;
    let words = global(&WORDS_PER_KIND);
    if (span.end - 1) / 64 - span.first / 64 + 1 > MAX_WORDS_PER_EVENT {
        return push_big(slot, rel, len, kind);
    }
    if kind == KIND_WRITE || span.full_first == span.full_end {
        return set_bits(bitmap_base(slot, KIND_WRITE, words), span.first, span.end);
    }
    // Partly covered chunks at either end keep data that must be read: they are writes. There
    // is at most one at each end.
    if span.first < span.full_first {
        set_bit(bitmap_base(slot, KIND_WRITE, words), span.first)?;
    }
    if span.full_end < span.end {
        set_bit(bitmap_base(slot, KIND_WRITE, words), span.full_end)?;
    }
    set_bits(bitmap_base(slot, kind, words), span.full_first, span.full_end)
}

/// ORs `mask` into word `index` of the DIRTY array.
#[inline(always)]
fn or_word(index: u64, mask: u64) -> Result<(), ()> {
    let word = DIRTY.get_ptr_mut(index as u32).ok_or(())?;
    // SAFETY: `word` points into the DIRTY array (the lookup checked the index); the update is
    // a single atomic instruction, so concurrent CPUs cannot lose each other's bits.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(word, mask) };
    Ok(())
}

/// Sets bit `chunk` of the bitmap starting at word `base`.
#[inline(always)]
fn set_bit(base: u64, chunk: u64) -> Result<(), ()> {
    or_word(base + chunk / 64, 1u64 << (chunk % 64))
}

/// Sets bits `[first, end)` of the bitmap starting at word `base`; at most
/// `MAX_WORDS_PER_EVENT` words (checked by the caller).
///
/// The loop body has no data-dependent branch except its exit, so the verifier's work grows
/// linearly with the bound: first and last words are handled outside the loop.
#[inline(always)]
fn set_bits(base: u64, first: u64, end: u64) -> Result<(), ()> {
    if first >= end {
        return Ok(());
    }
    let first_word = first / 64;
    let last_word = (end - 1) / 64;
    let head = u64::MAX << (first % 64);
    let tail = u64::MAX >> (63 - (end - 1) % 64);
    if first_word == last_word {
        return or_word(base + first_word, head & tail);
    }
    or_word(base + first_word, head)?;
    or_word(base + last_word, tail)?;
    let middle = last_word - first_word - 1;
    let mut i = 0;
    while i < MAX_WORDS_PER_EVENT {
        if i >= middle {
            break;
        }
        or_word(base + first_word + 1 + i, u64::MAX)?;
        i += 1;
    }
    Ok(())
}

#[inline(always)]
fn push_big(slot: u64, start: u64, len: u64, kind: u64) -> Result<(), ()> {
    let list = BIG.get_ptr_mut(slot as u32).ok_or(())?;
    // SAFETY: `list` is this CPU's element; the kernel never nests this program on one CPU and
    // userspace touches the lists only after an RCU grace period, so the access is exclusive.
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
