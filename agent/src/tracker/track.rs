//! The kernel change tracker: loading, pinning and re-adopting the eBPF program, and cutting
//! epochs.
//!
//! # Lifecycle
//!
//! [`Tracker::open`] looks for pins under `PIN_ROOT/MAJ-MIN/` (`state`, `dirty`, `big` maps, the
//! `prog` and its `link`). If they exist and describe the same device and chunk size, it adopts
//! them: the program kept recording while no process was running, and the first cut reports
//! those writes. Otherwise it loads a fresh program, starts a new *tracking generation* (a random
//! id stored in the state map), and reports [`NeedsVerify`]: nothing is known about changes
//! made before.
//!
//! The generation last seen is also recorded in the state directory
//! (`STATE_DIR/track-MAJ-MIN.json`), so a gap is detected even when the pins vanished with a
//! reboot: pins gone + record present = a gap, never papered over.
//!
//! # Cutting
//!
//! [`Tracker::cut`] ends the current epoch and returns everything dirtied in it (see
//! `blkmirror_common` for why nothing is lost). The slot is cleared only by
//! [`Tracker::release`], once the caller has consumed the cut; a process that dies in between
//! leaves the slot uncleared, and the next process reports it again (over-reporting is safe,
//! under-reporting never happens).

use std::{
    fs,
    io::Write as _,
    mem::offset_of,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::{
    EbpfLoader,
    maps::{Map, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{
        ProgramError, ProgramFd, ProgramInfo, RawTracePoint, TracePoint,
        links::{FdLink, PinnedLink},
    },
};
use blkmirror_common::{
    BigList, HOOK_CLASSIC, HOOK_RAW, KINDS, SLOTS, STAT_CLASSIC_ENTERS, STAT_CLASSIC_EXITS,
    STAT_RAW_ENTERS, STAT_RAW_EXITS, STATE_MAGIC, TrackState, bitmap_base,
};
use serde::{Deserialize, Serialize};

use crate::{
    tracker::completion_log::{self, CompletionLog},
    tracker::device::{self, BlockDevice, DeviceError},
    tracker::environment::{self, EnvError},
    tracker::layout::{LayoutError, RequestLayout, RqCompleteLayout},
    tracker::sys,
};
use blkmirror_protocol::extent::{ChangeKind, DirtyBitmaps, Extent, Geometry};

/// Default root of blkmirror's pins in bpffs.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/blkmirror";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/blkmirror";
/// Where per-device locks live (one tracker process per device).
pub const LOCK_DIR: &str = "/run/blkmirror";
/// Smallest chunk size.
pub const MIN_CHUNK: u64 = 4096;
/// Largest chunk size.
pub const MAX_CHUNK: u64 = 1 << 20;
/// Default chunk size.
pub const DEFAULT_CHUNK: u64 = 64 * 1024;
/// Most kernel memory the bitmaps of one device may take (6 bits per chunk): 16 TiB at 64 KiB
/// chunks needs 192 MiB.
pub const MAX_BITMAP_BYTES: u64 = 256 << 20;

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/blkmirror-ebpf"));

/// The classic hook; printed at start-up.
pub const HOOK: &str = "tracepoint block/block_rq_complete";
/// The raw hook; printed at start-up.
pub const HOOK_RAW_NAME: &str = "raw_tracepoint block_rq_complete";

/// Tracker errors.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// The environment is unsuitable.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// The device is unsuitable or vanished.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The kernel's tracepoint layout is unsupported.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Bad chunk size.
    #[error("chunk size {0} is invalid: it must be a power of two from 4KiB to 1MiB")]
    ChunkSize(u64),
    /// The bitmaps would take too much kernel memory.
    #[error(
        "{device}: tracking it at chunk size {chunk} needs {words} bitmap words, more than the \
         256 MiB of kernel memory blkmirror allows per device; use a larger --chunk-size"
    )]
    TooLarge {
        /// The device.
        device: PathBuf,
        /// Words needed.
        words: u64,
        /// Chunk size in bytes.
        chunk: u64,
    },
    /// Another process tracks this device.
    #[error(
        "{device} is already being tracked by another blkmirror process (lock {lock}); stop it first"
    )]
    Busy {
        /// The device.
        device: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// Loading the program failed.
    #[error("loading the eBPF tracker into the kernel failed: {0}")]
    Load(#[source] aya::EbpfError),
    /// Loading or attaching the program failed.
    #[error("attaching the eBPF tracker to {HOOK} failed: {0}")]
    Attach(#[source] ProgramError),
    /// A BPF map operation failed.
    #[error("BPF map operation failed: {0}")]
    Map(#[from] MapError),
    /// Pinning or opening pins failed.
    #[error("{what} {path}: {detail}")]
    Pins {
        /// What we were doing.
        what: &'static str,
        /// The pin path.
        path: PathBuf,
        /// The cause.
        detail: String,
    },
    /// Other IO.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Names the missing kernel feature when the verifier's words identify it; otherwise the
/// error as it is.
fn classify_load_error(error: ProgramError) -> TrackError {
    let text = format!("{error:?} {error}");
    if text.contains("BPF_STX uses reserved fields") {
        return TrackError::Env(EnvError::NoBpfAtomics {
            release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|r| r.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
        });
    }
    TrackError::Attach(error)
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TrackError {
    let what = what.into();
    move |source| TrackError::Io { what, source }
}

/// Where tracking state lives.
#[derive(Clone, Debug)]
pub struct TrackOptions {
    /// Chunk size in bytes (power of two, 4 KiB to 1 MiB).
    pub chunk_bytes: u64,
    /// Root directory of the pins in bpffs.
    pub pin_root: PathBuf,
    /// State directory (generation records).
    pub state_dir: PathBuf,
    /// Which hooks to attach.
    pub hooks: HookChoice,
    /// Use the byte map (the degraded mode of kernels without BPF atomic OR) even where the
    /// kernel has atomics, when a new generation is created. For tests: it runs that mode on
    /// any kernel.
    pub byte_map: bool,
    /// The completion log's ring buffer per CPU, in KiB (`None`:
    /// [`completion_log::buffer_kb_per_cpu`]).
    pub completion_log_kib_per_cpu: Option<u64>,
    /// How often the completion log is read out ([`completion_log::DRAIN_EVERY`] by default;
    /// tests take longer to see what the kernel's buffer alone holds).
    pub completion_log_drain_every: std::time::Duration,
}

impl Default for TrackOptions {
    fn default() -> Self {
        Self {
            chunk_bytes: DEFAULT_CHUNK,
            pin_root: DEFAULT_PIN_ROOT.into(),
            state_dir: DEFAULT_STATE_DIR.into(),
            hooks: HookChoice::Both,
            byte_map: false,
            completion_log_kib_per_cpu: None,
            completion_log_drain_every: completion_log::DRAIN_EVERY,
        }
    }
}

/// Which kernel hooks record changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HookChoice {
    /// The raw tracepoint where the kernel allows it (exact change kinds, cheapest), else the
    /// classic one.
    #[default]
    Auto,
    /// Both, where the kernel allows the raw one: each covers the invocations the kernel skips
    /// of the other (fewer verifies under heavy nesting), at about twice the per-request cost.
    Both,
    /// Only the classic tracepoint.
    Classic,
    /// Only the raw tracepoint (needs kernel BTF).
    Raw,
}

/// Why the changes of a device are not fully known: its replica needs a full verify.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NeedsVerify {
    /// Human-readable cause.
    pub reason: String,
}

/// One ended epoch.
#[derive(Debug)]
pub struct Cut {
    /// The epoch number.
    pub epoch: u64,
    /// Everything dirtied in it.
    pub bitmaps: DirtyBitmaps,
    /// Merged extents of `bitmaps`.
    pub extents: Vec<Extent>,
    /// Set when the kernel could not record everything during this epoch.
    pub needs_verify: Option<NeedsVerify>,
    /// Set when the kernel skipped the tracker for some completions but the completion log
    /// still held them: what happened and what was added (the cut is complete).
    pub recovered: Option<String>,
}

/// The format of the generation records this build writes.
const GENERATION_FORMAT: u32 = 1;

fn format_1() -> u32 {
    1
}

/// The record of a tracking generation in the state directory.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct GenerationRecord {
    /// [`GENERATION_FORMAT`]; records of releases before it have none and are format 1.
    #[serde(default = "format_1")]
    format: u32,
    generation: u64,
    chunk_bytes: u64,
    start_sector: u64,
    nr_sectors: u64,
}

/// Word indexes of the [`TrackState`] fields in its mmap-ed map.
mod field {
    use super::{TrackState, offset_of};
    pub const MAGIC: usize = offset_of!(TrackState, magic) / 8;
    pub const EPOCH: usize = offset_of!(TrackState, epoch) / 8;
    pub const RELEASED: usize = offset_of!(TrackState, released) / 8;
    pub const OVERFLOW: usize = offset_of!(TrackState, overflow) / 8;
    pub const GENERATION: usize = offset_of!(TrackState, generation) / 8;
    pub const DEV: usize = offset_of!(TrackState, dev) / 8;
    pub const START_SECTOR: usize = offset_of!(TrackState, start_sector) / 8;
    pub const NR_SECTORS: usize = offset_of!(TrackState, nr_sectors) / 8;
    pub const CHUNK_SHIFT: usize = offset_of!(TrackState, chunk_shift) / 8;
    pub const WORDS_PER_KIND: usize = offset_of!(TrackState, words_per_kind) / 8;
    pub const CREATED_UNIX: usize = offset_of!(TrackState, created_unix) / 8;
    pub const OVERFLOW_ACKED: usize = offset_of!(TrackState, overflow_acked) / 8;
    pub const MISSES_ACKED: usize = offset_of!(TrackState, misses_acked) / 8;
    pub const RAW_MISSES_ACKED: usize = offset_of!(TrackState, raw_misses_acked) / 8;
    pub const HOOKS: usize = offset_of!(TrackState, hooks) / 8;
    pub const RECENT_MISSES: usize = offset_of!(TrackState, recent_misses) / 8;
    pub const DISK_STAT_BASE: usize = offset_of!(TrackState, disk_stat_base) / 8;
    pub const UNSEEN_ACKED: usize = offset_of!(TrackState, unseen_acked) / 8;
    pub const BYTE_MAP: usize = offset_of!(TrackState, byte_map) / 8;
    pub const WORDS: usize = size_of::<TrackState>() / 8;
}

/// The open pins of one tracked device.
struct Pins {
    stats: PerCpuArray<MapData, u64>,
    state: sys::MappedWords,
    dirty: sys::MappedWords,
    big: PerCpuArray<MapData, BigList>,
    big_raw: PerCpuArray<MapData, BigList>,
    /// The classic-tracepoint program, when it is attached.
    prog: Option<ProgramFd>,
    /// The raw-tracepoint program, when it is attached.
    prog_raw: Option<ProgramFd>,
    /// The dirty map holds a byte per chunk (kernels without BPF atomic OR).
    byte_map: bool,
    /// The programs count their invocations (`STAT_*_ENTERS` / `STAT_*_EXITS`), so
    /// [`Tracker::quiesce`] can wait for them instead of for an RCU grace period.
    invocation_counts: bool,
    /// The programs count the sectors of write-like completions (`STAT_*_WRITE_SECTORS`), so
    /// the cross-check compares sectors, which nothing can mask, besides requests.
    sector_counts: bool,
}

/// A cut whose slot has not been cleared yet.
#[derive(Clone, Copy, Debug)]
struct Pending {
    epoch: u64,
    overflow: u64,
    misses: u64,
    raw_misses: u64,
    recent_misses: u64,
    unseen: i64,
    unseen_sectors: i64,
    /// When the cut read the disk's statistics (CLOCK_MONOTONIC, microseconds).
    stat_read_us: u64,
}

/// How the tracker came to be: adopted pins or a new generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Pins from an earlier process were re-adopted.
    Adopted,
    /// A new program was loaded.
    Created,
}

/// A tracked device.
pub struct Tracker {
    device: BlockDevice,
    geometry: Geometry,
    layout: RqCompleteLayout,
    pins: Pins,
    pin_dir: PathBuf,
    origin: Origin,
    /// Why a wanted hook is not attached.
    notes: Vec<String>,
    carry: Option<DirtyBitmaps>,
    pending: Option<Pending>,
    /// The tracefs instance that logs the disk's completions, when it could be set up.
    completion_log: Option<completion_log::Drainer>,
    _lock: fs::File,
}

/// Validates a chunk size and returns log2 of it in sectors.
pub fn chunk_shift(chunk_bytes: u64) -> Result<u64, TrackError> {
    if !chunk_bytes.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_bytes) {
        return Err(TrackError::ChunkSize(chunk_bytes));
    }
    Ok(u64::from((chunk_bytes / 512).trailing_zeros()))
}

