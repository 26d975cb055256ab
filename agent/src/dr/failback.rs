//! Failback, the DR site's side: `blkmirror failback serve VOLUME --device DEV`.
//!
//! After `failover --to DEV` the application ran at the DR site on `DEV`, and the failover
//! started tracking `DEV` and recorded, in `VOLUME/promoted.json`, which point it promoted, the
//! tracker generation, and the chunks the source committed after that point (from the undo
//! deltas). Here the DR site waits for the returned source (`failback pull`, in
//! `source::failback`), plans the chunks that can differ (`protocol::failback`), compares them
//! by hash, sends only those that differ, and, once the source has written and synced them,
//! swaps the roles: the source is primary under the next term, and forward replication resumes
//! incrementally from the receiver's newest point.
//!
//! The device must not be in use (it is opened with `O_EXCL`, which a mounted file system
//! holds): the application at the DR site is stopped first. That stop is the "freeze" of a
//! planned switchback; what it wrote up to then is the final delta.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::dr::authority::{self, Primary};
use crate::dr::export;
use crate::dr::ops::OpsError;
use crate::dr::storage::{Disk, LocalDisk};
use crate::dr::volume::{self, PointReader, Volume};
use crate::link::identity::{Fingerprint, Identity};
use crate::link::net;
use crate::tracker::track::{Origin, TrackOptions, Tracker};
use blkmirror_protocol::failback::{
    self as plan, ChunkRange, FailbackPlan, FailbackReply, FailbackRequest, PlanInput, PlanWalk,
};
use blkmirror_protocol::units;
use blkmirror_protocol::wire;

/// The file, in the volume's directory, that a failover to a tracked device writes.
pub const PROMOTED_FILE: &str = "promoted.json";
/// Its format (2: `export`).
pub const PROMOTED_FORMAT: u32 = 2;
/// The directory, in the volume's, of a failover to an export: its kept overlay (the writes
/// made at the DR site since the failover) and the lock its one user holds.
pub const PROMOTED_EXPORT_DIR: &str = "promoted-export";

/// What a failover promoted, for the failback that reverses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Promoted {
    /// [`PROMOTED_FORMAT`].
    pub format: u32,
    /// The term the failover began.
    pub term: u64,
    /// The point promoted.
    pub seq: u64,
    /// The receiver's newest committed cycle at the failover.
    pub head_seq: u64,
    /// The device written.
    pub device: PathBuf,
    /// Its stable identity (see `tracker::device::stable_identity`).
    pub device_id: String,
    /// The tracking generation started on it right after the restore.
    pub generation: u64,
    /// The chunk size the tracker counts in (the volume's).
    pub chunk_bytes: u64,
    /// The chunks that differ between the promoted point and the newest one: the source
    /// committed them after the point, so it holds them and the promoted device does not.
    pub after_point: Vec<ChunkRange>,
    /// What earlier cuts of the promoted device's tracker held: recorded here before their
    /// slots are released, so a failback that fails later still knows them.
    #[serde(default)]
    pub consumed: Vec<ChunkRange>,
    /// The failover was to an export: the promoted copy is the point with the kept overlay in
    /// [`PROMOTED_EXPORT_DIR`], whose map names the chunks written since (no tracker).
    #[serde(default)]
    pub export: bool,
}

/// Reads `promoted.json`, if a failover wrote one.
pub fn read_promoted(disk: &Disk, dir: &Path) -> Result<Option<Promoted>, OpsError> {
    let path = dir.join(PROMOTED_FILE);
    if !disk.exists(&path) {
        return Ok(None);
    }
    let bytes = disk
        .read(&path)
        .map_err(volume::StoreError::io("reading", &path))?;
    let promoted: Promoted = serde_json::from_slice(&bytes).map_err(|error| {
        OpsError::Store(volume::StoreError::Meta {
            path: path.clone(),
            message: error.to_string(),
        })
    })?;
    if promoted.format > PROMOTED_FORMAT {
        return Err(OpsError::Usage(format!(
            "{}: format {} is newer than this build reads ({PROMOTED_FORMAT})",
            path.display(),
            promoted.format
        )));
    }
    Ok(Some(promoted))
}

