//! The secondary's staging log: a redo log that makes each batch of
//! replicated changes atomic.
//!
//! Staged frames are appended as records; a commit record ends the batch.
//! Only after the log (commit record included) is fdatasynced are the
//! records applied to the volume, so a crash leaves either a committed batch
//! (replayed at start, idempotently) or an uncommitted tail (discarded): the
//! volume moves from one consistent image to the next and is never torn.
//!
//! Record: `magic u32 | kind u32 | a u64 | b u64 | crc32 u32 | pad u32`
//! then, for writes, `b` bytes of data. Writes: `a` = offset, `b` = length;
//! zeros: the same without data; commits: `a` = batch seq, `b` = the
//! primary's consistent-at time (unix ns). The crc covers the first 24
//! header bytes and the data, so a commit is only trusted when every record
//! before it reads back intact.
//!
//! The in-memory copy draws on the agent's replication budget
//! ([`crate::budget`]): when the budget refuses, the rest of the batch goes
//! to the file only and is read back to apply it; the log on disk, and so
//! what a crash or a commit sees, is the same either way.
//!
//! While a recovery point's clone of the volume runs, committed batches
//! are *deferred*: acknowledged once durable here, and applied in order
//! once the clone is done (`apply.rs`). The log then holds several
//! committed batches, all replayed at start-up after the one the
//! secondary's record names as applied ([`replay_from`]); emptying the log
//! keeps deferred batches ([`StagingLog::reset`]).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::budget::{Account, memory_budget};

const MAGIC: u32 = u32::from_le_bytes(*b"EMSL");
const HEADER: u64 = 32;
const KIND_WRITE: u32 = 1;
const KIND_ZERO: u32 = 2;
const KIND_COMMIT: u32 = 3;
/// Staged records are written to the file in chunks of at least this much
/// (one syscall per chunk instead of one per record).
const WRITE_CHUNK: u64 = 1 << 20;
/// The open batch is also kept in memory up to this size, so applying it
/// needs no reads; a larger batch (a big catch-up) is read back.
const MEMORY_MAX: usize = 64 << 20;
/// After a batch, an in-memory copy larger than this is given back to the
/// allocator: at a thousand volumes even a few MiB kept per volume is
/// gigabytes held for nothing.
const KEEP_MEMORY: usize = 64 << 10;

/// One staged change, located in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StagedChange {
    /// Data at `offset`, stored at `log_pos` in the log.
    Write { offset: u64, len: u64, log_pos: u64 },
    /// Zeros over `[offset, offset + len)`.
    Zero { offset: u64, len: u64 },
}

/// A committed batch found in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommittedBatch {
    pub(crate) seq: u64,
    pub(crate) consistent_at_unix_ns: i64,
    pub(crate) changes: Vec<StagedChange>,
    /// Bytes it changes (data and zeroed ranges).
    pub(crate) bytes: u64,
    /// Log position just past its commit record.
    pub(crate) end: u64,
}

/// Which of the committed batches a log holds (their consistent-at times,
/// in log order) a restart must apply, given the time the secondary's
/// record names as applied: those after the batch with that time, or all
/// when none has it (the record names a batch of an earlier, emptied log).
/// Each applied batch updates the record before the next is applied, so
/// the batches before the named one are applied too.
pub(crate) fn replay_from(batch_ats: &[i64], record_at: i64) -> usize {
    batch_ats
        .iter()
        .rposition(|&at| at == record_at)
        .map_or(0, |i| i + 1)
}

/// The staging log of one secondary volume.
#[derive(Debug)]
pub(crate) struct StagingLog {
    file: File,
    path: PathBuf,
    /// Append position (logical end of the log).
    end: u64,
    /// Bytes of the log written to the file; `[written, end)` is in `mem` only.
    written: u64,
    /// The log's bytes from `mem_start` to `end`.
    mem: Vec<u8>,
    mem_start: u64,
    changes: Vec<StagedChange>,
    /// Staged bytes (data and zeroed ranges) in the open batch.
    staged_bytes: u64,
    /// The budget bytes `mem`'s capacity holds.
    account: Account,
    /// Committed batches acknowledged but not yet applied (oldest first),
    /// while a recovery point's clone runs.
    deferred: VecDeque<CommittedBatch>,
    /// Their bytes.
    deferred_bytes: u64,
}

