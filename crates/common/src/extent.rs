//! Byte extents: `{offset, length}` runs, as reported by dirty-map queries and
//! NBD block status.

use serde::{Deserialize, Serialize};

/// A run of bytes `[offset, offset + length)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Extent {
    /// First byte of the run.
    pub offset: u64,
    /// Number of bytes; never zero in a list produced by Ember.
    pub length: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Sorts extents and merges those that touch or overlap.
pub fn merge_extents(mut extents: Vec<Extent>) -> Vec<Extent> {
    extents.retain(|e| e.length > 0);
    extents.sort_unstable();
    let mut merged: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        match merged.last_mut() {
            Some(last) if e.offset <= last.end() => {
                last.length = last.end().max(e.end()) - last.offset;
            }
            _ => merged.push(e),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_touching_and_overlapping_runs() {
        let e = |offset, length| Extent { offset, length };
        assert_eq!(
            merge_extents(vec![e(10, 5), e(0, 10), e(30, 1), e(12, 10), e(40, 0)]),
            vec![e(0, 22), e(30, 1)]
        );
    }
}
