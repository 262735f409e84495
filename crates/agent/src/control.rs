//! The gRPC control service: argument validation, idempotency, and the one
//! place store errors become gRPC statuses ([`status`]).

use std::sync::Arc;

use ember_proto::control::v1 as pb;
use ember_proto::control::v1::ember_control_server::EmberControl;
use ember_storage::StorageError;
use ember_tracking::TrackingError;
use ember_volume::{
    Source, StoreError, Volume, VolumeMeta, VolumeStore, parse_snapshot, parse_volume,
};
use tonic::{Request, Response, Status};

/// Where clients reach NBD exports, for building URIs.
#[derive(Debug, Clone)]
pub(crate) enum NbdAddress {
    /// `tls`: the listener requires NBD_OPT_STARTTLS, so URIs say `nbds://`.
    Tcp { host: String, port: u16, tls: bool },
}

impl NbdAddress {
    pub(crate) fn uri(&self, export: &str) -> String {
        match self {
            Self::Tcp { host, port, tls } => {
                let scheme = if *tls { "nbds" } else { "nbd" };
                if host.contains(':') {
                    format!("{scheme}://[{host}]:{port}/{export}")
                } else {
                    format!("{scheme}://{host}:{port}/{export}")
                }
            }
        }
    }

    pub(crate) fn display(&self) -> String {
        match self {
            Self::Tcp { host, port, .. } => format!("{host}:{port}"),
        }
    }
}

/// The control service.
#[derive(Debug)]
pub(crate) struct ControlService {
    pub(crate) store: Arc<VolumeStore>,
    pub(crate) nbd: NbdAddress,
    pub(crate) peers: Arc<ember_repl::PeerRegistry>,
    pub(crate) replication: Arc<ember_repl::Replication>,
    pub(crate) site: String,
    pub(crate) peer_address: Option<String>,
}

/// Maps peer-link errors to gRPC statuses; exhaustive like [`status`].
pub(crate) fn repl_status(error: ember_repl::ReplError) -> Status {
    use ember_repl::ReplError;
    let message = error.to_string();
    match error {
        ReplError::InvalidArgument(_) | ReplError::WrongSite { .. } => {
            Status::invalid_argument(message)
        }
        ReplError::AlreadyPaired { .. } => Status::already_exists(message),
        ReplError::Unreachable { .. } => Status::unavailable(message),
        // The peer could not be reached mid-call: callers may fall back
        // (a forced promotion), so keep it distinguishable.
        ReplError::Refused { ref status, .. }
            if matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ) =>
        {
            Status::unavailable(message)
        }
        ReplError::Refused { .. }
        | ReplError::VersionMismatch { .. }
        | ReplError::NotConfigured => Status::failed_precondition(message),
        ReplError::TlsMaterial { .. } => Status::failed_precondition(message),
        ReplError::NotFound(_) => Status::not_found(message),
        ReplError::FailedPrecondition(_) => Status::failed_precondition(message),
        ReplError::Io { .. } | ReplError::Internal(_) => Status::internal(message),
    }
}

/// `AddToGroup` / `RemoveFromGroup`: validates the volume name, applies
/// the change, answers with the group's status.
fn member_change(
    req: pb::GroupMemberRequest,
    change: impl FnOnce(&str, &str) -> ember_repl::Result<(ember_repl::GroupStatus, bool)>,
) -> Result<Response<pb::GroupMemberResponse>, Status> {
    ember_volume::parse_volume(&req.volume).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let (status, changed) = change(&req.group, &req.volume).map_err(repl_status)?;
    Ok(Response::new(pb::GroupMemberResponse {
        status: Some(group_pb(status)),
        changed,
    }))
}

fn group_members_pb(members: Vec<ember_repl::GroupMember>) -> Vec<pb::GroupMemberStatus> {
    members
        .into_iter()
        .map(|m| pb::GroupMemberStatus {
            volume: m.volume,
            state: m.state.into(),
            lag_seconds: m.lag_seconds,
            lag_bytes: m.lag_bytes,
            consistent_at_unix_ns: m.consistent_at_unix_ns,
        })
        .collect()
}

