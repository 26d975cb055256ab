//! Block devices as the kernel's block tracepoints see them.
//!
//! The tracepoints report partition IO with the *whole disk's* `dev_t` and absolute sectors, so
//! a tracked device is always a whole disk plus a sector range. [`inspect`] resolves a device
//! node into that form using sysfs (`/sys/dev/block/MAJ:MIN`).

use std::{
    fs,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

/// Errors about the device to track.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The path does not exist.
    #[error("{0}: no such device")]
    NotFound(PathBuf),
    /// The path exists but is not a block device node.
    #[error("{0}: not a block device (give a device node such as /dev/sdb or /dev/loop0p1)")]
    NotBlockDevice(PathBuf),
    /// sysfs does not describe the device as expected.
    #[error("{path}: cannot read {what} from sysfs: {source}")]
    Sysfs {
        /// The device.
        path: PathBuf,
        /// What we were reading.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The device has no request queue, so its IO never reaches `block_rq_complete`.
    #[error(
        "{path}: {name} is a bio-based device (device-mapper, md, zram, ...); its IO does not \
         pass the block request tracepoints. Track the disks underneath it instead"
    )]
    BioBased {
        /// The device.
        path: PathBuf,
        /// Its kernel name.
        name: String,
    },
    /// The device has size zero (e.g. a loop device without a backing file).
    #[error("{0}: the device has size 0 (a loop device with no backing file?)")]
    Empty(PathBuf),
    /// The device disappeared or changed size while being tracked.
    #[error("{path}: the device vanished or changed while tracked ({detail})")]
    Vanished {
        /// The device.
        path: PathBuf,
        /// What changed.
        detail: String,
    },
}

/// A block device resolved into whole disk + sector range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDevice {
    /// The path given by the user.
    pub path: PathBuf,
    /// Kernel name (`loop0p1`).
    pub name: String,
    /// Major and minor of the node itself.
    pub major: u32,
    /// Minor of the node itself.
    pub minor: u32,
    /// Major of the whole disk.
    pub disk_major: u32,
    /// Minor of the whole disk.
    pub disk_minor: u32,
    /// First sector on the whole disk (0 for a whole disk).
    pub start_sector: u64,
    /// Size in 512-byte sectors.
    pub nr_sectors: u64,
    /// The disk is zoned (its `N` requests may carry data).
    pub zoned: bool,
}

impl BlockDevice {
    /// The whole disk's `dev_t` as the kernel encodes it internally and in tracepoints:
    /// `major << 20 | minor`, not the userspace `st_rdev` encoding.
    pub fn kernel_dev(&self) -> u32 {
        (self.disk_major << 20) | self.disk_minor
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.nr_sectors * 512
    }

    /// Whether this is a partition rather than a whole disk.
    pub fn is_partition(&self) -> bool {
        (self.major, self.minor) != (self.disk_major, self.disk_minor)
    }

    /// Checks that the device still exists with the same identity and size.
    pub fn check_unchanged(&self) -> Result<(), DeviceError> {
        let now = inspect(&self.path).map_err(|e| DeviceError::Vanished {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        if now != *self {
            return Err(DeviceError::Vanished {
                path: self.path.clone(),
                detail: format!(
                    "was {}:{} with {} sectors at {}, now {}:{} with {} sectors at {}",
                    self.major,
                    self.minor,
                    self.nr_sectors,
                    self.start_sector,
                    now.major,
                    now.minor,
                    now.nr_sectors,
                    now.start_sector
                ),
            });
        }
        Ok(())
    }
}

/// A whole disk's completed write-like I/O, from its `stat` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskWrites {
    /// Write I/Os plus discard I/Os (fields 5 and 12): requests, counted once each when they
    /// end, without the empty pre-flush writes of a flush sequence.
    pub requests: u64,
    /// Write sectors plus discard sectors (fields 7 and 14), in 512-byte units, added per
    /// completion part.
    pub sectors: u64,
}

/// The completed write-like I/O of a whole disk, or `None` if the disk does not keep I/O
/// statistics.
pub fn completed_writes(disk_major: u32, disk_minor: u32) -> Option<DiskWrites> {
    let dir = format!("/sys/dev/block/{disk_major}:{disk_minor}");
    if fs::read_to_string(format!("{dir}/queue/iostats")).is_ok_and(|v| v.trim() == "0") {
        return None;
    }
    let text = fs::read_to_string(format!("{dir}/stat")).ok()?;
    parse_writes(&text)
}

/// Fields 5 and 12 (write and discard I/Os) and 7 and 14 (write and discard sectors) of a
/// block `stat` file. Kernels before 4.18 have no discard fields: they count as zero.
fn parse_writes(text: &str) -> Option<DiskWrites> {
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let field = |index: usize| fields.get(index).copied().unwrap_or(0);
    Some(DiskWrites {
        requests: fields.get(4)?.checked_add(field(11))?,
        sectors: fields.get(6)?.checked_add(field(13))?,
    })
}

/// A name for the device that survives reboots and renumbering (`/dev/sdb` can become
/// `/dev/sdc`): the replica records it, and an agent pointed at another device is refused.
///
/// In order of preference: a loop device's backing file (plus the partition's start), the
/// `/dev/disk/by-id` link (WWN first), the partition UUID, the disk's serial. The last resort,
/// the kernel name, is marked `unstable:`.
pub fn stable_identity(device: &BlockDevice) -> String {
    let disk_sys = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        device.disk_major, device.disk_minor
    ));
    let part = |id: String| {
        if device.is_partition() {
            format!("{id}:part-at-sector-{}", device.start_sector)
        } else {
            id
        }
    };
    if let Ok(backing) = fs::read_to_string(disk_sys.join("loop/backing_file")) {
        return part(format!("loop:{}", backing.trim()));
    }
    let node = fs::canonicalize(&device.path).unwrap_or_else(|_| device.path.clone());
    let links_to_node = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| fs::canonicalize(entry.path()).is_ok_and(|target| target == node))
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort_by_key(|name| (!name.starts_with("wwn-"), name.clone()));
        names
    };
    if let Some(name) = links_to_node("/dev/disk/by-id").into_iter().next() {
        return format!("by-id:{name}");
    }
    if let Some(uuid) = links_to_node("/dev/disk/by-partuuid").into_iter().next() {
        return format!("partuuid:{uuid}");
    }
    for file in ["wwid", "device/wwid", "device/serial", "serial"] {
        if let Ok(serial) = fs::read_to_string(disk_sys.join(file))
            && !serial.trim().is_empty()
        {
            return part(format!("serial:{}", serial.trim()));
        }
    }
    format!("unstable:{}", device.name)
}

