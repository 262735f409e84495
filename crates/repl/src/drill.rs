//! DR drills: a writable, unreplicated volume made from a consistent image
//! of a secondary held here, while replication of that secondary goes on.
//!
//! A drill is an ordinary volume of the store (its own name, its own NBD
//! export, origin `drill:VOLUME@POINT`) plus a drill record in
//! `DATA/replicas/drills/NAME.json`. Its data file is a reflink clone, so it
//! shares extents with its source but nothing else: writes to the drill
//! allocate new blocks in the drill's file only (they never reach the
//! secondary, hence never the primary), and the source may change or a
//! recovery point may expire while the drill lives. A drill pins nothing.
//!
//! Which image:
//! - the newest consistent image: held at a committed batch boundary
//!   (async) or a write boundary (sync, which is in write order) by the
//!   volume's clone gate, taken between two replication frames
//!   (`secondary::points::hold_image`), as a recovery point's clone is. The
//!   stream does not wait for the clone: its batches are staged, made
//!   durable and acknowledged meanwhile, and applied once the clone is
//!   done (deferred, `secondary/apply.rs`); direct sync-mode writes wait
//!   for the `FICLONE`. The clone is fsynced after the gate is given back.
//!   The stream is never ended or resynced.
//! - a recovery point (`secondary::points`): its image file is cloned, no
//!   lock needed (a point's file never changes).
//!
//! Only reflink data dirs run drills. A sparse copy of the newest image
//! would have to hold the apply lock for the whole copy (the apply path
//! writes the device directly, so no change tracking could catch up a copy
//! taken without it): seconds per GiB of stalled replication, exactly what a
//! drill must not do. So a data dir without reflink is refused with the
//! fix named, as recovery points are.
//!
//! Crash safety (every step is ordered so a `kill -9` anywhere leaves
//! either a whole drill or nothing):
//! 1. the record is written in state `creating` (intent);
//! 2. the image is cloned to `drills/.creating-NAME.img` (fsynced);
//! 3. the store publishes it as volume NAME (`.creating-NAME` dir renamed
//!    into place, the store's usual atomic publication);
//! 4. the record becomes `active`.
//!
//! At start ([`Drills::open`]): temporary images are removed; a `creating`
//! record whose volume was published (with our origin) is rolled forward to
//! `active` (the drill is whole); any other `creating` record is dropped,
//! and so is an `active` record whose volume is gone (a stop cut short
//! after deleting the volume). The store removes its own `.creating-*`.
//! Stopping deletes the volume first, then the record.
//!
//! What must not live here: role decisions (a primary asked to drill is
//! refused by the manager, which knows the links) and gRPC types.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_common::MAX_NAME_BYTES;
use ember_volume::{SnapshotMethod, StoreError, VolumeStore};
use serde::{Deserialize, Serialize};

use crate::secondary::points::{self, PointInfo, PointSelector, VolumePoints};
use crate::secondary::{SecondarySet, SecondaryVolume};

/// The point name recorded for a drill of the newest consistent image.
pub(crate) const NEWEST: &str = "newest";

/// What a DR drill can fail with. The agent maps each variant to one gRPC
/// code (`crates/agent/src/drills.rs`).
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// Malformed request: a bad name, a time in the future, point and time
    /// both given.
    #[error("{0}")]
    InvalidArgument(String),
    /// The drill name is taken (by a drill or any other volume).
    #[error("{0}")]
    AlreadyExists(String),
    /// No such secondary here.
    #[error("{0}")]
    NotFound(String),
    /// The volume is a primary on this site: drills run where the
    /// secondary is.
    #[error(
        "volume {volume} is the primary on this site; drills run on the secondary's site: \
         ask site {ask} (emberctl --api <{ask}'s API> replica drill start {volume})"
    )]
    PrimaryHere {
        /// The volume.
        volume: String,
        /// The site holding its secondary.
        ask: String,
    },
    /// The request cannot be honoured in the current state (an
    /// inconsistent secondary, a data dir without reflink…).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Resolving the recovery point failed (NOT_FOUND naming the oldest
    /// point, INVALID_ARGUMENT…): the points layer's status, kept as is.
    #[error("{}", .0.message())]
    Point(tonic::Status),
    /// The volume store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Local I/O on the drill records or the clone.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DrillError {
    let what = what.into();
    move |source| DrillError::Io { what, source }
}

