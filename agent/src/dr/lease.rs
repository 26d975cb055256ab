//! The lease that makes one receiver the only writer of a volume in a shared object store.
//!
//! Several receivers may serve one store, and any of them may serve any volume, but a volume
//! must have exactly one writer: two receivers committing cycles of one volume would interleave
//! its points. The writer holds a **lease**, one small object per volume in the store
//! (`volumes/VOLUME/lease`), that names it and says until when it holds. It renews the lease
//! well before that time; another receiver may take it over only once it has expired.
//!
//! The store decides races, not the receivers: every change of the lease object is a
//! conditional write, "create only if absent" for the first lease and "replace only if it is
//! still the version I read" for a renewal or a take-over. Of two receivers that read the same
//! expired lease and both try to take it, the store accepts one write and refuses the other.
//!
//! Every take-over raises the lease's **token**, a fencing number: what a writer commits under
//! a lease carries its token, so a writer that was paused past its lease's end (and does not
//! know it lost it) is refused by what checks the token, rather than trusted on its clock.
//!
//! A token fences what its holder *commits* (a point's name is taken once). Retention is
//! fenced by time instead, since it rewrites objects a token cannot guard:
//! - a holder sends retention's writes only before its [`write_deadline`], half a lease after
//!   it last asked for the lease, so a holder paused past its lease stops before it writes;
//! - a new holder runs retention only once it has held its token for the store's settle time
//!   ([`Tenures`]), by which the previous holder's last writes (sent before its deadline, with
//!   the client's retries) have landed.
//!
//! This module is pure: it decides from the lease it is given and the time it is told, and
//! does no IO. [`crate::dr::objstore`] reads and writes the object.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The format of a lease record; a newer one is refused, never reinterpreted.
pub const LEASE_FORMAT: u32 = 1;

/// The largest lease record read: a record is about 150 bytes.
pub const MAX_LEASE_BYTES: usize = 4096;

/// The lease object of a volume, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// [`LEASE_FORMAT`].
    pub format: u32,
    /// Who holds it: the receiver's id (its host name and store identity).
    pub holder: String,
    /// The fencing token: raised at every take-over, kept by renewals.
    pub token: u64,
    /// When it was last taken or renewed, in milliseconds since the Unix epoch.
    pub renewed_ms: u64,
    /// Until when it holds, in milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

/// Why a stored lease record was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LeaseError {
    /// Larger than [`MAX_LEASE_BYTES`].
    #[error("the lease object is {0} bytes, more than the {MAX_LEASE_BYTES} a lease can be")]
    TooLarge(usize),
    /// Not a lease record.
    #[error("the lease object is not a lease record: {0}")]
    Malformed(String),
    /// Written by a newer release.
    #[error("the lease object has format {found}; this release reads format {LEASE_FORMAT}")]
    NewerFormat {
        /// The record's format.
        found: u32,
    },
}

impl LeaseRecord {
    /// The record's bytes in the store.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a lease record always serializes")
    }

    /// Parses a stored record, bounded and checked.
    pub fn decode(bytes: &[u8]) -> Result<Self, LeaseError> {
        if bytes.len() > MAX_LEASE_BYTES {
            return Err(LeaseError::TooLarge(bytes.len()));
        }
        let record: Self =
            serde_json::from_slice(bytes).map_err(|e| LeaseError::Malformed(e.to_string()))?;
        if record.format > LEASE_FORMAT {
            return Err(LeaseError::NewerFormat {
                found: record.format,
            });
        }
        if record.holder.is_empty() || record.expires_ms < record.renewed_ms {
            return Err(LeaseError::Malformed(format!(
                "holder {:?}, renewed at {} ms, expiring at {} ms",
                record.holder, record.renewed_ms, record.expires_ms
            )));
        }
        Ok(record)
    }
}

