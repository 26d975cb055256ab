//! The completion log: a tracefs instance that keeps the tracked disk's recent write-like
//! completions in an overwriting ring buffer, read out every second ([`Drainer`]) and used only
//! when the kernel skipped the tracker.
//!
//! On Linux 6.18 the kernel skips the tracing programs of some completions (during an RCU grace
//! period, or while any probe is attached to or detached from `block_rq_complete`), and counts
//! no miss. The statistics cross-check sees that a skip happened, but not where. The trace event
//! of the same tracepoint, enabled in a tracefs instance of our own, records those completions
//! (measured: ftrace saw every completion the programs missed). So when the cross-check fires,
//! the tracker reads back the logged completions since shortly before the previous cut and
//! marks them dirty: one skipped request then costs a read of its chunks, not a verify sync
//! that reads the whole device.
//!
//! The buffer overwrites its oldest events, so it only reaches back so far. It is read out
//! through `trace_pipe`, which consumes what it reads ([`CompletionLog::since`]): the
//! non-consuming `trace` file, read while a busy disk overwrites its full buffer, loses its
//! place. Measured at 5,000 random 4 KiB writes a second with a cut every second (Linux 6.18,
//! 180 cuts): the kernel skipped the tracker in 38 cuts, and 18 of those cost a verify sync
//! because the `trace` read had skipped ahead; read out through `trace_pipe`, a rerun had 34
//! skips and all 34 were recovered. A consuming read's lost-events marker is exact: what was
//! overwritten came before that CPU's next event. A window is trusted only when nothing in it
//! can be missing that way; otherwise the tracker falls back to the verify sync, as before.
//! What was read out and a later window may still ask for stays in memory, and the time of
//! the read goes to `/run/blkmirror/INSTANCE.read`, so that a later process does not trust a
//! window whose completions an earlier one took, unless that one stopped cleanly and handed
//! them over ([`CompletionLog::hand_over`], `/run/blkmirror/INSTANCE.held`).
//!
//! How far back it reaches depends on the disk's completion rate: [`CompletionLog::reach_us`]
//! says it from the buffers' statistics at every cut (what each CPU overwrote since the last
//! read), and the agent reports it (`status`, the
//! metric `blkmirror_completion_log_reach_seconds`) and warns when it is shorter than what a
//! cut needs. The buffer size is a device setting (`completion_log`).
//!
//! A log made or changed (its buffer resized) after the tracking it serves began (adopted
//! pins) holds nothing from before: it is trusted only for windows that start after that
//! ([`CompletionLog::since`]), and its reach counts from then.
//!
//! Costs: [`buffer_kb_per_cpu`] of kernel memory per CPU for each tracked device by default
//! (2 MiB per CPU up to 8 CPUs, 16 MiB in all beyond), and the trace event on
//! every completion of the disk (the filter drops other disks and reads). Enabling the event is
//! itself a probe change on the tracepoint, which can make the kernel skip the programs already
//! attached (other tracked devices' included) at that moment: the instance is made once, before
//! the device's hooks are attached, and kept, like the pins, until `untrack`.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// How often a [`Drainer`] reads the log out: the kernel's buffer then only has to hold this
/// long of the disk's completions, however far apart the cuts are.
pub const DRAIN_EVERY: Duration = Duration::from_secs(1);

/// The most completions kept read out (24 bytes each, 24 MiB in all): past it, the oldest half
/// is given up (a skip whose window reaches back into it costs a verify sync) rather than
/// memory. At 5,000 writes a second that is about 200 s of reach.
const MAX_HELD: usize = 1 << 20;

/// The most memory the completions held read out take, in bytes.
pub const MAX_HELD_BYTES: u64 = (MAX_HELD * std::mem::size_of::<LoggedCompletion>()) as u64;

/// The longest one read of the log may take: the cut reads it under the file system freeze
/// when the kernel skipped the tracker, and a disk completing faster than the log is parsed
/// would otherwise keep the reader going. A drain cut short takes up the rest at the next; a
/// cut's read cut short costs a verify sync.
const READ_FOR_AT_MOST: Duration = Duration::from_secs(1);

/// Kernel ring buffer of one device's log, over all CPUs: room for about 280,000 completions
/// (an event takes about 60 bytes).
pub const BUFFER_KB_TOTAL: u64 = 16 * 1024;

/// The ring buffer per CPU for `cpus` possible CPUs: [`BUFFER_KB_TOTAL`] shared out, between
/// 256 KiB and 2 MiB each (completions land on the CPUs that complete the disk's requests,
/// often a few, so a CPU's share is not cut below what a busy one needs).
pub fn buffer_kb_per_cpu(cpus: usize) -> u64 {
    (BUFFER_KB_TOTAL / cpus.max(1) as u64).clamp(256, 2048)
}

/// How far before the previous cut's statistics read the window starts: a completion's
/// tracepoint runs microseconds before the block layer counts it, so a second is ample.
const WINDOW_MARGIN_US: u64 = 1_000_000;

