//! Replication between two real agents (site-a → site-b) over mutual TLS,
//! with a fault proxy on the link: initial sync, async write order, sync
//! durability, resync after link cuts and kill -9, corrupt frames, verify.
//! Images are compared with `qemu-img compare` over NBD.

use std::time::{Duration, Instant};

use ember_it::repl::{
    HistoryKind, TwoSites, assert_prefix_at_every_cut, check_acked_present, read_history,
    snapshot_export, stamped_writer, tail,
};
use ember_it::{require_tool, run, run_ok};

const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    run_ok("qemu-io", &args);
}

fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn async_replica_syncs_streams_and_refuses_client_writes() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let sites = TwoSites::start(&[], &[]);
    let a_uri = sites.a.create_volume("vol", "256M");
    // 9.4 MiB of data in a 256 MiB volume: the initial sync must skip holes.
    // The last five writes leave a hole and a zeroed block *inside* one
    // MiB: the receiver gathers contiguous frames into runs, and a run must
    // never close such a gap (the data after it would land too early).
    qemu_io(
        &a_uri,
        &[
            "write -P 0x5a 0 8M",
            "write -P 0x33 100M 1M",
            "write -z 120M 1M",
            "write -P 0x44 130M 192k",
            "write -P 0x45 136839168 128k",
            "write -P 0x46 140M 64k",
            "write -z 146866176 64k",
            "write -P 0x47 146931712 64k",
        ],
    );
    let s = sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "async", "--rpo", "30s",
    ]);
    assert_eq!(s["role"], "primary");
    let s = sites.wait_caught_up("vol", Duration::from_secs(60));
    for key in [
        "role",
        "mode",
        "state",
        "lag_seconds",
        "lag_bytes",
        "last_consistent_at",
        "resync_remaining_bytes",
    ] {
        assert!(s.get(key).is_some(), "status lacks {key}: {s}");
    }
    assert_eq!(s["mode"], "async");
    assert_eq!(s["rpo_seconds"], 30);
    assert!(s["last_consistent_at"].is_string(), "{s}");
    let sent = u(&s, "resync_bytes_sent");
    assert!(
        (9 * MIB..=12 * MIB).contains(&sent),
        "initial sync sent {sent} bytes for 9 MiB of data: holes must be skipped ({s})"
    );
    sites.assert_identical("vol");

    // Streaming: new writes arrive in order and the images converge.
    qemu_io(
        &a_uri,
        &[
            "write -P 0x77 4M 2M",
            "discard 0 1M",
            "write -P 0x12 200M 40M",
        ],
    );
    sites.wait_caught_up("vol", Duration::from_secs(60));
    sites.assert_identical("vol");

    // The secondary is read-only for clients, readable for verification.
    let b_uri = sites.b.uri("vol");
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &b_uri]);
    assert!(!out.status.success(), "a client wrote to the secondary");
    let out = run(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0x33 100M 1M", &b_uri],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let sb = sites.b.ctl_json(&["replica", "status", "vol"]);
    assert_eq!(sb["role"], "secondary");
    assert_eq!(sb["state"], "consistent");
    assert_eq!(sb["peer"], "site-a");
    // Resize and delete are refused while replicated.
    let out = sites.a.ctl(&["volume", "delete", "vol"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("disable replication first"));

    // Re-pairing an existing copy: the blake3 comparison skips it all.
    sites.a.ctl_json(&["replica", "disable", "vol"]);
    let sb = sites.b.ctl_json(&["replica", "status", "vol"]);
    assert_eq!(sb["state"], "detached");
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "async",
    ]);
    let s = sites.wait_caught_up("vol", Duration::from_secs(60));
    assert!(
        u(&s, "resync_bytes_sent") <= MIB,
        "re-pairing an identical copy resent data: {s}"
    );
    assert!(u(&s, "resync_bytes_skipped") >= 190 * MIB, "{s}");
    sites.assert_identical("vol");

    // Disable and delete the secondary.
    sites
        .a
        .ctl_json(&["replica", "disable", "vol", "--delete-secondary"]);
    let vols = sites.b.ctl_json(&["volume", "list"]);
    assert_eq!(vols.as_array().map(Vec::len), Some(0), "{vols}");
}

