//! The seam between a volume's write path and replication.
//!
//! The volume knows nothing of peers: a replica link (in `ember-repl`)
//! installs a [`ReplicationHook`], and the write path reports every
//! completed change to it while the change's activity-log extents are still
//! pinned, then waits on the returned acknowledgement (sync mode) before
//! answering the client. A secondary installs a hook that refuses client
//! writes: its content only changes through the replication stream.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

/// A completed change, as replication ships it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Data written at `offset`.
    Write {
        /// First byte.
        offset: u64,
        /// The bytes as written.
        data: Vec<u8>,
    },
    /// `[offset, offset + len)` now reads as zeros (WRITE_ZEROES, TRIM).
    Zero {
        /// First byte.
        offset: u64,
        /// Bytes zeroed.
        len: u64,
    },
}

impl Change {
    /// Bytes of volume the change covers.
    pub fn len(&self) -> u64 {
        match self {
            Self::Write { data, .. } => data.len() as u64,
            Self::Zero { len, .. } => *len,
        }
    }

    /// True for an empty change.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Resolves when the secondary holds the change (sync mode).
pub type AckWait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What replication needs from a volume's write path.
pub trait ReplicationHook: Send + Sync + Debug {
    /// Client writes are refused (this volume is a secondary).
    fn refuses_writes(&self) -> bool;
    /// The hook wants changes reported (a primary with a live link).
    fn wants_changes(&self) -> bool;
    /// A change completed locally (`fua`: the client asked for durability).
    /// Returns what to wait for before acknowledging the client, if anything.
    fn completed(&self, change: Change, fua: bool) -> Option<AckWait>;
    /// A FLUSH completed locally; returns what to wait for, if anything.
    fn flushed(&self) -> Option<AckWait>;
}
