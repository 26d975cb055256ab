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
//! The protocol and every other pure decision (extents, plans, wire messages and their checks,
//! units, retention) live in the `blkmirror_protocol` crate, whose dependency list keeps it
//! free of IO. This crate holds the drivers, in one folder per role:
//!
//! * [`tracker`]: the kernel side as userspace sees it: the eBPF loader and its pins
//!   ([`tracker::track`]), the tracked-device layout, BTF, devices in sysfs, the host
//!   environment checks, raw kernel interfaces ([`tracker::sys`], most of the `unsafe`), and the
//!   self-test.
//! * [`source`]: the protected host: the replication loop ([`source::agent`]), io_uring reads,
//!   file-system freezing and consistency groups.
//! * [`link`]: what both ends share on the network: QUIC endpoints and TLS identities.
//! * [`dr`]: the disaster-recovery site: the receiver's sessions ([`dr::receiver`]), volume
//!   storage and its journal ([`dr::volume`]), points in time, the audit log and the operator
//!   commands that read them.
//! * [`command`]: the command surface: the CLI and its exit codes, configuration files, the
//!   long-running daemons, status, the control socket and metrics, logging.
//! * [`durable`]: crash-safe file replacement, used by both sides.

pub mod command;
pub mod dr;
pub mod durable;
pub mod fuzz;
pub mod link;
#[cfg(test)]
mod sim;
pub mod source;
pub mod test_hooks;
#[doc(hidden)]
pub mod testing;
pub mod tracker;
