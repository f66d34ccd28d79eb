//! `cargo +nightly fuzz run tensor_check`: see docs/fuzzing.md and
//! `infl8_core::fuzzing::tensor_check`, which the corpus replay test also runs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| infl8_core::fuzzing::tensor_check(data));
