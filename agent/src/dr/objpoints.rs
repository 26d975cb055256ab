//! Points of volumes on the object store: the driver that writes and reads the objects of
//! [`super::layout`] through [`super::objstore`].
//!
//! A commit ([`commit_point`]) packs the chunks of the cycle that the store does not hold yet
//! (dedup against every pack index known, across volumes), uploads the packs and their
//! indexes, then creates the point's manifest with a conditional create. The manifest's
//! creation is the commit: if another writer created it first, the commit reports
//! [`PointStoreError::Conflict`] and the store is unchanged but for unreferenced packs, which
//! garbage collection removes after its grace period. A read ([`read_point`]) walks the
//! manifests back to the last full one and applies them forward; chunks are fetched by ranged
//! reads of their packs and checked against their ids.
//!
//!
//! Garbage collection ([`collect_garbage`]) runs [`layout::gc_plan`] in two phases: a pack no
//! remaining point needs is first *condemned* (a `condemned/ID` marker); commits stop deduping
//! into it; a later collection, a grace period on, deletes it if still not needed, or revives
//! it if a commit that had read the indexes before the condemnation referenced it. What makes
//! that safe: a commit must create its manifest within [`PackSettings::max_view_age`] of
//! reading the indexes ([`StoreView`]), and the grace is longer.
//!
//! A writer's view of the store ([`StoreView`]) is loaded once, then followed
//! ([`refresh_view`]): each pack is logged as added (`added/TIME-ID`) after its index, and a
//! refresh reads the log from where it last looked and the condemnation markers, not every
//! pack and index (some 31,000 listing requests at 500 TB); it lists the store whole once an
//! hour ([`VIEW_LISTING_EVERY`]).
//!
//! A repack copies the live chunks of a sparse pack into a new pack and condemns the old one
//! at once: from then on the copy keeps those chunks, and the old pack goes the way of any
//! condemned pack.
//!
//! Retention deletes points ([`prune_run`]): the kept point after a run of dropped ones is
//! rewritten to lead past them ([`layout::splice`]), then they are deleted, newest first.
//! Every write of a run is sent before the writer's lease deadline or not at all
//! ([`PointStoreError::LeaseDeadline`]); with the settle time a new lease holder waits before
//! its own retention (`crate::dr::publish`), that keeps two writers' runs from interleaving.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::dr::layout::{
    self, ChunkId, ChunkLocations, ChunkMap, LayoutError, Manifest, PackBuilder, PackId, PackInfo,
};
use crate::dr::objstore::{Created, ObjectStoreClient, StoreError};
use blkmirror_protocol::wire::PointInfo;

/// The largest manifest read, and so written ([`PackSettings::max_manifest_bytes`]). A full
/// manifest lists every chunk that holds data, 41 bytes each: 1 GiB is 26 million chunks,
/// a volume of 1.6 TiB of data in 64 KiB chunks, or 26 TiB in 1 MiB chunks. Larger volumes
/// need larger chunks until manifests are layered. (It was 256 MiB, and nothing stopped a
/// receiver from writing a larger manifest that no receiver could then read.)
pub const MAX_MANIFEST_BYTES: usize = 1 << 30;

/// The store's record of how its chunks are named and sealed.
pub const STORE_RECORD_KEY: &str = "store.json";

/// `store.json`: whether the store's chunks are encrypted, and a check of the key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreRecord {
    format: u32,
    encrypted: bool,
    key_check: Option<String>,
}

/// Checks that `client` names and seals chunks as the store does (the same key, or no key on
/// both sides), from the store's record. A writer (`create`) writes the record if there is
/// none, by conditional create; a store that holds packs already and no record was written in
/// the clear, before records, and cannot start being encrypted. Returns whether the store is
/// encrypted.
pub async fn check_sealing(
    client: &ObjectStoreClient,
    create: bool,
) -> Result<bool, PointStoreError> {
    let ours = StoreRecord {
        format: 1,
        encrypted: client.sealing().is_encrypted(),
        key_check: client.sealing().key_check(),
    };
    let mut stored = read_store_record(client).await?;
    if stored.is_none() {
        let has_packs = !client.list("packs").await?.is_empty();
        if has_packs && ours.encrypted {
            return Err(PointStoreError::Sealing(
                "the store holds chunks written in the clear (before it had a record of its \
                 encryption); [store] encryption_key cannot apply to it: use a new bucket for \
                 encrypted points"
                    .to_owned(),
            ));
        }
        if !create || has_packs {
            return Ok(false);
        }
        let encoded = serde_json::to_vec(&ours).expect("a store record serializes");
        client.put_if_absent(STORE_RECORD_KEY, encoded).await?;
        stored = read_store_record(client).await?;
    }
    let Some(stored) = stored else {
        return Err(PointStoreError::Missing(STORE_RECORD_KEY.to_owned()));
    };
    match (stored.encrypted, ours.encrypted) {
        (true, false) => Err(PointStoreError::Sealing(
            "the store's chunks are encrypted, and [store] has no encryption_key".to_owned(),
        )),
        (false, true) => Err(PointStoreError::Sealing(
            "the store's chunks are in the clear, and [store] has an encryption_key: remove \
             it, or use a new bucket for encrypted points"
                .to_owned(),
        )),
        (true, true) if stored.key_check != ours.key_check => Err(PointStoreError::Sealing(
            "[store] encryption_key is not the key of the store's chunks (its check differs)"
                .to_owned(),
        )),
        (encrypted, _) => Ok(encrypted),
    }
}

async fn read_store_record(
    client: &ObjectStoreClient,
) -> Result<Option<StoreRecord>, PointStoreError> {
    let Some((bytes, _)) = client.get(STORE_RECORD_KEY, 4096).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|error| PointStoreError::Layout {
            key: STORE_RECORD_KEY.to_owned(),
            source: LayoutError::Malformed {
                what: "store record",
                detail: error.to_string(),
            },
        })
}

/// The largest pack index read.
const MAX_INDEX_BYTES: usize = 1 << 20;

/// Errors of points on the object store.
#[derive(Debug, thiserror::Error)]
pub enum PointStoreError {
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An object of the layout is damaged or inconsistent.
    #[error("object store: {key}: {source}")]
    Layout {
        /// The object.
        key: String,
        /// What is wrong.
        #[source]
        source: LayoutError,
    },
    /// Another writer committed this point first.
    #[error(
        "point {seq} of volume {volume} was committed by another writer first; this commit \
         changed nothing (its packs are left to garbage collection)"
    )]
    Conflict {
        /// The volume.
        volume: String,
        /// The point.
        seq: u64,
    },
    /// An object the layout needs is not in the store.
    #[error("object store: {0} is missing")]
    Missing(String),
    /// A full manifest larger than a receiver reads back: not written.
    #[error(
        "point {seq} of volume {volume}: its full manifest would take {bytes} bytes ({chunks} \
         chunks holding data), more than the {limit} a receiver reads back; not committed. A \
         volume this large needs a larger chunk size (the agent's --chunk-size)"
    )]
    ManifestTooLarge {
        /// The volume.
        volume: String,
        /// The point.
        seq: u64,
        /// The manifest's size.
        bytes: usize,
        /// The chunks it lists.
        chunks: usize,
        /// The limit.
        limit: usize,
    },
    /// This client's encryption (or its absence) is not the store's.
    #[error("object store: {0}")]
    Sealing(String),
    /// The commit took too long after reading the pack indexes: a collection may have
    /// deleted a pack it deduplicated into, so it does not commit.
    #[error(
        "point {seq} of volume {volume}: {elapsed:?} since the pack indexes were read, more \
         than the {limit:?} a commit may take; not committed (read them again and retry)"
    )]
    StaleView {
        /// The volume.
        volume: String,
        /// The point.
        seq: u64,
        /// How long it had been.
        elapsed: Duration,
        /// The limit.
        limit: Duration,
    },
    /// Retention reached the deadline its lease allows for writes before it sent one: another
    /// receiver may hold the volume by now, so it writes nothing more.
    #[error(
        "volume {volume}: retention stopped before its write of point {seq}: this receiver's \
         lease was last confirmed too long ago (paused or slow), so another receiver may hold \
         the volume; every point is still readable, and the next publish retries"
    )]
    LeaseDeadline {
        /// The volume.
        volume: String,
        /// The point whose manifest it was about to write.
        seq: u64,
    },
    /// The system's random source failed (a pack's salt could not be drawn).
    #[error("object store: the system's random source failed; no pack was written")]
    Random,
}

fn layout_error(key: &str) -> impl FnOnce(LayoutError) -> PointStoreError + '_ {
    move |source| PointStoreError::Layout {
        key: key.to_owned(),
        source,
    }
}

/// How a commit went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitReport {
    /// Chunks of the point that changed.
    pub changed_chunks: u64,
    /// Of those, chunks the store held already (here or in another volume): not uploaded.
    pub deduplicated_chunks: u64,
    /// Packs uploaded.
    pub packs: u64,
    /// Bytes uploaded in packs and indexes.
    pub uploaded_bytes: u64,
    /// Bytes of the manifest.
    pub manifest_bytes: u64,
    /// Whether the manifest is a delta.
    pub delta: bool,
}

/// Settings of a writer.
#[derive(Debug, Clone, Copy)]
pub struct PackSettings {
    /// A pack is closed past this size.
    pub target_bytes: usize,
    /// zstd level for chunks that compress (None: stored raw).
    pub level: Option<i32>,
    /// The longest a commit may take from reading the pack indexes to creating its manifest.
    /// Garbage collection's grace must be longer.
    pub max_view_age: Duration,
    /// The largest manifest written: [`MAX_MANIFEST_BYTES`], what a receiver reads back
    /// (lower in tests).
    pub max_manifest_bytes: usize,
}

impl Default for PackSettings {
    fn default() -> Self {
        Self {
            target_bytes: 32 << 20,
            level: Some(3),
            max_view_age: Duration::from_secs(600),
            max_manifest_bytes: MAX_MANIFEST_BYTES,
        }
    }
}

/// What the store holds, as read at one instant: where each chunk is, and which packs a
/// collection has condemned.
pub struct StoreView {
    /// Where each chunk is.
    pub locations: ChunkLocations,
    /// When the indexes were read (or a [`refresh_view`] found that nothing known had
    /// changed and read the new ones).
    pub read_at: Instant,
    /// When every pack and index was last listed ([`VIEW_LISTING_EVERY`]).
    listed_at: Instant,
    /// This host's clock (Unix milliseconds) when the view was last brought up to date: the
    /// next refresh reads the log of added packs from there (less a margin).
    log_from_ms: u64,
    /// The packs whose indexes are in `locations`, and whether each was condemned.
    packs: HashMap<PackId, bool>,
}

/// The geometry and point of a commit.
pub struct PointToCommit<'a> {
    /// The volume.
    pub volume: &'a str,
    /// Its size.
    pub size_bytes: u64,
    /// Its chunk size.
    pub chunk_bytes: u64,
    /// The point's record (`point.seq` is the point).
    pub point: PointInfo,
    /// What changed since `base`: chunk number → new content (all zeros is stored as a zero
    /// reference).
    pub changes: &'a BTreeMap<u64, Vec<u8>>,
}

/// An empty pack with a fresh random salt ([`layout::PACK_SALT_BYTES`]).
fn new_pack(target_bytes: usize) -> Result<PackBuilder, PointStoreError> {
    let mut salt = [0; layout::PACK_SALT_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| PointStoreError::Random)?;
    Ok(PackBuilder::new(target_bytes, salt))
}

async fn upload_pack(
    client: &ObjectStoreClient,
    builder: PackBuilder,
    locations: &mut ChunkLocations,
    report: &mut CommitReport,
) -> Result<(PackId, Vec<layout::IndexEntry>), PointStoreError> {
    let pack = builder.finish();
    let index = layout::encode_index(&pack.index);
    report.packs += 1;
    report.uploaded_bytes += (pack.bytes.len() + index.len()) as u64;
    // Named by its content, salt included: a pack (or index) of this name already there is
    // this very object, created by a try of this request that timed out.
    client
        .put_if_absent(&layout::pack_key(&pack.id), pack.bytes)
        .await?;
    client
        .put_if_absent(&layout::index_key(&pack.id), index)
        .await?;
    // Last: a receiver that reads the entry finds the index.
    let logged = layout::added_key(wall_clock_ms(), &pack.id);
    client.put(&logged, Vec::new()).await?;
    locations.add(pack.id, &pack.index, false);
    Ok((pack.id, pack.index))
}

/// Commits `commit` on top of `base` (the volume's newest point, or an empty map for its
/// first): uploads what the store lacks, then creates the manifest. `view` is what the store
/// held (updated with the new packs); it must not be older than `settings.max_view_age` when
/// the manifest is created. Returns the report and the map at the new point. (It copies
/// `base`, for the tests and tools that keep it; the receiver calls [`upload_changes`] and
/// [`create_manifest`] itself.)
pub async fn commit_point(
    client: &ObjectStoreClient,
    view: &mut StoreView,
    base: &ChunkMap,
    commit: PointToCommit<'_>,
    settings: PackSettings,
) -> Result<(CommitReport, ChunkMap), PointStoreError> {
    let mut upload = Upload::default();
    upload_changes(client, view, commit.changes, settings, &mut upload).await?;
    create_manifest(
        client,
        view,
        base.clone(),
        ManifestToCreate {
            volume: commit.volume,
            size_bytes: commit.size_bytes,
            chunk_bytes: commit.chunk_bytes,
            point: commit.point,
        },
        upload,
        settings,
    )
    .await
}

/// The chunks of a commit uploaded so far: a commit too large for memory uploads its changes
/// in batches ([`upload_changes`] once per batch), then creates its manifest
/// ([`create_manifest`]).
#[derive(Debug, Default)]
pub struct Upload {
    /// Chunk number → its content's id (`None`: all zeros).
    references: BTreeMap<u64, Option<ChunkId>>,
    /// What was done.
    report: CommitReport,
    /// When the oldest view this upload deduplicated against was read: the manifest must be
    /// created within `max_view_age` of it.
    view_read_at: Option<Instant>,
}

impl Upload {
    fn saw(&mut self, view: &StoreView) {
        self.view_read_at = Some(
            self.view_read_at
                .map_or(view.read_at, |seen| seen.min(view.read_at)),
        );
    }
}

/// Chunks a batch must store (deduplicated against the view and within the batch), in the
/// order of the batch.
pub struct ToStore(Vec<Vec<u8>>);

/// The packs a batch stored: add them to the view ([`StoreView::add_packs`]).
pub struct Stored(Vec<(PackId, Vec<layout::IndexEntry>)>);

