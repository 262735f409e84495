//! Agent configuration: a TOML file overridden by flags. Only `emberd`
//! reads configuration; libraries take typed sub-configs.

use std::net::SocketAddr;
use std::path::PathBuf;

use ember_common::parse_size;
use ember_storage::EngineChoice;
use ember_tracking::TrackingConfig;
use serde::Deserialize;

/// Where the control API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiEndpoint {
    /// `unix:/path` — the default; the socket is created mode 0600.
    Unix(PathBuf),
    /// `http://host:port` (TLS when `[api_tls]` is configured).
    Tcp(SocketAddr),
}

impl ApiEndpoint {
    /// Parses `unix:/path` or `http://host:port` / `https://host:port`.
    ///
    /// # Errors
    /// A message naming the accepted forms.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if let Some(path) = raw.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: endpoint needs a path".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let hostport = raw
            .strip_prefix("http://")
            .or_else(|| raw.strip_prefix("https://"))
            .ok_or_else(|| {
                format!("API endpoint {raw:?} must be unix:/path or http://host:port")
            })?;
        hostport
            .trim_end_matches('/')
            .parse()
            .map(Self::Tcp)
            .map_err(|e| format!("API endpoint {raw:?}: {e}"))
    }
}

/// `[tracking]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingSection {
    /// Turn change tracking off (benchmarks only: a crash then needs a full resync).
    pub enabled: bool,
    /// Default bitmap granularity, e.g. "64K".
    pub granularity: String,
    /// Activity-log extent size, e.g. "4M".
    pub al_extent: String,
    /// Hot extents kept in the activity log.
    pub al_extents: usize,
}

impl Default for TrackingSection {
    fn default() -> Self {
        let d = TrackingConfig::default();
        Self {
            enabled: true,
            granularity: format!("{}K", d.granularity_bytes / 1024),
            al_extent: format!("{}M", d.al_extent_bytes >> 20),
            al_extents: d.al_extents,
        }
    }
}

/// `[api_tls]` section: serve the TCP API over TLS, optionally requiring
/// client certificates signed by `client_ca`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTls {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle; when set, clients must present a certificate.
    pub client_ca: Option<PathBuf>,
    /// Certificate name patterns (subject CN or SAN DNS, `*` wildcard) of
    /// callers allowed every RPC. With `readers` also empty, every
    /// certificate `client_ca` signed is admin (docs/security.md).
    #[serde(default)]
    pub admins: Vec<String>,
    /// Certificate name patterns of callers allowed only the read-only RPCs
    /// (status, list, show, WatchEvents).
    #[serde(default)]
    pub readers: Vec<String>,
}

/// `[peer]` section: the replication listener and its mutual-TLS material.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    /// `host:port` the peer listener binds.
    pub listen: String,
    /// PEM certificate of this agent (server and client auth).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA that signs every paired site's certificate.
    pub ca: PathBuf,
}

/// `[[raw_volume]]`: a volume backed by a raw block device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVolumeSection {
    /// Volume (and NBD export) name.
    pub name: String,
    /// Block device path, e.g. `/dev/disk/by-id/...`.
    pub device: PathBuf,
}

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where volumes and tracking state live.
    pub data_dir: PathBuf,
    /// Control API endpoint; default `unix:<data_dir>/api.sock`.
    pub api: Option<String>,
    /// NBD TCP listener, `host:port`.
    pub nbd: String,
    /// Optional NBD Unix-socket listener path.
    pub nbd_unix: Option<PathBuf>,
    /// Host clients should use in NBD URIs when `nbd` binds a wildcard.
    pub nbd_advertise_host: Option<String>,
    /// NBD over TLS with client certificates (docs/security.md); required
    /// for a non-loopback `nbd` unless `nbd_insecure`.
    pub nbd_tls: Option<crate::nbd_policy::NbdTlsSection>,
    /// Serve plaintext NBD on a non-loopback address anyway (a trusted
    /// storage network); logged at WARN.
    pub nbd_insecure: bool,
    /// "auto", "io_uring" or "blocking".
    pub io_engine: String,
    /// Most NBD connections served at once.
    pub max_nbd_connections: usize,
    /// Change tracking.
    pub tracking: TrackingSection,
    /// TLS for a TCP control API.
    pub api_tls: Option<ApiTls>,
    /// Volumes on raw block devices.
    #[serde(rename = "raw_volume")]
    pub raw_volumes: Vec<RawVolumeSection>,
    /// This agent's site name, as peers know it.
    pub site: String,
    /// Peer listener for replication (mutual TLS); absent: no pairing.
    pub peer: Option<PeerSection>,
    /// Prometheus `/metrics` listener, `host:port`; absent: none.
    pub metrics: Option<String>,
    /// Space the recovery points of every secondary in the data dir may
    /// pin (blocks overwritten since a point), e.g. "200G"; past it the
    /// oldest scheduled points expire. Absent: 20 % of the data dir's
    /// file system (docs/points.md).
    pub points_space_cap: Option<String>,
    /// One memory budget for every replication journal, staging copy and
    /// stream buffer of this agent, e.g. "1G". Absent: 1/8 of RAM, at most
    /// 1 GiB (docs/operations.md, "Replication memory").
    pub replication_memory: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/ember"),
            api: None,
            nbd: "127.0.0.1:10809".into(),
            nbd_unix: None,
            nbd_advertise_host: None,
            nbd_tls: None,
            nbd_insecure: false,
            io_engine: "auto".into(),
            max_nbd_connections: 4096,
            tracking: TrackingSection::default(),
            api_tls: None,
            raw_volumes: Vec::new(),
            site: "local".into(),
            peer: None,
            metrics: None,
            points_space_cap: None,
            replication_memory: None,
        }
    }
}