/// The pin directory of a device node.
pub fn pin_dir(pin_root: &Path, device: &BlockDevice) -> PathBuf {
    pin_root.join(format!("{}-{}", device.major, device.minor))
}

fn record_path(state_dir: &Path, device: &BlockDevice) -> PathBuf {
    state_dir.join(format!("track-{}-{}.json", device.major, device.minor))
}

/// Checks everything the tracker needs from the environment, mounting bpffs and tracefs if they
/// are missing. Returns notes for the operator (what was mounted).
pub fn prepare_environment() -> Result<Vec<String>, TrackError> {
    environment::check_privileges()?;
    let mut notes = Vec::new();
    if environment::ensure_bpffs()? {
        notes.push(format!("mounted bpffs at {}", environment::BPFFS));
    }
    if environment::ensure_tracefs()? {
        notes.push(format!("mounted tracefs at {}", environment::TRACEFS));
    }
    environment::check_membarrier()?;
    Ok(notes)
}

impl Tracker {
    /// Starts or resumes tracking `path`. Returns the tracker and, when the changes made before
    /// now are not fully known (new generation), why.
    pub fn open(
        path: &Path,
        options: &TrackOptions,
    ) -> Result<(Self, Option<NeedsVerify>), TrackError> {
        let device = device::inspect(path)?;
        let shift = chunk_shift(options.chunk_bytes)?;
        let geometry = Geometry {
            nr_sectors: device.nr_sectors,
            chunk_shift: shift,
        };
        let total_words = geometry.words_per_kind() * (SLOTS * KINDS) as u64;
        if total_words * 8 > MAX_BITMAP_BYTES {
            return Err(TrackError::TooLarge {
                device: path.to_owned(),
                words: total_words,
                chunk: options.chunk_bytes,
            });
        }
        let lock = lock_device(&device)?;
        let layout = RqCompleteLayout::read(Path::new(environment::TRACEFS))?;
        let request_layout = RequestLayout::from_running_kernel();
        let pin_dir = pin_dir(&options.pin_root, &device);
        let record_path = record_path(&options.state_dir, &device);
        let record = read_record(&record_path);

        // The hooks this run wants, as far as the kernel allows.
        let wanted = match (options.hooks, &request_layout) {
            (HookChoice::Classic, _) => HOOK_CLASSIC,
            (HookChoice::Auto, Ok(_)) => HOOK_RAW,
            (HookChoice::Auto, Err(_)) => HOOK_CLASSIC,
            (HookChoice::Both, Ok(_)) => HOOK_CLASSIC | HOOK_RAW,
            (HookChoice::Both, Err(_)) => HOOK_CLASSIC,
            (HookChoice::Raw, Ok(_)) => HOOK_RAW,
            (HookChoice::Raw, Err(why)) => {
                return Err(TrackError::Env(EnvError::NoRawHook(why.clone())));
            }
        };
        let mut notes = Vec::new();
        if let (HookChoice::Both | HookChoice::Auto, Err(why)) = (options.hooks, &request_layout) {
            notes.push(format!("not {HOOK_RAW_NAME}: {why}"));
        }

        // The completion log goes first: enabling its trace event is a probe change on the
        // tracepoint, which can make the kernel skip programs attached at that moment.
        let log_dir =
            CompletionLog::dir(Path::new(environment::TRACEFS), device.major, device.minor);
        let buffer_kb = options.completion_log_kib_per_cpu.unwrap_or_else(|| {
            completion_log::buffer_kb_per_cpu(aya::util::nr_cpus().unwrap_or(1))
        });
        let disk_dev = u64::from(device.kernel_dev());
        let mut completion_log = match CompletionLog::open_or_create(&log_dir, disk_dev, buffer_kb)
        {
            Ok((log, _)) => {
                notes.push(format!(
                    "completion log: tracefs instance {} ({buffer_kb} KiB per CPU) gives back \
                     the completions the kernel skipped the hooks for, while it still holds them",
                    log_dir.display(),
                ));
                Some(log)
            }
            Err(e) => {
                notes.push(format!(
                    "no completion log ({}: {e}): a completion the kernel skips the hooks for \
                     costs a verify sync",
                    log_dir.display()
                ));
                None
            }
        };

        let mut replaced: Option<String> = None;
        let mut adopted = match open_pins(&pin_dir, &device, &geometry) {
            Ok(pins) => {
                let pinned = pins.state.words()[field::HOOKS].load(Ordering::SeqCst);
                // Pins made by a run that could not attach the raw hook stay good enough for a
                // run that does not insist on it; any other difference starts a new generation.
                let acceptable = match options.hooks {
                    HookChoice::Auto => pinned != 0,
                    HookChoice::Both => pinned == wanted || pinned == HOOK_CLASSIC,
                    HookChoice::Classic | HookChoice::Raw => pinned == wanted,
                };
                if acceptable && !pins.sector_counts {
                    // Their programs count requests only, which a flush sequence or a request
                    // completed in parts puts ahead of the disk's count: a skip can hide
                    // behind that. A verify sync now is the price of a check that cannot.
                    replaced = Some(
                        "the pinned tracker is of an earlier version whose programs count no \
                         sectors, so its cross-check can miss a completion the kernel skipped: \
                         a new tracking generation starts"
                            .to_owned(),
                    );
                    None
                } else if acceptable {
                    Some(pins)
                } else {
                    replaced = Some(format!(
                        "the attached hooks change ({} -> {}): a new tracking generation starts",
                        hook_names(pinned),
                        hook_names(wanted)
                    ));
                    None
                }
            }
            Err(PinsState::Absent) => None,
            Err(PinsState::Broken(why)) => {
                replaced = Some(why);
                None
            }
        };
        if adopted.is_none() && pin_dir.exists() {
            remove_pins(&pin_dir)?;
        }
        let origin = if adopted.is_some() {
            Origin::Adopted
        } else {
            // New tracking starts after the log was made: it misses nothing of it.
            if let Some(log) = completion_log.as_mut() {
                log.serves_tracking_from_its_start();
            }
            Origin::Created
        };
        let pins = match adopted.take() {
            Some(pins) => pins,
            None => {
                let raw_layout = if wanted & HOOK_RAW != 0 {
                    request_layout.as_ref().ok()
                } else {
                    None
                };
                let spec = CreateSpec {
                    device: &device,
                    geometry: &geometry,
                    layout: &layout,
                    request_layout: raw_layout,
                    wanted,
                    classic_fallback: options.hooks == HookChoice::Auto,
                    byte_map: options.byte_map,
                };
                create_pins(&pin_dir, &spec, &mut notes)?;
                open_pins(&pin_dir, &device, &geometry).map_err(|state| TrackError::Pins {
                    what: "re-opening the pins just created at",
                    path: pin_dir.clone(),
                    detail: match state {
                        PinsState::Absent => "they are missing".into(),
                        PinsState::Broken(why) => why,
                    },
                })?
            }
        };
        let generation = pins.state.words()[field::GENERATION].load(Ordering::SeqCst);

        let needs_verify = match (&origin, &record) {
            (Origin::Adopted, Some(r)) if r.generation == generation => None,
            (Origin::Adopted, _) => Some(format!(
                "{} has no record of tracking generation {generation:016x}; changes before it \
                 are unknown",
                options.state_dir.display()
            )),
            (Origin::Created, _) if replaced.is_some() => replaced.clone(),
            (Origin::Created, Some(_)) => Some(
                "the pinned tracking state was gone (reboot, `blkmirror untrack`, or bpffs \
                 unmounted): changes made meanwhile are unknown"
                    .to_owned(),
            ),
            (Origin::Created, None) => {
                Some("first tracking of this device: its earlier changes are unknown".to_owned())
            }
        }
        .map(|reason| NeedsVerify { reason });

        write_record(
            &options.state_dir,
            &record_path,
            &GenerationRecord {
                format: GENERATION_FORMAT,
                generation,
                chunk_bytes: options.chunk_bytes,
                start_sector: device.start_sector,
                nr_sectors: device.nr_sectors,
            },
        )?;

        let mut tracker = Self {
            device,
            geometry,
            layout,
            pins,
            pin_dir,
            origin,
            notes,
            carry: None,
            pending: None,
            completion_log: completion_log
                .map(|log| completion_log::Drainer::start(log, options.completion_log_drain_every)),
            _lock: lock,
        };
        if let Some(drainer) = &tracker.completion_log {
            let released = if tracker.pins.sector_counts {
                tracker
                    .stat_sum(blkmirror_common::STAT_RELEASED_CUT_US)
                    .unwrap_or(0)
            } else {
                0
            };
            drainer.released(released);
        }
        tracker.collect_unreleased()?;
        Ok((tracker, needs_verify))
    }

