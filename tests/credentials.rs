//! Where base credentials come from, and how the role chain is configured, as seen by the
//! lab's STS emulator and token verifier (not by the proxy's own account of itself).

mod common;

use common::*;

fn logs_in(port: u16) {
    let (ok, out, err) = psql(port, "bytebase", "postgres", "select current_user");
    assert!(ok, "psql failed: {err}");
    assert_eq!(out, "bytebase");
}

fn base_keys(lab: &Lab) -> (String, String) {
    (
        lab.s("/base/access_key_id"),
        lab.s("/base/secret_access_key"),
    )
}

#[test]
fn default_chain_reads_environment_keys() {
    let lab = Lab::get();
    let sess = session("env-keys");
    let spec = TargetSpec::new(&lab, "orders", &sess)
        .unset("access_key_id")
        .unset("secret_access_key");
    let (akid, secret) = base_keys(&lab);
    let _p = ProxyProcess::start_env(
        &lab,
        &spec.toml(),
        &[spec.port],
        &[],
        &[
            ("AWS_ACCESS_KEY_ID", &akid),
            ("AWS_SECRET_ACCESS_KEY", &secret),
        ],
    );
    logs_in(spec.port);
    let calls = lab.sts_calls(&sess);
    assert!(
        calls
            .iter()
            .any(|c| c["caller_akid"] == akid.as_str() && c["ok"] == true),
        "{calls:?}"
    );
}

#[test]
fn named_profile_from_shared_files() {
    let lab = Lab::get();
    let sess = session("profile");
    let spec = TargetSpec::new(&lab, "orders", &sess)
        .unset("access_key_id")
        .unset("secret_access_key")
        .set("profile", "\"lab-base\"");
    let (akid, secret) = base_keys(&lab);
    let dir = std::env::temp_dir().join(format!("rip-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let creds = dir.join("credentials");
    std::fs::write(&creds, format!("[default]\naws_access_key_id = AKIAWRONGWRONGWRONG1\naws_secret_access_key = wrong\n\n[lab-base]\naws_access_key_id = {akid}\naws_secret_access_key = {secret}\n")).unwrap();
    let config = dir.join("config");
    std::fs::write(&config, "[profile lab-base]\nregion = us-east-1\n").unwrap();
    let _p = ProxyProcess::start_env(
        &lab,
        &spec.toml(),
        &[spec.port],
        &[],
        &[
            ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()),
            ("AWS_CONFIG_FILE", config.to_str().unwrap()),
        ],
    );
    logs_in(spec.port);
    let calls = lab.sts_calls(&sess);
    assert!(
        calls
            .iter()
            .all(|c| c["caller_akid"] != "AKIAWRONGWRONGWRONG1"),
        "the default profile must not be used: {calls:?}"
    );
    assert!(
        calls
            .iter()
            .any(|c| c["caller_akid"] == akid.as_str() && c["ok"] == true),
        "{calls:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generic_endpoint_url_is_honored_and_session_settings_reach_sts() {
    let lab = Lab::get();
    let sess = session("endpoint-url");
    let spec = TargetSpec::new(&lab, "orders", &sess).set("session_duration", "900");
    let _p = ProxyProcess::start_env(
        &lab,
        &spec.toml(),
        &[spec.port],
        &[],
        &[
            ("AWS_ENDPOINT_URL_STS", ""),
            ("AWS_ENDPOINT_URL", &lab.sts_endpoint()),
        ],
    );
    logs_in(spec.port);
    let calls = lab.sts_calls(&sess);
    let target = calls
        .iter()
        .find(|c| c["role_arn"] == lab.s("/roles/target/arn").as_str())
        .unwrap_or_else(|| panic!("no AssumeRole of the target role: {calls:?}"));
    assert_eq!(target["duration"], 900, "{target}");
    let hop = calls
        .iter()
        .find(|c| c["role_arn"] == lab.s("/roles/hop/arn").as_str())
        .unwrap();
    assert_eq!(hop["external_id_ok"], true, "{hop}");
}

#[test]
fn a_single_role_with_external_id_and_no_chain() {
    let lab = Lab::get();
    let sess = session("direct");
    let mut spec = TargetSpec::new(&lab, "orders", &sess)
        .set("role_arn", &format!("\"{}\"", lab.s("/roles/direct/arn")))
        .set(
            "external_id",
            &format!("\"{}\"", lab.s("/roles/direct/external_id")),
        );
    spec.chain = false;
    let _p = ProxyProcess::start(&lab, &spec.toml(), &[spec.port], &[]);
    logs_in(spec.port);
    let calls = lab.sts_calls(&sess);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["role_arn"], lab.s("/roles/direct/arn").as_str());
}

#[test]
fn static_keys_without_any_role() {
    let lab = Lab::get();
    let sess = session("no-role");
    let mut spec = TargetSpec::new(&lab, "orders", &sess)
        .unset("role_arn")
        .unset("session_name");
    spec.chain = false;
    let ok_logins = || {
        lab.verifications_by_key(&lab.s("/base/access_key_id"))
            .iter()
            .filter(|r| r["ok"] == true)
            .count()
    };
    let before = ok_logins();
    let _p = ProxyProcess::start(&lab, &spec.toml(), &[spec.port], &[]);
    logs_in(spec.port);
    // Signed by the base key itself: the verifier saw the AKIA key (no session token).
    assert_eq!(ok_logins(), before + 1);
    assert!(lab.sts_calls(&sess).is_empty());
}

/// The reference scenario: the instance role (IMDS) assumes the target role directly.
fn via_default_chain(test: &str, env: &[(&str, &str)], source_role: &str) {
    let lab = Lab::get();
    let sess = session(test);
    let mut spec = TargetSpec::new(&lab, "orders", &sess)
        .unset("access_key_id")
        .unset("secret_access_key");
    spec.chain = false;
    let _p = ProxyProcess::start_env(&lab, &spec.toml(), &[spec.port], &[], env);
    logs_in(spec.port);
    let calls = lab.sts_calls(&sess);
    assert_eq!(calls.len(), 1, "{calls:?}");
    let caller = calls[0]["caller_arn"].as_str().unwrap();
    assert!(
        caller.contains(&format!("assumed-role/{source_role}/")),
        "caller {caller}"
    );
    assert_eq!(calls[0]["ok"], true);
}

#[test]
fn instance_role_from_imds_assumes_the_cross_account_role() {
    let lab = Lab::get();
    let before = lab
        .sts_log()
        .iter()
        .filter(|r| r["action"] == "IMDS")
        .count();
    let endpoint = lab.s("/imds/endpoint");
    via_default_chain(
        "imds",
        &[
            ("AWS_EC2_METADATA_DISABLED", ""),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &endpoint),
        ],
        "lab-instance-role",
    );
    assert!(
        lab.sts_log()
            .iter()
            .filter(|r| r["action"] == "IMDS")
            .count()
            > before
    );
}

