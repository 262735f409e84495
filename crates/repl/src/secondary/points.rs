//! Recovery points on the secondary: reflink clones of a secondary volume's
//! image taken at committed-batch boundaries, with a schedule, a retention,
//! a per-data-dir space cap and, per point, the set of blocks applied since
//! it (so a promotion to the point knows what failback must resend).
//!
//! Nothing here decides *which* point, *which* ranges or *which* expiry:
//! that is `crate::plan::points` (pure functions, table tests). This module
//! does the I/O: clone, publish, record, expire, roll back.
//!
//! Layout, per secondary volume:
//! ```text
//! DATA/replicas/secondary/points/VOL/points.json   schedule + points (atomic replace)
//! DATA/replicas/secondary/points/VOL/tail.json     blocks applied since the newest point
//! DATA/replicas/secondary/points/VOL/NAME.img      a point's image (reflink clone)
//! DATA/replicas/secondary/points/VOL/.tmp-NAME.img a clone being made
//! ```
//! Crash safety of taking a point: clone into `.tmp-NAME.img`, fsync it,
//! rename, fsync the directory, then record it in `points.json`. A point is
//! listed only once recorded; at start-up temporaries and images no record
//! names are deleted, and records whose image is missing are dropped. The
//! change sets are written ahead: blocks are added (and `tail.json`
//! persisted when the set grew) *before* a batch touches the volume, so a
//! crash can only make a change set larger than the truth, never smaller.
//!
//! A point is taken right after a committed batch is applied: the clone
//! starts under the stream's `apply_lock` and holds the volume's *clone
//! gate* until it is done, and no batch is applied to the volume without
//! that gate, so the image is the crash-consistent image of the record's
//! `consistent_at`. The stream itself does not wait for the clone: batches
//! committed meanwhile are staged, made durable and acknowledged, and
//! applied once the clone is done (`apply.rs`). The clone is one `FICLONE`
//! (time proportional to extents, not bytes) or a few `FICLONERANGE`s.
//!
//! Deleting a point's image (expiry, the space cap, a stale head start)
//! frees extents in the same reference-count btree a clone updates, so it
//! never runs beside a clone in the data dir: files are cut down from the
//! end in steps ([`REAP_CHUNK`]), each step only while no clone runs, and a
//! clone waits at most for the step in progress.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tonic::Status;

use super::{SecondarySet, SecondaryVolume};
use crate::events::{Event, EventBus, EventKind};
use crate::plan::points::{self as plan, Blocks, PointMeta, Schedule, SelectError};
pub(crate) use crate::plan::points::{PointKind, PointSelector};
use crate::primary::link::now_unix_ns;

mod hold;
mod keep;
pub(crate) use hold::hold_image;
pub(crate) use keep::keep_as_snapshots;

const INDEX: &str = "points.json";
const TAIL: &str = "tail.json";
const TMP_PREFIX: &str = ".tmp-";
/// Blocks the persisted change set runs ahead of the applied writes: 256
/// blocks are 16 MiB at 64 KiB per block, so a sequential writer costs one
/// record (two fsyncs) per 16 MiB, and a failback after a crash resends at
/// most that much extra per written region.
const RESERVE_BLOCKS: u64 = 256;
const IMAGE_EXT: &str = "img";
/// Above this many changed runs since the previous point, a new point is
/// one `FICLONE` of the whole image rather than one `FICLONERANGE` per run
/// into the previous point's head-start clone. Each run costs a call and,
/// in the kernel, unmapping the head start's extents there before mapping
/// the volume's: after random writes (thousands of runs of fragmented
/// extents) that held the stream 0.4–3.4 s per point in the benchmark,
/// while a streaming writer changes one or a few runs.
const MAX_INCREMENTAL_RUNS: usize = 64;
/// A deleted point's image is cut down by this much per step (see the
/// module doc): one step's extent frees is what a clone may wait for.
const REAP_CHUNK: u64 = 16 << 20;
/// How long a manual point waits for the secondary to be consistent (a
/// reconnect's resync done) and, asked on the primary, to apply the batch
/// holding the primary's writes up to the request.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval of that wait (a commit every ≤ 20 ms in async mode).
const CATCH_UP_POLL: Duration = Duration::from_millis(5);
/// Space cap when the config names none: this share (percent) of the data
/// dir's file system. Points pin old copies of overwritten blocks; past the
/// cap the oldest scheduled points expire.
pub(crate) const DEFAULT_SPACE_CAP_PERCENT: u64 = 20;

/// What a refused point says on a data dir without reflink.
pub(crate) const NO_REFLINK: &str = "recovery points need a data dir on a file system with reflink \
     (copy-on-write clones): this one cannot clone files (ext4?). Put the data dir on XFS made with \
     `mkfs.xfs -m reflink=1` (the default of current xfsprogs) or on btrfs";

/// One retained point, as callers (promotion, drills) see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PointInfo {
    /// The point's name (unique per volume).
    pub(crate) name: String,
    /// The primary-clock time the image represents (unix ns).
    pub(crate) at_unix_ns: i64,
    /// Scheduled or manual.
    pub(crate) kind: PointKind,
    /// The point's image file, a reflink clone of the volume (read-only:
    /// clone it again to use it).
    pub(crate) data_path: PathBuf,
    /// The consistency group it was taken in (empty: none).
    pub(crate) group: String,
}

/// A point as the control API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointListing {
    /// Name.
    pub name: String,
    /// The primary-clock time the image represents (unix ns).
    pub at_unix_ns: i64,
    /// `scheduled` or `manual`.
    pub kind: &'static str,
    /// Consistency group (empty: none).
    pub group: String,
    /// Estimated bytes it pins (blocks overwritten since it, until the
    /// next point).
    pub pinned_bytes: u64,
    /// The target site holding it, in a primary's listing of a volume
    /// with several targets; empty otherwise.
    pub peer: String,
}

/// A secondary's points and schedule, for the control API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointsReport {
    /// Retained points, oldest first.
    pub points: Vec<PointListing>,
    /// Seconds between scheduled points (0: none).
    pub every_secs: u64,
    /// Scheduled points kept (0: no count limit).
    pub keep: u32,
    /// Age limit of scheduled points, seconds (0: none).
    pub keep_for_secs: u64,
}

