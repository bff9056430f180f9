//! AWS credentials: a base source (default chain, profile or static keys), then an optional
//! chain of AssumeRole hops, each hop cached and refreshed ahead of its expiry.
//!
//! aws-config's providers do not cache when called directly, so every hop is wrapped in
//! [`CachedCredentials`]: one STS call per hop per refresh, however many callers wait.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use aws_config::sts::AssumeRoleProvider;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::provider::{
    error::CredentialsError, future, ProvideCredentials, SharedCredentialsProvider,
};
use aws_credential_types::Credentials;
use aws_sdk_sts::error::ProvideErrorMetadata;
use aws_types::region::Region;

use crate::config::{BaseCredentials, CredentialSpec};

/// Refresh credentials this long before they expire (see `refresh_at`).
const REFRESH_AHEAD: Duration = Duration::from_secs(10 * 60);
/// Credentials from a source that may rotate them (a rewritten credentials file, a
/// process) but that carry no expiry are fetched again after this, as the SDK's cache does.
const NO_EXPIRY_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// Bound on one fetch, whatever the source (a credential_process may hang).
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Why credentials could not be had, worded for the user (it quotes STS when STS refused).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CredentialsFailure(pub String);

/// The credential chain of one identity: base source, then hops. Cheap to clone.
#[derive(Clone)]
pub struct CredentialChain {
    identity: String,
    top: Arc<CachedCredentials>,
}

impl fmt::Debug for CredentialChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CredentialChain({})", self.identity)
    }
}

impl CredentialChain {
    /// Build the providers; nothing is fetched until [`CredentialChain::credentials`].
    pub async fn build(spec: &CredentialSpec) -> CredentialChain {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(spec.sts_region.clone()))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .operation_timeout(Duration::from_secs(30))
                    .build(),
            );
        let base_name;
        match &spec.base {
            BaseCredentials::DefaultChain => base_name = "default chain".to_string(),
            BaseCredentials::Profile(p) => {
                base_name = format!("profile {p}");
                loader = loader.profile_name(p);
            }
            BaseCredentials::Static {
                access_key_id,
                secret_access_key,
                session_token,
            } => {
                base_name = format!("static key {access_key_id}");
                loader = loader.credentials_provider(Credentials::new(
                    access_key_id.clone(),
                    secret_access_key.clone(),
                    session_token.clone(),
                    None,
                    "rds-iam-proxy config",
                ));
            }
        }
        let sdk_config: SdkConfig = loader.load().await;
        let base: SharedCredentialsProvider = match sdk_config.credentials_provider() {
            Some(p) => p,
            None => SharedCredentialsProvider::new(NoCredentials),
        };
        let static_keys = matches!(spec.base, BaseCredentials::Static { .. });
        let mut top = Arc::new(CachedCredentials::new(base_name, base, static_keys));
        for hop in &spec.hops {
            let mut b = AssumeRoleProvider::builder(hop.role_arn.clone())
                .session_name(hop.session_name.clone())
                .region(Region::new(spec.sts_region.clone()))
                .configure(&sdk_config);
            if let Some(id) = &hop.external_id {
                b = b.external_id(id.clone());
            }
            if let Some(d) = hop.session_duration {
                b = b.session_length(d);
            }
            let provider = b.build_from_provider(CachedHop(top.clone())).await;
            top = Arc::new(CachedCredentials::new(
                format!("role {}", hop.role_arn),
                SharedCredentialsProvider::new(provider),
                false,
            ));
        }
        CredentialChain {
            identity: spec.identity(),
            top,
        }
    }

    /// A printable identity (key ids and ARNs, no secrets).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Credentials of the last hop, fetched or refreshed as needed.
    pub async fn credentials(&self) -> Result<Credentials, CredentialsFailure> {
        self.top.get().await
    }
}

struct NoCredentials;

impl fmt::Debug for NoCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NoCredentials")
    }
}

impl ProvideCredentials for NoCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::ready(Err(CredentialsError::not_loaded(
            "the default credential chain found no credentials",
        )))
    }
}

/// One hop's credentials, cached until shortly before they expire.
struct CachedCredentials {
    name: String,
    inner: SharedCredentialsProvider,
    /// Keys from the config file: they never change, so they never need fetching again.
    static_keys: bool,
    /// The credentials and when they were fetched.
    current: RwLock<Option<(Credentials, SystemTime)>>,
    /// Held while fetching, so concurrent callers share one fetch.
    fetching: tokio::sync::Mutex<()>,
}

