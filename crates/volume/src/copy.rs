//! Point-in-time copies for snapshots and clones: reflink clones of a
//! quiesced volume where the file system shares extents, else sparse bulk
//! copies, and live copies that let writes continue and pause them only
//! for the final delta. Blocking file work runs on tokio's blocking pool.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cow::{self, SnapshotMethod};
use crate::error::{Result, StoreError, io};
use crate::fsutil::{copy_extents, copy_sparse};
use crate::volume::Volume;

/// Makes the new file `dst` (`size` bytes) a point-in-time copy of live
/// volume `volume`, the way `method` says.
///
/// Reflink: writes pause (`Volume::quiesce`) for one `FICLONE` of the data
/// file, which also writes back its dirty page cache, so the clone is
/// exactly the acknowledged writes at that instant; the pause lasts
/// O(extents), milliseconds. If the clone fails for a reason other than a
/// full file system, this logs a warning and falls back to [`copy_live`].
/// With [`CloneSync::ByCaller`] a reflink clone is not fsynced here (a
/// copy always is: its data needs writing back). Returns the method that
/// made the copy.
pub(crate) async fn clone_live(
    volume: &Arc<Volume>,
    dst: &Path,
    size: u64,
    method: SnapshotMethod,
    sync: CloneSync,
) -> Result<SnapshotMethod> {
    let src = volume.device().path().to_owned();
    if effective_method(method, is_regular_file(&src)) == SnapshotMethod::Reflink {
        let quiet = volume.quiesce().await;
        let result = reflink_blocking(src.clone(), dst.to_owned(), size).await;
        drop(quiet);
        // The clone is exact once the ioctl returns; writers need not wait
        // for it to be durable too.
        let result = match (result, sync) {
            (Ok(()), CloneSync::Now) => sync_blocking(dst.to_owned()).await,
            (result, _) => result,
        };
        match result {
            Ok(()) => return Ok(SnapshotMethod::Reflink),
            Err(e) if !falls_back_to_copy(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(volume_id = %volume.name(), error = %e, "reflink clone failed; copying instead");
            }
        }
    }
    copy_live(volume, dst, size).await?;
    Ok(SnapshotMethod::Copy)
}

/// Who makes a reflink clone durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloneSync {
    /// [`clone_live`] fsyncs it.
    Now,
    /// The caller's barrier does (a snapshot: `snaprec::Barrier`); until
    /// then the clone is a temporary whose contents a crash may undo.
    ByCaller,
}

/// Makes the new file `dst` (`size` bytes) a copy of the file `src`, which
/// nobody writes (a snapshot's data): a reflink clone when `method` allows,
/// with the same fallback as [`clone_live`], else a sparse copy.
pub(crate) async fn clone_frozen(
    src: &Path,
    dst: &Path,
    size: u64,
    method: SnapshotMethod,
) -> Result<SnapshotMethod> {
    if effective_method(method, is_regular_file(src)) == SnapshotMethod::Reflink {
        let made = match reflink_blocking(src.to_owned(), dst.to_owned(), size).await {
            Ok(()) => sync_blocking(dst.to_owned()).await,
            Err(e) => Err(e),
        };
        match made {
            Ok(()) => return Ok(SnapshotMethod::Reflink),
            Err(e) if !falls_back_to_copy(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(source = %src.display(), error = %e, "reflink clone failed; copying instead");
            }
        }
    }
    copy_blocking(src.to_owned(), dst.to_owned(), size).await?;
    Ok(SnapshotMethod::Copy)
}

/// The method for one copy: reflink only when the store can and the source
/// is a regular file (a raw block device cannot be cloned, and trying would
/// only log a fallback warning on every snapshot).
fn effective_method(store: SnapshotMethod, source_is_file: bool) -> SnapshotMethod {
    match (store, source_is_file) {
        (SnapshotMethod::Reflink, true) => SnapshotMethod::Reflink,
        (SnapshotMethod::Reflink, false) | (SnapshotMethod::Copy, _) => SnapshotMethod::Copy,
    }
}

