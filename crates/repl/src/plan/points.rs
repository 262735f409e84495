//! Recovery-point decisions: when a scheduled point is due, which point a
//! selector means, which points retention and the space cap expire, and
//! which blocks changed since a point (what failback after a promotion to
//! that point must resend).
//!
//! Change sets are coarse: one bit per [`block_bytes`] of the volume (at
//! least 64 KiB, the tracker's default granularity, and at most
//! [`MAX_BLOCKS`] blocks per volume) so a point's record stays small. Each
//! point keeps `after`: the blocks applied between it and the next point
//! (for the newest point: since it, up to now). The blocks changed since
//! point *i* are the union of `after` of points *i..*; removing a point
//! folds its `after` into the previous point's, so no change is ever
//! forgotten by expiry.

use serde::{Deserialize, Serialize};

/// Most blocks a volume's change sets use (bounds a record's size).
pub(crate) const MAX_BLOCKS: u64 = 16_384;
/// Smallest change-set block: the tracker's default granularity, so the
/// resend after a promotion is no coarser than an ordinary resync.
pub(crate) const MIN_BLOCK_BYTES: u64 = 64 << 10;
const NS_PER_SEC: i64 = 1_000_000_000;

/// The change-set block size for a volume of `size_bytes`.
pub(crate) fn block_bytes(size_bytes: u64) -> u64 {
    size_bytes
        .div_ceil(MAX_BLOCKS)
        .div_ceil(MIN_BLOCK_BYTES)
        .max(1)
        * MIN_BLOCK_BYTES
}

/// A replica's point schedule and retention (set on the primary, carried
/// to the secondary in `OpenReplica`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Schedule {
    /// A scheduled point every this many seconds of the primary's clock
    /// (0: no scheduled points).
    #[serde(default)]
    pub(crate) every_secs: u64,
    /// Keep at most this many scheduled points (0: no count limit).
    #[serde(default)]
    pub(crate) keep: u32,
    /// Keep scheduled points at most this old (0: no age limit).
    #[serde(default)]
    pub(crate) keep_for_secs: u64,
}

/// Why a point was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PointKind {
    /// By the schedule (`--points-every`): expires by retention and first
    /// under the space cap.
    Scheduled,
    /// Asked for by an admin (`replica point create`): expires only under
    /// the space cap, after every scheduled point.
    Manual,
}

impl PointKind {
    /// Wire and CLI spelling.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Manual => "manual",
        }
    }
}

/// A set of change-set blocks: sorted, disjoint, non-adjacent runs
/// `[start, end)` of block indices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct Blocks(Vec<(u64, u64)>);

impl Blocks {
    /// Adds the blocks `[start, end)`; returns whether the set grew.
    pub(crate) fn insert(&mut self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        // First run that ends at or after `start` (touching counts).
        let first = self.0.partition_point(|&(_, e)| e < start);
        // Runs from `first` that begin at or before `end` merge with it.
        let last = self.0[first..].partition_point(|&(s, _)| s <= end) + first;
        if first == last {
            self.0.insert(first, (start, end));
            return true;
        }
        let merged = (start.min(self.0[first].0), end.max(self.0[last - 1].1));
        let grew = last - first > 1 || merged != self.0[first];
        self.0.splice(first..last, [merged]);
        grew
    }

    /// Adds the blocks covering bytes `[offset, offset + len)`.
    pub(crate) fn insert_bytes(&mut self, offset: u64, len: u64, block_bytes: u64) -> bool {
        if len == 0 || block_bytes == 0 {
            return false;
        }
        let end = offset.saturating_add(len).div_ceil(block_bytes);
        self.insert(offset / block_bytes, end)
    }

    /// Adds every block of `other`.
    pub(crate) fn union(&mut self, other: &Blocks) {
        for &(s, e) in &other.0 {
            self.insert(s, e);
        }
    }

    /// Whether every block of `other` is in the set.
    pub(crate) fn covers(&self, other: &Blocks) -> bool {
        other.0.iter().all(|&(s, e)| {
            let i = self.0.partition_point(|&(_, end)| end < e);
            self.0.get(i).is_some_and(|&(rs, re)| rs <= s && e <= re)
        })
    }

    /// The set with, after each run of `new`, `ahead` more blocks (capped
    /// at `limit`): what the write-ahead record persists, so a sequential
    /// writer costs one record per `ahead` blocks rather than one per
    /// batch. A superset only makes a later resend larger, never wrong.
    pub(crate) fn with_reserve(&self, new: &Blocks, ahead: u64, limit: u64) -> Blocks {
        let mut out = self.clone();
        for &(s, e) in &new.0 {
            out.insert(s, e.saturating_add(ahead).min(limit.max(e)));
        }
        out
    }

    /// Number of blocks in the set.
    pub(crate) fn count(&self) -> u64 {
        self.0.iter().map(|&(s, e)| e - s).sum()
    }

