//! [`VolumeStore`]: the data dir and every volume in it.
//!
//! Layout:
//! ```text
//! DATA/backend-id                       stable identity of this agent
//! DATA/volumes/NAME/volume.json         VolumeMeta (atomic replace)
//! DATA/volumes/NAME/data.img            sparse data file
//! DATA/volumes/NAME/dirty.bitmap        change tracking (ember-tracking)
//! DATA/volumes/NAME/activity.log
//! DATA/volumes/NAME/snapshots/SNAP/data.img   its record in an xattr (older: snapshot.json)
//! DATA/volumes/.creating-*, .deleting-* interrupted operations, removed at start
//! DATA/volumes/NAME/snapshots/.creating-*, .deleting-*   likewise
//! ```
//! Creation builds everything in `.creating-NAME` and renames it into place;
//! deletion renames to `.deleting-NAME` first. Either way a crash leaves the
//! object wholly present or wholly absent.
//!
//! Snapshot and clone cost depends on [`VolumeStore::snapshot_method`],
//! probed once at open (`cow::detect`): with `Reflink` one `FICLONE` of the
//! quiesced data file (O(extents), no data space until overwritten); with
//! `Copy` a sparse copy of the allocated bytes (`copy_file_range` over
//! `SEEK_DATA` runs) during which writes continue and pause only for the
//! final delta (`copy::copy_live`). Snapshots go through
//! `snapshots/.creating-SNAP` exactly like volumes, and `open` removes those
//! leftovers too. See `docs/volumes.md`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ember_common::{SECTOR_BYTES, SnapshotName, VolumeName};
use ember_nbd::Export;
use ember_storage::{FileDevice, IoEngine};
use ember_tracking::{Tracker, TrackingConfig};

use crate::copy::{CloneSync, clone_frozen, clone_live};
use crate::cow::{self, SnapshotMethod};
use crate::error::{Result, StoreError, io};
use crate::fsutil::{now_unix, read_json, sync_dir, write_atomic, write_json_atomic};
use crate::meta::{SnapshotMeta, VolumeMeta};
use crate::snaprec::{self, Barrier};
use crate::volume::Volume;

const DATA_FILE: &str = "data.img";
const VOLUME_META: &str = "volume.json";
const SNAPSHOTS_DIR: &str = "snapshots";

/// How the store is set up.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The data dir.
    pub root: PathBuf,
    /// Change tracking defaults; `None` turns tracking off (benchmarks only:
    /// without it a crash forces a full resync).
    pub tracking: Option<TrackingConfig>,
    /// Volumes backed by raw block devices, named in the agent config.
    pub raw_volumes: Vec<RawVolume>,
}

/// A volume whose data lives on a raw block device instead of a sparse file.
/// Its metadata and tracking state still live in the data dir. It cannot be
/// deleted or resized through the API while it is named in the config: the
/// device belongs to the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawVolume {
    /// Volume (and export) name.
    pub name: VolumeName,
    /// The block device (or any pre-sized file), e.g. `/dev/disk/by-id/…`.
    pub device: PathBuf,
}

/// Where a copy's bytes come from.
#[derive(Debug)]
struct ResolvedSource {
    path: PathBuf,
    size_bytes: u64,
    /// Set when the source is a live volume whose writes must pause.
    live: Option<Arc<Volume>>,
}

/// File-system capacity of the data dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Total bytes.
    pub total_bytes: u64,
    /// Bytes available to us.
    pub free_bytes: u64,
}

/// Where a new volume's contents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// All zeros.
    Empty,
    /// A copy of a snapshot.
    Snapshot(VolumeName, SnapshotName),
    /// A point-in-time copy of another volume.
    Volume(VolumeName),
}

impl Source {
    fn origin(&self) -> String {
        match self {
            Self::Empty => String::new(),
            Self::Snapshot(v, s) => format!("snapshot:{v}@{s}"),
            Self::Volume(v) => format!("volume:{v}"),
        }
    }
}

