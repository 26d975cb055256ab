//! The change tracker against real loop devices with the real eBPF program loaded.
//! Needs root. Every test makes its own loop devices, pins and state, and cleans them up.

use std::{
    collections::BTreeSet,
    os::unix::fs::FileExt as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use blkmirror::tracker::track::{HookChoice, TrackOptions, Tracker};
use blkmirror_protocol::extent::ChangeKind;
use blkmirror_tests::{
    AlignedBuf, LoopDevice, Mount, PinRoot, Scratch, TrackProcess, blkdiscard, extents_of,
    open_direct, require_root, sh, track_once, write_direct,
};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * 1024;

fn options(pins: &PinRoot, scratch: &Scratch, chunk_bytes: u64) -> TrackOptions {
    TrackOptions {
        chunk_bytes,
        pin_root: pins.path.clone(),
        state_dir: scratch.path.join("state"),
        hooks: HookChoice::Auto,
        byte_map: false,
        completion_log_kib_per_cpu: None,
        completion_log_drain_every: blkmirror::tracker::completion_log::DRAIN_EVERY,
    }
}

/// How many more sectors the disk completed than the hooks counted since they were attached
/// (cumulative: a skip already reported stays in it).
fn unseen_sectors(tracker: &Tracker) -> u64 {
    let counts = tracker
        .cross_check_counts()
        .expect("counts")
        .expect("loop devices keep statistics");
    let (disk, hooks) = counts.sectors.expect("these programs count sectors");
    disk.saturating_sub(hooks)
}

/// Removes the hooks' links and writes 4 KiB at a time from `first` on, a MiB apart, until
/// the disk's statistics show a write the hooks missed (detaching completes asynchronously,
/// after a grace period). Returns that write's offset.
fn write_until_the_hooks_miss_one(tracker: &Tracker, device: &Path, first: u64) -> u64 {
    for link in ["link", "link_raw"] {
        let path = tracker.pin_dir().join(link);
        if path.exists() {
            std::fs::remove_file(path).expect("remove link pin");
        }
    }
    // The counts are cumulative: a skip already reported (other tests' attaching can cause
    // one) stays in them, so wait for the gap to grow.
    let unseen_before = unseen_sectors(tracker);
    for i in 0..50u64 {
        let at = first + i * MIB;
        write_direct(device, at, 4096, 2);
        if unseen_sectors(tracker) > unseen_before {
            return at;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the hooks still saw writes 5 s after their links were removed");
}

/// Cuts until the tracker reports nothing new: drains what earlier IO (mkfs, set-up) left.
fn drain(tracker: &mut Tracker) {
    let cut = tracker.cut().expect("cut");
    tracker.release().expect("release");
    drop(cut);
}

#[test]
fn direct_writes_report_exactly_their_chunks_with_the_default_hook() {
    direct_writes_report_exactly_their_chunks(HookChoice::Auto);
}

#[test]
fn direct_writes_report_exactly_their_chunks_with_both_hooks() {
    direct_writes_report_exactly_their_chunks(HookChoice::Both);
}

#[test]
fn direct_writes_report_exactly_their_chunks_with_the_classic_hook() {
    direct_writes_report_exactly_their_chunks(HookChoice::Classic);
}

#[test]
fn direct_writes_report_exactly_their_chunks_with_the_raw_hook() {
    direct_writes_report_exactly_their_chunks(HookChoice::Raw);
}

fn direct_writes_report_exactly_their_chunks(hooks: HookChoice) {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    let dev = LoopDevice::new(&scratch.path, 256 * MIB);
    let opts = TrackOptions {
        hooks,
        ..options(&pins, &scratch, CHUNK)
    };
    let (mut tracker, needs_verify) = Tracker::open(&dev.path, &opts).expect("open tracker");
    let expected_mask = match hooks {
        HookChoice::Both => 3,
        HookChoice::Auto => 2,
        HookChoice::Classic => 1,
        HookChoice::Raw => 2,
    };
    assert_eq!(tracker.hook_mask(), expected_mask, "{:?}", tracker.hooks());
    // On x86 the cut waits on the programs' invocation counts, not on an RCU grace period
    // (which makes Linux 6.18 skip programs); the counts are what this test's cuts rely on.
    if cfg!(target_arch = "x86_64") {
        assert!(
            tracker
                .hooks()
                .iter()
                .any(|hook| hook.starts_with("epoch switch: waits for the programs' per-CPU")),
            "{:?}",
            tracker.hooks()
        );
    }
    assert!(
        needs_verify.is_some(),
        "a first tracking must say the past is unknown"
    );
    drain(&mut tracker);

    // Known offsets: inside one chunk, across a chunk boundary, a large run, the last chunk.
    let writes: [(u64, usize); 5] = [
        (4096, 4096),                        // chunk 0
        (CHUNK * 10 + 61_440, 8192),         // chunks 10 and 11 (crosses the boundary)
        (CHUNK * 100, (CHUNK * 3) as usize), // chunks 100..103
        (CHUNK * 2000 + 4096, 4096),         // chunk 2000
        (256 * MIB - 4096, 4096),            // last chunk
    ];
    for (offset, len) in writes {
        write_direct(&dev.path, offset, len, 0xab);
    }
    let cut = tracker.cut().expect("cut");
    tracker.release().expect("release");
    let reported: BTreeSet<u64> = cut
        .extents
        .iter()
        .flat_map(|e| {
            assert_eq!(e.kind, ChangeKind::Write);
            (e.offset / CHUNK)..((e.offset + e.length).div_ceil(CHUNK))
        })
        .collect();
    let mut expected = BTreeSet::new();
    for (offset, len) in writes {
        for c in (offset / CHUNK)..=((offset + len as u64 - 1) / CHUNK) {
            expected.insert(c);
        }
    }
    assert_eq!(reported, expected, "extents: {:?}", cut.extents);
    // Adjacent chunks are merged: chunks 100..103 form one extent.
    assert!(
        cut.extents
            .iter()
            .any(|e| e.offset == CHUNK * 100 && e.length == CHUNK * 3),
        "{:?}",
        cut.extents
    );
    // Nothing happened since: the next epoch is empty.
    let next = tracker.cut().expect("cut");
    assert!(next.extents.is_empty(), "{:?}", next.extents);
}

#[test]
fn cli_reports_direct_writes_as_json() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    let state = scratch.path.join("state");
    let dev = LoopDevice::new(&scratch.path, 64 * MIB);
    let mut track = TrackProcess::start(
        &pins,
        &state,
        &dev.path,
        &["--interval", "100ms", "--chunk-size", "4KiB"],
    );
    write_direct(&dev.path, 40_960, 4096, 1); // chunk 10
    write_direct(&dev.path, 8 * MIB, 12_288, 2); // chunks 2048..2051
    let lines = track.collect_until(Duration::from_secs(10), |lines| {
        extents_of(lines, "write").len() >= 2
    });
    let writes = extents_of(&lines, "write");
    assert_eq!(writes, vec![(40_960, 4096), (8 * MIB, 12_288)], "{lines:?}");
    for line in &lines {
        if line.get("kind").is_some() {
            assert_eq!(line["device"], dev.as_str());
            assert!(line["epoch"].as_u64().is_some());
        }
    }
    let first = &lines[0];
    assert_eq!(first["event"], "needs_verify", "first line: {first}");
}

/// A loop device with a fresh file system, mounted, tracked, and drained of the set-up's IO.
/// Fields drop in order: tracker, then mount, then device.
struct TrackedFs {
    tracker: Tracker,
    mount: Mount,
    _dev: LoopDevice,
}

impl TrackedFs {
    fn new(scratch: &Scratch, pins: &PinRoot, size: u64, fstype: &str) -> Self {
        let dev = LoopDevice::new(&scratch.path, size);
        let mount = Mount::mkfs_and_mount(&dev.path, fstype, &scratch.path);
        let (mut tracker, _) =
            Tracker::open(&dev.path, &options(pins, scratch, CHUNK)).expect("open");
        sh("sync", &[]);
        drain(&mut tracker);
        Self {
            tracker,
            mount,
            _dev: dev,
        }
    }
}

#[test]
fn buffered_writes_and_ext4_file_extents_are_covered() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    let mut fs = TrackedFs::new(&scratch, &pins, 256 * MIB, "ext4");
    let (tracker, mount) = (&mut fs.tracker, &fs.mount);

    // A 5 MiB file written through the page cache, then fsync'd.
    let file_path = mount.target.join("data.bin");
    {
        use std::io::Write as _;
        let mut file = std::fs::File::create(&file_path).expect("create file");
        let block: Vec<u8> = (0..65_536u32).map(|i| (i * 7 % 251) as u8).collect();
        for _ in 0..80 {
            file.write_all(&block).expect("write");
        }
        file.sync_all().expect("fsync");
    }
    let cut = tracker.cut().expect("cut");
    tracker.release().expect("release");
    let reported: BTreeSet<u64> = cut
        .extents
        .iter()
        .flat_map(|e| (e.offset / CHUNK)..((e.offset + e.length).div_ceil(CHUNK)))
        .collect();

    // Physical extents of the file, in 4 KiB blocks, from filefrag.
    let frag = sh(
        "filefrag",
        &["-v", "-b4096", file_path.to_str().expect("path")],
    );
    let mut physical_blocks = 0u64;
    for line in frag.lines() {
        let fields: Vec<&str> = line.split(':').map(str::trim).collect();
        if fields.len() < 4 || fields[0].parse::<u64>().is_err() {
            continue;
        }
        let (start, end) = fields[2].split_once("..").expect("physical range");
        let (start, end): (u64, u64) = (
            start.trim().parse().expect("start"),
            end.trim().parse().expect("end"),
        );
        for block in start..=end {
            physical_blocks += 1;
            let chunk = block * 4096 / CHUNK;
            assert!(
                reported.contains(&chunk),
                "block {block} (chunk {chunk}) of the file not reported; filefrag:\n{frag}"
            );
        }
    }
    assert_eq!(physical_blocks, 80 * 16, "filefrag output:\n{frag}");
}

#[test]
fn partition_writes_are_relative_and_other_partitions_ignored() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    // p1: sectors 2048..133119 (64 MiB), p2: after it.
    let dev = LoopDevice::with_options(
        &scratch.path,
        160 * MIB,
        Some("label: dos\nstart=2048, size=131072, type=83\nstart=133120, type=83\n"),
    );
    let p1 = dev.partition(1);
    let p2 = dev.partition(2);
    let (mut tracker, _) = Tracker::open(&p1, &options(&pins, &scratch, CHUNK)).expect("open p1");
    assert_eq!(tracker.device().start_sector, 2048);
    drain(&mut tracker);

    write_direct(&p1, 8 * MIB, 4096, 3); // p1-relative 8 MiB
    write_direct(&p2, MIB, 65_536, 4); // p2: not tracked
    // Through the whole disk, into p1's range: p1-relative 32 MiB.
    write_direct(&dev.path, 2048 * 512 + 32 * MIB, 4096, 5);
    // Through the whole disk, before p1 (the partition table area): not tracked.
    write_direct(&dev.path, 0, 4096, 6);
    let cut = tracker.cut().expect("cut");
    let got: Vec<(u64, u64)> = cut.extents.iter().map(|e| (e.offset, e.length)).collect();
    assert_eq!(
        got,
        vec![(8 * MIB, CHUNK), (32 * MIB, CHUNK)],
        "{:?}",
        cut.extents
    );
}

