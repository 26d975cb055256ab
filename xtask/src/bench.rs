//! `cargo xtask bench tracking`: what tracking costs a write-heavy workload.
//!
//! fio 4 KiB random direct writes at iodepth 32 on a scratch loop device, alternating rounds
//! without and with `blkmirror track` attached, in one run on one machine. Reports the median
//! IOPS and p50/p99 completion latency of each side and their ratios.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use serde_json::Value;

use crate::demo::{Cleanup, release_binary, require_root, scratch_loop};

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
    },
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Tracking { seconds, rounds } => tracking(seconds, rounds),
    }
}

#[derive(Clone, Copy, Debug)]
struct FioResult {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

fn fio(device: &str, seconds: u64) -> Result<FioResult> {
    let out = Command::new("fio")
        .args([
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
        ])
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
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

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn tracking(seconds: u64, rounds: u32) -> Result<()> {
    require_root()?;
    let binary = release_binary()?;
    let mut cleanup = Cleanup::new();
    let dir = std::env::temp_dir().join(format!("blkmirror-bench-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let remove_dir = dir.clone();
    cleanup.push(format!("remove {}", dir.display()), move || {
        let _ = fs::remove_dir_all(&remove_dir);
    });
    let device = scratch_loop(&mut cleanup, &dir, 1 << 30)?;
    // Direct IO on the backing file keeps the loop device out of the page cache, which makes
    // rounds comparable.
    let _ = Command::new("losetup")
        .args(["--direct-io=on", &device])
        .status();
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/blkmirror-bench-{}",
        std::process::id()
    ));
    let state = dir.join("state");

    let mut base = Vec::new();
    let mut tracked = Vec::new();
    for round in 1..=rounds {
        eprintln!("bench: round {round}/{rounds}: baseline");
        base.push(fio(&device, seconds)?);
        eprintln!("bench: round {round}/{rounds}: with blkmirror track");
        let mut tracker = start_tracker(&binary, &device, &pins, &state)?;
        let result = fio(&device, seconds);
        let _ = tracker.kill();
        let _ = tracker.wait();
        untrack(&binary, &device, &pins, &state);
        tracked.push(result?);
    }
    let summarize = |results: &[FioResult]| FioResult {
        iops: median(results.iter().map(|r| r.iops).collect()),
        p50_us: median(results.iter().map(|r| r.p50_us).collect()),
        p99_us: median(results.iter().map(|r| r.p99_us).collect()),
    };
    let b = summarize(&base);
    let t = summarize(&tracked);
    let kernel = crate::setup::run_quiet("uname", &["-r"]).unwrap_or_default();
    println!(
        "## bench tracking: fio 4 KiB randwrite, direct, iodepth 32, loop device (1 GiB, direct-io), {rounds} x {seconds} s per side, medians; kernel {}",
        kernel.trim()
    );
    println!();
    println!("| | IOPS | p50 latency (us) | p99 latency (us) |");
    println!("|---|---:|---:|---:|");
    println!(
        "| baseline (no tracking) | {:.0} | {:.1} | {:.1} |",
        b.iops, b.p50_us, b.p99_us
    );
    println!(
        "| blkmirror track (64 KiB chunks, 1 s cuts) | {:.0} | {:.1} | {:.1} |",
        t.iops, t.p50_us, t.p99_us
    );
    println!(
        "| ratio tracked / baseline | {:.3} | {:.3} | {:.3} |",
        t.iops / b.iops,
        t.p50_us / b.p50_us,
        t.p99_us / b.p99_us
    );
    println!();
    println!(
        "IOPS loss {:.1}% (target <= 2%), p99 growth {:.1}% (target <= 2%)",
        (1.0 - t.iops / b.iops) * 100.0,
        (t.p99_us / b.p99_us - 1.0) * 100.0
    );
    println!("Reproduce: sudo cargo xtask bench tracking --seconds {seconds} --rounds {rounds}");
    Ok(())
}

fn start_tracker(
    binary: &Path,
    device: &str,
    pins: &Path,
    state: &Path,
) -> Result<std::process::Child> {
    let mut child = Command::new(binary)
        .args(["track", device, "--interval", "1s", "--json"])
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
        if fs::read_dir(pins)
            .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.path().join("link").exists())))
        {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("blkmirror track exited early: {status}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    bail!("blkmirror track did not attach within 5 s")
}

fn untrack(binary: &Path, device: &str, pins: &Path, state: &Path) {
    let _ = Command::new(binary)
        .args(["untrack", device])
        .arg("--pin-root")
        .arg(pins)
        .arg("--state-dir")
        .arg(state)
        .stderr(Stdio::null())
        .status();
    let _ = fs::remove_dir(pins);
}
