//! One NBD connection in the transmission phase.
//!
//! ```text
//!   socket ─▶ reader (this task) ──spawn per request──▶ request task ─┐
//!                 │  permits: MAX requests + MAX bytes in flight       │
//!                 └──────────────── replies (mpsc) ◀──────────────────┘
//!                                        │
//!                                   writer task ─▶ socket
//! ```
//! Failure orderings: a read error or DISC stops the reader, which then
//! waits for every in-flight request (so no acknowledged-but-unwritten
//! data is abandoned), drops the reply sender and lets the writer flush
//! and exit. A writer error (client gone) makes later sends fail; request
//! tasks still finish their I/O, so nothing is left half-applied.
//! Replies may be out of order, but each is written whole by the writer.

use std::sync::Arc;

use ember_storage::StorageError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::codec::{self, REQUEST_HEADER_BYTES, Request, RequestHeader};
use crate::error::{NbdError, nbd_errno};
use crate::export::Export;
use crate::handshake::{BLOCK_MAX, Negotiated};
use crate::proto;
use crate::server::ServerLimits;

/// Replies queued for the writer before request tasks wait.
const REPLY_QUEUE: usize = 256;
/// Most extents returned in one block-status reply; clients ask again.
const MAX_STATUS_EXTENTS: usize = 2048;
/// Units of the in-flight byte budget semaphore.
const BUDGET_UNIT: usize = 4096;

/// A reply ready for the wire: header then (for reads) data.
#[derive(Debug)]
struct Outgoing {
    head: Vec<u8>,
    body: Vec<u8>,
}

/// Serves one negotiated connection until DISC, EOF, error or cancellation.
pub(crate) async fn transmit<S, E>(
    stream: S,
    session: Negotiated<E>,
    limits: &ServerLimits,
    conn: u64,
    cancel: CancellationToken,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    E: Export,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(16 * 1024, rd);
    let (tx, rx) = mpsc::channel::<Outgoing>(REPLY_QUEUE);
    let writer = tokio::spawn(write_replies(wr, rx));
    let requests = Arc::new(Semaphore::new(limits.max_inflight_requests));
    let budget_units =
        (limits.max_inflight_bytes / BUDGET_UNIT).max(BLOCK_MAX as usize / BUDGET_UNIT);
    let budget = Arc::new(Semaphore::new(budget_units));
    let session = Arc::new(session);
    session.export.attach(true);

    let result = read_requests(&mut rd, &session, &tx, &requests, &budget, conn, &cancel).await;

    // Wait for every in-flight request before closing.
    let _all = requests
        .acquire_many(limits.max_inflight_requests as u32)
        .await
        .expect("semaphore is never closed");
    drop(tx);
    let _ = writer.await;
    session.export.attach(false);
    result
}

async fn read_requests<R, E>(
    rd: &mut R,
    session: &Arc<Negotiated<E>>,
    tx: &mpsc::Sender<Outgoing>,
    requests: &Arc<Semaphore>,
    budget: &Arc<Semaphore>,
    conn: u64,
    cancel: &CancellationToken,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    E: Export,
{
    let export = &session.export;
    loop {
        let mut raw = [0u8; REQUEST_HEADER_BYTES];
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(()),
            read = rd.read_exact(&mut raw) => match read {
                Ok(_) => {}
                // fio and others drop the socket without DISC.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            },
        }
        let header = codec::decode_request_header(&raw)
            .map_err(|magic| NbdError::Protocol(format!("bad request magic {magic:#x}")))?;
        match codec::classify(
            header,
            export.size(),
            export.read_only(),
            BLOCK_MAX,
            session.structured,
        ) {
            Request::Invalid {
                header,
                errno,
                drain,
            } => {
                tracing::debug!(
                    conn,
                    command = header.command,
                    offset = header.offset,
                    length = header.length,
                    errno,
                    "NBD request refused"
                );
                skip(rd, drain).await?;
                let reply = error_reply(header, errno, "invalid request", session.structured);
                if tx.send(reply).await.is_err() {
                    return Ok(());
                }
            }
            Request::Valid(header) if header.command == proto::CMD_DISC => return Ok(()),
            Request::Valid(header) => {
                let request_permit = requests
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore is never closed");
                let units = (header.length as usize).div_ceil(BUDGET_UNIT).max(1) as u32;
                let needs_budget = matches!(header.command, proto::CMD_READ | proto::CMD_WRITE);
                let budget_permit = if needs_budget {
                    Some(
                        budget
                            .clone()
                            .acquire_many_owned(units)
                            .await
                            .expect("semaphore is never closed"),
                    )
                } else {
                    None
                };
                let payload = if header.command == proto::CMD_WRITE {
                    // A client vanishing mid-payload ends here: nothing was applied.
                    Some(read_payload(rd, header.length as usize).await?)
                } else {
                    None
                };
                let session = session.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let reply = execute(&session, header, payload, conn).await;
                    drop(budget_permit);
                    let _ = tx.send(reply).await;
                    drop(request_permit);
                });
            }
        }
    }
}

