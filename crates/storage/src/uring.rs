//! io_uring engine shared by all volumes of an agent.
//!
//! Submission happens inline on the calling task: push one SQE, `submit()`
//! (a non-blocking `io_uring_enter`), then reap whatever is already complete.
//! Buffered I/O that hits the page cache often completes during the submit
//! itself, so the common case costs one syscall and no thread hop.
//! Completions that arrive later signal an eventfd registered with the ring;
//! a reaper task polls it through tokio's reactor and completes the waiters.
//!
//! ```text
//!  caller task ──lock──▶ [ring: push SQE, submit, reap] ──oneshot──▶ caller
//!  kernel CQE ──eventfd──▶ reaper task ──lock──▶ [reap] ──oneshot──▶ callers
//! ```
//!
//! Soundness: a pending operation's buffer and file live in the slab until
//! its CQE is reaped, even if the caller's future was dropped meanwhile, and
//! [`Drop`] waits for every in-flight operation before the ring is unmapped.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use io_uring::{IoUring, opcode, squeue, types};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

/// Submission queue depth. In-flight operations are bounded by the callers
/// (NBD in-flight limits); beyond this depth submissions wait for a reap.
const RING_ENTRIES: u32 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Read,
    Write { durable: bool },
    Sync,
}

#[derive(Debug)]
struct Pending {
    kind: OpKind,
    file: Arc<File>,
    offset: u64,
    /// Writes: the data. Reads: the destination, its length the bytes
    /// the kernel has filled so far (`done`), its capacity `want`: a read
    /// buffer is never zeroed first, only its tail past EOF.
    buf: Vec<u8>,
    /// Bytes to transfer in all.
    want: usize,
    done: usize,
    reply: Option<oneshot::Sender<io::Result<Vec<u8>>>>,
}

impl Pending {
    fn sqe(&mut self, id: u64) -> squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        let remaining = (self.want - self.done) as u32;
        let offset = self.offset + self.done as u64;
        let entry = match self.kind {
            OpKind::Read => {
                // SAFETY-relevant: the buffer lives in the slab until reaped;
                // the kernel writes into its spare capacity, `done..want`.
                let ptr = self.buf.spare_capacity_mut().as_mut_ptr().cast::<u8>();
                opcode::Read::new(fd, ptr, remaining).offset(offset).build()
            }
            OpKind::Write { durable } => {
                let ptr = self.buf[self.done..].as_ptr();
                let flags = if durable { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, ptr, remaining)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
            }
            OpKind::Sync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        entry.user_data(id)
    }

    /// Applies a completion; returns true when the operation is finished.
    fn complete(&mut self, res: i32) -> bool {
        if res < 0 {
            let err = io::Error::from_raw_os_error(-res);
            if matches!(-res, libc::EINTR | libc::EAGAIN) {
                return false; // resubmit as is
            }
            self.finish(Err(err));
            return true;
        }
        match self.kind {
            OpKind::Sync => {
                self.finish(Ok(()));
                true
            }
            OpKind::Read if res == 0 => {
                // Past EOF: the rest reads as zeros.
                self.buf.resize(self.want, 0);
                self.finish(Ok(()));
                true
            }
            OpKind::Write { .. } if res == 0 => {
                self.finish(Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write made no progress",
                )));
                true
            }
            _ => {
                self.done += res as usize;
                if self.kind == OpKind::Read {
                    // SAFETY: the kernel filled `res` more bytes of the
                    // spare capacity, so `..done` is initialised, and a
                    // read never returns more than it was asked for
                    // (`done <= want <= capacity`).
                    unsafe { self.buf.set_len(self.done) };
                }
                if self.done >= self.want {
                    self.finish(Ok(()));
                    true
                } else {
                    false
                }
            }
        }
    }

    fn finish(&mut self, result: io::Result<()>) {
        if let Some(reply) = self.reply.take() {
            // The caller may be gone (client disconnected); nothing to do then.
            let _ = reply.send(result.map(|()| std::mem::take(&mut self.buf)));
        }
    }
}

#[derive(Debug, Default)]
struct Slab {
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    in_flight: usize,
}

impl Slab {
    fn insert(&mut self, p: Pending) -> usize {
        self.in_flight += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(p);
                i
            }
            None => {
                self.slots.push(Some(p));
                self.slots.len() - 1
            }
        }
    }
}

struct Ring {
    ring: IoUring,
    slab: Slab,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.slab.in_flight)
            .finish()
    }
}

