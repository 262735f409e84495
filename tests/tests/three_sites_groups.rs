//! Consistency groups with several targets (issue 14), three real agents:
//! site-a replicates a group of two volumes sync to site-b and async to
//! site-c, a stamped writer writing both volumes in one order. After
//! `kill -9` of site-a, `group promote cg --force` on site-b lands every
//! member on one point of that history holding every acknowledged write,
//! site-b re-homes site-c for each member (by the changes since the
//! common mark), the images converge, and site-b's group resumes its
//! points to site-c.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use ember_it::group_writer::read_group_history;
use ember_it::repl::{BLOCK, snapshot_export, stamp_at, tail, wait_exit};
use ember_it::three_sites::{self, SITES, ThreeSites as Sites, ctl_err, target};
use ember_it::{Agent, assert_same_image, require_tool, run_ok};

const VOLUMES: [&str; 2] = ["cg1", "cg2"];
const BLOCKS: u64 = 2048;

fn start_sites() -> Sites {
    Sites::start()
}

/// Polls `site`'s `args` (JSON) until `ok`; every site's log on timeout.
fn wait_json(
    sites: &Sites,
    site: &str,
    args: &[&str],
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    three_sites::wait_json(
        sites.agent(site),
        &others(sites, site),
        args,
        what,
        Duration::from_secs(90),
        ok,
    )
}

/// The agents of the sites other than `site`.
fn others<'a>(sites: &'a Sites, site: &str) -> Vec<&'a Agent> {
    SITES
        .iter()
        .filter(|s| **s != site)
        .map(|s| sites.agent(s))
        .collect()
}

/// Waits until `site` is the primary of `volume` with `peer` an in-sync
/// target with nothing pending; every site's log on timeout.
fn target_in_sync(sites: &Sites, site: &str, volume: &str, peer: &str) -> serde_json::Value {
    three_sites::target_in_sync(sites.agent(site), &others(sites, site), volume, peer)
}

fn targets(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v["targets"].as_array().cloned().unwrap_or_default()
}

/// The volume's marks ring on `site` (what a forced re-homing runs on).
fn ring(sites: &Sites, site: &str, volume: &str) -> serde_json::Value {
    sites.ring(site, volume)
}