#[test]
fn link_cut_resends_only_the_changed_blocks() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let sites = TwoSites::start(&[], &[]);
    let a_uri = sites.a.create_volume("vol", "512M");
    qemu_io(&a_uri, &["write -P 0x01 0 32M"]);
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "async",
    ]);
    let before = sites.wait_caught_up("vol", Duration::from_secs(60));

    sites.proxy.cut();
    // 8 scattered 1 MiB writes while the link is down.
    let cmds: Vec<String> = (0..8)
        .map(|i| format!("write -P {} {}M 1M", 0x40 + i, 37 + i * 53))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&a_uri, &cmds);
    let down = sites.wait_for("vol", Duration::from_secs(20), "disconnected", |s| {
        s["state"] == "disconnected"
    });
    assert!(u(&down, "lag_bytes") >= 8 * MIB, "{down}");
    std::thread::sleep(Duration::from_millis(1200));
    let lagging = sites.status("vol");
    assert!(
        lagging["lag_seconds"].as_f64().expect("lag") >= 1.0,
        "lag must age while the link is down: {lagging}"
    );

    sites.proxy.restore();
    let after = sites.wait_caught_up("vol", Duration::from_secs(60));
    let resent = u(&after, "resync_bytes_sent") - u(&before, "resync_bytes_sent");
    assert!(
        (8 * MIB..=9 * MIB).contains(&resent),
        "resync after the cut sent {resent} bytes for 8 MiB changed"
    );
    sites.assert_identical("vol");

    // A stalled link (packets held, connections open) is detected by
    // keepalive instead of wedging the session, and it resumes after.
    sites.proxy.stall(true);
    qemu_io(&a_uri, &["write -P 0x55 400M 1M"]);
    sites.wait_for("vol", Duration::from_secs(20), "stall detected", |s| {
        s["state"] == "disconnected"
    });
    sites.proxy.stall(false);
    let after = sites.wait_caught_up("vol", Duration::from_secs(60));
    sites.assert_identical("vol");

    // An admin pause: the same accounting without a fault.
    sites.a.ctl_json(&["replica", "pause", "vol"]);
    qemu_io(&a_uri, &["write -P 0x99 300M 2M"]);
    let paused = sites.status("vol");
    assert_eq!(paused["state"], "paused", "{paused}");
    assert!(u(&paused, "lag_bytes") >= 2 * MIB, "{paused}");
    sites.a.ctl_json(&["replica", "resume", "vol"]);
    let resumed = sites.wait_caught_up("vol", Duration::from_secs(60));
    let resent = u(&resumed, "resync_bytes_sent") - u(&after, "resync_bytes_sent");
    assert_eq!(resent, 2 * MIB, "resume resent {resent} bytes for 2 MiB");
    sites.assert_identical("vol");
}

#[test]
fn async_secondary_is_always_a_prefix_of_the_write_history() {
    if !require_tool("nbdcopy") {
        return;
    }
    let sites = TwoSites::start(&[], &[]);
    let a_uri = sites.a.create_volume("vol", "16M");
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "async",
    ]);
    sites.wait_caught_up("vol", Duration::from_secs(60));
    // Latency on the link so the secondary trails the writer.
    let delay = Duration::from_millis(3);
    sites.proxy.set_delay(delay);

    let blocks = 16 * MIB / 4096;
    let history = sites.a.data_dir.with_extension("history");
    let writer = stamped_writer(&a_uri, &history, blocks, 1_000_000, false);
    assert_prefix_at_every_cut(
        &sites,
        "vol",
        writer,
        &history,
        HistoryKind::Blocks,
        blocks,
        delay,
    );
}

#[test]
fn sync_mode_loses_no_acknowledged_write_when_the_primary_is_killed() {
    if !require_tool("nbdcopy") || !require_tool("qemu-img") {
        return;
    }
    let mut sites = TwoSites::start(&[], &[]);
    let a_uri = sites.a.create_volume("vol", "16M");
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "sync",
    ]);
    let s = sites.wait_caught_up("vol", Duration::from_secs(60));
    assert_eq!(s["mode"], "sync");
    let blocks = 16 * MIB / 4096;
    let history = sites.a.data_dir.with_extension("history");
    let mut writer = stamped_writer(&a_uri, &history, blocks, 1_000_000, false);
    std::thread::sleep(Duration::from_millis(2500));
    sites.a.kill9();
    let _ = writer.wait();
    let image = snapshot_export(&sites.b.uri("vol"), &sites.dir.path().join("b.img"));
    let hist = read_history(&history);
    assert!(
        hist.len() > 100,
        "too few writes acknowledged: {}",
        hist.len()
    );
    check_acked_present(&image, blocks, &hist)
        .unwrap_or_else(|e| panic!("{e} ({} acknowledged writes)", hist.len()));

    // The primary comes back, resyncs its activity-log window, converges.
    sites.a.restart();
    sites.wait_caught_up("vol", Duration::from_secs(60));
    sites.assert_identical("vol");
}

