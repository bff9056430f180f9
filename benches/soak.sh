#!/usr/bin/env bash
# Soak run (figures, not a test): a lab sized for it, then benches/soak.rs with
# SOAK_CLIENTS clients (default 1,000) for SOAK_SECONDS (default 60).
#   bash benches/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/lab/install-deps.sh
ulimit -n "$(ulimit -Hn)"  # 1,000 clients need ~3,000 descriptors here and in the proxy
dir="/tmp/rds-iam-lab-soak-$$"
cleanup() { /usr/bin/python3 deploy/lab/lab.py stop --dir "$dir" --purge >/dev/null 2>&1 || true; }
trap cleanup EXIT
/usr/bin/python3 deploy/lab/lab.py start --dir "$dir" --max-connections 1200 --no-mysql >/dev/null
RDS_IAM_LAB="$dir/lab.json" cargo bench --bench soak