/// RFC 3339 (UTC, milliseconds) of a unix-ns time, for names and messages.
pub(crate) fn rfc3339(unix_ns: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(u64::try_from(unix_ns).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

fn select_status(volume: &str, e: SelectError) -> Status {
    match e {
        SelectError::NoPoints => {
            Status::not_found(format!("volume {volume} has no recovery points here"))
        }
        SelectError::UnknownName { oldest: (n, at) } => Status::not_found(format!(
            "volume {volume} has no recovery point of that name; the oldest retained point is {n} ({})",
            rfc3339(at)
        )),
        SelectError::TooOld { oldest: (n, at) } => Status::not_found(format!(
            "no recovery point of {volume} that old: the oldest retained point is {n} ({})",
            rfc3339(at)
        )),
        SelectError::Future => Status::invalid_argument(format!(
            "the time asked for is in the future (now is {}); name a past time or a point",
            rfc3339(now_unix_ns())
        )),
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Index {
    #[serde(default)]
    schedule: Schedule,
    #[serde(default)]
    points: Vec<PointMeta>,
    /// A promotion to this point was rolling the volume back when the agent
    /// stopped, with the byte ranges that differ from the newest image:
    /// start-up finishes the rollback before anything else.
    #[serde(default)]
    rolling_back_to: Option<(String, Vec<(u64, u64)>)>,
    /// Points newer than the one a promotion rolled back to: no longer
    /// points of this image (never selected, expired or counted), their
    /// images kept until the promotion makes them snapshots (`keep.rs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    superseded: Vec<PointMeta>,
}

#[derive(Debug)]
struct State {
    index: Index,
    /// The newest point's change set as last persisted in `tail.json`.
    tail_persisted: Blocks,
    /// The last scheduled point tried (taken or failed): one try per
    /// interval, so a failing clone is not retried on every commit.
    last_try_at: Option<i64>,
    /// A point cloned but not yet recorded (its record runs off the
    /// stream's path): the blocks applied since its clone, which become its
    /// change set once it is recorded. Until then they also go to the
    /// newest recorded point's set (and `tail.json`), so a crash that
    /// drops the unrecorded point loses nothing.
    pending: Option<Blocks>,
}

/// Clones and deletions of point images in the data dir (see the module
/// doc): deletions step aside for clones.
#[derive(Debug, Default)]
struct ReapGate {
    /// Clones running (or waiting for a deletion step to end).
    clones: usize,
    /// A deletion step is running.
    reaping: bool,
}

/// A clone in the data dir is running: deletions wait (see [`ReapGate`]).
struct Cloning<'a>(&'a PointsCtx);

impl Drop for Cloning<'_> {
    fn drop(&mut self) {
        let mut g = self.0.reap_gate.lock().expect("reap gate poisoned");
        g.clones -= 1;
        self.0.reap_cv.notify_all();
    }
}

/// Shared by every secondary volume's points: the data dir's reflink
/// support, the event bus, the space cap and the set of volumes it covers.
#[derive(Debug)]
pub(crate) struct PointsCtx {
    root: PathBuf,
    reflink: bool,
    pub(crate) events: EventBus,
    cap_bytes: AtomicU64,
    all: Mutex<HashMap<String, Weak<VolumePoints>>>,
    /// Fault injection for crash tests (`EMBER_FAULT_DELAY_POINT=MS`):
    /// hold a point between publishing its image and recording it, so a
    /// `kill -9` can land in that window.
    delay_record: Option<Duration>,
    /// Fault injection for crash tests (`EMBER_FAULT_DELAY_EXPIRY=MS`):
    /// pause after each step of deleting an expired point's image.
    delay_expiry: Option<Duration>,
    /// Fault injection for tests (`EMBER_FAULT_DELAY_CLONE=MS`): a point's
    /// clone of the volume takes this much longer (holding the clone
    /// gate), as a fragmented volume's clone does.
    delay_clone: Option<Duration>,
    reap_gate: Mutex<ReapGate>,
    reap_cv: Condvar,
}

impl PointsCtx {
    pub(crate) fn new(root: PathBuf, reflink: bool, cap_bytes: u64) -> Self {
        let delay = |var: &str| {
            std::env::var(var)
                .ok()
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis)
        };
        Self {
            root,
            reflink,
            events: EventBus::default(),
            cap_bytes: AtomicU64::new(cap_bytes),
            all: Mutex::new(HashMap::new()),
            delay_record: delay("EMBER_FAULT_DELAY_POINT"),
            delay_expiry: delay("EMBER_FAULT_DELAY_EXPIRY"),
            delay_clone: delay("EMBER_FAULT_DELAY_CLONE"),
            reap_gate: Mutex::new(ReapGate::default()),
            reap_cv: Condvar::new(),
        }
    }

    /// Marks a clone running until the guard drops; waits for a deletion
    /// step in progress (none starts meanwhile). Blocking.
    fn cloning(&self) -> Cloning<'_> {
        let mut g = self.reap_gate.lock().expect("reap gate poisoned");
        g.clones += 1;
        while g.reaping {
            g = self.reap_cv.wait(g).expect("reap gate poisoned");
        }
        Cloning(self)
    }

    /// Deletes point images off the caller's path, stepping aside for
    /// clones (see the module doc). A crash midway leaves unlisted images
    /// that the next start removes.
    fn reap(self: &Arc<Self>, files: Vec<PathBuf>) {
        if files.is_empty() {
            return;
        }
        let ctx = self.clone();
        tokio::task::spawn_blocking(move || {
            for f in files {
                ctx.reap_file(&f);
            }
        });
    }

    /// Cuts `path` down from its end, one [`REAP_CHUNK`] per step while no
    /// clone runs, then unlinks it. Blocking.
    fn reap_file(&self, path: &Path) {
        if let Ok(file) = OpenOptions::new().write(true).open(path) {
            while let Ok(len) = file.metadata().map(|m| m.len())
                && len > 0
            {
                {
                    let mut g = self.reap_gate.lock().expect("reap gate poisoned");
                    while g.clones > 0 || g.reaping {
                        g = self.reap_cv.wait(g).expect("reap gate poisoned");
                    }
                    g.reaping = true;
                }
                let cut = file.set_len(plan::reap_step(len, REAP_CHUNK));
                {
                    let mut g = self.reap_gate.lock().expect("reap gate poisoned");
                    g.reaping = false;
                    self.reap_cv.notify_all();
                }
                if let Err(e) = cut {
                    tracing::warn!(file = %path.display(), error = %e, "cannot cut down an expired recovery point's image; unlinking it whole");
                    break;
                }
                if let Some(d) = self.delay_expiry {
                    std::thread::sleep(d);
                }
            }
        }
        let _ = std::fs::remove_file(path);
    }

    fn publish(&self, kind: EventKind, volume: &str, message: String) {
        self.events.publish(Event::new(kind, volume, message));
    }
}

