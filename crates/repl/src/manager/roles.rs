//! Role changes: planned switchover, forced promotion, fencing of an old
//! primary, failback and split-brain decisions.
//!
//! Every promotion bumps the volume's generation. A primary whose peer
//! holds a newer generation is *fenced*: it refuses writes and, when the
//! peer connects, becomes its secondary and hands over its change set, so
//! failback resends the union of both sides' changes, never the volume.
//! If the old primary acknowledged writes while cut off from the peer, both
//! sides hold writes the other lacks: that is split-brain, refused on both
//! sides until an admin runs `demote --discard-local` on the loser.
//!
//! Crash safety of a role change: the new role's file is written before the
//! old one is removed, and on start-up the secondary role wins when both
//! are found (it refuses writes); the admin then re-runs the command.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ember_proto::repl::v1 as pb;
use tonic::Status;

use super::Replication;
use crate::audit::Entry;
use crate::error::{ReplError, Result};
use crate::events::{Event, EventKind};
use crate::fencing;
use crate::primary::link::{Mode, PeerLossPolicy, Phase, ReplicaConfig, ReplicaLink, now_unix_ns};
use crate::primary::rpo::RpoPolicy;
use crate::secondary::SecondaryRecord;
use crate::version::ProtocolVersion;

/// How long a planned switchover waits for the old primary to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the drain checks for lag 0.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// What a promotion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromoteReport {
    /// Generation the volume is primary at now.
    pub generation: u64,
    /// Forced (the old primary was not asked).
    pub forced: bool,
    /// Forced: the old primary's time of the image this site came up on
    /// (unix ns); writes acknowledged after it are lost. 0 when planned.
    pub recovery_point_unix_ns: i64,
    /// The site that is now the secondary (or will be when it returns).
    pub peer: String,
    /// The volume was primary here already; nothing changed.
    pub already_primary: bool,
}

pub(super) fn refused(site: &str, call: &'static str) -> impl FnOnce(Status) -> ReplError {
    let site = site.to_owned();
    move |status| ReplError::Refused { site, call, status }
}

fn to_status(e: ReplError) -> Status {
    match e {
        ReplError::NotFound(m) => Status::not_found(m),
        ReplError::FailedPrecondition(m) => Status::failed_precondition(m),
        ReplError::InvalidArgument(m) => Status::invalid_argument(m),
        ReplError::Refused { status, .. } => status,
        other => Status::internal(other.to_string()),
    }
}

impl Replication {
    /// Records a role decision: audit log and event.
    pub(super) fn decide(&self, entry: &Entry<'_>) {
        self.audit.record(entry);
        let kind = match entry.action {
            "promote" | "force-promote" => EventKind::Promoted,
            "split-brain" => EventKind::SplitBrain,
            _ => EventKind::Demoted,
        };
        let mut event = Event::new(
            kind,
            entry.volume,
            format!("{}: {}", entry.action, entry.detail),
        );
        event.generation = entry.generation;
        self.ctx.events.publish(event);
    }

    /// Promotes the secondary of `volume` held here. Planned (`force` off):
    /// the primary drains and becomes this site's secondary — zero loss,
    /// replication continues the other way without resync. Forced: the
    /// primary is not asked; this site comes up on its last consistent
    /// image and reports that point as the recovery point.
    ///
    /// # Errors
    /// Not a replica here; an inconsistent secondary (forced); the primary
    /// refused or could not drain (planned).
    pub async fn promote(&self, volume: &str, force: bool) -> Result<PromoteReport> {
        self.promote_as(volume, force, None).await
    }

