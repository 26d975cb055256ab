//! The receiver: a QUIC server that admits pinned agents, each only for its granted volumes, and
//! turns their cycles into atomic commits of the volume images ([`crate::dr::volume`]).
//!
//! Every frame is hostile input. A connection that breaks the protocol (oversized or
//! undecodable frame, range outside the volume, data outside a cycle, wrong cycle number) gets
//! a `Refused` message if possible and is closed with an application error code; its open cycle
//! is discarded, so nothing of it reaches the image. Other connections are not affected.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use std::sync::atomic::Ordering;

use tokio::sync::watch;

use crate::{
    command::status::{KeptCycle, PointSummary, StatusBoard, VolumeState},
    dr::audit::{AuditLog, Event},
    dr::grantstore,
    dr::publish::{PublishError, Publisher},
    dr::volume::{Recovery, StoreError, Volume},
    link::identity::{Fingerprint, Identity},
    link::net::{self, NetError},
};
use blkmirror_protocol::session::{
    self, ControlStep, CyclesOpened, FrameAdmission, FramesVerdict, ReceiverSession,
};
use blkmirror_protocol::{
    retention::RetentionPolicy,
    wire::{self, AgentMessage, DataFrame, ReceiverMessage, RefusalCode},
};

/// How long a `Flush` or `Commit` waits for missing data frames without any progress.
const FRAME_WAIT: Duration = Duration::from_secs(60);

/// Which agent may write which volumes.
pub type Grants = BTreeMap<Fingerprint, BTreeSet<String>>;

/// Receiver errors (start-up; per-connection problems are logged and refused).
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    /// Network setup.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The data directory.
    #[error("data directory {path}: {message}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A volume could not be recovered.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the receiver needs.
pub struct ReceiverConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Where volumes live.
    pub data_dir: PathBuf,
    /// The receiver's identity.
    pub identity: Identity,
    /// Admitted agents and their volumes.
    pub grants: Grants,
    /// Flow-control window in bytes.
    pub window: u64,
    /// Which points in time to keep.
    pub retention: RetentionPolicy,
    /// Where status is reported.
    pub status: Arc<StatusBoard>,
    /// Where committed points are published (`[store]`; `None`: the data directory only).
    pub publisher: Option<Arc<Publisher>>,
    /// The version of the store's grants that `grants` are (`None`: this receiver's own
    /// list, enforced until the store's can be read).
    pub grants_version: Option<u64>,
}

/// How often the receiver copies its audit log to the store's shared chain.
const AUDIT_SHIP_EVERY: Duration = Duration::from_secs(5);

fn log(message: impl std::fmt::Display) {
    tracing::info!(target: "blkmirror receiver", "{message}");
}

fn warn(message: impl std::fmt::Display) {
    tracing::warn!(target: "blkmirror receiver", "{message}");
}

/// What [`recover_all`] found: each volume and its recovery, and the volumes whose
/// interrupted cycle was kept ([`Recovery::Kept`]), still open with it.
pub struct Recovered {
    pub volumes: Vec<(String, Result<Recovery, StoreError>)>,
    pub kept: Vec<(String, Volume)>,
}

/// Recovers every volume under `data_dir`: applies committed journals, keeps an interrupted
/// cycle for its agent, drops other uncommitted ones. A volume that cannot be opened (corrupt
/// metadata, unreadable files) is reported with its error and left alone: one broken volume
/// must not keep the others from being served.
pub fn recover_all(data_dir: &Path) -> Result<Recovered, ReceiverError> {
    let entries = std::fs::read_dir(data_dir).map_err(|error| ReceiverError::DataDir {
        path: data_dir.to_owned(),
        message: error.to_string(),
    })?;
    let mut recovered = Recovered {
        volumes: Vec::new(),
        kept: Vec::new(),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if wire::check_volume_name(&name).is_err() || !entry.path().join("volume.json").exists() {
            continue;
        }
        // Only a volume with a kept cycle stays open (the others are opened by their
        // agents' connections): a data directory of many volumes holds no file open for each.
        let recovery = Volume::open(data_dir, &name).map(|(volume, recovery)| {
            if matches!(recovery, Recovery::Kept { .. }) {
                recovered.kept.push((name.clone(), volume));
            }
            recovery
        });
        recovered.volumes.push((name, recovery));
    }
    recovered.volumes.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(recovered)
}

/// Audit entries for refused handshakes are throttled: an unauthenticated peer must not be
/// able to grow the audit log (3 fsyncs an entry) at its own pace. Pure: time is an argument.
#[derive(Debug, Default)]
pub struct RefusalThrottle {
    /// The start of the current window and the entries written in it.
    window_start_ms: u64,
    written: u32,
    /// Refusals not written since the last entry, reported with the next one.
    suppressed: u64,
}

impl RefusalThrottle {
    /// Entries written per window at most.
    pub const PER_WINDOW: u32 = 10;
    /// The window.
    pub const WINDOW_MS: u64 = 60_000;

    /// Whether a refusal at `now_ms` gets its own audit entry; if so, also how many were
    /// suppressed before it (to be recorded in that entry).
    pub fn admit(&mut self, now_ms: u64) -> Option<u64> {
        if now_ms.saturating_sub(self.window_start_ms) >= Self::WINDOW_MS {
            self.window_start_ms = now_ms;
            self.written = 0;
        }
        if self.written >= Self::PER_WINDOW {
            self.suppressed += 1;
            return None;
        }
        self.written += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// An authenticated connection: its agent, the volume it asked for (once it has), and the
/// connection, keyed by the connection's stable id.
type ListedSession = (Fingerprint, Option<String>, quinn::Connection);

struct Context {
    data_dir: PathBuf,
    /// Replaced on a configuration reload, or (with a store) when the store's change.
    grants: std::sync::RwLock<Grants>,
    /// The version of the store's grants in force (0: this receiver's own list).
    grants_version: std::sync::atomic::AtomicU64,
    /// Replaced on a configuration reload (applies to volumes opened afterwards).
    retention: std::sync::RwLock<RetentionPolicy>,
    audit: AuditLog,
    status: Arc<StatusBoard>,
    /// Where committed points are published before they are acknowledged.
    publisher: Option<Arc<Publisher>>,
    /// Volumes with a live session, and the connection that holds each.
    busy: Mutex<HashMap<String, (Fingerprint, quinn::Connection)>>,
    /// Volumes whose connection broke in the middle of a journaled cycle, with the agent that
    /// began it and when: the open cycle's journal is kept for that agent to continue
    /// (`Resume`). Any other connection for the volume, a `Begin`, or [`KEEP_OPEN_CYCLE`]
    /// without one abandons it.
    suspended: Suspended,
    /// Every authenticated connection, with the volume it asked for once it has: a reload
    /// closes those whose grant it withdrew, also while they wait for a volume.
    sessions: Mutex<HashMap<usize, ListedSession>>,
    /// Throttles the audit entries of refused handshakes.
    handshake_refusals: Mutex<RefusalThrottle>,
}

impl Context {
    /// Whether `agent` is admitted at all under the current configuration.
    fn admitted(&self, agent: &Fingerprint) -> bool {
        self.grants.read().expect("grants").contains_key(agent)
    }

    /// Whether `agent` is granted `volume` under the current configuration.
    fn granted(&self, agent: &Fingerprint, volume: &str) -> bool {
        self.grants
            .read()
            .expect("grants")
            .get(agent)
            .is_some_and(|volumes| volumes.contains(volume))
    }

    /// Appends to the audit log; a failure to audit is logged, not fatal to replication.
    fn record(&self, event: Event) {
        record(&self.audit, event);
    }

    /// Ends `connection`'s claim on `volume` (not a newer connection's).
    fn release(&self, volume: &str, connection: &quinn::Connection) {
        let mut busy = self.busy.lock().expect("busy lock");
        if busy
            .get(volume)
            .is_some_and(|(_, holder)| holder.stable_id() == connection.stable_id())
        {
            busy.remove(volume);
        }
    }
}

/// A refusal: code and message for the agent and the log.
#[derive(Debug)]
struct Refusal {
    code: RefusalCode,
    message: String,
    /// The connection itself failed (the peer went away); not a decision of ours.
    transport: bool,
}

impl Refusal {
    fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            transport: false,
        }
    }

    fn close_code(&self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self.code.close_code())
    }
}

