//! `emberctl replica verify VOL [--peer SITE] [--resync]`: an online
//! blake3 comparison of the primary with each target.
//!
//! JSON keeps the one-target fields at the top (the worst target: most
//! mismatching bytes) and adds `peer` and `targets` (one object per
//! target with the same fields). Exit status 2 when any target differs and
//! no resync was queued, so scripts notice without parsing.

use ember_common::format_size;
use ember_proto::control::v1 as pb;
use ember_proto::control::v1::ember_control_client::EmberControlClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::output::{Out, outln};

fn mismatches_json(m: &[pb::DirtyExtent]) -> Vec<Value> {
    m.iter()
        .map(|m| json!({"offset": m.offset, "length": m.length}))
        .collect()
}

fn target_json(t: &pb::TargetVerify) -> Value {
    json!({
        "peer": t.peer,
        "compared_bytes": t.compared_bytes,
        "mismatches": mismatches_json(&t.mismatches),
        "pending_bytes": t.pending_bytes,
        "resync_queued": t.resync_queued,
    })
}

/// Runs the verify and prints it; exits 2 on unqueued mismatches.
pub(crate) async fn run(
    api: &mut EmberControlClient<Channel>,
    out: Out,
    volume: String,
    peer: Option<String>,
    resync: bool,
) -> anyhow::Result<()> {
    let r = api
        .verify_replica(pb::VerifyReplicaRequest {
            volume,
            resync,
            peer: peer.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if out.json {
        out.print_json(&json!({
            "compared_bytes": r.compared_bytes,
            "mismatches": mismatches_json(&r.mismatches),
            "pending_bytes": r.pending_bytes,
            "resync_queued": r.resync_queued,
            "peer": r.peer,
            "targets": r.targets.iter().map(target_json).collect::<Vec<_>>(),
        }));
    } else {
        for t in &r.targets {
            outln!(
                "{}: compared {}; {} mismatching range(s); {} pending (writes in flight)",
                t.peer,
                format_size(t.compared_bytes),
                t.mismatches.len(),
                format_size(t.pending_bytes)
            );
            for m in &t.mismatches {
                outln!("  offset {} length {}", m.offset, format_size(m.length));
            }
            if t.resync_queued {
                outln!("  resync queued");
            }
        }
    }
    if r.targets
        .iter()
        .any(|t| !t.mismatches.is_empty() && !t.resync_queued)
    {
        std::process::exit(2);
    }
    Ok(())
}
