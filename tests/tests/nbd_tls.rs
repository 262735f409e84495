//! NBD over TLS (issue 15 part 3) with real clients: QEMU (`tls-creds-x509`)
//! and libnbd (`nbds://…?tls-certificates=`) read and write over TLS 1.3
//! and 1.2; plaintext clients, certificates from another CA, clients
//! without a certificate and certificates not on the allow-list are
//! refused, each asserted through the client's own error text; a raw
//! socket checks the FORCEDTLS MUST rules; the start-time rule refuses
//! plaintext NBD off loopback.
//!
//! Certificates come from `emberctl pki`, client directories from
//! `emberctl pki issue NAME --client-dir DIR` (the layout QEMU and libnbd
//! read: `ca-cert.pem`, `client-cert.pem`, `client-key.pem`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_it::{Agent, bin, free_port, pattern, require_tool, run, run_ok, tempdir};

/// An agent whose NBD listener requires TLS, and client directories.
struct TlsLab {
    agent: Agent,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

fn ctl(args: &[&str]) {
    run_ok(bin("emberctl").to_str().expect("utf8"), args);
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// PKI, client dirs, `[nbd_tls]` config, and a running agent with volume `vol`.
fn lab() -> TlsLab {
    lab_with(&[])
}

/// [`lab`] with extra emberd flags.
fn lab_with(extra: &[&str]) -> TlsLab {
    let dir = tempdir();
    let root = dir.path().to_owned();
    let pki = root.join("pki");
    let rogue = root.join("rogue");
    ctl(&["pki", "init", "--dir", s(&pki)]);
    ctl(&["pki", "issue", "--dir", s(&pki), "agent"]);
    ctl(&[
        "pki",
        "issue",
        "--dir",
        s(&pki),
        "client-1",
        "--client-dir",
        s(&root.join("good")),
    ]);
    ctl(&[
        "pki",
        "issue",
        "--dir",
        s(&pki),
        "stranger",
        "--client-dir",
        s(&root.join("stranger")),
    ]);
    ctl(&["pki", "init", "--dir", s(&rogue)]);
    ctl(&[
        "pki",
        "issue",
        "--dir",
        s(&rogue),
        "intruder",
        "--client-dir",
        s(&root.join("rogue-client")),
    ]);
    let key_mode = std::fs::metadata(root.join("good").join("client-key.pem"))
        .expect("client key")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
        0o600,
        "pki issue --client-dir writes the private key owner-only"
    );
    // Trusts our CA (so the server's certificate verifies) but presents a
    // certificate the rogue CA signed.
    let wrong = root.join("wrong-ca");
    std::fs::create_dir_all(&wrong).expect("dir");
    std::fs::copy(pki.join("ca.crt"), wrong.join("ca-cert.pem")).expect("copy");
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(root.join("rogue-client").join(f), wrong.join(f)).expect("copy");
    }
    // Trusts our CA, has no certificate at all.
    let none = root.join("no-cert");
    std::fs::create_dir_all(&none).expect("dir");
    std::fs::copy(pki.join("ca.crt"), none.join("ca-cert.pem")).expect("copy");

    let cfg = root.join("emberd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[nbd_tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\nallow = [\"client-*\"]\n",
            s(&pki.join("agent.crt")),
            s(&pki.join("agent.key")),
            s(&pki.join("ca.crt")),
        ),
    )
    .expect("config");
    let mut args = vec!["--config", s(&cfg)];
    args.extend_from_slice(extra);
    let agent = Agent::start_with(&root.join("a"), &args);
    let uri = agent.create_volume("vol", "16M");
    assert_eq!(
        uri,
        format!("nbds://127.0.0.1:{}/vol", agent.nbd_port),
        "a TLS listener hands out nbds:// URIs"
    );
    TlsLab {
        agent,
        root,
        _dir: dir,
    }
}

impl TlsLab {
    fn certs(&self, who: &str) -> String {
        s(&self.root.join(who)).to_owned()
    }

