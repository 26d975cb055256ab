//! Freezing the source file system for a crash-consistent cut, and making sure it thaws.
//!
//! A frozen file system left behind stops every writer on the host: the worst failure this
//! product can have. Three layers make sure it thaws:
//!
//! 1. [`Frozen`] thaws in `Drop`, so errors and early returns thaw.
//! 2. Before freezing, a *thaw guard* child process (`blkmirror thaw-guard`) is started. It
//!    thaws the file system by itself when the budget plus a margin has passed, or when its
//!    stdin closes, which happens when the agent dies in any way, SIGKILL included.
//! 3. Signals (SIGTERM, SIGINT) only set a flag in the agent; the frozen section is short and
//!    runs to its thaw.
//!
//! The guard reports whether it had to thaw; a point whose freeze was ended by the guard is not
//! marked consistent.

use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{tracker::device::BlockDevice, tracker::sys};

/// Freeze errors.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// Opening the mount point failed.
    #[error("opening mount point {path}: {source}")]
    Open {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// FIFREEZE failed.
    #[error("freezing {path} (FIFREEZE): {source}")]
    Freeze {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// FITHAW failed.
    #[error("thawing {path} (FITHAW): {source}")]
    Thaw {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The guard process could not be started.
    #[error("starting the thaw guard: {0}")]
    Guard(io::Error),
}

/// The mount point of `device`'s file system, from `/proc/self/mountinfo`.
pub fn mount_point(device: &BlockDevice) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_point_in(&text, device.major, device.minor)
}

/// Pure part of [`mount_point`]: the first mount of `major:minor` in mountinfo text.
pub fn mount_point_in(mountinfo: &str, major: u32, minor: u32) -> Option<PathBuf> {
    let wanted = format!("{major}:{minor}");
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let dev = fields.nth(2)?;
        let _root = fields.next()?;
        let mount = fields.next()?;
        (dev == wanted).then(|| PathBuf::from(unescape_octal(mount)))
    })
}

/// Undoes mountinfo's `\040`-style escapes.
fn unescape_octal(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How a freeze ended.
#[derive(Debug, Clone, Copy)]
pub struct Thawed {
    /// How long the file system was frozen (by us; the guard's thaw ends it earlier).
    pub held: Duration,
    /// Whether the guard thawed it first (the budget was overrun).
    pub by_guard: bool,
}

/// A frozen file system. Thaws on drop.
pub struct Frozen {
    path: PathBuf,
    mount: File,
    guard: Child,
    guard_in: Option<ChildStdin>,
    guard_out: BufReader<ChildStdout>,
    since: Instant,
    thawed: bool,
}

impl Frozen {
    /// Starts the guard (which thaws after `budget` plus one second at the latest), then
    /// freezes the file system mounted at `path`.
    pub fn freeze(path: &Path, budget: Duration) -> Result<Self, FreezeError> {
        let mount = File::open(path).map_err(|source| FreezeError::Open {
            path: path.to_owned(),
            source,
        })?;
        let exe = std::env::current_exe().map_err(FreezeError::Guard)?;
        let limit = budget + Duration::from_secs(1);
        let mut guard = Command::new(exe)
            .arg("thaw-guard")
            .arg(path)
            .arg("--after-ms")
            .arg(limit.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(FreezeError::Guard)?;
        let guard_in = guard.stdin.take();
        let mut guard_out = BufReader::new(guard.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        guard_out.read_line(&mut line).map_err(FreezeError::Guard)?;
        if line.trim() != "armed" {
            let _ = guard.kill();
            let _ = guard.wait();
            return Err(FreezeError::Guard(io::Error::other(format!(
                "the guard did not arm (said {line:?})"
            ))));
        }
        if let Err(source) = sys::freeze(&mount) {
            drop(guard_in);
            let _ = guard.wait();
            return Err(FreezeError::Freeze {
                path: path.to_owned(),
                source,
            });
        }
        Ok(Self {
            path: path.to_owned(),
            mount,
            guard,
            guard_in,
            guard_out,
            since: Instant::now(),
            thawed: false,
        })
    }

    /// How long the file system has been frozen.
    pub fn elapsed(&self) -> Duration {
        self.since.elapsed()
    }

    /// Thaws the file system and stops the guard.
    pub fn thaw(mut self) -> Result<Thawed, FreezeError> {
        self.thaw_inner()
    }

    fn thaw_inner(&mut self) -> Result<Thawed, FreezeError> {
        self.thawed = true;
        // Tell the guard first, so it does not thaw a later freeze; it answers whether it
        // already had to thaw.
        let mut by_guard = false;
        if let Some(mut input) = self.guard_in.take() {
            let _ = input.write_all(b"done\n");
            drop(input);
            let mut line = String::new();
            let _ = self.guard_out.read_line(&mut line);
            by_guard = line.trim() == "thawed";
        }
        let result = sys::thaw(&self.mount);
        let held = self.since.elapsed();
        let _ = self.guard.wait();
        match result {
            Ok(()) => Ok(Thawed { held, by_guard }),
            // Not frozen any more: the guard thawed it.
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => Ok(Thawed {
                held,
                by_guard: true,
            }),
            Err(source) => Err(FreezeError::Thaw {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.thawed
            && let Err(error) = self.thaw_inner()
        {
            eprintln!("blkmirror: {error}");
        }
    }
}

/// The body of `blkmirror thaw-guard MOUNT --after-ms N`: thaws `mount` when `after` passes or
/// stdin closes without `done`. Prints `armed` once ready, and `thawed` or `released` at the end.
pub fn run_guard(mount: &Path, after: Duration) -> Result<(), FreezeError> {
    let file = File::open(mount).map_err(|source| FreezeError::Open {
        path: mount.to_owned(),
        source,
    })?;
    // The stdin reader hands its verdict to this thread; one message, so capacity 1.
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let mut line = String::new();
        let done = io::stdin().read_line(&mut line).is_ok() && line.trim() == "done";
        let _ = tx.send(done);
    });
    println!("armed");
    let _ = io::stdout().flush();
    let released = matches!(rx.recv_timeout(after), Ok(true));
    if released {
        println!("released");
        return Ok(());
    }
    let result = sys::thaw(&file);
    println!("thawed");
    let _ = io::stdout().flush();
    match result {
        Ok(()) => {
            eprintln!(
                "blkmirror thaw-guard: thawed {} (the agent overran its freeze budget or died)",
                mount.display()
            );
            Ok(())
        }
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(source) => Err(FreezeError::Thaw {
            path: mount.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_mount_of_a_device() {
        let text = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
30 22 7:3 / /mnt/with\\040space rw,relatime shared:5 - ext4 /dev/loop3 rw
31 22 7:3 / /mnt/bind rw,relatime shared:5 - ext4 /dev/loop3 rw
";
        assert_eq!(mount_point_in(text, 254, 1), Some(PathBuf::from("/")));
        assert_eq!(
            mount_point_in(text, 7, 3),
            Some(PathBuf::from("/mnt/with space"))
        );
        assert_eq!(mount_point_in(text, 7, 4), None);
    }
}
