//! The secondary side of replication: volumes this agent holds for a
//! primary at another site, kept read-only for clients and changed only by
//! the replication stream.
//!
//! Consistency: a secondary is *consistent* when its image equals the
//! primary's at some past instant (`consistent_at`). Ordered frames (sync
//! mode) and committed batches (async mode, catch-up) keep it so; unordered
//! frames (initial sync) clear the flag until the next commit. The flag is
//! persisted *before* the first unordered frame is applied, so a restart
//! never reports a torn image as consistent.

mod apply;
mod bulk_run;
mod clone_apply;
pub(crate) mod group;
pub(crate) mod marks;
pub(crate) mod points;
mod rehome_record;
mod staging;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ember_nbd::Export;
use ember_proto::repl::v1 as pb;
use ember_volume::{Change, ReplicationHook, Source, Volume, VolumeStore};
use serde::{Deserialize, Serialize};
use tonic::Status;

pub(crate) use apply::run_stream;
use group::GroupBarriers;
use staging::StagingLog;

use crate::fencing;

/// What the secondary remembers about one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SecondaryRecord {
    pub(crate) volume: String,
    pub(crate) primary_site: String,
    pub(crate) primary_backend_id: String,
    pub(crate) consistent: bool,
    pub(crate) consistent_at_unix_ns: i64,
    pub(crate) applied_seq: u64,
    /// Replication was disabled but the copy kept (read-only until promoted).
    #[serde(default)]
    pub(crate) detached: bool,
    /// Fencing generation of the primary this copy follows.
    #[serde(default = "first_generation")]
    pub(crate) generation: u64,
    /// An admin discarded this site's writes after split-brain: the next
    /// primary is accepted whatever its generation.
    #[serde(default)]
    pub(crate) yielded: bool,
    /// Ranges this site wrote as a primary that the new primary may lack
    /// (`(offset, length)`): sent back on every `OpenReplica` until the
    /// copy is consistent again, so a crash of either side loses none.
    #[serde(default)]
    pub(crate) divergent: Vec<(u64, u64)>,
    /// The primary's replication mode (a forced promotion keeps it).
    #[serde(default)]
    pub(crate) mode: String,
    /// The primary's RPO target and policy (likewise).
    #[serde(default)]
    pub(crate) rpo_seconds: u64,
    #[serde(default)]
    pub(crate) rpo_policy: String,
    /// The consistency group the primary put the volume in (empty: none).
    #[serde(default)]
    pub(crate) group: String,
}

fn first_generation() -> u64 {
    1
}

impl SecondaryRecord {
    pub(crate) fn to_proto(&self) -> pb::SecondaryState {
        pb::SecondaryState {
            consistent: self.consistent,
            consistent_at_unix_ns: self.consistent_at_unix_ns,
            applied_seq: self.applied_seq,
            primary_site: self.primary_site.clone(),
            generation: self.generation,
        }
    }

    /// A record for a volume that stops being primary here and follows
    /// `primary_site` from now on.
    pub(crate) fn demoted(
        volume: &str,
        primary_site: &str,
        primary_backend_id: &str,
        generation: u64,
        consistent_at_unix_ns: Option<i64>,
        divergent: Vec<(u64, u64)>,
        yielded: bool,
    ) -> Self {
        Self {
            volume: volume.to_owned(),
            primary_site: primary_site.to_owned(),
            primary_backend_id: primary_backend_id.to_owned(),
            consistent: consistent_at_unix_ns.is_some(),
            consistent_at_unix_ns: consistent_at_unix_ns.unwrap_or(0),
            applied_seq: 0,
            detached: false,
            generation,
            yielded,
            divergent,
            mode: String::new(),
            rpo_seconds: 0,
            rpo_policy: String::new(),
            group: String::new(),
        }
    }
}

/// The hook a secondary volume carries: clients may read, never write.
#[derive(Debug)]
struct SecondaryRole;

