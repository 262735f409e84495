//! Copy-on-write snapshots and clones on a loop-mounted XFS (`reflink=1`)
//! and, for contrast, ext4: extents are shared and contents byte-exact, a
//! snapshot under a running writer is a prefix of its history, the method
//! is reported, overwriting shared blocks on a full file system fails with
//! NBD ENOSPC while other volumes keep serving, and `kill -9` at random
//! steps of snapshot creation leaves nothing half-made and no space leaked.
//!
//! The agent's data dir is a symlink into the mount, so its log (written
//! next to the data dir) lives on `/` and neither fills nor is lost with
//! the file system under test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_it::repl::{check_prefix, read_history, snapshot_export, stamped_writer, wait_exit};
use ember_it::{Agent, LoopMount, require_python_module, require_tool, run, run_ok, tempdir};

const MIB: u64 = 1 << 20;

/// An agent whose data dir lives on `fs`. Returns the temp dir holding the
/// symlink and the log, which must outlive the agent.
fn agent_on(fs: &LoopMount, env: &[(&str, &str)]) -> (tempfile::TempDir, Agent) {
    let dir = tempdir();
    let real = fs.path().join("data");
    std::fs::create_dir_all(&real).expect("data dir on the mount");
    let link = dir.path().join("data");
    std::os::unix::fs::symlink(&real, &link).expect("symlink to the data dir");
    let agent = Agent::start_env(&link, &[], env);
    (dir, agent)
}

/// The pattern byte of MiB `i` of a volume filled with `seed`.
fn fill_byte(i: u64, seed: u64) -> u8 {
    ((i * 7 + seed) % 251) as u8 + 1
}

