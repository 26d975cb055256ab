//! Operator commands on the receiver's store: `points`, `restore`, `verify`, `audit verify`.
//!
//! They run beside a live receiver: each holds the volume's lock shared while it reads (see
//! [`crate::dr::volume::PointReader`]), and `restore` and `verify` append to the audit log.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Seek as _, SeekFrom, Write as _},
    os::unix::fs::{FileExt as _, FileTypeExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::Instant,
};

use serde::Serialize;

use crate::dr::stored::StoredPoint;
use crate::{
    dr::audit::{AuditLog, Event},
    dr::points::PointsError,
    dr::volume::{PointReader, StoreError},
};
use blkmirror_protocol::units;

/// Errors of the operator commands (their exit codes: `command::exit`).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Bad arguments (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The store failed (exit 1).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The restore target failed (exit 1).
    #[error("{what} {path}: {source}")]
    Target {
        /// What was being done.
        what: &'static str,
        /// The target.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Stored data does not match its hashes (exit 7).
    #[error("{0}")]
    Corrupt(String),
    /// A tool or privilege the command needs is missing (exit 3).
    #[error("{0}")]
    Environment(String),
    /// A drill found that the point does not recover (exit 8).
    #[error("{0}")]
    DrillFailed(String),
    /// Tracking a device failed (exit code by cause, as for `track`).
    #[error(transparent)]
    Track(#[from] crate::tracker::track::TrackError),
    /// The peer of a failback failed or went away (exit 1).
    #[error("{0}")]
    Network(String),
    /// The agent's state file could not be read or written (exit 1).
    #[error("{0}")]
    State(String),
    /// The other side refused (exit 6): another term, another volume, a protocol breach.
    #[error("{0}")]
    Refused(String),
    /// The identity could not be loaded (exit 3).
    #[error(transparent)]
    Identity(#[from] crate::link::identity::IdentityError),
    /// The object store failed, or a point in it is damaged (exit 1).
    #[error(transparent)]
    ObjectStore(#[from] crate::dr::objpoints::PointStoreError),
}

/// Which point `--at` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PointSelector {
    /// The newest point.
    Latest,
    /// A cycle number (`seq:N`, or a bare number).
    Seq(u64),
    /// The newest point cut at or before this UTC time.
    AtOrBefore(u64),
    /// The point of a consistency-group cut (`group:N`).
    GroupCut(u64),
    /// Every retained point (`verify` only).
    All,
}

/// Parses `--at`: `latest`, `all`, `seq:N`, `N`, or a UTC time such as `2026-11-26T14:03:05Z`.
pub fn parse_selector(text: &str) -> Result<PointSelector, String> {
    match text.trim() {
        "latest" => Ok(PointSelector::Latest),
        "all" => Ok(PointSelector::All),
        other if other.starts_with("group:") => other["group:".len()..]
            .parse()
            .map(PointSelector::GroupCut)
            .map_err(|_| format!("{other:?}: expected group:N with N from `blkmirror points`")),
        other => {
            let number = other.strip_prefix("seq:").unwrap_or(other);
            if let Ok(seq) = number.parse::<u64>() {
                return Ok(PointSelector::Seq(seq));
            }
            units::parse_utc(other).map(PointSelector::AtOrBefore).map_err(|_| {
                format!(
                    "{other:?} names no point: use latest, all, a cycle number (seq:N) or a UTC \
                     time such as 2026-11-26T14:03:05Z"
                )
            })
        }
    }
}

/// The retained points `selector` names.
pub fn select(
    points: &[StoredPoint],
    selector: &PointSelector,
) -> Result<Vec<StoredPoint>, String> {
    let found = match selector {
        PointSelector::All => return Ok(points.to_vec()),
        PointSelector::Latest => points.last().cloned(),
        PointSelector::Seq(seq) => points.iter().find(|p| p.seq == *seq).cloned(),
        PointSelector::GroupCut(cut) => points.iter().find(|p| p.group_cut == Some(*cut)).cloned(),
        PointSelector::AtOrBefore(ms) => points
            .iter()
            .filter(|p| p.time_unix_ms <= *ms)
            .max_by_key(|p| p.seq)
            .cloned(),
    };
    found.map(|p| vec![p]).ok_or_else(|| match selector {
        PointSelector::AtOrBefore(ms) => format!(
            "no retained point was cut at or before {} (oldest: {})",
            units::format_utc(*ms),
            points
                .first()
                .map_or("none".into(), |p| units::format_utc(p.time_unix_ms))
        ),
        PointSelector::Seq(seq) => format!("no retained point with cycle number {seq}"),
        PointSelector::GroupCut(cut) => format!("no retained point of group cut {cut}"),
        _ => "the volume has no retained point yet (no complete cycle committed)".into(),
    })
}

/// One line of `points --json`.
#[derive(Debug, Serialize)]
pub struct PointLine {
    /// Cycle number (use with `--at seq:N`).
    pub seq: u64,
    /// When the point was cut (UTC).
    pub time: String,
    /// The same in Unix milliseconds.
    pub time_unix_ms: u64,
    /// Tracker epoch of the final cut.
    pub epoch: u64,
    /// Whether the file system was frozen at the cut.
    pub consistent: bool,
    /// Whether the application's `pre_freeze` hook succeeded before that freeze.
    pub app_consistent: bool,
    /// How long it was frozen.
    pub freeze_ms: u64,
    /// Data bytes the cycle shipped.
    pub bytes: u64,
    /// Bytes the store keeps to go back to this point from the next newer one (0 for the
    /// newest: it is the image).
    pub stored_bytes: u64,
    /// The consistency-group cut shared with the group's other volumes (`--at group:N`).
    pub group_cut: Option<u64>,
}

/// A point as the operator commands name it: `point N (TIME, consistent|fuzzy)`.
pub(crate) fn describe(point: &StoredPoint) -> String {
    format!(
        "point {} ({}, {})",
        point.seq,
        units::format_utc(point.time_unix_ms),
        if point.consistent {
            "consistent"
        } else {
            "fuzzy"
        }
    )
}

/// `blkmirror points`.
pub fn points(data_dir: &Path, volume: &str, json: bool) -> Result<(), OpsError> {
    let reader = PointReader::open(data_dir, volume)?;
    let lines: Vec<PointLine> = reader
        .points()
        .iter()
        .zip(reader.stored_bytes()?)
        .map(|(p, stored_bytes)| PointLine {
            seq: p.seq,
            time: units::format_utc(p.time_unix_ms),
            time_unix_ms: p.time_unix_ms,
            epoch: p.epoch,
            consistent: p.consistent,
            app_consistent: p.app_consistent,
            freeze_ms: p.freeze_ms,
            bytes: p.bytes,
            stored_bytes,
            group_cut: p.group_cut,
        })
        .collect();
    if json {
        for line in &lines {
            println!("{}", serde_json::to_string(line).expect("serializes"));
        }
        return Ok(());
    }
    let meta = reader.meta();
    println!(
        "volume {} ({}, from {}): {} point(s), deltas hold {}",
        meta.volume,
        units::format_size(meta.size_bytes),
        meta.source_id,
        lines.len(),
        units::format_size(reader.delta_bytes()?)
    );
    println!(
        "{:>8}  {:<20}  {:>8}  {:<10}  {:>8}  {:>10}  {:>10}  GROUP CUT",
        "SEQ", "TIME (UTC)", "EPOCH", "STATE", "FREEZE", "CHANGED", "STORED"
    );
    for line in &lines {
        println!(
            "{:>8}  {:<20}  {:>8}  {:<10}  {:>6}ms  {:>10}  {:>10}  {}",
            line.seq,
            line.time,
            line.epoch,
            if line.app_consistent {
                "app"
            } else if line.consistent {
                "consistent"
            } else {
                "fuzzy"
            },
            line.freeze_ms,
            units::format_size(line.bytes),
            units::format_size(line.stored_bytes),
            line.group_cut
                .map_or("-".to_owned(), |cut| format!("group:{cut}"))
        );
    }
    if let Some(refusal) = crate::dr::authority::read(
        &crate::dr::storage::LocalDisk::shared(),
        &crate::dr::volume::Volume::dir_of(data_dir, volume),
    )?
    .refusal(volume)
    {
        println!("FAILED OVER: {refusal}");
    }
    if meta.unsettled {
        println!(
            "(an initial or verify sync is in progress: no point can be restored until it completes)"
        );
    }
    Ok(())
}

/// Progress on stderr, at most once a second.
pub(crate) struct Progress {
    what: String,
    total: u64,
    started: Instant,
    last: Instant,
    json: bool,
}

impl Progress {
    pub(crate) fn new(what: String, total: u64, json: bool) -> Self {
        let now = Instant::now();
        Self {
            what,
            total,
            started: now,
            last: now,
            json,
        }
    }

    pub(crate) fn update(&mut self, done: u64) {
        if self.last.elapsed().as_secs_f64() < 1.0 {
            return;
        }
        self.last = Instant::now();
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / elapsed;
        let eta = if rate > 0.0 {
            (self.total.saturating_sub(done)) as f64 / rate
        } else {
            0.0
        };
        if self.json {
            eprintln!(
                "{}",
                serde_json::json!({"event": "progress", "what": self.what, "done_bytes": done,
                    "total_bytes": self.total, "rate_bytes_per_s": rate as u64, "eta_s": eta as u64})
            );
        } else {
            eprintln!(
                "blkmirror: {}: {} of {} ({:.0}%), {}/s, ETA {:.0}s",
                self.what,
                units::format_size(done),
                units::format_size(self.total),
                done as f64 * 100.0 / self.total.max(1) as f64,
                units::format_size(rate as u64),
                eta
            );
        }
    }
}

/// A restore's target for a point that arrives from elsewhere (the receiver's control
/// socket): the same rules as `restore` (a new file written aside and renamed when whole, or a
/// block device not in use and large enough).
pub struct RestoreTarget(Target);

impl RestoreTarget {
    /// Opens `path` for a point of `size` bytes.
    pub fn open(path: &Path, size: u64, chunk_bytes: usize, force: bool) -> Result<Self, OpsError> {
        Target::open(path, size, chunk_bytes, force).map(Self)
    }

    /// Writes a chunk (`None`: `len` zero bytes).
    pub fn write(&self, offset: u64, data: Option<&[u8]>, len: usize) -> Result<(), OpsError> {
        self.0
            .write(offset, data, len)
            .map_err(|source| OpsError::Target {
                what: "writing",
                path: self.0.path().to_owned(),
                source,
            })
    }

    /// Syncs it (and renames a file into place).
    pub fn finish(self) -> Result<(), OpsError> {
        let path = self.0.path().to_owned();
        self.0.finish().map_err(|source| OpsError::Target {
            what: "syncing",
            path,
            source,
        })
    }

    /// Drops a partial file.
    pub fn abandon(self) {
        self.0.abandon();
    }

    /// Whether it is a block device, written in place (so a point must be checked whole
    /// before the first write: nothing can be renamed into place).
    pub fn is_device(&self) -> bool {
        matches!(self.0, Target::Device { .. })
    }
}

/// Where a restore writes.
enum Target {
    /// A block device, written in place (zero chunks written from `zeros`, one chunk long).
    Device {
        file: File,
        path: PathBuf,
        zeros: Vec<u8>,
    },
    /// A new regular file, written under a temporary name and renamed when whole.
    File {
        file: File,
        tmp: PathBuf,
        path: PathBuf,
    },
}

impl Target {
    fn open(path: &Path, size: u64, chunk_bytes: usize, force: bool) -> Result<Self, OpsError> {
        let target_err = |what| {
            let path = path.to_owned();
            move |source| OpsError::Target { what, path, source }
        };
        match fs::metadata(path) {
            Ok(meta) if meta.file_type().is_block_device() => {
                // O_EXCL on a block device fails if it is mounted or otherwise held.
                let mut file = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_EXCL)
                    .open(path)
                    .map_err(|source| {
                        if source.raw_os_error() == Some(libc::EBUSY) {
                            OpsError::Usage(format!(
                                "{} is in use (mounted or held open); refusing to restore onto it",
                                path.display()
                            ))
                        } else {
                            target_err("opening")(source)
                        }
                    })?;
                let device_size = file.seek(SeekFrom::End(0)).map_err(target_err("sizing"))?;
                if device_size < size {
                    return Err(OpsError::Usage(format!(
                        "{} holds {device_size} bytes, the point needs {size}",
                        path.display()
                    )));
                }
                Ok(Self::Device {
                    file,
                    path: path.to_owned(),
                    zeros: vec![0; chunk_bytes],
                })
            }
            Ok(meta) if meta.is_file() && !force => Err(OpsError::Usage(format!(
                "{} exists; pass --force to replace it",
                path.display()
            ))),
            Ok(meta) if !meta.is_file() => Err(OpsError::Usage(format!(
                "{} is neither a block device nor a regular file",
                path.display()
            ))),
            _ => {
                let mut name = path.file_name().unwrap_or_default().to_owned();
                name.push(".blkmirror-partial");
                let tmp = path.with_file_name(name);
                // A leftover of an earlier restore, or something planted: removing the name
                // removes a symlink itself, never what it points at. The new file is then
                // created exclusively and without following links.
                match fs::symlink_metadata(&tmp) {
                    Ok(meta) if meta.is_dir() => {
                        return Err(OpsError::Usage(format!(
                            "{} is a directory; remove it first",
                            tmp.display()
                        )));
                    }
                    Ok(_) => fs::remove_file(&tmp).map_err(target_err("removing"))?,
                    Err(_) => {}
                }
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(target_err("creating"))?;
                file.set_len(size).map_err(target_err("sizing"))?;
                Ok(Self::File {
                    file,
                    tmp,
                    path: path.to_owned(),
                })
            }
        }
    }

    fn write(&self, offset: u64, data: Option<&[u8]>, chunk: usize) -> io::Result<()> {
        match (self, data) {
            (Self::Device { file, .. }, Some(data)) | (Self::File { file, .. }, Some(data)) => {
                file.write_all_at(data, offset)
            }
            (Self::Device { file, zeros, .. }, None) => file.write_all_at(&zeros[..chunk], offset),
            // A new file is sparse: its holes read as zeros.
            (Self::File { .. }, None) => Ok(()),
        }
    }

    fn finish(self) -> io::Result<()> {
        match self {
            Self::Device { mut file, .. } => {
                file.flush()?;
                file.sync_all()
            }
            Self::File { file, tmp, path } => {
                file.sync_all()?;
                drop(file);
                fs::rename(&tmp, &path)?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    File::open(dir)?.sync_all()?;
                }
                Ok(())
            }
        }
    }

    fn abandon(self) {
        if let Self::File { tmp, .. } = self {
            let _ = fs::remove_file(tmp);
        }
    }

    fn path(&self) -> &Path {
        match self {
            Self::Device { path, .. } | Self::File { path, .. } => path,
        }
    }
}

