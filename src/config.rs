//! Configuration: one TOML file (`--config` or `RDS_IAM_PROXY_CONFIG`) describing targets.
//!
//! Everything is validated before the proxy binds a port, and every refusal names the key
//! and the fix, so a bad deploy fails at start rather than at the first client.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole file. No `Debug`: it holds secrets as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetConfig>,
}

/// `[admin]`: the HTTP endpoint for health probes and Prometheus.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            enabled: true,
        }
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:9090".into()
}

fn yes() -> bool {
    true
}

/// `[proxy]`: process-wide behaviour.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Seconds open sessions get to finish after SIGTERM/SIGINT (default 30).
    pub shutdown_grace: Option<u64>,
    /// Seconds a client has to finish its side of the handshake (default 60).
    pub handshake_timeout: Option<u64>,
    /// Threads relaying bytes (default 1; read at start, not on reload).
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Postgres,
    Mysql,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Mysql => "mysql",
        }
    }
}

/// How the upstream certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Chain to `ca_file` and the name `host` (like libpq's `verify-full`).
    #[default]
    VerifyFull,
    /// Chain to `ca_file` only; for endpoints reached under a name the certificate lacks.
    VerifyCa,
}

/// One `[[target]]` table as written by the user. No `Debug`: it holds secrets as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    pub engine: Engine,
    pub listen: String,
    /// Allow a non-loopback `listen`: whoever reaches it gets a session as `db_user`.
    #[serde(default)]
    pub allow_remote: bool,
    /// Mode of a unix-socket listener, octal (default "0660").
    pub socket_mode: Option<String>,
    /// Clients must prove this secret (read from the file, or the environment variable).
    pub client_password_file: Option<PathBuf>,
    pub client_password_env: Option<String>,
    /// TLS toward clients: certificate chain and key (PEM).
    pub client_tls_cert: Option<PathBuf>,
    pub client_tls_key: Option<PathBuf>,
    /// Refuse clients that do not use TLS.
    #[serde(default)]
    pub client_tls_required: bool,
    pub host: String,
    pub port: Option<u16>,
    pub connect_to: Option<String>,
    pub region: Option<String>,
    pub db_user: String,
    pub database: Option<String>,
    pub ca_file: PathBuf,
    #[serde(default)]
    pub tls_mode: TlsMode,
    /// Seconds to wait for TCP connect + TLS to the upstream.
    pub connect_timeout: Option<u64>,
    /// Client connections served at once; one more gets "too many connections".
    pub max_connections: Option<usize>,
    /// Seconds without a byte either way after which a session is closed.
    pub idle_timeout: Option<u64>,

    // Base credentials: the default chain unless one of these is given.
    pub profile: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Region for STS calls; defaults to `AWS_REGION`, then the target's region.
    pub sts_region: Option<String>,

    // The last (or only) hop of the role chain.
    pub role_arn: Option<String>,
    pub external_id: Option<String>,
    pub session_name: Option<String>,
    /// Seconds; STS allows 900..=43200, and at most 3600 for a chained role.
    pub session_duration: Option<u64>,

    /// Hops assumed, in order, before `role_arn`.
    #[serde(default)]
    pub role_chain: Vec<RoleHopConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleHopConfig {
    pub role_arn: String,
    pub external_id: Option<String>,
    pub session_name: Option<String>,
    pub session_duration: Option<u64>,
}

/// Where a secret is read from: never the config itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// Where a target listens: a TCP address, or a unix socket (`unix:/path`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Where base credentials come from.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum BaseCredentials {
    DefaultChain,
    Profile(String),
    Static {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
    },
}

