//! `blkmirror vm-selftest DEVICE`: the tracker's acceptance check on a scratch disk, for the
//! kernel matrix (`cargo xtask vm-test`), where the guest has only a shell and this binary.
//!
//! It attaches the tracker, writes with `O_DIRECT` at known offsets, discards a known range, and
//! checks that the cuts report exactly those chunks and kinds. Every line it prints starts with
//! `BLKMIRROR-VM:` so the host can find them on the serial console. **It overwrites DEVICE.**

use std::{
    collections::BTreeSet,
    fs::OpenOptions,
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::Path,
};

use crate::{
    tracker::sys::{self, AlignedBuf},
    tracker::track::{HookChoice, TrackOptions, Tracker},
};
use blkmirror_protocol::extent::ChangeKind;

const CHUNK: u64 = 64 << 10;

/// Runs the check; returns a failure reason or `Ok`.
pub fn run(device: &Path, options: &TrackOptions) -> Result<(), String> {
    for note in crate::tracker::track::prepare_environment().map_err(|e| e.to_string())? {
        println!("BLKMIRROR-VM: note: {note}");
    }
    let (mut tracker, _) = Tracker::open(device, options).map_err(|e| e.to_string())?;
    for hook in tracker.hooks() {
        println!("BLKMIRROR-VM: hook: {hook}");
    }
    // Drain whatever the open itself caused.
    tracker.cut().map_err(|e| e.to_string())?;
    tracker.release().map_err(|e| e.to_string())?;

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .map_err(|e| format!("opening {}: {e}", device.display()))?;
    let writes: [(u64, usize); 4] = [
        (0, 4096),
        (CHUNK + 8192, 4096),
        (5 * CHUNK, 3 * CHUNK as usize),
        (40 * CHUNK - 4096, 8192),
    ];
    let mut expected = BTreeSet::new();
    for (offset, len) in writes {
        let mut buffer = AlignedBuf::new(len);
        buffer.as_mut_slice()[..len].fill(0xa5);
        file.write_all_at(&buffer.as_slice()[..len], offset)
            .map_err(|e| format!("O_DIRECT write at {offset}: {e}"))?;
        expected.extend(offset / CHUNK..(offset + len as u64).div_ceil(CHUNK));
    }
    let cut = tracker.cut().map_err(|e| e.to_string())?;
    tracker.release().map_err(|e| e.to_string())?;
    let reported: BTreeSet<u64> = cut
        .extents
        .iter()
        .flat_map(|e| e.offset / CHUNK..(e.offset + e.length).div_ceil(CHUNK))
        .collect();
    if let Some(needs_verify) = &cut.needs_verify {
        return Err(format!(
            "the tracker asked for a verify after writes it saw: {}",
            needs_verify.reason
        ));
    }
    if reported != expected {
        return Err(format!(
            "writes: expected chunks {expected:?}, the tracker reported {reported:?}"
        ));
    }
    println!(
        "BLKMIRROR-VM: PASS writes: exactly the {} chunks written were reported",
        expected.len()
    );

    sys::discard(&file, 64 * CHUNK, 16 * CHUNK).map_err(|e| format!("BLKDISCARD: {e}"))?;
    let cut = tracker.cut().map_err(|e| e.to_string())?;
    tracker.release().map_err(|e| e.to_string())?;
    let discards: Vec<_> = cut
        .extents
        .iter()
        .map(|e| (e.offset, e.length, e.kind))
        .collect();
    if discards != [(64 * CHUNK, 16 * CHUNK, ChangeKind::Discard)] {
        return Err(format!(
            "discard of 1 MiB at 4 MiB: expected one discard extent, got {discards:?}"
        ));
    }
    println!("BLKMIRROR-VM: PASS discard: reported as kind discard");
    if let Some(needs_verify) = cut.needs_verify {
        return Err(format!(
            "the tracker asked for a verify after writes and a discard it saw: {}",
            needs_verify.reason
        ));
    }
    match tracker.cross_check_counts().map_err(|e| e.to_string())? {
        None => println!("BLKMIRROR-VM: note: the disk keeps no I/O statistics: no cross-check"),
        Some(counts) => match counts.sectors {
            Some((disk, hooks)) if disk == hooks => println!(
                "BLKMIRROR-VM: PASS cross-check: the hooks counted the disk's {disk} write and \
                 discard sectors exactly (requests: disk {}, hooks {})",
                counts.disk_requests, counts.hook_requests
            ),
            Some((disk, hooks)) => {
                return Err(format!(
                    "cross-check: the disk completed {disk} write and discard sectors, the \
                     hooks counted {hooks}"
                ));
            }
            None => return Err("the new programs count no sectors".to_owned()),
        },
    }
    Ok(())
}

/// Options for a guest: private pins and state.
pub fn guest_options() -> TrackOptions {
    TrackOptions {
        chunk_bytes: CHUNK,
        pin_root: "/sys/fs/bpf/blkmirror-vm".into(),
        state_dir: "/tmp/blkmirror-vm-state".into(),
        hooks: HookChoice::Auto,
        byte_map: false,
        completion_log_kib_per_cpu: None,
        completion_log_drain_every: crate::tracker::completion_log::DRAIN_EVERY,
    }
}
