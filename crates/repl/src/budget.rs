//! One replication memory budget per agent (`replication_memory` in
//! emberd.toml), shared by every primary link's journal (queued and
//! in-flight bytes) and every secondary's in-memory staging copy.
//!
//! Why one pool: a per-volume cap (the journal's own 256 MiB) does not
//! bound the sum, and at hundreds of volumes on a congested link the sum is
//! what kills the agent. Why fair shares: one busy volume must not take the
//! whole pool and push every other volume into a full change-set rescan.
//!
//! The rules ([`decide`], a pure function):
//! - nothing is ever granted past the budget (`used + n ≤ total`);
//! - a holder within its fair share (`total / holders`, at least
//!   [`FLOOR`]) is granted while the pool has room;
//! - a holder past its share may *borrow* only while the pool keeps
//!   `total / 8` free for the others;
//! - when a holder within its share is refused because the pool is full
//!   (borrowers hold it), the budget asks for memory back: holders over
//!   their share shed on their next write ([`Account::must_shed`]).
//!
//! What a refusal costs is already designed: a journal that cannot hold a
//! write drops its entries and the session resends the change-set bitmap,
//! which saw every write ("never torn", docs/replication.md); a staging
//! log that cannot keep a batch in memory keeps it on disk only and reads
//! it back to apply it. So the budget changes how much is resent and read,
//! never what the secondary ends up holding.
//!
//! Giving memory back: freed buffers do not lower the agent's RSS by
//! themselves. glibc raises its mmap threshold each time a large block is
//! freed (up to 32 MiB), after which the 1 MiB replication buffers come
//! from per-thread heap arenas that keep their peak; measured with the
//! smoke run of benches/scale, a 32 MiB budget let site-a peak at +79 MiB
//! over idle and site-b at +72 MiB, and with the threshold pinned at
//! glibc's own default (128 KiB) +23 and +41 MiB, settling back to idle.
//! But at 128 KiB every per-message buffer of the data path was a fresh
//! mapping, faulted in page by page: the largest CPU cost of replication
//! (issue 16). [`give_memory_back`] now pins it at 2 MiB (see
//! `MMAP_THRESHOLD`) and starts a trimmer that releases free heap pages
//! ([`trim_now`]: after 16 MiB given back, and whenever replication goes
//! quiet), so the RSS still settles after a burst. The initial sync's
//! 4 MiB reads come from a small pool ([`crate::bulk`]) that the trimmer
//! empties when replication goes quiet.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Default budget ceiling: 1 GiB. [`default_budget`] takes less on a
/// small host.
pub const DEFAULT_BUDGET_CAP: u64 = 1 << 30;
/// Smallest budget accepted: below it a single 4 MiB journal take and a
/// staging chunk for a few volumes would not fit.
pub const MIN_BUDGET: u64 = 16 << 20;
/// A holder may always use this much (if the pool has room), however many
/// holders share the pool: one streaming batch of a quiet volume.
pub(crate) const FLOOR: u64 = 1 << 20;
/// Borrowing past a fair share stops when less than `total / BORROW_RESERVE`
/// would be left free for the others.
const BORROW_RESERVE: u64 = 8;
/// Bytes given back since the last trim that make the trimmer release free
/// allocator pages.
const TRIM_AFTER: u64 = 16 << 20;
/// How often the trimmer looks.
const TRIM_EVERY: Duration = Duration::from_secs(2);

/// The default budget for a host with `ram_bytes` of memory: 1/8 of RAM,
/// at most 1 GiB, at least [`MIN_BUDGET`]. An eighth keeps the agent a
/// small tenant next to the hypervisor's guests; 1 GiB holds 256 volumes'
/// 4 MiB streaming batches at once, and a volume past that catches up from
/// its change set, which costs reads, not correctness.
pub fn default_budget(ram_bytes: u64) -> u64 {
    (ram_bytes / 8).clamp(MIN_BUDGET, DEFAULT_BUDGET_CAP)
}

/// What [`decide`] answers to a request for more bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// Granted.
    Yes,
    /// Refused: the pool cannot hold it.
    PoolFull,
    /// Refused: the holder is past its fair share and the pool is too
    /// full to lend.
    OverShare,
}

/// The fair share of one of `holders` holders of a `total`-byte pool.
pub(crate) fn fair_share(total: u64, holders: u64) -> u64 {
    (total / holders.max(1)).max(FLOOR.min(total))
}

