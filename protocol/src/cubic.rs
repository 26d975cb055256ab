//! Cubic (RFC 9438) with a delay-based slow-start exit after HyStart++ (RFC 9406): the
//! agent's congestion window, as a pure state machine driven by acks, losses and the time,
//! which the caller passes in.
//!
//! # Why not quinn's Cubic
//!
//! quinn's Cubic leaves slow start only on a loss. On a long link with a router queue of one
//! bandwidth-delay product (BDP), slow start doubles the window each round trip until the
//! queue overflows at about twice the BDP; a loss shows a round trip later, by which time
//! slow start has sent up to another BDP into the full queue. In an initial sync of about 8 s
//! at 80 ms that overshoot was 5–6% of all datagrams, dropped at the router and sent again
//! (`cargo xtask bench wan`), which on a shared link is loss inflicted on everyone else.
//! quinn offers no way to end slow start without a cut, so blkmirror keeps its own Cubic,
//! small enough to read in one sitting.
//!
//! # Leaving slow start on the round trip (after HyStart++)
//!
//! In slow start the round trip stays at its floor while the data in flight is below the
//! path's BDP, and rises once a queue stands. HyStart++ (RFC 9406) compares the minimum round
//! trip of each round with the previous round's. This controller judges the rise on the last
//! 8 round-trip samples instead, at every ack: when all of them are above the connection's
//! floor by a threshold (an eighth of it, within 4–16 ms, as HyStart++), a queue is standing
//! and slow start ends. That sees the queue a little sooner
//! than a round's minimum, whose first samples left before the queue built (the unit test
//! `a_round_minimum_detects_the_queue_a_round_too_late`).
//!
//! Neither can see it in time on a queue of one BDP: the signal is a round trip old, and
//! slow start adds a BDP to the flight per round trip. So the exit also sets the window to
//! what the path delivers: the bytes acknowledged over the last floor round trip (an
//! estimate of the BDP), plus a half for headroom, instead of the window slow start reached
//! (but never below half of that: on loopback or a LAN the floor is a fraction of a
//! millisecond, and a rise of 4 ms is the hosts' processing, not a router's queue).
//! What is already in flight beyond it drains, and its losses count as answered by the
//! exit, not as a new congestion event. Congestion avoidance starts from there without a
//! cut. Measured through `wan-relay` at 100 Mbit/s (README): the datagrams dropped in an 8 s
//! initial sync fall from 5.7% to 0.5% at 80 ms and from 6.6% to 0.25% at 200 ms, at the
//! same goodput. (A headroom of a quarter gave 2–3% less goodput with 1% random loss.)
//!
//! [`FilteredCubic`] puts the loss filter in front, and keeps out of it the losses of what
//! was in flight at the last cut or exit: counted, that burst made the next random loss look
//! like congestion and cut the window a second time, below the BDP.
//!
//! The round-trip sample of an ack is `now - sent` of the acknowledged datagram (the peer's
//! ack delay included; requiring all of the last samples to be high filters it).
//!
//! # Cubic
//!
//! After a congestion event the window is cut to β = 0.7 of itself, and then follows
//! `W(t) = C·(t − K)³ + W_max` (C = 0.4 datagrams/s³), which returns to the window of the
//! last loss (`W_max`) after `K` seconds, plateaus there and then probes beyond it. A
//! Reno-friendly estimate keeps it at least as fast as Reno on short paths. Without a loss
//! before it (the round trip ended slow start), `W_max` is the window at the exit and `K` is
//! 0: it probes at once.
//!
//! Losses reach this controller through [`crate::congestion::LossFilter`] in the agent, so
//! random loss does not cut the window; only losses that look like congestion do.
//!
//! # Resuming what the path allowed (after Careful Resume)
//!
//! A new connection to the same receiver, a reconnect after a blackout or the next `agent
//! --once`, would start over at 10 datagrams; at 200 ms a ramp to a 2.5 MB window takes 8
//! round trips, and a cycle of a few seconds never leaves it. Careful Resume
//! (draft-ietf-tsvwg-careful-resume) lets a sender reuse what it observed on the path
//! before, with checks. Here: the last connection's floor round trip and window are kept
//! ([`PathMemory`]); the new connection starts in slow start as usual, and at its first round
//! trip sample, if the floor is within half and twice the one remembered (the same path,
//! most likely), the window jumps to half the window remembered (the pacer spreads it over a
//! round trip). Slow start goes on from there, so the delay-based exit above still ends it on
//! a standing queue, with the window set to what the path delivers: that is the safe retreat
//! when the path is narrower than it was. A path whose round trip differs gets no jump.

