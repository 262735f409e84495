//! The primary's in-memory write journal: completed changes in completion
//! order, waiting to be shipped, plus what lag is measured from.
//!
//! Completion order is a valid write order: a write acknowledged to the
//! client completed before any write issued after that acknowledgement, so
//! applying entries in journal order never shows a later write without an
//! earlier one it may depend on.
//!
//! The journal is bounded. When it overflows (or the link is down and it
//! is not capturing), entries are dropped and the change-set bitmap, which
//! saw every write too, is what gets resent: correctness never depends on
//! the journal, only the cost of catching up does.
//!
//! Its memory is drawn from the agent's replication budget
//! ([`crate::budget`]): queued entries hold it here, and entries taken for
//! shipping carry it on to the session's stream ([`Journal::take_into`]),
//! which gives it back as the transport pulls each frame. A refusal, or the
//! budget asking a journal past its fair share to shed, is an overflow like
//! any other.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use ember_volume::Change;
use tokio::sync::oneshot;

use crate::budget::{Account, memory_budget};

/// Bytes a flush or marker entry is counted as.
const SMALL_ENTRY: u64 = 64;
/// Entry queues are given back to the allocator when they empty with
/// room for more than this many entries (after a burst).
const KEEP_ENTRIES: usize = 1024;

/// Budget bytes an entry holds.
fn payload(op: &Op) -> u64 {
    match op {
        Op::Change(Change::Write { data, .. }) => data.len() as u64,
        _ => SMALL_ENTRY,
    }
}

/// What a journal entry carries.
#[derive(Debug)]
pub(crate) enum Op {
    /// A data change.
    Change(Change),
    /// A client FLUSH (sync mode: becomes a barrier on the secondary).
    Flush,
    /// A consistency group's point, recorded in every member's journal at
    /// one instant (see `primary::group`): the member's batch ends here.
    Marker(Marker),
}

/// A consistency-group point as one member's journal holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Marker {
    /// The point's name: the primary's clock when it was taken (unix ns),
    /// strictly increasing per group.
    pub(crate) point: i64,
    /// Members the point was taken across.
    pub(crate) group_size: u32,
    /// The member's change-set checkpoint, taken just before the point:
    /// every block it clears was written before the marker.
    pub(crate) checkpoint: u64,
}

/// One captured change.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) op: Op,
    pub(crate) fua: bool,
}

impl Entry {
    /// Budget bytes the entry holds.
    pub(crate) fn budget_bytes(&self) -> u64 {
        payload(&self.op)
    }
}

/// Writes that completed within one 10 ms slot: lag is measured from the
/// oldest slot not yet on the secondary (at 10 ms resolution), without a
/// per-write record while the link is down.
#[derive(Debug)]
struct Slot {
    first_seq: u64,
    last_seq: u64,
    at: SystemTime,
    bytes: u64,
}

const SLOT: Duration = Duration::from_millis(10);

/// The journal of one replicated volume.
#[derive(Debug)]
pub(crate) struct Journal {
    last_seq: u64,
    capturing: bool,
    overflowed: bool,
    entries: VecDeque<Entry>,
    bytes: u64,
    capacity: u64,
    /// Every change with seq ≤ `released` is on the secondary.
    released: u64,
    /// A group marker was dropped (overflow or not capturing): the group
    /// point it named can no longer be reached by this member.
    lost_marker: bool,
    slots: VecDeque<Slot>,
    waiters: VecDeque<(u64, oneshot::Sender<()>)>,
    /// This journal's share of the agent's replication budget (its queued
    /// entries).
    account: Account,
}

impl Journal {
    /// An empty journal holding at most `capacity` bytes of changes,
    /// drawing on the agent's replication budget.
    pub(crate) fn new(capacity: u64) -> Self {
        Self::with_account(capacity, memory_budget().account())
    }

    /// As [`Self::new`], drawing on `account`.
    pub(crate) fn with_account(capacity: u64, account: Account) -> Self {
        Self {
            last_seq: 0,
            capturing: false,
            overflowed: false,
            entries: VecDeque::new(),
            bytes: 0,
            capacity,
            released: 0,
            lost_marker: false,
            slots: VecDeque::new(),
            waiters: VecDeque::new(),
            account,
        }
    }

    /// Drops every queued entry (overflow, restart or stop of capture),
    /// gives their bytes back and, after a burst, the queue's memory too.
    fn drop_entries(&mut self) {
        self.lost_marker |= self.entries.iter().any(|e| matches!(e.op, Op::Marker(_)));
        self.entries.clear();
        self.account.give_back(self.bytes);
        self.bytes = 0;
        self.shrink();
    }

    /// Returns the queues' memory after a burst: a `VecDeque` keeps its
    /// largest capacity for ever, which at a thousand volumes is most of
    /// the agent's memory.
    fn shrink(&mut self) {
        if self.entries.is_empty() && self.entries.capacity() > KEEP_ENTRIES {
            self.entries = VecDeque::new();
        }
        if self.slots.capacity() > KEEP_ENTRIES && self.slots.len() < KEEP_ENTRIES / 4 {
            self.slots.shrink_to(KEEP_ENTRIES / 4);
        }
        if self.waiters.capacity() > KEEP_ENTRIES && self.waiters.len() < KEEP_ENTRIES / 4 {
            self.waiters.shrink_to(KEEP_ENTRIES / 4);
        }
    }

