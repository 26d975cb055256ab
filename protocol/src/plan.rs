//! Pure planning for the agent: what to read, what to send, how fast, and when to freeze. Time
//! is always an argument; nothing here does IO.

use std::time::Duration;

use crate::extent::{ChangeKind, Extent};

/// The work of one pass over a dirty set.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassPlan {
    /// Ranges whose content must be read and sent (writes, and discards, whose content after
    /// the discard is device-specific: they are read, and sent as zeros only if they read as
    /// zeros).
    pub read: Vec<(u64, u64)>,
    /// Ranges the device guarantees to read as zeros (write-zeroes): sent without reading.
    pub zero: Vec<(u64, u64)>,
    /// Bytes of `read` that were discarded: they usually read back as zeros and travel as
    /// metadata, so they are left out of the receiver's space estimate (which checks again as
    /// data arrives).
    pub discarded: u64,
}

impl PassPlan {
    /// Plans a pass over `extents` of a device of `size` bytes.
    pub fn from_extents(extents: &[Extent], size: u64) -> Self {
        let mut plan = Self::default();
        for extent in extents {
            if extent.offset >= size {
                continue;
            }
            let range = (extent.offset, extent.length.min(size - extent.offset));
            match extent.kind {
                ChangeKind::Write => plan.read.push(range),
                ChangeKind::Discard => {
                    plan.read.push(range);
                    plan.discarded += range.1;
                }
                ChangeKind::Zeroes => plan.zero.push(range),
            }
        }
        plan
    }

    /// Bytes this pass reads.
    pub fn read_bytes(&self) -> u64 {
        self.read.iter().map(|r| r.1).sum()
    }

    /// Bytes this pass covers.
    pub fn bytes(&self) -> u64 {
        self.read_bytes() + self.zero.iter().map(|r| r.1).sum::<u64>()
    }

    /// The data bytes this pass is expected to send, for the receiver's space check: written
    /// ranges only. Zeroed ranges are metadata, and discarded ones nearly always read as zeros.
    pub fn data_estimate(&self) -> u64 {
        self.read_bytes().saturating_sub(self.discarded)
    }
}

/// How long to wait after a cycle that took `took` before the next one: cycles start an
/// `interval` apart, or back to back when one takes longer. (Waiting a whole interval after
/// each cycle would stretch the period to interval + cycle time, and the recovery point with
/// it, the more so the busier the source.)
pub fn wait_before_next_cycle(interval: Duration, took: Duration) -> Duration {
    interval.saturating_sub(took)
}

/// A token bucket that caps the send rate.
///
/// The burst is 100 ms of the rate (at least 256 KiB, so a whole data frame always fits): a
/// burst of a second at the cap would overflow the queue of a link sized near it, and would
/// let a short transfer exceed the cap by a second's worth.
#[derive(Debug, Clone)]
pub struct RateLimit {
    bytes_per_second: f64,
    burst: f64,
    tokens: f64,
    last: Duration,
}

impl RateLimit {
    /// The smallest burst.
    pub const MIN_BURST: u64 = 256 << 10;

    /// A limit of `bytes_per_second`, starting at time `now` with a full bucket.
    pub fn new(bytes_per_second: u64, now: Duration) -> Self {
        Self::with_burst(
            bytes_per_second,
            (bytes_per_second / 10).max(Self::MIN_BURST),
            now,
        )
    }

    /// A limit of `bytes_per_second` with a bucket of `burst` bytes.
    pub fn with_burst(bytes_per_second: u64, burst: u64, now: Duration) -> Self {
        Self {
            bytes_per_second: bytes_per_second as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last: now,
        }
    }

    /// Takes `bytes` at time `now`; returns how long to wait before sending them.
    pub fn take(&mut self, bytes: u64, now: Duration) -> Duration {
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.bytes_per_second).min(self.burst);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.bytes_per_second)
        }
    }
}

/// Progress of a long pass: bytes done of a total, rate and ETA.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Bytes to cover.
    pub total: u64,
    /// Bytes covered.
    pub done: u64,
    /// When the pass started.
    pub started: Duration,
}

