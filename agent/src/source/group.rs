//! Consistency groups: devices whose file systems are frozen and cut together, so one point
//! in time covers all of them (an application spread over several disks).
//!
//! Each device keeps its own replication loop. At the final pass of a cycle, every member calls
//! [`ConsistencyGroup::round`]: the call waits until all members have arrived, then the last
//! one to arrive freezes every member's file system (in path order); each member cuts its
//! tracker and reads its remainder while all are frozen, and when all have reported, the last
//! one thaws them all. The round's verdict is shared: if any member's remainder did not fit
//! the freeze budget, or the guard had to thaw, no member takes the point as consistent and
//! each ships its cut as another pre-copy pass, and the group tries again.
//!
//! Every point of a successful round carries the same *group cut* number, which is how
//! `blkmirror restore --at group:N` finds the members' points of one instant. A member that
//! does not arrive in time (it is syncing, disconnected or much slower) makes the others give
//! up the round: they freeze alone and their points carry no group cut.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Condvar, Mutex},
    time::{Duration, Instant},
};

/// What freezes and thaws the members' file systems (the real one is [`FsFreezer`]).
pub trait Freezer: Send + Sync {
    /// A set of frozen file systems.
    type Held: Send;
    /// Freezes all `mounts`; on error, what was frozen is thawed again.
    fn freeze(&self, mounts: &[PathBuf], budget: Duration) -> Result<Self::Held, String>;
    /// Thaws; returns how long they were frozen and whether a guard thawed one first.
    fn thaw(&self, held: Self::Held) -> (Duration, bool);
}

/// Freezes with `FIFREEZE` and a thaw guard per file system.
pub struct FsFreezer;

impl Freezer for FsFreezer {
    type Held = Vec<crate::source::freeze::Frozen>;

    fn freeze(&self, mounts: &[PathBuf], budget: Duration) -> Result<Self::Held, String> {
        let mut held = Vec::new();
        for mount in mounts {
            match crate::source::freeze::Frozen::freeze(mount, budget) {
                Ok(frozen) => held.push(frozen),
                Err(error) => {
                    self.thaw(held);
                    return Err(error.to_string());
                }
            }
        }
        Ok(held)
    }

    fn thaw(&self, held: Self::Held) -> (Duration, bool) {
        let mut longest = Duration::ZERO;
        let mut by_guard = false;
        for frozen in held {
            let elapsed = frozen.elapsed();
            match frozen.thaw() {
                Ok(thawed) => {
                    longest = longest.max(thawed.held);
                    by_guard |= thawed.by_guard;
                }
                Err(_) => {
                    longest = longest.max(elapsed);
                    by_guard = true;
                }
            }
        }
        (longest, by_guard)
    }
}

/// Why a member could not take part in a round.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupError {
    /// Not every member arrived in time.
    #[error("consistency group {group}: {missing} did not reach the freeze within {waited:?}")]
    Timeout {
        /// The group.
        group: String,
        /// Who was missing.
        missing: String,
        /// How long this member waited.
        waited: Duration,
    },
    /// Freezing failed.
    #[error("consistency group {group}: freezing failed: {message}")]
    Freeze {
        /// The group.
        group: String,
        /// What failed.
        message: String,
    },
}

/// The shared result of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Every member's remainder fit and no guard thawed: the points are consistent.
    pub ok: bool,
    /// How long the group was frozen.
    pub held: Duration,
    /// A guard thawed a file system first (the budget was overrun).
    pub by_guard: bool,
    /// The group cut number shared by the members' points.
    pub cut: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Gathering,
    Frozen,
    Verdict,
}

struct Round<H> {
    generation: u64,
    phase: Phase,
    arrived: BTreeMap<String, Option<PathBuf>>,
    held: Option<H>,
    frozen_at: Option<Instant>,
    reported: BTreeMap<String, bool>,
    verdict: Option<Result<Verdict, String>>,
    collected: usize,
    /// The group cut number: the freeze time in Unix ms.
    cut: u64,
}

/// One consistency group, shared by its members' loops.
pub struct ConsistencyGroup<F: Freezer = FsFreezer> {
    name: String,
    members: Vec<String>,
    budget: Duration,
    freezer: F,
    round: Mutex<Round<F::Held>>,
    changed: Condvar,
}

