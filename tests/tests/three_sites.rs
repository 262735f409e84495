//! Three real agents (issue 14): site-a replicates one volume sync to
//! site-b and async to site-c, each link through its own fault proxy.
//! Both targets converge byte for byte (`qemu-img compare` over NBD); a
//! lost target degrades alone while writes continue, and catches up by
//! its change set only; every target and its config survive a restart;
//! a sync target holds every acknowledged write even with a second target;
//! after a forced promotion the other target is re-homed by the changes
//! since the newest common mark, a half-synced one by a full comparison,
//! and the old primary returns as a target by its change sets.

use std::time::{Duration, Instant};

use ember_it::repl::{check_acked_present, read_history, snapshot_export, stamped_writer, tail};
use ember_it::three_sites::{ThreeSites as Sites, ctl_err, target, target_in_sync, wait_json};
use ember_it::{Agent, assert_same_image, require_tool, run_ok};

const MIB: u64 = 1 << 20;

/// The shared three sites ([`ember_it::three_sites`]) with this file's
/// waits on site-a's volume `vol`.
struct ThreeSites(Sites);

impl std::ops::Deref for ThreeSites {
    type Target = Sites;

    fn deref(&self) -> &Sites {
        &self.0
    }
}

impl std::ops::DerefMut for ThreeSites {
    fn deref_mut(&mut self) -> &mut Sites {
        &mut self.0
    }
}

impl ThreeSites {
    fn start() -> Self {
        Self(Sites::start())
    }

    fn status(&self) -> serde_json::Value {
        let out = self.a.ctl(&["replica", "status", "vol", "--json"]);
        assert!(
            out.status.success(),
            "replica status on site-a failed: {}\nsite-a log tail: {}",
            String::from_utf8_lossy(&out.stderr),
            tail(&self.a.log())
        );
        serde_json::from_slice(&out.stdout).expect("emberctl prints JSON")
    }