/// The recovery points of one secondary volume.
#[derive(Debug)]
pub(crate) struct VolumePoints {
    dir: PathBuf,
    volume: String,
    /// The live volume's data file (the clone source, the rollback target).
    data_path: PathBuf,
    block_bytes: AtomicU64,
    /// The volume's size in change-set blocks (caps the reserve).
    size_blocks: AtomicU64,
    state: Mutex<State>,
    /// Serializes the writes of `points.json` and `tail.json`, so each
    /// write holds the in-memory state of its moment and the `state` lock
    /// (which the apply path takes per batch) is never held across an
    /// fsync. Order: `io`, then `state`.
    io: Mutex<()>,
    /// One point at a time per volume: held from the clone until the
    /// point is recorded (and the next point's head start is made).
    serial: Arc<tokio::sync::Mutex<()>>,
    /// Held by a point's clone of the volume while it runs (and by a
    /// drill's: `hold.rs`), and by every change applied to the volume
    /// (`apply.rs`): a clone sees no batch half-applied, and the stream
    /// defers batches while it runs.
    clone_gate: Arc<tokio::sync::Mutex<()>>,
    ctx: Arc<PointsCtx>,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

impl VolumePoints {
    /// Loads (or starts) the points of `volume`, cleaning what a crash
    /// left: temporaries, images no record names, records without image.
    /// Finishes a rollback a crash interrupted.
    pub(crate) fn open(
        ctx: &Arc<PointsCtx>,
        volume: &str,
        data_path: PathBuf,
        size_bytes: u64,
    ) -> std::io::Result<Arc<Self>> {
        let dir = ctx.root.join(volume);
        std::fs::create_dir_all(&dir)?;
        let mut index: Index = match ember_volume::fsutil::read_json(&dir.join(INDEX)) {
            Ok(i) => i,
            Err(_) if !dir.join(INDEX).exists() => Index::default(),
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        };
        let mut changed = false;
        index.points.retain(|p| {
            let ok = dir.join(image_name(&p.name)).exists();
            if !ok {
                tracing::warn!(volume, point = %p.name, "recovery point without its image; dropping the record");
                changed = true;
            }
            ok
        });
        index
            .superseded
            .retain(|p| dir.join(image_name(&p.name)).exists());
        let tail: Blocks = ember_volume::fsutil::read_json(&dir.join(TAIL)).unwrap_or_default();
        if let Some(last) = index.points.last_mut() {
            last.after.union(&tail);
        }
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or_default()
                .to_owned();
            let listed = index
                .points
                .iter()
                .chain(&index.superseded)
                .any(|p| image_name(&p.name) == file);
            let ours = file == INDEX || file == TAIL || file.ends_with(".json.tmp");
            if file.starts_with(TMP_PREFIX)
                || (!listed
                    && !ours
                    && path.extension().and_then(|e| e.to_str()) == Some(IMAGE_EXT))
            {
                tracing::info!(volume, file, "removing a recovery-point leftover");
                let _ = std::fs::remove_file(&path);
            }
        }
        let this = Arc::new(Self {
            dir,
            volume: volume.to_owned(),
            data_path,
            block_bytes: AtomicU64::new(plan::block_bytes(size_bytes)),
            size_blocks: AtomicU64::new(size_bytes.div_ceil(plan::block_bytes(size_bytes))),
            state: Mutex::new(State {
                tail_persisted: index
                    .points
                    .last()
                    .map(|p| p.after.clone())
                    .unwrap_or_default(),
                index,
                last_try_at: None,
                pending: None,
            }),
            io: Mutex::new(()),
            serial: Arc::new(tokio::sync::Mutex::new(())),
            clone_gate: Arc::new(tokio::sync::Mutex::new(())),
            ctx: ctx.clone(),
        });
        if changed {
            let index = this.state().index.clone();
            this.persist_index(&index)?;
        }
        ctx.all
            .lock()
            .expect("points registry lock poisoned")
            .insert(volume.to_owned(), Arc::downgrade(&this));
        Ok(this)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("points lock poisoned")
    }

    /// Waits until no point of the volume is being taken or recorded and
    /// keeps one from starting while the guard lives. Take it before the
    /// volume's `apply_lock` (the order `create_point` uses).
    pub(crate) async fn recording_done(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.serial.clone().lock_owned().await
    }

    /// `FICLONE`s `src` into the new file `dst` and fsyncs it, counted as
    /// a clone in the data dir: deletions of expired point images step
    /// aside meanwhile (see the module doc). For a drill's image; the
    /// caller holds [`Self::wait_clone`]'s guard when `src` is the live
    /// volume. Blocking.
    ///
    /// # Errors
    /// As `ember_volume::cow::reflink_file`.
    pub(crate) fn reflink_stepping_aside(
        &self,
        src: &Path,
        dst: &Path,
    ) -> Result<(), ember_volume::StoreError> {
        let _cloning = self.ctx.cloning();
        ember_volume::cow::reflink_file(src, dst)
    }

    /// Whether a point's clone of the volume is running now.
    pub(crate) fn clone_running(&self) -> bool {
        self.clone_gate.try_lock().is_err()
    }

    /// Waits until no point's clone of the volume runs and keeps one from
    /// starting while the guard lives (hold it while changing the image).
    pub(crate) async fn wait_clone(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.clone_gate.lock().await
    }

    fn persist_index(&self, index: &Index) -> std::io::Result<()> {
        ember_volume::fsutil::write_json_atomic(&self.dir.join(INDEX), index)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn io(&self) -> std::sync::MutexGuard<'_, ()> {
        self.io.lock().expect("points io lock poisoned")
    }

    /// Changes the index durably without holding the `state` lock across
    /// the write: `f` is applied to a copy that is persisted, then to the
    /// live index (which the apply path may have changed meanwhile, but
    /// only in change sets: `f` must not depend on those). Holding `io`
    /// keeps every other index write out in between.
    fn mutate_index<R>(&self, mut f: impl FnMut(&mut Index) -> R) -> std::io::Result<R> {
        let _io = self.io();
        let mut next = self.state().index.clone();
        f(&mut next);
        self.persist_index(&next)?;
        Ok(f(&mut self.state().index))
    }

    fn image(&self, name: &str) -> PathBuf {
        self.dir.join(image_name(name))
    }

    /// The schedule the primary set.
    pub(crate) fn schedule(&self) -> Schedule {
        self.state().index.schedule
    }

    /// Records the primary's schedule (from `OpenReplica`).
    pub(crate) fn set_schedule(&self, schedule: Schedule) -> std::io::Result<()> {
        if self.state().index.schedule == schedule {
            return Ok(());
        }
        self.mutate_index(|ix| ix.schedule = schedule)
    }

    /// The volume grew: coarser change-set blocks would mis-map the old
    /// ones, so the block size stays as it was unless no point exists.
    pub(crate) fn resized(&self, size_bytes: u64) {
        if self.state().index.points.is_empty() {
            self.block_bytes
                .store(plan::block_bytes(size_bytes), Ordering::Relaxed);
        }
        let g = self.block_bytes.load(Ordering::Relaxed);
        self.size_blocks
            .store(size_bytes.div_ceil(g), Ordering::Relaxed);
    }

