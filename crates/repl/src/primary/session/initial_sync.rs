//! Initial sync: copies the change set to a secondary that is not
//! consistent (new, or an interrupted earlier sync) as unordered direct
//! frames. Holes are never read; zero blocks and, when the secondary holds
//! data already, blocks whose blake3 matches are never sent. Progress (the
//! resume point) is persisted every [`GROUP`].
//!
//! Reads run ahead of the stream ([`READ_AHEAD`] segments), so the disk
//! read of one segment overlaps encryption and sending of the previous.
//! Segments are read into the agent's bulk buffers ([`crate::bulk`]) and
//! travel as slices of them: no fresh 4 MiB mapping per segment, no copy.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use ember_storage::StorageError;
use tokio::task::JoinHandle;

use super::{HASH_BLOCK, PIECE, Session, SessionError, change_set, tracking};
use crate::hashes::{self, Hash};
use crate::primary::link::Phase;

/// Largest read (segment) of the initial sync: fewer, larger disk reads;
/// one bulk buffer.
/// A segment travels as frames of at most [`PIECE`]: tonic's codec keeps
/// the largest message of a stream for the stream's life when nothing
/// else holds it at the next encode, on both sides: 4 MiB frames could
/// leave 4 MiB per volume on each agent after an initial sync (in the run
/// measured they did not, by timing; benches/RESULTS.md "Scale", run 4).
const BULK_PIECE: u64 = crate::bulk::BULK_BYTES as u64;
/// Initial sync persists its progress (resume point) every this many bytes.
const GROUP: u64 = 64 << 20;
/// Initial-sync passes stop once the change set is this small; the rest
/// goes in the atomic catch-up batch that makes the secondary consistent.
pub(super) const FINAL_ROUND_BYTES: u64 = 64 << 20;
/// Data segments read ahead of the one being sent.
const READ_AHEAD: usize = 2;

/// A stretch of a group, in whole hash blocks (the last may be short).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    offset: u64,
    len: u64,
    /// Every block lies inside a hole: zeros, nothing to read.
    hole: bool,
}

/// Splits `[start, end)` into hole segments and data segments of at most
/// [`BULK_PIECE`], at [`HASH_BLOCK`] boundaries counted from `start`.
/// `holes` is sorted, as the file system reports them.
fn segments(holes: &[(u64, u64)], start: u64, end: u64) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    let mut cursor = 0;
    let mut b = start;
    while b < end {
        let blen = (end - b).min(HASH_BLOCK);
        while cursor < holes.len() && holes[cursor].1 <= b {
            cursor += 1;
        }
        let hole = holes
            .get(cursor)
            .is_some_and(|&(s, e)| s <= b && b + blen <= e);
        match out.last_mut() {
            Some(seg)
                if seg.hole == hole
                    && seg.offset + seg.len == b
                    && (hole || seg.len + blen <= BULK_PIECE) =>
            {
                seg.len += blen;
            }
            _ => out.push(Segment {
                offset: b,
                len: blen,
                hole,
            }),
        }
        b += blen;
    }
    out
}

/// A run of blocks to send: `(offset, length, all zero)`.
type Run = (u64, u64, bool);

/// Compares the blocks of one segment with the secondary: returns the runs
/// that differ and the bytes that need not travel. Without `remote` (a new
/// secondary reads as zeros) only non-zero blocks differ.
fn diff_runs(
    seg: Segment,
    data: Option<&[u8]>,
    group_start: u64,
    remote: Option<&[Hash]>,
) -> (Vec<Run>, u64) {
    let mut runs: Vec<Run> = Vec::new();
    let mut skipped = 0;
    let end = seg.offset + seg.len;
    let mut b = seg.offset;
    while b < end {
        let blen = (end - b).min(HASH_BLOCK);
        let slice = data.map(|d| &d[(b - seg.offset) as usize..(b - seg.offset + blen) as usize]);
        let zero = slice.is_none_or(hashes::is_zero);
        let same = match remote {
            None => zero,
            Some(h) => {
                let mine = match slice {
                    Some(s) if !zero => *blake3::hash(s).as_bytes(),
                    _ => hashes::zero_hash(blen),
                };
                h.get(((b - group_start) / HASH_BLOCK) as usize) == Some(&mine)
            }
        };
        if same {
            skipped += blen;
        } else {
            match runs.last_mut() {
                Some((o, l, z)) if *z == zero && *o + *l == b => *l += blen,
                _ => runs.push((b, blen, zero)),
            }
        }
        b += blen;
    }
    (runs, skipped)
}

type Read = JoinHandle<Result<Vec<u8>, StorageError>>;