    /// Waits until `pred` holds for site-a's status of `vol`.
    fn wait(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not reached: {s}\nsite-a log tail: {}",
                tail(&self.a.log())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every target is in sync with nothing pending.
    fn wait_all_caught_up(&self) -> serde_json::Value {
        self.wait("every target caught up", |s| {
            targets(s)
                .iter()
                .all(|t| t["state"] == "in-sync" && t["lag_bytes"] == 0)
        })
    }

    /// Creates `vol` (`size`) on site-a replicated sync to `sync` and async
    /// (RPO 60 s) to `far`, in sync, each target knowing its sibling and
    /// holding a common mark (what a forced promotion re-homes by).
    /// Returns site-a's NBD URI.
    fn replicated_with_marks(&self, size: &str, sync: &str, far: &str) -> String {
        let uri = self.a.create_volume("vol", size);
        self.a
            .ctl_json(&["replica", "enable", "vol", "--peer", sync, "--mode", "sync"]);
        self.a.ctl_json(&[
            "replica", "enable", "vol", "--peer", far, "--mode", "async", "--rpo", "60s",
        ]);
        self.wait_all_caught_up();
        for site in ["site-b", "site-c"] {
            wait_for_siblings(self, site);
            wait_for_mark(self, site);
        }
        uri
    }

    fn assert_identical(&self, other: &Agent, what: &str) {
        assert_same_image(
            &self.a.uri("vol"),
            &other.uri("vol"),
            &format!("site-a and {what}"),
        );
    }
}

/// Waits until `pred` holds for `agent`'s status of `vol`; an error answer
/// (mid role change the volume is briefly neither role) is polled again.
fn wait_on(
    agent: &Agent,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_on_logged(agent, &[], what, pred)
}

/// [`wait_on`] that also shows the log tails of `others` on failure.
fn wait_on_logged(
    agent: &Agent,
    others: &[&Agent],
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_json(
        agent,
        others,
        &["replica", "status", "vol"],
        what,
        Duration::from_secs(60),
        pred,
    )
}

/// Waits until `agent` is primary of `vol` with every target in sync.
fn caught_up_on(agent: &Agent, what: &str) -> serde_json::Value {
    wait_on(agent, what, |s| {
        s["role"] == "primary"
            && targets(s)
                .iter()
                .all(|t| t["state"] == "in-sync" && t["lag_bytes"] == 0)
    })
}

fn identical(x: &Agent, y: &Agent, what: &str) {
    assert_same_image(&x.uri("vol"), &y.uri("vol"), what);
}

fn targets(s: &serde_json::Value) -> Vec<serde_json::Value> {
    s["targets"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no targets: {s}"))
        .clone()
}

fn peers(s: &serde_json::Value) -> Vec<String> {
    targets(s)
        .iter()
        .map(|t| t["peer"].as_str().expect("peer").to_owned())
        .collect()
}

fn sent(s: &serde_json::Value, peer: &str) -> u64 {
    target(s, peer)["resync_bytes_sent"]
        .as_u64()
        .expect("resync_bytes_sent")
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    run_ok("qemu-io", &args);
}

/// `cmds` scattered 1 MiB writes with pattern `seed + i`.
fn scattered(seed: u64, count: u64) -> Vec<String> {
    (0..count)
        .map(|i| format!("write -P {} {}M 1M", (seed + i) % 250 + 1, 3 + i * 7))
        .collect()
}

#[test]
fn sync_and_async_targets_converge_and_a_lost_target_degrades_alone() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let mut sites = ThreeSites::start();
    let a_uri = sites.a.create_volume("vol", "64M");
    qemu_io(&a_uri, &["write -P 0x5a 0 8M", "write -P 0x33 40M 2M"]);
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "sync",
    ]);
    let s = sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-c", "--mode", "async", "--rpo", "30s",
    ]);
    assert_eq!(peers(&s), ["site-b", "site-c"], "{s}");

    // Bad input: the volume's own site, an unpaired site; nothing changes.
    let e = ctl_err(
        &sites.a,
        &[
            "replica", "enable", "vol", "--peer", "site-a", "--mode", "async",
        ],
    );
    assert!(e.contains("cannot replicate to itself"), "{e}");
    let e = ctl_err(
        &sites.a,
        &[
            "replica", "enable", "vol", "--peer", "site-z", "--mode", "async",
        ],
    );
    assert!(e.contains("not paired"), "{e}");

    // Enabling a target again updates it in place (idempotent).
    let again = sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-c", "--mode", "async", "--rpo", "30s",
    ]);
    assert_eq!(peers(&again), ["site-b", "site-c"], "{again}");
    // Growing grows every target's secondary first, then the primary.
    let grown = sites
        .a
        .ctl_json(&["volume", "resize", "vol", "--size", "128M"]);
    assert_eq!(grown["size_bytes"], 128 * MIB, "{grown}");
    for (agent, site) in [(&sites.b, "site-b"), (&sites.c, "site-c")] {
        let v = agent.ctl_json(&["volume", "show", "vol"]);
        assert_eq!(v["size_bytes"], 128 * MIB, "{site} did not grow: {v}");
    }

    let s = sites.wait_all_caught_up();
    assert_eq!(target(&s, "site-b")["mode"], "sync", "{s}");
    assert_eq!(target(&s, "site-c")["mode"], "async", "{s}");
    for t in targets(&s) {
        for key in [
            "peer",
            "mode",
            "state",
            "lag_seconds",
            "lag_bytes",
            "last_consistent_at",
            "resync_remaining_bytes",
        ] {
            assert!(t.get(key).is_some(), "target lacks {key}: {t}");
        }
        assert!(t["last_consistent_at"].is_string(), "{t}");
    }
    sites.assert_identical(&sites.b, "site-b");
    sites.assert_identical(&sites.c, "site-c");

    // Streaming to both.
    let cmds = scattered(0x10, 6);
    qemu_io(&a_uri, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    let before = sites.wait_all_caught_up();
    sites.assert_identical(&sites.b, "site-b");
    sites.assert_identical(&sites.c, "site-c");

    // The async target dies: writes continue, only it degrades, the sync
    // target stays in sync and identical.
    sites.c.kill9();
    let cmds = scattered(0x40, 8);
    qemu_io(&a_uri, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    let s = sites.wait("site-c disconnected", |s| {
        target(s, "site-c")["state"] == "disconnected"
    });
    assert_eq!(s["state"], "disconnected", "the top shows the worst: {s}");
    assert_eq!(s["peer"], "site-c", "{s}");
    target_in_sync(&sites.a, &[], "vol", "site-b");
    sites.assert_identical(&sites.b, "site-b");
    sites.c.restart();
    let after = sites.wait_all_caught_up();
    let resent = sent(&after, "site-c") - sent(&before, "site-c");
    assert!(
        (8 * MIB..=9 * MIB).contains(&resent),
        "site-c caught up with {resent} bytes for 8 MiB changed: {after}"
    );
    assert_eq!(
        sent(&after, "site-b"),
        sent(&before, "site-b"),
        "site-b was resent data although it never left: {after}"
    );
    sites.assert_identical(&sites.c, "site-c");

    // The sync target is cut: it degrades (the default peer-loss policy),
    // writes continue, the async target keeps streaming; then it catches
    // up by its change set.
    sites.to_b.cut();
    let s = sites.wait("site-b degraded", |s| {
        target(s, "site-b")["state"] == "degraded"
    });
    assert_eq!(s["state"], "degraded", "{s}");
    let started = Instant::now();
    let cmds = scattered(0x80, 4);
    qemu_io(&a_uri, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "writes stalled with the sync target degraded"
    );
    target_in_sync(&sites.a, &[], "vol", "site-c");
    sites.assert_identical(&sites.c, "site-c");
    sites.to_b.restore();
    let back = sites.wait_all_caught_up();
    let resent = sent(&back, "site-b") - sent(&after, "site-b");
    // A sync link that drops marks the activity-log extents its in-flight
    // writes pinned (4 MiB each) for resend too: at most the changes plus
    // that window (two extents here), never the 64 MiB volume.
    assert!(
        (4 * MIB..=(4 + 2 * 4) * MIB).contains(&resent),
        "site-b caught up with {resent} bytes for 4 MiB changed: {back}"
    );
    sites.assert_identical(&sites.b, "site-b");

    // Every target survives a restart of the primary.
    sites.a.terminate();
    sites.a.restart();
    let s = sites.wait_all_caught_up();
    assert_eq!(peers(&s), ["site-b", "site-c"], "{s}");

    // Removing the first target keeps the other, across a restart too.
    sites
        .a
        .ctl_json(&["replica", "disable", "vol", "--peer", "site-b"]);
    let s = sites.status();
    assert_eq!(peers(&s), ["site-c"], "{s}");
    let sb = sites.b.ctl_json(&["replica", "status", "vol"]);
    assert_eq!(sb["state"], "detached", "{sb}");
    qemu_io(&a_uri, &["write -P 0x21 50M 1M"]);
    sites.a.terminate();
    sites.a.restart();
    let s = sites.wait_all_caught_up();
    assert_eq!(peers(&s), ["site-c"], "{s}");
    sites.assert_identical(&sites.c, "site-c");
    // Disable without --peer: every target.
    let d = sites.a.ctl_json(&["replica", "disable", "vol"]);
    assert_eq!(d["disabled"], true, "{d}");
    let out = sites.a.ctl(&["replica", "status", "vol"]);
    assert!(!out.status.success(), "still replicated");
    drop(sites);
}

#[test]
fn a_sync_target_holds_every_acknowledged_write_beside_an_async_one() {
    if !require_tool("nbdcopy") || !require_tool("qemu-img") {
        return;
    }
    let mut sites = ThreeSites::start();
    let a_uri = sites.a.create_volume("vol", "16M");
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-c", "--mode", "async",
    ]);
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "sync",
    ]);
    sites.wait_all_caught_up();
    // The async target is slow: it must not hold the writer back, and it
    // must not make the sync target's acknowledgement any weaker.
    sites.to_c.set_delay(Duration::from_millis(30));
    let blocks = 16 * MIB / 4096;
    let history = sites.dir.path().join("a.history");
    let mut writer = stamped_writer(&a_uri, &history, blocks, 1_000_000, false);
    std::thread::sleep(Duration::from_millis(2500));
    sites.a.kill9();
    let _ = writer.wait();
    let hist = read_history(&history);
    assert!(
        hist.len() > 100,
        "too few writes acknowledged: {}",
        hist.len()
    );
    let image = snapshot_export(&sites.b.uri("vol"), &sites.dir.path().join("b.img"));
    check_acked_present(&image, blocks, &hist)
        .unwrap_or_else(|e| panic!("site-b: {e} ({} acknowledged writes)", hist.len()));

    // The primary comes back with both targets and converges.
    sites.to_c.set_delay(Duration::ZERO);
    sites.a.restart();
    let s = sites.wait_all_caught_up();
    assert_eq!(peers(&s), ["site-c", "site-b"], "{s}");
    sites.assert_identical(&sites.b, "site-b");
    sites.assert_identical(&sites.c, "site-c");
}

