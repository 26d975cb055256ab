//! Fuzzes `blkmirror::fuzz::audit_log` (see that module). Run with `cargo xtask fuzz --target audit_log`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blkmirror::fuzz::audit_log(data);
});
