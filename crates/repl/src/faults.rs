//! Fault injection for tests, set by the agent from `EMBER_FAULT_*`
//! environment variables (and logged loudly when set). Never set in
//! production: every field's default is "no fault".

use std::time::Duration;

/// Faults the replication engine injects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Corrupt this many replication frames after their checksum is
    /// computed (`EMBER_FAULT_CORRUPT_FRAMES=N`): the secondary must refuse
    /// them.
    pub corrupt_frames: u64,
    /// Hold this volume's consistency-group commits back this long before
    /// sending them (`EMBER_FAULT_DELAY_GROUP_COMMIT=VOLUME:MS`): the other
    /// members' commits for the same point reach the secondary first, so a
    /// crash in between tests that none of them is applied alone.
    pub delay_group_commit: Option<(String, Duration)>,
    /// Hold a DR drill's creation at one stage this long
    /// (`EMBER_FAULT_DELAY_DRILL=STAGE:MS`, STAGE `cloned`: the image is
    /// cloned but not yet a volume; `published`: the volume exists but
    /// the drill record does not say so yet), so a test can `kill -9` the
    /// agent there and check what a restart leaves.
    pub delay_drill: Option<(String, Duration)>,
}

impl Faults {
    /// Reads the `EMBER_FAULT_*` variables.
    pub fn from_env() -> Self {
        let corrupt_frames = std::env::var("EMBER_FAULT_CORRUPT_FRAMES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let delay_group_commit = std::env::var("EMBER_FAULT_DELAY_GROUP_COMMIT")
            .ok()
            .and_then(|v| {
                let (volume, ms) = v.split_once(':')?;
                Some((volume.to_owned(), Duration::from_millis(ms.parse().ok()?)))
            });
        let delay_drill = std::env::var("EMBER_FAULT_DELAY_DRILL").ok().and_then(|v| {
            let (stage, ms) = v.split_once(':')?;
            Some((stage.to_owned(), Duration::from_millis(ms.parse().ok()?)))
        });
        Self {
            corrupt_frames,
            delay_group_commit,
            delay_drill,
        }
    }

    /// Whether any fault is set.
    pub fn any(&self) -> bool {
        *self != Self::default()
    }
}
