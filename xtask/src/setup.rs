//! Installs what a fresh machine of this kind (Debian 12, stable Rust 1.95 by rustup, root)
//! lacks. Every step checks first, so a second run only looks.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::exec;

/// Debian packages: LLVM 22 to build bpf-linker, test tools (fio, file systems, qemu-utils,
/// PostgreSQL, Ceph), the aarch64 cross toolchain.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "fio",
    "bpftool",
    "e2fsprogs",
    "xfsprogs",
    "fdisk",
    "util-linux",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user-static",
    "rpm",
    "strace",
    // `export`, `mount` and `drill` tests: qemu-img, qemu-io, qemu-storage-daemon (FUSE).
    "qemu-utils",
    // The PostgreSQL hook example's root test runs a real server.
    "postgresql",
    // The object-store root test starts a Ceph cluster (monitor, OSDs, RADOS gateway) and
    // makes its bucket with s3cmd.
    "ceph-mon",
    "ceph-osd",
    "radosgw",
    "s3cmd",
];

/// The bpf-linker release known to build against LLVM 22 here.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run_quiet(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn missing_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            run_quiet("dpkg-query", &["-W", "-f=${Status}", pkg])
                .is_none_or(|status| !status.contains("install ok installed"))
        })
        .collect()
}

/// Runs the set-up.
pub fn run() -> Result<()> {
    let missing = missing_packages();
    if !missing.is_empty() {
        eprintln!("xtask setup: installing {}", missing.join(" "));
        exec(Command::new("apt-get").arg("update").arg("-q"))?;
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }

    let installed = run_quiet(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "stable"],
    )
    .context("rustup is needed (the machine's Rust toolchain comes from rustup)")?;
    for component in ["rust-src", "rustfmt", "clippy"] {
        if !installed.lines().any(|l| l.starts_with(component)) {
            exec(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                "stable",
            ]))?;
        }
    }
    let targets = run_quiet(
        "rustup",
        &["target", "list", "--installed", "--toolchain", "stable"],
    )
    .unwrap_or_default();
    if !targets
        .lines()
        .any(|l| l.trim() == "aarch64-unknown-linux-gnu")
    {
        exec(Command::new("rustup").args([
            "target",
            "add",
            "aarch64-unknown-linux-gnu",
            "--toolchain",
            "stable",
        ]))?;
    }

    let linker_ok =
        run_quiet("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !linker_ok {
        eprintln!(
            "xtask setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 3 minutes)"
        );
        exec(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )?;
    }
    if run_quiet("bpf-linker", &["--version"]).is_none() {
        bail!("bpf-linker is not on PATH after installing it; add ~/.cargo/bin to PATH");
    }
    Ok(())
}
