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
