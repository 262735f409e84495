//! Online verify and pause/resume, for one target of a volume or for all
//! of them (issue 14: a volume with several targets is verified and
//! paused per pair, because each pair has its own change set and stream).
//!
//! `peer = None` means every target, first target first. Naming a peer the
//! volume does not replicate to is NOT_FOUND with the volume's targets, so
//! a typo never silently acts on nothing.

use std::sync::Arc;

use ember_common::Extent;
use ember_proto::repl::v1 as pb;
use tokio_util::sync::CancellationToken;

use super::{Mismatch, Replication, Running, VERIFY_BLOCK, VerifyReport, consumer_name, internal};
use crate::error::{ReplError, Result};
use crate::hashes;
use crate::primary::link::ReplicaLink;
use crate::primary::session;

impl Replication {
    /// The links of `volume`'s targets that `peer` names (`None`: all,
    /// first target first).
    ///
    /// # Errors
    /// NOT_FOUND: not a primary replica here, or no target at `peer`.
    pub(super) fn chosen_links(
        &self,
        volume: &str,
        peer: Option<&str>,
    ) -> Result<Vec<Arc<ReplicaLink>>> {
        let first = self.link(volume).ok_or_else(|| {
            ReplError::NotFound(format!("volume {volume} is not a primary replica here"))
        })?;
        let all: Vec<Arc<ReplicaLink>> = std::iter::once(first)
            .chain(self.extra_links(volume))
            .collect();
        let Some(peer) = peer else {
            return Ok(all);
        };
        let peers: Vec<String> = all.iter().map(|l| l.config().peer).collect();
        match all.into_iter().find(|l| l.config().peer == peer) {
            Some(link) => Ok(vec![link]),
            None => Err(ReplError::NotFound(format!(
                "volume {volume} does not replicate to {peer} (its targets: {})",
                peers.join(", ")
            ))),
        }
    }

    /// Runs `f` on the running entry of `volume`'s target at `peer` (first
    /// or further), under the lock that holds it.
    fn with_target<R>(
        &self,
        volume: &str,
        peer: &str,
        f: impl FnOnce(&mut Running) -> R,
    ) -> Option<R> {
        {
            let mut running = self.running.lock().expect("running lock poisoned");
            if let Some(r) = running.get_mut(volume)
                && r.link.config().peer == peer
            {
                return Some(f(r));
            }
        }
        let mut extra = self.extra.lock().expect("extra lock poisoned");
        extra
            .get_mut(volume)?
            .iter_mut()
            .find(|r| r.link.config().peer == peer)
            .map(f)
    }

