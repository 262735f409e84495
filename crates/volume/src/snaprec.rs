//! The record that makes a directory under `snapshots/` a snapshot, and the
//! durability barrier that publishes it.
//!
//! A snapshot is `snapshots/SNAP/data.img` plus its [`SnapshotMeta`]. The
//! record is an extended attribute of the data file (`user.ember.snapshot`,
//! compact JSON) rather than a file of its own: an xattr is pure metadata,
//! logged with the inode, so making it durable needs no data writeback. A
//! metadata *file* needs its one block written back and then a log force
//! for its size, which on XFS serialised with the directory's log force
//! (measured: "publish first, one round of fsyncs" gained nothing while the
//! record was a file). Snapshots made before, and data dirs whose file
//! system refuses user xattrs (tmpfs before 6.6), carry `snapshot.json`
//! next to the data instead; [`read`] accepts both.
//!
//! How many durability rounds publishing takes is [`Barrier`], chosen once
//! per data dir from its file-system type ([`barrier_for`], a pure table).
//! Nothing here decides *when* a snapshot is taken: see `store.rs`.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{Result, StoreError, io};
use crate::fsutil::read_json;
use crate::meta::SnapshotMeta;

/// The data file of a snapshot directory.
pub(crate) const DATA_FILE: &str = "data.img";
/// The record of snapshots made before records moved into an xattr, and of
/// data dirs without user xattrs.
pub(crate) const META_FILE: &str = "snapshot.json";
/// The xattr holding the record on the data file.
const XATTR: &[u8] = b"user.ember.snapshot\0";
/// Longest record read back (a record is under 200 bytes).
const MAX_RECORD_BYTES: usize = 4096;

/// `statfs` magic of XFS (`XFS_SUPER_MAGIC`, "XFSB").
const XFS_MAGIC: u64 = 0x5846_5342;

/// How a snapshot built in `.creating-SNAP` is made durable before the
/// caller is told it exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Barrier {
    /// One log force, after the rename: an fsync of `snapshots/`. Only for
    /// a file system with one ordered metadata log that a directory fsync
    /// forces up to the directory's last change (XFS: `xfs_dir_fsync` forces
    /// the log to the inode's commit sequence, and a CIL checkpoint holds
    /// every transaction committed before it). Everything before the
    /// rename is metadata by then — the clone's extent mappings and
    /// refcount updates, the size, the record xattr, the mkdir — so the one
    /// force persists them all, and its cache flush persists the cloned
    /// blocks, which `FICLONE` wrote back before sharing them (a copy
    /// fsyncs its own data).
    OneLogForce,
    /// Order not known: fsync the data file (its data, size and record
    /// xattr) before the rename, then the parent after it. Two rounds.
    FileThenDir,
}

impl Barrier {
    /// The spelling in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OneLogForce => "one-log-force",
            Self::FileThenDir => "file-then-dir",
        }
    }
}

/// The barrier for a file system of `statfs` type `magic`: XFS has the
/// ordered log [`Barrier::OneLogForce`] relies on; for ext4 (fast commits
/// log only some inodes), btrfs (per-inode log trees) and anything else the
/// argument does not hold, so they keep the two rounds.
pub(crate) fn barrier_for(magic: u64) -> Barrier {
    if magic == XFS_MAGIC {
        Barrier::OneLogForce
    } else {
        Barrier::FileThenDir
    }
}

/// The barrier for the data dir `dir` (its file system's type). A failed
/// `statfs` answers the safe [`Barrier::FileThenDir`].
pub(crate) fn detect_barrier(dir: &Path) -> Barrier {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return Barrier::FileThenDir;
    };
    // SAFETY: statfs writes into a zeroed local struct; the path is a
    // NUL-terminated string that outlives the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return Barrier::FileThenDir;
    }
    // f_type's width differs between libc targets; a magic is 32 bits.
    #[allow(clippy::unnecessary_cast)]
    barrier_for(st.f_type as u64 & 0xffff_ffff)
}

