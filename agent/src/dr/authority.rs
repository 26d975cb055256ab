//! Who may write a volume: its *term*, a monotonic authority number like a Raft term, and which
//! side is primary (`VOLUME/authority.json`).
//!
//! A volume starts at term 1 with its source primary: the receiver takes the source's cycles.
//! `blkmirror failover` promotes a point at the DR site: the term goes up, the DR site is
//! primary, and from then on the receiver refuses every cycle of the old source for that
//! volume, with a message that names the failover and what to run next. The old source is most
//! likely to come back exactly when nobody is watching; it must never overwrite the replica
//! the DR site now depends on. There are two explicit ways back, each raising the term again
//! and making the source primary: `blkmirror failback` first moves what differs from the
//! promoted device to the source (`dr::failback`), `blkmirror reprotect` does not (what the DR
//! site wrote since the failover stays there).
//!
//! The file is changed only under the volume's exclusive lock, which the receiver also holds
//! while it applies a cycle, and the receiver reads it under that lock before applying: a
//! cycle is either applied before the failover decided, or discarded. Transitions are pure
//! functions of the current authority ([`Authority::failover`], [`Authority::reprotect`],
//! [`Authority::failback`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dr::storage::Disk;
use crate::dr::volume::StoreError;
use blkmirror_protocol::units;

/// The file, in the volume's directory.
pub const AUTHORITY_FILE: &str = "authority.json";
/// Its format.
pub const AUTHORITY_FORMAT: u32 = 1;

/// Which side may write the volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Primary {
    /// The protected host: the receiver takes its cycles.
    #[default]
    Source,
    /// The DR site, after a failover: the source's cycles are refused.
    DrSite,
}

/// One change of term.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermChange {
    /// The term it began.
    pub term: u64,
    /// `failover`, `reprotect` or `failback`.
    pub action: String,
    /// The point promoted (failover).
    pub seq: Option<u64>,
    /// When (Unix ms).
    pub time_unix_ms: u64,
    /// Where the point was written (failover).
    pub to: Option<String>,
    /// Who did it.
    pub user: String,
}

/// A volume's authority.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authority {
    /// [`AUTHORITY_FORMAT`].
    pub format: u32,
    /// The term: 1 at first, one more at each change.
    pub term: u64,
    /// Who may write.
    pub primary: Primary,
    /// Every change, oldest first.
    pub history: Vec<TermChange>,
}

impl Default for Authority {
    fn default() -> Self {
        Self {
            format: AUTHORITY_FORMAT,
            term: 1,
            primary: Primary::Source,
            history: Vec::new(),
        }
    }
}

impl Authority {
    /// The last failover, while the DR site is primary.
    pub fn failover_in_force(&self) -> Option<&TermChange> {
        (self.primary == Primary::DrSite)
            .then(|| self.history.iter().rev().find(|c| c.action == "failover"))
            .flatten()
    }

    /// Why the source may not write, if it may not: the message an agent and an operator see.
    pub fn refusal(&self, volume: &str) -> Option<String> {
        let failover = self.failover_in_force()?;
        Some(format!(
            "volume {volume} was failed over at {} by {} (term {}, point {} written to {}): \
             the DR site is primary and this source's writes since then are not replicated. \
             Stop this agent. To bring this source back as primary with what the DR site \
             wrote, moving only what differs, run `blkmirror failback serve {volume}` at the DR \
             site and `blkmirror failback pull` here; to protect it again discarding what the \
             DR site wrote, run `blkmirror reprotect {volume}` at the DR site",
            units::format_utc(failover.time_unix_ms),
            failover.user,
            failover.term,
            failover.seq.map_or("?".into(), |s| s.to_string()),
            failover.to.as_deref().unwrap_or("?"),
        ))
    }

    /// Whether a failover may happen now: a second one while one is in force needs `again`.
    pub fn may_fail_over(&self, again: bool) -> Result<(), String> {
        match self.failover_in_force() {
            Some(current) if !again => Err(format!(
                "already failed over at {} (term {}, point {}); pass --again to promote \
                 another point under a new term",
                units::format_utc(current.time_unix_ms),
                current.term,
                current.seq.map_or("?".into(), |s| s.to_string())
            )),
            _ => Ok(()),
        }
    }