/// Where a drill's image comes from (decided by [`source_for`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DrillSource {
    /// The secondary's newest consistent image.
    Newest,
    /// A retained recovery point.
    Point(PointSelector),
}

/// Decides which image a request names: a point by name, the newest point
/// at or before a time, or (neither) the newest consistent image.
/// `now_unix_ns` is this agent's clock; the primary's may differ a little,
/// but a time after *now* can name no image that exists yet.
///
/// # Errors
/// `InvalidArgument` for both a name and a time, a negative time, or a
/// time in the future.
pub(crate) fn source_for(
    point: &str,
    at_unix_ns: i64,
    now_unix_ns: i64,
) -> Result<DrillSource, DrillError> {
    match (point, at_unix_ns) {
        (p, t) if !p.is_empty() && t != 0 => Err(DrillError::InvalidArgument(
            "give a recovery point's name or a time, not both".into(),
        )),
        (_, t) if t < 0 => Err(DrillError::InvalidArgument(format!(
            "time {t} is before 1970"
        ))),
        (_, t) if t > now_unix_ns => Err(DrillError::InvalidArgument(format!(
            "time {} is in the future (now is {}); a drill starts from an image that exists",
            secs(t),
            secs(now_unix_ns)
        ))),
        ("", 0) | (NEWEST, 0) => Ok(DrillSource::Newest),
        ("", t) => Ok(DrillSource::Point(PointSelector::At(t))),
        (p, _) => Ok(DrillSource::Point(PointSelector::Name(p.to_owned()))),
    }
}

/// The default drill name: `VOLUME-drill-<unix seconds>`, the volume part
/// shortened so the whole stays a valid name.
pub(crate) fn default_name(volume: &str, now_unix_ns: i64) -> String {
    let suffix = format!("-drill-{}", now_unix_ns / 1_000_000_000);
    let keep = MAX_NAME_BYTES
        .saturating_sub(suffix.len())
        .min(volume.len());
    // Volume names are ASCII (validated), so any byte index is a boundary.
    format!("{}{suffix}", &volume[..keep])
}

/// The origin recorded in a drill volume's metadata.
pub(crate) fn origin(volume: &str, point: &str) -> String {
    format!("drill:{volume}@{point}")
}

/// A unix-ns time for messages (the CLI shows RFC 3339; this crate has no
/// calendar code and needs none for an error message).
fn secs(unix_ns: i64) -> String {
    format!("{:.3} s after the epoch", unix_ns as f64 / 1e9)
}

/// Where a drill record is in its life (persisted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum RecordState {
    /// Intent: the drill is being made; not listed.
    Creating,
    /// The drill's volume exists and is served.
    Active,
}

/// `DATA/replicas/drills/NAME.json`. An on-disk format: add fields with
/// `#[serde(default)]`, never rename one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DrillRecord {
    pub(crate) name: String,
    /// The secondary it was made from.
    pub(crate) volume: String,
    /// The recovery point's name, or [`NEWEST`].
    pub(crate) point: String,
    /// The primary-clock time the image represents (unix ns).
    pub(crate) at_unix_ns: i64,
    /// This agent's clock when the drill was started (unix ns).
    pub(crate) created_at_unix_ns: i64,
    pub(crate) state: RecordState,
    /// The group drill it belongs to (empty: none).
    #[serde(default)]
    pub(crate) group: String,
}

/// What to do with a record found at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// Whole and active: keep it.
    Keep,
    /// The volume was published before the crash: the drill is whole;
    /// mark the record active.
    RollForward,
    /// Half made, or its volume is gone (or is not ours): drop the record.
    Drop,
}

