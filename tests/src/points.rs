//! Recovery-point helpers shared by the point tests (`points.rs`,
//! `points_crash.rs`): the CLI's listing and the agent's on-disk index.

use std::path::Path;

use crate::Agent;

/// `emberctl replica points VOLUME --json` on `agent`: the listing.
pub fn points(agent: &Agent, volume: &str) -> Vec<serde_json::Value> {
    agent
        .ctl_json(&["replica", "points", volume])
        .as_array()
        .expect("points is a JSON array")
        .clone()
}

/// The time a listed point represents (unix ns).
pub fn at(p: &serde_json::Value) -> i64 {
    p["at_unix_ns"].as_i64().expect("at_unix_ns")
}

/// Point names recorded in a points dir's index (`points.json`), read as
/// the agent left it (empty when there is none yet).
pub fn index(dir: &Path) -> Vec<String> {
    let Ok(body) = std::fs::read(dir.join("points.json")) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    v["points"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
