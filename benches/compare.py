#!/usr/bin/env python3
"""Issue 6 comparison: rds-iam-proxy against a direct TLS connection, pgbouncer and a minimal
tokio + rustls relay, on the lab's PostgreSQL and MariaDB. Figures, not a test. (pgdog is
not among them: it does not build here, see docs/performance.md.)

Run through benches/compare.sh, which installs the tools, builds the binaries and starts a lab.
Every measurement alternates its paths round by round (A B C A B C ...) so that drift on the
shared machine falls on all of them alike; medians of the rounds are reported.

Paths (PostgreSQL):
  direct   client -> TLS (verify-full) -> server, password user lab_pass
  proxy    client -> plain -> rds-iam-proxy -> TLS + IAM token -> server, IAM user (role chain)
  proxy-unix  the same proxy process, the client on its unix socket instead of TCP
  pgbouncer client -> plain -> pgbouncer (session pool) -> TLS -> server, lab_pass
  relay    client -> plain -> minimal relay (SSLRequest + TLS, copy_bidirectional) -> server, lab_md5

Placement (--placement):
  shared  nothing pinned: the server, the client (pgbench, sysbench, psql) and the path under
          test share the machine's cores as the scheduler places them (the default).
  split   the database servers pinned to the last CPU, everything else (this script, the
          clients and the path under test) to the first: the shape of production, where the
          proxy runs beside the application and RDS on hosts of its own.
"""
import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def log(*a):
    print("[compare %6.1fs]" % (time.monotonic() - T0), *a, file=sys.stderr, flush=True)


T0 = time.monotonic()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc=None, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit("process for port %d exited with %s" % (port, proc.returncode))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("nothing listens on port %d" % port)


