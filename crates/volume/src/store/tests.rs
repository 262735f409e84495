//! Store tests: idempotency, validation, snapshot and clone contents,
//! crash-leftover cleanup.

use super::*;
use ember_nbd::Export;
use ember_storage::EngineChoice;

const MIB: u64 = 1 << 20;

/// A store in `dir` with change tracking, as the agent opens it (also
/// for the tests of `import.rs` and `snapshot.rs`).
pub(crate) fn store(dir: &Path) -> VolumeStore {
    let engine = IoEngine::new(EngineChoice::Auto).expect("engine");
    VolumeStore::open(
        StoreConfig {
            root: dir.to_owned(),
            tracking: Some(TrackingConfig::default()),
            raw_volumes: Vec::new(),
        },
        engine,
    )
    .expect("open store")
}

#[tokio::test]
async fn create_is_idempotent_and_conflicts_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = store(dir.path());
    let (_, _, created) = s
        .create("v1", 8 * MIB, None, Source::Empty)
        .await
        .expect("create");
    assert!(created);
    let (_, _, created) = s
        .create("v1", 8 * MIB, None, Source::Empty)
        .await
        .expect("re-create");
    assert!(!created);
    assert!(matches!(
        s.create("v1", 16 * MIB, None, Source::Empty).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        s.create("../x", MIB, None, Source::Empty).await,
        Err(StoreError::InvalidName { .. })
    ));
    assert!(matches!(
        s.create("odd", 1000, None, Source::Empty).await,
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(s.delete("v1").await.expect("delete"));
    assert!(!s.delete("v1").await.expect("delete again is fine"));
}

#[tokio::test]
async fn snapshot_and_clone_hold_the_point_in_time_contents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = store(dir.path());
    let (_, v, _) = s
        .create("src", 16 * MIB, None, Source::Empty)
        .await
        .expect("create");
    let pattern: Vec<u8> = (0..MIB as usize).map(|i| (i % 253) as u8).collect();
    v.write(3 * MIB, pattern.clone(), false)
        .await
        .expect("write");
    s.create_snapshot("src", "s1").await.expect("snapshot");
    // Writes after the snapshot must not show in it.
    v.write(3 * MIB, vec![0xAA; 4096], false)
        .await
        .expect("overwrite");
    let snap = s.export("src@s1").expect("snapshot export");
    assert!(snap.read_only());
    assert_eq!(
        snap.read(3 * MIB, MIB as u32).await.expect("read snap"),
        pattern
    );
    let (_, from_snap, _) = s
        .create(
            "restored",
            0,
            None,
            Source::Snapshot(
                parse_volume("src").expect("name"),
                parse_snapshot("s1").expect("name"),
            ),
        )
        .await
        .expect("from snapshot");
    assert_eq!(from_snap.size(), 16 * MIB);
    assert_eq!(
        from_snap.read(3 * MIB, MIB as u32).await.expect("read"),
        pattern
    );
    let (_, clone, _) = s
        .create(
            "clone",
            32 * MIB,
            None,
            Source::Volume(parse_volume("src").expect("name")),
        )
        .await
        .expect("clone");
    assert_eq!(clone.size(), 32 * MIB);
    assert_eq!(
        clone.read(3 * MIB, 4096).await.expect("read"),
        vec![0xAA; 4096]
    );
    // Sparse: the clone allocates about what was written, not 32 MiB.
    assert!(
        clone.device().allocated_bytes() < 4 * MIB,
        "clone allocated {} bytes",
        clone.device().allocated_bytes()
    );
}

#[tokio::test]
async fn interrupted_creates_are_cleaned_and_volumes_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = store(dir.path());
        let (_, v, _) = s
            .create("keep", 4 * MIB, None, Source::Empty)
            .await
            .expect("create");
        v.write(0, vec![7; 4096], false).await.expect("write");
    }
    std::fs::create_dir_all(dir.path().join("volumes/.creating-half")).expect("leftover");
    let s = store(dir.path());
    assert!(!dir.path().join("volumes/.creating-half").exists());
    let (_, v) = s.get("keep").expect("volume survives");
    assert_eq!(v.read(0, 4096).await.expect("read"), vec![7; 4096]);
    assert!(
        v.tracker().expect("tracking on").dirty_bytes() > 0,
        "write before the crash is still tracked"
    );
}

