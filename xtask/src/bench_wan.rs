//! `cargo xtask bench wan`: replication through the project's link emulator (`wan-relay`)
//! over a matrix of round-trip times, loss rates, link rates and congestion controllers.
//!
//! For each cell: a fresh receiver and agent state, an initial sync of a random-filled loop
//! device sized for about `--seconds` of the link, then one incremental cycle of scattered
//! 64 KiB changes (10% of the device), both with `agent --once --compression off` through a
//! `wan-relay` that models the link both ways. The cycle resumes the window the sync ended
//! with (Careful Resume, see `blkmirror_protocol::cubic`); the same cycle is then run again
//! with the agent's memory of the path removed, from slow start, as its baseline. Goodput is device bytes over the committed
//! passes' own durations (`duration_ms` of the `committed` events: start-up and the
//! handshake are left out), as a fraction of the link rate. The relay's counters give the
//! wire bytes per device byte and the datagrams lost or tail-dropped.
//!
//! A pass that does not finish within `--timeout` is stopped and reported as `< x` from what
//! it had committed (nothing: `< timeout bound`).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::bench_replication::fill_random;
use crate::demo::{
    Cleanup, keygen, release_binary, require_root, scratch_loop_with, scratch_space, start_receiver,
};

/// The matrix and its sizing.
#[derive(clap::Args)]
pub struct WanMatrix {
    /// Round-trip times, ms.
    #[arg(long, value_delimiter = ',', default_value = "1,20,80,200")]
    pub rtt_ms: Vec<u64>,
    /// Random loss, percent (each direction).
    #[arg(long, value_delimiter = ',', default_value = "0,0.1,1")]
    pub loss_pct: Vec<f64>,
    /// Link rates, Mbit/s.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub rate_mbit: Vec<u64>,
    /// Congestion controllers.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cubic,newreno,bbr,filtered-quinn-cubic,filtered-cubic"
    )]
    pub congestion: Vec<String>,
    /// The initial sync's length at the link rate, which sizes the device.
    #[arg(long, default_value_t = 8.0)]
    pub seconds: f64,
    /// Longest time one pass may take.
    #[arg(long, default_value_t = 90.0)]
    pub timeout: f64,
    /// Cap the agent with `--max-rate` at this fraction of the link rate (its accuracy).
    #[arg(long)]
    pub max_rate_fraction: Option<f64>,
}

/// A running `wan-relay`.
pub(crate) struct RelayProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: mpsc::Receiver<String>,
    pub(crate) address: String,
}

