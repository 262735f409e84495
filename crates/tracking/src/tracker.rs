//! [`Tracker`]: the write-path interface of change tracking.
//!
//! Write-path protocol (the caller is the volume layer):
//! 1. [`Tracker::begin_write`] marks the blocks dirty in memory and pins the
//!    activity-log extents the write touches. If one of them is not yet in a
//!    durable log record, the admission carries a `commit_seq`.
//! 2. If so, [`Tracker::commit`] (blocking: fsyncs) must return `Ok` before
//!    the data write is issued. Concurrent commits group: one fsync covers
//!    every admission made before its record was snapshotted.
//! 3. After the data write completes (or fails), [`Tracker::end_write`]
//!    unpins the extents. Only unpinned extents may leave the log.
//!
//! When an extent leaves the log (LRU eviction beyond `al_extents`), its
//! bitmap words are written and synced *before* the log record that no
//! longer names it. So at every instant: on-disk bitmap ∪ newest durable
//! log record ⊇ every block written since the last clean point.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use ember_common::Extent;

use crate::activity_log::{ActivityLog, AlRecord, MAX_RECORD_EXTENTS};
use crate::bitmap::Bitmap;
use crate::bitmap_file::BitmapFile;
use crate::error::{Result, TrackingError};

/// File names inside the tracking directory.
const BITMAP_FILE: &str = "dirty.bitmap";
const AL_FILE: &str = "activity.log";

/// Tracking parameters of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackingConfig {
    /// Bytes per bitmap bit.
    ///
    /// Default 64 KiB, QEMU's default dirty-bitmap granularity: 2 MiB of
    /// bitmap per TiB of volume (whole bitmap rewrites stay cheap) and at
    /// worst 16× resync amplification for isolated 4 KiB writes, which
    /// sequential and database workloads rarely approach.
    pub granularity_bytes: u64,
    /// Bytes per activity-log extent. Default 4 MiB, as DRBD.
    pub al_extent_bytes: u64,
    /// Hot extents kept in the log before the least recently used is
    /// evicted. Default 512: a 2 GiB window. A larger window means fewer
    /// metadata fsyncs under scattered writes but more resync after a crash.
    pub al_extents: usize,
}

impl Default for TrackingConfig {
    fn default() -> Self {
        Self {
            granularity_bytes: 64 * 1024,
            al_extent_bytes: 4 * 1024 * 1024,
            al_extents: 512,
        }
    }
}

impl TrackingConfig {
    /// Checks that the sizes nest: powers of two, 4 KiB ≤ granularity ≤
    /// extent, and a log that fits one record.
    ///
    /// # Errors
    /// [`TrackingError::InvalidConfig`] naming the offending value.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(TrackingError::InvalidConfig(msg));
        if !self.granularity_bytes.is_power_of_two() || self.granularity_bytes < 4096 {
            return bad(format!(
                "granularity {} must be a power of two of at least 4096",
                self.granularity_bytes
            ));
        }
        if !self.al_extent_bytes.is_power_of_two() || self.al_extent_bytes < self.granularity_bytes
        {
            return bad(format!(
                "activity-log extent {} must be a power of two no smaller than the granularity",
                self.al_extent_bytes
            ));
        }
        if self.al_extents == 0 || self.al_extents > MAX_RECORD_EXTENTS / 2 {
            return bad(format!(
                "al_extents {} must be between 1 and {}",
                self.al_extents,
                MAX_RECORD_EXTENTS / 2
            ));
        }
        Ok(())
    }

    /// The activity-log window: the most bytes a crash can add to the dirty set.
    pub fn window_bytes(&self) -> u64 {
        self.al_extent_bytes * self.al_extents as u64
    }
}

/// Bitmap words to write before a log record: (consumer or default, first word, words).
type EvictedWords = (Option<String>, usize, Vec<u64>);

/// Extents pinned by one admitted write; give it back to [`Tracker::end_write`].
#[derive(Debug)]
#[must_use = "pass the admission to Tracker::end_write once the write is done"]
pub struct Admission {
    extents: std::ops::Range<u32>,
    /// Bitmap blocks `[start, end)` the write covers.
    blocks: (u64, u64),
    /// When set, `commit(seq)` must succeed before the data write is issued.
    pub commit_seq: Option<u64>,
}

