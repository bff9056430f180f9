//! Our signer must equal botocore's `generate_db_auth_token` byte for byte.
//! The vectors in tests/golden/tokens.json come from tests/golden/gen_tokens.py (botocore).

use std::time::SystemTime;

use aws_credential_types::Credentials;
use rds_iam_proxy::aws::token::generate;
use serde_json::Value;

#[test]
fn tokens_equal_botocore_byte_for_byte() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/tokens.json"
    ))
    .unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 8, "the golden file lost cases");
    for c in &cases {
        let s = |k: &str| c[k].as_str().unwrap().to_string();
        let creds = Credentials::new(
            s("access_key_id"),
            s("secret_access_key"),
            c["session_token"].as_str().map(str::to_string),
            None,
            "golden",
        );
        let when =
            time::OffsetDateTime::parse(&s("time"), &time::format_description::well_known::Rfc3339)
                .unwrap();
        let when: SystemTime = when.into();
        let got = generate(
            &creds,
            &s("host"),
            c["port"].as_u64().unwrap() as u16,
            &s("user"),
            &s("region"),
            when,
        )
        .unwrap();
        assert_eq!(got, s("token"), "case {}", s("name"));
    }
}
