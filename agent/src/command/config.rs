//! Configuration files: `/etc/blkmirror/agent.toml` and `/etc/blkmirror/receiver.toml`.
//!
//! Every flag of `blkmirror agent` and `blkmirror receiver` has a key of the same name (with
//! `_` for `-`); sizes and durations are strings as on the command line (`"64KiB"`, `"60s"`).
//! Unknown keys are errors, so a typo is not silently ignored. [`check_file`] parses and checks
//! a file the way the services do and names every problem with its key.
//!
//! A bad file makes the service exit with exit code 78 (`EX_CONFIG`, [`crate::command::exit::ExitCode::Config`]), which the units
//! list in `RestartPreventExitStatus=`, so systemd does not restart-loop on it.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use std::os::unix::fs::PermissionsExt as _;

use clap::ValueEnum;
use serde::Deserialize;

use crate::dr::ops::PointSelector;
use crate::{
    link::identity::Fingerprint,
    link::net::Congestion,
    source::agent::{Compression, FreezeMode},
    source::app_hooks::AppHooks,
    source::read::Engine,
    tracker::track::{self, HookChoice},
};
use blkmirror_protocol::{retention::RetentionPolicy, units, wire};

/// Default control socket of the agent.
pub const AGENT_SOCKET: &str = "/run/blkmirror/agent.sock";
/// Default control socket of the receiver.
pub const RECEIVER_SOCKET: &str = "/run/blkmirror/receiver.sock";

/// A configuration problem: the file, and one line per problem (`key: what was expected`).
#[derive(Debug, thiserror::Error)]
#[error("{}: {}", path.display(), problems.join(&format!("\n{}: ", path.display())))]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, one entry per key.
    pub problems: Vec<String>,
}

/// `[receiver]` of the agent's file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    /// `HOST:PORT` (flag `--receiver`).
    pub address: String,
    /// The receiver's certificate fingerprint (flag `--receiver-fingerprint`).
    pub fingerprint: String,
}

/// One `[[device]]` of the agent's file. Keys left out take the command line's defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// `--device`.
    pub path: PathBuf,
    /// `--volume`.
    pub volume: String,
    /// `--interval`.
    pub interval: Option<String>,
    /// `--max-rate`.
    pub max_rate: Option<String>,
    /// `--chunk-size`.
    pub chunk_size: Option<String>,
    /// `--hooks`.
    pub hooks: Option<String>,
    /// `--streams`.
    pub streams: Option<u16>,
    /// `--queue-depth`.
    pub queue_depth: Option<u32>,
    /// `--reader`.
    pub reader: Option<String>,
    /// `--compression`.
    pub compression: Option<String>,
    /// `--freeze`.
    pub freeze: Option<String>,
    /// `--freeze-budget`.
    pub freeze_budget: Option<String>,
    /// `--window`.
    pub window: Option<String>,
    /// `--congestion`.
    pub congestion: Option<String>,
    /// `--sync-step`.
    pub sync_step: Option<String>,
    /// `--completion-log`.
    pub completion_log: Option<String>,
    /// Devices of one consistency group are frozen and cut together.
    pub consistency_group: Option<String>,
    /// `--pre-freeze`.
    pub pre_freeze: Option<String>,
    /// `--post-thaw`.
    pub post_thaw: Option<String>,
    /// `--hook-timeout`.
    pub hook_timeout: Option<String>,
}

/// `/etc/blkmirror/agent.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// `--identity`.
    pub identity: PathBuf,
    /// The receiver.
    pub receiver: PeerSection,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--pin-root`.
    pub pin_root: Option<PathBuf>,
    /// `--json`.
    #[serde(default)]
    pub json: bool,
    /// `--once`.
    #[serde(default)]
    pub once: bool,
    /// `--control-socket`.
    pub control_socket: Option<PathBuf>,
    /// `--metrics-listen` (Prometheus; off when absent).
    pub metrics_listen: Option<String>,
    /// The protected devices.
    #[serde(default)]
    pub device: Vec<DeviceSection>,
}

/// One device, checked: what the agent runs with.
#[derive(Clone, Debug)]
pub struct DeviceSettings {
    /// The device.
    pub device: PathBuf,
    /// The volume.
    pub volume: String,
    /// Time between cycles.
    pub interval: Duration,
    /// Bandwidth cap.
    pub max_rate: Option<u64>,
    /// Chunk size.
    pub chunk_size: u64,
    /// Hooks.
    pub hooks: HookChoice,
    /// Data streams.
    pub streams: u16,
    /// Reads in flight.
    pub queue_depth: u32,
    /// Read engine.
    pub reader: Engine,
    /// Compression.
    pub compression: Compression,
    /// Freezing.
    pub freeze: FreezeMode,
    /// Freeze budget.
    pub freeze_budget: Duration,
    /// Flow-control window.
    pub window: u64,
    /// Congestion controller.
    pub congestion: Congestion,
    /// Sync step.
    pub sync_step: u64,
    /// The completion log's ring buffer per CPU, in KiB (`None`: sized by the CPU count).
    pub completion_log_kib: Option<u64>,
    /// The consistency group.
    pub consistency_group: Option<String>,
    /// Application hooks around each freeze.
    pub app_hooks: AppHooks,
}

/// The agent's whole configuration, checked.
#[derive(Clone, Debug)]
pub struct AgentSettings {
    /// Identity directory.
    pub identity: PathBuf,
    /// Receiver address.
    pub receiver: String,
    /// Receiver fingerprints.
    pub receiver_fingerprint: crate::link::identity::ReceiverPins,
    /// Tracking state directory.
    pub state_dir: PathBuf,
    /// Pin root.
    pub pin_root: PathBuf,
    /// JSON output.
    pub json: bool,
    /// One cycle, then exit.
    pub once: bool,
    /// Control socket (`None`: none, the default on the command line).
    pub control_socket: Option<PathBuf>,
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// The devices.
    pub devices: Vec<DeviceSettings>,
}

/// `[[agent]]` of the receiver's file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantSection {
    /// The agent's certificate fingerprint.
    pub fingerprint: String,
    /// The volumes it may write.
    pub volumes: Vec<String>,
    /// A name for humans (logs only).
    pub name: Option<String>,
}

/// `[retention]` of the receiver's file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    /// `--keep-all`.
    pub all: Option<String>,
    /// `--keep-hourly`.
    pub hourly: Option<String>,
    /// `--keep-daily`.
    pub daily: Option<String>,
    /// `--retention-lock`.
    pub locked: Option<String>,
}

/// `/etc/blkmirror/receiver.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverFile {
    /// `--identity`.
    pub identity: PathBuf,
    /// `--listen`.
    pub listen: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--window`.
    pub window: Option<String>,
    /// `--control-socket`.
    pub control_socket: Option<PathBuf>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<String>,
    /// Retention of points in time.
    pub retention: Option<RetentionSection>,
    /// Admitted agents (`--allow`).
    #[serde(default)]
    pub agent: Vec<GrantSection>,
    /// Scheduled drills (`blkmirror drill --due` runs the ones due).
    #[serde(default)]
    pub drill: Vec<DrillSection>,
    /// Operator roles on the control socket (see `command::roles`).
    pub roles: Option<RolesSection>,
    /// Points the daemon serves over NBD (as `blkmirror export` does).
    #[serde(default)]
    pub export: Vec<ExportSection>,
    /// The object store committed points are published to.
    pub store: Option<StoreSection>,
}

/// `[store]` of `receiver.toml`: an S3-compatible object store (see `dr::publish`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `https://HOST[:PORT]`.
    pub endpoint: String,
    /// The bucket (the operator creates it).
    pub bucket: String,
    /// The region in signatures (`us-east-1` by default).
    pub region: Option<String>,
    /// A TOML file with `access_key` and `secret_key`, readable by root only.
    pub credentials: PathBuf,
    /// Allow an `http://` endpoint (the same host or a private network only).
    #[serde(default)]
    pub allow_http: bool,
    /// Encryption at rest: a file of 64 hex digits, mode 0600, that every receiver of the
    /// store shares (`blkmirror store keygen`).
    pub encryption_key: Option<PathBuf>,
    /// How long a receiver's hold on a volume lasts without renewal (`60s` by default): how
    /// soon another receiver can take over a volume whose receiver died.
    pub lease: Option<String>,
    /// How often this receiver collects the store's garbage (`6h` by default, `off`: never;
    /// `blkmirror store gc` runs one by hand). Receivers take turns through a store-wide
    /// lease.
    pub gc_every: Option<String>,
    /// How long a collection leaves a new or condemned pack alone (`1h` by default, at least
    /// `15m`: longer than a publish may take).
    pub gc_grace: Option<String>,
    /// How long a receiver holds a volume's lease (taken over, or taken at its start) before
    /// its retention rewrites the volume's points in the store (`5m` by default, at least
    /// `2m`): time for what the previous holder sent before its lease ended to land.
    pub takeover_settle: Option<String>,
}

