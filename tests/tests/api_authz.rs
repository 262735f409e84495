//! The control API off loopback (issue 15 part 2), with the real `emberd`
//! and `emberctl`: a plaintext or TLS-without-client-CA API on a
//! non-loopback address is refused at start with the reason; with
//! `[api_tls] client_ca` the certificate decides the role: a reader can
//! look but not delete, an admin can delete, a certificate on neither list,
//! a certificate from another CA and a client without a certificate are
//! refused.
//!
//! The agent binds `0.0.0.0:PORT` (a non-loopback address for the rules)
//! while the clients connect to `127.0.0.1:PORT`, so no traffic leaves the
//! host.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ember_it::{bin, free_port, run, run_ok, tempdir};

/// How long a refused start may take before we call it "it started".
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs emberd with `args`, expecting it to exit on its own; returns its
/// exit success and stderr. Kills it and panics if it is still running
/// after [`START_TIMEOUT`] (it started although it should not have).
fn emberd_exit(args: &[&str]) -> (bool, String) {
    let mut child = Command::new(bin("emberd"))
        .args(args)
        .args(["--log-format", "text"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn emberd");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("wait emberd") {
            let out = child.wait_with_output().expect("emberd stderr");
            return (
                status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("emberd stderr");
            panic!(
                "emberd {args:?} kept running instead of refusing to start; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An `emberd` started from a config file, killed on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts emberd and waits until `ready` (an emberctl call) succeeds.
    fn start(data_dir: &Path, config: &Path, ready: impl Fn() -> Output) -> Self {
        let log = data_dir.with_extension("log");
        let mut child = Command::new(bin("emberd"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--config")
            .arg(config)
            .args(["--log-format", "text"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn emberd");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait emberd") {
                panic!(
                    "emberd exited at start ({status}); log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let out = ready();
            if out.status.success() {
                return Self { child, log };
            }
            assert!(
                Instant::now() < deadline,
                "emberd did not come up; last emberctl error: {}; log: {}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "emberd log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// `emberctl pki init` in `dir`, then one certificate per name.
fn pki(dir: &Path, names: &[&str]) {
    let ctl = bin("emberctl");
    run_ok(s(&ctl), &["pki", "init", "--dir", s(dir)]);
    for name in names {
        run_ok(s(&ctl), &["pki", "issue", "--dir", s(dir), name]);
    }
}

fn tls_section(pki: &Path, client_ca: bool, extra: &str) -> String {
    let p = |f: &str| pki.join(f).display().to_string();
    let mut out = format!(
        "[api_tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        p("agent.crt"),
        p("agent.key")
    );
    if client_ca {
        out.push_str(&format!("client_ca = \"{}\"\n", p("ca.crt")));
    }
    out.push_str(extra);
    out
}

#[test]
fn non_loopback_api_without_tls_and_client_ca_is_refused_at_start() {
    let dir = tempdir();
    let pki_dir = dir.path().join("pki");
    pki(&pki_dir, &["agent"]);
    let data = dir.path().join("data");
    let nbd = format!("127.0.0.1:{}", free_port());
    let port = free_port();

    // Plaintext on every interface: refused, with the reason and the fix.
    let (ok, stderr) = emberd_exit(&[
        "--data-dir",
        s(&data),
        "--nbd",
        &nbd,
        "--api",
        &format!("http://0.0.0.0:{port}"),
    ]);
    assert!(!ok, "plaintext 0.0.0.0 API started: {stderr}");
    assert!(
        stderr.contains("refusing a plaintext control API on 0.0.0.0")
            && stderr.contains("client_ca"),
        "reason missing: {stderr}"
    );

    // TLS but no client certificates, on a non-loopback address: refused.
    let cfg = dir.path().join("tls-no-ca.toml");
    std::fs::write(
        &cfg,
        format!(
            "api = \"http://0.0.0.0:{port}\"\nnbd = \"{nbd}\"\n{}",
            tls_section(&pki_dir, false, "")
        ),
    )
    .expect("config");
    let (ok, stderr) = emberd_exit(&["--data-dir", s(&data), "--config", s(&cfg)]);
    assert!(
        !ok,
        "TLS API without client_ca on 0.0.0.0 started: {stderr}"
    );
    assert!(
        stderr.contains("with [api_tls] but no client_ca"),
        "reason missing: {stderr}"
    );

    // Roles without client certificates cannot mean anything: refused too.
    let cfg = dir.path().join("roles-no-ca.toml");
    std::fs::write(
        &cfg,
        format!(
            "api = \"http://127.0.0.1:{port}\"\nnbd = \"{nbd}\"\n{}",
            tls_section(&pki_dir, false, "admins = [\"admin\"]\n")
        ),
    )
    .expect("config");
    let (ok, stderr) = emberd_exit(&["--data-dir", s(&data), "--config", s(&cfg)]);
    assert!(!ok, "admins without client_ca started: {stderr}");
    assert!(stderr.contains("admins/readers need client_ca"), "{stderr}");

    // Nothing was bound: the port is still free for the next agent.
    assert!(
        std::net::TcpListener::bind(("0.0.0.0", port)).is_ok(),
        "a refused agent must not have bound its API port"
    );

    // The same TLS-without-client_ca section on loopback is allowed: only
    // this host's users reach it (labs, tests).
    let cfg = dir.path().join("tls-loopback.toml");
    std::fs::write(
        &cfg,
        format!(
            "api = \"http://127.0.0.1:{port}\"\nnbd = \"{nbd}\"\n{}",
            tls_section(&pki_dir, false, "")
        ),
    )
    .expect("config");
    let ctl = bin("emberctl");
    let api = format!("https://127.0.0.1:{port}");
    let ca = pki_dir.join("ca.crt");
    let _agent = Daemon::start(&data, &cfg, || {
        run(
            s(&ctl),
            &["--api", &api, "--tls-ca", s(&ca), "status", "--json"],
        )
    });
}

#[test]
fn client_certificates_decide_roles_reader_looks_admin_deletes_others_refused() {
    let dir = tempdir();
    let pki_dir = dir.path().join("pki");
    let rogue = dir.path().join("rogue");
    // "stranger" is signed by the right CA but is on neither list.
    pki(&pki_dir, &["agent", "admin", "reader-1", "stranger"]);
    pki(&rogue, &["admin"]);
    let port = free_port();
    let nbd = free_port();
    let cfg = dir.path().join("emberd.toml");
    std::fs::write(
        &cfg,
        format!(
            "api = \"http://0.0.0.0:{port}\"\nnbd = \"127.0.0.1:{nbd}\"\n{}",
            tls_section(
                &pki_dir,
                true,
                "admins = [\"admin\"]\nreaders = [\"reader-*\"]\n"
            )
        ),
    )
    .expect("config");

    let ctl = bin("emberctl");
    let api = format!("https://127.0.0.1:{port}");
    let ca = pki_dir.join("ca.crt");
    // emberctl with the certificate `name` from `dir` (None: no certificate).
    let as_client = |who: Option<(&Path, &str)>, args: &[&str]| -> Output {
        let mut full: Vec<String> = vec!["--api".into(), api.clone(), "--tls-ca".into()];
        full.push(ca.display().to_string());
        if let Some((d, name)) = who {
            full.push("--tls-cert".into());
            full.push(d.join(format!("{name}.crt")).display().to_string());
            full.push("--tls-key".into());
            full.push(d.join(format!("{name}.key")).display().to_string());
        }
        full.extend(args.iter().map(|a| (*a).to_owned()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        run(s(&ctl), &refs)
    };
    let admin = Some((pki_dir.as_path(), "admin"));
    let reader = Some((pki_dir.as_path(), "reader-1"));
    let stranger = Some((pki_dir.as_path(), "stranger"));
    let intruder = Some((rogue.as_path(), "admin"));
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let ok_json = |o: Output| -> serde_json::Value {
        assert!(o.status.success(), "failed: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).expect("JSON on stdout")
    };
    let names = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .or_else(|| v["volumes"].as_array())
            .expect("volume list is an array")
            .iter()
            .map(|x| x["name"].as_str().expect("name").to_owned())
            .collect()
    };

    let _agent = Daemon::start(&dir.path().join("a"), &cfg, || {
        as_client(admin, &["status", "--json"])
    });

    let v = ok_json(as_client(
        admin,
        &["volume", "create", "keep", "--size", "16M", "--json"],
    ));
    assert_eq!(v["name"], "keep");

    // A reader looks: status, list, show.
    let st = ok_json(as_client(reader, &["status", "--json"]));
    assert!(st.is_object(), "status JSON: {st}");
    let list = ok_json(as_client(reader, &["volume", "list", "--json"]));
    assert_eq!(names(&list), ["keep"]);
    ok_json(as_client(reader, &["volume", "show", "keep", "--json"]));

    // ...but cannot delete or create: PERMISSION_DENIED naming who and why.
    for args in [
        &["volume", "delete", "keep"][..],
        &["volume", "create", "other", "--size", "16M"][..],
    ] {
        let out = as_client(reader, args);
        let err = stderr(&out);
        assert!(!out.status.success(), "reader ran {args:?}");
        assert!(
            err.contains("PERMISSION_DENIED")
                && err.contains("CN=reader-1")
                && err.contains("needs the admin role")
                && err.contains("has the reader role"),
            "reader {args:?}: {err}"
        );
    }
    let list = ok_json(as_client(admin, &["volume", "list", "--json"]));
    assert_eq!(
        names(&list),
        ["keep"],
        "the reader's delete removed nothing"
    );

    // A reader may follow the event stream (a server-streaming RPC through
    // the same layer): `emberctl events` keeps running instead of failing.
    let mut watcher = Command::new(&ctl)
        .args(["--api", &api, "--tls-ca", s(&ca)])
        .args(["--tls-cert", s(&pki_dir.join("reader-1.crt"))])
        .args(["--tls-key", s(&pki_dir.join("reader-1.key"))])
        .arg("events")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn emberctl events");
    std::thread::sleep(Duration::from_millis(1500));
    let early = watcher.try_wait().expect("wait emberctl events");
    let _ = watcher.kill();
    let out = watcher.wait_with_output().expect("events stderr");
    assert!(
        early.is_none(),
        "reader's event stream ended ({early:?}): {}",
        stderr(&out)
    );

    // Signed by our CA but on neither list: not even status.
    let out = as_client(stranger, &["status"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "stranger got status");
    assert!(
        err.contains("PERMISSION_DENIED")
            && err.contains("CN=stranger")
            && err.contains("matches neither"),
        "stranger: {err}"
    );
    let out = as_client(stranger, &["events"]);
    assert!(
        !out.status.success() && stderr(&out).contains("WatchEvents needs the reader role"),
        "stranger's event stream: {}",
        stderr(&out)
    );

    // No certificate, or one from another CA: the TLS handshake fails, no
    // RPC runs (emberctl reports a transport error, not a gRPC status). With
    // TLS 1.3 the client learns it only after its handshake "finished", so
    // the text is the server's alert (`CertificateRequired`,
    // `UnknownCA`…) or, when the request raced it, a closed connection.
    for (what, who) in [("no certificate", None), ("another CA", intruder)] {
        let out = as_client(who, &["volume", "delete", "keep"]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{what}: was let in");
        assert!(
            err.contains("transport error") && !err.contains("PERMISSION_DENIED"),
            "{what}: not refused by the TLS handshake: {err}"
        );
    }
    let list = ok_json(as_client(admin, &["volume", "list", "--json"]));
    assert_eq!(names(&list), ["keep"], "refused clients removed nothing");

    // The admin deletes.
    let out = as_client(admin, &["volume", "delete", "keep"]);
    assert!(out.status.success(), "admin delete: {}", stderr(&out));
    let list = ok_json(as_client(reader, &["volume", "list", "--json"]));
    assert!(names(&list).is_empty(), "deleted: {list}");
}
