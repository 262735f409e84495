//! Holding a secondary's live image still for a clone that is not a
//! recovery point's (a DR drill of the newest image), the way a point's
//! clone does: under the volume's *clone gate*, not under the stream's
//! `apply_lock`. The stream keeps being received, made durable in the
//! staging log and acknowledged meanwhile; committed batches are deferred
//! (`apply.rs`) and applied once the hold ends, so replication does not
//! stall for the clone's duration.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;

use super::super::SecondaryVolume;
use super::VolumePoints;

/// The live image of a secondary, held at a committed batch boundary
/// (every change to the image waits for the clone gate this holds). On
/// release or drop the batches deferred meanwhile are applied by a drain
/// task, in case no commit comes to apply them.
pub(crate) struct ImageHold {
    gate: Option<OwnedMutexGuard<()>>,
    sv: Arc<SecondaryVolume>,
    consistent: bool,
    at_unix_ns: i64,
}

impl ImageHold {
    /// Whether the held image is consistent (no initial sync or resync).
    pub(crate) fn consistent(&self) -> bool {
        self.consistent
    }

    /// The primary-clock time the held image represents (unix ns).
    pub(crate) fn at_unix_ns(&self) -> i64 {
        self.at_unix_ns
    }

    /// Bytes of the batches acknowledged and deferred since the hold began.
    pub(crate) fn deferred_bytes(&self) -> u64 {
        self.sv
            .staging
            .lock()
            .expect("staging lock poisoned")
            .deferred_bytes()
    }

    /// Lets the image change again.
    pub(crate) fn release(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(gate) = self.gate.take() {
            drop(gate);
            super::super::apply::spawn_drain(self.sv.clone());
        }
    }
}

impl Drop for ImageHold {
    fn drop(&mut self) {
        self.end();
    }
}

/// Holds `sv`'s live image still: takes the clone gate between two frames
/// (under the `apply_lock`, so no batch is half-applied), then gives the
/// `apply_lock` back at once. A point's clone that holds the gate is waited
/// for *without* the `apply_lock` (its own deferral must go on). The lock
/// order is the stream's own: `apply_lock`, then the gate.
pub(crate) async fn hold_image(sv: &Arc<SecondaryVolume>) -> ImageHold {
    loop {
        {
            let _frame = sv.apply_lock.lock().await;
            if let Ok(gate) = sv.points.clone_gate.clone().try_lock_owned() {
                let rec = sv.record();
                return ImageHold {
                    gate: Some(gate),
                    sv: sv.clone(),
                    consistent: rec.consistent,
                    at_unix_ns: rec.consistent_at_unix_ns,
                };
            }
        }
        drop(sv.points.wait_clone().await);
    }
}

impl VolumePoints {
    /// `FICLONE`s the live volume file `src` into the new file `dst`
    /// without fsyncing it (the caller holds an [`ImageHold`] for the clone
    /// alone and syncs `dst` after releasing it), counted as a clone in the
    /// data dir. The test hook `EMBER_FAULT_DELAY_CLONE` lengthens it as it
    /// does a point's clone. Blocking.
    ///
    /// # Errors
    /// As `ember_volume::cow::reflink_file_unsynced`.
    pub(crate) fn reflink_live_stepping_aside(
        &self,
        src: &Path,
        dst: &Path,
    ) -> Result<(), ember_volume::StoreError> {
        let _cloning = self.ctx.cloning();
        ember_volume::cow::reflink_file_unsynced(src, dst)?;
        if let Some(d) = self.ctx.delay_clone {
            fault_delay(&self.volume, d);
        }
        Ok(())
    }
}

fn fault_delay(volume: &str, d: Duration) {
    tracing::warn!(
        volume,
        delay_ms = d.as_millis() as u64,
        "FAULT: holding a drill's clone of the live image"
    );
    std::thread::sleep(d);
}
