//! `emberctl replica …`: enable, disable, status (once or live), list, verify;
//! promote and demote live in [`crate::failover`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Subcommand;
use ember_common::format_size;
use ember_proto::control::v1 as pb;
use ember_proto::control::v1::ember_control_client::EmberControlClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::output::{Out, outln, table};

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub(crate) enum ReplicaCmd {
    /// Replicate VOLUME to a paired site (creates the secondary there).
    Enable {
        volume: String,
        /// Paired site that holds the secondary.
        #[arg(long)]
        peer: String,
        /// sync: acknowledged on both sides; async: shipped in write order.
        #[arg(long, value_parser = ["sync", "async"])]
        mode: String,
        /// RPO target, e.g. 30s or 5m (default: 30s async, 0 sync).
        #[arg(long)]
        rpo: Option<String>,
        /// Sync mode, secondary lost: degrade (keep serving, resync later)
        /// or suspend (hold writes until it is back).
        #[arg(long, value_parser = ["degrade", "suspend"], default_value = "degrade")]
        on_peer_loss: String,
        /// When the lag nears the RPO: alert (report breaches), throttle
        /// (slow writers to the link) or escalate (sync while lag is high).
        #[arg(long, value_parser = ["alert", "throttle", "escalate"], default_value = "alert")]
        rpo_policy: String,
        /// Take a recovery point on the secondary this often, e.g. 5m.
        #[arg(long)]
        points_every: Option<String>,
        /// Keep at most this many scheduled points.
        #[arg(long)]
        keep: Option<u32>,
        /// Keep scheduled points at most this long, e.g. 24h.
        #[arg(long)]
        keep_for: Option<String>,
    },
    /// Change a replica's recovery-point schedule and retention.
    Set {
        volume: String,
        /// Only the target at this peer site (default: every target).
        #[arg(long)]
        peer: Option<String>,
        /// Take a recovery point on the secondary this often (0s: none).
        #[arg(long)]
        points_every: Option<String>,
        /// Keep at most this many scheduled points (0: any number).
        #[arg(long)]
        keep: Option<u32>,
        /// Keep scheduled points at most this long (0s: any age).
        #[arg(long)]
        keep_for: Option<String>,
    },
    /// Recovery points of a replica, oldest first (either site: on the
    /// primary's, the agent asks the secondary).
    Points {
        volume: String,
        /// Only the points of the target at this peer site (a volume with
        /// several targets keeps points per target).
        #[arg(long)]
        peer: Option<String>,
    },
    /// Recovery points: take one.
    #[command(subcommand)]
    Point(crate::points::PointCmd),
    /// Stop replicating; the secondary stays as a read-only copy.
    Disable {
        volume: String,
        /// Delete the secondary instead of keeping it.
        #[arg(long)]
        delete_secondary: bool,
        /// Only the target at this site (default: every target).
        #[arg(long)]
        peer: Option<String>,
    },
    /// Role, state, lag and resync progress.
    Status {
        volume: String,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Every volume this agent is primary for.
    List,
    /// Stop shipping for now; writes are tracked and sent on resume.
    Pause {
        volume: String,
        /// Only this target (default: every target of the volume).
        #[arg(long)]
        peer: Option<String>,
    },
    /// Ship again: exactly the blocks written while paused, atomically.
    Resume {
        volume: String,
        /// Only this target (default: every target of the volume).
        #[arg(long)]
        peer: Option<String>,
    },
    /// Promote the secondary held here. Planned: the primary drains to lag
    /// 0 and becomes this site's secondary (zero loss, no resync).
    Promote {
        volume: String,
        /// The primary is gone: come up on the last consistent image and
        /// report the recovery point (writes after it are lost).
        #[arg(long)]
        force: bool,
        /// With --force: come up on a recovery point instead, by name or
        /// as the newest point at or before an RFC 3339 time.
        #[arg(long, value_name = "TIME|POINT")]
        at: Option<String>,
    },
    /// Demote the primary held here: a planned switchover to the peer.
    Demote {
        volume: String,
        /// This site lost a split-brain (or gives up its unreplicated
        /// writes): follow the peer now; its changes here are overwritten.
        #[arg(long)]
        discard_local: bool,
    },
    /// DR drills (on the secondary's site): a writable, unreplicated copy
    /// of a consistent image while replication goes on.
    #[command(subcommand)]
    Drill(crate::drill::DrillCmd),
    /// Compare the primary with its targets by blake3 and list ranges that
    /// differ (exit 2 when any target differs and no resync was queued).
    Verify {
        volume: String,
        /// Resend the ranges that differ.
        #[arg(long)]
        resync: bool,
        /// Only this target (default: every target of the volume).
        #[arg(long)]
        peer: Option<String>,
    },
}

/// RFC 3339 UTC of a unix-ns timestamp; `None` for 0 (never).
pub(crate) fn rfc3339(unix_ns: i64) -> Option<String> {
    (unix_ns > 0).then(|| {
        let t = UNIX_EPOCH + Duration::from_nanos(unix_ns as u64);
        humantime::format_rfc3339_millis(t).to_string()
    })
}

/// `GetReplicationStatus` of `volume`.
pub(crate) async fn status(
    api: &mut EmberControlClient<Channel>,
    volume: &str,
) -> anyhow::Result<pb::ReplicationStatus> {
    api.get_replication_status(pb::GetReplicationStatusRequest {
        volume: volume.to_owned(),
    })
    .await?
    .into_inner()
    .status
    .context("agent returned no status")
}

pub(crate) fn status_json(s: &pb::ReplicationStatus) -> Value {
    json!({
        "volume": s.volume, "role": s.role, "peer": s.peer_site, "mode": s.mode,
        "state": s.state, "lag_seconds": s.lag_seconds, "lag_bytes": s.lag_bytes,
        "last_consistent_at": rfc3339(s.last_consistent_at_unix_ns),
        "last_consistent_at_unix_ns": s.last_consistent_at_unix_ns,
        "resync_remaining_bytes": s.resync_remaining_bytes,
        "resync_total_bytes": s.resync_total_bytes,
        "resync_eta_seconds": s.resync_eta_seconds,
        "resync_bytes_sent": s.resync_bytes_sent,
        "resync_bytes_skipped": s.resync_bytes_skipped,
        "bytes_shipped": s.bytes_shipped, "frames_rejected": s.frames_rejected,
        "sessions": s.sessions, "rpo_seconds": s.rpo_seconds,
        "on_peer_loss": s.on_peer_loss, "last_error": s.last_error,
        "generation": s.generation,
        "rpo_policy": s.rpo_policy, "rpo_breached": s.rpo_breached,
        "rpo_breaches": s.rpo_breaches, "rpo_escalated": s.rpo_escalated,
        "recovery_point": rfc3339(s.recovery_point_unix_ns),
        "recovery_point_unix_ns": s.recovery_point_unix_ns,
        "group": s.group,
        "journal_overflows": s.journal_overflows,
        "targets": s.targets.iter().map(|t| json!({
            "peer": t.peer_site, "mode": t.mode, "state": t.state,
            "lag_seconds": t.lag_seconds, "lag_bytes": t.lag_bytes,
            "last_consistent_at": rfc3339(t.last_consistent_at_unix_ns),
            "last_consistent_at_unix_ns": t.last_consistent_at_unix_ns,
            "resync_remaining_bytes": t.resync_remaining_bytes,
            "resync_bytes_sent": t.resync_bytes_sent,
        })).collect::<Vec<_>>(),
        "replication_memory": s.replication_memory.as_ref().map(|m| json!({
            "budget_bytes": m.budget_bytes, "used_bytes": m.used_bytes,
            "peak_bytes": m.peak_bytes, "holders": m.holders,
            "refusals": m.refusals, "volume_held_bytes": m.volume_held_bytes,
        })),
    })
}

fn since(unix_ns: i64) -> String {
    let Some(at) = rfc3339(unix_ns) else {
        return "never".into();
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    format!("{at} ({:.1}s ago)", (now - unix_ns) as f64 / 1e9)
}

fn rows(list: &[pb::ReplicationStatus]) {
    table(
        &[
            "VOLUME",
            "ROLE",
            "PEER",
            "MODE",
            "STATE",
            "LAG",
            "LAG BYTES",
            "RESYNC LEFT",
            "ETA",
            "SHIPPED",
        ],
        list.iter()
            .map(|s| {
                vec![
                    s.volume.clone(),
                    s.role.clone(),
                    s.peer_site.clone(),
                    s.mode.clone(),
                    s.state.clone(),
                    format!("{:.2}s", s.lag_seconds),
                    format_size(s.lag_bytes),
                    format_size(s.resync_remaining_bytes),
                    if s.resync_eta_seconds > 0.0 {
                        format!("{:.0}s", s.resync_eta_seconds)
                    } else {
                        "-".into()
                    },
                    format_size(s.bytes_shipped),
                ]
            })
            .collect(),
    );
}

fn detail(s: &pb::ReplicationStatus) {
    rows(std::slice::from_ref(s));
    outln!(
        "last consistent point: {}",
        since(s.last_consistent_at_unix_ns)
    );
    if s.role == "primary" {
        outln!(
            "resync sent {} (skipped {} already identical); frames rejected {}; sessions {}; on peer loss: {}",
            format_size(s.resync_bytes_sent),
            format_size(s.resync_bytes_skipped),
            s.frames_rejected,
            s.sessions,
            s.on_peer_loss
        );
        outln!(
            "RPO target {}s, policy {}: {}{} ({} breaches so far)",
            s.rpo_seconds,
            s.rpo_policy,
            if s.rpo_breached { "BREACHED" } else { "met" },
            if s.rpo_escalated {
                ", escalated to sync"
            } else {
                ""
            },
            s.rpo_breaches
        );
    }
    if s.targets.len() > 1 {
        // Several targets: the lines above are the worst one's.
        for t in &s.targets {
            outln!(
                "target {} ({}): {}, lag {:.1}s / {}, consistent {}, resync sent {}",
                t.peer_site,
                t.mode,
                t.state,
                t.lag_seconds,
                format_size(t.lag_bytes),
                since(t.last_consistent_at_unix_ns),
                format_size(t.resync_bytes_sent)
            );
        }
    }
    outln!("generation {}", s.generation);
    if s.recovery_point_unix_ns > 0 {
        outln!(
            "force-promoted: came up on the image of {} (writes after it were lost)",
            since(s.recovery_point_unix_ns)
        );
    }
    if !s.last_error.is_empty() {
        outln!("last error: {}", s.last_error);
    }
}

async fn set_paused(
    api: &mut EmberControlClient<Channel>,
    out: Out,
    volume: String,
    peer: Option<String>,
    paused: bool,
) -> anyhow::Result<()> {
    let changed = api
        .set_replication_paused(pb::SetReplicationPausedRequest {
            volume: volume.clone(),
            paused,
            peer: peer.clone().unwrap_or_default(),
        })
        .await?
        .into_inner()
        .changed;
    let verb = if paused { "paused" } else { "resumed" };
    let to = peer
        .as_deref()
        .map(|p| format!(" to {p}"))
        .unwrap_or_default();
    if out.json {
        out.print_json(
            &json!({ "volume": volume, "peer": peer, "paused": paused, "changed": changed }),
        );
    } else if changed {
        outln!("replication of {volume}{to} {verb}");
    } else {
        outln!("replication of {volume}{to} was already {verb}");
    }
    Ok(())
}

fn rpo_arg(raw: &str) -> anyhow::Result<u64> {
    Ok(humantime::parse_duration(raw)
        .with_context(|| format!("--rpo {raw:?}: use a duration like 30s or 5m"))?
        .as_secs())
}

pub(crate) async fn run(
    cmd: ReplicaCmd,
    api: &mut EmberControlClient<Channel>,
    out: Out,
) -> anyhow::Result<()> {
    match cmd {
        ReplicaCmd::Enable {
            volume,
            peer,
            mode,
            rpo,
            on_peer_loss,
            rpo_policy,
            points_every,
            keep,
            keep_for,
        } => {
            let points =
                crate::points::settings(points_every.as_deref(), keep, keep_for.as_deref())?;
            let rpo_policy = match rpo_policy.as_str() {
                "throttle" => pb::RpoPolicy::Throttle,
                "escalate" => pb::RpoPolicy::Escalate,
                _ => pb::RpoPolicy::Alert,
            };
            let mode = match mode.as_str() {
                "sync" => pb::ReplicationMode::Sync,
                _ => pb::ReplicationMode::Async,
            };
            let policy = match on_peer_loss.as_str() {
                "suspend" => pb::PeerLossPolicy::Suspend,
                _ => pb::PeerLossPolicy::Degrade,
            };
            let r = api
                .enable_replication(pb::EnableReplicationRequest {
                    volume,
                    peer_site: peer,
                    mode: mode as i32,
                    rpo_seconds: rpo.as_deref().map(rpo_arg).transpose()?.unwrap_or(0),
                    on_peer_loss: policy as i32,
                    rpo_policy: rpo_policy as i32,
                    points,
                })
                .await?
                .into_inner();
            let s = r.status.context("agent returned no status")?;
            if out.json {
                out.print_json(&status_json(&s));
            } else {
                detail(&s);
            }
        }
        ReplicaCmd::Disable {
            volume,
            delete_secondary,
            peer,
        } => {
            let disabled = api
                .disable_replication(pb::DisableReplicationRequest {
                    volume: volume.clone(),
                    delete_secondary,
                    peer_site: peer.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .disabled;
            if out.json {
                out.print_json(&json!({ "volume": volume, "disabled": disabled }));
            } else if disabled {
                outln!("replication of {volume} disabled");
            } else {
                outln!("{volume} was not replicated");
            }
        }
        ReplicaCmd::Status { volume, watch } => loop {
            let s = status(api, &volume).await?;
            if out.json {
                out.print_json(&status_json(&s));
            } else {
                detail(&s);
            }
            if !watch {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        },
        ReplicaCmd::Promote { volume, force, at } => {
            let at = at.as_deref().map(crate::points::parse_at).transpose()?;
            crate::failover::promote(api, out, volume, force, at).await?;
        }
        ReplicaCmd::Set {
            volume,
            peer,
            points_every,
            keep,
            keep_for,
        } => {
            let points =
                crate::points::settings(points_every.as_deref(), keep, keep_for.as_deref())?;
            crate::points::set(api, out, volume, peer, points).await?;
        }
        ReplicaCmd::Points { volume, peer } => crate::points::list(api, out, volume, peer).await?,
        ReplicaCmd::Point(cmd) => crate::points::run(cmd, api, out).await?,
        ReplicaCmd::Demote {
            volume,
            discard_local,
        } => crate::failover::demote(api, out, volume, discard_local).await?,
        ReplicaCmd::Drill(cmd) => crate::drill::run(cmd, api, out).await?,
        ReplicaCmd::Pause { volume, peer } => set_paused(api, out, volume, peer, true).await?,
        ReplicaCmd::Resume { volume, peer } => set_paused(api, out, volume, peer, false).await?,
        ReplicaCmd::List => {
            let r = api
                .list_replications(pb::ListReplicationsRequest {})
                .await?
                .into_inner();
            if out.json {
                out.print_json(&Value::Array(
                    r.replications.iter().map(status_json).collect(),
                ));
            } else {
                rows(&r.replications);
            }
        }
        ReplicaCmd::Verify {
            volume,
            resync,
            peer,
        } => crate::verify::run(api, out, volume, peer, resync).await?,
    }
    Ok(())
}
