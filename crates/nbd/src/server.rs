//! Listeners: accept loops for TCP and Unix sockets, a global connection
//! cap, handshake timeouts, and graceful drain on shutdown. With [`NbdTls`]
//! the TCP listener runs FORCEDTLS; the Unix socket stays plaintext (it is
//! local and guarded by file permissions).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::transmit;
use crate::error::NbdError;
use crate::export::ExportRegistry;
use crate::handshake::{Phase, Step, greet, negotiate, options};
use crate::tls::NbdTls;

/// Resource limits of an NBD server.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Connections served at once; beyond it new ones are closed at accept.
    pub max_connections: usize,
    /// Time a client gets to finish the handshake.
    pub handshake_timeout: Duration,
    /// Requests in flight per connection.
    pub max_inflight_requests: usize,
    /// Payload bytes in flight per connection (bounded memory per client).
    pub max_inflight_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(30),
            // QEMU and fio use up to 32–64; 128 leaves headroom for nbdcopy.
            max_inflight_requests: 128,
            // Two maximum-size requests plus change: 64 MiB per client.
            max_inflight_bytes: 64 * 1024 * 1024,
        }
    }
}

/// An NBD server over a registry of exports.
#[derive(Debug)]
pub struct NbdServer<R> {
    registry: Arc<R>,
    limits: ServerLimits,
    slots: Arc<Semaphore>,
    next_conn: AtomicU64,
    tasks: TaskTracker,
    cancel: CancellationToken,
    tls: Option<Arc<NbdTls>>,
}

impl<R: ExportRegistry> NbdServer<R> {
    /// A server; `cancel` stops accept loops and asks connections to stop
    /// reading new requests (in-flight ones complete).
    pub fn new(registry: Arc<R>, limits: ServerLimits, cancel: CancellationToken) -> Arc<Self> {
        Self::with_tls(registry, limits, None, cancel)
    }

    /// Like [`NbdServer::new`]; with `tls`, TCP clients must negotiate TLS
    /// (`NBD_OPT_STARTTLS`) and present a certificate the allow-list admits.
    pub fn with_tls(
        registry: Arc<R>,
        limits: ServerLimits,
        tls: Option<NbdTls>,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            next_conn: AtomicU64::new(1),
            tasks: TaskTracker::new(),
            cancel,
            tls: tls.map(Arc::new),
        })
    }

    /// Accepts TCP clients until cancelled.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                () = self.cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let tls = self.tls.clone();
                    self.spawn_connection(stream, peer.to_string(), tls);
                }
                Err(e) => accept_error(e).await,
            }
        }
    }

    /// Accepts Unix-socket clients until cancelled.
    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) {
        loop {
            let accepted = tokio::select! {
                () = self.cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => self.spawn_connection(stream, "unix".to_owned(), None),
                Err(e) => accept_error(e).await,
            }
        }
    }

    fn spawn_connection<S>(self: &Arc<Self>, stream: S, peer: String, tls: Option<Arc<NbdTls>>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!(conn, %peer, max = self.limits.max_connections, "NBD connection limit reached; closing new connection");
            return;
        };
        let this = self.clone();
        self.tasks.spawn(async move {
            let _slot = slot;
            let result = match tls {
                None => this.serve_plain(stream, conn, &peer).await,
                Some(tls) => this.serve_tls(stream, &tls, conn, &peer).await,
            };
            match result {
                Ok(()) => tracing::debug!(conn, %peer, "NBD connection closed"),
                Err(NbdError::Io(e)) => {
                    tracing::debug!(conn, %peer, error = %e, "NBD connection dropped")
                }
                Err(e) => {
                    tracing::warn!(conn, %peer, error = %e, "NBD connection closed on bad input")
                }
            }
        });
    }

    async fn serve_plain<S>(&self, mut stream: S, conn: u64, peer: &str) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let negotiated = tokio::time::timeout(
            self.limits.handshake_timeout,
            negotiate(&mut stream, &*self.registry),
        )
        .await
        .unwrap_or(Err(NbdError::HandshakeTimeout))?;
        let Some(session) = negotiated else {
            return Ok(());
        };
        tracing::debug!(conn, %peer, export = %session.name, structured = session.structured, "NBD client attached");
        transmit(
            stream,
            session,
            &self.limits,
            conn,
            self.cancel.child_token(),
        )
        .await
    }

    /// FORCEDTLS: plaintext options until STARTTLS (all refused), the TLS
    /// handshake on the same socket, then a fresh option loop over TLS.
    /// Transmission runs over the TLS stream; the plaintext path above is
    /// untouched (no boxing, no extra layer).
    async fn serve_tls<S>(
        &self,
        mut stream: S,
        tls: &NbdTls,
        conn: u64,
        peer: &str,
    ) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let handshake = async {
            let no_zeroes = greet(&mut stream).await?;
            match options(&mut stream, &*self.registry, Phase::BeforeTls, no_zeroes).await? {
                Step::StartTls => {}
                Step::Closed => return Ok(None),
                Step::Session(_) => {
                    return Err(NbdError::Protocol(
                        "export reached before TLS (bug in the TLS gate)".into(),
                    ));
                }
            }
            let (mut secure, client) = match tls.accept(stream).await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Wrong CA, no certificate, expired, protocol mismatch:
                    // an operator wants to see who knocked and why.
                    tracing::info!(conn, %peer, error = %e, "NBD TLS handshake refused");
                    return Ok(None);
                }
            };
            if !client.allowed {
                tracing::warn!(conn, %peer, names = ?client.names, "NBD client certificate not on the allow-list; refusing exports");
            }
            let phase = Phase::Tls {
                allowed: client.allowed,
            };
            match options(&mut secure, &*self.registry, phase, no_zeroes).await? {
                Step::Session(session) => Ok(Some((secure, session, client))),
                Step::StartTls | Step::Closed => Ok(None),
            }
        };
        let negotiated = tokio::time::timeout(self.limits.handshake_timeout, handshake)
            .await
            .unwrap_or(Err(NbdError::HandshakeTimeout))?;
        let Some((secure, session, client)) = negotiated else {
            return Ok(());
        };
        tracing::debug!(conn, %peer, export = %session.name, client = ?client.names, structured = session.structured, "NBD TLS client attached");
        transmit(
            secure,
            session,
            &self.limits,
            conn,
            self.cancel.child_token(),
        )
        .await
    }

    /// Waits until every connection has finished (call after cancelling).
    pub async fn drained(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Connections currently open.
    pub fn connections(&self) -> usize {
        self.limits.max_connections - self.slots.available_permits()
    }
}

async fn accept_error(e: std::io::Error) {
    // EMFILE and friends: back off instead of spinning.
    tracing::warn!(error = %e, "NBD accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
