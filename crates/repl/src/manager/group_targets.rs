//! Consistency groups with several targets (issue 14): which targets a
//! group has, the checks a member's links must pass, adding a target,
//! the per-target status and the forced promotion of a sync target's
//! group. The group lifecycle itself lives in `groups.rs`, the points in
//! `primary::group`.
//!
//! A group's targets are its first peer plus `GroupConfig::also`, and on
//! a site that took the group over by a promotion, every peer its members'
//! grouped links go to (re-homed targets join link by link). Every member
//! replicates to every target, all members in the same mode per target.

use std::sync::Arc;

use super::Replication;
use super::groups::{GroupConfig, GroupMember, GroupStatus, check_member_rules};
use crate::error::{ReplError, Result};
use crate::primary::link::{Mode, ReplicaLink};
use crate::secondary::SecondaryRecord;

/// One target of a group on its primary site, for `group status`.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupTargetStatus {
    /// The target's site.
    pub peer: String,
    /// `sync` / `async` (the members' mode to it).
    pub mode: &'static str,
    /// Members, by name, as replicated to this target.
    pub members: Vec<GroupMember>,
    /// The point every member's image at this target holds (unix ns; 0 =
    /// none yet).
    pub consistent_at_unix_ns: i64,
    /// The largest member lag to this target.
    pub lag_seconds: f64,
    /// Every member's image at this target is at one point.
    pub consistent: bool,
}

impl GroupConfig {
    /// Every target of the group, the first one first.
    pub(crate) fn targets(&self) -> Vec<String> {
        let mut out = vec![self.peer.clone()];
        for p in &self.also {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
        out
    }
}

/// Index of the worst of `targets`, whose fields `group status` shows at
/// the top (so they alarm when any target does): not at one point first,
/// then the larger lag, then the first. `None` when empty.
pub(super) fn worst_group_target(targets: &[GroupTargetStatus]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, t) in targets.iter().enumerate() {
        let worse = best.is_none_or(|b| {
            let cur = &targets[b];
            (!t.consistent, t.lag_seconds) > (!cur.consistent, cur.lag_seconds)
        });
        if worse {
            best = Some(i);
        }
    }
    best
}

/// A target's view of its members: async members are at one point when
/// they all hold the same group point; sync members hold every
/// acknowledged write, so they are when each is in sync.
fn target_point(mode: Mode, members: &[GroupMember]) -> (bool, i64) {
    let points: Vec<i64> = members.iter().map(|m| m.consistent_at_unix_ns).collect();
    let first = points.first().copied().unwrap_or(0);
    let consistent = match mode {
        Mode::Async => !points.is_empty() && points.iter().all(|&p| p == first && p > 0),
        Mode::Sync => {
            !members.is_empty()
                && members
                    .iter()
                    .all(|m| m.state == "in-sync" && m.consistent_at_unix_ns > 0)
        }
    };
    let point = match mode {
        Mode::Async => first,
        Mode::Sync => points.iter().copied().min().unwrap_or(0),
    };
    (consistent, if consistent { point } else { 0 })
}

impl Replication {
    /// Every target's link of `volume` here, the first target first.
    pub(super) fn member_links(&self, volume: &str) -> Vec<Arc<ReplicaLink>> {
        let mut out: Vec<Arc<ReplicaLink>> = self.link(volume).into_iter().collect();
        out.extend(self.extra_links(volume));
        out
    }

    /// The links of `volume` to each of `targets` (group `name`), checked
    /// against the group's rules.
    ///
    /// # Errors
    /// A target the volume does not replicate to, a link breaking the
    /// member rules, a mode unlike the other members' to that target.
    pub(super) fn member_links_to(
        &self,
        name: &str,
        volume: &str,
        targets: &[String],
    ) -> Result<Vec<Arc<ReplicaLink>>> {
        let links = self.member_links(volume);
        let others: Vec<String> = self
            .groups()
            .get(name)
            .map(|g| g.config.members.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m != volume)
            .collect();
        let mut out = Vec::new();
        for peer in targets {
            let Some(link) = links.iter().find(|l| &l.config().peer == peer) else {
                return Err(ReplError::FailedPrecondition(format!(
                    "volume {volume} does not replicate to {peer}, a target of group {name}; \
                     replica enable {volume} --peer {peer} first"
                )));
            };
            let cfg = link.config();
            check_member_rules(volume, peer, cfg.mode, cfg.rpo_policy, cfg.on_peer_loss)?;
            let theirs = others.iter().find_map(|m| {
                self.member_links(m)
                    .into_iter()
                    .map(|l| l.config())
                    .find(|c| &c.peer == peer)
                    .map(|c| (m.clone(), c.mode))
            });
            if let Some((other, mode)) = theirs
                && mode != cfg.mode
            {
                return Err(ReplError::FailedPrecondition(format!(
                    "volume {volume} replicates {} to {peer}, group {name}'s member {other} {}: \
                     every member replicates to a target in one mode",
                    cfg.mode.as_str(),
                    mode.as_str()
                )));
            }
            out.push(link.clone());
        }
        Ok(out)
    }

