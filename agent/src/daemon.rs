//! The long-running agent and receiver processes: one replication loop per protected device
//! (each on its own thread and runtime, so a slow device cannot starve another), the control
//! socket, metrics, and systemd notifications around them.

use std::{
    collections::BTreeMap,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    agent::{Agent, AgentConfig},
    cli::{agent_exit_code, exit_code, fail, runtime_with_signals},
    config::{AgentSettings, DeviceSettings, ReceiverSettings},
    group::{ConsistencyGroup, FsFreezer},
    identity::Identity,
    receiver::{self, ReceiverConfig},
    service,
    status::{self, StatusBoard, VolumeState},
    track::{self, TrackOptions},
    volume,
};

/// A loop that has ended (or never started) counts as alive for the watchdog.
const ENDED: u64 = u64::MAX;
/// A loop that has not ticked for this long is stuck: the watchdog stops pinging.
const STUCK_MS: u64 = 30_000;

/// Runs the agent for every configured device until all loops end.
pub fn run_agents(settings: AgentSettings) -> ExitCode {
    for device in &settings.devices {
        if let Err(error) = track::chunk_shift(device.chunk_size) {
            return fail(2, error);
        }
        if let Err(error) = crate::wire::check_volume_name(&device.volume) {
            return fail(2, error);
        }
    }
    let identity = match Identity::load(&settings.identity) {
        Ok(identity) => identity,
        Err(error) => return fail(2, error),
    };
    match track::prepare_environment() {
        Ok(notes) => notes.iter().for_each(|note| eprintln!("blkmirror: {note}")),
        Err(error) => return fail(exit_code(&error), error),
    }
    let (runtime, shutdown) = match runtime_with_signals() {
        Ok(runtime) => runtime,
        Err(error) => return fail(1, error),
    };
    let board = Arc::new(StatusBoard::new("agent"));
    let _guard = runtime.enter();
    if let Some(path) = &settings.control_socket
        && let Err(error) = service::serve_control(path, board.clone(), shutdown.clone())
    {
        return fail(3, error);
    }
    if let Some(addr) = settings.metrics_listen
        && let Err(error) = runtime.block_on(service::serve_metrics(
            addr,
            board.clone(),
            shutdown.clone(),
        ))
    {
        return fail(3, error);
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
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<bool>();
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
                ..TrackOptions::default()
            },
            streams: usize::from(device.streams),
            queue_depth: device.queue_depth,
            engine: device.reader,
            compression: device.compression,
            freeze: device.freeze,
            freeze_budget: device.freeze_budget,
            window: device.window,
            sync_step: device.sync_step,
            json: settings.json,
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
        threads.push(std::thread::spawn(move || -> u8 {
            let code = run_one(config, shutdown, &heartbeat, &opened);
            heartbeat.store(ENDED, Ordering::SeqCst);
            if code != 0 {
                board.update(&volume, |s| s.state = VolumeState::Failed);
                if many {
                    eprintln!(
                        "blkmirror: volume {volume}: the agent loop ended (exit code {code})"
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
        service::notify("READY=1");
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
    let mut code = 0;
    for thread in threads {
        let result = thread.join().unwrap_or(1);
        if code == 0 {
            code = result;
        }
    }
    service::notify("STOPPING=1");
    watchdog.abort();
    ExitCode::from(code)
}

/// One device's loop on its own runtime; returns its exit code.
fn run_one(
    config: AgentConfig,
    shutdown: tokio::sync::watch::Receiver<bool>,
    heartbeat: &Arc<AtomicU64>,
    opened: &std::sync::mpsc::Sender<bool>,
) -> u8 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = opened.send(false);
            eprintln!("blkmirror: error: {error}");
            return 1;
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
        Ok(()) => 0,
        Err(error) => {
            eprintln!("blkmirror: error: {error}");
            agent_exit_code(&error)
        }
    }
}

/// Fills the board with the volumes already in the data directory.
fn known_volumes(settings: &ReceiverSettings, board: &StatusBoard) {
    let Ok(entries) = std::fs::read_dir(&settings.data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(meta) = volume::read_meta(&entry.path()) else {
            continue;
        };
        board.update(&meta.volume, |s| {
            s.state = VolumeState::Idle;
            s.last_point = meta.points.last().map(|p| status::PointSummary {
                seq: p.seq,
                time_unix_ms: p.time_unix_ms,
                consistent: p.consistent,
                freeze_ms: p.freeze_ms,
            });
            s.last_consistent =
                meta.points
                    .iter()
                    .rev()
                    .find(|p| p.consistent)
                    .map(|p| status::PointSummary {
                        seq: p.seq,
                        time_unix_ms: p.time_unix_ms,
                        consistent: true,
                        freeze_ms: p.freeze_ms,
                    });
        });
    }
}

/// Runs the receiver.
pub fn run_receiver(settings: ReceiverSettings) -> ExitCode {
    let identity = match Identity::load(&settings.identity) {
        Ok(identity) => identity,
        Err(error) => return fail(2, error),
    };
    let grants = match receiver::parse_grants(&settings.allow) {
        Ok(grants) => grants,
        Err(error) => return fail(2, error),
    };
    let (runtime, shutdown) = match runtime_with_signals() {
        Ok(runtime) => runtime,
        Err(error) => return fail(1, error),
    };
    let board = Arc::new(StatusBoard::new("receiver"));
    known_volumes(&settings, &board);
    let fingerprint = identity.fingerprint();
    let config = ReceiverConfig {
        listen: settings.listen,
        data_dir: settings.data_dir.clone(),
        identity,
        grants,
        window: settings.window,
        retention: settings.retention,
        status: board.clone(),
    };
    let result = runtime.block_on(async move {
        if let Some(path) = &settings.control_socket {
            service::serve_control(path, board.clone(), shutdown.clone())?;
        }
        if let Some(addr) = settings.metrics_listen {
            service::serve_metrics(addr, board.clone(), shutdown.clone()).await?;
        }
        let endpoint = receiver::bind(&config)?;
        let addr = endpoint
            .local_addr()
            .map_err(|source| crate::net::NetError::Bind {
                addr: config.listen,
                source,
            })?;
        eprintln!(
            "blkmirror receiver: listening on {addr} (fingerprint {fingerprint}), data in {}, \
             {} agent(s) admitted",
            config.data_dir.display(),
            config.grants.len()
        );
        service::notify("READY=1");
        let watchdog = service::spawn_watchdog(board.clone(), || true, shutdown.clone());
        let served = receiver::serve(endpoint, config, shutdown).await;
        watchdog.abort();
        served.map_err(DaemonError::from)
    });
    service::notify("STOPPING=1");
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(DaemonError::Service(error)) => fail(3, error),
        Err(error) => fail(1, error),
    }
}

/// Errors of the receiver process.
#[derive(Debug, thiserror::Error)]
enum DaemonError {
    #[error(transparent)]
    Service(#[from] service::ServiceError),
    #[error(transparent)]
    Receiver(#[from] receiver::ReceiverError),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
}

/// `blkmirror status`.
pub fn run_status(socket: Option<&std::path::Path>, json: bool, watch: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(1, error),
    };
    let sockets: Vec<(std::path::PathBuf, &str)> = match socket {
        Some(path) => vec![(path.to_owned(), "agent or receiver")],
        None => vec![
            (crate::config::AGENT_SOCKET.into(), "agent"),
            (crate::config::RECEIVER_SOCKET.into(), "receiver"),
        ],
    };
    loop {
        let mut answered = 0;
        let mut errors = Vec::new();
        let mut frame = String::new();
        for (path, role) in &sockets {
            match runtime.block_on(service::query(path, role)) {
                Ok(snapshot) => {
                    answered += 1;
                    if json {
                        frame.push_str(&serde_json::to_string(&snapshot).expect("serializes"));
                        frame.push('\n');
                    } else {
                        frame.push_str(&status::render(&snapshot));
                    }
                }
                Err(error) => errors.push(error),
            }
        }
        if answered == 0 {
            let message = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            return fail(1, message);
        }
        if watch && !json {
            // Clear the screen and draw the frame: a live view with sync progress bars.
            print!("\x1b[2J\x1b[H{frame}");
        } else {
            print!("{frame}");
        }
        if !watch {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