/// Decides [`Recovery`] from the record's state and the origin of the
/// volume of its name, if one exists.
pub(crate) fn recovery(state: RecordState, found_origin: Option<&str>, ours: &str) -> Recovery {
    match (state, found_origin) {
        (RecordState::Active, Some(o)) if o == ours => Recovery::Keep,
        (RecordState::Creating, Some(o)) if o == ours => Recovery::RollForward,
        (RecordState::Active | RecordState::Creating, _) => Recovery::Drop,
    }
}

/// Whether a group drill is whole, from its records' states and
/// [`Recovery`] decisions: it is unless one was still `creating` and a
/// member is missing (a crash cut the group's creation short).
pub(crate) fn group_whole(members: &[(RecordState, Recovery)]) -> bool {
    let creating = members.iter().any(|(s, _)| *s == RecordState::Creating);
    !creating || members.iter().all(|(_, d)| *d != Recovery::Drop)
}

/// A drill, for the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillInfo {
    /// The drill's volume (and export) name.
    pub name: String,
    /// The secondary it was made from.
    pub volume: String,
    /// The recovery point's name, or `newest`.
    pub point: String,
    /// The primary-clock time the image represents (unix ns).
    pub at_unix_ns: i64,
    /// When the drill was started (this agent's clock, unix ns).
    pub created_at_unix_ns: i64,
    /// Size of the drill volume.
    pub size_bytes: u64,
    /// NBD connections attached to it now.
    pub nbd_connections: u32,
    /// The group drill it belongs to (empty: none).
    pub group: String,
}

/// The drills of this agent.
#[derive(Debug)]
pub(crate) struct Drills {
    dir: PathBuf,
    store: Arc<VolumeStore>,
    /// Every record, `creating` ones included (hidden from lists).
    records: Mutex<BTreeMap<String, DrillRecord>>,
    /// Serialises start and stop, so a name is checked and taken at once.
    ops: tokio::sync::Mutex<()>,
    /// Test fault: hold creation at a stage (see `Faults::delay_drill`).
    delay: Option<(String, Duration)>,
}

