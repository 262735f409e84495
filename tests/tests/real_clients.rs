//! Real NBD clients against a running emberd: QEMU, libnbd, fio, nbd-client.

use ember_it::{Agent, pattern, require_tool, run, run_ok, tempdir};

#[test]
fn qemu_io_pattern_write_reads_back() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let agent = Agent::start(&dir.path().join("a"));
    let uri = agent.create_volume("qio", "64M");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 1M 2M", uri.as_str()],
    );
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 1M 2M",
            "-c",
            "read -P 0 0 1M",
            uri.as_str(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    // And the negative: the wrong pattern must be detected.
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x11 1M 4k", uri.as_str()],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
}

#[test]
fn nbdcopy_round_trips_a_random_file() {
    if !require_tool("nbdcopy") {
        return;
    }
    let dir = tempdir();
    let agent = Agent::start(&dir.path().join("a"));
    let uri = agent.create_volume("copy", "32M");
    let input = dir.path().join("in.bin");
    let output = dir.path().join("out.bin");
    std::fs::write(&input, pattern(32 << 20, 42)).expect("write input");
    run_ok("nbdcopy", &[input.to_str().expect("utf8"), uri.as_str()]);
    run_ok("nbdcopy", &[uri.as_str(), output.to_str().expect("utf8")]);
    assert!(
        std::fs::read(&input).expect("in") == std::fs::read(&output).expect("out"),
        "nbdcopy round trip differs"
    );
}

#[test]
fn qemu_img_convert_both_ways_and_compare() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempdir();
    let agent = Agent::start(&dir.path().join("a"));
    let uri = agent.create_volume("conv", "16M");
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; 16 << 20];
    data[3 << 20..5 << 20].copy_from_slice(&pattern(2 << 20, 7));
    std::fs::write(&src, &data).expect("write src");
    let s = src.to_str().expect("utf8");
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", s, uri.as_str()],
    );
    let back = dir.path().join("back.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            uri.as_str(),
            back.to_str().expect("utf8"),
        ],
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            s,
            back.to_str().expect("utf8"),
        ],
    );
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s, uri.as_str()],
    );
    // Holes were skipped: the volume allocates about the 2 MiB of data.
    let v = agent.ctl_json(&["volume", "show", "conv"]);
    assert!(
        v["allocated_bytes"].as_u64().expect("allocated") <= 3 << 20,
        "{v}"
    );
}

#[test]
fn nbdinfo_map_shows_holes_on_a_sparse_volume() {
    if !require_tool("nbdinfo") {
        return;
    }
    let dir = tempdir();
    let agent = Agent::start(&dir.path().join("a"));
    let uri = agent.create_volume("sparse", "64M");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 8M 1M", uri.as_str()],
    );
    let out = String::from_utf8(run_ok("nbdinfo", &["--map", uri.as_str()]).stdout).expect("utf8");
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(
        (lines[0][0], lines[0][1], lines[0][2]),
        ("0", "8388608", "3"),
        "{out}"
    );
    assert_eq!(
        (lines[1][0], lines[1][1], lines[1][2]),
        ("8388608", "1048576", "0"),
        "{out}"
    );
    assert_eq!(lines[2][2], "3", "{out}");
    // The dirty-bitmap context shows exactly the written megabyte.
    let out = String::from_utf8(
        run_ok("nbdinfo", &["--map=qemu:dirty-bitmap:dirty", uri.as_str()]).stdout,
    )
    .expect("utf8");
    assert!(
        out.lines().any(
            |l| l.split_whitespace().take(3).collect::<Vec<_>>() == ["8388608", "1048576", "1"]
        ),
        "{out}"
    );
}

