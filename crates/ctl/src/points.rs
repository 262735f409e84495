//! `emberctl replica points|point create|set` and the `--at` of promotions:
//! recovery points on the secondary (docs/points.md).

use std::time::UNIX_EPOCH;

use anyhow::Context;
use clap::Subcommand;
use ember_common::format_size;
use ember_proto::control::v1 as pb;
use ember_proto::control::v1::ember_control_client::EmberControlClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::output::{Out, outln, table};
use crate::replica::{rfc3339, status_json};

/// `emberctl replica point …`.
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub(crate) enum PointCmd {
    /// Take a manual recovery point of VOLUME on its secondary (asked on
    /// the primary's site: at the secondary's next committed batch).
    Create {
        volume: String,
        /// Point name (default: manual-TIME).
        #[arg(long)]
        name: Option<String>,
        /// On the primary of a volume with several targets: only the
        /// target at this peer site (default: every connected target).
        #[arg(long)]
        peer: Option<String>,
    },
}

/// Where a promotion's `--at TIME|POINT` points: an RFC 3339 time (the
/// newest point at or before it) or a point's name.
pub(crate) fn parse_at(raw: &str) -> anyhow::Result<(String, i64)> {
    if raw.is_empty() {
        anyhow::bail!("--at needs an RFC 3339 time (e.g. 2026-12-04T10:22:33Z) or a point name");
    }
    match humantime::parse_rfc3339_weak(raw) {
        Ok(t) => {
            let ns = t
                .duration_since(UNIX_EPOCH)
                .with_context(|| format!("--at {raw:?} is before 1970"))?
                .as_nanos();
            Ok((
                String::new(),
                i64::try_from(ns).context("--at is too far in the future")?,
            ))
        }
        // Looks like a time but is not one: say so rather than look for a
        // point of that name.
        Err(e) if raw.as_bytes().first().is_some_and(u8::is_ascii_digit) && raw.contains(':') => {
            anyhow::bail!("--at {raw:?}: not an RFC 3339 time ({e}); e.g. 2026-12-04T10:22:33Z")
        }
        Err(_) => Ok((raw.to_owned(), 0)),
    }
}

fn secs(flag: &str, raw: &str) -> anyhow::Result<u64> {
    Ok(humantime::parse_duration(raw)
        .with_context(|| format!("--{flag} {raw:?}: use a duration like 30s, 5m or 24h"))?
        .as_secs())
}

/// The point settings of `replica enable|set` (`None`: none given).
pub(crate) fn settings(
    points_every: Option<&str>,
    keep: Option<u32>,
    keep_for: Option<&str>,
) -> anyhow::Result<Option<pb::PointSettings>> {
    if points_every.is_none() && keep.is_none() && keep_for.is_none() {
        return Ok(None);
    }
    let every = points_every.map(|r| secs("points-every", r)).transpose()?;
    if every == Some(0) && points_every.is_some_and(|r| r.trim() != "0" && r.trim() != "0s") {
        anyhow::bail!("--points-every must be at least 1s (0 turns scheduled points off)");
    }
    let keep_for = keep_for.map(|r| secs("keep-for", r)).transpose()?;
    Ok(Some(pb::PointSettings {
        has_points_every: every.is_some(),
        points_every_seconds: every.unwrap_or(0),
        has_keep: keep.is_some(),
        keep_points: keep.unwrap_or(0),
        has_keep_for: keep_for.is_some(),
        keep_for_seconds: keep_for.unwrap_or(0),
    }))
}

fn point_json(p: &pb::RecoveryPoint) -> Value {
    let mut j = json!({
        "name": p.name, "at": rfc3339(p.at_unix_ns), "at_unix_ns": p.at_unix_ns,
        "kind": p.kind, "group": p.group, "pinned_bytes": p.pinned_bytes,
    });
    // Only a primary's listing of several targets says which holds it:
    // a one-target listing keeps its shape.
    if !p.peer.is_empty() {
        j["peer"] = p.peer.clone().into();
    }
    j
}