#[test]
fn a_target_force_promoted_past_a_live_primary_of_several_targets_takes_both_over() {
    if !require_tool("qemu-io") || !require_tool("qemu-img") {
        return;
    }
    let sites = ThreeSites::start();
    let a_uri = sites.a.create_volume("vol", "16M");
    qemu_io(&a_uri, &["write -P 0x11 0 4M"]);
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "sync",
    ]);
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-c", "--mode", "async",
    ]);
    sites.wait_all_caught_up();
    wait_for_siblings(&sites, "site-b");

    // site-b is force-promoted (as if site-a were lost); site-a is not.
    let p = sites.b.ctl_json(&["replica", "promote", "vol", "--force"]);
    assert_eq!(p["generation"], 2, "{p}");
    // site-b re-homes site-c and reaches site-a, which follows it: its
    // other target is released to site-b, not left behind.
    wait_on_logged(&sites.b, &[&sites.c], "site-b re-homed site-c", |s| {
        s["role"] == "primary" && targets(s).len() == 2
    });
    let s = caught_up_on(&sites.b, "site-b primary of both");
    let mut got = peers(&s);
    got.sort();
    assert_eq!(got, ["site-a", "site-c"], "{s}");
    let sa = wait_on(&sites.a, "site-a follows site-b", |s| {
        s["role"] == "secondary"
    });
    assert_eq!(sa["peer"], "site-b", "{sa}");
    let out = ember_it::run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x22 0 4k", &a_uri],
    );
    assert!(!out.status.success(), "the old primary took a write");
    let sc = wait_on(&sites.c, "site-c follows site-b", |s| s["peer"] == "site-b");
    assert_eq!(sc["generation"], 2, "{sc}");
    qemu_io(&sites.b.uri("vol"), &["write -P 0x33 8M 1M"]);
    caught_up_on(&sites.b, "site-b streams to both");
    identical(&sites.b, &sites.a, "site-b and site-a");
    identical(&sites.b, &sites.c, "site-b and site-c");
}

