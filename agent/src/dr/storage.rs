//! The file system under the receiver's volume store, as an interface.
//!
//! [`crate::dr::volume`] and [`crate::dr::points`] do all their file IO through [`Storage`]:
//! opening files, positioned reads and writes, `fsync`, renames, directory syncs, locks, free
//! space, holes. Two implementations exist:
//!
//! * [`LocalDisk`]: the real file system (`std::fs` and the syscalls in
//!   [`crate::tracker::sys`]). Production uses only this one.
//! * The simulator's disk (`crate::sim`, tests only): files in memory that remember what was
//!   written since the last `fsync`, so that a simulated crash can lose or tear exactly the
//!   writes a power cut could lose, and a directory entry that was never synced can vanish.
//!
//! The interface is the contract the store's crash safety rests on, written down: data is
//! durable after [`StoredFile::sync_all`]; a name (create, rename, remove) is durable after
//! [`Storage::sync_dir`] of its directory; nothing else is promised.

use std::{
    fmt,
    fs::{self, File},
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::fs::FileExt,
    path::Path,
    sync::Arc,
};

use crate::tracker::sys;

/// How a file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only; the file must exist.
    Read,
    /// Read and write; the file must exist.
    ReadWrite,
    /// Read and write; created if missing, kept as it is otherwise.
    ReadWriteCreate,
    /// Read and write; created if missing, emptied otherwise.
    Truncate,
}

/// An open file: positioned IO, size, sync, holes.
pub trait StoredFile: Send + Sync + fmt::Debug {
    /// Reads at `offset`; returns how many bytes were read (0 at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes at `offset`; returns how many bytes were written.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// The file's length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Sets the file's length (a longer file reads zeros past the old end).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the file's data and length durable.
    fn sync_all(&self) -> io::Result<()>;
    /// Makes `[offset, offset + length)` read as zeros, freeing the space where it can.
    fn zero_range(&self, offset: u64, length: u64) -> io::Result<()>;
    /// The parts of `[offset, offset + length)` that hold data (not holes), as
    /// `(offset, length)`; an implementation without holes reports the whole range.
    fn data_segments(&self, offset: u64, length: u64) -> io::Result<Vec<(u64, u64)>>;
    /// Starts writing the file's data back without waiting: a hint that lets a later
    /// [`sync_all`](Self::sync_all) find less to do. It promises nothing about durability, so
    /// an implementation may do nothing.
    fn start_writeback(&self) -> io::Result<()> {
        Ok(())
    }

    /// Fills `buf` from `offset`, or fails with `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }
}

/// A held lock; released when dropped.
pub type LockGuard = Box<dyn Send + Sync>;

/// A file system.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Opens `path`.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StoredFile>>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
    /// The length of the file at `path`.
    fn file_len(&self, path: &Path) -> io::Result<u64>;
    /// The names in directory `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates `dir` and its missing parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Removes the file at `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames `from` over `to`, atomically.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the names in `dir` durable (creates, renames and removes in it).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Bytes free for an unprivileged writer on the file system holding `path`.
    fn available_bytes(&self, path: &Path) -> io::Result<u64>;
    /// Takes the lock file `path` (created if missing), shared or exclusive; waits for it.
    fn lock(&self, path: &Path, shared: bool) -> io::Result<LockGuard>;
    /// Whether some process holds a lock on the file `path` (which must exist); takes no lock.
    fn is_locked(&self, path: &Path) -> io::Result<bool>;

    /// The whole content of `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let file = self.open(path, OpenMode::Read)?;
        let mut content = vec![0u8; usize::try_from(file.size()?).map_err(io::Error::other)?];
        file.read_exact_at(&mut content, 0)?;
        Ok(content)
    }

    /// Replaces `path` with `content` atomically and durably: a temporary file, synced, renamed
    /// over the target, and the directory synced. A reader sees the old content or the new.
    fn write_atomic(&self, path: &Path, content: &[u8]) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
        tmp_name.push(".tmp");
        let tmp = dir.join(tmp_name);
        let file = self.open(&tmp, OpenMode::Truncate)?;
        file.write_all_at(content, 0)?;
        file.sync_all()?;
        drop(file);
        self.rename(&tmp, path)?;
        self.sync_dir(dir)
    }
}

/// The storage the store runs on.
pub type Disk = Arc<dyn Storage>;

/// The real file system.
#[derive(Debug, Default)]
pub struct LocalDisk;

impl LocalDisk {
    /// The real file system, as a [`Disk`].
    pub fn shared() -> Disk {
        Arc::new(LocalDisk)
    }
}

impl StoredFile for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        FileExt::write_at(self, buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }

    fn zero_range(&self, offset: u64, length: u64) -> io::Result<()> {
        sys::zero_range(self, offset, length)
    }

    fn data_segments(&self, offset: u64, length: u64) -> io::Result<Vec<(u64, u64)>> {
        sys::data_segments(self, offset, length)
    }

    fn start_writeback(&self) -> io::Result<()> {
        sys::start_writeback(self)
    }
}

impl Storage for LocalDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StoredFile>> {
        let mut options = fs::OpenOptions::new();
        options.read(true);
        match mode {
            OpenMode::Read => {}
            OpenMode::ReadWrite => {
                options.write(true);
            }
            OpenMode::ReadWriteCreate => {
                options.write(true).create(true).truncate(false);
            }
            OpenMode::Truncate => {
                options.write(true).create(true).truncate(true);
            }
        }
        Ok(Box::new(options.open(path)?))
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        Ok(fs::metadata(path)?.len())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn available_bytes(&self, path: &Path) -> io::Result<u64> {
        sys::available_bytes(path)
    }

    fn lock(&self, path: &Path, shared: bool) -> io::Result<LockGuard> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        sys::lock(&file, shared)?;
        Ok(Box::new(file))
    }

    fn is_locked(&self, path: &Path) -> io::Result<bool> {
        let file = fs::File::open(path)?;
        Ok(!sys::try_lock_exclusive(&file)?)
    }
}

/// Sequential `Read`/`Write`/`Seek` over a [`StoredFile`], for buffered readers and writers.
#[derive(Debug)]
pub struct Cursor {
    file: Box<dyn StoredFile>,
    position: u64,
}

impl Cursor {
    /// Reads or writes `file` from its start.
    pub fn new(file: Box<dyn StoredFile>) -> Self {
        Self { file, position: 0 }
    }

    /// The file.
    pub fn file(&self) -> &dyn StoredFile {
        &*self.file
    }
}

impl Read for Cursor {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.position)?;
        self.position += n as u64;
        Ok(n)
    }
}

impl Write for Cursor {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write_at(buf, self.position)?;
        self.position += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Cursor {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let position = match to {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(delta) => self.file.size()?.checked_add_signed(delta),
            SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
        };
        self.position = position
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.position)
    }
}
