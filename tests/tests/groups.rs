//! Consistency groups between two real agents: three volumes written
//! round-robin by one writer (each write acknowledged before the next, so
//! every write depends on the previous one, across volumes). After `kill -9`
//! of the primary, a forced group promotion must land all three secondaries
//! on one point of that single history; a planned group switchover under
//! the same load must lose no acknowledged write. Either way the group then
//! replicates back, grouped, to the old primary.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use ember_it::group_writer::read_group_history;
use ember_it::repl::{BLOCK, TwoSites, snapshot_export, stamp_at, wait_exit, wait_status};
use ember_it::{Agent, require_tool};

const VOLUMES: [&str; 3] = ["cg1", "cg2", "cg3"];
const BLOCKS: u64 = 2048;

fn tools() -> bool {
    require_tool("qemu-img") && require_tool("nbdcopy")
}

fn group_writer(sites: &TwoSites, history: &Path) -> Child {
    let uris = VOLUMES.map(|v| sites.a.uri(v));
    ember_it::group_writer::group_writer(&uris, history, BLOCKS, 10_000_000, 11)
}

/// Checks that the images (one per volume) together equal the state after
/// one prefix of the shared history; returns the prefix length.
fn check_group_prefix(
    images: &[Vec<u8>],
    history: &[(u64, usize, u64, i64)],
) -> Result<u64, String> {
    let mut found = vec![vec![None; BLOCKS as usize]; images.len()];
    for (v, image) in images.iter().enumerate() {
        for b in 0..BLOCKS {
            found[v][b as usize] = stamp_at(image, b)?;
        }
    }
    let p = found.iter().flatten().flatten().copied().max().unwrap_or(0);
    if p as usize > history.len() {
        return Err(format!(
            "images hold seq {p}, the history has {} writes",
            history.len()
        ));
    }
    let mut expected = vec![vec![None; BLOCKS as usize]; images.len()];
    for &(seq, v, off, _) in &history[..p as usize] {
        expected[v][(off / BLOCK) as usize] = Some(seq);
    }
    for v in 0..images.len() {
        for b in 0..BLOCKS as usize {
            if expected[v][b] != found[v][b] {
                return Err(format!(
                    "not one point of the shared history: {} block {b} holds {:?}, the prefix up to seq {p} (the newest write any member holds) says {:?}",
                    VOLUMES[v], found[v][b], expected[v][b]
                ));
            }
        }
    }
    Ok(p)
}

fn group_status(agent: &Agent) -> serde_json::Value {
    agent.ctl_json(&["group", "status", "cg"])
}

