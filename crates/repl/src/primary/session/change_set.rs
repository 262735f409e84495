//! Forgetting what a peer acknowledged, off the runtime's workers.
//!
//! Why this is its own module: clearing the session's change set with
//! `persist` rewrites the bitmap file and `fdatasync`s it — a disk round
//! trip of ~60 µs on a good day and milliseconds behind other writers. Run
//! inline in the session task it blocked a runtime worker for that long,
//! once a second per replicating volume in streaming and once per 64 MiB
//! group in an initial sync; an agent started on one CPU has one worker,
//! and the NBD requests of every volume waited behind it. The persisting
//! clear runs on the blocking pool instead; a clear that only touches
//! memory (most cuts) stays inline, where it costs less than a hand-off.

use std::sync::Arc;

use ember_tracking::{Tracker, TrackingError};

/// Clears `consumer`'s blocks reported at checkpoint `id` (within `range`,
/// or all of them) as [`Tracker::consumer_clear`] does, persisting the
/// bitmap when `persist` is set. Returns the dirty bytes left.
pub(super) async fn clear(
    tracker: &Arc<Tracker>,
    consumer: &str,
    id: u64,
    range: Option<(u64, u64)>,
    persist: bool,
) -> Result<u64, TrackingError> {
    if !persist {
        return tracker.consumer_clear(consumer, id, range, false);
    }
    let (tracker, consumer) = (tracker.clone(), consumer.to_owned());
    match tokio::task::spawn_blocking(move || tracker.consumer_clear(&consumer, id, range, true))
        .await
    {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: only when the runtime shuts down; the on-disk bitmap
        // then stays a superset of the change set, which is safe.
        Err(_) => Err(TrackingError::Io {
            path: std::path::PathBuf::new(),
            source: std::io::Error::other("runtime shutting down"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use ember_tracking::TrackingConfig;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn tracker(dir: &std::path::Path) -> Arc<Tracker> {
        let t = Tracker::open(dir, 64 * MIB, TrackingConfig::default()).expect("open");
        t.add_consumer(dir, "repl-b", true).expect("add consumer");
        Arc::new(t)
    }

    /// On a one-thread runtime a persisting clear that blocked its thread
    /// would let nothing else run until it returned; here a neighbour task
    /// keeps running while twenty of them (each an fdatasync) go by.
    #[tokio::test(flavor = "current_thread")]
    async fn a_persisting_clear_leaves_the_runtime_to_other_tasks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = tracker(dir.path());
        let turns = Arc::new(AtomicU64::new(0));
        let neighbour = {
            let turns = turns.clone();
            tokio::spawn(async move {
                loop {
                    turns.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        };
        // The neighbour has not run yet: this task has not yielded.
        assert_eq!(turns.load(Ordering::Relaxed), 0);
        for _ in 0..20 {
            let id = t.consumer_checkpoint("repl-b").expect("checkpoint").id;
            let left = clear(&t, "repl-b", id, None, true).await.expect("clear");
            assert_eq!(left, 0);
        }
        assert!(
            turns.load(Ordering::Relaxed) > 0,
            "the neighbour never ran: the persisting clears held the runtime's only thread"
        );
        neighbour.abort();
        // Persisted: a reopened tracker finds the consumer clean.
        drop(t);
        let again = Tracker::open(dir.path(), 64 * MIB, TrackingConfig::default()).expect("reopen");
        again
            .add_consumer(dir.path(), "repl-b", true)
            .expect("consumer");
        assert_eq!(again.consumer_dirty_bytes("repl-b"), Some(0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_clear_in_memory_stays_inline_and_reports_what_is_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = tracker(dir.path());
        let id = t.consumer_checkpoint("repl-b").expect("checkpoint").id;
        let left = clear(&t, "repl-b", id, Some((0, 32 * MIB)), false)
            .await
            .expect("range clear");
        assert_eq!(left, 32 * MIB);
        assert!(matches!(
            clear(&t, "repl-b", id + 1, None, true).await,
            Err(TrackingError::StaleCheckpoint { .. })
        ));
    }
}