/// Writes every MiB of the first `mib` MiB of `uri` with its own pattern
/// (so misplaced or missing data shows up in a compare).
fn fill(uri: &str, mib: u64, seed: u64) {
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..mib {
        args.push("-c".into());
        args.push(format!("write -q -P {} {}M 1M", fill_byte(i, seed), i));
    }
    args.push(uri.into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok("qemu-io", &args);
}

/// Reads back what [`fill`] wrote, at 1 MiB granularity; fails the test on
/// the first MiB that differs.
fn verify_fill(uri: &str, mib: u64, seed: u64) {
    let mut args: Vec<String> = vec!["-r".into(), "-f".into(), "raw".into()];
    for i in 0..mib {
        args.push("-c".into());
        args.push(format!("read -q -P {} {}M 1M", fill_byte(i, seed), i));
    }
    args.push(uri.into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "{uri} does not hold fill seed {seed}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn compare(a: &str, b: &str) -> bool {
    run(
        "qemu-img",
        &["compare", "-q", "-f", "raw", "-F", "raw", a, b],
    )
    .status
    .success()
}

/// (shared, total) data blocks of `file` from FIEMAP (`filefrag -v`).
fn shared_blocks(file: &Path) -> (u64, u64) {
    let out = run_ok("filefrag", &["-v", file.to_str().expect("utf8")]);
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut shared, mut total) = (0, 0);
    for line in text.lines() {
        // "   0:   0..  2047:   24..  2071:   2048:     last,shared,eof"
        let cols: Vec<&str> = line.split(':').map(str::trim).collect();
        if cols.len() < 5 || cols[0].parse::<u64>().is_err() {
            continue;
        }
        let len: u64 = cols[3]
            .split_whitespace()
            .next()
            .and_then(|l| l.parse().ok())
            .expect("extent length");
        total += len;
        if line.contains("shared") {
            shared += len;
        }
    }
    (shared, total)
}

fn snapshot_data(agent: &Agent, vol: &str, snap: &str) -> PathBuf {
    agent
        .data_dir
        .join("volumes")
        .join(vol)
        .join("snapshots")
        .join(snap)
        .join("data.img")
}

fn require_clients() -> bool {
    require_tool("qemu-io") && require_tool("qemu-img") && require_tool("filefrag")
}

#[test]
fn cow_snapshot_of_a_full_1g_volume_shares_every_extent_and_is_byte_identical() {
    if !require_clients() {
        return;
    }
    let Some(fs) = LoopMount::xfs(3 << 30) else {
        return;
    };
    let (_dir, agent) = agent_on(&fs, &[]);
    assert_eq!(agent.ctl_json(&["status"])["snapshot_method"], "reflink");
    let uri = agent.create_volume("full", "1G");
    fill(&uri, 1024, 1);

    let before = fs.free_bytes();
    let t = Instant::now();
    let snap = agent.ctl_json(&["snapshot", "create", "full", "s1"]);
    let took = t.elapsed();
    let used = before.saturating_sub(fs.free_bytes());
    println!("snapshot of 1 GiB allocated: {took:?}, {used} bytes of space");
    assert!(
        used < 16 * MIB,
        "a reflink snapshot took {used} bytes of space"
    );
    let (shared, total) = shared_blocks(&snapshot_data(&agent, "full", "s1"));
    assert_eq!(total, 1 << 18, "the snapshot holds 1 GiB of 4 KiB blocks");
    assert_eq!(shared, total, "every extent of the snapshot is shared");
    assert!(
        agent.log().contains("method=reflink"),
        "the log names the method"
    );

    let snap_uri = snap[0]["nbd_uri"].as_str().expect("snapshot uri");
    assert!(compare(&uri, snap_uri), "snapshot differs from its volume");

    // Overwriting the volume unshares those blocks: the volume now costs
    // space, the snapshot keeps the old bytes, and the comparison can fail.
    let before = fs.free_bytes();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -q -P 0xee 100M 64M", &uri],
    );
    let used = before.saturating_sub(fs.free_bytes());
    assert!(
        used >= 60 * MIB,
        "overwriting 64 MiB of shared blocks allocated only {used} bytes"
    );
    assert!(!compare(&uri, snap_uri));
    verify_fill(snap_uri, 1024, 1);
    let (shared, _) = shared_blocks(&snapshot_data(&agent, "full", "s1"));
    assert_eq!(
        shared,
        (1 << 18) - 64 * 256,
        "the overwritten 64 MiB are no longer shared"
    );
}

#[test]
fn snapshot_under_a_running_writer_on_xfs_is_a_prefix_of_the_history() {
    if !require_tool("nbdcopy") || !require_python_module("nbd") {
        return;
    }
    let Some(fs) = LoopMount::xfs(1 << 30) else {
        return;
    };
    let (dir, agent) = agent_on(&fs, &[]);
    let blocks = 8192; // 32 MiB of stamped blocks
    let uri = agent.create_volume("busy", "32M");
    let history = dir.path().join("history");
    let mut writer = stamped_writer(&uri, &history, blocks, 1_000_000, false);
    let mut prefixes = Vec::new();
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        let name = format!("s{i}");
        let snap = agent.ctl_json(&["snapshot", "create", "busy", &name]);
        let image = snapshot_export(
            snap[0]["nbd_uri"].as_str().expect("uri"),
            &dir.path().join(&name),
        );
        let hist = read_history(&history);
        let p = check_prefix(&image, blocks, &hist).unwrap_or_else(|e| panic!("{name}: {e}"));
        prefixes.push(p);
    }
    let _ = writer.kill();
    wait_exit(&mut writer, Duration::from_secs(10));
    println!("snapshot prefixes: {prefixes:?}");
    assert!(prefixes[0] > 0, "the writer had not started");
    assert!(
        prefixes.windows(2).all(|w| w[0] < w[1]),
        "later snapshots hold later prefixes: {prefixes:?}"
    );
    assert!(agent.log().contains("method=reflink"));
}

