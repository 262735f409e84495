//! A small pool of reusable bulk buffers for the replication data path
//! (the initial sync's 4 MiB segment reads), so a burst reuses a few
//! buffers instead of mapping a fresh one per segment.
//!
//! Why: [`crate::budget`] pins glibc's mmap threshold (2 MiB) so the
//! agent's RSS settles after a burst; every larger buffer is then its own
//! `mmap`, faulted in 4 KiB at a time (zeroed by the kernel) and unmapped
//! when freed. With the threshold at 128 KiB, such churn was the largest
//! single cost of the sender: 41 % of its cycles (benches/RESULTS.md,
//! "Replication CPU per byte (issue 16)"). A pooled buffer's pages stay
//! faulted in, and pooling keeps the threshold below the 4 MiB reads.
//!
//! How a buffer travels: [`BulkPool::take`] hands out a `Vec` (a pooled
//! one when it fits), the caller reads into it, and [`BulkPool::lend`]
//! turns it into `Bytes` whose slices become the stream's frames (no copy:
//! prost copies each slice into the gRPC encode buffer). The pool keeps
//! one handle of each lent buffer; once every frame is encoded and
//! dropped, that handle is the last one and the buffer comes back
//! (checked on every take and every [`BulkPool::tick`]).
//!
//! What bounds the memory, besides the buffers in use:
//! - idle buffers are at most [`IDLE_MAX`] and at most an eighth of the
//!   replication budget ([`idle_cap`]), and they are *held* in the budget
//!   (an account of their own): a refusal, or the budget asking holders to
//!   shed, drops them instead;
//! - the pool forgets lent buffers past [`LENT_MAX`] (they are then freed
//!   normally by their last frame);
//! - when nothing was taken for one [`BulkPool::tick`] (replication went
//!   quiet: the trimmer's period, 2 s), the pool empties, so an idle agent
//!   holds no pooled memory (tests/tests/memory_budget.rs settles).
//!
//! Not for small buffers: below the mmap threshold glibc's own free lists
//! already reuse memory.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;

use crate::budget::{Account, memory_budget};

/// Size of a pooled buffer: the initial sync's segment (its largest read).
pub(crate) const BULK_BYTES: usize = 4 << 20;
/// Most idle buffers kept: enough for a few volumes' initial syncs at once
/// (each circulates ~3: two reads ahead, one being sent).
const IDLE_MAX: usize = 8;
/// Most lent buffers remembered at once.
const LENT_MAX: usize = 64;

/// How many idle buffers a budget of `budget_bytes` lets the pool keep:
/// [`IDLE_MAX`], but never more than an eighth of the budget (the reserve
/// the budget keeps for holders within their share).
pub(crate) fn idle_cap(budget_bytes: u64) -> usize {
    let eighth = (budget_bytes / 8 / BULK_BYTES as u64) as usize;
    eighth.min(IDLE_MAX)
}

/// Whether a buffer of `capacity` bytes is of the pooled size class (a
/// larger one was a one-off allocation: not kept).
fn is_bulk(capacity: usize) -> bool {
    (BULK_BYTES..2 * BULK_BYTES).contains(&capacity)
}

/// What to do with a buffer that came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Returned {
    /// Keep it idle (if the budget grants its bytes).
    Keep,
    /// Free it.
    Drop,
}

/// Whether to keep a returned buffer of `capacity` bytes when `idle`
/// buffers are idle and at most `cap` may be; `shed`: the budget asked
/// holders past their share to give memory back.
pub(crate) fn on_return(capacity: usize, idle: usize, cap: usize, shed: bool) -> Returned {
    if !is_bulk(capacity) || idle >= cap || shed {
        Returned::Drop
    } else {
        Returned::Keep
    }
}

/// A pool of [`BULK_BYTES`] buffers (see the module doc).
#[derive(Debug)]
pub(crate) struct BulkPool {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Idle buffers, empty, each of capacity ≥ [`BULK_BYTES`].
    idle: Vec<Vec<u8>>,
    /// One handle of each lent buffer, oldest first.
    lent: VecDeque<Bytes>,
    /// The idle buffers' bytes, held in the replication budget.
    account: Account,
    /// Takes since the last tick.
    takes: u64,
}

