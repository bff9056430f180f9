//! MySQL end to end, against the lab's MariaDB that checks every IAM token through PAM (in
//! cleartext mode, as RDS switches clients to mysql_clear_password), through real clients:
//! the mariadb CLI, mysql_async, PyMySQL and MariaDB Connector/J.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::process::Command;
use std::time::Duration;

use common::*;
use mysql_async::prelude::*;

fn start(lab: &Lab, spec: &TargetSpec) -> ProxyProcess {
    ProxyProcess::start(lab, &spec.toml(), &[spec.port], &["--log-level", "debug"])
}

fn opts(port: u16, user: &str, db: Option<&str>) -> mysql_async::OptsBuilder {
    mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some(user))
        .db_name(db)
        .prefer_socket(false)
}

async fn connect(port: u16) -> mysql_async::Conn {
    mysql_async::Conn::new(opts(port, "bytebase", Some("appdb")))
        .await
        .expect("connect through the proxy")
}

/// A 10 MB file of numbered lines, and its line count.
fn infile(tag: &str) -> (std::path::PathBuf, usize) {
    let path = std::env::temp_dir().join(format!("rip-infile-{tag}-{}.txt", std::process::id()));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut n = 0;
    let mut size = 0;
    while size < 10 << 20 {
        let line = format!("{n:08}-{}\n", "0123456789abcdef".repeat(6));
        size += line.len();
        f.write_all(line.as_bytes()).unwrap();
        n += 1;
    }
    (path, n)
}

fn lines(out: &str) -> std::collections::HashMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const SUM_1_TO_100000: u64 = 100_000 * 100_001 / 2;

#[tokio::test]
async fn mariadb_cli_through_the_cross_account_chain() {
    let lab = Lab::get();
    let sess = session("my-cli");
    let spec = TargetSpec::mysql(&lab, "shop", &sess);
    let _p = start(&lab, &spec);
    let (file, n) = infile("cli");
    let out = Command::new("mariadb")
        .args(["-h", "127.0.0.1", "-P", &spec.port.to_string(), "-u", "bytebase", "--skip-ssl", "--local-infile=1", "-N", "-B", "appdb", "-e"])
        .arg(format!(
            "select current_user(); select 1; select 2; select count(*), sum(seq) from seq_1_to_100000; \
             create temporary table cli_load (line varchar(200)); \
             load data local infile '{}' into table cli_load; select count(*) from cli_load;",
            file.display()
        ))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<&str> = stdout.lines().collect();
    assert!(got[0].starts_with("bytebase@"), "{stdout}");
    assert_eq!(
        &got[1..4],
        &["1", "2", &format!("100000\t{SUM_1_TO_100000}")]
    );
    assert_eq!(got[4], n.to_string());
    let _ = std::fs::remove_file(file);
    let calls = lab.sts_calls(&sess);
    assert!(calls
        .iter()
        .any(|c| c["role_arn"] == lab.s("/roles/hop/arn").as_str()));
    assert!(calls
        .iter()
        .any(|c| c["role_arn"] == lab.s("/roles/target/arn").as_str()));
    assert!(lab
        .verifications(&sess)
        .iter()
        .all(|v| v["engine"] == "mysql" && v["ok"] == true));
}

