//! Re-homing after a *forced* promotion (issue 14), and the common marks
//! it relies on.
//!
//! The primary of a volume with several targets announces, about once a
//! second, the newest *common mark*: the oldest consistent point any of
//! its targets has acknowledged, so every target has applied through it.
//! Why that mark and not another: it needs no extra protocol state (each
//! link already knows its target's acknowledged consistent point), it is
//! correct for any mix of sync and async targets, and a target that is
//! down simply holds it back (the others' rings then keep an older mark).
//! Each target keeps, durably, the blocks it applied since each of its
//! last marks (`secondary/marks.rs`).
//!
//! When a target B is force-promoted (the primary A is gone), B takes over
//! every other target C of A that it can reach: before it serves a write
//! it creates C's change set (so every write from then on is in it) and
//! records what it must do in `DATA/replicas/rehome/VOL.json` (its own
//! marks and sets frozen at promotion, the targets A announced). Then, from
//! the background loop, it asks C for its record (`GetRehomeRecord`: C
//! follows B from that moment, fencing A), runs `plan::rehome`, and either
//! resends the union of both sets since the newest common mark — each
//! block compared by blake3 first, only differing ones are marked — or,
//! when the plan says so (C half-synced, no common mark), starts an
//! initial sync that compares every block by blake3. A site not reachable
//! now is retried every tick; the record survives a restart of B.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use ember_common::Extent;
use ember_proto::repl::v1 as pb;
use ember_volume::ReplicationHook;
use serde::{Deserialize, Serialize};

use super::Replication;
use super::idle_marks::Backoff;
use super::rehome::rehome_target;
use crate::audit::Entry;
use crate::error::{ReplError, Result};
use crate::fencing::{self, Refusal as WireRefusal};
use crate::hashes;
use crate::plan::points::{Blocks, MIN_BLOCK_BYTES};
use crate::plan::rehome::{self, Action, HeldPoint, Kind, Request, Role, SiteRecord};
use crate::primary::link::{Mode, PeerLossPolicy, Phase, ReplicaConfig, consumer_name};
use crate::primary::rpo::RpoPolicy;
use crate::secondary::SecondaryRecord;
use crate::secondary::marks::{Sibling, runs_from_proto};
use crate::version::ProtocolVersion;

/// How often the background loop announces marks and retries re-homings.
/// The marks' ring holds `MAX_SLOTS` of them: how far a slow target may
/// trail the others before re-homing it falls back to a full comparison.
const TICK: Duration = Duration::from_secs(1);
/// A re-homing call gives up after this long (retried next tick).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// An announcement gives up after this long: a dead target must not hold
/// the loop (it hears the next one).
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a re-homing record may wait while the volume here is neither
/// primary nor secondary: a promotion releases the secondary before its
/// primary link starts, so a record seen in that gap is not stale; one
/// still without a role after this long belongs to a volume that went
/// away (disabled or deleted).
const ROLELESS_GRACE: Duration = Duration::from_secs(60);

/// What the re-homing loop does with a pending record this tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecordFate {
    /// This site is the primary of that promotion: re-home.
    Proceed,
    /// The promotion is under way (or failed and may be retried): later.
    Wait,
    /// A different promotion owns the volume now, or it is gone: remove.
    Drop,
}

/// The fate of a record of the promotion to `record_generation`, given the
/// volume's role here now (`primary_generation`: the primary link's
/// generation, if any) and the record's age.
fn record_fate(
    primary_generation: Option<u64>,
    is_secondary: bool,
    record_generation: u64,
    record_age: Duration,
) -> RecordFate {
    match primary_generation {
        Some(g) if g == record_generation => RecordFate::Proceed,
        Some(_) => RecordFate::Drop,
        None if is_secondary || record_age < ROLELESS_GRACE => RecordFate::Wait,
        None => RecordFate::Drop,
    }
}

/// The last announcement of a volume's common mark.
#[derive(Debug, Clone, Default)]
struct Announced {
    /// The newest mark announced (unix ns; 0: none yet).
    mark: i64,
    /// The targets it was announced to (empty: some missed it).
    sites: Vec<String>,
    /// Every target answered that it holds `mark`.
    held_by_all: bool,
    /// The back-off of empty commits while some target holds no mark.
    backoff: Backoff,
}

