//! Replication over an emulated WAN, as root: the real agent and receiver with the real eBPF
//! tracker, through the project's link emulator (`blkmirror-wan`) modelling a distant, lossy
//! link that goes down. Every test ends with the replica compared to the device.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use blkmirror_tests::{
    LoopDevice, Mount, blkmirror,
    mirror::{
        AgentSetup, ChildGuard, Site, ThawOnDrop, Workload, assert_same, committed, fsck_clean,
        last_point, write_random,
    },
    require_root,
};
use blkmirror_wan::{LinkSpec, Relay};

const MIB: u64 = 1 << 20;

fn link(rate_mbit: u64, rtt_ms: u64, loss: f64) -> LinkSpec {
    LinkSpec {
        rate_bits: rate_mbit * 1_000_000,
        delay: Duration::from_millis(rtt_ms / 2),
        loss,
        ..LinkSpec::default()
    }
}

fn relay_to(site: &Site, spec: LinkSpec, seed: u64) -> Relay {
    let upstream = site.receiver.addr.parse().expect("receiver address");
    Relay::start(
        "127.0.0.1:0".parse().expect("address"),
        upstream,
        spec,
        spec,
        seed,
    )
    .expect("starting the link emulator")
}

/// Cuts `relay`'s link for 12 s, longer than the 10 s idle timeout, once `bytes` more than now
/// have crossed it towards the receiver; `what` must get that far within `limit`. Join the
/// thread to see its assertion.
fn blackout_after(
    relay: &Relay,
    bytes: u64,
    limit: Duration,
    what: &'static str,
) -> std::thread::JoinHandle<()> {
    let handle = relay.handle().clone();
    let until = handle.up.delivered_bytes.load(Ordering::Relaxed) + bytes;
    std::thread::spawn(move || {
        let started = Instant::now();
        while handle.up.delivered_bytes.load(Ordering::Relaxed) < until {
            assert!(started.elapsed() < limit, "{what} never got going");
            std::thread::sleep(Duration::from_millis(10));
        }
        handle.blackout(true);
        std::thread::sleep(Duration::from_secs(12));
        handle.blackout(false);
    })
}

fn via<'a>(site: &'a Site, dev: &'a LoopDevice, relay: &Relay) -> AgentSetup<'a> {
    AgentSetup {
        via: Some(relay.address().to_string()),
        ..site.setup(&dev.path, "wan")
    }
}

#[test]
fn a_sync_and_cycles_over_a_distant_link_with_one_percent_loss_equal_the_device() {
    require_root();
    let site = Site::new("wan");
    let dev = LoopDevice::new(&site.scratch.path, 48 * MIB);
    write_random(&dev.path, 0, 48 * MIB);
    let relay = relay_to(&site, link(100, 40, 0.01), 11);
    let agent = via(&site, &dev, &relay);
    let lines = agent.once_ok(&["--compression", "off"]);
    assert!(
        !committed(&lines).is_empty(),
        "nothing committed: {lines:?}"
    );
    assert_same(&dev.path, &site.receiver.image("wan"));
    // The sync kept what it observed of the path for the next run: the 40 ms round trip
    // (the floor, plus at most the peer's ack delay) and a window beyond the initial one.
    let kept: serde_json::Value = serde_json::from_slice(
        &std::fs::read(agent.state_dir.join("agent-wan.path.json")).expect("the path memory"),
    )
    .expect("the path memory is JSON");
    let floor_ms = kept["floor_us"].as_u64().expect("floor_us") / 1000;
    assert!(
        (40..70).contains(&floor_ms),
        "kept a floor of {floor_ms} ms: {kept}"
    );
    assert!(
        kept["window"].as_u64().expect("window") > 14_720,
        "kept no more than the initial window: {kept}"
    );
    for round in 0..2u64 {
        for extent in 0..8u64 {
            write_random(&dev.path, (extent * 5 + round) * MIB, MIB / 2);
        }
        let (output, _) = agent.once(&[], Duration::from_secs(180));
        assert!(
            output.status.success(),
            "agent --once failed ({})",
            output.status
        );
        // Each cycle's connection starts from the window the last run ended with, not from
        // slow start's 10 datagrams (Careful Resume).
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(
            log.contains("the connection resumed a window of"),
            "round {round} did not resume the path's window: {log}"
        );
        assert_same(&dev.path, &site.receiver.image("wan"));
    }
    // The loss was real: the relay dropped datagrams both ways.
    let handle = relay.handle();
    let lost_up = handle.up.lost.load(Ordering::Relaxed);
    let lost_down = handle.down.lost.load(Ordering::Relaxed);
    assert!(
        lost_up > 100 && lost_down > 0,
        "the link lost {lost_up} datagrams up and {lost_down} down"
    );
}

