//! Telling random loss from congestion, for the agent's sending side.
//!
//! A loss-based congestion controller (Cubic, NewReno) halves its window on every loss. On a
//! long link with random loss that caps it at the Mathis limit, about
//! `MSS / RTT × 1.22 / sqrt(p)`: at 80 ms and 1% loss, under 2 Mbit/s whatever the link's
//! rate. quinn's BBR ignores random loss, but it runs at about twice the bottleneck rate and
//! loses half of what it sends at a tail-drop queue (`cargo xtask bench wan`).
//!
//! [`LossFilter`] sits in front of a loss-based controller and passes a loss on only when it
//! looks like congestion: when the bytes lost over the last two round trips exceed a share of
//! what was sent ([`LossFilter::THRESHOLD`]) and are more than a few datagrams. Random loss
//! below that share never reaches the controller; a queue that overflows drops a burst, which
//! does. The price is that the controller sees congestion a little later, so a link in
//! congestion loses a few percent more before the window comes down.

use core::time::Duration;

/// Counts acked and lost bytes per round trip and decides which losses are congestion.
#[derive(Clone, Debug)]
pub struct LossFilter {
    /// Start of the current round, and its acked and lost bytes.
    round_start: Option<Duration>,
    current: (u64, u64),
    /// The previous round's acked and lost bytes.
    previous: (u64, u64),
    /// Losses passed on and ignored, for the metrics.
    pub passed: u64,
    /// Losses that did not look like congestion.
    pub ignored: u64,
}

impl Default for LossFilter {
    fn default() -> Self {
        Self::new()
    }
}

impl LossFilter {
    /// The share of bytes lost over two rounds above which a loss is congestion.
    pub const THRESHOLD: f64 = 0.03;
    /// Fewer lost bytes than this over two rounds are never congestion (a window of a few
    /// datagrams would otherwise read one random loss as a high share).
    pub const MIN_LOST_BYTES: u64 = 4 * 1500;

    /// A filter with nothing counted.
    pub fn new() -> Self {
        Self {
            round_start: None,
            current: (0, 0),
            previous: (0, 0),
            passed: 0,
            ignored: 0,
        }
    }

    fn roll(&mut self, now: Duration, rtt: Duration) {
        let start = *self.round_start.get_or_insert(now);
        if now.saturating_sub(start) >= rtt.max(Duration::from_millis(1)) {
            // More than a round since the last roll: the older round is too old to count.
            self.previous = if now.saturating_sub(start) >= rtt * 2 {
                (0, 0)
            } else {
                self.current
            };
            self.current = (0, 0);
            self.round_start = Some(now);
        }
    }

    /// `bytes` were acknowledged at `now`; `rtt` is the smoothed round trip.
    pub fn on_ack(&mut self, now: Duration, bytes: u64, rtt: Duration) {
        self.roll(now, rtt);
        self.current.0 += bytes;
    }

    /// `bytes` were declared lost at `now`. Returns whether the loss is congestion (pass it to
    /// the controller). A persistent congestion (everything lost for a while) always is.
    pub fn on_loss(&mut self, now: Duration, bytes: u64, rtt: Duration, persistent: bool) -> bool {
        self.roll(now, rtt);
        self.current.1 += bytes;
        let lost = self.current.1 + self.previous.1;
        let total = lost + self.current.0 + self.previous.0;
        let congestion = persistent
            || (lost >= Self::MIN_LOST_BYTES
                && lost as f64 > Self::THRESHOLD * total.max(1) as f64);
        if congestion {
            self.passed += 1;
        } else {
            self.ignored += 1;
        }
        congestion
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(80);
    const MTU: u64 = 1200;

    /// Sends `packets_per_round` datagrams per round for `rounds` rounds, losing each with
    /// `lose(round, index)`; returns how many losses the filter passed on.
    fn run(
        filter: &mut LossFilter,
        rounds: u32,
        packets_per_round: u32,
        mut lose: impl FnMut(u32, u32) -> bool,
    ) -> u64 {
        let before = filter.passed;
        for round in 0..rounds {
            for index in 0..packets_per_round {
                let now = RTT * round + RTT * index / packets_per_round;
                if lose(round, index) {
                    filter.on_loss(now, MTU, RTT, false);
                } else {
                    filter.on_ack(now, MTU, RTT);
                }
            }
        }
        filter.passed - before
    }

    #[test]
    fn one_percent_random_loss_is_not_congestion() {
        let mut filter = LossFilter::new();
        // Every 100th datagram, 700 a round (100 Mbit/s at 80 ms).
        let mut count = 0u32;
        let passed = run(&mut filter, 200, 700, |_, _| {
            count += 1;
            count.is_multiple_of(100)
        });
        assert_eq!(passed, 0);
        assert!(filter.ignored > 1000);
    }

    #[test]
    fn a_burst_from_an_overflowing_queue_is_congestion() {
        let mut filter = LossFilter::new();
        run(&mut filter, 10, 700, |_, _| false);
        // The queue overflows: 10% of a round's datagrams are dropped at its tail.
        let passed = run(&mut filter, 1, 700, |_, index| index >= 630);
        assert!(passed > 0);
    }

    #[test]
    fn a_single_loss_in_a_small_window_is_not_congestion_but_a_lost_window_is() {
        let mut filter = LossFilter::new();
        // Ten datagrams a round, one lost: 10%, but one datagram.
        assert_eq!(run(&mut filter, 5, 10, |_, index| index == 3), 0);
        // Everything of a small window lost.
        assert!(run(&mut filter, 1, 10, |_, _| true) > 0);
        // Persistent congestion always passes.
        assert!(filter.on_loss(RTT * 100, 1, RTT, true));
    }

    #[test]
    fn old_rounds_stop_counting() {
        let mut filter = LossFilter::new();
        // A lossy stretch, then a long quiet gap, then a clean round with one loss.
        run(&mut filter, 3, 100, |_, index| index < 20);
        let later = RTT * 50;
        for index in 0..100u32 {
            filter.on_ack(later + RTT * index / 100, MTU, RTT);
        }
        assert!(!filter.on_loss(later + RTT, MTU, RTT, false));
    }
}
