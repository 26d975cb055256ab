//! Fuzzes everything the receiver does with untrusted bytes before they reach storage:
//! framing, decoding of every message type, and the checks of data frames (bounded zstd
//! decompression included). Run with `cargo xtask fuzz`.
//!
//! It depends on the pure `blkmirror-protocol` crate alone, so the sanitizer build of this
//! target does not build the eBPF program embedded in the agent.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blkmirror_protocol::wire::fuzz_decode(data);
});
