//! Listeners and per-target state. One accept loop per listen address; each connection is a
//! task. The configuration can be applied again (SIGHUP): listeners are kept, added or
//! stopped by address, targets swapped, while open sessions keep running on what they had.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::ServerName;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::aws::{CredentialChain, TokenCache, TokenEntry, TokenKey};
use crate::config::{Config, CredentialSpec, Engine, ListenAddr, Target};
use crate::failure::Failure;
use crate::listener::Listener;
use crate::metrics::{metrics, TargetLabels};
use crate::postgres;

/// Beyond connect_timeout, what a login (token, TLS, server's auth) may take in all.
const LOGIN_BUDGET: Duration = Duration::from_secs(30);

/// Run an upstream step for at most `limit`; past it, fail with `what` (nothing hangs).
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    bounded(limit, fut, || {
        Failure::Timeout(format!("{what} within {} s", limit.as_secs()))
    })
    .await
}

/// The client's side of the handshake, bounded by `[proxy] handshake_timeout`.
pub async fn client_within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    bounded(limit, fut, || {
        Failure::ClientTimeout(format!("{what} within {} s", limit.as_secs()))
    })
    .await
}

async fn bounded<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, Failure>>,
    late: impl FnOnce() -> Failure,
) -> Result<T, Failure> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| Err(late()))
}

/// Everything a connection to one target needs, built once per configuration.
pub struct TargetRuntime {
    pub cfg: Target,
    pub tls: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    pub tokens: Arc<TokenEntry>,
    /// Open connections of this target (the metric's gauge, kept across reloads).
    pub active: Gauge,
    /// TLS toward clients, when configured.
    pub client_tls: Option<tokio_rustls::TlsAcceptor>,
    /// The secret clients must prove, when configured.
    pub client_secret: Option<Arc<crate::client_auth::ClientSecret>>,
}

impl TargetRuntime {
    /// The bound on one upstream login, from dial to ready.
    pub fn login_timeout(&self) -> Duration {
        self.cfg.connect_timeout + LOGIN_BUDGET
    }

    /// `Some(max)` when this connection (already counted) is one too many.
    pub fn over_limit(&self) -> Option<usize> {
        let max = self.cfg.max_connections?;
        (self.active.get() > max as i64).then_some(max)
    }

    /// Why this target cannot take a new client right now, if it cannot.
    pub fn not_ready(&self) -> Option<String> {
        if self.tokens.cached().is_none() {
            let why = self
                .tokens
                .last_error()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "not minted yet".into());
            return Some(format!("target {}: no valid token: {why}", self.cfg.name));
        }
        if let Some(max) = self.cfg.max_connections {
            if self.active.get() >= max as i64 {
                return Some(format!(
                    "target {}: at its connection cap ({max})",
                    self.cfg.name
                ));
            }
        }
        None
    }
}

struct Listening {
    target: watch::Sender<Arc<TargetRuntime>>,
    task: tokio::task::JoinHandle<()>,
}

/// The running proxy.
pub struct Proxy {
    cache: Arc<TokenCache>,
    chains: Mutex<HashMap<CredentialSpec, CredentialChain>>,
    cancels: Arc<postgres::cancel::CancelRegistry>,
    targets: RwLock<Vec<Arc<TargetRuntime>>>,
    listeners: tokio::sync::Mutex<HashMap<ListenAddr, Listening>>,
    sessions: TaskTracker,
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy {
            cache: TokenCache::new(),
            chains: Mutex::new(HashMap::new()),
            cancels: postgres::cancel::CancelRegistry::new(),
            targets: RwLock::new(Vec::new()),
            listeners: tokio::sync::Mutex::new(HashMap::new()),
            sessions: TaskTracker::new(),
        }
    }
}

impl Proxy {
    pub fn new() -> Arc<Proxy> {
        Arc::new(Proxy::default())
    }

