//! `cargo +nightly fuzz run config_parse`: see docs/fuzzing.md and
//! `infl8_core::fuzzing::config_parse`, which the corpus replay test also runs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| infl8_core::fuzzing::config_parse(data));
