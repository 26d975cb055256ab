//! An S3-compatible object store shared by several receivers: the client, its conditional
//! writes, and the volume lease built on them.
//!
//! This is the first part of the object-store backend (see ARCHITECTURE.md, "Object store"):
//! what the rest stands on. A DR site that outgrows one machine keeps its points in a
//! distributed store, and any receiver can serve any volume, so the store must decide two
//! things that a local directory decided by `flock` and `rename`:
//!
//! * **Who writes a volume.** [`ObjectStoreClient::acquire_lease`] takes or renews the
//!   volume's lease ([`crate::dr::lease`]) with a conditional write, so of two receivers that
//!   race, the store accepts exactly one.
//! * **What is committed.** [`ObjectStoreClient::put_if_absent`] creates an object only if
//!   its name is free: a cycle's manifest, written last under a name no other commit can take,
//!   is the commit.
//!
//! The client is `object_store` (Apache Arrow's), not a hand-written S3 client. Conditional
//! writes are its `PutMode::Create` (`If-None-Match: *`) and `PutMode::Update` (`If-Match:
//! ETAG`), which Ceph's RADOS gateway, MinIO and AWS S3 honour. Garage does not (its v1.2 S3
//! API reads the conditions of a GET only), which is why the tests run against Ceph.

use std::{sync::Arc, time::Duration};

use object_store::{
    ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload, UpdateVersion,
    aws::{AmazonS3Builder, S3ConditionalPut},
    path::Path as ObjectPath,
};
use thiserror::Error;

use crate::dr::lease::{self, LeaseDecision, LeaseError, LeaseRecord, MAX_LEASE_BYTES};

/// Where the store is and how to sign in to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// The S3 endpoint, `https://HOST[:PORT]` (`http://` only with `allow_http`).
    pub endpoint: String,
    /// The bucket, created by the operator.
    pub bucket: String,
    /// The region the store expects in signatures (`us-east-1` for most self-hosted stores).
    pub region: String,
    /// The access key id.
    pub access_key: String,
    /// The secret key.
    pub secret_key: String,
    /// Whether plain HTTP is allowed (a store on the same host or a private network only).
    pub allow_http: bool,
    /// How long a receiver's lease on a volume lasts without renewal.
    pub lease: Duration,
    /// How often a receiver collects garbage (`None`: never, by hand only).
    pub gc_every: Option<Duration>,
    /// A collection's grace: how long a new or condemned pack is left alone.
    pub gc_grace: Duration,
    /// How long a receiver holds a volume's lease before its retention rewrites the volume's
    /// points (`crate::dr::publish`, "A writer that lost its lease").
    pub takeover_settle: Duration,
    /// The key of encryption at rest (`None`: chunks are stored in the clear).
    pub encryption_key: Option<[u8; 32]>,
}

/// The lease of `[store]` by default.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// How often receivers collect garbage by default.
pub const DEFAULT_GC_EVERY: Duration = Duration::from_secs(6 * 3600);

/// A collection's grace by default.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);

/// The shortest grace allowed: longer than a publish may take from reading the store's
/// indexes to creating its manifest (`objpoints::PackSettings::max_view_age`, 10 minutes),
/// with room for clocks that differ.
pub const MIN_GC_GRACE: Duration = Duration::from_secs(15 * 60);

/// How long a new lease holder waits before retention, by default.
pub const DEFAULT_TAKEOVER_SETTLE: Duration = Duration::from_secs(5 * 60);

/// The shortest settle allowed: the client below retries a request for up to 30 seconds, each
/// attempt may take as long, and room is left for a store that applies a request late and for
/// clocks that differ.
pub const MIN_TAKEOVER_SETTLE: Duration = Duration::from_secs(2 * 60);

/// Errors of the object store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The configuration cannot make a client.
    #[error("object store {endpoint}: {detail}")]
    Config {
        /// The endpoint.
        endpoint: String,
        /// What is wrong.
        detail: String,
    },
    /// A request failed (the store unreachable, refused credentials, a missing bucket).
    #[error("object store: {what} {key}: {source}")]
    Request {
        /// What was being done.
        what: &'static str,
        /// The object's key.
        key: String,
        /// The client's error.
        #[source]
        source: object_store::Error,
    },
    /// The store answered a read without an ETag, so the object cannot be replaced safely
    /// (compare-and-swap needs it).
    #[error("object store: no ETag for {key}, so it cannot be replaced safely")]
    NoETag {
        /// The object's key.
        key: String,
    },
    /// A lease object that is not a lease.
    #[error("object store: the lease of volume {volume}: {source}")]
    Lease {
        /// The volume.
        volume: String,
        /// Why it was refused.
        #[source]
        source: LeaseError,
    },
}

