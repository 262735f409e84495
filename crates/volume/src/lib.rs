//! Volumes and the store that owns them.
//!
//! - [`Volume`]: one export's data path. Owns the ordering of a write:
//!   mark dirty and pin activity-log extents → make the log record durable
//!   if needed → write data → unpin. Implements [`ember_nbd::Export`].
//! - [`VolumeStore`]: the data dir: create / delete / resize / list,
//!   snapshots and clones, with crash-safe metadata (write-temp, fsync,
//!   rename, fsync dir) and cleanup of interrupted operations at start.

mod copy;
pub mod cow;
mod error;
pub mod fsutil;
mod meta;
mod replication;
mod snaprec;
mod store;
mod volume;

pub use cow::SnapshotMethod;
pub use error::{Result, StoreError};
pub use meta::{SnapshotMeta, VolumeMeta};
pub use replication::{AckWait, Change, ReplicationHook};
pub use snaprec::Barrier;
pub use store::{
    Capacity, RawVolume, Source, StoreConfig, VolumeStore, parse_snapshot, parse_volume,
};
pub use volume::Volume;
