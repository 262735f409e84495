//! Rendering: aligned tables for people, JSON for scripts.

use ember_common::format_size;
use ember_proto::control::v1 as pb;
use serde_json::{Value, json};

/// `println!` for command output: when the reader has gone (`emberctl … |
/// head -1`, `| grep -q`) the command ends quietly instead of panicking
/// on the broken pipe; the reader chose to stop, nothing failed.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write_line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Writes one line to stdout; exits 0 when stdout is a closed pipe.
pub(crate) fn write_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("emberctl: writing the output: {e}");
        std::process::exit(1);
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Out {
    pub(crate) json: bool,
}

pub(crate) fn volume_json(v: &pb::Volume) -> Value {
    json!({
        "name": v.name,
        "size_bytes": v.size_bytes,
        "allocated_bytes": v.allocated_bytes,
        "nbd_uri": v.nbd_uri,
        "tracking_granularity_bytes": v.tracking_granularity_bytes,
        "dirty_bytes": v.dirty_bytes,
        "created_at_unix": v.created_at_unix,
        "origin": v.origin,
        "snapshot_count": v.snapshot_count,
        "nbd_connections": v.nbd_connections,
    })
}

fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({
        "volume": s.volume, "name": s.name, "size_bytes": s.size_bytes,
        "allocated_bytes": s.allocated_bytes, "created_at_unix": s.created_at_unix, "nbd_uri": s.nbd_uri,
    })
}

pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    outln!("{}", line(headers.iter().map(|h| h.to_string()).collect()));
    for r in rows {
        outln!("{}", line(r));
    }
}

impl Out {
    pub(crate) fn print_json(&self, v: &Value) {
        outln!(
            "{}",
            serde_json::to_string_pretty(v).expect("JSON values serialize")
        );
    }

    pub(crate) fn capabilities(&self, c: &pb::GetCapabilitiesResponse) {
        if self.json {
            return self.print_json(&json!({
                "version": c.version, "backend_id": c.backend_id,
                "capacity_total_bytes": c.capacity_total_bytes, "capacity_free_bytes": c.capacity_free_bytes,
                "features": c.features, "io_engine": c.io_engine, "nbd_address": c.nbd_address,
                "volume_count": c.volume_count, "site": c.site, "peer_address": c.peer_address,
                "snapshot_method": c.snapshot_method, "nbd_tls": c.nbd_tls,
                "replication_memory": c.replication_memory.as_ref().map(|m| json!({
                    "budget_bytes": m.budget_bytes, "used_bytes": m.used_bytes,
                    "peak_bytes": m.peak_bytes, "holders": m.holders, "refusals": m.refusals,
                })),
                "replication_targets": c.replication_targets.iter().map(|t| json!({
                    "site": t.site, "backend_id": t.backend_id, "state": t.state,
                    "rtt_us": t.rtt_us, "throughput_bytes_per_sec": t.throughput_bytes_per_sec,
                    "sync_possible": t.sync_possible, "min_rpo_seconds": t.min_rpo_seconds,
                    "max_rpo_seconds": t.max_rpo_seconds, "volumes": t.volumes,
                })).collect::<Vec<_>>(),
            }));
        }
        table(
            &["FIELD", "VALUE"],
            vec![
                vec!["version".into(), c.version.clone()],
                vec!["site".into(), c.site.clone()],
                vec![
                    "peer listener".into(),
                    if c.peer_address.is_empty() {
                        "-".into()
                    } else {
                        c.peer_address.clone()
                    },
                ],
                vec!["backend id".into(), c.backend_id.clone()],
                vec![
                    "capacity".into(),
                    format!(
                        "{} free of {}",
                        format_size(c.capacity_free_bytes),
                        format_size(c.capacity_total_bytes)
                    ),
                ],
                vec!["volumes".into(), c.volume_count.to_string()],
                vec!["nbd".into(), c.nbd_address.clone()],
                vec!["io engine".into(), c.io_engine.clone()],
                vec!["snapshot method".into(), c.snapshot_method.clone()],
                vec!["features".into(), c.features.join(", ")],
            ],
        );
        for t in &c.replication_targets {
            outln!(
                "replication to {} ({}): RPO {}s..{}s, sync {}, RTT {} µs, {} volumes",
                t.site,
                t.state,
                t.min_rpo_seconds,
                t.max_rpo_seconds,
                if t.sync_possible {
                    "possible"
                } else {
                    "not possible"
                },
                t.rtt_us,
                t.volumes
            );
        }
    }

