//! The operator kit, tested the way an operator meets it: the Prometheus
//! alerting rules (`packaging/prometheus/ember-rules.yml`) pass
//! `promtool check rules` and their unit tests, and fire on series scraped
//! from a real pair of agents whose link is cut (so a renamed metric breaks
//! this test, not the pager); the Grafana dashboard has what Grafana needs
//! and every query parses and returns data from those series; `emberctl
//! top` redraws in place in a real terminal (tmux) and quits on `q`, and
//! prints plain lines when piped; the lab's foreground view is that view;
//! and errors read `emberctl: <agent message> (CODE)`, or JSON with `--json`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ember_it::repl::{TwoSites, tail};
use ember_it::{Agent, bin, require_tool, run, tempdir};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn rules_path() -> PathBuf {
    repo().join("packaging/prometheus/ember-rules.yml")
}

fn dashboard() -> Value {
    let path = repo().join("packaging/grafana/ember.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("read the dashboard"))
        .expect("the dashboard is JSON")
}

fn promtool(args: &[&str], dir: &Path) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool")
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `- alert: NAME` entries of the rules file with their severity and
/// runbook, read line by line (the file is ours and regular).
fn alerts(rules: &str) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = Vec::new();
    for line in rules.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert: ") {
            out.push((name.to_owned(), String::new(), String::new()));
        } else if let Some(last) = out.last_mut() {
            if let Some(s) = line.strip_prefix("severity: ") {
                last.1 = s.to_owned();
            } else if let Some(r) = line.strip_prefix("runbook_url: ") {
                last.2 = r.trim_matches('"').to_owned();
            }
        }
    }
    out
}

/// GitHub-style anchors of the Markdown headings in `doc`.
fn anchors(doc: &str) -> BTreeSet<String> {
    doc.lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == '-' || *c == ' ')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

/// Metric names (`ember_…`) an expression refers to.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("ember_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        if boundary {
            names.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// The rules file without comments: what Prometheus evaluates.
fn rule_text() -> String {
    std::fs::read_to_string(rules_path())
        .expect("read the rules")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every PromQL query of the dashboard: (panel title, expression), with
/// Grafana's variables replaced the way Grafana sends them for "All".
fn dashboard_queries(d: &Value, rate_interval: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            let expr = expr
                .replace("$__rate_interval", rate_interval)
                .replace("$site", ".*")
                .replace("$peer", ".*")
                .replace("$volume", ".*");
            out.push((p["title"].as_str().expect("title").to_owned(), expr));
        }
    }
    out
}

#[test]
fn alerting_rules_pass_promtool_and_every_alert_has_firing_and_quiet_tests() {
    if !require_tool("promtool") {
        return;
    }
    let dir = repo().join("packaging/prometheus");
    assert_ok(
        &promtool(&["check", "rules", "ember-rules.yml"], &dir),
        "promtool check rules",
    );
    let tests: Vec<String> = std::fs::read_dir(dir.join("tests"))
        .expect("rule tests dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yml"))
        .collect();
    assert!(!tests.is_empty(), "no rule tests");
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(String::as_str));
    let out = promtool(&args, &dir.join("tests"));
    assert_ok(&out, "promtool test rules");

    // Each alert: a severity, a runbook section that exists, and at least
    // one test where it fires and one where it must not.
    let rules = std::fs::read_to_string(rules_path()).expect("rules");
    let doc = std::fs::read_to_string(repo().join("docs/operations.md")).expect("operations.md");
    let anchors = anchors(&doc);
    let test_text: String = tests
        .iter()
        .map(|t| std::fs::read_to_string(dir.join("tests").join(t)).expect("test file"))
        .collect();
    let test_lines: Vec<&str> = test_text.lines().map(str::trim).collect();
    let list = alerts(&rules);
    assert!(list.len() >= 8, "{list:?}");
    for (name, severity, runbook) in &list {
        assert!(
            severity == "warning" || severity == "critical",
            "{name}: severity {severity:?}"
        );
        let anchor = runbook
            .strip_prefix("docs/operations.md#")
            .unwrap_or_else(|| panic!("{name}: runbook {runbook:?} is not in docs/operations.md"));
        assert!(
            anchors.contains(anchor),
            "{name}: docs/operations.md has no section #{anchor}"
        );
        let cases: Vec<&str> = test_lines
            .windows(2)
            .filter(|w| w[0] == format!("alertname: {name}"))
            .map(|w| w[1])
            .collect();
        assert!(
            cases.contains(&"exp_alerts: []"),
            "{name} has no must-not-fire test"
        );
        assert!(cases.contains(&"exp_alerts:"), "{name} has no firing test");
    }
}