def cpu_seconds(pid):
    """utime + stime of a process and its threads, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def switches(pid):
    """Context switches of all the process's threads: (voluntary, involuntary). A voluntary one
    is a thread going to sleep for want of work, so each is one wake-up later."""
    vol = inv = 0
    for t in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/status" % (pid, t)) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        inv += int(line.split()[1])
        except FileNotFoundError:
            pass
    return vol, inv


def server_cpu_seconds(pid):
    """CPU of a server process, its threads and its children, live (a pooler's backends) or
    reaped (PostgreSQL's backends exit with their connections and land in the postmaster's
    cutime/cstime)."""
    def ticks(p, n):
        try:
            with open("/proc/%d/stat" % p) as f:
                return sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:11 + n])
        except FileNotFoundError:
            return 0  # exited meanwhile: counted once reaped
    live = run(["pgrep", "-P", str(pid)], check=False).stdout.split()
    return (ticks(pid, 4) + sum(ticks(int(c), 2) for c in live)) / os.sysconf("SC_CLK_TCK")


def children_cpu():
    """CPU of this script's reaped children: the client programs (pgbench)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def machine_ticks():
    """(busy, all) clock ticks of every CPU since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def server_pids(lab):
    """The lab's database server processes: PostgreSQL's postmaster and its children, mariadbd."""
    pids = [lab.pg["pid"]] + ([lab.my["pid"]] if lab.my else [])
    return pids + [int(x) for x in run(["pgrep", "-P", str(lab.pg["pid"])], check=False).stdout.split()]


def place(args, lab):
    """--placement split: servers on the last CPU, this script and all it starts on the first."""
    if args.placement != "split":
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--placement split needs two CPUs")
    for pid in server_pids(lab):
        # -a: every thread; PostgreSQL's later backends inherit the postmaster's mask, MariaDB's
        # later connection threads that of the thread that creates them.
        run(["taskset", "-a", "-p", "-c", str(cpus[-1]), str(pid)])
    os.sched_setaffinity(0, {cpus[0]})
    log("placement split: servers on CPU %d, clients and paths on CPU %d" % (cpus[-1], cpus[0]))


def unplace(args, lab):
    if args.placement == "split":
        for pid in server_pids(lab):
            run(["taskset", "-a", "-p", "-c", "0-%d" % (os.cpu_count() - 1), str(pid)], check=False)


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run(cmd, env=None, check=True, **kw):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise SystemExit("command failed (%d): %s\n%s%s" % (p.returncode, " ".join(cmd), p.stdout, p.stderr))
    return p


class Lab:
    def __init__(self, path):
        self.d = json.load(open(path))
        self.pg = self.d["postgres"]
        self.my = self.d.get("mysql")
        self.ca = self.d["ca_file"]

    def pg_admin(self, sql, db="appdb"):
        run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.pg["socket_dir"], "-p", str(self.pg["port"]),
             "-U", "postgres", "-d", db, "-c", sql], env=dict(os.environ, PGUSER="postgres"))

    def my_admin(self, sql):
        run(["mariadb", "--socket", self.my["socket"], "-u", "root", "-e", sql])


class Proc:
    """A path under test: a process we started, whose CPU and memory we read."""

    def __init__(self, name, cmd, port, env=None):
        self.name, self.port = name, port
        self.p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        wait_port(port, self.p)
        self.pid = self.p.pid

    def stop(self):
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
            self.p.wait(timeout=10)
        except Exception:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except Exception:
                pass


def start_proxy(args, lab, work):
    port, trust_port, my_port, admin = free_port(), free_port(), free_port(), free_port()
    d = lab.d
    chain = '[[target.role_chain]]\nrole_arn = "%s"\nexternal_id = "%s"\n' % (
        d["roles"]["hop"]["arn"], d["roles"]["hop"]["external_id"])
    common = ('region = "%s"\nca_file = "%s"\naccess_key_id = "%s"\nsecret_access_key = "%s"\n'
              'role_arn = "%s"\nmax_connections = 5000\n') % (
        d["region"], lab.ca, d["base"]["access_key_id"], d["base"]["secret_access_key"], d["roles"]["target"]["arn"])
    sock_dir = os.path.join(work, "sock")
    os.makedirs(sock_dir, exist_ok=True)
    unix_port = free_port()
    targets = [("pg", "postgres", port, lab.pg, lab.pg["iam_user"]),
               ("pg_trust", "postgres", trust_port, lab.pg, "lab_trust"),
               # libpq finds a server socket as DIR/.s.PGSQL.PORT.
               ("pg_unix", "postgres", "unix:%s/.s.PGSQL.%d" % (sock_dir, unix_port), lab.pg, lab.pg["iam_user"])]
    if lab.my:
        targets.append(("my", "mysql", my_port, lab.my, lab.my["iam_user"]))
    cfg = '[admin]\nlisten = "127.0.0.1:%d"\n' % admin
    if getattr(args, "proxy_workers", None):
        cfg += "[proxy]\nworker_threads = %d\n" % args.proxy_workers
    for name, engine, p, srv, user in targets:
        listen = p if isinstance(p, str) else "127.0.0.1:%d" % p
        cfg += ('\n[[target]]\nname = "%s"\nengine = "%s"\nlisten = "%s"\nhost = "localhost"\nport = %d\n'
                'db_user = "%s"\ndatabase = "appdb"\n' % (name, engine, listen, srv["port"], user)) + common + chain
    path = os.path.join(work, "proxy.toml")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(cfg)
    env = dict(os.environ, AWS_ENDPOINT_URL_STS=d["sts"]["endpoint"], AWS_EC2_METADATA_DISABLED="true")
    proc = Proc("proxy", [args.proxy, "--config", path, "--log-level", "warn"], port, env=env)
    proc.trust_port, proc.my_port, proc.sock_dir, proc.unix_port = trust_port, my_port, sock_dir, unix_port
    return proc


def start_relay(args, lab):
    port = free_port()
    env = dict(os.environ, MINIMAL_RELAY_LISTEN="127.0.0.1:%d" % port,
               MINIMAL_RELAY_UPSTREAM="localhost:%d" % lab.pg["port"], MINIMAL_RELAY_CA=lab.ca)
    return Proc("relay", [args.relay], port, env=env)


def start_pgbouncer(lab, work):
    port = free_port()
    d = os.path.join(work, "pgbouncer")
    os.makedirs(d, exist_ok=True)
    shutil.copy(lab.ca, os.path.join(d, "ca.pem"))
    users = lab.pg["users"]
    with open(os.path.join(d, "userlist.txt"), "w") as f:
        for u in ("lab_pass", "lab_trust"):
            f.write('"%s" "%s"\n' % (u, users[u]))
    with open(os.path.join(d, "pgbouncer.ini"), "w") as f:
        f.write("""[databases]
appdb = host=localhost port=%d dbname=appdb
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s/userlist.txt
pool_mode = session
max_client_conn = 5000
default_pool_size = 1100
server_tls_sslmode = verify-full
server_tls_ca_file = %s/ca.pem
ignore_startup_parameters = extra_float_digits
logfile = %s/pgbouncer.log
pidfile = %s/pgbouncer.pid
log_connections = 0
log_disconnections = 0
query_wait_timeout = 30
""" % (lab.pg["port"], port, d, d, d, d))
    run(["chown", "-R", "postgres:postgres", d])
    # pgbouncer refuses to run as root: it drops to postgres itself (-u), keeping the raised
    # descriptor limit that runuser's PAM session would reset to 1,024.
    return Proc("pgbouncer", ["pgbouncer", "-u", "postgres", os.path.join(d, "pgbouncer.ini")], port)


def pg_conn(path, procs, lab, user_kind):
    """libpq environment for a path; user_kind "pass" (throughput) or "trust" (connection setup)."""
    env = dict(os.environ, PGDATABASE="appdb", PGCONNECT_TIMEOUT="10")
    for k in ("PGSERVICE", "PGSSLMODE", "PGPASSWORD"):
        env.pop(k, None)
    user = "lab_pass" if user_kind == "pass" else "lab_trust"
    if path == "direct":
        env.update(PGHOST="localhost", PGPORT=str(lab.pg["port"]), PGSSLMODE="verify-full", PGSSLROOTCERT=lab.ca,
                   PGUSER=user)
    elif path == "proxy-unix":
        p = procs["proxy"]
        env.update(PGHOST=p.sock_dir, PGPORT=str(p.unix_port), PGUSER=lab.pg["iam_user"])
    elif path == "proxy":
        p = procs["proxy"]
        env.update(PGHOST="127.0.0.1", PGSSLMODE="disable",
                   PGPORT=str(p.port if user_kind == "pass" else p.trust_port),
                   PGUSER=lab.pg["iam_user"] if user_kind == "pass" else "lab_trust")
    else:
        if path == "relay" and user == "lab_pass":
            # The server offers SCRAM-SHA-256-PLUS (it sees TLS), which libpq refuses over the
            # relay's plain side: the relay's password user is the md5 one.
            user = "lab_md5"
        env.update(PGHOST="127.0.0.1", PGPORT=str(procs[path].port), PGSSLMODE="disable", PGUSER=user)
    if env["PGUSER"] in ("lab_pass", "lab_md5"):
        env["PGPASSWORD"] = lab.pg["users"][env["PGUSER"]]
    return env


def measured(procs, path, fn):
    """Run fn(); return (its result, CPU seconds and voluntary context switches of the path's
    own process meanwhile)."""
    proc = procs.get(path) or (procs.get("proxy") if path.startswith("proxy") else None)
    if proc is None:
        return fn(), None, None
    cpu, sw = cpu_seconds(proc.pid), switches(proc.pid)[0]
    out = fn()
    return out, cpu_seconds(proc.pid) - cpu, switches(proc.pid)[0] - sw


def pgbench(env, clients, seconds, connect_each=False):
    cmd = ["pgbench", "-n", "-S", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds)]
    if connect_each:
        cmd.append("-C")
    out = run(cmd, env=env).stdout
    m = re.search(r"tps = ([\d.]+)", out)
    if not m:
        raise SystemExit("no tps in pgbench output:\n" + out)
    txns = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    return float(m.group(1)), txns


def bench_pgbench(args, lab, procs, paths, results):
    for clients in args.clients:
        rows = {p: [] for p in paths}
        for r in range(args.rounds):
            for path in paths:
                env = pg_conn(path, procs, lab, "pass")
                srv, kids, (busy, ticks) = server_cpu_seconds(lab.pg["pid"]), children_cpu(), machine_ticks()
                (tps, txns), cpu, sw = measured(procs, path, lambda: pgbench(env, clients, args.seconds))
                busy2, ticks2 = machine_ticks()
                time.sleep(0.3)  # the backends exit and are reaped into the postmaster's account
                rows[path].append({"tps": tps, "cpu_us_per_txn": cpu * 1e6 / txns if cpu is not None else None,
                                   "wakeups_per_txn": sw / txns if sw is not None else None,
                                   "server_us_per_txn": (server_cpu_seconds(lab.pg["pid"]) - srv) * 1e6 / txns,
                                   "client_us_per_txn": (children_cpu() - kids) * 1e6 / txns,
                                   "busy": (busy2 - busy) / (ticks2 - ticks)})
                log("pgbench -S c=%d round %d %-10s %9.0f tps%s" % (
                    clients, r + 1, path, tps, "" if cpu is None else
                    "  %.1f µs CPU/txn, %.2f wake-ups/txn in the path" % (cpu * 1e6 / txns, sw / txns)))
        results["pgbench"][str(clients)] = rows


def bench_syscalls(args, lab, procs, paths, results):
    """System calls per transaction of each path's process (strace -c -f during pgbench -S at
    8 clients). strace slows everything down; the count per transaction is what is read."""
    rows = {}
    for path in paths:
        if path not in procs:
            continue
        out = os.path.join(tempfile.gettempdir(), "rip-compare-strace-%s.txt" % path)
        tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(procs[path].pid), "-o", out],
                                  stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached before the clients start
        _, txns = pgbench(pg_conn(path, procs, lab, "pass"), 8, 5)
        tracer.send_signal(signal.SIGINT)
        tracer.wait()
        calls = {}
        for line in open(out):
            f = line.split()
            if len(f) >= 5 and f[0][0].isdigit() and not line.strip().endswith("total"):
                calls[f[-1]] = int(f[3])
        os.unlink(out)
        rows[path] = {"per_txn": sum(calls.values()) / txns,
                      "top": {k: v / txns for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:5]}}
        log("syscalls via %-9s %.2f per txn: %s" % (path, rows[path]["per_txn"], ", ".join(
            "%s %.2f" % kv for kv in rows[path]["top"].items())))
    results["syscalls"] = rows


def bench_instructions(args, lab, results, work):
    """User-space instructions per transaction under callgrind (counts, not seconds: noise
    does not move them), for the proxy and the minimal relay. A second instance of each runs
    under valgrind; counters are zeroed after a warm-up and dumped after 200 and after 1,200
    pgbench -S transactions on one connection, so the connection's setup cancels out."""
    rows = {}
    for path in ("proxy", "relay"):
        if path == "relay" and not args.relay:
            continue
        out = os.path.join(work, "callgrind-%s" % path)
        os.makedirs(out, exist_ok=True)
        wrap = os.path.join(work, "valgrind-%s.sh" % path)
        binary = args.proxy if path == "proxy" else args.relay
        with open(wrap, "w") as f:
            f.write('#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file=%s/cg.%%p '
                    '--dump-instr=no "%s" "$@"\n' % (out, binary))
        os.chmod(wrap, 0o755)
        ns = argparse.Namespace(**vars(args))
        ns.proxy, ns.relay = wrap, wrap
        proc = start_proxy(ns, lab, os.path.join(work, "cg-proxy")) if path == "proxy" else start_relay(ns, lab)
        try:
            env = pg_conn(path, {path: proc}, lab, "pass")
            run(["pgbench", "-n", "-S", "-c", "1", "-t", "50"], env=env)
            totals = []
            for n in (200, 1200):
                run(["callgrind_control", "-z", str(proc.pid)])
                run(["pgbench", "-n", "-S", "-c", "1", "-t", str(n)], env=env)
                before = set(os.listdir(out))
                run(["callgrind_control", "-d", str(proc.pid)])
                dumped = sorted(set(os.listdir(out)) - before)
                total = 0
                for name in dumped:
                    for line in open(os.path.join(out, name)):
                        if line.startswith("summary:") or line.startswith("totals:"):
                            total = max(total, int(line.split()[1]))
                totals.append(total)
            rows[path] = {"instructions_per_txn": (totals[1] - totals[0]) / 1000}
            log("callgrind %-6s %.0f instructions per pgbench -S transaction" % (
                path, rows[path]["instructions_per_txn"]))
        finally:
            proc.stop()
    results["instructions"] = rows


