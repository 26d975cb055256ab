//! What a running agent or receiver reports: per-volume status, kept on a [`StatusBoard`] that
//! the replication loops update and the control socket, the Prometheus endpoint and systemd's
//! `STATUS=` read. Pure data and rendering; the servers are in [`crate::command::service`].
//!
//! # `blkmirror status --json` (stable)
//!
//! One object: `role` (`agent` or `receiver`), `version`, `pid`, `time_unix_ms`, and `volumes`,
//! an array of [`VolumeStatus`]. Fields are only ever added, never renamed or removed.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet, text},
    metrics::MetricType,
    registry::Registry,
};
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use blkmirror_protocol::units;

/// The state of one volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// Opening tracking, or connecting for the first time.
    #[default]
    Starting,
    /// Copying the whole device to a new replica.
    InitialSync,
    /// Comparing the whole device with the replica (tracking history was lost).
    VerifyResync,
    /// Shipping changes every interval.
    Continuous,
    /// The receiver cannot be reached; retrying.
    Disconnected,
    /// Connected, but no point committed for much longer than the interval.
    Stalled,
    /// The agent for this volume stopped with an error.
    Failed,
    /// (receiver) An agent is connected for this volume.
    Connected,
    /// (receiver) No agent is connected for this volume.
    Idle,
}

/// (receiver) A cycle interrupted by a broken connection and kept for its agent to resume.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptCycle {
    /// The cycle.
    pub seq: u64,
    /// Frames journaled.
    pub frames: u64,
    /// Bytes the journaled frames cover.
    pub journaled_bytes: u64,
    /// When the connection broke (Unix ms).
    pub since_unix_ms: u64,
}

/// (receiver) The volume's last drill (`blkmirror drill`), and its schedule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DrillSummary {
    /// The point drilled.
    pub seq: u64,
    /// When the drill started (Unix ms).
    pub time_unix_ms: u64,
    /// Whether it passed.
    pub ok: bool,
    /// Its recovery time: start to healthy (or to the failure).
    pub recovery_seconds: f64,
    /// Why it failed.
    pub failure: Option<String>,
    /// The last successful drill (Unix ms).
    pub last_success_unix_ms: Option<u64>,
    /// The schedule (`[[drill]] every`), in seconds.
    pub every_s: Option<u64>,
    /// Scheduled, and the last success is older than the schedule (or there is none).
    pub overdue: bool,
}

/// A committed point, as status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointSummary {
    /// Cycle number.
    pub seq: u64,
    /// When it was cut (Unix ms).
    pub time_unix_ms: u64,
    /// Frozen at the cut.
    pub consistent: bool,
    /// Freeze duration.
    pub freeze_ms: u64,
}

impl From<&blkmirror_protocol::wire::PointInfo> for PointSummary {
    fn from(point: &blkmirror_protocol::wire::PointInfo) -> Self {
        Self {
            seq: point.seq,
            time_unix_ms: point.time_unix_ms,
            consistent: point.consistent,
            freeze_ms: point.freeze_ms,
        }
    }
}

impl From<&crate::dr::stored::StoredPoint> for PointSummary {
    fn from(point: &crate::dr::stored::StoredPoint) -> Self {
        Self::from(&point.to_wire())
    }
}

/// A running sync.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncProgress {
    /// Device bytes compared or sent so far.
    pub done_bytes: u64,
    /// Device bytes in all.
    pub total_bytes: u64,
    /// Seconds to go, when known.
    pub eta_s: Option<u64>,
}

/// (agent) The QUIC path to the receiver, as quinn measures it: what an operator of a WAN
/// link checks first when cycles run slow.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkStats {
    /// The smoothed round trip, milliseconds.
    pub rtt_ms: f64,
    /// The congestion window, bytes: at most this much is in flight.
    pub congestion_window_bytes: u64,
    /// Datagrams sent and declared lost on the current connection.
    pub sent_packets: u64,
    /// Of which lost (random loss and queue overflow alike).
    pub lost_packets: u64,
    /// Times the congestion controller cut its window on this connection.
    pub congestion_events: u64,
}

