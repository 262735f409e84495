//! `ember.repl.v1.EmberPeer`: what a peer may ask of this agent.

use ember_proto::repl::v1 as pb;
use ember_proto::repl::v1::ember_peer_server::EmberPeer;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::version::ProtocolVersion;

/// Who this agent is, as told to peers.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Site name, e.g. `site-a`.
    pub site: String,
    /// Stable backend id of the data dir.
    pub backend_id: String,
    /// Capabilities advertised to peers.
    pub capabilities: Vec<String>,
}

impl Identity {
    pub(crate) fn hello_request(&self) -> pb::HelloRequest {
        pb::HelloRequest {
            site: self.site.clone(),
            backend_id: self.backend_id.clone(),
            protocol_version: ProtocolVersion::CURRENT as u32,
            supported_versions: ProtocolVersion::SUPPORTED.to_vec(),
            capabilities: self.capabilities.clone(),
        }
    }
}

/// The peer service.
#[derive(Debug, Clone)]
pub struct PeerService {
    identity: Identity,
}

impl PeerService {
    /// A service answering as `identity`.
    pub fn new(identity: Identity) -> Self {
        Self { identity }
    }
}

/// Largest ping payload echoed.
const MAX_PING_BYTES: usize = 64 * 1024;

#[tonic::async_trait]
impl EmberPeer for PeerService {
    #[tracing::instrument(skip_all, fields(peer = %request.get_ref().site))]
    async fn hello(
        &self,
        request: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloResponse>, Status> {
        let req = request.into_inner();
        if req.backend_id == self.identity.backend_id {
            tracing::warn!("refusing to pair an agent with itself");
            return Err(Status::failed_precondition(format!(
                "backend {} is this agent itself; pair with the other site's agent",
                req.backend_id
            )));
        }
        let Some(version) = ProtocolVersion::negotiate(&req.supported_versions) else {
            tracing::warn!(theirs = ?req.supported_versions, "peer speaks no common protocol version");
            return Err(Status::failed_precondition(format!(
                "no common protocol version: peer speaks {:?}, this agent {:?}",
                req.supported_versions,
                ProtocolVersion::SUPPORTED
            )));
        };
        tracing::info!(backend_id = %req.backend_id, version, "peer said hello");
        Ok(Response::new(pb::HelloResponse {
            site: self.identity.site.clone(),
            backend_id: self.identity.backend_id.clone(),
            protocol_version: version,
            supported_versions: ProtocolVersion::SUPPORTED.to_vec(),
            capabilities: self.identity.capabilities.clone(),
        }))
    }

    async fn ping(
        &self,
        request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        let payload = request.into_inner().payload;
        if payload.len() > MAX_PING_BYTES {
            return Err(Status::invalid_argument(format!(
                "ping payload over {MAX_PING_BYTES} bytes"
            )));
        }
        Ok(Response::new(pb::PingResponse { payload }))
    }

    async fn sink(
        &self,
        request: Request<Streaming<pb::SinkChunk>>,
    ) -> Result<Response<pb::SinkSummary>, Status> {
        let mut stream = request.into_inner();
        let mut bytes = 0u64;
        while let Some(chunk) = stream.next().await {
            bytes += chunk?.data.len() as u64;
        }
        Ok(Response::new(pb::SinkSummary { bytes }))
    }
}
