//! A plain in-memory bitmap over block indices, stored as little-endian u64
//! words so that a range of words can be written to disk as is.

use ember_common::Extent;

/// A fixed-length set of block indices.
///
/// Invariant: bits at indices `>= len` are always zero, so word-wise unions
/// and counts never see garbage past the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    /// An all-clear bitmap of `len` bits.
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// Rebuilds a bitmap from words read from disk; excess bits are cleared.
    pub fn from_words(mut words: Vec<u64>, len: u64) -> Self {
        words.resize(len.div_ceil(64) as usize, 0);
        let mut bitmap = Self { words, len };
        bitmap.clear_tail();
        bitmap
    }

    fn clear_tail(&mut self) {
        let used = self.len % 64;
        if used != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << used) - 1;
        }
    }

    /// Number of bits (blocks) covered.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the bitmap covers no blocks.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The backing words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Grows (or shrinks) to `len` bits; new bits are clear.
    pub fn resize(&mut self, len: u64) {
        self.words.resize(len.div_ceil(64) as usize, 0);
        self.len = len;
        self.clear_tail();
    }

    /// Whether block `index` is set.
    pub fn get(&self, index: u64) -> bool {
        index < self.len && self.words[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// Sets blocks `[start, end)`, clamped to the bitmap length.
    pub fn set_range(&mut self, start: u64, end: u64) {
        self.apply_range(start, end, true);
    }

    /// Clears blocks `[start, end)`, clamped to the bitmap length.
    pub fn clear_range(&mut self, start: u64, end: u64) {
        self.apply_range(start, end, false);
    }

    fn apply_range(&mut self, start: u64, end: u64, set: bool) {
        let end = end.min(self.len);
        let mut i = start;
        while i < end {
            let word = (i / 64) as usize;
            let bit = i % 64;
            let span = (64 - bit).min(end - i);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << bit
            };
            if set {
                self.words[word] |= mask;
            } else {
                self.words[word] &= !mask;
            }
            i += span;
        }
    }

    /// `self |= other` (lengths must match).
    ///
    /// # Panics
    /// When the lengths differ: a caller bug.
    pub fn union_with(&mut self, other: &Bitmap) {
        assert_eq!(self.len, other.len, "bitmap union of different lengths");
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Runs of set bits as `(start, end)` block ranges, ascending.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut start: Option<u64> = None;
        for (wi, &word) in self.words.iter().enumerate() {
            let base = wi as u64 * 64;
            if word == 0 || word == u64::MAX {
                match (word == u64::MAX, start) {
                    (true, None) => start = Some(base),
                    (false, Some(s)) => {
                        runs.push((s, base));
                        start = None;
                    }
                    _ => {}
                }
                continue;
            }
            for bit in 0..64 {
                let set = word & (1 << bit) != 0;
                match (set, start) {
                    (true, None) => start = Some(base + bit),
                    (false, Some(s)) => {
                        runs.push((s, base + bit));
                        start = None;
                    }
                    _ => {}
                }
            }
        }
        if let Some(s) = start {
            runs.push((s, self.len));
        }
        runs
    }

    /// Set runs as byte extents for a given block size, the last one clamped
    /// to `limit_bytes` (the volume size).
    pub fn extents(&self, block_bytes: u64, limit_bytes: u64) -> Vec<Extent> {
        self.runs()
            .into_iter()
            .map(|(s, e)| {
                let offset = s * block_bytes;
                let end = (e * block_bytes).min(limit_bytes);
                Extent {
                    offset,
                    length: end - offset,
                }
            })
            .filter(|e| e.length > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn runs_match_a_naive_model(len in 1u64..400, ops in proptest::collection::vec((0u64..400, 0u64..200, any::<bool>()), 0..20)) {
            let mut bitmap = Bitmap::new(len);
            let mut model = vec![false; len as usize];
            for (start, span, set) in ops {
                let end = start + span;
                if set { bitmap.set_range(start, end) } else { bitmap.clear_range(start, end) }
                for i in start..end.min(len) { model[i as usize] = set; }
            }
            prop_assert_eq!(bitmap.count_ones(), model.iter().filter(|b| **b).count() as u64);
            let mut rebuilt = vec![false; len as usize];
            let mut last_end = None;
            for (s, e) in bitmap.runs() {
                prop_assert!(s < e && e <= len);
                prop_assert!(last_end.is_none_or(|l| l < s), "runs must be separated");
                last_end = Some(e);
                for i in s..e { rebuilt[i as usize] = true; }
            }
            prop_assert_eq!(rebuilt, model);
        }
    }

    #[test]
    fn extents_clamp_to_volume_size() {
        let mut b = Bitmap::new(3);
        b.set_range(1, 3);
        assert_eq!(
            b.extents(65536, 65536 * 2 + 4096),
            vec![Extent {
                offset: 65536,
                length: 65536 + 4096
            }]
        );
    }
}
