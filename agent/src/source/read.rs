//! Reading changed ranges of the source device: io_uring with registered, aligned buffers and
//! many reads in flight; `pread` when io_uring is not available.
//!
//! The device is opened with `O_DIRECT`, so reads bypass (and do not pollute) the page cache of
//! the production host. Every range is cut into pieces of at most the piece size, aligned to the
//! chunk size by the caller. Pieces complete in any order; the sink gets each with its offset.
//!
//! Registered buffers stay pinned by the kernel while a read is in flight, so every path out of
//! [`BlockReader::read`] (errors included) first waits for all submitted reads to complete.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::FileExt as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use io_uring::{IoUring, opcode, types};

use crate::tracker::sys::AlignedBuf;

/// Reader errors.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Opening the device failed.
    #[error("opening {path} for reading: {source}")]
    Open {
        /// The device.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A read failed.
    #[error("reading {length} bytes at {offset} of {path}: {source}")]
    Read {
        /// The device.
        path: PathBuf,
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
        /// The cause.
        source: io::Error,
    },
    /// The consumer of the data failed (e.g. the connection closed).
    #[error("{0}")]
    Sink(String),
}

/// Receives each piece read: its offset and bytes.
pub type PieceSink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), ReadError> + 'a;

/// Which engine to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// io_uring if the kernel allows it, else pread.
    Auto,
    /// io_uring only.
    IoUring,
    /// pread only.
    Pread,
}

/// A reader of one device.
pub struct BlockReader {
    path: PathBuf,
    file: File,
    size: u64,
    piece: usize,
    ring: Option<Ring>,
    spare: AlignedBuf,
    note: Option<String>,
}

struct Ring {
    ring: IoUring,
    buffers: Vec<AlignedBuf>,
    fixed: bool,
}

impl BlockReader {
    /// Opens `path` (`size` bytes) with up to `depth` reads of `piece` bytes in flight.
    pub fn open(
        path: &Path,
        size: u64,
        depth: u32,
        piece: usize,
        engine: Engine,
    ) -> Result<Self, ReadError> {
        let open_error = |source| ReadError::Open {
            path: path.to_owned(),
            source,
        };
        let mut note = None;
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(file) => file,
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                note = Some(format!(
                    "{} does not support O_DIRECT; reading through the page cache",
                    path.display()
                ));
                File::open(path).map_err(open_error)?
            }
            Err(error) => return Err(open_error(error)),
        };
        let depth = depth.clamp(1, 256);
        let ring = match engine {
            Engine::Pread => None,
            Engine::Auto | Engine::IoUring => match Ring::new(depth, piece) {
                Ok(ring) => Some(ring),
                Err(error) if engine == Engine::Auto => {
                    note = Some(format!(
                        "io_uring is not available ({error}; see kernel.io_uring_disabled and \
                         seccomp); reading with pread, one request at a time"
                    ));
                    None
                }
                Err(source) => return Err(open_error(source)),
            },
        };
        Ok(Self {
            path: path.to_owned(),
            file,
            size,
            piece,
            ring,
            spare: AlignedBuf::new(piece),
            note,
        })
    }

    /// `"io_uring"`, `"io_uring (unregistered buffers)"` or `"pread"`.
    pub fn engine(&self) -> &'static str {
        match &self.ring {
            Some(ring) if ring.fixed => "io_uring",
            Some(_) => "io_uring (unregistered buffers)",
            None => "pread",
        }
    }

    /// A one-time remark about a degraded mode, if any.
    pub fn take_note(&mut self) -> Option<String> {
        self.note.take()
    }

    /// Reads every `(offset, length)` range (clipped to the device) and passes each piece to
    /// `sink` as it completes. Returns the bytes read.
    pub fn read(
        &mut self,
        ranges: &[(u64, u64)],
        sink: &mut PieceSink<'_>,
    ) -> Result<u64, ReadError> {
        let piece = self.piece as u64;
        let size = self.size;
        let mut pieces = ranges.iter().flat_map(move |&(offset, length)| {
            let end = offset.saturating_add(length).min(size);
            (offset..end)
                .step_by(piece as usize)
                .map(move |at| (at, (end - at).min(piece) as usize))
        });
        match self.ring.as_mut() {
            None => {
                let mut total = 0;
                for (offset, len) in pieces {
                    let buffer = &mut self.spare.as_mut_slice()[..len];
                    read_full(&self.file, &self.path, buffer, offset)?;
                    sink(offset, buffer)?;
                    total += len as u64;
                }
                Ok(total)
            }
            Some(ring) => ring.read(&self.file, &self.path, &mut pieces, sink),
        }
    }
}

fn read_full(file: &File, path: &Path, buffer: &mut [u8], offset: u64) -> Result<(), ReadError> {
    let mut done = 0;
    while done < buffer.len() {
        match file.read_at(&mut buffer[done..], offset + done as u64) {
            Ok(0) => {
                return Err(ReadError::Read {
                    path: path.to_owned(),
                    offset,
                    length: buffer.len() as u64,
                    source: io::Error::from(io::ErrorKind::UnexpectedEof),
                });
            }
            Ok(n) => done += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ReadError::Read {
                    path: path.to_owned(),
                    offset,
                    length: buffer.len() as u64,
                    source,
                });
            }
        }
    }
    Ok(())
}

