//! Token cache: one token per (identity, region, endpoint, user), reused until shortly before
//! it stops being accepted, and refreshed ahead of that in the background.
//!
//! RDS throttles *new* IAM logins per token, so tokens are shared by every connection. A cold
//! miss is single-flight: a burst of connections mints once. A connection never waits for
//! STS while a valid token exists; a failed refresh keeps the valid token and retries.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use zeroize::Zeroizing;

use super::credentials::{CredentialChain, CredentialsFailure};
use super::token;

/// A token is not handed out for its last minute: the server checks it after a dial and TLS.
const USE_MARGIN: Duration = Duration::from_secs(60);
/// Background refresh starts this long before a token stops being handed out.
const REFRESH_AHEAD: Duration = Duration::from_secs(5 * 60);
/// Retry delays after a failed background refresh.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// The refresher wakes at least this often, so a suspended host or a throttled CPU
/// (monotonic clocks stop, wall clocks do not) cannot leave a stale token in place.
const MAX_SLEEP: Duration = Duration::from_secs(15);

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct TokenKey {
    pub identity: String,
    pub region: String,
    pub host: String,
    pub port: u16,
    pub user: String,
}

/// A minted token. `Debug` never shows the value; the value is zeroed on drop.
pub struct Token {
    value: Zeroizing<String>,
    pub signed_at: SystemTime,
    /// min(signed + 15 min, credential expiry).
    pub expires_at: SystemTime,
}

impl Token {
    pub fn value(&self) -> &str {
        &self.value
    }
    fn usable_until(&self) -> SystemTime {
        self.expires_at - USE_MARGIN
    }
    fn usable(&self, now: SystemTime) -> bool {
        now < self.usable_until()
    }
    fn refresh_at(&self) -> SystemTime {
        (self.usable_until() - REFRESH_AHEAD).max(self.signed_at)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Token(<redacted>, expires {})",
            crate::util::rfc3339(self.expires_at)
        )
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Credentials(#[from] CredentialsFailure),
    #[error("{0}")]
    Sign(String),
}

/// All tokens of the process.
#[derive(Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<TokenKey, Arc<TokenEntry>>>,
}

impl TokenCache {
    pub fn new() -> Arc<TokenCache> {
        Arc::new(TokenCache::default())
    }

    /// The entry for `key`, created (with its background refresher) on first use.
    pub fn entry(&self, key: TokenKey, chain: CredentialChain) -> Arc<TokenEntry> {
        let mut entries = self.entries.lock().unwrap();
        entries
            .entry(key.clone())
            .or_insert_with(|| {
                let e = Arc::new(TokenEntry {
                    key,
                    chain,
                    current: RwLock::new(None),
                    minting: tokio::sync::Mutex::new(()),
                    last_error: Mutex::new(None),
                });
                tokio::spawn(refresher(Arc::downgrade(&e)));
                e
            })
            .clone()
    }
}

/// The token of one key.
pub struct TokenEntry {
    key: TokenKey,
    chain: CredentialChain,
    current: RwLock<Option<Arc<Token>>>,
    minting: tokio::sync::Mutex<()>,
    last_error: Mutex<Option<TokenError>>,
}

impl TokenEntry {
    pub fn key(&self) -> &TokenKey {
        &self.key
    }

    /// The current token if it may still be used.
    pub fn cached(&self) -> Option<Arc<Token>> {
        let now = SystemTime::now();
        self.current
            .read()
            .unwrap()
            .as_ref()
            .filter(|t| t.usable(now))
            .cloned()
    }

    /// A usable token: the cached one, or one minted now (once, however many wait).
    pub async fn token(&self) -> Result<Arc<Token>, TokenError> {
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let _single_flight = self.minting.lock().await;
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        self.mint().await
    }

    /// Mint a new token and store it. Callers hold `minting`.
    async fn mint(&self) -> Result<Arc<Token>, TokenError> {
        let result = self.mint_inner().await;
        match &result {
            Ok(t) => {
                *self.current.write().unwrap() = Some(t.clone());
                *self.last_error.lock().unwrap() = None;
                tracing::info!(
                    identity = %self.key.identity,
                    endpoint = %format!("{}:{}", self.key.host, self.key.port),
                    user = %self.key.user,
                    region = %self.key.region,
                    expires = %crate::util::rfc3339(t.expires_at),
                    "token minted"
                );
            }
            Err(e) => {
                *self.last_error.lock().unwrap() = Some(e.clone());
                tracing::warn!(identity = %self.key.identity, error = %e, "token refresh failed");
            }
        }
        result
    }

    async fn mint_inner(&self) -> Result<Arc<Token>, TokenError> {
        let creds = self.chain.credentials().await?;
        let now = SystemTime::now();
        let value = token::generate(
            &creds,
            &self.key.host,
            self.key.port,
            &self.key.user,
            &self.key.region,
            now,
        )
        .map_err(|e| TokenError::Sign(e.to_string()))?;
        let mut expires_at = now + token::TOKEN_LIFETIME;
        if let Some(exp) = creds.expiry() {
            expires_at = expires_at.min(exp);
        }
        Ok(Arc::new(Token {
            value: Zeroizing::new(value),
            signed_at: now,
            expires_at,
        }))
    }

    /// The last refresh error, if the last attempt failed.
    pub fn last_error(&self) -> Option<TokenError> {
        self.last_error.lock().unwrap().clone()
    }

    /// When the background refresher should act next, by the wall clock.
    fn due(&self) -> SystemTime {
        match self.current.read().unwrap().as_ref() {
            Some(t) => t.refresh_at(),
            // A cold entry is minted by its first user (or the warm-up at start).
            None => SystemTime::now() + MAX_SLEEP,
        }
    }
}

/// Keeps one entry's token fresh until the entry is dropped.
async fn refresher(entry: std::sync::Weak<TokenEntry>) {
    let mut backoff = RETRY_MIN;
    loop {
        let wait = {
            let Some(e) = entry.upgrade() else { return };
            let due = e.due();
            if SystemTime::now() >= due {
                let _single_flight = e.minting.lock().await;
                if SystemTime::now() >= e.due() {
                    match e.mint().await {
                        Ok(_) => backoff = RETRY_MIN,
                        Err(_) => {
                            let wait = backoff;
                            backoff = (backoff * 2).min(RETRY_MAX);
                            drop(_single_flight);
                            drop(e);
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                    }
                }
                continue;
            }
            due.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .clamp(Duration::from_millis(100), MAX_SLEEP)
        };
        tokio::time::sleep(wait).await;
    }
}