impl StoreView {
    /// Whether the view is due a whole listing of the store ([`VIEW_LISTING_EVERY`]).
    pub fn listing_due(&self) -> bool {
        self.listed_at.elapsed() >= VIEW_LISTING_EVERY
    }

    /// Makes the last whole listing `by` older (tests of what is due when).
    #[cfg(test)]
    pub fn age_listing(&mut self, by: Duration) {
        self.listed_at = self
            .listed_at
            .checked_sub(by)
            .expect("an instant that far back");
    }

    /// The packs the view knows, and whether each is condemned.
    pub fn known_packs(&self) -> BTreeMap<PackId, bool> {
        self.packs
            .iter()
            .map(|(id, condemned)| (*id, *condemned))
            .collect()
    }

    /// Makes `stored` packs known to later commits.
    pub fn add_packs(&mut self, stored: &Stored) {
        for (id, index) in &stored.0 {
            self.locations.add(*id, index, false);
            self.packs.insert(*id, false);
        }
    }
}

/// The first half of a batch ([`upload_changes`] in two steps, so that a view shared by
/// concurrent commits is locked only while it is looked up, not while packs upload): records
/// every chunk's reference in `upload` and returns the chunks the store lacks.
pub fn plan_batch(
    sealing: &layout::Sealing,
    view: &StoreView,
    changes: &BTreeMap<u64, Vec<u8>>,
    upload: &mut Upload,
) -> ToStore {
    upload.saw(view);
    upload.report.changed_chunks += changes.len() as u64;
    let mut planned = HashSet::new();
    let mut to_store = Vec::new();
    for (&chunk, content) in changes {
        if content.iter().all(|&b| b == 0) {
            upload.references.insert(chunk, None);
            continue;
        }
        let id = sealing.chunk_id(content);
        upload.references.insert(chunk, Some(id));
        if view.locations.contains(&id) || !planned.insert(id) {
            upload.report.deduplicated_chunks += 1;
            continue;
        }
        to_store.push(content.clone());
    }
    ToStore(to_store)
}

/// The second half of a batch: packs and uploads the chunks [`plan_batch`] returned (two
/// concurrent commits may both store a chunk; a collection keeps one copy).
pub async fn store_batch(
    client: &ObjectStoreClient,
    to_store: ToStore,
    settings: PackSettings,
    upload: &mut Upload,
) -> Result<Stored, PointStoreError> {
    let mut locations = ChunkLocations::default();
    let mut stored = Vec::new();
    let mut builder = new_pack(settings.target_bytes)?;
    for content in &to_store.0 {
        builder
            .add(content, settings.level, client.sealing())
            .map_err(layout_error("a pack being built"))?;
        if builder.is_full() {
            let full = std::mem::replace(&mut builder, new_pack(settings.target_bytes)?);
            stored.push(upload_pack(client, full, &mut locations, &mut upload.report).await?);
        }
    }
    if !builder.is_empty() {
        stored.push(upload_pack(client, builder, &mut locations, &mut upload.report).await?);
    }
    Ok(Stored(stored))
}

/// The point a manifest records.
pub struct ManifestToCreate<'a> {
    /// The volume.
    pub volume: &'a str,
    /// Its size.
    pub size_bytes: u64,
    /// Its chunk size.
    pub chunk_bytes: u64,
    /// The point's record (`point.seq` is the point).
    pub point: PointInfo,
}

/// Uploads one batch of a commit's changes (chunk number → new content): packs what the store
/// lacks (dedup against `view` and the batch itself) and records every chunk's reference in
/// `upload`. Nothing is committed until [`create_manifest`].
pub async fn upload_changes(
    client: &ObjectStoreClient,
    view: &mut StoreView,
    changes: &BTreeMap<u64, Vec<u8>>,
    settings: PackSettings,
    upload: &mut Upload,
) -> Result<(), PointStoreError> {
    upload.saw(view);
    let StoreView {
        locations, packs, ..
    } = view;
    let report = &mut upload.report;
    report.changed_chunks += changes.len() as u64;
    let mut builder = new_pack(settings.target_bytes)?;
    for (&chunk, content) in changes {
        if content.iter().all(|&b| b == 0) {
            upload.references.insert(chunk, None);
            continue;
        }
        let id = client.sealing().chunk_id(content);
        upload.references.insert(chunk, Some(id));
        if locations.contains(&id) || builder.contains(&id) {
            report.deduplicated_chunks += 1;
            continue;
        }
        builder
            .add(content, settings.level, client.sealing())
            .map_err(layout_error("a pack being built"))?;
        if builder.is_full() {
            let full = std::mem::replace(&mut builder, new_pack(settings.target_bytes)?);
            let (id, _) = upload_pack(client, full, locations, report).await?;
            packs.insert(id, false);
        }
    }
    if !builder.is_empty() {
        let (id, _) = upload_pack(client, builder, locations, report).await?;
        packs.insert(id, false);
    }
    Ok(())
}

/// Creates the manifest of the point `upload` carries, on top of `base`: the commit. Refused
/// if a chunk it references anew is not in the store, or if `view` has grown older than
/// `settings.max_view_age`. Returns the report and the map at the new point (`base`, changed).
///
/// Only the chunks the point references anew are looked up in the view, except at a full
/// manifest, where every chunk is: the base's chunks are those of a point in the store,
/// checked when it was created, and kept from collection since, because the newest point
/// is never dropped. So a commit's cost follows what changed, not the volume's size (a
/// 500 GB volume has 7.6 million chunks).
pub async fn create_manifest(
    client: &ObjectStoreClient,
    view: &StoreView,
    base: ChunkMap,
    point: ManifestToCreate<'_>,
    upload: Upload,
    settings: PackSettings,
) -> Result<(CommitReport, ChunkMap), PointStoreError> {
    let Upload {
        references,
        mut report,
        view_read_at,
    } = upload;
    let seq = point.point.seq;
    let (manifest, map) = base.next_manifest(
        point.volume,
        point.point,
        point.size_bytes,
        point.chunk_bytes,
        &references,
    );
    // Never a manifest whose chunks the store lacks.
    let missing = if manifest.base.is_none() {
        view.locations.missing(&map)
    } else {
        references
            .iter()
            .filter(|(_, id)| id.is_some_and(|id| view.locations.get(&id).is_none()))
            .map(|(&chunk, _)| chunk)
            .collect()
    };
    if let Some(chunk) = missing.first() {
        return Err(PointStoreError::Missing(format!(
            "chunk {chunk} of point {seq} of volume {} ({} chunks in all)",
            point.volume,
            missing.len()
        )));
    }
    let elapsed = view_read_at.unwrap_or(view.read_at).elapsed();
    if elapsed > settings.max_view_age {
        return Err(PointStoreError::StaleView {
            volume: point.volume.to_owned(),
            seq,
            elapsed,
            limit: settings.max_view_age,
        });
    }
    report.delta = manifest.base.is_some();
    let bytes = layout::encode_manifest(&manifest);
    check_manifest_size(
        point.volume,
        seq,
        &bytes,
        manifest.entries.len(),
        settings.max_manifest_bytes,
    )?;
    report.manifest_bytes = bytes.len() as u64;
    match client
        .put_if_absent(&layout::manifest_key(point.volume, seq), bytes)
        .await?
    {
        Created::Created => Ok((report, map)),
        Created::AlreadyExists => Err(PointStoreError::Conflict {
            volume: point.volume.to_owned(),
            seq,
        }),
    }
}

/// Reads the manifest of point `seq` of `volume`.
pub async fn read_manifest(
    client: &ObjectStoreClient,
    volume: &str,
    seq: u64,
) -> Result<Manifest, PointStoreError> {
    Ok(read_manifest_tagged(client, volume, seq).await?.0)
}

/// Reads the manifest of point `seq` of `volume`, with its entity tag (for a conditional
/// rewrite). A tombstone is a missing point.
async fn read_manifest_tagged(
    client: &ObjectStoreClient,
    volume: &str,
    seq: u64,
) -> Result<(Manifest, Option<String>), PointStoreError> {
    let key = layout::manifest_key(volume, seq);
    let (bytes, e_tag) = client
        .get(&key, MAX_MANIFEST_BYTES)
        .await?
        .filter(|(bytes, _)| bytes != layout::TOMBSTONE)
        .ok_or_else(|| PointStoreError::Missing(key.clone()))?;
    let manifest = layout::decode_manifest(&bytes).map_err(layout_error(&key))?;
    check_manifest_names(key, (&manifest.volume, manifest.seq), (volume, seq))?;
    Ok((manifest, e_tag))
}

/// Refuses an encoded manifest over `limit` (never over [`MAX_MANIFEST_BYTES`], which is what
/// every reader accepts): a manifest written past it would be a point that no receiver, restore
/// or retention run could ever read back.
fn check_manifest_size(
    volume: &str,
    seq: u64,
    encoded: &[u8],
    chunks: usize,
    limit: usize,
) -> Result<(), PointStoreError> {
    let limit = limit.min(MAX_MANIFEST_BYTES);
    if encoded.len() > limit {
        return Err(PointStoreError::ManifestTooLarge {
            volume: volume.to_owned(),
            seq,
            bytes: encoded.len(),
            chunks,
            limit,
        });
    }
    Ok(())
}

/// A manifest under another point's name (`key` names `wanted`, the manifest holds `held`)
/// was moved or copied there: refused, never read as the point its name says.
fn check_manifest_names(
    key: String,
    held: (&str, u64),
    wanted: (&str, u64),
) -> Result<(), PointStoreError> {
    if held == wanted {
        return Ok(());
    }
    Err(PointStoreError::Layout {
        key,
        source: LayoutError::Malformed {
            what: "manifest",
            detail: format!("holds point {} of volume {}", held.1, held.0),
        },
    })
}

/// What point `seq` of `volume` holds: its manifest and the ones back to the last full
/// manifest (at most [`layout::FULL_EVERY`]), applied in order.
///
/// Retention may splice points out of the chain while this reads it (it rewrites the kept
/// point, then deletes the dropped ones): a base that vanished midway means the walk read an
/// old version, so it starts again.
pub async fn read_point(
    client: &ObjectStoreClient,
    volume: &str,
    seq: u64,
) -> Result<(ChunkMap, Manifest), PointStoreError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match read_chain(client, volume, seq).await {
            Err(ChainRead::BaseVanished(key)) if attempts < 3 => {
                tracing::debug!("{key} vanished while its point was read (retention); again");
            }
            Err(ChainRead::BaseVanished(key)) => return Err(PointStoreError::Missing(key)),
            Err(ChainRead::Failed(error)) => return Err(error),
            Ok(read) => return Ok(read),
        }
    }
}

enum ChainRead {
    BaseVanished(String),
    Failed(PointStoreError),
}

impl From<PointStoreError> for ChainRead {
    fn from(error: PointStoreError) -> Self {
        Self::Failed(error)
    }
}

async fn read_chain(
    client: &ObjectStoreClient,
    volume: &str,
    seq: u64,
) -> Result<(ChunkMap, Manifest), ChainRead> {
    let newest = read_manifest(client, volume, seq).await?;
    let mut chain = vec![newest];
    while let Some(base) = chain.last().and_then(|m| m.base) {
        let manifest = match read_manifest(client, volume, base).await {
            Err(PointStoreError::Missing(key)) => return Err(ChainRead::BaseVanished(key)),
            other => other?,
        };
        // The chain length only decreases along the walk (retention may have shortened
        // it under a point), which bounds the walk to `FULL_EVERY` manifests.
        let successor = chain.last().map_or(0, |m| m.chain);
        if manifest.chain >= successor {
            return Err(PointStoreError::Layout {
                key: layout::manifest_key(volume, base),
                source: LayoutError::Malformed {
                    what: "manifest",
                    detail: format!(
                        "at chain length {}, not below its successor's {successor}",
                        manifest.chain
                    ),
                },
            }
            .into());
        }
        chain.push(manifest);
    }
    let mut map = ChunkMap::default();
    for manifest in chain.iter().rev() {
        map.apply(manifest)
            .map_err(layout_error(&layout::manifest_key(volume, manifest.seq)))?;
    }
    let newest = chain.swap_remove(0);
    Ok((map, newest))
}

/// What a listing of a volume's points knows of each, from the head of its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPoint {
    /// The manifest's head.
    pub head: layout::ManifestHead,
    /// The manifest's size in bytes.
    pub manifest_bytes: u64,
}

/// Heads read in flight while points are listed.
const PARALLEL_HEAD_READS: usize = 16;

/// The points of `volume` with their records, oldest first: a ranged read of each manifest's
/// head, many at a time (a full manifest of a large volume is megabytes; its head is not).
/// A manifest that vanished between the listing and its read (retention) is left out.
pub async fn list_point_heads(
    client: &ObjectStoreClient,
    volume: &str,
) -> Result<Vec<ListedPoint>, PointStoreError> {
    let listed = list_manifests(client, volume).await?;
    let mut points = Vec::with_capacity(listed.len());
    let mut wanted = listed.into_iter();
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        while in_flight.len() < PARALLEL_HEAD_READS {
            let Some((seq, size)) = wanted.next() else {
                break;
            };
            let client = client.clone();
            let key = layout::manifest_key(volume, seq);
            in_flight.spawn(async move {
                let len = size.min(layout::MAX_MANIFEST_HEAD_BYTES);
                let bytes = client.get_range(&key, 0, len).await;
                (key, seq, size, bytes)
            });
        }
        let Some(done) = in_flight.join_next().await else {
            break;
        };
        let (key, seq, size, bytes) = done.expect("a manifest head read task");
        let bytes = match bytes {
            // Dropped since the listing.
            Ok(bytes) if bytes == layout::TOMBSTONE => continue,
            Ok(bytes) => bytes,
            Err(error) if error.is_not_found() => continue,
            Err(error) => return Err(error.into()),
        };
        let head = layout::decode_manifest_head(&bytes).map_err(layout_error(&key))?;
        check_manifest_names(key, (&head.volume, head.seq), (volume, seq))?;
        points.push(ListedPoint {
            head,
            manifest_bytes: size,
        });
    }
    points.sort_by_key(|p| p.head.seq);
    Ok(points)
}

/// What retention did to one volume in the store.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneReport {
    /// Points deleted.
    pub dropped: u64,
    /// Manifests rewritten to lead past them.
    pub rewritten: u64,
}