/// Whether a failed reflink should be retried as a copy. A full file
/// system (or quota) is final: a copy needs more space than a clone, so it
/// would fail too, only later and after moving data. Anything else (EXDEV,
/// EINVAL, EOPNOTSUPP, an odd EIO on the probe-happy path) may be specific
/// to cloning, and copying still works.
fn falls_back_to_copy(e: &StoreError) -> bool {
    !e.is_no_space()
}

fn is_regular_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_file())
}

/// Fsyncs the clone `dst`; on error removes it (callers treat it as never
/// made).
async fn sync_blocking(dst: PathBuf) -> Result<()> {
    tokio::task::spawn_blocking(move || {
        let synced = std::fs::File::open(&dst)
            .and_then(|f| f.sync_all())
            .map_err(io("sync reflink target", &dst));
        if synced.is_err() {
            let _ = std::fs::remove_file(&dst);
        }
        synced
    })
    .await
    .map_err(|e| StoreError::InvalidArgument(format!("sync task failed: {e}")))?
}

/// `FICLONE`s `src` into the new file `dst` and sizes it to `size` (a clone
/// may be larger than its source). Does not sync: see [`sync_blocking`].
/// On error `dst` does not exist.
async fn reflink_blocking(src: PathBuf, dst: PathBuf, size: u64) -> Result<()> {
    in_place_or_spawned(move || {
        cow::reflink_file_unsynced(&src, &dst)?;
        let sized = (|| {
            let f = OpenOptions::new()
                .write(true)
                .open(&dst)
                .map_err(io("open reflink target", &dst))?;
            let len = f.metadata().map_err(io("stat reflink target", &dst))?.len();
            if len != size {
                f.set_len(size).map_err(io("size reflink target", &dst))?;
            }
            Ok(())
        })();
        if sized.is_err() {
            let _ = std::fs::remove_file(&dst);
        }
        sized
    })
    .await
}

/// Runs blocking file work `f` that the calling task waits for anyway
/// (a snapshot's `FICLONE`, writes paused meanwhile). On a multi-thread
/// runtime it runs right here (`block_in_place`: tokio hands this
/// worker's other tasks to another thread, off the critical path) rather
/// than on the blocking pool, which costs two thread wake-ups (to the
/// pool, back to a worker): on a loaded 2-vCPU host each wake-up waits for
/// a CPU, and a reflink snapshot is otherwise ~0.1 ms of work. Elsewhere
/// (a current-thread runtime, where `block_in_place` is not allowed) it
/// goes to the blocking pool.
async fn in_place_or_spawned<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread
    {
        return tokio::task::block_in_place(f);
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::InvalidArgument(format!("reflink task failed: {e}")))?
}

/// Pre-copy passes over blocks written during the previous pass before the
/// final, write-pausing pass. Three shrink a busy volume's delta enough in
/// practice; more only chase a writer that outruns the copy.
const PRECOPY_PASSES: usize = 3;
/// A delta this small is copied with writes paused right away.
const FINAL_PASS_BYTES: u64 = 64 << 20;