/// Starts tracking the promoted device and records what a failback will need. Called by
/// `failover` after the restore and before the term changes; returns what it recorded.
pub fn track_promoted(
    data_dir: &Path,
    volume_name: &str,
    device: &Path,
    seq: u64,
    next_term: u64,
    track: &TrackOptions,
) -> Result<Promoted, OpsError> {
    let reader = PointReader::open(data_dir, volume_name)?;
    let after_point = reader.changed_since(seq)?;
    let head_seq = reader.meta().committed_seq;
    let chunk_bytes = reader.meta().chunk_bytes;
    drop(reader);
    let options = TrackOptions {
        chunk_bytes,
        ..track.clone()
    };
    crate::tracker::track::prepare_environment()?;
    let (tracker, _new_generation) = Tracker::open(device, &options)?;
    let promoted = Promoted {
        format: PROMOTED_FORMAT,
        term: next_term,
        seq,
        head_seq,
        device: device.to_owned(),
        device_id: crate::tracker::device::stable_identity(tracker.device()),
        generation: tracker.generation(),
        chunk_bytes,
        after_point,
        consumed: Vec::new(),
        export: false,
    };
    write_promoted(&Volume::dir_of(data_dir, volume_name), &promoted)?;
    Ok(promoted)
}

/// Prepares a failover to an export: the kept overlay (empty) and `promoted.json`. Called by
/// `failover --to export` before the term changes. An earlier failover's overlay holds writes
/// nobody failed back: it is replaced only with `force`.
pub fn promote_to_export(
    data_dir: &Path,
    volume_name: &str,
    seq: u64,
    next_term: u64,
    force: bool,
) -> Result<Promoted, OpsError> {
    let reader = PointReader::open(data_dir, volume_name)?;
    let after_point = reader.changed_since(seq)?;
    let (head_seq, chunk_bytes, size) = (
        reader.meta().committed_seq,
        reader.meta().chunk_bytes,
        reader.meta().size_bytes,
    );
    drop(reader);
    let dir = Volume::dir_of(data_dir, volume_name);
    let overlay_dir = dir.join(PROMOTED_EXPORT_DIR);
    if overlay_dir.exists() {
        if !force {
            return Err(OpsError::Usage(format!(
                "{} holds the writes made on an earlier failover's export, never failed back; \
                 serve it with `blkmirror export {volume_name} --promoted` and copy what you \
                 need, or pass --force to discard them",
                overlay_dir.display()
            )));
        }
        let _lock = export::lock_kept(&overlay_dir).map_err(kept_overlay_error(
            volume_name,
            "locking",
            &overlay_dir,
        ))?;
        std::fs::remove_dir_all(&overlay_dir).map_err(|source| OpsError::Target {
            what: "removing",
            path: overlay_dir.clone(),
            source,
        })?;
    }
    export::Overlay::open_kept(&overlay_dir, size, chunk_bytes)
        .and_then(|overlay| overlay.flush())
        .map_err(|source| OpsError::Target {
            what: "making the overlay in",
            path: overlay_dir.clone(),
            source,
        })?;
    let promoted = Promoted {
        format: PROMOTED_FORMAT,
        term: next_term,
        seq,
        head_seq,
        device: overlay_dir,
        device_id: "export".into(),
        generation: 0,
        chunk_bytes,
        after_point,
        consumed: Vec::new(),
        export: true,
    };
    write_promoted(&dir, &promoted)?;
    Ok(promoted)
}

/// A failover's export, opened by its one user (`export --promoted`, `failover --to export`
/// or `failback serve --export`).
pub struct PromotedExport {
    /// The point with the kept overlay in front.
    pub disk: export::ExportDisk,
    /// What the failover recorded.
    pub promoted: Promoted,
    /// Writes are taken: the failover is the one in force. After a `reprotect` or a later
    /// failover, the overlay is served read-only (the DR site must not write beside the
    /// primary).
    pub writable: bool,
}

/// How a failure to lock or open a kept overlay is told: another holder is a usage error that
/// says who may hold it; anything else names the directory.
fn kept_overlay_error<'a>(
    volume: &'a str,
    what: &'static str,
    dir: &'a Path,
) -> impl FnOnce(io::Error) -> OpsError + 'a {
    move |source| {
        if source.kind() == io::ErrorKind::WouldBlock {
            OpsError::Usage(format!(
                "the promoted export of volume {volume} is {source}"
            ))
        } else {
            OpsError::Target {
                what,
                path: dir.to_owned(),
                source,
            }
        }
    }
}

