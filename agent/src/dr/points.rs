//! Points in time on the receiver: the image holds the newest point, and *undo deltas* lead
//! back from it to older ones.
//!
//! # Undo deltas
//!
//! Before a committed cycle is applied to the image, the receiver copies the old content of
//! every chunk the cycle touches into `points/undo-FROM-TO`: applying that file to the image at
//! point `FROM` gives the image at point `TO`. Older points are reached by applying the deltas
//! from the newest one backwards, so a point costs what its cycle changed, not a copy of the
//! device, and the newest point is the image itself (no work to reach it).
//!
//! Dropping a point `B` between `A` (newer) and `C` (older) merges `undo-A-B` and `undo-B-C`
//! into `undo-A-C`: the chunks of the older delta win. The merged file is written and synced
//! before the two are deleted; a crash in between leaves both paths, and [`PointStore::compact`]
//! finishes the job. Deltas are written to a temporary file and renamed, so a delta file is
//! whole or absent.
//!
//! # Hashes
//!
//! Every delta record carries the BLAKE3 hash of the chunk it holds, and `hashes` holds the
//! hash of every chunk of the image (32 bytes per chunk; all zeros for an all-zero chunk, so
//! the file is sparse). `verify` and `restore` check every chunk they read against them.
//!
//! # Delta file format
//!
//! A 40-byte header (`BMUNDO01`, from, to, chunk bytes, device bytes, little-endian), then one
//! record per chunk: chunk index (u64), data length (u32), flags (u32, 1 = all zeros, no data),
//! hash (32 bytes), data. A trailer record with chunk index `u64::MAX` carries the record
//! count.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::{self, BufReader, BufWriter, Read as _, Write as _},
    path::{Path, PathBuf},
};

use crate::dr::storage::{Cursor, Disk, OpenMode, StoredFile};

const MAGIC: &[u8; 8] = b"BMUNDO01";
const HEADER_BYTES: u64 = 40;
/// Bytes of a delta record's head (what an all-zero chunk costs).
pub const RECORD_HEAD_BYTES: u64 = 48;
const FLAG_ZERO: u32 = 1;
const TRAILER: u64 = u64::MAX;
const HASH_BYTES: u64 = 32;
/// The most hash bytes written to `hashes` at once (a run of consecutive chunks).
const HASH_RUN_BYTES: usize = 1 << 20;

/// Errors of the points store.
#[derive(Debug, thiserror::Error)]
pub enum PointsError {
    /// File IO failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A delta file is malformed.
    #[error("{path}: corrupt delta: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// No chain of deltas leads to the point.
    #[error("point {0} cannot be reached: no delta chain leads to it")]
    Unreachable(u64),
    /// Chunks whose content does not match the stored hash.
    #[error("{count} corrupt chunk(s) in point {seq}, first at byte offset {first_offset}")]
    Mismatch {
        /// The point.
        seq: u64,
        /// How many chunks differ.
        count: u64,
        /// The first one.
        first_offset: u64,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PointsError {
    let path = path.to_owned();
    move |source| PointsError::Io { what, path, source }
}

/// A delta's endpoints: applying it to point `from` gives point `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Delta {
    /// The newer point.
    pub from: u64,
    /// The older point.
    pub to: u64,
}

/// Where a chunk's content for a point comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// Record in the `delta`-th file of the plan: data at `offset`, `len` bytes.
    Delta {
        delta: usize,
        offset: u64,
        len: u32,
        zero: bool,
        hash: [u8; 32],
    },
}

/// Where each chunk of one point is ([`PointStore::map_point`]).
pub struct PointMap {
    head: u64,
    target: u64,
    files: Vec<(Box<dyn StoredFile>, PathBuf)>,
    sources: BTreeMap<u64, Source>,
}

impl PointMap {
    /// The image's point this map reads through.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The point it reads.
    pub fn target(&self) -> u64 {
        self.target
    }

    /// The chunks whose content differs between the point and the image (each is held by a
    /// delta on the way back), as sorted half-open ranges of chunk indices.
    pub fn changed_chunks(&self) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for &chunk in self.sources.keys() {
            match ranges.last_mut() {
                Some(last) if last.1 == chunk => last.1 += 1,
                _ => ranges.push((chunk, chunk + 1)),
            }
        }
        ranges
    }
}

/// One chunk read through a [`PointMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MappedChunk {
    /// An all-zero chunk of `len` bytes (nothing was read).
    Zero {
        /// The chunk's length.
        len: usize,
    },
    /// `len` bytes were read; `intact` when they match the stored hash.
    Data {
        /// The chunk's length.
        len: usize,
        /// Whether the hash matched.
        intact: bool,
    },
}

/// One record's header.
struct RecordHead {
    chunk: u64,
    len: u32,
    flags: u32,
    hash: [u8; 32],
}

impl RecordHead {
    fn encode(&self) -> [u8; RECORD_HEAD_BYTES as usize] {
        let mut out = [0u8; RECORD_HEAD_BYTES as usize];
        out[..8].copy_from_slice(&self.chunk.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..16].copy_from_slice(&self.flags.to_le_bytes());
        out[16..].copy_from_slice(&self.hash);
        out
    }

    fn decode(bytes: &[u8; RECORD_HEAD_BYTES as usize]) -> Self {
        Self {
            chunk: u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")),
            flags: u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")),
            hash: bytes[16..].try_into().expect("32 bytes"),
        }
    }
}

/// A set of chunk indices kept as merged ranges: its memory grows with the number of separate
/// ranges inserted, not with the number of chunks they cover (one frame may name a whole
/// volume).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkRanges {
    /// First chunk of each range → the chunk after its last; ranges neither overlap nor touch.
    ranges: BTreeMap<u64, u64>,
}

impl ChunkRanges {
    /// Adds chunks `[first, end)`.
    pub fn insert(&mut self, first: u64, end: u64) {
        if first >= end {
            return;
        }
        let (mut first, mut end) = (first, end);
        // Merge with a range that starts before `first` and reaches it.
        if let Some((&start, &stop)) = self.ranges.range(..=first).next_back()
            && stop >= first
        {
            first = start;
            end = end.max(stop);
        }
        // Absorb every range that starts inside the new one.
        let inside: Vec<(u64, u64)> = self
            .ranges
            .range(first..=end)
            .map(|(&start, &stop)| (start, stop))
            .collect();
        for (start, stop) in inside {
            end = end.max(stop);
            self.ranges.remove(&start);
        }
        self.ranges.insert(first, end);
    }

