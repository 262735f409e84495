//! The lab contract scripts and tutorials rely on: `emberctl lab up --dir
//! DIR --detach` writes DIR/lab.json (per site: API endpoint, NBD address,
//! peer listener; the demo volume's name and NBD URI), the two sites are
//! paired, the demo volume takes real I/O; `lab down` stops exactly what it
//! started.

use ember_it::{bin, require_tool, run_ok, tempdir};

#[test]
fn lab_up_detached_writes_lab_json_pairs_sites_and_lab_down_stops_them() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let lab_dir = dir.path().join("lab");
    let ctl = bin("emberctl");
    let ctl = ctl.to_str().expect("utf8");
    run_ok(
        ctl,
        &[
            "lab",
            "up",
            "--dir",
            lab_dir.to_str().expect("utf8"),
            "--detach",
            "--size",
            "64M",
        ],
    );
    let lab: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab_dir.join("lab.json")).expect("lab.json"))
            .expect("json");
    let mut pids = Vec::new();
    for site in ["site-a", "site-b"] {
        let s = &lab["sites"][site];
        let api = s["api"].as_str().expect("api");
        assert!(s["nbd"].as_str().expect("nbd").starts_with("127.0.0.1:"));
        pids.push(s["pid"].as_i64().expect("pid") as i32);
        let peers: serde_json::Value =
            serde_json::from_slice(&run_ok(ctl, &["--api", api, "peer", "list", "--json"]).stdout)
                .expect("json");
        assert_eq!(peers[0]["state"], "connected", "{site}: {peers}");
        let status: serde_json::Value =
            serde_json::from_slice(&run_ok(ctl, &["--api", api, "status", "--json"]).stdout)
                .expect("json");
        assert_eq!(status["site"], site);
    }
    assert_eq!(lab["volume"]["name"], "demo");
    let uri = lab["volume"]["nbd_uri"]["site-a"].as_str().expect("uri");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 1M",
            "-c",
            "read -P 0x77 0 1M",
            uri,
        ],
    );
    // The demo volume is replicated to site-b: once caught up, site-b's
    // read-only export holds the same bytes.
    assert_eq!(lab["volume"]["replication"]["mode"], "async");
    let secondary = lab["volume"]["nbd_uri"]["site-b"]
        .as_str()
        .expect("site-b uri");
    let api_a = lab["sites"]["site-a"]["api"].as_str().expect("api");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s: serde_json::Value = serde_json::from_slice(
            &run_ok(
                ctl,
                &["--api", api_a, "replica", "status", "demo", "--json"],
            )
            .stdout,
        )
        .expect("json");
        if s["state"] == "in-sync" && s["lag_bytes"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "demo never caught up: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", uri, secondary],
    );

    run_ok(
        ctl,
        &["lab", "down", "--dir", lab_dir.to_str().expect("utf8")],
    );
    assert!(!lab_dir.join("lab.json").exists());
    for pid in pids {
        // SAFETY: probing a pid with signal 0.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split_whitespace().nth(2) == Some("Z"))
            .unwrap_or(true);
        assert!(
            !alive || zombie,
            "emberd {pid} still running after lab down"
        );
    }
}

#[test]
fn foreground_lab_stops_both_sites_promptly_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    let dir = tempdir();
    let lab_dir = dir.path().join("lab");
    let mut child = std::process::Command::new(bin("emberctl"))
        .args([
            "lab",
            "up",
            "--dir",
            lab_dir.to_str().expect("utf8"),
            "--size",
            "16M",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .process_group(0) // its own group, like a terminal's foreground job
        .spawn()
        .expect("emberctl lab up");
    let pgid = child.id() as i32;
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("line");
        seen.push(line.clone());
        // Wait for at least one live status line: the view's API connection is open.
        if line.starts_with("demo:") {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("paired over mutual TLS")),
        "{seen:?}"
    );
    let started = std::time::Instant::now();
    // SAFETY: signalling the process group we created.
    unsafe { libc::kill(-pgid, libc::SIGINT) };
    let rest: Vec<String> = lines.map(|l| l.expect("line")).collect();
    let status = child.wait().expect("wait");
    let took = started.elapsed();
    assert!(status.success(), "lab up exited {status}: {rest:?}");
    assert!(
        took < std::time::Duration::from_secs(15),
        "stopping took {took:?}: {rest:?}"
    );
    assert!(
        !rest.iter().any(|l| l.starts_with("killed")),
        "a site had to be killed: {rest:?}"
    );
    assert!(!lab_dir.join("lab.json").exists());
    for site in ["site-a", "site-b"] {
        let log = std::fs::read_to_string(lab_dir.join(format!("{site}.log"))).expect("site log");
        assert!(
            log.contains("emberd stopped cleanly"),
            "{site} did not stop cleanly"
        );
        assert!(
            !log.contains("clients still connected"),
            "{site} had to force-close lab clients"
        );
    }
}