    /// Promotes point `seq`: the next term, the DR site primary (see [`Self::may_fail_over`]).
    pub fn failover(
        &self,
        seq: u64,
        to: &str,
        user: &str,
        now_unix_ms: u64,
        again: bool,
    ) -> Result<Self, String> {
        self.may_fail_over(again)?;
        let mut next = self.clone();
        next.term += 1;
        next.primary = Primary::DrSite;
        next.history.push(TermChange {
            term: next.term,
            action: "failover".into(),
            seq: Some(seq),
            time_unix_ms: now_unix_ms,
            to: Some(to.to_owned()),
            user: user.to_owned(),
        });
        Ok(next)
    }

    /// Makes the source primary again, under the next term.
    pub fn reprotect(&self, user: &str, now_unix_ms: u64) -> Result<Self, String> {
        if self.primary == Primary::Source {
            return Err(format!(
                "the source is primary already (term {}): nothing to reprotect",
                self.term
            ));
        }
        let mut next = self.clone();
        next.term += 1;
        next.primary = Primary::Source;
        next.history.push(TermChange {
            term: next.term,
            action: "reprotect".into(),
            seq: None,
            time_unix_ms: now_unix_ms,
            to: None,
            user: user.to_owned(),
        });
        Ok(next)
    }
}

impl Authority {
    /// The term the last failback began (0: none).
    pub fn last_failback_term(&self) -> u64 {
        self.history
            .iter()
            .rev()
            .find(|change| change.action == "failback")
            .map_or(0, |change| change.term)
    }

    /// Ends a failback: the source, now equal to the promoted device, is primary again under
    /// the next term. Refused when the term is no longer `planned_term` (another failover
    /// happened while the data moved), so a failback never swaps roles on a stale plan.
    pub fn failback(
        &self,
        planned_term: u64,
        user: &str,
        now_unix_ms: u64,
    ) -> Result<Self, String> {
        if self.term != planned_term || self.primary != Primary::DrSite {
            return Err(format!(
                "the volume's authority changed during the failback (planned at term \
                 {planned_term}, now term {} with the {} primary): roles were not swapped; run \
                 the failback again",
                self.term,
                match self.primary {
                    Primary::Source => "source",
                    Primary::DrSite => "DR site",
                }
            ));
        }
        let mut next = self.reprotect(user, now_unix_ms)?;
        if let Some(change) = next.history.last_mut() {
            change.action = "failback".into();
        }
        Ok(next)
    }
}

/// Reads the authority of the volume in `dir` (term 1, source primary, when there is no file).
pub fn read(disk: &Disk, dir: &Path) -> Result<Authority, StoreError> {
    let path = dir.join(AUTHORITY_FILE);
    if !disk.exists(&path) {
        return Ok(Authority::default());
    }
    let bytes = disk.read(&path).map_err(StoreError::io("reading", &path))?;
    let authority: Authority =
        serde_json::from_slice(&bytes).map_err(|error| StoreError::Meta {
            path: path.clone(),
            message: error.to_string(),
        })?;
    if authority.format > AUTHORITY_FORMAT {
        return Err(StoreError::Meta {
            path,
            message: format!(
                "format {} is newer than this build reads ({AUTHORITY_FORMAT}); run the newer \
                 release",
                authority.format
            ),
        });
    }
    Ok(authority)
}

