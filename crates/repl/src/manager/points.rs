//! Recovery points seen from the control API: the schedule of a primary
//! replica (`replica enable|set --points-every … --keep …`), manual points
//! asked on either site, listing, and promotion to a point (one volume or a
//! consistency group).
//!
//! The secondary does the work (`secondary::points`); which point and which
//! ranges are decided by `plan::points`. A promotion to a point rolls the
//! secondary back first — making the blocks that differ from the newest
//! image durable in the new primary's change set *and* in the secondary
//! record before the image changes — then runs the ordinary forced
//! promotion, so failback resends those blocks and never the volume.

use std::sync::Arc;

use ember_common::Extent;
use ember_proto::repl::v1 as pb;
use tonic::Status;

use super::Replication;
use super::groups::GroupPromoteReport;
use super::roles::PromoteReport;
use crate::audit::Entry;
use crate::error::{ReplError, Result};
use crate::plan::points::Schedule;
use crate::primary::link::{ReplicaLink, consumer_name, now_unix_ns};
use crate::secondary::points::{PointListing, PointSelector, PointsReport, rfc3339};
use crate::version::ProtocolVersion;

/// Which recovery point a promotion means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointTarget {
    /// The point of that name.
    Name(String),
    /// The newest point at or before this time (unix ns, primary clock).
    At(i64),
}

impl PointTarget {
    fn selector(&self) -> PointSelector {
        match self {
            Self::Name(n) => PointSelector::Name(n.clone()),
            Self::At(t) => PointSelector::At(*t),
        }
    }
}

/// Point settings to change; `None` leaves a setting as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PointSettings {
    /// Seconds between scheduled points (0: none).
    pub every_secs: Option<u64>,
    /// Scheduled points kept (0: no count limit).
    pub keep: Option<u32>,
    /// Age limit of scheduled points in seconds (0: none).
    pub keep_for_secs: Option<u64>,
}

impl PointSettings {
    fn is_empty(&self) -> bool {
        self.every_secs.is_none() && self.keep.is_none() && self.keep_for_secs.is_none()
    }

    fn apply(&self, s: &mut Schedule) {
        if let Some(v) = self.every_secs {
            s.every_secs = v;
        }
        if let Some(v) = self.keep {
            s.keep = v;
        }
        if let Some(v) = self.keep_for_secs {
            s.keep_for_secs = v;
        }
    }
}

/// A secondary's status, kept as a typed error of this layer.
fn from_status(status: &Status) -> ReplError {
    let m = status.message().to_owned();
    match status.code() {
        tonic::Code::NotFound => ReplError::NotFound(m),
        tonic::Code::InvalidArgument => ReplError::InvalidArgument(m),
        tonic::Code::FailedPrecondition => ReplError::FailedPrecondition(m),
        _ => ReplError::Internal(m),
    }
}

fn check_target(force: bool, target: &PointTarget) -> Result<()> {
    if !force {
        return Err(ReplError::InvalidArgument(
            "--at brings the secondary up on an older image and loses every write after it: \
             it needs --force"
                .into(),
        ));
    }
    match target {
        PointTarget::At(t) if *t > now_unix_ns() => Err(ReplError::InvalidArgument(format!(
            "--at {} is in the future (now is {}); name a past time or a point",
            rfc3339(*t),
            rfc3339(now_unix_ns())
        ))),
        PointTarget::Name(n) if n.is_empty() => {
            Err(ReplError::InvalidArgument("--at names no point".into()))
        }
        _ => Ok(()),
    }
}

/// The wire spelling of a point kind, back to the `'static` one the
/// listing carries; a kind this build does not know (a newer peer) is
/// listed as `unknown` rather than failing the whole listing.
fn kind_from_wire(kind: &str) -> &'static str {
    match kind {
        "scheduled" => "scheduled",
        "manual" => "manual",
        _ => "unknown",
    }
}

fn report_to_peer(r: PointsReport) -> pb::PeerListPointsResponse {
    pb::PeerListPointsResponse {
        points: r
            .points
            .into_iter()
            .map(|p| pb::PeerRecoveryPoint {
                name: p.name,
                at_unix_ns: p.at_unix_ns,
                kind: p.kind.to_owned(),
                group: p.group,
                pinned_bytes: p.pinned_bytes,
            })
            .collect(),
        points_every_seconds: r.every_secs,
        keep_points: r.keep,
        keep_for_seconds: r.keep_for_secs,
    }
}

