//! Prometheus metrics (prefix `rds_iam_proxy_`), one process-wide set. Counters are bumped
//! where things happen (accept, close, relay, mint, STS call), so a scrape is always current.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub target: String,
    pub engine: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    pub target: String,
    pub engine: String,
    /// ok, auth_failed, upstream_error, client_error, limit
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub target: String,
    pub engine: String,
    /// connect, tls, tls_refused, protocol, timeout
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsHandshakeLabels {
    pub target: String,
    pub engine: String,
    /// full, resumed
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub target: String,
    pub engine: String,
    /// client_to_server, server_to_client
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// "role ARN", "static key AKIA...", "default chain", "profile NAME"
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceResultLabels {
    pub source: String,
    /// ok, error
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    pub accepted: Family<TargetLabels, Counter>,
    pub closed: Family<ClosedLabels, Counter>,
    pub active: Family<TargetLabels, Gauge>,
    pub handshake: HistogramFamily<TargetLabels>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub upstream_tls_handshakes: Family<TlsHandshakeLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub tokens_minted: Family<TokenLabels, Counter>,
    pub token_expiry: Family<TokenLabels, Gauge>,
    pub credential_expiry: Family<SourceLabels, Gauge>,
    pub credential_refreshes: Family<SourceResultLabels, Counter>,
    pub sts_latency: HistogramFamily<SourceLabels>,
    pub config_reloads: Family<ResultLabels, Counter>,
    build_info: Family<BuildLabels, Gauge>,
    registry: Registry,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            accepted: Family::default(),
            closed: Family::default(),
            active: Family::default(),
            handshake: Family::new_with_constructor(latency_histogram),
            upstream_errors: Family::default(),
            upstream_tls_handshakes: Family::default(),
            bytes: Family::default(),
            tokens_minted: Family::default(),
            token_expiry: Family::default(),
            credential_expiry: Family::default(),
            credential_refreshes: Family::default(),
            sts_latency: Family::new_with_constructor(latency_histogram),
            config_reloads: Family::default(),
            build_info: Family::default(),
            registry: Registry::with_prefix("rds_iam_proxy"),
        };
        let r = &mut m.registry;
        r.register(
            "client_connections_accepted",
            "Client connections accepted",
            m.accepted.clone(),
        );
        r.register(
            "client_connections_closed",
            "Client connections closed, by result (ok, auth_failed, upstream_error, client_error, limit)",
            m.closed.clone(),
        );
        r.register(
            "client_connections_active",
            "Client connections open now",
            m.active.clone(),
        );
        r.register_with_unit(
            "handshake",
            "Time from accept to a ready session (connect, TLS, token login)",
            Unit::Seconds,
            m.handshake.clone(),
        );
        r.register(
            "upstream_errors",
            "Upstream connect and TLS failures, by kind",
            m.upstream_errors.clone(),
        );
        r.register(
            "upstream_tls_handshakes",
            "Completed TLS handshakes toward the server, by kind (full, resumed from a session ticket)",
            m.upstream_tls_handshakes.clone(),
        );
        r.register_with_unit(
            "relayed",
            "Bytes relayed after login, by direction",
            Unit::Bytes,
            m.bytes.clone(),
        );
        r.register(
            "tokens_minted",
            "IAM tokens minted",
            m.tokens_minted.clone(),
        );
        r.register_with_unit(
            "token_expiry_timestamp",
            "When the current token of a target stops being accepted (Unix time)",
            Unit::Seconds,
            m.token_expiry.clone(),
        );
        r.register_with_unit(
            "credential_expiry_timestamp",
            "When the current credentials of a source expire (Unix time)",
            Unit::Seconds,
            m.credential_expiry.clone(),
        );
        r.register(
            "credential_refreshes",
            "Credential fetches (STS AssumeRole and base sources), by result",
            m.credential_refreshes.clone(),
        );
        r.register_with_unit(
            "credential_fetch_duration",
            "Time one credential fetch (an STS call for a role) took",
            Unit::Seconds,
            m.sts_latency.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads (SIGHUP), by result",
            m.config_reloads.clone(),
        );
        r.register("build_info", "Build information", m.build_info.clone());
        m.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        m
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The classic Prometheus text format (0.0.4), for scrapers and tools that do not
    /// speak OpenMetrics (promtool among them).
    pub fn encode_prometheus(&self) -> String {
        to_prometheus_text(&self.encode())
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64
}

/// OpenMetrics to Prometheus text 0.0.4: a counter family `x` is exposed as `x_total`, so its
/// HELP and TYPE lines take that name; UNIT and EOF lines do not exist there.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn openmetrics_counters_become_prometheus_text() {
        let om = "# HELP a_x Things.\n# TYPE a_x counter\n# UNIT a_x bytes\na_x_total{k=\"v\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            super::to_prometheus_text(om),
            "# HELP a_x_total Things.\n# TYPE a_x_total counter\na_x_total{k=\"v\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
