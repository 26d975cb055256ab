//! Application hooks around a freeze: `pre_freeze` and `post_thaw` commands that make a point
//! application-consistent (a database checkpoint before the freeze, a read lock held across
//! it).
//!
//! # Rules
//!
//! * `pre_freeze` runs before each freeze attempt, `post_thaw` after each thaw. Both run with
//!   `sh -c`, in their own process group, with a timeout; on timeout the whole group is
//!   killed.
//! * A `pre_freeze` that fails or times out does not stop the cycle: the point is still frozen
//!   (crash-consistent) and records that it is not application-consistent.
//! * `post_thaw` always runs after a `pre_freeze` has run, whatever happened in between: it is
//!   what releases the application (the read lock of the MySQL example).
//! * Their output goes to the agent's log (the journal under systemd), line by line. Output
//!   is collected in a memory file, not a pipe, so a hook may leave a helper running in the
//!   background (one that holds a lock until `post_thaw`) without the agent waiting for it.
//!
//! Hooks get `BLKMIRROR_HOOK` (`pre_freeze` or `post_thaw`), `BLKMIRROR_VOLUME`,
//! `BLKMIRROR_DEVICE`, `BLKMIRROR_MOUNT` and `BLKMIRROR_CYCLE`; `post_thaw` also gets
//! `BLKMIRROR_PRE_FREEZE_OK` (`1` or `0`).

use std::{
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    os::{fd::FromRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// The default time a hook may take.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(60);
/// Output kept per hook run (the tail, for the log).
const OUTPUT_TAIL: usize = 16 << 10;

/// A device's hooks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppHooks {
    /// Run before each freeze attempt.
    pub pre_freeze: Option<String>,
    /// Run after each thaw.
    pub post_thaw: Option<String>,
    /// How long each may take.
    pub timeout: Duration,
}

/// What a hook's run came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookRun {
    /// Exit 0 within the timeout.
    pub ok: bool,
    /// How it ended: `exit 0`, `exit 3`, `killed after 60s`, `could not start: ...`.
    pub outcome: String,
    /// How long it took.
    pub elapsed: Duration,
}

/// Where a hook runs: what it is told about the cycle.
#[derive(Clone, Copy, Debug)]
pub struct HookContext<'a> {
    /// The volume.
    pub volume: &'a str,
    /// The device.
    pub device: &'a Path,
    /// The file system's mount point, when there is one.
    pub mount: Option<&'a Path>,
    /// The cycle.
    pub cycle: u64,
}

fn memory_file(name: &str) -> std::io::Result<File> {
    let name = std::ffi::CString::new(name).expect("no NUL in a hook name");
    // SAFETY: memfd_create with a valid C string; the returned fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Runs hook `name` (`pre_freeze`, `post_thaw`) with `command`, logging its output.
pub fn run_hook(
    name: &str,
    command: &str,
    timeout: Duration,
    context: HookContext<'_>,
    extra_env: &[(&str, &str)],
) -> HookRun {
    let started = Instant::now();
    let ended = |ok: bool, outcome: String| HookRun {
        ok,
        outcome,
        elapsed: started.elapsed(),
    };
    let output = match memory_file(name) {
        Ok(file) => file,
        Err(error) => return ended(false, format!("could not start: memfd: {error}")),
    };
    let (Ok(stdout), Ok(stderr)) = (output.try_clone(), output.try_clone()) else {
        return ended(false, "could not start: dup of the output file".into());
    };
    let mut child = Command::new("sh");
    child
        .args(["-c", command])
        .env("BLKMIRROR_HOOK", name)
        .env("BLKMIRROR_VOLUME", context.volume)
        .env("BLKMIRROR_DEVICE", context.device)
        .env("BLKMIRROR_CYCLE", context.cycle.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        // Its own process group: a timeout kills whatever it started too.
        .process_group(0);
    if let Some(mount) = context.mount {
        child.env("BLKMIRROR_MOUNT", mount);
    }
    for (key, value) in extra_env {
        child.env(key, value);
    }
    let mut child = match child.spawn() {
        Ok(child) => child,
        Err(error) => return ended(false, format!("could not start: {error}")),
    };
    let deadline = started + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break None,
        }
    };
    let run = match status {
        Some(status) if status.success() => ended(true, "exit 0".into()),
        Some(status) => ended(false, format!("{status}")),
        None => {
            // SAFETY: kill(2) of the process group we made for the child; no pointers.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            ended(false, format!("killed after {timeout:?}"))
        }
    };
    log_output(name, context.volume, output, &run);
    run
}

