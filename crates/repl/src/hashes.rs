//! blake3 of consecutive chunks of a volume, skipping holes (a chunk inside
//! a hole hashes as zeros without being read). Initial sync uses it to skip
//! chunks the secondary already holds; online verify to compare both sides.

use ember_storage::StorageError;
use ember_volume::Volume;
use tonic::Status;

/// Most chunks per request.
pub(crate) const MAX_CHUNKS: u32 = 4096;
/// Most bytes hashed per request.
pub(crate) const MAX_BYTES: u64 = 256 << 20;

/// A chunk hash.
pub(crate) type Hash = [u8; 32];

/// Checks a hash request's shape against a volume of `size` bytes.
pub(crate) fn validate(offset: u64, chunk: u64, count: u32, size: u64) -> Result<(), Status> {
    if !chunk.is_power_of_two() || !(4096..=4 << 20).contains(&chunk) {
        return Err(Status::invalid_argument(format!(
            "chunk_bytes {chunk} must be a power of two from 4096 to 4 MiB"
        )));
    }
    if count == 0 || count > MAX_CHUNKS || u64::from(count) * chunk > MAX_BYTES {
        return Err(Status::invalid_argument(format!(
            "chunks {count} must be 1..={MAX_CHUNKS} and cover at most {MAX_BYTES} bytes"
        )));
    }
    if !offset.is_multiple_of(chunk) || offset >= size {
        return Err(Status::invalid_argument(format!(
            "offset {offset} must be chunk-aligned and inside the volume ({size} bytes)"
        )));
    }
    Ok(())
}

/// Hashes up to `count` chunks from `offset` (the last may be short; the
/// list stops at the volume end).
pub(crate) async fn chunk_hashes(
    volume: &Volume,
    offset: u64,
    chunk: u64,
    count: u32,
) -> Result<Vec<Hash>, StorageError> {
    let size = ember_nbd::Export::size(volume);
    let end = (offset + u64::from(count) * chunk).min(size);
    let holes = hole_map(volume, offset, end);
    let mut out = Vec::with_capacity(count as usize);
    let mut pos = offset;
    while pos < end {
        let len = (end - pos).min(chunk);
        if holes.iter().any(|&(s, e)| s <= pos && pos + len <= e) {
            out.push(zero_hash(len));
        } else {
            let data = volume.device().read(pos, len as usize).await?;
            out.push(*blake3::hash(&data).as_bytes());
        }
        pos += len;
    }
    Ok(out)
}

/// Hole ranges `[start, end)` within `[offset, end)`.
pub(crate) fn hole_map(volume: &Volume, offset: u64, end: u64) -> Vec<(u64, u64)> {
    let mut holes = Vec::new();
    let mut pos = offset;
    for run in volume.device().allocation(offset, end - offset) {
        if run.hole {
            holes.push((pos, pos + run.length));
        }
        pos += run.length;
    }
    holes
}

/// Whether every byte is zero. Checks 4 KiB at a time without an early
/// exit inside a chunk, so the compiler vectorizes the inner loop.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// blake3 of `len` zero bytes.
pub(crate) fn zero_hash(len: u64) -> Hash {
    thread_local! {
        static CACHE: std::cell::RefCell<Option<(u64, Hash)>> = const { std::cell::RefCell::new(None) };
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((l, h)) = *c
            && l == len
        {
            return h;
        }
        let h = *blake3::hash(&vec![0u8; len as usize]).as_bytes();
        *c = Some((len, h));
        h
    })
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn is_zero_finds_a_single_set_byte_anywhere() {
        let mut buf = vec![0u8; 3 * 4096 + 100];
        assert!(is_zero(&buf));
        assert!(is_zero(&[]));
        for at in [0, 4095, 4096, 3 * 4096 + 99] {
            buf[at] = 1;
            assert!(!is_zero(&buf), "byte {at}");
            buf[at] = 0;
        }
    }
}
