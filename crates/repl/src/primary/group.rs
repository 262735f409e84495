//! Consistency groups on the primary: one write order across volumes.
//!
//! A group's points are taken at one instant across every member: the
//! ticker holds every member's journal lock at once and records a
//! [`Marker`] in each. A write completes (and is journalled) before it is
//! acknowledged, so a write that depends on another one — issued after the
//! other's acknowledgement, on any member — is journalled after it. The
//! markers therefore cut the members' histories at one consistent instant:
//! every member's batch ends at the same point, and the secondary applies
//! a point only once every member holds it (`secondary::group`).
//!
//! A point is taken only when every member is ready for one (streaming, no
//! commit in flight, no resync scan running), so no member meets a marker
//! it cannot commit. A member that is disconnected or resyncing holds the
//! whole group back: the group's consistent point moves only when all
//! members can move together.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::journal::{Marker, Op};
use super::link::{ReplicaLink, now_unix_ns};

/// How often the ticker checks whether a point can be taken (the group's
/// equivalent of a lone volume's commit interval).
const TICK: Duration = Duration::from_millis(20);
/// An idle group still takes a point this often, so its consistent-at
/// time keeps up with the clock.
const IDLE_POINT: Duration = Duration::from_secs(1);

/// The members of one group, in name order (the order their journals are
/// locked in).
pub(crate) type Members = Arc<Mutex<Vec<Arc<ReplicaLink>>>>;

/// Takes the group's points until `stop` is cancelled.
pub(crate) async fn run(name: String, members: Members, stop: CancellationToken) {
    let mut last_point = 0i64;
    let mut last_at = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            () = stop.cancelled() => return,
        }
        let links = members.lock().expect("group members lock poisoned").clone();
        if links.is_empty() || !links.iter().all(|l| l.group_ready.load(Ordering::SeqCst)) {
            continue;
        }
        let wanted = links
            .iter()
            .any(|l| l.group_batch_open.load(Ordering::SeqCst))
            || last_at.elapsed() >= IDLE_POINT;
        if !wanted {
            continue;
        }
        match take_point(&links, last_point) {
            Ok(point) => {
                last_point = point;
                last_at = Instant::now();
            }
            Err(e) => tracing::warn!(group = %name, error = %e, "cannot take a group point"),
        }
    }
}

/// Records one point in every member's journal; returns its name.
fn take_point(links: &[Arc<ReplicaLink>], last_point: i64) -> Result<i64, String> {
    // Checkpoints first: each clears only blocks whose writes completed
    // before it was taken, so before the marker.
    let mut checkpoints = Vec::with_capacity(links.len());
    for link in links {
        let tracker = link
            .volume
            .tracker()
            .ok_or_else(|| format!("volume {} has no change tracking", link.config().volume))?;
        let cp = tracker
            .consumer_checkpoint(&link.consumer())
            .map_err(|e| format!("checkpoint of {}: {e}", link.config().volume))?;
        checkpoints.push(cp.id);
    }
    let group_size = links.len() as u32;
    let point;
    {
        let mut journals: Vec<_> = links.iter().map(|l| l.journal()).collect();
        // Read the clock with every journal held: a write journalled between
        // the clock read and the markers would land inside the point with a
        // time after it.
        point = now_unix_ns().max(last_point + 1);
        for (journal, checkpoint) in journals.iter_mut().zip(checkpoints) {
            journal.record(
                Op::Marker(Marker {
                    point,
                    group_size,
                    checkpoint,
                }),
                false,
                false,
            );
        }
    }
    for link in links {
        link.group_ready.store(false, Ordering::SeqCst);
        link.wake.notify_one();
    }
    Ok(point)
}