#[test]
fn a_blackout_longer_than_the_idle_timeout_mid_sync_reconnects_and_ends_equal() {
    require_root();
    let site = Site::new("wan");
    let dev = LoopDevice::new(&site.scratch.path, 96 * MIB);
    write_random(&dev.path, 0, 96 * MIB);
    let relay = relay_to(&site, link(200, 20, 0.0), 12);
    let agent = via(&site, &dev, &relay);
    // Cut once the sync is well under way.
    let cutter = blackout_after(&relay, 24 * MIB, Duration::from_secs(60), "the sync");
    let (output, lines) = agent.once(
        &["--compression", "off", "--sync-step", "16MiB"],
        Duration::from_secs(120),
    );
    cutter.join().expect("the link cutter");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "agent --once failed: {stderr}");
    assert!(
        stderr.contains("retrying"),
        "the agent should have lost the connection and retried: {stderr}"
    );
    assert!(relay.handle().up.blackout_drops.load(Ordering::Relaxed) > 0);
    // The steps committed before the cut are not sent again: at most one open step is.
    let sent: u64 = committed(&lines)
        .iter()
        .filter_map(|line| line["sent_bytes"].as_u64())
        .sum();
    assert!(
        sent < 96 * MIB + 17 * MIB,
        "sent {} MiB for a 96 MiB device",
        sent / MIB
    );
    assert_same(&dev.path, &site.receiver.image("wan"));
}

/// Starts a continuous agent (`--interval 1s`, with a control socket) of `dev` through
/// `relay` and waits for its initial sync: its socket, the running agent and its status then.
fn start_continuous(
    site: &Site,
    dev: &LoopDevice,
    relay: &Relay,
) -> (std::path::PathBuf, ChildGuard, serde_json::Value) {
    let socket = site.scratch.path.join("agent.sock");
    let agent = via(site, dev, relay);
    let socket_arg = socket.to_str().expect("utf-8");
    let running = ChildGuard(agent.spawn(&["--interval", "1s", "--control-socket", socket_arg]));
    let synced = wait_for(&socket, Duration::from_secs(60), "the initial sync", |s| {
        s["lag_seconds"].is_number() && s["state"] == "continuous"
    });
    (socket, running, synced)
}

/// Kills a continuous agent and returns what it wrote to stderr (its log).
fn kill_and_read_log(running: &mut ChildGuard) -> String {
    let _ = running.0.kill();
    let _ = running.0.wait();
    let mut log = String::new();
    std::io::Read::read_to_string(
        &mut running
            .0
            .stderr
            .take()
            .expect("the agent's stderr is piped"),
        &mut log,
    )
    .expect("agent log");
    log
}

fn agent_status(socket: &std::path::Path) -> Option<serde_json::Value> {
    let out = blkmirror()
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .ok()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    status["volumes"].get(0).cloned()
}