use std::{collections::VecDeque, time::Duration};

/// The state of the delay-based slow-start exit.
#[derive(Clone, Debug)]
struct SlowStartExit {
    /// Whether slow start may end on a rise of the round trip (off: only a loss ends it).
    enabled: bool,
    /// The smallest round-trip sample of the connection.
    floor: Option<Duration>,
    /// The last samples, a ring; `taken` counts all samples.
    recent: [Duration; SlowStartExit::SAMPLES],
    taken: usize,
    /// Bytes acknowledged so far, and marks of (time, that count) at most a millisecond
    /// apart over the last floor round trip, to measure what the path delivers.
    acked: u64,
    marks: VecDeque<(Duration, u64)>,
}

impl SlowStartExit {
    /// Consecutive high samples that end slow start.
    const SAMPLES: usize = 8;
    /// The rise that ends slow start: the floor over this, within the bounds.
    const RISE_DIVISOR: u32 = 8;
    const MIN_RISE: Duration = Duration::from_millis(4);
    const MAX_RISE: Duration = Duration::from_millis(16);
    /// The window at the exit over the measured BDP, in quarters: a half for headroom.
    const HEADROOM_QUARTERS: u64 = 6;

    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            floor: None,
            recent: [Duration::ZERO; Self::SAMPLES],
            taken: 0,
            acked: 0,
            marks: VecDeque::new(),
        }
    }

    /// Takes the sample of an ack of `bytes` at `now`; returns the window to leave slow start
    /// with, when a queue is standing.
    fn on_ack(&mut self, now: Duration, sample: Duration, bytes: u64) -> Option<u64> {
        let floor = *self
            .floor
            .insert(self.floor.map_or(sample, |floor| floor.min(sample)));
        self.recent[self.taken % Self::SAMPLES] = sample;
        self.taken += 1;
        self.acked += bytes;
        if self
            .marks
            .back()
            .is_none_or(|&(at, _)| now >= at + Duration::from_millis(1))
        {
            self.marks.push_back((now, self.acked));
        }
        // Keep one mark at or before `now - floor`, and none older.
        while self.marks.len() > 1 && self.marks[1].0 + floor <= now {
            self.marks.pop_front();
        }
        if !self.enabled || self.taken < Self::SAMPLES {
            return None;
        }
        let rise = (floor / Self::RISE_DIVISOR).clamp(Self::MIN_RISE, Self::MAX_RISE);
        if self.recent.iter().any(|&recent| recent < floor + rise) {
            return None;
        }
        // What the path delivered over the last floor round trip: the BDP.
        let &(since, acked_then) = self.marks.front().expect("marked above");
        let elapsed = now.saturating_sub(since);
        if elapsed.is_zero() {
            return None;
        }
        let rate = (self.acked - acked_then) as f64 / elapsed.as_secs_f64();
        let bdp = (rate * floor.as_secs_f64()) as u64;
        Some(bdp * Self::HEADROOM_QUARTERS / 4)
    }
}

/// What a connection observed of its path, for the next one to resume from (see the module
/// docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathMemory {
    /// The smallest round trip seen.
    pub floor: Duration,
    /// The congestion window.
    pub window: u64,
}

/// Cubic with a delay-based slow-start exit; see the module docs. Windows are in bytes.
#[derive(Clone, Debug)]
pub struct Cubic {
    /// The datagram size the window counts in.
    mss: u64,
    initial_window: u64,
    window: u64,
    /// Slow start runs while the window is below this (`u64::MAX` until the first exit).
    ssthresh: u64,
    /// Datagrams sent before this were in flight at the last congestion event: their losses
    /// are part of it and their acks do not grow the window.
    recovery_start: Option<Duration>,
    /// The window at the last congestion event (or slow-start exit), and the time Cubic's
    /// curve takes to return to it, in seconds.
    w_max: f64,
    k: f64,
    /// When the current congestion-avoidance epoch began (its first ack).
    epoch_start: Option<Duration>,
    /// The Reno-friendly estimate of the window.
    w_est: f64,
    exit: SlowStartExit,
    /// When slow start ended on the round trip, if it did.
    exited_at: Option<Duration>,
    /// The previous connection's path, until the first round-trip sample decides on it.
    resume: Option<PathMemory>,
    /// Whether the window jumped to what the previous connection allowed.
    pub resumed: bool,
    /// Slow-start exits without a loss, and congestion events acted on: for the metrics and
    /// the tests.
    pub delay_exits: u64,
    pub congestion_events: u64,
}

