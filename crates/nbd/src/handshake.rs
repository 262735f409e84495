//! Fixed-newstyle option haggling, up to the start of transmission.
//!
//! Limits against hostile clients: at most [`MAX_OPTIONS`] options per
//! connection, option payloads above [`MAX_OPTION_BYTES`] get `ERR_TOO_BIG`
//! (drained up to [`MAX_DRAIN_BYTES`], beyond which we disconnect), unknown
//! client flags or a bad option magic end the connection.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::NbdError;
use crate::export::{Export, ExportRegistry};
use crate::proto;

/// Options accepted before we give up on a client.
pub(crate) const MAX_OPTIONS: usize = 256;
/// Largest option payload we parse (names are at most 4 KiB by the spec).
pub(crate) const MAX_OPTION_BYTES: u32 = 64 * 1024;
/// Largest oversized option payload we skip rather than disconnect.
const MAX_DRAIN_BYTES: u32 = 16 * 1024 * 1024;

/// Block sizes advertised: minimum, preferred, maximum payload.
pub(crate) const BLOCK_MIN: u32 = 512;
/// Preferred block size: the page and file-system block size.
pub(crate) const BLOCK_PREFERRED: u32 = 4096;
/// Largest READ/WRITE payload accepted.
pub(crate) const BLOCK_MAX: u32 = 32 * 1024 * 1024;

/// One parsed `NBD_OPT_INFO`/`NBD_OPT_GO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionRequest {
    /// Export name.
    pub name: String,
    /// Info types or meta-context queries, as sent.
    pub items: Vec<String>,
    /// Info types requested (INFO/GO only).
    pub info: Vec<u16>,
}

fn take_u32(data: &[u8], at: &mut usize) -> Option<u32> {
    let v = u32::from_be_bytes(data.get(*at..*at + 4)?.try_into().ok()?);
    *at += 4;
    Some(v)
}

fn take_str(data: &[u8], at: &mut usize, len: usize) -> Option<String> {
    let s = String::from_utf8(data.get(*at..at.checked_add(len)?)?.to_vec()).ok()?;
    *at += len;
    Some(s)
}

/// Parses an INFO/GO payload: name, then a count of u16 info requests.
/// `None` when malformed (lengths not adding up, bad UTF-8).
pub fn parse_info_request(data: &[u8]) -> Option<OptionRequest> {
    let mut at = 0;
    let name_len = take_u32(data, &mut at)? as usize;
    let name = take_str(data, &mut at, name_len)?;
    let count = u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?) as usize;
    at += 2;
    if data.len() != at + 2 * count {
        return None;
    }
    let info = data[at..]
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some(OptionRequest {
        name,
        items: Vec::new(),
        info,
    })
}

/// Parses a LIST/SET_META_CONTEXT payload: name, then counted queries.
pub fn parse_meta_request(data: &[u8]) -> Option<OptionRequest> {
    let mut at = 0;
    let name_len = take_u32(data, &mut at)? as usize;
    let name = take_str(data, &mut at, name_len)?;
    let count = take_u32(data, &mut at)? as usize;
    let mut items = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let len = take_u32(data, &mut at)? as usize;
        items.push(take_str(data, &mut at, len)?);
    }
    if at != data.len() {
        return None;
    }
    Some(OptionRequest {
        name,
        items,
        info: Vec::new(),
    })
}

/// The state transmission starts with.
#[derive(Debug)]
pub(crate) struct Negotiated<E> {
    pub(crate) export: Arc<E>,
    pub(crate) name: String,
    pub(crate) structured: bool,
    /// Selected meta contexts by id.
    pub(crate) contexts: Vec<u32>,
}

/// Contexts an export offers.
fn offered<E: Export>(export: &E) -> Vec<(u32, &'static str)> {
    let mut v = vec![(proto::CONTEXT_ID_ALLOCATION, proto::CONTEXT_BASE_ALLOCATION)];
    if export.dirty_runs(0, 0).is_some() {
        v.push((proto::CONTEXT_ID_DIRTY, proto::CONTEXT_DIRTY));
    }
    v
}

/// Whether `query` selects `context`: exact name, or (LIST only) a namespace
/// prefix such as `base:` or `qemu:dirty-bitmap:`.
fn matches(query: &str, context: &str, listing: bool) -> bool {
    query == context || (listing && query.ends_with(':') && context.starts_with(query))
}