#[test]
fn discard_and_write_zeroes_have_their_kinds_with_the_default_hook() {
    discard_and_write_zeroes_have_their_kinds("auto");
}

#[test]
fn discard_and_write_zeroes_have_their_kinds_with_both_hooks() {
    discard_and_write_zeroes_have_their_kinds("both");
}

#[test]
fn discard_and_write_zeroes_have_their_kinds_with_the_classic_hook() {
    discard_and_write_zeroes_have_their_kinds("classic");
}

#[test]
fn discard_and_write_zeroes_have_their_kinds_with_the_raw_hook() {
    discard_and_write_zeroes_have_their_kinds("raw");
}

fn discard_and_write_zeroes_have_their_kinds(hooks: &str) {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    let state = scratch.path.join("state");
    let dev = LoopDevice::new(&scratch.path, 128 * MIB);
    let mut track = TrackProcess::start(
        &pins,
        &state,
        &dev.path,
        &["--interval", "100ms", "--hooks", hooks],
    );
    blkdiscard(&dev.path, false, 16 * MIB, 8 * MIB);
    blkdiscard(&dev.path, true, 64 * MIB, 2 * MIB);
    // A discard that starts mid-chunk: its partial chunk must be a write (data kept there).
    blkdiscard(&dev.path, false, 96 * MIB + 4096, MIB - 4096);
    let lines = track.collect_until(Duration::from_secs(10), |lines| {
        !extents_of(lines, "zeroes").is_empty() && extents_of(lines, "discard").len() >= 2
    });
    let discards = extents_of(&lines, "discard");
    let zeroes = extents_of(&lines, "zeroes");
    let writes = extents_of(&lines, "write");
    assert_eq!(
        discards,
        vec![(16 * MIB, 8 * MIB), (96 * MIB + CHUNK, MIB - CHUNK)],
        "{lines:?}"
    );
    assert_eq!(zeroes, vec![(64 * MIB, 2 * MIB)], "{lines:?}");
    assert_eq!(writes, vec![(96 * MIB, CHUNK)], "{lines:?}");
    // The first line is the new generation's; after it, the cross-check must have found the
    // hooks' sectors equal to the disk's (discard and write-zeroes included).
    let verifies: Vec<_> = lines
        .iter()
        .skip(1)
        .filter(|line| line["event"] == "needs_verify")
        .collect();
    assert!(verifies.is_empty(), "{verifies:?}");
}