pub(crate) fn group_pb(s: ember_repl::GroupStatus) -> pb::GroupStatus {
    pb::GroupStatus {
        name: s.name,
        role: s.role.into(),
        peer_site: s.peer,
        members: group_members_pb(s.members),
        consistent_at_unix_ns: s.consistent_at_unix_ns,
        lag_seconds: s.lag_seconds,
        consistent: s.consistent,
        targets: s
            .targets
            .into_iter()
            .map(|t| pb::GroupTargetStatus {
                peer_site: t.peer,
                mode: t.mode.into(),
                members: group_members_pb(t.members),
                consistent_at_unix_ns: t.consistent_at_unix_ns,
                lag_seconds: t.lag_seconds,
                consistent: t.consistent,
            })
            .collect(),
    }
}

pub(crate) fn replication_pb(s: ember_repl::ReplicaStatus) -> pb::ReplicationStatus {
    pb::ReplicationStatus {
        volume: s.volume,
        role: s.role.into(),
        peer_site: s.peer,
        mode: s.mode.into(),
        state: s.state.into(),
        lag_seconds: s.lag_seconds,
        lag_bytes: s.lag_bytes,
        last_consistent_at_unix_ns: s.last_consistent_at_unix_ns,
        resync_remaining_bytes: s.resync_remaining_bytes,
        resync_total_bytes: s.resync_total_bytes,
        resync_eta_seconds: s.resync_eta_seconds,
        resync_bytes_sent: s.resync_bytes_sent,
        resync_bytes_skipped: s.resync_bytes_skipped,
        bytes_shipped: s.bytes_shipped,
        frames_rejected: s.frames_rejected,
        sessions: s.sessions,
        rpo_seconds: s.rpo_seconds,
        rpo_policy: s.rpo_policy.into(),
        group: s.group,
        rpo_breached: s.rpo_breached,
        rpo_breaches: s.rpo_breaches,
        rpo_escalated: s.rpo_escalated,
        on_peer_loss: s.on_peer_loss.into(),
        last_error: s.last_error,
        generation: s.generation,
        recovery_point_unix_ns: s.recovery_point_unix_ns,
        replication_memory: Some(memory_pb(
            ember_repl::memory_budget().usage(),
            s.memory_held_bytes,
        )),
        journal_overflows: s.journal_overflows,
        targets: s
            .targets
            .into_iter()
            .map(|t| pb::ReplicaTargetStatus {
                peer_site: t.peer,
                mode: t.mode.into(),
                state: t.state.into(),
                lag_seconds: t.lag_seconds,
                lag_bytes: t.lag_bytes,
                last_consistent_at_unix_ns: t.last_consistent_at_unix_ns,
                resync_remaining_bytes: t.resync_remaining_bytes,
                resync_bytes_sent: t.resync_bytes_sent,
            })
            .collect(),
    }
}

/// The agent's replication memory budget on the wire (issue 15).
fn memory_pb(u: ember_repl::BudgetUsage, volume_held_bytes: u64) -> pb::ReplicationMemory {
    pb::ReplicationMemory {
        budget_bytes: u.budget_bytes,
        used_bytes: u.used_bytes,
        peak_bytes: u.peak_bytes,
        holders: u.holders,
        refusals: u.refusals,
        volume_held_bytes,
    }
}

fn event_pb(e: ember_repl::Event) -> pb::ReplicationEvent {
    pb::ReplicationEvent {
        at_unix_ns: e.at_unix_ns,
        volume: e.volume,
        kind: e.kind.as_str().into(),
        state: e.state,
        lag_seconds: e.lag_seconds,
        resync_remaining_bytes: e.resync_remaining_bytes,
        generation: e.generation,
        message: e.message,
    }
}

/// A response stream fed by a task: `f` gets the sending half and runs
/// until the client goes away.
fn stream_from_task<F, Fut>(f: F) -> <ControlService as EmberControl>::WatchEventsStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::ReplicationEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn peer_pb(p: ember_repl::PeerInfo) -> pb::Peer {
    pb::Peer {
        site: p.site,
        address: p.address,
        backend_id: p.backend_id,
        protocol_version: p.protocol_version,
        capabilities: p.capabilities,
        rtt_us: p.link.rtt_us,
        throughput_bytes_per_sec: p.link.throughput_bytes_per_sec,
        state: p.state.as_str().into(),
        added_at_unix: p.added_at_unix,
        last_error: p.last_error,
        max_rate_bytes_per_sec: p.rates.max_bytes_per_sec,
        resync_rate_bytes_per_sec: p.rates.resync_bytes_per_sec,
    }
}