struct Wire<'a, S> {
    stream: &'a mut S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<'_, S> {
    async fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut buf = Vec::with_capacity(20 + data.len());
        buf.extend_from_slice(&proto::REPLY_MAGIC.to_be_bytes());
        buf.extend_from_slice(&option.to_be_bytes());
        buf.extend_from_slice(&kind.to_be_bytes());
        buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
        buf.extend_from_slice(data);
        self.stream.write_all(&buf).await?;
        // A TLS stream holds records until flushed; on a socket it is free.
        self.stream.flush().await?;
        Ok(())
    }

    async fn error(&mut self, option: u32, kind: u32, message: &str) -> Result<(), NbdError> {
        self.reply(option, kind, message.as_bytes()).await
    }

    async fn drain(&mut self, mut len: u64) -> Result<(), NbdError> {
        let mut sink = [0u8; 8192];
        while len > 0 {
            let n = len.min(sink.len() as u64) as usize;
            self.stream.read_exact(&mut sink[..n]).await?;
            len -= n as u64;
        }
        Ok(())
    }
}

fn export_info(size: u64, flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// Transmission flags for an export.
pub(crate) fn transmission_flags<E: Export>(export: &E, structured: bool) -> u16 {
    let mut flags = proto::TF_HAS_FLAGS
        | proto::TF_SEND_FLUSH
        | proto::TF_SEND_FUA
        | proto::TF_SEND_TRIM
        | proto::TF_SEND_WRITE_ZEROES
        | proto::TF_SEND_FAST_ZERO
        | proto::TF_SEND_CACHE;
    if structured {
        flags |= proto::TF_SEND_DF;
    }
    if export.read_only() {
        flags |= proto::TF_READ_ONLY;
    }
    if export.multi_conn() {
        flags |= proto::TF_CAN_MULTI_CONN;
    }
    flags
}

/// Where in the TLS life of a connection the option loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A listener without TLS (the Unix socket, an insecure TCP listener):
    /// STARTTLS is refused, everything else served.
    Plain,
    /// FORCEDTLS before STARTTLS: nothing but STARTTLS and ABORT is served.
    BeforeTls,
    /// After the TLS handshake; `allowed` is the allow-list's verdict on
    /// the client certificate.
    Tls {
        /// Whether the client may reach exports.
        allowed: bool,
    },
}

/// What the option loop does with one option, before looking at its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Handle it normally.
    Serve,
    /// Skip its payload and answer with this error reply and message.
    Refuse(u32, &'static str),
    /// Hang up: `EXPORT_NAME` has no way to fail but closing.
    Close,
    /// STARTTLS accepted: ACK, then the TLS handshake.
    BeginTls,
}

/// The TLS rules of the option loop (`doc/proto.md` "TLS support",
/// FORCEDTLS). Pure, so the MUST rules are table-tested.
pub(crate) fn gate(phase: Phase, option: u32) -> Gate {
    const NOT_ALLOWED: &str = "client certificate is not on this server's allow-list";
    match (phase, option) {
        (_, proto::OPT_ABORT) => Gate::Serve,
        (Phase::Plain, proto::OPT_STARTTLS) => {
            Gate::Refuse(proto::REP_ERR_POLICY, "TLS is not enabled on this listener")
        }
        (Phase::Plain, _) => Gate::Serve,
        (Phase::BeforeTls, proto::OPT_STARTTLS) => Gate::BeginTls,
        (Phase::BeforeTls, proto::OPT_EXPORT_NAME) => Gate::Close,
        (Phase::BeforeTls, _) => Gate::Refuse(
            proto::REP_ERR_TLS_REQD,
            "this server requires TLS: send NBD_OPT_STARTTLS first",
        ),
        (Phase::Tls { .. }, proto::OPT_STARTTLS) => {
            Gate::Refuse(proto::REP_ERR_INVALID, "TLS is already negotiated")
        }
        (Phase::Tls { allowed: false }, proto::OPT_EXPORT_NAME) => Gate::Close,
        (
            Phase::Tls { allowed: false },
            proto::OPT_LIST
            | proto::OPT_INFO
            | proto::OPT_GO
            | proto::OPT_LIST_META_CONTEXT
            | proto::OPT_SET_META_CONTEXT,
        ) => Gate::Refuse(proto::REP_ERR_POLICY, NOT_ALLOWED),
        (Phase::Tls { .. }, _) => Gate::Serve,
    }
}

