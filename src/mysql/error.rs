//! Failures as MySQL ERR packets: an error number and SQL state the client knows, and a
//! message naming the cause and the fix. Never a token or a secret.

use mysql_common::constants::CapabilityFlags;
use mysql_common::packets::{ErrPacket, ServerError as MyServerError, SqlState};
use mysql_common::proto::MySerialize;

use super::wire::packet;
use crate::config::Target;
use crate::failure::{Failure, ServerError};

/// Client-side error numbers that clients print as they print their own.
const CR_CONN_HOST_ERROR: u16 = 2003;
const CR_SERVER_LOST: u16 = 2013;
const ER_ACCESS_DENIED_ERROR: u16 = 1045;
const ER_HANDSHAKE_ERROR: u16 = 1043;
const ER_CON_COUNT_ERROR: u16 = 1040;
const ER_SECURE_TRANSPORT_REQUIRED: u16 = 3159;

/// (error number, SQL state, message) for a failure on `target`.
pub fn describe(f: &Failure, t: &Target) -> (u16, String, String) {
    let endpoint = format!("{}:{}", t.host, t.port);
    let denied = |user: &str, why: String| {
        (
            ER_ACCESS_DENIED_ERROR,
            "28000".to_string(),
            format!("Access denied for user '{user}' (rds-iam-proxy: {why})"),
        )
    };
    match f {
        Failure::WrongUser { got, expected } => denied(
            got,
            format!("target \"{}\" serves only user '{expected}'; connect as '{expected}'", t.name),
        ),
        Failure::Credentials(m) => denied(
            &t.db_user,
            format!("cannot get an IAM token: {m}; check the base credentials, role_arn, external_id and the role's trust policy"),
        ),
        Failure::Unreachable { addr, reason } => (
            CR_CONN_HOST_ERROR,
            "HY000".into(),
            format!("Can't connect to MySQL server on '{addr}' ({reason}) (rds-iam-proxy: check host, port, connect_to and security groups)"),
        ),
        Failure::TlsRefused { addr } => (
            CR_CONN_HOST_ERROR,
            "HY000".into(),
            format!("Can't connect to MySQL server on '{addr}' (the server does not offer TLS; rds-iam-proxy never sends an IAM token without TLS)"),
        ),
        Failure::Tls { addr, reason } => (
            CR_CONN_HOST_ERROR,
            "HY000".into(),
            format!("Can't connect to MySQL server on '{addr}' (TLS failed: {reason}; the certificate must chain to ca_file {} and name {})", t.ca_file.display(), t.host),
        ),
        Failure::NotIamUser { user, method } => denied(
            user,
            format!("the server asked for {method}: '{user}' is not an IAM user; create it with IDENTIFIED WITH AWSAuthenticationPlugin AS 'RDS', or set db_user to one that is"),
        ),
        Failure::TokenRejected(e) => (
            e.errno,
            e.code.clone(),
            format!(
                "{} (rds-iam-proxy signed an IAM token for {endpoint} as '{}' in region {}; the role must allow rds-db:connect on arn:aws:rds-db:{}:ACCOUNT:dbuser:DB-RESOURCE-ID/{}; check region, host (the real endpoint name, not a CNAME) and the user's plugin)",
                e.message, t.db_user, t.region, t.region, t.db_user
            ),
        ),
        Failure::ServerRefused(e) => (e.errno, e.code.clone(), e.message.clone()),
        Failure::ClientProtocol(m) => (ER_HANDSHAKE_ERROR, "08S01".into(), format!("Bad handshake (rds-iam-proxy: {m})")),
        Failure::UpstreamProtocol(m) => (
            CR_SERVER_LOST,
            "HY000".into(),
            format!("Lost connection to MySQL server during the login (rds-iam-proxy: {m})"),
        ),
        Failure::Timeout(m) => (
            CR_SERVER_LOST,
            "HY000".into(),
            format!("Lost connection to MySQL server: rds-iam-proxy timed out: {m}"),
        ),
        Failure::ClientTimeout(m) => (
            ER_HANDSHAKE_ERROR,
            "08S01".into(),
            format!("Bad handshake (rds-iam-proxy: {m} in time)"),
        ),
        Failure::Limit { max } => (
            ER_CON_COUNT_ERROR,
            "08004".into(),
            format!(
                "Too many connections (rds-iam-proxy: target \"{}\" allows {max}; raise max_connections or close idle clients)",
                t.name
            ),
        ),
        Failure::ServerLost => (
            CR_SERVER_LOST,
            "HY000".into(),
            "Lost connection to MySQL server (rds-iam-proxy: the database closed the connection; reconnect)".into(),
        ),
        Failure::Idle(d) => (
            CR_SERVER_LOST,
            "HY000".into(),
            format!("Lost connection to MySQL server (rds-iam-proxy idle_timeout = {} s)", d.as_secs()),
        ),
        Failure::ClientAuth { user } => (
            ER_ACCESS_DENIED_ERROR,
            "28000".into(),
            format!("Access denied for user '{user}' (using password: YES)"),
        ),
        Failure::ClientTlsRequired => (
            ER_SECURE_TRANSPORT_REQUIRED,
            "HY000".into(),
            format!("Connections using insecure transport are prohibited (rds-iam-proxy: target \"{}\" requires TLS; use --ssl)", t.name),
        ),
        Failure::Forward { .. } => (CR_SERVER_LOST, "HY000".into(), String::new()),
    }
}

/// An ERR packet payload.
pub fn err_payload(errno: u16, state: &str, message: &str) -> Vec<u8> {
    let mut st = [b'H', b'Y', b'0', b'0', b'0'];
    if state.len() == 5 {
        st.copy_from_slice(state.as_bytes());
    }
    let mut out = Vec::new();
    ErrPacket::Error(MyServerError::new(
        errno,
        Some(SqlState::new(st)),
        message.as_bytes(),
    ))
    .serialize(&mut out);
    out
}

/// The ERR packet (framed, with `seq`) for a failure.
pub fn encode(f: &Failure, t: &Target, seq: u8) -> Vec<u8> {
    if let Failure::Forward { raw, .. } = f {
        return raw.to_vec();
    }
    let (errno, state, message) = describe(f, t);
    packet(seq, &err_payload(errno, &state, &message))
}

/// Parse a server ERR payload.
pub fn parse_err(payload: &[u8], caps: CapabilityFlags) -> ServerError {
    let mut buf = mysql_common::io::ParseBuf(payload);
    match buf.parse::<ErrPacket<'_>>(caps) {
        Ok(ErrPacket::Error(e)) => ServerError {
            errno: e.error_code(),
            code: e
                .sql_state_ref()
                .map(|s| s.as_str().into_owned())
                .unwrap_or_else(|| "HY000".into()),
            message: e.message_str().into_owned(),
        },
        _ => ServerError {
            errno: ER_HANDSHAKE_ERROR,
            code: "08S01".into(),
            message: "malformed error packet from the server".into(),
        },
    }
}
