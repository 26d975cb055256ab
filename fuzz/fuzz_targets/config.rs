//! Fuzzes `blkmirror::fuzz::config` (see that module). Run with `cargo xtask fuzz --target config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blkmirror::fuzz::config(data);
});