impl From<session::Refusal> for Refusal {
    fn from(refusal: session::Refusal) -> Self {
        Refusal::new(refusal.code, refusal.message)
    }
}

impl From<NetError> for Refusal {
    fn from(error: NetError) -> Self {
        match error {
            NetError::Wire(error) => Refusal::new(RefusalCode::BadFrame, error.to_string()),
            transport @ (NetError::Connection(_) | NetError::Write(_) | NetError::Read(_)) => {
                Refusal {
                    transport: true,
                    ..Refusal::new(RefusalCode::Sequence, transport.to_string())
                }
            }
            other => Refusal::new(RefusalCode::Sequence, other.to_string()),
        }
    }
}

impl From<PublishError> for Refusal {
    fn from(error: PublishError) -> Self {
        match error {
            PublishError::Local(error) => error.into(),
            error @ PublishError::SourceMismatch { .. } => {
                Refusal::new(RefusalCode::SourceMismatch, error.to_string())
            }
            // Two histories of one volume: an operator must look, retrying will not help.
            error @ PublishError::Diverged { .. } => {
                Refusal::new(RefusalCode::Forbidden, error.to_string())
            }
            // A committed point not on the store yet is not acknowledged: the agent retries,
            // and is welcomed with it once the store has it.
            PublishError::Store(error) => Refusal::new(
                RefusalCode::Storage,
                format!(
                    "the receiver's object store failed (committed cycles wait on the receiver \
                     until they are published; retry): {error}"
                ),
            ),
            other => Refusal::new(RefusalCode::Storage, other.to_string()),
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(error: StoreError) -> Self {
        let code = match &error {
            StoreError::DiskFull(_) => RefusalCode::DiskFull,
            StoreError::SourceMismatch { .. } => RefusalCode::SourceMismatch,
            StoreError::Sequence(_) => RefusalCode::Sequence,
            StoreError::Refused(_) => RefusalCode::Forbidden,
            _ => RefusalCode::Storage,
        };
        Refusal::new(code, error.to_string())
    }
}

/// A bound receiver: its endpoint, and the cycles its recovery kept for their agents; what
/// [`serve`] takes.
pub struct Bound {
    pub endpoint: quinn::Endpoint,
    interrupted: Vec<(String, Fingerprint, Volume)>,
}

/// Binds the endpoint and recovers all volumes.
pub fn bind(config: &ReceiverConfig) -> Result<Bound, ReceiverError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|error| ReceiverError::DataDir {
        path: config.data_dir.clone(),
        message: error.to_string(),
    })?;
    let recovered = recover_all(&config.data_dir)?;
    for (name, recovery) in recovered.volumes {
        match recovery {
            Ok(Recovery::Clean) => {}
            Ok(Recovery::Discarded) => log(format!(
                "volume {name}: discarded an uncommitted cycle; the image is at its last commit"
            )),
            Ok(Recovery::Replayed(seq)) => log(format!(
                "volume {name}: finished applying committed cycle {seq}"
            )),
            Ok(Recovery::Kept { seq, frames }) => log(format!(
                "volume {name}: kept uncommitted cycle {seq} ({frames} journaled frames) for its \
                 agent to resume"
            )),
            Err(error) => {
                tracing::error!(
                    target: "blkmirror receiver",
                    "volume {name} is broken and will not be served: {error}"
                );
                config.status.update(&name, |s| {
                    s.state = VolumeState::Failed;
                    s.last_error = Some(error.to_string());
                });
                AuditLog::in_dir(&config.data_dir)
                    .append(Event {
                        event: "volume-failed",
                        volume: Some(name.clone()),
                        outcome: error.to_string(),
                        ..Event::default()
                    })
                    .map_err(|error| ReceiverError::DataDir {
                        path: config.data_dir.clone(),
                        message: format!("audit log: {error}"),
                    })?;
            }
        }
    }
    let admitted = config.grants.keys().cloned().collect();
    Ok(Bound {
        endpoint: net::server_endpoint(&config.identity, admitted, config.listen, config.window)?,
        interrupted: interrupted_cycles(recovered.kept),
    })
}

/// Serves connections on `endpoint` until `shutdown` turns true.
/// A configuration reload (SIGHUP): the new grants and retention, or why the file was refused.
pub type Reload = Result<(Grants, RetentionPolicy), String>;

fn retention_json(policy: &RetentionPolicy) -> serde_json::Value {
    serde_json::json!({
        "all_s": policy.all.as_secs(),
        "hourly_s": policy.hourly.as_secs(),
        "daily_s": policy.daily.as_secs(),
        "locked_s": policy.locked.as_secs(),
    })
}

/// How long a cycle interrupted by a broken connection is kept for its agent to resume: its
/// journal holds disk space until then.
const KEEP_OPEN_CYCLE: Duration = Duration::from_secs(3600);

/// The volumes kept with an interrupted cycle (see `Context::suspended`).
type Suspended = Mutex<HashMap<String, (Fingerprint, SharedVolume, Instant)>>;

/// Abandons the kept cycles whose agent has not come back within `keep_for` of `now`: the
/// journal's space is freed, and the agent, if it returns, sends the cycle afresh. Returns
/// the volumes whose cycle it abandoned.
fn abandon_stale_cycles(suspended: &Suspended, keep_for: Duration, now: Instant) -> Vec<String> {
    let stale: Vec<(String, SharedVolume)> = {
        let mut suspended = suspended.lock().expect("suspended");
        let names: Vec<String> = suspended
            .iter()
            .filter(|(_, (_, _, since))| now.saturating_duration_since(*since) >= keep_for)
            .map(|(name, _)| name.clone())
            .collect();
        names
            .into_iter()
            .filter_map(|name| suspended.remove(&name).map(|(_, volume, _)| (name, volume)))
            .collect()
    };
    stale
        .into_iter()
        .map(|(name, volume)| {
            if let Ok(mut volume) = volume.lock() {
                volume.abort();
            }
            log(format!(
                "volume {name}: the agent did not resume its interrupted cycle within {} s; \
                 abandoned it",
                keep_for.as_secs()
            ));
            name
        })
        .collect()
}

/// What `status` shows of a cycle kept for its agent, from now on.
fn kept_cycle_status(report: &wire::OpenCycleReport) -> KeptCycle {
    KeptCycle {
        seq: report.seq,
        frames: report.frames,
        journaled_bytes: report.journaled.iter().map(|r| r.1).sum(),
        since_unix_ms: crate::command::status::now_ms(),
    }
}

/// The cycles a restarted receiver keeps for their agents (see [`Recovery::Kept`]): each
/// volume whose recovery kept an interrupted cycle, with the agent its journal names. A
/// journal whose agent is no valid fingerprint is abandoned.
fn interrupted_cycles(kept: Vec<(String, Volume)>) -> Vec<(String, Fingerprint, Volume)> {
    kept.into_iter()
        .filter_map(
            |(name, mut volume)| match volume.open_cycle_holder().map(Fingerprint::parse) {
                Some(Ok(holder)) => Some((name, holder, volume)),
                _ => {
                    log(format!(
                        "volume {name}: the interrupted cycle names no valid agent; abandoned it"
                    ));
                    volume.abort();
                    None
                }
            },
        )
        .collect()
}

/// Aborts a task when dropped (the receiver's background work ends with `serve`).
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Collects the object store's garbage every `gc_every` of `[store]`, when this receiver
/// gets the store-wide turn: logged, audited (`gc`), and shown in `status`.
async fn collect_garbage_periodically(context: Arc<Context>, publisher: Arc<Publisher>) {
    let Some(every) = publisher.gc_every() else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        let result = publisher.collect_garbage(false).await;
        context.status.set_store(publisher.health());
        let (outcome, detail) = match &result {
            Ok(None) => {
                log("object store garbage collection: another receiver has the turn; skipped");
                continue;
            }
            Ok(Some(report)) => {
                log(format!(
                    "object store garbage collection: {}",
                    crate::dr::publish::describe_gc(report)
                ));
                // The receiver whose turn it was also copies the audit chain's full runs of
                // old blocks into segments, so that a check reads one object per run.
                match crate::dr::auditchain::write_segments(publisher.client(), 16).await {
                    Ok(0) => {}
                    Ok(written) => log(format!(
                        "audit chain: {written} segment(s) of {} blocks written",
                        crate::dr::auditchain::SEGMENT_BLOCKS
                    )),
                    Err(error) => warn(format!(
                        "audit chain: writing segments failed (a check reads the blocks one \
                         by one meanwhile): {error}"
                    )),
                }
                (
                    "ok".to_owned(),
                    serde_json::json!({
                        "packs": report.packs,
                        "deleted": report.deleted,
                        "deleted_bytes": report.deleted_bytes,
                        "repacked": report.repacked,
                        "revived": report.revived,
                    }),
                )
            }
            Err(error) => {
                warn(format!("object store garbage collection failed: {error}"));
                (format!("failed: {error}"), serde_json::Value::Null)
            }
        };
        context.record(Event {
            event: "gc",
            outcome,
            detail,
            ..Event::default()
        });
    }
}

