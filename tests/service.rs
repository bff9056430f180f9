//! Running it like a production sidecar: metrics, probes, signals, sd_notify, `check`.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// A PostgreSQL session spoken by hand, so every byte is counted: startup, one query,
/// Terminate. Returns (bytes sent after the startup message, bytes received).
fn counted_pg_session(port: u16) -> (u64, u64) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let params = b"user\0bytebase\0database\0postgres\0\0";
    let mut startup = ((8 + params.len()) as i32).to_be_bytes().to_vec();
    startup.extend(196608i32.to_be_bytes());
    startup.extend(params);
    s.write_all(&startup).unwrap();
    let mut received = 0u64;
    let mut until_ready = |s: &mut TcpStream| loop {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).unwrap();
        let len = i32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).unwrap();
        received += (1 + len) as u64;
        assert_ne!(head[0], b'E', "error: {}", String::from_utf8_lossy(&body));
        if head[0] == b'Z' {
            break;
        }
    };
    until_ready(&mut s);
    let mut sent = 0u64;
    let sql = b"select 1\0";
    let mut q = vec![b'Q'];
    q.extend(((4 + sql.len()) as i32).to_be_bytes());
    q.extend(sql);
    s.write_all(&q).unwrap();
    sent += q.len() as u64;
    until_ready(&mut s);
    s.write_all(&[b'X', 0, 0, 0, 4]).unwrap();
    sent += 5;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    (sent, received + rest.len() as u64)
}

fn metrics_of(p: &ProxyProcess) -> String {
    let (status, body) = p.admin("/metrics");
    assert_eq!(status, 200);
    body
}

#[test]
fn metrics_show_exact_counts_and_bytes_after_a_known_mix_and_pass_promtool() {
    let lab = Lab::get();
    let sess = session("metrics");
    let good = TargetSpec::new(&lab, "good", &sess);
    let down = TargetSpec::new(&lab, "down", &sess)
        .set("connect_to", &format!("\"127.0.0.1:{}\"", free_port()));
    let config = good.toml() + &down.toml();
    let p = ProxyProcess::start(&lab, &config, &[good.port, down.port], &[]);

    let (mut sent, mut received) = (0, 0);
    for _ in 0..3 {
        let (s, r) = counted_pg_session(good.port);
        sent += s;
        received += r;
    }
    for _ in 0..2 {
        let (ok, _, _) = psql(good.port, "mallory", "postgres", "select 1");
        assert!(!ok);
    }
    let (ok, _, _) = psql(down.port, "bytebase", "postgres", "select 1");
    assert!(!ok);
    // Not PostgreSQL at all.
    let mut junk = TcpStream::connect(("127.0.0.1", good.port)).unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let _ = junk.read_to_end(&mut Vec::new());

    let g = r#"target="good",engine="postgres""#;
    let d = r#"target="down",engine="postgres""#;
    let m = eventually(Duration::from_secs(10), "every connection closed", || {
        let m = metrics_of(&p);
        (sample(
            &m,
            &format!("rds_iam_proxy_client_connections_active{{{g}}}"),
        ) == Some(0.0)
            && sample(
                &m,
                &format!("rds_iam_proxy_client_connections_active{{{d}}}"),
            ) == Some(0.0))
        .then_some(m)
    });
    let v = |series: String| sample(&m, &series).unwrap_or_else(|| panic!("no {series} in\n{m}"));
    assert_eq!(
        v(format!(
            "rds_iam_proxy_client_connections_accepted_total{{{g}}}"
        )),
        6.0
    );
    assert_eq!(
        v(format!(
            "rds_iam_proxy_client_connections_closed_total{{{g},result=\"ok\"}}"
        )),
        3.0
    );
    assert_eq!(
        v(format!(
            "rds_iam_proxy_client_connections_closed_total{{{g},result=\"auth_failed\"}}"
        )),
        2.0
    );
    assert_eq!(
        v(format!(
            "rds_iam_proxy_client_connections_closed_total{{{g},result=\"client_error\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(format!(
            "rds_iam_proxy_client_connections_accepted_total{{{d}}}"
        )),
        1.0
    );
    assert_eq!(
        v(format!(
            "rds_iam_proxy_client_connections_closed_total{{{d},result=\"upstream_error\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(format!(
            "rds_iam_proxy_upstream_errors_total{{{d},kind=\"connect\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(format!(
            "rds_iam_proxy_relayed_bytes_total{{{g},direction=\"client_to_server\"}}"
        )),
        sent as f64
    );
    assert_eq!(
        v(format!(
            "rds_iam_proxy_relayed_bytes_total{{{g},direction=\"server_to_client\"}}"
        )),
        received as f64
    );
    assert_eq!(
        v(format!("rds_iam_proxy_handshake_seconds_count{{{g}}}")),
        3.0
    );
    assert_eq!(
        v("rds_iam_proxy_tokens_minted_total{target=\"good\"}".into()),
        1.0
    );
    assert!(v("rds_iam_proxy_token_expiry_timestamp_seconds{target=\"good\"}".into()) > 1.7e9);
    assert_eq!(
        v(format!(
            "rds_iam_proxy_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );

    // promtool lints the exposition (naming, units, types).
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.trim().is_empty(),
        "promtool: {text}"
    );
}

/// An HTTP forwarder in front of the lab's STS that the test can break, and that makes
/// every credential it passes expire 75 s from now (so tokens expire within the test).
struct StsGate {
    port: u16,
    broken: Arc<AtomicBool>,
}

impl StsGate {
    fn start(sts: String) -> StsGate {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let broken = Arc::new(AtomicBool::new(false));
        let b = broken.clone();
        let upstream = sts.trim_start_matches("http://").to_string();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                if b.load(Ordering::SeqCst) {
                    continue; // dropped: connection closed, no answer
                }
                let upstream = upstream.clone();
                std::thread::spawn(move || {
                    let _ = forward_one(&mut c, &upstream);
                });
            }
        });
        StsGate { port, broken }
    }
}