impl CachedCredentials {
    fn new(name: String, inner: SharedCredentialsProvider, static_keys: bool) -> Self {
        CachedCredentials {
            name,
            inner,
            static_keys,
            current: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn fresh(&self, now: SystemTime) -> Option<Credentials> {
        let cur = self.current.read().unwrap();
        cur.as_ref()
            .filter(|(c, fetched)| match c.expiry() {
                Some(e) => now < refresh_at(*fetched, e),
                None => self.static_keys || now < *fetched + NO_EXPIRY_LIFETIME,
            })
            .map(|(c, _)| c.clone())
    }

    async fn get(&self) -> Result<Credentials, CredentialsFailure> {
        if let Some(c) = self.fresh(SystemTime::now()) {
            return Ok(c);
        }
        let _one_at_a_time = self.fetching.lock().await;
        if let Some(c) = self.fresh(SystemTime::now()) {
            return Ok(c);
        }
        let started = std::time::Instant::now();
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, self.inner.provide_credentials())
            .await
            .unwrap_or_else(|_| Err(CredentialsError::provider_timed_out(FETCH_TIMEOUT)));
        let m = crate::metrics::metrics();
        let source = crate::metrics::SourceLabels {
            source: self.name.clone(),
        };
        m.sts_latency
            .get_or_create(&source)
            .observe(started.elapsed().as_secs_f64());
        let result = if fetched.is_ok() { "ok" } else { "error" };
        m.credential_refreshes
            .get_or_create(&crate::metrics::SourceResultLabels {
                source: self.name.clone(),
                result: result.into(),
            })
            .inc();
        match fetched {
            Ok(c) => {
                if let Some(exp) = c.expiry() {
                    m.credential_expiry
                        .get_or_create(&source)
                        .set(crate::metrics::unix_seconds(exp));
                }
                tracing::info!(
                    source = %self.name,
                    access_key_id = %c.access_key_id(),
                    expires = %c.expiry().map(crate::util::rfc3339).unwrap_or_else(|| "never".into()),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "credentials refreshed"
                );
                *self.current.write().unwrap() = Some((c.clone(), SystemTime::now()));
                Ok(c)
            }
            Err(e) => {
                let reason = describe_error(&e);
                // A failed refresh keeps credentials that are still valid.
                let now = SystemTime::now();
                let still_valid = self
                    .current
                    .read()
                    .unwrap()
                    .as_ref()
                    .filter(|(c, _)| c.expiry().is_none_or(|e| now < e))
                    .map(|(c, _)| c.clone());
                tracing::warn!(source = %self.name, error = %reason, kept_previous = still_valid.is_some(), "credential refresh failed");
                still_valid.ok_or_else(|| CredentialsFailure(format!("{}: {reason}", self.name)))
            }
        }
    }
}

/// Refresh `REFRESH_AHEAD` before expiry, but not before half the lifetime has passed, so
/// short-lived credentials are not fetched again on every use.
fn refresh_at(fetched: SystemTime, expiry: SystemTime) -> SystemTime {
    let life = expiry.duration_since(fetched).unwrap_or_default();
    expiry
        .checked_sub(REFRESH_AHEAD)
        .unwrap_or(fetched)
        .max(fetched + life / 2)
}

/// Adapter so the next hop's STS client signs with this hop's cached credentials.
#[derive(Clone)]
struct CachedHop(Arc<CachedCredentials>);

impl fmt::Debug for CachedHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CachedHop({})", self.0.name)
    }
}

impl ProvideCredentials for CachedHop {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            self.0.get().await.map_err(CredentialsError::provider_error)
        })
    }
}

/// The most useful words in an SDK error chain: STS's own code and message when it has them.
fn describe_error(e: &CredentialsError) -> String {
    use aws_sdk_sts::error::SdkError;
    use aws_sdk_sts::operation::assume_role::AssumeRoleError;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut parts: Vec<String> = Vec::new();
    while let Some(err) = source {
        // An earlier hop failed: its own words are the cause.
        if let Some(hop) = err.downcast_ref::<CredentialsFailure>() {
            return hop.0.clone();
        }
        if let Some(sts) = err.downcast_ref::<AssumeRoleError>() {
            let code = sts.code().unwrap_or("error");
            let msg = sts.message().unwrap_or("no message");
            return format!("STS refused AssumeRole: {code}: {msg}");
        }
        if let Some(sdk) = err.downcast_ref::<SdkError<AssumeRoleError>>() {
            match sdk {
                SdkError::DispatchFailure(d) => {
                    return format!(
                        "cannot reach STS: {}",
                        innermost(d.as_connector_error().map(|c| c as &dyn std::error::Error))
                            .unwrap_or_else(|| "connection failed".into())
                    );
                }
                SdkError::TimeoutError(_) => return "STS did not answer in time".into(),
                _ => {}
            }
        }
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = err.source();
    }
    parts.join(": ")
}

/// The last error of a source chain: usually the one that says what happened.
fn innermost(e: Option<&dyn std::error::Error>) -> Option<String> {
    let mut e = e?;
    while let Some(next) = e.source() {
        e = next;
    }
    Some(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_point_is_ahead_of_expiry_but_not_too_early() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let min = Duration::from_secs(60);
        assert_eq!(refresh_at(t0, t0 + 60 * min), t0 + 50 * min);
        assert_eq!(refresh_at(t0, t0 + 15 * min), t0 + min * 15 / 2);
        assert_eq!(refresh_at(t0, t0 + 2 * min), t0 + min);
    }
}
