//! [`Volume`]: one export's data path.
//!
//! Write ordering (the crash-safety argument lives in `ember-tracking`):
//! ```text
//!   begin_write (bits set, extents pinned)
//!     └─ commit (only if an extent was cold: AL record fsynced)
//!          └─ data write (FUA → RWF_DSYNC)
//!               └─ end_write (unpin) ─▶ reply
//! ```
//! A failed commit fails the write before any data moves. Snapshots and
//! clones quiesce writes through `write_gate`: writers hold it shared, the
//! copier exclusively, so a snapshot is a point in time.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock as StdRwLock};

use ember_nbd::{BlockRun, Export};
use ember_storage::{AllocationRun, FileDevice, StorageError};
use ember_tracking::{Admission, Tracker};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::RwLock;

use crate::replication::{Change, ReplicationHook};

/// Largest zero buffer written when a file system cannot zero by metadata.
const ZERO_CHUNK: u64 = 1 << 20;

/// One volume (or read-only snapshot) as served to clients.
#[derive(Debug)]
pub struct Volume {
    name: String,
    device: FileDevice,
    tracker: Option<Arc<Tracker>>,
    size_bytes: AtomicU64,
    read_only: bool,
    write_gate: RwLock<()>,
    connections: AtomicU32,
    replication: StdRwLock<Option<Arc<dyn ReplicationHook>>>,
    /// Client write latency (acknowledgement included: tracking, the
    /// write itself, and in sync mode the secondary), for `/metrics`.
    write_latency: Histogram,
}

/// Write-latency buckets: 8 µs to about 4 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(8e-6, 2.0, 20)
}

impl Volume {
    pub(crate) fn new(
        name: String,
        device: FileDevice,
        tracker: Option<Arc<Tracker>>,
        size_bytes: u64,
        read_only: bool,
    ) -> Self {
        Self {
            name,
            device,
            tracker,
            size_bytes: AtomicU64::new(size_bytes),
            read_only,
            write_gate: RwLock::new(()),
            connections: AtomicU32::new(0),
            replication: StdRwLock::new(None),
            write_latency: Histogram::new(latency_buckets()),
        }
    }

    /// Client write latency histogram (seconds).
    pub fn write_latency(&self) -> &Histogram {
        &self.write_latency
    }

    /// Export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Change tracker, when tracking is on.
    pub fn tracker(&self) -> Option<&Arc<Tracker>> {
        self.tracker.as_ref()
    }

    /// The backing device.
    pub fn device(&self) -> &FileDevice {
        &self.device
    }

    /// Installs (or with `None` removes) the replication hook.
    pub fn set_replication(&self, hook: Option<Arc<dyn ReplicationHook>>) {
        *self
            .replication
            .write()
            .expect("replication hook lock poisoned by a panic") = hook;
    }

    /// The replication hook, if one is installed.
    pub fn replication(&self) -> Option<Arc<dyn ReplicationHook>> {
        self.replication
            .read()
            .expect("replication hook lock poisoned by a panic")
            .clone()
    }

    /// Client writes are refused: a snapshot, or a secondary.
    fn refuses_writes(&self) -> Result<Option<Arc<dyn ReplicationHook>>, StorageError> {
        if self.read_only {
            return Err(StorageError::ReadOnly);
        }
        let hook = self.replication();
        if hook.as_ref().is_some_and(|h| h.refuses_writes()) {
            return Err(StorageError::ReadOnly);
        }
        Ok(hook.filter(|h| h.wants_changes()))
    }

