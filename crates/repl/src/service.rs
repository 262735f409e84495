//! `ember.repl.v1.EmberPeer`: what a peer may ask of this agent.

use ember_proto::repl::v1 as pb;
use ember_proto::repl::v1::ember_peer_server::EmberPeer;
use std::sync::Arc;

use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::fencing;
use crate::hashes;
use crate::manager::Replication;
use crate::secondary::{SecondarySet, run_stream};
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
    secondaries: Option<Arc<SecondarySet>>,
    replication: Option<Arc<Replication>>,
}

impl PeerService {
    /// A service answering as `identity`, without replication.
    pub fn new(identity: Identity) -> Self {
        Self {
            identity,
            secondaries: None,
            replication: None,
        }
    }

    /// A service that replicates: it holds secondaries for its peers and
    /// takes part in role changes (promotion, demotion, fencing).
    pub fn with_replication(identity: Identity, replication: Arc<Replication>) -> Self {
        Self {
            identity,
            secondaries: Some(replication.secondaries().clone()),
            replication: Some(replication),
        }
    }

    fn replication(&self) -> Result<&Arc<Replication>, Status> {
        self.replication
            .as_ref()
            .ok_or_else(|| Status::unimplemented("this agent does not replicate"))
    }

    fn secondaries(&self) -> Result<&Arc<SecondarySet>, Status> {
        self.secondaries
            .as_ref()
            .ok_or_else(|| Status::unimplemented("this agent does not hold secondaries"))
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

    async fn open_replica(
        &self,
        request: Request<pb::OpenReplicaRequest>,
    ) -> Result<Response<pb::OpenReplicaResponse>, Status> {
        let req = request.into_inner();
        ember_volume::parse_volume(&req.volume)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if req.size_bytes == 0 {
            return Err(Status::invalid_argument("size_bytes must be positive"));
        }
        Ok(Response::new(
            self.replication()?.open_replica_for_peer(req).await?,
        ))
    }

    async fn demote(
        &self,
        request: Request<pb::DemoteRequest>,
    ) -> Result<Response<pb::DemoteResponse>, Status> {
        let req = request.into_inner();
        ember_volume::parse_volume(&req.volume)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if req.generation == 0 {
            return Err(Status::invalid_argument("generation must be positive"));
        }
        Ok(Response::new(
            self.replication()?.demote_for_peer(req).await?,
        ))
    }

    async fn promote(
        &self,
        request: Request<pb::PeerPromoteRequest>,
    ) -> Result<Response<pb::PeerPromoteResponse>, Status> {
        let req = request.into_inner();
        ember_volume::parse_volume(&req.volume)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(
            self.replication()?.promote_for_peer(req).await?,
        ))
    }

    async fn create_point(
        &self,
        request: Request<pb::PeerCreatePointRequest>,
    ) -> Result<Response<pb::PeerCreatePointResponse>, Status> {
        let req = request.into_inner();
        ember_volume::parse_volume(&req.volume)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(
            self.secondaries()?.create_point_for_peer(req).await?,
        ))
    }

    async fn list_points(
        &self,
        request: Request<pb::PeerListPointsRequest>,
    ) -> Result<Response<pb::PeerListPointsResponse>, Status> {
        let req = request.into_inner();
        ember_volume::parse_volume(&req.volume)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(
            self.replication()?.list_points_for_peer(&req)?,
        ))
    }

    async fn resize_replica(
        &self,
        request: Request<pb::ResizeReplicaRequest>,
    ) -> Result<Response<pb::ResizeReplicaResponse>, Status> {
        let req = request.into_inner();
        ember_volume::parse_volume(&req.volume)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(
            self.secondaries()?.resize_replica(req).await?,
        ))
    }

    async fn announce_mark(
        &self,
        request: Request<pb::AnnounceMarkRequest>,
    ) -> Result<Response<pb::AnnounceMarkResponse>, Status> {
        let req = request.into_inner();
        ember_volume::parse_volume(&req.volume)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(self.secondaries()?.announce_mark(req).await?))
    }

    async fn get_rehome_record(
        &self,
        request: Request<pb::GetRehomeRecordRequest>,
    ) -> Result<Response<pb::GetRehomeRecordResponse>, Status> {
        let req = request.into_inner();
        ember_volume::parse_volume(&req.volume)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if req.generation == 0 {
            return Err(Status::invalid_argument("generation must be positive"));
        }
        Ok(Response::new(self.secondaries()?.rehome_record(req).await?))
    }

    async fn close_replica(
        &self,
        request: Request<pb::CloseReplicaRequest>,
    ) -> Result<Response<pb::CloseReplicaResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.secondaries()?.close_replica(req).await?))
    }

    async fn read_hashes(
        &self,
        request: Request<pb::ReadHashesRequest>,
    ) -> Result<Response<pb::ReadHashesResponse>, Status> {
        let req = request.into_inner();
        let sv = self
            .secondaries()?
            .get(&req.volume)
            .ok_or_else(|| Status::not_found(format!("no secondary named {}", req.volume)))?;
        let size = ember_nbd::Export::size(sv.volume.as_ref());
        hashes::validate(req.offset, req.chunk_bytes, req.chunks, size)?;
        // The primary no longer counts acknowledged batches as pending: any
        // deferred behind a point's clone must be in the image first, or
        // verify would report them as mismatches.
        sv.settle_deferred().await?;
        let list = hashes::chunk_hashes(&sv.volume, req.offset, req.chunk_bytes, req.chunks)
            .await
            .map_err(|e| Status::internal(format!("hashing: {e}")))?;
        Ok(Response::new(pb::ReadHashesResponse {
            blake3: list.into_iter().map(|h| h.to_vec()).collect(),
        }))
    }

    type ReplicateStream = ReceiverStream<Result<pb::ReplAck, Status>>;

    async fn replicate(
        &self,
        request: Request<Streaming<pb::ReplFrame>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        use ember_proto::repl::v1::repl_frame::Kind;
        let mut frames = request.into_inner();
        let first = frames
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty replication stream"))?;
        let Some(Kind::Open(open)) = first.kind else {
            return Err(Status::invalid_argument(
                "a replication stream starts with an open frame",
            ));
        };
        let sv = self
            .secondaries()?
            .get(&open.volume)
            .ok_or_else(|| Status::not_found(format!("no secondary named {}", open.volume)))?;
        if sv.record().detached {
            return Err(Status::failed_precondition(format!(
                "secondary {} is detached; enable replication again to reattach it",
                open.volume
            )));
        }
        let rec = sv.record();
        if open.generation.max(1) < rec.generation {
            return Err(fencing::stale_generation(
                &open.volume,
                open.generation,
                rec.generation,
            ));
        }
        if open.generation > rec.generation {
            sv.update(|r| r.generation = open.generation)?;
        }
        let size = ember_nbd::Export::size(sv.volume.as_ref());
        if open.size_bytes != size {
            return Err(Status::failed_precondition(format!(
                "secondary {} has {size} bytes, the primary {}",
                open.volume, open.size_bytes
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(run_stream(sv, frames, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
