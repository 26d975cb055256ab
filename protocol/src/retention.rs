//! Which points in time the receiver keeps: a tiered retention policy, as a pure function of
//! the points, the current time and the points that must not go (no IO, no clock).
//!
//! # The policy
//!
//! * every point younger than `all` (default 1 hour) is kept;
//! * of the points younger than `hourly` (default 24 hours), the *oldest* point of each clock
//!   hour (UTC) is kept (the oldest within the 24 hours, for the hour at the horizon);
//! * of the points younger than `daily` (default 7 days), the oldest point of each UTC day is
//!   kept;
//! * the newest point is always kept, whatever its age, and so is every *pinned* point (one a
//!   restore is reading).
//!
//! The oldest point of a bucket, not the newest, represents it: once chosen it stays chosen
//! while newer points arrive in the same hour, so the store does not rewrite its deltas at
//! every cycle.

use std::{collections::BTreeSet, time::Duration};

use serde::{Deserialize, Serialize};

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// How long points are kept at each density.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Every point younger than this is kept.
    pub all: Duration,
    /// One point per hour is kept for this long.
    pub hourly: Duration,
    /// One point per day is kept for this long.
    pub daily: Duration,
    /// The retention lock: no point younger than this is pruned, whatever the other tiers
    /// say (in the spirit of S3 Object Lock). A configuration reload cannot shorten it.
    #[serde(default)]
    pub locked: Duration,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            all: Duration::from_secs(3600),
            hourly: Duration::from_secs(24 * 3600),
            daily: Duration::from_secs(7 * 24 * 3600),
            locked: Duration::ZERO,
        }
    }
}

/// A point as retention sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointAge {
    /// The point's cycle number (unique, increasing with time).
    pub seq: u64,
    /// When it was cut (Unix milliseconds).
    pub time_unix_ms: u64,
}

/// The cycle numbers of the points to keep. `points` may be in any order; `pinned` points are
/// kept even when the policy would drop them.
pub fn select(
    points: &[PointAge],
    now_unix_ms: u64,
    policy: &RetentionPolicy,
    pinned: &BTreeSet<u64>,
) -> BTreeSet<u64> {
    let mut sorted = points.to_vec();
    sorted.sort_by_key(|p| (p.time_unix_ms, p.seq));
    let mut keep = BTreeSet::new();
    if let Some(newest) = points.iter().max_by_key(|p| p.seq) {
        keep.insert(newest.seq);
    }
    let (mut last_hour, mut last_day) = (None, None);
    for point in &sorted {
        let age = Duration::from_millis(now_unix_ms.saturating_sub(point.time_unix_ms));
        if age <= policy.all || age <= policy.locked {
            keep.insert(point.seq);
        }
        // A bucket's representative is its oldest point within the tier's horizon, so the
        // hour that straddles the horizon keeps one too.
        let hour = point.time_unix_ms / HOUR_MS;
        if age <= policy.hourly && last_hour != Some(hour) {
            keep.insert(point.seq);
            last_hour = Some(hour);
        }
        let day = point.time_unix_ms / DAY_MS;
        if age <= policy.daily && last_day != Some(day) {
            keep.insert(point.seq);
            last_day = Some(day);
        }
        if pinned.contains(&point.seq) {
            keep.insert(point.seq);
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(seq: u64, time_unix_ms: u64) -> PointAge {
        PointAge { seq, time_unix_ms }
    }

    #[test]
    fn defaults_keep_all_recent_then_hourly_then_daily() {
        let now = 100 * DAY_MS;
        // A point every 10 minutes for 10 days.
        let points: Vec<_> = (0..1440u64)
            .map(|i| at(i + 1, now - 10 * DAY_MS + i * 600_000))
            .collect();
        let keep = select(&points, now, &RetentionPolicy::default(), &BTreeSet::new());
        let kept: Vec<_> = points.iter().filter(|p| keep.contains(&p.seq)).collect();
        let age = |p: &PointAge| now - p.time_unix_ms;
        // Within the hour: all six.
        assert_eq!(kept.iter().filter(|p| age(p) <= HOUR_MS).count(), 6);
        // Between 1 h and 24 h: one per hour (23 hours, the boundary hour may add one).
        let hourly = kept
            .iter()
            .filter(|p| age(p) > HOUR_MS && age(p) <= DAY_MS)
            .count();
        assert!((23..=24).contains(&hourly), "hourly {hourly}");
        // Between 1 and 7 days: one per day.
        let daily = kept
            .iter()
            .filter(|p| age(p) > DAY_MS && age(p) <= 7 * DAY_MS)
            .count();
        assert!((6..=7).contains(&daily), "daily {daily}");
        // Nothing older than 7 days.
        assert!(kept.iter().all(|p| age(p) <= 7 * DAY_MS));
    }

    #[test]
    fn the_oldest_point_of_a_bucket_represents_it() {
        let policy = RetentionPolicy {
            all: Duration::ZERO,
            ..RetentionPolicy::default()
        };
        let base = 10 * DAY_MS;
        let points = [
            at(1, base + 60_000),
            at(2, base + 120_000),
            at(3, base + 180_000),
        ];
        let keep = select(&points, base + 200_000, &policy, &BTreeSet::new());
        assert_eq!(keep, BTreeSet::from([1, 3]));
    }

    #[test]
    fn zero_policy_keeps_only_the_newest_and_pinned() {
        let policy = RetentionPolicy {
            all: Duration::ZERO,
            hourly: Duration::ZERO,
            daily: Duration::ZERO,
            locked: Duration::ZERO,
        };
        let points = [at(1, 1000), at(2, 2000), at(3, 3000)];
        let keep = select(&points, 10_000, &policy, &BTreeSet::from([1]));
        assert_eq!(keep, BTreeSet::from([1, 3]));
    }

    proptest! {
        #[test]
        fn newest_and_pinned_always_survive_and_selection_is_stable(
            times in proptest::collection::vec(0u64..30 * DAY_MS, 1..60),
            now_extra in 0u64..40 * DAY_MS,
            all_s in 0u64..7200, hourly_h in 0u64..48, daily_d in 0u64..10,
            locked_h in 0u64..100,
            pin_index in any::<prop::sample::Index>(),
        ) {
            let mut times = times;
            times.sort_unstable();
            let points: Vec<_> = times.iter().enumerate().map(|(i, &t)| at(i as u64 + 1, t)).collect();
            let now = times.last().copied().unwrap_or(0) + now_extra;
            let policy = RetentionPolicy {
                all: Duration::from_secs(all_s),
                hourly: Duration::from_secs(hourly_h * 3600),
                daily: Duration::from_secs(daily_d * 86400),
                locked: Duration::from_secs(locked_h * 3600),
            };
            let pinned = BTreeSet::from([points[pin_index.index(points.len())].seq]);
            let keep = select(&points, now, &policy, &pinned);
            prop_assert!(keep.contains(&(points.len() as u64)));
            prop_assert!(keep.is_superset(&pinned));
            // The lock: nothing younger than it is pruned.
            for point in &points {
                if now - point.time_unix_ms <= locked_h * 3_600_000 {
                    prop_assert!(keep.contains(&point.seq), "locked point {} pruned", point.seq);
                }
            }
            // Applying the policy to what it kept keeps all of it: pruning again at the same
            // instant removes nothing more.
            let survivors: Vec<_> = points.iter().copied().filter(|p| keep.contains(&p.seq)).collect();
            let again = select(&survivors, now, &policy, &pinned);
            prop_assert_eq!(again, keep);
        }
    }
}