def connect_latency(env, n):
    import psycopg2
    kw = dict(host=env["PGHOST"], port=int(env["PGPORT"]), user=env["PGUSER"], dbname="appdb",
              sslmode=env["PGSSLMODE"])
    if env["PGSSLMODE"] != "disable":
        kw["sslrootcert"] = env["PGSSLROOTCERT"]
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        c = psycopg2.connect(**kw)
        cur = c.cursor()
        cur.execute("SELECT 1")
        cur.fetchone()
        lat.append((time.perf_counter() - t) * 1000)
        c.close()
    return lat


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def bench_connect(args, lab, procs, results):
    paths = ["direct", "proxy"]
    rows = {p: {"rate": [], "median_ms": [], "p99_ms": []} for p in paths}
    for r in range(args.rounds):
        for path in paths:
            env = pg_conn(path, procs, lab, "trust")
            rate, _ = pgbench(env, args.connect_clients, max(5, args.seconds // 2), connect_each=True)
            lat = connect_latency(env, args.connect_samples)
            rows[path]["rate"].append(rate)
            rows[path]["median_ms"].append(statistics.median(lat))
            rows[path]["p99_ms"].append(pct(lat, 0.99))
            log("connect round %d %-7s %7.0f conn+query/s (%d clients)  median %.2f ms  p99 %.2f ms" % (
                r + 1, path, rate, args.connect_clients, statistics.median(lat), pct(lat, 0.99)))
    results["connect"] = rows


def bench_copy(args, lab, procs, paths, results, work):
    rows_n = args.copy_mb * 1024 * 1024 // 1001
    data = os.path.join(work, "copy.data")
    with open(data, "w") as f:
        line = "x" * 1000 + "\n"
        chunk = line * 1024
        for _ in range(rows_n // 1024):
            f.write(chunk)
    size = os.path.getsize(data)
    lab.pg_admin("CREATE UNLOGGED TABLE IF NOT EXISTS copy_in (t text); "
                 "GRANT ALL ON copy_in TO lab_pass, lab_md5, %s" % lab.pg["iam_user"])
    out_sql = "COPY (SELECT repeat('x', 1000) FROM generate_series(1, %d)) TO STDOUT" % (size // 1001)
    rows = {d: {p: [] for p in paths} for d in ("out", "in")}
    for r in range(args.rounds):
        for path in paths:
            env = pg_conn(path, procs, lab, "pass")
            lab.pg_admin("TRUNCATE copy_in")
            t = time.perf_counter()
            with open(os.devnull, "w") as sink:
                subprocess.run(["psql", "-X", "-q", "-c", out_sql], env=env, stdout=sink, check=True)
            mbs_out = size / (time.perf_counter() - t) / 1e6
            t = time.perf_counter()
            with open(data) as src:
                subprocess.run(["psql", "-X", "-q", "-c", "COPY copy_in FROM STDIN"], env=env, stdin=src,
                               check=True)
            mbs_in = size / (time.perf_counter() - t) / 1e6
            rows["out"][path].append(mbs_out)
            rows["in"][path].append(mbs_in)
            log("COPY %d MB round %d %-9s out %6.0f MB/s  in %6.0f MB/s" % (size // 1000000, r + 1, path, mbs_out,
                                                                          mbs_in))
    lab.pg_admin("TRUNCATE copy_in")
    os.unlink(data)
    results["copy"] = rows
    results["copy_bytes"] = size


def bench_idle(args, lab, procs, paths, results):
    import psycopg2
    rows = {}
    for path in paths:
        env = pg_conn(path, procs, lab, "trust")
        pid = procs[path].pid
        base = rss_kib(pid)
        conns = []
        for _ in range(args.idle):
            conns.append(psycopg2.connect(host=env["PGHOST"], port=int(env["PGPORT"]), user=env["PGUSER"],
                                          dbname="appdb", sslmode="disable"))
        connected = rss_kib(pid)
        for c in conns:
            cur = c.cursor()
            cur.execute("SELECT 1")
            cur.fetchone()
            c.commit()
        queried = rss_kib(pid)
        for c in conns:
            c.close()
        rows[path] = {"base_kib": base, "connected_kib": connected, "queried_kib": queried,
                      "per_conn_kib": (queried - base) / args.idle,
                      "per_conn_connected_kib": (connected - base) / args.idle}
        log("idle %d via %-9s RSS %d -> %d (connected) -> %d KiB (one query each): %.1f KiB/conn" % (
            args.idle, path, base, connected, queried, rows[path]["per_conn_kib"]))
        time.sleep(1)  # let the closes land before the next path's baseline
    results["idle"] = rows


def sysbench_dir(lab, work):
    """sysbench 1.0.20 with --mysql-ssl=on loads cacert.pem, client-cert.pem and client-key.pem
    from its working directory: the lab CA, and a client certificate that CA signs."""
    d = os.path.join(work, "sysbench")
    os.makedirs(d, exist_ok=True)
    shutil.copy(lab.ca, os.path.join(d, "cacert.pem"))
    key, csr, crt = (os.path.join(d, n) for n in ("client-key.pem", "client.csr", "client-cert.pem"))
    run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-subj", "/CN=sysbench",
         "-out", csr])
    run(["openssl", "x509", "-req", "-in", csr, "-CA", lab.ca, "-CAkey",
         os.path.join(lab.d["dir"], "certs", "ca.key"), "-CAcreateserial", "-days", "2", "-out", crt])
    return d


def sysbench(lab, procs, path, test, threads, seconds, prepare=False):
    my = lab.my
    cmd = ["sysbench", test, "--db-driver=mysql", "--mysql-db=appdb", "--tables=1", "--table-size=10000",
           "--threads=%d" % threads, "--time=%d" % seconds, "--report-interval=0", "--db-ps-mode=auto"]
    if path == "direct":
        cmd += ["--mysql-host=127.0.0.1", "--mysql-port=%d" % my["port"], "--mysql-user=lab_pass",
                "--mysql-password=" + my["users"]["lab_pass"]]
        cmd += [] if prepare else ["--mysql-ssl=on"]
    else:
        cmd += ["--mysql-host=127.0.0.1", "--mysql-port=%d" % procs["proxy"].my_port,
                "--mysql-user=" + my["iam_user"], "--mysql-ssl=off"]
    out = run(cmd + ["prepare" if prepare else "run"], cwd=lab.sysbench_dir).stdout
    if prepare:
        return None
    m = re.search(r"transactions:\s+(\d+)\s+\(([\d.]+) per sec", out)
    if not m:
        raise SystemExit("no transactions in sysbench output:\n" + out)
    return float(m.group(2)), int(m.group(1))


def ssl_accepts(lab):
    out = run(["mariadb", "--socket", lab.my["socket"], "-u", "root", "-N", "-e",
               "SHOW GLOBAL STATUS LIKE 'Ssl_accepts'"]).stdout
    return int(out.split()[1])


def bench_sysbench(args, lab, procs, results, work):
    lab.sysbench_dir = sysbench_dir(lab, work)
    lab.my_admin("DROP TABLE IF EXISTS appdb.sbtest1")
    sysbench(lab, procs, "direct", "oltp_point_select", 1, 1, prepare=True)
    paths = ["direct", "proxy"]
    for test in ("oltp_point_select", "oltp_read_only"):
        results["sysbench"][test] = {}
        for threads in args.clients:
            rows = {p: [] for p in paths}
            for r in range(args.rounds):
                for path in paths:
                    before = ssl_accepts(lab)
                    (tps, txns), cpu, _ = measured(procs, path, lambda: sysbench(lab, procs, path, test, threads,
                                                                                args.seconds))
                    tls = ssl_accepts(lab) - before
                    if tls < threads:
                        raise SystemExit("sysbench %s did not use TLS toward the server" % path)
                    rows[path].append({"tps": tps, "cpu_us_per_txn": cpu * 1e6 / txns if cpu is not None else None})
                    log("sysbench %s t=%d round %d %-7s %8.0f tps" % (test, threads, r + 1, path, tps))
            results["sysbench"][test][str(threads)] = rows


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


TARGETS = {"1": 0.85, "8": 0.80, "32": 0.85}


def report(args, results, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    L = []
    m = results["machine"]
    placement = results["settings"].get("placement", "shared")
    L.append("Machine: %s, %d CPUs, Linux %s; %s. %s" % (
        m["cpu"], m["cpus"], m["kernel"], m["when"],
        "Placement split: the database servers pinned to the last CPU; the clients and the path under test "
        "to the first." if placement == "split" else
        "Processes not pinned: server, client and the path under test share the CPUs as the scheduler "
        "places them."))
    L.append("")
    L.append("## PostgreSQL `pgbench -S` (select-only), tps, median of %d rounds of %d s" % (
        args.rounds, args.seconds))
    L.append("")
    paths = results["paths"]
    L.append("| clients | " + " | ".join(paths) + " | " + " | ".join("%s / direct" % p for p in paths[1:]) +
             " | target (proxy) |")
    L.append("|---" * (2 * len(paths) + 1) + "|")
    for c, rows in results["pgbench"].items():
        m = {p: med([x["tps"] for x in rows[p]]) for p in paths}
        L.append("| %s | " % c + " | ".join("%.0f" % m[p] for p in paths) + " | " +
                 " | ".join("%.2f" % (m[p] / m["direct"]) for p in paths[1:]) + " | %s |" % TARGETS.get(c, ""))
    for title, key, fmt in (
            ("CPU time the path's own process spent per transaction (µs, median of rounds; the direct "
             "path has no process of its own):", "cpu_us_per_txn", "%.1f"),
            ("Voluntary context switches (wake-ups) of the path's process per transaction:",
             "wakeups_per_txn", "%.2f")):
        L += ["", title, "", "| clients | " + " | ".join(paths[1:]) + " |", "|---" * len(paths) + "|"]
        for c, rows in results["pgbench"].items():
            L.append("| %s | " % c + " | ".join(fmt % med([x[key] for x in rows[p]]) for p in paths[1:]) + " |")
    if any("busy" in x for rows in results["pgbench"].values() for r in rows.values() for x in r):
        L += ["", "CPU per transaction by process, µs (client = pgbench, server = PostgreSQL with its backends, "
              "path = the process in between), and how busy the machine's CPUs were:", "",
              "| clients | path | client | server | path | sum | CPUs busy |", "|---|---|---|---|---|---|---|"]
        for c, rows in results["pgbench"].items():
            for p in paths:
                v = {k: med([x.get(k) for x in rows[p]]) for k in
                     ("client_us_per_txn", "server_us_per_txn", "cpu_us_per_txn", "busy")}
                own = v["cpu_us_per_txn"] or 0.0
                L.append("| %s | %s | %.1f | %.1f | %s | %.1f | %.0f %% |" % (
                    c, p, v["client_us_per_txn"], v["server_us_per_txn"],
                    "-" if v["cpu_us_per_txn"] is None else "%.1f" % own,
                    v["client_us_per_txn"] + v["server_us_per_txn"] + own, 100 * v["busy"]))
    if results.get("syscalls"):
        L.append("")
        L.append("System calls of the path's process per transaction (strace -c -f, pgbench -S, 8 clients):")
        L.append("")
        L.append("| path | syscalls/txn | most frequent |")
        L.append("|---|---|---|")
        for p, r in results["syscalls"].items():
            L.append("| %s | %.2f | %s |" % (p, r["per_txn"], ", ".join("%s %.2f" % kv for kv in r["top"].items())))
    if results.get("instructions"):
        L.append("")
        L.append("User-space instructions per transaction (callgrind, pgbench -S, 1 client): " + ", ".join(
            "%s %.0f" % (p, r["instructions_per_txn"]) for p, r in results["instructions"].items()))
    if "connect" in results:
        r = results["connect"]
        L.append("")
        L.append("## Connection setup (`hostssl ... trust` user, connect + `SELECT 1` + close)")
        L.append("")
        L.append("| path | conn+query/s (pgbench -C, %d clients) | median ms (sequential) | p99 ms |" %
                 args.connect_clients)
        L.append("|---|---|---|---|")
        for p in ("direct", "proxy"):
            L.append("| %s | %.0f | %.2f | %.2f |" % (p, med(r[p]["rate"]), med(r[p]["median_ms"]),
                                                       med(r[p]["p99_ms"])))
        L.append("")
        L.append("proxy / direct rate: %.2f (target ≥ 1.00); median difference %+.2f ms (target ≤ +0.5 ms)" % (
            med(r["proxy"]["rate"]) / med(r["direct"]["rate"]),
            med(r["proxy"]["median_ms"]) - med(r["direct"]["median_ms"])))
    if "copy" in results:
        L.append("")
        L.append("## COPY, %d MB, MB/s (psql, median of rounds)" % (results["copy_bytes"] // 1000000))
        L.append("")
        cp = results["copy"]
        cpaths = list(cp["out"].keys())
        L.append("| direction | " + " | ".join(cpaths) + " | " + " | ".join("%s / direct" % p for p in cpaths[1:]) +
                 " |")
        L.append("|---" * (2 * len(cpaths)) + "|")
        for d in ("out", "in"):
            m = {p: med(cp[d][p]) for p in cpaths}
            L.append("| %s | " % d + " | ".join("%.0f" % m[p] for p in cpaths) + " | " +
                     " | ".join("%.2f" % (m[p] / m["direct"]) for p in cpaths[1:]) + " |")
    if "idle" in results:
        L.append("")
        L.append("## Memory with %d idle connections (RSS growth / connections)" % args.idle)
        L.append("")
        L.append("| path | RSS before KiB | connected KiB | after one query each KiB | KiB/conn connected | "
                 "KiB/conn after a query |")
        L.append("|---|---|---|---|---|---|")
        for p, r in results["idle"].items():
            L.append("| %s | %d | %d | %d | %.1f | %.1f |" % (p, r["base_kib"], r["connected_kib"], r["queried_kib"],
                                                              r["per_conn_connected_kib"], r["per_conn_kib"]))
    if results.get("sysbench"):
        L.append("")
        L.append("## MariaDB sysbench, tps, median of rounds")
        L.append("")
        L.append("| test | threads | direct TLS | proxy | proxy / direct | proxy CPU µs/txn |")
        L.append("|---|---|---|---|---|---|")
        for test, by in results["sysbench"].items():
            for t, rows in by.items():
                d, p = med([x["tps"] for x in rows["direct"]]), med([x["tps"] for x in rows["proxy"]])
                L.append("| %s | %s | %.0f | %.0f | %.2f | %.1f |" % (
                    test, t, d, p, p / d, med([x["cpu_us_per_txn"] for x in rows["proxy"]])))
    text = "\n".join(L) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    chart(results, os.path.join(out_dir, "chart.png"))
    print(text)


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = results["paths"]
    fig, axes = plt.subplots(1, 2 if results.get("sysbench") else 1, figsize=(11, 4.2), squeeze=False)
    ax = axes[0][0]
    clients = list(results["pgbench"].keys())
    w = 0.8 / (len(paths) - 1)
    for i, p in enumerate(paths[1:]):
        ratios = [med([x["tps"] for x in results["pgbench"][c][p]]) /
                  med([x["tps"] for x in results["pgbench"][c]["direct"]]) for c in clients]
        ax.bar([j + i * w for j in range(len(clients))], ratios, w, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(clients))], ["%s clients" % c for c in clients])
    ax.set_ylabel("tps / direct TLS")
    ax.set_title("pgbench -S through each path")
    ax.legend(fontsize=8)
    if results.get("sysbench"):
        ax = axes[0][1]
        tests = list(results["sysbench"].keys())
        for i, t in enumerate(tests):
            by = results["sysbench"][t]
            ratios = [med([x["tps"] for x in by[c]["proxy"]]) / med([x["tps"] for x in by[c]["direct"]])
                      for c in clients]
            ax.bar([j + i * 0.4 for j in range(len(clients))], ratios, 0.4, label=t)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.2 for j in range(len(clients))], ["%s threads" % c for c in clients])
        ax.set_title("sysbench through rds-iam-proxy")
        ax.set_ylabel("tps / direct TLS")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lab", required=True, help="lab.json of a running lab")
    ap.add_argument("--proxy", required=True, help="rds-iam-proxy binary (release)")
    ap.add_argument("--relay", help="minimal relay binary (benches/minimal_relay.rs)")
    ap.add_argument("--proxy-workers", type=int, help="[proxy] worker_threads for the proxy (default: its own)")
    ap.add_argument("--out", required=True, help="directory for results.json, results.md, chart.png")
    ap.add_argument("--placement", choices=("shared", "split"), default="shared",
                    help="shared: nothing pinned; split: servers on the last CPU, the rest on the first")
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--connect-clients", type=int, default=4)
    ap.add_argument("--connect-samples", type=int, default=500)
    ap.add_argument("--copy-mb", type=int, default=1024)
    ap.add_argument("--idle", type=int, default=1000)
    parts = "pgbench,syscalls,instructions,connect,copy,idle,sysbench"
    ap.add_argument("--only", default=parts, help="comma-separated subset of " + parts)
    ap.add_argument("--report-from", help="only write the report from a results.json of an earlier run")
    args = ap.parse_args()
    if args.report_from:
        with open(args.report_from) as f:
            results = json.load(f)
        vars(args).update({k: v for k, v in results["settings"].items() if k in ("seconds", "rounds", "idle",
                                                                                "connect_clients")})
        report(args, results, args.out)
        return
    only = set(args.only.split(","))
    lab = Lab(args.lab)
    work = tempfile.mkdtemp(prefix="rip-compare-")
    os.chmod(work, 0o755)
    procs = {}
    place(args, lab)
    try:
        log("preparing pgbench tables (scale 1) in appdb")
        run(["pgbench", "-i", "-q", "-s", "1", "-h", lab.pg["socket_dir"], "-p", str(lab.pg["port"]), "-U",
             "postgres", "appdb"])
        lab.pg_admin("GRANT SELECT ON ALL TABLES IN SCHEMA public TO lab_pass, lab_md5, lab_trust, %s" % lab.pg["iam_user"])
        procs["proxy"] = start_proxy(args, lab, work)
        procs["pgbouncer"] = start_pgbouncer(lab, work)
        if args.relay:
            procs["relay"] = start_relay(args, lab)
        paths = ["direct", "proxy", "proxy-unix", "pgbouncer"] + (["relay"] if args.relay else [])
        results = {"paths": paths, "pgbench": {}, "sysbench": {},
                   "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release, "cpu": cpu_model(),
                               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                   "settings": {k: v for k, v in vars(args).items() if k not in ("lab",)}}
        # Warm every path once (token minted, role chain assumed, pools filled).
        for path in paths:
            pgbench(pg_conn(path, procs, lab, "pass"), 2, 1)
        os.makedirs(args.out, exist_ok=True)
        sections = [
            ("pgbench", lambda: bench_pgbench(args, lab, procs, paths, results)),
            ("syscalls", lambda: bench_syscalls(args, lab, procs, paths, results)),
            ("instructions", lambda: bench_instructions(args, lab, results, work)),
            ("connect", lambda: bench_connect(args, lab, procs, results)),
            ("copy", lambda: bench_copy(args, lab, procs, paths, results, work)),
            # pgbouncer last: it keeps its 1,000 server connections pooled afterwards.
            ("idle", lambda: bench_idle(args, lab, procs, sorted((p for p in paths if p in procs),
                                                                 key=lambda p: p == "pgbouncer"), results)),
            ("sysbench", lambda: bench_sysbench(args, lab, procs, results, work) if lab.my else None),
        ]
        for name, section in sections:
            if name in only:
                section()
                # Kept as it goes: a late failure does not lose the earlier sections.
                with open(os.path.join(args.out, "results.json"), "w") as f:
                    json.dump(results, f, indent=1)
        report(args, results, args.out)
    finally:
        for p in procs.values():
            p.stop()
        unplace(args, lab)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