/// All volumes of one agent.
#[derive(Debug)]
pub struct VolumeStore {
    config: StoreConfig,
    engine: IoEngine,
    backend_id: String,
    volumes: Mutex<BTreeMap<String, (VolumeMeta, Arc<Volume>)>>,
    snapshot_exports: Mutex<HashMap<String, Arc<Volume>>>,
    /// Serialises control-plane mutations (create, delete, resize, snapshot).
    ops: tokio::sync::Mutex<()>,
    /// How snapshots and clones are made here; probed once at open.
    snapshot_method: SnapshotMethod,
    /// How a new snapshot is made durable here; from the file-system type.
    barrier: Barrier,
}

impl VolumeStore {
    /// Opens the data dir, creating it if needed, removing leftovers of
    /// interrupted operations and recovering every volume's tracking state.
    ///
    /// # Errors
    /// I/O errors, corrupt metadata, tracking recovery failures.
    pub fn open(config: StoreConfig, engine: IoEngine) -> Result<Self> {
        let vols = config.root.join("volumes");
        std::fs::create_dir_all(&vols).map_err(io("create data dir", &vols))?;
        let id_path = config.root.join("backend-id");
        let backend_id = match std::fs::read_to_string(&id_path) {
            Ok(id) => id.trim().to_owned(),
            Err(_) => {
                let id = generate_backend_id();
                write_atomic(&id_path, id.as_bytes())?;
                id
            }
        };
        let mut volumes = BTreeMap::new();
        for entry in std::fs::read_dir(&vols).map_err(io("list volumes", &vols))? {
            let entry = entry.map_err(io("list volumes", &vols))?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if is_leftover(&file_name) {
                tracing::info!(path = %entry.path().display(), "removing leftover of an interrupted operation");
                std::fs::remove_dir_all(entry.path())
                    .map_err(io("remove leftover", &entry.path()))?;
                continue;
            }
            remove_leftovers(&entry.path().join(SNAPSHOTS_DIR))?;
            let meta: VolumeMeta = read_json(&entry.path().join(VOLUME_META))?;
            let volume = open_volume(&entry.path(), &meta, &config, &engine)?;
            volumes.insert(meta.name.clone(), (meta, Arc::new(volume)));
        }
        for raw in &config.raw_volumes {
            let (meta, volume) = adopt_raw_volume(
                &vols,
                raw,
                volumes.remove(raw.name.as_str()),
                &config,
                &engine,
            )?;
            volumes.insert(meta.name.clone(), (meta, volume));
        }
        sync_dir(&vols)?;
        remove_probe_leftovers(&config.root)?;
        let snapshot_method = cow::detect(&config.root);
        let barrier = snaprec::detect_barrier(&config.root);
        tracing::info!(volumes = volumes.len(), root = %config.root.display(), %backend_id, %snapshot_method, snapshot_barrier = %barrier.as_str(), "volume store opened");
        Ok(Self {
            config,
            engine,
            backend_id,
            volumes: Mutex::new(volumes),
            snapshot_exports: Mutex::new(HashMap::new()),
            ops: tokio::sync::Mutex::new(()),
            snapshot_method,
            barrier,
        })
    }

    /// How this store makes snapshots and clones: `Reflink` when the data
    /// dir's file system shares extents (probed once at [`VolumeStore::open`]),
    /// else `Copy`.
    pub fn snapshot_method(&self) -> SnapshotMethod {
        self.snapshot_method
    }

    /// Stable identity of this data dir.
    pub fn backend_id(&self) -> &str {
        &self.backend_id
    }

    /// The I/O engine in use.
    pub fn engine(&self) -> &IoEngine {
        &self.engine
    }

    /// Whether change tracking is on.
    pub fn tracking_enabled(&self) -> bool {
        self.config.tracking.is_some()
    }

    /// Directory of volume `name` (its metadata and tracking files).
    pub fn volume_dir(&self, name: &str) -> PathBuf {
        self.volumes_dir().join(name)
    }

