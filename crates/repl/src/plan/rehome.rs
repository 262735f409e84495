//! Who resends what to whom after a target of a volume is promoted, when
//! the volume has several targets (issue 14).
//!
//! The inputs are one [`SiteRecord`] per site holding the volume: its role,
//! fencing generation, the replication points it holds (announced by the
//! primary in its stream: "every target holds this point") with the blocks
//! it changed after each, whether its history is the volume's, whether its
//! image is consistent and which peers it acknowledged writes without.
//! The output is a [`Plan`]: the promotion (new generation, recovery
//! point) and one [`Action`] per other site, or a [`Refusal`] that names
//! the reason. No I/O, no clock: the executors (`manager/roles.rs`, the
//! session) only carry a plan out, and every situation is a table row in
//! `rehome/tests.rs` first.
//!
//! The rule that makes re-homing cheap: two sites that both hold point `p`
//! held the same image at `p`; since then each changed only the blocks in
//! its own change set after `p`. So the blocks that may differ between
//! them are the union of the two sets, and nothing else needs to travel
//! (the executor still compares those blocks by blake3 before sending).
//! Whenever that argument breaks (unrelated histories, no common point, an
//! image torn by a half-finished resync) the plan says `FullCopy` with the
//! reason: a blake3 comparison of the whole volume, never a silent guess.

// `manager/rehome.rs` executes planned switchovers with it; the forced and
// reconcile situations are only in the table tests so far.
#![cfg_attr(not(test), allow(dead_code))]

use super::points::Blocks;

/// What a site is for the volume now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Serves writes (or did until it was cut off: an old primary).
    Primary,
    /// Receives the stream of a primary.
    Secondary,
}

/// A replication point a site holds, with the blocks it changed after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeldPoint {
    /// The point's id: the primary-clock time it represents (unix ns),
    /// unique per volume across failovers because every primary announces
    /// points on a clock that only moves forward past the last one.
    pub(crate) id: i64,
    /// Blocks this site changed (applied, or wrote as primary) after this
    /// point and before its next held point (newest point: up to now).
    pub(crate) after: Blocks,
}

/// One site's record of the volume, as its agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SiteRecord {
    /// Site name.
    pub(crate) site: String,
    /// Primary or secondary.
    pub(crate) role: Role,
    /// Fencing generation (bumped by every promotion).
    pub(crate) generation: u64,
    /// The volume's lineage: the id its first primary gave it. Sites with
    /// different lineages hold unrelated histories (a re-created volume of
    /// the same name), so no change set relates them.
    pub(crate) lineage: u64,
    /// Points held, oldest first.
    pub(crate) points: Vec<HeldPoint>,
    /// Primary-clock time of the newest image it holds whole (unix ns; 0 =
    /// none): what a forced promotion of it comes up on.
    pub(crate) applied_at: i64,
    /// Its image is whole (no initial sync or resync half done).
    pub(crate) consistent: bool,
    /// A primary: the peers it acknowledged writes without (a sync target
    /// was disconnected, or any target while the write was not shipped).
    /// Per peer, because split-brain is a property of a pair.
    pub(crate) wrote_without: Vec<String>,
    /// The planner's caller reached it just now.
    pub(crate) reachable: bool,
}

impl SiteRecord {
    /// Blocks changed since held point `id` (`None`: the point is not held).
    fn since(&self, id: i64) -> Option<Blocks> {
        let from = self.points.iter().position(|p| p.id == id)?;
        let mut out = Blocks::default();
        for p in &self.points[from..] {
            out.union(&p.after);
        }
        Some(out)
    }

    /// The newest point both sites hold.
    fn common_point(&self, other: &SiteRecord) -> Option<i64> {
        self.points
            .iter()
            .rev()
            .map(|p| p.id)
            .find(|id| other.points.iter().any(|q| q.id == *id))
    }
}

/// How the promotion is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The current primary is reachable and drains first: zero loss.
    Planned,
    /// The current primary is not asked: the target comes up on its
    /// newest whole image.
    Forced,
    /// The named site already is the primary; a site came back (or a
    /// re-homing failed) and the plan is made again for the others.
    Reconcile,
}

