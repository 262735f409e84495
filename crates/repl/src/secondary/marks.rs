//! Common marks on a secondary (issue 14, forced re-homing): a small ring
//! of the blocks this secondary applied, in slots, and the marks its
//! primary announced ("every target has applied through time `m`"), each
//! tied to the slot its change set starts at.
//!
//! What a held mark `m` guarantees: this secondary's image differs from
//! the primary's image at `m` only in the blocks of the slots from the
//! mark's slot on. Why, given how a slot starts: a slot starts (only while
//! the image is consistent) with `start_at` = the secondary's consistent
//! point `c` at that moment; its image then is the primary's image at `c`
//! plus, in sync mode, direct writes applied after the barrier at `c`
//! (they follow `c` in the stream but precede the next barrier). A mark
//! `m` therefore starts one slot *before* the newest slot that started at
//! or before `m` ([`Ring::hold`]): the writes past that slot's start point
//! were applied after the previous slot began, so they are in its set.
//! Every write applied after is noted *before* it touches the volume (the
//! record is write-ahead, as `points.rs` does for recovery points), so a
//! crash only makes a set larger. A torn image (initial sync, unordered
//! frames) resets the ring: a set since a mark means nothing across it.
//!
//! Bounds: at most [`MAX_SLOTS`] slots; a slot is started only when a
//! newer mark arrives and the consistent point moved, and the primary
//! announces at most once a second. Marks whose slot fell out are dropped.
//!
//! Layout: `DATA/replicas/secondary/marks/VOL.json` (atomic replace).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ember_proto::repl::v1 as pb;
use serde::{Deserialize, Serialize};
use tonic::Status;

use super::SecondaryVolume;
use crate::plan::points::{Blocks, block_bytes};
use crate::plan::rehome::HeldPoint;

/// Slots kept. With one slot per second at most, a target lagging more
/// than this many announcements behind the others makes the newest common
/// mark fall out of the fast targets' rings (re-homing then compares the
/// whole volume by blake3, never resends less than it must).
pub(crate) const MAX_SLOTS: usize = 32;
/// Blocks the first tail record of a slot runs ahead of the applied
/// writes (as for recovery points); each later record of the same slot
/// reserves twice as much as the one before (see [`reserve_ahead`]).
const RESERVE_BLOCKS: u64 = 256;

/// How far ahead of each written run the `records`-th tail record since
/// the tail restarted reserves: `RESERVE_BLOCKS · 2^records`, at most
/// `limit` (the volume). On a sync target these records are on the
/// acknowledgement path of a write (write-ahead: an atomic file replace,
/// two fsyncs), and the tail restarts with every slot, about once a
/// second: with a fixed reserve a random writer paid one record per
/// few writes until the slot was covered (~50 a second on a 256 MiB
/// volume, measured as the sync write's p99 with a second target), with a
/// doubling one it pays at most log2(volume / reserve) + 1 per slot (the
/// record whose reserve reaches the volume's size covers all of it). The
/// superset only matters after a restart of this agent (the ring in
/// memory is exact), where a re-homing from a mark of that slot compares
/// more blocks by blake3: never sends more, never misses one.
pub(crate) fn reserve_ahead(records: u32, limit: u64) -> u64 {
    RESERVE_BLOCKS
        .checked_shl(records)
        .filter(|r| *r >> records == RESERVE_BLOCKS)
        .unwrap_or(u64::MAX)
        .min(limit.max(RESERVE_BLOCKS))
}

/// Blocks applied from one moment on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Slot {
    /// The secondary's consistent point when the slot started (unix ns,
    /// primary clock).
    pub(crate) start_at: i64,
    /// Blocks applied since, until the next slot started.
    pub(crate) blocks: Blocks,
}

/// A mark held: its time and the absolute number of the slot its change
/// set starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Mark {
    /// The announced time (unix ns, primary clock).
    pub(crate) id: i64,
    /// Absolute slot number (see [`Ring::first`]).
    pub(crate) slot: u64,
}