    /// If an earlier process cut an epoch but died before releasing it, reads that slot now so
    /// the first cut reports it (the slot itself is left as it is: over-reporting is safe).
    fn collect_unreleased(&mut self) -> Result<(), TrackError> {
        let state = self.pins.state.words();
        let epoch = state[field::EPOCH].load(Ordering::SeqCst);
        let released = state[field::RELEASED].load(Ordering::SeqCst);
        if released + 1 < epoch {
            self.quiesce()?;
            self.carry = Some(self.read_slot(epoch - 1)?);
        }
        Ok(())
    }

    /// Waits until every program invocation that may have read the epoch before now has
    /// returned: from then on, the slot of the old epoch is only read here, and every request
    /// the disk counted before the call has run the hooks that the kernel ran for it.
    ///
    /// With invocation counts (x86), this reads each CPU's enter counts and waits for the exit
    /// counts to reach them (microseconds: an invocation is a few hundred instructions). Otherwise,
    /// and if the counts do not settle within a second, it waits for an RCU grace period,
    /// which on Linux 6.18 makes the kernel skip the tracing programs of some concurrent
    /// completions (the disk-statistics cross-check then asks for a verify).
    fn quiesce(&self) -> Result<(), TrackError> {
        if self.pins.invocation_counts && self.wait_for_invocations()? {
            return Ok(());
        }
        sys::membarrier_global().map_err(io_err("membarrier(MEMBARRIER_CMD_GLOBAL)"))
    }