    /// Restarts the session of `volume`'s target at `peer` with a fresh
    /// link (it reads its config, group included, again); the first
    /// target by [`Replication::restart`].
    pub(super) fn restart_target(&self, volume: &str, peer: &str) {
        if self.link(volume).is_some_and(|l| l.config().peer == peer) {
            self.restart(volume);
            return;
        }
        let old = {
            let mut extra = self.extra.lock().expect("extra lock poisoned");
            let Some(list) = extra.get_mut(volume) else {
                return;
            };
            let Some(i) = list.iter().position(|r| r.link.config().peer == peer) else {
                return;
            };
            let r = list.remove(i);
            r.stop.cancel();
            r.link.journal().release_waiters();
            r
        };
        // Out of the lock: the hook reads `extra`. The change set stays, so
        // the new session resumes from it.
        self.install_hook(&old.link.volume, volume, None);
        if let Err(e) = self.start_target(old.link.config(), false, false) {
            tracing::error!(volume, peer, error = %e, "cannot restart replication");
        }
    }

    /// A further target of a member was disabled: the group's ticker
    /// forgets that link (its points to that target then wait until every
    /// member replicates there again).
    pub(super) fn group_link_gone(&self, link: &Arc<ReplicaLink>) {
        let Some(name) = link.config().group else {
            return;
        };
        if let Some(g) = self.groups().get(&name) {
            g.members
                .lock()
                .expect("group members lock poisoned")
                .retain(|l| !Arc::ptr_eq(l, link));
        }
    }

    /// `group create NAME --peer P` of an existing group replicating
    /// elsewhere: `peer` becomes a further target of the group. Every
    /// member must replicate to it already; their links to it join the
    /// group (sessions restarted), and the group's points to `peer` start
    /// once all of them run.
    ///
    /// # Errors
    /// A member not replicating to `peer`, or breaking the group's rules.
    pub(super) fn add_group_target(
        &self,
        config: &GroupConfig,
        peer: &str,
    ) -> Result<(GroupStatus, bool)> {
        let name = config.name.as_str();
        if config.targets().iter().any(|t| t == peer) {
            return Ok((self.group_status(name)?, false));
        }
        let mut links = Vec::new();
        for volume in &config.members {
            links.extend(self.member_links_to(name, volume, &[peer.to_owned()])?);
        }
        {
            let mut groups = self.groups();
            let g = groups.get_mut(name).ok_or_else(|| {
                ReplError::NotFound(format!("no group named {name} on this site"))
            })?;
            let mut next = g.config.clone();
            next.also.push(peer.to_owned());
            ember_volume::fsutil::write_json_atomic(&self.group_path(name), &next)
                .map_err(|e| ReplError::Internal(format!("persist group: {e}")))?;
            g.config = next;
        }
        for l in &links {
            l.update(|c| c.group = Some(name.to_owned()))
                .map_err(|e| ReplError::Internal(format!("persist replica config: {e}")))?;
            let cfg = l.config();
            self.restart_target(&cfg.volume, peer);
        }
        tracing::info!(
            group = name,
            peer,
            members = links.len(),
            "consistency group target added"
        );
        Ok((self.group_status(name)?, true))
    }

    /// The group a new target of a member joins: `group` when `peer` is
    /// one of its targets, else none (the target joins once the group
    /// names it: `group create NAME --peer SITE`).
    pub(super) fn group_of_new_target(&self, group: Option<&str>, peer: &str) -> Option<String> {
        let group = group?;
        let is_target = self
            .groups()
            .get(group)
            .is_some_and(|g| g.config.targets().iter().any(|t| t == peer));
        is_target.then(|| group.to_owned())
    }

