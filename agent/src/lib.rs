//! blkmirror: a block-level disaster-recovery mirror for Linux, without a kernel module.
//!
//! # Concepts
//!
//! * **Tracking.** An eBPF program on the `block/block_rq_complete` tracepoint records, for
//!   each tracked device, which *chunks* (fixed-size, 4 KiB to 1 MiB) were written, discarded
//!   or zeroed. It keeps one bitmap per change kind in each of two *epoch slots*; the memory is
//!   bounded by the device size (six bits per chunk), so nothing can "fill up" the way a ring
//!   buffer does.
//! * **Epochs and cuts.** Userspace *cuts* the dirty set at any moment: it advances the epoch,
//!   waits for an RCU grace period, then reads the old slot. A write that completes after the
//!   agent started reading a chunk for epoch *N* is recorded in epoch *N+1* or later, so the
//!   chunk is read again; no write is lost between cut and read. The argument is written out in
//!   the `blkmirror_common` crate docs.
//! * **Generations.** Tracking state is pinned in bpffs and outlives the process. Whenever the
//!   history of a device is not fully known (first tracking, pins lost with a reboot, another
//!   chunk size, a kernel-side overflow), the tracker says so as `needs_verify`: the replica
//!   must be compared in full rather than trusted.
//!
//! * **Cycles and points.** The agent ships what a cut reports to the receiver in a *cycle*;
//!   the receiver journals the cycle and applies it atomically, so its image is always at a
//!   committed *point*. A point is *consistent* when the device's file system was frozen at
//!   its final cut, *fuzzy* otherwise. A *sync* (initial, or verify after `needs_verify`)
//!   compares the whole device by chunk hashes instead of trusting the tracker.
//! * **Points in time.** The receiver's image is the newest point; older ones are kept as
//!   *undo deltas* (the old content of what each cycle changed) under a tiered retention
//!   policy, and restored by applying the deltas backwards.
//!
//! # Layout of this crate
//!
//! * [`extent`], [`units`], [`layout`], [`wire`], [`plan`]: pure logic (bitmaps → extents,
//!   parsing, the protocol and its checks, what to read and send). No IO.
//! * [`device`], [`environment`]: the host as seen through sysfs and procfs.
//! * [`track`]: the driver around the kernel program and its pins.
//! * [`read`], [`net`], [`identity`], [`freeze`], [`volume`], [`durable`]: device reads,
//!   QUIC, TLS identities, file-system freezing, receiver storage, crash-safe files.
//! * [`agent`], [`receiver`]: the two long-running drivers; [`daemon`] runs them as
//!   processes (one agent loop per device) with [`service`]'s control socket, metrics and
//!   systemd notifications, reporting through [`status`].
//! * [`retention`] (pure), [`points`], [`audit`], [`ops`]: points in time on the receiver, its
//!   audit log, and the operator commands that read them.
//! * [`config`]: the configuration files and their checks.
//! * [`sys`]: raw kernel interfaces with `unsafe` (mmap, membarrier, bpf info, ioctls); the
//!   only other `unsafe` is io_uring submission in [`read`].
//! * [`cli`]: commands, output and exit codes.

pub mod agent;
pub mod audit;
pub mod btf;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod device;
pub mod durable;
pub mod environment;
pub mod extent;
pub mod freeze;
pub mod fuzz;
pub mod group;
pub mod identity;
pub mod layout;
pub mod logging;
pub mod net;
pub mod ops;
pub mod plan;
pub mod points;
pub mod read;
pub mod receiver;
pub mod retention;
pub mod selftest;
pub mod service;
pub mod status;
pub mod sys;
#[doc(hidden)]
pub mod testing;
pub mod track;
pub mod units;
pub mod volume;
pub mod wire;
