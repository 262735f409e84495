//! Entry points shared by the cargo-fuzz targets (`crates/nbd/fuzz`) and the
//! stable corpus-replay test, so CI re-checks every saved fuzz input without
//! a nightly toolchain. Not part of the server's API.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use ember_storage::{AllocationRun, StorageError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::codec::{REQUEST_HEADER_BYTES, classify, decode_request_header};
use crate::export::{BlockRun, Export, ExportRegistry};
use crate::handshake::{
    Phase, Step, greet, negotiate, options, parse_info_request, parse_meta_request,
};
use crate::proto;

/// An in-memory export: enough for the handshake to find something.
#[derive(Debug)]
pub struct MemExport {
    data: Mutex<Vec<u8>>,
}

impl MemExport {
    /// A zeroed export of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self {
            data: Mutex::new(vec![0; size]),
        }
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.lock().expect("mem export lock").len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn multi_conn(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, StorageError> {
        let d = self.data.lock().expect("mem export lock");
        Ok(d[offset as usize..offset as usize + len as usize].to_vec())
    }
    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> Result<(), StorageError> {
        let mut d = self.data.lock().expect("mem export lock");
        d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _: bool,
        _: bool,
        _: bool,
    ) -> Result<(), StorageError> {
        let mut d = self.data.lock().expect("mem export lock");
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    async fn trim(&self, _: u64, _: u64) -> Result<(), StorageError> {
        Ok(())
    }
    fn allocation(&self, _offset: u64, len: u64) -> Vec<AllocationRun> {
        vec![AllocationRun {
            length: len,
            hole: false,
        }]
    }
    fn dirty_runs(&self, _offset: u64, len: u64) -> Option<Vec<BlockRun>> {
        Some(vec![(len, false)])
    }
}

/// A registry with one export called `vol`.
#[derive(Debug)]
pub struct MemRegistry(pub Arc<MemExport>);

impl ExportRegistry for MemRegistry {
    type Export = MemExport;
    fn lookup(&self, name: &str) -> Option<Arc<MemExport>> {
        (name == "vol").then(|| self.0.clone())
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![("vol".into(), String::new())]
    }
}

/// A stream that yields `input` then EOF, and swallows everything written
/// (keeping the first [`KEPT_OUTPUT`] bytes for checks).
#[derive(Debug)]
struct Scripted<'a> {
    input: &'a [u8],
    written: usize,
    kept: Vec<u8>,
}

/// Output bytes a [`Scripted`] stream keeps for inspection.
const KEPT_OUTPUT: usize = 1 << 20;

impl AsyncRead for Scripted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.input.len().min(buf.remaining());
        buf.put_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.written += buf.len();
        let room = KEPT_OUTPUT.saturating_sub(self.kept.len()).min(buf.len());
        self.kept.extend_from_slice(&buf[..room]);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Runs the server side of the handshake against arbitrary client bytes.
/// Must never panic; any outcome (session, refusal, protocol error) is fine.
pub fn handshake(input: &[u8]) {
    let registry = MemRegistry(Arc::new(MemExport::new(1 << 20)));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("fuzz runtime");
    let mut stream = Scripted {
        input,
        written: 0,
        kept: Vec::new(),
    };
    let _ = runtime.block_on(negotiate(&mut stream, &registry));
    // Bounded output: a hostile client cannot make us write without limit.
    assert!(
        stream.written <= 64 * 1024 + input.len() * 64,
        "wrote {} bytes for {} input bytes",
        stream.written,
        input.len()
    );
}

/// Runs the FORCEDTLS option loop (before STARTTLS) against arbitrary
/// client bytes. Must never panic, never reach an export, and answer
/// nothing but `ERR_TLS_REQD` — except an `ACK` to ABORT or STARTTLS
/// (which ends the loop) and `ERR_INVALID` to a STARTTLS with a payload.
/// Returns whether the client got as far as an acknowledged STARTTLS.
pub fn handshake_before_tls(input: &[u8]) -> bool {
    let registry = MemRegistry(Arc::new(MemExport::new(1 << 20)));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("fuzz runtime");
    let mut stream = Scripted {
        input,
        written: 0,
        kept: Vec::new(),
    };
    let step = runtime.block_on(async {
        let no_zeroes = greet(&mut stream).await?;
        options(&mut stream, &registry, Phase::BeforeTls, no_zeroes).await
    });
    assert!(
        !matches!(step, Ok(Step::Session(_))),
        "an export was reached before TLS"
    );
    assert!(
        stream.written <= 64 * 1024 + input.len() * 64,
        "wrote {} bytes for {} input bytes",
        stream.written,
        input.len()
    );
    // Every option reply: magic(8) option(4) kind(4) len(4) data.
    let mut out = stream.kept.get(18..).unwrap_or_default();
    let mut acked_starttls = false;
    while out.len() >= 20 {
        let be32 = |at: usize| u32::from_be_bytes(out[at..at + 4].try_into().expect("4 bytes"));
        assert_eq!(
            u64::from_be_bytes(out[..8].try_into().expect("8 bytes")),
            proto::REPLY_MAGIC,
            "reply framing"
        );
        let (option, kind, len) = (be32(8), be32(12), be32(16) as usize);
        let fine = match kind {
            proto::REP_ERR_TLS_REQD => option != proto::OPT_STARTTLS && option != proto::OPT_ABORT,
            proto::REP_ACK => option == proto::OPT_ABORT || option == proto::OPT_STARTTLS,
            proto::REP_ERR_INVALID => option == proto::OPT_STARTTLS,
            _ => false,
        };
        assert!(
            fine,
            "before TLS, option {option} was answered with reply type {kind:#x}"
        );
        acked_starttls |= option == proto::OPT_STARTTLS && kind == proto::REP_ACK;
        out = out.get(20 + len..).unwrap_or_default();
    }
    assert!(
        !acked_starttls || matches!(step, Ok(Step::StartTls)),
        "STARTTLS acknowledged but the loop went on in plaintext"
    );
    acked_starttls
}

/// Decodes and classifies every 28-byte request header in `input`.
pub fn request_headers(input: &[u8]) {
    for chunk in input.chunks_exact(REQUEST_HEADER_BYTES) {
        let raw: &[u8; REQUEST_HEADER_BYTES] = chunk.try_into().expect("exact chunk");
        if let Ok(h) = decode_request_header(raw) {
            for (size, ro, sr) in [
                (0, false, false),
                (1 << 20, true, true),
                (u64::MAX, false, true),
            ] {
                let _ = classify(h, size, ro, 32 << 20, sr);
            }
        }
    }
}

/// Parses `input` as INFO/GO and as META_CONTEXT payloads.
pub fn option_payloads(input: &[u8]) {
    let _ = parse_info_request(input);
    let _ = parse_meta_request(input);
}