/// Waits until every target of every member knows its sibling and holds
/// a common mark, writing meanwhile (marks move with consistent points).
fn wait_for_marks(sites: &Sites) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for v in VOLUMES {
        for site in ["site-b", "site-c"] {
            loop {
                let r = ring(sites, site, v);
                let ready = r["siblings"].as_array().map(Vec::len) == Some(2)
                    && r["marks"].as_array().is_some_and(|m| !m.is_empty());
                if ready {
                    break;
                }
                run_ok(
                    "qemu-io",
                    &["-f", "raw", "-c", "write -P 0x44 15M 4k", &sites.a.uri(v)],
                );
                assert!(
                    Instant::now() < deadline,
                    "{site} holds no common mark of {v}: {r}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn group_writer(sites: &Sites, history: &Path) -> Child {
    let uris = VOLUMES.map(|v| sites.a.uri(v));
    ember_it::group_writer::group_writer(&uris, history, BLOCKS, 10_000_000, 7)
}

/// Checks that the images together hold exactly the whole acknowledged
/// history — a sync target loses no acknowledged write — plus at most the
/// one write in flight at the kill (the writer issues one at a time, so
/// at most one was applied but not acknowledged).
fn check_every_acked_write(
    images: &[Vec<u8>],
    history: &[(u64, usize, u64, i64)],
) -> Result<(), String> {
    let n = history.len() as u64;
    let mut expected = vec![vec![None; BLOCKS as usize]; images.len()];
    for &(seq, v, off, _) in history {
        expected[v][(off / BLOCK) as usize] = Some(seq);
    }
    let mut in_flight = 0;
    for (v, image) in images.iter().enumerate() {
        for b in 0..BLOCKS {
            let found = stamp_at(image, b)?;
            if found == expected[v][b as usize] {
                continue;
            }
            if found == Some(n + 1) && in_flight == 0 {
                in_flight += 1;
                continue;
            }
            return Err(format!(
                "{} block {b} holds {found:?}, the acknowledged history ({n} writes) says {:?}",
                VOLUMES[v], expected[v][b as usize]
            ));
        }
    }
    Ok(())
}

/// site-a's group "cg" of two volumes, sync (suspend) to site-b and async
/// to site-c, both targets at one point, every target holding a common
/// mark; the refusals met on the way (a degrade sync member, a target not
/// every member replicates to) checked.
fn grouped_three_sites() -> Sites {
    let sites = start_sites();
    for v in VOLUMES {
        sites.a.create_volume(v, "16M");
    }
    // A sync target with the degrade policy could leave the members'
    // copies at different points: refused, naming the fix.
    sites.a.ctl_json(&[
        "replica", "enable", "cg1", "--peer", "site-b", "--mode", "sync",
    ]);
    sites
        .a
        .ctl_json(&["group", "create", "cg", "--peer", "site-b"]);
    let refused = ctl_err(&sites.a, &["group", "add", "cg", "cg1"]);
    assert!(
        refused.contains("--on-peer-loss suspend"),
        "a degrade sync member joined: {refused}"
    );
    for v in VOLUMES {
        sites.a.ctl_json(&[
            "replica",
            "enable",
            v,
            "--peer",
            "site-b",
            "--mode",
            "sync",
            "--on-peer-loss",
            "suspend",
        ]);
    }
    sites.a.ctl_json(&["group", "add", "cg", "cg1", "cg2"]);
    sites.a.ctl_json(&[
        "replica", "enable", "cg1", "--peer", "site-c", "--mode", "async", "--rpo", "60s",
    ]);
    // site-c is not a target of every member yet.
    let refused = ctl_err(&sites.a, &["group", "create", "cg", "--peer", "site-c"]);
    assert!(
        refused.contains("cg2 does not replicate to site-c"),
        "{refused}"
    );
    sites.a.ctl_json(&[
        "replica", "enable", "cg2", "--peer", "site-c", "--mode", "async", "--rpo", "60s",
    ]);
    let added = sites
        .a
        .ctl_json(&["group", "create", "cg", "--peer", "site-c"]);
    assert_eq!(targets(&added).len(), 2, "{added}");
    // A member's grouped link, enabled again, keeps the group's rules: the
    // sync one with degrade, the async one with escalate, both refused.
    let refused = ctl_err(
        &sites.a,
        &[
            "replica", "enable", "cg1", "--peer", "site-b", "--mode", "sync",
        ],
    );
    assert!(
        refused.contains("--on-peer-loss suspend"),
        "a grouped sync link took degrade: {refused}"
    );
    let refused = ctl_err(
        &sites.a,
        &[
            "replica",
            "enable",
            "cg2",
            "--peer",
            "site-c",
            "--mode",
            "async",
            "--rpo",
            "60s",
            "--rpo-policy",
            "escalate",
        ],
    );
    assert!(
        refused.contains("escalate RPO policy"),
        "a grouped async link took escalate: {refused}"
    );

    let g = wait_json(
        &sites,
        "site-a",
        &["group", "status", "cg"],
        "both targets of the group at one point",
        |g| {
            targets(g).len() == 2
                && targets(g).iter().all(|t| {
                    t["consistent"] == true
                        && t["members"].as_array().is_some_and(|m| {
                            m.len() == 2 && m.iter().all(|m| m["state"] == "in-sync")
                        })
                })
        },
    );
    let modes: Vec<(String, String)> = targets(&g)
        .iter()
        .map(|t| {
            (
                t["peer"].as_str().unwrap_or_default().to_owned(),
                t["mode"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        modes,
        [
            ("site-b".to_owned(), "sync".to_owned()),
            ("site-c".to_owned(), "async".to_owned())
        ],
        "{g}"
    );
    // site-c commits the group's points on its own.
    wait_json(
        &sites,
        "site-c",
        &["group", "status", "cg"],
        "site-c's secondary group at one point",
        |g| g["role"] == "secondary" && g["consistent"] == true,
    );
    wait_for_marks(&sites);
    sites
}

#[test]
fn a_group_with_two_targets_force_promoted_on_the_sync_one_rehomes_the_other() {
    if !require_tool("nbdcopy") || !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let mut sites = grouped_three_sites();

    let history = sites.dir.path().join("history");
    let mut writer = group_writer(&sites, &history);
    std::thread::sleep(Duration::from_millis(2500));
    sites.a.kill9();
    wait_exit(&mut writer, Duration::from_secs(30));

    let p = sites.b.ctl_json(&["group", "promote", "cg", "--force"]);
    assert_eq!(p["forced"], true, "{p}");
    assert_eq!(p["role"], "primary", "{p}");
    let images: Vec<Vec<u8>> = VOLUMES
        .iter()
        .map(|v| {
            snapshot_export(
                &sites.b.uri(v),
                &sites.dir.path().join(format!("b-{v}.img")),
            )
        })
        .collect();
    let hist = read_group_history(&history);
    eprintln!("{} acknowledged writes across both members", hist.len());
    assert!(hist.len() > 10, "the writer wrote {} blocks", hist.len());
    check_every_acked_write(&images, &hist).unwrap();

    // site-c follows site-b for every member, by the changes only, and
    // holds site-b's images.
    for v in VOLUMES {
        let s = target_in_sync(&sites, "site-b", v, "site-c");
        let c = target(&s, "site-c");
        let sent = c["resync_bytes_sent"].as_u64().expect("bytes sent");
        eprintln!("{v}: site-c re-homed, {sent} bytes resent");
        assert!(
            sent <= 16 << 20,
            "{v}: re-homing resent {sent} bytes of a 16 MiB volume"
        );
        assert_eq!(s["group"], "cg", "{s}");
        assert_same_image(&sites.b.uri(v), &sites.c.uri(v), &format!("{v} on b and c"));
    }
    let log = sites.b.log();
    assert!(
        log.matches("since common mark").count() >= VOLUMES.len(),
        "site-c was not re-homed by a common mark:\n{}",
        tail(&log)
    );
    // The group's points to site-c resume from site-b: both members' links
    // to it are grouped again.
    let g = wait_json(
        &sites,
        "site-b",
        &["group", "status", "cg"],
        "site-b's group at one point on site-c",
        |g| {
            targets(g)
                .iter()
                .any(|t| t["peer"] == "site-c" && t["consistent"] == true)
        },
    );
    let c = wait_json(
        &sites,
        "site-c",
        &["group", "status", "cg"],
        "site-c's group following site-b",
        |g| g["role"] == "secondary" && g["peer"] == "site-b" && g["consistent"] == true,
    );
    eprintln!("site-b group: {g}\nsite-c group: {c}");
}

/// Waits until site-a's `volume` has two targets, both in sync with
/// nothing pending.
fn both_targets_in_sync(sites: &Sites, volume: &str) {
    wait_json(
        sites,
        "site-a",
        &["replica", "status", volume],
        "both targets in sync",
        |s| {
            targets(s).len() == 2
                && targets(s)
                    .iter()
                    .all(|t| t["state"] == "in-sync" && t["lag_bytes"] == 0)
        },
    );
}

/// Waits until `volume`'s ring on `site` knows both targets and holds a
/// common mark, without writing anything.
fn wait_for_mark_idle(sites: &Sites, site: &str, volume: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = ring(sites, site, volume);
        if r["siblings"].as_array().map(Vec::len) == Some(2)
            && r["marks"].as_array().is_some_and(|m| !m.is_empty())
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{site} holds no common mark of the idle {volume}: {r}\nsite-a log tail: {}",
            tail(&sites.a.log())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_idle_volume_force_promoted_rehomes_its_other_target_by_a_mark_resending_nothing() {
    if !require_tool("qemu-io") || !require_tool("qemu-img") || !require_tool("nbdcopy") {
        return;
    }
    let mut sites = start_sites();
    let uri = sites.a.create_volume("idle", "64M");
    // Written before its targets exist, never after.
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x3c 0 8M", &uri]);
    sites.a.ctl_json(&[
        "replica", "enable", "idle", "--peer", "site-b", "--mode", "sync",
    ]);
    sites.a.ctl_json(&[
        "replica", "enable", "idle", "--peer", "site-c", "--mode", "async", "--rpo", "60s",
    ]);
    both_targets_in_sync(&sites, "idle");
    for site in ["site-b", "site-c"] {
        wait_for_mark_idle(&sites, site, "idle");
    }
    sites.a.kill9();
    let p = sites.b.ctl_json(&["replica", "promote", "idle", "--force"]);
    assert_eq!(p["forced"], true, "{p}");
    let s = target_in_sync(&sites, "site-b", "idle", "site-c");
    let c = target(&s, "site-c");
    assert_eq!(c["resync_bytes_sent"], 0, "re-homing resent data: {s}");
    let log = sites.b.log();
    assert!(
        log.contains("since common mark") && !log.contains("full blake3 comparison"),
        "site-c was not re-homed by a common mark:\n{}",
        tail(&log)
    );
    assert!(
        log.contains("0 blocks may differ, 0 bytes differ"),
        "the re-homing compared blocks of an idle volume:\n{}",
        tail(&log)
    );
    assert_same_image(
        &sites.b.uri("idle"),
        &sites.c.uri("idle"),
        "site-b and site-c",
    );
}

#[test]
fn demoting_a_volume_of_two_targets_is_a_switchover_and_discard_local_is_refused() {
    if !require_tool("qemu-io") || !require_tool("qemu-img") {
        return;
    }
    let sites = start_sites();
    let uri = sites.a.create_volume("dem", "16M");
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x21 0 4M", &uri]);
    sites.a.ctl_json(&[
        "replica", "enable", "dem", "--peer", "site-b", "--mode", "sync",
    ]);
    sites.a.ctl_json(&[
        "replica", "enable", "dem", "--peer", "site-c", "--mode", "async",
    ]);
    both_targets_in_sync(&sites, "dem");
    // Outside the planned handover, site-c would follow nobody: refused,
    // naming the targets and the ways out; nothing changed.
    let refused = ctl_err(&sites.a, &["replica", "demote", "dem", "--discard-local"]);
    for part in [
        "FAILED_PRECONDITION",
        "site-b and also to site-c",
        "without --discard-local",
        "replica disable dem --peer SITE",
    ] {
        assert!(refused.contains(part), "{part:?} missing: {refused}");
    }
    let s = sites.a.ctl_json(&["replica", "status", "dem"]);
    assert_eq!(s["role"], "primary", "{s}");
    assert_eq!(targets(&s).len(), 2, "{s}");

    // The planned handover: site-b takes over, site-c follows it.
    sites.a.ctl_json(&["replica", "demote", "dem"]);
    wait_json(
        &sites,
        "site-b",
        &["replica", "status", "dem"],
        "site-b primary of site-a and site-c",
        |s| {
            s["role"] == "primary"
                && ["site-a", "site-c"].iter().all(|p| {
                    targets(s)
                        .iter()
                        .any(|t| t["peer"] == *p && t["state"] == "in-sync")
                })
        },
    );
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x22 8M 1M",
            &sites.b.uri("dem"),
        ],
    );
    wait_json(
        &sites,
        "site-b",
        &["replica", "status", "dem"],
        "the write on both targets",
        |s| {
            targets(s)
                .iter()
                .all(|t| t["lag_bytes"] == 0 && t["state"] == "in-sync")
        },
    );
    assert_same_image(
        &sites.b.uri("dem"),
        &sites.c.uri("dem"),
        "site-b and site-c",
    );
    assert_same_image(
        &sites.b.uri("dem"),
        &sites.a.uri("dem"),
        "site-b and site-a",
    );
}

#[test]
fn a_rehoming_resumes_after_the_new_primary_is_killed_twice_during_it() {
    if !require_tool("qemu-io") || !require_tool("qemu-img") || !require_tool("nbdcopy") {
        return;
    }
    const MIB: u64 = 1 << 20;
    let mut sites = start_sites();
    let uri = sites.a.create_volume("r", "128M");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 64M 32M", &uri],
    );
    sites.a.ctl_json(&[
        "replica", "enable", "r", "--peer", "site-b", "--mode", "sync",
    ]);
    sites.a.ctl_json(&[
        "replica", "enable", "r", "--peer", "site-c", "--mode", "async", "--rpo", "60s",
    ]);
    target_in_sync(&sites, "site-a", "r", "site-c");
    for site in ["site-b", "site-c"] {
        wait_for_mark_idle(&sites, site, "r");
    }
    // site-c lags behind a writer over 16 MiB when site-a dies.
    let region = 16 * MIB;
    sites.to_c.set_rate(MIB);
    let history = sites.dir.path().join("r.history");
    let mut writer =
        ember_it::repl::stamped_writer(&uri, &history, region / BLOCK, 1_000_000, false);
    std::thread::sleep(Duration::from_millis(3000));
    sites.a.kill9();
    let _ = writer.wait();

    // site-c unreachable: the promotion's re-homing record waits on disk.
    sites.to_c.cut();
    let p = sites.b.ctl_json(&["replica", "promote", "r", "--force"]);
    assert_eq!(p["forced"], true, "{p}");
    let record = sites.dir.path().join("site-b/replicas/rehome/r.json");
    assert!(record.exists(), "no re-homing record after the promotion");
    std::thread::sleep(Duration::from_millis(1500));
    // Killed before it reached site-c: the record survives.
    sites.b.kill9();
    assert!(
        record.exists(),
        "the re-homing record did not survive kill -9"
    );
    sites.b.restart();
    // site-c reachable but slow: killed again while the resend runs (or
    // just after the re-homing was decided).
    sites.to_c.restore();
    sites.to_c.set_rate(MIB / 2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sites.b.log().contains("since common mark") {
        assert!(
            Instant::now() < deadline,
            "site-b never re-homed site-c after its restart:\n{}",
            tail(&sites.b.log())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    sites.b.kill9();
    sites.b.restart();
    sites.to_c.set_rate(0);

    let s = target_in_sync(&sites, "site-b", "r", "site-c");
    let c = target(&s, "site-c");
    let sent = c["resync_bytes_sent"].as_u64().expect("bytes sent");
    eprintln!(
        "site-c re-homed after two kills of site-b: {sent} bytes resent since the last restart"
    );
    assert!(
        sent <= region,
        "site-c was resent {sent} bytes for changes within {region} after site-b's restarts: {s}"
    );
    let log = sites.b.log();
    assert!(
        !log.contains("full blake3 comparison"),
        "the re-homing fell back to a full comparison:\n{}",
        tail(&log)
    );
    // Killed right after deciding, site-b may restart with the record
    // still naming site-c: its next pass (1 s) finds site-c re-homed and
    // removes it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while record.exists() {
        assert!(
            Instant::now() < deadline,
            "the re-homing record outlived the re-homing"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_same_image(&sites.b.uri("r"), &sites.c.uri("r"), "site-b and site-c");
}

#[test]
fn a_planned_group_switchover_to_the_async_target_takes_the_sync_one_over_in_the_group() {
    if !require_tool("nbdcopy") || !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let sites = grouped_three_sites();
    let p = sites.c.ctl_json(&["group", "promote", "cg"]);
    assert_eq!(p["forced"], false, "{p}");
    assert_eq!(p["role"], "primary", "{p}");
    // site-b was re-homed to site-c with nothing resent, and its links
    // joined site-c's group: a sync target there, at one point once every
    // member is in sync; site-a (the old primary) is the other target.
    let g = wait_json(
        &sites,
        "site-c",
        &["group", "status", "cg"],
        "site-c's group with site-b in it",
        |g| {
            targets(g)
                .iter()
                .any(|t| t["peer"] == "site-b" && t["mode"] == "sync" && t["consistent"] == true)
                && targets(g).iter().any(|t| t["peer"] == "site-a")
        },
    );
    eprintln!("site-c group: {g}");
    for v in VOLUMES {
        let s = target_in_sync(&sites, "site-c", v, "site-b");
        assert_eq!(s["group"], "cg", "{s}");
        run_ok(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x7e 1M 64k", &sites.c.uri(v)],
        );
        target_in_sync(&sites, "site-c", v, "site-b");
        assert_same_image(&sites.c.uri(v), &sites.b.uri(v), &format!("{v} on c and b"));
    }
}
