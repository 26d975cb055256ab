//! A point read straight from the object store, for `export`, `mount` and `drill` with
//! `--from-store`: the DR site serves or drills a point with no receiver and no data
//! directory, as `restore --from-store` restores one.
//!
//! Opening reads the point's manifests (its chunk map) and the pack indexes (where each chunk
//! is), then each read fetches the chunks it touches by ranged GETs of their packs, checks each
//! against its id (decrypting first in an encrypted store), and keeps the last
//! [`CACHED_CHUNKS`] chunks: a client's small reads within one chunk cost one GET. A point's
//! content never changes, and its packs outlive a retention that drops it by at least the
//! collection's grace (an hour by default); an export from the store is meant for minutes to
//! hours (a check, a drill, a copy), and a read after its pack was collected fails with the
//! store's "not found", not with wrong data.

use std::{
    collections::{HashMap, VecDeque},
    io,
    sync::{Arc, Mutex},
};

use crate::dr::{
    export::PointSource,
    layout::{self, ChunkLocations, ChunkMap},
    objpoints::{self, PointStoreError},
    objstore::{ObjectStoreClient, StoreConfig},
    ops::{OpsError, PointSelector},
    stored::StoredPoint,
};

/// Chunks kept after their read (64 MiB at the default 64 KiB chunk).
pub const CACHED_CHUNKS: usize = 1024;

/// Chunks fetched at once for one read.
const PARALLEL_FETCHES: usize = 8;

/// One point of a volume in the object store.
pub struct StorePointView {
    runtime: tokio::runtime::Runtime,
    client: ObjectStoreClient,
    volume: String,
    point: StoredPoint,
    size: u64,
    chunk_bytes: u64,
    map: ChunkMap,
    locations: ChunkLocations,
    cache: Mutex<ChunkCache>,
}

/// The last chunks read, oldest first out.
#[derive(Default)]
struct ChunkCache {
    chunks: HashMap<u64, Arc<Vec<u8>>>,
    order: VecDeque<u64>,
}

impl ChunkCache {
    fn get(&self, chunk: u64) -> Option<Arc<Vec<u8>>> {
        self.chunks.get(&chunk).cloned()
    }

    fn put(&mut self, chunk: u64, content: Arc<Vec<u8>>) {
        if self.chunks.insert(chunk, content).is_none() {
            self.order.push_back(chunk);
        }
        while self.order.len() > CACHED_CHUNKS {
            if let Some(old) = self.order.pop_front() {
                self.chunks.remove(&old);
            }
        }
    }
}

impl StorePointView {
    /// Opens the point `selector` names of `volume` in the store of `store`.
    pub fn open(
        store: &StoreConfig,
        volume: &str,
        selector: &PointSelector,
    ) -> Result<Self, OpsError> {
        if *selector == PointSelector::All {
            return Err(OpsError::Usage(
                "an export serves one point, not --at all".into(),
            ));
        }
        let (runtime, client) = crate::dr::fromstore::open(store, volume)?;
        let (map, manifest, locations) = runtime.block_on(async {
            let seq = crate::dr::fromstore::choose(&client, store, volume, selector).await?[0];
            let (point, view) = tokio::join!(
                objpoints::read_point(&client, volume, seq),
                objpoints::load_view(&client)
            );
            let (map, manifest) = point.map_err(crate::dr::fromstore::classify)?;
            let view = view.map_err(crate::dr::fromstore::classify)?;
            Ok::<_, OpsError>((map, manifest, view.locations))
        })?;
        Ok(Self {
            runtime,
            client,
            volume: volume.to_owned(),
            point: StoredPoint::received(&manifest.point, manifest.point.received_unix_ms),
            size: manifest.size_bytes,
            chunk_bytes: manifest.chunk_bytes,
            map,
            locations,
            cache: Mutex::new(ChunkCache::default()),
        })
    }

    /// The store's client (the drill keeps its record there).
    pub fn client(&self) -> &ObjectStoreClient {
        &self.client
    }

    /// Runs `work` on the view's runtime.
    pub fn block_on<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(work)
    }

    /// Chunk `chunk`'s content (`None`: zeros), from the cache or the store.
    async fn fetch(&self, chunk: u64) -> Result<Option<Arc<Vec<u8>>>, PointStoreError> {
        let Some(id) = self.map.chunks.get(&chunk) else {
            return Ok(None);
        };
        if let Some(content) = self.cache.lock().expect("not poisoned").get(chunk) {
            return Ok(Some(content));
        }
        let (pack, entry) = self.locations.get(id).ok_or_else(|| {
            PointStoreError::Missing(format!(
                "chunk {} of point {} of volume {}",
                layout::hex(id),
                self.point.seq,
                self.volume
            ))
        })?;
        let key = layout::pack_key(&pack);
        let stored = self
            .client
            .get_range(&key, entry.offset, entry.stored_len as u64)
            .await
            .map_err(PointStoreError::Store)?;
        let content = layout::chunk_from_stored(&stored, &entry, self.client.sealing())
            .map_err(|source| PointStoreError::Layout { key, source })?;
        let content = Arc::new(content);
        self.cache
            .lock()
            .expect("not poisoned")
            .put(chunk, content.clone());
        Ok(Some(content))
    }
}

impl PointSource for StorePointView {
    fn point(&self) -> &StoredPoint {
        &self.point
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|end| *end <= self.size)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if buf.is_empty() {
            return Ok(());
        }
        let chunks: Vec<u64> =
            (offset / self.chunk_bytes..end.div_ceil(self.chunk_bytes)).collect();
        for window in chunks.chunks(PARALLEL_FETCHES) {
            let fetched = self.runtime.block_on(async {
                let mut all = Vec::with_capacity(window.len());
                // Fetched together: a read spanning several chunks waits for one round trip.
                let results =
                    futures_util::future::join_all(window.iter().map(|&chunk| self.fetch(chunk)))
                        .await;
                for (chunk, result) in window.iter().zip(results) {
                    all.push((*chunk, result));
                }
                all
            });
            for (chunk, result) in fetched {
                let content = result.map_err(|error| match &error {
                    PointStoreError::Layout {
                        source: layout::LayoutError::ChunkMismatch(_),
                        ..
                    } => io::Error::new(io::ErrorKind::InvalidData, error.to_string()),
                    _ => io::Error::other(error.to_string()),
                })?;
                let start = chunk * self.chunk_bytes;
                let from = offset.max(start);
                let to = end.min(start + self.chunk_bytes);
                let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
                match content {
                    Some(content) => out
                        .copy_from_slice(&content[(from - start) as usize..(to - start) as usize]),
                    None => out.fill(0),
                }
            }
        }
        Ok(())
    }
}
