//! The receiver's storage of one volume: a sparse raw image, its metadata, and a write-ahead
//! journal that makes every cycle atomic.
//!
//! # Files (in `DATA_DIR/VOLUME/`)
//!
//! * `image.raw`: the replica, a sparse file of exactly the device's size. It can be
//!   loop-mounted (read-only, on a copy, or while the receiver is stopped) or converted with
//!   `qemu-img`.
//! * `volume.json`: identity of the source, the last committed cycle and recent points. Written
//!   to a temporary file, synced, and renamed over the old one.
//! * `journal`: the open cycle. Records are `[u32 length][8-byte BLAKE3 prefix][postcard]`.
//!
//! # Why a SIGKILL at any instant leaves the image at a committed point
//!
//! 1. Data frames of a cycle go only to the journal; the image is untouched.
//! 2. `commit` appends a commit record and syncs the journal. Before that sync completes, a
//!    restart finds no valid commit record and discards the journal: the image is still the
//!    previous point.
//! 3. After the sync, the cycle is decided. Applying it writes the journal's ranges into the
//!    image in journal order, syncs the image, then writes the metadata, and only then empties
//!    the journal. A restart that finds a complete journal applies it again: every step is an
//!    idempotent overwrite, so the result is the new point, never a mix.
//! 4. The agent is told `Committed` only after step 3 is durable.

use std::{
    io::{self, BufReader, BufWriter, Seek as _, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use std::collections::BTreeSet;

use crate::{
    dr::authority,
    dr::points::{
        ChunkRanges, Delta, KnownHashes, PendingDelta, PointStore, PointsError, RECORD_HEAD_BYTES,
    },
    dr::storage::{Cursor, Disk, LocalDisk, LockGuard, OpenMode, StoredFile},
    dr::stored::{JOURNAL_FORMAT, META_FORMAT, StoredPoint, StoredPointV2},
};
use blkmirror_protocol::{
    retention::{self, PointAge, RetentionPolicy},
    wire::{self, CheckedData, ChunkHash, Hello, OpenCycleReport, PointInfo, Welcome},
};

/// Points kept in `volume.json` (the receiver's points-in-time store is separate work).
const RECENT_POINTS: usize = 64;
/// Journal records larger than this are corrupt by definition.
const MAX_RECORD: u32 = wire::MAX_FRAME_BYTES + 4096;
/// Space kept free on the receiver beyond a cycle's needs.
const SPACE_MARGIN: u64 = 16 << 20;
/// Free space is checked again after this many journaled bytes.
const SPACE_CHECK_EVERY: u64 = 8 << 20;
/// How many bytes a cycle journals (or a direct step writes) between write-back hints: the
/// data starts for the disk while the cycle is still arriving, so the commit's sync waits for
/// the last few MiB instead of all of it.
const WRITEBACK_EVERY: u64 = 32 << 20;
/// What a zero record costs in the journal, for the space accounting (an upper bound).
const ZERO_RECORD_BYTES: u64 = 40;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
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
    /// Not enough space for the cycle (checked up front, or hit while journaling).
    #[error("receiver disk full: {0}")]
    DiskFull(String),
    /// The volume exists with another source.
    #[error("volume {volume} was made from {existing}, not {offered}; refusing to overwrite it")]
    SourceMismatch {
        /// The volume.
        volume: String,
        /// What it was made from.
        existing: String,
        /// What is offered now.
        offered: String,
    },
    /// Metadata is unreadable.
    #[error("{path}: corrupt metadata: {message}")]
    Meta {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Cycle out of order.
    #[error("{0}")]
    Sequence(String),
    /// The receiver's policy forbids what the agent asked (it would destroy history).
    #[error("{0}")]
    Refused(String),
    /// The points-in-time store failed.
    #[error(transparent)]
    Points(#[from] PointsError),
}

impl StoreError {
    pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_owned();
        move |source| {
            if source.raw_os_error() == Some(libc::ENOSPC) {
                Self::DiskFull(format!("{what} {}: {source}", path.display()))
            } else {
                Self::Io { what, path, source }
            }
        }
    }
}

/// `volume.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMeta {
    /// Version of this file's format ([`META_FORMAT`]; 1 is read and upgraded).
    pub format: u32,
    /// The volume name.
    pub volume: String,
    /// The source device identity this replica was made from.
    pub source_id: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Chunk size in bytes.
    pub chunk_bytes: u64,
    /// When the volume was created (Unix ms).
    pub created_unix_ms: u64,
    /// The last committed cycle (0: none).
    pub committed_seq: u64,
    /// Its record.
    pub last_point: Option<StoredPoint>,
    /// The last complete (whole-replica) point.
    pub last_complete: Option<StoredPoint>,
    /// Recent committed cycles, oldest first.
    pub recent: Vec<StoredPoint>,
    /// A sync step was writing straight into the image and has not committed: the image is at
    /// no point in time until the sync completes.
    #[serde(default)]
    pub unsettled: bool,
    /// The retained points in time, oldest first: complete points the image can be taken back
    /// to (see [`crate::dr::points`]). The last one is the image itself.
    #[serde(default)]
    pub points: Vec<StoredPoint>,
    /// While `unsettled`: the offset where the interrupted sync step began, which is where a
    /// resumed sync must start.
    #[serde(default)]
    pub unsettled_from: u64,
    /// The `hashes` file may not match the image (a direct sync step was cut off by a crash of
    /// the receiver, so which chunks it wrote is unknown): the whole image is rehashed before
    /// it becomes a point.
    #[serde(default)]
    pub hashes_stale: bool,
    /// The format this file was read in, when older than [`META_FORMAT`] (it is upgraded in
    /// memory and rewritten when the volume is opened for writing). Not stored.
    #[serde(skip)]
    pub upgraded_from: Option<u32>,
}

/// One journal record.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Record {
    Begin {
        seq: u64,
    },
    Write {
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        length: u64,
    },
    /// The commit record of formats 1 and 2.
    Commit {
        point: StoredPointV2,
    },
    /// The journal's format, as its first record (format 1 journals have none). After the
    /// four variants of format 1: postcard numbers them in order.
    Format {
        version: u32,
    },
    /// The commit record of format 3 (the point with `app_consistent`).
    CommitV3 {
        point: StoredPoint,
    },
    /// Format 4: right after `Begin`, the agent that began the cycle (its certificate's
    /// fingerprint). Only the cycle's own agent may continue it after a receiver restart.
    Holder {
        agent: String,
    },
}

impl Record {
    /// The committed point of either commit record.
    fn committed(self) -> Option<StoredPoint> {
        match self {
            Self::Commit { point } => Some(point.into()),
            Self::CommitV3 { point } => Some(point),
            _ => None,
        }
    }
}

/// The open cycle's journal.
struct OpenCycle {
    seq: u64,
    frames: u64,
    /// Data bytes journaled: the most the image can grow when the cycle is applied.
    bytes: u64,
    /// `bytes` at the last free-space check.
    checked: u64,
    /// `bytes` at the last write-back hint.
    written_back: u64,
    /// The hashes of the chunks written so far, as the image will hold them after the commit
    /// (the frames apply in the order they came), so the commit need neither hash nor read
    /// them back.
    known: KnownHashes,
    /// Whether `known` followed every frame of the cycle: not for a cycle kept over a restart,
    /// whose commit hashes what it applies, as a replay does.
    known_follows: bool,
    /// The journal; `None` for a direct sync step, whose frames go straight to the image.
    writer: Option<BufWriter<Cursor>>,
    /// The chunks the cycle touches (for a direct step: their hashes are recorded at its
    /// commit or abort).
    touched: Touched,
    /// The byte ranges (not chunks: the set is unit-free) that the journaled frames cover,
    /// reported to an agent that reconnects to continue the cycle.
    journaled_bytes: ChunkRanges,
    /// The agent that began the cycle, as the journal records it (none for a direct step, and
    /// for a cycle begun without one: such a journal is not kept over a restart).
    holder: Option<String>,
    /// The undo delta back to the committed point, captured as the frames are journaled (the
    /// image does not change before the commit), so the commit has little left to read and
    /// write: on a fast link a large cycle's commit is what bounds it. `None` for a direct
    /// step, a volume that keeps no history, and a cycle kept over a restart (its commit
    /// captures it whole, as a replay does).
    undo: Option<PendingDelta>,
}

/// What a cycle changes, by chunk. Kept as merged ranges, so a frame naming a whole volume
/// costs one entry, not one per chunk.
#[derive(Debug, Default)]
struct Touched {
    /// Chunks written, or partly zeroed: their old content is captured and their hash is
    /// recomputed from the image.
    rewritten: ChunkRanges,
    /// Chunks wholly inside a zero range: all zeros afterwards. Their old content is captured
    /// only where the image holds data, and their hash becomes the zero hash without a read.
    zeroed: ChunkRanges,
}

impl Touched {
    fn add_write(&mut self, chunks: std::ops::Range<u64>) {
        self.rewritten.insert(chunks.start, chunks.end);
    }

    fn add_zero(&mut self, chunk_bytes: u64, size: u64, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let end = offset + length;
        let (first, last_end) = (offset / chunk_bytes, end.div_ceil(chunk_bytes));
        let full_first = offset.div_ceil(chunk_bytes);
        // The volume's last chunk may be short: reaching the end of the volume covers it.
        let full_end = if end >= size {
            size.div_ceil(chunk_bytes)
        } else {
            end / chunk_bytes
        };
        if full_first >= full_end {
            self.rewritten.insert(first, last_end);
            return;
        }
        self.zeroed.insert(full_first, full_end);
        self.rewritten.insert(first, full_first);
        self.rewritten.insert(full_end, last_end);
    }
}

/// What the commit path already knows of the journal it applies (a replay at open reads the
/// same from the journal).
struct Known {
    /// The cycle.
    seq: u64,
    /// What it touches.
    touched: Touched,
    /// The chunks its undo delta holds, if the commit computed them.
    capture: Option<ChunkRanges>,
    /// The undo delta captured while the cycle was open.
    undo: Option<PendingDelta>,
    /// The hashes of the chunks the cycle writes whole, computed as its frames came.
    hashes: Option<KnownHashes>,
}

/// How long each step of applying a committed journal took, for the debug log: a large
/// cycle's commit is what bounds it on a fast link, and these say which step to look at.
struct CommitPhases {
    last: std::time::Instant,
    steps: Vec<(&'static str, std::time::Duration)>,
}

impl CommitPhases {
    fn start() -> Self {
        Self {
            last: std::time::Instant::now(),
            steps: Vec::with_capacity(8),
        }
    }

    /// The step `name` ended now.
    fn mark(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.steps.push((name, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for CommitPhases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (at, (name, took)) in self.steps.iter().enumerate() {
            let separator = if at == 0 { "" } else { ", " };
            write!(f, "{separator}{name} {} ms", took.as_millis())?;
        }
        Ok(())
    }
}

/// One volume, open for replication.
pub struct Volume {
    disk: Disk,
    clock: Clock,
    dir: PathBuf,
    meta: VolumeMeta,
    image: Box<dyn StoredFile>,
    cycle: Option<OpenCycle>,
    store: PointStore,
    retention: RetentionPolicy,
    /// Points the last commit's retention pass dropped.
    pruned: Vec<u64>,
}

/// What recovery found at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The journal was empty.
    Clean,
    /// An uncommitted cycle was discarded.
    Discarded,
    /// A committed cycle was applied (again).
    Replayed(u64),
    /// An uncommitted cycle was kept open for the agent that began it to continue (its
    /// journal names that agent): cycle `seq`, with `frames` whole data frames. A torn record
    /// at the journal's end was cut off, and what is kept is durable.
    Kept { seq: u64, frames: u64 },
}

/// The receiver's clock, in Unix milliseconds (the simulator sets its own).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

fn system_clock() -> Clock {
    Arc::new(crate::command::status::now_ms)
}

impl Volume {
    /// The directory of volume `name` under `data_dir`.
    pub fn dir_of(data_dir: &Path, name: &str) -> PathBuf {
        data_dir.join(name)
    }

    /// Opens the volume `hello` names, creating it (sparse image, metadata) if it does not
    /// exist. An existing volume must have been made from the same source with the same size
    /// and chunk size. Returns the volume, whether it is new, and what recovery did.
    pub fn open_or_create(
        data_dir: &Path,
        hello: &Hello,
    ) -> Result<(Self, bool, Recovery), StoreError> {
        Self::open_or_create_on(&LocalDisk::shared(), system_clock(), data_dir, hello)
    }

