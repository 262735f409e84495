//! [`Replication`]: the agent's replicas — enable, disable, status, verify —
//! and the session tasks of the volumes it is primary for.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ember_proto::repl::v1 as pb;
use ember_volume::VolumeStore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod drills;
mod forced_rehome;
mod group_targets;
mod groups;
mod idle_marks;
mod per_target;
mod points;
mod rehome;
mod roles;
mod targets;

pub use drills::DrillRequest;
pub use group_targets::GroupTargetStatus;
pub use groups::{GroupMember, GroupPromoteReport, GroupStatus};
pub use per_target::worst_report;
pub use points::{PointSettings, PointTarget};
pub use roles::PromoteReport;

use crate::PeerRegistry;
use crate::audit::AuditLog;
use crate::error::{ReplError, Result};
use crate::events::EventBus;
use crate::faults::Faults;
use crate::primary::link::{
    Mode, PeerLossPolicy, Phase, ReplicaConfig, ReplicaLink, consumer_name,
};
use crate::primary::rpo::{self, RpoPolicy};
use crate::primary::session::{self, Ctx, LinkBuckets};
use crate::secondary::SecondarySet;
use crate::service::Identity;
use crate::throttle::TokenBucket;
use crate::version::ProtocolVersion;

/// Default journal capacity per replicated volume.
pub const DEFAULT_JOURNAL_BYTES: u64 = 256 << 20;
/// Verify compares blake3 per block of this size.
const VERIFY_BLOCK: u64 = 1 << 20;

/// What `enable` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnableRequest {
    /// Volume to replicate.
    pub volume: String,
    /// Peer site.
    pub peer: String,
    /// Mode.
    pub mode: Mode,
    /// RPO target, seconds.
    pub rpo_seconds: u64,
    /// What happens when the RPO target is at risk.
    pub rpo_policy: RpoPolicy,
    /// Sync-mode peer-loss policy.
    pub on_peer_loss: PeerLossPolicy,
}

/// A replicated volume's status, for the API.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaStatus {
    /// Volume.
    pub volume: String,
    /// `primary` or `secondary`.
    pub role: &'static str,
    /// The other site.
    pub peer: String,
    /// `sync` / `async` (empty on a secondary).
    pub mode: &'static str,
    /// syncing / in-sync / lagging / degraded / disconnected (primary);
    /// consistent / inconsistent / detached (secondary).
    pub state: &'static str,
    /// Age of the oldest write not yet on the secondary.
    pub lag_seconds: f64,
    /// Bytes written since then.
    pub lag_bytes: u64,
    /// The secondary's last consistent point (unix ns, 0 = none yet).
    pub last_consistent_at_unix_ns: i64,
    /// Bytes the running resync still has to examine.
    pub resync_remaining_bytes: u64,
    /// Bytes the running resync started with.
    pub resync_total_bytes: u64,
    /// Estimated seconds to finish the resync (0 when none or unknown).
    pub resync_eta_seconds: f64,
    /// Bytes resent by resyncs so far (initial sync and catch-ups).
    pub resync_bytes_sent: u64,
    /// Bytes initial sync found identical and skipped.
    pub resync_bytes_skipped: u64,
    /// Data bytes shipped.
    pub bytes_shipped: u64,
    /// Frames the secondary refused (bad checksum).
    pub frames_rejected: u64,
    /// Sessions started.
    pub sessions: u64,
    /// RPO target.
    pub rpo_seconds: u64,
    /// `alert`, `throttle` or `escalate` (empty on a secondary).
    pub rpo_policy: &'static str,
    /// The lag is above the RPO target now.
    pub rpo_breached: bool,
    /// RPO breaches since the agent started.
    pub rpo_breaches: u64,
    /// The escalate policy is replicating synchronously for now.
    pub rpo_escalated: bool,
    /// Sync-mode peer-loss policy.
    pub on_peer_loss: &'static str,
    /// Consistency group (empty: none).
    pub group: String,
    /// Why the link is down, if it is.
    pub last_error: String,
    /// Fencing generation (bumped by every promotion).
    pub generation: u64,
    /// After a forced promotion: the old primary's time of the image this
    /// primary came up on (unix ns): writes after it were lost. 0 otherwise.
    pub recovery_point_unix_ns: i64,
    /// Primary: replication memory budget bytes this volume's journal holds
    /// (queued and in flight).
    pub memory_held_bytes: u64,
    /// Primary: journal overflows to change-set catch-up since start.
    pub journal_overflows: u64,
    /// Primary: every target, the first one first (the top-level fields
    /// are the worst target's). Empty on a secondary.
    pub targets: Vec<TargetStatus>,
}

