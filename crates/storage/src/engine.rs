//! [`IoEngine`]: positional reads, writes and data syncs on a file, through
//! io_uring where the kernel allows it and through a blocking thread pool
//! otherwise (containers often forbid io_uring via seccomp or
//! `kernel.io_uring_disabled`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::uring::UringEngine;

/// Which engine the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring if a probe ring works, else blocking.
    #[default]
    Auto,
    /// io_uring or fail at start-up.
    Uring,
    /// Positional I/O on tokio's blocking pool.
    Blocking,
}

/// The engine volumes do their backing I/O with. Cheap to clone.
#[derive(Debug, Clone)]
pub enum IoEngine {
    /// io_uring, submitted and reaped inline, completions also polled by tokio.
    Uring(Arc<UringEngine>),
    /// `pread`/`pwrite`/`fdatasync` on tokio's blocking pool.
    Blocking,
}

impl IoEngine {
    /// Builds the engine. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// Only with [`EngineChoice::Uring`] when io_uring is unavailable.
    pub fn new(choice: EngineChoice) -> io::Result<Self> {
        match choice {
            EngineChoice::Blocking => Ok(Self::Blocking),
            EngineChoice::Uring => Ok(Self::Uring(Arc::new(UringEngine::new()?))),
            EngineChoice::Auto => match UringEngine::new() {
                Ok(engine) => Ok(Self::Uring(Arc::new(engine))),
                Err(error) => {
                    tracing::warn!(%error, "io_uring unavailable, falling back to blocking positional I/O");
                    Ok(Self::Blocking)
                }
            },
        }
    }

    /// `"io_uring"` or `"blocking"`, for logs and capabilities.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Uring(_) => "io_uring",
            Self::Blocking => "blocking",
        }
    }

    /// Reads `len` bytes at `offset`; bytes past end of file read as zeros.
    ///
    /// # Errors
    /// The backing store's I/O error.
    pub async fn read_at(&self, file: &Arc<File>, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.read_into(file, offset, Vec::new(), len).await
    }

    /// As [`Self::read_at`], into `buf`: emptied first, its allocation
    /// reused when it has room for `len` (a caller recycling bulk read
    /// buffers avoids a fresh, page-faulting allocation per read).
    ///
    /// # Errors
    /// The backing store's I/O error.
    pub async fn read_into(
        &self,
        file: &Arc<File>,
        offset: u64,
        mut buf: Vec<u8>,
        len: usize,
    ) -> io::Result<Vec<u8>> {
        match self {
            Self::Uring(ring) => ring.read(file.clone(), offset, buf, len).await,
            Self::Blocking => {
                let file = file.clone();
                blocking(move || {
                    buf.clear();
                    buf.resize(len, 0);
                    let mut done = 0;
                    while done < len {
                        match file.read_at(&mut buf[done..], offset + done as u64) {
                            Ok(0) => break, // past EOF: the rest stays zero
                            Ok(n) => done += n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(buf)
                })
                .await
            }
        }
    }

    /// Writes all of `buf` at `offset`; with `durable`, the data is on
    /// stable storage when this returns (FUA). Returns the buffer for reuse.
    ///
    /// # Errors
    /// The backing store's I/O error.
    pub async fn write_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        buf: Vec<u8>,
        durable: bool,
    ) -> io::Result<Vec<u8>> {
        match self {
            Self::Uring(ring) => ring.write(file.clone(), offset, buf, durable).await,
            Self::Blocking => {
                let file = file.clone();
                blocking(move || {
                    file.write_all_at(&buf, offset)?;
                    if durable {
                        file.sync_data()?;
                    }
                    Ok(buf)
                })
                .await
            }
        }
    }

    /// `fdatasync`: every completed write is on stable storage.
    ///
    /// # Errors
    /// The backing store's I/O error.
    pub async fn sync(&self, file: &Arc<File>) -> io::Result<()> {
        match self {
            Self::Uring(ring) => ring.sync(file.clone()).await,
            Self::Blocking => {
                let file = file.clone();
                blocking(move || file.sync_data()).await
            }
        }
    }
}

/// Runs blocking I/O on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|join| {
        Err(io::Error::other(format!(
            "blocking I/O task failed: {join}"
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn round_trip(engine: IoEngine) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .expect("open");
        file.set_len(1 << 20).expect("size");
        let file = Arc::new(file);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        engine
            .write_at(&file, 4096, data.clone(), true)
            .await
            .expect("write");
        engine.sync(&file).await.expect("sync");
        assert_eq!(
            engine.read_at(&file, 4096, data.len()).await.expect("read"),
            data
        );
        // Reading across EOF yields zeros for the part past the end.
        let tail = engine
            .read_at(&file, (1 << 20) - 10, 20)
            .await
            .expect("read tail");
        assert_eq!(tail, vec![0u8; 20]);
        // Data up to EOF, zeros after it (reads fill uninitialised buffers:
        // nothing but the kernel's bytes and the zeroed tail may show).
        engine
            .write_at(&file, (1 << 20) - 8, vec![0xa5; 8], true)
            .await
            .expect("write the last bytes");
        for _ in 0..3 {
            let tail = engine
                .read_at(&file, (1 << 20) - 8, 4096 + 8)
                .await
                .expect("read across EOF");
            assert_eq!(tail.len(), 4096 + 8);
            assert_eq!(tail[..8], [0xa5; 8]);
            assert!(tail[8..].iter().all(|&b| b == 0), "past EOF not zero");
        }
        // A recycled buffer: its allocation is reused, none of its old
        // bytes show (shorter and longer reads, and across EOF).
        let mut buf = vec![0xee; 300_000];
        buf.reserve_exact(1 << 20);
        let at = buf.as_ptr();
        for len in [1000, 200_000, 150_000] {
            let got = engine
                .read_into(&file, 4096, buf, len)
                .await
                .expect("read into");
            assert_eq!(got.as_ptr(), at, "allocation reused for {len}");
            assert_eq!(
                got[..],
                data[..len],
                "{len} bytes read into a reused buffer"
            );
            buf = got;
        }
        let got = engine
            .read_into(&file, (1 << 20) - 8, buf, 4096 + 8)
            .await
            .expect("read into across EOF");
        assert_eq!(got[..8], [0xa5; 8]);
        assert!(got[8..].iter().all(|&b| b == 0), "old bytes past EOF");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_round_trips_data() {
        round_trip(IoEngine::new(EngineChoice::Uring).expect("io_uring on this test machine"))
            .await;
    }

    #[tokio::test]
    async fn blocking_round_trips_data() {
        round_trip(IoEngine::new(EngineChoice::Blocking).expect("blocking")).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_handles_many_concurrent_ops() {
        let engine = IoEngine::new(EngineChoice::Uring).expect("io_uring");
        let dir = tempfile::tempdir().expect("tempdir");
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("f"))
                .expect("open"),
        );
        let mut tasks = Vec::new();
        for i in 0..2000u64 {
            let (engine, file) = (engine.clone(), file.clone());
            tasks.push(tokio::spawn(async move {
                let block = vec![(i % 256) as u8; 4096];
                engine
                    .write_at(&file, i * 4096, block.clone(), false)
                    .await
                    .expect("write");
                assert_eq!(
                    engine.read_at(&file, i * 4096, 4096).await.expect("read"),
                    block
                );
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    }
}
