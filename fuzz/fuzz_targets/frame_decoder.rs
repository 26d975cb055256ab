//! Fuzzes everything the receiver does with untrusted bytes before they reach storage:
//! framing, decoding of every message type, and the checks of data frames (bounded zstd
//! decompression included). Run with `cargo xtask fuzz`.
//!
//! The agent's `wire` module is compiled here directly: it is pure (no IO, no eBPF), and this
//! keeps the sanitizer build from having to build the eBPF program embedded in the agent.
#![no_main]

#[path = "../../agent/src/wire.rs"]
#[allow(dead_code)]
mod wire;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wire::fuzz_decode(data);
});