    /// Write-ahead: `ranges` (byte offset, length) are about to change on
    /// the volume. Adds them to the newest point's change set and persists
    /// it when it grew. Free when no point exists. Blocking.
    pub(crate) fn note(&self, ranges: impl IntoIterator<Item = (u64, u64)>) -> Result<(), Status> {
        match self.note_in_memory(ranges) {
            Some(batch) => self.persist_covering(&batch),
            None => Ok(()),
        }
    }

    /// The in-memory half of [`Self::note`]: adds `ranges` to the change
    /// sets and returns the blocks `tail.json` does not cover yet (`None`:
    /// nothing to persist). The caller must have them persisted
    /// ([`Self::persist_covering`]) before the change counts as applied
    /// (for a staged batch: before the record names it; until then a crash
    /// replays the batch, and the replay notes it again).
    pub(crate) fn note_in_memory(
        &self,
        ranges: impl IntoIterator<Item = (u64, u64)>,
    ) -> Option<Blocks> {
        let g = self.block_bytes.load(Ordering::Relaxed);
        let mut guard = self.state();
        let st = &mut *guard;
        if st.index.points.is_empty() && st.pending.is_none() {
            return None;
        }
        let mut batch = Blocks::default();
        for (offset, len) in ranges {
            batch.insert_bytes(offset, len, g);
        }
        if let Some(last) = st.index.points.last_mut() {
            last.after.union(&batch);
        }
        // A first point being recorded has no recorded predecessor whose
        // tail would cover the batch: `tail.json` covers it for it (read
        // at start only when a point is listed, and then a superset).
        if let Some(pending) = st.pending.as_mut() {
            pending.union(&batch);
        }
        (!st.tail_persisted.covers(&batch)).then_some(batch)
    }

    /// Makes `tail.json` cover `batch` (no-op when it already does).
    /// Blocking (two fsyncs when it writes).
    pub(crate) fn persist_covering(&self, batch: &Blocks) -> Result<(), Status> {
        let _io = self.io();
        let tail = {
            let st = self.state();
            if st.tail_persisted.covers(batch) {
                return Ok(());
            }
            // The record runs ahead of the writes (see
            // `Blocks::with_reserve`): one write per RESERVE_BLOCKS of a
            // sequential stream.
            let limit = self.size_blocks.load(Ordering::Relaxed);
            st.tail_persisted.with_reserve(batch, RESERVE_BLOCKS, limit)
        };
        ember_volume::fsutil::write_json_atomic(&self.dir.join(TAIL), &tail)
            .map_err(|e| io_err("persisting the recovery points' change set", e))?;
        self.state().tail_persisted = tail;
        Ok(())
    }

    /// Retained points, oldest first.
    pub(crate) fn list(&self) -> Vec<PointMeta> {
        self.state().index.points.clone()
    }

    fn info(&self, p: &PointMeta) -> PointInfo {
        PointInfo {
            name: p.name.clone(),
            at_unix_ns: p.at_unix_ns,
            kind: p.kind,
            data_path: self.image(&p.name),
            group: p.group.clone(),
        }
    }

    /// The part of taking a point that needs the image still: the caller
    /// holds the volume's clone gate (taken right after a batch was
    /// applied, under the `apply_lock`), so the clone is the consistent
    /// image of the last applied batch. Clones into
    /// `.tmp-NAME.img` and returns that path (and whether the clone was
    /// incremental); nothing is synced or recorded
    /// yet ([`Self::record`] does that, off the stream's path). From here
    /// on the blocks applied also go to the new point's change set.
    /// Blocking.
    fn clone_now(&self, name: &str, size_bytes: u64) -> Result<(PathBuf, bool), Status> {
        let taken = {
            let st = self.state();
            let ix = &st.index;
            ix.points
                .iter()
                .chain(&ix.superseded)
                .any(|p| p.name == name)
        };
        if taken {
            return Err(Status::already_exists(format!(
                "volume {} already has a recovery point named {name}",
                self.volume
            )));
        }
        let tmp = self.dir.join(format!("{TMP_PREFIX}{}", image_name(name)));
        let _ = std::fs::remove_file(&tmp);
        let _cloning = self.ctx.cloning();
        let incremental = self.take_incremental(&tmp, size_bytes);
        if !incremental {
            ember_volume::cow::reflink_file_unsynced(&self.data_path, &tmp).map_err(|e| {
                Status::failed_precondition(format!(
                    "cloning {} for a recovery point: {e}",
                    self.volume
                ))
            })?;
        }
        if let Some(d) = self.ctx.delay_clone {
            std::thread::sleep(d);
        }
        self.state().pending = Some(Blocks::default());
        Ok((tmp, incremental))
    }