/// Opens the export a failover promoted, exclusively.
pub fn open_promoted_export(data_dir: &Path, volume: &str) -> Result<PromotedExport, OpsError> {
    wire::check_volume_name(volume).map_err(|error| OpsError::Usage(error.to_string()))?;
    let disk = LocalDisk::shared();
    let dir = Volume::dir_of(data_dir, volume);
    PointReader::open(data_dir, volume)?;
    let current = authority::read(&disk, &dir)?;
    let promoted = read_promoted(&disk, &dir)?
        .filter(|promoted| promoted.export)
        .ok_or_else(|| {
            OpsError::Usage(format!(
                "volume {volume} has no promoted export (`blkmirror failover {volume} --to \
                 export` makes one)"
            ))
        })?;
    let overlay_dir = dir.join(PROMOTED_EXPORT_DIR);
    if !overlay_dir.is_dir() {
        return Err(OpsError::Usage(format!(
            "{} is gone: the promoted export's writes are lost",
            overlay_dir.display()
        )));
    }
    let writable = current.failover_in_force().is_some() && promoted.term == current.term;
    let view = export::PointView::open(
        data_dir,
        volume,
        &crate::dr::ops::PointSelector::Seq(promoted.seq),
    )
    .map_err(|error| {
        OpsError::Usage(format!(
            "the promoted export of volume {volume} is point {} with its overlay, and that \
             point cannot be read: {error}",
            promoted.seq
        ))
    })?;
    let overlay =
        export::Overlay::open_kept(&overlay_dir, view.size(), view.chunk_bytes()).map_err(
            kept_overlay_error(volume, "opening the overlay in", &overlay_dir),
        )?;
    let disk = if writable {
        export::ExportDisk::new(view, Some(overlay))
    } else {
        export::ExportDisk::read_only_over(view, overlay)
    };
    Ok(PromotedExport {
        disk,
        promoted,
        writable,
    })
}

fn write_promoted(dir: &Path, promoted: &Promoted) -> Result<(), OpsError> {
    let path = dir.join(PROMOTED_FILE);
    let text = serde_json::to_string_pretty(promoted).expect("serializes");
    LocalDisk::shared()
        .write_atomic(&path, text.as_bytes())
        .map_err(volume::StoreError::io("writing", &path))?;
    Ok(())
}

/// `failback serve`'s inputs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The receiver's data directory.
    pub data_dir: PathBuf,
    /// The volume.
    pub volume: String,
    /// The promoted device (or file); with `export`, unused.
    pub device: PathBuf,
    /// The failover was to an export: its point with the kept overlay is the promoted copy.
    pub export: bool,
    /// Where to wait for the source.
    pub listen: SocketAddr,
    /// The receiver's identity: the source's agent already pins its fingerprint.
    pub identity: PathBuf,
    /// The source agents admitted (their fingerprints).
    pub allow: Vec<Fingerprint>,
    /// Where the promoted device's tracker is pinned.
    pub track: TrackOptions,
    /// Pre-copy while the device is still in use, then wait for it to be free and send the
    /// final delta (a planned switchback with the least downtime).
    pub live: bool,
}

/// What a failback did (printed as JSON with `--json`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FailbackReport {
    /// The volume.
    pub volume: String,
    /// The term the source is primary under now.
    pub term: u64,
    /// Every chunk was compared (a tracking gap on either side).
    pub compare_all: bool,
    /// Chunks planned (compared by hash).
    pub planned_chunks: u64,
    /// Chunks that differed and were sent.
    pub sent_chunks: u64,
    /// Their bytes.
    pub sent_bytes: u64,
    /// The device's chunk count.
    pub device_chunks: u64,
    /// UDP bytes this side sent and received.
    pub wire_tx_bytes: u64,
    /// UDP bytes this side received.
    pub wire_rx_bytes: u64,
    /// Seconds from connection to completion.
    pub seconds: f64,
}

fn say(message: impl std::fmt::Display) {
    eprintln!("blkmirror failback: {message}");
}

/// The promoted device's tracker, adopted, with the record of what it has held.
struct Changes {
    tracker: Tracker,
    promoted: Promoted,
    dir: PathBuf,
    chunks: u64,
}

/// Adopts the tracker the failover started on the promoted device, or says why there is none
/// (a failback then compares every chunk).
fn adopt_tracker(
    promoted: Option<Promoted>,
    dir: &Path,
    device: &Path,
    size: u64,
    chunk_bytes: u64,
    track: &TrackOptions,
) -> Result<Option<Changes>, OpsError> {
    let Some(promoted) = promoted else {
        say(
            "no record of a tracked failover (a failover to a file, with --no-track, or by an \
             older release): every chunk is compared",
        );
        return Ok(None);
    };
    if !is_block_device(device) {
        say(format!(
            "{} is not a block device: every chunk is compared",
            device.display()
        ));
        return Ok(None);
    }
    let options = TrackOptions {
        chunk_bytes,
        ..track.clone()
    };
    crate::tracker::track::prepare_environment()?;
    let (tracker, _) = Tracker::open(device, &options)?;
    let id = crate::tracker::device::stable_identity(tracker.device());
    if tracker.origin() != Origin::Adopted
        || tracker.generation() != promoted.generation
        || id != promoted.device_id
    {
        say(format!(
            "the tracking of {} since the failover is gone (a reboot or an untrack; generation \
             {:016x}, the failover started {:016x}): every chunk is compared",
            device.display(),
            tracker.generation(),
            promoted.generation
        ));
        return Ok(None);
    }
    Ok(Some(Changes {
        tracker,
        promoted,
        dir: dir.to_owned(),
        chunks: plan::chunk_count(size, chunk_bytes),
    }))
}

