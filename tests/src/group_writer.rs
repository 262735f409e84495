//! The group writer (tests/py/group_writer.py): one write order across
//! several volumes, each write acknowledged before the next is issued, so
//! a consistency group's copies can be checked against one history.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts the group writer on `uris` (the volumes in that order), writing
/// `count` stamped blocks at random among their first `blocks` blocks
/// (random by `seed`) and logging each acknowledged write to `history`
/// (read it with [`read_group_history`]).
pub fn group_writer(uris: &[String], history: &Path, blocks: u64, count: u64, seed: u64) -> Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/group_writer.py");
    Command::new("/usr/bin/python3")
        .arg(script)
        .arg(history)
        .arg(blocks.to_string())
        .arg(count.to_string())
        .arg(seed.to_string())
        .args(uris)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the group writer")
}

/// Reads a group writer's history: (seq, volume index, offset, ack unix
/// ns) per acknowledged write, in order.
pub fn read_group_history(path: &Path) -> Vec<(u64, usize, u64, i64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
            ))
        })
        .collect()
}