impl fmt::Debug for BaseCredentials {
    // Never print the secret or the session token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BaseCredentials::DefaultChain => f.write_str("DefaultChain"),
            BaseCredentials::Profile(p) => write!(f, "Profile({p})"),
            BaseCredentials::Static { access_key_id, .. } => {
                write!(f, "Static({access_key_id}, secret=<redacted>)")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoleHop {
    pub role_arn: String,
    pub external_id: Option<String>,
    pub session_name: String,
    pub session_duration: Option<Duration>,
}

/// Where AWS credentials come from, fully resolved: base source then role hops in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CredentialSpec {
    pub base: BaseCredentials,
    pub hops: Vec<RoleHop>,
    pub sts_region: String,
}

impl CredentialSpec {
    /// A printable identity for logs and cache keys: no secrets, only key ids and ARNs.
    pub fn identity(&self) -> String {
        let mut s = match &self.base {
            BaseCredentials::DefaultChain => "default-chain".to_string(),
            BaseCredentials::Profile(p) => format!("profile:{p}"),
            BaseCredentials::Static { access_key_id, .. } => format!("static:{access_key_id}"),
        };
        for hop in &self.hops {
            s.push_str(" -> ");
            s.push_str(&hop.role_arn);
            s.push('#');
            s.push_str(&hop.session_name);
        }
        s
    }
}

/// A validated target, ready to serve.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub engine: Engine,
    pub listen: ListenAddr,
    /// Permissions of a unix-socket listener.
    pub socket_mode: u32,
    /// Where the client secret comes from, if clients must authenticate.
    pub client_password: Option<SecretSource>,
    /// (certificate, key) for TLS toward clients.
    pub client_tls: Option<(PathBuf, PathBuf)>,
    pub client_tls_required: bool,
    pub host: String,
    pub port: u16,
    /// The address dialed: `connect_to` if set, else `host:port`.
    pub dial: String,
    pub region: String,
    pub db_user: String,
    pub database: Option<String>,
    pub ca_file: PathBuf,
    pub tls_mode: TlsMode,
    pub connect_timeout: Duration,
    /// From `[proxy] handshake_timeout`: the client's side of the handshake.
    pub handshake_timeout: Duration,
    pub max_connections: Option<usize>,
    pub idle_timeout: Option<Duration>,
    pub credentials: CredentialSpec,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub targets: Vec<Target>,
    /// The admin HTTP endpoint, unless disabled.
    pub admin_listen: Option<SocketAddr>,
    pub shutdown_grace: Duration,
    pub worker_threads: usize,
}

/// One thread: measured in docs/performance.md, a second one costs more in cross-thread
/// wake-ups than it gains while the database shares the machine; raise it for heavy traffic
/// on larger hosts, as one would run several pgbouncers.
const DEFAULT_WORKER_THREADS: usize = 1;
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Like PostgreSQL's authentication_timeout.
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// A configuration refusal: what is wrong, where, and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

pub const DEFAULT_SESSION_NAME: &str = "rds-iam-proxy";
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(format!(
                "cannot read config file {}: {e}; pass an existing file with --config or RDS_IAM_PROXY_CONFIG",
                path.display()
            ))
        })?;
        let config = Self::parse(&text, &path.display().to_string())?;
        warn_if_secrets_readable(path, &config);
        Ok(config)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            err(format!(
                "config {origin}: {}{}",
                e.message(),
                locate(text, e.span())
            ))
        })?;
        if file.targets.is_empty() {
            return Err(err(format!(
                "config {origin}: no [[target]] table; add at least one target (see config/example.toml)"
            )));
        }
        let handshake_timeout = match file.proxy.handshake_timeout {
            Some(0) => {
                return Err(err(format!(
                    "config {origin}: [proxy] handshake_timeout = 0 would drop every client; give seconds, e.g. 60"
                )))
            }
            Some(s) => Duration::from_secs(s),
            None => DEFAULT_HANDSHAKE_TIMEOUT,
        };
        let worker_threads = match file.proxy.worker_threads {
            Some(0) => {
                return Err(err(format!(
                    "config {origin}: [proxy] worker_threads = 0 leaves no thread to relay; give 1 or more"
                )))
            }
            Some(n) => n,
            None => DEFAULT_WORKER_THREADS,
        };
        let mut targets = Vec::new();
        let mut names = HashMap::new();
        let mut listens = HashMap::new();
        for (i, t) in file.targets.into_iter().enumerate() {
            let label = if t.name.is_empty() {
                format!("target #{}", i + 1)
            } else {
                format!("target \"{}\"", t.name)
            };
            let mut target =
                validate_target(t).map_err(|e| err(format!("config {origin}: {label}: {e}")))?;
            target.handshake_timeout = handshake_timeout;
            if let Some(prev) = names.insert(target.name.clone(), i) {
                return Err(err(format!(
                    "config {origin}: targets #{} and #{} are both named \"{}\"; give each target a unique name",
                    prev + 1,
                    i + 1,
                    target.name
                )));
            }
            if let Some(prev) = listens.insert(target.listen.clone(), target.name.clone()) {
                return Err(err(format!(
                    "config {origin}: targets \"{prev}\" and \"{}\" both listen on {}; give each target its own `listen` address",
                    target.name, target.listen
                )));
            }
            targets.push(target);
        }
        let admin_listen = if file.admin.enabled {
            let addr: SocketAddr = file.admin.listen.parse().map_err(|_| {
                err(format!(
                    "config {origin}: [admin] listen = \"{}\" is not an IP:PORT address; use e.g. \"127.0.0.1:9090\", or enabled = false",
                    file.admin.listen
                ))
            })?;
            if let Some(t) = targets.iter().find(|t| t.listen == ListenAddr::Tcp(addr)) {
                return Err(err(format!(
                    "config {origin}: [admin] listen = {addr} is also target \"{}\"'s listen address; give the admin endpoint its own port",
                    t.name
                )));
            }
            Some(addr)
        } else {
            None
        };
        Ok(Config {
            targets,
            admin_listen,
            shutdown_grace: file
                .proxy
                .shutdown_grace
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            worker_threads,
        })
    }

    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }
}

