//! The async stream on a reflink data dir (XFS loop mounts), where the
//! secondary applies large aligned writes by cloning its staging log's
//! blocks into the volume (issue 16): write order still holds at every
//! link cut, a kill -9 of either side still converges, and the log's
//! space is freed (the volume's data is on disk once, not twice).

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use ember_it::repl::{
    TwoSites, check_prefix_spans, read_span_history, snapshot_export, stamped_writer_with,
};
use ember_it::{LoopMount, fio_load, require_tool};

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
    sites.proxy.set_delay(Duration::from_millis(3));

    // Half the writes are 64 KiB aligned (cloned), half 4 KiB (written):
    // a batch interleaves both, and their order must hold. A 2 MiB region
    // (32 clone slots), so a batch often writes into a range it cloned.
    let blocks = 2 * MIB / 4096;
    let history = sites.a.data_dir.with_extension("history");
    let mut writer = stamped_writer_with(&a_uri, &history, blocks, 1_000_000, &["span=16"]);
    let mut checked = Vec::new();
    for round in 0..5u64 {
        std::thread::sleep(Duration::from_millis(700 + round * 231));
        sites.proxy.cut();
        std::thread::sleep(Duration::from_millis(500));
        let image = snapshot_export(
            &sites.b.uri("vol"),
            &sites.dir.path().join(format!("cut{round}.img")),
        );
        std::thread::sleep(Duration::from_millis(100));
        let hist = read_span_history(&history);
        match check_prefix_spans(&image, blocks, &hist) {
            Ok(p) => checked.push((p, hist.len())),
            Err(e) => panic!("cut {round}: {e}"),
        }
        sites.proxy.restore();
        sites.proxy.set_delay(Duration::from_millis(3));
    }
    let _ = writer.kill();
    let _ = writer.wait();
    let nonempty = checked.iter().filter(|(p, _)| *p > 0).count();
    assert!(nonempty >= 3, "secondary never progressed: {checked:?}");
    assert!(
        checked.windows(2).all(|w| w[0].0 <= w[1].0),
        "consistent points went backwards: {checked:?}"
    );
    sites.proxy.restore();
    sites.wait_caught_up("vol", Duration::from_secs(60));
    sites.assert_identical("vol");
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
    let mut fio = fio_load(&a_uri, &["--size=256M", "--bs=256k", "--rate=16m"]);
    std::thread::sleep(Duration::from_millis(1500));
    sites.b.kill9();
    std::thread::sleep(Duration::from_millis(800));
    sites.b.restart();
    std::thread::sleep(Duration::from_millis(1500));
    sites.a.kill9();
    let _ = fio.kill();
    let _ = fio.wait();
    sites.a.restart();
    let s = sites.wait_caught_up("vol", Duration::from_secs(120));
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