#[test]
fn dashboard_has_the_keys_grafana_needs_and_every_query_parses() {
    if !require_tool("promtool") {
        return;
    }
    let d = dashboard();
    for key in ["title", "uid", "panels", "templating", "time", "refresh"] {
        assert!(!d[key].is_null(), "dashboard has no {key}");
    }
    assert!(d["schemaVersion"].as_u64() >= Some(36), "schemaVersion");
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| v["name"].as_str().expect("variable name"))
        .collect();
    for v in ["datasource", "site", "peer", "volume"] {
        assert!(vars.contains(&v), "no template variable {v}: {vars:?}");
    }
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in panels {
        let title = p["title"].as_str().expect("panel title");
        titles.push(title);
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id in {title}"
        );
        assert!(p["type"].is_string(), "{title}: type");
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "{title}: gridPos.{k}");
        }
        for (i, t) in p["targets"].as_array().into_iter().flatten().enumerate() {
            assert!(t["refId"].is_string(), "{title} target {i}: refId");
            assert!(t["expr"].is_string(), "{title} target {i}: expr");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
    // What the issue asks to see.
    for want in [
        "Lag vs RPO target",
        "Replication state",
        "Throughput shipped",
        "Resync remaining",
        "Resync ETA",
        "Write latency",
        "Per peer RTT",
        "Peer reachable",
        "Consistent point age vs RPO target",
        "Recovery points",
        "DR drills active",
        "Replication memory vs budget",
    ] {
        assert!(titles.contains(&want), "no panel {want:?}: {titles:?}");
    }
    assert!(
        panels.iter().any(|p| p["type"] == "heatmap"),
        "write latency heatmap"
    );
    // Each query (and each variable's metric selector) as a recording rule:
    // promtool parses them all.
    let mut exprs = dashboard_queries(&d, "5m");
    for v in d["templating"]["list"].as_array().expect("list") {
        if let Some(q) = v["definition"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|s| s.rsplit_once(','))
                .map(|(sel, _)| sel.replace("$site", ".*").replace("$peer", ".*"))
                .unwrap_or_else(|| panic!("variable query {q:?}"));
            exprs.push((format!("variable {}", v["name"]), inner));
        }
    }
    let tmp = tempdir();
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, e)) in exprs.iter().enumerate() {
        yaml.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(e).expect("quote")
        ));
    }
    std::fs::write(tmp.path().join("dashboard.yml"), &yaml).expect("write");
    let out = promtool(&["check", "rules", "dashboard.yml"], tmp.path());
    assert_ok(
        &out,
        &format!("promtool check rules of the dashboard's queries\n{yaml}"),
    );
}

// ---------------------------------------------------------------------------
// End to end: real series from a real pair of agents.

/// The metrics address an agent logged (`metrics = "127.0.0.1:0"`).
fn metrics_addr(agent: &Agent) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = agent.log();
        let found = log
            .lines()
            .filter(|l| l.contains("Prometheus metrics"))
            .find_map(|l| {
                let at = l.find("metrics=")? + "metrics=".len();
                let rest = l[at..].trim_start_matches('"');
                Some(rest.split(['"', ' ', ',']).next()?.to_owned())
            });
        if let Some(addr) = found {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address in the log: {}",
            tail(&log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET /metrics, or `None` when the agent does not answer (Prometheus's
/// `up == 0`).
fn scrape(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// Scrapes `addr` until the body satisfies `pred` (30 s at most).
fn wait_scraped(addr: &str, what: &str, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = scrape(addr).unwrap_or_default();
        if pred(&body) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr}: never scraped {what}:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One sample line of the exposition: name, labels, value.
type Sample = (String, Vec<(String, String)>, String);

/// Parses OpenMetrics sample lines (`name{a="b",…} value`); comments and
/// `# EOF` are skipped. Label values keep their escapes, which is the form
/// promtool's series notation takes too.
fn samples(body: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).expect("sample line");
        let name = line[..name_end].to_owned();
        let mut labels = Vec::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices();
            let mut key = String::new();
            let mut end = 0;
            'labels: while let Some((_, c)) = chars.next() {
                match c {
                    '}' => {
                        end = chars.next().map_or(body.len(), |(i, _)| i);
                        break 'labels;
                    }
                    ',' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                        let mut value = String::new();
                        while let Some((_, c)) = chars.next() {
                            match c {
                                '\\' => {
                                    value.push('\\');
                                    value.push(chars.next().expect("escape").1);
                                }
                                '"' => break,
                                c => value.push(c),
                            }
                        }
                        labels.push((std::mem::take(&mut key), value));
                    }
                    c => key.push(c),
                }
            }
            rest = &body[end..];
        }
        let value = rest.split_whitespace().next().expect("value").to_owned();
        out.push((name, labels, value));
    }
    out
}

