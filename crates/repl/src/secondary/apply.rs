//! Applying a replication stream to a secondary volume.
//!
//! A committed batch is normally applied as soon as it is durable in the
//! staging log, and acknowledged after. While a recovery point's clone of
//! the volume runs (`points.rs`: it starts right after a batch is applied
//! and runs in a task, holding the volume's clone gate), the stream does
//! not wait for it: batches keep being staged, made durable and
//! acknowledged, and are *deferred* — applied in order once the clone is
//! done, by the next commit or a drain the clone's task starts. The
//! acknowledgement then means "durable on the secondary" (a crash replays
//! the staging log), which is what the primary's lag and RPO count; the
//! image itself, its `consistent_at` and any point taken stay at the last
//! applied batch. Anything that needs the image current — a direct
//! (sync-mode) write, a group batch, a new stream, a promotion, a rollback
//! to a point — applies the deferred batches first ([`settle`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ember_nbd::Export;
use ember_proto::repl::v1 as pb;
use ember_proto::repl::v1::repl_frame::Kind;
use ember_storage::StorageError;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::bulk_run::{self, BulkRun, Join};
use super::clone_apply::{self, CloneRange, Way};
use super::staging::{CommittedBatch, StagedChange};
use super::{SecondaryVolume, group};
use crate::frame;
use crate::plan::points::{CommitAction, commit_action};

type AckTx = mpsc::Sender<Result<pb::ReplAck, Status>>;

fn storage_status(what: &str, e: &StorageError) -> Status {
    match e {
        StorageError::NoSpace { .. } => Status::resource_exhausted(format!("{what}: {e}")),
        StorageError::OutOfRange { .. } => Status::invalid_argument(format!("{what}: {e}")),
        _ => Status::internal(format!("{what}: {e}")),
    }
}

/// Zeros a range, falling back to writing zeros where the file system
/// cannot punch holes.
async fn zero(sv: &SecondaryVolume, offset: u64, len: u64) -> Result<(), StorageError> {
    let device = sv.volume.device();
    match device.zero(offset, len, false).await {
        Err(StorageError::Unsupported { .. }) => {
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(1 << 20);
                device.write(pos, vec![0u8; n as usize], false).await?;
                pos += n;
            }
            Ok(())
        }
        other => other,
    }
}

/// Direct writes up to this size are copied into a `Vec` for the io_uring
/// engine; larger ones (initial sync's bulk frames) are written from the
/// received buffer on the blocking pool.
const COPY_WRITE_MAX: usize = 64 << 10;

/// Data applied per blocking call.
const APPLY_CHUNK: u64 = 8 << 20;

async fn write_out(
    device: &ember_storage::FileDevice,
    writes: &mut Vec<(u64, bytes::Bytes)>,
) -> Result<(), Status> {
    if writes.is_empty() {
        return Ok(());
    }
    device
        .write_batch(std::mem::take(writes))
        .await
        .map_err(|e| storage_status("applying staged writes", &e))
}

/// Applies a committed batch to the volume once no point's clone of it is
/// running (holding the clone gate so none starts meanwhile), makes it
/// durable and records the new consistent point. The caller holds the
/// `apply_lock` and empties the staging log when nothing follows.
async fn apply_one(sv: &SecondaryVolume, batch: CommittedBatch) -> Result<(), Status> {
    let _gate = sv.points.wait_clone().await;
    apply_batch(sv, batch).await
}

/// Applies every deferred batch, oldest first (the caller holds the
/// `apply_lock`). A failure leaves the rest deferred, in the log.
pub(crate) async fn settle(sv: &SecondaryVolume) -> Result<(), Status> {
    loop {
        let front = sv
            .staging
            .lock()
            .expect("staging lock poisoned")
            .deferred_front();
        let Some(batch) = front else { return Ok(()) };
        apply_one(sv, batch).await?;
        sv.staging
            .lock()
            .expect("staging lock poisoned")
            .pop_deferred();
    }
}