/// Serves until `shutdown`; applies the configuration reloads that arrive on `reloads`.
pub async fn serve(
    bound: Bound,
    config: ReceiverConfig,
    mut shutdown: watch::Receiver<bool>,
    mut reloads: tokio::sync::mpsc::Receiver<Reload>,
) -> Result<(), ReceiverError> {
    let audit = AuditLog::in_dir(&config.data_dir);
    let context = Arc::new(Context {
        data_dir: config.data_dir,
        grants: std::sync::RwLock::new(config.grants),
        grants_version: std::sync::atomic::AtomicU64::new(config.grants_version.unwrap_or(0)),
        retention: std::sync::RwLock::new(config.retention),
        audit,
        status: config.status,
        publisher: config.publisher,
        busy: Mutex::new(HashMap::new()),
        suspended: Mutex::new(HashMap::new()),
        sessions: Mutex::new(HashMap::new()),
        handshake_refusals: Mutex::new(RefusalThrottle::default()),
    });
    context.record(Event {
        event: "receiver-start",
        outcome: "ok".into(),
        detail: serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "agents": context.grants.read().expect("grants").len(),
            "retention": retention_json(&context.retention.read().expect("retention")),
        }),
        ..Event::default()
    });
    let collector = context
        .publisher
        .clone()
        .map(|publisher| tokio::spawn(collect_garbage_periodically(context.clone(), publisher)));
    let _collector = AbortOnDrop(collector);
    let shipper = context
        .publisher
        .clone()
        .map(|publisher| tokio::spawn(ship_audit_periodically(context.clone(), publisher)));
    let _shipper = AbortOnDrop(shipper);
    let view_keeper = context
        .publisher
        .clone()
        .map(|publisher| tokio::spawn(keep_store_view_current(publisher)));
    let _view_keeper = AbortOnDrop(view_keeper);
    let (grant_changes_tx, mut grant_changes) = tokio::sync::mpsc::channel(2);
    let follower = context.publisher.clone().map(|publisher| {
        tokio::spawn(follow_store_grants(
            publisher,
            context.grants.read().expect("grants").clone(),
            context.grants_version.load(Ordering::SeqCst),
            grant_changes_tx,
        ))
    });
    let _follower = AbortOnDrop(follower);
    // Cycles interrupted by the last process's end wait for their agents as if their
    // connections had just broken.
    let Bound {
        endpoint,
        interrupted,
    } = bound;
    for (name, holder, volume) in interrupted {
        if let Some(report) = volume.open_cycle_report() {
            context
                .status
                .update(&name, |s| s.kept_cycle = Some(kept_cycle_status(&report)));
        }
        context
            .suspended
            .lock()
            .expect("suspended")
            .insert(name, (holder, Arc::new(Mutex::new(volume)), Instant::now()));
    }
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = sweep.tick() => {
                for name in
                    abandon_stale_cycles(&context.suspended, KEEP_OPEN_CYCLE, Instant::now())
                {
                    context.status.update(&name, |s| s.kept_cycle = None);
                }
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                // A stateless retry first proves that the peer owns its source address, so a
                // spoofed flood cannot reach the handshake (nor the audit log).
                if !incoming.remote_address_validated() {
                    if let Err(error) = incoming.retry() {
                        error.into_incoming().ignore();
                    }
                    continue;
                }
                tokio::spawn(connection(incoming, context.clone()));
            }
            Some(reload) = reloads.recv() => {
                apply_reload(&endpoint, &config.identity, config.window, &context, reload);
            }
            Some(record) = grant_changes.recv() => {
                apply_store_grants(&endpoint, &config.identity, config.window, &context, record);
            }
            _ = shutdown.changed() => break,
        }
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"receiver shutting down");
    endpoint.wait_idle().await;
    if let Some(publisher) = &context.publisher {
        // What happened up to the stop belongs in the shared chain now, not at the next start
        // (which may never come on this machine).
        match tokio::time::timeout(
            Duration::from_secs(10),
            publisher.ship_audit(&context.data_dir),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => warn(format!(
                "the audit log's last entries were not copied to the store (they will be at \
                 the next start): {error}"
            )),
            Err(_) => warn(
                "the audit log's last entries were not copied to the store within 10 s (they \
                 will be at the next start)",
            ),
        }
    }
    Ok(())
}

/// Keeps this receiver's view of the store current ([`Publisher::keep_view_current`]) from
/// its start: a publish then finds it loaded and at most a quarter of its allowed age old,
/// and the store's whole listing runs here, not in a publish.
async fn keep_store_view_current(publisher: Arc<Publisher>) {
    let mut failing = false;
    loop {
        match publisher.keep_view_current().await {
            Ok(()) if failing => {
                failing = false;
                log("the receiver's view of the object store is current again");
            }
            Ok(()) => {}
            // Said once per outage: publishes report their own errors meanwhile.
            Err(error) if !failing => {
                failing = true;
                warn(format!(
                    "keeping the receiver's view of the object store current failed \
                     (retried every {}s): {error}",
                    publisher.view_kept_every().as_secs()
                ));
            }
            Err(_) => {}
        }
        tokio::time::sleep(publisher.view_kept_every()).await;
    }
}

/// Every [`AUDIT_SHIP_EVERY`]: copies the audit log to the store's shared chain, and records
/// in the store the terms that a failover, reprotect or failback raised in this receiver's
/// data directory (so that the other receivers refuse the old source too).
async fn ship_audit_periodically(context: Arc<Context>, publisher: Arc<Publisher>) {
    let mut failing = false;
    let mut recorded_terms: HashMap<String, u64> = HashMap::new();
    loop {
        push_raised_terms(&context, &publisher, &mut recorded_terms).await;
        let result = publisher.ship_audit(&context.data_dir).await;
        context.status.set_store(publisher.health());
        match result {
            Ok(_) if failing => {
                failing = false;
                log("the audit log is copied to the store's shared chain again");
            }
            Ok(_) => {}
            // Said once per outage, not every round: the status keeps the error.
            Err(error) if !failing => {
                failing = true;
                warn(format!(
                    "copying the audit log to the store's shared chain failed (retried every \
                     {}s): {error}",
                    AUDIT_SHIP_EVERY.as_secs()
                ));
            }
            Err(_) => {}
        }
        tokio::time::sleep(AUDIT_SHIP_EVERY).await;
    }
}

/// Records in the store each volume's term that is higher here than last recorded
/// ([`Publisher::push_authority`] writes only over a lower term in the store).
async fn push_raised_terms(
    context: &Context,
    publisher: &Publisher,
    recorded: &mut HashMap<String, u64>,
) {
    let Ok(entries) = std::fs::read_dir(&context.data_dir) else {
        return;
    };
    let disk = crate::dr::storage::LocalDisk::shared();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.join(crate::dr::authority::AUTHORITY_FILE).exists() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Ok(local) = crate::dr::authority::read(&disk, &dir) else {
            continue;
        };
        if recorded.get(&name).is_some_and(|&term| term >= local.term) {
            continue;
        }
        match publisher.push_authority(&name, &local).await {
            Ok(()) => {
                recorded.insert(name, local.term);
            }
            Err(error) => warn(format!(
                "volume {name}: recording term {} in the object store failed (retried): {error}",
                local.term
            )),
        }
    }
}

