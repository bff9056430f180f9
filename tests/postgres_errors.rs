//! Every failure a user can hit gets its own ErrorResponse (SQLSTATE, cause, fix), the proxy
//! keeps serving the good target after each, and nothing secret reaches the log even at
//! trace level.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Seen {
    code: String,
    message: String,
    detail: String,
    hint: String,
}

async fn refused(port: u16, user: &str) -> Seen {
    let err = match pg(port, user, "postgres").await {
        Ok(_) => panic!("connection on port {port} as {user} should have been refused"),
        Err(e) => e,
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not an ErrorResponse: {err:?}"));
    Seen {
        code: db.code().code().to_string(),
        message: db.message().to_string(),
        detail: db.detail().unwrap_or_default().to_string(),
        hint: db.hint().unwrap_or_default().to_string(),
    }
}

/// A server that refuses TLS, as PostgreSQL with ssl=off does.
async fn no_tls_server() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut req = [0u8; 8];
            if s.read_exact(&mut req).await.is_ok() {
                let _ = s.write_all(b"N").await;
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
                assert!(
                    rest.is_empty(),
                    "the proxy sent bytes after TLS was refused"
                );
            }
        }
    });
    port
}

#[tokio::test]
async fn each_failure_is_explained_and_the_proxy_keeps_serving() {
    let lab = Lab::get();
    let sess = session("errors");
    let bad_sts = session("errors-sts");
    let good = TargetSpec::new(&lab, "good", &sess);
    let unreachable = TargetSpec::new(&lab, "unreachable", &sess)
        .set("connect_to", &format!("\"127.0.0.1:{}\"", free_port()));
    let bad_ca = TargetSpec::new(&lab, "bad-ca", &sess)
        .set("ca_file", &format!("\"{}\"", lab.s("/other_ca_file")));
    let bad_name = TargetSpec::new(&lab, "bad-name", &sess)
        .set(
            "host",
            "\"wrong.c9lab0example.us-east-1.rds.amazonaws.com\"",
        )
        .set("connect_to", &format!("\"127.0.0.1:{}\"", lab.pg_port()));
    let no_tls = TargetSpec::new(&lab, "no-tls", &sess).set(
        "connect_to",
        &format!("\"127.0.0.1:{}\"", no_tls_server().await),
    );
    let sts = TargetSpec::new(&lab, "sts-refused", &bad_sts).hop_external_id("not-the-external-id");
    let scram = TargetSpec::new(&lab, "scram", &sess).set("db_user", "\"lab_scram\"");
    let md5 = TargetSpec::new(&lab, "md5", &sess).set("db_user", "\"lab_md5\"");
    let region = TargetSpec::new(&lab, "wrong-region", &sess).set("region", "\"us-west-2\"");
    let all = [
        &good,
        &unreachable,
        &bad_ca,
        &bad_name,
        &no_tls,
        &sts,
        &scram,
        &md5,
        &region,
    ];
    let config: String = all.iter().map(|t| t.toml()).collect();
    let ports: Vec<u16> = all.iter().map(|t| t.port).collect();
    // Trace everywhere, and the AWS SDK's most talkative spots named explicitly: a user
    // asking for them must still not get secrets.
    let mut proxy = ProxyProcess::start_env(
        &lab,
        &config,
        &ports,
        &[],
        &[(
            "RUST_LOG",
            "trace,aws_smithy_runtime::client::orchestrator=trace,aws_sigv4::http_request::sign=trace",
        )],
    );

    let works = || async {
        let c = pg(good.port, "bytebase", "postgres")
            .await
            .expect("the good target must keep working");
        let r = c.query_one("select current_user::text", &[]).await.unwrap();
        assert_eq!(r.get::<_, String>(0), "bytebase");
    };
    works().await;

    let e = refused(good.port, "alice").await;
    assert_eq!(e.code, "28000");
    assert!(
        e.message.contains("\"alice\"") && e.hint.contains("\"bytebase\""),
        "{}: {}",
        e.message,
        e.hint
    );
    works().await;

    let e = refused(unreachable.port, "bytebase").await;
    assert_eq!(e.code, "08001");
    assert!(
        e.message.contains("cannot connect") && e.message.contains("127.0.0.1:"),
        "{}",
        e.message
    );
    works().await;

    let e = refused(bad_ca.port, "bytebase").await;
    assert_eq!(e.code, "08001");
    assert!(
        e.message.contains("TLS") && e.message.contains("not signed by a CA in ca_file"),
        "{}",
        e.message
    );
    works().await;

    let e = refused(bad_name.port, "bytebase").await;
    assert_eq!(e.code, "08001");
    assert!(
        e.message
            .contains("not valid for the name wrong.c9lab0example.us-east-1.rds.amazonaws.com"),
        "{}",
        e.message
    );
    works().await;

    let e = refused(no_tls.port, "bytebase").await;
    assert_eq!(e.code, "08001");
    assert!(
        e.message.contains("refused TLS") && e.message.contains("never sent without TLS"),
        "{}",
        e.message
    );
    works().await;

    let e = refused(sts.port, "bytebase").await;
    assert_eq!(e.code, "28000");
    assert!(
        e.message.contains("AccessDenied")
            && e.message
                .contains("is not authorized to perform: sts:AssumeRole"),
        "{}",
        e.message
    );
    works().await;

    for t in [&scram, &md5] {
        let user = if t.name == "scram" {
            "lab_scram"
        } else {
            "lab_md5"
        };
        let e = refused(t.port, user).await;
        assert_eq!(e.code, "28000");
        assert!(e.message.contains("not an IAM user"), "{}", e.message);
        assert!(
            e.hint.contains(&format!("GRANT rds_iam TO \"{user}\"")),
            "{}",
            e.hint
        );
        works().await;
    }

    let e = refused(region.port, "bytebase").await;
    // PostgreSQL reports a PAM failure as 28000 (28P01 is for its own password methods).
    assert_eq!(e.code, "28000", "the server's own SQLSTATE is relayed");
    assert!(
        e.message.contains("PAM authentication failed"),
        "the server's own words: {}",
        e.message
    );
    assert!(
        e.detail.contains("us-west-2") && e.hint.contains("rds-db:connect"),
        "{} / {}",
        e.detail,
        e.hint
    );
    works().await;

    // A refusal after the login (no such database) is the server's own error, unchanged.
    let Err(err) = pg(good.port, "bytebase", "no_such_db").await else {
        panic!("a missing database must fail")
    };
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "3D000");
    assert!(
        db.message().contains("\"no_such_db\" does not exist"),
        "{}",
        db.message()
    );
    works().await;

    // psql shows the same explanation to a person.
    let (ok, _, err) = psql(scram.port, "lab_scram", "postgres", "select 1");
    assert!(
        !ok && err.contains("not an IAM user") && err.contains("HINT"),
        "{err}"
    );

    // Nothing secret in the most verbose log: no key, no session token, no IAM token.
    let log = proxy.stop();
    assert!(
        log.contains("token minted"),
        "the log should be at trace level: {}",
        &log[..log.len().min(2000)]
    );
    assert_no_secrets(&lab, &log, &[&sess, &bad_sts]);
}
