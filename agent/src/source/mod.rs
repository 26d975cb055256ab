//! The source side: what runs on a protected host to turn tracked changes into cycles on the
//! wire (the replication loop, io_uring reads, file-system freezing, consistency groups).

pub mod agent;
pub mod app_hooks;
pub mod failback;
pub mod freeze;
pub mod group;
pub mod loadgen;
pub mod read;
