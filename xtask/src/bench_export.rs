//! `cargo xtask bench export`: instant recovery against a full restore of the same point.
//!
//! A loop device of random data is replicated (initial sync, a first point, then rounds of 1%
//! scattered 64 KiB changes), so the oldest point is reached through every undo delta. Then,
//! in one run: the raw read of the replica image (`dd`, O_DIRECT: the baseline), a full
//! `restore` of the oldest point to a file, and `export` of the same point: the time until
//! `qemu-io` has read its first 4 KiB, and a whole read by `qemu-img convert` to a file. The
//! two copies must be identical.

use std::{
    io::BufRead as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::bench_replication::{agent_once, dd_read_seconds, fill_random};
use crate::demo::{
    Cleanup, keygen, release_binary, require_root, scratch_loop_with, scratch_space, start_receiver,
};

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn timed(command: &mut Command, what: &str) -> Result<f64> {
    let started = Instant::now();
    let out = command.output().with_context(|| what.to_owned())?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(started.elapsed().as_secs_f64())
}

fn digest(path: &std::path::Path) -> Result<String> {
    let out = Command::new("b2sum").arg(path).output().context("b2sum")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

pub fn export(size_mib: u64, rounds: u32) -> Result<()> {
    require_root()?;
    let binary = release_binary()?;
    let mut cleanup = Cleanup::new();
    let (dir, pins) = scratch_space(&mut cleanup, "bench-export")?;
    let size = size_mib << 20;
    let agent_fp = keygen(&binary, &dir.join("agent-id"))?;
    let receiver_fp = keygen(&binary, &dir.join("receiver-id"))?;
    let device = scratch_loop_with(&mut cleanup, &dir, size, true)?;
    eprintln!("bench: filling {device} ({size_mib} MiB) with random data");
    fill_random(&device, 0, size_mib, "1M")?;
    let data = dir.join("data");
    let addr = start_receiver(&mut cleanup, &binary, &dir, &data, &agent_fp, "bench", &[])?;
    let agent = || {
        let mut command = Command::new(&binary);
        command
            .args(["agent", "--device", &device, "--volume", "bench"])
            .args(["--receiver", &addr, "--receiver-fingerprint", &receiver_fp])
            .args(["--once", "--json", "--compression", "off"])
            .arg("--identity")
            .arg(dir.join("agent-id"))
            .arg("--pin-root")
            .arg(&pins)
            .arg("--state-dir")
            .arg(dir.join("state"));
        command
    };
    eprintln!("bench: initial sync and the first point");
    agent_once(&mut agent())?;
    let (lines, _) = agent_once(&mut agent())?;
    let oldest = lines
        .last()
        .and_then(|l| l["seq"].as_u64())
        .context("no committed point")?;
    let chunks = size / 65536;
    let stride = (2_654_435_761 % chunks) | 1;
    for round in 1..=rounds {
        let mut at = u64::from(round) * 7919 % chunks;
        for _ in 0..(chunks / 100).max(1) {
            at = (at + stride) % chunks;
            fill_random(&device, at, 1, "64K")?;
        }
        agent_once(&mut agent())?;
    }
    let data_arg = data.to_str().context("utf-8 path")?;
    let at = format!("seq:{oldest}");

    eprintln!("bench: raw read of the replica image");
    let image = data.join("bench/image.raw");
    let raw_s = dd_read_seconds(image.to_str().context("utf-8 path")?)?;

    eprintln!("bench: full restore of point {oldest}");
    drop_caches();
    let restored = dir.join("restored.img");
    let restore_s = timed(
        Command::new(&binary)
            .args(["restore", "bench", "--at", &at, "--to"])
            .arg(&restored)
            .args(["--data-dir", data_arg]),
        "blkmirror restore",
    )?;

    eprintln!("bench: export of point {oldest}");
    drop_caches();
    let started = Instant::now();
    let mut export = Command::new(&binary)
        .args(["export", "bench", "--at", &at, "--listen", "127.0.0.1:0"])
        .args(["--data-dir", data_arg])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("blkmirror export")?;
    let pid = export.id();
    let stdout = export.stdout.take().context("export stdout")?;
    cleanup.push("stop the export", move || {
        let _ = export.kill();
        let _ = export.wait();
    });
    let mut uri = String::new();
    std::io::BufReader::new(stdout).read_line(&mut uri)?;
    let uri = uri.trim().to_owned();
    if !uri.starts_with("nbd://") {
        bail!("export {pid} printed no URI");
    }
    let ready_s = started.elapsed().as_secs_f64();
    timed(
        Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read 0 4k", &uri]),
        "qemu-io read",
    )?;
    let first_byte_s = started.elapsed().as_secs_f64();
    drop_caches();
    let copied = dir.join("from-export.img");
    let convert_s = timed(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(&copied),
        "qemu-img convert",
    )?;
    if digest(&restored)? != digest(&copied)? {
        bail!("the export and the restore of point {oldest} differ");
    }
    let mb = size as f64 / 1e6;
    println!(
        "blkmirror export bench: a {size_mib} MiB loop device of random data, point {oldest} \
         behind {rounds} rounds of 1% scattered 64 KiB changes (reached through every undo \
         delta), agent and receiver on 127.0.0.1"
    );
    println!();
    println!("| | raw image read (baseline) | full restore | export |");
    println!("|---|---:|---:|---:|");
    println!(
        "| first byte readable, s | - | {restore_s:.2} | {first_byte_s:.3} (ready {:.0} ms) |",
        ready_s * 1000.0
    );
    println!(
        "| whole volume read, MB/s | {:.0} | {:.0} ({:.2}x raw) | {:.0} ({:.2}x raw) |",
        mb / raw_s,
        mb / restore_s,
        raw_s / restore_s,
        mb / convert_s,
        raw_s / convert_s
    );
    println!();
    println!(
        "Time to first byte: export {:.0}x sooner than a restore. The copies are identical \
         (b2sum).",
        restore_s / first_byte_s.max(Duration::from_millis(1).as_secs_f64())
    );
    println!("Reproduce: sudo cargo xtask bench export --size-mib {size_mib} --rounds {rounds}");
    Ok(())
}
