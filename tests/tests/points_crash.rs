//! `kill -9` of the secondary agent while recovery points *expire*, by
//! retention (`--keep`) and by the data dir's space cap, between two real
//! agents on a loop-mounted XFS (reflink). A fault hook
//! (`EMBER_FAULT_DELAY_EXPIRY`) pauses after each step of cutting an
//! expired image down, so aimed kills land while an image is half
//! deleted; the other kills land at random moments. After every restart:
//! nothing half-made or half-deleted is listed (every listed point has its
//! whole image), no temporary and no unlisted image is left, replication
//! and the schedule resume; at the end the replica is identical and every
//! point's image is a prefix of the stamped writer's history.
//!
//! And the stream does not wait for a point's clone: with every clone held
//! 3 s by a fault hook (`EMBER_FAULT_DELAY_CLONE`, as a fragmented volume's
//! clone can take), the primary reaches lag 0 while a clone runs (the
//! batches are acknowledged once durable in the secondary's staging log
//! and applied after the clone); `kill -9` of the secondary then, with
//! acknowledged batches not yet applied, loses none of them: the restart
//! replays them and the replica is identical to the primary. Then two
//! unnamed manual points at the same time get distinct names.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ember_it::points::{at, index, points};
use ember_it::repl::{TwoSites, check_prefix, read_history, stamp_at, stamped_writer};
use ember_it::{LoopMount, require_tool};

const VOLUME_BYTES: u64 = 64 << 20;

/// Files in a points dir: (images by point name with their lengths,
/// temporaries). The next point's head start (`.next-*`) is neither.
fn point_files(dir: &Path) -> (Vec<(String, u64)>, Vec<String>) {
    let mut images = Vec::new();
    let mut tmps = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let len = e.metadata().map_or(0, |m| m.len());
        if name.starts_with(".tmp-") {
            tmps.push(name);
        } else if name.starts_with(".next-") {
        } else if let Some(stem) = name.strip_suffix(".img") {
            images.push((stem.to_owned(), len));
        }
    }
    images.sort();
    tmps.sort();
    (images, tmps)
}

/// Whether an expiry is under way: an image of a point that was listed
/// before and no longer is, or an image cut below the volume's size.
fn expiring(dir: &Path, ever_listed: &BTreeSet<String>) -> bool {
    let listed = index(dir);
    point_files(dir).0.iter().any(|(name, len)| {
        *len < VOLUME_BYTES || (!listed.contains(name) && ever_listed.contains(name))
    })
}

/// The history, plus the one write the writer may have had acknowledged
/// but not logged when it was killed (it writes one block at a time and
/// logs each right after its acknowledgement): the write after the last
/// logged one, where `image` holds it (each block carries its sequence
/// number).
fn with_unlogged_last_write(image: &[u8], blocks: u64, hist: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut hist = hist.to_vec();
    let next = hist.len() as u64 + 1;
    if let Some(i) = (0..blocks).find(|&i| stamp_at(image, i).ok().flatten() == Some(next)) {
        hist.push((next, i * 4096));
    }
    hist
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
}

