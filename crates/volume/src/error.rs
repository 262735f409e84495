//! Errors of the volume store. The control API maps them to gRPC codes in
//! one exhaustive match (`ember_agent::control::status`).

use std::path::PathBuf;

use ember_common::NameError;
use ember_storage::StorageError;
use ember_tracking::TrackingError;

/// Everything a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A name failed validation.
    #[error("invalid {what} name: {source}")]
    InvalidName {
        /// "volume" or "snapshot".
        what: &'static str,
        /// Why.
        #[source]
        source: NameError,
    },
    /// Some other argument is unacceptable.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named object does not exist.
    #[error("{what} {name} not found")]
    NotFound {
        /// "volume" or "snapshot".
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// The name is taken by an object with a different specification.
    #[error("{what} {name} already exists with a different specification: {detail}")]
    AlreadyExists {
        /// "volume" or "snapshot".
        what: &'static str,
        /// Its name.
        name: String,
        /// What differs.
        detail: String,
    },
    /// The object is in a state that forbids the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Data-path error.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Change-tracking error.
    #[error(transparent)]
    Tracking(#[from] TrackingError),
    /// Metadata or directory I/O failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A metadata file is unreadable.
    #[error("metadata {path} is corrupt: {reason}")]
    CorruptMetadata {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl StoreError {
    /// True when the error comes from a full file system.
    pub fn is_no_space(&self) -> bool {
        match self {
            Self::Storage(StorageError::NoSpace { .. }) => true,
            Self::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT)
            ),
            Self::Tracking(TrackingError::Io { source, .. }) => {
                source.raw_os_error() == Some(libc::ENOSPC)
            }
            _ => false,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) fn io<'a>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}
