#!/usr/bin/env bash
# The whole test suite, as CI runs it: fetch the real data, build every crate
# and plugin (the tests load the plugins' shared libraries and run the
# `infl8` binary), then run all tests.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/fetch-data.sh
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast "$@"
