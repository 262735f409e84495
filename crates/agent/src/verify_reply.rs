//! The `VerifyReplica` reply: the worst target's report at the top (the
//! fields a one-target caller always read), every target's in `targets`.

use ember_proto::control::v1 as pb;
use ember_repl::{Mismatch, VerifyReport, worst_report};

fn extents(mismatches: &[Mismatch]) -> Vec<pb::DirtyExtent> {
    mismatches
        .iter()
        .map(|m| pb::DirtyExtent {
            offset: m.offset,
            length: m.length,
        })
        .collect()
}

/// The reply for the reports of every verified target.
pub(crate) fn response(reports: &[VerifyReport]) -> pb::VerifyReplicaResponse {
    let targets: Vec<pb::TargetVerify> = reports
        .iter()
        .map(|r| pb::TargetVerify {
            peer: r.peer.clone(),
            compared_bytes: r.compared_bytes,
            mismatches: extents(&r.mismatches),
            pending_bytes: r.pending_bytes,
            resync_queued: r.resync_queued,
        })
        .collect();
    let Some(top) = worst_report(reports).map(|i| &targets[i]) else {
        return pb::VerifyReplicaResponse::default();
    };
    pb::VerifyReplicaResponse {
        compared_bytes: top.compared_bytes,
        mismatches: top.mismatches.clone(),
        pending_bytes: top.pending_bytes,
        resync_queued: top.resync_queued,
        peer: top.peer.clone(),
        targets,
    }
}