#[test]
fn fio_nbd_engine_verifies_crc32c() {
    if !require_tool("fio") {
        return;
    }
    let dir = tempdir();
    let agent = Agent::start(&dir.path().join("a"));
    agent.create_volume("fio", "64M");
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            "--uri",
            &agent.uri("fio"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let report: serde_json::Value =
        serde_json::from_str(&text[text.find('{').expect("fio json")..]).expect("fio json");
    assert_eq!(report["jobs"][0]["error"], 0, "{report}");
    assert!(
        report["jobs"][0]["write"]["io_bytes"]
            .as_u64()
            .expect("bytes")
            >= 32 << 20
    );
}

#[test]
fn nbd_client_gets_through_negotiation() {
    if !require_tool("nbd-client") {
        return;
    }
    let dir = tempdir();
    let agent = Agent::start(&dir.path().join("a"));
    agent.create_volume("kern", "64M");
    let port = agent.nbd_port.to_string();
    // No nbd kernel module here: negotiation must succeed, then attaching fails.
    let out = run(
        "nbd-client",
        &["-N", "kern", "127.0.0.1", &port, "/dev/nbd0"],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("size = 64MB"),
        "negotiation did not complete: {text}"
    );
}

#[test]
fn many_volumes_and_connections_are_served_at_once() {
    if !require_tool("nbdsh") {
        return;
    }
    let dir = tempdir();
    let agent = Agent::start(&dir.path().join("a"));
    for i in 0..4 {
        agent.create_volume(&format!("m{i}"), "16M");
    }
    // 3000 idle clients stuck mid-handshake must not stop others.
    assert!(
        ember_it::raise_fd_limit() > 3200,
        "test needs more than 3200 file descriptors"
    );
    let port = agent.nbd_port;
    let mut idle: Vec<std::net::TcpStream> = (0..3000)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    // A sample of them gets the server greeting: the agent accepted them all.
    for s in idle.iter_mut().step_by(97) {
        use std::io::Read;
        let mut greeting = [0u8; 8];
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        s.read_exact(&mut greeting).expect("greeting");
        assert_eq!(&greeting, b"NBDMAGIC");
    }
    let mut children = Vec::new();
    for i in 0..4 {
        let uri = agent.uri(&format!("m{i}"));
        children.push(
            std::process::Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    &format!("write -P {} 0 4M", i + 1),
                    "-c",
                    &format!("read -P {} 0 4M", i + 1),
                    &uri,
                ])
                .output()
                .expect("qemu-io"),
        );
    }
    for (i, out) in children.into_iter().enumerate() {
        assert!(
            out.status.success(),
            "client {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("verification failed"));
    }
    drop(idle);
}

#[test]
fn blocking_fallback_engine_serves_the_same_bytes() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let agent = Agent::start_with(&dir.path().join("a"), &["--io-engine", "blocking"]);
    assert!(
        agent.log().contains("io_engine=\"blocking\"")
            || agent.log().contains("io_engine=blocking"),
        "start-up log names the engine: {}",
        agent.log()
    );
    let uri = agent.create_volume("blk", "32M");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 4M 4M",
            "-c",
            "write -z 0 1M",
            uri.as_str(),
        ],
    );
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x3c 4M 4M",
            "-c",
            "read -P 0 0 1M",
            uri.as_str(),
        ],
    );
    assert_eq!(agent.ctl_json(&["status"])["io_engine"], "blocking");
}

#[test]
fn nbd_over_a_unix_socket_serves_qemu_and_libnbd() {
    if !require_tool("nbdinfo") {
        return;
    }
    let dir = tempdir();
    let sock = dir.path().join("nbd.sock");
    let agent = Agent::start_with(
        &dir.path().join("a"),
        &["--nbd-unix", sock.to_str().expect("utf8")],
    );
    agent.create_volume("unixvol", "16M");
    let uri = format!("nbd+unix:///unixvol?socket={}", sock.display());
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x21 0 1M", uri.as_str()],
    );
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x21 0 1M", uri.as_str()],
    );
    let info = String::from_utf8(run_ok("nbdinfo", &[uri.as_str()]).stdout).expect("utf8");
    assert!(info.contains("export-size: 16777216"), "{info}");
    // The same bytes over TCP: one volume, two listeners.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x21 0 1M",
            agent.uri("unixvol").as_str(),
        ],
    );
}