/// One write of the no-lost-write test's writer.
#[derive(Debug)]
#[expect(
    dead_code,
    reason = "fields are read through Debug in the failure message"
)]
struct WriteRecord {
    seq: u64,
    offset: u64,
    len: u64,
    issued: Duration,
    done: Duration,
}

/// One cut of the no-lost-write test.
struct CutRecord {
    epoch: u64,
    /// When the cut started, since the test's start.
    at: Duration,
    /// Reported extents (offset, length).
    extents: Vec<(u64, u64)>,
}

impl CutRecord {
    fn covers(&self, byte: u64) -> bool {
        self.extents.iter().any(|(o, l)| *o <= byte && byte < o + l)
    }
}

/// The no-lost-write proof: a writer hammers random blocks while we cut every few milliseconds
/// and copy each reported chunk into a shadow. At the end the shadow equals the device.
#[test]
fn no_write_is_lost_across_thousands_of_cuts() {
    no_write_is_lost(HookChoice::Auto, 3000);
}

/// The other hook sets must be complete too (the default runs the raw hook).
#[test]
fn no_write_is_lost_with_the_classic_hook_and_with_both() {
    no_write_is_lost(HookChoice::Classic, 1000);
    no_write_is_lost(HookChoice::Both, 1000);
}

/// The byte map (kernels before 5.12, no BPF atomic OR) must be just as complete; forced here
/// on a kernel that has atomics.
#[test]
fn no_write_is_lost_with_the_byte_map_of_old_kernels() {
    no_write_is_lost_with(HookChoice::Auto, 1000, true, false);
}

/// The same proof while trackers of another device are attached and detached all the time,
/// each with its completion log made and removed: on Linux 6.18 every such probe change can
/// make the kernel skip this tracker's programs for a completion. The cross-check must find
/// each skip, and the completion log should give it back without a full copy.
#[test]
fn no_write_is_lost_while_other_trackers_come_and_go() {
    no_write_is_lost_with(HookChoice::Auto, 1000, false, true);
}

fn no_write_is_lost(hooks: HookChoice, min_cuts: u64) {
    no_write_is_lost_with(hooks, min_cuts, false, false);
}

