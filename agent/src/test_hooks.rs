//! Switches that only the root tests use: holding a freeze or a restore open long enough to
//! kill a process or race a retention pass at that moment.
//!
//! They exist only with the `test-hooks` cargo feature, which `cargo xtask test` turns on for
//! the binary the root tests run. A release build cannot carry them: the feature together with
//! an optimized build without debug assertions is a compile error. Without the feature every
//! hook is an empty inline function, so the production path reads no test variable.

#[cfg(all(feature = "test-hooks", not(debug_assertions)))]
compile_error!(
    "the `test-hooks` feature is for test builds only and must not be built into a release"
);

/// Holds the file system frozen for `BLKMIRROR_TEST_FREEZE_HOLD_MS` after the final cut.
#[inline]
pub fn hold_freeze() {
    #[cfg(feature = "test-hooks")]
    hold("BLKMIRROR_TEST_FREEZE_HOLD_MS");
}

/// Holds a restore, with its volume open, for `BLKMIRROR_TEST_RESTORE_HOLD_MS`.
#[inline]
pub fn hold_restore() {
    #[cfg(feature = "test-hooks")]
    hold("BLKMIRROR_TEST_RESTORE_HOLD_MS");
}

/// Holds a committed cycle before it is published to the object store, for as long as the
/// file `BLKMIRROR_TEST_PUBLISH_HOLD_FILE` names exists (at most two minutes): the test stops
/// the store meanwhile.
#[inline]
pub fn hold_publish() {
    #[cfg(feature = "test-hooks")]
    if let Some(path) = std::env::var_os("BLKMIRROR_TEST_PUBLISH_HOLD_FILE") {
        let path = std::path::PathBuf::from(path);
        if path.exists() {
            tracing::warn!(target: "blkmirror", "test hook: holding the publish while {} exists", path.display());
            let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while path.exists() && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

#[cfg(feature = "test-hooks")]
fn hold(variable: &str) {
    if let Some(ms) = std::env::var(variable).ok().and_then(|ms| ms.parse().ok()) {
        tracing::warn!(target: "blkmirror", "test hook {variable}: holding for {ms} ms");
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// The audit chain's segment length: `BLKMIRROR_TEST_SEGMENT_BLOCKS` instead of `blocks`, so
/// that a root test writes segments of a chain of a few blocks on the real store.
#[inline]
pub fn segment_blocks(blocks: u64) -> u64 {
    #[cfg(feature = "test-hooks")]
    if let Some(run) = std::env::var("BLKMIRROR_TEST_SEGMENT_BLOCKS")
        .ok()
        .and_then(|run| run.parse::<u64>().ok())
        .filter(|&run| run > 0)
    {
        tracing::warn!(target: "blkmirror", "test hook: audit segments of {run} blocks");
        return run;
    }
    blocks
}
