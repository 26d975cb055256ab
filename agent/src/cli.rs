//! Command line: definitions, output, and the mapping of errors to exit codes.
//!
//! Exit codes (stable, documented in the README):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | runtime failure (BPF load, IO) |
//! | 2 | bad command line |
//! | 3 | bad environment (privileges, bpffs, tracefs, kernel features) |
//! | 4 | device problem (not a block device, unsupported, vanished) |
//! | 5 | the device is already tracked by another process |

use std::{
    io::Write as _,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::{
    extent::Extent,
    track::{self, HookChoice, NeedsVerify, Origin, TrackError, TrackOptions, Tracker},
    units,
};

/// blkmirror: block-level disaster-recovery mirror with eBPF change tracking.
#[derive(Debug, Parser)]
#[command(name = "blkmirror", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Track writes, discards and zeroing on a block device and print the dirty extents of each
    /// epoch. Tracking stays pinned in the kernel after exit; a later run resumes it.
    Track(TrackArgs),
    /// Stop tracking a device: remove its pinned kernel state.
    Untrack(UntrackArgs),
}

/// Options shared by commands that touch tracking state.
#[derive(Debug, clap::Args)]
pub struct StateArgs {
    /// Directory for tracking-generation records.
    #[arg(long, value_name = "DIR", default_value = track::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Root directory of blkmirror's pins in bpffs.
    #[arg(long, value_name = "DIR", default_value = track::DEFAULT_PIN_ROOT, hide_short_help = true)]
    pub pin_root: PathBuf,
}

/// `blkmirror track`.
#[derive(Debug, clap::Args)]
pub struct TrackArgs {
    /// The block device (whole disk or partition).
    pub device: PathBuf,
    /// Chunk size: the granularity of tracking (power of two, 4KiB to 1MiB).
    #[arg(long, value_name = "SIZE", default_value = "64KiB", value_parser = units::parse_size)]
    pub chunk_size: u64,
    /// Time between epoch cuts.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Exit after this many epochs.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Which kernel hooks record changes.
    #[arg(long, value_enum, default_value_t = HookChoice::Auto)]
    pub hooks: HookChoice,
    #[command(flatten)]
    pub state: StateArgs,
}

/// `blkmirror untrack`.
#[derive(Debug, clap::Args)]
pub struct UntrackArgs {
    /// The block device.
    pub device: PathBuf,
    #[command(flatten)]
    pub state: StateArgs,
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = units::parse_duration(text)?;
    if interval < Duration::from_millis(1) {
        return Err(format!("interval {text:?} is too short (at least 1ms)"));
    }
    Ok(interval)
}

/// Exit code for an error.
pub fn exit_code(error: &TrackError) -> u8 {
    match error {
        TrackError::Env(_) | TrackError::Layout(_) => 3,
        TrackError::Device(_) => 4,
        TrackError::Busy { .. } => 5,
        TrackError::ChunkSize(_) | TrackError::TooLarge { .. } => 2,
        _ => 1,
    }
}

/// Runs the command line; returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Track(args) => run_track(&args),
        Command::Untrack(args) => run_untrack(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("blkmirror: error: {error}");
            ExitCode::from(exit_code(&error))
        }
    }
}

fn options(chunk_bytes: u64, hooks: HookChoice, state: &StateArgs) -> TrackOptions {
    TrackOptions {
        chunk_bytes,
        pin_root: state.pin_root.clone(),
        state_dir: state.state_dir.clone(),
        hooks,
    }
}

fn run_untrack(args: &UntrackArgs) -> Result<(), TrackError> {
    track::prepare_environment()?;
    let options = options(track::DEFAULT_CHUNK, HookChoice::Auto, &args.state);
    if track::untrack(&args.device, &options)? {
        eprintln!(
            "blkmirror: {} is no longer tracked (pins removed)",
            args.device.display()
        );
    } else {
        eprintln!("blkmirror: {} was not tracked", args.device.display());
    }
    Ok(())
}