/// Asks `link`'s session for a commit with nothing in it, so the target's
/// consistent point moves to now. Only async links: a sync link's
/// barriers already move it every second, and a group member's points do
/// (`primary::group`).
fn nudge(link: &crate::primary::link::ReplicaLink) {
    let cfg = link.config();
    if cfg.mode != Mode::Async || cfg.group.is_some() {
        return;
    }
    // A flush in a staged batch is a no-op on the target, but it opens a
    // batch: the session commits it on its next tick.
    link.journal()
        .record(crate::primary::journal::Op::Flush, false, false);
    link.wake.notify_one();
}

/// A mark a site held at promotion, with its blocks after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct OwnMark {
    id: i64,
    after: Blocks,
}

/// What a force-promoted site still has to do for the old primary's
/// other targets; persisted before the promotion serves a write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    volume: String,
    /// The generation this site was promoted to.
    generation: u64,
    old_primary: String,
    /// Block size of `own` (and of the plan).
    block_bytes: u64,
    /// This site's marks at promotion, oldest first.
    own: Vec<OwnMark>,
    /// The image it came up on (primary clock, unix ns).
    consistent_at_unix_ns: i64,
    /// Targets still to re-home.
    siblings: Vec<Sibling>,
}

/// The records the plan runs on: the old primary (not asked: gone), this
/// new primary with its frozen marks, and the other target as it answered.
fn records(
    me: &str,
    p: &Pending,
    theirs: &pb::GetRehomeRecordResponse,
    site: &str,
) -> Vec<SiteRecord> {
    let mine = SiteRecord {
        site: me.to_owned(),
        role: Role::Primary,
        generation: p.generation,
        lineage: 0,
        points: p
            .own
            .iter()
            .map(|m| HeldPoint {
                id: m.id,
                after: m.after.clone(),
            })
            .collect(),
        applied_at: p.consistent_at_unix_ns,
        consistent: true,
        wrote_without: Vec::new(),
        reachable: true,
    };
    let other = SiteRecord {
        site: site.to_owned(),
        role: Role::Secondary,
        generation: theirs.generation,
        lineage: 0,
        points: theirs
            .marks
            .iter()
            .map(|m| HeldPoint {
                id: m.id,
                after: runs_from_proto(&m.blocks, theirs.block_bytes.max(1), p.block_bytes),
            })
            .collect(),
        applied_at: theirs.consistent_at_unix_ns,
        consistent: theirs.consistent,
        wrote_without: Vec::new(),
        reachable: true,
    };
    let old = SiteRecord {
        site: p.old_primary.clone(),
        role: Role::Primary,
        generation: p.generation.saturating_sub(1),
        lineage: 0,
        points: Vec::new(),
        applied_at: 0,
        consistent: true,
        wrote_without: Vec::new(),
        reachable: false,
    };
    vec![old, mine, other]
}

impl Replication {
    /// Starts the background loop of this agent's replication: common
    /// marks for volumes with several targets, and re-homings left to do
    /// after a forced promotion. Runs until the last handle is dropped.
    pub fn start_background(self: &Arc<Self>) {
        let me: Weak<Self> = Arc::downgrade(self);
        // Detached: it ends by itself once the replication is dropped.
        tokio::spawn(async move {
            let mut announced: HashMap<String, Announced> = HashMap::new();
            loop {
                tokio::time::sleep(TICK).await;
                let Some(this) = me.upgrade() else { return };
                // Re-homing first: an announcement to a dead peer may take
                // up to its timeout.
                this.finish_rehomes().await;
                this.announce_marks(&mut announced).await;
            }
        });
    }

    /// `DATA/replicas/rehome`.
    fn rehome_dir(&self) -> PathBuf {
        self.dir
            .parent()
            .map_or_else(|| self.dir.join("rehome"), |p| p.join("rehome"))
    }