/// Reads the store's grants every [`grantstore::GRANTS_POLL`] and hands each new version on.
/// A store without grants is seeded with the grants in force (`in_force` at `version`): this
/// receiver's own list at version 1 if the store was unreachable when it started, or else the
/// last version it applied, if the record was deleted by hand.
async fn follow_store_grants(
    publisher: Arc<Publisher>,
    mut in_force: Grants,
    mut version: u64,
    changes: tokio::sync::mpsc::Sender<grantstore::GrantsRecord>,
) {
    let mut failing = false;
    loop {
        // A store that lost the record gets back the version in force here.
        let read = grantstore::seed(
            publisher.client(),
            &in_force,
            version,
            publisher.holder(),
            crate::command::status::now_ms(),
        )
        .await;
        match read {
            Ok(record) => {
                failing = false;
                if record.version != version {
                    version = record.version;
                    if let Ok(grants) = record.grants() {
                        in_force = grants;
                    }
                    if changes.send(record).await.is_err() {
                        return;
                    }
                }
            }
            Err(error) => {
                if !failing {
                    warn(format!(
                        "reading the store's grants failed; the version in force stays: {error}"
                    ));
                }
                failing = true;
            }
        }
        tokio::time::sleep(grantstore::GRANTS_POLL).await;
    }
}

/// Puts a new version of the store's grants in force.
fn apply_store_grants(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    window: u64,
    context: &Context,
    record: grantstore::GrantsRecord,
) {
    let grants = match record.grants() {
        Ok(grants) => grants,
        Err(error) => {
            // `read` checked it; kept for a record that a later build reads differently.
            warn(format!("the store's grants were not applied: {error}"));
            return;
        }
    };
    match swap_grants(endpoint, identity, window, context, grants) {
        Ok(closed) => {
            context
                .grants_version
                .store(record.version, Ordering::SeqCst);
            if let Some(publisher) = &context.publisher {
                publisher.set_grants_version(record.version);
                context.status.set_store(publisher.health());
            }
            let detail = serde_json::json!({
                "version": record.version,
                "by": record.by,
                "agents": record.agents.len(),
                "closed_sessions": closed,
            });
            log(format!(
                "the store's grants changed, now in force: {} (closed sessions: {closed:?})",
                record.summary()
            ));
            context.record(Event {
                event: "grants-change",
                outcome: "ok".into(),
                detail,
                ..Event::default()
            });
        }
        Err(message) => context.record(Event {
            event: "grants-change",
            outcome: message,
            detail: serde_json::json!({ "version": record.version }),
            ..Event::default()
        }),
    }
}

/// Puts `grants` in force: new handshakes admit exactly their agents, and the sessions whose
/// agent lost its grant are closed (returned: their volumes, or agents before they named
/// one).
fn swap_grants(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    window: u64,
    context: &Context,
    grants: Grants,
) -> Result<Vec<String>, String> {
    let admitted = grants.keys().cloned().collect();
    let server_config =
        net::server_config(identity, admitted, window).map_err(|error| error.to_string())?;
    endpoint.set_server_config(Some(server_config));
    // The new grants first, then the sweep: a session checks its grant after registering, so
    // either it sees the new grants or the sweep sees it.
    *context.grants.write().expect("grants") = grants;
    let mut revoked = Vec::new();
    for (holder, volume, connection) in context.sessions.lock().expect("sessions").values() {
        let keep = match volume {
            Some(volume) => context.granted(holder, volume),
            None => context.admitted(holder),
        };
        if !keep {
            connection.close(
                quinn::VarInt::from_u32(wire::CLOSE_ADMISSION),
                b"grant revoked",
            );
            revoked.push(volume.clone().unwrap_or_else(|| holder.to_string()));
        }
    }
    Ok(revoked)
}

/// Swaps in new grants and retention: new handshakes admit exactly the new agents, and a
/// session whose agent lost its grant for the volume is closed.
fn apply_reload(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    window: u64,
    context: &Context,
    reload: Reload,
) {
    let running_lock = context.retention.read().expect("retention").locked;
    let reload = reload.and_then(|(grants, retention)| {
        if retention.locked < running_lock {
            return Err(format!(
                "the new retention lock ({}s) is shorter than the running one ({}s); a lock \
                 cannot be shortened by a reload (restart the receiver to change it)",
                retention.locked.as_secs(),
                running_lock.as_secs()
            ));
        }
        Ok((grants, retention))
    });
    let (grants, retention) = match reload {
        Ok(new) => new,
        Err(message) => {
            warn(format!(
                "configuration reload refused, keeping the running one: {message}"
            ));
            context.record(Event {
                event: "config-reload",
                outcome: message,
                ..Event::default()
            });
            return;
        }
    };
    let store_version = context.grants_version.load(Ordering::SeqCst);
    let mut grants_note = serde_json::Value::Null;
    let revoked = if store_version != 0 {
        // With a store, its grants are the ones in force; this file's list is not applied.
        if grants != *context.grants.read().expect("grants") {
            let note = format!(
                "the [[agent]] list differs from the store's grants (version {store_version}), \
                 which stay in force; publish it with `blkmirror store grants --publish \
                 --config FILE` to change them on every receiver"
            );
            warn(format!("configuration reload: {note}"));
            grants_note = note.into();
        }
        Vec::new()
    } else {
        match swap_grants(endpoint, identity, window, context, grants) {
            Ok(revoked) => revoked,
            Err(message) => {
                context.record(Event {
                    event: "config-reload",
                    outcome: message,
                    ..Event::default()
                });
                return;
            }
        }
    };
    *context.retention.write().expect("retention") = retention;
    let detail = serde_json::json!({
        "agents": context.grants.read().expect("grants").len(),
        "retention": retention_json(&retention),
        "closed_sessions": revoked,
        "grants": grants_note,
    });
    log(format!("configuration reloaded: {detail}"));
    context.record(Event {
        event: "config-reload",
        outcome: "ok".into(),
        detail,
        ..Event::default()
    });
}

async fn connection(incoming: quinn::Incoming, context: Arc<Context>) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            // Most often the TLS handshake: an agent certificate that is not admitted.
            warn(format!("refused connection from {remote}: {error}"));
            let admitted = context
                .handshake_refusals
                .lock()
                .expect("throttle")
                .admit(crate::command::status::now_ms());
            if let Some(suppressed) = admitted {
                context.record(Event {
                    event: "refused",
                    outcome: error.to_string(),
                    detail: serde_json::json!({
                        "remote": remote.to_string(),
                        "stage": "handshake",
                        "suppressed_before": suppressed,
                    }),
                    ..Event::default()
                });
            }
            return;
        }
    };
    let Some(fingerprint) = net::peer_fingerprint(&connection) else {
        connection.close(
            quinn::VarInt::from_u32(wire::CLOSE_ADMISSION),
            b"no client certificate",
        );
        return;
    };
    context.sessions.lock().expect("sessions").insert(
        connection.stable_id(),
        (fingerprint.clone(), None, connection.clone()),
    );
    // The handshake ran against the configuration of its start: a reload that withdrew this
    // agent meanwhile swept the sessions before this one was listed. Checked after listing,
    // so one of the two sees the other.
    if !context.admitted(&fingerprint) {
        context
            .sessions
            .lock()
            .expect("sessions")
            .remove(&connection.stable_id());
        connection.close(
            quinn::VarInt::from_u32(wire::CLOSE_ADMISSION),
            b"grant revoked",
        );
        return;
    }
    let mut session = Session {
        connection: connection.clone(),
        context: context.clone(),
        fingerprint: fingerprint.clone(),
        claimed: None,
        volume_name: None,
    };
    let outcome = match session.run().await {
        // The agent closed the connection on purpose (end of `--once`, or stopping).
        // Only a transport error: a refusal the receiver decided is logged and audited even
        // when the agent has closed by the time we look (it does, on reading `Refused`).
        Err(ref refusal)
            if refusal.transport
                && matches!(
                    connection.close_reason(),
                    Some(quinn::ConnectionError::ApplicationClosed(ref close))
                        if close.error_code == quinn::VarInt::from_u32(0)
                ) =>
        {
            Ok(())
        }
        outcome => outcome,
    };
    if let Some((name, volume)) = session.claimed.take() {
        // A connection that broke (or an agent that stopped) in the middle of a journaled
        // cycle leaves the cycle open for the agent to continue; a refusal of ours abandons it.
        let keep = match &outcome {
            Ok(()) => true,
            Err(refusal) => refusal.transport,
        };
        // Closed before the journal is kept: a data frame of this connection still on its way
        // to the journal is then refused (`data_stream`), so nothing of it can land after the
        // agent has resumed on a new connection.
        if keep {
            connection.close(quinn::VarInt::from_u32(0), b"");
        }
        let kept = match volume.lock() {
            Ok(mut locked) => {
                let report = locked.open_cycle_report().filter(|_| keep);
                if report.is_none() {
                    locked.abort();
                } else if let Err(error) = locked.write_out_journal() {
                    // Kept all the same: the frames are in memory, and only a restart of
                    // this process would lose them (the agent then sends them again).
                    tracing::warn!(
                        target: "blkmirror receiver",
                        "volume {name}: the kept cycle's journal was not written out: {error}"
                    );
                }
                report
            }
            Err(_) => None,
        };
        if let Some(report) = kept {
            context
                .status
                .update(&name, |s| s.kept_cycle = Some(kept_cycle_status(&report)));
            log(format!(
                "volume {name}: connection lost in cycle {}; keeping its {} journaled frames for \
                 the agent to resume",
                report.seq, report.frames
            ));
            let replaced = context
                .suspended
                .lock()
                .expect("suspended")
                .insert(name.clone(), (fingerprint.clone(), volume, Instant::now()));
            if let Some((_, older, _)) = replaced
                && let Ok(mut older) = older.lock()
            {
                older.abort();
            }
        }
        context.release(&name, &connection);
        context.status.update(&name, |s| {
            s.state = VolumeState::Idle;
            s.rate_bytes_per_s = 0;
        });
    }
    context
        .sessions
        .lock()
        .expect("sessions")
        .remove(&connection.stable_id());
    match outcome {
        Ok(()) => log(format!("agent {fingerprint} from {remote}: disconnected")),
        Err(refusal) => {
            warn(format!(
                "agent {fingerprint} from {remote}: refused ({:?}): {}",
                refusal.code, refusal.message
            ));
            context.record(Event {
                event: "refused",
                agent: Some(fingerprint.to_string()),
                volume: session.volume_name.clone(),
                outcome: format!("{:?}: {}", refusal.code, refusal.message),
                detail: serde_json::json!({ "remote": remote.to_string() }),
            });
            connection.close(refusal.close_code(), refusal.message.as_bytes());
        }
    }
}