/// Waits up to `limit` for the agent's status to satisfy `check`; returns it.
fn wait_for(
    socket: &std::path::Path,
    limit: Duration,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let status = agent_status(socket);
        if let Some(status) = status.as_ref().filter(|s| check(s)) {
            return status.clone();
        }
        assert!(
            started.elapsed() < limit,
            "waited {limit:?} for {what}; status: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The agent's resident memory (KiB), from `/proc`.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A partition during continuous replication under writes: the agent shows `disconnected`,
/// keeps tracking, and after the link returns it catches up from its tracked changes (no
/// verify sync: no tracking loss, no sync pass) to a replica equal to the device. Its memory
/// stays bounded meanwhile. The partition lasts `BLKMIRROR_PARTITION_SECONDS` (12 here;
/// `cargo xtask soak partition` runs it for 10 minutes).
#[test]
fn a_partition_under_writes_is_shown_disconnected_and_caught_up_without_a_verify() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    blkmirror_tests::retry_if_the_kernel_skipped("partition catch-up", |_| {
        let site = Site::new("wan");
        let dev = LoopDevice::new(&site.scratch.path, 64 * MIB);
        write_random(&dev.path, 0, 64 * MIB);
        let relay = relay_to(&site, link(100, 40, 0.001), 13);
        let (socket, mut running, synced) = start_continuous(&site, &dev, &relay);
        // The status shows the path as quinn measures it: the relay's 40 ms round trip (plus
        // at most its queue of one BDP and the hosts' time), a window, datagrams sent.
        let path = &synced["link"];
        let rtt_ms = path["rtt_ms"]
            .as_f64()
            .expect("the link's round trip in the status");
        assert!(
            (39.0..200.0).contains(&rtt_ms),
            "round trip {rtt_ms} ms through a 40 ms link"
        );
        let sent = path["sent_packets"].as_u64().expect("datagrams sent");
        assert!(sent > 64 * MIB / 1500, "{sent} datagrams for a 64 MiB sync");
        assert!(path["lost_packets"].as_u64().expect("datagrams lost") < sent / 10);
        assert!(path["congestion_window_bytes"].as_u64().expect("a window") > 0);
        // (The first tracking of a device counts as one loss: its earlier history is unknown.)
        let losses_before = synced["tracking_loss_total"].clone();
        // The link goes down (longer than the idle timeout) while the source keeps writing.
        let partition = Duration::from_secs(
            std::env::var("BLKMIRROR_PARTITION_SECONDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(12),
        );
        let rss_before = rss_kib(running.0.id());
        let mut rss_max = rss_before;
        relay.handle().blackout(true);
        let cut = Instant::now();
        let mut round = 0u64;
        while cut.elapsed() < partition {
            write_random(&dev.path, (round * 7 % 60) * MIB, 2 * MIB);
            std::thread::sleep(Duration::from_secs(2));
            rss_max = rss_max.max(rss_kib(running.0.id()));
            if round % 30 == 29 {
                let status = agent_status(&socket);
                eprintln!(
                    "partition: {:?} in, agent RSS {rss_max} KiB (before: {rss_before}), state {}",
                    cut.elapsed(),
                    status
                        .as_ref()
                        .map_or("?".into(), |s| s["state"].to_string())
                );
            }
            round += 1;
        }
        let down = wait_for(&socket, Duration::from_secs(20), "disconnected", |s| {
            s["state"] == "disconnected"
        });
        assert!(down["last_error"].is_string(), "{down}");
        // Tracking a partition costs no memory that grows with it: the dirty set is a bitmap.
        assert!(
            rss_max < rss_before + 64 * 1024,
            "the agent grew from {rss_before} KiB to {rss_max} KiB during a {partition:?} partition"
        );
        eprintln!(
            "partition of {partition:?}: {round} writes of 2 MiB, agent RSS {rss_before} -> at most \
             {rss_max} KiB"
        );
        write_random(&dev.path, 33 * MIB, 3 * MIB);
        relay.handle().blackout(false);
        // Back: it catches up from the tracked changes, to a point cut after the last write.
        let writes_done_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        let back = Instant::now();
        let caught_up = wait_for(&socket, Duration::from_secs(90), "the catch-up", |s| {
            s["state"] == "continuous"
                && s["backlog_bytes"] == 0
                && s["last_point"]["time_unix_ms"]
                    .as_u64()
                    .is_some_and(|t| t > writes_done_ms)
        });
        eprintln!("caught up {:?} after the link returned", back.elapsed());
        // The agent's log, for the messages below.
        let log = kill_and_read_log(&mut running);
        if log.contains(blkmirror_tests::KERNEL_SKIPPED) {
            drop(running);
            assert_same(&dev.path, &site.receiver.image("wan"));
            return None;
        }
        assert_eq!(
            caught_up["tracking_loss_total"], losses_before,
            "{caught_up}\nagent log:\n{log}"
        );
        assert!(
            log.contains("connection lost") && !log.contains("starting a verify sync"),
            "agent log:\n{log}"
        );
        assert!(caught_up["sync"].is_null(), "no sync pass: {caught_up}");
        drop(running);
        assert_same(&dev.path, &site.receiver.image("wan"));
        Some(())
    });
}

/// The kernel skips the tracker for completions under a running agent (made certain here: the
/// test removes the hooks' link pins, which detaches the programs, so from then on no write is
/// seen by a hook). The cross-check finds each gap, the completion log gives the writes back,
/// and the agent goes on with incremental cycles: no verify sync, and the replica, through a
/// distant link, ends equal to the device.
#[test]
fn writes_the_kernel_hid_from_the_tracker_are_replicated_from_the_completion_log() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let site = Site::new("wan");
    let dev = LoopDevice::new(&site.scratch.path, 64 * MIB);
    write_random(&dev.path, 0, 64 * MIB);
    let relay = relay_to(&site, link(200, 20, 0.0), 17);
    let (socket, mut running, synced) = start_continuous(&site, &dev, &relay);
    let losses_before = synced["tracking_loss_total"].clone();
    assert_eq!(synced["tracking_skips_recovered_total"], 0, "{synced}");

    for entry in std::fs::read_dir(&site.pins.path).expect("the pin root") {
        let dir = entry.expect("a pin directory").path();
        for link in ["link", "link_raw"] {
            let _ = std::fs::remove_file(dir.join(link));
        }
    }
    // The kernel releases the links from a work queue: wait until a write is surely unseen.
    std::thread::sleep(Duration::from_secs(2));
    for round in 0..4u64 {
        write_random(&dev.path, (round * 13 % 60) * MIB, 2 * MIB);
        std::thread::sleep(Duration::from_millis(700));
    }
    let writes_done_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let caught_up = wait_for(
        &socket,
        Duration::from_secs(60),
        "the writes' cycles",
        |s| {
            s["backlog_bytes"] == 0
                && s["last_point"]["time_unix_ms"]
                    .as_u64()
                    .is_some_and(|t| t > writes_done_ms + 1000)
        },
    );
    let log = kill_and_read_log(&mut running);
    let recovered = caught_up["tracking_skips_recovered_total"]
        .as_u64()
        .expect("recovered skips in the status");
    assert!(
        recovered >= 1,
        "no skip was recovered: {caught_up}\nagent log:\n{log}"
    );
    eprintln!(
        "{recovered} cut(s) filled from the completion log; the last: {}",
        log.lines()
            .rfind(|line| line.contains(blkmirror_tests::KERNEL_SKIPPED_RECOVERED))
            .unwrap_or_default()
    );
    assert_eq!(
        caught_up["tracking_loss_total"], losses_before,
        "{caught_up}\nagent log:\n{log}"
    );
    assert!(
        log.contains(blkmirror_tests::KERNEL_SKIPPED_RECOVERED)
            && !log.contains("starting a verify sync"),
        "agent log:\n{log}"
    );
    drop(running);
    assert_same(&dev.path, &site.receiver.image("wan"));
}

/// A blackout in the middle of a large incremental cycle: the receiver keeps the cycle's
/// journal, and the reconnected agent resumes the cycle instead of sending it again. What was
/// journaled before the cut is not sent again, the link carries little more than the change,
/// and the replica ends equal to the device.
///
/// `BLKMIRROR_WAN_RESUME_MIB` (default 96) and `BLKMIRROR_WAN_RESUME_MBIT` (default 200) set
/// the size of the change and the link's rate, for the case of a 500 MiB cycle at
/// 100 Mbit/s.
#[test]
fn a_blackout_in_the_middle_of_a_cycle_resumes_it_without_sending_it_again() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let setting = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|value| value.parse().ok())
            .unwrap_or(default)
    };
    // The change, shipped by one cycle.
    let changed = setting("BLKMIRROR_WAN_RESUME_MIB", 96) * MIB;
    let rate_mbit = setting("BLKMIRROR_WAN_RESUME_MBIT", 200);
    let seconds_at_rate = changed * 8 / (rate_mbit * 1_000_000);
    blkmirror_tests::retry_if_the_kernel_skipped("blackout resume", |_| {
        let site = Site::new("wan");
        let dev = LoopDevice::new(&site.scratch.path, changed + 32 * MIB);
        write_random(&dev.path, 0, changed + 32 * MIB);
        let relay = relay_to(&site, link(rate_mbit, 20, 0.0), 14);
        let agent = via(&site, &dev, &relay);
        agent.once_ok(&["--compression", "off"]);
        assert_same(&dev.path, &site.receiver.image("wan"));
        write_random(&dev.path, 16 * MIB, changed);
        let before = relay.handle().up.delivered_bytes.load(Ordering::Relaxed);
        // Cut when about half of the change has crossed.
        let cutter = blackout_after(
            &relay,
            changed / 2,
            Duration::from_secs(60 + seconds_at_rate),
            "the cycle",
        );
        let (output, lines) = agent.once(
            &["--compression", "off"],
            Duration::from_secs(120 + 2 * seconds_at_rate),
        );
        cutter.join().expect("the link cutter");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "agent --once failed: {stderr}");
        if stderr.contains(blkmirror_tests::KERNEL_SKIPPED) {
            assert_same(&dev.path, &site.receiver.image("wan"));
            return None;
        }
        assert!(
            stderr.contains("resuming cycle"),
            "the agent should have resumed the cycle: {stderr}"
        );
        // About half had been journaled; what the resumed cycle read and sent is the rest, and
        // together they are the change, give or take what a cut chunk adds.
        let (resumed, sent_after) = kept_and_resent(&lines, &stderr, changed, 0);
        // On the wire, the whole cycle (both connections) carried the change plus the transport's
        // overhead and the frames the blackout caught on their way: nowhere near twice.
        let wire = relay.handle().up.delivered_bytes.load(Ordering::Relaxed) - before;
        assert!(
            wire < changed + changed / 5,
            "{} MiB crossed the link for a {} MiB change",
            wire / MIB,
            changed / MIB
        );
        eprintln!(
            "resumed: kept {resumed} bytes, sent {sent_after} bytes after the cut, {wire} bytes on \
             the wire for a change of {changed} bytes ({:.3}x)",
            wire as f64 / changed as f64
        );
        assert_same(&dev.path, &site.receiver.image("wan"));
        Some(())
    });
}

