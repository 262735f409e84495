//! RPO enforcement between two real agents, with the link slowed by the
//! fault proxy's rate limit (no netem or tc shaping of loopback here): a
//! writer offers three times what the link carries. `alert` reports the
//! breach within a second; `throttle` holds the lag under the target by
//! slowing the writer; `escalate` replicates synchronously while the lag is
//! high and returns to async after. Capabilities report the RPO range each
//! peer can hold.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_it::repl::{TwoSites, tail};
use ember_it::require_tool;

const MIB: u64 = 1 << 20;
/// What the link carries in these tests.
const LINK: u64 = 4 * MIB;

/// fio offering `rate` bytes/s of 64 KiB random writes for `secs`, with its
/// JSON report written to `report`.
fn offered_load(uri: &str, rate: u64, secs: u64, report: &std::path::Path) -> std::process::Child {
    Command::new("fio")
        .args([
            // One process (see `ember_it::fio_load`): nothing outlives a kill.
            "--thread",
            "--name=offered",
            "--ioengine=nbd",
            "--uri",
            uri,
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=8",
            "--size=256M",
            "--time_based",
        ])
        .arg(format!("--runtime={secs}"))
        .arg(format!("--rate={rate}"))
        .arg("--output-format=json")
        .arg(format!("--output={}", report.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fio")
}

fn fio_write_bw(report: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(report).expect("fio report");
    let start = text.find('{').expect("json in the fio report");
    let v: serde_json::Value = serde_json::from_str(&text[start..]).expect("fio json");
    v["jobs"][0]["write"]["bw_bytes"]
        .as_u64()
        .expect("bw_bytes")
}

fn setup(policy: &str, rpo: &str) -> TwoSites {
    let sites = TwoSites::start(&[], &[]);
    sites.a.create_volume("r", "256M");
    let s = sites.a.ctl_json(&[
        "replica",
        "enable",
        "r",
        "--peer",
        "site-b",
        "--mode",
        "async",
        "--rpo",
        rpo,
        "--rpo-policy",
        policy,
    ]);
    assert_eq!(s["rpo_policy"], policy, "{s}");
    sites.wait_caught_up("r", Duration::from_secs(60));
    sites.proxy.set_rate(LINK);
    sites
}

/// Samples (elapsed, status) every 50 ms while `child` runs.
fn sample_while(
    sites: &TwoSites,
    child: &mut std::process::Child,
) -> Vec<(Duration, serde_json::Value)> {
    let start = Instant::now();
    let mut samples = Vec::new();
    while child.try_wait().expect("wait").is_none() {
        samples.push((start.elapsed(), sites.status("r")));
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "fio did not finish"
        );
    }
    samples
}

/// The samples as lines, for failure messages.
fn timeline(samples: &[(Duration, serde_json::Value)]) -> String {
    samples
        .iter()
        .map(|(t, s)| {
            format!(
                "{:6.2}s lag {:5.2}s {:>10} B breached {} escalated {}",
                t.as_secs_f64(),
                lag(s),
                s["lag_bytes"],
                s["rpo_breached"],
                s["rpo_escalated"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn lag(s: &serde_json::Value) -> f64 {
    s["lag_seconds"].as_f64().expect("lag_seconds")
}

#[test]
fn alert_reports_a_breach_within_a_second() {
    if !require_tool("fio") {
        return;
    }
    let sites = setup("alert", "1s");
    let report = sites.dir.path().join("fio.json");
    let mut fio = offered_load(&sites.a.uri("r"), 3 * LINK, 6, &report);
    let samples = sample_while(&sites, &mut fio);
    let over = samples
        .iter()
        .find(|(_, s)| lag(s) > 1.0)
        .map(|(t, _)| *t)
        .unwrap_or_else(|| {
            panic!(
                "the lag never passed the 1 s target; last: {:?}",
                samples.last()
            )
        });
    let reported = samples
        .iter()
        .find(|(_, s)| s["rpo_breached"] == true)
        .map(|(t, _)| *t)
        .expect("the breach was never reported");
    assert!(
        reported <= over + Duration::from_secs(1),
        "breach reported {:?} after the lag passed the target",
        reported.saturating_sub(over)
    );
    let last = &samples.last().expect("samples").1;
    assert!(last["rpo_breaches"].as_u64().expect("count") >= 1, "{last}");
    assert!(
        sites.a.log().contains("RPO breach"),
        "no breach in the log: {}",
        tail(&sites.a.log())
    );
    // Alert does not slow the writer: it got well above the link's rate.
    let bw = fio_write_bw(&report);
    assert!(bw > 2 * LINK, "alert throttled the writer to {bw} B/s");

    // Once the link catches up the breach ends.
    sites.proxy.set_rate(0);
    let s = sites.wait_caught_up("r", Duration::from_secs(120));
    sites.wait_for("r", Duration::from_secs(5), "breach cleared", |s| {
        s["rpo_breached"] == false
    });
    assert_eq!(s["rpo_policy"], "alert");
}

#[test]
fn throttle_holds_the_lag_under_the_target_at_three_times_the_link() {
    if !require_tool("fio") {
        return;
    }
    let sites = setup("throttle", "2s");
    let report = sites.dir.path().join("fio.json");
    let mut fio = offered_load(&sites.a.uri("r"), 3 * LINK, 8, &report);
    let samples = sample_while(&sites, &mut fio);
    let worst = samples.iter().map(|(_, s)| lag(s)).fold(0.0, f64::max);
    assert!(
        worst < 2.0,
        "throttle let the lag reach {worst:.2} s against a 2 s target:\n{}",
        timeline(&samples)
    );
    assert!(
        samples.iter().all(|(_, s)| s["rpo_breached"] == false),
        "a breach was reported under throttle"
    );
    // The writer was slowed to about what the link carries.
    let bw = fio_write_bw(&report);
    assert!(
        bw < 2 * LINK,
        "the writer got {bw} B/s through a {LINK} B/s link: not throttled"
    );
    assert!(bw > LINK / 8, "the writer was starved: {bw} B/s");
}

#[test]
fn escalate_goes_sync_while_the_lag_is_high_and_back_after() {
    if !require_tool("fio") || !require_tool("qemu-img") {
        return;
    }
    let sites = setup("escalate", "2s");
    let report = sites.dir.path().join("fio.json");
    let mut fio = offered_load(&sites.a.uri("r"), 3 * LINK, 8, &report);
    let samples = sample_while(&sites, &mut fio);
    assert!(
        samples.iter().any(|(_, s)| s["rpo_escalated"] == true),
        "never escalated; worst lag {:.2} s",
        samples.iter().map(|(_, s)| lag(s)).fold(0.0, f64::max)
    );
    let worst = samples.iter().map(|(_, s)| lag(s)).fold(0.0, f64::max);
    assert!(
        worst < 2.0,
        "escalation let the lag reach {worst:.2} s:\n{}",
        timeline(&samples)
    );
    sites.proxy.set_rate(0);
    sites.wait_for("r", Duration::from_secs(30), "back to async", |s| {
        s["rpo_escalated"] == false && s["lag_bytes"] == 0
    });
    sites.wait_caught_up("r", Duration::from_secs(60));
    sites.assert_identical("r");
}

#[test]
fn capabilities_report_the_rpo_range_each_peer_can_hold() {
    if !require_tool("fio") {
        return;
    }
    let sites = TwoSites::start(&[], &[]);
    let target = |caps: &serde_json::Value| caps["replication_targets"][0].clone();
    let t = target(&sites.a.ctl_json(&["status"]));
    assert_eq!(t["site"], "site-b", "{t}");
    assert_eq!(t["state"], "connected", "{t}");
    assert_eq!(t["sync_possible"], true, "{t}");
    assert_eq!(t["min_rpo_seconds"], 0, "{t}");
    // Idle: nothing limits how far the journal can fall behind.
    assert_eq!(t["max_rpo_seconds"], 86_400, "{t}");

    // Under a write load the journal covers fewer seconds.
    sites.a.create_volume("c", "256M");
    sites.a.ctl_json(&[
        "replica", "enable", "c", "--peer", "site-b", "--mode", "async",
    ]);
    sites.wait_caught_up("c", Duration::from_secs(60));
    let report = sites.dir.path().join("fio.json");
    let mut fio = offered_load(&sites.a.uri("c"), 16 * MIB, 4, &report);
    let _ = fio.wait();
    let t = target(&sites.a.ctl_json(&["status"]));
    let max = t["max_rpo_seconds"].as_u64().expect("max");
    assert!(
        (1..86_400).contains(&max),
        "max RPO under a 16 MiB/s load should be the 256 MiB journal's reach, got {t}"
    );
    assert_eq!(t["volumes"], 1, "{t}");

    // Unreachable peer: no sync, min RPO 1 s.
    sites.proxy.cut();
    let t = target(&sites.a.ctl_json(&["status"]));
    assert_eq!(t["state"], "unreachable", "{t}");
    assert_eq!(t["sync_possible"], false, "{t}");
    assert_eq!(t["min_rpo_seconds"], 1, "{t}");
}