/// Applies the deferred batches once a point's clone is done, one batch
/// per turn of the `apply_lock` (the stream's frames go on in between), in
/// case no commit comes to do it. Stops at the first failure (logged):
/// the batch stays deferred, and the next commit or stream retries it and
/// reports a failure to the primary.
pub(crate) fn spawn_drain(sv: Arc<SecondaryVolume>) {
    tokio::spawn(async move {
        loop {
            let _frame = sv.apply_lock.lock().await;
            let front = sv
                .staging
                .lock()
                .expect("staging lock poisoned")
                .deferred_front();
            let Some(batch) = front else { return };
            let seq = batch.seq;
            if let Err(e) = apply_one(&sv, batch).await {
                tracing::warn!(volume = %sv.record().volume, seq, error = %e, "applying a deferred batch failed; it stays in the staging log");
                return;
            }
            let mut staging = sv.staging.lock().expect("staging lock poisoned");
            staging.pop_deferred();
            if !staging.has_deferred()
                && !staging.has_open()
                && let Err(e) = staging.reset()
            {
                tracing::warn!(error = %e, "emptying the staging log");
            }
        }
    });
}

/// The ranges of a batch to clone into the volume, gathered in log order
/// and cloned together on one blocking thread.
struct Clones<'a> {
    sv: &'a SecondaryVolume,
    /// The log and the volume's file, opened for a batch on a reflink
    /// data dir only.
    files: Option<Arc<(std::fs::File, std::fs::File)>>,
    ranges: Vec<CloneRange>,
}

impl<'a> Clones<'a> {
    fn new(sv: &'a SecondaryVolume, device: &ember_storage::FileDevice) -> Result<Self, Status> {
        let staging = sv.staging.lock().expect("staging lock poisoned");
        let files = if staging.reflink() {
            let src = staging
                .clone_source()
                .map_err(|e| Status::internal(format!("opening the staging log to clone: {e}")))?;
            let dst = std::fs::OpenOptions::new()
                .write(true)
                .open(device.path())
                .map_err(|e| Status::internal(format!("opening the volume to clone into: {e}")))?;
            Some(Arc::new((src, dst)))
        } else {
            None
        };
        Ok(Self {
            sv,
            files,
            ranges: Vec::new(),
        })
    }

    /// Whether this batch may clone (a reflink data dir).
    fn enabled(&self) -> bool {
        self.files.is_some()
    }

    fn push(&mut self, range: CloneRange) {
        self.ranges.push(range);
    }

    /// Clones the gathered ranges (not synced: the batch's flush is).
    async fn run(&mut self) -> Result<(), Status> {
        let (Some(files), false) = (&self.files, self.ranges.is_empty()) else {
            return Ok(());
        };
        let files = files.clone();
        let ranges = std::mem::take(&mut self.ranges);
        let outcome = tokio::task::spawn_blocking(move || {
            clone_apply::clone_ranges(&files.0, &files.1, &ranges)
        })
        .await
        .map_err(|e| Status::internal(format!("clone task: {e}")))?
        .map_err(|e| Status::internal(format!("cloning staged writes: {e}")))?;
        tracing::trace!(
            cloned = outcome.cloned,
            copied = outcome.copied,
            "staged ranges applied by clone"
        );
        if outcome.cloned > 0
            && self
                .sv
                .cloned_bytes
                .fetch_add(outcome.cloned, Ordering::Relaxed)
                == 0
        {
            tracing::info!(volume = %self.sv.record().volume, "applying staged writes by clone: the data dir shares extents");
        }
        Ok(())
    }
}