/// A busy ext4 file system whose agent state lives on it (as `/var/lib/blkmirror` on a
/// protected root disk), replicated once through a 200 Mbit/s, 20 ms link, then given
/// [`BusyExt4::CHANGED`] of new file data for one cycle. Fields drop in order: the relay,
/// the mount, the device, the site.
struct BusyExt4 {
    relay: Relay,
    mount: Mount,
    dev: LoopDevice,
    state: std::path::PathBuf,
    site: Site,
}

impl BusyExt4 {
    const CHANGED: u64 = 96 * MIB;

    fn new(seed: u64) -> Self {
        let site = Site::new("wan");
        let dev = LoopDevice::new(&site.scratch.path, 192 * MIB);
        let mount = Mount::mkfs_and_mount(&dev.path, "ext4", &site.scratch.path);
        let state = mount.target.join("var/lib/blkmirror");
        std::fs::create_dir_all(&state).expect("state directory");
        let relay = relay_to(&site, link(200, 20, 0.0), seed);
        let busy = Self {
            relay,
            mount,
            dev,
            state,
            site,
        };
        busy.agent().once_ok(&[]);
        let status = std::process::Command::new("dd")
            .arg("if=/dev/urandom")
            .arg(format!("of={}", busy.mount.target.join("big").display()))
            .args(["bs=1M", "count=96", "conv=fsync", "status=none"])
            .status()
            .expect("dd");
        assert!(status.success());
        busy
    }

