//! Hostile and broken input: every malformed opening gets a protocol error and a closed
//! connection, the proxy stays up and keeps serving; limits and the handshake timeout hold.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// Send `bytes` (then half-close if `eof`), read until the proxy closes.
fn exchange(port: u16, bytes: &[u8], eof: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    if eof {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the proxy must close the connection, not hang");
    out
}

/// The (SQLSTATE, message) of a PostgreSQL ErrorResponse.
fn pg_error(reply: &[u8]) -> (String, String) {
    assert_eq!(
        reply.first(),
        Some(&b'E'),
        "not an ErrorResponse: {reply:?}"
    );
    let mut code = String::new();
    let mut message = String::new();
    let mut body = &reply[5..];
    while let Some((&tag, rest)) = body.split_first() {
        if tag == 0 {
            break;
        }
        let end = rest.iter().position(|&b| b == 0).unwrap();
        let text = String::from_utf8_lossy(&rest[..end]).to_string();
        match tag {
            b'C' => code = text,
            b'M' => message = text,
            _ => {}
        }
        body = &rest[end + 1..];
    }
    (code, message)
}

fn startup(code: i32, params: &[u8]) -> Vec<u8> {
    let mut m = ((8 + params.len()) as i32).to_be_bytes().to_vec();
    m.extend(code.to_be_bytes());
    m.extend(params);
    m
}

const TLS_CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, 0x5e, 0x1f, 0x00, 0x00, 0x00,
];

#[test]
fn malformed_postgres_openings_get_08p01_and_the_proxy_stays_up() {
    let lab = Lab::get();
    let spec = TargetSpec::new(&lab, "orders", &session("hostile-pg"));
    let _p = ProxyProcess::start(&lab, &spec.toml(), &[spec.port], &[]);
    let port = spec.port;
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        (
            "oversized length",
            [&[0u8, 1, 0, 0][..], &196608i32.to_be_bytes()].concat(),
            false,
            "invalid startup packet length 65536",
        ),
        (
            "length below 8",
            vec![0, 0, 0, 4, 0, 3, 0, 0],
            false,
            "invalid startup packet length 4",
        ),
        (
            "protocol 2.0",
            startup(0x0002_0000, b"user\0bytebase\0\0"),
            false,
            "unsupported frontend protocol 2.0",
        ),
        (
            "non-UTF-8 parameters",
            startup(196608, b"user\0\xff\xfebytebase\0\0"),
            false,
            "not valid UTF-8",
        ),
        (
            "TLS ClientHello",
            TLS_CLIENT_HELLO.to_vec(),
            false,
            "do not use TLS toward the proxy",
        ),
        (
            "HTTP request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
            "invalid startup packet length",
        ),
        (
            "no user",
            startup(196608, b"database\0postgres\0\0"),
            false,
            "names no user",
        ),
        (
            "truncated startup",
            [
                &100i32.to_be_bytes()[..],
                &196608i32.to_be_bytes(),
                b"user\0by",
            ]
            .concat(),
            true,
            "incomplete startup packet",
        ),
        (
            "short CancelRequest",
            [
                &12i32.to_be_bytes()[..],
                &80877102i32.to_be_bytes(),
                &7i32.to_be_bytes(),
            ]
            .concat(),
            false,
            "CancelRequest",
        ),
    ];
    for (name, bytes, eof, want) in &cases {
        let reply = exchange(port, bytes, *eof);
        let (code, message) = pg_error(&reply);
        assert_eq!(code, "08P01", "{name}: {message}");
        assert!(message.contains(want), "{name}: {message}");
    }
    // An unknown cancel key: silently closed, as PostgreSQL does.
    let unknown = [
        &16i32.to_be_bytes()[..],
        &80877102i32.to_be_bytes(),
        &1i32.to_be_bytes(),
        &2i32.to_be_bytes(),
    ]
    .concat();
    assert!(exchange(port, &unknown, false).is_empty());
    // Still serving.
    let (ok, out, err) = psql(port, "bytebase", "postgres", "select current_user");
    assert!(ok, "{err}");
    assert_eq!(out, "bytebase");
}

