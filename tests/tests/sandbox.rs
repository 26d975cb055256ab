//! The units' sandboxes against what the programs really do. The agent (with a file system to
//! freeze, so its thaw guard runs too) and the receiver run two replication cycles
//!
//! * with only the capabilities of the unit's `CapabilityBoundingSet=` (through `setpriv
//!   --bounding-set`; the receiver with none), so a missing capability fails the cycle, and
//! * under `strace -f`, so every system call they make can be checked against the unit's
//!   `SystemCallFilter=`, expanded with `systemd-analyze syscall-filter`.
//!
//! The machine has no systemd as PID 1, so the units cannot be run for real here; this is the
//! next best check.

use std::{collections::BTreeSet, fs, path::Path, process::Command};

use blkmirror_tests::{
    LoopDevice, Mount, blkmirror_bin,
    mirror::{Receiver, Site, write_random},
    require_root,
};

const MIB: u64 = 1 << 20;

/// The system calls a unit's `SystemCallFilter=` allows.
fn allowed_by(unit: &str) -> BTreeSet<String> {
    let text = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/systemd")
            .join(unit),
    )
    .expect("unit file");
    let mut pending: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
        .flat_map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    assert!(!pending.is_empty(), "{unit} has no SystemCallFilter=");
    let (mut allowed, mut seen) = (BTreeSet::new(), BTreeSet::new());
    while let Some(item) = pending.pop() {
        if !item.starts_with('@') {
            allowed.insert(item);
            continue;
        }
        if !seen.insert(item.clone()) {
            continue;
        }
        let out = Command::new("systemd-analyze")
            .args(["syscall-filter", &item])
            .output()
            .expect("systemd-analyze");
        assert!(
            out.status.success(),
            "systemd-analyze syscall-filter {item}"
        );
        for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            pending.push(line.to_owned());
        }
    }
    allowed
}

/// The `setpriv --bounding-set` argument for a unit's `CapabilityBoundingSet=`.
fn bounding_set_of(unit: &str) -> String {
    let text = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/systemd")
            .join(unit),
    )
    .expect("unit file");
    let caps: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .flat_map(|l| {
            l.split_whitespace()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
                .collect::<Vec<_>>()
        })
        .collect();
    std::iter::once("-all".to_owned())
        .chain(caps)
        .collect::<Vec<_>>()
        .join(",")
}

/// Every process below `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let children =
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .flat_map(|child| std::iter::once(child).chain(descendants(child)))
        .collect()
}

/// The system calls in an `strace -f -o` trace.
fn called_in(trace: &Path) -> BTreeSet<String> {
    let text = fs::read_to_string(trace).expect("trace");
    text.lines()
        .filter_map(|line| {
            let rest = line.split_once(' ').map(|(_pid, rest)| rest.trim_start())?;
            if rest.starts_with("<...") || rest.starts_with("+++") || rest.starts_with("---") {
                return None;
            }
            let name = rest.split('(').next()?;
            (!name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .then(|| name.to_owned())
        })
        .collect()
}

#[test]
fn the_units_capabilities_and_syscall_filters_allow_what_agent_and_receiver_do() {
    require_root();
    let site = Site::new("unused");
    let receiver_trace = site.scratch.path.join("receiver.trace");
    let receiver = Receiver::start_wrapped(
        &[
            "strace",
            "-f",
            "-qq",
            "-o",
            receiver_trace.to_str().expect("utf-8"),
        ],
        &site.scratch.path.join("traced-data"),
        &blkmirror_tests::mirror::Id::new(&site.scratch.path, "traced-receiver-id"),
        &[format!("{}=fs", site.agent.fingerprint)],
    );
    let dev = LoopDevice::new(&site.scratch.path, 64 * MIB);
    let mount = Mount::mkfs_and_mount(&dev.path, "ext4", &site.scratch.path);
    fs::write(mount.target.join("file"), vec![7u8; 1 << 20]).expect("write");
    let mut setup = site.setup(&dev.path, "fs");
    setup.receiver = &receiver;
    let agent_trace = site.scratch.path.join("agent.trace");
    let agent_caps = bounding_set_of("blkmirror-agent.service");
    assert!(agent_caps.contains("+bpf"), "{agent_caps}");
    let mut args = vec![
        "--bounding-set".to_owned(),
        agent_caps,
        "--".to_owned(),
        "strace".to_owned(),
        "-f".to_owned(),
        "-qq".to_owned(),
        "-o".to_owned(),
        agent_trace.display().to_string(),
        blkmirror_bin().display().to_string(),
    ];
    args.extend(setup.args(&["--once"]));
    for round in 0..2 {
        if round == 1 {
            write_random(&dev.path, 48 * MIB, MIB);
        }
        let out = Command::new("setpriv")
            .args(&args)
            .output()
            .expect("setpriv agent");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The unit leaves tracefs writable, so the completion log can be made there.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("completion log: tracefs instance"),
            "the sandboxed agent has no completion log: {stderr}"
        );
        let lines = blkmirror_tests::parse_lines(&String::from_utf8_lossy(&out.stdout));
        let point = blkmirror_tests::mirror::last_point(&lines);
        assert_eq!(
            point["consistent"], true,
            "the sandboxed agent could not freeze: {point}"
        );
    }
    // The receiver runs as strace's child: kill it first, or it would outlive strace.
    for pid in descendants(receiver.pid()) {
        blkmirror_tests::signal(pid, libc::SIGKILL);
    }
    drop(receiver);
    drop(mount);

    for (unit, trace) in [
        ("blkmirror-agent.service", &agent_trace),
        ("blkmirror-receiver.service", &receiver_trace),
    ] {
        let allowed = allowed_by(unit);
        let called = called_in(trace);
        assert!(called.len() > 20, "{unit}: only {called:?} seen");
        for needed in ["bpf", "io_uring_setup"] {
            if unit.contains("agent") {
                assert!(
                    called.contains(needed),
                    "{unit}: the agent never called {needed}"
                );
            }
        }
        let blocked: Vec<&String> = called.difference(&allowed).collect();
        assert!(
            blocked.is_empty(),
            "{unit}: SystemCallFilter= would block {blocked:?} (all calls: {called:?})"
        );
    }
}
