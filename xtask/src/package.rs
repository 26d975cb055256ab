//! `cargo xtask package`: `.deb` and `.rpm` for x86_64 and aarch64, built with `dpkg-deb` and
//! `rpmbuild` from a staged file tree (the binary, both systemd units, the example configs as
//! conffiles / `%config(noreplace)`, and maintainer scripts).
//!
//! The maintainer scripts reload systemd and restart a service only if it was running (an
//! upgrade); they never enable or start one, because nothing can run before the operator has
//! written the configuration. Stopping or upgrading leaves the kernel tracking pinned; purging
//! the deb (or erasing the rpm) removes the pins and the agent's state. Receiver data
//! (`/var/lib/blkmirror/receiver`: replicas and points in time) is never removed by a package
//! script.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, exec, root};

/// Which architectures to package.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchChoice {
    /// x86_64 (amd64).
    X86_64,
    /// aarch64 (arm64).
    Aarch64,
    /// Both.
    All,
}

#[derive(Clone, Copy, Debug)]
struct Arch {
    rust: &'static str,
    deb: &'static str,
    rpm: &'static str,
    strip: &'static str,
}

const X86_64: Arch = Arch {
    rust: "x86_64-unknown-linux-gnu",
    deb: "amd64",
    rpm: "x86_64",
    strip: "strip",
};
const AARCH64: Arch = Arch {
    rust: "aarch64-unknown-linux-gnu",
    deb: "arm64",
    rpm: "aarch64",
    strip: "aarch64-linux-gnu-strip",
};

const SUMMARY: &str = "Block-level disaster-recovery mirror for Linux (eBPF, no kernel module)";
const DESCRIPTION: &str = "blkmirror tracks which blocks of a device change with an eBPF \
program, ships only those blocks over QUIC with mutual TLS to a receiver at the DR site, and \
keeps crash-consistent points in time there. One binary: agent, receiver, and the operator \
commands (status, points, restore, verify, audit verify).";

const POSTINST: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
    # An upgrade: restart what was running (tracking stayed pinned meanwhile).
    if [ "$1" = configure ] && [ -n "$2" ]; then
        systemctl try-restart blkmirror-agent.service blkmirror-receiver.service >/dev/null || true
    fi
fi
if [ "$1" = configure ] && [ -z "$2" ]; then
    echo "blkmirror: edit /etc/blkmirror/agent.toml or receiver.toml (see 'blkmirror config check'),"
    echo "blkmirror: then 'systemctl enable --now blkmirror-agent' or 'blkmirror-receiver'."
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    # Stopping leaves tracking pinned; only purge removes it.
    systemctl stop blkmirror-agent.service blkmirror-receiver.service >/dev/null 2>&1 || true
fi
exit 0
"#;

/// What a purge (deb) or an erase (rpm) removes of the tracking state: the pinned eBPF
/// programs and maps, the completion logs (tracefs instances; the agent's
/// `CompletionLog::remove` in shell, since the binary is gone by then) with the records of
/// their reads, and the agent's generation records.
const PURGE_TRACKING: &str = r#"    rm -rf /sys/fs/bpf/blkmirror
    for log in /sys/kernel/tracing/instances/blkmirror-*; do
        [ -d "$log" ] || continue
        echo 0 > "$log/events/block/block_rq_complete/enable" 2>/dev/null || true
        rmdir "$log" 2>/dev/null || true
    done
    rm -f /run/blkmirror/blkmirror-*.read /run/blkmirror/blkmirror-*.held*
    rm -f /var/lib/blkmirror/agent-*.json /var/lib/blkmirror/track-*.json
"#;

/// The deb's `postrm`.
fn postrm() -> String {
    format!(
        r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
if [ "$1" = purge ]; then
{purge}    rm -rf /etc/blkmirror
    if [ -d /var/lib/blkmirror/receiver ]; then
        echo "blkmirror: receiver data kept in /var/lib/blkmirror/receiver (remove it by hand)"
    fi
fi
exit 0
"#,
        purge = PURGE_TRACKING
    )
}

/// Where the packages go.
pub fn out_dir() -> PathBuf {
    root().join("target/packages")
}

