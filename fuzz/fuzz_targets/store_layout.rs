//! Fuzzes `blkmirror::fuzz::store_layout` (see that module). Run with `cargo xtask fuzz --target store_layout`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blkmirror::fuzz::store_layout(data);
});
