//! Role changes between two real agents (site-a → site-b, each paired with
//! the other through a fault proxy): planned switchover under write load,
//! forced promotion after `kill -9` of the primary, fencing of the returning
//! old primary, failback that resends only what changed, and split-brain
//! refused until an admin names the loser.

use std::path::Path;
use std::time::Duration;

use ember_it::repl::{
    TwoSites, check_acked_present, check_prefix, read_history, read_timed_history, snapshot_export,
    stamped_writer, wait_exit, wait_status,
};
use ember_it::{Agent, require_tool, run, run_ok};

const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    run("qemu-io", &args)
}

/// `qemu-io -r`: reads work on exports that refuse writes.
fn qemu_read(uri: &str, cmd: &str) -> std::process::Output {
    run("qemu-io", &["-r", "-f", "raw", "-c", cmd, uri])
}

fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn status(agent: &Agent, volume: &str) -> serde_json::Value {
    agent.ctl_json(&["replica", "status", volume])
}

fn in_sync(s: &serde_json::Value) -> bool {
    s["role"] == "primary" && s["state"] == "in-sync" && s["lag_bytes"] == 0
}

fn audit(agent: &Agent) -> String {
    std::fs::read_to_string(agent.data_dir.join("replicas/audit.log")).unwrap_or_default()
}

fn tools() -> bool {
    require_tool("qemu-img") && require_tool("qemu-io") && require_tool("nbdcopy")
}

#[test]
fn planned_switchover_under_write_load_loses_nothing_and_reverses_without_resync() {
    if !tools() {
        return;
    }
    let sites = TwoSites::start(&[], &[]);
    let blocks = 4096; // 16 MiB of stamped blocks
    sites.async_volume("sw", "64M");

    let history = sites.dir.path().join("history");
    let mut writer = stamped_writer(&sites.a.uri("sw"), &history, blocks, 10_000_000, false);
    std::thread::sleep(Duration::from_millis(1500));
    let p = sites.b.ctl_json(&["replica", "promote", "sw"]);
    assert_eq!(p["role"], "primary", "{p}");
    assert_eq!(p["forced"], false, "{p}");
    assert_eq!(u(&p, "generation"), 2, "{p}");
    // The old primary refuses writes from the moment it drains: the writer
    // stops at its first refused write.
    wait_exit(&mut writer, Duration::from_secs(30));
    let hist = read_history(&history);
    assert!(
        hist.len() > 50,
        "the writer made only {} writes",
        hist.len()
    );

    // Zero loss: every write site-a acknowledged is on site-b.
    let image = snapshot_export(&sites.b.uri("sw"), &sites.dir.path().join("b.img"));
    check_acked_present(&image, blocks, &hist).unwrap();

    // site-a is site-b's consistent secondary at the new generation.
    let sa = status(&sites.a, "sw");
    assert_eq!(sa["role"], "secondary", "{sa}");
    assert_eq!(sa["state"], "consistent", "{sa}");
    assert_eq!(u(&sa, "generation"), 2, "{sa}");
    assert!(
        !qemu_io(&sites.a.uri("sw"), &["write -P 0x11 0 4k"])
            .status
            .success(),
        "the demoted site accepted a client write"
    );

    // Replication continues site-b → site-a without any resync.
    let sb = wait_status(&sites.b, "sw", Duration::from_secs(30), "in sync", in_sync);
    assert_eq!(u(&sb, "resync_bytes_sent"), 0, "{sb}");
    assert!(
        qemu_io(&sites.b.uri("sw"), &["write -P 0x77 20M 2M"])
            .status
            .success()
    );
    let sb = wait_status(&sites.b, "sw", Duration::from_secs(30), "in sync", in_sync);
    assert_eq!(u(&sb, "resync_bytes_sent"), 0, "{sb}");
    sites.assert_identical("sw");

    assert!(
        audit(&sites.b).contains("\"action\":\"promote\""),
        "{}",
        audit(&sites.b)
    );
    assert!(
        audit(&sites.a).contains("\"action\":\"demote\""),
        "{}",
        audit(&sites.a)
    );

    // And back again, asked from the primary's side this time.
    sites.b.ctl_json(&["replica", "demote", "sw"]);
    let sa = wait_status(&sites.a, "sw", Duration::from_secs(30), "in sync", in_sync);
    assert_eq!(u(&sa, "generation"), 3, "{sa}");
    sites.assert_identical("sw");
}

