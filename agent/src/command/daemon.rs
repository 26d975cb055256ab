//! The long-running agent and receiver processes: one replication loop per protected device
//! (each on its own thread and runtime, so a slow device cannot starve another), the control
//! socket, metrics, and systemd notifications around them.

use sd_notify::NotifyState;
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    command::config::{AgentSettings, DeviceSettings, ReceiverSettings},
    command::exit::{ExitCode, fail},
    command::service,
    command::status::{self, StatusBoard, VolumeState},
    dr::receiver::{self, ReceiverConfig},
    dr::volume,
    link::identity::Identity,
    source::agent::{Agent, AgentConfig},
    source::group::{ConsistencyGroup, FsFreezer},
    tracker::track::{self, TrackOptions},
};

/// A loop that has ended (or never started) counts as alive for the watchdog.
const ENDED: u64 = u64::MAX;
/// A loop that has not ticked for this long is stuck: the watchdog stops pinging.
const STUCK_MS: u64 = 30_000;

/// Runs the agent for every configured device until all loops end.
pub fn run_agents(settings: AgentSettings) -> ExitCode {
    for device in &settings.devices {
        if let Err(error) = track::chunk_shift(device.chunk_size) {
            return fail(ExitCode::Usage, error);
        }
        if let Err(error) = blkmirror_protocol::wire::check_volume_name(&device.volume) {
            return fail(ExitCode::Usage, error);
        }
    }
    let identity = match Identity::load(&settings.identity) {
        Ok(identity) => identity,
        Err(error) => return fail(ExitCode::Usage, error),
    };
    match track::prepare_environment() {
        Ok(notes) => notes
            .iter()
            .for_each(|note| tracing::info!(target: "blkmirror", "{note}")),
        Err(error) => return fail(ExitCode::from(&error), error),
    }
    let (runtime, shutdown) = match runtime_with_signals() {
        Ok(runtime) => runtime,
        Err(error) => return fail(ExitCode::Failure, error),
    };
    let board = Arc::new(StatusBoard::new("agent"));
    let _guard = runtime.enter();
    if let Some(path) = &settings.control_socket
        && let Err(error) = service::serve_control(path, board.clone(), shutdown.clone(), None)
    {
        return fail(ExitCode::Environment, error);
    }
    if let Some(addr) = settings.metrics_listen
        && let Err(error) = runtime.block_on(service::serve_metrics(
            addr,
            board.clone(),
            shutdown.clone(),
        ))
    {
        return fail(ExitCode::Environment, error);
    }
    let heartbeats: Vec<Arc<AtomicU64>> = settings
        .devices
        .iter()
        .map(|_| Arc::new(AtomicU64::new(status::now_ms())))
        .collect();
    // One shared rendezvous per consistency group.
    let mut groups: BTreeMap<String, Arc<ConsistencyGroup>> = BTreeMap::new();
    for device in &settings.devices {
        let Some(name) = &device.consistency_group else {
            continue;
        };
        if groups.contains_key(name) {
            continue;
        }
        let members: Vec<&DeviceSettings> = settings
            .devices
            .iter()
            .filter(|d| d.consistency_group.as_ref() == Some(name))
            .collect();
        let budget = members
            .iter()
            .map(|d| d.freeze_budget)
            .min()
            .unwrap_or(device.freeze_budget);
        groups.insert(
            name.clone(),
            Arc::new(ConsistencyGroup::new(
                name,
                members.iter().map(|d| d.volume.clone()).collect(),
                budget,
                FsFreezer,
            )),
        );
    }
    let (opened_tx, opened_rx) = crossbeam_channel::unbounded::<bool>();
    let mut threads = Vec::new();
    for (device, heartbeat) in settings.devices.iter().zip(&heartbeats) {
        let config = AgentConfig {
            device: device.device.clone(),
            volume: device.volume.clone(),
            receiver: settings.receiver.clone(),
            receiver_fingerprint: settings.receiver_fingerprint.clone(),
            identity: identity.clone(),
            interval: device.interval,
            once: settings.once,
            max_rate: device.max_rate,
            track: TrackOptions {
                chunk_bytes: device.chunk_size,
                pin_root: settings.pin_root.clone(),
                state_dir: settings.state_dir.clone(),
                hooks: device.hooks,
                completion_log_kib_per_cpu: device.completion_log_kib,
                ..TrackOptions::default()
            },
            streams: usize::from(device.streams),
            queue_depth: device.queue_depth,
            engine: device.reader,
            compression: device.compression,
            freeze: device.freeze,
            freeze_budget: device.freeze_budget,
            window: device.window,
            congestion: device.congestion,
            sync_step: device.sync_step,
            json: settings.json,
            app_hooks: device.app_hooks.clone(),
            status: board.clone(),
            group: device
                .consistency_group
                .as_ref()
                .and_then(|name| groups.get(name).cloned()),
        };
        let shutdown = shutdown.clone();
        let heartbeat = heartbeat.clone();
        let opened = opened_tx.clone();
        let board = board.clone();
        let volume = device.volume.clone();
        let many = settings.devices.len() > 1;
        threads.push(std::thread::spawn(move || -> ExitCode {
            let code = run_one(config, shutdown, &heartbeat, &opened);
            heartbeat.store(ENDED, Ordering::SeqCst);
            if code != ExitCode::Success {
                board.update(&volume, |s| s.state = VolumeState::Failed);
                if many {
                    tracing::error!(
                        target: "blkmirror agent",
                        "volume {volume}: the agent loop ended (exit code {})",
                        code.code()
                    );
                }
            }
            code
        }));
    }
    drop(opened_tx);
    // READY once every device's tracking is attached (or failed to attach).
    let opened = opened_rx.iter().filter(|ok| *ok).count();
    if opened > 0 {
        service::notify(NotifyState::Ready);
    }
    let watchdog = {
        let heartbeats = heartbeats.clone();
        service::spawn_watchdog(
            board.clone(),
            move || {
                let now = status::now_ms();
                heartbeats.iter().all(|beat| {
                    let at = beat.load(Ordering::SeqCst);
                    at == ENDED || now.saturating_sub(at) < STUCK_MS
                })
            },
            shutdown.clone(),
        )
    };
    let mut code = ExitCode::Success;
    for thread in threads {
        code = code.first_failure(thread.join().unwrap_or(ExitCode::Failure));
    }
    service::notify(NotifyState::Stopping);
    watchdog.abort();
    code
}