    /// [`Self::promote`]; `group`: the volume comes up as a member of this
    /// site's group of that name (a group promotion), so its very first
    /// session back to the old primary is grouped.
    pub(crate) async fn promote_as(
        &self,
        volume: &str,
        force: bool,
        group: Option<&str>,
    ) -> Result<PromoteReport> {
        if let Some(link) = self.link(volume) {
            let cfg = link.config();
            if cfg.fenced || cfg.split_brain {
                return Err(ReplError::FailedPrecondition(format!(
                    "volume {volume} is a fenced primary here (its peer {} was promoted past it); \
                     demote it or resolve the split-brain",
                    cfg.peer
                )));
            }
            return Ok(PromoteReport {
                generation: cfg.generation,
                forced: false,
                recovery_point_unix_ns: cfg.recovery_point_unix_ns,
                peer: cfg.peer,
                already_primary: true,
            });
        }
        let sv = self.secondaries.get(volume).ok_or_else(|| {
            ReplError::NotFound(format!("volume {volume} is not replicated on this site"))
        })?;
        let rec = sv.record();
        if force {
            self.force_promote(rec, group).await
        } else {
            self.planned_promote(rec, group).await
        }
    }

    async fn planned_promote(
        &self,
        rec: SecondaryRecord,
        group: Option<&str>,
    ) -> Result<PromoteReport> {
        let generation = rec.generation + 1;
        let (mut client, _, version) = self.ctx.registry.call_client(&rec.primary_site).await?;
        if version < ProtocolVersion::FAILOVER {
            return Err(ReplError::FailedPrecondition(format!(
                "peer {} was paired at protocol version {version}; re-pair it for planned switchover, or promote with --force",
                rec.primary_site
            )));
        }
        let drained = client
            .demote(pb::DemoteRequest {
                volume: rec.volume.clone(),
                generation,
                new_primary_site: self.ctx.identity.site.clone(),
                new_primary_backend_id: self.ctx.identity.backend_id.clone(),
                drain_timeout_ms: 0,
            })
            .await
            .map_err(refused(&rec.primary_site, "Demote"))?
            .into_inner();
        let config = ReplicaConfig {
            last_consistent_at_unix_ns: drained.drained_at_unix_ns,
            ..ReplicaConfig::new(
                &rec.volume,
                &rec.primary_site,
                Mode::parse(&drained.mode).unwrap_or(Mode::Async),
                drained.rpo_seconds,
                RpoPolicy::parse(&drained.rpo_policy).unwrap_or_default(),
                PeerLossPolicy::parse(&drained.on_peer_loss).unwrap_or_default(),
            )
            .promoted(generation)
        };
        let config = ReplicaConfig {
            group: group.map(str::to_owned),
            ..config
        };
        self.become_primary(config).await?;
        self.decide(&Entry {
            action: "promote",
            volume: &rec.volume,
            peer: &rec.primary_site,
            generation,
            detail: "planned switchover: the old primary drained to lag 0".into(),
        });
        self.rehome_others(
            &rec.volume,
            &rec.primary_site,
            generation,
            drained.drained_at_unix_ns,
            &drained.others,
        )
        .await;
        Ok(PromoteReport {
            generation,
            forced: false,
            recovery_point_unix_ns: 0,
            peer: rec.primary_site,
            already_primary: false,
        })
    }

