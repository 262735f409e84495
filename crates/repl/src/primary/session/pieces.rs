//! Splitting a large client write into stream-sized pieces without keeping
//! the write's whole allocation alive once per piece.
//!
//! Why this is its own module: the obvious `Vec::split_off` loop leaves
//! every piece it returns with the *capacity* of the buffer it was cut from
//! (`split_off` keeps the original capacity and allocates the tail anew).
//! A 1 MiB write cut into 64 KiB pieces then held 1 MiB + 960 KiB + … +
//! 64 KiB ≈ 8.5 MiB of touched memory while its pieces waited in the
//! session's channel, and copied ~7.5 MiB to do it: with 20 streams to a
//! stalled peer the primary's RSS peaked at 262–272 MiB under a 64 MiB
//! budget (tests/tests/memory_budget.rs; benches/RESULTS.md "Scale", run
//! 4). Here every piece but the last is an exact-size copy, and the last
//! is the original buffer, so a write in flight holds at most its own
//! bytes plus the copies not yet encoded.

/// The pieces of one write's data, front to back: `(offset of the piece
/// within the write, data)`. Every piece but the last is a copy with
/// `capacity == len`; the last is the original buffer with the bytes
/// before it removed (so it keeps the original allocation, which the
/// write's budget bytes already count).
#[derive(Debug)]
pub(super) struct Pieces {
    data: Vec<u8>,
    piece: usize,
    at: usize,
    done: bool,
}

impl Pieces {
    /// Pieces of at most `piece` bytes (`piece > 0`) of `data`.
    pub(super) fn new(data: Vec<u8>, piece: usize) -> Self {
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
    type Item = (usize, Vec<u8>, bool);

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let rest = self.data.len() - self.at;
        if rest <= self.piece {
            // The last piece travels in the original buffer: no copy, and
            // the allocation goes away when this piece is encoded.
            self.done = true;
            let at = self.at;
            let mut last = std::mem::take(&mut self.data);
            last.drain(..at);
            return Some((at, last, true));
        }
        let at = self.at;
        self.at += self.piece;
        Some((at, self.data[at..self.at].to_vec(), false))
    }
}

#[cfg(test)]
mod tests {
    use super::Pieces;

    #[test]
    fn pieces_cover_the_write_in_order_and_only_the_last_keeps_the_buffer() {
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
            let out: Vec<_> = Pieces::new(data, piece).collect();
            let lens: Vec<usize> = out.iter().map(|(_, d, _)| d.len()).collect();
            assert_eq!(lens, want, "len {len} piece {piece}");
            let mut joined = Vec::new();
            for (k, (at, d, last)) in out.iter().enumerate() {
                assert_eq!(*at, joined.len(), "piece {k} offset");
                assert_eq!(*last, k + 1 == out.len(), "piece {k} last flag");
                if !last {
                    // The property the memory test depends on: a piece
                    // waiting in the channel holds its own bytes, not the
                    // whole write's allocation.
                    assert_eq!(d.capacity(), d.len(), "piece {k} of {len}: capacity");
                }
                joined.extend_from_slice(d);
            }
            assert_eq!(joined, original, "len {len} piece {piece}");
        }
    }

    #[test]
    fn a_split_megabyte_allocates_about_a_megabyte() {
        let out: Vec<_> = Pieces::new(vec![7u8; 1 << 20], 64 << 10).collect();
        let held: usize = out.iter().map(|(_, d, _)| d.capacity()).sum();
        // 15 exact copies plus the original 1 MiB buffer (the last piece);
        // the `split_off` loop this replaces held ~8.5 MiB.
        assert!(
            held <= (1 << 20) + 15 * (64 << 10),
            "pieces of a 1 MiB write hold {held} bytes"
        );
    }
}