#[test]
fn kill9_of_the_secondary_while_points_expire_leaves_nothing_half_deleted() {
    assert!(require_tool("mkfs.xfs") && require_tool("qemu-io") && require_tool("qemu-img"));
    let Some(fs) = LoopMount::xfs(2 << 30) else {
        panic!("cannot loop-mount an XFS here (needs root and xfsprogs)");
    };
    // Every 16 MiB step of deleting an expired image pauses 150 ms; the
    // space cap is small, so the cap expires points as well as `--keep`.
    let sites = TwoSites::start_in(
        &[],
        &[("EMBER_FAULT_DELAY_EXPIRY", "150")],
        &[],
        "points_space_cap = \"10M\"\n",
        Some((fs.path(), fs.path())),
    );
    let blocks = 2048;
    sites.a.create_volume("x9", "64M");
    sites.a.ctl_json(&[
        "replica",
        "enable",
        "x9",
        "--peer",
        "site-b",
        "--mode",
        "async",
        "--points-every",
        "1s",
        "--keep",
        "3",
    ]);
    sites.wait_caught_up("x9", Duration::from_secs(60));
    let history = sites.dir.path().join("history");
    let mut writer = stamped_writer(&sites.a.uri("x9"), &history, blocks, 10_000_000, false);
    let mut sites = sites;
    let dir = sites
        .b
        .data_dir
        .join("replicas/secondary/points")
        .join("x9");
    let mut seed = now_ns() | 1;
    let mut ever_listed = BTreeSet::new();
    let mut half_deleted_seen = 0;
    let rounds = 6;
    for round in 0..rounds {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        if round % 2 == 0 {
            // Aim: wait for an image being deleted.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                ever_listed.extend(index(&dir));
                if expiring(&dir, &ever_listed) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}: no point expiring; files {:?}, index {:?}\n{}",
                    point_files(&dir),
                    index(&dir),
                    sites.b.log()
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        } else {
            std::thread::sleep(Duration::from_millis(200 + seed % 1500));
        }
        sites.b.kill9();
        ever_listed.extend(index(&dir));
        if expiring(&dir, &ever_listed) {
            half_deleted_seen += 1;
        }
        sites.b.restart();
        let list = points(&sites.b, "x9");
        let mut listed: Vec<String> = list
            .iter()
            .map(|p| p["name"].as_str().expect("name").to_owned())
            .collect();
        listed.sort();
        let (images, tmps) = point_files(&dir);
        assert!(
            tmps.is_empty(),
            "round {round}: temporaries left after restart: {tmps:?}"
        );
        let names: Vec<String> = images.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(
            names, listed,
            "round {round}: every image listed and every listed point has its image"
        );
        for (name, len) in &images {
            assert_eq!(
                *len, VOLUME_BYTES,
                "round {round}: point {name} is listed with a cut-down image"
            );
        }
        // Replication and the schedule resume: a newer point appears.
        let newest = list.last().map_or(0, at);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let l = points(&sites.b, "x9");
            if l.last().is_some_and(|p| at(p) > newest) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no new point after restart: {l:?}\n{}",
                sites.b.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = writer.kill();
    let _ = writer.wait();
    sites.wait_caught_up("x9", Duration::from_secs(60));
    sites.assert_identical("x9");
    let log = sites.b.log();
    assert!(
        log.contains("recovery point expired"),
        "points expired during the test\n{log}"
    );
    assert!(
        log.contains("space cap"),
        "the space cap expired points during the test\n{log}"
    );
    // Every retained point is a crash-consistent image: a prefix of the
    // history.
    let hist = read_history(&history);
    let list = points(&sites.b, "x9");
    assert!(!list.is_empty(), "points are retained");
    for p in &list {
        let name = p["name"].as_str().expect("name");
        let image = std::fs::read(dir.join(format!("{name}.img"))).expect("point image");
        let hist = with_unlogged_last_write(&image, blocks, &hist);
        check_prefix(&image, blocks, &hist).unwrap_or_else(|e| panic!("point {name}: {e}"));
    }
    assert!(
        half_deleted_seen >= rounds / 2,
        "the aimed kills must land on half-deleted images ({half_deleted_seen} of {rounds} kills did)"
    );
    drop(sites);
    drop(fs);
}

