//! The free space of a mounted file system, from the kernel (`FS_IOC_GETFSMAP`, which XFS and
//! ext4 answer): the byte ranges of its data device that hold nothing the file system needs.
//!
//! Only records the kernel marks as free space (`FMR_OWN_FREE` with `FMR_OF_SPECIAL_OWNER`) on
//! the file system's own data device count; every other record, and every byte no record
//! covers, is in use. The map is true only while the file system cannot change: elastio asks
//! for it while the file system is frozen for a snapshot ([`crate::freeze`]), so it describes
//! exactly the snapshot's point in time.
//!
//! Budget: at most `max_ranges` free ranges, [`MAX_CALLS`] ioctl rounds and a deadline (past
//! any of them the query fails and the caller reads everything); ends use checked arithmetic.
// The GETFSMAP ioctl on a directory descriptor.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::time::Instant;

/// `_IOWR('X', 59, struct fsmap_head)` (the head is 192 bytes).
const FS_IOC_GETFSMAP: libc::c_ulong = 0xc0c0_583b;
const FMR_OF_SPECIAL_OWNER: u32 = 0x10;
const FMR_OF_LAST: u32 = 0x20;
/// `FMR_OWNER(0, 1)`: free space.
const FMR_OWN_FREE: u64 = 1;
/// Records per ioctl round.
const BATCH: usize = 1024;
/// Rounds at most: `BATCH` × this records (every record of a fragmented 16 TiB file system fits).
pub const MAX_CALLS: usize = 1 << 16;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Fsmap {
    device: u32,
    flags: u32,
    physical: u64,
    owner: u64,
    offset: u64,
    length: u64,
    reserved: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<Fsmap>() == 64);
const _: () = assert!(std::mem::size_of::<FsmapHead>() == 192 + 64 * BATCH);

#[repr(C)]
struct FsmapHead {
    iflags: u32,
    oflags: u32,
    count: u32,
    entries: u32,
    reserved: [u64; 6],
    keys: [Fsmap; 2],
    recs: [Fsmap; BATCH],
}

/// One record as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The device, `dev_t` encoded as the kernel's `new_encode_dev`.
    pub device: u32,
    pub flags: u32,
    pub owner: u64,
    /// Byte offset on the device.
    pub physical: u64,
    pub length: u64,
}

/// Major and minor numbers of a `st_dev` (glibc's encoding of `dev_t`).
pub fn major_minor(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// The kernel's encoding of a device number in a record (`new_encode_dev`).
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Free byte ranges `(start, end)` of `device` in `records`: sorted, merged, every range
/// non-empty. Fails when a free record overflows or there are more than `max_ranges`.
pub fn free_ranges(
    records: impl IntoIterator<Item = Record>,
    device: u32,
    max_ranges: usize,
    min_len: u64,
) -> io::Result<Vec<(u64, u64)>> {
    let mut acc = FreeAcc::new(device, max_ranges, min_len);
    for r in records {
        acc.add(r)?;
    }
    acc.finish()
}

/// Collects the free ranges of one device from records as they come.
struct FreeAcc {
    device: u32,
    max_ranges: usize,
    /// Merged ranges shorter than this are of no use to the caller and are dropped.
    min_len: u64,
    ranges: Vec<(u64, u64)>,
    /// Whether any record was about `device`.
    seen: bool,
}

impl FreeAcc {
    fn new(device: u32, max_ranges: usize, min_len: u64) -> Self {
        FreeAcc {
            device,
            max_ranges,
            min_len,
            ranges: Vec::new(),
            seen: false,
        }
    }

    fn add(&mut self, r: Record) -> io::Result<()> {
        if r.device != self.device {
            return Ok(());
        }
        self.seen = true;
        let free = r.owner == FMR_OWN_FREE && r.flags & FMR_OF_SPECIAL_OWNER != 0;
        if !free || r.length == 0 {
            return Ok(());
        }
        let end = r.physical.checked_add(r.length).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a free-space record runs past the end of the address space",
            )
        })?;
        // The kernel reports in order: adjacent records merge as they come.
        if let Some(last) = self.ranges.last_mut() {
            if r.physical >= last.0 && r.physical <= last.1 {
                last.1 = last.1.max(end);
                return Ok(());
            }
        }
        // The last range is complete (records come in order): too short, it makes room.
        if let Some(last) = self.ranges.last() {
            if last.1 - last.0 < self.min_len {
                self.ranges.pop();
            }
        }
        if self.ranges.len() >= self.max_ranges {
            return Err(io::Error::other(format!(
                "more than {} free ranges",
                self.max_ranges
            )));
        }
        self.ranges.push((r.physical, end));
        Ok(())
    }

    /// Sorted and merged (whatever order the records came in), short ranges dropped. An error
    /// when no record was about the device (its numbers are not what the kernel reports).
    fn finish(mut self) -> io::Result<Vec<(u64, u64)>> {
        if !self.seen {
            return Err(io::Error::other(
                "the space map says nothing of the file system's data device",
            ));
        }
        self.ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.ranges.len());
        for (s, e) in self.ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged.retain(|r| r.1 - r.0 >= self.min_len);
        Ok(merged)
    }
}

