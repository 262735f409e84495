//! Several targets per volume on its primary (issue 14): adding and
//! removing targets, their persisted configs, the volume's fan-out hook,
//! and the status that reports every target.
//!
//! The first target of a volume lives in `Replication::running` and is
//! persisted as `VOL.json`, exactly as before several targets existed, so
//! promotion, groups and points keep working on it and old configs load
//! unchanged (verify and pause act per target: `per_target.rs`). Further targets live in `Replication::extra`
//! and are persisted as `VOL@PEER.json`. Removing the first target while
//! others remain makes the next one the first (its config is renamed).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember_volume::Volume;

use super::groups::check_enable_in_group;
use super::{
    EnableRequest, ReplicaStatus, Replication, Running, TargetStatus, internal, primary_status,
};
use crate::error::{ReplError, Result};
use crate::primary::link::{ReplicaConfig, ReplicaLink};
use crate::primary::targets::Targets;
use crate::version::ProtocolVersion;

/// Separates volume and peer in a further target's config name. Volume
/// names never hold it (`[A-Za-z0-9._-]`).
const SEP: char = '@';

/// Whether `path` is a further target's config (`VOL@PEER.json`).
pub(super) fn is_extra_path(path: &Path) -> bool {
    path.file_stem()
        .and_then(|s| s.to_str())
        .is_some_and(|s| s.contains(SEP))
}

/// How bad a target's state is, for picking the worst target (higher is
/// worse): the top-level status fields must alarm when any target does.
fn severity(state: &str) -> u8 {
    match state {
        "split-brain" => 7,
        "fenced" => 6,
        "degraded" => 5,
        "disconnected" => 4,
        "paused" => 3,
        "syncing" => 2,
        "lagging" => 1,
        _ => 0,
    }
}

/// Index of the worst of `targets` (by state, then lag, then the first):
/// the target whose status the top-level fields show. `None` when empty.
pub(super) fn worst(targets: &[TargetStatus]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, t) in targets.iter().enumerate() {
        let worse = best.is_none_or(|b| {
            let cur = &targets[b];
            (severity(t.state), t.lag_seconds, t.lag_bytes)
                > (severity(cur.state), cur.lag_seconds, cur.lag_bytes)
        });
        if worse {
            best = Some(i);
        }
    }
    best
}

fn target_status(s: &ReplicaStatus) -> TargetStatus {
    TargetStatus {
        peer: s.peer.clone(),
        mode: s.mode,
        state: s.state,
        lag_seconds: s.lag_seconds,
        lag_bytes: s.lag_bytes,
        last_consistent_at_unix_ns: s.last_consistent_at_unix_ns,
        resync_remaining_bytes: s.resync_remaining_bytes,
        resync_bytes_sent: s.resync_bytes_sent,
    }
}

impl Replication {
    /// `DATA/replicas/primary/VOL@PEER.json`.
    pub(super) fn extra_config_path(&self, volume: &str, peer: &str) -> PathBuf {
        self.dir.join(format!("{volume}{SEP}{peer}.json"))
    }

    /// The further targets' links of `volume`.
    pub(super) fn extra_links(&self, volume: &str) -> Vec<Arc<ReplicaLink>> {
        self.extra
            .lock()
            .expect("extra lock poisoned")
            .get(volume)
            .map(|v| v.iter().map(|r| r.link.clone()).collect())
            .unwrap_or_default()
    }

    /// Installs the hook of `volume`'s running targets plus `adding` (a
    /// target about to be registered): none, the one link, or a fan-out.
    pub(super) fn install_hook(
        &self,
        volume: &Arc<Volume>,
        name: &str,
        adding: Option<&Arc<ReplicaLink>>,
    ) {
        let mut links: Vec<Arc<ReplicaLink>> = self.link(name).into_iter().collect();
        links.extend(self.extra_links(name));
        links.extend(adding.cloned());
        volume.set_replication(Targets::hook(links));
    }

    /// Starts a target loaded from `path` at agent start. A further
    /// target whose volume has no first target left (the agent stopped
    /// between removing it and renaming the next) becomes the first.
    pub(super) fn load_target(&self, config: ReplicaConfig, path: &Path) -> Result<()> {
        let lead_running = self.link(&config.volume).is_some();
        if !is_extra_path(path) || !lead_running {
            if is_extra_path(path) {
                std::fs::rename(path, self.config_path(&config.volume))
                    .map_err(|e| internal("rename a replica config", e))?;
            }
            self.start(config, false).map(drop)
        } else {
            self.start_target(config, false, false).map(drop)
        }
    }

