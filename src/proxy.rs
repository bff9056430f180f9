//! Listeners and per-target state: one accept loop per target, one task per connection.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::net::TcpListener;

use crate::aws::{CredentialChain, TokenCache, TokenEntry, TokenKey};
use crate::config::{Config, CredentialSpec, Engine, Target};
use crate::postgres;

/// A client must finish its side of the handshake within this (PostgreSQL's
/// authentication_timeout is one minute too).
pub const CLIENT_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Beyond connect_timeout, what a login (token, TLS, server's auth) may take in all.
const LOGIN_BUDGET: std::time::Duration = std::time::Duration::from_secs(30);

/// Run `fut` for at most `limit`; past it, fail with `what` (so nothing hangs forever).
pub async fn within<T>(
    limit: std::time::Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, crate::failure::Failure>>,
) -> Result<T, crate::failure::Failure> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(crate::failure::Failure::Timeout(format!(
            "{what} within {} s",
            limit.as_secs()
        ))),
    }
}

/// Everything a connection to one target needs, built once at start.
pub struct TargetRuntime {
    pub cfg: Target,
    pub tls: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    pub tokens: Arc<TokenEntry>,
}

impl TargetRuntime {
    /// The bound on one upstream login, from dial to ready.
    pub fn login_timeout(&self) -> std::time::Duration {
        self.cfg.connect_timeout + LOGIN_BUDGET
    }
}

pub struct Proxy {
    pub targets: Vec<Arc<TargetRuntime>>,
    cancels: Arc<postgres::cancel::CancelRegistry>,
}

impl Proxy {
    /// Build TLS configs, credential chains (shared by identical specs) and token entries.
    pub async fn build(config: &Config) -> Result<Proxy, String> {
        let cache = TokenCache::new();
        let mut chains: HashMap<CredentialSpec, CredentialChain> = HashMap::new();
        let mut targets = Vec::new();
        for t in &config.targets {
            let tls = crate::tls::client_config(&t.ca_file, t.tls_mode)
                .map_err(|e| format!("target \"{}\": {e}", t.name))?;
            let server_name = crate::tls::server_name(&t.host)
                .map_err(|e| format!("target \"{}\": {e}", t.name))?;
            let chain = match chains.get(&t.credentials) {
                Some(c) => c.clone(),
                None => {
                    let c = CredentialChain::build(&t.credentials).await;
                    chains.insert(t.credentials.clone(), c.clone());
                    c
                }
            };
            let key = TokenKey {
                credentials: t.credentials.clone(),
                region: t.region.clone(),
                host: t.host.clone(),
                port: t.port,
                user: t.db_user.clone(),
            };
            let tokens = cache.entry(key, Arc::new(chain));
            targets.push(Arc::new(TargetRuntime {
                cfg: t.clone(),
                tls,
                server_name,
                tokens,
            }));
        }
        Ok(Proxy {
            targets,
            cancels: postgres::cancel::CancelRegistry::new(),
        })
    }

    /// Bind every listener; fails if any address cannot be bound.
    pub async fn bind(&self) -> Result<Vec<(Arc<TargetRuntime>, TcpListener)>, String> {
        let mut out = Vec::new();
        for t in &self.targets {
            let l = TcpListener::bind(t.cfg.listen).await.map_err(|e| {
                format!(
                    "target \"{}\": cannot listen on {}: {e}; pick a free address for `listen`",
                    t.cfg.name, t.cfg.listen
                )
            })?;
            out.push((t.clone(), l));
        }
        Ok(out)
    }

    /// Mint every target's first token now, so the first client does not wait for STS.
    pub fn warm_up(&self) {
        for t in &self.targets {
            let t = t.clone();
            tokio::spawn(async move {
                if let Err(e) = t.tokens.token().await {
                    tracing::error!(target = %t.cfg.name, error = %e, "cannot mint the first token; clients will get this error until it recovers");
                }
            });
        }
    }

    /// Accept connections until the process is told to stop.
    pub async fn serve(&self, listeners: Vec<(Arc<TargetRuntime>, TcpListener)>) {
        let mut tasks = tokio::task::JoinSet::new();
        for (target, listener) in listeners {
            tracing::info!(target = %target.cfg.name, engine = target.cfg.engine.as_str(), listen = %target.cfg.listen, upstream = %target.cfg.dial, endpoint = %format!("{}:{}", target.cfg.host, target.cfg.port), "listening");
            let cancels = self.cancels.clone();
            tasks.spawn(accept_loop(target, listener, cancels));
        }
        while tasks.join_next().await.is_some() {}
    }
}

async fn accept_loop(
    target: Arc<TargetRuntime>,
    listener: TcpListener,
    cancels: Arc<postgres::cancel::CancelRegistry>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                crate::upstream::tune(&stream);
                let target = target.clone();
                let cancels = cancels.clone();
                match target.cfg.engine {
                    Engine::Postgres => {
                        tokio::spawn(postgres::serve(stream, peer, target, cancels));
                    }
                    Engine::Mysql => {
                        tokio::spawn(crate::mysql::serve(stream, peer, target));
                    }
                }
            }
            Err(e) => {
                // EMFILE and friends: keep serving the others once resources free up.
                tracing::warn!(target = %target.cfg.name, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// The one log line of a finished connection, for both engines.
pub fn log_closed(
    cfg: &Target,
    peer: std::net::SocketAddr,
    user: &str,
    database: &str,
    started: std::time::Instant,
    outcome: &Result<(crate::relay::Relayed, Option<String>), crate::failure::Failure>,
) {
    let duration_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok((relayed, error)) => tracing::info!(
            target = %cfg.name, engine = cfg.engine.as_str(), client = %peer, user = %user,
            database = %database, duration_ms, bytes_from_client = relayed.client_to_server,
            bytes_to_client = relayed.server_to_client, result = "ok", error = error.as_deref(),
            "connection closed"
        ),
        Err(f) => tracing::warn!(
            target = %cfg.name, engine = cfg.engine.as_str(), client = %peer, user = %user,
            database = %database, duration_ms, result = f.kind(), error = %f,
            "connection closed"
        ),
    }
}
