//! [`Targets`]: the replication hook of a primary volume with several
//! targets. Each target is its own [`ReplicaLink`] (journal, change set,
//! session, RPO, metrics); this fan-out only hands every completed change
//! to each of them and joins what they ask the writer to wait for. A write
//! is thus acknowledged once it is durable locally and on every connected
//! sync target (and, per target, whatever its peer-loss and RPO policies
//! hold back); async targets never hold it.
//!
//! A volume with a single target installs that link directly, exactly as
//! before several targets existed: the fan-out costs a copy of each
//! change per extra target (the last target takes the write's own), so it
//! is only there when there is one.

use std::sync::Arc;

use ember_volume::{AckWait, Change, ReplicationHook};

use super::link::ReplicaLink;

/// The hook of a volume replicating to several targets.
#[derive(Debug)]
pub(crate) struct Targets {
    links: Vec<Arc<ReplicaLink>>,
}

impl Targets {
    /// The hook for `links`: none, the one link itself, or a fan-out.
    pub(crate) fn hook(links: Vec<Arc<ReplicaLink>>) -> Option<Arc<dyn ReplicationHook>> {
        match links.len() {
            0 => None,
            1 => links
                .into_iter()
                .next()
                .map(|l| l as Arc<dyn ReplicationHook>),
            _ => Some(Arc::new(Self { links })),
        }
    }
}

/// One wait for all of `waits` (`None` when there is nothing to wait for).
/// Each wait is already in flight (a receiver, or a throttle that only
/// sleeps), so awaiting them one after another takes as long as the
/// slowest, not their sum.
pub(crate) fn join(mut waits: Vec<AckWait>) -> Option<AckWait> {
    match waits.len() {
        0 => None,
        1 => waits.pop(),
        _ => Some(Box::pin(async move {
            for w in waits {
                w.await;
            }
        })),
    }
}

impl ReplicationHook for Targets {
    fn refuses_writes(&self) -> bool {
        // Fenced or split-brain towards any target: a newer primary may
        // exist, so no site-local write is safe.
        self.links.iter().any(|l| l.refuses_writes())
    }

    fn wants_changes(&self) -> bool {
        true
    }

    fn completed(&self, change: Change, fua: bool) -> Option<AckWait> {
        // Each link journals its own copy; the last takes the write's own
        // buffer, so n targets cost n - 1 copies, not n.
        let mut waits = Vec::new();
        let (last, others) = self.links.split_last()?;
        for l in others {
            waits.extend(l.completed(change.clone(), fua));
        }
        waits.extend(last.completed(change, fua));
        join(waits)
    }

    fn flushed(&self) -> Option<AckWait> {
        join(self.links.iter().filter_map(|l| l.flushed()).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    fn wait_for(rx: tokio::sync::oneshot::Receiver<()>) -> AckWait {
        Box::pin(async move {
            let _ = rx.await;
        })
    }

    #[tokio::test]
    async fn join_completes_only_when_every_wait_has() {
        assert!(join(Vec::new()).is_none());
        // Either target may ack first: the writer waits for the other.
        for second_first in [true, false] {
            let (tx1, rx1) = tokio::sync::oneshot::channel();
            let (tx2, rx2) = tokio::sync::oneshot::channel();
            let done = Arc::new(AtomicBool::new(false));
            let all = join(vec![wait_for(rx1), wait_for(rx2)]).expect("two waits");
            let flag = done.clone();
            let task = tokio::spawn(async move {
                all.await;
                flag.store(true, Ordering::SeqCst);
            });
            let (early, late) = if second_first { (tx2, tx1) } else { (tx1, tx2) };
            early.send(()).expect("send");
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(
                !done.load(Ordering::SeqCst),
                "acked before every sync target"
            );
            late.send(()).expect("send");
            task.await.expect("join");
            assert!(done.load(Ordering::SeqCst));
        }
    }
}