#[test]
fn sync_mode_degrades_or_suspends_when_the_peer_is_lost() {
    if !require_tool("qemu-io") || !require_tool("qemu-img") {
        return;
    }
    let sites = TwoSites::start(&[], &[]);
    let a_uri = sites.a.create_volume("vol", "64M");
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "sync",
    ]);
    sites.wait_caught_up("vol", Duration::from_secs(60));

    // Degrade (default): writes continue, state degraded, resync later.
    sites.proxy.cut();
    sites.wait_for("vol", Duration::from_secs(20), "degraded", |s| {
        s["state"] == "degraded"
    });
    let started = Instant::now();
    qemu_io(&a_uri, &["write -P 0x21 0 1M"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "degraded writes stalled"
    );
    sites.proxy.restore();
    sites.wait_caught_up("vol", Duration::from_secs(60));
    sites.assert_identical("vol");

    // Suspend: a write is held until the peer is back.
    sites.a.ctl_json(&[
        "replica",
        "enable",
        "vol",
        "--peer",
        "site-b",
        "--mode",
        "sync",
        "--on-peer-loss",
        "suspend",
    ]);
    sites.proxy.cut();
    sites.wait_for("vol", Duration::from_secs(20), "degraded", |s| {
        s["state"] == "degraded"
    });
    let mut held = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x22 2M 64k", &a_uri])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        held.try_wait().expect("poll").is_none(),
        "a write completed while the sync secondary was unreachable under suspend"
    );
    sites.proxy.restore();
    let status = held.wait().expect("wait qemu-io");
    assert!(status.success());
    sites.wait_caught_up("vol", Duration::from_secs(60));
    sites.assert_identical("vol");
}

#[test]
fn kill9_of_either_side_under_load_then_resync_converges() {
    if !require_tool("fio") || !require_tool("qemu-img") {
        return;
    }
    // An 8-extent (32 MiB) activity log: a primary crash resends at most
    // that window plus what the secondary had not acknowledged.
    let mut sites = TwoSites::start_with_config(&[], &[], "[tracking]\nal_extents = 8\n");
    sites.a.create_volume("vol", "256M");
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "async",
    ]);
    sites.wait_caught_up("vol", Duration::from_secs(60));

    // Secondary killed mid-stream: its staging log replays or drops the
    // batch in flight; the primary catches up after the restart. Then the
    // primary killed under load: its activity-log window is resent.
    // Rate-limited so the change set stays far smaller than the volume.
    let s = sites.kill9_both_under_load("vol", &["--size=256M", "--bs=64k", "--rate=8m"]);
    let resent = u(&s, "resync_bytes_sent");
    assert!(
        resent <= 96 * MIB,
        "the restarted primary resent {resent} bytes: more than its 32 MiB activity-log window plus in-flight data"
    );
    sites.assert_identical("vol");
    let sb = sites.b.ctl_json(&["replica", "status", "vol"]);
    assert_eq!(sb["state"], "consistent", "{sb}");
}

#[test]
fn corrupt_frames_and_flipped_bits_are_never_applied() {
    if !require_tool("qemu-io") || !require_tool("qemu-img") {
        return;
    }
    // The primary corrupts 3 frames after checksumming them (test hook).
    let sites = TwoSites::start(&[("EMBER_FAULT_CORRUPT_FRAMES", "3")], &[]);
    let a_uri = sites.a.create_volume("vol", "64M");
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "async",
    ]);
    qemu_io(&a_uri, &["write -P 0x5a 0 16M", "write -P 0x6b 32M 8M"]);
    let s = sites.wait_caught_up("vol", Duration::from_secs(60));
    sites.assert_identical("vol");
    assert_eq!(u(&s, "frames_rejected"), 3, "{s}");
    let log = sites.b.log();
    assert_eq!(
        log.matches("failed its checksum").count(),
        3,
        "secondary log: {}",
        tail(&log)
    );

    // A connection reset in the middle of a frame: the session restarts.
    sites.proxy.reset_after(300_000);
    qemu_io(&a_uri, &["write -P 0x4d 40M 8M"]);
    sites.wait_caught_up("vol", Duration::from_secs(60));
    sites.assert_identical("vol");
    sites.proxy.restore();

    // Bits flipped on the wire: TLS refuses the records, the session
    // restarts and the data still converges.
    sites.proxy.flip_bits(5);
    qemu_io(&a_uri, &["write -P 0x7c 8M 16M"]);
    std::thread::sleep(Duration::from_millis(500));
    sites.wait_caught_up("vol", Duration::from_secs(60));
    sites.assert_identical("vol");
    assert!(
        sites
            .proxy
            .flipped
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the proxy flipped nothing"
    );
}