    /// Checks the `agent --once` that ran while `files` were written: it succeeded, resumed
    /// the cycle (keeping more than a quarter of the change), and committed a crash-consistent
    /// point whose image passes `e2fsck` (`label` names it). `false` when the kernel skipped
    /// the tracker for a write, so the agent verified instead (see
    /// [`blkmirror_tests::retry_if_the_kernel_skipped`]).
    fn assert_resumed_consistently(
        &self,
        output: &std::process::Output,
        lines: &[serde_json::Value],
        files: u64,
        label: &str,
    ) -> bool {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "agent --once failed: {stderr}");
        assert!(files > 0, "the workload wrote nothing");
        if stderr.contains(blkmirror_tests::KERNEL_SKIPPED) {
            return false;
        }
        assert!(
            stderr.contains("resuming cycle"),
            "the agent should have resumed the cycle ({label}): {stderr}"
        );
        let point = last_point(lines);
        assert_eq!(point["kind"], "cycle", "{point}");
        assert_eq!(point["consistent"], true, "{point}\n{stderr}");
        assert!(
            point["resumed_bytes"].as_u64().expect("resumed_bytes") > Self::CHANGED / 4,
            "{point}"
        );
        fsck_clean(
            &self.site.receiver.image("wan"),
            "ext4",
            &self.site.scratch.path,
            label,
        );
        true
    }

    fn agent(&self) -> AgentSetup<'_> {
        AgentSetup {
            state_dir: &self.state,
            ..via(&self.site, &self.dev, &self.relay)
        }
    }
}

