#!/usr/bin/env bash
# The whole test suite: installs what it lacks, starts the local RDS-IAM lab once, runs every
# test against it, and stops everything the lab started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/lab/install-deps.sh
cargo build --all-targets --quiet
lab_dir="/tmp/rds-iam-lab-tests-$$"
cleanup() { /usr/bin/python3 deploy/lab/lab.py stop --dir "$lab_dir" --purge >/dev/null 2>&1 || true; }
trap cleanup EXIT
/usr/bin/python3 deploy/lab/lab.py start --dir "$lab_dir" >/dev/null
export RDS_IAM_LAB="$lab_dir/lab.json"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@"
else
  cargo test --no-fail-fast "$@"
fi