/// One device's loop on its own runtime; returns its exit code.
fn run_one(
    config: AgentConfig,
    shutdown: tokio::sync::watch::Receiver<bool>,
    heartbeat: &Arc<AtomicU64>,
    opened: &crossbeam_channel::Sender<bool>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = opened.send(false);
            tracing::error!(target: "blkmirror", "error: {error}");
            return ExitCode::Failure;
        }
    };
    let beat = heartbeat.clone();
    runtime.spawn(async move {
        loop {
            beat.store(status::now_ms(), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let result = runtime.block_on(async move {
        let opened_agent = tokio::task::block_in_place(|| Agent::open(config, shutdown));
        let _ = opened.send(opened_agent.is_ok());
        opened_agent?.run().await
    });
    match result {
        Ok(()) => ExitCode::Success,
        Err(error) => {
            tracing::error!(target: "blkmirror", "error: {error}");
            ExitCode::from(&error)
        }
    }
}

/// Fills the board with the volumes already in the data directory.
fn known_volumes(settings: &ReceiverSettings, board: &StatusBoard) {
    let Ok(entries) = std::fs::read_dir(&settings.data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(meta) = volume::read_meta(&crate::dr::storage::LocalDisk::shared(), &entry.path())
        else {
            continue;
        };
        board.update(&meta.volume, |s| {
            s.state = VolumeState::Idle;
            s.last_point = meta.points.last().map(status::PointSummary::from);
            s.last_consistent = meta
                .points
                .iter()
                .rev()
                .find(|p| p.consistent)
                .map(status::PointSummary::from);
        });
    }
}

/// Runs the receiver. With a configuration file, SIGHUP reloads its grants and retention.
pub fn run_receiver(settings: ReceiverSettings, config_path: Option<PathBuf>) -> ExitCode {
    let identity = match Identity::load(&settings.identity) {
        Ok(identity) => identity,
        Err(error) => return fail(ExitCode::Usage, error),
    };
    let grants = match receiver::parse_grants(&settings.allow) {
        Ok(grants) => grants,
        Err(error) => return fail(ExitCode::Usage, error),
    };
    let (runtime, shutdown) = match runtime_with_signals() {
        Ok(runtime) => runtime,
        Err(error) => return fail(ExitCode::Failure, error),
    };
    let board = Arc::new(StatusBoard::new("receiver"));
    known_volumes(&settings, &board);
    let fingerprint = identity.fingerprint();
    let publisher = match &settings.store {
        None => None,
        Some(store) => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|name| name.trim().to_owned())
                .unwrap_or_else(|_| "unknown-host".to_owned());
            let holder = format!("{host}/{}", &fingerprint.to_string()[..16]);
            match crate::dr::publish::Publisher::new(store, holder) {
                Ok(publisher) => {
                    tracing::info!(
                        target: "blkmirror receiver",
                        "publishing committed points to object store {} bucket {}",
                        store.endpoint,
                        store.bucket
                    );
                    board.set_store(publisher.health());
                    Some(Arc::new(publisher))
                }
                Err(error) => return fail(ExitCode::Usage, error),
            }
        }
    };
    // With a store, the store's grants are the ones in force (`dr::grantstore`).
    let (grants, grants_version) = match &publisher {
        None => (grants, None),
        Some(publisher) => runtime.block_on(store_grants(publisher, grants)),
    };
    let config = ReceiverConfig {
        listen: settings.listen,
        data_dir: settings.data_dir.clone(),
        identity,
        grants,
        window: settings.window,
        retention: settings.retention,
        status: board.clone(),
        publisher,
        grants_version,
    };
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    let drills = Arc::new(std::sync::Mutex::new(settings.drills.clone()));
    let roles = Arc::new(std::sync::Mutex::new(settings.roles.clone()));
    let exports = Arc::new(std::sync::Mutex::new(start_exports(&settings.exports)));
    // Registered here, before the receiver says it is listening, not when the task first
    // runs: a SIGHUP sent right after that line must reach the reload rather than end the
    // process (SIGHUP's default action). A rehearsal's root test caught the race.
    let hangups = {
        let _runtime = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    };
    runtime.spawn(reload_on_hangup(
        hangups.ok(),
        config_path,
        settings.clone(),
        reload_tx,
        drills.clone(),
        roles.clone(),
        exports.clone(),
    ));
    runtime.spawn(refresh_drills(
        settings.data_dir.clone(),
        drills,
        board.clone(),
    ));
    let result = runtime.block_on(async move {
        if let Some(path) = &settings.control_socket {
            let actions = Arc::new(crate::command::control::Actions {
                data_dir: settings.data_dir.clone(),
                roles: roles.clone(),
                exports_dir: path
                    .parent()
                    .unwrap_or_else(|| std::path::Path::new("/run/blkmirror"))
                    .join("exports"),
            });
            service::serve_control(path, board.clone(), shutdown.clone(), Some(actions))?;
        }
        if let Some(addr) = settings.metrics_listen {
            service::serve_metrics(addr, board.clone(), shutdown.clone()).await?;
        }
        let bound = receiver::bind(&config)?;
        let addr =
            bound
                .endpoint
                .local_addr()
                .map_err(|source| crate::link::net::NetError::Bind {
                    addr: config.listen,
                    source,
                })?;
        tracing::info!(
            target: "blkmirror receiver",
            "listening on {addr} (fingerprint {fingerprint}), data in {}, {} agent(s) admitted",
            config.data_dir.display(),
            config.grants.len()
        );
        service::notify(NotifyState::Ready);
        let watchdog = service::spawn_watchdog(board.clone(), || true, shutdown.clone());
        let served = receiver::serve(bound, config, shutdown, reload_rx).await;
        watchdog.abort();
        served.map_err(DaemonError::from)
    });
    service::notify(NotifyState::Stopping);
    match result {
        Ok(()) => ExitCode::Success,
        Err(DaemonError::Service(error)) => fail(ExitCode::Environment, error),
        Err(error) => fail(ExitCode::Failure, error),
    }
}

/// The grants to enforce at start with a store: the store's (seeded with `own` if it has
/// none), or `own` while the store cannot be read (the receiver keeps trying).
async fn store_grants(
    publisher: &crate::dr::publish::Publisher,
    own: receiver::Grants,
) -> (receiver::Grants, Option<u64>) {
    let seeded = tokio::time::timeout(
        Duration::from_secs(30),
        crate::dr::grantstore::seed(
            publisher.client(),
            &own,
            1,
            publisher.holder(),
            status::now_ms(),
        ),
    )
    .await
    .map_err(|_| "no answer within 30 s".to_owned())
    .and_then(|result| result.map_err(|error| error.to_string()))
    .and_then(|record| Ok((record.grants().map_err(|e| e.to_string())?, record)));
    match seeded {
        Ok((grants, record)) => {
            if grants != own {
                tracing::warn!(
                    target: "blkmirror receiver",
                    "the store's grants ({}) differ from this receiver's [[agent]] list, and \
                     are the ones in force; `blkmirror store grants --config FILE` shows both",
                    record.summary()
                );
            } else {
                tracing::info!(
                    target: "blkmirror receiver",
                    "the store's grants are in force: {}",
                    record.summary()
                );
            }
            publisher.set_grants_version(record.version);
            (grants, Some(record.version))
        }
        Err(error) => {
            tracing::warn!(
                target: "blkmirror receiver",
                "the store's grants could not be read ({error}); this receiver's [[agent]] \
                 list is in force until they can"
            );
            (own, None)
        }
    }
}

/// How often the receiver reads the volumes' drill records into its status.
const DRILL_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the status board's drill lines current: the records `blkmirror drill` writes, and
/// whether each scheduled volume is overdue.
async fn refresh_drills(
    data_dir: PathBuf,
    schedules: Arc<std::sync::Mutex<Vec<crate::command::config::DrillSchedule>>>,
    board: Arc<StatusBoard>,
) {
    loop {
        let current = schedules.lock().expect("not poisoned").clone();
        let (dir, board_ref) = (data_dir.clone(), board.clone());
        let _ = tokio::task::spawn_blocking(move || {
            for (volume, summary) in
                crate::dr::recovery::drill_summaries(&dir, &current, status::now_ms())
            {
                board_ref.update(&volume, |s| s.drill = Some(summary));
            }
        })
        .await;
        tokio::time::sleep(DRILL_REFRESH).await;
    }
}

/// On every SIGHUP, reads the configuration file again and hands the result to the receiver
/// (the drill schedules go straight to the status refresher).
async fn reload_on_hangup(
    hangups: Option<tokio::signal::unix::Signal>,
    path: Option<PathBuf>,
    running: ReceiverSettings,
    reloads: tokio::sync::mpsc::Sender<receiver::Reload>,
    drills: Arc<std::sync::Mutex<Vec<crate::command::config::DrillSchedule>>>,
    roles: Arc<std::sync::Mutex<crate::command::roles::RoleMap>>,
    exports: Arc<std::sync::Mutex<Vec<crate::dr::export::DaemonExport>>>,
) {
    let Some(mut hangups) = hangups else {
        return;
    };
    while hangups.recv().await.is_some() {
        let Some(path) = &path else {
            tracing::warn!(
                target: "blkmirror receiver",
                "SIGHUP: started without --config, nothing to reload"
            );
            continue;
        };
        let reload = crate::command::config::load_receiver(path)
            .map_err(|error| error.to_string())
            .and_then(|settings| {
                if settings.listen != running.listen
                    || settings.identity != running.identity
                    || settings.data_dir != running.data_dir
                    || settings.window != running.window
                    || settings.store != running.store
                {
                    tracing::warn!(
                        target: "blkmirror receiver",
                        "listen, identity, data_dir, window and [store] changes take effect at \
                         the next restart"
                    );
                }
                let grants = receiver::parse_grants(&settings.allow)?;
                *drills.lock().expect("not poisoned") = settings.drills.clone();
                // The socket's mode is set at start: roles added to a receiver started without
                // any take effect at the next restart.
                *roles.lock().expect("not poisoned") = settings.roles.clone();
                // Exports start again: `at = "latest"` picks the newest point now.
                let mut running = exports.lock().expect("not poisoned");
                running.clear();
                *running = start_exports(&settings.exports);
                Ok((grants, settings.retention))
            });
        if reloads.send(reload).await.is_err() {
            return;
        }
    }
}

/// Starts the `[[export]]`s; one that cannot start (no such volume or point yet, an address
/// in use) is logged and left out until the next reload.
fn start_exports(
    exports: &[crate::dr::export::ExportOptions],
) -> Vec<crate::dr::export::DaemonExport> {
    exports
        .iter()
        .filter_map(
            |options| match crate::dr::export::DaemonExport::start(options) {
                Ok(export) => {
                    tracing::info!(
                        target: "blkmirror receiver",
                        "serving volume {} at {}",
                        options.volume,
                        export.uri
                    );
                    Some(export)
                }
                Err(error) => {
                    tracing::warn!(
                        target: "blkmirror receiver",
                        "export of volume {} not started: {error} (tried again at the next reload)",
                        options.volume
                    );
                    None
                }
            },
        )
        .collect()
}

/// Errors of the receiver process.
#[derive(Debug, thiserror::Error)]
enum DaemonError {
    #[error(transparent)]
    Service(#[from] service::ServiceError),
    #[error(transparent)]
    Receiver(#[from] receiver::ReceiverError),
    #[error(transparent)]
    Net(#[from] crate::link::net::NetError),
}

/// `blkmirror status`.
pub fn run_status(socket: Option<&std::path::Path>, json: bool, watch: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(ExitCode::Failure, error),
    };
    let sockets: Vec<(std::path::PathBuf, &str)> = match socket {
        Some(path) => vec![(path.to_owned(), "agent or receiver")],
        None => vec![
            (crate::command::config::AGENT_SOCKET.into(), "agent"),
            (crate::command::config::RECEIVER_SOCKET.into(), "receiver"),
        ],
    };
    let fetch = || -> Result<Vec<status::Snapshot>, String> {
        let mut snapshots = Vec::new();
        let mut errors = Vec::new();
        for (path, role) in &sockets {
            match runtime.block_on(service::query(path, role)) {
                Ok(snapshot) => snapshots.push(snapshot),
                Err(error) => errors.push(error.to_string()),
            }
        }
        if snapshots.is_empty() {
            Err(errors.join("; "))
        } else {
            Ok(snapshots)
        }
    };
    let live = watch && !json && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut bars = live.then(|| LiveBars {
        multi: indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stdout()),
        lines: BTreeMap::new(),
    });
    loop {
        let snapshots = match fetch() {
            Ok(snapshots) => snapshots,
            Err(message) => return fail(ExitCode::Failure, message),
        };
        match &mut bars {
            Some(bars) => bars.draw(&snapshots),
            None => {
                for snapshot in &snapshots {
                    if json {
                        println!("{}", serde_json::to_string(snapshot).expect("serializes"));
                    } else {
                        print!("{}", status::render(snapshot));
                    }
                }
                if watch && !json {
                    println!("--");
                }
            }
        }
        if !watch {
            return ExitCode::Success;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `status --watch` on a terminal: one indicatif line per volume, with a progress bar while a
/// sync runs. (Not on a terminal, `--watch` prints a text frame every second instead.)
struct LiveBars {
    multi: indicatif::MultiProgress,
    lines: BTreeMap<String, indicatif::ProgressBar>,
}

impl LiveBars {
    fn draw(&mut self, snapshots: &[status::Snapshot]) {
        let plain =
            indicatif::ProgressStyle::with_template("{prefix:24!} {msg}").expect("template");
        let syncing =
            indicatif::ProgressStyle::with_template("{prefix:24!} [{bar:30}] {percent:>3}% {msg}")
                .expect("template")
                .progress_chars("#>-");
        for snapshot in snapshots {
            for volume in &snapshot.volumes {
                let key = format!("{} {}", snapshot.role, volume.volume);
                let bar = self.lines.entry(key.clone()).or_insert_with(|| {
                    let bar = self.multi.add(indicatif::ProgressBar::new(1));
                    bar.set_prefix(key.clone());
                    bar
                });
                let state = serde_json::to_value(volume.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let lag = volume
                    .lag_seconds
                    .map_or("no point yet".into(), |lag| format!("lag {lag:.0}s"));
                match &volume.sync {
                    Some(sync) => {
                        bar.set_style(syncing.clone());
                        bar.set_length(sync.total_bytes.max(1));
                        bar.set_position(sync.done_bytes);
                        bar.set_message(format!(
                            "{state}, {}/s, ETA {}",
                            blkmirror_protocol::units::format_size(volume.rate_bytes_per_s),
                            sync.eta_s.map_or("?".into(), |eta| format!("{eta}s"))
                        ));
                    }
                    None => {
                        bar.set_style(plain.clone());
                        bar.set_message(format!(
                            "{state}, {lag}, backlog {}, {} cycle(s){}",
                            blkmirror_protocol::units::format_size(volume.backlog_bytes),
                            volume.cycles_total,
                            volume
                                .last_error
                                .as_ref()
                                .map_or(String::new(), |e| format!(", last error: {e}"))
                        ));
                    }
                }
            }
        }
    }
}

/// A runtime whose SIGTERM/SIGINT set the returned flag.
///
/// The handlers are installed before this returns, so a signal sent right after the caller
/// announces itself is caught rather than taking the default action.
pub fn runtime_with_signals()
-> std::io::Result<(tokio::runtime::Runtime, tokio::sync::watch::Receiver<bool>)> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int) = runtime.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    runtime.spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("blkmirror: stopping (signal)");
        let _ = tx.send(true);
    });
    Ok((runtime, rx))
}