    /// Records a completed change (or flush). With `wait`, returns a
    /// receiver resolved once the secondary holds it.
    pub(crate) fn record(
        &mut self,
        op: Op,
        fua: bool,
        wait: bool,
    ) -> (u64, Option<oneshot::Receiver<()>>) {
        self.last_seq += 1;
        let seq = self.last_seq;
        let bytes = match &op {
            Op::Change(c) => c.len(),
            Op::Flush | Op::Marker(_) => 0,
        };
        if bytes > 0 {
            let now = SystemTime::now();
            match self.slots.back_mut() {
                Some(slot) if now.duration_since(slot.at).unwrap_or_default() < SLOT => {
                    slot.last_seq = seq;
                    slot.bytes += bytes;
                }
                _ => self.slots.push_back(Slot {
                    first_seq: seq,
                    last_seq: seq,
                    at: now,
                    bytes,
                }),
            }
        }
        if matches!(op, Op::Marker(_)) && (!self.capturing || self.overflowed) {
            self.lost_marker = true;
        }
        if self.capturing && !self.overflowed {
            let payload = payload(&op);
            // Past this volume's own cap, refused by the agent's budget, or
            // asked to shed for a volume within its share: fall back to the
            // change set (the bitmap saw this write too).
            if self.bytes + payload > self.capacity
                || self.account.must_shed()
                || !self.account.try_take(payload)
            {
                self.overflowed = true;
                self.drop_entries();
            } else {
                self.bytes += payload;
                self.entries.push_back(Entry { seq, op, fua });
            }
        }
        let rx = wait.then(|| {
            let (tx, rx) = oneshot::channel();
            self.waiters.push_back((seq, tx));
            rx
        });
        (seq, rx)
    }

    /// Starts (or restarts) capturing: forgets captured entries, which the
    /// caller covers by scanning the change-set bitmap. Returns the last
    /// sequence number assigned so far.
    pub(crate) fn start_capture(&mut self) -> u64 {
        self.capturing = true;
        self.overflowed = false;
        // Markers dropped before this capture named points the new
        // capture never shipped: no restart needed for them.
        self.drop_entries();
        self.lost_marker = false;
        self.last_seq
    }

    /// Stops capturing (link down).
    pub(crate) fn stop_capture(&mut self) {
        self.capturing = false;
        self.drop_entries();
    }

    /// True when entries were dropped since capture started.
    pub(crate) fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// True (once) when a group marker was dropped since the last call.
    pub(crate) fn take_lost_marker(&mut self) -> bool {
        std::mem::take(&mut self.lost_marker)
    }

    /// The last sequence number assigned.
    pub(crate) fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Takes captured entries, oldest first, up to about `max_bytes`; a
    /// group marker is always the last entry taken, so a batch ends there.
    /// Their budget bytes are given back.
    #[cfg(test)]
    pub(crate) fn take(&mut self, max_bytes: u64) -> Vec<Entry> {
        let mut sink = self.account.sibling();
        let out = self.take_into(max_bytes, &mut sink);
        sink.give_back_all();
        out
    }