    /// A demotion outside the planned handover (`replica demote
    /// --discard-local`) of a volume with several targets is refused: this
    /// site would follow its first target while the others still follow
    /// this site, and nobody would re-home them. The planned handover —
    /// `replica demote VOL` without `--discard-local`, or `replica promote`
    /// on the target that takes over — re-homes them.
    ///
    /// # Errors
    /// [`ReplError::FailedPrecondition`] naming every target and the ways out.
    pub(crate) fn check_demotable(&self, volume: &str) -> Result<()> {
        let extra = self.extra_links(volume);
        if extra.is_empty() {
            return Ok(());
        }
        let first = self
            .link(volume)
            .map(|l| l.config().peer)
            .unwrap_or_default();
        let peers: Vec<String> = extra.iter().map(|l| l.config().peer).collect();
        Err(ReplError::FailedPrecondition(format!(
            "cannot demote volume {volume} here this way: it replicates to {first} and also to {}, \
             which would be left following no primary. For a switchover run `replica demote \
             {volume}` without --discard-local, or `replica promote {volume}` on the site that \
             takes over: the others are re-homed to it. To discard this site's writes, disable the \
             other targets first (replica disable {volume} --peer SITE)",
            peers.join(", ")
        )))
    }

    /// A target of `volume` (`peer`) was promoted past this primary (to
    /// `generation`) while the volume has several targets: this old
    /// primary follows it (issue 14). Its other targets are released
    /// (sessions stopped, configs and change sets dropped; the new primary
    /// re-homes them), and the blocks `peer` may lack — its change set
    /// here — are returned, for the demotion to hand over with the first
    /// target's set (a superset only makes the resend larger, never
    /// wrong). Split-brain with `peer` is checked first, on `peer`'s own
    /// target config (split-brain is a property of a pair). `None` when the
    /// volume has one target.
    ///
    /// # Errors
    /// Split-brain with `peer` (typed; writes refused, persisted); `peer`
    /// is not a target; reading a change set.
    pub(super) async fn follow_promoted_target(
        &self,
        first: &ReplicaLink,
        volume: &str,
        peer: &str,
        generation: u64,
    ) -> std::result::Result<Option<Vec<(u64, u64)>>, tonic::Status> {
        let extra = self.extra_links(volume);
        if extra.is_empty() {
            return Ok(None);
        }
        let Some(link) = std::iter::once(first)
            .chain(extra.iter().map(|l| l.as_ref()))
            .find(|l| l.config().peer == peer)
        else {
            return Err(tonic::Status::failed_precondition(format!(
                "volume {volume} is primary here and does not replicate to {peer}"
            )));
        };
        if link.config().wrote_disconnected || first.config().split_brain {
            for l in std::iter::once(first).chain(extra.iter().map(|l| l.as_ref())) {
                l.refuse_writes(true);
            }
            first
                .update(|c| {
                    c.fenced = true;
                    c.split_brain = true;
                })
                .map_err(|e| tonic::Status::internal(format!("persisting split-brain: {e}")))?;
            tracing::warn!(
                volume,
                peer,
                generation,
                "split-brain: this primary took writes cut off from the promoted target"
            );
            return Err(crate::fencing::split_brain(
                volume,
                "this site took writes while cut off from the promoted target",
            ));
        }
        let divergent: Vec<(u64, u64)> = match link.volume.tracker() {
            Some(t) => t
                .consumer_checkpoint(&link.consumer())
                .map_err(|e| tonic::Status::internal(format!("reading the change set: {e}")))?
                .extents
                .iter()
                .map(|e| (e.offset, e.length))
                .collect(),
            None => Vec::new(),
        };
        let others = self.release_for_rehome(volume, peer).await;
        tracing::warn!(
            volume,
            peer,
            generation,
            released = others.len(),
            "a target was promoted past this primary of several targets; following it, its other targets are re-homed by it"
        );
        Ok(Some(divergent))
    }

