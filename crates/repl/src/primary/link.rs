//! [`ReplicaLink`]: one replicated volume on its primary. It is the
//! volume's replication hook (every completed write enters the journal)
//! and the state its session task and the status API share.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime};

use ember_volume::{AckWait, Change, ReplicationHook, Volume};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::journal::{Journal, Op};
use super::rpo::{self, RpoPolicy, RpoState};

/// Unsent journal bytes that wake the session before its next tick.
const WAKE_BACKLOG: u64 = 4 << 20;

/// Replication mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Acknowledged once durable on both sides (DRBD protocol C).
    Sync,
    /// Acknowledged once durable locally; shipped in write order.
    Async,
}

impl Mode {
    /// Parses `sync` / `async`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sync" => Some(Self::Sync),
            "async" => Some(Self::Async),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Async => "async",
        }
    }
}

/// What a sync-mode primary does when it loses its secondary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerLossPolicy {
    /// Keep serving, track changes, resync on reconnect (status `degraded`).
    /// The default: an outage at the other site does not stop this one.
    #[default]
    Degrade,
    /// Hold write acknowledgements until the secondary is back and caught
    /// up, or an admin disables replication: no acknowledged write is ever
    /// missing from the secondary.
    Suspend,
}

impl PeerLossPolicy {
    /// Parses `degrade` / `suspend`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "degrade" => Some(Self::Degrade),
            "suspend" => Some(Self::Suspend),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Degrade => "degrade",
            Self::Suspend => "suspend",
        }
    }
}

/// A replica's persisted configuration (`DATA/replicas/primary/VOL.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReplicaConfig {
    /// Volume name.
    pub volume: String,
    /// Peer site holding the secondary.
    pub peer: String,
    /// Mode.
    pub mode: Mode,
    /// RPO target in seconds (0: none).
    pub rpo_seconds: u64,
    /// What happens when the target is at risk.
    #[serde(default)]
    pub rpo_policy: RpoPolicy,
    /// Sync-mode behaviour on peer loss.
    #[serde(default)]
    pub on_peer_loss: PeerLossPolicy,
    /// When replication was enabled (unix seconds).
    pub enabled_at_unix: i64,
    /// The secondary's last consistent point (primary clock, unix ns; 0 = none).
    #[serde(default)]
    pub last_consistent_at_unix_ns: i64,
    /// The first full sync finished: later sessions only resend the change
    /// set. Until then every session compares by blake3 (a re-paired copy
    /// costs reads, not network).
    #[serde(default)]
    pub synced: bool,
    /// An admin paused shipping (`replica pause`): writes are tracked in
    /// the change set and sent on `resume`.
    #[serde(default)]
    pub paused: bool,
    /// Fencing generation: bumped by every promotion. A peer at a newer
    /// generation refuses this primary.
    #[serde(default = "first_generation")]
    pub generation: u64,
    /// A peer answered with a newer generation: this site was promoted
    /// past and refuses writes until demoted.
    #[serde(default)]
    pub fenced: bool,
    /// Both sides took writes as primary since they split; writes are
    /// refused until an admin names the loser.
    #[serde(default)]
    pub split_brain: bool,
    /// A write completed while no session was connected: the secondary may
    /// lack acknowledged writes, so a promotion of it means split-brain.
    /// Cleared once a catch-up brings the secondary up to date.
    #[serde(default)]
    pub wrote_disconnected: bool,
    /// A forced promotion brought this primary up on the secondary's last
    /// consistent image taken at this time (primary clock, unix ns; 0 =
    /// not force-promoted): the data-loss window ends here.
    #[serde(default)]
    pub recovery_point_unix_ns: i64,
    /// Consistency group (async only): batches end only at the group's
    /// points, shared with every other member.
    #[serde(default)]
    pub group: Option<String>,
    /// Recovery points the secondary takes (`replica enable --points-every
    /// … --keep …`, `replica set`); sent in every `OpenReplica`.
    #[serde(default)]
    pub points: crate::plan::points::Schedule,
}

fn first_generation() -> u64 {
    1
}