#[test]
fn ecs_task_role_assumes_the_cross_account_role() {
    let lab = Lab::get();
    let uri = lab.s("/ecs/full_uri");
    let token = lab.s("/ecs/auth_token");
    via_default_chain(
        "ecs",
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", &token),
        ],
        "lab-task-role",
    );
}

#[test]
fn web_identity_role_assumes_the_cross_account_role() {
    let lab = Lab::get();
    let file = lab.s("/web_identity/token_file");
    let role = lab.s("/web_identity/role_arn");
    via_default_chain(
        "web-identity",
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", &file),
            ("AWS_ROLE_ARN", &role),
            ("AWS_ROLE_SESSION_NAME", "rip-web-test"),
        ],
        "lab-web-role",
    );
}

#[test]
fn sts_is_called_in_aws_region_when_set() {
    let lab = Lab::get();
    let sess = session("aws-region");
    let spec = TargetSpec::new(&lab, "orders", &sess);
    let _p = ProxyProcess::start_env(
        &lab,
        &spec.toml(),
        &[spec.port],
        &[],
        &[("AWS_REGION", "eu-west-1")],
    );
    logs_in(spec.port);
    let calls = lab.sts_calls(&sess);
    assert!(!calls.is_empty());
    for c in &calls {
        assert_eq!(c["region"], "eu-west-1", "{c}");
    }
    // The token itself is still signed for the database's region.
    assert!(lab
        .verifications(&sess)
        .iter()
        .all(|v| v["region"] == "us-east-1" && v["ok"] == true));
}