/// Scrapes of several targets at successive steps, turned into promtool
/// input series. Each scrape is one evaluation step (a minute in promtool's
/// clock): the real run takes seconds, the rules' `for:` clauses minutes,
/// and what is under test is the series' names, labels and values.
///
/// Timestamps (`*_timestamp_seconds`) are the one kind of value that
/// refers to the clock: each is moved into promtool's clock keeping its
/// real age at the scrape (promtool's `time()` at step N is N minutes
/// after 1970), so `time() - …` in a rule sees the age the agent had.
#[derive(Default)]
struct Recording {
    steps: usize,
    /// series text → value per step.
    series: BTreeMap<String, Vec<Option<String>>>,
    /// metric names seen, per site.
    names: BTreeMap<String, BTreeSet<String>>,
    /// (site, metric name) → label sets seen (without the target labels).
    labels: BTreeMap<(String, String), BTreeSet<LabelSet>>,
}

/// A sample's labels, in scrape order.
type LabelSet = Vec<(String, String)>;

/// A scraped timestamp's value in promtool's clock at `step` (one minute
/// per step), keeping its age at `scraped_at` (unix seconds).
fn rebase_timestamp(value: &str, scraped_at: f64, step: usize) -> String {
    let v: f64 = value.parse().expect("timestamp value");
    format!("{:.3}", v - scraped_at + step as f64 * 60.0)
}

impl Recording {
    /// Scrapes every target once; a target that does not answer gets
    /// `up 0` and its series go stale, as in Prometheus.
    fn step(&mut self, targets: &[(&str, &str)]) {
        let step = self.steps;
        self.steps += 1;
        for (site, addr) in targets {
            let target = format!("job=\"ember\",instance=\"{addr}\",site=\"{site}\"");
            let body = scrape(addr);
            let scraped_at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_secs_f64();
            let up = if body.is_some() { "1" } else { "0" };
            self.put(format!("up{{{target}}}"), step, up);
            for (name, labels, value) in samples(body.as_deref().unwrap_or("")) {
                self.names
                    .entry((*site).to_owned())
                    .or_default()
                    .insert(name.clone());
                self.labels
                    .entry(((*site).to_owned(), name.clone()))
                    .or_default()
                    .insert(labels.clone());
                let mut l: Vec<String> =
                    labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                l.push(target.clone());
                let value = if name.ends_with("_timestamp_seconds") {
                    rebase_timestamp(&value, scraped_at, step)
                } else {
                    value
                };
                self.put(format!("{name}{{{}}}", l.join(",")), step, &value);
            }
        }
    }

    /// Asserts that `site` exported `name` with exactly these labels.
    fn assert_series(&self, site: &str, name: &str, labels: &[(&str, &str)]) {
        let want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let seen = self
            .labels
            .get(&(site.to_owned(), name.to_owned()))
            .cloned()
            .unwrap_or_default();
        assert!(
            seen.contains(&want),
            "{site} did not export {name}{want:?}; it exported {name} with {seen:?}"
        );
    }

    fn put(&mut self, series: String, step: usize, value: &str) {
        let values = self.series.entry(series).or_default();
        values.resize(step, None);
        values.push(Some(value.to_owned()));
    }

    /// promtool's `input_series` block.
    fn input_series(&self) -> String {
        let mut out = String::new();
        for (series, values) in &self.series {
            let mut text = Vec::new();
            for i in 0..self.steps {
                text.push(match values.get(i).cloned().flatten() {
                    Some(v) => v,
                    // A series that left the scrape is marked stale once.
                    None if i > 0 && values.get(i - 1).cloned().flatten().is_some() => {
                        "stale".into()
                    }
                    None => "_".into(),
                });
            }
            out.push_str(&format!(
                "      - series: {}\n        values: \"{}\"\n",
                serde_json::to_string(series).expect("quote"),
                text.join(" ")
            ));
        }
        out
    }
}

