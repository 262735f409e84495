//! Agent lifecycle: kill -9 under load keeps every write tracked, SIGTERM
//! gives an exact clean point, snapshots and clones are byte-exact, the CLI
//! contract holds, a full disk fails writes cleanly.

use std::collections::BTreeSet;
use std::time::Duration;

use ember_it::{Agent, require_tool, run, run_ok, tempdir};

const G: u64 = 64 * 1024;

fn dirty_blocks(agent: &Agent, vol: &str) -> BTreeSet<u64> {
    let extents = agent.ctl_json(&["volume", "dirty", vol]);
    extents
        .as_array()
        .expect("list")
        .iter()
        .flat_map(|e| {
            let (o, l) = (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
            );
            (o / G)..(o + l).div_ceil(G)
        })
        .collect()
}

/// Blocks of the backing file holding any non-zero byte: the volume started
/// as zeros, so these are blocks that were written.
fn written_blocks(path: &std::path::Path) -> BTreeSet<u64> {
    let data = std::fs::read(path).expect("read data file");
    data.chunks(G as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|b| *b != 0))
        .map(|(i, _)| i as u64)
        .collect()
}

#[test]
fn kill_9_under_fio_load_never_loses_a_dirty_block() {
    if !require_tool("fio") {
        return;
    }
    let dir = tempdir();
    let data = dir.path().join("a");
    // A small activity log (8 × 4 MiB) so eviction and bitmap flushes happen under load.
    std::fs::create_dir_all(&data).expect("dir");
    let cfg = dir.path().join("emberd.toml");
    std::fs::write(&cfg, "[tracking]\nal_extents = 8\n").expect("config");
    let mut agent = Agent::start_with(&data, &["--config", cfg.to_str().expect("utf8")]);
    agent.create_volume("crash", "256M");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    println!("kill-point seed {seed}");
    for round in 0..3u32 {
        let mut fio = ember_it::fio_load(
            &agent.uri("crash"),
            &["--bs=4k,64k", "--bsrange=4k-128k", "--size=256M"],
        );
        let delay_ms = 700 + (seed.wrapping_mul(round + 7) % 2000) as u64;
        std::thread::sleep(Duration::from_millis(delay_ms));
        agent.kill9();
        let _ = fio.kill();
        let _ = fio.wait();
        agent.restart();
        let written = written_blocks(&data.join("volumes/crash/data.img"));
        let dirty = dirty_blocks(&agent, "crash");
        assert!(
            !written.is_empty(),
            "round {round}: fio wrote nothing before the kill at {delay_ms} ms"
        );
        let missed: Vec<_> = written.difference(&dirty).take(10).collect();
        assert!(
            missed.is_empty(),
            "round {round} (kill at {delay_ms} ms): written blocks not dirty after recovery: {missed:?}"
        );
        println!(
            "round {round}: kill at {delay_ms} ms, {} blocks written, {} dirty",
            written.len(),
            dirty.len()
        );
    }
}

#[test]
fn sigterm_drains_and_restart_recovers_the_exact_dirty_set() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let mut agent = Agent::start(&dir.path().join("a"));
    let uri = agent.create_volume("clean", "64M");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 9 8M 1M", uri.as_str()],
    );
    agent.terminate();
    assert!(
        agent.log().contains("emberd stopped cleanly"),
        "{}",
        agent.log()
    );
    agent.restart();
    let extents = agent.ctl_json(&["volume", "dirty", "clean"]);
    assert_eq!(
        extents,
        serde_json::json!([{ "offset": 8 << 20, "length": 1 << 20 }])
    );
    // Checkpoint semantics through the CLI: clear what was reported.
    let report = agent.ctl_json(&["volume", "dirty", "clean", "--with-checkpoint"]);
    let cp = report["checkpoint_id"]
        .as_u64()
        .expect("checkpoint")
        .to_string();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 3 32M 4k", uri.as_str()],
    );
    agent.ctl_json(&["volume", "clear-dirty", "clean", &cp]);
    assert_eq!(
        agent.ctl_json(&["volume", "dirty", "clean"]),
        serde_json::json!([{ "offset": 32 << 20, "length": G }])
    );
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 9 8M 1M", uri.as_str()],
    );
}

