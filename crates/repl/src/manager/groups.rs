//! Consistency groups: volumes replicated with one shared write order, so
//! the secondary site holds all of them at one point and a group promotion
//! lands every member there.
//!
//! The primary site persists a group (`DATA/replicas/groups/NAME.json`:
//! its peer and members) and runs its ticker (`primary::group`); each
//! member's replica config names the group, which its sessions send to the
//! secondary. The secondary site knows a group from its members' records
//! and the group's committed point (`secondary::group`).
//!
//! A group may have several targets (issue 14; `group_targets.rs`): every
//! member replicates to each of them, and each target's site commits the
//! group's points on its own. An async target takes group points; the
//! `escalate` policy would turn one member synchronous apart from the
//! others, so it is refused. A sync target takes none: its members hold
//! every acknowledged write — as long as no member acknowledges a write
//! without it, so a sync target of a group must hold writes while it is
//! away (`--on-peer-loss suspend`); with `degrade`, members cut off at
//! different moments would leave its copies at different points.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::group_targets::GroupTargetStatus;
use super::{EnableRequest, Replication};
use crate::audit::Entry;
use crate::error::{ReplError, Result};
use crate::primary::group::{self, Members};
use crate::primary::link::{Mode, PeerLossPolicy, ReplicaLink, now_unix_ns};
use crate::primary::rpo::RpoPolicy;
use crate::version::ProtocolVersion;

/// A group as the primary site persists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GroupConfig {
    pub(crate) name: String,
    /// The site holding the members' secondaries (the first target).
    pub(crate) peer: String,
    /// Further targets (issue 14): every member replicates to each.
    #[serde(default)]
    pub(crate) also: Vec<String>,
    /// Member volumes, sorted.
    pub(crate) members: Vec<String>,
    pub(crate) created_at_unix: i64,
}

/// A group whose ticker runs here.
#[derive(Debug)]
pub(crate) struct RunningGroup {
    pub(crate) config: GroupConfig,
    pub(crate) members: Members,
    pub(crate) stop: CancellationToken,
}

/// One member's view in a group status.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupMember {
    /// Volume.
    pub volume: String,
    /// The member's replica state (primary states, or consistent /
    /// inconsistent on the secondary site).
    pub state: &'static str,
    /// Lag of the member (primary site).
    pub lag_seconds: f64,
    /// Bytes of lag (primary site).
    pub lag_bytes: u64,
    /// The point the member's secondary image is consistent with (unix ns).
    pub consistent_at_unix_ns: i64,
}

/// A group's status.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupStatus {
    /// Group name.
    pub name: String,
    /// `primary` (the members are written here) or `secondary`.
    pub role: &'static str,
    /// The other site.
    pub peer: String,
    /// Members, by name.
    pub members: Vec<GroupMember>,
    /// The group's consistent point on the secondary site (unix ns of the
    /// primary's clock; 0 = none yet): every member holds exactly it.
    pub consistent_at_unix_ns: i64,
    /// The largest member lag (primary site).
    pub lag_seconds: f64,
    /// Every member's image is at the group's point (a group promotion
    /// would land all of them there).
    pub consistent: bool,
    /// Primary: every target, the first one first (the fields above are
    /// the worst target's). Empty on a secondary.
    pub targets: Vec<GroupTargetStatus>,
}

/// What a group promotion did.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupPromoteReport {
    /// The group, now primary here.
    pub status: GroupStatus,
    /// Forced (the old primary was not asked).
    pub forced: bool,
    /// Forced: the one point every member came up on (unix ns of the old
    /// primary's clock); writes acknowledged after it are lost.
    pub recovery_point_unix_ns: i64,
}

/// Group names follow the volume-name rules (they name files too).
fn check_name(name: &str) -> Result<()> {
    ember_common::VolumeName::new(name)
        .map(|_| ())
        .map_err(|e| ReplError::InvalidArgument(format!("invalid group name: {e}")))
}