    /// `true` once every invocation that began before the call has returned; `false` if they
    /// did not within a second.
    fn wait_for_invocations(&self) -> Result<bool, TrackError> {
        // Orders the caller's epoch store before the reads of the enter counts (the programs'
        // increments are fully ordered before their epoch loads).
        std::sync::atomic::fence(Ordering::SeqCst);
        let per_cpu = |index: u32| -> Result<Vec<u64>, TrackError> {
            Ok(self.pins.stats.get(&index, 0)?.iter().copied().collect())
        };
        let entered = [
            (per_cpu(STAT_CLASSIC_ENTERS)?, STAT_CLASSIC_EXITS),
            (per_cpu(STAT_RAW_ENTERS)?, STAT_RAW_EXITS),
        ];
        // Whether every CPU's exit count has reached the enter count read above.
        let all_returned = || -> Result<bool, TrackError> {
            for (entered, exits) in &entered {
                let exited = per_cpu(*exits)?;
                if entered
                    .iter()
                    .zip(&exited)
                    .any(|(entered, exited)| exited < entered)
                {
                    return Ok(false);
                }
            }
            Ok(true)
        };
        let started = Instant::now();
        let mut rounds = 0u32;
        loop {
            if all_returned()? {
                return Ok(true);
            }
            if started.elapsed() > Duration::from_secs(1) {
                return Ok(false);
            }
            rounds += 1;
            if rounds < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    /// The device.
    pub fn device(&self) -> &BlockDevice {
        &self.device
    }

    /// The chunk geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The tracepoint layout in use.
    pub fn layout(&self) -> RqCompleteLayout {
        self.layout
    }

    /// The attached hooks, each with why it is used, and why a wanted one is not: for the
    /// start-up line.
    pub fn hooks(&self) -> Vec<String> {
        let mut hooks = Vec::new();
        if self.pins.prog.is_some() {
            hooks.push(format!(
                "{HOOK} (classic: works on every kernel; fields from tracefs: dev@{} sector@{} \
                 nr_sector@{} error@{} rwbs@{})",
                self.layout.dev,
                self.layout.sector,
                self.layout.nr_sector,
                self.layout.error,
                self.layout.rwbs
            ));
        }
        if self.pins.prog_raw.is_some() {
            hooks.push(format!(
                "{HOOK_RAW_NAME} (struct request offsets from BTF: exact write-zeroes, and a \
                 second recorder when the kernel skips the classic one)"
            ));
        }
        if self.pins.byte_map {
            hooks.push(
                "degraded: this kernel has no BPF atomic OR (Linux 5.12+), so the dirty map keeps \
                 a byte per chunk instead of a bit (8x the kernel memory), set with plain stores"
                    .to_owned(),
            );
        }
        hooks.extend(self.notes.iter().cloned());
        hooks.push(if self.pins.invocation_counts {
            "epoch switch: waits for the programs' per-CPU invocation counts (no RCU grace \
             period, which makes Linux 6.18 skip tracing programs)"
                .to_owned()
        } else {
            "epoch switch: waits for an RCU grace period (membarrier), during which Linux 6.18 \
             may skip tracing programs; the cross-check catches that"
                .to_owned()
        });
        if self.cross_checks_disk_stats() && self.pins.sector_counts {
            hooks.push(
                "completeness cross-check: the hooks' request and sector counts against the \
                 disk's own I/O statistics"
                    .to_owned(),
            );
        } else if self.cross_checks_disk_stats() {
            hooks.push("completeness cross-check: request counts only".to_owned());
        } else {
            hooks.push(
                "no completeness cross-check: the disk keeps no I/O statistics (queue/iostats)"
                    .to_owned(),
            );
        }
        hooks
    }

    /// Requests on the tracked range seen so far by the classic and the raw hook (summed over
    /// CPUs, since the generation started).
    pub fn events_seen(&self) -> Result<(u64, u64), TrackError> {
        Ok((
            self.stat_sum(blkmirror_common::STAT_CLASSIC_EVENTS)?,
            self.stat_sum(blkmirror_common::STAT_RAW_EVENTS)?,
        ))
    }

    /// One `STATS` counter summed over all CPUs.
    fn stat_sum(&self, index: u32) -> Result<u64, TrackError> {
        Ok(self.pins.stats.get(&index, 0)?.iter().sum())
    }

    /// The kernel's `recursion_misses` of the classic and the raw program (0 if not attached).
    pub fn recursion_misses(&self) -> Result<(u64, u64), TrackError> {
        let read = |prog: &Option<ProgramFd>| match prog {
            Some(fd) => sys::prog_recursion_misses(fd.as_fd())
                .map_err(io_err("reading the tracker's recursion_misses")),
            None => Ok(0),
        };
        Ok((read(&self.pins.prog)?, read(&self.pins.prog_raw)?))
    }

    /// Write-like requests of the whole disk seen by the hooks: the larger count of the two (a
    /// request seen by either hook is recorded; a hook that is not attached counts nothing).
    fn write_requests_seen(&self) -> Result<u64, TrackError> {
        Ok(self
            .stat_sum(blkmirror_common::STAT_CLASSIC_WRITE_REQS)?
            .max(self.stat_sum(blkmirror_common::STAT_RAW_WRITE_REQS)?))
    }

    /// Sectors of the whole disk's write-like completions seen by the hooks: the larger sum of
    /// the two (0 with pins whose programs count no sectors).
    pub fn write_sectors_seen(&self) -> Result<u64, TrackError> {
        if !self.pins.sector_counts {
            return Ok(0);
        }
        Ok(self
            .stat_sum(blkmirror_common::STAT_CLASSIC_WRITE_SECTORS)?
            .max(self.stat_sum(blkmirror_common::STAT_RAW_WRITE_SECTORS)?))
    }

    /// The cross-check's counts now: the disk's completed write-like requests and sectors
    /// since the hooks were attached, and what the hooks counted of them (`None` when the disk
    /// keeps no statistics). Sectors are `None` with pins whose programs count none.
    pub fn cross_check_counts(&self) -> Result<Option<CrossCheckCounts>, TrackError> {
        let state = self.pins.state.words();
        let base = state[field::DISK_STAT_BASE].load(Ordering::SeqCst);
        let Some(disk) = device::completed_writes(self.device.disk_major, self.device.disk_minor)
        else {
            return Ok(None);
        };
        if base == NO_DISK_STATS {
            return Ok(None);
        }
        let sectors = if self.pins.sector_counts {
            let sector_base = self.stat_sum(blkmirror_common::STAT_DISK_SECTORS_BASE)?;
            Some((
                disk.sectors.wrapping_sub(sector_base),
                self.write_sectors_seen()?,
            ))
        } else {
            None
        };
        Ok(Some(CrossCheckCounts {
            disk_requests: disk.requests.wrapping_sub(base),
            hook_requests: self.write_requests_seen()?,
            sectors,
        }))
    }

    /// Whether the disk keeps I/O statistics, so that unseen requests can be detected.
    pub fn cross_checks_disk_stats(&self) -> bool {
        self.pins.state.words()[field::DISK_STAT_BASE].load(Ordering::SeqCst) != NO_DISK_STATS
    }

    /// Bitmask of the attached hooks (`HOOK_CLASSIC`, `HOOK_RAW`).
    pub fn hook_mask(&self) -> u64 {
        self.pins.state.words()[field::HOOKS].load(Ordering::SeqCst)
    }

    /// The completion log's tracefs instance, when there is one.
    pub fn completion_log_dir(&self) -> Option<&Path> {
        self.completion_log
            .as_ref()
            .map(completion_log::Drainer::path)
    }

    /// How far back the completion log holds every completion now: `Ok(None)` if it never
    /// overwrote one (a skip is recovered however long ago the previous cut was), `Err` if
    /// there is no log or its statistics cannot be read (a skip costs a verify sync).
    pub fn completion_log_reach(&self) -> Result<Option<std::time::Duration>, String> {
        let log = self
            .completion_log
            .as_ref()
            .ok_or("there is no completion log")?;
        Ok(log
            .reach_us(completion_log::monotonic_us())?
            .map(std::time::Duration::from_micros))
    }

    /// The memory the completion log's drainer holds (completions read out of the kernel and
    /// still inside a window a cut may ask for), at most [`completion_log::MAX_HELD_BYTES`];
    /// `None` without a completion log.
    pub fn completion_log_held_bytes(&self) -> Option<u64> {
        self.completion_log
            .as_ref()
            .map(completion_log::Drainer::held_bytes)
    }

    /// Whether the pins were adopted or created.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The tracking generation.
    pub fn generation(&self) -> u64 {
        self.pins.state.words()[field::GENERATION].load(Ordering::SeqCst)
    }

    /// The current (open) epoch.
    pub fn epoch(&self) -> u64 {
        self.pins.state.words()[field::EPOCH].load(Ordering::SeqCst)
    }

    /// Ends the current epoch and returns what was dirtied in it. Call [`Self::release`] once
    /// the result is consumed; until then the kernel keeps the data (a crash re-reports it).
    pub fn cut(&mut self) -> Result<Cut, TrackError> {
        // A previous cut that was never released stays in its slot and is reported again
        // when that slot is cut next: safe, so simply forget it.
        self.pending = None;
        // Read before the grace period: every request counted here had its tracepoint (and
        // our programs, if the kernel ran them) before it was counted.
        let stat_read_us = completion_log::monotonic_us();
        let disk_completed =
            device::completed_writes(self.device.disk_major, self.device.disk_minor);
        let state = self.pins.state.words();
        let epoch = state[field::EPOCH].load(Ordering::SeqCst);
        state[field::EPOCH].store(epoch + 1, Ordering::SeqCst);
        // After this no program invocation can still be using the old epoch.
        self.quiesce()?;
        let mut bitmaps = self.read_slot(epoch)?;
        if let Some(carry) = self.carry.take() {
            bitmaps.union(&carry);
        }
        let state = self.pins.state.words();
        let overflow = state[field::OVERFLOW].load(Ordering::SeqCst);
        // (The disk statistics were read before the grace period; the hooks' counters are
        // read after it, in `write_requests_seen`.)
        let overflow_acked = state[field::OVERFLOW_ACKED].load(Ordering::SeqCst);
        let (misses, raw_misses) = self.recursion_misses()?;
        let misses_acked = state[field::MISSES_ACKED].load(Ordering::SeqCst);
        let raw_misses_acked = state[field::RAW_MISSES_ACKED].load(Ordering::SeqCst);
        let (lost, recent_misses) = skipped_by_every_hook(
            state[field::HOOKS].load(Ordering::SeqCst),
            misses.saturating_sub(misses_acked),
            raw_misses.saturating_sub(raw_misses_acked),
            state[field::RECENT_MISSES].load(Ordering::SeqCst),
        );
        let mut reasons = Vec::new();
        let overflowed = overflow > overflow_acked;
        if overflowed {
            reasons.push(format!(
                "{} requests could not be recorded in the kernel (very large requests in one \
                 epoch, or passthrough writes to unknown places)",
                overflow - overflow_acked
            ));
        }
        if lost {
            reasons.push(format!(
                "the kernel skipped the tracker (BPF recursion protection: {} classic, {} raw \
                 misses), possibly for the same completion",
                misses.saturating_sub(misses_acked),
                raw_misses.saturating_sub(raw_misses_acked)
            ));
        }
        let unseen_acked = state[field::UNSEEN_ACKED].load(Ordering::SeqCst) as i64;
        let unseen = match (
            disk_completed,
            state[field::DISK_STAT_BASE].load(Ordering::SeqCst),
        ) {
            (Some(now), base) if base != NO_DISK_STATS => {
                let seen = self.write_requests_seen()?;
                unseen_since_base(now.requests, base, seen)
            }
            _ => unseen_acked,
        };
        let (unseen_sectors, unseen_sectors_acked) = if self.pins.sector_counts {
            let acked = self.stat_sum(blkmirror_common::STAT_UNSEEN_SECTORS_ACKED)? as i64;
            let base = self.stat_sum(blkmirror_common::STAT_DISK_SECTORS_BASE)?;
            match disk_completed {
                Some(now) if base != NO_DISK_STATS => {
                    let seen = self.write_sectors_seen()?;
                    (unseen_since_base(now.sectors, base, seen), acked)
                }
                _ => (acked, acked),
            }
        } else {
            (0, 0)
        };
        let new_unseen = (unseen - unseen_acked).max(0);
        let new_unseen_sectors = (unseen_sectors - unseen_sectors_acked).max(0);
        if new_unseen > 0 || new_unseen_sectors > 0 {
            reasons.push(format!(
                "the disk completed write request(s) that no hook saw ({new_unseen} request(s) \
                 and {new_unseen_sectors} sector(s) more than the hooks counted: the kernel did \
                 not run the tracker for them; Linux 6.18 does that to some completions while an \
                 RCU grace period runs, or while a program or trace event, such as another \
                 tracked device's, is attached to or detached from block_rq_complete)"
            ));
        }
        // Skips (not overflows: a passthrough write has no range) may still be in the log.
        let mut recovered = None;
        if !reasons.is_empty() && !overflowed {
            match self.recover_from_log(&mut bitmaps) {
                Ok(added) => {
                    recovered = Some(format!(
                        "{}; the completion log still held every completion since the last \
                         released cut: {added} logged completion(s) added to this cut \
                         instead of a verify sync",
                        reasons.join("; ")
                    ));
                    reasons.clear();
                }
                Err(why) => reasons.push(format!("the completion log cannot fill the gap: {why}")),
            }
        }
        self.pending = Some(Pending {
            epoch,
            overflow,
            misses,
            raw_misses,
            recent_misses,
            unseen: unseen.max(unseen_acked),
            unseen_sectors: unseen_sectors.max(unseen_sectors_acked),
            stat_read_us,
        });
        let extents = bitmaps.extents();
        Ok(Cut {
            epoch,
            bitmaps,
            extents,
            needs_verify: (!reasons.is_empty()).then(|| NeedsVerify {
                reason: reasons.join("; "),
            }),
            recovered,
        })
    }

    /// Marks every write-like completion the completion log holds since the last released cut
    /// read the disk's statistics (a skip found now happened after that) as written in
    /// `bitmaps`. Returns how many were logged, or why the log cannot be trusted to hold them.
    fn recover_from_log(&mut self, bitmaps: &mut DirtyBitmaps) -> Result<usize, String> {
        if self.completion_log.is_none() {
            return Err("there is no completion log".into());
        }
        if !self.pins.sector_counts {
            return Err("pins of an older version keep no time of the last released cut".into());
        }
        let since = self
            .stat_sum(blkmirror_common::STAT_RELEASED_CUT_US)
            .map_err(|e| e.to_string())?;
        if since == 0 {
            return Err("the time of the last released cut is unknown".into());
        }
        let log = self.completion_log.as_ref().expect("checked above");
        let logged = log.since(since)?;
        let (start, tracked) = (self.device.start_sector, self.device.nr_sectors);
        for completion in &logged {
            let end = completion.sector.saturating_add(completion.nr_sectors);
            if end <= start || completion.sector >= start + tracked {
                continue;
            }
            let first = completion.sector.max(start);
            bitmaps.apply_request(
                first - start,
                end.min(start + tracked) - first,
                ChangeKind::Write,
            );
        }
        Ok(logged.len())
    }

    /// Clears the slot of the last cut: its content has been consumed.
    pub fn release(&mut self) -> Result<(), TrackError> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        let slot = pending.epoch % SLOTS as u64;
        let wpk = self.geometry.words_per_kind();
        let scale = if self.pins.byte_map { 8 } else { 1 };
        let dirty = self.pins.dirty.words();
        for kind in 0..KINDS as u64 {
            let base = (bitmap_base(slot, kind, wpk) * scale) as usize;
            for word in &dirty[base..base + (wpk * scale) as usize] {
                word.store(0, Ordering::Relaxed);
            }
        }
        let cpus = possible_cpus()?;
        for big in [&mut self.pins.big, &mut self.pins.big_raw] {
            let empty = PerCpuValues::try_from(vec![BigList::default(); cpus])
                .map_err(io_err("building per-CPU values"))?;
            big.set(slot as u32, empty, 0)?;
        }
        let state = self.pins.state.words();
        state[field::OVERFLOW_ACKED].store(pending.overflow, Ordering::SeqCst);
        state[field::MISSES_ACKED].store(pending.misses, Ordering::SeqCst);
        state[field::RAW_MISSES_ACKED].store(pending.raw_misses, Ordering::SeqCst);
        state[field::RECENT_MISSES].store(pending.recent_misses, Ordering::SeqCst);
        state[field::UNSEEN_ACKED].store(pending.unseen as u64, Ordering::SeqCst);
        if self.pins.sector_counts {
            set_userspace_stat(
                &mut self.pins.stats,
                cpus,
                blkmirror_common::STAT_UNSEEN_SECTORS_ACKED,
                pending.unseen_sectors as u64,
            )?;
            set_userspace_stat(
                &mut self.pins.stats,
                cpus,
                blkmirror_common::STAT_RELEASED_CUT_US,
                pending.stat_read_us,
            )?;
            if let Some(drainer) = &self.completion_log {
                drainer.released(pending.stat_read_us);
            }
        }
        state[field::RELEASED].store(pending.epoch, Ordering::SeqCst);
        Ok(())
    }

    /// Copies the slot of `epoch` (bitmaps and big extents) into userspace.
    fn read_slot(&self, epoch: u64) -> Result<DirtyBitmaps, TrackError> {
        let slot = epoch % SLOTS as u64;
        let wpk = self.geometry.words_per_kind();
        let dirty = self.pins.dirty.words();
        let mut bitmaps = DirtyBitmaps::new(self.geometry);
        for kind in [ChangeKind::Write, ChangeKind::Discard, ChangeKind::Zeroes] {
            if self.pins.byte_map {
                let base = (bitmap_base(slot, kind.index(), wpk) * 8) as usize;
                let source = &dirty[base..base + (wpk * 8) as usize];
                for (dst, bytes) in bitmaps.words_mut(kind).iter_mut().zip(source.chunks(8)) {
                    *dst = bits_of_byte_words(bytes.iter().map(|w| w.load(Ordering::Relaxed)));
                }
                continue;
            }
            let base = bitmap_base(slot, kind.index(), wpk) as usize;
            let source = &dirty[base..base + wpk as usize];
            for (dst, src) in bitmaps.words_mut(kind).iter_mut().zip(source) {
                *dst = src.load(Ordering::Relaxed);
            }
        }
        for big in [&self.pins.big, &self.pins.big_raw] {
            let lists = big.get(&(slot as u32), 0)?;
            for list in lists.iter() {
                let valid = (list.count as usize).min(list.entries.len());
                for entry in &list.entries[..valid] {
                    bitmaps.apply_request(
                        entry.start,
                        entry.len,
                        ChangeKind::from_index(entry.kind),
                    );
                }
            }
        }
        Ok(bitmaps)
    }
}

/// Folds 8 byte-map words (one byte per chunk, little-endian, as the kernel program stores
/// them) into one bitmap word: bit `j * 8 + k` is set when byte `k` of word `j` is non-zero.
pub fn bits_of_byte_words(words: impl Iterator<Item = u64>) -> u64 {
    let mut bits = 0u64;
    for (j, word) in words.take(8).enumerate() {
        for (k, byte) in word.to_le_bytes().into_iter().enumerate() {
            if byte != 0 {
                bits |= 1 << (j * 8 + k);
            }
        }
    }
    bits
}

/// Whether a completion may have been skipped by every attached hook, given the new
/// `recursion_misses` of each program since the last cut and the `recent` bits of the previous
/// interval. Returns the verdict and the bits to remember for the next interval.
///
/// With both hooks attached, one completion runs both programs, and a single level of
/// nesting skips at most one of them; a completion is lost only if both were skipped. The two
/// counts of one completion are bumped one after the other, so they can fall on either side of
/// a cut: misses of the other hook in the previous interval count too.
pub fn skipped_by_every_hook(hooks: u64, classic: u64, raw: u64, recent: u64) -> (bool, u64) {
    let now = u64::from(classic > 0) | u64::from(raw > 0) << 1;
    let lost = match hooks & (HOOK_CLASSIC | HOOK_RAW) {
        HOOK_CLASSIC => classic > 0,
        HOOK_RAW => raw > 0,
        _ => {
            let (c, r) = (classic > 0, raw > 0);
            let (prev_c, prev_r) = (recent & 0b01 != 0, recent & 0b10 != 0);
            (c && (r || prev_r)) || (r && prev_c)
        }
    };
    (lost, now)
}

/// [`TrackState::disk_stat_base`] when the disk keeps no I/O statistics.
const NO_DISK_STATS: u64 = u64::MAX;

/// The cross-check's counts at one moment ([`Tracker::cross_check_counts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrossCheckCounts {
    /// Write and discard requests the disk completed since the hooks were attached.
    pub disk_requests: u64,
    /// Write-like completions the hooks saw (the larger count of the two hooks). More than
    /// the disk's when requests complete in parts, or for empty pre-flush writes, which the
    /// block layer leaves out of its request count.
    pub hook_requests: u64,
    /// The disk's write and discard sectors since the hooks were attached, and the hooks'
    /// (the larger sum of the two hooks); `None` with older pins.
    pub sectors: Option<(u64, u64)>,
}

