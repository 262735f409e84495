//! What the server needs from the thing it exports.

use std::future::Future;
use std::sync::Arc;

use ember_storage::{AllocationRun, StorageError};

/// One run of a dirty-map query: `length` bytes, dirty or clean.
pub type BlockRun = (u64, bool);

/// A block device as the NBD server sees it. Implementations must make
/// FLUSH cover every write completed on any connection before it (that is
/// what `multi_conn` promises to clients).
pub trait Export: Send + Sync + 'static {
    /// Current size in bytes.
    fn size(&self) -> u64;
    /// Writes, trims and zeroes get `EPERM`.
    fn read_only(&self) -> bool;
    /// Whether FLUSH on one connection covers writes from all connections.
    fn multi_conn(&self) -> bool;
    /// Reads `len` bytes at `offset` (already range-checked).
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<u8>, StorageError>> + Send;
    /// Writes `data` at `offset` (already range-checked); `fua` = durable on return.
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Makes all completed writes durable.
    fn flush(&self) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Zeroes a range. `may_trim`: holes are fine. `fast_only`: fail with
    /// `Unsupported` rather than write zeros slowly.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast_only: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Discards a range (advisory: may be a no-op).
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Allocation runs for `base:allocation` (clamped to the size).
    fn allocation(&self, offset: u64, len: u64) -> Vec<AllocationRun>;
    /// Dirty runs for `qemu:dirty-bitmap:dirty`; `None` when not tracked.
    fn dirty_runs(&self, offset: u64, len: u64) -> Option<Vec<BlockRun>>;
    /// Called when a connection attaches (`true`) and detaches (`false`).
    fn attach(&self, attached: bool) {
        let _ = attached;
    }
}

/// Finds exports by name.
pub trait ExportRegistry: Send + Sync + 'static {
    /// The export type served.
    type Export: Export;
    /// The export called `name`, if any.
    fn lookup(&self, name: &str) -> Option<Arc<Self::Export>>;
    /// Every export's name and description, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
}