    /// Adds every chunk of `other`.
    pub fn extend(&mut self, other: &ChunkRanges) {
        for (first, end) in other.ranges() {
            self.insert(first, end);
        }
    }

    /// Whether `chunk` is in the set.
    pub fn contains(&self, chunk: u64) -> bool {
        self.ranges
            .range(..=chunk)
            .next_back()
            .is_some_and(|(_, &stop)| chunk < stop)
    }

    /// The ranges, in order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&first, &end)| (first, end))
    }

    /// The chunks, in order.
    pub fn chunks(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges().flat_map(|(first, end)| first..end)
    }

    /// How many chunks.
    pub fn count(&self) -> u64 {
        self.ranges().map(|(first, end)| end - first).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The chunks of this set that are not in `other`.
    pub fn without(&self, other: &ChunkRanges) -> ChunkRanges {
        let mut out = ChunkRanges::default();
        for (first, end) in self.ranges() {
            let mut at = first;
            // Only the ranges of `other` that reach into [first, end): the one that starts
            // before it, and those that start inside it.
            let before = other
                .ranges
                .range(..first)
                .next_back()
                .map(|(&start, &stop)| (start, stop));
            let inside = other
                .ranges
                .range(first..end)
                .map(|(&start, &stop)| (start, stop));
            for (start, stop) in before.into_iter().chain(inside) {
                if stop <= at {
                    continue;
                }
                if start > at {
                    out.insert(at, start);
                }
                at = at.max(stop);
            }
            if at < end {
                out.insert(at, end);
            }
        }
        out
    }
}

/// The hash stored for a chunk: all zeros for an all-zero chunk (a sparse hole in `hashes`).
pub fn stored_hash(data: &[u8]) -> [u8; 32] {
    if data.iter().all(|&b| b == 0) {
        [0; 32]
    } else {
        *blake3::hash(data).as_bytes()
    }
}

/// The hashes of chunks computed from the data as it was written, so that a commit need not
/// read those chunks back from the image to hash them.
///
/// A chunk is known only while its last change was one write that covered it whole: a write
/// that covers part of it, a zero range over it, or a write that failed makes it unknown
/// again, and the commit reads it back as before. The agent sends each chunk of a sync step
/// once, so in practice every chunk is known; a hostile agent's overlapping frames only cost
/// reads. At most [`KnownHashes::MAX_CHUNKS`] are kept; chunks past that are read back.
#[derive(Debug, Default)]
pub struct KnownHashes {
    hashes: HashMap<u64, [u8; 32]>,
}

impl KnownHashes {
    /// The most chunks remembered (about 48 MiB of memory).
    pub const MAX_CHUNKS: usize = 1 << 20;

    /// `data` was written at `offset` of the image that `store` describes.
    pub fn written(&mut self, store: &PointStore, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        for chunk in store.chunks_of(offset, data.len() as u64) {
            let start = chunk * store.chunk_bytes;
            let stop = start + store.chunk_len(chunk);
            if start < offset || stop > end {
                self.hashes.remove(&chunk);
                continue;
            }
            let bytes = &data[(start - offset) as usize..(stop - offset) as usize];
            if self.hashes.len() < Self::MAX_CHUNKS || self.hashes.contains_key(&chunk) {
                self.hashes.insert(chunk, stored_hash(bytes));
            }
        }
    }

    /// Chunks `chunks` changed in a way whose result is not known here.
    pub fn forget(&mut self, chunks: std::ops::Range<u64>) {
        if chunks.end - chunks.start > self.hashes.len() as u64 {
            self.hashes.retain(|chunk, _| !chunks.contains(chunk));
        } else {
            for chunk in chunks {
                self.hashes.remove(&chunk);
            }
        }
    }

    /// The hash of `chunk`'s content, if known.
    pub fn get(&self, chunk: u64) -> Option<&[u8; 32]> {
        self.hashes.get(&chunk)
    }

    /// How many chunks are known (for tests: the commit asks per chunk).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether no chunk is known.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

/// The deltas and chunk hashes of one volume (`VOLUME_DIR/points/`, `VOLUME_DIR/hashes`).
pub struct PointStore {
    disk: Disk,
    dir: PathBuf,
    hashes_path: PathBuf,
    chunk_bytes: u64,
    size_bytes: u64,
}

impl PointStore {
    /// The store of the volume in `volume_dir`; creates the directory.
    pub fn open(
        disk: &Disk,
        volume_dir: &Path,
        chunk_bytes: u64,
        size_bytes: u64,
    ) -> Result<Self, PointsError> {
        let dir = volume_dir.join("points");
        if !disk.exists(&dir) {
            disk.create_dir_all(&dir)
                .and_then(|()| disk.sync_dir(volume_dir))
                .map_err(io_err("creating", &dir))?;
        }
        Ok(Self {
            disk: disk.clone(),
            dir,
            hashes_path: volume_dir.join("hashes"),
            chunk_bytes,
            size_bytes,
        })
    }

    /// The length of chunk `chunk` (the last one may be short).
    pub fn chunk_len(&self, chunk: u64) -> u64 {
        self.chunk_bytes
            .min(self.size_bytes.saturating_sub(chunk * self.chunk_bytes))
    }

    fn chunks(&self) -> u64 {
        self.size_bytes.div_ceil(self.chunk_bytes)
    }

    /// The chunks `[offset, offset + length)` touches.
    pub fn chunks_of(&self, offset: u64, length: u64) -> std::ops::Range<u64> {
        if length == 0 {
            return 0..0;
        }
        offset / self.chunk_bytes..(offset + length).div_ceil(self.chunk_bytes)
    }

    fn path(&self, delta: Delta) -> PathBuf {
        self.dir.join(format!("undo-{}-{}", delta.from, delta.to))
    }

