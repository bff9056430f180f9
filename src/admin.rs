//! The admin HTTP endpoint (hyper): `/metrics` (Prometheus/OpenMetrics text), `/startup`,
//! `/liveness` and `/readiness` for probes.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::proxy::Proxy;

/// What the probes report on.
pub struct Health {
    pub proxy: Arc<Proxy>,
    /// Listeners bound and each target's first token minted.
    pub started: AtomicBool,
    /// Shutting down: not ready for new clients.
    pub stopping: AtomicBool,
}

pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // EMFILE and friends: wait for resources instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let health = health.clone();
                async move { Ok::<_, Infallible>(route(&req, &health)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

fn route(req: &Request<Incoming>, health: &Health) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            // Prometheus asks for OpenMetrics; curl, promtool and older scrapers get the
            // classic text format.
            let openmetrics = req.headers().get_all("accept").iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.contains("application/openmetrics-text"))
            });
            let m = crate::metrics::metrics();
            let (ctype, body) = if openmetrics {
                (
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    m.encode(),
                )
            } else {
                (
                    "text/plain; version=0.0.4; charset=utf-8",
                    m.encode_prometheus(),
                )
            };
            Response::builder()
                .header("content-type", ctype)
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts")
        }
        "/liveness" => text(StatusCode::OK, "ok\n".into()),
        "/startup" => {
            if health.started.load(Ordering::SeqCst) {
                text(StatusCode::OK, "ok\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "starting: minting the first tokens\n".into(),
                )
            }
        }
        "/readiness" => {
            let mut reasons = Vec::new();
            if health.stopping.load(Ordering::SeqCst) {
                reasons.push("shutting down".to_string());
            } else if !health.started.load(Ordering::SeqCst) {
                reasons.push("starting: minting the first tokens".to_string());
            }
            reasons.extend(health.proxy.not_ready());
            if reasons.is_empty() {
                text(StatusCode::OK, "ok\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, reasons.join("\n") + "\n")
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /startup, /liveness or /readiness\n".into(),
        ),
    }
}