/// `site`'s ring of common marks for `vol`.
fn ring(sites: &ThreeSites, site: &str) -> serde_json::Value {
    sites.ring(site, "vol")
}

/// Waits until `site` knows the volume's other targets (announced by the
/// primary): what a forced promotion of it re-homes.
fn wait_for_siblings(sites: &ThreeSites, site: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ring(sites, site)["siblings"].as_array().map(Vec::len) != Some(2) {
        assert!(
            Instant::now() < deadline,
            "{site} never learned the targets: {}",
            ring(sites, site)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `site` holds at least one common mark, writing to the
/// primary meanwhile: a mark moves only with the targets' consistent
/// points, which an idle volume does not move.
fn wait_for_mark(sites: &ThreeSites, site: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let uri = sites.a.uri("vol");
    while ring(sites, site)["marks"]
        .as_array()
        .is_none_or(|m| m.is_empty())
    {
        qemu_io(&uri, &["write -P 0x44 100M 4k"]);
        assert!(
            Instant::now() < deadline,
            "{site} holds no common mark: {}",
            ring(sites, site)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_forced_promotion_of_the_sync_target_rehomes_the_async_one_by_its_changes() {
    if !require_tool("nbdcopy") || !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let mut sites = ThreeSites::start();
    let a_uri = sites.a.create_volume("vol", "256M");
    qemu_io(&a_uri, &["write -P 0x5a 64M 32M"]);
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "sync",
    ]);
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-c", "--mode", "async", "--rpo", "60s",
    ]);
    sites.wait_all_caught_up();
    for site in ["site-b", "site-c"] {
        wait_for_siblings(&sites, site);
        wait_for_mark(&sites, site);
    }
    // The async target lags behind a stamped writer (16 MiB region) when
    // the primary dies.
    sites.to_c.set_rate(MIB);
    let region = 16 * MIB;
    let blocks = region / 4096;
    let history = sites.dir.path().join("a.history");
    let mut writer = stamped_writer(&a_uri, &history, blocks, 1_000_000, false);
    std::thread::sleep(Duration::from_millis(3000));
    sites.a.kill9();
    let _ = writer.wait();
    let hist = read_history(&history);
    assert!(
        hist.len() > 100,
        "too few writes acknowledged: {}",
        hist.len()
    );

    // Forced promotion of the sync target: every acknowledged write is
    // there.
    sites.to_c.set_rate(0);
    let p = sites.b.ctl_json(&["replica", "promote", "vol", "--force"]);
    assert_eq!(p["generation"], 2, "{p}");
    let image = snapshot_export(&sites.b.uri("vol"), &sites.dir.path().join("b.img"));
    check_acked_present(&image, blocks, &hist)
        .unwrap_or_else(|e| panic!("site-b: {e} ({} acknowledged writes)", hist.len()));

    // The async target follows site-b with only the blocks changed since
    // the newest common mark (all in the writer's region): no activity-log
    // window is involved (the marks' sets are exact in memory; only a
    // crash of the target itself widens them, by 256 blocks per run).
    let s = target_in_sync(&sites.b, &[&sites.c], "vol", "site-c");
    let resent = sent(&s, "site-c");
    assert!(
        resent <= region,
        "site-c was resent {resent} bytes for changes within {region}: {s}"
    );
    let log = sites.b.log();
    assert!(
        log.contains("since common mark"),
        "site-b did not re-home site-c by the common mark: {}",
        tail(&log)
    );
    let sc = wait_on(&sites.c, "site-c follows site-b", |s| s["peer"] == "site-b");
    assert_eq!(sc["generation"], 2, "{sc}");
    identical(&sites.b, &sites.c, "site-b and site-c");

    // The old primary returns: fenced by the newer generation, it follows
    // site-b, which resends the change sets only (its own since the
    // promotion plus site-a's, widened by its activity-log window of hot
    // extents after the crash: 4 MiB extents around a 16 MiB region).
    sites.a.restart();
    let s = target_in_sync(&sites.b, &[&sites.a], "vol", "site-a");
    let back = sent(&s, "site-a");
    assert!(
        back < 128 * MIB,
        "the returning old primary was resent {back} bytes of a 256 MiB volume: {s}"
    );
    let sa = wait_on(&sites.a, "site-a follows site-b", |s| {
        s["role"] == "secondary"
    });
    assert_eq!(sa["peer"], "site-b", "{sa}");
    identical(&sites.b, &sites.a, "site-b and site-a");
    eprintln!("re-homing bytes: site-c {resent}, returning site-a {back}");
}

#[test]
fn a_forced_promotion_of_the_lagging_target_rehomes_the_sync_one_by_the_union() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") || !require_tool("nbdcopy") {
        return;
    }
    let mut sites = ThreeSites::start();
    let a_uri = sites.replicated_with_marks("128M", "site-b", "site-c");
    // site-c lags; site-b (sync) holds writes site-c lacks when site-a dies.
    sites.to_c.set_rate(MIB);
    let region = 16 * MIB;
    let history = sites.dir.path().join("a.history");
    let mut writer = stamped_writer(&a_uri, &history, region / 4096, 1_000_000, false);
    std::thread::sleep(Duration::from_millis(3000));
    sites.a.kill9();
    let _ = writer.wait();
    sites.to_c.set_rate(0);
    // An admin promotes the far site anyway (accepting its older image):
    // site-b must drop the writes site-c lacks, i.e. the resend is the
    // union of both sets, not site-c's alone.
    let p = sites.c.ctl_json(&["replica", "promote", "vol", "--force"]);
    assert_eq!(p["generation"], 2, "{p}");
    let s = target_in_sync(&sites.c, &[&sites.b], "vol", "site-b");
    let resent = sent(&s, "site-b");
    assert!(
        resent <= region,
        "site-b was resent {resent} bytes for changes within {region}: {s}"
    );
    assert!(
        sites.c.log().contains("since common mark"),
        "site-c did not re-home site-b by the common mark: {}",
        tail(&sites.c.log())
    );
    identical(&sites.c, &sites.b, "site-c and site-b");
    eprintln!("re-homing bytes to the sync target: {resent}");
}