fn forward_one(c: &mut TcpStream, upstream: &str) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    let header_end = loop {
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
        if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&req[..header_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    while req.len() < header_end + len {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    // One request per upstream connection, so its end marks the end of the answer.
    let mut forwarded: Vec<u8> = head
        .trim_end()
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect::<Vec<_>>()
        .join("\r\n")
        .into_bytes();
    forwarded.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    forwarded.extend_from_slice(&req[header_end..]);
    let mut u = TcpStream::connect(upstream)?;
    u.write_all(&forwarded)?;
    let mut resp = Vec::new();
    u.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).to_string();
    let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(75);
    let soon = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        soon.year(),
        soon.month() as u8,
        soon.day(),
        soon.hour(),
        soon.minute(),
        soon.second()
    );
    let rewritten = match (text.find("<Expiration>"), text.find("</Expiration>")) {
        (Some(a), Some(b)) => {
            let body_start = text.find("\r\n\r\n").unwrap() + 4;
            let body = format!("{}<Expiration>{soon}{}", &text[body_start..a], &text[b..]);
            let head: Vec<String> = text[..body_start]
                .lines()
                .filter(|l| !l.is_empty())
                .map(|l| {
                    if l.to_ascii_lowercase().starts_with("content-length:") {
                        format!("Content-Length: {}", body.len())
                    } else {
                        l.to_string()
                    }
                })
                .collect();
            format!("{}\r\n\r\n{body}", head.join("\r\n"))
        }
        _ => text,
    };
    c.write_all(rewritten.as_bytes())?;
    Ok(())
}

