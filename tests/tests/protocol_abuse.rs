//! Hostile and malformed NBD traffic (driven by py/nbd_abuse.py through
//! python3-libnbd with strict mode off): precise errnos, the agent survives.

use ember_it::{Agent, require_tool, run, tempdir};

#[test]
fn protocol_abuse_gets_precise_errnos_and_the_agent_keeps_serving() {
    if !require_tool("nbdsh") {
        return;
    }
    let dir = tempdir();
    let mut agent = Agent::start(&dir.path().join("a"));
    let uri = agent.create_volume("abuse", "16M");
    agent.ctl_json(&["snapshot", "create", "abuse", "ro"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/nbd_abuse.py");
    // Debian's python3-libnbd imports under /usr/bin/python3 only.
    let out = run("/usr/bin/python3", &[script, &uri, &agent.uri("abuse@ro")]);
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "abuse script failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.matches("ok   ").count() >= 18,
        "too few checks ran:\n{text}"
    );
    assert!(agent.alive(), "agent died; log: {}", agent.log());
    assert!(
        agent.log().contains("closed on bad input"),
        "protocol violations are logged"
    );
}