    /// A second (or further) target needs every target's peer at protocol
    /// [`ProtocolVersion::MULTI_TARGET`]: forced re-homing relies on the
    /// common marks only such a peer records. `version` is `peer`'s.
    ///
    /// # Errors
    /// [`ReplError::FailedPrecondition`] naming the peer, with "re-pair".
    pub(super) async fn check_multi_target(
        &self,
        peer: &str,
        version: u32,
        first: &str,
    ) -> Result<()> {
        let first_version = self.ctx.registry.peer(first).await.map(|(v, _)| v);
        let old = [(peer, Some(version)), (first, first_version)]
            .into_iter()
            .find(|(_, v)| v.is_some_and(|v| v < ProtocolVersion::MULTI_TARGET));
        match old {
            Some((site, Some(v))) => Err(ReplError::FailedPrecondition(format!(
                "peer {site} was paired at protocol version {v}; several targets per volume need \
                 version {} on every target: re-pair it (emberctl peer add {site} --address ...) first",
                ProtocolVersion::MULTI_TARGET
            ))),
            _ => Ok(()),
        }
    }

    /// The config of `volume`'s target at `peer` (first or further).
    pub(super) fn target_config(&self, volume: &str, peer: &str) -> Option<ReplicaConfig> {
        let first = self.link(volume)?;
        std::iter::once(first)
            .chain(self.extra_links(volume))
            .map(|l| l.config())
            .find(|c| c.peer == peer)
    }

    /// `enable` of a volume whose first target (`first`) is another peer:
    /// updates that further target in place, or adds it.
    pub(super) fn enable_another(
        &self,
        req: EnableRequest,
        first: &ReplicaConfig,
    ) -> Result<(ReplicaStatus, bool)> {
        if let Some(link) = self
            .extra_links(&req.volume)
            .into_iter()
            .find(|l| l.config().peer == req.peer)
        {
            check_enable_in_group(&req, link.config().group.as_deref())?;
            link.update(|c| {
                c.mode = req.mode;
                c.rpo_seconds = req.rpo_seconds;
                c.rpo_policy = req.rpo_policy;
                c.on_peer_loss = req.on_peer_loss;
            })
            .map_err(|e| internal("persist replica config", e))?;
            return Ok((self.status(&req.volume)?, false));
        }
        // A member's new target joins its group only when the group names
        // that target (`group create NAME --peer SITE` adds it once every
        // member replicates there).
        let group = self.group_of_new_target(first.group.as_deref(), &req.peer);
        check_enable_in_group(&req, group.as_deref())?;
        // The volume's generation is one for all its targets: a target
        // added after a failover fences with the same number.
        let config = ReplicaConfig {
            generation: first.generation,
            group,
            ..ReplicaConfig::new(
                &req.volume,
                &req.peer,
                req.mode,
                req.rpo_seconds,
                req.rpo_policy,
                req.on_peer_loss,
            )
        };
        ember_volume::fsutil::write_json_atomic(
            &self.extra_config_path(&req.volume, &req.peer),
            &config,
        )
        .map_err(|e| internal("persist replica config", e))?;
        self.start_target(config, true, false)?;
        tracing::info!(volume = %req.volume, peer = %req.peer, mode = req.mode.as_str(), "replication target added");
        Ok((self.status(&req.volume)?, true))
    }

    /// Disables replication of `volume` to `peer` (`None`: every target).
    /// Returns whether anything was disabled.
    ///
    /// # Errors
    /// The peer refused to delete its copy; I/O.
    pub async fn disable_target(
        &self,
        volume: &str,
        peer: Option<&str>,
        delete_secondary: bool,
    ) -> Result<bool> {
        let first = self.link(volume).map(|l| l.config().peer);
        let take_extra = |p: Option<&str>| -> Vec<Running> {
            let mut extra = self.extra.lock().expect("extra lock poisoned");
            let Some(list) = extra.get_mut(volume) else {
                return Vec::new();
            };
            let taken = match p {
                None => std::mem::take(list),
                Some(p) => match list.iter().position(|r| r.link.config().peer == p) {
                    Some(i) => vec![list.remove(i)],
                    None => Vec::new(),
                },
            };
            if list.is_empty() {
                extra.remove(volume);
            }
            taken
        };
        match peer {
            Some(p) if first.as_deref() != Some(p) => {
                let taken = take_extra(Some(p));
                let any = !taken.is_empty();
                for r in taken {
                    self.teardown(volume, r, false, delete_secondary).await?;
                }
                Ok(any)
            }
            Some(_) => {
                let on = self.disable_lead(volume, delete_secondary).await?;
                self.next_first_target(volume).await?;
                Ok(on)
            }
            None => {
                for r in take_extra(None) {
                    self.teardown(volume, r, false, delete_secondary).await?;
                }
                self.disable_lead(volume, delete_secondary).await
            }
        }
    }