/// Which of a volume's points belong to the target at `peer`: a volume
/// with several targets labels each point with its target; one with a
/// single target (or a secondary, whose points are its own) labels none,
/// and then every point is that one link's. `links` are the sites the
/// volume replicates with (its targets, or its primary on a secondary).
fn points_of_peer(
    points: Vec<pb::RecoveryPoint>,
    peer: &str,
    links: &[String],
) -> Result<Vec<pb::RecoveryPoint>, String> {
    if !links.iter().any(|l| l == peer) {
        return Err(format!(
            "no replication link to {peer} (links: {})",
            if links.is_empty() {
                "none".to_owned()
            } else {
                links.join(", ")
            }
        ));
    }
    if points.iter().all(|p| p.peer.is_empty()) {
        return Ok(points);
    }
    Ok(points.into_iter().filter(|p| p.peer == peer).collect())
}

/// `replica points VOLUME [--peer SITE]`.
pub(crate) async fn list(
    api: &mut EmberControlClient<Channel>,
    out: Out,
    volume: String,
    peer: Option<String>,
) -> anyhow::Result<()> {
    let mut r = api
        .list_points(pb::ListPointsRequest {
            volume: volume.clone(),
        })
        .await?
        .into_inner();
    if let Some(peer) = peer {
        let s = crate::replica::status(api, &volume).await?;
        let links: Vec<String> = match s.targets.is_empty() {
            true => vec![s.peer_site],
            false => s.targets.into_iter().map(|t| t.peer_site).collect(),
        };
        r.points = points_of_peer(std::mem::take(&mut r.points), &peer, &links)
            .map_err(|e| anyhow::anyhow!("{volume}: {e}"))?;
    }
    if out.json {
        out.print_json(&Value::Array(r.points.iter().map(point_json).collect()));
        return Ok(());
    }
    let several = r.points.iter().any(|p| !p.peer.is_empty());
    let headers: &[&str] = if several {
        &["PEER", "NAME", "AT", "KIND", "GROUP", "PINNED"]
    } else {
        &["NAME", "AT", "KIND", "GROUP", "PINNED"]
    };
    table(
        headers,
        r.points
            .iter()
            .map(|p| {
                let peer = several.then(|| p.peer.clone());
                peer.into_iter()
                    .chain([
                        p.name.clone(),
                        rfc3339(p.at_unix_ns).unwrap_or_default(),
                        p.kind.clone(),
                        p.group.clone(),
                        format_size(p.pinned_bytes),
                    ])
                    .collect()
            })
            .collect(),
    );
    outln!(
        "schedule: {}; keep {}; keep for {}",
        match r.points_every_seconds {
            0 => "none".to_owned(),
            s => format!("every {s}s"),
        },
        match r.keep_points {
            0 => "any number".to_owned(),
            n => n.to_string(),
        },
        match r.keep_for_seconds {
            0 => "any age".to_owned(),
            s => format!("{s}s"),
        }
    );
    Ok(())
}

