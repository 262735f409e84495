//! Table tests of the re-homing plan: one row per situation.

use super::*;

const LINEAGE: u64 = 7;

fn blocks(runs: &[(u64, u64)]) -> Blocks {
    let mut b = Blocks::default();
    for &(s, e) in runs {
        b.insert(s, e);
    }
    b
}

/// A site record: `points` are (id, blocks changed after it).
fn rec(site: &str, role: Role, generation: u64, points: &[(i64, &[(u64, u64)])]) -> SiteRecord {
    SiteRecord {
        site: site.into(),
        role,
        generation,
        lineage: LINEAGE,
        points: points
            .iter()
            .map(|&(id, after)| HeldPoint {
                id,
                after: blocks(after),
            })
            .collect(),
        applied_at: points.last().map_or(0, |p| p.0),
        consistent: true,
        wrote_without: Vec::new(),
        reachable: true,
    }
}

fn primary(site: &str, generation: u64, points: &[(i64, &[(u64, u64)])]) -> SiteRecord {
    rec(site, Role::Primary, generation, points)
}

fn secondary(site: &str, generation: u64, points: &[(i64, &[(u64, u64)])]) -> SiteRecord {
    rec(site, Role::Secondary, generation, points)
}

fn applied(mut r: SiteRecord, at: i64) -> SiteRecord {
    r.applied_at = at;
    r
}

fn down(mut r: SiteRecord) -> SiteRecord {
    r.reachable = false;
    r
}

fn torn(mut r: SiteRecord) -> SiteRecord {
    r.consistent = false;
    r
}

fn wrote_without(mut r: SiteRecord, peers: &[&str]) -> SiteRecord {
    r.wrote_without = peers.iter().map(|p| (*p).to_owned()).collect();
    r
}

fn other_lineage(mut r: SiteRecord) -> SiteRecord {
    r.lineage = LINEAGE + 1;
    r
}

fn req(site: &str, kind: Kind) -> Request {
    Request {
        site: site.into(),
        kind,
        accept_older: false,
    }
}

fn promote(site: &str, generation: u64, recovery_point: Option<i64>) -> Option<Promote> {
    Some(Promote {
        site: site.into(),
        generation,
        recovery_point,
    })
}

fn rehome(target: &str, new_primary: &str, since: i64, resend: &[(u64, u64)]) -> Action {
    Action::Rehome {
        target: target.into(),
        new_primary: new_primary.into(),
        resend: blocks(resend),
        since,
    }
}

fn full(target: &str, new_primary: &str, reason: FullReason) -> Action {
    Action::FullCopy {
        target: target.into(),
        new_primary: new_primary.into(),
        reason,
    }
}

fn fence(site: &str, then: Action) -> Action {
    Action::Fence {
        site: site.into(),
        then: Box::new(then),
    }
}

fn deferred(site: &str) -> Action {
    Action::Deferred { site: site.into() }
}

fn split(site: &str, with: &str) -> Action {
    Action::SplitBrain {
        site: site.into(),
        with: with.into(),
    }
}

type Row = (
    &'static str,
    Request,
    Vec<SiteRecord>,
    Result<Plan, Refusal>,
);

fn ok(promote: Option<Promote>, actions: Vec<Action>) -> Result<Plan, Refusal> {
    Ok(Plan { promote, actions })
}

/// A primary `a` at generation 1 with a sync target `b` and an async
/// target `c`; every site holds point 100. `a` wrote blocks 0..4 since,
/// `b` applied 0..3 of them, `c` (lagging) 0..1.
fn three_sites() -> Vec<SiteRecord> {
    vec![
        primary("a", 1, &[(100, &[(0, 4)])]),
        applied(secondary("b", 1, &[(100, &[(0, 3)])]), 130),
        applied(secondary("c", 1, &[(100, &[(0, 1)])]), 110),
    ]
}