impl Cubic {
    /// Cubic's multiplicative decrease.
    pub const BETA: f64 = 0.7;
    /// Cubic's scaling constant, datagrams per second cubed.
    pub const C: f64 = 0.4;

    /// A controller at the start of a connection: slow start from `initial_window` bytes,
    /// counting in datagrams of `mss` bytes. `delay_exit` lets slow start end on a rising round
    /// trip (after HyStart++) instead of only at the first loss.
    pub fn new(mss: u64, initial_window: u64, delay_exit: bool) -> Self {
        let mss = mss.max(1);
        let initial_window = initial_window.max(2 * mss);
        Self {
            mss,
            initial_window,
            window: initial_window,
            ssthresh: u64::MAX,
            recovery_start: None,
            w_max: 0.0,
            k: 0.0,
            epoch_start: None,
            w_est: initial_window as f64,
            exit: SlowStartExit::new(delay_exit),
            exited_at: None,
            resume: None,
            resumed: false,
            delay_exits: 0,
            congestion_events: 0,
        }
    }

    /// Resume from what a previous connection observed of the path: at the first round-trip
    /// sample, if it matches `memory.floor`, the window jumps to half of `memory.window`.
    pub fn resume_from(&mut self, memory: PathMemory) {
        self.resume = Some(memory);
    }

    /// What this connection has observed of its path, once it has a round-trip sample.
    pub fn path_memory(&self) -> Option<PathMemory> {
        self.exit.floor.map(|floor| PathMemory {
            floor,
            window: self.window,
        })
    }

    /// Bytes that may be in flight.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// The window a connection starts with.
    pub fn initial_window(&self) -> u64 {
        self.initial_window
    }

    /// The slow-start threshold, once slow start has ended.
    pub fn ssthresh(&self) -> Option<u64> {
        (self.ssthresh != u64::MAX).then_some(self.ssthresh)
    }

    /// When slow start ended on a rising round trip (not on a loss), if it has.
    pub fn slow_start_exit(&self) -> Option<Duration> {
        self.exited_at
    }

    /// Whether the window still grows by slow start.
    pub fn in_slow_start(&self) -> bool {
        self.window < self.ssthresh
    }

    fn min_window(&self) -> u64 {
        2 * self.mss
    }

    /// The datagram size changed (path MTU discovery).
    pub fn on_mtu_update(&mut self, mss: u64) {
        self.mss = mss.max(1);
        self.window = self.window.max(self.min_window());
    }

    /// A datagram of `bytes` sent at `sent` was acknowledged at `now`. `rtt` is the smoothed
    /// round trip; `app_limited`: the sender had nothing more to send, so the window was not
    /// what limited it and must not grow.
    pub fn on_ack(
        &mut self,
        now: Duration,
        sent: Duration,
        bytes: u64,
        app_limited: bool,
        rtt: Duration,
    ) {
        if let Some(memory) = self.resume.take() {
            let sample = now.saturating_sub(sent);
            if sample >= memory.floor / 2 && sample <= memory.floor * 2 && self.in_slow_start() {
                let jump = memory.window / 2;
                if jump > self.window {
                    self.window = jump;
                    self.resumed = true;
                }
            }
        }
        if app_limited || self.answered(sent) {
            return;
        }
        if self.in_slow_start() {
            match self.exit.on_ack(now, now.saturating_sub(sent), bytes) {
                None => self.window += bytes,
                Some(window) => {
                    // A queue is standing: congestion avoidance from what the path delivers.
                    self.delay_exits += 1;
                    self.exited_at = Some(now);
                    // Never below half the window reached: on a path whose floor is a
                    // fraction of a millisecond (a LAN, loopback), a rise of 4 ms is the
                    // hosts' processing, not a router's queue, and the floor's BDP would
                    // starve it; a halving is Reno's answer to a loss, and the worst case.
                    let floor = (self.window / 2).max(self.min_window());
                    self.window = window.clamp(floor, self.window.max(floor));
                    self.ssthresh = self.window;
                    self.w_max = self.window as f64;
                    self.k = 0.0;
                    self.w_est = self.window as f64;
                    self.epoch_start = Some(now);
                    // What was sent before the exit may still overflow the queue: its losses
                    // are the overshoot this exit already answered, not a new congestion.
                    self.recovery_start = Some(now);
                }
            }
            return;
        }
        self.congestion_avoidance(now, bytes, rtt);
    }

