//! `cargo +nightly fuzz run manifest_parse`: see docs/fuzzing.md and
//! `infl8_core::fuzzing::manifest_parse`, which the corpus replay test also runs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| infl8_core::fuzzing::manifest_parse(data));