/// One target of a primary volume, for `replica status`.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetStatus {
    /// The target's site.
    pub peer: String,
    /// `sync` / `async`.
    pub mode: &'static str,
    /// syncing / in-sync / lagging / degraded / disconnected / paused /
    /// fenced / split-brain.
    pub state: &'static str,
    /// Age of the oldest write not yet on this target.
    pub lag_seconds: f64,
    /// Bytes written since then.
    pub lag_bytes: u64,
    /// This target's last consistent point (unix ns, 0 = none yet).
    pub last_consistent_at_unix_ns: i64,
    /// Bytes the running resync to this target still has to examine.
    pub resync_remaining_bytes: u64,
    /// Bytes resent to this target by resyncs so far.
    pub resync_bytes_sent: u64,
}

/// What this agent offers for replication to one paired peer: the input
/// of placement (a Cinder volume type's RPO against these bounds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetCapability {
    /// Peer site.
    pub site: String,
    /// Its backend id.
    pub backend_id: String,
    /// `connected` or `unreachable` at the probe just made.
    pub state: &'static str,
    /// Median ping round trip, microseconds.
    pub rtt_us: u64,
    /// Measured bulk throughput at pairing, bytes per second.
    pub throughput_bytes_per_sec: u64,
    /// Sync replication is possible: reachable, and a round trip short
    /// enough (≤ [`SYNC_RTT_MAX_US`]) to wait for on every write.
    pub sync_possible: bool,
    /// Lowest RPO this link can hold: 0 when sync is possible, else 1 s
    /// (async commits every 20 ms plus the round trip).
    pub min_rpo_seconds: u64,
    /// Highest RPO the agent can hold in write order: the per-volume
    /// journal against the highest recent write rate among the volumes
    /// replicating to this peer (capped at [`MAX_RPO_SECONDS`]).
    pub max_rpo_seconds: u64,
    /// Volumes replicating to this peer now.
    pub volumes: u32,
}

/// Round trips above this make sync replication impractical.
pub const SYNC_RTT_MAX_US: u64 = 50_000;
/// Cap of the reported maximum RPO (one day).
pub const MAX_RPO_SECONDS: u64 = 86_400;

/// One mismatching range found by verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

/// Result of an online verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The target compared with.
    pub peer: String,
    /// Bytes compared.
    pub compared_bytes: u64,
    /// Ranges that differ although no write to them is pending.
    pub mismatches: Vec<Mismatch>,
    /// Bytes skipped because writes to them are still in flight.
    pub pending_bytes: u64,
    /// Whether mismatches were queued for resync.
    pub resync_queued: bool,
}

struct Running {
    link: Arc<ReplicaLink>,
    stop: CancellationToken,
    /// The session task; `None` while paused.
    task: Option<JoinHandle<()>>,
}