/// Whether a holder holding `held` may take `n` more bytes of a `total`
/// pool with `used` bytes taken by `holders` holders (the asker included).
pub(crate) fn decide(total: u64, used: u64, held: u64, holders: u64, n: u64) -> Grant {
    let after = used.saturating_add(n);
    if after > total {
        return Grant::PoolFull;
    }
    if held.saturating_add(n) <= fair_share(total, holders) {
        return Grant::Yes;
    }
    if total - after >= total / BORROW_RESERVE {
        Grant::Yes
    } else {
        Grant::OverShare
    }
}

/// The agent's replication memory budget.
#[derive(Debug)]
pub struct MemoryBudget {
    total: AtomicU64,
    used: AtomicU64,
    /// Accounts holding any bytes.
    holders: AtomicU64,
    /// Non-zero: holders past this share are asked to shed (a holder
    /// within its share was refused; the share counts that holder).
    reclaim_share: AtomicU64,
    /// Requests refused (each one a fall-back to the change set or to the
    /// disk copy of a staged batch).
    refusals: AtomicU64,
    /// Highest `used` seen.
    peak: AtomicU64,
    /// Bytes given back since the last trim.
    returned: AtomicU64,
}

/// A snapshot of the budget, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetUsage {
    /// The budget.
    pub budget_bytes: u64,
    /// Bytes held now.
    pub used_bytes: u64,
    /// Highest use since the agent started.
    pub peak_bytes: u64,
    /// Journals and staging logs holding memory now.
    pub holders: u64,
    /// Requests refused since the agent started (a journal fell back to
    /// change-set catch-up, or a staged batch stayed on disk only).
    pub refusals: u64,
}

impl MemoryBudget {
    /// A budget of `total` bytes.
    pub fn new(total: u64) -> Arc<Self> {
        Arc::new(Self {
            total: AtomicU64::new(total),
            used: AtomicU64::new(0),
            holders: AtomicU64::new(0),
            reclaim_share: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            returned: AtomicU64::new(0),
        })
    }

    /// Sets the budget (at start, from the configuration). Bytes already
    /// held stay held; later requests see the new total.
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::SeqCst);
    }

    /// The budget and its use now.
    pub fn usage(&self) -> BudgetUsage {
        BudgetUsage {
            budget_bytes: self.total.load(Ordering::Relaxed),
            used_bytes: self.used.load(Ordering::Relaxed),
            peak_bytes: self.peak.load(Ordering::Relaxed),
            holders: self.holders.load(Ordering::Relaxed),
            refusals: self.refusals.load(Ordering::Relaxed),
        }
    }

    /// A new account (one journal or staging log) drawing on this budget.
    pub(crate) fn account(self: &Arc<Self>) -> Account {
        Account {
            budget: self.clone(),
            held: 0,
        }
    }
}

/// The agent's budget: [`MemoryBudget::set_total`] it at start.
/// Process-wide because every journal and staging log of the agent draws
/// on the same pool, wherever it is created; until configured it holds
/// [`DEFAULT_BUDGET_CAP`].
pub fn memory_budget() -> &'static Arc<MemoryBudget> {
    static BUDGET: OnceLock<Arc<MemoryBudget>> = OnceLock::new();
    BUDGET.get_or_init(|| MemoryBudget::new(DEFAULT_BUDGET_CAP))
}

/// One holder's bytes in a [`MemoryBudget`]; gives them back when dropped.
#[derive(Debug)]
pub(crate) struct Account {
    budget: Arc<MemoryBudget>,
    held: u64,
}

impl Account {
    /// Asks for `n` more bytes; false (and nothing taken) when refused.
    pub(crate) fn try_take(&mut self, n: u64) -> bool {
        self.ask(n, true)
    }

