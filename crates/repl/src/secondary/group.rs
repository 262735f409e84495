//! Consistency groups on the secondary: a group point is applied on every
//! member or on none.
//!
//! Each member's stream stages its batch for a point and makes it durable
//! (the staging log's commit record: *sealed*), then waits here. When the
//! last member seals the point, the group's committed point is persisted
//! (`DATA/replicas/secondary/groups/NAME.json`) and every member applies
//! its batch. A crash in between is settled at start-up by that file: a
//! sealed batch at or before the committed point is replayed, a later one
//! is dropped (the primary still holds it in its change set and resends).
//! So a promotion, which first freezes the group, finds every member at the
//! same committed point.
//!
//! A point that cannot complete — a member's stream ended or restarted
//! before sealing it, a newer point replaced it, the wait timed out, the
//! group is being promoted — is aborted: every waiting member drops its
//! sealed batch and ends its stream, and the primaries resync from their
//! change sets (which the unacknowledged point never cleared).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// How long a sealed member waits for the rest of its group.
const SEAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Re-check interval while waiting (wake-ups also come through `Notify`).
const RECHECK: Duration = Duration::from_millis(50);

/// What a sealed member does with its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Every member holds the point: apply it.
    Apply,
    /// The point cannot complete: drop the batch and end the stream.
    Abort(String),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CommittedFile {
    /// The last point every member holds (unix ns of the primary's clock).
    point: i64,
}

#[derive(Debug)]
struct Open {
    point: i64,
    size: u32,
    sealed: BTreeSet<String>,
    aborted: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    committed: i64,
    open: Option<Open>,
    /// A promotion is under way: no point completes any more.
    frozen: bool,
}

/// One group's barrier.
#[derive(Debug)]
pub(crate) struct Barrier {
    name: String,
    path: PathBuf,
    state: Mutex<State>,
    changed: Notify,
}

impl Barrier {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("group barrier lock poisoned")
    }

    /// The last point every member holds (0: none yet).
    pub(crate) fn committed(&self) -> i64 {
        self.state().committed
    }

    /// `member` has sealed its batch for `point` of a group of `size`:
    /// waits until the point is committed (every member sealed it) or
    /// aborted.
    pub(crate) async fn seal(&self, member: &str, point: i64, size: u32) -> Outcome {
        if let Some(outcome) = self.join(member, point, size) {
            return outcome;
        }
        let deadline = tokio::time::Instant::now() + SEAL_TIMEOUT;
        loop {
            let notified = self.changed.notified();
            if let Some(outcome) = self.settled(point) {
                return outcome;
            }
            if tokio::time::Instant::now() >= deadline {
                let mut st = self.state();
                if st.committed >= point {
                    return Outcome::Apply;
                }
                let reason = format!(
                    "not every member held it within {SEAL_TIMEOUT:?} (sealed: {})",
                    st.open
                        .as_ref()
                        .filter(|o| o.point == point)
                        .map(|o| o.sealed.iter().cloned().collect::<Vec<_>>().join(", "))
                        .unwrap_or_default()
                );
                if let Some(o) = st.open.as_mut().filter(|o| o.point == point) {
                    o.aborted.get_or_insert_with(|| reason.clone());
                }
                drop(st);
                self.changed.notify_waiters();
                return Outcome::Abort(reason);
            }
            let _ = tokio::time::timeout(RECHECK, notified).await;
        }
    }

    /// Registers the seal; `Some` when the outcome is known at once.
    fn join(&self, member: &str, point: i64, size: u32) -> Option<Outcome> {
        let mut st = self.state();
        if st.frozen {
            return Some(Outcome::Abort("the group is being promoted".into()));
        }
        if point <= st.committed {
            return Some(Outcome::Abort(format!(
                "point {point} is not after the group's committed point {}",
                st.committed
            )));
        }
        match st.open.as_mut() {
            Some(o) if o.point == point => {
                o.sealed.insert(member.to_owned());
            }
            Some(o) if o.point > point => {
                return Some(Outcome::Abort(format!(
                    "the group moved on to point {}",
                    o.point
                )));
            }
            // No point open, or an older one that can never complete now
            // (its waiters see it replaced and abort).
            _ => {
                st.open = Some(Open {
                    point,
                    size,
                    sealed: BTreeSet::from([member.to_owned()]),
                    aborted: None,
                });
                self.changed.notify_waiters();
            }
        }
        let open = st.open.as_mut().expect("set above");
        if let Some(reason) = &open.aborted {
            return Some(Outcome::Abort(reason.clone()));
        }
        if (open.sealed.len() as u32) < open.size.max(1) {
            return None;
        }
        // The last member: commit the point for all.
        let outcome = match ember_volume::fsutil::write_json_atomic(
            &self.path,
            &CommittedFile { point },
        ) {
            Ok(()) => {
                st.committed = point;
                st.open = None;
                Outcome::Apply
            }
            Err(e) => {
                tracing::error!(group = %self.name, error = %e, "cannot persist the group's committed point");
                let reason = format!("persisting the committed point: {e}");
                open.aborted = Some(reason.clone());
                Outcome::Abort(reason)
            }
        };
        drop(st);
        self.changed.notify_waiters();
        Some(outcome)
    }

    fn settled(&self, point: i64) -> Option<Outcome> {
        let st = self.state();
        if st.committed >= point {
            return Some(Outcome::Apply);
        }
        match &st.open {
            Some(o) if o.point == point => o.aborted.clone().map(Outcome::Abort),
            _ => Some(Outcome::Abort("a newer point replaced it".into())),
        }
    }

    /// `member`'s stream ended or restarted: the open point fails unless
    /// the member had sealed it.
    pub(crate) fn member_left(&self, member: &str) {
        let mut st = self.state();
        if let Some(o) = st.open.as_mut()
            && o.aborted.is_none()
            && !o.sealed.contains(member)
        {
            o.aborted = Some(format!(
                "member {member}'s stream ended before it held the point"
            ));
            drop(st);
            self.changed.notify_waiters();
        }
    }

    /// Stops the group from completing points (a promotion begins) and
    /// returns the committed point every member is at.
    pub(crate) fn freeze(&self) -> i64 {
        let mut st = self.state();
        st.frozen = true;
        if let Some(o) = st.open.as_mut() {
            o.aborted
                .get_or_insert_with(|| "the group is being promoted".into());
        }
        let committed = st.committed;
        drop(st);
        self.changed.notify_waiters();
        committed
    }

    /// Lets points complete again (a promotion failed).
    pub(crate) fn thaw(&self) {
        self.state().frozen = false;
    }
}

