//! The blkmirror replication protocol and the pure logic around it.
//!
//! Everything here takes its input (bitmaps, messages, times) as arguments and does no IO:
//! no files, no sockets, no clock, no async runtime. The dependency list enforces it. The
//! `blkmirror` crate's drivers (the tracker, the agent, the receiver) execute what these
//! modules decide, which is what lets the hard parts be tested, fuzzed and simulated without
//! root.
//!
//! * [`congestion`]: which losses on the link are congestion and which are random.
//! * [`cubic`]: the agent's congestion window: Cubic whose slow start ends on a rising round
//!   trip (after HyStart++) with the window the path delivers, instead of overflowing the
//!   router's queue.
//! * [`failback`]: the messages and the plan that make a returned source equal to the promoted
//!   DR-site device, moving only what differs.
//! * [`extent`]: dirty bitmaps as the kernel side writes them, turned into merged extents.
//! * [`frames`]: how the chunks a pass reads become data frames (skip, zero ranges, zstd).
//! * [`pass`]: an incremental cycle and a sync pass as state machines: what to do next, and
//!   what the committed point says.
//! * [`plan`]: what a cycle or a verify pass reads and sends, and how big it is.
//! * [`wire`]: the messages between agent and receiver, their framing and every check a
//!   receiver makes before it believes a frame.
//! * [`units`]: sizes, durations and rates as operators write them.
//! * [`retention`]: which points in time a tiered policy keeps.
//! * [`session`]: the agent's replication session as a state machine without IO.

pub mod congestion;
pub mod cubic;
pub mod extent;
pub mod failback;
pub mod frames;
pub mod pass;
pub mod plan;
pub mod retention;
pub mod session;
pub mod units;
pub mod wire;