    /// As [`Self::try_take`]; `count`: a refusal counts in the budget's
    /// refusals (a waiter asking again does not count twice).
    fn ask(&mut self, n: u64, count: bool) -> bool {
        if n == 0 {
            return true;
        }
        let b = &self.budget;
        let total = b.total.load(Ordering::SeqCst);
        let holders = b.holders.load(Ordering::SeqCst) + u64::from(self.held == 0);
        let mut verdict = Grant::Yes;
        let taken = b
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                verdict = decide(total, used, self.held, holders, n);
                (verdict == Grant::Yes).then_some(used + n)
            });
        match taken {
            Ok(before) => {
                if self.held == 0 {
                    b.holders.fetch_add(1, Ordering::SeqCst);
                }
                self.held += n;
                b.peak.fetch_max(before + n, Ordering::Relaxed);
                true
            }
            Err(_) => {
                if count {
                    b.refusals.fetch_add(1, Ordering::Relaxed);
                }
                if verdict == Grant::PoolFull && self.held + n <= fair_share(total, holders) {
                    // Borrowers hold what this holder is owed.
                    b.reclaim_share
                        .store(fair_share(total, holders), Ordering::SeqCst);
                }
                false
            }
        }
    }

    /// Gives `n` bytes back (at most what is held).
    pub(crate) fn give_back(&mut self, n: u64) {
        let n = n.min(self.held);
        if n == 0 {
            return;
        }
        self.held -= n;
        let b = &self.budget;
        if self.held == 0 {
            b.holders.fetch_sub(1, Ordering::SeqCst);
        }
        let after = b.used.fetch_sub(n, Ordering::SeqCst) - n;
        let total = b.total.load(Ordering::Relaxed);
        if total - after.min(total) >= total / BORROW_RESERVE {
            b.reclaim_share.store(0, Ordering::SeqCst);
        }
        b.returned.fetch_add(n, Ordering::Relaxed);
    }

    /// A new, empty account on the same budget.
    #[cfg(test)]
    pub(crate) fn sibling(&self) -> Account {
        self.budget.account()
    }

    /// Moves `n` held bytes (at most what is held) to `to`, on the same
    /// budget: the pool's use does not change.
    pub(crate) fn transfer(&mut self, to: &mut Account, n: u64) {
        assert!(
            Arc::ptr_eq(&self.budget, &to.budget),
            "transfer between accounts of different budgets"
        );
        let n = n.min(self.held);
        if n == 0 {
            return;
        }
        let b = &self.budget;
        if to.held == 0 {
            b.holders.fetch_add(1, Ordering::SeqCst);
        }
        to.held += n;
        self.held -= n;
        if self.held == 0 {
            b.holders.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Gives everything back.
    pub(crate) fn give_back_all(&mut self) {
        self.give_back(self.held);
    }

    /// The whole budget this account draws on.
    pub(crate) fn budget_bytes(&self) -> u64 {
        self.budget.total.load(Ordering::Relaxed)
    }

    /// Bytes held.
    pub(crate) fn held(&self) -> u64 {
        self.held
    }

    /// True when the budget asked for memory back and this holder is past
    /// its fair share: it should drop what it holds.
    pub(crate) fn must_shed(&self) -> bool {
        match self.budget.reclaim_share.load(Ordering::Relaxed) {
            0 => false,
            share => self.held > share,
        }
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        self.give_back_all();
    }
}

/// Budget bytes of the frames a session has queued for its stream: taken
/// before a resync reads data ([`try_hold`], [`hold_after_refusal`]) or
/// moved here with the journal entries the session takes
/// (`Journal::take_into`), and given back when the stream pulls the
/// frame carrying them ([`release_on_pull`]).
pub(crate) type StreamAccount = Arc<std::sync::Mutex<Account>>;

/// A new stream account on the agent's budget.
pub(crate) fn stream_account() -> StreamAccount {
    Arc::new(std::sync::Mutex::new(memory_budget().account()))
}

/// How long a resync waits between asks when the budget is spent.
const HOLD_RETRY: Duration = Duration::from_millis(10);

/// More than the whole budget could never be granted: a larger ask is
/// cut to all of it (giving back caps at what is held).
fn capped(n: u64) -> u64 {
    n.min(memory_budget().usage().budget_bytes)
}

/// Takes `n` bytes for the stream if the budget has room now; a refusal
/// counts in the budget's refusals. On false the caller must not keep
/// bytes it holds out of the stream's reach while it waits
/// ([`hold_after_refusal`]).
pub(crate) fn try_hold(account: &StreamAccount, n: u64) -> bool {
    account
        .lock()
        .expect("stream account poisoned")
        .ask(capped(n), true)
}

/// Takes `n` bytes for the stream after [`try_hold`] refused them,
/// waiting while the budget is spent (a resync slows down rather than
/// buffer past the budget). `check` runs between asks, so a session that
/// ended stops waiting.
///
/// Only bytes the transport gives back by itself may be held meanwhile:
/// every byte a waiter holds must ride on a frame already in its stream's
/// channel. A session that kept budget bytes for frames still in its
/// outbox while waiting here deadlocked: it flushes only after this wait,
/// and the pool it waits for was its own and other such sessions' (the
/// scale smoke with 64 KiB messages: four 32 MiB volumes' catch-up scans,
/// two holding 16 MiB of zero frames each in their outboxes, the whole
/// 32 MiB budget held, nothing sent).
pub(crate) async fn hold_after_refusal<E>(
    account: &StreamAccount,
    n: u64,
    mut check: impl FnMut() -> Result<(), E>,
) -> Result<(), E> {
    let n = capped(n);
    loop {
        check()?;
        tokio::time::sleep(HOLD_RETRY).await;
        if account
            .lock()
            .expect("stream account poisoned")
            .ask(n, false)
        {
            return Ok(());
        }
    }
}

/// The stream of frames `rx` receives, giving each frame's held bytes back
/// to `account` when the transport pulls it. The budget counts frames
/// queued for the stream; once pulled, a frame's data sits in HTTP/2's
/// send buffer, outside the budget like the codec's buffer. hyper pulls
/// the next frame only while that buffer is below its limit, 1 MiB per
/// stream on the client (the primary; tonic 0.14 does not expose the
/// setting) and 400 KiB on the server, or below the peer's unused flow
/// control window if that is smaller: so a stream to a peer that stays
/// connected but stops reading holds up to ~1 MiB + one message there.
///
/// Giving back only on the *next* pull deadlocked: a session waiting in
/// [`hold_after_refusal`] for room never sends its next frame, so its
/// last frame's bytes were never returned, and two such sessions held the whole budget for
/// good (seen in the scale smoke: resync stuck at 32 of 32 MiB held).
pub(crate) fn release_on_pull<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<(T, u64)>,
    account: StreamAccount,
) -> impl tokio_stream::Stream<Item = T> + Send + 'static {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(rx).map(move |(frame, held)| {
        account
            .lock()
            .expect("stream account poisoned")
            .give_back(held);
        frame
    })
}