    /// Cubic's growth for one ack of `bytes`.
    fn congestion_avoidance(&mut self, now: Duration, bytes: u64, rtt: Duration) {
        let mss = self.mss as f64;
        let window = self.window as f64;
        let epoch = *self.epoch_start.get_or_insert(now);
        let t = now.saturating_sub(epoch).as_secs_f64() + rtt.as_secs_f64();
        let cubic = Self::C * mss * (t - self.k).powi(3) + self.w_max;
        let target = cubic.clamp(window, 1.5 * window);
        let mut next = window + (target - window) * bytes as f64 / window;
        // Reno-friendly region: never slower than Reno with the same β.
        let alpha = 3.0 * (1.0 - Self::BETA) / (1.0 + Self::BETA);
        self.w_est += alpha * mss * bytes as f64 / window;
        if self.w_est > next {
            next = self.w_est;
        }
        self.window = (next as u64).max(self.min_window());
    }

    /// Whether a loss of a datagram sent at `sent` belongs to a response already made (a cut,
    /// or the slow-start exit): it was in flight then, so it says nothing new about the path.
    pub fn answered(&self, sent: Duration) -> bool {
        self.recovery_start.is_some_and(|start| sent <= start)
    }

    /// Datagrams sent at `sent` were declared lost at `now` (or marked by ECN). `persistent`:
    /// everything sent for a while was lost, so the window falls to its minimum.
    pub fn on_congestion_event(&mut self, now: Duration, sent: Duration, persistent: bool) {
        if self.answered(sent) && !persistent {
            // Part of a congestion event already acted on.
            return;
        }
        self.congestion_events += 1;
        self.recovery_start = Some(now);
        let window = self.window as f64;
        // Fast convergence: a loss below the last W_max means another flow took a share, so
        // give up a little more of it.
        self.w_max = if window < self.w_max {
            window * (1.0 + Self::BETA) / 2.0
        } else {
            window
        };
        let cut = ((window * Self::BETA) as u64).max(self.min_window());
        self.ssthresh = cut;
        self.window = if persistent { self.min_window() } else { cut };
        self.k = ((self.w_max - cut as f64).max(0.0) / (Self::C * self.mss as f64)).cbrt();
        self.w_est = self.window as f64;
        self.epoch_start = None;
    }
}

/// [`Cubic`] behind a [`LossFilter`](crate::congestion::LossFilter): the agent's controller
/// (`--congestion filtered-cubic`), which the agent's adapter to quinn drives.
#[derive(Clone, Debug)]
pub struct FilteredCubic {
    /// The window.
    pub cubic: Cubic,
    /// Which losses are congestion.
    pub filter: crate::congestion::LossFilter,
    /// The latest smoothed round trip.
    rtt: Duration,
}

impl FilteredCubic {
    /// A controller at the start of a connection (see [`Cubic::new`]).
    pub fn new(mss: u64, initial_window: u64) -> Self {
        Self {
            cubic: Cubic::new(mss, initial_window, true),
            filter: crate::congestion::LossFilter::new(),
            rtt: Duration::from_millis(100),
        }
    }

    /// A datagram of `bytes` sent at `sent` was acknowledged at `now`; `rtt` is the smoothed
    /// round trip.
    pub fn on_ack(
        &mut self,
        now: Duration,
        sent: Duration,
        bytes: u64,
        app_limited: bool,
        rtt: Duration,
    ) {
        self.rtt = rtt;
        self.filter.on_ack(now, bytes, rtt);
        self.cubic.on_ack(now, sent, bytes, app_limited, rtt);
    }

