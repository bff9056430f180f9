//! PostgreSQL end to end, against the lab: a real PostgreSQL 15 that verifies every IAM
//! token through PAM with a verifier independent of our signer, a strict STS emulator, and
//! real clients (psql, tokio-postgres) talking plain TCP to the proxy.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio_postgres::error::SqlState;

fn start_one(lab: &Lab, spec: &TargetSpec) -> ProxyProcess {
    ProxyProcess::start(lab, &spec.toml(), &[spec.port], &["--log-level", "debug"])
}

#[tokio::test]
async fn cross_account_chain_psql_and_tokio_postgres_land_on_the_iam_user() {
    let lab = Lab::get();
    let sess = session("chain");
    let spec = TargetSpec::new(&lab, "orders", &sess);
    let _proxy = start_one(&lab, &spec);

    let (ok, out, err) = psql(spec.port, "bytebase", "postgres", "select current_user");
    assert!(ok, "psql failed: {err}");
    assert_eq!(out, "bytebase");

    let client = pg(spec.port, "bytebase", "postgres").await.unwrap();
    let row = client
        .query_one(
            "select current_user::text, current_setting('application_name')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "bytebase");

    // The chain really ran at STS: base user -> hop role (with external id) -> target role.
    let calls = lab.sts_calls(&sess);
    let roles: HashSet<String> = calls
        .iter()
        .filter(|c| c["ok"] == true)
        .map(|c| c["role_arn"].as_str().unwrap().to_string())
        .collect();
    assert!(
        roles.contains(&lab.s("/roles/hop/arn")) && roles.contains(&lab.s("/roles/target/arn")),
        "{calls:?}"
    );
    // And the server verified tokens signed by the target role's session.
    let v = lab.verifications(&sess);
    assert!(v.iter().filter(|r| r["ok"] == true).count() >= 2, "{v:?}");
}

#[tokio::test]
async fn startup_parameters_and_database_pass_through() {
    let lab = Lab::get();
    let sess = session("params");
    let spec = TargetSpec::new(&lab, "orders", &sess).set("database", "\"appdb\"");
    let _proxy = start_one(&lab, &spec);
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(spec.port)
        .user("bytebase")
        .application_name("bytebase-app")
        .options("-c statement_timeout=4321")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one("select current_database()::text, current_setting('application_name'), current_setting('statement_timeout')", &[])
        .await
        .unwrap();
    // tokio-postgres names no database here, so the target's default applies.
    assert_eq!(row.get::<_, String>(0), "appdb");
    assert_eq!(row.get::<_, String>(1), "bytebase-app");
    assert_eq!(row.get::<_, String>(2), "4321ms");

    let (ok, out, err) = psql(spec.port, "bytebase", "appdb", "select current_database()");
    assert!(ok, "{err}");
    assert_eq!(out, "appdb");
}

#[tokio::test]
async fn fifty_concurrent_connections_cost_one_assume_role_per_hop_and_one_token() {
    let lab = Lab::get();
    let sess = session("burst");
    let spec = TargetSpec::new(&lab, "orders", &sess);
    let _proxy = start_one(&lab, &spec);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let port = spec.port;
        tasks.push(tokio::spawn(async move {
            let c = pg(port, "bytebase", "postgres").await?;
            let r = c.query_one("select current_user::text", &[]).await?;
            Ok::<String, tokio_postgres::Error>(r.get(0))
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "bytebase");
    }
    // Counted by the STS emulator and the verifier, not by the proxy.
    let calls = lab.sts_calls(&sess);
    let hop = calls
        .iter()
        .filter(|c| c["role_arn"] == lab.s("/roles/hop/arn").as_str())
        .count();
    let target = calls
        .iter()
        .filter(|c| c["role_arn"] == lab.s("/roles/target/arn").as_str())
        .count();
    assert_eq!((hop, target), (1, 1), "AssumeRole calls: {calls:?}");
    let v = lab.verifications(&sess);
    assert_eq!(v.iter().filter(|r| r["ok"] == true).count(), 50, "{v:?}");
    let tokens: HashSet<&str> = v
        .iter()
        .map(|r| r["token_sha256"].as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 1, "one token for all 50 logins");
}

#[tokio::test]
async fn extended_protocol_transactions_copy_and_large_results_are_exact() {
    let lab = Lab::get();
    let sess = session("data");
    let spec = TargetSpec::new(&lab, "orders", &sess);
    let _proxy = start_one(&lab, &spec);
    let mut client = pg(spec.port, "bytebase", "postgres").await.unwrap();
    let table = format!("t_data_{}", std::process::id());
    client
        .batch_execute(&format!(
            "drop table if exists {table}; create table {table} (id int primary key, body text)"
        ))
        .await
        .unwrap();

    // Prepared statements (Parse/Bind/Execute) with parameters, both ways.
    let ins = client
        .prepare(&format!("insert into {table} values ($1, $2)"))
        .await
        .unwrap();
    for i in 0..10 {
        client
            .execute(&ins, &[&i, &format!("row-{i}-ü")])
            .await
            .unwrap();
    }
    let sel = client
        .prepare(&format!("select body from {table} where id = $1"))
        .await
        .unwrap();
    assert_eq!(
        client
            .query_one(&sel, &[&7i32])
            .await
            .unwrap()
            .get::<_, String>(0),
        "row-7-ü"
    );

    // A transaction that rolls back leaves nothing; one that commits is visible.
    let tx = client.transaction().await.unwrap();
    tx.execute(&format!("delete from {table}"), &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute(&format!("update {table} set body = 'x' where id = 1"), &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let n: i64 = client
        .query_one(
            &format!("select count(*) from {table} where body <> 'x'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 9);

    // COPY in and out, 10 MB, byte for byte.
    client
        .batch_execute("create temp table blob (line text)")
        .await
        .unwrap();
    let mut data = Vec::with_capacity(10 << 20);
    let mut i = 0u64;
    while data.len() < 10 << 20 {
        data.extend_from_slice(format!("{i:016x}-{}\n", "abcdefghij".repeat(10)).as_bytes());
        i += 1;
    }
    let sink = client.copy_in("copy blob from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    for chunk in data.chunks(64 * 1024) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    let rows = sink.finish().await.unwrap();
    assert_eq!(rows, i);
    let stream = client.copy_out("copy blob to stdout").await.unwrap();
    futures_util::pin_mut!(stream);
    let mut back = Vec::with_capacity(data.len());
    use futures_util::StreamExt;
    while let Some(chunk) = stream.next().await {
        back.extend_from_slice(&chunk.unwrap());
    }
    assert!(
        back == data,
        "COPY OUT differs from COPY IN ({} vs {} bytes)",
        back.len(),
        data.len()
    );

    // A 100,000-row result, every row checked.
    let rows = client
        .query(
            "select g, md5(g::text) from generate_series(1, 100000) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 100_000);
    let expected: Vec<(i32, String)> = client
        .query(
            "select g, md5(g::text) from generate_series(1, 100000) g",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (k, r) in rows.iter().enumerate() {
        assert_eq!(r.get::<_, i32>(0), k as i32 + 1);
        assert_eq!(&r.get::<_, String>(1), &expected[k].1);
    }
    assert_eq!(expected[0].1, "c4ca4238a0b923820dcc509a6f75849b"); // md5("1")
    client
        .batch_execute(&format!("drop table {table}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn cancel_reaches_the_upstream_that_owns_the_session() {
    let lab = Lab::get();
    let sess = session("cancel");
    let spec = TargetSpec::new(&lab, "orders", &sess);
    let _proxy = start_one(&lab, &spec);
    let client = pg(spec.port, "bytebase", "postgres").await.unwrap();
    let other = pg(spec.port, "bytebase", "postgres").await.unwrap();
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.query("select pg_sleep(30)", &[]).await });
    // Wait until the server really runs the sleep, as seen from another session.
    loop {
        let n: i64 = other
            .query_one("select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'", &[])
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    // Far below the 30 s sleep: only a delivered cancel ends it this soon.
    let res = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("cancel did not end the query")
        .unwrap();
    let err = res.expect_err("the sleep should have been cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
}

#[tokio::test]
async fn rds_style_host_is_signed_and_verified_while_dialing_connect_to() {
    let lab = Lab::get();
    let sess = session("connect-to");
    let name = lab.s("/postgres/endpoint_name");
    let spec = TargetSpec::new(&lab, "orders", &sess)
        .set("host", &format!("\"{name}\""))
        .set("port", "5432")
        .set("connect_to", &format!("\"127.0.0.1:{}\"", lab.pg_port()))
        .unset("region"); // read from the RDS-style name
    let _proxy = start_one(&lab, &spec);
    let (ok, out, err) = psql(spec.port, "bytebase", "postgres", "select current_user");
    assert!(ok, "{err}");
    assert_eq!(out, "bytebase");
    let v = lab.verifications(&sess);
    assert!(!v.is_empty());
    for r in &v {
        assert_eq!(
            r["endpoint"],
            format!("{name}:5432").as_str(),
            "the token names the endpoint, not the dialed address"
        );
        assert_eq!(r["ok"], true);
    }
}

#[tokio::test]
async fn encryption_requests_are_declined_and_the_session_continues_in_plain() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let lab = Lab::get();
    let sess = session("negotiation");
    let spec = TargetSpec::new(&lab, "orders", &sess);
    let _proxy = start_one(&lab, &spec);
    // GSSENCRequest, then SSLRequest, each answered 'N', as a server without them does.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", spec.port))
        .await
        .unwrap();
    for code in [80877104i32, 80877103] {
        let mut m = 8i32.to_be_bytes().to_vec();
        m.extend_from_slice(&code.to_be_bytes());
        s.write_all(&m).await.unwrap();
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
    }
    drop(s);
    // psql's default (sslmode=prefer) falls back to plain and logs in.
    let out = std::process::Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=bytebase dbname=postgres sslmode=prefer",
            spec.port
        ))
        .args(["-X", "-tAc", "select current_user"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "bytebase",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_silent_upstream_is_given_up_after_connect_timeout() {
    let lab = Lab::get();
    let sess = session("silent");
    // Accepts TCP, never answers: a hung server or a half-open tunnel.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let spec = TargetSpec::new(&lab, "orders", &sess)
        .set("connect_to", &format!("\"{addr}\""))
        .set("connect_timeout", "1");
    let _proxy = start_one(&lab, &spec);
    let res = tokio::time::timeout(
        Duration::from_secs(20),
        pg(spec.port, "bytebase", "postgres"),
    )
    .await
    .expect("the proxy must not hang");
    let Err(err) = res else { panic!("must fail") };
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "08001");
    assert!(
        db.message().contains(&addr.to_string()) && db.message().contains("no answer"),
        "{}",
        db.message()
    );
    drop(silent);
}

/// stunnel (OpenSSL, session tickets on) terminating the PostgreSQL TLS negotiation in front
/// of the lab's server, then negotiating TLS to it again: a server that offers resumption,
/// where PostgreSQL itself does not. Killed on drop.
struct TicketingFront {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl TicketingFront {
    fn start(lab: &Lab) -> TicketingFront {
        let (port, inner) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("rip-stunnel-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("stunnel.log");
        let conf = format!(
            "foreground = yes\npid =\ndebug = info\noutput = {log}\n\
             [front]\nclient = no\nprotocol = pgsql\naccept = 127.0.0.1:{port}\n\
             connect = 127.0.0.1:{inner}\ncert = {cert}\nkey = {key}\n\
             [back]\nclient = yes\nprotocol = pgsql\naccept = 127.0.0.1:{inner}\n\
             connect = 127.0.0.1:{pg}\nverifyChain = yes\nCAfile = {ca}\ncheckHost = localhost\n",
            log = log.display(),
            cert = lab.s("/server_cert_file"),
            key = lab.s("/server_key_file"),
            ca = lab.s("/ca_file"),
            pg = lab.pg_port(),
        );
        let path = dir.join("stunnel.conf");
        std::fs::write(&path, conf).unwrap();
        let child = std::process::Command::new("stunnel4")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("stunnel4 (deploy/lab/install-deps.sh installs it)");
        eventually(Duration::from_secs(10), "stunnel listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        TicketingFront { child, port, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stunnel.log")).unwrap_or_default()
    }
}

impl Drop for TicketingFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn reconnects_resume_the_tls_session_where_the_server_offers_tickets() {
    let lab = Lab::get();
    let front = TicketingFront::start(&lab);
    let sess = session("resume");
    // Dialed through the front; the token still names the server's own endpoint.
    let ticketed = TargetSpec::new(&lab, "ticketed", &sess)
        .set("connect_to", &format!("\"127.0.0.1:{}\"", front.port));
    // PostgreSQL itself turns session caching and tickets off: every handshake is full.
    let plain = TargetSpec::new(&lab, "unticketed", &sess);
    let proxy = ProxyProcess::start(
        &lab,
        &format!("{}{}", ticketed.toml(), plain.toml()),
        &[ticketed.port, plain.port],
        &["--log-level", "debug"],
    );
    for spec in [&ticketed, &plain] {
        for _ in 0..3 {
            let (ok, out, err) = psql(spec.port, "bytebase", "postgres", "select current_user");
            assert!(ok && out == "bytebase", "{}: {out} {err}", spec.name);
        }
    }

    let (_, m) = proxy.admin("/metrics");
    let count = |target: &str, kind: &str| {
        sample(
            &m,
            &format!("rds_iam_proxy_upstream_tls_handshakes_total{{target=\"{target}\",engine=\"postgres\",kind=\"{kind}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        (count("ticketed", "full"), count("ticketed", "resumed")),
        (1.0, 2.0),
        "{m}"
    );
    assert_eq!(
        (count("unticketed", "full"), count("unticketed", "resumed")),
        (3.0, 0.0),
        "{m}"
    );
    // The server side agrees: stunnel resumed two sessions.
    let log = front.log();
    assert_eq!(log.matches("previous session reused").count(), 2, "{log}");
    // Each login still presented a fresh token check at the real server (PAM).
    assert!(
        lab.verifications(&sess)
            .iter()
            .filter(|r| r["ok"] == true)
            .count()
            >= 6
    );
}

/// The proxy's connected TCP sockets, duplicated into this process (pidfd_getfd, as root),
/// with their local and peer ports.
fn proxy_tcp_sockets(pid: u32) -> Vec<(socket2::Socket, u16, u16)> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscalls on integers; a returned descriptor is owned by the Socket.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) } as i32;
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let link = std::fs::read_link(entry.path()).unwrap_or_default();
        if !link.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let n: i32 = entry.file_name().to_str().unwrap().parse().unwrap();
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, n, 0) } as i32;
        if fd < 0 {
            continue; // closed meanwhile
        }
        let s = unsafe { socket2::Socket::from_raw_fd(fd) };
        let ends = (s.local_addr(), s.peer_addr());
        if let (Ok(local), Ok(peer)) = ends {
            if let (Some(l), Some(p)) = (local.as_socket(), peer.as_socket()) {
                out.push((s, l.port(), p.port()));
            }
        }
    }
    unsafe { libc::close(pidfd) };
    out
}

#[tokio::test]
async fn both_legs_of_a_session_send_small_packets_at_once() {
    // TCP_NODELAY on the client's and the server's socket: without it a query written in
    // two pieces waits for the peer's delayed ACK (up to 40 ms) on either leg.
    let lab = Lab::get();
    let sess = session("nodelay");
    let spec = TargetSpec::new(&lab, "orders", &sess);
    let proxy = start_one(&lab, &spec);
    let client = pg(spec.port, "bytebase", "postgres").await.unwrap();
    client.simple_query("select 1").await.unwrap();

    let sockets = proxy_tcp_sockets(proxy.pid());
    let client_leg: Vec<_> = sockets.iter().filter(|s| s.1 == spec.port).collect();
    let server_leg: Vec<_> = sockets.iter().filter(|s| s.2 == lab.pg_port()).collect();
    assert_eq!((client_leg.len(), server_leg.len()), (1, 1), "{sockets:?}");
    for (s, local, peer) in client_leg.iter().chain(&server_leg) {
        assert!(
            s.tcp_nodelay().unwrap(),
            "{local} -> {peer} without TCP_NODELAY"
        );
    }
    // Keepalive toward the server: a peer gone behind a NAT is noticed.
    assert!(server_leg[0].0.keepalive().unwrap());
}

#[tokio::test]
async fn the_ca_bundle_is_read_once_not_per_connection() {
    // The verifier is built from ca_file at start (and on reload), not per connection: a
    // bundle removed after start does not break new sessions.
    let lab = Lab::get();
    let sess = session("ca-once");
    let ca = std::env::temp_dir().join(format!("rip-ca-once-{}.pem", std::process::id()));
    std::fs::copy(lab.s("/ca_file"), &ca).unwrap();
    let spec =
        TargetSpec::new(&lab, "orders", &sess).set("ca_file", &format!("\"{}\"", ca.display()));
    let _proxy = start_one(&lab, &spec);
    let (ok, _, err) = psql(spec.port, "bytebase", "postgres", "select 1");
    assert!(ok, "{err}");
    std::fs::remove_file(&ca).unwrap();
    for _ in 0..2 {
        let (ok, out, err) = psql(spec.port, "bytebase", "postgres", "select current_user");
        assert!(ok && out == "bytebase", "{out} {err}");
    }
}