/// Applies a committed batch to the volume and makes it durable, then
/// records the new consistent point. The caller holds the clone gate.
async fn apply_batch(sv: &SecondaryVolume, batch: CommittedBatch) -> Result<(), Status> {
    // The recovery points' change set must cover the batch before the
    // record calls it applied. Before that, a crash replays the batch from
    // the staging log (which notes it again), so the record of the change
    // set can be written while the batch's writes go down, not before.
    let ranges = batch.changes.iter().map(|c| match *c {
        StagedChange::Write { offset, len, .. } | StagedChange::Zero { offset, len } => {
            (offset, len)
        }
    });
    let noted = sv.points.note_in_memory(ranges.clone());
    let persisting = noted.map(|blocks| {
        let points = sv.points.clone();
        tokio::task::spawn_blocking(move || points.persist_covering(&blocks))
    });
    // The common marks' ring likewise (issue 14, `marks.rs`).
    let marking = sv.marks.note_in_memory(ranges).map(|blocks| {
        let marks = sv.marks.clone();
        tokio::task::spawn_blocking(move || marks.persist_covering(&blocks))
    });
    let device = sv.volume.device();
    // Each write is the received buffer the staging log kept (or the
    // log's bytes read back): no copy. Consecutive writes go down
    // together, in order, on one blocking thread: a 20 ms async batch
    // holds hundreds of 4 KiB writes. Large aligned writes on a reflink
    // data dir are cloned from the log instead (`clone_apply.rs`). Each
    // run of changes applied one way is done before the next starts, so
    // the batch lands in log order.
    let mut clones = Clones::new(sv, device)?;
    for (way, run) in clone_apply::runs(&batch.changes, clones.enabled()) {
        let run = &batch.changes[run];
        match way {
            Way::Clone => {
                for change in run {
                    if let StagedChange::Write {
                        offset,
                        len,
                        log_pos,
                    } = *change
                    {
                        clones.push(CloneRange {
                            log_pos,
                            len,
                            offset,
                        });
                    }
                }
                clones.run().await?;
            }
            Way::Write => {
                let mut writes: Vec<(u64, bytes::Bytes)> = Vec::new();
                let mut pending = 0;
                for change in run {
                    let StagedChange::Write {
                        offset,
                        len,
                        log_pos,
                    } = *change
                    else {
                        continue;
                    };
                    let data = sv
                        .staging
                        .lock()
                        .expect("staging lock poisoned")
                        .read(log_pos, len)
                        .map_err(|e| Status::internal(format!("reading the staging log: {e}")))?;
                    writes.push((offset, data));
                    pending += len;
                    if pending >= APPLY_CHUNK {
                        write_out(device, &mut writes).await?;
                        pending = 0;
                    }
                }
                write_out(device, &mut writes).await?;
            }
            Way::Zero => {
                for change in run {
                    if let StagedChange::Zero { offset, len } = *change {
                        zero(sv, offset, len)
                            .await
                            .map_err(|e| storage_status("applying staged zeros", &e))?;
                    }
                }
            }
        }
    }
    let bytes = batch.bytes;
    device
        .flush()
        .await
        .map_err(|e| storage_status("syncing the secondary", &e))?;
    if let Some(task) = persisting {
        task.await
            .map_err(|e| Status::internal(format!("change-set task: {e}")))??;
    }
    if let Some(task) = marking {
        task.await
            .map_err(|e| Status::internal(format!("marks task: {e}")))??;
    }
    sv.update(|r| {
        r.applied_seq = batch.seq;
        r.consistent = true;
        r.consistent_at_unix_ns = batch.consistent_at_unix_ns;
        // The primary has resent every divergent range by now.
        r.divergent.clear();
    })?;
    sv.applied_bytes.fetch_add(bytes, Ordering::Relaxed);
    Ok(())
}

