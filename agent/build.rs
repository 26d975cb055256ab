//! Builds the eBPF tracker (`ebpf/`) for `bpfel-unknown-none` with aya-build, so that the agent
//! can embed it with `include_bytes_aligned!`.
//!
//! The eBPF crate needs `-Z build-std=core` (no prebuilt `core` exists for the BPF target) and
//! the `core_intrinsics` feature (the BPF target has no `AtomicU64::fetch_or`). Both are
//! unstable, so the nested build runs the stable toolchain with `RUSTC_BOOTSTRAP=1`, as the
//! platform notes prescribe: no nightly toolchain is needed.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|package| package.name.as_str() == "blkmirror-ebpf")
        .ok_or_else(|| anyhow!("blkmirror-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // SAFETY: the build script is single-threaded here; aya-build reads this variable and passes
    // it on to the nested cargo.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    println!("cargo:rerun-if-changed={}", root_dir.join("src"));
    println!("cargo:rerun-if-changed={}", root_dir.join("../common/src"));
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom("stable"))
}
