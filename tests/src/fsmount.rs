//! Loop-mounted file systems for tests that need a property `/` lacks:
//! XFS with `reflink=1` (copy-on-write clones), or ext4 (no reflink) when
//! the machine's `/` is something else. The image is a sparse file in a
//! temp dir; the mount is removed when the value drops, so a failing test
//! leaves no mount behind (unless `EMBER_KEEP_TMP=1`, then it is kept).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{require_tool, tempdir};

/// A file system made on a sparse file and loop-mounted for one test.
#[derive(Debug)]
pub struct LoopMount {
    /// Holds the image file; removed (after the unmount) on drop.
    _dir: tempfile::TempDir,
    mountpoint: PathBuf,
}

impl LoopMount {
    /// An XFS file system of `size_bytes` with reflink on (mkfs.xfs's
    /// default, asked for explicitly). `None` when `mkfs.xfs` is missing
    /// and `EMBER_IT_ALLOW_SKIP=1`; panics when it is missing otherwise.
    pub fn xfs(size_bytes: u64) -> Option<Self> {
        if !require_tool("mkfs.xfs") {
            return None;
        }
        Some(Self::make(
            size_bytes,
            "mkfs.xfs",
            &["-q", "-m", "reflink=1"],
        ))
    }

    /// An ext4 file system of `size_bytes` (no reflink).
    pub fn ext4(size_bytes: u64) -> Option<Self> {
        if !require_tool("mkfs.ext4") {
            return None;
        }
        Some(Self::make(size_bytes, "mkfs.ext4", &["-q", "-F"]))
    }

    fn make(size_bytes: u64, mkfs: &str, args: &[&str]) -> Self {
        let dir = tempdir();
        let image = dir.path().join("fs.img");
        let file = std::fs::File::create(&image).expect("create fs image");
        file.set_len(size_bytes).expect("size fs image");
        drop(file);
        let out = Command::new(mkfs)
            .args(args)
            .arg(&image)
            .output()
            .expect("run mkfs");
        assert!(
            out.status.success(),
            "{mkfs} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).expect("create mountpoint");
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mountpoint)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -o loop {} failed (tests need root and loop devices): {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            _dir: dir,
            mountpoint,
        }
    }

    /// The mounted file system's root.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Free bytes of the mounted file system (statvfs).
    pub fn free_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes())
            .expect("path has no NUL");
        // SAFETY: statvfs writes into a zeroed local struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::statvfs(path.as_ptr(), &mut st) },
            0,
            "statvfs"
        );
        st.f_bavail * st.f_frsize
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if std::env::var("EMBER_KEEP_TMP").as_deref() == Ok("1") {
            eprintln!("keeping mount {}", self.mountpoint.display());
            return;
        }
        // Lazy unmount: an agent killed moments ago may still hold files.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}
