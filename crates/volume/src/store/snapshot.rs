//! Making snapshots: [`VolumeStore::create_snapshot`] (a point-in-time
//! clone of a live volume) and [`VolumeStore::adopt_snapshot`] (a finished
//! image kept as a snapshot: a recovery point at a forced promotion).
//!
//! Both build the snapshot in `snapshots/.creating-SNAP` and publish it
//! with one rename, so a crash leaves it wholly present or wholly absent
//! (`VolumeStore::open` removes `.creating-*`). The record is an xattr of
//! the data file and durability is one barrier per data dir
//! (`snaprec::Barrier`): on XFS a single log force after the rename.

use std::path::Path;

use super::{VolumeStore, not_found_volume, parse_snapshot, parse_volume};
use crate::copy::{CloneSync, clone_live};
use crate::cow;
use crate::error::{Result, StoreError, io};
use crate::fsutil::now_unix;
use crate::meta::SnapshotMeta;
use crate::snaprec::{self, Barrier, DATA_FILE};

impl VolumeStore {
    /// Takes a point-in-time, read-only snapshot. Idempotent by name.
    ///
    /// Crash-safe order: under `.creating-SNAP` the data is cloned (writes
    /// paused only for the `FICLONE`) or copied, the record is set on it,
    /// then one rename publishes it and [`Barrier`] makes it durable: on
    /// XFS one fsync of `snapshots/` after the rename (every earlier step
    /// is metadata in the same ordered log), elsewhere an fsync of the data
    /// file before the rename too. Listing skips dot-names and `open`
    /// removes them, so a crash before the rename leaves nothing listed and
    /// nothing leaked; a published snapshot always has its record (it was
    /// set before the rename, and the log is ordered or the file synced).
    ///
    /// # Errors
    /// `NotFound` for the volume; I/O errors (a full disk leaves nothing).
    pub async fn create_snapshot(&self, vol: &str, snap: &str) -> Result<(SnapshotMeta, bool)> {
        let vol = parse_volume(vol)?;
        let snap = parse_snapshot(snap)?;
        let _op = self.ops.lock().await;
        let (meta, volume) = self
            .get(vol.as_str())
            .ok_or_else(|| not_found_volume(vol.as_str()))?;
        let dir = self.snapshot_dir(&vol, &snap);
        if let Ok(existing) = snaprec::read(&dir) {
            return Ok((existing, false));
        }
        let parent = dir.parent().expect("snapshot dir has a parent").to_owned();
        std::fs::create_dir_all(&parent).map_err(io("create snapshots dir", &parent))?;
        let tmp = parent.join(format!(".creating-{snap}"));
        let _ = std::fs::remove_dir_all(&tmp);
        let started = std::time::Instant::now();
        let result = async {
            std::fs::create_dir(&tmp).map_err(io("create snapshot dir", &tmp))?;
            cow::fault_pause("dir").await;
            let data = tmp.join(DATA_FILE);
            let how = clone_live(
                &volume,
                &data,
                meta.size_bytes,
                self.snapshot_method,
                CloneSync::ByCaller,
            )
            .await?;
            cow::fault_pause("data").await;
            let smeta = SnapshotMeta {
                name: snap.to_string(),
                size_bytes: meta.size_bytes,
                created_at_unix: now_unix(),
            };
            self.record_and_publish(&tmp, &dir, &smeta).await?;
            Ok::<_, StoreError>((smeta, how))
        }
        .await;
        match result {
            Ok((smeta, how)) => {
                let elapsed_us = started.elapsed().as_micros() as u64;
                tracing::info!(volume_id = %vol, snapshot = %snap, method = %how, barrier = %self.barrier.as_str(), elapsed_us, "snapshot created");
                Ok((smeta, true))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Keeps the finished, durable image file `image` as snapshot `snap`
    /// of volume `vol`, created at `created_at_unix`. The image must be on
    /// the data dir's file system: it is renamed, not copied. On success it
    /// is the snapshot's data file; on error it is moved back where it was
    /// when possible. The snapshot's size is the image's length.
    ///
    /// # Errors
    /// `InvalidName`; `NotFound` for the volume; `AlreadyExists` when the
    /// name is taken; `Io` (`EXDEV` for an image on another file system).
    pub async fn adopt_snapshot(
        &self,
        vol: &str,
        snap: &str,
        image: &Path,
        created_at_unix: i64,
    ) -> Result<SnapshotMeta> {
        let vol = parse_volume(vol)?;
        let snap = parse_snapshot(snap)?;
        let _op = self.ops.lock().await;
        if self.get(vol.as_str()).is_none() {
            return Err(not_found_volume(vol.as_str()));
        }
        let dir = self.snapshot_dir(&vol, &snap);
        if dir.exists() {
            return Err(StoreError::AlreadyExists {
                what: "snapshot",
                name: format!("{vol}@{snap}"),
                detail: "a snapshot of that name exists".into(),
            });
        }
        let size_bytes = std::fs::metadata(image)
            .map_err(io("stat image", image))?
            .len();
        let parent = dir.parent().expect("snapshot dir has a parent").to_owned();
        std::fs::create_dir_all(&parent).map_err(io("create snapshots dir", &parent))?;
        let tmp = parent.join(format!(".creating-{snap}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(io("create snapshot dir", &tmp))?;
        let data = tmp.join(DATA_FILE);
        let smeta = SnapshotMeta {
            name: snap.to_string(),
            size_bytes,
            created_at_unix,
        };
        let result = match std::fs::rename(image, &data) {
            Ok(()) => self.record_and_publish(&tmp, &dir, &smeta).await,
            Err(e) => Err(io("move image into a snapshot", &data)(e)),
        };
        if let Err(e) = result {
            let _ = std::fs::rename(&data, image);
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        tracing::info!(volume_id = %vol, snapshot = %snap, size_bytes, "image kept as a snapshot");
        Ok(smeta)
    }

    /// Sets `smeta` as the record of the data in `tmp`, renames `tmp` to
    /// `dir` and makes it durable with this store's [`Barrier`].
    async fn record_and_publish(&self, tmp: &Path, dir: &Path, smeta: &SnapshotMeta) -> Result<()> {
        // One setxattr: a metadata change, as cheap as the mkdir above.
        snaprec::write(tmp, smeta)?;
        if self.barrier == Barrier::FileThenDir {
            let data = tmp.join(DATA_FILE);
            tokio::task::spawn_blocking(move || {
                std::fs::File::open(&data)
                    .and_then(|f| f.sync_all())
                    .map_err(io("sync snapshot data", &data))
            })
            .await
            .map_err(|e| StoreError::InvalidArgument(format!("sync task failed: {e}")))??;
        }
        cow::fault_pause("meta").await;
        cow::publish(tmp, dir)?;
        cow::fault_pause("published").await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::store::Source;
    use crate::store::tests::store;

    #[tokio::test]
    async fn an_adopted_image_is_a_listed_snapshot_that_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        s.create("v", 8192, None, Source::Empty).await.expect("v");
        let image = dir.path().join("point.img");
        std::fs::write(&image, vec![0x5a; 8192]).expect("image");
        let meta = s
            .adopt_snapshot("v", "auto-1", &image, 1_700_000_000)
            .await
            .expect("adopt");
        assert_eq!(
            (meta.size_bytes, meta.created_at_unix),
            (8192, 1_700_000_000)
        );
        assert!(!image.exists(), "moved, not copied");
        drop(s);
        let s = store(dir.path());
        let listed = s.list_snapshots("v").expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, meta);
        let data = s.snapshot_dir(
            &parse_volume("v").unwrap(),
            &parse_snapshot("auto-1").unwrap(),
        );
        assert_eq!(
            std::fs::read(data.join(DATA_FILE)).unwrap(),
            vec![0x5a; 8192]
        );
    }

    #[tokio::test]
    async fn a_refused_adoption_leaves_the_image_where_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        s.create("v", 8192, None, Source::Empty).await.expect("v");
        s.create_snapshot("v", "taken").await.expect("snap");
        let image = dir.path().join("point.img");
        std::fs::write(&image, vec![1; 8192]).expect("image");
        type Row = (&'static str, &'static str, fn(&StoreError) -> bool);
        let rows: [Row; 3] = [
            ("v", "taken", |e| {
                matches!(e, StoreError::AlreadyExists { .. })
            }),
            ("missing", "p", |e| matches!(e, StoreError::NotFound { .. })),
            ("v", "bad:name", |e| {
                matches!(e, StoreError::InvalidName { .. })
            }),
        ];
        for (vol, snap, want) in rows {
            let e = s
                .adopt_snapshot(vol, snap, &image, 1)
                .await
                .expect_err(snap);
            assert!(want(&e), "{vol}@{snap}: {e}");
            assert_eq!(std::fs::read(&image).unwrap(), vec![1; 8192], "{snap}");
        }
        assert_eq!(s.list_snapshots("v").expect("list").len(), 1);
    }
}
