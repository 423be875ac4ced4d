//! TLS for the Postgres wire protocol (rustls with the ring provider, the
//! same pgwire's SCRAM builds on).
//!
//! With `--tls-cert` and `--tls-key` a client's SSLRequest is answered `S`
//! and the session runs over TLS (`sslmode=require`, `verify-ca`,
//! `verify-full`); without them it is answered `N` and the session goes on
//! in plaintext. `--tls-required` refuses plaintext sessions (28000).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

/// TLS settings of the pgwire endpoint.
#[derive(Clone)]
pub struct TlsSettings {
    /// The acceptor built from the certificate chain and key.
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsSettings")
    }
}

/// Loads a PEM certificate chain and private key.
pub fn load(cert: &Path, key: &Path) -> Result<TlsSettings, String> {
    let certs_pem =
        std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&certs_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key_pem = std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: not a PEM private key: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate and key do not go together: {e}"))?;
    Ok(TlsSettings {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    })
}
