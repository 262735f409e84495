//! One replication session of a volume: connect, initial sync if the
//! secondary is not consistent, one atomic catch-up batch of the change
//! set, then streaming — staged batches (async) or acknowledged direct
//! writes (sync) — until the link breaks. [`run`] restarts sessions with
//! back-off; every restart resumes from the persisted change set.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ember_common::Extent;
use ember_proto::repl::v1 as pb;
use ember_proto::repl::v1::ember_peer_client::EmberPeerClient;
use ember_proto::repl::v1::repl_frame::Kind;
use ember_tracking::{Tracker, TrackingError};
use ember_volume::Change;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::Channel;

use super::journal::{Entry, Marker, Op};
use super::link::{Mode, PeerLossPolicy, Phase, ReplicaLink, now_unix_ns};
use crate::PeerRegistry;
use crate::error::ReplError;
use crate::events::EventBus;
use crate::fencing::{self, Refusal};
use crate::frame;
use crate::hashes::{self, Hash};
use crate::service::Identity;
use crate::throttle::TokenBucket;
use crate::version::ProtocolVersion;

mod change_set;
mod hold;
mod initial_sync;
mod pieces;

/// Largest data frame of the journal stream. Each stream's gRPC codec
/// (tonic's encode and decode `BytesMut`) keeps a buffer as large as the
/// largest message it carried until the stream ends, outside the
/// replication memory budget: with 1 MiB frames, one 1 MiB write to each
/// of 1,000 volumes left both agents at 1.1 GiB RSS; 64 KiB frames keep
/// ~64 KiB per stream and side (benches/RESULTS.md "Scale"). Small frames
/// once made the stalled-peer memory test peak at ~265 MiB: that was the
/// splitting of large writes keeping whole allocations per piece, fixed
/// in [`pieces`].
const PIECE: u64 = 64 << 10;
/// Initial sync compares blake3 per block of this size.
const HASH_BLOCK: u64 = 64 << 10;
/// A commit or barrier not acknowledged within this long ends the session.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Sync mode: a barrier (durability and bitmap clearing) this often.
const BARRIER_EVERY: Duration = Duration::from_secs(1);
/// A frame batch leaves once it holds this much data or this many frames.
/// One [`PIECE`]: a batch message is no larger than a data frame, for the
/// same reason (the codec keeps its largest message per stream).
const OUTBOX_BYTES: u64 = PIECE;
const OUTBOX_FRAMES: usize = 1024;
/// Journal bytes shipped between checks for acknowledgements.
const JOURNAL_TAKE: u64 = 4 << 20;
/// Async streaming: a batch is committed at most this often, so the
/// secondary's fsyncs stay few whatever the write rate; this bounds the
/// extra lag batching adds.
const COMMIT_INTERVAL: Duration = Duration::from_millis(20);
/// Async streaming: the session collects journal entries this often.
const TICK: Duration = Duration::from_millis(5);
/// The persisted change set is rewritten at most this often in streaming.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// Bandwidth buckets of one peer link.
#[derive(Debug)]
pub(crate) struct LinkBuckets {
    pub(crate) all: TokenBucket,
    pub(crate) resync: TokenBucket,
}

/// What sessions share across the agent.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) registry: Arc<PeerRegistry>,
    pub(crate) identity: Identity,
    /// Fault injection for tests: corrupt this many frames after their
    /// checksum is computed (`EMBER_FAULT_CORRUPT_FRAMES`).
    pub(crate) corrupt_frames: AtomicU64,
    /// Fault injection for tests: hold this volume's group commits back
    /// (`EMBER_FAULT_DELAY_GROUP_COMMIT`).
    pub(crate) delay_group_commit: Option<(String, Duration)>,
    /// Replication events.
    pub(crate) events: EventBus,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error(transparent)]
    Link(#[from] ReplError),
    #[error("peer refused {call}: {status}")]
    Peer { call: &'static str, status: Status },
    #[error("the secondary refused a frame: {}", .0.message())]
    Rejected(Status),
    #[error("the replication stream ended: {0}")]
    Closed(String),
    #[error("no acknowledgement from the secondary within {0:?}")]
    AckTimeout(Duration),
    #[error("local {0}")]
    Local(String),
    #[error("stopped")]
    Stopped,
    #[error(
        "fenced: the peer holds this volume at generation {0} (it was promoted); this site refuses writes until demoted"
    )]
    Fenced(u64),
    #[error(
        "split-brain: both sites took writes as primary since they split; an admin must name the loser (emberctl replica demote VOL --discard-local)"
    )]
    SplitBrain,
}

