//! Connecting to an agent's control API over a Unix socket or TCP.

use anyhow::Context;
use ember_proto::control::v1::ember_control_client::EmberControlClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

/// TLS material for `https://` endpoints.
#[derive(Debug, Default)]
pub(crate) struct Tls {
    pub(crate) ca: Option<std::path::PathBuf>,
    pub(crate) cert: Option<std::path::PathBuf>,
    pub(crate) key: Option<std::path::PathBuf>,
}

/// Connects to `unix:/path` or `http://host:port` without TLS.
pub(crate) async fn connect(api: &str) -> anyhow::Result<EmberControlClient<Channel>> {
    connect_with(api, &Tls::default()).await
}

fn read(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Connects to `unix:/path`, `http://host:port` or `https://host:port`.
pub(crate) async fn connect_with(
    api: &str,
    tls: &Tls,
) -> anyhow::Result<EmberControlClient<Channel>> {
    let channel = if let Some(path) = api.strip_prefix("unix:") {
        let path = path.to_owned();
        Endpoint::try_from("http://agent.invalid")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .with_context(|| {
                format!("cannot reach the agent at {api} (is emberd running? is --api right?)")
            })?
    } else {
        let mut endpoint = Endpoint::from_shared(api.to_owned())
            .with_context(|| format!("bad API endpoint {api:?}"))?;
        if api.starts_with("https://") {
            let mut cfg = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = &tls.ca {
                cfg = cfg.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                cfg = cfg.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            endpoint = endpoint.tls_config(cfg).context("TLS configuration")?;
        }
        endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach the agent at {api}"))?
    };
    Ok(EmberControlClient::new(channel))
}