/// Reads a write's `len` payload bytes into a buffer that is not zeroed
/// first: `read_buf` fills only the spare capacity it is given and counts
/// what it filled, so no byte is exposed before the socket wrote it. A
/// zeroed 1 MiB buffer per write was 3 % of a replicating primary's CPU
/// (benches/RESULTS.md, issue 16 "Session 16").
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, len: usize) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        let want = (len - data.len()) as u64;
        // `take`: `with_capacity` may give more than `len`, and nothing
        // past the payload (the next request) may be read here.
        if (&mut *rd).take(want).read_buf(&mut data).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(data)
}

async fn skip<R: AsyncRead + Unpin>(rd: &mut R, mut len: u64) -> Result<(), NbdError> {
    let mut sink = [0u8; 16 * 1024];
    while len > 0 {
        let n = len.min(sink.len() as u64) as usize;
        rd.read_exact(&mut sink[..n]).await?;
        len -= n as u64;
    }
    Ok(())
}

fn error_reply(header: RequestHeader, errno: u32, message: &str, structured: bool) -> Outgoing {
    let uses_chunks =
        structured && matches!(header.command, proto::CMD_READ | proto::CMD_BLOCK_STATUS);
    Outgoing {
        head: if uses_chunks {
            codec::error_chunk(header.cookie, errno, message)
        } else {
            codec::simple_reply(header.cookie, errno)
        },
        body: Vec::new(),
    }
}

fn status_reply(
    header: RequestHeader,
    result: Result<(), StorageError>,
    structured: bool,
    conn: u64,
) -> Outgoing {
    match result {
        Ok(()) => Outgoing {
            head: codec::simple_reply(header.cookie, 0),
            body: Vec::new(),
        },
        Err(e) => {
            let errno = nbd_errno(&e);
            if matches!(errno, proto::ENOSPC | proto::EIO) {
                // The environment failed (disk full, I/O error): an operator must look.
                tracing::warn!(conn, command = header.command, offset = header.offset, errno, error = %e, "NBD request failed");
            } else {
                tracing::debug!(conn, command = header.command, offset = header.offset, errno, error = %e, "NBD request failed");
            }
            error_reply(header, errno, &e.to_string(), structured)
        }
    }
}

async fn execute<E: Export>(
    session: &Negotiated<E>,
    h: RequestHeader,
    payload: Option<Vec<u8>>,
    conn: u64,
) -> Outgoing {
    let export = &*session.export;
    let fua = h.flags & proto::CMD_FLAG_FUA != 0;
    let len = u64::from(h.length);
    match h.command {
        proto::CMD_READ => match export.read(h.offset, h.length).await {
            Ok(data) if session.structured => {
                let mut head = codec::chunk_header(
                    h.cookie,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_OFFSET_DATA,
                    8 + h.length,
                );
                head.extend_from_slice(&h.offset.to_be_bytes());
                Outgoing { head, body: data }
            }
            Ok(data) => Outgoing {
                head: codec::simple_reply(h.cookie, 0),
                body: data,
            },
            Err(e) => status_reply(h, Err(e), session.structured, conn),
        },
        proto::CMD_WRITE => {
            let data = payload.expect("WRITE carries its payload");
            status_reply(
                h,
                export.write(h.offset, data, fua).await,
                session.structured,
                conn,
            )
        }
        proto::CMD_FLUSH => status_reply(h, export.flush().await, session.structured, conn),
        proto::CMD_TRIM => {
            let mut result = export.trim(h.offset, len).await;
            if result.is_ok() && fua {
                result = export.flush().await;
            }
            status_reply(h, result, session.structured, conn)
        }
        proto::CMD_CACHE => status_reply(h, Ok(()), session.structured, conn),
        proto::CMD_WRITE_ZEROES => {
            let may_trim = h.flags & proto::CMD_FLAG_NO_HOLE == 0;
            let fast = h.flags & proto::CMD_FLAG_FAST_ZERO != 0;
            let result = export
                .write_zeroes(h.offset, len, may_trim, fast, fua)
                .await;
            status_reply(h, result, session.structured, conn)
        }
        proto::CMD_BLOCK_STATUS => block_status(session, h),
        other => unreachable!("classify() admits only known commands, got {other}"),
    }
}