impl<F: Freezer> ConsistencyGroup<F> {
    /// A group of the `members` (volume names) freezing for at most `budget`.
    pub fn new(name: &str, members: Vec<String>, budget: Duration, freezer: F) -> Self {
        Self {
            name: name.to_owned(),
            members,
            budget,
            freezer,
            round: Mutex::new(Round {
                generation: 0,
                phase: Phase::Gathering,
                arrived: BTreeMap::new(),
                held: None,
                frozen_at: None,
                reported: BTreeMap::new(),
                verdict: None,
                collected: 0,
                cut: 0,
            }),
            changed: Condvar::new(),
        }
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes part in one round as `volume` (whose file system is at `mount`, if any): waits
    /// up to `wait` for the others, then runs `work` while the whole group is frozen. `work`
    /// gets the budget left and returns its result and whether its remainder fit. Returns that
    /// result with the group's verdict.
    pub fn round<T>(
        &self,
        volume: &str,
        mount: Option<&Path>,
        wait: Duration,
        work: impl FnOnce(Duration) -> (T, bool),
    ) -> Result<(T, Verdict), GroupError> {
        let started = Instant::now();
        let mut round = self.round.lock().expect("group lock");
        // A previous round may still be handing out its verdict.
        while round.phase != Phase::Gathering {
            round = self.changed.wait(round).expect("group lock");
        }
        let generation = round.generation;
        round
            .arrived
            .insert(volume.to_owned(), mount.map(Path::to_owned));
        if round.arrived.len() == self.members.len() {
            let mut mounts: Vec<PathBuf> = round.arrived.values().flatten().cloned().collect();
            mounts.sort();
            mounts.dedup();
            match self.freezer.freeze(&mounts, self.budget) {
                Ok(held) => {
                    round.held = Some(held);
                    round.frozen_at = Some(Instant::now());
                    round.cut = crate::command::status::now_ms();
                    round.phase = Phase::Frozen;
                }
                Err(message) => {
                    round.verdict = Some(Err(message));
                    round.phase = Phase::Verdict;
                }
            }
            self.changed.notify_all();
        } else {
            loop {
                let left = wait.saturating_sub(started.elapsed());
                if round.generation != generation || round.phase != Phase::Gathering {
                    break;
                }
                if left.is_zero() {
                    round.arrived.remove(volume);
                    let missing: Vec<&str> = self
                        .members
                        .iter()
                        .filter(|m| !round.arrived.contains_key(*m) && *m != volume)
                        .map(String::as_str)
                        .collect();
                    return Err(GroupError::Timeout {
                        group: self.name.clone(),
                        missing: missing.join(", "),
                        waited: started.elapsed(),
                    });
                }
                round = self
                    .changed
                    .wait_timeout(round, left)
                    .expect("group lock")
                    .0;
            }
        }
        if round.phase == Phase::Frozen {
            let remaining = self
                .budget
                .saturating_sub(round.frozen_at.map_or(Duration::ZERO, |t| t.elapsed()));
            drop(round);
            let (result, fits) = work(remaining);
            round = self.round.lock().expect("group lock");
            round.reported.insert(volume.to_owned(), fits);
            if round.reported.len() == self.members.len() {
                let held = round.held.take().expect("frozen round holds its freeze");
                let (duration, by_guard) = self.freezer.thaw(held);
                let ok = round.reported.values().all(|fits| *fits) && !by_guard;
                round.verdict = Some(Ok(Verdict {
                    ok,
                    held: duration,
                    by_guard,
                    cut: round.cut,
                }));
                round.phase = Phase::Verdict;
                self.changed.notify_all();
            }
            while round.phase != Phase::Verdict {
                round = self.changed.wait(round).expect("group lock");
            }
            let verdict = round.verdict.clone().expect("verdict");
            self.collect(&mut round);
            return verdict.map(|verdict| (result, verdict)).map_err(|message| {
                GroupError::Freeze {
                    group: self.name.clone(),
                    message,
                }
            });
        }
        // Freezing failed: every member gets the error.
        let verdict = round.verdict.clone().expect("verdict");
        self.collect(&mut round);
        match verdict {
            Err(message) => Err(GroupError::Freeze {
                group: self.name.clone(),
                message,
            }),
            Ok(_) => unreachable!("a round without a freeze has no verdict"),
        }
    }

    /// The last member to pick up the verdict starts the next round.
    fn collect(&self, round: &mut Round<F::Held>) {
        round.collected += 1;
        if round.collected == self.members.len() {
            round.generation += 1;
            round.phase = Phase::Gathering;
            round.arrived.clear();
            round.reported.clear();
            round.verdict = None;
            round.frozen_at = None;
            round.collected = 0;
            self.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    /// Counts freezes and checks nobody works while the group is not frozen.
    #[derive(Default)]
    struct FakeFreezer {
        frozen: Arc<AtomicBool>,
        freezes: AtomicUsize,
        fail: AtomicBool,
    }

    impl Freezer for FakeFreezer {
        type Held = Vec<PathBuf>;
        fn freeze(&self, mounts: &[PathBuf], _: Duration) -> Result<Self::Held, String> {
            if self.fail.load(Ordering::SeqCst) {
                return Err("EBUSY".into());
            }
            assert!(!self.frozen.swap(true, Ordering::SeqCst), "frozen twice");
            self.freezes.fetch_add(1, Ordering::SeqCst);
            Ok(mounts.to_vec())
        }
        fn thaw(&self, held: Self::Held) -> (Duration, bool) {
            assert!(self.frozen.swap(false, Ordering::SeqCst), "thawed twice");
            (Duration::from_millis(held.len() as u64), false)
        }
    }

    fn group(members: &[&str]) -> Arc<ConsistencyGroup<FakeFreezer>> {
        Arc::new(ConsistencyGroup::new(
            "app",
            members.iter().map(|m| (*m).to_owned()).collect(),
            Duration::from_secs(2),
            FakeFreezer::default(),
        ))
    }

    #[test]
    fn all_members_work_inside_one_freeze_and_share_the_verdict() {
        let group = group(&["a", "b", "c"]);
        for round in 0..20 {
            let handles: Vec<_> = ["a", "b", "c"]
                .into_iter()
                .map(|volume| {
                    let group = group.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(
                            (volume.len() * round % 7) as u64,
                        ));
                        let mount = PathBuf::from(format!("/mnt/{volume}"));
                        group
                            .round(volume, Some(&mount), Duration::from_secs(10), |_| {
                                assert!(group.freezer.frozen.load(Ordering::SeqCst));
                                (volume.to_owned(), !(round == 3 && volume == "b"))
                            })
                            .unwrap()
                    })
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let cut = results[0].1.cut;
            for (name, verdict) in &results {
                assert_eq!(verdict.cut, cut, "{name}");
                // One member's remainder did not fit in round 3: nobody's point is consistent.
                assert_eq!(verdict.ok, round != 3, "{name} round {round}");
                assert_eq!(verdict.held, Duration::from_millis(3));
            }
        }
        assert_eq!(group.freezer.freezes.load(Ordering::SeqCst), 20);
        assert!(!group.freezer.frozen.load(Ordering::SeqCst));
    }

    #[test]
    fn a_missing_member_times_out_the_others_and_the_next_round_works() {
        let group = group(&["a", "b"]);
        let error = group
            .round("a", None, Duration::from_millis(50), |_| ((), true))
            .unwrap_err();
        assert!(matches!(error, GroupError::Timeout { ref missing, .. } if missing == "b"));
        assert_eq!(group.freezer.freezes.load(Ordering::SeqCst), 0);
        let other = group.clone();
        let b = std::thread::spawn(move || {
            other.round("b", None, Duration::from_secs(10), |_| (2, true))
        });
        let a = group.round("a", None, Duration::from_secs(10), |_| (1, true));
        assert!(a.unwrap().1.ok);
        assert!(b.join().unwrap().unwrap().1.ok);
    }

    #[test]
    fn a_failed_freeze_reaches_every_member_without_work() {
        let group = group(&["a", "b"]);
        group.freezer.fail.store(true, Ordering::SeqCst);
        let other = group.clone();
        let b = std::thread::spawn(move || {
            other.round("b", None, Duration::from_secs(10), |_| -> ((), bool) {
                panic!("no work without a freeze")
            })
        });
        let a = group.round("a", None, Duration::from_secs(10), |_| -> ((), bool) {
            panic!("no work without a freeze")
        });
        assert!(matches!(a, Err(GroupError::Freeze { .. })));
        assert!(matches!(b.join().unwrap(), Err(GroupError::Freeze { .. })));
        // The group recovers for the next round.
        group.freezer.fail.store(false, Ordering::SeqCst);
        let other = group.clone();
        let b = std::thread::spawn(move || {
            other.round("b", None, Duration::from_secs(10), |_| ((), true))
        });
        assert!(
            group
                .round("a", None, Duration::from_secs(10), |_| ((), true))
                .is_ok()
        );
        assert!(b.join().unwrap().is_ok());
    }
}
