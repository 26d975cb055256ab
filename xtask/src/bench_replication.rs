//! `cargo xtask bench replication`: what a sync and an incremental cycle cost, as ratios
//! against baselines measured in the same run on the same device:
//!
//! * the raw sequential `O_DIRECT` read of the whole device (`dd`): the floor of any tool that
//!   reads the device, and what bdsync / blocksync-fast must do on *every* run;
//! * raw QUIC throughput on 127.0.0.1 with the same TLS and flow-control settings
//!   (`blkmirror bench-transport`): the ceiling of the transport on this machine;
//! * TCP on 127.0.0.1 with the same rustls TLS (`blkmirror bench-transport --tcp`), the
//!   baseline of raw QUIC itself;
//! * the bytes actually changed: an incremental cycle should read about that much.
//!
//! Agent and receiver run on this machine over QUIC on 127.0.0.1, so the receiver's journal,
//! fsync and apply share the same disk and CPUs.

use std::{
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::demo::{
    Cleanup, keygen, release_binary, require_root, scratch_loop_with, scratch_space, start_receiver,
};

pub(crate) fn dd_read_seconds(device: &str) -> Result<f64> {
    // Drop the page cache first, although O_DIRECT bypasses it anyway.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let started = Instant::now();
    let status = Command::new("dd")
        .args([
            &format!("if={device}"),
            "of=/dev/null",
            "bs=1M",
            "iflag=direct",
        ])
        .stderr(Stdio::null())
        .status()
        .context("dd")?;
    if !status.success() {
        bail!("dd read of {device} failed");
    }
    Ok(started.elapsed().as_secs_f64())
}

pub(crate) fn fill_random(
    device: &str,
    offset_blocks: u64,
    blocks: u64,
    block: &str,
) -> Result<()> {
    let status = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={device}"),
            &format!("bs={block}"),
            &format!("seek={offset_blocks}"),
            &format!("count={blocks}"),
            "oflag=direct",
            "iflag=fullblock",
            "conv=notrunc",
            "status=none",
        ])
        .status()
        .context("dd")?;
    if !status.success() {
        bail!("dd write to {device} failed");
    }
    Ok(())
}

/// The committed lines of one `agent --once --json`, and its wall time.
pub(crate) fn agent_once(command: &mut Command) -> Result<(Vec<serde_json::Value>, f64)> {
    let started = Instant::now();
    let out = command.output().context("blkmirror agent")?;
    let seconds = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "blkmirror agent failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["event"] == "committed")
        .collect();
    Ok((lines, seconds))
}

/// The durations (ms) of the cycles a continuous agent (`command`, without `--once`) commits
/// in `seconds` with nothing to ship: the fixed cost of a cycle on an open connection. The
/// first cycle (it opens the connection) is left out.
fn idle_cycles_ms(command: &mut Command, seconds: u64) -> Result<Vec<u64>> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("blkmirror agent")?;
    let rx = crate::bench_wan::line_channel(child.stdout.take().context("agent stdout")?);
    let deadline = Instant::now() + std::time::Duration::from_secs(seconds);
    let mut durations = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line)
            && event["event"] == "committed"
            && event["kind"] == "cycle"
        {
            durations.push(event["duration_ms"].as_u64().unwrap_or(0));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    if durations.len() < 3 {
        bail!(
            "the continuous agent committed only {} cycles",
            durations.len()
        );
    }
    durations.remove(0);
    Ok(durations)
}

/// CPU seconds from `/proc/PID/stat`: the process's own (user + system) and, separately,
/// that of its children it has waited for.
pub fn cpu_seconds(pid: &str) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): state is field 3, so utime
    // (14), stime (15), cutime (16) and cstime (17) are at 11..=14 here.
    let fields: Vec<f64> = stat
        .rsplit_once(") ")
        .context("a stat line")?
        .1
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|field| field.parse().unwrap_or(0.0))
        .collect();
    if fields.len() != 4 {
        bail!("/proc/{pid}/stat: too short");
    }
    let ticks = clock_ticks();
    Ok((
        (fields[0] + fields[1]) / ticks,
        (fields[2] + fields[3]) / ticks,
    ))
}

/// Clock ticks per second of `/proc`'s times.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn sum(lines: &[serde_json::Value], key: &str) -> u64 {
    lines.iter().filter_map(|l| l[key].as_u64()).sum()
}