impl Drills {
    /// Loads the drill records under `DATA/replicas/drills`, removing what
    /// a crash left half made (see the module doc). Call after the store
    /// has opened (it has removed its own leftovers by then).
    ///
    /// # Errors
    /// The directory cannot be read or a record cannot be persisted.
    pub(crate) fn open(
        data_dir: &Path,
        store: Arc<VolumeStore>,
        delay: Option<(String, Duration)>,
    ) -> Result<Self, DrillError> {
        let dir = data_dir.join("replicas").join("drills");
        std::fs::create_dir_all(&dir).map_err(io_err("create the drills dir"))?;
        let mut records = BTreeMap::new();
        let mut found_records = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err("read the drills dir"))? {
            let path = entry.map_err(io_err("read the drills dir"))?.path();
            let file = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if file.starts_with('.') || file.ends_with(".tmp") {
                // A clone that was never published, or the temp file of a
                // record write cut short (`write_json_atomic`'s NAME.json.tmp).
                tracing::info!(path = %path.display(), "removing a half-made drill image");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let rec: DrillRecord = match ember_volume::fsutil::read_json(&path) {
                Ok(r) => r,
                Err(e) => {
                    // Records are written atomically, so this is not a torn
                    // write: keep the file for the operator, do not serve it.
                    tracing::error!(path = %path.display(), error = %e, "unreadable drill record; ignoring it");
                    continue;
                }
            };
            let ours = origin(&rec.volume, &rec.point);
            let found = store.get(&rec.name).map(|(meta, _)| meta.origin);
            let decision = recovery(rec.state, found.as_deref(), &ours);
            found_records.push((path, rec, decision, found.as_deref() == Some(ours.as_str())));
        }
        // A group drill cut short while being made goes as a whole.
        let broken: Vec<String> = {
            let mut groups: BTreeMap<&str, Vec<(RecordState, Recovery)>> = BTreeMap::new();
            for (_, rec, decision, _) in &found_records {
                if !rec.group.is_empty() {
                    groups
                        .entry(&rec.group)
                        .or_default()
                        .push((rec.state, *decision));
                }
            }
            groups
                .into_iter()
                .filter(|(_, members)| !group_whole(members))
                .map(|(g, _)| g.to_owned())
                .collect()
        };
        let mut doomed = Vec::new();
        for (path, mut rec, decision, published) in found_records {
            if broken.contains(&rec.group) {
                tracing::info!(drill = %rec.name, group = %rec.group, "dropping a member of a group drill a crash cut short");
                if published {
                    // Its volume goes first (below), then the record.
                    doomed.push(rec);
                } else {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            match decision {
                Recovery::Keep => {}
                Recovery::RollForward => {
                    tracing::info!(drill = %rec.name, volume = %rec.volume, "drill was published before a crash; completing it");
                    rec.state = RecordState::Active;
                    ember_volume::fsutil::write_json_atomic(&path, &rec)?;
                }
                Recovery::Drop => {
                    tracing::info!(drill = %rec.name, volume = %rec.volume, state = ?rec.state, "dropping a drill record without its volume (cut short by a crash)");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            }
            records.insert(rec.name.clone(), rec);
        }
        if !doomed.is_empty() {
            // Deleting a volume needs the store's async lock; the records
            // stay on disk until their volumes are gone, so a crash before
            // this finishes repeats it. They are never listed meanwhile.
            let (store, dir) = (store.clone(), dir.clone());
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move {
                        for rec in doomed {
                            match store.delete(&rec.name).await {
                                Ok(_) => {
                                    let _ = std::fs::remove_file(dir.join(format!("{}.json", rec.name)));
                                }
                                Err(e) => tracing::warn!(drill = %rec.name, error = %e, "cannot remove a half-made group drill's volume"),
                            }
                        }
                    });
                }
                Err(_) => tracing::warn!(
                    "no runtime to remove half-made group drills; the next start does"
                ),
            }
        }
        ember_volume::fsutil::sync_dir(&dir)?;
        Ok(Self {
            dir,
            store,
            records: Mutex::new(records),
            ops: tokio::sync::Mutex::new(()),
            delay,
        })
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn persist(&self, rec: &DrillRecord) -> Result<(), DrillError> {
        ember_volume::fsutil::write_json_atomic(&self.record_path(&rec.name), rec)?;
        self.records
            .lock()
            .expect("drill records lock poisoned")
            .insert(rec.name.clone(), rec.clone());
        Ok(())
    }

    fn forget(&self, name: &str) {
        self.records
            .lock()
            .expect("drill records lock poisoned")
            .remove(name);
        let _ = std::fs::remove_file(self.record_path(name));
        let _ = ember_volume::fsutil::sync_dir(&self.dir);
    }

    async fn fault(&self, stage: &str) {
        if let Some((s, d)) = &self.delay
            && s == stage
        {
            tracing::warn!(
                stage,
                delay_ms = d.as_millis() as u64,
                "FAULT: holding drill creation"
            );
            tokio::time::sleep(*d).await;
        }
    }

    /// A new drill (or group drill) name must name no drill, no group
    /// drill and no volume, so `drill stop NAME` is never ambiguous.
    fn check_free(&self, name: &str) -> Result<(), DrillError> {
        let taken = {
            let records = self.records.lock().expect("drill records lock poisoned");
            records.contains_key(name) || records.values().any(|r| r.group == name)
        };
        if taken {
            return Err(DrillError::AlreadyExists(format!(
                "a drill named {name} exists; stop it or pick another name"
            )));
        }
        if self.store.get(name).is_some() {
            return Err(DrillError::AlreadyExists(format!(
                "a volume named {name} exists on this site; pick another drill name"
            )));
        }
        Ok(())
    }

    /// Clones the image of one drill whose `creating` record is persisted
    /// and publishes it as a volume (the record stays `creating`).
    async fn build(
        &self,
        sv: &Arc<SecondaryVolume>,
        rec: &mut DrillRecord,
        point: Option<&PointInfo>,
    ) -> Result<(), DrillError> {
        let tmp = self.dir.join(format!(".creating-{}.img", rec.name));
        let made = async {
            let _ = std::fs::remove_file(&tmp);
            match point {
                None => {
                    // Held at a batch boundary by the clone gate, as a
                    // point's clone is: the stream goes on meanwhile, its
                    // batches acknowledged and deferred (`points::hold`).
                    let hold = points::hold_image(sv).await;
                    if !hold.consistent() {
                        return Err(DrillError::FailedPrecondition(format!(
                            "secondary {} is not consistent now (an initial sync or a resync is running); \
                             drill from a recovery point instead, or wait until it is in sync",
                            rec.volume
                        )));
                    }
                    rec.at_unix_ns = hold.at_unix_ns();
                    let held = std::time::Instant::now();
                    let cloned = clone_live(&sv.points, sv.volume.device().path(), &tmp).await;
                    let deferred_bytes = hold.deferred_bytes();
                    hold.release();
                    let held_us = held.elapsed().as_micros() as u64;
                    cloned?;
                    sync_file(&tmp).await?;
                    tracing::info!(drill = %rec.name, volume = %rec.volume, held_us, deferred_bytes, "newest image cloned; the stream was deferred, not held");
                }
                Some(p) => clone(&sv.points, &p.data_path, &tmp).await.map_err(|e| match e {
                    DrillError::Io { source, .. }
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        DrillError::NotFound(format!(
                            "recovery point {} of {} expired while the drill was being made; pick another",
                            p.name, rec.volume
                        ))
                    }
                    other => other,
                })?,
            }
            self.fault("cloned").await;
            let origin = origin(&rec.volume, &rec.point);
            self.store
                .create_from_image(&rec.name, &tmp, &origin)
                .await?;
            self.fault("published").await;
            Ok(())
        }
        .await;
        if made.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        made
    }

