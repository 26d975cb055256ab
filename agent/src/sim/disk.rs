//! The simulator's disk: a [`Storage`] in memory that remembers what is not yet durable.
//!
//! Each file (an inode) keeps its durable content and the writes and resizes made since its
//! last `fsync`; each directory change (create, rename, remove) stays pending until its
//! directory is synced. A **power cut** keeps the durable state plus, of what was pending:
//!
//! * each unsynced write or resize independently (kept, lost, or a write torn to a prefix of
//!   its 512-byte sectors): a page cache flushes in any order;
//! * a prefix, in order, of the unsynced directory changes (a journaling file system commits
//!   its metadata in order).
//!
//! A **fuse** kills the receiver process in the middle of its work: after a given number of
//! storage operations, every operation fails, as if the process were gone; the simulator then
//! restarts it (with or without a power cut).

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use crate::dr::storage::{LockGuard, OpenMode, Storage, StoredFile};

const SECTOR: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    File(usize),
    Dir,
}

#[derive(Debug)]
enum FileOp {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    unsynced: Vec<FileOp>,
}

#[derive(Debug)]
enum NameOp {
    Link(PathBuf, Node),
    Unlink(PathBuf),
    Rename(PathBuf, PathBuf),
}

impl NameOp {
    fn dir(&self) -> PathBuf {
        let path = match self {
            NameOp::Link(path, _) | NameOp::Unlink(path) | NameOp::Rename(_, path) => path,
        };
        path.parent().unwrap_or(Path::new("/")).to_owned()
    }

    fn apply(&self, names: &mut BTreeMap<PathBuf, Node>) {
        match self {
            NameOp::Link(path, node) => {
                names.insert(path.clone(), *node);
            }
            NameOp::Unlink(path) => {
                names.remove(path);
            }
            NameOp::Rename(from, to) => {
                if let Some(node) = names.remove(from) {
                    names.insert(to.clone(), node);
                }
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    inodes: Vec<Inode>,
    names: BTreeMap<PathBuf, Node>,
    durable_names: BTreeMap<PathBuf, Node>,
    pending: Vec<NameOp>,
    /// Operations left before the process dies.
    fuse: Option<u64>,
    dead: bool,
}

impl State {
    /// Counts one operation; fails once the process is dead.
    fn tick(&mut self) -> io::Result<()> {
        if !self.dead {
            match self.fuse {
                Some(0) => self.dead = true,
                Some(left) => self.fuse = Some(left - 1),
                None => {}
            }
        }
        if self.dead {
            return Err(io::Error::other(
                "simulated crash: the receiver process is gone",
            ));
        }
        Ok(())
    }

    fn name(&mut self, op: NameOp) {
        op.apply(&mut self.names);
        self.pending.push(op);
    }

    fn inode(&mut self, id: usize) -> &mut Inode {
        &mut self.inodes[id]
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

/// A deterministic source of choices for a power cut.
pub trait Chooser {
    /// A number below `n`.
    fn below(&mut self, n: u64) -> u64;
}

/// The disk (cheap to clone: clones share it).
#[derive(Clone, Debug, Default)]
pub struct SimDisk(Arc<Mutex<State>>);

impl SimDisk {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("sim disk")
    }

    /// Kills the process after `operations` more storage operations.
    pub fn arm(&self, operations: u64) {
        self.state().fuse = Some(operations);
    }

    /// No fuse: the process lives on.
    pub fn disarm(&self) {
        self.state().fuse = None;
    }

    /// Whether the fuse has gone off.
    pub fn dead(&self) -> bool {
        self.state().dead
    }

    /// The process restarts. With `power_cut`, what was not durable is lost or torn, as the
    /// module docs describe; without, everything written survives (the page cache does).
    pub fn restart(&self, power_cut: bool, choose: &mut dyn Chooser) -> String {
        let mut state = self.state();
        state.fuse = None;
        state.dead = false;
        if !power_cut {
            return String::new();
        }
        let (mut lost, mut torn) = (0, 0);
        for inode in &mut state.inodes {
            let mut data = std::mem::take(&mut inode.durable);
            for op in inode.unsynced.drain(..) {
                match choose.below(4) {
                    0 => {
                        lost += 1;
                        continue;
                    }
                    1 if matches!(op, FileOp::Write { ref bytes, .. } if bytes.len() > SECTOR) => {
                        let FileOp::Write { offset, bytes } = op else {
                            unreachable!()
                        };
                        let sectors = bytes.len().div_ceil(SECTOR) as u64;
                        let keep = (choose.below(sectors) as usize * SECTOR).min(bytes.len());
                        write_into(&mut data, offset, &bytes[..keep]);
                        torn += 1;
                    }
                    _ => match op {
                        FileOp::Write { offset, bytes } => write_into(&mut data, offset, &bytes),
                        FileOp::SetLen(len) => data.resize(len as usize, 0),
                    },
                }
            }
            inode.durable = data.clone();
            inode.data = data;
        }
        let pending = std::mem::take(&mut state.pending);
        let kept = choose.below(pending.len() as u64 + 1) as usize;
        let mut names = std::mem::take(&mut state.durable_names);
        for op in &pending[..kept] {
            op.apply(&mut names);
        }
        state.durable_names = names.clone();
        state.names = names;
        format!(
            "{lost} unsynced writes lost, {torn} torn, {} of {} directory changes kept",
            kept,
            pending.len()
        )
    }

    /// The content of `path` as the running process sees it (for the checks).
    pub fn content(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.state();
        match state.names.get(path) {
            Some(Node::File(id)) => Some(state.inodes[*id].data.clone()),
            _ => None,
        }
    }
}

fn write_into(data: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let end = offset as usize + bytes.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[offset as usize..end].copy_from_slice(bytes);
}

/// An open file of the [`SimDisk`].
#[derive(Debug)]
struct SimFile {
    disk: SimDisk,
    inode: usize,
    writable: bool,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut Inode) -> T) -> io::Result<T> {
        let mut state = self.disk.state();
        state.tick()?;
        Ok(f(state.inode(self.inode)))
    }

    fn writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "opened read-only",
            ))
        }
    }
}