    async fn force_promote(
        &self,
        rec: SecondaryRecord,
        group: Option<&str>,
    ) -> Result<PromoteReport> {
        if !rec.consistent {
            return Err(ReplError::FailedPrecondition(format!(
                "secondary {} is inconsistent (its initial sync or a failback resync has not \
                 finished): promoting it would serve a torn image",
                rec.volume
            )));
        }
        // Ranges this copy holds that the old primary may lack (after a
        // rollback to a recovery point: every block changed since it) go
        // into the new change set first, so failback resends them.
        self.premark_change_set(&rec.volume, &rec.primary_site, &rec.divergent)
            .map_err(|s| ReplError::Internal(s.message().to_owned()))?;
        let generation = rec.generation + 1;
        // The old primary's other targets get their change sets now, before
        // this site serves a write (`forced_rehome.rs`).
        self.prepare_forced_rehome(&rec, generation)?;
        let config = ReplicaConfig {
            recovery_point_unix_ns: rec.consistent_at_unix_ns,
            ..ReplicaConfig::new(
                &rec.volume,
                &rec.primary_site,
                Mode::parse(&rec.mode).unwrap_or(Mode::Async),
                rec.rpo_seconds,
                RpoPolicy::parse(&rec.rpo_policy).unwrap_or_default(),
                PeerLossPolicy::default(),
            )
            .promoted(generation)
        };
        let config = ReplicaConfig {
            group: group.map(str::to_owned),
            ..config
        };
        self.become_primary(config).await?;
        self.decide(&Entry {
            action: "force-promote",
            volume: &rec.volume,
            peer: &rec.primary_site,
            generation,
            detail: format!(
                "recovery point {} (unix ns): writes the old primary acknowledged after it are lost",
                rec.consistent_at_unix_ns
            ),
        });
        Ok(PromoteReport {
            generation,
            forced: true,
            recovery_point_unix_ns: rec.consistent_at_unix_ns,
            peer: rec.primary_site,
            already_primary: false,
        })
    }

    /// Secondary → primary: writes the primary role, drops the secondary
    /// role (and any uncommitted staged batch), starts the link with a
    /// clean change set that records every write from now on.
    async fn become_primary(&self, config: ReplicaConfig) -> Result<()> {
        let path = self.config_path(&config.volume);
        ember_volume::fsutil::write_json_atomic(&path, &config)
            .map_err(|e| ReplError::Internal(format!("persist replica config: {e}")))?;
        // A forced promotion (it reports a recovery point) keeps the
        // recovery points as snapshots; a planned one loses nothing.
        let forced = config.recovery_point_unix_ns != 0;
        if let Err(status) = self.secondaries.release(&config.volume, forced).await {
            let _ = std::fs::remove_file(&path);
            return Err(ReplError::Internal(format!(
                "dropping the secondary role: {}",
                status.message()
            )));
        }
        self.start(config, false)?;
        Ok(())
    }

    /// Primary → secondary: stops the session, hands the change set (blocks
    /// the peer may lack) to `record`, persists the secondary role, then
    /// drops the primary role. Returns the divergent bytes.
    async fn demote_local(
        &self,
        volume: &str,
        record: impl FnOnce(Vec<(u64, u64)>) -> SecondaryRecord,
    ) -> Result<u64> {
        // Only the planned handover (which released the other targets
        // first, for the new primary to re-home) demotes a volume of
        // several targets; refusing keeps them replicating from here.
        self.check_demotable(volume)?;
        let running = self
            .running
            .lock()
            .expect("running lock poisoned")
            .remove(volume)
            .ok_or_else(|| ReplError::NotFound(format!("volume {volume} is not primary here")))?;
        running.stop.cancel();
        if let Some(task) = running.task {
            let _ = task.await;
        }
        let link = running.link;
        let cfg = link.config();
        let tracker = link
            .volume
            .tracker()
            .cloned()
            .ok_or_else(|| ReplError::Internal("volume has no change tracking".into()))?;
        let consumer = link.consumer();
        let divergent: Vec<(u64, u64)> = tracker
            .consumer_checkpoint(&consumer)
            .map_err(|e| ReplError::Internal(format!("reading the change set: {e}")))?
            .extents
            .iter()
            .map(|e| (e.offset, e.length))
            .collect();
        let bytes = divergent.iter().map(|&(_, l)| l).sum();
        // A group member stays in its group as a secondary: the group can
        // be promoted back at once, before the new primary's sessions say so.
        let mut secondary = record(divergent);
        secondary.group = cfg.group.clone().unwrap_or_default();
        if let Err(status) = self.secondaries.adopt(link.volume.clone(), secondary) {
            // Still primary: put the link back.
            self.start(cfg, false)?;
            return Err(ReplError::Internal(format!(
                "persisting the secondary role: {}",
                status.message()
            )));
        }
        self.group_member_gone(volume);
        link.journal().release_waiters();
        if let Err(e) = tracker.remove_consumer(&self.store_tracking_dir(volume), &consumer) {
            tracing::warn!(volume, error = %e, "cannot remove the old change set");
        }
        let _ = std::fs::remove_file(self.config_path(volume));
        Ok(bytes)
    }

