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
//! # One writer, any receiver
//!
//! Before it publishes, the receiver takes or renews the volume's lease in the store
//! ([`crate::dr::lease`]); a volume whose lease another receiver holds is refused. The store
//! records each volume's source (`volumes/VOLUME/source`: the device's identity and geometry),
//! and a receiver refuses a volume of the same name from another source. When the store holds
//! a newer point of the volume than this receiver does (another receiver served it since, or
//! this receiver never had it), the receiver **fetches** that point into its data directory
//! ([`Volume::begin_adopting`]) before it welcomes the agent, which then carries on from it as
//! it would with the receiver that committed it. That is what lets an agent move to another
//! receiver when its receiver dies: the data directory is a cache of the store. The
//! manifest's conditional create decides any race that remains: two writers of one point
//! cannot both commit it.
//!
//! # Retention and garbage collection
//!
//! After each publish, the receiver applies the volume's retention policy (the one its data
//! directory applies, aged by the receiver's clock, pinned points kept) to the volume's points
//! in the store, under the volume's lease: the points it drops are spliced out of the chain
//! ([`objpoints::prune_run`]). Their chunks are freed by garbage collection, which a receiver
//! runs every `gc_every` if it gets the store-wide collection lease, or an operator runs with
//! `blkmirror store gc`.
//!
//! # Concurrency
//!
//! A receiver's volumes publish side by side. The pack view (every chunk's location) is
//! shared: it is locked to look a batch's chunks up and to add the packs a batch stored, not
//! while packs upload; two volumes storing one new chunk at once both store it (a collection
//! keeps one copy). A point whose chunks the view lacks (another receiver stored them since
//! the view was read) reads the view again before it is fetched or committed on.
//!
//! # A writer that lost its lease
//!
//! A receiver paused past its lease (a stop, a swap storm, a request the store applies late)
//! may resume and write after another receiver took the volume over. The store fences it
//! without a token check: a point's name is never free twice (retention leaves a tombstone,
//! [`layout::TOMBSTONE`]), so the late manifest's conditional create is refused whenever the
//! new writer has committed or dropped that point; and retention's rewrite of a manifest is
//! conditional on the copy it read.
//!
//! That condition covers one object, and a splice depends on others: two writers' runs over
//! adjacent points (the deposed one splices 4 onto 2, the new one splices 3 onto 1 and drops
//! 2) each find their own object unchanged, and point 4 would lead to a dropped point. So
//! retention is also fenced by time ([`lease::write_deadline`], [`lease::Tenures`]):
//! - every retention write is sent within half a lease of the lease request before its run
//!   (another receiver takes the lease over only after a whole lease, by its own clock);
//! - a receiver runs no retention on a volume until it has held the lease under its token for
//!   `takeover_settle` (≥ 2 min), by which what the previous holder sent before its deadline,
//!   retried by the client for up to a minute, has landed or failed.
//!
//! What is left is the assumption every lease without a store-side fencing token makes: a
//! pause between the deadline check and the request leaving, or a store that applies a
//! request later than the settle time (the collection's grace assumes the same of commits).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use blkmirror_protocol::{retention::PointAge, units, wire::PointInfo};
use thiserror::Error;

use crate::dr::{
    authority::Authority,
    layout::{self, ChunkMap},
    lease,
    objpoints::{
        self, CommitReport, ManifestToCreate, PackSettings, PointStoreError, StoreView,
        wall_clock_ms as now_ms,
    },
    objstore::{
        Created, LeaseOutcome, ObjectStoreClient, StoreConfig, StoreError as ObjectStoreError,
    },
    volume::{StoreError, Volume},
};

/// Bytes of changed chunks read from the image and uploaded at a time.
const BATCH_BYTES: u64 = 64 << 20;