/// `lab up --sites 3` (issue 14): site-a replicates the demo volume sync to
/// site-b and async to site-c; lab.json names site-c and its NBD URI, both
/// targets reach in-sync and hold site-a's bytes, and the live line shows
/// both targets.
#[test]
fn three_site_lab_replicates_sync_to_site_b_and_async_to_site_c() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let lab_dir = dir.path().join("lab");
    let lab_dir_s = lab_dir.to_str().expect("utf8");
    let ctl = bin("emberctl");
    let ctl = ctl.to_str().expect("utf8");
    run_ok(
        ctl,
        &[
            "lab", "up", "--dir", lab_dir_s, "--detach", "--size", "32M", "--sites", "3",
        ],
    );
    let lab: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab_dir.join("lab.json")).expect("lab.json"))
            .expect("json");
    let sites = lab["sites"].as_object().expect("sites");
    assert_eq!(sites.len(), 3, "{lab}");
    let targets = &lab["volume"]["replication"]["targets"];
    assert_eq!(targets[0]["peer"], "site-b", "{lab}");
    assert_eq!(targets[0]["mode"], "sync", "{lab}");
    assert_eq!(targets[1]["peer"], "site-c", "{lab}");
    assert_eq!(targets[1]["mode"], "async", "{lab}");
    // Every site is paired with both others (re-homing needs b <-> c too).
    for site in ["site-a", "site-b", "site-c"] {
        let api = sites[site]["api"].as_str().expect("api");
        let peers: serde_json::Value =
            serde_json::from_slice(&run_ok(ctl, &["--api", api, "peer", "list", "--json"]).stdout)
                .expect("json");
        let peers = peers.as_array().expect("peers");
        assert_eq!(peers.len(), 2, "{site}: {peers:?}");
        assert!(
            peers.iter().all(|p| p["state"] == "connected"),
            "{site}: {peers:?}"
        );
    }
    let uri = lab["volume"]["nbd_uri"]["site-a"].as_str().expect("uri");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 0 4M",
            "-c",
            "write -P 0xc3 8M 1M",
            uri,
        ],
    );
    let api_a = sites["site-a"]["api"].as_str().expect("api");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s: serde_json::Value = serde_json::from_slice(
            &run_ok(
                ctl,
                &["--api", api_a, "replica", "status", "demo", "--json"],
            )
            .stdout,
        )
        .expect("json");
        let t = s["targets"].as_array().expect("targets");
        assert_eq!(t.len(), 2, "{s}");
        if t.iter()
            .all(|t| t["state"] == "in-sync" && t["lag_bytes"] == 0)
        {
            assert_eq!(t[0]["mode"], "sync", "{s}");
            assert_eq!(t[1]["mode"], "async", "{s}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the demo's targets never caught up: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for site in ["site-b", "site-c"] {
        let secondary = lab["volume"]["nbd_uri"][site].as_str().expect("uri");
        run_ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", uri, secondary],
        );
    }
    run_ok(ctl, &["lab", "down", "--dir", lab_dir_s]);
    assert!(!lab_dir.join("lab.json").exists());

    // Again in the same directory, in the foreground (what running
    // `scripts/lab.sh` a second time does): the sites re-pair at their new
    // ports, and the piped live line names both targets.
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(bin("emberctl"))
        .args([
            "lab", "up", "--dir", lab_dir_s, "--size", "32M", "--sites", "3",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("emberctl lab up");
    let pgid = child.id() as i32;
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut live = String::new();
    for line in lines.by_ref() {
        let line = line.expect("line");
        if line.starts_with("demo:") {
            live = line;
            break;
        }
    }
    // SAFETY: signalling the process group we created.
    unsafe { libc::kill(-pgid, libc::SIGINT) };
    let _rest: Vec<String> = lines.map(|l| l.expect("line")).collect();
    let status = child.wait().expect("wait");
    assert!(status.success(), "lab up --sites 3 exited {status}");
    assert!(
        live.contains("site-b sync") && live.contains("site-c async"),
        "the live line does not show both targets: {live:?}"
    );
}