/// Start-up: replays the committed batches a crash left behind (each
/// idempotent) that were not yet applied, in order, then empties the log.
pub(super) async fn recover(sv: &Arc<SecondaryVolume>) -> Result<(), Status> {
    let found = sv
        .staging
        .lock()
        .expect("staging lock poisoned")
        .recover()
        .map_err(|e| Status::internal(format!("reading the staging log: {e}")))?;
    if found.is_empty() {
        return Ok(());
    }
    let record = sv.record();
    let name = record.volume.clone();
    // The batch last applied names the record's consistent point; a log
    // whose reset was not yet durable still holds it, and a log that held
    // deferred batches holds those applied before the crash. Frame
    // sequence numbers restart with every stream, so they cannot tell.
    let ats: Vec<i64> = found.iter().map(|b| b.consistent_at_unix_ns).collect();
    let from = super::staging::replay_from(&ats, record.consistent_at_unix_ns);
    // A sync link's batches are not group points (`primary::group`).
    let committed = (!record.group.is_empty() && record.mode != "sync")
        .then(|| sv.groups.get(&record.group).committed());
    for batch in found.into_iter().skip(from) {
        if let Some(committed) = committed
            && batch.consistent_at_unix_ns > committed
        {
            // Sealed, but not every member held the point: drop it (the
            // primary resends it from its change set). A group batch is
            // never deferred, so it is the log's last.
            tracing::info!(volume = %name, group = %record.group, point = batch.consistent_at_unix_ns, committed, "dropping a staged group batch its group never committed");
            break;
        }
        tracing::info!(volume = %name, seq = batch.seq, changes = batch.changes.len(), "replaying a committed batch after a crash");
        apply_batch(sv, batch).await?;
    }
    if from == ats.len() {
        tracing::info!(volume = %name, "staged batches already applied");
    }
    sv.reset_staging()
}

/// Per-stream state.
struct Stream {
    sv: Arc<SecondaryVolume>,
    session: u64,
    acks: AckTx,
    /// Unordered bulk writes received and not written yet (`bulk_run.rs`).
    run: std::sync::Mutex<BulkRun>,
}