fn firing(alert: &str, severity: &str, labels: &[(&str, &str)]) -> String {
    let mut l: Vec<String> = vec![
        format!("alertname=\"{alert}\""),
        "alertstate=\"firing\"".into(),
        format!("severity=\"{severity}\""),
    ];
    l.extend(labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")));
    format!(
        "          - labels: {}\n            value: 1\n",
        serde_json::to_string(&format!("ALERTS{{{}}}", l.join(","))).expect("quote")
    )
}

#[test]
fn alerts_fire_on_series_scraped_from_agents_whose_link_is_cut() {
    if !require_tool("promtool") || !require_tool("qemu-io") {
        return;
    }
    let mut sites = TwoSites::start_with_config(&[], &[], "metrics = \"127.0.0.1:0\"\n");
    let (addr_a, addr_b) = (metrics_addr(&sites.a), metrics_addr(&sites.b));
    let uri = sites.a.create_volume("m", "64M");
    sites.a.ctl_json(&[
        "replica", "enable", "m", "--peer", "site-b", "--mode", "async", "--rpo", "1s",
    ]);
    sites.wait_caught_up("m", Duration::from_secs(60));
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 1M", &uri]);
    sites.wait_caught_up("m", Duration::from_secs(60));
    // A sync volume too: it degrades (keeps serving) when the link goes.
    sites.a.create_volume("s", "16M");
    sites.a.ctl_json(&[
        "replica", "enable", "s", "--peer", "site-b", "--mode", "sync",
    ]);
    sites.wait_caught_up("s", Duration::from_secs(60));
    let targets = [("site-a", addr_a.as_str()), ("site-b", addr_b.as_str())];
    let mut rec = Recording::default();
    // The agent probes its peers every 10 s; the first probe ran before
    // the pairing, so wait for one that saw site-b.
    wait_scraped(&addr_a, "a round trip to site-b", |m| {
        m.contains("ember_peer_rtt_seconds{peer=\"site-b\"}")
    });

    // Phase 1, steps 0-5: in sync. Nothing may fire.
    for _ in 0..6 {
        rec.step(&targets);
        std::thread::sleep(Duration::from_millis(200));
    }
    let quiet_at = rec.steps - 1;

    // Scheduled recovery points on a secondary without reflink (the test's
    // data dirs are on ext4): every one is refused, and counted.
    sites
        .a
        .ctl_json(&["replica", "set", "m", "--points-every", "1s"]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x33 0 1M", &uri]);
    sites.wait_caught_up("m", Duration::from_secs(60));
    wait_scraped(&addr_b, "a failed recovery point of m", |m| {
        m.lines().any(|l| {
            l.strip_prefix("ember_recovery_points_failed_total{volume=\"m\"} ")
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
        })
    });

    // Phase 2: the link is cut and site-a keeps taking writes; the lag
    // passes the 1 s target. Eight scrapes, all disconnected and breached.
    sites.cut_both(true);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x22 0 4M", &uri]);
    sites.wait_for(
        "m",
        Duration::from_secs(30),
        "disconnected and breached",
        |s| s["state"] == "disconnected" && s["rpo_breached"] == true,
    );
    sites.wait_for("s", Duration::from_secs(30), "degraded", |s| {
        s["state"] == "degraded"
    });
    for _ in 0..8 {
        rec.step(&targets);
        std::thread::sleep(Duration::from_millis(300));
    }
    let cut_at = rec.steps - 1;
    let s = sites.status("m");
    assert_eq!(s["state"], "disconnected", "{s}");
    let s = sites.status("s");
    assert_eq!(s["state"], "degraded", "{s}");

    // Phase 3: site-b's agent dies: its scrape fails (up 0) for 3 steps.
    sites.b.kill9();
    for _ in 0..3 {
        rec.step(&targets);
        std::thread::sleep(Duration::from_millis(200));
    }
    let down_at = rec.steps - 1;

    // Every metric the rules and the dashboard use is one the agents
    // export (site-a as a primary, site-b as a secondary). Only the drill
    // count needs a drill, which needs reflink: tests/tests/drills.rs
    // checks that series on a real drill.
    let exported: BTreeSet<String> = rec.names.values().flatten().cloned().collect();
    let mut used = metric_names(&rule_text());
    for (title, e) in dashboard_queries(&dashboard(), "4m") {
        for n in metric_names(&e) {
            assert!(
                exported.contains(&n) || n == "ember_drills_active",
                "dashboard panel {title:?} uses {n}, not exported: {exported:?}"
            );
        }
    }
    used.retain(|n| !exported.contains(n));
    assert!(
        used.is_empty(),
        "the rules use metrics emberd does not export: {used:?}"
    );

    // The series the newer rules and panels read, with the labels they
    // join on.
    let m_to_b = [("volume", "m"), ("peer", "site-b")];
    rec.assert_series(
        "site-a",
        "ember_replication_last_consistent_timestamp_seconds",
        &m_to_b,
    );
    rec.assert_series(
        "site-b",
        "ember_replication_last_consistent_timestamp_seconds",
        &[("volume", "m"), ("peer", "site-a")],
    );
    rec.assert_series("site-a", "ember_peer_rtt_seconds", &[("peer", "site-b")]);
    rec.assert_series("site-a", "ember_peer_connected", &[("peer", "site-b")]);
    rec.assert_series(
        "site-b",
        "ember_recovery_points_failed_total",
        &[("volume", "m")],
    );
    rec.assert_series("site-b", "ember_recovery_points", &[("volume", "m")]);
    for site in ["site-a", "site-b"] {
        rec.assert_series(site, "ember_replication_memory_used_bytes", &[]);
        rec.assert_series(site, "ember_replication_memory_budget_bytes", &[]);
    }

    let a_labels = [
        ("job", "ember"),
        ("instance", addr_a.as_str()),
        ("site", "site-a"),
        ("peer", "site-b"),
        ("volume", "m"),
    ];
    let mut disconnected = a_labels.to_vec();
    disconnected.push(("state", "disconnected"));
    let b_labels = [
        ("job", "ember"),
        ("instance", addr_b.as_str()),
        ("site", "site-b"),
    ];
    let breached = firing("EmberRpoBreached", "critical", &a_labels);
    let stale = firing("EmberConsistentPointStale", "critical", &a_labels);
    let points_failing = firing(
        "EmberRecoveryPointsFailing",
        "warning",
        &[
            ("job", "ember"),
            ("instance", addr_b.as_str()),
            ("site", "site-b"),
            ("volume", "m"),
        ],
    );
    let cut = firing("EmberReplicaDisconnected", "warning", &disconnected);
    let down = firing("EmberAgentDown", "critical", &b_labels);
    let degraded = firing(
        "EmberReplicaDegraded",
        "critical",
        &[
            ("job", "ember"),
            ("instance", addr_a.as_str()),
            ("site", "site-a"),
            ("peer", "site-b"),
            ("volume", "s"),
            ("state", "degraded"),
        ],
    );

    // The dashboard's queries return data from these series at the end of
    // the cut (the ETA needs a resync that is moving, which a cut link is
    // not, so it may be empty; no drill runs here), the peers' round trip
    // while the link was up.
    let mut dash_tests = String::new();
    for (title, e) in dashboard_queries(&dashboard(), "4m") {
        if title == "Resync ETA" || title == "DR drills active" {
            continue;
        }
        let at = if title == "Per peer RTT" {
            quiet_at
        } else {
            cut_at
        };
        dash_tests.push_str(&format!(
            "      - expr: {}\n        eval_time: {at}m\n        exp_samples:\n          - labels: '{{}}'\n            value: 1\n",
            serde_json::to_string(&format!("count({e}) > bool 0")).expect("quote")
        ));
    }
    let test = format!(
        "rule_files:\n  - {rules}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{series}    promql_expr_test:\n      - expr: ALERTS\n        eval_time: {quiet_at}m\n        exp_samples: []\n      - expr: ALERTS{{alertstate=\"firing\"}}\n        eval_time: {cut_at}m\n        exp_samples:\n{breached}{cut}{degraded}{stale}{points_failing}      - expr: ALERTS{{alertstate=\"firing\"}}\n        eval_time: {down_at}m\n        exp_samples:\n{breached}{cut}{degraded}{stale}{points_failing}{down}{dash_tests}",
        rules = rules_path().display(),
        series = rec.input_series(),
    );
    let dir = tempdir();
    std::fs::write(dir.path().join("scraped.test.yml"), &test).expect("write");
    let out = promtool(&["test", "rules", "scraped.test.yml"], dir.path());
    assert!(
        out.status.success(),
        "the rules did not fire as expected on the scraped series:\n{}{}\n--- test file ---\n{test}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// emberctl top, in a real terminal and piped.

/// A private tmux server (its own socket name), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `command` in a detached 160x40 session.
    fn start(command: &str) -> Self {
        let socket = format!(
            "ember-it-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        )
        .replace(['(', ')'], "");
        let t = Self { socket };
        let out = t.cmd(&[
            "new-session",
            "-d",
            "-s",
            "main",
            "-x",
            "160",
            "-y",
            "40",
            command,
        ]);
        assert_ok(&out, "tmux new-session");
        t
    }

    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("run tmux")
    }

    /// The visible screen.
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "main"]).stdout)
            .into_owned()
    }

    /// Waits until the screen satisfies `pred`; returns it.
    fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: never on screen:\n{s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn keys(&self, keys: &str) {
        assert_ok(
            &self.cmd(&["send-keys", "-t", "main", keys]),
            "tmux send-keys",
        );
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

fn ctl_command(agent: &Agent, args: &[&str]) -> String {
    let mut parts = vec![
        bin("emberctl").display().to_string(),
        "--api".into(),
        agent.api.clone(),
    ];
    parts.extend(agent.ctl_args.iter().cloned());
    parts.extend(args.iter().map(|a| (*a).to_owned()));
    parts.join(" ")
}

/// Screen lines that hold `word`, in order.
fn lines_with<'a>(screen: &'a str, word: &str) -> Vec<&'a str> {
    screen.lines().filter(|l| l.contains(word)).collect()
}

