//! Copy-on-write file clones (reflinks) for snapshots, clones and recovery
//! points.
//!
//! On a file system with shared extents (XFS made with `-m reflink=1`, the
//! default since xfsprogs 5.1; btrfs), `FICLONE` makes a new file that
//! shares every extent of the source: it takes time proportional to the
//! number of extents, not the bytes, and costs no data space until one side
//! overwrites a block. Elsewhere (ext4) the ioctl fails and callers fall
//! back to the sparse copy in `fsutil::copy_sparse`.
//!
//! The store probes its data dir once at open ([`detect`]) rather than
//! trying the ioctl per operation, so `GetCapabilities` can report what a
//! snapshot will cost before anyone takes one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Result, io};
use crate::fsutil::sync_dir;

/// Name prefix of [`detect`]'s temporary files; the store removes any it
/// finds at open (left by a crash mid-probe).
pub(crate) const PROBE_PREFIX: &str = ".reflink-probe-";

/// How the store makes point-in-time copies of a volume's data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMethod {
    /// `FICLONE`: the copy shares extents with the source; O(extents) time,
    /// no data space until blocks are overwritten.
    Reflink,
    /// Sparse copy of the allocated bytes: time and space proportional to
    /// the allocated data.
    Copy,
}

impl SnapshotMethod {
    /// The wire/CLI spelling: `"reflink"` or `"copy"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reflink => "reflink",
            Self::Copy => "copy",
        }
    }
}

impl std::fmt::Display for SnapshotMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Probes whether files in `dir` can be reflinked: writes a small temp file,
/// clones it with `FICLONE` and removes both. Any failure (including not
/// being able to write the probe) answers [`SnapshotMethod::Copy`], the
/// method that works everywhere. Never panics.
pub fn detect(dir: &Path) -> SnapshotMethod {
    // Unique per process and call, so concurrent probes never collide.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let src = dir.join(format!("{PROBE_PREFIX}{}-{n}", std::process::id()));
    let dst = dir.join(format!("{PROBE_PREFIX}{}-{n}.clone", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&src)?;
        // A real block: some file systems clone an empty file trivially.
        f.write_all(&[0x5a; 4096])?;
        let d = OpenOptions::new().write(true).create_new(true).open(&dst)?;
        ficlone(&f, &d)
    })();
    let _ = std::fs::remove_file(&dst);
    let _ = std::fs::remove_file(&src);
    match result {
        Ok(()) => SnapshotMethod::Reflink,
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "reflink probe failed; snapshots will copy");
            SnapshotMethod::Copy
        }
    }
}