/// The field setting of a resume: a busy ext4 file system whose agent state lives on it (as
/// `/var/lib/blkmirror` on a protected root disk), a blackout in the middle of a large cycle,
/// and writes going on throughout. The resumed cycle still freezes and commits a crash-
/// consistent point, and that point passes `e2fsck`.
#[test]
fn a_resumed_cycle_of_a_busy_file_system_with_its_state_on_it_is_consistent() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    blkmirror_tests::retry_if_the_kernel_skipped("busy resume", |attempt| {
        let busy = BusyExt4::new(15 + u64::from(attempt));
        let _thaw = ThawOnDrop(&busy.mount.target);
        let (agent, relay, changed) = (busy.agent(), &busy.relay, BusyExt4::CHANGED);
        // The new file data for one cycle, and an application that keeps writing.
        let mut workload = Workload::start(&busy.mount.target);
        let cutter = blackout_after(relay, changed / 2, Duration::from_secs(60), "the cycle");
        let (output, lines) = agent.once(&["--freeze-budget", "2s"], Duration::from_secs(180));
        cutter.join().expect("the link cutter");
        let files = workload.stop();
        busy.assert_resumed_consistently(&output, &lines, files, "resumed")
            .then_some(())
    });
}

/// An agent killed in the middle of a large incremental cycle (a crash, an OOM kill, a restart
/// by a package upgrade) resumes the cycle after its restart instead of sending it again: its
/// state file names the open cycle and every cut taken since, and the receiver kept the
/// cycle's journal. Writes made while the agent was down, into the part already journaled, are
/// sent again (the journal applies in order, so the later version wins), and the replica ends
/// equal to the device.
#[test]
fn an_agent_killed_in_the_middle_of_a_cycle_resumes_it_after_its_restart() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let changed = 96 * MIB;
    let written_while_down = 4 * MIB;
    blkmirror_tests::retry_if_the_kernel_skipped("restart resume", |_| {
        let site = Site::new("wan");
        let dev = LoopDevice::new(&site.scratch.path, changed + 32 * MIB);
        write_random(&dev.path, 0, changed + 32 * MIB);
        let relay = relay_to(&site, link(200, 20, 0.0), 16);
        let agent = via(&site, &dev, &relay);
        agent.once_ok(&["--compression", "off"]);
        write_random(&dev.path, 16 * MIB, changed);
        let killed_log = kill_when_crossed(&agent, &relay, &["--compression", "off"], changed / 2);
        // The start of the change, journaled by now, changes again while no agent runs.
        write_random(&dev.path, 16 * MIB, written_while_down);
        let (output, lines) = agent.once(&["--compression", "off"], Duration::from_secs(180));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "agent --once failed: {stderr}");
        if killed_log.contains(blkmirror_tests::KERNEL_SKIPPED)
            || stderr.contains(blkmirror_tests::KERNEL_SKIPPED)
        {
            assert_same(&dev.path, &site.receiver.image("wan"));
            return None;
        }
        assert!(
            stderr.contains("resuming cycle"),
            "the restarted agent should have resumed the cycle: {stderr}\nreceiver: {}",
            site.receiver.log()
        );
        let (resumed, sent_after) = kept_and_resent(&lines, &stderr, changed, written_while_down);
        eprintln!(
            "restarted: kept {resumed} bytes, sent {sent_after} bytes after the restart, for a \
             change of {changed} bytes and {written_while_down} written while down"
        );
        assert_same(&dev.path, &site.receiver.image("wan"));
        Some(())
    });
}

/// The committed cycle's resumed bytes (kept by the receiver) and read bytes (sent after the
/// interruption), checked: more than a quarter of `changed` was kept, and together they are
/// at most the change, plus `rewritten` meanwhile, plus a twentieth for cut chunks.
fn kept_and_resent(
    lines: &[serde_json::Value],
    stderr: &str,
    changed: u64,
    rewritten: u64,
) -> (u64, u64) {
    let cycle = committed(lines)
        .into_iter()
        .find(|line| line["kind"] == "cycle")
        .unwrap_or_else(|| panic!("no cycle committed: {lines:?}"));
    let resumed = cycle["resumed_bytes"].as_u64().expect("resumed_bytes");
    let sent_after = cycle["read_bytes"].as_u64().expect("read_bytes");
    assert!(
        resumed > changed / 4,
        "only {} MiB were kept: {stderr}",
        resumed / MIB
    );
    assert!(
        resumed + sent_after <= changed + rewritten + changed / 20,
        "kept {} MiB and sent {} MiB again for a {} MiB change",
        resumed / MIB,
        sent_after / MIB,
        changed / MIB
    );
    (resumed, sent_after)
}