impl StoreError {
    /// Whether the store said the object is not there.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Self::Request {
                source: object_store::Error::NotFound { .. },
                ..
            }
        )
    }
}

/// What [`ObjectStoreClient::put_if_absent`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// The object was created.
    Created,
    /// The name was taken; nothing was written.
    AlreadyExists,
}

/// What [`ObjectStoreClient::acquire_lease`] got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// We hold the lease (taken, renewed or taken over), as recorded in the store.
    Holding(LeaseRecord),
    /// Another receiver holds it until `expires_ms`.
    Held {
        /// Who holds it.
        holder: String,
        /// Until when, in milliseconds since the Unix epoch.
        expires_ms: u64,
    },
    /// Another receiver changed the lease between our read and our write, and the store
    /// refused ours: read it again to see who won.
    LostRace,
}

/// A client of one bucket.
#[derive(Clone, Debug)]
pub struct ObjectStoreClient {
    store: Arc<dyn ObjectStore>,
    sealing: crate::dr::layout::Sealing,
}

/// The key of a volume's lease object.
pub fn lease_key(volume: &str) -> String {
    format!("volumes/{volume}/lease")
}

impl ObjectStoreClient {
    /// A client for `config` (no request is made yet).
    pub fn connect(config: &StoreConfig) -> Result<Self, StoreError> {
        let config_error = |detail: String| StoreError::Config {
            endpoint: config.endpoint.clone(),
            detail,
        };
        if config.endpoint.starts_with("http://") && !config.allow_http {
            return Err(config_error(
                "plain HTTP sends the store's data and signatures unencrypted; use https:// or \
                 allow_http = true for a store on a private network"
                    .to_owned(),
            ));
        }
        let store = AmazonS3Builder::new()
            .with_endpoint(&config.endpoint)
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key)
            .with_secret_access_key(&config.secret_key)
            .with_allow_http(config.allow_http)
            .with_virtual_hosted_style_request(false)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(object_store::RetryConfig {
                max_retries: 4,
                retry_timeout: Duration::from_secs(30),
                ..Default::default()
            })
            .build()
            .map_err(|e| config_error(e.to_string()))?;
        Ok(Self {
            store: Arc::new(store),
            sealing: match &config.encryption_key {
                Some(key) => crate::dr::layout::Sealing::encrypted(key),
                None => crate::dr::layout::Sealing::plain(),
            },
        })
    }

    /// A client of an in-process store (unit tests of the code that drives the store; the
    /// root tests run the same code against Ceph).
    #[cfg(test)]
    pub fn in_memory() -> Self {
        Self {
            store: Arc::new(object_store::memory::InMemory::new()),
            sealing: crate::dr::layout::Sealing::plain(),
        }
    }

    /// A client of an in-process store that applies the writes under a prefix late, when
    /// the test says (see [`late::LateWrites`]); and a plain client of the same store, for
    /// another writer.
    #[cfg(test)]
    pub fn with_late_writes() -> (Self, Self, late::LateWrites) {
        let inner = Arc::new(object_store::memory::InMemory::new());
        let (store, writes) = late::LateStore::over(inner.clone());
        let client = |store: Arc<dyn ObjectStore>| Self {
            store,
            sealing: crate::dr::layout::Sealing::plain(),
        };
        (client(Arc::new(store)), client(inner), writes)
    }

    /// How this client names and seals chunks (the `[store]` encryption key, if any).
    pub fn sealing(&self) -> &crate::dr::layout::Sealing {
        &self.sealing
    }

    /// The object `key` and its ETag, or `None` if there is none. Objects larger than `limit`
    /// bytes are refused.
    pub async fn get(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Option<(Vec<u8>, Option<String>)>, StoreError> {
        let request = |source| StoreError::Request {
            what: "reading",
            key: key.to_owned(),
            source,
        };
        let result = match self.store.get(&ObjectPath::from(key)).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(request(error)),
        };
        if result.meta.size > limit as u64 {
            return Err(request(object_store::Error::Generic {
                store: "S3",
                source: format!(
                    "the object is {} bytes, more than the {limit} expected",
                    result.meta.size
                )
                .into(),
            }));
        }
        let e_tag = result.meta.e_tag.clone();
        let bytes = result.bytes().await.map_err(request)?;
        Ok(Some((bytes.to_vec(), e_tag)))
    }

    /// The size of `key` and when it was last written (milliseconds since the Unix epoch),
    /// or `None` if there is no such object.
    pub async fn head(&self, key: &str) -> Result<Option<(u64, u64)>, StoreError> {
        match self.store.head(&ObjectPath::from(key)).await {
            Ok(meta) => {
                let (_, size, written) = listed_object(meta);
                Ok(Some((size, written)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(StoreError::Request {
                what: "asking for",
                key: key.to_owned(),
                source,
            }),
        }
    }

    /// `len` bytes of `key` from `offset` (a ranged GET: one chunk of a pack).
    pub async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let end = offset.checked_add(len).ok_or_else(|| StoreError::Request {
            what: "reading",
            key: key.to_owned(),
            source: object_store::Error::Generic {
                store: "S3",
                source: format!("range {offset}+{len} overflows").into(),
            },
        })?;
        let bytes = self
            .store
            .get_range(&ObjectPath::from(key), offset..end)
            .await
            .map_err(|source| StoreError::Request {
                what: "reading a range of",
                key: key.to_owned(),
                source,
            })?;
        Ok(bytes.to_vec())
    }

    async fn listing(&self, prefix: &str) -> Result<object_store::ListResult, StoreError> {
        self.store
            .list_with_delimiter(Some(&ObjectPath::from(prefix)))
            .await
            .map_err(listing_error(prefix))
    }

    /// The objects directly under `prefix` (a folder such as `packs`): key, size, and when
    /// it was last written (milliseconds since the Unix epoch).
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64, u64)>, StoreError> {
        Ok(self
            .listing(prefix)
            .await?
            .objects
            .into_iter()
            .map(listed_object)
            .collect())
    }

    /// The objects under `prefix` whose keys sort after `after` (a full key), as [`Self::list`]
    /// gives them: for a long series of numbered objects, read from where a reader stopped.
    pub async fn list_after(
        &self,
        prefix: &str,
        after: &str,
    ) -> Result<Vec<(String, u64, u64)>, StoreError> {
        use futures_util::TryStreamExt as _;
        let listed: Vec<object_store::ObjectMeta> = self
            .store
            .list_with_offset(Some(&ObjectPath::from(prefix)), &ObjectPath::from(after))
            .try_collect()
            .await
            .map_err(listing_error(prefix))?;
        Ok(listed.into_iter().map(listed_object).collect())
    }

    /// The folders directly under `prefix` (`volumes` → `volumes/host-a`, ...).
    pub async fn list_folders(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .listing(prefix)
            .await?
            .common_prefixes
            .into_iter()
            .map(|path| path.to_string())
            .collect())
    }

    /// Creates `key` with `content` only if no object has that name.
    pub async fn put_if_absent(&self, key: &str, content: Vec<u8>) -> Result<Created, StoreError> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&ObjectPath::from(key), PutPayload::from(content), options)
            .await
        {
            Ok(_) => Ok(Created::Created),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(Created::AlreadyExists),
            Err(source) => Err(StoreError::Request {
                what: "creating",
                key: key.to_owned(),
                source,
            }),
        }
    }

    /// Replaces `key` with `content` only if it is still the version `e_tag`; `false` if it
    /// changed (or vanished) since.
    pub async fn replace_if_unchanged(
        &self,
        key: &str,
        content: Vec<u8>,
        e_tag: &str,
    ) -> Result<bool, StoreError> {
        // Ceph's gateway (16.2) compares `If-Match` on a PUT with the stored ETag without its
        // quotes, so a quoted ETag (as GET returns it) never matches: send it bare. Only Ceph
        // is tested so far; a store that wants the quoted form would refuse every renewal,
        // which the lease reports as a lost race, never as a second holder.
        let bare = e_tag.trim_matches('"');
        let options = PutOptions {
            mode: PutMode::Update(UpdateVersion {
                e_tag: Some(bare.to_owned()),
                version: None,
            }),
            ..Default::default()
        };
        match self
            .store
            .put_opts(&ObjectPath::from(key), PutPayload::from(content), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::Precondition { .. })
            | Err(object_store::Error::NotFound { .. })
            | Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(source) => Err(StoreError::Request {
                what: "replacing",
                key: key.to_owned(),
                source,
            }),
        }
    }

    /// Writes `key`, replacing what is there (only for objects one writer owns: a manifest
    /// rewritten by retention under its volume's lease).
    pub async fn put(&self, key: &str, content: Vec<u8>) -> Result<(), StoreError> {
        self.store
            .put(&ObjectPath::from(key), PutPayload::from(content))
            .await
            .map(|_| ())
            .map_err(|source| StoreError::Request {
                what: "writing",
                key: key.to_owned(),
                source,
            })
    }

    /// Removes `key` (no error if it is already gone).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(StoreError::Request {
                what: "deleting",
                key: key.to_owned(),
                source,
            }),
        }
    }

    /// Takes, renews or takes over the lease of `volume` for `me`, at `now_ms` (milliseconds
    /// since the Unix epoch), for `duration_ms`. One read and at most one conditional write.
    pub async fn acquire_lease(
        &self,
        volume: &str,
        me: &str,
        now_ms: u64,
        duration_ms: u64,
    ) -> Result<LeaseOutcome, StoreError> {
        self.acquire_lease_at(&lease_key(volume), volume, me, now_ms, duration_ms)
            .await
    }

    /// As [`Self::acquire_lease`], for the lease object `key` (`what` names it in errors):
    /// the store-wide lease of garbage collection is one.
    pub async fn acquire_lease_at(
        &self,
        key: &str,
        what: &str,
        me: &str,
        now_ms: u64,
        duration_ms: u64,
    ) -> Result<LeaseOutcome, StoreError> {
        let key = key.to_owned();
        let volume = what;
        let current = match self.get(&key, MAX_LEASE_BYTES).await? {
            None => None,
            Some((bytes, e_tag)) => {
                let record = LeaseRecord::decode(&bytes).map_err(|source| StoreError::Lease {
                    volume: volume.to_owned(),
                    source,
                })?;
                Some((record, e_tag))
            }
        };
        let decision = lease::decide(
            current.as_ref().map(|(record, _)| record),
            me,
            now_ms,
            duration_ms,
        );
        let won = match &decision {
            LeaseDecision::Held { holder, expires_ms } => {
                return Ok(LeaseOutcome::Held {
                    holder: holder.clone(),
                    expires_ms: *expires_ms,
                });
            }
            LeaseDecision::Create(record) => {
                self.put_if_absent(&key, record.encode()).await? == Created::Created
            }
            LeaseDecision::Renew(record) | LeaseDecision::TakeOver(record) => {
                // A store that gives no ETag cannot do compare-and-swap: refuse to guess.
                let Some(e_tag) = current.as_ref().and_then(|(_, e_tag)| e_tag.as_deref()) else {
                    return Err(StoreError::NoETag { key });
                };
                self.replace_if_unchanged(&key, record.encode(), e_tag)
                    .await?
            }
        };
        Ok(match decision {
            LeaseDecision::Create(record)
            | LeaseDecision::Renew(record)
            | LeaseDecision::TakeOver(record)
                if won =>
            {
                LeaseOutcome::Holding(record)
            }
            _ => LeaseOutcome::LostRace,
        })
    }
}