#[test]
fn clone_and_volume_from_snapshot_on_xfs_share_extents_and_match() {
    if !require_clients() {
        return;
    }
    let Some(fs) = LoopMount::xfs(2 << 30) else {
        return;
    };
    let (_dir, agent) = agent_on(&fs, &[]);
    let uri = agent.create_volume("src", "256M");
    fill(&uri, 256, 3);
    let snap = agent.ctl_json(&["snapshot", "create", "src", "s"]);
    let snap_uri = snap[0]["nbd_uri"].as_str().expect("uri").to_owned();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -q -P 0x11 0 16M", &uri],
    );

    let before = fs.free_bytes();
    let clone = agent.ctl_json(&["volume", "create", "cl", "--clone-of", "src"]);
    let restored = agent.ctl_json(&[
        "volume",
        "create",
        "rs",
        "--from-snapshot",
        "src@s",
        "--size",
        "512M",
    ]);
    let used = before.saturating_sub(fs.free_bytes());
    assert!(
        used < 16 * MIB,
        "two reflink copies of 256 MiB took {used} bytes"
    );
    let clone_uri = clone["nbd_uri"].as_str().expect("uri");
    let restored_uri = restored["nbd_uri"].as_str().expect("uri");
    assert!(compare(&uri, clone_uri), "clone differs from its source");
    assert_eq!(restored["size_bytes"], 512 * MIB);
    verify_fill(restored_uri, 256, 3);
    // The grown tail reads as zeros.
    run_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -q -P 0 256M 256M",
            restored_uri,
        ],
    );
    assert!(
        !compare(&snap_uri, clone_uri),
        "the clone has the newer bytes"
    );
    for vol in ["cl", "rs"] {
        let data = agent.data_dir.join("volumes").join(vol).join("data.img");
        let (shared, total) = shared_blocks(&data);
        assert!(
            total >= 256 * 256 && shared == total,
            "{vol}: {shared}/{total} blocks shared"
        );
    }
    // The copies are independent: writing one leaves the others alone.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -q -P 0x22 0 1M", clone_uri],
    );
    verify_fill(&snap_uri, 256, 3);
    verify_fill(restored_uri, 256, 3);
    run_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -q -P 0x11 1M 15M", &uri],
    );
}