#[tokio::test]
async fn mysql_async_text_binary_multi_results_infile_transactions() {
    let lab = Lab::get();
    let sess = session("my-async");
    let spec = TargetSpec::mysql(&lab, "shop", &sess);
    let _p = start(&lab, &spec);
    let (file, n) = infile("async");
    let handler = mysql_async::WhiteListFsHandler::new(vec![file.clone()]);
    let mut c = mysql_async::Conn::new(
        opts(spec.port, "bytebase", Some("appdb")).local_infile_handler(Some(handler)),
    )
    .await
    .unwrap();
    let who: String = c
        .query_first("select current_user()")
        .await
        .unwrap()
        .unwrap();
    assert!(who.starts_with("bytebase@"), "{who}");
    // Binary protocol.
    let (a, b): (i64, String) = c
        .exec_first("select ? + 1, concat(?, 'x')", (41, "ü"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((a, b.as_str()), (42, "üx"));
    // Multi-statements with several result sets.
    let mut result = c
        .query_iter("select 1; select 2, 3; select 'x'")
        .await
        .unwrap();
    let mut sets = Vec::new();
    while !result.is_empty() {
        let rows: Vec<mysql_async::Row> = result.collect().await.unwrap();
        sets.push(rows.len());
    }
    drop(result);
    assert_eq!(sets, vec![1, 1, 1]);
    // 100,000 rows, every one checked.
    let rows: Vec<(u64, String)> = c
        .query("select seq, md5(seq) from seq_1_to_100000")
        .await
        .unwrap();
    assert_eq!(rows.len(), 100_000);
    assert!(rows
        .iter()
        .enumerate()
        .all(|(i, (s, _))| *s == i as u64 + 1));
    assert_eq!(rows[0].1, "c4ca4238a0b923820dcc509a6f75849b");
    // LOAD DATA LOCAL INFILE, 10 MB.
    c.query_drop("create temporary table async_load (line varchar(200))")
        .await
        .unwrap();
    c.query_drop(format!(
        "load data local infile '{}' into table async_load",
        file.display()
    ))
    .await
    .unwrap();
    let loaded: u64 = c
        .query_first("select count(*) from async_load")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(loaded as usize, n);
    let last: String = c
        .query_first("select max(line) from async_load")
        .await
        .unwrap()
        .unwrap();
    assert!(last.starts_with(&format!("{:08}-", n - 1)));
    // Transactions.
    let table = format!("tx_{}", std::process::id());
    c.query_drop(format!("create table {table} (id int) engine=innodb"))
        .await
        .unwrap();
    let mut tx = c.start_transaction(Default::default()).await.unwrap();
    tx.query_drop(format!("insert into {table} values (1)"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = c.start_transaction(Default::default()).await.unwrap();
    tx.query_drop(format!("insert into {table} values (2)"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let ids: Vec<i32> = c.query(format!("select id from {table}")).await.unwrap();
    assert_eq!(ids, vec![2]);
    c.query_drop(format!("drop table {table}")).await.unwrap();
    c.disconnect().await.unwrap();
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn kill_query_from_a_second_connection_stops_a_sleep() {
    let lab = Lab::get();
    let sess = session("my-kill");
    let spec = TargetSpec::mysql(&lab, "shop", &sess);
    let _p = start(&lab, &spec);
    let mut sleeper = connect(spec.port).await;
    let mut killer = connect(spec.port).await;
    // The thread id the client sees is the server's, so KILL QUERY names the right session.
    let id = sleeper.id();
    let server_id: u64 = sleeper
        .query_first("select connection_id()")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id as u64, server_id);
    let task = tokio::spawn(async move {
        let r: Result<Option<i64>, _> = sleeper.query_first("select sleep(30)").await;
        (r, sleeper)
    });
    loop {
        let n: u64 = killer
            .exec_first("select count(*) from information_schema.processlist where id = ? and info like 'select sleep%'", (id,))
            .await
            .unwrap()
            .unwrap();
        if n > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    killer.query_drop(format!("kill query {id}")).await.unwrap();
    // Far below the 30 s sleep: only a delivered KILL ends it this soon.
    let (r, mut sleeper) = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("KILL QUERY did not end the sleep")
        .unwrap();
    match r {
        Ok(Some(v)) => assert_eq!(v, 1, "an interrupted SLEEP returns 1"),
        Ok(None) => panic!("no row"),
        Err(mysql_async::Error::Server(e)) => assert_eq!(e.code, 1317, "{e}"),
        Err(e) => panic!("{e}"),
    }
    // The session survives its killed query.
    let one: i64 = sleeper.query_first("select 1").await.unwrap().unwrap();
    assert_eq!(one, 1);
}

#[tokio::test]
async fn fifty_concurrent_connections_cost_one_assume_role_per_hop_and_one_token() {
    let lab = Lab::get();
    let sess = session("my-burst");
    let spec = TargetSpec::mysql(&lab, "shop", &sess);
    let _p = start(&lab, &spec);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let port = spec.port;
            tokio::spawn(async move {
                let mut c = connect(port).await;
                let who: String = c
                    .query_first("select current_user()")
                    .await
                    .unwrap()
                    .unwrap();
                c.disconnect().await.unwrap();
                who
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().starts_with("bytebase@"));
    }
    let calls = lab.sts_calls(&sess);
    let per_role = |arn: String| {
        calls
            .iter()
            .filter(|c| c["role_arn"] == arn.as_str())
            .count()
    };
    assert_eq!(
        (
            per_role(lab.s("/roles/hop/arn")),
            per_role(lab.s("/roles/target/arn"))
        ),
        (1, 1),
        "{calls:?}"
    );
    let v = lab.verifications(&sess);
    assert_eq!(v.iter().filter(|r| r["ok"] == true).count(), 50, "{v:?}");
    let tokens: HashSet<&str> = v
        .iter()
        .map(|r| r["token_sha256"].as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 1);
    // Tokens with a session token are well over 255 bytes: they went length-encoded.
    assert!(v
        .iter()
        .all(|r| r["akid"].as_str().unwrap().starts_with("ASIA")));
}

#[tokio::test]
async fn change_user_reauthenticates_with_a_token_or_refuses_and_keeps_the_session() {
    let lab = Lab::get();
    let sess = session("my-change");
    let spec = TargetSpec::mysql(&lab, "shop", &sess);
    let _p = start(&lab, &spec);
    let mut c = connect(spec.port).await;
    c.query_drop("set @marker = 'before'").await.unwrap();
    let before = lab.verifications(&sess).len();
    // Same user: a fresh IAM login on the same connection (connection pools do this).
    c.change_user(mysql_async::ChangeUserOpts::default())
        .await
        .expect("COM_CHANGE_USER as db_user");
    let marker: Option<String> = c.query_first("select @marker").await.unwrap().unwrap();
    assert_eq!(marker, None, "the server reset the session");
    let who: String = c
        .query_first("select current_user()")
        .await
        .unwrap()
        .unwrap();
    assert!(who.starts_with("bytebase@"));
    assert_eq!(
        lab.verifications(&sess).len(),
        before + 1,
        "the server verified a token again"
    );
    // Another user: a clear ERR, and the session stays usable as it was.
    c.query_drop("set @marker = 'kept'").await.unwrap();
    let err = c
        .change_user(mysql_async::ChangeUserOpts::default().with_user(Some("root".into())))
        .await
        .expect_err("another user must be refused");
    let mysql_async::Error::Server(e) = err else {
        panic!("{err:?}")
    };
    assert_eq!(e.code, 1045);
    assert!(
        e.message.contains("'root'") && e.message.contains("'bytebase'"),
        "{}",
        e.message
    );
    let marker: String = c.query_first("select @marker").await.unwrap().unwrap();
    assert_eq!(marker, "kept");
}

#[tokio::test]
async fn pymysql_and_connector_j() {
    let lab = Lab::get();
    let sess = session("my-drivers");
    let spec = TargetSpec::mysql(&lab, "shop", &sess);
    let _p = start(&lab, &spec);
    let (file, n) = infile("drivers");
    let py = Command::new("/usr/bin/python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/pymysql_client.py"
        ))
        .args([&spec.port.to_string(), "bytebase", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "PyMySQL: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let got = lines(&String::from_utf8_lossy(&py.stdout));
    assert!(got["current_user"].starts_with("bytebase@"));
    assert_eq!(got["params"], "42,üx");
    assert_eq!(got["result_sets"], "2");
    assert_eq!(got["rows"], format!("100000,sum={SUM_1_TO_100000}"));
    assert_eq!(got["loaded"], n.to_string());
    assert_eq!(got["tx"], "2");
    assert_eq!(got["charset"], "latin1,latin1_swedish_ci");
    assert_eq!(
        got["program_name"], "rip-through-proxy",
        "connection attributes carried"
    );

    let classes = std::env::temp_dir().join(format!("rip-java-{}", std::process::id()));
    std::fs::create_dir_all(&classes).unwrap();
    let jar = "/usr/share/java/mariadb-java-client.jar";
    let javac = Command::new("javac")
        .args(["-d", classes.to_str().unwrap(), "-cp", jar])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/MysqlClient.java"
        ))
        .output()
        .unwrap();
    assert!(
        javac.status.success(),
        "{}",
        String::from_utf8_lossy(&javac.stderr)
    );
    let java = Command::new("java")
        .args([
            "-cp",
            &format!("{jar}:{}", classes.display()),
            "MysqlClient",
        ])
        .args([&spec.port.to_string(), "bytebase", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        java.status.success(),
        "Connector/J: {}",
        String::from_utf8_lossy(&java.stderr)
    );
    let got = lines(&String::from_utf8_lossy(&java.stdout));
    assert!(got["current_user"].starts_with("bytebase@"));
    assert_eq!(got["prepared"], "42,üx");
    assert_eq!(got["result_sets"], "2");
    assert_eq!(got["rows"], format!("100000,sum={SUM_1_TO_100000}"));
    assert_eq!(got["loaded"], n.to_string());
    assert_eq!(got["tx"], "2");
    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_dir_all(classes);
}

/// MySQL 8 clients answer with caching_sha2_password, others with native or clear password:
/// the proxy takes any of them (the client's secret is not what logs in) and answers OK with
/// the sequence id the client expects.
#[tokio::test]
async fn any_client_auth_plugin_is_accepted_and_the_ok_has_the_expected_sequence_id() {
    use mysql_common::constants::CapabilityFlags as C;
    use mysql_common::io::ParseBuf;
    use mysql_common::packets::{AuthPlugin, HandshakePacket, HandshakeResponse};
    use mysql_common::proto::MySerialize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let lab = Lab::get();
    let sess = session("my-plugins");
    let spec = TargetSpec::mysql(&lab, "shop", &sess);
    let _p = start(&lab, &spec);
    for plugin in [
        AuthPlugin::CachingSha2Password,
        AuthPlugin::MysqlNativePassword,
        AuthPlugin::MysqlClearPassword,
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", spec.port))
            .await
            .unwrap();
        let mut head = [0u8; 4];
        s.read_exact(&mut head).await.unwrap();
        let mut body = vec![0u8; head[0] as usize | (head[1] as usize) << 8];
        s.read_exact(&mut body).await.unwrap();
        assert_eq!(head[3], 0);
        let greeting: HandshakePacket<'_> = ParseBuf(&body).parse(()).unwrap();
        assert!(
            greeting.server_version_str().contains("MariaDB"),
            "the server's own version"
        );
        let offered = greeting.capabilities();
        assert!(
            !offered.contains(C::CLIENT_SSL) && !offered.contains(C::CLIENT_COMPRESS),
            "{offered:?}"
        );
        let caps = (C::CLIENT_PROTOCOL_41
            | C::CLIENT_SECURE_CONNECTION
            | C::CLIENT_PLUGIN_AUTH
            | C::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
            | C::CLIENT_DEPRECATE_EOF
            | C::CLIENT_TRANSACTIONS)
            & offered;
        let response = HandshakeResponse::new(
            Some(&[7u8; 32][..]),
            (8, 0, 36),
            Some(&b"bytebase"[..]),
            Some(&b"appdb"[..]),
            Some(plugin.clone()),
            caps,
            None,
            1 << 24,
        );
        let mut payload = Vec::new();
        response.serialize(&mut payload);
        let mut pkt = vec![payload.len() as u8, (payload.len() >> 8) as u8, 0, 1];
        pkt.extend(payload);
        s.write_all(&pkt).await.unwrap();
        let mut head = [0u8; 4];
        s.read_exact(&mut head).await.unwrap();
        let mut body = vec![0u8; head[0] as usize | (head[1] as usize) << 8];
        s.read_exact(&mut body).await.unwrap();
        assert_eq!(
            (body[0], head[3]),
            (0x00, 2),
            "OK with sequence id 2 for {plugin:?}: {body:?}"
        );
    }
}

/// LOAD DATA LOCAL INFILE streams packets with growing sequence ids that wrap to 0; a data
/// packet at sequence 0 that starts with 0x11 (COM_CHANGE_USER's code) is still data.
#[tokio::test]
async fn a_long_infile_made_of_0x11_bytes_arrives_intact() {
    let lab = Lab::get();
    let spec = TargetSpec::mysql(&lab, "shop", &session("my-infile-11"));
    let _p = start(&lab, &spec);
    let path = std::env::temp_dir().join(format!("rip-infile-11-{}.txt", std::process::id()));
    let line = [vec![0x11u8; 99], vec![b'\n']].concat();
    let lines = (8 << 20) / line.len();
    std::fs::write(&path, line.repeat(lines)).unwrap();
    let handler = mysql_async::WhiteListFsHandler::new(vec![path.clone()]);
    let mut c = mysql_async::Conn::new(
        opts(spec.port, "bytebase", Some("appdb")).local_infile_handler(Some(handler)),
    )
    .await
    .unwrap();
    c.query_drop("create temporary table ones (line varbinary(200))")
        .await
        .unwrap();
    c.query_drop(format!(
        "load data local infile '{}' into table ones",
        path.display()
    ))
    .await
    .unwrap();
    let (rows, good): (u64, u64) = c
        .query_first("select count(*), sum(line = repeat(x'11', 99)) from ones")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((rows, good), (lines as u64, lines as u64));
    // The session is still in step afterwards.
    let one: i64 = c.query_first("select 1").await.unwrap().unwrap();
    assert_eq!(one, 1);
    let _ = std::fs::remove_file(path);
}