    /// `lost_bytes` sent at `sent` (the newest of them) were declared lost at `now`; 0 bytes
    /// means an ECN congestion mark. Returns whether the window was cut.
    pub fn on_loss(
        &mut self,
        now: Duration,
        sent: Duration,
        lost_bytes: u64,
        persistent: bool,
    ) -> bool {
        if self.cubic.answered(sent) && !persistent {
            // In flight at the last cut or slow-start exit, which answered it. Counted by the
            // filter, a burst already answered would make the next random loss look like
            // congestion and cut the window a second time.
            return false;
        }
        // An ECN mark is never random.
        let congestion =
            lost_bytes == 0 || self.filter.on_loss(now, lost_bytes, self.rtt, persistent);
        let before = self.cubic.congestion_events;
        if congestion {
            self.cubic.on_congestion_event(now, sent, persistent);
        }
        self.cubic.congestion_events != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BinaryHeap;

    const MSS: u64 = 1200;
    const MS: Duration = Duration::from_millis(1);

    /// What a datagram sent into [`Path`] became.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        /// When the sender learns of it (its ack, or its loss).
        at: Duration,
        sent: Duration,
        lost: bool,
    }

    impl Ord for Outcome {
        fn cmp(&self, other: &Self) -> core::cmp::Ordering {
            (other.at, other.sent).cmp(&(self.at, self.sent))
        }
    }

    impl PartialOrd for Outcome {
        fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }

    /// What [`run`] saw.
    struct Run {
        delivered: u64,
        dropped: u64,
        /// When the queue first overflowed.
        first_drop: Option<Duration>,
        /// Every ack: when its datagram was sent, and when the ack came.
        acks: Vec<(Duration, Duration)>,
    }

    /// A bottleneck of `rate` bytes/s with a tail-drop queue of `queue` bytes and a base round
    /// trip; a window-limited sender paced as quinn paces (1.25 windows per smoothed round
    /// trip) runs `controller` over it for `seconds`.
    fn run(controller: &mut Cubic, rate: f64, rtt: Duration, queue: f64, seconds: f64) -> Run {
        let mut outcomes = BinaryHeap::new();
        let (mut now, mut in_flight, mut link_free) = (Duration::ZERO, 0u64, Duration::ZERO);
        let mut seen = Run {
            delivered: 0,
            dropped: 0,
            first_drop: None,
            acks: Vec::new(),
        };
        let mut smoothed = rtt;
        let end = Duration::from_secs_f64(seconds);
        while now < end {
            // Take every ack and loss due by now, then send what the window allows (one
            // datagram per pacing slot), or wait for the next ack.
            while outcomes.peek().is_some_and(|o: &Outcome| o.at <= now) {
                let outcome = outcomes.pop().expect("peeked");
                in_flight -= MSS;
                if outcome.lost {
                    controller.on_congestion_event(outcome.at, outcome.sent, false);
                } else {
                    seen.delivered += MSS;
                    seen.acks.push((outcome.sent, outcome.at));
                    let sample = outcome.at - outcome.sent;
                    smoothed = (smoothed * 7 + sample) / 8;
                    controller.on_ack(outcome.at, outcome.sent, MSS, false, smoothed);
                }
            }
            if in_flight + MSS > controller.window() {
                now = outcomes.peek().expect("something in flight").at;
                continue;
            }
            let queued = link_free.saturating_sub(now).as_secs_f64() * rate;
            if queued + MSS as f64 > queue {
                seen.dropped += MSS;
                seen.first_drop.get_or_insert(now);
                // The loss shows about a round trip later (the next datagrams' acks).
                outcomes.push(Outcome {
                    at: now + rtt + 3 * MS,
                    sent: now,
                    lost: true,
                });
            } else {
                link_free = link_free.max(now) + Duration::from_secs_f64(MSS as f64 / rate);
                outcomes.push(Outcome {
                    at: link_free + rtt,
                    sent: now,
                    lost: false,
                });
            }
            in_flight += MSS;
            // quinn's pacer: 1.25 windows per smoothed round trip.
            now += smoothed.mul_f64(MSS as f64 / (1.25 * controller.window() as f64));
        }
        seen
    }

    /// 100 Mbit/s, 80 ms, a queue of one BDP: the setting of issue 11's lossless goal.
    const RATE: f64 = 100e6 / 8.0;
    const RTT_MS: u64 = 80;

    fn bdp() -> f64 {
        RATE * (RTT_MS as f64 / 1e3)
    }

