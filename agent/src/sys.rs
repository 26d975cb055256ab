//! The thin layer of raw kernel interfaces that aya does not wrap: mmap of BPF array maps,
//! `membarrier`, `BPF_OBJ_GET_INFO_BY_FD`, `flock`, `mount`, `statfs`, and `geteuid`.
//!
//! This is the one module of the agent with `unsafe` code for the kernel interfaces; everything
//! above it is safe Rust.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
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
