//! Three real agents, site-a, site-b and site-c, every two paired over
//! mutual TLS, each site's peer listener behind its own [`FaultProxy`]:
//! the setup the three-site tests (`tests/three_sites*.rs`) share.

use crate::repl::site_config;
use crate::{Agent, FaultProxy, bin, free_port, run_ok, tempdir};

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
        let ctl = bin("emberctl");
        let ctl = ctl.to_str().expect("utf8");
        let p = pki.to_str().expect("utf8");
        run_ok(ctl, &["pki", "init", "--dir", p]);
        for site in SITES {
            run_ok(ctl, &["pki", "issue", "--dir", p, site]);
        }
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