#[test]
fn rehome_plans_table() {
    let rows: Vec<Row> = vec![
        (
            "planned promotion of the sync target: the drained old primary \
             and the async target re-home by change set",
            req("b", Kind::Planned),
            three_sites(),
            ok(
                promote("b", 2, None),
                vec![
                    fence("a", rehome("a", "b", 100, &[(0, 4)])),
                    rehome("c", "b", 100, &[(0, 3)]),
                ],
            ),
        ),
        (
            "forced promotion of the sync target, primary dead: it is fenced \
             when it returns; the async target re-homes now",
            req("b", Kind::Forced),
            vec![
                down(primary("a", 1, &[(100, &[(0, 4)])])),
                applied(secondary("b", 1, &[(100, &[(0, 3)])]), 130),
                applied(secondary("c", 1, &[(100, &[(8, 9)])]), 110),
            ],
            ok(
                promote("b", 2, Some(130)),
                vec![deferred("a"), rehome("c", "b", 100, &[(0, 3), (8, 9)])],
            ),
        ),
        (
            "forced promotion of the async target while the sync target is \
             down too: recovery point is the async image",
            req("c", Kind::Forced),
            vec![
                down(primary("a", 1, &[(100, &[(0, 4)])])),
                down(applied(secondary("b", 1, &[(100, &[(0, 3)])]), 130)),
                applied(secondary("c", 1, &[(100, &[(0, 1)])]), 110),
            ],
            ok(
                promote("c", 2, Some(110)),
                vec![deferred("a"), deferred("b")],
            ),
        ),
        (
            "forced promotion of the async target while the reachable sync \
             target holds a newer image: refused, promote that one",
            req("c", Kind::Forced),
            vec![
                down(primary("a", 1, &[(100, &[(0, 4)])])),
                applied(secondary("b", 1, &[(100, &[(0, 3)])]), 130),
                applied(secondary("c", 1, &[(100, &[(0, 1)])]), 110),
            ],
            Err(Refusal::NewerTarget {
                site: "b".into(),
                applied_at: 130,
            }),
        ),
        (
            "the same, accepting the loss: the sync target re-homes and \
             gets its newer blocks overwritten from the union",
            Request {
                accept_older: true,
                ..req("c", Kind::Forced)
            },
            vec![
                down(primary("a", 1, &[(100, &[(0, 4)])])),
                applied(secondary("b", 1, &[(100, &[(0, 3)])]), 130),
                applied(secondary("c", 1, &[(100, &[(0, 1)])]), 110),
            ],
            ok(
                promote("c", 2, Some(110)),
                vec![deferred("a"), rehome("b", "c", 100, &[(0, 3)])],
            ),
        ),
        (
            "the old primary returns after a forced promotion, having written \
             only while connected to the new primary: fenced, then a target, \
             resend its set and the new primary's",
            req("b", Kind::Reconcile),
            vec![
                primary("a", 1, &[(100, &[(0, 4), (20, 21)])]),
                primary("b", 2, &[(100, &[(0, 3), (40, 42)])]),
                secondary("c", 2, &[(100, &[(0, 3), (40, 42)])]),
            ],
            ok(
                None,
                vec![
                    fence("a", rehome("a", "b", 100, &[(0, 4), (20, 21), (40, 42)])),
                    rehome("c", "b", 100, &[(0, 3), (40, 42)]),
                ],
            ),
        ),
        (
            "split-brain holds per pair: the old primary wrote without the \
             new primary, so that pair is refused; the third site re-homes",
            req("b", Kind::Reconcile),
            vec![
                wrote_without(primary("a", 1, &[(100, &[(0, 4)])]), &["b"]),
                primary("b", 2, &[(100, &[(40, 42)])]),
                secondary("c", 2, &[(100, &[(0, 1)])]),
            ],
            ok(
                None,
                vec![split("a", "b"), rehome("c", "b", 100, &[(0, 1), (40, 42)])],
            ),
        ),
        (
            "writing without the async target only is no split-brain with \
             the new primary",
            req("b", Kind::Reconcile),
            vec![
                wrote_without(primary("a", 1, &[(100, &[(0, 4)])]), &["c"]),
                primary("b", 2, &[(100, &[(40, 42)])]),
                secondary("c", 2, &[(100, &[])]),
            ],
            ok(
                None,
                vec![
                    fence("a", rehome("a", "b", 100, &[(0, 4), (40, 42)])),
                    rehome("c", "b", 100, &[(40, 42)]),
                ],
            ),
        ),
        (
            "a planned switchover drains first: writing without a peer earlier \
             is no split-brain",
            req("b", Kind::Planned),
            vec![
                wrote_without(primary("a", 1, &[(100, &[(0, 4)])]), &["b"]),
                secondary("b", 1, &[(100, &[(0, 4)])]),
                secondary("c", 1, &[(100, &[])]),
            ],
            ok(
                promote("b", 2, None),
                vec![
                    fence("a", rehome("a", "b", 100, &[(0, 4)])),
                    rehome("c", "b", 100, &[(0, 4)]),
                ],
            ),
        ),
        (
            "two primaries at the newest generation (two forced promotions): \
             refused before anything moves",
            req("a", Kind::Reconcile),
            vec![
                down(primary("x", 1, &[(100, &[])])),
                primary("a", 2, &[(100, &[(1, 2)])]),
                primary("b", 2, &[(100, &[(3, 4)])]),
            ],
            Err(Refusal::SplitBrain("a".into(), "b".into())),
        ),
        (
            "kill -9 of the primary while the async target is mid-resync: \
             the sync target is promoted, the half-synced one gets a full copy",
            req("b", Kind::Forced),
            vec![
                down(primary("a", 1, &[(100, &[(0, 4)])])),
                applied(secondary("b", 1, &[(100, &[(0, 3)])]), 130),
                torn(applied(secondary("c", 1, &[(100, &[(0, 1)])]), 90)),
            ],
            ok(
                promote("b", 2, Some(130)),
                vec![deferred("a"), full("c", "b", FullReason::Inconsistent)],
            ),
        ),
        (
            "the half-synced target itself is never promoted",
            Request {
                accept_older: true,
                ..req("c", Kind::Forced)
            },
            vec![
                down(primary("a", 1, &[(100, &[(0, 4)])])),
                applied(secondary("b", 1, &[(100, &[(0, 3)])]), 130),
                torn(applied(secondary("c", 1, &[(100, &[(0, 1)])]), 90)),
            ],
            Err(Refusal::Inconsistent("c".into())),
        ),
        (
            "unrelated histories (a re-created volume of the same name): \
             full copy, never a change-set resend",
            req("b", Kind::Planned),
            vec![
                primary("a", 1, &[(100, &[])]),
                secondary("b", 1, &[(100, &[])]),
                other_lineage(secondary("c", 1, &[(100, &[])])),
            ],
            ok(
                promote("b", 2, None),
                vec![
                    fence("a", rehome("a", "b", 100, &[])),
                    full("c", "b", FullReason::Unrelated),
                ],
            ),
        ),
        (
            "the newest common point is used; the newer site's set since it \
             covers every later point",
            req("b", Kind::Forced),
            vec![
                down(primary("a", 1, &[(100, &[])])),
                applied(
                    secondary("b", 1, &[(100, &[(1, 2)]), (200, &[(5, 6)])]),
                    230,
                ),
                applied(
                    secondary("c", 1, &[(50, &[(9, 10)]), (100, &[(3, 4)])]),
                    120,
                ),
            ],
            ok(
                promote("b", 2, Some(230)),
                vec![
                    deferred("a"),
                    rehome("c", "b", 100, &[(1, 2), (3, 4), (5, 6)]),
                ],
            ),
        ),
        (
            "no common point (the target's only point expired on the new \
             primary): full copy",
            req("b", Kind::Forced),
            vec![
                down(primary("a", 1, &[(100, &[])])),
                applied(secondary("b", 1, &[(200, &[(5, 6)])]), 230),
                applied(secondary("c", 1, &[(100, &[(3, 4)])]), 120),
            ],
            ok(
                promote("b", 2, Some(230)),
                vec![deferred("a"), full("c", "b", FullReason::NoCommonPoint)],
            ),
        ),
        (
            "second failover X to Y: the first failover's new primary is \
             fenced and re-homed like any old primary",
            req("c", Kind::Planned),
            vec![
                secondary("a", 2, &[(300, &[(7, 8)])]),
                primary("b", 2, &[(300, &[(7, 9)])]),
                secondary("c", 2, &[(300, &[(7, 9)])]),
            ],
            ok(
                promote("c", 3, None),
                vec![
                    rehome("a", "c", 300, &[(7, 9)]),
                    fence("b", rehome("b", "c", 300, &[(7, 9)])),
                ],
            ),
        ),
        (
            "a target that missed the first failover cannot be promoted over \
             the newer generation",
            req("c", Kind::Forced),
            vec![
                primary("b", 2, &[(300, &[])]),
                secondary("c", 1, &[(100, &[])]),
            ],
            Err(Refusal::StaleGeneration {
                site: "b".into(),
                generation: 2,
            }),
        ),
        (
            "planned promotion needs the primary to drain",
            req("b", Kind::Planned),
            vec![
                down(primary("a", 1, &[(100, &[])])),
                secondary("b", 1, &[(100, &[])]),
            ],
            Err(Refusal::PrimaryUnreachable("a".into())),
        ),
        (
            "planned promotion with no primary left",
            req("b", Kind::Planned),
            vec![
                secondary("b", 1, &[(100, &[])]),
                secondary("c", 1, &[(100, &[])]),
            ],
            Err(Refusal::NoPrimary),
        ),
        (
            "promoting the primary itself",
            req("a", Kind::Forced),
            three_sites(),
            Err(Refusal::WrongRole("a".into())),
        ),
        (
            "reconciling from a secondary",
            req("c", Kind::Reconcile),
            three_sites(),
            Err(Refusal::WrongRole("c".into())),
        ),
        (
            "an unknown site",
            req("z", Kind::Forced),
            three_sites(),
            Err(Refusal::UnknownSite("z".into())),
        ),
    ];
    for (name, request, sites, want) in rows {
        assert_eq!(plan(&request, &sites), want, "{name}");
    }
}

#[test]
fn resend_is_bounded_by_the_two_sets_only() {
    // A third site's huge set never leaks into a pair's resend: re-homing
    // cost depends on what the pair changed, not on the volume or others.
    let sites = vec![
        down(primary("a", 1, &[(100, &[(0, 10_000)])])),
        applied(secondary("b", 1, &[(100, &[(5, 6)])]), 130),
        applied(secondary("c", 1, &[(100, &[(9, 10)])]), 110),
    ];
    let got = plan(&req("b", Kind::Forced), &sites).expect("plans");
    let Action::Rehome { resend, .. } = &got.actions[1] else {
        panic!("c re-homes: {got:?}");
    };
    assert_eq!(resend.count(), 2);
}
