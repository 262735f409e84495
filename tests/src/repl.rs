//! Two-site fixtures for replication tests: a lab CA, site-a and site-b
//! agents, a [`FaultProxy`] on the a→b link, and a write-order checker.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::proxy::FaultProxy;
use crate::{Agent, bin, free_port, run_ok, tempdir};

/// Block size of the stamped workload.
pub const BLOCK: u64 = 4096;

/// site-a (primary) and site-b (secondary), with the link through a proxy.
#[derive(Debug)]
pub struct TwoSites {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// site-a.
    pub a: Agent,
    /// site-b.
    pub b: Agent,
    /// Between site-a and site-b's peer listener.
    pub proxy: FaultProxy,
    /// Between site-b and site-a's peer listener (site-b pairs back, so
    /// that after a promotion it can replicate to site-a).
    pub proxy_back: FaultProxy,
}

/// Makes a lab CA in `dir` (`emberctl pki init`) and issues each of
/// `sites` its certificate, as [`site_config`] expects them.
pub fn lab_pki(dir: &Path, sites: &[&str]) {
    let ctl = bin("emberctl");
    let ctl = ctl.to_str().expect("utf8");
    let d = dir.to_str().expect("utf8");
    run_ok(ctl, &["pki", "init", "--dir", d]);
    for site in sites {
        run_ok(ctl, &["pki", "issue", "--dir", d, site]);
    }
}

/// Writes `SITE.toml` under `root`: the site name, `extra` TOML, and a peer
/// listener on `port` with the lab PKI in `pki`. Returns its path.
pub fn site_config(root: &Path, pki: &Path, site: &str, port: u16, extra: &str) -> String {
    let cfg = root.join(format!("{site}.toml"));
    let p = |f: &str| pki.join(f).display().to_string();
    std::fs::write(
        &cfg,
        format!(
            "site = \"{site}\"\n{extra}\n[peer]\nlisten = \"127.0.0.1:{port}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            p(&format!("{site}.crt")),
            p(&format!("{site}.key")),
            p("ca.crt")
        ),
    )
    .expect("config");
    cfg.display().to_string()
}

impl TwoSites {
    /// Starts both sites and pairs site-a with site-b through the proxy.
    /// `a_env`: extra environment for site-a (fault injection);
    /// `peer_flags`: extra `peer add` flags (rates).
    pub fn start(a_env: &[(&str, &str)], peer_flags: &[&str]) -> Self {
        Self::start_with_config(a_env, peer_flags, "")
    }

    /// As [`Self::start`], with extra TOML for both agents' configs.
    pub fn start_with_config(a_env: &[(&str, &str)], peer_flags: &[&str], toml: &str) -> Self {
        Self::start_in(a_env, &[], peer_flags, toml, None)
    }

    /// As [`Self::start_with_config`], with site-a's and site-b's data dirs
    /// made under the given parents (e.g. a [`crate::LoopMount`]'s path)
    /// instead of the test's temp dir; `b_env`: site-b's extra environment.
    pub fn start_in(
        a_env: &[(&str, &str)],
        b_env: &[(&str, &str)],
        peer_flags: &[&str],
        toml: &str,
        parents: Option<(&Path, &Path)>,
    ) -> Self {
        let dir = tempdir();
        let (data_a, data_b) = match parents {
            Some((a, b)) => (a.join("site-a"), b.join("site-b")),
            None => (dir.path().join("site-a"), dir.path().join("site-b")),
        };
        let ca = dir.path().join("pki");
        lab_pki(&ca, &["site-a", "site-b"]);
        let (pa, pb) = (free_port(), free_port());
        let cfg_a = site_config(dir.path(), &ca, "site-a", pa, toml);
        let cfg_b = site_config(dir.path(), &ca, "site-b", pb, toml);
        let a = Agent::start_env(&data_a, &["--config", &cfg_a], a_env);
        let b = Agent::start_env(&data_b, &["--config", &cfg_b], b_env);
        let proxy = FaultProxy::start(format!("127.0.0.1:{pb}").parse().expect("addr"));
        let addr = proxy.addr.to_string();
        let mut args = vec![
            "peer",
            "add",
            "site-b",
            "--address",
            &addr,
            "--measure",
            "1M",
        ];
        args.extend_from_slice(peer_flags);
        a.ctl_json(&args);
        let proxy_back = FaultProxy::start(format!("127.0.0.1:{pa}").parse().expect("addr"));
        let back = proxy_back.addr.to_string();
        b.ctl_json(&[
            "peer",
            "add",
            "site-a",
            "--address",
            &back,
            "--measure",
            "1M",
        ]);
        Self {
            dir,
            a,
            b,
            proxy,
            proxy_back,
        }
    }

    /// Cuts (or restores) the link both ways.
    pub fn cut_both(&self, cut: bool) {
        for p in [&self.proxy, &self.proxy_back] {
            if cut {
                p.cut();
            } else {
                p.restore();
            }
        }
    }

    /// `replica status` on site-a.
    pub fn status(&self, volume: &str) -> serde_json::Value {
        self.a.ctl_json(&["replica", "status", volume])
    }