fn block_status<E: Export>(session: &Negotiated<E>, h: RequestHeader) -> Outgoing {
    if session.contexts.is_empty() {
        return error_reply(h, proto::EINVAL, "no meta context negotiated", true);
    }
    let export = &*session.export;
    let len = u64::from(h.length);
    let one = h.flags & proto::CMD_FLAG_REQ_ONE != 0;
    let limit = if one { 1 } else { MAX_STATUS_EXTENTS };
    let mut head = Vec::new();
    for (i, &context) in session.contexts.iter().enumerate() {
        let descriptors: Vec<(u32, u32)> = match context {
            proto::CONTEXT_ID_ALLOCATION => export
                .allocation(h.offset, len)
                .into_iter()
                .filter(|r| r.length > 0)
                .take(limit)
                .map(|r| {
                    (
                        r.length as u32,
                        if r.hole {
                            proto::STATE_HOLE | proto::STATE_ZERO
                        } else {
                            0
                        },
                    )
                })
                .collect(),
            _ => export
                .dirty_runs(h.offset, len)
                .unwrap_or_default()
                .into_iter()
                .filter(|(l, _)| *l > 0)
                .take(limit)
                .map(|(l, dirty)| (l as u32, if dirty { proto::STATE_DIRTY } else { 0 }))
                .collect(),
        };
        let descriptors = if descriptors.is_empty() {
            vec![(h.length, 0)]
        } else {
            descriptors
        };
        let last = i + 1 == session.contexts.len();
        let flags = if last { proto::REPLY_FLAG_DONE } else { 0 };
        head.extend(codec::chunk_header(
            h.cookie,
            flags,
            proto::REPLY_TYPE_BLOCK_STATUS,
            4 + 8 * descriptors.len() as u32,
        ));
        head.extend_from_slice(&context.to_be_bytes());
        for (length, state) in descriptors {
            head.extend_from_slice(&length.to_be_bytes());
            head.extend_from_slice(&state.to_be_bytes());
        }
    }
    Outgoing {
        head,
        body: Vec::new(),
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(wr: W, mut rx: mpsc::Receiver<Outgoing>) {
    let mut wr = BufWriter::with_capacity(64 * 1024, wr);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Batch whatever is already queued into one flush.
        while let Some(reply) = next {
            if wr.write_all(&reply.head).await.is_err() || wr.write_all(&reply.body).await.is_err()
            {
                return; // client gone; request tasks' sends now fail quietly
            }
            next = rx.try_recv().ok();
        }
        if wr.flush().await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::read_payload;

    /// The payload arrives in 7-byte pieces; exactly its bytes are taken
    /// and what follows it (the next request) stays in the stream.
    #[tokio::test]
    async fn a_payload_is_read_whole_and_nothing_past_it() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let (mut tx, mut rx) = tokio::io::duplex(7);
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            tx.write_all(&sent).await.unwrap();
            tx.write_all(b"next").await.unwrap();
        });
        let got = read_payload(&mut rx, payload.len()).await.expect("payload");
        assert_eq!(got, payload);
        let mut next = [0u8; 4];
        rx.read_exact(&mut next).await.expect("the bytes after it");
        assert_eq!(&next, b"next");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_gone_mid_payload_is_an_unexpected_eof() {
        let short = [1u8; 100];
        let err = read_payload(&mut &short[..], 4096).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(
            read_payload(&mut &short[..], 0).await.unwrap(),
            Vec::<u8>::new()
        );
    }
}