/// What a receiver that wants to write a volume should do, given its lease object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseDecision {
    /// There is no lease: create this one, only if the object is still absent.
    Create(LeaseRecord),
    /// We hold it: replace it with this one (same token, later expiry), only if it is still
    /// the version we read.
    Renew(LeaseRecord),
    /// Another holder's lease has expired: replace it with this one (the token raised), only
    /// if it is still the version we read.
    TakeOver(LeaseRecord),
    /// Another holder's lease still holds: do not write the volume.
    Held {
        /// Who holds it.
        holder: String,
        /// Until when, in milliseconds since the Unix epoch.
        expires_ms: u64,
    },
}

/// Decides what `me` does about the lease `current` (none: no lease object) at `now_ms`, for a
/// lease of `duration_ms`.
///
/// A lease that expires exactly at `now_ms` has expired. A holder renews its own lease even
/// after it expired, as long as nobody took it over (the store's conditional write checks
/// that), and keeps its token: nobody else can have written under another token meanwhile.
pub fn decide(
    current: Option<&LeaseRecord>,
    me: &str,
    now_ms: u64,
    duration_ms: u64,
) -> LeaseDecision {
    let lease = |token: u64| LeaseRecord {
        format: LEASE_FORMAT,
        holder: me.to_owned(),
        token,
        renewed_ms: now_ms,
        expires_ms: now_ms.saturating_add(duration_ms),
    };
    match current {
        None => LeaseDecision::Create(lease(1)),
        Some(held) if held.holder == me => LeaseDecision::Renew(lease(held.token)),
        Some(held) if held.expires_ms <= now_ms => {
            LeaseDecision::TakeOver(lease(held.token.saturating_add(1)))
        }
        Some(held) => LeaseDecision::Held {
            holder: held.holder.clone(),
            expires_ms: held.expires_ms,
        },
    }
}

/// When a holder should renew a lease it took at `renewed_ms` for `duration_ms`: at a third
/// of its life, so that two renewals can fail (a store node down, a slow link) before it ends.
pub fn renew_at(renewed_ms: u64, duration_ms: u64) -> u64 {
    renewed_ms.saturating_add(duration_ms / 3)
}

/// Until when the holder of a lease that it asked for at `asked` (before its request, on a
/// monotonic clock) for `duration` may send writes that no token fences: half the lease.
/// The other half is room for clocks that differ: another receiver takes the lease over by
/// its own clock, once the expiry this holder wrote (its clock at the request, plus
/// `duration`) has passed.
pub fn write_deadline(
    asked: std::time::Instant,
    duration: std::time::Duration,
) -> std::time::Instant {
    asked + duration / 2
}

/// How long this process has held each volume's lease under its present token: a token
/// first seen starts a tenure, a renewal under it keeps it, and a token taken anew (another
/// receiver held the volume in between) starts another.
#[derive(Debug, Default)]
pub struct Tenures {
    held_since: std::collections::HashMap<String, (u64, std::time::Instant)>,
}