/// Ranged reads in flight while a receiver fetches a point from the store.
const FETCH_PARALLEL_READS: usize = 16;

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
    /// This receiver's copy and the store's are different histories.
    #[error(
        "volume {volume}: the object store's point {store_seq} is not this receiver's point \
         {local_seq} (another receiver committed a point of that number); refusing to publish \
         over it"
    )]
    Diverged {
        /// The volume.
        volume: String,
        /// The store's newest point.
        store_seq: u64,
        /// This receiver's.
        local_seq: u64,
    },
    /// The volume in the store was made from another source, or with another geometry.
    #[error(
        "volume {volume} in the object store was made from {stored}, not {offered}; refusing \
         to mix them"
    )]
    SourceMismatch {
        /// The volume.
        volume: String,
        /// What the store records.
        stored: String,
        /// What this receiver has.
        offered: String,
    },
    /// The store's record of a volume's source is damaged.
    #[error("object store: {key}: not a source record: {detail}")]
    BadSourceRecord {
        /// The object.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// The store's record of a volume's authority is damaged.
    #[error("object store: {key}: not an authority record: {detail}")]
    BadAuthorityRecord {
        /// The object.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// The local copy failed.
    #[error(transparent)]
    Local(#[from] StoreError),
}

/// The key of a volume's authority (term and primary side) in the store.
pub fn authority_key(volume: &str) -> String {
    format!("volumes/{volume}/{}", crate::dr::authority::AUTHORITY_FILE)
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
    /// What the commit did (nothing when the point was fetched).
    pub commit: CommitReport,
    /// The point was the store's, fetched into this receiver (it was behind the store).
    pub fetched: Option<objpoints::ReadReport>,
    /// How long it took, in milliseconds.
    pub elapsed_ms: u64,
    /// What retention then removed from the store.
    pub pruned: objpoints::PruneReport,
    /// Why retention on the store failed, if it did (the point is published all the same;
    /// the next publish tries again).
    pub prune_error: Option<String>,
    /// How much longer retention waits: this receiver took the volume's lease less than the
    /// store's settle time ago (`store.takeover_settle`), so it did not run.
    pub prune_waits: Option<Duration>,
}

/// A volume's lease as its holder knows it after asking for it.
#[derive(Debug, Clone, Copy)]
struct HeldLease {
    /// The fencing token.
    token: u64,
    /// Until when writes no token fences may be sent ([`lease::write_deadline`]).
    write_deadline: Instant,
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
    /// Points deleted from the store by retention since the receiver started.
    #[serde(default)]
    pub pruned_points: u64,
    /// The last garbage collection this receiver ran: when (Unix milliseconds) and what it
    /// did, or why it failed.
    #[serde(default)]
    pub last_gc: Option<GcHealth>,
    /// Bytes of packs deleted by the collections this receiver ran.
    #[serde(default)]
    pub gc_deleted_bytes: u64,
    /// The version of the store's grants this receiver enforces (`None`: its own
    /// `[[agent]]` list, the store's not read yet).
    #[serde(default)]
    pub grants_version: Option<u64>,
    /// Entries of this receiver's audit log copied to the store's shared chain.
    #[serde(default)]
    pub audit_shipped: u64,
    /// Why the last copy to the shared audit chain failed, if it did.
    #[serde(default)]
    pub audit_error: Option<String>,
    /// Chunks in this receiver's view of the store (where each chunk of the store is).
    #[serde(default)]
    pub view_chunks: u64,
    /// The memory the view takes ([`crate::dr::layout::ChunkLocations::memory_bytes`]):
    /// every receiver of a store holds one for the whole store, so this is what bounds the
    /// unique data a store can hold.
    #[serde(default)]
    pub view_bytes: u64,
    /// Chunk references of the points this receiver remembers as published, one map per
    /// volume it publishes (about 40 to 60 bytes each).
    #[serde(default)]
    pub remembered_chunks: u64,
}

/// A garbage collection as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GcHealth {
    /// When it ended (Unix milliseconds).
    pub at_unix_ms: u64,
    /// Packs deleted.
    pub deleted_packs: u64,
    /// Bytes freed.
    pub deleted_bytes: u64,
    /// Packs repacked.
    pub repacked_packs: u64,
    /// Bytes of packs in the store before it.
    pub pack_bytes: u64,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The store's newest point of a volume as this receiver last published or read it.
struct Published {
    map: ChunkMap,
    point: PointInfo,
    /// The lease's token when it was learnt.
    token: u64,
}

/// What this receiver has of a volume.
enum Local {
    /// Its newest committed point, complete: one to publish.
    Point(PointInfo),
    /// No point to publish (none at all, or an unfinished sync, which is no point in time),
    /// with its committed cycle (0: none).
    Nothing(u64),
}

impl Local {
    /// The committed cycle (0: none).
    fn seq(&self) -> u64 {
        match self {
            Local::Point(point) => point.seq,
            Local::Nothing(seq) => *seq,
        }
    }
}

/// What a receiver does with a volume before it welcomes the agent and after every commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The store's newest point is newer: fetch it.
    Fetch,
    /// Ours is newer, and complete: publish it.
    Publish,
    /// Both hold the same point, or there is nothing to publish.
    Nothing,
    /// The store's point of our number is another point: two histories.
    Diverged,
}

/// Decides the [`Step`] from our copy and the store's newest point (pure).
fn decide(local: &Local, store: Option<&PointInfo>) -> Step {
    match (local, store) {
        (local, Some(store)) if store.seq > local.seq() => Step::Fetch,
        (Local::Point(point), Some(store)) if store.seq == point.seq => {
            if store.time_unix_ms == point.time_unix_ms {
                Step::Nothing
            } else {
                Step::Diverged
            }
        }
        (Local::Point(_), _) => Step::Publish,
        (Local::Nothing(_), _) => Step::Nothing,
    }
}

/// The store's record of where a volume comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceRecord {
    format: u32,
    source_id: String,
    size_bytes: u64,
    chunk_bytes: u64,
}

/// The largest source record read.
const MAX_SOURCE_BYTES: usize = 4096;

fn source_key(volume: &str) -> String {
    format!("volumes/{volume}/source")
}

/// A volume's points in the store → when each was received (Unix milliseconds), as learnt
/// under the lease token kept with them.
type StorePointAges = (u64, BTreeMap<u64, u64>);

/// Publishes receivers' points to one store.
pub struct Publisher {
    client: ObjectStoreClient,
    holder: String,
    settings: PackSettings,
    lease_for: Duration,
    /// What the store holds, shared by the volumes (reloaded when old).
    view: tokio::sync::Mutex<Option<StoreView>>,
    /// Per volume: the store's newest point (taken out while a publish runs; a volume has one
    /// session at a time).
    volumes: Mutex<HashMap<String, Published>>,
    /// Serializes this receiver's lease requests per volume (a renewal racing a publish's
    /// would make one of two conditional writes fail as if another receiver held the lease).
    lease_requests: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Volumes whose source record matched this receiver's.
    sources: Mutex<HashMap<String, SourceRecord>>,
    /// Whether the store's record of its encryption matched this receiver's key.
    sealing_checked: std::sync::atomic::AtomicBool,
    /// Per volume: the store's points and when each was received (for retention), as learnt
    /// under the lease token kept with them.
    ages: Mutex<HashMap<String, StorePointAges>>,
    /// Garbage collection: how often and with what grace.
    gc_every: Option<Duration>,
    gc_grace: Duration,
    /// How long each volume's lease has been held under its token, and how long it must be
    /// before retention rewrites the volume's points.
    tenures: Mutex<lease::Tenures>,
    takeover_settle: Duration,
    health: Mutex<StoreHealth>,
    /// Copies this receiver's audit log to the shared chain (opened at the first round).
    audit_shipper: tokio::sync::Mutex<Option<crate::dr::auditchain::Shipper>>,
}

impl Publisher {
    /// A publisher for `config`, naming itself `holder` in leases.
    pub fn new(config: &StoreConfig, holder: String) -> Result<Self, ObjectStoreError> {
        Ok(Self::over(
            ObjectStoreClient::connect(config)?,
            config,
            holder,
        ))
    }

    /// A publisher through `client`, with `config`'s settings.
    fn over(client: ObjectStoreClient, config: &StoreConfig, holder: String) -> Self {
        Self {
            client,
            holder,
            settings: PackSettings {
                // A commit must land well within a collection's grace of reading the indexes.
                max_view_age: PackSettings::default()
                    .max_view_age
                    .min(config.gc_grace / 2),
                ..PackSettings::default()
            },
            lease_for: config.lease,
            view: tokio::sync::Mutex::new(None),
            volumes: Mutex::new(HashMap::new()),
            sources: Mutex::new(HashMap::new()),
            sealing_checked: std::sync::atomic::AtomicBool::new(false),
            ages: Mutex::new(HashMap::new()),
            gc_every: config.gc_every,
            gc_grace: config.gc_grace,
            tenures: Mutex::new(lease::Tenures::default()),
            takeover_settle: config.takeover_settle,
            lease_requests: Mutex::new(HashMap::new()),
            health: Mutex::new(StoreHealth {
                store: format!("{} bucket {}", config.endpoint, config.bucket),
                ..StoreHealth::default()
            }),
            audit_shipper: tokio::sync::Mutex::new(None),
        }
    }