    /// [`Self::open_or_create`] on `disk`, with `clock` for the receiver's times.
    pub fn open_or_create_on(
        disk: &Disk,
        clock: Clock,
        data_dir: &Path,
        hello: &Hello,
    ) -> Result<(Self, bool, Recovery), StoreError> {
        wire::check_volume_name(&hello.volume)
            .map_err(|error| StoreError::Sequence(error.to_string()))?;
        let dir = Self::dir_of(data_dir, &hello.volume);
        if disk.exists(&dir.join("volume.json")) {
            let (volume, recovery) = Self::open_on(disk, clock, data_dir, &hello.volume)?;
            let meta = &volume.meta;
            if meta.source_id != hello.source_id
                || meta.size_bytes != hello.size_bytes
                || meta.chunk_bytes != hello.chunk_bytes
            {
                return Err(StoreError::SourceMismatch {
                    volume: hello.volume.clone(),
                    existing: format!(
                        "{:?} ({} bytes, {} byte chunks)",
                        meta.source_id, meta.size_bytes, meta.chunk_bytes
                    ),
                    offered: format!(
                        "{:?} ({} bytes, {} byte chunks)",
                        hello.source_id, hello.size_bytes, hello.chunk_bytes
                    ),
                });
            }
            return Ok((volume, false, recovery));
        }
        // The volume's directory entry is made durable with it: a later crash must not lose a
        // volume whose points were committed.
        disk.create_dir_all(&dir)
            .and_then(|()| disk.sync_dir(data_dir))
            .map_err(StoreError::io("creating", &dir))?;
        let image_path = dir.join("image.raw");
        let image = disk
            .open(&image_path, OpenMode::Truncate)
            .map_err(StoreError::io("creating", &image_path))?;
        image
            .set_len(hello.size_bytes)
            .map_err(StoreError::io("sizing", &image_path))?;
        image
            .sync_all()
            .map_err(StoreError::io("syncing", &image_path))?;
        let meta = VolumeMeta {
            format: META_FORMAT,
            volume: hello.volume.clone(),
            source_id: hello.source_id.clone(),
            size_bytes: hello.size_bytes,
            chunk_bytes: hello.chunk_bytes,
            created_unix_ms: clock(),
            committed_seq: 0,
            last_point: None,
            last_complete: None,
            recent: Vec::new(),
            unsettled: false,
            points: Vec::new(),
            unsettled_from: 0,
            hashes_stale: false,
            upgraded_from: None,
        };
        let store = PointStore::open(disk, &dir, meta.chunk_bytes, meta.size_bytes)?;
        store.update_hashes(&*image, &ChunkRanges::default(), std::iter::empty())?;
        write_meta(disk, &dir, &meta)?;
        Ok((
            Self {
                disk: disk.clone(),
                clock,
                dir,
                meta,
                image,
                cycle: None,
                store,
                retention: RetentionPolicy::default(),
                pruned: Vec::new(),
            },
            true,
            Recovery::Clean,
        ))
    }

    /// Opens an existing volume and recovers its journal.
    pub fn open(data_dir: &Path, name: &str) -> Result<(Self, Recovery), StoreError> {
        Self::open_on(&LocalDisk::shared(), system_clock(), data_dir, name)
    }

    /// [`Self::open`] on `disk`, with `clock` for the receiver's times.
    pub fn open_on(
        disk: &Disk,
        clock: Clock,
        data_dir: &Path,
        name: &str,
    ) -> Result<(Self, Recovery), StoreError> {
        let dir = Self::dir_of(data_dir, name);
        let meta = read_meta(disk, &dir)?;
        let image_path = dir.join("image.raw");
        let image = disk
            .open(&image_path, OpenMode::ReadWrite)
            .map_err(StoreError::io("opening", &image_path))?;
        let store = PointStore::open(disk, &dir, meta.chunk_bytes, meta.size_bytes)?;
        let mut volume = Self {
            disk: disk.clone(),
            clock,
            dir,
            meta,
            image,
            cycle: None,
            store,
            retention: RetentionPolicy::default(),
            pruned: Vec::new(),
        };
        let recovery = volume.recover()?;
        let _lock = volume.lock_exclusive()?;
        if let Some(old) = volume.meta.upgraded_from.take() {
            write_meta(&volume.disk, &volume.dir, &volume.meta)?;
            tracing::info!(
                target: "blkmirror receiver",
                "volume {}: volume.json upgraded from format {old} to {META_FORMAT}",
                volume.meta.volume
            );
        }
        if volume.meta.unsettled
            && !volume.meta.hashes_stale
            && !reintroduced(Bug::StaleHashesAfterAbort)
        {
            // The receiver stopped during a direct sync step: what it wrote is unknown.
            let mut meta = volume.meta.clone();
            meta.hashes_stale = true;
            write_meta(&volume.disk, &volume.dir, &meta)?;
            volume.meta = meta;
        }
        if !volume.store.has_hashes() {
            // A volume from before the points store: hash the image once.
            volume.store.rehash_all(&*volume.image)?;
        }
        // An undo delta captured while a cycle was open, or a merge, cut off by the process's
        // end (a kept cycle captures its delta whole at its commit).
        volume.store.remove_leftovers()?;
        let kept = volume.kept_seqs();
        volume.store.compact(volume.meta.committed_seq, &kept)?;
        Ok((volume, recovery))
    }

    /// The metadata.
    pub fn meta(&self) -> &VolumeMeta {
        &self.meta
    }

    /// Which of `points` (this volume's, held elsewhere: the object store's) this volume's
    /// retention keeps now, with the points pinned here kept too.
    pub fn retention_keeps(&self, points: &[PointAge]) -> BTreeSet<u64> {
        let pinned = pinned_points(&self.disk, &self.dir);
        retention::select(points, (self.clock)(), &self.retention, &pinned)
    }

    /// Sets the retention policy applied at every commit.
    pub fn set_retention(&mut self, policy: RetentionPolicy) {
        self.retention = policy;
    }

    /// The points the last commit pruned (by the retention policy).
    pub fn take_pruned(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pruned)
    }

    /// The points store.
    pub fn store(&self) -> &PointStore {
        &self.store
    }

    fn kept_seqs(&self) -> BTreeSet<u64> {
        self.meta.points.iter().map(|p| p.seq).collect()
    }

    /// The volume's authority: its term and which side is primary.
    pub fn authority(&self) -> Result<authority::Authority, StoreError> {
        authority::read(&self.disk, &self.dir)
    }

    /// Takes `newer` as the volume's authority if its term is higher than the one here (a
    /// failover, reprotect or failback that another receiver of the object store recorded
    /// there); returns whether it did.
    pub fn adopt_authority(&self, newer: &authority::Authority) -> Result<bool, StoreError> {
        let _lock = self.lock_exclusive()?;
        if newer.term <= authority::read(&self.disk, &self.dir)?.term {
            return Ok(false);
        }
        authority::write(&self.disk, &self.dir, newer)?;
        Ok(true)
    }

    /// Refuses the source when the DR site is primary (after a failover; see
    /// [`crate::dr::authority`]).
    fn check_authority(&self) -> Result<(), StoreError> {
        match authority::read(&self.disk, &self.dir)?.refusal(&self.meta.volume) {
            Some(refusal) => Err(StoreError::Refused(refusal)),
            None => Ok(()),
        }
    }

    /// Takes the volume's lock exclusively: readers of points (restore, verify) hold it shared,
    /// so the image and the deltas do not change under them.
    fn lock_exclusive(&self) -> Result<LockGuard, StoreError> {
        lock_volume(&self.disk, &self.dir, false)
    }

    /// Path of the image.
    pub fn image_path(&self) -> PathBuf {
        self.dir.join("image.raw")
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join("journal")
    }

    /// Opens cycle `seq` (must be the committed one plus one) after checking that the data
    /// directory has room for `bytes_estimate` twice (journal and image) plus a margin.
    ///
    /// A `direct` cycle is a step of an initial sync: its frames are written straight into the
    /// image, which halves the receiver's IO. It is refused once the volume has had a complete
    /// point. The image is at no point in time until the sync completes, which `volume.json`
    /// records (`unsettled`, with the step's start `from`) before the first write; a step's
    /// commit syncs the image and its hashes and records how far the sync got. A journaled
    /// cycle is refused while the image is unsettled: it could not become a point.
    pub fn begin(
        &mut self,
        seq: u64,
        bytes_estimate: u64,
        direct: bool,
        from: u64,
    ) -> Result<(), StoreError> {
        self.begin_held(seq, bytes_estimate, direct, from, None)
    }

    /// [`Self::begin`] for the agent `holder` (its fingerprint): a journaled cycle records it,
    /// so a restarted receiver keeps the cycle open for that agent to resume (see
    /// [`Recovery::Kept`]).
    pub fn begin_held(
        &mut self,
        seq: u64,
        bytes_estimate: u64,
        direct: bool,
        from: u64,
        holder: Option<&str>,
    ) -> Result<(), StoreError> {
        // A new Begin abandons an open cycle (the agent restarted it, e.g. as a sync).
        self.abort();
        self.check_authority()?;
        if seq != self.meta.committed_seq + 1 {
            return Err(StoreError::Sequence(format!(
                "cycle {seq} offered, but the next cycle is {}",
                self.meta.committed_seq + 1
            )));
        }
        // The receiver alone decides what is kept: a volume with history is never written
        // outside the journal, whatever the agent asks (see the module docs).
        if direct && self.has_history() && !reintroduced(Bug::DirectBeginAfterHistory) {
            return Err(StoreError::Refused(format!(
                "volume {} has committed points: a direct (unjournaled) sync step would destroy \
                 them; every re-sync of an existing replica must be journaled",
                self.meta.volume
            )));
        }
        if !direct && self.meta.unsettled {
            return Err(StoreError::Refused(format!(
                "volume {} is in the middle of an initial sync (its image is at no point in \
                 time): resume the sync from offset {} before a journaled cycle",
                self.meta.volume, self.meta.unsettled_from
            )));
        }
        let available = self
            .disk
            .available_bytes(&self.dir)
            .map_err(StoreError::io("statvfs", &self.dir))?;
        let needed = bytes_estimate
            .saturating_mul(2)
            .saturating_add(SPACE_MARGIN);
        if available < needed {
            return Err(StoreError::DiskFull(format!(
                "cycle {seq} needs up to {needed} bytes in {}, {available} are free",
                self.dir.display()
            )));
        }
        let writer = if direct {
            // Recorded before the first write into the image: until the step commits, the image
            // is at no point in time and a resumed sync starts at `from`.
            let _lock = self.lock_exclusive()?;
            let mut meta = self.meta.clone();
            meta.unsettled = true;
            meta.unsettled_from = from.min(meta.size_bytes);
            // Only a legacy volume (unsettled by an older release) can reach this with points.
            let dropped = std::mem::take(&mut meta.points);
            write_meta(&self.disk, &self.dir, &meta)?;
            self.meta = meta;
            if !dropped.is_empty() {
                self.store.clear()?;
                tracing::warn!(
                    target: "blkmirror receiver",
                    "volume {}: an unsettled image from an older release; {} point(s) dropped",
                    self.meta.volume,
                    dropped.len()
                );
            }
            None
        } else {
            let path = self.journal_path();
            let created = !self.disk.exists(&path);
            let file = self
                .disk
                .open(&path, OpenMode::Truncate)
                .map_err(StoreError::io("opening", &path))?;
            // Emptied for good before the cycle's first record: a receiver restarted after a
            // power cut keeps what the journal holds (`Recovery::Kept`), and must not find an
            // older cycle's records between this one's.
            file.sync_all().map_err(StoreError::io("syncing", &path))?;
            // The commit syncs the journal's content, not its name: a journal created here
            // must have a durable directory entry before any commit applies it to the image,
            // or a power cut could keep the image writes and lose the journal that explains
            // them (found by the simulator, seed 1901).
            if created {
                self.disk
                    .sync_dir(&self.dir)
                    .map_err(StoreError::io("syncing", &self.dir))?;
            }
            let mut writer = BufWriter::with_capacity(4 << 20, Cursor::new(file));
            append(
                &mut writer,
                &Record::Format {
                    version: JOURNAL_FORMAT,
                },
                &path,
            )?;
            append(&mut writer, &Record::Begin { seq }, &path)?;
            if let Some(agent) = holder {
                append(
                    &mut writer,
                    &Record::Holder {
                        agent: agent.to_owned(),
                    },
                    &path,
                )?;
            }
            Some(writer)
        };
        let holder = holder.filter(|_| writer.is_some()).map(str::to_owned);
        // The pins read here only decide whether to start early; the commit decides again.
        let undo = if writer.is_some() && self.captures(&pinned_points(&self.disk, &self.dir)) {
            Some(self.store.start_capture(Delta {
                from: seq,
                to: self.meta.committed_seq,
            })?)
        } else {
            None
        };
        self.cycle = Some(OpenCycle {
            seq,
            frames: 0,
            bytes: 0,
            checked: 0,
            written_back: 0,
            known: KnownHashes::default(),
            known_follows: true,
            writer,
            touched: Touched::default(),
            journaled_bytes: ChunkRanges::default(),
            holder,
            undo,
        });
        Ok(())
    }

    /// The receiver's answer to an agent's `Hello` for this volume: what it has committed and
    /// whether a cycle is kept open for it. `new_volume`: the connection created it.
    pub fn welcome(&self, new_volume: bool) -> Welcome {
        Welcome {
            protocol: wire::PROTOCOL_VERSION,
            new_volume,
            committed_seq: self.meta.committed_seq,
            last_point: self.last_point_for_agent(),
            history: self.has_history(),
            open_cycle: self.open_cycle_report(),
            // A damaged authority file reads as term 1: an agent that knows better refuses,
            // and `begin` reports the damage.
            term: authority::read(&self.disk, &self.dir).map_or(1, |a| a.term),
            failback_term: authority::read(&self.disk, &self.dir)
                .map_or(0, |a| a.last_failback_term()),
        }
    }

    /// What the open journaled cycle holds, for an agent that reconnects to continue it
    /// (`None` without one, or when it holds nothing yet). The ranges are bounded by
    /// [`wire::MAX_RESUME_RANGES`]: the agent re-sends what is not reported.
    pub fn open_cycle_report(&self) -> Option<OpenCycleReport> {
        let cycle = self.cycle.as_ref().filter(|c| c.writer.is_some())?;
        if cycle.frames == 0 {
            return None;
        }
        Some(OpenCycleReport {
            seq: cycle.seq,
            frames: cycle.frames,
            journaled: cycle
                .journaled_bytes
                .ranges()
                .take(wire::MAX_RESUME_RANGES)
                .map(|(start, end)| (start, end - start))
                .collect(),
        })
    }

