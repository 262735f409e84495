//! `emberctl replica drill …`: DR drills on the secondary's site — start
//! a writable, unreplicated copy of a consistent image (the newest, or a
//! recovery point), list them, stop (delete) one.

use anyhow::Context;
use clap::Subcommand;
use ember_common::format_size;
use ember_proto::control::v1 as pb;
use ember_proto::control::v1::ember_control_client::EmberControlClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::output::{Out, outln, table};
use crate::replica::rfc3339;

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub(crate) enum DrillCmd {
    /// Make a writable volume from a consistent image of secondary VOLUME
    /// (asked on the secondary's site). Replication goes on; the drill is
    /// never replicated.
    Start {
        volume: String,
        /// A recovery point's name, or a time (RFC 3339, e.g.
        /// 2026-12-04T10:15:00Z: the newest point at or before it).
        /// Default: the newest consistent image.
        #[arg(long, value_name = "TIME|POINT")]
        at: Option<String>,
        /// The drill's volume and NBD export name (default:
        /// VOLUME-drill-<unix seconds>).
        #[arg(long)]
        name: Option<String>,
    },
    /// Drills on this site (of VOLUME only, when given).
    List { volume: Option<String> },
    /// Delete a drill's volume (or every member of a group drill of that
    /// name): one step, nothing resynced.
    Stop { name: String },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub(crate) enum GroupDrillCmd {
    /// One drill per member of secondary group GROUP (asked on the
    /// secondary's site), all from one group recovery point; members are
    /// named NAME-MEMBER.
    Start {
        group: String,
        /// A group recovery point's name, or a time (RFC 3339: the newest
        /// group point at or before it). Default: the newest group point.
        #[arg(long, value_name = "TIME|POINT")]
        at: Option<String>,
        /// The group drill's name (default: GROUP-drill-<unix seconds>).
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete every member drill of group drill NAME.
    Stop { name: String },
}

fn drill_json(d: &pb::Drill) -> Value {
    json!({
        "name": d.name, "volume": d.volume, "point": d.point,
        "at": rfc3339(d.at_unix_ns), "at_unix_ns": d.at_unix_ns,
        "nbd_uri": d.nbd_uri, "size_bytes": d.size_bytes,
        "created_at": rfc3339(d.created_at_unix_ns),
        "nbd_connections": d.nbd_connections, "group": d.group,
    })
}

/// Drills as a JSON array or a table.
fn print_drills(out: Out, drills: &[pb::Drill]) {
    if out.json {
        return out.print_json(&Value::Array(drills.iter().map(drill_json).collect()));
    }
    table(
        &[
            "NAME", "VOLUME", "POINT", "IMAGE OF", "SIZE", "NBD URI", "CONN",
        ],
        drills
            .iter()
            .map(|d| {
                vec![
                    d.name.clone(),
                    d.volume.clone(),
                    d.point.clone(),
                    rfc3339(d.at_unix_ns).unwrap_or_else(|| "-".into()),
                    format_size(d.size_bytes),
                    d.nbd_uri.clone(),
                    d.nbd_connections.to_string(),
                ]
            })
            .collect(),
    );
}

/// `--at` read as `replica promote --at` reads it; absent: the newest image.
fn parse_at(at: Option<&str>) -> anyhow::Result<(String, i64)> {
    Ok(at
        .map(crate::points::parse_at)
        .transpose()?
        .unwrap_or_default())
}

pub(crate) async fn run(
    cmd: DrillCmd,
    api: &mut EmberControlClient<Channel>,
    out: Out,
) -> anyhow::Result<()> {
    match cmd {
        DrillCmd::Start { volume, at, name } => {
            let (point, at_unix_ns) = parse_at(at.as_deref())?;
            let d = api
                .start_drill(pb::StartDrillRequest {
                    volume,
                    name: name.unwrap_or_default(),
                    point,
                    at_unix_ns,
                })
                .await?
                .into_inner()
                .drill
                .context("agent returned no drill")?;
            if out.json {
                out.print_json(&drill_json(&d));
            } else {
                outln!(
                    "drill {} of {} started from {} (image of {}): {}",
                    d.name,
                    d.volume,
                    d.point,
                    rfc3339(d.at_unix_ns).unwrap_or_else(|| "-".into()),
                    d.nbd_uri
                );
            }
        }
        DrillCmd::List { volume } => {
            let drills = api
                .list_drills(pb::ListDrillsRequest {
                    volume: volume.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .drills;
            print_drills(out, &drills);
        }
        DrillCmd::Stop { name } => stop(api, out, name).await?,
    }
    Ok(())
}

async fn stop(api: &mut EmberControlClient<Channel>, out: Out, name: String) -> anyhow::Result<()> {
    let r = api
        .stop_drill(pb::StopDrillRequest { name: name.clone() })
        .await?
        .into_inner();
    if out.json {
        out.print_json(&json!({ "name": name, "stopped": r.existed, "drills": r.stopped }));
    } else if r.existed {
        outln!(
            "stopped {}; their volumes are deleted",
            r.stopped.join(", ")
        );
    } else {
        outln!("no drill named {name} on this site");
    }
    Ok(())
}

/// `emberctl group drill …`.
pub(crate) async fn run_group(
    cmd: GroupDrillCmd,
    api: &mut EmberControlClient<Channel>,
    out: Out,
) -> anyhow::Result<()> {
    match cmd {
        GroupDrillCmd::Start { group, at, name } => {
            let (point, at_unix_ns) = parse_at(at.as_deref())?;
            let drills = api
                .start_group_drill(pb::StartGroupDrillRequest {
                    group,
                    name: name.unwrap_or_default(),
                    point,
                    at_unix_ns,
                })
                .await?
                .into_inner()
                .drills;
            print_drills(out, &drills);
        }
        GroupDrillCmd::Stop { name } => stop(api, out, name).await?,
    }
    Ok(())
}
