//! Gathers the initial sync's bulk writes into runs written in one go.
//!
//! An initial sync or a resync of unordered data arrives as 64 KiB write
//! frames, mostly back to back. Written one by one, each frame cost a hop
//! to a pool thread and back, a copy, and a writeback call (on a VM, a
//! doorbell to the virtual disk): the receiver, not the disk or the
//! network, was what limited the copy. A run of contiguous frames is
//! written instead with one vectored write from the received buffers and
//! one writeback call.
//!
//! Only unordered frames that ask for no acknowledgement and no FUA join a
//! run: nothing waits on them until the next barrier, and the stream
//! writes the run out before it handles any other frame (a barrier, a
//! commit, a staged or acknowledged write) and when no frame follows
//! within [`RUN_WAIT`]. A run the stream drops (the stream broke or was
//! superseded) is a run the primary was never told about: it resends it,
//! as after a crash.

use bytes::Bytes;

/// A run grows up to this many bytes: large enough that the per-run costs
/// vanish, small enough that a run pins little of the received buffers.
pub(crate) const RUN_MAX: u64 = 1 << 20;

/// How long an open run waits for its next frame before it is written
/// out anyway: the sender is usually just behind the receiver, and a run
/// written at every pause would be a frame or two long.
pub(crate) const RUN_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// What to do with a frame that may join the open run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Join {
    /// Append it to the open run (or start one).
    Append,
    /// Write the open run out first, then start a new run with it.
    WriteOutFirst,
}

/// Whether a frame of `len` bytes at `offset` continues `open`
/// (`(start, end)` of the open run, if any) within `max` bytes.
pub(crate) fn join(open: Option<(u64, u64)>, offset: u64, len: u64, max: u64) -> Join {
    match open {
        None => Join::Append,
        Some((start, end)) if offset == end && end - start + len <= max => Join::Append,
        Some(_) => Join::WriteOutFirst,
    }
}

/// The open run: contiguous received buffers not written yet.
#[derive(Debug, Default)]
pub(crate) struct BulkRun {
    start: u64,
    end: u64,
    pieces: Vec<Bytes>,
}

/// A run taken out to be written.
pub(crate) struct TakenRun {
    /// Where it starts in the volume.
    pub(crate) offset: u64,
    /// Its bytes.
    pub(crate) len: u64,
    /// The received buffers, in order.
    pub(crate) pieces: Vec<Bytes>,
}

impl BulkRun {
    /// The open run's `(start, end)`, if any.
    pub(crate) fn span(&self) -> Option<(u64, u64)> {
        (!self.pieces.is_empty()).then_some((self.start, self.end))
    }

    /// Appends `data` at `offset`; the caller checked [`join`]. Returns
    /// whether the run is now full.
    pub(crate) fn push(&mut self, offset: u64, data: Bytes) -> bool {
        if self.pieces.is_empty() {
            self.start = offset;
            self.end = offset;
        }
        debug_assert_eq!(offset, self.end, "a run only grows at its end");
        self.end += data.len() as u64;
        self.pieces.push(data);
        self.end - self.start >= RUN_MAX
    }

    /// Takes the open run out, leaving none.
    pub(crate) fn take(&mut self) -> Option<TakenRun> {
        let (offset, end) = self.span()?;
        Some(TakenRun {
            offset,
            len: end - offset,
            pieces: std::mem::take(&mut self.pieces),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1 << 10;

    #[test]
    fn join_table() {
        let m = 256 * K;
        type Row = (Option<(u64, u64)>, u64, u64, Join);
        let rows: [Row; 7] = [
            (None, 0, 64 * K, Join::Append),
            (None, 12345, 1, Join::Append),
            (Some((0, 64 * K)), 64 * K, 64 * K, Join::Append),
            // exactly full
            (Some((0, 192 * K)), 192 * K, 64 * K, Join::Append),
            // one byte past the cap
            (Some((0, 192 * K)), 192 * K, 64 * K + 1, Join::WriteOutFirst),
            // a gap
            (Some((0, 64 * K)), 128 * K, 64 * K, Join::WriteOutFirst),
            // going backwards (a rewrite of the run's own range)
            (Some((64 * K, 128 * K)), 64 * K, 64 * K, Join::WriteOutFirst),
        ];
        for (i, (open, offset, len, want)) in rows.into_iter().enumerate() {
            assert_eq!(join(open, offset, len, m), want, "row {i}");
        }
    }

    #[test]
    fn a_run_grows_until_full_and_is_taken_whole() {
        let mut run = BulkRun::default();
        assert!(run.take().is_none());
        let piece = Bytes::from(vec![7u8; (RUN_MAX / 4) as usize]);
        let mut full = false;
        for i in 0..4 {
            let at = 4096 + i * piece.len() as u64;
            assert_eq!(
                join(run.span(), at, piece.len() as u64, RUN_MAX),
                Join::Append
            );
            full = run.push(at, piece.clone());
        }
        assert!(full);
        let taken = run.take().expect("a run");
        assert_eq!(
            (taken.offset, taken.len, taken.pieces.len()),
            (4096, RUN_MAX, 4)
        );
        assert!(run.span().is_none());
    }
}