    /// After the first target of `volume` was removed: the next further
    /// target becomes the first (restarted from its change set, like a
    /// `verify --resync` restart; its config renamed to `VOL.json`).
    async fn next_first_target(&self, volume: &str) -> Result<()> {
        let next = {
            let mut extra = self.extra.lock().expect("extra lock poisoned");
            let Some(list) = extra.get_mut(volume) else {
                return Ok(());
            };
            let next = list.remove(0);
            if list.is_empty() {
                extra.remove(volume);
            }
            next
        };
        next.stop.cancel();
        if let Some(task) = next.task {
            let _ = task.await;
        }
        next.link.journal().release_waiters();
        std::fs::rename(next.link.config_path(), self.config_path(volume))
            .map_err(|e| internal("rename a replica config", e))?;
        self.start(next.link.config(), false)?;
        Ok(())
    }

    /// The status of a primary volume: every target, the worst one's
    /// fields at the top.
    pub(super) fn primary_status_all(&self, volume: &str, first: &ReplicaLink) -> ReplicaStatus {
        let mut all = vec![primary_status(first)];
        all.extend(self.extra_links(volume).iter().map(|l| primary_status(l)));
        let targets: Vec<TargetStatus> = all.iter().map(target_status).collect();
        let at = worst(&targets).unwrap_or(0);
        let mut top = all.swap_remove(at);
        top.targets = targets;
        top
    }

    /// The first target's link of every primary volume here.
    pub(super) fn lead_links(&self) -> Vec<Arc<ReplicaLink>> {
        self.running
            .lock()
            .expect("running lock poisoned")
            .values()
            .map(|r| r.link.clone())
            .collect()
    }

    /// One status per target of every primary volume here (metrics: one
    /// series per `volume` and `peer`), first targets first.
    pub fn list_targets(&self) -> Vec<ReplicaStatus> {
        let mut leads = self.lead_links();
        leads.sort_by_key(|l| l.config().volume);
        let mut out = Vec::new();
        for lead in leads {
            let volume = lead.config().volume;
            out.push(primary_status(&lead));
            out.extend(self.extra_links(&volume).iter().map(|l| primary_status(l)));
        }
        out
    }

    /// Every further target's link (for the per-peer capabilities).
    pub(super) fn all_extra_links(&self) -> Vec<Arc<ReplicaLink>> {
        self.extra
            .lock()
            .expect("extra lock poisoned")
            .values()
            .flatten()
            .map(|r| r.link.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(peer: &str, state: &'static str, lag_seconds: f64) -> TargetStatus {
        TargetStatus {
            peer: peer.into(),
            mode: "async",
            state,
            lag_seconds,
            lag_bytes: 0,
            last_consistent_at_unix_ns: 0,
            resync_remaining_bytes: 0,
            resync_bytes_sent: 0,
        }
    }

    #[test]
    fn the_worst_target_is_shown_at_the_top() {
        let rows: Vec<(&str, Vec<TargetStatus>, Option<usize>)> = vec![
            ("none", vec![], None),
            ("one", vec![t("b", "in-sync", 0.0)], Some(0)),
            (
                "both in sync: the first",
                vec![t("b", "in-sync", 0.0), t("c", "in-sync", 0.0)],
                Some(0),
            ),
            (
                "a degraded sync target beats a lagging async one",
                vec![t("b", "lagging", 9.0), t("c", "degraded", 0.0)],
                Some(1),
            ),
            (
                "disconnected beats syncing",
                vec![t("b", "disconnected", 0.0), t("c", "syncing", 3.0)],
                Some(0),
            ),
            (
                "same state: the larger lag",
                vec![t("b", "lagging", 1.5), t("c", "lagging", 4.0)],
                Some(1),
            ),
            (
                "split-brain beats everything",
                vec![t("b", "fenced", 0.0), t("c", "split-brain", 0.0)],
                Some(1),
            ),
        ];
        for (name, targets, want) in rows {
            assert_eq!(worst(&targets), want, "{name}");
        }
    }

    #[test]
    fn extra_configs_are_told_apart_by_their_name() {
        assert!(!is_extra_path(Path::new("/d/vol.json")));
        assert!(!is_extra_path(Path::new("/d/vol.v2.json")));
        assert!(is_extra_path(Path::new("/d/vol@site-c.json")));
    }
}
