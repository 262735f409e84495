//! The secondary's staging log: a redo log that makes each batch of
//! replicated changes atomic.
//!
//! Staged frames are appended as records; a commit record ends the batch.
//! Only after the log (commit record included) is fdatasynced are the
//! records applied to the volume, so a crash leaves either a committed batch
//! (replayed at start, idempotently) or an uncommitted tail (discarded): the
//! volume moves from one consistent image to the next and is never torn.
//!
//! Record: `magic u32 | kind u32 | a u64 | b u64 | crc32 u32 | epoch u32`
//! then, for writes, `b` bytes of data. Writes: `a` = offset, `b` = length;
//! zeros: the same without data; commits: `a` = batch seq, `b` = the
//! primary's consistent-at time (unix ns). The crc covers the epoch (when
//! not 0), the first 24 header bytes and the data, so a commit is only
//! trusted when every record before it reads back intact.
//!
//! *Epochs*: emptying the log rewinds it to offset 0 and the next batch is
//! written over the old one in place, instead of truncating the file and
//! allocating its blocks again (on ext4 that allocation — and with online
//! discard the trim — cost 30–40 % of the stream, benches/RESULTS.md issue
//! 16 "Session 16"). Records of older batches then stay past the end of a
//! new one; each rewind takes a new random epoch, every record carries it
//! (inside its crc), and recovery reads only records of the epoch of the
//! log's first record, so a torn new batch never runs on into old records.
//! Epoch 0 is the format before epochs (no epoch in the crc): such logs
//! recover as they always did. What stays allocated is capped
//! ([`REWIND_KEEP`]); on a data dir that can share extents the log is
//! still truncated (its blocks were cloned into the volume).
//!
//! *Aligned* writes (kind 4, on a data dir
//! that can share extents, [`stage_aligned`]) put their data at the next
//! 4 KiB boundary after the header (the zero gap is outside the crc), so
//! applying them clones the log's blocks into the volume
//! (`clone_apply.rs`); contiguous aligned writes extend one record, whose
//! header is rewritten while the batch is open.
//!
//! No copy of the data is made: a staged payload is the received
//! `bytes::Bytes` itself, written to the file with `pwritev` in chunks,
//! and (for unaligned writes) kept to apply the batch from memory. What is
//! kept draws on the agent's replication budget ([`crate::budget`]): when
//! the budget refuses, the batch is read back from the file to apply it;
//! the log on disk, and so what a crash or a commit sees, is the same
//! either way.
//!
//! While a recovery point's clone of the volume runs, committed batches
//! are *deferred*: acknowledged once durable here, and applied in order
//! once the clone is done (`apply.rs`). The log then holds several
//! committed batches, all replayed at start-up after the one the
//! secondary's record names as applied ([`replay_from`]); emptying the log
//! keeps deferred batches ([`StagingLog::reset`]).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use ember_storage::start_writeback;

use crate::budget::{Account, memory_budget};

const MAGIC: u32 = u32::from_le_bytes(*b"EMSL");
const HEADER: u64 = 32;
const KIND_WRITE: u32 = 1;
const KIND_ZERO: u32 = 2;
const KIND_COMMIT: u32 = 3;
/// A write whose data starts at the next [`ALIGN`]-aligned log position
/// after its header (the gap is zeros, outside the crc), so the volume can
/// share the log's blocks instead of writing them again (`clone.rs`).
const KIND_WRITE_ALIGNED: u32 = 4;
/// The file system block size a clone needs offsets and lengths aligned
/// to (XFS's and btrfs's default; elsewhere the clone is refused and the
/// write path applies the range).
pub(crate) const ALIGN: u64 = 4096;
/// Aligned writes shorter than this are staged as plain writes: a clone
/// costs an extent (and the volume a fragment) per range, which a few
/// KiB written again costs less than.
pub(crate) const CLONE_MIN: u64 = 64 << 10;
/// Staged records are written to the file in chunks of at least this much
/// (one `pwritev` per chunk instead of one write per record).
const WRITE_CHUNK: u64 = 1 << 20;
/// The open batch's payloads are also kept in memory up to this size, so
/// applying it needs no reads; a larger batch (a big catch-up) is read back.
const MEMORY_MAX: u64 = 64 << 20;
/// Slices per `pwritev` (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;
/// An aligned record grows by contiguous writes up to this size: one
/// clone (and one volume extent) per run instead of one per 64 KiB frame.
const RUN_MAX: u64 = 8 << 20;
/// At a rewind, the log file is cut to this size: the space a large batch
/// (a catch-up) took is given back, and up to this much stays allocated
/// to be rewritten in place.
const REWIND_KEEP: u64 = 64 << 20;
/// Zeros for the gaps before aligned data.
static ZEROS: [u8; ALIGN as usize] = [0; ALIGN as usize];

