//! NBD over TLS (`doc/proto.md` "TLS support"), FORCEDTLS mode: the TLS
//! material of a TCP listener and the allow-list of client identities.
//!
//! Who may connect is decided twice: the rustls verifier admits only
//! certificates signed by the configured CA (anything else fails the TLS
//! handshake), and the [`AllowList`] then picks which of those may reach
//! an export. A valid certificate that is not on the list gets
//! `NBD_REP_ERR_POLICY` for every export option (the client learns why
//! instead of seeing a dropped connection). The option-loop rules live in
//! `handshake.rs` (`gate`).
//!
//! Certificates only: rustls has no external-PSK support, so PSK clients
//! (libnbd/nbdkit `tls-psk-file`) cannot connect.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Why TLS material or an allow-list could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A PEM file is missing, unreadable or unusable.
    #[error("{}: {reason}", path.display())]
    Material {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An allow-list pattern is malformed.
    #[error("allow pattern {pattern:?}: {reason}")]
    Pattern {
        /// The pattern as configured.
        pattern: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

fn material(path: &Path, reason: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::Material {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|e| material(path, e))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<_, _>>()
        .map_err(|e| material(path, e))?;
    if certs.is_empty() {
        return Err(material(path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// Client identities allowed past the TLS handshake: patterns matched
/// against the certificate's subject common name and its SAN DNS names.
///
/// A pattern is compared ASCII-case-insensitively; `*` matches any run of
/// characters (also none), so `"*"` admits every certificate the CA
/// signed, `"nova-*"` a naming scheme and `"*.compute.example"` a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    patterns: Vec<String>,
}

impl AllowList {
    /// Validates the patterns.
    ///
    /// # Errors
    /// [`TlsSetupError::Pattern`] for an empty list or an empty pattern
    /// (an empty list would refuse everyone: say `["*"]` to admit all).
    pub fn new(patterns: impl IntoIterator<Item = String>) -> Result<Self, TlsSetupError> {
        let patterns: Vec<String> = patterns.into_iter().collect();
        if patterns.is_empty() {
            return Err(TlsSetupError::Pattern {
                pattern: String::new(),
                reason: "the allow-list is empty; list client names, or \"*\" for every certificate the CA signed",
            });
        }
        if let Some(bad) = patterns.iter().find(|p| p.trim().is_empty()) {
            return Err(TlsSetupError::Pattern {
                pattern: bad.clone(),
                reason: "empty pattern",
            });
        }
        Ok(Self { patterns })
    }

    /// Whether any of a client's `identities` matches any pattern.
    pub fn permits(&self, identities: &[String]) -> bool {
        identities
            .iter()
            .any(|id| self.patterns.iter().any(|p| glob(p, id)))
    }
}

/// `*`-glob match, ASCII case-insensitive (DNS names are).
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    // Iterative matcher with one backtrack point: linear-ish, no recursion
    // for a hostile certificate to blow up.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi].eq_ignore_ascii_case(&t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The names a client certificate speaks for: subject common names, then
/// SAN DNS names. Empty when the certificate does not parse (the verifier
/// already accepted it, so that means an extension we cannot read: such a
/// client matches no pattern).
pub fn client_identities(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = parsed
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    names
}

/// Who is on the other end of a TLS connection, and whether they may
/// reach exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientIdentity {
    /// CN and SAN DNS names of the leaf certificate.
    pub(crate) names: Vec<String>,
    /// Whether the allow-list admits them.
    pub(crate) allowed: bool,
}

/// TLS for an NBD TCP listener: a rustls acceptor plus the allow-list.
#[derive(Clone)]
pub struct NbdTls {
    acceptor: TlsAcceptor,
    allow: AllowList,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTls")
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

impl NbdTls {
    /// From a rustls server configuration (which must verify client
    /// certificates, e.g. with a `WebPkiClientVerifier`) and an allow-list.
    pub fn new(config: Arc<rustls::ServerConfig>, allow: AllowList) -> Self {
        Self {
            acceptor: TlsAcceptor::from(config),
            allow,
        }
    }

    /// From PEM files: our certificate chain and key, and the CA whose
    /// client certificates are verified (and required). TLS 1.3 and 1.2
    /// (the kernel's `nbd-client` speaks 1.2 only).
    ///
    /// # Errors
    /// [`TlsSetupError::Material`] naming the bad file.
    pub fn from_pem(
        cert: &Path,
        key: &Path,
        ca: &Path,
        allow: AllowList,
    ) -> Result<Self, TlsSetupError> {
        Ok(Self::new(server_config(cert, key, ca)?, allow))
    }

    /// Runs the TLS handshake on `stream` (right after the STARTTLS ACK)
    /// and checks the client certificate against the allow-list.
    pub(crate) async fn accept<S>(
        &self,
        stream: S,
    ) -> std::io::Result<(TlsStream<S>, ClientIdentity)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = match self.acceptor.accept(stream).into_fallible().await {
            Ok(tls) => tls,
            Err((error, raw)) => {
                linger_close(raw).await;
                return Err(error);
            }
        };
        let names = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(client_identities)
            .unwrap_or_default();
        let allowed = self.allow.permits(&names);
        Ok((tls, ClientIdentity { names, allowed }))
    }
}

/// After a refused handshake: close our side and read (and discard) what
/// the client still sends for a moment. Closing with unread data queued
/// makes the kernel send a reset that can overtake our TLS alert, and the
/// client would report "broken pipe" instead of the refusal.
async fn linger_close<S: AsyncRead + AsyncWrite + Unpin>(mut raw: S) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LINGER: std::time::Duration = std::time::Duration::from_millis(500);
    const MAX_DISCARD: usize = 64 * 1024;
    let _ = raw.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut discarded = 0;
    while discarded < MAX_DISCARD {
        match tokio::time::timeout(LINGER, raw.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => discarded += n,
            _ => break,
        }
    }
}

/// The rustls server configuration [`NbdTls::from_pem`] uses.
///
/// # Errors
/// [`TlsSetupError::Material`] naming the bad file.
pub fn server_config(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| material(ca, e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| material(ca, e))?;
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| material(key, e))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| material(cert, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert)?, key_der)
        .map_err(|e| material(key, e))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn glob_table() {
        for (pattern, text, hit) in [
            ("*", "anything", true),
            ("*", "", true),
            ("nova-1", "nova-1", true),
            ("nova-1", "NOVA-1", true),
            ("nova-1", "nova-10", false),
            ("nova-*", "nova-10", true),
            ("nova-*", "nova-", true),
            ("nova-*", "cinder-1", false),
            ("*.compute.example", "n1.compute.example", true),
            ("*.compute.example", "compute.example", false),
            ("*.compute.example", "n1.compute.example.evil", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(glob(pattern, text), hit, "{pattern:?} vs {text:?}");
        }
    }

    #[test]
    fn allow_list_admits_any_matching_identity() {
        let list = AllowList::new(ids(&["qemu-*", "backup.example"])).expect("valid");
        assert!(list.permits(&ids(&["qemu-host1"])));
        assert!(
            list.permits(&ids(&["nobody", "backup.example"])),
            "SAN match"
        );
        assert!(!list.permits(&ids(&["intruder", "intruder.example"])));
        assert!(!list.permits(&[]), "no names, no entry");
    }

    #[test]
    fn empty_allow_lists_and_patterns_are_refused() {
        assert!(matches!(
            AllowList::new(Vec::new()),
            Err(TlsSetupError::Pattern { .. })
        ));
        assert!(matches!(
            AllowList::new(ids(&["ok", " "])),
            Err(TlsSetupError::Pattern { .. })
        ));
    }

    #[test]
    fn identities_are_the_common_name_and_san_dns_names() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(ids(&["host1.example", "127.0.0.1"])).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "qemu-host1");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(
            client_identities(cert.der()),
            ids(&["qemu-host1", "host1.example"]),
            "CN then SAN DNS; IP SANs are not names"
        );
        assert!(client_identities(&CertificateDer::from(vec![1, 2, 3])).is_empty());
    }
}