/// Removes one run of points from `volume` ([`layout::prune_runs`]): rewrites the kept point
/// after it so that it no longer leads through the run, then replaces the run's manifests
/// with tombstones, newest first. Every instant leaves every remaining point readable: the
/// rewritten manifest holds the same point, and no remaining manifest leads to one dropped.
///
/// The caller holds the volume's lease (one writer of its manifests) and passes `deadline`,
/// the instant past which its lease may be another's: each write is sent before it, or the
/// run stops there with [`PointStoreError::LeaseDeadline`] and every point still readable.
/// Why: a writer paused after its reads (it lost the lease meanwhile) must not splice a
/// manifest from copies the next writer has rewritten since. Object stores check no fencing
/// token, and conditions hold on one object only: the rewrite is conditional on the kept
/// point's copy ([`PointStoreError::Conflict`]), but nothing in the store would refuse it for
/// a change to the *dropped* points' copies, such as the next writer's run over the points
/// just before (it drops the base the splice leads to). The next writer, in turn, waits a
/// settle time after it takes the lease before its own retention, so that what this one
/// sent before its deadline has landed. The packs the dropped points alone used are left to
/// garbage collection.
pub async fn prune_run(
    client: &ObjectStoreClient,
    volume: &str,
    run: &layout::PruneRun,
    deadline: Instant,
    report: &mut PruneReport,
) -> Result<(), PointStoreError> {
    let before_deadline = |seq: u64| {
        if Instant::now() < deadline {
            Ok(())
        } else {
            Err(PointStoreError::LeaseDeadline {
                volume: volume.to_owned(),
                seq,
            })
        }
    };
    let (next, e_tag) = read_manifest_tagged(client, volume, run.next).await?;
    let first_dropped = run.dropped.first().copied().unwrap_or(run.next);
    // A manifest that leads to a point before the run already leads past it: a run that was
    // cut short after its rewrite (its deadline, a failed tombstone, a crash) is taken up again
    // at its tombstones. Whatever else must be the one the splice checks.
    let leads_past = next.base.is_none_or(|base| base < first_dropped);
    if !leads_past {
        let mut dropped = Vec::with_capacity(run.dropped.len());
        for &seq in &run.dropped {
            dropped.push(read_manifest(client, volume, seq).await?);
        }
        let key = layout::manifest_key(volume, run.next);
        if let Some(spliced) = layout::splice(&dropped, &next).map_err(layout_error(&key))? {
            let encoded = layout::encode_manifest(&spliced);
            check_manifest_size(
                volume,
                run.next,
                &encoded,
                spliced.entries.len(),
                MAX_MANIFEST_BYTES,
            )?;
            before_deadline(run.next)?;
            let replaced = match &e_tag {
                Some(e_tag) => client.replace_if_unchanged(&key, encoded, e_tag).await?,
                None => false,
            };
            if !replaced {
                return Err(PointStoreError::Conflict {
                    volume: volume.to_owned(),
                    seq: run.next,
                });
            }
            report.rewritten += 1;
        }
    }
    for &seq in run.dropped.iter().rev() {
        before_deadline(seq)?;
        client
            .put(
                &layout::manifest_key(volume, seq),
                layout::TOMBSTONE.to_vec(),
            )
            .await?;
        report.dropped += 1;
    }
    Ok(())
}

/// Deletes the tombstones of `volume` written more than [`layout::TOMBSTONE_KEEP_MS`] before
/// `now_ms` (Unix milliseconds); returns how many.
pub async fn sweep_tombstones(
    client: &ObjectStoreClient,
    volume: &str,
    now_ms: u64,
) -> Result<u64, PointStoreError> {
    let listing = client.list(&manifests_prefix(volume)).await?;
    delete_tombstones(client, &old_tombstones(&listing, now_ms)).await
}

/// The keys in a listing of manifests that may be tombstones older than
/// [`layout::TOMBSTONE_KEEP_MS`] at `now_ms` (by size and age: [`delete_tombstones`] reads
/// each before it deletes it).
fn old_tombstones(listing: &[(String, u64, u64)], now_ms: u64) -> Vec<String> {
    listing
        .iter()
        .filter(|(_, size, modified_ms)| {
            *size == layout::TOMBSTONE.len() as u64
                && now_ms.saturating_sub(*modified_ms) >= layout::TOMBSTONE_KEEP_MS
        })
        .map(|(key, _, _)| key.clone())
        .collect()
}

/// Deletes those of `keys` that hold a tombstone; returns how many.
async fn delete_tombstones(
    client: &ObjectStoreClient,
    keys: &[String],
) -> Result<u64, PointStoreError> {
    let mut swept = 0;
    for key in keys {
        // Only a tombstone is deleted, never a manifest that happens to be as short.
        let is_tombstone = client
            .get(key, layout::TOMBSTONE.len())
            .await?
            .is_some_and(|(bytes, _)| bytes == layout::TOMBSTONE);
        if is_tombstone {
            client.delete(key).await?;
            swept += 1;
        }
    }
    Ok(swept)
}

fn manifests_prefix(volume: &str) -> String {
    format!("volumes/{volume}/manifests")
}

/// The points of `volume` in the store, oldest first.
pub async fn list_points(
    client: &ObjectStoreClient,
    volume: &str,
) -> Result<Vec<u64>, PointStoreError> {
    Ok(list_manifests(client, volume)
        .await?
        .into_iter()
        .map(|(seq, _)| seq)
        .collect())
}

/// The manifests of `volume`: point and size, oldest first.
async fn list_manifests(
    client: &ObjectStoreClient,
    volume: &str,
) -> Result<Vec<(u64, u64)>, PointStoreError> {
    Ok(manifests_listed(
        volume,
        &client.list(&manifests_prefix(volume)).await?,
    ))
}

/// The points (number, manifest size) in a listing of `volume`'s manifests, oldest first.
fn manifests_listed(volume: &str, listing: &[(String, u64, u64)]) -> Vec<(u64, u64)> {
    let mut seqs: Vec<(u64, u64)> = listing
        .iter()
        .filter_map(|(key, size, _)| {
            let (key, size) = (key.as_str(), *size);
            // A tombstone's size: a dropped point (no manifest is that short).
            if size == layout::TOMBSTONE.len() as u64 {
                return None;
            }
            // Only the names the writer gives (20 digits); anything else is not a point.
            let seq: u64 = key.rsplit('/').next()?.parse().ok()?;
            (key == layout::manifest_key(volume, seq)).then_some((seq, size))
        })
        .collect();
    seqs.sort_unstable();
    seqs
}

fn parse_id(hex: &str) -> Option<PackId> {
    layout::parse_hex(hex)
}

/// The pack objects in the store: id → (size, when written, in Unix milliseconds).
async fn list_packs(
    client: &ObjectStoreClient,
) -> Result<BTreeMap<PackId, (u64, u64)>, PointStoreError> {
    Ok(client
        .list("packs")
        .await?
        .into_iter()
        .filter_map(|(key, size, written)| {
            Some((parse_id(key.rsplit('/').next()?)?, (size, written)))
        })
        .collect())
}

/// The ids of the objects of a listing (of `index/` or `condemned/`), each with when it was
/// written; keys that name no pack are left out.
fn ids_listed(listing: Vec<(String, u64, u64)>) -> BTreeMap<PackId, u64> {
    listing
        .into_iter()
        .filter_map(|(key, _, written)| Some((key.rsplit('/').next().and_then(parse_id)?, written)))
        .collect()
}

/// The store's listings of packs, index objects and condemnation markers, taken at once:
/// what a view's load and a collection start from (a collection lists each once).
struct StoreListing {
    /// Pack id → (size, when written, in Unix milliseconds).
    packs: BTreeMap<PackId, (u64, u64)>,
    /// The index objects: pack id → when written.
    indexes: BTreeMap<PackId, u64>,
    /// The condemnation markers: pack id → when written.
    markers: BTreeMap<PackId, u64>,
}

impl StoreListing {
    async fn take(client: &ObjectStoreClient) -> Result<Self, PointStoreError> {
        let (packs, indexes, markers) = tokio::join!(
            list_packs(client),
            client.list("index"),
            client.list("condemned")
        );
        Ok(Self {
            packs: packs?,
            indexes: ids_listed(indexes?),
            markers: ids_listed(markers?),
        })
    }

    /// The packs that have an index object: id → (size, when written). An index whose pack
    /// is gone (collected, or never finished) locates nothing.
    fn indexed_packs(&self) -> BTreeMap<PackId, (u64, u64)> {
        indexed_packs(&self.packs, &self.indexes)
    }
}

fn indexed_packs(
    packs: &BTreeMap<PackId, (u64, u64)>,
    indexes: &BTreeMap<PackId, u64>,
) -> BTreeMap<PackId, (u64, u64)> {
    packs
        .iter()
        .filter(|(id, _)| indexes.contains_key(*id))
        .map(|(id, pack)| (*id, *pack))
        .collect()
}

/// The condemnation markers listed: pack id → when it was condemned (Unix milliseconds): the
/// later of the time the marker holds (when the collection decided) and the time the store
/// shows it written. A marker the store applies late (the collection's request timed out) is
/// seen by writers only from then, and a writer whose view was read before may deduplicate
/// into the pack for up to `max_view_age` after: the grace runs from when writers could see
/// it.
async fn read_markers(
    client: &ObjectStoreClient,
    markers: &BTreeMap<PackId, u64>,
) -> Result<BTreeMap<PackId, u64>, PointStoreError> {
    let mut condemned = BTreeMap::new();
    for (id, &written) in markers {
        let key = condemned_key(id);
        let Some((bytes, _)) = client.get(&key, 64).await? else {
            continue;
        };
        let at = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .ok_or_else(|| PointStoreError::Layout {
                key: key.clone(),
                source: LayoutError::Malformed {
                    what: "condemnation marker",
                    detail: "not a time in milliseconds".to_owned(),
                },
            })?;
        condemned.insert(*id, written.max(at));
    }
    Ok(condemned)
}

/// Index reads in flight while a view of the store is loaded.
const PARALLEL_INDEX_READS: usize = 16;

/// Every pack index in the store, each checked against its pack's size, and the packs
/// condemned. The three listings run at once, and the indexes are read many at a time: a
/// store's view is loaded before every restore, where a round trip per pack would dominate.
async fn read_indexes(
    client: &ObjectStoreClient,
) -> Result<BTreeMap<PackId, PackInfo>, PointStoreError> {
    read_listed_indexes(client, &StoreListing::take(client).await?).await
}

/// [`read_indexes`] from listings already taken.
async fn read_listed_indexes(
    client: &ObjectStoreClient,
    listing: &StoreListing,
) -> Result<BTreeMap<PackId, PackInfo>, PointStoreError> {
    let wanted = listing
        .indexed_packs()
        .into_iter()
        .map(|(id, (pack_len, written))| (id, Some(pack_len), written))
        .collect();
    let (condemned, indexes) = tokio::join!(
        read_markers(client, &listing.markers),
        read_index_objects(client, wanted)
    );
    let condemned = condemned?;
    Ok(indexes?
        .into_iter()
        .map(|(id, (index, written))| {
            let pack = PackInfo {
                index,
                written_unix_ms: written,
                condemned_unix_ms: condemned.get(&id).copied(),
            };
            (id, pack)
        })
        .collect())
}

/// The packs that have an index object, from a listing of packs and one of indexes (the
/// whole listing of a view's refresh, which reads the markers apart).
async fn list_indexed_packs(
    client: &ObjectStoreClient,
) -> Result<BTreeMap<PackId, (u64, u64)>, PointStoreError> {
    let (packs, indexes) = tokio::join!(list_packs(client), client.list("index"));
    Ok(indexed_packs(&packs?, &ids_listed(indexes?)))
}

/// Runs `request` for each of `items`, [`PARALLEL_INDEX_READS`] at a time, and hands each
/// answer to `answered` as it comes; the first error stops the rest (dropping the set aborts
/// the requests in flight).
async fn request_each<I, A, R>(
    items: impl IntoIterator<Item = I>,
    request: impl Fn(I) -> R,
    mut answered: impl FnMut(A) -> Result<(), PointStoreError>,
) -> Result<(), PointStoreError>
where
    R: std::future::Future<Output = A> + Send + 'static,
    A: Send + 'static,
{
    let mut items = items.into_iter();
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        while in_flight.len() < PARALLEL_INDEX_READS {
            let Some(item) = items.next() else {
                break;
            };
            in_flight.spawn(request(item));
        }
        let Some(done) = in_flight.join_next().await else {
            return Ok(());
        };
        answered(done.expect("a store request task"))?;
    }
}

/// Reads the index objects of `wanted` packs (id, the pack's length to check the index
/// against if known, when written), many at a time. A pack whose index is gone is left out.
async fn read_index_objects(
    client: &ObjectStoreClient,
    wanted: Vec<(PackId, Option<u64>, u64)>,
) -> Result<BTreeMap<PackId, (Vec<layout::IndexEntry>, u64)>, PointStoreError> {
    let mut indexes = BTreeMap::new();
    let request = |(id, pack_len, written)| {
        let client = client.clone();
        async move {
            let key = layout::index_key(&id);
            let bytes = client.get(&key, MAX_INDEX_BYTES).await;
            (key, id, pack_len, written, bytes)
        }
    };
    request_each(wanted, request, |(key, id, pack_len, written, bytes)| {
        if let Some((bytes, _)) = bytes? {
            let index = layout::decode_index(&bytes, pack_len).map_err(layout_error(&key))?;
            indexes.insert(id, (index, written));
        }
        Ok(())
    })
    .await?;
    Ok(indexes)
}

/// The size and time of each of `packs` that the store holds, asked many at a time.
async fn head_packs(
    client: &ObjectStoreClient,
    packs: HashSet<PackId>,
) -> Result<BTreeMap<PackId, (u64, u64)>, PointStoreError> {
    let mut found = BTreeMap::new();
    let request = |id| {
        let client = client.clone();
        async move { (id, client.head(&layout::pack_key(&id)).await) }
    };
    request_each(packs, request, |(id, head)| {
        if let Some(head) = head? {
            found.insert(id, head);
        }
        Ok(())
    })
    .await?;
    Ok(found)
}

/// What the store holds now: a commit deduplicates against it, a read finds chunks in it.
pub async fn load_view(client: &ObjectStoreClient) -> Result<StoreView, PointStoreError> {
    let read_at = Instant::now();
    let log_from_ms = wall_clock_ms();
    let indexes = read_indexes(client).await?;
    let locations = ChunkLocations::from_packs(
        indexes
            .iter()
            .map(|(id, pack)| (*id, pack.index.as_slice(), pack.condemned_unix_ms.is_some())),
    );
    let packs = indexes
        .iter()
        .map(|(id, pack)| (*id, pack.condemned_unix_ms.is_some()))
        .collect();
    drop(indexes);
    Ok(StoreView {
        locations,
        read_at,
        listed_at: read_at,
        log_from_ms,
        packs,
    })
}