impl Stream {
    fn check_range(&self, offset: u64, len: u64) -> Result<(), Status> {
        let size = self.sv.volume.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Status::invalid_argument(format!(
                "frame range {offset}+{len} is outside the secondary ({size} bytes)"
            )));
        }
        Ok(())
    }

    async fn ack(&self, seq: u64) -> Result<(), Status> {
        self.acks
            .send(Ok(pb::ReplAck { seq }))
            .await
            .map_err(|_| Status::cancelled("primary went away"))
    }

    fn mark_unordered(&self) -> Result<(), Status> {
        if self.sv.record().consistent {
            tracing::info!(volume = %self.sv.record().volume, "initial sync: secondary inconsistent until the next commit");
        }
        self.sv.update(|r| r.consistent = false)
    }

    async fn write(&self, w: pb::BlockWrite) -> Result<(), Status> {
        self.check_range(w.offset, w.data.len() as u64)?;
        if frame::write_crc(w.offset, &w.data) != w.crc32 {
            return Err(frame::rejected(w.seq, w.offset));
        }
        if w.staged {
            return self
                .sv
                .staging
                .lock()
                .expect("staging lock poisoned")
                .stage_write(
                    w.offset,
                    &w.data,
                    frame::data_crc(w.offset, w.data.len() as u64, w.crc32),
                )
                .map_err(|e| Status::internal(format!("staging a write: {e}")));
        }
        if joins_run(&w) {
            return self.gather(w).await;
        }
        self.write_run().await?;
        settle(&self.sv).await?;
        let _gate = self.sv.points.wait_clone().await;
        if w.unordered {
            self.mark_unordered()?;
        }
        let len = w.data.len() as u64;
        self.sv.points.note([(w.offset, len)])?;
        self.sv.note_marks(&[(w.offset, len)])?;
        let device = self.sv.volume.device();
        let written = if w.data.len() > COPY_WRITE_MAX {
            // Bulk: written from the received buffer itself, no copy.
            device.write_from(w.offset, w.data, w.fua).await
        } else {
            // Small (sync-mode) writes keep the io_uring path: a copy of a
            // few KiB costs less than a hop to the blocking pool.
            device.write(w.offset, w.data.to_vec(), w.fua).await
        };
        written.map_err(|e| storage_status("applying a write", &e))?;
        if w.unordered {
            // Bulk copy: start writeback now so the next barrier's fdatasync
            // does not find the whole group still in the page cache.
            device.start_writeback(w.offset, len);
        }
        self.sv.applied_bytes.fetch_add(len, Ordering::Relaxed);
        if w.ack { self.ack(w.seq).await } else { Ok(()) }
    }

    /// Adds an unordered write to the open run (see `bulk_run.rs`): the
    /// same steps as a write up to the write itself, which waits for the
    /// run to be written out.
    async fn gather(&self, w: pb::BlockWrite) -> Result<(), Status> {
        let len = w.data.len() as u64;
        let span = self.run.lock().expect("run lock poisoned").span();
        if bulk_run::join(span, w.offset, len, bulk_run::RUN_MAX) == Join::WriteOutFirst {
            self.write_run().await?;
        }
        settle(&self.sv).await?;
        drop(self.sv.points.wait_clone().await);
        self.mark_unordered()?;
        self.sv.points.note([(w.offset, len)])?;
        self.sv.note_marks(&[(w.offset, len)])?;
        let full = self
            .run
            .lock()
            .expect("run lock poisoned")
            .push(w.offset, w.data);
        if full { self.write_run().await } else { Ok(()) }
    }

    /// Ends the stream on a frame (or run) the secondary could not take:
    /// the open batch is dropped and the primary told why. The caller
    /// holds the `apply_lock`.
    async fn refuse(&self, status: Status) {
        tracing::warn!(volume = %self.sv.record().volume, error = %status, "replication frame refused; staged batch dropped");
        let _ = self
            .sv
            .staging
            .lock()
            .expect("staging lock poisoned")
            .reset();
        let _ = self.acks.send(Err(status)).await;
    }

    /// Writes the open run out, if any.
    async fn write_run(&self) -> Result<(), Status> {
        let Some(run) = self.run.lock().expect("run lock poisoned").take() else {
            return Ok(());
        };
        settle(&self.sv).await?;
        let _gate = self.sv.points.wait_clone().await;
        self.sv
            .volume
            .device()
            .write_run_from(run.offset, run.pieces)
            .await
            .map_err(|e| storage_status("applying a write", &e))?;
        self.sv.applied_bytes.fetch_add(run.len, Ordering::Relaxed);
        Ok(())
    }

    async fn zero(&self, z: pb::BlockZero) -> Result<(), Status> {
        self.check_range(z.offset, z.length)?;
        if frame::zero_crc(z.offset, z.length) != z.crc32 {
            return Err(frame::rejected(z.seq, z.offset));
        }
        if z.staged {
            return self
                .sv
                .staging
                .lock()
                .expect("staging lock poisoned")
                .stage_zero(z.offset, z.length)
                .map_err(|e| Status::internal(format!("staging zeros: {e}")));
        }
        settle(&self.sv).await?;
        let _gate = self.sv.points.wait_clone().await;
        if z.unordered {
            self.mark_unordered()?;
        }
        self.sv.points.note([(z.offset, z.length)])?;
        self.sv.note_marks(&[(z.offset, z.length)])?;
        zero(&self.sv, z.offset, z.length)
            .await
            .map_err(|e| storage_status("applying zeros", &e))?;
        self.sv.applied_bytes.fetch_add(z.length, Ordering::Relaxed);
        if z.ack { self.ack(z.seq).await } else { Ok(()) }
    }

    async fn commit(&self, c: pb::BatchCommit) -> Result<(), Status> {
        let started = std::time::Instant::now();
        let staging = self.sv.staging.clone();
        let batch = tokio::task::spawn_blocking(move || {
            staging
                .lock()
                .expect("staging lock poisoned")
                .commit(c.seq, c.consistent_at_unix_ns)
        })
        .await
        .map_err(|e| Status::internal(format!("commit task: {e}")))?
        .map_err(|e| Status::internal(format!("syncing the staging log: {e}")))?;
        let group = c.group_size > 0;
        let action = commit_action(
            group,
            self.sv.points.clone_running(),
            self.sv
                .staging
                .lock()
                .expect("staging lock poisoned")
                .deferred_bytes(),
            batch.bytes,
        );
        if action == CommitAction::Defer {
            // Durable in the staging log: acknowledged now, applied once
            // the point's clone is done (see the module doc).
            self.sv
                .staging
                .lock()
                .expect("staging lock poisoned")
                .defer(batch);
            return self.ack(c.seq).await;
        }
        settle(&self.sv).await?;
        if group {
            self.await_group(c.consistent_at_unix_ns, c.group_size)
                .await?;
        }
        let durable = started.elapsed();
        let bytes = batch.bytes;
        apply_one(&self.sv, batch).await?;
        self.sv.reset_staging()?;
        // Phase times of a batch (the resync's last phases): the log's
        // sync, then apply and the volume's sync.
        tracing::debug!(volume = %self.sv.record().volume, seq = c.seq, bytes, durable_us = durable.as_micros() as u64, applied_us = (started.elapsed() - durable).as_micros() as u64, "batch durable and applied");
        self.ack(c.seq).await?;
        // A batch boundary: a scheduled recovery point may be due (its
        // clone starts now and runs while the next frames are staged).
        super::points::after_commit(&self.sv).await;
        Ok(())
    }

    /// A group point: the batch is sealed; apply it only once every member
    /// holds the point (see `secondary::group`). An aborted point drops
    /// the batch and ends the stream.
    async fn await_group(&self, point: i64, size: u32) -> Result<(), Status> {
        let record = self.sv.record();
        if record.group.is_empty() {
            return Err(Status::invalid_argument(format!(
                "a group commit for {}, which is in no group",
                record.volume
            )));
        }
        let barrier = self.sv.groups.get(&record.group);
        match barrier.seal(&record.volume, point, size).await {
            group::Outcome::Apply => Ok(()),
            group::Outcome::Abort(reason) => {
                tracing::info!(volume = %record.volume, group = %record.group, point, %reason, "group point aborted; dropping the staged batch");
                self.sv.reset_staging()?;
                Err(Status::aborted(format!(
                    "consistency group {}: point {point} aborted: {reason}",
                    record.group
                )))
            }
        }
    }

    async fn barrier(&self, b: pb::Barrier) -> Result<(), Status> {
        settle(&self.sv).await?;
        self.sv
            .volume
            .device()
            .flush()
            .await
            .map_err(|e| storage_status("syncing the secondary", &e))?;
        if b.consistent_at_unix_ns > 0 && self.sv.record().consistent {
            self.sv
                .update(|r| r.consistent_at_unix_ns = b.consistent_at_unix_ns)?;
        }
        self.ack(b.seq).await?;
        super::points::after_commit(&self.sv).await;
        Ok(())
    }

    async fn handle(&self, kind: Kind) -> Result<(), Status> {
        // Every frame but a write that may join the open run comes after
        // the run: write it out first.
        if !matches!(&kind, Kind::Write(w) if joins_run(w)) {
            self.write_run().await?;
        }
        match kind {
            Kind::Open(_) => Err(Status::invalid_argument("a stream opens only once")),
            Kind::Write(w) => self.write(w).await,
            Kind::Zero(z) => self.zero(z).await,
            Kind::Commit(c) => self.commit(c).await,
            Kind::Barrier(b) => self.barrier(b).await,
            Kind::Batch(batch) => {
                for frame in batch.frames {
                    match frame.kind {
                        Some(Kind::Write(w)) => self.write(w).await?,
                        Some(Kind::Zero(z)) => self.zero(z).await?,
                        _ => {
                            return Err(Status::invalid_argument(
                                "a frame batch holds only write and zero frames",
                            ));
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

/// Whether a write frame may wait in the open run: unordered (no order
/// to keep until the next barrier), applied directly, and with nothing
/// waiting on it (no acknowledgement, no FUA).
fn joins_run(w: &pb::BlockWrite) -> bool {
    w.unordered && !w.staged && !w.ack && !w.fua
}

/// Serves one `Replicate` stream until the primary ends it, a newer stream
/// for the same volume takes over, or a frame is refused (the error goes
/// back to the primary and nothing of the refused frame is applied).
pub(crate) async fn run_stream(
    sv: Arc<SecondaryVolume>,
    mut frames: Streaming<pb::ReplFrame>,
    acks: AckTx,
) {
    let session = sv.session.fetch_add(1, Ordering::SeqCst) + 1;
    let name = sv.record().volume;
    // A point the older stream had not sealed can no longer complete; say
    // so before waiting for that stream's frame in hand.
    sv.leave_group();
    // A stream that died mid-batch left staged records behind; this stream
    // starts a fresh batch (after the older stream's frame in hand is done)
    // on the image holding every batch acknowledged so far.
    let guard = sv.apply_lock.lock().await;
    let settled = settle(&sv).await;
    let reset = sv.staging.lock().expect("staging lock poisoned").reset();
    drop(guard);
    let failed = match (settled, reset) {
        (Err(status), _) => Some(status),
        (Ok(()), Err(e)) => Some(Status::internal(format!("emptying the staging log: {e}"))),
        (Ok(()), Ok(())) => None,
    };
    if let Some(status) = failed {
        let _ = acks.send(Err(status)).await;
        return;
    }
    let stream = Stream {
        sv,
        session,
        acks,
        run: Default::default(),
    };
    tracing::info!(volume = %name, session, "replication stream opened");
    loop {
        let frame = match next_frame(&stream, &mut frames).await {
            Next::Frame(frame) => frame,
            Next::End | Next::Refused => break,
            Next::Broke(status) => {
                tracing::info!(volume = %name, error = %status, "replication stream broke");
                break;
            }
        };
        let _guard = stream.sv.apply_lock.lock().await;
        if stream.sv.session.load(Ordering::SeqCst) != stream.session {
            tracing::info!(volume = %name, session, "replication stream superseded");
            break;
        }
        let Some(kind) = frame.kind else {
            let _ = stream
                .acks
                .send(Err(Status::invalid_argument("empty frame")))
                .await;
            break;
        };
        if let Err(status) = stream.handle(kind).await {
            stream.refuse(status).await;
            break;
        }
    }
    stream.sv.leave_group();
}

/// What [`next_frame`] found.
enum Next {
    Frame(pb::ReplFrame),
    /// The primary ended the stream.
    End,
    /// The stream broke.
    Broke(Status),
    /// Writing the open run out failed; the primary was told.
    Refused,
}

/// The stream's next frame; the open run is written out first when no
/// frame comes within [`bulk_run::RUN_WAIT`] (nothing else would write it
/// before the primary's next frame, which may be a while).
async fn next_frame(stream: &Stream, frames: &mut Streaming<pb::ReplFrame>) -> Next {
    let mut next = std::pin::pin!(frames.message());
    let has_run = stream
        .run
        .lock()
        .expect("run lock poisoned")
        .span()
        .is_some();
    let received = if !has_run {
        next.await
    } else {
        // The sender is usually just behind: give the run a moment to grow
        // before writing it out (a frame already waiting returns at once).
        match tokio::time::timeout(bulk_run::RUN_WAIT, next.as_mut()).await {
            Ok(r) => r,
            Err(_) => {
                let guard = stream.sv.apply_lock.lock().await;
                if stream.sv.session.load(Ordering::SeqCst) == stream.session
                    && let Err(status) = stream.write_run().await
                {
                    stream.refuse(status).await;
                    return Next::Refused;
                }
                drop(guard);
                next.await
            }
        }
    };
    match received {
        Ok(Some(frame)) => Next::Frame(frame),
        Ok(None) => Next::End,
        Err(status) => Next::Broke(status),
    }
}