/// The allocator's mmap threshold, pinned (see the module doc): buffers
/// above it are their own mapping, returned to the kernel when freed.
/// Not glibc's default 128 KiB: below 2 MiB sit the buffers the data path
/// allocates and frees per message — the NBD server's 1 MiB write
/// buffers and the write path's copies of them, tonic's encode and decode
/// buffers (which double past 128 KiB for 64 KiB messages) — and as
/// mappings each was faulted in 4 KiB at a time and unmapped again: page
/// faults and munmap were 30–40 % of the primary's CPU. From the heap they
/// are reused; the initial sync's 4 MiB reads stay mappings and are
/// pooled instead ([`crate::bulk`]). Pinned, not left to glibc, because
/// glibc's own rule raises it with every large free up to 32 MiB, after
/// which arenas keep their peak (benches/RESULTS.md, "Replication CPU per
/// byte (issue 16)" and "Scale").
const MMAP_THRESHOLD: i32 = 2 << 20;
/// Free memory at the top of a heap glibc keeps instead of returning at
/// once on a free (its default, 128 KiB, returned and re-faulted the
/// top of an arena on nearly every burst of frees); twice the mmap
/// threshold, as glibc's own rule sets it. The trimmer returns the rest
/// when replication goes quiet.
const TRIM_THRESHOLD: i32 = 2 * MMAP_THRESHOLD;

/// Whether the trimmer releases free heap pages now: `pending` bytes were
/// given back (to the budget or by the bulk pool) since the last trim,
/// and `moved`: some were given back during the last period. A large
/// amount trims at once; anything at all trims as soon as replication
/// goes quiet for a period, so memory freed after the last large trim
/// does not stay in the heap (tests/tests/memory_budget.rs measures the
/// settled RSS).
pub(crate) fn trim_now(pending: u64, moved: bool) -> bool {
    pending >= TRIM_AFTER || (pending > 0 && !moved)
}

/// Makes the agent give replication memory back after a burst: pins the
/// allocator's mmap and trim thresholds (so they do not drift up with
/// every large free), and every 2 s (`TRIM_EVERY`) empties the bulk
/// buffer pool if it went quiet and releases free heap pages (`trim_now`).
/// Call once at start, inside the runtime.
pub fn give_memory_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it has no
    // preconditions and is safe to call while other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
    static STARTED: AtomicBool = AtomicBool::new(false);
    if STARTED.swap(true, Ordering::SeqCst) {
        return;
    }
    tokio::spawn(async {
        let budget = memory_budget().clone();
        let mut seen = budget.returned.load(Ordering::Relaxed);
        let mut pending = 0u64;
        loop {
            tokio::time::sleep(TRIM_EVERY).await;
            let now = budget.returned.load(Ordering::Relaxed);
            let moved = now != seen;
            pending += now.wrapping_sub(seen) + crate::bulk::bulk_pool().tick();
            seen = now;
            if !trim_now(pending, moved) {
                continue;
            }
            pending = 0;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    });
}