/// Starts `agent --once` with `extra`, and kills it (SIGKILL: no chance to close anything)
/// once `bytes` more than now have crossed `relay` towards the receiver. Returns what the
/// killed agent had printed on stderr.
fn kill_when_crossed(agent: &AgentSetup<'_>, relay: &Relay, extra: &[&str], bytes: u64) -> String {
    let up = &relay.handle().up.delivered_bytes;
    let before = up.load(Ordering::Relaxed);
    let mut args = agent.args(extra);
    args.push("--once".into());
    let log_path = agent.state_dir.join("killed-agent.log");
    let log = std::fs::File::create(&log_path).expect("the killed agent's log");
    let mut first = ChildGuard(
        blkmirror()
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning the agent"),
    );
    let started = Instant::now();
    while up.load(Ordering::Relaxed) < before + bytes {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the cycle never got going"
        );
        assert!(
            first.0.try_wait().expect("agent").is_none(),
            "the agent ended before {} MiB of the cycle crossed",
            bytes / MIB
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    blkmirror_tests::signal(first.0.id(), libc::SIGKILL);
    first.0.wait().expect("the killed agent");
    let printed = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    printed
}

/// The field setting of a restart: a busy ext4 file system whose agent state lives on it, the
/// agent killed in the middle of a large cycle and started again while the application keeps
/// writing. The restarted agent resumes the cycle, still freezes, and commits a crash-
/// consistent point that passes `e2fsck`.
#[test]
fn a_restarted_agent_of_a_busy_file_system_with_its_state_on_it_resumes_consistently() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    blkmirror_tests::retry_if_the_kernel_skipped("busy restart", |attempt| {
        let busy = BusyExt4::new(17 + u64::from(attempt));
        let _thaw = ThawOnDrop(&busy.mount.target);
        let (agent, changed) = (busy.agent(), BusyExt4::CHANGED);
        let mut workload = Workload::start(&busy.mount.target);
        let killed_log =
            kill_when_crossed(&agent, &busy.relay, &["--freeze-budget", "2s"], changed / 2);
        assert!(
            !blkmirror_tests::mirror::is_frozen(&busy.mount.target),
            "the agent was killed before its freeze, yet the file system is frozen"
        );
        let (output, lines) = agent.once(&["--freeze-budget", "2s"], Duration::from_secs(180));
        let files = workload.stop();
        if killed_log.contains(blkmirror_tests::KERNEL_SKIPPED) {
            // The restarted agent verifies (its state says so) instead of resuming.
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "agent --once failed: {stderr}");
            return None;
        }
        busy.assert_resumed_consistently(&output, &lines, files, "restarted")
            .then_some(())
    });
}

/// A receiver killed in the middle of a large incremental cycle (a crash, an OOM kill, a
/// restart by a package upgrade) keeps the cycle's journal for its agent: the restarted
/// receiver cuts off the torn tail, and the agent, still running, reconnects and resumes the
/// cycle instead of sending it again. The link carries little more than the change, and the
/// replica ends equal to the device.
#[test]
fn a_receiver_killed_in_the_middle_of_a_cycle_keeps_it_for_the_agent_to_resume() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    let changed = 96 * MIB;
    blkmirror_tests::retry_if_the_kernel_skipped("receiver restart resume", |_| {
        let mut site = Site::new("wan");
        let dev = LoopDevice::new(&site.scratch.path, changed + 32 * MIB);
        write_random(&dev.path, 0, changed + 32 * MIB);
        let relay = relay_to(&site, link(200, 20, 0.0), 18);
        let mut args = {
            let agent = via(&site, &dev, &relay);
            agent.once_ok(&["--compression", "off"]);
            agent.args(&["--compression", "off"])
        };
        args.push("--once".into());
        write_random(&dev.path, 16 * MIB, changed);
        let up = &relay.handle().up.delivered_bytes;
        let before = up.load(Ordering::Relaxed);
        // Restarted once about half of the change has crossed.
        let (output, lines) =
            run_while(&args, &site.scratch.path, Duration::from_secs(180), || {
                wait_until_crossed(up, before + changed / 2);
                site.receiver.restart();
            });
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "agent --once failed: {stderr}\nreceiver: {}",
            site.receiver.log()
        );
        if stderr.contains(blkmirror_tests::KERNEL_SKIPPED) {
            assert_same(&dev.path, &site.receiver.image("wan"));
            return None;
        }
        let log = site.receiver.log();
        assert!(
            log.contains("kept uncommitted cycle"),
            "the restarted receiver should have kept the cycle: {log}"
        );
        assert!(
            stderr.contains("resuming cycle"),
            "the agent should have resumed the cycle: {stderr}\nreceiver: {log}"
        );
        let (resumed, sent_after) = kept_and_resent(&lines, &stderr, changed, 0);
        let wire = up.load(Ordering::Relaxed) - before;
        assert!(
            wire < changed + changed / 5,
            "{} MiB crossed the link for a {} MiB change",
            wire / MIB,
            changed / MIB
        );
        eprintln!(
            "receiver restarted: kept {resumed} bytes, sent {sent_after} bytes after the restart, \
             {wire} bytes on the wire for a change of {changed} bytes ({:.3}x)",
            wire as f64 / changed as f64
        );
        assert_same(&dev.path, &site.receiver.image("wan"));
        Some(())
    });
}

