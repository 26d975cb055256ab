//! Fuzzes `blkmirror::fuzz::journal_recovery` (see that module). Run with `cargo xtask fuzz --target journal_recovery`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blkmirror::fuzz::journal_recovery(data);
});