    #[test]
    fn slow_start_ends_on_the_round_trip_before_the_queue_overflows() {
        let rtt = MS * RTT_MS as u32;
        let mut with = Cubic::new(MSS, 10 * MSS, true);
        let exiting = run(&mut with, RATE, rtt, bdp(), 8.0);
        let mut without = Cubic::new(MSS, 10 * MSS, false);
        let plain = run(&mut without, RATE, rtt, bdp(), 8.0);
        assert_eq!(with.delay_exits, 1, "slow start ended on the round trip");
        // What was in flight at the exit still overflows the queue a little, but it is
        // answered by the exit, not by a cut.
        assert_eq!(with.congestion_events, 0);
        assert!(without.congestion_events >= 1);
        assert!(
            exiting.dropped * 4 < plain.dropped,
            "{} bytes dropped against {} in slow start until the first loss",
            exiting.dropped,
            plain.dropped
        );
        // The window at the exit fills the link without filling the queue.
        let exit = with.ssthresh().expect("slow start ended") as f64;
        assert!(
            (bdp()..1.75 * bdp()).contains(&exit),
            "exit at {exit} for a BDP of {}",
            bdp()
        );
        // As much arrives in 8 s (the drops cost no link time in this model, so the gain on
        // a real link, the retransmissions saved, does not show here): over 0.9 of the link.
        let link = RATE * 8.0;
        assert!(
            exiting.delivered as f64 > 0.99 * plain.delivered as f64,
            "{} against {}",
            exiting.delivered,
            plain.delivered
        );
        assert!(
            exiting.delivered as f64 > 0.9 * link,
            "{:.3} of the link",
            exiting.delivered as f64 / link
        );
    }

    #[test]
    fn a_round_minimum_detects_the_queue_a_round_too_late() {
        // RFC 9406's test on plain slow start's acks: each round's minimum round trip against
        // the last round's. It fires only after the queue has overflowed, which is why this
        // controller judges the last samples instead.
        let rtt = MS * RTT_MS as u32;
        let mut plain = Cubic::new(MSS, 10 * MSS, false);
        let seen = run(&mut plain, RATE, rtt, bdp(), 2.0);
        let first_drop = seen.first_drop.expect("plain slow start overflows");
        let (mut round_start, mut current, mut last, mut samples) = (Duration::ZERO, None, None, 0);
        let mut fired = None;
        for &(sent, at) in &seen.acks {
            if sent >= round_start {
                (last, current, samples, round_start) = (current, None, 0, at);
            }
            let sample = at - sent;
            current = Some(current.map_or(sample, |c: Duration| c.min(sample)));
            samples += 1;
            if let (Some(current), Some(last), true) = (current, last, samples >= 8) {
                let rise = (last / 8).clamp(4 * MS, 16 * MS);
                if current >= last + rise {
                    fired = Some(at);
                    break;
                }
            }
        }
        let fired = fired.expect("the round minimum rises at last");
        assert!(
            fired > first_drop,
            "fired at {fired:?}, overflowed at {first_drop:?}"
        );
        // The last-samples test of this controller, on the same path, ends slow start sooner.
        let mut exiting = Cubic::new(MSS, 10 * MSS, true);
        run(&mut exiting, RATE, rtt, bdp(), 2.0);
        let exit = exiting.slow_start_exit().expect("slow start ended");
        assert!(exit < fired, "exit at {exit:?}, round minimum at {fired:?}");
    }

    #[test]
    fn a_few_high_samples_do_not_end_slow_start_but_a_standing_queue_does() {
        let mut cubic = Cubic::new(MSS, 10 * MSS, true);
        let rtt = MS * RTT_MS as u32;
        let mut now = Duration::from_secs(1);
        let mut ack = |cubic: &mut Cubic, sample: Duration| {
            now += MS;
            cubic.on_ack(now, now - sample, MSS, false, rtt);
        };
        for _ in 0..20 {
            ack(&mut cubic, rtt);
        }
        // Jitter or delayed acks: seven high samples, then one at the floor.
        for _ in 0..3 {
            for _ in 0..7 {
                ack(&mut cubic, rtt + 30 * MS);
            }
            ack(&mut cubic, rtt);
        }
        assert!(cubic.in_slow_start());
        // A rise below the threshold (an eighth of 80 ms) does not count either.
        for _ in 0..20 {
            ack(&mut cubic, rtt + 9 * MS);
        }
        assert!(cubic.in_slow_start());
        // Eight in a row above it do.
        for _ in 0..8 {
            ack(&mut cubic, rtt + 11 * MS);
        }
        assert!(!cubic.in_slow_start());
        assert_eq!(cubic.delay_exits, 1);
    }