fn no_write_is_lost_with(hooks: HookChoice, min_cuts: u64, byte_map: bool, churn: bool) {
    require_root();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    const SIZE: u64 = 32 * MIB;
    const CHUNK_4K: u64 = 4096;
    let dev = LoopDevice::new(&scratch.path, SIZE);
    let opts = TrackOptions {
        hooks,
        byte_map,
        ..options(&pins, &scratch, CHUNK_4K)
    };
    let (mut tracker, _) = Tracker::open(&dev.path, &opts).expect("open");
    if byte_map {
        assert!(
            tracker
                .hooks()
                .iter()
                .any(|h| h.contains("a byte per chunk")),
            "the byte map is not in use: {:?}",
            tracker.hooks()
        );
    }
    drain(&mut tracker);

    // Initial copy: the shadow starts equal to the (all-zero) device.
    let mut shadow = vec![0u8; SIZE as usize];
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    // Each write's data is `seq + i` (as bytes), so any byte tells which write put it there.
    let writer = {
        let stop = stop.clone();
        let writes = writes.clone();
        let path = dev.path.clone();
        std::thread::spawn(move || {
            let file = open_direct(&path);
            let mut buf = AlignedBuf::new(64 * 1024);
            let mut rng: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
            let mut log: Vec<WriteRecord> = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                // Mostly 4 KiB writes; every 8th one 64 KiB (spanning 16 chunks).
                let len = if rng.is_multiple_of(8) { 65_536 } else { 4096 };
                let offset = (rng >> 8) % ((SIZE - len) / 4096) * 4096;
                n += 1;
                for (i, byte) in buf.as_mut_slice()[..len as usize].iter_mut().enumerate() {
                    *byte = (n as u8).wrapping_add(i as u8);
                }
                let issued = t0.elapsed();
                file.write_all_at(&buf.as_slice()[..len as usize], offset)
                    .expect("write");
                log.push(WriteRecord {
                    seq: n,
                    offset,
                    len,
                    issued,
                    done: t0.elapsed(),
                });
                writes.fetch_add(1, Ordering::Relaxed);
            }
            log
        })
    };

    // Trackers of a second device, attached and detached until the end.
    let churner = churn.then(|| {
        let stop = stop.clone();
        let other = LoopDevice::new(&scratch.path, 8 * MIB);
        let opts = opts.clone();
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (tracker, _) = Tracker::open(&other.path, &opts).expect("open the other");
                drop(tracker);
                blkmirror::tracker::track::untrack(&other.path, &opts).expect("untrack");
                rounds += 1;
                std::thread::sleep(Duration::from_millis(30));
            }
            rounds
        })
    });

    let reader = open_direct(&dev.path);
    let mut read_buf = AlignedBuf::new(1 << 20);
    // Per cut: epoch, time before the cut, and the extents it reported.
    let mut cut_log: Vec<CutRecord> = Vec::new();
    let mut verifies = 0u64;
    let mut recovered = 0u64;
    // With BLKMIRROR_TRACE_MARKERS set, cuts are marked in the ftrace buffer, to line them up
    // with block_rq_complete events when investigating a failure.
    let mut marker = std::env::var_os("BLKMIRROR_TRACE_MARKERS").and_then(|_| {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/sys/kernel/tracing/trace_marker")
            .ok()
    });
    let mut mark = move |text: String| {
        if let Some(file) = marker.as_mut() {
            use std::io::Write as _;
            let _ = file.write_all(text.as_bytes());
        }
    };
    let mut copy =
        |tracker: &mut Tracker, shadow: &mut Vec<u8>, cut_log: &mut Vec<CutRecord>| -> u64 {
            let before = t0.elapsed();
            mark(format!("cut start epoch {}", tracker.epoch()));
            let mut cut = tracker.cut().expect("cut");
            mark(format!(
                "cut done epoch {} extents {}",
                cut.epoch,
                cut.extents.len()
            ));
            if cut.recovered.is_some() {
                recovered += 1;
            }
            if let Some(needs_verify) = &cut.needs_verify {
                // The tracker may have missed something and says so: do what an agent does, a full
                // verify (here: copy everything). The shadow must still end equal to the device.
                eprintln!(
                    "{hooks:?}: epoch {}: needs verify: {}",
                    cut.epoch, needs_verify.reason
                );
                verifies += 1;
                cut.extents = vec![blkmirror_protocol::extent::Extent {
                    offset: 0,
                    length: SIZE,
                    kind: ChangeKind::Write,
                }];
            }
            let mut copied = 0;
            for extent in &cut.extents {
                assert_eq!(extent.kind, ChangeKind::Write);
                let mut done = 0;
                while done < extent.length {
                    let len = (extent.length - done).min(1 << 20) as usize;
                    let at = extent.offset + done;
                    reader
                        .read_exact_at(&mut read_buf.as_mut_slice()[..len], at)
                        .expect("read");
                    shadow[at as usize..at as usize + len]
                        .copy_from_slice(&read_buf.as_slice()[..len]);
                    done += len as u64;
                }
                copied += extent.length;
            }
            cut_log.push(CutRecord {
                epoch: cut.epoch,
                at: before,
                extents: cut.extents.iter().map(|e| (e.offset, e.length)).collect(),
            });
            mark(format!("release epoch {}", cut.epoch));
            tracker.release().expect("release");
            mark(format!("released epoch {}", cut.epoch));
            copied
        };

    let started = Instant::now();
    let mut cuts = 0u64;
    let mut copied = 0u64;
    // With churn, long enough for many attach/detach rounds (each takes about 200 ms).
    let least = Duration::from_secs(if churn { 10 } else { 3 });
    while cuts < min_cuts || started.elapsed() < least {
        copied += copy(&mut tracker, &mut shadow, &mut cut_log);
        cuts += 1;
        std::thread::sleep(Duration::from_millis(1));
        if started.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let write_log = writer.join().expect("writer");
    let churned = churner.map(|churner| churner.join().expect("the other trackers"));
    copied += copy(&mut tracker, &mut shadow, &mut cut_log);

    let device = {
        let mut all = AlignedBuf::new(SIZE as usize);
        reader
            .read_exact_at(all.as_mut_slice(), 0)
            .expect("read device");
        all.as_slice().to_vec()
    };
    let total_writes = writes.load(Ordering::Relaxed);
    let (classic_events, raw_events) = tracker.events_seen().expect("stats");
    let misses = tracker.recursion_misses().expect("misses");
    eprintln!(
        "{hooks:?}: {cuts} cuts, {total_writes} writes, {copied} bytes copied, {verifies} full \
         verifies, {recovered} cuts filled from the completion log; events seen: classic \
         {classic_events}, raw {raw_events}; recursion misses (classic, raw) {misses:?}; \
         other trackers attached and detached: {churned:?}"
    );
    assert!(cuts >= min_cuts, "only {cuts} cuts");
    if churn {
        // At this write rate the log reaches back seconds, far past a cut's window.
        assert_eq!(
            verifies, 0,
            "every skip must be filled from the completion log, not by a full copy"
        );
    }
    // Kernel-side skips are rare; a tracker that asks for a verify every few cuts is broken.
    assert!(
        verifies * 20 <= cuts,
        "{verifies} full verifies in {cuts} cuts"
    );
    assert!(total_writes >= 1000, "only {total_writes} writes");
    if let Some(first) = (0..SIZE as usize).find(|&i| shadow[i] != device[i]) {
        let first = first as u64;
        let chunk = first / CHUNK_4K;
        // Which writes touched this byte, and which cuts reported its chunk afterwards.
        let touching: Vec<_> = write_log
            .iter()
            .filter(|w| w.offset <= first && first < w.offset + w.len)
            .rev()
            .take(3)
            .collect();
        let last_done = touching.first().map_or(Duration::ZERO, |w| w.done);
        let reports: Vec<_> = cut_log
            .iter()
            .filter(|c| c.at + Duration::from_millis(50) >= last_done && c.covers(first))
            .map(|c| (c.epoch, c.at))
            .take(5)
            .collect();
        let cuts_after: Vec<_> = cut_log
            .iter()
            .filter(|c| c.at + Duration::from_millis(20) >= last_done)
            .take(3)
            .map(|c| (c.epoch, c.at))
            .collect();
        panic!(
            "shadow differs from the device at byte {first} (chunk {chunk}): a write was lost. \
             shadow byte {} device byte {}; last writes there: {touching:?}; cuts reporting the chunk since: {reports:?}; first cuts after the \
             last write: {cuts_after:?}",
            shadow[first as usize], device[first as usize],
        );
    }
}