impl Tenures {
    /// Notes that `volume`'s lease is held under `token` at `now`; returns how long it has
    /// been held under that token.
    pub fn held_for(
        &mut self,
        volume: &str,
        token: u64,
        now: std::time::Instant,
    ) -> std::time::Duration {
        let since = match self.held_since.get(volume) {
            Some(&(held, since)) if held == token => since,
            _ => {
                self.held_since.insert(volume.to_owned(), (token, now));
                now
            }
        };
        now.saturating_duration_since(since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(holder: &str, token: u64, renewed_ms: u64, expires_ms: u64) -> LeaseRecord {
        LeaseRecord {
            format: LEASE_FORMAT,
            holder: holder.to_owned(),
            token,
            renewed_ms,
            expires_ms,
        }
    }

    #[test]
    fn a_missing_lease_is_created_with_token_one() {
        let LeaseDecision::Create(lease) = decide(None, "r1", 1_000, 30_000) else {
            panic!("expected a create");
        };
        assert_eq!(lease, held("r1", 1, 1_000, 31_000));
    }

    #[test]
    fn the_holder_renews_with_its_token_even_late() {
        let current = held("r1", 7, 1_000, 31_000);
        for now in [2_000, 31_000, 90_000] {
            assert_eq!(
                decide(Some(&current), "r1", now, 30_000),
                LeaseDecision::Renew(held("r1", 7, now, now + 30_000))
            );
        }
    }

    #[test]
    fn another_holder_waits_until_expiry_then_takes_over_with_a_raised_token() {
        let current = held("r1", 7, 1_000, 31_000);
        assert_eq!(
            decide(Some(&current), "r2", 30_999, 30_000),
            LeaseDecision::Held {
                holder: "r1".to_owned(),
                expires_ms: 31_000
            }
        );
        assert_eq!(
            decide(Some(&current), "r2", 31_000, 30_000),
            LeaseDecision::TakeOver(held("r2", 8, 31_000, 61_000))
        );
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused_with_a_reason() {
        let record = held("receiver-a", 3, 10, 20);
        assert_eq!(LeaseRecord::decode(&record.encode()), Ok(record.clone()));
        assert_eq!(
            LeaseRecord::decode(&vec![b' '; MAX_LEASE_BYTES + 1]),
            Err(LeaseError::TooLarge(MAX_LEASE_BYTES + 1))
        );
        assert!(matches!(
            LeaseRecord::decode(b"{\"holder\":1}"),
            Err(LeaseError::Malformed(_))
        ));
        let newer = LeaseRecord {
            format: LEASE_FORMAT + 1,
            ..record.clone()
        };
        assert_eq!(
            LeaseRecord::decode(&newer.encode()),
            Err(LeaseError::NewerFormat {
                found: LEASE_FORMAT + 1
            })
        );
        let backwards = LeaseRecord {
            expires_ms: 5,
            ..record.clone()
        };
        assert!(matches!(
            LeaseRecord::decode(&backwards.encode()),
            Err(LeaseError::Malformed(_))
        ));
        let nobody = LeaseRecord {
            holder: String::new(),
            ..record
        };
        assert!(matches!(
            LeaseRecord::decode(&nobody.encode()),
            Err(LeaseError::Malformed(_))
        ));
    }

    #[test]
    fn renewal_comes_at_a_third_of_the_lease() {
        assert_eq!(renew_at(1_000, 30_000), 11_000);
        assert_eq!(renew_at(u64::MAX, 30_000), u64::MAX);
    }

    #[test]
    fn a_tenure_lasts_while_the_token_does_and_restarts_with_another() {
        let start = std::time::Instant::now();
        let at = |s: u64| start + std::time::Duration::from_secs(s);
        let mut tenures = Tenures::default();
        assert_eq!(tenures.held_for("a", 3, at(10)).as_secs(), 0);
        // Renewals under the same token: the tenure goes on; another volume has its own.
        assert_eq!(tenures.held_for("a", 3, at(40)).as_secs(), 30);
        assert_eq!(tenures.held_for("b", 3, at(40)).as_secs(), 0);
        assert_eq!(tenures.held_for("a", 3, at(400)).as_secs(), 390);
        // The lease was lost and taken again: another token, a new tenure.
        assert_eq!(tenures.held_for("a", 5, at(401)).as_secs(), 0);
        assert_eq!(tenures.held_for("a", 5, at(460)).as_secs(), 59);
        // A clock read out of order never gives a negative tenure.
        assert_eq!(tenures.held_for("a", 5, at(300)).as_secs(), 0);
    }

    #[test]
    fn writes_that_no_token_fences_end_half_a_lease_after_it_was_asked_for() {
        let asked = std::time::Instant::now();
        let lease = std::time::Duration::from_secs(60);
        assert_eq!(
            write_deadline(asked, lease) - asked,
            std::time::Duration::from_secs(30)
        );
    }
}