/// What the disk completed beyond what the hooks saw: `(now - base) - seen`, for requests or
/// for sectors. Negative when completions are between their tracepoint and the statistics
/// update (and, for requests, when some completed in several parts, or were empty pre-flush
/// writes, which the block layer does not count): so the request count can hide a later
/// skip, while the sector count, which both sides add up per completion part, cannot. It
/// grows only when the kernel did not run the hooks for a completion.
pub fn unseen_since_base(disk_now: u64, disk_base: u64, seen: u64) -> i64 {
    let completed = i128::from(disk_now) - i128::from(disk_base);
    let unseen = completed - i128::from(seen);
    i64::try_from(unseen).unwrap_or(if unseen > 0 { i64::MAX } else { i64::MIN })
}

fn hook_names(mask: u64) -> &'static str {
    match mask & (HOOK_CLASSIC | HOOK_RAW) {
        HOOK_CLASSIC => "classic",
        HOOK_RAW => "raw",
        0 => "none",
        _ => "classic+raw",
    }
}

/// Stops tracking `path`: removes its pins (the program detaches once no process holds it).
/// The generation record stays, so the next start reports the gap.
pub fn untrack(path: &Path, options: &TrackOptions) -> Result<bool, TrackError> {
    let device = device::inspect(path)?;
    let _lock = lock_device(&device)?;
    let dir = pin_dir(&options.pin_root, &device);
    if !dir.exists() {
        return Ok(false);
    }
    remove_pins(&dir)?;
    let log_dir = CompletionLog::dir(Path::new(environment::TRACEFS), device.major, device.minor);
    CompletionLog::remove(&log_dir).map_err(io_err(format!("removing {}", log_dir.display())))?;
    Ok(true)
}

