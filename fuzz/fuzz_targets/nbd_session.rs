//! Fuzzes `blkmirror::fuzz::nbd_session` (see that module). Run with `cargo xtask fuzz --target nbd_session`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blkmirror::fuzz::nbd_session(data);
});