impl Changes {
    /// Cuts both epoch slots and returns what they held (`None` after a counted loss). Each
    /// cut is added to `promoted.json`'s `consumed` (durably) before its slot is released, so
    /// a failback that fails later still knows every change since the failover.
    fn collect(&mut self, device: &Path) -> Result<Option<Vec<ChunkRange>>, OpsError> {
        let chunk_bytes = self.promoted.chunk_bytes;
        let mut changed = blkmirror_protocol::extent::DirtyBitmaps::new(self.tracker.geometry());
        for _ in 0..2 {
            let cut = self.tracker.cut()?;
            if let Some(gap) = cut.needs_verify {
                say(format!(
                    "the tracking of {} has a gap ({}): every chunk is compared",
                    device.display(),
                    gap.reason
                ));
                return Ok(None);
            }
            changed.union(&cut.bitmaps);
            let mut consumed = std::mem::take(&mut self.promoted.consumed);
            consumed.extend(chunk_ranges_of(&cut.bitmaps, chunk_bytes));
            self.promoted.consumed = plan::normalize(consumed, self.chunks)
                .map_err(|error| OpsError::Usage(error.to_string()))?;
            write_promoted(&self.dir, &self.promoted)?;
            self.tracker.release()?;
        }
        Ok(Some(chunk_ranges_of(&changed, chunk_bytes)))
    }
}

/// The chunks a dirty set names, as half-open chunk ranges.
pub fn chunk_ranges_of(
    set: &blkmirror_protocol::extent::DirtyBitmaps,
    chunk_bytes: u64,
) -> Vec<ChunkRange> {
    let mut ranges: Vec<ChunkRange> = Vec::new();
    for extent in set.extents() {
        let first = extent.offset / chunk_bytes;
        let end = (extent.offset + extent.length).div_ceil(chunk_bytes);
        match ranges.last_mut() {
            Some(last) if last.1 >= first => last.1 = last.1.max(end),
            _ => ranges.push((first, end)),
        }
    }
    ranges
}

fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| meta.file_type().is_block_device())
}