    /// Creates `volume` (`size`) on site-a, replicated async to site-b, and
    /// waits until site-b holds it.
    pub fn async_volume(&self, volume: &str, size: &str) {
        self.a.create_volume(volume, size);
        self.a.ctl_json(&[
            "replica", "enable", volume, "--peer", "site-b", "--mode", "async",
        ]);
        self.wait_caught_up(volume, Duration::from_secs(60));
    }

    /// Waits until site-a reports `state` with zero lag; returns the status.
    pub fn wait_caught_up(&self, volume: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(volume);
            if s["state"] == "in-sync" && s["lag_bytes"] == 0 {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{volume} not caught up within {timeout:?}: {s}\nsite-a log tail: {}",
                tail(&self.a.log())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until site-a's status satisfies `pred`.
    pub fn wait_for(
        &self,
        volume: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_status(&self.a, volume, timeout, what, pred)
    }

    /// Under fio load on site-a's `volume` (`fio_args` for
    /// [`crate::fio_load`]), kills site-b -9 mid-stream and restarts it,
    /// then kills site-a -9, stops the load and restarts site-a. Returns
    /// site-a's status once caught up again.
    pub fn kill9_both_under_load(&mut self, volume: &str, fio_args: &[&str]) -> serde_json::Value {
        let mut fio = crate::fio_load(&self.a.uri(volume), fio_args);
        std::thread::sleep(Duration::from_millis(1500));
        self.b.kill9();
        std::thread::sleep(Duration::from_millis(800));
        self.b.restart();
        std::thread::sleep(Duration::from_millis(1500));
        self.a.kill9();
        let _ = fio.kill();
        let _ = fio.wait();
        self.a.restart();
        self.wait_caught_up(volume, Duration::from_secs(120))
    }

    /// `qemu-img compare` of the primary and secondary exports.
    pub fn assert_identical(&self, volume: &str) {
        crate::assert_same_image(
            &self.a.uri(volume),
            &self.b.uri(volume),
            "primary and secondary",
        );
    }
}

/// Waits until `agent`'s `replica status` of `volume` satisfies `pred`.
pub fn wait_status(
    agent: &Agent,
    volume: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = agent.ctl_json(&["replica", "status", volume]);
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{volume}: {what} not reached within {timeout:?}: {s}\nlog tail: {}",
            tail(&agent.log())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last lines of a log, for assertion messages.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Waits for a writer to stop (its server refused or went away); kills it
/// and fails the test after `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the writer did not stop within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the stamped writer (tests/py/stamped_writer.py) on `uri`.
pub fn stamped_writer(uri: &str, history: &Path, blocks: u64, count: u64, fua: bool) -> Child {
    stamped_writer_with(
        uri,
        history,
        blocks,
        count,
        if fua { &["fua"] } else { &[] },
    )
}

/// As [`stamped_writer`] with the script's options (`"fua"`, `"span=N"`:
/// half the writes cover N aligned blocks; read those histories with
/// [`read_span_history`]).
pub fn stamped_writer_with(
    uri: &str,
    history: &Path,
    blocks: u64,
    count: u64,
    opts: &[&str],
) -> Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/stamped_writer.py");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(script)
        .arg(uri)
        .arg(history)
        .arg(blocks.to_string())
        .arg(count.to_string())
        .arg("7")
        .args(opts);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the stamped writer")
}

/// Reads a `span=N` writer's history: (seq, offset, blocks) in order.
pub fn read_span_history(path: &Path) -> Vec<(u64, u64, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (f.len() == 4).then(|| (f[0], f[1], f[3]))
        })
        .collect()
}

/// Reads the writer's history: (seq, offset) in order.
pub fn read_history(path: &Path) -> Vec<(u64, u64)> {
    read_timed_history(path)
        .into_iter()
        .map(|(seq, off, _)| (seq, off))
        .collect()
}

