//! Errors of the storage layer. NBD maps them to errnos in one place
//! (`ember_nbd::nbd_errno`), gRPC in another.

/// Everything a volume I/O can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The request reaches past the end of the volume.
    #[error("range {offset}+{len} is outside the volume ({size} bytes)")]
    OutOfRange {
        /// First byte requested.
        offset: u64,
        /// Bytes requested.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// The export or volume is read-only (a snapshot, a secondary).
    #[error("volume is read-only")]
    ReadOnly,
    /// The backing file system is full.
    #[error("no space left on the backing store during {op}")]
    NoSpace {
        /// The operation that ran out of space.
        op: &'static str,
    },
    /// The backing store cannot do this (e.g. hole punching on this file system).
    #[error("{op} is not supported by the backing store")]
    Unsupported {
        /// The refused operation.
        op: &'static str,
    },
    /// Change tracking could not record the write, so it was not issued.
    #[error("change tracking failed: {0}")]
    Tracking(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Any other I/O error from the backing store.
    #[error("{op} failed: {source}")]
    Io {
        /// The failed operation.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    /// Classifies an I/O error from `op`: ENOSPC and EDQUOT become
    /// [`StorageError::NoSpace`], EOPNOTSUPP [`StorageError::Unsupported`].
    pub fn from_io(op: &'static str, source: std::io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Self::NoSpace { op },
            Some(libc::EOPNOTSUPP) => Self::Unsupported { op },
            _ => Self::Io { op, source },
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
