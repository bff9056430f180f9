#!/usr/bin/python3
"""Local RDS IAM lab: a strict stand-in for RDS IAM auth and STS on loopback.

  python3 deploy/lab/lab.py start  --dir /tmp/rdsiam-lab [--region us-east-1] [--pg-port N]
                                   [--mysql-port N] [--no-mysql] [--sts-min-duration 900] [--no-smoke]
  python3 deploy/lab/lab.py status --dir /tmp/rdsiam-lab
  python3 deploy/lab/lab.py stop   --dir /tmp/rdsiam-lab [--purge]
  python3 deploy/lab/lab.py token  --dir /tmp/rdsiam-lab [--engine postgres|mysql] [--user bytebase]
                                   [--endpoint HOST:PORT] [--region R]
  python3 deploy/lab/lab.py web-token --dir /tmp/rdsiam-lab [--expires-in S] [--aud A] [--sub S] [--iss I]
  python3 deploy/lab/lab.py restart --dir /tmp/rdsiam-lab --engine postgres|mysql [--mode fast|immediate|kill]
                                    [--timeout 60] [--no-smoke]
  python3 deploy/lab/lab.py stop-service|start-service --dir /tmp/rdsiam-lab --service sts

start builds everything in DIR (certificates, PAM module, STS emulator, a
PostgreSQL 15 and a MariaDB 10.11 whose IAM users authenticate through PAM ->
verifier.py), waits until it all answers, writes DIR/lab.json and prints it.
stop ends every process start made and removes the lab's /etc/pam.d files; it is idempotent and
safe after a half-failed start.  token prints an IAM token signed with the lab's
static base key (a lab-side helper for smoke tests; it is NOT the reference
signer, botocore is).  Run as root; standard library only.
"""
import argparse
import base64
import contextlib
import datetime as dt
import fcntl
import glob
import hashlib
import hmac
import http.client
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PGBIN = "/usr/lib/postgresql/15/bin"
PY = "/usr/bin/python3"
PAM_DIR = "/etc/pam.d"
PAM_PREFIX = "rdsiamlab-"
BASE_ARN = "arn:aws:iam::111111111111:user/lab-admin"
HOP_ARN = "arn:aws:iam::111111111111:role/lab-hop-role"
TARGET_ARN = "arn:aws:iam::222222222222:role/bytebase-target-db-role"
DIRECT_ARN = "arn:aws:iam::222222222222:role/lab-direct-role"
# the other sources of the default credential chain (all in account A)
INSTANCE_ROLE = "lab-instance-role"
INSTANCE_ARN = "arn:aws:iam::111111111111:role/" + INSTANCE_ROLE
INSTANCE_ID = "i-0lab0000000000001"
TASK_ARN = "arn:aws:iam::111111111111:role/lab-task-role"
TASK_ID = "1ab0000000000000000000000000000a"
WEB_ARN = "arn:aws:iam::111111111111:role/lab-web-role"
OIDC_HOST = "oidc.eks.%s.amazonaws.com/id/1AB0000000000000000000000000000A"  # % region
OIDC_AUD = "sts.amazonaws.com"
OIDC_SUB = "system:serviceaccount:bytebase:rds-iam-proxy"
WEB_TOKEN_SECONDS = 86400
IAM_USER = "bytebase"
# MariaDB (Debian's mariadb-server). The lab's mariadbd runs as root (user=root) with its own datadir, port and
# socket in DIR; the system server on 3306 is never touched.
MYSQLD = "/usr/sbin/mariadbd"
MARIADB = "/usr/bin/mariadb"
MY_SHARE = "/usr/share/mysql"
MY_PLUGIN_DIR = "/usr/lib/mysql/plugin"
# auth_pam_v1 is the "pam" plugin that runs PAM inside mariadbd (here as root). auth_pam (v2) would run PAM in the
# setuid helper auth_pam_tool_dir/auth_pam_tool: that helper is missing from some images (dpkg --verify
# mariadb-server), and its 0700 directory is system-wide state the lab must not depend on or change. Both register
# the same plugin "pam" with the same pam_use_cleartext_plugin switch, so the wire is the same.
MY_PAM_PLUGIN = "auth_pam_v1"
PAM_TOOL_DIR = MY_PLUGIN_DIR + "/auth_pam_tool_dir"
# what mariadb-install-db feeds to `mariadbd --bootstrap` (minus the help tables and the anonymous test db).
# mariadb-install-db itself is not used: with a user= it chowns the system-wide auth_pam_tool_dir.
MY_BOOTSTRAP_SQL = ("mysql_system_tables.sql", "mysql_performance_tables.sql", "mysql_system_tables_data.sql",
                    "maria_add_gis_sp_bootstrap.sql", "mysql_sys_schema.sql")
# performance_schema sizes set to 0 in the lab's my.cnf (max_statement_stack: 1, its minimum); only the thread
# classes and instances (what session_connect_attrs reads) keep their defaults
MY_PFS_ZERO = ("accounts_size", "hosts_size", "users_size", "digests_size", "setup_actors_size", "setup_objects_size",
               "events_stages_history_size", "events_stages_history_long_size", "events_statements_history_size",
               "events_statements_history_long_size", "events_transactions_history_size",
               "events_transactions_history_long_size", "events_waits_history_size",
               "events_waits_history_long_size", "max_cond_classes", "max_cond_instances", "max_file_classes",
               "max_file_handles", "max_file_instances", "max_memory_classes", "max_mutex_classes",
               "max_mutex_instances", "max_rwlock_classes", "max_rwlock_instances", "max_socket_classes",
               "max_socket_instances", "max_stage_classes", "max_statement_classes", "max_statement_stack",
               "max_digest_length", "max_sql_text_length", "max_index_stat", "max_metadata_locks",
               "max_prepared_statements_instances", "max_program_instances", "max_table_handles",
               "max_table_instances", "max_table_lock_stat")
T0 = time.monotonic()


class LabError(Exception):
    pass


def say(msg):
    sys.stderr.write("[lab %5.2fs] %s\n" % (time.monotonic() - T0, msg))
    sys.stderr.flush()


def run(cmd, timeout=60, check=True, **kw):
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    kw.setdefault("stdin", subprocess.DEVNULL)
    p = subprocess.run(cmd, timeout=timeout, text=True, **kw)
    if check and p.returncode != 0:
        raise LabError("command failed (%d): %s\n%s" % (p.returncode, " ".join(cmd), (p.stdout or "")[-3000:]))
    return p


