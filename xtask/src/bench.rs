//! `cargo xtask bench tracking`: what tracking costs a write-heavy workload.
//!
//! fio 4 KiB random direct writes at iodepth 32 on a scratch loop device, alternating rounds
//! without and with `blkmirror track` attached, in one run on one machine. Reports the median
//! IOPS and p50/p99 completion latency of each side and their ratios.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use serde_json::Value;

use crate::demo::{
    Cleanup, release_binary, remove_pin_root, require_root, scratch_loop, scratch_space,
};

#[derive(Subcommand)]
pub enum Which {
    /// Write overhead of change tracking (fio, with vs. without the tracker).
    Tracking {
        /// Seconds per fio round.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Rounds per side (alternating).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Hook sets to measure, each against the same baselines (comma separated).
        #[arg(long, value_delimiter = ',', default_value = "raw,classic,both")]
        hooks: Vec<String>,
    },
    /// Initial sync and incremental cycles against raw device reads (agent and receiver on
    /// 127.0.0.1).
    Replication {
        /// Device size in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Share of 64 KiB chunks changed per round, in permille.
        #[arg(long, default_value_t = 10)]
        change_permille: u64,
        /// Incremental rounds.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Shift each 64 KiB write by this many KiB (a multiple of 4): 4 makes every write
        /// straddle two 64 KiB chunks, as file systems' 4 KiB-aligned writes do.
        #[arg(long, default_value_t = 0)]
        write_offset_kib: u64,
        /// The agent's `--chunk-size` (the granularity of tracking and transfer).
        #[arg(long, default_value = "64KiB")]
        chunk_size: String,
    },
    /// What keeping points in time costs: cycle time and bytes kept, against a receiver that
    /// keeps only the newest point.
    Points {
        /// Device size in MiB.
        #[arg(long, default_value_t = 512)]
        size_mib: u64,
        /// Share of 64 KiB chunks changed per round, in permille.
        #[arg(long, default_value_t = 10)]
        change_permille: u64,
        /// Rounds.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
    },
    /// The link emulator's fidelity and ceiling: its throughput against a direct UDP stream,
    /// the delivered rate at a cap, the round trip and the loss, each against its setting.
    Relay {
        /// Seconds per stream.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// The recovery point (lag of the newest committed point) under a fio write load at a
    /// share of the link rate, through the link emulator: p50, p99 and max per case.
    Rpo(crate::bench_rpo::RpoCases),
    /// Initial sync and a cycle through the link emulator over a matrix of round-trip
    /// times, loss rates, link rates and congestion controllers: goodput as a fraction of
    /// the link.
    Wan(crate::bench_wan::WanMatrix),
    /// What compression buys on a disk of binaries, text, zeros and random data, through the
    /// link emulator: --compression off (the baseline), fast and auto (the level adapts).
    Compression(crate::bench_compression::CompressionCases),
    /// Instant recovery: `export` of an old point (first byte, whole read) against a full
    /// `restore` of it and a raw read of the replica image.
    Export {
        /// Device size in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Rounds of 1% changes after the exported point.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// A restore from the object store (`restore --from-store`) against the store's own bulk
    /// read of the same packs, on a Ceph cluster the benchmark starts (release build).
    Store {
        /// Volume size in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Alternating rounds (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// A receiver's view of the object store (memory, load, lookup) and a commit's map work
    /// on a large volume, each against the way it was done before, rebuilt as the baseline in
    /// the same run (release build; no store needed).
    View {
        /// Unique chunks in the store.
        #[arg(long, default_value_t = 8_000_000)]
        chunks: u64,
        /// Chunks of the committed volume (7,600,000: 500 GB in 64 KiB chunks).
        #[arg(long, default_value_t = 7_600_000)]
        volume_chunks: u64,
        /// Chunks the commit changes.
        #[arg(long, default_value_t = 256)]
        changed: u64,
    },
    /// A receiver's view of the store brought up to date from the log of added packs and the
    /// markers, against a refresh from a whole listing of packs and indexes, on a Ceph
    /// cluster the benchmark starts and fills (release build).
    Refresh {
        /// Packs of one chunk in the store.
        #[arg(long, default_value_t = 5_000)]
        packs: u64,
        /// New packs before each refresh.
        #[arg(long, default_value_t = 20)]
        added: u64,
        /// Refreshes of each kind, alternating (the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
    },
    /// Simulated agents (the real protocol over QUIC, devices in memory) replicating at once
    /// to three receivers on one Ceph cluster, one receiver killed midway: every cycle must
    /// commit and every volume's newest point equal its device; reports commits per second
    /// and the commit latency's tail (release build).
    Load {
        /// Simulated agents (volumes).
        #[arg(long, default_value_t = 200)]
        agents: u32,
        /// Cycles each commits.
        #[arg(long, default_value_t = 5)]
        cycles: u32,
        /// Volume size in MiB.
        #[arg(long, default_value_t = 16)]
        size_mib: u64,
        /// Seconds between an agent's cycles.
        #[arg(long, default_value_t = 5)]
        interval_s: u64,
        /// Where the Ceph OSDs keep their objects: `disk` (BlueStore on this machine's disk)
        /// or `memory` (MemStore: a store not bound by the disk, to measure the receivers).
        #[arg(long, default_value = "disk", value_parser = ["disk", "memory"])]
        osd_store: String,
    },
}

/// Builds the release binary, then runs the ignored test `name` of `file` (a benchmark that
/// needs the tests' harness, such as a Ceph cluster) in release, with `env`.
fn release_bench_test(file: &str, name: &str, env: &[(&str, String)]) -> Result<()> {
    crate::exec(crate::cargo().args(["build", "--locked", "--release", "-p", "blkmirror"]))?;
    let mut test = crate::cargo();
    test.args([
        "test",
        "--locked",
        "--release",
        "-p",
        "blkmirror-tests",
        "--test",
        file,
        "--",
        "--ignored",
        "--exact",
        name,
        "--nocapture",
    ]);
    for (key, value) in env {
        test.env(key, value);
    }
    crate::exec(&mut test)
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Tracking {
            seconds,
            rounds,
            hooks,
        } => tracking(seconds, rounds, &hooks),
        Which::Replication {
            size_mib,
            change_permille,
            rounds,
            write_offset_kib,
            chunk_size,
        } => crate::bench_replication::replication(
            size_mib,
            change_permille,
            rounds,
            write_offset_kib,
            &chunk_size,
        ),
        Which::Points {
            size_mib,
            change_permille,
            rounds,
        } => crate::bench_replication::points(size_mib, change_permille, rounds),
        Which::Wan(matrix) => crate::bench_wan::wan(&matrix),
        Which::Rpo(cases) => crate::bench_rpo::rpo(&cases),
        Which::Compression(cases) => crate::bench_compression::compression(&cases),
        Which::Export { size_mib, rounds } => crate::bench_export::export(size_mib, rounds),
        Which::Store { size_mib, rounds } => release_bench_test(
            "store_receivers",
            "bench_restore_from_the_store_against_its_bulk_read",
            &[
                ("BLKMIRROR_BENCH_STORE_MIB", size_mib.to_string()),
                ("BLKMIRROR_BENCH_STORE_ROUNDS", rounds.to_string()),
            ],
        ),
        Which::View {
            chunks,
            volume_chunks,
            changed,
        } => release_bench_test(
            "store",
            "bench_store_view_and_commit_map_work_against_the_layout_before",
            &[
                ("BLKMIRROR_BENCH_VIEW_CHUNKS", chunks.to_string()),
                (
                    "BLKMIRROR_BENCH_VIEW_VOLUME_CHUNKS",
                    volume_chunks.to_string(),
                ),
                ("BLKMIRROR_BENCH_VIEW_CHANGED", changed.to_string()),
            ],
        ),
        Which::Refresh {
            packs,
            added,
            rounds,
        } => release_bench_test(
            "store",
            "bench_view_refresh_from_the_log_against_a_whole_listing",
            &[
                ("BLKMIRROR_BENCH_REFRESH_PACKS", packs.to_string()),
                ("BLKMIRROR_BENCH_REFRESH_ADDED", added.to_string()),
                ("BLKMIRROR_BENCH_REFRESH_ROUNDS", rounds.to_string()),
            ],
        ),
        Which::Load {
            agents,
            cycles,
            size_mib,
            interval_s,
            osd_store,
        } => release_bench_test(
            "store_load",
            "bench_load_of_simulated_agents",
            &[
                ("BLKMIRROR_LOAD_AGENTS", agents.to_string()),
                ("BLKMIRROR_LOAD_CYCLES", cycles.to_string()),
                ("BLKMIRROR_LOAD_MIB", size_mib.to_string()),
                ("BLKMIRROR_LOAD_INTERVAL_S", interval_s.to_string()),
                ("BLKMIRROR_LOAD_OSD_STORE", osd_store),
            ],
        ),
        Which::Relay { seconds } => crate::exec(crate::cargo().args([
            "run",
            "--locked",
            "--release",
            "-p",
            "blkmirror-wan",
            "--bin",
            "wan-relay",
            "--",
            "check",
            "--seconds",
            &seconds.to_string(),
        ])),
    }
}

#[derive(Clone, Copy, Debug)]
struct FioResult {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

fn fio(device: &str, seconds: u64) -> Result<FioResult> {
    let out = run_fio(&[
        "--name=randwrite",
        &format!("--filename={device}"),
        "--rw=randwrite",
        "--bs=4k",
        "--direct=1",
        "--iodepth=32",
        "--ioengine=libaio",
        "--numjobs=1",
        "--time_based",
        &format!("--runtime={seconds}"),
        "--ramp_time=1",
        "--randrepeat=0",
        "--output-format=json",
    ])?;
    let json: Value = serde_json::from_slice(&out.stdout).context("parsing fio JSON")?;
    let write = &json["jobs"][0]["write"];
    let pct = |p: &str| {
        write["clat_ns"]["percentile"][p]
            .as_f64()
            .unwrap_or(f64::NAN)
            / 1000.0
    };
    Ok(FioResult {
        iops: write["iops"].as_f64().unwrap_or(f64::NAN),
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Total `run_time_ns` of the programs pinned under `pins`, and the completions they ran for
/// (the largest `run_cnt`: with both hooks each completion runs two programs), via bpftool.
fn hook_run_time(pins: &Path) -> Result<(f64, f64)> {
    let (mut ns, mut runs) = (0.0, 0.0);
    for dir in fs::read_dir(pins)?.flatten() {
        for prog in ["prog", "prog_raw"] {
            let path = dir.path().join(prog);
            if !path.exists() {
                continue;
            }
            let out = Command::new("bpftool")
                .args(["--json", "prog", "show", "pinned"])
                .arg(&path)
                .output()
                .context("running bpftool")?;
            let info: Value = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
            ns += info["run_time_ns"].as_f64().unwrap_or(0.0);
            runs = f64::max(runs, info["run_cnt"].as_f64().unwrap_or(0.0));
        }
    }
    Ok((ns, runs))
}

/// Runs fio with `args`; fails with its stderr if it fails.
fn run_fio(args: &[&str]) -> Result<std::process::Output> {
    let out = Command::new("fio")
        .args(args)
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn tracking(seconds: u64, rounds: u32, hooks: &[String]) -> Result<()> {
    require_root()?;
    for hook in hooks {
        if !["raw", "both", "classic"].contains(&hook.as_str()) {
            bail!("unknown hook set {hook:?}: use raw, both or classic");
        }
    }
    let binary = release_binary()?;
    let mut cleanup = Cleanup::new();
    let (dir, pins) = scratch_space(&mut cleanup, "bench")?;
    let device = scratch_loop(&mut cleanup, &dir, 1 << 30)?;
    // Direct IO on the backing file keeps the loop device out of the page cache, which makes
    // rounds comparable.
    let _ = Command::new("losetup")
        .args(["--direct-io=on", &device])
        .status();
    let state = dir.join("state");
    // Fill the device once: the first writes to a sparse backing file allocate its blocks and
    // would make whichever side runs first look slow.
    eprintln!("bench: filling the device once");
    run_fio(&[
        "--name=fill",
        &format!("--filename={device}"),
        "--rw=write",
        "--bs=1M",
        "--direct=1",
        "--ioengine=libaio",
        "--iodepth=8",
        "--size=100%",
    ])?;

    // Interleaved: baseline, then each hook set, per round, so that drift hits all alike.
    let mut base = Vec::new();
    let mut tracked: Vec<Vec<FioResult>> = vec![Vec::new(); hooks.len()];
    for round in 1..=rounds {
        eprintln!("bench: round {round}/{rounds}: baseline");
        base.push(fio(&device, seconds)?);
        for (i, hook) in hooks.iter().enumerate() {
            eprintln!("bench: round {round}/{rounds}: with blkmirror track --hooks {hook}");
            let mut tracker = start_tracker(&binary, &device, &pins, &state, hook)?;
            let result = fio(&device, seconds);
            let _ = tracker.kill();
            let _ = tracker.wait();
            remove_pin_root(&pins);
            tracked[i].push(result?);
        }
    }
    // A separate pass with the kernel's BPF run-time statistics on (they cost a little
    // themselves, so they stay off while fio is timed): nanoseconds spent in the hooks per
    // completion, a figure the machine's noise hardly moves.
    let mut hook_cost = Vec::new();
    let stats_before = fs::read_to_string(BPF_STATS).unwrap_or_else(|_| "0".into());
    fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
    cleanup.push("restore kernel.bpf_stats_enabled", move || {
        let _ = fs::write(BPF_STATS, stats_before.trim());
    });
    for hook in hooks {
        eprintln!("bench: hook cost: --hooks {hook}");
        let mut tracker = start_tracker(&binary, &device, &pins, &state, hook)?;
        let result = fio(&device, seconds.min(5));
        let cost = hook_run_time(&pins);
        let _ = tracker.kill();
        let _ = tracker.wait();
        remove_pin_root(&pins);
        result?;
        hook_cost.push(cost?);
    }
    let _ = fs::write(BPF_STATS, "0");

    let summarize = |results: &[FioResult]| FioResult {
        iops: median(results.iter().map(|r| r.iops).collect()),
        p50_us: median(results.iter().map(|r| r.p50_us).collect()),
        p99_us: median(results.iter().map(|r| r.p99_us).collect()),
    };
    let b = summarize(&base);
    let kernel = crate::setup::run_quiet("uname", &["-r"]).unwrap_or_default();
    println!(
        "## bench tracking: fio 4 KiB randwrite, direct, iodepth 32, libaio, on a 1 GiB loop \
         device (direct-io); {rounds} interleaved rounds of {seconds} s per side, medians; \
         kernel {}",
        kernel.trim()
    );
    println!();
    println!("| | IOPS | p50 (us) | p99 (us) | IOPS ratio | p99 ratio |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| baseline (no tracking) | {:.0} | {:.1} | {:.1} | 1 | 1 |",
        b.iops, b.p50_us, b.p99_us
    );
    for (hook, results) in hooks.iter().zip(&tracked) {
        let t = summarize(results);
        println!(
            "| `track --hooks {hook}` (64 KiB chunks, 1 s cuts) | {:.0} | {:.1} | {:.1} | {:.3} | {:.3} |",
            t.iops,
            t.p50_us,
            t.p99_us,
            t.iops / b.iops,
            t.p99_us / b.p99_us
        );
    }
    println!();
    println!(
        "| hook set | ns in the hooks per completion | share of one CPU at the baseline IOPS |"
    );
    println!("|---|---:|---:|");
    for (hook, (ns, runs)) in hooks.iter().zip(&hook_cost) {
        let per = ns / runs.max(1.0);
        println!(
            "| `{hook}` | {per:.0} | {:.2}% |",
            per * b.iops / 1e9 * 100.0
        );
    }
    println!();
    println!("Targets: IOPS ratio >= 0.98, p99 ratio <= 1.02.");
    println!(
        "Baseline spread over rounds (IOPS): {:.0} .. {:.0}",
        base.iter().map(|r| r.iops).fold(f64::INFINITY, f64::min),
        base.iter().map(|r| r.iops).fold(0.0, f64::max)
    );
    println!(
        "Reproduce: sudo cargo xtask bench tracking --seconds {seconds} --rounds {rounds} --hooks {}",
        hooks.join(",")
    );
    Ok(())
}

fn start_tracker(
    binary: &Path,
    device: &str,
    pins: &Path,
    state: &Path,
    hooks: &str,
) -> Result<std::process::Child> {
    let mut child = Command::new(binary)
        .args([
            "track",
            device,
            "--interval",
            "1s",
            "--json",
            "--hooks",
            hooks,
        ])
        .arg("--pin-root")
        .arg(pins)
        .arg("--state-dir")
        .arg(state)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting blkmirror track")?;
    // Wait until the program is attached (its link is pinned).
    for _ in 0..100 {
        let attached = |entry: &fs::DirEntry| {
            ["link", "link_raw"]
                .iter()
                .any(|link| entry.path().join(link).exists())
        };
        if fs::read_dir(pins).is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| attached(&e)))) {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("blkmirror track exited early: {status}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("blkmirror track did not attach within 5 s")
}