/// The barriers of every group this agent holds secondaries of.
#[derive(Debug)]
pub(crate) struct GroupBarriers {
    dir: PathBuf,
    groups: Mutex<HashMap<String, Arc<Barrier>>>,
}

impl GroupBarriers {
    /// Barriers persisted under `dir` (created if missing).
    pub(crate) fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            groups: Mutex::new(HashMap::new()),
        })
    }

    /// The barrier of group `name`, loading its committed point.
    pub(crate) fn get(&self, name: &str) -> Arc<Barrier> {
        self.groups
            .lock()
            .expect("group barriers lock poisoned")
            .entry(name.to_owned())
            .or_insert_with(|| {
                let path = self.dir.join(format!("{name}.json"));
                let committed = ember_volume::fsutil::read_json::<CommittedFile>(&path)
                    .map(|f| f.point)
                    .unwrap_or(0);
                Arc::new(Barrier {
                    name: name.to_owned(),
                    path,
                    state: Mutex::new(State {
                        committed,
                        ..State::default()
                    }),
                    changed: Notify::new(),
                })
            })
            .clone()
    }

    /// Forgets group `name` (its last member left this site's secondaries).
    pub(crate) fn forget(&self, name: &str) {
        self.groups
            .lock()
            .expect("group barriers lock poisoned")
            .remove(name);
        let _ = std::fs::remove_file(self.dir.join(format!("{name}.json")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn barriers() -> (tempfile::TempDir, GroupBarriers) {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = GroupBarriers::open(&dir.path().join("groups")).expect("open");
        (dir, b)
    }

    #[tokio::test]
    async fn a_point_commits_only_when_every_member_sealed_it_and_survives_a_restart() {
        let (dir, groups) = barriers();
        let g = groups.get("g");
        let (a, b) = (g.clone(), g.clone());
        let first = tokio::spawn(async move { a.seal("a", 10, 3).await });
        let second = tokio::spawn(async move { b.seal("b", 10, 3).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !first.is_finished() && !second.is_finished(),
            "2 of 3 sealed"
        );
        assert_eq!(g.committed(), 0);
        assert_eq!(g.seal("c", 10, 3).await, Outcome::Apply);
        assert_eq!(first.await.expect("join"), Outcome::Apply);
        assert_eq!(second.await.expect("join"), Outcome::Apply);
        assert_eq!(g.committed(), 10);
        // Persisted: a fresh set of barriers (a restart) knows the point.
        let again = GroupBarriers::open(&dir.path().join("groups")).expect("open");
        assert_eq!(again.get("g").committed(), 10);
    }

    #[tokio::test]
    async fn a_member_leaving_or_a_freeze_aborts_the_open_point() {
        let (_dir, groups) = barriers();
        let g = groups.get("g");
        let a = g.clone();
        let waiting = tokio::spawn(async move { a.seal("a", 20, 2).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        g.member_left("a"); // sealed members do not abort it
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        g.member_left("b");
        assert!(
            matches!(waiting.await.expect("join"), Outcome::Abort(r) if r.contains("member b"))
        );
        assert_eq!(g.committed(), 0);
        // The late member cannot complete the aborted point either.
        assert!(matches!(g.seal("b", 20, 2).await, Outcome::Abort(_)));

        let a = g.clone();
        let waiting = tokio::spawn(async move { a.seal("a", 30, 2).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(g.freeze(), 0);
        assert!(
            matches!(waiting.await.expect("join"), Outcome::Abort(r) if r.contains("promoted"))
        );
        assert!(matches!(g.seal("b", 40, 2).await, Outcome::Abort(_)));
        g.thaw();
        let a = g.clone();
        let waiting = tokio::spawn(async move { a.seal("a", 50, 2).await });
        assert_eq!(g.seal("b", 50, 2).await, Outcome::Apply);
        assert_eq!(waiting.await.expect("join"), Outcome::Apply);
    }

    #[tokio::test]
    async fn a_newer_point_replaces_one_that_can_never_complete() {
        let (_dir, groups) = barriers();
        let g = groups.get("g");
        let a = g.clone();
        let old = tokio::spawn(async move { a.seal("a", 60, 2).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b = g.clone();
        let new = tokio::spawn(async move { b.seal("b", 70, 2).await });
        assert!(matches!(old.await.expect("join"), Outcome::Abort(_)));
        assert_eq!(g.seal("a", 70, 2).await, Outcome::Apply);
        assert_eq!(new.await.expect("join"), Outcome::Apply);
        assert_eq!(g.committed(), 70);
    }
}
