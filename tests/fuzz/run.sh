#!/usr/bin/env bash
# Run each fuzz target (all, or those named) for SECONDS (default 60), starting from the
# committed seed corpus. Needs cargo-fuzz (cargo install cargo-fuzz); runs on stable Rust through
# RUSTC_BOOTSTRAP, as the sanitizer flags are nightly-only.
#   bash tests/fuzz/run.sh 600
#   bash tests/fuzz/run.sh 600 pg_opening mysql_handshake
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(pg_opening pg_auth mysql_handshake mysql_auth)
export RUSTC_BOOTSTRAP=1
for target in "${targets[@]}"; do
  mkdir -p "target/fuzz-corpus/$target"
  cp -n tests/fuzz/corpus/"$target"/* "target/fuzz-corpus/$target/" 2>/dev/null || true
  echo "== $target: $seconds s"
  cargo fuzz run --fuzz-dir tests/fuzz "$target" "target/fuzz-corpus/$target" -- \
    -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 > "target/fuzz-$target.log" 2>&1 || { tail -40 "target/fuzz-$target.log"; exit 1; }
  grep -E "^Done|stat::number_of_executed_units|stat::peak_rss_mb" "target/fuzz-$target.log"
done
