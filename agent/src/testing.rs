//! Helpers for this crate's unit tests and fuzz targets (not part of the interface).

use std::{
    fs,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
};

/// A scratch directory under the system's temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new, empty directory whose name contains `tag` (unique within the process).
    pub fn new(tag: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), tag)
    }

    /// A new, empty directory under `base` whose name contains `tag`.
    pub fn new_in(base: &std::path::Path, tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = base.join(format!(
            "blkmirror-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temporary directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The `Hello` of the unit tests' volume "v": 1 MiB in 64 KiB chunks.
pub fn volume_hello() -> blkmirror_protocol::wire::Hello {
    blkmirror_protocol::wire::Hello {
        protocol: blkmirror_protocol::wire::PROTOCOL_VERSION,
        volume: "v".into(),
        source_id: "test:source".into(),
        size_bytes: 1 << 20,
        chunk_bytes: 65536,
    }
}