impl Config {
    /// Parses a TOML document.
    ///
    /// # Errors
    /// Unknown keys and type errors, with their location.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The control API endpoint after defaults.
    ///
    /// # Errors
    /// A malformed endpoint string.
    pub fn api_endpoint(&self) -> Result<ApiEndpoint, String> {
        match &self.api {
            Some(raw) => ApiEndpoint::parse(raw),
            None => Ok(ApiEndpoint::Unix(self.data_dir.join("api.sock"))),
        }
    }

    /// The recovery points' space cap in bytes (`None`: the default share
    /// of the file system).
    ///
    /// # Errors
    /// A malformed size.
    pub fn points_space_cap_bytes(&self) -> Result<Option<u64>, String> {
        self.points_space_cap
            .as_deref()
            .map(|raw| parse_size(raw).map_err(|e| format!("points_space_cap {raw:?}: {e}")))
            .transpose()
    }

    /// The replication memory budget in bytes: `replication_memory`, or
    /// the default for this host's RAM ([`ember_repl::default_budget`]).
    ///
    /// # Errors
    /// A malformed size, or one below [`ember_repl::MIN_BUDGET`].
    pub fn replication_memory_bytes(&self) -> Result<u64, String> {
        let Some(raw) = self.replication_memory.as_deref() else {
            return Ok(ember_repl::default_budget(physical_memory()));
        };
        let bytes = parse_size(raw).map_err(|e| format!("replication_memory {raw:?}: {e}"))?;
        if bytes < ember_repl::MIN_BUDGET {
            return Err(format!(
                "replication_memory {raw:?} is below the minimum of {} MiB",
                ember_repl::MIN_BUDGET >> 20
            ));
        }
        Ok(bytes)
    }

    /// The I/O engine choice.
    ///
    /// # Errors
    /// An unknown engine name.
    pub fn engine_choice(&self) -> Result<EngineChoice, String> {
        match self.io_engine.as_str() {
            "auto" => Ok(EngineChoice::Auto),
            "io_uring" | "uring" => Ok(EngineChoice::Uring),
            "blocking" => Ok(EngineChoice::Blocking),
            other => Err(format!(
                "io_engine {other:?} must be auto, io_uring or blocking"
            )),
        }
    }

    /// Tracking parameters, or `None` when disabled.
    ///
    /// # Errors
    /// Unparseable sizes or inconsistent values.
    pub fn tracking_config(&self) -> Result<Option<TrackingConfig>, String> {
        if !self.tracking.enabled {
            return Ok(None);
        }
        let t = TrackingConfig {
            granularity_bytes: parse_size(&self.tracking.granularity)
                .map_err(|e| format!("tracking.granularity: {e}"))?,
            al_extent_bytes: parse_size(&self.tracking.al_extent)
                .map_err(|e| format!("tracking.al_extent: {e}"))?,
            al_extents: self.tracking.al_extents,
        };
        t.validate().map_err(|e| format!("[tracking]: {e}"))?;
        Ok(Some(t))
    }

    /// Raw-device volumes with validated names and no duplicates.
    ///
    /// # Errors
    /// A bad or repeated name, or a device path that is not absolute.
    pub fn raw_volumes(&self) -> Result<Vec<ember_volume::RawVolume>, String> {
        let mut out: Vec<ember_volume::RawVolume> = Vec::new();
        for raw in &self.raw_volumes {
            let name = ember_common::VolumeName::new(raw.name.clone())
                .map_err(|e| format!("[[raw_volume]] name {:?}: {e}", raw.name))?;
            if !raw.device.is_absolute() {
                return Err(format!(
                    "[[raw_volume]] {name}: device {} must be an absolute path",
                    raw.device.display()
                ));
            }
            if out.iter().any(|r| r.name == name || r.device == raw.device) {
                return Err(format!(
                    "[[raw_volume]] {name}: name or device listed twice"
                ));
            }
            out.push(ember_volume::RawVolume {
                name,
                device: raw.device.clone(),
            });
        }
        Ok(out)
    }