impl ReplicaConfig {
    /// A new replica of `volume` on `peer`: generation 1, not yet synced.
    pub(crate) fn new(
        volume: &str,
        peer: &str,
        mode: Mode,
        rpo_seconds: u64,
        rpo_policy: RpoPolicy,
        on_peer_loss: PeerLossPolicy,
    ) -> Self {
        Self {
            volume: volume.to_owned(),
            peer: peer.to_owned(),
            mode,
            rpo_seconds,
            rpo_policy,
            on_peer_loss,
            enabled_at_unix: now_unix_ns() / 1_000_000_000,
            last_consistent_at_unix_ns: 0,
            synced: false,
            paused: false,
            generation: first_generation(),
            fenced: false,
            split_brain: false,
            wrote_disconnected: false,
            recovery_point_unix_ns: 0,
            group: None,
            points: crate::plan::points::Schedule::default(),
        }
    }

    /// The same replica as started by a promotion to `generation`: the
    /// promoted image is the reference, so it counts as synced.
    pub(crate) fn promoted(self, generation: u64) -> Self {
        Self {
            synced: true,
            generation,
            ..self
        }
    }
}

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// No session.
    Disconnected = 0,
    /// Copying the volume to an inconsistent secondary.
    InitialSync = 1,
    /// Shipping the change-set bitmap as one atomic batch.
    CatchUp = 2,
    /// Shipping writes as they complete.
    Streaming = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::InitialSync,
            2 => Self::CatchUp,
            3 => Self::Streaming,
            _ => Self::Disconnected,
        }
    }
}

/// Counters and progress, updated by the session.
#[derive(Debug, Default)]
pub(crate) struct LinkStats {
    /// Data bytes shipped (all frames).
    pub(crate) bytes_shipped: AtomicU64,
    /// Bytes shipped by initial sync and catch-up (data and zero ranges).
    pub(crate) resync_bytes_sent: AtomicU64,
    /// Bytes initial sync found already identical on the secondary.
    pub(crate) resync_bytes_skipped: AtomicU64,
    /// Bytes still to examine in the current resync.
    pub(crate) resync_remaining_bytes: AtomicU64,
    /// Bytes the current resync started with.
    pub(crate) resync_total_bytes: AtomicU64,
    /// Frames the secondary refused (checksum mismatch).
    pub(crate) frames_rejected: AtomicU64,
    /// Sessions started.
    pub(crate) sessions: AtomicU64,
    /// Journal overflows (fell back to the bitmap).
    pub(crate) overflows: AtomicU64,
    /// Bytes clients wrote to the volume since the agent started.
    pub(crate) bytes_written: AtomicU64,
}

/// One replicated volume on its primary.
#[derive(Debug)]
pub(crate) struct ReplicaLink {
    pub(crate) volume: Arc<Volume>,
    config_path: std::path::PathBuf,
    pub(crate) config: Mutex<ReplicaConfig>,
    pub(crate) journal: Mutex<Journal>,
    /// Wakes the session when the journal has something.
    pub(crate) wake: Notify,
    phase: AtomicU8,
    /// Resync start, for the rate and ETA.
    pub(crate) resync_started: Mutex<Option<Instant>>,
    pub(crate) last_error: Mutex<String>,
    /// Counters.
    pub(crate) stats: LinkStats,
    /// Client writes are refused: fenced, in split-brain, or draining for a
    /// planned switchover.
    writes_refused: AtomicBool,
    /// The peer reported split-brain (it holds writes we lack).
    pub(crate) peer_split_brain: AtomicBool,
    /// RPO breach and escalation state.
    pub(crate) rpo: RpoState,
    /// Group member: the session can take the next group point now (no
    /// commit in flight, no resync scan running).
    pub(crate) group_ready: AtomicBool,
    /// Group member: staged changes wait for the next group point.
    pub(crate) group_batch_open: AtomicBool,
    /// This link, for futures handed to the write path.
    me: Weak<ReplicaLink>,
}