/// Where the window of the cut after one that read the disk's statistics at `cut_us` starts.
fn window_start(cut_us: u64) -> u64 {
    cut_us.saturating_sub(WINDOW_MARGIN_US)
}

/// One logged completion: absolute sectors on the whole disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoggedCompletion {
    /// CLOCK_MONOTONIC time of the event, in microseconds.
    pub at_us: u64,
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub nr_sectors: u64,
}

/// The smallest and largest ring buffer per CPU that the `completion_log` setting takes.
pub const SETTING_KB_PER_CPU: std::ops::RangeInclusive<u64> = 256..=256 * 1024;

/// A tracefs instance recording one disk's write-like completions.
#[derive(Debug)]
pub struct CompletionLog {
    dir: PathBuf,
    /// Completions before this time (CLOCK_MONOTONIC, microseconds) may be missing: the
    /// instance was made or changed then, the kernel overwrote some before they were read, or
    /// another process read them out (0: none is).
    holds_from_us: u64,
    /// Completions read out of the kernel's buffer and still inside a window that may be asked
    /// for (a read consumes them).
    held: Vec<LoggedCompletion>,
    /// Each CPU's `overrun` count after the last read (what it overwrote since is new).
    overrun_at_read: Vec<(String, u64)>,
    /// When this process last read the log out (as its record in `/run` says; 0: never).
    last_read_us: u64,
}

impl CompletionLog {
    /// The instance's directory for a tracked device (its own major:minor, so that trackers of
    /// two partitions of one disk each have one).
    pub fn dir(tracefs: &Path, major: u32, minor: u32) -> PathBuf {
        tracefs.join(format!("instances/blkmirror-{major}-{minor}"))
    }

    /// Opens the instance at `dir`, making and enabling it when it is missing or not set up as
    /// this tracker needs. `disk_dev` is the whole disk's kernel `dev_t` (as the event's `dev`
    /// field holds it). Returns the log and whether anything was changed (then the kernel may
    /// have skipped attached programs meanwhile).
    pub fn open_or_create(dir: &Path, disk_dev: u64, buffer_kb: u64) -> io::Result<(Self, bool)> {
        let filter = event_filter(disk_dev);
        let wanted_kb = buffer_kb;
        let buffer_kb = buffer_kb.to_string();
        let event = dir.join("events/block/block_rq_complete");
        if !dir.exists() {
            fs::create_dir(dir)?;
        }
        let mut changed = false;
        let mut ensure = |path: PathBuf, wanted: &str, check: &dyn Fn(&str) -> bool| {
            let now = read_control_file(&path)?;
            if !check(now.trim()) {
                fs::write(&path, wanted)?;
                changed = true;
            }
            io::Result::Ok(())
        };
        ensure(dir.join("buffer_size_kb"), &buffer_kb, &|now| {
            now.split_whitespace()
                .next()
                .and_then(|kb| kb.parse().ok())
                .is_some_and(|kb| buffer_is_as_asked(kb, wanted_kb))
        })?;
        // `trace_clock` lists every clock, the current one in brackets.
        ensure(dir.join("trace_clock"), "mono", &|now| {
            now.split_whitespace().any(|clock| clock == "[mono]")
        })?;
        ensure(dir.join("options/overwrite"), "1", &|now| now == "1")?;
        ensure(event.join("filter"), &filter, &|now| now == filter)?;
        ensure(event.join("enable"), "1", &|now| now == "1")?;
        ensure(dir.join("tracing_on"), "1", &|now| now == "1")?;
        let opened_us = monotonic_us();
        // What an earlier process read out of the buffer is gone from it, unless it handed
        // what it read over (`Self::hand_over`) until the very read the record names.
        let record = fs::read_to_string(Self::read_record(dir)).ok();
        let read_out_until = match &record {
            Some(text) => text.trim().parse().unwrap_or(opened_us).min(opened_us),
            None => 0,
        };
        let handed = fs::read_to_string(Self::held_record(dir)).ok();
        // Taken once: a later process must not take it again after this one read further.
        let _ = fs::remove_file(Self::held_record(dir));
        let handed = handed
            .and_then(|text| parse_handed_over(&text))
            .filter(|handed| {
                record.as_deref().map(str::trim) == Some(&handed.read_until_us.to_string())
            });
        let (holds_from_us, held) = match handed {
            _ if changed => (opened_us, Vec::new()),
            Some(handed) => (handed.holds_from_us, handed.held),
            None => (read_out_until, Vec::new()),
        };
        Ok((
            Self {
                dir: dir.to_owned(),
                holds_from_us,
                held,
                overrun_at_read: Vec::new(),
                last_read_us: 0,
            },
            changed,
        ))
    }

