//! The audit log of role changes (`DATA/replicas/audit.log`): one JSON line
//! per promotion, demotion and split-brain decision, fsynced, so an operator
//! can reconstruct who decided what and which writes were discarded.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// One decision.
#[derive(Debug, Serialize)]
pub(crate) struct Entry<'a> {
    /// `promote`, `force-promote`, `demote`, `auto-demote`, `discard-local`, `split-brain`.
    pub(crate) action: &'a str,
    pub(crate) volume: &'a str,
    /// The other site.
    pub(crate) peer: &'a str,
    /// Generation after the decision.
    pub(crate) generation: u64,
    /// Free-form detail (recovery point, bytes discarded…).
    pub(crate) detail: String,
}

#[derive(Serialize)]
struct Line<'a> {
    at_unix_ms: i64,
    #[serde(flatten)]
    entry: &'a Entry<'a>,
}

/// The audit log file.
#[derive(Debug, Clone)]
pub(crate) struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    pub(crate) fn new(replicas_dir: &Path) -> Self {
        Self {
            path: replicas_dir.join("audit.log"),
        }
    }

    /// Appends `entry` and logs it; a failure to write is logged, not fatal
    /// (the decision already happened and is in the agent log).
    pub(crate) fn record(&self, entry: &Entry<'_>) {
        tracing::warn!(action = entry.action, volume = entry.volume, peer = entry.peer, generation = entry.generation, detail = %entry.detail, "audit");
        let line = Line {
            at_unix_ms: crate::primary::link::now_unix_ns() / 1_000_000,
            entry,
        };
        let result = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            let mut text = serde_json::to_string(&line).map_err(std::io::Error::other)?;
            text.push('\n');
            f.write_all(text.as_bytes())?;
            f.sync_data()
        })();
        if let Err(e) = result {
            tracing::error!(path = %self.path.display(), error = %e, "cannot append to the audit log");
        }
    }
}
