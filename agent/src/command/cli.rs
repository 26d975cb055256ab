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
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::{
    command::config::{
        self, AgentSettings, ConfigKind, DEFAULT_DATA_DIR, DeviceSettings, ReceiverSettings,
        parse_interval, parse_rate,
    },
    command::daemon,
    command::exit::{ExitCode, fail},
    dr::export,
    dr::ops::{self, PointSelector},
    dr::recovery,
    link::identity::{self, Fingerprint},
    link::net::Congestion,
    source::agent::{Compression, FreezeMode},
    source::app_hooks::AppHooks,
    source::freeze,
    source::read::Engine,
    tracker::track::{self, HookChoice, NeedsVerify, Origin, TrackError, TrackOptions, Tracker},
};
use blkmirror_protocol::{extent::Extent, retention::RetentionPolicy, units};

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
    /// Create an identity (key and self-signed certificate) and print its fingerprint.
    Keygen(KeygenArgs),
    /// Replicate a block device to a receiver.
    Agent(AgentArgs),
    /// Accept replicas from admitted agents.
    Receiver(ReceiverArgs),
    /// List the points in time the receiver keeps for a volume.
    Points(PointsArgs),
    /// Write a volume as it was at a point in time to a file or block device.
    Restore(RestoreArgs),
    /// Re-check a volume's stored points against their hashes.
    Verify(VerifyArgs),
    /// Serve a point in time as a block device over NBD, at once and beside the receiver
    /// (qemu, qemu-img, qemu-storage-daemon, nbd-client).
    Export(ExportArgs),
    /// Mount a point in time read-only (a file-level restore), until SIGINT or SIGTERM.
    Mount(MountArgs),
    /// Prove that a point recovers: attach it copy-on-write, replay its journal, fsck it, mount
    /// it and run a health check; record the result and the recovery time.
    Drill(DrillArgs),
    /// Promote a point at the DR site: write it to a device or file and make the DR site
    /// primary (a new term); the receiver refuses the old source from then on.
    Failover(FailoverArgs),
    /// Make the source primary again after a failover (a new term); the DR site's writes are
    /// not replicated back.
    Reprotect(ReprotectArgs),
    /// Bring a failed-over volume back to its original source, moving only what differs:
    /// `serve` at the DR site, `pull` on the source.
    #[command(subcommand)]
    Failback(FailbackCommand),
    /// The receiver's audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The object store of a receiver.toml's `[store]`: garbage collection, usage, its encryption key.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show what the running agent and receiver are doing (over their control sockets).
    Status(StatusArgs),
    /// (internal) Thaw a file system if the agent overruns its freeze or dies.
    #[command(hide = true)]
    ThawGuard(ThawGuardArgs),
    /// (kernel matrix) Check the tracker on a scratch disk, which it overwrites.
    #[command(hide = true)]
    VmSelftest {
        /// The scratch disk.
        device: PathBuf,
    },
    /// (benchmark baseline) Raw QUIC throughput on 127.0.0.1 with blkmirror's TLS settings, or
    /// TCP with the same TLS (`--tcp`).
    #[command(hide = true)]
    BenchTransport(BenchTransportArgs),
}

/// `blkmirror bench-transport`.
#[derive(Debug, clap::Args)]
pub struct BenchTransportArgs {
    /// Bytes to send.
    #[arg(long, default_value = "1GiB", value_parser = units::parse_size)]
    pub bytes: u64,
    /// Parallel streams.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Flow-control window.
    #[arg(long, default_value = "32MiB", value_parser = units::parse_size)]
    pub window: u64,
    /// Congestion controller of the sender.
    #[arg(long, value_enum, default_value_t = Congestion::default())]
    pub congestion: Congestion,
    /// Measure TCP with the same TLS instead (one connection), the baseline for raw QUIC.
    #[arg(long)]
    pub tcp: bool,
}

/// `blkmirror keygen`.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Directory for identity.key (mode 0600) and identity.crt.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Name in the certificate (informational: peers are admitted by fingerprint).
    #[arg(long, default_value = "blkmirror")]
    pub name: String,
}