/// What an admin (or the Cinder driver) asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    /// The site to promote (or, for [`Kind::Reconcile`], the primary).
    pub(crate) site: String,
    /// Planned, forced or reconcile.
    pub(crate) kind: Kind,
    /// Forced: promote even though another reachable target holds a newer
    /// image (its newer writes are then discarded by the re-homing).
    pub(crate) accept_older: bool,
}

/// The promotion a plan starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Promote {
    /// The new primary.
    pub(crate) site: String,
    /// Its new generation: one past every generation any site holds.
    pub(crate) generation: u64,
    /// Forced: the image it comes up on (primary clock, unix ns); writes
    /// after it are lost. `None` for a planned promotion.
    pub(crate) recovery_point: Option<i64>,
}

/// Why a site gets a full copy (a blake3 comparison of the whole volume)
/// instead of a change-set resend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FullReason {
    /// Its history is not the volume's (another lineage).
    Unrelated,
    /// It was mid-resync: blocks the dead primary still owed it are in no
    /// surviving change set.
    Inconsistent,
    /// It and the new primary hold no common point.
    NoCommonPoint,
}

/// What happens to one site other than the new primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// The site becomes (or stays) a target of `new_primary`, which
    /// resends these change-set blocks (compared by blake3 first).
    Rehome {
        /// The target.
        target: String,
        /// Its new primary.
        new_primary: String,
        /// Blocks that may differ: the union of both sites' sets since
        /// their newest common point.
        resend: Blocks,
        /// That common point.
        since: i64,
    },
    /// The site becomes a target of `new_primary` through a full copy.
    FullCopy {
        /// The target.
        target: String,
        /// Its new primary.
        new_primary: String,
        /// Why a change set is not enough.
        reason: FullReason,
    },
    /// An old primary: fenced (refuses writes from now on), then handled
    /// as `then` says (always a `Rehome` or a `FullCopy`).
    Fence {
        /// The old primary.
        site: String,
        /// What it becomes.
        then: Box<Action>,
    },
    /// Split-brain between this site and the new primary: both took
    /// writes the other lacks. The pair is refused until an admin names
    /// the loser; the other sites are not affected.
    SplitBrain {
        /// The site.
        site: String,
        /// The new primary.
        with: String,
    },
    /// Not reachable now: planned again ([`Kind::Reconcile`]) when it
    /// comes back; its newer generation fences it then.
    Deferred {
        /// The site.
        site: String,
    },
}

/// Why the promotion itself is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No record names that site.
    UnknownSite(String),
    /// Promote: the site already is the primary. Reconcile: it is not.
    WrongRole(String),
    /// Its image is torn (mid initial sync or resync).
    Inconsistent(String),
    /// Another site holds a newer generation: a promotion happened that
    /// this caller did not see.
    StaleGeneration {
        /// The site with the newer generation.
        site: String,
        /// Its generation.
        generation: u64,
    },
    /// Planned: the current primary cannot be reached to drain.
    PrimaryUnreachable(String),
    /// Planned: no site is the current primary (use a forced promotion).
    NoPrimary,
    /// Forced: a reachable whole target holds a newer image; promote it
    /// instead, or accept the loss.
    NewerTarget {
        /// That target.
        site: String,
        /// Its image's time.
        applied_at: i64,
    },
    /// Two sites are primaries at the newest generation: split-brain
    /// between them, which an admin resolves first.
    SplitBrain(String, String),
}

/// A promotion and what every other site does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The promotion (`None` for [`Kind::Reconcile`]).
    pub(crate) promote: Option<Promote>,
    /// One action per other site, in the records' order.
    pub(crate) actions: Vec<Action>,
}

