//! The systemd unit stays hardened: `systemd-analyze security --offline=yes` rates its
//! exposure 2.0 or lower (the README quotes the figure), and the example configs load.

use std::process::Command;

#[test]
fn systemd_unit_exposure_is_at_most_2() {
    let unit = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/systemd/rds-iam-proxy.service"
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", unit])
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for rds-iam-proxy.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(level <= 2.0, "exposure {level}:\n{text}");
    let unit_text = std::fs::read_to_string(unit).unwrap();
    for must in [
        "Type=notify",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "ProtectSystem=strict",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=",
        "User=rds-iam-proxy",
    ] {
        assert!(unit_text.contains(must), "the unit lacks {must}");
    }
}

#[test]
fn example_configs_parse() {
    // ca_file must exist for validation: point the examples at a real PEM.
    let dir = std::env::temp_dir().join(format!("rip-examples-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    let pem = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "/dev/null",
            "-subj",
            "/CN=t",
            "-days",
            "2",
        ])
        .output()
        .unwrap();
    std::fs::write(&ca, pem.stdout).unwrap();
    for file in ["config/example.toml", "deploy/systemd/config.toml"] {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/").to_string() + file)
                .unwrap()
                .replace("/etc/rds-iam-proxy/global-bundle.pem", ca.to_str().unwrap());
        let cfg = dir.join("c.toml");
        std::fs::write(&cfg, text).unwrap();
        // `check` without credentials fails at STS, but only after the config loaded.
        let out = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"))
            .args([
                "--config",
                cfg.to_str().unwrap(),
                "token",
                "--target",
                "nope",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no target named \"nope\"; the config has: orders"),
            "{file}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