/// Static secret keys in a file that other users can read: say so, loudly.
fn warn_if_secrets_readable(path: &Path, config: &Config) {
    use std::os::unix::fs::PermissionsExt;
    let has_secret = config
        .targets
        .iter()
        .any(|t| matches!(t.credentials.base, BaseCredentials::Static { .. }));
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if has_secret && mode & 0o004 != 0 {
        tracing::warn!(
            file = %path.display(),
            mode = %format!("{mode:o}"),
            "the config holds secret_access_key and is readable by every user on this machine; run chmod 600 on it (or 640 with the service's group)"
        );
    }
}

fn locate(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

fn validate_target(t: TargetConfig) -> Result<Target, String> {
    if t.name.trim().is_empty() {
        return Err("`name` is empty; give the target a short label such as \"orders\"".into());
    }
    let listen = match t.listen.strip_prefix("unix:") {
        Some(path) => {
            if !path.starts_with('/') {
                return Err(format!(
                    "`listen` = \"{}\": a unix socket needs an absolute path, e.g. \"unix:/run/rds-iam-proxy/orders.sock\"",
                    t.listen
                ));
            }
            ListenAddr::Unix(PathBuf::from(path))
        }
        None => {
            let addr: SocketAddr = t.listen.parse().map_err(|_| {
                format!(
                    "`listen` = \"{}\" is not an IP:PORT address or unix:/path; use e.g. \"127.0.0.1:6432\"",
                    t.listen
                )
            })?;
            let authenticated = t.client_password_file.is_some() || t.client_password_env.is_some();
            if !addr.ip().is_loopback() && !t.allow_remote && !authenticated {
                return Err(format!(
                    "`listen` = \"{}\" is not a loopback address: anyone who reaches it gets a database session as `db_user` without a password; listen on 127.0.0.1, require client authentication (client_password_file), or set allow_remote = true if only trusted hosts can reach it",
                    t.listen
                ));
            }
            ListenAddr::Tcp(addr)
        }
    };
    let client_password = match (&t.client_password_file, &t.client_password_env) {
        (Some(_), Some(_)) => {
            return Err(
                "set either `client_password_file` or `client_password_env`, not both".into(),
            )
        }
        (Some(f), None) => Some(SecretSource::File(f.clone())),
        (None, Some(v)) => Some(SecretSource::Env(v.clone())),
        (None, None) => None,
    };
    let client_tls = match (&t.client_tls_cert, &t.client_tls_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        _ => {
            return Err(
                "`client_tls_cert` and `client_tls_key` go together; set both or neither".into(),
            )
        }
    };
    if t.client_tls_required && client_tls.is_none() {
        return Err("`client_tls_required` needs `client_tls_cert` and `client_tls_key`".into());
    }
    if t.engine == Engine::Mysql && client_password.is_some() && client_tls.is_none() {
        return Err("MySQL client authentication (mysql_native_password, caching_sha2_password) is only offered over TLS: set `client_tls_cert` and `client_tls_key`".into());
    }
    let socket_mode = match &t.socket_mode {
        None => 0o660,
        Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
            Ok(v) if v <= 0o777 => v,
            _ => {
                return Err(format!(
                    "`socket_mode` = \"{m}\" is not an octal file mode such as \"0660\""
                ))
            }
        },
    };
    if t.host.trim().is_empty() || t.host.contains(':') || t.host.contains('/') {
        return Err(format!(
            "`host` = \"{}\" must be the bare RDS endpoint name (no port, no scheme), e.g. \"orders.abc123.us-east-1.rds.amazonaws.com\"",
            t.host
        ));
    }
    let port = t.port.unwrap_or(match t.engine {
        Engine::Postgres => 5432,
        Engine::Mysql => 3306,
    });
    if port == 0 {
        return Err("`port` must be between 1 and 65535".into());
    }
    let dial = match &t.connect_to {
        Some(c) => {
            if !looks_like_host_port(c) {
                return Err(format!(
                    "`connect_to` = \"{c}\" must be HOST:PORT, e.g. \"127.0.0.1:15432\" for an SSH tunnel"
                ));
            }
            c.clone()
        }
        None => format!("{}:{}", t.host, port),
    };
    let region = match (&t.region, region_from_host(&t.host)) {
        (Some(r), _) => {
            if !is_region(r) {
                return Err(format!(
                    "`region` = \"{r}\" is not an AWS region name such as \"us-east-1\""
                ));
            }
            r.clone()
        }
        (None, Some(r)) => r,
        (None, None) => {
            return Err(format!(
                "`region` is missing and cannot be read from `host` = \"{}\"; add region = \"us-east-1\" (the database's region)",
                t.host
            ))
        }
    };
    if t.db_user.trim().is_empty() {
        return Err(
            "`db_user` is empty; set it to the database user granted rds_iam / created with AWSAuthenticationPlugin".into(),
        );
    }
    check_ca_file(&t.ca_file)?;
    let connect_timeout = match t.connect_timeout {
        Some(0) => {
            return Err(
                "`connect_timeout` = 0 would fail every connection; give seconds, e.g. 10".into(),
            )
        }
        Some(s) => Duration::from_secs(s),
        None => DEFAULT_CONNECT_TIMEOUT,
    };

    let base = match (&t.profile, &t.access_key_id, &t.secret_access_key) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err("set either `profile` or `access_key_id` + `secret_access_key`, not both".into())
        }
        (Some(p), None, None) => BaseCredentials::Profile(p.clone()),
        (None, Some(a), Some(s)) => BaseCredentials::Static {
            access_key_id: a.clone(),
            secret_access_key: s.clone(),
            session_token: t.session_token.clone(),
        },
        (None, Some(_), None) => {
            return Err("`access_key_id` is set without `secret_access_key`; add it, or remove both to use the default credential chain".into())
        }
        (None, None, Some(_)) => {
            return Err("`secret_access_key` is set without `access_key_id`; add it, or remove both to use the default credential chain".into())
        }
        (None, None, None) => {
            if t.session_token.is_some() {
                return Err("`session_token` needs `access_key_id` and `secret_access_key`".into());
            }
            BaseCredentials::DefaultChain
        }
    };

    let mut hops = Vec::new();
    for (i, h) in t.role_chain.iter().enumerate() {
        hops.push(validate_hop(
            &format!("role_chain[{i}]"),
            &h.role_arn,
            &h.external_id,
            &h.session_name,
            h.session_duration,
            i > 0,
        )?);
    }
    match &t.role_arn {
        Some(arn) => hops.push(validate_hop(
            "",
            arn,
            &t.external_id,
            &t.session_name,
            t.session_duration,
            !t.role_chain.is_empty(),
        )?),
        None => {
            if !t.role_chain.is_empty() {
                return Err(
                    "`role_chain` is set but `role_arn` (the final role) is missing; add role_arn"
                        .into(),
                );
            }
            if t.external_id.is_some() || t.session_name.is_some() || t.session_duration.is_some() {
                return Err("`external_id`, `session_name` and `session_duration` need `role_arn`; add the role to assume or remove them".into());
            }
        }
    }
    let sts_region = t
        .sts_region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok().filter(|r| !r.is_empty()))
        .unwrap_or_else(|| region.clone());

    Ok(Target {
        name: t.name,
        engine: t.engine,
        listen,
        socket_mode,
        client_password,
        client_tls,
        client_tls_required: t.client_tls_required,
        host: t.host.to_ascii_lowercase(),
        port,
        dial,
        region,
        db_user: t.db_user,
        database: t.database,
        ca_file: t.ca_file,
        tls_mode: t.tls_mode,
        connect_timeout,
        handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: match t.idle_timeout {
            Some(0) => return Err("`idle_timeout` = 0 would close every session at once; give seconds or remove it".into()),
            s => s.map(Duration::from_secs),
        },
        max_connections: match t.max_connections {
            Some(0) => return Err("`max_connections` = 0 would refuse every client; give a positive number or remove it".into()),
            m => m,
        },
        credentials: CredentialSpec {
            base,
            hops,
            sts_region,
        },
    })
}

