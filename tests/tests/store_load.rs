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
    ceph::{CephCluster, OsdStore, SECRET_KEY},
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
    /// Where the Ceph OSDs keep their objects.
    osd_store: OsdStore,
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
    let cluster = CephCluster::start_on(load.osd_store);
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
        .block_on(async {
            net::client_endpoint(
                &identity,
                &pins,
                8 << 20,
                Congestion::Cubic,
                net::PathSlot::default(),
            )
        })
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
    // CPU time at the start, of every process in the run (this one drives the agents).
    let load_pid = std::process::id();
    let cpu_of = |pid: u32| blkmirror_tests::cpu_time(pid).unwrap_or_default();
    let receiver_pids: Vec<u32> = receivers.iter().map(|(r, _)| r.pid()).collect();
    let cpu_before: Vec<Duration> = receiver_pids.iter().map(|&pid| cpu_of(pid)).collect();
    let store_before: Vec<(String, u32, Duration)> = cluster
        .daemon_pids()
        .into_iter()
        .map(|(name, pid)| (name, pid, cpu_of(pid)))
        .collect();
    let load_before = cpu_of(load_pid);
    let mut killed_cpu = Duration::ZERO;
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
        killed_cpu = cpu_of(receiver_pids[0]).saturating_sub(cpu_before[0]);
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
    let receivers_cpu = killed_cpu
        + receiver_pids[1..]
            .iter()
            .zip(&cpu_before[1..])
            .map(|(&pid, &before)| cpu_of(pid).saturating_sub(before))
            .sum::<Duration>();
    // The store's daemons whose names start with `prefix`: their CPU time during the load.
    let store_cpu = |prefix: &str| -> Duration {
        store_before
            .iter()
            .filter(|(name, _, _)| name.starts_with(prefix))
            .map(|(_, pid, before)| cpu_of(*pid).saturating_sub(*before))
            .sum()
    };
    let (osds_cpu, gateway_cpu) = (store_cpu("osd."), store_cpu("radosgw"));
    let load_cpu = cpu_of(load_pid).saturating_sub(load_before);
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
    // Where the CPU went: with every process on this machine's cores, the receivers' cost
    // per commit and per MB is what a capacity model can scale.
    let mb = data as f64 / 1e6;
    let _ = writeln!(
        out,
        "CPU during the load: receivers {:.1} s ({:.0} ms per commit, {:.0} ms per MB of chunk \
         data), OSDs {:.1} s, gateway {:.1} s, load generator (the agents) {:.1} s, over \
         {:.1} s of wall time on {} CPUs; OSDs keep objects on {:?}",
        receivers_cpu.as_secs_f64(),
        receivers_cpu.as_secs_f64() * 1e3 / commits.len().max(1) as f64,
        receivers_cpu.as_secs_f64() * 1e3 / mb.max(1e-9),
        osds_cpu.as_secs_f64(),
        gateway_cpu.as_secs_f64(),
        load_cpu.as_secs_f64(),
        elapsed.as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load.osd_store,
    );
    assert!(
        receivers_cpu > Duration::ZERO && gateway_cpu > Duration::ZERO,
        "no CPU time read for the receivers or the gateway"
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
        osd_store: OsdStore::Disk,
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
        osd_store: std::env::var("BLKMIRROR_LOAD_OSD_STORE").map_or(OsdStore::Disk, |text| {
            OsdStore::parse(&text).unwrap_or_else(|| {
                panic!("BLKMIRROR_LOAD_OSD_STORE={text}: expected disk or memory")
            })
        }),
    });
}
