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
//! Not built yet: the receiver's commit path on this (today's receivers still commit to their
//! data directory), the garbage collector's driver, encryption.

use std::collections::BTreeMap;

use crate::dr::layout::{
    self, ChunkId, ChunkLocations, ChunkMap, LayoutError, Manifest, PackBuilder, PackId,
};
use crate::dr::objstore::{Created, ObjectStoreClient, StoreError};
use blkmirror_protocol::wire::PointInfo;

/// The largest manifest read (a full manifest of [`layout::MAX_MANIFEST_ENTRIES`] references
/// is larger; such volumes are not supported yet).
const MAX_MANIFEST_BYTES: usize = 256 << 20;

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
}

impl Default for PackSettings {
    fn default() -> Self {
        Self {
            target_bytes: 32 << 20,
            level: Some(3),
        }
    }
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

async fn upload_pack(
    client: &ObjectStoreClient,
    builder: PackBuilder,
    locations: &mut ChunkLocations,
    report: &mut CommitReport,
) -> Result<(), PointStoreError> {
    let pack = builder.finish();
    let index = layout::encode_index(&pack.index);
    report.packs += 1;
    report.uploaded_bytes += (pack.bytes.len() + index.len()) as u64;
    // Content-addressed: a pack (or index) of this name already there is this very object.
    client
        .put_if_absent(&layout::pack_key(&pack.id), pack.bytes)
        .await?;
    client
        .put_if_absent(&layout::index_key(&pack.id), index)
        .await?;
    locations.add(pack.id, &pack.index);
    Ok(())
}

/// Commits `commit` on top of `base` (the volume's newest point, or an empty map for its
/// first): uploads what the store lacks, then creates the manifest. `locations` is every pack
/// index known (updated with the new packs). Returns the report and the map at the new point.
pub async fn commit_point(
    client: &ObjectStoreClient,
    locations: &mut ChunkLocations,
    base: &ChunkMap,
    commit: PointToCommit<'_>,
    settings: PackSettings,
) -> Result<(CommitReport, ChunkMap), PointStoreError> {
    let mut report = CommitReport {
        changed_chunks: commit.changes.len() as u64,
        ..CommitReport::default()
    };
    let mut references: BTreeMap<u64, Option<ChunkId>> = BTreeMap::new();
    let mut builder = PackBuilder::new(settings.target_bytes);
    for (&chunk, content) in commit.changes {
        if content.iter().all(|&b| b == 0) {
            references.insert(chunk, None);
            continue;
        }
        let id = layout::chunk_id(content);
        references.insert(chunk, Some(id));
        if locations.contains(&id) || builder.contains(&id) {
            report.deduplicated_chunks += 1;
            continue;
        }
        builder
            .add(content, settings.level)
            .map_err(layout_error(commit.volume))?;
        if builder.is_full() {
            let full = std::mem::replace(&mut builder, PackBuilder::new(settings.target_bytes));
            upload_pack(client, full, locations, &mut report).await?;
        }
    }
    if !builder.is_empty() {
        upload_pack(client, builder, locations, &mut report).await?;
    }
    let seq = commit.point.seq;
    let (manifest, map) = base.next_manifest(
        commit.volume,
        commit.point,
        commit.size_bytes,
        commit.chunk_bytes,
        &references,
    );
    // Never a manifest whose chunks the store lacks.
    let missing = locations.missing(&map);
    if let Some(chunk) = missing.first() {
        return Err(PointStoreError::Missing(format!(
            "chunk {chunk} of point {seq} of volume {} ({} chunks in all)",
            commit.volume,
            missing.len()
        )));
    }
    report.delta = manifest.base.is_some();
    let bytes = layout::encode_manifest(&manifest);
    report.manifest_bytes = bytes.len() as u64;
    match client
        .put_if_absent(&layout::manifest_key(commit.volume, seq), bytes)
        .await?
    {
        Created::Created => Ok((report, map)),
        Created::AlreadyExists => Err(PointStoreError::Conflict {
            volume: commit.volume.to_owned(),
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
    let key = layout::manifest_key(volume, seq);
    let (bytes, _) = client
        .get(&key, MAX_MANIFEST_BYTES)
        .await?
        .ok_or_else(|| PointStoreError::Missing(key.clone()))?;
    let manifest = layout::decode_manifest(&bytes).map_err(layout_error(&key))?;
    if manifest.volume != volume || manifest.seq != seq {
        return Err(PointStoreError::Layout {
            key,
            source: LayoutError::Malformed {
                what: "manifest",
                detail: format!("holds point {} of volume {}", manifest.seq, manifest.volume),
            },
        });
    }
    Ok(manifest)
}

/// What point `seq` of `volume` holds: its manifest and the ones back to the last full
/// manifest (at most [`layout::FULL_EVERY`]), applied in order.
pub async fn read_point(
    client: &ObjectStoreClient,
    volume: &str,
    seq: u64,
) -> Result<(ChunkMap, Manifest), PointStoreError> {
    let newest = read_manifest(client, volume, seq).await?;
    let mut chain = vec![newest];
    while let Some(base) = chain.last().and_then(|m| m.base) {
        let manifest = read_manifest(client, volume, base).await?;
        let expected = chain.last().map_or(0, |m| m.chain - 1);
        if manifest.chain != expected {
            return Err(PointStoreError::Layout {
                key: layout::manifest_key(volume, base),
                source: LayoutError::Malformed {
                    what: "manifest",
                    detail: format!(
                        "at chain length {}, where its successor says {expected}",
                        manifest.chain
                    ),
                },
            });
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

/// The points of `volume` in the store, oldest first.
pub async fn list_points(
    client: &ObjectStoreClient,
    volume: &str,
) -> Result<Vec<u64>, PointStoreError> {
    let prefix = format!("volumes/{volume}/manifests");
    let mut seqs: Vec<u64> = client
        .list(&prefix)
        .await?
        .into_iter()
        .filter_map(|(key, _, _)| key.rsplit('/').next()?.parse().ok())
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

fn parse_id(hex: &str) -> Option<PackId> {
    if hex.len() != 64 {
        return None;
    }
    let mut id = [0u8; 32];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// Every pack index in the store, each checked against its pack's size.
pub async fn load_locations(client: &ObjectStoreClient) -> Result<ChunkLocations, PointStoreError> {
    let pack_sizes: BTreeMap<PackId, u64> = client
        .list("packs")
        .await?
        .into_iter()
        .filter_map(|(key, size, _)| Some((parse_id(key.rsplit('/').next()?)?, size)))
        .collect();
    let mut locations = ChunkLocations::default();
    for (key, _, _) in client.list("index").await? {
        let Some(id) = key.rsplit('/').next().and_then(parse_id) else {
            continue;
        };
        // An index whose pack is gone (garbage collected, or never finished) locates nothing.
        let Some(&pack_len) = pack_sizes.get(&id) else {
            continue;
        };
        let Some((bytes, _)) = client.get(&key, MAX_INDEX_BYTES).await? else {
            continue;
        };
        let index = layout::decode_index(&bytes, Some(pack_len)).map_err(layout_error(&key))?;
        locations.add(id, &index);
    }
    Ok(locations)
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
    let key = layout::pack_key(pack);
    let stored = client
        .get_range(&key, entry.offset, u64::from(entry.stored_len))
        .await?;
    layout::chunk_from_stored(&stored, entry).map_err(layout_error(&key))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_ids_parse_from_their_keys_only_when_well_formed() {
        let id = [0xab; 32];
        assert_eq!(parse_id(&layout::hex(&id)), Some(id));
        assert_eq!(parse_id("ab"), None);
        assert_eq!(parse_id(&"zz".repeat(32)), None);
        assert_eq!(parse_id(&"é".repeat(32)), None);
    }
}