#[test]
fn snapshot_method_is_reflink_on_xfs_and_copy_on_ext4() {
    if !require_clients() {
        return;
    }
    let Some(xfs) = LoopMount::xfs(512 << 20) else {
        return;
    };
    let Some(ext4) = LoopMount::ext4(512 << 20) else {
        return;
    };
    // The durability barrier too: one log force on XFS, two rounds on ext4.
    for (fs, want, barrier) in [
        (&xfs, "reflink", "one-log-force"),
        (&ext4, "copy", "file-then-dir"),
    ] {
        let (_dir, agent) = agent_on(fs, &[]);
        assert_eq!(agent.ctl_json(&["status"])["snapshot_method"], want);
        let human = String::from_utf8_lossy(&agent.ctl(&["status"]).stdout).into_owned();
        assert!(
            human
                .lines()
                .any(|l| l.contains("snapshot method") && l.contains(want)),
            "{human}"
        );
        // The probe leaves nothing behind in the data dir.
        let stray: Vec<_> = std::fs::read_dir(&agent.data_dir)
            .expect("data dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".reflink-probe"))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
        // Snapshots work either way and are exact; only reflink is free.
        let uri = agent.create_volume("v", "64M");
        fill(&uri, 64, 5);
        let before = fs.free_bytes();
        let snap = agent.ctl_json(&["snapshot", "create", "v", "s"]);
        let used = before.saturating_sub(fs.free_bytes());
        verify_fill(snap[0]["nbd_uri"].as_str().expect("uri"), 64, 5);
        if want == "reflink" {
            assert!(used < 8 * MIB, "{want}: {used}");
        } else {
            assert!(
                used >= 60 * MIB,
                "{want}: a copy of 64 MiB took only {used}"
            );
        }
        assert!(agent.log().contains(&format!("method={want}")));
        assert!(
            agent.log().contains(&format!("barrier={barrier}")),
            "{want}: no barrier={barrier} in the log"
        );
        // The record is an xattr of the data file, not a file of its own.
        let snap_dir = agent.data_dir.join("volumes/v/snapshots/s");
        assert!(snap_dir.join("data.img").exists());
        assert!(
            !snap_dir.join("snapshot.json").exists(),
            "{want}: a snapshot.json was written"
        );
    }
}

#[test]
fn overwriting_shared_blocks_on_a_full_fs_gives_enospc_and_other_volumes_keep_serving() {
    if !require_clients() || !require_tool("fallocate") {
        return;
    }
    let Some(fs) = LoopMount::xfs(600 << 20) else {
        return;
    };
    let (_dir, mut agent) = agent_on(&fs, &[]);
    let big = agent.create_volume("big", "128M");
    let other = agent.create_volume("other", "16M");
    fill(&big, 128, 9);
    fill(&other, 16, 4);
    let snap = agent.ctl_json(&["snapshot", "create", "big", "s"]);
    let snap_uri = snap[0]["nbd_uri"].as_str().expect("uri").to_owned();
    // Fill the file system, leaving about 8 MiB: far less than the 128 MiB
    // an overwrite of the shared blocks needs.
    let filler = fs.path().join("filler");
    let free = fs.free_bytes();
    run_ok(
        "fallocate",
        &[
            "-l",
            &(free - 8 * MIB).to_string(),
            filler.to_str().expect("utf8"),
        ],
    );
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 0 128M", &big],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("No space left on device"),
        "expected ENOSPC from overwriting shared blocks: {text}"
    );
    assert!(agent.alive(), "the agent survives a full file system");
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("NBD request failed") && l.contains("errno=28")),
        "ENOSPC must be logged: {log}"
    );
    // Nothing is corrupted: the snapshot holds its bytes, the other volume
    // reads and writes (in place: its blocks are not shared).
    verify_fill(&snap_uri, 128, 9);
    verify_fill(&other, 16, 4);
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -q -P 0x33 0 1M", &other],
    );
    run_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -q -P 0x33 0 1M", &other],
    );
    // With space back, the overwrite succeeds and everything is as written.
    std::fs::remove_file(&filler).expect("remove filler");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -q -P 0x77 0 128M", &big],
    );
    run_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -q -P 0x77 0 128M", &big],
    );
    verify_fill(&snap_uri, 128, 9);
    // And it all survives a restart.
    agent.terminate();
    agent.restart();
    verify_fill(&snap_uri, 128, 9);
    run_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -q -P 0x77 0 128M", &big],
    );
}

