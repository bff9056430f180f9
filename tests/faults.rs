//! The database going away under open sessions (restart, failover, kill): the client learns
//! it at once, and new connections work as soon as the server is back, without restarting
//! the proxy. Each test restarts the servers of a lab of its own.

mod common;

use std::time::Duration;

use common::*;
use mysql_async::prelude::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_and_kill_mid_session() {
    let private = tokio::task::spawn_blocking(|| PrivateLab::start("pg"))
        .await
        .unwrap();
    let lab = &private.lab;
    let spec = TargetSpec::new(lab, "orders", &session("pg-restart"));
    let _p = ProxyProcess::start(lab, &spec.toml(), &[spec.port], &[]);

    // A clean restart (pg_ctl -m fast): the server's own goodbye reaches the client.
    let c = pg(spec.port, "bytebase", "postgres").await.unwrap();
    c.query_one("select 1", &[]).await.unwrap();
    tokio::task::block_in_place(|| private.restart("postgres", "fast"));
    let err = tokio::time::timeout(Duration::from_secs(10), c.query_one("select 1", &[]))
        .await
        .expect("no hang")
        .expect_err("the session ended with the server");
    assert!(
        err.to_string()
            .contains("terminating connection due to administrator command")
            || err.is_closed(),
        "{err}"
    );
    let c = pg(spec.port, "bytebase", "postgres")
        .await
        .expect("new connections work after the restart");
    c.query_one("select 1", &[]).await.unwrap();

    // A crash (SIGKILL, no goodbye from the server): the proxy tells the client itself.
    tokio::task::block_in_place(|| private.restart("postgres", "kill"));
    let err = tokio::time::timeout(Duration::from_secs(10), c.query_one("select 1", &[]))
        .await
        .expect("no hang")
        .expect_err("the session ended with the server");
    assert!(
        err.to_string()
            .contains("the database closed the connection")
            || err.is_closed(),
        "{err}"
    );
    let c = pg(spec.port, "bytebase", "postgres")
        .await
        .expect("new connections work after the crash");
    assert_eq!(
        c.query_one("select current_user::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "bytebase"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_restart_mid_session() {
    let private = tokio::task::spawn_blocking(|| PrivateLab::start("my"))
        .await
        .unwrap();
    let lab = &private.lab;
    let spec = TargetSpec::mysql(lab, "shop", &session("my-restart"));
    let _p = ProxyProcess::start(lab, &spec.toml(), &[spec.port], &[]);
    let opts = || {
        mysql_async::OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(spec.port)
            .user(Some("bytebase"))
            .prefer_socket(false)
    };
    for mode in ["fast", "kill"] {
        let mut c = mysql_async::Conn::new(opts()).await.unwrap();
        let one: i64 = c.query_first("select 1").await.unwrap().unwrap();
        assert_eq!(one, 1);
        tokio::task::block_in_place(|| private.restart("mysql", mode));
        let r: Result<Option<i64>, _> =
            tokio::time::timeout(Duration::from_secs(10), c.query_first("select 1"))
                .await
                .expect("no hang");
        assert!(r.is_err(), "{mode}: the session ended with the server");
        let mut c = mysql_async::Conn::new(opts())
            .await
            .expect("new connections work after the restart");
        let who: String = c
            .query_first("select current_user()")
            .await
            .unwrap()
            .unwrap();
        assert!(who.starts_with("bytebase@"), "{mode}");
    }
}
