//! Applying staged writes by sharing the staging log's blocks with the
//! volume (`FICLONERANGE`) instead of writing the data a second time.
//!
//! Why: a secondary writes async data twice, to the staging log and then
//! to the volume, so a stream could never exceed half the secondary's
//! disk. On a data dir that can share extents (XFS with reflink, btrfs) the
//! staging log stores large aligned writes block-aligned
//! (`staging::stage_aligned`), and applying a committed batch clones those
//! ranges into the volume: the data is written once.
//!
//! Crash consistency is unchanged (docs/replication.md): a clone happens
//! only after the batch's commit record is durable, like the write it
//! replaces; the volume's fsync after the batch makes it durable; replay
//! at start clones the same log range to the same place again, which
//! yields the same image (idempotent). Emptying the log afterwards frees
//! only the log's reference to the blocks; the volume keeps its own.
//!
//! What must not live here: the order of a batch's changes (`apply.rs`
//! keeps it, applying writes and clones in log order).

use std::fs::File;
use std::os::unix::fs::FileExt;

use std::ops::Range;

use super::staging::{ALIGN, CLONE_MIN, StagedChange};

/// Whether a staged write of `len` bytes for volume `offset`, stored at
/// `log_pos` of the log, is applied by cloning: the data dir shares
/// extents, every boundary is block-aligned on both sides (the ioctl
/// refuses anything else) and the range is large enough that an extent
/// costs less than writing it again.
pub(crate) fn applies_by_clone(reflink: bool, offset: u64, len: u64, log_pos: u64) -> bool {
    reflink
        && len >= CLONE_MIN
        && [offset, len, log_pos]
            .iter()
            .all(|v| v.is_multiple_of(ALIGN))
}

/// How a staged change is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Way {
    /// Written from memory or from the log read back.
    Write,
    /// Cloned from the log.
    Clone,
    /// Zeroed.
    Zero,
}

/// How `change` is applied on a data dir that can (`reflink`) or cannot
/// share extents.
pub(crate) fn way(reflink: bool, change: &StagedChange) -> Way {
    match *change {
        StagedChange::Write {
            offset,
            len,
            log_pos,
        } if applies_by_clone(reflink, offset, len, log_pos) => Way::Clone,
        StagedChange::Write { .. } => Way::Write,
        StagedChange::Zero { .. } => Way::Zero,
    }
}

/// A batch's changes cut into runs applied the same way, in log order
/// (each run is finished before the next starts: a later write to a range
/// an earlier change touched must land after it, whichever way each goes).
pub(crate) fn runs(changes: &[StagedChange], reflink: bool) -> Vec<(Way, Range<usize>)> {
    let mut out: Vec<(Way, Range<usize>)> = Vec::new();
    for (i, change) in changes.iter().enumerate() {
        let w = way(reflink, change);
        match out.last_mut() {
            Some((last, range)) if *last == w => range.end = i + 1,
            _ => out.push((w, i..i + 1)),
        }
    }
    out
}

/// One staged range to clone: `len` bytes at `log_pos` of the log to
/// `offset` of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CloneRange {
    pub(crate) log_pos: u64,
    pub(crate) len: u64,
    pub(crate) offset: u64,
}

/// What [`clone_ranges`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CloneOutcome {
    /// Bytes shared with the log.
    pub(crate) cloned: u64,
    /// Bytes the file system would not clone, copied instead.
    pub(crate) copied: u64,
}