/// `blkmirror agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Read everything from this file (`/etc/blkmirror/agent.toml`; see `packaging/agent.toml`)
    /// instead of the flags below; `--once` and `--json` still apply.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["device", "volume", "receiver", "receiver_fingerprint", "identity"])]
    pub config: Option<PathBuf>,
    /// The block device to protect (whole disk or partition).
    #[arg(long, value_name = "DEV", required_unless_present = "config")]
    pub device: Option<PathBuf>,
    /// The volume name at the receiver (1-64 of A-Z a-z 0-9 . _ -).
    #[arg(long, value_name = "NAME", required_unless_present = "config")]
    pub volume: Option<String>,
    /// The receiver, HOST:PORT; or several, comma-separated, that share an object store (the
    /// agent moves to the next one when one fails).
    #[arg(long, value_name = "HOST:PORT[,...]", value_parser = parse_receiver_list, required_unless_present = "config")]
    pub receiver: Option<String>,
    /// SHA-256 fingerprint of the receiver's certificate (printed by its `blkmirror keygen`);
    /// with several receivers, theirs, comma-separated.
    #[arg(long, value_name = "FP[,...]", value_parser = crate::link::identity::ReceiverPins::parse, required_unless_present = "config")]
    pub receiver_fingerprint: Option<crate::link::identity::ReceiverPins>,
    /// This agent's identity directory (from `blkmirror keygen`).
    #[arg(long, value_name = "DIR", required_unless_present = "config")]
    pub identity: Option<PathBuf>,
    /// Serve `blkmirror status` on this Unix socket (the config file's default:
    /// /run/blkmirror/agent.sock).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Time from the start of one cycle to the next (back to back when a cycle takes longer).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Run exactly one cycle (with the initial sync if needed) and exit after the receiver
    /// committed it.
    #[arg(long)]
    pub once: bool,
    /// Bandwidth cap, bytes per second (e.g. 50MiB or 50MiB/s).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_rate: Option<u64>,
    /// Chunk size: the granularity of tracking and transfer (power of two, 4KiB to 1MiB).
    #[arg(long, value_name = "SIZE", default_value = "64KiB", value_parser = units::parse_size)]
    pub chunk_size: u64,
    /// Which kernel hooks record changes.
    #[arg(long, value_enum, default_value_t = HookChoice::Auto)]
    pub hooks: HookChoice,
    /// Parallel QUIC data streams.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub streams: u16,
    /// Device reads in flight.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub queue_depth: u32,
    /// Read engine.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    pub reader: Engine,
    /// Compression of data: zstd where it pays, at a level chosen from the measured link and
    /// CPU (auto), at level 1 (fast), or none (off).
    #[arg(long, value_enum, default_value_t = Compression::Auto)]
    pub compression: Compression,
    /// Freeze the device's mounted file system for crash-consistent points.
    #[arg(long, value_enum, default_value_t = FreezeMode::Auto)]
    pub freeze: FreezeMode,
    /// Longest time the file system may stay frozen.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_interval)]
    pub freeze_budget: Duration,
    /// A command run (by `sh -c`) before each freeze: a database checkpoint, a read lock. When
    /// it succeeds, the point is application-consistent; when it fails, the point is still
    /// frozen and says it is only crash-consistent.
    #[arg(long, value_name = "CMD")]
    pub pre_freeze: Option<String>,
    /// A command run after each thaw, always (it releases what `--pre-freeze` took).
    #[arg(long, value_name = "CMD")]
    pub post_thaw: Option<String>,
    /// How long each hook may run before it and what it started are killed.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_interval)]
    pub hook_timeout: Duration,
    /// QUIC flow-control window (at least bandwidth x round-trip time).
    #[arg(long, value_name = "SIZE", default_value = "32MiB", value_parser = units::parse_size)]
    pub window: u64,
    /// QUIC congestion controller for the data the agent sends.
    #[arg(long, value_enum, default_value_t = Congestion::default())]
    pub congestion: Congestion,
    /// Device bytes per committed step of an initial or verify sync.
    #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = units::parse_size)]
    pub sync_step: u64,
    /// The completion log's kernel ring buffer per CPU ("auto": 2 MiB up to 8 CPUs, 16 MiB
    /// shared beyond), which bounds how far back a skipped completion is found without a
    /// verify sync (`status` shows the reach).
    #[arg(long, value_name = "SIZE|auto", default_value = "auto", value_parser = crate::command::config::parse_completion_log_arg)]
    pub completion_log: crate::command::config::CompletionLogArg,
    /// Print one JSON object per line (committed points, sync progress).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

/// `blkmirror receiver`.
#[derive(Debug, clap::Args)]
pub struct ReceiverArgs {
    /// Read everything from this file (`/etc/blkmirror/receiver.toml`; see
    /// `packaging/receiver.toml`) instead of the flags below.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["identity", "allow"])]
    pub config: Option<PathBuf>,
    /// Serve `blkmirror status` on this Unix socket (the config file's default:
    /// /run/blkmirror/receiver.sock).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9465).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Address to listen on (UDP).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7443")]
    pub listen: std::net::SocketAddr,
    /// Where volume images, metadata and journals live.
    #[arg(
        long,
        value_name = "DIR",
        default_value = DEFAULT_DATA_DIR
    )]
    pub data_dir: PathBuf,
    /// The receiver's identity directory (from `blkmirror keygen`).
    #[arg(long, value_name = "DIR", required_unless_present = "config")]
    pub identity: Option<PathBuf>,
    /// Admit an agent for volumes: FINGERPRINT=VOLUME[,VOLUME...]. Repeat for more agents.
    #[arg(
        long = "allow",
        value_name = "FP=VOLUMES",
        required_unless_present = "config"
    )]
    pub allow: Vec<String>,
    /// QUIC flow-control window.
    #[arg(long, value_name = "SIZE", default_value = "32MiB", value_parser = units::parse_size)]
    pub window: u64,
    /// Keep every point younger than this.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = units::parse_duration)]
    pub keep_all: Duration,
    /// Keep one point per hour for this long.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = units::parse_duration)]
    pub keep_hourly: Duration,
    /// Keep one point per day for this long.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = units::parse_duration)]
    pub keep_daily: Duration,
    /// Retention lock: no point younger than this is pruned, whatever the other settings say
    /// (0: off). A configuration reload cannot shorten it.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = units::parse_duration)]
    pub retention_lock: Duration,
}

/// Where the receiver keeps its volumes (for the commands that read them).
#[derive(Debug, clap::Args)]
pub struct DataDirArg {
    /// The receiver's data directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

/// `blkmirror points`.
#[derive(Debug, clap::Args)]
pub struct PointsArgs {
    /// The volume.
    pub volume: String,
    /// Ask the receiver daemon on this control socket instead of reading the data directory
    /// (for operators who are not root; the daemon checks their role).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// List the points published to the object store of this receiver.toml's `[store]`
    /// instead (no receiver or data directory needed).
    #[arg(long, value_name = "FILE", conflicts_with = "control_socket")]
    pub from_store: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataDirArg,
    /// One JSON object per point (stable; see the README).
    #[arg(long)]
    pub json: bool,
}

/// `blkmirror restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The volume.
    pub volume: String,
    /// Ask the receiver daemon on this control socket instead of reading the data directory
    /// (for operators who are not root; the daemon checks their role).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// The point: `latest`, a cycle number (`seq:N`), or a UTC time (`2026-11-26T14:03:05Z`:
    /// the newest point cut at or before it).
    #[arg(long, value_name = "POINT", value_parser = ops::parse_selector)]
    pub at: PointSelector,
    /// Where to write: a new file (sparse), an existing file with `--force`, or a block device
    /// that is not in use and is at least the volume's size.
    #[arg(long, value_name = "PATH")]
    pub to: PathBuf,
    /// Replace an existing regular file.
    #[arg(long)]
    pub force: bool,
    /// Read the point from the object store of this receiver.toml's `[store]` instead (no
    /// receiver or data directory needed: a DR site whose receiver is gone).
    #[arg(long, value_name = "FILE", conflicts_with = "control_socket")]
    pub from_store: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataDirArg,
    /// JSON progress and result.
    #[arg(long)]
    pub json: bool,
}