#[test]
fn snapshots_and_clones_are_byte_exact_over_nbd() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempdir();
    let agent = Agent::start(&dir.path().join("a"));
    let uri = agent.create_volume("base", "32M");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xa1 0 4M",
            "-c",
            "write -P 0xa2 20M 1M",
            uri.as_str(),
        ],
    );
    let snap = agent.ctl_json(&["snapshot", "create", "base", "s1"]);
    let snap_uri = snap[0]["nbd_uri"]
        .as_str()
        .expect("snapshot uri")
        .to_owned();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xbb 0 1M", uri.as_str()],
    );
    // The snapshot kept the old contents; the volume has the new ones.
    run_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0xa1 0 4M",
            "-c",
            "read -P 0xa2 20M 1M",
            &snap_uri,
        ],
    );
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0xbb 0 1M", uri.as_str()],
    );
    let from_snap = agent.ctl_json(&["volume", "create", "restored", "--from-snapshot", "base@s1"]);
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &snap_uri,
            from_snap["nbd_uri"].as_str().expect("uri"),
        ],
    );
    let clone = agent.ctl_json(&["volume", "create", "copy", "--clone-of", "base"]);
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            uri.as_str(),
            clone["nbd_uri"].as_str().expect("uri"),
        ],
    );
    // The comparison can fail: the clone differs from the snapshot.
    assert!(
        !run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                &snap_uri,
                clone["nbd_uri"].as_str().expect("uri")
            ]
        )
        .status
        .success()
    );
    // Copies are sparse: about 5 MiB allocated, not 32.
    assert!(
        clone["allocated_bytes"].as_u64().expect("allocated") < 8 << 20,
        "{clone}"
    );
    assert!(
        agent.ctl_json(&["snapshot", "delete", "base", "s1"])["deleted"]
            .as_bool()
            .expect("bool")
    );
    assert!(
        !agent.ctl_json(&["snapshot", "delete", "base", "s1"])["deleted"]
            .as_bool()
            .expect("bool")
    );
}

#[test]
fn emberctl_contract_and_bad_arguments() {
    let dir = tempdir();
    let agent = Agent::start(&dir.path().join("a"));
    let v = agent.ctl_json(&["volume", "create", "c1", "--size", "1G"]);
    assert_eq!(v["name"], "c1");
    assert_eq!(v["size_bytes"], 1u64 << 30);
    assert!(
        v["nbd_uri"]
            .as_str()
            .expect("uri")
            .starts_with("nbd://127.0.0.1:")
    );
    assert_eq!(
        agent.ctl_json(&["volume", "create", "c1", "--size", "1G"])["created"],
        false
    );
    let status = agent.ctl_json(&["status"]);
    assert!(status["backend_id"].as_str().expect("id").len() >= 16);
    assert!(["io_uring", "blocking"].contains(&status["io_engine"].as_str().expect("engine")));
    // The agent-wide replication memory budget and the NBD listener's TLS.
    assert!(
        status["replication_memory"]["budget_bytes"]
            .as_u64()
            .is_some_and(|b| b >= 16 << 20),
        "{status}"
    );
    assert_eq!(status["nbd_tls"], false, "{status}");
    let resized = agent.ctl_json(&["volume", "resize", "c1", "--size", "2G"]);
    assert_eq!(resized["size_bytes"], 2u64 << 30);
    for (args, want) in [
        (
            vec!["volume", "create", "c1", "--size", "3G"],
            "already exists",
        ),
        (
            vec!["volume", "create", "../etc", "--size", "1G"],
            "invalid volume name",
        ),
        (
            vec!["volume", "create", "odd", "--size", "1000"],
            "multiple of 4096",
        ),
        (vec!["volume", "resize", "c1", "--size", "1G"], "shrinking"),
        (vec!["volume", "show", "nope"], "not found"),
        (vec!["snapshot", "create", "nope", "s"], "not found"),
    ] {
        let out = agent.ctl(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    }
    assert_eq!(agent.ctl_json(&["volume", "delete", "c1"])["deleted"], true);
    assert_eq!(
        agent.ctl_json(&["volume", "delete", "c1"])["deleted"],
        false
    );
    assert_eq!(agent.ctl_json(&["volume", "list"]), serde_json::json!([]));

    // A reader that stops early (`| head -1`, `| grep -q`) ends the command
    // quietly: no panic on the broken pipe. The pipe's read end is closed
    // before emberctl starts, so every write meets EPIPE.
    agent.ctl_json(&["volume", "create", "c2", "--size", "1G"]);
    for args in [
        vec!["volume", "list"],
        vec!["volume", "list", "--json"],
        vec!["status", "--json"],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = std::process::Command::new(ember_it::bin("emberctl"))
            .args(["--api", &agent.api])
            .args(&args)
            .stdout(writer)
            .output()
            .expect("run emberctl");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !err.contains("panicked"),
            "{args:?} into a closed pipe: {:?} {err}",
            out.status
        );
    }
}