impl Progress {
    /// Bytes per second so far at time `now`.
    pub fn rate(&self, now: Duration) -> f64 {
        let secs = now.saturating_sub(self.started).as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            self.done as f64 / secs
        }
    }

    /// Estimated time to completion at time `now`.
    pub fn eta(&self, now: Duration) -> Option<Duration> {
        let rate = self.rate(now);
        (rate > 0.0)
            .then(|| Duration::from_secs_f64(self.total.saturating_sub(self.done) as f64 / rate))
    }
}

/// How data frames are compressed: whether it is worth it (learned from recent chunks), and at
/// which zstd level.
///
/// # Whether
///
/// Compression is tried on every write until 512 KiB in a row did not shrink; it is then
/// skipped for the next 4 MiB and tried again, so incompressible data (media, encrypted
/// volumes) costs little CPU. Both are counted in bytes, whatever the size of a write.
///
/// # Which level: buy link time with spare CPU
///
/// An adaptive policy starts at zstd level 1 and moves along [`Self::LEVELS`] one step per
/// second of a pass, from what the driver measured in that second ([`Self::observe`]): the
/// time the producer spent waiting for the link to take its frames, and the time it spent
/// compressing and framing.
///
/// * Waiting for the link more than [`Self::RAISE_ABOVE`] of the time: the link is the
///   bottleneck, so a higher level ships the same data in fewer bytes. Only while the machine
///   has CPU to spare (at least [`Self::RAISE_IDLE_CORES`] idle): on a machine whose cores
///   are busy (the QUIC stack and the application among them), the wait may be for CPU, not
///   for the link, and a higher level would slow everything down. Not when the data barely
///   compresses (less than [`Self::MIN_SAVING`] saved): a higher level would not change that.
/// * Waiting less than [`Self::LOWER_BELOW`] while compressing more than
///   [`Self::BUSY_ABOVE`] of the time: compression is the bottleneck, so a lower level
///   (down to zstd's fast levels) keeps the link fed.
///
/// So on a slow link the level climbs until compression just keeps the link full; on a fast
/// one it stays low, and the CPU available is what the producer thread measures.
#[derive(Debug, Clone)]
pub struct CompressionPolicy {
    /// Bytes tried in a row that did not shrink.
    missed_bytes: u64,
    /// Bytes still to send without trying.
    skip_bytes: u64,
    /// Index into [`Self::LEVELS`].
    step: usize,
    adaptive: bool,
    window: LevelWindow,
}

/// What one stretch of a pass measured, for the level decision.
#[derive(Debug, Clone, Copy, Default)]
struct LevelWindow {
    elapsed: f64,
    work: f64,
    blocked: f64,
    /// Idle core-seconds of the machine.
    idle: f64,
    raw: u64,
    packed: u64,
}

impl Default for CompressionPolicy {
    fn default() -> Self {
        Self::adaptive()
    }
}

impl CompressionPolicy {
    /// Bytes in a row that did not shrink before backing off.
    const MISSED_BYTES: u64 = 512 << 10;
    /// Bytes sent without trying after a back-off.
    const SKIP_BYTES: u64 = 4 << 20;
    /// The zstd levels an adaptive policy moves along (negative: zstd's fast levels).
    pub const LEVELS: [i32; 8] = [-5, -1, 1, 2, 3, 5, 7, 9];
    /// Where it starts: level 1.
    const START: usize = 2;
    /// Seconds of a pass per decision.
    const WINDOW_S: f64 = 1.0;
    /// Raise the level when the producer waited for the link more than this share of the time.
    pub const RAISE_ABOVE: f64 = 0.25;
    /// Lower it when the producer waited less than this share…
    pub const LOWER_BELOW: f64 = 0.05;
    /// …and compressed more than this share of the time.
    pub const BUSY_ABOVE: f64 = 0.5;
    /// Below this saving (of the bytes tried), a higher level is not worth trying.
    pub const MIN_SAVING: f64 = 0.05;
    /// Raise the level only with at least this many cores idle.
    pub const RAISE_IDLE_CORES: f64 = 0.5;