/// `blkmirror export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The volume (also the export's NBD name).
    pub volume: String,
    /// The point: `latest`, a cycle number (`seq:N`), a UTC time, or `group:N`.
    #[arg(long, value_name = "POINT", default_value = "latest", value_parser = ops::parse_selector)]
    pub at: PointSelector,
    /// Where to serve: `127.0.0.1:PORT` (port 0 picks a free one) or `unix:PATH`. The NBD URI
    /// is printed on standard output once clients can connect.
    #[arg(long, value_name = "ADDR", value_parser = export::parse_listen, required_unless_present = "control_socket")]
    pub listen: Option<export::ListenAddr>,
    /// Ask the receiver daemon on this control socket to serve it instead (an operator who is
    /// not root): on a Unix socket only you may use, until this command is stopped.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["listen", "overlay_dir", "allow_remote"])]
    pub control_socket: Option<PathBuf>,
    /// Accept writes, into a copy-on-write overlay that is dropped when the export ends; the
    /// replica and its points are never written.
    #[arg(long)]
    pub writable: bool,
    /// Where the overlay of `--writable` is kept (an unlinked sparse file; default: the volume's
    /// directory in the data directory).
    #[arg(long, value_name = "DIR")]
    pub overlay_dir: Option<PathBuf>,
    /// Allow a TCP address that is not loopback (NBD has no authentication).
    #[arg(long)]
    pub allow_remote: bool,
    /// Serve the export a `failover --to export` promoted, with the writes made on it (kept
    /// in its overlay); writable while that failover is in force, read-only after.
    #[arg(long, conflicts_with_all = ["writable", "overlay_dir", "at"])]
    pub promoted: bool,
    /// Serve the point from the object store of this receiver.toml's `[store]`, with no
    /// receiver and no data directory (`--writable` then needs `--overlay-dir`).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["promoted", "control_socket"])]
    pub from_store: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataDirArg,
}

/// `blkmirror mount`.
#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// The volume.
    pub volume: String,
    /// The mount point (an existing directory).
    pub dir: PathBuf,
    /// The point: `latest`, a cycle number (`seq:N`), a UTC time, or `group:N`.
    #[arg(long, value_name = "POINT", default_value = "latest", value_parser = ops::parse_selector)]
    pub at: PointSelector,
    /// Mount the point in the object store of this receiver.toml's `[store]`, with no
    /// receiver and no data directory.
    #[arg(long, value_name = "FILE")]
    pub from_store: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataDirArg,
}

/// `blkmirror drill`.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// The volume (or `--due`).
    #[arg(required_unless_present = "due", conflicts_with = "due")]
    pub volume: Option<String>,
    /// Run the drills that `receiver.toml`'s `[[drill]]` schedules say are due (what
    /// `blkmirror-drills.timer` runs), each with its own point, check and timeout.
    #[arg(long)]
    pub due: bool,
    /// The receiver's configuration, for `--due`.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/blkmirror/receiver.toml",
        requires = "due"
    )]
    pub config: PathBuf,
    /// The point: `latest`, a cycle number (`seq:N`), a UTC time, or `group:N`.
    #[arg(long, value_name = "POINT", default_value = "latest", value_parser = ops::parse_selector)]
    pub at: PointSelector,
    /// Ask the receiver daemon on this control socket (an operator who is not root): the
    /// drill is queued for `blkmirror-drills.service` and runs with the check `receiver.toml`
    /// gives the volume; this command waits for its result.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["due", "check", "boot"])]
    pub control_socket: Option<PathBuf>,
    /// Drill the point in the object store of this receiver.toml's `[store]`, with no receiver
    /// and no data directory; the record is kept in the store.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["due", "control_socket"])]
    pub from_store: Option<PathBuf>,
    /// A health check, run by `sh -c` in the mounted point (also `$BLKMIRROR_DRILL_MOUNT`,
    /// with `$BLKMIRROR_DRILL_VOLUME` and `$BLKMIRROR_DRILL_POINT`); exit 0 is healthy.
    #[arg(long, value_name = "CMD")]
    pub check: Option<String>,
    /// How long the health check may run.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = units::parse_duration)]
    pub check_timeout: std::time::Duration,
    /// Then boot the point under qemu with this kernel (the export as its first virtio disk,
    /// writes into the overlay) and wait for `--boot-healthy` on its serial console.
    #[arg(long, value_name = "KERNEL", conflicts_with = "due")]
    pub boot: Option<PathBuf>,
    /// The guest's initramfs.
    #[arg(long, value_name = "FILE", requires = "boot")]
    pub boot_initrd: Option<PathBuf>,
    /// The guest's kernel command line (default: serial console, root=/dev/vda).
    #[arg(long, value_name = "ARGS", requires = "boot")]
    pub boot_append: Option<String>,
    /// The text on the guest's console that means it is healthy (e.g. what a unit prints once
    /// the application answers).
    #[arg(long, value_name = "TEXT", default_value = "login:", requires = "boot")]
    pub boot_healthy: String,
    /// How long the boot may take.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = units::parse_duration, requires = "boot")]
    pub boot_timeout: std::time::Duration,
    /// qemu's accelerator.
    #[arg(long, value_enum, default_value_t = recovery::BootAccel::Auto, requires = "boot")]
    pub boot_accel: recovery::BootAccel,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024, requires = "boot")]
    pub boot_memory: u32,
    #[command(flatten)]
    pub data: DataDirArg,
    /// Print the drill's record as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `blkmirror failover`.