/// Clones each range from the log `src` into the volume `dst`, in order;
/// a range the file system refuses to clone (another file system under
/// the volume, a block size above 4 KiB, a raw device) is copied instead,
/// so the outcome never depends on the refusal. Blocking; does not sync.
///
/// # Errors
/// Reading the log or writing the volume failed (for a copied range).
pub(crate) fn clone_ranges(
    src: &File,
    dst: &File,
    ranges: &[CloneRange],
) -> std::io::Result<CloneOutcome> {
    let mut outcome = CloneOutcome::default();
    for r in ranges {
        match ember_volume::cow::reflink_range(src, r.log_pos, r.len, dst, r.offset) {
            Ok(()) => outcome.cloned += r.len,
            Err(e) => {
                tracing::debug!(error = %e, offset = r.offset, len = r.len, "clone refused; copying the staged range");
                let mut data = vec![0u8; r.len as usize];
                src.read_exact_at(&mut data, r.log_pos)?;
                dst.write_all_at(&data, r.offset)?;
                outcome.copied += r.len;
            }
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_large_block_aligned_ranges_on_a_reflink_dir_are_cloned() {
        let big = CLONE_MIN;
        // (reflink, offset, len, log_pos, cloned)
        let rows = [
            (true, 0, big, 4096, true),
            (true, 1 << 30, 1 << 20, 8192, true),
            (false, 0, big, 4096, false),
            (true, 0, big - ALIGN, 4096, false),
            (true, 512, big, 4096, false),
            (true, 0, big + 512, 4096, false),
            (true, 0, big, 4096 + 32, false),
            (true, 0, 0, 0, false),
        ];
        for (reflink, offset, len, log_pos, want) in rows {
            assert_eq!(
                applies_by_clone(reflink, offset, len, log_pos),
                want,
                "reflink {reflink} offset {offset} len {len} log_pos {log_pos}"
            );
        }
    }

    #[test]
    fn a_batch_is_cut_into_runs_in_log_order() {
        let big = CLONE_MIN;
        let w = |offset: u64, len: u64, log_pos: u64| StagedChange::Write {
            offset,
            len,
            log_pos,
        };
        let z = StagedChange::Zero {
            offset: 0,
            len: 4096,
        };
        let clone = w(0, big, 4096);
        let write = w(4096, 4096, 4096 + 32);
        // (changes, reflink, expected runs)
        type Row = (Vec<StagedChange>, bool, Vec<(Way, Range<usize>)>);
        let rows: Vec<Row> = vec![
            (vec![], true, vec![]),
            (
                vec![clone, clone, write],
                true,
                vec![(Way::Clone, 0..2), (Way::Write, 2..3)],
            ),
            (
                vec![write, clone, write, z, clone],
                true,
                vec![
                    (Way::Write, 0..1),
                    (Way::Clone, 1..2),
                    (Way::Write, 2..3),
                    (Way::Zero, 3..4),
                    (Way::Clone, 4..5),
                ],
            ),
            // No reflink: aligned writes are written like the rest.
            (
                vec![write, clone, write, z],
                false,
                vec![(Way::Write, 0..3), (Way::Zero, 3..4)],
            ),
        ];
        for (changes, reflink, want) in rows {
            assert_eq!(
                runs(&changes, reflink),
                want,
                "{changes:?} reflink {reflink}"
            );
        }
    }

    #[test]
    fn a_range_the_file_system_cannot_clone_is_copied_exactly() {
        // tmpfs/ext4 refuse the clone (XFS clones it): the image is the same.
        let dir = tempfile::tempdir().expect("tempdir");
        let src_path = dir.path().join("log");
        let dst_path = dir.path().join("vol");
        let payload: Vec<u8> = (0..CLONE_MIN as usize).map(|i| (i % 251) as u8).collect();
        std::fs::write(
            &src_path,
            [vec![0u8; ALIGN as usize], payload.clone()].concat(),
        )
        .expect("write log");
        std::fs::write(&dst_path, vec![0u8; 4 * CLONE_MIN as usize]).expect("write vol");
        let src = File::open(&src_path).expect("open log");
        let dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dst_path)
            .expect("open vol");
        let range = CloneRange {
            log_pos: ALIGN,
            len: CLONE_MIN,
            offset: CLONE_MIN,
        };
        let outcome = clone_ranges(&src, &dst, &[range]).expect("clone");
        assert_eq!(outcome.cloned + outcome.copied, CLONE_MIN);
        let image = std::fs::read(&dst_path).expect("read vol");
        assert_eq!(
            &image[CLONE_MIN as usize..2 * CLONE_MIN as usize],
            &payload[..]
        );
        assert!(image[..CLONE_MIN as usize].iter().all(|&b| b == 0));
        assert!(image[2 * CLONE_MIN as usize..].iter().all(|&b| b == 0));
    }
}