pub fn replication(
    size_mib: u64,
    change_permille: u64,
    rounds: u32,
    write_offset_kib: u64,
    chunk_size: &str,
) -> Result<()> {
    if !write_offset_kib.is_multiple_of(4) || write_offset_kib >= 64 {
        bail!("--write-offset-kib must be a multiple of 4 below 64, not {write_offset_kib}");
    }
    require_root()?;
    let binary = release_binary()?;
    let mut cleanup = Cleanup::new();
    let (dir, pins) = scratch_space(&mut cleanup, "bench-replication")?;
    let device = scratch_loop_with(&mut cleanup, &dir, size_mib << 20, true)?;
    let size = size_mib << 20;
    eprintln!("bench: filling {device} ({size_mib} MiB) with random data");
    fill_random(&device, 0, size_mib, "1M")?;

    let agent_fp = keygen(&binary, &dir.join("agent-id"))?;
    let receiver_fp = keygen(&binary, &dir.join("receiver-id"))?;
    let (addr, receiver_pid) = crate::demo::start_receiver_with_pid(
        &mut cleanup,
        &binary,
        &dir,
        &dir.join("data"),
        &agent_fp,
        "bench",
        &[],
    )?;
    let receiver_pid = receiver_pid.to_string();
    let agent = || {
        let mut command = Command::new(&binary);
        command
            .args([
                "agent",
                "--device",
                &device,
                "--volume",
                "bench",
                "--receiver",
                &addr,
            ])
            .args(["--receiver-fingerprint", &receiver_fp, "--once", "--json"])
            .args(["--compression", "off", "--chunk-size", chunk_size])
            .arg("--identity")
            .arg(dir.join("agent-id"))
            .arg("--pin-root")
            .arg(&pins)
            .arg("--state-dir")
            .arg(dir.join("state"));
        command
    };

    let read_s = dd_read_seconds(&device)?.min(dd_read_seconds(&device)?);
    let read_rate = size as f64 / read_s;
    eprintln!(
        "bench: raw O_DIRECT read of the device: {:.0} MB/s",
        read_rate / 1e6
    );

    // Returns the rate and the CPU seconds per GB of both ends (one process, a child of this
    // one): the transport's own cost, the floor under the agent's and the receiver's.
    let transport_rate = |tcp: bool| -> Result<(f64, f64)> {
        let (_, children_before) = cpu_seconds("self")?;
        let mut command = Command::new(&binary);
        command.args(["bench-transport", "--bytes", &size.to_string()]);
        if tcp {
            command.arg("--tcp");
        }
        let output = command.output().context("blkmirror bench-transport")?;
        if !output.status.success() {
            bail!(
                "bench-transport{} failed: {}",
                if tcp { " --tcp" } else { "" },
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let rate: f64 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .context("bench-transport output")?;
        let cpu = cpu_seconds("self")?.1 - children_before;
        Ok((rate, cpu / (size as f64 / 1e9)))
    };
    let (quic_rate, quic_cpu_per_gb) = transport_rate(false)?;
    eprintln!(
        "bench: raw QUIC on 127.0.0.1 (same TLS and windows): {:.0} MB/s",
        quic_rate / 1e6
    );
    let (tcp_rate, tcp_cpu_per_gb) = transport_rate(true)?;
    eprintln!(
        "bench: TCP on 127.0.0.1 with the same TLS (rustls): {:.0} MB/s",
        tcp_rate / 1e6
    );

    eprintln!("bench: initial sync");
    let (_, children_before) = cpu_seconds("self")?;
    let (receiver_before, _) = cpu_seconds(&receiver_pid)?;
    let (sync, sync_s) = agent_once(&mut agent())?;
    let sync_rate = size as f64 / sync_s;
    // The agent is the only child waited for during the sync.
    let agent_cpu_per_gb = (cpu_seconds("self")?.1 - children_before) / (size as f64 / 1e9);
    let receiver_cpu_per_gb =
        (cpu_seconds(&receiver_pid)?.0 - receiver_before) / (size as f64 / 1e9);

    let chunks = size / 65536;
    let changed_chunks = (chunks * change_permille / 1000).max(1);
    let mut cycles = Vec::new();
    for round in 1..=rounds {
        // Scattered 64 KiB writes, no chunk twice (an odd stride over a power-of-two count):
        // the worst case for merging into extents.
        let stride = (2_654_435_761 % chunks) | 1;
        let mut at = u64::from(round) * 7919 % chunks;
        for _ in 0..changed_chunks {
            // (Shifted writes stay clear of the device's last 64 KiB.)
            at = (at + stride) % (chunks - u64::from(write_offset_kib > 0));
            if write_offset_kib == 0 {
                fill_random(&device, at, 1, "64K")?;
            } else {
                fill_random(&device, at * 16 + write_offset_kib / 4, 16, "4K")?;
            }
        }
        let (lines, seconds) = agent_once(&mut agent())?;
        let read = sum(&lines, "read_bytes");
        let commit_s = sum(&lines, "commit_ms") as f64 / 1e3;
        let cycle_ms = sum(&lines, "duration_ms") as f64 / 1e3;
        eprintln!(
            "bench: round {round}: {} MiB changed, cycle read {} MiB in {seconds:.2}s (the \
             cycle itself {cycle_ms:.3}s, of which the receiver's commit {commit_s:.3}s)",
            (changed_chunks * 65536) >> 20,
            read >> 20
        );
        cycles.push((read, sum(&lines, "sent_bytes"), seconds, cycle_ms, commit_s));
    }
    let changed = changed_chunks * 65536;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let cycle_s = median(cycles.iter().map(|c| c.2).collect());
    let cycle_read = median(cycles.iter().map(|c| c.0 as f64).collect());
    let cycle_only_s = median(cycles.iter().map(|c| c.3).collect());
    let commit_s = median(cycles.iter().map(|c| c.4).collect());

    eprintln!("bench: a continuous agent with nothing to ship, cycles 1 s apart");
    let mut continuous = agent();
    continuous.args(["--interval", "1s"]);
    let args: Vec<std::ffi::OsString> = continuous
        .get_args()
        .filter(|arg| *arg != "--once")
        .map(|arg| arg.to_owned())
        .collect();
    let mut continuous = Command::new(&binary);
    continuous.args(args);
    let idle = idle_cycles_ms(&mut continuous, 12)?;
    let idle_ms = median(idle.iter().map(|&ms| ms as f64).collect());

    println!(
        "blkmirror replication bench: {size_mib} MiB loop device of random data, agent and \
         receiver on 127.0.0.1, {rounds} incremental rounds of {:.1}% scattered 64 KiB changes \
         (shifted by {write_offset_kib} KiB), --chunk-size {chunk_size}",
        change_permille as f64 / 10.0
    );
    println!();
    println!("| | baseline | blkmirror | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| initial sync, MB/s (baseline: raw O_DIRECT read) | {:.0} | {:.0} | {:.2} |",
        read_rate / 1e6,
        sync_rate / 1e6,
        sync_rate / read_rate
    );
    println!(
        "| initial sync, MB/s (baseline: raw QUIC, same TLS, 127.0.0.1) | {:.0} | {:.0} | {:.2} |",
        quic_rate / 1e6,
        sync_rate / 1e6,
        sync_rate / quic_rate
    );
    println!(
        "| raw QUIC, MB/s (baseline: TCP with the same rustls TLS, 127.0.0.1; goal 0.8) | {:.0} \
         | {:.0} | {:.2} |",
        tcp_rate / 1e6,
        quic_rate / 1e6,
        quic_rate / tcp_rate
    );
    println!(
        "| incremental cycle, s (baseline: reading the whole device, as bdsync must) | {read_s:.2} \
         | {cycle_s:.2} | {:.3} |",
        cycle_s / read_s
    );
    println!(
        "| of which the cycle itself (no start-up, connection, tracker attach), s | | \
         {cycle_only_s:.3} | |"
    );
    println!("| of which the receiver's commit (journal, apply, fsyncs), s | | {commit_s:.3} | |");
    println!(
        "| incremental cycle, bytes read (baseline: bytes changed) | {changed} | {cycle_read:.0} | \
         {:.2} |",
        cycle_read / changed as f64
    );
    println!("| a cycle with nothing changed, connection up, ms (goal: 50) | | {idle_ms:.0} | |");
    println!(
        "| initial sync, agent CPU seconds per GB, uncompressed (goal: 1) | | \
         {agent_cpu_per_gb:.2} | |"
    );
    println!(
        "| initial sync, receiver CPU seconds per GB, uncompressed (goal: 1) | | \
         {receiver_cpu_per_gb:.2} | |"
    );
    println!(
        "| initial sync, CPU seconds per GB, agent and receiver together (baseline: raw QUIC, \
         both ends) | {quic_cpu_per_gb:.2} | {:.2} | {:.2} |",
        agent_cpu_per_gb + receiver_cpu_per_gb,
        (agent_cpu_per_gb + receiver_cpu_per_gb) / quic_cpu_per_gb
    );
    println!(
        "| raw QUIC, CPU seconds per GB, both ends (baseline: TCP with the same TLS, both ends) | \
         {tcp_cpu_per_gb:.2} | {quic_cpu_per_gb:.2} | {:.2} |",
        quic_cpu_per_gb / tcp_cpu_per_gb
    );
    println!();
    println!(
        "Idle cycles (ms): {idle:?}. Initial sync sent {} MiB; the cycles sent {:?} bytes.",
        sum(&sync, "sent_bytes") >> 20,
        cycles.iter().map(|c| c.1).collect::<Vec<_>>()
    );
    println!(
        "Reproduce: sudo cargo xtask bench replication --size-mib {size_mib} --change-permille \
         {change_permille} --rounds {rounds} --write-offset-kib {write_offset_kib} --chunk-size \
         {chunk_size}"
    );
    Ok(())
}

/// Bytes of all files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// `cargo xtask bench points`: what keeping points in time costs. Two identical devices are
/// replicated to two receivers on 127.0.0.1, one keeping every point (the default policy),
/// one keeping only the newest (the baseline: no delta is captured). Each round makes the same
/// scattered changes on both and runs one cycle of each, alternating which goes first.
pub fn points(size_mib: u64, change_permille: u64, rounds: u32) -> Result<()> {
    require_root()?;
    let binary = release_binary()?;
    let mut cleanup = Cleanup::new();
    let (dir, pins) = scratch_space(&mut cleanup, "bench-points")?;
    let size = size_mib << 20;
    let agent_fp = keygen(&binary, &dir.join("agent-id"))?;
    let receiver_fp = keygen(&binary, &dir.join("receiver-id"))?;
    struct Side {
        name: &'static str,
        device: String,
        addr: String,
        data: std::path::PathBuf,
        seconds: Vec<f64>,
        stored: Vec<u64>,
    }
    let mut sides = Vec::new();
    for (name, extra) in [
        (
            "baseline (newest point only)",
            &[
                "--keep-all",
                "0s",
                "--keep-hourly",
                "0s",
                "--keep-daily",
                "0s",
            ][..],
        ),
        ("points kept (default policy)", &[][..]),
    ] {
        let device = scratch_loop_with(&mut cleanup, &dir, size, true)?;
        eprintln!("bench: filling {device} ({size_mib} MiB) with random data");
        fill_random(&device, 0, size_mib, "1M")?;
        let data = dir.join(format!("data-{}", sides.len()));
        let addr = start_receiver(
            &mut cleanup,
            &binary,
            &dir,
            &data,
            &agent_fp,
            "bench",
            extra,
        )?;
        sides.push(Side {
            name,
            device,
            addr,
            data,
            seconds: Vec::new(),
            stored: Vec::new(),
        });
    }
    let agent = |side: &Side, index: usize| {
        let mut command = Command::new(&binary);
        command
            .args(["agent", "--device", &side.device, "--volume", "bench"])
            .args([
                "--receiver",
                &side.addr,
                "--receiver-fingerprint",
                &receiver_fp,
            ])
            .args(["--once", "--json", "--compression", "off"])
            .arg("--identity")
            .arg(dir.join("agent-id"))
            .arg("--pin-root")
            .arg(&pins)
            .arg("--state-dir")
            .arg(dir.join(format!("state-{index}")));
        command
    };
    for (index, side) in sides.iter().enumerate() {
        eprintln!("bench: initial sync of {}", side.name);
        agent_once(&mut agent(side, index))?;
        // The first complete point.
        agent_once(&mut agent(side, index))?;
    }
    let chunks = size / 65536;
    let changed_chunks = (chunks * change_permille / 1000).max(1);
    for round in 1..=rounds {
        let stride = (2_654_435_761 % chunks) | 1;
        for side in &sides {
            let mut at = u64::from(round) * 7919 % chunks;
            for _ in 0..changed_chunks {
                at = (at + stride) % chunks;
                fill_random(&side.device, at, 1, "64K")?;
            }
        }
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1]
        } else {
            vec![1, 0]
        };
        for index in order {
            let side = &mut sides[index];
            let before = dir_bytes(&side.data.join("bench/points"));
            let (_, seconds) = agent_once(&mut agent(side, index))?;
            let after = dir_bytes(&side.data.join("bench/points"));
            side.seconds.push(seconds);
            side.stored.push(after.saturating_sub(before));
        }
        eprintln!(
            "bench: round {round}: cycle {:.2}s without points, {:.2}s with; delta {} KiB",
            sides[0].seconds.last().copied().unwrap_or(0.0),
            sides[1].seconds.last().copied().unwrap_or(0.0),
            sides[1].stored.last().copied().unwrap_or(0) >> 10
        );
    }
    let changed = changed_chunks * 65536;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base_s = median(sides[0].seconds.clone());
    let points_s = median(sides[1].seconds.clone());
    let stored = median(sides[1].stored.iter().map(|&b| b as f64).collect());
    println!(
        "blkmirror points bench: two {size_mib} MiB loop devices of random data, agent and \
         receivers on 127.0.0.1, {rounds} rounds of {:.1}% scattered 64 KiB changes",
        change_permille as f64 / 10.0
    );
    println!();
    println!("| | baseline | with points | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| incremental cycle, s (baseline: receiver keeping only the newest point) | {base_s:.3} | \
         {points_s:.3} | {:.2} |",
        points_s / base_s
    );
    println!(
        "| receiver bytes kept per cycle (baseline: bytes changed) | {changed} | {stored:.0} | \
         {:.3} |",
        stored / changed as f64
    );
    println!();
    println!(
        "Reproduce: sudo cargo xtask bench points --size-mib {size_mib} --change-permille \
         {change_permille} --rounds {rounds}"
    );
    Ok(())
}
