//! Block-level change tracking for one volume, crash-safe.
//!
//! Three pieces, in the style of DRBD's bitmap + activity log:
//! - [`Bitmap`]: one bit per `granularity` bytes; a set bit means "this block
//!   may differ from the last clean point" (the replica, a backup).
//! - the on-disk bitmap file, updated lazily (only when an extent leaves the
//!   activity log, on checkpoint clears and on clean shutdown);
//! - the activity log ([`ActivityLog`]): the set of "hot" extents (4 MiB by
//!   default) that may hold writes not yet reflected in the on-disk bitmap.
//!   A write to a cold extent waits until a log record naming that extent is
//!   durable; writes to hot extents cost no metadata I/O at all.
//!
//! After a crash, the recovered dirty set is the on-disk bitmap plus every
//! block of every extent in the newest valid log record: it covers every
//! write since the last clean point and exceeds it by at most the log window
//! (`al_extents × al_extent_bytes`). See `docs/tracking.md`.
//!
//! This crate does blocking file I/O and never spawns threads or touches an
//! async runtime; callers run [`Tracker::commit`] off their reactor.

mod activity_log;
mod bitmap;
mod bitmap_file;
mod error;
mod tracker;

pub use activity_log::{ActivityLog, AlRecord, MAX_RECORD_EXTENTS};
pub use bitmap::Bitmap;
pub use error::{Result, TrackingError};
pub use tracker::{
    Admission, Checkpoint, ConsumerCheckpoint, DirtyReport, Tracker, TrackingConfig,
};