    /// Makes the clone [`Self::clone_now`] left in `tmp` a recorded point:
    /// fsync it, rename it to `NAME.img`, fsync the directory, add it to
    /// `points.json`, then start its change set in `tail.json`. Runs while
    /// the stream goes on: the clone no longer depends on the volume, and
    /// the writes applied meanwhile are in the pending change set. On
    /// failure nothing is listed and the files are removed. Blocking.
    fn record(
        &self,
        tmp: &Path,
        name: &str,
        at_unix_ns: i64,
        kind: PointKind,
        group: &str,
        size_bytes: u64,
    ) -> Result<PointMeta, Status> {
        let dest = self.image(name);
        let result = self.record_steps(tmp, &dest, name, at_unix_ns, kind, group, size_bytes);
        if result.is_err() {
            self.state().pending = None;
            let _ = std::fs::remove_file(tmp);
            let _ = std::fs::remove_file(&dest);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn record_steps(
        &self,
        tmp: &Path,
        dest: &Path,
        name: &str,
        at_unix_ns: i64,
        kind: PointKind,
        group: &str,
        size_bytes: u64,
    ) -> Result<PointMeta, Status> {
        File::open(tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err("syncing the recovery point's clone", e))?;
        ember_volume::cow::publish(tmp, dest)
            .map_err(|e| io_err("publishing the recovery point", e))?;
        if let Some(d) = self.ctx.delay_record {
            std::thread::sleep(d);
        }
        let point = PointMeta {
            name: name.to_owned(),
            at_unix_ns,
            kind,
            group: group.to_owned(),
            size_bytes,
            after: Blocks::default(),
        };
        let _io = self.io();
        // As `mutate_index`, by hand: the live point takes over the
        // pending change set in the same critical section that lists it.
        // The written record carries the pending set as of now; what is
        // noted after this is covered by `tail.json` (its writer waits for
        // `io`) before its batch counts as applied.
        let mut next = self.state().index.clone();
        let mut written = point.clone();
        written.after = self.state().pending.clone().unwrap_or_default();
        next.points.push(written);
        self.persist_index(&next)
            .map_err(|e| io_err("recording the recovery point", e))?;
        let tail = {
            let mut st = self.state();
            let after = st.pending.take().unwrap_or_default();
            let mut live = point.clone();
            live.after = after.clone();
            st.index.points.push(live);
            after
        };
        // The new point's change set starts as what was applied since its
        // clone. A crash before this write leaves the previous point's
        // tail on it: a superset of the truth, harmless. A batch noted
        // meanwhile waits for `io`, then finds this tail not covering it
        // and writes its own.
        if ember_volume::fsutil::write_json_atomic(&self.dir.join(TAIL), &tail).is_ok() {
            self.state().tail_persisted = tail;
        }
        Ok(point)
    }

    /// The cheap way to a new point's image, under the apply lock: the
    /// previous point's image was cloned in advance (off the stream's path,
    /// [`Self::prepare_next`]) to `.next-PREV.img`; only the blocks applied
    /// since that point are cloned into it from the volume, so the time
    /// under the lock follows the changes, not the volume's extents. Used
    /// only while few runs changed: one `FICLONERANGE` per run costs about
    /// what one `FICLONE` of a whole unfragmented image does.
    /// `false` (nothing made) when there is no such clone or a clone call
    /// fails: the caller clones the whole volume instead. Does not sync.
    /// Blocking.
    fn take_incremental(&self, tmp: &Path, size_bytes: u64) -> bool {
        let g = self.block_bytes.load(Ordering::Relaxed);
        let (prev, ranges) = {
            let st = self.state();
            match st.index.points.last() {
                Some(p) if p.size_bytes == size_bytes => {
                    (p.name.clone(), p.after.byte_ranges(g, size_bytes))
                }
                _ => return false,
            }
        };
        if ranges.len() > MAX_INCREMENTAL_RUNS {
            return false;
        }
        let next = self.next_path(&prev);
        if std::fs::rename(&next, tmp).is_err() {
            return false;
        }
        let made = (|| -> std::io::Result<()> {
            let src = File::open(&self.data_path)?;
            let dst = OpenOptions::new().write(true).open(tmp)?;
            for &(offset, len) in &ranges {
                ember_volume::cow::reflink_range(&src, offset, len, &dst, offset)?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            tracing::debug!(volume = %self.volume, error = %e, "incremental point clone failed; cloning the whole volume");
            let _ = std::fs::remove_file(tmp);
            return false;
        }
        true
    }

    fn next_path(&self, point: &str) -> PathBuf {
        self.dir.join(format!(".next-{}", image_name(point)))
    }

    /// Clones point `name`'s image to `.next-NAME.img` for the next point
    /// to start from (see [`Self::take_incremental`]); drops older ones.
    /// Blocking; run off the stream's path. A crash leaves only files the
    /// next start removes (`.tmp-…`, unlisted `.img`).
    fn prepare_next(&self, name: &str) {
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}next-{}", image_name(name)));
        let _ = std::fs::remove_file(&tmp);
        let made = {
            let _cloning = self.ctx.cloning();
            ember_volume::cow::reflink_file(&self.image(name), &tmp)
        };
        if made.is_err() || std::fs::rename(&tmp, self.next_path(name)).is_err() {
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        let keep = self.next_path(name);
        let mut stale = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                if f.starts_with(".next-") && e.path() != keep {
                    // Renamed to a temporary first, so a crash while it is
                    // cut down leaves a name the next start removes.
                    let doomed = self.dir.join(format!("{TMP_PREFIX}{f}"));
                    if std::fs::rename(e.path(), &doomed).is_ok() {
                        stale.push(doomed);
                    }
                }
            }
        }
        self.ctx.reap(stale);
    }

    /// Forgets the points named (folding their change sets into the
    /// previous points), then deletes their images off the caller's path.
    fn expire(&self, names: &[String], why: &str) -> Vec<String> {
        if names.is_empty() {
            return Vec::new();
        }
        // Folds the change sets of the expired points into their
        // predecessors (on the copy written, then on the live index).
        let drop_named = |ix: &mut Index| {
            let mut gone = Vec::new();
            for name in names {
                if let Some(i) = ix.points.iter().position(|p| &p.name == name) {
                    gone.push(plan::remove(&mut ix.points, i).name);
                }
            }
            gone
        };
        let gone: Vec<String> = match self.mutate_index(drop_named) {
            Ok(gone) => gone,
            Err(e) => {
                tracing::warn!(volume = %self.volume, error = %e, "cannot record expired recovery points; keeping them");
                return Vec::new();
            }
        };
        if gone.is_empty() {
            return gone;
        }
        let files: Vec<PathBuf> = gone.iter().map(|n| self.image(n)).collect();
        // Detached: deleting a clone frees its unshared extents, which can
        // take a while, and steps aside for clones; nothing waits for it (a
        // crash leaves an unlisted image that the next start removes).
        self.ctx.reap(files);
        for name in &gone {
            tracing::info!(volume = %self.volume, point = %name, why, "recovery point expired");
            self.ctx.publish(
                EventKind::PointExpired,
                &self.volume,
                format!("recovery point {name} expired: {why}"),
            );
        }
        gone
    }

    /// Starts rolling the volume back to point `name`: records the intent
    /// (with `ranges`, what differs from the newest image) and drops the
    /// newer points. The caller then updates the secondary record and
    /// calls [`Self::finish_rollback`]. Blocking.
    fn begin_rollback(&self, name: &str, ranges: &[(u64, u64)]) -> Result<(), Status> {
        {
            let mut st = self.state();
            let Some(i) = st.index.points.iter().position(|p| p.name == name) else {
                return Err(Status::not_found(format!(
                    "recovery point {name} of {} is gone",
                    self.volume
                )));
            };
            let mut next = st.index.clone();
            // The newer points stop being points of this image, but the
            // forced promotion that follows keeps them as snapshots: the
            // operator may have picked too old a point.
            let newer: Vec<PointMeta> = next.points.drain(i + 1..).collect();
            next.superseded.extend(newer);
            next.points[i].after = Blocks::default();
            next.rolling_back_to = Some((name.to_owned(), ranges.to_vec()));
            self.persist_index(&next)
                .map_err(|e| io_err("recording the rollback", e))?;
            st.index = next;
        }
        Ok(())
    }

    /// The rollback a crash interrupted, if any.
    fn pending_rollback(&self) -> Option<PendingRollback> {
        let st = self.state();
        let (name, ranges) = st.index.rolling_back_to.clone()?;
        let at = st
            .index
            .points
            .iter()
            .find(|p| p.name == name)
            .map_or(0, |p| p.at_unix_ns);
        Some(PendingRollback { name, at, ranges })
    }

    /// The idempotent part of a rollback (re-run at start-up after a
    /// crash): clones the point's image over the volume's data, syncs it,
    /// clears the intent. Blocking.
    fn finish_rollback(&self, name: &str) -> std::io::Result<()> {
        let src = File::open(self.image(name))?;
        let dst = OpenOptions::new().write(true).open(&self.data_path)?;
        if src.metadata()?.len() != dst.metadata()?.len() {
            return Err(std::io::Error::other(format!(
                "point {name} holds {} bytes, the volume {}",
                src.metadata()?.len(),
                dst.metadata()?.len()
            )));
        }
        // One FICLONERANGE over the whole file: the volume's blocks now
        // share the point's extents; the kernel drops the stale page cache.
        ember_volume::cow::reflink_range(&src, 0, 0, &dst, 0)?;
        dst.sync_all()?;
        let mut st = self.state();
        let mut next = st.index.clone();
        next.rolling_back_to = None;
        self.persist_index(&next)?;
        st.index = next;
        let _ = ember_volume::fsutil::write_json_atomic(&self.dir.join(TAIL), &Blocks::default());
        st.tail_persisted = Blocks::default();
        Ok(())
    }

    /// Deletes every point and the directory (the volume stopped being a
    /// secondary here). Blocking.
    pub(crate) fn delete_all(&self) {
        self.ctx
            .all
            .lock()
            .expect("points registry lock poisoned")
            .remove(&self.volume);
        self.state().index.points.clear();
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(volume = %self.volume, error = %e, "cannot remove the recovery points");
        }
    }
}

/// A rollback to a point that was begun and not finished.
#[derive(Debug)]
struct PendingRollback {
    /// The point.
    name: String,
    /// Its time (unix ns, primary clock).
    at: i64,
    /// Byte ranges that differ from the newest image.
    ranges: Vec<(u64, u64)>,
}

fn image_name(point: &str) -> String {
    format!("{point}.{IMAGE_EXT}")
}

/// A point being taken: its clone and then its record (fsyncs, rename,
/// `points.json`, retention, space cap) run in this task.
pub(crate) type Recording = tokio::task::JoinHandle<Result<PointMeta, Status>>;

/// Takes a point of `sv` now. The caller holds its `apply_lock` (so no
/// batch is half-applied) and `serial` (the previous point of the volume
/// is recorded); this takes the clone gate and returns at once: the clone
/// runs in the returned task, and batches committed meanwhile are
/// acknowledged and deferred (`apply.rs`) until it ends and the gate is
/// given back. Everything after the clone runs in the task too.
/// Publishes `point-created` or `point-failed`.
async fn take_now(
    sv: &Arc<SecondaryVolume>,
    name: String,
    kind: PointKind,
    serial: tokio::sync::OwnedMutexGuard<()>,
) -> Result<Recording, Status> {
    let points = sv.points.clone();
    let ctx = points.ctx.clone();
    let rec = sv.record();
    let volume = rec.volume.clone();
    if points.state().index.points.iter().any(|p| p.name == name) {
        let status = Status::already_exists(format!(
            "volume {volume} already has a recovery point named {name}"
        ));
        point_failed(&ctx, &volume, &status);
        return Err(status);
    }
    let started = std::time::Instant::now();
    // Free: batches are applied under the `apply_lock` the caller holds,
    // and the previous clone ended before its record, which `serial`
    // waited for.
    let gate = points.clone_gate.clone().lock_owned().await;
    let held = started.elapsed();
    let size = ember_nbd::Export::size(sv.volume.as_ref());
    let at = rec.consistent_at_unix_ns;
    let group = rec.group.clone();
    let sv = sv.clone();
    Ok(tokio::spawn(async move {
        let _serial = serial;
        let cloned = {
            let (points, name) = (points.clone(), name.clone());
            tokio::task::spawn_blocking(move || points.clone_now(&name, size))
                .await
                .map_err(|e| io_err("recovery point task", e))
                .and_then(|r| r)
        };
        // What the stream staged and acknowledged meanwhile, for the log.
        let deferred_bytes = sv
            .staging
            .lock()
            .expect("staging lock poisoned")
            .deferred_bytes();
        drop(gate);
        let clone_time = started.elapsed();
        // The batches acknowledged during the clone: applied by the next
        // commit, or by this drain if none comes.
        super::apply::spawn_drain(sv);
        let (tmp, incremental) = match cloned {
            Ok(made) => made,
            Err(status) => {
                point_failed(&ctx, &volume, &status);
                return Err(status);
            }
        };
        let vp = points.clone();
        let taken = tokio::task::spawn_blocking(move || {
            let p = vp.record(&tmp, &name, at, kind, &group, size)?;
            // The next point starts from a clone of this one, made now
            // while the stream runs (a crash leaves a temporary).
            vp.prepare_next(&p.name);
            Ok(p)
        })
        .await
        .map_err(|e| io_err("recovery point task", e))
        .and_then(|r| r);
        match &taken {
            Ok(p) => {
                tracing::info!(volume = %volume, point = %p.name, at = %rfc3339(at), kind = kind.as_str(), ms = started.elapsed().as_millis() as u64, stream_held_us = held.as_micros() as u64, clone_us = clone_time.as_micros() as u64, deferred_bytes, incremental, "recovery point taken");
                ctx.publish(
                    EventKind::PointCreated,
                    &volume,
                    format!(
                        "recovery point {} ({}) at {}",
                        p.name,
                        kind.as_str(),
                        rfc3339(at)
                    ),
                );
                let schedule = points.schedule();
                let old = plan::expired_by_retention(&points.list(), &schedule, now_unix_ns());
                points.expire(&old, "retention");
                enforce_cap(&ctx);
            }
            Err(status) => point_failed(&ctx, &volume, status),
        }
        taken
    }))
}

fn point_failed(ctx: &PointsCtx, volume: &str, status: &Status) {
    tracing::warn!(volume, error = %status.message(), "recovery point failed");
    ctx.publish(
        EventKind::PointFailed,
        volume,
        format!("recovery point not taken: {}", status.message()),
    );
}

/// Expires points across the data dir until the pinned bytes fit the cap.
fn enforce_cap(ctx: &PointsCtx) {
    let cap = ctx.cap_bytes.load(Ordering::Relaxed);
    let volumes: Vec<Arc<VolumePoints>> = ctx
        .all
        .lock()
        .expect("points registry lock poisoned")
        .values()
        .filter_map(Weak::upgrade)
        .collect();
    let all: Vec<plan::VolumePoints> = volumes
        .iter()
        .map(|v| plan::VolumePoints {
            volume: v.volume.clone(),
            block_bytes: v.block_bytes.load(Ordering::Relaxed),
            points: v.list(),
        })
        .collect();
    let victims = plan::expired_by_cap(&all, cap);
    for v in &volumes {
        let names: Vec<String> = victims
            .iter()
            .filter(|(vol, _)| vol == &v.volume)
            .map(|(_, p)| p.clone())
            .collect();
        v.expire(
            &names,
            &format!("the points' space cap ({cap} bytes) was reached"),
        );
    }
}

/// The apply path committed a batch (or a barrier moved the consistent
/// point): takes a scheduled point if one is due. The caller holds the
/// `apply_lock`. Never waits for anything slow and never fails the stream:
/// a failed point is an event; while the previous point is still being
/// recorded, the next commit tries again.
pub(super) async fn after_commit(sv: &Arc<SecondaryVolume>) {
    let rec = sv.record();
    if !rec.consistent || rec.detached {
        return;
    }
    let at = rec.consistent_at_unix_ns;
    let (schedule, last) = {
        let st = sv.points.state();
        let newest = st
            .index
            .points
            .iter()
            .rev()
            .find(|p| p.kind == PointKind::Scheduled)
            .map(|p| p.at_unix_ns);
        (st.index.schedule, newest.max(st.last_try_at))
    };
    if !plan::due(&schedule, last, at) {
        return;
    }
    let Ok(serial) = sv.points.serial.clone().try_lock_owned() else {
        return;
    };
    sv.points.state().last_try_at = Some(at);
    if !sv.points.ctx.reflink {
        tracing::warn!(volume = %rec.volume, "scheduled recovery point refused: {NO_REFLINK}");
        sv.points.ctx.publish(
            EventKind::PointFailed,
            &rec.volume,
            format!("scheduled recovery point refused: {NO_REFLINK}"),
        );
        return;
    }
    // The record finishes on its own; a failure is an event.
    let _ = take_now(
        sv,
        format!("auto-{}", rfc3339(at)),
        PointKind::Scheduled,
        serial,
    )
    .await;
}

impl SecondarySet {
    fn points_of(&self, volume: &str) -> Result<Arc<SecondaryVolume>, Status> {
        self.get(volume).ok_or_else(|| {
            Status::not_found(format!(
                "volume {volume} is not a secondary on this site (recovery points live on the secondary's site)"
            ))
        })
    }