    /// Announces each multi-target volume's newest common mark to all its
    /// targets when it moved, and the list of targets when it changed (a
    /// target mid-sync holds the mark back, but the others must still
    /// learn of it, to re-home it after a forced promotion: mark 0 then).
    /// `announced`: the last announcement per volume.
    ///
    /// An idle volume's consistent points do not move, and a target holds
    /// a mark only once its consistent point moved past the one it had
    /// when it first heard of marks (`secondary/marks.rs`): so while some
    /// target does not hold the newest mark and every target is caught up
    /// and idle, each async target is asked for an empty commit
    /// ([`nudge`]), at most once per tick and backing off to once a
    /// minute while some target never holds one (`idle_marks`), and never
    /// again once every target holds a mark and nothing was written since. A forced
    /// promotion of a volume never written since its targets were added
    /// then re-homes by that mark: nothing compared, nothing resent.
    async fn announce_marks(&self, announced: &mut HashMap<String, Announced>) {
        for lead in self.lead_links() {
            let cfg = lead.config();
            let mut links = vec![lead.clone()];
            links.extend(self.extra_links(&cfg.volume));
            if links.len() < 2 || links.iter().any(|l| l.refuses_writes()) {
                continue;
            }
            let streaming = links.iter().all(|l| l.phase() == Phase::Streaming);
            let newest = links
                .iter()
                .map(|l| l.config().last_consistent_at_unix_ns)
                .min()
                .unwrap_or(0);
            let sites: Vec<String> = links.iter().map(|l| l.config().peer).collect();
            let last = announced.get(&cfg.volume).cloned().unwrap_or_default();
            let (last_mark, last_sites) = (last.mark, last.sites.clone());
            let mark = if streaming && newest > last_mark {
                newest
            } else {
                0
            };
            if mark == 0 && sites == last_sites {
                let idle = streaming && links.iter().all(|l| l.lag() == (0.0, 0));
                let entry = announced.entry(cfg.volume.clone()).or_default();
                if entry.backoff.tick(idle, entry.held_by_all) {
                    for l in &links {
                        nudge(l);
                    }
                }
                continue;
            }
            let targets: Vec<pb::RehomeTarget> =
                links.iter().map(|l| rehome_target(&l.config())).collect();
            let mut all_ok = true;
            let mut held_by_all = mark > 0;
            for l in &links {
                let peer = l.config().peer;
                let req = pb::AnnounceMarkRequest {
                    volume: cfg.volume.clone(),
                    primary_backend_id: self.ctx.identity.backend_id.clone(),
                    generation: cfg.generation,
                    mark_unix_ns: mark,
                    targets: targets.clone(),
                };
                let call = async {
                    let (mut client, _, version) = self.ctx.registry.call_client(&peer).await?;
                    if version < ProtocolVersion::MULTI_TARGET {
                        return Ok(false);
                    }
                    client
                        .announce_mark(req)
                        .await
                        .map(|r| r.into_inner().held)
                        .map_err(super::roles::refused(&peer, "AnnounceMark"))
                };
                match tokio::time::timeout(ANNOUNCE_TIMEOUT, call).await {
                    Ok(Ok(held)) => {
                        held_by_all &= held;
                        tracing::debug!(volume = %cfg.volume, peer, mark, held, "common mark announced");
                    }
                    Ok(Err(e)) => {
                        all_ok = false;
                        tracing::debug!(volume = %cfg.volume, peer, error = %e, "announcing a common mark failed");
                    }
                    Err(_) => {
                        all_ok = false;
                        tracing::debug!(volume = %cfg.volume, peer, "announcing a common mark timed out");
                    }
                }
            }
            // Announced without a newer mark: the targets changed, and a
            // new one holds nothing yet.
            let held_by_all = mark > 0 && held_by_all && all_ok;
            let targets_changed = sites != last_sites;
            // A target that missed the list hears it again next tick.
            let sites = if all_ok { sites } else { Vec::new() };
            announced.insert(
                cfg.volume.clone(),
                Announced {
                    mark: mark.max(last_mark),
                    sites,
                    held_by_all,
                    backoff: last.backoff.announced(held_by_all || targets_changed),
                },
            );
        }
    }