/// The field setting of a receiver restart: a busy ext4 file system whose agent state lives
/// on it, the receiver killed and started again in the middle of a large cycle while the
/// application keeps writing. The agent resumes the kept cycle, still freezes, and commits a
/// crash-consistent point that passes `e2fsck`.
#[test]
fn a_receiver_restarted_in_a_busy_file_systems_cycle_is_resumed_consistently() {
    require_root();
    let _quiet = blkmirror_tests::QuietHooks::take();
    blkmirror_tests::retry_if_the_kernel_skipped("busy receiver restart", |attempt| {
        let mut busy = BusyExt4::new(19 + u64::from(attempt));
        let _thaw = ThawOnDrop(&busy.mount.target);
        let mut args = busy.agent().args(&["--freeze-budget", "2s"]);
        args.push("--once".into());
        let mut workload = Workload::start(&busy.mount.target);
        let up = &busy.relay.handle().up.delivered_bytes;
        let before = up.load(Ordering::Relaxed);
        let receiver = &mut busy.site.receiver;
        let (output, lines) = run_while(
            &args,
            &busy.site.scratch.path,
            Duration::from_secs(180),
            || {
                wait_until_crossed(up, before + BusyExt4::CHANGED / 2);
                receiver.restart();
            },
        );
        let files = workload.stop();
        let consistent =
            busy.assert_resumed_consistently(&output, &lines, files, "receiver restarted");
        if consistent {
            let log = busy.site.receiver.log();
            assert!(log.contains("kept uncommitted cycle"), "{log}");
        }
        consistent.then_some(())
    });
}

/// Waits until the relay's `delivered` count reaches `bytes` (at most a minute: the cycle
/// must get going).
fn wait_until_crossed(delivered: &std::sync::atomic::AtomicU64, bytes: u64) {
    let started = Instant::now();
    while delivered.load(Ordering::Relaxed) < bytes {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the cycle never got going"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `blkmirror ARGS` (an `agent --once`) while `meanwhile` runs on this thread, and
/// returns its output and JSON lines; killed if it outlasts `timeout`. Its output goes to
/// files in `scratch` (a pipe nobody reads while `meanwhile` runs could fill and stall it).
fn run_while(
    args: &[String],
    scratch: &std::path::Path,
    timeout: Duration,
    meanwhile: impl FnOnce(),
) -> (std::process::Output, Vec<serde_json::Value>) {
    let (out_path, err_path) = (scratch.join("agent.out"), scratch.join("agent.err"));
    let mut agent = ChildGuard(
        blkmirror()
            .args(args)
            .stdout(std::fs::File::create(&out_path).expect("agent stdout"))
            .stderr(std::fs::File::create(&err_path).expect("agent stderr"))
            .spawn()
            .expect("spawning the agent"),
    );
    meanwhile();
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = agent.0.try_wait().expect("agent") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "agent --once did not finish within {timeout:?}: {}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read(&out_path).unwrap_or_default();
    let stderr = std::fs::read(&err_path).unwrap_or_default();
    let lines = blkmirror_tests::parse_lines(&String::from_utf8_lossy(&stdout));
    (
        std::process::Output {
            status,
            stdout,
            stderr,
        },
        lines,
    )
}