    fn volumes_dir(&self) -> PathBuf {
        self.config.root.join("volumes")
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (VolumeMeta, Arc<Volume>)>> {
        self.volumes
            .lock()
            .expect("volume map lock poisoned by a panic")
    }

    /// The live volume called `name`.
    pub fn get(&self, name: &str) -> Option<(VolumeMeta, Arc<Volume>)> {
        self.map().get(name).cloned()
    }

    /// Every volume, by name.
    pub fn list(&self) -> Vec<(VolumeMeta, Arc<Volume>)> {
        self.map().values().cloned().collect()
    }

    /// Looks up a volume, or `VOLUME@SNAPSHOT` for a read-only snapshot.
    pub fn export(&self, name: &str) -> Option<Arc<Volume>> {
        if let Some((vol, snap)) = name.split_once('@') {
            return self.snapshot_export(vol, snap).ok();
        }
        self.map().get(name).map(|(_, v)| v.clone())
    }

    fn snapshot_export(&self, vol: &str, snap: &str) -> Result<Arc<Volume>> {
        let key = format!("{vol}@{snap}");
        if let Some(v) = self
            .snapshot_exports
            .lock()
            .expect("snapshot map lock")
            .get(&key)
        {
            return Ok(v.clone());
        }
        let vol = parse_volume(vol)?;
        let snap = parse_snapshot(snap)?;
        let dir = self.snapshot_dir(&vol, &snap);
        let meta = snaprec::read(&dir).map_err(|_| not_found_snapshot(&vol, &snap))?;
        let device = FileDevice::open(&dir.join(DATA_FILE), true, self.engine.clone())?;
        let export = Arc::new(Volume::new(
            key.clone(),
            device,
            None,
            meta.size_bytes,
            true,
        ));
        self.snapshot_exports
            .lock()
            .expect("snapshot map lock")
            .insert(key, export.clone());
        Ok(export)
    }

    fn snapshot_dir(&self, vol: &VolumeName, snap: &SnapshotName) -> PathBuf {
        self.volumes_dir()
            .join(vol.as_str())
            .join(SNAPSHOTS_DIR)
            .join(snap.as_str())
    }

    /// Creates a volume. Idempotent: the same name, size and source return
    /// the existing volume with `created == false`.
    ///
    /// # Errors
    /// `InvalidArgument` for sizes that are zero or not multiples of 4 KiB,
    /// `AlreadyExists` when the name is taken by a different spec,
    /// `NotFound` for a missing source, `Io`/`Storage` on disk errors
    /// (including a full disk, after which nothing is left behind).
    pub async fn create(
        &self,
        name: &str,
        size_bytes: u64,
        granularity: Option<u64>,
        source: Source,
    ) -> Result<(VolumeMeta, Arc<Volume>, bool)> {
        let name = parse_volume(name)?;
        let _op = self.ops.lock().await;
        let origin = source.origin();
        if let Some((meta, vol)) = self.get(name.as_str()) {
            let same_size = size_bytes == 0 || meta.size_bytes == size_bytes;
            if same_size && meta.origin == origin {
                return Ok((meta, vol, false));
            }
            return Err(StoreError::AlreadyExists {
                what: "volume",
                name: name.to_string(),
                detail: format!(
                    "existing: {} bytes from {:?}; requested: {size_bytes} bytes from {origin:?}",
                    meta.size_bytes, meta.origin
                ),
            });
        }
        let tracking = self.tracking_for(granularity)?;
        let resolved = self.resolve_source(&source)?;
        let source_size = resolved.as_ref().map(|r| r.size_bytes);
        let size_bytes = match (size_bytes, source_size) {
            (0, Some(s)) => s,
            (0, None) => {
                return Err(StoreError::InvalidArgument(
                    "size_bytes must be greater than zero".into(),
                ));
            }
            (n, Some(s)) if n < s => {
                return Err(StoreError::InvalidArgument(format!(
                    "size {n} is smaller than the source ({s} bytes)"
                )));
            }
            (n, _) => n,
        };
        check_size(size_bytes)?;

        let vols = self.volumes_dir();
        let tmp = vols.join(format!(".creating-{name}"));
        let _ = std::fs::remove_dir_all(&tmp);
        let method = self.snapshot_method;
        let result = async {
            std::fs::create_dir(&tmp).map_err(io("create volume dir", &tmp))?;
            cow::fault_pause("dir").await;
            let data = tmp.join(DATA_FILE);
            let how = match &resolved {
                Some(ResolvedSource {
                    live: Some(vol), ..
                }) => {
                    // Clone of a live volume: a point in time.
                    Some(clone_live(vol, &data, size_bytes, method, CloneSync::Now).await?)
                }
                Some(ResolvedSource {
                    path, live: None, ..
                }) => Some(clone_frozen(path, &data, size_bytes, method).await?),
                None => {
                    FileDevice::create(&data, size_bytes, self.engine.clone())?;
                    None
                }
            };
            cow::fault_pause("data").await;
            let meta = VolumeMeta {
                name: name.to_string(),
                size_bytes,
                tracking_granularity_bytes: tracking.map_or(0, |t| t.granularity_bytes),
                created_at_unix: now_unix(),
                origin: origin.clone(),
                backing_device: None,
            };
            write_json_atomic(&tmp.join(VOLUME_META), &meta)?;
            cow::fault_pause("meta").await;
            let dest = vols.join(name.as_str());
            cow::publish(&tmp, &dest)?;
            cow::fault_pause("published").await;
            Ok::<_, StoreError>((meta, dest, how))
        }
        .await;
        let (meta, dest, how) = match result {
            Ok(ok) => ok,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let volume = Arc::new(open_volume(&dest, &meta, &self.config, &self.engine)?);
        self.map()
            .insert(meta.name.clone(), (meta.clone(), volume.clone()));
        let method = how.map_or("none", SnapshotMethod::as_str);
        tracing::info!(volume_id = %name, size_bytes, origin = %origin, method, "volume created");
        Ok((meta, volume, true))
    }

    fn tracking_for(&self, granularity: Option<u64>) -> Result<Option<TrackingConfig>> {
        let Some(mut t) = self.config.tracking else {
            return Ok(None);
        };
        if let Some(g) = granularity.filter(|g| *g != 0) {
            t.granularity_bytes = g;
            t.al_extent_bytes = t.al_extent_bytes.max(g);
        }
        t.validate()
            .map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
        Ok(Some(t))
    }

    fn resolve_source(&self, source: &Source) -> Result<Option<ResolvedSource>> {
        match source {
            Source::Empty => Ok(None),
            Source::Snapshot(vol, snap) => {
                let dir = self.snapshot_dir(vol, snap);
                let meta = snaprec::read(&dir).map_err(|_| not_found_snapshot(vol, snap))?;
                Ok(Some(ResolvedSource {
                    path: dir.join(DATA_FILE),
                    size_bytes: meta.size_bytes,
                    live: None,
                }))
            }
            Source::Volume(vol) => {
                let (meta, volume) = self
                    .get(vol.as_str())
                    .ok_or_else(|| not_found_volume(vol.as_str()))?;
                Ok(Some(ResolvedSource {
                    path: volume.device().path().to_owned(),
                    size_bytes: meta.size_bytes,
                    live: Some(volume),
                }))
            }
        }
    }

    fn is_configured_raw(&self, name: &str) -> bool {
        self.config
            .raw_volumes
            .iter()
            .any(|r| r.name.as_str() == name)
    }

    /// Deletes a volume and its snapshots. Returns false when it did not exist.
    ///
    /// # Errors
    /// `FailedPrecondition` while NBD clients are attached; I/O errors.
    pub async fn delete(&self, name: &str) -> Result<bool> {
        let name = parse_volume(name)?;
        let _op = self.ops.lock().await;
        let Some((_, volume)) = self.get(name.as_str()) else {
            return Ok(false);
        };
        if self.is_configured_raw(name.as_str()) {
            return Err(StoreError::FailedPrecondition(format!(
                "volume {name} is a raw device named in the agent config; remove it there and restart to release it"
            )));
        }
        let attached = volume.connections() + self.snapshot_connections(name.as_str());
        if attached > 0 {
            return Err(StoreError::FailedPrecondition(format!(
                "volume {name} has {attached} NBD connection(s) attached; detach them first"
            )));
        }
        let vols = self.volumes_dir();
        let doomed = vols.join(format!(".deleting-{name}"));
        std::fs::rename(vols.join(name.as_str()), &doomed)
            .map_err(io("unpublish volume", &doomed))?;
        sync_dir(&vols)?;
        self.map().remove(name.as_str());
        self.snapshot_exports
            .lock()
            .expect("snapshot map lock")
            .retain(|k, _| !k.starts_with(&format!("{name}@")));
        std::fs::remove_dir_all(&doomed).map_err(io("remove volume", &doomed))?;
        tracing::info!(volume_id = %name, "volume deleted");
        Ok(true)
    }

    fn snapshot_connections(&self, vol: &str) -> u32 {
        let prefix = format!("{vol}@");
        self.snapshot_exports
            .lock()
            .expect("snapshot map lock")
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.connections())
            .sum()
    }

    /// Grows a volume. Same size is a no-op; shrinking is refused.
    ///
    /// # Errors
    /// `NotFound`, `InvalidArgument` (alignment), `FailedPrecondition` (shrink).
    pub async fn resize(&self, name: &str, size_bytes: u64) -> Result<VolumeMeta> {
        let name = parse_volume(name)?;
        check_size(size_bytes)?;
        let _op = self.ops.lock().await;
        let (mut meta, volume) = self
            .get(name.as_str())
            .ok_or_else(|| not_found_volume(name.as_str()))?;
        if meta.backing_device.is_some() {
            return Err(StoreError::FailedPrecondition(format!(
                "volume {name} is a raw device; its size follows the device (grow the device and restart the agent)"
            )));
        }
        if size_bytes < meta.size_bytes {
            return Err(StoreError::FailedPrecondition(format!(
                "volume {name} is {} bytes; shrinking to {size_bytes} would lose data and is not supported",
                meta.size_bytes
            )));
        }
        if size_bytes == meta.size_bytes {
            return Ok(meta);
        }
        volume.device().set_len(size_bytes)?;
        if let Some(t) = volume.tracker() {
            t.resize(size_bytes)?;
        }
        meta.size_bytes = size_bytes;
        write_json_atomic(
            &self.volumes_dir().join(name.as_str()).join(VOLUME_META),
            &meta,
        )?;
        volume.set_size(size_bytes);
        self.map().insert(meta.name.clone(), (meta.clone(), volume));
        tracing::info!(volume_id = %name, size_bytes, "volume resized");
        Ok(meta)
    }

    /// Deletes a snapshot; false when it did not exist.
    ///
    /// # Errors
    /// `FailedPrecondition` while it is exported to clients; I/O errors.
    pub async fn delete_snapshot(&self, vol: &str, snap: &str) -> Result<bool> {
        let vol = parse_volume(vol)?;
        let snap = parse_snapshot(snap)?;
        let _op = self.ops.lock().await;
        let dir = self.snapshot_dir(&vol, &snap);
        if !dir.exists() {
            return Ok(false);
        }
        let key = format!("{vol}@{snap}");
        {
            let mut exports = self.snapshot_exports.lock().expect("snapshot map lock");
            if let Some(e) = exports.get(&key)
                && e.connections() > 0
            {
                return Err(StoreError::FailedPrecondition(format!(
                    "snapshot {key} has {} NBD connection(s) attached",
                    e.connections()
                )));
            }
            exports.remove(&key);
        }
        let parent = dir.parent().expect("snapshot dir has a parent").to_owned();
        let doomed = parent.join(format!(".deleting-{snap}"));
        std::fs::rename(&dir, &doomed).map_err(io("unpublish snapshot", &dir))?;
        sync_dir(&parent)?;
        std::fs::remove_dir_all(&doomed).map_err(io("remove snapshot", &doomed))?;
        tracing::info!(volume_id = %vol, snapshot = %snap, "snapshot deleted");
        Ok(true)
    }

    /// Snapshots of a volume, with their allocated bytes.
    ///
    /// # Errors
    /// `NotFound` for the volume; I/O errors.
    pub fn list_snapshots(&self, vol: &str) -> Result<Vec<(SnapshotMeta, u64)>> {
        let vol = parse_volume(vol)?;
        if self.get(vol.as_str()).is_none() {
            return Err(not_found_volume(vol.as_str()));
        }
        let dir = self.volumes_dir().join(vol.as_str()).join(SNAPSHOTS_DIR);
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(out);
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let meta = snaprec::read(&entry.path())?;
            let allocated = std::fs::metadata(entry.path().join(DATA_FILE))
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            out.push((meta, allocated));
        }
        out.sort_by(|a, b| {
            a.0.created_at_unix
                .cmp(&b.0.created_at_unix)
                .then(a.0.name.cmp(&b.0.name))
        });
        Ok(out)
    }