/// Whether a staged write of `len` bytes at volume `offset` is staged
/// block-aligned, on a data dir whose files can share extents: only then
/// can applying it clone the log's blocks.
pub(crate) fn stage_aligned(reflink: bool, offset: u64, len: u64) -> bool {
    reflink && len >= CLONE_MIN && offset.is_multiple_of(ALIGN) && len.is_multiple_of(ALIGN)
}

/// Where the data of a record whose header is at `pos` starts.
fn data_pos(kind: u32, pos: u64) -> u64 {
    match kind {
        KIND_WRITE_ALIGNED => (pos + HEADER).next_multiple_of(ALIGN),
        _ => pos + HEADER,
    }
}

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

/// A piece of the log not yet written to the file.
#[derive(Debug)]
enum Piece {
    Header([u8; HEADER as usize]),
    /// Zeros before aligned data.
    Gap(usize),
    Data(Bytes),
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Header(h) => h,
            Self::Gap(n) => &ZEROS[..*n],
            Self::Data(d) => d,
        }
    }
}

/// The aligned record at the end of the log, which a write that continues
/// it (contiguous in the volume, aligned) extends instead of starting a
/// record of its own.
#[derive(Debug)]
struct Run {
    header_pos: u64,
    offset: u64,
    len: u64,
    /// crc of the run's data so far.
    data_crc: crc32fast::Hasher,
    /// The log's epoch when the run began.
    epoch: u32,
}

impl Run {
    fn header(&self) -> [u8; HEADER as usize] {
        seal(
            header_fields(KIND_WRITE_ALIGNED, self.offset, self.len),
            self.epoch,
            &self.data_crc,
        )
    }
}

/// The staging log of one secondary volume.
///
/// Invariant: `[written, end)` of the log is exactly `unwritten`'s pieces,
/// in order; every payload in `held` is the log's bytes at its position
/// (in the file or in `unwritten`), and `account` holds `held_bytes`.
#[derive(Debug)]
pub(crate) struct StagingLog {
    file: File,
    path: PathBuf,
    /// Append position (logical end of the log).
    end: u64,
    /// Bytes of the log written to the file.
    written: u64,
    /// The log's bytes past `written`, as received: no copy is made.
    unwritten: Vec<Piece>,
    /// Payloads of the open batch kept to apply it, by log position
    /// (ascending). They are the received buffers themselves (which may
    /// pin the rest of their frame's buffer until applied).
    held: Vec<(u64, Bytes)>,
    held_bytes: u64,
    changes: Vec<StagedChange>,
    /// Staged bytes (data and zeroed ranges) in the open batch.
    staged_bytes: u64,
    /// The budget bytes `held` holds.
    account: Account,
    /// Stage aligned writes block-aligned ([`stage_aligned`]).
    reflink: bool,
    /// The aligned record the next write may extend.
    run: Option<Run>,
    /// Committed batches acknowledged but not yet applied (oldest first),
    /// while a recovery point's clone runs.
    deferred: VecDeque<CommittedBatch>,
    /// Their bytes.
    deferred_bytes: u64,
    /// The epoch the records written from now on carry (see the module
    /// docs): never that of records already in the file.
    epoch: u32,
}

/// Finishes header `h` (its first 24 bytes set) for epoch `epoch`, given
/// the crc of the record's data (`amount` = its length).
fn seal(
    mut h: [u8; HEADER as usize],
    epoch: u32,
    data_crc: &crc32fast::Hasher,
) -> [u8; HEADER as usize] {
    let mut crc = crc32fast::Hasher::new();
    if epoch != 0 {
        crc.update(&epoch.to_le_bytes());
    }
    crc.update(&h[..24]);
    crc.combine(data_crc);
    h[24..28].copy_from_slice(&crc.finalize().to_le_bytes());
    h[28..32].copy_from_slice(&epoch.to_le_bytes());
    h
}

