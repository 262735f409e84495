//! Who may call what on the control API: roles from the client certificate
//! and one table mapping every RPC of `ember.control.v1.EmberControl` to
//! the role it needs, enforced in one tower layer around the whole gRPC
//! server (an interceptor cannot see the method name; a layer sees the
//! request path `/ember.control.v1.EmberControl/DeleteVolume`).
//!
//! Rules (docs/security.md):
//! - No client certificates configured (Unix socket, loopback TCP without
//!   `client_ca`): the transport is the authentication (file mode 0600, or
//!   only local users can reach loopback), every caller is admin.
//! - `[api_tls] client_ca`: a caller is admin when its certificate's subject
//!   CN or a SAN DNS name matches a pattern in `admins`, else reader when one
//!   matches `readers`, else nothing (every control RPC is refused). With
//!   both lists empty every certificate the CA signed is admin: that is how
//!   `client_ca` behaved before roles existed (the Cinder driver's setup).
//! - The gRPC health service and anything outside the control service stay
//!   open: health probes carry no data and change nothing.
//!
//! What must not live here: TLS configuration (server.rs), start-time
//! listener rules (listen_policy.rs).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// What a caller may do. Ordered: an admin may do everything a reader may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Role {
    /// Status, lists, shows, capabilities and the event stream.
    Reader,
    /// Everything, including every call that changes state.
    Admin,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::Reader => "reader",
            Self::Admin => "admin",
        }
    }
}

/// The gRPC path prefix of the control service.
const CONTROL_PREFIX: &str = "/ember.control.v1.EmberControl/";

/// Every RPC of the control service and the role it needs. Anything that
/// creates, deletes, changes or sends data is admin; reading state is
/// reader. Two judgement calls:
/// - `GetDirtyExtents` is admin: it opens a checkpoint, which changes what
///   a later `ClearDirtyExtents` forgets (a backup tool's state).
/// - `VerifyReplica` is admin: with `resync` it resends data, and even
///   without it reads both sides of the whole volume (a reader must not be
///   able to load both sites' disks at will).
///
/// A unit test checks this table against the proto's descriptor, so a new
/// RPC cannot ship without a decision here.
const METHOD_ROLES: &[(&str, Role)] = &[
    ("GetCapabilities", Role::Reader),
    ("CreateVolume", Role::Admin),
    ("DeleteVolume", Role::Admin),
    ("ResizeVolume", Role::Admin),
    ("GetVolume", Role::Reader),
    ("ListVolumes", Role::Reader),
    ("CreateSnapshot", Role::Admin),
    ("DeleteSnapshot", Role::Admin),
    ("ListSnapshots", Role::Reader),
    ("GetDirtyExtents", Role::Admin),
    ("ClearDirtyExtents", Role::Admin),
    ("AddPeer", Role::Admin),
    ("ListPeers", Role::Reader),
    ("RemovePeer", Role::Admin),
    ("EnableReplication", Role::Admin),
    ("DisableReplication", Role::Admin),
    ("GetReplicationStatus", Role::Reader),
    ("ListReplications", Role::Reader),
    ("VerifyReplica", Role::Admin),
    ("SetReplicationPaused", Role::Admin),
    ("PromoteReplica", Role::Admin),
    ("DemoteReplica", Role::Admin),
    ("WatchEvents", Role::Reader),
    ("CreateGroup", Role::Admin),
    ("DeleteGroup", Role::Admin),
    ("AddToGroup", Role::Admin),
    ("RemoveFromGroup", Role::Admin),
    ("GetGroupStatus", Role::Reader),
    ("ListGroups", Role::Reader),
    ("PromoteGroup", Role::Admin),
    ("StartDrill", Role::Admin),
    ("ListDrills", Role::Reader),
    ("StopDrill", Role::Admin),
    ("StartGroupDrill", Role::Admin),
    ("CreatePoint", Role::Admin),
    ("ListPoints", Role::Reader),
    ("SetReplication", Role::Admin),
];

/// The role a request path needs: `None` for paths outside the control
/// service (health), `Admin` for a control method missing from the table
/// (fail closed; the unit test keeps that from happening).
fn required_role(path: &str) -> Option<(&str, Role)> {
    let method = path.strip_prefix(CONTROL_PREFIX)?;
    let role = METHOD_ROLES
        .iter()
        .find(|(m, _)| *m == method)
        .map_or(Role::Admin, |(_, r)| *r);
    Some((method, role))
}

