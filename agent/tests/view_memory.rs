//! The memory a receiver's view of an object store takes per chunk, counted by the allocator.
//!
//! Every receiver of a store holds where each chunk of the store is (`ChunkLocations`), so the
//! bytes per chunk bound the unique data one store can hold (the capacity model in
//! ARCHITECTURE.md). This test counts them with a global allocator of its own (this file is its
//! own test binary with a single test, so nothing else allocates meanwhile), checks
//! `ChunkLocations::memory_bytes`, which `status` reports, against the count, and compares the
//! compact layout with the one it replaced, rebuilt here as the baseline of the same run. It
//! also measures a volume's chunk map (`ChunkMap`), which a receiver remembers for every volume
//! it publishes.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    sync::atomic::{AtomicIsize, Ordering},
};

use blkmirror::dr::layout::{ChunkId, ChunkLocations, ChunkMap, Codec, IndexEntry, PackId};

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; the counter is only a
// side effect.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `alloc` above, that is by `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// A chunk id that looks like a hash (the tables hash it again; only distinctness matters).
fn chunk_id(n: u64) -> ChunkId {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    id[8..16].copy_from_slice(&n.to_le_bytes());
    id
}

/// The indexes of `chunks` chunks in packs of 512 (32 MiB packs of 64 KiB chunks).
fn packs(chunks: u64) -> Vec<(PackId, Vec<IndexEntry>)> {
    (0..chunks.div_ceil(512))
        .map(|pack| {
            let entries = (pack * 512..((pack + 1) * 512).min(chunks))
                .map(|n| IndexEntry {
                    id: chunk_id(n),
                    offset: (n % 512) * 40_000,
                    stored_len: 40_000,
                    raw_len: 65_536,
                    codec: Codec::Zstd,
                    sealed: false,
                })
                .collect();
            let mut id = [0xffu8; 32];
            id[..8].copy_from_slice(&pack.to_le_bytes());
            (id, entries)
        })
        .collect()
}

/// Bytes per chunk of `ChunkLocations` and of the layout it replaced, for `chunks` chunks.
fn per_chunk(chunks: u64) -> (f64, f64, f64) {
    let indexes = packs(chunks);

    let before = live();
    let mut locations = ChunkLocations::default();
    for (pack, index) in &indexes {
        locations.add(*pack, index, false);
    }
    let counted = (live() - before) as f64;
    assert_eq!(locations.len() as u64, chunks);
    let estimated = locations.memory_bytes() as f64;
    assert!(
        (estimated - counted).abs() <= counted * 0.02,
        "{chunks} chunks: memory_bytes() says {estimated}, the allocator counted {counted}"
    );
    // It still answers what it was given (the vector merged many times on the way).
    for (pack, index) in indexes.iter().step_by(7) {
        for entry in index.iter().step_by(13) {
            assert_eq!(locations.get(&entry.id), Some((*pack, entry.clone())));
            assert!(locations.contains(&entry.id));
        }
    }
    assert_eq!(locations.get(&chunk_id(chunks)), None);
    drop(locations);

    // Loaded at once, as a receiver loads its view when it starts.
    let before = live();
    let loaded = ChunkLocations::from_packs(
        indexes
            .iter()
            .map(|(pack, index)| (*pack, index.as_slice(), false)),
    );
    let loaded_counted = (live() - before) as f64;
    assert!(
        (loaded.memory_bytes() as f64 - loaded_counted).abs() <= loaded_counted * 0.02,
        "{chunks} chunks loaded: memory_bytes() says {}, the allocator counted {loaded_counted}",
        loaded.memory_bytes()
    );
    assert!(
        loaded_counted <= counted,
        "{loaded_counted} loaded, {counted} grown"
    );
    for (pack, index) in indexes.iter().step_by(11) {
        let entry = &index[index.len() / 2];
        assert_eq!(loaded.get(&entry.id), Some((*pack, entry.clone())));
    }
    drop(loaded);

    // The layout before (a copy of the pack id and of the whole index entry per chunk).
    let before = live();
    let mut old: HashMap<ChunkId, (PackId, IndexEntry, bool)> = HashMap::new();
    for (pack, index) in &indexes {
        for entry in index {
            old.insert(entry.id, (*pack, entry.clone(), false));
        }
    }
    let old_counted = (live() - before) as f64;
    drop(old);
    let n = chunks as f64;
    (counted / n, estimated / n, old_counted / n)
}

#[test]
fn the_view_takes_under_64_bytes_a_chunk_and_status_reports_it_truly() {
    // For the layout before, 900,000 chunks fill 2^20 buckets to 86%, and 1,000,000 take 2^21
    // at 48%: the best and the worst case of a hash table's spare room.
    for chunks in [900_000u64, 1_000_000] {
        let (counted, estimated, old) = per_chunk(chunks);
        println!(
            "{chunks} chunks: view {counted:.1} bytes a chunk (memory_bytes {estimated:.1}); \
             the layout before {old:.1}; ratio {:.2}",
            counted / old
        );
        assert!(counted < 64.0, "{counted} bytes a chunk");
        assert!(counted / old <= 0.5, "{counted} against {old} before");
    }

    // A volume's chunk map as a receiver remembers it: built from a full manifest (in chunk
    // order), then after a day of scattered changes to 1% of it.
    let chunks = 1_000_000u64;
    let before = live();
    let mut map = ChunkMap {
        chunks: (0..chunks).map(|n| (n, chunk_id(n))).collect(),
        ..ChunkMap::default()
    };
    let built = (live() - before) as f64 / chunks as f64;
    for n in 0..chunks / 100 {
        let chunk = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) % chunks;
        map.chunks.remove(&chunk);
        map.chunks.insert(chunk, chunk_id(chunk + chunks));
    }
    let changed = (live() - before) as f64 / chunks as f64;
    println!(
        "a volume's chunk map: {built:.1} bytes a chunk as read from a full manifest, \
         {changed:.1} after changes to 1% of it"
    );
    assert_eq!(map.chunks.len() as u64, chunks);
    assert!(built <= 48.0, "{built} bytes a chunk");
}