/// Builds the packages. `release`: an optimized, stripped binary (else the debug build, as the
/// tests use).
pub fn run(arch: ArchChoice, release: bool) -> Result<Vec<PathBuf>> {
    let arches: &[Arch] = match arch {
        ArchChoice::X86_64 => &[X86_64],
        ArchChoice::Aarch64 => &[AARCH64],
        ArchChoice::All => &[X86_64, AARCH64],
    };
    let out = out_dir();
    fs::create_dir_all(&out)?;
    let mut made = Vec::new();
    for arch in arches {
        // The host's own architecture builds into target/PROFILE, as the tests' build does.
        let native = cfg!(target_arch = "x86_64") && arch.rpm == "x86_64"
            || cfg!(target_arch = "aarch64") && arch.rpm == "aarch64";
        let mut build = cargo();
        build.args(["build", "--locked", "-p", "blkmirror"]);
        if !native {
            build.args(["--target", arch.rust]);
        }
        if release {
            build.arg("--release");
        }
        exec(&mut build)?;
        let profile = if release { "release" } else { "debug" };
        let binary = if native {
            root().join(format!("target/{profile}/blkmirror"))
        } else {
            root().join(format!("target/{}/{profile}/blkmirror", arch.rust))
        };
        let stage = out.join(format!("stage-{}", arch.deb));
        if stage.exists() {
            fs::remove_dir_all(&stage)?;
        }
        stage_tree(&stage, &binary, arch, release, "lib/systemd/system")?;
        made.push(deb(&stage, arch, &out)?);
        fs::remove_dir_all(&stage)?;
        stage_tree(&stage, &binary, arch, release, "usr/lib/systemd/system")?;
        made.push(rpm(&stage, arch, &out)?);
        fs::remove_dir_all(&stage)?;
    }
    for path in &made {
        eprintln!("xtask package: {}", path.display());
    }
    Ok(made)
}

fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(to.parent().expect("parent"))?;
    fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The application hooks shipped as examples (`/usr/share/blkmirror/hooks/`).
const HOOK_EXAMPLES: [&str; 3] = [
    "postgresql-pre-freeze",
    "mysql-pre-freeze",
    "mysql-post-thaw",
];

/// The installed files, under `stage`.
fn stage_tree(stage: &Path, binary: &Path, arch: &Arch, release: bool, units: &str) -> Result<()> {
    let bin = stage.join("usr/bin/blkmirror");
    install(binary, &bin, 0o755)?;
    if release {
        exec(Command::new(arch.strip).arg(&bin))?;
    }
    for unit in [
        "blkmirror-agent.service",
        "blkmirror-receiver.service",
        "blkmirror-drills.service",
        "blkmirror-drills.timer",
        "blkmirror-drills.path",
    ] {
        install(
            &root().join("packaging/systemd").join(unit),
            &stage.join(units).join(unit),
            0o644,
        )?;
    }
    let etc = stage.join("etc/blkmirror");
    for file in ["agent.toml", "receiver.toml"] {
        install(&root().join("packaging").join(file), &etc.join(file), 0o640)?;
    }
    fs::set_permissions(&etc, fs::Permissions::from_mode(0o750))?;
    let doc = stage.join("usr/share/doc/blkmirror");
    install(&root().join("README.md"), &doc.join("README.md"), 0o644)?;
    for hook in HOOK_EXAMPLES {
        install(
            &root().join("packaging/hooks").join(hook),
            &stage.join("usr/share/blkmirror/hooks").join(hook),
            0o755,
        )?;
    }
    Ok(())
}