/// A new epoch for a rewound log: random, never 0 (the format without
/// epochs) and never `avoid` (the epoch of what the file holds), so no
/// record left in the file can pass for one of the new batch's.
fn new_epoch(avoid: u32) -> u32 {
    use std::hash::BuildHasher;
    loop {
        let e = std::hash::RandomState::new().hash_one(avoid) as u32;
        if e != 0 && e != avoid {
            return e;
        }
    }
}

fn header_fields(kind: u32, a: u64, b: u64) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&a.to_le_bytes());
    h[16..24].copy_from_slice(&b.to_le_bytes());
    h
}

/// A write record's header (`KIND_WRITE`: `a` = offset, `b` = length)
/// from the crc of its data alone: the same crc as [`header`] over the
/// data, without reading the data again.
fn write_header(offset: u64, len: u64, data_crc: u32, epoch: u32) -> [u8; HEADER as usize] {
    seal(
        header_fields(KIND_WRITE, offset, len),
        epoch,
        &crc32fast::Hasher::new_with_initial_len(data_crc, len),
    )
}

fn header(kind: u32, a: u64, b: u64, data: &[u8], epoch: u32) -> [u8; HEADER as usize] {
    let mut data_crc = crc32fast::Hasher::new();
    data_crc.update(data);
    seal(header_fields(kind, a, b), epoch, &data_crc)
}