/// Opens a failback's device; a block device exclusively (refused while mounted) unless
/// `shared` (the DR site's pre-copy, while its application still runs).
pub fn open_device(path: &Path, write: bool, shared: bool) -> Result<File, OpsError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(write);
    if is_block_device(path) && !shared {
        options.custom_flags(libc::O_EXCL);
    }
    options.open(path).map_err(|source| {
        if source.raw_os_error() == Some(libc::EBUSY) {
            OpsError::Usage(format!(
                "{} is in use (mounted or held by another program): stop the application and \
                 unmount it first; a failback works on the device's final content",
                path.display()
            ))
        } else {
            OpsError::Target {
                what: "opening",
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// Size of an open device or file.
pub fn device_size(file: &File, path: &Path) -> Result<u64, OpsError> {
    let target = |source| OpsError::Target {
        what: "sizing",
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(target)?;
    if meta.file_type().is_block_device() {
        let mut handle = file;
        io::Seek::seek(&mut handle, io::SeekFrom::End(0)).map_err(target)
    } else {
        Ok(meta.len())
    }
}

fn audit(data_dir: &Path, volume: &str, outcome: &str, detail: serde_json::Value) {
    crate::dr::recovery::audit(data_dir, "failback", volume, outcome, detail);
}

/// The runtime a failback's side runs its one connection on.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, OpsError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| OpsError::Environment(format!("starting the runtime: {error}")))
}

/// Reads planned chunk `chunk` of a failback's device into `buffer`; returns its bytes (the
/// last chunk of a device may be short).
pub(crate) fn read_chunk<'b>(
    device: &File,
    path: &Path,
    size: u64,
    chunk_bytes: u64,
    chunk: u64,
    buffer: &'b mut [u8],
) -> Result<&'b [u8], OpsError> {
    let len = plan::chunk_len(size, chunk_bytes, chunk) as usize;
    let data = &mut buffer[..len];
    device
        .read_exact_at(data, chunk * chunk_bytes)
        .map_err(|source| OpsError::Target {
            what: "reading",
            path: path.to_owned(),
            source,
        })?;
    Ok(data)
}

/// `blkmirror failback serve`: waits for the source, moves what differs, swaps the roles.
pub fn serve(options: &ServeOptions) -> Result<FailbackReport, OpsError> {
    wire::check_volume_name(&options.volume).map_err(|error| OpsError::Usage(error.to_string()))?;
    let disk = LocalDisk::shared();
    let dir = Volume::dir_of(&options.data_dir, &options.volume);
    // Fail on a missing volume with the reader's message.
    let (chunk_bytes, head_seq) = {
        let reader = PointReader::open(&options.data_dir, &options.volume)?;
        (reader.meta().chunk_bytes, reader.meta().committed_seq)
    };
    let current = authority::read(&disk, &dir)?;
    let Some(failover) = current.failover_in_force().cloned() else {
        return Err(OpsError::Usage(format!(
            "volume {} is not failed over (term {}, the source is primary): there is nothing \
             to fail back",
            options.volume, current.term
        )));
    };
    let promoted = read_promoted(&disk, &dir)?.filter(|p| {
        let current_failover = p.term == current.term;
        if !current_failover {
            say(format!(
                "{PROMOTED_FILE} is of term {}, the failover in force is term {}: ignored",
                p.term, current.term
            ));
        }
        current_failover
    });
    let identity = crate::link::identity::Identity::load(&options.identity)?;
    let after_point = promoted
        .as_ref()
        .map(|p| p.after_point.clone())
        .unwrap_or_default();
    let (copy, size, changes, tracked) = if options.export {
        if options.live {
            return Err(OpsError::Usage(
                "--live is for a promoted device; stop the promoted export's clients and its \
                 `export --promoted` first"
                    .into(),
            ));
        }
        let opened = open_promoted_export(&options.data_dir, &options.volume)?;
        if !opened.writable {
            return Err(OpsError::Usage(format!(
                "the promoted export of volume {} is of an earlier failover (term {}), not the \
                 one in force (term {})",
                options.volume, opened.promoted.term, current.term
            )));
        }
        let overlay = opened
            .disk
            .overlay()
            .expect("a promoted export has its overlay");
        let chunks = plan::chunk_count(opened.disk.view().size(), chunk_bytes);
        // The overlay's map is exact: every chunk written since the failover, no gap.
        let changes = plan::normalize(overlay.written(), chunks)
            .map_err(|error| OpsError::Usage(error.to_string()))?;
        say(format!(
            "the promoted export holds {} written chunk(s) ({})",
            plan::covered(&changes),
            units::format_size(overlay.bytes())
        ));
        let size = opened.disk.view().size();
        (
            PromotedCopy::Export(Box::new(opened)),
            size,
            Some(changes),
            None,
        )
    } else {
        if promoted.as_ref().is_some_and(|p| p.export) {
            return Err(OpsError::Usage(format!(
                "volume {} was failed over to an export: fail back with --export, not --device",
                options.volume
            )));
        }
        let device = open_device(&options.device, false, options.live)?;
        let size = device_size(&device, &options.device)?;
        let mut tracked = adopt_tracker(
            promoted,
            &dir,
            &options.device,
            size,
            chunk_bytes,
            &options.track,
        )?;
        // Everything the promoted device's tracker held since the failover (earlier attempts'
        // cuts included).
        let changes = match tracked.as_mut() {
            Some(tracked) => tracked
                .collect(&options.device)?
                .map(|_| tracked.promoted.consumed.clone()),
            None => None,
        };
        (PromotedCopy::Device(device), size, changes, tracked)
    };
    let runtime = runtime()?;
    let context = Context {
        options,
        identity: &identity,
        copy,
        size,
        chunk_bytes,
        term: current.term,
        point_seq: failover.seq.unwrap_or(0),
        head_seq,
        changes,
        after_point,
        tracked,
    };
    let result = runtime.block_on(context.run());
    match &result {
        Ok(report) => {
            audit(
                &options.data_dir,
                &options.volume,
                "ok",
                serde_json::json!({
                    "term": report.term,
                    "device": if options.export {
                        "export".to_owned()
                    } else {
                        options.device.display().to_string()
                    },
                    "planned_chunks": report.planned_chunks,
                    "sent_chunks": report.sent_chunks,
                    "sent_bytes": report.sent_bytes,
                    "compare_all": report.compare_all,
                    "user": export::current_user(),
                }),
            );
            // The DR site is no longer primary: stop tracking its copy, or drop its export's
            // overlay (the source now holds what it held).
            if options.export {
                let overlay_dir = dir.join(PROMOTED_EXPORT_DIR);
                if let Err(error) = std::fs::remove_dir_all(&overlay_dir) {
                    say(format!(
                        "warning: removing {}: {error}",
                        overlay_dir.display()
                    ));
                }
            } else if is_block_device(&options.device)
                && let Err(error) = crate::tracker::track::untrack(&options.device, &options.track)
            {
                say(format!(
                    "warning: untracking {}: {error}",
                    options.device.display()
                ));
            }
            let _ = disk.remove_file(&dir.join(PROMOTED_FILE));
            say(format!(
                "volume {}: the source is primary again under term {}; {} of {} planned chunk(s) \
                 differed ({}); {} is no longer the volume's copy: do not start the \
                 application on it",
                options.volume,
                report.term,
                report.sent_chunks,
                report.planned_chunks,
                units::format_size(report.sent_bytes),
                if options.export {
                    "the promoted export".to_owned()
                } else {
                    options.device.display().to_string()
                }
            ));
        }
        Err(error) => audit(
            &options.data_dir,
            &options.volume,
            "failed",
            serde_json::json!({ "error": error.to_string(), "user": export::current_user() }),
        ),
    }
    result
}

/// The DR site's copy a failback reads: the promoted device, or the promoted export.
enum PromotedCopy {
    Device(File),
    Export(Box<PromotedExport>),
}

struct Context<'a> {
    options: &'a ServeOptions,
    identity: &'a Identity,
    copy: PromotedCopy,
    size: u64,
    chunk_bytes: u64,
    term: u64,
    point_seq: u64,
    head_seq: u64,
    /// The promoted device's changes since the failover (`None`: a gap).
    changes: Option<Vec<ChunkRange>>,
    after_point: Vec<ChunkRange>,
    /// Its tracker, for the final delta after a pre-copy.
    tracked: Option<Changes>,
}

fn network(what: &str) -> impl FnOnce(net::NetError) -> OpsError + '_ {
    move |error| OpsError::Network(format!("{what}: {error}"))
}