#[test]
fn a_targets_marks_survive_its_kill_9_and_the_union_still_covers_what_it_applied() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") || !require_tool("nbdcopy") {
        return;
    }
    let mut sites = ThreeSites::start();
    let a_uri = sites.replicated_with_marks("128M", "site-c", "site-b");
    // site-b (async) lags, so the common mark stays behind what site-c
    // (sync) applies; site-c is killed -9 mid-stream, then site-a: what
    // site-c applied since its last ring record is only in its
    // write-ahead change set.
    sites.to_b.set_rate(MIB / 2);
    let region = 16 * MIB;
    let history = sites.dir.path().join("a.history");
    let mut writer = stamped_writer(&a_uri, &history, region / 4096, 1_000_000, false);
    std::thread::sleep(Duration::from_millis(2000));
    sites.c.kill9();
    sites.a.kill9();
    let _ = writer.wait();
    sites.c.restart();
    sites.to_b.set_rate(0);
    // site-c is promoted: the blocks it applied before its crash that
    // site-b lacks are only in site-c's persisted set since the mark.
    let p = sites.c.ctl_json(&["replica", "promote", "vol", "--force"]);
    assert_eq!(p["generation"], 2, "{p}");
    target_in_sync(&sites.c, &[&sites.b], "vol", "site-b");
    assert!(
        sites.c.log().contains("since common mark"),
        "site-c did not re-home site-b by the common mark: {}",
        tail(&sites.c.log())
    );
    identical(&sites.c, &sites.b, "site-c and site-b");
}

