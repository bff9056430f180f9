//! Dialing the upstream, shared by both engines: fresh DNS per connection (failover moves
//! the name), a bounded connect, TCP_NODELAY and keepalive, then TLS for the endpoint name.

use std::time::Duration;

use rustls::HandshakeKind;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::failure::Failure;
use crate::metrics::{metrics, TlsHandshakeLabels};
use crate::proxy::TargetRuntime;

/// Connect to `addr` within `timeout`.
pub async fn dial(addr: &str, timeout: Duration) -> Result<TcpStream, Failure> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(Failure::Unreachable {
                addr: addr.to_string(),
                reason: e.to_string(),
            })
        }
        Err(_) => {
            return Err(Failure::Unreachable {
                addr: addr.to_string(),
                reason: format!("no answer within {} s (connect_timeout)", timeout.as_secs()),
            })
        }
    };
    tune(&stream);
    Ok(stream)
}

/// The server's first answer (greeting, SSLRequest reply), bounded: a connection lost on
/// the way or silence means the upstream is not usable, named with `addr`.
pub async fn first_answer<T>(
    addr: &str,
    limit: Duration,
    silent: &str,
    answer: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, answer).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::Unreachable {
            addr: addr.to_string(),
            reason: format!("connection lost before the server answered: {e}"),
        }),
        Err(_) => Err(Failure::Unreachable {
            addr: addr.to_string(),
            reason: silent.to_string(),
        }),
    }
}

/// TCP_NODELAY (interactive protocol) and keepalive (notice dead peers behind NAT).
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(15));
    let _ = SockRef::from(stream).set_tcp_keepalive(&ka);
}

/// Run the TLS handshake on an established stream, bounded by the target's connect_timeout.
/// The client config is shared by the target's connections, so a server that issues session
/// tickets gets a resumed (cheaper) handshake on reconnect; the metric tells which happened.
pub async fn tls(
    stream: TcpStream,
    target: &TargetRuntime,
    addr: &str,
) -> Result<TlsStream<TcpStream>, Failure> {
    let cfg = &target.cfg;
    let connector = TlsConnector::from(target.tls.clone());
    let handshake = connector.connect(target.server_name.clone(), stream);
    match tokio::time::timeout(cfg.connect_timeout, handshake).await {
        Ok(Ok(s)) => {
            let kind = match s.get_ref().1.handshake_kind() {
                Some(HandshakeKind::Resumed) => "resumed",
                _ => "full",
            };
            metrics()
                .upstream_tls_handshakes
                .get_or_create(&TlsHandshakeLabels {
                    target: cfg.name.clone(),
                    engine: cfg.engine.as_str().to_string(),
                    kind: kind.to_string(),
                })
                .inc();
            Ok(s)
        }
        Ok(Err(e)) => Err(Failure::Tls {
            addr: addr.to_string(),
            reason: crate::tls::describe_error(&e, &cfg.host),
        }),
        Err(_) => Err(Failure::Tls {
            addr: addr.to_string(),
            reason: format!(
                "handshake not finished within {} s",
                cfg.connect_timeout.as_secs()
            ),
        }),
    }
}