    pub(crate) fn volumes(&self, vols: &[pb::Volume]) {
        if self.json {
            return self.print_json(&Value::Array(vols.iter().map(volume_json).collect()));
        }
        table(
            &[
                "NAME",
                "SIZE",
                "ALLOCATED",
                "DIRTY",
                "CONNS",
                "SNAPS",
                "NBD URI",
            ],
            vols.iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        format_size(v.size_bytes),
                        format_size(v.allocated_bytes),
                        format_size(v.dirty_bytes),
                        v.nbd_connections.to_string(),
                        v.snapshot_count.to_string(),
                        v.nbd_uri.clone(),
                    ]
                })
                .collect(),
        );
    }

    pub(crate) fn volume(&self, v: &pb::Volume) {
        if self.json {
            return self.print_json(&volume_json(v));
        }
        self.volumes(std::slice::from_ref(v));
    }

    pub(crate) fn snapshots(&self, snaps: &[pb::Snapshot]) {
        if self.json {
            return self.print_json(&Value::Array(snaps.iter().map(snapshot_json).collect()));
        }
        table(
            &["VOLUME", "SNAPSHOT", "SIZE", "ALLOCATED", "NBD URI"],
            snaps
                .iter()
                .map(|s| {
                    vec![
                        s.volume.clone(),
                        s.name.clone(),
                        format_size(s.size_bytes),
                        format_size(s.allocated_bytes),
                        s.nbd_uri.clone(),
                    ]
                })
                .collect(),
        );
    }

    pub(crate) fn deleted(&self, what: &str, name: &str, deleted: bool) {
        if self.json {
            return self.print_json(&json!({ "name": name, "deleted": deleted }));
        }
        if deleted {
            outln!("deleted {what} {name}")
        } else {
            outln!("{what} {name} did not exist")
        }
    }

    pub(crate) fn dirty(&self, r: &pb::GetDirtyExtentsResponse, with_checkpoint: bool) {
        let extents: Vec<Value> = r
            .extents
            .iter()
            .map(|e| json!({ "offset": e.offset, "length": e.length }))
            .collect();
        if self.json {
            if with_checkpoint {
                return self.print_json(&json!({
                    "checkpoint_id": r.checkpoint_id, "granularity_bytes": r.granularity_bytes,
                    "dirty_bytes": r.dirty_bytes, "extents": extents,
                }));
            }
            return self.print_json(&Value::Array(extents));
        }
        table(
            &["OFFSET", "LENGTH"],
            r.extents
                .iter()
                .map(|e| vec![e.offset.to_string(), e.length.to_string()])
                .collect(),
        );
        outln!(
            "{} dirty in {} extent(s); checkpoint {}",
            format_size(r.dirty_bytes),
            r.extents.len(),
            r.checkpoint_id
        );
    }

    pub(crate) fn peers(&self, peers: &[pb::Peer]) {
        if self.json {
            let list: Vec<Value> = peers
                .iter()
                .map(|p| {
                    json!({
                        "site": p.site, "address": p.address, "backend_id": p.backend_id,
                        "protocol_version": p.protocol_version, "capabilities": p.capabilities,
                        "rtt_us": p.rtt_us, "throughput_bytes_per_sec": p.throughput_bytes_per_sec,
                        "state": p.state, "added_at_unix": p.added_at_unix, "last_error": p.last_error,
                    })
                })
                .collect();
            return self.print_json(&Value::Array(list));
        }
        table(
            &[
                "SITE",
                "ADDRESS",
                "STATE",
                "RTT",
                "THROUGHPUT",
                "PROTOCOL",
                "BACKEND ID",
            ],
            peers
                .iter()
                .map(|p| {
                    vec![
                        p.site.clone(),
                        p.address.clone(),
                        if p.last_error.is_empty() {
                            p.state.clone()
                        } else {
                            format!("{} ({})", p.state, p.last_error)
                        },
                        format!("{:.0} µs", p.rtt_us as f64),
                        format!("{}/s", format_size(p.throughput_bytes_per_sec)),
                        format!("v{}", p.protocol_version),
                        p.backend_id.clone(),
                    ]
                })
                .collect(),
        );
    }
}
