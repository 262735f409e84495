//! The on-disk dirty bitmap: a 4 KiB header then the bitmap words.
//!
//! Header: `magic u64 | granularity_bytes u64 | bits u64 | crc32 u32`. The
//! words are rewritten piecewise when an extent leaves the activity log and
//! wholesale on clears, recovery and clean shutdown. The file only ever has
//! to be a superset of the truth for extents outside the activity log.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::bitmap::Bitmap;
use crate::error::{Result, TrackingError, io_err};

const MAGIC: u64 = u64::from_le_bytes(*b"EMBERBM1");
const HEADER_BYTES: u64 = 4096;

/// Handle to a volume's bitmap file.
#[derive(Debug)]
pub(crate) struct BitmapFile {
    file: File,
    path: PathBuf,
}

impl BitmapFile {
    /// Opens the file, returning it and the stored bitmap, or `None` for the
    /// bitmap when the file is new.
    pub(crate) fn open(path: &Path, granularity: u64) -> Result<(Self, Option<Bitmap>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err(path))?;
        let this = Self {
            file,
            path: path.to_owned(),
        };
        let len = this.file.metadata().map_err(io_err(path))?.len();
        if len == 0 {
            return Ok((this, None));
        }
        let corrupt = |reason: String| TrackingError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let mut header = [0u8; 28];
        this.file
            .read_exact_at(&mut header, 0)
            .map_err(io_err(path))?;
        let u64_at =
            |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        if u64_at(0) != MAGIC {
            return Err(corrupt("bad magic".into()));
        }
        let crc = u32::from_le_bytes(header[24..28].try_into().expect("4 bytes"));
        if crc32fast::hash(&header[..24]) != crc {
            return Err(corrupt("header checksum mismatch".into()));
        }
        if u64_at(8) != granularity {
            return Err(corrupt(format!(
                "granularity {} on disk, {granularity} expected",
                u64_at(8)
            )));
        }
        let bits = u64_at(16);
        let mut raw = vec![0u8; (bits.div_ceil(64) * 8) as usize];
        this.file
            .read_exact_at(&mut raw, HEADER_BYTES)
            .map_err(|e| corrupt(format!("short bitmap: {e}")))?;
        let words = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok((this, Some(Bitmap::from_words(words, bits))))
    }

    /// Rewrites header and all words, then syncs.
    pub(crate) fn write_all(&self, bitmap: &Bitmap, granularity: u64) -> Result<()> {
        let mut header = Vec::with_capacity(HEADER_BYTES as usize);
        header.extend_from_slice(&MAGIC.to_le_bytes());
        header.extend_from_slice(&granularity.to_le_bytes());
        header.extend_from_slice(&bitmap.len().to_le_bytes());
        let crc = crc32fast::hash(&header);
        header.extend_from_slice(&crc.to_le_bytes());
        header.resize(HEADER_BYTES as usize, 0);
        let map_err = io_err(&self.path);
        self.write_raw_words(0, bitmap.words()).and_then(|()| {
            self.file
                .set_len(HEADER_BYTES + bitmap.words().len() as u64 * 8)
                .map_err(io_err(&self.path))
        })?;
        self.file.write_all_at(&header, 0).map_err(map_err)?;
        self.sync()
    }

    /// Writes `words` as bitmap words starting at word index `first` (no sync).
    pub(crate) fn write_raw_words(&self, first: usize, words: &[u64]) -> Result<()> {
        if words.is_empty() {
            return Ok(());
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.file
            .write_all_at(&bytes, HEADER_BYTES + first as u64 * 8)
            .map_err(io_err(&self.path))
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(io_err(&self.path))
    }
}
