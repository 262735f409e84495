//! Errors of the NBD layer and the one place storage errors become errnos.

use ember_storage::StorageError;

use crate::proto;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed or closed mid-message.
    #[error("connection I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol badly enough that the stream cannot be
    /// resynchronised (bad magic, oversized option, unknown client flags).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
}

/// The NBD errno for a storage error. Exhaustive on purpose: a new variant
/// must pick its errno here before it compiles.
pub fn nbd_errno(error: &StorageError) -> u32 {
    match error {
        StorageError::OutOfRange { .. } => proto::EINVAL,
        StorageError::ReadOnly => proto::EPERM,
        StorageError::NoSpace { .. } => proto::ENOSPC,
        StorageError::Unsupported { .. } => proto::ENOTSUP,
        StorageError::Tracking(_) => proto::EIO,
        StorageError::Io { .. } => proto::EIO,
    }
}
