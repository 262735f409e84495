//! An NBD server (protocol: NetworkBlockDevice/nbd `doc/proto.md`), generic
//! over the [`Export`]s a [`ExportRegistry`] hands out. Knows nothing about
//! volumes, tracking or replication.
//!
//! Supported: fixed newstyle handshake with `NO_ZEROES`; options
//! `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT`, `SET_META_CONTEXT` (everything else gets
//! `ERR_UNSUP` with its payload drained); commands `READ`, `WRITE` (+FUA),
//! `DISC`, `FLUSH`, `TRIM`, `CACHE`, `WRITE_ZEROES` (+`NO_HOLE`,
//! `FAST_ZERO`), `BLOCK_STATUS` for `base:allocation` and
//! `qemu:dirty-bitmap:dirty`. TCP listeners can require TLS
//! (`NBD_OPT_STARTTLS`, FORCEDTLS, client certificates; see [`tls`]).

pub mod codec;
mod connection;
mod error;
mod export;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
pub mod proto;
mod server;
pub mod tls;

pub use codec::{Request, RequestHeader, decode_request_header};
pub use error::{NbdError, nbd_errno};
pub use export::{BlockRun, Export, ExportRegistry};
pub use handshake::{OptionRequest, parse_info_request, parse_meta_request};
pub use server::{NbdServer, ServerLimits};
pub use tls::{AllowList, NbdTls, TlsSetupError};