    /// Whether the delta file exists (written whole: files appear by rename).
    pub fn has_delta(&self, delta: Delta) -> bool {
        self.disk.exists(&self.path(delta))
    }

    /// Makes `delta`'s file and its name durable (a file found present may not be yet).
    pub fn make_durable(&self, delta: Delta) -> Result<(), PointsError> {
        let path = self.path(delta);
        self.disk
            .open(&path, OpenMode::Read)
            .and_then(|file| file.sync_all())
            .and_then(|()| self.disk.sync_dir(&self.dir))
            .map_err(io_err("syncing", &path))
    }

    /// The delta files present, sorted.
    pub fn deltas(&self) -> Result<Vec<Delta>, PointsError> {
        let mut out = Vec::new();
        for name in self
            .disk
            .list(&self.dir)
            .map_err(io_err("listing", &self.dir))?
        {
            let Some(rest) = name.strip_prefix("undo-") else {
                continue;
            };
            if let Some((from, to)) = rest.split_once('-')
                && let (Ok(from), Ok(to)) = (from.parse(), to.parse())
            {
                out.push(Delta { from, to });
            }
        }
        out.sort();
        Ok(out)
    }

    /// The size in bytes of every delta file present.
    pub fn delta_sizes(&self) -> Result<Vec<(Delta, u64)>, PointsError> {
        self.deltas()?
            .into_iter()
            .map(|delta| {
                let path = self.path(delta);
                let len = self
                    .disk
                    .file_len(&path)
                    .map_err(io_err("reading", &path))?;
                Ok((delta, len))
            })
            .collect()
    }

    /// Writes `undo-FROM-TO` holding the current content of `chunks` of `image` (which must be
    /// at point `to`), unless it exists already (a replayed commit). Synced before it appears.
    pub fn capture(
        &self,
        image: &dyn StoredFile,
        delta: Delta,
        chunks: &ChunkRanges,
    ) -> Result<(), PointsError> {
        if self.disk.exists(&self.path(delta)) {
            return Ok(());
        }
        self.start_capture(delta)?.finish(self, image, chunks)
    }

    /// Starts writing `delta` while its cycle's frames arrive (the image is still at point
    /// `delta.to` until the commit): the chunks a frame rewrites are captured as it is
    /// journaled, and the commit only adds the rest and makes the file durable. Until then the
    /// file has its temporary name and is no delta; [`PointStore::remove_leftovers`] deletes
    /// it after a crash.
    pub fn start_capture(&self, delta: Delta) -> Result<PendingDelta, PointsError> {
        Ok(PendingDelta {
            writer: DeltaWriter::create(self, delta)?,
            delta,
            captured: ChunkRanges::default(),
            unhinted: 0,
            buffer: vec![0u8; self.chunk_bytes as usize],
        })
    }

    /// Deletes the temporary files of deltas that were being written when the process died (a
    /// capture in the middle of a cycle or a merge): no delta is named by them.
    pub fn remove_leftovers(&self) -> Result<(), PointsError> {
        for name in self
            .disk
            .list(&self.dir)
            .map_err(io_err("listing", &self.dir))?
        {
            if name.starts_with("tmp-") {
                let path = self.dir.join(&name);
                self.disk
                    .remove_file(&path)
                    .map_err(io_err("removing", &path))?;
            }
        }
        Ok(())
    }

    /// Deletes every delta (the chain was broken: the image was overwritten outside a cycle).
    pub fn clear(&self) -> Result<(), PointsError> {
        for delta in self.deltas()? {
            let path = self.path(delta);
            self.disk
                .remove_file(&path)
                .map_err(io_err("removing", &path))?;
        }
        Ok(())
    }

    /// Makes the delta files match `kept` (the retained points) with the image at `head`:
    /// deltas ending at a point no longer kept are merged with the next older delta (or
    /// removed, at the old end), and deltas starting at an unreachable point are removed.
    /// Idempotent; finishes a merge a crash interrupted.
    pub fn compact(&self, head: u64, kept: &BTreeSet<u64>) -> Result<(), PointsError> {
        loop {
            let deltas = self.deltas()?;
            // Points reachable from the image through the deltas present.
            let mut reachable = BTreeSet::from([head]);
            let mut grew = true;
            while grew {
                grew = false;
                for delta in &deltas {
                    if reachable.contains(&delta.from) && reachable.insert(delta.to) {
                        grew = true;
                    }
                }
            }
            if let Some(&orphan) = deltas.iter().find(|d| !reachable.contains(&d.from)) {
                let path = self.path(orphan);
                self.disk
                    .remove_file(&path)
                    .map_err(io_err("removing", &path))?;
                continue;
            }
            let Some(&dangling) = deltas.iter().find(|d| !kept.contains(&d.to)) else {
                return Ok(());
            };
            let older = deltas.iter().copied().find(|d| d.from == dangling.to);
            if let Some(older) = older {
                let merged = Delta {
                    from: dangling.from,
                    to: older.to,
                };
                if !self.has_delta(merged) {
                    self.merge(dangling, older, merged)?;
                }
                for delta in [dangling, older] {
                    let path = self.path(delta);
                    self.disk
                        .remove_file(&path)
                        .map_err(io_err("removing", &path))?;
                }
            } else {
                let path = self.path(dangling);
                self.disk
                    .remove_file(&path)
                    .map_err(io_err("removing", &path))?;
            }
        }
    }

    /// Writes `merged` = `newer` then `older` applied: the older delta's chunks win.
    fn merge(&self, newer: Delta, older: Delta, merged: Delta) -> Result<(), PointsError> {
        let newer_index = self.index(newer)?;
        let older_index = self.index(older)?;
        let mut writer = DeltaWriter::create(self, merged)?;
        let open = |delta: Delta| {
            let path = self.path(delta);
            self.disk
                .open(&path, OpenMode::Read)
                .map(|file| (file, path.clone()))
                .map_err(io_err("opening", &path))
        };
        let files = [open(newer)?, open(older)?];
        // Chunk → (file, record); the older delta's records overwrite the newer one's.
        let mut all: BTreeMap<u64, (usize, &IndexEntry)> = BTreeMap::new();
        for (file, index) in [&newer_index, &older_index].into_iter().enumerate() {
            for (chunk, entry) in index {
                all.insert(*chunk, (file, entry));
            }
        }
        let mut buffer = vec![0u8; self.chunk_bytes as usize];
        for (chunk, (file, entry)) in all {
            let (file, path) = &files[file];
            let data = read_checked(&**file, path, entry, &mut buffer)?;
            writer.push(chunk, data)?;
        }
        writer.finish()
    }