impl Context<'_> {
    /// Reads planned chunk `chunk` of the DR site's copy.
    fn read_chunk<'b>(&self, chunk: u64, buffer: &'b mut [u8]) -> Result<&'b [u8], OpsError> {
        match &self.copy {
            PromotedCopy::Device(device) => read_chunk(
                device,
                &self.options.device,
                self.size,
                self.chunk_bytes,
                chunk,
                buffer,
            ),
            PromotedCopy::Export(export) => {
                use crate::dr::nbd::Backend as _;
                let len = plan::chunk_len(self.size, self.chunk_bytes, chunk) as usize;
                let data = &mut buffer[..len];
                export
                    .disk
                    .read_at(data, chunk * self.chunk_bytes)
                    .map_err(|source| OpsError::Target {
                        what: "reading the promoted export of",
                        path: PathBuf::from(&self.options.volume),
                        source,
                    })?;
                Ok(data)
            }
        }
    }

    async fn run(mut self) -> Result<FailbackReport, OpsError> {
        let admitted: BTreeSet<Fingerprint> = self.options.allow.iter().cloned().collect();
        let endpoint = net::server_endpoint(self.identity, admitted, self.options.listen, 32 << 20)
            .map_err(network("listening"))?;
        say(format!(
            "volume {}: waiting for the source on {} (run `blkmirror failback pull` there)",
            self.options.volume, self.options.listen
        ));
        let connection = loop {
            let Some(incoming) = endpoint.accept().await else {
                return Err(OpsError::Network("the endpoint closed".into()));
            };
            match incoming.await {
                Ok(connection) => break connection,
                Err(error) => say(format!("a connection attempt failed: {error}")),
            }
        };
        let peer = net::peer_fingerprint(&connection)
            .map_or_else(|| "?".to_owned(), |f| f.as_str().to_owned());
        say(format!(
            "source {peer} connected from {}",
            connection.remote_address()
        ));
        let started = Instant::now();
        let (mut send, mut recv) = connection.accept_bi().await.map_err(|error| {
            OpsError::Network(format!("waiting for the source's stream: {error}"))
        })?;
        let outcome = self.exchange(&mut send, &mut recv).await;
        let report = match outcome {
            Ok(report) => report,
            Err(error) => {
                let _ = net::write_frame(
                    &mut send,
                    &FailbackReply::Refused {
                        message: error.to_string(),
                    },
                )
                .await;
                let _ = send.finish();
                connection.closed().await;
                return Err(error);
            }
        };
        let _ = send.finish();
        // The source closes once it has recorded the new term.
        connection.closed().await;
        let stats = connection.stats();
        endpoint.wait_idle().await;
        Ok(FailbackReport {
            wire_tx_bytes: stats.udp_tx.bytes,
            wire_rx_bytes: stats.udp_rx.bytes,
            seconds: started.elapsed().as_secs_f64(),
            ..report
        })
    }

    async fn exchange(
        &mut self,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<FailbackReport, OpsError> {
        let protocol_error = |error: plan::FailbackError| OpsError::Refused(error.to_string());
        let hello = match net::read_frame::<FailbackRequest>(recv)
            .await
            .map_err(network("reading the source's hello"))?
        {
            Some(FailbackRequest::Hello(hello)) => hello,
            other => {
                return Err(OpsError::Refused(format!(
                    "failback protocol: expected a hello, got {}",
                    describe(other.as_ref())
                )));
            }
        };
        plan::check_hello(&hello, &self.options.volume, self.size, self.chunk_bytes)
            .map_err(protocol_error)?;
        if hello.term > self.term {
            return Err(OpsError::Refused(format!(
                "the source has seen term {}, this DR site's authority is at term {}: this data \
                 directory is behind (restored from an old backup?); nothing was moved",
                hello.term, self.term
            )));
        }
        if hello.committed_seq > self.head_seq {
            return Err(OpsError::Refused(format!(
                "the source's agent recorded cycle {} as committed, the receiver's newest is {}: \
                 this data directory is behind; nothing was moved",
                hello.committed_seq, self.head_seq
            )));
        }
        let chunks = plan::chunk_count(self.size, self.chunk_bytes);
        let unreplicated = match hello.unreplicated {
            Some(ranges) => Some(plan::normalize(ranges, chunks).map_err(protocol_error)?),
            None => {
                say("the source's tracking has a gap: every chunk is compared");
                None
            }
        };
        let (compare_all, ranges) = plan::plan(PlanInput {
            chunks,
            promoted_changes: self.changes.clone(),
            after_point: self.after_point.clone(),
            unreplicated,
        })
        .map_err(protocol_error)?;
        let mut planned = plan::covered(&ranges);
        let (mut sent_chunks, mut sent_bytes) =
            self.round(send, recv, 1, compare_all, ranges).await?;
        if self.options.live {
            // The pre-copy moved the bulk while the application ran. Now its final delta: once
            // the device is free (the application stopped, the file system unmounted), what
            // the tracker recorded since the first round.
            say(format!(
                "pre-copy done ({sent_chunks} chunk(s) sent); stop the application and unmount \
                 {}: the final delta follows",
                self.options.device.display()
            ));
            // Our descriptor goes first: the block device's page cache may hold blocks read
            // before the file system wrote them (file data bypasses it), and the kernel drops
            // that cache when the last opener closes, which is then the unmount.
            let placeholder = File::open("/dev/null").map_err(|source| OpsError::Target {
                what: "opening",
                path: PathBuf::from("/dev/null"),
                source,
            })?;
            drop(std::mem::replace(
                &mut self.copy,
                PromotedCopy::Device(placeholder),
            ));
            let device = wait_until_free(&self.options.device).await?;
            // And whatever is still cached is dropped too (clean pages; advisory, so only a
            // second line of defence).
            // SAFETY: posix_fadvise on a descriptor this function owns; no memory is passed.
            unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&device),
                    0,
                    0,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
            self.copy = PromotedCopy::Device(device);
            let (final_all, final_ranges) = match self.tracked.as_mut() {
                Some(tracked) => match tracked.collect(&self.options.device)? {
                    Some(new) => (false, new),
                    None => (true, vec![(0, chunks)]),
                },
                None => (true, vec![(0, chunks)]),
            };
            planned += plan::covered(&final_ranges);
            let (more_chunks, more_bytes) =
                self.round(send, recv, 2, final_all, final_ranges).await?;
            sent_chunks += more_chunks;
            sent_bytes += more_bytes;
        }
        // The source's device now equals this one, and its agent state says what to send
        // forward: swap the roles, unless the authority moved meanwhile.
        let disk = LocalDisk::shared();
        let dir = Volume::dir_of(&self.options.data_dir, &self.options.volume);
        let next = {
            let _lock = volume::lock_volume(&disk, &dir, false)?;
            let next = authority::read(&disk, &dir)?
                .failback(
                    self.term,
                    &export::current_user(),
                    crate::command::status::now_ms(),
                )
                .map_err(OpsError::Usage)?;
            authority::write(&disk, &dir, &next)?;
            next
        };
        debug_assert_eq!(next.primary, Primary::Source);
        net::write_frame(send, &FailbackReply::Complete { term: next.term })
            .await
            .map_err(network("sending the new term"))?;
        Ok(FailbackReport {
            volume: self.options.volume.clone(),
            term: next.term,
            compare_all,
            planned_chunks: planned,
            sent_chunks,
            sent_bytes,
            device_chunks: chunks,
            ..FailbackReport::default()
        })
    }

    /// One round: the plan, the source's hashes, the chunks that differ, its `Written`.
    async fn round(
        &self,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        round: u32,
        compare_all: bool,
        ranges: Vec<ChunkRange>,
    ) -> Result<(u64, u64), OpsError> {
        let protocol_error = |error: plan::FailbackError| OpsError::Refused(error.to_string());
        let chunks = plan::chunk_count(self.size, self.chunk_bytes);
        let planned = plan::covered(&ranges);
        say(format!(
            "round {round}: {planned} of {chunks} chunk(s) to compare ({}){}",
            units::format_size(planned * self.chunk_bytes),
            if compare_all {
                ", every chunk (a tracking gap)"
            } else {
                ""
            }
        ));
        net::write_frame(
            send,
            &FailbackReply::Plan(FailbackPlan {
                term: self.term,
                point_seq: self.point_seq,
                head_seq: self.head_seq,
                round,
                compare_all,
                chunks: ranges.clone(),
            }),
        )
        .await
        .map_err(network("sending the plan"))?;
        let mut walk = PlanWalk::new(ranges);
        let mut buffer = vec![0u8; self.chunk_bytes as usize];
        let (mut sent_chunks, mut sent_bytes) = (0u64, 0u64);
        let mut progress = Instant::now();
        while walk.remaining() > 0 {
            let hashes = match net::read_frame::<FailbackRequest>(recv)
                .await
                .map_err(network("reading the source's hashes"))?
            {
                Some(FailbackRequest::Hashes(hashes)) => hashes,
                other => {
                    return Err(OpsError::Refused(format!(
                        "failback protocol: expected hashes, got {}",
                        describe(other.as_ref())
                    )));
                }
            };
            plan::check_hash_batch(hashes.len(), walk.remaining()).map_err(protocol_error)?;
            for theirs in hashes {
                let chunk = walk.next().expect("the batch was checked against the plan");
                let data = self.read_chunk(chunk, &mut buffer)?;
                let len = data.len();
                if wire::chunk_hash(data) == theirs {
                    continue;
                }
                let reply = if wire::is_zero(data) {
                    FailbackReply::Zero { chunk }
                } else {
                    let (data, zstd) = plan::pack(data);
                    FailbackReply::Data { chunk, data, zstd }
                };
                net::write_frame(send, &reply)
                    .await
                    .map_err(network("sending a chunk"))?;
                sent_chunks += 1;
                sent_bytes += len as u64;
            }
            if progress.elapsed().as_secs() >= 5 {
                progress = Instant::now();
                say(format!(
                    "round {round}: compared {} of {planned} chunk(s), sent {sent_chunks}",
                    planned - walk.remaining()
                ));
            }
        }
        net::write_frame(
            send,
            &FailbackReply::Sent {
                chunks: sent_chunks,
            },
        )
        .await
        .map_err(network("sending the end of the data"))?;
        match net::read_frame::<FailbackRequest>(recv)
            .await
            .map_err(network("waiting for the source to write"))?
        {
            Some(FailbackRequest::Written { chunks }) if chunks == sent_chunks => {}
            other => {
                return Err(OpsError::Refused(format!(
                    "failback protocol: expected the source to confirm {sent_chunks} chunk(s) \
                     written, got {}",
                    describe(other.as_ref())
                )));
            }
        }
        Ok((sent_chunks, sent_bytes))
    }
}

/// Waits until `path` can be opened exclusively (nothing mounts or holds it), saying once
/// what it waits for.
async fn wait_until_free(path: &Path) -> Result<File, OpsError> {
    let mut said = false;
    loop {
        match open_device(path, false, false) {
            Ok(file) => return Ok(file),
            Err(OpsError::Usage(message)) => {
                if !said {
                    say(format!("waiting: {message}"));
                    said = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

fn describe<T: std::fmt::Debug>(message: Option<&T>) -> String {
    match message {
        None => "the end of the stream".into(),
        Some(message) => {
            let text = format!("{message:?}");
            text.chars().take(60).collect()
        }
    }
}
