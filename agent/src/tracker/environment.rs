//! Checks of the environment the tracker needs, each failing with one line that says what to do.

use std::path::Path;

use crate::tracker::sys;

/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where tracefs is expected (aya looks here, then under debugfs).
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// The kernel's own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Environment problems.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// Not root and lacking capabilities.
    #[error(
        "blkmirror must run as root, or with the capabilities CAP_BPF, CAP_PERFMON and \
         CAP_SYS_ADMIN (missing: {missing})"
    )]
    Privileges {
        /// The missing capability names.
        missing: String,
    },
    /// A pseudo file system is missing and could not be mounted.
    #[error(
        "{fs} is not mounted at {path} and mounting it failed ({source}); run `mount -t {fstype} {fstype} {path}`"
    )]
    PseudoFs {
        /// Human name.
        fs: &'static str,
        /// Mount point.
        path: &'static str,
        /// File system type.
        fstype: &'static str,
        /// Why mounting failed.
        source: std::io::Error,
    },
    /// The kernel lacks `membarrier(MEMBARRIER_CMD_GLOBAL)`.
    #[error(
        "this kernel does not offer membarrier(MEMBARRIER_CMD_GLOBAL) (nohz_full kernels refuse \
         it); blkmirror needs it to cut epochs without losing writes"
    )]
    NoMembarrier,
    /// The verifier rejects BPF atomic operations (added in Linux 5.12).
    #[error(
        "kernel {release} is not supported: blkmirror records changes with BPF atomic \
         operations (atomic OR into the dirty bitmaps, BPF_ATOMIC, Linux 5.12 or later), and this \
         kernel's verifier rejects them"
    )]
    NoBpfAtomics {
        /// `uname -r`.
        release: String,
    },
    /// `--hooks raw` on a kernel where the raw hook cannot work.
    #[error("the raw tracepoint hook is not available on this kernel: {0}")]
    NoRawHook(String),
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Checks for root or the capabilities the tracker needs.
pub fn check_privileges() -> Result<(), EnvError> {
    if sys::euid() == 0 {
        return Ok(());
    }
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0);
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| effective & (1u64 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(EnvError::Privileges {
            missing: missing.join(", "),
        })
    }
}

/// Makes sure bpffs is mounted at [`BPFFS`] (mounting it if needed). Returns true if we mounted.
pub fn ensure_bpffs() -> Result<bool, EnvError> {
    ensure_pseudo_fs("bpffs", BPFFS, "bpf", sys::BPF_FS_MAGIC)
}

/// Makes sure tracefs is mounted at [`TRACEFS`] (mounting it if needed). Returns true if we
/// mounted.
pub fn ensure_tracefs() -> Result<bool, EnvError> {
    ensure_pseudo_fs("tracefs", TRACEFS, "tracefs", sys::TRACEFS_MAGIC)
}

fn ensure_pseudo_fs(
    fs: &'static str,
    path: &'static str,
    fstype: &'static str,
    magic: i64,
) -> Result<bool, EnvError> {
    let target = Path::new(path);
    if sys::fs_type(target).is_ok_and(|t| t == magic) {
        return Ok(false);
    }
    sys::mount(fstype, target, fstype).map_err(|source| EnvError::PseudoFs {
        fs,
        path,
        fstype,
        source,
    })?;
    Ok(true)
}

/// Checks that cuts can wait for an RCU grace period.
pub fn check_membarrier() -> Result<(), EnvError> {
    if sys::membarrier_global_supported() {
        Ok(())
    } else {
        Err(EnvError::NoMembarrier)
    }
}

/// Whether the kernel exposes its BTF (not needed by the classic tracepoint hook; reported so
/// operators know which hooks a later version could use).
pub fn has_vmlinux_btf() -> bool {
    Path::new(VMLINUX_BTF).exists()
}