    /// Reads a delta's record index (chunk → where its data is).
    fn index(&self, delta: Delta) -> Result<BTreeMap<u64, IndexEntry>, PointsError> {
        let path = self.path(delta);
        let corrupt = |message: String| PointsError::Corrupt {
            path: path.clone(),
            message,
        };
        let file = self
            .disk
            .open(&path, OpenMode::Read)
            .map_err(io_err("opening", &path))?;
        let file_len = file.size().map_err(io_err("reading", &path))?;
        let mut reader = BufReader::with_capacity(1 << 20, Cursor::new(file));
        let mut header = [0u8; HEADER_BYTES as usize];
        reader
            .read_exact(&mut header)
            .map_err(|e| corrupt(format!("header: {e}")))?;
        let field =
            |i: usize| u64::from_le_bytes(header[8 + 8 * i..16 + 8 * i].try_into().expect("8"));
        if &header[..8] != MAGIC
            || field(0) != delta.from
            || field(1) != delta.to
            || field(2) != self.chunk_bytes
            || field(3) != self.size_bytes
        {
            return Err(corrupt(
                "header does not match its name or the volume".into(),
            ));
        }
        let mut index = BTreeMap::new();
        let mut at = HEADER_BYTES;
        loop {
            let mut head = [0u8; RECORD_HEAD_BYTES as usize];
            reader
                .read_exact(&mut head)
                .map_err(|_| corrupt(format!("truncated at byte {at} (no trailer)")))?;
            let head = RecordHead::decode(&head);
            at += RECORD_HEAD_BYTES;
            if head.chunk == TRAILER {
                if u64::from(head.len) != index.len() as u64 && index.len() < u32::MAX as usize {
                    return Err(corrupt(format!(
                        "trailer counts {} records, found {}",
                        head.len,
                        index.len()
                    )));
                }
                return Ok(index);
            }
            if head.chunk >= self.chunks() || u64::from(head.len) != self.chunk_len(head.chunk) {
                return Err(corrupt(format!("record at byte {at}: bad chunk or length")));
            }
            let zero = head.flags & FLAG_ZERO != 0;
            let stored = if zero { 0 } else { u64::from(head.len) };
            if at + stored > file_len {
                return Err(corrupt(format!("record at byte {at} runs past the end")));
            }
            index.insert(
                head.chunk,
                IndexEntry {
                    offset: at,
                    len: head.len,
                    zero,
                    hash: head.hash,
                },
            );
            reader
                .seek_relative(stored as i64)
                .map_err(io_err("reading", &path))?;
            at += stored;
        }
    }

    /// The deltas to apply, newest first, to go from the image at `head` to point `target`.
    pub fn plan(&self, head: u64, target: u64) -> Result<Vec<Delta>, PointsError> {
        let deltas = self.deltas()?;
        let mut plan = Vec::new();
        let mut at = head;
        while at != target {
            // The delta from here that goes furthest back without passing the target.
            let next = deltas
                .iter()
                .filter(|d| d.from == at && d.to >= target && d.to < at)
                .min_by_key(|d| d.to)
                .ok_or(PointsError::Unreachable(target))?;
            plan.push(*next);
            at = next.to;
        }
        Ok(plan)
    }

    /// Where every chunk of point `target` is, with the image at point `head`: the deltas of
    /// [`Self::plan`], opened (an open file stays readable after a later merge deletes it), and
    /// for each chunk they hold, the record of the oldest one. Chunks in none of them are read
    /// from the image.
    pub fn map_point(&self, head: u64, target: u64) -> Result<PointMap, PointsError> {
        let plan = self.plan(head, target)?;
        let mut map = PointMap {
            head,
            target,
            files: Vec::new(),
            sources: BTreeMap::new(),
        };
        for delta in plan {
            self.add_to_map(&mut map, delta, true)?;
        }
        Ok(map)
    }

    /// Adds `delta` to `map`. Its records win over the map's when `older` (a delta further back
    /// in the plan); otherwise they fill only chunks the map reads from the image, which is
    /// how a delta captured for a newer head (one the map's image is about to leave) joins it.
    fn add_to_map(&self, map: &mut PointMap, delta: Delta, older: bool) -> Result<(), PointsError> {
        let path = self.path(delta);
        let file = self
            .disk
            .open(&path, OpenMode::Read)
            .map_err(io_err("opening", &path))?;
        let index = self.index(delta)?;
        let delta_index = map.files.len();
        map.files.push((file, path));
        for (chunk, entry) in index {
            let source = Source::Delta {
                delta: delta_index,
                offset: entry.offset,
                len: entry.len,
                zero: entry.zero,
                hash: entry.hash,
            };
            if older {
                map.sources.insert(chunk, source);
            } else {
                map.sources.entry(chunk).or_insert(source);
            }
        }
        Ok(())
    }

    /// Moves `map` to a new head `head`, one newer than its own, whose delta back to the map's
    /// head is `delta` (`undo-HEAD-OLD`, captured before the image left the old head): the
    /// chunks that cycle changes are then read from the delta, not the image.
    pub fn advance_map(&self, map: &mut PointMap, delta: Delta) -> Result<(), PointsError> {
        if delta.to != map.head || delta.from <= map.head {
            return Err(PointsError::Unreachable(map.target));
        }
        self.add_to_map(map, delta, false)?;
        map.head = delta.from;
        Ok(())
    }

    /// Opens the chunk hashes of the image.
    pub fn open_hashes(&self) -> Result<Box<dyn StoredFile>, PointsError> {
        self.disk
            .open(&self.hashes_path, OpenMode::Read)
            .map_err(io_err("opening", &self.hashes_path))
    }