    /// Sets the space cap of every point in the data dir (bytes pinned).
    pub fn set_points_space_cap(&self, cap_bytes: u64) {
        self.points.cap_bytes.store(cap_bytes, Ordering::Relaxed);
    }

    /// Resolves `sel` among the retained points of secondary `volume`.
    ///
    /// # Errors
    /// `NOT_FOUND` for an unknown volume, an unknown name or a time older
    /// than every retained point (naming the oldest); `INVALID_ARGUMENT`
    /// for a time in the future.
    pub(crate) fn resolve_point(
        &self,
        volume: &str,
        sel: &PointSelector,
    ) -> Result<PointInfo, Status> {
        let sv = self.points_of(volume)?;
        let points = sv.points.list();
        let i = plan::select(&points, sel, now_unix_ns()).map_err(|e| select_status(volume, e))?;
        Ok(sv.points.info(&points[i]))
    }

    /// The retained points of secondary `volume` and its schedule.
    ///
    /// # Errors
    /// `NOT_FOUND` when `volume` is not a secondary here.
    pub fn list_points(&self, volume: &str) -> Result<PointsReport, Status> {
        let sv = self.points_of(volume)?;
        let g = sv.points.block_bytes.load(Ordering::Relaxed);
        let schedule = sv.points.schedule();
        Ok(PointsReport {
            points: sv
                .points
                .list()
                .into_iter()
                .map(|p| PointListing {
                    pinned_bytes: p.after.count() * g,
                    name: p.name,
                    at_unix_ns: p.at_unix_ns,
                    kind: p.kind.as_str(),
                    group: p.group,
                    peer: String::new(),
                })
                .collect(),
            every_secs: schedule.every_secs,
            keep: schedule.keep,
            keep_for_secs: schedule.keep_for_secs,
        })
    }