fn tracking(e: TrackingError) -> SessionError {
    SessionError::Local(format!("change tracking: {e}"))
}

/// A cut in flight: a commit (async) or barrier (sync) not yet acknowledged.
#[derive(Debug)]
struct Cut {
    frame: u64,
    checkpoint: u64,
    journal_seq: u64,
    at_unix_ns: i64,
    sent: Instant,
}

/// Direct frames awaiting acknowledgement: (frame seq, journal seq).
type Pending = Arc<Mutex<VecDeque<(u64, u64)>>>;

struct Session<'a> {
    link: &'a Arc<ReplicaLink>,
    ctx: &'a Ctx,
    buckets: Arc<LinkBuckets>,
    tracker: Arc<Tracker>,
    consumer: String,
    client: EmberPeerClient<Channel>,
    /// Frames with the budget bytes each carries (see [`crate::budget`]).
    tx: mpsc::Sender<(pb::ReplFrame, u64)>,
    /// Budget bytes held for resync data read and not yet sent.
    unsent_held: u64,
    stream_account: crate::budget::StreamAccount,
    acks: watch::Receiver<u64>,
    ack_error: Arc<Mutex<Option<Status>>>,
    pending: Pending,
    next_seq: u64,
    /// The fault hook corrupts at most one frame per session, so each
    /// injected fault is one refusal and one retry.
    corrupted: bool,
    stop: &'a CancellationToken,
    /// The peer understands frame batches.
    batching: bool,
    /// Staged frames not sent yet (see [`Session::send`]).
    outbox: Vec<pb::ReplFrame>,
    outbox_bytes: u64,
    /// A consistency-group member: batches end only at group markers.
    grouped: bool,
}

