//! A forced promotion keeps the secondary's recovery points as ordinary
//! snapshots of the promoted volume (`VOL@POINT`), so an operator who
//! promoted to the wrong point (or from a newest image that turned out to
//! be damaged) can still reach every other point: list, export, clone
//! them, or have Cinder create volumes from them.
//!
//! Each point's image is *renamed* into the volume's snapshots directory
//! (`VolumeStore::adopt_snapshot`): no data moves, and the image keeps the
//! extents it shares with the volume. From then on it is a snapshot like
//! any other: it stays until deleted (`emberctl snapshot delete`), and it
//! no longer counts against the points' space cap, which covers only the
//! points of secondaries. Their number is bounded by what the cap and the
//! retention kept at the promotion. A planned promotion (nothing lost: the
//! new primary starts from the old one's newest image) deletes the points
//! as before, so back-and-forth switchovers do not pile up snapshots.
//!
//! Names: point names may hold `:` (the RFC 3339 time in `auto-…` and
//! `manual-…`), snapshot names may not; [`snapshot_name`] maps them.

use std::collections::BTreeSet;

use ember_volume::VolumeStore;

use super::{PointMeta, VolumePoints};

/// The snapshot name a point keeps: `:` becomes `-` (snapshot names allow
/// `[A-Za-z0-9._-]`, not starting with `.` or `-`), a leading `.` or `-`
/// gets a `p` in front, and a name already `taken` (by an existing
/// snapshot or an earlier point of this conversion) gets `-2`, `-3`, …
pub(crate) fn snapshot_name(point: &str, taken: &BTreeSet<String>) -> String {
    let mut base: String = point
        .chars()
        .map(|c| if c == ':' { '-' } else { c })
        .collect();
    if base.starts_with('.') || base.starts_with('-') {
        base.insert(0, 'p');
    }
    if !taken.contains(&base) {
        return base;
    }
    (2u32..)
        .map(|n| format!("{base}-{n}"))
        .find(|n| !taken.contains(n))
        .expect("a free suffix exists")
}

/// The points to keep, oldest first: the retained ones and those a
/// rollback to an older point set aside.
fn to_keep(vp: &VolumePoints) -> Vec<PointMeta> {
    let st = vp.state();
    let mut all: Vec<PointMeta> = st
        .index
        .points
        .iter()
        .chain(st.index.superseded.iter())
        .cloned()
        .collect();
    all.sort_by(|a, b| a.at_unix_ns.cmp(&b.at_unix_ns).then(a.name.cmp(&b.name)));
    all
}

/// Turns every point of `vp` into a snapshot of its volume in `store`.
/// The caller holds [`VolumePoints::recording_done`]'s guard, so no point
/// is half-recorded. Best effort per point: one that cannot be kept (an
/// I/O error) is logged and left to the points directory's removal.
/// Returns the snapshot names made, oldest first.
pub(crate) async fn keep_as_snapshots(store: &VolumeStore, vp: &VolumePoints) -> Vec<String> {
    let volume = vp.volume.as_str();
    let mut taken: BTreeSet<String> = match store.list_snapshots(volume) {
        Ok(list) => list.into_iter().map(|(m, _)| m.name).collect(),
        Err(e) => {
            tracing::warn!(volume, error = %e, "cannot list snapshots; recovery points are not kept");
            return Vec::new();
        }
    };
    let mut kept = Vec::new();
    for p in to_keep(vp) {
        let name = snapshot_name(&p.name, &taken);
        let created_at_unix = p.at_unix_ns.div_euclid(1_000_000_000);
        match store
            .adopt_snapshot(volume, &name, &vp.image(&p.name), created_at_unix)
            .await
        {
            Ok(_) => {
                tracing::info!(volume, point = %p.name, snapshot = %name, "recovery point kept as a snapshot");
                taken.insert(name.clone());
                kept.push(name);
            }
            Err(e) => {
                tracing::warn!(volume, point = %p.name, error = %e, "cannot keep a recovery point as a snapshot");
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_names_map_to_valid_unique_snapshot_names() {
        let taken: BTreeSet<String> = ["before-upgrade", "x-2026-12-04T10-20-00.000Z"]
            .into_iter()
            .map(String::from)
            .collect();
        for (point, want) in [
            (
                "auto-2026-12-04T10:20:00.000Z",
                "auto-2026-12-04T10-20-00.000Z",
            ),
            (
                "manual-2026-12-04T10:20:00.000Z-2",
                "manual-2026-12-04T10-20-00.000Z-2",
            ),
            ("nightly", "nightly"),
            ("before-upgrade", "before-upgrade-2"),
            ("x-2026-12-04T10:20:00.000Z", "x-2026-12-04T10-20-00.000Z-2"),
            ("-odd", "p-odd"),
            (".hidden", "p.hidden"),
            (":colon", "p-colon"),
        ] {
            let got = snapshot_name(point, &taken);
            assert_eq!(got, want, "{point}");
            assert!(
                ember_common::SnapshotName::new(got.clone()).is_ok(),
                "{got}"
            );
        }
    }

    #[test]
    fn suffixes_count_up_past_every_taken_name() {
        let taken: BTreeSet<String> = ["p", "p-2", "p-3"].into_iter().map(String::from).collect();
        assert_eq!(snapshot_name("p", &taken), "p-4");
    }
}
