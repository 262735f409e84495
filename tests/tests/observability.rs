//! What an operator watches: `emberctl events` (the `WatchEvents` stream)
//! reports state changes, an RPO breach and a promotion as they happen, and
//! `/metrics` serves an exposition that the Prometheus project's own
//! OpenMetrics parser (python3-prometheus-client) accepts, with the lag,
//! RPO and breach series of each replicated volume.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ember_it::repl::{TwoSites, tail};
use ember_it::{bin, fio_load, require_tool};

const MIB: u64 = 1 << 20;

/// The metrics address site-a logged at start (`metrics = "127.0.0.1:0"`):
/// the `metrics=HOST:PORT` field of the "Prometheus metrics" line.
fn metrics_addr(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("Prometheus metrics"))
        .find_map(|l| {
            let at = l.find("metrics=")? + "metrics=".len();
            let rest = l[at..].trim_start_matches('"');
            Some(rest.split(['"', ' ', ',']).next()?.to_owned())
        })
        .unwrap_or_else(|| panic!("no metrics address in the log: {}", tail(log)))
}

fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to /metrics");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    body.to_owned()
}

/// Samples parsed by the Prometheus client's OpenMetrics parser.
fn parse(body: &str) -> Vec<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/parse_metrics.py");
    let mut child = Command::new("/usr/bin/python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run parse_metrics.py");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("feed");
    let out = child.wait_with_output().expect("parser");
    assert!(
        out.status.success(),
        "the exposition does not parse: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json sample"))
        .collect()
}

fn sample<'a>(samples: &'a [serde_json::Value], name: &str, volume: &str) -> &'a serde_json::Value {
    samples
        .iter()
        .find(|s| s["name"] == name && s["labels"]["volume"] == volume)
        .unwrap_or_else(|| panic!("no {name} for {volume} in {samples:?}"))
}

#[test]
fn events_and_metrics_report_breaches_states_and_promotions() {
    if !require_tool("fio") || !ember_it::require_python_module("prometheus_client") {
        return;
    }
    let sites = TwoSites::start_with_config(&[], &[], "metrics = \"127.0.0.1:0\"\n");
    // Follow site-a's events from before anything happens.
    let mut args: Vec<String> = vec!["--api".into(), sites.a.api.clone()];
    args.extend(sites.a.ctl_args.iter().cloned());
    args.extend(["--json".into(), "events".into()]);
    let mut watcher = Command::new(bin("emberctl"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("emberctl events");
    let (tx, rx) = mpsc::channel::<serde_json::Value>();
    let stdout = watcher.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let mut wait_event = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if seen.iter().any(pred) {
                return;
            }
            if let Ok(v) = rx.recv_timeout(Duration::from_millis(200)) {
                seen.push(v);
            }
        }
        panic!("no {what} event; saw {seen:#?}");
    };

    sites.a.create_volume("m", "256M");
    sites.a.ctl_json(&[
        "replica", "enable", "m", "--peer", "site-b", "--mode", "async", "--rpo", "1s",
    ]);
    sites.wait_caught_up("m", Duration::from_secs(60));
    wait_event("in-sync state", &|e| {
        e["kind"] == "state" && e["volume"] == "m" && e["state"] == "in-sync"
    });

    // A slow link and three times its rate in writes: a breach.
    sites.proxy.set_rate(2 * MIB);
    let mut fio = fio_load(&sites.a.uri("m"), &["--bs=64k", "--rate=6m", "--size=256M"]);
    wait_event("rpo-breach", &|e| {
        e["kind"] == "rpo-breach" && e["volume"] == "m"
    });

    let addr = metrics_addr(&sites.a.log());
    let samples = parse(&scrape(&addr));
    assert_eq!(
        sample(&samples, "ember_replication_rpo_breached", "m")["value"],
        1.0
    );
    assert!(
        sample(&samples, "ember_replication_rpo_breaches_total", "m")["value"].as_f64()
            >= Some(1.0)
    );
    assert!(sample(&samples, "ember_replication_lag_seconds", "m")["value"].as_f64() > Some(1.0));
    assert_eq!(
        sample(&samples, "ember_replication_rpo_target_seconds", "m")["value"],
        1.0
    );
    assert_eq!(
        sample(&samples, "ember_replication_lag_seconds", "m")["type"],
        "gauge"
    );
    assert_eq!(
        sample(&samples, "ember_replication_rpo_breaches_total", "m")["type"],
        "counter"
    );
    let state = sample(&samples, "ember_replication_state", "m");
    assert_eq!(state["labels"]["peer"], "site-b", "{state}");
    // fio's writes are in the volume's latency histogram.
    let count = sample(&samples, "ember_volume_write_latency_seconds_count", "m");
    assert_eq!(count["type"], "histogram", "{count}");
    assert!(count["value"].as_f64() > Some(0.0), "{count}");
    let buckets = samples
        .iter()
        .filter(|s| {
            s["name"] == "ember_volume_write_latency_seconds_bucket" && s["labels"]["volume"] == "m"
        })
        .count();
    assert!(buckets >= 20, "only {buckets} latency buckets");

    let _ = fio.kill();
    let _ = fio.wait();
    sites.proxy.set_rate(0);
    sites.wait_caught_up("m", Duration::from_secs(120));
    wait_event("rpo-met", &|e| e["kind"] == "rpo-met" && e["volume"] == "m");

    // A planned switchover shows as a demotion here.
    sites.b.ctl_json(&["replica", "promote", "m"]);
    wait_event("demoted", &|e| {
        e["kind"] == "demoted" && e["volume"] == "m" && e["generation"] == 2
    });
    let _ = watcher.kill();
    let _ = watcher.wait();
}