/// The credentials file of `[store]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreCredentials {
    access_key: String,
    secret_key: String,
}

/// An `[[export]]` section of `receiver.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    /// The volume (also the NBD export name).
    pub volume: String,
    /// Which point (`latest` by default: the newest when the daemon starts or reloads).
    pub at: Option<String>,
    /// `unix:PATH` or `ADDR:PORT`.
    pub listen: String,
    /// A copy-on-write overlay in front.
    #[serde(default)]
    pub writable: bool,
    /// Allow a TCP address other than loopback.
    #[serde(default)]
    pub allow_remote: bool,
    /// Serve the export a `failover --to export` promoted, with its writes (the failover
    /// decided the point and whether it is writable).
    #[serde(default)]
    pub promoted: bool,
}

/// `[roles]` of `receiver.toml`: the Unix groups whose members hold each role.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolesSection {
    /// `status`, `points`.
    #[serde(default)]
    pub viewer: Vec<String>,
    /// Also `restore`, `verify`.
    #[serde(default)]
    pub operator: Vec<String>,
    /// Also `failover`, `reprotect`.
    #[serde(default)]
    pub admin: Vec<String>,
}

/// A `[[drill]]` section of `receiver.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillSection {
    /// The volume.
    pub volume: String,
    /// How often (`7d`): a drill is due this long after the last one started, and the volume
    /// is flagged when its last successful drill is older than this.
    pub every: String,
    /// Which point (`latest` by default).
    pub at: Option<String>,
    /// The health check (`drill --check`).
    pub check: Option<String>,
    /// How long it may run (`10m` by default).
    pub check_timeout: Option<String>,
    /// Boot the point under qemu with this kernel (`drill --boot`).
    pub boot: Option<PathBuf>,
    /// `--boot-initrd`.
    pub boot_initrd: Option<PathBuf>,
    /// `--boot-append`.
    pub boot_append: Option<String>,
    /// `--boot-healthy` (`login:` by default).
    pub boot_healthy: Option<String>,
    /// `--boot-timeout` (`5m` by default).
    pub boot_timeout: Option<String>,
    /// `--boot-accel` (`auto`, `kvm`, `tcg`).
    pub boot_accel: Option<String>,
    /// `--boot-memory` in MiB (1024 by default).
    pub boot_memory: Option<u32>,
}

/// A drill schedule, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct DrillSchedule {
    /// The volume.
    pub volume: String,
    /// How often.
    pub every: Duration,
    /// Which point.
    pub at: PointSelector,
    /// The health check.
    pub check: Option<String>,
    /// Its time limit.
    pub check_timeout: Duration,
    /// A boot under qemu after the file-system steps.
    pub boot: Option<crate::dr::recovery::BootOptions>,
}

/// The shortest drill schedule accepted.
pub const MIN_DRILL_EVERY: Duration = Duration::from_secs(60);

/// The receiver's configuration, checked.
#[derive(Clone, Debug)]
pub struct ReceiverSettings {
    /// Identity directory.
    pub identity: PathBuf,
    /// Listen address.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Flow-control window.
    pub window: u64,
    /// Control socket (`None`: none, the default on the command line).
    pub control_socket: Option<PathBuf>,
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Retention.
    pub retention: RetentionPolicy,
    /// Grants as `FP=VOL,VOL` (the `--allow` form).
    pub allow: Vec<String>,
    /// Scheduled drills.
    pub drills: Vec<DrillSchedule>,
    /// Operator roles (empty: the control socket is root's only).
    pub roles: crate::command::roles::RoleMap,
    /// Exports the daemon serves.
    pub exports: Vec<crate::dr::export::ExportOptions>,
    /// The object store points are published to.
    pub store: Option<crate::dr::objstore::StoreConfig>,
}

/// Collects problems with their keys.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check<T>(&mut self, key: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(message) => {
                self.0.push(format!("{key}: {message}"));
                None
            }
        }
    }
}

fn enum_value<T: ValueEnum>(text: &str) -> Result<T, String> {
    T::from_str(text, false).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_owned()))
            .collect();
        format!("{text:?} is not one of {}", names.join(", "))
    })
}

fn parse_or<T>(
    problems: &mut Problems,
    key: &str,
    text: Option<&str>,
    default: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Option<T> {
    problems.check(key, parse(text.unwrap_or(default)))
}

fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an address such as 127.0.0.1:9464"))
}

fn parse_toml<T: for<'de> Deserialize<'de>>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|error| ConfigError {
        path: path.to_owned(),
        problems: vec![error.to_string().trim().replace('\n', "\n    ")],
    })
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|error| ConfigError {
        path: path.to_owned(),
        problems: vec![format!("cannot read: {error}")],
    })
}

