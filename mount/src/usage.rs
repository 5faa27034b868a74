//! The free space of a disk's file systems, for full backups that read only the used blocks:
//! the disk's places (its partitions, or the whole disk) are looked at, and where an ext2/3/4
//! or XFS file system is, its own allocation maps say which blocks are free (ext4 block
//! bitmaps, XFS free-space B+trees). Blocks found free are neither read nor stored; they
//! restore as zeros, which their file system does not look at.
//!
//! Conservative by construction: anything not understood counts as used. A place whose file
//! system is unknown, damaged, or whose journal or log needs recovery (its transactions may
//! allocate blocks the maps still show free) is read whole, and the returned lines say so.
//! Bounded like the readers it uses; at most `max_ranges` ranges in all.

use std::io;

use crate::ext4::{Ext4, ReadAt};
use crate::xfs::Xfs;

/// What [`free_space`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FreeSpace {
    /// Free byte ranges of the disk, sorted and disjoint.
    pub ranges: Vec<(u64, u64)>,
    /// One line per place: what it holds and how much of it is free.
    pub lines: Vec<String>,
}

/// Bytes `[start, start + len)` of a device.
struct Window<'a> {
    dev: &'a dyn ReadAt,
    start: u64,
    len: u64,
}

impl ReadAt for Window<'_> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        self.dev.read_at(self.start + offset, buf)
    }
}

/// The free space of the file systems on `dev` (a disk of `size` bytes).
pub fn free_space(dev: &dyn ReadAt, size: u64, max_ranges: usize) -> io::Result<FreeSpace> {
    let mut read = |off: u64, buf: &mut [u8]| dev.read_at(off, buf);
    let Some(parts) = crate::partitions::parse_strict(size, &mut read)? else {
        return Ok(FreeSpace {
            ranges: Vec::new(),
            lines: vec![
                "disk: its partition table has overlapping, invalid or clipped entries: free \
                 space not trusted, read whole"
                    .into(),
            ],
        });
    };
    let places: Vec<(String, u64, u64)> = if parts.is_empty() {
        vec![("disk".into(), 0, size)]
    } else {
        parts
            .iter()
            .map(|p| (format!("part{}", p.number), p.start, p.len))
            .collect()
    };
    let mut out = FreeSpace::default();
    let per_place = (max_ranges / places.len().max(1)).max(1);
    for (name, start, len) in places {
        let w = Window { dev, start, len };
        // A leftover signature of something else (the place was reused for RAID, LVM, swap...)
        // makes the file system's maps meaningless for it: read whole.
        if let Some(other) = other_signature(&w, len) {
            out.lines.push(format!(
                "{name}: also carries a {other} signature, free space not trusted: read whole"
            ));
            continue;
        }
        let (kind, found) = match crate::filesystem::detect(&w, len) {
            Some("ext4") => (
                "ext4",
                Ext4::open(&w, len).and_then(|fs| match fs {
                    Some(fs) => fs.free_extents(per_place),
                    None => Ok(Vec::new()),
                }),
            ),
            Some("xfs") => (
                "xfs",
                Xfs::open(&w, len).and_then(|fs| match fs {
                    Some(fs) if fs.log_is_clean()? => fs.free_extents(per_place),
                    Some(_) => Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "its log needs recovery, so the free-space trees may be stale",
                    )),
                    None => Ok(Vec::new()),
                }),
            ),
            Some(other) => {
                out.lines
                    .push(format!("{name}: {other}, free space not known: read whole"));
                continue;
            }
            None => {
                out.lines
                    .push(format!("{name}: no file system known: read whole"));
                continue;
            }
        };
        match found {
            Ok(ranges) => {
                let free: u64 = ranges.iter().map(|(s, e)| e - s).sum();
                out.lines.push(format!(
                    "{name}: {kind}, {free} of {len} bytes free, not read"
                ));
                out.ranges.extend(
                    ranges
                        .into_iter()
                        .map(|(s, e)| (s, e.min(len)))
                        .filter(|(s, e)| s < e)
                        .map(|(s, e)| (start + s, start + e)),
                );
            }
            Err(e) => out.lines.push(format!("{name}: {kind}, read whole: {e}")),
        }
    }
    out.ranges.sort_unstable();
    Ok(out)
}

/// A signature of something other than a file system elastio reads free space of: md RAID
/// superblocks (0.90/1.0 near the end, 1.1 at 0, 1.2 at 4 KiB), LVM, swap, LUKS, btrfs, NTFS.
fn other_signature(dev: &dyn ReadAt, len: u64) -> Option<&'static str> {
    let is = |offset: u64, magic: &[u8]| {
        let mut b = vec![0u8; magic.len()];
        offset
            .checked_add(magic.len() as u64)
            .is_some_and(|end| end <= len)
            && dev.read_at(offset, &mut b).is_ok()
            && b == magic
    };
    const MD: [u8; 4] = 0xa92b_4efc_u32.to_le_bytes();
    let md_090 = (len & !0xffff).checked_sub(0x10000);
    let md_10 = len.checked_sub(0x2000).map(|o| o & !0xfff);
    if is(0, &MD)
        || is(4096, &MD)
        || md_090.is_some_and(|o| is(o, &MD))
        || md_10.is_some_and(|o| is(o, &MD))
    {
        return Some("md RAID");
    }
    if (0..4).any(|s| is(s * 512, b"LABELONE")) {
        return Some("LVM");
    }
    if is(4086, b"SWAPSPACE2") || is(4086, b"SWAP-SPACE") {
        return Some("swap");
    }
    if is(0, b"LUKS\xba\xbe") {
        return Some("LUKS");
    }
    if is(0x10040, b"_BHRfS_M") {
        return Some("btrfs");
    }
    if is(3, b"NTFS    ") {
        return Some("NTFS");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An MBR with two overlapping partitions: one is dropped by the reader, so where data lies
    /// is in doubt and nothing is skipped.
    #[test]
    fn overlapping_partitions_mean_no_free_space() {
        let mut disk = vec![0u8; 4 << 20];
        disk[510] = 0x55;
        disk[511] = 0xaa;
        let entry = |disk: &mut Vec<u8>, i: usize, start: u32, sectors: u32| {
            let e = &mut disk[446 + 16 * i..446 + 16 * (i + 1)];
            e[4] = 0x83;
            e[8..12].copy_from_slice(&start.to_le_bytes());
            e[12..16].copy_from_slice(&sectors.to_le_bytes());
        };
        entry(&mut disk, 0, 2048, 4096);
        entry(&mut disk, 1, 4096, 2048);
        let found = free_space(&&disk[..], disk.len() as u64, 100).unwrap();
        assert!(found.ranges.is_empty());
        assert!(found.lines[0].contains("overlapping"), "{:?}", found.lines);
        // Apart, they are two places (holding nothing known).
        entry(&mut disk, 1, 6144, 2048);
        let found = free_space(&&disk[..], disk.len() as u64, 100).unwrap();
        assert_eq!(found.lines.len(), 2, "{:?}", found.lines);
    }
}
