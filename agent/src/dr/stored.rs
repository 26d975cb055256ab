//! The DR site's stored formats, kept apart from the wire messages.
//!
//! A wire message can change with the protocol version; a stored record must stay readable by
//! every later release. So what the receiver keeps on disk has its own types here, converted
//! at the boundary, and every file it writes says which format it is in:
//!
//! | file | format marker | current |
//! |---|---|---|
//! | `VOLUME/volume.json` | `"format"` field | [`META_FORMAT`] (2) |
//! | `VOLUME/journal` | a leading `Format` record (none: format 1) | [`JOURNAL_FORMAT`] (4) |
//! | `VOLUME/hashes` | the format of `volume.json` (32 bytes per chunk) | 2 |
//! | `VOLUME/points/undo-*` | magic `BMUNDO01` | 1 |
//! | `audit.log` | `"format"` in each entry (none: format 1) | [`crate::dr::audit::AUDIT_FORMAT`] (1) |
//!
//! On the source host, `agent-VOLUME.json` carries `"format"` (1) and the tracker's generation
//! records carry `"format"` (none: 1). A file in a format newer than the build is refused with
//! a message that says so, never reinterpreted.
//!
//! # Upgrades
//!
//! Format 1 of `volume.json` (releases before the stored types were split from the wire) is
//! read and rewritten as format 2 when the volume is opened: points recorded before the
//! receiver kept its own clock get their cut time as their receive time, so retention ages
//! every point by one field. A format-1 journal (no `Format` record) holds the same bytes
//! as format 2 after that record, so a cycle committed by the previous release is applied by
//! this one.

use serde::{Deserialize, Serialize};

use blkmirror_protocol::wire::PointInfo;

/// Version of `volume.json` this build writes. It also reads 1, and upgrades it.
pub const META_FORMAT: u32 = 2;
/// Version of the journal this build writes. It also reads 1 (no `Format` record), 2 and 3.
/// Format 3 commits with a record that holds [`StoredPoint`] (with `app_consistent`); formats
/// 1 and 2 hold [`StoredPointV2`]. Format 4 may name the cycle's agent in a `Holder` record
/// after `Begin` (a receiver restarted in the middle of the cycle keeps it for that agent);
/// a release that reads only 3 would take that record for a torn one and drop a committed
/// cycle, so it must refuse the journal instead.
pub const JOURNAL_FORMAT: u32 = 4;

/// A committed point as journals of formats 1 and 2 hold it: [`StoredPoint`] before
/// `app_consistent` (postcard is positional, so the old layout keeps its own type).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPointV2 {
    seq: u64,
    generation: u64,
    epoch: u64,
    time_unix_ms: u64,
    bytes: u64,
    consistent: bool,
    freeze_ms: u64,
    complete: bool,
    synced_to: u64,
    group_cut: Option<u64>,
    received_unix_ms: u64,
}

impl From<StoredPointV2> for StoredPoint {
    fn from(old: StoredPointV2) -> Self {
        Self {
            seq: old.seq,
            generation: old.generation,
            epoch: old.epoch,
            time_unix_ms: old.time_unix_ms,
            bytes: old.bytes,
            consistent: old.consistent,
            freeze_ms: old.freeze_ms,
            complete: old.complete,
            synced_to: old.synced_to,
            group_cut: old.group_cut,
            received_unix_ms: old.received_unix_ms,
            app_consistent: false,
        }
    }
}

/// A committed point as the receiver stores it (in `volume.json` and in a journal's commit
/// record). The field order is part of the journal format (postcard is positional): add
/// fields only at the end, with a new journal format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPoint {
    /// The cycle number.
    pub seq: u64,
    /// The tracker's generation of the last cut in this cycle.
    pub generation: u64,
    /// The tracker's epoch of the last cut in this cycle.
    pub epoch: u64,
    /// When the final cut was taken (Unix milliseconds, held by the receiver between the
    /// previous point's time and its own clock).
    pub time_unix_ms: u64,
    /// Data bytes shipped by the cycle (before compression).
    pub bytes: u64,
    /// Whether the file system was frozen at the final cut.
    pub consistent: bool,
    /// How long the file system was frozen, in milliseconds.
    pub freeze_ms: u64,
    /// Whether the replica is whole after this cycle (`false` for sync steps).
    pub complete: bool,
    /// For sync steps: the device offset the pass has covered.
    pub synced_to: u64,
    /// The consistency-group cut this point shares with other volumes, if any.
    #[serde(default)]
    pub group_cut: Option<u64>,
    /// When the receiver committed the point (Unix milliseconds, the receiver's clock).
    /// Retention ages points by it.
    #[serde(default)]
    pub received_unix_ms: u64,
    /// Whether the application's `pre_freeze` hook succeeded for the final cut (points from
    /// before hooks existed have none: false).
    #[serde(default)]
    pub app_consistent: bool,
}