/// Maps store errors to gRPC statuses. Exhaustive: a new variant must pick
/// its code here before it compiles.
pub(crate) fn status(error: StoreError) -> Status {
    let message = error.to_string();
    match &error {
        StoreError::InvalidName { .. } | StoreError::InvalidArgument(_) => {
            Status::invalid_argument(message)
        }
        StoreError::NotFound { .. } => Status::not_found(message),
        StoreError::AlreadyExists { .. } => Status::already_exists(message),
        StoreError::FailedPrecondition(_) => Status::failed_precondition(message),
        StoreError::Tracking(TrackingError::StaleCheckpoint { .. }) => {
            Status::failed_precondition(message)
        }
        StoreError::Tracking(TrackingError::InvalidConfig(_)) => Status::invalid_argument(message),
        StoreError::Tracking(TrackingError::ActivityLogFull { .. }) => Status::unavailable(message),
        StoreError::Tracking(TrackingError::Io { .. } | TrackingError::Corrupt { .. }) => {
            if error.is_no_space() {
                Status::resource_exhausted(message)
            } else {
                Status::internal(message)
            }
        }
        StoreError::Storage(StorageError::NoSpace { .. }) => Status::resource_exhausted(message),
        StoreError::Storage(StorageError::OutOfRange { .. }) => Status::out_of_range(message),
        StoreError::Storage(StorageError::ReadOnly) => Status::failed_precondition(message),
        StoreError::Storage(StorageError::Unsupported { .. }) => Status::unimplemented(message),
        StoreError::Storage(StorageError::Tracking(_) | StorageError::Io { .. }) => {
            Status::internal(message)
        }
        StoreError::Io { .. } if error.is_no_space() => Status::resource_exhausted(message),
        StoreError::Io { .. } | StoreError::CorruptMetadata { .. } => Status::internal(message),
    }
}

impl ControlService {
    fn volume_pb(&self, meta: &VolumeMeta, volume: &Volume) -> pb::Volume {
        pb::Volume {
            name: meta.name.clone(),
            size_bytes: meta.size_bytes,
            allocated_bytes: volume.device().allocated_bytes(),
            nbd_uri: self.nbd.uri(&meta.name),
            tracking_granularity_bytes: meta.tracking_granularity_bytes,
            dirty_bytes: volume.tracker().map_or(0, |t| t.dirty_bytes()),
            created_at_unix: meta.created_at_unix,
            origin: meta.origin.clone(),
            snapshot_count: self
                .store
                .list_snapshots(&meta.name)
                .map_or(0, |s| s.len() as u32),
            nbd_connections: volume.connections(),
        }
    }

    fn lookup(&self, name: &str) -> Result<(VolumeMeta, Arc<Volume>), Status> {
        parse_volume(name).map_err(status)?;
        self.store
            .get(name)
            .ok_or_else(|| Status::not_found(format!("volume {name} not found")))
    }
}

