//! Taking budget for data a session reads from disk (catch-up scans and
//! the initial sync) without ever waiting for it while holding bytes that
//! only this session's own progress would give back.
//!
//! Why this is its own module: the rule is what keeps the agent's budget
//! (crate::budget) free of a hold-and-wait cycle. Budget bytes return to
//! the pool when the transport pulls the frame carrying them; the
//! transport runs on its own, so bytes on a frame in the stream's channel
//! always come back. Bytes counted for frames still in the session's
//! outbox, or for data no frame carries, come back only when the session
//! sends its next frame — which it does only after the wait. With 64 KiB
//! messages the scale smoke hung that way: a 32 MiB empty volume's
//! catch-up scan queued 512 zero frames in its outbox (zero frames count
//! no bytes towards the outbox's flush size) holding 64 KiB each, and two
//! such sessions held the whole 32 MiB budget while all four waited for it.

use super::{Session, SessionError};

/// What a session does with the bytes it holds outside its stream's
/// channel before it waits for budget: `(flush the outbox, bytes to give
/// back)`. Its outbox's frames go to the channel, carrying the session's
/// unsent bytes; with an empty outbox no frame carries them (their data is
/// gone: a zero-filled read, a segment the secondary holds already, a
/// staged flush), so they go back to the pool.
pub(super) fn before_wait(outbox_frames: usize, unsent_held: u64) -> (bool, u64) {
    if outbox_frames > 0 {
        (true, 0)
    } else {
        (false, unsent_held)
    }
}

impl Session<'_> {
    /// Takes `n` budget bytes for data about to be read and counts them as
    /// unsent (the next frame sent carries them). When the budget is spent
    /// it first makes everything this session holds returnable without its
    /// help ([`before_wait`]), then waits.
    pub(super) async fn hold_for_read(&mut self, n: u64) -> Result<(), SessionError> {
        if !crate::budget::try_hold(&self.stream_account, n) {
            match before_wait(self.outbox.len(), self.unsent_held) {
                (true, _) => self.flush_outbox().await?,
                (false, orphan) => self.give_back_unsent(orphan),
            }
            crate::budget::hold_after_refusal(&self.stream_account, n, || self.check()).await?;
        }
        self.unsent_held += n;
        Ok(())
    }

    /// Gives `n` of the session's unsent bytes back to the pool: data that
    /// will not travel (a read that was all zeros travels as a zero frame;
    /// a segment the secondary holds already does not travel at all).
    pub(super) fn give_back_unsent(&mut self, n: u64) {
        let n = n.min(self.unsent_held);
        self.unsent_held -= n;
        self.stream_account
            .lock()
            .expect("stream account poisoned")
            .give_back(n);
    }
}

#[cfg(test)]
mod tests {
    use super::before_wait;

    #[test]
    fn a_waiting_session_holds_only_bytes_on_frames_in_its_channel() {
        // (outbox frames, unsent bytes, expected (flush, give back))
        let cases = [
            // Nothing held, nothing queued: just wait.
            (0, 0, (false, 0)),
            // Queued zero frames carrying 16 MiB (the smoke's deadlock):
            // flush them, the transport returns the bytes.
            (256, 16 << 20, (true, 0)),
            // A queued frame carrying nothing extra: flushing is harmless.
            (1, 0, (true, 0)),
            // Bytes no frame carries (staged flush entries, a read that
            // sent nothing): give them back.
            (0, 4 << 20, (false, 4 << 20)),
        ];
        for (i, (frames, unsent, want)) in cases.into_iter().enumerate() {
            assert_eq!(before_wait(frames, unsent), want, "case {i}");
        }
    }
}
