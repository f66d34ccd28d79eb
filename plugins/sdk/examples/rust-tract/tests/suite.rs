//! The backend suite every infl8 backend runs (`infl8-backend-suite`), on
//! this example in process: what a vendor's backend should pass too before
//! `infl8 plugin check` tries it through the C ABI.

use infl8_backend_suite as suite;
use infl8_example_rust::ExampleBackend;

use suite::threads_only as opts;

#[test]
fn runs_batches_with_any_thread_count() {
    suite::runs_batches_with_any_thread_count(&ExampleBackend, &opts, &[1, 2]);
}

#[test]
fn a_fixed_batch_of_one_takes_any_batch() {
    suite::a_fixed_batch_of_one_takes_any_batch(&ExampleBackend, &opts);
}

#[test]
fn a_fixed_batch_above_one_runs_whole() {
    suite::a_fixed_batch_above_one_runs_whole(&ExampleBackend, &opts);
}

#[test]
fn models_run_from_several_threads() {
    suite::models_run_from_several_threads(&ExampleBackend, &opts);
}

#[test]
fn clear_errors() {
    suite::errors_are_clear(&ExampleBackend, &opts);
}