impl Ring {
    fn new(depth: u32, piece: usize) -> io::Result<Self> {
        let ring = IoUring::new(depth)?;
        let mut buffers: Vec<AlignedBuf> = (0..depth).map(|_| AlignedBuf::new(piece)).collect();
        let iovecs: Vec<libc::iovec> = buffers
            .iter_mut()
            .map(|buffer| libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: buffer.len(),
            })
            .collect();
        // SAFETY: the buffers live as long as the ring (both are owned by `Ring`, and the ring
        // is dropped first as it is declared first); they are only read by us after the
        // kernel completed the read that filled them.
        let fixed = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();
        Ok(Self {
            ring,
            buffers,
            fixed,
        })
    }

    fn read(
        &mut self,
        file: &File,
        path: &Path,
        pieces: &mut dyn Iterator<Item = (u64, usize)>,
        sink: &mut PieceSink<'_>,
    ) -> Result<u64, ReadError> {
        let depth = self.buffers.len();
        let mut in_flight: Vec<Option<(u64, usize)>> = vec![None; depth];
        let mut free: Vec<usize> = (0..depth).rev().collect();
        let mut total = 0;
        let mut failure: Option<ReadError> = None;
        let mut exhausted = false;
        // A piece taken from `pieces` that did not fit in a full submission queue.
        let mut carried: Option<(u64, usize)> = None;
        loop {
            while failure.is_none() && !exhausted {
                let Some(slot) = free.pop() else { break };
                let Some((offset, len)) = carried.take().or_else(|| pieces.next()) else {
                    free.push(slot);
                    exhausted = true;
                    break;
                };
                let buffer = self.buffers[slot].as_mut_ptr();
                let fd = types::Fd(file.as_raw_fd());
                let entry = if self.fixed {
                    opcode::ReadFixed::new(fd, buffer, len as u32, slot as u16)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Read::new(fd, buffer, len as u32)
                        .offset(offset)
                        .build()
                }
                .user_data(slot as u64);
                // SAFETY: the buffer stays valid and untouched until this entry completes: the
                // slot is out of `free` until its completion is reaped below, and this function
                // returns only once `in_flight` is empty (the loop's one exit), or aborts the
                // process when io_uring_enter fails with entries in flight. No `?` sits between
                // a push and its completion.
                if unsafe { self.ring.submission().push(&entry) }.is_err() {
                    // The submission queue is full: submit and reap below, then come back.
                    carried = Some((offset, len));
                    free.push(slot);
                    break;
                }
                in_flight[slot] = Some((offset, len));
            }
            if in_flight.iter().all(Option::is_none) {
                // Nothing in flight, so nothing the kernel could still write: safe to leave. A
                // carried piece cannot be left behind here, as a full queue means entries
                // in flight.
                debug_assert!(carried.is_none() || failure.is_some());
                break;
            }
            if let Err(source) = self.ring.submit_and_wait(1) {
                if source.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The kernel may still write into our buffers, so unwinding (which frees them)
                // would be unsound: stop the process instead.
                eprintln!("blkmirror: io_uring_enter failed with reads in flight: {source}");
                std::process::abort();
            }
            let done: Vec<(usize, i32)> = self
                .ring
                .completion()
                .map(|cqe| (cqe.user_data() as usize, cqe.result()))
                .collect();
            for (slot, result) in done {
                let Some((offset, len)) = in_flight[slot].take() else {
                    continue;
                };
                free.push(slot);
                if failure.is_some() {
                    continue;
                }
                let buffer = &mut self.buffers[slot].as_mut_slice()[..len];
                let outcome = if result < 0 {
                    Err(ReadError::Read {
                        path: path.to_owned(),
                        offset,
                        length: len as u64,
                        source: io::Error::from_raw_os_error(-result),
                    })
                } else {
                    let got = result as usize;
                    // A short read: finish the piece synchronously.
                    let rest = if got < len {
                        read_full(file, path, &mut buffer[got..], offset + got as u64)
                    } else {
                        Ok(())
                    };
                    rest.and_then(|()| sink(offset, buffer))
                };
                match outcome {
                    Ok(()) => total += len as u64,
                    Err(error) => failure = Some(error),
                }
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 4096 * 7 + i % 251) as u8).collect()
    }

    fn check(engine: Engine) {
        let path =
            std::env::temp_dir().join(format!("blkmirror-read-{}-{engine:?}", std::process::id()));
        let content = pattern(3 << 20);
        std::fs::write(&path, &content).unwrap();
        let mut reader = BlockReader::open(&path, content.len() as u64, 8, 1 << 18, engine)
            .unwrap_or_else(|error| panic!("{error}"));
        let ranges = [
            (0, 4096),
            (65536, 1 << 20),
            (3 << 20, 4096),
            ((3 << 20) - 8192, 65536),
        ];
        let mut got = BTreeMap::new();
        let total = reader
            .read(&ranges, &mut |offset, data| {
                got.insert(offset, data.to_vec());
                Ok(())
            })
            .unwrap();
        // The range beyond the end is clipped away; the last one is clipped to 8 KiB.
        assert_eq!(total, 4096 + (1 << 20) + 8192);
        for (offset, data) in &got {
            let at = *offset as usize;
            assert_eq!(&content[at..at + data.len()], &data[..], "at {offset}");
        }
        let failing = reader.read(&ranges, &mut |_, _| Err(ReadError::Sink("stop".into())));
        assert!(matches!(failing, Err(ReadError::Sink(_))));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn reads_ranges_with_io_uring_or_its_fallback() {
        check(Engine::Auto);
    }

    #[test]
    fn reads_ranges_with_pread() {
        check(Engine::Pread);
    }
}
