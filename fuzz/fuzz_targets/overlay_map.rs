//! Fuzzes `blkmirror::fuzz::overlay_map` (see that module). Run with `cargo xtask fuzz --target overlay_map`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blkmirror::fuzz::overlay_map(data);
});