fn lock_device(device: &BlockDevice) -> Result<fs::File, TrackError> {
    fs::create_dir_all(LOCK_DIR).map_err(io_err(format!("creating {LOCK_DIR}")))?;
    let lock = PathBuf::from(format!(
        "{LOCK_DIR}/track-{}-{}.lock",
        device.major, device.minor
    ));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(io_err(format!("opening {}", lock.display())))?;
    // A lock held by another tracker stays held, so a short wait costs a refused second tracker
    // nothing. It is there for the lock a process's own child holds for a moment: a thread that
    // spawns a program forks a copy of every open file, the lock's too, and closes it only at the
    // exec, so a lock just released could be seen as busy.
    let give_up = Instant::now() + LOCK_PATIENCE;
    while !sys::try_lock_exclusive(&file).map_err(io_err(format!("locking {}", lock.display())))? {
        if Instant::now() >= give_up {
            return Err(TrackError::Busy {
                device: device.path.clone(),
                lock,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(file)
}

/// How long taking a device's lock waits for a holder to let go before calling the device busy.
const LOCK_PATIENCE: Duration = Duration::from_millis(500);

enum PinsState {
    Absent,
    Broken(String),
}

const PIN_STATE: &str = "state";
const PIN_DIRTY: &str = "dirty";
const PIN_BIG: &str = "big";
const PIN_PROG: &str = "prog";
const PIN_LINK: &str = "link";
const PIN_BIG_RAW: &str = "big_raw";
const PIN_STATS: &str = "stats";
const PIN_PROG_RAW: &str = "prog_raw";
const PIN_LINK_RAW: &str = "link_raw";

fn open_pins(dir: &Path, device: &BlockDevice, geometry: &Geometry) -> Result<Pins, PinsState> {
    let state_path = dir.join(PIN_STATE);
    if !state_path.exists() {
        return Err(if dir.exists() {
            PinsState::Broken("incomplete pins (no state map)".into())
        } else {
            PinsState::Absent
        });
    }
    let broken = |what: &str| {
        let what = what.to_owned();
        move |e: &dyn std::fmt::Display| PinsState::Broken(format!("{what}: {e}"))
    };
    let state_map = MapData::from_pin(&state_path).map_err(|e| broken("state map")(&e))?;
    let state = sys::MappedWords::map(state_map.fd().as_fd(), field::WORDS)
        .map_err(|e| broken("mapping the state map")(&e))?;
    if state.words()[field::MAGIC].load(Ordering::SeqCst) != STATE_MAGIC {
        return Err(PinsState::Broken(
            "the pinned state has another layout version or was never initialised".into(),
        ));
    }
    check_geometry(&state, device, geometry).map_err(PinsState::Broken)?;
    let dirty_map = MapData::from_pin(dir.join(PIN_DIRTY)).map_err(|e| broken("dirty map")(&e))?;
    let byte_map = state.words()[field::BYTE_MAP].load(Ordering::SeqCst) != 0;
    let total = dirty_words(geometry, byte_map) as usize;
    let dirty = sys::MappedWords::map(dirty_map.fd().as_fd(), total)
        .map_err(|e| broken("mapping the dirty map")(&e))?;
    let big_map = |name: &str| {
        let map = MapData::from_pin(dir.join(name)).map_err(|e| broken(name)(&e))?;
        PerCpuArray::try_from(Map::PerCpuArray(map)).map_err(|e| broken(name)(&e))
    };
    let big = big_map(PIN_BIG)?;
    let stats_map = MapData::from_pin(dir.join(PIN_STATS)).map_err(|e| broken(PIN_STATS)(&e))?;
    // Pins made by a version whose programs count no invocations have fewer entries.
    // (Only x86 makes the programs' atomic add a full barrier: see `STAT_CLASSIC_ENTERS`.)
    let stats_entries = stats_map
        .info()
        .map_or(0, |info| info.max_entries() as usize);
    let invocation_counts = cfg!(target_arch = "x86_64")
        && !byte_map
        && stats_entries >= blkmirror_common::STATS_BEFORE_SECTORS;
    let sector_counts = stats_entries >= blkmirror_common::STATS;
    let stats =
        PerCpuArray::try_from(Map::PerCpuArray(stats_map)).map_err(|e| broken(PIN_STATS)(&e))?;
    let big_raw = big_map(PIN_BIG_RAW)?;
    let prog = |prog: &str, link: &str| -> Result<ProgramFd, PinsState> {
        let fd = ProgramInfo::from_pin(dir.join(prog))
            .and_then(|info| info.fd())
            .map_err(|e| broken(prog)(&e))?;
        PinnedLink::from_pin(dir.join(link)).map_err(|e| broken(link)(&e))?;
        Ok(fd)
    };
    let hooks = state.words()[field::HOOKS].load(Ordering::SeqCst);
    if hooks & (HOOK_CLASSIC | HOOK_RAW) == 0 {
        return Err(PinsState::Broken("no hook was attached".into()));
    }
    let prog_classic = if hooks & HOOK_CLASSIC != 0 {
        Some(prog(PIN_PROG, PIN_LINK)?)
    } else {
        None
    };
    let prog_raw = if hooks & HOOK_RAW != 0 {
        Some(prog(PIN_PROG_RAW, PIN_LINK_RAW)?)
    } else {
        None
    };
    Ok(Pins {
        stats,
        state,
        dirty,
        big,
        big_raw,
        prog: prog_classic,
        prog_raw,
        byte_map,
        invocation_counts,
        sector_counts,
    })
}

/// Words of the DIRTY map: one bit per chunk per slot and kind, or one byte in a byte map.
fn dirty_words(geometry: &Geometry, byte_map: bool) -> u64 {
    geometry.words_per_kind() * (SLOTS * KINDS) as u64 * if byte_map { 8 } else { 1 }
}

/// Whether pinned state describes this device and chunk size; `Err` says what differs.
fn check_geometry(
    state: &sys::MappedWords,
    device: &BlockDevice,
    geometry: &Geometry,
) -> Result<(), String> {
    let state = state.words();
    let get = |i: usize| state[i].load(Ordering::SeqCst);
    let pinned_shift = get(field::CHUNK_SHIFT);
    if pinned_shift != geometry.chunk_shift {
        return Err(format!(
            "chunk size changed from {} to {} bytes: a new tracking generation starts",
            512u64 << pinned_shift.min(20),
            geometry.chunk_bytes()
        ));
    }
    if get(field::DEV) != u64::from(device.kernel_dev())
        || get(field::START_SECTOR) != device.start_sector
        || get(field::NR_SECTORS) != device.nr_sectors
        || get(field::WORDS_PER_KIND) != geometry.words_per_kind()
    {
        return Err(format!(
            "the device changed (pinned: dev {:#x}, start {}, {} sectors; now dev {:#x}, start {}, \
             {} sectors): a new tracking generation starts",
            get(field::DEV),
            get(field::START_SECTOR),
            get(field::NR_SECTORS),
            device.kernel_dev(),
            device.start_sector,
            device.nr_sectors
        ));
    }
    Ok(())
}

/// What to create: the device, its geometry and layouts, and the hooks wanted.
struct CreateSpec<'a> {
    device: &'a BlockDevice,
    geometry: &'a Geometry,
    layout: &'a RqCompleteLayout,
    /// The raw hook's layout; `None` when the raw hook is not wanted or not possible.
    request_layout: Option<&'a RequestLayout>,
    /// `HOOK_*` bits.
    wanted: u64,
    /// Attach the classic hook if the raw one cannot be attached.
    classic_fallback: bool,
    /// Use a byte map (no BPF atomics).
    byte_map: bool,
}

/// Loads the tracker, pins it under `dir` and attaches the wanted hooks. When the raw hook
/// cannot be attached but the classic one can stand in, says why in `notes` (the classic hook
/// alone still tracks completely).
fn create_pins(
    dir: &Path,
    spec: &CreateSpec<'_>,
    notes: &mut Vec<String>,
) -> Result<(), TrackError> {
    let mut result = try_create_pins(dir, spec, notes);
    if let Err(TrackError::Env(EnvError::NoBpfAtomics { .. })) = &result {
        // Degrade: a byte per chunk, written with plain stores.
        let _ = remove_pins(dir);
        let words = dirty_words(spec.geometry, true);
        if words * 8 > MAX_BITMAP_BYTES {
            return Err(TrackError::TooLarge {
                device: spec.device.path.clone(),
                words,
                chunk: spec.geometry.chunk_bytes(),
            });
        }
        let byte_spec = CreateSpec {
            byte_map: true,
            ..*spec
        };
        result = try_create_pins(dir, &byte_spec, notes);
    }
    if result.is_err() {
        // Leave nothing half-made behind, and say why earlier choices were made (a raw hook that
        // could not be attached explains why the classic one was tried).
        let _ = remove_pins(dir);
        for note in notes.iter() {
            eprintln!("blkmirror: {note}");
        }
    }
    result
}

fn missing_in_object(what: &'static str, name: &str) -> TrackError {
    TrackError::Pins {
        what,
        path: name.into(),
        detail: "the embedded eBPF object is not the one this binary expects; rebuild blkmirror"
            .into(),
    }
}

fn try_create_pins(
    dir: &Path,
    spec: &CreateSpec<'_>,
    notes: &mut Vec<String>,
) -> Result<(), TrackError> {
    let &CreateSpec {
        device,
        geometry,
        layout,
        request_layout,
        mut wanted,
        classic_fallback,
        byte_map,
    } = spec;
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let wpk = geometry.words_per_kind();
    let total_words = dirty_words(geometry, byte_map);
    let byte_map_flag = u64::from(byte_map);
    let flags = if device.zoned {
        blkmirror_common::FLAG_ZONED
    } else {
        0
    };
    let target_dev = u64::from(device.kernel_dev());
    let raw = request_layout.copied().unwrap_or(RequestLayout {
        rq_cmd_flags: 0,
        rq_sector: 0,
        rq_q: 0,
        q_disk: 0,
        disk_in_rq: 0,
        disk_major: 0,
        disk_first_minor: 0,
        op_read: 0,
        op_write: 1,
        op_flush: 2,
        op_discard: 3,
        op_secure_erase: 5,
        op_write_zeroes: 9,
        op_drv_out: 35,
    });
    let disk_dev_adjacent = u64::from(raw.disk_first_minor == raw.disk_major + 4);
    let mut loader = EbpfLoader::new();
    for (name, value) in [
        ("TARGET_DEV", &target_dev),
        ("START_SECTOR", &device.start_sector),
        ("NR_SECTORS", &device.nr_sectors),
        ("CHUNK_SHIFT", &geometry.chunk_shift),
        ("WORDS_PER_KIND", &wpk),
        ("FLAGS", &flags),
        ("OFF_DEV", &layout.dev),
        ("OFF_SECTOR", &layout.sector),
        ("OFF_NR_SECTOR", &layout.nr_sector),
        ("OFF_ERROR", &layout.error),
        ("OFF_RWBS", &layout.rwbs),
        ("OFF_RQ_CMD_FLAGS", &raw.rq_cmd_flags),
        ("OFF_RQ_SECTOR", &raw.rq_sector),
        ("OFF_RQ_Q", &raw.rq_q),
        ("OFF_Q_DISK", &raw.q_disk),
        ("DISK_IN_RQ", &raw.disk_in_rq),
        ("OFF_DISK_MAJOR", &raw.disk_major),
        ("OFF_DISK_FIRST_MINOR", &raw.disk_first_minor),
        ("OP_READ", &raw.op_read),
        ("OP_WRITE", &raw.op_write),
        ("OP_FLUSH", &raw.op_flush),
        ("OP_DISCARD", &raw.op_discard),
        ("OP_SECURE_ERASE", &raw.op_secure_erase),
        ("OP_WRITE_ZEROES", &raw.op_write_zeroes),
        ("OP_DRV_OUT", &raw.op_drv_out),
        ("DISK_DEV_ADJACENT", &disk_dev_adjacent),
    ] {
        loader.override_global(name, value, true);
    }
    let mut ebpf = loader
        .map_max_entries(
            "DIRTY",
            u32::try_from(total_words.max(1)).unwrap_or(u32::MAX),
        )
        .load(EBPF_OBJECT)
        .map_err(TrackError::Load)?;

    // Load (verify) the classic program first: from then on it holds references to the maps.
    let (classic_name, raw_name) = program_names(byte_map);
    let classic: &mut TracePoint = ebpf
        .program_mut(classic_name)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| missing_in_object("the eBPF object lacks program", classic_name))?;
    classic.load().map_err(classify_load_error)?;

    let mut state_map = None;
    for (name, pin_name) in [
        ("STATE", PIN_STATE),
        ("DIRTY", PIN_DIRTY),
        ("BIG", PIN_BIG),
        ("BIG_RAW", PIN_BIG_RAW),
        ("STATS", PIN_STATS),
    ] {
        let path = dir.join(pin_name);
        let map = ebpf
            .map(name)
            .ok_or_else(|| missing_in_object("the eBPF object lacks map", name))?;
        map.pin(&path).map_err(|e| TrackError::Pins {
            what: "pinning map at",
            path: path.clone(),
            detail: e.to_string(),
        })?;
        if name == "STATE" {
            state_map = Some(MapData::from_pin(&path).map_err(|e| TrackError::Pins {
                what: "opening pinned map",
                path,
                detail: e.to_string(),
            })?);
        }
    }
    let state_map =
        state_map.ok_or_else(|| missing_in_object("the eBPF object lacks map", "STATE"))?;

    // Initialise the state before any program is attached; the magic goes last.
    let state = sys::MappedWords::map(state_map.fd().as_fd(), field::WORDS)
        .map_err(io_err("mapping the state map"))?;
    let words = state.words();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for (index, value) in [
        (field::EPOCH, 1),
        (field::RELEASED, 0),
        (field::GENERATION, random_generation()?),
        (field::DEV, target_dev),
        (field::START_SECTOR, device.start_sector),
        (field::NR_SECTORS, device.nr_sectors),
        (field::CHUNK_SHIFT, geometry.chunk_shift),
        (field::WORDS_PER_KIND, wpk),
        (field::CREATED_UNIX, now),
        (field::HOOKS, 0),
        (field::BYTE_MAP, byte_map_flag),
    ] {
        words[index].store(value, Ordering::SeqCst);
    }
    words[field::MAGIC].store(STATE_MAGIC, Ordering::SeqCst);

    // The raw hook first: if it cannot be attached, the classic hook alone is still complete.
    let mut attached = 0;
    if wanted & HOOK_RAW != 0 {
        let result = match request_layout {
            Some(_) => attach_raw(&mut ebpf, dir, raw_name),
            None => Err("no usable kernel BTF".to_owned()),
        };
        match result {
            Ok(()) => attached |= HOOK_RAW,
            Err(why) if wanted & HOOK_CLASSIC != 0 || classic_fallback => {
                notes.push(format!("not {HOOK_RAW_NAME}: {why}"));
                wanted |= HOOK_CLASSIC;
            }
            Err(why) => return Err(TrackError::Env(EnvError::NoRawHook(why))),
        }
    }
    words[field::HOOKS].store(attached, Ordering::SeqCst);
    if wanted & HOOK_CLASSIC != 0 {
        let classic: &mut TracePoint = ebpf
            .program_mut(classic_name)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| missing_in_object("the eBPF object lacks program", classic_name))?;
        let link_id = classic
            .attach("block", "block_rq_complete")
            .map_err(TrackError::Attach)?;
        let link = classic.take_link(link_id).map_err(TrackError::Attach)?;
        let fd_link: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| TrackError::Pins {
                what: "the kernel gave no bpf_link for",
                path: HOOK.into(),
                detail: format!(
                    "{e} (kernel older than 5.15?); tracking could not outlive the process"
                ),
            })?;
        pin_link_and_prog(fd_link, dir, PIN_LINK)?;
        classic
            .pin(dir.join(PIN_PROG))
            .map_err(|e| TrackError::Pins {
                what: "pinning program at",
                path: dir.join(PIN_PROG),
                detail: e.to_string(),
            })?;
        attached |= HOOK_CLASSIC;
        words[field::HOOKS].store(attached, Ordering::SeqCst);
    }
    // The baseline of the cross-check: after a grace period every request still to be counted
    // by the disk will have run the attached hooks.
    sys::membarrier_global().map_err(io_err("membarrier(MEMBARRIER_CMD_GLOBAL)"))?;
    let base_read_us = completion_log::monotonic_us();
    let base = device::completed_writes(device.disk_major, device.disk_minor);
    let mut stats: PerCpuArray<_, u64> = ebpf
        .map_mut("STATS")
        .ok_or_else(|| missing_in_object("the eBPF object lacks map", "STATS"))
        .and_then(|map| {
            PerCpuArray::try_from(map).map_err(|e| TrackError::Pins {
                what: "opening the statistics map at",
                path: dir.join(PIN_STATS),
                detail: e.to_string(),
            })
        })?;
    let cpus = possible_cpus()?;
    set_userspace_stat(
        &mut stats,
        cpus,
        blkmirror_common::STAT_DISK_SECTORS_BASE,
        base.map_or(NO_DISK_STATS, |counts| counts.sectors),
    )?;
    set_userspace_stat(
        &mut stats,
        cpus,
        blkmirror_common::STAT_UNSEEN_SECTORS_ACKED,
        0,
    )?;
    set_userspace_stat(
        &mut stats,
        cpus,
        blkmirror_common::STAT_RELEASED_CUT_US,
        base_read_us,
    )?;
    words[field::DISK_STAT_BASE].store(
        base.map_or(NO_DISK_STATS, |counts| counts.requests),
        Ordering::SeqCst,
    );
    words[field::UNSEEN_ACKED].store(0, Ordering::SeqCst);
    Ok(())
}

