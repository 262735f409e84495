//! Replication events for `WatchEvents`: state changes, RPO breaches and
//! escalations, resync progress, promotions and demotions. A broadcast
//! channel: every watcher gets every event from the moment it subscribes;
//! a watcher too slow to keep up is told how many it missed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::primary::link::now_unix_ns;

/// Events kept for slow watchers before they miss some.
const BACKLOG: usize = 4096;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The replica's state changed (`state` holds the new one; fencing
    /// shows as the state `fenced`).
    State,
    /// Lag went above the RPO target.
    RpoBreach,
    /// Lag is back under the target.
    RpoMet,
    /// The escalate policy switched to sync.
    Escalated,
    /// …and back to async.
    DeEscalated,
    /// Resync progress (about once a second while syncing).
    ResyncProgress,
    /// This site became primary.
    Promoted,
    /// This site became a secondary.
    Demoted,
    /// Both sites took writes since they split.
    SplitBrain,
    /// A recovery point was taken on this secondary (the message names it).
    PointCreated,
    /// A recovery point expired (retention or the space cap; the message
    /// says which).
    PointExpired,
    /// A recovery point could not be taken (the message says why).
    PointFailed,
    /// A DR drill was started from this secondary (the message names it).
    DrillStarted,
    /// A DR drill of this secondary was stopped (its volume deleted).
    DrillStopped,
}

impl EventKind {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::State => "state",
            Self::RpoBreach => "rpo-breach",
            Self::RpoMet => "rpo-met",
            Self::Escalated => "escalated",
            Self::DeEscalated => "de-escalated",
            Self::ResyncProgress => "resync-progress",
            Self::Promoted => "promoted",
            Self::Demoted => "demoted",
            Self::SplitBrain => "split-brain",
            Self::PointCreated => "point-created",
            Self::PointExpired => "point-expired",
            Self::PointFailed => "point-failed",
            Self::DrillStarted => "drill-started",
            Self::DrillStopped => "drill-stopped",
        }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// When (unix ns).
    pub at_unix_ns: i64,
    /// Volume.
    pub volume: String,
    /// What.
    pub kind: EventKind,
    /// Replica state after the event (empty when not known).
    pub state: String,
    /// Lag at the time, seconds.
    pub lag_seconds: f64,
    /// Resync bytes left (progress events).
    pub resync_remaining_bytes: u64,
    /// Generation after the event.
    pub generation: u64,
    /// Human-readable detail.
    pub message: String,
}

impl Event {
    /// An event of `kind` for `volume` now; fill in the rest as needed.
    pub(crate) fn new(kind: EventKind, volume: &str, message: impl Into<String>) -> Self {
        Self {
            at_unix_ns: now_unix_ns(),
            volume: volume.to_owned(),
            kind,
            state: String::new(),
            lag_seconds: 0.0,
            resync_remaining_bytes: 0,
            generation: 0,
            message: message.into(),
        }
    }
}

/// The agent's event bus.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
    /// `point-failed` events per volume since the agent started (the
    /// `ember_recovery_points_failed_total` counter). Counted here, where
    /// every such event passes, so no place that emits one can forget it.
    points_failed: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
            points_failed: Arc::default(),
        }
    }
}

impl EventBus {
    /// Publishes an event (nobody listening is fine).
    pub(crate) fn publish(&self, event: Event) {
        if event.kind == EventKind::PointFailed {
            *self
                .points_failed
                .lock()
                .expect("points-failed lock poisoned")
                .entry(event.volume.clone())
                .or_default() += 1;
        }
        let _ = self.tx.send(event);
    }

    /// Recovery points that could not be taken, per volume, since the
    /// agent started (volumes without a failure are absent).
    pub fn points_failed(&self) -> BTreeMap<String, u64> {
        self.points_failed
            .lock()
            .expect("points-failed lock poisoned")
            .clone()
    }

    /// A new watcher.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_failures_are_counted_per_volume_with_or_without_watchers() {
        let bus = EventBus::default();
        let clone = bus.clone();
        bus.publish(Event::new(EventKind::PointFailed, "a", "no reflink"));
        let mut watcher = bus.subscribe();
        clone.publish(Event::new(EventKind::PointFailed, "a", "no space"));
        clone.publish(Event::new(EventKind::PointFailed, "b", "no space"));
        bus.publish(Event::new(EventKind::PointCreated, "c", "taken"));
        assert_eq!(
            bus.points_failed(),
            BTreeMap::from([("a".to_owned(), 2), ("b".to_owned(), 1)])
        );
        // Watchers still see every event.
        assert_eq!(
            watcher.try_recv().expect("event").kind,
            EventKind::PointFailed
        );
    }
}
