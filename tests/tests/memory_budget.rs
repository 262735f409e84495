//! One replication memory budget per agent (issue 15, part 4): with
//! `replication_memory = "64M"`, 20 async volumes and the peer stalled,
//! 16 MiB written to each (5× the budget in total) never takes the
//! reported use past the budget nor the primary's RSS past its idle RSS
//! plus the budget plus a fixed allowance; the volumes over their share
//! fall back to change-set catch-up, and once the link is back every
//! replica converges byte-identical (`qemu-img compare`).

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ember_it::repl::{TwoSites, tail};
use ember_it::require_tool;

const MIB: u64 = 1 << 20;
const BUDGET: u64 = 64 * MIB;
const VOLUMES: usize = 20;
const PER_VOLUME: u64 = 16 * MIB;
/// Writers at once: enough that several journals compete for the pool.
const WRITERS: usize = 5;
/// RSS the burst may add beyond the budget: the NBD server's request
/// buffers and the write path's change copies of the writers in flight
/// (5 writers × 1 MiB requests, each buffered and copied: ~10 MiB), what
/// each stalled stream holds below the budget's count (HTTP/2's send
/// buffer, ≤ 400 KiB, the gRPC codec's buffer, one 64 KiB message, and
/// the pieces of the write being split: ~1 MiB; ~30 MiB for 20 streams),
/// and allocator slack. Measured with 64 KiB stream messages: peak
/// 127–134 MiB from an idle 28 MiB (budget + 35…42 MiB; with 1 MiB
/// messages it was 93–134). Mutations: the journal ignoring the budget
/// peaked at 191 MiB; the resync reads not holding budget, 318 MiB; the
/// budget granting everything reported 103 MiB used; large writes split
/// with `Vec::split_off` (each 64 KiB piece keeping the capacity it was
/// cut from, ~8.5 MiB per 1 MiB write) 193–195 MiB.
const ALLOWANCE: u64 = 64 * MIB;

/// Settled RSS may exceed twice the idle RSS by this much: the issue's
/// target is "within 2× of idle"; the slack covers the catch-up's
/// change-set and allocator bookkeeping of a 28 MiB idle agent.
const SETTLED_SLACK: u64 = 16 * MIB;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

fn memory(status: &serde_json::Value) -> (u64, u64, u64) {
    let m = &status["replication_memory"];
    (
        m["budget_bytes"].as_u64().expect("budget_bytes"),
        m["used_bytes"].as_u64().expect("used_bytes"),
        m["refusals"].as_u64().expect("refusals"),
    )
}

/// qemu-io writing `PER_VOLUME` of pattern `seed` in 1 MiB requests.
fn writer(uri: &str, seed: usize) -> std::process::Child {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for i in 0..PER_VOLUME / MIB {
        cmd.arg("-c")
            .arg(format!("write -P {} {}M 1M", (seed * 7 + 1) % 256, i));
    }
    cmd.arg(uri)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-io")
}

#[test]
fn the_budget_holds_under_a_stalled_peer_and_replicas_converge() {
    require_tool("qemu-io");
    require_tool("qemu-img");
    let sites = TwoSites::start_with_config(&[], &[], "replication_memory = \"64M\"");
    let names: Vec<String> = (0..VOLUMES).map(|i| format!("m{i}")).collect();
    for n in &names {
        sites.a.create_volume(n, "32M");
        sites.a.ctl_json(&[
            "replica", "enable", n, "--peer", "site-b", "--mode", "async",
        ]);
    }
    for n in &names {
        sites.wait_caught_up(n, Duration::from_secs(120));
    }
    let (budget, _, refusals_before) = memory(&sites.status("m0"));
    assert_eq!(budget, BUDGET, "the configured budget is reported");
    let pid = sites.a.child.as_ref().expect("site-a runs").id();
    std::thread::sleep(Duration::from_secs(3));
    let idle = rss_bytes(pid);

    sites.proxy.stall(true);
    // Sample the reported use and the RSS while the burst runs.
    let done = AtomicBool::new(false);
    let (max_used, max_rss, samples) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let (mut max_used, mut max_rss, mut i) = (0u64, 0u64, 0usize);
            while !done.load(Ordering::SeqCst) {
                let s = sites.status(&names[i % VOLUMES]);
                max_used = max_used.max(memory(&s).1);
                max_rss = max_rss.max(rss_bytes(pid));
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            (max_used, max_rss, i)
        });
        let started = Instant::now();
        for (c, vols) in names.chunks(WRITERS).enumerate() {
            let children: Vec<_> = vols
                .iter()
                .enumerate()
                .map(|(k, n)| (n, writer(&sites.a.uri(n), c * WRITERS + k)))
                .collect();
            for (n, child) in children {
                let out = child.wait_with_output().expect("qemu-io");
                assert!(
                    out.status.success(),
                    "qemu-io to {n}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        eprintln!("burst written in {:?}", started.elapsed());
        std::thread::sleep(Duration::from_secs(2));
        done.store(true, Ordering::SeqCst);
        sampler.join().expect("sampler")
    });
    let (_, _, refusals) = memory(&sites.status("m0"));
    eprintln!(
        "idle RSS {} MiB, peak RSS {} MiB, peak reported use {} MiB ({samples} samples), refusals {}",
        idle / MIB,
        max_rss / MIB,
        max_used / MIB,
        refusals - refusals_before
    );
    assert!(samples >= 10, "sampled only {samples} times");
    assert!(
        max_used <= BUDGET,
        "reported use {max_used} above the budget {BUDGET}"
    );
    assert!(
        refusals > refusals_before,
        "{} MiB written against a {} MiB budget, yet nothing was refused",
        VOLUMES as u64 * PER_VOLUME / MIB,
        BUDGET / MIB
    );
    assert!(
        max_rss <= idle + BUDGET + ALLOWANCE,
        "primary RSS peaked at {} MiB: idle {} MiB + budget {} MiB + allowance {} MiB",
        max_rss / MIB,
        idle / MIB,
        BUDGET / MIB,
        ALLOWANCE / MIB
    );

    sites.proxy.stall(false);
    for n in &names {
        sites.wait_caught_up(n, Duration::from_secs(180));
    }
    for n in &names {
        sites.assert_identical(n);
    }
    // Memory is given back after the burst (the allocator trimmer runs
    // every 2 s once the budget saw 16 MiB returned).
    std::thread::sleep(Duration::from_secs(5));
    let settled = rss_bytes(pid);
    eprintln!("settled RSS {} MiB after catch-up", settled / MIB);
    assert!(
        settled <= idle * 2 + SETTLED_SLACK,
        "primary RSS {} MiB after catch-up, idle was {} MiB",
        settled / MIB,
        idle / MIB
    );
    let after = sites.status("m0");
    assert!(
        memory(&after).1 <= BUDGET,
        "use after catch-up: {after}\n{}",
        tail(&sites.a.log())
    );
}