    /// `nbds://` URI for libnbd with the certificates of `who`.
    fn nbds(&self, who: &str) -> String {
        format!(
            "nbds://127.0.0.1:{}/vol?tls-certificates={}",
            self.agent.nbd_port,
            self.certs(who)
        )
    }

    /// QEMU arguments: the creds object (with an optional GnuTLS priority)
    /// and the image options.
    fn qemu_args(&self, who: &str, priority: Option<&str>) -> [String; 4] {
        let mut creds = format!(
            "tls-creds-x509,id=t,endpoint=client,dir={}",
            self.certs(who)
        );
        if let Some(p) = priority {
            creds.push_str(&format!(",priority={p}"));
        }
        [
            "--object".into(),
            creds,
            "--image-opts".into(),
            format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=vol,tls-creds=t",
                self.agent.nbd_port
            ),
        ]
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn refused(cmd: &str, args: &[&str], needles: &[&str]) {
    refused_with_any(cmd, args, needles, &[]);
}

/// Like [`refused`], and also one of `any` in the output.
fn refused_with_any(cmd: &str, args: &[&str], needles: &[&str], any: &[&str]) {
    let out = run(cmd, args);
    let t = text(&out);
    assert!(!out.status.success(), "{cmd} {args:?} must fail:\n{t}");
    for n in needles {
        assert!(t.contains(n), "{cmd} {args:?}: expected {n:?} in:\n{t}");
    }
    assert!(
        any.is_empty() || any.iter().any(|n| t.contains(n)),
        "{cmd} {args:?}: expected one of {any:?} in:\n{t}"
    );
}

/// Under TLS 1.3 the client finishes its handshake before the server has
/// judged the client certificate, so the server's alert reaches it either
/// on its next read or as a failed write: both are the refusal.
const TLS13_REFUSAL: &[&str] = &[
    "A TLS fatal alert has been received",
    "Broken pipe",
    "Connection reset",
];

#[test]
fn qemu_io_writes_and_reads_back_over_tls_1_3_and_1_2() {
    if !require_tool("qemu-io") || !require_tool("qemu-img") {
        return;
    }
    let lab = lab();
    let [o, creds, i, opts] = lab.qemu_args("good", None);
    run_ok(
        "qemu-io",
        &[&o, &creds, &i, &opts, "-c", "write -P 0x5a 1M 2M"],
    );
    let out = run_ok(
        "qemu-io",
        &[
            &o,
            &creds,
            &i,
            &opts,
            "-c",
            "read -P 0x5a 1M 2M",
            "-c",
            "read -P 0 0 1M",
        ],
    );
    assert!(
        !text(&out).contains("Pattern verification failed"),
        "{}",
        text(&out)
    );
    // The negative: a wrong pattern is detected, so the read was real.
    let out = run(
        "qemu-io",
        &[&o, &creds, &i, &opts, "-c", "read -P 0x11 1M 4k"],
    );
    assert!(text(&out).contains("Pattern verification failed"));

    // TLS 1.2 only (GnuTLS priority string), as the kernel nbd-client speaks.
    let [o, creds12, i, opts] = lab.qemu_args("good", Some("NORMAL:-VERS-TLS1.3"));
    let out = run_ok(
        "qemu-io",
        &[&o, &creds12, &i, &opts, "-c", "read -P 0x5a 1M 2M"],
    );
    assert!(
        !text(&out).contains("Pattern verification failed"),
        "{}",
        text(&out)
    );
    let out = run_ok("qemu-img", &["info", &o, &creds12, &i, &opts]);
    assert!(
        text(&out).contains("virtual size: 16 MiB (16777216 bytes)"),
        "{}",
        text(&out)
    );
    // And 1.3 only.
    let [o, creds13, i, opts] = lab.qemu_args("good", Some("NORMAL:-VERS-ALL:+VERS-TLS1.3"));
    run_ok("qemu-img", &["info", &o, &creds13, &i, &opts]);
}

#[test]
fn libnbd_nbdinfo_and_nbdcopy_round_trip_over_nbds() {
    if !require_tool("nbdinfo") || !require_tool("nbdcopy") {
        return;
    }
    let lab = lab();
    let uri = lab.nbds("good");
    let out = run_ok("nbdinfo", &[&uri]);
    let t = text(&out);
    assert!(
        t.contains("with TLS") && t.contains("export-size: 16777216"),
        "{t}"
    );
    let input = lab.root.join("in.bin");
    let output = lab.root.join("out.bin");
    std::fs::write(&input, pattern(16 << 20, 7)).expect("input");
    run_ok("nbdcopy", &[s(&input), &uri]);
    run_ok("nbdcopy", &[&uri, s(&output)]);
    assert!(
        std::fs::read(&input).expect("in") == std::fs::read(&output).expect("out"),
        "nbdcopy round trip over TLS differs"
    );
}

#[test]
fn the_unix_socket_listener_stays_plaintext_beside_a_tls_tcp_listener() {
    if !require_tool("nbdinfo") {
        return;
    }
    let dir = tempdir();
    let sock = dir.path().join("nbd.sock");
    let lab = lab_with(&["--nbd-unix", s(&sock)]);
    let out = run_ok(
        "nbdinfo",
        &[&format!("nbd+unix:///vol?socket={}", s(&sock))],
    );
    let t = text(&out);
    assert!(
        t.contains("without TLS") && t.contains("export-size: 16777216"),
        "{t}"
    );
    // The TCP listener of the same agent still refuses plaintext.
    refused(
        "nbdinfo",
        &[&format!("nbd://127.0.0.1:{}/vol", lab.agent.nbd_port)],
        &["Operation not supported for export: vol"],
    );
}

#[test]
fn plaintext_wrong_ca_missing_and_unlisted_certificates_are_refused() {
    if !require_tool("nbdinfo") || !require_tool("qemu-img") {
        return;
    }
    let mut lab = lab();
    let port = lab.agent.nbd_port;

    // Plaintext clients: every option before STARTTLS gets ERR_TLS_REQD.
    // libnbd reports it as ENOTSUP (REFERENCE §8); QEMU names it.
    refused(
        "nbdinfo",
        &[&format!("nbd://127.0.0.1:{port}/vol")],
        &["Operation not supported for export: vol"],
    );
    refused(
        "qemu-img",
        &[
            "info",
            "--image-opts",
            &format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=vol"
            ),
        ],
        &[
            "TLS negotiation required before option 7 (go)",
            "this server requires TLS",
        ],
    );