    /// Waits until the secondary holds every write: streaming, nothing in
    /// the journal, an empty change set — twice, a poll apart, so a write
    /// that passed the refusal check just before it was raised is seen.
    pub(super) async fn drain(&self, link: &ReplicaLink, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let tracker = link
            .volume
            .tracker()
            .cloned()
            .ok_or_else(|| ReplError::Internal("volume has no change tracking".into()))?;
        let consumer = link.consumer();
        let mut clean_polls = 0;
        while clean_polls < 2 {
            let clean = link.phase() == Phase::Streaming
                && link.lag().1 == 0
                && link.journal().unsent_bytes() == 0
                && tracker.consumer_dirty_bytes(&consumer) == Some(0);
            clean_polls = if clean { clean_polls + 1 } else { 0 };
            if Instant::now() > deadline {
                let (_, lag_bytes) = link.lag();
                return Err(ReplError::FailedPrecondition(format!(
                    "could not drain within {timeout:?}: lag {lag_bytes} bytes, session {:?}",
                    link.phase()
                )));
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        Ok(())
    }

    /// `Demote` from the peer (planned switchover asked by the secondary).
    pub(crate) async fn demote_for_peer(
        &self,
        req: pb::DemoteRequest,
    ) -> Result<pb::DemoteResponse, Status> {
        if let Some(sv) = self.secondaries.get(&req.volume) {
            let rec = sv.record();
            if rec.primary_site == req.new_primary_site && rec.generation >= req.generation {
                // Already done (a retried call after a lost answer).
                return Ok(pb::DemoteResponse {
                    mode: rec.mode,
                    rpo_seconds: rec.rpo_seconds,
                    on_peer_loss: String::new(),
                    drained_at_unix_ns: rec.consistent_at_unix_ns,
                    rpo_policy: rec.rpo_policy,
                    others: Vec::new(),
                });
            }
            return Err(Status::failed_precondition(format!(
                "volume {} is a secondary of {} here, not a primary",
                req.volume, rec.primary_site
            )));
        }
        let link = self.link(&req.volume).ok_or_else(|| {
            Status::not_found(format!("volume {} is not primary here", req.volume))
        })?;
        // Any target may be promoted; its own settings are what the new
        // primary takes over for its link back to this site.
        let Some(cfg) = self.target_config(&req.volume, &req.new_primary_site) else {
            return Err(Status::failed_precondition(format!(
                "volume {} replicates to {}, not to {}",
                req.volume,
                link.config().peer,
                req.new_primary_site
            )));
        };
        let cfg = ReplicaConfig {
            generation: link.config().generation,
            fenced: link.config().fenced,
            split_brain: link.config().split_brain,
            ..cfg
        };
        if req.generation <= cfg.generation {
            return Err(fencing::stale_generation(
                &req.volume,
                req.generation,
                cfg.generation,
            ));
        }
        if cfg.fenced || cfg.split_brain {
            return Err(Status::failed_precondition(format!(
                "volume {} is fenced here; it cannot hand over cleanly",
                req.volume
            )));
        }
        let timeout = match req.drain_timeout_ms {
            0 => DRAIN_TIMEOUT,
            ms => Duration::from_millis(u64::from(ms)),
        };
        link.refuse_writes(true);
        tracing::info!(volume = %req.volume, to = %req.new_primary_site, "planned switchover: writes refused, draining");
        // Every target drains to the same image (the other targets too:
        // the new primary re-homes them without a copy).
        if let Err(e) = self.drain_all(&req.volume, &link, timeout).await {
            link.refuse_writes(false);
            tracing::warn!(volume = %req.volume, error = %e, "planned switchover abandoned; serving writes again");
            return Err(Status::unavailable(e.to_string()));
        }
        let drained_at = now_unix_ns();
        let others = self
            .release_for_rehome(&req.volume, &req.new_primary_site)
            .await;
        let (volume, site, backend) = (
            req.volume.clone(),
            req.new_primary_site.clone(),
            req.new_primary_backend_id.clone(),
        );
        self.demote_local(&req.volume, |_| {
            SecondaryRecord::demoted(
                &volume,
                &site,
                &backend,
                req.generation,
                Some(drained_at),
                Vec::new(),
                false,
            )
        })
        .await
        .map_err(to_status)?;
        if let Some(sv) = self.secondaries.get(&req.volume) {
            sv.update(|r| {
                r.mode = cfg.mode.as_str().to_owned();
                r.rpo_seconds = cfg.rpo_seconds;
                r.rpo_policy = cfg.rpo_policy.as_str().to_owned();
            })?;
        }
        self.decide(&Entry {
            action: "demote",
            volume: &req.volume,
            peer: &req.new_primary_site,
            generation: req.generation,
            detail: "planned switchover: drained to lag 0, now a consistent secondary".into(),
        });
        Ok(pb::DemoteResponse {
            mode: cfg.mode.as_str().into(),
            rpo_seconds: cfg.rpo_seconds,
            on_peer_loss: cfg.on_peer_loss.as_str().into(),
            drained_at_unix_ns: drained_at,
            rpo_policy: cfg.rpo_policy.as_str().into(),
            others,
        })
    }

    /// `Promote` from the peer (planned switchover asked by the primary).
    pub(crate) async fn promote_for_peer(
        &self,
        req: pb::PeerPromoteRequest,
    ) -> Result<pb::PeerPromoteResponse, Status> {
        let sv = self
            .secondaries
            .get(&req.volume)
            .ok_or_else(|| Status::not_found(format!("no secondary named {}", req.volume)))?;
        if sv.record().primary_site != req.primary_site {
            return Err(Status::failed_precondition(format!(
                "secondary {} follows {}, not {}",
                req.volume,
                sv.record().primary_site,
                req.primary_site
            )));
        }
        let report = self.promote(&req.volume, false).await.map_err(to_status)?;
        Ok(pb::PeerPromoteResponse {
            generation: report.generation,
        })
    }

    /// `OpenReplica` from the peer. If this site is still primary for the
    /// volume at an older generation, the caller was promoted past it:
    /// become its secondary (handing over the change set), or refuse with
    /// split-brain when this site acknowledged writes while cut off.
    pub(crate) async fn open_replica_for_peer(
        &self,
        req: pb::OpenReplicaRequest,
    ) -> Result<pb::OpenReplicaResponse, Status> {
        if let Some(link) = self.link(&req.volume) {
            let cfg = link.config();
            let theirs = req.generation.max(1);
            if theirs <= cfg.generation {
                return Err(fencing::stale_generation(
                    &req.volume,
                    theirs,
                    cfg.generation,
                ));
            }
            // Several targets: the promoted one may be any of them; the
            // others are released to it (issue 14).
            let also_divergent = self
                .follow_promoted_target(&link, &req.volume, &req.primary_site, theirs)
                .await?;
            if also_divergent.is_none() && cfg.peer != req.primary_site {
                return Err(Status::failed_precondition(format!(
                    "volume {} is primary here and replicates to {}, not {}",
                    req.volume, cfg.peer, req.primary_site
                )));
            }
            if also_divergent.is_none() && (cfg.wrote_disconnected || cfg.split_brain) {
                link.refuse_writes(true);
                if !cfg.split_brain {
                    link.update(|c| {
                        c.split_brain = true;
                        c.fenced = true;
                    })
                    .map_err(|e| Status::internal(format!("persisting split-brain: {e}")))?;
                    self.decide(&Entry {
                        action: "split-brain",
                        volume: &req.volume,
                        peer: &req.primary_site,
                        generation: cfg.generation,
                        detail: format!(
                            "the peer was promoted to generation {theirs} while this site took writes cut off from it; writes refused until an admin names the loser"
                        ),
                    });
                }
                return Err(fencing::split_brain(
                    &req.volume,
                    "this site took writes while cut off from the peer, and the peer was promoted",
                ));
            }
            let (volume, site, backend) = (
                req.volume.clone(),
                req.primary_site.clone(),
                req.primary_backend_id.clone(),
            );
            let bytes = self
                .demote_local(&req.volume, |mut divergent| {
                    // The promoted target's own change set too, when it
                    // was not the first target (a superset is safe).
                    divergent.extend(also_divergent.unwrap_or_default());
                    SecondaryRecord::demoted(
                        &volume, &site, &backend, theirs, None, divergent, false,
                    )
                })
                .await
                .map_err(to_status)?;
            self.decide(&Entry {
                action: "auto-demote",
                volume: &req.volume,
                peer: &req.primary_site,
                generation: theirs,
                detail: format!(
                    "the peer was promoted; this old primary follows it and hands over {bytes} changed bytes for resync"
                ),
            });
        }
        self.secondaries.open_replica(req).await
    }

    /// Demotes the primary of `volume` held here. Planned: asks the peer to
    /// promote (zero loss). With `discard_local` (this site lost a
    /// split-brain, or an admin gives up its unreplicated writes): becomes
    /// the peer's secondary at once; its changes since the split are
    /// overwritten from the peer. Returns the bytes that will be resent.
    ///
    /// # Errors
    /// Not primary here; split-brain without `discard_local`; the peer
    /// refused.
    pub async fn demote(&self, volume: &str, discard_local: bool) -> Result<u64> {
        let Some(link) = self.link(volume) else {
            if self.secondaries.get(volume).is_some() {
                return Ok(0);
            }
            return Err(ReplError::NotFound(format!(
                "volume {volume} is not replicated on this site"
            )));
        };
        let cfg = link.config();
        if discard_local {
            // From the pairing record: the peer may well be unreachable now.
            let backend = self
                .ctx
                .registry
                .backend_id(&cfg.peer)
                .await
                .unwrap_or_default();
            let peer = cfg.peer.clone();
            let bytes = self
                .demote_local(volume, |divergent| {
                    SecondaryRecord::demoted(
                        volume,
                        &peer,
                        &backend,
                        cfg.generation,
                        None,
                        divergent,
                        true,
                    )
                })
                .await?;
            self.decide(&Entry {
                action: "discard-local",
                volume,
                peer: &cfg.peer,
                generation: cfg.generation,
                detail: format!(
                    "admin named this site the loser: {bytes} changed bytes will be overwritten from the peer"
                ),
            });
            return Ok(bytes);
        }
        if cfg.split_brain || link.peer_split_brain.load(Ordering::SeqCst) {
            return Err(ReplError::FailedPrecondition(format!(
                "split-brain on {volume}: name the loser with `emberctl replica demote {volume} --discard-local` on that site"
            )));
        }
        if cfg.fenced {
            return Err(ReplError::FailedPrecondition(format!(
                "volume {volume} is fenced: {} was promoted past it and will demote it when it connects; \
                 use --discard-local to do it now",
                cfg.peer
            )));
        }
        let (mut client, _, _) = self.ctx.registry.call_client(&cfg.peer).await?;
        client
            .promote(pb::PeerPromoteRequest {
                volume: volume.to_owned(),
                primary_site: self.ctx.identity.site.clone(),
            })
            .await
            .map_err(refused(&cfg.peer, "Promote"))?;
        Ok(0)
    }
}