#[test]
fn a_half_synced_target_is_refused_promotion_and_rehomed_instead() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let mut sites = ThreeSites::start();
    let a_uri = sites.a.create_volume("vol", "64M");
    qemu_io(&a_uri, &["write -P 0x5a 0 48M"]);
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "sync",
    ]);
    sites.wait_all_caught_up();
    // site-c joins slowly: its initial sync is half done when site-a dies.
    sites.to_c.set_rate(2 * MIB);
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-c", "--mode", "async",
    ]);
    wait_for_siblings(&sites, "site-c");
    wait_for_siblings(&sites, "site-b");
    sites.wait("site-c syncing", |s| {
        target(s, "site-c")["state"] == "syncing" && sent(s, "site-c") > 0
    });
    sites.a.kill9();
    sites.to_c.set_rate(0);
    let err = ctl_err(&sites.c, &["replica", "promote", "vol", "--force"]);
    assert!(err.contains("inconsistent"), "{err}");
    let p = sites.b.ctl_json(&["replica", "promote", "vol", "--force"]);
    assert_eq!(p["generation"], 2, "{p}");
    target_in_sync(&sites.b, &[&sites.c], "vol", "site-c");
    let log = sites.b.log();
    assert!(
        log.contains("full blake3 comparison (Inconsistent)"),
        "site-b did not re-home the half-synced site-c by a full comparison: {}",
        tail(&log)
    );
    identical(&sites.b, &sites.c, "site-b and site-c");
}

