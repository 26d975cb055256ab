//! Dirty-chunk bitmaps and their conversion into extents. Pure: no IO, no clock.
//!
//! A [`DirtyBitmaps`] is userspace's copy of one epoch slot: three bitmaps (written, discarded,
//! zeroed) with one bit per chunk. [`DirtyBitmaps::extents`] resolves each chunk to one
//! [`ChangeKind`] and merges runs of adjacent chunks of the same kind into [`Extent`]s in bytes
//! relative to the tracked device.
//!
//! Resolution rule, per chunk, for everything recorded in one epoch (order within the epoch is
//! unknown): any write makes it a write (its current content must be read); a discard and a
//! write-zeroes together also make it a write (we cannot know which came last); otherwise it is
//! the one kind recorded. A discard or write-zeroes that covers a chunk only partly is recorded
//! as a write of that chunk (its other part keeps data), by the kernel program and by
//! [`DirtyBitmaps::apply_request`] alike, both through [`blkmirror_common::chunk_span`].

use blkmirror_common::{KIND_DISCARD, KIND_WRITE, KIND_ZEROES, KINDS, chunk_span};
use serde::Serialize;

/// What happened to an extent during an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// New data: read it from the device.
    Write,
    /// Discarded (trim/unmap): the content is no longer meaningful.
    Discard,
    /// Zeroed with write-zeroes: reads as zeroes.
    Zeroes,
}

impl ChangeKind {
    /// The kind index shared with the kernel program.
    pub fn index(self) -> u64 {
        match self {
            Self::Write => KIND_WRITE,
            Self::Discard => KIND_DISCARD,
            Self::Zeroes => KIND_ZEROES,
        }
    }

    /// The kind for a kernel kind index (unknown indexes are treated as writes: safest).
    pub fn from_index(index: u64) -> Self {
        match index {
            KIND_DISCARD => Self::Discard,
            KIND_ZEROES => Self::Zeroes,
            _ => Self::Write,
        }
    }

    /// Lower-case name, as printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Discard => "discard",
            Self::Zeroes => "zeroes",
        }
    }

    /// Applies the resolution rule to the kinds recorded for one chunk.
    pub fn resolve(written: bool, discarded: bool, zeroed: bool) -> Option<Self> {
        match (written, discarded, zeroed) {
            (false, false, false) => None,
            (true, _, _) | (false, true, true) => Some(Self::Write),
            (false, true, false) => Some(Self::Discard),
            (false, false, true) => Some(Self::Zeroes),
        }
    }
}

/// A run of adjacent chunks with the same kind, in bytes relative to the tracked device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Extent {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (the last extent of a device is clipped to its size).
    pub length: u64,
    /// What happened to it.
    pub kind: ChangeKind,
}

/// Chunk geometry of one tracked device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Tracked size in 512-byte sectors.
    pub nr_sectors: u64,
    /// log2 of the chunk size in sectors.
    pub chunk_shift: u64,
}

impl Geometry {
    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        blkmirror_common::chunk_count(self.nr_sectors, self.chunk_shift)
    }

    /// Words in one kind bitmap.
    pub fn words_per_kind(&self) -> u64 {
        blkmirror_common::words_per_kind(self.nr_sectors, self.chunk_shift)
    }

    /// Chunk size in bytes.
    pub fn chunk_bytes(&self) -> u64 {
        512 << self.chunk_shift
    }

    /// Tracked size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.nr_sectors * 512
    }
}

/// Userspace copy of one epoch slot: one bitmap per kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmaps {
    geometry: Geometry,
    kinds: [Vec<u64>; KINDS],
}