    /// Reads the log out one last time and leaves what a later window may ask for (from
    /// `keep_from_us` on) to the next process of this device, in `/run`: a clean stop (an
    /// upgrade, a restart) then does not cost the window it falls in, which the next process
    /// could not trust otherwise (this one took its completions out of the kernel).
    pub fn hand_over(&mut self, keep_from_us: u64) -> Result<(), String> {
        self.drain(keep_from_us)?;
        let text = handed_over_text(&HandedOver {
            read_until_us: self.last_read_us,
            holds_from_us: self.holds_from_us,
            held: std::mem::take(&mut self.held),
        });
        let path = Self::held_record(&self.dir);
        let partial = path.with_extension("held.partial");
        fs::write(&partial, text)
            .and_then(|()| fs::rename(&partial, &path))
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }

    /// Says that the tracking this log serves began after the log was made or changed (new
    /// pins), so that nothing before it is missing.
    pub fn serves_tracking_from_its_start(&mut self) {
        self.holds_from_us = 0;
    }

    /// The instance's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where a process that reads the log out records until when it did, for the next process
    /// (`/run`: it lasts as long as the instance, until a reboot).
    fn read_record(dir: &Path) -> PathBuf {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        Path::new(crate::tracker::track::LOCK_DIR).join(format!("{name}.read"))
    }

    /// Where a process that stops cleanly leaves what it read out, for the next one
    /// ([`Self::hand_over`]).
    fn held_record(dir: &Path) -> PathBuf {
        Self::read_record(dir).with_extension("held")
    }

    /// Removes the instance of a device, if there is one (the kernel frees its buffer).
    pub fn remove(dir: &Path) -> io::Result<bool> {
        let _ = fs::remove_file(Self::read_record(dir));
        let _ = fs::remove_file(Self::held_record(dir));
        if !dir.exists() {
            return Ok(false);
        }
        // Disable first: a tracefs instance with an enabled event cannot be removed on some
        // kernels.
        let _ = fs::write(dir.join("events/block/block_rq_complete/enable"), "0");
        fs::remove_dir(dir)?;
        Ok(true)
    }

    /// The logged completions from shortly before `previous_cut_us` (CLOCK_MONOTONIC,
    /// microseconds) on, or why the log cannot be trusted to hold all of them.
    ///
    /// It reads the kernel's buffer out through `trace_pipe`, which consumes what it reads:
    /// the non-consuming `trace` file, read while a busy disk's full buffer is overwritten,
    /// loses its place (the kernel skips ahead to the newest events and prints a lost-events
    /// marker), measured at 5,000 writes a second on 18 of 38 skips. A consuming read owns the
    /// page it reads, and a marker there is exact: what the kernel overwrote came before the
    /// next event of that CPU. What was read and may still be asked for (the next window
    /// starts a second before the next cut's statistics read, after this one's) stays here;
    /// the time of the read goes to a record in `/run` for a process that comes after.
    pub fn since(&mut self, previous_cut_us: u64) -> Result<Vec<LoggedCompletion>, String> {
        let from_us = window_start(previous_cut_us);
        if from_us >= self.holds_from_us && !self.read_out()? {
            return Err(format!(
                "the log could not be read out within {READ_FOR_AT_MOST:?} (the disk completes \
                 requests faster than they are read)"
            ));
        }
        self.held.retain(|completion| completion.at_us >= from_us);
        if from_us < self.holds_from_us {
            return Err(format!(
                "completions from {} s on may be missing from the log (it was made, resized or \
                 overwritten then, or another process read it), after the window began at {} s",
                self.holds_from_us as f64 / 1e6,
                from_us as f64 / 1e6
            ));
        }
        Ok(self.held.clone())
    }

    /// Reads the kernel's buffer out and forgets what is older than `keep_from_us` (the start
    /// of the next window; 0: not known yet).
    pub fn drain(&mut self, keep_from_us: u64) -> Result<(), String> {
        // Cut short, the rest stays in the kernel's buffer for the next drain.
        self.read_out()?;
        if let Some(holds_from) = trim_held(&mut self.held, keep_from_us, MAX_HELD) {
            self.holds_from_us = self.holds_from_us.max(holds_from);
        }
        Ok(())
    }