fn wait_group(
    agent: &Agent,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let out = agent.ctl(&["--json", "group", "status", "cg"]);
        if out.status.success() {
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("group status is JSON");
            if ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {v}"
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn all_in_sync(g: &serde_json::Value) -> bool {
    g["role"] == "primary"
        && g["consistent"] == true
        && g["members"].as_array().is_some_and(|m| {
            m.len() == VOLUMES.len()
                && m.iter()
                    .all(|m| m["state"] == "in-sync" && m["lag_bytes"] == 0)
        })
}

/// Three async replicas of site-a's volumes, grouped as "cg"; `a_env`:
/// fault injection for site-a.
fn grouped_sites_with(a_env: &[(&str, &str)]) -> TwoSites {
    let sites = TwoSites::start(a_env, &[]);
    for v in VOLUMES {
        sites.a.create_volume(v, "16M");
        sites.a.ctl_json(&[
            "replica", "enable", v, "--peer", "site-b", "--mode", "async",
        ]);
    }
    for v in VOLUMES {
        sites.wait_caught_up(v, Duration::from_secs(60));
    }
    let created = sites
        .a
        .ctl_json(&["group", "create", "cg", "--peer", "site-b"]);
    assert_eq!(created["role"], "primary", "{created}");

    // Members replicate asynchronously: a sync volume is refused.
    sites.a.create_volume("syncvol", "16M");
    sites.a.ctl_json(&[
        "replica", "enable", "syncvol", "--peer", "site-b", "--mode", "sync",
    ]);
    let refused = sites.a.ctl(&["group", "add", "cg", "syncvol"]);
    assert!(!refused.status.success(), "a sync volume joined a group");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("synchronously"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let added = sites
        .a
        .ctl_json(&["group", "add", "cg", "cg1", "cg2", "cg3"]);
    assert_eq!(
        added["members"].as_array().map(Vec::len),
        Some(3),
        "{added}"
    );
    wait_group(&sites.a, "the group in sync", all_in_sync);
    let b = wait_group(&sites.b, "the secondary group at one point", |g| {
        g["consistent"] == true
    });
    assert_eq!(b["role"], "secondary", "{b}");
    for v in VOLUMES {
        assert_eq!(sites.status(v)["group"], "cg");
    }
    sites
}

fn grouped_sites() -> TwoSites {
    grouped_sites_with(&[])
}

/// Lets the writer run until the secondary group holds a point taken
/// after `since` (unix ns) plus `extra`, so a kill then always loses some
/// writes and keeps some, however loaded the machine is.
fn run_past_a_point(sites: &TwoSites, since: i64, extra: Duration) {
    wait_group(&sites.a, "a group point with the writer's writes", |g| {
        g["consistent_at_unix_ns"]
            .as_i64()
            .is_some_and(|t| t > since)
    });
    std::thread::sleep(extra);
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64
}

fn images(agent: &Agent, dir: &Path, tag: &str) -> Vec<Vec<u8>> {
    VOLUMES
        .iter()
        .map(|v| snapshot_export(&agent.uri(v), &dir.join(format!("{tag}-{v}.img"))))
        .collect()
}

#[test]
fn a_group_force_promoted_after_kill9_lands_every_member_on_one_point() {
    if !tools() {
        return;
    }
    let mut sites = grouped_sites();
    // A slow link: the kill leaves seconds of writes on the primary only,
    // and the three members' streams die with different amounts in flight.
    sites.proxy.set_rate(3 << 20);
    let history = sites.dir.path().join("history");
    let started = now_ns();
    let mut writer = group_writer(&sites, &history);
    run_past_a_point(&sites, started, Duration::from_millis(1500));
    sites.a.kill9();
    wait_exit(&mut writer, Duration::from_secs(30));

    let p = sites.b.ctl_json(&["group", "promote", "cg", "--force"]);
    assert_eq!(p["forced"], true, "{p}");
    let point = p["recovery_point_unix_ns"]
        .as_i64()
        .expect("recovery point");
    assert!(point > 0, "{p}");
    assert_eq!(p["members"].as_array().map(Vec::len), Some(3), "{p}");
    // Every member came up on the group's point (its recovery point).
    for v in VOLUMES {
        let s = sites.b.ctl_json(&["replica", "status", v]);
        assert_eq!(s["role"], "primary", "{s}");
        assert_eq!(s["recovery_point_unix_ns"].as_i64(), Some(point), "{s}");
    }

    let imgs = images(&sites.b, sites.dir.path(), "b");
    let hist = read_group_history(&history);
    let prefix = check_group_prefix(&imgs, &hist).unwrap();
    eprintln!("prefix {prefix} of {} writes", hist.len());
    assert!(
        prefix > 0 && (prefix as usize) < hist.len(),
        "the promoted group holds {prefix} of {} writes: the kill should lose some and keep some",
        hist.len()
    );
    // The recovery point is that prefix's time: writes in it were
    // acknowledged before it (plus the writer's clock read), writes after
    // it were acknowledged after it.
    for &(seq, _, _, acked) in &hist {
        if seq <= prefix {
            assert!(
                acked <= point + 50_000_000,
                "write {seq} acknowledged after the point"
            );
        } else {
            assert!(
                acked > point,
                "write {seq} acknowledged before the point is missing"
            );
        }
    }

    // The old primary returns: fenced, demoted, and the group replicates
    // back from site-b, grouped.
    sites.proxy.set_rate(0);
    sites.a.restart();
    let g = wait_group(&sites.b, "the group replicating back", all_in_sync);
    assert_eq!(g["peer"], "site-a", "{g}");
    let a = group_status(&sites.a);
    assert_eq!(a["role"], "secondary", "{a}");
    assert_eq!(a["consistent"], true, "{a}");
    let back = images(&sites.a, sites.dir.path(), "a");
    assert_eq!(
        back, imgs,
        "the old primary does not hold the promoted group's image"
    );
}

#[test]
fn a_planned_group_switchover_under_load_loses_no_acknowledged_write() {
    if !tools() {
        return;
    }
    let sites = grouped_sites();
    let history = sites.dir.path().join("history");
    let mut writer = group_writer(&sites, &history);
    std::thread::sleep(Duration::from_millis(1500));

    let p = sites.b.ctl_json(&["group", "promote", "cg"]);
    assert_eq!(p["forced"], false, "{p}");
    assert_eq!(p["role"], "primary", "{p}");
    // The old primary refuses writes now: the writer stops.
    wait_exit(&mut writer, Duration::from_secs(30));

    let imgs = images(&sites.b, sites.dir.path(), "b");
    let hist = read_group_history(&history);
    let prefix = check_group_prefix(&imgs, &hist).unwrap();
    assert_eq!(
        prefix as usize,
        hist.len(),
        "an acknowledged write is missing after a planned switchover"
    );
    let g = wait_group(&sites.b, "the group replicating back", all_in_sync);
    assert_eq!(g["peer"], "site-a", "{g}");
    wait_status(&sites.a, "cg1", Duration::from_secs(30), "secondary", |s| {
        s["role"] == "secondary" && s["group"] == "cg"
    });
    let a = wait_group(&sites.a, "the old primary holding the group", |g| {
        g["role"] == "secondary" && g["consistent"] == true
    });
    assert_eq!(a["members"].as_array().map(Vec::len), Some(3), "{a}");
}

#[test]
fn a_secondary_killed_during_group_commits_restarts_at_one_point_and_catches_up() {
    if !tools() {
        return;
    }
    let mut sites = grouped_sites();
    let history = sites.dir.path().join("history");
    let mut writer = group_writer(&sites, &history);
    // Killed mid-stream, three times: a member may hold a sealed batch for
    // a point the others never sealed (the restart must drop it) or one
    // the group committed but it had not applied yet (it must replay it).
    // Either way every member restarts at the group's one point.
    let (mut dropped, mut replayed) = (0, 0);
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(900));
        sites.b.kill9();
        std::thread::sleep(Duration::from_millis(200));
        sites.b.restart();
        let b = group_status(&sites.b);
        assert_eq!(b["role"], "secondary", "{b}");
        assert_eq!(
            b["consistent"], true,
            "after kill {round}, the restarted secondary's members are not at one point: {b}"
        );
        let log = sites.b.log();
        dropped = log.matches("its group never committed").count();
        replayed = log.matches("replaying a committed batch").count();
    }
    eprintln!("staged group batches dropped {dropped}, replayed {replayed} over 3 restarts");
    std::thread::sleep(Duration::from_millis(1000));
    let _ = writer.kill();
    let _ = writer.wait();
    wait_group(&sites.a, "the group in sync again", all_in_sync);
    for v in VOLUMES {
        sites.assert_identical(v);
    }
}

#[test]
fn a_point_some_members_hold_is_never_applied_without_the_others() {
    if !tools() {
        return;
    }
    // cg2's commits leave 700 ms after cg1's and cg3's for the same point,
    // so the kill almost always falls while cg1 and cg3 hold a point cg2
    // never receives. Applied alone, they would be ahead of cg2 and the
    // group would have no common point to promote.
    let mut sites = grouped_sites_with(&[("EMBER_FAULT_DELAY_GROUP_COMMIT", "cg2:700")]);
    let history = sites.dir.path().join("history");
    let started = now_ns();
    let mut writer = group_writer(&sites, &history);
    run_past_a_point(&sites, started, Duration::from_millis(1000));
    sites.a.kill9();
    wait_exit(&mut writer, Duration::from_secs(30));

    // Once the group commits a point, each member applies it on its own
    // task: read in between, the status honestly says "not at one point
    // yet" (seen in CI: the group at the new point, every member still at
    // the one before). What must never happen is a group that stays so.
    let b = wait_group(&sites.b, "the secondary members at one point", |g| {
        g["consistent"] == true
    });
    assert_eq!(b["role"], "secondary", "{b}");
    let p = sites.b.ctl_json(&["group", "promote", "cg", "--force"]);
    assert_eq!(p["forced"], true, "{p}");
    let imgs = images(&sites.b, sites.dir.path(), "b");
    let hist = read_group_history(&history);
    let prefix = check_group_prefix(&imgs, &hist).unwrap();
    assert!(prefix > 0, "the promoted group holds none of the writes");
}