/// Parses and checks an agent configuration.
pub fn agent_from_str(path: &Path, text: &str) -> Result<AgentSettings, ConfigError> {
    let file: AgentFile = parse_toml(path, text)?;
    let mut problems = Problems::default();
    let fingerprint = problems.check(
        "receiver.fingerprint",
        crate::link::identity::ReceiverPins::parse(&file.receiver.fingerprint),
    );
    problems.check(
        "receiver.address",
        crate::link::identity::parse_receivers(&file.receiver.address),
    );
    let metrics_listen = file
        .metrics_listen
        .as_deref()
        .and_then(|text| problems.check("metrics_listen", socket_addr(text)));
    if file.device.is_empty() {
        problems
            .0
            .push("device: no [[device]] section: nothing to protect".into());
    }
    let mut volumes = BTreeSet::new();
    let mut paths = BTreeSet::new();
    let mut devices = Vec::new();
    for (index, section) in file.device.iter().enumerate() {
        let key = |name: &str| format!("device[{index}].{name}");
        // A key of this section, parsed with its default: the key is the field's name.
        macro_rules! setting {
            ($field:ident, $default:expr, $parse:expr) => {
                parse_or(
                    &mut problems,
                    &key(stringify!($field)),
                    section.$field.as_deref(),
                    $default,
                    $parse,
                )
            };
        }
        if let Err(error) = wire::check_volume_name(&section.volume) {
            problems.0.push(format!("{}: {error}", key("volume")));
        }
        if !volumes.insert(section.volume.clone()) {
            problems.0.push(format!(
                "{}: volume {:?} is named twice",
                key("volume"),
                section.volume
            ));
        }
        if !paths.insert(section.path.clone()) {
            problems.0.push(format!(
                "{}: {} is listed twice",
                key("path"),
                section.path.display()
            ));
        }
        if let Some(group) = &section.consistency_group {
            if group.is_empty() {
                problems
                    .0
                    .push(format!("{}: empty group name", key("consistency_group")));
            }
            if section.freeze.as_deref() == Some("off") {
                problems.0.push(format!(
                    "{}: a device of consistency group {group:?} must not have freeze = \"off\"",
                    key("freeze")
                ));
            }
        }
        let interval = setting!(interval, "60s", parse_interval);
        let max_rate = match section.max_rate.as_deref() {
            None => Some(None),
            Some(text) => problems.check(&key("max_rate"), parse_rate(text)).map(Some),
        };
        let chunk_size = setting!(chunk_size, "64KiB", |text| {
            let size = units::parse_size(text)?;
            track::chunk_shift(size).map_err(|e| e.to_string())?;
            Ok(size)
        });
        let hooks = setting!(hooks, "auto", enum_value);
        let reader = setting!(reader, "auto", enum_value);
        let compression = setting!(compression, "auto", enum_value);
        let freeze = setting!(freeze, "auto", enum_value);
        let freeze_budget = setting!(freeze_budget, "2s", parse_interval);
        let window = setting!(window, "32MiB", units::parse_size);
        let congestion = setting!(congestion, "filtered-cubic", enum_value);
        let sync_step = setting!(sync_step, "4GiB", units::parse_size);
        let hook_timeout = setting!(hook_timeout, "60s", parse_interval);
        let completion_log = setting!(completion_log, "auto", parse_completion_log);
        for (name, command) in [
            ("pre_freeze", &section.pre_freeze),
            ("post_thaw", &section.post_thaw),
        ] {
            if command.as_deref().is_some_and(|c| c.trim().is_empty()) {
                problems
                    .0
                    .push(format!("{}: empty; leave it out for no hook", key(name)));
            }
        }
        if (section.pre_freeze.is_some() || section.post_thaw.is_some())
            && section.freeze.as_deref() == Some("off")
        {
            problems.0.push(format!(
                "{}: hooks run around a freeze, and freeze is off",
                key("pre_freeze")
            ));
        }
        let streams = section.streams.unwrap_or(4);
        if !(1..=32).contains(&streams) {
            problems
                .0
                .push(format!("{}: {streams} is not in 1..=32", key("streams")));
        }
        let queue_depth = section.queue_depth.unwrap_or(32);
        if !(1..=256).contains(&queue_depth) {
            problems.0.push(format!(
                "{}: {queue_depth} is not in 1..=256",
                key("queue_depth")
            ));
        }
        if let (
            Some(interval),
            Some(max_rate),
            Some(chunk_size),
            Some(hooks),
            Some(reader),
            Some(compression),
            Some(freeze),
            Some(freeze_budget),
            Some(window),
            Some(congestion),
            Some(sync_step),
            Some(hook_timeout),
            Some(completion_log_kib),
        ) = (
            interval,
            max_rate,
            chunk_size,
            hooks,
            reader,
            compression,
            freeze,
            freeze_budget,
            window,
            congestion,
            sync_step,
            hook_timeout,
            completion_log,
        ) {
            devices.push(DeviceSettings {
                device: section.path.clone(),
                volume: section.volume.clone(),
                interval,
                max_rate,
                chunk_size,
                hooks,
                streams,
                queue_depth,
                reader,
                compression,
                freeze,
                freeze_budget,
                window,
                congestion,
                sync_step,
                completion_log_kib,
                consistency_group: section.consistency_group.clone(),
                app_hooks: AppHooks {
                    pre_freeze: section.pre_freeze.clone(),
                    post_thaw: section.post_thaw.clone(),
                    timeout: hook_timeout,
                },
            });
        }
    }
    // A group's members cycle together: one interval, and at least two of them.
    let mut groups: std::collections::BTreeMap<&str, Vec<&DeviceSettings>> = Default::default();
    for device in &devices {
        if let Some(group) = &device.consistency_group {
            groups.entry(group).or_default().push(device);
        }
    }
    for (group, members) in &groups {
        if members.len() < 2 {
            problems.0.push(format!(
                "consistency_group: group {group:?} has only volume {}; a group needs two or \
                 more devices",
                members[0].volume
            ));
        }
        if members.iter().any(|m| m.interval != members[0].interval) {
            problems.0.push(format!(
                "consistency_group: the devices of group {group:?} must share one interval"
            ));
        }
    }
    match (problems.0.is_empty(), fingerprint) {
        (true, Some(receiver_fingerprint)) => Ok(AgentSettings {
            identity: file.identity,
            receiver: file.receiver.address,
            receiver_fingerprint,
            state_dir: file
                .state_dir
                .unwrap_or_else(|| PathBuf::from(track::DEFAULT_STATE_DIR)),
            pin_root: file
                .pin_root
                .unwrap_or_else(|| PathBuf::from(track::DEFAULT_PIN_ROOT)),
            json: file.json,
            once: file.once,
            control_socket: Some(
                file.control_socket
                    .unwrap_or_else(|| PathBuf::from(AGENT_SOCKET)),
            ),
            metrics_listen,
            devices,
        }),
        _ => Err(ConfigError {
            path: path.to_owned(),
            problems: problems.0,
        }),
    }
}

/// Parses and checks a receiver configuration.
pub fn receiver_from_str(path: &Path, text: &str) -> Result<ReceiverSettings, ConfigError> {
    let file: ReceiverFile = parse_toml(path, text)?;
    let mut problems = Problems::default();
    let listen = parse_or(
        &mut problems,
        "listen",
        file.listen.as_deref(),
        "0.0.0.0:7443",
        socket_addr,
    );
    let window = parse_or(
        &mut problems,
        "window",
        file.window.as_deref(),
        "32MiB",
        units::parse_size,
    );
    let metrics_listen = file
        .metrics_listen
        .as_deref()
        .and_then(|text| problems.check("metrics_listen", socket_addr(text)));
    let retention_section = file.retention.as_ref();
    let defaults = RetentionPolicy::default();
    let mut duration = |key: &str, text: Option<&String>, default: Duration| match text {
        None => Some(default),
        Some(text) => problems.check(key, units::parse_duration(text)),
    };
    let all = duration(
        "retention.all",
        retention_section.and_then(|r| r.all.as_ref()),
        defaults.all,
    );
    let hourly = duration(
        "retention.hourly",
        retention_section.and_then(|r| r.hourly.as_ref()),
        defaults.hourly,
    );
    let daily = duration(
        "retention.daily",
        retention_section.and_then(|r| r.daily.as_ref()),
        defaults.daily,
    );
    let locked = duration(
        "retention.locked",
        retention_section.and_then(|r| r.locked.as_ref()),
        defaults.locked,
    );
    if file.agent.is_empty() {
        problems
            .0
            .push("agent: no [[agent]] section: no agent is admitted".into());
    }
    let mut allow = Vec::new();
    let mut seen = BTreeSet::new();
    for (index, grant) in file.agent.iter().enumerate() {
        let key = |name: &str| format!("agent[{index}].{name}");
        match Fingerprint::parse(&grant.fingerprint) {
            Ok(fingerprint) => {
                if !seen.insert(fingerprint.to_string()) {
                    problems.0.push(format!(
                        "{}: this agent is listed twice; list all its volumes in one section",
                        key("fingerprint")
                    ));
                }
            }
            Err(error) => problems.0.push(format!("{}: {error}", key("fingerprint"))),
        }
        if grant.volumes.is_empty() {
            problems
                .0
                .push(format!("{}: no volume granted", key("volumes")));
        }
        for volume in &grant.volumes {
            if let Err(error) = wire::check_volume_name(volume) {
                problems.0.push(format!("{}: {error}", key("volumes")));
            }
        }
        allow.push(format!("{}={}", grant.fingerprint, grant.volumes.join(",")));
    }
    let drills = drill_schedules(&file.drill, &mut problems);
    let roles = role_map(file.roles.as_ref(), &mut problems);
    let data_dir = file
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let exports = export_sections(&file.export, &data_dir, &mut problems);
    let store = file
        .store
        .as_ref()
        .and_then(|section| store_section(section, &mut problems));
    match (listen, window, all, hourly, daily, locked) {
        (Some(listen), Some(window), Some(all), Some(hourly), Some(daily), Some(locked))
            if problems.0.is_empty() =>
        {
            Ok(ReceiverSettings {
                identity: file.identity,
                listen,
                data_dir: file
                    .data_dir
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
                window,
                control_socket: Some(
                    file.control_socket
                        .unwrap_or_else(|| PathBuf::from(RECEIVER_SOCKET)),
                ),
                metrics_listen,
                retention: RetentionPolicy {
                    all,
                    hourly,
                    daily,
                    locked,
                },
                allow,
                drills,
                roles,
                exports,
                store,
            })
        }
        _ => Err(ConfigError {
            path: path.to_owned(),
            problems: problems.0,
        }),
    }
}

