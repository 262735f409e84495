//! [`run`]: builds the store, binds NBD and API listeners, serves until the
//! shutdown future resolves, then drains.
//!
//! Shutdown order (why): stop accepting API calls and NBD clients → let
//! in-flight NBD requests finish (they were admitted, clients wait for
//! their replies) → flush data and persist tracking state (a clean point:
//! restart needs no activity-log replay) → return.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use ember_nbd::{NbdServer, ServerLimits};
use ember_proto::control::v1::ember_control_server::EmberControlServer;
use ember_storage::IoEngine;
use ember_volume::{StoreConfig, VolumeStore};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::{ApiEndpoint, Config};
use crate::control::{ControlService, NbdAddress};
use crate::registry::StoreRegistry;

/// Pre-bound listeners (tests bind port 0 themselves); `None` binds from config.
#[derive(Debug, Default)]
pub struct Listeners {
    /// NBD TCP listener.
    pub nbd: Option<TcpListener>,
}

/// Runs the agent until `shutdown` resolves.
///
/// # Errors
/// Invalid configuration, unusable data dir, listeners that cannot bind.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    config
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    let engine =
        IoEngine::new(config.engine_choice().map_err(anyhow::Error::msg)?).context("I/O engine")?;
    tracing::info!(io_engine = engine.name(), "I/O engine selected");
    let tracking = config.tracking_config().map_err(anyhow::Error::msg)?;
    if tracking.is_none() {
        tracing::warn!(
            "change tracking is OFF: after a crash, replication would need a full resync"
        );
    }
    let data_dir = config.data_dir.clone();
    let raw_volumes = config.raw_volumes().map_err(anyhow::Error::msg)?;
    let store = Arc::new(
        tokio::task::spawn_blocking(move || {
            VolumeStore::open(
                StoreConfig {
                    root: data_dir,
                    tracking,
                    raw_volumes,
                },
                engine,
            )
        })
        .await
        .context("store open task")?
        .with_context(|| format!("opening data dir {}", config.data_dir.display()))?,
    );

    let identity = ember_repl::Identity {
        site: config.site.clone(),
        backend_id: store.backend_id().to_owned(),
        capabilities: vec![
            "nbd".into(),
            "dirty-tracking".into(),
            "snapshots".into(),
            "replication".into(),
        ],
    };
    let peers = Arc::new(
        ember_repl::PeerRegistry::open(&config.data_dir, config.peer_tls(), identity.clone())
            .context("loading the peer list")?,
    );
    // One replication memory budget for every journal and staging copy,
    // set before any is opened (issue 15).
    ember_repl::memory_budget().set_total(
        config
            .replication_memory_bytes()
            .map_err(anyhow::Error::msg)?,
    );
    ember_repl::give_memory_back();
    // Secondaries first: their volumes must refuse client writes before
    // the NBD listener opens, and a crash's committed batch is replayed.
    let secondaries = Arc::new(
        ember_repl::SecondarySet::open(&config.data_dir, store.clone())
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))
            .context("loading secondaries")?,
    );
    if let Some(cap) = config
        .points_space_cap_bytes()
        .map_err(anyhow::Error::msg)?
    {
        secondaries.set_points_space_cap(cap);
    }
    let replication = Arc::new(
        ember_repl::Replication::open(
            &config.data_dir,
            store.clone(),
            peers.clone(),
            secondaries.clone(),
            identity.clone(),
            faults(),
        )
        .context("loading replicas")?,
    );
    // Common marks and re-homing after a forced promotion (issue 14).
    replication.start_background();

    let nbd_listener = match listeners.nbd {
        Some(l) => l,
        None => TcpListener::bind(&config.nbd)
            .await
            .with_context(|| format!("binding NBD listener {}", config.nbd))?,
    };
    let nbd_local: SocketAddr = nbd_listener.local_addr()?;
    // The start-time rule again on the bound address (a pre-bound listener
    // skips config.validate()'s view of it); see nbd_policy.rs.
    let exposure = crate::nbd_policy::check_nbd_listener(
        nbd_local.ip(),
        config.nbd_tls.is_some(),
        config.nbd_insecure,
    )
    .map_err(anyhow::Error::msg)?;
    if exposure == crate::nbd_policy::NbdExposure::Insecure {
        tracing::warn!(nbd = %nbd_local, "nbd_insecure = true: plaintext NBD off loopback; anyone reaching this port can read and write every volume");
    }
    let nbd_tls = config
        .nbd_tls
        .as_ref()
        .map(crate::nbd_policy::NbdTlsSection::load)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let advertise = config
        .nbd_advertise_host
        .clone()
        .unwrap_or_else(|| match nbd_local.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
            ip => ip.to_string(),
        });
    let nbd_address = NbdAddress::Tcp {
        host: advertise,
        port: nbd_local.port(),
        tls: nbd_tls.is_some(),
    };

    let cancel = CancellationToken::new();
    let limits = ServerLimits {
        max_connections: config.max_nbd_connections,
        ..ServerLimits::default()
    };
    let nbd_tls_on = nbd_tls.is_some();
    let nbd = NbdServer::with_tls(
        Arc::new(StoreRegistry(store.clone())),
        limits,
        nbd_tls,
        cancel.child_token(),
    );
    let mut nbd_tasks = vec![tokio::spawn(nbd.clone().serve_tcp(nbd_listener))];
    if let Some(path) = &config.nbd_unix {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)
            .with_context(|| format!("binding NBD socket {}", path.display()))?;
        nbd_tasks.push(tokio::spawn(nbd.clone().serve_unix(l)));
    }
    tracing::info!(nbd = %nbd_local, nbd_tls = nbd_tls_on, nbd_unix = ?config.nbd_unix, "NBD listening");

    let mut peer_task = None;
    let mut peer_address = None;
    if let (Some(section), Some(tls)) = (&config.peer, config.peer_tls()) {
        let listener = TcpListener::bind(&section.listen)
            .await
            .with_context(|| format!("binding peer listener {}", section.listen))?;
        let local = listener.local_addr()?;
        tracing::info!(peer_listen = %local, site = %config.site, "peer listener (mutual TLS) ready");
        peer_address = Some(local.to_string());
        let server_tls = tls.server_config().context("peer TLS")?;
        peer_task = Some(tokio::spawn(ember_repl::serve_peers(
            listener,
            server_tls,
            ember_repl::PeerService::with_replication(identity, replication.clone()),
            cancel.child_token(),
        )));
    }

    let mut metrics_task = None;
    if let Some(addr) = &config.metrics {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics listener {addr}"))?;
        tracing::info!(metrics = %listener.local_addr()?, "Prometheus metrics at /metrics");
        metrics_task = Some(tokio::spawn(crate::metrics::serve(
            listener,
            store.clone(),
            replication.clone(),
            cancel.child_token(),
        )));
    }

    let control = ControlService {
        store: store.clone(),
        nbd: nbd_address,
        peers,
        replication: replication.clone(),
        site: config.site.clone(),
        peer_address,
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<EmberControlServer<ControlService>>()
        .await;
    let api_cancel = cancel.clone();
    let api = match config.api_endpoint().map_err(anyhow::Error::msg)? {
        ApiEndpoint::Unix(path) => {
            let listener = bind_private_socket(&path)?;
            tracing::info!(api = %format!("unix:{}", path.display()), "control API listening");
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            tokio::spawn(
                Server::builder()
                    .add_service(health)
                    .add_service(EmberControlServer::new(control))
                    .serve_with_incoming_shutdown(incoming, api_cancel.cancelled_owned()),
            )
        }
        ApiEndpoint::Tcp(addr) => {
            let mut builder = Server::builder();
            if let Some(tls) = &config.api_tls {
                builder = builder
                    .tls_config(tls_config(tls)?)
                    .context("API TLS configuration")?;
            }
            // Roles from client certificates (authz.rs); config.validate()
            // already checked the policy, so this cannot fail here.
            let policy = crate::authz::Policy::from_config(config.api_tls.as_ref())
                .map_err(anyhow::Error::msg)?;
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding API {addr}"))?;
            tracing::info!(api = %addr, tls = config.api_tls.is_some(), authz = ?policy, "control API listening");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            tokio::spawn(
                builder
                    .layer(crate::authz::AuthzLayer::new(policy))
                    .add_service(health)
                    .add_service(EmberControlServer::new(control))
                    .serve_with_incoming_shutdown(incoming, api_cancel.cancelled_owned()),
            )
        }
    };

    tracing::info!(backend_id = store.backend_id(), "emberd ready");
    shutdown.await;
    tracing::info!("shutting down: draining NBD I/O");
    cancel.cancel();
    for t in nbd_tasks {
        let _ = t.await;
    }
    nbd.drained().await;
    if let Some(t) = peer_task {
        finish_server("peer listener", t).await;
    }
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    replication.shutdown().await;
    store.shutdown().await;
    finish_server("control API", api).await;
    if let Some(path) = &config.nbd_unix {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("emberd stopped cleanly");
    Ok(())
}

/// How long gRPC servers get to finish in-flight calls at shutdown. Idle
/// client connections (a CLI's live view) would otherwise hold a graceful
/// shutdown open forever.
const SERVER_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits for a gRPC server task to drain, aborting it after [`SERVER_DRAIN`].
async fn finish_server(
    what: &'static str,
    mut task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    match tokio::time::timeout(SERVER_DRAIN, &mut task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, server = what, "server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, server = what, "server task failed"),
        Err(_) => {
            tracing::warn!(
                server = what,
                drain_secs = SERVER_DRAIN.as_secs(),
                "clients still connected; closing them"
            );
            task.abort();
        }
    }
}

/// Binds a Unix socket readable and writable only by its owner.
fn bind_private_socket(path: &PathBuf) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by a running agent", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

fn tls_config(tls: &crate::config::ApiTls) -> anyhow::Result<ServerTlsConfig> {
    let cert =
        std::fs::read(&tls.cert).with_context(|| format!("reading {}", tls.cert.display()))?;
    let key = std::fs::read(&tls.key).with_context(|| format!("reading {}", tls.key.display()))?;
    let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = &tls.client_ca {
        let ca = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        cfg = cfg.client_ca_root(Certificate::from_pem(ca));
    }
    Ok(cfg)
}

/// Fault injection for tests (`EMBER_FAULT_*`, see `ember_repl::Faults`).
/// Logged loudly when set.
fn faults() -> ember_repl::Faults {
    let faults = ember_repl::Faults::from_env();
    if faults.any() {
        tracing::warn!(?faults, "FAULT INJECTION is on");
    }
    faults
}