/// Plans the promotion `req` over `sites` (every site holding the volume).
///
/// # Errors
/// A [`Refusal`] when the promotion must not happen at all; per-pair
/// problems (split-brain with one old primary) are actions, not refusals.
pub(crate) fn plan(req: &Request, sites: &[SiteRecord]) -> Result<Plan, Refusal> {
    let me = sites
        .iter()
        .find(|s| s.site == req.site)
        .ok_or_else(|| Refusal::UnknownSite(req.site.clone()))?;
    let newest = sites.iter().map(|s| s.generation).max().unwrap_or(0);
    if let Some(s) = sites.iter().find(|s| s.generation > me.generation) {
        return Err(Refusal::StaleGeneration {
            site: s.site.clone(),
            generation: s.generation,
        });
    }
    // Two primaries at the newest generation both served writes under it.
    let primaries: Vec<&SiteRecord> = sites
        .iter()
        .filter(|s| s.role == Role::Primary && s.generation == newest)
        .collect();
    if let [a, b, ..] = primaries.as_slice() {
        return Err(Refusal::SplitBrain(a.site.clone(), b.site.clone()));
    }
    let promote = match req.kind {
        Kind::Reconcile => {
            if me.role != Role::Primary {
                return Err(Refusal::WrongRole(me.site.clone()));
            }
            None
        }
        Kind::Planned | Kind::Forced => {
            if me.role == Role::Primary {
                return Err(Refusal::WrongRole(me.site.clone()));
            }
            if !me.consistent {
                return Err(Refusal::Inconsistent(me.site.clone()));
            }
            if req.kind == Kind::Planned {
                let current = primaries.first().ok_or(Refusal::NoPrimary)?;
                if !current.reachable {
                    return Err(Refusal::PrimaryUnreachable(current.site.clone()));
                }
            } else if !req.accept_older
                && let Some(newer) = sites.iter().find(|s| {
                    s.role == Role::Secondary
                        && s.reachable
                        && s.consistent
                        && s.lineage == me.lineage
                        && s.applied_at > me.applied_at
                })
            {
                return Err(Refusal::NewerTarget {
                    site: newer.site.clone(),
                    applied_at: newer.applied_at,
                });
            }
            Some(Promote {
                site: me.site.clone(),
                generation: newest + 1,
                recovery_point: (req.kind == Kind::Forced).then_some(me.applied_at),
            })
        }
    };
    let actions = sites
        .iter()
        .filter(|s| s.site != me.site)
        .map(|s| action_for(req.kind, me, s))
        .collect();
    Ok(Plan { promote, actions })
}

/// What `other` does under the new primary `me`.
fn action_for(kind: Kind, me: &SiteRecord, other: &SiteRecord) -> Action {
    if !other.reachable {
        return Action::Deferred {
            site: other.site.clone(),
        };
    }
    if other.role == Role::Primary {
        // A planned switchover's old primary drained to lag 0 first: the
        // sets still bound what may differ (normally nothing). Otherwise
        // it acknowledged writes the new primary lacks only if it wrote
        // without it: that pair is split-brain; the drained or merely
        // lagging case is a forced promotion's accepted loss, undone by
        // resending the old primary's set from the new primary.
        if kind != Kind::Planned && other.wrote_without.contains(&me.site) {
            return Action::SplitBrain {
                site: other.site.clone(),
                with: me.site.clone(),
            };
        }
        return Action::Fence {
            site: other.site.clone(),
            then: Box::new(target_of(me, other)),
        };
    }
    target_of(me, other)
}

/// `other` as a target of `me`: a change-set resend when the histories
/// meet at a common point, a full copy otherwise.
fn target_of(me: &SiteRecord, other: &SiteRecord) -> Action {
    let full = |reason| Action::FullCopy {
        target: other.site.clone(),
        new_primary: me.site.clone(),
        reason,
    };
    if other.lineage != me.lineage {
        return full(FullReason::Unrelated);
    }
    if !other.consistent {
        return full(FullReason::Inconsistent);
    }
    let Some(p) = me.common_point(other) else {
        return full(FullReason::NoCommonPoint);
    };
    let (Some(mut resend), Some(theirs)) = (me.since(p), other.since(p)) else {
        // common_point returned a point both hold.
        return full(FullReason::NoCommonPoint);
    };
    resend.union(&theirs);
    Action::Rehome {
        target: other.site.clone(),
        new_primary: me.site.clone(),
        resend,
        since: p,
    }
}

#[cfg(test)]
mod tests;