/// Checks the forced promotion's recovery point against the writer's
/// acknowledgement times: every write acknowledged before it is in the
/// image, every write after the image's last one was acknowledged after it.
fn check_recovery_point(history: &Path, prefix: u64, recovery_point: i64) {
    let timed = read_timed_history(history);
    // The writer stamps its clock when the acknowledgement arrives, a hair
    // after the primary completed the write.
    let slack = 50_000_000;
    for &(seq, _, acked) in &timed {
        if seq <= prefix {
            assert!(
                acked <= recovery_point + slack,
                "write {seq} is in the image but was acknowledged {} ms after the recovery point",
                (acked - recovery_point) / 1_000_000
            );
        } else {
            assert!(
                acked > recovery_point,
                "write {seq} was acknowledged before the recovery point but is not in the image"
            );
        }
    }
}

#[test]
fn forced_promote_after_kill9_lands_on_a_prefix_and_failback_resends_only_changes() {
    if !tools() {
        return;
    }
    // An 8-extent (32 MiB) activity log bounds what the crashed primary
    // must hand back.
    let mut sites = TwoSites::start_with_config(&[], &[], "[tracking]\nal_extents = 8\n");
    let blocks = 4096;
    sites.async_volume("fo", "256M");

    let history = sites.dir.path().join("history");
    let mut writer = stamped_writer(&sites.a.uri("fo"), &history, blocks, 10_000_000, false);
    std::thread::sleep(Duration::from_millis(2000));
    sites.a.kill9();
    wait_exit(&mut writer, Duration::from_secs(30));

    let p = sites.b.ctl_json(&["replica", "promote", "fo", "--force"]);
    assert_eq!(p["forced"], true, "{p}");
    assert_eq!(u(&p, "generation"), 2, "{p}");
    let recovery_point = p["recovery_point_unix_ns"]
        .as_i64()
        .expect("recovery point");
    assert!(recovery_point > 0, "{p}");

    let image = snapshot_export(&sites.b.uri("fo"), &sites.dir.path().join("b.img"));
    let hist = read_history(&history);
    let prefix = check_prefix(&image, blocks, &hist).unwrap();
    assert!(prefix > 0, "the promoted image holds none of the writes");
    check_recovery_point(&history, prefix, recovery_point);

    // The new primary takes writes: 2.5 MiB changed (1 % of the volume).
    assert!(
        qemu_io(
            &sites.b.uri("fo"),
            &["write -P 0x42 100M 1M", "write -P 0x43 180M 1536k"]
        )
        .status
        .success()
    );
    let changed_on_b = 2 * MIB + MIB / 2;

    // The old primary returns (no client touches it): it is fenced, handed
    // over its change set and resynced with the union of both sides.
    sites.a.restart();
    let sb = wait_status(
        &sites.b,
        "fo",
        Duration::from_secs(60),
        "failback in sync",
        in_sync,
    );
    let sa = status(&sites.a, "fo");
    assert_eq!(sa["role"], "secondary", "{sa}");
    assert_eq!(u(&sa, "generation"), 2, "{sa}");
    assert!(
        !qemu_io(&sites.a.uri("fo"), &["write -P 0x11 0 4k"])
            .status
            .success(),
        "the fenced old primary accepted a client write"
    );
    sites.assert_identical("fo");

    let sent = u(&sb, "resync_bytes_sent");
    let examined = sent + u(&sb, "resync_bytes_skipped");
    assert!(
        sent >= changed_on_b,
        "failback sent {sent} bytes, less than the {changed_on_b} changed on the new primary"
    );
    assert!(
        examined <= changed_on_b + 40 * MIB,
        "failback examined {examined} bytes: more than the changes since the split plus the old primary's 32 MiB activity-log window"
    );
    assert!(
        audit(&sites.a).contains("auto-demote"),
        "{}",
        audit(&sites.a)
    );
    assert!(
        audit(&sites.b).contains("force-promote"),
        "{}",
        audit(&sites.b)
    );
}