impl Ring {
    fn push(&mut self, id: usize) -> io::Result<()> {
        let sqe = self.slab.slots[id]
            .as_mut()
            .expect("pushed op is in the slab")
            .sqe(id as u64);
        loop {
            // SAFETY: the SQE points into a buffer and fd owned by the slab
            // entry, which stays alive until the CQE is reaped.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            self.submit()?;
            self.reap();
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Completion queue backed up: drain it and retry.
                    self.reap();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Completes every operation whose CQE is available; resubmits partial ones.
    fn reap(&mut self) {
        let mut again = Vec::new();
        for cqe in self.ring.completion() {
            let id = cqe.user_data() as usize;
            let slot = &mut self.slab.slots[id];
            let op = slot.as_mut().expect("completion for a live op");
            if op.complete(cqe.result()) {
                *slot = None;
                self.slab.free.push(id);
                self.slab.in_flight -= 1;
            } else {
                again.push(id);
            }
        }
        if again.is_empty() {
            return;
        }
        for &id in &again {
            if let Err(e) = self.push(id)
                && let Some(mut op) = self.slab.slots[id].take()
            {
                op.finish(Err(e));
                self.slab.free.push(id);
                self.slab.in_flight -= 1;
            }
        }
        // Resubmitted remainders must reach the kernel now: nobody else
        // may submit for a while.
        if let Err(e) = self.ring.submit() {
            tracing::warn!(error = %e, "io_uring resubmit failed; will retry on next submit");
        }
    }
}

/// The io_uring engine. See the module docs for the task structure.
#[derive(Debug)]
pub struct UringEngine {
    ring: Arc<Mutex<Ring>>,
    reaper: tokio::task::JoinHandle<()>,
}

impl UringEngine {
    /// Creates the ring, probes it with a NOP, registers the completion
    /// eventfd and spawns the reaper. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// When io_uring is unavailable or forbidden.
    pub(crate) fn new() -> io::Result<Self> {
        let mut ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: a NOP references no memory.
        unsafe {
            ring.submission()
                .push(&opcode::Nop::new().build().user_data(u64::MAX))
                .map_err(|_| io::Error::other("probe submission queue full"))?;
        }
        ring.submit_and_wait(1)?;
        ring.completion().for_each(drop);
        // SAFETY: eventfd returns a fresh descriptor we own, or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a valid descriptor owned by nobody else.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let ring = Arc::new(Mutex::new(Ring {
            ring,
            slab: Slab::default(),
        }));
        // SAFETY: the eventfd is owned by the AsyncFd for its whole life and
        // is closed only when the AsyncFd (held by the reaper) is dropped.
        let efd = unsafe { AsyncFd::register(efd) }.map_err(|e| io::Error::other(e.to_string()))?;
        let reaper = tokio::spawn(reap_forever(Arc::downgrade(&ring), efd));
        Ok(Self { ring, reaper })
    }

    async fn submit(
        &self,
        kind: OpKind,
        file: Arc<File>,
        offset: u64,
        buf: Vec<u8>,
        want: usize,
    ) -> io::Result<Vec<u8>> {
        debug_assert!(want <= buf.capacity());
        let (tx, rx) = oneshot::channel();
        {
            let mut ring = self.ring.lock().expect("ring lock poisoned by a panic");
            let id = ring.slab.insert(Pending {
                kind,
                file,
                offset,
                buf,
                want,
                done: 0,
                reply: Some(tx),
            });
            if let Err(e) = ring.push(id).and_then(|()| ring.submit()) {
                // Nothing was submitted for this op if push failed; if submit
                // failed it is still queued and will complete on a later submit.
                tracing::warn!(error = %e, "io_uring submit failed");
            }
            ring.reap();
        }
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("io_uring operation dropped")))
    }

    /// Reads `len` bytes into `buf` (emptied first; its allocation reused
    /// when it has room). Uninitialised: the kernel fills the spare
    /// capacity (see `Pending::buf`).
    pub(crate) async fn read(
        &self,
        file: Arc<File>,
        offset: u64,
        mut buf: Vec<u8>,
        len: usize,
    ) -> io::Result<Vec<u8>> {
        buf.clear();
        buf.reserve_exact(len);
        self.submit(OpKind::Read, file, offset, buf, len).await
    }

    pub(crate) async fn write(
        &self,
        file: Arc<File>,
        offset: u64,
        buf: Vec<u8>,
        durable: bool,
    ) -> io::Result<Vec<u8>> {
        if buf.is_empty() {
            return Ok(buf);
        }
        let len = buf.len();
        self.submit(OpKind::Write { durable }, file, offset, buf, len)
            .await
    }

    pub(crate) async fn sync(&self, file: Arc<File>) -> io::Result<()> {
        self.submit(OpKind::Sync, file, 0, Vec::new(), 0)
            .await
            .map(drop)
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.reaper.abort();
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        // The kernel may still write into slab buffers: wait for every op.
        while ring.slab.in_flight > 0 {
            if ring.ring.submit_and_wait(1).is_err() {
                break;
            }
            ring.reap();
        }
    }
}

async fn reap_forever(ring: std::sync::Weak<Mutex<Ring>>, efd: AsyncFd<OwnedFd>) {
    loop {
        let Ok(mut ready) = efd.readable().await else {
            return;
        };
        let mut counter = [0u8; 8];
        // SAFETY: reading 8 bytes into a local buffer from our eventfd.
        let n = unsafe { libc::read(efd.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
        if n < 0 {
            ready.clear_ready();
        }
        let Some(ring) = ring.upgrade() else { return };
        ring.lock().expect("ring lock poisoned by a panic").reap();
    }
}