impl StoredFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.with(|inode| {
            let start = (offset as usize).min(inode.data.len());
            let n = buf.len().min(inode.data.len() - start);
            buf[..n].copy_from_slice(&inode.data[start..start + n]);
            n
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.writable()?;
        self.with(|inode| {
            write_into(&mut inode.data, offset, buf);
            inode.unsynced.push(FileOp::Write {
                offset,
                bytes: buf.to_vec(),
            });
            buf.len()
        })
    }

    fn size(&self) -> io::Result<u64> {
        self.with(|inode| inode.data.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        self.with(|inode| {
            inode.data.resize(len as usize, 0);
            inode.unsynced.push(FileOp::SetLen(len));
        })
    }

    fn sync_all(&self) -> io::Result<()> {
        self.with(|inode| {
            inode.durable = inode.data.clone();
            inode.unsynced.clear();
        })
    }

    fn zero_range(&self, offset: u64, length: u64) -> io::Result<()> {
        self.writable()?;
        self.with(|inode| {
            let end = (offset + length).min(inode.data.len() as u64);
            if offset < end {
                let bytes = vec![0u8; (end - offset) as usize];
                write_into(&mut inode.data, offset, &bytes);
                inode.unsynced.push(FileOp::Write { offset, bytes });
            }
        })
    }

    fn data_segments(&self, offset: u64, length: u64) -> io::Result<Vec<(u64, u64)>> {
        // No holes here: everything counts as data (the store then captures more, never less).
        self.with(|inode| {
            let end = (offset + length).min(inode.data.len() as u64);
            if offset < end {
                vec![(offset, end - offset)]
            } else {
                Vec::new()
            }
        })
    }
}

impl Storage for SimDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StoredFile>> {
        let mut state = self.state();
        state.tick()?;
        let inode = match (state.names.get(path).copied(), mode) {
            (Some(Node::Dir), _) => {
                return Err(io::Error::new(io::ErrorKind::IsADirectory, "a directory"));
            }
            (Some(Node::File(id)), OpenMode::Truncate) => {
                let inode = state.inode(id);
                inode.data.clear();
                inode.unsynced.push(FileOp::SetLen(0));
                id
            }
            (Some(Node::File(id)), _) => id,
            (None, OpenMode::Read | OpenMode::ReadWrite) => return Err(not_found(path)),
            (None, OpenMode::ReadWriteCreate | OpenMode::Truncate) => {
                if !matches!(
                    state.names.get(path.parent().unwrap_or(Path::new("/"))),
                    Some(Node::Dir)
                ) {
                    return Err(not_found(path));
                }
                state.inodes.push(Inode::default());
                let id = state.inodes.len() - 1;
                state.name(NameOp::Link(path.to_owned(), Node::File(id)));
                id
            }
        };
        Ok(Box::new(SimFile {
            disk: self.clone(),
            inode,
            writable: mode != OpenMode::Read,
        }))
    }

    fn exists(&self, path: &Path) -> bool {
        self.state().names.contains_key(path)
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        let mut state = self.state();
        state.tick()?;
        match state.names.get(path).copied() {
            Some(Node::File(id)) => Ok(state.inodes[id].data.len() as u64),
            Some(Node::Dir) => Ok(0),
            None => Err(not_found(path)),
        }
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut state = self.state();
        state.tick()?;
        if !matches!(state.names.get(dir), Some(Node::Dir)) {
            return Err(not_found(dir));
        }
        Ok(state
            .names
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.tick()?;
        for ancestor in dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
            match state.names.get(ancestor) {
                Some(Node::Dir) => {}
                Some(Node::File(_)) => {
                    return Err(io::Error::new(io::ErrorKind::AlreadyExists, "a file"));
                }
                None => state.name(NameOp::Link(ancestor.to_owned(), Node::Dir)),
            }
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.tick()?;
        match state.names.get(path) {
            Some(Node::File(_)) => {
                state.name(NameOp::Unlink(path.to_owned()));
                Ok(())
            }
            _ => Err(not_found(path)),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.tick()?;
        if !matches!(state.names.get(from), Some(Node::File(_))) {
            return Err(not_found(from));
        }
        state.name(NameOp::Rename(from.to_owned(), to.to_owned()));
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.tick()?;
        // The directory's changes become durable in order; the others stay pending.
        let pending = std::mem::take(&mut state.pending);
        let mut names = std::mem::take(&mut state.durable_names);
        for op in pending {
            if op.dir() == dir {
                op.apply(&mut names);
            } else {
                state.pending.push(op);
            }
        }
        state.durable_names = names;
        Ok(())
    }

    fn available_bytes(&self, _: &Path) -> io::Result<u64> {
        self.state().tick()?;
        Ok(1 << 40)
    }

    fn lock(&self, _: &Path, _: bool) -> io::Result<LockGuard> {
        // One process at a time in the simulation.
        self.state().tick()?;
        Ok(Box::new(()))
    }

    fn is_locked(&self, _: &Path) -> io::Result<bool> {
        // No exports in the simulation: a pin file never outlives its (absent) holder.
        Ok(false)
    }
}

impl SimDisk {
    /// A disk with `root` (and its parents) as durable directories.
    pub fn with_root(root: &Path) -> Self {
        let disk = Self::default();
        {
            let mut state = disk.state();
            for ancestor in root.ancestors() {
                state.names.insert(ancestor.to_owned(), Node::Dir);
                state.durable_names.insert(ancestor.to_owned(), Node::Dir);
            }
        }
        disk
    }
}
