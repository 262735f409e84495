//! The on-disk activity log: two fixed-size slots written alternately, each
//! holding one complete record of the hot extent set.
//!
//! Why full records in two slots instead of an append-only journal: replay is
//! "take the valid record with the highest sequence number", a torn write
//! can only damage the slot being written (whose record was not yet relied
//! on: no write waiting for it had been issued), and the file never grows.
//!
//! Record layout (little endian), padded to a multiple of 4 KiB:
//! `magic u64 | seq u64 | al_extent_bytes u64 | count u32 | extents u32×count | crc32 u32`

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrackingError, io_err};

const MAGIC: u64 = u64::from_le_bytes(*b"EMBERAL1");
/// Size of one slot; the file is two slots long.
const SLOT_BYTES: usize = 64 * 1024;
const HEADER_BYTES: usize = 8 + 8 + 8 + 4;
/// Most extents one record can name (hot set plus extents pinned by
/// in-flight writes).
pub const MAX_RECORD_EXTENTS: usize = (SLOT_BYTES - HEADER_BYTES - 4) / 4;

/// One decoded activity-log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlRecord {
    /// Monotonic record number; the newest valid one wins at replay.
    pub seq: u64,
    /// Extent size the indices refer to.
    pub al_extent_bytes: u64,
    /// Indices of extents that may hold writes not in the on-disk bitmap.
    pub extents: Vec<u32>,
}

impl AlRecord {
    fn encode(&self) -> Vec<u8> {
        assert!(self.extents.len() <= MAX_RECORD_EXTENTS, "record too large");
        let body = HEADER_BYTES + 4 * self.extents.len() + 4;
        let mut buf = Vec::with_capacity(body.next_multiple_of(4096));
        buf.extend_from_slice(&MAGIC.to_le_bytes());
        buf.extend_from_slice(&self.seq.to_le_bytes());
        buf.extend_from_slice(&self.al_extent_bytes.to_le_bytes());
        buf.extend_from_slice(&(self.extents.len() as u32).to_le_bytes());
        for e in &self.extents {
            buf.extend_from_slice(&e.to_le_bytes());
        }
        let crc = crc32fast::hash(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        buf.resize(body.next_multiple_of(4096), 0);
        buf
    }

    fn decode(slot: &[u8]) -> Option<Self> {
        let u64_at = |at: usize| u64::from_le_bytes(slot[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_le_bytes(slot[at..at + 4].try_into().expect("4 bytes"));
        if slot.len() < HEADER_BYTES + 4 || u64_at(0) != MAGIC {
            return None;
        }
        let count = u32_at(24) as usize;
        if count > MAX_RECORD_EXTENTS {
            return None;
        }
        let crc_at = HEADER_BYTES + 4 * count;
        if crc32fast::hash(&slot[..crc_at]) != u32_at(crc_at) {
            return None;
        }
        Some(Self {
            seq: u64_at(8),
            al_extent_bytes: u64_at(16),
            extents: (0..count).map(|i| u32_at(HEADER_BYTES + 4 * i)).collect(),
        })
    }
}

/// The activity-log file of one volume.
#[derive(Debug)]
pub struct ActivityLog {
    file: File,
    path: PathBuf,
}

impl ActivityLog {
    /// Opens (creating if needed) the log at `path`.
    ///
    /// # Errors
    /// I/O errors opening or sizing the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        if len < 2 * SLOT_BYTES as u64 {
            file.set_len(2 * SLOT_BYTES as u64).map_err(io_err(path))?;
        }
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    /// The newest valid record, if any slot holds one.
    ///
    /// # Errors
    /// I/O errors reading the slots.
    pub fn replay(&self) -> Result<Option<AlRecord>> {
        let mut best: Option<AlRecord> = None;
        let mut slot = vec![0u8; SLOT_BYTES];
        for i in 0..2u64 {
            self.file
                .read_exact_at(&mut slot, i * SLOT_BYTES as u64)
                .map_err(io_err(&self.path))?;
            if let Some(record) = AlRecord::decode(&slot)
                && best.as_ref().is_none_or(|b| record.seq > b.seq)
            {
                best = Some(record);
            }
        }
        Ok(best)
    }

    /// Writes `record` into slot `seq % 2` and makes it durable.
    ///
    /// # Errors
    /// I/O errors; the record must then be treated as not written.
    pub fn append(&self, record: &AlRecord) -> Result<()> {
        if record.extents.len() > MAX_RECORD_EXTENTS {
            return Err(TrackingError::ActivityLogFull {
                pinned: record.extents.len(),
            });
        }
        let slot = (record.seq % 2) * SLOT_BYTES as u64;
        self.file
            .write_all_at(&record.encode(), slot)
            .map_err(io_err(&self.path))?;
        self.file.sync_data().map_err(io_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_valid_record_wins_and_torn_slot_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("al");
        let log = ActivityLog::open(&path).expect("open");
        assert_eq!(log.replay().expect("replay"), None);
        let rec = |seq, extents: Vec<u32>| AlRecord {
            seq,
            al_extent_bytes: 4 << 20,
            extents,
        };
        log.append(&rec(1, vec![1, 2])).expect("append");
        log.append(&rec(2, vec![2, 3, 9])).expect("append");
        assert_eq!(log.replay().expect("replay"), Some(rec(2, vec![2, 3, 9])));
        // Tear the newest slot (seq 2 lives in slot 0): replay falls back to seq 1.
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open raw");
        file.write_all_at(&[0xff; 8], 30).expect("tear");
        assert_eq!(log.replay().expect("replay"), Some(rec(1, vec![1, 2])));
    }

    proptest::proptest! {
        #[test]
        fn records_round_trip(seq in 0u64.., extents in proptest::collection::vec(0u32.., 0..300)) {
            let record = AlRecord { seq, al_extent_bytes: 1 << 22, extents };
            let mut slot = record.encode();
            slot.resize(SLOT_BYTES, 0);
            proptest::prop_assert_eq!(AlRecord::decode(&slot), Some(record));
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let mut slot = bytes;
            slot.resize(SLOT_BYTES, 0);
            let _ = AlRecord::decode(&slot);
        }
    }
}