fn validate_hop(
    prefix: &str,
    arn: &str,
    external_id: &Option<String>,
    session_name: &Option<String>,
    duration: Option<u64>,
    chained: bool,
) -> Result<RoleHop, String> {
    let key = |k: &str| {
        if prefix.is_empty() {
            format!("`{k}`")
        } else {
            format!("`{prefix}.{k}`")
        }
    };
    if !is_role_arn(arn) {
        return Err(format!(
            "{} = \"{arn}\" is not a role ARN; expected arn:aws:iam::123456789012:role/NAME",
            key("role_arn")
        ));
    }
    let session_name = session_name
        .clone()
        .unwrap_or_else(|| DEFAULT_SESSION_NAME.to_string());
    let name_ok = (2..=64).contains(&session_name.len())
        && session_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+=,.@-_".contains(c));
    if !name_ok {
        return Err(format!(
            "{} = \"{session_name}\" is not a valid STS session name (2-64 characters of A-Z a-z 0-9 +=,.@-_)",
            key("session_name")
        ));
    }
    if let Some(id) = external_id {
        if id.len() < 2 || id.len() > 1224 {
            return Err(format!(
                "{} must be 2 to 1224 characters long",
                key("external_id")
            ));
        }
    }
    if let Some(d) = duration {
        if chained && d > 3600 {
            return Err(format!(
                "{} = {d}: a role assumed with another role's session (role chaining) gets at most 3600 seconds",
                key("session_duration")
            ));
        }
        if !(900..=43200).contains(&d) {
            return Err(format!(
                "{} = {d} is out of range; STS accepts 900 to 43200 seconds (3600 at most for a chained role)",
                key("session_duration")
            ));
        }
    }
    Ok(RoleHop {
        role_arn: arn.to_string(),
        external_id: external_id.clone(),
        session_name,
        session_duration: duration.map(Duration::from_secs),
    })
}