#[test]
fn readiness_turns_503_when_sts_fails_and_the_token_expires_then_recovers() {
    let lab = Lab::get();
    let sess = session("readiness");
    let gate = StsGate::start(lab.sts_endpoint());
    let spec = TargetSpec::new(&lab, "orders", &sess);
    let p = ProxyProcess::start_env(
        &lab,
        &spec.toml(),
        &[spec.port],
        &[],
        &[(
            "AWS_ENDPOINT_URL_STS",
            &format!("http://127.0.0.1:{}", gate.port),
        )],
    );
    for _ in 0..400 {
        if p.admin("/readiness").0 == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(p.admin("/readiness").0, 200, "{}", p.output());
    assert_eq!(p.admin("/startup").0, 200);
    assert_eq!(p.admin("/liveness").0, 200);

    gate.broken.store(true, Ordering::SeqCst);
    // STS is down but a valid token is cached: new connections keep working.
    let (ok, out, err) = psql(spec.port, "bytebase", "postgres", "select current_user");
    assert!(ok, "{err}");
    assert_eq!(out, "bytebase");
    // Credentials from the gate live 75 s and a token is not handed out in its last
    // minute: within about a minute no valid token is left.
    let body = eventually(Duration::from_secs(150), "readiness 503", || {
        let (status, body) = p.admin("/readiness");
        (status == 503).then_some(body)
    });
    assert!(body.contains("target orders: no valid token"), "{body}");
    // Once the credentials themselves have expired, a client gets the cause, not a hang.
    let err = eventually(Duration::from_secs(150), "a refused client", || {
        let (ok, _, err) = psql(spec.port, "bytebase", "postgres", "select 1");
        (!ok).then_some(err)
    });
    assert!(
        err.contains("cannot get an IAM token") && err.contains("cannot reach STS"),
        "{err}"
    );
    assert_eq!(p.admin("/liveness").0, 200, "alive while not ready");

    gate.broken.store(false, Ordering::SeqCst);
    eventually(Duration::from_secs(90), "readiness back to 200", || {
        (p.admin("/readiness").0 == 200).then_some(())
    });
    let (ok, out, err) = psql(spec.port, "bytebase", "postgres", "select current_user");
    assert!(ok, "{err}");
    assert_eq!(out, "bytebase");
}

#[tokio::test]
async fn sigterm_refuses_new_connections_lets_the_open_session_finish_and_exits_0() {
    let lab = Lab::get();
    let sess = session("sigterm");
    let spec = TargetSpec::new(&lab, "orders", &sess);
    let mut p = ProxyProcess::start(
        &lab,
        &format!("[proxy]\nshutdown_grace = 60\n{}", spec.toml()),
        &[spec.port],
        &[],
    );
    let client = pg(spec.port, "bytebase", "postgres").await.unwrap();
    let running = tokio::spawn(async move {
        let r = client
            .query_one("select pg_sleep(2)::text, 'finished'", &[])
            .await;
        (r, client)
    });
    // The query is running on the server.
    let other = pg(spec.port, "bytebase", "postgres").await.unwrap();
    loop {
        let n: i64 = other
            .query_one("select count(*) from pg_stat_activity where query like 'select pg_sleep(2)%' and state = 'active'", &[])
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(other);
    p.signal("TERM");
    // New connections are refused while the session runs.
    let port = spec.port;
    tokio::task::spawn_blocking(move || {
        eventually(Duration::from_secs(10), "the listener closed", || {
            TcpStream::connect(("127.0.0.1", port)).err().map(|_| ())
        })
    })
    .await
    .unwrap();
    let (r, client) = running.await.unwrap();
    assert_eq!(
        r.expect("the open session finishes its query")
            .get::<_, String>(1),
        "finished"
    );
    assert!(p.admin("/readiness").0 == 503 || p.admin("/readiness").0 == 0);
    drop(client);
    let code = tokio::task::spawn_blocking(move || p.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn sighup_adds_and_removes_targets_without_cutting_open_sessions() {
    let lab = Lab::get();
    let sess = session("sighup");
    let keep = TargetSpec::new(&lab, "keep", &sess);
    let gone = TargetSpec::new(&lab, "gone", &sess);
    let added = TargetSpec::new(&lab, "added", &sess);
    let p = ProxyProcess::start(
        &lab,
        &(keep.toml() + &gone.toml()),
        &[keep.port, gone.port],
        &[],
    );
    let on_gone = pg(gone.port, "bytebase", "postgres").await.unwrap();
    on_gone.query_one("select 1", &[]).await.unwrap();

    // An invalid config is refused, counted, and changes nothing.
    let admin = std::fs::read_to_string(&p.config_path).unwrap();
    let head = admin.split("[[target]]").next().unwrap().to_string();
    std::fs::write(
        &p.config_path,
        format!("{head}{}\nbogus_key = 1\n", keep.toml()),
    )
    .unwrap();
    p.signal("HUP");
    eventually(
        Duration::from_secs(10),
        "the refused reload counted",
        || {
            sample(
                &metrics_of(&p),
                "rds_iam_proxy_config_reloads_total{result=\"error\"}",
            )
            .filter(|v| *v == 1.0)
        },
    );
    assert!(
        psql(gone.port, "bytebase", "postgres", "select 1").0,
        "the old config stays"
    );

    std::fs::write(
        &p.config_path,
        format!("{head}{}{}", keep.toml(), added.toml()),
    )
    .unwrap();
    p.signal("HUP");
    let port = added.port;
    tokio::task::spawn_blocking(move || {
        eventually(Duration::from_secs(10), "the added target", || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        })
    })
    .await
    .unwrap();
    let (ok, out, err) = psql(added.port, "bytebase", "postgres", "select current_user");
    assert!(ok, "{err}");
    assert_eq!(out, "bytebase");
    assert!(
        TcpStream::connect(("127.0.0.1", gone.port)).is_err(),
        "the removed target is refused"
    );
    assert!(psql(keep.port, "bytebase", "postgres", "select 1").0);
    // The session opened on the removed target goes on.
    let row = on_gone
        .query_one("select 'still here'", &[])
        .await
        .expect("open session kept");
    assert_eq!(row.get::<_, String>(0), "still here");
    assert_eq!(
        sample(
            &metrics_of(&p),
            "rds_iam_proxy_config_reloads_total{result=\"ok\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn sd_notify_ready_after_the_first_tokens_then_status_watchdog_and_stopping() {
    let lab = Lab::get();
    let sess = session("notify");
    let spec = TargetSpec::new(&lab, "orders", &sess);
    let dir = std::env::temp_dir().join(format!("rip-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut p = ProxyProcess::start_env(
        &lab,
        &spec.toml(),
        &[spec.port],
        &[],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = sock.recv(&mut buf).expect("a notification");
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        if msg.contains("READY=1") {
            // By now the chain ran and the first token exists.
            assert!(
                !lab.sts_calls(&sess).is_empty(),
                "READY before the first token"
            );
            assert_eq!(p.admin("/startup").0, 200);
            seen.push(msg);
            break;
        }
        seen.push(msg);
    }
    assert!(
        seen.iter()
            .any(|m| m.contains("STATUS=minting the first tokens")),
        "{seen:?}"
    );
    assert!(
        seen.last().unwrap().contains("STATUS=serving 1 targets"),
        "{seen:?}"
    );
    let mut watchdog = 0;
    while watchdog < 2 {
        let n = sock.recv(&mut buf).unwrap();
        if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
            watchdog += 1;
        }
    }
    p.signal("TERM");
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING=1");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    assert_eq!(p.wait_exit(Duration::from_secs(30)), Some(0));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_reports_each_target_with_cause_and_fix() {
    let lab = Lab::get();
    let sess = session("check");
    let good = TargetSpec::new(&lab, "good", &sess);
    let good_my = TargetSpec::mysql(&lab, "good-mysql", &sess);
    let ext = TargetSpec::new(&lab, "wrong-extid", &session("check-ext")).hop_external_id("not-it");
    let ca = TargetSpec::new(&lab, "wrong-ca", &sess)
        .set("ca_file", &format!("\"{}\"", lab.s("/other_ca_file")));
    let dir = std::env::temp_dir().join(format!("rip-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.toml");
    std::fs::write(
        &cfg,
        good.toml() + &good_my.toml() + &ext.toml() + &ca.toml(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--log-level",
            "error",
            "check",
            "--connect",
        ])
        .env("AWS_ENDPOINT_URL_STS", lab.sts_endpoint())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let row = |name: &str| {
        let i = stdout
            .find(&format!(" {name} "))
            .unwrap_or_else(|| panic!("no row for {name}: {stdout}"));
        let start = stdout[..i].rfind('\n').map(|n| n + 1).unwrap_or(0);
        let rest = &stdout[start..];
        let end = rest[1..]
            .find("\nPASS")
            .or_else(|| rest[1..].find("\nFAIL"))
            .map(|n| n + 1)
            .unwrap_or(rest.len());
        rest[..end].to_string()
    };
    assert!(
        row("good").starts_with("PASS") && row("good").contains("IAM login"),
        "{stdout}"
    );
    assert!(
        row("good-mysql").starts_with("PASS") && row("good-mysql").contains("IAM login"),
        "{stdout}"
    );
    let r = row("wrong-extid");
    assert!(
        r.starts_with("FAIL")
            && r.contains("AccessDenied")
            && r.contains("fix:")
            && r.contains("external_id"),
        "{r}"
    );
    let r = row("wrong-ca");
    assert!(
        r.starts_with("FAIL") && r.contains("not signed by a CA in ca_file") && r.contains("fix:"),
        "{r}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn json_logs_have_one_open_and_one_close_line_per_connection() {
    let lab = Lab::get();
    let sess = session("jsonlog");
    let spec = TargetSpec::new(&lab, "orders", &sess);
    let mut p = ProxyProcess::start(&lab, &spec.toml(), &[spec.port], &["--log-format", "json"]);
    let (ok, _, err) = psql(spec.port, "bytebase", "appdb", "select 1");
    assert!(ok, "{err}");
    let (ok, _, _) = psql(spec.port, "eve", "appdb", "select 1");
    assert!(!ok);
    let log = eventually(Duration::from_secs(10), "two close lines", || {
        let out = p.output();
        (out.matches("connection closed").count() == 2).then_some(out)
    });
    p.stop();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let with = |msg: &str| {
        lines
            .iter()
            .filter(|l| l["fields"]["message"] == msg)
            .collect::<Vec<_>>()
    };
    assert_eq!(with("connection opened").len(), 2);
    let closed = with("connection closed");
    let good = closed
        .iter()
        .find(|l| l["fields"]["user"] == "bytebase")
        .unwrap();
    for field in [
        "target",
        "client",
        "database",
        "duration_ms",
        "bytes_from_client",
        "bytes_to_client",
        "result",
    ] {
        assert!(!good["fields"][field].is_null(), "{field} missing: {good}");
    }
    assert_eq!(good["fields"]["result"], "ok");
    assert_eq!(good["fields"]["database"], "appdb");
    let bad = closed
        .iter()
        .find(|l| l["fields"]["user"] == "eve")
        .unwrap();
    assert_eq!(bad["fields"]["result"], "auth_failed");
    assert!(bad["fields"]["error"].as_str().unwrap().contains("\"eve\""));
    assert!(with("token minted").len() == 1 && !with("credentials refreshed").is_empty());
}