    /// File-system capacity of the data dir.
    pub fn capacity(&self) -> Capacity {
        let path = std::ffi::CString::new(self.config.root.as_os_str().as_encoded_bytes())
            .expect("data dir path has no NUL");
        // SAFETY: statvfs writes into a zeroed local struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Capacity {
                total_bytes: 0,
                free_bytes: 0,
            };
        }
        Capacity {
            total_bytes: st.f_blocks * st.f_frsize,
            free_bytes: st.f_bavail * st.f_frsize,
        }
    }

    /// Clean shutdown: flushes data and persists every tracker's bitmap with
    /// an empty activity log. Call after NBD connections have drained.
    pub async fn shutdown(&self) {
        for (meta, volume) in self.list() {
            if let Err(e) = volume.flush().await {
                tracing::error!(volume_id = %meta.name, error = %e, "flush at shutdown failed");
            }
            if let Some(t) = volume.tracker().cloned() {
                let name = meta.name.clone();
                match tokio::task::spawn_blocking(move || t.persist_clean()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(volume_id = %name, error = %e, "persisting tracking state failed; next start recovers from the activity log")
                    }
                    Err(e) => tracing::error!(volume_id = %name, error = %e, "persist task failed"),
                }
            }
        }
        tracing::info!("volume store shut down cleanly");
    }
}