/// A target of the volume as its primary announced it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Sibling {
    /// Site name.
    pub(crate) site: String,
    /// `sync` / `async`.
    pub(crate) mode: String,
    /// RPO target, seconds.
    pub(crate) rpo_seconds: u64,
    /// RPO policy.
    pub(crate) rpo_policy: String,
    /// Peer-loss policy.
    pub(crate) on_peer_loss: String,
}

impl Sibling {
    /// From the wire.
    pub(crate) fn from_proto(t: &pb::RehomeTarget) -> Self {
        Self {
            site: t.site.clone(),
            mode: t.mode.clone(),
            rpo_seconds: t.rpo_seconds,
            rpo_policy: t.rpo_policy.clone(),
            on_peer_loss: t.on_peer_loss.clone(),
        }
    }
}

/// The ring: slots oldest first, the marks held, the volume's targets.
/// Invariants: slots' `start_at` strictly increase; every mark's slot is
/// in the ring; marks' ids strictly increase.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Ring {
    /// Change-set block size the slots are in.
    pub(crate) block_bytes: u64,
    /// Absolute number of `slots[0]`.
    pub(crate) first: u64,
    /// Oldest first.
    pub(crate) slots: Vec<Slot>,
    /// Oldest first.
    pub(crate) marks: Vec<Mark>,
    /// Every target of the volume, from the newest announcement.
    #[serde(default)]
    pub(crate) siblings: Vec<Sibling>,
}

impl Ring {
    /// Notes blocks about to be applied in the newest slot. Returns the
    /// blocks noted (`None`: no slot yet, nothing to record).
    pub(crate) fn note(&mut self, ranges: impl IntoIterator<Item = (u64, u64)>) -> Option<Blocks> {
        let g = self.block_bytes;
        let slot = self.slots.last_mut()?;
        let mut batch = Blocks::default();
        for (offset, len) in ranges {
            batch.insert_bytes(offset, len, g);
        }
        slot.blocks.union(&batch);
        Some(batch)
    }

    /// Forgets every slot and mark (the image was torn).
    pub(crate) fn reset(&mut self) -> bool {
        let had = !self.slots.is_empty() || !self.marks.is_empty();
        self.first += self.slots.len() as u64;
        self.slots.clear();
        self.marks.clear();
        had
    }

    /// A mark `id` was announced while this secondary's image is
    /// consistent at `consistent_at`. Starts a new slot when the
    /// consistent point moved past the newest slot's start, records the
    /// mark when it can be held, evicts old slots. Returns whether the
    /// mark is held.
    pub(crate) fn hold(&mut self, id: i64, consistent_at: i64) -> bool {
        if self.slots.last().is_none_or(|s| consistent_at > s.start_at) {
            self.slots.push(Slot {
                start_at: consistent_at,
                blocks: Blocks::default(),
            });
        }
        while self.slots.len() > MAX_SLOTS {
            self.slots.remove(0);
            self.first += 1;
        }
        let first = self.first;
        self.marks.retain(|m| m.slot >= first);
        // Not applied through it, or not newer than the newest held: the
        // guarantee would not hold (or adds nothing).
        if consistent_at < id || self.marks.last().is_some_and(|m| m.id >= id) {
            return false;
        }
        // The newest slot that started at or before the mark, then one
        // back (see the module doc); none that old: not held.
        let Some(j) = self.slots.iter().rposition(|s| s.start_at <= id) else {
            return false;
        };
        if j == 0 {
            return false;
        }
        self.marks.push(Mark {
            id,
            slot: first + j as u64 - 1,
        });
        true
    }