fn log_output(name: &str, volume: &str, mut output: File, run: &HookRun) {
    let mut text = Vec::new();
    let len = output.seek(SeekFrom::End(0)).unwrap_or(0);
    let from = len.saturating_sub(OUTPUT_TAIL as u64);
    if output.seek(SeekFrom::Start(from)).is_ok() {
        let _ = output.take(OUTPUT_TAIL as u64).read_to_end(&mut text);
    }
    for line in String::from_utf8_lossy(&text).lines() {
        tracing::info!(target: "blkmirror agent", "{volume}: {name}: {line}");
    }
    let message = format!(
        "{volume}: {name} {} in {} ms ({})",
        if run.ok { "succeeded" } else { "FAILED" },
        run.elapsed.as_millis(),
        run.outcome
    );
    if run.ok {
        tracing::info!(target: "blkmirror agent", "{message}");
    } else {
        tracing::warn!(target: "blkmirror agent", "{message}");
    }
}

impl AppHooks {
    /// Whether any hook is set.
    pub fn any(&self) -> bool {
        self.pre_freeze.is_some() || self.post_thaw.is_some()
    }

    /// Runs `pre_freeze` (if set): `Some(ok)` when it ran.
    pub fn before_freeze(&self, context: HookContext<'_>) -> Option<bool> {
        let command = self.pre_freeze.as_deref()?;
        Some(run_hook("pre_freeze", command, self.timeout, context, &[]).ok)
    }

    /// Runs `post_thaw` (if set), telling it how `pre_freeze` went.
    pub fn after_thaw(&self, context: HookContext<'_>, pre_freeze: Option<bool>) {
        if let Some(command) = self.post_thaw.as_deref() {
            let ok = match pre_freeze {
                Some(true) => "1",
                _ => "0",
            };
            run_hook(
                "post_thaw",
                command,
                self.timeout,
                context,
                &[("BLKMIRROR_PRE_FREEZE_OK", ok)],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> HookContext<'static> {
        HookContext {
            volume: "db",
            device: Path::new("/dev/null"),
            mount: Some(Path::new("/srv")),
            cycle: 7,
        }
    }

    #[test]
    fn a_hook_sees_its_context_and_its_exit_decides() {
        let tmp = crate::testing::TempDir::new("hooks");
        let out = tmp.0.join("env");
        let run = run_hook(
            "pre_freeze",
            &format!(
                "echo \"$BLKMIRROR_HOOK $BLKMIRROR_VOLUME $BLKMIRROR_MOUNT $BLKMIRROR_CYCLE \
                 $X\" > {}",
                out.display()
            ),
            Duration::from_secs(10),
            context(),
            &[("X", "y")],
        );
        assert!(run.ok, "{run:?}");
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            "pre_freeze db /srv 7 y"
        );
        let failed = run_hook(
            "pre_freeze",
            "echo no; exit 3",
            Duration::from_secs(10),
            context(),
            &[],
        );
        assert!(!failed.ok);
        assert!(failed.outcome.contains('3'), "{failed:?}");
    }

    #[test]
    fn a_hook_over_its_timeout_is_killed_with_what_it_started() {
        let tmp = crate::testing::TempDir::new("hooks-timeout");
        let marker = tmp.0.join("late");
        let started = Instant::now();
        let run = run_hook(
            "pre_freeze",
            &format!("(sleep 2; touch {}) & sleep 30", marker.display()),
            Duration::from_millis(300),
            context(),
            &[],
        );
        assert!(!run.ok);
        assert!(run.outcome.contains("killed"), "{run:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(2500));
        assert!(
            !marker.exists(),
            "the hook's background child outlived the kill"
        );
    }

    #[test]
    fn a_background_helper_does_not_hold_the_hook_open() {
        // The MySQL pattern: pre_freeze starts a helper that keeps running (and keeps its
        // output open) until post_thaw stops it.
        let started = Instant::now();
        let run = run_hook(
            "pre_freeze",
            "sleep 5 & echo started",
            Duration::from_secs(10),
            context(),
            &[],
        );
        assert!(run.ok, "{run:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn post_thaw_is_told_how_pre_freeze_went_and_unset_hooks_do_nothing() {
        let tmp = crate::testing::TempDir::new("hooks-post");
        let out = tmp.0.join("ok");
        let hooks = AppHooks {
            pre_freeze: Some("exit 1".into()),
            post_thaw: Some(format!("echo $BLKMIRROR_PRE_FREEZE_OK > {}", out.display())),
            timeout: Duration::from_secs(10),
        };
        let pre = hooks.before_freeze(context());
        assert_eq!(pre, Some(false));
        hooks.after_thaw(context(), pre);
        assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "0");
        assert_eq!(AppHooks::default().before_freeze(context()), None);
        assert!(!AppHooks::default().any());
    }
}
