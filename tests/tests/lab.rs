//! The lab contract scripts and tutorials rely on: `emberctl lab up --dir
//! DIR --detach` writes DIR/lab.json (per site: API endpoint, NBD address,
//! peer listener; the demo volume's name and NBD URI), the two sites are
//! paired, the demo volume takes real I/O; `lab down` stops exactly what it
//! started.

use ember_it::{bin, require_tool, run_ok, tempdir};

#[test]
fn lab_up_detached_writes_lab_json_pairs_sites_and_lab_down_stops_them() {
    if !require_tool("qemu-io") { return; }
    let dir = tempdir();
    let lab_dir = dir.path().join("lab");
    let ctl = bin("emberctl");
    let ctl = ctl.to_str().expect("utf8");
    run_ok(ctl, &["lab", "up", "--dir", lab_dir.to_str().expect("utf8"), "--detach", "--size", "64M"]);
    let lab: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab_dir.join("lab.json")).expect("lab.json")).expect("json");
    let mut pids = Vec::new();
    for site in ["site-a", "site-b"] {
        let s = &lab["sites"][site];
        let api = s["api"].as_str().expect("api");
        assert!(s["nbd"].as_str().expect("nbd").starts_with("127.0.0.1:"));
        pids.push(s["pid"].as_i64().expect("pid") as i32);
        let peers: serde_json::Value =
            serde_json::from_slice(&run_ok(ctl, &["--api", api, "peer", "list", "--json"]).stdout).expect("json");
        assert_eq!(peers[0]["state"], "connected", "{site}: {peers}");
        let status: serde_json::Value =
            serde_json::from_slice(&run_ok(ctl, &["--api", api, "status", "--json"]).stdout).expect("json");
        assert_eq!(status["site"], site);
    }
    assert_eq!(lab["volume"]["name"], "demo");
    let uri = lab["volume"]["nbd_uri"]["site-a"].as_str().expect("uri");
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x77 0 1M", "-c", "read -P 0x77 0 1M", uri]);

    run_ok(ctl, &["lab", "down", "--dir", lab_dir.to_str().expect("utf8")]);
    assert!(!lab_dir.join("lab.json").exists());
    for pid in pids {
        // SAFETY: probing a pid with signal 0.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split_whitespace().nth(2) == Some("Z"))
            .unwrap_or(true);
        assert!(!alive || zombie, "emberd {pid} still running after lab down");
    }
}
