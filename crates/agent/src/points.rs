//! gRPC handlers of recovery points (`CreatePoint`, `ListPoints`,
//! `SetReplication`) and of promotion to a point (`PromoteReplica` /
//! `PromoteGroup` with `at_point` or `at_unix_ns`); `control.rs` delegates
//! to them in one line each. See docs/points.md.

use ember_proto::control::v1 as pb;
use ember_repl::{PointListing, PointSettings, PointTarget, ReplicaStatus};
use tonic::{Request, Response, Status};

use crate::control::{ControlService, group_pb, repl_status, replication_pb};

fn point_pb(p: PointListing) -> pb::RecoveryPoint {
    pb::RecoveryPoint {
        name: p.name,
        at_unix_ns: p.at_unix_ns,
        kind: p.kind.to_owned(),
        group: p.group,
        pinned_bytes: p.pinned_bytes,
        peer: p.peer,
    }
}

fn settings(p: Option<pb::PointSettings>) -> PointSettings {
    let Some(p) = p else {
        return PointSettings::default();
    };
    PointSettings {
        every_secs: p.has_points_every.then_some(p.points_every_seconds),
        keep: p.has_keep.then_some(p.keep_points),
        keep_for_secs: p.has_keep_for.then_some(p.keep_for_seconds),
    }
}

fn check_volume(volume: &str) -> Result<(), Status> {
    ember_volume::parse_volume(volume)
        .map(|_| ())
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

/// The point a promotion names, if it names one (`at_point` wins).
pub(crate) fn target(at_point: &str, at_unix_ns: i64) -> Option<PointTarget> {
    if !at_point.is_empty() {
        Some(PointTarget::Name(at_point.to_owned()))
    } else if at_unix_ns != 0 {
        Some(PointTarget::At(at_unix_ns))
    } else {
        None
    }
}

/// `CreatePoint`.
pub(crate) async fn create(
    svc: &ControlService,
    request: Request<pb::CreatePointRequest>,
) -> Result<Response<pb::CreatePointResponse>, Status> {
    let req = request.into_inner();
    check_volume(&req.volume)?;
    let name = (!req.name.is_empty()).then_some(req.name);
    let peer = (!req.peer.is_empty()).then_some(req.peer.as_str());
    let taken = svc
        .replication
        .create_point(&req.volume, name, peer)
        .await?;
    let several = taken.iter().any(|p| !p.peer.is_empty());
    let points: Vec<pb::RecoveryPoint> = taken.into_iter().map(point_pb).collect();
    Ok(Response::new(pb::CreatePointResponse {
        point: points.first().cloned(),
        points: if several { points } else { Vec::new() },
    }))
}

/// `ListPoints`, on either site (a primary asks its secondary).
pub(crate) async fn list(
    svc: &ControlService,
    request: Request<pb::ListPointsRequest>,
) -> Result<Response<pb::ListPointsResponse>, Status> {
    let req = request.into_inner();
    check_volume(&req.volume)?;
    let r = svc
        .replication
        .list_points_on_either_site(&req.volume)
        .await?;
    Ok(Response::new(pb::ListPointsResponse {
        points: r.points.into_iter().map(point_pb).collect(),
        points_every_seconds: r.every_secs,
        keep_points: r.keep,
        keep_for_seconds: r.keep_for_secs,
    }))
}

/// `SetReplication` (`replica set VOL --points-every … --keep …`).
pub(crate) async fn set(
    svc: &ControlService,
    request: Request<pb::SetReplicationRequest>,
) -> Result<Response<pb::SetReplicationResponse>, Status> {
    let req = request.into_inner();
    check_volume(&req.volume)?;
    let settings = settings(req.points);
    if settings == PointSettings::default() {
        return Err(Status::invalid_argument(
            "nothing to set: give --points-every, --keep or --keep-for",
        ));
    }
    let peer = (!req.peer.is_empty()).then_some(req.peer.as_str());
    svc.replication
        .set_points(&req.volume, peer, settings)
        .await
        .map_err(repl_status)?;
    let status = svc.replication.status(&req.volume).map_err(repl_status)?;
    Ok(Response::new(pb::SetReplicationResponse {
        status: Some(replication_pb(status)),
    }))
}

/// `EnableReplication` carried point settings: applies them to the target
/// just enabled (`peer`) after it exists, and answers with the status after
/// that.
pub(crate) async fn after_enable(
    svc: &ControlService,
    volume: &str,
    peer: &str,
    points: Option<pb::PointSettings>,
    status: ReplicaStatus,
) -> Result<ReplicaStatus, Status> {
    let settings = settings(points);
    if !svc
        .replication
        .set_points(volume, Some(peer), settings)
        .await
        .map_err(repl_status)?
    {
        return Ok(status);
    }
    svc.replication.status(volume).map_err(repl_status)
}

/// `PromoteReplica` with `--at`.
pub(crate) async fn promote(
    svc: &ControlService,
    volume: &str,
    force: bool,
    target: PointTarget,
) -> Result<Response<pb::PromoteReplicaResponse>, Status> {
    check_volume(volume)?;
    let report = svc
        .replication
        .promote_to_point(volume, force, &target)
        .await
        .map_err(repl_status)?;
    let status = svc.replication.status(volume).map_err(repl_status)?;
    Ok(Response::new(pb::PromoteReplicaResponse {
        status: Some(replication_pb(status)),
        forced: report.forced,
        recovery_point_unix_ns: report.recovery_point_unix_ns,
        already_primary: report.already_primary,
    }))
}

/// `PromoteGroup` with `--at`.
pub(crate) async fn promote_group(
    svc: &ControlService,
    name: &str,
    force: bool,
    target: PointTarget,
) -> Result<Response<pb::PromoteGroupResponse>, Status> {
    let report = svc
        .replication
        .promote_group_to_point(name, force, &target)
        .await
        .map_err(repl_status)?;
    Ok(Response::new(pb::PromoteGroupResponse {
        status: Some(group_pb(report.status)),
        forced: report.forced,
        recovery_point_unix_ns: report.recovery_point_unix_ns,
    }))
}
