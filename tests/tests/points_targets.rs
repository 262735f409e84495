//! Recovery-point schedules of a volume with several targets (issue 13 on
//! issue 14's multi-target volumes), three real agents with data dirs on
//! one loop-mounted XFS (reflink): `replica enable --peer X --points-every`
//! sets X's schedule, not the first target's; `replica set --peer X` changes
//! one target's; `replica points` on the primary lists every target's
//! points with a `peer` field; `replica point create` on the primary takes
//! a point on every target (or the `--peer` one), saying which; a peer the
//! volume does not replicate to is NOT_FOUND naming its targets.

use std::time::{Duration, Instant};

use ember_it::repl::{lab_pki, site_config, tail};
use ember_it::{Agent, LoopMount, free_port, require_tool, tempdir};

struct Sites {
    a: Agent,
    b: Agent,
    c: Agent,
    _dir: tempfile::TempDir,
    // Dropped last: the agents must be gone before the unmount.
    _fs: LoopMount,
}

/// site-a pairs with site-b and site-c; every data dir on one XFS.
fn sites() -> Option<Sites> {
    if !require_tool("qemu-io") {
        return None;
    }
    let fs = LoopMount::xfs(2 << 30)?;
    let dir = tempdir();
    let pki = dir.path().join("pki");
    lab_pki(&pki, &["site-a", "site-b", "site-c"]);
    let start = |site: &str| {
        let port = free_port();
        let cfg = site_config(dir.path(), &pki, site, port, "");
        (
            Agent::start_with(&fs.path().join(site), &["--config", &cfg]),
            port,
        )
    };
    let (a, _) = start("site-a");
    let (b, pb) = start("site-b");
    let (c, pc) = start("site-c");
    for (site, port) in [("site-b", pb), ("site-c", pc)] {
        let addr = format!("127.0.0.1:{port}");
        a.ctl_json(&["peer", "add", site, "--address", &addr, "--measure", "1M"]);
    }
    Some(Sites {
        a,
        b,
        c,
        _dir: dir,
        _fs: fs,
    })
}

fn points(agent: &Agent) -> usize {
    agent
        .ctl_json(&["replica", "points", "vol"])
        .as_array()
        .expect("points list is an array")
        .len()
}

