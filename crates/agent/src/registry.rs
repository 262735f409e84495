//! Exposes the volume store to the NBD server.

use std::sync::Arc;

use ember_nbd::ExportRegistry;
use ember_volume::{Volume, VolumeStore};

/// NBD export lookup over the store: `NAME` or `NAME@SNAPSHOT`.
#[derive(Debug)]
pub(crate) struct StoreRegistry(pub(crate) Arc<VolumeStore>);

impl ExportRegistry for StoreRegistry {
    type Export = Volume;

    fn lookup(&self, name: &str) -> Option<Arc<Volume>> {
        self.0.export(name)
    }

    fn list(&self) -> Vec<(String, String)> {
        self.0
            .list()
            .into_iter()
            .map(|(meta, _)| (meta.name, String::new()))
            .collect()
    }
}