impl RelayProcess {
    pub(crate) fn start(
        binary: &Path,
        upstream: &str,
        rtt_ms: u64,
        loss_pct: f64,
        mbit: u64,
    ) -> Result<Self> {
        let mut child = Command::new(binary)
            .args(["run", "--listen", "127.0.0.1:0", "--upstream", upstream])
            .args(["--rtt", &format!("{rtt_ms}ms")])
            .args(["--loss-pct", &loss_pct.to_string()])
            .args(["--rate-mbit", &mbit.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting wan-relay")?;
        let stdin = child.stdin.take().context("relay stdin")?;
        let stderr = child.stderr.take().context("relay stderr")?;
        let first = BufReader::new(stderr)
            .lines()
            .next()
            .transpose()?
            .context("wan-relay exited before listening")?;
        let address = first
            .strip_prefix("wan-relay: ")
            .and_then(|rest| rest.split(' ').next())
            .with_context(|| format!("unexpected wan-relay output: {first}"))?
            .to_owned();
        let rx = line_channel(child.stdout.take().context("relay stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout: rx,
            address,
        })
    }

    pub(crate) fn stats(&mut self) -> Result<serde_json::Value> {
        writeln!(self.stdin, "stats")?;
        let line = self
            .stdout
            .recv_timeout(Duration::from_secs(5))
            .context("wan-relay stats")?;
        Ok(serde_json::from_str(&line)?)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines of a child's output pipe, read on a thread of their own, so a caller can wait
/// for them with a timeout.
pub(crate) fn line_channel(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub(crate) fn release_relay() -> Result<PathBuf> {
    crate::exec(crate::cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "blkmirror-wan",
        "--bin",
        "wan-relay",
    ]))?;
    Ok(crate::root().join("target/release/wan-relay"))
}

/// What one `agent --once` committed before it ended or was stopped.
pub(crate) struct Pass {
    /// Device bytes the committed passes covered, and their summed durations.
    pub(crate) bytes: u64,
    pub(crate) seconds: f64,
    pub(crate) finished: bool,
    /// The last `committed` event of the kind asked for.
    pub(crate) last: Option<serde_json::Value>,
}

/// Runs `command` for at most `timeout` seconds and sums its `committed` events of `kind`.
pub(crate) fn agent_pass(command: &mut Command, kind: &str, timeout: f64) -> Result<Pass> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("blkmirror agent")?;
    let rx = line_channel(child.stdout.take().context("agent stdout")?);
    let started = Instant::now();
    let mut pass = Pass {
        bytes: 0,
        seconds: 0.0,
        finished: false,
        last: None,
    };
    loop {
        let left = timeout - started.elapsed().as_secs_f64();
        if left <= 0.0 {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        match rx.recv_timeout(Duration::from_secs_f64(left.min(1.0))) {
            Ok(line) => {
                if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line)
                    && event["event"] == "committed"
                    && event["kind"] == kind
                {
                    pass.bytes += event["bytes"].as_u64().unwrap_or(0);
                    pass.seconds += event["duration_ms"].as_u64().unwrap_or(0) as f64 / 1e3;
                    pass.last = Some(event);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait()?;
                if !status.success() {
                    bail!("blkmirror agent failed ({status})");
                }
                pass.finished = true;
                break;
            }
        }
    }
    Ok(pass)
}

/// Writes pseudo-random 64 KiB blocks at `offsets` (in 64 KiB units) and syncs them.
fn write_chunks(device: &str, offsets: &[u64], seed: u64) -> Result<()> {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .with_context(|| format!("opening {device}"))?;
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut block = vec![0u8; 65536];
    for &offset in offsets {
        for word in block.chunks_exact_mut(8) {
            // xorshift64: incompressible enough for `--compression off` anyway.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all_at(&block, offset * 65536)
            .with_context(|| format!("writing {device}"))?;
    }
    file.sync_all()
        .with_context(|| format!("syncing {device}"))?;
    Ok(())
}

/// One cell's result.
struct Cell {
    rtt_ms: u64,
    loss_pct: f64,
    mbit: u64,
    congestion: String,
    sync: Option<f64>,
    sync_bound: bool,
    cycle: Option<f64>,
    cycle_bound: bool,
    /// The same cycle again, from slow start (the agent's memory of the path removed).
    cold_cycle: Option<f64>,
    cold_cycle_bound: bool,
    /// The resumed cycle's duration and, of it, the receiver's commit (seconds).
    cycle_seconds: Option<(f64, f64)>,
    /// The congestion window at the resumed cycle's end, as a share of the link's
    /// bandwidth-delay product.
    cycle_window_bdp: Option<f64>,
    wire_per_byte: f64,
    dropped_pct: f64,
}

/// One cycle's fraction of the link, whether the timeout cut it off, and, if it committed,
/// its duration, its receiver's commit (seconds) and its window at the end (in BDPs).
type CycleRun = (Option<f64>, bool, Option<(f64, f64, f64)>);

/// A cycle's duration and its receiver's commit, as the table shows them.
fn cycle_seconds(seconds: Option<(f64, f64)>) -> String {
    match seconds {
        Some((cycle, commit)) => format!("{cycle:.2} ({commit:.2})"),
        None => "n/a".into(),
    }
}

fn fraction(value: Option<f64>, bound: bool) -> String {
    match value {
        Some(value) if bound => format!("< {value:.2}"),
        Some(value) => format!("{value:.2}"),
        None => "n/a".into(),
    }
}

pub fn wan(matrix: &WanMatrix) -> Result<()> {
    require_root()?;
    let binary = release_binary()?;
    let relay_binary = release_relay()?;
    let mut cleanup = Cleanup::new();
    let (dir, pins) = scratch_space(&mut cleanup, "bench-wan")?;
    let agent_fp = keygen(&binary, &dir.join("agent-id"))?;
    let receiver_fp = keygen(&binary, &dir.join("receiver-id"))?;

    // One device per link rate, sized for `seconds` of it, filled once.
    let mut devices = Vec::new();
    for &mbit in &matrix.rate_mbit {
        let mib = ((mbit as f64 * 1e6 / 8.0 * matrix.seconds) / f64::from(1 << 20)).ceil() as u64;
        let mib = mib.max(16);
        let sub = dir.join(format!("dev-{mbit}"));
        std::fs::create_dir_all(&sub)?;
        let device = scratch_loop_with(&mut cleanup, &sub, mib << 20, true)?;
        eprintln!("bench: filling {device} ({mib} MiB, {mbit} Mbit/s) with random data");
        fill_random(&device, 0, mib, "1M")?;
        devices.push((mbit, device, mib << 20));
    }

    let mut cells = Vec::new();
    let total = matrix.rtt_ms.len()
        * matrix.loss_pct.len()
        * matrix.rate_mbit.len()
        * matrix.congestion.len();
    let mut index = 0;
    for (mbit, device, size) in &devices {
        let link_bytes = *mbit as f64 * 1e6 / 8.0;
        for &rtt_ms in &matrix.rtt_ms {
            for &loss_pct in &matrix.loss_pct {
                for congestion in &matrix.congestion {
                    index += 1;
                    let cell_dir = dir.join(format!("cell-{index}"));
                    std::fs::create_dir_all(&cell_dir)?;
                    let mut cell_cleanup = Cleanup::new();
                    let receiver = start_receiver(
                        &mut cell_cleanup,
                        &binary,
                        &dir,
                        &cell_dir.join("data"),
                        &agent_fp,
                        "bench",
                        &[],
                    )?;
                    let mut relay =
                        RelayProcess::start(&relay_binary, &receiver, rtt_ms, loss_pct, *mbit)?;
                    let relay_address = relay.address.clone();
                    let agent = || {
                        let mut command = Command::new(&binary);
                        command
                            .args(["agent", "--device", device, "--volume", "bench"])
                            .args(["--receiver", &relay_address])
                            .args(["--receiver-fingerprint", &receiver_fp])
                            .args(["--once", "--json", "--compression", "off"])
                            .args(["--congestion", congestion])
                            .args(matrix.max_rate_fraction.iter().flat_map(|fraction| {
                                [
                                    "--max-rate".to_owned(),
                                    format!("{:.0}", fraction * link_bytes),
                                ]
                            }))
                            .arg("--identity")
                            .arg(dir.join("agent-id"))
                            .arg("--pin-root")
                            .arg(&pins)
                            .arg("--state-dir")
                            .arg(cell_dir.join("state"));
                        command
                    };
                    eprintln!(
                        "bench: [{index}/{total}] {mbit} Mbit/s, {rtt_ms} ms, {loss_pct}% loss, \
                         {congestion}: initial sync of {} MiB",
                        size >> 20
                    );
                    let sync = agent_pass(&mut agent(), "sync-step", matrix.timeout)?;
                    let sync_fraction =
                        (sync.seconds > 0.0).then(|| sync.bytes as f64 / sync.seconds / link_bytes);
                    let mut cell = Cell {
                        rtt_ms,
                        loss_pct,
                        mbit: *mbit,
                        congestion: congestion.clone(),
                        sync: sync_fraction
                            .or_else(|| Some(*size as f64 / matrix.timeout / link_bytes)),
                        sync_bound: !sync.finished,
                        cycle: None,
                        cycle_bound: false,
                        cold_cycle: None,
                        cold_cycle_bound: false,
                        cycle_seconds: None,
                        cycle_window_bdp: None,
                        wire_per_byte: 0.0,
                        dropped_pct: 0.0,
                    };
                    // 10% of the device in scattered 64 KiB writes, no chunk twice.
                    let chunks = size / 65536;
                    let changed = chunks / 10;
                    let mut offsets: Vec<u64> = {
                        let stride = (2_654_435_761 % chunks) | 1;
                        let mut at = 7919 % chunks;
                        (0..changed)
                            .map(|_| {
                                at = (at + stride) % chunks;
                                at
                            })
                            .collect()
                    };
                    offsets.sort_unstable();
                    // One cycle of those changes: its fraction of the link, and whether it was
                    // cut off by the timeout.
                    // and its duration with the receiver's commit in it (seconds).
                    let cycle = |seed: u64| -> Result<CycleRun> {
                        write_chunks(device, &offsets, seed)?;
                        let cycle = agent_pass(&mut agent(), "cycle", matrix.timeout)?;
                        let fraction = (cycle.seconds > 0.0)
                            .then(|| (changed * 65536) as f64 / cycle.seconds / link_bytes)
                            .or_else(|| {
                                (!cycle.finished)
                                    .then(|| (changed * 65536) as f64 / matrix.timeout / link_bytes)
                            });
                        let seconds = cycle.last.as_ref().map(|event| {
                            let commit = event["commit_ms"].as_u64().unwrap_or(0) as f64 / 1e3;
                            let window = event["congestion_window_bytes"].as_u64().unwrap_or(0);
                            let bdp = link_bytes * rtt_ms as f64 / 1e3;
                            (cycle.seconds, commit, window as f64 / bdp)
                        });
                        Ok((fraction, !cycle.finished, seconds))
                    };
                    if sync.finished {
                        // The agent resumes the window its last run ended with (Careful
                        // Resume, `agent-VOLUME.path.json` in its state directory)...
                        let seconds;
                        (cell.cycle, cell.cycle_bound, seconds) = cycle(index as u64)?;
                        cell.cycle_seconds = seconds.map(|(cycle, commit, _)| (cycle, commit));
                        cell.cycle_window_bdp = seconds.map(|(_, _, window)| window);
                    }
                    let stats = relay.stats()?;
                    let up = &stats["up"];
                    let offered = up["offered"].as_u64().unwrap_or(0).max(1);
                    let dropped =
                        up["lost"].as_u64().unwrap_or(0) + up["tail_drops"].as_u64().unwrap_or(0);
                    cell.dropped_pct = dropped as f64 * 100.0 / offered as f64;
                    cell.wire_per_byte =
                        up["delivered_bytes"].as_u64().unwrap_or(0) as f64 / *size as f64;
                    if sync.finished {
                        // ...and, as the baseline, the same cycle from slow start.
                        let _ = std::fs::remove_file(cell_dir.join("state/agent-bench.path.json"));
                        (cell.cold_cycle, cell.cold_cycle_bound, _) = cycle(index as u64 + 1000)?;
                    }
                    eprintln!(
                        "bench: [{index}/{total}] sync {} cycle {} ({}, window at its end \
                         {} BDP; from slow start {}) of the link; {:.2} wire bytes per device \
                         byte (sync and first cycle), {:.2}% of datagrams dropped",
                        fraction(cell.sync, cell.sync_bound),
                        fraction(cell.cycle, cell.cycle_bound),
                        cycle_seconds(cell.cycle_seconds),
                        cell.cycle_window_bdp
                            .map_or("n/a".into(), |window| format!("{window:.2}")),
                        fraction(cell.cold_cycle, cell.cold_cycle_bound),
                        cell.wire_per_byte,
                        cell.dropped_pct
                    );
                    cells.push(cell);
                    drop(relay);
                    drop(cell_cleanup);
                    let _ = std::fs::remove_dir_all(&cell_dir);
                    // The agent's tracker pins live under the shared pin root, per device:
                    // a fresh state directory for the next cell starts a fresh tracker.
                    crate::demo::remove_pin_root(&pins);
                }
            }
        }
    }

    println!(
        "blkmirror WAN bench: initial sync of a random-filled loop device (~{} s of the link) \
         and one cycle of 10% scattered 64 KiB changes, agent --once --compression off, \
         through wan-relay (rate cap with a 1-BDP tail-drop queue, delay, random loss; both \
         ways). Goodput as a fraction of the link rate, from the committed passes' durations.",
        matrix.seconds
    );
    println!();
    println!(
        "| link | RTT | loss | controller | sync | cycle | cycle, s (of which the receiver's \
         commit) | cycle from slow start | wire bytes / device byte | dropped |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    for cell in &cells {
        println!(
            "| {} Mbit/s | {} ms | {}% | {} | {} | {} | {} | {} | {:.2} | {:.2}% |",
            cell.mbit,
            cell.rtt_ms,
            cell.loss_pct,
            cell.congestion,
            fraction(cell.sync, cell.sync_bound),
            fraction(cell.cycle, cell.cycle_bound),
            cycle_seconds(cell.cycle_seconds),
            fraction(cell.cold_cycle, cell.cold_cycle_bound),
            cell.wire_per_byte,
            cell.dropped_pct
        );
    }
    println!();
    if let Some(fraction) = matrix.max_rate_fraction {
        println!(
            "With --max-rate at {fraction} of the link: the sync column should read {fraction} \
             (within 5%)."
        );
    } else {
        println!(
            "Goals (issue 11): >= 0.9 without loss at any RTT up to 200 ms, >= 0.8 at 0.1%, >= \
             0.5 at 1%."
        );
    }
    println!(
        "Reproduce: sudo cargo xtask bench wan --rtt-ms {} --loss-pct {} --rate-mbit {} \
         --congestion {} --seconds {} --timeout {}{}",
        join(&matrix.rtt_ms),
        join(&matrix.loss_pct),
        join(&matrix.rate_mbit),
        matrix.congestion.join(","),
        matrix.seconds,
        matrix.timeout,
        matrix
            .max_rate_fraction
            .map(|fraction| format!(" --max-rate-fraction {fraction}"))
            .unwrap_or_default()
    );
    Ok(())
}

pub(crate) fn join<T: ToString>(values: &[T]) -> String {
    values
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