/// Checks `[store]` and reads its credentials.
fn store_section(
    section: &StoreSection,
    problems: &mut Problems,
) -> Option<crate::dr::objstore::StoreConfig> {
    let before = problems.0.len();
    let endpoint = section.endpoint.trim_end_matches('/');
    if endpoint.starts_with("http://") {
        if !section.allow_http {
            problems.0.push(format!(
                "store.endpoint: {endpoint} is plain HTTP: credentials and points would cross \
                 the network unprotected; use https://, or set allow_http = true for a store on \
                 this host or a private network"
            ));
        }
    } else if !endpoint.starts_with("https://") {
        problems.0.push(format!(
            "store.endpoint: {endpoint:?} is not a URL (expected https://HOST[:PORT])"
        ));
    }
    // S3's bucket naming rules, which every compatible store accepts.
    let bucket_ok = (3..=63).contains(&section.bucket.len())
        && section
            .bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && section
            .bucket
            .starts_with(|c: char| c.is_ascii_alphanumeric());
    if !bucket_ok {
        problems.0.push(format!(
            "store.bucket: {:?} is not a bucket name (3 to 63 lower-case letters, digits, \
             dots and dashes)",
            section.bucket
        ));
    }
    let encryption_key = match &section.encryption_key {
        None => Some(None),
        Some(path) => problems
            .check("store.encryption_key", read_store_key(path))
            .map(Some),
    };
    let path = &section.credentials;
    let credentials = match std::fs::metadata(path) {
        Err(error) => Err(format!("{}: {error}", path.display())),
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => Err(format!(
            "{} can be read by others (mode {:o}); it holds the store's secret key: chmod 600 \
             it",
            path.display(),
            meta.permissions().mode() & 0o777
        )),
        Ok(meta) if meta.len() > 64 << 10 => Err(format!(
            "{} is {} bytes, larger than a credentials file can be",
            path.display(),
            meta.len()
        )),
        Ok(_) => std::fs::read_to_string(path)
            .map_err(|error| format!("{}: {error}", path.display()))
            .and_then(|text| {
                toml::from_str::<StoreCredentials>(&text).map_err(|error| {
                    format!(
                        "{}: expected access_key = \"...\" and secret_key = \"...\": {}",
                        path.display(),
                        error.message()
                    )
                })
            }),
    };
    let lease = match &section.lease {
        None => Some(crate::dr::objstore::DEFAULT_LEASE),
        Some(text) => problems.check(
            "store.lease",
            units::parse_duration(text).and_then(|lease| {
                if (Duration::from_secs(5)..=Duration::from_secs(600)).contains(&lease) {
                    Ok(lease)
                } else {
                    Err(format!("{text} is outside 5s to 10m"))
                }
            }),
        ),
    };
    let gc_every = match section.gc_every.as_deref() {
        None => Some(Some(crate::dr::objstore::DEFAULT_GC_EVERY)),
        Some("off") => Some(None),
        Some(text) => problems.check(
            "store.gc_every",
            units::parse_duration(text).and_then(|every| {
                if every >= Duration::from_secs(60) || cfg!(feature = "test-hooks") {
                    Ok(Some(every))
                } else {
                    Err(format!("{text} is under a minute (or \"off\")"))
                }
            }),
        ),
    };
    let gc_grace = match &section.gc_grace {
        None => Some(crate::dr::objstore::DEFAULT_GC_GRACE),
        Some(text) => problems.check(
            "store.gc_grace",
            units::parse_duration(text).and_then(|grace| {
                if grace >= crate::dr::objstore::MIN_GC_GRACE || cfg!(feature = "test-hooks") {
                    Ok(grace)
                } else {
                    Err(format!(
                        "{text} is under 15m: a publish that read the store's indexes may take \
                         10 minutes to commit, and a shorter grace could delete a pack it uses"
                    ))
                }
            }),
        ),
    };
    let takeover_settle = match &section.takeover_settle {
        None => Some(crate::dr::objstore::DEFAULT_TAKEOVER_SETTLE),
        Some(text) => problems.check(
            "store.takeover_settle",
            units::parse_duration(text).and_then(|settle| {
                let floor = crate::dr::objstore::MIN_TAKEOVER_SETTLE;
                if settle > Duration::from_secs(3600) {
                    Err(format!("{text} is over 1h"))
                } else if settle >= floor || cfg!(feature = "test-hooks") {
                    Ok(settle)
                } else {
                    Err(format!(
                        "{text} is under 2m: the store's client retries a request for up to a \
                         minute, so what a receiver sent just before losing its lease may land \
                         that late, and retention must not run beside it"
                    ))
                }
            }),
        ),
    };
    let credentials = problems.check("store.credentials", credentials)?;
    let lease = lease?;
    let (gc_every, gc_grace, encryption_key) = (gc_every?, gc_grace?, encryption_key?);
    let takeover_settle = takeover_settle?;
    (problems.0.len() == before).then(|| crate::dr::objstore::StoreConfig {
        endpoint: endpoint.to_owned(),
        bucket: section.bucket.clone(),
        region: section
            .region
            .clone()
            .unwrap_or_else(|| "us-east-1".to_owned()),
        access_key: credentials.access_key,
        secret_key: credentials.secret_key,
        allow_http: section.allow_http,
        lease,
        gc_every,
        gc_grace,
        takeover_settle,
        encryption_key,
    })
}

/// Reads the store's encryption key: 64 hex digits (256 bits), in a file only its owner can
/// read (`blkmirror store keygen` writes one).
pub fn read_store_key(path: &Path) -> Result<[u8; 32], String> {
    let meta = std::fs::metadata(path).map_err(|error| format!("{}: {error}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{} can be read by others (mode {:o}); it is the key to every point in the store: \
             chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        ));
    }
    if meta.len() > 1024 {
        return Err(format!(
            "{} is {} bytes; a key file holds 64 hex digits",
            path.display(),
            meta.len()
        ));
    }
    let text =
        std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))?;
    let digits = text.trim();
    let mut key = [0u8; 32];
    let valid = digits.len() == 64
        && digits.is_ascii()
        && key.iter_mut().enumerate().all(|(i, byte)| {
            u8::from_str_radix(&digits[2 * i..2 * i + 2], 16)
                .map(|value| *byte = value)
                .is_ok()
        });
    if !valid {
        return Err(format!(
            "{}: expected 64 hex digits (256 bits; `blkmirror store keygen --out {}` writes \
             one)",
            path.display(),
            path.display()
        ));
    }
    Ok(key)
}

/// Checks the `[[export]]` sections.
fn export_sections(
    sections: &[ExportSection],
    data_dir: &Path,
    problems: &mut Problems,
) -> Vec<crate::dr::export::ExportOptions> {
    let mut out = Vec::new();
    let mut listens = BTreeSet::new();
    for (index, section) in sections.iter().enumerate() {
        let key = |name: &str| format!("export[{index}].{name}");
        let volume = problems.check(
            &key("volume"),
            wire::check_volume_name(&section.volume).map_err(|error| error.to_string()),
        );
        let at = problems.check(
            &key("at"),
            crate::dr::ops::parse_selector(section.at.as_deref().unwrap_or("latest")).and_then(
                |at| {
                    if at == PointSelector::All {
                        Err("an export serves one point, not all".into())
                    } else {
                        Ok(at)
                    }
                },
            ),
        );
        let listen = problems.check(
            &key("listen"),
            crate::dr::export::parse_listen(&section.listen).and_then(|listen| match &listen {
                crate::dr::export::ListenAddr::Tcp(addr)
                    if !addr.ip().is_loopback() && !section.allow_remote =>
                {
                    Err(format!(
                        "{addr} is not a loopback address and NBD has no authentication: \
                             use a Unix socket or loopback, or set allow_remote = true on a \
                             trusted network"
                    ))
                }
                _ => Ok(listen),
            }),
        );
        if section.promoted && (section.at.is_some() || section.writable) {
            problems.0.push(format!(
                "{}: a promoted export serves the point its failover promoted, writable while \
                 that failover is in force: remove at and writable",
                key("promoted")
            ));
        }
        if !listens.insert(section.listen.clone()) {
            problems.0.push(format!(
                "{}: {} is used by another export",
                key("listen"),
                section.listen
            ));
        }
        if let (Some(()), Some(at), Some(listen)) = (volume, at, listen) {
            out.push(crate::dr::export::ExportOptions {
                data_dir: data_dir.to_owned(),
                volume: section.volume.clone(),
                at,
                listen,
                writable: section.writable,
                overlay_dir: None,
                allow_remote: section.allow_remote,
                promoted: section.promoted,
                store: None,
            });
        }
    }
    out
}

