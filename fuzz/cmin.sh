#!/usr/bin/env bash
# Minimize a target's corpus to the inputs that reach new edges (counters
# off, so a few hundred files rather than thousands), in place:
#   fuzz/cmin.sh <target>
# The target is built first (cargo +nightly fuzz build -s none).
set -euo pipefail
cd "$(dirname "$0")"
target=$1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/walden/fuzz-target}"
cargo +nightly fuzz build -s none "$target"
bin="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/$target"
kept=$(mktemp -d)
"$bin" -merge=1 -use_counters=0 "$kept" "corpus/$target" 2>&1 | tail -1
rm -rf "corpus/$target"
mv "$kept" "corpus/$target"
chmod 755 "corpus/$target"
echo "corpus/$target: $(ls "corpus/$target" | wc -l) inputs"