#[test]
fn planned_switchovers_rehome_the_other_target_without_a_copy() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let sites = ThreeSites::start();
    let a_uri = sites.a.create_volume("vol", "64M");
    qemu_io(&a_uri, &["write -P 0x5a 0 8M", "write -P 0x33 40M 2M"]);
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "sync",
    ]);
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-c", "--mode", "async", "--rpo", "30s",
    ]);
    sites.wait_all_caught_up();
    // The async target lags when the switchover starts: the drain must
    // wait for it too, or it would be re-homed missing writes.
    sites.to_c.set_rate(4 * MIB);
    let cmds = scattered(0x10, 6);
    qemu_io(&a_uri, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    let lagging = sites.status();
    assert!(
        target(&lagging, "site-c")["lag_bytes"].as_u64() > Some(0),
        "site-c does not lag: the test would not show the drain: {lagging}"
    );

    // Planned promotion of the sync target: the old primary drains both
    // targets, follows site-b, and site-c follows site-b too.
    let p = sites.b.ctl_json(&["replica", "promote", "vol"]);
    assert_eq!(p["generation"], 2, "{p}");
    sites.to_c.set_rate(0);
    let s = caught_up_on(&sites.b, "site-b primary of both");
    assert_eq!(peers(&s), ["site-a", "site-c"], "{s}");
    assert_eq!(target(&s, "site-a")["mode"], "sync", "{s}");
    assert_eq!(target(&s, "site-c")["mode"], "async", "{s}");
    for peer in ["site-a", "site-c"] {
        assert_eq!(sent(&s, peer), 0, "re-homing {peer} copied data: {s}");
    }
    let sa = wait_on(&sites.a, "site-a follows site-b", |s| {
        s["role"] == "secondary"
    });
    assert_eq!(sa["peer"], "site-b", "{sa}");
    let sc = wait_on(&sites.c, "site-c follows site-b", |s| {
        s["role"] == "secondary" && s["peer"] == "site-b"
    });
    assert_eq!(sc["generation"], 2, "{sc}");
    // The new primary streams to both.
    let b_uri = sites.b.uri("vol");
    let cmds = scattered(0x60, 5);
    qemu_io(&b_uri, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    let s = caught_up_on(&sites.b, "site-b streams to both");
    for peer in ["site-a", "site-c"] {
        assert_eq!(sent(&s, peer), 0, "{peer} was resent data: {s}");
    }
    identical(&sites.b, &sites.a, "site-b and site-a");
    identical(&sites.b, &sites.c, "site-b and site-c");

    // A second planned switchover, to the async target, while the sync
    // target stays attached: site-b and site-a both follow site-c.
    let p = sites.c.ctl_json(&["replica", "promote", "vol"]);
    assert_eq!(p["generation"], 3, "{p}");
    let s = caught_up_on(&sites.c, "site-c primary of both");
    let mut got = peers(&s);
    got.sort();
    assert_eq!(got, ["site-a", "site-b"], "{s}");
    for peer in ["site-a", "site-b"] {
        assert_eq!(sent(&s, peer), 0, "re-homing {peer} copied data: {s}");
    }
    let c_uri = sites.c.uri("vol");
    qemu_io(&c_uri, &["write -P 0x77 20M 2M"]);
    caught_up_on(&sites.c, "site-c streams to both");
    identical(&sites.c, &sites.a, "site-c and site-a");
    identical(&sites.c, &sites.b, "site-c and site-b");
    let sa = wait_on(&sites.a, "site-a follows site-c", |s| s["peer"] == "site-c");
    assert_eq!(sa["generation"], 3, "{sa}");
}

/// Corrupts 4 KiB of `agent`'s copy of `vol` at `offset` behind its back
/// (the agent stopped, restarted after).
fn corrupt_behind_the_agent(agent: &mut Agent, offset: u64) {
    agent.terminate();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(agent.data_dir.join("volumes/vol/data.img"))
        .expect("open the secondary's data");
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xee; 4096], offset).expect("corrupt");
    drop(f);
    agent.restart();
}

fn mismatches(report: &serde_json::Value) -> usize {
    report["mismatches"].as_array().map_or(usize::MAX, Vec::len)
}