impl Session<'_> {
    /// Copies the change set until what is left fits the final atomic
    /// catch-up batch. `fresh`: the secondary was just created (all zeros).
    pub(super) async fn initial_sync(&mut self, fresh: bool) -> Result<(), SessionError> {
        self.link.set_phase(Phase::InitialSync);
        loop {
            let cp = self
                .tracker
                .consumer_checkpoint(&self.consumer)
                .map_err(tracking)?;
            if cp.dirty_bytes <= FINAL_ROUND_BYTES {
                return Ok(());
            }
            tracing::info!(volume = %self.name(), bytes = cp.dirty_bytes, fresh, "initial sync pass");
            self.start_resync(cp.dirty_bytes);
            // Barriers are pipelined: group k+1 streams while the secondary
            // makes group k durable; a group's range is cleared (the resume
            // point) only once its barrier is acknowledged.
            let mut in_flight: Option<(u64, u64, u64)> = None;
            for extent in &cp.extents {
                let mut start = extent.offset;
                while start < extent.end() {
                    let end = (start + GROUP).min(extent.end());
                    self.sync_group(start, end, fresh).await?;
                    if let Some(prev) = in_flight.take() {
                        self.finish_group(cp.id, prev).await?;
                    }
                    let seq = self.barrier_frame(0, None).await?;
                    in_flight = Some((seq, start, end));
                    start = end;
                }
            }
            if let Some(prev) = in_flight.take() {
                self.finish_group(cp.id, prev).await?;
            }
        }
    }

    async fn finish_group(
        &mut self,
        checkpoint: u64,
        (seq, start, end): (u64, u64, u64),
    ) -> Result<(), SessionError> {
        self.wait_ack(seq).await?;
        change_set::clear(
            &self.tracker,
            &self.consumer,
            checkpoint,
            Some((start, end)),
            true,
        )
        .await
        .map_err(tracking)?;
        Ok(())
    }

    fn spawn_read(&self, seg: Segment) -> Read {
        let volume = self.link.volume.clone();
        let len = seg.len as usize;
        let buf = crate::bulk::bulk_pool().take(len);
        tokio::spawn(async move { volume.device().read_into(seg.offset, buf, len).await })
    }

    /// One group of the initial sync.
    async fn sync_group(&mut self, start: u64, end: u64, fresh: bool) -> Result<(), SessionError> {
        let remote = if fresh {
            None
        } else {
            Some(self.remote_hashes(start, end - start).await?)
        };
        let holes = hashes::hole_map(&self.link.volume, start, end);
        let segs = segments(&holes, start, end);
        let mut to_read = segs.iter().copied().filter(|s| !s.hole);
        let mut reads: VecDeque<Read> = to_read
            .by_ref()
            .take(READ_AHEAD)
            .map(|s| self.spawn_read(s))
            .collect();
        for &seg in &segs {
            self.check()?;
            let data = if seg.hole {
                None
            } else {
                let read = reads.pop_front().expect("a read per data segment");
                if let Some(next) = to_read.next() {
                    reads.push_back(self.spawn_read(next));
                }
                Some(
                    read.await
                        .map_err(|e| SessionError::Local(format!("read task: {e}")))?
                        .map_err(|e| SessionError::Local(format!("read: {e}")))?,
                )
            };
            let (runs, skipped) = diff_runs(seg, data.as_deref(), start, remote.as_deref());
            let data = data.map(|d| crate::bulk::bulk_pool().lend(d));
            let sent = self.send_runs(seg, data, runs).await?;
            self.link
                .stats
                .resync_bytes_skipped
                .fetch_add(skipped, Ordering::Relaxed);
            self.resync_progress(seg.len, sent);
        }
        Ok(())
    }

    /// Sends the runs of one segment as slices of its read buffer (no
    /// copy). Returns bytes sent.
    async fn send_runs(
        &mut self,
        seg: Segment,
        data: Option<bytes::Bytes>,
        runs: Vec<Run>,
    ) -> Result<u64, SessionError> {
        if data.is_some() {
            // Until the stream pulls it, the segment's data counts against
            // the agent's replication memory budget (crate::budget).
            self.hold_for_read(seg.len).await?;
            if runs.is_empty() {
                // Nothing travels: no frame would carry these bytes, and
                // held on they would pile up segment after segment (a
                // group of zeros or of blocks the secondary holds).
                self.give_back_unsent(seg.len);
                return Ok(0);
            }
        }
        if let (Some(whole), [(offset, length, false)]) = (&data, runs.as_slice())
            && (*offset, *length) == (seg.offset, seg.len)
            && whole.len() as u64 == seg.len
        {
            self.buckets.resync.take(seg.len).await;
            let whole = data.expect("checked above");
            self.write_unordered(seg.offset, whole).await?;
            return Ok(seg.len);
        }
        // The segment's budget bytes ride with its last frame: its read
        // buffer lives until then.
        let held = if runs.is_empty() {
            0
        } else {
            std::mem::take(&mut self.unsent_held)
        };
        let mut sent = 0;
        let last_run = runs.len().saturating_sub(1);
        for (i, (offset, length, zero)) in runs.into_iter().enumerate() {
            self.buckets.resync.take(length).await;
            if zero {
                if i == last_run {
                    self.unsent_held += held;
                }
                self.zero_frame(offset, length, false, true, None).await?;
            } else {
                let d = data.as_ref().expect("non-zero runs come from data");
                let start = (offset - seg.offset) as usize;
                // Frames of at most PIECE (the codec keeps its largest
                // message per stream), slices of the read buffer.
                let mut at = start;
                let end = start + length as usize;
                while at < end {
                    let next = (at + PIECE as usize).min(end);
                    if i == last_run && next == end {
                        self.unsent_held += held;
                    }
                    self.write_frame(
                        seg.offset + at as u64,
                        d.slice(at..next),
                        false,
                        true,
                        false,
                        false,
                        None,
                    )
                    .await?;
                    at = next;
                }
            }
            sent += length;
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K64: u64 = 64 << 10;
    const M: u64 = 1 << 20;

    #[test]
    fn segments_split_holes_from_data_and_cap_data_segments() {
        // Data [0, 1M), hole [1M, 3M), data [3M, 12M) from a 12 MiB group.
        let segs = segments(&[(M, 3 * M)], 0, 12 * M);
        let kinds: Vec<(u64, u64, bool)> = segs.iter().map(|s| (s.offset, s.len, s.hole)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, M, false),
                (M, 2 * M, true),
                (3 * M, BULK_PIECE, false),
                (3 * M + BULK_PIECE, BULK_PIECE, false),
                (3 * M + 2 * BULK_PIECE, M, false),
            ]
        );
    }

    #[test]
    fn a_block_partly_in_a_hole_is_read() {
        // The hole ends 4 KiB into the second block: that block has data.
        let segs = segments(&[(0, K64 + 4096)], 0, 3 * K64);
        assert_eq!(
            segs,
            vec![
                Segment {
                    offset: 0,
                    len: K64,
                    hole: true
                },
                Segment {
                    offset: K64,
                    len: 2 * K64,
                    hole: false
                },
            ]
        );
    }

    #[test]
    fn a_short_tail_block_is_kept() {
        let segs = segments(&[], 0, K64 + 512);
        assert_eq!(
            segs,
            vec![Segment {
                offset: 0,
                len: K64 + 512,
                hole: false
            }]
        );
    }

    #[test]
    fn fresh_secondary_gets_only_non_zero_runs() {
        let seg = Segment {
            offset: 0,
            len: 4 * K64,
            hole: false,
        };
        let mut data = vec![0u8; (4 * K64) as usize];
        data[(K64 + 7) as usize] = 1; // block 1
        data[(2 * K64) as usize] = 2; // block 2
        let (runs, skipped) = diff_runs(seg, Some(&data), 0, None);
        assert_eq!(runs, vec![(K64, 2 * K64, false)]);
        assert_eq!(skipped, 2 * K64);
    }

    #[test]
    fn existing_secondary_gets_blocks_whose_hash_differs_including_zeros() {
        let seg = Segment {
            offset: 0,
            len: 3 * K64,
            hole: false,
        };
        let mut data = vec![0u8; (3 * K64) as usize];
        data[..K64 as usize].fill(9);
        let block0 = *blake3::hash(&data[..K64 as usize]).as_bytes();
        // The secondary holds block 0 already, garbage in block 1, zeros in 2.
        let remote = [block0, [7u8; 32], hashes::zero_hash(K64)];
        let (runs, skipped) = diff_runs(seg, Some(&data), 0, Some(&remote));
        assert_eq!(runs, vec![(K64, K64, true)]);
        assert_eq!(skipped, 2 * K64);
    }

    #[test]
    fn hole_segment_against_stale_secondary_sends_zero_runs_without_data() {
        let seg = Segment {
            offset: K64,
            len: 2 * K64,
            hole: true,
        };
        let remote = [[1u8; 32], [2u8; 32], hashes::zero_hash(K64)];
        let (runs, skipped) = diff_runs(seg, None, 0, Some(&remote));
        assert_eq!(runs, vec![(K64, K64, true)]);
        assert_eq!(skipped, K64);
    }
}