/// Checks the `[roles]` section: each entry a plausible Unix group name.
fn role_map(
    section: Option<&RolesSection>,
    problems: &mut Problems,
) -> crate::command::roles::RoleMap {
    let Some(section) = section else {
        return crate::command::roles::RoleMap::default();
    };
    let mut check = |key: &str, groups: &[String]| {
        for group in groups {
            let valid = !group.is_empty()
                && group.len() <= 32
                && !group.starts_with('-')
                && group
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !valid {
                problems.0.push(format!(
                    "roles.{key}: {:?} is not a Unix group name",
                    group.chars().take(40).collect::<String>()
                ));
            }
        }
        groups.to_vec()
    };
    crate::command::roles::RoleMap {
        viewer: check("viewer", &section.viewer),
        operator: check("operator", &section.operator),
        admin: check("admin", &section.admin),
    }
}

/// Checks the `[[drill]]` sections.
fn drill_schedules(sections: &[DrillSection], problems: &mut Problems) -> Vec<DrillSchedule> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (index, section) in sections.iter().enumerate() {
        let key = |name: &str| format!("drill[{index}].{name}");
        if let Err(error) = wire::check_volume_name(&section.volume) {
            problems.0.push(format!("{}: {error}", key("volume")));
        } else if !seen.insert(section.volume.clone()) {
            problems.0.push(format!(
                "{}: volume {} has two drill schedules",
                key("volume"),
                section.volume
            ));
        }
        let every = problems.check(
            &key("every"),
            units::parse_duration(&section.every).and_then(|every| {
                if every < MIN_DRILL_EVERY {
                    Err(format!(
                        "{every:?} is shorter than {MIN_DRILL_EVERY:?}; a drill attaches, checks \
                         and mounts a whole volume"
                    ))
                } else {
                    Ok(every)
                }
            }),
        );
        let at = problems.check(
            &key("at"),
            crate::dr::ops::parse_selector(section.at.as_deref().unwrap_or("latest")).and_then(
                |at| {
                    if at == PointSelector::All {
                        Err("a drill proves one point, not all".into())
                    } else {
                        Ok(at)
                    }
                },
            ),
        );
        if section
            .check
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            problems.0.push(format!(
                "{}: empty; leave it out for no check",
                key("check")
            ));
        }
        let check_timeout = problems.check(
            &key("check_timeout"),
            units::parse_duration(section.check_timeout.as_deref().unwrap_or("10m")),
        );
        let boot = drill_boot(section, &key, problems);
        if let (Some(every), Some(at), Some(check_timeout), Some(boot)) =
            (every, at, check_timeout, boot)
        {
            out.push(DrillSchedule {
                volume: section.volume.clone(),
                every,
                at,
                check: section.check.clone(),
                check_timeout,
                boot,
            });
        }
    }
    out
}

/// The boot of a `[[drill]]` section: `Some(None)` without `boot`, `None` after a problem.
fn drill_boot(
    section: &DrillSection,
    key: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<Option<crate::dr::recovery::BootOptions>> {
    use crate::dr::recovery::{BootAccel, BootOptions};
    let Some(kernel) = &section.boot else {
        let stray = [
            ("boot_initrd", section.boot_initrd.is_some()),
            ("boot_append", section.boot_append.is_some()),
            ("boot_healthy", section.boot_healthy.is_some()),
            ("boot_timeout", section.boot_timeout.is_some()),
            ("boot_accel", section.boot_accel.is_some()),
            ("boot_memory", section.boot_memory.is_some()),
        ];
        let mut ok = true;
        for (name, present) in stray {
            if present {
                problems.0.push(format!("{}: only with boot", key(name)));
                ok = false;
            }
        }
        return ok.then_some(None);
    };
    let timeout = problems.check(
        &key("boot_timeout"),
        units::parse_duration(section.boot_timeout.as_deref().unwrap_or("5m")),
    );
    let accel = problems.check(
        &key("boot_accel"),
        enum_value::<BootAccel>(section.boot_accel.as_deref().unwrap_or("auto")),
    );
    let healthy = section
        .boot_healthy
        .clone()
        .unwrap_or_else(|| "login:".into());
    if healthy.is_empty() {
        problems.0.push(format!(
            "{}: empty: the drill would pass at once",
            key("boot_healthy")
        ));
        return None;
    }
    let memory_mib = section.boot_memory.unwrap_or(1024);
    if !(128..=65536).contains(&memory_mib) {
        problems.0.push(format!(
            "{}: {memory_mib} MiB (128 to 65536)",
            key("boot_memory")
        ));
        return None;
    }
    Some(Some(BootOptions {
        kernel: kernel.clone(),
        initrd: section.boot_initrd.clone(),
        append: section
            .boot_append
            .clone()
            .unwrap_or_else(|| BootOptions::default_append().to_owned()),
        healthy,
        timeout: timeout?,
        accel: accel?,
        memory_mib,
    }))
}

/// Reads and checks an agent configuration file.
pub fn load_agent(path: &Path) -> Result<AgentSettings, ConfigError> {
    agent_from_str(path, &read(path)?)
}

/// Reads and checks a receiver configuration file.
pub fn load_receiver(path: &Path) -> Result<ReceiverSettings, ConfigError> {
    receiver_from_str(path, &read(path)?)
}

/// What kind of file `blkmirror config check` was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConfigKind {
    /// `agent.toml`.
    Agent,
    /// `receiver.toml`.
    Receiver,
}

/// `blkmirror config check`: returns a summary of a valid file.
pub fn check_file(path: &Path, kind: Option<ConfigKind>) -> Result<String, ConfigError> {
    let text = read(path)?;
    let kind = match kind {
        Some(kind) => kind,
        None => {
            let table: toml::Table = parse_toml(path, &text)?;
            if table.contains_key("device") || table.contains_key("receiver") {
                ConfigKind::Agent
            } else if table.contains_key("agent") || table.contains_key("retention") {
                ConfigKind::Receiver
            } else {
                return Err(ConfigError {
                    path: path.to_owned(),
                    problems: vec![
                        "neither an agent file ([receiver], [[device]]) nor a receiver file \
                         ([[agent]]); say which with --kind"
                            .into(),
                    ],
                });
            }
        }
    };
    Ok(match kind {
        ConfigKind::Agent => {
            let settings = agent_from_str(path, &text)?;
            format!(
                "{}: valid agent configuration: {} device(s) ({}) to {}",
                path.display(),
                settings.devices.len(),
                settings
                    .devices
                    .iter()
                    .map(|d| format!("{} as {}", d.device.display(), d.volume))
                    .collect::<Vec<_>>()
                    .join(", "),
                settings.receiver
            )
        }
        ConfigKind::Receiver => {
            let settings = receiver_from_str(path, &text)?;
            let store = match &settings.store {
                None => String::new(),
                Some(store) => {
                    let reached = check_store_reachable(store).map_err(|problem| ConfigError {
                        path: path.to_owned(),
                        problems: vec![format!("store: {problem}")],
                    })?;
                    format!("; {reached}")
                }
            };
            format!(
                "{}: valid receiver configuration: listening on {}, {} agent(s), data in {}{store}",
                path.display(),
                settings.listen,
                settings.allow.len(),
                settings.data_dir.display()
            )
        }
    })
}