    /// The marks held with, per mark, the blocks applied after it and
    /// before the next mark held (newest: up to now), as the plan wants
    /// them.
    pub(crate) fn held(&self) -> Vec<HeldPoint> {
        let index = |m: &Mark| (m.slot - self.first) as usize;
        self.marks
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let end = self.marks.get(i + 1).map_or(self.slots.len(), index);
                let mut after = Blocks::default();
                for s in &self.slots[index(m)..end.max(index(m))] {
                    after.union(&s.blocks);
                }
                HeldPoint { id: m.id, after }
            })
            .collect()
    }
}

/// Block runs of `b` (in its own block units) for the wire.
pub(crate) fn runs_to_proto(b: &Blocks) -> Vec<pb::Range> {
    b.byte_ranges(1, u64::MAX)
        .into_iter()
        .map(|(offset, length)| pb::Range { offset, length })
        .collect()
}

/// Blocks from wire runs given in units of `from_block` bytes, in units of
/// `to_block` bytes (rounded outwards: a superset).
pub(crate) fn runs_from_proto(runs: &[pb::Range], from_block: u64, to_block: u64) -> Blocks {
    let mut out = Blocks::default();
    for r in runs {
        out.insert_bytes(
            r.offset.saturating_mul(from_block),
            r.length.saturating_mul(from_block),
            to_block,
        );
    }
    out
}

/// The ring of one secondary volume, persisted in two files: the ring
/// (written when a mark arrives or the ring resets) and the newest slot's
/// blocks (written ahead of the writes), so a write costs a small record,
/// not the whole ring.
#[derive(Debug)]
pub(crate) struct Marks {
    path: PathBuf,
    ring: Mutex<Ring>,
    /// The newest slot's blocks as persisted in the tail file (write-ahead:
    /// a superset of what was applied in it).
    persisted: Mutex<Blocks>,
    /// Serializes the record's writes (order: `io`, then `ring`, then
    /// `persisted`); holds the number of tail records since the tail
    /// last restarted (for [`reserve_ahead`]).
    io: Mutex<u32>,
    size_blocks: u64,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

/// `DATA/replicas/secondary/marks/VOL.json`.
pub(crate) fn path(secondary_dir: &Path, volume: &str) -> PathBuf {
    secondary_dir.join("marks").join(format!("{volume}.json"))
}

fn tail_path(path: &Path) -> PathBuf {
    path.with_extension("tail.json")
}

impl Marks {
    /// Loads the ring of a volume of `size_bytes` (a fresh one if none).
    ///
    /// # Errors
    /// An unreadable record.
    pub(crate) fn open(path: PathBuf, size_bytes: u64) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut ring: Ring = if path.exists() {
            ember_volume::fsutil::read_json(&path)
                .map_err(|e| std::io::Error::other(e.to_string()))?
        } else {
            Ring {
                block_bytes: block_bytes(size_bytes),
                ..Ring::default()
            }
        };
        // The tail belongs to the newest slot, or (a crash right after a
        // new slot was recorded) to the one before: adding it to the
        // newest only makes that set larger.
        let tail: Blocks = ember_volume::fsutil::read_json(&tail_path(&path)).unwrap_or_default();
        if let Some(last) = ring.slots.last_mut() {
            last.blocks.union(&tail);
        }
        let persisted = ring
            .slots
            .last()
            .map(|s| s.blocks.clone())
            .unwrap_or_default();
        let g = ring.block_bytes.max(1);
        Ok(Self {
            path,
            ring: Mutex::new(ring),
            persisted: Mutex::new(persisted),
            io: Mutex::new(0),
            size_blocks: size_bytes.div_ceil(g),
        })
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().expect("marks lock poisoned")
    }