    /// Reads chunk `chunk` of the mapped point into `buffer` (at least a chunk long) and checks
    /// it against its stored hash. An all-zero record is not read.
    pub fn read_mapped_chunk(
        &self,
        map: &PointMap,
        image: &dyn StoredFile,
        hashes: &dyn StoredFile,
        chunk: u64,
        buffer: &mut [u8],
    ) -> Result<MappedChunk, PointsError> {
        let (len, expected) = match map.sources.get(&chunk) {
            Some(Source::Delta { zero: true, .. }) => {
                return Ok(MappedChunk::Zero {
                    len: self.chunk_len(chunk) as usize,
                });
            }
            Some(&Source::Delta {
                delta,
                offset: at,
                len,
                hash,
                ..
            }) => {
                let (file, path) = &map.files[delta];
                file.read_exact_at(&mut buffer[..len as usize], at)
                    .map_err(io_err("reading", path))?;
                (len as usize, hash)
            }
            None => {
                let len = self.chunk_len(chunk) as usize;
                image
                    .read_exact_at(&mut buffer[..len], chunk * self.chunk_bytes)
                    .map_err(io_err("reading the image for point", &self.hashes_path))?;
                let mut expected = [0u8; 32];
                read_full_at(hashes, &mut expected, chunk * HASH_BYTES)
                    .map_err(io_err("reading", &self.hashes_path))?;
                (len, expected)
            }
        };
        Ok(MappedChunk::Data {
            len,
            intact: stored_hash(&buffer[..len]) == expected,
        })
    }

    /// Reads point `target` chunk by chunk, checking every chunk against its stored hash, and
    /// hands each one to `sink` in device order (`None` for an all-zero chunk). Stops at the
    /// first mismatch unless `keep_going`; returns the mismatching chunk offsets.
    pub fn read_point(
        &self,
        image: &dyn StoredFile,
        head: u64,
        target: u64,
        keep_going: bool,
        mut sink: impl FnMut(u64, Option<&[u8]>) -> Result<(), PointsError>,
    ) -> Result<Vec<u64>, PointsError> {
        let map = self.map_point(head, target)?;
        let hashes = self.open_hashes()?;
        let mut buffer = vec![0u8; self.chunk_bytes as usize];
        let mut bad = Vec::new();
        for chunk in 0..self.chunks() {
            let offset = chunk * self.chunk_bytes;
            let len = match self.read_mapped_chunk(&map, image, &*hashes, chunk, &mut buffer)? {
                MappedChunk::Zero { .. } => {
                    sink(offset, None)?;
                    continue;
                }
                MappedChunk::Data { len, intact } => {
                    if !intact {
                        bad.push(offset);
                        if !keep_going {
                            return Ok(bad);
                        }
                    }
                    len
                }
            };
            let data = &buffer[..len];
            if data.iter().all(|&b| b == 0) {
                sink(offset, None)?;
            } else {
                sink(offset, Some(data))?;
            }
        }
        Ok(bad)
    }

    /// Records the hashes of `chunks` of `image` in `hashes` and syncs it. The chunks in
    /// `zeroed` (all zeros after a zero range) get the all-zero hash first, by punching the
    /// hashes file: no read of the image, and work proportional to the ranges, not the chunks.
    pub fn update_hashes(
        &self,
        image: &dyn StoredFile,
        zeroed: &ChunkRanges,
        chunks: impl IntoIterator<Item = u64>,
    ) -> Result<(), PointsError> {
        self.update_hashes_known(image, zeroed, chunks, &KnownHashes::default())
    }

    /// [`update_hashes`](Self::update_hashes), reading back only the chunks whose hash `known`
    /// does not hold. The hashes of consecutive chunks are written together.
    pub fn update_hashes_known(
        &self,
        image: &dyn StoredFile,
        zeroed: &ChunkRanges,
        chunks: impl IntoIterator<Item = u64>,
        known: &KnownHashes,
    ) -> Result<(), PointsError> {
        let path = &self.hashes_path;
        let file = self
            .disk
            .open(path, OpenMode::ReadWriteCreate)
            .map_err(io_err("opening", path))?;
        file.set_len(self.chunks() * HASH_BYTES)
            .map_err(io_err("sizing", path))?;
        for (first, end) in zeroed.ranges() {
            file.zero_range(first * HASH_BYTES, (end - first) * HASH_BYTES)
                .map_err(io_err("zeroing a range of", path))?;
        }
        let mut buffer = Vec::new();
        // A run of consecutive chunks' hashes: its first chunk, and the hashes.
        let mut run: (u64, Vec<u8>) = (0, Vec::new());
        let flush = |run: &mut (u64, Vec<u8>)| {
            let result = file.write_all_at(&run.1, run.0 * HASH_BYTES);
            run.1.clear();
            result.map_err(io_err("writing", path))
        };
        for chunk in chunks {
            let hash = match known.get(chunk) {
                Some(hash) => *hash,
                None => {
                    let len = self.chunk_len(chunk) as usize;
                    buffer.resize(len, 0);
                    image
                        .read_exact_at(&mut buffer, chunk * self.chunk_bytes)
                        .map_err(io_err("reading the image for", path))?;
                    stored_hash(&buffer)
                }
            };
            let next = run.0 + (run.1.len() as u64) / HASH_BYTES;
            if !run.1.is_empty() && (chunk != next || run.1.len() >= HASH_RUN_BYTES) {
                flush(&mut run)?;
            }
            if run.1.is_empty() {
                run.0 = chunk;
            }
            run.1.extend_from_slice(&hash);
        }
        if !run.1.is_empty() {
            flush(&mut run)?;
        }
        file.sync_all().map_err(io_err("syncing", path))
    }

    /// Whether the `hashes` file exists (volumes made before it need a full rehash).
    pub fn has_hashes(&self) -> bool {
        self.disk.exists(&self.hashes_path)
    }

