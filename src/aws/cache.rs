//! Token cache: one token per (identity, region, endpoint, user), reused until shortly before
//! it stops being accepted, and refreshed ahead of that in the background.
//!
//! RDS throttles *new* IAM logins per token, so tokens are shared by every connection. A cold
//! miss is single-flight: a burst of connections mints once. A connection never waits for
//! STS while a valid token exists; a failed refresh keeps the valid token and retries.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use zeroize::Zeroizing;

use super::credentials::{CredentialChain, CredentialsFailure};
use super::token;

/// A token is not handed out for its last minute: the server checks it after a dial and TLS.
const USE_MARGIN: Duration = Duration::from_secs(60);
/// Background refresh starts this long before a token stops being handed out...
const REFRESH_AHEAD: Duration = Duration::from_secs(5 * 60);
/// ...but never before this fraction of its usable life has passed (short credentials).
const MIN_LIFE_USED: u32 = 2; // 1/2
/// Retry delays after a failed background refresh.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// The refresher wakes at least this often, so a suspended host or a throttled CPU
/// (monotonic clocks stop, wall clocks do not) cannot leave a stale token in place.
const MAX_SLEEP: Duration = Duration::from_secs(15);

/// Wall clock, injectable for tests.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Where a token's credentials come from.
pub trait CredentialSource: Send + Sync + 'static {
    fn credentials(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<Credentials, CredentialsFailure>> + Send + '_>>;
    fn identity(&self) -> String;
}

impl CredentialSource for CredentialChain {
    fn credentials(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<Credentials, CredentialsFailure>> + Send + '_>> {
        Box::pin(CredentialChain::credentials(self))
    }
    fn identity(&self) -> String {
        CredentialChain::identity(self).to_string()
    }
}

