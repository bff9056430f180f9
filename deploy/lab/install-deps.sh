#!/usr/bin/env bash
# Install what the lab and the test suite need on Debian/Ubuntu, only if it is missing.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
[ -x /usr/bin/python3 ] || need+=(python3)
have gcc || need+=(gcc)
have openssl || need+=(openssl)
have psql || need+=(postgresql-client)
have runuser || need+=(util-linux)
[ -f /usr/include/security/pam_modules.h ] || need+=(libpam0g-dev)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
[ -x /usr/sbin/mariadbd ] && [ -f /usr/lib/mysql/plugin/auth_pam_v1.so ] || need+=(mariadb-server)
have mariadb || need+=(mariadb-client)
# Real MySQL clients the tests drive: PyMySQL and MariaDB Connector/J (with a JDK to build
# the small JDBC program).
/usr/bin/python3 -c 'import pymysql' 2>/dev/null || need+=(python3-pymysql)
[ -f /usr/share/java/mariadb-java-client.jar ] || need+=(libmariadb-java)
have javac || need+=(default-jdk-headless)
# promtool lints the /metrics output; systemd-analyze rates the unit's hardening.
have promtool || need+=(prometheus)
have systemd-analyze || need+=(systemd)
# stunnel terminates TLS with session tickets in front of the lab's PostgreSQL (resumption test).
have stunnel4 || need+=(stunnel4)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! have cargo; then
  echo "cargo is missing: install Rust (https://rustup.rs) first" >&2
  exit 1
fi