/// `blkmirror restore`.
pub fn restore(
    data_dir: &Path,
    volume: &str,
    selector: &PointSelector,
    to: &Path,
    force: bool,
    json: bool,
) -> Result<(), OpsError> {
    if *selector == PointSelector::All {
        return Err(OpsError::Usage(
            "restore needs one point, not --at all".into(),
        ));
    }
    let reader = PointReader::open(data_dir, volume)?;
    // A restore that takes long, holding the volume, for the retention tests.
    crate::test_hooks::hold_restore();
    let point = select(reader.points(), selector)
        .map_err(OpsError::Usage)?
        .remove(0);
    let size = reader.meta().size_bytes;
    let chunk = reader.meta().chunk_bytes as usize;
    let target = Target::open(to, size, chunk, force)?;
    let to_device = matches!(target, Target::Device { .. });
    if to_device {
        // A device cannot be written aside and renamed into place: check the whole point
        // first, so a corrupt point leaves the device untouched.
        eprintln!(
            "blkmirror: checking point {} of volume {volume} before writing to {}",
            point.seq,
            to.display()
        );
        let bad = reader.read_point(point.seq, false, |_, _| Ok(()))?;
        if let Some(first) = bad.first() {
            return Err(OpsError::Corrupt(format!(
                "point {} of volume {volume} is corrupt at byte offset {first}; {} was not \
                 written (run `blkmirror verify {volume} --at seq:{}` for the full list)",
                point.seq,
                to.display(),
                point.seq
            )));
        }
    }
    eprintln!(
        "blkmirror: restoring volume {volume} {} to {}",
        describe(&point),
        to.display()
    );
    let mut progress = Progress::new(format!("restore of {volume}"), size, json);
    let started = Instant::now();
    let result = reader.read_point(point.seq, false, |offset, data| {
        target
            .write(offset, data, chunk.min((size - offset) as usize))
            .map_err(|source| PointsError::Io {
                what: "writing the restore target",
                path: target.path().to_owned(),
                source,
            })?;
        progress.update(offset + chunk as u64);
        Ok(())
    });
    let audit = AuditLog::in_dir(data_dir);
    let outcome = match &result {
        Ok(bad) if bad.is_empty() => "ok".to_owned(),
        Ok(bad) => format!("corrupt chunk at byte offset {}", bad[0]),
        Err(error) => error.to_string(),
    };
    let record = audit.append(Event {
        event: "restore",
        volume: Some(volume.to_owned()),
        outcome: outcome.clone(),
        detail: serde_json::json!({
            "seq": point.seq,
            "point_time_unix_ms": point.time_unix_ms,
            "to": to.display().to_string(),
        }),
        ..Event::default()
    });
    if let Err(error) = record {
        eprintln!("blkmirror: warning: audit log: {error}");
    }
    match result {
        Ok(bad) if bad.is_empty() => {}
        Ok(bad) => {
            target.abandon();
            let what = if to_device {
                format!(
                    "{} was written up to byte offset {} and does not hold the point",
                    to.display(),
                    bad[0]
                )
            } else {
                "nothing was restored".to_owned()
            };
            return Err(OpsError::Corrupt(format!(
                "point {} of volume {volume} is corrupt at byte offset {}; {what} (run \
                 `blkmirror verify {volume} --at seq:{}` for the full list)",
                point.seq, bad[0], point.seq
            )));
        }
        Err(error) => {
            target.abandon();
            if to_device {
                eprintln!(
                    "blkmirror: {} was partly written and does not hold the point",
                    to.display()
                );
            }
            return Err(error.into());
        }
    }
    let path = target.path().to_owned();
    target.finish().map_err(|source| OpsError::Target {
        what: "syncing",
        path,
        source,
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let line = serde_json::json!({
        "event": "restored", "volume": volume, "seq": point.seq,
        "time": units::format_utc(point.time_unix_ms), "consistent": point.consistent,
        "to": to.display().to_string(), "bytes": size, "duration_ms": (elapsed * 1000.0) as u64,
    });
    if json {
        println!("{line}");
    } else {
        println!(
            "restored volume {volume} point {} ({}) to {}: {} in {elapsed:.1}s, every chunk \
             checked against its stored hash",
            point.seq,
            units::format_utc(point.time_unix_ms),
            to.display(),
            units::format_size(size)
        );
    }
    Ok(())
}

/// `blkmirror verify`.
pub fn verify(
    data_dir: &Path,
    volume: &str,
    selector: &PointSelector,
    json: bool,
) -> Result<(), OpsError> {
    let reader = PointReader::open(data_dir, volume)?;
    let chosen = select(reader.points(), selector).map_err(OpsError::Usage)?;
    let size = reader.meta().size_bytes;
    let chunk = reader.meta().chunk_bytes;
    let mut corrupt = Vec::new();
    for point in &chosen {
        let mut progress = Progress::new(
            format!("verify of {volume} point {}", point.seq),
            size,
            json,
        );
        let bad = reader.read_point(point.seq, true, |offset, _| {
            progress.update(offset + chunk);
            Ok(())
        })?;
        if json {
            println!(
                "{}",
                serde_json::json!({"event": "verified", "volume": volume, "seq": point.seq,
                    "ok": bad.is_empty(), "corrupt_offsets": bad})
            );
        } else if bad.is_empty() {
            println!(
                "volume {volume} point {} ({}): ok, {} checked",
                point.seq,
                units::format_utc(point.time_unix_ms),
                units::format_size(size)
            );
        } else {
            println!(
                "volume {volume} point {} ({}): {} CORRUPT chunk(s) at byte offsets {:?}",
                point.seq,
                units::format_utc(point.time_unix_ms),
                bad.len(),
                &bad[..bad.len().min(16)]
            );
        }
        if !bad.is_empty() {
            corrupt.push((point.seq, bad.len()));
        }
    }
    let outcome = if corrupt.is_empty() {
        "ok".to_owned()
    } else {
        format!("corrupt: {corrupt:?} (point, chunks)")
    };
    let record = AuditLog::in_dir(data_dir).append(Event {
        event: "verify",
        volume: Some(volume.to_owned()),
        outcome: outcome.clone(),
        detail: serde_json::json!({ "points": chosen.iter().map(|p| p.seq).collect::<Vec<_>>() }),
        ..Event::default()
    });
    if let Err(error) = record {
        eprintln!("blkmirror: warning: audit log: {error}");
    }
    if corrupt.is_empty() {
        Ok(())
    } else {
        Err(OpsError::Corrupt(format!("volume {volume}: {outcome}")))
    }
}

/// `blkmirror audit verify`.
pub fn audit_verify(log: &Path, json: bool) -> Result<(), OpsError> {
    match AuditLog::at(log).verify() {
        Ok(verified) => {
            if json {
                println!("{}", serde_json::to_string(&verified).expect("serializes"));
            } else {
                println!(
                    "{}: {} entries, chain intact, head {}",
                    log.display(),
                    verified.entries,
                    verified.head
                );
            }
            for note in &verified.notes {
                eprintln!("blkmirror: note: {note}");
            }
            Ok(())
        }
        Err(crate::dr::audit::AuditError::Io { what, path, source }) => {
            Err(OpsError::Target { what, path, source })
        }
        Err(error) => Err(OpsError::Corrupt(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(seq: u64, time_unix_ms: u64) -> StoredPoint {
        StoredPoint {
            seq,
            generation: 1,
            epoch: seq,
            time_unix_ms,
            bytes: 0,
            consistent: true,
            freeze_ms: 0,
            complete: true,
            synced_to: 0,
            group_cut: None,
            received_unix_ms: time_unix_ms,
            app_consistent: false,
        }
    }

    #[test]
    fn selectors() {
        assert_eq!(parse_selector("latest"), Ok(PointSelector::Latest));
        assert_eq!(parse_selector("seq:7"), Ok(PointSelector::Seq(7)));
        assert_eq!(parse_selector("7"), Ok(PointSelector::Seq(7)));
        assert_eq!(
            parse_selector("1970-01-01T00:00:02Z"),
            Ok(PointSelector::AtOrBefore(2000))
        );
        assert!(parse_selector("yesterday").is_err());
        let points = [point(3, 1000), point(5, 2000), point(8, 3000)];
        assert_eq!(select(&points, &PointSelector::Latest).unwrap()[0].seq, 8);
        assert_eq!(
            select(&points, &PointSelector::AtOrBefore(2500)).unwrap()[0].seq,
            5
        );
        assert_eq!(select(&points, &PointSelector::Seq(3)).unwrap()[0].seq, 3);
        assert!(select(&points, &PointSelector::Seq(4)).is_err());
        let error = select(&points, &PointSelector::AtOrBefore(500)).unwrap_err();
        assert!(error.contains("oldest"), "{error}");
        assert_eq!(select(&points, &PointSelector::All).unwrap().len(), 3);
        assert!(select(&[], &PointSelector::Latest).is_err());
    }

    /// Finding 9 of the hardening issue: `PATH.blkmirror-partial` was opened without
    /// `O_EXCL`/`O_NOFOLLOW`, so a planted symlink's target was truncated.
    #[test]
    fn restore_does_not_follow_a_planted_partial_file() {
        use crate::{dr::volume::Volume, testing::TempDir};
        use blkmirror_protocol::wire::CheckedData;
        let tmp = TempDir::new("planted");
        let data = tmp.0.join("data");
        let hello = crate::testing::volume_hello();
        let (mut volume, _, _) = Volume::open_or_create(&data, &hello).unwrap();
        volume.begin(1, 0, false, 0).unwrap();
        volume
            .journal(CheckedData::Write {
                offset: 0,
                data: vec![7; 4096],
            })
            .unwrap();
        volume
            .commit(blkmirror_protocol::wire::PointInfo {
                complete: true,
                ..blkmirror_protocol::wire::PointInfo::default()
            })
            .unwrap();
        drop(volume);
        let victim = tmp.0.join("victim");
        fs::write(&victim, b"precious").unwrap();
        let target = tmp.0.join("restored.img");
        std::os::unix::fs::symlink(&victim, tmp.0.join("restored.img.blkmirror-partial")).unwrap();
        restore(&data, "v", &PointSelector::Latest, &target, false, true).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let restored = fs::read(&target).unwrap();
        assert_eq!(restored.len(), 1 << 20);
        assert_eq!(restored[..4096], [7; 4096]);
    }
}
