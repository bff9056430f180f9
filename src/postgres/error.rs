//! Failures as PostgreSQL ErrorResponses: SQLSTATE, a message naming the cause, a hint
//! naming the fix. Never a token or a secret.

use std::collections::HashMap;

use crate::listener::ClientIo;
use bytes::{Buf, BytesMut};
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::Message;
use tokio::io::AsyncWriteExt;

use crate::config::Target;
use crate::failure::Failure;

/// The fields of a server ErrorResponse (tag byte -> text).
pub fn parse_fields(msg: &[u8]) -> HashMap<u8, String> {
    let mut fields = HashMap::new();
    let mut body = &msg[5.min(msg.len())..];
    while body.has_remaining() && body[0] != 0 {
        let tag = body[0];
        let rest = &body[1..];
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        fields.insert(tag, String::from_utf8_lossy(&rest[..end]).into_owned());
        body = &rest[(end + 1).min(rest.len())..];
    }
    fields
}

/// (SQLSTATE, message, detail, hint) for a failure on `target`.
pub fn describe(f: &Failure, t: &Target) -> (String, String, Option<String>, Option<String>) {
    let endpoint = format!("{}:{}", t.host, t.port);
    match f {
        Failure::WrongUser { got, expected } => (
            "28000".into(),
            format!("rds-iam-proxy: user \"{got}\" is not served by target \"{}\"", t.name),
            None,
            Some(format!("connect as user \"{expected}\": the proxy logs in to {endpoint} only as its db_user")),
        ),
        Failure::Credentials(m) => (
            "28000".into(),
            format!("rds-iam-proxy: cannot get an IAM token for target \"{}\": {m}", t.name),
            None,
            Some("check the base credentials, role_arn, external_id and the role's trust policy; `rds-iam-proxy check` shows each hop".into()),
        ),
        Failure::Unreachable { addr, reason } => (
            "08001".into(),
            format!("rds-iam-proxy: cannot connect to the database at {addr}: {reason}"),
            None,
            Some("check host, port and connect_to, and that security groups allow this machine".into()),
        ),
        Failure::TlsRefused { addr } => (
            "08001".into(),
            format!("rds-iam-proxy: the server at {addr} refused TLS; an IAM token is never sent without TLS"),
            None,
            Some("point the target at an RDS endpoint (RDS always offers TLS), or fix connect_to".into()),
        ),
        Failure::Tls { addr, reason } => (
            "08001".into(),
            format!("rds-iam-proxy: TLS with {addr} failed: {reason}"),
            Some(format!("the certificate must chain to ca_file {} and name {}", t.ca_file.display(), t.host)),
            None,
        ),
        Failure::NotIamUser { user, method } => (
            "28000".into(),
            format!("rds-iam-proxy: the server asked for {method} for user \"{user}\": it is not an IAM user"),
            None,
            Some(format!("on the database run GRANT rds_iam TO \"{user}\"; or set db_user to a user that has it")),
        ),
        Failure::TokenRejected(e) => (
            e.code.clone(),
            e.message.clone(),
            Some(format!(
                "rds-iam-proxy signed an IAM token for {endpoint} as user \"{}\" in region {}",
                t.db_user, t.region
            )),
            Some(format!(
                "the role must allow rds-db:connect on arn:aws:rds-db:{}:ACCOUNT:dbuser:DB-RESOURCE-ID/{}; check region, host (the real endpoint name, not a CNAME) and that the user has GRANT rds_iam",
                t.region, t.db_user
            )),
        ),
        Failure::ServerRefused(e) => (e.code.clone(), e.message.clone(), None, None),
        Failure::ClientProtocol(m) => ("08P01".into(), format!("rds-iam-proxy: {m}"), None, None),
        Failure::UpstreamProtocol(m) => (
            "08006".into(),
            format!("rds-iam-proxy: the database connection failed: {m}"),
            None,
            None,
        ),
        Failure::Timeout(m) => (
            "08006".into(),
            format!("rds-iam-proxy: timed out: {m}"),
            None,
            Some("check that the database and STS answer; see the proxy's log".into()),
        ),
        Failure::ClientTimeout(m) => (
            "08P01".into(),
            format!("rds-iam-proxy: {m} in time"),
            None,
            None,
        ),
        Failure::Limit { max } => (
            "53300".into(),
            format!(
                "sorry, too many clients already (rds-iam-proxy: target \"{}\" allows {max})",
                t.name
            ),
            None,
            Some("raise max_connections for the target, or close idle clients".into()),
        ),
        Failure::ServerLost => (
            "08006".into(),
            "rds-iam-proxy: the database closed the connection (restart or failover?)".into(),
            None,
            Some("reconnect; new connections go to the server the endpoint name points at now".into()),
        ),
        Failure::Idle(d) => (
            "57P05".into(),
            format!(
                "terminating connection due to idle timeout (rds-iam-proxy idle_timeout = {} s)",
                d.as_secs()
            ),
            None,
            None,
        ),
        Failure::ClientAuth { user } => (
            "28P01".into(),
            format!("password authentication failed for user \"{user}\""),
            None,
            Some("this target requires the password from its client_password_file or client_password_env".into()),
        ),
        Failure::ClientTlsRequired => (
            "28000".into(),
            format!("rds-iam-proxy: target \"{}\" accepts only TLS connections", t.name),
            None,
            Some("connect with sslmode=require (or verify-full)".into()),
        ),
        Failure::Forward { .. } => ("XX000".into(), String::new(), None, None),
    }
}

pub fn encode(f: &Failure, t: &Target) -> BytesMut {
    if let Failure::Forward { raw, .. } = f {
        return BytesMut::from(&raw[..]);
    }
    let (code, message, detail, hint) = describe(f, t);
    let mut fields = vec![
        (b'S', "FATAL".to_string()),
        (b'V', "FATAL".to_string()),
        (b'C', code),
        (b'M', message),
    ];
    if let Some(d) = detail {
        fields.push((b'D', d));
    }
    if let Some(h) = hint {
        fields.push((b'H', h));
    }
    let mut buf = BytesMut::new();
    // Encoding a plain ErrorResponse cannot fail; an empty buffer just closes the socket.
    let _ = ErrorResponse::new(fields).encode(&mut buf);
    buf
}

/// Send an encoded error, then let the connection close.
pub async fn send_raw(client: &mut ClientIo, reply: &[u8]) {
    let _ = client.write_all(reply).await;
    let _ = client.shutdown().await;
}
