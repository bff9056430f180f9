//! Who may connect: unix-socket listeners with their configured mode (and the file gone
//! after a clean stop); non-loopback listeners need an explicit opt-in.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn unix_socket_listeners_get_their_mode_and_serve_both_engines() {
    let lab = Lab::get();
    let sess = session("unix");
    let dir = std::env::temp_dir().join(format!("rip-sock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pg_sock = dir.join(".s.PGSQL.5433");
    let my_sock = dir.join("mysql.sock");
    let pg_spec = TargetSpec::new(&lab, "orders", &sess)
        .set("listen", &format!("\"unix:{}\"", pg_sock.display()))
        .set("socket_mode", "\"0640\"");
    let my_spec = TargetSpec::mysql(&lab, "shop", &sess)
        .set("listen", &format!("\"unix:{}\"", my_sock.display()))
        .set("socket_mode", "\"0600\"");
    let mut p = ProxyProcess::start(&lab, &(pg_spec.toml() + &my_spec.toml()), &[], &[]);
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&pg_sock), 0o640);
    assert_eq!(mode(&my_sock), 0o600);

    let out = Command::new("psql")
        .arg(format!(
            "host={} port=5433 user=bytebase dbname=postgres",
            dir.display()
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
    let out = Command::new("mariadb")
        .args([
            "--socket",
            my_sock.to_str().unwrap(),
            "-u",
            "bytebase",
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

    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(30)), Some(0));
    assert!(
        !pg_sock.exists() && !my_sock.exists(),
        "socket files are removed on a clean stop"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_non_loopback_listen_without_opt_in_is_refused_at_start() {
    let lab = Lab::get();
    let spec = TargetSpec::new(&lab, "orders", &session("remote")).set("listen", "\"0.0.0.0:0\"");
    let dir = std::env::temp_dir().join(format!("rip-remote-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, spec.toml()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"))
        .args(["--config", cfg.to_str().unwrap(), "run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("allow_remote = true"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn secret_file(tag: &str, password: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("rip-secret-{tag}-{}", std::process::id()));
    std::fs::write(&path, format!("{password}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn with_client_tls_and_password(
    spec: TargetSpec,
    lab: &Lab,
    secret: &std::path::Path,
) -> TargetSpec {
    spec.set(
        "client_tls_cert",
        &format!("\"{}\"", lab.s("/server_cert_file")),
    )
    .set(
        "client_tls_key",
        &format!("\"{}\"", lab.s("/server_key_file")),
    )
    .set("client_password_file", &format!("\"{}\"", secret.display()))
}

#[test]
fn postgres_clients_prove_the_local_secret_with_scram_over_verified_tls() {
    let lab = Lab::get();
    let sess = session("pg-client-auth");
    let secret = secret_file("pg", "correct horse battery");
    let spec = with_client_tls_and_password(TargetSpec::new(&lab, "orders", &sess), &lab, &secret)
        .set("client_tls_required", "true");
    let _p = ProxyProcess::start(&lab, &spec.toml(), &[spec.port], &[]);
    let psql = |sslmode: &str, password: &str| {
        let out = Command::new("psql")
            .arg(format!(
                "host=localhost port={} user=bytebase dbname=postgres sslmode={sslmode} sslrootcert={}",
                spec.port,
                lab.s("/ca_file")
            ))
            .args(["-X", "-tAc", "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()"])
            .env("PGPASSWORD", password)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // verify-full: the client checks the proxy's certificate and name.
    let (out, err) = psql("verify-full", "correct horse battery");
    assert_eq!(out, "bytebase|t", "{err}");
    let (out, err) = psql("verify-full", "wrong");
    assert!(
        out.is_empty() && err.contains("password authentication failed for user \"bytebase\""),
        "{err}"
    );
    let (out, err) = psql("disable", "correct horse battery");
    assert!(
        out.is_empty() && err.contains("accepts only TLS connections"),
        "{err}"
    );
    let _ = std::fs::remove_file(secret);
}

#[test]
fn mysql_clients_prove_the_local_secret_over_tls() {
    let lab = Lab::get();
    let sess = session("my-client-auth");
    let secret = secret_file("my", "s3cret-for-mysql");
    let spec = with_client_tls_and_password(TargetSpec::mysql(&lab, "shop", &sess), &lab, &secret)
        .set("client_tls_required", "true");
    let _p = ProxyProcess::start(&lab, &spec.toml(), &[spec.port], &[]);
    let mariadb = |extra: &[&str], password: &str| {
        let out = Command::new("mariadb")
            .args([
                "-h",
                "127.0.0.1",
                "-P",
                &spec.port.to_string(),
                "-u",
                "bytebase",
                "-N",
                "-B",
            ])
            .arg(format!("-p{password}"))
            .args(extra)
            .args(["-e", "select current_user()"])
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let ca = lab.s("/ca_file");
    let tls = ["--ssl", "--ssl-ca", ca.as_str(), "--ssl-verify-server-cert"];
    let (out, err) = mariadb(&tls, "s3cret-for-mysql");
    assert!(out.starts_with("bytebase@"), "{err}");
    // Whatever plugin the client starts with (clear password gets switched to native).
    for plugin in [
        "caching_sha2_password",
        "mysql_native_password",
        "mysql_clear_password",
    ] {
        let arg = format!("--default-auth={plugin}");
        let args: Vec<&str> = tls.iter().copied().chain([arg.as_str()]).collect();
        let (out, err) = mariadb(&args, "s3cret-for-mysql");
        assert!(out.starts_with("bytebase@"), "{plugin}: {err}");
    }
    let (out, err) = mariadb(&tls, "wrong");
    assert!(
        out.is_empty() && err.contains("ERROR 1045") && err.contains("using password: YES"),
        "{err}"
    );
    let (out, err) = mariadb(&["--skip-ssl"], "s3cret-for-mysql");
    assert!(
        out.is_empty() && err.contains("3159") && err.contains("requires TLS"),
        "{err}"
    );
    let _ = std::fs::remove_file(secret);
}