/// Waits until `agent` (a secondary of `vol`) holds at least one point.
fn wait_points(agent: &Agent, site: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while points(agent) == 0 {
        assert!(
            Instant::now() < deadline,
            "{site} never took a scheduled point: {}",
            tail(&agent.log())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn write(agent: &Agent, pattern: u8) {
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {pattern} 0 1M"),
            &agent.uri("vol"),
        ])
        .output()
        .expect("qemu-io");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn each_target_has_its_own_point_schedule() {
    let Some(sites) = sites() else {
        return;
    };
    sites.a.create_volume("vol", "32M");
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "async",
    ]);
    // The second target's schedule is its own: site-c takes points,
    // site-b (the first target) none.
    sites.a.ctl_json(&[
        "replica",
        "enable",
        "vol",
        "--peer",
        "site-c",
        "--mode",
        "async",
        "--points-every",
        "1s",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while points(&sites.c) == 0 {
        write(&sites.a, 0x11);
        assert!(
            Instant::now() < deadline,
            "site-c (enabled with --points-every 1s) never took a point; site-b has {}\nsite-a log: {}",
            points(&sites.b),
            tail(&sites.a.log())
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for _ in 0..5 {
        write(&sites.a, 0x12);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        points(&sites.b),
        0,
        "site-b took points: the schedule set for site-c reached the first target"
    );

    // `replica set --peer site-b` schedules site-b alone.
    sites.a.ctl_json(&[
        "replica",
        "set",
        "vol",
        "--peer",
        "site-b",
        "--points-every",
        "1s",
    ]);
    for _ in 0..5 {
        write(&sites.a, 0x13);
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_points(&sites.b, "site-b");

    // Asked on the primary, `replica points` lists every target's points,
    // each entry naming its target; each target's own listing has them.
    let listed = sites.a.ctl_json(&["replica", "points", "vol"]);
    let listed = listed.as_array().expect("points list is an array").clone();
    let own = |agent: &Agent| -> Vec<String> {
        agent
            .ctl_json(&["replica", "points", "vol"])
            .as_array()
            .expect("points list")
            .iter()
            .map(|p| {
                assert!(
                    p.get("peer").is_none(),
                    "a secondary's own listing has a peer: {p}"
                );
                p["name"].as_str().expect("name").to_owned()
            })
            .collect()
    };
    let (on_b, on_c) = (own(&sites.b), own(&sites.c));
    for (peer, names) in [("site-b", &on_b), ("site-c", &on_c)] {
        let from_a: Vec<&serde_json::Value> = listed.iter().filter(|p| p["peer"] == peer).collect();
        assert!(
            !from_a.is_empty(),
            "no {peer} points in site-a's listing: {listed:?}"
        );
        for p in from_a {
            let name = p["name"].as_str().expect("name");
            assert!(
                names.iter().any(|n| n == name),
                "{name} ({peer}) is not on {peer}: {names:?}"
            );
            assert!(p["at"].is_string() && p["kind"] == "scheduled", "{p}");
        }
    }
    assert!(
        listed
            .iter()
            .all(|p| p["peer"] == "site-b" || p["peer"] == "site-c"),
        "an entry without its target: {listed:?}"
    );
    // `--peer` keeps one target's points; a site that is no target is an
    // error naming the targets.
    for peer in ["site-b", "site-c"] {
        let only = sites
            .a
            .ctl_json(&["replica", "points", "vol", "--peer", peer]);
        let only = only.as_array().expect("points list is an array");
        let all_of_peer = listed.iter().filter(|p| p["peer"] == peer).count();
        assert!(
            only.len() >= all_of_peer && only.iter().all(|p| p["peer"] == peer),
            "--peer {peer}: {only:?} (all: {listed:?})"
        );
    }
    let wrong = sites
        .a
        .ctl(&["--json", "replica", "points", "vol", "--peer", "site-x"]);
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success()
            && err.contains("no replication link to site-x")
            && err.contains("site-b, site-c"),
        "--peer site-x: {err}"
    );

    // `point create` on the primary: on every target, each entry naming
    // its target; with --peer on that target alone.
    let made = sites
        .a
        .ctl_json(&["replica", "point", "create", "vol", "--name", "m1"]);
    let made = made
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {made}"));
    let mut peers: Vec<&str> = made
        .iter()
        .map(|p| p["peer"].as_str().expect("peer"))
        .collect();
    peers.sort_unstable();
    assert_eq!(peers, ["site-b", "site-c"], "{made:?}");
    assert!(
        made.iter()
            .all(|p| p["name"] == "m1" && p["kind"] == "manual"),
        "{made:?}"
    );
    assert!(own(&sites.b).contains(&"m1".to_owned()) && own(&sites.c).contains(&"m1".to_owned()));
    let made = sites.a.ctl_json(&[
        "replica", "point", "create", "vol", "--name", "m2", "--peer", "site-c",
    ]);
    assert_eq!(made.as_array().map(Vec::len), Some(1), "{made}");
    assert_eq!(made[0]["peer"], "site-c", "{made}");
    assert!(own(&sites.c).contains(&"m2".to_owned()));
    assert!(
        !own(&sites.b).contains(&"m2".to_owned()),
        "m2 reached site-b"
    );

    // An unknown target: NOT_FOUND naming the volume's targets.
    let out = sites
        .a
        .ctl(&["replica", "set", "vol", "--peer", "site-x", "--keep", "3"]);
    assert!(!out.status.success(), "set on a peer that is no target");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NOT_FOUND") || err.to_lowercase().contains("not found"),
        "{err}"
    );
    assert!(
        err.contains("site-b") && err.contains("site-c"),
        "the targets are not named: {err}"
    );
}