impl StoredPoint {
    /// The record of a point the agent described, as received at `received_unix_ms`. What
    /// the agent put in `received_unix_ms` is not trusted.
    pub fn received(point: &PointInfo, received_unix_ms: u64) -> Self {
        Self {
            seq: point.seq,
            generation: point.generation,
            epoch: point.epoch,
            time_unix_ms: point.time_unix_ms,
            bytes: point.bytes,
            consistent: point.consistent,
            freeze_ms: point.freeze_ms,
            complete: point.complete,
            synced_to: point.synced_to,
            group_cut: point.group_cut,
            received_unix_ms,
            // Claimed by the agent; it can only say so of a frozen point.
            app_consistent: point.app_consistent && point.consistent,
        }
    }

    /// The point as the protocol describes it to an agent.
    pub fn to_wire(&self) -> PointInfo {
        PointInfo {
            seq: self.seq,
            generation: self.generation,
            epoch: self.epoch,
            time_unix_ms: self.time_unix_ms,
            bytes: self.bytes,
            consistent: self.consistent,
            freeze_ms: self.freeze_ms,
            complete: self.complete,
            synced_to: self.synced_to,
            group_cut: self.group_cut,
            received_unix_ms: self.received_unix_ms,
            app_consistent: self.app_consistent,
        }
    }