/// Stores `value` in a `STATS` entry that only userspace writes (CPU 0's element; the others
/// zero, so the sum over CPUs is the value).
fn set_userspace_stat<T: std::borrow::BorrowMut<MapData>>(
    stats: &mut PerCpuArray<T, u64>,
    cpus: usize,
    index: u32,
    value: u64,
) -> Result<(), TrackError> {
    let mut values = vec![0; cpus];
    values[0] = value;
    let values = PerCpuValues::try_from(values).map_err(io_err("building per-CPU values"))?;
    stats.set(index, values, 0)?;
    Ok(())
}

/// The possible CPUs: the length of a per-CPU map value.
fn possible_cpus() -> Result<usize, TrackError> {
    aya::util::nr_cpus().map_err(|(what, source)| TrackError::Io {
        what: what.to_owned(),
        source,
    })
}

fn pin_link_and_prog(link: FdLink, dir: &Path, name: &str) -> Result<(), TrackError> {
    let path = dir.join(name);
    link.pin(&path).map_err(|e| TrackError::Pins {
        what: "pinning link at",
        path,
        detail: e.to_string(),
    })?;
    Ok(())
}

/// The classic and raw program names: the byte-map variants hold no atomic OR instruction,
/// which kernels before 5.12 refuse anywhere in a program.
fn program_names(byte_map: bool) -> (&'static str, &'static str) {
    if byte_map {
        ("block_rq_complete_bytes", "block_rq_complete_raw_bytes")
    } else {
        ("block_rq_complete", "block_rq_complete_raw")
    }
}