#[test]
fn verify_and_pause_act_on_each_target() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let mut sites = ThreeSites::start();
    let a_uri = sites.a.create_volume("vol", "32M");
    qemu_io(&a_uri, &["write -P 0x5a 0 32M"]);
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "sync",
    ]);
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-c", "--mode", "async",
    ]);
    sites.wait_all_caught_up();

    // Every target compared, clean.
    let clean = sites.a.ctl_json(&["replica", "verify", "vol"]);
    let compared: Vec<(String, u64)> = clean["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| {
            (
                t["peer"].as_str().expect("peer").to_owned(),
                t["compared_bytes"].as_u64().expect("n"),
            )
        })
        .collect();
    assert_eq!(
        compared,
        [
            ("site-b".to_owned(), 32 * MIB),
            ("site-c".to_owned(), 32 * MIB)
        ],
        "{clean}"
    );

    // The far target alone corrupted: only it is reported (also at the
    // top), exit 2; a verify of the other target alone passes.
    corrupt_behind_the_agent(&mut sites.c, 9 * MIB + 4096);
    sites.wait_all_caught_up();
    let out = sites.a.ctl(&["replica", "verify", "vol", "--json"]);
    assert_eq!(out.status.code(), Some(2), "verify must fail on a mismatch");
    let bad: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(bad["peer"], "site-c", "{bad}");
    assert_eq!(
        bad["mismatches"],
        serde_json::json!([{ "offset": 9 * MIB, "length": MIB }]),
        "{bad}"
    );
    let per: Vec<usize> = bad["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(mismatches)
        .collect();
    assert_eq!(per, [0, 1], "{bad}");
    let only_b = sites
        .a
        .ctl_json(&["replica", "verify", "vol", "--peer", "site-b"]);
    assert_eq!(
        only_b["targets"].as_array().map(Vec::len),
        Some(1),
        "{only_b}"
    );
    assert_eq!(mismatches(&only_b), 0, "{only_b}");
    let err = ctl_err(&sites.a, &["replica", "verify", "vol", "--peer", "site-z"]);
    assert!(err.contains("does not replicate to site-z"), "{err}");

    // Resync of site-c only: it is repaired, and site-b is sent nothing.
    let b_sent = sent(&sites.status(), "site-b");
    let fixed = sites
        .a
        .ctl_json(&["replica", "verify", "vol", "--peer", "site-c", "--resync"]);
    assert_eq!(fixed["resync_queued"], true, "{fixed}");
    let s = sites.wait_all_caught_up();
    assert_eq!(sent(&s, "site-b"), b_sent, "site-b was resent data: {s}");
    sites.assert_identical(&sites.c, "site-c");
    let again = sites.a.ctl_json(&["replica", "verify", "vol"]);
    assert!(
        again["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .all(|t| mismatches(t) == 0),
        "{again}"
    );

    // Pause one target: it stops, the other keeps shipping; resume sends
    // exactly what was written meanwhile.
    let p = sites
        .a
        .ctl_json(&["replica", "pause", "vol", "--peer", "site-c"]);
    assert_eq!(p["changed"], true, "{p}");
    qemu_io(&a_uri, &["write -P 0x77 4M 2M"]);
    let s = target_in_sync(&sites.a, &[], "vol", "site-b");
    assert_eq!(target(&s, "site-c")["state"], "paused", "{s}");
    assert_eq!(
        s["state"], "paused",
        "the top level shows the paused target: {s}"
    );
    sites.assert_identical(&sites.b, "site-b");
    let c_sent = sent(&s, "site-c");
    let r = sites
        .a
        .ctl_json(&["replica", "resume", "vol", "--peer", "site-c"]);
    assert_eq!(r["changed"], true, "{r}");
    let s = sites.wait_all_caught_up();
    let resent = sent(&s, "site-c") - c_sent;
    assert!(
        (2 * MIB..=3 * MIB).contains(&resent),
        "resume sent {resent} bytes for 2 MiB written while paused: {s}"
    );
    sites.assert_identical(&sites.c, "site-c");

    // No --peer: every target.
    let p = sites.a.ctl_json(&["replica", "pause", "vol"]);
    assert_eq!(p["changed"], true, "{p}");
    let s = sites.status();
    assert!(targets(&s).iter().all(|t| t["state"] == "paused"), "{s}");
    sites.a.ctl_json(&["replica", "resume", "vol"]);
    sites.wait_all_caught_up();
}