/// Writes it (atomically and durably). The caller holds the volume's exclusive lock.
pub fn write(disk: &Disk, dir: &Path, authority: &Authority) -> Result<(), StoreError> {
    let path = dir.join(AUTHORITY_FILE);
    let text = serde_json::to_string_pretty(authority).expect("serializes");
    disk.write_atomic(&path, text.as_bytes())
        .map_err(StoreError::io("writing", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_only_go_up_and_the_source_is_refused_while_the_dr_site_is_primary() {
        let start = Authority::default();
        assert_eq!(start.term, 1);
        assert!(start.refusal("v").is_none());
        let promoted = start
            .failover(41, "/dev/sdb", "uid 0", 1_000, false)
            .unwrap();
        assert_eq!(promoted.term, 2);
        let refusal = promoted.refusal("v").unwrap();
        for expected in [
            "failed over",
            "term 2",
            "point 41",
            "/dev/sdb",
            "reprotect v",
        ] {
            assert!(refusal.contains(expected), "{expected:?} in {refusal}");
        }
        // A failover of a failover needs --again, and raises the term again.
        assert!(
            promoted
                .failover(42, "/x", "u", 2_000, false)
                .unwrap_err()
                .contains("--again")
        );
        let again = promoted.failover(40, "/x", "u", 2_000, true).unwrap();
        assert_eq!(again.term, 3);
        assert!(again.refusal("v").unwrap().contains("point 40"));
        // A failback planned at an older term swaps nothing; at the current one it makes the
        // source primary under the next term.
        assert!(again.failback(again.term - 1, "u", 3_000).is_err());
        let failed_back = again.failback(again.term, "u", 3_000).unwrap();
        assert_eq!(failed_back.term, again.term + 1);
        assert_eq!(failed_back.primary, Primary::Source);
        assert_eq!(failed_back.history.last().unwrap().action, "failback");
        assert!(failed_back.failback(failed_back.term, "u", 4_000).is_err());
        // Back to the source, under a new term; reprotecting twice is refused.
        let back = again.reprotect("u", 3_000).unwrap();
        assert_eq!((back.term, back.primary), (4, Primary::Source));
        assert!(back.refusal("v").is_none());
        assert!(back.reprotect("u", 4_000).is_err());
        assert_eq!(back.history.len(), 3);
    }

    #[test]
    fn the_file_round_trips_and_a_newer_format_is_refused() {
        let tmp = crate::testing::TempDir::new("authority");
        let disk = crate::dr::storage::LocalDisk::shared();
        assert_eq!(read(&disk, &tmp.0).unwrap(), Authority::default());
        let promoted = Authority::default()
            .failover(3, "/f", "u", 5, false)
            .unwrap();
        write(&disk, &tmp.0, &promoted).unwrap();
        assert_eq!(read(&disk, &tmp.0).unwrap(), promoted);
        std::fs::write(
            tmp.0.join(AUTHORITY_FILE),
            r#"{"format":9,"term":1,"primary":"source","history":[]}"#,
        )
        .unwrap();
        assert!(
            read(&disk, &tmp.0)
                .unwrap_err()
                .to_string()
                .contains("newer")
        );
    }

    #[test]
    fn a_cycle_committing_when_the_failover_lands_is_discarded_and_the_next_one_refused() {
        use crate::dr::volume::Volume;
        use blkmirror_protocol::wire::{CheckedData, PointInfo};
        let tmp = crate::testing::TempDir::new("authority-race");
        let hello = crate::testing::volume_hello();
        let (mut volume, _, _) = Volume::open_or_create(&tmp.0, &hello).unwrap();
        let data = |byte: u8| CheckedData::Write {
            offset: 0,
            data: vec![byte; 4096],
        };
        volume.begin(1, 0, false, 0).unwrap();
        volume.journal(data(1)).unwrap();
        volume
            .commit(PointInfo {
                complete: true,
                ..PointInfo::default()
            })
            .unwrap();
        // Cycle 2 is journaled; the failover lands before its commit is applied.
        volume.begin(2, 0, false, 0).unwrap();
        volume.journal(data(2)).unwrap();
        let disk = crate::dr::storage::LocalDisk::shared();
        let dir = Volume::dir_of(&tmp.0, "v");
        let promoted = read(&disk, &dir)
            .unwrap()
            .failover(1, "/f", "u", 5, false)
            .unwrap();
        write(&disk, &dir, &promoted).unwrap();
        let refused = volume.commit(PointInfo {
            complete: true,
            ..PointInfo::default()
        });
        assert!(
            matches!(&refused, Err(StoreError::Refused(m)) if m.contains("failed over")),
            "{refused:?}"
        );
        assert_eq!(volume.meta().committed_seq, 1);
        assert_eq!(
            std::fs::read(volume.image_path()).unwrap()[..4096],
            [1; 4096]
        );
        assert_eq!(std::fs::metadata(dir.join("journal")).unwrap().len(), 0);
        // The next cycle and a resume are refused outright.
        assert!(matches!(
            volume.begin(2, 0, false, 0),
            Err(StoreError::Refused(_))
        ));
        assert!(matches!(volume.resume(2), Err(StoreError::Refused(_))));
        // After a reprotect the source's cycles are taken again.
        let back = read(&disk, &dir).unwrap().reprotect("u", 6).unwrap();
        write(&disk, &dir, &back).unwrap();
        volume.begin(2, 0, false, 0).unwrap();
        volume.journal(data(3)).unwrap();
        volume
            .commit(PointInfo {
                complete: true,
                ..PointInfo::default()
            })
            .unwrap();
        assert_eq!(volume.meta().committed_seq, 2);
    }
}
