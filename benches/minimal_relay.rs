//! The yardstick of issue 6: the least a relay in front of PostgreSQL can do. Plain
//! PostgreSQL in, SSLRequest + verified TLS out, then `copy_bidirectional` both ways. The
//! client authenticates to the server itself (password user), so no token is involved.
//! benches/compare.py runs it beside the proxy; it is not a test.
//!
//!   MINIMAL_RELAY_LISTEN=127.0.0.1:7000 MINIMAL_RELAY_UPSTREAM=localhost:5433 \
//!   MINIMAL_RELAY_CA=/tmp/lab/ca.pem cargo bench --bench minimal_relay

use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` asks; the relay only runs on purpose.
    }
    let (Ok(listen), Ok(upstream), Ok(ca)) = (
        std::env::var("MINIMAL_RELAY_LISTEN"),
        std::env::var("MINIMAL_RELAY_UPSTREAM"),
        std::env::var("MINIMAL_RELAY_CA"),
    ) else {
        eprintln!(
            "minimal_relay: set MINIMAL_RELAY_LISTEN, MINIMAL_RELAY_UPSTREAM (host:port) and \
             MINIMAL_RELAY_CA (benches/compare.py does)"
        );
        return;
    };
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&ca).expect("read CA file");
    for cert in rustls_pemfile_certs(&pem) {
        roots.add(cert).expect("CA certificate");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let host = upstream.rsplit_once(':').expect("host:port").0.to_string();
    let name = ServerName::try_from(host).expect("server name");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let listener = TcpListener::bind(&listen).await.expect("bind");
            eprintln!("minimal_relay: listening on {listen}");
            loop {
                let (mut client, _) = listener.accept().await.expect("accept");
                let connector = connector.clone();
                let name = name.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = server.set_nodelay(true);
                    // SSLRequest: length 8, code 80877103.
                    if server
                        .write_all(&[0, 0, 0, 8, 4, 210, 22, 47])
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let mut answer = [0u8; 1];
                    if server.read_exact(&mut answer).await.is_err() || answer[0] != b'S' {
                        return;
                    }
                    let Ok(mut server) = connector.connect(name, server).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
}

/// The CERTIFICATE blocks of a PEM file.
fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .expect("PEM")
}