/// Removes `.creating-*` / `.deleting-*` entries of interrupted snapshot
/// creations and deletions from a volume's snapshots dir (which may not
/// exist), then fsyncs it.
fn remove_leftovers(snapshots: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(snapshots) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("list snapshots", snapshots)(e)),
    };
    let mut removed = false;
    for entry in entries {
        let entry = entry.map_err(io("list snapshots", snapshots))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_leftover(&name) {
            tracing::info!(path = %entry.path().display(), "removing leftover of an interrupted snapshot operation");
            std::fs::remove_dir_all(entry.path()).map_err(io("remove leftover", &entry.path()))?;
            removed = true;
        }
    }
    if removed {
        sync_dir(snapshots)?;
    }
    Ok(())
}

/// Whether a directory entry is the leftover of an interrupted create or
/// delete (never a published object: their names cannot start with a dot).
fn is_leftover(name: &str) -> bool {
    name.starts_with(".creating-") || name.starts_with(".deleting-")
}

/// Removes files a reflink probe ([`cow::detect`]) left when the agent died
/// mid-probe.
fn remove_probe_leftovers(root: &Path) -> Result<()> {
    for entry in std::fs::read_dir(root).map_err(io("list data dir", root))? {
        let entry = entry.map_err(io("list data dir", root))?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(cow::PROBE_PREFIX)
        {
            std::fs::remove_file(entry.path()).map_err(io("remove probe", &entry.path()))?;
        }
    }
    Ok(())
}

