//! `cargo xtask bench compression`: what compression buys on a realistic disk, at link rates
//! through the project's link emulator (`wan-relay`).
//!
//! The device holds a mix in 4 MiB stretches, round robin: executables and libraries (from
//! `/usr/bin` and `/usr/lib`), text (headers from `/usr/include` and files from
//! `/usr/share/doc`), zeros, and random data. For each link rate and each `--compression`
//! mode, a fresh receiver syncs it (`agent --once`) through `wan-relay`. The baseline is
//! `--compression off` in the same run; `fast` is zstd level 1 where it pays (the fixed level
//! of earlier releases), `auto` chooses the level from the measured link and CPU. Reported:
//! the sync's goodput (device bytes per second of the committed passes, the zeros included
//! since every mode skips them alike), its ratio to `off`, the bytes on the wire per device
//! byte, the agent's CPU seconds, and the zstd level `auto` ended at.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::bench_wan::{RelayProcess, agent_pass, join, release_relay};
use crate::demo::{
    Cleanup, keygen, release_binary, require_root, scratch_loop_with, scratch_space, start_receiver,
};

/// The cases.
#[derive(clap::Args)]
pub struct CompressionCases {
    /// Link rates, Mbit/s.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub rate_mbit: Vec<u64>,
    /// Round-trip time, ms.
    #[arg(long, default_value_t = 20)]
    pub rtt_ms: u64,
    /// Device size, MiB (a multiple of 16).
    #[arg(long, default_value_t = 512)]
    pub size_mib: u64,
    /// The modes to compare (`off` is always run first: it is the baseline).
    #[arg(long, value_delimiter = ',', default_value = "fast,auto")]
    pub compression: Vec<String>,
    /// Longest time one sync may take.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
}

const STRETCH: usize = 4 << 20;

/// Appends the files under `dir` (recursively, regular files only) to `out` until it holds
/// `want` bytes.
fn collect_files(dir: &Path, want: usize, keep: &dyn Fn(&Path) -> bool, out: &mut Vec<u8>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if out.len() >= want {
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            collect_files(&path, want, keep, out);
        } else if meta.is_file()
            && keep(&path)
            && let Ok(bytes) = std::fs::read(&path)
        {
            out.extend_from_slice(&bytes);
        }
    }
}

/// `want` bytes of the files under `dirs` that `keep` accepts, repeated if they are fewer.
fn corpus(dirs: &[&str], want: usize, keep: &dyn Fn(&Path) -> bool) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(want);
    for dir in dirs {
        collect_files(Path::new(dir), want, keep, &mut out);
    }
    if out.is_empty() {
        bail!("no files found under {}", dirs.join(", "));
    }
    while out.len() < want {
        let again = out[..(want - out.len()).min(out.len())].to_vec();
        out.extend_from_slice(&again);
    }
    out.truncate(want);
    Ok(out)
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

fn is_text(path: &Path) -> bool {
    let name = path.to_string_lossy();
    !(name.ends_with(".gz") || name.ends_with(".xz") || name.ends_with(".bz2"))
}

/// Writes the mix into `device` (`size` bytes) and returns how much of each kind it holds.
fn fill_mix(device: &str, size: u64) -> Result<[u64; 4]> {
    let stretches = (size as usize).div_ceil(STRETCH);
    let per_kind = stretches.div_ceil(4) * STRETCH;
    eprintln!(
        "bench: collecting {} MiB of binaries and of text",
        per_kind >> 20
    );
    let binaries = corpus(
        &["/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/lib"],
        per_kind,
        &is_elf,
    )?;
    let text = corpus(&["/usr/include", "/usr/share/doc"], per_kind, &is_text)?;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut random = vec![0u8; STRETCH];
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .with_context(|| format!("opening {device}"))?;
    let mut kinds = [0u64; 4];
    for stretch in 0..stretches {
        let kind = stretch % 4;
        let at = (stretch / 4) * STRETCH;
        let data: &[u8] = match kind {
            0 => &binaries[at..at + STRETCH],
            1 => &text[at..at + STRETCH],
            2 => &[],
            _ => {
                for word in random.chunks_exact_mut(8) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    word.copy_from_slice(&state.to_le_bytes());
                }
                &random
            }
        };
        let length = STRETCH.min(size as usize - stretch * STRETCH);
        if data.is_empty() {
            file.write_all(&vec![0u8; length])?;
        } else {
            file.write_all(&data[..length])?;
        }
        kinds[kind] += length as u64;
    }
    file.sync_all()?;
    Ok(kinds)
}

/// CPU seconds (user + system) of this process's waited-for children.
fn children_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which may hold spaces): state is field 3; cutime and
    // cstime are fields 16 and 17.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("/proc/self/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| -> Result<f64> {
        Ok(fields
            .get(index - 3)
            .context("/proc/self/stat is short")?
            .parse::<f64>()?)
    };
    // Clock ticks are 100 per second on Linux's supported architectures (`getconf CLK_TCK`).
    Ok((ticks(16)? + ticks(17)?) / 100.0)
}

struct Row {
    mbit: u64,
    mode: String,
    goodput: f64,
    wire_per_byte: f64,
    cpu_s: f64,
    level: Option<i64>,
    finished: bool,
}

