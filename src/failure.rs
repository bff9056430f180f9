//! Why a proxied session could not be set up, in engine-neutral terms. Each engine renders
//! these in its own protocol (`postgres::error`, `mysql::error`) with cause and fix.

use std::fmt;

/// An error reported by the database server, in engine-neutral terms.
#[derive(Debug, Clone)]
pub struct ServerError {
    /// SQLSTATE.
    pub code: String,
    /// MySQL error number (0 for PostgreSQL).
    pub errno: u16,
    pub message: String,
}

#[derive(Debug)]
pub enum Failure {
    /// The client asked for a user other than the target's `db_user`.
    WrongUser { got: String, expected: String },
    /// No token: credentials could not be had (STS refused, no base credentials...).
    Credentials(String),
    /// TCP connect to the upstream failed or timed out.
    Unreachable { addr: String, reason: String },
    /// The upstream refused TLS; the token is never sent in clear.
    TlsRefused { addr: String },
    /// The TLS handshake failed (certificate, name, protocol).
    Tls { addr: String, reason: String },
    /// The server asked for an authentication other than cleartext: not an IAM user.
    NotIamUser { user: String, method: String },
    /// The server refused the token. `message` is the server's own words.
    TokenRejected(ServerError),
    /// The server refused the login before asking for a password.
    ServerRefused(ServerError),
    /// The server's own error, already encoded in the client's protocol: passed on as is.
    /// `reason` is its message, for the log.
    Forward { raw: bytes::Bytes, reason: String },
    /// The client broke the protocol.
    ClientProtocol(String),
    /// An upstream step (dial, TLS, token, login) did not finish in time (the text says which).
    Timeout(String),
    /// The client did not finish its side of the handshake in time.
    ClientTimeout(String),
    /// The target is at its `max_connections`.
    Limit { max: usize },
    /// The server went away mid-session (restart, failover): told to the client on the way out.
    ServerLost,
    /// The session was idle for the target's `idle_timeout`.
    Idle(std::time::Duration),
    /// The client did not prove the target's client secret.
    ClientAuth { user: String },
    /// The target requires TLS from clients and this one came in plain.
    ClientTlsRequired,
    /// The upstream broke the protocol or closed during the handshake.
    UpstreamProtocol(String),
}

impl Failure {
    /// The result label of logs and metrics: auth_failed, upstream_error, client_error, limit.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::WrongUser { .. }
            | Failure::Credentials(_)
            | Failure::NotIamUser { .. }
            | Failure::TokenRejected { .. } => "auth_failed",
            Failure::Unreachable { .. }
            | Failure::TlsRefused { .. }
            | Failure::Tls { .. }
            | Failure::UpstreamProtocol(_)
            | Failure::Timeout(_)
            | Failure::ServerRefused(_)
            | Failure::Forward { .. } => "upstream_error",
            Failure::ClientProtocol(_) | Failure::ClientTimeout(_) => "client_error",
            Failure::Limit { .. } => "limit",
            Failure::ServerLost => "upstream_error",
            Failure::ClientAuth { .. } => "auth_failed",
            Failure::ClientTlsRequired => "client_error",
            Failure::Idle(_) => "client_error",
        }
    }

    /// For upstream connect and TLS failures, their kind (the upstream_errors metric).
    pub fn upstream_kind(&self) -> Option<&'static str> {
        match self {
            Failure::Unreachable { .. } => Some("connect"),
            Failure::TlsRefused { .. } => Some("tls_refused"),
            Failure::Tls { .. } => Some("tls"),
            Failure::UpstreamProtocol(_) => Some("protocol"),
            Failure::Timeout(_) => Some("timeout"),
            _ => None,
        }
    }

    /// What to do about it, in a few words (for `check` and hints).
    pub fn fix(&self) -> &'static str {
        match self {
            Failure::WrongUser { .. } => "connect as the target's db_user",
            Failure::Credentials(_) => "check the base credentials, role_arn, external_id and the role's trust policy",
            Failure::Unreachable { .. } | Failure::Timeout(_) => "check host, port, connect_to and that security groups allow this machine",
            Failure::TlsRefused { .. } => "point the target at an RDS endpoint (RDS always offers TLS) or fix connect_to",
            Failure::Tls { .. } => "set ca_file to the RDS bundle for the region and host to the endpoint name the certificate carries",
            Failure::NotIamUser { .. } => "make db_user an IAM user (PostgreSQL: GRANT rds_iam; MySQL: IDENTIFIED WITH AWSAuthenticationPlugin AS 'RDS')",
            Failure::TokenRejected(_) => "allow rds-db:connect on the db user's resource for the role, and check region and host",
            Failure::ServerRefused(_) | Failure::Forward { .. } => "see the server's message",
            Failure::ClientProtocol(_) | Failure::ClientTimeout(_) => "check the client's connection settings (plain TCP, the target's protocol)",
            Failure::UpstreamProtocol(_) => "check that connect_to reaches a database server of the target's engine",
            Failure::Limit { .. } => "raise max_connections or close idle clients",
            Failure::ServerLost => "reconnect: new connections go to the server as DNS names it now",
            Failure::ClientAuth { .. } => "give the client the password in the target's client_password_file",
            Failure::ClientTlsRequired => "connect with TLS (sslmode=require, --ssl)",
            Failure::Idle(_) => "reconnect, or raise idle_timeout",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::WrongUser { got, expected } => write!(
                f,
                "user \"{got}\" is not served here; this proxy logs in as \"{expected}\""
            ),
            Failure::Credentials(m) => write!(f, "cannot obtain AWS credentials: {m}"),
            Failure::Unreachable { addr, reason } => write!(f, "cannot reach {addr}: {reason}"),
            Failure::TlsRefused { addr } => write!(f, "{addr} refused TLS"),
            Failure::Tls { addr, reason } => write!(f, "TLS to {addr} failed: {reason}"),
            Failure::NotIamUser { user, method } => {
                write!(f, "server asked {method} for {user}: not an IAM user")
            }
            Failure::TokenRejected(e) => write!(f, "server rejected the token: {}", e.message),
            Failure::ServerRefused(e) => write!(f, "server refused the login: {}", e.message),
            Failure::Forward { reason, .. } => write!(f, "server error: {reason}"),
            Failure::ClientProtocol(m) => write!(f, "client protocol error: {m}"),
            Failure::Timeout(m) => write!(f, "timed out: {m}"),
            Failure::ClientTimeout(m) => write!(f, "client timed out: {m}"),
            Failure::Limit { max } => write!(f, "too many connections (max_connections = {max})"),
            Failure::ServerLost => write!(f, "the database closed the connection"),
            Failure::ClientAuth { user } => {
                write!(f, "client password check failed for \"{user}\"")
            }
            Failure::ClientTlsRequired => write!(f, "the target requires TLS from clients"),
            Failure::Idle(d) => write!(f, "idle for {} s (idle_timeout)", d.as_secs()),
            Failure::UpstreamProtocol(m) => write!(f, "upstream protocol error: {m}"),
        }
    }
}
