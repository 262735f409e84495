//! gRPC handlers of DR drills (`StartDrill`, `ListDrills`, `StopDrill`);
//! `control.rs` delegates to them in one line each. Also the one place a
//! [`DrillError`] becomes a gRPC status ([`drill_status`]).

use ember_proto::control::v1 as pb;
use ember_repl::{DrillError, DrillInfo, DrillRequest};
use tonic::{Request, Response, Status};

use crate::control::{ControlService, status};

/// Maps drill errors to gRPC statuses. Exhaustive: a new variant must
/// pick its code here before it compiles.
pub(crate) fn drill_status(error: DrillError) -> Status {
    let message = error.to_string();
    match error {
        DrillError::InvalidArgument(_) => Status::invalid_argument(message),
        DrillError::AlreadyExists(_) => Status::already_exists(message),
        DrillError::NotFound(_) => Status::not_found(message),
        DrillError::PrimaryHere { .. } | DrillError::FailedPrecondition(_) => {
            Status::failed_precondition(message)
        }
        // The points layer already chose the code (NOT_FOUND naming the
        // oldest point, INVALID_ARGUMENT for a future time…).
        DrillError::Point(s) => s,
        DrillError::Store(e) => status(e),
        DrillError::Io { ref source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
        {
            Status::resource_exhausted(message)
        }
        DrillError::Io { .. } => Status::internal(message),
    }
}

fn drill_pb(svc: &ControlService, d: DrillInfo) -> pb::Drill {
    pb::Drill {
        nbd_uri: svc.nbd.uri(&d.name),
        name: d.name,
        volume: d.volume,
        point: d.point,
        at_unix_ns: d.at_unix_ns,
        size_bytes: d.size_bytes,
        created_at_unix_ns: d.created_at_unix_ns,
        nbd_connections: d.nbd_connections,
        group: d.group,
    }
}

/// `StartDrill`.
pub(crate) async fn start(
    svc: &ControlService,
    request: Request<pb::StartDrillRequest>,
) -> Result<Response<pb::StartDrillResponse>, Status> {
    let req = request.into_inner();
    let info = svc
        .replication
        .start_drill(DrillRequest {
            volume: req.volume,
            name: req.name,
            point: req.point,
            at_unix_ns: req.at_unix_ns,
        })
        .await
        .map_err(drill_status)?;
    Ok(Response::new(pb::StartDrillResponse {
        drill: Some(drill_pb(svc, info)),
    }))
}

/// `ListDrills`.
pub(crate) fn list(
    svc: &ControlService,
    request: Request<pb::ListDrillsRequest>,
) -> Result<Response<pb::ListDrillsResponse>, Status> {
    let volume = request.into_inner().volume;
    if !volume.is_empty() {
        ember_volume::parse_volume(&volume).map_err(status)?;
    }
    let drills = svc
        .replication
        .list_drills((!volume.is_empty()).then_some(volume.as_str()))
        .into_iter()
        .map(|d| drill_pb(svc, d))
        .collect();
    Ok(Response::new(pb::ListDrillsResponse { drills }))
}

/// `StopDrill`.
pub(crate) async fn stop(
    svc: &ControlService,
    request: Request<pb::StopDrillRequest>,
) -> Result<Response<pb::StopDrillResponse>, Status> {
    let stopped = svc
        .replication
        .stop_drill(&request.into_inner().name)
        .await
        .map_err(drill_status)?;
    Ok(Response::new(pb::StopDrillResponse {
        existed: !stopped.is_empty(),
        stopped,
    }))
}

/// `StartGroupDrill`.
pub(crate) async fn start_group(
    svc: &ControlService,
    request: Request<pb::StartGroupDrillRequest>,
) -> Result<Response<pb::StartGroupDrillResponse>, Status> {
    let req = request.into_inner();
    let drills = svc
        .replication
        .start_group_drill(DrillRequest {
            volume: req.group,
            name: req.name,
            point: req.point,
            at_unix_ns: req.at_unix_ns,
        })
        .await
        .map_err(drill_status)?
        .into_iter()
        .map(|d| drill_pb(svc, d))
        .collect();
    Ok(Response::new(pb::StartGroupDrillResponse { drills }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drill_errors_map_to_precise_codes() {
        use tonic::Code;
        let rows = [
            (
                DrillError::InvalidArgument("future".into()),
                Code::InvalidArgument,
            ),
            (DrillError::AlreadyExists("d".into()), Code::AlreadyExists),
            (DrillError::NotFound("v".into()), Code::NotFound),
            (
                DrillError::PrimaryHere {
                    volume: "v".into(),
                    ask: "site-b".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                DrillError::Point(Status::not_found("oldest is p1")),
                Code::NotFound,
            ),
            (
                DrillError::Io {
                    what: "clone".into(),
                    source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                },
                Code::ResourceExhausted,
            ),
        ];
        for (e, code) in rows {
            let shown = e.to_string();
            let s = drill_status(e);
            assert_eq!(s.code(), code, "{shown}");
        }
        let s = drill_status(DrillError::PrimaryHere {
            volume: "v".into(),
            ask: "site-b".into(),
        });
        assert!(s.message().contains("site-b"), "{}", s.message());
    }
}