fn run_track(args: &TrackArgs) -> Result<(), TrackError> {
    // Validate cheap arguments before touching the kernel.
    track::chunk_shift(args.chunk_size)?;
    for note in track::prepare_environment()? {
        eprintln!("blkmirror: {note}");
    }
    let options = options(args.chunk_size, args.hooks, &args.state);
    let (mut tracker, needs_verify) = Tracker::open(&args.device, &options)?;
    print_startup(&tracker);
    let mut out = Printer {
        device: args.device.display().to_string(),
        json: args.json,
    };
    if let Some(needs_verify) = &needs_verify {
        out.needs_verify(tracker.epoch(), needs_verify, Some(tracker.generation()));
    }
    let mut done = 0u64;
    let mut next = Instant::now() + args.interval;
    loop {
        if args.count.is_some_and(|count| done >= count) {
            return Ok(());
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += args.interval;
        tracker.device().check_unchanged()?;
        let cut = tracker.cut()?;
        if let Some(needs_verify) = &cut.needs_verify {
            out.needs_verify(cut.epoch, needs_verify, None);
        }
        for extent in &cut.extents {
            out.extent(cut.epoch, extent);
        }
        tracker.release()?;
        done += 1;
    }
}

fn print_startup(tracker: &Tracker) {
    let device = tracker.device();
    let geometry = tracker.geometry();
    let origin = match tracker.origin() {
        Origin::Adopted => "resumed pinned tracking",
        Origin::Created => "started a new tracking generation",
    };
    let partition = if device.is_partition() {
        format!(
            ", sectors {}.. of disk {}:{}",
            device.start_sector, device.disk_major, device.disk_minor
        )
    } else {
        String::new()
    };
    eprintln!(
        "blkmirror: tracking {} ({}, {}:{}{partition}, {}, {} chunks of {}); {origin} {:016x} at \
         epoch {}; pins in {}",
        device.path.display(),
        device.name,
        device.major,
        device.minor,
        units::format_size(device.size_bytes()),
        geometry.chunks(),
        units::format_size(geometry.chunk_bytes()),
        tracker.generation(),
        tracker.epoch(),
        tracker.pin_dir().display(),
    );
    for hook in tracker.hooks() {
        eprintln!("blkmirror: hook: {hook}");
    }
}

/// One `--json` line per extent; field order as documented.
#[derive(Serialize)]
struct ExtentLine<'a> {
    device: &'a str,
    epoch: u64,
    offset: u64,
    length: u64,
    kind: &'static str,
}

/// One `--json` line per tracking event.
#[derive(Serialize)]
struct EventLine<'a> {
    device: &'a str,
    epoch: u64,
    event: &'static str,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<String>,
}

fn json_line(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

struct Printer {
    device: String,
    json: bool,
}

impl Printer {
    fn extent(&mut self, epoch: u64, extent: &Extent) {
        let line = if self.json {
            json_line(&ExtentLine {
                device: &self.device,
                epoch,
                offset: extent.offset,
                length: extent.length,
                kind: extent.kind.as_str(),
            })
        } else {
            format!(
                "epoch {epoch:>6}  {:<7}  offset {:>14}  length {:>12} ({})",
                extent.kind.as_str(),
                extent.offset,
                extent.length,
                units::format_size(extent.length)
            )
        };
        self.emit(&line);
    }

    fn needs_verify(&mut self, epoch: u64, needs_verify: &NeedsVerify, generation: Option<u64>) {
        let line = if self.json {
            json_line(&EventLine {
                device: &self.device,
                epoch,
                event: "needs_verify",
                reason: &needs_verify.reason,
                generation: generation.map(|g| format!("{g:016x}")),
            })
        } else {
            format!("epoch {epoch:>6}  NEEDS VERIFY: {}", needs_verify.reason)
        };
        self.emit(&line);
    }

    fn emit(&mut self, line: &str) {
        let mut stdout = std::io::stdout().lock();
        // A closed stdout (e.g. `| head`) ends the program quietly.
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            std::process::exit(0);
        }
    }
}