    /// A manual point of secondary `volume`, taken once the image holds the
    /// primary's writes up to `not_before_unix_ns` (primary clock; 0: now).
    ///
    /// # Errors
    /// `NOT_FOUND` (not a secondary here), `FAILED_PRECONDITION` (no
    /// reflink, inconsistent image, catching up took too long),
    /// `ALREADY_EXISTS`, `INVALID_ARGUMENT` (bad name).
    pub async fn create_point(
        &self,
        volume: &str,
        name: Option<String>,
        not_before_unix_ns: i64,
    ) -> Result<PointListing, Status> {
        let sv = self.points_of(volume)?;
        if let Some(n) = &name
            && !plan::valid_name(n)
        {
            return Err(Status::invalid_argument(format!(
                "bad point name {n:?}: use 1 to 100 of A-Z a-z 0-9 . _ : - (not starting with a dot)"
            )));
        }
        if !self.points.reflink {
            return Err(Status::failed_precondition(NO_REFLINK));
        }
        let deadline = tokio::time::Instant::now() + CATCH_UP_TIMEOUT;
        // The previous point of the volume recorded first (taken before the
        // `apply_lock`, which the stream needs meanwhile), so a default
        // name sees it.
        let mut serial = Some(sv.points.serial.clone().lock_owned().await);
        loop {
            let guard = sv.apply_lock.lock().await;
            let rec = sv.record();
            let past_deadline = tokio::time::Instant::now() >= deadline;
            // A reconnect resends the blocks written meanwhile out of order
            // and leaves the image torn until its commit, usually well
            // under a second: wait that out rather than fail the operator.
            if !rec.consistent && past_deadline {
                return Err(Status::failed_precondition(format!(
                    "secondary {volume} is inconsistent (an initial sync or resync is running); \
                     a point now would be a torn image"
                )));
            }
            if rec.consistent && rec.consistent_at_unix_ns >= not_before_unix_ns {
                let name = name.unwrap_or_else(|| {
                    let st = sv.points.state();
                    plan::default_manual_name(&rfc3339(rec.consistent_at_unix_ns), |n| {
                        st.index.points.iter().any(|p| p.name == n)
                    })
                });
                let serial = serial.take().expect("taken once: the loop returns");
                let recording = take_now(&sv, name, PointKind::Manual, serial).await?;
                drop(guard);
                let p = recording
                    .await
                    .map_err(|e| io_err("recovery point task", e))??;
                let g = sv.points.block_bytes.load(Ordering::Relaxed);
                return Ok(PointListing {
                    pinned_bytes: p.after.count() * g,
                    name: p.name,
                    at_unix_ns: p.at_unix_ns,
                    kind: p.kind.as_str(),
                    group: p.group,
                    peer: String::new(),
                });
            }
            drop(guard);
            if past_deadline {
                return Err(Status::failed_precondition(format!(
                    "secondary {volume} did not apply the primary's writes up to the request within {CATCH_UP_TIMEOUT:?} \
                     (it is at {}); retry when the replica is in sync",
                    rfc3339(rec.consistent_at_unix_ns)
                )));
            }
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
    }

    /// `CreatePoint` from the primary: a manual point once this secondary
    /// holds the primary's writes up to the request.
    ///
    /// # Errors
    /// As [`Self::create_point`]; `FAILED_PRECONDITION` when the caller is
    /// not this secondary's primary.
    pub(crate) async fn create_point_for_peer(
        &self,
        req: ember_proto::repl::v1::PeerCreatePointRequest,
    ) -> Result<ember_proto::repl::v1::PeerCreatePointResponse, Status> {
        let sv = self.points_of(&req.volume)?;
        let rec = sv.record();
        if rec.primary_backend_id != req.primary_backend_id {
            return Err(Status::failed_precondition(format!(
                "volume {} is a secondary of {} here, not of the caller",
                req.volume, rec.primary_site
            )));
        }
        let name = (!req.name.is_empty()).then_some(req.name);
        let p = self
            .create_point(&req.volume, name, req.not_before_unix_ns)
            .await?;
        Ok(ember_proto::repl::v1::PeerCreatePointResponse {
            name: p.name,
            at_unix_ns: p.at_unix_ns,
        })
    }

    /// Rolls secondary `volume` back to the point `sel` means, for a
    /// forced promotion to that point. Stops its stream; records, before
    /// touching the image, the blocks that differ between the point and
    /// the newest image (and any divergent ranges already known) in the
    /// record's `divergent` set, so they are resent whichever way
    /// replication resumes. Returns the point and those byte ranges.
    ///
    /// # Errors
    /// As [`Self::resolve_point`]; `FAILED_PRECONDITION` for a point of
    /// another size; I/O.
    pub(crate) async fn rollback_to_point(
        &self,
        volume: &str,
        sel: &PointSelector,
        prepare: impl FnOnce(&[(u64, u64)]) -> Result<(), Status>,
    ) -> Result<(PointInfo, Vec<(u64, u64)>), Status> {
        let sv = self.points_of(volume)?;
        sv.session.fetch_add(1, Ordering::SeqCst);
        // A point still being recorded would land after the rollback (and
        // `serial` comes before the `apply_lock`, as in `create_point`).
        let _serial = sv.points.serial.lock().await;
        let _guard = sv.apply_lock.lock().await;
        // Batches acknowledged but deferred belong to the newest image:
        // applied (and noted in the change sets) before the rollback
        // computes what differs from the point.
        super::apply::settle(&sv).await?;
        sv.reset_staging()?;
        let points = sv.points.list();
        let i = plan::select(&points, sel, now_unix_ns()).map_err(|e| select_status(volume, e))?;
        let point = points[i].clone();
        let size = ember_nbd::Export::size(sv.volume.as_ref());
        if point.size_bytes != size {
            return Err(Status::failed_precondition(format!(
                "recovery point {} of {volume} holds {} bytes and the volume {size} (it was resized since)",
                point.name, point.size_bytes
            )));
        }
        let g = sv.points.block_bytes.load(Ordering::Relaxed);
        let mut changed = plan::changes_since(&points, i);
        for &(offset, len) in &sv.record().divergent {
            changed.insert_bytes(offset, len, g);
        }
        let ranges = changed.byte_ranges(g, size);
        // Durable before the image changes, in order: the new primary's
        // change set (the caller's), the intent, the record.
        prepare(&ranges)?;
        sv.points.begin_rollback(&point.name, &ranges)?;
        finish_pending(&sv).await?;
        tracing::warn!(volume, point = %point.name, at = %rfc3339(point.at_unix_ns), changed_bytes = ranges.iter().map(|r| r.1).sum::<u64>(), "secondary rolled back to a recovery point");
        Ok((sv.points.info(&point), ranges))
    }

    /// The points of a consistency group's members here: the one time
    /// every member holds a point at that `sel` means.
    ///
    /// # Errors
    /// `NOT_FOUND` / `INVALID_ARGUMENT` as [`Self::resolve_point`].
    pub(crate) fn resolve_group_point(
        &self,
        group: &str,
        members: &[String],
        sel: &PointSelector,
    ) -> Result<i64, Status> {
        let lists: Vec<Vec<PointMeta>> = members
            .iter()
            .map(|m| self.points_of(m).map(|sv| sv.points.list()))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&[PointMeta]> = lists.iter().map(Vec::as_slice).collect();
        plan::select_common(&refs, sel, now_unix_ns())
            .map_err(|e| select_status(&format!("group {group}"), e))
    }

    /// Drops the points of `volume` (it stopped being a secondary here).
    pub(crate) fn delete_points(&self, volume: &str) {
        let dir = self.points.root.join(volume);
        self.points
            .all
            .lock()
            .expect("points registry lock poisoned")
            .remove(volume);
        if dir.exists() {
            tokio::task::spawn_blocking(move || {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove recovery points");
                }
            });
        }
    }

