//! Making a commit into a spare segment durable without writing the segment's inode.
//!
//! A spare ([`super::spare`]) is a file of zeros, written and synced before it becomes a
//! segment: its size and block map are durable, so a commit into it only overwrites blocks
//! already on the disk. `fdatasync` of the segment still writes its inode on ext4 without a
//! journal, because every `write` updates the mtime once a clock tick has passed (three device
//! requests per sync instead of two; perf/README, sessions 15 and 20). Here the commit's pages
//! are written with `sync_file_range` (wait for earlier writeback, write, wait for this one)
//! and the disk's write cache is flushed with `fdatasync` of [`FLUSH_FILE`], an empty file
//! of the log's that is never written, so it has nothing of its own to write. The mtime stays
//! in memory; nothing read back needs it.
//!
//! ext4 without a journal writes the inode-table block of the file it syncs when that block
//! is dirty, whichever of its inodes dirtied it, and every commit dirties the segment's (its
//! mtime). So the flush file's inode must not share a block with the active segment's: when
//! it would (inode numbers are handed out in order, and a spare is made next to the flush file
//! often), the flush file is made again until its inode is in another block
//! ([`Flusher::keep_apart_from`]).
//!
//! Invariants:
//! - Only where an overwrite stays in place, which only the filesystem knows: ext4
//!   (`fstatfs`), not mounted `data=journal` (whose data must reach the journal first) or `dax`
//!   (`/proc/self/mountinfo`), and a segment without the per-file journal-data or DAX flag
//!   (`FS_IOC_GETFLAGS`). Copy-on-write filesystems (btrfs, XFS with shared extents, ZFS)
//!   write every overwrite somewhere new, whose block map `sync_file_range` does not sync:
//!   anywhere not known to be safe, and wherever a check fails, the log uses `fdatasync`.
//! - Only for frames that lie wholly inside the spare's written zeros; a segment that grows
//!   (not a spare, or past its spare's size) changes its size and is synced with `fdatasync`.
//! - An error from either call fails the commit as a failed `fdatasync` does.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `FS_JOURNAL_DATA_FL` of `<linux/fs.h>`: the file's data goes through the journal.
const FS_JOURNAL_DATA_FL: libc::c_long = 0x0000_4000;
/// `FS_DAX_FL` of `<linux/fs.h>`: the file is mapped straight to persistent memory.
const FS_DAX_FL: libc::c_long = 0x0200_0000;

/// The empty file in the log's directory whose `fdatasync` flushes the disk's cache.
pub const FLUSH_FILE: &str = "cache-flush";
/// Inode numbers `n` and `m` are in different inode-table blocks when `(n - 1) / INODES_APART`
/// and `(m - 1) / INODES_APART` differ, for any inode size from 128 bytes up and blocks up to
/// 4 KiB (ext4's inode tables start on block boundaries, inode 1 first).
const INODES_APART: u64 = 32;
/// Files made at most, looking for an inode in another block than the segment's.
const MAKE_TRIES: usize = 2 * INODES_APART as usize;

/// The flush file, kept with an inode away from the active segment's.
pub struct Flusher {
    dir: std::path::PathBuf,
    file: File,
    inode: u64,
}

/// The flush file of `dir` ([`FLUSH_FILE`], made if missing), if commits into spares in `dir`
/// may be synced as overwrites; `None` where only `fdatasync` is known to be safe, or the
/// file cannot be made.
pub fn flusher(dir: &Path) -> Option<Flusher> {
    let dir = dir.canonicalize().ok()?;
    let handle = File::open(&dir).ok()?;
    // SAFETY: an all-zero `statfs` is a valid value for the kernel to overwrite.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `handle` is an open descriptor and `stat` a live, writable `statfs`.
    if unsafe { libc::fstatfs(handle.as_raw_fd(), &mut stat) } != 0 {
        return None;
    }
    if stat.f_type != libc::EXT4_SUPER_MAGIC {
        return None;
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    if !mount_allows(&mountinfo, &dir) {
        return None;
    }
    // Left by a crash while the flush file was being made again.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&format!("{FLUSH_FILE}.")) && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let path = dir.join(FLUSH_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(_) => {
            make_empty(&path).ok()?;
            handle.sync_all().ok()?;
            File::open(&path).ok()?
        }
    };
    let inode = inode_of(&file).ok()?;
    Some(Flusher { dir, file, inode })
}

