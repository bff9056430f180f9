//! TLS toward the upstream: one rustls client config per target, built once at start.
//!
//! verify-full (the default) checks the chain against `ca_file` and the name `host`, which is
//! also the SNI, whatever address is dialed (`connect_to`). verify-ca checks the chain only.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::config::TlsMode;

pub fn parse_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

fn provider() -> Arc<CryptoProvider> {
    // Explicit provider: two crypto backends in the tree must never cause a runtime panic.
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Build the client config for a target's upstream.
pub fn client_config(ca_file: &Path, mode: TlsMode) -> Result<Arc<ClientConfig>, String> {
    let pem = std::fs::read(ca_file)
        .map_err(|e| format!("cannot read ca_file {}: {e}", ca_file.display()))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(parse_certificates(&pem)?);
    if added == 0 {
        return Err(format!(
            "ca_file {} holds no usable CA certificate",
            ca_file.display()
        ));
    }
    let roots = Arc::new(roots);
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match mode {
        TlsMode::VerifyFull => builder.with_root_certificates(roots).with_no_client_auth(),
        TlsMode::VerifyCa => {
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| e.to_string())?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
                .with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// The rustls server config for TLS toward clients.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::PrivateKeyDer;
    let pem = std::fs::read(cert)
        .map_err(|e| format!("cannot read client_tls_cert {}: {e}", cert.display()))?;
    let chain = parse_certificates(&pem)?;
    if chain.is_empty() {
        return Err(format!(
            "client_tls_cert {} holds no certificate",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read client_tls_key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            format!("client_tls_cert and client_tls_key do not make a usable pair: {e}")
        })?;
    Ok(Arc::new(config))
}

pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|e| format!("invalid TLS server name {host}: {e}"))
}

/// Words a user can act on for a failed handshake.
pub fn describe_error(e: &std::io::Error, host: &str) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "the server certificate is not signed by a CA in ca_file (unknown issuer); use the RDS CA bundle for this region as ca_file (RDS Proxy endpoints use the Amazon Root CAs instead)".to_string(),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                "the server certificate is not valid for the name {host}; set host to the endpoint name the certificate carries, or tls_mode = \"verify-ca\""
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server certificate has expired".to_string()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server certificate is not valid yet (check the clock)".to_string()
            }
            other => format!("invalid server certificate: {other:?}"),
        },
        other => other.to_string(),
    }
}

/// verify-ca: the chain must verify; the name may differ.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
