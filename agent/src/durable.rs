//! Crash-safe small files: write a temporary file, sync it, rename it over the target, sync
//! the directory. A reader sees the old content or the new one, never a torn mix.

use std::{io, path::Path};

use crate::dr::storage::{LocalDisk, Storage as _};

/// Replaces `path` with `content` atomically and durably (the real file system's
/// [`Storage::write_atomic`](crate::dr::storage::Storage::write_atomic)).
pub fn write_atomic(path: &Path, content: &[u8]) -> io::Result<()> {
    LocalDisk.write_atomic(path, content)
}
