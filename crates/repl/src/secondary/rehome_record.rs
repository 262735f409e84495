//! The secondary's two peer calls of forced re-homing (issue 14):
//! `AnnounceMark` from its primary (record a common mark, `marks.rs`) and
//! `GetRehomeRecord` from a force-promoted sibling target (follow it from
//! now on and tell it what this copy holds).

use std::sync::atomic::Ordering;

use ember_proto::repl::v1 as pb;
use tonic::Status;

use super::SecondarySet;
use super::marks::{Sibling, runs_to_proto};
use crate::fencing;

/// Whether a secondary at generation `ours` follows a force-promoted
/// sibling at `theirs`: only at a strictly newer generation, or at the
/// same one when it already follows that site (`same_primary`: a retried
/// call). An equal generation from another site is a second promotion of
/// the same moment elsewhere, which must not win silently.
pub(crate) fn follows_promoted(theirs: u64, ours: u64, same_primary: bool) -> bool {
    theirs > ours || (theirs == ours && same_primary)
}

impl SecondarySet {
    /// `AnnounceMark`: the primary this copy follows (at this generation)
    /// says every target applied through `mark_unix_ns`.
    ///
    /// # Errors
    /// Not a secondary here; another primary or generation; persisting.
    pub(crate) async fn announce_mark(
        &self,
        req: pb::AnnounceMarkRequest,
    ) -> Result<pb::AnnounceMarkResponse, Status> {
        let sv = self
            .get(&req.volume)
            .ok_or_else(|| Status::not_found(format!("no secondary named {}", req.volume)))?;
        let rec = sv.record();
        if rec.primary_backend_id != req.primary_backend_id || rec.generation != req.generation {
            return Err(Status::failed_precondition(format!(
                "volume {} follows {} at generation {}, not backend {} at {}",
                req.volume,
                rec.primary_site,
                rec.generation,
                req.primary_backend_id,
                req.generation
            )));
        }
        // No frame is applied meanwhile: the new slot starts exactly at
        // the consistent point read here (see `marks.rs`).
        let siblings: Vec<Sibling> = req.targets.iter().map(Sibling::from_proto).collect();
        let marks = sv.marks.clone();
        if req.mark_unix_ns <= 0 {
            // Only the list of targets (a target mid-sync holds marks back).
            tokio::task::spawn_blocking(move || marks.set_siblings(siblings))
                .await
                .map_err(|e| Status::internal(format!("marks task: {e}")))??;
            return Ok(pb::AnnounceMarkResponse { held: false });
        }
        let _frame = sv.apply_lock.lock().await;
        let rec = sv.record();
        if !rec.consistent {
            return Ok(pb::AnnounceMarkResponse { held: false });
        }
        let held = tokio::task::spawn_blocking(move || {
            marks.hold(req.mark_unix_ns, rec.consistent_at_unix_ns, siblings)
        })
        .await
        .map_err(|e| Status::internal(format!("marks task: {e}")))??;
        Ok(pb::AnnounceMarkResponse { held })
    }

    /// `GetRehomeRecord`: a sibling target was force-promoted. At a
    /// strictly newer generation (or the same one from the primary this
    /// copy already follows: a retry), stops the old primary's stream,
    /// follows the caller (persisted before answering: the old primary is
    /// fenced from here on) and returns the record the caller's plan needs.
    ///
    /// # Errors
    /// Not a secondary here; a stale or equal generation (stale-generation);
    /// persisting.
    pub(crate) async fn rehome_record(
        &self,
        req: pb::GetRehomeRecordRequest,
    ) -> Result<pb::GetRehomeRecordResponse, Status> {
        let sv = self
            .get(&req.volume)
            .ok_or_else(|| Status::not_found(format!("no secondary named {}", req.volume)))?;
        let rec = sv.record();
        if !follows_promoted(
            req.generation,
            rec.generation,
            rec.primary_backend_id == req.new_primary_backend_id,
        ) {
            return Err(fencing::stale_generation(
                &req.volume,
                req.generation,
                rec.generation,
            ));
        }
        // The old primary's stream ends at its next frame; the frame in
        // hand finishes first, and batches acknowledged meanwhile are
        // applied, so the record below is what the image holds.
        sv.session.fetch_add(1, Ordering::SeqCst);
        let _frame = sv.apply_lock.lock().await;
        super::apply::settle(&sv).await?;
        let before = sv.record();
        sv.update(|r| {
            r.primary_site.clone_from(&req.new_primary_site);
            r.primary_backend_id.clone_from(&req.new_primary_backend_id);
            r.generation = req.generation;
        })?;
        let ring = sv.marks.snapshot();
        tracing::info!(
            volume = %req.volume,
            from = %before.primary_site,
            to = %req.new_primary_site,
            generation = req.generation,
            marks = ring.marks.len(),
            "forced re-homing: following the promoted target"
        );
        let retry = before.generation == req.generation;
        let (primary_site, generation) = if retry {
            // Already moved: report the old primary as the new one's
            // records say it (the plan only needs the generation order).
            (before.primary_site, before.generation.saturating_sub(1))
        } else {
            (before.primary_site, before.generation)
        };
        Ok(pb::GetRehomeRecordResponse {
            primary_site,
            generation,
            consistent: before.consistent,
            consistent_at_unix_ns: before.consistent_at_unix_ns,
            block_bytes: ring.block_bytes,
            marks: ring
                .held()
                .iter()
                .map(|h| pb::HeldMark {
                    id: h.id,
                    blocks: runs_to_proto(&h.after),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secondary_follows_a_promoted_sibling_only_at_a_newer_generation() {
        let rows = [
            ("newer", 3, 2, false, true),
            ("newer, already its primary", 3, 2, true, true),
            ("equal from another site", 2, 2, false, false),
            ("equal from its primary: a retry", 2, 2, true, true),
            ("older", 1, 2, false, false),
            ("older from its primary", 1, 2, true, false),
        ];
        for (name, theirs, ours, same, want) in rows {
            assert_eq!(follows_promoted(theirs, ours, same), want, "{name}");
        }
    }
}
