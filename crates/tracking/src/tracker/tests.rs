//! Tracker tests: crash recovery never misses a block and never exceeds the
//! activity-log window; checkpoints keep blocks written after them.

use super::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn small_log() -> TrackingConfig {
    TrackingConfig {
        granularity_bytes: 64 * 1024,
        al_extent_bytes: 4 * MIB,
        al_extents: 3,
    }
}

/// Runs one write through the whole protocol, as the volume layer does.
fn write(t: &Tracker, offset: u64, len: u64) {
    let adm = t.begin_write(offset, len).expect("admit");
    if let Some(seq) = adm.commit_seq {
        t.commit(seq).expect("commit");
    }
    t.end_write(adm);
}

fn dirty_blocks(t: &Tracker) -> Vec<u64> {
    let g = t.config().granularity_bytes;
    t.dirty_extents()
        .extents
        .iter()
        .flat_map(|e| (e.offset / g)..(e.end().div_ceil(g)))
        .collect()
}

#[test]
fn crash_recovery_covers_every_write_including_evicted_extents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 64 * MIB;
    let t = Tracker::open(dir.path(), size, small_log()).expect("open");
    // Ten extents with a three-extent log: seven are evicted on the way.
    for i in 0..10 {
        write(&t, i * 4 * MIB + 8192, 4096);
    }
    drop(t); // a crash: nothing persisted beyond what the protocol wrote
    let t = Tracker::open(dir.path(), size, small_log()).expect("reopen");
    let blocks = dirty_blocks(&t);
    for i in 0..10 {
        assert!(
            blocks.contains(&(i * 64)),
            "write to extent {i} lost: {blocks:?}"
        );
    }
    let window_blocks = 3 * 64;
    assert!(
        blocks.len() as u64 <= 10 + window_blocks,
        "{} dirty blocks exceed writes plus window",
        blocks.len()
    );
}

#[test]
fn clean_shutdown_recovers_exactly_the_written_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Tracker::open(dir.path(), 64 * MIB, small_log()).expect("open");
    write(&t, 0, 4096);
    write(&t, 20 * MIB, 128 * 1024);
    t.persist_clean().expect("persist");
    drop(t);
    let t = Tracker::open(dir.path(), 64 * MIB, small_log()).expect("reopen");
    assert_eq!(dirty_blocks(&t), vec![0, 320, 321]);
}

#[test]
fn clear_keeps_blocks_written_after_the_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Tracker::open(dir.path(), 64 * MIB, small_log()).expect("open");
    write(&t, 0, 4096);
    let report = t.dirty_extents();
    assert_eq!(report.dirty_bytes, 64 * 1024);
    write(&t, 10 * MIB, 4096);
    assert!(matches!(
        t.clear(report.checkpoint_id + 7),
        Err(TrackingError::StaleCheckpoint { .. })
    ));
    assert_eq!(t.clear(report.checkpoint_id).expect("clear"), 64 * 1024);
    assert_eq!(dirty_blocks(&t), vec![160]);
    // The clear is durable: a crash now does not resurrect block 0 beyond
    // what the activity log window allows (extent 0 is no longer hot).
    drop(t);
    let t = Tracker::open(dir.path(), 64 * MIB, small_log()).expect("reopen");
    let blocks = dirty_blocks(&t);
    assert!(blocks.contains(&160));
}

#[test]
fn writes_to_a_hot_extent_need_no_commit_once_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Tracker::open(dir.path(), 64 * MIB, small_log()).expect("open");
    let first = t.begin_write(0, 4096).expect("admit");
    let seq = first.commit_seq.expect("cold extent needs a record");
    // A second writer to the same extent before the record is durable must
    // also wait for it.
    let second = t.begin_write(8192, 4096).expect("admit");
    assert_eq!(second.commit_seq, Some(seq));
    t.commit(seq).expect("commit");
    t.end_write(first);
    t.end_write(second);
    let third = t.begin_write(65536, 4096).expect("admit");
    assert_eq!(
        third.commit_seq, None,
        "hot extent must cost no metadata I/O"
    );
    t.end_write(third);
}

#[test]
fn resize_grows_the_bitmap_and_keeps_dirty_bits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Tracker::open(dir.path(), 8 * MIB, small_log()).expect("open");
    write(&t, 0, 4096);
    t.resize(16 * MIB).expect("resize");
    write(&t, 12 * MIB, 4096);
    drop(t);
    let t = Tracker::open(dir.path(), 16 * MIB, small_log()).expect("reopen");
    let blocks = dirty_blocks(&t);
    assert!(blocks.contains(&0) && blocks.contains(&192), "{blocks:?}");
}