/// An open checkpoint: blocks written since it was opened.
#[derive(Debug)]
pub struct Checkpoint {
    /// Identifier handed to the consumer.
    pub id: u64,
    since: Bitmap,
}

/// Answer to a dirty-extents query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyReport {
    /// Dirty byte runs, ascending, merged.
    pub extents: Vec<Extent>,
    /// Checkpoint opened by this query.
    pub checkpoint_id: u64,
    /// Total dirty bytes.
    pub dirty_bytes: u64,
}

#[derive(Debug)]
struct ActiveExtent {
    pins: u32,
    last_use: u64,
    /// Sequence number of the first log record naming this extent.
    added_seq: u64,
}

#[derive(Debug)]
struct State {
    size_bytes: u64,
    bits: Bitmap,
    checkpoint: Option<Checkpoint>,
    next_checkpoint: u64,
    active: HashMap<u32, ActiveExtent>,
    clock: u64,
    /// Sequence number the next log record will carry minus one.
    al_seq: u64,
    durable_seq: u64,
    /// Extents evicted since the last commit whose words must reach disk first.
    evicted: Vec<u32>,
    /// Change watchers: blocks whose writes *completed* since each watch began.
    watchers: HashMap<u64, Bitmap>,
    next_watch: u64,
    /// Named persistent change sets (one per replica), beside the default one.
    consumers: BTreeMap<String, consumer::Consumer>,
}

#[derive(Debug)]
struct Files {
    bitmap: BitmapFile,
    log: ActivityLog,
    consumers: HashMap<String, BitmapFile>,
}

/// Change tracking for one volume. Thread-safe; see the module docs for the
/// write-path protocol.
#[derive(Debug)]
pub struct Tracker {
    config: TrackingConfig,
    state: Mutex<State>,
    /// Held while writing tracking files; orders bitmap flushes before log records.
    files: Mutex<Files>,
}

impl Tracker {
    /// Opens tracking state in `dir` for a volume of `size_bytes`, creating
    /// it if absent and recovering after a crash: the dirty set becomes the
    /// on-disk bitmap plus every extent of the newest log record, which is
    /// then folded into the bitmap so the log starts empty.
    ///
    /// # Errors
    /// Bad configuration, I/O errors, or files that belong to another
    /// volume geometry.
    pub fn open(dir: &Path, size_bytes: u64, config: TrackingConfig) -> Result<Self> {
        config.validate()?;
        let g = config.granularity_bytes;
        let blocks = size_bytes.div_ceil(g);
        let (bitmap_file, stored) = BitmapFile::open(&dir.join(BITMAP_FILE), g)?;
        let log = ActivityLog::open(&dir.join(AL_FILE))?;
        let mut bits = stored.unwrap_or_else(|| Bitmap::new(blocks));
        if bits.len() != blocks {
            bits.resize(blocks);
        }
        let replayed = log.replay()?;
        let mut seq = replayed.as_ref().map_or(0, |r| r.seq);
        let mut window = 0;
        let mut consumers = consumer::load_all(dir, g, blocks)?;
        if let Some(record) = &replayed {
            for &e in &record.extents {
                let start = u64::from(e) * record.al_extent_bytes;
                let (first, end) = (start / g, (start + record.al_extent_bytes).div_ceil(g));
                bits.set_range(first, end);
                for (_, (_, c)) in consumers.iter_mut() {
                    c.bits.set_range(first, end);
                }
            }
            window = record.extents.len();
        }
        // Fold the window into the bitmaps and start with an empty log, so
        // the next crash does not widen the set again.
        bitmap_file.write_all(&bits, g)?;
        for (file, c) in consumers.values() {
            file.write_all(&c.bits, g)?;
        }
        let (consumer_files, consumers): (HashMap<_, _>, BTreeMap<_, _>) = consumers
            .into_iter()
            .map(|(name, (file, c))| ((name.clone(), file), (name, c)))
            .unzip();
        seq += 1;
        log.append(&AlRecord {
            seq,
            al_extent_bytes: config.al_extent_bytes,
            extents: Vec::new(),
        })?;
        tracing::info!(
            dir = %dir.display(),
            dirty_bytes = bits.count_ones() * g,
            replayed_extents = window,
            "change tracking opened"
        );
        Ok(Self {
            config,
            state: Mutex::new(State {
                size_bytes,
                bits,
                checkpoint: None,
                next_checkpoint: 1,
                active: HashMap::new(),
                clock: 0,
                al_seq: seq,
                durable_seq: seq,
                evicted: Vec::new(),
                watchers: HashMap::new(),
                next_watch: 1,
                consumers,
            }),
            files: Mutex::new(Files {
                bitmap: bitmap_file,
                log,
                consumers: consumer_files,
            }),
        })
    }