#[tonic::async_trait]
impl EmberControl for ControlService {
    #[tracing::instrument(skip_all)]
    async fn get_capabilities(
        &self,
        _: Request<pb::GetCapabilitiesRequest>,
    ) -> Result<Response<pb::GetCapabilitiesResponse>, Status> {
        let capacity = self.store.capacity();
        let mut features = vec![
            "snapshots",
            "clones",
            "resize",
            "nbd-structured-replies",
            "nbd-block-status",
            "nbd-fast-zero",
        ];
        if self.store.tracking_enabled() {
            features.extend(["dirty-tracking", "nbd-dirty-bitmap", "replication"]);
        }
        if self.peer_address.is_some() {
            features.push("peer-mtls");
        }
        Ok(Response::new(pb::GetCapabilitiesResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            backend_id: self.store.backend_id().into(),
            capacity_total_bytes: capacity.total_bytes,
            capacity_free_bytes: capacity.free_bytes,
            features: features.into_iter().map(String::from).collect(),
            io_engine: self.store.engine().name().into(),
            nbd_address: self.nbd.display(),
            volume_count: self.store.list().len() as u32,
            site: self.site.clone(),
            peer_address: self.peer_address.clone().unwrap_or_default(),
            snapshot_method: self.store.snapshot_method().as_str().into(),
            nbd_tls: matches!(self.nbd, NbdAddress::Tcp { tls: true, .. }),
            replication_memory: Some(memory_pb(ember_repl::memory_budget().usage(), 0)),
            replication_targets: self
                .replication
                .targets()
                .await
                .into_iter()
                .map(|t| pb::ReplicationTarget {
                    site: t.site,
                    backend_id: t.backend_id,
                    state: t.state.into(),
                    rtt_us: t.rtt_us,
                    throughput_bytes_per_sec: t.throughput_bytes_per_sec,
                    sync_possible: t.sync_possible,
                    min_rpo_seconds: t.min_rpo_seconds,
                    max_rpo_seconds: t.max_rpo_seconds,
                    volumes: t.volumes,
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(peer = %request.get_ref().site))]
    async fn add_peer(
        &self,
        request: Request<pb::AddPeerRequest>,
    ) -> Result<Response<pb::AddPeerResponse>, Status> {
        let req = request.into_inner();
        let (peer, created) = self
            .peers
            .add(
                &req.site,
                &req.address,
                req.measure_bytes,
                ember_repl::LinkRates {
                    max_bytes_per_sec: req.max_rate_bytes_per_sec,
                    resync_bytes_per_sec: req.resync_rate_bytes_per_sec,
                },
            )
            .await
            .map_err(repl_status)?;
        Ok(Response::new(pb::AddPeerResponse {
            peer: Some(peer_pb(peer)),
            created,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_peers(
        &self,
        _: Request<pb::ListPeersRequest>,
    ) -> Result<Response<pb::ListPeersResponse>, Status> {
        let peers = self.peers.list().await.into_iter().map(peer_pb).collect();
        Ok(Response::new(pb::ListPeersResponse { peers }))
    }

    #[tracing::instrument(skip_all, fields(peer = %request.get_ref().site))]
    async fn remove_peer(
        &self,
        request: Request<pb::RemovePeerRequest>,
    ) -> Result<Response<pb::RemovePeerResponse>, Status> {
        let removed = self
            .peers
            .remove(&request.get_ref().site)
            .await
            .map_err(repl_status)?;
        Ok(Response::new(pb::RemovePeerResponse { removed }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().name))]
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let source = match req.source {
            None => Source::Empty,
            Some(pb::create_volume_request::Source::FromSnapshot(s)) => Source::Snapshot(
                parse_volume(&s.volume).map_err(status)?,
                parse_snapshot(&s.snapshot).map_err(status)?,
            ),
            Some(pb::create_volume_request::Source::CloneOfVolume(v)) => {
                Source::Volume(parse_volume(&v).map_err(status)?)
            }
        };
        if matches!(source, Source::Empty) && req.size_bytes == 0 {
            return Err(Status::invalid_argument(
                "size_bytes must be greater than zero",
            ));
        }
        let granularity =
            (req.tracking_granularity_bytes != 0).then_some(req.tracking_granularity_bytes);
        let (meta, volume, created) = self
            .store
            .create(&req.name, req.size_bytes, granularity, source)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(self.volume_pb(&meta, &volume)),
            created,
        }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().name))]
    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let name = &request.get_ref().name;
        self.replication
            .check_unreplicated(name, "delete")
            .map_err(repl_status)?;
        let deleted = self.store.delete(name).await.map_err(status)?;
        if deleted {
            self.replication.secondaries().forget(name);
        }
        Ok(Response::new(pb::DeleteVolumeResponse { deleted }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume, peer = %request.get_ref().peer_site))]
    async fn enable_replication(
        &self,
        request: Request<pb::EnableReplicationRequest>,
    ) -> Result<Response<pb::EnableReplicationResponse>, Status> {
        let req = request.into_inner();
        let mode = match pb::ReplicationMode::try_from(req.mode) {
            Ok(pb::ReplicationMode::Sync) => ember_repl::Mode::Sync,
            Ok(pb::ReplicationMode::Async) => ember_repl::Mode::Async,
            _ => return Err(Status::invalid_argument("mode must be sync or async")),
        };
        let on_peer_loss = match pb::PeerLossPolicy::try_from(req.on_peer_loss) {
            Ok(pb::PeerLossPolicy::Unspecified | pb::PeerLossPolicy::Degrade) => {
                ember_repl::PeerLossPolicy::Degrade
            }
            Ok(pb::PeerLossPolicy::Suspend) => ember_repl::PeerLossPolicy::Suspend,
            Err(_) => return Err(Status::invalid_argument("unknown on_peer_loss policy")),
        };
        if req.peer_site.is_empty() {
            return Err(Status::invalid_argument("peer_site is required"));
        }
        let rpo_policy = match pb::RpoPolicy::try_from(req.rpo_policy) {
            Ok(pb::RpoPolicy::Unspecified | pb::RpoPolicy::Alert) => ember_repl::RpoPolicy::Alert,
            Ok(pb::RpoPolicy::Throttle) => ember_repl::RpoPolicy::Throttle,
            Ok(pb::RpoPolicy::Escalate) => ember_repl::RpoPolicy::Escalate,
            Err(_) => return Err(Status::invalid_argument("unknown rpo_policy")),
        };
        let rpo_seconds = match (req.rpo_seconds, mode) {
            (0, ember_repl::Mode::Async) => 30,
            (r, _) => r,
        };
        let (volume, peer, points) = (req.volume.clone(), req.peer_site.clone(), req.points);
        let (s, created) = self
            .replication
            .enable(ember_repl::EnableRequest {
                volume: req.volume,
                peer: req.peer_site,
                mode,
                rpo_seconds,
                rpo_policy,
                on_peer_loss,
            })
            .await
            .map_err(repl_status)?;
        let s = crate::points::after_enable(self, &volume, &peer, points, s).await?;
        Ok(Response::new(pb::EnableReplicationResponse {
            status: Some(replication_pb(s)),
            created,
        }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume))]
    async fn disable_replication(
        &self,
        request: Request<pb::DisableReplicationRequest>,
    ) -> Result<Response<pb::DisableReplicationResponse>, Status> {
        let req = request.into_inner();
        let disabled = self
            .replication
            .disable_target(
                &req.volume,
                (!req.peer_site.is_empty()).then_some(req.peer_site.as_str()),
                req.delete_secondary,
            )
            .await
            .map_err(repl_status)?;
        Ok(Response::new(pb::DisableReplicationResponse { disabled }))
    }

    async fn get_replication_status(
        &self,
        request: Request<pb::GetReplicationStatusRequest>,
    ) -> Result<Response<pb::GetReplicationStatusResponse>, Status> {
        let s = self
            .replication
            .status(&request.get_ref().volume)
            .map_err(repl_status)?;
        Ok(Response::new(pb::GetReplicationStatusResponse {
            status: Some(replication_pb(s)),
        }))
    }

    async fn list_replications(
        &self,
        _: Request<pb::ListReplicationsRequest>,
    ) -> Result<Response<pb::ListReplicationsResponse>, Status> {
        let replications = self
            .replication
            .list()
            .into_iter()
            .map(replication_pb)
            .collect();
        Ok(Response::new(pb::ListReplicationsResponse { replications }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume))]
    async fn set_replication_paused(
        &self,
        request: Request<pb::SetReplicationPausedRequest>,
    ) -> Result<Response<pb::SetReplicationPausedResponse>, Status> {
        let req = request.into_inner();
        let changed = self
            .replication
            .set_paused(
                &req.volume,
                (!req.peer.is_empty()).then_some(req.peer.as_str()),
                req.paused,
            )
            .await
            .map_err(repl_status)?;
        Ok(Response::new(pb::SetReplicationPausedResponse { changed }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume, force = request.get_ref().force))]
    async fn promote_replica(
        &self,
        request: Request<pb::PromoteReplicaRequest>,
    ) -> Result<Response<pb::PromoteReplicaResponse>, Status> {
        let req = request.into_inner();
        ember_volume::parse_volume(&req.volume)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(at) = crate::points::target(&req.at_point, req.at_unix_ns) {
            return crate::points::promote(self, &req.volume, req.force, at).await;
        }
        let report = self
            .replication
            .promote(&req.volume, req.force)
            .await
            .map_err(repl_status)?;
        let status = self.replication.status(&req.volume).map_err(repl_status)?;
        Ok(Response::new(pb::PromoteReplicaResponse {
            status: Some(replication_pb(status)),
            forced: report.forced,
            recovery_point_unix_ns: report.recovery_point_unix_ns,
            already_primary: report.already_primary,
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().name, peer = %request.get_ref().peer_site))]
    async fn create_group(
        &self,
        request: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::CreateGroupResponse>, Status> {
        let req = request.into_inner();
        let (status, created) = self
            .replication
            .create_group(&req.name, &req.peer_site)
            .await
            .map_err(repl_status)?;
        Ok(Response::new(pb::CreateGroupResponse {
            status: Some(group_pb(status)),
            created,
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().name))]
    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let existed = self
            .replication
            .delete_group(&request.into_inner().name)
            .map_err(repl_status)?;
        Ok(Response::new(pb::DeleteGroupResponse { existed }))
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().group, volume_id = %request.get_ref().volume))]
    async fn add_to_group(
        &self,
        request: Request<pb::GroupMemberRequest>,
    ) -> Result<Response<pb::GroupMemberResponse>, Status> {
        member_change(request.into_inner(), |g, v| {
            self.replication.add_to_group(g, v)
        })
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().group, volume_id = %request.get_ref().volume))]
    async fn remove_from_group(
        &self,
        request: Request<pb::GroupMemberRequest>,
    ) -> Result<Response<pb::GroupMemberResponse>, Status> {
        member_change(request.into_inner(), |g, v| {
            self.replication.remove_from_group(g, v)
        })
    }

