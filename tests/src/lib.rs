//! Harness for integration tests: start `emberd` as a real process on a
//! temp data dir with free ports, drive it with `emberctl` and third-party
//! clients, kill it with SIGTERM or SIGKILL.
//!
//! Binaries come from the cargo target dir (`cargo build --bins` first; the
//! test script does). A missing third-party tool fails the test; set
//! `EMBER_IT_ALLOW_SKIP=1` locally to skip instead (CI never does).

mod fsmount;
pub mod group_writer;
pub mod points;
mod proxy;
pub mod repl;
pub mod three_sites;

pub use fsmount::LoopMount;
pub use proxy::FaultProxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory holding `emberd` and `emberctl`.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("EMBER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test-binary> → target/<profile>
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target profile dir")
        .to_owned()
}

/// Path of one of our binaries; panics with the fix if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build --bins` before the integration tests",
        p.display()
    );
    p
}

/// Returns false (skip) or panics when a third-party tool is missing.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    if std::env::var("EMBER_IT_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIP: {tool} not installed");
        return false;
    }
    panic!(
        "{tool} is not installed; the test script installs it (scripts/test-all.sh), or set EMBER_IT_ALLOW_SKIP=1 to skip locally"
    );
}

/// Like [`require_tool`] for a module of Debian's `/usr/bin/python3`.
pub fn require_python_module(module: &str) -> bool {
    let found = Command::new("/usr/bin/python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    if std::env::var("EMBER_IT_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIP: python module {module} not installed");
        return false;
    }
    panic!(
        "python module {module} is not installed; the test script installs it (scripts/test-all.sh), or set EMBER_IT_ALLOW_SKIP=1 to skip locally"
    );
}

/// A free TCP port on loopback for an agent to bind a moment later.
///
/// Picked below the kernel's ephemeral range: a port from `bind(0)` comes
/// from that range, and any outgoing connection (a sibling test's client,
/// an agent dialling its peer) may take it between our probe and the
/// agent's bind. Ports handed out by this process are never handed out
/// again, so parallel tests in one binary do not collide either.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    const LOWEST: u16 = 10_000;
    let below = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&lo| lo > LOWEST + 1_000)
        .unwrap_or(32_768);
    let span = u32::from(below - LOWEST);
    // Start somewhere different in every process so concurrent test
    // binaries rarely probe the same ports.
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    let mut handed_out = HANDED_OUT.lock().expect("port set poisoned");
    for i in 0..span {
        let port = LOWEST + u16::try_from((seed.wrapping_add(i)) % span).expect("below span");
        if handed_out.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free TCP port between {LOWEST} and {below}");
}

/// A running agent process.
#[derive(Debug)]
pub struct Agent {
    /// The emberd process.
    pub child: Option<Child>,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// `unix:` API endpoint.
    pub api: String,
    /// NBD port on 127.0.0.1.
    pub nbd_port: u16,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    /// Extra emberctl flags (TLS material).
    pub ctl_args: Vec<String>,
}

impl Agent {
    /// Starts emberd on `data_dir` and waits for its API.
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[])
    }

    /// Starts emberd with extra flags.
    pub fn start_with(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_custom(
            data_dir,
            &format!("unix:{}", data_dir.join("api.sock").display()),
            extra,
            &[],
        )
    }

    /// Starts emberd with extra flags and environment variables.
    pub fn start_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut agent = Self {
            child: None,
            data_dir: data_dir.to_owned(),
            api: format!("unix:{}", data_dir.join("api.sock").display()),
            nbd_port: free_port(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ctl_args: Vec::new(),
        };
        agent.spawn();
        agent
    }

    /// Starts emberd with a given API endpoint, extra emberd flags and the
    /// emberctl flags needed to reach it.
    pub fn start_custom(data_dir: &Path, api: &str, extra: &[&str], ctl_args: &[&str]) -> Self {
        let mut agent = Self {
            child: None,
            data_dir: data_dir.to_owned(),
            api: api.to_owned(),
            nbd_port: free_port(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            ctl_args: ctl_args.iter().map(|s| s.to_string()).collect(),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.data_dir).expect("data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .expect("log file");
        let child = Command::new(bin("emberd"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--api",
                &self.api,
                "--nbd",
                &format!("127.0.0.1:{}", self.nbd_port),
                "--log-format",
                "text",
            ])
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn emberd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("emberd exited at start ({status}); log: {}", self.log());
            }
            if self.ctl(&["status", "--json"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "emberd did not come up; log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    /// Runs emberctl against this agent.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("emberctl"))
            .args(["--api", &self.api])
            .args(&self.ctl_args)
            .args(args)
            .output()
            .expect("run emberctl")
    }

    /// Runs emberctl with `--json`, asserts success and parses stdout.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = args.to_vec();
        full.push("--json");
        let out = self.ctl(&full);
        assert!(
            out.status.success(),
            "emberctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("emberctl prints JSON")
    }

    /// Creates a volume and returns its NBD URI.
    pub fn create_volume(&self, name: &str, size: &str) -> String {
        let v = self.ctl_json(&["volume", "create", name, "--size", size]);
        v["nbd_uri"].as_str().expect("nbd_uri").to_owned()
    }

    /// NBD URI of an export on this agent.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.nbd_port)
    }

    /// SIGKILL, no cleanup: a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; asserts it exited 0.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let status = c.wait().expect("wait emberd");
            assert!(
                status.success(),
                "emberd exited {status} after SIGTERM; log: {}",
                self.log()
            );
        }
    }

    /// Starts the agent again on the same data dir and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the agent first");
        self.spawn();
    }

    /// Whether the process is still alive.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a command, returning its output (never panics on failure status).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

/// Runs a command and asserts it succeeded.
pub fn run_ok(cmd: &str, args: &[&str]) -> Output {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Asserts that two raw images (NBD URIs or files) hold the same bytes, by
/// `qemu-img compare`; `what` names them in the failure message.
pub fn assert_same_image(x: &str, y: &str, what: &str) {
    let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", x, y]);
    assert!(
        out.status.success(),
        "{what}: the images differ: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic pseudo-random bytes (xorshift), for content checks.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A temp dir kept when `EMBER_KEEP_TMP=1` (evidence on failure).
pub fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("ember-it-")
        .tempdir()
        .expect("tempdir");
    if std::env::var("EMBER_KEEP_TMP").as_deref() == Ok("1") {
        let mut b = tempfile::Builder::new();
        b.prefix("ember-it-").disable_cleanup(true);
        let kept = b.tempdir().expect("tempdir");
        eprintln!("keeping {}", kept.path().display());
        return kept;
    }
    dir
}

/// Raises this process's open-file limit to its hard limit (for tests that
/// open thousands of sockets) and returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// Starts fio as a background random-write load (30 s cap) on `uri`; the
/// caller kills it. `extra` sets block sizes and the file size.
///
/// `--thread`: fio otherwise forks a job process, which `Child::kill` does
/// not reach; orphaned after its agent was killed, that process spun on
/// the dead connection at 60 % of a CPU for the rest of the run.
pub fn fio_load(uri: &str, extra: &[&str]) -> Child {
    Command::new("fio")
        .args([
            "--thread",
            "--name=load",
            "--ioengine=nbd",
            "--uri",
            uri,
            "--rw=randwrite",
            "--iodepth=32",
        ])
        .args(extra)
        .args(["--time_based", "--runtime=30", "--output=/dev/null"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fio")
}