/// Calls `f` with every record the file system `dir` (a descriptor of any directory in it)
/// reports, in the kernel's order, within [`MAX_CALLS`] rounds and until `deadline`.
fn walk(
    dir: &File,
    deadline: Instant,
    mut f: impl FnMut(Record) -> io::Result<()>,
) -> io::Result<()> {
    let mut head = Box::new(FsmapHead {
        iflags: 0,
        oflags: 0,
        count: BATCH as u32,
        entries: 0,
        reserved: [0; 6],
        keys: [Fsmap::default(); 2],
        recs: [Fsmap::default(); BATCH],
    });
    // From the lowest key to the highest.
    head.keys[1] = Fsmap {
        device: u32::MAX,
        flags: u32::MAX,
        physical: u64::MAX,
        owner: u64::MAX,
        offset: u64::MAX,
        length: 0,
        reserved: [0; 3],
    };
    for _ in 0..MAX_CALLS {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the space map took too long",
            ));
        }
        head.count = BATCH as u32;
        head.entries = 0;
        // SAFETY: `head` is a live, properly laid out fsmap_head with room for `count` records;
        // the kernel writes only within it. The descriptor is ours.
        let r = unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_GETFSMAP, &mut *head as *mut _) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (head.entries as usize).min(BATCH);
        if n == 0 {
            return Ok(());
        }
        for rec in &head.recs[..n] {
            f(Record {
                device: rec.device,
                flags: rec.flags,
                owner: rec.owner,
                physical: rec.physical,
                length: rec.length,
            })?;
        }
        let last = head.recs[n - 1];
        if last.flags & FMR_OF_LAST != 0 {
            return Ok(());
        }
        // The next round starts after the last record returned.
        head.keys[0] = last;
    }
    Err(io::Error::other(format!(
        "the space map did not end within {MAX_CALLS} rounds"
    )))
}

/// Free byte ranges of the data device of the file system `dir` is in (see the module doc):
/// at most `max_ranges` of them, none shorter than `min_len`, asked for until `deadline`.
pub fn free_space(
    dir: &File,
    max_ranges: usize,
    min_len: u64,
    deadline: Instant,
) -> io::Result<Vec<(u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    let dev = dir.metadata()?.dev();
    let (major, minor) = major_minor(dev);
    let mut acc = FreeAcc::new(encode_dev(major, minor), max_ranges, min_len);
    walk(dir, deadline, |r| acc.add(r))?;
    acc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(device: u32, owner: u64, flags: u32, physical: u64, length: u64) -> Record {
        Record {
            device,
            flags,
            owner,
            physical,
            length,
        }
    }

    #[test]
    fn only_free_space_of_the_data_device_counts() {
        let d = encode_dev(7, 3);
        let free = |p, l| rec(d, FMR_OWN_FREE, FMR_OF_SPECIAL_OWNER, p, l);
        let recs = vec![
            free(8192, 4096),
            rec(d, 2, FMR_OF_SPECIAL_OWNER, 0, 8192), // unknown owner
            free(12288, 4096),                        // adjacent: merged
            rec(d, 131, 0, 16384, 4096),              // a file (inode 131)
            free(20480, 0),                           // empty
            rec(d, FMR_OWN_FREE, 0, 40960, 4096),     // an inode numbered 1, not free space
            rec(
                encode_dev(8, 0),
                FMR_OWN_FREE,
                FMR_OF_SPECIAL_OWNER,
                0,
                1 << 20,
            ), // log device
            rec(
                d,
                FMR_OWN_FREE,
                FMR_OF_SPECIAL_OWNER | FMR_OF_LAST,
                65536,
                4096,
            ),
            free(4096, 2048), // out of order: sorted and merged at the end
            free(6144, 2048),
        ];
        let got = free_ranges(recs.clone(), d, 10, 1).unwrap();
        assert_eq!(got, vec![(4096, 16384), (65536, 69632)]);
        // Ranges too short for the caller are dropped.
        assert_eq!(
            free_ranges(recs.clone(), d, 10, 8192).unwrap(),
            vec![(4096, 16384)]
        );
        // A device nothing was said of: its numbers are not the kernel's.
        assert!(free_ranges(recs, encode_dev(9, 9), 10, 1).is_err());
    }

    #[test]
    fn budgets_and_overflow_fail() {
        let d = 1;
        let free = |p, l| rec(d, FMR_OWN_FREE, FMR_OF_SPECIAL_OWNER, p, l);
        assert!(free_ranges(vec![free(u64::MAX - 1, 2)], d, 10, 1).is_err());
        let many: Vec<_> = (0..5).map(|i| free(i * 100, 10)).collect();
        assert!(free_ranges(many.clone(), d, 4, 1).is_err());
        assert_eq!(free_ranges(many.clone(), d, 5, 1).unwrap().len(), 5);
        // Short ranges make room as they come: a budget of 1 holds the one long range.
        let mut mixed = many;
        mixed.push(free(1000, 4096));
        assert_eq!(free_ranges(mixed, d, 1, 4096).unwrap(), vec![(1000, 5096)]);
    }

    #[test]
    fn device_numbers_encode_like_the_kernel() {
        assert_eq!(encode_dev(7, 0), 0x700);
        assert_eq!(encode_dev(259, 1), (259 << 8) | 1);
        assert_eq!(encode_dev(8, 0x1234), 0x34 | (8 << 8) | (0x1200 << 12));
        for (maj, min) in [(7, 0), (259, 3), (8, 0x1234), (0x12345, 0xabcdef)] {
            // glibc's makedev.
            let dev = ((maj as u64 & 0xfffff000) << 32)
                | ((maj as u64 & 0xfff) << 8)
                | ((min as u64 & 0xffffff00) << 12)
                | (min as u64 & 0xff);
            assert_eq!(major_minor(dev), (maj, min));
        }
    }
}
