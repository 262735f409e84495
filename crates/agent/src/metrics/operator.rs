//! Series the operator kit's alerts and dashboard need beyond the
//! per-replica basics of `metrics.rs`: the secondary's last consistent
//! point, recovery points (held, newest, failed) and per-peer round trips.
//! Values still live in the replication layer; this only reads them at
//! scrape time, except the peers' round trips, which need a network probe
//! and so are measured in the background ([`PeerProbes`]) and cached.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_repl::{PointsReport, Replication, TargetCapability};
use ember_volume::VolumeStore;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Time between two probes of every paired peer. Each probe is a
/// connection, a Hello and five small pings per peer: cheap, but not
/// something to do on every scrape (an unreachable peer would hold the
/// scrape for the connect timeout). Ten seconds is finer than the usual
/// 15-60 s scrape interval, so every scrape sees a fresh round trip.
const PEER_PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// One peer at the last probe.
#[derive(Debug, Clone, PartialEq)]
struct PeerSample {
    site: String,
    /// The probe got through (Hello and pings answered).
    connected: bool,
    /// Median ping round trip, seconds (meaningless when not connected).
    rtt_seconds: f64,
}

impl PeerSample {
    fn from_target(t: &TargetCapability) -> Self {
        Self {
            site: t.site.clone(),
            connected: t.state == "connected",
            rtt_seconds: t.rtt_us as f64 / 1e6,
        }
    }
}

/// The latest probe of every paired peer, refreshed by [`PeerProbes::run`].
#[derive(Debug, Default)]
pub(crate) struct PeerProbes(Mutex<Vec<PeerSample>>);

impl PeerProbes {
    /// Probes every paired peer now and then every
    /// [`PEER_PROBE_INTERVAL`] until `cancel`.
    pub(super) async fn run(
        self: Arc<Self>,
        replication: Arc<Replication>,
        cancel: CancellationToken,
    ) {
        loop {
            let probed = tokio::select! {
                t = replication.targets() => t,
                () = cancel.cancelled() => return,
            };
            *self.0.lock().expect("peer probes lock poisoned") =
                probed.iter().map(PeerSample::from_target).collect();
            tokio::select! {
                () = tokio::time::sleep(PEER_PROBE_INTERVAL) => {}
                () = cancel.cancelled() => return,
            }
        }
    }

    fn snapshot(&self) -> Vec<PeerSample> {
        self.0.lock().expect("peer probes lock poisoned").clone()
    }
}

/// The consistent point as a Prometheus timestamp; `None` while the
/// secondary has none yet (initial sync): no series beats a 1970 one,
/// which every "older than" rule would take for a 56-year-old point.
fn consistent_timestamp_seconds(unix_ns: i64) -> Option<f64> {
    (unix_ns > 0).then(|| unix_ns as f64 / 1e9)
}

/// Points held and the newest one's time (seconds; `None` without points).
fn points_summary(report: &PointsReport) -> (i64, Option<f64>) {
    let newest = report
        .points
        .iter()
        .map(|p| p.at_unix_ns)
        .max()
        .and_then(consistent_timestamp_seconds);
    (report.points.len() as i64, newest)
}

/// The round-trip series of a probe: every peer gets its `connected` 0/1
/// series; only a peer that answered has a round trip (a last value kept
/// from before a cut would draw a healthy line through an outage).
fn peer_series(samples: &[PeerSample]) -> Vec<(String, bool, Option<f64>)> {
    samples
        .iter()
        .map(|p| {
            (
                p.site.clone(),
                p.connected,
                p.connected.then_some(p.rtt_seconds),
            )
        })
        .collect()
}