    /// This tracker's parameters.
    pub fn config(&self) -> TrackingConfig {
        self.config
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("tracking state lock poisoned by a panic")
    }

    /// Marks `[offset, offset + len)` dirty and pins its log extents.
    ///
    /// # Errors
    /// [`TrackingError::ActivityLogFull`] when in-flight writes pin more
    /// extents than one record holds; the write must then fail.
    pub fn begin_write(&self, offset: u64, len: u64) -> Result<Admission> {
        let g = self.config.granularity_bytes;
        let al = self.config.al_extent_bytes;
        if len == 0 {
            return Ok(Admission {
                extents: 0..0,
                blocks: (0, 0),
                commit_seq: None,
            });
        }
        let mut st = self.state();
        let (start, end) = (offset / g, (offset + len).div_ceil(g));
        st.bits.set_range(start, end);
        if let Some(cp) = st.checkpoint.as_mut() {
            cp.since.set_range(start, end);
        }
        for c in st.consumers.values_mut() {
            c.mark(start, end);
        }
        let first = (offset / al) as u32;
        let last = ((offset + len - 1) / al) as u32;
        let mut needed = 0;
        for e in first..=last {
            st.clock += 1;
            let clock = st.clock;
            if let Some(active) = st.active.get_mut(&e) {
                active.pins += 1;
                active.last_use = clock;
                needed = needed.max(active.added_seq);
                continue;
            }
            if st.active.len() >= MAX_RECORD_EXTENTS {
                let pinned = st.active.len();
                Self::unpin(&mut st, first..e);
                return Err(TrackingError::ActivityLogFull { pinned });
            }
            st.al_seq += 1;
            let added_seq = st.al_seq;
            st.active.insert(
                e,
                ActiveExtent {
                    pins: 1,
                    last_use: clock,
                    added_seq,
                },
            );
            needed = added_seq;
        }
        self.evict_cold(&mut st);
        Ok(Admission {
            extents: first..last + 1,
            blocks: (start, end),
            commit_seq: (needed > st.durable_seq).then_some(needed),
        })
    }

    /// Evicts least recently used unpinned extents beyond the log capacity.
    /// If every extent is pinned the log temporarily exceeds its capacity.
    fn evict_cold(&self, st: &mut State) {
        while st.active.len() > self.config.al_extents {
            let victim = st
                .active
                .iter()
                .filter(|(_, a)| a.pins == 0)
                .min_by_key(|(_, a)| a.last_use)
                .map(|(&e, _)| e);
            let Some(victim) = victim else { break };
            st.active.remove(&victim);
            st.evicted.push(victim);
            // The record that drops the victim must be written before the
            // log can be trusted to not name it; bump so the next commit
            // carries the removal.
            st.al_seq += 1;
        }
    }

    fn unpin(st: &mut State, extents: std::ops::Range<u32>) {
        for e in extents {
            let active = st
                .active
                .get_mut(&e)
                .expect("pinned extent is in the active set");
            active.pins -= 1;
        }
    }

    /// Makes the log record covering admission `seq` durable (blocking).
    /// Flushes the bitmap words of evicted extents first.
    ///
    /// # Errors
    /// I/O errors; the write that needed this commit must fail.
    pub fn commit(&self, seq: u64) -> Result<()> {
        let files = self
            .files
            .lock()
            .expect("tracking files lock poisoned by a panic");
        let (record, evicted, words) = {
            let mut st = self.state();
            if st.durable_seq >= seq {
                return Ok(());
            }
            let evicted = std::mem::take(&mut st.evicted);
            let words = self.evicted_words(&st, &evicted);
            let mut extents: Vec<u32> = st.active.keys().copied().collect();
            extents.sort_unstable();
            let record = AlRecord {
                seq: st.al_seq,
                al_extent_bytes: self.config.al_extent_bytes,
                extents,
            };
            (record, evicted, words)
        };
        let result = self.write_record(&files, &record, &words);
        let mut st = self.state();
        match result {
            Ok(()) => {
                st.durable_seq = st.durable_seq.max(record.seq);
                Ok(())
            }
            Err(e) => {
                st.evicted.extend(evicted);
                Err(e)
            }
        }
    }