    /// Reads every completion the kernel's buffer holds into [`Self::held`], for at most
    /// [`READ_FOR_AT_MOST`]. Returns whether it read the buffer empty; if not, what it did not
    /// read is newer than what it did (the pipe gives each CPU's events in order), and stays
    /// in the kernel's buffer.
    fn read_out(&mut self) -> Result<bool, String> {
        use std::io::Read as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let record = Self::read_record(&self.dir);
        // Before the read: a process that dies in the middle leaves "read out until now" to
        // the next one, which may then not trust the window (never the other way round).
        fs::write(&record, "reading").map_err(|e| {
            format!(
                "writing {} (the log is read only when that is recorded): {e}",
                record.display()
            )
        })?;
        let path = self.dir.join("trace_pipe");
        let mut pipe = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        let mut bytes = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        let started = std::time::Instant::now();
        let mut emptied = true;
        loop {
            if started.elapsed() > READ_FOR_AT_MOST {
                emptied = false;
                break;
            }
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("reading {}: {e}", path.display())),
            }
        }
        let read_until = monotonic_us();
        let _ = fs::write(&record, read_until.to_string());
        self.last_read_us = read_until;
        let text = String::from_utf8_lossy(&bytes);
        let drained = match parse_trace(&text) {
            Ok(drained) => drained,
            Err(why) => {
                // What was read is gone from the kernel, and not understood.
                self.holds_from_us = self.holds_from_us.max(read_until);
                self.held.clear();
                return Err(why);
            }
        };
        if let Some(lost_before) = drained.lost_before_us {
            self.holds_from_us = self.holds_from_us.max(lost_before.min(read_until));
        }
        self.held.extend(drained.logged);
        self.overrun_at_read = self
            .cpu_stats()?
            .into_iter()
            .map(|(cpu, coverage)| (cpu, coverage.overrun))
            .collect();
        Ok(emptied)
    }

    /// Each CPU's buffer statistics, by its directory name (`cpu0`).
    fn cpu_stats(&self) -> Result<Vec<(String, CpuCoverage)>, String> {
        let per_cpu = self.dir.join("per_cpu");
        let cpus =
            fs::read_dir(&per_cpu).map_err(|e| format!("reading {}: {e}", per_cpu.display()))?;
        let mut stats = Vec::new();
        for cpu in cpus {
            let cpu = cpu.map_err(|e| format!("reading {}: {e}", per_cpu.display()))?;
            let stats_path = cpu.path().join("stats");
            let text = fs::read_to_string(&stats_path)
                .map_err(|e| format!("reading {}: {e}", stats_path.display()))?;
            let coverage = parse_cpu_stats(&text)
                .ok_or_else(|| format!("unexpected content in {}", stats_path.display()))?;
            stats.push((cpu.file_name().to_string_lossy().into_owned(), coverage));
        }
        Ok(stats)
    }

    /// The memory the completions read out and still held take (what `status` shows).
    pub fn held_bytes(&self) -> u64 {
        (self.held.len() * std::mem::size_of::<LoggedCompletion>()) as u64
    }

    /// How far back from `now_us` (CLOCK_MONOTONIC, microseconds) the log holds every
    /// completion: `None` if nothing was overwritten since it was last read (or made).
    pub fn reach_us(&self, now_us: u64) -> Result<Option<u64>, String> {
        let overwritten: Vec<CpuCoverage> = self
            .cpu_stats()?
            .into_iter()
            .map(|(cpu, coverage)| {
                let before = self
                    .overrun_at_read
                    .iter()
                    .find(|(read, _)| *read == cpu)
                    .map_or(0, |(_, overrun)| *overrun);
                CpuCoverage {
                    overrun: coverage.overrun.saturating_sub(before),
                    ..coverage
                }
            })
            .collect();
        Ok(reach_of(&overwritten, self.holds_from_us, now_us))
    }
}

/// A completion log read out every [`DRAIN_EVERY`] on a thread of its own (stopped when this
/// is dropped), so that its reach is not bounded by the kernel's buffer but by `MAX_HELD`
/// (1 Mi completions). Without it, a busy disk overwrote the buffer between two cuts far
/// apart (5,000 writes a second: 2 MiB per CPU held about 14 s, and cuts 30 s apart verified
/// at every skip).
#[derive(Debug)]
pub struct Drainer {
    log: Arc<Mutex<CompletionLog>>,
    /// The start of the next window (the last released cut's statistics read), CLOCK_MONOTONIC
    /// microseconds; 0: not known.
    released_cut_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    dir: PathBuf,
}

impl Drainer {
    /// Starts draining `log` every `every` (the first drain after `every`: [`Self::released`]
    /// names the window before it).
    pub fn start(log: CompletionLog, every: Duration) -> Self {
        let dir = log.path().to_owned();
        let log = Arc::new(Mutex::new(log));
        let released = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (log, released, stop) = (log.clone(), released.clone(), stop.clone());
            let dir = dir.clone();
            std::thread::Builder::new()
                .name("blkmirror-log".into())
                .spawn(move || {
                    loop {
                        // Woken early by the drop.
                        std::thread::park_timeout(every);
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let keep_from = window_start(released.load(Ordering::Relaxed));
                        let drained = log.lock().expect("completion log lock").drain(keep_from);
                        if let Err(why) = drained {
                            tracing::debug!("completion log {}: {why}", dir.display());
                        }
                    }
                })
                .ok()
        };
        Self {
            log,
            released_cut_us: released,
            stop,
            thread,
            dir,
        }
    }

    /// The instance's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A cut was released after reading the statistics at `stat_read_us`: the next window
    /// starts a margin before it.
    pub fn released(&self, stat_read_us: u64) {
        self.released_cut_us.store(stat_read_us, Ordering::Relaxed);
    }

    /// [`CompletionLog::since`].
    pub fn since(&self, previous_cut_us: u64) -> Result<Vec<LoggedCompletion>, String> {
        self.log
            .lock()
            .expect("completion log lock")
            .since(previous_cut_us)
    }

    /// [`CompletionLog::reach_us`].
    pub fn reach_us(&self, now_us: u64) -> Result<Option<u64>, String> {
        self.log
            .lock()
            .expect("completion log lock")
            .reach_us(now_us)
    }

    /// [`CompletionLog::held_bytes`].
    pub fn held_bytes(&self) -> u64 {
        self.log.lock().expect("completion log lock").held_bytes()
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
        let keep_from = window_start(self.released_cut_us.load(Ordering::Relaxed));
        if let Ok(mut log) = self.log.lock()
            && let Err(why) = log.hand_over(keep_from)
        {
            tracing::warn!(
                "completion log {}: not handed over to the next process (a kernel skip in \
                 its first cycle costs a verify sync): {why}",
                self.dir.display()
            );
        }
    }
}