    /// Removes the points directories of volumes that are no longer
    /// secondaries here (a promotion finished, a crash cut its cleanup).
    pub(super) fn clean_orphan_points(&self) {
        let Ok(entries) = std::fs::read_dir(&self.points.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if self.get(&name).is_none() {
                tracing::info!(volume = %name, "removing recovery points of a volume that is no longer a secondary here");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Finishes a rollback to a point that was begun (by a promotion, or
/// before a crash): the record says "consistent at the point, resend these
/// ranges", then the point's image replaces the volume's. Idempotent.
pub(super) async fn finish_pending(sv: &SecondaryVolume) -> Result<(), Status> {
    let Some(PendingRollback { name, at, ranges }) = sv.points.pending_rollback() else {
        return Ok(());
    };
    sv.update(|r| {
        r.consistent = true;
        r.consistent_at_unix_ns = at;
        let mut all = r.divergent.clone();
        all.extend_from_slice(&ranges);
        all.sort_unstable();
        all.dedup();
        r.divergent = all;
    })?;
    let vp = sv.points.clone();
    tokio::task::spawn_blocking(move || vp.finish_rollback(&name))
        .await
        .map_err(|e| io_err("rollback task", e))?
        .map_err(|e| io_err("rolling the volume back to the recovery point", e))
}

/// The default space cap for a data dir whose file system holds
/// `total_bytes`.
pub fn default_space_cap(total_bytes: u64) -> u64 {
    total_bytes / 100 * DEFAULT_SPACE_CAP_PERCENT
}

/// The schedule an `OpenReplica` carries.
pub(super) fn schedule_of(req: &ember_proto::repl::v1::OpenReplicaRequest) -> Schedule {
    Schedule {
        every_secs: req.points_every_seconds,
        keep: req.keep_points,
        keep_for_secs: req.keep_for_seconds,
    }
}

/// `Path` of the points root under a secondary dir.
pub(super) fn root(secondary_dir: &Path) -> PathBuf {
    secondary_dir.join("points")
}
