//! One client connection's bookkeeping, the same for both engines: the accepted/active/closed
//! metrics, the handshake latency, live byte counters, and the open and close log lines.

use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::Target;
use crate::failure::Failure;
use crate::metrics::{metrics, BytesLabels, ClosedLabels, TargetLabels, UpstreamErrorLabels};
use crate::relay::Relayed;

/// Live byte counters a relay bumps as it writes.
#[derive(Clone, Default)]
pub struct Meter {
    pub client_to_server: Counter,
    pub server_to_client: Counter,
}

pub struct Session {
    target: String,
    engine: &'static str,
    peer: String,
    started: Instant,
    active: Gauge,
    pub meter: Meter,
    pub user: String,
    pub database: String,
}

impl Session {
    /// Count the connection in. `active` is the target's gauge (shared across reloads).
    pub fn open(cfg: &Target, peer: String, active: Gauge) -> Session {
        let m = metrics();
        let labels = TargetLabels {
            target: cfg.name.clone(),
            engine: cfg.engine.as_str().to_string(),
        };
        m.accepted.get_or_create(&labels).inc();
        active.inc();
        let bytes = |direction: &str| {
            m.bytes.get_or_create_owned(&BytesLabels {
                target: cfg.name.clone(),
                engine: cfg.engine.as_str().to_string(),
                direction: direction.to_string(),
            })
        };
        Session {
            target: cfg.name.clone(),
            engine: cfg.engine.as_str(),
            peer,
            started: Instant::now(),
            active,
            meter: Meter {
                client_to_server: bytes("client_to_server"),
                server_to_client: bytes("server_to_client"),
            },
            user: String::new(),
            database: String::new(),
        }
    }

    fn labels(&self) -> TargetLabels {
        TargetLabels {
            target: self.target.clone(),
            engine: self.engine.to_string(),
        }
    }

    /// The client knows who it is: one log line.
    pub fn opened(&self) {
        tracing::info!(target = %self.target, engine = self.engine, client = %self.peer, user = %self.user, database = %self.database, "connection opened");
    }

    /// The session is ready: the handshake took this long.
    pub fn ready(&self) {
        metrics()
            .handshake
            .get_or_create(&self.labels())
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// Count the connection out, with one log line.
    pub fn close(self, outcome: &Result<(Relayed, Option<String>), Failure>) {
        let m = metrics();
        let result = match outcome {
            Ok(_) => "ok",
            Err(f) => f.kind(),
        };
        m.closed
            .get_or_create(&ClosedLabels {
                target: self.target.clone(),
                engine: self.engine.to_string(),
                result: result.to_string(),
            })
            .inc();
        if let Err(f) = outcome {
            if let Some(kind) = f.upstream_kind() {
                m.upstream_errors
                    .get_or_create(&UpstreamErrorLabels {
                        target: self.target.clone(),
                        engine: self.engine.to_string(),
                        kind: kind.to_string(),
                    })
                    .inc();
            }
        }
        self.active.dec();
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let (target, engine, peer, user, database) = (
            &self.target,
            self.engine,
            self.peer,
            &self.user,
            &self.database,
        );
        match outcome {
            Ok((relayed, error)) => tracing::info!(
                target = %target, engine, client = %peer, user = %user, database = %database,
                duration_ms, bytes_from_client = relayed.client_to_server,
                bytes_to_client = relayed.server_to_client, result, error = error.as_deref(),
                "connection closed"
            ),
            Err(f) => tracing::warn!(
                target = %target, engine, client = %peer, user = %user, database = %database,
                duration_ms, result, error = %f, "connection closed"
            ),
        }
    }
}