    /// Forced promotion of `rec`'s volume to `generation`, before the
    /// volume serves a write: creates a clean change set for each other
    /// target the old primary announced (every write from now on lands in
    /// it) and persists what is left to do. Nothing when the old primary
    /// announced no other target.
    ///
    /// # Errors
    /// Creating a change set or persisting the record.
    pub(super) fn prepare_forced_rehome(
        &self,
        rec: &SecondaryRecord,
        generation: u64,
    ) -> Result<()> {
        let Some(sv) = self.secondaries.get(&rec.volume) else {
            return Ok(());
        };
        let ring = sv.marks.snapshot();
        let me = &self.ctx.identity.site;
        let siblings: Vec<Sibling> = ring
            .siblings
            .iter()
            .filter(|s| &s.site != me && s.site != rec.primary_site)
            .cloned()
            .collect();
        if siblings.is_empty() {
            return Ok(());
        }
        let tracker = sv.volume.tracker().cloned().ok_or_else(|| {
            ReplError::FailedPrecondition("replication needs change tracking".into())
        })?;
        let dir = self.store_tracking_dir(&rec.volume);
        for s in &siblings {
            tracker
                .add_consumer(&dir, &consumer_name(&s.site), false)
                .map_err(|e| super::internal("create a re-homed target's change set", e))?;
        }
        let pending = Pending {
            volume: rec.volume.clone(),
            generation,
            old_primary: rec.primary_site.clone(),
            block_bytes: ring.block_bytes,
            own: ring
                .held()
                .into_iter()
                .map(|h| OwnMark {
                    id: h.id,
                    after: h.after,
                })
                .collect(),
            consistent_at_unix_ns: rec.consistent_at_unix_ns,
            siblings,
        };
        std::fs::create_dir_all(self.rehome_dir())
            .map_err(|e| super::internal("create the re-homing dir", e))?;
        ember_volume::fsutil::write_json_atomic(
            &self.rehome_dir().join(format!("{}.json", rec.volume)),
            &pending,
        )
        .map_err(|e| super::internal("persist the re-homing record", e))?;
        tracing::info!(volume = %rec.volume, targets = pending.siblings.len(), marks = pending.own.len(), "forced promotion: re-homing the old primary's other targets");
        Ok(())
    }

