//! Load: simulated agents (`blkmirror::source::loadgen`: the real protocol, QUIC and mutual
//! TLS, with devices modelled in memory) replicating many volumes at once to three receivers
//! that publish to one Ceph cluster, started by the test. One receiver is killed in the
//! middle; its agents move to the others. Every cycle commits, every volume's newest point in
//! the store equals its simulated device, and the commit latency's tail is reported.
//!
//! CI runs a reduced form (30 agents); `cargo xtask bench load` the full one (hundreds).

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use blkmirror::dr::objpoints;
use blkmirror::dr::objstore::ObjectStoreClient;
use blkmirror::link::{
    identity::{Identity, ReceiverPins},
    net::{self, Congestion},
};
use blkmirror::source::loadgen::{self, SimulatedAgent, SimulatedReport};
use blkmirror_tests::{
    Scratch,
    ceph::{CephCluster, SECRET_KEY},
    mirror::{Id, Receiver},
    require_root,
};

const BUCKET: &str = "load";
const MIB: u64 = 1 << 20;

/// The load of one run.
struct Load {
    agents: usize,
    cycles: u32,
    size: u64,
    interval: Duration,
}

fn receiver_config(
    dir: &Path,
    name: &str,
    id: &Id,
    agent: &Id,
    volumes: &[String],
    cluster: &CephCluster,
    credentials: &Path,
) -> (PathBuf, PathBuf) {
    let data = dir.join(format!("{name}-data"));
    let config = dir.join(format!("{name}.toml"));
    let list: Vec<String> = volumes.iter().map(|v| format!("\"{v}\"")).collect();
    fs::write(
        &config,
        format!(
            "identity = \"{}\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
             control_socket = \"{}\"\n\
             [[agent]]\nfingerprint = \"{}\"\nvolumes = [{}]\n\
             [store]\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\ncredentials = \"{}\"\n\
             allow_http = true\nlease = \"10s\"\ngc_every = \"off\"\n",
            id.dir.display(),
            data.display(),
            dir.join(format!("{name}.sock")).display(),
            agent.fingerprint,
            list.join(", "),
            cluster.endpoint,
            credentials.display()
        ),
    )
    .expect("receiver.toml");
    (config, data)
}