/// A name pattern from `admins`/`readers`: matched against the subject CN
/// and every SAN DNS name, ASCII case-insensitively; `*` matches any run of
/// characters (including none and including dots), nothing else is special.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern(String);

impl Pattern {
    /// Checks a configured pattern.
    ///
    /// # Errors
    /// An empty pattern, or one with whitespace or control characters
    /// (never part of a certificate name; almost certainly a typo).
    pub(crate) fn new(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("an empty name pattern matches nothing; remove it".into());
        }
        if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "name pattern {raw:?} contains whitespace or control characters"
            ));
        }
        Ok(Self(raw.to_ascii_lowercase()))
    }

    /// Whether `name` matches.
    pub(crate) fn matches(&self, name: &str) -> bool {
        glob_match(self.0.as_bytes(), name.to_ascii_lowercase().as_bytes())
    }
}

/// `*`-only glob, iterative with one backtrack point (linear enough for
/// names of a few hundred bytes, no recursion on input).
fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if p < pat.len() && pat[p] == s[i] {
            p += 1;
            i += 1;
        } else if let Some((sp, si)) = star {
            // Let the last `*` swallow one more character and retry.
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// The names a client certificate carries that patterns are matched on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ClientIdentity {
    /// Subject common names (normally one).
    pub(crate) common_names: Vec<String>,
    /// Subject alternative names of type DNS.
    pub(crate) dns_names: Vec<String>,
}

impl ClientIdentity {
    /// Reads the names from a DER certificate.
    ///
    /// # Errors
    /// A certificate x509-parser cannot read (rustls already verified the
    /// signature, so this means an extension we cannot decode).
    pub(crate) fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unreadable client certificate: {e}"))?;
        let common_names = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
            .collect();
        let dns_names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(format!("unreadable subjectAltName: {e}")),
        };
        Ok(Self {
            common_names,
            dns_names,
        })
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.common_names
            .iter()
            .chain(&self.dns_names)
            .map(String::as_str)
    }
}

impl std::fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CN={}", self.common_names.join(","))?;
        if !self.dns_names.is_empty() {
            write!(f, " (DNS {})", self.dns_names.join(", "))?;
        }
        Ok(())
    }
}

/// How the API decides roles; built once at start from `[api_tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Policy {
    /// No client certificates (Unix socket, loopback TCP): every caller is admin.
    Open,
    /// `client_ca` set: the role comes from the certificate.
    Certificates {
        /// Patterns that make a caller admin.
        admins: Vec<Pattern>,
        /// Patterns that make a caller reader.
        readers: Vec<Pattern>,
    },
}

