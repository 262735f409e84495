//! Paired peers: persisted in `DATA/peers.json`, paired by Hello over
//! mutual TLS, measured (RTT by pings, throughput by a sink stream).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_proto::repl::v1 as pb;
use ember_proto::repl::v1::ember_peer_client::EmberPeerClient;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::error::{ReplError, Result};
use crate::service::Identity;
use crate::tls::PeerTls;
use crate::version::ProtocolVersion;

/// Pings per RTT measurement; the median is reported.
const RTT_PINGS: usize = 5;
/// Default bytes streamed for a throughput measurement.
const DEFAULT_MEASURE_BYTES: u64 = 16 << 20;
/// Chunk size of the throughput stream.
const SINK_CHUNK: usize = 256 * 1024;
/// Connecting (TCP + TLS) to a peer gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A peer as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PeerRecord {
    site: String,
    address: String,
    backend_id: String,
    protocol_version: u32,
    capabilities: Vec<String>,
    added_at_unix: i64,
    #[serde(default)]
    throughput_bytes_per_sec: u64,
    #[serde(default)]
    rates: LinkRates,
}

/// Bandwidth limits of a link, bytes per second (0: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LinkRates {
    /// Everything replication sends to this peer.
    pub max_bytes_per_sec: u64,
    /// Resync traffic (initial sync, catch-up) alone; keeps headroom for
    /// the stream of new writes.
    pub resync_bytes_per_sec: u64,
}

/// Reachability of a peer at the last probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Hello/Ping answered.
    Connected,
    /// Connection or TLS failed.
    Unreachable,
}

impl PeerState {
    /// Lower-case name for the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Unreachable => "unreachable",
        }
    }
}

/// A link measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkMeasurement {
    /// Median round trip of small pings, microseconds.
    pub rtt_us: u64,
    /// Bulk throughput, bytes per second (0 when not measured).
    pub throughput_bytes_per_sec: u64,
}

/// A peer with its current state, for the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Site name.
    pub site: String,
    /// `host:port` of its peer listener.
    pub address: String,
    /// Its backend id (learned at pairing).
    pub backend_id: String,
    /// Negotiated protocol version.
    pub protocol_version: u32,
    /// Its capabilities.
    pub capabilities: Vec<String>,
    /// When it was paired.
    pub added_at_unix: i64,
    /// Last measurement.
    pub link: LinkMeasurement,
    /// Reachability at the last probe.
    pub state: PeerState,
    /// Why it is unreachable, if it is.
    pub last_error: String,
    /// Bandwidth limits.
    pub rates: LinkRates,
}

impl PeerInfo {
    fn from_record(r: &PeerRecord, rtt_us: u64, state: PeerState, last_error: String) -> Self {
        Self {
            site: r.site.clone(),
            address: r.address.clone(),
            backend_id: r.backend_id.clone(),
            protocol_version: r.protocol_version,
            capabilities: r.capabilities.clone(),
            added_at_unix: r.added_at_unix,
            link: LinkMeasurement {
                rtt_us,
                throughput_bytes_per_sec: r.throughput_bytes_per_sec,
            },
            state,
            last_error,
            rates: r.rates,
        }
    }
}

/// The paired peers of this agent.
#[derive(Debug)]
pub struct PeerRegistry {
    path: PathBuf,
    tls: Option<PeerTls>,
    identity: Identity,
    peers: tokio::sync::Mutex<BTreeMap<String, PeerRecord>>,
}