fn run_load(load: &Load) -> String {
    require_root();
    let cluster = CephCluster::start();
    cluster.create_bucket(BUCKET);
    let scratch = Scratch::new();
    let dir = &scratch.path;
    let credentials = dir.join("store-credentials.toml");
    cluster.write_credentials(&credentials, SECRET_KEY, 0o600);
    let agent_id = Id::new(dir, "agents");
    let volumes: Vec<String> = (0..load.agents).map(|i| format!("load-{i:04}")).collect();
    let receivers: Vec<(Receiver, Id)> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let id = Id::new(dir, &format!("receiver-{name}"));
            let (config, data) =
                receiver_config(dir, name, &id, &agent_id, &volumes, &cluster, &credentials);
            (Receiver::start_config(&config, &data, &id), id)
        })
        .collect();
    let addrs: Vec<std::net::SocketAddr> = receivers
        .iter()
        .map(|(r, _)| r.addr.parse().expect("an address"))
        .collect();
    let pins = ReceiverPins::parse(
        &receivers
            .iter()
            .map(|(_, id)| id.fingerprint.clone())
            .collect::<Vec<_>>()
            .join(","),
    )
    .expect("pins");
    let identity = Identity::load(&agent_id.dir).expect("the agents' identity");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (endpoint, client_config) = runtime
        .block_on(async { net::client_endpoint(&identity, &pins, 8 << 20, Congestion::Cubic) })
        .expect("an endpoint");
    // Agent i starts at receiver i % 3 and goes around the others after it.
    let agents: Vec<SimulatedAgent> = (0..load.agents)
        .map(|i| SimulatedAgent {
            volume: volumes[i].clone(),
            size: load.size,
            chunk: 64 << 10,
            cycles: load.cycles,
            changed_chunks: (4, 32),
            interval: load.interval,
            receivers: (0..3).map(|k| addrs[(i + k) % 3]).collect(),
            seed: 0x5eed_0000 + i as u64,
        })
        .collect();
    let started = Instant::now();
    let mut receivers = receivers;
    let results: Vec<Result<SimulatedReport, String>> = runtime.block_on(async {
        let endpoint = Arc::new(endpoint);
        let client_config = Arc::new(client_config);
        let mut tasks = tokio::task::JoinSet::new();
        for (i, agent) in agents.iter().cloned().enumerate() {
            let (endpoint, client_config) = (endpoint.clone(), client_config.clone());
            tasks.spawn(async move {
                // Spread the initial syncs over the first seconds.
                tokio::time::sleep(Duration::from_millis(20 * i as u64)).await;
                let report =
                    loadgen::run(&endpoint, &client_config, &agent, Duration::from_secs(300))
                        .await
                        .map_err(|error| format!("{}: {error}", agent.volume));
                (i, report)
            });
        }
        // Receiver a dies while the agents cycle; its agents go on at b and c once its leases
        // have run out.
        tokio::time::sleep(load.interval * 2 + Duration::from_millis(20 * load.agents as u64))
            .await;
        receivers[0].0.kill();
        let killed_at = started.elapsed();
        eprintln!("receiver a killed at {:.1} s", killed_at.as_secs_f64());
        let mut results: Vec<(usize, Result<SimulatedReport, String>)> = Vec::new();
        while let Some(done) = tasks.join_next().await {
            results.push(done.expect("an agent task"));
        }
        results.sort_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, r)| r).collect()
    });
    let elapsed = started.elapsed();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "agents failed: {failed:?}");
    let reports: Vec<&SimulatedReport> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    for (report, agent) in reports.iter().zip(&agents) {
        assert_eq!(
            report.commits.len(),
            agent.cycles as usize,
            "{}",
            agent.volume
        );
    }
    // Every volume's newest point in the store is its device, byte for byte, and is the
    // agent's last committed cycle.
    let store = ObjectStoreClient::connect(&cluster.store_config(BUCKET)).expect("a client");
    let checked = runtime.block_on(async {
        let view = std::sync::Arc::new(objpoints::load_view(&store).await.expect("the indexes"));
        // Volumes checked 16 at a time (one after another, the check of 200 volumes took
        // longer than their load).
        let mut in_flight = tokio::task::JoinSet::new();
        let mut pending = reports.iter().zip(&agents);
        let mut checked = 0;
        loop {
            while in_flight.len() < 16 {
                let Some((report, agent)) = pending.next() else {
                    break;
                };
                let (store, view) = (store.clone(), view.clone());
                let (volume, seq, size, chunk) = (
                    agent.volume.clone(),
                    report.committed_seq,
                    agent.size,
                    agent.chunk,
                );
                let expected = report.device.image();
                in_flight.spawn(async move {
                    let seqs = objpoints::list_points(&store, &volume)
                        .await
                        .expect("points");
                    assert_eq!(seqs.last(), Some(&seq), "{volume}");
                    let (map, _) = objpoints::read_point(&store, &volume, seq)
                        .await
                        .expect("the newest point");
                    let image = objpoints::read_image(&store, &view.locations, &map, size, chunk)
                        .await
                        .expect("its image");
                    assert!(
                        image == expected,
                        "{volume}: the store's newest point is not the device"
                    );
                });
            }
            let Some(done) = in_flight.join_next().await else {
                break;
            };
            done.expect("a volume's check");
            checked += 1;
        }
        checked
    });
    let commits: Vec<Duration> = reports.iter().flat_map(|r| r.commits.clone()).collect();
    let (p50, p95, p99, max) = loadgen::percentiles(&commits);
    let syncs: Vec<Duration> = reports.iter().map(|r| r.initial_sync).collect();
    let (sync_p50, _, sync_p99, _) = loadgen::percentiles(&syncs);
    let data: u64 = reports.iter().map(|r| r.data_bytes).sum();
    let reconnects: u32 = reports.iter().map(|r| r.reconnects).sum();
    let moved = reports.iter().filter(|r| r.reconnects > 0).count();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} simulated agents x {} cycles ({} MiB volumes, 4-31 chunks of 64 KiB a cycle, {} s \
         apart) on 3 receivers, one killed: {} commits in {:.1} s ({:.1}/s), {:.1} MB of \
         chunk data; {} agents reconnected ({} times)",
        load.agents,
        load.cycles,
        load.size / MIB,
        load.interval.as_secs_f64(),
        commits.len(),
        elapsed.as_secs_f64(),
        commits.len() as f64 / elapsed.as_secs_f64(),
        data as f64 / 1e6,
        moved,
        reconnects
    );
    let _ = writeln!(
        out,
        "commit latency (Begin to Committed, the publish to the store included): p50 {:.0} ms, \
         p95 {:.0} ms, p99 {:.0} ms, max {:.0} ms; initial sync p50 {:.0} ms, p99 {:.0} ms; \
         {checked} volumes' newest points equal their devices",
        p50.as_secs_f64() * 1e3,
        p95.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        sync_p50.as_secs_f64() * 1e3,
        sync_p99.as_secs_f64() * 1e3,
    );
    assert!(moved > 0, "no agent moved off the killed receiver");
    eprint!("{out}");
    out
}

#[test]
fn simulated_agents_on_three_receivers_all_commit_and_lose_nothing() {
    run_load(&Load {
        agents: 30,
        cycles: 4,
        size: 16 * MIB,
        interval: Duration::from_secs(1),
    });
}

/// `cargo xtask bench load --agents N --cycles C`.
#[test]
#[ignore = "a benchmark: cargo xtask bench load"]
fn bench_load_of_simulated_agents() {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    run_load(&Load {
        agents: var("BLKMIRROR_LOAD_AGENTS", 200) as usize,
        cycles: var("BLKMIRROR_LOAD_CYCLES", 5) as u32,
        size: var("BLKMIRROR_LOAD_MIB", 16) * MIB,
        interval: Duration::from_secs(var("BLKMIRROR_LOAD_INTERVAL_S", 5)),
    });
}