#[test]
fn a_full_disk_fails_writes_with_enospc_and_keeps_serving() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).expect("dir");
    // A 24 MiB file system for the data dir (needs root, as CI has).
    run_ok(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=24m",
            "tmpfs",
            mnt.to_str().expect("utf8"),
        ],
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let mut agent = Agent::start(&mnt.join("a"));
    let small = agent.create_volume("small", "4M");
    let big = agent.create_volume("big", "64M");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 7 0 1M", small.as_str()],
    );
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 48M", big.as_str()],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("No space left on device"),
        "expected ENOSPC: {text}"
    );
    assert!(agent.alive());
    // The other volume is intact and still served.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 7 0 1M", small.as_str()],
    );
    assert!(
        agent.log().contains("NBD request failed"),
        "ENOSPC must be logged"
    );
    // Control operations report the full disk precisely too.
    let out = agent.ctl(&["snapshot", "create", "big", "s"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("space"), "{err}");
    agent.terminate();
}

#[test]
fn raw_block_device_named_in_config_is_served_and_protected() {
    if !require_tool("losetup") || !require_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let backing = dir.path().join("disk.img");
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(32 << 20))
        .expect("backing file");
    let out = run_ok(
        "losetup",
        &["--find", "--show", backing.to_str().expect("utf8")],
    );
    let loopdev = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _detach = Detach(loopdev.clone());
    let cfg = dir.path().join("emberd.toml");
    std::fs::write(
        &cfg,
        format!("[[raw_volume]]\nname = \"raw1\"\ndevice = \"{loopdev}\"\n"),
    )
    .expect("config");
    let mut agent = Agent::start_with(
        &dir.path().join("a"),
        &["--config", cfg.to_str().expect("utf8")],
    );
    let v = agent.ctl_json(&["volume", "show", "raw1"]);
    assert_eq!(v["size_bytes"], 32u64 << 20, "{v}");
    let uri = v["nbd_uri"].as_str().expect("uri").to_owned();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x42 1M 1M", uri.as_str()],
    );
    // The bytes landed on the device (visible through its backing file).
    let raw = std::fs::read(&backing).expect("read backing");
    assert!(
        raw[1 << 20..2 << 20].iter().all(|b| *b == 0x42),
        "data did not reach the device"
    );
    assert_eq!(
        agent.ctl_json(&["volume", "dirty", "raw1"]),
        serde_json::json!([{ "offset": 1 << 20, "length": 1 << 20 }])
    );
    for (args, want) in [
        (vec!["volume", "delete", "raw1"], "raw device"),
        (
            vec!["volume", "resize", "raw1", "--size", "64M"],
            "raw device",
        ),
    ] {
        let out = agent.ctl(&args);
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(want),
            "{args:?}"
        );
    }
    // Snapshots of a device copy every byte (no SEEK_DATA on devices) and are exact.
    let snap = agent.ctl_json(&["snapshot", "create", "raw1", "s"]);
    run_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x42 1M 1M",
            "-c",
            "read -P 0 0 1M",
            snap[0]["nbd_uri"].as_str().expect("uri"),
        ],
    );
    agent.terminate();
    agent.restart();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x42 1M 1M", uri.as_str()],
    );
    assert_eq!(
        agent.ctl_json(&["volume", "dirty", "raw1"]),
        serde_json::json!([{ "offset": 1 << 20, "length": 1 << 20 }])
    );
}

#[test]
fn sigterm_under_fio_load_drains_and_leaves_a_clean_point() {
    if !require_tool("fio") {
        return;
    }
    let dir = tempdir();
    let mut agent = Agent::start(&dir.path().join("a"));
    agent.create_volume("drain", "128M");
    let mut fio = ember_it::fio_load(&agent.uri("drain"), &["--bs=64k", "--size=128M"]);
    std::thread::sleep(Duration::from_millis(1500));
    let started = std::time::Instant::now();
    agent.terminate(); // asserts a zero exit status
    let drain = started.elapsed();
    let _ = fio.kill();
    let _ = fio.wait();
    assert!(drain < Duration::from_secs(20), "drain took {drain:?}");
    let log = agent.log();
    assert!(
        log.contains("draining NBD I/O") && log.contains("emberd stopped cleanly"),
        "{log}"
    );
    agent.restart();
    // A clean point: the restart replays no activity-log window, so the
    // dirty set is exactly the written blocks.
    let restart_log = agent.log();
    let last_open = restart_log
        .rfind("change tracking opened")
        .expect("tracking opened");
    let line = restart_log[last_open..].lines().next().expect("line");
    assert!(line.contains("replayed_extents=0"), "{line}");
    let written = written_blocks(&dir.path().join("a/volumes/drain/data.img"));
    let dirty = dirty_blocks(&agent, "drain");
    assert!(!written.is_empty());
    assert_eq!(
        written, dirty,
        "after a clean stop the dirty set is exactly what was written"
    );
}