/// Resolves `path` (a block device node) using sysfs.
pub fn inspect(path: &Path) -> Result<BlockDevice, DeviceError> {
    let meta = fs::metadata(path).map_err(|_| DeviceError::NotFound(path.to_owned()))?;
    if !meta.file_type().is_block_device() {
        return Err(DeviceError::NotBlockDevice(path.to_owned()));
    }
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let sysfs_err = |what: &str| {
        let what = what.to_owned();
        move |source| DeviceError::Sysfs {
            path: path.to_owned(),
            what,
            source,
        }
    };
    let dir = fs::canonicalize(&sys).map_err(sysfs_err(&sys.display().to_string()))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nr_sectors = read_u64(&dir.join("size")).map_err(sysfs_err("size"))?;
    let (disk_dir, start_sector) = if dir.join("partition").exists() {
        let start = read_u64(&dir.join("start")).map_err(sysfs_err("start"))?;
        let parent = dir.parent().map(Path::to_path_buf).unwrap_or_default();
        (parent, start)
    } else {
        (dir.clone(), 0)
    };
    let disk_dev = fs::read_to_string(disk_dir.join("dev")).map_err(sysfs_err("dev"))?;
    let (disk_major, disk_minor) =
        parse_major_minor(&disk_dev).ok_or_else(|| DeviceError::Sysfs {
            path: path.to_owned(),
            what: "dev".into(),
            source: std::io::Error::other(format!("unexpected content {disk_dev:?}")),
        })?;
    // Request-based (blk-mq) disks have an `mq` directory; bio-based ones do not.
    if !disk_dir.join("mq").exists() {
        return Err(DeviceError::BioBased {
            path: path.to_owned(),
            name,
        });
    }
    let zoned = fs::read_to_string(disk_dir.join("queue/zoned"))
        .map(|z| z.trim() != "none")
        .unwrap_or(false);
    if nr_sectors == 0 {
        return Err(DeviceError::Empty(path.to_owned()));
    }
    Ok(BlockDevice {
        path: path.to_owned(),
        name,
        major,
        minor,
        disk_major,
        disk_minor,
        start_sector,
        nr_sectors,
        zoned,
    })
}

fn read_u64(path: &Path) -> std::io::Result<u64> {
    let text = fs::read_to_string(path)?;
    text.trim()
        .parse()
        .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
}

fn parse_major_minor(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_dev_encoding() {
        let dev = BlockDevice {
            path: "/dev/loop0p1".into(),
            name: "loop0p1".into(),
            major: 259,
            minor: 0,
            disk_major: 7,
            disk_minor: 0,
            start_sector: 2048,
            nr_sectors: 100,
            zoned: false,
        };
        assert_eq!(dev.kernel_dev(), 0x0070_0000);
        assert!(dev.is_partition());
    }

    #[test]
    fn stat_file_parsing() {
        let stat = "  100  2  800  10  37  1  296  20  0  30  40  5  0  64  1  9  2\n";
        assert_eq!(
            parse_writes(stat),
            Some(DiskWrites {
                requests: 42,
                sectors: 360
            })
        );
        // Kernels before 4.18 have no discard fields.
        assert_eq!(
            parse_writes("1 2 3 4 7 6 70 8 9 10 11"),
            Some(DiskWrites {
                requests: 7,
                sectors: 70
            })
        );
        assert_eq!(parse_writes("1 2 3 4 7 6"), None);
        assert_eq!(parse_writes("1 2 x"), None);
        assert_eq!(parse_writes(""), None);
    }

    #[test]
    fn major_minor_parsing() {
        assert_eq!(parse_major_minor("7:3\n"), Some((7, 3)));
        assert_eq!(parse_major_minor("7"), None);
        assert_eq!(parse_major_minor("a:b"), None);
    }

    #[test]
    fn regular_file_is_rejected() {
        let err = inspect(Path::new("/proc/self/status")).unwrap_err();
        assert!(matches!(err, DeviceError::NotBlockDevice(_)), "{err}");
        let err = inspect(Path::new("/nonexistent/dev")).unwrap_err();
        assert!(matches!(err, DeviceError::NotFound(_)), "{err}");
    }
}
