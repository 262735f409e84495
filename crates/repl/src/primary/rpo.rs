//! RPO enforcement on the primary: a watcher compares the lag (age of the
//! oldest write not yet durable on the secondary) with the volume's target
//! every [`WATCH_EVERY`] and applies the volume's policy:
//!
//! - `alert`: report a breach (WARN log, status `rpo_breached`, breach
//!   counter) and its end;
//! - `throttle`: admission control: while the session is connected and the
//!   lag is above half the target, each completed write is acknowledged
//!   only once the lag is back below it, so writers slow down to what the
//!   link carries;
//! - `escalate`: above half the target the volume replicates synchronously
//!   (each write acknowledged once on the secondary), back to async when
//!   the lag is under a tenth of it.
//!
//! Every policy reports breaches. A target of 0 means none (sync replicas:
//! their RPO is 0 by construction while connected; losing the peer shows
//! as state `degraded`).

use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::link::{Phase, ReplicaLink, WriteRules};
use crate::events::{Event, EventBus, EventKind};

/// How often the watcher looks at the lag (a breach is reported within it).
pub(crate) const WATCH_EVERY: Duration = Duration::from_millis(100);
/// Throttling and escalation start at this fraction of the target.
const ACT_AT: f64 = 0.5;
/// Escalation ends once the lag stays below this fraction of the target…
const CALM_AT: f64 = 0.1;
/// …for this long (a burst right after would otherwise start over).
const CALM_HOLD: Duration = Duration::from_secs(3);
/// A throttled write re-checks the lag this often.
const THROTTLE_POLL: Duration = Duration::from_millis(2);
/// A throttled write is never held longer than this (a stalled link ends
/// the session well before; this bounds the worst case regardless).
const THROTTLE_MAX: Duration = Duration::from_secs(10);

/// What a volume does when its RPO target is at risk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RpoPolicy {
    /// Report breaches only.
    #[default]
    Alert,
    /// Slow writers down to what the link carries.
    Throttle,
    /// Replicate synchronously while the lag is high.
    Escalate,
}

impl RpoPolicy {
    /// Parses `alert` / `throttle` / `escalate`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "alert" => Some(Self::Alert),
            "throttle" => Some(Self::Throttle),
            "escalate" => Some(Self::Escalate),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alert => "alert",
            Self::Throttle => "throttle",
            Self::Escalate => "escalate",
        }
    }
}

/// RPO state of one link, for status and the write path.
#[derive(Debug, Default)]
pub(crate) struct RpoState {
    /// The lag is above the target now.
    pub(crate) breached: AtomicBool,
    /// Breaches since the agent started (each counted once, at its start).
    pub(crate) breaches: AtomicU64,
    /// Escalate policy: replicating synchronously for now.
    pub(crate) escalated: AtomicBool,
    /// Recent client write rate, bytes per second (moving average).
    pub(crate) write_rate: AtomicU64,
    /// What the secondary acknowledges per second while a backlog exists:
    /// the link's real capacity (moving average; 0 until measured).
    pub(crate) drain_rate: AtomicU64,
    /// Last sample: (time, bytes written, bytes acknowledged, backlog).
    sample: std::sync::Mutex<Option<Sample>>,
    /// Escalated and calm (lag under [`CALM_AT`]) since then.
    calm_since: std::sync::Mutex<Option<Instant>>,
    /// Recent intervals that began with a backlog: (seconds, bytes acked).
    drain_window: std::sync::Mutex<std::collections::VecDeque<(f64, u64)>>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    written: u64,
    acked: u64,
    backlog: u64,
}

fn blend(avg: &AtomicU64, value: f64, weight: f64) {
    let old = avg.load(Ordering::Relaxed);
    let next = if old == 0 {
        value
    } else {
        old as f64 * (1.0 - weight) + value * weight
    };
    avg.store(next as u64, Ordering::Relaxed);
}

/// Weight of the newest sample in the write-rate average (per second of
/// elapsed time: a ~10 s memory).
const RATE_WEIGHT_PER_SEC: f64 = 0.1;