/// What a token is for. Keyed by the whole credential spec (base source, every hop with its
/// external id, STS region), so two targets share a token only if they would sign alike.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct TokenKey {
    pub credentials: crate::config::CredentialSpec,
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
    /// After this, the token is no longer handed out.
    pub fn usable_until(&self) -> SystemTime {
        self.expires_at
            .checked_sub(USE_MARGIN)
            .unwrap_or(self.signed_at)
            .max(self.signed_at)
    }
    fn usable(&self, now: SystemTime) -> bool {
        now < self.usable_until()
    }
    /// When the background refresh replaces it.
    pub fn refresh_at(&self) -> SystemTime {
        let until = self.usable_until();
        let life = until.duration_since(self.signed_at).unwrap_or_default();
        let ahead = until.checked_sub(REFRESH_AHEAD).unwrap_or(self.signed_at);
        ahead.max(self.signed_at + life / MIN_LIFE_USED)
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
pub struct TokenCache {
    entries: Mutex<HashMap<TokenKey, Arc<TokenEntry>>>,
    clock: Clock,
}

impl TokenCache {
    pub fn new() -> Arc<TokenCache> {
        Self::with_clock(Arc::new(SystemTime::now))
    }

    pub fn with_clock(clock: Clock) -> Arc<TokenCache> {
        Arc::new(TokenCache {
            entries: Mutex::new(HashMap::new()),
            clock,
        })
    }

    /// The entry for `key`, created (with its background refresher) on first use.
    pub fn entry(&self, key: TokenKey, source: Arc<dyn CredentialSource>) -> Arc<TokenEntry> {
        let mut entries = self.entries.lock().unwrap();
        entries
            .entry(key.clone())
            .or_insert_with(|| {
                let e = Arc::new(TokenEntry {
                    key,
                    source,
                    clock: self.clock.clone(),
                    current: RwLock::new(None),
                    minting: tokio::sync::Mutex::new(()),
                    attempts: std::sync::atomic::AtomicU64::new(0),
                    last_error: Mutex::new(None),
                    targets: Mutex::new(Vec::new()),
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
    source: Arc<dyn CredentialSource>,
    clock: Clock,
    current: RwLock<Option<Arc<Token>>>,
    minting: tokio::sync::Mutex<()>,
    /// Mint attempts so far: a waiter that queued behind a failed attempt gets its error
    /// instead of asking STS once more (no retry storm when STS is down).
    attempts: std::sync::atomic::AtomicU64,
    last_error: Mutex<Option<TokenError>>,
    /// Targets served by this token, for per-target metrics.
    targets: Mutex<Vec<String>>,
}

impl TokenEntry {
    pub fn key(&self) -> &TokenKey {
        &self.key
    }

    /// Note that `target` uses this token (its metrics follow the token's).
    pub fn add_target(&self, target: &str) {
        let mut t = self.targets.lock().unwrap();
        if !t.iter().any(|n| n == target) {
            t.push(target.to_string());
        }
        if let Some(tok) = self.current.read().unwrap().as_ref() {
            Self::record(target, tok, false);
        }
    }

    fn record(target: &str, token: &Token, minted: bool) {
        let m = crate::metrics::metrics();
        let labels = crate::metrics::TokenLabels {
            target: target.to_string(),
        };
        if minted {
            m.tokens_minted.get_or_create(&labels).inc();
        }
        m.token_expiry
            .get_or_create(&labels)
            .set(crate::metrics::unix_seconds(token.usable_until()));
    }

    /// The current token if it may still be used.
    pub fn cached(&self) -> Option<Arc<Token>> {
        let now = (self.clock)();
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
        let seen = self.attempts.load(Ordering::SeqCst);
        let _single_flight = self.minting.lock().await;
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        if self.attempts.load(Ordering::SeqCst) != seen {
            if let Some(e) = self.last_error() {
                return Err(e);
            }
        }
        self.mint().await
    }

    /// Replace the token if its refresh time has come. `None` when nothing was due.
    pub async fn refresh_if_due(&self) -> Option<Result<Arc<Token>, TokenError>> {
        if (self.clock)() < self.due() {
            return None;
        }
        let _single_flight = self.minting.lock().await;
        if (self.clock)() < self.due() {
            return None;
        }
        Some(self.mint().await)
    }

    /// The last refresh error, if the last attempt failed.
    pub fn last_error(&self) -> Option<TokenError> {
        self.last_error.lock().unwrap().clone()
    }

    /// Mint a new token and store it. Callers hold `minting`.
    async fn mint(&self) -> Result<Arc<Token>, TokenError> {
        let result = self.mint_inner().await;
        self.attempts.fetch_add(1, Ordering::SeqCst);
        match &result {
            Ok(t) => {
                *self.current.write().unwrap() = Some(t.clone());
                *self.last_error.lock().unwrap() = None;
                for target in self.targets.lock().unwrap().iter() {
                    Self::record(target, t, true);
                }
                tracing::info!(
                    identity = %self.source.identity(),
                    endpoint = %format!("{}:{}", self.key.host, self.key.port),
                    user = %self.key.user,
                    region = %self.key.region,
                    expires = %crate::util::rfc3339(t.expires_at),
                    "token minted"
                );
            }
            Err(e) => {
                *self.last_error.lock().unwrap() = Some(e.clone());
                tracing::warn!(identity = %self.source.identity(), error = %e, "token refresh failed");
            }
        }
        result
    }

    async fn mint_inner(&self) -> Result<Arc<Token>, TokenError> {
        let creds = self.source.credentials().await?;
        let now = (self.clock)();
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

    /// When the background refresher should act next, by the wall clock.
    fn due(&self) -> SystemTime {
        match self.current.read().unwrap().as_ref() {
            Some(t) => t.refresh_at(),
            // A cold entry is minted by its first user (or the warm-up at start).
            None => SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 4),
        }
    }
}

/// The wait before the next retry, with +-20 % jitter so many proxies hit by one STS
/// outage do not retry in step; doubles up to RETRY_MAX.
pub fn next_backoff(backoff: &mut Duration) -> Duration {
    let jitter = 0.8 + rand::random::<f64>() * 0.4;
    let wait = backoff.mul_f64(jitter);
    *backoff = (*backoff * 2).min(RETRY_MAX);
    wait
}

/// Keeps one entry's token fresh until the entry is dropped.
async fn refresher(entry: std::sync::Weak<TokenEntry>) {
    let mut backoff = RETRY_MIN;
    loop {
        let wait = {
            let Some(e) = entry.upgrade() else { return };
            let before = e.current.read().unwrap().as_ref().map(|t| t.expires_at);
            let outcome = e.refresh_if_due().await;
            // A refresh that did not push the expiry out (credentials that could not be
            // renewed and are running out) is a failure too: back off, do not spin.
            let stalled =
                matches!(&outcome, Some(Ok(t)) if before.is_some_and(|b| t.expires_at <= b));
            match outcome {
                _ if stalled => next_backoff(&mut backoff),
                Some(Err(_)) => next_backoff(&mut backoff),
                Some(Ok(_)) | None => {
                    backoff = RETRY_MIN;
                    e.due()
                        .duration_since((e.clock)())
                        .unwrap_or(Duration::ZERO)
                        .clamp(Duration::from_millis(100), MAX_SLEEP)
                }
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

    /// A fake clock the test moves by hand.
    #[derive(Clone)]
    struct FakeClock(Arc<AtomicU64>);
    impl FakeClock {
        fn new() -> Self {
            FakeClock(Arc::new(AtomicU64::new(1_800_000_000)))
        }
        fn now(&self) -> SystemTime {
            SystemTime::UNIX_EPOCH + Duration::from_secs(self.0.load(Ordering::SeqCst))
        }
        fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_secs(), Ordering::SeqCst);
        }
        fn clock(&self) -> Clock {
            let c = self.clone();
            Arc::new(move || c.now())
        }
    }

    /// Counts calls; credentials last `life` from the fake now; can be made to fail.
    struct Source {
        clock: FakeClock,
        life: Option<Duration>,
        calls: AtomicUsize,
        failing: AtomicBool,
    }
    impl CredentialSource for Source {
        fn credentials(
            &self,
        ) -> Pin<Box<dyn Future<Output = Result<Credentials, CredentialsFailure>> + Send + '_>>
        {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                // Let concurrent callers pile up behind the single flight.
                tokio::task::yield_now().await;
                if self.failing.load(Ordering::SeqCst) {
                    return Err(CredentialsFailure(
                        "STS refused AssumeRole: Throttling".into(),
                    ));
                }
                let exp = self.life.map(|l| self.clock.now() + l);
                Ok(Credentials::new(
                    "ASIATEST",
                    "secret",
                    Some("session".into()),
                    exp,
                    "test",
                ))
            })
        }
        fn identity(&self) -> String {
            "test".into()
        }
    }

    fn setup(life: Option<Duration>) -> (FakeClock, Arc<Source>, Arc<TokenEntry>) {
        let clock = FakeClock::new();
        let source = Arc::new(Source {
            clock: clock.clone(),
            life,
            calls: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
        });
        let cache = TokenCache::with_clock(clock.clock());
        let key = TokenKey {
            credentials: crate::config::CredentialSpec {
                base: crate::config::BaseCredentials::DefaultChain,
                hops: vec![],
                sts_region: "us-east-1".into(),
            },
            region: "us-east-1".into(),
            host: "db.x.us-east-1.rds.amazonaws.com".into(),
            port: 5432,
            user: "bytebase".into(),
        };
        let entry = cache.entry(key, source.clone());
        (clock, source, entry)
    }

    const MIN: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn a_cold_burst_mints_once() {
        let (_, source, entry) = setup(None);
        let gets: Vec<_> = (0..50)
            .map(|_| {
                let e = entry.clone();
                tokio::spawn(async move { e.token().await.unwrap().value().to_string() })
            })
            .collect();
        let mut values = std::collections::HashSet::new();
        for g in gets {
            values.insert(g.await.unwrap());
        }
        assert_eq!(values.len(), 1);
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_token_lives_until_min_of_15_minutes_and_credential_expiry() {
        let (clock, _, entry) = setup(Some(10 * MIN));
        let t = entry.token().await.unwrap();
        assert_eq!(t.expires_at, clock.now() + 10 * MIN);
        let (clock, _, entry) = setup(Some(60 * MIN));
        let t = entry.token().await.unwrap();
        assert_eq!(t.expires_at, clock.now() + 15 * MIN);
        assert!(t.value().contains("X-Amz-Security-Token=session"));
        assert!(
            !format!("{t:?}").contains("X-Amz"),
            "Debug must not show the token"
        );
    }

    #[tokio::test]
    async fn refresh_happens_ahead_while_the_old_token_is_served() {
        let (clock, source, entry) = setup(None);
        let first = entry.token().await.unwrap();
        // Nothing is due at first; users get the cached token without any STS call.
        assert!(entry.refresh_if_due().await.is_none());
        clock.advance(8 * MIN);
        assert_eq!(entry.token().await.unwrap().value(), first.value());
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        // 15 min - 1 min margin - 5 min ahead = 9 min: the refresher replaces it then.
        clock.advance(MIN);
        let second = entry.refresh_if_due().await.expect("due").unwrap();
        assert_ne!(second.value(), first.value());
        assert_eq!(entry.token().await.unwrap().value(), second.value());
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_valid_token_then_reports_the_cause() {
        let (clock, source, entry) = setup(None);
        let first = entry.token().await.unwrap();
        source.failing.store(true, Ordering::SeqCst);
        clock.advance(10 * MIN);
        assert!(entry.refresh_if_due().await.unwrap().is_err());
        // Still valid: served without waiting for STS.
        let calls = source.calls.load(Ordering::SeqCst);
        assert_eq!(entry.token().await.unwrap().value(), first.value());
        assert_eq!(source.calls.load(Ordering::SeqCst), calls);
        assert!(entry.last_error().is_some());
        // Past its usable life, users get the STS error, not a dead token.
        clock.advance(4 * MIN);
        let err = entry.token().await.unwrap_err();
        assert!(err.to_string().contains("Throttling"), "{err}");
        // And it recovers by itself when STS does.
        source.failing.store(false, Ordering::SeqCst);
        assert!(entry.token().await.is_ok());
        assert!(entry.last_error().is_none());
    }

    #[tokio::test]
    async fn waiters_behind_a_failed_mint_share_its_error() {
        let (_, source, entry) = setup(None);
        source.failing.store(true, Ordering::SeqCst);
        let gets: Vec<_> = (0..20)
            .map(|_| {
                let e = entry.clone();
                tokio::spawn(async move { e.token().await.is_err() })
            })
            .collect();
        for g in gets {
            assert!(g.await.unwrap());
        }
        assert_eq!(
            source.calls.load(Ordering::SeqCst),
            1,
            "one STS attempt for the burst"
        );
        // A later caller tries again.
        source.failing.store(false, Ordering::SeqCst);
        assert!(entry.token().await.is_ok());
    }

    #[tokio::test]
    async fn short_credentials_do_not_cause_a_refresh_storm() {
        let (clock, source, entry) = setup(Some(3 * MIN));
        entry.token().await.unwrap();
        // Usable 2 min; refreshed after half of that, not at once.
        assert!(entry.refresh_if_due().await.is_none());
        clock.advance(MIN);
        assert!(entry.refresh_if_due().await.is_some());
        assert!(entry.refresh_if_due().await.is_none());
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }
}
