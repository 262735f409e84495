//! Frame checksums: every replicated change carries a crc32 computed by the
//! primary from the data it read, checked by the secondary before anything
//! is applied. TLS already protects the wire; this catches corruption
//! above it (buffers, bugs) and is what the fault-injection hook flips.

use tonic::Status;

/// crc32 of a write frame: offset (LE) then data.
pub(crate) fn write_crc(offset: u64, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&offset.to_le_bytes());
    h.update(data);
    h.finalize()
}

/// crc32 of a zero frame: offset then length (LE).
pub(crate) fn zero_crc(offset: u64, len: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&offset.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.finalize()
}

/// A copy of `data` with its first byte flipped (the fault-injection
/// hook): a copy, because the data may be shared with other frames.
pub(crate) fn flipped(data: &[u8]) -> bytes::Bytes {
    let mut copy = data.to_vec();
    if let Some(b) = copy.first_mut() {
        *b ^= 0xff;
    }
    copy.into()
}

/// The refusal of a frame whose checksum does not match.
pub(crate) fn rejected(seq: u64, offset: u64) -> Status {
    Status::data_loss(format!(
        "frame {seq} (offset {offset}) failed its checksum; not applied"
    ))
}

/// Marker the primary looks for to count rejected frames.
pub(crate) fn is_rejection(status: &Status) -> bool {
    status.code() == tonic::Code::DataLoss
}
