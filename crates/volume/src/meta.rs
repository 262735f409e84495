//! Persisted metadata. These are on-disk formats: add fields with
//! `#[serde(default)]`, never rename or repurpose one.

use serde::{Deserialize, Serialize};

/// `volumes/<name>/volume.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Volume name (also the directory name).
    pub name: String,
    /// Size in bytes, a multiple of 4096.
    pub size_bytes: u64,
    /// Dirty-bitmap granularity chosen at creation.
    pub tracking_granularity_bytes: u64,
    /// Creation time, seconds since the epoch.
    pub created_at_unix: i64,
    /// `"snapshot:VOL@SNAP"`, `"volume:VOL"` or empty.
    #[serde(default)]
    pub origin: String,
    /// Raw block device holding the data, for volumes named in the agent
    /// config; `None` for the usual sparse `data.img`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_device: Option<std::path::PathBuf>,
}

/// `volumes/<name>/snapshots/<snap>/snapshot.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Snapshot name.
    pub name: String,
    /// Volume size when the snapshot was taken.
    pub size_bytes: u64,
    /// Creation time, seconds since the epoch.
    pub created_at_unix: i64,
}
