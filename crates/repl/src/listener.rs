//! The peer listener: TCP accept, TLS handshake (client certificate
//! required), then gRPC. We run the handshake ourselves rather than through
//! tonic so that every refusal — wrong CA, no certificate, plain TCP — gets
//! a log line naming the remote address and the reason.
//!
//! ```text
//!  accept loop ──spawn──▶ handshake task (timeout) ──ok──▶ mpsc ──▶ tonic server
//!                                 └──err──▶ warn!("peer TLS handshake refused")
//! ```

use std::sync::Arc;
use std::time::Duration;

use ember_proto::repl::v1::ember_peer_server::EmberPeerServer;

/// HTTP/2 flow-control window per stream.
pub(crate) const STREAM_WINDOW: u32 = 16 << 20;
/// HTTP/2 flow-control window per connection.
pub(crate) const CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest replication message (a 4 MiB frame plus headers).
pub(crate) const MAX_MESSAGE: usize = 8 << 20;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::service::PeerService;

/// A client has this long to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections queued for the gRPC server.
const ACCEPTED_QUEUE: usize = 64;

/// What an operator should make of a handshake failure.
fn refusal_hint(error: &str) -> &'static str {
    if error.contains("UnknownIssuer") || error.contains("invalid peer certificate") {
        "the client's certificate is not signed by this agent's peer CA"
    } else if error.contains("NoCertificatesPresented") || error.contains("no certificates") {
        "the client presented no certificate; peers must use mutual TLS"
    } else if error.contains("received fatal alert") {
        "the client rejected this agent's certificate: it trusts a different CA"
    } else if error.contains("InvalidContentType") || error.contains("corrupt message") {
        "the client does not speak TLS"
    } else {
        "TLS handshake failed"
    }
}

/// Serves the peer protocol on `listener` until `cancel` fires.
///
/// # Errors
/// The gRPC server's transport error.
pub async fn serve_peers(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: PeerService,
    cancel: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let acceptor = TlsAcceptor::from(tls);
    let (tx, rx) = mpsc::channel::<Result<TlsStream<TcpStream>, std::io::Error>>(ACCEPTED_QUEUE);
    let accept_cancel = cancel.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                () = accept_cancel.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "peer accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            // Detached: bounded by HANDSHAKE_TIMEOUT, then hands off or ends.
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        tracing::debug!(peer = %remote, "peer TLS session established");
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        let hint = refusal_hint(&e.to_string());
                        tracing::warn!(peer = %remote, error = %e, hint, "peer TLS handshake refused");
                    }
                    Err(_) => tracing::warn!(peer = %remote, "peer TLS handshake timed out"),
                }
            });
        }
    });
    tonic::transport::Server::builder()
        // Large HTTP/2 windows: replication streams are bulk transfers and
        // the default 64 KiB window caps them at a window per round trip.
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .add_service(
            EmberPeerServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            cancel.cancelled_owned(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::refusal_hint;

    #[test]
    fn hints_name_the_likely_cause() {
        assert!(refusal_hint("invalid peer certificate: UnknownIssuer").contains("not signed"));
        assert!(refusal_hint("received fatal alert: DecryptError").contains("different CA"));
        assert!(
            refusal_hint("received corrupt message of type InvalidContentType").contains("TLS")
        );
    }
}