    fn persisted(&self) -> std::sync::MutexGuard<'_, Blocks> {
        self.persisted.lock().expect("marks lock poisoned")
    }

    /// A copy of the ring.
    pub(crate) fn snapshot(&self) -> Ring {
        self.ring().clone()
    }

    /// The in-memory half of noting `ranges` (about to be applied):
    /// returns the blocks the persisted record does not cover yet.
    pub(crate) fn note_in_memory(
        &self,
        ranges: impl IntoIterator<Item = (u64, u64)>,
    ) -> Option<Blocks> {
        let batch = self.ring().note(ranges)?;
        (!self.persisted().covers(&batch)).then_some(batch)
    }

    /// Makes the persisted tail cover `batch`. Blocking (an atomic file
    /// replace when it writes).
    pub(crate) fn persist_covering(&self, batch: &Blocks) -> Result<(), Status> {
        let mut records = self.io.lock().expect("marks io lock poisoned");
        let tail = {
            let persisted = self.persisted();
            if persisted.covers(batch) {
                return Ok(());
            }
            let ahead = reserve_ahead(*records, self.size_blocks);
            if ahead >= self.size_blocks {
                // As far as the reserve goes: the whole volume, so no
                // write of this slot needs another record.
                let mut all = persisted.clone();
                all.insert(0, self.size_blocks);
                all
            } else {
                persisted.with_reserve(batch, ahead, self.size_blocks)
            }
        };
        ember_volume::fsutil::write_json_atomic(&tail_path(&self.path), &tail)
            .map_err(|e| io_err("persisting the common marks' change set", e))?;
        *self.persisted() = tail;
        *records = records.saturating_add(1);
        Ok(())
    }

    /// Write-ahead: `ranges` are about to change on the volume. Blocking.
    pub(crate) fn note(&self, ranges: impl IntoIterator<Item = (u64, u64)>) -> Result<(), Status> {
        match self.note_in_memory(ranges) {
            Some(batch) => self.persist_covering(&batch),
            None => Ok(()),
        }
    }

    /// Changes the ring durably (a mark, a reset). The ring is written
    /// with every slot's blocks, then the tail restarts from the newest
    /// slot's. Blocking.
    fn mutate<R>(&self, f: impl FnOnce(&mut Ring) -> R) -> Result<R, Status> {
        let mut records = self.io.lock().expect("marks io lock poisoned");
        let (mut ring, out) = {
            let mut ring = self.ring();
            let out = f(&mut ring);
            (ring.clone(), out)
        };
        // The newest slot as persisted may run ahead of memory (reserve):
        // keep that superset in what is written.
        let persisted = self.persisted().clone();
        let newest = ring.slots.len().checked_sub(1);
        let fresh = newest.is_some_and(|i| ring.slots[i].blocks == Blocks::default());
        if let Some(i) = newest.filter(|_| !fresh) {
            ring.slots[i].blocks.union(&persisted);
        } else if let Some(prev) = ring.slots.len().checked_sub(2) {
            ring.slots[prev].blocks.union(&persisted);
        }
        ember_volume::fsutil::write_json_atomic(&self.path, &ring)
            .map_err(|e| io_err("persisting the common marks", e))?;
        let tail = ring
            .slots
            .last()
            .map(|s| s.blocks.clone())
            .unwrap_or_default();
        ember_volume::fsutil::write_json_atomic(&tail_path(&self.path), &tail)
            .map_err(|e| io_err("persisting the common marks' change set", e))?;
        *self.persisted() = tail;
        *records = 0;
        Ok(out)
    }

    /// Records an announced mark (see [`Ring::hold`]) and the targets.
    pub(crate) fn hold(
        &self,
        id: i64,
        consistent_at: i64,
        siblings: Vec<Sibling>,
    ) -> Result<bool, Status> {
        self.mutate(|r| {
            r.siblings = siblings;
            r.hold(id, consistent_at)
        })
    }

    /// Records the volume's targets (when they changed). Blocking.
    pub(crate) fn set_siblings(&self, siblings: Vec<Sibling>) -> Result<(), Status> {
        if self.ring().siblings == siblings {
            return Ok(());
        }
        self.mutate(|r| r.siblings = siblings)
    }

    /// Forgets slots and marks (the image is being torn). Blocking; free
    /// when there is nothing to forget.
    pub(crate) fn reset(&self) -> Result<(), Status> {
        {
            let ring = self.ring();
            if ring.slots.is_empty() && ring.marks.is_empty() {
                return Ok(());
            }
        }
        self.mutate(Ring::reset).map(drop)
    }

    /// Deletes the record (the secondary role ends).
    pub(crate) fn delete(&self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(tail_path(&self.path));
    }
}