impl ReplicaLink {
    pub(crate) fn new(
        volume: Arc<Volume>,
        config: ReplicaConfig,
        config_path: std::path::PathBuf,
        journal_bytes: u64,
    ) -> Arc<Self> {
        let refused = config.fenced || config.split_brain;
        Arc::new_cyclic(|me| Self {
            volume,
            config_path,
            config: Mutex::new(config),
            journal: Mutex::new(Journal::new(journal_bytes)),
            wake: Notify::new(),
            phase: AtomicU8::new(Phase::Disconnected as u8),
            resync_started: Mutex::new(None),
            last_error: Mutex::new(String::new()),
            stats: LinkStats::default(),
            writes_refused: AtomicBool::new(refused),
            peer_split_brain: AtomicBool::new(false),
            rpo: RpoState::default(),
            group_ready: AtomicBool::new(false),
            group_batch_open: AtomicBool::new(false),
            me: me.clone(),
        })
    }

    /// The replica's state as reported: split-brain, fenced, paused,
    /// syncing, in-sync, lagging (async, lag ≥ 1 s), degraded (sync, peer
    /// lost) or disconnected.
    pub(crate) fn state(&self) -> &'static str {
        let cfg = self.config();
        if cfg.split_brain || self.peer_split_brain.load(Ordering::SeqCst) {
            return "split-brain";
        }
        if cfg.fenced {
            return "fenced";
        }
        match self.phase() {
            _ if cfg.paused => "paused",
            Phase::InitialSync | Phase::CatchUp => "syncing",
            Phase::Streaming if cfg.mode == Mode::Async && self.lag().0 >= 1.0 => "lagging",
            Phase::Streaming => "in-sync",
            Phase::Disconnected if cfg.mode == Mode::Sync => "degraded",
            Phase::Disconnected => "disconnected",
        }
    }

    /// The mode writes are replicated in now: the configured one, or sync
    /// while the escalate policy holds the lag down.
    pub(crate) fn effective_mode(&self) -> Mode {
        self.effective(self.config.lock().expect("config lock poisoned").mode)
    }

    fn effective(&self, configured: Mode) -> Mode {
        if self.rpo.escalated.load(Ordering::Relaxed) {
            Mode::Sync
        } else {
            configured
        }
    }

    /// What the write path needs from the configuration, read under one
    /// lock (it runs on every client write).
    pub(crate) fn write_rules(&self) -> WriteRules {
        let cfg = self.config.lock().expect("config lock poisoned");
        WriteRules {
            mode: cfg.mode,
            on_peer_loss: cfg.on_peer_loss,
            rpo_policy: cfg.rpo_policy,
            rpo_seconds: cfg.rpo_seconds,
        }
    }

    /// Refuses (or serves again) client writes. Writes already past the
    /// check complete and are replicated as usual.
    pub(crate) fn refuse_writes(&self, refuse: bool) {
        self.writes_refused.store(refuse, Ordering::SeqCst);
    }

    /// Changes and persists the configuration.
    pub(crate) fn update(&self, f: impl FnOnce(&mut ReplicaConfig)) -> Result<(), String> {
        {
            let mut cfg = self.config.lock().expect("config lock poisoned");
            let before = cfg.clone();
            f(&mut cfg);
            if *cfg == before {
                return Ok(());
            }
        }
        self.persist()
    }

    /// A peer holds the volume at a newer generation: stop acting as primary.
    pub(crate) fn fence(&self, their_generation: u64) {
        self.refuse_writes(true);
        if let Err(e) = self.update(|c| c.fenced = true) {
            tracing::error!(volume = %self.config().volume, error = %e, "cannot persist the fence");
        }
        tracing::warn!(volume = %self.config().volume, their_generation, "fenced: the peer was promoted past this primary; writes refused until it demotes this site");
    }

    /// Records a write that completed with no session connected (persisted
    /// before the write is acknowledged: it decides split-brain later).
    fn note_disconnected_write(&self) {
        if self
            .config
            .lock()
            .expect("config lock poisoned")
            .wrote_disconnected
        {
            return;
        }
        if let Err(e) = self.update(|c| c.wrote_disconnected = true) {
            tracing::error!(volume = %self.config().volume, error = %e, "cannot persist a disconnected write");
        }
    }

    /// The configuration.
    pub(crate) fn config(&self) -> ReplicaConfig {
        self.config.lock().expect("config lock poisoned").clone()
    }

    /// The session's phase.
    pub(crate) fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    pub(crate) fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().expect("journal lock poisoned")
    }

    /// Name of this link's change set in the volume's tracker.
    pub(crate) fn consumer(&self) -> String {
        consumer_name(&self.config().peer)
    }

    /// Lag in seconds and bytes.
    pub(crate) fn lag(&self) -> (f64, u64) {
        let (age, bytes) = self.journal().lag();
        (age.as_secs_f64(), bytes)
    }

    /// Where this target's config is persisted.
    pub(crate) fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    /// Persists the configuration (with the latest consistent point).
    pub(crate) fn persist(&self) -> Result<(), String> {
        let cfg = self.config();
        ember_volume::fsutil::write_json_atomic(&self.config_path, &cfg).map_err(|e| e.to_string())
    }

    /// Records that the secondary caught up: the first full sync is done
    /// and it holds every write, including those taken while disconnected.
    pub(crate) fn mark_synced(&self) -> Result<(), String> {
        self.update(|c| {
            c.synced = true;
            c.wrote_disconnected = false;
        })
    }

    /// Records the secondary's new consistent point.
    pub(crate) fn set_consistent_at(&self, unix_ns: i64) {
        self.config
            .lock()
            .expect("config lock poisoned")
            .last_consistent_at_unix_ns = unix_ns;
    }

    /// Whether a write (or flush) must wait for the secondary.
    fn waits(&self, rules: &WriteRules) -> bool {
        self.effective(rules.mode) == Mode::Sync
            && (self.phase() == Phase::Streaming || rules.on_peer_loss == PeerLossPolicy::Suspend)
    }
}