impl Replication {
    pub(super) fn group_path(&self, name: &str) -> std::path::PathBuf {
        self.groups_dir.join(format!("{name}.json"))
    }

    pub(super) fn groups(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, RunningGroup>> {
        self.groups.lock().expect("groups lock poisoned")
    }

    /// Starts the ticker of a persisted group (agent start, create,
    /// promotion) with the member links running here.
    pub(crate) fn start_group(&self, config: GroupConfig) {
        // Every target's link of every member that is in the group.
        let links: Vec<Arc<ReplicaLink>> = config
            .members
            .iter()
            .flat_map(|m| self.member_links(m))
            .filter(|l| l.config().group.as_deref() == Some(config.name.as_str()))
            .collect();
        let members: Members = Arc::new(std::sync::Mutex::new(links));
        let stop = CancellationToken::new();
        tokio::spawn(group::run(
            config.name.clone(),
            members.clone(),
            stop.clone(),
        ));
        if let Some(old) = self.groups().insert(
            config.name.clone(),
            RunningGroup {
                config,
                members,
                stop,
            },
        ) {
            old.stop.cancel();
        }
    }

    /// Stops and forgets group `name` on this site (a promotion that
    /// changed nothing).
    fn stop_group(&self, name: &str) {
        if let Some(g) = self.groups().remove(name) {
            g.stop.cancel();
        }
        let _ = std::fs::remove_file(self.group_path(name));
    }

    /// Persists a new group of this site and starts its ticker.
    fn install_group(&self, name: &str, peer: &str, members: Vec<String>) -> Result<()> {
        let config = GroupConfig {
            name: name.to_owned(),
            peer: peer.to_owned(),
            also: Vec::new(),
            members,
            created_at_unix: now_unix_ns() / 1_000_000_000,
        };
        ember_volume::fsutil::write_json_atomic(&self.group_path(name), &config)
            .map_err(|e| ReplError::Internal(format!("persist group: {e}")))?;
        self.start_group(config);
        Ok(())
    }

    /// A member's link to one target (re)started: the ticker uses the new
    /// link for that target.
    pub(crate) fn group_link_started(&self, link: &Arc<ReplicaLink>) {
        let cfg = link.config();
        let Some(name) = cfg.group else { return };
        if let Some(g) = self.groups().get(&name) {
            let mut members = g.members.lock().expect("group members lock poisoned");
            members.retain(|l| {
                let c = l.config();
                c.volume != cfg.volume || c.peer != cfg.peer
            });
            members.push(link.clone());
            members.sort_by_key(|l| {
                let c = l.config();
                (c.volume, c.peer)
            });
        }
    }

    /// `volume` stops being primary here (demoted, disabled): it leaves
    /// its group on this site; a group left empty is deleted.
    pub(crate) fn group_member_gone(&self, volume: &str) {
        let mut groups = self.groups();
        let Some(name) = groups
            .iter()
            .find(|(_, g)| g.config.members.iter().any(|m| m == volume))
            .map(|(n, _)| n.clone())
        else {
            return;
        };
        let g = groups.get_mut(&name).expect("found above");
        g.config.members.retain(|m| m != volume);
        g.members
            .lock()
            .expect("group members lock poisoned")
            .retain(|l| l.config().volume != volume);
        if g.config.members.is_empty() {
            g.stop.cancel();
            groups.remove(&name);
            let _ = std::fs::remove_file(self.group_path(&name));
            tracing::info!(group = %name, "the group's last member left this site; group removed here");
        } else if let Err(e) =
            ember_volume::fsutil::write_json_atomic(&self.group_path(&name), &g.config)
        {
            tracing::error!(group = %name, error = %e, "cannot persist the group");
        }
    }

    /// Creates a group replicating to `peer` (idempotent for the same peer).
    ///
    /// # Errors
    /// A bad name, an unpaired or old peer, the name taken for another peer.
    pub async fn create_group(&self, name: &str, peer: &str) -> Result<(GroupStatus, bool)> {
        check_name(name)?;
        let Some((version, _)) = self.ctx.registry.peer(peer).await else {
            return Err(ReplError::NotFound(format!(
                "site {peer} is not paired; run emberctl peer add first"
            )));
        };
        if version < ProtocolVersion::GROUPS {
            return Err(ReplError::FailedPrecondition(format!(
                "peer {peer} was paired at protocol version {version}; re-pair it for consistency groups"
            )));
        }
        let existing = self.groups().get(name).map(|g| g.config.clone());
        if let Some(config) = existing {
            // Another peer: a further target of the group (issue 14).
            return self.add_group_target(&config, peer);
        }
        if !self.secondaries.group_members(name).0.is_empty() {
            return Err(ReplError::FailedPrecondition(format!(
                "group {name} is a secondary group on this site; promote it (emberctl group promote) instead"
            )));
        }
        self.install_group(name, peer, Vec::new())?;
        tracing::info!(group = name, peer, "consistency group created");
        Ok((self.group_status(name)?, true))
    }

    /// Deletes an empty group.
    ///
    /// # Errors
    /// The group still has members.
    pub fn delete_group(&self, name: &str) -> Result<bool> {
        let mut groups = self.groups();
        let Some(g) = groups.get(name) else {
            return Ok(false);
        };
        if !g.config.members.is_empty() {
            return Err(ReplError::FailedPrecondition(format!(
                "group {name} still has members ({}); remove them first",
                g.config.members.join(", ")
            )));
        }
        g.stop.cancel();
        groups.remove(name);
        let _ = std::fs::remove_file(self.group_path(name));
        Ok(true)
    }

    /// Adds a replicated volume to a group. Its session restarts: the
    /// secondary learns the group, and from the next group point on the
    /// volume moves with the others.
    ///
    /// # Errors
    /// Unknown group or volume, a volume replicating elsewhere, sync mode
    /// or the escalate policy, a member of another group.
    pub fn add_to_group(&self, name: &str, volume: &str) -> Result<(GroupStatus, bool)> {
        let peer = self
            .groups()
            .get(name)
            .map(|g| g.config.peer.clone())
            .ok_or_else(|| ReplError::NotFound(format!("no group named {name} on this site")))?;
        let link = self.link(volume).ok_or_else(|| {
            ReplError::NotFound(format!(
                "volume {volume} is not a primary replica here; enable replication to {peer} first"
            ))
        })?;
        let cfg = link.config();
        if cfg.group.as_deref() == Some(name) {
            return Ok((self.group_status(name)?, false));
        }
        if let Some(other) = &cfg.group {
            return Err(ReplError::FailedPrecondition(format!(
                "volume {volume} is in group {other}; remove it from there first"
            )));
        }
        let targets = self
            .groups()
            .get(name)
            .map(|g| g.config.targets())
            .unwrap_or_default();
        let links = self.member_links_to(name, volume, &targets)?;
        for l in &links {
            l.update(|c| c.group = Some(name.to_owned()))
                .map_err(|e| ReplError::Internal(format!("persist replica config: {e}")))?;
        }
        self.set_group_members(name, |m| m.push(volume.to_owned()))?;
        for l in &links {
            self.restart_target(volume, &l.config().peer);
        }
        self.audit.record(&Entry {
            action: "group-add",
            volume,
            peer: &peer,
            generation: cfg.generation,
            detail: format!("joined consistency group {name}"),
        });
        Ok((self.group_status(name)?, true))
    }

    /// Removes a volume from a group; it keeps replicating on its own.
    ///
    /// # Errors
    /// Unknown group.
    pub fn remove_from_group(&self, name: &str, volume: &str) -> Result<(GroupStatus, bool)> {
        if !self.groups().contains_key(name) {
            return Err(ReplError::NotFound(format!(
                "no group named {name} on this site"
            )));
        }
        let Some(link) = self
            .link(volume)
            .filter(|l| l.config().group.as_deref() == Some(name))
        else {
            return Ok((self.group_status(name)?, false));
        };
        drop(link);
        let links: Vec<Arc<ReplicaLink>> = self
            .member_links(volume)
            .into_iter()
            .filter(|l| l.config().group.as_deref() == Some(name))
            .collect();
        for l in &links {
            l.update(|c| c.group = None)
                .map_err(|e| ReplError::Internal(format!("persist replica config: {e}")))?;
        }
        self.set_group_members(name, |m| m.retain(|v| v != volume))?;
        self.groups()
            .get(name)
            .expect("checked")
            .members
            .lock()
            .expect("group members lock poisoned")
            .retain(|l| l.config().volume != volume);
        for l in &links {
            self.restart_target(volume, &l.config().peer);
        }
        Ok((self.group_status(name)?, true))
    }

    pub(super) fn set_group_members(
        &self,
        name: &str,
        f: impl FnOnce(&mut Vec<String>),
    ) -> Result<()> {
        let mut groups = self.groups();
        let g = groups
            .get_mut(name)
            .ok_or_else(|| ReplError::NotFound(format!("no group named {name} on this site")))?;
        let mut next = g.config.clone();
        f(&mut next.members);
        next.members.sort();
        next.members.dedup();
        ember_volume::fsutil::write_json_atomic(&self.group_path(name), &next)
            .map_err(|e| ReplError::Internal(format!("persist group: {e}")))?;
        g.config = next;
        Ok(())
    }

    /// Status of a group, primary or secondary here.
    ///
    /// # Errors
    /// [`ReplError::NotFound`] when neither role holds it.
    pub fn group_status(&self, name: &str) -> Result<GroupStatus> {
        if let Some(config) = self.groups().get(name).map(|g| g.config.clone()) {
            return Ok(self.primary_group_status(&config));
        }
        let (records, committed) = self.secondaries.group_members(name);
        if records.is_empty() {
            return Err(ReplError::NotFound(format!(
                "no group named {name} on this site"
            )));
        }
        let (consistent, committed) = secondary_group_point(&records, committed);
        Ok(GroupStatus {
            name: name.to_owned(),
            role: "secondary",
            peer: records[0].primary_site.clone(),
            members: records
                .iter()
                .map(|r| GroupMember {
                    volume: r.volume.clone(),
                    state: if r.consistent {
                        "consistent"
                    } else {
                        "inconsistent"
                    },
                    lag_seconds: 0.0,
                    lag_bytes: 0,
                    consistent_at_unix_ns: r.consistent_at_unix_ns,
                })
                .collect(),
            consistent_at_unix_ns: committed,
            lag_seconds: 0.0,
            consistent,
            targets: Vec::new(),
        })
    }

    /// Every group on this site, primary ones first.
    pub fn list_groups(&self) -> Vec<GroupStatus> {
        let mut names: Vec<String> = self.groups().keys().cloned().collect();
        names.sort();
        names.extend(self.secondaries.group_names());
        names.dedup();
        names
            .iter()
            .filter_map(|n| self.group_status(n).ok())
            .collect()
    }

    /// Promotes every member of a secondary group held here, then makes
    /// the group primary here (replicating back to the old primary site).
    ///
    /// Planned: each member switches over with zero loss (the old primary
    /// drains it), so all land on the last write. Forced: the group is
    /// frozen first, so no member applies a point the others lack, and
    /// every member comes up on the group's committed point — refused if
    /// a member is not at it (one that joined and has not reached a group
    /// point yet, or an inconsistent one).
    ///
    /// # Errors
    /// Not a secondary group here; a member not at the group's point
    /// (forced); a member's promotion failed (the report names it; members
    /// promoted before it stay promoted — re-run to finish).
    pub async fn promote_group(&self, name: &str, force: bool) -> Result<GroupPromoteReport> {
        self.promote_group_with(name, force, None).await
    }

    /// [`Self::promote_group`]; `at` (forced only): every member is first
    /// rolled back to that one group recovery point (`manager/points.rs`).
    pub(super) async fn promote_group_with(
        &self,
        name: &str,
        force: bool,
        at: Option<crate::secondary::points::PointSelector>,
    ) -> Result<GroupPromoteReport> {
        let (records, _) = self.secondaries.group_members(name);
        if records.is_empty() {
            if self.groups().contains_key(name) {
                let status = self.group_status(name)?;
                return Ok(GroupPromoteReport {
                    status,
                    forced: false,
                    recovery_point_unix_ns: 0,
                });
            }
            return Err(ReplError::NotFound(format!(
                "no secondary group named {name} on this site"
            )));
        }
        let peer = records[0].primary_site.clone();
        let mut recovery_point = 0;
        if force && at.is_none() && records.iter().all(|r| r.mode == Mode::Sync.as_str()) {
            // A sync target takes no group points: every member holds every
            // write acknowledged to it, so each one as it is.
            recovery_point = self.check_sync_group(name, &records).await?;
        } else if force {
            let barrier = self.secondaries.group_barrier(name);
            let mut committed = barrier.freeze();
            for r in &records {
                if let Some(sv) = self.secondaries.get(&r.volume) {
                    sv.quiesce().await;
                }
            }
            if let Some(sel) = &at {
                let members: Vec<String> = records.iter().map(|r| r.volume.clone()).collect();
                committed = match self.roll_back_group(name, &members, sel).await {
                    Ok(point) => point,
                    Err(e) => {
                        barrier.thaw();
                        return Err(e);
                    }
                };
            }
            let (records, _) = self.secondaries.group_members(name);
            let off: Vec<String> = records
                .iter()
                .filter(|r| !r.consistent || r.consistent_at_unix_ns != committed)
                .map(|r| {
                    format!(
                        "{} ({})",
                        r.volume,
                        if r.consistent {
                            format!("at {}", r.consistent_at_unix_ns)
                        } else {
                            "inconsistent".to_owned()
                        }
                    )
                })
                .collect();
            if committed == 0 || !off.is_empty() {
                barrier.thaw();
                return Err(ReplError::FailedPrecondition(format!(
                    "group {name} is not at one consistent point (group point {committed}; \
                     off it: {}): promoting it would not land every member on one point; \
                     promote members one by one (emberctl replica promote VOL --force) to accept that",
                    if off.is_empty() {
                        "none".to_owned()
                    } else {
                        off.join(", ")
                    }
                )));
            }
            recovery_point = committed;
        }
        // The group is primary here from now on, replicating back to `peer`:
        // its ticker runs first, so each member's link joins it as the
        // member comes up and its first session back is already grouped.
        self.install_group(
            name,
            &peer,
            records.iter().map(|r| r.volume.clone()).collect(),
        )?;
        let mut promoted = Vec::new();
        for r in &records {
            if let Err(e) = self.promote_as(&r.volume, force, Some(name)).await {
                if force {
                    self.secondaries.group_barrier(name).thaw();
                }
                if promoted.is_empty() {
                    // Nothing changed yet: the member's own error (an
                    // unreachable old primary stays UNAVAILABLE).
                    self.stop_group(name);
                    return Err(e);
                }
                return Err(ReplError::FailedPrecondition(format!(
                    "group {name}: promoting {} failed after {} of {} members ({}): {e}",
                    r.volume,
                    promoted.len(),
                    records.len(),
                    promoted.join(", ")
                )));
            }
            promoted.push(r.volume.clone());
        }
        self.secondaries.forget_group(name);
        self.audit.record(&Entry {
            action: if force {
                "group-force-promote"
            } else {
                "group-promote"
            },
            volume: name,
            peer: &peer,
            generation: 0,
            detail: if force {
                format!(
                    "members {} came up on group point {recovery_point} (unix ns)",
                    promoted.join(", ")
                )
            } else {
                format!("planned switchover of members {}", promoted.join(", "))
            },
        });
        Ok(GroupPromoteReport {
            status: self.group_status(name)?,
            forced: force,
            recovery_point_unix_ns: recovery_point,
        })
    }
}

/// A member's link to one target obeys the group's rules: an async link
/// keeps a policy that leaves it async; a sync link holds writes while its
/// target is away (see the module doc).
pub(crate) fn check_member_rules(
    volume: &str,
    peer: &str,
    mode: Mode,
    policy: RpoPolicy,
    on_peer_loss: PeerLossPolicy,
) -> Result<()> {
    if mode == Mode::Sync && on_peer_loss != PeerLossPolicy::Suspend {
        return Err(ReplError::FailedPrecondition(format!(
            "volume {volume} replicates synchronously to {peer} with --on-peer-loss degrade; a sync \
             target of a consistency group needs --on-peer-loss suspend (with degrade, members cut \
             off at different moments would leave {peer}'s copies at different points): \
             replica enable {volume} --peer {peer} --mode sync --on-peer-loss suspend, or use async"
        )));
    }
    if mode == Mode::Async && policy == RpoPolicy::Escalate {
        return Err(ReplError::FailedPrecondition(format!(
            "volume {volume} has the escalate RPO policy, which would make it synchronous apart \
             from the rest of the group; use alert or throttle"
        )));
    }
    Ok(())
}

/// The group rules for an `enable` of `req`'s target, when that link is
/// or joins a member of `group`; a link outside any group has none.
pub(crate) fn check_enable_in_group(req: &EnableRequest, group: Option<&str>) -> Result<()> {
    if group.is_none() {
        return Ok(());
    }
    check_member_rules(
        &req.volume,
        &req.peer,
        req.mode,
        req.rpo_policy,
        req.on_peer_loss,
    )
}

/// Whether a secondary group's members are at one point, and which:
/// members following an async primary link hold the group's committed
/// point; members of a sync link are each at their newest image, which is
/// one point of the group's history (the oldest of them is reported).
pub(super) fn secondary_group_point(
    records: &[crate::secondary::SecondaryRecord],
    committed: i64,
) -> (bool, i64) {
    let sync = !records.is_empty() && records.iter().all(|r| r.mode == Mode::Sync.as_str());
    if sync {
        let consistent = records.iter().all(|r| r.consistent);
        let point = records
            .iter()
            .map(|r| r.consistent_at_unix_ns)
            .min()
            .unwrap_or(0);
        return (consistent && point > 0, if consistent { point } else { 0 });
    }
    let consistent = committed > 0
        && records
            .iter()
            .all(|r| r.consistent && r.consistent_at_unix_ns == committed);
    (consistent, committed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(mode: Mode, policy: RpoPolicy, on_peer_loss: PeerLossPolicy) -> EnableRequest {
        EnableRequest {
            volume: "v".into(),
            peer: "site-b".into(),
            mode,
            rpo_seconds: 30,
            rpo_policy: policy,
            on_peer_loss,
        }
    }

    #[test]
    fn an_enable_obeys_the_member_rules_only_inside_a_group() {
        use {Mode::*, PeerLossPolicy::*, RpoPolicy::*};
        // (grouped, mode, policy, peer loss, refused)
        let table = [
            (false, Sync, Alert, Degrade, false),
            (false, Async, Escalate, Degrade, false),
            (true, Sync, Alert, Degrade, true),
            (true, Sync, Alert, Suspend, false),
            (true, Async, Escalate, Degrade, true),
            (true, Async, Throttle, Degrade, false),
            (true, Async, Alert, Degrade, false),
        ];
        for (grouped, mode, policy, loss, refused) in table {
            let got = check_enable_in_group(&req(mode, policy, loss), grouped.then_some("cg"));
            assert_eq!(
                matches!(got, Err(ReplError::FailedPrecondition(_))),
                refused,
                "grouped {grouped}, {mode:?} {policy:?} {loss:?}: {got:?}"
            );
            if !refused {
                assert!(got.is_ok(), "{got:?}");
            }
        }
    }
}