impl DirtyBitmaps {
    /// Empty bitmaps for `geometry`.
    pub fn new(geometry: Geometry) -> Self {
        let words = usize::try_from(geometry.words_per_kind()).unwrap_or(usize::MAX);
        Self {
            geometry,
            kinds: [vec![0; words], vec![0; words], vec![0; words]],
        }
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Mutable access to the words of one kind (filled from the kernel's bitmap).
    pub fn words_mut(&mut self, kind: ChangeKind) -> &mut [u64] {
        &mut self.kinds[kind_slot(kind)]
    }

    /// Forgets every kind recorded for chunks `[first, end)` (clipped to the device).
    pub fn clear_range(&mut self, first: u64, end: u64) {
        let end = end.min(self.geometry.chunks());
        for words in &mut self.kinds {
            for chunk in first..end {
                words[(chunk / 64) as usize] &= !(1u64 << (chunk % 64));
            }
        }
    }

    /// Marks chunks `[first, end)` with `kind` (clipped to the device).
    pub fn set_range(&mut self, kind: ChangeKind, first: u64, end: u64) {
        let end = end.min(self.geometry.chunks());
        let words = &mut self.kinds[kind_slot(kind)];
        let mut chunk = first;
        while chunk < end {
            let word = (chunk / 64) as usize;
            let bit = chunk % 64;
            let span = (64 - bit).min(end - chunk);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << bit
            };
            words[word] |= mask;
            chunk += span;
        }
    }

    /// Records one request of `len` sectors at `start` (relative to the tracked range) exactly
    /// as the kernel program does.
    pub fn apply_request(&mut self, start: u64, len: u64, kind: ChangeKind) {
        let Some(span) = chunk_span(
            start,
            len,
            self.geometry.nr_sectors,
            self.geometry.chunk_shift,
        ) else {
            return;
        };
        if kind == ChangeKind::Write || span.full_first == span.full_end {
            self.set_range(ChangeKind::Write, span.first, span.end);
            return;
        }
        self.set_range(ChangeKind::Write, span.first, span.full_first);
        self.set_range(ChangeKind::Write, span.full_end, span.end);
        self.set_range(kind, span.full_first, span.full_end);
    }

    /// Marks the chunks of an extent (as produced by [`Self::extents`]) with its kind.
    pub fn add_extent(&mut self, extent: &Extent) {
        let chunk_bytes = self.geometry.chunk_bytes();
        let first = extent.offset / chunk_bytes;
        let end = (extent.offset + extent.length).div_ceil(chunk_bytes);
        self.set_range(extent.kind, first, end);
    }

    /// Adds everything recorded in `other` (same geometry) to `self`.
    pub fn union(&mut self, other: &Self) {
        debug_assert_eq!(self.geometry, other.geometry);
        for (mine, theirs) in self.kinds.iter_mut().zip(&other.kinds) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a |= *b;
            }
        }
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.kinds.iter().all(|words| words.iter().all(|w| *w == 0))
    }

    /// The resolved kind of one chunk.
    pub fn kind_of(&self, chunk: u64) -> Option<ChangeKind> {
        let word = (chunk / 64) as usize;
        let bit = 1u64 << (chunk % 64);
        let has = |k: usize| self.kinds[k].get(word).is_some_and(|w| w & bit != 0);
        ChangeKind::resolve(has(0), has(1), has(2))
    }

    /// Number of dirty chunks.
    pub fn dirty_chunks(&self) -> u64 {
        (0..self.kinds[0].len())
            .map(|i| {
                u64::from((self.kinds[0][i] | self.kinds[1][i] | self.kinds[2][i]).count_ones())
            })
            .sum()
    }

    /// Resolves every chunk and merges runs of adjacent chunks of one kind into extents, in
    /// ascending offset order.
    pub fn extents(&self) -> Vec<Extent> {
        let chunk_bytes = self.geometry.chunk_bytes();
        let size = self.geometry.size_bytes();
        let mut out: Vec<Extent> = Vec::new();
        for word in 0..self.kinds[0].len() {
            let any = self.kinds[0][word] | self.kinds[1][word] | self.kinds[2][word];
            let mut bits = any;
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let chunk = word as u64 * 64 + bit;
                let Some(kind) = self.kind_of(chunk) else {
                    continue;
                };
                let offset = chunk * chunk_bytes;
                let length = chunk_bytes.min(size - offset);
                match out.last_mut() {
                    Some(last) if last.kind == kind && last.offset + last.length == offset => {
                        last.length += length;
                    }
                    _ => out.push(Extent {
                        offset,
                        length,
                        kind,
                    }),
                }
            }
        }
        out
    }
}