/// Reads a tracefs control file in one read. Some answer only a read at offset 0 (the event
/// filter: a second read gets nothing), so `fs::read_to_string`, whose first read takes 32
/// bytes, got the filter cut after 32 bytes: every reopen found it changed and wrote it
/// again, a probe change on the tracepoint (which can make the kernel skip the attached
/// programs), and the log was then not trusted before the reopen.
fn read_control_file(path: &Path) -> io::Result<String> {
    use std::io::Read as _;
    let mut buffer = vec![0u8; 64 << 10];
    let read = fs::File::open(path)?.read(&mut buffer)?;
    buffer.truncate(read);
    String::from_utf8(buffer).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The first word of a hand-over file.
const HANDED_OVER_MAGIC: &str = "blkmirror-completions-1";

/// What a process that stopped left to the next ([`CompletionLog::hand_over`]).
#[derive(Debug, PartialEq, Eq)]
struct HandedOver {
    /// The read it ends with (as the read record names it).
    read_until_us: u64,
    /// It holds every completion from this time on.
    holds_from_us: u64,
    held: Vec<LoggedCompletion>,
}

/// The text of a hand-over file: a header line (the magic word, the read it ends with, the
/// time it holds from, how many completions follow), then a line per completion.
fn handed_over_text(handed: &HandedOver) -> String {
    use std::fmt::Write as _;
    let mut text = format!(
        "{HANDED_OVER_MAGIC} {} {} {}\n",
        handed.read_until_us,
        handed.holds_from_us,
        handed.held.len()
    );
    for completion in &handed.held {
        let _ = writeln!(
            text,
            "{} {} {}",
            completion.at_us, completion.sector, completion.nr_sectors
        );
    }
    text
}

/// Parses a hand-over file: `None` (nothing taken over) for anything not exactly as
/// [`CompletionLog::hand_over`] writes it, or longer than the bound on what is held.
fn parse_handed_over(text: &str) -> Option<HandedOver> {
    let mut lines = text.lines();
    let mut header = lines.next()?.split(' ');
    if header.next()? != HANDED_OVER_MAGIC {
        return None;
    }
    let mut number = || header.next()?.parse::<u64>().ok();
    let (read_until_us, holds_from_us, count) = (number()?, number()?, number()?);
    if count > MAX_HELD as u64 {
        return None;
    }
    let held = lines
        .map(|line| {
            let mut fields = line.split(' ').map(|field| field.parse::<u64>().ok());
            let completion = LoggedCompletion {
                at_us: fields.next()??,
                sector: fields.next()??,
                nr_sectors: fields.next()??,
            };
            fields.next().is_none().then_some(completion)
        })
        .take(MAX_HELD + 1)
        .collect::<Option<Vec<_>>>()?;
    (held.len() as u64 == count).then_some(HandedOver {
        read_until_us,
        holds_from_us,
        held,
    })
}

/// Forgets the completions in `held` older than `keep_from_us`, and, when more than `max`
/// are left, the oldest of them down to half of `max`. Returns the time from which `held`
/// still holds every completion it was given, when the second trim dropped any.
fn trim_held(held: &mut Vec<LoggedCompletion>, keep_from_us: u64, max: usize) -> Option<u64> {
    held.retain(|completion| completion.at_us >= keep_from_us);
    if held.len() <= max {
        return None;
    }
    // Read out CPU by CPU, merged by the kernel: nearly sorted already.
    held.sort_by_key(|completion| completion.at_us);
    let dropped = held.len() - max / 2;
    let last_dropped_us = held[dropped - 1].at_us;
    held.drain(..dropped);
    // Others of the same microsecond may be gone with it.
    Some(last_dropped_us + 1)
}

/// The reach of a log whose CPUs' buffers hold `coverages` and that holds nothing from
/// before `holds_from_us` (0: no such limit): the shortest of them, `None` if none limits it.
fn reach_of(coverages: &[CpuCoverage], holds_from_us: u64, now_us: u64) -> Option<u64> {
    coverages
        .iter()
        .filter(|coverage| coverage.overrun > 0)
        .map(|coverage| coverage.oldest_us)
        .chain((holds_from_us > 0).then_some(holds_from_us))
        .map(|from_us| now_us.saturating_sub(from_us))
        .min()
}

/// Whether a buffer that reads back as `kb` is the `wanted_kb` one asked for: the kernel
/// rounds a size up to whole pages of events (256 reads back as 258, 2048 as 2051). Writing
/// the size again would resize the buffer, and a resize may drop what it holds.
fn buffer_is_as_asked(kb: u64, wanted_kb: u64) -> bool {
    (wanted_kb..=wanted_kb + wanted_kb / 64 + 8).contains(&kb)
}

/// The event filter: the disk's completions that change data (writes `W`, discards `D`,
/// write-zeroes and the like `N`; reads carry none of these letters).
fn event_filter(disk_dev: u64) -> String {
    format!(
        "dev == {disk_dev} && nr_sector > 0 && (rwbs ~ \"*W*\" || rwbs ~ \"*D*\" || rwbs ~ \"*N*\")"
    )
}

/// What one CPU's buffer still holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CpuCoverage {
    /// Events overwritten (since the buffer was made, or, in [`CompletionLog::reach_us`],
    /// since it was last read).
    overrun: u64,
    /// Time of the oldest event still held, in microseconds.
    oldest_us: u64,
}