    /// NBD connections currently attached.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn set_size(&self, size: u64) {
        self.size_bytes.store(size, Ordering::Release);
    }

    /// Holds writes off while a point-in-time copy is taken.
    pub(crate) async fn quiesce(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.write_gate.write().await
    }

    /// Runs `f` as a tracked write: dirty bits and activity log first. On
    /// success the change goes to the replication hook while its extents
    /// are still pinned, and the hook's acknowledgement (sync mode) is
    /// awaited before returning.
    async fn tracked<F, Fut>(
        &self,
        offset: u64,
        len: u64,
        publish: Option<(Arc<dyn ReplicationHook>, Change, bool)>,
        f: F,
    ) -> Result<(), StorageError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), StorageError>>,
    {
        let gate = self.write_gate.read().await;
        let Some(tracker) = &self.tracker else {
            return f().await;
        };
        let admission = tracker
            .begin_write(offset, len)
            .map_err(|e| StorageError::Tracking(Box::new(e)))?;
        let result = match Self::commit(tracker, &admission).await {
            Ok(()) => f().await,
            Err(e) => Err(e),
        };
        let wait = match (&result, publish) {
            (Ok(()), Some((hook, change, fua))) => hook.completed(change, fua),
            _ => None,
        };
        tracker.end_write(admission);
        drop(gate);
        if let Some(wait) = wait {
            wait.await;
        }
        result
    }

    async fn commit(tracker: &Arc<Tracker>, admission: &Admission) -> Result<(), StorageError> {
        let Some(seq) = admission.commit_seq else {
            return Ok(());
        };
        let tracker = tracker.clone();
        tokio::task::spawn_blocking(move || tracker.commit(seq))
            .await
            .map_err(|e| StorageError::Tracking(Box::new(e)))?
            .map_err(|e| StorageError::Tracking(Box::new(e)))
    }

    async fn write_zero_buffers(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), StorageError> {
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(ZERO_CHUNK);
            self.device.write(pos, vec![0u8; n as usize], fua).await?;
            pos += n;
        }
        Ok(())
    }
}

impl Export for Volume {
    fn size(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only || self.replication().is_some_and(|h| h.refuses_writes())
    }

    /// All connections write the same file through the same page cache, so
    /// one `fdatasync` covers every completed write; in sync replication a
    /// FLUSH also waits for the secondary's barrier, which covers every
    /// write shipped before it.
    fn multi_conn(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, StorageError> {
        self.device.read(offset, len as usize).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        let hook = self.refuses_writes()?;
        let len = data.len() as u64;
        let publish = hook.map(|h| {
            let change = Change::Write {
                offset,
                data: data.clone(),
            };
            (h, change, fua)
        });
        let result = self
            .tracked(offset, len, publish, || {
                self.device.write(offset, data, fua)
            })
            .await;
        if result.is_ok() {
            self.write_latency.observe(started.elapsed().as_secs_f64());
        }
        result
    }

    async fn flush(&self) -> Result<(), StorageError> {
        self.device.flush().await?;
        if let Some(wait) = self.replication().and_then(|h| h.flushed()) {
            wait.await;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<(), StorageError> {
        let hook = self.refuses_writes()?;
        let publish = hook.map(|h| (h, Change::Zero { offset, len }, fua));
        self.tracked(offset, len, publish, || async {
            match self.device.zero(offset, len, !may_trim).await {
                Ok(()) if fua => self.device.flush().await,
                Ok(()) => Ok(()),
                Err(StorageError::Unsupported { .. }) if !fast_only => {
                    self.write_zero_buffers(offset, len, fua).await
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        let hook = self.refuses_writes()?;
        let publish = hook.map(|h| (h, Change::Zero { offset, len }, false));
        self.tracked(offset, len, publish, || async {
            match self.device.zero(offset, len, false).await {
                // TRIM is advisory: a file system without hole punching just keeps the data.
                Err(StorageError::Unsupported { .. }) => Ok(()),
                other => other,
            }
        })
        .await
    }

    fn allocation(&self, offset: u64, len: u64) -> Vec<AllocationRun> {
        let end = (offset + len).min(self.size());
        if end <= offset {
            return Vec::new();
        }
        self.device.allocation(offset, end - offset)
    }

    fn dirty_runs(&self, offset: u64, len: u64) -> Option<Vec<BlockRun>> {
        self.tracker.as_ref().map(|t| t.status_runs(offset, len))
    }

    fn attach(&self, attached: bool) {
        if attached {
            self.connections.fetch_add(1, Ordering::Relaxed);
        } else {
            self.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
