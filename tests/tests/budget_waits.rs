//! A resync never waits for replication budget while holding budget that
//! only its own progress would give back (issue 15; `crate::budget`,
//! `primary/session/hold.rs`). With the smallest budget (16 MiB) a volume
//! whose resync is mostly holes or zeros moves far more than the budget
//! without sending data:
//!
//! - `holes`: an empty 64 MiB volume. Its first catch-up scans 64 MiB in
//!   64 KiB pieces that all become zero frames; zero frames count no bytes
//!   towards the outbox's flush size, so they queued in the outbox while
//!   each piece held 64 KiB — at 16 MiB the session waited for budget that
//!   only its own outbox held (the scale smoke's hang, deterministic here).
//! - `zeros`: 128 MiB of written zeros (allocated, not holes): the initial
//!   sync reads 4 MiB segments, a fresh secondary needs none of them, and
//!   each held its 4 MiB until the next frame — which came only after the
//!   next segment's wait.
//! - `data`: 40 MiB of data beside them, so the fix does not just skip
//!   the budget.
//!
//! Every replica must converge byte-identical within the timeout, with the
//! reported use never past the budget.

use std::process::Command;
use std::time::Duration;

use ember_it::repl::TwoSites;
use ember_it::require_tool;

const MIB: u64 = 1 << 20;
const BUDGET: u64 = 16 * MIB;

/// qemu-io writing `bytes` of pattern `pattern` from offset 0 in 4 MiB
/// requests.
fn fill(uri: &str, bytes: u64, pattern: u8) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for at in (0..bytes).step_by((4 * MIB) as usize) {
        cmd.arg("-c").arg(format!(
            "write -P {pattern} {at} {}",
            (4 * MIB).min(bytes - at)
        ));
    }
    let out = cmd.arg(uri).output().expect("run qemu-io");
    assert!(
        out.status.success(),
        "qemu-io to {uri}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn resyncs_of_holes_and_zeros_larger_than_the_budget_complete() {
    require_tool("qemu-io");
    require_tool("qemu-img");
    let sites = TwoSites::start_with_config(&[], &[], "replication_memory = \"16M\"");
    let volumes = [
        ("holes", "64M", 0u64, 0u8),
        ("zeros", "128M", 128 * MIB, 0),
        ("data", "64M", 40 * MIB, 0x5a),
    ];
    for (name, size, bytes, pattern) in volumes {
        sites.a.create_volume(name, size);
        if bytes > 0 {
            fill(&sites.a.uri(name), bytes, pattern);
        }
    }
    for (name, ..) in volumes {
        sites.a.ctl_json(&[
            "replica", "enable", name, "--peer", "site-b", "--mode", "async",
        ]);
    }
    for (name, ..) in volumes {
        // Seconds when nothing waits on itself: a few for 256 MiB on a
        // loaded debug build. A session stuck on its own budget never
        // gets there.
        let s = sites.wait_caught_up(name, Duration::from_secs(90));
        let m = &s["replication_memory"];
        assert_eq!(m["budget_bytes"], BUDGET, "the configured budget");
        assert!(
            m["peak_bytes"].as_u64().expect("peak_bytes") <= BUDGET,
            "{name}: use past the budget: {m}"
        );
    }
    for (name, ..) in volumes {
        sites.assert_identical(name);
    }
}
