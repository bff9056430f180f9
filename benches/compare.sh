#!/usr/bin/env bash
# Issue 6 comparison (figures, not a test): direct TLS vs rds-iam-proxy vs pgbouncer vs a
# minimal tokio + rustls relay (and pgdog where a binary is given), on a lab of its own.
#   bash benches/compare.sh                       # full run: ~35 min, writes docs/compare/
#   bash benches/compare.sh --seconds 5 --rounds 1 --copy-mb 256 --out /tmp/cmp   # quick look
# Extra arguments go to benches/compare.py (see --help there).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/lab/install-deps.sh
need=()
command -v pgbouncer >/dev/null || need+=(pgbouncer)
command -v sysbench >/dev/null || need+=(sysbench)
command -v pgbench >/dev/null || need+=(postgresql)
command -v strace >/dev/null || need+=(strace)
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || need+=(python3-matplotlib)
/usr/bin/python3 -c 'import psycopg2' 2>/dev/null || need+=(python3-psycopg2)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
ulimit -n "$(ulimit -Hn)"  # 1,000 idle connections need ~3,000 descriptors per process
cargo build --release --bin rds-iam-proxy
relay=$(cargo build --release --bench minimal_relay --message-format=json \
  | /usr/bin/python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "minimal_relay" and m.get("executable"):
        print(m["executable"])')
dir="/tmp/rds-iam-lab-compare-$$"
cleanup() { /usr/bin/python3 deploy/lab/lab.py stop --dir "$dir" --purge >/dev/null 2>&1 || true; }
trap cleanup EXIT
/usr/bin/python3 deploy/lab/lab.py start --dir "$dir" --max-connections 1200 --no-smoke >/dev/null
args=("$@")
[[ " $* " == *" --out "* ]] || args+=(--out docs/compare)
/usr/bin/python3 benches/compare.py --lab "$dir/lab.json" --proxy target/release/rds-iam-proxy \
  --relay "$relay" "${args[@]}"