    #[test]
    fn on_a_sub_millisecond_path_the_exit_keeps_at_least_half_the_window() {
        // Loopback: a floor of 0.2 ms, then the receiver's processing holds acks 5 ms. The
        // floor's BDP at 300 MB/s is 60 KB; the window must not fall to it.
        let mut cubic = Cubic::new(MSS, 10 * MSS, true);
        let floor = Duration::from_micros(200);
        let mut now = Duration::from_secs(1);
        let per_ack = Duration::from_nanos(MSS * 1_000_000_000 / 300_000_000);
        while cubic.window() < 4_000_000 {
            now += per_ack;
            cubic.on_ack(now, now - floor, MSS, false, floor);
        }
        let reached = cubic.window();
        for _ in 0..8 {
            now += per_ack;
            cubic.on_ack(now, now - 5 * MS, MSS, false, 5 * MS);
        }
        assert_eq!(cubic.delay_exits, 1);
        assert!(
            cubic.window() >= reached / 2,
            "{} after slow start reached {reached}",
            cubic.window()
        );
    }

    #[test]
    fn the_overshoot_answered_by_the_exit_does_not_make_a_random_loss_a_second_cut() {
        // Slow start at 80 ms up to a standing queue, the exit, then the tail drops of what
        // was in flight before it (a burst the filter alone would call congestion), then one
        // random loss of a datagram sent after the exit.
        let rtt = MS * RTT_MS as u32;
        let mut controller = FilteredCubic::new(MSS, 10 * MSS);
        let mut now = Duration::from_secs(1);
        while controller.cubic.window() < 2_000_000 {
            now += Duration::from_micros(100);
            controller.on_ack(now, now - rtt, MSS, false, rtt);
        }
        for _ in 0..8 {
            now += Duration::from_micros(100);
            controller.on_ack(now, now - rtt - 20 * MS, MSS, false, rtt);
        }
        assert_eq!(controller.cubic.delay_exits, 1);
        let exit = now;
        let window = controller.cubic.window();
        for index in 0..100u32 {
            let at = exit + rtt / 2 + MS * index / 10;
            assert!(!controller.on_loss(at, exit - MS, MSS, false));
        }
        // Acks of what is sent after the exit, and one random loss among them.
        for index in 0..200u32 {
            let at = exit + rtt + MS * index / 2;
            controller.on_ack(at, at - rtt, MSS, false, rtt);
        }
        let at = exit + 2 * rtt;
        assert!(!controller.on_loss(at, exit + rtt / 2, MSS, false));
        assert_eq!(controller.cubic.congestion_events, 0);
        assert!(controller.cubic.window() >= window);
        // A burst of datagrams sent after the exit is congestion, and cuts.
        let mut cut = false;
        for index in 0..100u32 {
            cut |= controller.on_loss(at + MS * index / 10, exit + rtt, MSS, false);
        }
        assert!(cut);
    }

    #[test]
    fn a_loss_cuts_the_window_once_per_round_and_cubic_returns_to_it() {
        let mut cubic = Cubic::new(MSS, 10 * MSS, false);
        let rtt = 80 * MS;
        // Grow by slow start to 1000 datagrams.
        let mut now = rtt;
        while cubic.window() < 1000 * MSS {
            now += MS;
            cubic.on_ack(now, now - rtt, MSS, false, rtt);
        }
        let before = cubic.window();
        cubic.on_congestion_event(now, now - MS, false);
        assert_eq!(cubic.window(), (before as f64 * Cubic::BETA) as u64);
        // More losses of datagrams sent before the cut are the same event.
        cubic.on_congestion_event(now + rtt, now - 2 * MS, false);
        assert_eq!(cubic.congestion_events, 1);
        // Acks of datagrams sent before the cut do not grow the window.
        let cut = cubic.window();
        cubic.on_ack(now + 10 * MS, now - MS, MSS, false, rtt);
        assert_eq!(cubic.window(), cut);
        // Acked at full rate (a window a round), the window follows Cubic's curve: half-way
        // back at a fraction of K, at the old window at K = cbrt(W_max × (1 - β) / C) (in
        // datagrams), where it plateaus.
        let k = (1000.0 * (1.0 - Cubic::BETA) / Cubic::C).cbrt();
        let start = now + rtt;
        let mut t = start;
        let ack_until = |cubic: &mut Cubic, t: &mut Duration, until: f64| {
            while (*t - start).as_secs_f64() < until {
                *t += rtt / (cubic.window() / MSS) as u32;
                cubic.on_ack(*t, *t - rtt, MSS, false, rtt);
            }
            cubic.window() as f64 / before as f64
        };
        // W(K/2) = W_max - C (K/2)³ = 1000 - 37.5 datagrams.
        let half = ack_until(&mut cubic, &mut t, k / 2.0);
        assert!((0.95..0.98).contains(&half), "at K/2: {half:.3} of W_max");
        let at_k = ack_until(&mut cubic, &mut t, k);
        assert!((0.98..1.01).contains(&at_k), "at K: {at_k:.3} of W_max");
        // Then it probes beyond: W(2K) = W_max + 750 × 0.3... = 1300 datagrams.
        let at_2k = ack_until(&mut cubic, &mut t, 2.0 * k);
        assert!((1.2..1.4).contains(&at_2k), "at 2K: {at_2k:.3} of W_max");
        // App-limited acks never grow it.
        let window = cubic.window();
        cubic.on_ack(t + rtt, t, MSS, true, rtt);
        assert_eq!(cubic.window(), window);
        // Persistent congestion drops it to two datagrams.
        cubic.on_congestion_event(t + 2 * rtt, t + rtt, true);
        assert_eq!(cubic.window(), 2 * MSS);
    }

