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
use crate::handshake::{negotiate, parse_info_request, parse_meta_request};

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

/// A stream that yields `input` then EOF, and swallows everything written.
#[derive(Debug)]
struct Scripted<'a> {
    input: &'a [u8],
    written: usize,
}

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
    let mut stream = Scripted { input, written: 0 };
    let _ = runtime.block_on(negotiate(&mut stream, &registry));
    // Bounded output: a hostile client cannot make us write without limit.
    assert!(
        stream.written <= 64 * 1024 + input.len() * 64,
        "wrote {} bytes for {} input bytes",
        stream.written,
        input.len()
    );
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