    /// Rehashes every chunk of the image.
    pub fn rehash_all(&self, image: &dyn StoredFile) -> Result<(), PointsError> {
        self.update_hashes(image, &ChunkRanges::default(), 0..self.chunks())
    }
}

/// Where one chunk's record is in a delta file.
#[derive(Clone, Copy, Debug)]
struct IndexEntry {
    offset: u64,
    len: u32,
    zero: bool,
    hash: [u8; 32],
}

fn read_full_at(file: &dyn StoredFile, buf: &mut [u8], offset: u64) -> io::Result<()> {
    match file.read_exact_at(buf, offset) {
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
            buf.fill(0);
            Ok(())
        }
        other => other,
    }
}

fn read_checked<'b>(
    file: &dyn StoredFile,
    path: &Path,
    entry: &IndexEntry,
    buffer: &'b mut [u8],
) -> Result<&'b [u8], PointsError> {
    let data = &mut buffer[..entry.len as usize];
    if entry.zero {
        data.fill(0);
        return Ok(data);
    }
    file.read_exact_at(data, entry.offset)
        .map_err(io_err("reading", path))?;
    if stored_hash(data) != entry.hash {
        return Err(PointsError::Corrupt {
            path: path.to_owned(),
            message: format!("record at byte {} does not match its hash", entry.offset),
        });
    }
    Ok(data)
}

/// An undo delta written while its cycle is open (see [`PointStore::start_capture`]).
pub struct PendingDelta {
    writer: DeltaWriter,
    delta: Delta,
    /// The chunks written to it so far: each chunk is captured once.
    captured: ChunkRanges,
    /// Bytes captured since the last write-back hint.
    unhinted: u64,
    /// One chunk's room, for the reads of the image (one per frame otherwise).
    buffer: Vec<u8>,
}

/// How often a delta captured during a cycle asks the kernel to start writing it back, so that
/// the commit's sync has little left to wait for.
const DELTA_WRITEBACK_EVERY: u64 = 32 << 20;

impl PendingDelta {
    /// The delta this becomes.
    pub fn delta(&self) -> Delta {
        self.delta
    }

    /// The chunks it holds so far.
    pub fn captured(&self) -> &ChunkRanges {
        &self.captured
    }

    /// Captures the content `image` holds now of the chunks in `chunks` not captured yet.
    pub fn capture(
        &mut self,
        store: &PointStore,
        image: &dyn StoredFile,
        chunks: std::ops::Range<u64>,
    ) -> Result<(), PointsError> {
        let mut wanted = ChunkRanges::default();
        wanted.insert(chunks.start, chunks.end);
        let missing = wanted.without(&self.captured);
        if missing.is_empty() {
            return Ok(());
        }
        for chunk in missing.chunks() {
            let len = store.chunk_len(chunk) as usize;
            let buffer = &mut self.buffer[..len];
            image
                .read_exact_at(buffer, chunk * store.chunk_bytes)
                .map_err(io_err("reading the image for", &self.writer.tmp))?;
            self.writer.push(chunk, buffer)?;
            self.unhinted += len as u64;
        }
        self.captured.extend(&missing);
        if self.unhinted >= DELTA_WRITEBACK_EVERY {
            self.unhinted = 0;
            // Only a hint: a write that failed is reported by the commit's sync.
            let _ = self.writer.writer.get_ref().file().start_writeback();
        }
        Ok(())
    }

    /// Drops the delta unfinished (its cycle was aborted, or the commit keeps no history):
    /// what it buffers is not written, and its temporary file is removed.
    pub fn discard(self) {
        let DeltaWriter {
            tmp, writer, disk, ..
        } = self.writer;
        drop(writer.into_parts());
        if let Err(error) = disk.remove_file(&tmp)
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(
                target: "blkmirror receiver",
                "{} not removed ({error}); it is removed when the volume is opened next",
                tmp.display()
            );
        }
    }

    /// Drops the delta as a killed process would: nothing buffered is written and the file
    /// stays.
    #[cfg(test)]
    pub(crate) fn die(self) {
        drop(self.writer.writer.into_parts());
    }

    /// Captures the chunks of `set` not captured yet, and makes the delta durable under its
    /// name. Chunks captured that `set` does not hold stay in it: their old content is what
    /// the image held at `delta.to`, which is all a delta promises.
    pub fn finish(
        mut self,
        store: &PointStore,
        image: &dyn StoredFile,
        set: &ChunkRanges,
    ) -> Result<(), PointsError> {
        for (first, end) in set.without(&self.captured).ranges() {
            self.capture(store, image, first..end)?;
        }
        self.writer.finish()
    }
}

/// Writes a delta file: temporary name, records, trailer, sync, rename, directory sync.
struct DeltaWriter {
    tmp: PathBuf,
    path: PathBuf,
    writer: BufWriter<Cursor>,
    records: u64,
    disk: Disk,
}

impl DeltaWriter {
    fn create(store: &PointStore, delta: Delta) -> Result<Self, PointsError> {
        let path = store.path(delta);
        let tmp = store.dir.join(format!("tmp-{}-{}", delta.from, delta.to));
        let file = store
            .disk
            .open(&tmp, OpenMode::Truncate)
            .map_err(io_err("creating", &tmp))?;
        let mut writer = BufWriter::with_capacity(1 << 20, Cursor::new(file));
        let mut header = [0u8; HEADER_BYTES as usize];
        header[..8].copy_from_slice(MAGIC);
        for (i, value) in [delta.from, delta.to, store.chunk_bytes, store.size_bytes]
            .into_iter()
            .enumerate()
        {
            header[8 + 8 * i..16 + 8 * i].copy_from_slice(&value.to_le_bytes());
        }
        writer.write_all(&header).map_err(io_err("writing", &tmp))?;
        Ok(Self {
            tmp,
            path,
            writer,
            records: 0,
            disk: store.disk.clone(),
        })
    }