/// How an option loop ended.
#[derive(Debug)]
pub(crate) enum Step<E> {
    /// Transmission starts with this state.
    Session(Negotiated<E>),
    /// STARTTLS was acknowledged: run the TLS handshake on the raw stream
    /// (nothing of it has been read yet) and negotiate again over TLS.
    StartTls,
    /// The client ended the handshake (ABORT, EOF, unknown EXPORT_NAME):
    /// not an error.
    Closed,
}

/// Runs a whole plaintext handshake (greeting and options). `Ok(None)`
/// means the client ended it (ABORT, EOF after LIST): not an error.
pub(crate) async fn negotiate<S, R>(
    stream: &mut S,
    registry: &R,
) -> Result<Option<Negotiated<R::Export>>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: ExportRegistry,
{
    let no_zeroes = greet(stream).await?;
    match options(stream, registry, Phase::Plain, no_zeroes).await? {
        Step::Session(s) => Ok(Some(s)),
        Step::StartTls | Step::Closed => Ok(None),
    }
}

/// Sends the fixed-newstyle greeting and reads the client flags; returns
/// whether the client asked for `NO_ZEROES`.
pub(crate) async fn greet<S>(stream: &mut S) -> Result<bool, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).await?;
    stream.flush().await?;
    let client_flags = stream.read_u32().await?;
    if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(client_flags & proto::FLAG_C_NO_ZEROES != 0)
}