/// How long `config check` waits for the object store.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// Reaches the store of `[store]`: lists the volumes with points in its bucket (which needs
/// the endpoint, the credentials and the bucket all to be right).
fn check_store_reachable(store: &crate::dr::objstore::StoreConfig) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("starting a runtime: {error}"))?;
    let started = std::time::Instant::now();
    let (volumes, elapsed, encrypted) = runtime.block_on(async {
        let client = crate::dr::objstore::ObjectStoreClient::connect(store)
            .map_err(|error| error.to_string())?;
        let in_bucket = |error: crate::dr::objpoints::PointStoreError| {
            format!("bucket {} at {}: {error}", store.bucket, store.endpoint)
        };
        let timed_out = |_| {
            format!(
                "{} did not answer within {} s",
                store.endpoint,
                STORE_CHECK_TIMEOUT.as_secs()
            )
        };
        let volumes = tokio::time::timeout(
            STORE_CHECK_TIMEOUT,
            crate::dr::objpoints::list_volumes(&client),
        )
        .await
        .map_err(timed_out)?
        .map_err(in_bucket)?;
        let elapsed = started.elapsed();
        // The key (or its absence) against the store's record of its chunks' encryption.
        let encrypted = tokio::time::timeout(
            STORE_CHECK_TIMEOUT,
            crate::dr::objpoints::check_sealing(&client, false),
        )
        .await
        .map_err(timed_out)?
        .map_err(in_bucket)?;
        Ok::<_, String>((volumes, elapsed, encrypted))
    })?;
    Ok(format!(
        "object store {} bucket {} reachable in {} ms, {} volume(s) with points there, {}",
        store.endpoint,
        store.bucket,
        elapsed.as_millis(),
        volumes.len(),
        match (encrypted, store.encryption_key.is_some()) {
            (true, _) => "chunks encrypted with this key",
            (false, true) => "no chunk yet: the first publish makes it an encrypted store",
            (false, false) => "chunks in the clear",
        }
    ))
}

/// The receiver's default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/blkmirror/receiver";

/// A `completion_log` setting: `auto`, or a ring buffer size per CPU (256 KiB to 256 MiB),
/// as KiB.
pub fn parse_completion_log(text: &str) -> Result<Option<u64>, String> {
    Ok(parse_completion_log_arg(text)?.0)
}

/// `--completion-log` (a type of its own: for clap, an `Option` field means a flag that may be
/// left out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletionLogArg(pub Option<u64>);

/// Parses `--completion-log` as [`parse_completion_log`] does.
pub fn parse_completion_log_arg(text: &str) -> Result<CompletionLogArg, String> {
    if text == "auto" {
        return Ok(CompletionLogArg(None));
    }
    let kib = units::parse_size(text)?.div_ceil(1024);
    let range = crate::tracker::completion_log::SETTING_KB_PER_CPU;
    if range.contains(&kib) {
        Ok(CompletionLogArg(Some(kib)))
    } else {
        Err(format!(
            "{text} is not \"auto\" or a size per CPU from 256KiB to 256MiB"
        ))
    }
}

/// A rate as operators write it (`50MiB` or `50MiB/s`), at least 64 KiB/s.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let rate = units::parse_size(text.strip_suffix("/s").unwrap_or(text))?;
    if rate < 64 * 1024 {
        return Err(format!("rate {text:?} is below the minimum of 64KiB/s"));
    }
    Ok(rate)
}