    /// Upgrades a point read from format 1: one recorded before the receiver kept its own
    /// clock is aged from its cut time.
    pub fn upgrade_from_v1(&mut self) {
        if self.received_unix_ms == 0 {
            self.received_unix_ms = self.time_unix_ms;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_survives_the_trip_to_the_wire_and_back_but_the_agent_cannot_set_its_receive_time() {
        let wire = PointInfo {
            seq: 7,
            generation: 3,
            epoch: 9,
            time_unix_ms: 1_000,
            bytes: 4096,
            consistent: true,
            freeze_ms: 12,
            complete: true,
            synced_to: 0,
            group_cut: Some(55),
            received_unix_ms: 123_456_789,
            app_consistent: true,
        };
        let stored = StoredPoint::received(&wire, 2_000);
        assert!(stored.app_consistent);
        // An agent cannot call an unfrozen point application-consistent.
        let unfrozen = StoredPoint::received(
            &PointInfo {
                consistent: false,
                ..wire.clone()
            },
            2_000,
        );
        assert!(!unfrozen.app_consistent);
        assert_eq!(stored.received_unix_ms, 2_000);
        assert_eq!(
            stored.to_wire(),
            PointInfo {
                received_unix_ms: 2_000,
                ..wire
            }
        );
    }

    #[test]
    fn the_journal_encoding_of_a_format_2_point_is_that_of_format_1() {
        // Format 1 journals hold the protocol-3 `PointInfo` in their commit records (the
        // fields of `StoredPointV2`, in its order); the bytes of that layout, written out.
        let wire = StoredPointV2 {
            seq: 2,
            time_unix_ms: 77,
            complete: true,
            group_cut: Some(1),
            received_unix_ms: 99,
            ..StoredPointV2::default()
        };
        let bytes = postcard::to_stdvec(&wire).unwrap();
        assert_eq!(bytes, [2, 0, 0, 77, 0, 0, 0, 1, 0, 1, 1, 99]);
        let stored: StoredPoint = postcard::from_bytes::<StoredPointV2>(&bytes)
            .unwrap()
            .into();
        assert_eq!(
            stored.to_wire(),
            PointInfo {
                seq: 2,
                time_unix_ms: 77,
                complete: true,
                group_cut: Some(1),
                received_unix_ms: 99,
                ..PointInfo::default()
            }
        );
        assert!(!stored.app_consistent);
    }

    /// The previous release's data directory (`tests/fixtures/make-release-fixture.sh`):
    /// three points of a 4 MiB volume, its audit log and the agent's state.
    const RELEASE_1: &str = "../tests/fixtures/release-1.tar.gz";

    /// Checks that every point of `volume` restores to the content the fixture recorded.
    fn check_points(data_dir: &std::path::Path, expected: &[(u64, String)]) {
        let reader = crate::dr::volume::PointReader::open(data_dir, "fixture").unwrap();
        let seqs: Vec<u64> = reader.points().iter().map(|p| p.seq).collect();
        for (seq, sha256) in expected {
            assert!(seqs.contains(seq), "point {seq} missing from {seqs:?}");
            let mut content = Vec::new();
            let chunk = reader.meta().chunk_bytes as usize;
            let bad = reader
                .read_point(*seq, false, |_, data| {
                    match data {
                        Some(data) => content.extend_from_slice(data),
                        None => content.resize(content.len() + chunk, 0),
                    }
                    Ok(())
                })
                .unwrap();
            assert!(bad.is_empty(), "point {seq}: corrupt chunks at {bad:?}");
            content.truncate(reader.meta().size_bytes as usize);
            let digest = ring::digest::digest(&ring::digest::SHA256, &content);
            assert_eq!(&hex::encode(digest.as_ref()), sha256, "point {seq}");
        }
    }

    fn stored_format(data_dir: &std::path::Path) -> serde_json::Value {
        let text = std::fs::read_to_string(data_dir.join("fixture/volume.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn a_data_directory_of_the_previous_release_is_upgraded_and_every_point_restores() {
        let scratch = crate::testing::TempDir::new("upgrade");
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(RELEASE_1);
        let untar = std::process::Command::new("tar")
            .arg("-C")
            .arg(&scratch.0)
            .arg("-xzf")
            .arg(&fixture)
            .status()
            .expect("tar");
        assert!(untar.success(), "unpacking {}", fixture.display());
        let data_dir = scratch.0.join("receiver");
        let expected: Vec<(u64, String)> = std::fs::read_to_string(scratch.0.join("expected.txt"))
            .unwrap()
            .lines()
            .map(|line| {
                let (seq, hash) = line.split_once(' ').unwrap();
                (seq.parse().unwrap(), hash.to_owned())
            })
            .collect();
        assert_eq!(expected.len(), 3);

        // As the previous release left it: format 1, readable as it is (read-only).
        assert_eq!(stored_format(&data_dir)["format"], 1);
        check_points(&data_dir, &expected);

        // Opening it for writing upgrades `volume.json`; every point still restores.
        let (volume, _) = crate::dr::volume::Volume::open(&data_dir, "fixture").unwrap();
        assert!(volume.meta().upgraded_from.is_none());
        drop(volume);
        let upgraded = stored_format(&data_dir);
        assert_eq!(upgraded["format"], META_FORMAT);
        for point in upgraded["points"].as_array().unwrap() {
            assert!(point["received_unix_ms"].as_u64().unwrap() > 0, "{point}");
        }
        check_points(&data_dir, &expected);

        // The old audit log (entries without a format) verifies, and the chain goes on.
        let audit = crate::dr::audit::AuditLog::in_dir(&data_dir);
        let before = audit.verify().unwrap().entries;
        assert!(before >= 4, "{before} entries");

        // A new cycle in the new journal format on top of the upgraded volume.
        let (mut volume, _) = crate::dr::volume::Volume::open(&data_dir, "fixture").unwrap();
        // The fixture's points age with the calendar: keep them all, whenever this runs.
        volume.set_retention(blkmirror_protocol::retention::RetentionPolicy {
            all: std::time::Duration::from_secs(u64::from(u32::MAX)),
            ..Default::default()
        });
        let seq = volume.meta().committed_seq + 1;
        volume.begin(seq, 65536, false, 0).unwrap();
        volume
            .journal(blkmirror_protocol::wire::CheckedData::Write {
                offset: 0,
                data: vec![0x5a; 65536],
            })
            .unwrap();
        volume
            .commit(PointInfo {
                seq,
                complete: true,
                time_unix_ms: 1,
                ..PointInfo::default()
            })
            .unwrap();
        drop(volume);
        check_points(&data_dir, &expected);
        let reader = crate::dr::volume::PointReader::open(&data_dir, "fixture").unwrap();
        assert_eq!(reader.points().last().unwrap().seq, seq);

        // The agent's state file of the previous release is read by this one.
        let state = std::fs::read_dir(scratch.0.join("agent-state"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .find(|path| {
                path.file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with("agent-"))
            })
            .expect("an agent state file");
        let state = crate::source::agent::load_state(&state).unwrap().unwrap();
        assert_eq!(state.committed_seq, 4);
    }
}
