//! Shared vocabulary for every Ember crate: validated names, byte sizes and
//! extents. No I/O and no async lives here, and nothing here depends on
//! another Ember crate.

mod extent;
mod name;
mod size;

pub use extent::{Extent, merge_extents};
pub use name::{MAX_NAME_BYTES, NameError, SnapshotName, VolumeName};
pub use size::{SizeError, format_size, parse_size};

/// Every volume size and every tracked block is a multiple of this.
///
/// 4 KiB is the page size and the ext4 block size, so sparse-file holes and
/// `SEEK_DATA` answers line up with it, and it is the sector size of any
/// modern disk a volume may be copied onto.
pub const SECTOR_BYTES: u64 = 4096;
