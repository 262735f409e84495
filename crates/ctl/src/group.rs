//! `emberctl group …`: consistency groups — volumes replicated with one
//! shared write order and promoted together.

use anyhow::Context;
use clap::Subcommand;
use ember_proto::control::v1 as pb;
use ember_proto::control::v1::ember_control_client::EmberControlClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::output::{Out, outln, table};
use crate::replica::rfc3339;

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub(crate) enum GroupCmd {
    /// Create a group on this (primary) site replicating to a paired site;
    /// for an existing group, add another target (every member must
    /// replicate to it already).
    Create {
        name: String,
        /// Paired site holding the members' secondaries.
        #[arg(long)]
        peer: String,
    },
    /// Add volumes (already replicating async to the group's peer).
    Add { name: String, volumes: Vec<String> },
    /// Remove volumes; they keep replicating on their own.
    Remove { name: String, volumes: Vec<String> },
    /// Members, their lag and the group's consistent point.
    Status { name: String },
    /// Every group on this site.
    List,
    /// Promote every member of the secondary group held here. Planned:
    /// zero loss. --force: the primary site is gone; every member comes up
    /// on the group's last common point, which is reported.
    Promote {
        name: String,
        #[arg(long)]
        force: bool,
        /// With --force: every member comes up on one group recovery
        /// point, by name or as the newest at or before an RFC 3339 time.
        #[arg(long, value_name = "TIME|POINT")]
        at: Option<String>,
    },
    /// Delete an empty group.
    Delete { name: String },
    /// DR drills of every member at one group recovery point (on the
    /// secondary's site).
    #[command(subcommand)]
    Drill(crate::drill::GroupDrillCmd),
}

fn members_json(members: &[pb::GroupMemberStatus]) -> Vec<Value> {
    members
        .iter()
        .map(|m| {
            json!({
                "volume": m.volume, "state": m.state, "lag_seconds": m.lag_seconds,
                "lag_bytes": m.lag_bytes,
                "consistent_at": rfc3339(m.consistent_at_unix_ns),
                "consistent_at_unix_ns": m.consistent_at_unix_ns,
            })
        })
        .collect()
}

/// A group's JSON: the top-level fields are the worst target's, `targets`
/// lists each (like `replica status`).
pub(crate) fn group_json(g: &pb::GroupStatus) -> Value {
    json!({
        "name": g.name, "role": g.role, "peer": g.peer_site,
        "consistent": g.consistent,
        "consistent_at": rfc3339(g.consistent_at_unix_ns),
        "consistent_at_unix_ns": g.consistent_at_unix_ns,
        "lag_seconds": g.lag_seconds,
        "members": members_json(&g.members),
        "targets": g.targets.iter().map(|t| json!({
            "peer": t.peer_site, "mode": t.mode, "consistent": t.consistent,
            "consistent_at": rfc3339(t.consistent_at_unix_ns),
            "consistent_at_unix_ns": t.consistent_at_unix_ns,
            "lag_seconds": t.lag_seconds,
            "members": members_json(&t.members),
        })).collect::<Vec<_>>(),
    })
}

fn print(out: Out, g: &pb::GroupStatus) {
    if out.json {
        out.print_json(&group_json(g));
        return;
    }
    outln!(
        "group {} ({} here, peer {}): {} at {}",
        g.name,
        g.role,
        g.peer_site,
        if g.consistent {
            "consistent"
        } else {
            "not at one point"
        },
        rfc3339(g.consistent_at_unix_ns).unwrap_or_else(|| "never".into())
    );
    table(
        &["VOLUME", "STATE", "LAG", "CONSISTENT AT"],
        g.members
            .iter()
            .map(|m| {
                vec![
                    m.volume.clone(),
                    m.state.clone(),
                    format!("{:.2}s", m.lag_seconds),
                    rfc3339(m.consistent_at_unix_ns).unwrap_or_else(|| "never".into()),
                ]
            })
            .collect(),
    );
    // Several targets: the lines above are the worst one's; each here.
    if g.targets.len() > 1 {
        table(
            &["TARGET", "MODE", "AT ONE POINT", "LAG", "CONSISTENT AT"],
            g.targets
                .iter()
                .map(|t| {
                    vec![
                        t.peer_site.clone(),
                        t.mode.clone(),
                        if t.consistent { "yes" } else { "no" }.to_owned(),
                        format!("{:.2}s", t.lag_seconds),
                        rfc3339(t.consistent_at_unix_ns).unwrap_or_else(|| "never".into()),
                    ]
                })
                .collect(),
        );
    }
}

