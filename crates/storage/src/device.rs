//! [`FileDevice`]: a volume's bytes in a sparse file (or a raw block device).

use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::{IoEngine, blocking};
use crate::error::{Result, StorageError};

/// One run of [`FileDevice::allocation`]: `length` bytes that are a hole or data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationRun {
    /// Bytes in the run.
    pub length: u64,
    /// True when the run is unallocated (reads as zeros).
    pub hole: bool,
}

/// A volume's backing file. All I/O goes through the agent's [`IoEngine`].
#[derive(Debug, Clone)]
pub struct FileDevice {
    file: Arc<File>,
    path: PathBuf,
    engine: IoEngine,
}

impl FileDevice {
    /// Creates a sparse file of `size_bytes` (fails if it exists).
    ///
    /// # Errors
    /// I/O errors, including the file already existing.
    pub fn create(path: &Path, size_bytes: u64, engine: IoEngine) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| StorageError::from_io("create backing file", e))?;
        file.set_len(size_bytes)
            .map_err(|e| StorageError::from_io("size backing file", e))?;
        Ok(Self::wrap(file, path, engine))
    }

    /// Opens an existing backing file or block device.
    ///
    /// # Errors
    /// I/O errors opening it.
    pub fn open(path: &Path, read_only: bool, engine: IoEngine) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| StorageError::from_io("open backing file", e))?;
        Ok(Self::wrap(file, path, engine))
    }

    fn wrap(file: File, path: &Path, engine: IoEngine) -> Self {
        Self {
            file: Arc::new(file),
            path: path.to_owned(),
            engine,
        }
    }

    /// Path of the backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `len` bytes at `offset` (no range check: the caller's job).
    ///
    /// # Errors
    /// [`StorageError::Io`] from the backing store.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.engine
            .read_at(&self.file, offset, len)
            .await
            .map_err(|e| StorageError::from_io("read", e))
    }

    /// Reads `len` bytes at `offset` into `buf` (emptied first; its
    /// allocation reused when it has room): for callers that recycle bulk
    /// buffers (the replication initial sync).
    ///
    /// # Errors
    /// [`StorageError::Io`] from the backing store.
    pub async fn read_into(&self, offset: u64, buf: Vec<u8>, len: usize) -> Result<Vec<u8>> {
        self.engine
            .read_into(&self.file, offset, buf, len)
            .await
            .map_err(|e| StorageError::from_io("read", e))
    }

    /// Writes `buf` at `offset`; `durable` makes it FUA.
    ///
    /// A small write that is not FUA is done right here with `pwrite`
    /// ([`writes_inline`]): it only copies into the page cache, a few
    /// microseconds, while io_uring hands every buffered write on ext4 to
    /// a worker thread and back (ext4 cannot write buffered without
    /// blocking: `RWF_NOWAIT` is `EOPNOTSUPP`), two thread switches that
    /// cost a 4 KiB QD1 write 44 % of its latency and 60 % of its CPU
    /// (benches/RESULTS.md, "what every small write costs on ext4").
    ///
    /// # Errors
    /// [`StorageError::NoSpace`] when the file system is full, else `Io`.
    pub async fn write(&self, offset: u64, buf: Vec<u8>, durable: bool) -> Result<()> {
        if writes_inline(buf.len(), durable) {
            return std::os::unix::fs::FileExt::write_all_at(self.file.as_ref(), &buf, offset)
                .map_err(|e| StorageError::from_io("write", e));
        }
        self.engine
            .write_at(&self.file, offset, buf, durable)
            .await
            .map(drop)
            .map_err(|e| StorageError::from_io("write", e))
    }

    /// Writes each `(offset, data)` in order, all on one blocking thread:
    /// for a caller applying a batch of many small writes, one thread hop
    /// instead of one per write (the replication secondary's batches).
    ///
    /// # Errors
    /// [`StorageError::NoSpace`] when the file system is full, else `Io`;
    /// writes before the failing one are done.
    pub async fn write_batch<B>(&self, writes: Vec<(u64, B)>) -> Result<()>
    where
        B: AsRef<[u8]> + Send + 'static,
    {
        let file = self.file.clone();
        blocking(move || {
            for (offset, data) in &writes {
                std::os::unix::fs::FileExt::write_all_at(file.as_ref(), data.as_ref(), *offset)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| StorageError::from_io("write", e))
    }

    /// Writes `buf` at `offset` straight from a buffer the caller shares
    /// (a received `bytes::Bytes`, say), on the blocking pool: no copy into
    /// a `Vec` first. `durable` makes it FUA (the data is synced before
    /// this returns).
    ///
    /// # Errors
    /// [`StorageError::NoSpace`] when the file system is full, else `Io`.
    pub async fn write_from<B>(&self, offset: u64, buf: B, durable: bool) -> Result<()>
    where
        B: AsRef<[u8]> + Send + 'static,
    {
        let file = self.file.clone();
        blocking(move || {
            std::os::unix::fs::FileExt::write_all_at(file.as_ref(), buf.as_ref(), offset)?;
            if durable {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| StorageError::from_io("write", e))
    }

    /// Writes `pieces` back to back from `offset` straight from the
    /// caller's buffers (received `bytes::Bytes`, say), with one vectored
    /// write per [`IOV_MAX`] pieces on the blocking pool, then starts their
    /// writeback like [`Self::start_writeback`]. One hop to the pool and one
    /// writeback call for the whole run instead of one per piece: on a VM
    /// each writeback call is a doorbell to the virtual disk.
    ///
    /// # Errors
    /// [`StorageError::NoSpace`] when the file system is full, else `Io`.
    pub async fn write_run_from<B>(&self, offset: u64, pieces: Vec<B>) -> Result<()>
    where
        B: AsRef<[u8]> + Send + 'static,
    {
        let file = self.file.clone();
        blocking(move || {
            let mut at = offset;
            for group in pieces.chunks(IOV_MAX) {
                let mut slices: Vec<IoSlice<'_>> =
                    group.iter().map(|p| IoSlice::new(p.as_ref())).collect();
                let mut rest = &mut slices[..];
                while !rest.is_empty() {
                    match nix::sys::uio::pwritev(file.as_ref(), rest, at as libc::off_t) {
                        Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                        Ok(n) => {
                            at += n as u64;
                            IoSlice::advance_slices(&mut rest, n);
                        }
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            crate::writeback::start_writeback(&*file, offset, at - offset);
            Ok(())
        })
        .await
        .map_err(|e| StorageError::from_io("write", e))
    }

    /// Makes every completed write durable.
    ///
    /// # Errors
    /// [`StorageError::Io`] from the backing store.
    pub async fn flush(&self) -> Result<()> {
        self.engine
            .sync(&self.file)
            .await
            .map_err(|e| StorageError::from_io("flush", e))
    }

    /// Starts writeback of `[offset, offset+len)` without waiting for it
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so a later flush finds
    /// the bulk already on its way to disk. Advisory: errors are ignored
    /// (the flush that matters reports them).
    pub fn start_writeback(&self, offset: u64, len: u64) {
        crate::writeback::start_writeback(&*self.file, offset, len);
    }

    /// Zeroes `[offset, offset+len)`; deallocates it unless `keep_allocated`.
    /// Both are metadata operations on ext4/xfs (fast).
    ///
    /// # Errors
    /// [`StorageError::Unsupported`] when the file system cannot do it.
    pub async fn zero(&self, offset: u64, len: u64, keep_allocated: bool) -> Result<()> {
        let file = self.file.clone();
        let mode = if keep_allocated {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        blocking(move || {
            // SAFETY: plain syscall on a descriptor we own.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
        .await
        .map_err(|e| {
            StorageError::from_io(
                if keep_allocated {
                    "zero range"
                } else {
                    "punch hole"
                },
                e,
            )
        })
    }

    /// Hole/data runs covering `[offset, offset+len)`, from `SEEK_DATA` /
    /// `SEEK_HOLE`. Where the file system cannot tell, everything is data.
    /// Cheap metadata calls, done inline.
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<AllocationRun> {
        let end = offset + len;
        let fd = self.file.as_raw_fd();
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end {
            // No data after pos: all hole. A file system that cannot tell
            // answers `pos` (data), and its `SEEK_HOLE` fails too: all data.
            let next_data = self.data_at_or_after(pos).map_or(end, |d| d.min(end));
            if next_data > pos {
                runs.push(AllocationRun {
                    length: next_data - pos,
                    hole: true,
                });
                pos = next_data;
                continue;
            }
            // SAFETY: lseek on a descriptor we own.
            let hole = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_HOLE) };
            let next_hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            runs.push(AllocationRun {
                length: next_hole.max(pos + 1) - pos,
                hole: false,
            });
            pos = next_hole.max(pos + 1);
        }
        runs
    }

    /// The first byte at or after `pos` that may hold data (`SEEK_DATA`),
    /// `None` when only hole follows. One call whose cost does not depend
    /// on how much data follows `pos`: unlike `SEEK_HOLE`, which on tmpfs
    /// (and in XFS's unwritten extents) walks the page cache up to the next
    /// hole, so asking it once per small piece of a large written range is
    /// quadratic. Where the file system cannot tell, `pos` itself.
    pub fn data_at_or_after(&self, pos: u64) -> Option<u64> {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(self.file.as_raw_fd(), pos as i64, libc::SEEK_DATA) };
        if data >= 0 {
            return Some(data as u64);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => None,
            _ => Some(pos),
        }
    }

    /// Bytes allocated on disk.
    pub fn allocated_bytes(&self) -> u64 {
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// Resizes the backing file (grow only is the caller's policy).
    ///
    /// # Errors
    /// I/O errors.
    pub fn set_len(&self, size_bytes: u64) -> Result<()> {
        self.file
            .set_len(size_bytes)
            .map_err(|e| StorageError::from_io("resize backing file", e))
    }

    /// Size of the backing file or block device in bytes.
    ///
    /// # Errors
    /// I/O errors.
    pub fn size_bytes(&self) -> Result<u64> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| StorageError::from_io("stat backing file", e))?;
        if meta.file_type().is_file() {
            return Ok(meta.len());
        }
        // Block device: its size is where SEEK_END lands.
        // SAFETY: lseek on a descriptor we own.
        let end = unsafe { libc::lseek(self.file.as_raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(StorageError::from_io(
                "size block device",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(end as u64)
    }
}

/// Slices per vectored write (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Writes at most this large are done inline (see [`FileDevice::write`]).
const INLINE_WRITE_MAX: usize = 64 << 10;

/// Whether a write of `len` bytes is done inline on the calling thread:
/// small, not FUA (a FUA write waits for the disk), and on a multi-thread
/// runtime, where a write that does block (dirty-page throttling, reclaim)
/// holds one worker while the others go on serving.
fn writes_inline(len: usize, durable: bool) -> bool {
    !durable
        && len <= INLINE_WRITE_MAX
        && tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse_device(path: &Path, size: u64) -> FileDevice {
        FileDevice::create(
            path,
            size,
            IoEngine::new(Default::default()).expect("engine"),
        )
        .expect("create")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_writes_run_inline_on_a_multi_thread_runtime_and_land() {
        assert!(writes_inline(4096, false));
        assert!(writes_inline(INLINE_WRITE_MAX, false));
        assert!(!writes_inline(INLINE_WRITE_MAX + 1, false));
        assert!(!writes_inline(4096, true), "FUA goes to the engine");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.img");
        let dev = sparse_device(&path, 1 << 20);
        dev.write(4096, vec![0x5a; 4096], false)
            .await
            .expect("inline write");
        dev.write(65536, vec![0x33; 128 << 10], false)
            .await
            .expect("engine write");
        dev.write(8192, vec![0x77; 512], true)
            .await
            .expect("fua write");
        let image = std::fs::read(&path).expect("read back");
        assert!(image[4096..8192].iter().all(|&b| b == 0x5a));
        assert!(image[8192..8704].iter().all(|&b| b == 0x77));
        assert!(image[65536..65536 + (128 << 10)].iter().all(|&b| b == 0x33));
        assert!(image[..4096].iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn data_at_or_after_skips_holes_and_ends_with_none() {
        // A sparse file on the test's temp dir (ext4, XFS or tmpfs: each
        // reports holes at page granularity or finer).
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = sparse_device(&dir.path().join("v.img"), 4 << 20);
        assert_eq!(
            dev.data_at_or_after(0),
            None,
            "an empty sparse file is all hole"
        );
        dev.write(1 << 20, vec![0x5a; 64 << 10], false)
            .await
            .expect("write");
        assert_eq!(dev.data_at_or_after(0), Some(1 << 20));
        assert_eq!(
            dev.data_at_or_after((1 << 20) + 4096),
            Some((1 << 20) + 4096)
        );
        assert_eq!(dev.data_at_or_after(2 << 20), None);
        assert_eq!(dev.data_at_or_after(8 << 20), None, "past the end");
    }

    #[tokio::test]
    async fn a_current_thread_runtime_keeps_the_engine() {
        assert!(!writes_inline(4096, false));
    }
}