impl Flusher {
    /// Makes `len` bytes of `file` at `offset` durable: writes their pages and waits for
    /// them, then flushes the disk's write cache through the flush file.
    pub fn sync(&self, file: &File, offset: u64, len: u64) -> std::io::Result<()> {
        let how = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: `file` is an open descriptor; the call reads no memory of ours.
        let written =
            unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, how) };
        if written != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.file.sync_data()
    }

    /// Whether the flush file's inode is in another inode-table block than `segment`'s,
    /// after making the flush file again if it was not. `false` (sync the segment with
    /// `fdatasync`) when that fails.
    pub fn keep_apart_from(&mut self, segment: &File) -> bool {
        let Ok(segment) = inode_of(segment) else {
            return false;
        };
        if apart(self.inode, segment) {
            return true;
        }
        match self.remake(segment) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(
                    %error,
                    "remaking the log's flush file failed; this segment is synced with fdatasync"
                );
                false
            }
        }
    }

    /// Makes files until one has an inode apart from `segment`'s, and puts it in place as the
    /// flush file; the others are removed.
    fn remake(&mut self, segment: u64) -> std::io::Result<()> {
        let mut made = Vec::new();
        let mut found = None;
        for i in 0..MAKE_TRIES {
            let path = self.dir.join(format!("{FLUSH_FILE}.{i}.tmp"));
            make_empty(&path)?;
            let inode = inode_of(&File::open(&path)?)?;
            if apart(inode, segment) {
                found = Some(path);
                break;
            }
            made.push(path);
        }
        for path in &made {
            let _ = std::fs::remove_file(path);
        }
        let Some(path) = found else {
            return Err(std::io::Error::other(format!(
                "no inode apart from the segment's in {MAKE_TRIES} files"
            )));
        };
        let target = self.dir.join(FLUSH_FILE);
        std::fs::rename(&path, &target)?;
        File::open(&self.dir)?.sync_all()?;
        self.file = File::open(&target)?;
        self.inode = inode_of(&self.file)?;
        Ok(())
    }
}

/// Whether inodes `a` and `b` are in different inode-table blocks.
fn apart(a: u64, b: u64) -> bool {
    a.saturating_sub(1) / INODES_APART != b.saturating_sub(1) / INODES_APART
}

fn inode_of(file: &File) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.ino())
}

/// Makes an empty file at `path` (kept if there) and syncs it.
fn make_empty(path: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?
        .sync_all()
}

/// Whether `file` has neither the journal-data nor the DAX flag (and the flags can be read).
pub fn file_allows(file: &File) -> bool {
    let mut flags: libc::c_long = 0;
    // SAFETY: `file` is an open descriptor; FS_IOC_GETFLAGS writes one `long` into `flags`.
    let read = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    read == 0 && flags & (FS_JOURNAL_DATA_FL | FS_DAX_FL) == 0
}

/// Whether the mount that holds `path` (the longest mount point above it in `mountinfo`, the
/// last listed of equals) is ext4 without `data=journal` or `dax`.
fn mount_allows(mountinfo: &str, path: &Path) -> bool {
    let mut best: Option<(usize, bool)> = None;
    for line in mountinfo.lines() {
        let Some((mount, fs)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = mount.split(' ').nth(4).map(unescape) else {
            continue;
        };
        if !path.starts_with(&point) {
            continue;
        }
        let mut fs = fs.split(' ');
        let (kind, options) = (fs.next(), fs.nth(1).unwrap_or(""));
        let allows = kind == Some("ext4")
            && !options
                .split(',')
                .any(|o| o == "data=journal" || o == "dax" || o.starts_with("dax="));
        let depth = Path::new(&point).components().count();
        if best.is_none_or(|(d, _)| depth >= d) {
            best = Some((depth, allows));
        }
    }
    best.is_some_and(|(_, allows)| allows)
}

/// A mount point as `mountinfo` writes it: space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
30 27 0:25 / /dev/shm rw,nosuid - tmpfs tmpfs rw
31 27 254:16 / /srv/journaled rw - ext4 /dev/vdb rw,data=journal
32 27 254:32 / /srv/with\\040space rw - ext4 /dev/vdc rw
33 27 0:40 / /srv/btrfs rw - btrfs /dev/vdd rw
34 33 254:48 / /srv/btrfs/inner rw - ext4 /dev/vde rw,dax=always
35 27 254:64 / /srv/over rw - xfs /dev/vdf rw
36 27 254:80 / /srv/over rw - ext4 /dev/vdg rw
";

    #[test]
    fn only_ext4_mounts_without_journaled_data_or_dax_allow_overwrites() {
        let allows = |path: &str| mount_allows(MOUNTINFO, Path::new(path));
        assert!(allows("/var/lib/flux/log"));
        assert!(!allows("/dev/shm/flux/log"), "tmpfs");
        assert!(!allows("/srv/journaled/log"), "data=journal");
        assert!(allows("/srv/with space/log"), "an escaped mount point");
        assert!(!allows("/srv/btrfs/log"), "btrfs");
        assert!(!allows("/srv/btrfs/inner/log"), "dax");
        assert!(
            allows("/srv/over/log"),
            "the last of two mounts on one point"
        );
        assert!(!allows("relative/log"), "no mount point holds it");
        assert!(!mount_allows("", Path::new("/var/lib/flux")));
    }

    #[test]
    fn inodes_are_apart_across_blocks_of_32() {
        assert!(!apart(1, 32));
        assert!(apart(32, 33));
        assert!(!apart(10321966, 10321967));
        assert!(apart(10321926, 10321967));
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/trailing\\04"), "/trailing\\04");
    }
}
