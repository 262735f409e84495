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
use staging::StagingLog;

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
}

impl SecondaryRecord {
    pub(crate) fn to_proto(&self) -> pb::SecondaryState {
        pb::SecondaryState {
            consistent: self.consistent,
            consistent_at_unix_ns: self.consistent_at_unix_ns,
            applied_seq: self.applied_seq,
            primary_site: self.primary_site.clone(),
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
}

impl SecondaryVolume {
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
    volumes: Mutex<HashMap<String, Arc<SecondaryVolume>>>,
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
        let this = Self {
            dir: dir.clone(),
            store,
            volumes: Mutex::new(HashMap::new()),
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
            apply::recover(&sv).await?;
        }
        Ok(this)
    }

    fn attach(
        &self,
        volume: Arc<Volume>,
        record: SecondaryRecord,
    ) -> Result<Arc<SecondaryVolume>, Status> {
        let name = record.volume.clone();
        let staging = StagingLog::open(&self.dir.join(format!("{name}.staging")))
            .map_err(|e| io_status("open staging log", e))?;
        volume.set_replication(Some(Arc::new(SecondaryRole)));
        let sv = Arc::new(SecondaryVolume {
            volume,
            record: Mutex::new(record),
            record_path: self.dir.join(format!("{name}.json")),
            staging: Arc::new(Mutex::new(staging)),
            session: AtomicU64::new(0),
            apply_lock: tokio::sync::Mutex::new(()),
            applied_bytes: AtomicU64::new(0),
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
            }
        })
    }

    /// `OpenReplica`: creates or adopts the secondary.
    pub(crate) async fn open_replica(
        &self,
        req: pb::OpenReplicaRequest,
    ) -> Result<pb::OpenReplicaResponse, Status> {
        if let Some(sv) = self.get(&req.volume) {
            let rec = sv.record();
            if rec.primary_backend_id != req.primary_backend_id {
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
            sv.update(|r| r.detached = false)?;
            return Ok(pb::OpenReplicaResponse {
                created: false,
                state: Some(sv.record().to_proto()),
            });
        }
        if self.store.get(&req.volume).is_some() {
            return Err(Status::failed_precondition(format!(
                "volume {} exists on this site and is not a secondary; delete it or replicate under another name",
                req.volume
            )));
        }
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
        };
        ember_volume::fsutil::write_json_atomic(
            &self.dir.join(format!("{}.json", req.volume)),
            &record,
        )
        .map_err(|e| io_status("persist secondary state", e))?;
        tracing::info!(volume = %req.volume, primary = %record.primary_site, "secondary created");
        let sv = self.attach(volume, record)?;
        Ok(pb::OpenReplicaResponse {
            created: true,
            state: Some(sv.record().to_proto()),
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
        self.store
            .delete(&req.volume)
            .await
            .map_err(|e| Status::failed_precondition(format!("deleting the secondary: {e}")))?;
        tracing::info!(volume = %req.volume, "replication disabled; secondary deleted");
        Ok(pb::CloseReplicaResponse { existed: true })
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
        }
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
}
