//! The thin layer of raw kernel interfaces that aya does not wrap: mmap of BPF array maps,
//! `membarrier`, `BPF_OBJ_GET_INFO_BY_FD`, `flock`, `mount`, `statfs`, and `geteuid`.
//!
//! This is the one module of the agent with `unsafe` code for the kernel interfaces; everything
//! above it is safe Rust.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd},
        unix::fs::FileExt as _,
    },
    path::Path,
    ptr::NonNull,
    sync::atomic::AtomicU64,
};

/// A shared, writable mapping of a `BPF_F_MMAPABLE` array map, viewed as `u64` words.
pub struct MappedWords {
    ptr: NonNull<AtomicU64>,
    words: usize,
    len_bytes: usize,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics.
unsafe impl Send for MappedWords {}
// SAFETY: as above; `&MappedWords` hands out only `&[AtomicU64]`.
unsafe impl Sync for MappedWords {}

impl MappedWords {
    /// Maps the first `words` 64-bit words of the array map behind `fd`.
    pub fn map(fd: BorrowedFd<'_>, words: usize) -> io::Result<Self> {
        let page = page_size();
        let len_bytes = (words.max(1) * 8).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of a BPF map fd; the kernel checks that the map is
        // mmap-able and at least `len_bytes` long, and we check the result for MAP_FAILED.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(raw.cast::<AtomicU64>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self {
            ptr,
            words,
            len_bytes,
        })
    }

    /// The mapped words. Every access goes through atomics, so concurrent kernel updates are
    /// well defined.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `len_bytes >= words * 8` long, page aligned (so aligned for
        // AtomicU64), lives as long as `self`, and AtomicU64 allows shared mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }
}

impl Drop for MappedWords {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `map`; no reference outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len_bytes) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(4096)
}

const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;

/// Whether `membarrier(MEMBARRIER_CMD_GLOBAL)` is available (it is not on `nohz_full` kernels).
pub fn membarrier_global_supported() -> bool {
    // SAFETY: membarrier QUERY takes no pointers.
    let mask = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0) };
    mask >= 0 && (mask & libc::c_long::from(MEMBARRIER_CMD_GLOBAL)) != 0
}

/// Waits for an RCU grace period: `membarrier(MEMBARRIER_CMD_GLOBAL)` calls `synchronize_rcu()`.
pub fn membarrier_global() -> io::Result<()> {
    // SAFETY: membarrier GLOBAL takes no pointers.
    let ret = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `union bpf_attr` as used by `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// How often the kernel skipped the program behind `fd` to prevent recursion
/// (`bpf_prog_info.recursion_misses`; stays 0 on kernels that do not count it).
pub fn prog_recursion_misses(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: bpf_prog_info is plain old data; all-zero is a valid value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFdAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?,
        info_len: u32::try_from(std::mem::size_of_val(&info)).unwrap_or(u32::MAX),
        info: (&raw mut info) as u64,
    };
    // SAFETY: `attr` points at `info`, which is valid for `info_len` bytes for the duration of
    // the call; the kernel writes at most that many bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            std::mem::size_of::<InfoByFdAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.recursion_misses)
}

/// Takes an exclusive, non-blocking `flock` on `file`. `Ok(false)` if another holder has it.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock on an fd we own; no pointers.
    let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if ret == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Takes a blocking `flock` on `file`, shared or exclusive. Released when the file closes.
pub fn lock(file: &File, shared: bool) -> io::Result<()> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
    loop {
        // SAFETY: flock on an fd we own; no pointers.
        let ret = unsafe { libc::flock(file.as_raw_fd(), op) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Magic numbers of the pseudo file systems we need.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `TRACEFS_MAGIC`.
pub const TRACEFS_MAGIC: i64 = 0x7472_6163;

/// The `f_type` of the file system holding `path`.
pub fn fs_type(path: &Path) -> io::Result<i64> {
    let c_path = path_to_cstring(path)?;
    // SAFETY: statfs is plain old data; all-zero is valid.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `buf` is a valid out-pointer.
    let ret = unsafe { libc::statfs(c_path.as_ptr(), &raw mut buf) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type is `long` on the 64-bit targets we build for (i64 on x86_64 and aarch64).
    Ok(buf.f_type)
}

/// `mount -t FSTYPE SOURCE TARGET`.
pub fn mount(source: &str, target: &Path, fstype: &str) -> io::Result<()> {
    let source = CString::new(source).map_err(io::Error::other)?;
    let fstype = CString::new(fstype).map_err(io::Error::other)?;
    let target = path_to_cstring(target)?;
    // SAFETY: all strings are NUL-terminated and outlive the call; no data argument.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and takes no arguments.
    unsafe { libc::geteuid() }
}

fn path_to_cstring(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt as _;
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Bytes available to unprivileged writers on the file system holding `path`.
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    let c_path = path_to_cstring(path)?;
    // SAFETY: statvfs is plain old data; all-zero is valid.
    let mut buf: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `buf` is a valid out-pointer.
    let ret = unsafe { libc::statvfs(c_path.as_ptr(), &raw mut buf) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buf.f_bavail.saturating_mul(buf.f_frsize))
}

/// Deallocates `length` bytes at `offset` of a regular file, which then read as zeros; the size
/// is kept. Fails with `EOPNOTSUPP` on file systems without hole punching.
pub fn punch_hole(file: &File, offset: u64, length: u64) -> io::Result<()> {
    let (offset, length) = (
        i64::try_from(offset).map_err(io::Error::other)?,
        i64::try_from(length).map_err(io::Error::other)?,
    );
    // SAFETY: plain syscall on an owned, open descriptor; no pointers.
    let ret = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            length,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts writing back a file's dirty pages without waiting for them (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE` over the whole file). Durability still takes an `fsync`; what this