    // A certificate from another CA: GnuTLS does not even offer it (the
    // server's CertificateRequest names only our CA), rustls then refuses
    // the handshake with an alert.
    refused_with_any("nbdinfo", &[&lab.nbds("wrong-ca")], &[], TLS13_REFUSAL);
    // QEMU refuses such a directory itself, before connecting.
    let [o, creds, i, opts] = lab.qemu_args("wrong-ca", None);
    refused(
        "qemu-img",
        &["info", &o, &creds, &i, &opts],
        &["failed validation", "known issuer"],
    );
    // And a client that trusts the rogue CA cannot verify our server.
    refused(
        "nbdinfo",
        &[&lab.nbds("rogue-client")],
        &["Error in the certificate verification"],
    );

    // No client certificate at all.
    refused_with_any("nbdinfo", &[&lab.nbds("no-cert")], &[], TLS13_REFUSAL);
    let [o, creds, i, opts] = lab.qemu_args("no-cert", None);
    refused_with_any(
        "qemu-img",
        &["info", &o, &creds, &i, &opts],
        &["Could not open"],
        TLS13_REFUSAL,
    );
    // Under TLS 1.2 the certificate is judged inside the handshake: the
    // client's own text is deterministic.
    let [o, creds, i, opts] = lab.qemu_args("no-cert", Some("NORMAL:-VERS-TLS1.3"));
    refused(
        "qemu-img",
        &["info", &o, &creds, &i, &opts],
        &[
            "TLS handshake failed",
            "A TLS fatal alert has been received",
        ],
    );