#[test]
fn verify_lists_divergence_and_resync_repairs_it() {
    if !require_tool("qemu-io") || !require_tool("qemu-img") {
        return;
    }
    let mut sites = TwoSites::start(&[], &[]);
    let a_uri = sites.a.create_volume("vol", "64M");
    qemu_io(&a_uri, &["write -P 0x5a 0 64M"]);
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "async",
    ]);
    sites.wait_caught_up("vol", Duration::from_secs(60));
    let clean = sites.a.ctl_json(&["replica", "verify", "vol"]);
    assert_eq!(
        clean["mismatches"].as_array().map(Vec::len),
        Some(0),
        "{clean}"
    );
    assert_eq!(u(&clean, "compared_bytes"), 64 * MIB);

    // Corrupt the secondary behind the agent's back.
    sites.b.terminate();
    let data = sites.b.data_dir.join("volumes/vol/data.img");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .expect("open secondary data");
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xee; 4096], 5 * MIB + 4096).expect("corrupt");
    drop(f);
    sites.b.restart();

    let out = sites.a.ctl(&["replica", "verify", "vol", "--json"]);
    assert_eq!(out.status.code(), Some(2), "verify must fail on a mismatch");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        report["mismatches"],
        serde_json::json!([{ "offset": 5 * MIB, "length": MIB }]),
        "{report}"
    );
    let fixed = sites.a.ctl_json(&["replica", "verify", "vol", "--resync"]);
    assert_eq!(fixed["resync_queued"], true);
    sites.wait_caught_up("vol", Duration::from_secs(60));
    sites.assert_identical("vol");
    let again = sites.a.ctl_json(&["replica", "verify", "vol"]);
    assert_eq!(
        again["mismatches"].as_array().map(Vec::len),
        Some(0),
        "{again}"
    );
}

#[test]
fn an_interrupted_initial_sync_resumes_where_it_stopped() {
    if !require_tool("qemu-io") || !require_tool("qemu-img") {
        return;
    }
    // 40 MiB/s resync limit: 320 MiB takes ~8 s, time to interrupt it.
    let mut sites = TwoSites::start(&[], &["--resync-rate", "40M"]);
    let a_uri = sites.a.create_volume("vol", "384M");
    qemu_io(&a_uri, &["write -P 0x3c 0 320M"]);
    let started = Instant::now();
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "async",
    ]);
    let mid = sites.wait_for("vol", Duration::from_secs(60), "half synced", |s| {
        s["resync_bytes_sent"].as_u64().unwrap_or(0) >= 160 * MIB
    });
    // 160 MiB at 40 MiB/s: the resync rate limit holds (unlimited takes < 2 s).
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "resync ignored its rate limit: 160 MiB in {:?}",
        started.elapsed()
    );
    assert!(
        mid["resync_eta_seconds"].as_f64().unwrap_or(0.0) > 0.0,
        "no ETA while syncing: {mid}"
    );
    let sent_before = u(&mid, "resync_bytes_sent");
    sites.a.kill9();
    sites.a.restart();
    let s = sites.wait_caught_up("vol", Duration::from_secs(120));
    let sent_after = u(&s, "resync_bytes_sent");
    // Progress is persisted every 64 MiB: at most one group is resent.
    assert!(
        sent_before + sent_after <= 320 * MIB + 64 * MIB + 8 * MIB,
        "resume resent too much: {sent_before} before the kill, {sent_after} after"
    );
    assert!(
        sent_after < 320 * MIB - 64 * MIB,
        "no resume: {sent_after} after"
    );
    sites.assert_identical("vol");
}

#[test]
fn a_replicated_volume_grows_on_both_sides_and_replicates_past_its_old_end() {
    if !require_tool("qemu-io") || !require_tool("qemu-img") {
        return;
    }
    let sites = TwoSites::start(&[], &[]);
    sites.a.create_volume("grow", "16M");
    sites.a.ctl_json(&[
        "replica", "enable", "grow", "--peer", "site-b", "--mode", "async",
    ]);
    sites.wait_caught_up("grow", Duration::from_secs(60));

    // The secondary grows with its primary, never on its own.
    let refused = sites.b.ctl(&["volume", "resize", "grow", "--size", "32M"]);
    assert!(
        !refused.status.success(),
        "a secondary was resized on its own"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("resize it there"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let grown = sites
        .a
        .ctl_json(&["volume", "resize", "grow", "--size", "32M"]);
    assert_eq!(u(&grown, "size_bytes"), 32 << 20);
    let b = sites.b.ctl_json(&["volume", "show", "grow"]);
    assert_eq!(u(&b, "size_bytes"), 32 << 20, "the secondary did not grow");
    // Shrinking stays refused, on the primary too.
    assert!(
        !sites
            .a
            .ctl(&["volume", "resize", "grow", "--size", "8M"])
            .status
            .success()
    );

    // Writes past the old end replicate; the session never restarted.
    let sessions = u(&sites.status("grow"), "sessions");
    qemu_io(&sites.a.uri("grow"), &["write -P 0x3c 24M 1M"]);
    sites.wait_caught_up("grow", Duration::from_secs(60));
    sites.assert_identical("grow");
    assert_eq!(u(&sites.status("grow"), "sessions"), sessions);
}