/// buys is that the `fsync` at a commit finds most of the data already on its way, instead of
/// starting the whole write-back then.
pub fn start_writeback(file: &File) -> io::Result<()> {
    // SAFETY: plain syscall on an owned, open descriptor; no pointers. Offset 0 with length 0
    // names the whole file.
    let ret = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `length` bytes at `offset` of a regular file read as zeros: a punched hole where the
/// file system can, written zeros where it cannot (`EOPNOTSUPP`).
pub fn zero_range(file: &File, offset: u64, length: u64) -> io::Result<()> {
    match punch_hole(file, offset, length) {
        Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            let zeros = vec![0u8; length.min(1 << 20) as usize];
            let mut at = offset;
            while at < offset + length {
                let n = (offset + length - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        other => other,
    }
}

/// The ranges of `[offset, offset + length)` of a regular file that hold data (not holes), by
/// `SEEK_DATA`/`SEEK_HOLE`. A file system without hole support reports the whole range as data.
/// The work is proportional to the number of data segments, not to `length`.
pub fn data_segments(file: &File, offset: u64, length: u64) -> io::Result<Vec<(u64, u64)>> {
    let end = offset.saturating_add(length);
    let seek = |from: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let from = i64::try_from(from).map_err(io::Error::other)?;
        // SAFETY: plain syscall on an owned, open descriptor; no pointers. The shared file
        // offset it moves is not used by this program (all IO is positioned).
        let ret = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
        if ret < 0 {
            let error = io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after `from` before the end of the file.
            if error.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(error);
        }
        Ok(Some(ret as u64))
    };
    let mut segments = Vec::new();
    let mut at = offset;
    while at < end {
        let Some(data) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        segments.push((data, hole - data));
        at = hole;
    }
    Ok(segments)
}

// From <linux/fs.h>: _IOWR('X', 119, int) and _IOWR('X', 120, int).
const FIFREEZE: libc::c_ulong = 0xc004_5877;
const FITHAW: libc::c_ulong = 0xc004_5878;

/// Freezes the file system mounted at the directory `mount`: new writes block and the file
/// system is made consistent on disk. Undo with [`thaw`].
pub fn freeze(mount: &File) -> io::Result<()> {
    // SAFETY: FIFREEZE takes an int argument that the kernel ignores; the fd is open.
    let ret = unsafe { libc::ioctl(mount.as_raw_fd(), FIFREEZE as _, 0) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Thaws a file system frozen with [`freeze`]. `EINVAL` means it was not frozen.
pub fn thaw(mount: &File) -> io::Result<()> {
    // SAFETY: FITHAW takes an int argument that the kernel ignores; the fd is open.
    let ret = unsafe { libc::ioctl(mount.as_raw_fd(), FITHAW as _, 0) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A heap buffer aligned for `O_DIRECT` IO.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is exclusively owned heap memory.
unsafe impl Send for AlignedBuf {}

/// Alignment of [`AlignedBuf`]: enough for any logical block size.
pub const DIRECT_IO_ALIGN: usize = 4096;

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to the alignment).
    pub fn new(len: usize) -> Self {
        let len = len.max(1).div_ceil(DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN;
        let layout = std::alloc::Layout::from_size_align(len, DIRECT_IO_ALIGN)
            .expect("valid size and alignment");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never: at least one alignment unit).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw pointer for registering with io_uring or passing to the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of `len` initialized (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, DIRECT_IO_ALIGN)
            .expect("valid size and alignment");
        // SAFETY: allocated in `new` with exactly this layout, and freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

// From <linux/fs.h>: _IO(0x12, 119).
const BLKDISCARD: libc::c_ulong = 0x1277;

/// Discards `length` bytes at `offset` of a block device (`BLKDISCARD`).
pub fn discard(device: &File, offset: u64, length: u64) -> io::Result<()> {
    let range = [offset, length];
    // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer, which points to a live
    // array of exactly that; the fd is open.
    let ret = unsafe { libc::ioctl(device.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