    /// The set as byte ranges `(offset, length)`, clipped to `size_bytes`.
    pub(crate) fn byte_ranges(&self, block_bytes: u64, size_bytes: u64) -> Vec<(u64, u64)> {
        self.0
            .iter()
            .filter_map(|&(s, e)| {
                let start = s.saturating_mul(block_bytes);
                let end = e.saturating_mul(block_bytes).min(size_bytes);
                (start < end).then_some((start, end - start))
            })
            .collect()
    }
}

/// A retained point's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PointMeta {
    /// Unique per volume.
    pub(crate) name: String,
    /// The primary-clock time the image represents (unix ns).
    pub(crate) at_unix_ns: i64,
    /// Scheduled or manual.
    pub(crate) kind: PointKind,
    /// The consistency group it was taken in (empty: none).
    #[serde(default)]
    pub(crate) group: String,
    /// The volume's size when it was taken.
    pub(crate) size_bytes: u64,
    /// Blocks applied after this point and before the next one (newest
    /// point: up to now).
    #[serde(default)]
    pub(crate) after: Blocks,
}

/// Which point a caller means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PointSelector {
    /// The newest retained point (drills default to it).
    #[cfg_attr(not(test), allow(dead_code))]
    Newest,
    /// The point of that name.
    Name(String),
    /// The newest point taken at or before this time (unix ns, the
    /// primary's clock).
    At(i64),
}

/// Why a selector matches no point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SelectError {
    /// No point is retained.
    NoPoints,
    /// No point has that name; `oldest` is the oldest retained one.
    UnknownName {
        /// The oldest retained point (name, time).
        oldest: (String, i64),
    },
    /// The time is before every retained point.
    TooOld {
        /// The oldest retained point (name, time).
        oldest: (String, i64),
    },
    /// The time is in the future.
    Future,
}

/// Whether a commit representing time `at` should take a scheduled point
/// when the newest scheduled point represents `newest`: once per `every`
/// interval of the primary's clock. The intervals are fixed buckets (not
/// "`every` after the last point"), so every member of a consistency group,
/// seeing the same group points, picks the same ones.
pub(crate) fn due(schedule: &Schedule, newest: Option<i64>, at: i64) -> bool {
    if schedule.every_secs == 0 || at <= 0 {
        return false;
    }
    let every = i64::try_from(schedule.every_secs)
        .unwrap_or(i64::MAX / NS_PER_SEC)
        .saturating_mul(NS_PER_SEC);
    match newest {
        None => true,
        Some(newest) => at.div_euclid(every) > newest.div_euclid(every),
    }
}

/// The index of the point `sel` means among `points` (oldest first).
///
/// # Errors
/// [`SelectError`] when it means none.
pub(crate) fn select(
    points: &[PointMeta],
    sel: &PointSelector,
    now_unix_ns: i64,
) -> Result<usize, SelectError> {
    let oldest = || {
        points
            .first()
            .map(|p| (p.name.clone(), p.at_unix_ns))
            .ok_or(SelectError::NoPoints)
    };
    match sel {
        PointSelector::Newest => points.len().checked_sub(1).ok_or(SelectError::NoPoints),
        PointSelector::Name(name) => match points.iter().position(|p| &p.name == name) {
            Some(i) => Ok(i),
            None => Err(SelectError::UnknownName { oldest: oldest()? }),
        },
        PointSelector::At(t) => {
            if *t > now_unix_ns {
                return Err(SelectError::Future);
            }
            match points.iter().rposition(|p| p.at_unix_ns <= *t) {
                Some(i) => Ok(i),
                None => Err(SelectError::TooOld { oldest: oldest()? }),
            }
        }
    }
}

/// For a consistency group: the one time every member holds a point at
/// that `sel` means. `members` holds each member's points (oldest first).
///
/// # Errors
/// [`SelectError`] as for [`select`], over the points common to all.
pub(crate) fn select_common(
    members: &[&[PointMeta]],
    sel: &PointSelector,
    now_unix_ns: i64,
) -> Result<i64, SelectError> {
    let Some((first, rest)) = members.split_first() else {
        return Err(SelectError::NoPoints);
    };
    let common: Vec<PointMeta> = first
        .iter()
        .filter(|p| {
            rest.iter()
                .all(|m| m.iter().any(|q| q.at_unix_ns == p.at_unix_ns))
        })
        .cloned()
        .collect();
    let i = select(&common, sel, now_unix_ns)?;
    Ok(common[i].at_unix_ns)
}

/// The blocks that changed since point `index`: what a promotion to it
/// must resend to the old primary on failback.
pub(crate) fn changes_since(points: &[PointMeta], index: usize) -> Blocks {
    let mut all = Blocks::default();
    for p in points.iter().skip(index) {
        all.union(&p.after);
    }
    all
}

/// Removes point `index`, folding its change set into the previous point
/// (the changes since that one still include them).
pub(crate) fn remove(points: &mut Vec<PointMeta>, index: usize) -> PointMeta {
    let gone = points.remove(index);
    if index > 0 {
        points[index - 1].after.union(&gone.after);
    }
    gone
}