    /// Removes whatever of drills `recs` exists: published volumes (ours
    /// only), then records. Best effort: called on an error path.
    async fn undo(&self, recs: &[DrillRecord]) {
        for rec in recs {
            let ours = origin(&rec.volume, &rec.point);
            if self
                .store
                .get(&rec.name)
                .is_some_and(|(meta, _)| meta.origin == ours)
                && let Err(e) = self.store.delete(&rec.name).await
            {
                tracing::warn!(drill = %rec.name, error = %e, "cannot remove a half-made drill's volume; the next start removes it");
                continue;
            }
            self.forget(&rec.name);
        }
    }

    /// Makes drill `name` of secondary `volume` from `source`. The caller
    /// has checked that `volume` is not a primary here.
    ///
    /// # Errors
    /// See [`DrillError`]; on any error nothing of the drill is left.
    pub(crate) async fn start(
        &self,
        secondaries: &SecondarySet,
        volume: &str,
        name: &str,
        source: DrillSource,
        now_unix_ns: i64,
    ) -> Result<DrillRecord, DrillError> {
        let _op = self.ops.lock().await;
        let sv = secondary(secondaries, volume)?;
        self.check_free(name)?;
        if self.store.snapshot_method() != SnapshotMethod::Reflink {
            return Err(no_reflink());
        }
        // Resolve a point before writing anything: a bad one leaves no trace.
        let point = match &source {
            DrillSource::Newest => None,
            DrillSource::Point(sel) => Some(
                secondaries
                    .resolve_point(volume, sel)
                    .map_err(DrillError::Point)?,
            ),
        };
        let mut rec = DrillRecord {
            name: name.to_owned(),
            volume: volume.to_owned(),
            point: point.as_ref().map_or(NEWEST.to_owned(), |p| p.name.clone()),
            at_unix_ns: point.as_ref().map_or(0, |p| p.at_unix_ns),
            created_at_unix_ns: now_unix_ns,
            state: RecordState::Creating,
            group: String::new(),
        };
        self.persist(&rec)?;
        let made = async {
            self.build(&sv, &mut rec, point.as_ref()).await?;
            rec.state = RecordState::Active;
            self.persist(&rec)
        }
        .await;
        if let Err(e) = made {
            self.undo(std::slice::from_ref(&rec)).await;
            return Err(e);
        }
        Ok(rec)
    }