    /// A policy that chooses the level from the measured link and CPU (the default).
    pub fn adaptive() -> Self {
        Self {
            missed_bytes: 0,
            skip_bytes: 0,
            step: Self::START,
            adaptive: true,
            window: LevelWindow::default(),
        }
    }

    /// A policy that always uses zstd level 1 (where it pays).
    pub fn fixed() -> Self {
        Self {
            adaptive: false,
            ..Self::adaptive()
        }
    }

    /// The zstd level to compress the next chunk at.
    pub fn level(&self) -> i32 {
        Self::LEVELS[self.step]
    }

    /// Whether to try compressing the next `bytes` (a chunk or a run of them). Back-offs are
    /// counted in bytes, so they last as long whatever the size of what is tried.
    pub fn should_try(&mut self, bytes: usize) -> bool {
        if self.skip_bytes > 0 {
            self.skip_bytes = self.skip_bytes.saturating_sub(bytes as u64);
            return false;
        }
        true
    }

    /// Records whether an attempt paid off (saved at least 1/8 of the bytes).
    pub fn record(&mut self, raw: usize, compressed: usize) -> bool {
        self.window.raw += raw as u64;
        self.window.packed += compressed.min(raw) as u64;
        let paid = compressed + raw / 8 <= raw;
        if paid {
            self.missed_bytes = 0;
        } else {
            self.missed_bytes += raw as u64;
            if self.missed_bytes >= Self::MISSED_BYTES {
                self.missed_bytes = 0;
                self.skip_bytes = Self::SKIP_BYTES;
            }
        }
        paid
    }

    /// A stretch of a pass took `elapsed`; the producer spent `work` of it compressing and
    /// framing, and `blocked` waiting for the link to take frames, while the machine had
    /// `idle_cores` idle on average. Once a window's worth has been observed, the level may
    /// move one step (see the type's docs). Returns the level.
    pub fn observe(
        &mut self,
        elapsed: Duration,
        work: Duration,
        blocked: Duration,
        idle_cores: f64,
    ) -> i32 {
        let window = &mut self.window;
        window.elapsed += elapsed.as_secs_f64();
        window.work += work.as_secs_f64();
        window.blocked += blocked.as_secs_f64();
        window.idle += idle_cores * elapsed.as_secs_f64();
        if !self.adaptive || window.elapsed < Self::WINDOW_S {
            return self.level();
        }
        let waited = window.blocked / window.elapsed;
        let busy = window.work / window.elapsed;
        let saving = if window.raw == 0 {
            0.0
        } else {
            1.0 - window.packed as f64 / window.raw as f64
        };
        let idle_cores = window.idle / window.elapsed;
        if waited > Self::RAISE_ABOVE
            && saving >= Self::MIN_SAVING
            && idle_cores >= Self::RAISE_IDLE_CORES
            && self.step + 1 < Self::LEVELS.len()
        {
            self.step += 1;
        } else if waited < Self::LOWER_BELOW && busy > Self::BUSY_ABOVE && self.step > 0 {
            self.step -= 1;
        }
        self.window = LevelWindow::default();
        self.level()
    }
}

/// Whether reading `bytes` at `read_rate` bytes/s fits in the freeze budget, with a quarter of
/// the budget left for the cut and the thaw.
pub fn fits_freeze(bytes: u64, read_rate: f64, budget: Duration) -> bool {
    if bytes == 0 {
        return true;
    }
    if read_rate <= 0.0 {
        return false;
    }
    bytes as f64 / read_rate <= budget.as_secs_f64() * 0.75
}

/// The windows of a full sync pass: `[start, end)` byte ranges of at most `window` bytes from
/// `from` to `size`.
pub fn sync_windows(from: u64, size: u64, window: u64) -> Vec<(u64, u64)> {
    let window = window.max(1);
    (from..size)
        .step_by(window as usize)
        .map(|start| (start, (start + window).min(size)))
        .collect()
}