/// Copies live volume `volume` into the new file `dst` as of one instant.
///
/// With change tracking, writes continue during the bulk copy: a watcher
/// records blocks whose writes complete meanwhile, up to
/// [`PRECOPY_PASSES`] passes recopy them, and only the last (small) delta
/// is copied with writes paused. Without tracking, writes pause for the
/// whole copy.
pub(crate) async fn copy_live(volume: &Arc<Volume>, dst: &Path, size: u64) -> Result<()> {
    let src = volume.device().path().to_owned();
    let Some(tracker) = volume.tracker().cloned() else {
        let _quiet = volume.quiesce().await;
        copy_blocking(src, dst.to_owned(), size).await?;
        return Ok(());
    };
    let mut watch = tracker.watch();
    let result = async {
        let bulk = copy_blocking(src.clone(), dst.to_owned(), size).await?;
        let mut passes = 0;
        for _ in 0..PRECOPY_PASSES {
            let next = tracker.watch();
            let changed = tracker.take_watch(watch).expect("this copy owns its watcher");
            watch = next;
            let extents = tracker.watch_extents(&changed);
            let bytes: u64 = extents.iter().map(|e| e.length).sum();
            copy_extents_blocking(src.clone(), dst.to_owned(), extents).await?;
            passes += 1;
            if bytes <= FINAL_PASS_BYTES {
                break;
            }
        }
        let quiet = volume.quiesce().await;
        let changed = tracker.take_watch(watch).expect("this copy owns its watcher");
        let extents = tracker.watch_extents(&changed);
        let paused = copy_extents_blocking(src.clone(), dst.to_owned(), extents).await?;
        drop(quiet);
        tracing::info!(volume_id = %volume.name(), bulk_bytes = bulk, passes, paused_bytes = paused, "point-in-time copy done");
        Ok(())
    }
    .await;
    // On success the watcher was taken; on error drop it so writes stop feeding it.
    let _ = tracker.take_watch(watch);
    result
}

async fn copy_extents_blocking(
    src: PathBuf,
    dst: PathBuf,
    extents: Vec<ember_common::Extent>,
) -> Result<u64> {
    tokio::task::spawn_blocking(move || copy_extents(&src, &dst, &extents))
        .await
        .map_err(|e| StoreError::InvalidArgument(format!("copy task failed: {e}")))?
}

pub(crate) async fn copy_blocking(src: PathBuf, dst: PathBuf, size: u64) -> Result<u64> {
    tokio::task::spawn_blocking(move || copy_sparse(&src, &dst, size))
        .await
        .map_err(|e| StoreError::InvalidArgument(format!("copy task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflink_only_for_regular_files_on_a_reflink_store() {
        use SnapshotMethod::{Copy, Reflink};
        for (store, is_file, want) in [
            (Reflink, true, Reflink),
            (Reflink, false, Copy),
            (Copy, true, Copy),
            (Copy, false, Copy),
        ] {
            assert_eq!(
                effective_method(store, is_file),
                want,
                "{store} file={is_file}"
            );
        }
    }

    #[test]
    fn only_a_full_file_system_stops_the_fallback_to_copy() {
        let err = |errno| StoreError::Io {
            op: "reflink",
            path: PathBuf::from("x"),
            source: std::io::Error::from_raw_os_error(errno),
        };
        for (errno, falls_back) in [
            (libc::EXDEV, true),
            (libc::EINVAL, true),
            (libc::EOPNOTSUPP, true),
            (libc::EIO, true),
            (libc::ENOSPC, false),
            (libc::EDQUOT, false),
        ] {
            assert_eq!(falls_back_to_copy(&err(errno)), falls_back, "errno {errno}");
        }
    }

    /// On emberd's multi-thread runtime the work runs on the calling
    /// thread (no hand-off to the blocking pool and back); on a
    /// current-thread runtime it still runs, on the blocking pool.
    #[test]
    fn blocking_work_runs_in_place_on_a_multi_thread_runtime() {
        for (multi, in_place) in [(true, true), (false, false)] {
            let rt = if multi {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .build()
            } else {
                tokio::runtime::Builder::new_current_thread().build()
            }
            .expect("runtime");
            let (caller, worker) = rt.block_on(async {
                tokio::spawn(async {
                    let caller = std::thread::current().id();
                    let worker = in_place_or_spawned(|| Ok(std::thread::current().id()))
                        .await
                        .expect("ran");
                    (caller, worker)
                })
                .await
                .expect("task")
            });
            assert_eq!(caller == worker, in_place, "multi-thread runtime: {multi}");
        }
    }
}