fn report_from_peer(r: pb::PeerListPointsResponse) -> PointsReport {
    PointsReport {
        points: r
            .points
            .into_iter()
            .map(|p| PointListing {
                kind: kind_from_wire(&p.kind),
                name: p.name,
                at_unix_ns: p.at_unix_ns,
                group: p.group,
                pinned_bytes: p.pinned_bytes,
                peer: String::new(),
            })
            .collect(),
        every_secs: r.points_every_seconds,
        keep: r.keep_points,
        keep_for_secs: r.keep_for_seconds,
    }
}

impl Replication {
    /// Marks `ranges` in the change set the volume will replicate to
    /// `peer` with once it is primary here (creating it, clean, if
    /// needed), durably, so failback resends them.
    pub(super) fn premark_change_set(
        &self,
        volume: &str,
        peer: &str,
        ranges: &[(u64, u64)],
    ) -> std::result::Result<(), Status> {
        if ranges.is_empty() {
            return Ok(());
        }
        let v = self
            .store
            .export(volume)
            .ok_or_else(|| Status::not_found(format!("volume {volume} not found")))?;
        let tracker = v.tracker().cloned().ok_or_else(|| {
            Status::failed_precondition("replication needs change tracking (--no-tracking is set)")
        })?;
        let consumer = consumer_name(peer);
        tracker
            .add_consumer(&self.store_tracking_dir(volume), &consumer, false)
            .map_err(|e| Status::internal(format!("creating the change set: {e}")))?;
        let extents: Vec<Extent> = ranges
            .iter()
            .map(|&(offset, length)| Extent { offset, length })
            .collect();
        tracker
            .consumer_mark(&consumer, &extents)
            .map_err(|e| Status::internal(format!("marking the change set: {e}")))
    }

    /// Rolls secondary `volume` back to `sel` (its changes since durable
    /// in the future change set and the record) and audit-logs it.
    async fn roll_back(&self, volume: &str, sel: &PointSelector) -> Result<i64> {
        let sv = self.secondaries.get(volume).ok_or_else(|| {
            ReplError::NotFound(format!("volume {volume} is not a secondary on this site"))
        })?;
        let rec = sv.record();
        let (point, ranges) = self
            .secondaries
            .rollback_to_point(volume, sel, |ranges| {
                self.premark_change_set(volume, &rec.primary_site, ranges)
            })
            .await
            .map_err(|s| from_status(&s))?;
        let bytes: u64 = ranges.iter().map(|r| r.1).sum();
        self.audit.record(&Entry {
            action: "rollback-to-point",
            volume,
            peer: &rec.primary_site,
            generation: rec.generation,
            detail: format!(
                "rolled back to recovery point {} ({}); {bytes} bytes changed since it join the failback resync",
                point.name,
                rfc3339(point.at_unix_ns)
            ),
        });
        Ok(point.at_unix_ns)
    }

    /// `replica promote VOL --force --at TIME|POINT`: the secondary held
    /// here comes up on that recovery point; `recovery_point` reports the
    /// point's time. Failback later resends the blocks changed since it
    /// (plus the old primary's own changes), never the volume.
    ///
    /// # Errors
    /// `InvalidArgument` without `force` or for a future time; `NotFound`
    /// for an unknown point or a time older than every point (naming the
    /// oldest); `FailedPrecondition` on the primary's site.
    pub async fn promote_to_point(
        &self,
        volume: &str,
        force: bool,
        target: &PointTarget,
    ) -> Result<PromoteReport> {
        check_target(force, target)?;
        if let Some(link) = self.link(volume) {
            return Err(ReplError::FailedPrecondition(format!(
                "volume {volume} is primary here; recovery points live on its secondary at {}: \
                 promote there",
                link.config().peer
            )));
        }
        let at = self.roll_back(volume, &target.selector()).await?;
        let report = self.promote_as(volume, true, None).await?;
        tracing::warn!(volume, point_at = %rfc3339(at), generation = report.generation, "promoted to a recovery point");
        Ok(PromoteReport {
            recovery_point_unix_ns: at,
            ..report
        })
    }