impl RpoState {
    /// Folds the write and acknowledgement counters into the averages.
    fn sample(&self, written: u64, backlog: u64) {
        let now = Sample {
            at: Instant::now(),
            written,
            acked: written.saturating_sub(backlog),
            backlog,
        };
        let mut last = self.sample.lock().expect("rate lock poisoned");
        if let Some(before) = *last {
            let secs = now.at.duration_since(before.at).as_secs_f64();
            if secs <= 0.0 {
                return;
            }
            let w = (RATE_WEIGHT_PER_SEC * secs).min(1.0);
            blend(
                &self.write_rate,
                now.written.saturating_sub(before.written) as f64 / secs,
                w,
            );
            // Only a backlog shows what the link can drain. Acknowledgements
            // come per committed batch, in bursts: average over a window.
            // Not while escalated: sync acknowledges what is written, which
            // measures the demand, not the link.
            if before.backlog > 0 && !self.escalated.load(Ordering::Relaxed) {
                let mut window = self.drain_window.lock().expect("drain lock poisoned");
                window.push_back((secs, now.acked.saturating_sub(before.acked)));
                let mut total: f64 = window.iter().map(|w| w.0).sum();
                while total > DRAIN_WINDOW_SECS {
                    let (s, _) = window.pop_front().expect("non-empty");
                    total -= s;
                }
                let acked: u64 = window.iter().map(|w| w.1).sum();
                if total >= DRAIN_MIN_SECS && acked > 0 {
                    self.drain_rate
                        .store((acked as f64 / total) as u64, Ordering::Relaxed);
                }
            }
        }
        *last = Some(now);
    }
}

/// The drain rate averages this much recent backlog time…
const DRAIN_WINDOW_SECS: f64 = 3.0;
/// …and is only trusted after this much.
const DRAIN_MIN_SECS: f64 = 0.5;

/// The lag the volume is heading for: the larger of its current lag and
/// the time the link needs to drain the backlog. Bytes already sent but
/// not yet acknowledged (HTTP/2 windows, socket buffers) would otherwise
/// only show up in the lag seconds after they were written.
pub(crate) fn predicted_lag(link: &ReplicaLink) -> f64 {
    let (lag, backlog) = link.lag();
    let drain = link.rpo.drain_rate.load(Ordering::Relaxed);
    if drain == 0 {
        lag
    } else {
        lag.max(backlog as f64 / drain as f64)
    }
}

/// The target in seconds, if the volume has one.
fn target(link: &ReplicaLink) -> Option<f64> {
    let rpo = link
        .config
        .lock()
        .expect("config lock poisoned")
        .rpo_seconds;
    (rpo > 0).then_some(rpo as f64)
}

/// Whether a write completing now must wait (throttle policy).
pub(crate) fn must_throttle(link: &ReplicaLink, rules: &WriteRules) -> bool {
    rules.rpo_policy == RpoPolicy::Throttle
        && rules.rpo_seconds > 0
        && link.phase() != Phase::Disconnected
        && predicted_lag(link) > rules.rpo_seconds as f64 * ACT_AT
}

/// Waits until the lag of `link` is back under half its target.
pub(crate) async fn throttle(link: Weak<ReplicaLink>) {
    let started = Instant::now();
    while started.elapsed() < THROTTLE_MAX {
        match link.upgrade() {
            Some(l) if must_throttle(&l, &l.write_rules()) => {}
            _ => return,
        }
        tokio::time::sleep(THROTTLE_POLL).await;
    }
}

/// What the watcher remembers between looks, to report changes.
#[derive(Debug)]
pub(crate) struct Watch {
    state: &'static str,
    last_progress: Instant,
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            state: "",
            last_progress: Instant::now(),
        }
    }
}

