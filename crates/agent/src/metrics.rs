//! Prometheus `/metrics` (OpenMetrics text, encoded by prometheus-client)
//! on the listener named by `metrics` in the config or `--metrics`.
//!
//! Every scrape builds a fresh registry from the replication layer's
//! current status: the values live there (atomics the sessions update), so
//! nothing is double-counted and a deleted volume simply disappears.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use ember_volume::VolumeStore;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod operator;

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every volume's write-latency histogram, labelled by volume: the
/// histograms live in the volumes (observed on each write), this only
/// encodes them at scrape time.
#[derive(Debug)]
struct WriteLatency(Vec<(String, Histogram)>);

impl Collector for WriteLatency {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "ember_volume_write_latency_seconds",
            "Client write latency until acknowledged (sync replication included)",
            None,
            MetricType::Histogram,
        )?;
        for (volume, h) in &self.0 {
            let labels = [("volume", volume.as_str())];
            h.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Renders the metrics of every volume and replica.
pub(crate) fn render(
    store: &VolumeStore,
    replication: &ember_repl::Replication,
    peers: &operator::PeerProbes,
) -> String {
    let mut registry = <Registry>::default();
    registry.register_collector(Box::new(WriteLatency(
        store
            .list()
            .into_iter()
            .map(|(meta, v)| (meta.name.clone(), v.write_latency().clone()))
            .collect(),
    )));
    let lag_seconds = Family::<Labels, FloatGauge>::default();
    let lag_bytes = Family::<Labels, Gauge>::default();
    let rpo_target = Family::<Labels, Gauge>::default();
    let rpo_breached = Family::<Labels, Gauge>::default();
    let rpo_escalated = Family::<Labels, Gauge>::default();
    let breaches = Family::<Labels, Counter>::default();
    let shipped = Family::<Labels, Counter>::default();
    let resync_remaining = Family::<Labels, Gauge>::default();
    let resync_sent = Family::<Labels, Counter>::default();
    let generation = Family::<Labels, Gauge>::default();
    let state = Family::<Labels, Gauge>::default();
    // One series per target: a volume with several targets has one per peer.
    for s in replication.list_targets() {
        let l: Labels = vec![("volume", s.volume.clone()), ("peer", s.peer.clone())];
        lag_seconds.get_or_create(&l).set(s.lag_seconds);
        lag_bytes.get_or_create(&l).set(s.lag_bytes as i64);
        rpo_target.get_or_create(&l).set(s.rpo_seconds as i64);
        rpo_breached
            .get_or_create(&l)
            .set(i64::from(s.rpo_breached));
        rpo_escalated
            .get_or_create(&l)
            .set(i64::from(s.rpo_escalated));
        breaches.get_or_create(&l).inc_by(s.rpo_breaches);
        shipped.get_or_create(&l).inc_by(s.bytes_shipped);
        resync_remaining
            .get_or_create(&l)
            .set(s.resync_remaining_bytes as i64);
        resync_sent.get_or_create(&l).inc_by(s.resync_bytes_sent);
        generation.get_or_create(&l).set(s.generation as i64);
        let mut with_state = l.clone();
        with_state.push(("state", s.state.to_owned()));
        state.get_or_create(&with_state).set(1);
    }
    registry.register(
        "ember_replication_lag_seconds",
        "Age of the oldest write not yet durable on the secondary (0 in sync)",
        lag_seconds,
    );
    registry.register(
        "ember_replication_lag_bytes",
        "Bytes written since the oldest write not yet durable on the secondary",
        lag_bytes,
    );
    registry.register(
        "ember_replication_rpo_target_seconds",
        "RPO target (0: none)",
        rpo_target,
    );
    registry.register(
        "ember_replication_rpo_breached",
        "1 while the lag is above the RPO target",
        rpo_breached,
    );
    registry.register(
        "ember_replication_rpo_escalated",
        "1 while the escalate policy replicates synchronously",
        rpo_escalated,
    );
    registry.register(
        "ember_replication_rpo_breaches",
        "RPO breaches since the agent started",
        breaches,
    );
    registry.register(
        "ember_replication_shipped_bytes",
        "Data bytes shipped to the secondary since the agent started",
        shipped,
    );
    registry.register(
        "ember_replication_resync_remaining_bytes",
        "Bytes the running resync still has to examine",
        resync_remaining,
    );
    registry.register(
        "ember_replication_resync_sent_bytes",
        "Bytes resent by initial syncs and catch-ups since the agent started",
        resync_sent,
    );
    registry.register(
        "ember_replication_generation",
        "Fencing generation (bumped by every promotion)",
        generation,
    );
    registry.register(
        "ember_replication_state",
        "1 for the replica's current state (syncing, in-sync, lagging, degraded, disconnected, paused, fenced, split-brain)",
        state,
    );
    // DR drills per source volume (a volume without drills has no series).
    let drills = Family::<Labels, Gauge>::default();
    for d in replication.list_drills(None) {
        drills.get_or_create(&vec![("volume", d.volume)]).inc();
    }
    registry.register(
        "ember_drills_active",
        "DR drills running from this secondary volume",
        drills,
    );
    replication_memory(&mut registry, replication);
    operator::register(&mut registry, store, replication, peers);
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

/// The replication memory budget, its use, and the fall-backs it and the
/// journals' caps caused (issue 15).
fn replication_memory(registry: &mut Registry, replication: &ember_repl::Replication) {
    let usage = ember_repl::memory_budget().usage();
    let budget = Gauge::<i64>::default();
    budget.set(usage.budget_bytes as i64);
    registry.register(
        "ember_replication_memory_budget_bytes",
        "Memory budget shared by every replication journal, staging copy and stream buffer",
        budget,
    );
    let used = Gauge::<i64>::default();
    used.set(usage.used_bytes as i64);
    registry.register(
        "ember_replication_memory_used_bytes",
        "Replication memory held now (never above the budget)",
        used,
    );
    let refusals = Counter::<u64>::default();
    refusals.inc_by(usage.refusals);
    registry.register(
        "ember_replication_memory_refusals",
        "Requests the replication memory budget refused (a journal fell back to change-set catch-up, or a staged batch stayed on disk only)",
        refusals,
    );
    let overflows = Family::<Labels, Counter>::default();
    for s in replication.list_targets() {
        overflows
            .get_or_create(&vec![("volume", s.volume), ("peer", s.peer)])
            .inc_by(s.journal_overflows);
    }
    registry.register(
        "ember_replication_journal_overflows",
        "Journal overflows to change-set catch-up (the volume's journal cap or the memory budget)",
        overflows,
    );
}

async fn handle(
    store: Arc<VolumeStore>,
    replication: Arc<ember_repl::Replication>,
    peers: Arc<operator::PeerProbes>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = if req.method() == Method::GET && req.uri().path() == "/metrics" {
        Response::builder()
            .header("content-type", CONTENT_TYPE)
            .body(Full::new(Bytes::from(render(&store, &replication, &peers))))
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"only GET /metrics here\n")))
    };
    Ok(response.expect("static response parts are valid"))
}

/// Serves `/metrics` until `cancel`.
pub(crate) async fn serve(
    listener: TcpListener,
    store: Arc<VolumeStore>,
    replication: Arc<ember_repl::Replication>,
    cancel: CancellationToken,
) {
    // Detached, but it ends with `cancel` like this loop.
    let peers = Arc::new(operator::PeerProbes::default());
    tokio::spawn(peers.clone().run(replication.clone(), cancel.clone()));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    continue;
                }
            },
            () = cancel.cancelled() => return,
        };
        let (store, replication, peers) = (store.clone(), replication.clone(), peers.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                handle(store.clone(), replication.clone(), peers.clone(), req)
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}
