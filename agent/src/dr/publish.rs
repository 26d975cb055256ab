//! A receiver's points published to the shared object store.
//!
//! With a `[store]` section, a receiver still journals and applies every cycle in its data
//! directory (the commit protocol of [`crate::dr::volume`] is unchanged), and then, before it
//! tells the agent `Committed`, it publishes the new point to the object store
//! ([`crate::dr::objpoints`]): the chunks that changed since the point the store last got,
//! read from the image, deduplicated against every pack in the store, packed, uploaded, and
//! committed by creating the point's manifest. So an agent is told a cycle is committed only
//! once it is on the distributed store, and losing the receiver's machine loses no point the
//! agent was told about.
//!
//! # Failure
//!
//! If the store cannot take the point (unreachable, refusing, another receiver holding the
//! volume), the cycle is committed locally but not acknowledged: the agent is refused with a
//! storage error and retries. When it comes back, the receiver first publishes what the store
//! lacks, then welcomes it with the committed cycle, which the agent already knows how to
//! read (an acknowledgement lost on the wire). Nothing is lost, and no point is reported that
//! the store does not hold.
//!
//! # One writer
//!
//! Before it publishes, the receiver takes or renews the volume's lease in the store
//! ([`crate::dr::lease`]). A volume whose lease another receiver holds is refused, and so is a
//! volume whose newest point in the store is newer than this receiver's: another receiver has
//! served it since, and fetching a volume from the store into a receiver is not built yet.
//! The manifest's conditional create decides any race that remains: two writers of one point
//! cannot both commit it.
//!
//! Not built yet: retention on the store (every published point is kept), serving a volume
//! from the store alone, agents given several receivers, and the fencing token in manifests.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use blkmirror_protocol::wire::PointInfo;
use thiserror::Error;

use crate::dr::{
    layout::ChunkMap,
    objpoints::{self, CommitReport, ManifestToCreate, PackSettings, PointStoreError, StoreView},
    objstore::{LeaseOutcome, ObjectStoreClient, StoreConfig, StoreError as ObjectStoreError},
    volume::{StoreError, Volume},
};

/// Bytes of changed chunks read from the image and uploaded at a time.
const BATCH_BYTES: u64 = 64 << 20;

/// Errors of publishing to the store.
#[derive(Debug, Error)]
pub enum PublishError {
    /// The store failed or refused.
    #[error(transparent)]
    Store(#[from] PointStoreError),
    /// Another receiver holds the volume.
    #[error(
        "volume {volume} is written to the object store by receiver {holder} (its lease runs \
         for {remaining_s} s more); this receiver does not publish it"
    )]
    LeaseHeld {
        /// The volume.
        volume: String,
        /// Who holds it.
        holder: String,
        /// Seconds left on its lease.
        remaining_s: u64,
    },
    /// The store is ahead of this receiver's copy.
    #[error(
        "volume {volume}: the object store holds point {store_seq}, newer than this \
         receiver's point {local_seq}; another receiver has served this volume since, and \
         fetching a volume from the store into a receiver is not built yet"
    )]
    StoreAhead {
        /// The volume.
        volume: String,
        /// The store's newest point.
        store_seq: u64,
        /// This receiver's.
        local_seq: u64,
    },
    /// The local copy failed.
    #[error(transparent)]
    Local(#[from] StoreError),
}

impl From<ObjectStoreError> for PublishError {
    fn from(error: ObjectStoreError) -> Self {
        Self::Store(PointStoreError::Store(error))
    }
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReport {
    /// The point published.
    pub seq: u64,
    /// The store's point it is a change against (`None`: the volume's first there, or one
    /// this receiver could not relate to its own, so every chunk was sent).
    pub against: Option<u64>,
    /// What the commit did.
    pub commit: CommitReport,
    /// How long it took, in milliseconds.
    pub elapsed_ms: u64,
}

/// The store's health as this receiver sees it, for `status` and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreHealth {
    /// The endpoint and bucket.
    pub store: String,
    /// Whether the last request to the store succeeded.
    pub reachable: bool,
    /// The last error, if the last publish failed.
    pub last_error: Option<String>,
    /// How long the last publish took, in milliseconds.
    pub last_publish_ms: u64,
    /// Points published since the receiver started.
    pub published: u64,
    /// Bytes uploaded since the receiver started.
    pub uploaded_bytes: u64,
    /// Chunks found in the store already (not uploaded) since the receiver started.
    pub deduplicated_chunks: u64,
    /// Chunks published since the receiver started.
    pub changed_chunks: u64,
}

