//! Crash-safe file-system helpers: atomic JSON replace, directory fsync,
//! sparse copies that move only allocated bytes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Result, StoreError, io};

/// fsyncs a directory so renames and creations inside it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))
}

/// Replaces `path` with `body` atomically: temp file, fsync, rename, fsync
/// of the directory. A crash leaves the old or the new file, whole.
///
/// Two writers of the same file share its one temp name, so they are
/// serialised (a lock stripe per path hash): without it one writer's rename
/// could take the other's temp file away mid-write ("rename: No such file").
pub(crate) fn write_atomic(path: &Path, body: &[u8]) -> Result<()> {
    let _same_file = write_lock(path);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all(body).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))?;
    sync_dir(path.parent().expect("file lives in a directory"))
}

/// Lock stripes for [`write_atomic`]: different files rarely share one, and
/// a shared stripe only costs waiting for the other write's fsync.
const WRITE_LOCK_STRIPES: usize = 64;

fn write_lock(path: &Path) -> std::sync::MutexGuard<'static, ()> {
    use std::hash::{Hash, Hasher};
    static STRIPES: [std::sync::Mutex<()>; WRITE_LOCK_STRIPES] =
        [const { std::sync::Mutex::new(()) }; WRITE_LOCK_STRIPES];
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    let stripe = &STRIPES[(h.finish() as usize) % WRITE_LOCK_STRIPES];
    // A panic while holding it cannot leave the file torn: recover the guard.
    stripe
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes `value` as pretty JSON to `path` atomically (see `write_atomic`).
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(
        path,
        &serde_json::to_vec_pretty(value).expect("metadata serializes"),
    )
}

/// Reads a JSON metadata file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let body = std::fs::read(path).map_err(io("read metadata", path))?;
    serde_json::from_slice(&body).map_err(|e| StoreError::CorruptMetadata {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Copies `src` into the new file `dst` of `size` bytes, moving only the
/// allocated ranges (`SEEK_DATA`/`SEEK_HOLE`) with `copy_file_range`, so
/// the copy costs the allocated bytes, not the volume size, and holes stay
/// holes. Syncs `dst`. Blocking.
pub(crate) fn copy_sparse(src: &Path, dst: &Path, size: u64) -> Result<u64> {
    let from = File::open(src).map_err(io("open copy source", src))?;
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io("create copy target", dst))?;
    to.set_len(size).map_err(io("size copy target", dst))?;
    let src_len = source_len(&from)
        .map_err(io("stat copy source", src))?
        .min(size);
    let (fi, fo) = (from.as_raw_fd(), to.as_raw_fd());
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < src_len {
        // SAFETY: lseek on descriptors we own.
        let data = unsafe { libc::lseek(fi, pos as i64, libc::SEEK_DATA) };
        let (data, end) = if data >= 0 {
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fi, data, libc::SEEK_HOLE) };
            (
                data,
                if hole < 0 {
                    src_len
                } else {
                    (hole as u64).min(src_len)
                },
            )
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            break; // only holes remain
        } else {
            // The source cannot tell holes (a block device): copy all of it.
            (pos as i64, src_len)
        };
        let mut off_in = data;
        let mut off_out = data;
        while (off_in as u64) < end {
            let want = (end - off_in as u64).min(1 << 30) as usize;
            // SAFETY: offsets are valid locals; descriptors are ours.
            let n = unsafe { libc::copy_file_range(fi, &mut off_in, fo, &mut off_out, want, 0) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EINVAL | libc::EXDEV | libc::EOPNOTSUPP)
                ) {
                    // Not a regular-file pair (e.g. a block device source):
                    // copy through user space, leaving zero chunks as holes.
                    copied += copy_range(&from, &to, off_in as u64, end, true)
                        .map_err(io("copy data", dst))?;
                    break;
                }
                return Err(StoreError::Io {
                    op: "copy data",
                    path: dst.to_owned(),
                    source: err,
                });
            }
            if n == 0 {
                break;
            }
            copied += n as u64;
        }
        pos = end;
    }
    to.sync_all().map_err(io("sync copy target", dst))?;
    Ok(copied)
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Length of a regular file or block device.
fn source_len(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        return Ok(meta.len());
    }
    // SAFETY: lseek on a descriptor we own.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(end as u64)
    }
}

/// Copies `[start, end)` from `from` to the same offsets in `to` with reads
/// and writes, 1 MiB at a time. With `skip_zero_chunks`, all-zero 64 KiB
/// chunks are not written, so a fresh target stays sparse; without it every
/// byte is written (an earlier copy's stale data must be overwritten).
/// Returns the bytes written.
fn copy_range(
    from: &File,
    to: &File,
    start: u64,
    end: u64,
    skip_zero_chunks: bool,
) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 1 << 20;
    const SPARSE_CHUNK: usize = 64 * 1024;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    let mut pos = start;
    while pos < end {
        let n = ((end - pos) as usize).min(CHUNK);
        from.read_exact_at(&mut buf[..n], pos)?;
        for (i, piece) in buf[..n].chunks(SPARSE_CHUNK).enumerate() {
            if !skip_zero_chunks || piece.iter().any(|b| *b != 0) {
                to.write_all_at(piece, pos + (i * SPARSE_CHUNK) as u64)?;
                written += piece.len() as u64;
            }
        }
        pos += n as u64;
    }
    Ok(written)
}

/// Copies the byte `extents` of `src` over the existing file `dst`, exactly
/// (zeros included: a block zeroed since an earlier pass must be zero in the
/// copy), then syncs `dst`. Blocking.
pub(crate) fn copy_extents(
    src: &Path,
    dst: &Path,
    extents: &[ember_common::Extent],
) -> Result<u64> {
    let from = File::open(src).map_err(io("open copy source", src))?;
    let to = OpenOptions::new()
        .write(true)
        .open(dst)
        .map_err(io("open copy target", dst))?;
    let mut copied = 0;
    for e in extents {
        copied +=
            copy_range(&from, &to, e.offset, e.end(), false).map_err(io("copy extent", dst))?;
    }
    to.sync_all().map_err(io("sync copy target", dst))?;
    Ok(copied)
}