#[test]
fn refuses_a_bitmap_of_another_granularity() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Tracker::open(dir.path(), 8 * MIB, small_log()).expect("open"));
    let other = TrackingConfig {
        granularity_bytes: 4096,
        ..small_log()
    };
    assert!(matches!(
        Tracker::open(dir.path(), 8 * MIB, other),
        Err(TrackingError::Corrupt { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random writes, checkpoint clears and a crash at the end: the
    /// recovered set covers every write since the last clear, and anything
    /// extra lies inside extents the log could name.
    #[test]
    fn recovered_set_covers_writes_and_stays_within_window(
        ops in proptest::collection::vec((0u64..(32 * MIB), 1u64..(300 * 1024), 0u8..10), 1..60)
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 32 * MIB;
        let cfg = small_log();
        let g = cfg.granularity_bytes;
        let t = Tracker::open(dir.path(), size, cfg).expect("open");
        let mut truth = std::collections::BTreeSet::new();
        for (offset, len, action) in ops {
            let len = len.min(size - offset);
            if action == 0 {
                let report = t.dirty_extents();
                t.clear(report.checkpoint_id).expect("clear");
                truth.clear();
                continue;
            }
            write(&t, offset, len);
            truth.extend((offset / g)..(offset + len).div_ceil(g));
        }
        drop(t);
        let t = Tracker::open(dir.path(), size, cfg).expect("reopen");
        let recovered: std::collections::BTreeSet<u64> = dirty_blocks(&t).into_iter().collect();
        prop_assert!(truth.is_subset(&recovered), "missed blocks: {:?}", truth.difference(&recovered).collect::<Vec<_>>());
        let extra = recovered.difference(&truth).count() as u64;
        prop_assert!(extra * g <= cfg.window_bytes(), "{} extra bytes exceed the window", extra * g);
    }
}

#[test]
fn watchers_record_writes_at_completion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Tracker::open(dir.path(), 64 * MIB, small_log()).expect("open");
    let in_flight = t.begin_write(0, 4096).expect("admit");
    let w1 = t.watch();
    write(&t, 10 * MIB, 4096);
    let w2 = t.watch();
    let first = t.take_watch(w1).expect("w1");
    assert!(
        first.get(160) && !first.get(0),
        "w1 saw only the write completed while it ran"
    );
    // The write admitted before either watcher completes now: w2 must see it.
    if let Some(seq) = in_flight.commit_seq {
        t.commit(seq).expect("commit");
    }
    t.end_write(in_flight);
    let second = t.take_watch(w2).expect("w2");
    assert!(second.get(0) && !second.get(160));
    assert_eq!(
        t.take_watch(w1).map(|b| b.count_ones()),
        None,
        "taken watchers are gone"
    );
}

fn consumer_blocks(t: &Tracker, name: &str) -> (u64, Vec<u64>) {
    let g = t.config().granularity_bytes;
    let cp = t.consumer_checkpoint(name).expect("consumer exists");
    let blocks = cp
        .extents
        .iter()
        .flat_map(|e| (e.offset / g)..(e.end().div_ceil(g)))
        .collect();
    (cp.id, blocks)
}

#[test]
fn consumers_clear_independently_and_survive_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 64 * MIB;
    let t = Tracker::open(dir.path(), size, small_log()).expect("open");
    assert!(t.add_consumer(dir.path(), "repl-b", true).expect("add"));
    assert!(
        !t.add_consumer(dir.path(), "repl-b", true)
            .expect("idempotent")
    );
    assert_eq!(t.consumer_dirty_bytes("repl-b"), Some(size));
    let (id, _) = consumer_blocks(&t, "repl-b");
    // A range clear forgets whole blocks inside it only.
    t.consumer_clear("repl-b", id, Some((0, 32 * MIB + 1)), true)
        .expect("range clear");
    assert_eq!(t.consumer_dirty_bytes("repl-b"), Some(32 * MIB));
    t.consumer_clear("repl-b", id, None, true).expect("clear");
    assert_eq!(t.consumer_dirty_bytes("repl-b"), Some(0));
    assert!(t.add_consumer(dir.path(), "other", false).expect("add"));

    // Writes reach every consumer; clearing one keeps the others.
    for i in 0..10 {
        write(&t, i * 4 * MIB, 4096);
    }
    let (id, blocks) = consumer_blocks(&t, "other");
    assert_eq!(blocks.len(), 10);
    t.consumer_clear("other", id, None, true)
        .expect("clear other");
    assert_eq!(t.consumer_dirty_bytes("other"), Some(0));
    assert_eq!(t.consumer_dirty_bytes("repl-b"), Some(10 * 64 * 1024));
    assert_eq!(dirty_blocks(&t).len(), 10, "default bitmap untouched");

    // Crash: evicted extents were flushed, the hot ones come from the log.
    drop(t);
    let t = Tracker::open(dir.path(), size, small_log()).expect("reopen");
    let (_, blocks) = consumer_blocks(&t, "repl-b");
    for i in 0..10 {
        assert!(blocks.contains(&(i * 64)), "repl-b lost extent {i}");
    }
    assert!(
        blocks.len() as u64 <= 10 + 3 * 64,
        "{} blocks",
        blocks.len()
    );
    assert!(t.remove_consumer(dir.path(), "repl-b").expect("remove"));
    assert_eq!(t.consumer_dirty_bytes("repl-b"), None);
    assert_eq!(t.consumers(), vec!["other".to_owned()]);
}

#[test]
fn a_write_in_flight_at_a_checkpoint_survives_its_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Tracker::open(dir.path(), 64 * MIB, small_log()).expect("open");
    t.add_consumer(dir.path(), "r", false).expect("add");
    let adm = t.begin_write(8 * MIB, 4096).expect("admit");
    if let Some(seq) = adm.commit_seq {
        t.commit(seq).expect("commit");
    }
    let (id, _) = consumer_blocks(&t, "r");
    t.consumer_clear("r", id, None, false).expect("clear");
    t.end_write(adm);
    let (_, blocks) = consumer_blocks(&t, "r");
    assert!(
        blocks.contains(&(8 * MIB / (64 * 1024))),
        "in-flight write lost by the clear: {blocks:?}"
    );
}