/// Runs sessions for `link` until `stop` is cancelled.
pub(crate) async fn run(
    link: Arc<ReplicaLink>,
    ctx: Arc<Ctx>,
    buckets: Arc<LinkBuckets>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        link.stats.sessions.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = session(&link, &ctx, buckets.clone(), &stop).await;
        link.group_ready.store(false, Ordering::SeqCst);
        link.set_phase(Phase::Disconnected);
        link.journal().stop_capture();
        let cfg = link.config();
        if cfg.on_peer_loss == PeerLossPolicy::Degrade {
            let released = link.journal().release_waiters();
            if released > 0 {
                tracing::warn!(volume = %cfg.volume, released, "sync replica lost: writes continue degraded and are tracked for resync");
            }
        }
        let error = match result {
            Err(SessionError::Stopped) | Ok(()) => return,
            Err(e) => e,
        };
        if matches!(error, SessionError::Rejected(_)) {
            link.stats.frames_rejected.fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(volume = %cfg.volume, peer = %cfg.peer, error = %error, "replication session ended; retrying");
        *link.last_error.lock().expect("error lock poisoned") = error.to_string();
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(200);
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(
    link: &Arc<ReplicaLink>,
    ctx: &Ctx,
    buckets: Arc<LinkBuckets>,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    let cfg = link.config();
    let tracker = link
        .volume
        .tracker()
        .cloned()
        .ok_or_else(|| SessionError::Local("volume has no change tracking".into()))?;
    let (mut client, version, rates) = ctx.registry.stream_client(&cfg.peer).await?;
    if version < ProtocolVersion::REPLICATION {
        return Err(SessionError::Local(format!(
            "peer {} was paired at protocol version {version}; re-pair it (emberctl peer add) to replicate",
            cfg.peer
        )));
    }
    if cfg.group.is_some() && version < ProtocolVersion::GROUPS {
        return Err(SessionError::Local(format!(
            "peer {} was paired at protocol version {version}; re-pair it to replicate consistency groups",
            cfg.peer
        )));
    }
    buckets.all.set_rate(rates.max_bytes_per_sec);
    buckets.resync.set_rate(rates.resync_bytes_per_sec);
    let size = ember_nbd::Export::size(link.volume.as_ref());
    let opened = client
        .open_replica(pb::OpenReplicaRequest {
            volume: cfg.volume.clone(),
            size_bytes: size,
            mode: cfg.mode.as_str().into(),
            primary_site: ctx.identity.site.clone(),
            primary_backend_id: ctx.identity.backend_id.clone(),
            generation: cfg.generation,
            rpo_seconds: cfg.rpo_seconds,
            rpo_policy: cfg.rpo_policy.as_str().into(),
            group: cfg.group.clone().unwrap_or_default(),
            points_every_seconds: cfg.points.every_secs,
            keep_points: cfg.points.keep,
            keep_for_seconds: cfg.points.keep_for_secs,
        })
        .await
        .map_err(|status| match fencing::refusal(&status) {
            Some(Refusal::StaleGeneration { generation }) => {
                link.fence(generation);
                SessionError::Fenced(generation)
            }
            Some(Refusal::SplitBrain) => {
                link.peer_split_brain.store(true, Ordering::SeqCst);
                SessionError::SplitBrain
            }
            None => SessionError::Peer {
                call: "OpenReplica",
                status,
            },
        })?
        .into_inner();
    link.peer_split_brain.store(false, Ordering::SeqCst);
    let generation = adopt_peer_verdict(link, &opened)?;
    if !opened.divergent.is_empty() {
        let extents: Vec<Extent> = opened
            .divergent
            .iter()
            .map(|r| Extent {
                offset: r.offset,
                length: r.length,
            })
            .collect();
        let bytes: u64 = extents.iter().map(|e| e.length).sum();
        tracing::info!(volume = %cfg.volume, peer = %cfg.peer, bytes, "failback: adding the peer's divergent blocks to the change set");
        tracker
            .consumer_mark(&link.consumer(), &extents)
            .map_err(tracking)?;
    }
    let state = opened.state.unwrap_or_default();
    let (tx, rx) = mpsc::channel(16);
    let stream_account = crate::budget::stream_account();
    tx.send((
        pb::ReplFrame {
            kind: Some(Kind::Open(pb::StreamOpen {
                volume: cfg.volume.clone(),
                size_bytes: size,
                generation,
            })),
        },
        0,
    ))
    .await
    .map_err(|_| SessionError::Closed("before it opened".into()))?;
    let acks = client
        .replicate(crate::budget::release_on_pull(rx, stream_account.clone()))
        .await
        .map_err(|status| SessionError::Peer {
            call: "Replicate",
            status,
        })?
        .into_inner();
    let pending: Pending = Arc::default();
    let ack_error = Arc::new(Mutex::new(None));
    let (ack_tx, ack_rx) = watch::channel(0u64);
    tokio::spawn(read_acks(
        acks,
        ack_tx,
        ack_error.clone(),
        pending.clone(),
        link.clone(),
    ));
    tracing::info!(volume = %cfg.volume, peer = %cfg.peer, created = opened.created, consistent = state.consistent, "replication session open");
    link.last_error.lock().expect("error lock poisoned").clear();
    let mut s = Session {
        link,
        ctx,
        buckets,
        consumer: link.consumer(),
        tracker,
        client,
        tx,
        unsent_held: 0,
        stream_account,
        acks: ack_rx,
        ack_error,
        pending,
        next_seq: 0,
        corrupted: false,
        stop,
        batching: version >= ProtocolVersion::FAILOVER,
        outbox: Vec::new(),
        outbox_bytes: 0,
        grouped: super::group::takes_points(&cfg),
    };
    if !state.consistent || !cfg.synced {
        s.initial_sync(opened.created).await?;
    }
    s.stream().await
}

/// The peer accepted this site as primary. If it was a split-brain loser
/// that yielded at a higher generation, move past it; if this site was
/// fenced, the peer's acceptance lifts the fence. Returns the generation to
/// stream at.
fn adopt_peer_verdict(
    link: &ReplicaLink,
    opened: &pb::OpenReplicaResponse,
) -> Result<u64, SessionError> {
    let cfg = link.config();
    let generation = if opened.prior_generation > cfg.generation {
        opened.prior_generation + 1
    } else {
        cfg.generation
    };
    if generation != cfg.generation || cfg.fenced || cfg.split_brain {
        link.update(|c| {
            c.generation = generation;
            c.fenced = false;
            c.split_brain = false;
        })
        .map_err(SessionError::Local)?;
        link.refuse_writes(false);
        tracing::warn!(volume = %cfg.volume, peer = %cfg.peer, generation, "the peer accepted this site as primary: fence lifted");
    }
    Ok(generation)
}

/// Reads acknowledgements: releases sync-mode waiters directly (no hop
/// through the session task) and publishes the highest seq.
async fn read_acks(
    mut acks: tonic::Streaming<pb::ReplAck>,
    tx: watch::Sender<u64>,
    error: Arc<Mutex<Option<Status>>>,
    pending: Pending,
    link: Arc<ReplicaLink>,
) {
    let end = loop {
        match acks.message().await {
            Ok(Some(ack)) => {
                let released = {
                    let mut p = pending.lock().expect("pending lock poisoned");
                    let mut upto = None;
                    while p.front().is_some_and(|(f, _)| *f <= ack.seq) {
                        upto = p.pop_front().map(|(_, j)| j);
                    }
                    upto
                };
                if let Some(j) = released {
                    link.journal().release(j);
                }
                tx.send_replace(ack.seq);
            }
            Ok(None) => break Status::unavailable("the secondary closed the stream"),
            Err(status) => break status,
        }
    };
    *error.lock().expect("ack error lock poisoned") = Some(end);
}

/// The next piece of a resync scan.
struct Scan {
    extents: VecDeque<Extent>,
}

impl Scan {
    fn new(extents: Vec<Extent>) -> Self {
        Self {
            extents: extents.into(),
        }
    }

    fn next_piece(&mut self) -> Option<(u64, u64)> {
        let front = self.extents.front_mut()?;
        let len = front.length.min(PIECE);
        let piece = (front.offset, len);
        front.offset += len;
        front.length -= len;
        if front.length == 0 {
            self.extents.pop_front();
        }
        Some(piece)
    }

    fn is_done(&self) -> bool {
        self.extents.is_empty()
    }
}

impl Session<'_> {
    fn name(&self) -> String {
        self.link.config().volume
    }

    fn check(&self) -> Result<(), SessionError> {
        if self.stop.is_cancelled() {
            return Err(SessionError::Stopped);
        }
        match self
            .ack_error
            .lock()
            .expect("ack error lock poisoned")
            .take()
        {
            Some(status) if frame::is_rejection(&status) => Err(SessionError::Rejected(status)),
            Some(status) => Err(SessionError::Closed(status.to_string())),
            None => Ok(()),
        }
    }

    /// Sends a frame. Staged write and zero frames gather in the outbox
    /// (peers of protocol 3 and later) and leave as one batch message when
    /// it is full or before any other frame, so order is kept.
    async fn send(&mut self, kind: Kind) -> Result<(), SessionError> {
        let staged = match &kind {
            Kind::Write(w) => w.staged.then_some(w.data.len() as u64),
            Kind::Zero(z) => z.staged.then_some(0),
            _ => None,
        };
        if let (Some(bytes), true) = (staged, self.batching) {
            self.outbox.push(pb::ReplFrame { kind: Some(kind) });
            self.outbox_bytes += bytes;
            if self.outbox_bytes >= OUTBOX_BYTES || self.outbox.len() >= OUTBOX_FRAMES {
                self.flush_outbox().await?;
            }
            return Ok(());
        }
        self.flush_outbox().await?;
        self.send_now(kind).await
    }

    async fn flush_outbox(&mut self) -> Result<(), SessionError> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        self.outbox_bytes = 0;
        let frames = std::mem::take(&mut self.outbox);
        self.send_now(Kind::Batch(pb::FrameBatch { frames })).await
    }

    async fn send_now(&mut self, kind: Kind) -> Result<(), SessionError> {
        if self
            .tx
            .send((
                pb::ReplFrame { kind: Some(kind) },
                std::mem::take(&mut self.unsent_held),
            ))
            .await
            .is_ok()
        {
            return Ok(());
        }
        // The stream is gone; the secondary's reason arrives on the ack
        // side, usually a moment later.
        for _ in 0..20 {
            self.check()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(SessionError::Closed(
            "the secondary stopped reading the stream".into(),
        ))
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Applies the fault-injection hook: flips a byte after checksumming.
    fn maybe_corrupt(&mut self, data: &mut Bytes) {
        if data.is_empty() || self.corrupted {
            return;
        }
        let hit = self
            .ctx
            .corrupt_frames
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if hit {
            tracing::warn!("fault injection: corrupting a replication frame");
            *data = frame::flipped(data);
            self.corrupted = true;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_frame(
        &mut self,
        offset: u64,
        mut data: Bytes,
        staged: bool,
        unordered: bool,
        fua: bool,
        ack: bool,
        journal_seq: Option<u64>,
    ) -> Result<u64, SessionError> {
        let seq = self.seq();
        let crc = frame::write_crc(offset, &data);
        self.maybe_corrupt(&mut data);
        let len = data.len() as u64;
        self.buckets.all.take(len).await;
        if let Some(j) = journal_seq {
            self.pending
                .lock()
                .expect("pending lock poisoned")
                .push_back((seq, j));
        }
        self.send(Kind::Write(pb::BlockWrite {
            seq,
            offset,
            data,
            crc32: crc,
            staged,
            unordered,
            fua,
            ack,
        }))
        .await?;
        self.link
            .stats
            .bytes_shipped
            .fetch_add(len, Ordering::Relaxed);
        Ok(seq)
    }

    async fn zero_frame(
        &mut self,
        offset: u64,
        length: u64,
        staged: bool,
        unordered: bool,
        journal_seq: Option<u64>,
    ) -> Result<u64, SessionError> {
        let seq = self.seq();
        if let Some(j) = journal_seq {
            self.pending
                .lock()
                .expect("pending lock poisoned")
                .push_back((seq, j));
        }
        self.send(Kind::Zero(pb::BlockZero {
            seq,
            offset,
            length,
            crc32: frame::zero_crc(offset, length),
            staged,
            unordered,
            ack: journal_seq.is_some(),
        }))
        .await?;
        Ok(seq)
    }

    async fn barrier_frame(
        &mut self,
        at_unix_ns: i64,
        journal_seq: Option<u64>,
    ) -> Result<u64, SessionError> {
        let seq = self.seq();
        if let Some(j) = journal_seq {
            self.pending
                .lock()
                .expect("pending lock poisoned")
                .push_back((seq, j));
        }
        self.send(Kind::Barrier(pb::Barrier {
            seq,
            consistent_at_unix_ns: at_unix_ns,
        }))
        .await?;
        Ok(seq)
    }

    async fn wait_ack(&mut self, seq: u64) -> Result<(), SessionError> {
        let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
        loop {
            self.check()?;
            if *self.acks.borrow() >= seq {
                return Ok(());
            }
            tokio::select! {
                r = self.acks.changed() => {
                    if r.is_err() {
                        // The reader ended; its error is picked up by check().
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                () = tokio::time::sleep_until(deadline) => return Err(SessionError::AckTimeout(ACK_TIMEOUT)),
                () = self.stop.cancelled() => return Err(SessionError::Stopped),
            }
        }
    }

    async fn remote_hashes(&mut self, offset: u64, len: u64) -> Result<Vec<Hash>, SessionError> {
        let chunks = len.div_ceil(HASH_BLOCK) as u32;
        let resp = self
            .client
            .read_hashes(pb::ReadHashesRequest {
                volume: self.name(),
                offset,
                chunk_bytes: HASH_BLOCK,
                chunks,
            })
            .await
            .map_err(|status| SessionError::Peer {
                call: "ReadHashes",
                status,
            })?
            .into_inner();
        resp.blake3
            .into_iter()
            .map(|h| {
                <[u8; 32]>::try_from(h.as_slice())
                    .map_err(|_| SessionError::Closed("malformed hash from the secondary".into()))
            })
            .collect()
    }

    fn start_resync(&self, total: u64) {
        self.link
            .stats
            .resync_total_bytes
            .store(total, Ordering::Relaxed);
        self.link
            .stats
            .resync_remaining_bytes
            .store(total, Ordering::Relaxed);
        *self
            .link
            .resync_started
            .lock()
            .expect("resync lock poisoned") = Some(Instant::now());
    }

    fn resync_progress(&self, done: u64, sent: u64) {
        let s = &self.link.stats;
        let _ = s
            .resync_remaining_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some(r.saturating_sub(done))
            });
        s.resync_bytes_sent.fetch_add(sent, Ordering::Relaxed);
    }

    /// Ships one piece of a catch-up scan as a staged frame.
    async fn scan_piece(&mut self, offset: u64, len: u64) -> Result<(), SessionError> {
        let device = self.link.volume.device();
        // Only "is the whole piece a hole?" matters here; `SEEK_DATA` alone
        // answers it at a cost that does not grow with the data after the
        // piece (see `data_at_or_after`).
        let in_hole = device
            .data_at_or_after(offset)
            .is_none_or(|data| data >= offset + len);
        self.buckets.resync.take(len).await;
        // Data read from disk takes its memory from the budget until the
        // stream pulls it; a hole is not read and holds nothing.
        let data = if in_hole {
            None
        } else {
            self.hold_for_read(len).await?;
            Some(
                device
                    .read(offset, len as usize)
                    .await
                    .map_err(|e| SessionError::Local(format!("read: {e}")))?,
            )
        };
        match data {
            Some(d) if !hashes::is_zero(&d) => {
                self.write_frame(offset, d.into(), true, false, false, false, None)
                    .await?;
            }
            zeros => {
                // A zero frame carries no data: the read's bytes go back now.
                if zeros.is_some() {
                    self.give_back_unsent(len);
                }
                self.zero_frame(offset, len, true, false, None).await?;
            }
        }
        self.resync_progress(len, len);
        Ok(())
    }

    /// Ships resync data read from disk as unordered direct frames of at
    /// most [`PIECE`]; the data's budget bytes ride with the last frame.
    async fn write_unordered(&mut self, offset: u64, data: Bytes) -> Result<(), SessionError> {
        let held = if data.len() as u64 > PIECE {
            std::mem::take(&mut self.unsent_held)
        } else {
            0
        };
        for (within, piece, last) in pieces::Pieces::new(data, PIECE as usize) {
            if last {
                self.unsent_held += held;
            }
            self.write_frame(
                offset + within as u64,
                piece,
                false,
                true,
                false,
                false,
                None,
            )
            .await?;
        }
        Ok(())
    }

    /// Ships one journal entry: staged (async, catch-up) or direct with an
    /// acknowledgement (sync streaming).
    async fn ship(&mut self, e: Entry, staged: bool) -> Result<(), SessionError> {
        let ack = (!staged).then_some(e.seq);
        match e.op {
            Op::Change(Change::Write { offset, data }) => {
                // Frames stay small (see PIECE): a large client write
                // travels as pieces, acknowledged (sync) by its last.
                let split = data.len() as u64 > PIECE;
                // The write's budget bytes ride with its last piece: the
                // original buffer lives until that piece is encoded.
                let held = if split {
                    std::mem::take(&mut self.unsent_held)
                } else {
                    0
                };
                for (within, piece, last) in pieces::Pieces::new(data.into(), PIECE as usize) {
                    let at = offset + within as u64;
                    if !last {
                        self.write_frame(at, piece, staged, false, false, false, None)
                            .await?;
                        continue;
                    }
                    self.unsent_held += held;
                    if split && e.fua && !staged {
                        // FUA over several pieces: one barrier makes them all durable.
                        self.write_frame(at, piece, false, false, false, false, None)
                            .await?;
                        self.barrier_frame(0, ack).await?;
                    } else {
                        self.write_frame(at, piece, staged, false, e.fua && !staged, !staged, ack)
                            .await?;
                    }
                }
            }
            Op::Change(Change::Zero { offset, len }) => {
                self.zero_frame(offset, len, staged, false, ack).await?;
            }
            Op::Flush if staged => {}
            Op::Flush => {
                self.barrier_frame(0, ack).await?;
            }
            // Markers end a batch; the stream loop handles them.
            Op::Marker(_) => {}
        }
        Ok(())
    }

    /// Opens a cut: a checkpoint of the change set, then every journal
    /// entry recorded before it. Returns the entries and the journal seq.
    fn cut(&self) -> Result<(u64, Vec<Entry>, u64, i64), SessionError> {
        let cp = self
            .tracker
            .consumer_checkpoint(&self.consumer)
            .map_err(tracking)?;
        let at = now_unix_ns();
        let mut stream = self.stream_account.lock().expect("stream account poisoned");
        let mut j = self.link.journal();
        let entries = j.take_into(u64::MAX, &mut stream);
        Ok((cp.id, entries, j.last_seq(), at))
    }

    async fn finish_cut(&self, cut: &Cut, persist: bool) -> Result<(), SessionError> {
        match change_set::clear(&self.tracker, &self.consumer, cut.checkpoint, None, persist).await
        {
            // A newer checkpoint (a rescan) superseded this one: the bits
            // stay until a later cut clears them, which is safe.
            Ok(_) | Err(TrackingError::StaleCheckpoint { .. }) => {}
            Err(e) => return Err(tracking(e)),
        }
        self.link.journal().release(cut.journal_seq);
        self.link.set_consistent_at(cut.at_unix_ns);
        Ok(())
    }

    /// Ends the open batch at a consistency-group point: the commit names
    /// the point, and the cut clears the checkpoint the group took just
    /// before recording it. `ready` is false when the marker came while a
    /// commit was in flight or a resync scan was running (a race with an
    /// overflow): this member cannot hold that point, so the session ends
    /// and the secondary aborts it for every member.
    async fn group_commit(
        &mut self,
        journal_seq: u64,
        m: Marker,
        ready: bool,
    ) -> Result<Cut, SessionError> {
        if !ready {
            return Err(SessionError::Local(
                "a consistency-group point arrived during a resync; restarting".into(),
            ));
        }
        if let Some((volume, delay)) = &self.ctx.delay_group_commit
            && *volume == self.name()
        {
            // Everything before the commit is sent; only the commit waits.
            self.flush_outbox().await?;
            tokio::time::sleep(*delay).await;
        }
        let frame = self.seq();
        self.send(Kind::Commit(pb::BatchCommit {
            seq: frame,
            consistent_at_unix_ns: m.point,
            group_size: m.group_size,
        }))
        .await?;
        Ok(Cut {
            frame,
            checkpoint: m.checkpoint,
            journal_seq,
            at_unix_ns: m.point,
            sent: Instant::now(),
        })
    }

    /// Catch-up then streaming, until the link breaks or replication stops.
    async fn stream(&mut self) -> Result<(), SessionError> {
        self.link.set_phase(Phase::CatchUp);
        self.link.journal().start_capture();
        let cp = self
            .tracker
            .consumer_checkpoint(&self.consumer)
            .map_err(tracking)?;
        tracing::info!(volume = %self.name(), bytes = cp.dirty_bytes, "catch-up: resending the change set as one atomic batch");
        self.start_resync(cp.dirty_bytes);
        let mut scan = Scan::new(cp.extents);
        // The first commit marks the secondary consistent even when there
        // is nothing to send.
        let mut batch_open = true;
        let mut cut: Option<Cut> = None;
        let mut last_barrier = Instant::now();
        let mut last_cut = Instant::now() - COMMIT_INTERVAL;
        let mut last_persist = Instant::now();
        loop {
            self.check()?;
            let acked = *self.acks.borrow();
            if let Some(c) = cut.as_ref().filter(|c| acked >= c.frame) {
                let persist = last_persist.elapsed() >= PERSIST_EVERY;
                self.finish_cut(c, persist).await?;
                if persist {
                    last_persist = Instant::now();
                }
                cut = None;
                if self.link.phase() == Phase::CatchUp && scan.is_done() {
                    self.link.mark_synced().map_err(SessionError::Local)?;
                    self.link.set_phase(Phase::Streaming);
                    self.link
                        .stats
                        .resync_remaining_bytes
                        .store(0, Ordering::Relaxed);
                    tracing::info!(volume = %self.name(), mode = self.link.config().mode.as_str(), "secondary consistent and streaming");
                }
            }
            if let Some(c) = &cut
                && c.sent.elapsed() > ACK_TIMEOUT
            {
                return Err(SessionError::AckTimeout(ACK_TIMEOUT));
            }
            if self.link.journal().overflowed() {
                if self.grouped && self.link.journal().take_lost_marker() {
                    // The other members commit a point this member can no
                    // longer reach: end the session, so the secondary
                    // aborts the point and every member resyncs.
                    return Err(SessionError::Local(
                        "journal overflow dropped a consistency-group point; restarting".into(),
                    ));
                }
                self.link.group_ready.store(false, Ordering::SeqCst);
                self.link.journal().start_capture();
                let cp = self
                    .tracker
                    .consumer_checkpoint(&self.consumer)
                    .map_err(tracking)?;
                tracing::warn!(volume = %self.name(), bytes = cp.dirty_bytes, "journal overflow: rescanning the change set");
                self.link.stats.overflows.fetch_add(1, Ordering::Relaxed);
                self.start_resync(cp.dirty_bytes);
                scan = Scan::new(cp.extents);
                self.link.set_phase(Phase::CatchUp);
                batch_open = true;
            }
            // Sync (configured, or escalated by the RPO policy) ships direct
            // frames; an escalation waits until the open staged batch is
            // committed, so no direct frame overtakes staged ones.
            let want_direct =
                self.link.effective_mode() == Mode::Sync && self.link.phase() == Phase::Streaming;
            let direct = want_direct && !batch_open;
            let entries = {
                // The entries' budget bytes move to this stream, given
                // back as the transport pulls their frames.
                let mut stream = self.stream_account.lock().expect("stream account poisoned");
                self.link.journal().take_into(JOURNAL_TAKE, &mut stream)
            };
            let shipped = !entries.is_empty();
            let mut marked = false;
            for e in entries {
                self.unsent_held += e.budget_bytes();
                if let Op::Marker(m) = e.op {
                    // `take` ends at a marker: nothing follows it here.
                    cut = Some(
                        self.group_commit(e.seq, m, cut.is_none() && scan.is_done())
                            .await?,
                    );
                    marked = true;
                } else {
                    self.ship(e, !direct).await?;
                }
            }
            batch_open = if marked {
                false
            } else {
                batch_open || (shipped && !direct)
            };
            if let Some((offset, len)) = scan.next_piece() {
                self.scan_piece(offset, len).await?;
                continue;
            }
            let due = self.link.phase() != Phase::Streaming
                || last_cut.elapsed() >= COMMIT_INTERVAL
                || want_direct;
            if !self.grouped && !direct && batch_open && cut.is_none() && due {
                last_cut = Instant::now();
                let (checkpoint, entries, journal_seq, at) = self.cut()?;
                for e in entries {
                    self.unsent_held += e.budget_bytes();
                    self.ship(e, true).await?;
                }
                let frame = self.seq();
                self.send(Kind::Commit(pb::BatchCommit {
                    seq: frame,
                    consistent_at_unix_ns: at,
                    group_size: 0,
                }))
                .await?;
                cut = Some(Cut {
                    frame,
                    checkpoint,
                    journal_seq,
                    at_unix_ns: at,
                    sent: Instant::now(),
                });
                batch_open = false;
            }
            if direct && cut.is_none() && last_barrier.elapsed() >= BARRIER_EVERY {
                let (checkpoint, entries, journal_seq, at) = self.cut()?;
                for e in entries {
                    self.unsent_held += e.budget_bytes();
                    self.ship(e, false).await?;
                }
                let frame = self.barrier_frame(at, None).await?;
                cut = Some(Cut {
                    frame,
                    checkpoint,
                    journal_seq,
                    at_unix_ns: at,
                    sent: Instant::now(),
                });
                last_barrier = Instant::now();
            }
            if self.grouped {
                self.link
                    .group_batch_open
                    .store(batch_open, Ordering::SeqCst);
                self.link
                    .group_ready
                    .store(cut.is_none() && scan.is_done(), Ordering::SeqCst);
            }
            if shipped {
                continue;
            }
            tokio::select! {
                r = self.acks.changed() => {
                    if r.is_err() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                () = self.link.wake.notified() => {}
                () = tokio::time::sleep(if direct { Duration::from_millis(50) } else { TICK }) => {}
                () = self.stop.cancelled() => return Err(SessionError::Stopped),
            }
        }
    }
}
