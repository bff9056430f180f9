//! The RDS IAM token: a SigV4-presigned `rds-db:connect` URL without its scheme.
//!
//! A pure function of (credentials, endpoint, user, region, time), so it can be checked
//! byte for byte against botocore's `generate_db_auth_token` (tests/golden/).

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// RDS accepts a token for 15 minutes after it was signed.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);

/// RFC 3986 unreserved characters stay; everything else is escaped, as botocore does.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

#[derive(Debug, thiserror::Error)]
#[error("cannot sign the RDS token: {0}")]
pub struct SignError(String);

/// Sign a token for `host:port` and `db_user` in `region` at `time`.
pub fn generate(
    credentials: &Credentials,
    host: &str,
    port: u16,
    db_user: &str,
    region: &str,
    time: SystemTime,
) -> Result<String, SignError> {
    let endpoint = format!("{host}:{port}");
    let action = format!(
        "Action=connect&DBUser={}",
        utf8_percent_encode(db_user, QUERY_VALUE)
    );
    let url = format!("https://{endpoint}/?{action}");

    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(TOKEN_LIFETIME);
    let identity: Identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("rds-db")
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| SignError(e.to_string()))?
        .into();
    let request = SignableRequest::new(
        "GET",
        url.as_str(),
        std::iter::once(("host", endpoint.as_str())),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| SignError(e.to_string()))?;
    let (instructions, _) = sign(request, &params)
        .map_err(|e| SignError(e.to_string()))?
        .into_parts();

    // botocore appends the auth parameters in this order, the signature last.
    const ORDER: [&str; 7] = [
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Security-Token",
        "X-Amz-Signature",
    ];
    let mut token =
        String::with_capacity(512 + credentials.session_token().map_or(0, str::len) * 2);
    token.push_str(&endpoint);
    token.push_str("/?");
    token.push_str(&action);
    for name in ORDER {
        if let Some((_, value)) = instructions.params().iter().find(|(n, _)| *n == name) {
            token.push('&');
            token.push_str(name);
            token.push('=');
            token.extend(utf8_percent_encode(value, QUERY_VALUE));
        }
    }
    if !token.contains("&X-Amz-Signature=") {
        return Err(SignError("signer returned no signature".into()));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// The vector published for botocore's signer (see ../shared/LAB.md).
    #[test]
    fn published_vector() {
        let creds = Credentials::new("AKIAKIAKIAKIAKIAKIAK", "1".repeat(40), None, None, "test");
        // 2018-07-22T20:22:36Z
        let t = generate(
            &creds,
            "mydb.c1fycpveg7nf.us-west-2.rds.amazonaws.com",
            3306,
            "mysqluser",
            "eu-west-1",
            at(1_532_290_956),
        )
        .unwrap();
        assert!(
            t.ends_with(
                "&X-Amz-Signature=b77c366f1379046852039d21f733035fa73696275c03dd2908ef267c3049d831"
            ),
            "{t}"
        );
    }
}