/// Loads, attaches and pins the raw-tracepoint program; `Err` says why it cannot be used.
fn attach_raw(ebpf: &mut aya::Ebpf, dir: &Path, name: &str) -> Result<(), String> {
    let program: &mut RawTracePoint = ebpf
        .program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or("the embedded eBPF object lacks it")?;
    program
        .load()
        .map_err(|e| format!("the verifier refused it on this kernel ({e})"))?;
    let link_id = program
        .attach("block_rq_complete")
        .map_err(|e| format!("attaching failed ({e})"))?;
    let link = program
        .take_link(link_id)
        .map_err(|e| format!("attaching failed ({e})"))?;
    pin_link_and_prog(FdLink::from(link), dir, PIN_LINK_RAW).map_err(|e| e.to_string())?;
    program
        .pin(dir.join(PIN_PROG_RAW))
        .map_err(|e| format!("pinning failed ({e})"))?;
    Ok(())
}

fn remove_pins(dir: &Path) -> Result<(), TrackError> {
    for name in [
        PIN_LINK,
        PIN_LINK_RAW,
        PIN_PROG,
        PIN_PROG_RAW,
        PIN_STATE,
        PIN_DIRTY,
        PIN_BIG,
        PIN_BIG_RAW,
        PIN_STATS,
    ] {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing pin {}", path.display()))(e)),
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("removing {}", dir.display()))(e)),
    }
}

fn random_generation() -> Result<u64, TrackError> {
    use std::io::Read as _;
    let mut bytes = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io_err("reading /dev/urandom"))?;
    // Zero would look like "never initialised".
    Ok(u64::from_le_bytes(bytes) | 1)
}

/// The generation record, if there is one this build can read. A record it cannot read
/// (damaged, or from a newer release) is no record: the history is unknown, so the tracker
/// says `needs_verify`, which is always safe.
fn read_record(path: &Path) -> Option<GenerationRecord> {
    let text = fs::read_to_string(path).ok()?;
    serde_json::from_str::<GenerationRecord>(&text)
        .ok()
        .filter(|record| record.format <= GENERATION_FORMAT)
}

fn write_record(
    state_dir: &Path,
    path: &Path,
    record: &GenerationRecord,
) -> Result<(), TrackError> {
    fs::create_dir_all(state_dir).map_err(io_err(format!("creating {}", state_dir.display())))?;
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string(record)
        .map_err(|e| io_err("encoding generation record")(std::io::Error::other(e)))?;
    let mut file = fs::File::create(&tmp).map_err(io_err(format!("writing {}", tmp.display())))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io_err(format!("renaming {}", tmp.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn byte_map_words_fold_into_bits() {
        assert_eq!(bits_of_byte_words([0u64; 8].into_iter()), 0);
        let mut words = [0u64; 8];
        words[0] = 0x01; // chunk 0
        words[0] |= 0x01 << 56; // chunk 7
        words[3] = 0x0100; // chunk 25
        words[7] = 0x01 << 56; // chunk 63
        assert_eq!(
            bits_of_byte_words(words.into_iter()),
            1 | 1 << 7 | 1 << 25 | 1 << 63
        );
        assert_eq!(
            bits_of_byte_words([0x0101_0101_0101_0101u64; 8].into_iter()),
            u64::MAX
        );
    }

    use super::*;

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_shift(4096).unwrap(), 3);
        assert_eq!(chunk_shift(65536).unwrap(), 7);
        assert_eq!(chunk_shift(1 << 20).unwrap(), 11);
        assert!(chunk_shift(2048).is_err());
        assert!(chunk_shift(3 << 12).is_err());
        assert!(chunk_shift(2 << 20).is_err());
    }

    #[test]
    fn a_completion_is_lost_only_if_every_attached_hook_missed() {
        // One hook: any miss may be a lost completion.
        assert_eq!(skipped_by_every_hook(HOOK_CLASSIC, 1, 0, 0), (true, 0b01));
        assert_eq!(skipped_by_every_hook(HOOK_RAW, 0, 2, 0), (true, 0b10));
        assert_eq!(skipped_by_every_hook(HOOK_RAW, 3, 0, 0), (false, 0b01));
        // Both: one hook's misses alone are covered by the other.
        let both = HOOK_CLASSIC | HOOK_RAW;
        assert_eq!(skipped_by_every_hook(both, 5, 0, 0), (false, 0b01));
        assert_eq!(skipped_by_every_hook(both, 0, 5, 0), (false, 0b10));
        assert_eq!(skipped_by_every_hook(both, 1, 1, 0), (true, 0b11));
        // Counts of one completion straddling a cut.
        assert_eq!(skipped_by_every_hook(both, 0, 1, 0b01), (true, 0b10));
        assert_eq!(skipped_by_every_hook(both, 1, 0, 0b10), (true, 0b01));
        // Nothing new: whatever the previous interval saw was reported then.
        assert_eq!(skipped_by_every_hook(both, 0, 0, 0b11), (false, 0));
        assert_eq!(skipped_by_every_hook(both, 0, 0, 0), (false, 0));
    }

    #[test]
    fn unseen_counts_grow_only_with_completions_no_hook_saw() {
        // 100 completed since the baseline, 100 seen: nothing unseen.
        assert_eq!(unseen_since_base(1100, 1000, 100), 0);
        // Requests between their tracepoint and the statistics update: negative, harmless.
        assert_eq!(unseen_since_base(1090, 1000, 100), -10);
        // Two requests the kernel never showed to the hooks.
        assert_eq!(unseen_since_base(1102, 1000, 100), 2);
        assert_eq!(unseen_since_base(0, u64::MAX - 1, 0), i64::MIN);
    }

    #[test]
    fn state_field_indexes_match_layout() {
        assert_eq!(field::MAGIC, 0);
        assert_eq!(field::EPOCH, 1);
        assert_eq!(field::WORDS * 8, size_of::<TrackState>());
    }
}