fn kind_slot(kind: ChangeKind) -> usize {
    kind.index() as usize
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn geometry(nr_sectors: u64, chunk_shift: u64) -> Geometry {
        Geometry {
            nr_sectors,
            chunk_shift,
        }
    }

    #[test]
    fn adjacent_writes_merge_into_one_extent() {
        let mut set = DirtyBitmaps::new(geometry(1 << 16, 7));
        set.apply_request(0, 8, ChangeKind::Write); // chunk 0
        set.apply_request(128, 8, ChangeKind::Write); // chunk 1
        set.apply_request(1280, 8, ChangeKind::Write); // chunk 10
        assert_eq!(
            set.extents(),
            vec![
                Extent {
                    offset: 0,
                    length: 131_072,
                    kind: ChangeKind::Write
                },
                Extent {
                    offset: 655_360,
                    length: 65_536,
                    kind: ChangeKind::Write
                },
            ]
        );
    }

    #[test]
    fn partial_discard_is_a_write_of_its_end_chunks() {
        let mut set = DirtyBitmaps::new(geometry(1 << 16, 7));
        // Sectors 64..448: chunk 0 partly, chunks 1 and 2 fully, chunk 3 partly.
        set.apply_request(64, 384, ChangeKind::Discard);
        assert_eq!(
            set.extents(),
            vec![
                Extent {
                    offset: 0,
                    length: 65_536,
                    kind: ChangeKind::Write
                },
                Extent {
                    offset: 65_536,
                    length: 131_072,
                    kind: ChangeKind::Discard
                },
                Extent {
                    offset: 196_608,
                    length: 65_536,
                    kind: ChangeKind::Write
                },
            ]
        );
    }

    #[test]
    fn last_chunk_is_clipped_to_the_device() {
        // 300 sectors = 153600 bytes; 64 KiB chunks → last chunk 22528 bytes.
        let mut set = DirtyBitmaps::new(geometry(300, 7));
        set.apply_request(0, 300, ChangeKind::Zeroes);
        assert_eq!(
            set.extents(),
            vec![Extent {
                offset: 0,
                length: 153_600,
                kind: ChangeKind::Zeroes
            }]
        );
    }

    #[test]
    fn discard_and_zeroes_in_one_epoch_resolve_to_write() {
        assert_eq!(
            ChangeKind::resolve(false, true, true),
            Some(ChangeKind::Write)
        );
        assert_eq!(
            ChangeKind::resolve(true, true, false),
            Some(ChangeKind::Write)
        );
        assert_eq!(ChangeKind::resolve(false, false, false), None);
    }

    #[derive(Clone, Debug)]
    struct Request {
        start: u64,
        len: u64,
        kind: ChangeKind,
    }

    fn request() -> impl Strategy<Value = Request> {
        (
            0u64..5000,
            1u64..700,
            prop_oneof![
                Just(ChangeKind::Write),
                Just(ChangeKind::Discard),
                Just(ChangeKind::Zeroes)
            ],
        )
            .prop_map(|(start, len, kind)| Request { start, len, kind })
    }

    proptest! {
        /// Against a per-sector model: every chunk holding a sector of a request is reported,
        /// no other chunk is, and the reported kind follows the resolution rule; extents are
        /// sorted, disjoint, maximal runs.
        #[test]
        fn extents_match_sector_model(
            nr_sectors in 1u64..5000,
            chunk_shift in 0u64..8,
            requests in proptest::collection::vec(request(), 0..20),
        ) {
            let geo = geometry(nr_sectors, chunk_shift);
            let mut set = DirtyBitmaps::new(geo);
            // Model: per chunk, which kinds touched it fully or partly.
            let mut model: BTreeMap<u64, [bool; 3]> = BTreeMap::new();
            let chunk = 1u64 << chunk_shift;
            for r in &requests {
                set.apply_request(r.start, r.len, r.kind);
                let end = (r.start + r.len).min(nr_sectors);
                for c in 0..geo.chunks() {
                    let c_start = c * chunk;
                    let c_end = ((c + 1) * chunk).min(nr_sectors);
                    if r.start >= end || !(c_start < end && r.start < c_end) {
                        continue;
                    }
                    let full = r.start <= c_start && c_end <= end;
                    let k = if full { r.kind } else { ChangeKind::Write };
                    model.entry(c).or_default()[k.index() as usize] = true;
                }
            }
            let extents = set.extents();
            let mut reported: BTreeMap<u64, ChangeKind> = BTreeMap::new();
            let mut prev_end = 0u64;
            let mut prev: Option<Extent> = None;
            for e in &extents {
                prop_assert!(e.length > 0);
                prop_assert!(e.offset >= prev_end, "sorted and disjoint");
                if let Some(p) = prev {
                    prop_assert!(!(p.kind == e.kind && p.offset + p.length == e.offset), "maximal");
                }
                prop_assert_eq!(e.offset % (chunk * 512), 0);
                let mut off = e.offset;
                while off < e.offset + e.length {
                    reported.insert(off / (chunk * 512), e.kind);
                    off += chunk * 512;
                }
                prev_end = e.offset + e.length;
                prev = Some(*e);
            }
            prop_assert!(prev_end <= nr_sectors * 512);
            let expected: BTreeMap<u64, ChangeKind> = model
                .iter()
                .filter_map(|(c, k)| ChangeKind::resolve(k[0], k[1], k[2]).map(|kind| (*c, kind)))
                .collect();
            prop_assert_eq!(reported, expected);
        }

        #[test]
        fn union_is_or(
            a in proptest::collection::vec(request(), 0..10),
            b in proptest::collection::vec(request(), 0..10),
        ) {
            let geo = geometry(4096, 5);
            let mut left = DirtyBitmaps::new(geo);
            let mut right = DirtyBitmaps::new(geo);
            let mut both = DirtyBitmaps::new(geo);
            for r in &a { left.apply_request(r.start, r.len, r.kind); both.apply_request(r.start, r.len, r.kind); }
            for r in &b { right.apply_request(r.start, r.len, r.kind); both.apply_request(r.start, r.len, r.kind); }
            left.union(&right);
            prop_assert_eq!(left, both);
        }
    }
}