    /// The client of the store.
    pub fn client(&self) -> &ObjectStoreClient {
        &self.client
    }

    /// This receiver's id in leases and the shared audit chain.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Copies the entries of the audit log in `data_dir` that the store's shared chain lacks;
    /// returns how many. The outcome is also kept for `status`.
    pub async fn ship_audit(
        &self,
        data_dir: &std::path::Path,
    ) -> Result<u64, crate::dr::auditchain::ChainError> {
        let mut shipper = self.audit_shipper.lock().await;
        let result = async {
            if shipper.is_none() {
                *shipper = Some(crate::dr::auditchain::Shipper::open(
                    self.client.clone(),
                    self.holder.clone(),
                    data_dir,
                )?);
            }
            let shipper = shipper.as_mut().expect("opened");
            let shipped = shipper.ship().await;
            Ok::<_, crate::dr::auditchain::ChainError>((shipped, shipper.shipped_entries()))
        }
        .await;
        let mut health = self.health.lock().expect("health lock");
        match result {
            Ok((Ok(count), total)) => {
                health.audit_shipped = total;
                health.audit_error = None;
                Ok(count)
            }
            Ok((Err(error), total)) => {
                health.audit_shipped = total;
                health.audit_error = Some(error.to_string());
                Err(error)
            }
            Err(error) => {
                health.audit_error = Some(error.to_string());
                Err(error)
            }
        }
    }

    /// Records which version of the store's grants this receiver enforces.
    pub fn set_grants_version(&self, version: u64) {
        self.health.lock().expect("health lock").grants_version = Some(version);
    }

    /// The store's health.
    pub fn health(&self) -> StoreHealth {
        self.health.lock().expect("health lock").clone()
    }

    /// Brings the store and this receiver's copy of `volume` together: publishes the newest
    /// complete point if the store lacks it, or fetches the store's if it is newer. Returns
    /// what was done (`None`: both hold the same point, or there is nothing to publish).
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
                if let Some(report) = report.as_ref().filter(|r| r.fetched.is_none()) {
                    health.pruned_points += report.pruned.dropped;
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
        // Another volume's publish holding the view leaves the figures of the last one.
        if let Ok(view) = self.view.try_lock()
            && let Some(view) = view.as_ref()
        {
            health.view_chunks = view.locations.len() as u64;
            health.view_bytes = view.locations.memory_bytes();
        }
        health.remembered_chunks = self
            .volumes
            .lock()
            .expect("volumes lock")
            .values()
            .map(|published| published.map.chunks.len() as u64)
            .sum();
        result
    }