    /// Build the runtime of every target: TLS configs, credential chains (shared by
    /// identical specs, and kept across reloads) and token entries. Nothing is fetched.
    pub async fn runtimes(&self, config: &Config) -> Result<Vec<Arc<TargetRuntime>>, String> {
        let mut out = Vec::new();
        for t in &config.targets {
            let tls = crate::tls::client_config(&t.ca_file, t.tls_mode)
                .map_err(|e| format!("target \"{}\": {e}", t.name))?;
            let server_name = crate::tls::server_name(&t.host)
                .map_err(|e| format!("target \"{}\": {e}", t.name))?;
            let known = self.chains.lock().unwrap().get(&t.credentials).cloned();
            let chain = match known {
                Some(c) => c,
                None => {
                    let c = CredentialChain::build(&t.credentials).await;
                    self.chains
                        .lock()
                        .unwrap()
                        .insert(t.credentials.clone(), c.clone());
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
            let tokens = self.cache.entry(key, Arc::new(chain));
            tokens.add_target(&t.name);
            let client_tls = match &t.client_tls {
                Some((cert, key)) => Some(tokio_rustls::TlsAcceptor::from(
                    crate::tls::server_config(cert, key)
                        .map_err(|e| format!("target \"{}\": {e}", t.name))?,
                )),
                None => None,
            };
            let client_secret = match &t.client_password {
                Some(source) => {
                    let (file, env) = match source {
                        crate::config::SecretSource::File(f) => (Some(f.as_path()), None),
                        crate::config::SecretSource::Env(v) => (None, Some(v.as_str())),
                    };
                    Some(
                        crate::client_auth::ClientSecret::load(file, env)
                            .map_err(|e| format!("target \"{}\": {e}", t.name))?,
                    )
                }
                None => None,
            };
            let active = metrics().active.get_or_create_owned(&TargetLabels {
                target: t.name.clone(),
                engine: t.engine.as_str().to_string(),
            });
            out.push(Arc::new(TargetRuntime {
                cfg: t.clone(),
                tls,
                server_name,
                tokens,
                active,
                client_tls,
                client_secret,
            }));
        }
        Ok(out)
    }

    /// Serve `config`: the first time, or again on reload. Listeners at addresses still in
    /// use are kept (their target swapped), new ones bound first, old ones stopped last; if
    /// anything fails, nothing changes.
    pub async fn apply(self: &Arc<Self>, config: &Config) -> Result<(), String> {
        let runtimes = self.runtimes(config).await?;
        let mut listeners = self.listeners.lock().await;
        let mut fresh = Vec::new();
        for t in &runtimes {
            if !listeners.contains_key(&t.cfg.listen) {
                let l = Listener::bind(&t.cfg.listen, t.cfg.socket_mode)
                    .await
                    .map_err(|e| {
                        format!(
                        "target \"{}\": cannot listen on {}: {e}; pick a free address for `listen`",
                        t.cfg.name, t.cfg.listen
                    )
                    })?;
                fresh.push((t.clone(), l));
            }
        }
        let wanted: HashMap<ListenAddr, Arc<TargetRuntime>> = runtimes
            .iter()
            .map(|t| (t.cfg.listen.clone(), t.clone()))
            .collect();
        let gone: Vec<ListenAddr> = listeners
            .keys()
            .filter(|addr| !wanted.contains_key(*addr))
            .cloned()
            .collect();
        for addr in gone {
            if let Some(l) = listeners.remove(&addr) {
                tracing::info!(listen = %addr, "target removed: no longer listening");
                l.task.abort();
                let _ = l.task.await;
            }
        }
        for (addr, l) in listeners.iter() {
            if let Some(t) = wanted.get(addr) {
                l.target.send_replace(t.clone());
            }
        }
        for (t, l) in fresh {
            tracing::info!(target = %t.cfg.name, engine = t.cfg.engine.as_str(), listen = %t.cfg.listen, upstream = %t.cfg.dial, endpoint = %format!("{}:{}", t.cfg.host, t.cfg.port), "listening");
            let (tx, rx) = watch::channel(t.clone());
            let task = tokio::spawn(accept_loop(self.clone(), rx, l));
            listeners.insert(t.cfg.listen.clone(), Listening { target: tx, task });
        }
        *self.targets.write().unwrap() = runtimes;
        Ok(())
    }

    pub fn targets(&self) -> Vec<Arc<TargetRuntime>> {
        self.targets.read().unwrap().clone()
    }

    /// Mint every target's first token, retrying until each has one. The targets are read
    /// again on every round, so a reload that fixes or removes a bad target ends the wait.
    pub async fn warm_up(&self) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let pending: Vec<_> = self
                .targets()
                .into_iter()
                .filter(|t| t.tokens.cached().is_none())
                .collect();
            if pending.is_empty() {
                return;
            }
            let mut tries = tokio::task::JoinSet::new();
            for t in pending {
                tries.spawn(async move {
                    if let Err(e) = t.tokens.token().await {
                        tracing::error!(target = %t.cfg.name, error = %e, "cannot mint the first token; retrying");
                    }
                });
            }
            while tries.join_next().await.is_some() {}
            if self.targets().iter().all(|t| t.tokens.cached().is_some()) {
                return;
            }
            tokio::time::sleep(crate::aws::cache::next_backoff(&mut backoff)).await;
        }
    }

    /// One line per target that cannot take a new client now (empty: ready).
    pub fn not_ready(&self) -> Vec<String> {
        self.targets()
            .iter()
            .filter_map(|t| t.not_ready())
            .collect()
    }

    /// Stop accepting everywhere; open sessions go on.
    pub async fn stop_accepting(&self) {
        let stopped: Vec<_> = self.listeners.lock().await.drain().collect();
        for (_, l) in stopped {
            l.task.abort();
            // Wait until the listener is dropped: the port closes, a socket file goes.
            let _ = l.task.await;
        }
        self.sessions.close();
    }

    /// Open client sessions.
    pub fn open_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Wait until every session has ended, or `grace` has passed. True if all ended.
    pub async fn drain(&self, grace: Duration) -> bool {
        tokio::time::timeout(grace, self.sessions.wait())
            .await
            .is_ok()
    }
}

async fn accept_loop(
    proxy: Arc<Proxy>,
    target: watch::Receiver<Arc<TargetRuntime>>,
    listener: Listener,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let target = target.borrow().clone();
                match target.cfg.engine {
                    Engine::Postgres => {
                        let cancels = proxy.cancels.clone();
                        proxy
                            .sessions
                            .spawn(postgres::serve(stream, peer, target, cancels));
                    }
                    Engine::Mysql => {
                        proxy
                            .sessions
                            .spawn(crate::mysql::serve(stream, peer, target));
                    }
                }
            }
            Err(e) => {
                // EMFILE and friends: keep serving the others once resources free up.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