/// Every name under the volumes dir (recursively), relative to it.
fn tree(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let p = e.path();
            out.insert(
                p.strip_prefix(root)
                    .expect("under root")
                    .to_string_lossy()
                    .into_owned(),
            );
            if e.file_type().expect("file type").is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

/// xorshift64: the crash test's kill moments, reproducible from the seed.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[test]
fn kill_9_at_random_steps_of_snapshot_and_clone_creation_leaves_nothing_half_made() {
    if !require_clients() {
        return;
    }
    let Some(fs) = LoopMount::xfs(1 << 30) else {
        return;
    };
    const STEP_MS: u64 = 250;
    let seed: u64 = std::env::var("EMBER_IT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0ff_ee00_0013);
    println!("seed {seed} (set EMBER_IT_SEED to reproduce)");
    let mut rng = seed | 1;
    let (_dir, mut agent) = agent_on(
        &fs,
        &[("EMBER_FAULT_SNAPSHOT_STEP_DELAY_MS", &STEP_MS.to_string())],
    );
    let uri = agent.create_volume("vol", "128M");
    fill(&uri, 128, 0);
    // Settle: the free space every iteration must return to.
    let baseline = fs.free_bytes();
    let vols = agent.data_dir.join("volumes");
    let mut outcomes = BTreeSet::new();
    for i in 0..10u64 {
        let name = format!("k{i}");
        // Every third iteration makes a clone (same steps, under
        // `volumes/.creating-NAME`) instead of a snapshot.
        let clone = i % 3 == 2;
        let args: Vec<&str> = if clone {
            vec!["volume", "create", &name, "--clone-of", "vol"]
        } else {
            vec!["snapshot", "create", "vol", &name]
        };
        let log_mark = agent.log().len();
        let mut ctl = Command::new(ember_it::bin("emberctl"))
            .args(["--api", &agent.api])
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn emberctl");
        // The steps take about 4 x STEP_MS; kill anywhere in them (and
        // sometimes just after).
        let delay = next(&mut rng) % (5 * STEP_MS);
        std::thread::sleep(Duration::from_millis(delay));
        agent.kill9();
        let _ = ctl.wait();
        let log = agent.log()[log_mark..].to_owned();
        let last_step = ["published", "meta", "data", "dir"]
            .into_iter()
            .find(|s| log.contains(&format!("step=\"{s}\"")) || log.contains(&format!("step={s}")))
            .unwrap_or("none");
        agent.restart();

        // Listed snapshots (clones) are whole: metadata and the volume's
        // bytes as of the copy (the volume held fill seed i when it was
        // taken).
        let listed = if clone {
            agent.ctl_json(&["volume", "list"])
        } else {
            agent.ctl_json(&["snapshot", "list", "vol"])
        };
        let names: Vec<&str> = listed
            .as_array()
            .expect("list")
            .iter()
            .map(|s| s["name"].as_str().expect("name"))
            .filter(|n| *n != "vol")
            .collect();
        assert!(names.len() <= 1, "iteration {i}: {names:?}");
        if let Some(s) = names.first() {
            assert_eq!(*s, name);
            let export = if clone {
                name.clone()
            } else {
                format!("vol@{name}")
            };
            verify_fill(&agent.uri(&export), 128, i);
        }
        if last_step == "published" {
            assert_eq!(
                names,
                [name.as_str()],
                "published before the kill, so listed"
            );
        }
        outcomes.insert(format!(
            "{}:{last_step}/{}",
            if clone { "clone" } else { "snapshot" },
            if names.is_empty() { "absent" } else { "listed" }
        ));
        // Nothing half-made is left on disk.
        let left: Vec<String> = tree(&vols)
            .into_iter()
            .filter(|p| p.contains(".creating-") || p.contains(".deleting-") || p.ends_with(".tmp"))
            .collect();
        assert!(
            left.is_empty(),
            "iteration {i} (killed after {last_step}): leftovers {left:?}"
        );
        let stray: Vec<String> = tree(&agent.data_dir)
            .into_iter()
            .filter(|p| p.contains(".reflink-probe"))
            .collect();
        assert!(stray.is_empty(), "probe leftovers {stray:?}");
        // The volume is intact, then rewritten whole: a leaked clone would
        // now pin 128 MiB of old blocks and show in the free space.
        verify_fill(&uri, 128, i);
        if !names.is_empty() {
            if clone {
                agent.ctl_json(&["volume", "delete", &name]);
            } else {
                agent.ctl_json(&["snapshot", "delete", "vol", &name]);
            }
        }
        fill(&uri, 128, i + 1);
        let free = fs.free_bytes();
        assert!(
            free + 32 * MIB >= baseline,
            "iteration {i} (killed after {last_step}): {} MiB of space leaked",
            (baseline - free) / MIB
        );
    }
    println!("outcomes: {outcomes:?}");
    // The seeded kill moments must reach different steps, or the test
    // proves little.
    assert!(
        outcomes.len() >= 3,
        "kills landed at too few steps: {outcomes:?}"
    );
}