/// The clock of this host, in Unix milliseconds.
pub(crate) fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// How long a view goes without listing every pack and index of the store: such a listing
/// finds the packs whose entry in the log of added packs never came (a writer stopped after
/// the index) or came too late for a refresh to read it, and packs the store lost. At
/// 500 TB in 32 MiB packs a listing is some 31,000 requests (ARCHITECTURE.md), which is why a
/// refresh reads the log instead.
pub const VIEW_LISTING_EVERY: Duration = Duration::from_secs(3600);

/// How far before its last refresh a refresh reads the log of added packs: writers' clocks
/// differ, and an entry may land well after its writer read the clock (a retried request).
/// An entry later still is found by the next whole listing.
const ADDED_LOG_LOOKBACK_MS: u64 = 10 * 60 * 1000;

/// How long the log of added packs keeps an entry: a collection deletes older ones. A day,
/// against the minutes a refresh looks back.
pub const ADDED_LOG_KEEP_MS: u64 = 24 * 3600 * 1000;

/// What [`refresh_view`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Packs new to the view whose indexes were read.
    pub added: usize,
    /// Known packs a collection condemned since (their chunks are no longer deduplicated
    /// into).
    pub condemned: usize,
    /// Known condemned packs a collection revived.
    pub revived: usize,
    /// Known packs gone from the store (deleted by a collection, or lost), forgotten.
    pub gone: usize,
    /// Whether every pack and index of the store was listed.
    pub listed: bool,
    /// Whether the view was read again whole, being older than allowed.
    pub reloaded: bool,
}

/// Brings `view` up to what the store holds now, reading as little as it can:
/// * the condemnation markers (a listing: few of them), whose changes for the packs the view
///   knows are applied from those packs' indexes: a pack newly condemned is no longer
///   deduplicated into, a revived one is again, one deleted is forgotten;
/// * the log of added packs since the last refresh ([`layout::added_key`]), whose indexes
///   are read; with `list_whole`, or when the last whole listing is twice
///   [`VIEW_LISTING_EVERY`] old, every pack and index is listed too, which also finds packs
///   whose log entry never came and packs the store lost. (A receiver lists every
///   [`VIEW_LISTING_EVERY`] in the background, outside the view's lock, and applies it with
///   [`refresh_view_listed`].)
///
/// Why that is safe for a commit's dedup, which must never reference a pack a collection
/// deletes: a collection deletes a pack a grace after its marker lands, and the grace
/// exceeds `max_gap`. A pack the view saw without a marker at the last refresh, less than
/// `max_gap` ago, and sees without one now, cannot have been deleted in between; an index
/// is read after the markers are listed, so a pack deleted before the listing has no index
/// to read. A view older than `max_gap` is read again whole.
///
/// What it gives up against a whole reload: a chunk is placed in one pack, so if two packs
/// held it and its pack is condemned, the view no longer deduplicates into it until the next
/// load (it is stored again). [`crate::dr::publish`] reloads whole before it calls a chunk
/// lost.
pub async fn refresh_view(
    client: &ObjectStoreClient,
    view: &mut StoreView,
    max_gap: Duration,
    list_whole: bool,
) -> Result<Refreshed, PointStoreError> {
    // Without a receiver's background listing (`refresh_view_listed`), a refresh lists the
    // store itself when the last listing is twice as old as it should be.
    let list_whole = list_whole || view.listed_at.elapsed() >= 2 * VIEW_LISTING_EVERY;
    let listing = if list_whole {
        Listing::Take
    } else {
        Listing::None
    };
    refresh(client, view, max_gap, listing).await
}

/// Every pack of the store with an index object, as listed from `taken_at` on: a whole
/// listing taken outside the lock a receiver's view is under, since it can take minutes
/// (about 85 ms per 1,000 packs on the test cluster: 21 minutes at 15 million), then applied
/// by [`refresh_view_listed`].
pub struct WholeListing {
    packs: BTreeMap<PackId, (u64, u64)>,
    taken_at: Instant,
}

/// Lists every pack and index of the store, for [`refresh_view_listed`].
pub async fn list_whole(client: &ObjectStoreClient) -> Result<WholeListing, PointStoreError> {
    let taken_at = Instant::now();
    Ok(WholeListing {
        packs: list_indexed_packs(client).await?,
        taken_at,
    })
}

/// [`refresh_view`], with a whole listing taken before (outside the view's lock). Packs the
/// view learned while the listing ran are not in it: a known pack the listing lacks is asked
/// for, and forgotten only if the store has it no more.
pub async fn refresh_view_listed(
    client: &ObjectStoreClient,
    view: &mut StoreView,
    max_gap: Duration,
    listing: WholeListing,
) -> Result<Refreshed, PointStoreError> {
    refresh(client, view, max_gap, Listing::Taken(listing)).await
}

/// Whether and how a refresh lists the store whole.
enum Listing {
    None,
    Take,
    Taken(WholeListing),
}

async fn refresh(
    client: &ObjectStoreClient,
    view: &mut StoreView,
    max_gap: Duration,
    listing: Listing,
) -> Result<Refreshed, PointStoreError> {
    let read_at = Instant::now();
    if read_at.duration_since(view.read_at) > max_gap {
        *view = load_view(client).await?;
        return Ok(Refreshed {
            listed: true,
            reloaded: true,
            ..Refreshed::default()
        });
    }
    let log_from_ms = wall_clock_ms();
    let log_after = layout::added_key_from(view.log_from_ms.saturating_sub(ADDED_LOG_LOOKBACK_MS));
    let (condemned, logged, listed) = tokio::join!(
        client.list("condemned"),
        client.list_after(layout::ADDED_PREFIX, &log_after),
        async {
            match listing {
                Listing::None => Ok(None),
                Listing::Take => list_whole(client).await.map(Some),
                Listing::Taken(listing) => Ok(Some(listing)),
            }
        }
    );
    let condemned: HashSet<PackId> = ids_listed(condemned?).into_keys().collect();
    let (logged, listed) = (logged?, listed?);
    let mut report = Refreshed {
        listed: listed.is_some(),
        ..Refreshed::default()
    };

    // New packs: from the whole listing if there is one, and from the log, each of the
    // latter asked for (a pack the store lost keeps its entry, and maybe its index).
    let mut wanted: BTreeMap<PackId, (u64, u64)> = BTreeMap::new();
    // Known and not listed: gone, unless the view learned it after the listing began.
    let mut unlisted = HashSet::new();
    if let Some(listing) = &listed {
        for (id, pack) in &listing.packs {
            if !view.packs.contains_key(id) {
                wanted.insert(*id, *pack);
            }
        }
        unlisted.extend(
            view.packs
                .keys()
                .filter(|id| !listing.packs.contains_key(*id)),
        );
    }
    let logged: HashSet<PackId> = logged
        .iter()
        .filter_map(|(key, _, _)| layout::parse_added_key(key))
        .map(|(_, id)| id)
        .filter(|id| !view.packs.contains_key(id) && !wanted.contains_key(id))
        .collect();
    // Both asked for in one round.
    let there = head_packs(client, unlisted.iter().chain(&logged).copied().collect()).await?;
    let mut gone: HashSet<PackId> = unlisted
        .into_iter()
        .filter(|id| !there.contains_key(id))
        .collect();
    wanted.extend(there.into_iter().filter(|(id, _)| logged.contains(id)));
    // Known packs whose condemnation changed: their indexes name their chunks.
    let changed: Vec<(PackId, bool)> = view
        .packs
        .iter()
        .filter(|(id, was)| !gone.contains(*id) && condemned.contains(*id) != **was)
        .map(|(id, _)| (*id, condemned.contains(id)))
        .collect();
    let reread = changed.iter().map(|(id, _)| (*id, None, 0));
    let mut indexes = read_index_objects(
        client,
        wanted
            .iter()
            .map(|(id, (pack_len, written))| (*id, Some(*pack_len), *written))
            .chain(reread)
            .collect(),
    )
    .await?;
    // Condemnations before additions: a repack's copy, new here, then takes the chunks of the
    // pack it replaces.
    for (id, now_condemned) in changed {
        let Some((index, _)) = indexes.remove(&id) else {
            gone.insert(id);
            continue;
        };
        if now_condemned {
            view.locations.condemn(id, &index);
            report.condemned += 1;
        } else {
            view.locations.add(id, &index, false);
            report.revived += 1;
        }
        view.packs.insert(id, now_condemned);
    }
    for (id, (index, _)) in indexes {
        let is_condemned = condemned.contains(&id);
        view.locations.add(id, &index, is_condemned);
        view.packs.insert(id, is_condemned);
        report.added += 1;
    }
    if !gone.is_empty() {
        for id in &gone {
            view.packs.remove(id);
        }
        view.locations.forget_packs(&gone);
        report.gone = gone.len();
    }
    view.read_at = read_at;
    view.log_from_ms = log_from_ms;
    if let Some(listing) = listed {
        view.listed_at = listing.taken_at;
    }
    Ok(report)
}

/// The volumes with points in the store.
pub async fn list_volumes(client: &ObjectStoreClient) -> Result<Vec<String>, PointStoreError> {
    Ok(client
        .list_folders("volumes")
        .await?
        .into_iter()
        .filter_map(|folder| {
            let name = folder.trim_end_matches('/').rsplit('/').next()?.to_owned();
            blkmirror_protocol::wire::check_volume_name(&name)
                .is_ok()
                .then_some(name)
        })
        .collect())
}

/// Moves `map` to `manifest`'s point of `volume`: applies the manifest if it is full or a
/// delta against the map's point (walking a volume's points in order reads each manifest
/// once), or reads the point through its own chain otherwise.
pub async fn advance(
    client: &ObjectStoreClient,
    volume: &str,
    map: &mut ChunkMap,
    manifest: &Manifest,
) -> Result<(), PointStoreError> {
    if manifest.base.is_none_or(|base| base == map.seq) {
        map.apply(manifest)
            .map_err(layout_error(&layout::manifest_key(volume, manifest.seq)))
    } else {
        *map = read_point(client, volume, manifest.seq).await?.0;
        Ok(())
    }
}

/// The mark phase of a collection at `now_ms`: every chunk a point in the store reads (each
/// volume's manifests are read once, in order), and from the same listings of each volume's
/// manifests, the tombstones old enough to sweep (one listing per volume).
async fn mark(
    client: &ObjectStoreClient,
    now_ms: u64,
) -> Result<(HashSet<ChunkId>, Vec<String>), PointStoreError> {
    let mut live = HashSet::new();
    let mut tombstones = Vec::new();
    for volume in list_volumes(client).await? {
        let listing = client.list(&manifests_prefix(&volume)).await?;
        tombstones.extend(old_tombstones(&listing, now_ms));
        let mut map = ChunkMap::default();
        for (seq, _) in manifests_listed(&volume, &listing) {
            // A point pruned since the listing holds nothing the points left need.
            let manifest = match read_manifest(client, &volume, seq).await {
                Err(PointStoreError::Missing(_)) => continue,
                other => other?,
            };
            advance(client, &volume, &mut map, &manifest).await?;
            live.extend(map.chunks.values().copied());
        }
    }
    Ok((live, tombstones))
}

/// What a collection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// Packs in the store.
    pub packs: usize,
    /// Bytes of packs in the store, before the collection.
    pub pack_bytes: u64,
    /// Chunks live.
    pub live_chunks: usize,
    /// Packs condemned now (not needed, or repacked).
    pub condemned: usize,
    /// Condemned packs deleted.
    pub deleted: usize,
    /// Bytes of the packs deleted.
    pub deleted_bytes: u64,
    /// Condemned packs revived (a commit needed them).
    pub revived: usize,
    /// Sparse packs whose live chunks were copied into new packs (then condemned).
    pub repacked: usize,
    /// Packs the repack wrote.
    pub repack_written: u64,
    /// Bytes the repack wrote.
    pub repack_bytes: u64,
    /// Packs too young to judge.
    pub young: usize,
    /// Tombstones of dropped points deleted (older than [`layout::TOMBSTONE_KEEP_MS`]).
    pub tombstones_swept: u64,
    /// Index objects and condemnation markers deleted whose pack is gone (a collection
    /// stopped between deleting a pack and deleting them).
    pub strays_deleted: usize,
    /// Packs whose index object was missing (a writer stopped between the two uploads),
    /// given it again from the copy at the pack's end, so that the collection can judge them.
    pub indexes_rebuilt: usize,
    /// Entries of the log of added packs deleted (older than [`ADDED_LOG_KEEP_MS`]).
    pub log_entries_swept: usize,
}

/// How a collection runs.
#[derive(Debug, Clone, Copy)]
pub struct GcSettings {
    /// How long a pack is left alone after it is written, and a condemned pack before it is
    /// deleted. Must exceed the writers' [`PackSettings::max_view_age`] and the clock
    /// difference between this host and the store.
    pub grace_ms: u64,
    /// A needed pack whose live bytes are under this share of its bytes is repacked.
    pub repack_below: f64,
    /// How repacked chunks are packed.
    pub pack: PackSettings,
    /// Plan only: report what would be done, change nothing.
    pub dry_run: bool,
}

/// The largest pack read whole (by a repack): a pack closes past its target size, and a
/// chunk is at most [`layout::MAX_CHUNK_BYTES`].
const MAX_PACK_BYTES: usize = 256 << 20;

/// The store-wide lease a collection takes, so that receivers scheduled to collect do not
/// all do it at once (two collections at once are safe, only wasteful).
pub const GC_LEASE_KEY: &str = "gc/lease";

fn condemned_key(id: &PackId) -> String {
    format!("condemned/{}", layout::hex(id))
}

/// What stopped collections and commits leave behind, older than the grace.
#[derive(Debug, Default)]
struct Strays {
    /// Index objects and condemnation markers whose pack is gone: a collection deletes a
    /// pack first, then its index, then its marker, and may stop in between. Readers ignore
    /// them, so without this they would stay forever (an index is up to 800 KB, and every
    /// view load reads every marker).
    orphans: Vec<String>,
    /// Packs without an index object: a writer uploads the pack, then the index, and may
    /// stop in between. No view knows their chunks, so no collection would ever judge them.
    unindexed: Vec<PackId>,
}