    /// One pass over the re-homings left to do.
    async fn finish_rehomes(&self) {
        let Ok(entries) = std::fs::read_dir(self.rehome_dir()) else {
            return;
        };
        let paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("json"))
            .collect();
        for path in paths {
            let Ok(mut p) = ember_volume::fsutil::read_json::<Pending>(&path) else {
                tracing::warn!(path = %path.display(), "unreadable re-homing record; removing it");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            // The record is written before the primary role exists, and
            // the secondary is released before the primary link starts.
            let age = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            match record_fate(
                self.link(&p.volume).map(|l| l.config().generation),
                self.secondaries.get(&p.volume).is_some(),
                p.generation,
                age,
            ) {
                RecordFate::Proceed => {}
                RecordFate::Wait => continue,
                RecordFate::Drop => {
                    tracing::info!(volume = %p.volume, generation = p.generation, "no longer the primary of that promotion; re-homing record dropped");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            }
            let mut left = Vec::new();
            for s in std::mem::take(&mut p.siblings) {
                match self.rehome_forced_one(&p, &s).await {
                    Ok(true) => {}
                    Ok(false) => left.push(s),
                    Err(e) => {
                        tracing::warn!(volume = %p.volume, peer = %s.site, error = %e, "re-homing a target failed; retrying");
                        left.push(s);
                    }
                }
            }
            p.siblings = left;
            let written = if p.siblings.is_empty() {
                std::fs::remove_file(&path).map_err(|e| e.to_string())
            } else {
                ember_volume::fsutil::write_json_atomic(&path, &p).map_err(|e| e.to_string())
            };
            if let Err(e) = written {
                tracing::warn!(volume = %p.volume, error = %e, "cannot update the re-homing record");
            }
        }
    }

    /// Re-homes `s` to this site. `Ok(true)`: done (or nothing more to do
    /// here); `Ok(false)`: not reachable now, retry.
    async fn rehome_forced_one(&self, p: &Pending, s: &Sibling) -> Result<bool> {
        let volume = &p.volume;
        if self.target_config(volume, &s.site).is_some() {
            return Ok(true);
        }
        if self.ctx.registry.peer(&s.site).await.is_none() {
            tracing::warn!(volume, peer = %s.site, "not paired with the old primary's target; pair and enable it here to re-home it");
            return Ok(true);
        }
        let Ok(Ok((mut client, _, version))) =
            tokio::time::timeout(CALL_TIMEOUT, self.ctx.registry.call_client(&s.site)).await
        else {
            tracing::warn!(volume, peer = %s.site, "the old primary's target is unreachable; re-homing it when it answers");
            return Ok(false);
        };
        if version < ProtocolVersion::MULTI_TARGET {
            tracing::warn!(volume, peer = %s.site, version, "peer paired at an older protocol; re-pair it, then enable it here");
            return Ok(true);
        }
        let me = self.ctx.identity.site.clone();
        let asked = client.get_rehome_record(pb::GetRehomeRecordRequest {
            volume: volume.clone(),
            new_primary_site: me.clone(),
            new_primary_backend_id: self.ctx.identity.backend_id.clone(),
            generation: p.generation,
        });
        let theirs = match tokio::time::timeout(CALL_TIMEOUT, asked).await {
            Err(_) => {
                tracing::warn!(volume, peer = %s.site, "the target did not hand over its re-homing record in time; retrying");
                return Ok(false);
            }
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                if let Some(WireRefusal::StaleGeneration { generation }) = fencing::refusal(&status)
                {
                    tracing::warn!(volume, peer = %s.site, generation, "the target follows a newer primary; not re-homed here");
                    return Ok(true);
                }
                if status.code() == tonic::Code::NotFound {
                    tracing::warn!(volume, peer = %s.site, "the target holds no copy; enable it here for a full sync");
                    return Ok(true);
                }
                // Retried every tick: a warning, so a re-homing that never
                // ends says why in the log.
                tracing::warn!(volume, peer = %s.site, error = %status, "re-homing record not available yet; retrying");
                return Ok(false);
            }
        };
        let request = Request {
            site: me.clone(),
            kind: Kind::Reconcile,
            accept_older: false,
        };
        let plan = match rehome::plan(&request, &records(&me, p, &theirs, &s.site)) {
            Ok(plan) => plan,
            Err(refusal) => {
                tracing::error!(volume, peer = %s.site, ?refusal, "forced re-homing refused by the plan; enable the target by hand");
                return Ok(true);
            }
        };
        for action in plan.actions {
            match action {
                Action::Rehome {
                    target,
                    resend,
                    since,
                    ..
                } if target == s.site => {
                    let differ = self
                        .compare(volume, &s.site, &resend, p.block_bytes)
                        .await?;
                    let bytes: u64 = differ.iter().map(|e| e.length).sum();
                    self.mark_ranges(volume, &s.site, &differ)?;
                    self.start_rehomed(p, s, false)?;
                    self.decide(&Entry {
                        action: "rehome",
                        volume,
                        peer: &s.site,
                        generation: p.generation,
                        detail: format!(
                            "forced promotion: {} follows this site now; since common mark {since}: {} blocks may differ, {bytes} bytes differ by blake3 and are resent",
                            s.site,
                            resend.count()
                        ),
                    });
                }
                Action::FullCopy { target, reason, .. } if target == s.site => {
                    tracing::warn!(volume, peer = %s.site, ?reason, "forced re-homing by a full blake3 comparison");
                    // The change set exists since the promotion: the
                    // initial sync compares what it holds, so all of it.
                    let size = self
                        .store
                        .export(volume)
                        .map(|v| ember_nbd::Export::size(v.as_ref()))
                        .unwrap_or(0);
                    self.mark_ranges(
                        volume,
                        &s.site,
                        &[Extent {
                            offset: 0,
                            length: size,
                        }],
                    )?;
                    self.start_rehomed(p, s, true)?;
                    self.decide(&Entry {
                        action: "rehome",
                        volume,
                        peer: &s.site,
                        generation: p.generation,
                        detail: format!(
                            "forced promotion: {} follows this site now; full blake3 comparison ({reason:?})",
                            s.site
                        ),
                    });
                }
                _ => {}
            }
        }
        Ok(true)
    }