    /// As `take`, moving the entries' budget bytes to `to` (the session's
    /// stream account; [`Entry::budget_bytes`] each).
    pub(crate) fn take_into(&mut self, max_bytes: u64, to: &mut Account) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut taken = 0;
        while taken < max_bytes {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            let payload = payload(&e.op);
            self.bytes -= payload;
            taken += payload;
            let marker = matches!(e.op, Op::Marker(_));
            out.push(e);
            if marker {
                break;
            }
        }
        // Still held until the stream pulls them.
        self.account.transfer(to, taken);
        self.shrink();
        out
    }

    /// Budget bytes this journal holds (its queued entries).
    pub(crate) fn held_bytes(&self) -> u64 {
        self.account.held()
    }

    /// Every change up to `seq` is on the secondary: wakes its waiters and
    /// advances the lag clock.
    pub(crate) fn release(&mut self, seq: u64) {
        if seq <= self.released {
            return;
        }
        self.released = seq;
        while self.waiters.front().is_some_and(|(s, _)| *s <= seq) {
            let (_, tx) = self.waiters.pop_front().expect("checked");
            let _ = tx.send(());
        }
        while let Some(front) = self.slots.front_mut() {
            if front.last_seq <= seq {
                self.slots.pop_front();
            } else {
                front.first_seq = front.first_seq.max(seq + 1);
                break;
            }
        }
    }

    /// Wakes every waiter without the secondary holding their writes: the
    /// degrade policy when the peer is lost (the writes stay in the bitmap).
    pub(crate) fn release_waiters(&mut self) -> usize {
        let n = self.waiters.len();
        for (_, tx) in self.waiters.drain(..) {
            let _ = tx.send(());
        }
        n
    }

    /// Bytes captured and not yet shipped.
    pub(crate) fn unsent_bytes(&self) -> u64 {
        self.bytes
    }

    /// Lag: age of the oldest change not yet on the secondary, and the
    /// bytes written since (both 0 when caught up).
    pub(crate) fn lag(&self) -> (Duration, u64) {
        let Some(front) = self.slots.front() else {
            return (Duration::ZERO, 0);
        };
        let age = SystemTime::now()
            .duration_since(front.at)
            .unwrap_or_default();
        (age, self.slots.iter().map(|s| s.bytes).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(j: &mut Journal, offset: u64, wait: bool) -> (u64, Option<oneshot::Receiver<()>>) {
        let change = Change::Write {
            offset,
            data: vec![1u8; 4096],
        };
        j.record(Op::Change(change), false, wait)
    }

    #[test]
    fn keeps_completion_order_and_overflows_to_the_bitmap() {
        let mut j = Journal::new(3 * 4096);
        write(&mut j, 0, false);
        assert!(j.take(u64::MAX).is_empty(), "not capturing yet");
        j.start_capture();
        for i in 0..3 {
            write(&mut j, i * 4096, false);
        }
        let seqs: Vec<u64> = j.take(u64::MAX).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![2, 3, 4]);
        for i in 0..4 {
            write(&mut j, i * 4096, false);
        }
        assert!(j.overflowed(), "a fourth 4 KiB write exceeds 12 KiB");
        assert!(j.take(u64::MAX).is_empty());
        assert_eq!(j.start_capture(), 8);
        assert!(!j.overflowed());
    }

    #[test]
    fn a_marker_ends_a_take_and_a_dropped_marker_is_reported() {
        let mut j = Journal::new(3 * 4096);
        j.start_capture();
        let marker = Marker {
            point: 1,
            group_size: 2,
            checkpoint: 0,
        };
        write(&mut j, 0, false);
        j.record(Op::Marker(marker), false, false);
        write(&mut j, 4096, false);
        let first = j.take(u64::MAX);
        assert_eq!(first.len(), 2);
        assert!(matches!(first[1].op, Op::Marker(m) if m == marker));
        assert_eq!(j.take(u64::MAX).len(), 1);
        assert!(!j.take_lost_marker());

        j.record(Op::Marker(marker), false, false);
        for i in 0..4 {
            write(&mut j, i * 4096, false);
        }
        assert!(j.overflowed());
        assert!(j.take_lost_marker(), "the overflow dropped a marker");
        assert!(!j.take_lost_marker(), "reported once");
        j.record(Op::Marker(marker), false, false);
        assert!(j.take_lost_marker(), "recorded while overflowed: dropped");
    }

    #[test]
    fn release_wakes_waiters_in_order_and_clears_lag() {
        let mut j = Journal::new(1 << 20);
        j.start_capture();
        let (s1, mut w1) = write(&mut j, 0, true);
        let (_, mut w2) = write(&mut j, 4096, true);
        assert!(j.lag().1 >= 8192);
        j.release(s1);
        assert!(w1.as_mut().expect("waiter").try_recv().is_ok());
        assert!(w2.as_mut().expect("waiter").try_recv().is_err());
        assert_eq!(j.release_waiters(), 1);
        assert!(w2.as_mut().expect("waiter").try_recv().is_ok());
        j.release(j.last_seq());
        assert_eq!(j.lag(), (Duration::ZERO, 0));
    }

    #[test]
    fn the_budget_bounds_queued_bytes_hands_taken_ones_to_the_stream_and_overflows() {
        let budget = crate::budget::MemoryBudget::new(16 * 4096);
        let mut j = Journal::with_account(1 << 30, budget.account());
        let mut stream = budget.account();
        j.start_capture();
        for i in 0..8 {
            write(&mut j, i * 4096, false);
        }
        assert!(!j.overflowed());
        let taken = j.take_into(u64::MAX, &mut stream);
        assert_eq!(taken.len(), 8);
        assert_eq!(j.held_bytes(), 0);
        assert_eq!(
            stream.held(),
            8 * 4096,
            "until pulled, the stream holds them"
        );
        let bytes: u64 = taken.iter().map(Entry::budget_bytes).sum();
        assert_eq!(bytes, 8 * 4096);
        for i in 0..8 {
            write(&mut j, i * 4096, false);
        }
        assert_eq!(budget.usage().used_bytes, 16 * 4096);
        write(&mut j, 0, false);
        assert!(j.overflowed(), "the budget refused: the bitmap takes over");
        assert_eq!(j.held_bytes(), 0, "queued entries given back");
        assert!(j.take(u64::MAX).is_empty());
        stream.give_back_all();
        assert_eq!(budget.usage().used_bytes, 0);
        j.start_capture();
        write(&mut j, 0, false);
        assert!(!j.overflowed());
        assert_eq!(budget.usage().used_bytes, 4096);
        j.stop_capture();
        assert_eq!(
            budget.usage().used_bytes,
            0,
            "stopped: everything given back"
        );
    }
}