impl SecondaryVolume {
    /// Write-ahead for the common marks: `ranges` are about to be applied
    /// directly. A torn image (the record says inconsistent: unordered
    /// frames are applied) resets the ring first. Blocking.
    pub(crate) fn note_marks(&self, ranges: &[(u64, u64)]) -> Result<(), Status> {
        if !self.record().consistent {
            self.marks.reset()?;
        }
        self.marks.note(ranges.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Ring {
        Ring {
            block_bytes: 1,
            ..Ring::default()
        }
    }

    fn blocks(runs: &[(u64, u64)]) -> Blocks {
        let mut b = Blocks::default();
        for &(s, e) in runs {
            b.insert(s, e);
        }
        b
    }

    #[test]
    fn a_mark_starts_one_slot_before_the_newest_slot_at_or_before_it() {
        let mut r = ring();
        // No slot before: the first mark only starts the ring.
        assert!(!r.hold(100, 100), "first slot: nothing before it");
        r.note([(1, 1)]);
        // The mark 150 at consistent point 200: slot 0 (start 100) is the
        // newest at or before 150, one back is none: not held.
        assert!(!r.hold(150, 200));
        r.note([(2, 1)]);
        // Mark 250 at 300: slots start 100, 200, 300; the newest at or
        // before 250 is slot 1 (200), so the set starts at slot 0.
        assert!(r.hold(250, 300));
        r.note([(3, 1)]);
        let held = r.held();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].id, 250);
        assert_eq!(held[0].after, blocks(&[(1, 4)]));
    }

    #[test]
    fn marks_not_applied_through_or_older_are_not_held() {
        let mut r = ring();
        r.hold(0, 10);
        r.hold(0, 20);
        r.hold(0, 30);
        assert!(!r.hold(40, 35), "not applied through the mark");
        assert!(r.hold(25, 40));
        assert!(!r.hold(25, 50), "the same mark again");
        assert!(!r.hold(24, 60), "an older mark");
        assert!(r.hold(55, 70));
        let held = r.held();
        assert_eq!(held.iter().map(|h| h.id).collect::<Vec<_>>(), [25, 55]);
    }

    #[test]
    fn the_sets_since_each_mark_cover_every_later_slot() {
        let mut r = ring();
        r.hold(0, 10);
        r.note([(0, 1)]);
        r.hold(0, 20);
        r.note([(5, 1)]);
        assert!(r.hold(20, 30)); // slot 0 on
        r.note([(9, 1)]);
        assert!(r.hold(30, 40)); // slot 1 on
        r.note([(12, 1)]);
        let held = r.held();
        // The first mark's own part: slot 0 only (the next mark starts at
        // slot 1); the union from it is everything.
        assert_eq!(held[0].after, blocks(&[(0, 1)]));
        let mut since = held[0].after.clone();
        since.union(&held[1].after);
        assert_eq!(since, blocks(&[(0, 1), (5, 6), (9, 10), (12, 13)]));
    }

    #[test]
    fn a_consistent_point_that_did_not_move_starts_no_slot() {
        let mut r = ring();
        r.hold(0, 10);
        r.hold(0, 10);
        assert_eq!(r.slots.len(), 1);
    }

    #[test]
    fn the_ring_is_bounded_and_drops_marks_whose_slot_fell_out() {
        let mut r = ring();
        for i in 1..=(MAX_SLOTS as i64 + 10) {
            r.hold(i * 10 - 15, i * 10);
        }
        assert_eq!(r.slots.len(), MAX_SLOTS);
        assert!(r.marks.iter().all(|m| m.slot >= r.first));
        assert!(!r.held().is_empty());
    }

