//! Errors of the tracking layer.

use std::path::PathBuf;

/// Everything that can go wrong while tracking changes.
#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// Reading or writing a tracking file failed.
    #[error("tracking file {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tracking file exists but is not one of ours or does not match the volume.
    #[error("tracking file {path} is unusable: {reason}")]
    Corrupt {
        /// The file involved.
        path: PathBuf,
        /// What did not match.
        reason: String,
    },
    /// The configuration is inconsistent.
    #[error("invalid tracking configuration: {0}")]
    InvalidConfig(String),
    /// `ClearDirtyExtents` named a checkpoint that is not the open one.
    #[error(
        "checkpoint {given} is not the open checkpoint ({open:?}); fetch the dirty extents again"
    )]
    StaleCheckpoint {
        /// Checkpoint the caller passed.
        given: u64,
        /// Checkpoint currently open, if any.
        open: Option<u64>,
    },
    /// Too many extents are pinned by in-flight writes to fit one log record.
    #[error("activity log full: {pinned} extents pinned by in-flight writes")]
    ActivityLogFull {
        /// Number of active extents.
        pinned: usize,
    },
}

/// Result alias for this crate.
pub type Result<T, E = TrackingError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrackingError + '_ {
    move |source| TrackingError::Io {
        path: path.to_owned(),
        source,
    }
}