    /// Takes or renews the lease of `volume`; returns its fencing token (the same for as long
    /// as this receiver has held it without a break) and the deadline of writes no token
    /// fences ([`lease::write_deadline`]).
    async fn hold_lease(&self, volume: &str) -> Result<HeldLease, PublishError> {
        // One lease request at a time: a renewal racing a publish's would make one of the two
        // conditional writes fail as if another receiver had taken the lease.
        let serial = self
            .lease_requests
            .lock()
            .expect("lease requests lock")
            .entry(volume.to_owned())
            .or_default()
            .clone();
        let _serial = serial.lock().await;
        let mut outcome = self.acquire(volume).await?;
        if outcome.2 == LeaseOutcome::LostRace {
            // Read again: the write that beat ours may have been a renewal of our own.
            outcome = self.acquire(volume).await?;
        }
        let (now, asked, outcome) = outcome;
        match outcome {
            LeaseOutcome::Holding(record) => {
                self.tenures.lock().expect("tenures lock").held_for(
                    volume,
                    record.token,
                    Instant::now(),
                );
                Ok(HeldLease {
                    token: record.token,
                    write_deadline: lease::write_deadline(asked, self.lease_for),
                })
            }
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

    /// Renews the lease of `volume`, which must still be the one of `token`: a lease lost
    /// and taken again in the middle of a publish means another receiver may have written
    /// meanwhile, so the publish stops. Returns the deadline of writes no token fences.
    async fn hold_again(&self, volume: &str, token: u64) -> Result<Instant, PublishError> {
        let now = self.hold_lease(volume).await?;
        if now.token == token {
            Ok(now.write_deadline)
        } else {
            Err(PublishError::LeaseHeld {
                volume: volume.to_owned(),
                holder: format!(
                    "another receiver in the meantime (this receiver's lease went from token \
                     {token} to {})",
                    now.token
                ),
                remaining_s: 0,
            })
        }
    }

    /// One lease request: the wall-clock time it wrote, the monotonic instant before it, and
    /// what came of it.
    async fn acquire(&self, volume: &str) -> Result<(u64, Instant, LeaseOutcome), PublishError> {
        let asked = Instant::now();
        let now = now_ms();
        let outcome = self
            .client
            .acquire_lease(volume, &self.holder, now, self.lease_for.as_millis() as u64)
            .await?;
        Ok((now, asked, outcome))
    }

    /// Renews the lease of `volume` every third of its life, for as long as the session that
    /// serves the volume runs (the caller aborts it at the session's end): a receiver that
    /// waits for its agent's next cycle keeps the volume, and one that died loses it a lease
    /// later.
    pub async fn keep_lease(&self, volume: &str) {
        loop {
            tokio::time::sleep(self.lease_for / 3).await;
            if let Err(error) = self.hold_lease(volume).await {
                tracing::warn!(
                    target: "blkmirror receiver",
                    "volume {volume}: renewing its lease in the object store: {error}"
                );
            }
        }
    }

    /// Checks the store's record of the volume's source against ours, writing it first if
    /// there is none (the first receiver to publish the volume names its source).
    async fn check_source(&self, name: &str, ours: SourceRecord) -> Result<(), PublishError> {
        if self.sources.lock().expect("sources lock").get(name) == Some(&ours) {
            return Ok(());
        }
        let key = source_key(name);
        let encoded = serde_json::to_vec(&ours).expect("a source record serializes");
        self.client.put_if_absent(&key, encoded).await?;
        let Some((bytes, _)) = self.client.get(&key, MAX_SOURCE_BYTES).await? else {
            return Err(PointStoreError::Missing(key).into());
        };
        let stored: SourceRecord =
            serde_json::from_slice(&bytes).map_err(|error| PublishError::BadSourceRecord {
                key: key.clone(),
                detail: error.to_string(),
            })?;
        if stored != ours {
            let describe = |r: &SourceRecord| {
                format!(
                    "{:?} ({} bytes, {} byte chunks)",
                    r.source_id, r.size_bytes, r.chunk_bytes
                )
            };
            return Err(PublishError::SourceMismatch {
                volume: name.to_owned(),
                stored: describe(&stored),
                offered: describe(&ours),
            });
        }
        self.sources
            .lock()
            .expect("sources lock")
            .insert(name.to_owned(), ours);
        Ok(())
    }

    /// The store's newest point of `volume`: its map and its record.
    async fn newest(&self, volume: &str) -> Result<Option<(ChunkMap, PointInfo)>, PublishError> {
        let seqs = objpoints::list_points(&self.client, volume).await?;
        let Some(&seq) = seqs.last() else {
            return Ok(None);
        };
        let (map, manifest) = objpoints::read_point(&self.client, volume, seq).await?;
        Ok(Some((map, manifest.point)))
    }

    /// The store's authority record of `name` and its ETag, if it has one.
    async fn stored_authority(
        &self,
        name: &str,
    ) -> Result<Option<(Authority, String)>, PublishError> {
        let key = authority_key(name);
        let Some((bytes, e_tag)) = self.client.get(&key, 1 << 20).await? else {
            return Ok(None);
        };
        let bad = |detail: String| PublishError::BadAuthorityRecord {
            key: key.clone(),
            detail,
        };
        let authority: Authority =
            serde_json::from_slice(&bytes).map_err(|error| bad(error.to_string()))?;
        if authority.format > crate::dr::authority::AUTHORITY_FORMAT {
            return Err(bad(format!(
                "format {} is newer than this build reads",
                authority.format
            )));
        }
        Ok(Some((authority, e_tag.unwrap_or_default())))
    }

    /// Brings the volume's authority and the store's together before anything is accepted
    /// or published: a failover, reprotect or failback recorded by another receiver (a higher
    /// term in the store) is taken here, and refuses the source if the DR site is primary;
    /// one recorded here (a higher term here) goes to the store. Why: the term lived in one
    /// receiver's data directory, so a source refused there after a failover was still taken
    /// by the other receivers of the store (a split brain).
    async fn sync_authority(
        &self,
        volume: &Arc<Mutex<Volume>>,
        name: &str,
    ) -> Result<(), PublishError> {
        let local = volume.lock().expect("volume lock").authority()?;
        match self.stored_authority(name).await? {
            Some((theirs, _)) if theirs.term > local.term => {
                if volume
                    .lock()
                    .expect("volume lock")
                    .adopt_authority(&theirs)?
                {
                    tracing::warn!(
                        target: "blkmirror receiver",
                        "volume {name}: took term {} from the object store (was {}): {}",
                        theirs.term,
                        local.term,
                        if theirs.failover_in_force().is_some() {
                            "the DR site is primary"
                        } else {
                            "the source is primary"
                        }
                    );
                }
                if let Some(refusal) = theirs.refusal(name) {
                    return Err(PublishError::Local(StoreError::Refused(refusal)));
                }
            }
            stored => self.push_authority_over(name, &local, stored).await?,
        }
        Ok(())
    }

    /// Records `local` in the store if its term is higher than the store's (a failover,
    /// reprotect or failback run on this receiver's data directory).
    pub async fn push_authority(&self, name: &str, local: &Authority) -> Result<(), PublishError> {
        let stored = self.stored_authority(name).await?;
        self.push_authority_over(name, local, stored).await
    }

    async fn push_authority_over(
        &self,
        name: &str,
        local: &Authority,
        stored: Option<(Authority, String)>,
    ) -> Result<(), PublishError> {
        let text = serde_json::to_vec_pretty(local).expect("serializes");
        let key = authority_key(name);
        let written = match stored {
            // Term 1 with the source primary is every volume's start: nothing to record.
            None if local.term <= 1 => return Ok(()),
            None => self.client.put_if_absent(&key, text).await? == Created::Created,
            Some((theirs, e_tag)) if theirs.term < local.term => {
                self.client.replace_if_unchanged(&key, text, &e_tag).await?
            }
            Some(_) => return Ok(()),
        };
        if written {
            tracing::info!(
                target: "blkmirror receiver",
                "volume {name}: term {} recorded in the object store for every receiver",
                local.term
            );
        }
        // A lost race: another receiver changed it meanwhile; the next sync compares again.
        Ok(())
    }

    /// The pack view, read again when half its allowed age has passed.
    async fn fresh_view(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<StoreView>>, PublishError> {
        let mut slot = self.view.lock().await;
        let stale = slot
            .as_ref()
            .is_none_or(|view| view.read_at.elapsed() > self.settings.max_view_age / 2);
        if stale {
            self.refresh(&mut slot, false).await?;
        }
        Ok(slot)
    }

    /// Brings the shared view up to the store: the indexes of the packs added since and the
    /// changes of condemnation ([`objpoints::refresh_view`]); with `list_whole`, from a
    /// listing of every pack.
    async fn refresh(
        &self,
        slot: &mut Option<StoreView>,
        list_whole: bool,
    ) -> Result<(), PublishError> {
        match slot {
            Some(view) => {
                let refreshed = objpoints::refresh_view(
                    &self.client,
                    view,
                    self.settings.max_view_age,
                    list_whole,
                )
                .await?;
                tracing::debug!(target: "blkmirror receiver", "store view refreshed: {refreshed:?}");
            }
            None => *slot = Some(objpoints::load_view(&self.client).await?),
        }
        Ok(())
    }

    /// Keeps the pack view current between publishes, so that no publish waits for more
    /// than a refresh from the log: loads it if there is none (a spare receiver then has it
    /// before a failover brings it volumes), lists the store whole when due
    /// ([`objpoints::VIEW_LISTING_EVERY`]) outside the view's lock (minutes on a large
    /// store), and refreshes it when half its allowed age has passed. The receiver calls it
    /// every quarter of `max_view_age`.
    pub async fn keep_view_current(&self) -> Result<(), PublishError> {
        let listing_due = self
            .view
            .lock()
            .await
            .as_ref()
            .is_some_and(StoreView::listing_due);
        if listing_due {
            let listing = objpoints::list_whole(&self.client).await?;
            let mut slot = self.view.lock().await;
            if let Some(view) = slot.as_mut() {
                let refreshed = objpoints::refresh_view_listed(
                    &self.client,
                    view,
                    self.settings.max_view_age,
                    listing,
                )
                .await?;
                tracing::debug!(
                    target: "blkmirror receiver",
                    "store view listed whole: {refreshed:?}"
                );
                return Ok(());
            }
        }
        drop(self.fresh_view().await?);
        Ok(())
    }

    /// How often the receiver calls [`Publisher::keep_view_current`]: within a refresh's due
    /// time (half the allowed age), so that the view never needs a whole reload (past the
    /// allowed age); not more than ten times a second (test builds allow a grace of a
    /// second).
    pub fn view_kept_every(&self) -> Duration {
        (self.settings.max_view_age / 4).max(Duration::from_millis(100))
    }

    /// The pack view, read again if it lacks a chunk of `map` (another receiver stored it
    /// since this one read the indexes: the point was published elsewhere), and the chunks of
    /// `map` the store still lacks then (lost there). Read again in three steps, each only if
    /// the one before left a chunk lacking: a refresh (the log of added packs), a refresh from
    /// a listing of every pack (a pack whose log entry never came), a whole reload (a chunk
    /// in two packs, the one the view knew deleted).
    async fn view_covering(
        &self,
        map: &ChunkMap,
    ) -> Result<
        (
            tokio::sync::MutexGuard<'_, Option<StoreView>>,
            BTreeSet<u64>,
        ),
        PublishError,
    > {
        let mut slot = self.fresh_view().await?;
        let missing = |slot: &Option<StoreView>| {
            slot.as_ref()
                .map(|view| view.locations.missing(map))
                .unwrap_or_default()
        };
        let mut lacking = missing(&slot);
        for list_whole in [false, true] {
            if lacking.is_empty() {
                break;
            }
            self.refresh(&mut slot, list_whole).await?;
            lacking = missing(&slot);
        }
        if !lacking.is_empty() {
            *slot = Some(objpoints::load_view(&self.client).await?);
            lacking = missing(&slot);
        }
        Ok((slot, lacking))
    }

    async fn publish_inner(
        &self,
        volume: &Arc<Mutex<Volume>>,
        started: Instant,
    ) -> Result<Option<PublishReport>, PublishError> {
        let (name, local, source) = {
            let volume = volume.lock().expect("volume lock");
            let meta = volume.meta();
            let local = match &meta.last_point {
                Some(point)
                    if !meta.unsettled && point.seq == meta.committed_seq && point.complete =>
                {
                    Local::Point(point.to_wire())
                }
                _ => Local::Nothing(meta.committed_seq),
            };
            let source = SourceRecord {
                format: 1,
                source_id: meta.source_id.clone(),
                size_bytes: meta.size_bytes,
                chunk_bytes: meta.chunk_bytes,
            };
            (meta.volume.clone(), local, source)
        };
        // The lease first, even with nothing to publish: an agent is refused before it syncs
        // to a receiver that may not write the volume.
        let token = self.hold_lease(&name).await?.token;
        if !self
            .sealing_checked
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            objpoints::check_sealing(&self.client, true).await?;
            self.sealing_checked
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.check_source(&name, source).await?;
        self.sync_authority(volume, &name).await?;
        // What this receiver remembers of the store is true only if nobody else held the
        // volume since: a lease taken anew (another token) means read the store again.
        let cached = self
            .volumes
            .lock()
            .expect("volumes lock")
            .remove(&name)
            .filter(|cached| cached.token == token);
        let base = match cached {
            Some(cached) => Some(cached),
            None => self
                .newest(&name)
                .await?
                .map(|(map, point)| Published { map, point, token }),
        };
        let step = decide(&local, base.as_ref().map(|b| &b.point));
        let report = match (step, local, base) {
            (Step::Fetch, _, Some(newest)) => {
                let fetched = self.adopt(volume, &newest).await?;
                let seq = newest.point.seq;
                self.remember(&name, newest);
                Some(PublishReport {
                    seq,
                    against: None,
                    commit: CommitReport::default(),
                    fetched: Some(fetched),
                    elapsed_ms: started.elapsed().as_millis() as u64,
                    pruned: objpoints::PruneReport::default(),
                    prune_error: None,
                    prune_waits: None,
                })
            }
            (Step::Diverged, local, Some(newest)) => {
                return Err(PublishError::Diverged {
                    volume: name,
                    store_seq: newest.point.seq,
                    local_seq: local.seq(),
                });
            }
            (Step::Publish, Local::Point(point), base) => {
                let (mut report, published) = self
                    .upload(volume, &name, point, base, token, started)
                    .await?;
                let point = published.point.clone();
                self.remember(&name, published);
                // Retention is housekeeping: the point is published whatever it does. It waits
                // for the settle time after the lease was taken: what the previous holder
                // sent before its lease ended may still land (the module's docs).
                let held_for = self.tenures.lock().expect("tenures lock").held_for(
                    &name,
                    token,
                    Instant::now(),
                );
                report.prune_waits = self
                    .takeover_settle
                    .checked_sub(held_for)
                    .filter(|waits| !waits.is_zero());
                if report.prune_waits.is_none() {
                    match self.prune(volume, &name, token, &point).await {
                        Ok(pruned) => report.pruned = pruned,
                        Err(error) => {
                            self.ages.lock().expect("ages lock").remove(&name);
                            report.prune_error = Some(error.to_string());
                        }
                    }
                }
                report.elapsed_ms = started.elapsed().as_millis() as u64;
                Some(report)
            }
            (_, _, base) => {
                if let Some(base) = base {
                    self.remember(&name, base);
                }
                None
            }
        };
        Ok(report)
    }

    /// Applies the volume's retention to its points in the store, just published `newest`
    /// under lease `token`: the points it drops are spliced out ([`objpoints::prune_run`]),
    /// the lease checked before each run. The store's points and their ages are listed once
    /// (manifest heads) and then remembered under the token.
    async fn prune(
        &self,
        volume: &Arc<Mutex<Volume>>,
        name: &str,
        token: u64,
        newest: &PointInfo,
    ) -> Result<objpoints::PruneReport, PublishError> {
        let cached = self
            .ages
            .lock()
            .expect("ages lock")
            .remove(name)
            .filter(|(cached, _)| *cached == token);
        let mut ages = match cached {
            Some((_, ages)) => ages,
            None => objpoints::list_point_heads(&self.client, name)
                .await?
                .into_iter()
                .map(|p| (p.head.seq, p.head.point.received_unix_ms))
                .collect(),
        };
        ages.insert(newest.seq, newest.received_unix_ms);
        let points: Vec<PointAge> = ages
            .iter()
            .map(|(&seq, &time_unix_ms)| PointAge { seq, time_unix_ms })
            .collect();
        let keep = volume.lock().expect("volume lock").retention_keeps(&points);
        let seqs: Vec<u64> = ages.keys().copied().collect();
        let mut report = objpoints::PruneReport::default();
        for run in layout::prune_runs(&seqs, &keep) {
            let deadline = self.hold_again(name, token).await?;
            objpoints::prune_run(&self.client, name, &run, deadline, &mut report).await?;
            for seq in &run.dropped {
                ages.remove(seq);
            }
        }
        self.ages
            .lock()
            .expect("ages lock")
            .insert(name.to_owned(), (token, ages));
        Ok(report)
    }

    /// How often this receiver collects garbage (`None`: never).
    pub fn gc_every(&self) -> Option<Duration> {
        self.gc_every
    }

    /// One collection, if this receiver gets the store-wide collection lease (`None`: another
    /// holds it).
    pub async fn collect_garbage(
        &self,
        dry_run: bool,
    ) -> Result<Option<objpoints::GcReport>, PublishError> {
        let result = collect_once(&self.client, &self.holder, self.gc_grace, dry_run).await;
        if !dry_run {
            let mut health = self.health.lock().expect("health lock");
            match &result {
                Ok(Some(report)) => {
                    health.gc_deleted_bytes += report.deleted_bytes;
                    health.last_gc = Some(GcHealth {
                        at_unix_ms: now_ms(),
                        deleted_packs: report.deleted as u64,
                        deleted_bytes: report.deleted_bytes,
                        repacked_packs: report.repacked as u64,
                        pack_bytes: report.pack_bytes,
                        error: None,
                    })
                }
                Ok(None) => {}
                Err(error) => {
                    health.last_gc = Some(GcHealth {
                        at_unix_ms: now_ms(),
                        error: Some(error.to_string()),
                        ..GcHealth::default()
                    })
                }
            }
        }
        result
    }

    fn remember(&self, name: &str, published: Published) {
        self.volumes
            .lock()
            .expect("volumes lock")
            .insert(name.to_owned(), published);
    }

    /// Fetches the store's point `newest` into this receiver's copy of the volume.
    async fn adopt(
        &self,
        volume: &Arc<Mutex<Volume>>,
        newest: &Published,
    ) -> Result<objpoints::ReadReport, PublishError> {
        // The geometry is this volume's: the source record, checked before, says the store's
        // is the same (and `write_adopted` refuses anything past the end).
        let geometry = {
            let volume = volume.lock().expect("volume lock");
            (volume.meta().size_bytes, volume.meta().chunk_bytes)
        };
        // Where the point's chunks are, copied out of the shared view: the fetch may be long,
        // and the receiver's other volumes publish meanwhile.
        let locations = self
            .view_covering(&newest.map)
            .await?
            .0
            .as_ref()
            .expect("a view was loaded")
            .locations
            .subset(&newest.map);
        {
            let volume = volume.clone();
            tokio::task::spawn_blocking(move || {
                volume.lock().expect("volume lock").begin_adopting()
            })
            .await
            .expect("adopt task")?;
        }
        let write_error = Arc::new(Mutex::new(None));
        let sink: objpoints::ChunkSink = {
            let (volume, write_error) = (volume.clone(), write_error.clone());
            Arc::new(move |offset, data| {
                // Zeros are already there: the image was emptied.
                let Some(data) = data else { return Ok(()) };
                if let Err(error) = volume
                    .lock()
                    .expect("volume lock")
                    .write_adopted(offset, data)
                {
                    let message = error.to_string();
                    *write_error.lock().expect("error lock") = Some(error);
                    return Err(PointStoreError::Missing(format!(
                        "room for the point ({message})"
                    )));
                }
                Ok(())
            })
        };
        let fetched = objpoints::read_point_into(
            &self.client,
            &locations,
            &newest.map,
            geometry,
            FETCH_PARALLEL_READS,
            sink,
        )
        .await;
        if let Some(error) = write_error.lock().expect("error lock").take() {
            return Err(error.into());
        }
        let fetched = fetched?;
        let point = newest.point.clone();
        let adopting = volume.clone();
        tokio::task::spawn_blocking(move || {
            adopting
                .lock()
                .expect("volume lock")
                .finish_adopting(&point)
        })
        .await
        .expect("adopt task")?;
        Ok(fetched)
    }

    /// Uploads what differs between the store's point `base` and ours, then creates the
    /// manifest of `point`.
    async fn upload(
        &self,
        volume: &Arc<Mutex<Volume>>,
        name: &str,
        point: PointInfo,
        base: Option<Published>,
        token: u64,
        started: Instant,
    ) -> Result<(PublishReport, Published), PublishError> {
        // The chunks that differ between the store's point and ours: the local deltas lead
        // back to it if this receiver holds it still; otherwise every chunk.
        let (ranges, against, size_bytes, chunk_bytes) = {
            let volume = volume.lock().expect("volume lock");
            let meta = volume.meta();
            let related = base.as_ref().and_then(|base| {
                let kept = meta.points.iter().find(|p| p.seq == base.point.seq)?;
                if kept.time_unix_ms != base.point.time_unix_ms {
                    return None;
                }
                let map = volume.store().map_point(point.seq, base.point.seq).ok()?;
                Some((map.changed_chunks(), base.point.seq))
            });
            let chunk_count = meta.size_bytes.div_ceil(meta.chunk_bytes.max(1));
            let (ranges, against) = match related {
                Some((ranges, seq)) => (ranges, Some(seq)),
                None => (vec![(0, chunk_count)], None),
            };
            (ranges, against, meta.size_bytes, meta.chunk_bytes)
        };
        let base_map = match (base, against) {
            (Some(base), Some(_)) => base.map,
            _ => ChunkMap::default(),
        };
        // A full manifest lists every chunk, so the store must hold every chunk of the base.
        // One it lacks was lost there (a fault of the store, or a hand): the replica holds the
        // same content at that chunk (it did not change since the base), so it is read and
        // stored again like a changed one. Stored again under its id, it also repairs the
        // earlier points that reference it.
        let mut ranges = ranges;
        if let (Some(base_seq), true) = (against, base_map.next_is_full()) {
            let (view, lacking) = self.view_covering(&base_map).await?;
            drop(view);
            let lost: Vec<u64> = lacking
                .into_iter()
                .filter(|&chunk| {
                    let at = ranges.partition_point(|&(_, end)| end <= chunk);
                    ranges.get(at).is_none_or(|&(first, _)| chunk < first)
                })
                .collect();
            if !lost.is_empty() {
                tracing::warn!(
                    "object store: volume {name}: the store lacks {} chunk(s) of point {base_seq}, \
                     its newest (lost there: a fault of the store, or deleted by hand); storing \
                     them again from the replica with point {}",
                    lost.len(),
                    point.seq
                );
                ranges.extend(lost.iter().map(|&chunk| (chunk, chunk + 1)));
                ranges.sort_unstable();
            }
        }
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
            // The shared view is locked to look chunks up and to add the new packs, not while
            // they upload: the receiver's volumes publish side by side.
            let to_store = {
                let view = self.fresh_view().await?;
                let view = view.as_ref().expect("a view was loaded");
                objpoints::plan_batch(self.client.sealing(), view, &changes, &mut upload)
            };
            let stored =
                objpoints::store_batch(&self.client, to_store, self.settings, &mut upload).await?;
            if let Some(view) = self.view.lock().await.as_mut() {
                view.add_packs(&stored);
            }
            if lease_renewed.elapsed() > self.lease_for / 3 {
                self.hold_again(name, token).await?;
                lease_renewed = Instant::now();
            }
        }
        let seq = point.seq;
        // A full manifest is checked whole: the view covered the base above (or the base is
        // empty), and the base's chunks stay, being the newest point's. A delta is checked for
        // its new references only, which this publish found in the view or stored itself.
        let view = self.fresh_view().await?;
        // Renewed last thing before the manifest, which reading the view may have delayed.
        // Past this, a writer paused beyond its lease is fenced by the store itself: the
        // manifest's name is either free or taken for good (a point or a tombstone).
        self.hold_again(name, token).await?;
        let (commit, map) = objpoints::create_manifest(
            &self.client,
            view.as_ref().expect("a view was loaded"),
            base_map,
            ManifestToCreate {
                volume: name,
                size_bytes,
                chunk_bytes,
                point: point.clone(),
            },
            upload,
            self.settings,
        )
        .await?;
        drop(view);
        Ok((
            PublishReport {
                seq,
                against,
                commit,
                fetched: None,
                elapsed_ms: started.elapsed().as_millis() as u64,
                pruned: objpoints::PruneReport::default(),
                prune_error: None,
                prune_waits: None,
            },
            Published { map, point, token },
        ))
    }
}

/// How long a collection's turn lasts (the store-wide lease): a collection that takes longer
/// may meet another, which is safe, only wasteful.
const GC_TURN: Duration = Duration::from_secs(30 * 60);

/// One collection by `holder`, if it gets the store-wide collection lease (`None`: another
/// holder has it), with `grace`.
pub async fn collect_once(
    client: &ObjectStoreClient,
    holder: &str,
    grace: Duration,
    dry_run: bool,
) -> Result<Option<objpoints::GcReport>, PublishError> {
    objpoints::check_sealing(client, false).await?;
    if !dry_run {
        let outcome = client
            .acquire_lease_at(
                objpoints::GC_LEASE_KEY,
                "garbage collection",
                holder,
                now_ms(),
                GC_TURN.as_millis() as u64,
            )
            .await?;
        if !matches!(outcome, LeaseOutcome::Holding(_)) {
            return Ok(None);
        }
    }
    let settings = objpoints::GcSettings {
        grace_ms: grace.as_millis() as u64,
        repack_below: REPACK_BELOW,
        pack: PackSettings::default(),
        dry_run,
    };
    let report = objpoints::collect_garbage(client, now_ms(), &settings).await;
    if !dry_run {
        // The turn ends with the collection (a lease renewed for no time), whatever it did.
        let released = client
            .acquire_lease_at(
                objpoints::GC_LEASE_KEY,
                "garbage collection",
                holder,
                now_ms(),
                0,
            )
            .await;
        if let Err(error) = released {
            tracing::warn!("ending this collection's turn in the object store: {error}");
        }
    }
    Ok(Some(report?))
}

/// A pack with less than this share of its bytes live is repacked.
const REPACK_BELOW: f64 = 0.5;

/// A collection's report in a line.
pub fn describe_gc(report: &objpoints::GcReport) -> String {
    format!(
        "{} pack(s) of {} in the store, {} live chunk(s); {} pack(s) condemned, {} deleted \
         ({} freed), {} revived, {} repacked into {} new pack(s) ({} written), {} too young \
         to judge, {} tombstone(s) of dropped points deleted, {} stray index(es) and \
         marker(s) deleted, {} missing index(es) rebuilt, {} old entr(ies) of the log of \
         added packs deleted",
        report.packs,
        units::format_size(report.pack_bytes),
        report.live_chunks,
        report.condemned,
        report.deleted,
        units::format_size(report.deleted_bytes),
        report.revived,
        report.repacked,
        report.repack_written,
        units::format_size(report.repack_bytes),
        report.young,
        report.tombstones_swept,
        report.strays_deleted,
        report.indexes_rebuilt,
        report.log_entries_swept
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(seq: u64, time_unix_ms: u64) -> PointInfo {
        PointInfo {
            seq,
            time_unix_ms,
            complete: true,
            ..PointInfo::default()
        }
    }

    /// The `[store]` of a publisher over an in-memory store, with the default timings.
    fn memory_store_config() -> StoreConfig {
        StoreConfig {
            endpoint: "memory".into(),
            bucket: "test".into(),
            region: String::new(),
            access_key: String::new(),
            secret_key: String::new(),
            allow_http: false,
            lease: crate::dr::objstore::DEFAULT_LEASE,
            gc_every: None,
            gc_grace: crate::dr::objstore::DEFAULT_GC_GRACE,
            takeover_settle: crate::dr::objstore::DEFAULT_TAKEOVER_SETTLE,
            encryption_key: None,
        }
    }

    /// The receiver keeps its view current between publishes: it loads it before any
    /// publish (a spare receiver has it before a failover), and when a whole listing is due
    /// it takes it outside the view's lock, then finds what the log of added packs missed.
    #[tokio::test]
    async fn the_receiver_keeps_its_view_loaded_and_lists_the_store_whole_when_due() {
        let client = ObjectStoreClient::in_memory();
        let publisher = Publisher::over(client.clone(), &memory_store_config(), "rx".into());
        assert!(publisher.view.lock().await.is_none());
        publisher.keep_view_current().await.unwrap();
        assert!(publisher.view.lock().await.is_some(), "loaded at once");
        // Another receiver stores a pack and stops before its log entry.
        let content = vec![0x5a; 4096];
        let id = client.sealing().chunk_id(&content);
        let mut other = objpoints::load_view(&client).await.unwrap();
        let mut upload = objpoints::Upload::default();
        objpoints::upload_changes(
            &client,
            &mut other,
            &BTreeMap::from([(0, content)]),
            PackSettings::default(),
            &mut upload,
        )
        .await
        .unwrap();
        for (key, _, _) in client.list(layout::ADDED_PREFIX).await.unwrap() {
            client.delete(&key).await.unwrap();
        }
        let known = async || {
            let slot = publisher.view.lock().await;
            let view = slot.as_ref().unwrap();
            (view.locations.contains(&id), view.listing_due())
        };
        publisher.keep_view_current().await.unwrap();
        assert_eq!(known().await, (false, false), "not from the log");
        publisher
            .view
            .lock()
            .await
            .as_mut()
            .unwrap()
            .age_listing(objpoints::VIEW_LISTING_EVERY);
        assert_eq!(known().await, (false, true));
        publisher.keep_view_current().await.unwrap();
        assert_eq!(known().await, (true, false), "from the whole listing");
    }

    /// A chunk of the volume's newest point that the store lost (here: its pack deleted) is
    /// stored again from the replica when the next full manifest is published, and every
    /// point that references it reads again. Before, the full manifest was refused
    /// (`Missing`) at every try, and the volume's publishing, so its cycles, stopped there.
    #[tokio::test]
    async fn a_chunk_the_store_lost_is_stored_again_from_the_replica_at_the_next_full_manifest() {
        use blkmirror_protocol::wire::CheckedData;
        let tmp = crate::testing::TempDir::new("publish-lost-chunk");
        let hello = crate::testing::volume_hello();
        let (volume, _, _) = Volume::open_or_create(&tmp.0, &hello).unwrap();
        let volume = Arc::new(Mutex::new(volume));
        let client = ObjectStoreClient::in_memory();
        let publisher = Publisher::over(client.clone(), &memory_store_config(), "rx".into());
        let chunk = |byte: u8| vec![byte; 65536];
        // Point 1 writes chunks 0 and 1, never changed after; each later point `seq` writes
        // chunk 2 with `seq`.
        let commit_and_publish = async |seq: u64| {
            {
                let mut volume = volume.lock().unwrap();
                volume.begin(seq, 3 * 65536, false, 0).unwrap();
                let writes = if seq == 1 {
                    vec![(0, 0xa0), (1, 0xb1)]
                } else {
                    vec![(2, seq as u8)]
                };
                for (at, byte) in writes {
                    let data = CheckedData::Write {
                        offset: at * 65536,
                        data: chunk(byte),
                    };
                    volume.journal(data).unwrap();
                }
                volume
                    .commit(PointInfo {
                        complete: true,
                        time_unix_ms: 1_000 * seq,
                        ..PointInfo::default()
                    })
                    .unwrap();
            }
            publisher.publish(&volume).await
        };
        // Point 1's manifest is full, the next 31 are deltas.
        let full = layout::FULL_EVERY + 1;
        for seq in 1..full {
            let report = commit_and_publish(seq).await.unwrap().unwrap();
            assert_eq!(
                (report.seq, report.commit.delta),
                (seq, seq > 1),
                "{report:?}"
            );
        }
        // The store loses the pack that holds chunks 0 and 1.
        let (map, _) = objpoints::read_point(&client, "v", 1).await.unwrap();
        let view = objpoints::load_view(&client).await.unwrap();
        let (pack, _) = view.locations.get(&map.chunks[&0]).unwrap();
        assert_eq!(view.locations.get(&map.chunks[&1]).unwrap().0, pack);
        client.delete(&layout::pack_key(&pack)).await.unwrap();
        assert!(
            objpoints::read_chunk(&client, &view.locations, &map.chunks[&0])
                .await
                .is_err()
        );

        // The receiver reads the store's indexes again (its view is at most half of
        // `max_view_age` old), and the next point's manifest is full: the lost chunks are
        // stored again with it.
        *publisher.view.lock().await = None;
        let report = commit_and_publish(full).await.unwrap().unwrap();
        assert!(!report.commit.delta, "{report:?}");
        assert_eq!(report.commit.changed_chunks, 3, "{report:?}");
        let view = objpoints::load_view(&client).await.unwrap();
        for seq in 1..=full {
            let (map, _) = objpoints::read_point(&client, "v", seq).await.unwrap();
            let mut expected = vec![(0, 0xa0), (1, 0xb1)];
            if seq > 1 {
                expected.push((2, seq as u8));
            }
            assert_eq!(map.chunks.len(), expected.len());
            for (at, byte) in expected {
                let read = objpoints::read_chunk(&client, &view.locations, &map.chunks[&at])
                    .await
                    .unwrap();
                assert_eq!(read, chunk(byte), "point {seq}, chunk {at}");
            }
        }
    }

    #[test]
    fn a_receiver_fetches_what_is_newer_publishes_what_is_its_own_and_refuses_two_histories() {
        let ours = Local::Point(point(5, 500));
        // The store is behind, empty, or has our very point.
        assert_eq!(decide(&ours, Some(&point(4, 400))), Step::Publish);
        assert_eq!(decide(&ours, None), Step::Publish);
        assert_eq!(decide(&ours, Some(&point(5, 500))), Step::Nothing);
        // Another receiver served the volume since: fetch, whatever we have.
        assert_eq!(decide(&ours, Some(&point(6, 600))), Step::Fetch);
        assert_eq!(
            decide(&Local::Nothing(0), Some(&point(1, 100))),
            Step::Fetch
        );
        assert_eq!(
            decide(&Local::Nothing(3), Some(&point(6, 600))),
            Step::Fetch
        );
        // Point 5 in the store is not ours.
        assert_eq!(decide(&ours, Some(&point(5, 501))), Step::Diverged);
        // A sync in progress here publishes nothing, and fetches nothing older.
        assert_eq!(
            decide(&Local::Nothing(7), Some(&point(5, 500))),
            Step::Nothing
        );
        assert_eq!(decide(&Local::Nothing(0), None), Step::Nothing);
    }
}
