//! The control API over TCP with mutual TLS: certificates from
//! `emberctl pki`, a client with the right certificate gets in, clients
//! without one or with a certificate from another CA are refused.

use ember_it::{Agent, bin, free_port, run, run_ok, tempdir};

#[test]
fn tcp_api_with_mutual_tls_refuses_wrong_or_missing_client_certificates() {
    let dir = tempdir();
    let pki = dir.path().join("pki");
    let rogue = dir.path().join("rogue");
    let ctl = bin("emberctl");
    let ctl = ctl.to_str().expect("utf8");
    run_ok(ctl, &["pki", "init", "--dir", pki.to_str().expect("utf8")]);
    run_ok(
        ctl,
        &[
            "pki",
            "issue",
            "--dir",
            pki.to_str().expect("utf8"),
            "agent",
        ],
    );
    run_ok(
        ctl,
        &[
            "pki",
            "issue",
            "--dir",
            pki.to_str().expect("utf8"),
            "admin",
        ],
    );
    run_ok(
        ctl,
        &["pki", "init", "--dir", rogue.to_str().expect("utf8")],
    );
    run_ok(
        ctl,
        &[
            "pki",
            "issue",
            "--dir",
            rogue.to_str().expect("utf8"),
            "intruder",
        ],
    );
    let key_mode = std::fs::metadata(pki.join("agent.key"))
        .expect("key")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
        0o600,
        "private keys are owner-only"
    );

    let port = free_port();
    let cfg = dir.path().join("emberd.toml");
    let p = |f: &str| pki.join(f).display().to_string();
    std::fs::write(
        &cfg,
        format!(
            "api = \"http://127.0.0.1:{port}\"\n[api_tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            p("agent.crt"), p("agent.key"), p("ca.crt")
        ),
    )
    .expect("config");
    let api = format!("https://127.0.0.1:{port}");
    let good = [
        "--tls-ca",
        &p("ca.crt"),
        "--tls-cert",
        &p("admin.crt"),
        "--tls-key",
        &p("admin.key"),
    ];
    let agent = Agent::start_custom(
        &dir.path().join("a"),
        &api,
        &["--config", cfg.to_str().expect("utf8")],
        &good,
    );
    let v = agent.ctl_json(&["volume", "create", "t1", "--size", "16M"]);
    assert_eq!(v["name"], "t1");

    let attempt = |extra: &[&str]| {
        let mut args = vec!["--api", api.as_str()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["volume", "list", "--json"]);
        run(ctl, &args)
    };
    let rq = |f: &str| rogue.join(f).display().to_string();
    for (what, extra) in [
        (
            "no client certificate",
            vec!["--tls-ca".to_owned(), p("ca.crt")],
        ),
        (
            "certificate from another CA",
            vec![
                "--tls-ca".into(),
                p("ca.crt"),
                "--tls-cert".into(),
                rq("intruder.crt"),
                "--tls-key".into(),
                rq("intruder.key"),
            ],
        ),
        (
            "client that does not trust the agent's CA",
            vec![
                "--tls-ca".into(),
                rq("ca.crt"),
                "--tls-cert".into(),
                p("admin.crt"),
                "--tls-key".into(),
                p("admin.key"),
            ],
        ),
    ] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out = attempt(&extra);
        assert!(
            !out.status.success(),
            "{what}: was let in: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Plain HTTP/2 against the TLS port fails too.
    let out = run(
        ctl,
        &[
            "--api",
            &format!("http://127.0.0.1:{port}"),
            "volume",
            "list",
        ],
    );
    assert!(!out.status.success(), "plaintext client was let in");
}