/// Asks the allocator to return free memory to the kernel.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it
    // takes the arena locks itself and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn decide_table() {
        // (total, used, held, holders, n, expected)
        let cases = [
            // Within share, pool has room.
            (64 * M, 0, 0, 1, 4 * M, Grant::Yes),
            // Never past the budget, even within share.
            (64 * M, 62 * M, 0, 1, 4 * M, Grant::PoolFull),
            (64 * M, 60 * M, 0, 1, 4 * M, Grant::Yes),
            // 16 holders: share 4 MiB. Within it: granted.
            (64 * M, 40 * M, 3 * M, 16, M, Grant::Yes),
            // Past share, pool leaves ≥ 1/8 free: borrowing allowed.
            (64 * M, 40 * M, 10 * M, 16, M, Grant::Yes),
            // Past share, the loan would eat the reserve: refused.
            (64 * M, 56 * M, 10 * M, 16, M, Grant::OverShare),
            // Within share: may use the reserve.
            (64 * M, 56 * M, 2 * M, 16, M, Grant::Yes),
            // 1000 holders of 64 MiB: share is the 1 MiB floor.
            (64 * M, 10 * M, 0, 1000, M, Grant::Yes),
            (64 * M, 60 * M, M, 1000, M, Grant::OverShare),
            // A tiny budget: the floor is the budget.
            (M / 2, 0, 0, 3, M / 2, Grant::Yes),
            (M / 2, 0, 0, 3, M, Grant::PoolFull),
            // Zero bytes asked: always fits.
            (64 * M, 64 * M, 64 * M, 1, 0, Grant::Yes),
        ];
        for (i, &(total, used, held, holders, n, want)) in cases.iter().enumerate() {
            assert_eq!(
                decide(total, used, held, holders, n),
                want,
                "case {i}: total {total} used {used} held {held} holders {holders} n {n}"
            );
        }
    }

    #[test]
    fn trim_now_table() {
        // (bytes given back since the last trim, moved in the last period, trim)
        let cases = [
            (0, false, false),
            (0, true, false),
            // A burst still running: only a large amount trims.
            (M, true, false),
            (TRIM_AFTER, true, true),
            // Gone quiet: whatever is pending is released.
            (M, false, true),
            (1, false, true),
        ];
        for (pending, moved, want) in cases {
            assert_eq!(trim_now(pending, moved), want, "{pending} {moved}");
        }
    }

    #[test]
    fn default_budget_is_an_eighth_of_ram_within_bounds() {
        assert_eq!(default_budget(0), MIN_BUDGET);
        assert_eq!(default_budget(4 << 30), 512 * M);
        assert_eq!(default_budget(8 << 30), 1 << 30);
        assert_eq!(default_budget(512 << 30), DEFAULT_BUDGET_CAP);
    }

    #[test]
    fn accounts_never_exceed_the_budget_and_give_back_on_drop() {
        let b = MemoryBudget::new(8 * M);
        let mut a = b.account();
        let mut c = b.account();
        let mut granted = 0;
        for _ in 0..100 {
            if a.try_take(M / 4) {
                granted += M / 4;
            }
            if c.try_take(M / 4) {
                granted += M / 4;
            }
            assert!(b.usage().used_bytes <= 8 * M);
        }
        assert_eq!(b.usage().used_bytes, granted);
        assert!(b.usage().refusals > 0);
        assert_eq!(b.usage().holders, 2);
        drop(a);
        assert_eq!(b.usage().used_bytes, c.held());
        c.give_back_all();
        assert_eq!(b.usage().used_bytes, 0);
        assert_eq!(b.usage().holders, 0);
    }

    #[test]
    fn a_borrower_is_asked_to_shed_when_a_holder_within_share_is_refused() {
        let b = MemoryBudget::new(16 * M);
        let mut hog = b.account();
        // Alone, the hog may borrow up to 7/8 of the pool.
        let mut n = 0;
        while hog.try_take(M) {
            n += 1;
        }
        assert_eq!(n, 16, "alone, its share is the whole pool");
        assert!(!hog.must_shed());
        let mut quiet = b.account();
        assert!(!quiet.try_take(M), "the pool is full");
        assert!(hog.must_shed(), "now two holders: the hog is past 8 MiB");
        hog.give_back_all();
        assert!(!hog.must_shed());
        assert!(quiet.try_take(M));
    }
}