/// Pins of an earlier version, whose programs count no sectors (their `stats` map has 8
/// entries), are not adopted: their request-only cross-check can miss a skipped completion, so
/// a new generation starts and says why.
#[test]
fn pins_whose_programs_count_no_sectors_are_replaced() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    let dev = LoopDevice::new(&scratch.path, 64 * MIB);
    let opts = options(&pins, &scratch, CHUNK);
    let (tracker, _) = Tracker::open(&dev.path, &opts).expect("open");
    let stats = tracker.pin_dir().join("stats");
    drop(tracker);
    // The earlier version's statistics map, in place of this one's.
    std::fs::remove_file(&stats).expect("remove the stats pin");
    sh(
        "bpftool",
        &[
            "map",
            "create",
            stats.to_str().expect("utf-8"),
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "8",
            "name",
            "STATS",
        ],
    );
    let (tracker, needs_verify) = Tracker::open(&dev.path, &opts).expect("reopen");
    let reason = needs_verify.expect("a new generation").reason;
    assert!(reason.contains("count no sectors"), "{reason}");
    assert_eq!(tracker.origin(), blkmirror::tracker::track::Origin::Created);
    let counts = tracker
        .cross_check_counts()
        .expect("counts")
        .expect("loop devices keep statistics");
    assert!(counts.sectors.is_some(), "{counts:?}");
}

