//! `cargo xtask bench rpo`: the recovery point under a steady write load, the product's
//! headline number.
//!
//! A continuous agent (`--interval` as given, `--compression off`) replicates a loop device
//! through `wan-relay` (100 Mbit/s and 40 ms by default) while fio writes 64 KiB random blocks
//! to the device at a fixed share of the link rate. Every second the bench reads
//! `blkmirror status --json` and keeps `lag_seconds`, the age of the newest committed point:
//! the recovery point objective a failover at that instant would meet. It reports p50, p99 and
//! the maximum per case, with the change and ship rates and whether the agent reported
//! falling behind.
//!
//! 64 KiB writes at 64 KiB alignment dirty exactly one chunk each, so the write rate is the
//! change rate (less rewrites of the same block within an interval).

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    bench_replication::cpu_seconds,
    bench_wan::{RelayProcess, join, release_relay},
    demo::{
        Cleanup, keygen, release_binary, remove_pin_root, require_root, scratch_loop_with,
        scratch_space, start_receiver_with_pid,
    },
};

/// The cases and the link.
#[derive(clap::Args)]
pub struct RpoCases {
    /// Cycle intervals, seconds.
    #[arg(long, value_delimiter = ',', default_value = "5,60")]
    pub intervals_s: Vec<u64>,
    /// Write rates, percent of the link rate.
    #[arg(long, value_delimiter = ',', default_value = "10,50,90")]
    pub write_pct: Vec<u64>,
    /// Link rate, Mbit/s.
    #[arg(long, default_value_t = 100)]
    pub rate_mbit: u64,
    /// Round trip, ms.
    #[arg(long, default_value_t = 40)]
    pub rtt_ms: u64,
    /// Device size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Seconds sampled per case (default: the larger of 60 s and five intervals).
    #[arg(long)]
    pub seconds: Option<u64>,
}

struct ChildKill(Child);

impl Drop for ChildKill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status(binary: &Path, socket: &Path) -> Option<serde_json::Value> {
    let out = Command::new(binary)
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let snapshot: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    snapshot["volumes"].get(0).cloned()
}

struct CaseResult {
    interval_s: u64,
    write_pct: u64,
    p50: f64,
    p99: f64,
    max: f64,
    samples: usize,
    change_rate: u64,
    ship_rate: u64,
    falling_behind: bool,
    fio_bytes: u64,
    /// CPU seconds of the agent and of the receiver over the sampled window, its length, the
    /// cycles committed in it and the seconds they took.
    agent_cpu_s: f64,
    receiver_cpu_s: f64,
    window_s: f64,
    cycles: u64,
    cycle_s: f64,
}

impl CaseResult {
    /// Milliseconds of agent CPU per cycle.
    fn agent_cpu_ms_per_cycle(&self) -> f64 {
        self.agent_cpu_s * 1e3 / self.cycles.max(1) as f64
    }

    /// Milliseconds a cycle took, on average.
    fn cycle_ms(&self) -> f64 {
        self.cycle_s * 1e3 / self.cycles.max(1) as f64
    }
}