    /// The ranges of `resend` (blocks of `block_bytes`) whose blake3
    /// differs between this site and `peer`, in 64 KiB chunks.
    async fn compare(
        &self,
        volume: &str,
        peer: &str,
        resend: &Blocks,
        block_bytes: u64,
    ) -> Result<Vec<Extent>> {
        let v = self
            .store
            .export(volume)
            .ok_or_else(|| ReplError::NotFound(format!("volume {volume} not found")))?;
        let size = ember_nbd::Export::size(v.as_ref());
        let (mut client, _, _) = self.ctx.registry.call_client(peer).await?;
        let chunk = MIN_BLOCK_BYTES;
        let mut out: Vec<Extent> = Vec::new();
        for (offset, len) in resend.byte_ranges(block_bytes, size) {
            let start = offset - offset % chunk;
            let end = (offset + len).min(size);
            let mut pos = start;
            while pos < end {
                let count = ((end - pos).div_ceil(chunk)).min(u64::from(hashes::MAX_CHUNKS)) as u32;
                let mine = hashes::chunk_hashes(&v, pos, chunk, count)
                    .await
                    .map_err(|e| super::internal("hash the new primary's blocks", e))?;
                let theirs = client
                    .read_hashes(pb::ReadHashesRequest {
                        volume: volume.to_owned(),
                        offset: pos,
                        chunk_bytes: chunk,
                        chunks: count,
                    })
                    .await
                    .map_err(super::roles::refused(peer, "ReadHashes"))?
                    .into_inner()
                    .blake3;
                for (i, h) in mine.iter().enumerate() {
                    let at = pos + i as u64 * chunk;
                    let same = theirs.get(i).is_some_and(|t| t.as_slice() == h.as_slice());
                    if !same {
                        let length = chunk.min(size - at);
                        match out.last_mut() {
                            Some(last) if last.offset + last.length == at => last.length += length,
                            _ => out.push(Extent { offset: at, length }),
                        }
                    }
                }
                pos += u64::from(count) * chunk;
            }
        }
        Ok(out)
    }

    /// Adds `ranges` to `peer`'s change set of `volume`.
    fn mark_ranges(&self, volume: &str, peer: &str, ranges: &[Extent]) -> Result<()> {
        if ranges.is_empty() {
            return Ok(());
        }
        let v = self
            .store
            .export(volume)
            .ok_or_else(|| ReplError::NotFound(format!("volume {volume} not found")))?;
        let t = v.tracker().ok_or_else(|| {
            ReplError::FailedPrecondition("replication needs change tracking".into())
        })?;
        t.add_consumer(
            &self.store_tracking_dir(volume),
            &consumer_name(peer),
            false,
        )
        .map_err(|e| super::internal("create the re-homed target's change set", e))?;
        t.consumer_mark(&consumer_name(peer), ranges)
            .map_err(|e| super::internal("mark the re-homing resend", e))
    }