type SharedVolume = Arc<Mutex<Volume>>;

struct Session {
    connection: quinn::Connection,
    context: Arc<Context>,
    fingerprint: Fingerprint,
    claimed: Option<(String, SharedVolume)>,
    /// The volume the agent asked for (for the audit log).
    volume_name: Option<String>,
}

impl Session {
    async fn run(&mut self) -> Result<(), Refusal> {
        let (mut send, mut recv) = self.connection.accept_bi().await.map_err(NetError::from)?;
        let result = self.control(&mut send, &mut recv).await;
        if let Err(refusal) = &result {
            let message = ReceiverMessage::Refused {
                code: refusal.code,
                message: refusal.message.clone(),
            };
            let _ = net::write_frame(&mut send, &message).await;
            let _ = send.finish();
            // Give the refusal a moment to leave before the connection is closed.
            let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
        }
        result
    }

    /// Marks the volume busy. The same agent reconnecting supersedes its old connection (which
    /// is dead or dying: an agent runs one session per volume); another agent is refused.
    async fn claim(&self, volume: &str) -> Result<(), Refusal> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            {
                let mut busy = self.context.busy.lock().expect("busy lock");
                match busy.get(volume) {
                    None => {
                        busy.insert(
                            volume.to_owned(),
                            (self.fingerprint.clone(), self.connection.clone()),
                        );
                        return Ok(());
                    }
                    Some((holder, old)) if *holder == self.fingerprint => {
                        old.close(
                            quinn::VarInt::from_u32(wire::CLOSE_ADMISSION),
                            b"superseded by a new connection",
                        );
                    }
                    Some(_) => {
                        return Err(Refusal::new(
                            RefusalCode::Sequence,
                            format!("volume {volume} is in use by another connection"),
                        ));
                    }
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Refusal::new(
                    RefusalCode::Sequence,
                    format!("volume {volume} is still held by an older connection"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Brings `volume` and the object store together, if there is one: publishes its newest
    /// point, or fetches the store's when that is newer (returns true then). Logged, audited
    /// and reported in status. A failure refuses the agent (it retries).
    async fn publish(&self, name: &str, volume: &Arc<Mutex<Volume>>) -> Result<bool, Refusal> {
        let Some(publisher) = &self.context.publisher else {
            return Ok(false);
        };
        let result = publisher.publish(volume).await;
        self.context.status.set_store(publisher.health());
        match &result {
            Ok(None) => {}
            Ok(Some(report)) if report.fetched.is_some() => {
                let fetched = report.fetched.unwrap_or_default();
                log(format!(
                    "volume {name}: fetched point {} from the object store in {} ms: {} \
                     chunk(s), {} byte(s) in {} ranged read(s); this receiver now serves it",
                    report.seq,
                    report.elapsed_ms,
                    fetched.chunks,
                    fetched.fetched_bytes,
                    fetched.requests
                ));
                self.context.record(Event {
                    event: "fetch",
                    agent: Some(self.fingerprint.to_string()),
                    volume: Some(name.to_owned()),
                    outcome: "ok".into(),
                    detail: serde_json::json!({
                        "seq": report.seq,
                        "chunks": fetched.chunks,
                        "fetched_bytes": fetched.fetched_bytes,
                        "elapsed_ms": report.elapsed_ms,
                    }),
                });
            }
            Ok(Some(report)) => {
                if report.pruned.dropped > 0 {
                    log(format!(
                        "volume {name}: retention dropped {} older point(s) from the object \
                         store ({} manifest(s) rewritten to lead past them)",
                        report.pruned.dropped, report.pruned.rewritten
                    ));
                }
                if let Some(waits) = report.prune_waits {
                    log(format!(
                        "volume {name}: retention on the object store waits {} s more: this \
                         receiver took the volume's lease recently, and what the previous \
                         holder sent before its lease ended may still land \
                         (store.takeover_settle)",
                        waits.as_secs().max(1)
                    ));
                }
                if let Some(error) = &report.prune_error {
                    warn(format!(
                        "volume {name}: retention on the object store failed (the next \
                         publish tries again): {error}"
                    ));
                }
                log(format!(
                    "volume {name}: point {} published to the object store in {} ms: {} \
                     chunk(s) changed{}, {} already in the store, {} byte(s) uploaded in {} \
                     pack(s)",
                    report.seq,
                    report.elapsed_ms,
                    report.commit.changed_chunks,
                    report.against.map_or_else(
                        || " (every chunk)".to_owned(),
                        |seq| format!(" since point {seq}")
                    ),
                    report.commit.deduplicated_chunks,
                    report.commit.uploaded_bytes,
                    report.commit.packs
                ));
                self.context.record(Event {
                    event: "publish",
                    agent: Some(self.fingerprint.to_string()),
                    volume: Some(name.to_owned()),
                    outcome: "ok".into(),
                    detail: serde_json::json!({
                        "seq": report.seq,
                        "against": report.against,
                        "changed_chunks": report.commit.changed_chunks,
                        "deduplicated_chunks": report.commit.deduplicated_chunks,
                        "uploaded_bytes": report.commit.uploaded_bytes,
                        "elapsed_ms": report.elapsed_ms,
                        "pruned": report.pruned.dropped,
                    }),
                });
            }
            Err(error) => {
                warn(format!("volume {name}: not published: {error}"));
                self.context.status.update(name, |s| {
                    s.last_error = Some(format!("object store: {error}"));
                });
            }
        }
        result
            .map(|report| report.is_some_and(|r| r.fetched.is_some()))
            .map_err(Refusal::from)
    }

    async fn control(
        &mut self,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), Refusal> {
        let mut control = ReceiverSession::new();
        let first = net::read_frame(recv).await?.ok_or_else(|| {
            Refusal::new(
                RefusalCode::Sequence,
                "the control stream ended before Hello",
            )
        })?;
        // The session admits on its first step or refuses; nothing else comes first.
        let ControlStep::Admit(hello) = control.on_message(first)? else {
            return Err(Refusal::new(RefusalCode::Sequence, "expected Hello first"));
        };
        self.volume_name = Some(hello.volume.clone());
        if let Some(entry) = self
            .context
            .sessions
            .lock()
            .expect("sessions")
            .get_mut(&self.connection.stable_id())
        {
            entry.1 = Some(hello.volume.clone());
        }
        if !self.context.granted(&self.fingerprint, &hello.volume) {
            return Err(Refusal::new(
                RefusalCode::NotGranted,
                format!("volume {} is not granted to this agent", hello.volume),
            ));
        }
        self.claim(&hello.volume).await?;
        let retention = *self.context.retention.read().expect("retention");
        let suspended = self
            .context
            .suspended
            .lock()
            .expect("suspended")
            .remove(&hello.volume);
        let data_dir = self.context.data_dir.clone();
        let opened = if let Some(kept) = suspended.and_then(|(holder, kept, _)| {
            // Only the agent that began the cycle continues it, from the same device; for
            // anyone else, the journal is abandoned and the volume opened afresh.
            let matches = {
                let volume = kept.lock().expect("volume lock");
                let meta = volume.meta();
                holder == self.fingerprint
                    && meta.source_id == hello.source_id
                    && meta.size_bytes == hello.size_bytes
                    && meta.chunk_bytes == hello.chunk_bytes
            };
            if !matches {
                kept.lock().expect("volume lock").abort();
            }
            matches.then_some(kept)
        }) {
            kept.lock().expect("volume lock").set_retention(retention);
            Ok((kept, false))
        } else {
            let hello = hello.clone();
            tokio::task::spawn_blocking(move || {
                Volume::open_or_create(&data_dir, &hello).map(|(mut volume, new, _)| {
                    volume.set_retention(retention);
                    (Arc::new(Mutex::new(volume)), new)
                })
            })
            .await
            .expect("open task")
        };
        let (volume, new_volume) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                self.context.release(&hello.volume, &self.connection);
                return Err(error.into());
            }
        };
        // The claim may have waited: a reload meanwhile may have withdrawn the grant.
        if !self.context.granted(&self.fingerprint, &hello.volume) {
            self.context.release(&hello.volume, &self.connection);
            return Err(Refusal::new(
                RefusalCode::NotGranted,
                format!("volume {} is not granted to this agent", hello.volume),
            ));
        }
        // The store must hold the committed point before the agent is told of it: one a
        // refused publish left behind goes first.
        // A receiver that fetched the volume from the store has its point: not a new volume
        // for the agent, which carries on from that point.
        let new_volume = match self.publish(&hello.volume, &volume).await {
            Ok(fetched) => new_volume && !fetched,
            Err(refusal) => {
                self.context.release(&hello.volume, &self.connection);
                return Err(refusal);
            }
        };
        let (welcome, size) = {
            let volume = volume.lock().expect("volume lock");
            (volume.welcome(new_volume), volume.meta().size_bytes)
        };
        self.claimed = Some((hello.volume.clone(), volume.clone()));
        log(format!(
            "agent {} connected for volume {} (committed cycle {})",
            self.fingerprint, hello.volume, welcome.committed_seq
        ));
        let agent = self.fingerprint.to_string();
        self.context.status.update(&hello.volume, |s| {
            s.state = VolumeState::Connected;
            s.source = agent;
            s.kept_cycle = None;
        });
        self.context.record(Event {
            event: "connect",
            agent: Some(self.fingerprint.to_string()),
            volume: Some(hello.volume.clone()),
            outcome: "ok".into(),
            detail: serde_json::json!({
                "remote": self.connection.remote_address().to_string(),
                "new_volume": new_volume,
                "committed_seq": welcome.committed_seq,
            }),
        });
        net::write_frame(send, &ReceiverMessage::Welcome(welcome)).await?;

        let lease_keeper = self.context.publisher.clone().map(|publisher| {
            let name = hello.volume.clone();
            tokio::spawn(async move { publisher.keep_lease(&name).await })
        });
        let (journaled_tx, mut journaled) = watch::channel(0u64);
        let journaled_tx = Arc::new(journaled_tx);
        let cycles_tx = Arc::new(watch::Sender::new(CyclesOpened::default()));
        let data = tokio::spawn(accept_data(
            self.connection.clone(),
            volume.clone(),
            DataCounters {
                journaled: journaled_tx.clone(),
                cycles: cycles_tx.clone(),
                waiting: Arc::default(),
            },
            size,
        ));
        let result = async {
            while let Some(message) = net::read_frame::<AgentMessage>(recv).await? {
                // The session admits once (a second `Hello` is refused there); everything
                // after is a request to serve.
                let ControlStep::Serve(request) = control.on_message(message)? else {
                    return Err(Refusal::new(RefusalCode::Sequence, "second Hello"));
                };
                match request {
                    AgentMessage::Hello(_) => {
                        return Err(Refusal::new(RefusalCode::Sequence, "second Hello"));
                    }
                    AgentMessage::HashRequest { first_chunk, count } => {
                        let volume = volume.clone();
                        let hashes = tokio::task::spawn_blocking(move || {
                            volume
                                .lock()
                                .expect("volume lock")
                                .hashes(first_chunk, count)
                        })
                        .await
                        .expect("hash task")
                        .map_err(|e| Refusal::new(RefusalCode::BadFrame, e.to_string()))?;
                        net::write_frame(
                            send,
                            &ReceiverMessage::Hashes {
                                first_chunk,
                                hashes,
                            },
                        )
                        .await?;
                    }
                    AgentMessage::Begin(begin) => {
                        // The agent's first frames may follow at once: they wait for this
                        // Begin (`session::data_frame_verdict`).
                        cycles_tx.send_modify(|cycles| {
                            cycles.announced = Some(begin.seq);
                            cycles.opened = None;
                        });
                        let volume = volume.clone();
                        let holder = self.fingerprint.to_string();
                        let (journaled_tx, cycles_tx) = (journaled_tx.clone(), cycles_tx.clone());
                        tokio::task::spawn_blocking(move || {
                            let mut volume = volume.lock().expect("volume lock");
                            volume.begin_held(
                                begin.seq,
                                begin.bytes_estimate,
                                begin.direct,
                                begin.from,
                                Some(&holder),
                            )?;
                            // Under the volume lock: no frame of the new cycle is journaled,
                            // nor counted, before the count starts again.
                            journaled_tx.send_replace(0);
                            cycles_tx.send_modify(|cycles| cycles.opened = Some(begin.seq));
                            Ok::<_, StoreError>(())
                        })
                        .await
                        .expect("begin task")?;
                        net::write_frame(send, &ReceiverMessage::Ready { seq: begin.seq }).await?;
                    }
                    AgentMessage::Resume { seq } => {
                        let frames = {
                            let mut volume = volume.lock().expect("volume lock");
                            let frames = volume.resume(seq)?;
                            journaled_tx.send_replace(frames);
                            cycles_tx.send_modify(|cycles| cycles.opened = Some(seq));
                            frames
                        };
                        log(format!(
                            "volume {}: the agent resumes cycle {seq} after {frames} journaled \
                             frames",
                            hello.volume
                        ));
                        net::write_frame(send, &ReceiverMessage::Ready { seq }).await?;
                    }
                    AgentMessage::Flush { frames } => {
                        wait_frames(&self.connection, &mut journaled, &volume, frames).await?;
                        // What has arrived is in the journal file, not only in its buffer: a
                        // receiver restarted before the commit keeps it for the agent.
                        let writing = volume.clone();
                        tokio::task::spawn_blocking(move || {
                            writing.lock().expect("volume lock").write_out_journal()
                        })
                        .await
                        .expect("journal task")?;
                        net::write_frame(send, &ReceiverMessage::Flushed { frames }).await?;
                    }
                    AgentMessage::Commit { frames, point } => {
                        wait_frames(&self.connection, &mut journaled, &volume, frames).await?;
                        let committing = volume.clone();
                        let context = self.context.clone();
                        let agent = self.fingerprint.to_string();
                        let seq = tokio::task::spawn_blocking(move || {
                            let volume = committing;
                            let mut volume = volume.lock().expect("volume lock");
                            commit_and_record(
                                &mut volume,
                                point,
                                &agent,
                                &context.audit,
                                &context.status,
                            )
                        })
                        .await
                        .expect("commit task")?;
                        if self.context.publisher.is_some() {
                            tokio::task::spawn_blocking(crate::test_hooks::hold_publish)
                                .await
                                .expect("test hook");
                        }
                        self.publish(&hello.volume, &volume).await?;
                        net::write_frame(send, &ReceiverMessage::Committed { seq }).await?;
                    }
                }
            }
            Ok(())
        }
        .await;
        data.abort();
        if let Some(keeper) = lease_keeper {
            keeper.abort();
        }
        result
    }
}

/// Appends to `audit`; a failure to audit is logged, not fatal to replication.
fn record(audit: &AuditLog, event: Event) {
    match audit.append(event) {
        Ok(hash) => log(format!("audit head {hash}")),
        Err(error) => warn(format!("audit log: {error}")),
    }
}

/// Commits the open cycle of `volume` for `agent`: the commit itself, its audit entries (the
/// commit, and the points retention pruned), and the status board. Returns the committed
/// cycle. The simulator drives this same function.
pub(crate) fn commit_and_record(
    volume: &mut Volume,
    point: blkmirror_protocol::wire::PointInfo,
    agent: &str,
    audit: &AuditLog,
    status: &StatusBoard,
) -> Result<u64, StoreError> {
    let name = volume.meta().volume.clone();
    let result = volume.commit(point.clone());
    record(
        audit,
        Event {
            event: "commit",
            agent: Some(agent.to_owned()),
            volume: Some(name.clone()),
            outcome: match &result {
                Ok(()) => "ok".into(),
                Err(error) => error.to_string(),
            },
            detail: serde_json::json!({
                "seq": volume.meta().committed_seq,
                "bytes": point.bytes,
                "consistent": point.consistent,
                "complete": point.complete,
                "point_time_unix_ms": point.time_unix_ms,
            }),
        },
    );
    let pruned = volume.take_pruned();
    if !pruned.is_empty() {
        record(
            audit,
            Event {
                event: "prune",
                agent: Some(agent.to_owned()),
                volume: Some(name.clone()),
                outcome: "ok".into(),
                detail: serde_json::json!({ "points": pruned }),
            },
        );
    }
    result?;
    // Status comes from the durable record: only a point that `points` lists (and `restore`
    // can produce) is reported as one.
    let seq = volume.meta().committed_seq;
    let kept = volume
        .meta()
        .points
        .last()
        .filter(|p| p.seq == seq)
        .cloned();
    status.committed(
        &name,
        kept.as_ref()
            .map_or_else(|| PointSummary::from(&point), PointSummary::from),
        kept.is_some(),
        point.bytes,
        0.0,
    );
    Ok(seq)
}

/// Waits until `frames` data frames of the open cycle are journaled.
async fn wait_frames(
    connection: &quinn::Connection,
    journaled: &mut watch::Receiver<u64>,
    volume: &SharedVolume,
    frames: u64,
) -> Result<(), Refusal> {
    if volume.lock().expect("volume lock").open_cycle().is_none() {
        return Err(Refusal::new(RefusalCode::Sequence, "no cycle is open"));
    }
    loop {
        let got = *journaled.borrow_and_update();
        match session::frames_verdict(got, frames) {
            FramesVerdict::Arrived => return Ok(()),
            FramesVerdict::Refuse(refusal) => return Err(refusal.into()),
            FramesVerdict::Wait => {}
        }
        let changed = tokio::select! {
            changed = tokio::time::timeout(FRAME_WAIT, journaled.changed()) => changed,
            error = connection.closed() => {
                return Err(Refusal::new(RefusalCode::Sequence, format!("connection closed: {error}")));
            }
        };
        match changed {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => {
                return Err(Refusal::new(
                    RefusalCode::Sequence,
                    format!("only {got} of {frames} data frames arrived"),
                ));
            }
        }
    }
}

/// What the control stream and the data streams of one connection tell each other.
#[derive(Clone)]
struct DataCounters {
    /// Frames of the open cycle journaled (reset when a cycle opens).
    journaled: Arc<watch::Sender<u64>>,
    /// The cycles the control stream announced and opened.
    cycles: Arc<watch::Sender<CyclesOpened>>,
    /// Data frames held until their cycle opens.
    waiting: Arc<std::sync::atomic::AtomicUsize>,
}

/// The most data frames of one connection held until their cycle opens: an agent's data
/// streams (at most 32) each send one before the receiver reads the next, so an honest agent
/// never has more waiting, and a hostile one holds at most this many frames (32 MiB) for the
/// grace of [`begin_grace`].
const MAX_WAITING_FRAMES: usize = 32;

/// One frame counted in [`DataCounters::waiting`] while it waits.
struct WaitingFrame<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for WaitingFrame<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a data frame of the next cycle waits for its `Begin` to be read (it was sent
/// before the frame, on the control stream, so only lost packets hold it back): a few round
/// trips, and at least 2 s.
fn begin_grace(rtt: Duration) -> Duration {
    (rtt * 8).clamp(Duration::from_secs(2), FRAME_WAIT)
}

/// Waits until a data frame of cycle `frame_seq` may be journaled (see
/// `session::data_frame_verdict`); a refusal names why not.
async fn admit_frame(
    connection: &quinn::Connection,
    volume: &SharedVolume,
    cycles: &mut watch::Receiver<CyclesOpened>,
    waiting: &std::sync::atomic::AtomicUsize,
    frame_seq: u64,
) -> Result<(), Refusal> {
    let started = tokio::time::Instant::now();
    let mut counted = None;
    loop {
        let opened = *cycles.borrow_and_update();
        // The common case, decided without the volume's lock (which the streams journaling
        // hold): the frame's cycle is open on this connection.
        if opened.admits(frame_seq) {
            return Ok(());
        }
        let (committed, open) = {
            let volume = volume.lock().expect("volume lock");
            (
                volume.meta().committed_seq,
                volume.open_cycle().map(|c| c.0),
            )
        };
        let limit = match session::data_frame_verdict(frame_seq, opened, committed) {
            FrameAdmission::Journal => return Ok(()),
            FrameAdmission::AwaitReady => FRAME_WAIT,
            FrameAdmission::AwaitBegin => begin_grace(connection.rtt()),
            FrameAdmission::Refuse => Duration::ZERO,
        };
        let left = limit.saturating_sub(started.elapsed());
        if !left.is_zero() && counted.is_none() {
            if waiting.fetch_add(1, Ordering::Relaxed) >= MAX_WAITING_FRAMES {
                waiting.fetch_sub(1, Ordering::Relaxed);
                return Err(Refusal::new(
                    RefusalCode::Sequence,
                    format!(
                        "more than {MAX_WAITING_FRAMES} data frames wait for their cycle's Begin \
                         (an agent has at most 32 data streams)"
                    ),
                ));
            }
            counted = Some(WaitingFrame(waiting));
        }
        if left.is_zero() {
            return Err(Refusal::new(
                RefusalCode::Sequence,
                match open {
                    Some(open) => format!(
                        "data frame of cycle {frame_seq}, but cycle {open} is open{}",
                        if opened.opened == Some(open) {
                            ""
                        } else {
                            " and this connection did not open it"
                        }
                    ),
                    None => format!(
                        "data frame outside a cycle (cycle {frame_seq}; no Begin of it came)"
                    ),
                },
            ));
        }
        tokio::select! {
            changed = tokio::time::timeout(left, cycles.changed()) => {
                if let Ok(Err(_)) = changed {
                    return Err(Refusal::new(RefusalCode::Sequence, "the control stream ended"));
                }
            }
            error = connection.closed() => {
                return Err(Refusal::new(RefusalCode::Sequence, format!("connection closed: {error}")));
            }
        }
    }
}

/// Accepts the agent's data streams and journals their frames.
async fn accept_data(
    connection: quinn::Connection,
    volume: SharedVolume,
    counters: DataCounters,
    size: u64,
) {
    while let Ok(mut stream) = connection.accept_uni().await {
        let connection = connection.clone();
        let volume = volume.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            match data_stream(&connection, &mut stream, &volume, &counters, size).await {
                Ok(()) => {}
                // The connection broke: the session's end decides what becomes of the cycle.
                Err(refusal) if refusal.transport => {}
                Err(refusal) => {
                    log(format!(
                        "refused data ({:?}): {}",
                        refusal.code, refusal.message
                    ));
                    if let Ok(mut volume) = volume.lock() {
                        volume.abort();
                    }
                    connection.close(refusal.close_code(), refusal.message.as_bytes());
                }
            }
        });
    }
}

async fn data_stream(
    connection: &quinn::Connection,
    stream: &mut quinn::RecvStream,
    volume: &SharedVolume,
    counters: &DataCounters,
    size: u64,
) -> Result<(), Refusal> {
    let mut cycles = counters.cycles.subscribe();
    while let Some(frame) = net::read_frame::<DataFrame>(stream).await? {
        admit_frame(
            connection,
            volume,
            &mut cycles,
            &counters.waiting,
            frame.seq(),
        )
        .await?;
        let open = volume.lock().expect("volume lock").open_cycle();
        let Some((seq, _)) = open else {
            return Err(Refusal::new(
                RefusalCode::Sequence,
                "data frame outside a cycle",
            ));
        };
        let checked = wire::check_data_frame(frame, seq, size)
            .map_err(|e| Refusal::new(RefusalCode::BadFrame, e.to_string()))?;
        tokio::task::block_in_place(|| {
            let mut volume = volume.lock().expect("volume lock");
            // Checked under the lock that the session's end takes to keep the cycle for a
            // resume: once the connection is closed, none of its frames reach the journal.
            if let Some(error) = connection.close_reason() {
                return Err(Refusal::from(NetError::Connection(error)));
            }
            volume.journal(checked).map_err(Refusal::from)?;
            // Under the lock, as the count's reset at a Begin is.
            counters.journaled.send_modify(|count| *count += 1);
            Ok(())
        })?;
    }
    Ok(())
}

/// Grants from `FINGERPRINT=VOLUME[,VOLUME...]` arguments.
pub fn parse_grants(specs: &[String]) -> Result<Grants, String> {
    let mut grants = Grants::new();
    for spec in specs {
        let (fingerprint, volumes) = spec
            .split_once('=')
            .ok_or_else(|| format!("--allow {spec:?}: expected FINGERPRINT=VOLUME[,VOLUME...]"))?;
        let fingerprint =
            Fingerprint::parse(fingerprint).map_err(|error| format!("--allow: {error}"))?;
        let entry = grants.entry(fingerprint).or_default();
        for volume in volumes.split(',') {
            wire::check_volume_name(volume).map_err(|error| format!("--allow: {error}"))?;
            entry.insert(volume.to_owned());
        }
    }
    Ok(grants)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;
    use blkmirror_protocol::wire::Hello;

    /// Finding 4 of the hardening issue (its second half): one corrupt `volume.json` stopped
    /// the whole receiver from starting.
    #[test]
    fn a_broken_volume_is_reported_and_the_others_still_recover() {
        let tmp = TempDir::new("recover-all");
        for name in ["good", "bad"] {
            let hello = Hello {
                protocol: wire::PROTOCOL_VERSION,
                volume: name.into(),
                source_id: "test:source".into(),
                size_bytes: 1 << 20,
                chunk_bytes: 65536,
            };
            Volume::open_or_create(&tmp.0, &hello).unwrap();
        }
        std::fs::write(
            tmp.0.join("bad/volume.json"),
            "{\"format\": 1, \"chunk_bytes\": 0",
        )
        .unwrap();
        let recovered = recover_all(&tmp.0).unwrap().volumes;
        assert_eq!(recovered.len(), 2);
        assert_eq!(recovered[0].0, "bad");
        assert!(recovered[0].1.is_err());
        assert_eq!(recovered[1].0, "good");
        assert_eq!(recovered[1].1.as_ref().unwrap(), &Recovery::Clean);
        // A well-formed file with values that would divide by zero is refused too.
        let meta = std::fs::read_to_string(tmp.0.join("good/volume.json")).unwrap();
        std::fs::write(
            tmp.0.join("bad/volume.json"),
            meta.replace("\"chunk_bytes\": 65536", "\"chunk_bytes\": 0")
                .replace("\"volume\": \"good\"", "\"volume\": \"bad\""),
        )
        .unwrap();
        let error = recover_all(&tmp.0).unwrap().volumes[0]
            .1
            .as_ref()
            .unwrap_err()
            .to_string();
        assert!(error.contains("chunk size 0"), "{error}");
    }

    #[test]
    fn a_kept_cycle_is_abandoned_once_its_agent_has_stayed_away_too_long() {
        let tmp = TempDir::new("kept-cycles");
        let agent = Fingerprint::parse(&"ab".repeat(32)).expect("fingerprint");
        let suspended: Suspended = Mutex::new(HashMap::new());
        let start = Instant::now();
        for (name, age) in [("old", 7200), ("recent", 60)] {
            let hello = Hello {
                protocol: wire::PROTOCOL_VERSION,
                volume: name.into(),
                source_id: "loop:/tmp/kept".into(),
                size_bytes: 1 << 20,
                chunk_bytes: 65536,
            };
            let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello).unwrap();
            volume.begin(1, 0, false, 0).unwrap();
            volume
                .journal(wire::CheckedData::Zero {
                    offset: 0,
                    length: 65536,
                })
                .unwrap();
            assert!(volume.open_cycle_report().is_some());
            suspended.lock().unwrap().insert(
                name.into(),
                (
                    agent.clone(),
                    Arc::new(Mutex::new(volume)),
                    start - Duration::from_secs(age),
                ),
            );
        }
        let old = suspended.lock().unwrap()["old"].1.clone();
        let abandoned = abandon_stale_cycles(&suspended, Duration::from_secs(3600), start);
        assert_eq!(abandoned, vec!["old".to_owned()]);
        assert!(old.lock().unwrap().open_cycle_report().is_none());
        let kept = suspended.lock().unwrap();
        assert_eq!(kept.keys().collect::<Vec<_>>(), vec!["recent"]);
        assert!(
            kept["recent"]
                .1
                .lock()
                .unwrap()
                .open_cycle_report()
                .is_some()
        );
    }

