//! Pairing agents of two sites over mutual TLS: identities, protocol
//! version and link measurements exchanged; an agent with a certificate
//! from another CA, or none, is refused with a log line on both sides.

use std::path::Path;

use ember_it::{Agent, bin, free_port, run_ok, tempdir};

/// Starts an agent for `site` whose peer listener uses `site.crt` from `pki`.
fn site_agent(root: &Path, pki: &Path, site: &str) -> (Agent, String) {
    let port = free_port();
    let cfg = root.join(format!("{site}.toml"));
    let p = |f: &str| pki.join(f).display().to_string();
    std::fs::write(
        &cfg,
        format!(
            "site = \"{site}\"\n[peer]\nlisten = \"127.0.0.1:{port}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            p(&format!("{site}.crt")),
            p(&format!("{site}.key")),
            p("ca.crt")
        ),
    )
    .expect("config");
    let agent = Agent::start_with(&root.join(site), &["--config", cfg.to_str().expect("utf8")]);
    (agent, format!("127.0.0.1:{port}"))
}

fn pki(dir: &Path, names: &[&str]) {
    let ctl = bin("emberctl");
    let d = dir.to_str().expect("utf8");
    run_ok(ctl.to_str().expect("utf8"), &["pki", "init", "--dir", d]);
    for n in names {
        run_ok(
            ctl.to_str().expect("utf8"),
            &["pki", "issue", "--dir", d, n],
        );
    }
}