    /// `group promote NAME --force --at …`: every member of the secondary
    /// group held here comes up on one group recovery point.
    ///
    /// # Errors
    /// As [`Self::promote_to_point`]; `NotFound` when the members share no
    /// such point.
    pub async fn promote_group_to_point(
        &self,
        name: &str,
        force: bool,
        target: &PointTarget,
    ) -> Result<GroupPromoteReport> {
        check_target(force, target)?;
        self.promote_group_with(name, true, Some(target.selector()))
            .await
    }

    /// Rolls every member of group `name` back to one common point `sel`
    /// (the group is frozen and its members quiesced by the caller).
    /// Returns the point's time.
    pub(super) async fn roll_back_group(
        &self,
        name: &str,
        members: &[String],
        sel: &PointSelector,
    ) -> Result<i64> {
        let at = self
            .secondaries
            .resolve_group_point(name, members, sel)
            .map_err(|s| from_status(&s))?;
        for m in members {
            let got = self.roll_back(m, &PointSelector::At(at)).await?;
            if got != at {
                return Err(ReplError::Internal(format!(
                    "member {m} rolled back to {got}, not the group point {at}"
                )));
            }
        }
        Ok(at)
    }

    /// `replica point create VOL [--name NAME] [--peer X]`: on the
    /// secondary's site a point at once; on the primary's, asked of the
    /// secondary, which takes it once it holds the writes acknowledged
    /// before the request. With several targets: of the one at `peer`, or
    /// (`None`) of every target, skipping those unreachable now
    /// (`UNAVAILABLE`; all unreachable: that error); each point then names
    /// its `peer`.
    ///
    /// # Errors
    /// The secondary's refusal (no reflink, inconsistent, name taken…);
    /// `NOT_FOUND` for a `peer` that is no target.
    pub async fn create_point(
        &self,
        volume: &str,
        name: Option<String>,
        peer: Option<&str>,
    ) -> std::result::Result<Vec<PointListing>, Status> {
        if self.link(volume).is_none() {
            return Ok(vec![self.secondaries.create_point(volume, name, 0).await?]);
        }
        let links = self
            .chosen_links(volume, peer)
            .map_err(|e| Status::not_found(e.to_string()))?;
        if self.extra_links(volume).is_empty() {
            // One target: its point as always, no `peer`.
            return Ok(vec![self.create_point_on(volume, name, &links[0]).await?]);
        }
        let mut taken = Vec::new();
        let mut unreachable = None;
        for link in &links {
            match self.create_point_on(volume, name.clone(), link).await {
                Ok(mut p) => {
                    p.peer = link.config().peer;
                    taken.push(p);
                }
                Err(s) if peer.is_none() && s.code() == tonic::Code::Unavailable => {
                    tracing::warn!(volume, peer = %link.config().peer, error = %s.message(), "recovery point not taken on an unreachable target");
                    unreachable = Some(s);
                }
                Err(s) => return Err(s),
            }
        }
        match (taken.is_empty(), unreachable) {
            (true, Some(s)) => Err(s),
            _ => Ok(taken),
        }
    }

    /// [`Self::create_point`] on the secondary of one target.
    async fn create_point_on(
        &self,
        volume: &str,
        name: Option<String>,
        link: &Arc<ReplicaLink>,
    ) -> std::result::Result<PointListing, Status> {
        let cfg = link.config();
        let (mut client, _, version) = self
            .ctx
            .registry
            .call_client(&cfg.peer)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if version < ProtocolVersion::POINTS {
            return Err(Status::failed_precondition(format!(
                "peer {} was paired at protocol version {version}; re-pair it (emberctl peer add) for recovery points",
                cfg.peer
            )));
        }
        // Lag 0: the secondary holds every acknowledged write already.
        let not_before = if link.lag().1 == 0 { 0 } else { now_unix_ns() };
        let r = client
            .create_point(pb::PeerCreatePointRequest {
                volume: volume.to_owned(),
                name: name.unwrap_or_default(),
                primary_backend_id: self.ctx.identity.backend_id.clone(),
                not_before_unix_ns: not_before,
            })
            .await
            .map_err(|s| {
                Status::new(
                    s.code(),
                    format!("{} (at {}): {}", cfg.peer, cfg.peer, s.message()),
                )
            })?
            .into_inner();
        Ok(PointListing {
            name: r.name,
            at_unix_ns: r.at_unix_ns,
            kind: "manual",
            group: cfg.group.unwrap_or_default(),
            pinned_bytes: 0,
            peer: String::new(),
        })
    }

