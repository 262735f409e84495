//! Table tests of the recovery-point decisions.

use super::*;

const S: i64 = 1_000_000_000;

fn point(name: &str, at_s: i64, kind: PointKind, after: &[(u64, u64)]) -> PointMeta {
    let mut blocks = Blocks::default();
    for &(s, e) in after {
        blocks.insert(s, e);
    }
    PointMeta {
        name: name.into(),
        at_unix_ns: at_s * S,
        kind,
        group: String::new(),
        size_bytes: 1 << 30,
        after: blocks,
    }
}

fn sched(name: &str, at_s: i64, after: &[(u64, u64)]) -> PointMeta {
    point(name, at_s, PointKind::Scheduled, after)
}

#[test]
fn blocks_merge_touching_and_overlapping_runs() {
    // (runs inserted in order, expected runs, expected "grew" of the last insert)
    type Row<'a> = (&'a [(u64, u64)], &'a [(u64, u64)], bool);
    let rows: &[Row<'_>] = &[
        (&[(0, 1)], &[(0, 1)], true),
        (&[(0, 1), (0, 1)], &[(0, 1)], false),
        (&[(0, 1), (1, 2)], &[(0, 2)], true),
        (&[(0, 1), (2, 3)], &[(0, 1), (2, 3)], true),
        (&[(0, 1), (2, 3), (1, 2)], &[(0, 3)], true),
        (&[(5, 9), (0, 2), (6, 7)], &[(0, 2), (5, 9)], false),
        (&[(5, 9), (0, 2), (1, 20)], &[(0, 20)], true),
        (&[(5, 9), (3, 3)], &[(5, 9)], false),
        (
            &[(10, 20), (30, 40), (0, 5), (19, 31)],
            &[(0, 5), (10, 40)],
            true,
        ),
    ];
    for (inserts, want, want_grew) in rows {
        let mut b = Blocks::default();
        let mut grew = false;
        for &(s, e) in *inserts {
            grew = b.insert(s, e);
        }
        assert_eq!(b.0, *want, "inserting {inserts:?}");
        assert_eq!(grew, *want_grew, "growth of the last of {inserts:?}");
    }
}

#[test]
fn byte_ranges_cover_every_touched_block_and_clip_at_the_end() {
    let g = 64 << 10;
    let mut b = Blocks::default();
    assert!(b.insert_bytes(4096, 4096, g)); // inside block 0
    assert!(!b.insert_bytes(0, 1, g));
    assert!(b.insert_bytes(g * 3 - 1, 2, g)); // straddles blocks 2 and 3
    assert_eq!(b.count(), 3);
    assert_eq!(
        b.byte_ranges(g, g * 3 + 100),
        vec![(0, g), (2 * g, g + 100)]
    );
    assert!(!b.insert_bytes(0, 0, g));
}

#[test]
fn block_size_is_at_least_64k_and_bounds_the_block_count() {
    for (size, want) in [
        (0, 64 << 10),
        (1 << 20, 64 << 10),
        (1 << 30, 64 << 10),
        (2 << 30, 128 << 10),
        (3 << 30, 192 << 10),
        (1 << 40, 64 << 20),
    ] {
        assert_eq!(block_bytes(size), want, "size {size}");
        assert!(size.div_ceil(block_bytes(size)) <= MAX_BLOCKS);
    }
}

#[test]
fn a_point_is_due_once_per_interval_of_the_primary_clock() {
    let every = |s| Schedule {
        every_secs: s,
        keep: 0,
        keep_for_secs: 0,
    };
    // (schedule seconds, newest point s, commit at s, due)
    let rows: &[(u64, Option<i64>, i64, bool)] = &[
        (0, None, 100, false), // no schedule
        (10, None, 100, true), // first point
        (10, Some(100), 105, false),
        (10, Some(105), 109, false),
        (10, Some(109), 110, true), // next bucket, however close
        (10, Some(100), 131, true), // idle for a while
        (300, Some(600), 899, false),
        (300, Some(600), 900, true),
        (1, Some(5), 5, false),
        (10, None, 0, false), // no consistent time yet
    ];
    for &(s, newest, at, want) in rows {
        assert_eq!(
            due(&every(s), newest.map(|n| n * S), at * S),
            want,
            "every {s}s, newest {newest:?}, at {at}"
        );
    }
}