/// Reads the writer's history with acknowledgement times:
/// (seq, offset, unix ns) in order.
pub fn read_timed_history(path: &Path) -> Vec<(u64, u64, i64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// Copies an NBD export to a local file with nbdcopy.
pub fn snapshot_export(uri: &str, dest: &Path) -> Vec<u8> {
    run_ok(
        "nbdcopy",
        &["--synchronous", uri, dest.to_str().expect("utf8")],
    );
    std::fs::read(dest).expect("read copied image")
}

/// The stamp of block `index` of `image`: `Ok(None)` for zeros,
/// `Ok(Some(seq))` for a valid stamp, `Err` for anything else (torn).
pub fn stamp_at(image: &[u8], index: u64) -> Result<Option<u64>, String> {
    let b = &image[(index * BLOCK) as usize..((index + 1) * BLOCK) as usize];
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let seq = u64::from_le_bytes(b[0..8].try_into().expect("8"));
    let off = u64::from_le_bytes(b[8..16].try_into().expect("8"));
    let valid = off == index * BLOCK && b[16..].chunks(8).all(|c| c == &b[0..8]);
    if valid {
        Ok(Some(seq))
    } else {
        Err(format!(
            "block {index} is torn or foreign (seq {seq}, offset {off})"
        ))
    }
}

/// Checks that `image` (first `blocks` blocks) equals the state after a
/// prefix of `history`; returns the prefix length. `history` must cover
/// the prefix (read it after the image).
pub fn check_prefix(image: &[u8], blocks: u64, history: &[(u64, u64)]) -> Result<u64, String> {
    let spans: Vec<(u64, u64, u64)> = history.iter().map(|&(s, o)| (s, o, 1)).collect();
    check_prefix_spans(image, blocks, &spans)
}

/// As [`check_prefix`] for a history of multi-block writes
/// (seq, offset, blocks).
pub fn check_prefix_spans(
    image: &[u8],
    blocks: u64,
    history: &[(u64, u64, u64)],
) -> Result<u64, String> {
    let mut found = Vec::with_capacity(blocks as usize);
    for i in 0..blocks {
        found.push(stamp_at(image, i)?);
    }
    let p = found.iter().flatten().copied().max().unwrap_or(0);
    if p as usize > history.len() {
        return Err(format!(
            "image holds seq {p} but the history has only {} writes",
            history.len()
        ));
    }
    let mut expected: Vec<Option<u64>> = vec![None; blocks as usize];
    for &(seq, off, n) in &history[..p as usize] {
        for k in 0..n {
            expected[(off / BLOCK + k) as usize] = Some(seq);
        }
    }
    for i in 0..blocks as usize {
        if expected[i] != found[i] {
            return Err(format!(
                "not a prefix of the write history: block {i} holds {:?}, the prefix up to seq {p} says {:?}",
                found[i], expected[i]
            ));
        }
    }
    Ok(p)
}

/// What a stamped writer's history file lists: single-block writes
/// ([`stamped_writer`], [`read_history`]) or multi-block ones (`span=N`,
/// [`read_span_history`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryKind {
    /// One block per write.
    Blocks,
    /// (seq, offset, blocks) per write.
    Spans,
}

impl HistoryKind {
    /// Reads `path` as (seq, offset, blocks) per write.
    fn read(self, path: &Path) -> Vec<(u64, u64, u64)> {
        match self {
            Self::Blocks => read_history(path)
                .into_iter()
                .map(|(seq, off)| (seq, off, 1))
                .collect(),
            Self::Spans => read_span_history(path),
        }
    }
}

/// The write-order check at link cuts: while `writer` (a stamped writer on
/// site-a's `volume`, its first `blocks` blocks, logging to `history` of
/// `kind`) runs over the a→b link delayed by `delay` (so the secondary
/// trails it), cuts the link five times; after each cut site-b's copy
/// must be a prefix of the history, the prefixes never going backwards
/// and at least three of them past zero. Then stops the writer, restores
/// the link, and asserts the copies catch up and are identical.
pub fn assert_prefix_at_every_cut(
    sites: &TwoSites,
    volume: &str,
    mut writer: Child,
    history: &Path,
    kind: HistoryKind,
    blocks: u64,
    delay: Duration,
) {
    let mut checked = Vec::new();
    for round in 0..5u64 {
        std::thread::sleep(Duration::from_millis(700 + round * 231));
        sites.proxy.cut();
        // Let a commit in progress finish; then the secondary is still.
        std::thread::sleep(Duration::from_millis(500));
        let image = snapshot_export(
            &sites.b.uri(volume),
            &sites.dir.path().join(format!("cut{round}.img")),
        );
        // Read after the image, so the history covers what it holds.
        std::thread::sleep(Duration::from_millis(100));
        let hist = kind.read(history);
        match check_prefix_spans(&image, blocks, &hist) {
            Ok(p) => checked.push((p, hist.len())),
            Err(e) => panic!("cut {round}: {e}"),
        }
        sites.proxy.restore();
        sites.proxy.set_delay(delay);
    }
    let _ = writer.kill();
    let _ = writer.wait();
    let nonempty = checked.iter().filter(|(p, _)| *p > 0).count();
    assert!(nonempty >= 3, "secondary never progressed: {checked:?}");
    assert!(
        checked.windows(2).all(|w| w[0].0 <= w[1].0),
        "consistent points went backwards: {checked:?}"
    );
    sites.proxy.restore();
    sites.wait_caught_up(volume, Duration::from_secs(60));
    sites.assert_identical(volume);
}

/// Checks that every acknowledged write in `history` is present: each
/// block holds its last acknowledged write or a later one.
pub fn check_acked_present(
    image: &[u8],
    blocks: u64,
    history: &[(u64, u64)],
) -> Result<(), String> {
    let mut last: Vec<Option<u64>> = vec![None; blocks as usize];
    for &(seq, off) in history {
        last[(off / BLOCK) as usize] = Some(seq);
    }
    for (i, want) in last.iter().enumerate() {
        let have = stamp_at(image, i as u64)?;
        if let Some(w) = want
            && have.is_none_or(|h| h < *w)
        {
            return Err(format!(
                "acknowledged write lost: block {i} should hold seq {w} or later, holds {have:?}"
            ));
        }
    }
    Ok(())
}