    /// Stops the session of one target (it stays registered and its hook
    /// keeps tracking writes) and waits for it to end.
    pub(super) async fn stop_session(&self, volume: &str, peer: &str) {
        let taken = self.with_target(volume, peer, |r| {
            let old = std::mem::replace(&mut r.stop, CancellationToken::new());
            (old, r.task.take())
        });
        let Some((stop, task)) = taken else {
            return;
        };
        stop.cancel();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Starts the session of one target again (it begins with a catch-up
    /// of its whole change set).
    pub(super) fn start_session(&self, volume: &str, link: &Arc<ReplicaLink>) {
        let peer = link.config().peer;
        let buckets = self.buckets(&peer);
        let ctx = self.ctx.clone();
        self.with_target(volume, &peer, |r| {
            if r.task.is_none() {
                r.task = Some(tokio::spawn(session::run(
                    r.link.clone(),
                    ctx,
                    buckets,
                    r.stop.clone(),
                )));
            }
        });
    }

    /// Compares the primary with each chosen target by blake3 per 1 MiB
    /// and lists ranges that differ although no write to them is pending;
    /// with `resync`, queues them for that target. One report per target.
    ///
    /// # Errors
    /// Not replicated here, no such target, a target unreachable, reads.
    pub async fn verify(
        &self,
        volume: &str,
        peer: Option<&str>,
        resync: bool,
    ) -> Result<Vec<VerifyReport>> {
        let mut reports = Vec::new();
        for link in self.chosen_links(volume, peer)? {
            let mut report = verify_target(self, &link).await?;
            let peer = report.peer.clone();
            if resync && !report.mismatches.is_empty() {
                let extents: Vec<Extent> = report
                    .mismatches
                    .iter()
                    .map(|m| Extent {
                        offset: m.offset,
                        length: m.length,
                    })
                    .collect();
                link.volume
                    .tracker()
                    .expect("replicated volumes track")
                    .consumer_mark(&consumer_name(&peer), &extents)
                    .map_err(|e| internal("queue the resync", e))?;
                // A new session starts with a catch-up of the whole
                // change set, which now holds the mismatches.
                if link.config().paused {
                    // Sent on resume.
                } else if self
                    .extra_links(volume)
                    .iter()
                    .any(|l| Arc::ptr_eq(l, &link))
                {
                    self.stop_session(volume, &peer).await;
                    link.journal().release_waiters();
                    self.start_session(volume, &link);
                } else {
                    self.restart(volume);
                }
                report.resync_queued = true;
            }
            reports.push(report);
        }
        Ok(reports)
    }

    /// Pauses (`true`) or resumes shipping to the chosen targets. While
    /// paused every write is tracked in that target's change set; resuming
    /// sends exactly those blocks in one atomic catch-up batch. Returns
    /// whether any target's state changed.
    ///
    /// # Errors
    /// Not a primary replica here, no such target; persisting the config.
    pub async fn set_paused(&self, volume: &str, peer: Option<&str>, paused: bool) -> Result<bool> {
        let mut changed = false;
        for link in self.chosen_links(volume, peer)? {
            let config = link.config();
            if config.paused == paused {
                continue;
            }
            link.update(|c| c.paused = paused)
                .map_err(|e| internal("persist replica config", e))?;
            if paused {
                self.stop_session(volume, &config.peer).await;
                tracing::info!(volume, peer = %config.peer, "replication paused by an admin; writes are tracked");
            } else {
                self.start_session(volume, &link);
                tracing::info!(volume, peer = %config.peer, "replication resumed");
            }
            changed = true;
        }
        Ok(changed)
    }
}

/// Compares the primary's image with one target's, 1 MiB blocks at a time.
async fn verify_target(repl: &Replication, link: &ReplicaLink) -> Result<VerifyReport> {
    let cfg = link.config();
    let volume = cfg.volume.as_str();
    let (mut client, _, _) = repl.ctx.registry.stream_client(&cfg.peer).await?;
    let vol = link.volume.clone();
    let tracker = vol.tracker().cloned().expect("replicated volumes track");
    let size = ember_nbd::Export::size(vol.as_ref());
    let per_call = (hashes::MAX_BYTES / VERIFY_BLOCK) as u32;
    let mut report = VerifyReport {
        peer: cfg.peer.clone(),
        compared_bytes: 0,
        mismatches: Vec::new(),
        pending_bytes: 0,
        resync_queued: false,
    };
    let mut offset = 0;
    while offset < size {
        let chunks = ((size - offset).div_ceil(VERIFY_BLOCK) as u32).min(per_call);
        let theirs = client
            .read_hashes(pb::ReadHashesRequest {
                volume: volume.to_owned(),
                offset,
                chunk_bytes: VERIFY_BLOCK,
                chunks,
            })
            .await
            .map_err(|status| ReplError::Refused {
                site: cfg.peer.clone(),
                call: "ReadHashes",
                status,
            })?
            .into_inner()
            .blake3;
        let mine = hashes::chunk_hashes(&vol, offset, VERIFY_BLOCK, chunks)
            .await
            .map_err(|e| internal("hash the primary", e))?;
        for (i, h) in mine.iter().enumerate() {
            let start = offset + i as u64 * VERIFY_BLOCK;
            let len = (size - start).min(VERIFY_BLOCK);
            report.compared_bytes += len;
            if theirs.get(i).map(Vec::as_slice) == Some(h.as_slice()) {
                continue;
            }
            // Differences under pending writes are lag, not corruption.
            let dirty = tracker
                .consumer_any_dirty(&consumer_name(&cfg.peer), start, len)
                .unwrap_or(true);
            if dirty {
                report.pending_bytes += len;
                continue;
            }
            match report.mismatches.last_mut() {
                Some(m) if m.offset + m.length == start => m.length += len,
                _ => report.mismatches.push(Mismatch {
                    offset: start,
                    length: len,
                }),
            }
        }
        offset += u64::from(chunks) * VERIFY_BLOCK;
    }
    tracing::info!(
        volume,
        peer = %cfg.peer,
        compared = report.compared_bytes,
        mismatches = report.mismatches.len(),
        pending = report.pending_bytes,
        "online verify"
    );
    Ok(report)
}

/// Index of the report the top-level verify fields show: the target with
/// the most mismatching bytes (then the most pending), the first on ties.
pub fn worst_report(reports: &[VerifyReport]) -> Option<usize> {
    let key = |r: &VerifyReport| {
        let mismatched: u64 = r.mismatches.iter().map(|m| m.length).sum();
        (mismatched, r.pending_bytes)
    };
    let mut best: Option<usize> = None;
    for (i, r) in reports.iter().enumerate() {
        if best.is_none_or(|b| key(r) > key(&reports[b])) {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(peer: &str, mismatched: &[u64], pending: u64) -> VerifyReport {
        VerifyReport {
            peer: peer.into(),
            compared_bytes: 1 << 30,
            mismatches: mismatched
                .iter()
                .enumerate()
                .map(|(i, &length)| Mismatch {
                    offset: i as u64 * (4 << 20),
                    length,
                })
                .collect(),
            pending_bytes: pending,
            resync_queued: false,
        }
    }

    #[test]
    fn the_worst_target_is_reported_at_the_top() {
        let rows: Vec<(&str, Vec<VerifyReport>, Option<usize>)> = vec![
            ("none", vec![], None),
            ("one clean", vec![r("b", &[], 0)], Some(0)),
            (
                "both clean: the first",
                vec![r("b", &[], 0), r("c", &[], 0)],
                Some(0),
            ),
            (
                "mismatches beat pending",
                vec![r("b", &[], 64 << 20), r("c", &[1 << 20], 0)],
                Some(1),
            ),
            (
                "more mismatching bytes, not more ranges",
                vec![r("b", &[1 << 20, 1 << 20], 0), r("c", &[8 << 20], 0)],
                Some(1),
            ),
            (
                "clean but pending beats clean",
                vec![r("b", &[], 0), r("c", &[], 1 << 20)],
                Some(1),
            ),
            (
                "ties: the first",
                vec![r("b", &[2 << 20], 0), r("c", &[2 << 20], 0)],
                Some(0),
            ),
        ];
        for (name, reports, want) in rows {
            assert_eq!(worst_report(&reports), want, "{name}");
        }
    }
}
