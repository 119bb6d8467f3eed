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
# Tests talk to real servers. Each is checked, started if it is down, and
# installed from Debian's packages if it is missing; then its test variable is
# set. A test whose variable is unset skips loudly and names the variable.

wait_for() { # seconds, command...
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  "$@"
}

apt_install() {
  [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then return; fi
  log "starting PostgreSQL"
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    apt_install postgresql
    local hba
    hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -1)
    # The tests connect as postgres over TCP without a password.
    sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  wait_for 30 pg_isready -q -h 127.0.0.1 -p 5432
}

ensure_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then return; fi
  log "starting Redis"
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for 30 sh -c 'redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG'
}

ensure_postgres
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test" >/dev/null
export WALDEN_TEST_POSTGRES_URL="${WALDEN_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"

ensure_redis
export WALDEN_TEST_REDIS_URL="${WALDEN_TEST_REDIS_URL:-redis://127.0.0.1:6379}"

# How long the sink-outage tests cut each target.
export WALDEN_TEST_OUTAGE_S="${WALDEN_TEST_OUTAGE_S:-5}"

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