#[test]
fn two_sites_pair_over_mutual_tls_and_measure_the_link() {
    let dir = tempdir();
    let ca = dir.path().join("pki");
    pki(&ca, &["site-a", "site-b"]);
    let (a, a_addr) = site_agent(dir.path(), &ca, "site-a");
    let (b, b_addr) = site_agent(dir.path(), &ca, "site-b");

    let peer = a.ctl_json(&[
        "peer",
        "add",
        "site-b",
        "--address",
        &b_addr,
        "--measure",
        "8M",
    ]);
    let peer = &peer[0];
    assert_eq!(peer["site"], "site-b");
    assert_eq!(peer["state"], "connected");
    assert_eq!(peer["protocol_version"], 7, "the newest version both speak");
    assert_eq!(
        peer["backend_id"],
        b.ctl_json(&["status"])["backend_id"],
        "backend id exchanged"
    );
    assert!(peer["rtt_us"].as_u64().expect("rtt") > 0);
    assert!(
        peer["throughput_bytes_per_sec"]
            .as_u64()
            .expect("throughput")
            > 1 << 20,
        "{peer}"
    );
    b.ctl_json(&["peer", "add", "site-a", "--address", &a_addr]);

    // Idempotent for the same address; another address for the same site is refused.
    a.ctl_json(&[
        "peer",
        "add",
        "site-b",
        "--address",
        &b_addr,
        "--measure",
        "1M",
    ]);
    let out = a.ctl(&["peer", "add", "site-b", "--address", "127.0.0.1:1"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already paired")
    );
    // Naming the wrong site for an address is caught by Hello.
    let out = a.ctl(&["peer", "add", "site-c", "--address", &b_addr]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("identifies as site"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let list = a.ctl_json(&["peer", "list"]);
    assert_eq!(list.as_array().expect("list").len(), 1);
    assert_eq!(list[0]["state"], "connected");
    assert!(
        a.ctl_json(&["status"])["peer_address"]
            .as_str()
            .expect("addr")
            .starts_with("127.0.0.1:")
    );

    // Peers persist across restarts.
    let mut a = a;
    a.terminate();
    a.restart();
    assert_eq!(a.ctl_json(&["peer", "list"])[0]["site"], "site-b");

    // An unreachable peer is reported, not fatal.
    let mut b = b;
    b.terminate();
    let list = a.ctl_json(&["peer", "list"]);
    assert_eq!(list[0]["state"], "unreachable");
    assert!(!list[0]["last_error"].as_str().expect("error").is_empty());

    assert_eq!(a.ctl_json(&["peer", "remove", "site-b"])["deleted"], true);
    assert_eq!(a.ctl_json(&["peer", "remove", "site-b"])["deleted"], false);
    assert_eq!(a.ctl_json(&["peer", "list"]), serde_json::json!([]));
}

#[test]
fn a_peer_with_a_certificate_from_another_ca_or_none_is_refused() {
    let dir = tempdir();
    let ca = dir.path().join("pki");
    let rogue_ca = dir.path().join("rogue-pki");
    pki(&ca, &["site-a"]);
    pki(&rogue_ca, &["site-r"]);
    let (a, a_addr) = site_agent(dir.path(), &ca, "site-a");
    let (r, r_addr) = site_agent(dir.path(), &rogue_ca, "site-r");

    // The rogue dials site-a: site-a's listener refuses its client certificate.
    let out = r.ctl(&["peer", "add", "site-a", "--address", &a_addr]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rogue was paired");
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("peer site-a"),
        "{err}"
    );
    // site-a dials the rogue: the rogue's server certificate is not trusted.
    let out = a.ctl(&["peer", "add", "site-r", "--address", &r_addr]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "site-a paired with an untrusted server"
    );
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // No certificate at all: a plain TCP client is refused, and logged.
    let port: u16 = a_addr
        .rsplit_once(':')
        .expect("port")
        .1
        .parse()
        .expect("port");
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let mut buf = [0u8; 64];
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(
            n == 0 || buf[0] == 0x15,
            "plaintext got an answer other than a TLS alert"
        );
    }
    // Clients that trust site-a's CA but present no certificate, or one from
    // another CA: site-a's listener itself must refuse them.
    let ctl = bin("emberctl");
    let peer_api = format!("https://{a_addr}");
    let ca_crt = ca.join("ca.crt").display().to_string();
    let rogue_crt = rogue_ca.join("site-r.crt").display().to_string();
    let rogue_key = rogue_ca.join("site-r.key").display().to_string();
    for extra in [
        vec![],
        vec![
            "--tls-cert",
            rogue_crt.as_str(),
            "--tls-key",
            rogue_key.as_str(),
        ],
    ] {
        let mut args = vec!["--api", peer_api.as_str(), "--tls-ca", ca_crt.as_str()];
        args.extend(extra);
        args.push("status");
        let out = std::process::Command::new(&ctl)
            .args(&args)
            .output()
            .expect("emberctl");
        assert!(
            !out.status.success(),
            "a client without a valid certificate got through"
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = a.log();
    assert!(log.contains("presented no certificate"), "{log}");
    assert!(log.contains("not signed by this agent's peer CA"), "{log}");
    let refusals = log.matches("peer TLS handshake refused").count();
    assert!(
        refusals >= 2,
        "expected refusals for the rogue and the plaintext client in site-a's log:\n{log}"
    );
    assert!(
        a.ctl_json(&["peer", "list"])
            .as_array()
            .expect("list")
            .is_empty()
    );
    // Pairing an agent with itself is refused by Hello.
    let out = a.ctl(&["peer", "add", "site-x", "--address", &a_addr]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("itself"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn link_faults_are_measured_and_reported_through_the_fault_proxy() {
    let dir = tempdir();
    let ca = dir.path().join("pki");
    pki(&ca, &["site-a", "site-b"]);
    let (a, _) = site_agent(dir.path(), &ca, "site-a");
    let (_b, b_addr) = site_agent(dir.path(), &ca, "site-b");
    let proxy = ember_it::FaultProxy::start(b_addr.parse().expect("addr"));
    let via = proxy.addr.to_string();
    let peer = a.ctl_json(&[
        "peer",
        "add",
        "site-b",
        "--address",
        &via,
        "--measure",
        "1M",
    ]);
    let base_rtt = peer[0]["rtt_us"].as_u64().expect("rtt");
    let probe = || a.ctl_json(&["peer", "list"])[0].clone();

    // 20 ms each way: the reported RTT shows the emulated WAN.
    proxy.set_delay(std::time::Duration::from_millis(20));
    let slow = probe();
    assert_eq!(slow["state"], "connected");
    let rtt = slow["rtt_us"].as_u64().expect("rtt");
    assert!(
        rtt >= 40_000 && rtt > base_rtt,
        "rtt {rtt} µs with 2×20 ms of delay (base {base_rtt} µs)"
    );
    proxy.set_delay(std::time::Duration::ZERO);

    // A cut link is reported unreachable with a reason, and recovers.
    proxy.cut();
    let cut = probe();
    assert_eq!(cut["state"], "unreachable", "{cut}");
    assert!(!cut["last_error"].as_str().expect("error").is_empty());
    proxy.restore();
    assert_eq!(probe()["state"], "connected");

    // Flipped bits never pass: TLS rejects the corrupted stream. Every
    // chunk is corrupted while this lasts: with a single flip, the flip can
    // land on another connection's traffic and the probe pass cleanly.
    proxy.flip_bits(u64::MAX);
    assert_eq!(probe()["state"], "unreachable");
    assert!(proxy.flipped.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    proxy.restore();
    assert_eq!(probe()["state"], "connected");

    // A reset in the middle of the handshake is reported, then recovers.
    proxy.reset_after(200);
    assert_eq!(probe()["state"], "unreachable");
    proxy.restore();
    assert_eq!(probe()["state"], "connected");
}
