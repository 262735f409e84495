//! A forced promotion keeps the secondary's recovery points as snapshots
//! of the promoted volume (`VOL@POINT`, `:` spelled `-`): two real agents
//! on a loop-mounted XFS, three manual points with different contents,
//! `promote --force --at` the middle one; afterwards every point (older,
//! chosen, and the newer one the rollback set aside) is a listed snapshot
//! whose bytes, read over NBD, equal the point's image, a volume cloned
//! from one holds the same bytes, and the points directory is gone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ember_it::points::points;
use ember_it::repl::{TwoSites, snapshot_export};
use ember_it::{LoopMount, require_tool, run};

/// Two sites on one loop-mounted XFS. Fields drop in order: the agents
/// stop before the file system is unmounted.
struct Lab {
    sites: TwoSites,
    _fs: LoopMount,
}

fn tools() -> bool {
    require_tool("qemu-io") && require_tool("nbdcopy") && require_tool("mkfs.xfs")
}

fn write(uri: &str, pattern: u8, offset_mib: u64) {
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P 0x{pattern:02x} {offset_mib}M 4M"),
            uri,
        ],
    );
    assert!(
        out.status.success(),
        "qemu-io write: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn digest(bytes: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}/{}", h.finish(), bytes.len())
}

/// The snapshot name a point keeps (the agent's rule: `:` becomes `-`).
fn kept_name(point: &str) -> String {
    point.replace(':', "-")
}

#[test]
fn a_forced_promotion_keeps_every_point_as_a_snapshot_with_its_contents() {
    if !tools() {
        return;
    }
    let Some(fs) = LoopMount::xfs(2 << 30) else {
        return;
    };
    let sites = TwoSites::start_in(&[], &[], &[], "", Some((fs.path(), fs.path())));
    let lab = Lab { sites, _fs: fs };
    let s = &lab.sites;
    s.a.create_volume("pk", "64M");
    s.a.ctl_json(&[
        "replica", "enable", "pk", "--peer", "site-b", "--mode", "async",
    ]);
    s.wait_caught_up("pk", Duration::from_secs(60));

    // Three points, each after a different write: two named, one unnamed
    // (`manual-<RFC 3339>`, with colons). Taken on the secondary's site.
    let points_dir: PathBuf = s.b.data_dir.join("replicas/secondary/points/pk");
    let mut images: BTreeMap<String, String> = BTreeMap::new();
    for (i, name) in [Some("before-upgrade"), Some("nightly"), None]
        .into_iter()
        .enumerate()
    {
        write(&s.a.uri("pk"), 0x11 * (i as u8 + 1), 4 * i as u64);
        s.wait_caught_up("pk", Duration::from_secs(60));
        let mut args = vec!["replica", "point", "create", "pk"];
        if let Some(n) = name {
            args.extend(["--name", n]);
        }
        let p = s.b.ctl_json(&args);
        let point = p["name"].as_str().expect("point name").to_owned();
        let bytes = std::fs::read(points_dir.join(format!("{point}.img")))
            .unwrap_or_else(|e| panic!("point {point}'s image: {e}"));
        images.insert(point, digest(&bytes));
    }
    assert_eq!(points(&s.b, "pk").len(), 3, "three points listed");
    assert_eq!(
        images.values().collect::<BTreeSet<_>>().len(),
        3,
        "the three points hold different images"
    );
    let unnamed = images
        .keys()
        .find(|n| n.starts_with("manual-"))
        .expect("the unnamed point")
        .clone();
    assert!(
        unnamed.contains(':'),
        "{unnamed}: the name mapping is exercised"
    );
    // The newest image differs from every point.
    write(&s.a.uri("pk"), 0x77, 20);
    s.wait_caught_up("pk", Duration::from_secs(60));

    // Site-a is cut off; site-b comes up on the middle point.
    s.cut_both(true);
    let p =
        s.b.ctl_json(&["replica", "promote", "pk", "--force", "--at", "nightly"]);
    assert_eq!(p["forced"], true, "{p}");
    assert_eq!(p["role"], "primary", "{p}");

    // Every point, the newer one included, is now a snapshot of pk.
    let listed = s.b.ctl_json(&["snapshot", "list", "pk"]);
    let names: BTreeSet<String> = listed
        .as_array()
        .expect("snapshot list is a JSON array")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_owned())
        .collect();
    let want: BTreeSet<String> = images.keys().map(|n| kept_name(n)).collect();
    assert_eq!(names, want, "snapshots after the promotion: {listed}");
    for (point, hash) in &images {
        let snap = kept_name(point);
        let got = snapshot_export(
            &s.b.uri(&format!("pk@{snap}")),
            &s.dir.path().join(format!("{snap}.img")),
        );
        assert_eq!(
            &digest(&got),
            hash,
            "snapshot pk@{snap} differs from point {point}"
        );
    }

    // A volume made from one holds the same bytes, and it is writable.
    let oldest = kept_name("before-upgrade");
    s.b.ctl_json(&[
        "volume",
        "create",
        "pk-old",
        "--from-snapshot",
        &format!("pk@{oldest}"),
    ]);
    let got = snapshot_export(&s.b.uri("pk-old"), &s.dir.path().join("pk-old.img"));
    assert_eq!(
        &digest(&got),
        &images["before-upgrade"],
        "clone of pk@{oldest}"
    );
    write(&s.b.uri("pk-old"), 0x99, 0);

    // The points belonged to the secondary role: their directory goes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while points_dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!points_dir.exists(), "the points directory is left behind");
}
