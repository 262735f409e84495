//! `emberctl replica promote|demote`: role changes, and `emberctl events`,
//! the stream that reports them (with state changes and RPO breaches).

use anyhow::Context;
use ember_common::format_size;
use ember_proto::control::v1 as pb;
use ember_proto::control::v1::ember_control_client::EmberControlClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::output::{Out, outln};
use crate::replica::{rfc3339, status_json};

pub(crate) async fn promote(
    api: &mut EmberControlClient<Channel>,
    out: Out,
    volume: String,
    force: bool,
    at: Option<(String, i64)>,
) -> anyhow::Result<()> {
    let (at_point, at_unix_ns) = at.unwrap_or_default();
    let r = api
        .promote_replica(pb::PromoteReplicaRequest {
            volume: volume.clone(),
            force,
            at_point,
            at_unix_ns,
        })
        .await?
        .into_inner();
    let status = r.status.context("agent returned no status")?;
    if out.json {
        let mut v = status_json(&status);
        v["forced"] = json!(r.forced);
        v["already_primary"] = json!(r.already_primary);
        out.print_json(&v);
        return Ok(());
    }
    if r.already_primary {
        outln!(
            "{volume} is already primary here (generation {})",
            status.generation
        );
    } else if r.forced {
        outln!(
            "{volume} force-promoted: primary at generation {}; recovery point {} — writes {} acknowledged after it are lost",
            status.generation,
            rfc3339(r.recovery_point_unix_ns).unwrap_or_else(|| "unknown".into()),
            status.peer_site
        );
    } else {
        outln!(
            "{volume} promoted (planned, zero loss): primary at generation {}, replicating to {}",
            status.generation,
            status.peer_site
        );
    }
    Ok(())
}

pub(crate) async fn demote(
    api: &mut EmberControlClient<Channel>,
    out: Out,
    volume: String,
    discard_local: bool,
) -> anyhow::Result<()> {
    let r = api
        .demote_replica(pb::DemoteReplicaRequest {
            volume: volume.clone(),
            discard_local,
        })
        .await?
        .into_inner();
    let status = r.status.context("agent returned no status")?;
    if out.json {
        let mut v = status_json(&status);
        v["discarded_bytes"] = json!(r.discarded_bytes);
        out.print_json(&v);
    } else if discard_local {
        outln!(
            "{volume} now follows {}; {} changed here will be overwritten from it (audit-logged)",
            status.peer_site,
            format_size(r.discarded_bytes)
        );
    } else {
        outln!(
            "{volume} handed over to {} (planned switchover)",
            status.peer_site
        );
    }
    Ok(())
}

pub(crate) async fn events(
    api: &mut EmberControlClient<Channel>,
    out: Out,
    volume: Option<String>,
) -> anyhow::Result<()> {
    let mut stream = api
        .watch_events(pb::WatchEventsRequest {
            volume: volume.unwrap_or_default(),
        })
        .await?
        .into_inner();
    while let Some(e) = stream.message().await? {
        if out.json {
            // One compact line per event, flushed: scripts follow it live.
            outln!(
                "{}",
                json!({
                    "at": rfc3339(e.at_unix_ns), "at_unix_ns": e.at_unix_ns,
                    "volume": e.volume, "kind": e.kind, "state": e.state,
                    "lag_seconds": e.lag_seconds,
                    "resync_remaining_bytes": e.resync_remaining_bytes,
                    "generation": e.generation, "message": e.message,
                })
            );
        } else {
            outln!(
                "{} {:<16} {:<12} {}",
                rfc3339(e.at_unix_ns).unwrap_or_default(),
                e.kind,
                e.volume,
                e.message
            );
        }
        use std::io::Write;
        std::io::stdout().flush()?;
    }
    Ok(())
}