/// The option loop. Every call starts from a clean state (no structured
/// replies, no meta contexts): after STARTTLS the caller calls it again, so
/// nothing negotiated in plaintext survives into the TLS session.
pub(crate) async fn options<S, R>(
    stream: &mut S,
    registry: &R,
    phase: Phase,
    no_zeroes: bool,
) -> Result<Step<R::Export>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: ExportRegistry,
{
    let mut wire = Wire { stream };
    let mut structured = false;
    let mut contexts: Vec<u32> = Vec::new();

    for _ in 0..MAX_OPTIONS {
        let magic = match wire.stream.read_u64().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Step::Closed),
            Err(e) => return Err(e.into()),
        };
        if magic != proto::IHAVEOPT {
            return Err(NbdError::Protocol(format!("bad option magic {magic:#x}")));
        }
        let option = wire.stream.read_u32().await?;
        let len = wire.stream.read_u32().await?;
        match gate(phase, option) {
            Gate::Serve => {}
            Gate::Close => {
                tracing::info!(
                    option,
                    ?phase,
                    "NBD client sent EXPORT_NAME it may not use; closing"
                );
                return Ok(Step::Closed);
            }
            Gate::Refuse(kind, message) => {
                if len > MAX_DRAIN_BYTES {
                    return Err(NbdError::Protocol(format!(
                        "option {option} payload of {len} bytes"
                    )));
                }
                wire.drain(u64::from(len)).await?;
                wire.error(option, kind, message).await?;
                continue;
            }
            Gate::BeginTls => {
                if len != 0 {
                    if len > MAX_DRAIN_BYTES {
                        return Err(NbdError::Protocol(format!(
                            "option {option} payload of {len} bytes"
                        )));
                    }
                    wire.drain(u64::from(len)).await?;
                    wire.error(option, proto::REP_ERR_INVALID, "STARTTLS takes no payload")
                        .await?;
                    continue;
                }
                wire.reply(option, proto::REP_ACK, &[]).await?;
                return Ok(Step::StartTls);
            }
        }
        if len > MAX_OPTION_BYTES {
            if len > MAX_DRAIN_BYTES || option == proto::OPT_EXPORT_NAME {
                return Err(NbdError::Protocol(format!(
                    "option {option} payload of {len} bytes"
                )));
            }
            wire.drain(u64::from(len)).await?;
            wire.error(option, proto::REP_ERR_TOO_BIG, "option payload too large")
                .await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        wire.stream.read_exact(&mut data).await?;

        match option {
            proto::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = registry.lookup(&name) else {
                    // The spec leaves no way to report this but hanging up.
                    tracing::info!(export = %name, "NBD client asked for unknown export");
                    return Ok(Step::Closed);
                };
                let mut d = Vec::with_capacity(10 + 124);
                d.extend_from_slice(&export.size().to_be_bytes());
                d.extend_from_slice(&transmission_flags(&*export, structured).to_be_bytes());
                if !no_zeroes {
                    d.resize(d.len() + 124, 0);
                }
                wire.stream.write_all(&d).await?;
                wire.stream.flush().await?;
                return Ok(Step::Session(Negotiated {
                    export,
                    name,
                    structured,
                    contexts,
                }));
            }
            proto::OPT_ABORT => {
                let _ = wire.reply(option, proto::REP_ACK, &[]).await;
                return Ok(Step::Closed);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    wire.error(option, proto::REP_ERR_INVALID, "LIST takes no payload")
                        .await?;
                    continue;
                }
                for (name, _) in registry.list() {
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    wire.reply(option, proto::REP_SERVER, &d).await?;
                }
                wire.reply(option, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let Some(req) = parse_info_request(&data) else {
                    wire.error(option, proto::REP_ERR_INVALID, "malformed INFO/GO payload")
                        .await?;
                    continue;
                };
                let Some(export) = registry.lookup(&req.name) else {
                    wire.error(
                        option,
                        proto::REP_ERR_UNKNOWN,
                        &format!("export {:?} not found", req.name),
                    )
                    .await?;
                    continue;
                };
                wire.reply(
                    option,
                    proto::REP_INFO,
                    &export_info(export.size(), transmission_flags(&*export, structured)),
                )
                .await?;
                for info in &req.info {
                    match *info {
                        proto::INFO_NAME => {
                            let mut d = proto::INFO_NAME.to_be_bytes().to_vec();
                            d.extend_from_slice(req.name.as_bytes());
                            wire.reply(option, proto::REP_INFO, &d).await?;
                        }
                        proto::INFO_BLOCK_SIZE => {
                            let mut d = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                            for v in [BLOCK_MIN, BLOCK_PREFERRED, BLOCK_MAX] {
                                d.extend_from_slice(&v.to_be_bytes());
                            }
                            wire.reply(option, proto::REP_INFO, &d).await?;
                        }
                        _ => {} // unknown or description: silently not provided
                    }
                }
                wire.reply(option, proto::REP_ACK, &[]).await?;
                if option == proto::OPT_GO {
                    return Ok(Step::Session(Negotiated {
                        export,
                        name: req.name,
                        structured,
                        contexts,
                    }));
                }
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    wire.error(
                        option,
                        proto::REP_ERR_INVALID,
                        "STRUCTURED_REPLY takes no payload",
                    )
                    .await?;
                    continue;
                }
                structured = true;
                wire.reply(option, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let setting = option == proto::OPT_SET_META_CONTEXT;
                if setting && !structured {
                    wire.error(
                        option,
                        proto::REP_ERR_INVALID,
                        "negotiate STRUCTURED_REPLY first",
                    )
                    .await?;
                    continue;
                }
                let Some(req) = parse_meta_request(&data) else {
                    wire.error(
                        option,
                        proto::REP_ERR_INVALID,
                        "malformed meta context payload",
                    )
                    .await?;
                    continue;
                };
                let Some(export) = registry.lookup(&req.name) else {
                    wire.error(
                        option,
                        proto::REP_ERR_UNKNOWN,
                        &format!("export {:?} not found", req.name),
                    )
                    .await?;
                    continue;
                };
                let mut selected = Vec::new();
                for (id, context) in offered(&*export) {
                    let hit = if req.items.is_empty() {
                        !setting
                    } else {
                        req.items.iter().any(|q| matches(q, context, !setting))
                    };
                    if hit {
                        let mut d = id.to_be_bytes().to_vec();
                        d.extend_from_slice(context.as_bytes());
                        wire.reply(option, proto::REP_META_CONTEXT, &d).await?;
                        selected.push(id);
                    }
                }
                if setting {
                    contexts = selected;
                }
                wire.reply(option, proto::REP_ACK, &[]).await?;
            }
            _ => {
                wire.error(option, proto::REP_ERR_UNSUP, "option not supported")
                    .await?;
            }
        }
    }
    Err(NbdError::Protocol(format!(
        "more than {MAX_OPTIONS} options"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_go_with_block_size_request() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        let r = parse_info_request(&d).expect("valid");
        assert_eq!(
            (r.name.as_str(), r.info),
            ("vol", vec![proto::INFO_BLOCK_SIZE])
        );
        d.push(0);
        assert_eq!(
            parse_info_request(&d),
            None,
            "trailing garbage must be refused"
        );
    }

    #[test]
    fn meta_queries_match_exact_names_or_listing_namespaces() {
        assert!(matches(
            "base:allocation",
            proto::CONTEXT_BASE_ALLOCATION,
            false
        ));
        assert!(matches("base:", proto::CONTEXT_BASE_ALLOCATION, true));
        assert!(!matches("base:", proto::CONTEXT_BASE_ALLOCATION, false));
        assert!(matches("qemu:dirty-bitmap:", proto::CONTEXT_DIRTY, true));
    }

    /// The FORCEDTLS MUST rules, option by option and phase by phase.
    #[test]
    fn tls_gate_table() {
        use Gate::*;
        use Phase::*;
        const REQD: u32 = proto::REP_ERR_TLS_REQD;
        let allowed = Tls { allowed: true };
        let denied = Tls { allowed: false };
        for (phase, option, want) in [
            // Plaintext listener: everything but STARTTLS as before.
            (Plain, proto::OPT_GO, Serve),
            (Plain, proto::OPT_EXPORT_NAME, Serve),
            (
                Plain,
                proto::OPT_STARTTLS,
                Refuse(proto::REP_ERR_POLICY, ""),
            ),
            // Before TLS: only STARTTLS and ABORT; EXPORT_NAME cannot fail.
            (BeforeTls, proto::OPT_STARTTLS, BeginTls),
            (BeforeTls, proto::OPT_ABORT, Serve),
            (BeforeTls, proto::OPT_EXPORT_NAME, Close),
            (BeforeTls, proto::OPT_GO, Refuse(REQD, "")),
            (BeforeTls, proto::OPT_INFO, Refuse(REQD, "")),
            (BeforeTls, proto::OPT_LIST, Refuse(REQD, "")),
            (BeforeTls, proto::OPT_STRUCTURED_REPLY, Refuse(REQD, "")),
            (BeforeTls, proto::OPT_SET_META_CONTEXT, Refuse(REQD, "")),
            (BeforeTls, proto::OPT_EXTENDED_HEADERS, Refuse(REQD, "")),
            (BeforeTls, 0xdead, Refuse(REQD, "")),
            // After TLS: a second STARTTLS is invalid; the rest is served.
            (
                allowed,
                proto::OPT_STARTTLS,
                Refuse(proto::REP_ERR_INVALID, ""),
            ),
            (allowed, proto::OPT_GO, Serve),
            (allowed, proto::OPT_EXPORT_NAME, Serve),
            (allowed, proto::OPT_STRUCTURED_REPLY, Serve),
            // A certificate not on the allow-list reaches no export.
            (denied, proto::OPT_GO, Refuse(proto::REP_ERR_POLICY, "")),
            (denied, proto::OPT_INFO, Refuse(proto::REP_ERR_POLICY, "")),
            (denied, proto::OPT_LIST, Refuse(proto::REP_ERR_POLICY, "")),
            (
                denied,
                proto::OPT_LIST_META_CONTEXT,
                Refuse(proto::REP_ERR_POLICY, ""),
            ),
            (
                denied,
                proto::OPT_SET_META_CONTEXT,
                Refuse(proto::REP_ERR_POLICY, ""),
            ),
            (denied, proto::OPT_EXPORT_NAME, Close),
            (
                denied,
                proto::OPT_STARTTLS,
                Refuse(proto::REP_ERR_INVALID, ""),
            ),
            (denied, proto::OPT_ABORT, Serve),
        ] {
            let got = gate(phase, option);
            let same = match (got, want) {
                (Refuse(a, _), Refuse(b, _)) => a == b,
                (a, b) => a == b,
            };
            assert!(
                same,
                "{phase:?} option {option}: got {got:?}, want {want:?}"
            );
        }
    }

    proptest! {
        /// Fuzz: arbitrary option payloads never panic the parsers, and a
        /// parsed name never reaches past the payload.
        #[test]
        fn option_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Some(r) = parse_info_request(&data) { prop_assert!(r.name.len() <= data.len()); }
            if let Some(r) = parse_meta_request(&data) { prop_assert!(r.name.len() <= data.len()); }
        }
    }
}
