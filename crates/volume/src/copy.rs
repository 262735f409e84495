//! Point-in-time copies for snapshots and clones: sparse bulk copies, and
//! live copies that let writes continue and pause them only for the final
//! delta. Blocking file work runs on tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Result, StoreError};
use crate::fsutil::{copy_extents, copy_sparse};
use crate::volume::Volume;

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