/// Finds the strays among the objects listed, at `now_ms`. Only those older than `grace_ms`
/// are taken, which is what makes the listings' order safe: a pack written after its
/// listing, with its index before the index listing, has a young index; and a writer sends a
/// pack's index right after the pack, so an old pack without one will not get it.
fn find_strays(listing: &StoreListing, now_ms: u64, grace_ms: u64) -> Strays {
    let old = |written: u64| now_ms.saturating_sub(written) >= grace_ms;
    let orphan = |id: &PackId, written: u64| !listing.packs.contains_key(id) && old(written);
    let mut orphans: Vec<String> = listing
        .indexes
        .iter()
        .filter(|(id, written)| orphan(id, **written))
        .map(|(id, _)| layout::index_key(id))
        .collect();
    orphans.extend(
        listing
            .markers
            .iter()
            .filter(|(id, written)| orphan(id, **written))
            .map(|(id, _)| condemned_key(id)),
    );
    Strays {
        orphans,
        unindexed: listing
            .packs
            .iter()
            .filter(|(id, (_, written))| !listing.indexes.contains_key(*id) && old(*written))
            .map(|(id, _)| *id)
            .collect(),
    }
}

/// Gives `pack` its index object again, from the copy at the pack's end (the same bytes its
/// writer would have sent). A pack that does not read as one is left, with a warning.
async fn rebuild_index(client: &ObjectStoreClient, pack: &PackId) -> Result<bool, PointStoreError> {
    let key = layout::pack_key(pack);
    let Some((bytes, _)) = client.get(&key, MAX_PACK_BYTES).await? else {
        return Ok(false);
    };
    match layout::index_of_pack(&bytes) {
        Ok(index) => {
            client
                .put_if_absent(&layout::index_key(pack), layout::encode_index(&index))
                .await?;
            // So that receivers' views find it at their next refresh.
            let logged = layout::added_key(wall_clock_ms(), pack);
            client.put(&logged, Vec::new()).await?;
            Ok(true)
        }
        Err(error) => {
            tracing::warn!(
                "object store: {key} has no index object and its own index does not read                  ({error}); left as it is"
            );
            Ok(false)
        }
    }
}

/// One collection at `now_unix_ms` (the time is read before anything else is: every manifest
/// read after it is seen).
///
/// Order: condemnations and revivals; then repacks, which copy the live chunks of sparse
/// packs into new packs and then condemn the old ones (a commit that had deduplicated into
/// an old pack makes it needed again, and the next collection revives it); deletions last.
pub async fn collect_garbage(
    client: &ObjectStoreClient,
    now_unix_ms: u64,
    settings: &GcSettings,
) -> Result<GcReport, PointStoreError> {
    // Each of the store's listings once, for the strays and the indexes both.
    let mut listing = StoreListing::take(client).await?;
    let strays = find_strays(&listing, now_unix_ms, settings.grace_ms);
    let mut indexes_rebuilt = 0;
    if !settings.dry_run {
        // Before the indexes are read: a pack given its index is judged like any other.
        for id in &strays.unindexed {
            if rebuild_index(client, id).await? {
                indexes_rebuilt += 1;
                listing.indexes.insert(*id, now_unix_ms);
            }
        }
    }
    let packs = read_listed_indexes(client, &listing).await?;
    let listed = &listing.packs;
    let (live, tombstones) = mark(client, now_unix_ms).await?;
    let old_log_entries: Vec<String> = client
        .list(layout::ADDED_PREFIX)
        .await?
        .into_iter()
        .filter(|(key, _, written)| {
            let logged = layout::parse_added_key(key).map_or(*written, |(at, _)| at);
            now_unix_ms.saturating_sub(logged) >= ADDED_LOG_KEEP_MS
        })
        .map(|(key, _, _)| key)
        .collect();
    let plan = layout::gc_plan(
        &packs,
        &live,
        now_unix_ms,
        settings.grace_ms,
        settings.repack_below,
    );
    let mut report = GcReport {
        packs: packs.len(),
        pack_bytes: listed.values().map(|(size, _)| size).sum(),
        live_chunks: live.len(),
        condemned: plan.condemn.len() + plan.repack.len(),
        deleted: plan.delete.len(),
        deleted_bytes: plan
            .delete
            .iter()
            .filter_map(|id| listed.get(id))
            .map(|(size, _)| size)
            .sum(),
        revived: plan.revive.len(),
        repacked: plan.repack.len(),
        young: plan.young,
        strays_deleted: strays.orphans.len(),
        log_entries_swept: old_log_entries.len(),
        indexes_rebuilt: if settings.dry_run {
            strays.unindexed.len()
        } else {
            indexes_rebuilt
        },
        ..GcReport::default()
    };
    if settings.dry_run {
        return Ok(report);
    }
    let marker = || now_unix_ms.to_string().into_bytes();
    for id in &plan.condemn {
        client.put_if_absent(&condemned_key(id), marker()).await?;
    }
    for id in &plan.revive {
        client.delete(&condemned_key(id)).await?;
    }
    if !plan.repack.is_empty() {
        let written = repack(client, &packs, &plan.repack, &live, settings.pack).await?;
        report.repack_written = written.packs;
        report.repack_bytes = written.uploaded_bytes;
        for id in &plan.repack {
            client.put_if_absent(&condemned_key(id), marker()).await?;
        }
    }
    for id in &plan.delete {
        // The pack first: an index or a marker without its pack is ignored by readers.
        client.delete(&layout::pack_key(id)).await?;
        client.delete(&layout::index_key(id)).await?;
        client.delete(&condemned_key(id)).await?;
    }
    for key in strays.orphans.iter().chain(&old_log_entries) {
        client.delete(key).await?;
    }
    // Tombstones found by the mark's listings: a day old by then, and still a day old now.
    report.tombstones_swept = delete_tombstones(client, &tombstones).await?;
    Ok(report)
}

/// Copies the live chunks of `sparse` that no other pack keeps into new packs (each read
/// back whole and checked against its id).
async fn repack(
    client: &ObjectStoreClient,
    packs: &BTreeMap<PackId, PackInfo>,
    sparse: &[PackId],
    live: &HashSet<ChunkId>,
    settings: PackSettings,
) -> Result<CommitReport, PointStoreError> {
    let leaving: HashSet<&PackId> = sparse.iter().collect();
    let elsewhere: HashSet<ChunkId> = packs
        .iter()
        .filter(|(id, pack)| !leaving.contains(id) && pack.condemned_unix_ms.is_none())
        .flat_map(|(_, pack)| pack.index.iter().map(|entry| entry.id))
        .collect();
    let mut written = CommitReport::default();
    let mut locations = ChunkLocations::default();
    let mut builder = new_pack(settings.target_bytes)?;
    for id in sparse {
        let key = layout::pack_key(id);
        let Some((bytes, _)) = client.get(&key, MAX_PACK_BYTES).await? else {
            return Err(PointStoreError::Missing(key));
        };
        for entry in &packs[id].index {
            if !live.contains(&entry.id) || elsewhere.contains(&entry.id) {
                continue;
            }
            if builder.contains(&entry.id) || locations.contains(&entry.id) {
                continue;
            }
            // The index was checked against the pack's size when it was read.
            let start = entry.offset as usize;
            let stored = bytes
                .get(start..start + entry.stored_len as usize)
                .ok_or_else(|| PointStoreError::Missing(format!("{key}: bytes of a chunk")))?;
            let content = layout::chunk_from_stored(stored, entry, client.sealing())
                .map_err(layout_error(&key))?;
            builder
                .add(&content, settings.level, client.sealing())
                .map_err(layout_error("a repacked pack"))?;
            if builder.is_full() {
                let full = std::mem::replace(&mut builder, new_pack(settings.target_bytes)?);
                upload_pack(client, full, &mut locations, &mut written).await?;
            }
        }
    }
    if !builder.is_empty() {
        upload_pack(client, builder, &mut locations, &mut written).await?;
    }
    Ok(written)
}

/// One chunk's content, by a ranged read of its pack, checked against its id.
pub async fn read_chunk(
    client: &ObjectStoreClient,
    locations: &ChunkLocations,
    id: &ChunkId,
) -> Result<Vec<u8>, PointStoreError> {
    let (pack, entry) = locations
        .get(id)
        .ok_or_else(|| PointStoreError::Missing(format!("chunk {}", layout::hex(id))))?;
    let key = layout::pack_key(&pack);
    let stored = client
        .get_range(&key, entry.offset, u64::from(entry.stored_len))
        .await?;
    layout::chunk_from_stored(&stored, &entry, client.sealing()).map_err(layout_error(&key))
}

/// The whole image of a point, in memory (small volumes and tests; a restore streams).
pub async fn read_image(
    client: &ObjectStoreClient,
    locations: &ChunkLocations,
    map: &ChunkMap,
    size_bytes: u64,
    chunk_bytes: u64,
) -> Result<Vec<u8>, PointStoreError> {
    let mut image = vec![0u8; usize::try_from(size_bytes).expect("an image in memory")];
    for (&chunk, id) in &map.chunks {
        let content = read_chunk(client, locations, id).await?;
        let start = (chunk * chunk_bytes) as usize;
        let end = (start + content.len()).min(image.len());
        image[start..end].copy_from_slice(&content[..end - start]);
    }
    Ok(image)
}

/// The most bytes one ranged read of a point fetches: adjacent chunks of one pack are read
/// together up to this size.
const MAX_READ_RUN: u64 = 16 << 20;

/// One ranged read of a pack: adjacent stored chunks, by chunk number.
struct ReadRun {
    pack: PackId,
    offset: u64,
    len: u64,
    chunks: Vec<(u64, layout::IndexEntry)>,
}

/// Plans the ranged reads of `map`: chunks in chunk order, merged into one read while they
/// lie back to back in one pack (as a commit writes them), up to [`MAX_READ_RUN`] bytes.
fn plan_reads(locations: &ChunkLocations, map: &ChunkMap) -> Result<Vec<ReadRun>, PointStoreError> {
    let mut runs: Vec<ReadRun> = Vec::new();
    for (&chunk, id) in &map.chunks {
        let (pack, entry) = locations
            .get(id)
            .ok_or_else(|| PointStoreError::Missing(format!("chunk {}", layout::hex(id))))?;
        let stored = u64::from(entry.stored_len);
        match runs.last_mut() {
            Some(run)
                if run.pack == pack
                    && run.offset + run.len == entry.offset
                    && run.len + stored <= MAX_READ_RUN =>
            {
                run.len += stored;
                run.chunks.push((chunk, entry));
            }
            _ => runs.push(ReadRun {
                pack,
                offset: entry.offset,
                len: stored,
                chunks: vec![(chunk, entry)],
            }),
        }
    }
    Ok(runs)
}

/// How a point read from the store went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadReport {
    /// Chunks read (and checked against their ids).
    pub chunks: u64,
    /// Chunks that are all zeros (not read).
    pub zero_chunks: u64,
    /// Ranged reads made.
    pub requests: u64,
    /// Bytes fetched from the store.
    pub fetched_bytes: u64,
}

/// Where the chunks of a point read from the store go: each chunk's byte offset and content
/// (`None`: zeros). Called from the read tasks, several at once.
pub type ChunkSink = Arc<dyn Fn(u64, Option<&[u8]>) -> Result<(), PointStoreError> + Send + Sync>;

/// Reads the point `map` describes, of a volume of `size_bytes` in chunks of `chunk_bytes`,
/// and hands every chunk to `sink` (the chunks of zeros first), with up to `parallel` ranged reads in flight. Chunks arrive in no particular order;
/// each is checked against its id. When this returns, no read task is left running (so the
/// sink is the caller's alone again).
pub async fn read_point_into(
    client: &ObjectStoreClient,
    locations: &ChunkLocations,
    map: &ChunkMap,
    (size_bytes, chunk_bytes): (u64, u64),
    parallel: usize,
    sink: ChunkSink,
) -> Result<ReadReport, PointStoreError> {
    let mut report = ReadReport::default();
    for chunk in 0..size_bytes.div_ceil(chunk_bytes.max(1)) {
        if !map.chunks.contains_key(&chunk) {
            sink(chunk * chunk_bytes, None)?;
            report.zero_chunks += 1;
        }
    }
    let runs = plan_reads(locations, map)?;
    let on_chunk: RunSink =
        Arc::new(move |chunk, content| sink(chunk * chunk_bytes, Some(content)));
    fetch_runs(client, runs, parallel, &mut report, on_chunk).await?;
    Ok(report)
}

/// What [`fetch_runs`] hands each chunk to: its number in the runs and its content.
type RunSinkFn = dyn Fn(u64, &[u8]) -> Result<(), PointStoreError> + Send + Sync;

/// [`RunSinkFn`], shared by the read tasks.
type RunSink = Arc<RunSinkFn>;

/// Makes the ranged reads `runs`, up to `parallel` at a time, and hands each chunk (its
/// number in the runs, its content checked against its id) to `sink`. Each read's chunks are
/// decompressed, hashed and handed over in its own task, so that work spreads over the
/// runtime's threads while other reads are in flight. On an error the other reads are
/// cancelled and waited for.
async fn fetch_runs(
    client: &ObjectStoreClient,
    runs: Vec<ReadRun>,
    parallel: usize,
    report: &mut ReadReport,
    sink: RunSink,
) -> Result<(), PointStoreError> {
    let mut runs = runs.into_iter();
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        while in_flight.len() < parallel.max(1) {
            let Some(run) = runs.next() else { break };
            let client = client.clone();
            let sink = sink.clone();
            in_flight.spawn(async move { fetch_run(&client, run, &*sink).await });
        }
        let Some(done) = in_flight.join_next().await else {
            break;
        };
        match done.expect("a ranged read task") {
            Ok((fetched, chunks)) => {
                report.requests += 1;
                report.fetched_bytes += fetched;
                report.chunks += chunks;
            }
            Err(error) => {
                in_flight.shutdown().await;
                return Err(error);
            }
        }
    }
    Ok(())
}

/// One ranged read: its bytes fetched, and its chunks, each checked against its id and handed
/// to `sink`. Returns the bytes fetched and the chunks handed over.
async fn fetch_run(
    client: &ObjectStoreClient,
    run: ReadRun,
    sink: &RunSinkFn,
) -> Result<(u64, u64), PointStoreError> {
    let key = layout::pack_key(&run.pack);
    let bytes = client.get_range(&key, run.offset, run.len).await?;
    if bytes.len() as u64 != run.len {
        return Err(PointStoreError::Layout {
            key,
            source: LayoutError::Malformed {
                what: "pack",
                detail: format!(
                    "{} bytes read at offset {} for {} asked",
                    bytes.len(),
                    run.offset,
                    run.len
                ),
            },
        });
    }
    for (chunk, entry) in &run.chunks {
        let start = (entry.offset - run.offset) as usize;
        let stored = &bytes[start..start + entry.stored_len as usize];
        let content = layout::chunk_from_stored(stored, entry, client.sealing())
            .map_err(layout_error(&key))?;
        sink(*chunk, &content)?;
    }
    Ok((run.len, run.chunks.len() as u64))
}