fn header(kind: u32, a: u64, b: u64, data: &[u8]) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&a.to_le_bytes());
    h[16..24].copy_from_slice(&b.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..24]);
    crc.update(data);
    h[24..28].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

impl StagingLog {
    /// Opens (creating) the log at `path`, its memory drawn from the
    /// agent's replication budget. Call [`Self::recover`] next.
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        Self::open_with(path, memory_budget().account())
    }

    /// As [`Self::open`], drawing on `account`.
    pub(crate) fn open_with(path: &Path, account: Account) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            end: 0,
            written: 0,
            mem: Vec::new(),
            mem_start: 0,
            changes: Vec::new(),
            staged_bytes: 0,
            account,
            deferred: VecDeque::new(),
            deferred_bytes: 0,
        })
    }

    /// Path of the log file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Scans the log: returns the committed batches it holds (in order)
    /// whose every record, and every record before them, is intact, and
    /// forgets any uncommitted tail.
    pub(crate) fn recover(&mut self) -> std::io::Result<Vec<CommittedBatch>> {
        let len = self.file.metadata()?.len();
        let mut pos = 0;
        let mut changes = Vec::new();
        let mut bytes = 0;
        let mut found = Vec::new();
        while pos + HEADER <= len {
            let mut h = [0u8; HEADER as usize];
            self.file.read_exact_at(&mut h, pos)?;
            let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
            let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
            if u32_at(0) != MAGIC {
                break;
            }
            let (kind, a, b) = (u32_at(4), u64_at(8), u64_at(16));
            let data_len = if kind == KIND_WRITE { b } else { 0 };
            if pos + HEADER + data_len > len || data_len > 64 << 20 {
                break;
            }
            let mut data = vec![0u8; data_len as usize];
            self.file.read_exact_at(&mut data, pos + HEADER)?;
            if header(kind, a, b, &data)[24..28] != h[24..28] {
                break;
            }
            match kind {
                KIND_WRITE => {
                    changes.push(StagedChange::Write {
                        offset: a,
                        len: b,
                        log_pos: pos + HEADER,
                    });
                    bytes += b;
                }
                KIND_ZERO => {
                    changes.push(StagedChange::Zero { offset: a, len: b });
                    bytes += b;
                }
                KIND_COMMIT => found.push(CommittedBatch {
                    seq: a,
                    consistent_at_unix_ns: b as i64,
                    changes: std::mem::take(&mut changes),
                    bytes: std::mem::take(&mut bytes),
                    end: pos + HEADER,
                }),
                _ => break,
            }
            pos += HEADER + data_len;
        }
        if found.is_empty() {
            self.reset()?;
        }
        Ok(found)
    }

    /// Appends bytes to the log: to memory, and to the file once a chunk
    /// has gathered.
    fn append(&mut self, parts: &[&[u8]]) -> std::io::Result<()> {
        let n: usize = parts.iter().map(|p| p.len()).sum();
        if !self.reserve(n) {
            // The budget is spent: this part of the batch lives in the
            // file only (read back when applied).
            self.write_out()?;
            self.drop_mem();
            for p in parts {
                self.file.write_all_at(p, self.end)?;
                self.end += p.len() as u64;
            }
            self.written = self.end;
            self.mem_start = self.end;
            return Ok(());
        }
        for p in parts {
            self.mem.extend_from_slice(p);
            self.end += p.len() as u64;
        }
        if self.end - self.written >= WRITE_CHUNK {
            self.write_out()?;
        }
        if self.mem.len() > MEMORY_MAX {
            self.write_out()?;
            self.drop_mem();
        }
        Ok(())
    }

    /// Makes room for `n` more bytes in `mem`, its growth granted by the
    /// budget first. False: refused, nothing changed.
    fn reserve(&mut self, n: usize) -> bool {
        let needed = self.mem.len() + n;
        let cap = self.mem.capacity();
        if needed <= cap {
            return true;
        }
        let new_cap = needed.max(cap * 2).max(64 << 10);
        if !self.account.try_take((new_cap - cap) as u64) {
            return false;
        }
        self.mem.reserve_exact(new_cap - self.mem.len());
        // `reserve_exact` may round up; account what is really held.
        let extra = self.mem.capacity().saturating_sub(new_cap) as u64;
        if extra > 0 && !self.account.try_take(extra) {
            self.mem.shrink_to(new_cap);
        }
        true
    }

    /// Forgets the in-memory copy (everything in it is in the file) and
    /// gives its memory back.
    fn drop_mem(&mut self) {
        self.mem = Vec::new();
        self.mem_start = self.end;
        self.account.give_back_all();
    }

    /// Writes the part of the log that is only in memory to the file.
    fn write_out(&mut self) -> std::io::Result<()> {
        let from = (self.written - self.mem_start) as usize;
        self.file.write_all_at(&self.mem[from..], self.written)?;
        self.written = self.end;
        Ok(())
    }

    /// Appends a staged write (page cache only; [`Self::commit`] syncs).
    pub(crate) fn stage_write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let h = header(KIND_WRITE, offset, data.len() as u64, data);
        let log_pos = self.end + HEADER;
        self.append(&[&h, data])?;
        self.changes.push(StagedChange::Write {
            offset,
            len: data.len() as u64,
            log_pos,
        });
        self.staged_bytes += data.len() as u64;
        Ok(())
    }

    /// Appends a staged zero range.
    pub(crate) fn stage_zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let h = header(KIND_ZERO, offset, len, &[]);
        self.append(&[&h])?;
        self.changes.push(StagedChange::Zero { offset, len });
        self.staged_bytes += len;
        Ok(())
    }

    /// Ends the open batch with a commit record and makes the log durable.
    /// Returns the batch to apply. Blocking (fdatasync).
    pub(crate) fn commit(
        &mut self,
        seq: u64,
        consistent_at_unix_ns: i64,
    ) -> std::io::Result<CommittedBatch> {
        let h = header(KIND_COMMIT, seq, consistent_at_unix_ns as u64, &[]);
        self.append(&[&h])?;
        self.write_out()?;
        self.file.sync_data()?;
        Ok(CommittedBatch {
            seq,
            consistent_at_unix_ns,
            changes: std::mem::take(&mut self.changes),
            bytes: std::mem::take(&mut self.staged_bytes),
            end: self.end,
        })
    }

    /// Keeps a committed batch to apply later (after the batches deferred
    /// before it). It stays in the log until applied.
    pub(crate) fn defer(&mut self, batch: CommittedBatch) {
        self.deferred_bytes += batch.bytes;
        self.deferred.push_back(batch);
    }

    /// The oldest deferred batch, if any.
    pub(crate) fn deferred_front(&self) -> Option<CommittedBatch> {
        self.deferred.front().cloned()
    }

    /// The oldest deferred batch was applied.
    pub(crate) fn pop_deferred(&mut self) {
        if let Some(b) = self.deferred.pop_front() {
            self.deferred_bytes -= b.bytes;
        }
    }

    /// Whether any batch is deferred.
    pub(crate) fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Bytes of the deferred batches.
    pub(crate) fn deferred_bytes(&self) -> u64 {
        self.deferred_bytes
    }

    /// Whether an open (uncommitted) batch has records.
    pub(crate) fn has_open(&self) -> bool {
        !self.changes.is_empty()
    }

    /// Reads a staged write's data back (from memory while it is there).
    pub(crate) fn read(&self, log_pos: u64, len: u64) -> std::io::Result<Vec<u8>> {
        if log_pos >= self.mem_start && log_pos + len <= self.end {
            let at = (log_pos - self.mem_start) as usize;
            return Ok(self.mem[at..at + len as usize].to_vec());
        }
        let mut data = vec![0u8; len as usize];
        self.file.read_exact_at(&mut data, log_pos)?;
        Ok(data)
    }

    /// Empties the log (after a batch is applied, or to drop an
    /// uncommitted one). Not synced: a stale committed batch left behind is
    /// recognised by the secondary's record and skipped. Deferred batches
    /// (acknowledged, not yet applied) are kept: only what follows the
    /// newest of them is dropped.
    pub(crate) fn reset(&mut self) -> std::io::Result<()> {
        if let Some(keep) = self.deferred.back().map(|b| b.end) {
            // Every committed record is in the file (`commit` wrote it out).
            self.file.set_len(keep)?;
            self.end = keep;
            self.written = keep;
            self.mem.clear();
            self.mem_start = keep;
            self.changes.clear();
            self.staged_bytes = 0;
            return Ok(());
        }
        self.file.set_len(0)?;
        self.file.flush()?;
        self.end = 0;
        self.written = 0;
        self.mem.clear();
        if self.mem.capacity() > KEEP_MEMORY {
            // A big batch: do not keep its memory for ever.
            self.mem = Vec::new();
            self.account.give_back_all();
        }
        self.mem_start = 0;
        self.changes.clear();
        if self.changes.capacity() > 4096 {
            self.changes = Vec::new();
        }
        self.staged_bytes = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_fully_intact_committed_batch_is_recovered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.staging");
        let mut log = StagingLog::open(&path).expect("open");
        assert_eq!(log.recover().expect("recover"), vec![]);
        log.stage_write(4096, &[7u8; 4096]).expect("stage");
        log.stage_zero(0, 4096).expect("stage");
        // Uncommitted: a restart drops it.
        drop(log);
        let mut log = StagingLog::open(&path).expect("open");
        assert_eq!(log.recover().expect("recover"), vec![]);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 0);

        log.stage_write(8192, &[9u8; 4096]).expect("stage");
        log.stage_zero(0, 4096).expect("stage");
        let batch = log.commit(5, 1234).expect("commit");
        assert_eq!(batch.changes.len(), 2);
        drop(log);
        let mut log = StagingLog::open(&path).expect("open");
        let found = log
            .recover()
            .expect("recover")
            .pop()
            .expect("committed batch");
        assert_eq!(found, batch);
        match found.changes[0] {
            StagedChange::Write { log_pos, len, .. } => {
                assert_eq!(log.read(log_pos, len).expect("read"), vec![9u8; 4096]);
            }
            other => panic!("unexpected {other:?}"),
        }

        // A batch larger than the memory copy: early records are read back
        // from the file, late ones from memory; both match what was staged.
        log.reset().expect("reset");
        let block = 1 << 20;
        let count = MEMORY_MAX / block + 8;
        for i in 0..count {
            log.stage_write((i * block) as u64, &vec![i as u8; block])
                .expect("stage");
        }
        let batch = log.commit(6, 99).expect("commit");
        for (i, change) in batch.changes.iter().enumerate() {
            let StagedChange::Write { log_pos, len, .. } = *change else {
                panic!("unexpected {change:?}")
            };
            assert_eq!(log.read(log_pos, len).expect("read"), vec![i as u8; block]);
        }
        drop(log);
        let mut log = StagingLog::open(&path).expect("open");
        let found = log
            .recover()
            .expect("recover")
            .pop()
            .expect("committed batch");
        assert_eq!(found.changes.len(), count);
        let StagedChange::Write { log_pos, len, .. } = found.changes[count - 1] else {
            panic!("a write")
        };
        assert_eq!(
            log.read(log_pos, len).expect("read"),
            vec![(count - 1) as u8; block]
        );
        log.reset().expect("reset");
        log.stage_write(8192, &[9u8; 4096]).expect("stage");
        log.stage_zero(0, 4096).expect("stage");
        log.commit(7, 1).expect("commit");
        drop(log);

        // A flipped data byte invalidates the whole batch.
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open raw");
        f.write_all_at(&[0], HEADER + 10).expect("corrupt");
        let mut log = StagingLog::open(&path).expect("open");
        assert_eq!(log.recover().expect("recover"), vec![]);
    }

    #[test]
    fn deferred_batches_survive_a_reset_and_a_restart_replays_them_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.staging");
        let mut log = StagingLog::open(&path).expect("open");
        assert_eq!(log.recover().expect("recover"), vec![]);
        log.stage_write(0, &[1u8; 4096]).expect("stage");
        let a = log.commit(1, 100).expect("commit");
        assert_eq!(a.bytes, 4096);
        log.defer(a.clone());
        log.stage_write(4096, &[2u8; 8192]).expect("stage");
        log.stage_zero(0, 4096).expect("stage");
        let b = log.commit(2, 200).expect("commit");
        assert_eq!(b.bytes, 12288);
        log.defer(b.clone());
        assert_eq!(log.deferred_bytes(), 16384);
        // An open batch, then a stream breaks: reset drops only the open
        // batch; the deferred ones stay, readable.
        log.stage_write(8192, &[3u8; 4096]).expect("stage");
        assert!(log.has_open());
        log.reset().expect("reset");
        assert!(!log.has_open());
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), b.end);
        assert_eq!(log.deferred_front(), Some(a.clone()));
        let StagedChange::Write { log_pos, len, .. } = b.changes[0] else {
            panic!("a write")
        };
        assert_eq!(log.read(log_pos, len).expect("read"), vec![2u8; 8192]);
        // Staging goes on after the kept batches.
        log.stage_write(0, &[4u8; 4096]).expect("stage");
        let c = log.commit(3, 300).expect("commit");
        drop(log);
        let mut log = StagingLog::open(&path).expect("open");
        let found = log.recover().expect("recover");
        assert_eq!(found, vec![a.clone(), b.clone(), c.clone()]);
        let ats: Vec<i64> = found.iter().map(|b| b.consistent_at_unix_ns).collect();
        assert_eq!(replay_from(&ats, 200), 2, "a and b applied: replay c");
        // Applied in order: once nothing is deferred, reset empties it all.
        log.defer(found[0].clone());
        log.pop_deferred();
        assert_eq!(log.deferred_bytes(), 0);
        log.reset().expect("reset");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 0);
    }

    #[test]
    fn a_restart_replays_the_batches_after_the_one_the_record_names() {
        // (batch times in the log, the record's time, first to replay)
        let rows: &[(&[i64], i64, usize)] = &[
            (&[], 5, 0),
            (&[10], 10, 1),
            (&[10], 5, 0),
            (&[10, 20, 30], 20, 2),
            (&[10, 20, 30], 30, 3),
            (&[10, 20, 30], 99, 0),
        ];
        for (ats, record, want) in rows {
            assert_eq!(replay_from(ats, *record), *want, "{ats:?} record {record}");
        }
    }

    #[test]
    fn a_batch_past_the_budget_stays_on_disk_and_reads_back_intact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.staging");
        let budget = crate::budget::MemoryBudget::new(1 << 20);
        let mut log = StagingLog::open_with(&path, budget.account()).expect("open");
        assert_eq!(log.recover().expect("recover"), vec![]);
        let block = 256 << 10;
        for i in 0..16 {
            log.stage_write((i * block) as u64, &vec![i as u8; block])
                .expect("stage");
            assert!(budget.usage().used_bytes <= 1 << 20);
        }
        assert!(budget.usage().refusals > 0, "4 MiB staged against 1 MiB");
        let batch = log.commit(1, 5).expect("commit");
        for (i, change) in batch.changes.iter().enumerate() {
            let StagedChange::Write { log_pos, len, .. } = *change else {
                panic!("unexpected {change:?}")
            };
            assert_eq!(log.read(log_pos, len).expect("read"), vec![i as u8; block]);
        }
        log.reset().expect("reset");
        assert_eq!(
            budget.usage().used_bytes,
            0,
            "a big batch's memory is given back"
        );
        drop(log);
        let mut log = StagingLog::open_with(&path, budget.account()).expect("open");
        assert_eq!(log.recover().expect("recover"), vec![], "reset emptied it");
    }
}