fn open_volume(
    dir: &Path,
    meta: &VolumeMeta,
    config: &StoreConfig,
    engine: &IoEngine,
) -> Result<Volume> {
    let path = meta
        .backing_device
        .clone()
        .unwrap_or_else(|| dir.join(DATA_FILE));
    let device = FileDevice::open(&path, false, engine.clone())?;
    let tracker = match config.tracking {
        Some(mut t) => {
            if meta.tracking_granularity_bytes != 0 {
                t.granularity_bytes = meta.tracking_granularity_bytes;
                t.al_extent_bytes = t.al_extent_bytes.max(t.granularity_bytes);
            }
            Some(Arc::new(Tracker::open(dir, meta.size_bytes, t)?))
        }
        None => None,
    };
    Ok(Volume::new(
        meta.name.clone(),
        device,
        tracker,
        meta.size_bytes,
        false,
    ))
}

/// Registers (first start) or re-opens a raw-device volume named in config.
fn adopt_raw_volume(
    vols: &Path,
    raw: &RawVolume,
    existing: Option<(VolumeMeta, Arc<Volume>)>,
    config: &StoreConfig,
    engine: &IoEngine,
) -> Result<(VolumeMeta, Arc<Volume>)> {
    let device = FileDevice::open(&raw.device, false, engine.clone())?;
    let size = device.size_bytes()? / SECTOR_BYTES * SECTOR_BYTES;
    if size == 0 {
        return Err(StoreError::InvalidArgument(format!(
            "raw device {} for volume {} is empty",
            raw.device.display(),
            raw.name
        )));
    }
    let dir = vols.join(raw.name.as_str());
    let mut meta = match existing {
        Some((meta, _)) if meta.backing_device.as_deref() != Some(raw.device.as_path()) => {
            return Err(StoreError::FailedPrecondition(format!(
                "volume {} already exists backed by {:?}; the config names {}",
                raw.name,
                meta.backing_device,
                raw.device.display()
            )));
        }
        Some((meta, _)) => meta,
        None => {
            std::fs::create_dir_all(&dir).map_err(io("create volume dir", &dir))?;
            VolumeMeta {
                name: raw.name.to_string(),
                size_bytes: size,
                tracking_granularity_bytes: config.tracking.map_or(0, |t| t.granularity_bytes),
                created_at_unix: now_unix(),
                origin: String::new(),
                backing_device: Some(raw.device.clone()),
            }
        }
    };
    if meta.size_bytes != size {
        tracing::info!(volume_id = %raw.name, from = meta.size_bytes, to = size, "raw device size changed");
        meta.size_bytes = size;
    }
    write_json_atomic(&dir.join(VOLUME_META), &meta)?;
    let volume = Arc::new(open_volume(&dir, &meta, config, engine)?);
    tracing::info!(volume_id = %raw.name, device = %raw.device.display(), size_bytes = size, "raw device volume ready");
    Ok((meta, volume))
}