    /// Continues the open journaled cycle `seq` on a new connection (the agent's `Resume`):
    /// the journal keeps its frames. Returns the frames journaled so far.
    pub fn resume(&mut self, seq: u64) -> Result<u64, StoreError> {
        self.check_authority()?;
        match self.cycle.as_ref() {
            Some(cycle) if cycle.seq == seq && cycle.writer.is_some() => Ok(cycle.frames),
            Some(cycle) => Err(StoreError::Sequence(format!(
                "cycle {seq} cannot be resumed: cycle {} is open{}",
                cycle.seq,
                if cycle.writer.is_none() {
                    " as a direct sync step"
                } else {
                    ""
                }
            ))),
            None => Err(StoreError::Sequence(format!(
                "cycle {seq} cannot be resumed: no cycle is open (begin it again)"
            ))),
        }
    }

    /// Whether the volume has had a complete point: its history is then protected (no direct
    /// steps), unless an older release left the image unsettled.
    pub fn has_history(&self) -> bool {
        self.meta.last_complete.is_some() && !self.meta.unsettled
    }

    /// The open cycle and the frames journaled in it.
    pub fn open_cycle(&self) -> Option<(u64, u64)> {
        self.cycle.as_ref().map(|c| (c.seq, c.frames))
    }

    /// Appends a checked data frame to the open cycle's journal.
    pub fn journal(&mut self, data: CheckedData) -> Result<(), StoreError> {
        let path = self.journal_path();
        let (chunk_bytes, size) = (self.meta.chunk_bytes, self.meta.size_bytes);
        let cycle = self
            .cycle
            .as_mut()
            .ok_or_else(|| StoreError::Sequence("data frame outside a cycle".into()))?;
        let record = match data {
            CheckedData::Write { offset, data } => {
                if let Some(undo) = cycle.undo.as_mut() {
                    undo.capture(
                        &self.store,
                        &*self.image,
                        self.store.chunks_of(offset, data.len() as u64),
                    )?;
                }
                cycle.bytes += data.len() as u64;
                if cycle.writer.is_some() {
                    cycle
                        .journaled_bytes
                        .insert(offset, offset + data.len() as u64);
                }
                cycle
                    .touched
                    .add_write(self.store.chunks_of(offset, data.len() as u64));
                Record::Write { offset, data }
            }
            CheckedData::Zero { offset, length } => {
                // The journal record is small, but it still takes room.
                cycle.bytes += ZERO_RECORD_BYTES;
                if cycle.writer.is_some() {
                    cycle.journaled_bytes.insert(offset, offset + length);
                }
                cycle.touched.add_zero(chunk_bytes, size, offset, length);
                Record::Zero { offset, length }
            }
        };
        cycle.frames += 1;
        let (bytes, checked, seq) = (cycle.bytes, cycle.checked, cycle.seq);
        match cycle.writer.as_mut() {
            Some(writer) => {
                append(writer, &record, &path)?;
                match &record {
                    Record::Write { offset, data } => {
                        cycle.known.written(&self.store, *offset, data);
                    }
                    Record::Zero { offset, length } => {
                        cycle.known.forget(self.store.chunks_of(*offset, *length));
                    }
                    _ => {}
                }
            }
            None => match record {
                Record::Write { offset, data } => {
                    let written = self.image.write_all_at(&data, offset);
                    match written {
                        Ok(()) => cycle.known.written(&self.store, offset, &data),
                        Err(_) => cycle
                            .known
                            .forget(self.store.chunks_of(offset, data.len() as u64)),
                    }
                    written.map_err(StoreError::io("writing", &self.image_path()))?;
                }
                Record::Zero { offset, length } => {
                    cycle.known.forget(self.store.chunks_of(offset, length));
                    self.zero(offset, length)?;
                }
                Record::Begin { .. }
                | Record::Commit { .. }
                | Record::CommitV3 { .. }
                | Record::Format { .. }
                | Record::Holder { .. } => {}
            },
        }
        if let Some(cycle) = self.cycle.as_mut()
            && bytes - cycle.written_back >= WRITEBACK_EVERY
        {
            cycle.written_back = bytes;
            // Only a hint: a write that failed is reported by the commit's sync.
            let _ = match cycle.writer.as_ref() {
                Some(writer) => writer.get_ref().file().start_writeback(),
                None => self.image.start_writeback(),
            };
        }
        self.check_space(seq, bytes, checked)
    }

