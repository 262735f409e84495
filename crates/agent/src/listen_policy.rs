//! Start-time rules for the control API listener: which combinations of
//! address and `[api_tls]` emberd refuses to serve, decided by one pure
//! function so the table of cases is tested without sockets.
//!
//! | endpoint                  | `[api_tls]`        | decision |
//! |---------------------------|--------------------|----------|
//! | `unix:/path`              | —                  | serve (file mode 0600 is the authentication) |
//! | TCP on loopback           | none / any         | serve (only local users reach it; the lab and tests use it) |
//! | TCP on any other address  | none               | refuse: anyone who reaches it could delete volumes |
//! | TCP on any other address  | without client_ca  | refuse: encrypted, but still anyone may call |
//! | TCP on any other address  | with client_ca     | serve; roles from the certificate (authz.rs) |
//!
//! The wildcard addresses `0.0.0.0` and `::` are "any other address": they
//! include every interface.

use std::net::IpAddr;

use crate::config::{ApiEndpoint, ApiTls};

/// What the rules need to know about the API listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ApiListener {
    /// A Unix socket.
    Unix,
    /// TCP on this address, with TLS or not and with client certificates or not.
    Tcp {
        /// The bound IP.
        ip: IpAddr,
        /// `[api_tls]` present.
        tls: bool,
        /// `[api_tls] client_ca` present.
        client_ca: bool,
    },
}

impl ApiListener {
    /// Describes the configured endpoint.
    pub(crate) fn of(endpoint: &ApiEndpoint, tls: Option<&ApiTls>) -> Self {
        match endpoint {
            ApiEndpoint::Unix(_) => Self::Unix,
            ApiEndpoint::Tcp(addr) => Self::Tcp {
                ip: addr.ip(),
                tls: tls.is_some(),
                client_ca: tls.is_some_and(|t| t.client_ca.is_some()),
            },
        }
    }
}

/// Whether `ip` only ever carries traffic from this host (`127.0.0.0/8`,
/// `::1`, and `::ffff:127.x` written the IPv6 way).
fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// The start-time decision for the API listener.
///
/// # Errors
/// Why emberd refuses to start, and what to change, in one sentence an
/// operator can act on.
pub(crate) fn check_api_listener(listener: ApiListener) -> Result<(), String> {
    let ApiListener::Tcp { ip, tls, client_ca } = listener else {
        return Ok(());
    };
    if is_loopback(ip) {
        return Ok(());
    }
    match (tls, client_ca) {
        (true, true) => Ok(()),
        (false, _) => Err(format!(
            "refusing a plaintext control API on {ip}: it is not loopback, and anyone who \
             can reach it could promote, demote or delete volumes; configure [api_tls] with \
             cert, key and client_ca (docs/security.md), or bind 127.0.0.1"
        )),
        (true, false) => Err(format!(
            "refusing the control API on {ip} with [api_tls] but no client_ca: TLS without \
             client certificates lets anyone who can reach it call every RPC; set \
             [api_tls] client_ca (docs/security.md), or bind 127.0.0.1"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(ip: &str, tls: bool, client_ca: bool) -> ApiListener {
        ApiListener::Tcp {
            ip: ip.parse().expect("ip"),
            tls,
            client_ca,
        }
    }

    #[test]
    fn non_loopback_needs_tls_and_client_ca_loopback_and_unix_do_not() {
        for (listener, ok, reason) in [
            (ApiListener::Unix, true, ""),
            (tcp("127.0.0.1", false, false), true, ""),
            (tcp("127.1.2.3", false, false), true, ""),
            (tcp("::1", false, false), true, ""),
            (tcp("::ffff:127.0.0.1", false, false), true, ""),
            (tcp("127.0.0.1", true, false), true, ""),
            (tcp("127.0.0.1", true, true), true, ""),
            (tcp("0.0.0.0", false, false), false, "plaintext"),
            (tcp("::", false, false), false, "plaintext"),
            (tcp("10.0.0.5", false, false), false, "plaintext"),
            (tcp("0.0.0.0", true, false), false, "no client_ca"),
            (tcp("192.168.1.1", true, false), false, "no client_ca"),
            (tcp("0.0.0.0", true, true), true, ""),
            (tcp("::", true, true), true, ""),
            (tcp("10.0.0.5", true, true), true, ""),
        ] {
            let got = check_api_listener(listener);
            assert_eq!(got.is_ok(), ok, "{listener:?}: {got:?}");
            if let Err(e) = got {
                assert!(e.contains(reason), "{listener:?}: {e}");
                assert!(e.contains("docs/security.md"), "{e}");
            }
        }
    }
}