fn ficlone(src: &File, dst: &File) -> std::io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open files we own for the duration of the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Creates `dst` (which must not exist) as a reflink clone of all of `src`
/// (data and size) and fsyncs it. On failure `dst` is removed, so a caller
/// can fall back to copying into the same path.
///
/// # Errors
/// `Io` with the OS error: `EXDEV` (different file systems),
/// `EOPNOTSUPP`/`EINVAL` (no reflink support), `EEXIST`, `ENOSPC`, …
pub fn reflink_file(src: &Path, dst: &Path) -> Result<()> {
    let to = clone_into(src, dst)?;
    let result = to.sync_all().map_err(io("sync reflink target", dst));
    if result.is_err() {
        drop(to);
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// As [`reflink_file`] without the fsync, for a caller that must hold
/// something (a replication stream) only for the clone itself and syncs
/// the target later, before publishing it (a recovery point). Until then
/// the target must be treated as a temporary: after a crash its contents
/// are undefined.
///
/// # Errors
/// As [`reflink_file`].
pub fn reflink_file_unsynced(src: &Path, dst: &Path) -> Result<()> {
    clone_into(src, dst).map(drop)
}

/// `FICLONE` of `src` into the new file `dst`; removes `dst` on failure.
fn clone_into(src: &Path, dst: &Path) -> Result<File> {
    let from = File::open(src).map_err(io("open reflink source", src))?;
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io("create reflink target", dst))?;
    match ficlone(&from, &to) {
        Ok(()) => Ok(to),
        Err(e) => {
            drop(to);
            let _ = std::fs::remove_file(dst);
            Err(io("reflink", dst)(e))
        }
    }
}

/// Clones `len` bytes at `src_off` of `src` to `dst_off` of `dst` with
/// `FICLONERANGE` (`len == 0` means "to the end of `src`"). Offsets and
/// length must be multiples of the file system block size, except a range
/// that ends at the source's end of file. Does not sync.
///
/// # Errors
/// The OS error, e.g. `EINVAL` for unaligned ranges, `EXDEV`, `EOPNOTSUPP`.
pub fn reflink_range(
    src: &File,
    src_off: u64,
    len: u64,
    dst: &File,
    dst_off: u64,
) -> std::io::Result<()> {
    let arg = libc::file_clone_range {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset: src_off,
        src_length: len,
        dest_offset: dst_off,
    };
    // SAFETY: the kernel reads a `struct file_clone_range` (libc's
    // definition), which outlives the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE, &arg) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Publishes a fully built object: renames `tmp` to `dest` and fsyncs
/// `dest`'s parent directory, so after return the object survives a crash,
/// and before the rename nothing under the final name exists.
///
/// # Errors
/// `Io` for the rename or the directory sync.
pub fn publish(tmp: &Path, dest: &Path) -> Result<()> {
    std::fs::rename(tmp, dest).map_err(io("publish", dest))?;
    match dest.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

/// Writes `body` to the new file `path` and fsyncs it: the metadata file of
/// an object built inside a temporary directory that [`publish`] renames.
/// No temporary name and no fsync of the directory:
///
/// - the temporary directory is the unit of atomicity, so the file needs no
///   atomic replace of its own (a crash leaves the whole directory
///   unpublished, and the store removes it at open);
/// - `fsync` of a newly created file also makes its directory entry durable
///   on the file systems a data dir lives on: XFS forces its log up to the
///   inode's last change, and the create that added the entry is in it;
///   ext4 commits the running journal transaction, which holds the create;
///   btrfs logs the new inode's parent entries with it;
/// - [`publish`] then renames the directory and fsyncs its parent, which
///   orders the rename after everything above.
///
/// So a snapshot costs three fsyncs (data, metadata, parent), the first two
/// concurrent (XFS serves them with about one log force), where it took
/// four in sequence (the temp directory's own fsync dropped).
///
/// # Errors
/// `Io` for the create, write or sync; the file is then left for the
/// caller's cleanup of the temporary directory.
pub fn write_synced(path: &Path, body: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("create", path))?;
    f.write_all(body).map_err(io("write", path))?;
    f.sync_all().map_err(io("sync", path))
}

/// Test-only fault (`EMBER_FAULT_SNAPSHOT_STEP_DELAY_MS=MS`): pause this
/// long after each step of making a snapshot or clone (temp dir made, data
/// cloned, metadata written, published), so a crash test can `kill -9` the
/// agent between any two steps. Never set in production.
pub const FAULT_STEP_DELAY_ENV: &str = "EMBER_FAULT_SNAPSHOT_STEP_DELAY_MS";

/// Pauses after `step` when [`FAULT_STEP_DELAY_ENV`] is set. The variable
/// is read once per process and logged loudly, like the other
/// `EMBER_FAULT_*` switches.
pub(crate) async fn fault_pause(step: &'static str) {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    let delay = *DELAY.get_or_init(|| {
        let ms: u64 = std::env::var(FAULT_STEP_DELAY_ENV).ok()?.parse().ok()?;
        tracing::warn!(
            delay_ms = ms,
            "FAULT INJECTION: snapshot and clone steps are delayed ({FAULT_STEP_DELAY_ENV})"
        );
        Some(std::time::Duration::from_millis(ms))
    });
    if let Some(d) = delay {
        tracing::info!(step, "fault: pausing after snapshot step");
        tokio::time::sleep(d).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_spelling() {
        for (m, s) in [
            (SnapshotMethod::Reflink, "reflink"),
            (SnapshotMethod::Copy, "copy"),
        ] {
            assert_eq!(m.as_str(), s);
            assert_eq!(m.to_string(), s);
        }
    }

    #[test]
    fn detect_leaves_nothing_behind_and_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let _ = detect(dir.path());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // A directory that does not exist cannot be probed: copy.
        assert_eq!(detect(&dir.path().join("missing")), SnapshotMethod::Copy);
    }

    #[test]
    fn reflink_file_either_clones_exactly_or_leaves_no_target() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, vec![7u8; 65536]).unwrap();
        let dst = dir.path().join("dst");
        match (detect(dir.path()), reflink_file(&src, &dst)) {
            (SnapshotMethod::Reflink, Ok(())) => {
                assert_eq!(std::fs::read(&dst).unwrap(), vec![7u8; 65536]);
            }
            (SnapshotMethod::Copy, Err(_)) => assert!(!dst.exists()),
            (m, r) => panic!("detect said {m} but reflink_file returned {r:?}"),
        }
        // The target must not exist beforehand.
        std::fs::write(dir.path().join("taken"), b"x").unwrap();
        assert!(reflink_file(&src, &dir.path().join("taken")).is_err());
        assert_eq!(std::fs::read(dir.path().join("taken")).unwrap(), b"x");
    }

    #[test]
    fn publish_renames() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join(".creating-x");
        std::fs::create_dir(&tmp).unwrap();
        publish(&tmp, &dir.path().join("x")).unwrap();
        assert!(dir.path().join("x").is_dir());
        assert!(!tmp.exists());
    }
}
