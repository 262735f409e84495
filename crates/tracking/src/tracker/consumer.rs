//! Named change sets: one persistent bitmap per consumer (a replica link),
//! beside the default bitmap that `GetDirtyExtents` serves.
//!
//! Every consumer sees every write (bits set at admission, like the default
//! bitmap) and is covered by the same activity log: evicted extents flush
//! the consumer's words too, and recovery folds the log window into every
//! consumer. Each consumer clears independently through its own checkpoint,
//! so a replica acknowledging blocks never hides them from a backup tool,
//! and vice versa.

use std::collections::BTreeMap;
use std::path::Path;

use ember_common::Extent;

use super::{Files, State, Tracker};
use crate::bitmap::Bitmap;
use crate::bitmap_file::BitmapFile;
use crate::error::{Result, TrackingError, io_err};

const PREFIX: &str = "consumer-";
const SUFFIX: &str = ".bitmap";

/// One consumer's in-memory state.
#[derive(Debug)]
pub(super) struct Consumer {
    pub(super) bits: Bitmap,
    checkpoint: Option<(u64, Bitmap)>,
    next_checkpoint: u64,
}

impl Consumer {
    fn new(bits: Bitmap) -> Self {
        Self {
            bits,
            checkpoint: None,
            next_checkpoint: 1,
        }
    }

    pub(super) fn mark(&mut self, start: u64, end: u64) {
        self.bits.set_range(start, end);
        if let Some((_, since)) = self.checkpoint.as_mut() {
            since.set_range(start, end);
        }
    }

    pub(super) fn resize(&mut self, blocks: u64) {
        self.bits.resize(blocks);
        if let Some((_, since)) = self.checkpoint.as_mut() {
            since.resize(blocks);
        }
    }
}

/// A consumer checkpoint: what was dirty when it opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerCheckpoint {
    /// Pass to [`Tracker::consumer_clear`].
    pub id: u64,
    /// Dirty byte runs, ascending, merged, clamped to the volume.
    pub extents: Vec<Extent>,
    /// Total dirty bytes (whole blocks).
    pub dirty_bytes: u64,
}

fn file_name(name: &str) -> String {
    format!("{PREFIX}{name}{SUFFIX}")
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(TrackingError::InvalidConfig(format!(
            "consumer name {name:?} must be 1-64 characters of [A-Za-z0-9._-]"
        )))
    }
}

/// Loads every consumer file in `dir`.
pub(super) fn load_all(
    dir: &Path,
    granularity: u64,
    blocks: u64,
) -> Result<BTreeMap<String, (BitmapFile, Consumer)>> {
    let mut out = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(io_err(dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let file_name = entry.file_name();
        let Some(name) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.strip_suffix(SUFFIX))
        else {
            continue;
        };
        let (file, stored) = BitmapFile::open(&entry.path(), granularity)?;
        // A consumer file that never got its first write is treated as all
        // dirty: it was being created, and "everything" is the safe answer.
        let mut bits = stored.unwrap_or_else(|| {
            let mut all = Bitmap::new(blocks);
            all.set_range(0, blocks);
            all
        });
        if bits.len() != blocks {
            bits.resize(blocks);
        }
        out.insert(name.to_owned(), (file, Consumer::new(bits)));
    }
    Ok(out)
}

/// Writes each named consumer's bitmap wholesale.
pub(super) fn write_files(files: &Files, maps: &[(String, Bitmap)], g: u64) -> Result<()> {
    for (name, bits) in maps {
        if let Some(f) = files.consumers.get(name) {
            f.write_all(bits, g)?;
        }
    }
    Ok(())
}