#[test]
fn split_brain_is_refused_until_an_admin_names_the_loser() {
    if !tools() {
        return;
    }
    let sites = TwoSites::start(&[], &[]);
    sites.async_volume("sb", "64M");

    // Partition: site-a keeps serving (async) and takes writes; site-b is
    // force-promoted and takes other writes.
    sites.cut_both(true);
    sites.wait_for("sb", Duration::from_secs(20), "disconnected", |s| {
        s["state"] == "disconnected"
    });
    assert!(
        qemu_io(&sites.a.uri("sb"), &["write -P 0xaa 0 1M"])
            .status
            .success()
    );
    let p = sites.b.ctl_json(&["replica", "promote", "sb", "--force"]);
    assert_eq!(p["forced"], true, "{p}");
    assert!(
        qemu_io(&sites.b.uri("sb"), &["write -P 0xbb 4M 1M"])
            .status
            .success()
    );

    // The link heals: both sides see split-brain, nothing is resolved.
    sites.cut_both(false);
    wait_status(
        &sites.a,
        "sb",
        Duration::from_secs(30),
        "split-brain",
        |s| s["state"] == "split-brain",
    );
    wait_status(
        &sites.b,
        "sb",
        Duration::from_secs(30),
        "split-brain",
        |s| s["state"] == "split-brain",
    );
    assert!(
        !qemu_io(&sites.a.uri("sb"), &["write -P 0xcc 8M 4k"])
            .status
            .success(),
        "the old primary took a write in split-brain"
    );
    std::thread::sleep(Duration::from_secs(2));
    let read = qemu_read(&sites.a.uri("sb"), "read -P 0xaa 0 1M");
    assert!(
        read.status.success(),
        "site-a's writes were discarded without an admin decision: {}{}\n{}",
        String::from_utf8_lossy(&read.stdout),
        String::from_utf8_lossy(&read.stderr),
        status(&sites.a, "sb")
    );
    assert!(
        qemu_read(&sites.b.uri("sb"), "read -P 0 0 1M")
            .status
            .success(),
        "site-b was overwritten without an admin decision"
    );
    // A planned demotion cannot resolve it.
    let out = sites.a.ctl(&["replica", "demote", "sb"]);
    assert!(
        !out.status.success(),
        "demote without --discard-local succeeded"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--discard-local"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The admin names site-a the loser.
    let d = sites
        .a
        .ctl_json(&["replica", "demote", "sb", "--discard-local"]);
    assert!(u(&d, "discarded_bytes") >= MIB, "{d}");
    wait_status(&sites.b, "sb", Duration::from_secs(60), "in sync", in_sync);
    sites.assert_identical("sb");
    run_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0 0 1M",
            "-c",
            "read -P 0xbb 4M 1M",
            &sites.a.uri("sb"),
        ],
    );
    let log = audit(&sites.a);
    assert!(
        log.contains("split-brain") && log.contains("discard-local"),
        "{log}"
    );
}

/// The secondary rewrites its staging log in place, batch after batch,
/// each under a new epoch (secondary/staging.rs). Killed with -9 again and
/// again in the middle of an async stream of same-size records — so a torn
/// new batch ends exactly where an older batch's records go on — it must
/// never read on into them: forced primary at the end (the old primary
/// killed too), its image is a prefix of the write history.
#[test]
fn a_secondary_killed_again_and_again_mid_stream_stays_a_prefix() {
    if !tools() {
        return;
    }
    let mut sites = TwoSites::start(&[], &[]);
    let blocks = 4096;
    sites.async_volume("kp", "64M");
    let history = sites.dir.path().join("history");
    let mut writer = stamped_writer(&sites.a.uri("kp"), &history, blocks, 10_000_000, false);
    for pause_ms in [600, 1100, 850, 1300] {
        std::thread::sleep(Duration::from_millis(pause_ms));
        sites.b.kill9();
        sites.b.restart();
    }
    std::thread::sleep(Duration::from_millis(1000));
    sites.b.kill9();
    sites.a.kill9();
    wait_exit(&mut writer, Duration::from_secs(30));
    sites.b.restart();
    let p = sites.b.ctl_json(&["replica", "promote", "kp", "--force"]);
    assert_eq!(p["forced"], true, "{p}");
    let image = snapshot_export(&sites.b.uri("kp"), &sites.dir.path().join("b.img"));
    let prefix = check_prefix(&image, blocks, &read_history(&history)).unwrap();
    assert!(prefix > 0, "the promoted image holds none of the writes");
}