/// `replica point …`.
pub(crate) async fn run(
    cmd: PointCmd,
    api: &mut EmberControlClient<Channel>,
    out: Out,
) -> anyhow::Result<()> {
    match cmd {
        PointCmd::Create { volume, name, peer } => {
            let r = api
                .create_point(pb::CreatePointRequest {
                    volume: volume.clone(),
                    name: name.unwrap_or_default(),
                    peer: peer.unwrap_or_default(),
                })
                .await?
                .into_inner();
            // Several targets: one point per target, each naming its peer
            // (a list); one target: the object as always.
            let taken = if r.points.is_empty() {
                vec![r.point.context("agent returned no point")?]
            } else {
                r.points
            };
            if out.json {
                if taken.len() == 1 && taken[0].peer.is_empty() {
                    out.print_json(&point_json(&taken[0]));
                } else {
                    out.print_json(&Value::Array(taken.iter().map(point_json).collect()));
                }
            } else {
                for p in &taken {
                    let on = if p.peer.is_empty() {
                        String::new()
                    } else {
                        format!(" on {}", p.peer)
                    };
                    outln!(
                        "recovery point {} of {volume}{on} at {}",
                        p.name,
                        rfc3339(p.at_unix_ns).unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

/// `replica set VOLUME …`.
pub(crate) async fn set(
    api: &mut EmberControlClient<Channel>,
    out: Out,
    volume: String,
    peer: Option<String>,
    points: Option<pb::PointSettings>,
) -> anyhow::Result<()> {
    let points = points.context("nothing to set: give --points-every, --keep or --keep-for")?;
    let s = api
        .set_replication(pb::SetReplicationRequest {
            volume: volume.clone(),
            points: Some(points),
            peer: peer.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .status
        .context("agent returned no status")?;
    if out.json {
        out.print_json(&status_json(&s));
    } else {
        outln!("replication of {volume} updated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_is_a_time_or_a_point_name() {
        assert_eq!(
            parse_at("2026-12-04T10:22:33Z").unwrap(),
            (String::new(), 1_796_379_753_000_000_000)
        );
        assert_eq!(
            parse_at("auto-2026-12-04T10:22:33.123Z").unwrap(),
            ("auto-2026-12-04T10:22:33.123Z".to_owned(), 0)
        );
        assert_eq!(
            parse_at("before-upgrade").unwrap(),
            ("before-upgrade".to_owned(), 0)
        );
        assert!(parse_at("2026-13-04T10:22:33Z").is_err());
        assert!(parse_at("").is_err());
    }

    #[test]
    fn points_of_a_peer() {
        let point = |name: &str, peer: &str| pb::RecoveryPoint {
            name: name.to_owned(),
            peer: peer.to_owned(),
            ..Default::default()
        };
        let names = |r: Result<Vec<pb::RecoveryPoint>, String>| {
            r.map(|ps| ps.into_iter().map(|p| p.name).collect::<Vec<_>>())
        };
        let bc = ["site-b".to_owned(), "site-c".to_owned()];
        let b = ["site-b".to_owned()];
        let labelled = || {
            vec![
                point("p1", "site-b"),
                point("p2", "site-c"),
                point("p3", "site-b"),
            ]
        };
        // (points, peer, links, wanted)
        type Row<'a> = (
            Vec<pb::RecoveryPoint>,
            &'a str,
            &'a [String],
            Result<Vec<&'a str>, &'a str>,
        );
        let rows: Vec<Row<'_>> = vec![
            (labelled(), "site-b", &bc, Ok(vec!["p1", "p3"])),
            (labelled(), "site-c", &bc, Ok(vec!["p2"])),
            // a target with no points yet
            (vec![point("p1", "site-b")], "site-c", &bc, Ok(vec![])),
            // one target: points carry no label
            (
                vec![point("p1", ""), point("p2", "")],
                "site-b",
                &b,
                Ok(vec!["p1", "p2"]),
            ),
            (
                vec![point("p1", "")],
                "site-c",
                &b,
                Err("no replication link to site-c (links: site-b)"),
            ),
            (
                vec![],
                "site-b",
                &[],
                Err("no replication link to site-b (links: none)"),
            ),
        ];
        for (i, (points, peer, links, want)) in rows.into_iter().enumerate() {
            let got = names(points_of_peer(points, peer, links));
            let want = want.map(|v| v.into_iter().map(str::to_owned).collect::<Vec<_>>());
            assert_eq!(got, want.map_err(str::to_owned), "row {i}");
        }
    }

    #[test]
    fn settings_carry_only_what_was_given() {
        assert_eq!(settings(None, None, None).unwrap(), None);
        let s = settings(Some("5m"), Some(24), None).unwrap().unwrap();
        assert!(s.has_points_every && s.has_keep && !s.has_keep_for);
        assert_eq!((s.points_every_seconds, s.keep_points), (300, 24));
        let s = settings(None, None, Some("24h")).unwrap().unwrap();
        assert_eq!((s.has_keep_for, s.keep_for_seconds), (true, 86_400));
        assert!(settings(Some("soon"), None, None).is_err());
        let off = settings(Some("0s"), None, None).unwrap().unwrap();
        assert!(off.has_points_every && off.points_every_seconds == 0);
    }
}
