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
//!
//! A group with several targets (issue 14) takes its points per target:
//! each target's secondary site commits its own group points, so the
//! members' links to one target are cut together, apart from the other
//! targets' (a slow far site must not hold back the metro one). A sync
//! target takes no points at all: its members hold every acknowledged
//! write (see [`takes_points`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::journal::{Marker, Op};
use super::link::{Mode, ReplicaConfig, ReplicaLink, now_unix_ns};

/// How often the ticker checks whether a point can be taken (the group's
/// equivalent of a lone volume's commit interval).
const TICK: Duration = Duration::from_millis(20);
/// An idle group still takes a point this often, so its consistent-at
/// time keeps up with the clock.
const IDLE_POINT: Duration = Duration::from_secs(1);

/// The member links of one group, every target's, in member name order
/// (the order their journals are locked in).
pub(crate) type Members = Arc<Mutex<Vec<Arc<ReplicaLink>>>>;

/// Whether a member's link to its target ends its batches only at group
/// points. An async link does. A sync link does not: its target holds
/// every acknowledged write of every member (the groups' rules make such
/// a link hold writes while its target is away: `manager/groups.rs`), so
/// any moment is a group point there, and a batch waiting for the other
/// members would only hold the writers back.
pub(crate) fn takes_points(cfg: &ReplicaConfig) -> bool {
    cfg.group.is_some() && cfg.mode == Mode::Async
}

/// `links` by target site, only the links that take group points; sorted
/// by site (each list keeps the members' order).
///
/// A target takes points only once every member replicates to it: a
/// point some members' links to it lack would let its site commit the
/// group at a point those members never reached (a target being added, or
/// re-homed member by member after a forced promotion).
fn by_target(links: &[Arc<ReplicaLink>]) -> Vec<(String, Vec<Arc<ReplicaLink>>)> {
    let mut volumes: Vec<String> = links.iter().map(|l| l.config().volume).collect();
    volumes.sort();
    volumes.dedup();
    let mut out: Vec<(String, Vec<Arc<ReplicaLink>>)> = Vec::new();
    for l in links {
        let cfg = l.config();
        if !takes_points(&cfg) {
            continue;
        }
        match out.iter_mut().find(|(p, _)| *p == cfg.peer) {
            Some((_, v)) => v.push(l.clone()),
            None => out.push((cfg.peer, vec![l.clone()])),
        }
    }
    out.retain(|(_, v)| v.len() == volumes.len());
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Takes the group's points, per target, until `stop` is cancelled.
pub(crate) async fn run(name: String, members: Members, stop: CancellationToken) {
    // Per target: the last point's name and when it was taken.
    let mut last: HashMap<String, (i64, Instant)> = HashMap::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            () = stop.cancelled() => return,
        }
        let all = members.lock().expect("group members lock poisoned").clone();
        for (peer, links) in by_target(&all) {
            if !links.iter().all(|l| l.group_ready.load(Ordering::SeqCst)) {
                continue;
            }
            let (last_point, last_at) = last.get(&peer).copied().unwrap_or_else(|| {
                (
                    0,
                    Instant::now()
                        .checked_sub(IDLE_POINT)
                        .unwrap_or_else(Instant::now),
                )
            });
            let wanted = links
                .iter()
                .any(|l| l.group_batch_open.load(Ordering::SeqCst))
                || last_at.elapsed() >= IDLE_POINT;
            if !wanted {
                continue;
            }
            match take_point(&links, last_point) {
                Ok(point) => {
                    last.insert(peer, (point, Instant::now()));
                }
                Err(e) => {
                    tracing::warn!(group = %name, peer, error = %e, "cannot take a group point");
                }
            }
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