/// `arn:PARTITION:iam::ACCOUNT:role/PATH/NAME`
fn is_role_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    if parts.len() != 6 {
        return false;
    }
    // aws, aws-cn, aws-us-gov, aws-iso, aws-iso-b, aws-iso-e... new ones keep the shape.
    let partition_ok = parts[1] == "aws"
        || parts[1].strip_prefix("aws-").is_some_and(|p| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        });
    let account_ok = parts[4].len() == 12 && parts[4].bytes().all(|b| b.is_ascii_digit());
    let resource_ok = parts[5]
        .strip_prefix("role/")
        .is_some_and(|r| !r.is_empty() && !r.ends_with('/'));
    parts[0] == "arn"
        && partition_ok
        && parts[2] == "iam"
        && parts[3].is_empty()
        && account_ok
        && resource_ok
}

fn is_region(r: &str) -> bool {
    let parts: Vec<&str> = r.split('-').collect();
    parts.len() >= 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        && parts.last().unwrap().bytes().all(|b| b.is_ascii_digit())
}

/// `name.id.REGION.rds.amazonaws.com` (and the China partition's `.com.cn`).
pub fn region_from_host(host: &str) -> Option<String> {
    let host = host.to_ascii_lowercase();
    let stem = host
        .strip_suffix(".rds.amazonaws.com")
        .or_else(|| host.strip_suffix(".rds.amazonaws.com.cn"))?;
    let region = stem.rsplit('.').next()?;
    is_region(region).then(|| region.to_string())
}