#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    /// The volume.
    pub volume: String,
    /// Ask the receiver daemon on this control socket instead of reading the data directory
    /// (for operators who are not root; the daemon checks their role).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// The point to promote: `latest`, `seq:N`, a UTC time, or `group:N`.
    #[arg(long, value_name = "POINT", default_value = "latest", value_parser = ops::parse_selector)]
    pub at: PointSelector,
    /// Where the application will run: a block device not in use, a new file (an existing
    /// one with `--force`), or `export`: the point served at once over NBD (`--listen`), its
    /// writes kept in an overlay in the data directory (a file named `export` is `./export`).
    #[arg(long, value_name = "PATH")]
    pub to: PathBuf,
    /// With `--to export`: where to serve it, `127.0.0.1:PORT` or `unix:PATH`.
    #[arg(long, value_name = "ADDR", value_parser = export::parse_listen)]
    pub listen: Option<export::ListenAddr>,
    /// With `--to export`: allow a TCP address that is not loopback (NBD has no
    /// authentication).
    #[arg(long)]
    pub allow_remote: bool,
    /// Replace an existing regular file (or the writes of an earlier failover's export that
    /// was never failed back).
    #[arg(long)]
    pub force: bool,
    /// Fail over again while a failover is in force (promotes another point, new term).
    #[arg(long)]
    pub again: bool,
    /// Do not track a block-device target (a failback then compares every chunk).
    #[arg(long)]
    pub no_track: bool,
    #[command(flatten)]
    pub data: DataDirArg,
    #[command(flatten)]
    pub state: StateArgs,
}

/// `blkmirror reprotect`.
#[derive(Debug, clap::Args)]
pub struct ReprotectArgs {
    /// The volume.
    pub volume: String,
    /// Ask the receiver daemon on this control socket instead of reading the data directory
    /// (for operators who are not root; the daemon checks their role).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataDirArg,
}

/// `blkmirror verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The volume.
    pub volume: String,
    /// Ask the receiver daemon on this control socket instead of reading the data directory
    /// (for operators who are not root; the daemon checks their role).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Which point: `latest`, `all`, `seq:N` or a UTC time.
    #[arg(long, value_name = "POINT", default_value = "latest", value_parser = ops::parse_selector)]
    pub at: PointSelector,
    /// Verify the points published to the object store of this receiver.toml's `[store]`
    /// instead: every chunk they reference is read once and checked against its id.
    #[arg(long, value_name = "FILE", conflicts_with = "control_socket")]
    pub from_store: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataDirArg,
    /// JSON lines.
    #[arg(long)]
    pub json: bool,
}

