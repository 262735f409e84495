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

/// crc32 of `len` bytes of data alone, from a verified [`write_crc`] of
/// the same data at `offset`, without reading the data again.
///
/// Why: the secondary's staging log checksums each record's data, and
/// hashing the payload a second time was 4.5 % of a secondary's CPU in an
/// async stream (benches/RESULTS.md, issue 16 "Session 16"). CRC-32 is
/// linear: zlib's `crc32_combine(a, b, len)` (crc32fast's `combine`) is
/// `shift(a, len) ^ b`, so `crc(offset ‖ data) = shift(crc(offset), len) ^
/// crc(data)`, and `crc(data)` is the frame's crc xor `combine(crc(offset),
/// 0, len)`: O(log len), without touching the data.
pub(crate) fn data_crc(offset: u64, len: u64, write_crc: u32) -> u32 {
    let mut prefix = crc32fast::Hasher::new();
    prefix.update(&offset.to_le_bytes());
    let mut shifted = crc32fast::Hasher::new_with_initial(prefix.finalize());
    shifted.combine(&crc32fast::Hasher::new_with_initial_len(0, len));
    write_crc ^ shifted.finalize()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The data's own crc, derived from the frame's, for lengths around
    /// the fold sizes and offsets with every byte set.
    #[test]
    fn a_data_crc_follows_from_the_frame_crc() {
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for offset in [0, 1, 4096, 0x0123_4567_89ab_cdef, u64::MAX] {
            for len in [0, 1, 7, 16, 63, 64, 65, 4096, 65_536, 70_000] {
                let d = &data[..len];
                assert_eq!(
                    data_crc(offset, len as u64, write_crc(offset, d)),
                    crc32fast::hash(d),
                    "offset {offset:#x}, len {len}"
                );
            }
        }
    }

    /// A frame crc that does not belong to the data gives a data crc that
    /// does not match it either: the derivation cannot launder a bad frame.
    #[test]
    fn a_wrong_frame_crc_gives_a_wrong_data_crc() {
        let d = [5u8; 4096];
        let good = write_crc(8192, &d);
        assert_ne!(data_crc(8192, 4096, good ^ 1), crc32fast::hash(&d));
        assert_ne!(data_crc(4096, 4096, good), crc32fast::hash(&d));
    }
}