impl Policy {
    /// The policy for a TCP API with this `[api_tls]` section (or none).
    ///
    /// # Errors
    /// A bad pattern, or `admins`/`readers` without `client_ca` (they
    /// could never match: there would be no certificate to match).
    pub(crate) fn from_config(tls: Option<&crate::config::ApiTls>) -> Result<Self, String> {
        let Some(tls) = tls else {
            return Ok(Self::Open);
        };
        let parse = |key: &str, raw: &[String]| {
            raw.iter()
                .map(|p| Pattern::new(p).map_err(|e| format!("[api_tls] {key}: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        let admins = parse("admins", &tls.admins)?;
        let readers = parse("readers", &tls.readers)?;
        if tls.client_ca.is_none() {
            if !admins.is_empty() || !readers.is_empty() {
                return Err(
                    "[api_tls] admins/readers need client_ca: without client certificates \
                     there is no identity to match"
                        .into(),
                );
            }
            return Ok(Self::Open);
        }
        Ok(Self::Certificates { admins, readers })
    }

    /// The role `identity` holds under this policy (`None`: no role at all).
    pub(crate) fn role_of(&self, identity: &ClientIdentity) -> Option<Role> {
        let (admins, readers) = match self {
            Self::Open => return Some(Role::Admin),
            Self::Certificates { admins, readers } => (admins, readers),
        };
        // Both lists empty: every certificate the CA signed is admin (the
        // behaviour of client_ca before roles; the driver relies on it).
        if admins.is_empty() && readers.is_empty() {
            return Some(Role::Admin);
        }
        let any = |pats: &[Pattern]| identity.names().any(|n| pats.iter().any(|p| p.matches(n)));
        if any(admins) {
            Some(Role::Admin)
        } else if any(readers) {
            Some(Role::Reader)
        } else {
            None
        }
    }

    /// Decides one request from its path and the peer's certificate chain
    /// (leaf first, as rustls gives it).
    ///
    /// # Errors
    /// The status to answer with: UNAUTHENTICATED without a usable
    /// certificate, PERMISSION_DENIED naming the identity, its role and the
    /// role the method needs.
    pub(crate) fn check(&self, path: &str, chain: Option<&[Vec<u8>]>) -> Result<(), tonic::Status> {
        let Some((method, needed)) = required_role(path) else {
            return Ok(());
        };
        if *self == Self::Open {
            return Ok(());
        }
        // rustls already refused a missing or untrusted certificate at the
        // handshake; this is the belt to that: never treat "no cert" as a role.
        let Some(leaf) = chain.and_then(|c| c.first()) else {
            return Err(tonic::Status::unauthenticated(format!(
                "{method} needs a client certificate signed by the API's client_ca"
            )));
        };
        let identity = ClientIdentity::from_der(leaf).map_err(tonic::Status::unauthenticated)?;
        match self.role_of(&identity) {
            Some(granted) if granted >= needed => Ok(()),
            Some(granted) => Err(tonic::Status::permission_denied(format!(
                "{method} needs the {} role; client {identity} has the {} role \
                 (admins are listed in [api_tls] admins)",
                needed.name(),
                granted.name()
            ))),
            None => Err(tonic::Status::permission_denied(format!(
                "{method} needs the {} role; client {identity} matches neither \
                 [api_tls] admins nor readers",
                needed.name()
            ))),
        }
    }
}

/// Tower layer enforcing a [`Policy`] on every request of a gRPC server.
#[derive(Debug, Clone)]
pub(crate) struct AuthzLayer {
    policy: Arc<Policy>,
}

impl AuthzLayer {
    /// A layer enforcing `policy`.
    pub(crate) fn new(policy: Policy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service [`AuthzLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub(crate) struct Authz<S> {
    inner: S,
    policy: Arc<Policy>,
}

/// The future of [`Authz`]: the inner call, or an immediate refusal.
type AuthzFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Authz<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = AuthzFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        // tonic's per-connection layer puts the TLS peer chain into every
        // request's extensions before the routes (and this layer) see it.
        let chain: Option<Vec<Vec<u8>>> = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .map(|certs| certs.iter().map(|c| c.as_ref().to_vec()).collect());
        match self.policy.check(req.uri().path(), chain.as_deref()) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => {
                tracing::warn!(
                    path = req.uri().path(),
                    code = ?status.code(),
                    reason = status.message(),
                    "control API call refused"
                );
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pats(raw: &[&str]) -> Vec<Pattern> {
        raw.iter()
            .map(|p| Pattern::new(p).expect("pattern"))
            .collect()
    }

    fn id(cn: &str, dns: &[&str]) -> ClientIdentity {
        ClientIdentity {
            common_names: vec![cn.to_owned()],
            dns_names: dns.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn patterns_match_exactly_or_with_stars_and_ignore_ascii_case() {
        for (pat, name, want) in [
            ("cinder", "cinder", true),
            ("cinder", "Cinder", true),
            ("cinder", "cinder2", false),
            ("cinder", "xcinder", false),
            ("cinder-*", "cinder-volume-1", true),
            ("cinder-*", "cinder-", true),
            ("cinder-*", "cinder", false),
            ("*.ops.example.com", "a.ops.example.com", true),
            ("*.ops.example.com", "a.b.ops.example.com", true),
            ("*.ops.example.com", "ops.example.com", false),
            ("*", "anything", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("a*b", "abab", true),
            ("**", "", true),
            ("x", "", false),
        ] {
            assert_eq!(
                Pattern::new(pat).expect("pattern").matches(name),
                want,
                "{pat:?} vs {name:?}"
            );
        }
        assert!(Pattern::new("").is_err());
        assert!(Pattern::new("ci nder").is_err());
    }

    #[test]
    fn roles_come_from_cn_or_dns_names_admin_first() {
        let policy = Policy::Certificates {
            admins: pats(&["cinder", "*.admin.example"]),
            readers: pats(&["monitor-*", "cinder"]),
        };
        for (who, want) in [
            (id("cinder", &[]), Some(Role::Admin)),
            (id("x", &["h1.admin.example"]), Some(Role::Admin)),
            (id("monitor-1", &[]), Some(Role::Reader)),
            (id("x", &["monitor-2"]), Some(Role::Reader)),
            (id("intruder", &["intruder", "localhost"]), None),
        ] {
            assert_eq!(policy.role_of(&who), want, "{who}");
        }
        let compat = Policy::Certificates {
            admins: Vec::new(),
            readers: Vec::new(),
        };
        assert_eq!(compat.role_of(&id("any", &[])), Some(Role::Admin));
        let readers_only = Policy::Certificates {
            admins: Vec::new(),
            readers: pats(&["r"]),
        };
        assert_eq!(readers_only.role_of(&id("r", &[])), Some(Role::Reader));
        assert_eq!(readers_only.role_of(&id("other", &[])), None);
        assert_eq!(Policy::Open.role_of(&id("x", &[])), Some(Role::Admin));
    }

    #[test]
    fn paths_map_to_roles_and_health_stays_open() {
        for (path, want) in [
            (
                "/ember.control.v1.EmberControl/DeleteVolume",
                Some(Role::Admin),
            ),
            (
                "/ember.control.v1.EmberControl/ListVolumes",
                Some(Role::Reader),
            ),
            (
                "/ember.control.v1.EmberControl/WatchEvents",
                Some(Role::Reader),
            ),
            (
                "/ember.control.v1.EmberControl/NoSuchRpc",
                Some(Role::Admin),
            ),
            ("/grpc.health.v1.Health/Check", None),
            ("/", None),
        ] {
            assert_eq!(required_role(path).map(|(_, r)| r), want, "{path}");
        }
    }

    #[test]
    fn open_policy_and_health_need_no_certificate_but_control_calls_do() {
        let policy = Policy::Certificates {
            admins: pats(&["a"]),
            readers: Vec::new(),
        };
        assert!(policy.check("/grpc.health.v1.Health/Check", None).is_ok());
        let err = policy
            .check("/ember.control.v1.EmberControl/ListVolumes", None)
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(
            Policy::Open
                .check("/ember.control.v1.EmberControl/DeleteVolume", None)
                .is_ok()
        );
    }

    #[test]
    fn names_come_from_a_real_certificate_and_decide_the_call() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec![
            "node7.monitor.example".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Node 7");
        let der = params.self_signed(&key).expect("cert").der().to_vec();
        let who = ClientIdentity::from_der(&der).expect("parses");
        assert_eq!(who.common_names, ["Node 7"]);
        assert_eq!(
            who.dns_names,
            ["node7.monitor.example"],
            "IP SANs are not names"
        );
        let policy = Policy::Certificates {
            admins: pats(&["node7-admin"]),
            readers: pats(&["*.monitor.example"]),
        };
        let chain = [der];
        assert!(
            policy
                .check("/ember.control.v1.EmberControl/WatchEvents", Some(&chain))
                .is_ok()
        );
        let denied = policy
            .check(
                "/ember.control.v1.EmberControl/PromoteReplica",
                Some(&chain),
            )
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied
                .message()
                .contains("PromoteReplica needs the admin role")
                && denied.message().contains("CN=Node 7")
                && denied.message().contains("has the reader role"),
            "{}",
            denied.message()
        );
        let garbage = policy
            .check(
                "/ember.control.v1.EmberControl/ListVolumes",
                Some(&[vec![1, 2, 3]]),
            )
            .unwrap_err();
        assert_eq!(garbage.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn every_rpc_of_the_control_service_has_exactly_one_role() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(ember_proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let service = set
            .file
            .iter()
            .filter(|f| f.package() == "ember.control.v1")
            .flat_map(|f| &f.service)
            .find(|s| s.name() == "EmberControl")
            .expect("EmberControl in the descriptor");
        let methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
        assert!(methods.len() > 30, "descriptor lists the RPCs: {methods:?}");
        for m in &methods {
            let n = METHOD_ROLES.iter().filter(|(t, _)| t == m).count();
            assert_eq!(n, 1, "RPC {m} needs exactly one entry in METHOD_ROLES");
        }
        for (t, _) in METHOD_ROLES {
            assert!(
                methods.contains(t),
                "METHOD_ROLES lists {t}, not in the proto"
            );
        }
    }
}
