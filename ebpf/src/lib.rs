#![no_std]
// The library target exists only so that cargo can resolve the crate on the host; the program
// itself is the `blkmirror-ebpf` binary built for bpfel-unknown-none by agent/build.rs.