    // A valid certificate that is not on the allow-list: ERR_POLICY with
    // the reason (libnbd maps it to ENOTSUP, QEMU prints the server text).
    refused(
        "nbdinfo",
        &[&lab.nbds("stranger")],
        &["Operation not supported for export: vol"],
    );
    let [o, creds, i, opts] = lab.qemu_args("stranger", None);
    refused(
        "qemu-img",
        &["info", &o, &creds, &i, &opts],
        &[
            "Denied by server for option 7 (go)",
            "client certificate is not on this server's allow-list",
        ],
    );

    let log = lab.agent.log();
    assert!(
        log.contains("peer sent no certificates"),
        "refused handshakes are logged with the reason:\n{log}"
    );
    assert!(
        log.contains("not on the allow-list") && log.contains("\"stranger\""),
        "unlisted certificates are logged with their names:\n{log}"
    );
    assert!(lab.agent.alive(), "agent died; log: {log}");
    // Still serving allowed clients after all that.
    run_ok("nbdinfo", &[&lab.nbds("good")]);
}

#[test]
fn raw_socket_must_rules_hold_over_tls_1_2_and_1_3() {
    if !require_tool("/usr/bin/python3") {
        return;
    }
    let lab = lab();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/nbd_tls_rules.py");
    for version in ["1.2", "1.3"] {
        let out = run(
            "/usr/bin/python3",
            &[
                script,
                &lab.agent.nbd_port.to_string(),
                "vol",
                &lab.certs("good"),
                version,
            ],
        );
        let t = text(&out);
        println!("{t}");
        assert!(out.status.success(), "TLS {version}:\n{t}");
        for needle in [
            "ok   GO before TLS: ERR_TLS_REQD",
            "ok   STRUCTURED_REPLY before TLS: ERR_TLS_REQD",
            "ok   STARTTLS: ACK",
            &format!("TLS handshake on the same socket: TLSv{version}"),
            "ok   second STARTTLS over TLS: ERR_INVALID",
            "ok   READ 4 KiB over TLS",
            "ok   EXPORT_NAME over TLS, then READ",
            "ok   EXPORT_NAME before TLS: connection closed",
            "all TLS rules hold",
        ] {
            assert!(
                t.contains(needle),
                "TLS {version}: missing {needle:?}:\n{t}"
            );
        }
    }
}

#[test]
fn plaintext_nbd_off_loopback_is_refused_at_start_unless_insecure_is_set() {
    let dir = tempdir();
    let data = dir.path().join("a");
    let port = free_port();
    let nbd = format!("0.0.0.0:{port}");
    let api = format!("unix:{}", s(&dir.path().join("api.sock")));
    let out = run(
        s(&bin("emberd")),
        &[
            "--data-dir",
            s(&data),
            "--api",
            &api,
            "--nbd",
            &nbd,
            "--check-config",
        ],
    );
    let t = text(&out);
    assert!(!out.status.success(), "must refuse:\n{t}");
    assert!(
        t.contains("refusing plaintext NBD on 0.0.0.0") && t.contains("[nbd_tls]"),
        "{t}"
    );

    // nbd_insecure = true: starts, and says so at WARN.
    let cfg = dir.path().join("emberd.toml");
    std::fs::write(&cfg, "nbd_insecure = true\n").expect("config");
    let log_path = dir.path().join("emberd.log");
    let mut child = Command::new(bin("emberd"))
        .args(["--config", s(&cfg), "--data-dir", s(&data), "--api", &api])
        .args(["--nbd", &nbd, "--log-format", "text"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("spawn emberd");
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("emberd ready") {
            break log;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("emberd exited ({status}):\n{log}");
        }
        assert!(Instant::now() < deadline, "emberd did not start:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let warn = log
        .lines()
        .find(|l| l.contains("nbd_insecure = true"))
        .unwrap_or_else(|| panic!("no nbd_insecure warning:\n{log}"));
    assert!(warn.contains("WARN"), "{warn}");
}