#[test]
fn selectors_resolve_to_the_newest_point_not_after_the_time() {
    let points = vec![
        sched("a", 100, &[]),
        point("m", 150, PointKind::Manual, &[]),
        sched("b", 200, &[]),
    ];
    let now = 1_000 * S;
    let oldest = ("a".to_owned(), 100 * S);
    let rows: Vec<(PointSelector, Result<usize, SelectError>)> = vec![
        (PointSelector::Newest, Ok(2)),
        (PointSelector::Name("m".into()), Ok(1)),
        (
            PointSelector::Name("zz".into()),
            Err(SelectError::UnknownName {
                oldest: oldest.clone(),
            }),
        ),
        (PointSelector::At(100 * S), Ok(0)),
        (PointSelector::At(199 * S), Ok(1)),
        (PointSelector::At(200 * S), Ok(2)),
        (PointSelector::At(999 * S), Ok(2)),
        (
            PointSelector::At(99 * S),
            Err(SelectError::TooOld {
                oldest: oldest.clone(),
            }),
        ),
        (PointSelector::At(now + 1), Err(SelectError::Future)),
    ];
    for (sel, want) in rows {
        assert_eq!(select(&points, &sel, now), want, "{sel:?}");
    }
    for sel in [
        PointSelector::Newest,
        PointSelector::Name("a".into()),
        PointSelector::At(5 * S),
    ] {
        assert_eq!(
            select(&[], &sel, now),
            Err(SelectError::NoPoints),
            "{sel:?}"
        );
    }
}

#[test]
fn a_group_selects_only_points_every_member_holds() {
    let a = vec![
        sched("p1", 10, &[]),
        sched("p2", 20, &[]),
        sched("p3", 30, &[]),
    ];
    let b = vec![sched("p1", 10, &[]), sched("p3", 30, &[])];
    let c = vec![
        sched("p2", 20, &[]),
        sched("p3", 30, &[]),
        sched("p4", 40, &[]),
    ];
    let now = 100 * S;
    type Row<'a> = (
        Vec<&'a [PointMeta]>,
        PointSelector,
        Result<i64, SelectError>,
    );
    let rows: Vec<Row<'_>> = vec![
        (vec![&a, &b], PointSelector::At(25 * S), Ok(10 * S)),
        (
            vec![&a, &b, &c],
            PointSelector::At(25 * S),
            Err(SelectError::TooOld {
                oldest: ("p3".into(), 30 * S),
            }),
        ),
        (vec![&a, &b, &c], PointSelector::Newest, Ok(30 * S)),
        (vec![&a, &c], PointSelector::Name("p2".into()), Ok(20 * S)),
        (
            vec![&a, &b],
            PointSelector::Name("p2".into()),
            Err(SelectError::UnknownName {
                oldest: ("p1".into(), 10 * S),
            }),
        ),
        (vec![], PointSelector::Newest, Err(SelectError::NoPoints)),
    ];
    for (members, sel, want) in rows {
        assert_eq!(select_common(&members, &sel, now), want, "{sel:?}");
    }
}