/// One volume's status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// The volume name.
    pub volume: String,
    /// The device (agent) or the connected agent's fingerprint (receiver).
    pub source: String,
    /// What it is doing.
    pub state: VolumeState,
    /// Seconds since the newest committed complete point was cut (`null`: none yet).
    pub lag_seconds: Option<f64>,
    /// Changed bytes cut but not yet committed.
    pub backlog_bytes: u64,
    /// Recent transfer rate (bytes per second).
    pub rate_bytes_per_s: u64,
    /// How fast the source changes: bytes cut per second, smoothed over recent cuts.
    #[serde(default)]
    pub change_rate_bytes_per_s: u64,
    /// How fast changes are shipped: device bytes per second of the recent cycles' time.
    #[serde(default)]
    pub ship_rate_bytes_per_s: u64,
    /// The source changes faster than the link ships: the backlog and the lag can only grow
    /// (the agent keeps cycling back to back, each cycle shipping what it can).
    #[serde(default)]
    pub falling_behind: bool,
    /// With a backlog and a ship rate above the change rate: seconds until it is shipped.
    #[serde(default)]
    pub catch_up_eta_s: Option<u64>,
    /// When the last cut was taken (for the change rate).
    #[serde(skip)]
    pub last_cut_unix_ms: Option<u64>,
    /// (agent) The path to the receiver, as of the last committed pass.
    #[serde(default)]
    pub link: Option<LinkStats>,
    /// (receiver) A cycle whose connection broke, kept for its agent to resume.
    #[serde(default)]
    pub kept_cycle: Option<KeptCycle>,
    /// (receiver) The last drill and its schedule.
    #[serde(default)]
    pub drill: Option<DrillSummary>,
    /// The sync in progress, if any.
    pub sync: Option<SyncProgress>,
    /// The newest committed complete point.
    pub last_point: Option<PointSummary>,
    /// The newest committed consistent point.
    pub last_consistent: Option<PointSummary>,
    /// Bytes sent (agent) or received (receiver), on the wire.
    pub sent_bytes_total: u64,
    /// Cycles committed since start.
    pub cycles_total: u64,
    /// Sum of their durations.
    pub cycle_seconds_sum: f64,
    /// Freezes since start.
    pub freezes_total: u64,
    /// Sum of their durations.
    pub freeze_seconds_sum: f64,
    /// The tracker's generation (hex).
    pub tracking_generation: Option<String>,
    /// Times tracking history was lost (each one forces a verify sync).
    pub tracking_loss_total: u64,
    /// Cuts in which the kernel had skipped the tracker and the completion log gave the
    /// skipped completions back (no verify sync).
    #[serde(default)]
    pub tracking_skips_recovered_total: u64,
    /// How far back the completion log held every completion at the last cut, in seconds
    /// (`None`: it never overwrote one, or there is none). A kernel skip older than this costs
    /// a verify sync.
    #[serde(default)]
    pub completion_log_reach_s: Option<f64>,
    /// The memory the agent holds of completions read out of the completion log and still
    /// inside a window a cut may ask for, in bytes (at most 24 MiB per device; `None`: there
    /// is no completion log).
    #[serde(default)]
    pub completion_log_held_bytes: Option<u64>,
    /// The last error, if the volume is not healthy.
    pub last_error: Option<String>,
    /// Seconds between cycles.
    pub interval_s: u64,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// `agent` or `receiver`.
    pub role: String,
    /// Program version.
    pub version: String,
    /// Process id.
    pub pid: u32,
    /// When the snapshot was taken.
    pub time_unix_ms: u64,
    /// Per volume.
    pub volumes: Vec<VolumeStatus>,
    /// The object store a receiver publishes its points to (a receiver with `[store]` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<crate::dr::publish::StoreHealth>,
}

/// Current time in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A volume is stalled when no point was committed for this many intervals (plus a minute).
const STALL_INTERVALS: u64 = 3;

/// Shared, updated by the loops, read by the reporters.
#[derive(Debug)]
pub struct StatusBoard {
    role: &'static str,
    volumes: Mutex<BTreeMap<String, VolumeStatus>>,
    store: Mutex<Option<crate::dr::publish::StoreHealth>>,
}

/// A rate smoothed over samples: the first sample as it is, then half the old value and half
/// the new.
fn smoothed(old: u64, sample: f64) -> u64 {
    if old == 0 {
        sample as u64
    } else {
        ((old as f64 + sample) / 2.0) as u64
    }
}

impl StatusBoard {
    /// An empty board for `role` (`agent` or `receiver`).
    pub fn new(role: &'static str) -> Self {
        Self {
            role,
            volumes: Mutex::new(BTreeMap::new()),
            store: Mutex::new(None),
        }
    }

    /// Records the object store's health (a receiver with `[store]`).
    pub fn set_store(&self, health: crate::dr::publish::StoreHealth) {
        *self.store.lock().expect("status lock") = Some(health);
    }

    /// Changes one volume's status (creating it).
    pub fn update(&self, volume: &str, change: impl FnOnce(&mut VolumeStatus)) {
        let mut volumes = self.volumes.lock().expect("status lock");
        let status = volumes
            .entry(volume.to_owned())
            .or_insert_with(|| VolumeStatus {
                volume: volume.to_owned(),
                ..VolumeStatus::default()
            });
        change(status);
    }

    /// Records a cut of `changed_bytes` at `now_unix_ms`: the change rate is the bytes cut
    /// over the time since the previous cut, smoothed (half the old value, half the new).
    pub fn cut(&self, volume: &str, changed_bytes: u64, now_unix_ms: u64) {
        self.update(volume, |s| {
            if let Some(last) = s.last_cut_unix_ms {
                let seconds = now_unix_ms.saturating_sub(last) as f64 / 1000.0;
                if seconds > 0.0 {
                    s.change_rate_bytes_per_s =
                        smoothed(s.change_rate_bytes_per_s, changed_bytes as f64 / seconds);
                }
            }
            s.last_cut_unix_ms = Some(now_unix_ms);
        });
    }

    /// Records the device bytes a committed cycle shipped and how long it took (the ship
    /// rate, smoothed like the change rate).
    pub fn shipped(&self, volume: &str, device_bytes: u64, cycle_seconds: f64) {
        if cycle_seconds <= 0.0 || device_bytes == 0 {
            return;
        }
        self.update(volume, |s| {
            s.ship_rate_bytes_per_s =
                smoothed(s.ship_rate_bytes_per_s, device_bytes as f64 / cycle_seconds);
        });
    }

    /// (agent) Records what quinn measures of the path to the receiver.
    pub fn link(&self, volume: &str, link: LinkStats) {
        self.update(volume, |s| s.link = Some(link));
    }