    #[test]
    fn a_restarted_receiver_holds_each_interrupted_cycle_for_the_agent_its_journal_names() {
        let tmp = TempDir::new("interrupted");
        let agent = "cd".repeat(32);
        for (name, holder) in [
            ("named", Some(agent.as_str())),
            ("forged", Some("not-a-fingerprint")),
            ("anonymous", None),
            ("idle", Some(agent.as_str())),
        ] {
            let hello = Hello {
                protocol: wire::PROTOCOL_VERSION,
                volume: name.into(),
                source_id: "loop:/tmp/interrupted".into(),
                size_bytes: 1 << 20,
                chunk_bytes: 65536,
            };
            let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello).unwrap();
            volume.begin_held(1, 0, false, 0, holder).unwrap();
            if name != "idle" {
                volume
                    .journal(wire::CheckedData::Zero {
                        offset: 0,
                        length: 65536,
                    })
                    .unwrap();
            }
            volume.write_out_journal().unwrap();
        }
        let recovered = recover_all(&tmp.0).unwrap();
        let kept = |name: &str| {
            recovered
                .volumes
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, r)| *r.as_ref().unwrap())
        };
        assert_eq!(kept("named"), Some(Recovery::Kept { seq: 1, frames: 1 }));
        assert_eq!(kept("forged"), Some(Recovery::Kept { seq: 1, frames: 1 }));
        assert_eq!(kept("anonymous"), Some(Recovery::Discarded));
        assert_eq!(kept("idle"), Some(Recovery::Discarded));
        // Both stay open from the recovery; only the cycle whose agent is a fingerprint waits,
        // the other is abandoned.
        let mut open: Vec<&str> = recovered.kept.iter().map(|(n, _)| n.as_str()).collect();
        open.sort_unstable();
        assert_eq!(open, ["forged", "named"]);
        let waiting = interrupted_cycles(recovered.kept);
        assert_eq!(waiting.len(), 1);
        let (name, holder, volume) = &waiting[0];
        assert_eq!(name, "named");
        assert_eq!(holder.as_str(), agent);
        assert_eq!(volume.open_cycle_report().unwrap().frames, 1);
        let forged = std::fs::metadata(tmp.0.join("forged/journal")).unwrap();
        assert_eq!(forged.len(), 0, "the forged holder's journal is emptied");
    }

    #[test]
    fn handshake_refusals_are_audited_at_most_ten_a_minute_and_count_the_rest() {
        let mut throttle = RefusalThrottle::default();
        let start = 1_000_000;
        for i in 0..RefusalThrottle::PER_WINDOW {
            assert_eq!(throttle.admit(start + u64::from(i)), Some(0));
        }
        for i in 0..500 {
            assert_eq!(throttle.admit(start + 100 + i), None);
        }
        // The next window's first entry says how many were left out.
        assert_eq!(
            throttle.admit(start + RefusalThrottle::WINDOW_MS + 1),
            Some(500)
        );
        assert_eq!(
            throttle.admit(start + RefusalThrottle::WINDOW_MS + 2),
            Some(0)
        );
    }
}
