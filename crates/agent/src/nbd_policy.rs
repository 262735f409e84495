//! Start-time rules and TLS material for the NBD TCP listener (issue 15).
//!
//! | `nbd` address             | `[nbd_tls]` | `nbd_insecure` | decision |
//! |---------------------------|-------------|----------------|----------|
//! | any                       | present     | any            | FORCEDTLS with client certificates |
//! | loopback                  | absent      | any            | plaintext (only local users reach it) |
//! | any other (incl. 0.0.0.0) | absent      | false          | refuse to start: anyone reaching the port could read and write every volume |
//! | any other                 | absent      | true           | plaintext, logged at WARN at every start |
//!
//! The NBD Unix socket (`nbd_unix`) always stays plaintext: it is local
//! and guarded by its file permissions.

use std::net::IpAddr;
use std::path::PathBuf;

use ember_nbd::{AllowList, NbdTls};
use serde::Deserialize;

/// `[nbd_tls]` section: NBD over TLS with client certificates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdTlsSection {
    /// PEM certificate chain the NBD listener presents.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle; clients must present a certificate it signed.
    pub ca: PathBuf,
    /// Client certificate names (subject CN or SAN DNS, `*` wildcard,
    /// case-insensitive) allowed to reach exports; `["*"]` admits every
    /// certificate the CA signed. Others get `NBD_REP_ERR_POLICY`.
    pub allow: Vec<String>,
}

impl NbdTlsSection {
    /// Loads the certificate, key and CA, and checks the allow-list.
    ///
    /// # Errors
    /// The bad file or pattern, in words an operator can act on.
    pub fn load(&self) -> Result<NbdTls, String> {
        let allow =
            AllowList::new(self.allow.iter().cloned()).map_err(|e| format!("[nbd_tls] {e}"))?;
        NbdTls::from_pem(&self.cert, &self.key, &self.ca, allow)
            .map_err(|e| format!("[nbd_tls] {e}"))
    }
}

/// How the NBD TCP listener will serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NbdExposure {
    /// TLS required (FORCEDTLS), client certificates checked.
    Tls,
    /// Plaintext on loopback.
    Loopback,
    /// Plaintext off loopback because `nbd_insecure = true`: warn.
    Insecure,
}

/// The start-time decision for the NBD TCP listener on `ip`.
///
/// # Errors
/// Why emberd refuses to start, and what to change.
pub(crate) fn check_nbd_listener(
    ip: IpAddr,
    tls: bool,
    insecure: bool,
) -> Result<NbdExposure, String> {
    if tls {
        return Ok(NbdExposure::Tls);
    }
    if ip.to_canonical().is_loopback() {
        return Ok(NbdExposure::Loopback);
    }
    if insecure {
        return Ok(NbdExposure::Insecure);
    }
    Err(format!(
        "refusing plaintext NBD on {ip}: it is not loopback, and anyone who can reach the \
         port could read and write every volume; configure [nbd_tls] with cert, key, ca and \
         allow (docs/security.md), bind 127.0.0.1, or set nbd_insecure = true on a trusted \
         storage network"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_nbd_needs_tls_or_an_explicit_insecure_flag() {
        use NbdExposure::*;
        for (ip, tls, insecure, want) in [
            ("127.0.0.1", false, false, Ok(Loopback)),
            ("127.9.9.9", false, false, Ok(Loopback)),
            ("::1", false, false, Ok(Loopback)),
            ("::ffff:127.0.0.1", false, false, Ok(Loopback)),
            ("127.0.0.1", true, false, Ok(Tls)),
            ("0.0.0.0", true, false, Ok(Tls)),
            ("::", true, false, Ok(Tls)),
            ("10.1.2.3", true, true, Ok(Tls)),
            ("0.0.0.0", false, false, Err("0.0.0.0")),
            ("::", false, false, Err("::")),
            ("10.1.2.3", false, false, Err("10.1.2.3")),
            ("0.0.0.0", false, true, Ok(Insecure)),
            ("192.168.0.9", false, true, Ok(Insecure)),
        ] {
            let got = check_nbd_listener(ip.parse().expect("ip"), tls, insecure);
            match (&got, want) {
                (Ok(g), Ok(w)) => assert_eq!(*g, w, "{ip} tls={tls} insecure={insecure}"),
                (Err(e), Err(needle)) => {
                    assert!(e.contains(needle), "{e}");
                    assert!(e.contains("[nbd_tls]") && e.contains("nbd_insecure"), "{e}");
                }
                _ => panic!("{ip} tls={tls} insecure={insecure}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn an_empty_allow_list_is_refused_with_a_reason() {
        let section = NbdTlsSection {
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/k.pem".into(),
            ca: "/nonexistent/ca.pem".into(),
            allow: Vec::new(),
        };
        let e = section.load().expect_err("empty allow-list");
        assert!(e.contains("allow-list is empty"), "{e}");
        let section = NbdTlsSection {
            allow: vec!["*".into()],
            ..section
        };
        let e = section.load().expect_err("missing files");
        assert!(e.contains("/nonexistent/"), "{e}");
    }
}