/// The configuration the write path reads (see [`ReplicaLink::write_rules`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteRules {
    pub(crate) mode: Mode,
    pub(crate) on_peer_loss: PeerLossPolicy,
    pub(crate) rpo_policy: RpoPolicy,
    pub(crate) rpo_seconds: u64,
}

/// Name of the change set a link to `peer` uses.
pub(crate) fn consumer_name(peer: &str) -> String {
    format!("repl-{peer}")
}

/// Unix nanoseconds now.
pub(crate) fn now_unix_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn boxed(rx: tokio::sync::oneshot::Receiver<()>) -> AckWait {
    Box::pin(async move {
        // A dropped sender means replication was disabled: nothing to wait for.
        let _ = rx.await;
    })
}

impl ReplicationHook for ReplicaLink {
    fn refuses_writes(&self) -> bool {
        self.writes_refused.load(Ordering::SeqCst)
    }

    fn wants_changes(&self) -> bool {
        true
    }

    fn completed(&self, change: Change, fua: bool) -> Option<AckWait> {
        if self.phase() == Phase::Disconnected {
            self.note_disconnected_write();
        }
        if let Change::Write { data, .. } = &change {
            self.stats
                .bytes_written
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        let rules = self.write_rules();
        let wait = self.waits(&rules);
        let (backlog, rx) = {
            let mut j = self.journal();
            let (_, rx) = j.record(Op::Change(change), fua, wait);
            (j.unsent_bytes(), rx)
        };
        // Async writes do not wake the session one by one: it collects
        // them on its own tick, so the writer's path stays a memcpy and a
        // lock, and frames leave in batches.
        if wait || backlog >= WAKE_BACKLOG {
            self.wake.notify_one();
        }
        if rx.is_none() && rpo::must_throttle(self, &rules) {
            return Some(Box::pin(rpo::throttle(self.me.clone())));
        }
        rx.map(boxed)
    }

    fn flushed(&self) -> Option<AckWait> {
        if !self.waits(&self.write_rules()) {
            return None;
        }
        let (_, rx) = self.journal().record(Op::Flush, false, true);
        self.wake.notify_one();
        rx.map(boxed)
    }
}