/// Adds (or removes) each volume in turn; returns the group's last status.
async fn change_members(
    api: &mut EmberControlClient<Channel>,
    name: &str,
    volumes: Vec<String>,
    add: bool,
) -> anyhow::Result<pb::GroupStatus> {
    let mut last = None;
    for volume in volumes {
        let req = pb::GroupMemberRequest {
            group: name.to_owned(),
            volume,
        };
        let r = if add {
            api.add_to_group(req).await?
        } else {
            api.remove_from_group(req).await?
        };
        last = r.into_inner().status;
    }
    last.context("agent returned no status")
}

pub(crate) async fn run(
    cmd: GroupCmd,
    api: &mut EmberControlClient<Channel>,
    out: Out,
) -> anyhow::Result<()> {
    match cmd {
        GroupCmd::Create { name, peer } => {
            let r = api
                .create_group(pb::CreateGroupRequest {
                    name,
                    peer_site: peer,
                })
                .await?
                .into_inner();
            print(out, &r.status.context("agent returned no status")?);
        }
        GroupCmd::Add { name, volumes } | GroupCmd::Remove { name, volumes }
            if volumes.is_empty() =>
        {
            anyhow::bail!("name at least one volume for group {name}");
        }
        GroupCmd::Add { name, volumes } => {
            let status = change_members(api, &name, volumes, true).await?;
            print(out, &status);
        }
        GroupCmd::Remove { name, volumes } => {
            let status = change_members(api, &name, volumes, false).await?;
            print(out, &status);
        }
        GroupCmd::Status { name } => {
            let r = api
                .get_group_status(pb::GetGroupStatusRequest { name })
                .await?
                .into_inner();
            print(out, &r.status.context("agent returned no status")?);
        }
        GroupCmd::List => {
            let groups = api
                .list_groups(pb::ListGroupsRequest {})
                .await?
                .into_inner()
                .groups;
            if out.json {
                out.print_json(&Value::Array(groups.iter().map(group_json).collect()));
                return Ok(());
            }
            table(
                &["GROUP", "ROLE", "PEER", "MEMBERS", "CONSISTENT AT", "LAG"],
                groups
                    .iter()
                    .map(|g| {
                        vec![
                            g.name.clone(),
                            g.role.clone(),
                            g.peer_site.clone(),
                            g.members.len().to_string(),
                            rfc3339(g.consistent_at_unix_ns).unwrap_or_else(|| "never".into()),
                            format!("{:.2}s", g.lag_seconds),
                        ]
                    })
                    .collect(),
            );
        }
        GroupCmd::Drill(cmd) => crate::drill::run_group(cmd, api, out).await?,
        GroupCmd::Promote { name, force, at } => {
            let (at_point, at_unix_ns) = at
                .as_deref()
                .map(crate::points::parse_at)
                .transpose()?
                .unwrap_or_default();
            let r = api
                .promote_group(pb::PromoteGroupRequest {
                    name: name.clone(),
                    force,
                    at_point,
                    at_unix_ns,
                })
                .await?
                .into_inner();
            let status = r.status.context("agent returned no status")?;
            if out.json {
                let mut v = group_json(&status);
                v["forced"] = json!(r.forced);
                v["recovery_point"] = json!(rfc3339(r.recovery_point_unix_ns));
                v["recovery_point_unix_ns"] = json!(r.recovery_point_unix_ns);
                out.print_json(&v);
                return Ok(());
            }
            if r.forced {
                outln!(
                    "group {name} force-promoted: every member came up on {} — writes acknowledged on {} after it are lost",
                    rfc3339(r.recovery_point_unix_ns).unwrap_or_else(|| "unknown".into()),
                    status.peer_site
                );
            } else {
                outln!("group {name} promoted (planned, zero loss)");
            }
            print(out, &status);
        }
        GroupCmd::Delete { name } => {
            let r = api
                .delete_group(pb::DeleteGroupRequest { name: name.clone() })
                .await?
                .into_inner();
            out.deleted("group", &name, r.existed);
        }
    }
    Ok(())
}