/// Writes `meta` as the record of the snapshot being built in `tmp_dir`
/// (whose data file exists): the xattr on the data file, or, where the file
/// system refuses user xattrs, `snapshot.json` (written and fsynced, which
/// also makes its entry durable: see `cow::write_synced`). Not synced
/// otherwise: the caller's [`Barrier`] does that.
///
/// # Errors
/// `Io` for the xattr (other than "not supported") or the file.
pub(crate) fn write(tmp_dir: &Path, meta: &SnapshotMeta) -> Result<()> {
    let data = tmp_dir.join(DATA_FILE);
    let body = serde_json::to_vec(meta).expect("metadata serializes");
    let path = std::ffi::CString::new(data.as_os_str().as_bytes())
        .map_err(|e| StoreError::InvalidArgument(format!("snapshot path: {e}")))?;
    // SAFETY: both strings are NUL-terminated and outlive the call; the
    // value is `body.len()` readable bytes.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            XATTR.as_ptr().cast(),
            body.as_ptr().cast(),
            body.len(),
            libc::XATTR_CREATE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return crate::cow::write_synced(&tmp_dir.join(META_FILE), &body);
    }
    Err(io("record snapshot", &data)(err))
}

/// Reads the record of the snapshot directory `dir`: `snapshot.json` when
/// present, else the data file's xattr.
///
/// A data file without the xattr (a data dir copied without xattrs) gets
/// a record rebuilt from the directory name and the file, with a warning.
///
/// # Errors
/// `Io` when there is no data file (not a snapshot), `CorruptMetadata`
/// for a record that does not parse.
pub(crate) fn read(dir: &Path) -> Result<SnapshotMeta> {
    let file = dir.join(META_FILE);
    if file.exists() {
        return read_json(&file);
    }
    let data = dir.join(DATA_FILE);
    let path = std::ffi::CString::new(data.as_os_str().as_bytes())
        .map_err(|e| StoreError::InvalidArgument(format!("snapshot path: {e}")))?;
    let mut buf = vec![0u8; MAX_RECORD_BYTES];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            XATTR.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        if matches!(err.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)) {
            // A published snapshot always has its record; a data dir
            // copied without xattrs does not. Rebuilt from what the
            // directory still says, rather than hiding every snapshot.
            return derived(dir, &data);
        }
        return Err(io("read snapshot record", &data)(err));
    }
    buf.truncate(n as usize);
    serde_json::from_slice(&buf).map_err(|e| StoreError::CorruptMetadata {
        path: data,
        reason: e.to_string(),
    })
}

/// The record of a snapshot directory whose data file lost its xattr: the
/// directory's name, the data file's length and modification time.
fn derived(dir: &Path, data: &Path) -> Result<SnapshotMeta> {
    let st = std::fs::metadata(data).map_err(io("stat snapshot data", data))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tracing::warn!(snapshot_dir = %dir.display(), "snapshot record missing (data dir copied without xattrs?); rebuilt from the directory name and the data file");
    Ok(SnapshotMeta {
        name,
        size_bytes: st.len(),
        created_at_unix: std::os::unix::fs::MetadataExt::mtime(&st),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_xfs_gets_one_log_force() {
        for (magic, want) in [
            (XFS_MAGIC, Barrier::OneLogForce),
            (0xEF53, Barrier::FileThenDir),      // ext2/3/4
            (0x9123_683E, Barrier::FileThenDir), // btrfs
            (0x0102_1994, Barrier::FileThenDir), // tmpfs
            (0x6573_5546, Barrier::FileThenDir), // fuse
            (0, Barrier::FileThenDir),
        ] {
            assert_eq!(barrier_for(magic), want, "magic {magic:#x}");
        }
    }

    #[test]
    fn record_round_trips_in_an_xattr_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DATA_FILE), b"data").unwrap();
        let meta = SnapshotMeta {
            name: "s1".into(),
            size_bytes: 4096,
            created_at_unix: 1_700_000_000,
        };
        write(dir.path(), &meta).unwrap();
        assert_eq!(read(dir.path()).unwrap(), meta);
        // Written once: a second record is refused, never silently replaced.
        assert!(write(dir.path(), &meta).is_err());
    }

    #[test]
    fn a_legacy_json_record_wins_and_a_missing_one_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).is_err());
        std::fs::write(dir.path().join(DATA_FILE), vec![0; 8192]).unwrap();
        // A data file that lost its record (copied without xattrs): rebuilt.
        let rebuilt = read(dir.path()).expect("rebuilt record");
        assert_eq!(rebuilt.size_bytes, 8192);
        assert_eq!(
            rebuilt.name,
            dir.path().file_name().unwrap().to_string_lossy()
        );
        std::fs::write(
            dir.path().join(META_FILE),
            br#"{"name":"old","size_bytes":8192,"created_at_unix":5}"#,
        )
        .unwrap();
        assert_eq!(read(dir.path()).unwrap().name, "old");
        std::fs::write(dir.path().join(META_FILE), b"{").unwrap();
        assert!(matches!(
            read(dir.path()),
            Err(StoreError::CorruptMetadata { .. })
        ));
    }
}