impl ReplicationHook for SecondaryRole {
    fn refuses_writes(&self) -> bool {
        true
    }
    fn wants_changes(&self) -> bool {
        false
    }
    fn completed(&self, _: Change, _: bool) -> Option<ember_volume::AckWait> {
        None
    }
    fn flushed(&self) -> Option<ember_volume::AckWait> {
        None
    }
}

/// One secondary volume.
#[derive(Debug)]
pub(crate) struct SecondaryVolume {
    pub(crate) volume: Arc<Volume>,
    record: Mutex<SecondaryRecord>,
    record_path: PathBuf,
    pub(crate) staging: Arc<Mutex<StagingLog>>,
    /// Bumped by every new stream; an older stream stops at its next frame.
    pub(crate) session: AtomicU64,
    /// Held while a frame is applied: one stream at a time touches the
    /// volume and the staging log.
    pub(crate) apply_lock: tokio::sync::Mutex<()>,
    /// Bytes applied (direct and committed), for status.
    pub(crate) applied_bytes: AtomicU64,
    /// Bytes applied by cloning the staging log's blocks (`clone_apply.rs`).
    pub(crate) cloned_bytes: AtomicU64,
    /// Every group's barrier (shared by the set).
    pub(crate) groups: Arc<GroupBarriers>,
    /// Its recovery points (`points.rs`).
    pub(crate) points: Arc<points::VolumePoints>,
    /// Its ring of applied blocks since the common marks (`marks.rs`).
    pub(crate) marks: Arc<marks::Marks>,
}

impl SecondaryVolume {
    /// Applies the batches acknowledged while a point's clone ran (waiting
    /// for that clone), so a reader comparing with the primary — `verify`'s
    /// hashes — sees every batch the primary counts as delivered.
    pub(crate) async fn settle_deferred(&self) -> Result<(), Status> {
        let _frame = self.apply_lock.lock().await;
        apply::settle(self).await
    }

    /// A stream of a group member started or ended: a group point it had
    /// not sealed can no longer complete.
    pub(crate) fn leave_group(&self) {
        let record = self.record();
        if !record.group.is_empty() {
            self.groups.get(&record.group).member_left(&record.volume);
        }
    }

    /// Empties the staging log (a batch applied or dropped).
    pub(crate) fn reset_staging(&self) -> Result<(), Status> {
        self.staging
            .lock()
            .expect("staging lock poisoned")
            .reset()
            .map_err(|e| io_status("emptying the staging log", e))
    }

    /// Ends the volume's stream and waits for the frame in hand (a group
    /// member's wait at its barrier included).
    pub(crate) async fn quiesce(&self) {
        self.session.fetch_add(1, Ordering::SeqCst);
        let _guard = self.apply_lock.lock().await;
    }

    pub(crate) fn record(&self) -> SecondaryRecord {
        self.record.lock().expect("record lock poisoned").clone()
    }

    /// Updates the record and persists it (blocking, small).
    pub(crate) fn update(&self, f: impl FnOnce(&mut SecondaryRecord)) -> Result<(), Status> {
        let mut rec = self.record.lock().expect("record lock poisoned");
        let mut next = rec.clone();
        f(&mut next);
        if next == *rec {
            return Ok(());
        }
        ember_volume::fsutil::write_json_atomic(&self.record_path, &next).map_err(|e| {
            tracing::error!(volume = %next.volume, error = %e, "cannot persist secondary state");
            Status::internal(format!("persisting secondary state: {e}"))
        })?;
        *rec = next;
        Ok(())
    }
}

/// Every secondary volume of this agent, under `DATA/replicas/secondary`.
#[derive(Debug)]
pub struct SecondarySet {
    dir: PathBuf,
    store: Arc<VolumeStore>,
    groups: Arc<GroupBarriers>,
    volumes: Mutex<HashMap<String, Arc<SecondaryVolume>>>,
    /// Recovery points of every secondary here (`points.rs`).
    points: Arc<points::PointsCtx>,
    /// The data dir can share extents: staging logs stage large aligned
    /// writes block-aligned, to clone them into the volume.
    reflink: bool,
    /// One `OpenReplica` at a time: two racing for a new volume (a
    /// session restarted while its first open was in flight) each found
    /// no secondary and attached one, and the stream left on the replaced
    /// object kept writing the image (its unordered catch-up marked the
    /// record inconsistent with nothing left to commit it).
    opening: tokio::sync::Mutex<()>,
}

