//! `emberctl`: every control-API operation from the shell, human tables by
//! default and `--json` for scripts, plus `lab` to run a local lab.

#[cfg(test)]
mod cli_tests;
mod client;
mod drill;
mod errors;
mod failover;
mod group;
mod lab;
mod output;
mod pki;
mod points;
mod replica;
mod top;
mod verify;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ember_common::parse_size;
use ember_proto::control::v1 as pb;

use crate::output::{Out, volume_json};

/// Ember's admin command line.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Agent API endpoint: unix:/path or http://host:port.
    #[arg(
        long,
        global = true,
        env = "EMBER_API",
        default_value = "unix:/var/lib/ember/api.sock"
    )]
    api: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// CA bundle to verify an https:// agent with.
    #[arg(long, global = true, env = "EMBER_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate for agents that require one.
    #[arg(long, global = true, env = "EMBER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Client private key.
    #[arg(long, global = true, env = "EMBER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
enum Command {
    /// Agent identity, capacity, features.
    Status,
    /// Volume operations.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Snapshot operations.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Pairing with the agents of other sites (mutual TLS).
    #[command(subcommand)]
    Peer(PeerCmd),
    /// Replication of volumes to paired sites.
    #[command(subcommand)]
    Replica(replica::ReplicaCmd),
    /// Consistency groups: volumes replicated with one write order and
    /// promoted together.
    #[command(subcommand)]
    Group(group::GroupCmd),
    /// Follow replication events (state changes, RPO breaches, resync
    /// progress, promotions) until interrupted; one line each (JSON with --json).
    Events {
        /// Only this volume's events.
        #[arg(long)]
        volume: Option<String>,
    },
    /// A local lab: two paired sites and a replicated demo volume.
    #[command(subcommand)]
    Lab(lab::LabCmd),
    /// A status view that redraws in place: per peer, its volumes worst
    /// first (state, lag vs RPO, shipping rate, resync left); q quits.
    Top(top::TopArgs),
    /// Certificates for labs and tests: a private CA and certificates it signs.
    #[command(subcommand)]
    Pki(pki::PkiCmd),
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
enum VolumeCmd {
    /// Create a volume (empty, from a snapshot, or a clone). Idempotent.
    Create {
        name: String,
        /// Size, e.g. 10G (defaults to the source's size for copies).
        #[arg(long)]
        size: Option<String>,
        /// Copy of snapshot VOLUME@SNAPSHOT.
        #[arg(long, conflicts_with = "clone_of")]
        from_snapshot: Option<String>,
        /// Point-in-time copy of another volume.
        #[arg(long)]
        clone_of: Option<String>,
        /// Dirty-bitmap granularity, e.g. 64K.
        #[arg(long)]
        granularity: Option<String>,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show { name: String },
    /// Delete a volume and its snapshots (missing is fine).
    Delete { name: String },
    /// Grow a volume.
    Resize {
        name: String,
        #[arg(long)]
        size: String,
    },
    /// Dirty extents since the last cleared checkpoint (opens a checkpoint).
    Dirty {
        name: String,
        /// Also print the checkpoint id (JSON: an object instead of a list).
        #[arg(long)]
        with_checkpoint: bool,
    },
    /// Forget dirty extents reported at CHECKPOINT (keeps later writes).
    ClearDirty { name: String, checkpoint: u64 },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
enum PeerCmd {
    /// Pair with SITE's agent; measures RTT and throughput. Idempotent.
    Add {
        site: String,
        /// host:port of the peer's replication listener.
        #[arg(long)]
        address: String,
        /// Bytes streamed to measure throughput (default 16M).
        #[arg(long)]
        measure: Option<String>,
        /// Bandwidth limit for all replication traffic, per second (e.g. 100M).
        #[arg(long)]
        max_rate: Option<String>,
        /// Bandwidth limit for resync traffic alone, per second.
        #[arg(long)]
        resync_rate: Option<String>,
    },
    /// Paired peers, probed now (state, RTT).
    List,
    /// Forget a peer (missing is fine).
    Remove { site: String },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
enum SnapshotCmd {
    /// Take a read-only point-in-time snapshot (exported as VOLUME@SNAPSHOT).
    Create { volume: String, name: String },
    /// List a volume's snapshots.
    List { volume: String },
    /// Delete a snapshot (missing is fine).
    Delete { volume: String, name: String },
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a tokio runtime");
    let json = cli.json;
    let result = runtime.block_on(dispatch(cli));
    // Not dropped: shutting the runtime down cancels the connection's task
    // and deregisters and closes its socket one by one, all of which exit
    // does anyway. Everything the command owned was dropped inside
    // `dispatch`; stdout is still flushed on the way out of `main`.
    // (Issue 13: the per-call cost of the CLI.)
    std::mem::forget(runtime);
    if let Err(e) = result {
        eprintln!("{}", errors::render(&e, json));
        std::process::exit(1);
    }
}

fn size_arg(raw: &str) -> anyhow::Result<u64> {
    parse_size(raw).map_err(anyhow::Error::msg)
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let out = Out { json: cli.json };
    let tls = client::Tls {
        ca: cli.tls_ca,
        cert: cli.tls_cert,
        key: cli.tls_key,
    };
    let mut api = match cli.command {
        Command::Lab(cmd) => return lab::run(cmd, out).await,
        Command::Pki(cmd) => return pki::run(cmd),
        _ => client::connect_with(&cli.api, &tls).await?,
    };
    match cli.command {
        Command::Lab(_) | Command::Pki(_) => unreachable!("handled above"),
        Command::Status => {
            let caps = api
                .get_capabilities(pb::GetCapabilitiesRequest {})
                .await?
                .into_inner();
            out.capabilities(&caps);
        }
        Command::Volume(cmd) => match cmd {
            VolumeCmd::Create {
                name,
                size,
                from_snapshot,
                clone_of,
                granularity,
            } => {
                let source = match (from_snapshot, clone_of) {
                    (Some(s), _) => {
                        let (volume, snapshot) = s
                            .split_once('@')
                            .context("--from-snapshot takes VOLUME@SNAPSHOT")?;
                        Some(pb::create_volume_request::Source::FromSnapshot(
                            pb::SnapshotRef {
                                volume: volume.into(),
                                snapshot: snapshot.into(),
                            },
                        ))
                    }
                    (None, Some(v)) => Some(pb::create_volume_request::Source::CloneOfVolume(v)),
                    (None, None) => None,
                };
                if source.is_none() && size.is_none() {
                    anyhow::bail!("--size is required for an empty volume");
                }
                let resp = api
                    .create_volume(pb::CreateVolumeRequest {
                        name,
                        size_bytes: size.as_deref().map(size_arg).transpose()?.unwrap_or(0),
                        tracking_granularity_bytes: granularity
                            .as_deref()
                            .map(size_arg)
                            .transpose()?
                            .unwrap_or(0),
                        source,
                    })
                    .await?
                    .into_inner();
                let v = resp.volume.context("agent returned no volume")?;
                if out.json {
                    let mut j = volume_json(&v);
                    j["created"] = resp.created.into();
                    out.print_json(&j);
                } else {
                    println!(
                        "{} volume {} ({}) at {}",
                        if resp.created { "created" } else { "exists:" },
                        v.name,
                        ember_common::format_size(v.size_bytes),
                        v.nbd_uri
                    );
                }
            }
            VolumeCmd::List => {
                let vols = api
                    .list_volumes(pb::ListVolumesRequest {})
                    .await?
                    .into_inner()
                    .volumes;
                out.volumes(&vols);
            }
            VolumeCmd::Show { name } => {
                let v = api
                    .get_volume(pb::GetVolumeRequest { name })
                    .await?
                    .into_inner()
                    .volume
                    .context("no volume")?;
                out.volume(&v);
            }
            VolumeCmd::Delete { name } => {
                let deleted = api
                    .delete_volume(pb::DeleteVolumeRequest { name: name.clone() })
                    .await?
                    .into_inner()
                    .deleted;
                out.deleted("volume", &name, deleted);
            }
            VolumeCmd::Resize { name, size } => {
                let v = api
                    .resize_volume(pb::ResizeVolumeRequest {
                        name,
                        size_bytes: size_arg(&size)?,
                    })
                    .await?
                    .into_inner()
                    .volume
                    .context("no volume")?;
                out.volume(&v);
            }
            VolumeCmd::Dirty {
                name,
                with_checkpoint,
            } => {
                let r = api
                    .get_dirty_extents(pb::GetDirtyExtentsRequest { volume: name })
                    .await?
                    .into_inner();
                out.dirty(&r, with_checkpoint);
            }
            VolumeCmd::ClearDirty { name, checkpoint } => {
                let r = api
                    .clear_dirty_extents(pb::ClearDirtyExtentsRequest {
                        volume: name,
                        checkpoint_id: checkpoint,
                    })
                    .await?
                    .into_inner();
                if out.json {
                    out.print_json(
                        &serde_json::json!({ "remaining_dirty_bytes": r.remaining_dirty_bytes }),
                    );
                } else {
                    println!(
                        "cleared; {} still dirty",
                        ember_common::format_size(r.remaining_dirty_bytes)
                    );
                }
            }
        },
        Command::Peer(cmd) => match cmd {
            PeerCmd::Add {
                site,
                address,
                measure,
                max_rate,
                resync_rate,
            } => {
                let rate = |r: Option<String>| -> anyhow::Result<u64> {
                    Ok(r.as_deref().map(size_arg).transpose()?.unwrap_or(0))
                };
                let r = api
                    .add_peer(pb::AddPeerRequest {
                        site,
                        address,
                        measure_bytes: measure.as_deref().map(size_arg).transpose()?.unwrap_or(0),
                        max_rate_bytes_per_sec: rate(max_rate)?,
                        resync_rate_bytes_per_sec: rate(resync_rate)?,
                    })
                    .await?
                    .into_inner();
                out.peers(&[r.peer.context("agent returned no peer")?]);
            }
            PeerCmd::List => {
                let r = api.list_peers(pb::ListPeersRequest {}).await?.into_inner();
                out.peers(&r.peers);
            }
            PeerCmd::Remove { site } => {
                let removed = api
                    .remove_peer(pb::RemovePeerRequest { site: site.clone() })
                    .await?
                    .into_inner()
                    .removed;
                out.deleted("peer", &site, removed);
            }
        },
        Command::Replica(cmd) => replica::run(cmd, &mut api, out).await?,
        Command::Group(cmd) => group::run(cmd, &mut api, out).await?,
        Command::Events { volume } => failover::events(&mut api, out, volume).await?,
        Command::Top(args) => top::run(&mut api, out, args, &cli.api).await?,
        Command::Snapshot(cmd) => match cmd {
            SnapshotCmd::Create { volume, name } => {
                let r = api
                    .create_snapshot(pb::CreateSnapshotRequest { volume, name })
                    .await?
                    .into_inner();
                out.snapshots(&[r.snapshot.context("no snapshot")?]);
            }
            SnapshotCmd::List { volume } => {
                let r = api
                    .list_snapshots(pb::ListSnapshotsRequest { volume })
                    .await?
                    .into_inner();
                out.snapshots(&r.snapshots);
            }
            SnapshotCmd::Delete { volume, name } => {
                let deleted = api
                    .delete_snapshot(pb::DeleteSnapshotRequest {
                        volume: volume.clone(),
                        name: name.clone(),
                    })
                    .await?
                    .into_inner()
                    .deleted;
                out.deleted("snapshot", &format!("{volume}@{name}"), deleted);
            }
        },
    }
    Ok(())
}