/// The store's newest point of a volume as this receiver last published or read it.
struct Published {
    seq: u64,
    time_unix_ms: u64,
    map: ChunkMap,
}

/// What this receiver has of a volume.
enum Local {
    /// No point at all (a volume new here).
    NoPoint,
    /// A point that is not one to publish (an unfinished sync: the image is no point in time).
    NotPublishable,
    /// The newest committed point, complete.
    Point(PointInfo),
}

/// Publishes receivers' points to one store.
pub struct Publisher {
    client: ObjectStoreClient,
    holder: String,
    settings: PackSettings,
    lease_for: Duration,
    /// What the store holds, shared by the volumes (reloaded when old).
    view: tokio::sync::Mutex<Option<StoreView>>,
    /// Per volume: the store's newest point.
    volumes: tokio::sync::Mutex<HashMap<String, Published>>,
    health: Mutex<StoreHealth>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Publisher {
    /// A publisher for `config`, naming itself `holder` in leases.
    pub fn new(config: &StoreConfig, holder: String) -> Result<Self, ObjectStoreError> {
        Ok(Self {
            client: ObjectStoreClient::connect(config)?,
            holder,
            settings: PackSettings::default(),
            lease_for: Duration::from_secs(60),
            view: tokio::sync::Mutex::new(None),
            volumes: tokio::sync::Mutex::new(HashMap::new()),
            health: Mutex::new(StoreHealth {
                store: format!("{} bucket {}", config.endpoint, config.bucket),
                ..StoreHealth::default()
            }),
        })
    }

    /// The store's health.
    pub fn health(&self) -> StoreHealth {
        self.health.lock().expect("health lock").clone()
    }

    /// Publishes `volume`'s newest complete point if the store lacks it. Returns what was
    /// published (`None`: the store was up to date, or the volume has no complete point).
    pub async fn publish(
        &self,
        volume: &Arc<Mutex<Volume>>,
    ) -> Result<Option<PublishReport>, PublishError> {
        let started = Instant::now();
        let result = self.publish_inner(volume, started).await;
        let mut health = self.health.lock().expect("health lock");
        match &result {
            Ok(report) => {
                health.reachable = true;
                health.last_error = None;
                if let Some(report) = report {
                    health.last_publish_ms = report.elapsed_ms;
                    health.published += 1;
                    health.uploaded_bytes += report.commit.uploaded_bytes;
                    health.deduplicated_chunks += report.commit.deduplicated_chunks;
                    health.changed_chunks += report.commit.changed_chunks;
                }
            }
            Err(error) => {
                health.reachable = !matches!(error, PublishError::Store(_));
                health.last_error = Some(error.to_string());
            }
        }
        result
    }

    async fn hold_lease(&self, volume: &str) -> Result<(), PublishError> {
        let now = now_ms();
        match self
            .client
            .acquire_lease(volume, &self.holder, now, self.lease_for.as_millis() as u64)
            .await?
        {
            LeaseOutcome::Holding(_) => Ok(()),
            LeaseOutcome::Held { holder, expires_ms } => Err(PublishError::LeaseHeld {
                volume: volume.to_owned(),
                holder,
                remaining_s: expires_ms.saturating_sub(now).div_ceil(1000),
            }),
            LeaseOutcome::LostRace => Err(PublishError::LeaseHeld {
                volume: volume.to_owned(),
                holder: "another receiver (it changed the lease as this one took it)".into(),
                remaining_s: self.lease_for.as_secs(),
            }),
        }
    }

    /// The store's newest point of `volume` (from the cache, or read).
    async fn newest(&self, volume: &str) -> Result<Option<Published>, PublishError> {
        let seqs = objpoints::list_points(&self.client, volume).await?;
        let Some(&seq) = seqs.last() else {
            return Ok(None);
        };
        let (map, manifest) = objpoints::read_point(&self.client, volume, seq).await?;
        Ok(Some(Published {
            seq,
            time_unix_ms: manifest.point.time_unix_ms,
            map,
        }))
    }

    async fn publish_inner(
        &self,
        volume: &Arc<Mutex<Volume>>,
        started: Instant,
    ) -> Result<Option<PublishReport>, PublishError> {
        let (name, local, size_bytes, chunk_bytes) = {
            let volume = volume.lock().expect("volume lock");
            let meta = volume.meta();
            let local = match &meta.last_point {
                None => Local::NoPoint,
                Some(point) if !meta.unsettled && point.seq == meta.committed_seq => {
                    let point = point.to_wire();
                    if point.complete {
                        Local::Point(point)
                    } else {
                        Local::NotPublishable
                    }
                }
                Some(_) => Local::NotPublishable,
            };
            (
                meta.volume.clone(),
                local,
                meta.size_bytes,
                meta.chunk_bytes,
            )
        };
        // The lease first, even with nothing to publish: an agent is refused before it syncs
        // to a receiver that may not write the volume.
        self.hold_lease(&name).await?;
        let mut volumes = self.volumes.lock().await;
        let base = match volumes.remove(&name) {
            Some(cached) => Some(cached),
            None => self.newest(&name).await?,
        };
        let point = match (local, &base) {
            (Local::Point(point), _) => point,
            (Local::NoPoint, Some(newest)) => {
                return Err(PublishError::StoreAhead {
                    volume: name,
                    store_seq: newest.seq,
                    local_seq: 0,
                });
            }
            (Local::NoPoint | Local::NotPublishable, _) => {
                if let Some(base) = base {
                    volumes.insert(name, base);
                }
                return Ok(None);
            }
        };
        if let Some(newest) = &base {
            if newest.seq == point.seq && newest.time_unix_ms == point.time_unix_ms {
                volumes.insert(name, base.expect("the store's newest point"));
                return Ok(None);
            }
            if newest.seq >= point.seq {
                return Err(PublishError::StoreAhead {
                    volume: name.clone(),
                    store_seq: newest.seq,
                    local_seq: point.seq,
                });
            }
        }
        // The chunks that differ between the store's point and ours: the local deltas lead
        // back to it if this receiver published it and still keeps it; otherwise every chunk.
        let chunk_count = size_bytes.div_ceil(chunk_bytes.max(1));
        let (ranges, against) = {
            let volume = volume.lock().expect("volume lock");
            let related = base.as_ref().and_then(|base| {
                let kept = volume.meta().points.iter().find(|p| p.seq == base.seq)?;
                if kept.time_unix_ms != base.time_unix_ms {
                    return None;
                }
                let map = volume.store().map_point(point.seq, base.seq).ok()?;
                Some((map.changed_chunks(), base.seq))
            });
            match related {
                Some((ranges, seq)) => (ranges, Some(seq)),
                None => (vec![(0, chunk_count)], None),
            }
        };
        let base_map = match (&base, against) {
            (Some(base), Some(_)) => base.map.clone(),
            _ => ChunkMap::default(),
        };
        let mut view_slot = self.view.lock().await;
        let stale = view_slot
            .as_ref()
            .is_none_or(|view| view.read_at.elapsed() > self.settings.max_view_age / 2);
        if stale {
            *view_slot = Some(objpoints::load_view(&self.client).await?);
        }
        let view = view_slot.as_mut().expect("a view was loaded");
        let mut upload = objpoints::Upload::default();
        let per_batch = (BATCH_BYTES / chunk_bytes.max(1)).max(1);
        let mut chunks = ranges.into_iter().flat_map(|(first, end)| first..end);
        let mut lease_renewed = Instant::now();
        loop {
            let batch: Vec<u64> = chunks.by_ref().take(per_batch as usize).collect();
            if batch.is_empty() {
                break;
            }
            let changes = {
                let volume = volume.clone();
                tokio::task::spawn_blocking(move || {
                    let volume = volume.lock().expect("volume lock");
                    batch
                        .into_iter()
                        .map(|chunk| Ok((chunk, volume.read_chunk(chunk)?)))
                        .collect::<Result<BTreeMap<u64, Vec<u8>>, StoreError>>()
                })
                .await
                .expect("read task")?
            };
            objpoints::upload_changes(&self.client, view, &changes, self.settings, &mut upload)
                .await?;
            if lease_renewed.elapsed() > self.lease_for / 3 {
                self.hold_lease(&name).await?;
                lease_renewed = Instant::now();
            }
        }
        self.hold_lease(&name).await?;
        let seq = point.seq;
        let time_unix_ms = point.time_unix_ms;
        let (commit, map) = objpoints::create_manifest(
            &self.client,
            view,
            &base_map,
            ManifestToCreate {
                volume: &name,
                size_bytes,
                chunk_bytes,
                point,
            },
            upload,
            self.settings,
        )
        .await?;
        volumes.insert(
            name,
            Published {
                seq,
                time_unix_ms,
                map,
            },
        );
        Ok(Some(PublishReport {
            seq,
            against,
            commit,
            elapsed_ms: started.elapsed().as_millis() as u64,
        }))
    }
}