    /// A second connection over the same path (100 Mbit/s, 200 ms, a queue of one BDP)
    /// resumes the first one's window: it delivers more in a short transfer, with no more
    /// loss; over a path a quarter as fast it retreats to that path's BDP without a flood of
    /// drops; over a path of another round trip it does not jump at all.
    #[test]
    fn a_connection_resumes_the_window_of_the_last_one_over_the_same_path() {
        let rtt = 200 * MS;
        let bdp = RATE * 0.2;
        let mut first = Cubic::new(MSS, 10 * MSS, true);
        run(&mut first, RATE, rtt, bdp, 8.0);
        let memory = first.path_memory().expect("acks were seen");
        assert!(
            memory.floor >= rtt && memory.floor < rtt + 5 * MS,
            "{memory:?}"
        );
        assert!(memory.window as f64 > bdp, "{memory:?}");

        // A cycle of 3 s over the same path.
        let mut fresh = Cubic::new(MSS, 10 * MSS, true);
        let cold = run(&mut fresh, RATE, rtt, bdp, 3.0);
        let mut resumed = Cubic::new(MSS, 10 * MSS, true);
        resumed.resume_from(memory);
        let warm = run(&mut resumed, RATE, rtt, bdp, 3.0);
        assert!(resumed.resumed && !fresh.resumed);
        let link = RATE * 3.0;
        assert!(
            warm.delivered as f64 > 1.5 * cold.delivered as f64,
            "resumed {:.2} of the link against {:.2} from slow start",
            warm.delivered as f64 / link,
            cold.delivered as f64 / link
        );
        // (A transfer of 3 s at 200 ms has its first round trip idle either way: 0.85 here
        // is near the most it can reach; from slow start it reached 0.45.)
        assert!(warm.delivered as f64 > 0.8 * link);
        assert_eq!(resumed.congestion_events, 0);
        assert!(
            warm.dropped <= cold.dropped.max(bdp as u64 / 20),
            "dropped {} resumed against {} from slow start",
            warm.dropped,
            cold.dropped
        );

        // The same memory over a path a quarter as fast: the jump is twice this path's BDP,
        // slow start's exit brings it back, and what is dropped stays near one queue.
        let slow = RATE / 4.0;
        let mut narrower = Cubic::new(MSS, 10 * MSS, true);
        narrower.resume_from(memory);
        let seen = run(&mut narrower, slow, rtt, slow * 0.2, 8.0);
        assert!(narrower.resumed);
        let window = narrower.window() as f64;
        assert!(
            window < 2.5 * slow * 0.2,
            "window {window} for a BDP of {}",
            slow * 0.2
        );
        assert!(
            (seen.dropped as f64) < 0.06 * seen.delivered as f64,
            "dropped {} of {} delivered",
            seen.dropped,
            seen.delivered
        );
        assert!(seen.delivered as f64 > 0.8 * slow * 8.0);

        // Another round trip (20 ms): another path, no jump.
        let mut elsewhere = Cubic::new(MSS, 10 * MSS, true);
        elsewhere.resume_from(memory);
        run(&mut elsewhere, RATE, 20 * MS, RATE * 0.02, 1.0);
        assert!(!elsewhere.resumed);
    }
}