fn looks_like_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((h, p)) => !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

fn check_ca_file(path: &Path) -> Result<(), String> {
    let fix = "download the RDS bundle (https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem) and point `ca_file` at it";
    let data = std::fs::read(path).map_err(|e| {
        format!(
            "`ca_file` = \"{}\" cannot be read: {e}; {fix}",
            path.display()
        )
    })?;
    match crate::tls::parse_certificates(&data) {
        Ok(certs) if !certs.is_empty() => Ok(()),
        _ => Err(format!(
            "`ca_file` = \"{}\" holds no PEM certificate; {fix}",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> String {
        // Written once: tests run in parallel and must not see a half-written file.
        static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        PATH.get_or_init(write_ca).clone()
    }

    fn write_ca() -> String {
        let dir = std::env::temp_dir().join(format!("rip-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("ca.pem");
        // A syntactically valid certificate is all the loader checks here.
        std::fs::write(&p, TEST_CERT).unwrap();
        p.display().to_string()
    }

    const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----
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

    fn base(extra: &str) -> String {
        format!(
            "[[target]]\nname = \"orders\"\nengine = \"postgres\"\nlisten = \"127.0.0.1:6432\"\nhost = \"orders.abc123.us-east-1.rds.amazonaws.com\"\ndb_user = \"bytebase\"\nca_file = \"{}\"\n{extra}",
            ca()
        )
    }

    #[test]
    fn minimal_target_gets_defaults() {
        let c = Config::parse(&base(""), "t").unwrap();
        let t = &c.targets[0];
        assert_eq!(t.port, 5432);
        assert_eq!(t.region, "us-east-1");
        assert_eq!(t.dial, "orders.abc123.us-east-1.rds.amazonaws.com:5432");
        assert_eq!(t.credentials.base, BaseCredentials::DefaultChain);
        assert!(t.credentials.hops.is_empty());
        assert_eq!(c.worker_threads, 1);
    }

    #[test]
    fn worker_threads_are_read_and_zero_is_refused() {
        let text = format!("[proxy]\nworker_threads = 3\n{}", base(""));
        assert_eq!(Config::parse(&text, "t").unwrap().worker_threads, 3);
        let text = format!("[proxy]\nworker_threads = 0\n{}", base(""));
        let e = Config::parse(&text, "t").unwrap_err().0;
        assert!(
            e.contains("worker_threads = 0") && e.contains("give 1 or more"),
            "{e}"
        );
    }

    #[test]
    fn role_chain_orders_hops_before_role_arn() {
        let c = Config::parse(
            &base(
                "role_arn = \"arn:aws:iam::222222222222:role/b\"\nexternal_id = \"x1\"\n[[target.role_chain]]\nrole_arn = \"arn:aws:iam::111111111111:role/a\"\nexternal_id = \"ext\"\n",
            ),
            "t",
        )
        .unwrap();
        let hops = &c.targets[0].credentials.hops;
        assert_eq!(hops.len(), 2);
        assert_eq!(hops[0].role_arn, "arn:aws:iam::111111111111:role/a");
        assert_eq!(hops[1].external_id.as_deref(), Some("x1"));
        assert_eq!(hops[1].session_name, DEFAULT_SESSION_NAME);
    }

    fn refused(extra_or_full: &str, full: bool) -> String {
        let text = if full {
            extra_or_full.to_string()
        } else {
            base(extra_or_full)
        };
        Config::parse(&text, "t").unwrap_err().0
    }

    #[test]
    fn refusals_name_the_key_and_the_fix() {
        let cases: &[(&str, &str)] = &[
            ("colour = \"blue\"", "unknown field `colour`"),
            ("role_arn = \"arn:aws:iam::12:role/x\"", "`role_arn`"),
            ("role_arn = \"orders-role\"", "is not a role ARN"),
            (
                "session_duration = 10\nrole_arn = \"arn:aws:iam::222222222222:role/b\"",
                "`session_duration` = 10",
            ),
            ("access_key_id = \"AKIA\"", "without `secret_access_key`"),
            ("external_id = \"abc\"", "need `role_arn`"),
            ("connect_to = \"10.0.0.1\"", "`connect_to`"),
            ("engine2 = 1", "unknown field `engine2`"),
            ("connect_timeout = 0", "`connect_timeout` = 0"),
            (
                "role_arn = \"arn:aws:iam::222222222222:role/b\"\nsession_duration = 7200\n[[target.role_chain]]\nrole_arn = \"arn:aws:iam::111111111111:role/a\"",
                "role chaining",
            ),
        ];
        for (extra, want) in cases {
            let msg = refused(extra, false);
            assert!(msg.contains(want), "{extra:?}: {msg}");
        }
        let missing = refused("[[target]]\nname = \"x\"\nengine = \"postgres\"\n", true);
        assert!(missing.contains("missing field"), "{missing}");
        let no_region = base("").replace(".us-east-1.rds.amazonaws.com", ".example.com");
        assert!(refused(&no_region, true).contains("add region"));
        let bad_ca = base("").replace("ca.pem", "nope.pem");
        let m = refused(&bad_ca, true);
        assert!(
            m.contains("`ca_file`") && m.contains("cannot be read"),
            "{m}"
        );
    }

    #[test]
    fn remote_listen_needs_an_explicit_opt_in() {
        let open = base("").replace("127.0.0.1:6432", "0.0.0.0:6432");
        let m = Config::parse(&open, "t").unwrap_err().0;
        assert!(
            m.contains("not a loopback address") && m.contains("allow_remote"),
            "{m}"
        );
        let ok = format!("{open}allow_remote = true\n");
        assert!(Config::parse(&ok, "t").is_ok());
        let authenticated = format!("{open}client_password_env = \"ORDERS_PASS\"\n");
        assert!(Config::parse(&authenticated, "t").is_ok());
        let v6 = base("").replace("127.0.0.1:6432", "[::1]:6432");
        assert!(Config::parse(&v6, "t").is_ok());
    }

    #[test]
    fn role_arns_of_every_partition_and_path_are_accepted() {
        for arn in [
            "arn:aws:iam::222222222222:role/path/to/db-role",
            "arn:aws-cn:iam::222222222222:role/r",
            "arn:aws-us-gov:iam::222222222222:role/r",
            "arn:aws-iso-e:iam::222222222222:role/r",
        ] {
            let c = base(&format!(
                "role_arn = \"{arn}\"\nsession_name = \"a+b=c,d.e@f-g_h\""
            ));
            if let Err(e) = Config::parse(&c, "t") {
                panic!("{arn}: {e}");
            }
        }
    }

    #[test]
    fn two_targets_on_one_address_are_refused() {
        let one = base("");
        let two = format!("{one}\n{}", one.replace("\"orders\"", "\"billing\""));
        let m = Config::parse(&two, "t").unwrap_err().0;
        assert!(m.contains("both listen on 127.0.0.1:6432"), "{m}");
    }

    #[test]
    fn region_is_read_from_rds_names() {
        assert_eq!(
            region_from_host("db.cluster-ro-abc.eu-west-2.rds.amazonaws.com").as_deref(),
            Some("eu-west-2")
        );
        assert_eq!(region_from_host("localhost"), None);
    }

    #[test]
    fn debug_never_shows_static_secret() {
        let c = Config::parse(
            &base("access_key_id = \"AKIAEXAMPLE\"\nsecret_access_key = \"s3cr3t-value\"\nsession_token = \"tok-value\""),
            "t",
        )
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(dbg.contains("AKIAEXAMPLE"));
        assert!(
            !dbg.contains("s3cr3t-value") && !dbg.contains("tok-value"),
            "{dbg}"
        );
    }
}
