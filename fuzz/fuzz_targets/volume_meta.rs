//! Fuzzes `blkmirror::fuzz::volume_meta` (see that module). Run with `cargo xtask fuzz --target volume_meta`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blkmirror::fuzz::volume_meta(data);
});