/// Parses a `per_cpu/cpuN/stats` file (`overrun: 3`, `oldest event ts: 48753.660486`).
fn parse_cpu_stats(text: &str) -> Option<CpuCoverage> {
    let mut overrun = None;
    let mut oldest_us = None;
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("overrun:") {
            overrun = value.trim().parse().ok();
        } else if let Some(value) = line.strip_prefix("oldest event ts:") {
            oldest_us = parse_seconds_us(value.trim());
        }
    }
    Some(CpuCoverage {
        overrun: overrun?,
        oldest_us: oldest_us?,
    })
}

/// `48753.660486` (seconds, microseconds) as microseconds.
fn parse_seconds_us(text: &str) -> Option<u64> {
    let (seconds, fraction) = text.split_once('.')?;
    let seconds: u64 = seconds.parse().ok()?;
    if fraction.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros: u64 = format!("{fraction:0<6}")[..6].parse().ok()?;
    seconds.checked_mul(1_000_000)?.checked_add(micros)
}

/// What one read of the log gave.
#[derive(Debug, Default, PartialEq, Eq)]
struct Drained {
    /// Every completion read.
    logged: Vec<LoggedCompletion>,
    /// Completions before this time may be missing (the kernel overwrote them before they were
    /// read: a `CPU:1 [LOST 12 EVENTS]` marker, placed before that CPU's next event);
    /// `u64::MAX` when a marker had no event after it. `None`: nothing was lost.
    lost_before_us: Option<u64>,
}

/// Parses text of a `trace_pipe` read. A line the parser does not understand makes the whole
/// read untrustworthy. A lost-events marker says that events of its CPU older than the next
/// one were overwritten before the read got them.
fn parse_trace(text: &str) -> Result<Drained, String> {
    const EVENT: &str = ": block_rq_complete: ";
    let mut drained = Drained::default();
    // CPUs with a lost-events marker not yet followed by one of their events.
    let mut lost_on: Vec<u32> = Vec::new();
    let mut lost_before = |at_us: u64| {
        drained.lost_before_us = Some(drained.lost_before_us.unwrap_or(0).max(at_us));
    };
    let mut logged = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let bad = || format!("unexpected line in the completion log: {line:?}");
        if line.contains("[LOST ") {
            let cpu = line
                .trim()
                .strip_prefix("CPU:")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|cpu| cpu.parse().ok())
                .ok_or_else(bad)?;
            lost_on.push(cpu);
            continue;
        }
        let (head, body) = line.split_once(EVENT).ok_or_else(bad)?;
        let at_us = head
            .split_whitespace()
            .next_back()
            .and_then(parse_seconds_us)
            .ok_or_else(bad)?;
        // `task-pid [001] flags time`: the CPU in brackets.
        let cpu: u32 = head
            .split_once('[')
            .and_then(|(_, rest)| rest.split_once(']'))
            .and_then(|(cpu, _)| cpu.trim().parse().ok())
            .ok_or_else(bad)?;
        if let Some(at) = lost_on.iter().position(|lost| *lost == cpu) {
            lost_on.swap_remove(at);
            lost_before(at_us);
        }
        // `7,0 WS () 2048 + 8 [0]` (newer kernels add an I/O priority before the error).
        let tokens: Vec<&str> = body.split_whitespace().collect();
        let plus = tokens.iter().position(|t| *t == "+").ok_or_else(bad)?;
        let sector = plus
            .checked_sub(1)
            .and_then(|i| tokens[i].parse().ok())
            .ok_or_else(bad)?;
        let nr_sectors = tokens
            .get(plus + 1)
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)?;
        logged.push(LoggedCompletion {
            at_us,
            sector,
            nr_sectors,
        });
    }
    if !lost_on.is_empty() {
        lost_before(u64::MAX);
    }
    drained.logged = logged;
    Ok(drained)
}

