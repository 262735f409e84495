//! Splitting a large write into stream-sized pieces without copying it and
//! without keeping more than the write's own allocation alive.
//!
//! Why this is its own module: the obvious `Vec::split_off` loop leaves
//! every piece it returns with the *capacity* of the buffer it was cut from
//! (`split_off` keeps the original capacity and allocates the tail anew).
//! A 1 MiB write cut into 64 KiB pieces then held 1 MiB + 960 KiB + … +
//! 64 KiB ≈ 8.5 MiB of touched memory while its pieces waited in the
//! session's channel, and copied ~7.5 MiB to do it: with 20 streams to a
//! stalled peer the primary's RSS peaked at 262–272 MiB under a 64 MiB
//! budget (tests/tests/memory_budget.rs; benches/RESULTS.md "Scale", run
//! 4). Here every piece is a `Bytes` slice of the one allocation: nothing
//! is copied (prost copies each piece once, into the gRPC encode buffer),
//! and a write in flight holds exactly its own allocation until its last
//! piece is encoded — the frame its budget bytes ride on.

use bytes::Bytes;

/// The pieces of one write's data, front to back: `(offset of the piece
/// within the write, data, is the last piece)`. Every piece shares the
/// write's allocation.
#[derive(Debug)]
pub(super) struct Pieces {
    data: Bytes,
    piece: usize,
    at: usize,
    done: bool,
}

impl Pieces {
    /// Pieces of at most `piece` bytes (`piece > 0`) of `data`.
    pub(super) fn new(data: Bytes, piece: usize) -> Self {
        assert!(piece > 0, "pieces of zero bytes never end");
        Self {
            data,
            piece,
            at: 0,
            done: false,
        }
    }
}

impl Iterator for Pieces {
    /// `(offset within the write, data, is the last piece)`.
    type Item = (usize, Bytes, bool);

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let at = self.at;
        let rest = self.data.len() - at;
        if rest <= self.piece {
            // The last piece takes the handle itself: once it is encoded,
            // nothing of the write is left alive.
            self.done = true;
            let mut last = std::mem::take(&mut self.data);
            bytes::Buf::advance(&mut last, at);
            return Some((at, last, true));
        }
        self.at += self.piece;
        Some((at, self.data.slice(at..self.at), false))
    }
}

#[cfg(test)]
mod tests {
    use super::Pieces;
    use bytes::Bytes;

    #[test]
    fn pieces_cover_the_write_in_order_and_share_its_allocation() {
        // (write length, piece size, expected piece lengths)
        let cases: [(usize, usize, &[usize]); 6] = [
            (0, 4, &[0]),
            (3, 4, &[3]),
            (4, 4, &[4]),
            (5, 4, &[4, 1]),
            (8, 4, &[4, 4]),
            (1 << 20, 64 << 10, &[64 << 10; 16]),
        ];
        for (len, piece, want) in cases {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let original = data.clone();
            let data = Bytes::from(data);
            let base = data.as_ptr();
            let out: Vec<_> = Pieces::new(data, piece).collect();
            let lens: Vec<usize> = out.iter().map(|(_, d, _)| d.len()).collect();
            assert_eq!(lens, want, "len {len} piece {piece}");
            let mut joined = Vec::new();
            for (k, (at, d, last)) in out.iter().enumerate() {
                assert_eq!(*at, joined.len(), "piece {k} offset");
                assert_eq!(*last, k + 1 == out.len(), "piece {k} last flag");
                if !d.is_empty() {
                    // The property the memory test depends on: a piece
                    // waiting in the channel is a view of the write's own
                    // allocation, never a copy nor a larger buffer.
                    assert_eq!(d.as_ptr(), base.wrapping_add(*at), "piece {k} of {len}");
                }
                joined.extend_from_slice(d);
            }
            assert_eq!(joined, original, "len {len} piece {piece}");
        }
    }

    #[test]
    fn the_write_is_freed_once_its_last_piece_is() {
        let data = Bytes::from(vec![7u8; 1 << 20]);
        let handle = data.clone();
        let mut pieces = Pieces::new(data, 64 << 10);
        let first: Vec<_> = pieces.by_ref().take(15).collect();
        drop(first);
        assert!(!handle.is_unique(), "the last piece is still out");
        let last = pieces.next().expect("the last piece");
        assert!(last.2 && pieces.next().is_none());
        drop(last);
        assert!(handle.is_unique(), "nothing but the test holds the write");
    }
}