/// `blkmirror store ...`.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Collect the store's garbage once: condemn packs no point needs, delete those condemned
    /// a grace period ago (`gc_grace`), repack sparse ones. Receivers also do it every
    /// `gc_every`; one collection runs at a time.
    Gc {
        /// The receiver.toml whose `[store]` to collect.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Plan only: print what would be done, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// The report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a new key for encryption at rest (`[store] encryption_key`): 256 random bits as
    /// 64 hex digits, mode 0600. Every receiver of the store needs the same file; without it
    /// the store's points cannot be read, so keep a copy apart from the DR site.
    Keygen {
        /// Where to write it (refused if it exists).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// The grants that every receiver of the store enforces: shows them and how they differ
    /// from this file's `[[agent]]` list; `--publish` replaces them with that list (every
    /// receiver applies it within 5 s, closing the sessions whose grant was withdrawn).
    Grants {
        /// A receiver.toml with the `[store]` and, for `--publish`, the `[[agent]]` list.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Write this file's `[[agent]]` list to the store as the new version.
        #[arg(long)]
        publish: bool,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the audit chain that the receivers of the store share: every block follows the
    /// one before it and every receiver's entries continue its own log's hash chain (exit 7
    /// if not). With `--log`, also check that a receiver's own log agrees with its copy.
    Audit {
        /// The receiver.toml whose `[store]` to read.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// A receiver's audit log to compare with the store's copy of it.
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        /// Go on from the check saved in FILE and save this one there (created if absent):
        /// only the blocks added since are read, and the checkpoint's last block must be
        /// unchanged. Kept out of the store's credentials' reach, FILE is an anchor that a
        /// rewritten chain no longer leads on from.
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<PathBuf>,
        /// First copy each full run of 1024 old blocks into one segment object, which checks
        /// then read instead of the blocks (the receivers do it at their garbage collection
        /// turn; the blocks stay).
        #[arg(long)]
        write_segments: bool,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// What the store holds: volumes, points, packs, and the dedup ratio across volumes.
    Usage {
        /// The receiver.toml whose `[store]` to read.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `blkmirror config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file and print every problem with its key.
    Check {
        /// The file (agent.toml or receiver.toml).
        file: PathBuf,
        /// Which kind of file (default: told by its sections).
        #[arg(long, value_enum)]
        kind: Option<ConfigKind>,
    },
}

/// `blkmirror status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The control socket (default: the agent's and the receiver's, whichever run here).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The status as JSON (stable; see the README).
    #[arg(long)]
    pub json: bool,
    /// Redraw every second, with progress bars for syncs.
    #[arg(long)]
    pub watch: bool,
}

/// `blkmirror failback ...`.
#[derive(Debug, Subcommand)]
pub enum FailbackCommand {
    /// At the DR site: wait for the source, send what differs from the promoted device, then
    /// make the source primary again (a new term). The device must not be mounted.
    Serve(FailbackServeArgs),
    /// On the original source (its agent stopped, the device not mounted): receive what
    /// differs from the promoted device and record it for forward replication.
    Pull(FailbackPullArgs),
}

/// `blkmirror failback serve`.
#[derive(Debug, clap::Args)]
pub struct FailbackServeArgs {
    /// The volume.
    pub volume: String,
    /// The promoted device (the `--to` of the failover).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "export",
        conflicts_with = "export"
    )]
    pub device: Option<PathBuf>,
    /// The failover was `--to export`: send back what its overlay holds (stop the promoted
    /// export first).
    #[arg(long, conflicts_with = "live")]
    pub export: bool,
    /// Where to wait for the source (UDP).
    #[arg(long, value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// The receiver's identity directory (the source's agent pins its fingerprint).
    #[arg(long, value_name = "DIR")]
    pub identity: PathBuf,
    /// The source agent's fingerprint.
    #[arg(long = "allow", value_name = "FINGERPRINT", required = true, value_parser = parse_fingerprint)]
    pub allow: Vec<Fingerprint>,
    /// Start while the application still runs on the device (mounted): pre-copy what differs,
    /// then wait for the device to be unmounted and send the final delta.
    #[arg(long)]
    pub live: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub data: DataDirArg,
    #[command(flatten)]
    pub state: StateArgs,
}

/// `blkmirror failback pull`.
#[derive(Debug, clap::Args)]
pub struct FailbackPullArgs {
    /// This host's device: the volume's original source.
    #[arg(long, value_name = "DEV")]
    pub device: PathBuf,
    /// The volume.
    #[arg(long, value_name = "NAME")]
    pub volume: String,
    /// The DR site's `failback serve` address (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    pub from: String,
    /// The DR site receiver's fingerprint (as given to the agent).
    #[arg(long, value_name = "FP", value_parser = parse_fingerprint)]
    pub receiver_fingerprint: Fingerprint,
    /// The agent's identity directory.
    #[arg(long, value_name = "DIR")]
    pub identity: PathBuf,
    /// The agent's chunk size.
    #[arg(long, value_name = "SIZE", default_value = "64KiB", value_parser = units::parse_size)]
    pub chunk_size: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

/// `blkmirror audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the audit log's hash chain and head.
    Verify {
        /// The log (default: DATA_DIR/audit.log).
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        #[command(flatten)]
        data: DataDirArg,
        /// JSON result.
        #[arg(long)]
        json: bool,
    },
}

/// `blkmirror thaw-guard`.
#[derive(Debug, clap::Args)]
pub struct ThawGuardArgs {
    /// The frozen mount point.
    pub mount: PathBuf,
    /// Thaw after this many milliseconds.
    #[arg(long)]
    pub after_ms: u64,
}

fn parse_receiver_list(text: &str) -> Result<String, String> {
    crate::link::identity::parse_receivers(text).map(|receivers| receivers.join(","))
}

fn parse_fingerprint(text: &str) -> Result<Fingerprint, String> {
    Fingerprint::parse(text).map_err(|error| error.to_string())
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

/// Runs the command line; returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    crate::command::logging::init();
    let result = match cli.command {
        Command::Track(args) => run_track(&args),
        Command::Untrack(args) => run_untrack(&args),
        Command::Keygen(args) => return run_keygen(&args),
        Command::Agent(args) => return run_agent(args),
        Command::Receiver(args) => return run_receiver(args),
        Command::Points(args) => {
            if let Some(socket) = &args.control_socket {
                return ops_result(crate::command::control::run_text(
                    socket,
                    &crate::command::control::ControlRequest::Points {
                        volume: args.volume.clone(),
                        json: args.json,
                    },
                ));
            }
            if let Some(file) = &args.from_store {
                let store = match store_of(file) {
                    Ok(store) => store,
                    Err(code) => return code,
                };
                return ops_result(crate::dr::fromstore::points(
                    &store,
                    &args.volume,
                    args.json,
                ));
            }
            return ops_result(ops::points(&args.data.data_dir, &args.volume, args.json));
        }
        Command::Restore(args) if args.from_store.is_some() => {
            let store = match store_of(args.from_store.as_deref().expect("checked")) {
                Ok(store) => store,
                Err(code) => return code,
            };
            let result = crate::dr::fromstore::restore(
                &store,
                &args.volume,
                &args.at,
                &args.to,
                args.force,
                args.json,
            );
            audit_from_store(
                &args.data.data_dir,
                "restore",
                &args.volume,
                &store,
                &result,
                serde_json::json!({
                    "at": selector_text(&args.at),
                    "to": args.to.display().to_string(),
                }),
            );
            return ops_result(result);
        }
        Command::Restore(args) if args.control_socket.is_some() => {
            return ops_result(crate::command::control::run_restore(
                args.control_socket.as_deref().expect("checked"),
                &crate::command::control::ControlRequest::Restore {
                    volume: args.volume.clone(),
                    at: selector_text(&args.at),
                },
                &args.to,
                args.force,
            ));
        }
        Command::Restore(args) => {
            return ops_result(ops::restore(
                &args.data.data_dir,
                &args.volume,
                &args.at,
                &args.to,
                args.force,
                args.json,
            ));
        }
        Command::Export(args) if args.control_socket.is_some() => {
            return ops_result(crate::command::control::run_text(
                args.control_socket.as_deref().expect("checked"),
                &crate::command::control::ControlRequest::Export {
                    volume: args.volume.clone(),
                    at: selector_text(&args.at),
                    writable: args.writable,
                    promoted: args.promoted,
                },
            ));
        }
        Command::Export(args) => {
            let store = match args.from_store.as_deref().map(store_of).transpose() {
                Ok(store) => store,
                Err(code) => return code,
            };
            let options = export::ExportOptions {
                data_dir: args.data.data_dir,
                volume: args.volume,
                at: args.at,
                listen: args.listen.expect("required without --control-socket"),
                writable: args.writable,
                overlay_dir: args.overlay_dir,
                allow_remote: args.allow_remote,
                promoted: args.promoted,
                store,
            };
            return ops_result(if args.promoted {
                export::export_promoted(&options)
            } else {
                export::export(&options)
            });
        }
        Command::Mount(args) => {
            let store = match args.from_store.as_deref().map(store_of).transpose() {
                Ok(store) => store,
                Err(code) => return code,
            };
            return ops_result(recovery::mount(
                &args.data.data_dir,
                &args.volume,
                &args.at,
                &args.dir,
                store.as_ref(),
            ));
        }
        Command::Drill(args) if args.control_socket.is_some() => {
            return ops_result(crate::command::control::run_text(
                args.control_socket.as_deref().expect("checked"),
                &crate::command::control::ControlRequest::Drill {
                    volume: args.volume.clone().expect("required without --due"),
                    at: selector_text(&args.at),
                },
            ));
        }
        Command::Drill(args) => {
            let Some(volume) = args.volume else {
                return match config::load_receiver(&args.config) {
                    Ok(settings) => ops_result(recovery::run_due(
                        &settings.data_dir,
                        &settings.drills,
                        args.json,
                    )),
                    Err(error) => fail(ExitCode::Config, error),
                };
            };
            let store = match args.from_store.as_deref().map(store_of).transpose() {
                Ok(store) => store,
                Err(code) => return code,
            };
            return ops_result(recovery::drill(&recovery::DrillOptions {
                store,
                data_dir: args.data.data_dir,
                volume,
                at: args.at,
                check: args.check,
                check_timeout: args.check_timeout,
                boot: args.boot.map(|kernel| recovery::BootOptions {
                    kernel,
                    initrd: args.boot_initrd,
                    append: args
                        .boot_append
                        .unwrap_or_else(|| recovery::BootOptions::default_append().to_owned()),
                    healthy: args.boot_healthy,
                    timeout: args.boot_timeout,
                    accel: args.boot_accel,
                    memory_mib: args.boot_memory,
                }),
                json: args.json,
                requested_by: None,
            }));
        }
        Command::Failover(args) if args.to.as_os_str() == "export" => {
            if let Some(socket) = &args.control_socket {
                if args.listen.is_some() || args.allow_remote {
                    return fail(
                        ExitCode::Usage,
                        "with --control-socket the daemon serves the export on a Unix socket \
                         only you may use (its URI is printed): drop --listen",
                    );
                }
                return ops_result(crate::command::control::run_text(
                    socket,
                    &crate::command::control::ControlRequest::Failover {
                        volume: args.volume.clone(),
                        at: selector_text(&args.at),
                        to: "export".into(),
                        again: args.again,
                        force: args.force,
                    },
                ));
            }
            let Some(listen) = args.listen else {
                return fail(
                    ExitCode::Usage,
                    "failover --to export needs --listen ADDR (127.0.0.1:PORT or unix:PATH): \
                     where the application's NBD client connects",
                );
            };
            return ops_result(recovery::failover_to_export(
                &args.volume,
                &args.at,
                args.force,
                args.again,
                &export::ExportOptions {
                    data_dir: args.data.data_dir,
                    volume: args.volume.clone(),
                    at: args.at.clone(),
                    listen,
                    writable: true,
                    overlay_dir: None,
                    allow_remote: args.allow_remote,
                    promoted: true,
                    store: None,
                },
            ));
        }
        Command::Failover(args) if args.listen.is_some() || args.allow_remote => {
            return fail(
                ExitCode::Usage,
                "--listen and --allow-remote are for failover --to export",
            );
        }
        Command::Failover(args) if args.control_socket.is_some() => {
            return ops_result(crate::command::control::run_restore(
                args.control_socket.as_deref().expect("checked"),
                &crate::command::control::ControlRequest::Failover {
                    volume: args.volume.clone(),
                    at: selector_text(&args.at),
                    to: args.to.display().to_string(),
                    again: args.again,
                    force: false,
                },
                &args.to,
                args.force,
            ));
        }
        Command::Failover(args) => {
            return ops_result(recovery::failover(
                &args.data.data_dir,
                &args.volume,
                &args.at,
                &args.to,
                args.force,
                args.again,
                (!args.no_track)
                    .then(|| options(0, HookChoice::Auto, &args.state))
                    .as_ref(),
            ));
        }
        Command::Reprotect(args) => {
            if let Some(socket) = &args.control_socket {
                return ops_result(crate::command::control::run_text(
                    socket,
                    &crate::command::control::ControlRequest::Reprotect {
                        volume: args.volume.clone(),
                    },
                ));
            }
            return ops_result(recovery::reprotect(&args.data.data_dir, &args.volume));
        }
        Command::Verify(args) if args.control_socket.is_some() => {
            return ops_result(crate::command::control::run_text(
                args.control_socket.as_deref().expect("checked"),
                &crate::command::control::ControlRequest::Verify {
                    volume: args.volume.clone(),
                    at: selector_text(&args.at),
                    json: args.json,
                },
            ));
        }
        Command::Verify(args) if args.from_store.is_some() => {
            let store = match store_of(args.from_store.as_deref().expect("checked")) {
                Ok(store) => store,
                Err(code) => return code,
            };
            let result = crate::dr::fromstore::verify(&store, &args.volume, &args.at, args.json);
            audit_from_store(
                &args.data.data_dir,
                "verify",
                &args.volume,
                &store,
                &result,
                serde_json::json!({ "at": selector_text(&args.at) }),
            );
            return ops_result(result);
        }
        Command::Verify(args) => {
            return ops_result(ops::verify(
                &args.data.data_dir,
                &args.volume,
                &args.at,
                args.json,
            ));
        }
        Command::Store(StoreCommand::Gc {
            config,
            dry_run,
            json,
        }) => {
            let store = match store_of(&config) {
                Ok(store) => store,
                Err(code) => return code,
            };
            return ops_result(crate::dr::fromstore::collect(&store, dry_run, json));
        }
        Command::Store(StoreCommand::Keygen { out }) => {
            return match write_store_key(&out) {
                Ok(()) => {
                    eprintln!(
                        "blkmirror: store key written to {} (mode 0600); set [store] \
                         encryption_key = \"{}\" on every receiver of the store, before its \
                         first point, and keep a copy apart from the DR site",
                        out.display(),
                        out.display()
                    );
                    ExitCode::Success
                }
                Err(error) => fail(ExitCode::Usage, error),
            };
        }
        Command::Store(StoreCommand::Grants {
            config: file,
            publish,
            json,
        }) => {
            let settings = match config::load_receiver(&file) {
                Ok(settings) => settings,
                Err(error) => return fail(ExitCode::Config, error),
            };
            let Some(store) = settings.store else {
                return fail(
                    ExitCode::Config,
                    format!("{}: no [store] section: no object store", file.display()),
                );
            };
            let own = match crate::dr::receiver::parse_grants(&settings.allow) {
                Ok(grants) => grants,
                Err(error) => return fail(ExitCode::Config, error),
            };
            return ops_result(crate::dr::fromstore::grants(
                &store, &file, &own, publish, json,
            ));
        }
        Command::Store(StoreCommand::Audit {
            config,
            log,
            checkpoint,
            write_segments,
            json,
        }) => {
            let store = match store_of(&config) {
                Ok(store) => store,
                Err(code) => return code,
            };
            return ops_result(crate::dr::fromstore::audit(
                &store,
                log.as_deref(),
                checkpoint.as_deref(),
                write_segments,
                json,
            ));
        }
        Command::Store(StoreCommand::Usage { config, json }) => {
            let store = match store_of(&config) {
                Ok(store) => store,
                Err(code) => return code,
            };
            return ops_result(crate::dr::fromstore::usage(&store, json));
        }
        Command::Config(ConfigCommand::Check { file, kind }) => {
            return match config::check_file(&file, kind) {
                Ok(summary) => {
                    println!("{summary}");
                    ExitCode::Success
                }
                Err(error) => fail(ExitCode::Config, error),
            };
        }
        Command::Status(args) => {
            return daemon::run_status(args.socket.as_deref(), args.json, args.watch);
        }
        Command::Failback(FailbackCommand::Serve(args)) => {
            let options = crate::dr::failback::ServeOptions {
                data_dir: args.data.data_dir.clone(),
                volume: args.volume.clone(),
                device: args.device.clone().unwrap_or_default(),
                export: args.export,
                listen: args.listen,
                identity: args.identity.clone(),
                allow: args.allow.clone(),
                track: options(track::DEFAULT_CHUNK, HookChoice::Auto, &args.state),
                live: args.live,
            };
            return ops_result(
                crate::dr::failback::serve(&options)
                    .map(|report| print_failback(&report, args.json)),
            );
        }
        Command::Failback(FailbackCommand::Pull(args)) => {
            let options = crate::source::failback::PullOptions {
                device: args.device.clone(),
                volume: args.volume.clone(),
                from: args.from.clone(),
                receiver_fingerprint: args.receiver_fingerprint.clone(),
                identity: args.identity.clone(),
                track: options(args.chunk_size, HookChoice::Auto, &args.state),
            };
            return ops_result(
                crate::source::failback::pull(&options)
                    .map(|report| print_failback(&report, args.json)),
            );
        }
        Command::Audit(AuditCommand::Verify { log, data, json }) => {
            let log = log.unwrap_or_else(|| data.data_dir.join("audit.log"));
            return ops_result(ops::audit_verify(&log, json));
        }
        Command::VmSelftest { device } => {
            return match crate::tracker::selftest::run(
                &device,
                &crate::tracker::selftest::guest_options(),
            ) {
                Ok(()) => ExitCode::Success,
                Err(reason) => {
                    println!("BLKMIRROR-VM: FAIL track: {reason}");
                    ExitCode::Failure
                }
            };
        }
        Command::BenchTransport(args) if args.tcp => {
            return match crate::link::net::loopback_tls_tcp_throughput(args.bytes) {
                Ok(rate) => {
                    println!("{}", rate as u64);
                    ExitCode::Success
                }
                Err(error) => fail(ExitCode::Failure, error),
            };
        }
        Command::BenchTransport(args) => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => return fail(ExitCode::Failure, error),
            };
            return match runtime.block_on(crate::link::net::loopback_throughput(
                args.bytes,
                args.streams,
                args.window,
                args.congestion,
            )) {
                Ok(rate) => {
                    println!("{}", rate as u64);
                    ExitCode::Success
                }
                Err(error) => fail(ExitCode::Failure, error),
            };
        }
        Command::ThawGuard(args) => {
            return match freeze::run_guard(&args.mount, Duration::from_millis(args.after_ms)) {
                Ok(()) => ExitCode::Success,
                Err(error) => {
                    eprintln!("blkmirror thaw-guard: error: {error}");
                    ExitCode::Failure
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::Success,
        Err(error) => {
            eprintln!("blkmirror: error: {error}");
            ExitCode::from(&error)
        }
    }
}

fn options(chunk_bytes: u64, hooks: HookChoice, state: &StateArgs) -> TrackOptions {
    TrackOptions {
        chunk_bytes,
        pin_root: state.pin_root.clone(),
        state_dir: state.state_dir.clone(),
        hooks,
        byte_map: false,
        completion_log_kib_per_cpu: None,
        completion_log_drain_every: crate::tracker::completion_log::DRAIN_EVERY,
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
        if let Some(recovered) = &cut.recovered {
            eprintln!("blkmirror: epoch {}: {recovered}", cut.epoch);
        }
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

/// A point selector as `--at` takes it (to send it to the receiver daemon).
fn selector_text(selector: &PointSelector) -> String {
    match selector {
        PointSelector::Latest => "latest".into(),
        PointSelector::All => "all".into(),
        PointSelector::Seq(seq) => format!("seq:{seq}"),
        PointSelector::GroupCut(cut) => format!("group:{cut}"),
        PointSelector::AtOrBefore(ms) => units::format_utc(*ms),
    }
}

fn print_failback(report: &crate::dr::failback::FailbackReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string(report).expect("serializes"));
    }
}

fn ops_result(result: Result<(), ops::OpsError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::Success,
        Err(error) => fail(ExitCode::from(&error), error),
    }
}

fn run_keygen(args: &KeygenArgs) -> ExitCode {
    match identity::generate(&args.out, &args.name) {
        Ok(fingerprint) => {
            println!("{fingerprint}");
            eprintln!(
                "blkmirror: identity written to {} ({} is private, mode 0600); give the \
                 fingerprint above to the other side",
                args.out.display(),
                identity::KEY_FILE
            );
            ExitCode::Success
        }
        Err(identity::IdentityError::Exists(dir)) => fail(
            ExitCode::Usage,
            format!(
                "{} already holds an identity; refusing to overwrite it",
                dir.display()
            ),
        ),
        Err(error) => fail(ExitCode::Failure, error),
    }
}

fn run_agent(args: AgentArgs) -> ExitCode {
    let settings = match &args.config {
        Some(path) => match config::load_agent(path) {
            Ok(mut settings) => {
                settings.once |= args.once;
                settings.json |= args.json;
                settings.control_socket = args.control_socket.clone().or(settings.control_socket);
                settings.metrics_listen = args.metrics_listen.or(settings.metrics_listen);
                settings
            }
            Err(error) => return fail(ExitCode::Config, error),
        },
        None => {
            let (Some(device), Some(volume), Some(receiver), Some(fingerprint), Some(identity)) = (
                args.device,
                args.volume,
                args.receiver,
                args.receiver_fingerprint,
                args.identity,
            ) else {
                return fail(
                    ExitCode::Usage,
                    "--device, --volume, --receiver, --receiver-fingerprint and --identity are needed without --config",
                );
            };
            if (args.pre_freeze.is_some() || args.post_thaw.is_some())
                && args.freeze == FreezeMode::Off
            {
                return fail(
                    ExitCode::Usage,
                    "--pre-freeze and --post-thaw run around a freeze, and --freeze is off",
                );
            }
            AgentSettings {
                identity,
                receiver,
                receiver_fingerprint: fingerprint,
                state_dir: args.state.state_dir,
                pin_root: args.state.pin_root,
                json: args.json,
                once: args.once,
                control_socket: args.control_socket,
                metrics_listen: args.metrics_listen,
                devices: vec![DeviceSettings {
                    device,
                    volume,
                    interval: args.interval,
                    max_rate: args.max_rate,
                    chunk_size: args.chunk_size,
                    hooks: args.hooks,
                    streams: args.streams,
                    queue_depth: args.queue_depth,
                    reader: args.reader,
                    compression: args.compression,
                    freeze: args.freeze,
                    freeze_budget: args.freeze_budget,
                    app_hooks: AppHooks {
                        pre_freeze: args.pre_freeze,
                        post_thaw: args.post_thaw,
                        timeout: args.hook_timeout,
                    },
                    window: args.window,
                    congestion: args.congestion,
                    sync_step: args.sync_step,
                    completion_log_kib: args.completion_log.0,
                    consistency_group: None,
                }],
            }
        }
    };
    daemon::run_agents(settings)
}

/// The `[store]` of a receiver.toml, for `--from-store`.
/// Writes a new store key to `out`: 64 hex digits, created with mode 0600, never over a file.
fn write_store_key(out: &std::path::Path) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| "the system's random source failed".to_owned())?;
    let text: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|error| format!("{}: {error}", out.display()))?;
    file.write_all(format!("{text}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|error| format!("writing {}: {error}", out.display()))
}

/// Records a command that read the object store in the data directory's audit log, when this
/// machine has one (a receiver's: its shared audit chain then carries the entry to the store).
fn audit_from_store(
    data_dir: &std::path::Path,
    event: &'static str,
    volume: &str,
    store: &crate::dr::objstore::StoreConfig,
    result: &Result<(), ops::OpsError>,
    mut detail: serde_json::Value,
) {
    if !data_dir.join("audit.log").exists() {
        return;
    }
    detail["from_store"] = format!("{} bucket {}", store.endpoint, store.bucket).into();
    detail["user"] = crate::dr::export::current_user().into();
    let outcome = match result {
        Ok(()) => "ok".to_owned(),
        Err(error) => error.to_string(),
    };
    recovery::audit(data_dir, event, volume, &outcome, detail);
}

fn store_of(file: &std::path::Path) -> Result<crate::dr::objstore::StoreConfig, ExitCode> {
    match config::load_receiver(file) {
        Ok(settings) => settings.store.ok_or_else(|| {
            fail(
                ExitCode::Config,
                format!(
                    "{}: no [store] section: no object store to read",
                    file.display()
                ),
            )
        }),
        Err(error) => Err(fail(ExitCode::Config, error)),
    }
}

fn run_receiver(args: ReceiverArgs) -> ExitCode {
    let settings = match &args.config {
        Some(path) => match config::load_receiver(path) {
            Ok(mut settings) => {
                settings.control_socket = args.control_socket.clone().or(settings.control_socket);
                settings.metrics_listen = args.metrics_listen.or(settings.metrics_listen);
                settings
            }
            Err(error) => return fail(ExitCode::Config, error),
        },
        None => {
            let Some(identity) = args.identity else {
                return fail(ExitCode::Usage, "--identity is needed without --config");
            };
            ReceiverSettings {
                identity,
                listen: args.listen,
                data_dir: args.data_dir,
                window: args.window,
                control_socket: args.control_socket,
                metrics_listen: args.metrics_listen,
                retention: RetentionPolicy {
                    all: args.keep_all,
                    hourly: args.keep_hourly,
                    daily: args.keep_daily,
                    locked: args.retention_lock,
                },
                allow: args.allow,
                drills: Vec::new(),
                roles: Default::default(),
                exports: Vec::new(),
                // The object store is configured in receiver.toml only (credentials in a
                // file, never on a command line).
                store: None,
            }
        }
    };
    daemon::run_receiver(settings, args.config.clone())
}
