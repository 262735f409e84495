//! The async stream on a reflink data dir (XFS loop mounts), where the
//! secondary applies large aligned writes by cloning its staging log's
//! blocks into the volume (issue 16): write order still holds at every
//! link cut, a kill -9 of either side still converges, and the log's
//! space is freed (the volume's data is on disk once, not twice).

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use ember_it::repl::{HistoryKind, TwoSites, assert_prefix_at_every_cut, stamped_writer_with};
use ember_it::{LoopMount, require_tool};

const MIB: u64 = 1 << 20;
const CLONING: &str = "applying staged writes by clone";

fn on_xfs(toml: &str) -> Option<(LoopMount, TwoSites)> {
    let mount = LoopMount::xfs(2 << 30)?;
    let sites = TwoSites::start_in(&[], &[], &[], toml, Some((mount.path(), mount.path())));
    Some((mount, sites))
}

fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn a_cloning_secondary_is_always_a_prefix_of_the_write_history() {
    if !require_tool("nbdcopy") {
        return;
    }
    let Some((_mount, sites)) = on_xfs("") else {
        return;
    };
    let a_uri = sites.a.create_volume("vol", "16M");
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "async",
    ]);
    sites.wait_caught_up("vol", Duration::from_secs(60));
    let delay = Duration::from_millis(3);
    sites.proxy.set_delay(delay);

    // Half the writes are 64 KiB aligned (cloned), half 4 KiB (written):
    // a batch interleaves both, and their order must hold. A 2 MiB region
    // (32 clone slots), so a batch often writes into a range it cloned.
    let blocks = 2 * MIB / 4096;
    let history = sites.a.data_dir.with_extension("history");
    let writer = stamped_writer_with(&a_uri, &history, blocks, 1_000_000, &["span=16"]);
    assert_prefix_at_every_cut(
        &sites,
        "vol",
        writer,
        &history,
        HistoryKind::Spans,
        blocks,
        delay,
    );
    assert!(
        sites.b.log().contains(CLONING),
        "the secondary never applied a write by clone"
    );
}

#[test]
fn kill9_of_either_side_while_cloning_converges_and_the_log_space_is_freed() {
    if !require_tool("fio") || !require_tool("qemu-img") {
        return;
    }
    let Some((mount, mut sites)) = on_xfs("[tracking]\nal_extents = 8\n") else {
        return;
    };
    let free_at_start = mount.free_bytes();
    let a_uri = sites.a.create_volume("vol", "256M");
    sites.a.ctl_json(&[
        "replica", "enable", "vol", "--peer", "site-b", "--mode", "async",
    ]);
    sites.wait_caught_up("vol", Duration::from_secs(60));

    // 256 KiB writes: staged aligned and cloned.
    let s = sites.kill9_both_under_load("vol", &["--size=256M", "--bs=256k", "--rate=16m"]);
    assert!(
        u(&s, "resync_bytes_sent") <= 96 * MIB,
        "the restarted primary resent too much: {s}"
    );
    sites.assert_identical("vol");
    let sb = sites.b.ctl_json(&["replica", "status", "vol"]);
    assert_eq!(sb["state"], "consistent", "{sb}");
    assert!(
        sites.b.log().contains(CLONING),
        "the secondary never applied a write by clone"
    );

    // Space: after a full overwrite replicated by clone, the file system
    // holds each site's volume once: the log's blocks that the volume
    // does not share were freed when the log was emptied.
    let out = std::process::Command::new("fio")
        .args([
            "--name=fill",
            "--ioengine=nbd",
            "--uri",
            &a_uri,
            "--rw=write",
            "--bs=1m",
            "--iodepth=8",
            "--size=256M",
            "--output=/dev/null",
        ])
        .status()
        .expect("run fio");
    assert!(out.success(), "fio failed");
    sites.wait_caught_up("vol", Duration::from_secs(120));
    sites.assert_identical("vol");
    let staging = sites.b.data_dir.join("replicas/secondary/vol.staging");
    let log_len = std::fs::metadata(&staging).map_or(0, |m| m.len());
    assert_eq!(log_len, 0, "the staging log is emptied after its batches");
    let allocated = |site: &ember_it::Agent| {
        let img = site.data_dir.join("volumes/vol/data.img");
        std::fs::metadata(&img).expect("stat data.img").blocks() * 512
    };
    let volumes = allocated(&sites.a) + allocated(&sites.b);
    let used = free_at_start.saturating_sub(mount.free_bytes());
    assert!(
        used <= volumes + 64 * MIB,
        "the file system holds {} MiB more than the two volumes ({} MiB)",
        (used - volumes) / MIB,
        volumes / MIB
    );
}