def as_pg(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd


def write(path, text, mode=0o644, owner=None):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    if owner:
        pw = pwd.getpwnam(owner)
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    os.replace(tmp, path)


def touch_shared(path):
    """Log files written by root (STS, MariaDB's PAM) and by postgres (verifier)."""
    with open(path, "a"):
        pass
    os.chmod(path, 0o666)


def derive_secret(master, akid):
    mac = hmac.new(master, b"secret:" + akid.encode("ascii"), hashlib.sha256).digest()
    return base64.b64encode(mac).decode("ascii")[:40]


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_web_token(master, iss, sub=OIDC_SUB, aud=OIDC_AUD, expires_in=WEB_TOKEN_SECONDS, now=None):
    """An OIDC-style JWT (HS256, key HMAC-SHA256(master, "lab-oidc-hs256-key")) that sts.py accepts."""
    now = int(now or time.time())
    head = b64url(json.dumps({"alg": "HS256", "kid": "lab", "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64url(json.dumps({"aud": [aud], "exp": now + expires_in, "iat": now, "nbf": now, "iss": iss, "sub": sub},
                             separators=(",", ":")).encode())
    key = hmac.new(master, b"lab-oidc-hs256-key", hashlib.sha256).digest()
    return head + "." + body + "." + b64url(hmac.new(key, (head + "." + body).encode(), hashlib.sha256).digest())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid):
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class State:
    """DIR/state.json: what start created, written as it goes, so stop can undo a half start."""

    def __init__(self, d):
        self.path = os.path.join(d, "state.json")
        self.data = load_json(self.path) or {"dir": d, "pam_files": [], "sts_pid": None,
                                              "pg_data": None, "status": "new"}

    def save(self, **kw):
        self.data.update(kw)
        write(self.path, json.dumps(self.data, indent=1) + "\n")


# --------------------------------------------------------------------------- start
def make_certs(d, names):
    cnf = os.path.join(d, "certs", "openssl.cnf")
    os.makedirs(os.path.dirname(cnf), mode=0o755)
    san = ",".join(["DNS:localhost", "IP:127.0.0.1"] + ["DNS:" + n for n in names])
    write(cnf, """[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_srv]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = %s
""" % san)
    c = lambda n: os.path.join(d, n)  # noqa: E731
    osl = ["openssl"]
    for key in ("certs/ca.key", "certs/other-ca.key", "server.key"):
        run(osl + ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", c(key)])
        os.chmod(c(key), 0o600)
    for key, out, cn in (("certs/ca.key", "ca.pem", "rds-iam-proxy lab CA"),
                         ("certs/other-ca.key", "other-ca.pem", "rds-iam-proxy lab OTHER CA (signs nothing)")):
        run(osl + ["req", "-x509", "-new", "-config", cnf, "-extensions", "v3_ca", "-key", c(key), "-sha256",
                   "-days", "30", "-subj", "/O=rds-iam-proxy lab/CN=" + cn, "-out", c(out)])
    run(osl + ["req", "-new", "-config", cnf, "-key", c("server.key"), "-subj",
               "/O=rds-iam-proxy lab/CN=localhost", "-out", c("certs/server.csr")])
    run(osl + ["x509", "-req", "-in", c("certs/server.csr"), "-CA", c("ca.pem"), "-CAkey", c("certs/ca.key"),
               "-set_serial", "0x" + secrets.token_hex(16), "-days", "30", "-sha256", "-extfile", cnf,
               "-extensions", "v3_srv", "-out", c("server.crt")])
    for f in ("ca.pem", "other-ca.pem", "server.crt"):
        os.chmod(c(f), 0o644)


# Server connection limits; `start --max-connections N` raises them (the soak bench needs ~1,100).
MAX_CONNECTIONS = 300


def pg_conf(port, sock, d):
    return """
# ---- rds-iam-proxy lab ----
listen_addresses = '127.0.0.1'
port = %d
unix_socket_directories = '%s'
max_connections = %d
shared_buffers = 32MB
ssl = on
ssl_cert_file = '%s/server.crt'
ssl_key_file = '%s/pg/server.key'
ssl_min_protocol_version = 'TLSv1.2'
password_encryption = 'scram-sha-256'
fsync = off
synchronous_commit = off
full_page_writes = off
log_connections = on
log_line_prefix = '%%m [%%p] %%u@%%d '
""" % (port, sock, MAX_CONNECTIONS, d, d)


def pg_hba(service):
    return """# rds-iam-proxy lab: only TLS over TCP; the IAM user goes through PAM (-> verifier.py)
# TYPE  DATABASE USER       ADDRESS        METHOD
local   all      all                       trust
hostssl all      %s   127.0.0.1/32   pam pamservice=%s
hostssl all      lab_md5    127.0.0.1/32   md5
hostssl all      lab_scram  127.0.0.1/32   scram-sha-256
hostssl all      lab_trust  127.0.0.1/32   trust
hostssl all      lab_pass   127.0.0.1/32   scram-sha-256
""" % (IAM_USER, service)


def setup_sql(users):
    q = lambda s: "'" + s.replace("'", "''") + "'"  # noqa: E731
    names = ", ".join([IAM_USER] + list(users))
    return """
CREATE ROLE rds_iam;
CREATE ROLE %(iam)s LOGIN;
GRANT rds_iam TO %(iam)s;
SET password_encryption = 'md5';
CREATE ROLE lab_md5 LOGIN PASSWORD %(md5)s;
SET password_encryption = 'scram-sha-256';
CREATE ROLE lab_scram LOGIN PASSWORD %(scram)s;
CREATE ROLE lab_trust LOGIN;
CREATE ROLE lab_pass LOGIN PASSWORD %(pass)s;
GRANT CONNECT, CREATE, TEMPORARY ON DATABASE postgres TO %(names)s;
GRANT USAGE, CREATE ON SCHEMA public TO %(names)s;
CREATE DATABASE appdb OWNER %(iam)s;
""" % {"iam": IAM_USER, "md5": q(users["lab_md5"]), "scram": q(users["lab_scram"]),
       "pass": q(users["lab_pass"]), "names": names}


def my_cnf(d, port=None):
    """The lab mariadbd's only config file (--defaults-file: /etc/mysql is not read). Without a port: the
    `--bootstrap` config (no network, no TLS, no PAM; it runs before the certificates exist)."""
    m = lambda *n: os.path.join(d, "mysql", *n)  # noqa: E731
    text = """# rds-iam-proxy lab: written by lab.py start
[mysqld]
user = root
basedir = /usr
plugin_dir = %s
datadir = %s
socket = %s
pid_file = %s
log_error = %s
tmpdir = %s
character_set_server = utf8mb4
collation_server = utf8mb4_general_ci
skip_name_resolve
innodb_buffer_pool_size = 64M
innodb_log_file_size = 32M
innodb_flush_log_at_trx_commit = 0
innodb_doublewrite = 0
""" % (MY_PLUGIN_DIR, m("data"), m("mysqld.sock"), m("mysqld.pid"), m("mysqld.log"), m("tmp"))
    if port is None:
        return text
    return text + """bind_address = 127.0.0.1
port = %d
plugin_load_add = %s
pam_use_cleartext_plugin = ON
ssl_cert = %s
ssl_key = %s
ssl_ca = %s
tls_version = TLSv1.2,TLSv1.3
max_connections = %d
max_connect_errors = 1000000000
local_infile = ON
max_allowed_packet = 64M
# performance_schema only for session_connect_attrs (the attributes each client sent, e.g. through the proxy):
# nothing is instrumented or collected, every class, instance, history and digest table is sized to 0. The thread
# table stays autosized (pages allocated on demand) with 4 KiB of attributes per thread. Default-sized it
# would take ~96 MB more RSS; this way ~3 MB (~6 MB with 300 connections).
performance_schema = ON
performance_schema_session_connect_attrs_size = 4096
performance_schema_instrument = '%%=OFF'
performance_schema_consumer_global_instrumentation = OFF
performance_schema_consumer_statements_digest = OFF
""" % (port, MY_PAM_PLUGIN, os.path.join(d, "server.crt"), os.path.join(d, "server.key"), os.path.join(d, "ca.pem"),
       MAX_CONNECTIONS) \
        + "".join("performance_schema_%s = %d\n" % (k, 1 if k == "max_statement_stack" else 0) for k in MY_PFS_ZERO)


def my_setup_sql(service, users):
    q = lambda s: "'" + s.replace("\\", "\\\\").replace("'", "''") + "'"  # noqa: E731
    everyone = ", ".join("'%s'@'%%'" % u for u in [IAM_USER] + sorted(users))
    return """
CREATE DATABASE appdb;
CREATE DATABASE test;
CREATE USER '%(iam)s'@'%%' IDENTIFIED VIA pam USING %(svc)s REQUIRE SSL;
CREATE USER 'lab_native'@'%%' IDENTIFIED VIA mysql_native_password USING PASSWORD(%(native)s) REQUIRE SSL;
CREATE USER 'lab_pass'@'%%' IDENTIFIED VIA mysql_native_password USING PASSWORD(%(pass)s);
GRANT ALL PRIVILEGES ON appdb.* TO %(all)s;
GRANT ALL PRIVILEGES ON test.* TO %(all)s;
GRANT ALL PRIVILEGES ON `test\\_%%`.* TO %(all)s;
GRANT SELECT ON performance_schema.session_connect_attrs TO %(all)s;
""" % {"iam": IAM_USER, "svc": q(service), "native": q(users["lab_native"]), "pass": q(users["lab_pass"]),
       "all": everyone}


def my_greeting(addr, timeout=1.0):
    """The first packet mariadbd sends on 127.0.0.1:addr (a port) or on the unix socket addr (a path): its
    handshake (protocol 10, first byte 0x0a) or an error packet (0xff: e.g. 1130 "Host '127.0.0.1' is not
    allowed to connect" while no user matches '%', 1040 too many connections). Either way it is up and
    answering. None if it closed without a packet."""
    if isinstance(addr, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(addr)
        except OSError:
            s.close()
            raise
    else:
        s = socket.create_connection(("127.0.0.1", addr), timeout=timeout)
    with s:
        buf = b""
        while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:3], "little"):
            chunk = s.recv(4096)
            if not chunk:
                return None
            buf += chunk
        return buf[4:4 + int.from_bytes(buf[:3], "little")]


def pam_tool_dir_stat():
    """(uid, gid, mode) of the system-wide auth_pam_tool_dir, or None if it does not exist."""
    try:
        st = os.lstat(PAM_TOOL_DIR)
    except OSError:
        return None
    return [st.st_uid, st.st_gid, st.st_mode & 0o7777]


def check_pam_tool_dir(recorded):
    """The lab never changes auth_pam_tool_dir (the system MariaDB's PAM depends on its owner); restore it if
    something did."""
    now = pam_tool_dir_stat()
    if recorded is None or now is None or now == recorded:
        return
    say("WARNING: %s changed from uid=%d gid=%d mode=%o to uid=%d gid=%d mode=%o: restoring"
        % (PAM_TOOL_DIR, recorded[0], recorded[1], recorded[2], now[0], now[1], now[2]))
    os.chown(PAM_TOOL_DIR, recorded[0], recorded[1])
    os.chmod(PAM_TOOL_DIR, recorded[2])


def sign_token(akid, secret, hostport, user, region, session_token=None, now=None):
    """Minimal stdlib RDS token signer for `lab.py token` and the start smoke test."""
    enc = lambda s: "".join(c if c.isascii() and (c.isalnum() or c in "-_.~") else  # noqa: E731
                            "".join("%%%02X" % b for b in c.encode()) for c in s)
    t = dt.datetime.fromtimestamp(now or time.time(), dt.timezone.utc)
    amz_date, day = t.strftime("%Y%m%dT%H%M%SZ"), t.strftime("%Y%m%d")
    scope = "%s/%s/rds-db/aws4_request" % (day, region)
    q = {"Action": "connect", "DBUser": user, "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
         "X-Amz-Credential": akid + "/" + scope, "X-Amz-Date": amz_date, "X-Amz-Expires": "900",
         "X-Amz-SignedHeaders": "host"}
    if session_token:
        q["X-Amz-Security-Token"] = session_token
    query = "&".join("%s=%s" % (enc(k), enc(v)) for k, v in sorted(q.items()))
    creq = "GET\n/\n%s\nhost:%s\n\nhost\n%s" % (query, hostport.lower(), hashlib.sha256(b"").hexdigest())
    sts = "AWS4-HMAC-SHA256\n%s\n%s\n%s" % (amz_date, scope, hashlib.sha256(creq.encode()).hexdigest())
    k = ("AWS4" + secret).encode()
    for part in (day, region, "rds-db", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    return "%s/?%s&X-Amz-Signature=%s" % (hostport, query, sig)


def wait_for(what, fn, timeout, proc=None):
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            r = fn()
            if r:
                return r
        except Exception:
            pass
        if proc is not None and proc.poll() is not None:
            raise LabError("%s: process exited with %s" % (what, proc.returncode))
        if time.monotonic() > deadline:
            raise LabError("timed out waiting for %s" % what)
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


def http_ok(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        c.request("GET", "/lab/health")
        return c.getresponse().status == 200
    finally:
        c.close()


def start_mysqld(d, port, state):
    """Write DIR/mysql/my.cnf for `port` and launch mariadbd in the foreground of its own session."""
    write(os.path.join(d, "mysql", "my.cnf"), my_cnf(d, port), 0o644)
    return launch_mysqld(d, state)


def launch_mysqld(d, state):
    """Launch mariadbd with DIR/mysql/my.cnf as it is, in the foreground of its own session."""
    m = lambda *n: os.path.join(d, "mysql", *n)  # noqa: E731
    with open(m("mysqld.out"), "ab") as out:
        proc = subprocess.Popen([MYSQLD, "--defaults-file=" + m("my.cnf")], cwd=m("data"), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    state.save(mysql_pid=proc.pid)
    return proc


def wait_mysqld(d, proc, port, may_retry, state, timeout=60):
    """Wait for the server's greeting on its unix socket (in DIR, so surely ours: a greeting on 127.0.0.1:port
    could come from another server that holds the port), then on 127.0.0.1:port. mariadbd binds TCP before the
    socket and aborts if it cannot. On a lost port race, start again on another port."""
    log = os.path.join(d, "mysql", "mysqld.log")
    sock = os.path.join(d, "mysql", "mysqld.sock")
    for attempt in range(3):
        try:
            t0 = time.monotonic()
            wait_for("MariaDB on %s" % sock, lambda: my_greeting(sock) is not None, timeout, proc)
            wait_for("MariaDB on 127.0.0.1:%d" % port, lambda: my_greeting(port) is not None,
                     min(10, max(0.5, timeout - (time.monotonic() - t0))), proc)
            return proc, port
        except LabError as e:
            try:
                tail = open(log, errors="replace").read()[-2500:]
            except OSError:
                tail = ""
            if proc.poll() is not None and "Bind on TCP/IP port" in tail.rsplit("Starting MariaDB", 1)[-1] \
                    and may_retry and attempt < 2:
                port = free_port()
                say("port race, retrying MariaDB on %d" % port)
                proc = start_mysqld(d, port, state)
                continue
            raise LabError("%s\n%s" % (e, tail))
    raise LabError("MariaDB did not start")


def launch_sts(d, port, state):
    """Launch the STS emulator on 127.0.0.1:port (0: a free one, written to DIR/sts.port) in its own session."""
    p = lambda *n: os.path.join(d, *n)  # noqa: E731
    with open(p("sts.out"), "ab") as out:
        sts = subprocess.Popen([PY, "-I", p("sts.py"), "--conf", p("lab.json"), "--port", str(port),
                                "--port-file", p("sts.port")], cwd=d, stdin=subprocess.DEVNULL, stdout=out,
                               stderr=out, start_new_session=True)
    state.save(sts_pid=sts.pid)
    return sts


def mysqld_pids(d):
    """Every mariadbd (server or --bootstrap) running with a config from DIR/mysql/."""
    tag = " --defaults-file=%s/mysql/" % d
    out = []
    for x in os.listdir("/proc"):
        if x.isdigit():
            c = cmdline(int(x))
            if c.startswith(MYSQLD + " ") and tag in c and pid_alive(int(x)):
                out.append(int(x))
    return out


def prepare_dir(d):
    if os.path.isdir(d):
        st = load_json(os.path.join(d, "state.json"))
        if st is None:
            if os.listdir(d):
                raise LabError("%s exists, is not empty and is not a lab dir; refusing to touch it" % d)
        else:
            if st.get("status") not in ("stopped", None) or any_alive(d, st):
                say("leftovers of a previous lab in %s: stopping them first" % d)
                stop_lab(d, quiet=True)
            for name in os.listdir(d):
                p = os.path.join(d, name)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    else:
        os.makedirs(d)
    os.chmod(d, 0o755)


def start(a):
    d = os.path.abspath(a.dir)
    if re.search(r"\s", d) or not d.startswith("/"):
        raise LabError("--dir must be an absolute path without whitespace")
    if os.geteuid() != 0:
        raise LabError("run as root (needs runuser and /etc/pam.d)")
    if not a.no_mysql:
        if not os.access(MYSQLD, os.X_OK) or not os.path.exists(os.path.join(MY_PLUGIN_DIR, MY_PAM_PLUGIN + ".so")):
            raise LabError("MariaDB is missing (%s, %s/%s.so): apt-get install mariadb-server, or start with --no-mysql"
                           % (MYSQLD, MY_PLUGIN_DIR, MY_PAM_PLUGIN))
        if len(os.path.join(d, "mysql", "mysqld.sock")) > 100:
            raise LabError("--dir is too long for a unix socket path (DIR/mysql/mysqld.sock must be <= 100 bytes)")
    prepare_dir(d)
    state = State(d)
    state.save(status="starting", started=time.time())
    p = lambda *n: os.path.join(d, *n)  # noqa: E731
    try:
        return _start(a, d, p, state)
    except BaseException:
        say("start failed: cleaning up")
        stop_lab(d, quiet=True)
        raise


def _start(a, d, p, state):
    region = a.region
    uniq = secrets.token_hex(4)
    pg_name = "pg-lab.c9lab0example.%s.rds.amazonaws.com" % region
    my_name = "mysql-lab.c9lab0example.%s.rds.amazonaws.com" % region
    pw = pwd.getpwnam("postgres")

    # 1. PostgreSQL initdb is the slow part: run it while the rest is built
    os.makedirs(p("pg", "sock"))
    for x in (p("pg"), p("pg", "sock")):
        os.chown(x, pw.pw_uid, pw.pw_gid)
        os.chmod(x, 0o755)
    state.save(pg_data=p("pg", "data"))
    initdb = subprocess.Popen(as_pg([PGBIN + "/initdb", "-D", p("pg", "data"), "-U", "postgres", "-A", "trust",
                                     "-E", "UTF8", "--locale=C", "-N", "--no-instructions"]),
                              cwd=d, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    # 1b. MariaDB system tables, in parallel (mariadbd --bootstrap as root; see MY_BOOTSTRAP_SQL)
    boot = None
    if not a.no_mysql:
        state.save(mysql=True, pam_tool_dir=pam_tool_dir_stat())
        for x in ("data", "tmp"):
            os.makedirs(p("mysql", x), mode=0o755)
        write(p("mysql", "bootstrap.cnf"), my_cnf(d), 0o644)
        sql = "create database if not exists mysql;\nuse mysql;\nSET @auth_root_socket='root';\n"
        for f in MY_BOOTSTRAP_SQL:
            with open(os.path.join(MY_SHARE, f)) as fh:
                sql += fh.read() + "\n"
        write(p("mysql", "bootstrap.sql"), sql, 0o600)
        with open(p("mysql", "bootstrap.sql"), "rb") as sin, open(p("mysql", "bootstrap.out"), "wb") as sout:
            boot = subprocess.Popen([MYSQLD, "--defaults-file=" + p("mysql", "bootstrap.cnf"), "--bootstrap",
                                     "--skip-networking", "--log-warnings=0", "--enforce-storage-engine=",
                                     "--max-allowed-packet=8M", "--net-buffer-length=16K"],
                                    cwd=d, stdin=sin, stdout=sout, stderr=subprocess.STDOUT, start_new_session=True)
    else:
        state.save(mysql=False)

    # 2. secrets, base key, copies of the lab programs (readable by postgres wherever the repo lives)
    master_hex = secrets.token_hex(32)
    write(p("master.secret"), master_hex + "\n", 0o644)
    master = master_hex.encode()
    base_akid = "AKIA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
    for f in ("verifier.py", "sts.py"):
        shutil.copyfile(os.path.join(HERE, f), p(f))
        os.chmod(p(f), 0o755)
    for f in ("verifier.jsonl", "sts.jsonl", "pam.log"):
        touch_shared(p(f))
    # web identity token and container auth token (files without a trailing newline: the SDKs send the bytes
    # as they are)
    oidc_iss = "https://" + OIDC_HOST % region
    write(p("web-identity-token"), mint_web_token(master, oidc_iss), 0o644)
    ecs_token = "lab-ecs-" + secrets.token_urlsafe(24)
    write(p("ecs-auth-token"), ecs_token, 0o644)

    # 3. PAM module
    run(["gcc", "-O2", "-Wall", "-fPIC", "-shared", "-o", p("pam_rdsiam.so"),
         os.path.join(HERE, "pam_rdsiam.c"), "-lpam"])
    os.chmod(p("pam_rdsiam.so"), 0o755)
    say("PAM module built")

    # 4. certificates
    make_certs(d, [pg_name, my_name])
    shutil.copyfile(p("server.key"), p("pg", "server.key"))
    os.chown(p("pg", "server.key"), pw.pw_uid, pw.pw_gid)
    os.chmod(p("pg", "server.key"), 0o600)
    say("certificates made")

    # 4b. MariaDB: bootstrap done? then start mariadbd; it comes up while PostgreSQL is set up
    my_users = {"lab_native": "native-" + secrets.token_hex(6), "lab_pass": "pass-" + secrets.token_hex(6)}
    my_port = a.mysql_port or free_port()
    my_service = PAM_PREFIX + uniq + "-mysql"
    mysqld = None
    if boot is not None:
        rc = boot.wait(timeout=120)
        if rc != 0:
            raise LabError("mariadbd --bootstrap failed (%d):\n%s\n%s" % (
                rc, open(p("mysql", "bootstrap.out"), errors="replace").read()[-3000:],
                open(p("mysql", "mysqld.log"), errors="replace").read()[-2000:]))
        os.unlink(p("mysql", "bootstrap.sql"))
        say("MariaDB system tables made")
        mysqld = start_mysqld(d, my_port, state)

    # 5. lab.json (the STS port and the PG port are filled in below)
    users = {"lab_md5": "md5-" + secrets.token_hex(6), "lab_scram": "scram-" + secrets.token_hex(6),
             "lab_trust": "", "lab_pass": "pass-" + secrets.token_hex(6)}
    pg_port = a.pg_port or free_port()
    pam_service = PAM_PREFIX + uniq + "-pg"
    oidc_provider = "arn:aws:iam::111111111111:oidc-provider/" + OIDC_HOST % region
    conf = {
        "dir": d, "region": region,
        "ca_file": p("ca.pem"), "other_ca_file": p("other-ca.pem"),
        "server_cert_file": p("server.crt"), "server_key_file": p("server.key"),
        "master_secret_file": p("master.secret"),
        "sts": {"endpoint": None, "port": None, "log": p("sts.jsonl"), "pid": None,
                "min_duration_seconds": a.sts_min_duration},
        "base": {"access_key_id": base_akid, "secret_access_key": derive_secret(master, base_akid),
                 "arn": BASE_ARN},
        "roles": {
            "hop": {"arn": HOP_ARN, "external_id": "lab-ext-id-123", "trusts": [BASE_ARN],
                    "max_session_duration": 43200},
            "target": {"arn": TARGET_ARN, "trusts": [HOP_ARN, INSTANCE_ARN, TASK_ARN, WEB_ARN],
                       "max_session_duration": 3600},
            "direct": {"arn": DIRECT_ARN, "external_id": "lab-direct-ext", "trusts": [BASE_ARN],
                       "max_session_duration": 43200},
            "instance": {"arn": INSTANCE_ARN, "trusts": ["ec2.amazonaws.com"], "max_session_duration": 3600},
            "task": {"arn": TASK_ARN, "trusts": ["ecs-tasks.amazonaws.com"], "max_session_duration": 3600},
            "web": {"arn": WEB_ARN, "trusts": [oidc_provider], "oidc_sub": OIDC_SUB, "max_session_duration": 43200},
        },
        "imds": {"endpoint": None, "role_name": INSTANCE_ROLE, "role_arn": INSTANCE_ARN, "instance_id": INSTANCE_ID,
                 "session_arn": "arn:aws:sts::111111111111:assumed-role/%s/%s" % (INSTANCE_ROLE, INSTANCE_ID),
                 "credential_seconds": 21600},
        "ecs": {"full_uri": None, "auth_token": ecs_token, "auth_token_file": p("ecs-auth-token"),
                "role_arn": TASK_ARN, "task_id": TASK_ID, "credential_seconds": 21600},
        "web_identity": {"token_file": p("web-identity-token"), "role_arn": WEB_ARN, "issuer": oidc_iss,
                         "provider_arn": oidc_provider, "audience": OIDC_AUD, "subject": OIDC_SUB,
                         "token_expires_in": WEB_TOKEN_SECONDS},
        "verifier": {"log": p("verifier.jsonl"), "pam_log": p("pam.log")},
        "postgres": {"port": pg_port, "host": "127.0.0.1", "socket_dir": p("pg", "sock"),
                     "data_dir": p("pg", "data"), "log": p("pg", "postgres.log"),
                     "endpoint_name": pg_name,
                     "endpoints": ["localhost:%d" % pg_port, "127.0.0.1:%d" % pg_port, pg_name + ":5432"],
                     "iam_user": IAM_USER, "pam_service": pam_service, "database": "postgres",
                     "iam_database": "appdb", "users": users},
    }
    if mysqld is not None:
        conf["mysql"] = {
            "port": my_port, "host": "127.0.0.1", "socket": p("mysql", "mysqld.sock"),
            "data_dir": p("mysql", "data"), "log": p("mysql", "mysqld.log"), "conf_file": p("mysql", "my.cnf"),
            "endpoint_name": my_name,
            "endpoints": ["localhost:%d" % my_port, "127.0.0.1:%d" % my_port, my_name + ":3306"],
            "iam_user": IAM_USER, "pam_service": my_service, "pam_plugin": MY_PAM_PLUGIN,
            "database": "appdb", "scratch_database": "test", "users": my_users, "admin_user": "root",
            "pid": mysqld.pid}
    write(p("lab.json"), json.dumps(conf, indent=1) + "\n")

    # 6. STS emulator (own session / process group; stdout+stderr to DIR/sts.out)
    sts = launch_sts(d, 0, state)

    # 7. PAM service file (the only thing written outside DIR)
    pam_file = os.path.join(PAM_DIR, pam_service)
    state.save(pam_files=state.data["pam_files"] + [pam_file])
    write(pam_file, "# rds-iam-proxy lab in %s: written by lab.py start, removed by lab.py stop\n"
          "auth    required %s timeout=10 log=%s %s -I -S %s --conf %s --engine postgres\n"
          "account required %s\n" % (d, p("pam_rdsiam.so"), p("pam.log"), PY, p("verifier.py"), p("lab.json"),
                                     p("pam_rdsiam.so")))
    if mysqld is not None:
        # MariaDB's pam plugin calls pam_authenticate and then pam_acct_mgmt, like PostgreSQL
        my_pam_file = os.path.join(PAM_DIR, my_service)
        state.save(pam_files=state.data["pam_files"] + [my_pam_file])
        write(my_pam_file, "# rds-iam-proxy lab in %s (MariaDB): written by lab.py start, removed by lab.py stop\n"
              "auth    required %s timeout=10 log=%s %s -I -S %s --conf %s --engine mysql\n"
              "account required %s\n" % (d, p("pam_rdsiam.so"), p("pam.log"), PY, p("verifier.py"),
                                         p("lab.json"), p("pam_rdsiam.so")))

    # 8. wait for initdb, configure and start PostgreSQL (retry on a port race)
    out, _ = initdb.communicate(timeout=120)
    if initdb.returncode != 0:
        raise LabError("initdb failed:\n" + out[-3000:])
    say("initdb done")
    write(p("pg", "data", "pg_hba.conf"), pg_hba(pam_service), 0o600, "postgres")
    with open(p("pg", "data", "postgresql.conf")) as f:
        base_conf = f.read()
    for attempt in range(3):
        write(p("pg", "data", "postgresql.conf"), base_conf + pg_conf(pg_port, p("pg", "sock"), d), 0o600,
              "postgres")
        r = run(as_pg([PGBIN + "/pg_ctl", "-D", p("pg", "data"), "-l", p("pg", "postgres.log"), "-w", "-t", "30",
                       "start"]), cwd=d, check=False)
        if r.returncode == 0:
            break
        log = open(p("pg", "postgres.log")).read()[-2000:]
        if "could not bind" in log and not a.pg_port and attempt < 2:
            pg_port = free_port()
            say("port race, retrying PostgreSQL on %d" % pg_port)
            continue
        raise LabError("pg_ctl start failed:\n%s\n%s" % (r.stdout, log))
    conf["postgres"]["port"] = pg_port
    conf["postgres"]["endpoints"] = ["localhost:%d" % pg_port, "127.0.0.1:%d" % pg_port, pg_name + ":5432"]
    run([PGBIN + "/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(pg_port), "-t", "10"])
    say("PostgreSQL up on 127.0.0.1:%d" % pg_port)
    run([PGBIN + "/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", p("pg", "sock"), "-p", str(pg_port),
         "-U", "postgres", "-d", "postgres", "-f", "-"], input=setup_sql(users), stdin=None)

    # 8b. MariaDB answering? (a port race restarts it on another port) then users and databases
    if mysqld is not None:
        mysqld, my_port = wait_mysqld(d, mysqld, my_port, not a.mysql_port, state)
        conf["mysql"].update(port=my_port, pid=mysqld.pid,
                             endpoints=["localhost:%d" % my_port, "127.0.0.1:%d" % my_port, my_name + ":3306"])
        say("MariaDB up on 127.0.0.1:%d" % my_port)
        run([MARIADB, "--no-defaults", "--socket=" + p("mysql", "mysqld.sock"), "--user=root", "--batch"],
            input=my_setup_sql(my_service, my_users), stdin=None)

    # 9. STS answering?
    wait_for("STS port file", lambda: os.path.exists(p("sts.port")), 10, sts)
    sts_port = int(open(p("sts.port")).read())
    wait_for("STS health", lambda: http_ok(sts_port), 10, sts)
    conf["sts"].update(endpoint="http://127.0.0.1:%d" % sts_port, port=sts_port, pid=sts.pid)
    conf["imds"]["endpoint"] = "http://127.0.0.1:%d" % sts_port
    conf["ecs"]["full_uri"] = "http://127.0.0.1:%d/ecs/credentials" % sts_port
    conf["postgres"]["pid"] = int(open(p("pg", "data", "postmaster.pid")).readline())
    write(p("lab.json"), json.dumps(conf, indent=1) + "\n")
    say("STS up on 127.0.0.1:%d" % sts_port)

    # 10. smoke: the verifier runs as postgres, and one IAM login passes through PAM
    run(as_pg([PY, "-I", "-S", p("verifier.py"), "--selftest"]), cwd=d)
    if not a.no_smoke:
        tok = sign_token(base_akid, derive_secret(master, base_akid), "localhost:%d" % pg_port, IAM_USER, region)
        env = dict(os.environ, PGPASSWORD=tok, PGCONNECT_TIMEOUT="10")
        r = run([PGBIN + "/psql", "-X", "-At", "-c", "select current_user",
                 "host=localhost port=%d user=%s dbname=postgres sslmode=verify-full sslrootcert=%s"
                 % (pg_port, IAM_USER, p("ca.pem"))], env=env, check=False)
        if r.returncode != 0 or r.stdout.strip() != IAM_USER:
            raise LabError("smoke IAM login failed: %s (see %s, %s)" % (r.stdout.strip(), p("verifier.jsonl"),
                                                                       p("pam.log")))
        say("smoke IAM login ok")
        if mysqld is not None:
            tok = sign_token(base_akid, derive_secret(master, base_akid), "127.0.0.1:%d" % my_port, IAM_USER, region)
            r = run([MARIADB, "--no-defaults", "--host=127.0.0.1", "--port=%d" % my_port, "--user=" + IAM_USER,
                     "--ssl", "--ssl-ca=" + p("ca.pem"), "--ssl-verify-server-cert", "--connect-timeout=10",
                     "--batch", "--skip-column-names", "-e", "select current_user(), exists(select 1 from "
                     "performance_schema.session_connect_attrs where processlist_id = connection_id())"],
                    env=dict(os.environ, MYSQL_PWD=tok), check=False)
            # 1: the client's connection attributes are visible to bytebase (performance_schema, the grant)
            if r.returncode != 0 or r.stdout.strip() != IAM_USER + "@%\t1":
                raise LabError("smoke MariaDB IAM login failed: %s (see %s, %s, %s)" % (
                    r.stdout.strip(), p("verifier.jsonl"), p("pam.log"), p("mysql", "mysqld.log")))
            say("smoke MariaDB IAM login ok")
    if mysqld is not None:
        check_pam_tool_dir(state.data.get("pam_tool_dir"))
    state.save(status="running")
    print(json.dumps(conf, indent=1))
    say("lab ready in %s" % d)
    return 0


# --------------------------------------------------------------------------- stop / status
def lab_pids(d, st):
    """(sts_pid, postmaster_pid), each only if it is alive and really ours."""
    sts = st.get("sts_pid")
    if not (pid_alive(sts) and os.path.join(d, "sts.py") in cmdline(sts)):
        sts = None
    pm = None
    data = st.get("pg_data") or os.path.join(d, "pg", "data")
    try:
        with open(os.path.join(data, "postmaster.pid")) as f:
            pm = int(f.readline())
    except (OSError, ValueError):
        pass
    if not (pid_alive(pm) and data in cmdline(pm)):
        pm = None
    return sts, pm


def stray_verifiers(d):
    me = os.path.join(d, "verifier.py")
    return [int(x) for x in os.listdir("/proc") if x.isdigit() and me in cmdline(int(x))]


def any_alive(d, st):
    sts, pm = lab_pids(d, st)
    return bool(sts or pm or mysqld_pids(d))


def kill_sts(sts):
    """End the STS emulator (the leader of its own process group): SIGTERM, SIGKILL after 3 s."""
    try:
        os.killpg(sts, signal.SIGTERM)
    except OSError:
        pass
    deadline = time.monotonic() + 3
    while pid_alive(sts) and time.monotonic() < deadline:
        time.sleep(0.02)
    if pid_alive(sts):
        try:
            os.killpg(sts, signal.SIGKILL)
        except OSError:
            pass


def stop_lab(d, quiet=False):
    st = load_json(os.path.join(d, "state.json"))
    if st is None:
        if not quiet:
            say("no lab in %s (nothing to stop)" % d)
        return 0
    sts, pm = lab_pids(d, st)
    data = st.get("pg_data") or os.path.join(d, "pg", "data")
    # MariaDB: SIGTERM now (a clean, fast shutdown), wait for it after PostgreSQL
    mys = mysqld_pids(d)
    for pid in mys:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    if pm:
        r = run(as_pg([PGBIN + "/pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "20", "stop"]), cwd="/",
                check=False, timeout=40)
        if pid_alive(pm):
            say("pg_ctl stop did not stop %d (%s): SIGKILL" % (pm, r.stdout.strip()))
            try:
                os.killpg(pm, signal.SIGKILL)  # pg_ctl made the postmaster a session leader
            except OSError:
                os.kill(pm, signal.SIGKILL)
        say("PostgreSQL stopped")
    if sts:
        kill_sts(sts)
        say("STS stopped")
    if mys:
        deadline = time.monotonic() + 30
        while any(pid_alive(x) for x in mys) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in mys:
            if pid_alive(pid):
                say("mariadbd %d did not stop on SIGTERM: SIGKILL" % pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        while any(pid_alive(x) for x in mys) and time.monotonic() < deadline:
            time.sleep(0.02)
        say("MariaDB stopped")
    if st.get("mysql"):
        check_pam_tool_dir(st.get("pam_tool_dir"))
    for pid in stray_verifiers(d):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    # the lab's PAM files: those recorded, plus any rdsiamlab-* that points into this DIR
    files = set(st.get("pam_files", []))
    for f in glob.glob(os.path.join(PAM_DIR, PAM_PREFIX + "*")):
        try:
            if (d + "/") in open(f).read():
                files.add(f)
        except OSError:
            pass
    for f in sorted(files):
        if os.path.basename(f).startswith(PAM_PREFIX) and os.path.dirname(f) == PAM_DIR and os.path.exists(f):
            os.unlink(f)
            say("removed %s" % f)
    State(d).save(status="stopped", stopped=time.time())
    return 0


def stop(a):
    d = os.path.abspath(a.dir)
    rc = stop_lab(d)
    if a.purge and os.path.exists(os.path.join(d, "state.json")):
        shutil.rmtree(d)
        say("removed %s" % d)
    return rc


def status(a):
    d = os.path.abspath(a.dir)
    st = load_json(os.path.join(d, "state.json"))
    conf = load_json(os.path.join(d, "lab.json")) or {}
    if st is None:
        print(json.dumps({"dir": d, "state": "absent"}))
        return 3
    sts, pm = lab_pids(d, st)
    mys = mysqld_pids(d)
    my_port = (conf.get("mysql") or {}).get("port")
    sts_port = (conf.get("sts") or {}).get("port")
    pg_port = (conf.get("postgres") or {}).get("port")
    healthy = False
    if sts and sts_port:
        try:
            healthy = http_ok(sts_port)
        except OSError:
            pass
    ready = bool(pm and pg_port and run([PGBIN + "/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(pg_port),
                                         "-t", "2"], check=False).returncode == 0)
    my_ready = False
    if mys and my_port:
        try:
            my_ready = (my_greeting(my_port) or b"")[:1] == b"\x0a"
        except OSError:
            pass
    pam = [f for f in st.get("pam_files", []) if os.path.exists(f)]
    up = healthy and ready and bool(pam) and (my_ready or not st.get("mysql"))
    out = {"dir": d, "state": st.get("status"), "up": up,
           "sts": {"pid": sts, "port": sts_port, "healthy": healthy},
           "postgres": {"pid": pm, "port": pg_port, "ready": ready},
           "pam_files": pam}
    if st.get("mysql") or mys:
        out["mysql"] = {"pid": mys[0] if len(mys) == 1 else (mys or None), "port": my_port, "ready": my_ready}
    print(json.dumps(out, indent=1))
    if up:
        return 0
    return 3 if not (sts or pm or pam or mys) else 1


# --------------------------------------------------------------------------- restart / stop-service / start-service
@contextlib.contextmanager
def lab_lock(d):
    """One restart / service change at a time per lab (DIR/lab.lock)."""
    with open(os.path.join(d, "lab.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def running_lab(a):
    d = os.path.abspath(a.dir)
    st = load_json(os.path.join(d, "state.json"))
    conf = load_json(os.path.join(d, "lab.json"))
    if st is None or conf is None or st.get("status") != "running":
        raise LabError("no running lab in %s (state: %s)" % (d, (st or {}).get("status", "absent")))
    return d, st, conf


def update_lab_json(d, section, **kw):
    """Re-read lab.json and set keys of one section (so edits made by tests meanwhile are kept)."""
    path = os.path.join(d, "lab.json")
    conf = load_json(path)
    if conf is None:
        raise LabError("cannot read %s" % path)
    conf[section].update(kw)
    write(path, json.dumps(conf, indent=1) + "\n")


def left(deadline):
    return max(1.0, deadline - time.monotonic())


def wait_dead(pids, until, what):
    while any(pid_alive(x) for x in pids):
        if time.monotonic() > until:
            raise LabError("%s: %s still alive" % (what, [x for x in pids if pid_alive(x)]))
        time.sleep(0.01)


def drop_stale_locks(pid, files):
    """Remove the lock files (postmaster.pid, .s.PGSQL.N.lock) of a postmaster that is dead but maybe not yet
    reaped: its parent is init, which here reaps about 1.5 s later, and until then kill(pid, 0) succeeds, so a new
    postmaster would refuse the lock files ("Is another postmaster (PID N) running"). The shared memory of the dead
    one has no attached process left; the new postmaster removes it itself."""
    for f in files:
        try:
            with open(f) as fh:
                if int(fh.readline()) != pid or pid_alive(pid):
                    continue
            os.unlink(f)
        except (OSError, ValueError):
            pass


def children(ppid):
    out = []
    for x in os.listdir("/proc"):
        if x.isdigit():
            try:
                with open("/proc/%s/stat" % x) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == ppid:
                        out.append(int(x))
            except (OSError, ValueError, IndexError):
                pass
    return out


def iam_smoke(d, conf, engine, timeout):
    """One IAM login (token signed with the base key) through TLS, PAM and the verifier."""
    master = open(conf["master_secret_file"], "rb").read().strip()
    akid = conf["base"]["access_key_id"]
    port = conf[engine]["port"]
    t = max(1, min(10, int(timeout)))
    if engine == "postgres":
        tok = sign_token(akid, derive_secret(master, akid), "localhost:%d" % port, IAM_USER, conf["region"])
        r = run([PGBIN + "/psql", "-X", "-At", "-c", "select current_user",
                 "host=localhost port=%d user=%s dbname=postgres sslmode=verify-full sslrootcert=%s"
                 % (port, IAM_USER, conf["ca_file"])], env=dict(os.environ, PGPASSWORD=tok, PGCONNECT_TIMEOUT=str(t)),
                check=False, timeout=t + 5)
        ok = r.returncode == 0 and r.stdout.strip() == IAM_USER
    else:
        tok = sign_token(akid, derive_secret(master, akid), "127.0.0.1:%d" % port, IAM_USER, conf["region"])
        r = run([MARIADB, "--no-defaults", "--host=127.0.0.1", "--port=%d" % port, "--user=" + IAM_USER, "--ssl",
                 "--ssl-ca=" + conf["ca_file"], "--ssl-verify-server-cert", "--connect-timeout=%d" % t, "--batch",
                 "--skip-column-names", "-e", "select current_user()"], env=dict(os.environ, MYSQL_PWD=tok),
                check=False, timeout=t + 5)
        ok = r.returncode == 0 and r.stdout.strip() == IAM_USER + "@%"
    if not ok:
        raise LabError("IAM login on %s after the restart failed: %s (see %s, %s)"
                       % (engine, r.stdout.strip(), conf["verifier"]["log"], conf["verifier"]["pam_log"]))


def restart_postgres(d, st, conf, mode, deadline):
    pg = conf["postgres"]
    data, port, log = pg["data_dir"], pg["port"], pg["log"]
    _, pm = lab_pids(d, st)

    def pg_ctl(*args):
        return run(as_pg([PGBIN + "/pg_ctl", "-D", data, "-l", log, "-w", "-t", str(int(left(deadline)))]
                         + list(args)), cwd=d, check=False, timeout=left(deadline) + 5)
    if pm and mode in ("fast", "immediate"):
        # fast: SIGTERM to the postmaster, every backend sends FATAL 57P01 "terminating connection due to
        # administrator command"; immediate: SIGQUIT, backends send FATAL 57P01 "... due to immediate shutdown
        # command" and the next start runs crash recovery
        r = pg_ctl("-m", mode, "restart")
    else:
        if pm:
            # the backends are session leaders of their own (InitPostmasterChild): killpg(pm) would miss them, and a
            # backend that outlives its postmaster sends FATAL "terminating connection due to unexpected postmaster
            # exit". So: freeze the postmaster (no new forks, no reaction), SIGKILL its children, then it.
            try:
                os.kill(pm, signal.SIGSTOP)
            except OSError:
                pass
            kids = children(pm)
            for pid in kids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.kill(pm, signal.SIGKILL)
            except OSError:
                pass
            # the old shared memory must be detached by all before a new postmaster starts
            wait_dead([pm] + kids, min(deadline, time.monotonic() + 10), "SIGKILLed PostgreSQL processes")
            drop_stale_locks(pm, [os.path.join(data, "postmaster.pid"),
                                  os.path.join(pg["socket_dir"], ".s.PGSQL.%d.lock" % port)])
            say("PostgreSQL: SIGKILLed postmaster %d and %d children" % (pm, len(kids)))
        else:
            say("PostgreSQL was not running: starting it")
        r = pg_ctl("start")
    if r.returncode != 0:
        try:
            tail = open(log, errors="replace").read()[-2000:]
        except OSError:
            tail = ""
        raise LabError("pg_ctl %s failed or timed out (%d):\n%s\n%s" % (
            "start" if mode == "kill" or not pm else "restart -m " + mode, r.returncode, r.stdout.strip(), tail))
    r = run([PGBIN + "/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port), "-t", str(int(left(deadline)))],
            check=False, timeout=left(deadline) + 5)
    if r.returncode != 0:
        raise LabError("PostgreSQL on 127.0.0.1:%d not ready after the restart (pg_isready %d)" % (port, r.returncode))
    _, new = lab_pids(d, st)
    if not new:
        raise LabError("PostgreSQL answers but %s/postmaster.pid names no live postmaster" % data)
    update_lab_json(d, "postgres", pid=new)
    return pm, new


def restart_mysql(d, st, conf, mode, deadline):
    if mode == "immediate":
        raise LabError("--mode immediate is for postgres; mysql has fast (SIGTERM, clean shutdown) and kill")
    port = conf["mysql"]["port"]
    old = mysqld_pids(d)
    if old:
        sig = signal.SIGKILL if mode == "kill" else signal.SIGTERM
        for pid in old:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if mode == "fast":
            try:
                wait_dead(old, min(deadline - 5, time.monotonic() + 30), "mariadbd after SIGTERM")
            except LabError as e:
                say("%s: SIGKILL" % e)
                for pid in old:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
        wait_dead(old, min(deadline, time.monotonic() + 10), "mariadbd")
        say("MariaDB %d stopped (%s)" % (old[0], "SIGKILL" if mode == "kill" else "SIGTERM"))
    else:
        say("MariaDB was not running: starting it")
    state = State(d)
    proc = launch_mysqld(d, state)  # same my.cnf: same port, socket, datadir
    wait_mysqld(d, proc, port, False, state, timeout=left(deadline))
    update_lab_json(d, "mysql", pid=proc.pid)
    return (old[0] if len(old) == 1 else (old or None)), proc.pid


def restart(a):
    d, st, conf = running_lab(a)
    if a.engine not in conf:
        raise LabError("this lab has no %s (started with --no-mysql?)" % a.engine)
    t0 = time.monotonic()
    deadline = t0 + a.timeout
    with lab_lock(d):
        try:
            fn = restart_postgres if a.engine == "postgres" else restart_mysql
            old, new = fn(d, st, conf, a.mode, deadline)
            up = time.monotonic() - t0
            if not a.no_smoke:
                iam_smoke(d, conf, a.engine, left(deadline))
        except subprocess.TimeoutExpired as e:
            raise LabError("%s restart (%s) not done within %g s: %s" % (a.engine, a.mode, a.timeout, e))
        except LabError as e:
            raise LabError("%s restart (%s) failed after %.1f s: %s" % (a.engine, a.mode, time.monotonic() - t0, e))
    total = time.monotonic() - t0
    say("%s restarted (%s) in %.2f s: pid %s -> %d" % (a.engine, a.mode, total, old, new))
    print(json.dumps({"engine": a.engine, "mode": a.mode, "old_pid": old, "pid": new,
                      "port": conf[a.engine]["port"], "ready_seconds": round(up, 3),
                      "seconds": round(total, 3), "smoke": not a.no_smoke}))
    return 0


def stop_service(a):
    d, st, conf = running_lab(a)
    with lab_lock(d):
        sts, _ = lab_pids(d, load_json(os.path.join(d, "state.json")) or st)
        if sts:
            kill_sts(sts)
            say("STS %d stopped (port %s is now closed)" % (sts, conf["sts"]["port"]))
        else:
            say("STS was not running")
        State(d).save(sts_pid=None)
        update_lab_json(d, "sts", pid=None)
    print(json.dumps({"service": "sts", "running": False, "old_pid": sts, "port": conf["sts"]["port"]}))
    return 0


def start_service(a):
    d, st, conf = running_lab(a)
    port = conf["sts"]["port"]
    t0 = time.monotonic()
    deadline = t0 + a.timeout
    with lab_lock(d):
        state = State(d)
        sts, _ = lab_pids(d, state.data)
        healthy = False
        if sts:
            try:
                healthy = http_ok(port)
            except OSError:
                pass
        if sts and healthy:
            say("STS already running (pid %d)" % sts)
        else:
            if sts:  # alive but not answering: replace it
                kill_sts(sts)
            while True:  # the same port; retry while someone else briefly holds it
                proc = launch_sts(d, port, state)
                try:
                    wait_for("STS health on 127.0.0.1:%d" % port, lambda: http_ok(port),
                             min(10, left(deadline)), proc)
                    break
                except LabError as e:
                    if proc.poll() is None:
                        kill_sts(proc.pid)
                    if time.monotonic() + 0.5 > deadline:
                        try:
                            tail = open(os.path.join(d, "sts.out"), errors="replace").read()[-1500:]
                        except OSError:
                            tail = ""
                        raise LabError("STS did not come back on 127.0.0.1:%d within %g s: %s\n%s"
                                       % (port, a.timeout, e, tail))
                    time.sleep(0.2)
            sts = proc.pid
            update_lab_json(d, "sts", pid=sts)
            say("STS %d up on 127.0.0.1:%d in %.2f s" % (sts, port, time.monotonic() - t0))
    print(json.dumps({"service": "sts", "running": True, "pid": sts, "port": port,
                      "seconds": round(time.monotonic() - t0, 3)}))
    return 0


def token(a):
    conf = load_json(os.path.join(os.path.abspath(a.dir), "lab.json"))
    if not conf:
        raise LabError("no lab.json in %s" % a.dir)
    master = open(conf["master_secret_file"], "rb").read().strip()
    akid = conf["base"]["access_key_id"]
    if a.engine not in conf:
        raise LabError("this lab has no %s (started with --no-mysql?)" % a.engine)
    endpoint = a.endpoint or "localhost:%d" % conf[a.engine]["port"]
    print(sign_token(akid, derive_secret(master, akid), endpoint, a.user, a.region or conf["region"]))
    return 0


def web_token(a):
    conf = load_json(os.path.join(os.path.abspath(a.dir), "lab.json"))
    if not conf or "web_identity" not in conf:
        raise LabError("no lab.json with a web_identity section in %s" % a.dir)
    master = open(conf["master_secret_file"], "rb").read().strip()
    wi = conf["web_identity"]
    print(mint_web_token(master, a.iss or wi["issuer"], a.sub or wi["subject"], a.aud or wi["audience"],
                         a.expires_in))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("--dir", required=True)
    s.add_argument("--region", default="us-east-1")
    s.add_argument("--pg-port", type=int, default=0, help="default: a free port")
    s.add_argument("--mysql-port", type=int, default=0, help="MariaDB port; default: a free port")
    s.add_argument("--no-mysql", action="store_true", help="no MariaDB (lab.json then has no \"mysql\" section)")
    s.add_argument("--sts-min-duration", type=int, default=900,
                   help="lowest DurationSeconds STS accepts (AWS: 900; the lab allows down to 60)")
    s.add_argument("--no-smoke", action="store_true", help="skip the IAM login smoke test")
    s.add_argument("--max-connections", type=int, default=300,
                   help="max_connections of both servers (default 300; the soak bench uses 1,200)")
    for name in ("stop", "status"):
        x = sub.add_parser(name)
        x.add_argument("--dir", required=True)
        if name == "stop":
            x.add_argument("--purge", action="store_true", help="also delete DIR")
    t = sub.add_parser("token")
    t.add_argument("--dir", required=True)
    t.add_argument("--engine", choices=["postgres", "mysql"], default="postgres",
                   help="default endpoint localhost:<port of this engine>")
    t.add_argument("--user", default=IAM_USER)
    t.add_argument("--endpoint")
    t.add_argument("--region")
    r = sub.add_parser("restart", help="emulate an RDS failover/reboot of one engine (same port, data, PAM service)")
    r.add_argument("--dir", required=True)
    r.add_argument("--engine", choices=["postgres", "mysql"], required=True)
    r.add_argument("--mode", choices=["fast", "immediate", "kill"], default="fast",
                   help="fast: clean shutdown (PostgreSQL sends FATAL 57P01); immediate: pg_ctl -m immediate "
                        "(postgres only); kill: SIGKILL, no goodbye, crash recovery")
    r.add_argument("--timeout", type=float, default=60, help="give up after this many seconds (default 60)")
    r.add_argument("--no-smoke", action="store_true", help="skip the IAM login after the restart")
    for name in ("stop-service", "start-service"):
        x = sub.add_parser(name, help="%s one lab service on its port (for outage tests)" % name.split("-")[0])
        x.add_argument("--dir", required=True)
        x.add_argument("--service", choices=["sts"], required=True)
        if name == "start-service":
            x.add_argument("--timeout", type=float, default=60, help="give up after this many seconds")
    w = sub.add_parser("web-token", help="print a web identity JWT signed for this lab (for tests)")
    w.add_argument("--dir", required=True)
    w.add_argument("--expires-in", type=int, default=WEB_TOKEN_SECONDS, help="seconds; negative = already expired")
    w.add_argument("--aud")
    w.add_argument("--sub")
    w.add_argument("--iss")
    a = ap.parse_args()
    if a.cmd == "start":
        global MAX_CONNECTIONS
        MAX_CONNECTIONS = a.max_connections
    if a.cmd == "start" and not 60 <= a.sts_min_duration <= 900:
        ap.error("--sts-min-duration must be within 60..900")
    try:
        return {"start": start, "stop": stop, "status": status, "token": token, "web-token": web_token,
                "restart": restart, "stop-service": stop_service, "start-service": start_service}[a.cmd](a)
    except LabError as e:
        say("ERROR: %s" % e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