    #[test]
    fn a_reset_forgets_everything_and_notes_nothing_until_a_new_slot() {
        let mut r = ring();
        r.hold(0, 10);
        r.hold(0, 20);
        assert!(r.hold(25, 30));
        assert!(r.reset());
        assert!(r.held().is_empty());
        assert_eq!(r.note([(1, 1)]), None);
        assert!(!r.reset());
    }

    #[test]
    fn wire_runs_convert_between_block_sizes_as_supersets() {
        let b = blocks(&[(1, 3), (10, 11)]);
        let wire = runs_to_proto(&b);
        assert_eq!(runs_from_proto(&wire, 4, 4), b);
        // 4-byte blocks into 8-byte blocks: bytes 4..12 and 40..44.
        assert_eq!(runs_from_proto(&wire, 4, 8), blocks(&[(0, 2), (5, 6)]));
    }

    #[test]
    fn the_record_survives_a_reopen_and_covers_what_was_noted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = path(dir.path(), "v");
        let m = Marks::open(p.clone(), 1 << 30).expect("open");
        m.hold(0, 10, Vec::new()).expect("hold");
        m.hold(0, 20, Vec::new()).expect("hold");
        assert!(m.hold(25, 30, Vec::new()).expect("hold"));
        m.note([(0, 4096), (10 << 20, 4096)]).expect("note");
        // As after kill -9: only what was persisted is read back.
        let again = Marks::open(p, 1 << 30).expect("reopen");
        let held = again.snapshot().held();
        assert_eq!(held.len(), 1);
        let want = m.snapshot().held();
        assert!(
            held[0].after.covers(&want[0].after),
            "the persisted change set covers every noted block"
        );
    }

    #[test]
    fn each_tail_record_of_a_slot_reserves_twice_the_one_before() {
        let r = RESERVE_BLOCKS;
        // (records since the tail restarted, volume blocks, reserve)
        let table = [
            (0, 16_384, r),
            (1, 16_384, 2 * r),
            (3, 16_384, 8 * r),
            (6, 16_384, 16_384),
            (40, 16_384, 16_384),
            (u32::MAX, 16_384, 16_384),
            // A volume smaller than the first reserve.
            (0, 10, r),
            (5, 10, r),
        ];
        for (records, limit, want) in table {
            assert_eq!(
                reserve_ahead(records, limit),
                want,
                "records {records}, limit {limit}"
            );
        }
    }

    /// What the sync target's write path pays: a random 4 KiB writer over a
    /// 256 MiB volume (4,096 blocks of 64 KiB) costs at most a handful of
    /// tail records per slot, and a reopen still covers every noted write.
    #[test]
    fn a_random_writer_costs_a_few_tail_records_per_slot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = path(dir.path(), "v");
        let size = 256 << 20;
        let m = Marks::open(p.clone(), size).expect("open");
        m.hold(0, 10, Vec::new()).expect("hold");
        m.hold(0, 20, Vec::new()).expect("hold");
        assert!(m.hold(25, 30, Vec::new()).expect("hold"));
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut records = 0;
        for _ in 0..5_000 {
            // xorshift: a fixed pseudo-random sequence of 4 KiB offsets.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let offset = (x % (size / 4096)) * 4096;
            if let Some(batch) = m.note_in_memory([(offset, 4096)]) {
                m.persist_covering(&batch).expect("persist");
                records += 1;
            }
        }
        // Reserves 256, 512, 1,024, 2,048, then 4,096 = the volume.
        assert!(records <= 5, "{records} tail records for one slot");
        let again = Marks::open(p, size).expect("reopen");
        let held = again.snapshot().held();
        assert!(held[0].after.covers(&m.snapshot().held()[0].after));
    }
}