    fn push(&mut self, chunk: u64, data: &[u8]) -> Result<(), PointsError> {
        let hash = stored_hash(data);
        let zero = hash == [0; 32];
        let head = RecordHead {
            chunk,
            len: data.len() as u32,
            flags: if zero { FLAG_ZERO } else { 0 },
            hash,
        };
        self.writer
            .write_all(&head.encode())
            .map_err(io_err("writing", &self.tmp))?;
        if !zero {
            self.writer
                .write_all(data)
                .map_err(io_err("writing", &self.tmp))?;
        }
        self.records += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<(), PointsError> {
        let trailer = RecordHead {
            chunk: TRAILER,
            len: self.records.min(u64::from(u32::MAX)) as u32,
            flags: 0,
            hash: [0; 32],
        };
        self.writer
            .write_all(&trailer.encode())
            .map_err(io_err("writing", &self.tmp))?;
        let file = self
            .writer
            .into_inner()
            .map_err(|e| io_err("writing", &self.tmp)(e.into_error()))?;
        file.file()
            .sync_all()
            .map_err(io_err("syncing", &self.tmp))?;
        drop(file);
        self.disk
            .rename(&self.tmp, &self.path)
            .map_err(io_err("renaming", &self.tmp))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        self.disk.sync_dir(dir).map_err(io_err("syncing", dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dr::storage::LocalDisk, testing::TempDir};
    use std::fs::{self, File};

    const CHUNK: u64 = 4096;
    const SIZE: u64 = 16 * CHUNK + 1024;

    /// Simulates the receiver: applies writes to an image, capturing deltas and hashes, and
    /// keeps a copy of every point to compare with.
    struct Sim {
        _dir: TempDir,
        store: PointStore,
        image: File,
        head: u64,
        copies: BTreeMap<u64, Vec<u8>>,
    }

    impl Sim {
        fn new(tag: &str) -> Self {
            let dir = TempDir::new(&format!("points-{tag}"));
            let image = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.0.join("image.raw"))
                .unwrap();
            image.set_len(SIZE).unwrap();
            let store = PointStore::open(&LocalDisk::shared(), &dir.0, CHUNK, SIZE).unwrap();
            store.rehash_all(&image).unwrap();
            let mut sim = Self {
                _dir: dir,
                store,
                image,
                head: 1,
                copies: BTreeMap::new(),
            };
            sim.copies.insert(1, sim.contents());
            sim
        }

        fn contents(&self) -> Vec<u8> {
            let mut out = vec![0u8; SIZE as usize];
            self.image.read_exact_at(&mut out, 0).unwrap();
            out
        }

        fn cycle(&mut self, writes: &[(u64, u64, u8)]) {
            let seq = self.head + 1;
            let mut set = ChunkRanges::default();
            for &(offset, len, _) in writes {
                let range = self.store.chunks_of(offset, len);
                set.insert(range.start, range.end);
            }
            self.store
                .capture(
                    &self.image,
                    Delta {
                        from: seq,
                        to: self.head,
                    },
                    &set,
                )
                .unwrap();
            for &(offset, len, byte) in writes {
                self.image
                    .write_all_at(&vec![byte; len as usize], offset)
                    .unwrap();
            }
            self.store
                .update_hashes(&self.image, &ChunkRanges::default(), set.chunks())
                .unwrap();
            self.head = seq;
            self.copies.insert(seq, self.contents());
        }

        fn restore(&self, target: u64) -> Vec<u8> {
            let mut out = vec![0u8; SIZE as usize];
            let bad = self
                .store
                .read_point(&self.image, self.head, target, false, |offset, data| {
                    if let Some(data) = data {
                        out[offset as usize..offset as usize + data.len()].copy_from_slice(data);
                    }
                    Ok(())
                })
                .unwrap();
            assert!(bad.is_empty(), "corrupt chunks {bad:?}");
            out
        }
    }

    proptest::proptest! {
        #[test]
        fn chunk_ranges_hold_exactly_the_chunks_inserted(
            inserts in proptest::collection::vec((0u64..200, 0u64..40), 0..30),
            removed in proptest::collection::vec((0u64..200, 0u64..40), 0..10),
        ) {
            let (mut set, mut model) = (ChunkRanges::default(), BTreeSet::new());
            for &(first, len) in &inserts {
                set.insert(first, first + len);
                model.extend(first..first + len);
            }
            proptest::prop_assert_eq!(set.chunks().collect::<BTreeSet<_>>(), model.clone());
            proptest::prop_assert_eq!(set.count(), model.len() as u64);
            for chunk in 0..260 {
                proptest::prop_assert_eq!(set.contains(chunk), model.contains(&chunk));
            }
            // Ranges are disjoint and do not touch.
            let ranges: Vec<_> = set.ranges().collect();
            for pair in ranges.windows(2) {
                proptest::prop_assert!(pair[0].1 < pair[1].0);
            }
            let (mut other, mut other_model) = (ChunkRanges::default(), BTreeSet::new());
            for &(first, len) in &removed {
                other.insert(first, first + len);
                other_model.extend(first..first + len);
            }
            let left: BTreeSet<u64> = model.difference(&other_model).copied().collect();
            proptest::prop_assert_eq!(set.without(&other).chunks().collect::<BTreeSet<_>>(), left);
        }
    }

    #[test]
    fn a_chunk_range_over_a_huge_volume_costs_one_entry() {
        let mut set = ChunkRanges::default();
        set.insert(0, 1 << 40);
        set.insert(5, 7);
        assert_eq!(set.ranges().count(), 1);
        assert_eq!(set.count(), 1 << 40);
    }

    #[test]
    fn every_point_restores_exactly_and_merging_keeps_the_rest_exact() {
        let mut sim = Sim::new("restore");
        sim.cycle(&[(0, 8192, 1), (SIZE - 1024, 1024, 2)]);
        sim.cycle(&[(4096, 512, 3), (40960, 4096, 4)]);
        sim.cycle(&[(0, 4096, 0), (12288, 20000, 5)]);
        sim.cycle(&[(4096, 4096, 6)]);
        for seq in 1..=5 {
            assert_eq!(sim.restore(seq), sim.copies[&seq], "point {seq}");
        }
        // Drop points 2 and 4: their deltas merge, the others stay exact.
        let kept = BTreeSet::from([1, 3, 5]);
        sim.store.compact(sim.head, &kept).unwrap();
        assert_eq!(
            sim.store.deltas().unwrap(),
            vec![Delta { from: 3, to: 1 }, Delta { from: 5, to: 3 }]
        );
        for seq in [1, 3, 5] {
            assert_eq!(
                sim.restore(seq),
                sim.copies[&seq],
                "point {seq} after merge"
            );
        }
        assert!(matches!(
            sim.store.plan(sim.head, 2),
            Err(PointsError::Unreachable(2))
        ));
        // Dropping the oldest removes its delta only.
        sim.store
            .compact(sim.head, &BTreeSet::from([3, 5]))
            .unwrap();
        assert_eq!(sim.store.deltas().unwrap(), vec![Delta { from: 5, to: 3 }]);
        assert_eq!(sim.restore(3), sim.copies[&3]);
    }

    #[test]
    fn an_interrupted_merge_is_finished_by_compact() {
        let mut sim = Sim::new("crash");
        sim.cycle(&[(0, 4096, 1)]);
        sim.cycle(&[(0, 4096, 2), (8192, 4096, 2)]);
        // Merge written, originals not yet removed (a crash between the two steps).
        sim.store
            .merge(
                Delta { from: 3, to: 2 },
                Delta { from: 2, to: 1 },
                Delta { from: 3, to: 1 },
            )
            .unwrap();
        assert_eq!(sim.restore(1), sim.copies[&1]);
        sim.store
            .compact(sim.head, &BTreeSet::from([1, 3]))
            .unwrap();
        assert_eq!(sim.store.deltas().unwrap(), vec![Delta { from: 3, to: 1 }]);
        assert_eq!(sim.restore(1), sim.copies[&1]);
        // A leftover temporary file is not a delta.
        fs::write(sim.store.dir.join("tmp-9-8"), b"torn").unwrap();
        assert_eq!(sim.store.deltas().unwrap().len(), 1);
    }

    #[test]
    fn corruption_is_reported_not_restored() {
        let mut sim = Sim::new("corrupt");
        sim.cycle(&[(0, 4096, 7)]);
        sim.cycle(&[(0, 4096, 8)]);
        // Flip a byte of the delta's data and of the image.
        let path = sim.store.path(Delta { from: 3, to: 2 });
        let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff], HEADER_BYTES + RECORD_HEAD_BYTES + 10)
            .unwrap();
        let bad = sim
            .store
            .read_point(&sim.image, 3, 2, true, |_, _| Ok(()))
            .unwrap();
        assert_eq!(bad, vec![0]);
        sim.image.write_all_at(&[0xee], 5 * CHUNK).unwrap();
        let bad = sim
            .store
            .read_point(&sim.image, 3, 3, true, |_, _| Ok(()))
            .unwrap();
        assert_eq!(bad, vec![5 * CHUNK]);
        // A truncated delta is refused with a message.
        let len = fs::metadata(&path).unwrap().len();
        file.set_len(len - 10).unwrap();
        let error = sim
            .store
            .read_point(&sim.image, 3, 2, true, |_, _| Ok(()))
            .unwrap_err();
        assert!(error.to_string().contains("truncated"), "{error}");
    }

