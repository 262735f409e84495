//! Starting a file range's writeback without waiting for it, so that a
//! later flush finds the bulk already on its way to disk. The one
//! `sync_file_range` call of the workspace: neither nix (0.31, 0.32) nor
//! rustix wraps it, so the unsafe call lives here once, behind a safe
//! function.

use std::os::fd::{AsFd, AsRawFd};

/// Asks the kernel to start writing `[offset, offset + len)` of `file`
/// back (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): no wait, no
/// durability promise. Advisory: errors are ignored, a failure only loses
/// the head start (the flush that makes the range durable reports them).
pub fn start_writeback(file: impl AsFd, offset: u64, len: u64) {
    // SAFETY: sync_file_range on a descriptor borrowed for the call; no
    // memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_fd().as_raw_fd(),
            offset as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}