/// Backoff before reconnect attempt `attempt` (0-based): 1 s doubling to 30 s.
pub fn reconnect_delay(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(5)).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_reads_writes_and_discards_and_zeroes_without_reading() {
        let extents = [
            Extent {
                offset: 0,
                length: 8192,
                kind: ChangeKind::Write,
            },
            Extent {
                offset: 8192,
                length: 4096,
                kind: ChangeKind::Discard,
            },
            Extent {
                offset: 65536,
                length: 65536,
                kind: ChangeKind::Zeroes,
            },
            Extent {
                offset: 1 << 20,
                length: 4096,
                kind: ChangeKind::Write,
            },
        ];
        let plan = PassPlan::from_extents(&extents, 100_000);
        assert_eq!(plan.read, vec![(0, 8192), (8192, 4096)]);
        assert_eq!(plan.zero, vec![(65536, 100_000 - 65536)]);
        assert_eq!(plan.read_bytes(), 12288);
        // Finding 6 of the hardening issue: discards and write-zeroes were counted at full
        // length in the receiver's space estimate (an fstrim was then "disk full" forever).
        assert_eq!(plan.data_estimate(), 8192);
    }

    #[test]
    fn rate_limit_paces_to_the_rate() {
        let mut limit = RateLimit::with_burst(1000, 1000, Duration::ZERO);
        assert_eq!(limit.take(1000, Duration::ZERO), Duration::ZERO);
        assert_eq!(limit.take(500, Duration::ZERO), Duration::from_millis(500));
        // After the wait, the bucket has refilled to exactly what was owed.
        assert_eq!(
            limit.take(0, Duration::from_millis(500)),
            Duration::ZERO,
            "debt repaid"
        );
        // Sending 10 s worth at once costs 10 s (less the 1 s burst), whatever the call pattern.
        let mut limit = RateLimit::with_burst(1000, 1000, Duration::ZERO);
        let mut now = Duration::ZERO;
        for _ in 0..100 {
            now += limit.take(100, now);
        }
        assert!((now.as_secs_f64() - 9.0).abs() < 0.01, "{now:?}");
    }

    #[test]
    fn rate_limit_bursts_a_tenth_of_a_second_and_at_least_a_frame() {
        // 100 MB/s: 10 MB of burst, then the rate.
        let mut limit = RateLimit::new(100_000_000, Duration::ZERO);
        assert_eq!(limit.take(10_000_000, Duration::ZERO), Duration::ZERO);
        assert_eq!(
            limit.take(1_000_000, Duration::ZERO),
            Duration::from_millis(10)
        );
        // A slow cap still lets a whole 64 KiB frame through without waiting.
        let mut limit = RateLimit::new(100_000, Duration::ZERO);
        assert_eq!(limit.take(65_536, Duration::ZERO), Duration::ZERO);
        // A long idle time does not buy more than the burst.
        let mut limit = RateLimit::new(100_000_000, Duration::ZERO);
        assert_eq!(
            limit.take(20_000_000, Duration::from_secs(60)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn cycles_start_an_interval_apart_or_back_to_back() {
        let interval = Duration::from_secs(5);
        assert_eq!(
            wait_before_next_cycle(interval, Duration::from_secs(3)),
            Duration::from_secs(2)
        );
        assert_eq!(
            wait_before_next_cycle(interval, Duration::from_secs(7)),
            Duration::ZERO
        );
    }

    #[test]
    fn progress_rate_and_eta() {
        let progress = Progress {
            total: 1000,
            done: 250,
            started: Duration::from_secs(10),
        };
        assert_eq!(progress.rate(Duration::from_secs(15)), 50.0);
        assert_eq!(
            progress.eta(Duration::from_secs(15)),
            Some(Duration::from_secs(15))
        );
        assert_eq!(progress.eta(Duration::from_secs(10)), None);
    }

    #[test]
    fn compression_backs_off_on_incompressible_data() {
        let mut policy = CompressionPolicy::default();
        let misses = CompressionPolicy::MISSED_BYTES / 4096;
        for _ in 0..misses {
            assert!(policy.should_try(4096));
            assert!(!policy.record(4096, 4100));
        }
        // The back-off lasts as many bytes whatever the size of what is tried.
        let tried = (0..CompressionPolicy::SKIP_BYTES / (256 << 10))
            .filter(|_| policy.should_try(256 << 10))
            .count();
        assert_eq!(tried, 0);
        assert!(policy.should_try(4096));
        assert!(policy.record(4096, 100));
    }

    /// One second of a pass: `waited` and `busy` are shares of it; the chunks compressed in
    /// it saved `saving` of their bytes.
    fn second(policy: &mut CompressionPolicy, waited: f64, busy: f64, saving: f64) -> i32 {
        second_idle(policy, waited, busy, saving, 1.0)
    }

    fn second_idle(
        policy: &mut CompressionPolicy,
        waited: f64,
        busy: f64,
        saving: f64,
        idle_cores: f64,
    ) -> i32 {
        policy.record(1000, (1000.0 * (1.0 - saving)) as usize);
        let ms = |share: f64| Duration::from_millis((share * 1000.0) as u64);
        // In two halves: a decision needs a whole second.
        let half = |share: f64| ms(share / 2.0);
        let before = policy.level();
        assert_eq!(
            policy.observe(ms(0.5), half(busy), half(waited), idle_cores),
            before,
            "no decision before a second has been observed"
        );
        policy.observe(ms(0.5), half(busy), half(waited), idle_cores)
    }

    #[test]
    fn the_level_climbs_while_the_link_is_the_bottleneck_and_falls_while_compression_is() {
        let mut policy = CompressionPolicy::adaptive();
        assert_eq!(policy.level(), 1);
        // A slow link: the producer waits most of the time, the data compresses.
        let levels: Vec<i32> = (0..7).map(|_| second(&mut policy, 0.7, 0.2, 0.4)).collect();
        assert_eq!(levels, vec![2, 3, 5, 7, 9, 9, 9]);
        // Compression became the bottleneck: step down until the link waits again.
        assert_eq!(second(&mut policy, 0.01, 0.9, 0.5), 7);
        assert_eq!(second(&mut policy, 0.02, 0.8, 0.5), 5);
        // Balanced (neither waits much nor is compression busy): stay.
        assert_eq!(second(&mut policy, 0.1, 0.4, 0.5), 5);
        // A fast link with compression as the bottleneck: down to zstd's fast levels.
        let levels: Vec<i32> = (0..6)
            .map(|_| second(&mut policy, 0.0, 0.95, 0.3))
            .collect();
        assert_eq!(levels, vec![3, 2, 1, -1, -5, -5]);
    }

    #[test]
    fn the_level_does_not_climb_for_data_that_does_not_compress_nor_when_fixed() {
        let mut policy = CompressionPolicy::adaptive();
        for _ in 0..5 {
            assert_eq!(second(&mut policy, 0.9, 0.05, 0.01), 1);
        }
        // Nor while the machine's cores are busy: the wait may be for CPU, not the link.
        for _ in 0..5 {
            assert_eq!(second_idle(&mut policy, 0.9, 0.05, 0.5, 0.2), 1);
        }
        let mut fixed = CompressionPolicy::fixed();
        for _ in 0..5 {
            assert_eq!(second(&mut fixed, 0.9, 0.05, 0.5), 1);
            assert_eq!(second(&mut fixed, 0.0, 0.99, 0.5), 1);
        }
    }

    #[test]
    fn freeze_budget() {
        let budget = Duration::from_secs(2);
        assert!(fits_freeze(0, 0.0, budget));
        assert!(fits_freeze(100 << 20, 100e6, budget));
        assert!(!fits_freeze(200 << 20, 100e6, budget));
        assert!(!fits_freeze(1, 0.0, budget));
    }

    #[test]
    fn windows_cover_the_device() {
        assert_eq!(
            sync_windows(100, 350, 100),
            vec![(100, 200), (200, 300), (300, 350)]
        );
        assert!(sync_windows(350, 350, 100).is_empty());
    }

    #[test]
    fn reconnect_backoff_is_capped() {
        assert_eq!(reconnect_delay(0), Duration::from_secs(1));
        assert_eq!(reconnect_delay(3), Duration::from_secs(8));
        assert_eq!(reconnect_delay(40), Duration::from_secs(30));
    }
}