/// Reads every chunk of `ids` once and checks it against its id (a verify of every point
/// that references them: a chunk shared by many points is read once). Chunks are read in the
/// order they lie in their packs, adjacent ones together. Stops at the first damaged chunk.
pub async fn verify_chunks(
    client: &ObjectStoreClient,
    locations: &ChunkLocations,
    ids: &HashSet<ChunkId>,
    parallel: usize,
) -> Result<ReadReport, PointStoreError> {
    let mut placed = Vec::with_capacity(ids.len());
    for id in ids {
        let (pack, entry) = locations
            .get(id)
            .ok_or_else(|| PointStoreError::Missing(format!("chunk {}", layout::hex(id))))?;
        placed.push((pack, entry.offset, *id));
    }
    placed.sort_unstable();
    // Numbered in pack order, the chunks plan into runs as a point's do.
    let map = ChunkMap {
        chunks: placed
            .into_iter()
            .enumerate()
            .map(|(number, (_, _, id))| (number as u64, id))
            .collect(),
        ..ChunkMap::default()
    };
    let mut report = ReadReport::default();
    let runs = plan_reads(locations, &map)?;
    fetch_runs(client, runs, parallel, &mut report, Arc::new(|_, _| Ok(()))).await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a refresh found (in tests: what it added, condemned, revived, forgot).
    fn refreshed(added: usize, condemned: usize, revived: usize, gone: usize) -> Refreshed {
        Refreshed {
            added,
            condemned,
            revived,
            gone,
            ..Refreshed::default()
        }
    }

    /// A refresh reads the condemnation markers and the log of added packs, not every pack
    /// and index of the store (at 500 TB, some 31,000 listing requests), and it no longer
    /// reads the whole view again when a collection changed a pack it knows: another
    /// writer's pack comes from its log entry; a condemnation, a revival and a deletion are
    /// applied from the known pack's index.
    #[tokio::test]
    async fn a_refresh_follows_the_log_of_added_packs_and_the_collections_markers() {
        let client = ObjectStoreClient::in_memory();
        let mut stale = load_view(&client).await.unwrap();
        async fn refresh(client: &ObjectStoreClient, view: &mut StoreView) -> Refreshed {
            let gap = PackSettings::default().max_view_age;
            refresh_view(client, view, gap, false).await.unwrap()
        }
        assert_eq!(refresh(&client, &mut stale).await, refreshed(0, 0, 0, 0));
        let content = BTreeMap::from([(0, vec![7u8; 4096])]);
        let id = client.sealing().chunk_id(&content[&0]);
        store_unreferenced(&client, &content).await;
        assert!(!stale.locations.contains(&id));
        let before = stale.read_at;
        assert_eq!(refresh(&client, &mut stale).await, refreshed(1, 0, 0, 0));
        assert!(stale.locations.contains(&id));
        assert!(stale.read_at > before);
        // The entry is listed again (the refresh looks back), and is known.
        assert_eq!(refresh(&client, &mut stale).await, refreshed(0, 0, 0, 0));

        // A collection condemns the pack: no longer deduplicated into, still readable.
        let (pack, _) = stale.locations.get(&id).unwrap();
        let marker = || b"1700000000000".to_vec();
        client.put(&condemned_key(&pack), marker()).await.unwrap();
        assert_eq!(refresh(&client, &mut stale).await, refreshed(0, 1, 0, 0));
        assert!(!stale.locations.contains(&id));
        assert!(stale.locations.get(&id).is_some(), "still readable");
        // A commit needed it after all: revived.
        client.delete(&condemned_key(&pack)).await.unwrap();
        assert_eq!(refresh(&client, &mut stale).await, refreshed(0, 0, 1, 0));
        assert!(stale.locations.contains(&id));
        // Condemned again, then deleted as a collection deletes: pack, index, marker.
        client.put(&condemned_key(&pack), marker()).await.unwrap();
        assert_eq!(refresh(&client, &mut stale).await, refreshed(0, 1, 0, 0));
        for key in [
            layout::pack_key(&pack),
            layout::index_key(&pack),
            condemned_key(&pack),
        ] {
            client.delete(&key).await.unwrap();
        }
        assert_eq!(refresh(&client, &mut stale).await, refreshed(0, 0, 0, 1));
        assert_eq!(stale.locations.get(&id), None);
        assert!(stale.packs.is_empty());
        assert_eq!(stale.locations.len(), 0);
    }

    /// A refresh that lists every pack (every `VIEW_LISTING_EVERY`, or when asked) finds
    /// a pack whose log entry never came (its writer stopped after the index), and forgets a
    /// pack the store lost; a view older than allowed is read again whole.
    #[tokio::test]
    async fn a_whole_listing_finds_what_the_log_missed_and_an_old_view_is_read_again() {
        let client = ObjectStoreClient::in_memory();
        let gap = PackSettings::default().max_view_age;
        let first = BTreeMap::from([(0, vec![1u8; 4096])]);
        let second = BTreeMap::from([(0, vec![2u8; 4096])]);
        let [first_id, second_id] = [&first, &second].map(|c| client.sealing().chunk_id(&c[&0]));
        store_unreferenced(&client, &first).await;
        let first_logged = client.list(layout::ADDED_PREFIX).await.unwrap();
        let mut view = load_view(&client).await.unwrap();
        // The second pack's writer stops before its log entry.
        store_unreferenced(&client, &second).await;
        for (key, _, _) in client.list(layout::ADDED_PREFIX).await.unwrap() {
            if !first_logged.iter().any(|(first, _, _)| *first == key) {
                client.delete(&key).await.unwrap();
            }
        }
        assert_eq!(
            refresh_view(&client, &mut view, gap, false).await.unwrap(),
            refreshed(0, 0, 0, 0)
        );
        assert!(!view.locations.contains(&second_id));
        // The store loses the first pack.
        let (lost, _) = view.locations.get(&first_id).unwrap();
        client.delete(&layout::pack_key(&lost)).await.unwrap();
        assert_eq!(
            refresh_view(&client, &mut view, gap, true).await.unwrap(),
            Refreshed {
                listed: true,
                ..refreshed(1, 0, 0, 1)
            }
        );
        assert!(view.locations.contains(&second_id));
        assert_eq!(view.locations.get(&first_id), None);
        // The lost pack's log entry and index are still there; the pack is not.
        assert_eq!(
            refresh_view(&client, &mut view, gap, false).await.unwrap(),
            refreshed(0, 0, 0, 0)
        );
        assert_eq!(view.locations.get(&first_id), None);
        // Too old to be brought up to date safely: read again whole.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let reloaded = refresh_view(&client, &mut view, Duration::from_millis(1), false)
            .await
            .unwrap();
        assert!(reloaded.reloaded && reloaded.listed, "{reloaded:?}");
        assert!(view.locations.contains(&second_id));
    }

    /// A whole listing taken outside the view's lock, applied after: a pack the view learned
    /// while it ran (from the log) is not in it, and is kept; a pack the store lost before it
    /// is forgotten.
    #[tokio::test]
    async fn a_listing_taken_before_the_view_learned_a_pack_forgets_only_what_the_store_lost() {
        let client = ObjectStoreClient::in_memory();
        let gap = PackSettings::default().max_view_age;
        let lost = BTreeMap::from([(0, vec![3u8; 4096])]);
        let learned = BTreeMap::from([(0, vec![4u8; 4096])]);
        let [lost_id, learned_id] = [&lost, &learned].map(|c| client.sealing().chunk_id(&c[&0]));
        store_unreferenced(&client, &lost).await;
        let mut view = load_view(&client).await.unwrap();
        let (lost_pack, _) = view.locations.get(&lost_id).unwrap();
        client.delete(&layout::pack_key(&lost_pack)).await.unwrap();
        let listing = list_whole(&client).await.unwrap();
        store_unreferenced(&client, &learned).await;
        assert_eq!(
            refresh_view(&client, &mut view, gap, false).await.unwrap(),
            refreshed(1, 0, 0, 0)
        );
        view.age_listing(VIEW_LISTING_EVERY);
        assert!(view.listing_due());
        assert_eq!(
            refresh_view_listed(&client, &mut view, gap, listing)
                .await
                .unwrap(),
            Refreshed {
                listed: true,
                ..refreshed(0, 0, 0, 1)
            }
        );
        assert!(view.locations.contains(&learned_id));
        assert_eq!(view.locations.get(&lost_id), None);
        assert!(!view.listing_due());
    }

    /// A collection repacks a sparse pack a writer's view knows: at its next refresh the view
    /// finds the copy (from the log) and the old pack condemned, and places the live chunk
    /// in the copy, so that commits still deduplicate into it; once the old pack is deleted,
    /// the view forgets it and the chunk stays found. Every point reads throughout.
    #[tokio::test]
    async fn a_refresh_moves_a_repacked_chunk_to_its_copy_and_forgets_the_old_pack() {
        let client = ObjectStoreClient::in_memory();
        let gap = PackSettings::default().max_view_age;
        let grace_ms = 1000;
        let settings = GcSettings {
            repack_below: 0.9,
            ..gc_settings(grace_ms)
        };
        let (live, dead) = (vec![0x31u8; 4096], vec![0x32u8; 4096]);
        let [live_id, dead_id] = [&live, &dead].map(|c| client.sealing().chunk_id(c));
        store_unreferenced(&client, &BTreeMap::from([(0, live.clone()), (1, dead)])).await;
        commit_fill(&client, &ChunkMap::default(), 1, 0x31)
            .await
            .unwrap();
        let mut view = load_view(&client).await.unwrap();
        let (sparse, _) = view.locations.get(&live_id).unwrap();
        let start = now_ms();
        let collected = collect_garbage(&client, start + grace_ms, &settings)
            .await
            .unwrap();
        assert_eq!(
            (collected.repacked, collected.repack_written),
            (1, 1),
            "{collected:?}"
        );
        assert_eq!(
            refresh_view(&client, &mut view, gap, false).await.unwrap(),
            refreshed(1, 1, 0, 0)
        );
        let (copy, _) = view.locations.get(&live_id).unwrap();
        assert_ne!(copy, sparse);
        assert!(view.locations.contains(&live_id));
        assert!(!view.locations.contains(&dead_id));
        assert_eq!(fill_of(&client, 1).await, 0x31);
        let collected = collect_garbage(&client, start + 3 * grace_ms, &settings)
            .await
            .unwrap();
        assert_eq!(collected.deleted, 1, "{collected:?}");
        assert_eq!(
            refresh_view(&client, &mut view, gap, false).await.unwrap(),
            refreshed(0, 0, 0, 1)
        );
        assert_eq!(
            view.locations.get(&live_id).map(|(pack, _)| pack),
            Some(copy)
        );
        assert_eq!(view.locations.get(&dead_id), None);
        // The view is what a load reads now.
        let fresh = load_view(&client).await.unwrap();
        assert_eq!(fresh.packs, view.packs);
        assert_eq!(fresh.locations.len(), view.locations.len());
        assert_eq!(fill_of(&client, 1).await, 0x31);
        every_point_reads(&client).await.unwrap();
    }

    /// The log of added packs is a hint kept a day: a collection deletes older entries.
    #[tokio::test]
    async fn a_collection_deletes_log_entries_older_than_a_day() {
        let client = ObjectStoreClient::in_memory();
        store_unreferenced(&client, &BTreeMap::from([(0, vec![9u8; 4096])])).await;
        let logged = || async { client.list(layout::ADDED_PREFIX).await.unwrap().len() };
        assert_eq!(logged().await, 1);
        let settings = gc_settings(3_600_000);
        let collected = collect_garbage(&client, now_ms(), &settings).await.unwrap();
        assert_eq!(collected.log_entries_swept, 0, "{collected:?}");
        let later = now_ms() + ADDED_LOG_KEEP_MS;
        let dry = GcSettings {
            dry_run: true,
            ..settings
        };
        let planned = collect_garbage(&client, later, &dry).await.unwrap();
        assert_eq!(planned.log_entries_swept, 1, "{planned:?}");
        assert_eq!(logged().await, 1);
        let collected = collect_garbage(&client, later, &settings).await.unwrap();
        assert_eq!(collected.log_entries_swept, 1, "{collected:?}");
        assert_eq!(logged().await, 0);
    }

    /// A delta's commit looks up its new references only, so its cost follows the change;
    /// a full manifest (every `FULL_EVERY` points) is checked whole.
    #[tokio::test]
    async fn a_delta_checks_its_new_chunks_and_a_full_manifest_checks_every_chunk() {
        let client = ObjectStoreClient::in_memory();
        let mut view = load_view(&client).await.unwrap();
        let stored = vec![5u8; 4096];
        let stored_id = client.sealing().chunk_id(&stored);
        let mut upload = Upload::default();
        upload_changes(
            &client,
            &mut view,
            &BTreeMap::from([(1, stored)]),
            PackSettings::default(),
            &mut upload,
        )
        .await
        .unwrap();
        assert_eq!(upload.references, BTreeMap::from([(1, Some(stored_id))]));
        // Chunk 0 of the base is one the store does not hold (it cannot happen in a store
        // whose points were all checked; here it shows what is looked up).
        let absent = [0xaa; 32];
        let base = |chain| ChunkMap {
            seq: 1,
            chain,
            chunks: BTreeMap::from([(0, absent)]),
        };
        let to_create = |seq| ManifestToCreate {
            volume: "v",
            size_bytes: 1 << 20,
            chunk_bytes: 4096,
            point: PointInfo {
                seq,
                complete: true,
                ..PointInfo::default()
            },
        };
        let again = |references: BTreeMap<u64, Option<ChunkId>>| Upload {
            references,
            report: CommitReport::default(),
            view_read_at: None,
        };
        let settings = PackSettings::default();

        // A full manifest: the base's chunk 0 is looked up, and refused.
        let full = create_manifest(
            &client,
            &view,
            base(layout::FULL_EVERY - 1),
            to_create(2),
            again(upload.references.clone()),
            settings,
        )
        .await;
        assert!(
            matches!(&full, Err(PointStoreError::Missing(what)) if what.starts_with("chunk 0 ")),
            "{full:?}"
        );
        // A delta referencing a chunk anew that the store lacks: refused.
        let mut lacking = upload.references.clone();
        lacking.insert(2, Some([0xbb; 32]));
        let delta = create_manifest(
            &client,
            &view,
            base(0),
            to_create(2),
            again(lacking),
            settings,
        )
        .await;
        assert!(
            matches!(&delta, Err(PointStoreError::Missing(what)) if what.starts_with("chunk 2 ")),
            "{delta:?}"
        );
        // A delta whose new chunks are there: created, without looking the base's up.
        let (report, map) =
            create_manifest(&client, &view, base(0), to_create(2), upload, settings)
                .await
                .unwrap();
        assert!(report.delta);
        assert_eq!(
            map.chunks,
            BTreeMap::from([(0, absent), (1, stored_id)]),
            "the base's map, changed in place"
        );
        assert_eq!((map.seq, map.chain), (2, 1));
    }

    /// A full manifest larger than a receiver reads back is not written (the point is not
    /// committed, with what to do); a delta of the same volume still is.
    #[tokio::test]
    async fn a_full_manifest_larger_than_a_receiver_reads_back_is_refused() {
        let client = ObjectStoreClient::in_memory();
        let mut view = load_view(&client).await.unwrap();
        let changes: BTreeMap<u64, Vec<u8>> = (0..40u64)
            .map(|chunk| (chunk, vec![chunk as u8 + 1; 4096]))
            .collect();
        // 40 references of 41 bytes, and the head: more than 1,000 bytes.
        let settings = PackSettings {
            max_manifest_bytes: 1_000,
            ..PackSettings::default()
        };
        let commit = |seq, changes| PointToCommit {
            volume: "big",
            size_bytes: 1 << 20,
            chunk_bytes: 4096,
            point: PointInfo {
                seq,
                complete: true,
                ..PointInfo::default()
            },
            changes,
        };
        let refused = commit_point(
            &client,
            &mut view,
            &ChunkMap::default(),
            commit(1, &changes),
            settings,
        )
        .await;
        let Err(error @ PointStoreError::ManifestTooLarge { chunks: 40, .. }) = &refused else {
            panic!("{refused:?}");
        };
        assert!(error.to_string().contains("--chunk-size"), "{error}");
        assert!(list_points(&client, "big").await.unwrap().is_empty());
        // Under the limit: point 1 as a full manifest, then a delta of one chunk.
        let (_, map) = commit_point(
            &client,
            &mut view,
            &ChunkMap::default(),
            commit(1, &changes),
            PackSettings::default(),
        )
        .await
        .unwrap();
        let one = BTreeMap::from([(3u64, vec![9u8; 4096])]);
        let (report, _) = commit_point(&client, &mut view, &map, commit(2, &one), settings)
            .await
            .unwrap();
        assert!(report.delta && report.manifest_bytes <= 1_000, "{report:?}");
    }

    /// The fill of chunk 0 of point `seq` of volume "v", as the store holds it.
    async fn fill_of(client: &ObjectStoreClient, seq: u64) -> u8 {
        let (map, _) = read_point(client, "v", seq).await.unwrap();
        let view = load_view(client).await.unwrap();
        read_chunk(client, &view.locations, &map.chunks[&0])
            .await
            .unwrap()[0]
    }

    /// A manifest whose creation the store applies late (the writer's request timed out, so
    /// it took the commit for failed) creates the point only if its name is still free: the
    /// other writer's point is never replaced, and each point is one writer's whole.
    #[tokio::test]
    async fn a_manifest_the_store_applies_late_commits_the_point_whole_or_nothing() {
        let (a, b, writes) = ObjectStoreClient::with_late_writes();
        let mut map = ChunkMap::default();
        for seq in 1..=2 {
            map = commit_fill(&a, &map, seq, seq as u8).await.unwrap();
        }
        // A's point 3: its packs are stored, its manifest's creation times out.
        writes.hold("volumes/v/manifests/");
        let failed = commit_fill(&a, &map, 3, 0xaa).await;
        assert!(
            matches!(failed, Err(PointStoreError::Store(_))),
            "{failed:?}"
        );
        // B, the next writer, finds point 2 the newest and commits its own point 3.
        assert_eq!(list_points(&b, "v").await.unwrap(), vec![1, 2]);
        let (base, _) = read_point(&b, "v", 2).await.unwrap();
        let b3 = commit_fill(&b, &base, 3, 0xbb).await.unwrap();
        // A's request lands now: the name is taken, so nothing changes.
        assert_eq!(writes.release().await, vec![false]);
        assert_eq!(fill_of(&b, 3).await, 0xbb);

        // The other order: A's point 4 lands before B tries its own 4. B is refused, and the
        // store's point 4 is A's.
        writes.hold("volumes/v/manifests/");
        let (a3, _) = read_point(&a, "v", 3).await.unwrap();
        assert!(commit_fill(&a, &a3, 4, 0xaa).await.is_err());
        assert_eq!(writes.release().await, vec![true]);
        let refused = commit_fill(&b, &b3, 4, 0xbb).await;
        assert!(
            matches!(refused, Err(PointStoreError::Conflict { seq: 4, .. })),
            "{refused:?}"
        );
        assert_eq!(fill_of(&b, 4).await, 0xaa);
        assert_eq!(list_points(&b, "v").await.unwrap(), vec![1, 2, 3, 4]);
    }

    /// A condemnation the store applies late (the collection's request timed out, so the
    /// collection stopped there) counts its grace from when the store applied it, not from
    /// when the collection decided: until then a writer's view shows the pack as not
    /// condemned, and a commit may deduplicate into it for up to `max_view_age` after. Timed
    /// from the decision, the grace would be spent in part before anyone could see it, and a
    /// collection could delete the pack under that commit.
    #[tokio::test]
    async fn a_condemnation_the_store_applies_late_counts_its_grace_from_when_it_landed() {
        let (a, b, writes) = ObjectStoreClient::with_late_writes();
        let grace = Duration::from_millis(1500);
        let settings = gc_settings(grace.as_millis() as u64);
        let content = BTreeMap::from([(0, vec![0x77; 4096])]);
        assert_eq!(store_unreferenced(&a, &content).await.packs, 1);
        tokio::time::sleep(grace + Duration::from_millis(100)).await;
        // A collection condemns it, and the store applies the marker late.
        writes.hold("condemned/");
        let failed = collect_garbage(&a, now_ms(), &settings).await;
        assert!(
            matches!(failed, Err(PointStoreError::Store(_))),
            "{failed:?}"
        );
        // Writer B reads the store meanwhile: the pack is there, not condemned.
        let mut b_view = load_view(&b).await.unwrap();
        let id = a.sealing().chunk_id(&content[&0]);
        assert!(b_view.locations.contains(&id));
        tokio::time::sleep(grace + Duration::from_millis(100)).await;
        assert_eq!(writes.release().await, vec![true]);
        // More than the grace after the decision, but just after the marker landed: kept.
        let collected = collect_garbage(&a, now_ms(), &settings).await.unwrap();
        assert_eq!(collected.deleted, 0, "{collected:?}");
        // B commits point 1 with the same content, deduplicated into the pack.
        let (report, _) = commit_point(
            &b,
            &mut b_view,
            &ChunkMap::default(),
            PointToCommit {
                volume: "v",
                size_bytes: 1 << 20,
                chunk_bytes: 4096,
                point: PointInfo {
                    seq: 1,
                    complete: true,
                    ..PointInfo::default()
                },
                changes: &content,
            },
            PackSettings::default(),
        )
        .await
        .unwrap();
        assert_eq!((report.deduplicated_chunks, report.packs), (1, 0));
        // A collection past the grace revives the pack, and the point reads.
        let later = now_ms() + settings.grace_ms;
        let collected = collect_garbage(&a, later, &settings).await.unwrap();
        assert_eq!(
            (collected.revived, collected.deleted),
            (1, 0),
            "{collected:?}"
        );
        assert_eq!(fill_of(&b, 1).await, 0x77);
    }

    /// A commit that stores again the chunks of a condemned pack, in the same order, builds a
    /// pack of the same content. Were packs named by their content alone, the store would
    /// answer that the pack exists, and the commit would reference the condemned pack, which a
    /// collection that decided before the commit's manifest landed deletes under it. So each
    /// pack carries a random salt: a new pack is always a new object.
    #[tokio::test]
    async fn a_commit_that_stores_a_condemned_packs_chunks_again_stores_its_own_pack() {
        let client = ObjectStoreClient::in_memory();
        let grace_ms = 1000;
        let settings = gc_settings(grace_ms);
        let content = BTreeMap::from([(0, vec![0x55; 4096]), (1, vec![0x66; 4096])]);
        // A pack no point references, condemned by a collection.
        store_unreferenced(&client, &content).await;
        let start = now_ms();
        let collected = collect_garbage(&client, start + grace_ms, &settings)
            .await
            .unwrap();
        assert_eq!(collected.condemned, 1, "{collected:?}");
        // A writer finds it condemned, so it stores the same chunks again.
        let mut view = load_view(&client).await.unwrap();
        assert!(
            !view
                .locations
                .contains(&client.sealing().chunk_id(&content[&0]))
        );
        let mut upload = Upload::default();
        upload_changes(
            &client,
            &mut view,
            &content,
            PackSettings::default(),
            &mut upload,
        )
        .await
        .unwrap();
        assert_eq!(upload.report.packs, 1);
        // A collection marks before the writer's manifest lands: it deletes the condemned
        // pack, and condemns the writer's (old enough by the collection's clock, not needed).
        let collected = collect_garbage(&client, start + 2 * grace_ms, &settings)
            .await
            .unwrap();
        assert_eq!(
            (collected.deleted, collected.condemned),
            (1, 1),
            "{collected:?}"
        );
        create_manifest(
            &client,
            &view,
            ChunkMap::default(),
            ManifestToCreate {
                volume: "v",
                size_bytes: 1 << 20,
                chunk_bytes: 4096,
                point: PointInfo {
                    seq: 1,
                    complete: true,
                    ..PointInfo::default()
                },
            },
            upload,
            PackSettings::default(),
        )
        .await
        .unwrap();
        // The point reads from the writer's pack, which the next collection revives.
        assert_eq!(fill_of(&client, 1).await, 0x55);
        let collected = collect_garbage(&client, start + 3 * grace_ms, &settings)
            .await
            .unwrap();
        assert_eq!(
            (collected.revived, collected.deleted),
            (1, 0),
            "{collected:?}"
        );
        assert_eq!(fill_of(&client, 1).await, 0x55);
        every_point_reads(&client).await.unwrap();
    }

    /// What stopped collections and writers leave: an index and a marker whose pack a
    /// collection deleted before it stopped, and a pack whose writer stopped before its index.
    /// Younger than the grace they are left alone (a commit may be in progress); older, a
    /// collection deletes the first two and gives the pack its index again, after which the
    /// pack is collected like any other.
    #[tokio::test]
    async fn a_collection_clears_what_stopped_collections_and_writers_left() {
        let client = ObjectStoreClient::in_memory();
        let grace_ms = 1000;
        let settings = gc_settings(grace_ms);
        let listed = |prefix: &'static str| {
            let client = client.clone();
            async move { client.list(prefix).await.unwrap().len() }
        };
        // A pack no point references, condemned; a collection then deletes the pack object
        // and stops before its index and marker.
        store_unreferenced(&client, &BTreeMap::from([(0, vec![1; 4096])])).await;
        let start = now_ms();
        let collected = collect_garbage(&client, start + grace_ms, &settings)
            .await
            .unwrap();
        assert_eq!(collected.condemned, 1, "{collected:?}");
        let (stopped, _, _) = client.list("packs").await.unwrap().remove(0);
        client.delete(&stopped).await.unwrap();
        // A pack whose writer stopped before its index.
        let mut builder = new_pack(1 << 20).unwrap();
        builder.add(&[2; 4096], None, client.sealing()).unwrap();
        let unindexed = builder.finish();
        client
            .put_if_absent(&layout::pack_key(&unindexed.id), unindexed.bytes)
            .await
            .unwrap();
        assert_eq!(
            (
                listed("packs").await,
                listed("index").await,
                listed("condemned").await
            ),
            (1, 1, 1)
        );

        // Younger than the grace: left alone.
        let collected = collect_garbage(&client, now_ms(), &settings).await.unwrap();
        assert_eq!(
            (collected.strays_deleted, collected.indexes_rebuilt),
            (0, 0),
            "{collected:?}"
        );
        // Older: a dry run says what it would do, and does nothing.
        let later = start + 2 * grace_ms;
        let dry = GcSettings {
            dry_run: true,
            ..settings
        };
        let planned = collect_garbage(&client, later, &dry).await.unwrap();
        assert_eq!(
            (planned.strays_deleted, planned.indexes_rebuilt),
            (2, 1),
            "{planned:?}"
        );
        assert_eq!(
            (
                listed("packs").await,
                listed("index").await,
                listed("condemned").await
            ),
            (1, 1, 1)
        );
        let collected = collect_garbage(&client, later, &settings).await.unwrap();
        assert_eq!(
            (
                collected.strays_deleted,
                collected.indexes_rebuilt,
                collected.condemned
            ),
            (2, 1, 1),
            "{collected:?}"
        );
        // The index is the one its writer would have sent; only that pack's objects remain.
        let (index, _) = client
            .get(&layout::index_key(&unindexed.id), 1 << 20)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(layout::decode_index(&index, None).unwrap(), unindexed.index);
        assert_eq!(
            (
                listed("packs").await,
                listed("index").await,
                listed("condemned").await
            ),
            (1, 1, 1)
        );
        // A grace after its condemnation the pack goes, and nothing is left.
        let collected = collect_garbage(&client, start + 4 * grace_ms, &settings)
            .await
            .unwrap();
        assert_eq!(collected.deleted, 1, "{collected:?}");
        assert_eq!(
            (
                listed("packs").await,
                listed("index").await,
                listed("condemned").await
            ),
            (0, 0, 0)
        );
    }

    /// A collection with grace `grace_ms`, no repack and default packs.
    fn gc_settings(grace_ms: u64) -> GcSettings {
        GcSettings {
            grace_ms,
            repack_below: 0.0,
            pack: PackSettings::default(),
            dry_run: false,
        }
    }

    /// Stores `content` in packs that no point references (a commit that stored them and
    /// failed before its manifest), deduplicated against a view read now.
    async fn store_unreferenced(
        client: &ObjectStoreClient,
        content: &BTreeMap<u64, Vec<u8>>,
    ) -> CommitReport {
        let mut view = load_view(client).await.unwrap();
        let mut upload = Upload::default();
        upload_changes(
            client,
            &mut view,
            content,
            PackSettings::default(),
            &mut upload,
        )
        .await
        .unwrap();
        upload.report
    }

    /// Commits point `seq` of volume "v" on top of `base`, with chunk 0 holding `fill`.
    async fn commit_fill(
        client: &ObjectStoreClient,
        base: &ChunkMap,
        seq: u64,
        fill: u8,
    ) -> Result<ChunkMap, PointStoreError> {
        let mut view = load_view(client).await.unwrap();
        commit_point(
            client,
            &mut view,
            base,
            PointToCommit {
                volume: "v",
                size_bytes: 1 << 20,
                chunk_bytes: 4096,
                point: PointInfo {
                    seq,
                    complete: true,
                    ..PointInfo::default()
                },
                changes: &BTreeMap::from([(0, vec![fill; 4096])]),
            },
            PackSettings::default(),
        )
        .await
        .map(|(_, map)| map)
    }

    /// The fence against a writer that lost the volume's lease while paused (or whose request
    /// the store applied late): retention leaves tombstones, so the deposed writer cannot
    /// create a point under an emptied name, and its retention's rewrite is conditional.
    #[tokio::test]
    async fn a_deposed_writer_can_neither_recreate_a_dropped_point_nor_undo_a_prune() {
        let client = ObjectStoreClient::in_memory();
        let mut map = ChunkMap::default();
        for seq in 1..=4 {
            map = commit_fill(&client, &map, seq, seq as u8).await.unwrap();
        }
        // The deposed writer read points 1..=3 to prune 2 (next: 3), then paused.
        let deposed_run = layout::PruneRun {
            dropped: vec![2],
            next: 3,
        };
        let (stale_next, stale_tag) = read_manifest_tagged(&client, "v", 3).await.unwrap();
        // The new writer drops 2 and 3 (next: 4).
        let mut report = PruneReport::default();
        prune_run(
            &client,
            "v",
            &layout::PruneRun {
                dropped: vec![2, 3],
                next: 4,
            },
            far_deadline(),
            &mut report,
        )
        .await
        .unwrap();
        assert_eq!((report.dropped, report.rewritten), (2, 1));
        assert_eq!(list_points(&client, "v").await.unwrap(), vec![1, 4]);
        let heads = list_point_heads(&client, "v").await.unwrap();
        assert_eq!(heads.iter().map(|p| p.head.seq).collect::<Vec<_>>(), [1, 4]);
        assert!(matches!(
            read_manifest(&client, "v", 3).await,
            Err(PointStoreError::Missing(_))
        ));

        // The deposed writer resumes: its commit of a new point 3 on top of point 2 (gone)
        // is refused, since the name is taken by the tombstone.
        let mut old_map = read_point(&client, "v", 1).await.unwrap().0;
        old_map.seq = 2;
        let late = commit_fill(&client, &old_map, 3, 0xee).await;
        assert!(
            matches!(late, Err(PointStoreError::Conflict { seq: 3, .. })),
            "{late:?}"
        );
        // Its prune: the rewrite of point 3 is refused (the tombstone is not the manifest
        // it read), and point 3 stays dropped.
        let late = prune_run(
            &client,
            "v",
            &deposed_run,
            far_deadline(),
            &mut PruneReport::default(),
        )
        .await;
        assert!(matches!(late, Err(PointStoreError::Missing(_))), "{late:?}");
        let spliced = layout::encode_manifest(&stale_next);
        let replaced = client
            .replace_if_unchanged(
                &layout::manifest_key("v", 3),
                spliced,
                stale_tag.as_deref().unwrap(),
            )
            .await
            .unwrap();
        assert!(!replaced, "a rewrite under a stale tag went through");
        assert_eq!(list_points(&client, "v").await.unwrap(), vec![1, 4]);
        // Every remaining point reads, and the newest is the new writer's.
        let (newest, _) = read_point(&client, "v", 4).await.unwrap();
        assert_eq!(newest.chunks, map.chunks);
        read_point(&client, "v", 1).await.unwrap();

        // Tombstones go once they are older than the keep time, never before; a collection
        // finds them in its mark's listings.
        assert_eq!(sweep_tombstones(&client, "v", now_ms()).await.unwrap(), 0);
        let later = now_ms() + layout::TOMBSTONE_KEEP_MS + 1000;
        let settings = gc_settings(layout::TOMBSTONE_KEEP_MS * 2);
        let collected = collect_garbage(&client, now_ms(), &settings).await.unwrap();
        assert_eq!(collected.tombstones_swept, 0);
        let collected = collect_garbage(&client, later, &settings).await.unwrap();
        assert_eq!(collected.tombstones_swept, 2, "{collected:?}");
        assert_eq!(sweep_tombstones(&client, "v", later).await.unwrap(), 0);
        assert_eq!(list_points(&client, "v").await.unwrap(), vec![1, 4]);
        assert!(
            client
                .get(&layout::manifest_key("v", 2), 1024)
                .await
                .unwrap()
                .is_none()
        );
    }

    /// A deadline no test reaches: a writer that holds its lease throughout.
    fn far_deadline() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// Whether every listed point of `v` reads.
    async fn every_point_reads(client: &ObjectStoreClient) -> Result<(), PointStoreError> {
        for seq in list_points(client, "v").await? {
            read_point(client, "v", seq).await?;
        }
        Ok(())
    }

    /// What point `seq` of `v` holds at chunk 0.
    async fn chunk_zero(client: &ObjectStoreClient, seq: u64) -> ChunkId {
        read_point(client, "v", seq).await.unwrap().0.chunks[&0]
    }

    /// The open case of the fence by names, and what closes it. Two writers' retention runs
    /// over adjacent points: the deposed one splices point 4 past 3 (onto 2), the new one
    /// splices 3 past 2 (onto 1) and drops 2. Each conditional write sees its own object
    /// unchanged, so the store lets both through, and point 4 then leads to a dropped
    /// point. Only time keeps them apart: the deposed writer sends nothing past its deadline.
    #[tokio::test]
    async fn adjacent_retention_runs_of_two_writers_are_kept_apart_by_the_write_deadline() {
        let client = ObjectStoreClient::in_memory();
        let mut map = ChunkMap::default();
        for seq in 1..=5 {
            map = commit_fill(&client, &map, seq, seq as u8).await.unwrap();
        }
        let fours = chunk_zero(&client, 4).await;
        // Without a deadline: the deposed writer read 4 (its kept point) and 3, and paused.
        let (next, tag) = read_manifest_tagged(&client, "v", 4).await.unwrap();
        let dropped = read_manifest(&client, "v", 3).await.unwrap();
        let stale_splice = layout::splice(&[dropped], &next).unwrap().unwrap();
        assert_eq!(stale_splice.base, Some(2));
        // The new writer drops 2 (next: 3).
        let mut report = PruneReport::default();
        let run = layout::PruneRun {
            dropped: vec![2],
            next: 3,
        };
        prune_run(&client, "v", &run, far_deadline(), &mut report)
            .await
            .unwrap();
        assert_eq!((report.dropped, report.rewritten), (1, 1));
        every_point_reads(&client).await.unwrap();
        // The deposed writer resumes: its rewrite of 4 is conditional on 4 only, which nobody
        // changed, so the store takes it, and point 4 leads to point 2, dropped.
        let key = layout::manifest_key("v", 4);
        let e_tag = tag.unwrap();
        let stored_before = client.get(&key, MAX_MANIFEST_BYTES).await.unwrap().unwrap();
        assert!(
            client
                .replace_if_unchanged(&key, layout::encode_manifest(&stale_splice), &e_tag)
                .await
                .unwrap(),
            "the store refused the stale splice: the hazard this test shows is gone"
        );
        let broken = read_point(&client, "v", 4).await;
        assert!(
            matches!(&broken, Err(PointStoreError::Missing(key)) if key.ends_with("02")),
            "{broken:?}"
        );
        // (Put back what the new writer had left, to run the same race through prune_run.)
        client.put(&key, stored_before.0).await.unwrap();
        assert_eq!(chunk_zero(&client, 4).await, fours);

        // Through prune_run, the deposed writer's deadline passed while it was paused: it
        // reads, and then writes nothing, neither the rewrite nor a tombstone.
        let passed = Instant::now();
        let deposed_run = layout::PruneRun {
            dropped: vec![3],
            next: 4,
        };
        let mut report = PruneReport::default();
        let late = prune_run(&client, "v", &deposed_run, passed, &mut report).await;
        assert!(
            matches!(late, Err(PointStoreError::LeaseDeadline { seq: 4, .. })),
            "{late:?}"
        );
        assert_eq!(report, PruneReport::default());
        assert_eq!(list_points(&client, "v").await.unwrap(), vec![1, 3, 4, 5]);
        every_point_reads(&client).await.unwrap();
        assert_eq!(chunk_zero(&client, 4).await, fours);
        let (newest, _) = read_point(&client, "v", 5).await.unwrap();
        assert_eq!(newest.chunks, map.chunks);
    }

    /// A run cut short after its rewrite (a deadline, a failed tombstone, a crash) is taken up
    /// again at its tombstones: the kept point already leads past the run.
    #[tokio::test]
    async fn a_run_cut_short_after_its_rewrite_is_finished_by_the_next() {
        let client = ObjectStoreClient::in_memory();
        let mut map = ChunkMap::default();
        for seq in 1..=4 {
            map = commit_fill(&client, &map, seq, seq as u8).await.unwrap();
        }
        // The rewrite of 4 past 2 and 3, and the tombstone of 3; then the run stopped.
        let (next, tag) = read_manifest_tagged(&client, "v", 4).await.unwrap();
        let dropped = [
            read_manifest(&client, "v", 2).await.unwrap(),
            read_manifest(&client, "v", 3).await.unwrap(),
        ];
        let spliced = layout::splice(&dropped, &next).unwrap().unwrap();
        assert!(
            client
                .replace_if_unchanged(
                    &layout::manifest_key("v", 4),
                    layout::encode_manifest(&spliced),
                    &tag.unwrap()
                )
                .await
                .unwrap()
        );
        client
            .put(&layout::manifest_key("v", 3), layout::TOMBSTONE.to_vec())
            .await
            .unwrap();
        assert_eq!(list_points(&client, "v").await.unwrap(), vec![1, 2, 4]);
        // The next retention plans the run that is left, 2 (next: 4), and finishes it.
        let seqs = list_points(&client, "v").await.unwrap();
        let runs = layout::prune_runs(&seqs, &std::collections::BTreeSet::from([1, 4]));
        assert_eq!(runs.len(), 1);
        // Past the deadline, not even a tombstone is written.
        let mut report = PruneReport::default();
        let late = prune_run(&client, "v", &runs[0], Instant::now(), &mut report).await;
        assert!(
            matches!(late, Err(PointStoreError::LeaseDeadline { seq: 2, .. })),
            "{late:?}"
        );
        assert_eq!(report, PruneReport::default());
        assert_eq!(list_points(&client, "v").await.unwrap(), vec![1, 2, 4]);
        prune_run(&client, "v", &runs[0], far_deadline(), &mut report)
            .await
            .unwrap();
        assert_eq!((report.dropped, report.rewritten), (1, 0));
        assert_eq!(list_points(&client, "v").await.unwrap(), vec![1, 4]);
        let (newest, _) = read_point(&client, "v", 4).await.unwrap();
        assert_eq!(newest.chunks, map.chunks);
        // A kept point that leads into the middle of what it should lead past is refused.
        let mut client_map = ChunkMap::default();
        let other = ObjectStoreClient::in_memory();
        for seq in 1..=4 {
            client_map = commit_fill(&other, &client_map, seq, seq as u8)
                .await
                .unwrap();
        }
        let odd = prune_run(
            &other,
            "v",
            &layout::PruneRun {
                dropped: vec![1, 2],
                next: 4,
            },
            far_deadline(),
            &mut PruneReport::default(),
        )
        .await;
        assert!(
            matches!(odd, Err(PointStoreError::Layout { .. })),
            "{odd:?}"
        );
        assert_eq!(list_points(&other, "v").await.unwrap(), vec![1, 2, 3, 4]);
    }

    use super::wall_clock_ms as now_ms;

    fn entry(seed: u8, offset: u64, stored_len: u32) -> layout::IndexEntry {
        layout::IndexEntry {
            sealed: false,
            id: [seed; 32],
            offset,
            stored_len,
            raw_len: stored_len,
            codec: layout::Codec::Raw,
        }
    }

    #[test]
    fn a_point_is_read_in_runs_of_adjacent_chunks_of_one_pack_up_to_the_run_limit() {
        let (p, q) = ([1u8; 32], [2u8; 32]);
        let mut locations = ChunkLocations::default();
        // Pack p: chunks 1..=3 back to back, then a gap, then one more; pack q: one chunk
        // that two places of the volume share (dedup), and one large one.
        let big = MAX_READ_RUN as u32 - 100;
        locations.add(
            p,
            &[
                entry(1, 0, 100),
                entry(2, 100, 100),
                entry(3, 200, 100),
                entry(4, 1000, 100),
            ],
            false,
        );
        locations.add(q, &[entry(5, 0, 200), entry(6, 200, big)], false);
        let mut map = ChunkMap::default();
        for (chunk, seed) in [
            (0, 1),
            (1, 2),
            (2, 3),
            (3, 4),
            (4, 5),
            (5, 6),
            (6, 5),
            (7, 1),
        ] {
            map.chunks.insert(chunk, [seed; 32]);
        }
        let runs = plan_reads(&locations, &map).unwrap();
        let shape: Vec<(PackId, u64, u64, Vec<u64>)> = runs
            .iter()
            .map(|r| {
                (
                    r.pack,
                    r.offset,
                    r.len,
                    r.chunks.iter().map(|c| c.0).collect(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (p, 0, 300, vec![0, 1, 2]),
                (p, 1000, 100, vec![3]),
                // 200 + big would pass the limit: two reads.
                (q, 0, 200, vec![4]),
                (q, 200, u64::from(big), vec![5]),
                (q, 0, 200, vec![6]),
                (p, 0, 100, vec![7]),
            ]
        );
        // A chunk no pack holds is reported, not skipped.
        map.chunks.insert(8, [9; 32]);
        assert!(matches!(
            plan_reads(&locations, &map),
            Err(PointStoreError::Missing(_))
        ));
    }

    #[test]
    fn pack_ids_parse_from_their_keys_only_when_well_formed() {
        let id = [0xab; 32];
        assert_eq!(parse_id(&layout::hex(&id)), Some(id));
        assert_eq!(parse_id("ab"), None);
        assert_eq!(parse_id(&"zz".repeat(32)), None);
        assert_eq!(parse_id(&"é".repeat(32)), None);
    }
}