    /// Records a committed cycle.
    pub fn committed(
        &self,
        volume: &str,
        point: PointSummary,
        complete: bool,
        sent_bytes: u64,
        cycle_seconds: f64,
    ) {
        self.update(volume, |s| {
            s.sent_bytes_total += sent_bytes;
            s.backlog_bytes = 0;
            if cycle_seconds > 0.0 {
                s.rate_bytes_per_s = (sent_bytes as f64 / cycle_seconds) as u64;
            }
            if !complete {
                return;
            }
            s.cycles_total += 1;
            s.cycle_seconds_sum += cycle_seconds;
            if point.consistent {
                s.freezes_total += 1;
                s.freeze_seconds_sum += point.freeze_ms as f64 / 1000.0;
                s.last_consistent = Some(point.clone());
            }
            s.last_point = Some(point);
            s.sync = None;
            s.last_error = None;
            if matches!(
                s.state,
                VolumeState::InitialSync
                    | VolumeState::VerifyResync
                    | VolumeState::Starting
                    | VolumeState::Disconnected
            ) {
                s.state = VolumeState::Continuous;
            }
        });
    }

    /// Whether changes outrun shipping, and otherwise how long the backlog takes to ship.
    fn behind(change_rate: u64, ship_rate: u64, backlog: u64) -> (bool, Option<u64>) {
        if ship_rate == 0 {
            return (false, None);
        }
        if change_rate >= ship_rate {
            return (true, None);
        }
        let eta = (backlog > 0).then(|| backlog.div_ceil(ship_rate - change_rate));
        (false, eta)
    }

    /// The report as of `now_unix_ms`: lag is computed, and a continuous volume whose newest
    /// point is older than a few intervals is reported stalled.
    pub fn snapshot(&self, now_unix_ms: u64) -> Snapshot {
        let volumes = self
            .volumes
            .lock()
            .expect("status lock")
            .values()
            .cloned()
            .map(|mut s| {
                s.lag_seconds = s
                    .last_point
                    .as_ref()
                    .map(|p| now_unix_ms.saturating_sub(p.time_unix_ms) as f64 / 1000.0);
                (s.falling_behind, s.catch_up_eta_s) = Self::behind(
                    s.change_rate_bytes_per_s,
                    s.ship_rate_bytes_per_s,
                    s.backlog_bytes,
                );
                if s.state == VolumeState::Continuous
                    && s.interval_s > 0
                    && s.lag_seconds
                        .is_some_and(|lag| lag > (STALL_INTERVALS * s.interval_s + 60) as f64)
                {
                    s.state = VolumeState::Stalled;
                }
                s
            })
            .collect();
        Snapshot {
            role: self.role.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            time_unix_ms: now_unix_ms,
            volumes,
            store: self.store.lock().expect("status lock").clone(),
        }
    }
}

