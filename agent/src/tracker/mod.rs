//! The kernel tracker as userspace drives it: loading the eBPF program, its pins in bpffs, the
//! layout of tracked devices, and the host facts it depends on (BTF, sysfs, kernel interfaces).

pub mod btf;
pub mod completion_log;
pub mod device;
pub mod environment;
pub mod layout;
pub mod selftest;
pub mod sys;
pub mod track;
