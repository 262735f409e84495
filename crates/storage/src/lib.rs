//! Backing storage for volumes: the I/O engine ([`IoEngine`]: io_uring, or
//! positional I/O on a blocking pool where io_uring is unavailable) and
//! [`FileDevice`], a sparse file or raw block device addressed by byte
//! offset. Knows nothing about NBD, tracking or replication.

mod device;
mod engine;
mod error;
mod uring;
mod writeback;

pub use device::{AllocationRun, FileDevice};
pub use engine::{EngineChoice, IoEngine};
pub use error::{Result, StorageError};
pub use writeback::start_writeback;