    /// Copies of the bitmap words covering `evicted`, in the default bitmap
    /// (`None`) and every consumer's, as (consumer, first word, words).
    fn evicted_words(&self, st: &State, evicted: &[u32]) -> Vec<EvictedWords> {
        let per_extent = self.config.al_extent_bytes / self.config.granularity_bytes;
        let maps = std::iter::once((None, &st.bits))
            .chain(st.consumers.iter().map(|(n, c)| (Some(n.clone()), &c.bits)));
        let mut out = Vec::new();
        for (owner, bits) in maps {
            let all = bits.words();
            for &e in evicted {
                let first = (u64::from(e) * per_extent / 64) as usize;
                let end = ((u64::from(e) + 1) * per_extent).div_ceil(64) as usize;
                let end = end.min(all.len());
                let first = first.min(end);
                out.push((owner.clone(), first, all[first..end].to_vec()));
            }
        }
        out
    }

    fn write_record(&self, files: &Files, record: &AlRecord, words: &[EvictedWords]) -> Result<()> {
        if !words.is_empty() {
            for (owner, first, chunk) in words {
                let file = match owner {
                    None => &files.bitmap,
                    Some(name) => match files.consumers.get(name) {
                        Some(f) => f,
                        None => continue,
                    },
                };
                file.write_raw_words(*first, chunk)?;
            }
            files.bitmap.sync()?;
            for f in files.consumers.values() {
                f.sync()?;
            }
        }
        files.log.append(record)
    }

    /// Unpins the extents of a finished (or failed) write, and records it
    /// in every change watcher.
    pub fn end_write(&self, admission: Admission) {
        let mut st = self.state();
        let (start, end) = admission.blocks;
        for bits in st.watchers.values_mut() {
            bits.set_range(start, end);
        }
        Self::unpin(&mut st, admission.extents);
    }

    /// Starts a change watcher: an in-memory record of blocks whose writes
    /// complete from now on (not persisted; for copies that run while the
    /// volume is written, like live snapshots). Recording at completion
    /// rather than admission means a write in flight when one watcher is
    /// taken lands in the next one.
    pub fn watch(&self) -> u64 {
        let mut st = self.state();
        let id = st.next_watch;
        st.next_watch += 1;
        let blocks = st.bits.len();
        st.watchers.insert(id, Bitmap::new(blocks));
        id
    }

    /// Ends watcher `id`, returning the blocks written while it ran.
    pub fn take_watch(&self, id: u64) -> Option<Bitmap> {
        self.state().watchers.remove(&id)
    }

    /// Byte extents of a watcher's bitmap, clamped to the volume size.
    pub fn watch_extents(&self, bits: &Bitmap) -> Vec<Extent> {
        let size = self.state().size_bytes;
        bits.extents(self.config.granularity_bytes, size)
    }

    /// Reports every dirty block and opens a new checkpoint. A checkpoint
    /// opened earlier and not cleared is superseded.
    pub fn dirty_extents(&self) -> DirtyReport {
        let g = self.config.granularity_bytes;
        let mut st = self.state();
        let id = st.next_checkpoint;
        st.next_checkpoint += 1;
        let since = self.in_flight_blocks(&st);
        st.checkpoint = Some(Checkpoint { id, since });
        DirtyReport {
            extents: st.bits.extents(g, st.size_bytes),
            checkpoint_id: id,
            dirty_bytes: st.bits.count_ones() * g,
        }
    }