/// The replicas of this agent.
#[derive(Debug)]
pub struct Replication {
    dir: PathBuf,
    store: Arc<VolumeStore>,
    ctx: Arc<Ctx>,
    secondaries: Arc<SecondarySet>,
    running: Mutex<HashMap<String, Running>>,
    /// Targets after the first of a volume (issue 14), by volume. The first
    /// target stays in `running`, so promotion, groups, points and verify
    /// keep working on it unchanged; the volume's hook fans out to all.
    extra: Mutex<HashMap<String, Vec<Running>>>,
    buckets: Mutex<HashMap<String, Arc<LinkBuckets>>>,
    journal_bytes: u64,
    audit: AuditLog,
    groups_dir: PathBuf,
    groups: Mutex<HashMap<String, groups::RunningGroup>>,
    /// DR drills made from the secondaries here (`manager/drills.rs`).
    drills: crate::drill::Drills,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("link", &self.link).finish()
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> ReplError {
    ReplError::Internal(format!("{what}: {e}"))
}

impl Replication {
    /// Loads the primary replica configs and starts their sessions.
    ///
    /// # Errors
    /// Unreadable configs.
    pub fn open(
        data_dir: &Path,
        store: Arc<VolumeStore>,
        registry: Arc<PeerRegistry>,
        secondaries: Arc<SecondarySet>,
        identity: Identity,
        faults: Faults,
    ) -> Result<Self> {
        let dir = data_dir.join("replicas").join("primary");
        std::fs::create_dir_all(&dir).map_err(|e| internal("create replicas dir", e))?;
        let drills =
            crate::drill::Drills::open(data_dir, store.clone(), faults.delay_drill.clone())
                .map_err(|e| internal("load the DR drills", e))?;
        let this = Self {
            dir: dir.clone(),
            store,
            ctx: Arc::new(Ctx {
                registry,
                identity,
                corrupt_frames: AtomicU64::new(faults.corrupt_frames),
                delay_group_commit: faults.delay_group_commit,
                // One bus for the agent: the secondaries' recovery points
                // publish on it too.
                events: secondaries.events().clone(),
            }),
            secondaries,
            running: Mutex::new(HashMap::new()),
            extra: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            journal_bytes: DEFAULT_JOURNAL_BYTES,
            audit: AuditLog::new(&data_dir.join("replicas")),
            groups_dir: data_dir.join("replicas").join("groups"),
            groups: Mutex::new(HashMap::new()),
            drills,
        };
        std::fs::create_dir_all(&this.groups_dir).map_err(|e| internal("create groups dir", e))?;
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| internal("read replicas dir", e))? {
            let path = entry.map_err(|e| internal("read replicas dir", e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            paths.push(path);
        }
        // First targets (`VOL.json`, the only kind before issue 14) before
        // further ones (`VOL@PEER.json`), so every volume has its first
        // target running when the others join its hook.
        paths.sort_by_key(|p| targets::is_extra_path(p));
        for path in paths {
            let config: ReplicaConfig = ember_volume::fsutil::read_json(&path)
                .map_err(|e| internal("read replica config", e))?;
            if this.store.export(&config.volume).is_none() {
                tracing::warn!(volume = %config.volume, "replica config for a missing volume; dropping it");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if this.secondaries.get(&config.volume).is_some() {
                // A role change was cut short between writing the new role
                // and removing the old: the secondary role wins (it refuses
                // writes); the admin re-runs the promotion.
                tracing::warn!(volume = %config.volume, "volume is both primary and secondary on disk; keeping it a secondary");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            this.load_target(config, &path)?;
        }
        for entry in
            std::fs::read_dir(&this.groups_dir).map_err(|e| internal("read groups dir", e))?
        {
            let path = entry.map_err(|e| internal("read groups dir", e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let config: groups::GroupConfig = ember_volume::fsutil::read_json(&path)
                .map_err(|e| internal("read group config", e))?;
            this.start_group(config);
        }
        Ok(this)
    }

    /// Replication events, for `WatchEvents`.
    pub fn events(&self) -> &EventBus {
        &self.ctx.events
    }

    /// The secondaries this agent holds.
    pub fn secondaries(&self) -> &Arc<SecondarySet> {
        &self.secondaries
    }

    fn config_path(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("{volume}.json"))
    }

    fn buckets(&self, peer: &str) -> Arc<LinkBuckets> {
        self.buckets
            .lock()
            .expect("buckets lock poisoned")
            .entry(peer.to_owned())
            .or_insert_with(|| {
                Arc::new(LinkBuckets {
                    all: TokenBucket::new(0),
                    resync: TokenBucket::new(0),
                })
            })
            .clone()
    }

    /// Starts the link of `config`. `all_dirty`: a new change set starts
    /// with every block dirty (a new replica); otherwise clean (a promotion:
    /// both sides hold the same image, or the peer reports what differs).
    fn start(&self, config: ReplicaConfig, all_dirty: bool) -> Result<Arc<ReplicaLink>> {
        self.start_target(config, all_dirty, true)
    }

    /// [`Self::start`] for the first target (`lead`, in `running`) or a
    /// further one (in `extra`).
    fn start_target(
        &self,
        config: ReplicaConfig,
        all_dirty: bool,
        lead: bool,
    ) -> Result<Arc<ReplicaLink>> {
        let volume = self
            .store
            .export(&config.volume)
            .ok_or_else(|| ReplError::NotFound(format!("volume {} not found", config.volume)))?;
        let tracker = volume.tracker().cloned().ok_or_else(|| {
            ReplError::FailedPrecondition(
                "replication needs change tracking; this agent runs with --no-tracking".into(),
            )
        })?;
        let dir = self.store_tracking_dir(&config.volume);
        tracker
            .add_consumer(&dir, &consumer_name(&config.peer), all_dirty)
            .map_err(|e| internal("create the replica's change set", e))?;
        let name = config.volume.clone();
        let peer = config.peer.clone();
        let path = if lead {
            self.config_path(&name)
        } else {
            self.extra_config_path(&name, &peer)
        };
        let link = ReplicaLink::new(volume.clone(), config, path, self.journal_bytes);
        // The hook first: the session finds every write from now on in
        // its journal (or, before it, in the change set).
        self.install_hook(&volume, &name, Some(&link));
        self.group_link_started(&link);
        let stop = CancellationToken::new();
        tokio::spawn(rpo::watch(
            Arc::downgrade(&link),
            self.ctx.events.clone(),
            stop.clone(),
        ));
        let task = (!link.config().paused).then(|| {
            tokio::spawn(session::run(
                link.clone(),
                self.ctx.clone(),
                self.buckets(&peer),
                stop.clone(),
            ))
        });
        let running = Running {
            link: link.clone(),
            stop,
            task,
        };
        if lead {
            self.running
                .lock()
                .expect("running lock poisoned")
                .insert(name, running);
        } else {
            self.extra
                .lock()
                .expect("extra lock poisoned")
                .entry(name)
                .or_default()
                .push(running);
        }
        Ok(link)
    }

    fn store_tracking_dir(&self, volume: &str) -> PathBuf {
        self.store.volume_dir(volume)
    }

    fn link(&self, volume: &str) -> Option<Arc<ReplicaLink>> {
        self.running
            .lock()
            .expect("running lock poisoned")
            .get(volume)
            .map(|r| r.link.clone())
    }

    /// Enables replication of a volume (idempotent for the same peer; mode,
    /// RPO and policy are updated in place).
    ///
    /// # Errors
    /// Unknown volume or peer, a secondary, an old peer protocol, I/O.
    pub async fn enable(&self, req: EnableRequest) -> Result<(ReplicaStatus, bool)> {
        ember_volume::parse_volume(&req.volume)
            .map_err(|e| ReplError::InvalidArgument(e.to_string()))?;
        if self.store.export(&req.volume).is_none() {
            return Err(ReplError::NotFound(format!(
                "volume {} not found",
                req.volume
            )));
        }
        if self.secondaries.get(&req.volume).is_some() {
            return Err(ReplError::FailedPrecondition(format!(
                "volume {} is a secondary here; replicate from its primary",
                req.volume
            )));
        }
        if let Some(source) = self.drills.source_of(&req.volume) {
            // A drill is a rehearsal copy, isolated by design: replicating
            // it would ship test writes to another site.
            return Err(ReplError::FailedPrecondition(format!(
                "volume {} is a DR drill of {source} and is never replicated; \
                 stop the drill, or clone a snapshot of it into a volume of its own",
                req.volume
            )));
        }
        if req.peer == self.ctx.identity.site {
            return Err(ReplError::InvalidArgument(format!(
                "site {} is this site: volume {} cannot replicate to itself",
                req.peer, req.volume
            )));
        }
        let Some((version, _)) = self.ctx.registry.peer(&req.peer).await else {
            return Err(ReplError::NotFound(format!(
                "site {} is not paired; run emberctl peer add first",
                req.peer
            )));
        };
        if version < ProtocolVersion::REPLICATION {
            return Err(ReplError::FailedPrecondition(format!(
                "peer {} was paired at protocol version {version}; re-pair it to replicate",
                req.peer
            )));
        }
        if let Some(link) = self.link(&req.volume) {
            let mut cfg = link.config();
            if cfg.peer != req.peer {
                self.check_multi_target(&req.peer, version, &cfg.peer)
                    .await?;
                return self.enable_another(req, &cfg);
            }
            groups::check_enable_in_group(&req, cfg.group.as_deref())?;
            cfg.mode = req.mode;
            cfg.rpo_seconds = req.rpo_seconds;
            cfg.rpo_policy = req.rpo_policy;
            cfg.on_peer_loss = req.on_peer_loss;
            ember_volume::fsutil::write_json_atomic(&self.config_path(&req.volume), &cfg)
                .map_err(|e| internal("persist replica config", e))?;
            *link.config.lock().expect("config lock poisoned") = cfg;
            return Ok((self.status(&req.volume)?, false));
        }
        let config = ReplicaConfig::new(
            &req.volume,
            &req.peer,
            req.mode,
            req.rpo_seconds,
            req.rpo_policy,
            req.on_peer_loss,
        );
        ember_volume::fsutil::write_json_atomic(&self.config_path(&req.volume), &config)
            .map_err(|e| internal("persist replica config", e))?;
        self.start(config, true)?;
        tracing::info!(volume = %req.volume, peer = %req.peer, mode = req.mode.as_str(), "replication enabled");
        Ok((self.status(&req.volume)?, true))
    }

    /// Replication capabilities per paired peer (probes each peer).
    pub async fn targets(&self) -> Vec<TargetCapability> {
        let mut links = self.lead_links();
        links.extend(self.all_extra_links());
        let mut out = Vec::new();
        for p in self.ctx.registry.list().await {
            let mine: Vec<&Arc<ReplicaLink>> =
                links.iter().filter(|l| l.config().peer == p.site).collect();
            let rate = mine
                .iter()
                .map(|l| l.rpo.write_rate.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0);
            let max_rpo_seconds = match rate {
                0 => MAX_RPO_SECONDS,
                r => (self.journal_bytes / r).min(MAX_RPO_SECONDS),
            };
            let connected = p.state == crate::PeerState::Connected
                && p.protocol_version >= ProtocolVersion::REPLICATION;
            let sync_possible = connected && p.link.rtt_us <= SYNC_RTT_MAX_US;
            out.push(TargetCapability {
                site: p.site,
                backend_id: p.backend_id,
                state: p.state.as_str(),
                rtt_us: p.link.rtt_us,
                throughput_bytes_per_sec: p.link.throughput_bytes_per_sec,
                sync_possible,
                min_rpo_seconds: u64::from(!sync_possible),
                max_rpo_seconds,
                volumes: mine.len() as u32,
            });
        }
        out
    }

    /// Disables replication of a volume to every target; the secondaries
    /// are kept read-only (or deleted with `delete_secondary`). Returns
    /// whether it was on.
    ///
    /// # Errors
    /// The peer refused to delete its copy; I/O.
    pub async fn disable(&self, volume: &str, delete_secondary: bool) -> Result<bool> {
        self.disable_target(volume, None, delete_secondary).await
    }

    /// Disables the first target of a volume (the others stay in `extra`).
    async fn disable_lead(&self, volume: &str, delete_secondary: bool) -> Result<bool> {
        let running = self
            .running
            .lock()
            .expect("running lock poisoned")
            .remove(volume);
        let Some(running) = running else {
            return Ok(false);
        };
        self.teardown(volume, running, true, delete_secondary)
            .await?;
        Ok(true)
    }

    /// Stops a target removed from `running` or `extra`: its session, its
    /// place in the volume's hook, its change set and config, and tells
    /// its peer.
    async fn teardown(
        &self,
        volume: &str,
        running: Running,
        lead: bool,
        delete_secondary: bool,
    ) -> Result<()> {
        running.stop.cancel();
        if let Some(task) = running.task {
            let _ = task.await;
        }
        let cfg = running.link.config();
        if lead {
            self.group_member_gone(volume);
        } else {
            self.group_link_gone(&running.link);
        }
        self.install_hook(&running.link.volume, volume, None);
        // Waiters of held writes see their sender dropped and complete.
        running.link.journal().release_waiters();
        if let Some(t) = running.link.volume.tracker() {
            t.remove_consumer(&self.store_tracking_dir(volume), &consumer_name(&cfg.peer))
                .map_err(|e| internal("remove the replica's change set", e))?;
        }
        let _ = std::fs::remove_file(running.link.config_path());
        let close = async {
            let (mut client, _, _) = self.ctx.registry.stream_client(&cfg.peer).await?;
            client
                .close_replica(pb::CloseReplicaRequest {
                    volume: volume.to_owned(),
                    delete_volume: delete_secondary,
                })
                .await
                .map_err(|status| ReplError::Refused {
                    site: cfg.peer.clone(),
                    call: "CloseReplica",
                    status,
                })
        };
        match close.await {
            Ok(_) => {}
            Err(e) if delete_secondary => return Err(e),
            Err(e) => {
                tracing::warn!(volume, peer = %cfg.peer, error = %e, "replication disabled; the peer was not told (its copy stays a secondary)");
            }
        }
        tracing::info!(volume, peer = %cfg.peer, "replication disabled");
        Ok(())
    }

    /// Status of a replicated volume (primary or secondary side).
    ///
    /// # Errors
    /// [`ReplError::NotFound`] when the volume is not replicated here.
    pub fn status(&self, volume: &str) -> Result<ReplicaStatus> {
        if let Some(link) = self.link(volume) {
            return Ok(self.primary_status_all(volume, &link));
        }
        if let Some(s) = self.secondaries.status(volume) {
            let state = if s.detached {
                "detached"
            } else if s.consistent {
                "consistent"
            } else {
                "inconsistent"
            };
            return Ok(ReplicaStatus {
                volume: volume.to_owned(),
                role: "secondary",
                peer: s.primary_site,
                mode: "",
                state,
                lag_seconds: 0.0,
                lag_bytes: 0,
                last_consistent_at_unix_ns: s.consistent_at_unix_ns,
                resync_remaining_bytes: 0,
                resync_total_bytes: 0,
                resync_eta_seconds: 0.0,
                resync_bytes_sent: 0,
                resync_bytes_skipped: 0,
                bytes_shipped: s.applied_bytes,
                frames_rejected: 0,
                sessions: 0,
                rpo_seconds: 0,
                rpo_policy: "",
                rpo_breached: false,
                rpo_breaches: 0,
                rpo_escalated: false,
                on_peer_loss: "",
                group: s.group,
                last_error: String::new(),
                generation: s.generation,
                recovery_point_unix_ns: 0,
                memory_held_bytes: 0,
                journal_overflows: 0,
                targets: Vec::new(),
            });
        }
        if self.store.export(volume).is_none() {
            return Err(ReplError::NotFound(format!("volume {volume} not found")));
        }
        Err(ReplError::NotFound(format!(
            "volume {volume} is not replicated"
        )))
    }

    /// Status of every replicated volume.
    pub fn list(&self) -> Vec<ReplicaStatus> {
        let mut names: Vec<String> = self
            .running
            .lock()
            .expect("running lock poisoned")
            .keys()
            .cloned()
            .collect();
        names.sort();
        names.iter().filter_map(|n| self.status(n).ok()).collect()
    }

    /// Restarts a volume's session (it resumes from the change set).
    fn restart(&self, volume: &str) {
        let old = {
            let mut running = self.running.lock().expect("running lock poisoned");
            let Some(r) = running.remove(volume) else {
                return;
            };
            r.stop.cancel();
            r.link.journal().release_waiters();
            r
        };
        // Out of the lock: the hook reads `running`. Until the restart the
        // other targets (if any) keep receiving writes.
        self.install_hook(&old.link.volume, volume, None);
        let config = old.link.config();
        if let Err(e) = self.start(config, false) {
            tracing::error!(volume, error = %e, "cannot restart replication");
        }
    }

    /// Stops every session (agent shutdown).
    pub async fn shutdown(&self) {
        let mut running: Vec<Running> = self
            .running
            .lock()
            .expect("running lock poisoned")
            .drain()
            .map(|(_, r)| r)
            .collect();
        running.extend(
            self.extra
                .lock()
                .expect("extra lock poisoned")
                .drain()
                .flat_map(|(_, r)| r),
        );
        for r in running {
            r.stop.cancel();
            if let Some(task) = r.task {
                let _ = task.await;
            }
            if let Err(e) = r.link.persist() {
                tracing::warn!(volume = %r.link.config().volume, error = %e, "cannot persist the replica config");
            }
        }
    }

    /// A volume is about to grow to `size_bytes`. A secondary is refused
    /// (it grows with its primary). A replicated primary's secondary grows
    /// first, so no frame can land beyond its end; the caller then grows
    /// the primary. If that fails, the secondary is left larger: re-running
    /// the resize finishes it (both steps are idempotent).
    ///
    /// # Errors
    /// A secondary; an old or unreachable peer; the peer's refusal.
    pub async fn grow_secondary_first(&self, volume: &str, size_bytes: u64) -> Result<()> {
        if let Some(sv) = self.secondaries.get(volume) {
            return Err(ReplError::FailedPrecondition(format!(
                "volume {volume} is a secondary of {}; resize it there (the secondary grows with it)",
                sv.record().primary_site
            )));
        }
        let Some(link) = self.link(volume) else {
            return Ok(());
        };
        if size_bytes <= ember_nbd::Export::size(link.volume.as_ref()) {
            // Same size or a shrink: the store answers (no-op or refusal).
            return Ok(());
        }
        // Every target grows first (several targets: each in turn; one
        // that cannot leaves the primary at its size, and re-running the
        // resize finishes the rest — growing is idempotent).
        let mut links = vec![link];
        links.extend(self.extra_links(volume));
        for link in links {
            let cfg = link.config();
            let (mut client, _, version) = self.ctx.registry.call_client(&cfg.peer).await?;
            if version < ProtocolVersion::RESIZE {
                return Err(ReplError::FailedPrecondition(format!(
                    "peer {} was paired at protocol version {version}; re-pair it to resize replicated volumes",
                    cfg.peer
                )));
            }
            client
                .resize_replica(pb::ResizeReplicaRequest {
                    volume: volume.to_owned(),
                    size_bytes,
                    primary_backend_id: self.ctx.identity.backend_id.clone(),
                    generation: cfg.generation,
                })
                .await
                .map_err(roles::refused(&cfg.peer, "ResizeReplica"))?;
        }
        Ok(())
    }

    /// A volume is being deleted or resized: refuse while replicated.
    ///
    /// # Errors
    /// [`ReplError::FailedPrecondition`] naming the replica.
    pub fn check_unreplicated(&self, volume: &str, what: &str) -> Result<()> {
        if let Some(link) = self.link(volume) {
            return Err(ReplError::FailedPrecondition(format!(
                "cannot {what} volume {volume}: it replicates to {}; disable replication first",
                link.config().peer
            )));
        }
        Ok(())
    }
}

pub(super) fn primary_status(link: &ReplicaLink) -> ReplicaStatus {
    let cfg = link.config();
    let (lag_seconds, lag_bytes) = link.lag();
    let phase = link.phase();
    let state = link.state();
    let s = &link.stats;
    let remaining = if matches!(phase, Phase::InitialSync | Phase::CatchUp) {
        s.resync_remaining_bytes.load(Ordering::Relaxed)
    } else {
        0
    };
    let total = s.resync_total_bytes.load(Ordering::Relaxed);
    let eta = link
        .resync_started
        .lock()
        .expect("resync lock poisoned")
        .map(|t: Instant| {
            let done = total.saturating_sub(remaining) as f64;
            let secs = t.elapsed().as_secs_f64();
            if remaining == 0 || done <= 0.0 {
                0.0
            } else {
                remaining as f64 / (done / secs)
            }
        })
        .unwrap_or(0.0);
    ReplicaStatus {
        volume: cfg.volume.clone(),
        role: "primary",
        peer: cfg.peer.clone(),
        mode: cfg.mode.as_str(),
        state,
        lag_seconds,
        lag_bytes,
        last_consistent_at_unix_ns: cfg.last_consistent_at_unix_ns,
        resync_remaining_bytes: remaining,
        resync_total_bytes: total,
        resync_eta_seconds: eta,
        resync_bytes_sent: s.resync_bytes_sent.load(Ordering::Relaxed),
        resync_bytes_skipped: s.resync_bytes_skipped.load(Ordering::Relaxed),
        bytes_shipped: s.bytes_shipped.load(Ordering::Relaxed),
        frames_rejected: s.frames_rejected.load(Ordering::Relaxed),
        sessions: s.sessions.load(Ordering::Relaxed),
        rpo_seconds: cfg.rpo_seconds,
        rpo_policy: cfg.rpo_policy.as_str(),
        rpo_breached: link.rpo.breached.load(Ordering::Relaxed),
        rpo_breaches: link.rpo.breaches.load(Ordering::Relaxed),
        rpo_escalated: link.rpo.escalated.load(Ordering::Relaxed),
        on_peer_loss: cfg.on_peer_loss.as_str(),
        group: cfg.group.clone().unwrap_or_default(),
        last_error: link.last_error.lock().expect("error lock poisoned").clone(),
        generation: cfg.generation,
        recovery_point_unix_ns: cfg.recovery_point_unix_ns,
        memory_held_bytes: link.journal().held_bytes(),
        journal_overflows: s.overflows.load(Ordering::Relaxed),
        targets: Vec::new(),
    }
}
