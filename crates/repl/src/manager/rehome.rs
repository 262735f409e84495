//! Re-homing after a planned switchover of a volume with several targets
//! (issue 14): the old primary drains *every* target to the same image,
//! hands the list of its other targets to the new primary, and the new
//! primary takes them over as its own targets without a copy.
//!
//! Why no copy is needed: writes were refused before the drain, so after
//! it the old primary, the new primary and every other target hold the
//! same image. In the terms of `plan::rehome`, every site holds the
//! drained point with empty change sets after it, so the plan's resend is
//! empty: the new primary starts each re-homed target with a clean change
//! set and the secondary there accepts it by its newer generation.

use std::sync::Arc;
use std::time::Duration;

use ember_proto::repl::v1 as pb;

use ember_common::Extent;

use super::Replication;
use crate::audit::Entry;
use crate::error::Result;
use crate::plan::points::{Blocks, block_bytes};
use crate::plan::rehome::{self, Action, HeldPoint, Kind, Request, Role, SiteRecord};
use crate::primary::link::{Mode, PeerLossPolicy, ReplicaConfig, ReplicaLink, consumer_name};
use crate::primary::rpo::RpoPolicy;

/// The sites' records after a planned switchover's drain: writes were
/// refused and every target drained, so every site holds the drained
/// image (one common point) with nothing changed after it. The old
/// primary and this site are at `generation - 1`.
fn drained_records(
    me: &str,
    old_primary: &str,
    generation: u64,
    drained_at: i64,
    others: &[&str],
) -> Vec<SiteRecord> {
    let record = |site: &str, role| SiteRecord {
        site: site.to_owned(),
        role,
        generation: generation - 1,
        lineage: 0,
        points: vec![HeldPoint {
            id: drained_at,
            after: Blocks::default(),
        }],
        applied_at: drained_at,
        consistent: true,
        wrote_without: Vec::new(),
        reachable: true,
    };
    let mut out = vec![
        record(old_primary, Role::Primary),
        record(me, Role::Secondary),
    ];
    out.extend(others.iter().map(|o| record(o, Role::Secondary)));
    out
}

/// The wire form of a target's settings, for the new primary to take over.
pub(super) fn rehome_target(cfg: &ReplicaConfig) -> pb::RehomeTarget {
    pb::RehomeTarget {
        site: cfg.peer.clone(),
        mode: cfg.mode.as_str().into(),
        rpo_seconds: cfg.rpo_seconds,
        rpo_policy: cfg.rpo_policy.as_str().into(),
        on_peer_loss: cfg.on_peer_loss.as_str().into(),
    }
}

impl Replication {
    /// Drains the first target and then every further one (writes are
    /// refused already), so all of them hold the same image.
    pub(super) async fn drain_all(
        &self,
        volume: &str,
        first: &ReplicaLink,
        timeout: Duration,
    ) -> Result<()> {
        self.drain(first, timeout).await?;
        let extra: Vec<Arc<ReplicaLink>> = self
            .extra
            .lock()
            .expect("extra lock poisoned")
            .get(volume)
            .map(|v| v.iter().map(|r| r.link.clone()).collect())
            .unwrap_or_default();
        for link in extra {
            self.drain(&link, timeout).await?;
        }
        Ok(())
    }

    /// The old primary's side after the drain: stops the further targets'
    /// sessions and forgets their change sets and configs, without telling
    /// their sites (their copies stay consistent secondaries, for the new
    /// primary to take over). Returns every target but `new_primary`, the
    /// first one included (`demote_local` stops that one).
    pub(super) async fn release_for_rehome(
        &self,
        volume: &str,
        new_primary: &str,
    ) -> Vec<pb::RehomeTarget> {
        let mut others = Vec::new();
        if let Some(first) = self.link(volume) {
            let cfg = first.config();
            if cfg.peer != new_primary {
                others.push(rehome_target(&cfg));
            }
        }
        let extra = self
            .extra
            .lock()
            .expect("extra lock poisoned")
            .remove(volume)
            .unwrap_or_default();
        for r in extra {
            r.stop.cancel();
            if let Some(task) = r.task {
                let _ = task.await;
            }
            let cfg = r.link.config();
            self.install_hook(&r.link.volume, volume, None);
            r.link.journal().release_waiters();
            if let Some(t) = r.link.volume.tracker()
                && let Err(e) =
                    t.remove_consumer(&self.store_tracking_dir(volume), &consumer_name(&cfg.peer))
            {
                tracing::warn!(volume, peer = %cfg.peer, error = %e, "cannot remove a re-homed target's change set");
            }
            let _ = std::fs::remove_file(r.link.config_path());
            if cfg.peer != new_primary {
                others.push(rehome_target(&cfg));
            }
        }
        others
    }