pub fn compression(cases: &CompressionCases) -> Result<()> {
    require_root()?;
    let binary = release_binary()?;
    let relay_binary = release_relay()?;
    let mut cleanup = Cleanup::new();
    let (dir, pins) = scratch_space(&mut cleanup, "bench-compression")?;
    let agent_fp = keygen(&binary, &dir.join("agent-id"))?;
    let receiver_fp = keygen(&binary, &dir.join("receiver-id"))?;
    let size = cases.size_mib.max(16) << 20;
    let device = scratch_loop_with(&mut cleanup, &dir, size, true)?;
    let kinds = fill_mix(&device, size)?;
    eprintln!(
        "bench: {device}: {} MiB binaries, {} MiB text, {} MiB zeros, {} MiB random",
        kinds[0] >> 20,
        kinds[1] >> 20,
        kinds[2] >> 20,
        kinds[3] >> 20
    );
    let mut modes = vec!["off".to_owned()];
    modes.extend(cases.compression.iter().filter(|m| *m != "off").cloned());
    let mut rows = Vec::new();
    let mut index = 0;
    for &mbit in &cases.rate_mbit {
        for mode in &modes {
            index += 1;
            let case_dir = dir.join(format!("case-{index}"));
            std::fs::create_dir_all(&case_dir)?;
            let mut case_cleanup = Cleanup::new();
            let receiver = start_receiver(
                &mut case_cleanup,
                &binary,
                &dir,
                &case_dir.join("data"),
                &agent_fp,
                "bench",
                &[],
            )?;
            let mut relay = RelayProcess::start(&relay_binary, &receiver, cases.rtt_ms, 0.0, mbit)?;
            let mut agent = Command::new(&binary);
            agent
                .args(["agent", "--device", &device, "--volume", "bench"])
                .args(["--receiver", &relay.address])
                .args(["--receiver-fingerprint", &receiver_fp])
                .args(["--once", "--json", "--compression", mode])
                .arg("--identity")
                .arg(dir.join("agent-id"))
                .arg("--pin-root")
                .arg(&pins)
                .arg("--state-dir")
                .arg(case_dir.join("state"));
            eprintln!(
                "bench: {mbit} Mbit/s, {} ms, --compression {mode}: initial sync of {} MiB",
                cases.rtt_ms,
                size >> 20
            );
            let cpu_before = children_cpu_seconds()?;
            let sync = agent_pass(&mut agent, "sync-step", cases.timeout)?;
            let cpu_s = children_cpu_seconds()? - cpu_before;
            let stats = relay.stats()?;
            let wire = stats["up"]["delivered_bytes"].as_u64().unwrap_or(0);
            let row = Row {
                mbit,
                mode: mode.clone(),
                goodput: if sync.seconds > 0.0 {
                    sync.bytes as f64 / sync.seconds
                } else {
                    0.0
                },
                wire_per_byte: wire as f64 / size as f64,
                cpu_s,
                level: sync
                    .last
                    .as_ref()
                    .and_then(|event| event["zstd_level"].as_i64()),
                finished: sync.finished,
            };
            eprintln!(
                "bench: {:.1} MB/s, {:.3} wire bytes per device byte, {:.1} CPU s, level {:?}{}",
                row.goodput / 1e6,
                row.wire_per_byte,
                row.cpu_s,
                row.level,
                if row.finished { "" } else { " (timed out)" }
            );
            rows.push(row);
            drop(relay);
            drop(case_cleanup);
            let _ = std::fs::remove_dir_all(&case_dir);
            crate::demo::remove_pin_root(&pins);
        }
    }

    println!(
        "blkmirror compression bench: initial sync (agent --once) of a {} MiB loop device that \
         holds {} MiB of executables and libraries, {} MiB of text, {} MiB of zeros and {} MiB \
         of random data in 4 MiB stretches, through wan-relay at {} ms. Goodput: device bytes \
         per second of the committed passes; ratio: against --compression off at the same rate \
         in this run.",
        size >> 20,
        kinds[0] >> 20,
        kinds[1] >> 20,
        kinds[2] >> 20,
        kinds[3] >> 20,
        cases.rtt_ms
    );
    println!();
    println!(
        "| link | --compression | goodput | vs off | wire bytes per device byte | agent CPU s | zstd level at the end |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for row in &rows {
        let baseline = rows
            .iter()
            .find(|r| r.mbit == row.mbit && r.mode == "off")
            .map_or(0.0, |r| r.goodput);
        println!(
            "| {} Mbit/s | {} | {:.1} MB/s{} | {:.2} | {:.3} | {:.1} | {} |",
            row.mbit,
            row.mode,
            row.goodput / 1e6,
            if row.finished { "" } else { " (timed out)" },
            if baseline > 0.0 {
                row.goodput / baseline
            } else {
                0.0
            },
            row.wire_per_byte,
            row.cpu_s,
            row.level.map_or("-".to_owned(), |level| level.to_string())
        );
    }
    println!();
    println!(
        "Reproduce: sudo cargo xtask bench compression --rate-mbit {} --rtt-ms {} --size-mib {} \
         --compression {}",
        join(&cases.rate_mbit),
        cases.rtt_ms,
        cases.size_mib,
        join(&cases.compression)
    );
    Ok(())
}