/// CLOCK_MONOTONIC now, in microseconds (the clock of the log's `mono` trace clock).
pub fn monotonic_us() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "\
# tracer: nop
#
#                                _-----=> irqs-off/BH-disabled
#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION
#              | |         |   |||||     |         |
     ksoftirqd/1-24      [001] ..s.. 48753.660486: block_rq_complete: 7,0 WS () 130680 + 128 be,0,4 [0]
          <idle>-0       [000] d.h1. 48754.000001: block_rq_complete: 7,0 DS () 2048 + 2048 be,0,4 [0]
     kworker/0:1-9       [000] ..... 48755.5: block_rq_complete: 7,0 N () 4096 + 16 [0]
";

    #[test]
    fn a_hand_over_reads_back_as_written_and_anything_else_is_not_taken() {
        let handed = HandedOver {
            read_until_us: 9_000_000,
            holds_from_us: 4_000_001,
            held: vec![
                LoggedCompletion {
                    at_us: 5_000_000,
                    sector: 2048,
                    nr_sectors: 8,
                },
                LoggedCompletion {
                    at_us: 8_999_999,
                    sector: u64::MAX - 8,
                    nr_sectors: 8,
                },
            ],
        };
        let text = handed_over_text(&handed);
        assert_eq!(parse_handed_over(&text), Some(handed));
        let empty = handed_over_text(&HandedOver {
            read_until_us: 1,
            holds_from_us: 0,
            held: Vec::new(),
        });
        assert!(parse_handed_over(&empty).is_some_and(|h| h.held.is_empty()));
        // A line lost, one too many, a torn or foreign file, a count past the bound.
        let lines: Vec<&str> = text.lines().collect();
        for bad in [
            lines[..2].join("\n"),
            format!("{text}1 2 3\n"),
            text.replace(" 8\n", " 8 9\n"),
            text.replace("2048", "2048x"),
            text.replace(HANDED_OVER_MAGIC, "blkmirror-completions-2"),
            format!("{HANDED_OVER_MAGIC} 1 0 {}\n", MAX_HELD + 1),
            String::new(),
        ] {
            assert_eq!(parse_handed_over(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn held_completions_are_trimmed_to_the_window_and_then_to_half_the_bound() {
        let at = |at_us| LoggedCompletion {
            at_us,
            sector: at_us * 8,
            nr_sectors: 8,
        };
        let mut held: Vec<_> = [5, 1, 2, 3, 3, 4, 6].into_iter().map(at).collect();
        assert_eq!(trim_held(&mut held, 2, 10), None, "within the bound");
        assert_eq!(held.len(), 6, "{held:?}");
        // Six over a bound of four: the oldest go down to two, and a completion of the same
        // microsecond as the last dropped one cannot be vouched for.
        assert_eq!(trim_held(&mut held, 0, 4), Some(5));
        assert_eq!(held, vec![at(5), at(6)]);
        let mut tied: Vec<_> = [7, 7, 7, 8, 9].into_iter().map(at).collect();
        assert_eq!(trim_held(&mut tied, 0, 4), Some(8));
        assert_eq!(tied, vec![at(8), at(9)]);
    }

    #[test]
    fn trace_lines_give_their_time_and_sectors() {
        let drained = parse_trace(TRACE).expect("parse");
        assert_eq!(drained.lost_before_us, None);
        assert_eq!(
            drained.logged,
            vec![
                LoggedCompletion {
                    at_us: 48_753_660_486,
                    sector: 130_680,
                    nr_sectors: 128
                },
                LoggedCompletion {
                    at_us: 48_754_000_001,
                    sector: 2048,
                    nr_sectors: 2048
                },
                LoggedCompletion {
                    at_us: 48_755_500_000,
                    sector: 4096,
                    nr_sectors: 16
                },
            ]
        );
    }

    #[test]
    fn lost_events_are_placed_before_the_next_event_of_their_cpu() {
        // Lost before CPU 1's first event: missing ones are older than it.
        let early = format!("CPU:1 [LOST 12 EVENTS]\n{TRACE}");
        let drained = parse_trace(&early).expect("parse");
        assert_eq!(drained.lost_before_us, Some(48_753_660_486));
        assert_eq!(drained.logged.len(), 3);
        // Two CPUs lost some: the later bound holds.
        let both = format!("CPU:0 [LOST 1 EVENTS]\nCPU:1 [LOST 12 EVENTS]\n{TRACE}");
        assert_eq!(
            parse_trace(&both).expect("parse").lost_before_us,
            Some(48_754_000_001)
        );
        // Lost after a CPU's last event: anywhere up to now.
        let late = format!("{TRACE}CPU:0 [LOST 3 EVENTS]\n");
        assert_eq!(
            parse_trace(&late).expect("parse").lost_before_us,
            Some(u64::MAX)
        );
        // A marker for CPU 0 is not placed by an event of CPU 1.
        let other = "CPU:0 [LOST 1 EVENTS]\n  x-1 [001] ..... 5.000000: block_rq_complete: 7,0 W () 8 + 8 [0]\n";
        assert_eq!(
            parse_trace(other).expect("parse").lost_before_us,
            Some(u64::MAX)
        );
    }

    #[test]
    fn a_line_not_understood_refuses_the_whole_log() {
        let garbled =
            format!("{TRACE}  x-1 [000] ..... 48756.000000: block_rq_complete: 7,0 W ()\n");
        assert!(
            parse_trace(&garbled)
                .unwrap_err()
                .contains("unexpected line")
        );
        let no_time = "  x-1 [000] ..... 48756: block_rq_complete: 7,0 W () 8 + 8 [0]\n";
        assert!(parse_trace(no_time).is_err());
    }

    #[test]
    fn cpu_statistics_give_the_overrun_and_the_oldest_event() {
        let stats = "entries: 10\noverrun: 4\ncommit overrun: 0\nbytes: 640\n\
                     oldest event ts:  5.000000\nnow ts:  9.000000\ndropped events: 0\n";
        assert_eq!(
            parse_cpu_stats(stats),
            Some(CpuCoverage {
                overrun: 4,
                oldest_us: 5_000_000
            })
        );
        assert_eq!(parse_cpu_stats("entries: 1\n"), None);
    }

    #[test]
    fn the_reach_is_the_shortest_of_the_cpus_that_overran_and_of_the_log_s_own_age() {
        let cpu = |overrun, oldest_s: u64| CpuCoverage {
            overrun,
            oldest_us: oldest_s * 1_000_000,
        };
        let now = 100_000_000;
        // Never overran, found as it was: it holds everything since it was made.
        assert_eq!(reach_of(&[cpu(0, 1), cpu(0, 50)], 0, now), None);
        assert_eq!(reach_of(&[], 0, now), None);
        // A busy CPU overwrote: its oldest event bounds the reach; idle ones do not.
        assert_eq!(reach_of(&[cpu(0, 1), cpu(7, 70)], 0, now), Some(30_000_000));
        assert_eq!(
            reach_of(&[cpu(3, 90), cpu(7, 70)], 0, now),
            Some(10_000_000)
        );
        // Made or resized at 95 s: it holds nothing from before, overran or not.
        assert_eq!(reach_of(&[cpu(0, 1)], 95_000_000, now), Some(5_000_000));
        assert_eq!(reach_of(&[cpu(2, 98)], 95_000_000, now), Some(2_000_000));
    }

    #[test]
    fn a_window_that_began_before_the_log_holds_completions_is_refused() {
        let mut log = CompletionLog {
            dir: PathBuf::from("/nonexistent/blkmirror-log"),
            holds_from_us: 50_000_000,
            held: vec![LoggedCompletion {
                at_us: 60_000_000,
                sector: 8,
                nr_sectors: 8,
            }],
            overrun_at_read: Vec::new(),
            last_read_us: 0,
        };
        // The window starts a second before the previous cut: 49 s, before the log.
        let error = log.since(50_000_000).unwrap_err();
        assert!(error.contains("may be missing from the log"), "{error}");
        assert!(error.contains("from 50 s on"), "{error}");
        // What was read stays for a later window.
        assert_eq!(log.held.len(), 1);
    }

    #[test]
    fn a_buffer_rounded_up_to_whole_pages_is_the_one_asked_for() {
        // As Linux 6.18 reads them back.
        for (asked, read) in [
            (256, 258),
            (512, 513),
            (2048, 2051),
            (3000, 3000),
            (4096, 4099),
        ] {
            assert!(buffer_is_as_asked(read, asked), "{asked} read as {read}");
        }
        assert!(!buffer_is_as_asked(255, 256));
        assert!(!buffer_is_as_asked(512, 256));
        assert!(!buffer_is_as_asked(2051, 4096));
    }

    #[test]
    fn seconds_with_microseconds_parse_exactly() {
        assert_eq!(parse_seconds_us("0.000000"), Some(0));
        assert_eq!(parse_seconds_us("48753.660486"), Some(48_753_660_486));
        assert_eq!(parse_seconds_us("1.5"), Some(1_500_000));
        assert_eq!(parse_seconds_us("1.1234567"), Some(1_123_456));
        assert_eq!(parse_seconds_us("1."), None);
        assert_eq!(parse_seconds_us("x.1"), None);
        assert_eq!(parse_seconds_us("12"), None);
    }

    #[test]
    fn the_buffer_is_2_mib_per_cpu_up_to_8_cpus_then_16_mib_shared_down_to_256_kib() {
        assert_eq!(buffer_kb_per_cpu(0), 2048);
        assert_eq!(buffer_kb_per_cpu(2), 2048);
        assert_eq!(buffer_kb_per_cpu(8), 2048);
        assert_eq!(buffer_kb_per_cpu(16), 1024);
        assert_eq!(buffer_kb_per_cpu(64), 256);
        assert_eq!(buffer_kb_per_cpu(512), 256);
    }

    #[test]
    fn the_filter_names_the_disk_and_the_data_changing_operations() {
        let filter = event_filter(7 << 20);
        assert!(filter.starts_with("dev == 7340032 && nr_sector > 0"));
        assert!(filter.contains("rwbs ~ \"*W*\""));
    }
}