/// What the pool holds (tests).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct PoolStats {
    /// Idle buffers now.
    pub(crate) idle: usize,
    /// Lent buffers remembered now.
    pub(crate) lent: usize,
}

impl BulkPool {
    /// An empty pool drawing on `account`'s budget.
    pub(crate) fn new(account: Account) -> Self {
        Self {
            inner: Mutex::new(Inner {
                idle: Vec::new(),
                lent: VecDeque::new(),
                account,
                takes: 0,
            }),
        }
    }

    /// A buffer with room for `len` bytes, empty: a pooled one when `len`
    /// fits one, else a new allocation of exactly `len`.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        if len > BULK_BYTES {
            return Vec::with_capacity(len);
        }
        let mut inner = self.inner.lock().expect("bulk pool poisoned");
        inner.takes += 1;
        inner.reclaim();
        match inner.idle.pop() {
            Some(buf) => {
                inner.account.give_back(buf.capacity() as u64);
                buf
            }
            None => Vec::with_capacity(BULK_BYTES),
        }
    }

    /// `buf` as `Bytes` for the stream's frames; a pooled-size buffer
    /// comes back to the pool once its last frame is dropped.
    pub(crate) fn lend(&self, buf: Vec<u8>) -> Bytes {
        let pooled = is_bulk(buf.capacity());
        let bytes = Bytes::from(buf);
        if pooled {
            let mut inner = self.inner.lock().expect("bulk pool poisoned");
            if inner.lent.len() >= LENT_MAX {
                inner.reclaim();
            }
            if inner.lent.len() < LENT_MAX {
                inner.lent.push_back(bytes.clone());
            }
        }
        bytes
    }

    /// The trimmer's periodic call: takes back lent buffers whose frames
    /// are gone and, when nothing was taken since the last tick, frees
    /// every idle buffer. Returns the bytes freed.
    pub(crate) fn tick(&self) -> u64 {
        let mut inner = self.inner.lock().expect("bulk pool poisoned");
        inner.reclaim();
        let quiet = inner.takes == 0;
        inner.takes = 0;
        if !quiet && !inner.account.must_shed() {
            return 0;
        }
        let freed: u64 = inner.idle.drain(..).map(|b| b.capacity() as u64).sum();
        inner.account.give_back_all();
        freed
    }

    /// Idle and lent buffers now.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> PoolStats {
        let inner = self.inner.lock().expect("bulk pool poisoned");
        PoolStats {
            idle: inner.idle.len(),
            lent: inner.lent.len(),
        }
    }
}

impl Inner {
    /// Moves every lent buffer nobody else holds to the idle list (or
    /// frees it, per [`on_return`]).
    fn reclaim(&mut self) {
        let cap = idle_cap(self.account.budget_bytes());
        let mut i = 0;
        while i < self.lent.len() {
            if !self.lent[i].is_unique() {
                i += 1;
                continue;
            }
            let handle = self.lent.remove(i).expect("index checked");
            let Ok(mut buf) = handle.try_into_mut() else {
                continue; // another handle appeared: it frees the buffer
            };
            // Empty before converting: `Vec::from(BytesMut)` copies the
            // contents to the front, a 4 MiB memmove for nothing.
            buf.clear();
            let buf = Vec::from(buf);
            let capacity = buf.capacity();
            let keep = on_return(capacity, self.idle.len(), cap, self.account.must_shed())
                == Returned::Keep
                && self.account.try_take(capacity as u64);
            if keep {
                self.idle.push(buf);
            }
        }
    }
}