    /// Starts `s` as a further target of this site: from its change set
    /// (`full` off) or by an initial sync comparing every block.
    fn start_rehomed(&self, p: &Pending, s: &Sibling, full: bool) -> Result<()> {
        let config = ReplicaConfig::new(
            &p.volume,
            &s.site,
            Mode::parse(&s.mode).unwrap_or(Mode::Async),
            s.rpo_seconds,
            RpoPolicy::parse(&s.rpo_policy).unwrap_or_default(),
            PeerLossPolicy::parse(&s.on_peer_loss).unwrap_or_default(),
        )
        .promoted(p.generation);
        // A member of a group promoted here keeps replicating to this
        // target in its group (the group's points resume once every
        // member's link to it runs: `primary::group`).
        let group = self.link(&p.volume).and_then(|l| l.config().group);
        let config = ReplicaConfig {
            synced: !full,
            group,
            ..config
        };
        let path = self.extra_config_path(&p.volume, &s.site);
        ember_volume::fsutil::write_json_atomic(&path, &config)
            .map_err(|e| super::internal("persist replica config", e))?;
        if let Err(e) = self.start_target(config, full, false) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_record_is_dropped_only_when_another_promotion_owns_the_volume_or_it_went_away() {
        use super::{RecordFate::*, record_fate};
        let s = std::time::Duration::from_secs;
        // (primary generation here, still a secondary, record generation, age, fate)
        let rows = [
            (Some(2), false, 2, s(0), Proceed),
            (Some(2), false, 2, s(600), Proceed),
            // A newer promotion (or an older link) owns the volume.
            (Some(3), false, 2, s(0), Drop),
            (Some(1), false, 2, s(0), Drop),
            // Written, secondary not yet released: the promotion's next step.
            (None, true, 2, s(0), Wait),
            (None, true, 2, s(600), Wait),
            // Secondary released, primary link not yet started (the CI
            // flake: the record was dropped in this gap).
            (None, false, 2, s(0), Wait),
            (None, false, 2, s(59), Wait),
            // No role for a minute: the volume went away.
            (None, false, 2, s(60), Drop),
        ];
        for (primary, secondary, generation, age, want) in rows {
            assert_eq!(
                record_fate(primary, secondary, generation, age),
                want,
                "{primary:?} {secondary} {generation} {age:?}"
            );
        }
    }

    use super::*;

    fn blocks(runs: &[(u64, u64)]) -> Blocks {
        let mut b = Blocks::default();
        for &(s, e) in runs {
            b.insert(s, e);
        }
        b
    }

    fn pending(own: Vec<OwnMark>) -> Pending {
        Pending {
            volume: "v".into(),
            generation: 2,
            old_primary: "a".into(),
            block_bytes: 1,
            own,
            consistent_at_unix_ns: 500,
            siblings: Vec::new(),
        }
    }

    fn theirs(consistent: bool, marks: Vec<(i64, Vec<(u64, u64)>)>) -> pb::GetRehomeRecordResponse {
        pb::GetRehomeRecordResponse {
            primary_site: "a".into(),
            generation: 1,
            consistent,
            consistent_at_unix_ns: 400,
            block_bytes: 1,
            marks: marks
                .into_iter()
                .map(|(id, runs)| pb::HeldMark {
                    id,
                    blocks: runs
                        .into_iter()
                        .map(|(s, e)| pb::Range {
                            offset: s,
                            length: e - s,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn plan_for(p: &Pending, t: &pb::GetRehomeRecordResponse) -> Action {
        let request = Request {
            site: "b".into(),
            kind: Kind::Reconcile,
            accept_older: false,
        };
        let plan = rehome::plan(&request, &records("b", p, t, "c")).expect("plans");
        plan.actions
            .into_iter()
            .find(|a| !matches!(a, Action::Deferred { .. }))
            .expect("an action for c")
    }

    #[test]
    fn forced_rehoming_resends_the_union_since_the_newest_common_mark() {
        let p = pending(vec![
            OwnMark {
                id: 100,
                after: blocks(&[(1, 2)]),
            },
            OwnMark {
                id: 200,
                after: blocks(&[(5, 7)]),
            },
        ]);
        // C lags: it holds 100 and 200, applied little since.
        let t = theirs(true, vec![(100, vec![(9, 10)]), (200, vec![(20, 21)])]);
        match plan_for(&p, &t) {
            Action::Rehome { resend, since, .. } => {
                assert_eq!(since, 200);
                assert_eq!(resend, blocks(&[(5, 7), (20, 21)]));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn forced_rehoming_compares_everything_without_a_common_mark_or_when_torn() {
        let p = pending(vec![OwnMark {
            id: 300,
            after: Blocks::default(),
        }]);
        let t = theirs(true, vec![(100, vec![])]);
        assert!(matches!(
            plan_for(&p, &t),
            Action::FullCopy {
                reason: rehome::FullReason::NoCommonPoint,
                ..
            }
        ));
        let t = theirs(false, vec![(300, vec![])]);
        assert!(matches!(
            plan_for(&p, &t),
            Action::FullCopy {
                reason: rehome::FullReason::Inconsistent,
                ..
            }
        ));
    }
}