/// Read the greeting, send `payload` as packet 1 (raw bytes when `raw`), read the answer.
fn mysql_exchange(port: u16, payload: &[u8], raw: bool, eof: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    let mut greeting = vec![0u8; head[0] as usize | (head[1] as usize) << 8];
    s.read_exact(&mut greeting).unwrap();
    if raw {
        s.write_all(payload).unwrap();
    } else {
        let mut p = vec![
            payload.len() as u8,
            (payload.len() >> 8) as u8,
            (payload.len() >> 16) as u8,
            1,
        ];
        p.extend(payload);
        s.write_all(&p).unwrap();
    }
    if eof {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the proxy must close the connection, not hang");
    out
}

/// (error number, message) of the ERR packet in `reply`.
fn mysql_error(reply: &[u8]) -> (u16, String) {
    assert!(
        reply.len() > 13 && reply[4] == 0xff,
        "not an ERR packet: {reply:?}"
    );
    (
        u16::from_le_bytes([reply[5], reply[6]]),
        String::from_utf8_lossy(&reply[13..]).to_string(),
    )
}

fn handshake_response(caps: u32, user: &[u8]) -> Vec<u8> {
    let mut p = caps.to_le_bytes().to_vec();
    p.extend((16u32 << 20).to_le_bytes());
    p.push(45);
    p.extend([0u8; 23]);
    p.extend(user);
    p.push(0);
    p.push(0); // empty auth data
    p
}

const CLIENT_PROTOCOL_41: u32 = 0x200;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
const CLIENT_SSL: u32 = 0x800;

#[test]
fn malformed_mysql_handshakes_get_err_packets_and_the_proxy_stays_up() {
    let lab = Lab::get();
    let spec = TargetSpec::mysql(&lab, "shop", &session("hostile-my"));
    let _p = ProxyProcess::start(&lab, &spec.toml(), &[spec.port], &[]);
    let port = spec.port;
    let modern = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION;
    let mut ssl = (modern | CLIENT_SSL).to_le_bytes().to_vec();
    ssl.extend((16u32 << 20).to_le_bytes());
    ssl.push(45);
    ssl.extend([0u8; 23]);
    let cases: Vec<(&str, Vec<u8>, bool, bool, &str)> = vec![
        (
            "garbage response",
            b"\x01\x02\x03".to_vec(),
            false,
            false,
            "Bad handshake",
        ),
        (
            "truncated packet",
            vec![100, 0, 0, 1, 1, 2, 3],
            true,
            true,
            "Bad handshake",
        ),
        (
            "oversized length",
            vec![0xff, 0xff, 0xff, 1, 0, 0],
            true,
            false,
            "bytes during the handshake",
        ),
        ("SSLRequest", ssl, false, false, "--ssl-mode=DISABLED"),
        (
            "pre-4.1 client",
            handshake_response(CLIENT_SECURE_CONNECTION, b"bytebase"),
            false,
            false,
            "older than 4.1",
        ),
        (
            "non-UTF-8 user",
            handshake_response(modern, b"byte\xffbase"),
            false,
            false,
            "not UTF-8",
        ),
        (
            "TLS ClientHello",
            TLS_CLIENT_HELLO.to_vec(),
            true,
            true,
            "Bad handshake",
        ),
    ];
    for (name, payload, raw, eof, want) in &cases {
        let reply = mysql_exchange(port, payload, *raw, *eof);
        // The greeting came first; the ERR follows it.
        let (errno, message) = mysql_error(&reply);
        assert_eq!(errno, 1043, "{name}: {message}");
        assert!(message.contains(want), "{name}: {message}");
    }
    let out = std::process::Command::new("mariadb")
        .args([
            "-h",
            "127.0.0.1",
            "-P",
            &port.to_string(),
            "-u",
            "bytebase",
            "--skip-ssl",
            "-N",
            "-e",
            "select current_user()",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("bytebase@"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn one_connection_over_max_connections_gets_the_engines_error() {
    let lab = Lab::get();
    let sess = session("limits");
    let pg_spec = TargetSpec::new(&lab, "orders", &sess).set("max_connections", "2");
    let my_spec = TargetSpec::mysql(&lab, "shop", &sess).set("max_connections", "1");
    let p = ProxyProcess::start(
        &lab,
        &(pg_spec.toml() + &my_spec.toml()),
        &[pg_spec.port, my_spec.port],
        &[],
    );
    let a = pg(pg_spec.port, "bytebase", "postgres").await.unwrap();
    let b = pg(pg_spec.port, "bytebase", "postgres").await.unwrap();
    let Err(e) = pg(pg_spec.port, "bytebase", "postgres").await else {
        panic!("a third connection must be refused")
    };
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "53300");
    assert!(
        db.message().contains("too many clients") && db.message().contains("allows 2"),
        "{}",
        db.message()
    );
    let (status, body) = p.admin("/readiness");
    assert_eq!(status, 503);
    assert!(
        body.contains("target orders: at its connection cap (2)"),
        "{body}"
    );
    drop(a);
    // The dropped client's task needs the runtime to say goodbye: poll without blocking it.
    for _ in 0..200 {
        if p.admin("/readiness").0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(p.admin("/readiness").0, 200, "a slot freed");
    let c = pg(pg_spec.port, "bytebase", "postgres")
        .await
        .expect("room again");
    c.query_one("select 1", &[]).await.unwrap();
    drop((b, c));

    let opts = || {
        mysql_async::OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(my_spec.port)
            .user(Some("bytebase"))
            .prefer_socket(false)
    };
    let first = mysql_async::Conn::new(opts()).await.unwrap();
    match mysql_async::Conn::new(opts()).await {
        Err(mysql_async::Error::Server(e)) => {
            assert_eq!(e.code, 1040);
            assert!(e.message.contains("Too many connections"), "{}", e.message);
        }
        other => panic!("expected ERR 1040, got {:?}", other.map(|_| ())),
    }
    drop(first);
    let m = metrics_text(&p);
    assert_eq!(sample(&m, "rds_iam_proxy_client_connections_closed_total{target=\"orders\",engine=\"postgres\",result=\"limit\"}"), Some(1.0));
}

fn metrics_text(p: &ProxyProcess) -> String {
    p.admin("/metrics").1
}

#[test]
fn a_silent_client_is_dropped_after_the_handshake_timeout_and_counted() {
    let lab = Lab::get();
    let sess = session("silent-client");
    let pg_spec = TargetSpec::new(&lab, "orders", &sess);
    let my_spec = TargetSpec::mysql(&lab, "shop", &sess);
    let config = format!(
        "[proxy]\nhandshake_timeout = 1\n{}{}",
        pg_spec.toml(),
        my_spec.toml()
    );
    let p = ProxyProcess::start(&lab, &config, &[pg_spec.port, my_spec.port], &[]);
    // Connects, says nothing.
    let reply = exchange(pg_spec.port, b"", false);
    let (code, message) = pg_error(&reply);
    assert_eq!(code, "08P01");
    assert!(
        message.contains("did not send its startup message within 1 s"),
        "{message}"
    );
    // MySQL: reads the greeting, never answers.
    let mut s = TcpStream::connect(("127.0.0.1", my_spec.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("dropped, not left hanging");
    let greeting_len = 4 + (all[0] as usize | (all[1] as usize) << 8);
    let (errno, message) = mysql_error(&all[greeting_len..]);
    assert_eq!(errno, 1043);
    assert!(
        message.contains("did not answer the greeting within 1 s"),
        "{message}"
    );
    eventually(Duration::from_secs(10), "both counted", || {
        let m = metrics_text(&p);
        let c = |t: &str, e: &str| {
            sample(&m, &format!("rds_iam_proxy_client_connections_closed_total{{target=\"{t}\",engine=\"{e}\",result=\"client_error\"}}"))
        };
        (c("orders", "postgres") == Some(1.0) && c("shop", "mysql") == Some(1.0)).then_some(())
    });
}

#[test]
fn an_idle_session_is_closed_after_idle_timeout_with_57p05() {
    let lab = Lab::get();
    let spec = TargetSpec::new(&lab, "orders", &session("idle")).set("idle_timeout", "1");
    let _p = ProxyProcess::start(&lab, &spec.toml(), &[spec.port], &[]);
    let mut s = TcpStream::connect(("127.0.0.1", spec.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&startup(196608, b"user\0bytebase\0database\0postgres\0\0"))
        .unwrap();
    // Read the login (up to ReadyForQuery), then say nothing: the proxy ends it.
    let mut all = Vec::new();
    s.read_to_end(&mut all)
        .expect("closed by the idle timeout, not left open");
    let mut at = 0;
    let mut last = None;
    while at + 5 <= all.len() {
        let len = i32::from_be_bytes(all[at + 1..at + 5].try_into().unwrap()) as usize;
        last = Some(at);
        at += 1 + len;
    }
    let (code, message) = pg_error(&all[last.unwrap()..]);
    assert_eq!(code, "57P05");
    assert!(message.contains("idle_timeout = 1 s"), "{message}");
}