/// About a second between samples, but not exactly: sampled every second, a 1 s cycle is
/// always seen at the same phase (every sample the same lag). 37 ms more walks the phase
/// through a 1 s or 2 s cycle within the samples of a case.
const SAMPLE_PERIOD: Duration = Duration::from_millis(1037);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn rpo(cases: &RpoCases) -> Result<()> {
    require_root()?;
    let binary = release_binary()?;
    let relay_binary = release_relay()?;
    let mut cleanup = Cleanup::new();
    let (dir, pins) = scratch_space(&mut cleanup, "bench-rpo")?;
    let agent_fp = keygen(&binary, &dir.join("agent-id"))?;
    let receiver_fp = keygen(&binary, &dir.join("receiver-id"))?;
    let device = scratch_loop_with(&mut cleanup, &dir, cases.size_mib << 20, true)?;
    let link_bytes = cases.rate_mbit as f64 * 1e6 / 8.0;
    let mut results = Vec::new();
    for &interval in &cases.intervals_s {
        let seconds = cases.seconds.unwrap_or((interval * 5).max(60));
        let cell = dir.join(format!("interval-{interval}"));
        std::fs::create_dir_all(&cell)?;
        let mut cell_cleanup = Cleanup::new();
        let (receiver, receiver_pid) = start_receiver_with_pid(
            &mut cell_cleanup,
            &binary,
            &dir,
            &cell.join("data"),
            &agent_fp,
            "rpo",
            &[],
        )?;
        let relay =
            RelayProcess::start(&relay_binary, &receiver, cases.rtt_ms, 0.0, cases.rate_mbit)?;
        let socket = cell.join("agent.sock");
        let agent = ChildKill(
            Command::new(&binary)
                .args(["agent", "--device", &device, "--volume", "rpo"])
                .args(["--receiver", &relay.address])
                .args(["--receiver-fingerprint", &receiver_fp])
                .args(["--interval", &format!("{interval}s")])
                .args(["--compression", "off"])
                .arg("--control-socket")
                .arg(&socket)
                .arg("--identity")
                .arg(dir.join("agent-id"))
                .arg("--pin-root")
                .arg(&pins)
                .arg("--state-dir")
                .arg(cell.join("state"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting the agent")?,
        );
        // The initial sync (the device's unwritten blocks are zeros, sent as ranges).
        let started = Instant::now();
        loop {
            if status(&binary, &socket).is_some_and(|s| s["lag_seconds"].is_number()) {
                break;
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("the initial sync did not finish within 300 s");
            }
            thread::sleep(Duration::from_millis(500));
        }
        for &pct in &cases.write_pct {
            let rate = (link_bytes * pct as f64 / 100.0) as u64;
            eprintln!(
                "bench: interval {interval}s, fio at {pct}% of {} Mbit/s ({:.1} MB/s) for {seconds}s",
                cases.rate_mbit,
                rate as f64 / 1e6
            );
            // fio ends by itself after its runtime (also if the bench fails in between).
            let fio = Command::new("fio")
                .args([
                    "--name=rpo",
                    &format!("--filename={device}"),
                    "--rw=randwrite",
                    "--bs=64k",
                    "--direct=1",
                    "--ioengine=libaio",
                    "--iodepth=4",
                    &format!("--rate={rate}"),
                    "--time_based",
                    &format!("--runtime={}", seconds + 2),
                    "--randrepeat=0",
                    "--output-format=json",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("starting fio")?;
            // Let one interval pass so the samples see the load, not the idle lag before it.
            thread::sleep(Duration::from_secs(1));
            let mut lags = Vec::new();
            let mut last = serde_json::Value::Null;
            let agent_pid = agent.0.id().to_string();
            let receiver_pid = receiver_pid.to_string();
            let first = status(&binary, &socket).unwrap_or_default();
            let (agent_cpu, _) = cpu_seconds(&agent_pid)?;
            let (receiver_cpu, _) = cpu_seconds(&receiver_pid)?;
            let sampling = Instant::now();
            while sampling.elapsed() < Duration::from_secs(seconds) {
                let tick = Instant::now();
                if let Some(volume) = status(&binary, &socket) {
                    if let Some(lag) = volume["lag_seconds"].as_f64() {
                        lags.push(lag);
                    }
                    last = volume;
                }
                thread::sleep(SAMPLE_PERIOD.saturating_sub(tick.elapsed()));
            }
            let window_s = sampling.elapsed().as_secs_f64();
            let agent_cpu_s = cpu_seconds(&agent_pid)?.0 - agent_cpu;
            let receiver_cpu_s = cpu_seconds(&receiver_pid)?.0 - receiver_cpu;
            let counted = |name: &str| {
                last[name].as_f64().unwrap_or(0.0) - first[name].as_f64().unwrap_or(0.0)
            };
            let fio_out = fio.wait_with_output().context("fio")?;
            let fio_bytes = serde_json::from_slice::<serde_json::Value>(&fio_out.stdout)
                .ok()
                .and_then(|json| json["jobs"][0]["write"]["io_bytes"].as_u64())
                .unwrap_or(0);
            lags.sort_by(f64::total_cmp);
            let result = CaseResult {
                interval_s: interval,
                write_pct: pct,
                p50: percentile(&lags, 0.5),
                p99: percentile(&lags, 0.99),
                max: lags.last().copied().unwrap_or(f64::NAN),
                samples: lags.len(),
                change_rate: last["change_rate_bytes_per_s"].as_u64().unwrap_or(0),
                ship_rate: last["ship_rate_bytes_per_s"].as_u64().unwrap_or(0),
                falling_behind: last["falling_behind"].as_bool().unwrap_or(false),
                fio_bytes,
                agent_cpu_s,
                receiver_cpu_s,
                window_s,
                cycles: counted("cycles_total").max(0.0) as u64,
                cycle_s: counted("cycle_seconds_sum").max(0.0),
            };
            eprintln!(
                "bench: lag p50 {:.1}s p99 {:.1}s max {:.1}s ({} samples); changes {:.1} MB/s, \
                 shipped at {:.1} MB/s{}; {} cycles of {:.0} ms, agent CPU {:.0} ms a cycle, \
                 {:.0}% of a core (receiver {:.0}%)",
                result.p50,
                result.p99,
                result.max,
                result.samples,
                result.change_rate as f64 / 1e6,
                result.ship_rate as f64 / 1e6,
                if result.falling_behind {
                    ", falling behind"
                } else {
                    ""
                },
                result.cycles,
                result.cycle_ms(),
                result.agent_cpu_ms_per_cycle(),
                result.agent_cpu_s * 100.0 / result.window_s,
                result.receiver_cpu_s * 100.0 / result.window_s,
            );
            results.push(result);
            // Let the agent catch up before the next case.
            let calm = Instant::now();
            while calm.elapsed() < Duration::from_secs(120) {
                if status(&binary, &socket).is_some_and(|s| {
                    s["lag_seconds"]
                        .as_f64()
                        .is_some_and(|lag| lag < interval as f64 + 2.0)
                }) {
                    break;
                }
                thread::sleep(Duration::from_millis(500));
            }
        }
        drop(agent);
        drop(relay);
        drop(cell_cleanup);
        remove_pin_root(&pins);
    }

    println!(
        "blkmirror RPO bench: a continuous agent (--compression off) replicating a {} MiB loop \
         device through wan-relay at {} Mbit/s and {} ms while fio writes random 64 KiB blocks \
         (direct, iodepth 4) at a fixed share of the link rate; lag_seconds (age of the newest \
         committed point) sampled about every second (1.037 s) from `blkmirror status --json`.",
        cases.size_mib, cases.rate_mbit, cases.rtt_ms
    );
    println!();
    println!(
        "| interval | writes, % of link | lag p50 | lag p99 | lag max | goal (p99 <= 2 x interval + 2 s) | changes / shipped, MB/s | falling behind | samples | cycles, mean ms | agent CPU ms / cycle | agent / receiver CPU, % of a core |"
    );
    println!("|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|");
    for r in &results {
        let goal = 2.0 * r.interval_s as f64 + 2.0;
        let verdict = if r.write_pct >= 80 {
            "n/a (above 80%)".to_owned()
        } else if r.p99 <= goal {
            format!("met ({goal:.0} s)")
        } else {
            format!("NOT met ({goal:.0} s)")
        };
        println!(
            "| {} s | {}% ({:.1} MB/s written) | {:.1} s | {:.1} s | {:.1} s | {verdict} | {:.1} / {:.1} | {} | {} | {}, {:.0} | {:.0} | {:.0}% / {:.0}% |",
            r.interval_s,
            r.write_pct,
            r.fio_bytes as f64 / 1e6 / cases.seconds.unwrap_or((r.interval_s * 5).max(60)) as f64,
            r.p50,
            r.p99,
            r.max,
            r.change_rate as f64 / 1e6,
            r.ship_rate as f64 / 1e6,
            if r.falling_behind { "yes" } else { "no" },
            r.samples,
            r.cycles,
            r.cycle_ms(),
            r.agent_cpu_ms_per_cycle(),
            r.agent_cpu_s * 100.0 / r.window_s,
            r.receiver_cpu_s * 100.0 / r.window_s,
        );
    }
    println!();
    println!(
        "Reproduce: sudo cargo xtask bench rpo --intervals-s {} --write-pct {} --rate-mbit {} \
         --rtt-ms {} --size-mib {}{}",
        join(&cases.intervals_s),
        join(&cases.write_pct),
        cases.rate_mbit,
        cases.rtt_ms,
        cases.size_mib,
        cases
            .seconds
            .map(|s| format!(" --seconds {s}"))
            .unwrap_or_default()
    );
    Ok(())
}
