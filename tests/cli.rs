//! The binary refuses bad configs with a message naming the key and the fix, a non-zero
//! exit and never a panic. No lab needed.

use std::process::Command;

fn run_with(config: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("rip-cli-{}-{}", std::process::id(), config.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, CA).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(&path, config.replace("CA_FILE", &ca.display().to_string())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"))
        .arg("--config")
        .arg(&path)
        .arg("check")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), text)
}

const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBeTCCAR+gAwIBAgIUGno65h8jDbi28onixuE/KmWyl00wCgYIKoZIzj0EAwIw
EjEQMA4GA1UEAwwHdGVzdC1jYTAeFw0yNjEyMDQyMTMzMTdaFw0zNjEyMDEyMTMz
MTdaMBIxEDAOBgNVBAMMB3Rlc3QtY2EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC
AAT0BHBfM/q4iqYeLWIOGZHxJb49SqcXotcYs6ENxxLUt2Rw2gP86qau5QChiEqA
Pfv1jYa7zAKtfWP/2vn0QuGmo1MwUTAdBgNVHQ4EFgQUGUJr3Z++y+uhgl1pQHsf
6jFBES4wHwYDVR0jBBgwFoAUGUJr3Z++y+uhgl1pQHsf6jFBES4wDwYDVR0TAQH/
BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiB6YOUmuhEMEaVkwXCHtdXXMUZPkwFi
YuwX2DQtMj3zOgIhAJ40x+x7TMCt9fQCsrBxm/F3oChyBrbI8P4gzkDOlr4T
-----END CERTIFICATE-----
";

const GOOD: &str = r#"
[[target]]
name = "orders"
engine = "postgres"
listen = "127.0.0.1:6432"
host = "orders.abc123.us-east-1.rds.amazonaws.com"
db_user = "bytebase"
ca_file = "CA_FILE"
role_arn = "arn:aws:iam::222222222222:role/bytebase-target-db-role"
"#;

#[test]
fn bad_configs_are_refused_with_the_key_and_the_fix() {
    let cases: Vec<(String, &[&str])> = vec![
        (
            format!("{GOOD}\nfavourite = 1\n"),
            &["unknown field `favourite`", "line"],
        ),
        (
            GOOD.replace("db_user = \"bytebase\"\n", ""),
            &["missing field `db_user`"],
        ),
        (
            GOOD.replace("role/bytebase-target-db-role", "bytebase-target-db-role"),
            &[
                "`role_arn`",
                "not a role ARN",
                "arn:aws:iam::123456789012:role/NAME",
            ],
        ),
        (
            GOOD.replace("CA_FILE", "/nonexistent/global-bundle.pem"),
            &["`ca_file`", "cannot be read", "global-bundle.pem"],
        ),
        (
            format!("{GOOD}{}", GOOD.replace("\"orders\"", "\"billing\"")),
            &["both listen on 127.0.0.1:6432"],
        ),
        ("".to_string(), &["no [[target]]"]),
        ("[[target]\n".to_string(), &["config"]),
    ];
    for (config, wants) in cases {
        let (code, text) = run_with(&config);
        assert_eq!(code, 2, "exit code for {config:?}: {text}");
        assert!(!text.contains("panicked"), "{text}");
        for w in wants {
            assert!(text.contains(w), "want {w:?} in: {text}");
        }
    }
}

#[test]
fn missing_config_file_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"))
        .args(["--config", "/nonexistent/rds-iam-proxy.toml", "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/rds-iam-proxy.toml") && err.contains("--config"),
        "{err}"
    );
}

#[test]
fn help_and_version_work() {
    let out = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for w in ["--config", "token", "check", "IAM"] {
        assert!(help.contains(w), "{help}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn static_secrets_in_a_world_readable_config_are_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("rip-perm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, CA).unwrap();
    let path = dir.join("c.toml");
    let text = GOOD.replace("CA_FILE", ca.to_str().unwrap())
        + "access_key_id = \"AKIAEXAMPLE\"\nsecret_access_key = \"not-a-real-secret\"\n";
    std::fs::write(&path, text).unwrap();
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"))
            .args([
                "--config",
                path.to_str().unwrap(),
                "token",
                "--target",
                "nope",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = run();
    assert!(
        err.contains("readable by every user") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(
        !err.contains("not-a-real-secret"),
        "the warning must not print the secret"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!run().contains("readable by every user"));
    let _ = std::fs::remove_dir_all(dir);
}