impl Tracker {
    fn files(&self) -> std::sync::MutexGuard<'_, Files> {
        self.files
            .lock()
            .expect("tracking files lock poisoned by a panic")
    }

    /// Blocks of every extent pinned by an in-flight write. A checkpoint
    /// starts with them set: a write admitted before the checkpoint but
    /// finishing after it must survive the checkpoint's clear, because the
    /// consumer may not have seen its data yet.
    pub(super) fn in_flight_blocks(&self, st: &State) -> Bitmap {
        let g = self.config.granularity_bytes;
        let al = self.config.al_extent_bytes;
        let mut since = Bitmap::new(st.bits.len());
        for (&e, a) in &st.active {
            if a.pins > 0 {
                let start = u64::from(e) * al;
                since.set_range(start / g, (start + al).div_ceil(g));
            }
        }
        since
    }

    /// Adds consumer `name`, all dirty (`all_dirty`, e.g. a new replica that
    /// holds nothing yet) or clean. Idempotent: an existing consumer is kept
    /// as it is. Returns whether it was created.
    ///
    /// # Errors
    /// A bad name or I/O errors creating its file.
    pub fn add_consumer(&self, dir: &Path, name: &str, all_dirty: bool) -> Result<bool> {
        check_name(name)?;
        let g = self.config.granularity_bytes;
        let mut files = self.files();
        if files.consumers.contains_key(name) {
            return Ok(false);
        }
        let blocks = self.state().bits.len();
        let mut bits = Bitmap::new(blocks);
        if all_dirty {
            bits.set_range(0, blocks);
        }
        let (file, _) = BitmapFile::open(&dir.join(file_name(name)), g)?;
        file.write_all(&bits, g)?;
        files.consumers.insert(name.to_owned(), file);
        self.state()
            .consumers
            .insert(name.to_owned(), Consumer::new(bits));
        Ok(true)
    }

    /// Removes consumer `name` and its file. Returns whether it existed.
    ///
    /// # Errors
    /// I/O errors removing the file.
    pub fn remove_consumer(&self, dir: &Path, name: &str) -> Result<bool> {
        check_name(name)?;
        let mut files = self.files();
        let existed = files.consumers.remove(name).is_some();
        self.state().consumers.remove(name);
        let path = dir.join(file_name(name));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(existed),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Names of the consumers.
    pub fn consumers(&self) -> Vec<String> {
        self.state().consumers.keys().cloned().collect()
    }

    /// Dirty bytes of consumer `name` (whole blocks), if it exists.
    pub fn consumer_dirty_bytes(&self, name: &str) -> Option<u64> {
        let g = self.config.granularity_bytes;
        self.state()
            .consumers
            .get(name)
            .map(|c| c.bits.count_ones() * g)
    }

    /// Reports consumer `name`'s dirty extents and opens its checkpoint
    /// (superseding an earlier one).
    ///
    /// # Errors
    /// [`TrackingError::InvalidConfig`] for an unknown consumer.
    pub fn consumer_checkpoint(&self, name: &str) -> Result<ConsumerCheckpoint> {
        let g = self.config.granularity_bytes;
        let mut st = self.state();
        let since = self.in_flight_blocks(&st);
        let size = st.size_bytes;
        let c = st.consumers.get_mut(name).ok_or_else(|| unknown(name))?;
        let id = c.next_checkpoint;
        c.next_checkpoint += 1;
        c.checkpoint = Some((id, since));
        Ok(ConsumerCheckpoint {
            id,
            extents: c.bits.extents(g, size),
            dirty_bytes: c.bits.count_ones() * g,
        })
    }

    /// Forgets consumer `name`'s blocks reported at checkpoint `id` within
    /// the byte range `range` (whole blocks inside it; `None`: everything,
    /// which also closes the checkpoint), keeping blocks written since.
    /// Persists the bitmap when `persist` is set; otherwise the on-disk copy
    /// stays a superset, which is safe. Returns the dirty bytes left.
    ///
    /// # Errors
    /// [`TrackingError::StaleCheckpoint`] when `id` is not open; I/O errors.
    pub fn consumer_clear(
        &self,
        name: &str,
        id: u64,
        range: Option<(u64, u64)>,
        persist: bool,
    ) -> Result<u64> {
        let g = self.config.granularity_bytes;
        let files = self.files();
        let snapshot = {
            let mut st = self.state();
            let c = st.consumers.get_mut(name).ok_or_else(|| unknown(name))?;
            let open = c.checkpoint.as_ref().map(|(i, _)| *i);
            if open != Some(id) {
                return Err(TrackingError::StaleCheckpoint { given: id, open });
            }
            match range {
                None => {
                    let (_, since) = c.checkpoint.take().expect("checked above");
                    c.bits = since;
                }
                Some((start, end)) => {
                    let (_, since) = c.checkpoint.as_ref().expect("checked above");
                    let (first, last) = (start.div_ceil(g), end / g);
                    for b in first..last.min(c.bits.len()) {
                        if !since.get(b) {
                            c.bits.clear_range(b, b + 1);
                        }
                    }
                }
            }
            persist
                .then(|| c.bits.clone())
                .map(|b| (b, c.bits.count_ones()))
        };
        match snapshot {
            Some((bits, ones)) => {
                if let Some(f) = files.consumers.get(name) {
                    f.write_all(&bits, g)?;
                }
                Ok(ones * g)
            }
            None => Ok(self.consumer_dirty_bytes(name).unwrap_or(0)),
        }
    }

    /// Marks byte extents dirty for consumer `name` (e.g. blocks an online
    /// verify found different) and persists.
    ///
    /// # Errors
    /// Unknown consumer; I/O errors.
    pub fn consumer_mark(&self, name: &str, extents: &[Extent]) -> Result<()> {
        let g = self.config.granularity_bytes;
        let files = self.files();
        let bits = {
            let mut st = self.state();
            let c = st.consumers.get_mut(name).ok_or_else(|| unknown(name))?;
            for e in extents {
                c.mark(e.offset / g, (e.offset + e.length).div_ceil(g));
            }
            c.bits.clone()
        };
        match files.consumers.get(name) {
            Some(f) => f.write_all(&bits, g),
            None => Ok(()),
        }
    }
}

fn unknown(name: &str) -> TrackingError {
    TrackingError::InvalidConfig(format!("no change-set consumer named {name:?}"))
}

impl Tracker {
    /// Whether consumer `name` has any dirty block in `[offset, offset + len)`.
    pub fn consumer_any_dirty(&self, name: &str, offset: u64, len: u64) -> Option<bool> {
        let g = self.config.granularity_bytes;
        let st = self.state();
        let c = st.consumers.get(name)?;
        let end = (offset + len).div_ceil(g).min(c.bits.len());
        Some((offset / g..end).any(|b| c.bits.get(b)))
    }
}