/// Flattens an error and its sources into one line for operators.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl PeerRegistry {
    /// Loads `DATA/peers.json` (absent means no peers).
    ///
    /// # Errors
    /// An unreadable or corrupt peer list.
    pub fn open(data_dir: &Path, tls: Option<PeerTls>, identity: Identity) -> Result<Self> {
        let path = data_dir.join("peers.json");
        let peers = match std::fs::read(&path) {
            Ok(body) => {
                let list: Vec<PeerRecord> =
                    serde_json::from_slice(&body).map_err(|e| ReplError::Io {
                        path: path.clone(),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                    })?;
                list.into_iter().map(|r| (r.site.clone(), r)).collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(ReplError::Io { path, source }),
        };
        Ok(Self {
            path,
            tls,
            identity,
            peers: tokio::sync::Mutex::new(peers),
        })
    }

    /// This agent's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    fn persist(&self, peers: &BTreeMap<String, PeerRecord>) -> Result<()> {
        let io = |source| ReplError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&peers.values().collect::<Vec<_>>())
            .expect("peer records serialize");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&body).and_then(|()| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        let dir = self
            .path
            .parent()
            .expect("peers.json lives in the data dir");
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }

    async fn connect(&self, site: &str, address: &str) -> Result<EmberPeerClient<Channel>> {
        self.connect_with(site, address, Some(Duration::from_secs(60)))
            .await
    }

    async fn record(&self, site: &str) -> Result<PeerRecord> {
        self.peers
            .lock()
            .await
            .get(site)
            .cloned()
            .ok_or_else(|| ReplError::NotFound(format!("site {site} is not paired")))
    }

    /// The backend id `site` had at pairing (no connection made).
    pub(crate) async fn backend_id(&self, site: &str) -> Option<String> {
        self.record(site).await.ok().map(|r| r.backend_id)
    }

    /// A client for long-lived replication streams: no per-request timeout,
    /// HTTP/2 keepalive pings so a dead link is noticed within seconds.
    pub(crate) async fn stream_client(
        &self,
        site: &str,
    ) -> Result<(EmberPeerClient<Channel>, u32, LinkRates)> {
        let record = self.record(site).await?;
        let client = self.connect_with(site, &record.address, None).await?;
        Ok((client, record.protocol_version, record.rates))
    }

    /// A client for one-off calls to `site` (60 s per request) and the
    /// site's backend id and negotiated protocol version.
    pub(crate) async fn call_client(
        &self,
        site: &str,
    ) -> Result<(EmberPeerClient<Channel>, String, u32)> {
        let record = self.record(site).await?;
        let client = self.connect(site, &record.address).await?;
        Ok((client, record.backend_id, record.protocol_version))
    }

    /// The paired peer `site`: its negotiated protocol version and rates.
    pub(crate) async fn peer(&self, site: &str) -> Option<(u32, LinkRates)> {
        self.peers
            .lock()
            .await
            .get(site)
            .map(|r| (r.protocol_version, r.rates))
    }

    async fn connect_with(
        &self,
        site: &str,
        address: &str,
        request_timeout: Option<Duration>,
    ) -> Result<EmberPeerClient<Channel>> {
        let tls = self.tls.as_ref().ok_or(ReplError::NotConfigured)?;
        let host = address
            .rsplit_once(':')
            .map_or(address, |(h, _)| h)
            .trim_matches(['[', ']']);
        let unreachable = |reason: String| ReplError::Unreachable {
            site: site.to_owned(),
            address: address.to_owned(),
            reason,
        };
        let endpoint = Endpoint::from_shared(format!("https://{address}"))
            .map_err(|e| unreachable(chain(&e)))?
            .tls_config(tls.client_config(host)?)
            .map_err(|e| unreachable(chain(&e)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(crate::listener::STREAM_WINDOW)
            .initial_connection_window_size(crate::listener::CONNECTION_WINDOW)
            .tcp_nodelay(true);
        let endpoint = match request_timeout {
            Some(t) => endpoint.timeout(t),
            None => endpoint,
        };
        let channel = endpoint.connect().await.map_err(|e| {
            let mut reason = chain(&e);
            if reason.contains("invalid peer certificate") {
                reason.push_str(" (the peer's certificate is not signed by this agent's peer CA)");
            } else if reason.contains("received fatal alert") {
                reason.push_str(
                    " (the peer rejected this agent's certificate: it trusts a different CA)",
                );
            }
            tracing::warn!(peer = %site, %address, error = %reason, "cannot connect to peer");
            unreachable(reason)
        })?;
        Ok(EmberPeerClient::new(channel)
            .max_decoding_message_size(crate::listener::MAX_MESSAGE)
            .max_encoding_message_size(crate::listener::MAX_MESSAGE))
    }

    async fn hello(
        &self,
        client: &mut EmberPeerClient<Channel>,
        site: &str,
        address: &str,
    ) -> Result<pb::HelloResponse> {
        let resp = client
            .hello(self.identity.hello_request())
            .await
            .map_err(|status| {
                // A TLS rejection by the peer surfaces here, on the first call.
                tracing::warn!(peer = %site, %address, error = %status, "peer refused hello");
                ReplError::Refused {
                    site: site.to_owned(),
                    call: "Hello",
                    status,
                }
            })?
            .into_inner();
        if resp.site != site {
            return Err(ReplError::WrongSite {
                address: address.to_owned(),
                expected: site.to_owned(),
                actual: resp.site,
            });
        }
        if !ProtocolVersion::SUPPORTED.contains(&resp.protocol_version) {
            return Err(ReplError::VersionMismatch {
                site: site.to_owned(),
                theirs: resp.supported_versions,
                ours: ProtocolVersion::SUPPORTED.to_vec(),
            });
        }
        Ok(resp)
    }

    async fn rtt(client: &mut EmberPeerClient<Channel>, site: &str) -> Result<u64> {
        let mut samples = Vec::with_capacity(RTT_PINGS);
        for _ in 0..RTT_PINGS {
            let started = Instant::now();
            client
                .ping(pb::PingRequest {
                    payload: vec![0u8; 64],
                })
                .await
                .map_err(|status| ReplError::Refused {
                    site: site.to_owned(),
                    call: "Ping",
                    status,
                })?;
            samples.push(started.elapsed().as_micros() as u64);
        }
        samples.sort_unstable();
        Ok(samples[samples.len() / 2].max(1))
    }

    async fn throughput(
        client: &mut EmberPeerClient<Channel>,
        site: &str,
        bytes: u64,
    ) -> Result<u64> {
        let chunks = bytes.div_ceil(SINK_CHUNK as u64);
        // One buffer shared by every chunk (`Bytes` clones are references).
        let chunk = bytes::Bytes::from(vec![0x5a; SINK_CHUNK]);
        let stream = tokio_stream::iter((0..chunks).map(move |_| pb::SinkChunk {
            data: chunk.clone(),
        }));
        let started = Instant::now();
        let summary = client
            .sink(stream)
            .await
            .map_err(|status| ReplError::Refused {
                site: site.to_owned(),
                call: "Sink",
                status,
            })?
            .into_inner();
        let secs = started.elapsed().as_secs_f64().max(1e-6);
        Ok((summary.bytes as f64 / secs) as u64)
    }

    /// Pairs with `site` at `address`: Hello, then RTT and throughput.
    /// Idempotent for the same site and address (re-measures).
    ///
    /// # Errors
    /// Bad arguments, a site paired elsewhere, unreachable or refusing peers.
    pub async fn add(
        &self,
        site: &str,
        address: &str,
        measure_bytes: u64,
        rates: LinkRates,
    ) -> Result<(PeerInfo, bool)> {
        ember_common::VolumeName::new(site)
            .map_err(|e| ReplError::InvalidArgument(format!("site name {site:?}: {e}")))?;
        let port_ok = address
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !port_ok {
            return Err(ReplError::InvalidArgument(format!(
                "peer address {address:?} must be host:port"
            )));
        }
        if site == self.identity.site {
            return Err(ReplError::InvalidArgument(format!(
                "{site} is this agent's own site name"
            )));
        }
        let mut peers = self.peers.lock().await;
        let created = match peers.get(site) {
            Some(existing) if existing.address != address => {
                return Err(ReplError::AlreadyPaired {
                    site: site.to_owned(),
                    address: existing.address.clone(),
                });
            }
            Some(_) => false,
            None => true,
        };
        let mut client = self.connect(site, address).await?;
        let hello = self.hello(&mut client, site, address).await?;
        let rtt_us = Self::rtt(&mut client, site).await?;
        let bytes = if measure_bytes == 0 {
            DEFAULT_MEASURE_BYTES
        } else {
            measure_bytes
        };
        let throughput = Self::throughput(&mut client, site, bytes).await?;
        let record = PeerRecord {
            site: site.to_owned(),
            address: address.to_owned(),
            backend_id: hello.backend_id,
            protocol_version: hello.protocol_version,
            capabilities: hello.capabilities,
            added_at_unix: peers.get(site).map_or_else(now_unix, |r| r.added_at_unix),
            throughput_bytes_per_sec: throughput,
            rates,
        };
        let mut next = peers.clone();
        next.insert(site.to_owned(), record.clone());
        self.persist(&next)?;
        *peers = next;
        tracing::info!(peer = %site, %address, backend_id = %record.backend_id, rtt_us, throughput_bytes_per_sec = throughput, "peer paired");
        Ok((
            PeerInfo::from_record(&record, rtt_us, PeerState::Connected, String::new()),
            created,
        ))
    }

    /// Every peer, each probed now (Hello + pings) for state and RTT.
    pub async fn list(&self) -> Vec<PeerInfo> {
        let records: Vec<PeerRecord> = self.peers.lock().await.values().cloned().collect();
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            let probe = async {
                let mut client = self.connect(&r.site, &r.address).await?;
                self.hello(&mut client, &r.site, &r.address).await?;
                Self::rtt(&mut client, &r.site).await
            };
            out.push(match probe.await {
                Ok(rtt) => PeerInfo::from_record(&r, rtt, PeerState::Connected, String::new()),
                Err(e) => PeerInfo::from_record(&r, 0, PeerState::Unreachable, e.to_string()),
            });
        }
        out
    }

    /// Forgets a peer; false when it was not paired.
    ///
    /// # Errors
    /// Persisting the list failed.
    pub async fn remove(&self, site: &str) -> Result<bool> {
        let mut peers = self.peers.lock().await;
        if !peers.contains_key(site) {
            return Ok(false);
        }
        let mut next = peers.clone();
        next.remove(site);
        self.persist(&next)?;
        *peers = next;
        tracing::info!(peer = %site, "peer removed");
        Ok(true)
    }
}