    /// `replica points VOL` answered from this site's own state: the
    /// points of a secondary held here (the metrics use this; it never
    /// leaves the agent).
    ///
    /// # Errors
    /// `FailedPrecondition` on the primary's site (naming the site to
    /// ask), `NotFound` for a volume not replicated here.
    pub fn list_points(&self, volume: &str) -> std::result::Result<PointsReport, Status> {
        if let Some(link) = self.link(volume) {
            return Err(Status::failed_precondition(format!(
                "volume {volume} is primary here; its recovery points are listed on the secondary's site {}",
                link.config().peer
            )));
        }
        self.secondaries.list_points(volume)
    }

    /// `replica points VOL` on either site: a secondary held here answers
    /// from its own state; a primary asks each target's secondary over the
    /// peer link (`ListPoints`), as `point create` does. One target: its
    /// listing as it is. Several: every target's points, target by target
    /// (first target first, each oldest first), each with its `peer`; the
    /// schedule fields are the first target's.
    ///
    /// # Errors
    /// As [`Self::list_points`] on the secondary's site; on the primary's,
    /// `UNAVAILABLE` when a secondary cannot be reached,
    /// `FAILED_PRECONDITION` for a peer too old to list points, and the
    /// secondary's own refusal (prefixed with its site).
    pub async fn list_points_on_either_site(
        &self,
        volume: &str,
    ) -> std::result::Result<PointsReport, Status> {
        if self.link(volume).is_none() {
            return self.secondaries.list_points(volume);
        }
        let links = self
            .chosen_links(volume, None)
            .map_err(|e| Status::not_found(e.to_string()))?;
        let several = links.len() > 1;
        let mut all: Option<PointsReport> = None;
        for link in links {
            let peer = link.config().peer;
            let mut r = self.points_of_target(volume, &peer).await?;
            if several {
                for p in &mut r.points {
                    p.peer.clone_from(&peer);
                }
            }
            match &mut all {
                None => all = Some(r),
                Some(a) => a.points.append(&mut r.points),
            }
        }
        Ok(all.expect("a primary replica has a first target"))
    }

