//! Connecting to an agent's control API over a Unix socket or TCP.

use anyhow::Context;
use ember_proto::control::v1::ember_control_client::EmberControlClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to `unix:/path` or `http://host:port`.
pub(crate) async fn connect(api: &str) -> anyhow::Result<EmberControlClient<Channel>> {
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
        Endpoint::from_shared(api.to_owned())
            .with_context(|| format!("bad API endpoint {api:?}"))?
            .connect()
            .await
            .with_context(|| format!("cannot reach the agent at {api}"))?
    };
    Ok(EmberControlClient::new(channel))
}