    /// The status of a group primary here: every target, the worst one's
    /// fields at the top.
    pub(super) fn primary_group_status(&self, config: &GroupConfig) -> GroupStatus {
        let mut peers = config.targets();
        // A site that took the group over also lists the targets its
        // members' links were re-homed to.
        for volume in &config.members {
            for l in self.member_links(volume) {
                let c = l.config();
                if c.group.as_deref() == Some(config.name.as_str()) && !peers.contains(&c.peer) {
                    peers.push(c.peer);
                }
            }
        }
        let mut targets = Vec::new();
        for peer in peers {
            let mut members = Vec::new();
            let mut mode = None;
            for volume in &config.members {
                let Some(link) = self
                    .member_links(volume)
                    .into_iter()
                    .find(|l| l.config().peer == peer)
                else {
                    continue;
                };
                let cfg = link.config();
                mode.get_or_insert(cfg.mode);
                let (lag_seconds, lag_bytes) = link.lag();
                members.push(GroupMember {
                    volume: volume.clone(),
                    state: link.state(),
                    lag_seconds,
                    lag_bytes,
                    consistent_at_unix_ns: cfg.last_consistent_at_unix_ns,
                });
            }
            let mode = mode.unwrap_or(Mode::Async);
            let (consistent, point) = target_point(mode, &members);
            targets.push(GroupTargetStatus {
                peer,
                mode: mode.as_str(),
                consistent_at_unix_ns: point,
                lag_seconds: members.iter().map(|m| m.lag_seconds).fold(0.0, f64::max),
                consistent,
                members,
            });
        }
        let top = worst_group_target(&targets)
            .map(|i| targets[i].clone())
            .unwrap_or_else(|| GroupTargetStatus {
                peer: config.peer.clone(),
                mode: Mode::Async.as_str(),
                members: Vec::new(),
                consistent_at_unix_ns: 0,
                lag_seconds: 0.0,
                consistent: false,
            });
        GroupStatus {
            name: config.name.clone(),
            role: "primary",
            peer: top.peer,
            members: top.members,
            consistent_at_unix_ns: top.consistent_at_unix_ns,
            lag_seconds: top.lag_seconds,
            consistent: top.consistent,
            targets,
        }
    }

    /// A forced promotion of a group whose members follow a sync link:
    /// ends each member's stream (nothing is applied after), then checks
    /// every member is consistent. Returns the oldest member's point.
    ///
    /// # Errors
    /// A member inconsistent (initial sync unfinished): promoting would
    /// serve a torn image.
    pub(super) async fn check_sync_group(
        &self,
        name: &str,
        records: &[SecondaryRecord],
    ) -> Result<i64> {
        for r in records {
            if let Some(sv) = self.secondaries.get(&r.volume) {
                sv.quiesce().await;
            }
        }
        let (records, _) = self.secondaries.group_members(name);
        let off: Vec<&str> = records
            .iter()
            .filter(|r| !r.consistent)
            .map(|r| r.volume.as_str())
            .collect();
        if !off.is_empty() {
            return Err(ReplError::FailedPrecondition(format!(
                "group {name}: members {} are inconsistent (their initial sync has not finished): \
                 promoting them would serve torn images",
                off.join(", ")
            )));
        }
        Ok(records
            .iter()
            .map(|r| r.consistent_at_unix_ns)
            .min()
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(state: &'static str, at: i64) -> GroupMember {
        GroupMember {
            volume: "v".into(),
            state,
            lag_seconds: 0.0,
            lag_bytes: 0,
            consistent_at_unix_ns: at,
        }
    }

    fn target(peer: &str, consistent: bool, lag_seconds: f64) -> GroupTargetStatus {
        GroupTargetStatus {
            peer: peer.into(),
            mode: "async",
            members: Vec::new(),
            consistent_at_unix_ns: 0,
            lag_seconds,
            consistent,
        }
    }

    #[test]
    fn the_worst_group_target_is_shown_at_the_top() {
        let rows: Vec<(&str, Vec<GroupTargetStatus>, Option<usize>)> = vec![
            ("none", vec![], None),
            ("one", vec![target("b", true, 0.0)], Some(0)),
            (
                "both at a point: the first",
                vec![target("b", true, 0.0), target("c", true, 0.0)],
                Some(0),
            ),
            (
                "not at a point beats a larger lag",
                vec![target("b", true, 9.0), target("c", false, 0.0)],
                Some(1),
            ),
            (
                "same: the larger lag",
                vec![target("b", true, 1.0), target("c", true, 3.0)],
                Some(1),
            ),
        ];
        for (name, targets, want) in rows {
            assert_eq!(worst_group_target(&targets), want, "{name}");
        }
    }

    #[test]
    fn a_target_is_at_one_point_by_its_mode() {
        type Row = (&'static str, Mode, Vec<GroupMember>, (bool, i64));
        let rows: Vec<Row> = vec![
            ("no members", Mode::Async, vec![], (false, 0)),
            (
                "async: one group point",
                Mode::Async,
                vec![member("lagging", 7), member("in-sync", 7)],
                (true, 7),
            ),
            (
                "async: members at different points",
                Mode::Async,
                vec![member("in-sync", 7), member("in-sync", 8)],
                (false, 0),
            ),
            (
                "async: no point yet",
                Mode::Async,
                vec![member("syncing", 0), member("syncing", 0)],
                (false, 0),
            ),
            (
                "sync: every member in sync, the oldest point",
                Mode::Sync,
                vec![member("in-sync", 9), member("in-sync", 8)],
                (true, 8),
            ),
            (
                "sync: a member resyncing",
                Mode::Sync,
                vec![member("in-sync", 9), member("syncing", 8)],
                (false, 0),
            ),
        ];
        for (name, mode, members, want) in rows {
            assert_eq!(target_point(mode, &members), want, "{name}");
        }
    }
}