#[test]
fn changes_since_a_point_survive_expiry_of_any_point() {
    let mut points = vec![
        sched("a", 10, &[(0, 1)]),
        sched("b", 20, &[(5, 6)]),
        sched("c", 30, &[(9, 10)]),
        sched("d", 40, &[(20, 21)]), // the newest: changes since it, so far
    ];
    let runs = |b: Blocks| b.0;
    assert_eq!(
        runs(changes_since(&points, 0)),
        vec![(0, 1), (5, 6), (9, 10), (20, 21)]
    );
    assert_eq!(runs(changes_since(&points, 2)), vec![(9, 10), (20, 21)]);
    assert_eq!(runs(changes_since(&points, 3)), vec![(20, 21)]);
    // Removing a middle point: the changes since "b" still hold "c"'s.
    remove(&mut points, 2);
    assert_eq!(
        runs(changes_since(&points, 1)),
        vec![(5, 6), (9, 10), (20, 21)]
    );
    // Removing the newest: the one before it now carries the tail.
    remove(&mut points, 2);
    assert_eq!(
        runs(changes_since(&points, 1)),
        vec![(5, 6), (9, 10), (20, 21)]
    );
    // Removing the oldest drops only what no remaining point needs.
    remove(&mut points, 0);
    assert_eq!(points.len(), 1);
    assert_eq!(
        runs(changes_since(&points, 0)),
        vec![(5, 6), (9, 10), (20, 21)]
    );
}

#[test]
fn retention_expires_only_scheduled_points_by_count_and_age() {
    let points = vec![
        sched("s1", 100, &[]),
        point("m1", 110, PointKind::Manual, &[]),
        sched("s2", 200, &[]),
        sched("s3", 300, &[]),
        sched("s4", 400, &[]),
    ];
    let now = 450 * S;
    let rule = |keep, keep_for_secs| Schedule {
        every_secs: 10,
        keep,
        keep_for_secs,
    };
    let rows: &[(u32, u64, &[&str])] = &[
        (0, 0, &[]),
        (4, 0, &[]),
        (2, 0, &["s1", "s2"]),
        (1, 0, &["s1", "s2", "s3"]),
        // s1 is 350 s old, s2 250 s, s3 150 s, s4 50 s.
        (0, 300, &["s1"]),
        (0, 200, &["s1", "s2"]),
        (0, 100, &["s1", "s2", "s3"]),
        (3, 100, &["s1", "s2", "s3"]), // both rules: the union
    ];
    for &(keep, keep_for, want) in rows {
        assert_eq!(
            expired_by_retention(&points, &rule(keep, keep_for), now),
            want.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
            "keep {keep}, keep_for {keep_for}"
        );
    }
}

#[test]
fn over_the_cap_the_oldest_scheduled_points_of_the_data_dir_go_first() {
    let g = MIN_BLOCK_BYTES;
    let vol = |name: &str, points| VolumePoints {
        volume: name.into(),
        block_bytes: g,
        points,
    };
    let all = vec![
        vol(
            "v1",
            vec![
                point("m", 5, PointKind::Manual, &[(0, 4)]),
                sched("a", 10, &[(10, 12)]),
                sched("b", 30, &[(20, 21)]),
            ],
        ),
        vol(
            "v2",
            vec![sched("c", 20, &[(0, 3)]), sched("d", 40, &[(5, 6)])],
        ),
    ];
    // 4 + 2 + 1 + 3 + 1 = 11 blocks pinned.
    assert_eq!(pinned_bytes(&all), 11 * g);
    let names = |v: Vec<(String, String)>| {
        v.into_iter()
            .map(|(v, p)| format!("{v}/{p}"))
            .collect::<Vec<_>>()
    };
    let rows: &[(u64, &[&str])] = &[
        (11, &[]),
        (100, &[]),
        // "a" folds into "m" (still 11 pinned), then "c" goes (8 left).
        (10, &["v1/a", "v2/c"]),
        (8, &["v1/a", "v2/c"]),
        // "b" folds into "m" too (only overlaps would free space), so
        // "d" must go as well.
        (7, &["v1/a", "v2/c", "v1/b", "v2/d"]),
        // Every scheduled point gone, then manual ones.
        (0, &["v1/a", "v2/c", "v1/b", "v2/d", "v1/m"]),
    ];
    for &(cap_blocks, want) in rows {
        assert_eq!(
            names(expired_by_cap(&all, cap_blocks * g)),
            want,
            "cap {cap_blocks} blocks"
        );
    }
}

#[test]
fn point_names_are_file_safe() {
    for (name, ok) in [
        ("auto-2026-12-04T10:22:33.123Z", true),
        ("before-upgrade", true),
        ("a", true),
        ("", false),
        (".tmp-x", false),
        ("a/b", false),
        ("a b", false),
        ("../x", false),
        (&"x".repeat(101), false),
    ] {
        assert_eq!(valid_name(name), ok, "{name:?}");
    }
}