#[test]
fn restart_reports_writes_made_while_down_and_lost_pins_need_verify() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    let state = scratch.path.join("state");
    let dev = LoopDevice::new(&scratch.path, 64 * MIB);

    let (out, lines) = track_once(&pins, &state, &dev.path, 1, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines[0]["event"], "needs_verify", "{lines:?}");

    // Written while no blkmirror process runs: the pinned program records it.
    write_direct(&dev.path, 5 * MIB, 4096, 9);
    let (out, lines) = track_once(&pins, &state, &dev.path, 1, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resumed pinned tracking"), "{stderr}");
    assert!(
        lines.iter().all(|l| l.get("event").is_none()),
        "no gap expected: {lines:?}"
    );
    assert_eq!(
        extents_of(&lines, "write"),
        vec![(5 * MIB, CHUNK)],
        "{lines:?}"
    );

    // Pins removed (as by a reboot): the next start must report a new generation.
    let out = blkmirror_tests::blkmirror()
        .arg("untrack")
        .arg(&dev.path)
        .args(blkmirror_tests::state_args(&pins, &state))
        .output()
        .expect("untrack");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    write_direct(&dev.path, 6 * MIB, 4096, 9);
    let (out, lines) = track_once(&pins, &state, &dev.path, 1, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines[0]["event"], "needs_verify", "{lines:?}");
    assert!(
        lines[0]["reason"].as_str().unwrap_or("").contains("gone"),
        "{lines:?}"
    );

    // A different chunk size cannot continue the generation either.
    let (out, lines) = track_once(&pins, &state, &dev.path, 1, &["--chunk-size", "4KiB"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lines[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("chunk size changed"),
        "{lines:?}"
    );
}

#[test]
fn interrupted_cut_is_reported_again_by_the_next_process() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    let dev = LoopDevice::new(&scratch.path, 64 * MIB);
    let opts = options(&pins, &scratch, CHUNK);
    {
        let (mut tracker, _) = Tracker::open(&dev.path, &opts).expect("open");
        drain(&mut tracker);
        write_direct(&dev.path, 3 * MIB, 4096, 1);
        // Cut, but "crash" before release: the data must not be lost.
        let cut = tracker.cut().expect("cut");
        assert_eq!(cut.extents.len(), 1);
    }
    write_direct(&dev.path, 7 * MIB, 4096, 2);
    let (mut tracker, needs_verify) = Tracker::open(&dev.path, &opts).expect("reopen");
    assert!(needs_verify.is_none(), "{needs_verify:?}");
    let cut = tracker.cut().expect("cut");
    let got: Vec<u64> = cut.extents.iter().map(|e| e.offset).collect();
    assert_eq!(got, vec![3 * MIB, 7 * MIB], "{:?}", cut.extents);
}

fn run_blkmirror(args: &[&str]) -> std::process::Output {
    blkmirror_tests::blkmirror()
        .args(args)
        .output()
        .expect("run blkmirror")
}

#[test]
fn bad_inputs_and_environments_get_one_clear_line_and_exit_code() {
    require_root();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    let state = scratch.path.join("state");
    let state_args = blkmirror_tests::state_args(&pins, &state);
    let state_args: Vec<&str> = state_args.iter().map(String::as_str).collect();

    // Not a block device.
    let file = scratch.path.join("plain");
    std::fs::write(&file, b"x").expect("file");
    let out = run_blkmirror(&[&["track", file.to_str().expect("path")], &state_args[..]].concat());
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a block device"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // Missing device.
    let out = run_blkmirror(&[&["track", "/dev/does-not-exist"], &state_args[..]].concat());
    assert_eq!(out.status.code(), Some(4));

    // Bad chunk size.
    let dev = LoopDevice::new(&scratch.path, 16 * MIB);
    let out = run_blkmirror(
        &[
            &["track", dev.as_str(), "--chunk-size", "3KiB"],
            &state_args[..],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
    let out = run_blkmirror(
        &[
            &["track", dev.as_str(), "--chunk-size", "lots"],
            &state_args[..],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(2));

    // Not root: drop privileges with setpriv.
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(blkmirror_tests::blkmirror_bin())
        .args(["track", dev.as_str()])
        .args(&state_args)
        .output()
        .expect("setpriv");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("must run as root"));

    // A second tracker on the same device is refused.
    let mut first = TrackProcess::start(&pins, &state, &dev.path, &["--interval", "100ms"]);
    let out = run_blkmirror(&[&["track", dev.as_str(), "--count", "1"], &state_args[..]].concat());
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already being tracked"));
    assert_eq!(
        first.wait(Duration::from_millis(1)),
        None,
        "the first tracker must keep running"
    );
}

#[test]
fn vanishing_device_stops_tracking_with_an_error() {
    require_root();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    let state = scratch.path.join("state");
    let dev = LoopDevice::new(&scratch.path, 16 * MIB);
    let mut track = TrackProcess::start(&pins, &state, &dev.path, &["--interval", "50ms"]);
    dev.detach();
    let code = track.wait(Duration::from_secs(10));
    assert_eq!(code, Some(4), "stderr: {}", track.stderr_text());
    assert!(
        track.stderr_text().contains("vanished"),
        "{}",
        track.stderr_text()
    );
}

#[test]
fn xfs_metadata_and_data_writes_are_reported() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    let mut fs = TrackedFs::new(&scratch, &pins, 512 * MIB, "xfs");
    let (tracker, mount) = (&mut fs.tracker, &fs.mount);
    let path = mount.target.join("f");
    std::fs::write(&path, vec![7u8; 3 * MIB as usize]).expect("write");
    sh("sync", &[]);
    let cut = tracker.cut().expect("cut");
    let written: u64 = cut
        .extents
        .iter()
        .filter(|e| e.kind == ChangeKind::Write)
        .map(|e| e.length)
        .sum();
    assert!(
        written >= 3 * MIB,
        "only {written} bytes reported for a 3 MiB file: {:?}",
        cut.extents
    );
}

/// The cross-check against the disk's own statistics: writes the hooks never saw (here because
/// someone removed the link pins under a running tracker, which detaches the programs) must
/// turn into needs_verify, not into silence.
///
/// First, the hooks' sector counts must equal the disk's exactly over ext4's writes and
/// flushes, direct writes, discards and write-zeroes: more would hide a skip, fewer would be a
/// verify for nothing. ext4's journal commits are requests of a flush sequence, which run the
/// hooks but which the block layer leaves out of the disk's request count (Linux 6.18: about
/// one per `fsync`), so the hooks' request count runs ahead of the disk's and hides as many
/// skips. The sector count must still catch one.
#[test]
fn writes_no_hook_saw_are_detected_from_disk_statistics() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    let dev = LoopDevice::new(&scratch.path, 64 * MIB);
    let (mut tracker, _) =
        Tracker::open(&dev.path, &options(&pins, &scratch, CHUNK)).expect("open");
    assert!(
        tracker.cross_checks_disk_stats(),
        "loop devices keep I/O statistics"
    );
    drain(&mut tracker);
    let before = tracker
        .cross_check_counts()
        .expect("counts")
        .expect("loop devices keep I/O statistics");
    const FSYNCS: u64 = 10;
    {
        let mount = blkmirror_tests::Mount::mkfs_and_mount(&dev.path, "ext4", &scratch.path);
        for i in 0..FSYNCS {
            let path = mount.target.join(format!("file-{i}"));
            std::fs::write(&path, vec![i as u8; 100_000]).expect("write a file");
            std::fs::File::open(&path)
                .and_then(|file| file.sync_all())
                .expect("fsync a file");
        }
    }
    write_direct(&dev.path, MIB, 4096, 1);
    write_direct(&dev.path, 3 * MIB, 64 * 1024, 1);
    blkmirror_tests::blkdiscard(&dev.path, false, 8 * MIB, 2 * MIB);
    blkmirror_tests::blkdiscard(&dev.path, true, 16 * MIB, MIB);
    let after = tracker
        .cross_check_counts()
        .expect("counts")
        .expect("loop devices keep I/O statistics");
    let (disk_sectors, hook_sectors) = after.sectors.expect("these programs count sectors");
    let (disk_before, hooks_before) = before.sectors.expect("sectors");
    eprintln!(
        "cross-check after ext4 with {FSYNCS} fsyncs, writes, discards and write-zeroes: sectors \
         disk {} hooks {}; requests disk {} hooks {}",
        disk_sectors - disk_before,
        hook_sectors - hooks_before,
        after.disk_requests - before.disk_requests,
        after.hook_requests - before.hook_requests,
    );
    assert_eq!(
        disk_sectors - disk_before,
        hook_sectors - hooks_before,
        "the hooks must count exactly the disk's write and discard sectors ({after:?})"
    );
    assert!(
        disk_sectors - disk_before >= (4096 + 64 * 1024 + 3 * MIB) / 512,
        "the disk counted fewer sectors than were written, discarded and zeroed ({after:?})"
    );
    let cut = tracker.cut().expect("cut");
    tracker.release().expect("release");
    assert!(cut.needs_verify.is_none(), "{:?}", cut.needs_verify);
    // How far the hooks' request count runs ahead of the disk's: skips up to this many
    // requests would be invisible to a request count alone.
    let requests_ahead = after.hook_requests as i64 - after.disk_requests as i64;
    assert!(
        requests_ahead >= 1,
        "ext4's flush sequences no longer put the hooks' request count ahead of the disk's, \
         so this test no longer shows a skip the request count misses ({after:?})"
    );

    // Every write the hooks did not see must come back in the next cut: from the completion
    // log, which still holds it after its drainer has read the kernel's buffer out (it is
    // empty at the cut).
    let offset = write_until_the_hooks_miss_one(&tracker, &dev.path, 20 * MIB);
    let log = tracker
        .completion_log_dir()
        .expect("this machine has tracefs instances")
        .to_owned();
    let kernel_entries = || -> u64 {
        std::fs::read_dir(log.join("per_cpu"))
            .expect("per-CPU buffers")
            .map(|cpu| {
                let stats = std::fs::read_to_string(cpu.expect("a CPU").path().join("stats"))
                    .expect("CPU buffer statistics");
                stats
                    .lines()
                    .find_map(|line| line.strip_prefix("entries: "))
                    .expect("an entries line")
                    .trim()
                    .parse::<u64>()
                    .expect("a number")
            })
            .sum()
    };
    let waited = Instant::now();
    while kernel_entries() > 0 {
        assert!(
            waited.elapsed() < 10 * blkmirror::tracker::completion_log::DRAIN_EVERY,
            "the drainer did not read the kernel's buffer out"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let cut = tracker.cut().expect("cut");
    tracker.release().expect("release");
    assert!(cut.needs_verify.is_none(), "{:?}", cut.needs_verify);
    let recovered = cut.recovered.expect("recovered");
    eprintln!("recovered: {recovered}");
    assert!(
        recovered.contains("write request(s) that no hook saw")
            && recovered.contains(blkmirror_tests::KERNEL_SKIPPED_RECOVERED)
            && recovered.contains("and 8 sector(s)"),
        "{recovered}"
    );
    assert!(
        recovered.contains("(0 request(s) and"),
        "the hooks' request count was {requests_ahead} ahead of the disk's: {recovered}"
    );
    assert!(
        covers(&cut.extents, offset, 4096),
        "the write at {offset} the hooks did not see is not in the cut: {:?}",
        cut.extents
    );
    // Reported once, not again at every cut.
    let cut = tracker.cut().expect("cut");
    tracker.release().expect("release");
    assert!(cut.needs_verify.is_none(), "{:?}", cut.needs_verify);
    assert!(cut.recovered.is_none(), "{:?}", cut.recovered);

    // Without the log (gone here; overwritten on a busy disk), the gap costs a verify sync.
    std::fs::write(log.join("events/block/block_rq_complete/enable"), "0").expect("disable");
    std::fs::remove_dir(&log).expect("remove the completion log");
    write_direct(&dev.path, 60 * MIB, 4096, 3);
    let cut = tracker.cut().expect("cut");
    tracker.release().expect("release");
    let reason = cut
        .needs_verify
        .expect("a write no hook saw and no log holds must be reported")
        .reason;
    assert!(
        reason.contains("(0 request(s) and 8 sector(s)")
            && reason.contains(blkmirror_tests::KERNEL_SKIPPED),
        "{reason}"
    );
    assert!(cut.recovered.is_none());
}

/// The completion log's reach, as the agent reports it at each cut: unlimited while its ring
/// buffer has never overwritten a completion, then how far back its busiest CPU still holds
/// them. And a log resized under adopted pins holds nothing from before: a skip whose window
/// began earlier costs a verify sync, never a recovery from a log that lost the window.
#[test]
fn the_completion_log_reports_its_reach_and_a_log_resized_under_adopted_pins_holds_nothing_older() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    let dev = LoopDevice::new(&scratch.path, 64 * MIB);
    // Not read out meanwhile: this measures what the kernel's buffer alone holds.
    let small = TrackOptions {
        completion_log_kib_per_cpu: Some(256),
        completion_log_drain_every: Duration::from_secs(3600),
        ..options(&pins, &scratch, CHUNK)
    };
    let opened = Instant::now();
    let (mut tracker, _) = Tracker::open(&dev.path, &small).expect("open");
    let log = tracker
        .completion_log_dir()
        .expect("this machine has tracefs instances")
        .to_owned();
    let buffer_kb = || -> u64 {
        std::fs::read_to_string(log.join("buffer_size_kb"))
            .expect("buffer size")
            .trim()
            .parse()
            .expect("a number")
    };
    // The kernel rounds up to whole pages of events.
    assert!((256..270).contains(&buffer_kb()), "{}", buffer_kb());
    drain(&mut tracker);
    assert_eq!(tracker.completion_log_reach(), Ok(None), "a new log");
    // About 60 bytes an event: 12,000 single 4 KiB direct writes overrun 256 KiB per CPU.
    let file = open_direct(&dev.path);
    let buf = AlignedBuf::new(4096);
    for i in 0..12_000u64 {
        file.write_all_at(buf.as_slice(), (i % 16_000) * 4096)
            .expect("direct write");
    }
    let cut = tracker.cut().expect("cut");
    tracker.release().expect("release");
    if let Some(verify) = &cut.needs_verify {
        // Other tests attach and detach trackers meanwhile, which can make the kernel skip
        // this one's; a log this small cannot fill that gap.
        assert!(
            verify.reason.contains(blkmirror_tests::KERNEL_SKIPPED),
            "{}",
            verify.reason
        );
        eprintln!(
            "a kernel skip the small log could not fill: {}",
            verify.reason
        );
    }
    let reach = tracker
        .completion_log_reach()
        .expect("reach")
        .expect("12,000 completions overran a 256 KiB buffer");
    eprintln!(
        "a 256 KiB-per-CPU log reaches back {reach:?} after 12,000 writes in {:?}",
        opened.elapsed()
    );
    assert!(reach < opened.elapsed(), "{reach:?}");

    // The agent restarts with a larger log: the pins are adopted, and the resize emptied the
    // buffer.
    drop(tracker);
    let larger = TrackOptions {
        completion_log_kib_per_cpu: Some(512),
        ..small
    };
    let (mut tracker, needs_verify) = Tracker::open(&dev.path, &larger).expect("reopen");
    assert!(needs_verify.is_none(), "{needs_verify:?}");
    assert!((512..530).contains(&buffer_kb()), "{}", buffer_kb());
    let reach = tracker
        .completion_log_reach()
        .expect("reach")
        .expect("a log resized under adopted pins reaches back to its resize only");
    assert!(reach < Duration::from_secs(30), "{reach:?}");
    // A skip now, before the first cut after the restart: its window began at the last cut
    // released before the restart, which the resized log does not hold.
    write_until_the_hooks_miss_one(&tracker, &dev.path, 20 * MIB);
    let cut = tracker.cut().expect("cut");
    assert!(cut.recovered.is_none(), "{:?}", cut.recovered);
    let reason = cut.needs_verify.expect("a verify sync").reason;
    assert!(
        reason.contains(blkmirror_tests::KERNEL_SKIPPED)
            && reason.contains("may be missing from the log"),
        "{reason}"
    );
}

/// Whether one extent of a cut holds the `len` bytes at `at` whole.
fn covers(extents: &[blkmirror_protocol::extent::Extent], at: u64, len: u64) -> bool {
    extents
        .iter()
        .any(|e| e.offset <= at && at + len <= e.offset + e.length)
}

/// An agent that stops cleanly (an upgrade, a restart) hands what its drainer read out of the
/// completion log over to the next process, so that a kernel skip in the next process's first
/// cycle is still recovered. Before, the next process could not trust a window whose
/// completions an earlier process had taken out of the kernel, and verified. A hand-over
/// that is not exactly as written is not taken.
#[test]
fn a_restarted_tracker_takes_over_what_its_predecessor_read_out_of_the_completion_log() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let scratch = Scratch::new();
    let pins = PinRoot::new();
    let opts = options(&pins, &scratch, CHUNK);
    // A tracker of a device of its own that stops and starts again (its hand-over torn first,
    // when `tamper`); returns the first cut after the restart, after a write the hooks missed,
    // and that write's offset.
    let restart = |tamper: bool| {
        let dev = LoopDevice::new(&scratch.path, 64 * MIB);
        let (mut tracker, _) = Tracker::open(&dev.path, &opts).expect("open");
        let log = tracker
            .completion_log_dir()
            .expect("this machine has tracefs instances")
            .to_owned();
        let handed_over = Path::new(blkmirror::tracker::track::LOCK_DIR).join(format!(
            "{}.held",
            log.file_name().expect("a name").to_string_lossy()
        ));
        drain(&mut tracker);
        // Written after the last released cut and read out by the drainer before the stop:
        // the kernel's buffer no longer has it, the hand-over does.
        write_direct(&dev.path, 3 * MIB, 4096, 1);
        std::thread::sleep(3 * blkmirror::tracker::completion_log::DRAIN_EVERY);
        // What was read out is held in memory, and shown (status, metric).
        let held = tracker
            .completion_log_held_bytes()
            .expect("a completion log");
        assert!(held >= 24, "the drainer holds {held} bytes");
        drop(tracker);
        let text = std::fs::read_to_string(&handed_over).expect("a hand-over");
        assert!(text.lines().count() > 1, "nothing handed over: {text:?}");
        if tamper {
            let lines: Vec<&str> = text.lines().collect();
            std::fs::write(&handed_over, lines[..lines.len() - 1].join("\n")).expect("tamper");
        }
        let (mut tracker, needs_verify) = Tracker::open(&dev.path, &opts).expect("reopen");
        assert!(needs_verify.is_none(), "{needs_verify:?}");
        assert!(!handed_over.exists(), "a hand-over is taken once");
        let taken = tracker
            .completion_log_held_bytes()
            .expect("a completion log");
        assert_eq!(taken > 0, !tamper, "{taken} bytes held after the reopen");
        let offset = write_until_the_hooks_miss_one(&tracker, &dev.path, 20 * MIB);
        let cut = tracker.cut().expect("cut");
        tracker.release().expect("release");
        (cut, offset)
    };

    let (cut, offset) = restart(false);
    assert!(cut.needs_verify.is_none(), "{:?}", cut.needs_verify);
    let recovered = cut.recovered.expect("recovered from the handed-over log");
    assert!(
        recovered.contains(blkmirror_tests::KERNEL_SKIPPED_RECOVERED),
        "{recovered}"
    );
    // (The hooks saw the write at 3 MiB; what shows the hand-over taken is that the window
    // is trusted at all.)
    for at in [3 * MIB, offset] {
        assert!(
            covers(&cut.extents, at, 4096),
            "the write at {at} is not in the cut: {:?}",
            cut.extents
        );
    }

    // A hand-over that was tampered with (a line lost) is not taken: the skip costs a verify
    // sync.
    let (cut, _) = restart(true);
    assert!(cut.recovered.is_none(), "{:?}", cut.recovered);
    let reason = cut.needs_verify.expect("a verify sync").reason;
    assert!(reason.contains("may be missing from the log"), "{reason}");
}