/// A listed object as [`ObjectStoreClient::list`] gives it: key, size, and when it was last
/// written (milliseconds since the Unix epoch).
fn listed_object(meta: object_store::ObjectMeta) -> (String, u64, u64) {
    let written = u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0);
    (meta.location.to_string(), meta.size, written)
}

/// The error of a failed listing of `prefix`.
fn listing_error(prefix: &str) -> impl FnOnce(object_store::Error) -> StoreError + '_ {
    move |source| StoreError::Request {
        what: "listing",
        key: prefix.to_owned(),
        source,
    }
}

/// A store that applies some writes late, as a real one may: a request that timed out at the
/// client (which reports it failed) can still be applied by the store afterwards, with its
/// conditions checked then. Unit tests hold the writes under a prefix and release them when
/// the scenario needs them to land.
#[cfg(test)]
pub mod late {
    use std::sync::{Arc, Mutex};

    use futures_util::stream::BoxStream;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
        PutMultipartOptions, PutOptions, PutPayload, PutResult, Result, memory::InMemory,
        path::Path,
    };

    #[derive(Debug, Default)]
    struct Held {
        prefix: Option<String>,
        writes: Vec<(Path, PutPayload, PutOptions)>,
    }

    /// The test's handle on a [`LateStore`]'s held writes.
    #[derive(Debug, Clone)]
    pub struct LateWrites {
        inner: Arc<InMemory>,
        held: Arc<Mutex<Held>>,
    }

    impl LateWrites {
        /// From now on, writes to keys under `prefix` fail at the client and are kept.
        pub fn hold(&self, prefix: &str) {
            self.held.lock().expect("held").prefix = Some(prefix.to_owned());
        }

        /// The store applies the kept writes now, in the order they were sent, each with its
        /// condition checked now; writes are no longer held. Returns whether each was applied.
        pub async fn release(&self) -> Vec<bool> {
            let writes = {
                let mut held = self.held.lock().expect("held");
                held.prefix = None;
                std::mem::take(&mut held.writes)
            };
            let mut applied = Vec::new();
            for (location, payload, options) in writes {
                applied.push(
                    self.inner
                        .put_opts(&location, payload, options)
                        .await
                        .is_ok(),
                );
            }
            applied
        }
    }

    /// An in-memory store whose writes under the held prefix are applied late.
    #[derive(Debug)]
    pub struct LateStore {
        inner: Arc<InMemory>,
        held: Arc<Mutex<Held>>,
    }

    impl LateStore {
        /// A store over `inner`, and the handle on its held writes.
        pub fn over(inner: Arc<InMemory>) -> (LateStore, LateWrites) {
            let held = Arc::new(Mutex::new(Held::default()));
            (
                LateStore {
                    inner: inner.clone(),
                    held: held.clone(),
                },
                LateWrites { inner, held },
            )
        }
    }

    impl std::fmt::Display for LateStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "LateStore({})", self.inner)
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for LateStore {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> Result<PutResult> {
            {
                let mut held = self.held.lock().expect("held");
                if held
                    .prefix
                    .as_deref()
                    .is_some_and(|prefix| location.as_ref().starts_with(prefix))
                {
                    held.writes.push((location.clone(), payload, opts));
                    return Err(object_store::Error::Generic {
                        store: "late",
                        source: "the request timed out (the store applies it later)".into(),
                    });
                }
            }
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, Result<Path>>,
        ) -> BoxStream<'static, Result<Path>> {
            self.inner.delete_stream(locations)
        }

        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renewal the store applies late is a renewal only if nobody replaced the lease since:
    /// the receiver that took an expired lease over keeps it, and the late writer sees that.
    #[tokio::test]
    async fn a_lease_renewal_the_store_applies_late_never_takes_the_lease_back() {
        let (a, b, writes) = ObjectStoreClient::with_late_writes();
        let key = lease_key("v");
        let minute = 60_000;
        let holder = |outcome: &LeaseOutcome| match outcome {
            LeaseOutcome::Holding(record) => Some((record.holder.clone(), record.token)),
            _ => None,
        };
        let first = a.acquire_lease_at(&key, "v", "a", 0, minute).await.unwrap();
        assert_eq!(holder(&first), Some(("a".into(), 1)));
        // A's renewal at 30 s times out at the client; the store keeps the request.
        writes.hold(&key);
        assert!(
            a.acquire_lease_at(&key, "v", "a", 30_000, minute)
                .await
                .is_err()
        );
        // B takes the lease over once it has expired by the record it reads.
        let taken = b
            .acquire_lease_at(&key, "v", "b", 61_000, minute)
            .await
            .unwrap();
        assert_eq!(holder(&taken), Some(("b".into(), 2)));
        // A's renewal lands now: the version it was to replace is gone.
        assert_eq!(writes.release().await, vec![false]);
        let seen = a
            .acquire_lease_at(&key, "v", "a", 62_000, minute)
            .await
            .unwrap();
        assert!(
            matches!(&seen, LeaseOutcome::Held { holder, expires_ms: 121_000 } if holder == "b"),
            "{seen:?}"
        );

        // The other order: A takes it back after B's lease ends, renews, and the store applies
        // the renewal late but before anyone else writes: a renewal like any other.
        let back = a
            .acquire_lease_at(&key, "v", "a", 130_000, minute)
            .await
            .unwrap();
        assert_eq!(holder(&back), Some(("a".into(), 3)));
        writes.hold(&key);
        assert!(
            a.acquire_lease_at(&key, "v", "a", 150_000, minute)
                .await
                .is_err()
        );
        assert_eq!(writes.release().await, vec![true]);
        let kept_off = b
            .acquire_lease_at(&key, "v", "b", 191_000, minute)
            .await
            .unwrap();
        assert!(
            matches!(&kept_off, LeaseOutcome::Held { holder, expires_ms: 210_000 } if holder == "a"),
            "{kept_off:?}"
        );
        let renewed = a
            .acquire_lease_at(&key, "v", "a", 192_000, minute)
            .await
            .unwrap();
        assert_eq!(holder(&renewed), Some(("a".into(), 3)), "the same token");
    }
}