fn deb(stage: &Path, arch: &Arch, out: &Path) -> Result<PathBuf> {
    let control = stage.join("DEBIAN");
    fs::create_dir_all(&control)?;
    let installed_kib: u64 = walk_size(stage)? / 1024;
    fs::write(
        control.join("control"),
        format!(
            "Package: blkmirror\nVersion: {}-1\nArchitecture: {}\nMaintainer: blkmirror developers <dev@example.invalid>\nInstalled-Size: {installed_kib}\nDepends: libc6 (>= 2.31)\nSection: admin\nPriority: optional\nHomepage: https://example.invalid/blkmirror\nDescription: {SUMMARY}\n {DESCRIPTION}\n",
            version(),
            arch.deb
        ),
    )?;
    fs::write(
        control.join("conffiles"),
        "/etc/blkmirror/agent.toml\n/etc/blkmirror/receiver.toml\n",
    )?;
    let postrm = postrm();
    for (name, text) in [
        ("postinst", POSTINST),
        ("prerm", PRERM),
        ("postrm", postrm.as_str()),
    ] {
        let path = control.join(name);
        fs::write(&path, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    let path = out.join(format!("blkmirror_{}-1_{}.deb", version(), arch.deb));
    exec(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(stage)
            .arg(&path),
    )?;
    Ok(path)
}

fn walk_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            walk_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn rpm(stage: &Path, arch: &Arch, out: &Path) -> Result<PathBuf> {
    let top = out.join(format!("rpmbuild-{}", arch.rpm));
    if top.exists() {
        fs::remove_dir_all(&top)?;
    }
    fs::create_dir_all(top.join("SPECS"))?;
    let spec = top.join("SPECS/blkmirror.spec");
    let stage = stage.display();
    fs::write(
        &spec,
        format!(
            r#"Name: blkmirror
Version: {version}
Release: 1
Summary: {SUMMARY}
License: MIT OR Apache-2.0
URL: https://example.invalid/blkmirror
AutoReqProv: no
Requires: glibc >= 2.31

%description
{DESCRIPTION}

%install
mkdir -p %{{buildroot}}
cp -a {stage}/. %{{buildroot}}/

%files
%attr(0755,root,root) /usr/bin/blkmirror
%attr(0644,root,root) /usr/lib/systemd/system/blkmirror-agent.service
%attr(0644,root,root) /usr/lib/systemd/system/blkmirror-receiver.service
%attr(0644,root,root) /usr/lib/systemd/system/blkmirror-drills.service
%attr(0644,root,root) /usr/lib/systemd/system/blkmirror-drills.timer
%attr(0644,root,root) /usr/lib/systemd/system/blkmirror-drills.path
%dir %attr(0750,root,root) /etc/blkmirror
%config(noreplace) %attr(0640,root,root) /etc/blkmirror/agent.toml
%config(noreplace) %attr(0640,root,root) /etc/blkmirror/receiver.toml
%doc %attr(0644,root,root) /usr/share/doc/blkmirror/README.md
%attr(0755,root,root) /usr/share/blkmirror/hooks/postgresql-pre-freeze
%attr(0755,root,root) /usr/share/blkmirror/hooks/mysql-pre-freeze
%attr(0755,root,root) /usr/share/blkmirror/hooks/mysql-post-thaw

%post
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || :; fi
if [ "$1" -eq 1 ]; then
    echo "blkmirror: edit /etc/blkmirror/agent.toml or receiver.toml (see 'blkmirror config check'),"
    echo "blkmirror: then 'systemctl enable --now blkmirror-agent' or 'blkmirror-receiver'."
fi

%preun
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop blkmirror-agent.service blkmirror-receiver.service >/dev/null 2>&1 || :
fi

%postun
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || :; fi
if [ "$1" -ge 1 ] && [ -d /run/systemd/system ]; then
    systemctl try-restart blkmirror-agent.service blkmirror-receiver.service >/dev/null 2>&1 || :
fi
if [ "$1" -eq 0 ]; then
{purge}fi
"#,
            version = version(),
            purge = PURGE_TRACKING,
        ),
    )?;
    exec(
        Command::new("rpmbuild")
            .args(["-bb", "--target", arch.rpm])
            .arg("--define")
            .arg(format!("_topdir {}", top.display()))
            .args(["--define", "_build_id_links none"])
            .args(["--define", "__strip /bin/true"])
            .args(["--define", "debug_package %{nil}"])
            .args(["--define", "__os_install_post %{nil}"])
            .args(["--define", "_binary_payload w9.xzdio"])
            .arg(&spec),
    )?;
    let built =
        top.join("RPMS")
            .join(arch.rpm)
            .join(format!("blkmirror-{}-1.{}.rpm", version(), arch.rpm));
    if !built.exists() {
        bail!("rpmbuild did not produce {}", built.display());
    }
    let path = out.join(built.file_name().expect("name"));
    fs::rename(&built, &path)?;
    fs::remove_dir_all(&top)?;
    Ok(path)
}
