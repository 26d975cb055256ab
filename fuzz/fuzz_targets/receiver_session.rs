//! Fuzzes `blkmirror::fuzz::receiver_session` (see that module). Run with `cargo xtask fuzz --target receiver_session`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blkmirror::fuzz::receiver_session(data);
});