/// The scheduled points retention expires: older than `keep_for_secs`
/// (by the primary-clock time they represent) or beyond the newest `keep`.
/// Manual points never expire by retention.
pub(crate) fn expired_by_retention(
    points: &[PointMeta],
    schedule: &Schedule,
    now_unix_ns: i64,
) -> Vec<String> {
    let scheduled: Vec<&PointMeta> = points
        .iter()
        .filter(|p| p.kind == PointKind::Scheduled)
        .collect();
    let keep = schedule.keep as usize;
    let too_many = if keep > 0 {
        scheduled.len().saturating_sub(keep)
    } else {
        0
    };
    let max_age = i64::try_from(schedule.keep_for_secs)
        .unwrap_or(i64::MAX / NS_PER_SEC)
        .saturating_mul(NS_PER_SEC);
    scheduled
        .iter()
        .enumerate()
        .filter(|(i, p)| {
            *i < too_many
                || (schedule.keep_for_secs > 0
                    && now_unix_ns.saturating_sub(p.at_unix_ns) > max_age)
        })
        .map(|(_, p)| p.name.clone())
        .collect()
}

/// One volume's points, for the space cap.
#[derive(Debug, Clone)]
pub(crate) struct VolumePoints {
    /// Volume name.
    pub(crate) volume: String,
    /// Its change-set block size.
    pub(crate) block_bytes: u64,
    /// Its points, oldest first.
    pub(crate) points: Vec<PointMeta>,
}

/// Bytes the points pin: every block overwritten since some point still
/// holds its old copy in a clone, so the estimate is the blocks in every
/// change set.
pub(crate) fn pinned_bytes(all: &[VolumePoints]) -> u64 {
    all.iter()
        .map(|v| {
            v.points
                .iter()
                .map(|p| p.after.count() * v.block_bytes)
                .sum::<u64>()
        })
        .sum()
}

/// The points to expire so the pinned bytes fit `cap_bytes`: the oldest
/// scheduled point of the data dir first, then (only if every scheduled
/// point is gone) the oldest manual one. Returns `(volume, point)` pairs
/// in expiry order.
pub(crate) fn expired_by_cap(all: &[VolumePoints], cap_bytes: u64) -> Vec<(String, String)> {
    let mut sim: Vec<VolumePoints> = all.to_vec();
    let mut victims = Vec::new();
    while pinned_bytes(&sim) > cap_bytes {
        let pick = |kind: PointKind| {
            sim.iter()
                .enumerate()
                .flat_map(|(v, vp)| {
                    vp.points
                        .iter()
                        .enumerate()
                        .filter(move |(_, p)| p.kind == kind)
                        .map(move |(i, p)| (p.at_unix_ns, v, i))
                })
                .min()
        };
        let Some((_, v, i)) = pick(PointKind::Scheduled).or_else(|| pick(PointKind::Manual)) else {
            break;
        };
        let gone = remove(&mut sim[v].points, i);
        victims.push((sim[v].volume.clone(), gone.name));
    }
    victims
}

/// Whether `name` can name a point: 1 to 100 of `A-Z a-z 0-9 . _ : -`,
/// not starting with a dot (the image file is `NAME.img`; dot files are
/// the store's temporaries).
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The name a manual point gets when the operator names none: `manual-`
/// and the time it represents, then `-2`, `-3`, … when that is taken (two
/// points asked for before another batch commits represent the same time).
/// `taken` says whether a name is in use.
pub(crate) fn default_manual_name(at_rfc3339: &str, taken: impl Fn(&str) -> bool) -> String {
    let base = format!("manual-{at_rfc3339}");
    if !taken(&base) {
        return base;
    }
    (2u64..)
        .map(|n| format!("{base}-{n}"))
        .find(|n| !taken(n))
        .expect("an unused suffix exists")
}

/// Staged bytes of committed batches the secondary may hold, acknowledged
/// but not yet applied, while a point's clone runs: past this the stream
/// waits for the clone (it bounds the staging log on disk).
pub(crate) const MAX_DEFERRED_BYTES: u64 = 512 << 20;

/// What the secondary does with a batch it just made durable in its
/// staging log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitAction {
    /// Apply it now (and every batch deferred before it, first), then
    /// acknowledge it.
    Apply,
    /// Acknowledge it now and apply it once the running clone is done:
    /// it is durable in the staging log, which a crash replays.
    Defer,
}

/// Decides [`CommitAction`] for a committed batch of `batch_bytes`:
/// deferred only while a point's clone of the volume is running, never for
/// a consistency-group batch (its members apply together at the group
/// point) and never past [`MAX_DEFERRED_BYTES`] already deferred.
pub(crate) fn commit_action(
    group: bool,
    clone_running: bool,
    deferred_bytes: u64,
    batch_bytes: u64,
) -> CommitAction {
    if !group && clone_running && deferred_bytes.saturating_add(batch_bytes) <= MAX_DEFERRED_BYTES {
        CommitAction::Defer
    } else {
        CommitAction::Apply
    }
}

/// The length to cut a file being deleted down to next, `chunk` bytes at a
/// time from its end: expiry frees a clone's extents in steps, so a clone
/// that starts meanwhile waits for one step, not for the whole file.
pub(crate) fn reap_step(len: u64, chunk: u64) -> u64 {
    len.saturating_sub(chunk.max(1))
}

#[cfg(test)]
mod tests;
