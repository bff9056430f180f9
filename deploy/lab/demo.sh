#!/usr/bin/env bash
# Demo of the main job on one machine: start the local RDS-IAM lab (PostgreSQL that verifies
# IAM tokens through PAM, an STS emulator), run rds-iam-proxy in front of it with the
# cross-account role chain, and print the psql line to try. Ctrl-C stops everything.
#   DEMO_ONESHOT=1 bash deploy/lab/demo.sh   # run one query through the proxy and exit
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/lab/install-deps.sh
cargo build --quiet --bin rds-iam-proxy
dir=/tmp/rds-iam-lab-demo
/usr/bin/python3 deploy/lab/lab.py stop --dir "$dir" --purge >/dev/null 2>&1 || true
proxy_pid=""
cleanup() {
  [ -n "$proxy_pid" ] && kill "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null
  /usr/bin/python3 deploy/lab/lab.py stop --dir "$dir" --purge >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM
/usr/bin/python3 deploy/lab/lab.py start --dir "$dir" >/dev/null
lab() { /usr/bin/python3 -c "import json,sys; d=json.load(open('$dir/lab.json')); print(eval('d'+sys.argv[1]))" "$1"; }
free() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=6432; (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && port=$(free)
myport=3307; (exec 3<>/dev/tcp/127.0.0.1/$myport) 2>/dev/null && myport=$(free)
# One target per engine, each through the reference scenario: base credentials in account A,
# then role A (with external id), then bytebase-target-db-role in account B, which may
# rds-db:connect as "bytebase". The token is signed for the RDS-style name; the dial goes to
# the lab server.
target() { # NAME ENGINE LISTEN_PORT LAB_SECTION RDS_PORT DATABASE
  cat <<TOML
[[target]]
name = "$1"
engine = "$2"
listen = "127.0.0.1:$3"
host = "$(lab "['$4']['endpoint_name']")"
port = $5
connect_to = "127.0.0.1:$(lab "['$4']['port']")"
db_user = "bytebase"
database = "$6"
ca_file = "$(lab "['ca_file']")"
access_key_id = "$(lab "['base']['access_key_id']")"
secret_access_key = "$(lab "['base']['secret_access_key']")"
role_arn = "$(lab "['roles']['target']['arn']")"
session_name = "rds-iam-proxy-demo"

[[target.role_chain]]
role_arn = "$(lab "['roles']['hop']['arn']")"
external_id = "$(lab "['roles']['hop']['external_id']")"

TOML
}
{ target orders postgres "$port" postgres 5432 postgres; target shop mysql "$myport" mysql 3306 appdb; } > "$dir/proxy.toml"
chmod 600 "$dir/proxy.toml"
export AWS_ENDPOINT_URL_STS="$(lab "['sts']['endpoint']")" AWS_EC2_METADATA_DISABLED=true
./target/debug/rds-iam-proxy --config "$dir/proxy.toml" &
proxy_pid=$!
for p in $port $myport; do
  for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.05; done
done
line="psql \"host=127.0.0.1 port=$port user=bytebase dbname=postgres sslmode=disable\" -c 'select current_user, inet_server_port()'"
myline="mariadb -h 127.0.0.1 -P $myport -u bytebase --skip-ssl appdb -e 'select current_user(), @@port'"
echo
echo "rds-iam-proxy serves the lab's IAM-only PostgreSQL on 127.0.0.1:$port and MariaDB on 127.0.0.1:$myport. Try:"
echo "  $line"
echo "  $myline"
echo
eval "$line"
eval "$myline"
if [ "${DEMO_ONESHOT:-}" = 1 ]; then exit 0; fi
echo "Ctrl-C stops the proxy and the lab."
wait "$proxy_pid"