    /// Makes group drill `group`: one drill per `(member volume, drill
    /// name)`, each from that member's recovery point at the group point
    /// `at_unix_ns`, so together they are one crash-consistent image of the
    /// group. Every record is written (`creating`) before any image is
    /// cloned and none becomes `active` before all are published, so a
    /// crash leaves the whole group or none of it (see [`Drills::open`]).
    ///
    /// # Errors
    /// As [`Self::start`]; a member without a point at `at_unix_ns` is
    /// `NotFound`. On any error nothing of the group is left.
    pub(crate) async fn start_group(
        &self,
        secondaries: &SecondarySet,
        group: &str,
        members: &[(String, String)],
        at_unix_ns: i64,
        now_unix_ns: i64,
    ) -> Result<Vec<DrillRecord>, DrillError> {
        let _op = self.ops.lock().await;
        self.check_free(group)?;
        if self.store.snapshot_method() != SnapshotMethod::Reflink {
            return Err(no_reflink());
        }
        let mut plan = Vec::with_capacity(members.len());
        for (volume, name) in members {
            let sv = secondary(secondaries, volume)?;
            self.check_free(name)?;
            let point = secondaries
                .resolve_point(volume, &PointSelector::At(at_unix_ns))
                .map_err(DrillError::Point)?;
            if point.at_unix_ns != at_unix_ns {
                return Err(DrillError::NotFound(format!(
                    "member {volume} of group {group} has no recovery point at the group point {}",
                    secs(at_unix_ns)
                )));
            }
            let rec = DrillRecord {
                name: name.clone(),
                volume: volume.clone(),
                point: point.name.clone(),
                at_unix_ns,
                created_at_unix_ns: now_unix_ns,
                state: RecordState::Creating,
                group: group.to_owned(),
            };
            plan.push((sv, rec, point));
        }
        let mut recs: Vec<DrillRecord> = plan.iter().map(|(_, r, _)| r.clone()).collect();
        let made = async {
            for rec in &recs {
                self.persist(rec)?;
            }
            for (sv, rec, point) in &mut plan {
                self.build(sv, rec, Some(&*point)).await?;
            }
            for rec in &mut recs {
                rec.state = RecordState::Active;
                self.persist(rec)?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = made {
            self.undo(&recs).await;
            return Err(e);
        }
        Ok(recs)
    }

    /// Stops (deletes) drill `name` — or, when no drill has that name,
    /// every member of group drill `name`: each volume, then its record.
    /// Empty when there is no such drill.
    ///
    /// # Errors
    /// NBD clients attached to any of them (`FailedPrecondition`, checked
    /// before anything is deleted) or a store failure; what was not
    /// deleted stays listed.
    pub(crate) async fn stop(&self, name: &str) -> Result<Vec<DrillRecord>, DrillError> {
        let _op = self.ops.lock().await;
        let doomed: Vec<DrillRecord> = {
            let records = self.records.lock().expect("drill records lock poisoned");
            match records.get(name) {
                Some(rec) => vec![rec.clone()],
                None => records
                    .values()
                    .filter(|r| r.group == name)
                    .cloned()
                    .collect(),
            }
        };
        for rec in &doomed {
            if let Some((_, vol)) = self.store.get(&rec.name)
                && vol.connections() > 0
            {
                return Err(DrillError::FailedPrecondition(format!(
                    "drill {} has {} NBD connection(s) attached; detach them first",
                    rec.name,
                    vol.connections()
                )));
            }
        }
        for rec in &doomed {
            self.store.delete(&rec.name).await?;
            self.forget(&rec.name);
        }
        Ok(doomed)
    }

    /// The secondary a drill volume named `name` was made from, if `name`
    /// is a drill here (in any state: a half-made one is one too).
    pub(crate) fn source_of(&self, name: &str) -> Option<String> {
        self.records
            .lock()
            .expect("drill records lock poisoned")
            .get(name)
            .map(|r| r.volume.clone())
    }

    /// Active drills, of `volume` only when given, by name.
    pub(crate) fn list(&self, volume: Option<&str>) -> Vec<DrillInfo> {
        let records: Vec<DrillRecord> = self
            .records
            .lock()
            .expect("drill records lock poisoned")
            .values()
            .filter(|r| r.state == RecordState::Active)
            .filter(|r| volume.is_none_or(|v| v == r.volume))
            .cloned()
            .collect();
        records.iter().filter_map(|r| self.info(r)).collect()
    }

    /// The API view of a record (`None` when its volume vanished).
    pub(crate) fn info(&self, rec: &DrillRecord) -> Option<DrillInfo> {
        let (meta, vol) = self.store.get(&rec.name)?;
        Some(DrillInfo {
            name: rec.name.clone(),
            volume: rec.volume.clone(),
            point: rec.point.clone(),
            at_unix_ns: rec.at_unix_ns,
            created_at_unix_ns: rec.created_at_unix_ns,
            size_bytes: meta.size_bytes,
            nbd_connections: vol.connections(),
            group: rec.group.clone(),
        })
    }
}

fn secondary(secondaries: &SecondarySet, volume: &str) -> Result<Arc<SecondaryVolume>, DrillError> {
    secondaries.get(volume).ok_or_else(|| {
        DrillError::NotFound(format!(
            "volume {volume} is not a secondary on this site; drills start from a secondary"
        ))
    })
}

fn no_reflink() -> DrillError {
    DrillError::FailedPrecondition(
        "this data dir's file system cannot reflink (clone extents), and a drill made by copying \
         would stall replication for the copy: put the data dir on XFS made with \
         `mkfs.xfs -m reflink=1` (the default) or on btrfs"
            .into(),
    )
}

/// Clones `src` to `dst` (reflink, fsynced) on a blocking thread, as a
/// clone in the data dir that deletions of expired points step aside for.
async fn clone(vp: &Arc<VolumePoints>, src: &Path, dst: &Path) -> Result<(), DrillError> {
    let (vp, s, d) = (vp.clone(), src.to_owned(), dst.to_owned());
    clone_result(blocking(move || vp.reflink_stepping_aside(&s, &d)).await?)
}

/// As [`clone`] for the live volume file under an `ImageHold`: not
/// fsynced (the caller syncs `dst` once the hold is released, so the
/// stream is deferred for the `FICLONE` alone).
async fn clone_live(vp: &Arc<VolumePoints>, src: &Path, dst: &Path) -> Result<(), DrillError> {
    let (vp, s, d) = (vp.clone(), src.to_owned(), dst.to_owned());
    clone_result(blocking(move || vp.reflink_live_stepping_aside(&s, &d)).await?)
}

/// Makes the clone `path` durable (before it is published as a volume).
async fn sync_file(path: &Path) -> Result<(), DrillError> {
    let p = path.to_owned();
    blocking(move || std::fs::File::open(&p).and_then(|f| f.sync_all()))
        .await?
        .map_err(|source| DrillError::Io {
            what: format!("sync drill image {}", path.display()),
            source,
        })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, DrillError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DrillError::Io {
            what: "clone task".into(),
            source: std::io::Error::other(e),
        })
}

fn clone_result(result: Result<(), StoreError>) -> Result<(), DrillError> {
    match result {
        Ok(()) => Ok(()),
        // The probe said reflink works, yet this clone was refused (another
        // file system mounted under the data dir?): same fix.
        Err(StoreError::Io { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::Unsupported | std::io::ErrorKind::CrossesDevices
            ) =>
        {
            Err(no_reflink())
        }
        Err(StoreError::Io { op, source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Err(DrillError::Io {
                what: op.to_owned(),
                source,
            })
        }
        Err(e) => Err(DrillError::Store(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000_000_000;

    #[test]
    fn source_for_decides_by_table() {
        use DrillSource::{Newest, Point};
        let ok = |p: &str, t: i64| source_for(p, t, NOW).ok();
        let rows: [(&str, i64, Option<DrillSource>); 8] = [
            ("", 0, Some(Newest)),
            ("newest", 0, Some(Newest)),
            ("p1", 0, Some(Point(PointSelector::Name("p1".into())))),
            ("", NOW - 5, Some(Point(PointSelector::At(NOW - 5)))),
            ("", NOW, Some(Point(PointSelector::At(NOW)))),
            ("", NOW + 1, None),
            ("", -1, None),
            ("p1", NOW - 5, None),
        ];
        for (point, at, want) in rows {
            assert_eq!(ok(point, at), want, "point {point:?} at {at}");
        }
    }

    #[test]
    fn a_future_time_is_an_invalid_argument_naming_it() {
        let e = source_for("", NOW + 60_000_000_000, NOW).unwrap_err();
        assert!(matches!(e, DrillError::InvalidArgument(_)));
        assert!(e.to_string().contains("future"), "{e}");
    }

    #[test]
    fn recovery_decides_by_table() {
        use RecordState::{Active, Creating};
        let ours = "drill:v@newest";
        let rows = [
            (Active, Some(ours), Recovery::Keep),
            (Active, None, Recovery::Drop),
            (Active, Some("drill:v@other"), Recovery::Drop),
            (Active, Some(""), Recovery::Drop),
            (Creating, Some(ours), Recovery::RollForward),
            (Creating, None, Recovery::Drop),
            (Creating, Some("volume:v"), Recovery::Drop),
        ];
        for (state, found, want) in rows {
            assert_eq!(recovery(state, found, ours), want, "{state:?} {found:?}");
        }
    }

    #[test]
    fn a_group_drill_is_whole_unless_its_creation_was_cut_short() {
        use RecordState::{Active, Creating};
        use Recovery::{Drop, Keep, RollForward};
        let rows: [(&[(RecordState, Recovery)], bool); 6] = [
            (&[(Active, Keep), (Active, Keep)], true),
            // A member deleted later: the rest stays.
            (&[(Active, Keep), (Active, Drop)], true),
            // Crash between publishing the last member and marking all.
            (&[(Active, Keep), (Creating, RollForward)], true),
            (&[(Creating, RollForward), (Creating, RollForward)], true),
            (&[(Creating, RollForward), (Creating, Drop)], false),
            (&[(Creating, Drop), (Creating, Drop)], false),
        ];
        for (members, want) in rows {
            assert_eq!(group_whole(members), want, "{members:?}");
        }
    }

    #[test]
    fn default_names_are_valid_volume_names() {
        for volume in ["db", &"x".repeat(MAX_NAME_BYTES)] {
            let name = default_name(volume, NOW);
            assert!(ember_volume::parse_volume(&name).is_ok(), "{name}");
            assert!(name.ends_with("-drill-1800000000"), "{name}");
        }
    }

    #[test]
    fn records_round_trip_in_their_on_disk_spelling() {
        let rec = DrillRecord {
            name: "d".into(),
            volume: "v".into(),
            point: NEWEST.into(),
            at_unix_ns: 5,
            created_at_unix_ns: 6,
            state: RecordState::Creating,
            group: String::new(),
        };
        let text = serde_json::to_string(&rec).unwrap();
        assert!(text.contains("\"state\":\"creating\""), "{text}");
        assert_eq!(serde_json::from_str::<DrillRecord>(&text).unwrap(), rec);
    }
}
