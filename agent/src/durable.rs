//! Crash-safe small files: write a temporary file, sync it, rename it over the target, sync
//! the directory. A reader sees the old content or the new one, never a torn mix.

use std::{
    fs::{self, File},
    io::{self, Write as _},
    path::Path,
};

/// Replaces `path` with `content` atomically and durably.
pub fn write_atomic(path: &Path, content: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut file = File::create(&tmp)?;
    file.write_all(content)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}