    /// The points of the secondary at `peer` of primary replica `volume`,
    /// asked over the peer link.
    async fn points_of_target(
        &self,
        volume: &str,
        peer: &str,
    ) -> std::result::Result<PointsReport, Status> {
        let too_old = || {
            Status::failed_precondition(format!(
                "peer {peer} is too old to list recovery points for its primary: ask on site {peer}, or upgrade it"
            ))
        };
        let (mut client, _, version) = self
            .ctx
            .registry
            .call_client(peer)
            .await
            .map_err(|e| Status::unavailable(format!("{peer}: {e}")))?;
        if version < ProtocolVersion::POINTS {
            return Err(too_old());
        }
        let r = client
            .list_points(pb::PeerListPointsRequest {
                volume: volume.to_owned(),
                primary_backend_id: self.ctx.identity.backend_id.clone(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unimplemented => too_old(),
                code => Status::new(code, format!("{peer}: {}", s.message())),
            })?
            .into_inner();
        Ok(report_from_peer(r))
    }

    /// `ListPoints` from a peer: the points of secondary `volume` held
    /// here, for its primary only.
    ///
    /// # Errors
    /// `NOT_FOUND` (not a secondary here), `FAILED_PRECONDITION` when the
    /// caller is not this secondary's primary.
    pub(crate) fn list_points_for_peer(
        &self,
        req: &pb::PeerListPointsRequest,
    ) -> std::result::Result<pb::PeerListPointsResponse, Status> {
        let report = self.secondaries.list_points(&req.volume)?;
        let rec = self
            .secondaries
            .get(&req.volume)
            .ok_or_else(|| {
                Status::not_found(format!("volume {} is not a secondary here", req.volume))
            })?
            .record();
        if rec.primary_backend_id != req.primary_backend_id {
            return Err(Status::failed_precondition(format!(
                "volume {} is a secondary of {} here, not of the caller",
                req.volume, rec.primary_site
            )));
        }
        Ok(report_to_peer(report))
    }

    /// `replica enable|set … --points-every --keep --keep-for`: changes
    /// the schedule of the primary replica's target at `peer` (`None`:
    /// every target, first target first; `replica enable --peer X` passes
    /// X) and restarts that target's session so its secondary learns it at
    /// once (a paused further target learns it when resumed). Returns
    /// whether anything changed.
    ///
    /// # Errors
    /// `NotFound` (not replicated here, or no target at `peer`);
    /// `FailedPrecondition` on the secondary's site or for a peer too old
    /// for points.
    pub async fn set_points(
        &self,
        volume: &str,
        peer: Option<&str>,
        settings: PointSettings,
    ) -> Result<bool> {
        if settings.is_empty() {
            return Ok(false);
        }
        let lead_peer = self.link(volume).map(|l| l.config().peer);
        if lead_peer.is_none() {
            if let Some(sv) = self.secondaries.get(volume) {
                return Err(ReplError::FailedPrecondition(format!(
                    "volume {volume} is a secondary here; set its points on the primary's site {}",
                    sv.record().primary_site
                )));
            }
            return Err(ReplError::NotFound(format!(
                "volume {volume} is not replicated on this site"
            )));
        }
        let mut changed = false;
        for link in self.chosen_links(volume, peer)? {
            let cfg = link.config();
            let mut next = cfg.points;
            settings.apply(&mut next);
            if next == cfg.points {
                continue;
            }
            if next.every_secs > 0 {
                let version = self.ctx.registry.peer(&cfg.peer).await.map_or(0, |p| p.0);
                if version < ProtocolVersion::POINTS {
                    return Err(ReplError::FailedPrecondition(format!(
                        "peer {} was paired at protocol version {version}; re-pair it (emberctl peer add) for recovery points",
                        cfg.peer
                    )));
                }
            }
            link.update(|c| c.points = next)
                .map_err(|e| ReplError::Internal(format!("persisting the point schedule: {e}")))?;
            tracing::info!(
                volume,
                peer = %cfg.peer,
                every_secs = next.every_secs,
                keep = next.keep,
                keep_for_secs = next.keep_for_secs,
                "recovery point schedule set"
            );
            // The schedule travels in OpenReplica: a new session carries it.
            // The first target restarts as it always has (a new link from
            // its config); a further one restarts its session in place, as
            // `resume` does.
            if lead_peer.as_deref() == Some(cfg.peer.as_str()) {
                self.restart(volume);
            } else if !cfg.paused {
                self.stop_session(volume, &cfg.peer).await;
                self.start_session(volume, &link);
            }
            changed = true;
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_survives_the_peer_wire_unchanged() {
        let report = PointsReport {
            points: vec![
                PointListing {
                    name: "auto-1".into(),
                    at_unix_ns: 1_796_379_753_000_000_000,
                    kind: "scheduled",
                    group: "pg".into(),
                    pinned_bytes: 65_536,
                    peer: String::new(),
                },
                PointListing {
                    name: "before-upgrade".into(),
                    at_unix_ns: 1_796_379_760_000_000_001,
                    kind: "manual",
                    group: String::new(),
                    pinned_bytes: 0,
                    peer: String::new(),
                },
            ],
            every_secs: 300,
            keep: 24,
            keep_for_secs: 86_400,
        };
        assert_eq!(report_from_peer(report_to_peer(report.clone())), report);
    }

    #[test]
    fn an_unknown_kind_from_a_newer_peer_is_listed_as_unknown() {
        assert_eq!(kind_from_wire("scheduled"), "scheduled");
        assert_eq!(kind_from_wire("manual"), "manual");
        assert_eq!(kind_from_wire("drill"), "unknown");
        assert_eq!(kind_from_wire(""), "unknown");
    }
}