    async fn get_group_status(
        &self,
        request: Request<pb::GetGroupStatusRequest>,
    ) -> Result<Response<pb::GetGroupStatusResponse>, Status> {
        let status = self
            .replication
            .group_status(&request.into_inner().name)
            .map_err(repl_status)?;
        Ok(Response::new(pb::GetGroupStatusResponse {
            status: Some(group_pb(status)),
        }))
    }

    async fn list_groups(
        &self,
        _: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        Ok(Response::new(pb::ListGroupsResponse {
            groups: self
                .replication
                .list_groups()
                .into_iter()
                .map(group_pb)
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().name, force = request.get_ref().force))]
    async fn promote_group(
        &self,
        request: Request<pb::PromoteGroupRequest>,
    ) -> Result<Response<pb::PromoteGroupResponse>, Status> {
        let req = request.into_inner();
        if let Some(at) = crate::points::target(&req.at_point, req.at_unix_ns) {
            return crate::points::promote_group(self, &req.name, req.force, at).await;
        }
        let report = self
            .replication
            .promote_group(&req.name, req.force)
            .await
            .map_err(repl_status)?;
        Ok(Response::new(pb::PromoteGroupResponse {
            status: Some(group_pb(report.status)),
            forced: report.forced,
            recovery_point_unix_ns: report.recovery_point_unix_ns,
        }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume, drill = %request.get_ref().name))]
    async fn start_drill(
        &self,
        request: Request<pb::StartDrillRequest>,
    ) -> Result<Response<pb::StartDrillResponse>, Status> {
        crate::drills::start(self, request).await
    }

    async fn list_drills(
        &self,
        request: Request<pb::ListDrillsRequest>,
    ) -> Result<Response<pb::ListDrillsResponse>, Status> {
        crate::drills::list(self, request)
    }

    #[tracing::instrument(skip_all, fields(drill = %request.get_ref().name))]
    async fn stop_drill(
        &self,
        request: Request<pb::StopDrillRequest>,
    ) -> Result<Response<pb::StopDrillResponse>, Status> {
        crate::drills::stop(self, request).await
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().group, drill = %request.get_ref().name))]
    async fn start_group_drill(
        &self,
        request: Request<pb::StartGroupDrillRequest>,
    ) -> Result<Response<pb::StartGroupDrillResponse>, Status> {
        crate::drills::start_group(self, request).await
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume))]
    async fn create_point(
        &self,
        request: Request<pb::CreatePointRequest>,
    ) -> Result<Response<pb::CreatePointResponse>, Status> {
        crate::points::create(self, request).await
    }

    async fn list_points(
        &self,
        request: Request<pb::ListPointsRequest>,
    ) -> Result<Response<pb::ListPointsResponse>, Status> {
        crate::points::list(self, request).await
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume))]
    async fn set_replication(
        &self,
        request: Request<pb::SetReplicationRequest>,
    ) -> Result<Response<pb::SetReplicationResponse>, Status> {
        crate::points::set(self, request).await
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume, discard_local = request.get_ref().discard_local))]
    async fn demote_replica(
        &self,
        request: Request<pb::DemoteReplicaRequest>,
    ) -> Result<Response<pb::DemoteReplicaResponse>, Status> {
        let req = request.into_inner();
        ember_volume::parse_volume(&req.volume)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let discarded_bytes = self
            .replication
            .demote(&req.volume, req.discard_local)
            .await
            .map_err(repl_status)?;
        let status = self.replication.status(&req.volume).map_err(repl_status)?;
        Ok(Response::new(pb::DemoteReplicaResponse {
            status: Some(replication_pb(status)),
            discarded_bytes,
        }))
    }

    type WatchEventsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::ReplicationEvent, Status>> + Send>,
    >;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let only = request.into_inner().volume;
        if !only.is_empty() {
            parse_volume(&only).map_err(status)?;
        }
        let mut rx = self.replication.events().subscribe();
        let stream = stream_from_task(move |tx| async move {
            loop {
                let event = match rx.recv().await {
                    Ok(e) if only.is_empty() || e.volume == only => event_pb(e),
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        pb::ReplicationEvent {
                            kind: "events-lost".into(),
                            message: format!("{n} events dropped: this watcher fell behind"),
                            ..Default::default()
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume))]
    async fn verify_replica(
        &self,
        request: Request<pb::VerifyReplicaRequest>,
    ) -> Result<Response<pb::VerifyReplicaResponse>, Status> {
        let req = request.into_inner();
        let r = self
            .replication
            .verify(
                &req.volume,
                (!req.peer.is_empty()).then_some(req.peer.as_str()),
                req.resync,
            )
            .await
            .map_err(repl_status)?;
        Ok(Response::new(crate::verify_reply::response(&r)))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().name))]
    async fn resize_volume(
        &self,
        request: Request<pb::ResizeVolumeRequest>,
    ) -> Result<Response<pb::ResizeVolumeResponse>, Status> {
        let req = request.into_inner();
        self.replication
            .grow_secondary_first(&req.name, req.size_bytes)
            .await
            .map_err(repl_status)?;
        let meta = self
            .store
            .resize(&req.name, req.size_bytes)
            .await
            .map_err(status)?;
        let (_, volume) = self.lookup(&meta.name)?;
        Ok(Response::new(pb::ResizeVolumeResponse {
            volume: Some(self.volume_pb(&meta, &volume)),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().name))]
    async fn get_volume(
        &self,
        request: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::GetVolumeResponse>, Status> {
        let (meta, volume) = self.lookup(&request.get_ref().name)?;
        Ok(Response::new(pb::GetVolumeResponse {
            volume: Some(self.volume_pb(&meta, &volume)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_volumes(
        &self,
        _: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let volumes = self
            .store
            .list()
            .iter()
            .map(|(m, v)| self.volume_pb(m, v))
            .collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume))]
    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let (meta, created) = self
            .store
            .create_snapshot(&req.volume, &req.name)
            .await
            .map_err(status)?;
        let export = format!("{}@{}", req.volume, meta.name);
        let allocated = self
            .store
            .export(&export)
            .map_or(0, |v| v.device().allocated_bytes());
        Ok(Response::new(pb::CreateSnapshotResponse {
            snapshot: Some(pb::Snapshot {
                volume: req.volume,
                name: meta.name,
                size_bytes: meta.size_bytes,
                allocated_bytes: allocated,
                created_at_unix: meta.created_at_unix,
                nbd_uri: self.nbd.uri(&export),
            }),
            created,
        }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume))]
    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let deleted = self
            .store
            .delete_snapshot(&req.volume, &req.name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteSnapshotResponse { deleted }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume))]
    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let vol = request.into_inner().volume;
        let snapshots = self
            .store
            .list_snapshots(&vol)
            .map_err(status)?
            .into_iter()
            .map(|(m, allocated)| pb::Snapshot {
                nbd_uri: self.nbd.uri(&format!("{vol}@{}", m.name)),
                volume: vol.clone(),
                name: m.name,
                size_bytes: m.size_bytes,
                allocated_bytes: allocated,
                created_at_unix: m.created_at_unix,
            })
            .collect();
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume))]
    async fn get_dirty_extents(
        &self,
        request: Request<pb::GetDirtyExtentsRequest>,
    ) -> Result<Response<pb::GetDirtyExtentsResponse>, Status> {
        let (meta, volume) = self.lookup(&request.get_ref().volume)?;
        let tracker = volume.tracker().ok_or_else(|| {
            Status::failed_precondition(format!(
                "change tracking is disabled on this agent (volume {})",
                meta.name
            ))
        })?;
        let report = tracker.dirty_extents();
        Ok(Response::new(pb::GetDirtyExtentsResponse {
            extents: report
                .extents
                .iter()
                .map(|e| pb::DirtyExtent {
                    offset: e.offset,
                    length: e.length,
                })
                .collect(),
            checkpoint_id: report.checkpoint_id,
            granularity_bytes: tracker.config().granularity_bytes,
            dirty_bytes: report.dirty_bytes,
        }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume))]
    async fn clear_dirty_extents(
        &self,
        request: Request<pb::ClearDirtyExtentsRequest>,
    ) -> Result<Response<pb::ClearDirtyExtentsResponse>, Status> {
        let req = request.into_inner();
        let (meta, volume) = self.lookup(&req.volume)?;
        let tracker = volume.tracker().cloned().ok_or_else(|| {
            Status::failed_precondition(format!(
                "change tracking is disabled on this agent (volume {})",
                meta.name
            ))
        })?;
        let remaining = tokio::task::spawn_blocking(move || tracker.clear(req.checkpoint_id))
            .await
            .map_err(|e| Status::internal(format!("clear task failed: {e}")))?
            .map_err(|e| status(StoreError::Tracking(e)))?;
        Ok(Response::new(pb::ClearDirtyExtentsResponse {
            remaining_dirty_bytes: remaining,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_what_qemu_and_libnbd_accept() {
        let tcp = NbdAddress::Tcp {
            host: "127.0.0.1".into(),
            port: 10809,
            tls: false,
        };
        assert_eq!(tcp.uri("vol1"), "nbd://127.0.0.1:10809/vol1");
        let v6 = NbdAddress::Tcp {
            host: "::1".into(),
            port: 10809,
            tls: false,
        };
        assert_eq!(v6.uri("v"), "nbd://[::1]:10809/v");
        let tls = NbdAddress::Tcp {
            host: "10.0.0.1".into(),
            port: 10809,
            tls: true,
        };
        assert_eq!(
            tls.uri("v"),
            "nbds://10.0.0.1:10809/v",
            "TLS listeners hand out nbds://"
        );
    }

    #[test]
    fn errors_map_to_precise_codes() {
        use tonic::Code;
        let nf = StoreError::NotFound {
            what: "volume",
            name: "x".into(),
        };
        assert_eq!(status(nf).code(), Code::NotFound);
        assert_eq!(
            status(StoreError::Storage(StorageError::NoSpace { op: "write" })).code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            status(StoreError::FailedPrecondition("busy".into())).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            status(StoreError::InvalidArgument("size".into())).code(),
            Code::InvalidArgument
        );
    }
}