/// Publishes state changes and, about once a second, resync progress.
fn report(link: &ReplicaLink, events: &EventBus, watch: &mut Watch) {
    let cfg = link.config();
    let state = link.state();
    let (lag, _) = link.lag();
    let event = |kind, message: String| {
        let mut e = Event::new(kind, &cfg.volume, message);
        e.state = state.into();
        e.lag_seconds = lag;
        e.generation = cfg.generation;
        e.resync_remaining_bytes = link.stats.resync_remaining_bytes.load(Ordering::Relaxed);
        e
    };
    if state != watch.state {
        events.publish(event(
            EventKind::State,
            format!(
                "{} -> {state}",
                if watch.state.is_empty() {
                    "start"
                } else {
                    watch.state
                }
            ),
        ));
        watch.state = state;
    }
    if state == "syncing" && watch.last_progress.elapsed() >= PROGRESS_EVERY {
        watch.last_progress = Instant::now();
        events.publish(event(
            EventKind::ResyncProgress,
            "resync in progress".into(),
        ));
    }
}

/// Resync progress events are published this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Looks at the lag once, applies the policy and reports changes.
pub(crate) fn evaluate(link: &ReplicaLink, events: &EventBus, watch: &mut Watch) {
    report(link, events, watch);
    let publish = |kind, message: String| {
        let mut e = Event::new(kind, &link.config().volume, message);
        e.lag_seconds = link.lag().0;
        e.state = link.state().into();
        events.publish(e);
    };
    let cfg = link.config();
    let state = &link.rpo;
    state.sample(
        link.stats.bytes_written.load(Ordering::Relaxed),
        link.lag().1,
    );
    let Some(t) = target(link) else {
        state.breached.store(false, Ordering::Relaxed);
        state.escalated.store(false, Ordering::Relaxed);
        return;
    };
    let (lag, lag_bytes) = link.lag();
    let breached = lag > t;
    if breached != state.breached.swap(breached, Ordering::Relaxed) {
        if breached {
            state.breaches.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(volume = %cfg.volume, peer = %cfg.peer, lag_seconds = lag, lag_bytes, rpo_seconds = t, policy = cfg.rpo_policy.as_str(), "RPO breach: lag above the target");
            publish(
                EventKind::RpoBreach,
                format!("lag {lag:.2} s above the {t} s target"),
            );
        } else {
            tracing::info!(volume = %cfg.volume, lag_seconds = lag, rpo_seconds = t, "RPO met again");
            publish(EventKind::RpoMet, format!("lag {lag:.2} s, target {t} s"));
        }
    }
    if cfg.rpo_policy == RpoPolicy::Escalate {
        let escalated = state.escalated.load(Ordering::Relaxed);
        let predicted = predicted_lag(link);
        let mut calm = state.calm_since.lock().expect("calm lock poisoned");
        if !escalated && predicted > t * ACT_AT {
            state.escalated.store(true, Ordering::Relaxed);
            *calm = None;
            tracing::warn!(volume = %cfg.volume, lag_seconds = lag, rpo_seconds = t, "RPO at risk: replicating synchronously until the lag falls");
            publish(
                EventKind::Escalated,
                format!("predicted lag {predicted:.2} s: sync until it falls"),
            );
        } else if escalated && predicted < t * CALM_AT {
            // Back to async only when the writers would fit the link: under
            // sync they are held to its pace, so a calm lag alone says
            // nothing about the demand.
            let capacity = state.drain_rate.load(Ordering::Relaxed);
            let demand = state.write_rate.load(Ordering::Relaxed);
            let fits = capacity == 0 || demand < capacity / 2;
            let since = *calm.get_or_insert_with(Instant::now);
            if since.elapsed() >= CALM_HOLD && fits {
                state.escalated.store(false, Ordering::Relaxed);
                *calm = None;
                tracing::info!(volume = %cfg.volume, lag_seconds = lag, "lag low again: back to async");
                publish(
                    EventKind::DeEscalated,
                    "lag low again: back to async".into(),
                );
            }
        } else if escalated {
            *calm = None;
        }
    } else {
        state.escalated.store(false, Ordering::Relaxed);
    }
}

/// The watcher task of one link.
pub(crate) async fn watch(link: Weak<ReplicaLink>, events: EventBus, stop: CancellationToken) {
    let mut watch = Watch::default();
    loop {
        tokio::select! {
            () = tokio::time::sleep(WATCH_EVERY) => {}
            () = stop.cancelled() => return,
        }
        let Some(link) = link.upgrade() else { return };
        evaluate(&link, &events, &mut watch);
    }
}