fn state_name(state: VolumeState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A one-line summary for systemd's `STATUS=`.
pub fn status_line(snapshot: &Snapshot) -> String {
    let parts: Vec<String> = snapshot
        .volumes
        .iter()
        .map(|s| {
            let mut part = format!("{}: {}", s.volume, state_name(s.state));
            if let Some(sync) = &s.sync {
                let _ = write!(
                    part,
                    " {:.0}%",
                    sync.done_bytes as f64 * 100.0 / sync.total_bytes.max(1) as f64
                );
            } else if let Some(lag) = s.lag_seconds {
                let _ = write!(part, " lag {lag:.0}s");
            }
            part
        })
        .collect();
    if parts.is_empty() {
        "no volumes yet".into()
    } else {
        parts.join("; ")
    }
}

fn bar(fraction: f64, width: usize) -> String {
    let filled = ((fraction.clamp(0.0, 1.0)) * width as f64).round() as usize;
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// The human rendering of `blkmirror status` (and of each `--watch` frame).
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = format!(
        "blkmirror {} {} (pid {}), {} volume(s)\n",
        snapshot.role,
        snapshot.version,
        snapshot.pid,
        snapshot.volumes.len()
    );
    if let Some(store) = &snapshot.store {
        let _ = writeln!(
            out,
            "\n  object store {}: {}, {} point(s) published ({} uploaded, {} of {} chunks \
             already there), last publish {} ms",
            store.store,
            if store.reachable {
                "reachable"
            } else {
                "FAILING"
            },
            store.published,
            units::format_size(store.uploaded_bytes),
            store.deduplicated_chunks,
            store.changed_chunks,
            store.last_publish_ms
        );
        if let Some(error) = &store.last_error {
            let _ = writeln!(out, "    last error   {error}");
        }
        if store.pruned_points > 0 {
            let _ = writeln!(
                out,
                "    retention    {} point(s) dropped from the store",
                store.pruned_points
            );
        }
        match &store.last_gc {
            Some(gc) if gc.error.is_some() => {
                let _ = writeln!(
                    out,
                    "    collection   FAILED at {}: {}",
                    units::format_utc(gc.at_unix_ms),
                    gc.error.as_deref().unwrap_or_default()
                );
            }
            Some(gc) => {
                let _ = writeln!(
                    out,
                    "    collection   at {}: {} pack(s) deleted ({} freed of {}), {} repacked",
                    units::format_utc(gc.at_unix_ms),
                    gc.deleted_packs,
                    units::format_size(gc.deleted_bytes),
                    units::format_size(gc.pack_bytes),
                    gc.repacked_packs
                );
            }
            None => {}
        }
        let grants = match store.grants_version {
            Some(version) => format!("store's, version {version}"),
            None => "this receiver's [[agent]] list (the store's not read yet)".to_owned(),
        };
        let _ = writeln!(out, "    grants       {grants}");
        if store.view_chunks > 0 || store.remembered_chunks > 0 {
            let _ = writeln!(
                out,
                "    memory       view of {} chunk(s) in {}; {} chunk reference(s) of published \
                 points remembered",
                store.view_chunks,
                units::format_size(store.view_bytes),
                store.remembered_chunks
            );
        }
        let _ = writeln!(
            out,
            "    audit chain  {} entr{} copied{}",
            store.audit_shipped,
            if store.audit_shipped == 1 { "y" } else { "ies" },
            match &store.audit_error {
                Some(error) => format!(", FAILING: {error}"),
                None => String::new(),
            }
        );
    }
    for s in &snapshot.volumes {
        let _ = writeln!(out, "\n  {} ({})", s.volume, s.source);
        let _ = writeln!(out, "    state        {}", state_name(s.state));
        if let Some(sync) = &s.sync {
            let fraction = sync.done_bytes as f64 / sync.total_bytes.max(1) as f64;
            let _ = writeln!(
                out,
                "    sync         {} {:.0}% of {}, ETA {}",
                bar(fraction, 30),
                fraction * 100.0,
                units::format_size(sync.total_bytes),
                sync.eta_s.map_or("?".into(), |eta| format!("{eta}s"))
            );
        }
        let _ = writeln!(
            out,
            "    lag          {}",
            s.lag_seconds
                .map_or("no point yet".into(), |lag| format!("{lag:.1}s"))
        );
        let _ = writeln!(
            out,
            "    backlog      {}",
            units::format_size(s.backlog_bytes)
        );
        let _ = writeln!(
            out,
            "    rate         {}/s",
            units::format_size(s.rate_bytes_per_s)
        );
        if let Some(link) = &s.link {
            let _ = writeln!(
                out,
                "    link         round trip {:.0} ms, window {}, {:.2}% of {} datagrams lost, \
                 {} congestion cuts",
                link.rtt_ms,
                units::format_size(link.congestion_window_bytes),
                link.lost_packets as f64 * 100.0 / link.sent_packets.max(1) as f64,
                link.sent_packets,
                link.congestion_events
            );
        }
        if s.change_rate_bytes_per_s > 0 || s.ship_rate_bytes_per_s > 0 {
            let _ = writeln!(
                out,
                "    changes      {}/s, shipped at {}/s{}",
                units::format_size(s.change_rate_bytes_per_s),
                units::format_size(s.ship_rate_bytes_per_s),
                if s.falling_behind {
                    " - FALLING BEHIND: the source changes faster than the link ships; the \
                     backlog grows (raise the link, --max-rate or compression, or lower the \
                     write rate)"
                        .to_owned()
                } else {
                    s.catch_up_eta_s
                        .map(|eta| format!(", backlog shipped in about {eta}s"))
                        .unwrap_or_default()
                }
            );
        }
        if let Some(kept) = &s.kept_cycle {
            let _ = writeln!(
                out,
                "    interrupted  cycle {}: {} frames ({}) journaled since {}, kept for the agent \
                 to resume",
                kept.seq,
                kept.frames,
                units::format_size(kept.journaled_bytes),
                units::format_utc(kept.since_unix_ms)
            );
        }
        if let Some(drill) = &s.drill {
            let _ = writeln!(
                out,
                "    drill        {}",
                drill_line(drill, snapshot.time_unix_ms)
            );
        }
        if let Some(point) = &s.last_consistent {
            let _ = writeln!(
                out,
                "    consistent   point {} at {} (frozen {} ms)",
                point.seq,
                units::format_utc(point.time_unix_ms),
                point.freeze_ms
            );
        } else {
            let _ = writeln!(out, "    consistent   none yet");
        }
        let _ = writeln!(
            out,
            "    tracking     generation {}, {} loss event(s), {} kernel skip(s) recovered from \
             the completion log",
            s.tracking_generation.as_deref().unwrap_or("-"),
            s.tracking_loss_total,
            s.tracking_skips_recovered_total
        );
        if let Some(reach) = s.completion_log_reach_s {
            let _ = writeln!(
                out,
                "    compl. log   holds the last {reach:.0} s of completions (cuts are {} s apart)",
                s.interval_s
            );
        }
        if let Some(held) = s.completion_log_held_bytes {
            let _ = writeln!(
                out,
                "    compl. log   {} of completions read out and held in memory",
                units::format_size(held)
            );
        }
        let _ = writeln!(
            out,
            "    totals       {} cycle(s), {} on the wire",
            s.cycles_total,
            units::format_size(s.sent_bytes_total)
        );
        if let Some(error) = &s.last_error {
            let _ = writeln!(out, "    last error   {error}");
        }
    }
    out
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The status line of a volume's drills.
fn drill_line(drill: &DrillSummary, now_unix_ms: u64) -> String {
    let ago = |ms: u64| {
        units::format_duration(std::time::Duration::from_secs(
            now_unix_ms.saturating_sub(ms) / 1000,
        ))
    };
    let mut line = if drill.time_unix_ms == 0 {
        "never run".to_owned()
    } else if drill.ok {
        format!(
            "passed {} ago: point {} recovered in {:.1}s",
            ago(drill.time_unix_ms),
            drill.seq,
            drill.recovery_seconds
        )
    } else {
        format!(
            "FAILED {} ago on point {}: {}",
            ago(drill.time_unix_ms),
            drill.seq,
            drill.failure.as_deref().unwrap_or("unknown")
        )
    };
    if let Some(every) = drill.every_s {
        let every = units::format_duration(std::time::Duration::from_secs(every));
        if drill.overdue {
            let last = drill
                .last_success_unix_ms
                .map_or("none ever".to_owned(), |ms| format!("{} ago", ago(ms)));
            line = format!("OVERDUE (every {every}; last success {last}): {line}");
        } else {
            line.push_str(&format!(" (every {every})"));
        }
    }
    line
}

/// The content type of [`prometheus`]'s text (OpenMetrics, which Prometheus scrapes natively).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One scrape's view of the board, encoded by prometheus-client. The board stays the single
/// source of status, JSON and metrics; this collector only reads a snapshot of it.
#[derive(Debug)]
struct SnapshotCollector(Snapshot);

/// A volume's label set. prometheus-client writes label values as given, so they are escaped
/// here (a volume name cannot hold a quote today, but the exposition must not depend on it).
fn volume_labels(status: &VolumeStatus) -> [(&'static str, String); 1] {
    [("volume", escape_label(&status.volume))]
}

/// A metric family: name, help, and its value for one volume.
type Series<T> = (&'static str, &'static str, fn(&VolumeStatus) -> T);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let volumes = &self.0.volumes;
        let gauges: [Series<Option<f64>>; 14] = [
            (
                "blkmirror_link_round_trip_seconds",
                "(agent) The smoothed round trip to the receiver.",
                |s| s.link.as_ref().map(|l| l.rtt_ms / 1000.0),
            ),
            (
                "blkmirror_link_congestion_window_bytes",
                "(agent) The congestion window towards the receiver.",
                |s| s.link.as_ref().map(|l| l.congestion_window_bytes as f64),
            ),
            (
                "blkmirror_drill_last_success_timestamp_seconds",
                "(receiver) When the last successful drill of the volume started (Unix seconds).",
                |s| {
                    s.drill
                        .as_ref()
                        .and_then(|d| d.last_success_unix_ms)
                        .map(|ms| ms as f64 / 1000.0)
                },
            ),
            (
                "blkmirror_drill_recovery_seconds",
                "(receiver) The last drill's recovery time: start to healthy.",
                |s| {
                    s.drill
                        .as_ref()
                        .filter(|d| d.ok)
                        .map(|d| d.recovery_seconds)
                },
            ),
            (
                "blkmirror_drill_overdue",
                "(receiver) 1 when the volume's last successful drill is older than its schedule.",
                |s| {
                    s.drill
                        .as_ref()
                        .filter(|d| d.every_s.is_some())
                        .map(|d| if d.overdue { 1.0 } else { 0.0 })
                },
            ),
            (
                "blkmirror_kept_cycle_bytes",
                "(receiver) Bytes journaled by a cycle whose connection broke, kept for its \
                 agent to resume (0: none).",
                |s| {
                    Some(
                        s.kept_cycle
                            .as_ref()
                            .map_or(0.0, |k| k.journaled_bytes as f64),
                    )
                },
            ),
            (
                "blkmirror_change_rate_bytes_per_second",
                "How fast the source changes: bytes cut per second, smoothed.",
                |s| Some(s.change_rate_bytes_per_s as f64),
            ),
            (
                "blkmirror_ship_rate_bytes_per_second",
                "How fast changes are shipped: device bytes per second of cycle time, smoothed.",
                |s| Some(s.ship_rate_bytes_per_s as f64),
            ),
            (
                "blkmirror_falling_behind",
                "1 when the source changes faster than the link ships (the backlog grows).",
                |s| Some(if s.falling_behind { 1.0 } else { 0.0 }),
            ),
            (
                "blkmirror_lag_seconds",
                "Age of the newest committed complete point.",
                |s| s.lag_seconds,
            ),
            (
                "blkmirror_completion_log_reach_seconds",
                "(agent) How far back the completion log held every completion at the last cut \
                 (absent: it never overwrote one). A kernel skip older than this costs a verify \
                 sync.",
                |s| s.completion_log_reach_s,
            ),
            (
                "blkmirror_completion_log_held_bytes",
                "(agent) Memory holding completions read out of the completion log that a cut \
                 may still ask for (at most 24 MiB per device).",
                |s| s.completion_log_held_bytes.map(|b| b as f64),
            ),
            (
                "blkmirror_backlog_bytes",
                "Changed bytes cut but not yet committed.",
                |s| Some(s.backlog_bytes as f64),
            ),
            (
                "blkmirror_sync_remaining_bytes",
                "Bytes an initial or verify sync still has to cover (0 when none runs).",
                |s| {
                    Some(
                        s.sync
                            .as_ref()
                            .map_or(0.0, |p| p.total_bytes.saturating_sub(p.done_bytes) as f64),
                    )
                },
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for status in volumes {
                if let Some(value) = value(status) {
                    family
                        .encode_family(&volume_labels(status))?
                        .encode_gauge(&value)?;
                }
            }
        }
        // Counters: the encoder appends `_total` to the name.
        let counters: [Series<u64>; 5] = [
            (
                "blkmirror_link_sent_packets",
                "(agent) Datagrams sent on the current connection to the receiver.",
                |s| s.link.as_ref().map_or(0, |l| l.sent_packets),
            ),
            (
                "blkmirror_link_lost_packets",
                "(agent) Of which declared lost.",
                |s| s.link.as_ref().map_or(0, |l| l.lost_packets),
            ),
            (
                "blkmirror_sent_bytes",
                "Bytes sent to (agent) or received from (receiver) the peer, on the wire.",
                |s| s.sent_bytes_total,
            ),
            (
                "blkmirror_tracking_loss",
                "Times tracking history was lost, each forcing a verify sync.",
                |s| s.tracking_loss_total,
            ),
            (
                "blkmirror_tracking_skips_recovered",
                "Cuts in which the kernel had skipped the tracker and the completion log gave \
                 the skipped completions back, without a verify sync.",
                |s| s.tracking_skips_recovered_total,
            ),
        ];
        for (name, help, value) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for status in volumes {
                family
                    .encode_family(&volume_labels(status))?
                    .encode_counter::<NoLabelSet, _, u64>(&value(status), None)?;
            }
        }
        // Durations: only sums and counts are kept, so each is a histogram with the one
        // `+Inf` bucket (written for `f64::MAX`; its `_sum` and `_count` series are what dashboards divide).
        let durations: [Series<(f64, u64)>; 2] = [
            (
                "blkmirror_cycle_duration_seconds",
                "Duration of committed cycles.",
                |s| (s.cycle_seconds_sum, s.cycles_total),
            ),
            (
                "blkmirror_freeze_duration_seconds",
                "How long file systems stayed frozen for consistent points.",
                |s| (s.freeze_seconds_sum, s.freezes_total),
            ),
        ];
        for (name, help, value) in durations {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for status in volumes {
                let (sum, count) = value(status);
                family
                    .encode_family(&volume_labels(status))?
                    .encode_histogram::<NoLabelSet>(sum, count, &[(f64::MAX, count)], None)?;
            }
        }
        if let Some(store) = &self.0.store {
            let gauges: [(&str, &str, f64); 5] = [
                (
                    "blkmirror_store_reachable",
                    "(receiver) 1 when the last request to the object store succeeded.",
                    if store.reachable { 1.0 } else { 0.0 },
                ),
                (
                    "blkmirror_store_publish_seconds",
                    "(receiver) How long the last publish of a point to the object store took.",
                    store.last_publish_ms as f64 / 1000.0,
                ),
                (
                    "blkmirror_store_view_chunks",
                    "(receiver) Chunks in this receiver's view of the object store.",
                    store.view_chunks as f64,
                ),
                (
                    "blkmirror_store_view_bytes",
                    "(receiver) Memory taken by this receiver's view of the object store \
                     (where each chunk is): it grows with the store's unique chunks.",
                    store.view_bytes as f64,
                ),
                (
                    "blkmirror_store_remembered_chunks",
                    "(receiver) Chunk references of the published points this receiver \
                     remembers, one map per volume.",
                    store.remembered_chunks as f64,
                ),
            ];
            for (name, help, value) in gauges {
                encoder
                    .encode_descriptor(name, help, None, MetricType::Gauge)?
                    .encode_gauge(&value)?;
            }
            let counters: [(&str, &str, u64); 6] = [
                (
                    "blkmirror_store_audit_shipped_entries",
                    "(receiver) Entries of this receiver's audit log copied to the store's \
                     shared audit chain.",
                    store.audit_shipped,
                ),
                (
                    "blkmirror_store_pruned_points",
                    "(receiver) Points retention deleted from the object store.",
                    store.pruned_points,
                ),
                (
                    "blkmirror_store_gc_deleted_bytes",
                    "(receiver) Bytes of packs deleted by the garbage collections this \
                     receiver ran.",
                    store.gc_deleted_bytes,
                ),
                (
                    "blkmirror_store_published_points",
                    "(receiver) Points published to the object store since the receiver started.",
                    store.published,
                ),
                (
                    "blkmirror_store_uploaded_bytes",
                    "(receiver) Bytes of packs and indexes uploaded to the object store.",
                    store.uploaded_bytes,
                ),
                (
                    "blkmirror_store_deduplicated_chunks",
                    "(receiver) Changed chunks the object store held already (not uploaded).",
                    store.deduplicated_chunks,
                ),
            ];
            for (name, help, value) in counters {
                encoder
                    .encode_descriptor(name, help, None, MetricType::Counter)?
                    .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
            }
        }
        encoder
            .encode_descriptor(
                "blkmirror_build",
                "Build information.",
                None,
                MetricType::Info,
            )?
            .encode_info(&[
                ("version", escape_label(&self.0.version)),
                ("role", escape_label(&self.0.role)),
            ])
    }
}

/// The metrics exposition of a snapshot (OpenMetrics text, [`METRICS_CONTENT_TYPE`]). Labels
/// are per volume, never per block.
pub fn prometheus(snapshot: &Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
    let mut out = String::new();
    text::encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(seq: u64, time_unix_ms: u64, consistent: bool) -> PointSummary {
        PointSummary {
            seq,
            time_unix_ms,
            consistent,
            freeze_ms: 12,
        }
    }

    #[test]
    fn a_change_rate_above_the_ship_rate_is_falling_behind_and_below_it_has_a_catch_up_eta() {
        let board = StatusBoard::new("agent");
        // Cuts 10 s apart of 50 MB: 5 MB/s of changes.
        board.cut("db", 0, 0);
        board.cut("db", 50_000_000, 10_000);
        board.cut("db", 50_000_000, 20_000);
        // Cycles ship 40 MB in 10 s: 4 MB/s.
        board.shipped("db", 40_000_000, 10.0);
        board.update("db", |s| s.backlog_bytes = 80_000_000);
        let db = board.snapshot(20_000).volumes[0].clone();
        assert_eq!(db.change_rate_bytes_per_s, 5_000_000);
        assert_eq!(db.ship_rate_bytes_per_s, 4_000_000);
        assert!(db.falling_behind);
        assert_eq!(db.catch_up_eta_s, None);
        let snap = board.snapshot(20_000);
        assert!(
            render(&snap).contains("FALLING BEHIND"),
            "{}",
            render(&snap)
        );
        let metrics = prometheus(&snap);
        assert!(
            metrics.contains("blkmirror_change_rate_bytes_per_second{volume=\"db\"} 5000000"),
            "{metrics}"
        );
        assert!(metrics.contains("blkmirror_falling_behind{volume=\"db\"} 1"));
        // The writes slow down to 1 MB/s (smoothed: 3 MB/s) and shipping speeds up to 8 MB/s
        // (smoothed: 6 MB/s): 80 MB of backlog ships in 80 / (6 - 3) = 27 s.
        board.cut("db", 10_000_000, 30_000);
        board.shipped("db", 80_000_000, 10.0);
        let db = board.snapshot(30_000).volumes[0].clone();
        assert!(!db.falling_behind);
        assert_eq!(db.catch_up_eta_s, Some(27));
    }

    #[test]
    fn the_object_stores_health_is_shown_and_exported_only_when_there_is_one() {
        let board = StatusBoard::new("receiver");
        board.update("db", |_| {});
        let without = board.snapshot(0);
        assert!(!prometheus(&without).contains("blkmirror_store_"));
        assert!(!render(&without).contains("object store"));
        board.set_store(crate::dr::publish::StoreHealth {
            store: "https://s3.example bucket dr".into(),
            reachable: false,
            last_error: Some("object store: reading volumes/db/lease: refused".into()),
            last_publish_ms: 1500,
            published: 7,
            uploaded_bytes: 3 << 20,
            deduplicated_chunks: 5,
            changed_chunks: 40,
            pruned_points: 3,
            last_gc: Some(crate::dr::publish::GcHealth {
                at_unix_ms: 1_700_000_000_000,
                deleted_packs: 2,
                deleted_bytes: 64 << 20,
                repacked_packs: 1,
                pack_bytes: 1 << 30,
                error: None,
            }),
            gc_deleted_bytes: 64 << 20,
            grants_version: Some(4),
            audit_shipped: 12,
            audit_error: Some("object store: creating audit/blocks/9: refused".into()),
            view_chunks: 1_000_000,
            view_bytes: 65 << 20,
            remembered_chunks: 2_500_000,
        });
        let snap = board.snapshot(0);
        let text = render(&snap);
        assert!(
            text.contains(
                "object store https://s3.example bucket dr: FAILING, 7 point(s) published"
            ),
            "{text}"
        );
        assert!(text.contains("reading volumes/db/lease: refused"), "{text}");
        assert!(text.contains("retention    3 point(s) dropped"), "{text}");
        assert!(text.contains("grants       store's, version 4"), "{text}");
        assert!(
            text.contains("audit chain  12 entries copied, FAILING: object store: creating"),
            "{text}"
        );
        assert!(
            text.contains("2 pack(s) deleted (64 MiB freed of 1 GiB), 1 repacked"),
            "{text}"
        );
        assert!(
            text.contains(
                "memory       view of 1000000 chunk(s) in 65 MiB; 2500000 chunk reference(s)"
            ),
            "{text}"
        );
        let metrics = prometheus(&snap);
        for expected in [
            "blkmirror_store_pruned_points_total 3",
            "blkmirror_store_audit_shipped_entries_total 12",
            "blkmirror_store_gc_deleted_bytes_total 67108864",
            "blkmirror_store_reachable 0",
            "blkmirror_store_publish_seconds 1.5",
            "blkmirror_store_published_points_total 7",
            "blkmirror_store_deduplicated_chunks_total 5",
            "blkmirror_store_view_bytes 68157440",
            "blkmirror_store_remembered_chunks 2500000",
        ] {
            assert!(
                metrics.contains(expected),
                "missing {expected:?} in:\n{metrics}"
            );
        }
        let json: Snapshot = serde_json::from_str(&serde_json::to_string(&snap).unwrap()).unwrap();
        assert_eq!(json.store.map(|s| s.published), Some(7));
    }

    #[test]
    fn drills_are_shown_flagged_when_overdue_and_exported_as_metrics() {
        let board = StatusBoard::new("receiver");
        let now = 1_000_000_000u64;
        board.update("db", |s| {
            s.drill = Some(DrillSummary {
                seq: 12,
                time_unix_ms: now - 7_200_000,
                ok: true,
                recovery_seconds: 3.25,
                failure: None,
                last_success_unix_ms: Some(now - 7_200_000),
                every_s: Some(86400),
                overdue: false,
            });
        });
        board.update("logs", |s| {
            s.drill = Some(DrillSummary {
                seq: 4,
                time_unix_ms: now - 60_000,
                ok: false,
                recovery_seconds: 1.0,
                failure: Some("fsck: e2fsck failed".into()),
                last_success_unix_ms: None,
                every_s: Some(3600),
                overdue: true,
            });
        });
        let snap = board.snapshot(now);
        let text = render(&snap);
        assert!(
            text.contains("drill        passed 2h ago: point 12 recovered in 3.2s (every 1day)"),
            "{text}"
        );
        assert!(
            text.contains(
                "OVERDUE (every 1h; last success none ever): FAILED 1m ago on point 4: fsck"
            ),
            "{text}"
        );
        let metrics = prometheus(&snap);
        assert!(
            metrics
                .contains("blkmirror_drill_last_success_timestamp_seconds{volume=\"db\"} 992800.0"),
            "{metrics}"
        );
        assert!(metrics.contains("blkmirror_drill_recovery_seconds{volume=\"db\"} 3.25"));
        assert!(!metrics.contains("blkmirror_drill_recovery_seconds{volume=\"logs\"}"));
        assert!(metrics.contains("blkmirror_drill_overdue{volume=\"logs\"} 1"));
        assert!(metrics.contains("blkmirror_drill_overdue{volume=\"db\"} 0"));
    }

    #[test]
    fn the_agent_s_link_is_shown_and_exported() {
        let board = StatusBoard::new("agent");
        board.update("db", |_| {});
        board.link(
            "db",
            LinkStats {
                rtt_ms: 81.4,
                congestion_window_bytes: 2 << 20,
                sent_packets: 80_000,
                lost_packets: 800,
                congestion_events: 2,
            },
        );
        let snap = board.snapshot(1_000_000);
        let text = render(&snap);
        assert!(
            text.contains(
                "link         round trip 81 ms, window 2 MiB, 1.00% of 80000 datagrams lost, 2 \
                 congestion cuts"
            ),
            "{text}"
        );
        let metrics = prometheus(&snap);
        for line in [
            "blkmirror_link_round_trip_seconds{volume=\"db\"} 0.0814",
            "blkmirror_link_congestion_window_bytes{volume=\"db\"} 2097152.0",
            "blkmirror_link_sent_packets_total{volume=\"db\"} 80000",
            "blkmirror_link_lost_packets_total{volume=\"db\"} 800",
        ] {
            assert!(metrics.contains(line), "{line} in {metrics}");
        }
    }

    #[test]
    fn a_kept_cycle_is_shown_and_counted() {
        let board = StatusBoard::new("receiver");
        board.update("db", |s| {
            s.kept_cycle = Some(KeptCycle {
                seq: 7,
                frames: 40,
                journaled_bytes: 10 << 20,
                since_unix_ms: 1_795_690_476_603,
            })
        });
        let snap = board.snapshot(1_795_690_480_000);
        let text = render(&snap);
        assert!(
            text.contains("interrupted  cycle 7: 40 frames (10 MiB) journaled"),
            "{text}"
        );
        assert!(prometheus(&snap).contains("blkmirror_kept_cycle_bytes{volume=\"db\"} 10485760"));
        board.update("db", |s| s.kept_cycle = None);
        let snap = board.snapshot(1_795_690_480_000);
        assert!(!render(&snap).contains("interrupted"));
        assert!(prometheus(&snap).contains("blkmirror_kept_cycle_bytes{volume=\"db\"} 0"));
    }

    #[test]
    fn commits_drive_state_lag_and_counters() {
        let board = StatusBoard::new("agent");
        board.update("db", |s| {
            s.state = VolumeState::InitialSync;
            s.interval_s = 60;
            s.sync = Some(SyncProgress {
                done_bytes: 50,
                total_bytes: 100,
                eta_s: Some(3),
            });
        });
        let snap = board.snapshot(10_000);
        assert_eq!(snap.volumes[0].state, VolumeState::InitialSync);
        assert_eq!(snap.volumes[0].lag_seconds, None);
        assert!(render(&snap).contains("50%"));
        board.committed("db", point(1, 9_000, false), false, 100, 1.0);
        assert_eq!(
            board.snapshot(10_000).volumes[0].state,
            VolumeState::InitialSync
        );
        board.committed("db", point(2, 9_500, true), true, 10, 0.5);
        let snap = board.snapshot(10_000);
        let db = &snap.volumes[0];
        assert_eq!(db.state, VolumeState::Continuous);
        assert_eq!(db.lag_seconds, Some(0.5));
        assert_eq!(db.sent_bytes_total, 110);
        assert_eq!((db.cycles_total, db.freezes_total), (1, 1));
        assert!(db.sync.is_none());
        // Four intervals and a minute later without a commit: stalled.
        let late = board.snapshot(9_500 + (4 * 60 + 61) * 1000);
        assert_eq!(late.volumes[0].state, VolumeState::Stalled);
        let json = serde_json::to_value(&late).unwrap();
        assert_eq!(json["volumes"][0]["state"], "stalled");
    }

    #[test]
    fn prometheus_text_is_well_formed_and_per_volume() {
        let board = StatusBoard::new("agent");
        board.committed("db", point(2, 1_000, true), true, 4096, 2.0);
        board.update("we\"ird", |s| s.backlog_bytes = 7);
        board.update("db", |s| {
            s.completion_log_reach_s = Some(42.5);
            s.completion_log_held_bytes = Some(24 * 1000);
        });
        let text = prometheus(&board.snapshot(3_000));
        assert!(
            text.contains("blkmirror_completion_log_reach_seconds{volume=\"db\"} 42.5"),
            "{text}"
        );
        assert!(
            !text.contains("blkmirror_completion_log_reach_seconds{volume=\"we"),
            "{text}"
        );
        assert!(
            text.contains("blkmirror_completion_log_held_bytes{volume=\"db\"} 24000"),
            "{text}"
        );
        assert!(
            text.contains("blkmirror_lag_seconds{volume=\"db\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("blkmirror_backlog_bytes{volume=\"we\\\"ird\"} 7"),
            "{text}"
        );
        assert!(text.contains("blkmirror_cycle_duration_seconds_count{volume=\"db\"} 1"));
        assert!(text.contains("blkmirror_build_info{version="));
        assert!(
            text.contains("blkmirror_sent_bytes_total{volume=\"db\"} 4096"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("blkmirror_cycle_duration_seconds_bucket{le=\"+Inf\",volume=\"db\"} 1"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("blkmirror_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
