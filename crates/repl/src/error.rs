//! Errors of the peer-link layer.

use std::path::PathBuf;

/// Everything pairing and peer links can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    /// TLS material could not be read or used.
    #[error("TLS material {path}: {reason}")]
    TlsMaterial {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The peer could not be reached or the TLS handshake failed.
    #[error("cannot reach peer {site} at {address}: {reason}")]
    Unreachable {
        /// Peer site.
        site: String,
        /// Address tried.
        address: String,
        /// Transport error chain, flattened for the operator.
        reason: String,
    },
    /// The peer answered but refused or failed the call.
    #[error("peer {site} refused {call}: {status}")]
    Refused {
        /// Peer site.
        site: String,
        /// The RPC.
        call: &'static str,
        /// The peer's status.
        status: tonic::Status,
    },
    /// The peer speaks no protocol version we do.
    #[error("peer {site} speaks protocol versions {theirs:?}; this agent speaks {ours:?}")]
    VersionMismatch {
        /// Peer site.
        site: String,
        /// Versions the peer offered.
        theirs: Vec<u32>,
        /// Versions we support.
        ours: Vec<u32>,
    },
    /// The peer claims a different site name than the one we paired as.
    #[error("peer at {address} identifies as site {actual:?}, not {expected:?}")]
    WrongSite {
        /// Address contacted.
        address: String,
        /// Site we expected.
        expected: String,
        /// Site it claimed.
        actual: String,
    },
    /// The request is malformed (bad site name or address).
    #[error("{0}")]
    InvalidArgument(String),
    /// The site is already paired at another address.
    #[error("site {site} is already paired at {address}; remove it first")]
    AlreadyPaired {
        /// Site.
        site: String,
        /// Its recorded address.
        address: String,
    },
    /// Peer replication is not configured on this agent.
    #[error("no peer listener is configured on this agent ([peer] section with TLS material)")]
    NotConfigured,
    /// The volume or replica does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request cannot be honoured in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Local storage or tracking failed while replicating.
    #[error("{0}")]
    Internal(String),
    /// Persisting the peer list failed.
    #[error("peer list {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for this crate.
pub type Result<T, E = ReplError> = std::result::Result<T, E>;