    /// Every few MiB of a cycle: the journal is on disk already, so what must stay free is room
    /// for the image to grow by what the cycle will still write into it.
    fn check_space(&mut self, seq: u64, bytes: u64, checked: u64) -> Result<(), StoreError> {
        if bytes - checked < SPACE_CHECK_EVERY {
            return Ok(());
        }
        if let Some(cycle) = self.cycle.as_mut() {
            cycle.checked = bytes;
        }
        let available = self
            .disk
            .available_bytes(&self.dir)
            .map_err(StoreError::io("statvfs", &self.dir))?;
        let direct = self.cycle.as_ref().is_some_and(|c| c.writer.is_none());
        let still_needed = if direct { 0 } else { bytes };
        if available < still_needed.saturating_add(SPACE_MARGIN) {
            self.abort();
            return Err(StoreError::DiskFull(format!(
                "cycle {seq} has {bytes} bytes to apply and only {available} bytes are free in {}",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Drops the open cycle: the image stays at the last committed point (or, for a direct
    /// sync step, stays marked unsettled). The hashes of the chunks a direct step wrote are
    /// brought up to date, so a resumed sync that skips them (they already match) leaves no
    /// stale hash behind; if that fails, the volume is marked for a full rehash.
    pub fn abort(&mut self) {
        let Some(mut cycle) = self.cycle.take() else {
            return;
        };
        if let Some(undo) = cycle.undo.take() {
            undo.discard();
        }
        if cycle.writer.is_some() {
            let _ = self
                .disk
                .open(&self.journal_path(), OpenMode::Truncate)
                .and_then(|file| file.sync_all());
            return;
        }
        if reintroduced(Bug::StaleHashesAfterAbort) {
            return;
        }
        if let Err(error) = self.settle_direct_writes(&cycle.touched, &cycle.known) {
            tracing::warn!(
                target: "blkmirror receiver",
                "volume {}: hashes of an interrupted sync step not updated ({error}); the image \
                 is rehashed before its first point",
                self.meta.volume
            );
            let mut meta = self.meta.clone();
            meta.hashes_stale = true;
            if write_meta(&self.disk, &self.dir, &meta).is_ok() {
                self.meta = meta;
            }
        }
    }

    /// Commits the open cycle: makes the journal durable with a commit record, applies it to
    /// the image, and records the point. On error the cycle is aborted (before the commit
    /// record is durable) or left for recovery to apply (after).
    ///
    /// The point's times are the receiver's to vouch for: `received_unix_ms` is the receiver's
    /// clock, and the agent's cut time is held between the previous point's and now.
    pub fn commit(&mut self, point: PointInfo) -> Result<(), StoreError> {
        let mut point = StoredPoint::received(&point, 0);
        let path = self.journal_path();
        let Some(cycle) = self.cycle.take() else {
            return Err(StoreError::Sequence("commit outside a cycle".into()));
        };
        point.seq = cycle.seq;
        let now = (self.clock)();
        point.received_unix_ms = now;
        // Never before the previous point, even when the receiver's clock has stepped back
        // (NTP): `--at TIME` picks the newest point dated at or before TIME, so dates must
        // not go backwards with the sequence (the simulator found this, seed 44).
        let floor = self.meta.last_point.as_ref().map_or(0, |p| p.time_unix_ms);
        point.time_unix_ms = point.time_unix_ms.clamp(floor, now.max(floor));
        // Before a journaled cycle is decided: room for the undo delta and for the image to
        // grow. A refusal here leaves the image at the last point (the journal is emptied as
        // for any abort), and the agent retries later.
        let capture = if cycle.writer.is_some() {
            match self.check_commit_space(&cycle) {
                Ok(capture) => capture,
                Err(error) => {
                    self.cycle = Some(cycle);
                    self.abort();
                    return Err(error);
                }
            }
        } else {
            None
        };
        let OpenCycle {
            seq,
            touched,
            writer,
            known,
            known_follows,
            undo,
            ..
        } = cycle;
        let Some(mut writer) = writer else {
            return self.commit_direct(point, &touched, &known);
        };
        let started = std::time::Instant::now();
        let durable = append(&mut writer, &Record::CommitV3 { point }, &path).and_then(|()| {
            let file = writer
                .into_inner()
                .map_err(|error| StoreError::io("writing", &path)(error.into_error()))?;
            file.file()
                .sync_all()
                .map_err(StoreError::io("syncing", &path))
        });
        if let Err(error) = durable {
            self.cycle = None;
            if let Some(undo) = undo {
                undo.discard();
            }
            let _ = self.disk.open(&path, OpenMode::Truncate);
            return Err(error);
        }
        let synced = started.elapsed();
        let applied = self.apply_journal(Some(Known {
            seq,
            touched,
            capture,
            undo,
            hashes: known_follows.then_some(known),
        }));
        tracing::debug!(
            target: "blkmirror receiver",
            "volume {}: cycle {seq} committed in {:?} (journal synced in {synced:?})",
            self.meta.volume,
            started.elapsed()
        );
        applied
    }

    /// Syncs what a direct step wrote into the image and records the hashes of those chunks.
    fn settle_direct_writes(
        &self,
        touched: &Touched,
        known: &KnownHashes,
    ) -> Result<(), StoreError> {
        self.image
            .sync_all()
            .map_err(StoreError::io("syncing", &self.image_path()))?;
        self.update_hashes(touched, known)
    }

    /// Records the hashes of the chunks `touched` names, as the image holds them now: from
    /// `known` where it has them, read back from the image where not.
    fn update_hashes(&self, touched: &Touched, known: &KnownHashes) -> Result<(), StoreError> {
        Ok(self.store.update_hashes_known(
            &*self.image,
            &touched.zeroed,
            touched.rewritten.chunks(),
            known,
        )?)
    }

    /// Whether a commit keeps the old content as an undo delta: when retention keeps history,
    /// or an export holds a point (it reads the point through the deltas).
    fn captures(&self, pinned: &BTreeSet<u64>) -> bool {
        let policy_keeps = !(self.retention.all.is_zero()
            && self.retention.hourly.is_zero()
            && self.retention.daily.is_zero()
            && self.retention.locked.is_zero());
        let keeps_history = policy_keeps || !pinned.is_empty();
        keeps_history && !self.meta.unsettled && !self.meta.points.is_empty()
    }

    /// The chunks whose old content the undo delta must hold: every rewritten chunk, and the
    /// zeroed chunks that hold data in the image (a zeroed hole stays a hole).
    fn capture_set(&self, touched: &Touched) -> Result<ChunkRanges, StoreError> {
        let chunk = self.meta.chunk_bytes;
        let size = self.meta.size_bytes;
        let mut set = touched.rewritten.clone();
        for (first, end) in touched.zeroed.without(&touched.rewritten).ranges() {
            let offset = first * chunk;
            let length = (end * chunk).min(size) - offset;
            let segments = self
                .image
                .data_segments(offset, length)
                .map_err(StoreError::io("scanning", &self.image_path()))?;
            for (at, len) in segments {
                let chunks = self.store.chunks_of(at, len);
                set.insert(chunks.start.max(first), chunks.end.min(end));
            }
        }
        Ok(set)
    }

    /// Checks, before the commit record is written, that the delta capture and the image's
    /// growth fit in the free space (the journal is on disk already). Returns the chunks the
    /// undo delta will hold, if this commit keeps one.
    fn check_commit_space(&self, cycle: &OpenCycle) -> Result<Option<ChunkRanges>, StoreError> {
        // The pins read here only size the estimate; the commit reads them again under its lock.
        let capture_set = if self.captures(&pinned_points(&self.disk, &self.dir)) {
            Some(self.capture_set(&cycle.touched)?)
        } else {
            None
        };
        // What the open cycle captured already is on disk (and out of `available`).
        let capture = capture_set.as_ref().map_or(0, |set| {
            let left = match cycle.undo.as_ref() {
                Some(undo) => set.without(undo.captured()).count(),
                None => set.count(),
            };
            left.saturating_mul(self.meta.chunk_bytes + RECORD_HEAD_BYTES)
        });
        let needed = capture
            .saturating_add(cycle.bytes)
            .saturating_add(SPACE_MARGIN);
        let available = self
            .disk
            .available_bytes(&self.dir)
            .map_err(StoreError::io("statvfs", &self.dir))?;
        if available < needed {
            return Err(StoreError::DiskFull(format!(
                "committing cycle {} needs {needed} bytes in {} (undo delta {capture}, image \
                 {}), {available} are free",
                cycle.seq,
                self.dir.display(),
                cycle.bytes
            )));
        }
        Ok(capture_set)
    }

    /// Commits a direct sync step: the data is in the image already.
    fn commit_direct(
        &mut self,
        mut point: StoredPoint,
        touched: &Touched,
        known: &KnownHashes,
    ) -> Result<(), StoreError> {
        self.settle_direct_writes(touched, known)?;
        point.complete = false;
        point.consistent = false;
        let mut meta = self.meta.clone();
        meta.unsettled = false;
        meta.unsettled_from = 0;
        record_point(&mut meta, point);
        write_meta(&self.disk, &self.dir, &meta)?;
        self.meta = meta;
        Ok(())
    }

    /// The last point as the agent must see it: an unsettled image is no point at all, so it
    /// is reported as an incomplete sync step at the offset where the interrupted step began.
    pub fn last_point_for_agent(&self) -> Option<PointInfo> {
        let last = self.meta.last_point.as_ref()?.to_wire();
        if !self.meta.unsettled {
            return Some(last);
        }
        Some(PointInfo {
            complete: false,
            consistent: false,
            synced_to: self.meta.unsettled_from,
            ..last
        })
    }

    /// Replays a complete journal or discards an incomplete one.
    fn recover(&mut self) -> Result<Recovery, StoreError> {
        let path = self.journal_path();
        let len = match self.disk.file_len(&path) {
            Ok(len) => len,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Recovery::Clean),
            Err(error) => return Err(StoreError::io("reading", &path)(error)),
        };
        if len == 0 {
            return Ok(Recovery::Clean);
        }
        match self.scan_journal()? {
            Some(point) => {
                let seq = point.seq;
                // What was read may be only in the page cache: a process killed during the
                // commit's fsync leaves a commit record that a power cut can still take away.
                // Make it durable before the image changes on its word (the simulator found
                // this, seed 673).
                self.disk
                    .open(&path, OpenMode::ReadWrite)
                    .and_then(|file| file.sync_all())
                    .map_err(StoreError::io("syncing", &path))?;
                match self.apply_journal(None) {
                    Ok(()) => Ok(Recovery::Replayed(seq)),
                    // Failed over before it was applied: discarded.
                    Err(StoreError::Refused(refusal)) => {
                        tracing::warn!(
                            target: "blkmirror receiver",
                            "volume {}: committed cycle {seq} discarded: {refusal}",
                            self.meta.volume
                        );
                        Ok(Recovery::Discarded)
                    }
                    Err(error) => Err(error),
                }
            }
            None => {
                if let Some((seq, frames)) = self.keep_open_cycle()? {
                    return Ok(Recovery::Kept { seq, frames });
                }
                let file = self
                    .disk
                    .open(&path, OpenMode::Truncate)
                    .map_err(StoreError::io("truncating", &path))?;
                file.sync_all().map_err(StoreError::io("syncing", &path))?;
                Ok(Recovery::Discarded)
            }
        }
    }

    /// An uncommitted journal that names its agent and holds whole data frames is kept open
    /// (the receiver died in the middle of a cycle): a torn or corrupt tail is cut off, the
    /// rest is made durable, and the cycle is open again as if its connection had just broken.
    /// Returns the cycle and its frames; `None` when the journal is not to be kept.
    fn keep_open_cycle(&mut self) -> Result<Option<(u64, u64)>, StoreError> {
        let path = self.journal_path();
        let file = self
            .disk
            .open(&path, OpenMode::Read)
            .map_err(StoreError::io("opening", &path))?;
        let found = scan_open_cycle(
            BufReader::with_capacity(4 << 20, Cursor::new(file)),
            self.meta.committed_seq,
            self.meta.size_bytes,
        );
        let Some(found) = found.filter(|found| found.frames > 0) else {
            return Ok(None);
        };
        // Failed over meanwhile: the source's cycle can never commit here.
        if self.check_authority().is_err() {
            return Ok(None);
        }
        let file = self
            .disk
            .open(&path, OpenMode::ReadWrite)
            .map_err(StoreError::io("opening", &path))?;
        file.set_len(found.whole_bytes)
            .and_then(|()| file.sync_all())
            .map_err(StoreError::io("truncating", &path))?;
        let mut cursor = Cursor::new(file);
        cursor
            .seek(io::SeekFrom::Start(found.whole_bytes))
            .map_err(StoreError::io("seeking", &path))?;
        let mut touched = Touched::default();
        for (start, end) in found.written.ranges() {
            touched.add_write(self.store.chunks_of(start, end - start));
        }
        for (start, end) in found.zeroed {
            touched.add_zero(
                self.meta.chunk_bytes,
                self.meta.size_bytes,
                start,
                end - start,
            );
        }
        let (seq, frames) = (found.seq, found.frames);
        self.cycle = Some(OpenCycle {
            seq,
            frames,
            bytes: found.bytes,
            checked: found.bytes,
            written_back: found.bytes,
            known: KnownHashes::default(),
            known_follows: false,
            writer: Some(BufWriter::with_capacity(4 << 20, cursor)),
            touched,
            journaled_bytes: found.journaled,
            holder: Some(found.holder),
            undo: None,
        });
        Ok(Some((seq, frames)))
    }

    /// The receiver process dies with the volume open: what the journal buffers is lost, as
    /// it would be (a drop writes it out).
    #[cfg(test)]
    pub(crate) fn die(mut self) {
        if let Some(writer) = self.cycle.as_mut().and_then(|c| c.writer.take()) {
            drop(writer.into_parts());
        }
        if let Some(undo) = self.cycle.as_mut().and_then(|c| c.undo.take()) {
            undo.die();
        }
    }

    /// The agent that began the open journaled cycle, if the journal names it.
    pub fn open_cycle_holder(&self) -> Option<&str> {
        self.cycle.as_ref()?.holder.as_deref()
    }

    /// Writes what the open cycle's journal buffers out to the file (not synced): a receiver
    /// process that dies afterwards keeps those frames for the agent to resume (a power cut
    /// may still take them; what is kept at a restart is re-read from the file).
    pub fn write_out_journal(&mut self) -> Result<(), StoreError> {
        let path = self.journal_path();
        if let Some(writer) = self.cycle.as_mut().and_then(|c| c.writer.as_mut()) {
            writer.flush().map_err(StoreError::io("writing", &path))?;
        }
        Ok(())
    }

    /// Reads the journal; returns the commit record if the journal is whole and committed.
    fn scan_journal(&self) -> Result<Option<StoredPoint>, StoreError> {
        let path = self.journal_path();
        let file = self
            .disk
            .open(&path, OpenMode::Read)
            .map_err(StoreError::io("opening", &path))?;
        scan_records(
            BufReader::with_capacity(4 << 20, Cursor::new(file)),
            self.meta.committed_seq,
        )
    }

    /// Applies a committed journal to the image, records the point, and empties the journal.
    /// The commit path passes what it already knows of the journal; a replay at open reads it.
    fn apply_journal(&mut self, mut known: Option<Known>) -> Result<(), StoreError> {
        let path = self.journal_path();
        let image_path = self.image_path();
        let _lock = self.lock_exclusive()?;
        // A failover decided while this cycle was committing: the DR site is primary, and the
        // source's cycle must not change the replica now. It is discarded (the agent was not
        // told it committed).
        if let Some(refusal) = authority::read(&self.disk, &self.dir)?.refusal(&self.meta.volume) {
            if let Some(undo) = known.as_mut().and_then(|known| known.undo.take()) {
                undo.discard();
            }
            let file = self
                .disk
                .open(&path, OpenMode::Truncate)
                .map_err(StoreError::io("truncating", &path))?;
            file.sync_all().map_err(StoreError::io("syncing", &path))?;
            return Err(StoreError::Refused(refusal));
        }
        // Which chunks the cycle touches, and its number: a first pass over the journal when
        // replaying.
        let Known {
            seq,
            touched,
            capture,
            mut undo,
            hashes,
        } = match known {
            Some(known) => known,
            None => {
                let (touched, point) = self.journal_chunks()?;
                Known {
                    seq: point.seq,
                    touched,
                    capture: None,
                    undo: None,
                    hashes: None,
                }
            }
        };
        // Keep the old content of those chunks as the delta back to the previous point, before
        // the image changes. A replay finds the delta already written (the image may be half
        // applied by then, so it must not be captured again). A policy that keeps only the
        // newest point would drop the delta right after the commit: it is skipped.
        let mut phases = CommitPhases::start();
        let previous = self.meta.committed_seq;
        // Read under the exclusive lock: an export pins its point under the shared one.
        let pinned = pinned_points(&self.disk, &self.dir);
        if self.captures(&pinned) && previous != seq {
            let delta = Delta {
                from: seq,
                to: previous,
            };
            if self.store.has_delta(delta) {
                // Found by a replay: a process killed between the delta's rename and its
                // directory sync leaves a name a power cut can still take away, and the image
                // is about to change on its word (the simulator found this, seed 611).
                self.store.make_durable(delta)?;
            } else {
                let chunks = match capture {
                    Some(chunks) => chunks,
                    None => self.capture_set(&touched)?,
                };
                match undo.take() {
                    Some(pending) if pending.delta() == delta => {
                        pending.finish(&self.store, &*self.image, &chunks)?;
                    }
                    other => {
                        if let Some(other) = other {
                            other.discard();
                        }
                        self.store.capture(&*self.image, delta, &chunks)?;
                    }
                }
            }
        }
        if let Some(undo) = undo {
            undo.discard();
        }
        phases.mark("undo delta");
        let file = self
            .disk
            .open(&path, OpenMode::Read)
            .map_err(StoreError::io("opening", &path))?;
        let mut reader = BufReader::with_capacity(4 << 20, Cursor::new(file));
        let mut committed = None;
        // Every record is applied in order, so what the last write to a chunk held is what
        // the image holds after the apply: those chunks need no read back to be hashed. The
        // commit of a cycle begun in this process hashed them as they came.
        let follow = hashes.is_none();
        let mut written = hashes.unwrap_or_default();
        while let Some(record) = read_record(&mut reader)? {
            match record {
                Record::Begin { .. } | Record::Format { .. } | Record::Holder { .. } => {}
                Record::Write { offset, data } => {
                    self.image
                        .write_all_at(&data, offset)
                        .map_err(StoreError::io("writing", &image_path))?;
                    if follow {
                        written.written(&self.store, offset, &data);
                    }
                }
                Record::Zero { offset, length } => {
                    if follow {
                        written.forget(self.store.chunks_of(offset, length));
                    }
                    self.zero(offset, length)?;
                }
                commit @ (Record::Commit { .. } | Record::CommitV3 { .. }) => {
                    committed = commit.committed();
                    break;
                }
            }
        }
        let point = committed.ok_or_else(|| StoreError::Meta {
            path: path.clone(),
            message: "journal applied without a commit record".into(),
        })?;
        phases.mark("apply");
        self.image
            .sync_all()
            .map_err(StoreError::io("syncing", &image_path))?;
        phases.mark("image sync");
        let mut meta = self.meta.clone();
        if meta.hashes_stale && point.complete {
            // An initial sync step was cut off by a crash: which chunks it wrote is unknown, so
            // the whole image is hashed once before it becomes a point.
            self.store.rehash_all(&*self.image)?;
            meta.hashes_stale = false;
        } else {
            self.update_hashes(&touched, &written)?;
        }
        if point.complete && !meta.unsettled && meta.points.last().map(|p| p.seq) != Some(point.seq)
        {
            meta.points.push(point.clone());
        }
        let ages: Vec<PointAge> = meta.points.iter().map(point_age).collect();
        let keep = retention::select(&ages, (self.clock)(), &self.retention, &pinned);
        self.pruned = meta
            .points
            .iter()
            .map(|p| p.seq)
            .filter(|seq| !keep.contains(seq))
            .collect();
        meta.points.retain(|p| keep.contains(&p.seq));
        phases.mark("hashes");
        record_point(&mut meta, point);
        write_meta(&self.disk, &self.dir, &meta)?;
        self.meta = meta;
        phases.mark("metadata");
        // Deltas of dropped points are merged only after the metadata no longer lists them.
        let kept = self.kept_seqs();
        self.store.compact(self.meta.committed_seq, &kept)?;
        phases.mark("compaction");
        let file = self
            .disk
            .open(&path, OpenMode::Truncate)
            .map_err(StoreError::io("truncating", &path))?;
        file.sync_all().map_err(StoreError::io("syncing", &path))?;
        phases.mark("journal reset");
        tracing::debug!(
            target: "blkmirror receiver",
            "volume {}: cycle {seq} applied: {phases}",
            self.meta.volume
        );
        Ok(())
    }

    /// The chunks a committed journal touches, and its commit record.
    fn journal_chunks(&self) -> Result<(Touched, StoredPoint), StoreError> {
        let path = self.journal_path();
        let file = self
            .disk
            .open(&path, OpenMode::Read)
            .map_err(StoreError::io("opening", &path))?;
        let mut reader = BufReader::with_capacity(4 << 20, Cursor::new(file));
        let mut touched = Touched::default();
        let (chunk_bytes, size) = (self.meta.chunk_bytes, self.meta.size_bytes);
        while let Some(record) = read_record(&mut reader)? {
            match record {
                Record::Begin { .. } | Record::Format { .. } | Record::Holder { .. } => {}
                Record::Write { offset, data } => {
                    touched.add_write(self.store.chunks_of(offset, data.len() as u64));
                }
                Record::Zero { offset, length } => {
                    touched.add_zero(chunk_bytes, size, offset, length);
                }
                commit @ (Record::Commit { .. } | Record::CommitV3 { .. }) => {
                    return Ok((touched, commit.committed().expect("a commit record")));
                }
            }
        }
        Err(StoreError::Meta {
            path,
            message: "journal applied without a commit record".into(),
        })
    }

    fn zero(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        self.image
            .zero_range(offset, length)
            .map_err(StoreError::io("zeroing a range of", &self.image_path()))
    }

    /// Starts replacing this volume's content with a point fetched from elsewhere (the object
    /// store, where another receiver published it): drops an open cycle, the undo deltas and
    /// the points, marks the image as no point in time (durably, before it changes), and
    /// empties it. The chunks then go in with [`Self::write_adopted`], and
    /// [`Self::finish_adopting`] records the point. A crash in between leaves a volume with no
    /// point, which is fetched again.
    pub fn begin_adopting(&mut self) -> Result<(), StoreError> {
        if self.cycle.is_some() {
            self.abort();
        }
        let mut meta = self.meta.clone();
        meta.committed_seq = 0;
        meta.last_point = None;
        meta.last_complete = None;
        meta.recent.clear();
        meta.points.clear();
        meta.unsettled = true;
        meta.unsettled_from = 0;
        write_meta(&self.disk, &self.dir, &meta)?;
        self.meta = meta;
        self.store.clear()?;
        let path = self.image_path();
        self.image
            .set_len(0)
            .and_then(|()| self.image.set_len(self.meta.size_bytes))
            .map_err(StoreError::io("emptying", &path))
    }

    /// Writes fetched content at `offset` of the image (between [`Self::begin_adopting`] and
    /// [`Self::finish_adopting`]).
    pub fn write_adopted(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        if !self.meta.unsettled || offset.saturating_add(data.len() as u64) > self.meta.size_bytes {
            return Err(StoreError::Sequence(format!(
                "volume {}: {} bytes at {offset} do not belong to a point being adopted",
                self.meta.volume,
                data.len()
            )));
        }
        let path = self.image_path();
        let mut done = 0;
        while done < data.len() {
            let n = self
                .image
                .write_at(&data[done..], offset + done as u64)
                .map_err(StoreError::io("writing", &path))?;
            if n == 0 {
                return Err(StoreError::io("writing", &path)(
                    io::ErrorKind::WriteZero.into(),
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// Records the adopted point once its content is in the image: syncs the image, hashes
    /// every chunk, and makes `point` the volume's one point.
    pub fn finish_adopting(&mut self, point: &PointInfo) -> Result<(), StoreError> {
        let path = self.image_path();
        self.image
            .sync_all()
            .map_err(StoreError::io("syncing", &path))?;
        self.store.rehash_all(&*self.image)?;
        let stored = StoredPoint::received(point, point.received_unix_ms);
        let mut meta = self.meta.clone();
        meta.unsettled = false;
        meta.unsettled_from = 0;
        meta.hashes_stale = false;
        meta.points = vec![stored.clone()];
        record_point(&mut meta, stored);
        write_meta(&self.disk, &self.dir, &meta)?;
        self.meta = meta;
        Ok(())
    }

    /// The content of chunk `chunk` of the image (the last chunk may be short), as the
    /// object store is given it.
    pub fn read_chunk(&self, chunk: u64) -> Result<Vec<u8>, StoreError> {
        let chunk_bytes = self.meta.chunk_bytes;
        let offset = chunk * chunk_bytes;
        if offset >= self.meta.size_bytes {
            return Err(StoreError::Sequence(format!(
                "chunk {chunk} is past the end of volume {}",
                self.meta.volume
            )));
        }
        let mut buffer = vec![0u8; chunk_bytes.min(self.meta.size_bytes - offset) as usize];
        self.image
            .read_exact_at(&mut buffer, offset)
            .map_err(StoreError::io("reading", &self.image_path()))?;
        Ok(buffer)
    }

    /// BLAKE3 hashes of `count` chunks of the image starting at `first_chunk`.
    pub fn hashes(&self, first_chunk: u64, count: u32) -> Result<Vec<ChunkHash>, StoreError> {
        let chunk = self.meta.chunk_bytes;
        wire::check_hash_request(first_chunk, count, self.meta.size_bytes.div_ceil(chunk))
            .map_err(|error| StoreError::Sequence(error.to_string()))?;
        let image_path = self.image_path();
        let mut buffer = vec![0u8; chunk as usize];
        (first_chunk..first_chunk + u64::from(count))
            .map(|index| {
                let offset = index * chunk;
                let len = chunk.min(self.meta.size_bytes - offset) as usize;
                self.image
                    .read_exact_at(&mut buffer[..len], offset)
                    .map_err(StoreError::io("reading", &image_path))?;
                Ok(wire::chunk_hash(&buffer[..len]))
            })
            .collect()
    }
}

/// A volume opened to read its points (`points`, `restore`, `verify`), beside a running
/// receiver. Holds the volume's lock shared: the receiver's next commit waits until the reader
/// is done, so the image and the deltas cannot change under it, and no point it reads can be
/// pruned.
pub struct PointReader {
    _lock: LockGuard,
    meta: VolumeMeta,
    image: Box<dyn StoredFile>,
    store: PointStore,
}

impl PointReader {
    /// Opens volume `name` under `data_dir` for reading.
    pub fn open(data_dir: &Path, name: &str) -> Result<Self, StoreError> {
        Self::open_on(&LocalDisk::shared(), data_dir, name)
    }

    /// [`Self::open`] on `disk`.
    pub fn open_on(disk: &Disk, data_dir: &Path, name: &str) -> Result<Self, StoreError> {
        wire::check_volume_name(name).map_err(|error| StoreError::Sequence(error.to_string()))?;
        let dir = Volume::dir_of(data_dir, name);
        if !disk.exists(&dir.join("volume.json")) {
            return Err(StoreError::Sequence(format!(
                "no volume {name:?} in {}",
                data_dir.display()
            )));
        }
        let lock = lock_volume(disk, &dir, true)?;
        let meta = read_meta(disk, &dir)?;
        // A cycle whose commit record is durable but which is not yet applied: the image is
        // between two points (a half-applied image would read as corrupt chunks).
        let journal = dir.join("journal");
        if disk.file_len(&journal).is_ok_and(|len| len > 0) {
            let file = disk
                .open(&journal, OpenMode::Read)
                .map_err(StoreError::io("opening", &journal))?;
            let committed = scan_records(
                BufReader::with_capacity(1 << 20, Cursor::new(file)),
                meta.committed_seq,
            )?;
            if let Some(point) = committed.filter(|p| p.seq > meta.committed_seq) {
                return Err(StoreError::Sequence(format!(
                    "volume {name}: cycle {} is committed but not yet applied to the image; \
                     the receiver applies it (at once if it is running, or when it starts): \
                     retry then",
                    point.seq
                )));
            }
        }
        let image_path = dir.join("image.raw");
        let image = disk
            .open(&image_path, OpenMode::Read)
            .map_err(StoreError::io("opening", &image_path))?;
        let store = PointStore::open(disk, &dir, meta.chunk_bytes, meta.size_bytes)?;
        Ok(Self {
            _lock: lock,
            meta,
            image,
            store,
        })
    }

    /// The metadata.
    pub fn meta(&self) -> &VolumeMeta {
        &self.meta
    }

    /// The retained points, oldest first (none while a sync leaves the image unsettled).
    pub fn points(&self) -> &[StoredPoint] {
        if self.meta.unsettled {
            return &[];
        }
        &self.meta.points
    }

    /// The bytes of the delta that leads back to each retained point (0 for the newest: it is
    /// the image), in the order of [`Self::points`].
    pub fn stored_bytes(&self) -> Result<Vec<u64>, StoreError> {
        let sizes = self.store.delta_sizes()?;
        Ok(self
            .points()
            .iter()
            .map(|p| {
                sizes
                    .iter()
                    .filter(|(delta, _)| delta.to == p.seq)
                    .map(|(_, len)| len)
                    .sum()
            })
            .collect())
    }

    /// Bytes held by all deltas.
    pub fn delta_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.store.delta_sizes()?.iter().map(|(_, len)| len).sum())
    }

    /// The chunks that differ between retained point `seq` and the newest point, as sorted
    /// half-open ranges of chunk indices (from the undo deltas; nothing is read but their
    /// record heads).
    pub fn changed_since(&self, seq: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        if !self.meta.points.iter().any(|p| p.seq == seq) || self.meta.unsettled {
            return Err(StoreError::Sequence(format!(
                "volume {} has no retained point {seq}",
                self.meta.volume
            )));
        }
        Ok(self
            .store
            .map_point(self.meta.committed_seq, seq)?
            .changed_chunks())
    }

    /// Reads point `seq` in device order, checking every chunk (see
    /// [`PointStore::read_point`]).
    pub fn read_point(
        &self,
        seq: u64,
        keep_going: bool,
        sink: impl FnMut(u64, Option<&[u8]>) -> Result<(), PointsError>,
    ) -> Result<Vec<u64>, StoreError> {
        if !self.meta.points.iter().any(|p| p.seq == seq) || self.meta.unsettled {
            return Err(StoreError::Sequence(format!(
                "volume {} has no retained point {seq}",
                self.meta.volume
            )));
        }
        Ok(self
            .store
            .read_point(&*self.image, self.meta.committed_seq, seq, keep_going, sink)?)
    }
}

/// Old bugs the simulator re-introduces to prove it finds them (`crate::sim`); never outside
/// this crate's unit tests.
#[cfg(test)]
use crate::sim::{Bug, bug as reintroduced};

#[cfg(not(test))]
enum Bug {
    DirectBeginAfterHistory,
    StaleHashesAfterAbort,
}

#[cfg(not(test))]
#[inline(always)]
fn reintroduced(_: Bug) -> bool {
    false
}

/// A point's age for retention: by the receiver's clock (an agent's clock is not trusted to
/// decide what is kept; points from before that was recorded got their cut time at upgrade).
fn point_age(point: &StoredPoint) -> PointAge {
    PointAge {
        seq: point.seq,
        time_unix_ms: point.received_unix_ms,
    }
}

/// Reads journal records from `reader` and returns the commit record if the journal is whole
/// and committed on top of cycle `committed_seq` (or is that cycle, applied but not yet
/// emptied). A torn or corrupt record means the cycle never committed. Pure apart from the
/// reading; the fuzz target drives it with arbitrary bytes.
pub fn scan_records(
    mut reader: impl io::Read,
    committed_seq: u64,
) -> Result<Option<StoredPoint>, StoreError> {
    let mut expect_begin = true;
    let mut first = true;
    // A `Holder` record is only right after `Begin`.
    let mut holder_allowed = false;
    loop {
        let record = match read_record(&mut reader) {
            Ok(Some(record)) => record,
            Ok(None) | Err(_) => return Ok(None),
        };
        let at_start = std::mem::replace(&mut first, false);
        match record {
            Record::Format { version } if at_start && version <= JOURNAL_FORMAT => {}
            Record::Format { version } if at_start => {
                // Never discard what a newer release committed: refuse to touch it.
                return Err(StoreError::Sequence(format!(
                    "the journal is in format {version}, newer than this build reads \
                     ({JOURNAL_FORMAT}); run the newer release"
                )));
            }
            Record::Begin { seq }
                if expect_begin
                    && (seq == committed_seq.saturating_add(1) || seq == committed_seq) =>
            {
                expect_begin = false;
                holder_allowed = true;
            }
            Record::Holder { .. } if std::mem::replace(&mut holder_allowed, false) => {}
            Record::Write { .. } | Record::Zero { .. } if !expect_begin => {
                holder_allowed = false;
            }
            commit @ (Record::Commit { .. } | Record::CommitV3 { .. }) if !expect_begin => {
                return Ok(commit.committed());
            }
            _ => return Ok(None),
        }
    }
}

/// An uncommitted journal's cycle, as [`scan_open_cycle`] finds it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OpenJournal {
    pub seq: u64,
    /// The agent that began the cycle.
    pub holder: String,
    /// Whole data frames, and the bytes of the journal up to the end of the last whole record.
    pub frames: u64,
    pub whole_bytes: u64,
    /// Data bytes journaled, counted as [`Volume::journal`] counts them.
    pub bytes: u64,
    /// The byte ranges the frames cover: all of them, those written, and those zeroed (each
    /// zero range as journaled, not merged: two that each cover part of a chunk leave it
    /// rewritten, not zeroed, as they did when they were journaled).
    pub journaled: ChunkRanges,
    pub written: ChunkRanges,
    pub zeroed: Vec<(u64, u64)>,
}

/// Reads an uncommitted journal of cycle `committed_seq + 1` from `reader`, up to its first
/// torn or corrupt record, for a restarted receiver to keep it open. `None` unless it begins
/// that cycle and names its agent (`Holder`, format 4), or when it is committed (replayed
/// instead), in a newer format, or holds a frame outside a volume of `size` bytes. Pure apart
/// from the reading; the fuzz target drives it with arbitrary bytes.
pub fn scan_open_cycle(
    mut reader: impl io::Read,
    committed_seq: u64,
    size: u64,
) -> Option<OpenJournal> {
    let mut found = OpenJournal::default();
    let mut at = 0u64;
    let mut expect = 0u8; // 0: Format, 1: Begin, 2: Holder, 3: frames
    while let Ok(Some((record, len))) = read_sized_record(&mut reader) {
        match (expect, record) {
            (0, Record::Format { version }) if (4..=JOURNAL_FORMAT).contains(&version) => {}
            (1, Record::Begin { seq }) if Some(seq) == committed_seq.checked_add(1) => {
                found.seq = seq;
            }
            (2, Record::Holder { agent }) => found.holder = agent,
            (3, Record::Write { offset, data }) => {
                let end = offset
                    .checked_add(data.len() as u64)
                    .filter(|&end| end <= size)?;
                found.bytes += data.len() as u64;
                found.journaled.insert(offset, end);
                found.written.insert(offset, end);
                found.frames += 1;
            }
            (3, Record::Zero { offset, length }) => {
                let end = offset.checked_add(length).filter(|&end| end <= size)?;
                found.bytes += ZERO_RECORD_BYTES;
                found.journaled.insert(offset, end);
                found.zeroed.push((offset, end));
                found.frames += 1;
            }
            // A commit record: the journal is for replay, not for keeping.
            (3, Record::Commit { .. } | Record::CommitV3 { .. }) => return None,
            _ => return None,
        }
        expect = (expect + 1).min(3);
        at += len;
        found.whole_bytes = at;
    }
    (expect == 3).then_some(found)
}

/// Records a committed point in the metadata.
fn record_point(meta: &mut VolumeMeta, point: StoredPoint) {
    meta.committed_seq = point.seq;
    if point.complete {
        meta.last_complete = Some(point.clone());
    }
    meta.last_point = Some(point.clone());
    if meta.recent.last().map(|p| p.seq) != Some(point.seq) {
        meta.recent.push(point);
    }
    if meta.recent.len() > RECENT_POINTS {
        let excess = meta.recent.len() - RECENT_POINTS;
        meta.recent.drain(..excess);
    }
}

fn record_checksum(body: &[u8]) -> [u8; 8] {
    blake3::hash(body).as_bytes()[..8]
        .try_into()
        .expect("8 bytes")
}

fn append(writer: &mut BufWriter<Cursor>, record: &Record, path: &Path) -> Result<(), StoreError> {
    let (head, body) = encode_record(record);
    writer
        .write_all(&head)
        .and_then(|()| writer.write_all(&body))
        .map_err(StoreError::io("writing", path))
}

/// A record's journal encoding: its head (length, checksum) and its body.
fn encode_record(record: &Record) -> ([u8; 12], Vec<u8>) {
    let body = postcard::to_stdvec(record).expect("serializing to a Vec cannot fail");
    let mut head = [0u8; 12];
    head[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    head[4..].copy_from_slice(&record_checksum(&body));
    (head, body)
}

/// Appends `record`'s journal encoding to `bytes` (the tests' journals).
#[cfg(test)]
fn append_bytes(bytes: &mut Vec<u8>, record: &Record) {
    let (head, body) = encode_record(record);
    bytes.extend_from_slice(&head);
    bytes.extend_from_slice(&body);
}

/// Reads one record; `Ok(None)` at a clean end of file.
fn read_record(reader: &mut impl io::Read) -> Result<Option<Record>, StoreError> {
    read_sized_record(reader).map(|record| record.map(|(record, _)| record))
}

/// [`read_record`], with the bytes the record takes in the journal.
fn read_sized_record(reader: &mut impl io::Read) -> Result<Option<(Record, u64)>, StoreError> {
    let corrupt = |message: &str| StoreError::Meta {
        path: PathBuf::from("journal"),
        message: message.to_owned(),
    };
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        match reader.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(corrupt("torn record header")),
            Ok(n) => got += n,
            Err(error) => return Err(corrupt(&error.to_string())),
        }
    }
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    if len > MAX_RECORD {
        return Err(corrupt("record length over the limit"));
    }
    let mut body = vec![0u8; len as usize];
    reader
        .read_exact(&mut body)
        .map_err(|_| corrupt("torn record"))?;
    if record_checksum(&body) != head[4..] {
        return Err(corrupt("record checksum mismatch"));
    }
    postcard::from_bytes(&body)
        .map(|record| Some((record, head.len() as u64 + u64::from(len))))
        .map_err(|error| corrupt(&error.to_string()))
}

/// The folder of a volume's pins: `pins/SEQ-TAG`, one file per holder (an export), each locked
/// shared by the process that holds the point. Retention keeps a pinned point; the receiver
/// reads the pins under the volume's exclusive lock, and a holder makes its pin under the
/// shared one, so a pin never appears while the receiver prunes.
pub const PINS_DIR: &str = "pins";

/// The points pinned by live holders. A pin file whose holder is gone (no lock on it: the
/// process died) is removed. A failover's export pins its point for as long as its overlay is
/// kept (until its failback, or a new failover with `--force`): after a `reprotect` the
/// receiver commits again, and the overlay's writes are worthless without their point.
fn pinned_points(disk: &Disk, dir: &Path) -> BTreeSet<u64> {
    let pins = dir.join(PINS_DIR);
    let mut pinned = BTreeSet::new();
    if disk.exists(&dir.join(crate::dr::failback::PROMOTED_EXPORT_DIR))
        && let Ok(Some(promoted)) = crate::dr::failback::read_promoted(disk, dir)
        && promoted.export
    {
        pinned.insert(promoted.seq);
    }
    if !disk.exists(&pins) {
        return pinned;
    }
    let names = match disk.list(&pins) {
        Ok(names) => names,
        Err(error) => {
            tracing::warn!(
                target: "blkmirror receiver",
                "listing the pins in {}: {error}; no point is held for an export this time",
                pins.display()
            );
            return pinned;
        }
    };
    for name in names {
        let Some(seq) = name.split('-').next().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        let path = pins.join(&name);
        match disk.is_locked(&path) {
            Ok(true) => {
                pinned.insert(seq);
            }
            Ok(false) => {
                // Its holder died without removing it.
                let _ = disk.remove_file(&path);
            }
            Err(error) => tracing::warn!(
                target: "blkmirror receiver",
                "checking the pin {}: {error}",
                path.display()
            ),
        }
    }
    pinned
}

/// A point held against retention for as long as this value lives (`blkmirror export`).
pub struct PointPin {
    path: PathBuf,
    disk: Disk,
    _lock: LockGuard,
}

impl PointPin {
    /// Pins point `seq` of the volume in `dir`. The caller holds the volume's lock (shared)
    /// and has checked that the point is retained.
    pub(crate) fn take(disk: &Disk, dir: &Path, seq: u64) -> Result<Self, StoreError> {
        let pins = dir.join(PINS_DIR);
        disk.create_dir_all(&pins)
            .map_err(StoreError::io("creating", &pins))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = pins.join(format!("{seq}-{}-{nanos}", std::process::id()));
        let lock = disk
            .lock(&path, true)
            .map_err(StoreError::io("locking", &path))?;
        Ok(Self {
            path,
            disk: disk.clone(),
            _lock: lock,
        })
    }
}

impl Drop for PointPin {
    fn drop(&mut self) {
        let _ = self.disk.remove_file(&self.path);
    }
}

/// Opens and locks `DIR/lock` (shared for readers of points, exclusive for the receiver while
/// it changes the image or the deltas). The lock goes with the returned file.
pub(crate) fn lock_volume(disk: &Disk, dir: &Path, shared: bool) -> Result<LockGuard, StoreError> {
    let path = dir.join("lock");
    disk.lock(&path, shared)
        .map_err(StoreError::io("locking", &path))
}

pub(crate) fn read_meta(disk: &Disk, dir: &Path) -> Result<VolumeMeta, StoreError> {
    let path = dir.join("volume.json");
    let bytes = disk.read(&path).map_err(StoreError::io("reading", &path))?;
    let text = String::from_utf8(bytes).map_err(|_| StoreError::Meta {
        path: path.clone(),
        message: "not UTF-8 text".into(),
    })?;
    parse_meta(&text).map_err(|message| StoreError::Meta { path, message })
}

/// Parses and checks `volume.json`: a damaged or planted file is refused with what is wrong,
/// never trusted into a division by zero or an allocation of its own choosing. Pure; the fuzz
/// target drives it with arbitrary text.
pub fn parse_meta(text: &str) -> Result<VolumeMeta, String> {
    let mut meta: VolumeMeta = serde_json::from_str(text).map_err(|error| error.to_string())?;
    match meta.format {
        1 => {
            // The points of format 1 lack a receive time when they predate it.
            for point in meta
                .points
                .iter_mut()
                .chain(meta.recent.iter_mut())
                .chain(meta.last_point.iter_mut())
                .chain(meta.last_complete.iter_mut())
            {
                point.upgrade_from_v1();
            }
            meta.upgraded_from = Some(1);
            meta.format = META_FORMAT;
        }
        META_FORMAT => {}
        newer => {
            return Err(format!(
                "format {newer} is newer than this build reads ({META_FORMAT}); run the newer \
                 release"
            ));
        }
    }
    wire::check_volume_name(&meta.volume).map_err(|error| error.to_string())?;
    wire::check_hello(&Hello {
        protocol: wire::PROTOCOL_VERSION,
        volume: meta.volume.clone(),
        source_id: meta.source_id.clone(),
        size_bytes: meta.size_bytes,
        chunk_bytes: meta.chunk_bytes,
    })
    .map_err(|error| error.to_string())?;
    if meta
        .points
        .windows(2)
        .any(|pair| pair[0].seq >= pair[1].seq)
        || meta
            .points
            .last()
            .is_some_and(|p| p.seq > meta.committed_seq)
    {
        return Err(format!(
            "the points are not in order below the committed cycle {}",
            meta.committed_seq
        ));
    }
    if meta.unsettled_from > meta.size_bytes {
        return Err(format!(
            "unsettled_from {} is beyond the volume's {} bytes",
            meta.unsettled_from, meta.size_bytes
        ));
    }
    Ok(meta)
}

fn write_meta(disk: &Disk, dir: &Path, meta: &VolumeMeta) -> Result<(), StoreError> {
    let path = dir.join("volume.json");
    let text = serde_json::to_string_pretty(meta).expect("metadata serializes");
    disk.write_atomic(&path, text.as_bytes())
        .map_err(StoreError::io("writing", &path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        testing::{TempDir, volume_hello as hello},
        tracker::sys,
    };
    use std::fs::{self, File};

    fn now_ms() -> u64 {
        system_clock()()
    }

    fn write(offset: u64, byte: u8, len: usize) -> CheckedData {
        CheckedData::Write {
            offset,
            data: vec![byte; len],
        }
    }

    fn image(dir: &Path) -> Vec<u8> {
        fs::read(dir.join("v/image.raw")).unwrap()
    }

    #[test]
    fn an_open_journaled_cycle_reports_what_it_holds_and_resumes() {
        let tmp = TempDir::new("resume");
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
        volume.begin(1, 8192, false, 0).unwrap();
        assert_eq!(volume.open_cycle_report(), None, "nothing journaled yet");
        volume.journal(write(4096, 1, 4096)).unwrap();
        volume.journal(write(0, 2, 4096)).unwrap();
        volume
            .journal(CheckedData::Zero {
                offset: 16384,
                length: 512,
            })
            .unwrap();
        let report = volume.open_cycle_report().unwrap();
        assert_eq!(report.seq, 1);
        assert_eq!(report.frames, 3);
        assert_eq!(report.journaled, vec![(0, 8192), (16384, 512)]);
        report.check(volume.meta().size_bytes).unwrap();
        assert!(matches!(volume.resume(2), Err(StoreError::Sequence(_))));
        assert_eq!(volume.resume(1).unwrap(), 3);
        // The resumed cycle goes on where it was, and its journal applies in order.
        volume.journal(write(0, 3, 512)).unwrap();
        volume
            .commit(PointInfo {
                complete: true,
                ..PointInfo::default()
            })
            .unwrap();
        let data = image(&tmp.0);
        assert_eq!(data[..512], [3; 512]);
        assert_eq!(data[512..4096], [2; 3584]);
        assert_eq!(data[4096..8192], [1; 4096]);
        assert_eq!(volume.open_cycle_report(), None);
        assert!(matches!(volume.resume(1), Err(StoreError::Sequence(_))));
        // A new Begin abandons an open cycle: nothing of it is reported or applied.
        volume.begin(2, 0, false, 0).unwrap();
        volume.journal(write(0, 9, 512)).unwrap();
        volume.begin(2, 0, false, 0).unwrap();
        assert_eq!(volume.open_cycle_report(), None);
    }

    /// The agent of the tests' kept cycles.
    const HOLDER: &str = "aa11bb22";

    #[test]
    fn a_restarted_receiver_keeps_an_interrupted_cycle_for_its_agent_to_resume() {
        let tmp = TempDir::new("kept");
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
        volume.begin_held(1, 8192, false, 0, Some(HOLDER)).unwrap();
        volume.journal(write(4096, 1, 4096)).unwrap();
        volume.journal(write(0, 2, 4096)).unwrap();
        volume
            .journal(CheckedData::Zero {
                offset: 16384,
                length: 512,
            })
            .unwrap();
        volume.write_out_journal().unwrap();
        // A frame still in the journal's buffer when the process dies is lost with it.
        volume.journal(write(65536, 4, 4096)).unwrap();
        let before = volume.open_cycle_report().unwrap();
        assert_eq!(before.frames, 4);
        let path = volume.journal_path();
        volume.die();
        // The death tore a record: half of a frame made it to the file.
        let whole = fs::metadata(&path).unwrap().len();
        let mut torn = Vec::new();
        append_bytes(
            &mut torn,
            &Record::Write {
                offset: 0,
                data: vec![8; 4096],
            },
        );
        let mut file = fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&torn[..torn.len() / 2]).unwrap();
        drop(file);

        let (volume, recovery) = Volume::open(&tmp.0, "v").unwrap();
        assert_eq!(recovery, Recovery::Kept { seq: 1, frames: 3 });
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            whole,
            "the torn tail is cut off"
        );
        assert_eq!(volume.open_cycle_holder(), Some(HOLDER));
        let report = volume.open_cycle_report().unwrap();
        assert_eq!((report.seq, report.frames), (1, 3));
        assert_eq!(report.journaled, vec![(0, 8192), (16384, 512)]);
        // Opened again (the receiver's start-up, then the agent's connection): the same.
        drop(volume);
        let (mut volume, recovery) = Volume::open(&tmp.0, "v").unwrap();
        assert_eq!(recovery, Recovery::Kept { seq: 1, frames: 3 });
        // The agent resumes and sends what the report did not hold; the journal applies in
        // order, and the zeroed range is zeroed.
        assert_eq!(volume.resume(1).unwrap(), 3);
        volume.journal(write(65536, 4, 4096)).unwrap();
        volume.journal(write(0, 3, 512)).unwrap();
        volume
            .commit(PointInfo {
                complete: true,
                ..PointInfo::default()
            })
            .unwrap();
        assert_eq!(volume.meta().committed_seq, 1);
        let data = image(&tmp.0);
        assert_eq!(data[..512], [3; 512]);
        assert_eq!(data[512..4096], [2; 3584]);
        assert_eq!(data[4096..8192], [1; 4096]);
        assert_eq!(data[65536..69632], [4; 4096]);
        // The point's hashes cover what the reopened cycle touched before the restart too.
        let stored = volume.hashes(0, 2).unwrap();
        let mut chunk = data[..65536].to_vec();
        assert_eq!(stored[0], *blake3::hash(&chunk).as_bytes());
        chunk.copy_from_slice(&data[65536..131072]);
        assert_eq!(stored[1], *blake3::hash(&chunk).as_bytes());
    }

    #[test]
    fn a_journal_that_names_no_agent_holds_no_frame_or_was_failed_over_is_not_kept() {
        let tmp = TempDir::new("unkept");
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
        // Begun without an agent (as by a build before format 4): discarded.
        volume.begin(1, 0, false, 0).unwrap();
        volume.journal(write(0, 9, 4096)).unwrap();
        volume.write_out_journal().unwrap();
        drop(volume);
        let (mut volume, recovery) = Volume::open(&tmp.0, "v").unwrap();
        assert_eq!(recovery, Recovery::Discarded);
        // Begun by an agent, but nothing journaled: nothing to resume.
        volume.begin_held(1, 0, false, 0, Some(HOLDER)).unwrap();
        volume.write_out_journal().unwrap();
        drop(volume);
        let (mut volume, recovery) = Volume::open(&tmp.0, "v").unwrap();
        assert_eq!(recovery, Recovery::Discarded);
        assert_eq!(volume.open_cycle_report(), None);
        // Begun by an agent with a frame, but the DR site failed over meanwhile: the cycle
        // can never commit, so it is not kept.
        volume.begin_held(1, 0, false, 0, Some(HOLDER)).unwrap();
        volume.journal(write(0, 9, 4096)).unwrap();
        volume.write_out_journal().unwrap();
        volume.die();
        let dir = Volume::dir_of(&tmp.0, "v");
        let disk = LocalDisk::shared();
        let promoted = authority::read(&disk, &dir)
            .unwrap()
            .failover(1, "/f", "u", 5, false)
            .unwrap();
        authority::write(&disk, &dir, &promoted).unwrap();
        let (volume, recovery) = Volume::open(&tmp.0, "v").unwrap();
        assert_eq!(recovery, Recovery::Discarded);
        assert_eq!(volume.open_cycle_report(), None);
        assert_eq!(image(&tmp.0)[..4096], [0; 4096]);
    }

    #[test]
    fn the_scan_of_an_open_journal_takes_only_its_own_cycle() {
        let record = |records: &[Record]| {
            let mut bytes = Vec::new();
            for record in records {
                append_bytes(&mut bytes, record);
            }
            bytes
        };
        let format = Record::Format { version: 4 };
        let begin = Record::Begin { seq: 6 };
        let holder = Record::Holder {
            agent: HOLDER.into(),
        };
        let frame = Record::Write {
            offset: 512,
            data: vec![1; 512],
        };
        let open = record(&[format.clone(), begin.clone(), holder.clone(), frame.clone()]);
        let found = scan_open_cycle(&open[..], 5, 1 << 20).unwrap();
        assert_eq!(
            (found.seq, found.frames, found.whole_bytes),
            (6, 1, open.len() as u64)
        );
        assert_eq!(found.holder, HOLDER);
        // Another cycle than the next; a commit record (replayed instead); no agent; a frame
        // past the volume's end; an older format: none is kept.
        assert_eq!(scan_open_cycle(&open[..], 6, 1 << 20), None);
        let committed = record(&[
            format.clone(),
            begin.clone(),
            holder.clone(),
            frame.clone(),
            Record::CommitV3 {
                point: StoredPoint {
                    seq: 6,
                    ..StoredPoint::default()
                },
            },
        ]);
        assert_eq!(scan_open_cycle(&committed[..], 5, 1 << 20), None);
        let anonymous = record(&[format.clone(), begin.clone(), frame.clone()]);
        assert_eq!(scan_open_cycle(&anonymous[..], 5, 1 << 20), None);
        assert_eq!(scan_open_cycle(&open[..], 5, 768), None);
        let older = record(&[Record::Format { version: 3 }, begin, holder, frame]);
        assert_eq!(scan_open_cycle(&older[..], 5, 1 << 20), None);
        // A Holder record anywhere but right after Begin makes a journal unreadable.
        assert!(scan_records(&open[..], 5).unwrap().is_none());
        let late = record(&[
            format,
            Record::Begin { seq: 6 },
            Record::Write {
                offset: 0,
                data: vec![2; 512],
            },
            Record::Holder {
                agent: HOLDER.into(),
            },
            Record::CommitV3 {
                point: StoredPoint {
                    seq: 6,
                    ..StoredPoint::default()
                },
            },
        ]);
        assert!(scan_records(&late[..], 5).unwrap().is_none());
        let mut proper = open.clone();
        append_bytes(
            &mut proper,
            &Record::CommitV3 {
                point: StoredPoint {
                    seq: 6,
                    ..StoredPoint::default()
                },
            },
        );
        assert_eq!(scan_records(&proper[..], 5).unwrap().unwrap().seq, 6);
    }

    #[test]
    fn committed_cycles_apply_in_journal_order() {
        let tmp = TempDir::new("order");
        let (mut volume, new, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
        assert!(new);
        volume.begin(1, 8192, false, 0).unwrap();
        volume.journal(write(0, 1, 8192)).unwrap();
        volume.journal(write(4096, 2, 4096)).unwrap();
        volume
            .journal(CheckedData::Zero {
                offset: 0,
                length: 512,
            })
            .unwrap();
        assert_eq!(image(&tmp.0)[..8192], [0; 8192]);
        volume
            .commit(PointInfo {
                complete: true,
                ..PointInfo::default()
            })
            .unwrap();
        let data = image(&tmp.0);
        assert_eq!(data[..512], [0; 512]);
        assert_eq!(data[512..4096], [1; 3584]);
        assert_eq!(data[4096..8192], [2; 4096]);
        assert_eq!(volume.meta().committed_seq, 1);
        assert!(
            volume.begin(3, 0, false, 0).is_err(),
            "cycles must be consecutive"
        );
    }

    #[test]
    fn uncommitted_journal_is_discarded_and_committed_one_replayed() {
        let tmp = TempDir::new("recover");
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
        volume.begin(1, 0, false, 0).unwrap();
        volume.journal(write(0, 9, 4096)).unwrap();
        // Simulate a crash before commit: flush the buffered journal, then drop.
        volume
            .cycle
            .as_mut()
            .unwrap()
            .writer
            .as_mut()
            .unwrap()
            .flush()
            .unwrap();
        drop(volume);
        let (volume, recovery) = Volume::open(&tmp.0, "v").unwrap();
        assert_eq!(recovery, Recovery::Discarded);
        assert_eq!(volume.meta().committed_seq, 0);
        assert_eq!(image(&tmp.0)[..4096], [0; 4096]);
        drop(volume);

        // A crash after the commit record is durable but before apply: replayed at open.
        let (mut volume, _) = Volume::open(&tmp.0, "v").unwrap();
        volume.begin(1, 0, false, 0).unwrap();
        volume.journal(write(0, 7, 4096)).unwrap();
        let path = volume.journal_path();
        let mut cycle = volume.cycle.take().unwrap();
        let mut writer = cycle.writer.take().unwrap();
        append(
            &mut writer,
            &Record::CommitV3 {
                point: StoredPoint {
                    seq: 1,
                    ..StoredPoint::default()
                },
            },
            &path,
        )
        .unwrap();
        writer.flush().unwrap();
        drop(writer);
        drop(volume);
        let (volume, recovery) = Volume::open(&tmp.0, "v").unwrap();
        assert_eq!(recovery, Recovery::Replayed(1));
        assert_eq!(volume.meta().committed_seq, 1);
        assert_eq!(image(&tmp.0)[..4096], [7; 4096]);
    }

    #[test]
    fn torn_or_corrupt_journal_is_discarded() {
        let tmp = TempDir::new("torn");
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
        volume.begin(1, 0, false, 0).unwrap();
        volume.journal(write(0, 5, 4096)).unwrap();
        volume.commit(PointInfo::default()).unwrap();
        volume.begin(2, 0, false, 0).unwrap();
        volume.journal(write(0, 6, 4096)).unwrap();
        let path = volume.journal_path();
        let mut cycle = volume.cycle.take().unwrap();
        let mut writer = cycle.writer.take().unwrap();
        append(
            &mut writer,
            &Record::CommitV3 {
                point: StoredPoint::default(),
            },
            &path,
        )
        .unwrap();
        writer.flush().unwrap();
        drop(writer);
        drop(volume);
        // Flip one byte of the data record: the checksum catches it.
        let mut bytes = fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let (volume, recovery) = Volume::open(&tmp.0, "v").unwrap();
        assert_eq!(recovery, Recovery::Discarded);
        assert_eq!(volume.meta().committed_seq, 1);
        assert_eq!(image(&tmp.0)[..4096], [5; 4096]);
    }

    fn complete() -> PointInfo {
        PointInfo {
            complete: true,
            ..PointInfo::default()
        }
    }

    fn step(synced_to: u64) -> PointInfo {
        PointInfo {
            synced_to,
            ..PointInfo::default()
        }
    }

    /// Reads every retained point back, checking each chunk; returns the corrupt offsets.
    fn verify_all(dir: &Path) -> Vec<u64> {
        let reader = PointReader::open(dir, "v").unwrap();
        let mut bad = Vec::new();
        for point in reader.points() {
            bad.extend(reader.read_point(point.seq, true, |_, _| Ok(())).unwrap());
        }
        bad
    }

    #[test]
    fn direct_sync_steps_write_the_image_and_mark_it_unsettled_until_committed() {
        let tmp = TempDir::new("direct");
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
        volume.begin(1, 0, true, 0).unwrap();
        volume.journal(write(0, 1, 4096)).unwrap();
        volume.commit(step(65536)).unwrap();
        // The next step starts and the receiver dies half-way.
        volume.begin(2, 0, true, 65536).unwrap();
        volume.journal(write(65536, 2, 4096)).unwrap();
        assert_eq!(
            image(&tmp.0)[65536..65536 + 4096],
            [2; 4096],
            "written straight through"
        );
        drop(volume);
        let (volume, recovery) = Volume::open(&tmp.0, "v").unwrap();
        assert_eq!(recovery, Recovery::Clean);
        assert!(volume.meta().unsettled);
        assert!(
            volume.meta().hashes_stale,
            "what the cut-off step wrote is unknown"
        );
        assert_eq!(volume.meta().committed_seq, 1);
        let reported = volume.last_point_for_agent().unwrap();
        assert!(!reported.complete, "an unsettled image is no point in time");
        assert_eq!(
            reported.synced_to, 65536,
            "resume where the cut-off step began"
        );
        drop(volume);
        let (mut volume, _) = Volume::open(&tmp.0, "v").unwrap();
        volume.begin(2, 0, true, 65536).unwrap();
        volume.journal(write(65536, 3, 4096)).unwrap();
        volume.commit(step(1 << 20)).unwrap();
        assert!(!volume.meta().unsettled);
        let last = volume.last_point_for_agent().unwrap();
        assert!(!last.complete, "a sync step is never a complete point");
        assert_eq!(last.synced_to, 1 << 20);
        volume.begin(3, 0, false, 0).unwrap();
        volume.commit(complete()).unwrap();
        assert!(
            !volume.meta().hashes_stale,
            "rehashed before the first point"
        );
        drop(volume);
        assert_eq!(verify_all(&tmp.0), Vec::<u64>::new());
    }

    /// Finding 1 of the hardening issue: a direct `Begin` wiped every point.
    #[test]
    fn a_direct_begin_cannot_touch_a_volume_with_history() {
        let tmp = TempDir::new("wipe");
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
        for (seq, byte) in [(1, 1u8), (2, 2), (3, 3)] {
            volume.begin(seq, 0, false, 0).unwrap();
            volume.journal(write(0, byte, 4096)).unwrap();
            volume.commit(complete()).unwrap();
        }
        assert_eq!(volume.meta().points.len(), 3);
        let error = volume.begin(4, 0, true, 0).unwrap_err();
        assert!(matches!(error, StoreError::Refused(_)), "{error}");
        assert!(volume.open_cycle().is_none());
        // A verify sync is a journaled cycle like any other, with `complete: false`; after it
        // the volume still has its history and still refuses direct steps.
        volume.begin(4, 0, false, 0).unwrap();
        volume.journal(write(0, 4, 4096)).unwrap();
        volume.commit(step(1 << 20)).unwrap();
        assert!(volume.has_history());
        assert!(volume.begin(5, 0, true, 0).is_err());
        drop(volume);
        let reader = PointReader::open(&tmp.0, "v").unwrap();
        assert_eq!(
            reader.points().iter().map(|p| p.seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        for (seq, byte) in [(1u64, 1u8), (2, 2), (3, 3)] {
            let mut first = Vec::new();
            reader
                .read_point(seq, false, |offset, data| {
                    if offset == 0 {
                        first = data.map(<[u8]>::to_vec).unwrap_or_default();
                    }
                    Ok(())
                })
                .unwrap();
            assert_eq!(first[..4096], [byte; 4096], "point {seq}");
        }
        drop(reader);
        assert_eq!(verify_all(&tmp.0), Vec::<u64>::new());
    }

    /// Finding 2: chunks written by an interrupted direct step and skipped on resume (they
    /// already matched) kept their old hashes, so verify and restore called good data corrupt.
    #[test]
    fn an_interrupted_direct_step_leaves_no_stale_hash() {
        for crash in [false, true] {
            let tmp = TempDir::new("stale");
            let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
            volume.begin(1, 0, true, 0).unwrap();
            for chunk in 0..4u64 {
                volume
                    .journal(write(chunk * 65536, chunk as u8 + 1, 65536))
                    .unwrap();
            }
            if crash {
                // The receiver dies: nothing of the step's bookkeeping survives.
                drop(volume);
                volume = Volume::open(&tmp.0, "v").unwrap().0;
            } else {
                // The link drops: the receiver aborts the open cycle.
                volume.abort();
            }
            // The resumed step finds chunks 0-3 matching and sends only chunk 4.
            volume.begin(1, 0, true, 0).unwrap();
            volume.journal(write(4 * 65536, 9, 65536)).unwrap();
            volume.commit(step(1 << 20)).unwrap();
            volume.begin(2, 0, false, 0).unwrap();
            volume.commit(complete()).unwrap();
            drop(volume);
            assert_eq!(verify_all(&tmp.0), Vec::<u64>::new(), "crash: {crash}");
        }
    }

    /// Finding 3: after an aborted direct step, journaled cycles were acknowledged but never
    /// became points, and the resume offset was the previous sync's end.
    #[test]
    fn an_unsettled_image_refuses_journaled_cycles_and_resumes_where_the_step_began() {
        let tmp = TempDir::new("unsettled");
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
        volume.begin(1, 0, true, 0).unwrap();
        volume.journal(write(0, 1, 4096)).unwrap();
        volume.commit(step(1 << 20)).unwrap();
        // A second sync pass (the tracker lost history) starts again at 0 and is cut off.
        volume.begin(2, 0, true, 0).unwrap();
        volume.journal(write(0, 2, 4096)).unwrap();
        volume.abort();
        assert_eq!(volume.last_point_for_agent().unwrap().synced_to, 0);
        let error = volume.begin(2, 0, false, 0).unwrap_err();
        assert!(matches!(error, StoreError::Refused(_)), "{error}");
        assert!(volume.meta().points.is_empty());
    }

    /// Finding 4: one `Zero` frame over a huge volume built a set of every chunk and rehashed
    /// each under the lock (1.39 GB from a 62-byte journal), at commit and again at replay.
    #[test]
    fn a_zero_frame_over_a_huge_volume_costs_what_the_image_holds() {
        let tmp = TempDir::new("huge");
        let mut big = hello();
        big.size_bytes = 256 << 30;
        big.chunk_bytes = 4096;
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &big).unwrap();
        volume.begin(1, 0, false, 0).unwrap();
        volume.journal(write(1 << 30, 7, 8192)).unwrap();
        volume.commit(complete()).unwrap();
        volume.begin(2, 0, false, 0).unwrap();
        volume
            .journal(CheckedData::Zero {
                offset: 0,
                length: 256 << 30,
            })
            .unwrap();
        let cycle = volume.cycle.as_ref().unwrap();
        assert_eq!(cycle.touched.zeroed.ranges().count(), 1);
        assert!(cycle.touched.rewritten.is_empty());
        // Only the two chunks that hold data need their old content kept.
        assert_eq!(volume.capture_set(&cycle.touched).unwrap().count(), 2);
        // Crash after the commit record: the replay at open does the same bounded work.
        let path = volume.journal_path();
        let mut cycle = volume.cycle.take().unwrap();
        let mut writer = cycle.writer.take().unwrap();
        let point = StoredPoint::received(
            &PointInfo {
                seq: 2,
                ..complete()
            },
            1,
        );
        append(&mut writer, &Record::CommitV3 { point }, &path).unwrap();
        writer.flush().unwrap();
        drop(writer);
        drop(volume);
        let (volume, recovery) = Volume::open(&tmp.0, "v").unwrap();
        assert_eq!(recovery, Recovery::Replayed(2));
        assert_eq!(volume.meta().points.len(), 2);
        let image = File::open(volume.image_path()).unwrap();
        assert!(sys::data_segments(&image, 0, 256 << 30).unwrap().is_empty());
        drop(volume);
        // The delta back to point 1 holds exactly the two data chunks (header, two records
        // of 48 + 4096 bytes, trailer). Reading the point back would read 256 GiB; the unit
        // tests of `points` prove that deltas restore.
        let reader = PointReader::open(&tmp.0, "v").unwrap();
        assert_eq!(reader.delta_bytes().unwrap(), 40 + 2 * (48 + 4096) + 48);
    }

    /// Point `seq` of volume `v` in `dir`, read back whole.
    fn point_bytes(dir: &Path, seq: u64) -> Vec<u8> {
        let reader = PointReader::open(dir, "v").unwrap();
        let mut out = vec![0u8; reader.meta().size_bytes as usize];
        let bad = reader
            .read_point(seq, false, |offset, data| {
                if let Some(data) = data {
                    out[offset as usize..offset as usize + data.len()].copy_from_slice(data);
                }
                Ok(())
            })
            .unwrap();
        assert!(bad.is_empty(), "point {seq}: corrupt chunks {bad:?}");
        out
    }

    /// The temporary files in the volume's points directory.
    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir.join("v/points"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("tmp-"))
            .collect()
    }

    #[test]
    fn the_undo_delta_is_captured_while_the_frames_arrive() {
        let tmp = TempDir::new("precapture");
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
        volume.begin(1, 0, false, 0).unwrap();
        assert!(
            volume.cycle.as_ref().unwrap().undo.is_none(),
            "no point yet: no history to keep"
        );
        volume.journal(write(0, 1, 1 << 20)).unwrap();
        volume.commit(complete()).unwrap();
        let first = vec![1u8; 1 << 20];
        // Chunk 0 written twice, chunk 3 in part, chunks 8 and 9 zeroed.
        volume.begin(2, 0, false, 0).unwrap();
        volume.journal(write(0, 2, 65536)).unwrap();
        volume.journal(write(4096, 3, 4096)).unwrap();
        volume.journal(write(3 * 65536 + 100, 4, 1000)).unwrap();
        volume
            .journal(CheckedData::Zero {
                offset: 8 * 65536,
                length: 2 * 65536,
            })
            .unwrap();
        let undo = volume.cycle.as_ref().unwrap().undo.as_ref().unwrap();
        assert_eq!(
            undo.captured().ranges().collect::<Vec<_>>(),
            [(0, 1), (3, 4)],
            "the written chunks are captured as they arrive, each once; zeroed ones at the commit"
        );
        volume.commit(complete()).unwrap();
        assert_eq!(leftovers(&tmp.0), Vec::<String>::new());
        let mut second = first.clone();
        second[..65536].fill(2);
        second[4096..8192].fill(3);
        second[3 * 65536 + 100..3 * 65536 + 1100].fill(4);
        second[8 * 65536..10 * 65536].fill(0);
        assert_eq!(image(&tmp.0), second);
        assert!(point_bytes(&tmp.0, 1) == first, "point 1 restores");
        // An aborted cycle leaves no file behind, nor does one a new Begin abandons.
        volume.begin(3, 0, false, 0).unwrap();
        volume.journal(write(0, 5, 65536)).unwrap();
        assert_eq!(leftovers(&tmp.0).len(), 1, "the delta being captured");
        volume.abort();
        assert_eq!(leftovers(&tmp.0), Vec::<String>::new());
        volume.begin(3, 0, false, 0).unwrap();
        volume.journal(write(0, 6, 65536)).unwrap();
        volume.begin(3, 0, false, 0).unwrap();
        volume.journal(write(65536, 7, 65536)).unwrap();
        volume.commit(complete()).unwrap();
        assert_eq!(leftovers(&tmp.0), Vec::<String>::new());
        let mut third = second.clone();
        third[65536..2 * 65536].fill(7);
        assert_eq!(image(&tmp.0), third, "only the last Begin's frames applied");
        assert!(point_bytes(&tmp.0, 2) == second, "point 2 restores");
        // A receiver killed in the middle of a cycle leaves the delta it was capturing; the
        // next open removes it.
        volume.begin(4, 0, false, 0).unwrap();
        volume.journal(write(0, 8, 65536)).unwrap();
        volume.die();
        assert_eq!(leftovers(&tmp.0).len(), 1);
        let (volume, recovery) = Volume::open(&tmp.0, "v").unwrap();
        assert_eq!(
            recovery,
            Recovery::Clean,
            "the journal's buffer died with it"
        );
        assert_eq!(leftovers(&tmp.0), Vec::<String>::new());
        drop(volume);
        for (seq, content) in [(1, &first), (2, &second), (3, &third)] {
            assert!(point_bytes(&tmp.0, seq) == *content, "point {seq} restores");
        }
    }

    /// Finding 6: zeroing a range that is already a hole (a routine `fstrim`) needs no room.
    #[test]
    fn zeroing_holes_needs_no_room_for_history() {
        let tmp = TempDir::new("trim");
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
        volume.begin(1, 0, false, 0).unwrap();
        volume.journal(write(0, 1, 65536)).unwrap();
        volume.commit(complete()).unwrap();
        volume.begin(2, 0, false, 0).unwrap();
        volume
            .journal(CheckedData::Zero {
                offset: 65536,
                length: (1 << 20) - 65536,
            })
            .unwrap();
        let cycle = volume.cycle.as_ref().unwrap();
        assert_eq!(volume.capture_set(&cycle.touched).unwrap().count(), 0);
        volume.commit(complete()).unwrap();
    }

    /// Finding 13: an agent's clock decides neither retention nor `--at TIME` beyond bounds.
    #[test]
    fn point_times_are_held_between_the_previous_point_and_the_receivers_clock() {
        let tmp = TempDir::new("clock");
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
        let before = now_ms();
        volume.begin(1, 0, false, 0).unwrap();
        volume
            .commit(PointInfo {
                time_unix_ms: u64::MAX / 2,
                received_unix_ms: 1,
                ..complete()
            })
            .unwrap();
        let first = volume.meta().points[0].clone();
        assert!(
            first.time_unix_ms <= now_ms(),
            "a future stamp is held at now"
        );
        assert!(first.received_unix_ms >= before);
        volume.begin(2, 0, false, 0).unwrap();
        volume
            .commit(PointInfo {
                time_unix_ms: 5,
                ..complete()
            })
            .unwrap();
        let second = volume.meta().points[1].clone();
        assert_eq!(
            second.time_unix_ms, first.time_unix_ms,
            "no earlier than the last"
        );
    }

    #[test]
    fn the_retention_lock_keeps_points_the_other_tiers_would_drop() {
        let tmp = TempDir::new("lock");
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
        volume.set_retention(RetentionPolicy {
            all: std::time::Duration::ZERO,
            hourly: std::time::Duration::ZERO,
            daily: std::time::Duration::ZERO,
            locked: std::time::Duration::from_secs(3600),
        });
        for seq in 1..=3 {
            volume.begin(seq, 0, false, 0).unwrap();
            volume.journal(write(0, seq as u8, 4096)).unwrap();
            volume.commit(complete()).unwrap();
        }
        assert_eq!(volume.meta().points.len(), 3);
        assert!(volume.take_pruned().is_empty());
        drop(volume);
        assert_eq!(verify_all(&tmp.0), Vec::<u64>::new());
    }

    #[test]
    fn other_source_is_refused() {
        let tmp = TempDir::new("source");
        Volume::open_or_create(&tmp.0, &hello()).unwrap();
        let mut other = hello();
        other.source_id = "test:other".into();
        assert!(matches!(
            Volume::open_or_create(&tmp.0, &other),
            Err(StoreError::SourceMismatch { .. })
        ));
        let mut bigger = hello();
        bigger.size_bytes *= 2;
        assert!(Volume::open_or_create(&tmp.0, &bigger).is_err());
    }

    #[test]
    fn hashes_match_content() {
        let tmp = TempDir::new("hash");
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello()).unwrap();
        volume.begin(1, 0, false, 0).unwrap();
        volume.journal(write(65536, 3, 65536)).unwrap();
        volume.commit(PointInfo::default()).unwrap();
        let hashes = volume.hashes(0, 2).unwrap();
        assert_eq!(hashes[0], wire::chunk_hash(&[0; 65536]));
        assert_eq!(hashes[1], wire::chunk_hash(&[3; 65536]));
        assert!(volume.hashes(15, 2).is_err());
    }
}
