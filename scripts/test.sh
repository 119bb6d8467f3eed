#!/usr/bin/env bash
# Walden's test command: installs and starts whatever the tests need, checks
# formatting and lints, builds every target (benchmarks included, not run),
# then runs the tests. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Builds are cached outside the clone, so a fresh clone reuses them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/walden/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

log() { printf '\n== %s\n' "$*"; }

# --- Services ---------------------------------------------------------------
# The embedded-log tests need only a local disk. Later backends (Kafka, SQS,
# Postgres, Redis) add their servers here, and each test that needs one is
# told where it is through a WALDEN_TEST_* variable.

# --- Checks -----------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (-D warnings)"
cargo clippy --all-targets --locked -- -D warnings

log "cargo build --all-targets"
cargo build --all-targets --locked

# --- Tests ------------------------------------------------------------------
if cargo nextest --version >/dev/null 2>&1; then
  # Doc tests first: nextest doesn't run them, and its summary should close
  # the output.
  log "cargo test --doc"
  cargo test --doc --locked
  log "cargo nextest run"
  cargo nextest run --locked --no-fail-fast
else
  log "cargo test (cargo-nextest not installed)"
  cargo test --locked --no-fail-fast
fi
