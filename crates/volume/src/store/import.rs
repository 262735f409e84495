//! [`VolumeStore::create_from_image`]: publishes a data file that a caller
//! built elsewhere in the data dir (a reflink clone of a secondary's image
//! for a DR drill) as a new, ordinary volume with a given origin.
//!
//! Added for DR drills (engineer B2): the drill code must clone under the
//! secondary's apply lock, which the store knows nothing about, so it
//! builds the image first and hands the finished file over here. The
//! publication itself is the store's usual one: everything is assembled in
//! `.creating-NAME` and renamed into place, so a crash leaves the volume
//! wholly present or wholly absent (`VolumeStore::open` removes leftovers).

use std::path::Path;
use std::sync::Arc;

use super::{DATA_FILE, VOLUME_META, VolumeStore, check_size, open_volume, parse_volume};
use crate::error::{Result, StoreError, io};
use crate::fsutil::{now_unix, sync_dir, write_json_atomic};
use crate::meta::VolumeMeta;
use crate::volume::Volume;

impl VolumeStore {
    /// Creates volume `name` from the finished data file `image`, which
    /// must be on the data dir's file system (it is renamed, not copied)
    /// and is consumed: on success it is the volume's data file, on error
    /// it is removed. The volume's size is the file's length; `origin` is
    /// recorded in its metadata (e.g. `drill:VOL@POINT`). Not idempotent:
    /// a taken name is `AlreadyExists` whatever its spec, because the image
    /// is a one-off and cannot be compared.
    ///
    /// # Errors
    /// `InvalidName`; `AlreadyExists`; `InvalidArgument` for a length that
    /// is zero or not a multiple of 4 KiB; `Io` (a full disk leaves
    /// nothing behind).
    pub async fn create_from_image(
        &self,
        name: &str,
        image: &Path,
        origin: &str,
    ) -> Result<(VolumeMeta, Arc<Volume>)> {
        let result = self.publish_image(name, image, origin).await;
        if result.is_err() {
            let _ = std::fs::remove_file(image);
        }
        result
    }

    async fn publish_image(
        &self,
        name: &str,
        image: &Path,
        origin: &str,
    ) -> Result<(VolumeMeta, Arc<Volume>)> {
        let name = parse_volume(name)?;
        let _op = self.ops.lock().await;
        if let Some((meta, _)) = self.get(name.as_str()) {
            return Err(StoreError::AlreadyExists {
                what: "volume",
                name: name.to_string(),
                detail: format!("existing: {} bytes from {:?}", meta.size_bytes, meta.origin),
            });
        }
        let size_bytes = std::fs::metadata(image)
            .map_err(io("stat image", image))?
            .len();
        check_size(size_bytes)?;
        let tracking = self.tracking_for(None)?;
        let vols = self.volumes_dir();
        let tmp = vols.join(format!(".creating-{name}"));
        let _ = std::fs::remove_dir_all(&tmp);
        let built = (|| {
            std::fs::create_dir(&tmp).map_err(io("create volume dir", &tmp))?;
            let data = tmp.join(DATA_FILE);
            std::fs::rename(image, &data).map_err(io("move image into place", &data))?;
            let meta = VolumeMeta {
                name: name.to_string(),
                size_bytes,
                tracking_granularity_bytes: tracking.map_or(0, |t| t.granularity_bytes),
                created_at_unix: now_unix(),
                origin: origin.to_owned(),
                backing_device: None,
            };
            write_json_atomic(&tmp.join(VOLUME_META), &meta)?;
            let dest = vols.join(name.as_str());
            std::fs::rename(&tmp, &dest).map_err(io("publish volume", &dest))?;
            sync_dir(&vols)?;
            Ok::<_, StoreError>((meta, dest))
        })();
        let (meta, dest) = match built {
            Ok(ok) => ok,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let volume = Arc::new(open_volume(&dest, &meta, &self.config, &self.engine)?);
        self.map()
            .insert(meta.name.clone(), (meta.clone(), volume.clone()));
        tracing::info!(volume_id = %name, size_bytes, origin, "volume created from an image");
        Ok((meta, volume))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_nbd::Export;

    use crate::store::tests::store;

    #[tokio::test]
    async fn an_image_becomes_a_volume_with_its_origin_and_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let image = dir.path().join("img");
        std::fs::write(&image, vec![0x5a; 8192]).expect("image");
        let (meta, vol) = s
            .create_from_image("d1", &image, "drill:v@newest")
            .await
            .expect("create");
        assert_eq!(meta.origin, "drill:v@newest");
        assert_eq!(vol.size(), 8192);
        assert!(!image.exists(), "the image was moved, not copied");
        drop((s, vol));
        let s = store(dir.path());
        let (meta, _) = s.get("d1").expect("still there after a reopen");
        assert_eq!(meta.origin, "drill:v@newest");
    }

    #[tokio::test]
    async fn a_refused_image_is_consumed_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        s.create("taken", 8192, None, crate::store::Source::Empty)
            .await
            .expect("create");
        type Row = (&'static str, usize, fn(&StoreError) -> bool);
        let rows: [Row; 3] = [
            ("taken", 8192, |e| {
                matches!(e, StoreError::AlreadyExists { .. })
            }),
            ("odd", 1000, |e| matches!(e, StoreError::InvalidArgument(_))),
            ("bad/name", 8192, |e| {
                matches!(e, StoreError::InvalidName { .. })
            }),
        ];
        for (name, len, want) in rows {
            let image = dir.path().join("img");
            std::fs::write(&image, vec![1; len]).expect("image");
            let e = s
                .create_from_image(name, &image, "drill:v@p")
                .await
                .expect_err(name);
            assert!(want(&e), "{name}: {e}");
            assert!(!image.exists(), "{name}: image left behind");
        }
        let leftovers: Vec<String> = std::fs::read_dir(dir.path().join("volumes"))
            .expect("volumes dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
