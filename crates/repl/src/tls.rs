//! Mutual-TLS material for peer links: one certificate (valid for server
//! and client auth), its key, and the CA that signs every site's certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::error::{ReplError, Result};

/// Paths of this agent's peer-link TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTls {
    /// PEM certificate chain of this agent.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle trusted for peers.
    pub ca: PathBuf,
}

fn material(path: &Path, reason: impl std::fmt::Display) -> ReplError {
    ReplError::TlsMaterial {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| material(path, e))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<_, _>>()
        .map_err(|e| material(path, e))?;
    if certs.is_empty() {
        return Err(material(path, "no PEM certificate found"));
    }
    Ok(certs)
}

impl PeerTls {
    /// Checks that every file parses, for start-up validation.
    ///
    /// # Errors
    /// [`ReplError::TlsMaterial`] naming the bad file.
    pub fn validate(&self) -> Result<()> {
        self.server_config().map(drop)
    }

    /// rustls server configuration: our certificate, and client
    /// certificates required and verified against the CA.
    ///
    /// # Errors
    /// [`ReplError::TlsMaterial`].
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(&self.ca)? {
            roots.add(ca).map_err(|e| material(&self.ca, e))?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| material(&self.ca, e))?;
        let key =
            PrivateKeyDer::from_pem_slice(&read(&self.key)?).map_err(|e| material(&self.key, e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| material(&self.cert, e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&self.cert)?, key)
            .map_err(|e| material(&self.key, e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// tonic client TLS: trust the CA, present our certificate.
    ///
    /// # Errors
    /// [`ReplError::TlsMaterial`].
    pub fn client_config(&self, host: &str) -> Result<tonic::transport::ClientTlsConfig> {
        Ok(tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(&self.ca)?))
            .identity(tonic::transport::Identity::from_pem(
                read(&self.cert)?,
                read(&self.key)?,
            ))
            .domain_name(host))
    }
}