fn io_status(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

impl SecondarySet {
    /// Loads the secondary records, marks their volumes read-only and
    /// replays any committed batch a crash left in a staging log.
    ///
    /// # Errors
    /// Unreadable records or staging logs (the agent refuses to start
    /// rather than serve a secondary in an unknown state).
    pub async fn open(data_dir: &Path, store: Arc<VolumeStore>) -> Result<Self, Status> {
        let dir = data_dir.join("replicas").join("secondary");
        std::fs::create_dir_all(&dir).map_err(|e| io_status("create replicas dir", e))?;
        let groups = GroupBarriers::open(&dir.join("groups"))
            .map_err(|e| io_status("create the groups dir", e))?;
        let reflink = store.snapshot_method() == ember_volume::SnapshotMethod::Reflink;
        let cap = points::default_space_cap(store.capacity().total_bytes);
        let this = Self {
            dir: dir.clone(),
            store,
            groups: Arc::new(groups),
            volumes: Mutex::new(HashMap::new()),
            points: Arc::new(points::PointsCtx::new(points::root(&dir), reflink, cap)),
            reflink,
            opening: tokio::sync::Mutex::new(()),
        };
        let entries = std::fs::read_dir(&dir).map_err(|e| io_status("read replicas dir", e))?;
        for entry in entries {
            let path = entry.map_err(|e| io_status("read replicas dir", e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let record: SecondaryRecord = ember_volume::fsutil::read_json(&path)
                .map_err(|e| io_status("read secondary state", e))?;
            let Some(volume) = this.store.export(&record.volume) else {
                tracing::warn!(volume = %record.volume, "secondary state for a missing volume; dropping it");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let sv = this.attach(volume, record)?;
            points::finish_pending(&sv).await?;
            apply::recover(&sv).await?;
        }
        this.clean_orphan_points();
        Ok(this)
    }

    fn attach(
        &self,
        volume: Arc<Volume>,
        record: SecondaryRecord,
    ) -> Result<Arc<SecondaryVolume>, Status> {
        let name = record.volume.clone();
        let staging = StagingLog::open(&self.dir.join(format!("{name}.staging")), self.reflink)
            .map_err(|e| io_status("open staging log", e))?;
        let points = points::VolumePoints::open(
            &self.points,
            &name,
            self.store.volume_dir(&name).join("data.img"),
            volume.size(),
        )
        .map_err(|e| io_status("open the recovery points", e))?;
        let marks = marks::Marks::open(marks::path(&self.dir, &name), volume.size())
            .map_err(|e| io_status("open the common marks", e))?;
        volume.set_replication(Some(Arc::new(SecondaryRole)));
        let sv = Arc::new(SecondaryVolume {
            volume,
            record: Mutex::new(record),
            record_path: self.dir.join(format!("{name}.json")),
            staging: Arc::new(Mutex::new(staging)),
            session: AtomicU64::new(0),
            apply_lock: tokio::sync::Mutex::new(()),
            applied_bytes: AtomicU64::new(0),
            cloned_bytes: AtomicU64::new(0),
            groups: self.groups.clone(),
            points,
            marks: Arc::new(marks),
        });
        self.volumes
            .lock()
            .expect("secondaries lock poisoned")
            .insert(name, sv.clone());
        Ok(sv)
    }

    /// The secondary named `volume`, if this agent holds one.
    pub(crate) fn get(&self, volume: &str) -> Option<Arc<SecondaryVolume>> {
        self.volumes
            .lock()
            .expect("secondaries lock poisoned")
            .get(volume)
            .cloned()
    }

    /// Status of a secondary for the control API: its record and bytes applied.
    pub fn status(&self, volume: &str) -> Option<SecondaryStatus> {
        self.get(volume).map(|sv| {
            let r = sv.record();
            SecondaryStatus {
                primary_site: r.primary_site,
                consistent: r.consistent,
                consistent_at_unix_ns: r.consistent_at_unix_ns,
                applied_seq: r.applied_seq,
                detached: r.detached,
                applied_bytes: sv.applied_bytes.load(Ordering::Relaxed),
                generation: r.generation,
                group: r.group,
            }
        })
    }

    /// `OpenReplica`: creates or adopts the secondary.
    pub(crate) async fn open_replica(
        &self,
        req: pb::OpenReplicaRequest,
    ) -> Result<pb::OpenReplicaResponse, Status> {
        let _opening = self.opening.lock().await;
        let generation = req.generation.max(1);
        if let Some(sv) = self.get(&req.volume) {
            let rec = sv.record();
            if !rec.yielded && generation < rec.generation {
                return Err(fencing::stale_generation(
                    &req.volume,
                    generation,
                    rec.generation,
                ));
            }
            // A copy that yielded after split-brain follows whichever
            // primary comes; any other follows only its own, or a primary
            // at a strictly newer generation: the volume was promoted there
            // and this copy is re-homed to it (issue 14). That primary
            // decides what to resend (`plan::rehome`); the old one is
            // fenced by the newer generation recorded below.
            if !rec.yielded
                && rec.primary_backend_id != req.primary_backend_id
                && generation <= rec.generation
            {
                return Err(Status::failed_precondition(format!(
                    "volume {} is a secondary of {} (backend {}), not of {}",
                    req.volume, rec.primary_site, rec.primary_backend_id, req.primary_site
                )));
            }
            if sv.volume.size() != req.size_bytes {
                return Err(Status::failed_precondition(format!(
                    "secondary {} has {} bytes, the primary {}",
                    req.volume,
                    sv.volume.size(),
                    req.size_bytes
                )));
            }
            sv.update(|r| {
                r.detached = false;
                r.yielded = false;
                r.primary_site.clone_from(&req.primary_site);
                r.primary_backend_id.clone_from(&req.primary_backend_id);
                r.mode.clone_from(&req.mode);
                r.rpo_seconds = req.rpo_seconds;
                r.rpo_policy.clone_from(&req.rpo_policy);
                r.group.clone_from(&req.group);
                // Not older than ours (checked above) unless we yielded.
                r.generation = generation;
            })?;
            sv.points
                .set_schedule(points::schedule_of(&req))
                .map_err(|e| io_status("persist the point schedule", e))?;
            return Ok(pb::OpenReplicaResponse {
                created: false,
                state: Some(sv.record().to_proto()),
                divergent: rec
                    .divergent
                    .iter()
                    .map(|&(offset, length)| pb::Range { offset, length })
                    .collect(),
                prior_generation: rec.generation,
            });
        }
        if self.store.get(&req.volume).is_some() {
            return Err(Status::failed_precondition(format!(
                "volume {} exists on this site and is not a secondary; delete it or replicate under another name",
                req.volume
            )));
        }
        let schedule = points::schedule_of(&req);
        let (_, volume, _) = self
            .store
            .create(&req.volume, req.size_bytes, None, Source::Empty)
            .await
            .map_err(|e| Status::failed_precondition(format!("creating the secondary: {e}")))?;
        let record = SecondaryRecord {
            volume: req.volume.clone(),
            primary_site: req.primary_site,
            primary_backend_id: req.primary_backend_id,
            consistent: false,
            consistent_at_unix_ns: 0,
            applied_seq: 0,
            detached: false,
            generation,
            yielded: false,
            divergent: Vec::new(),
            mode: req.mode.clone(),
            rpo_seconds: req.rpo_seconds,
            rpo_policy: req.rpo_policy.clone(),
            group: req.group.clone(),
        };
        ember_volume::fsutil::write_json_atomic(
            &self.dir.join(format!("{}.json", req.volume)),
            &record,
        )
        .map_err(|e| io_status("persist secondary state", e))?;
        tracing::info!(volume = %req.volume, primary = %record.primary_site, "secondary created");
        let sv = self.attach(volume, record)?;
        sv.points
            .set_schedule(schedule)
            .map_err(|e| io_status("persist the point schedule", e))?;
        Ok(pb::OpenReplicaResponse {
            created: true,
            state: Some(sv.record().to_proto()),
            divergent: Vec::new(),
            prior_generation: 0,
        })
    }

    /// `ResizeReplica`: grows the secondary for its own primary.
    pub(crate) async fn resize_replica(
        &self,
        req: pb::ResizeReplicaRequest,
    ) -> Result<pb::ResizeReplicaResponse, Status> {
        let sv = self
            .get(&req.volume)
            .ok_or_else(|| Status::not_found(format!("no secondary named {}", req.volume)))?;
        let rec = sv.record();
        if req.generation < rec.generation {
            return Err(fencing::stale_generation(
                &req.volume,
                req.generation,
                rec.generation,
            ));
        }
        if rec.primary_backend_id != req.primary_backend_id {
            return Err(Status::failed_precondition(format!(
                "volume {} is a secondary of {} (backend {}), not of backend {}",
                req.volume, rec.primary_site, rec.primary_backend_id, req.primary_backend_id
            )));
        }
        let meta = self
            .store
            .resize(&req.volume, req.size_bytes)
            .await
            .map_err(|e| Status::failed_precondition(format!("growing the secondary: {e}")))?;
        sv.points.resized(meta.size_bytes);
        tracing::info!(volume = %req.volume, size_bytes = meta.size_bytes, "secondary grown with its primary");
        Ok(pb::ResizeReplicaResponse {
            size_bytes: meta.size_bytes,
        })
    }

    /// `CloseReplica`: detaches (keeps a read-only copy) or deletes.
    pub(crate) async fn close_replica(
        &self,
        req: pb::CloseReplicaRequest,
    ) -> Result<pb::CloseReplicaResponse, Status> {
        let Some(sv) = self.get(&req.volume) else {
            return Ok(pb::CloseReplicaResponse { existed: false });
        };
        sv.session.fetch_add(1, Ordering::SeqCst);
        if !req.delete_volume {
            sv.update(|r| r.detached = true)?;
            tracing::info!(volume = %req.volume, "replication disabled; secondary kept read-only");
            return Ok(pb::CloseReplicaResponse { existed: true });
        }
        self.volumes
            .lock()
            .expect("secondaries lock poisoned")
            .remove(&req.volume);
        sv.volume.set_replication(None);
        let _ = std::fs::remove_file(&sv.record_path);
        let staging_path = sv
            .staging
            .lock()
            .expect("staging lock poisoned")
            .path()
            .to_owned();
        let _ = std::fs::remove_file(staging_path);
        sv.points.delete_all();
        sv.marks.delete();
        self.store
            .delete(&req.volume)
            .await
            .map_err(|e| Status::failed_precondition(format!("deleting the secondary: {e}")))?;
        tracing::info!(volume = %req.volume, "replication disabled; secondary deleted");
        Ok(pb::CloseReplicaResponse { existed: true })
    }

    /// Makes `volume` (a primary until now) a secondary of another site:
    /// persists the record, then refuses client writes.
    ///
    /// # Errors
    /// The record cannot be persisted (the volume stays as it was).
    pub(crate) fn adopt(
        &self,
        volume: Arc<Volume>,
        record: SecondaryRecord,
    ) -> Result<Arc<SecondaryVolume>, Status> {
        ember_volume::fsutil::write_json_atomic(
            &self.dir.join(format!("{}.json", record.volume)),
            &record,
        )
        .map_err(|e| io_status("persist secondary state", e))?;
        self.attach(volume, record)
    }

    /// Promotion: stops every stream of `volume`, discards a staged batch
    /// that was never committed (the image stays at its last consistent
    /// point) and forgets the secondary role. The volume keeps refusing
    /// client writes until the caller installs its primary role. With
    /// `keep_points` (a forced promotion) the recovery points become
    /// snapshots of the volume (`points/keep.rs`); otherwise they go.
    ///
    /// # Errors
    /// The staging log cannot be emptied.
    pub(crate) async fn release(
        &self,
        volume: &str,
        keep_points: bool,
    ) -> Result<SecondaryRecord, Status> {
        let sv = self
            .get(volume)
            .ok_or_else(|| Status::not_found(format!("no secondary named {volume}")))?;
        sv.session.fetch_add(1, Ordering::SeqCst);
        // Points to keep: one being recorded finishes first, so it is kept
        // too (`serial` before the `apply_lock`, as in `create_point`).
        let _serial = match keep_points {
            true => Some(sv.points.recording_done().await),
            false => None,
        };
        let _guard = sv.apply_lock.lock().await;
        // Batches acknowledged while a point's clone ran are part of the
        // image the primary counts on: applied before the role changes.
        apply::settle(&sv).await?;
        let staging_path = {
            let mut staging = sv.staging.lock().expect("staging lock poisoned");
            staging
                .reset()
                .map_err(|e| io_status("emptying the staging log", e))?;
            staging.path().to_owned()
        };
        self.volumes
            .lock()
            .expect("secondaries lock poisoned")
            .remove(volume);
        let _ = std::fs::remove_file(&sv.record_path);
        let _ = std::fs::remove_file(staging_path);
        sv.marks.delete();
        // Points belong to the secondary role: kept as snapshots or
        // deleted (a crash here leaves what is not kept yet to the next
        // start's orphan cleanup).
        if keep_points {
            points::keep_as_snapshots(&self.store, &sv.points).await;
        }
        self.delete_points(volume);
        Ok(sv.record())
    }

    /// The secondaries of group `name` here, by name, with the group's
    /// committed point.
    pub(crate) fn group_members(&self, name: &str) -> (Vec<SecondaryRecord>, i64) {
        let mut members: Vec<SecondaryRecord> = self
            .volumes
            .lock()
            .expect("secondaries lock poisoned")
            .values()
            .map(|sv| sv.record())
            .filter(|r| r.group == name)
            .collect();
        members.sort_by(|a, b| a.volume.cmp(&b.volume));
        if members.is_empty() {
            return (members, 0);
        }
        (members, self.groups.get(name).committed())
    }

    /// Names of the groups this site holds secondaries of.
    pub(crate) fn group_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .volumes
            .lock()
            .expect("secondaries lock poisoned")
            .values()
            .map(|sv| sv.record().group)
            .filter(|g| !g.is_empty())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Forgets group `name`'s barrier (its members were promoted).
    pub(crate) fn forget_group(&self, name: &str) {
        self.groups.forget(name);
    }

    /// The barrier of group `name`.
    pub(crate) fn group_barrier(&self, name: &str) -> Arc<group::Barrier> {
        self.groups.get(name)
    }

    /// Forgets the secondary role of `volume` (it was deleted by the admin).
    pub fn forget(&self, volume: &str) {
        if let Some(sv) = self
            .volumes
            .lock()
            .expect("secondaries lock poisoned")
            .remove(volume)
        {
            let _ = std::fs::remove_file(&sv.record_path);
            sv.marks.delete();
            self.delete_points(volume);
        }
    }

    /// The event bus recovery points publish on (the agent's, shared with
    /// [`crate::Replication`]).
    pub(crate) fn events(&self) -> &crate::events::EventBus {
        &self.points.events
    }
}

/// A secondary's state for the control API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecondaryStatus {
    /// The primary's site.
    pub primary_site: String,
    /// The image is a crash-consistent image of the primary.
    pub consistent: bool,
    /// The primary's time the image is consistent with (unix ns; 0 = never).
    pub consistent_at_unix_ns: i64,
    /// Last batch applied.
    pub applied_seq: u64,
    /// Replication was disabled and the copy kept.
    pub detached: bool,
    /// Bytes applied since the agent started.
    pub applied_bytes: u64,
    /// Fencing generation.
    pub generation: u64,
    /// Consistency group (empty: none).
    pub group: String,
}
