//! DR drills as the control API sees them: the role check (a drill runs
//! on the secondary's site; asked on the primary's, the answer names the
//! site to ask), then `crate::drill` does the work; every start and stop is
//! audit-logged and published as an event of the source volume.

use super::Replication;
use crate::audit::Entry;
use crate::drill::{self, DrillError, DrillInfo};
use crate::events::{Event, EventKind};
use crate::primary::link::now_unix_ns;

/// What `drill start` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillRequest {
    /// The secondary volume to drill (for a group drill: the group).
    pub volume: String,
    /// The drill's name (a volume name); empty: a default one.
    pub name: String,
    /// A recovery point by name (empty: none).
    pub point: String,
    /// The newest point at or before this time (unix ns, primary clock;
    /// 0: none). Neither: the newest consistent image.
    pub at_unix_ns: i64,
}

fn check_name(what: &str, name: &str) -> Result<(), DrillError> {
    ember_volume::parse_volume(name)
        .map(|_| ())
        .map_err(|e| DrillError::InvalidArgument(format!("{what} {name:?}: {e}")))
}

impl Replication {
    /// Starts a DR drill of a secondary held here.
    ///
    /// # Errors
    /// [`DrillError`]: `PrimaryHere` on the primary's site, `NotFound`
    /// for a volume that is no secondary here, `AlreadyExists`,
    /// `InvalidArgument` (names, a time in the future), `Point` (an unknown
    /// or too old point), `FailedPrecondition` (no reflink, inconsistent).
    pub async fn start_drill(&self, req: DrillRequest) -> Result<DrillInfo, DrillError> {
        check_name("volume", &req.volume)?;
        if let Some(link) = self.link(&req.volume) {
            return Err(DrillError::PrimaryHere {
                volume: req.volume,
                ask: link.config().peer,
            });
        }
        let now = now_unix_ns();
        let source = drill::source_for(&req.point, req.at_unix_ns, now)?;
        let name = if req.name.is_empty() {
            drill::default_name(&req.volume, now)
        } else {
            req.name.clone()
        };
        check_name("drill name", &name)?;
        let rec = self
            .drills
            .start(&self.secondaries, &req.volume, &name, source, now)
            .await?;
        self.announce_start(&rec);
        self.drills.info(&rec).ok_or_else(|| {
            DrillError::NotFound(format!("drill {name} was deleted as soon as it was made"))
        })
    }

    /// Stops drill `name` (or every member of group drill `name`):
    /// deletes the volumes. Returns the drills stopped (empty: none such).
    ///
    /// # Errors
    /// NBD clients attached (`FailedPrecondition`), I/O.
    pub async fn stop_drill(&self, name: &str) -> Result<Vec<String>, DrillError> {
        check_name("drill name", name)?;
        let stopped = self.drills.stop(name).await?;
        for rec in &stopped {
            let (peer, generation) = self.origin_of(&rec.volume);
            let detail = format!("drill {} stopped; its volume deleted", rec.name);
            self.audit.record(&Entry {
                action: "drill-stop",
                volume: &rec.volume,
                peer: &peer,
                generation,
                detail: detail.clone(),
            });
            let mut event = Event::new(EventKind::DrillStopped, &rec.volume, detail);
            event.generation = generation;
            self.ctx.events.publish(event);
        }
        Ok(stopped.into_iter().map(|r| r.name).collect())
    }

    /// The primary site and generation of secondary `volume` (empty when
    /// it is no secondary here any more), for audit lines.
    fn origin_of(&self, volume: &str) -> (String, u64) {
        self.secondaries
            .get(volume)
            .map(|sv| {
                let r = sv.record();
                (r.primary_site, r.generation)
            })
            .unwrap_or_default()
    }

    fn announce_start(&self, rec: &drill::DrillRecord) {
        let (peer, generation) = self.origin_of(&rec.volume);
        let group = if rec.group.is_empty() {
            String::new()
        } else {
            format!(" (group drill {})", rec.group)
        };
        let detail = format!(
            "drill {}{group} started from point {} (image of unix ns {})",
            rec.name, rec.point, rec.at_unix_ns
        );
        self.audit.record(&Entry {
            action: "drill-start",
            volume: &rec.volume,
            peer: &peer,
            generation,
            detail: detail.clone(),
        });
        let mut event = Event::new(EventKind::DrillStarted, &rec.volume, detail);
        event.generation = generation;
        self.ctx.events.publish(event);
    }

    /// Starts a group drill: every member of secondary group `group` from
    /// one group recovery point (`point`/`at_unix_ns` as for a single
    /// drill; neither: the group's newest common point). Member drills are
    /// named `NAME-MEMBER`; `drill stop NAME` stops them all.
    ///
    /// # Errors
    /// `PrimaryHere` on the primary's site; `NotFound` for an unknown group
    /// or no common point; as [`Self::start_drill`] otherwise.
    pub async fn start_group_drill(&self, req: DrillRequest) -> Result<Vec<DrillInfo>, DrillError> {
        let group = req.volume;
        if let Ok(status) = self.group_status(&group)
            && status.role == "primary"
        {
            return Err(DrillError::PrimaryHere {
                volume: format!("group {group}"),
                ask: status.peer,
            });
        }
        let (members, _) = self.secondaries.group_members(&group);
        if members.is_empty() {
            return Err(DrillError::NotFound(format!(
                "no secondary group {group} on this site"
            )));
        }
        let now = now_unix_ns();
        let sel = match drill::source_for(&req.point, req.at_unix_ns, now)? {
            // Members' live images are not at one point between frames;
            // their group recovery points are.
            drill::DrillSource::Newest => crate::secondary::points::PointSelector::Newest,
            drill::DrillSource::Point(sel) => sel,
        };
        let names: Vec<String> = members.iter().map(|m| m.volume.clone()).collect();
        let at = self
            .secondaries
            .resolve_group_point(&group, &names, &sel)
            .map_err(DrillError::Point)?;
        let name = if req.name.is_empty() {
            drill::default_name(&group, now)
        } else {
            req.name
        };
        check_name("drill name", &name)?;
        let pairs: Vec<(String, String)> = names
            .iter()
            .map(|m| (m.clone(), format!("{name}-{m}")))
            .collect();
        for (_, n) in &pairs {
            check_name("member drill name", n)?;
        }
        let recs = self
            .drills
            .start_group(&self.secondaries, &name, &pairs, at, now)
            .await?;
        for rec in &recs {
            self.announce_start(rec);
        }
        Ok(recs.iter().filter_map(|r| self.drills.info(r)).collect())
    }

    /// Drills on this site, of secondary `volume` only when given.
    pub fn list_drills(&self, volume: Option<&str>) -> Vec<DrillInfo> {
        self.drills.list(volume)
    }
}