#[tokio::test]
async fn interrupted_snapshot_operations_are_cleaned_at_open_and_never_listed() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = store(dir.path());
        let (_, v, _) = s
            .create("keep", 4 * MIB, None, Source::Empty)
            .await
            .expect("create");
        v.write(0, vec![9; 4096], false).await.expect("write");
        s.create_snapshot("keep", "good").await.expect("snapshot");
    }
    let snaps = dir.path().join("volumes/keep/snapshots");
    for leftover in [".creating-half", ".deleting-gone"] {
        std::fs::create_dir_all(snaps.join(leftover)).expect("leftover dir");
        std::fs::write(snaps.join(leftover).join(DATA_FILE), vec![1; 8192]).expect("leftover");
    }
    // A probe file left by a crash mid-detection.
    std::fs::write(dir.path().join(".reflink-probe-1-0"), b"x").expect("probe");
    let s = store(dir.path());
    let mut left: Vec<_> = std::fs::read_dir(&snaps)
        .expect("snapshots dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    left.sort();
    assert_eq!(left, ["good"]);
    assert!(!dir.path().join(".reflink-probe-1-0").exists());
    let listed = s.list_snapshots("keep").expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0.name, "good");
    let snap = s.export("keep@good").expect("snapshot export");
    assert_eq!(snap.read(0, 4096).await.expect("read"), vec![9; 4096]);
}

#[tokio::test]
async fn shrinking_is_refused_and_growing_keeps_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = store(dir.path());
    let (_, v, _) = s
        .create("g", 4 * MIB, None, Source::Empty)
        .await
        .expect("create");
    v.write(MIB, vec![9; 4096], false).await.expect("write");
    assert!(matches!(
        s.resize("g", 2 * MIB).await,
        Err(StoreError::FailedPrecondition(_))
    ));
    s.resize("g", 8 * MIB).await.expect("grow");
    assert_eq!(v.size(), 8 * MIB);
    assert_eq!(v.read(MIB, 4096).await.expect("read"), vec![9; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_under_concurrent_writes_is_a_prefix_of_the_write_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(store(dir.path()));
    let (_, v, _) = s
        .create("busy", 128 * MIB, None, Source::Empty)
        .await
        .expect("create");
    // Bulk data so the first copy pass takes a while.
    for i in 0..48u64 {
        v.write(i * MIB, vec![(i % 250) as u8 + 1; MIB as usize], false)
            .await
            .expect("fill");
    }
    const REGION: u64 = 64 * MIB;
    const BLOCKS: u64 = 8192;
    // Positions in a scrambled order, so that a copy sweeping the address
    // range at the same time as the writer would catch later writes but miss
    // earlier ones unless the copy really is a point in time.
    let mut order: Vec<u64> = (0..BLOCKS).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let order = Arc::new(order);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (v, stop, order) = (v.clone(), stop.clone(), order.clone());
        tokio::spawn(async move {
            // Acknowledged one at a time: the write history is a sequence.
            let mut n = 0u64;
            while n < BLOCKS && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut block = vec![0u8; 4096];
                block[..8].copy_from_slice(&(n + 1).to_le_bytes());
                v.write(REGION + order[n as usize] * 4096, block, false)
                    .await
                    .expect("stamped write");
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    s.create_snapshot("busy", "mid").await.expect("snapshot");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.expect("writer");
    let snap = s.export("busy@mid").expect("snapshot export");
    let region = snap
        .read(REGION, (BLOCKS * 4096) as u32)
        .await
        .expect("read snapshot");
    let mut present: Vec<u64> = Vec::new();
    for (position, block) in region.chunks(4096).enumerate() {
        let stamp = u64::from_le_bytes(block[..8].try_into().expect("8 bytes"));
        if stamp != 0 {
            assert_eq!(
                order[(stamp - 1) as usize],
                position as u64,
                "stamp {stamp} at the wrong place"
            );
            present.push(stamp);
        }
    }
    present.sort_unstable();
    let prefix = present.len();
    assert!(
        present.iter().enumerate().all(|(i, s)| *s == i as u64 + 1),
        "snapshot is torn: it holds {prefix} writes but not the first {prefix} (first gap at {:?})",
        present
            .iter()
            .enumerate()
            .find(|(i, s)| **s != *i as u64 + 1)
    );
    assert!(
        prefix as u64 <= written,
        "snapshot holds writes that never happened"
    );
    assert_eq!(
        snap.read(5 * MIB, 4096).await.expect("read"),
        vec![6u8; 4096],
        "bulk data intact"
    );
    println!("writer wrote {written} blocks, snapshot holds the first {prefix}");
}