#[test]
fn the_write_ahead_record_covers_what_was_applied_with_room_ahead() {
    let mut persisted = Blocks::default();
    let mut applied = Blocks::default();
    let mut writes = 0;
    // A sequential writer: one block per batch over 1000 blocks.
    for b in 0..1000 {
        let mut batch = Blocks::default();
        batch.insert(b, b + 1);
        applied.union(&batch);
        if !persisted.covers(&applied) {
            persisted = persisted.with_reserve(&batch, 64, 1000);
            writes += 1;
        }
        assert!(
            persisted.covers(&applied),
            "block {b} applied but not recorded"
        );
    }
    // One record per 65 blocks, not one per batch.
    assert_eq!(writes, 1000usize.div_ceil(65));
    assert_eq!(persisted.0, vec![(0, 1000)], "capped at the volume's end");
    // `covers` is exact on run boundaries.
    let set = |runs: &[(u64, u64)]| {
        let mut b = Blocks::default();
        for &(s, e) in runs {
            b.insert(s, e);
        }
        b
    };
    for (have, want, ok) in [
        (set(&[(0, 10)]), set(&[(2, 5)]), true),
        (set(&[(0, 10)]), set(&[(5, 11)]), false),
        (set(&[(0, 5), (6, 10)]), set(&[(4, 7)]), false),
        (set(&[(0, 5), (6, 10)]), set(&[(0, 1), (9, 10)]), true),
        (set(&[]), set(&[]), true),
        (set(&[]), set(&[(0, 1)]), false),
    ] {
        assert_eq!(have.covers(&want), ok, "{have:?} covers {want:?}");
    }
}

#[test]
fn default_manual_names_are_unique_and_plain_when_free() {
    // (names taken, expected)
    let rows: &[(&[&str], &str)] = &[
        (&[], "manual-T"),
        (&["manual-X"], "manual-T"),
        (&["manual-T"], "manual-T-2"),
        (&["manual-T", "manual-T-2"], "manual-T-3"),
        (&["manual-T", "manual-T-3"], "manual-T-2"),
    ];
    for (taken, want) in rows {
        assert_eq!(
            default_manual_name("T", |n| taken.contains(&n)),
            *want,
            "taken {taken:?}"
        );
    }
}

#[test]
fn a_batch_is_deferred_only_behind_a_running_clone_within_the_bound() {
    const M: u64 = MAX_DEFERRED_BYTES;
    // (group, clone running, deferred bytes, batch bytes, expected)
    let rows = [
        (false, false, 0, 1 << 20, CommitAction::Apply),
        (false, true, 0, 1 << 20, CommitAction::Defer),
        (false, true, M - (1 << 20), 1 << 20, CommitAction::Defer),
        (
            false,
            true,
            M - (1 << 20),
            (1 << 20) + 1,
            CommitAction::Apply,
        ),
        (false, true, M, 0, CommitAction::Defer),
        (false, true, u64::MAX, 1, CommitAction::Apply),
        (true, true, 0, 1, CommitAction::Apply),
        (true, false, 0, 1, CommitAction::Apply),
        // A backlog without a clone (it just finished): apply it all now.
        (false, false, 1 << 20, 1, CommitAction::Apply),
    ];
    for (group, running, deferred, batch, want) in rows {
        assert_eq!(
            commit_action(group, running, deferred, batch),
            want,
            "group {group} running {running} deferred {deferred} batch {batch}"
        );
    }
}

#[test]
fn reaping_cuts_a_file_down_in_chunks() {
    // (len, chunk, next len)
    let rows = [(0, 8, 0), (5, 8, 0), (8, 8, 0), (20, 8, 12), (20, 0, 19)];
    for (len, chunk, want) in rows {
        assert_eq!(reap_step(len, chunk), want, "len {len} chunk {chunk}");
    }
}