#[test]
fn the_stream_goes_on_during_a_clone_and_a_crash_then_loses_no_acknowledged_batch() {
    assert!(require_tool("mkfs.xfs") && require_tool("qemu-io") && require_tool("qemu-img"));
    let Some(fs) = LoopMount::xfs(1 << 30) else {
        panic!("cannot loop-mount an XFS here (needs root and xfsprogs)");
    };
    let mut sites = TwoSites::start_in(
        &[],
        &[("EMBER_FAULT_DELAY_CLONE", "3000")],
        &[],
        "",
        Some((fs.path(), fs.path())),
    );
    let blocks = 2048;
    sites.a.create_volume("d9", "64M");
    sites.a.ctl_json(&[
        "replica",
        "enable",
        "d9",
        "--peer",
        "site-b",
        "--mode",
        "async",
        "--points-every",
        "1s",
    ]);
    sites.wait_caught_up("d9", Duration::from_secs(60));
    let history = sites.dir.path().join("history");
    let mut writer = stamped_writer(&sites.a.uri("d9"), &history, blocks, 10_000_000, false);
    let dir = sites
        .b
        .data_dir
        .join("replicas/secondary/points")
        .join("d9");
    // A clone in progress: its temporary exists until it is published.
    let deadline = Instant::now() + Duration::from_secs(30);
    let started = loop {
        let (_, tmps) = point_files(&dir);
        if tmps.iter().any(|t| t.starts_with(".tmp-auto-")) {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "no point's clone started\n{}",
            sites.b.log()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    // The writer goes on for a second into the clone, then stops; the
    // primary must reach lag 0 while the clone is still held.
    std::thread::sleep(Duration::from_millis(1000));
    let _ = writer.kill();
    let _ = writer.wait();
    sites.wait_caught_up("d9", Duration::from_millis(1500));
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "the check must end while the clone is held (took {:?})",
        started.elapsed()
    );
    assert!(
        point_files(&dir)
            .1
            .iter()
            .any(|t| t.starts_with(".tmp-auto-")),
        "the clone is still running"
    );
    // Acknowledged, durable on the secondary, not yet applied: a crash now.
    sites.b.kill9();
    sites.b.restart();
    let log = sites.b.log();
    assert!(
        log.contains("replaying a committed batch after a crash"),
        "the restart replays the acknowledged batches\n{log}"
    );
    sites.wait_caught_up("d9", Duration::from_secs(60));
    sites.assert_identical("d9");
    // The secondary holds every write the writer logged (and at most the
    // one it did not live to log), as a prefix of the history.
    let image = std::fs::read(sites.b.data_dir.join("volumes").join("d9").join("data.img"))
        .expect("secondary image");
    let hist = with_unlogged_last_write(&image, blocks, &read_history(&history));
    let p = check_prefix(&image, blocks, &hist).unwrap_or_else(|e| panic!("secondary: {e}"));
    assert_eq!(
        p,
        hist.len() as u64,
        "the secondary holds every write the primary acknowledged"
    );
    // Two unnamed manual points with no batch in between represent the
    // same time: the second gets a suffix instead of ALREADY_EXISTS.
    let first = sites.b.ctl_json(&["replica", "point", "create", "d9"]);
    let second = sites.b.ctl_json(&["replica", "point", "create", "d9"]);
    assert_eq!(
        first["at_unix_ns"], second["at_unix_ns"],
        "{first} {second}"
    );
    let name = first["name"].as_str().expect("name");
    assert!(name.starts_with("manual-"), "{first}");
    assert_eq!(second["name"], format!("{name}-2"), "{second}");

    // `verify` while a clone holds acknowledged batches back: the primary
    // no longer counts them as pending, so the secondary applies them
    // before hashing; nothing may be reported as a mismatch.
    let write = |cmd: &str| {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd])
            .arg(sites.a.uri("d9"))
            .output()
            .expect("qemu-io");
        assert!(out.status.success(), "{out:?}");
    };
    // A write makes a batch; the scheduled point due after it starts a
    // clone (held 3 s); the next write is then deferred behind it.
    write("write -P 0xa5 0 1M");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !point_files(&dir)
        .1
        .iter()
        .any(|t| t.starts_with(".tmp-auto-"))
    {
        assert!(Instant::now() < deadline, "no clone started for verify");
        std::thread::sleep(Duration::from_millis(2));
    }
    write("write -P 0x5a 1M 2M");
    sites.wait_caught_up("d9", Duration::from_millis(1500));
    assert!(
        point_files(&dir)
            .1
            .iter()
            .any(|t| t.starts_with(".tmp-auto-")),
        "the clone is still running, so the batch is still deferred"
    );
    let report = sites.a.ctl_json(&["replica", "verify", "d9"]);
    assert_eq!(
        report["mismatches"].as_array().map(Vec::len),
        Some(0),
        "verify reported a batch deferred behind a clone as a mismatch: {report}"
    );
    drop(sites);
    drop(fs);
}
