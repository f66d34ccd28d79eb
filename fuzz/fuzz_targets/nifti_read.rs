//! `cargo +nightly fuzz run nifti_read`: see docs/fuzzing.md and
//! `infl8_core::fuzzing::nifti_read`, which the corpus replay test also runs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| infl8_core::fuzzing::nifti_read(data));
