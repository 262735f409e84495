//! Listeners: accept loops for TCP and Unix sockets, a global connection
//! cap, handshake timeouts, and graceful drain on shutdown.

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
use crate::handshake::negotiate;

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
}

impl<R: ExportRegistry> NbdServer<R> {
    /// A server; `cancel` stops accept loops and asks connections to stop
    /// reading new requests (in-flight ones complete).
    pub fn new(registry: Arc<R>, limits: ServerLimits, cancel: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            registry,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            next_conn: AtomicU64::new(1),
            tasks: TaskTracker::new(),
            cancel,
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
                    self.spawn_connection(stream, peer.to_string());
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
                Ok((stream, _)) => self.spawn_connection(stream, "unix".to_owned()),
                Err(e) => accept_error(e).await,
            }
        }
    }

    fn spawn_connection<S>(self: &Arc<Self>, mut stream: S, peer: String)
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
            let negotiated = tokio::time::timeout(this.limits.handshake_timeout, negotiate(&mut stream, &*this.registry))
                .await
                .unwrap_or(Err(NbdError::HandshakeTimeout));
            let result = match negotiated {
                Ok(Some(session)) => {
                    tracing::debug!(conn, %peer, export = %session.name, structured = session.structured, "NBD client attached");
                    transmit(stream, session, &this.limits, conn, this.cancel.child_token()).await
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => tracing::debug!(conn, %peer, "NBD connection closed"),
                Err(NbdError::Io(e)) => tracing::debug!(conn, %peer, error = %e, "NBD connection dropped"),
                Err(e) => tracing::warn!(conn, %peer, error = %e, "NBD connection closed on bad input"),
            }
        });
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