/// An interval as operators write it (`60s`, `500ms`), at least 1 ms.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = units::parse_duration(text)?;
    if interval < Duration::from_millis(1) {
        return Err(format!("interval {text:?} is too short (at least 1ms)"));
    }
    Ok(interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn agent(text: &str) -> Result<AgentSettings, ConfigError> {
        agent_from_str(Path::new("agent.toml"), text)
    }

    #[test]
    fn the_example_files_are_refused_until_edited_then_valid() {
        let agent_example = include_str!("../../../packaging/agent.toml");
        let error = agent_from_str(Path::new("agent.toml"), agent_example).unwrap_err();
        assert!(
            error.to_string().contains("receiver.fingerprint"),
            "{error}"
        );
        let edited = agent_example.replace("REPLACE-WITH-THE-RECEIVER-FINGERPRINT", FP);
        let settings = agent_from_str(Path::new("agent.toml"), &edited).unwrap();
        assert!(!settings.devices.is_empty());
        let receiver_example = include_str!("../../../packaging/receiver.toml");
        assert!(receiver_from_str(Path::new("receiver.toml"), receiver_example).is_err());
        let edited = receiver_example.replace("REPLACE-WITH-THE-AGENT-FINGERPRINT", FP);
        let settings = receiver_from_str(Path::new("receiver.toml"), &edited).unwrap();
        assert_eq!(settings.retention, RetentionPolicy::default());
    }

    #[test]
    fn a_full_agent_file_maps_every_key() {
        let settings = agent(&format!(
            r#"
identity = "/etc/blkmirror/identity"
state_dir = "/var/lib/blkmirror/agent"
metrics_listen = "127.0.0.1:9464"
[receiver]
address = "dr.example:7443"
fingerprint = "{FP}"
[[device]]
path = "/dev/vdb"
volume = "db"
interval = "30s"
max_rate = "50MiB/s"
chunk_size = "128KiB"
hooks = "raw"
streams = 8
queue_depth = 64
reader = "pread"
compression = "off"
freeze = "off"
freeze_budget = "1s"
window = "16MiB"
congestion = "bbr"
sync_step = "1GiB"
completion_log = "8MiB"
[[device]]
path = "/dev/vdc"
volume = "logs"
"#
        ))
        .unwrap();
        let db = &settings.devices[0];
        assert_eq!(db.interval, Duration::from_secs(30));
        assert_eq!(db.max_rate, Some(50 << 20));
        assert_eq!(db.chunk_size, 128 << 10);
        assert_eq!(db.hooks, HookChoice::Raw);
        assert_eq!((db.streams, db.queue_depth), (8, 64));
        assert_eq!(db.reader, Engine::Pread);
        assert_eq!(db.compression, Compression::Off);
        assert_eq!(db.freeze, FreezeMode::Off);
        assert_eq!(db.window, 16 << 20);
        assert_eq!(db.congestion, Congestion::Bbr);
        assert_eq!(db.sync_step, 1 << 30);
        assert_eq!(db.completion_log_kib, Some(8 << 10));
        let logs = &settings.devices[1];
        assert_eq!(logs.completion_log_kib, None);
        assert_eq!(logs.congestion, Congestion::FilteredCubic);
        assert_eq!(logs.interval, Duration::from_secs(60));
        assert_eq!(logs.chunk_size, 64 << 10);
        assert_eq!(
            settings.metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
    }

    #[test]
    fn problems_name_the_key_and_what_was_expected() {
        let error = agent(&format!(
            r#"
identity = "/x"
[receiver]
address = "nohost"
fingerprint = "{FP}"
[[device]]
path = "/dev/vdb"
volume = "db"
interval = "soon"
max_rate = "1KiB"
chunk_size = "3000"
hooks = "magic"
congestion = "vegas"
streams = 99
completion_log = "64KiB"
consistency_group = "app"
[[device]]
path = "/dev/vdb"
volume = "db"
"#
        ))
        .unwrap_err()
        .to_string();
        for expected in [
            "receiver.address",
            "device[0].interval",
            "device[0].max_rate",
            "device[0].chunk_size",
            "device[0].hooks: \"magic\" is not one of",
            "device[0].congestion: \"vegas\" is not one of cubic, newreno, bbr, filtered-cubic",
            "device[0].streams",
            "device[0].completion_log: 64KiB is not \"auto\" or a size per CPU from 256KiB",
            "device[1].volume: volume \"db\" is named twice",
            "device[1].path",
        ] {
            assert!(
                error.contains(expected),
                "missing {expected:?} in:\n{error}"
            );
        }
        assert!(error.starts_with("agent.toml: "), "{error}");
        // Unknown keys and wrong types are reported by the parser with line and key.
        let error = agent("identity = \"/x\"\nfrobnicate = 1\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("frobnicate"), "{error}");
        let error = agent(&format!(
            "identity = \"/x\"\n[receiver]\naddress = \"a:1\"\nfingerprint = \"{FP}\"\n[[device]]\npath = \"/d\"\nvolume = \"v\"\nstreams = \"four\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("streams") && error.contains("line 8"),
            "{error}"
        );
    }

    #[test]
    fn consistency_groups_need_two_members_with_one_interval_and_freezing() {
        let head =
            format!("identity = \"/x\"\n[receiver]\naddress = \"a:1\"\nfingerprint = \"{FP}\"\n");
        let device = |path: &str, volume: &str, extra: &str| {
            format!(
                "[[device]]\npath = \"{path}\"\nvolume = \"{volume}\"\nconsistency_group = \"app\"\n{extra}"
            )
        };
        let alone = agent(&format!("{head}{}", device("/d1", "db", "")))
            .unwrap_err()
            .to_string();
        assert!(alone.contains("has only volume db"), "{alone}");
        let mixed = agent(&format!(
            "{head}{}{}",
            device("/d1", "db", "interval = \"10s\"\n"),
            device("/d2", "wal", "freeze = \"off\"\n")
        ))
        .unwrap_err()
        .to_string();
        assert!(mixed.contains("must share one interval"), "{mixed}");
        assert!(mixed.contains("device[1].freeze"), "{mixed}");
        let good = agent(&format!(
            "{head}{}{}",
            device("/d1", "db", ""),
            device("/d2", "wal", "")
        ))
        .unwrap();
        assert!(
            good.devices
                .iter()
                .all(|d| d.consistency_group.as_deref() == Some("app"))
        );
    }

    #[test]
    fn receiver_files_are_checked() {
        let path = Path::new("receiver.toml");
        let settings = receiver_from_str(
            path,
            &format!(
                "identity = \"/id\"\nlisten = \"0.0.0.0:7443\"\n[retention]\nall = \"2h\"\n[[agent]]\nfingerprint = \"{FP}\"\nvolumes = [\"db\", \"logs\"]\n"
            ),
        )
        .unwrap();
        assert_eq!(settings.allow, vec![format!("{FP}=db,logs")]);
        assert_eq!(settings.retention.all, Duration::from_secs(7200));
        let error = receiver_from_str(
            path,
            "identity = \"/id\"\nlisten = \"everywhere\"\n[[agent]]\nfingerprint = \"xyz\"\nvolumes = [\"../etc\"]\n",
        )
        .unwrap_err()
        .to_string();
        for expected in ["listen:", "agent[0].fingerprint", "agent[0].volumes"] {
            assert!(
                error.contains(expected),
                "missing {expected:?} in:\n{error}"
            );
        }
    }

    #[test]
    fn the_store_section_is_checked_and_its_secret_must_be_roots_alone() {
        let dir =
            std::env::temp_dir().join(format!("blkmirror-store-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let credentials = dir.join("credentials.toml");
        std::fs::write(&credentials, "access_key = \"AK\"\nsecret_key = \"SK\"\n").unwrap();
        let path = Path::new("receiver.toml");
        let head =
            format!("identity = \"/id\"\n[[agent]]\nfingerprint = \"{FP}\"\nvolumes = [\"db\"]\n");
        let with_store = |store: &str| {
            receiver_from_str(
                path,
                &format!(
                    "{head}[store]\ncredentials = \"{}\"\n{store}",
                    credentials.display()
                ),
            )
        };
        std::fs::set_permissions(&credentials, std::fs::Permissions::from_mode(0o600)).unwrap();
        let settings =
            with_store("endpoint = \"https://s3.dr.example:9000/\"\nbucket = \"dr-site\"\n")
                .unwrap();
        let store = settings.store.expect("a store");
        assert_eq!(store.endpoint, "https://s3.dr.example:9000");
        assert_eq!(store.region, "us-east-1");
        assert_eq!(
            (store.access_key.as_str(), store.secret_key.as_str()),
            ("AK", "SK")
        );
        assert!(!store.allow_http);
        // Plain HTTP only when asked for; a bucket name S3 would refuse; a key file missing.
        let error = with_store(
            "endpoint = \"http://10.0.0.5:7480\"\nbucket = \"DR_site\"\nencryption_key = \"/k\"\n",
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "store.endpoint: http://10.0.0.5:7480 is plain HTTP",
            "store.bucket: \"DR_site\"",
            "store.encryption_key: /k: No such file",
        ] {
            assert!(
                error.contains(expected),
                "missing {expected:?} in:\n{error}"
            );
        }
        assert!(
            with_store(
                "endpoint = \"http://127.0.0.1:7480\"\nbucket = \"dr\"\nallow_http = true\n"
            )
            .is_err(),
            "a 2-letter bucket"
        );
        assert!(
            with_store(
                "endpoint = \"http://127.0.0.1:7480\"\nbucket = \"dr-site\"\nallow_http = true\n"
            )
            .is_ok()
        );
        // A secret others can read, or a file that is not credentials.
        std::fs::set_permissions(&credentials, std::fs::Permissions::from_mode(0o640)).unwrap();
        let error = with_store("endpoint = \"https://s3\"\nbucket = \"dr-site\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("store.credentials:") && error.contains("chmod 600"),
            "{error}"
        );
        std::fs::set_permissions(&credentials, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&credentials, "user = \"x\"\n").unwrap();
        let error = with_store("endpoint = \"https://s3\"\nbucket = \"dr-site\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("expected access_key"), "{error}");
        std::fs::write(&credentials, "access_key = \"AK\"\nsecret_key = \"SK\"\n").unwrap();
        // Garbage collection: every 6 h with an hour's grace by default, or off; a grace a
        // publish could outlast is refused (builds with test hooks allow short ones).
        let store = |keys: &str| {
            with_store(&format!(
                "endpoint = \"https://s3\"\nbucket = \"dr-site\"\n{keys}"
            ))
        };
        let settings = store("").unwrap().store.expect("a store");
        assert_eq!(
            (settings.gc_every, settings.gc_grace),
            (
                Some(Duration::from_secs(6 * 3600)),
                Duration::from_secs(3600)
            )
        );
        let settings = store("gc_every = \"off\"\ngc_grace = \"2h\"\n")
            .unwrap()
            .store
            .expect("a store");
        assert_eq!(
            (settings.gc_every, settings.gc_grace),
            (None, Duration::from_secs(7200))
        );
        // The encryption key: 64 hex digits in a file root alone reads.
        let key = dir.join("store.key");
        std::fs::write(&key, format!("{}\n", "0f".repeat(32))).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let with_key = format!("encryption_key = \"{}\"\n", key.display());
        let settings = store(&with_key).unwrap().store.expect("a store");
        assert_eq!(settings.encryption_key, Some([0x0f; 32]));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = store(&with_key).unwrap_err().to_string();
        assert!(
            error.contains("store.encryption_key:") && error.contains("chmod 600"),
            "{error}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        for bad in ["0f".repeat(31), "zz".repeat(32), "é".repeat(32)] {
            std::fs::write(&key, &bad).unwrap();
            let error = store(&with_key).unwrap_err().to_string();
            assert!(error.contains("expected 64 hex digits"), "{bad:?}: {error}");
        }
        let error = store("gc_every = \"sometimes\"\n").unwrap_err().to_string();
        assert!(error.contains("store.gc_every:"), "{error}");
        if !cfg!(feature = "test-hooks") {
            let error = store("gc_grace = \"5m\"\n").unwrap_err().to_string();
            assert!(error.contains("store.gc_grace: 5m is under 15m"), "{error}");
            let error = store("takeover_settle = \"30s\"\n")
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("store.takeover_settle: 30s is under 2m"),
                "{error}"
            );
        }
        // Retention's settle after a take-over: 5 minutes by default, at most an hour.
        let settings = store("").unwrap().store.expect("a store");
        assert_eq!(settings.takeover_settle, Duration::from_secs(300));
        let settings = store("takeover_settle = \"10m\"\n")
            .unwrap()
            .store
            .expect("a store");
        assert_eq!(settings.takeover_settle, Duration::from_secs(600));
        let error = store("takeover_settle = \"2h\"\n").unwrap_err().to_string();
        assert!(
            error.contains("store.takeover_settle: 2h is over 1h"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn roles_name_groups_and_bad_names_are_refused_with_their_key() {
        let path = Path::new("receiver.toml");
        let head =
            format!("identity = \"/id\"\n[[agent]]\nfingerprint = \"{FP}\"\nvolumes = [\"db\"]\n");
        let settings = receiver_from_str(path, &head).unwrap();
        assert!(settings.roles.is_empty());
        let settings = receiver_from_str(
            path,
            &format!("{head}[roles]\nviewer = [\"dr-view\"]\nadmin = [\"wheel\", \"dr_admin\"]\n"),
        )
        .unwrap();
        assert_eq!(settings.roles.viewer, ["dr-view"]);
        assert!(settings.roles.operator.is_empty());
        assert_eq!(settings.roles.admin, ["wheel", "dr_admin"]);
        let error = receiver_from_str(
            path,
            &format!("{head}[roles]\noperator = [\"ops; rm -rf /\", \"\"]\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("roles.operator: \"ops; rm -rf /\" is not a Unix group name"),
            "{error}"
        );
        assert!(error.contains("roles.operator: \"\" is not"), "{error}");
        let error = receiver_from_str(path, &format!("{head}[roles]\nroot = [\"x\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field"), "{error}");
    }

    #[test]
    fn boot_drills_can_be_scheduled_and_their_keys_are_checked() {
        let path = Path::new("receiver.toml");
        let head =
            format!("identity = \"/id\"\n[[agent]]\nfingerprint = \"{FP}\"\nvolumes = [\"db\"]\n");
        let settings = receiver_from_str(
            path,
            &format!(
                "{head}[[drill]]\nvolume = \"db\"\nevery = \"7d\"\nboot = \"/boot/vmlinuz\"\nboot_initrd = \"/boot/initrd\"\nboot_healthy = \"APP-UP\"\nboot_accel = \"tcg\"\nboot_timeout = \"2m\"\n"
            ),
        )
        .unwrap();
        let boot = settings.drills[0].boot.as_ref().expect("a boot drill");
        assert_eq!(boot.kernel, Path::new("/boot/vmlinuz"));
        assert_eq!(boot.initrd.as_deref(), Some(Path::new("/boot/initrd")));
        assert_eq!(boot.healthy, "APP-UP");
        assert_eq!(boot.accel, crate::dr::recovery::BootAccel::Tcg);
        assert_eq!(boot.timeout, Duration::from_secs(120));
        assert_eq!(boot.memory_mib, 1024);
        let error = receiver_from_str(
            path,
            &format!(
                "{head}[[drill]]\nvolume = \"db\"\nevery = \"7d\"\nboot_healthy = \"x\"\n[[drill]]\nvolume = \"logs\"\nevery = \"1d\"\nboot = \"/k\"\nboot_accel = \"xen\"\nboot_memory = 4\n"
            ),
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "drill[0].boot_healthy: only with boot",
            "drill[1].boot_accel: \"xen\" is not one of auto, kvm, tcg",
        ] {
            assert!(
                error.contains(expected),
                "missing {expected:?} in:\n{error}"
            );
        }
    }

    #[test]
    fn exports_are_checked_and_a_remote_one_needs_allow_remote() {
        let path = Path::new("receiver.toml");
        let head = format!(
            "identity = \"/id\"\ndata_dir = \"/d\"\n[[agent]]\nfingerprint = \"{FP}\"\nvolumes = [\"db\"]\n"
        );
        let settings = receiver_from_str(
            path,
            &format!(
                "{head}[[export]]\nvolume = \"db\"\nlisten = \"unix:/run/db.sock\"\n[[export]]\nvolume = \"db\"\nat = \"seq:4\"\nlisten = \"10.0.0.1:10809\"\nallow_remote = true\nwritable = true\n"
            ),
        )
        .unwrap();
        assert_eq!(settings.exports.len(), 2);
        assert_eq!(settings.exports[0].data_dir, Path::new("/d"));
        assert_eq!(settings.exports[1].at, PointSelector::Seq(4));
        assert!(settings.exports[1].writable);
        assert!(!settings.exports[1].promoted);
        let settings = receiver_from_str(
            path,
            &format!(
                "{head}[[export]]\nvolume = \"db\"\nlisten = \"unix:/run/p.sock\"\npromoted = true\n"
            ),
        )
        .unwrap();
        assert!(settings.exports[0].promoted);
        let error = receiver_from_str(
            path,
            &format!(
                "{head}[[export]]\nvolume = \"db\"\nlisten = \"unix:/run/p.sock\"\npromoted = true\nwritable = true\n"
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("export[0].promoted"), "{error}");
        let error = receiver_from_str(
            path,
            &format!(
                "{head}[[export]]\nvolume = \"../x\"\nat = \"all\"\nlisten = \"10.0.0.1:10809\"\n[[export]]\nvolume = \"db\"\nlisten = \"10.0.0.1:10809\"\nallow_remote = true\n"
            ),
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "export[0].volume",
            "export[0].at: an export serves one point",
            "export[0].listen: 10.0.0.1:10809 is not a loopback address",
            "export[1].listen: 10.0.0.1:10809 is used by another export",
        ] {
            assert!(
                error.contains(expected),
                "missing {expected:?} in:\n{error}"
            );
        }
    }

    #[test]
    fn drill_schedules_are_checked() {
        let path = Path::new("receiver.toml");
        let head =
            format!("identity = \"/id\"\n[[agent]]\nfingerprint = \"{FP}\"\nvolumes = [\"db\"]\n");
        let settings = receiver_from_str(
            path,
            &format!(
                "{head}[[drill]]\nvolume = \"db\"\nevery = \"7d\"\ncheck = \"test -d etc\"\n[[drill]]\nvolume = \"logs\"\nevery = \"1h\"\nat = \"seq:4\"\ncheck_timeout = \"30s\"\n"
            ),
        )
        .unwrap();
        assert_eq!(
            settings.drills,
            vec![
                DrillSchedule {
                    volume: "db".into(),
                    every: Duration::from_secs(7 * 86400),
                    at: PointSelector::Latest,
                    check: Some("test -d etc".into()),
                    check_timeout: Duration::from_secs(600),
                    boot: None,
                },
                DrillSchedule {
                    volume: "logs".into(),
                    every: Duration::from_secs(3600),
                    at: PointSelector::Seq(4),
                    check: None,
                    check_timeout: Duration::from_secs(30),
                    boot: None,
                },
            ]
        );
        let error = receiver_from_str(
            path,
            &format!(
                "{head}[[drill]]\nvolume = \"../x\"\nevery = \"5s\"\nat = \"all\"\ncheck = \" \"\n[[drill]]\nvolume = \"db\"\nevery = \"soon\"\n[[drill]]\nvolume = \"db\"\nevery = \"1d\"\ncheck_timeout = \"x\"\n"
            ),
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "drill[0].volume",
            "drill[0].every: 5s is shorter",
            "drill[0].at: a drill proves one point",
            "drill[0].check: empty",
            "drill[1].every",
            "drill[2].volume: volume db has two drill schedules",
            "drill[2].check_timeout",
        ] {
            assert!(
                error.contains(expected),
                "missing {expected:?} in:\n{error}"
            );
        }
    }
}