/// The agent's pool, on the agent's replication budget.
pub(crate) fn bulk_pool() -> &'static BulkPool {
    static POOL: OnceLock<BulkPool> = OnceLock::new();
    POOL.get_or_init(|| BulkPool::new(memory_budget().account()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::MemoryBudget;

    const M: usize = 1 << 20;

    #[test]
    fn on_return_table() {
        // (capacity, idle, cap, shed, expected)
        let cases = [
            (BULK_BYTES, 0, 8, false, Returned::Keep),
            (BULK_BYTES + 1, 7, 8, false, Returned::Keep),
            // Full: freed.
            (BULK_BYTES, 8, 8, false, Returned::Drop),
            // A budget too small for any idle buffer.
            (BULK_BYTES, 0, 0, false, Returned::Drop),
            // The budget wants memory back.
            (BULK_BYTES, 0, 8, true, Returned::Drop),
            // Smaller than a bulk buffer, or a one-off larger one.
            (M, 0, 8, false, Returned::Drop),
            (2 * BULK_BYTES, 0, 8, false, Returned::Drop),
        ];
        for (i, &(capacity, idle, cap, shed, want)) in cases.iter().enumerate() {
            assert_eq!(on_return(capacity, idle, cap, shed), want, "case {i}");
        }
    }

    #[test]
    fn idle_cap_is_at_most_an_eighth_of_the_budget() {
        assert_eq!(idle_cap(16 << 20), 0);
        assert_eq!(idle_cap(32 << 20), 1);
        assert_eq!(idle_cap(64 << 20), 2);
        assert_eq!(idle_cap(1 << 30), IDLE_MAX);
    }

    #[test]
    fn a_lent_buffer_comes_back_once_its_frames_are_dropped() {
        let budget = MemoryBudget::new(1 << 30);
        let pool = BulkPool::new(budget.account());
        let mut buf = pool.take(BULK_BYTES);
        assert!(buf.capacity() >= BULK_BYTES);
        buf.resize(BULK_BYTES, 7);
        let first = buf.as_ptr();
        let bytes = pool.lend(buf);
        let frames: Vec<Bytes> = (0..4).map(|i| bytes.slice(i * M..(i + 1) * M)).collect();
        drop(bytes);
        // Frames still out: a take gets a new buffer.
        let other = pool.take(BULK_BYTES);
        assert_ne!(other.as_ptr(), first);
        assert_eq!(pool.stats().lent, 1);
        drop(frames);
        // The last frame is gone: the same allocation, empty, and its
        // idle bytes were held in the budget only while idle.
        assert_eq!(pool.tick(), 0, "a take happened: not quiet");
        assert_eq!(pool.stats(), PoolStats { idle: 1, lent: 0 });
        assert_eq!(budget.usage().used_bytes, BULK_BYTES as u64);
        let again = pool.take(BULK_BYTES);
        assert_eq!(again.as_ptr(), first);
        assert!(again.is_empty());
        assert_eq!(budget.usage().used_bytes, 0);
        drop(other);
    }

    #[test]
    fn a_quiet_tick_empties_the_pool_and_gives_the_budget_back() {
        let budget = MemoryBudget::new(1 << 30);
        let pool = BulkPool::new(budget.account());
        for _ in 0..3 {
            let b = pool.take(BULK_BYTES);
            drop(pool.lend(b));
        }
        pool.tick();
        assert_eq!(pool.stats().idle, 1, "one buffer circulated");
        assert_eq!(pool.tick(), BULK_BYTES as u64, "quiet: freed");
        assert_eq!(pool.stats(), PoolStats::default());
        assert_eq!(budget.usage().used_bytes, 0);
    }

    #[test]
    fn idle_buffers_never_pass_the_cap_nor_a_refusing_budget() {
        // 64 MiB: at most two idle buffers.
        let budget = MemoryBudget::new(64 << 20);
        let pool = BulkPool::new(budget.account());
        let out: Vec<Bytes> = (0..5)
            .map(|_| {
                let b = pool.take(BULK_BYTES);
                pool.lend(b)
            })
            .collect();
        drop(out);
        let _ = pool.take(M); // reclaims
        assert!(pool.stats().idle <= idle_cap(64 << 20));
        assert!(budget.usage().used_bytes <= (idle_cap(64 << 20) * BULK_BYTES) as u64);
        // A budget with no room: returned buffers are freed.
        let full = MemoryBudget::new(256 << 20);
        let mut hog = full.account();
        assert!(hog.try_take(256 << 20));
        let pool = BulkPool::new(full.account());
        let b = pool.take(BULK_BYTES);
        drop(pool.lend(b));
        pool.tick();
        assert_eq!(pool.stats().idle, 0);
    }

    #[test]
    fn a_large_take_is_not_pooled() {
        let pool = BulkPool::new(MemoryBudget::new(1 << 30).account());
        let b = pool.take(2 * BULK_BYTES);
        assert_eq!(b.capacity(), 2 * BULK_BYTES);
        drop(pool.lend(b));
        assert_eq!(pool.stats().lent, 0);
    }
}