    /// The hashes a commit writes from what it saw written are the hashes it would read back:
    /// under overlapping writes, partial writes, zero ranges and the short last chunk.
    #[test]
    fn known_hashes_give_the_hashes_a_read_back_gives() {
        for seed in 1..=40u64 {
            let sim = Sim::new("known");
            let mut known = KnownHashes::default();
            let mut touched = ChunkRanges::default();
            let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut next = |bound: u64| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % bound
            };
            for _ in 0..12 {
                // Sector-aligned ranges, chunk-aligned half of the time.
                let sectors = SIZE / 512;
                let first = next(sectors);
                let first = if next(2) == 0 {
                    first / (CHUNK / 512) * (CHUNK / 512)
                } else {
                    first
                };
                let len = (1 + next(3 * CHUNK / 512)).min(sectors - first) * 512;
                let offset = first * 512;
                let chunks = sim.store.chunks_of(offset, len);
                touched.insert(chunks.start, chunks.end);
                if next(4) == 0 {
                    sim.image.zero_range(offset, len).unwrap();
                    known.forget(chunks);
                } else {
                    // Zeros now and then: a zero chunk's stored hash is the zero hash.
                    let byte = next(3) as u8;
                    let data = vec![byte; len as usize];
                    sim.image.write_all_at(&data, offset).unwrap();
                    known.written(&sim.store, offset, &data);
                }
            }
            let read_back = |known: &KnownHashes| {
                sim.store
                    .update_hashes_known(
                        &sim.image,
                        &ChunkRanges::default(),
                        touched.chunks(),
                        known,
                    )
                    .unwrap();
                fs::read(&sim.store.hashes_path).unwrap()
            };
            let expected = read_back(&KnownHashes::default());
            assert_eq!(read_back(&known), expected, "seed {seed}");
            assert!(known.len() as u64 <= touched.count(), "seed {seed}");
        }
    }

    /// A chunk is known only from a write that covers it whole, until something else touches it.
    #[test]
    fn a_chunk_is_known_only_after_a_whole_write() {
        let sim = Sim::new("known-rules");
        let mut known = KnownHashes::default();
        // Chunks 1 and 2 whole, chunk 3 in part.
        known.written(&sim.store, CHUNK, &vec![7u8; (2 * CHUNK + 512) as usize]);
        assert!(known.get(0).is_none());
        assert_eq!(known.get(1), Some(&stored_hash(&[7u8; CHUNK as usize])));
        assert!(known.get(2).is_some());
        assert!(known.get(3).is_none());
        // A partial write after a whole one makes the chunk unknown.
        known.written(&sim.store, 2 * CHUNK + 512, &[1u8; 512]);
        assert!(known.get(2).is_none());
        assert!(known.get(1).is_some());
        // A zero range does too, even one wider than what is known.
        known.forget(0..SIZE.div_ceil(CHUNK));
        assert!(known.is_empty());
        // The last chunk is short (1 KiB): a write to the end of the volume covers it whole.
        let last = SIZE / CHUNK;
        known.written(&sim.store, last * CHUNK, &[5u8; 1024]);
        assert_eq!(known.get(last), Some(&stored_hash(&[5u8; 1024])));
    }
}