/// Writes every byte of `pieces` at `at` with `pwritev`, resuming after
/// short writes.
fn write_all_vectored_at(file: &mut File, pieces: &[Piece], at: u64) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(at))?;
    for group in pieces.chunks(IOV_MAX) {
        let mut slices: Vec<IoSlice<'_>> = group.iter().map(|p| IoSlice::new(p.bytes())).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match file.write_vectored(rest) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

impl StagingLog {
    /// Opens (creating) the log at `path`, its memory drawn from the
    /// agent's replication budget; `reflink`: the data dir can share
    /// extents, so large aligned writes are staged block-aligned. Call
    /// [`Self::recover`] next.
    pub(crate) fn open(path: &Path, reflink: bool) -> std::io::Result<Self> {
        Self::open_with(path, memory_budget().account(), reflink)
    }

    /// As [`Self::open`], drawing on `account`.
    pub(crate) fn open_with(path: &Path, account: Account, reflink: bool) -> std::io::Result<Self> {
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
            unwritten: Vec::new(),
            held: Vec::new(),
            held_bytes: 0,
            changes: Vec::new(),
            staged_bytes: 0,
            account,
            reflink,
            run: None,
            deferred: VecDeque::new(),
            deferred_bytes: 0,
            epoch: new_epoch(0),
        })
    }

    /// Whether large aligned writes are staged block-aligned, to clone.
    pub(crate) fn reflink(&self) -> bool {
        self.reflink
    }

    /// Path of the log file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The log file, for cloning staged ranges out of it (a new
    /// descriptor of the same file).
    ///
    /// # Errors
    /// `dup` fails (out of descriptors).
    pub(crate) fn clone_source(&self) -> std::io::Result<File> {
        self.file.try_clone()
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
        // The epoch of the first record is the log's: a record of another
        // is left from an older batch and ends the log.
        let mut epoch = None;
        while pos + HEADER <= len {
            let mut h = [0u8; HEADER as usize];
            self.file.read_exact_at(&mut h, pos)?;
            let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
            let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
            if u32_at(0) != MAGIC {
                break;
            }
            let (kind, a, b) = (u32_at(4), u64_at(8), u64_at(16));
            let record_epoch = u32_at(28);
            if *epoch.get_or_insert(record_epoch) != record_epoch {
                break;
            }
            let data_len = match kind {
                KIND_WRITE | KIND_WRITE_ALIGNED => b,
                _ => 0,
            };
            let at = data_pos(kind, pos);
            if data_len > 64 << 20 || at + data_len > len {
                break;
            }
            let mut data = vec![0u8; data_len as usize];
            self.file.read_exact_at(&mut data, at)?;
            if header(kind, a, b, &data, record_epoch)[24..28] != h[24..28] {
                break;
            }
            match kind {
                KIND_WRITE | KIND_WRITE_ALIGNED => {
                    changes.push(StagedChange::Write {
                        offset: a,
                        len: b,
                        log_pos: at,
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
            pos = at + data_len;
        }
        if epoch == Some(self.epoch) {
            self.epoch = new_epoch(self.epoch);
        }
        if found.is_empty() {
            self.reset()?;
        }
        Ok(found)
    }

    /// Appends pieces to the log, written to the file once a chunk has
    /// gathered.
    fn append(&mut self, pieces: impl IntoIterator<Item = Piece>) -> std::io::Result<()> {
        for p in pieces {
            self.end += p.bytes().len() as u64;
            self.unwritten.push(p);
        }
        if self.end - self.written >= WRITE_CHUNK {
            self.write_out()?;
        }
        Ok(())
    }

    /// Keeps a staged payload (at `log_pos`) in memory to apply it from,
    /// within the budget and [`MEMORY_MAX`]. When the budget refuses, or
    /// the batch outgrows that, the payloads kept so far are dropped: the
    /// batch is read back from the file to apply it.
    ///
    /// The kept copy is exact-size, not the received `Bytes`: that is a
    /// slice of the gRPC decoder's receive buffer and pins all of it, so a
    /// batch kept as received held more memory than the budget counted
    /// (the scale benchmark's burst: the secondary peaked at 1,381 MiB,
    /// 113 % of a 1 GiB budget; with the copy 1,251 MiB). The log file
    /// is still written from the received buffer.
    fn hold(&mut self, log_pos: u64, data: &Bytes) {
        let n = data.len() as u64;
        if self.held_bytes + n > MEMORY_MAX || !self.account.try_take(n) {
            self.drop_held();
            return;
        }
        self.held.push((log_pos, Bytes::copy_from_slice(data)));
        self.held_bytes += n;
    }

    /// Forgets the payloads kept in memory and gives their budget back.
    fn drop_held(&mut self) {
        self.held = Vec::new();
        self.held_bytes = 0;
        self.account.give_back_all();
    }

    /// Writes the part of the log that is only in memory to the file.
    fn write_out(&mut self) -> std::io::Result<()> {
        if self.unwritten.is_empty() {
            return Ok(());
        }
        write_all_vectored_at(&mut self.file, &self.unwritten, self.written)?;
        self.unwritten.clear();
        // Start the chunk's writeback now: a large batch (a catch-up) is
        // then mostly on disk when its commit's fdatasync comes, instead
        // of all of it being written after the last frame arrived.
        start_writeback(&self.file, self.written, self.end - self.written);
        self.written = self.end;
        Ok(())
    }

    /// Appends a staged write (page cache only; [`Self::commit`] syncs).
    /// The payload is kept as received, never copied. A write staged
    /// block-aligned is applied by clone, from the file: it is not kept in
    /// memory, and one that continues the log's last aligned record
    /// extends it. `data_crc` is the crc32 of `data`, which the caller
    /// has from the frame it verified ([`crate::frame::data_crc`]): the
    /// payload is not hashed a second time.
    pub(crate) fn stage_write(
        &mut self,
        offset: u64,
        data: &Bytes,
        data_crc: u32,
    ) -> std::io::Result<()> {
        let len = data.len() as u64;
        if !stage_aligned(self.reflink, offset, len) {
            self.run = None;
            let h = write_header(offset, len, data_crc, self.epoch);
            let log_pos = self.end + HEADER;
            self.hold(log_pos, data);
            self.append([Piece::Header(h), Piece::Data(data.clone())])?;
            self.push_change(offset, len, log_pos);
            return Ok(());
        }
        if let Some(run) = self
            .run
            .as_mut()
            .filter(|r| r.offset + r.len == offset && r.len + len <= RUN_MAX)
        {
            run.data_crc
                .combine(&crc32fast::Hasher::new_with_initial_len(data_crc, len));
            run.len += len;
            let (at, h) = (run.header_pos, run.header());
            self.rewrite_header(at, h)?;
            self.append([Piece::Data(data.clone())])?;
            if let Some(StagedChange::Write { len: last, .. }) = self.changes.last_mut() {
                *last += len;
            }
            self.staged_bytes += len;
            return Ok(());
        }
        let header_pos = self.end;
        let log_pos = data_pos(KIND_WRITE_ALIGNED, header_pos);
        let run = Run {
            header_pos,
            offset,
            len,
            data_crc: crc32fast::Hasher::new_with_initial_len(data_crc, len),
            epoch: self.epoch,
        };
        let gap = (log_pos - header_pos - HEADER) as usize;
        let pieces = [
            Piece::Header(run.header()),
            Piece::Gap(gap),
            Piece::Data(data.clone()),
        ];
        self.append(pieces.into_iter().filter(|p| !p.bytes().is_empty()))?;
        self.run = Some(run);
        self.push_change(offset, len, log_pos);
        Ok(())
    }

    fn push_change(&mut self, offset: u64, len: u64, log_pos: u64) {
        self.changes.push(StagedChange::Write {
            offset,
            len,
            log_pos,
        });
        self.staged_bytes += len;
    }

    /// Replaces the header at `at` (of the open batch's last record):
    /// in memory if not written yet, else in the file. The batch is not
    /// committed, so a crash meanwhile drops it either way.
    fn rewrite_header(&mut self, at: u64, h: [u8; HEADER as usize]) -> std::io::Result<()> {
        if at < self.written {
            return self.file.write_all_at(&h, at);
        }
        let mut pos = self.written;
        for piece in &mut self.unwritten {
            if pos == at {
                *piece = Piece::Header(h);
                return Ok(());
            }
            pos += piece.bytes().len() as u64;
        }
        unreachable!("the run's header at {at} is neither written nor pending")
    }

    /// Appends a staged zero range.
    pub(crate) fn stage_zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.run = None;
        let h = header(KIND_ZERO, offset, len, &[], self.epoch);
        self.append([Piece::Header(h)])?;
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
        self.run = None;
        let h = header(
            KIND_COMMIT,
            seq,
            consistent_at_unix_ns as u64,
            &[],
            self.epoch,
        );
        self.append([Piece::Header(h)])?;
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

    /// A staged write's data: the received buffer while it is kept, else
    /// read back from the file.
    pub(crate) fn read(&self, log_pos: u64, len: u64) -> std::io::Result<Bytes> {
        if let Ok(i) = self.held.binary_search_by_key(&log_pos, |(at, _)| *at)
            && self.held[i].1.len() as u64 == len
        {
            return Ok(self.held[i].1.clone());
        }
        let mut data = vec![0u8; len as usize];
        self.file.read_exact_at(&mut data, log_pos)?;
        Ok(Bytes::from(data))
    }

    /// Empties the log (after a batch is applied, or to drop an
    /// uncommitted one). Not synced: a stale committed batch left behind is
    /// recognised by the secondary's record and skipped. Deferred batches
    /// (acknowledged, not yet applied) are kept: only what follows the
    /// newest of them is dropped (cut off the file). With none, on a data
    /// dir that cannot share extents the log is *rewound*: the next batch
    /// is written from offset 0 over this one, under a new epoch (module
    /// docs); the first record is zeroed (its writeback started) so the old
    /// batch is no longer the log's, as a truncate did, and only what lies
    /// past [`REWIND_KEEP`] is cut off. Where batches are applied by clone
    /// the log is truncated to 0 (its blocks went to the volume).
    /// Either way the payloads kept in memory go (deferred batches are
    /// read back).
    pub(crate) fn reset(&mut self) -> std::io::Result<()> {
        let keep = self.deferred.back().map_or(0, |b| b.end);
        if keep == 0 && self.reflink {
            // Where batches are applied by clone, the log's blocks become
            // the volume's: rewriting them in place would copy on write
            // anyway, so the log gives its space back instead.
            self.file.set_len(0)?;
            self.epoch = new_epoch(self.epoch);
        } else if keep == 0 {
            let len = self.file.metadata()?.len();
            if len > REWIND_KEEP {
                self.file.set_len(REWIND_KEEP)?;
            }
            if len >= HEADER {
                self.file.write_all_at(&[0u8; HEADER as usize], 0)?;
                start_writeback(&self.file, 0, HEADER);
            }
            self.epoch = new_epoch(self.epoch);
        } else {
            // Every committed record is in the file (`commit` wrote it out).
            self.file.set_len(keep)?;
        }
        self.end = keep;
        self.written = keep;
        self.unwritten.clear();
        self.run = None;
        self.drop_held();
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

    fn data(byte: u8, len: usize) -> Bytes {
        Bytes::from(vec![byte; len])
    }

    /// A new, empty log in a temporary dir (alive while the guard is) and
    /// its path.
    fn empty_log(reflink: bool) -> (tempfile::TempDir, PathBuf, StagingLog) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.staging");
        let mut log = StagingLog::open(&path, reflink).expect("open");
        assert_eq!(log.recover().expect("recover"), vec![]);
        (dir, path, log)
    }

    impl StagingLog {
        /// Stages `data` with its crc computed here (the agent derives it
        /// from the frame it verified).
        fn stage(&mut self, offset: u64, data: &Bytes) -> std::io::Result<()> {
            self.stage_write(offset, data, crc32fast::hash(data))
        }
    }

    /// Records staged with the crc the agent derives from each verified
    /// frame (not from the data) are the records recovery reads back and
    /// trusts: plain and aligned, and a run extended by later frames.
    #[test]
    fn records_staged_with_a_crc_from_the_frame_are_recovered() {
        for reflink in [false, true] {
            let (_dir, path, mut log) = empty_log(reflink);
            let frames = [
                (0u64, data(1, 512)),
                (8192, data(2, 65536)),
                (73728, data(3, 65536)),
            ];
            for (offset, d) in &frames {
                let frame_crc = crate::frame::write_crc(*offset, d);
                let derived = crate::frame::data_crc(*offset, d.len() as u64, frame_crc);
                log.stage_write(*offset, d, derived).expect("stage");
            }
            let batch = log.commit(4, 40).expect("commit");
            drop(log);
            let mut reopened = StagingLog::open(&path, reflink).expect("reopen");
            let found = reopened.recover().expect("recover");
            assert_eq!(
                found.len(),
                1,
                "reflink {reflink}: the committed batch is trusted"
            );
            assert_eq!(found[0].changes, batch.changes, "reflink {reflink}");
        }
    }

    #[test]
    fn only_a_fully_intact_committed_batch_is_recovered() {
        let (_dir, path, mut log) = empty_log(false);
        log.stage(4096, &data(7u8, 4096)).expect("stage");
        log.stage_zero(0, 4096).expect("stage");
        // Uncommitted: a restart drops it.
        drop(log);
        let mut log = StagingLog::open(&path, false).expect("open");
        assert_eq!(log.recover().expect("recover"), vec![]);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 0);

        log.stage(8192, &data(9u8, 4096)).expect("stage");
        log.stage_zero(0, 4096).expect("stage");
        let batch = log.commit(5, 1234).expect("commit");
        assert_eq!(batch.changes.len(), 2);
        drop(log);
        let mut log = StagingLog::open(&path, false).expect("open");
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
        let count = MEMORY_MAX as usize / block + 8;
        for i in 0..count {
            log.stage((i * block) as u64, &data(i as u8, block))
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
        let mut log = StagingLog::open(&path, false).expect("open");
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
        log.stage(8192, &data(9u8, 4096)).expect("stage");
        log.stage_zero(0, 4096).expect("stage");
        log.commit(7, 1).expect("commit");
        drop(log);

        // A flipped data byte invalidates the whole batch.
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open raw");
        f.write_all_at(&[0], HEADER + 10).expect("corrupt");
        let mut log = StagingLog::open(&path, false).expect("open");
        assert_eq!(log.recover().expect("recover"), vec![]);
    }

    #[test]
    fn deferred_batches_survive_a_reset_and_a_restart_replays_them_in_order() {
        let (_dir, path, mut log) = empty_log(false);
        log.stage(0, &data(1u8, 4096)).expect("stage");
        let a = log.commit(1, 100).expect("commit");
        assert_eq!(a.bytes, 4096);
        log.defer(a.clone());
        log.stage(4096, &data(2u8, 8192)).expect("stage");
        log.stage_zero(0, 4096).expect("stage");
        let b = log.commit(2, 200).expect("commit");
        assert_eq!(b.bytes, 12288);
        log.defer(b.clone());
        assert_eq!(log.deferred_bytes(), 16384);
        // An open batch, then a stream breaks: reset drops only the open
        // batch; the deferred ones stay, readable.
        log.stage(8192, &data(3u8, 4096)).expect("stage");
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
        log.stage(0, &data(4u8, 4096)).expect("stage");
        let c = log.commit(3, 300).expect("commit");
        drop(log);
        let mut log = StagingLog::open(&path, false).expect("open");
        let found = log.recover().expect("recover");
        assert_eq!(found, vec![a.clone(), b.clone(), c.clone()]);
        let ats: Vec<i64> = found.iter().map(|b| b.consistent_at_unix_ns).collect();
        assert_eq!(replay_from(&ats, 200), 2, "a and b applied: replay c");
        // Applied in order: once nothing is deferred, reset empties it all.
        log.defer(found[0].clone());
        log.pop_deferred();
        assert_eq!(log.deferred_bytes(), 0);
        log.reset().expect("reset");
        drop(log);
        assert_eq!(
            recovered(&path, false),
            vec![],
            "emptied: nothing to replay"
        );
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
        let mut log = StagingLog::open_with(&path, budget.account(), false).expect("open");
        assert_eq!(log.recover().expect("recover"), vec![]);
        let block = 256 << 10;
        for i in 0..16 {
            log.stage((i * block) as u64, &data(i as u8, block))
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
        let mut log = StagingLog::open_with(&path, budget.account(), false).expect("open");
        assert_eq!(log.recover().expect("recover"), vec![], "reset emptied it");
    }

    #[test]
    fn contiguous_aligned_writes_stage_as_one_block_aligned_record_that_survives_a_restart() {
        let (_dir, path, mut log) = empty_log(true);
        let piece = 64 << 10;
        // A small write first, so the aligned record does not start at 0.
        log.stage(0, &data(1, 512)).expect("stage");
        // 10 MiB contiguous in 64 KiB frames: one run up to RUN_MAX, then
        // a second; its header is rewritten both in memory and, once the
        // 1 MiB chunk went to the file, in the file.
        let frames = (10 << 20) / piece;
        for i in 0..frames {
            log.stage((1 << 20) + (i * piece) as u64, &data(i as u8, piece))
                .expect("stage");
        }
        // Not contiguous: a record of its own.
        log.stage(64 << 20, &data(9, piece)).expect("stage");
        // Aligned but too small to clone: a plain write.
        log.stage(128 << 20, &data(8, 4096)).expect("stage");
        let batch = log.commit(1, 10).expect("commit");
        let shape: Vec<(u64, u64, bool)> = batch
            .changes
            .iter()
            .map(|c| match *c {
                StagedChange::Write {
                    offset,
                    len,
                    log_pos,
                } => (offset, len, log_pos % ALIGN == 0),
                StagedChange::Zero { .. } => panic!("no zeros staged"),
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, 512, false),
                (1 << 20, RUN_MAX, true),
                ((1 << 20) + RUN_MAX, (10 << 20) - RUN_MAX, true),
                (64 << 20, piece as u64, true),
                (128 << 20, 4096, false),
            ]
        );
        let expect = |offset: u64, len: u64| -> Vec<u8> {
            (0..len / piece as u64)
                .flat_map(|k| {
                    let i = (offset - (1 << 20)) / piece as u64 + k;
                    vec![i as u8; piece]
                })
                .collect()
        };
        drop(log);
        let mut log = StagingLog::open(&path, true).expect("open");
        let found = log.recover().expect("recover");
        assert_eq!(
            found,
            vec![batch.clone()],
            "every rewritten header reads back intact"
        );
        for c in &batch.changes[1..3] {
            let StagedChange::Write {
                offset,
                len,
                log_pos,
            } = *c
            else {
                panic!("a write")
            };
            assert_eq!(
                log.read(log_pos, len).expect("read").to_vec(),
                expect(offset, len)
            );
        }
        // Emptying the log rewinds it: nothing to replay after a restart.
        log.reset().expect("reset");
        drop(log);
        assert_eq!(recovered(&path, true), vec![]);
    }

    /// What a restart finds in the log at `path`.
    fn recovered(path: &Path, reflink: bool) -> Vec<CommittedBatch> {
        let mut log = StagingLog::open(path, reflink).expect("reopen");
        log.recover().expect("recover")
    }

    /// Stages `n` writes of `len` bytes (filled with `byte`) from volume
    /// offset 0; they reach the file once a chunk has gathered.
    fn stage_n(log: &mut StagingLog, n: u64, len: usize, byte: u8) {
        for i in 0..n {
            log.stage(i * len as u64, &data(byte, len)).expect("stage");
        }
    }

    /// The hazard of rewriting the log in place: a new batch, torn by a
    /// crash, ends exactly where an older batch's records continue (same
    /// record sizes), and that older batch's commit follows. Read on, it
    /// would pass for one committed batch mixing both. The epoch stops the
    /// reading at the first older record: nothing is trusted.
    #[test]
    fn a_torn_batch_written_over_an_older_one_is_not_read_on_into_it() {
        let (_dir, path, mut log) = empty_log(false);
        let len = 512 << 10;
        stage_n(&mut log, 6, len, 1);
        log.commit(1, 100).expect("commit");
        log.reset().expect("reset");
        // Four records of the new batch reach the file (two 1 MiB chunks);
        // then the agent dies: no commit.
        stage_n(&mut log, 4, len, 2);
        assert_eq!(log.written, 4 * (HEADER + len as u64));
        drop(log);
        assert_eq!(
            recovered(&path, false),
            vec![],
            "a torn batch is never trusted"
        );
    }

    /// A shorter batch committed over a longer one is recovered alone.
    #[test]
    fn a_batch_committed_over_a_longer_one_is_recovered_alone() {
        let (_dir, path, mut log) = empty_log(false);
        let len = 512 << 10;
        stage_n(&mut log, 6, len, 1);
        log.commit(1, 100).expect("commit");
        log.reset().expect("reset");
        stage_n(&mut log, 2, len, 2);
        let b = log.commit(2, 200).expect("commit");
        drop(log);
        let found = recovered(&path, false);
        assert_eq!(found, vec![b.clone()]);
        // And its data is the new batch's.
        let mut log = StagingLog::open(&path, false).expect("reopen");
        log.recover().expect("recover");
        for change in &b.changes {
            let StagedChange::Write { log_pos, len, .. } = *change else {
                panic!("a write")
            };
            assert!(
                log.read(log_pos, len)
                    .expect("read")
                    .iter()
                    .all(|&x| x == 2)
            );
        }
    }

    /// After a rewind the old batch is no longer the log's (its first
    /// record is zeroed), and what lies past `REWIND_KEEP` is cut off.
    #[test]
    fn a_rewind_forgets_the_old_batch_and_keeps_at_most_rewind_keep() {
        let (_dir, path, mut log) = empty_log(false);
        stage_n(&mut log, REWIND_KEEP / (4 << 20) + 2, 4 << 20, 3);
        log.commit(1, 100).expect("commit");
        assert!(std::fs::metadata(&path).expect("stat").len() > REWIND_KEEP);
        log.reset().expect("reset");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), REWIND_KEEP);
        drop(log);
        assert_eq!(recovered(&path, false), vec![]);
    }

    /// A log written before epochs (epoch 0: not in the crc) still
    /// recovers its committed batch.
    #[test]
    fn a_log_from_before_epochs_recovers() {
        let (_dir, path, mut log) = empty_log(false);
        log.epoch = 0;
        log.stage(4096, &data(7, 4096)).expect("stage");
        log.stage_zero(0, 4096).expect("stage");
        let a = log.commit(9, 900).expect("commit");
        drop(log);
        let bytes = std::fs::read(&path).expect("read the log");
        assert!(bytes[28..32].iter().all(|&b| b == 0), "epoch 0 on disk");
        assert_eq!(recovered(&path, false), vec![a]);
    }
}