    /// Mutual-TLS material of the peer listener, when configured.
    pub fn peer_tls(&self) -> Option<ember_repl::PeerTls> {
        self.peer.as_ref().map(|p| ember_repl::PeerTls {
            cert: p.cert.clone(),
            key: p.key.clone(),
            ca: p.ca.clone(),
        })
    }

    /// Checks everything that can be checked before binding anything.
    ///
    /// # Errors
    /// The first problem found, in words an operator can act on.
    pub fn validate(&self) -> Result<(), String> {
        self.points_space_cap_bytes()?;
        self.replication_memory_bytes()?;
        self.api_endpoint()?;
        self.engine_choice()?;
        self.tracking_config()?;
        self.raw_volumes()?;
        ember_common::VolumeName::new(self.site.clone())
            .map_err(|e| format!("site {:?}: {e}", self.site))?;
        if let Some(peer) = &self.peer {
            if peer.listen.parse::<SocketAddr>().is_err() {
                return Err(format!(
                    "[peer] listen {:?} must be host:port with a numeric host",
                    peer.listen
                ));
            }
            self.peer_tls()
                .expect("peer section present")
                .validate()
                .map_err(|e| format!("[peer]: {e}"))?;
        }
        if self.nbd.parse::<SocketAddr>().is_err() {
            return Err(format!(
                "nbd {:?} must be host:port with a numeric host, e.g. 127.0.0.1:10809",
                self.nbd
            ));
        }
        if self.max_nbd_connections == 0 {
            return Err("max_nbd_connections must be at least 1".into());
        }
        // NBD off loopback needs TLS or an explicit opt-out (nbd_policy.rs).
        if let Ok(addr) = self.nbd.parse::<SocketAddr>() {
            crate::nbd_policy::check_nbd_listener(
                addr.ip(),
                self.nbd_tls.is_some(),
                self.nbd_insecure,
            )?;
        }
        if let Some(tls) = &self.nbd_tls {
            tls.load()?;
        }
        if self.api_tls.is_some() && matches!(self.api_endpoint()?, ApiEndpoint::Unix(_)) {
            return Err("[api_tls] needs a TCP api endpoint (http://host:port)".into());
        }
        // Who may reach the API and who may call what (issue 15).
        crate::listen_policy::check_api_listener(crate::listen_policy::ApiListener::of(
            &self.api_endpoint()?,
            self.api_tls.as_ref(),
        ))?;
        crate::authz::Policy::from_config(self.api_tls.as_ref())?;
        Ok(())
    }
}

/// This host's RAM in bytes (0 when unknown: the budget's minimum applies).
fn physical_memory() -> u64 {
    // SAFETY: sysconf reads system constants and has no preconditions.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    u64::try_from(pages)
        .unwrap_or(0)
        .saturating_mul(u64::try_from(page).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_a_reason() {
        assert!(
            Config::from_toml("datadir = \"/x\"")
                .unwrap_err()
                .contains("unknown field")
        );
        let c = Config::from_toml("io_engine = \"fast\"").expect("parses");
        assert!(c.validate().unwrap_err().contains("io_engine"));
        let c = Config::from_toml("[tracking]\ngranularity = \"3K\"").expect("parses");
        assert!(c.validate().unwrap_err().contains("granularity"));
    }

    #[test]
    fn replication_memory_parses_and_refuses_tiny_budgets() {
        let c = Config::from_toml("replication_memory = \"64M\"").expect("parses");
        assert_eq!(c.replication_memory_bytes(), Ok(64 << 20));
        let c = Config::from_toml("replication_memory = \"1M\"").expect("parses");
        assert!(c.validate().unwrap_err().contains("replication_memory"));
        let c = Config::from_toml("replication_memory = \"lots\"").expect("parses");
        assert!(c.validate().unwrap_err().contains("replication_memory"));
        let d = Config::default()
            .replication_memory_bytes()
            .expect("default");
        assert!((ember_repl::MIN_BUDGET..=ember_repl::DEFAULT_BUDGET_CAP).contains(&d));
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            ApiEndpoint::parse("unix:/run/e.sock"),
            Ok(ApiEndpoint::Unix("/run/e.sock".into()))
        );
        assert!(matches!(
            ApiEndpoint::parse("http://127.0.0.1:7000"),
            Ok(ApiEndpoint::Tcp(_))
        ));
        assert!(ApiEndpoint::parse("tcp:1").is_err());
    }
}