#[test]
fn top_redraws_in_place_worst_first_quits_on_q_and_prints_plain_lines_when_piped() {
    if !require_tool("tmux") {
        return;
    }
    let sites = TwoSites::start(&[], &[]);
    for (v, rpo) in [("calm", "1h"), ("tight", "1s")] {
        sites.a.create_volume(v, "16M");
        sites.a.ctl_json(&[
            "replica", "enable", v, "--peer", "site-b", "--mode", "async", "--rpo", rpo,
        ]);
        sites.wait_caught_up(v, Duration::from_secs(60));
    }
    // Both volumes lose the link; only "tight" breaches its target, so it
    // must come first although "calm" sorts first by name.
    sites.cut_both(true);
    for v in ["calm", "tight"] {
        run(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x33 0 1M", &sites.a.uri(v)],
        );
    }
    sites.wait_for("tight", Duration::from_secs(30), "breach", |s| {
        s["state"] == "disconnected" && s["rpo_breached"] == true
    });

    let top = ctl_command(&sites.a, &["top", "--interval", "300ms"]);
    let tmux = Tmux::start(&format!("{top}; echo TOP-EXITED $?; sleep 60"));
    let first = tmux.wait("the view", Duration::from_secs(15), |s| {
        s.contains("PEER site-b") && s.contains("tight") && s.contains("calm")
    });
    let rows: Vec<&str> = first
        .lines()
        .filter(|l| l.contains("tight") || l.contains("calm"))
        .collect();
    assert!(
        rows[0].contains("tight") && rows[0].contains("BREACHED"),
        "{first}"
    );
    assert!(
        rows[1].contains("calm") && rows[1].contains("disconnected"),
        "{first}"
    );
    let header = first
        .lines()
        .position(|l| l.starts_with("PEER site-b"))
        .expect("header");
    let volume_row = first
        .lines()
        .position(|l| l.contains("tight"))
        .expect("row");
    assert!(
        header < volume_row,
        "the peer header comes above its volumes:\n{first}"
    );
    assert!(first.lines().any(|l| l.contains("q quits")), "{first}");

    // Redrawn in place: after several refreshes the lag has moved on, and
    // the screen still holds one header and one row per volume (a scrolling
    // view would show several).
    tmux.wait("a refresh", Duration::from_secs(10), |s| {
        lines_with(s, "tight") != lines_with(&first, "tight")
    });
    std::thread::sleep(Duration::from_secs(1));
    let later = tmux.screen();
    assert_eq!(lines_with(&later, "PEER site-b").len(), 1, "{later}");
    assert_eq!(lines_with(&later, "tight").len(), 1, "{later}");
    assert_eq!(lines_with(&later, "calm").len(), 1, "{later}");

    // q quits with status 0 and gives the terminal back.
    tmux.keys("q");
    let after = tmux.wait("exit", Duration::from_secs(10), |s| {
        s.contains("TOP-EXITED")
    });
    assert!(after.contains("TOP-EXITED 0"), "{after}");
    assert!(
        !after.contains("PEER site-b"),
        "the alternate screen was not left:\n{after}"
    );

    // Piped: plain lines, no terminal codes, one block per refresh.
    let out = sites.a.ctl(&["top", "--count", "2", "--interval", "100ms"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains('\x1b'),
        "escape codes in piped output: {text:?}"
    );
    assert_eq!(lines_with(&text, "PEER site-b").len(), 2, "{text}");
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("tight") || l.contains("calm"))
        .collect();
    assert!(
        rows[0].contains("tight") && rows[1].contains("calm"),
        "{text}"
    );

    // --json: one object per refresh, rows worst first.
    let out = sites.a.ctl(&["--json", "top", "--count", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["replicas"][0]["volume"], "tight", "{v}");
    assert_eq!(v["replicas"][0]["rpo_breached"], true, "{v}");
    assert_eq!(v["peers"][0]["site"], "site-b", "{v}");
}

#[test]
fn lab_on_a_terminal_shows_the_top_view_under_its_banner_and_q_stops_the_lab() {
    if !require_tool("tmux") {
        return;
    }
    let dir = tempdir();
    let lab = dir.path().join("lab");
    let cmd = format!(
        "{} lab up --dir {} --size 16M; echo LAB-EXITED $?; sleep 60",
        bin("emberctl").display(),
        lab.display()
    );
    let tmux = Tmux::start(&cmd);
    let screen = tmux.wait("the lab's view", Duration::from_secs(60), |s| {
        s.contains("PEER site-b")
            && s.lines()
                .any(|l| l.contains("demo") && l.contains("in-sync"))
    });
    assert!(
        screen.contains("demo volume (primary, write here): nbd://"),
        "{screen}"
    );
    assert!(screen.contains("q or Ctrl-C stops the lab"), "{screen}");
    assert!(lab.join("lab.json").exists());
    tmux.keys("q");
    let after = tmux.wait("the lab stopping", Duration::from_secs(40), |s| {
        s.contains("LAB-EXITED")
    });
    assert!(after.contains("LAB-EXITED 0"), "{after}");
    assert!(after.contains("stopped site-a"), "{after}");
    assert!(!lab.join("lab.json").exists(), "lab down did not run");
}

// ---------------------------------------------------------------------------
// Errors people can read.

#[test]
fn errors_print_the_agent_message_then_the_code_and_json_errors_are_objects() {
    let dir = tempdir();
    let mut agent = Agent::start(&dir.path().join("a"));
    agent.create_volume("ok", "1M");
    let want =
        "volume ok is 1048576 bytes; shrinking to 524288 would lose data and is not supported";

    let out = agent.ctl(&["volume", "resize", "ok", "--size", "512K"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("emberctl: {want} (FAILED_PRECONDITION)\n")
    );

    let out = agent.ctl(&["--json", "volume", "resize", "ok", "--size", "512K"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let e: Value = serde_json::from_slice(&out.stderr).expect("a JSON error");
    assert_eq!(
        e,
        serde_json::json!({ "code": "FAILED_PRECONDITION", "message": want })
    );

    let out = agent.ctl(&["--json", "volume", "show", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let e: Value = serde_json::from_slice(&out.stderr).expect("a JSON error");
    assert_eq!(e["code"], "NOT_FOUND", "{e}");

    // A failure before any call has no gRPC code.
    let out = Command::new(bin("emberctl"))
        .args(["--json", "--api", "unix:/nonexistent/api.sock", "status"])
        .output()
        .expect("run emberctl");
    assert_eq!(out.status.code(), Some(1));
    let e: Value = serde_json::from_slice(&out.stderr).expect("a JSON error");
    assert!(e["code"].is_null(), "{e}");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot reach the agent")),
        "{e}"
    );
    agent.terminate();
}
