//! Three real agents, site-a, site-b and site-c, every two paired over
//! mutual TLS, each site's peer listener behind its own [`FaultProxy`]:
//! the setup the three-site tests (`tests/three_sites*.rs`) share.

use std::time::{Duration, Instant};

use crate::repl::{lab_pki, site_config, tail};
use crate::{Agent, FaultProxy, free_port, tempdir};

/// The three sites' names, in order.
pub const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

/// Three agents, every two paired; `to_X` is the proxy in front of site
/// X's peer listener (cut, slow or delay it to act on every link into X).
#[derive(Debug)]
pub struct ThreeSites {
    /// Holds the PKI, the site configs and each site's data dir
    /// (`dir/site-a`, …).
    pub dir: tempfile::TempDir,
    /// site-a.
    pub a: Agent,
    /// site-b.
    pub b: Agent,
    /// site-c.
    pub c: Agent,
    /// In front of site-a's listener (site-a pairs in, after a promotion).
    pub to_a: FaultProxy,
    /// In front of site-b's listener.
    pub to_b: FaultProxy,
    /// In front of site-c's listener.
    pub to_c: FaultProxy,
}

impl ThreeSites {
    /// Issues a lab PKI, starts the three agents and pairs every site with
    /// both others (a promoted site replicates to them), each through the
    /// other's proxy.
    pub fn start() -> Self {
        let dir = tempdir();
        let pki = dir.path().join("pki");
        lab_pki(&pki, &SITES);
        let start = |site: &str| {
            let port = free_port();
            let cfg = site_config(dir.path(), &pki, site, port, "");
            let agent = Agent::start_env(&dir.path().join(site), &["--config", &cfg], &[]);
            let proxy = FaultProxy::start(format!("127.0.0.1:{port}").parse().expect("addr"));
            (agent, proxy)
        };
        let (a, to_a) = start("site-a");
        let (b, to_b) = start("site-b");
        let (c, to_c) = start("site-c");
        let listeners = [("site-a", &to_a), ("site-b", &to_b), ("site-c", &to_c)];
        for (me, agent) in [("site-a", &a), ("site-b", &b), ("site-c", &c)] {
            for (site, proxy) in listeners {
                if site != me {
                    let addr = proxy.addr.to_string();
                    agent.ctl_json(&["peer", "add", site, "--address", &addr, "--measure", "1M"]);
                }
            }
        }
        Self {
            dir,
            a,
            b,
            c,
            to_a,
            to_b,
            to_c,
        }
    }

    /// The agent of `site` (`site-a`, `site-b` or `site-c`).
    pub fn agent(&self, site: &str) -> &Agent {
        match site {
            "site-a" => &self.a,
            "site-b" => &self.b,
            "site-c" => &self.c,
            _ => panic!("no site {site}: the sites are {SITES:?}"),
        }
    }

    /// The three agents, in [`SITES`] order.
    pub fn all(&self) -> [&Agent; 3] {
        [&self.a, &self.b, &self.c]
    }

    /// `site`'s ring of common marks for `volume`
    /// (`DATA/replicas/secondary/marks/VOL.json`, what a forced re-homing
    /// runs on); `Null` while it has none.
    pub fn ring(&self, site: &str, volume: &str) -> serde_json::Value {
        let path = self
            .dir
            .path()
            .join(site)
            .join(format!("replicas/secondary/marks/{volume}.json"));
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

/// Runs `emberctl args` on `agent`, asserts that it fails, and returns its
/// stderr (the reason to check).
pub fn ctl_err(agent: &Agent, args: &[&str]) -> String {
    let out = agent.ctl(args);
    assert!(!out.status.success(), "emberctl {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Polls `agent`'s `emberctl --json ARGS` until `ok` holds, for up to
/// `timeout`; an error answer (mid role change a volume is briefly
/// neither role) is polled again. On timeout it fails with the log tails
/// of `agent` and of `others`: a re-homing's evidence is on the target as
/// much as on the new primary.
pub fn wait_json(
    agent: &Agent,
    others: &[&Agent],
    args: &[&str],
    what: &str,
    timeout: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let out = agent.ctl(&[&["--json"], args].concat());
        let v = if out.status.success() {
            serde_json::from_slice(&out.stdout).expect("emberctl prints JSON")
        } else {
            serde_json::Value::String(String::from_utf8_lossy(&out.stderr).into_owned())
        };
        if out.status.success() && ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not reached: {v}\nlog tail: {}\nother sites' log tails: {}",
            tail(&agent.log()),
            others
                .iter()
                .map(|o| tail(&o.log()))
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (90 s) until `primary` is the primary of `volume` with its target
/// `peer` in sync and nothing pending (after a promotion: `peer` re-homed
/// and caught up); `others`' log tails too on timeout. Returns the status.
pub fn target_in_sync(
    primary: &Agent,
    others: &[&Agent],
    volume: &str,
    peer: &str,
) -> serde_json::Value {
    wait_json(
        primary,
        others,
        &["replica", "status", volume],
        &format!("{volume}: {peer} in sync"),
        Duration::from_secs(90),
        |s| {
            s["role"] == "primary"
                && s["targets"].as_array().is_some_and(|ts| {
                    ts.iter().any(|t| {
                        t["peer"] == peer && t["state"] == "in-sync" && t["lag_bytes"] == 0
                    })
                })
        },
    )
}

/// `status`'s target `peer` (`replica status` or `group status`); fails
/// naming the status when it lists none.
pub fn target(status: &serde_json::Value, peer: &str) -> serde_json::Value {
    status["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["peer"] == peer))
        .cloned()
        .unwrap_or_else(|| panic!("no target {peer} in {status}"))
}