fn generate_backend_id() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom fills the local buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = t.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(SECTOR_BYTES) {
        return Err(StoreError::InvalidArgument(format!(
            "size {size} must be a positive multiple of {SECTOR_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Parses and validates a volume name.
///
/// # Errors
/// `InvalidName`.
pub fn parse_volume(name: &str) -> Result<VolumeName> {
    VolumeName::new(name).map_err(|source| StoreError::InvalidName {
        what: "volume",
        source,
    })
}

/// Parses and validates a snapshot name.
///
/// # Errors
/// `InvalidName`.
pub fn parse_snapshot(name: &str) -> Result<SnapshotName> {
    SnapshotName::new(name).map_err(|source| StoreError::InvalidName {
        what: "snapshot",
        source,
    })
}

fn not_found_volume(name: &str) -> StoreError {
    StoreError::NotFound {
        what: "volume",
        name: name.to_owned(),
    }
}

fn not_found_snapshot(vol: &VolumeName, snap: &SnapshotName) -> StoreError {
    StoreError::NotFound {
        what: "snapshot",
        name: format!("{vol}@{snap}"),
    }
}

// DR drills publish a prepared image (B2).
mod import;
// Taking a snapshot, and keeping a recovery point as one.
mod snapshot;

#[cfg(test)]
mod tests;