    /// Forgets blocks reported at checkpoint `id`, keeping those written
    /// since, and persists the smaller bitmap. Returns the dirty bytes left.
    ///
    /// # Errors
    /// [`TrackingError::StaleCheckpoint`] when `id` is not the open
    /// checkpoint; I/O errors persisting (the in-memory clear stands, and
    /// the on-disk bitmap stays a superset, which is safe).
    pub fn clear(&self, id: u64) -> Result<u64> {
        let g = self.config.granularity_bytes;
        let files = self
            .files
            .lock()
            .expect("tracking files lock poisoned by a panic");
        let snapshot = {
            let mut st = self.state();
            let open = st.checkpoint.as_ref().map(|c| c.id);
            if open != Some(id) {
                return Err(TrackingError::StaleCheckpoint { given: id, open });
            }
            let cp = st.checkpoint.take().expect("checked above");
            st.bits = cp.since;
            st.bits.clone()
        };
        files.bitmap.write_all(&snapshot, g)?;
        Ok(snapshot.count_ones() * g)
    }

    /// Bytes currently marked dirty.
    pub fn dirty_bytes(&self) -> u64 {
        self.state().bits.count_ones() * self.config.granularity_bytes
    }

    /// Dirty/clean runs covering `[offset, offset + len)` clamped to the
    /// volume, as `(length, dirty)`; for NBD's dirty-bitmap meta context.
    pub fn status_runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let g = self.config.granularity_bytes;
        let st = self.state();
        let end = (offset + len).min(st.size_bytes);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / g;
            let block_end = ((block + 1) * g).min(end);
            let dirty = st.bits.get(block);
            match runs.last_mut() {
                Some((l, d)) if *d == dirty => *l += block_end - pos,
                _ => runs.push((block_end - pos, dirty)),
            }
            pos = block_end;
        }
        runs
    }

    /// Adapts to a new volume size (new blocks start clean) and persists.
    ///
    /// # Errors
    /// I/O errors writing the bitmap.
    pub fn resize(&self, size_bytes: u64) -> Result<()> {
        let g = self.config.granularity_bytes;
        let files = self
            .files
            .lock()
            .expect("tracking files lock poisoned by a panic");
        let snapshot: (Bitmap, Vec<(String, Bitmap)>) = {
            let mut st = self.state();
            let blocks = size_bytes.div_ceil(g);
            st.size_bytes = size_bytes;
            st.bits.resize(blocks);
            if let Some(cp) = st.checkpoint.as_mut() {
                cp.since.resize(blocks);
            }
            for bits in st.watchers.values_mut() {
                bits.resize(blocks);
            }
            for c in st.consumers.values_mut() {
                c.resize(blocks);
            }
            let consumers: Vec<(String, Bitmap)> = st
                .consumers
                .iter()
                .map(|(n, c)| (n.clone(), c.bits.clone()))
                .collect();
            (st.bits.clone(), consumers)
        };
        files.bitmap.write_all(&snapshot.0, g)?;
        consumer::write_files(&files, &snapshot.1, g)
    }

    /// Clean point for shutdown: persists the whole bitmap, then a log
    /// record naming only extents still pinned (none once I/O is drained).
    ///
    /// # Errors
    /// I/O errors; the next start then recovers from the log as after a crash.
    pub fn persist_clean(&self) -> Result<()> {
        let g = self.config.granularity_bytes;
        let files = self
            .files
            .lock()
            .expect("tracking files lock poisoned by a panic");
        let (snapshot, record, consumers) = {
            let mut st = self.state();
            st.active.retain(|_, a| a.pins > 0);
            st.evicted.clear();
            st.al_seq += 1;
            let mut extents: Vec<u32> = st.active.keys().copied().collect();
            extents.sort_unstable();
            let consumers: Vec<(String, Bitmap)> = st
                .consumers
                .iter()
                .map(|(n, c)| (n.clone(), c.bits.clone()))
                .collect();
            (
                st.bits.clone(),
                AlRecord {
                    seq: st.al_seq,
                    al_extent_bytes: self.config.al_extent_bytes,
                    extents,
                },
                consumers,
            )
        };
        files.bitmap.write_all(&snapshot, g)?;
        consumer::write_files(&files, &consumers, g)?;
        files.log.append(&record)?;
        let mut st = self.state();
        st.durable_seq = st.durable_seq.max(record.seq);
        Ok(())
    }
}

mod consumer;
#[cfg(test)]
mod tests;

pub use consumer::ConsumerCheckpoint;
