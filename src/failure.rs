//! Why a proxied session could not be set up, in engine-neutral terms. Each engine renders
//! these in its own protocol (`postgres::error`, later `mysql::error`) with cause and fix.

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
    /// A step did not finish in time (the text says which).
    Timeout(String),
    /// The upstream broke the protocol or closed during the handshake.
    UpstreamProtocol(String),
}

impl Failure {
    /// The result label used in logs (and metrics later).
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::WrongUser { .. }
            | Failure::Credentials(_)
            | Failure::NotIamUser { .. }
            | Failure::TokenRejected { .. } => "auth_failed",
            Failure::Unreachable { .. }
            | Failure::TlsRefused { .. }
            | Failure::Tls { .. }
            | Failure::UpstreamProtocol(_) => "upstream_error",
            Failure::ServerRefused(_) | Failure::Forward { .. } => "server_error",
            Failure::ClientProtocol(_) => "client_error",
            Failure::Timeout(_) => "timeout",
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
            Failure::UpstreamProtocol(m) => write!(f, "upstream protocol error: {m}"),
        }
    }
}