    /// The new primary's side: takes `others` over as further targets at
    /// `generation`, with clean change sets (they hold the drained image).
    /// A target this site is not paired with is skipped and logged: the
    /// admin enables it later (a blake3 comparison, not a copy).
    pub(super) async fn rehome_others(
        &self,
        volume: &str,
        old_primary: &str,
        generation: u64,
        drained_at: i64,
        others: &[pb::RehomeTarget],
    ) {
        let me = self.ctx.identity.site.clone();
        let mut paired = Vec::new();
        for o in others {
            if o.site == me || o.site == old_primary {
                continue;
            }
            if self.ctx.registry.peer(&o.site).await.is_none() {
                tracing::warn!(volume, peer = %o.site, "not paired with the old primary's target; enable it here to re-home it");
                continue;
            }
            paired.push(o);
        }
        // The decision is the plan's (`plan::rehome`), from the records
        // the drain guarantees; this only carries it out.
        let sites: Vec<&str> = paired.iter().map(|o| o.site.as_str()).collect();
        let records = drained_records(&me, old_primary, generation, drained_at, &sites);
        let request = Request {
            site: me.clone(),
            kind: Kind::Planned,
            accept_older: false,
        };
        let plan = match rehome::plan(&request, &records) {
            Ok(plan) => plan,
            Err(refusal) => {
                tracing::error!(
                    volume,
                    ?refusal,
                    "re-homing refused; enable the other targets here"
                );
                return;
            }
        };
        for action in plan.actions {
            let (site, resend, full) = match action {
                Action::Rehome { target, resend, .. } => (target, resend, false),
                Action::FullCopy { target, reason, .. } => {
                    tracing::warn!(volume, peer = %target, ?reason, "re-homing by a full comparison");
                    (target, Blocks::default(), true)
                }
                // The old primary demoted itself in the drain; nothing
                // else applies to drained records.
                _ => continue,
            };
            let Some(o) = paired.iter().find(|o| o.site == site) else {
                continue;
            };
            self.rehome_one(volume, old_primary, generation, o, &resend, full);
        }
    }

    /// Creates `peer`'s change set (all dirty with `full`) holding
    /// `resend` before its session starts, so its first catch-up sends it.
    fn mark_resend(&self, volume: &str, peer: &str, resend: &Blocks, full: bool) -> Result<()> {
        if resend.count() == 0 {
            return Ok(());
        }
        let Some(v) = self.store.export(volume) else {
            return Ok(());
        };
        let Some(t) = v.tracker() else {
            return Ok(());
        };
        let name = consumer_name(peer);
        t.add_consumer(&self.store_tracking_dir(volume), &name, full)
            .map_err(|e| super::internal("create the re-homed target's change set", e))?;
        let size = ember_nbd::Export::size(v.as_ref());
        let extents: Vec<Extent> = resend
            .byte_ranges(block_bytes(size), size)
            .into_iter()
            .map(|(offset, length)| Extent { offset, length })
            .collect();
        t.consumer_mark(&name, &extents)
            .map_err(|e| super::internal("mark the re-homing resend", e))
    }

    /// Starts `o` as a further target: a clean change set plus `resend`,
    /// or (`full`) an initial sync that compares every block by blake3.
    fn rehome_one(
        &self,
        volume: &str,
        old_primary: &str,
        generation: u64,
        o: &pb::RehomeTarget,
        resend: &Blocks,
        full: bool,
    ) {
        let config = ReplicaConfig::new(
            volume,
            &o.site,
            Mode::parse(&o.mode).unwrap_or(Mode::Async),
            o.rpo_seconds,
            RpoPolicy::parse(&o.rpo_policy).unwrap_or_default(),
            PeerLossPolicy::parse(&o.on_peer_loss).unwrap_or_default(),
        )
        .promoted(generation);
        // A member of a group switched over here keeps replicating to this
        // target in its group (`primary::group` resumes its points there
        // once every member's link runs).
        let group = self.link(volume).and_then(|l| l.config().group);
        let config = ReplicaConfig {
            synced: !full,
            group,
            ..config
        };
        let path = self.extra_config_path(volume, &o.site);
        let started = ember_volume::fsutil::write_json_atomic(&path, &config)
            .map_err(|e| super::internal("persist replica config", e))
            .and_then(|()| self.mark_resend(volume, &o.site, resend, full))
            .and_then(|()| self.start_target(config, full, false));
        match started {
            Ok(_) => self.decide(&Entry {
                action: "rehome",
                volume,
                peer: &o.site,
                generation,
                detail: format!(
                    "planned switchover: {} follows this site now ({}; drained with the old primary {old_primary})",
                    o.site,
                    if full { "compared by blake3" } else { "no copy" }
                ),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                tracing::error!(volume, peer = %o.site, error = %e, "cannot re-home a target");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drained_sites_rehome_with_nothing_to_resend() {
        let records = drained_records("b", "a", 2, 500, &["c", "d"]);
        let request = Request {
            site: "b".into(),
            kind: Kind::Planned,
            accept_older: false,
        };
        let plan = rehome::plan(&request, &records).expect("plans");
        assert_eq!(plan.promote.map(|p| p.generation), Some(2));
        let mut rehomed = Vec::new();
        for action in plan.actions {
            match action {
                Action::Rehome { target, resend, .. } => {
                    assert_eq!(resend.count(), 0, "{target} would be resent data");
                    rehomed.push(target);
                }
                Action::Fence { site, .. } => assert_eq!(site, "a"),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(rehomed, ["c", "d"]);
    }
}
