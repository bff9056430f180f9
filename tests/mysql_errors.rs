//! Every MySQL failure a user can hit is an ERR packet with its error number, SQL state and
//! a message naming cause and fix; the good target keeps working after each; no secret in
//! the log at the most verbose level.

mod common;

use common::*;
use mysql_async::prelude::*;
use mysql_common::constants::{CapabilityFlags, StatusFlags};
use mysql_common::packets::HandshakePacket;
use mysql_common::proto::MySerialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn opts(port: u16, user: &str) -> mysql_async::OptsBuilder {
    mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some(user))
        .db_name(Some("appdb"))
        .prefer_socket(false)
}

async fn refused(port: u16, user: &str) -> (u16, String, String) {
    match mysql_async::Conn::new(opts(port, user)).await {
        Ok(_) => panic!("port {port} as {user} should have been refused"),
        Err(mysql_async::Error::Server(e)) => (e.code, e.state, e.message),
        Err(e) => panic!("not an ERR packet: {e:?}"),
    }
}

/// A MySQL server that offers no TLS; it asserts that it never receives a byte.
async fn no_tls_server() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let caps = CapabilityFlags::CLIENT_PROTOCOL_41
                | CapabilityFlags::CLIENT_SECURE_CONNECTION
                | CapabilityFlags::CLIENT_PLUGIN_AUTH
                | CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA;
            let greeting = HandshakePacket::new(
                10,
                &b"8.0.36-no-tls"[..],
                7,
                *b"abcdefgh",
                Some(&b"ijklmnopqrst\0"[..]),
                caps,
                45,
                StatusFlags::SERVER_STATUS_AUTOCOMMIT,
                Some(&b"mysql_native_password"[..]),
            );
            let mut payload = Vec::new();
            greeting.serialize(&mut payload);
            let mut pkt = vec![payload.len() as u8, (payload.len() >> 8) as u8, 0, 0];
            pkt.extend(payload);
            s.write_all(&pkt).await.unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            assert!(
                rest.is_empty(),
                "the proxy sent {} bytes to a server without TLS",
                rest.len()
            );
        }
    });
    port
}

#[tokio::test]
async fn each_failure_is_an_err_packet_and_the_proxy_keeps_serving() {
    let lab = Lab::get();
    let sess = session("my-errors");
    let bad_sts = session("my-errors-sts");
    let good = TargetSpec::mysql(&lab, "good", &sess);
    let unreachable = TargetSpec::mysql(&lab, "unreachable", &sess)
        .set("connect_to", &format!("\"127.0.0.1:{}\"", free_port()));
    let bad_ca = TargetSpec::mysql(&lab, "bad-ca", &sess)
        .set("ca_file", &format!("\"{}\"", lab.s("/other_ca_file")));
    let no_tls = TargetSpec::mysql(&lab, "no-tls", &sess).set(
        "connect_to",
        &format!("\"127.0.0.1:{}\"", no_tls_server().await),
    );
    let sts = TargetSpec::mysql(&lab, "sts-refused", &bad_sts).hop_external_id("wrong-external-id");
    let native = TargetSpec::mysql(&lab, "native", &sess).set("db_user", "\"lab_native\"");
    let region = TargetSpec::mysql(&lab, "wrong-region", &sess).set("region", "\"eu-west-3\"");
    let all = [
        &good,
        &unreachable,
        &bad_ca,
        &no_tls,
        &sts,
        &native,
        &region,
    ];
    let config: String = all.iter().map(|t| t.toml()).collect();
    let ports: Vec<u16> = all.iter().map(|t| t.port).collect();
    let mut proxy = ProxyProcess::start_env(&lab, &config, &ports, &[], &[("RUST_LOG", "trace")]);

    let works = || async {
        let mut c = mysql_async::Conn::new(opts(good.port, "bytebase"))
            .await
            .expect("the good target must keep working");
        let who: String = c
            .query_first("select current_user()")
            .await
            .unwrap()
            .unwrap();
        assert!(who.starts_with("bytebase@"));
        c.disconnect().await.unwrap();
    };
    works().await;

    let (code, state, msg) = refused(good.port, "alice").await;
    assert_eq!((code, state.as_str()), (1045, "28000"));
    assert!(
        msg.contains("'alice'") && msg.contains("'bytebase'"),
        "{msg}"
    );
    works().await;

    let (code, _, msg) = refused(unreachable.port, "bytebase").await;
    assert_eq!(code, 2003);
    assert!(
        msg.contains("Can't connect to MySQL server on '127.0.0.1:"),
        "{msg}"
    );
    works().await;

    let (code, _, msg) = refused(bad_ca.port, "bytebase").await;
    assert_eq!(code, 2003);
    assert!(
        msg.contains("TLS failed") && msg.contains("not signed by a CA in ca_file"),
        "{msg}"
    );
    works().await;

    let (code, _, msg) = refused(no_tls.port, "bytebase").await;
    assert_eq!(code, 2003);
    assert!(
        msg.contains("does not offer TLS") && msg.contains("never sends an IAM token without TLS"),
        "{msg}"
    );
    works().await;

    let (code, state, msg) = refused(sts.port, "bytebase").await;
    assert_eq!((code, state.as_str()), (1045, "28000"));
    assert!(
        msg.contains("AccessDenied")
            && msg.contains("is not authorized to perform: sts:AssumeRole"),
        "{msg}"
    );
    works().await;

    let (code, _, msg) = refused(native.port, "lab_native").await;
    assert_eq!(code, 1045);
    assert!(
        msg.contains("mysql_native_password")
            && msg.contains("not an IAM user")
            && msg.contains("AWSAuthenticationPlugin"),
        "{msg}"
    );
    works().await;

    let (code, _, msg) = refused(region.port, "bytebase").await;
    assert_eq!(code, 1045, "the server's own error number: {msg}");
    assert!(
        msg.contains("Access denied for user 'bytebase'"),
        "the server's own words: {msg}"
    );
    assert!(
        msg.contains("eu-west-3") && msg.contains("rds-db:connect"),
        "{msg}"
    );
    works().await;

    // The mariadb CLI prints the same.
    let out = std::process::Command::new("mariadb")
        .args([
            "-h",
            "127.0.0.1",
            "-P",
            &native.port.to_string(),
            "-u",
            "lab_native",
            "--skip-ssl",
            "-e",
            "select 1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("ERROR 1045") && err.contains("not an IAM user"),
        "{err}"
    );

    let log = proxy.stop();
    assert!(log.contains("token minted"));
    assert_no_secrets(&lab, &log, &[&sess, &bad_sts]);
}

#[tokio::test]
async fn a_silent_mysql_upstream_is_given_up_after_connect_timeout() {
    let lab = Lab::get();
    // Accepts TCP, never greets: a hung server or a half-open tunnel.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let spec = TargetSpec::mysql(&lab, "shop", &session("my-silent"))
        .set("connect_to", &format!("\"{addr}\""))
        .set("connect_timeout", "1");
    let _p = ProxyProcess::start(&lab, &spec.toml(), &[spec.port], &[]);
    let res = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        refused(spec.port, "bytebase"),
    )
    .await
    .expect("the proxy must not hang");
    assert_eq!(res.0, 2003);
    assert!(
        res.2.contains(&addr.to_string()) && res.2.contains("no greeting"),
        "{}",
        res.2
    );
    drop(silent);
}