/// Registers this module's series for one scrape.
pub(super) fn register(
    registry: &mut Registry,
    store: &VolumeStore,
    replication: &Replication,
    peers: &PeerProbes,
) {
    let consistent = Family::<Labels, FloatGauge>::default();
    let points_held = Family::<Labels, Gauge>::default();
    let newest_point = Family::<Labels, FloatGauge>::default();
    let points_failed = Family::<Labels, Counter>::default();
    let failures = replication.events().points_failed();
    // Primaries: the point the secondary last confirmed (kept while the
    // link is down, which is when it ages).
    for s in replication.list_targets() {
        if let Some(ts) = consistent_timestamp_seconds(s.last_consistent_at_unix_ns) {
            consistent
                .get_or_create(&vec![
                    ("volume", s.volume.clone()),
                    ("peer", s.peer.clone()),
                ])
                .set(ts);
        }
    }
    // Secondaries (`list()` holds only primaries): the image's own point,
    // while it is consistent (mid catch-up it is not an image of any time).
    for (meta, _) in store.list() {
        let volume = meta.name.clone();
        let Some(sec) = replication.secondaries().status(&volume) else {
            continue;
        };
        if sec.consistent
            && let Some(ts) = consistent_timestamp_seconds(sec.consistent_at_unix_ns)
        {
            consistent
                .get_or_create(&vec![
                    ("volume", volume.clone()),
                    ("peer", sec.primary_site),
                ])
                .set(ts);
        }
        let l: Labels = vec![("volume", volume.clone())];
        // Every secondary has the counter from the start (at 0), so the
        // first failure is an increase that `increase()` can see.
        points_failed
            .get_or_create(&l)
            .inc_by(failures.get(&volume).copied().unwrap_or(0));
        if let Ok(report) = replication.list_points(&volume) {
            let (held, newest) = points_summary(&report);
            points_held.get_or_create(&l).set(held);
            if let Some(ts) = newest {
                newest_point.get_or_create(&l).set(ts);
            }
        }
    }
    // Failures of volumes no longer replicated here still count until the
    // agent restarts (a counter must not go back).
    for (volume, n) in &failures {
        let l: Labels = vec![("volume", volume.clone())];
        if points_failed.get(&l).is_none() {
            points_failed.get_or_create(&l).inc_by(*n);
        }
    }
    registry.register(
        "ember_replication_last_consistent_timestamp_seconds",
        "Time (primary clock, unix seconds) of the secondary's newest crash-consistent image; absent until the first one",
        consistent,
    );
    registry.register(
        "ember_recovery_points",
        "Recovery points held by this secondary volume",
        points_held,
    );
    registry.register(
        "ember_recovery_point_newest_timestamp_seconds",
        "Time (primary clock, unix seconds) of the newest recovery point of this secondary volume",
        newest_point,
    );
    registry.register(
        "ember_recovery_points_failed",
        "Recovery points that could not be taken since the agent started",
        points_failed,
    );

    let rtt = Family::<Labels, FloatGauge>::default();
    let connected = Family::<Labels, Gauge>::default();
    for (peer, up, rtt_seconds) in peer_series(&peers.snapshot()) {
        let l: Labels = vec![("peer", peer)];
        connected.get_or_create(&l).set(i64::from(up));
        if let Some(r) = rtt_seconds {
            rtt.get_or_create(&l).set(r);
        }
    }
    registry.register(
        "ember_peer_rtt_seconds",
        "Median ping round trip to the paired peer at the last probe (absent while unreachable)",
        rtt,
    );
    registry.register(
        "ember_peer_connected",
        "1 when the paired peer answered the last probe (every 10 s), 0 when not",
        connected,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_repl::PointListing;

    #[test]
    fn consistent_point_is_absent_until_there_is_one() {
        for (ns, want) in [
            (0, None),
            (-5, None),
            (1, Some(1e-9)),
            (1_700_000_000_500_000_000, Some(1_700_000_000.5)),
        ] {
            assert_eq!(consistent_timestamp_seconds(ns), want, "{ns}");
        }
    }

    #[test]
    fn points_summary_counts_and_takes_the_newest() {
        let point = |at| PointListing {
            name: format!("p{at}"),
            at_unix_ns: at,
            kind: "scheduled",
            group: String::new(),
            pinned_bytes: 0,
            peer: String::new(),
        };
        let report = |ats: &[i64]| PointsReport {
            points: ats.iter().copied().map(point).collect(),
            every_secs: 60,
            keep: 0,
            keep_for_secs: 0,
        };
        for (ats, want) in [
            (&[][..], (0, None)),
            (&[3_000_000_000][..], (1, Some(3.0))),
            (
                &[2_000_000_000, 5_000_000_000, 4_000_000_000][..],
                (3, Some(5.0)),
            ),
        ] {
            assert_eq!(points_summary(&report(ats)), want, "{ats:?}");
        }
    }

    #[test]
    fn only_a_peer_that_answered_has_a_round_trip() {
        let sample = |site: &str, connected, rtt_seconds| PeerSample {
            site: site.to_owned(),
            connected,
            rtt_seconds,
        };
        assert_eq!(
            peer_series(&[sample("b", true, 0.002), sample("c", false, 0.0)]),
            vec![
                ("b".to_owned(), true, Some(0.002)),
                ("c".to_owned(), false, None),
            ]
        );
        assert_eq!(peer_series(&[]), vec![]);
    }
}
