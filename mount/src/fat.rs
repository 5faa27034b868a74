//! A read-only FAT12/FAT16/FAT32 reader with long (VFAT) names, for EFI system partitions and
//! USB-style volumes inside disk RPs.
//!
//! Written here rather than taken from the `fatfs` crate: its released version (0.3.6, 2023)
//! needs a writable device, panics on some damaged images (open fuzzing reports), and follows
//! cluster chains without a loop check; this reader is small and bounded by construction.
//!
//! Model: [`Fat::open`] validates the boot sector (BPB) and derives the layout (FAT, root
//! directory region or cluster, data area, cluster count, and from that the FAT type, as the
//! specification does). A FAT has no inode numbers: an entry's number is the byte offset of its
//! 32-byte directory entry divided by 32 (as Linux's `i_pos`), the root's is 1, so `attr` reads
//! that one entry back without any table in memory. Files and directories are cluster chains,
//! turned into runs of sectors and read like extents.
//!
//! Shown as Linux's vfat driver shows a volume mounted with default options: names from the
//! long-name entries when their checksum matches, else the 8.3 name (lower-cased where the
//! entry's case bits say so); mode 0755 (0555 with the read-only attribute), directories 0755;
//! owner 0:0; times as UTC; one link per file; directories sized by their cluster chain.
//! Volume labels and deleted entries are skipped; there are no symlinks or extended attributes.
//!
//! Invariants: nothing is written; every number is checked against the layout; a cluster chain
//! is followed for at most the volume's cluster count (a loop is an error, not a hang) and
//! never past what the file's size needs; a directory is read for at most [`MAX_DIR_BYTES`] and
//! [`MAX_DIR_ENTRIES`] entries; a damaged entry is an error naming it, never a panic.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ext4::{Extent, Kind, ReadAt};
use crate::filesystem::{Attr, CachedDevice, Entry, FileData, FileSystem, HasDevice, MappedFile};

/// Directory bytes read for one listing.
pub const MAX_DIR_BYTES: u64 = 64 << 20;
/// Entries of one listing.
pub const MAX_DIR_ENTRIES: usize = 1 << 20;
/// The root directory's inode number.
const ROOT: u64 = 1;
const ATTR_RO: u8 = 0x01;
const ATTR_VOLUME: u8 = 0x08;
const ATTR_DIR: u8 = 0x10;
const ATTR_LFN: u8 = 0x0f;

fn corrupt(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("fat: {what}"))
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// FAT12, FAT16 or FAT32 (by cluster count, as the specification decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatType {
    Fat12,
    Fat16,
    Fat32,
}

#[derive(Debug, Clone)]
struct Layout {
    kind: FatType,
    sector: u64,
    cluster: u64,
    /// Byte offset of the first FAT.
    fat: u64,
    fat_bytes: u64,
    /// FAT12/16: the fixed root directory region (offset, bytes); FAT32: the root's cluster.
    root_region: (u64, u64),
    root_cluster: u32,
    /// Byte offset of cluster 2.
    data: u64,
    /// Clusters 2..clusters+2 exist.
    clusters: u32,
}

/// A read-only FAT volume on `R`.
pub struct Fat<R> {
    dev: R,
    l: Layout,
    label: String,
}

/// One parsed 32-byte directory entry.
#[derive(Debug, Clone)]
struct DirEnt {
    short: [u8; 11],
    attr: u8,
    case: u8,
    first: u32,
    size: u32,
    ctime: SystemTime,
    atime: SystemTime,
    mtime: SystemTime,
}

/// A FAT date and time (local time, taken as UTC) as a system time.
fn fat_time(date: u16, time: u16, hundredths: u8) -> SystemTime {
    let year = 1980 + (date >> 9) as i64;
    let month = ((date >> 5) & 0xf).clamp(1, 12) as i64;
    let day = (date & 0x1f).max(1) as i64;
    // Days from civil (Howard Hinnant's algorithm), proleptic Gregorian.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400
        + ((time >> 11) as i64).min(23) * 3600
        + ((time >> 5) & 0x3f).min(59) as i64 * 60
        + (time & 0x1f) as i64 * 2
        + (hundredths.min(199) / 100) as i64;
    let nanos = (hundredths.min(199) % 100) as u64 * 10_000_000;
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64) + Duration::from_nanos(nanos)
}

impl DirEnt {
    fn parse(b: &[u8]) -> DirEnt {
        let mut short = [0u8; 11];
        short.copy_from_slice(&b[..11]);
        DirEnt {
            short,
            attr: b[11],
            case: b[12],
            first: (le16(b, 20) as u32) << 16 | le16(b, 26) as u32,
            size: le32(b, 28),
            ctime: fat_time(le16(b, 16), le16(b, 14), b[13]),
            atime: fat_time(le16(b, 18), 0, 0),
            mtime: fat_time(le16(b, 24), le16(b, 22), 0),
        }
    }

    fn is_dir(&self) -> bool {
        self.attr & ATTR_DIR != 0
    }

    /// The 8.3 name as Linux shows it: base and extension trimmed, `.` between, lower-cased
    /// where the case bits say so.
    fn short_name(&self) -> Vec<u8> {
        let mut base: Vec<u8> = self.short[..8].to_vec();
        if base[0] == 0x05 {
            base[0] = 0xe5;
        }
        let trim = |v: &[u8]| {
            let n = v.iter().rposition(|&c| c != b' ').map_or(0, |i| i + 1);
            v[..n].to_vec()
        };
        let (mut base, mut ext) = (trim(&base), trim(&self.short[8..]));
        if self.case & 0x08 != 0 {
            base.make_ascii_lowercase();
        }
        if self.case & 0x10 != 0 {
            ext.make_ascii_lowercase();
        }
        if !ext.is_empty() {
            base.push(b'.');
            base.extend(ext);
        }
        base
    }

    fn checksum(&self) -> u8 {
        self.short
            .iter()
            .fold(0u8, |s, &c| s.rotate_right(1).wrapping_add(c))
    }
}

impl<R: ReadAt> Fat<R> {
    /// Opens the FAT volume on `dev` (`size` bytes). `Ok(None)` when the boot sector is not a
    /// FAT one; an error when it is one this reader cannot trust.
    pub fn open(dev: R, size: u64) -> io::Result<Option<Self>> {
        if size < 512 {
            return Ok(None);
        }
        let mut b = [0u8; 512];
        dev.read_at(0, &mut b)?;
        if b[510..512] != [0x55, 0xaa] || (&b[0x36..0x39] != b"FAT" && &b[0x52..0x57] != b"FAT32") {
            return Ok(None);
        }
        let sector = le16(&b, 11) as u64;
        let per_cluster = b[13] as u64;
        let reserved = le16(&b, 14) as u64;
        let fats = b[16] as u64;
        let root_entries = le16(&b, 17) as u64;
        let total = match le16(&b, 19) {
            0 => le32(&b, 32) as u64,
            n => n as u64,
        };
        let fat16_sectors = le16(&b, 22);
        let fat_sectors = match fat16_sectors {
            0 => le32(&b, 36) as u64,
            n => n as u64,
        };
        let geometry_ok = sector.is_power_of_two()
            && (512..=4096).contains(&sector)
            && per_cluster.is_power_of_two()
            && per_cluster * sector <= 1 << 21
            && reserved >= 1
            && (1..=4).contains(&fats)
            && fat_sectors >= 1
            && total * sector <= size;
        if !geometry_ok {
            return Err(corrupt(format!(
                "boot sector geometry is inconsistent ({sector}-byte sectors, {per_cluster} per \
                 cluster, {total} sectors, {fats} FATs of {fat_sectors} sectors)"
            )));
        }
        let root_sectors = (root_entries * 32).div_ceil(sector);
        let data_sector = reserved + fats * fat_sectors + root_sectors;
        if data_sector >= total {
            return Err(corrupt("the FATs and root directory fill the volume"));
        }
        let clusters = (total - data_sector) / per_cluster;
        // As Linux decides: FAT32 when the 16-bit FAT size is 0, else FAT12 or FAT16 by count.
        let kind = match (fat16_sectors, clusters) {
            (0, _) => FatType::Fat32,
            (_, 0..4085) => FatType::Fat12,
            _ => FatType::Fat16,
        };
        let entry_bits = match kind {
            FatType::Fat12 => 12,
            FatType::Fat16 => 16,
            FatType::Fat32 => 32,
        };
        let fat_bytes = fat_sectors * sector;
        // More clusters than the FAT has entries for: only those it describes (as Linux).
        let clusters = clusters
            .min((fat_bytes * 8 / entry_bits).saturating_sub(2))
            .min(0x0fff_fff5);
        if clusters == 0 {
            return Err(corrupt("the FAT describes no cluster"));
        }
        let root_cluster = if kind == FatType::Fat32 {
            le32(&b, 44)
        } else {
            0
        };
        let label_at = if kind == FatType::Fat32 { 71 } else { 43 };
        let label = String::from_utf8_lossy(&b[label_at..label_at + 11])
            .trim_end()
            .to_string();
        let l = Layout {
            kind,
            sector,
            cluster: per_cluster * sector,
            fat: reserved * sector,
            fat_bytes,
            root_region: (
                (reserved + fats * fat_sectors) * sector,
                root_sectors * sector,
            ),
            root_cluster,
            data: data_sector * sector,
            clusters: clusters as u32,
        };
        if kind == FatType::Fat32 && !(2..clusters as u32 + 2).contains(&root_cluster) {
            return Err(corrupt(format!("root cluster {root_cluster}")));
        }
        Ok(Some(Fat { dev, l, label }))
    }

    pub fn fat_type(&self) -> FatType {
        self.l.kind
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn device(&self) -> &R {
        &self.dev
    }

    /// A directory entry, its first cluster's high word used on FAT32 only (FAT12/16 keep other
    /// data there).
    fn dirent(&self, b: &[u8]) -> DirEnt {
        let mut e = DirEnt::parse(b);
        if self.l.kind != FatType::Fat32 {
            e.first &= 0xffff;
        }
        e
    }

    /// The clusters of the chain from `first`, at most `limit` of them.
    fn chain(&self, first: u32, limit: u64) -> io::Result<Vec<u32>> {
        let l = &self.l;
        let mut out = Vec::new();
        let mut c = first;
        // The last few 4 KiB windows of the FAT read (a chain jumping between a few places of
        // the FAT, as a hostile cycle does, reads each once).
        let mut windows: Vec<(u64, Vec<u8>)> = Vec::new();
        while (out.len() as u64) < limit {
            if !(2..l.clusters + 2).contains(&c) {
                return Err(corrupt(format!(
                    "cluster {c} in a chain is outside the volume"
                )));
            }
            if out.len() as u64 > l.clusters as u64 {
                return Err(corrupt(format!("the chain from cluster {first} loops")));
            }
            out.push(c);
            // The FAT entry of `c`, read through a 4 KiB window of the FAT.
            let (at, n) = match l.kind {
                FatType::Fat12 => (c as u64 * 3 / 2, 2),
                FatType::Fat16 => (c as u64 * 2, 2),
                FatType::Fat32 => (c as u64 * 4, 4),
            };
            let win = at / 4096 * 4096;
            let k = match windows.iter().position(|w| w.0 == win) {
                Some(k) => k,
                None => {
                    let len = (l.fat_bytes - win).min(4096 + 4) as usize;
                    let mut buf = vec![0u8; len];
                    self.dev.read_at(l.fat + win, &mut buf)?;
                    if windows.len() == 8 {
                        windows.remove(0);
                    }
                    windows.push((win, buf));
                    windows.len() - 1
                }
            };
            let e = windows[k]
                .1
                .get((at - win) as usize..(at - win) as usize + n)
                .ok_or_else(|| corrupt(format!("cluster {c}'s FAT entry is past the FAT")))?;
            let next = match l.kind {
                FatType::Fat12 => {
                    let v = le16(e, 0) as u32;
                    if c & 1 == 1 {
                        v >> 4
                    } else {
                        v & 0xfff
                    }
                }
                FatType::Fat16 => le16(e, 0) as u32,
                FatType::Fat32 => le32(e, 0) & 0x0fff_ffff,
            };
            let end = match l.kind {
                FatType::Fat12 => 0xff8,
                FatType::Fat16 => 0xfff8,
                FatType::Fat32 => 0x0fff_fff8,
            };
            if next >= end {
                break;
            }
            c = next;
        }
        Ok(out)
    }

    /// The chain from `first` as runs of sectors (at most `limit` clusters).
    fn extents(&self, first: u32, limit: u64) -> io::Result<Vec<Extent>> {
        let l = &self.l;
        let per = l.cluster / l.sector;
        let mut out: Vec<Extent> = Vec::new();
        for (i, c) in self.chain(first, limit)?.into_iter().enumerate() {
            let physical = (l.data + (c as u64 - 2) * l.cluster) / l.sector;
            match out.last_mut() {
                Some(e) if e.physical + e.len == physical => e.len += per,
                _ => out.push(Extent {
                    logical: i as u64 * per,
                    physical,
                    len: per,
                }),
            }
        }
        Ok(out)
    }

    /// The entry with inode number `ino` (a directory entry's byte offset / 32).
    fn entry(&self, ino: u64) -> io::Result<DirEnt> {
        let at = ino
            .checked_mul(32)
            .filter(|&at| {
                at >= self.l.root_region.0
                    && at < self.l.data + self.l.clusters as u64 * self.l.cluster
            })
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("fat: no inode {ino}"))
            })?;
        let mut b = [0u8; 32];
        self.dev.read_at(at, &mut b)?;
        let e = self.dirent(&b);
        if b[0] == 0 || b[0] == 0xe5 || e.attr == ATTR_LFN || e.attr & ATTR_VOLUME != 0 {
            return Err(corrupt(format!(
                "inode {ino} is not a file or directory entry"
            )));
        }
        Ok(e)
    }

    /// The bytes of directory `ino` and the device offset of each 32-byte slot's start run:
    /// (offset on the device of the run, bytes).
    fn dir_bytes(&self, ino: u64) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let l = &self.l;
        if ino == ROOT && l.kind != FatType::Fat32 {
            let (at, n) = l.root_region;
            let mut b = vec![0u8; n as usize];
            self.dev.read_at(at, &mut b)?;
            return Ok(vec![(at, b)]);
        }
        let first = if ino == ROOT {
            l.root_cluster
        } else {
            let e = self.entry(ino)?;
            if !e.is_dir() {
                return Err(io::ErrorKind::NotADirectory.into());
            }
            e.first
        };
        let limit = MAX_DIR_BYTES / l.cluster;
        let chain = self.chain(first, limit + 1)?;
        if chain.len() as u64 > limit {
            return Err(corrupt(format!(
                "directory {ino} is larger than {MAX_DIR_BYTES} bytes"
            )));
        }
        let mut out = Vec::new();
        for c in chain {
            let at = l.data + (c as u64 - 2) * l.cluster;
            let mut b = vec![0u8; l.cluster as usize];
            self.dev.read_at(at, &mut b)?;
            out.push((at, b));
        }
        Ok(out)
    }

    /// The entries of directory `ino` ("." and ".." left out).
    pub fn list(&self, ino: u64) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut lfn: Vec<(u8, [u16; 13])> = Vec::new();
        let mut lfn_sum = 0u8;
        'blocks: for (at, b) in self.dir_bytes(ino)? {
            for (i, raw) in b.chunks_exact(32).enumerate() {
                match raw[0] {
                    0 => break 'blocks,
                    0xe5 => {
                        lfn.clear();
                        continue;
                    }
                    _ => {}
                }
                if raw[11] == ATTR_LFN {
                    let mut units = [0u16; 13];
                    for (k, off) in [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
                        .iter()
                        .enumerate()
                    {
                        units[k] = le16(raw, *off);
                    }
                    if raw[0] & 0x40 != 0 {
                        lfn.clear();
                        lfn_sum = raw[13];
                    }
                    lfn.push((raw[0] & 0x1f, units));
                    continue;
                }
                let e = self.dirent(raw);
                let long = std::mem::take(&mut lfn);
                if e.attr & ATTR_VOLUME != 0 {
                    continue;
                }
                let name = match long_name(&long, lfn_sum, e.checksum()) {
                    Some(n) => n,
                    None => e.short_name(),
                };
                if name.is_empty()
                    || name == b"."
                    || name == b".."
                    || name.contains(&b'/')
                    || name.contains(&0)
                {
                    continue;
                }
                if out.len() >= MAX_DIR_ENTRIES {
                    return Err(corrupt(format!(
                        "directory {ino} has more than {MAX_DIR_ENTRIES} entries"
                    )));
                }
                out.push(Entry {
                    name,
                    ino: (at + i as u64 * 32) / 32,
                    kind: Some(if e.is_dir() { Kind::Dir } else { Kind::File }),
                });
            }
        }
        Ok(out)
    }
}

/// The long name collected before an 8.3 entry, if complete and its checksum matches.
fn long_name(parts: &[(u8, [u16; 13])], sum: u8, expected: u8) -> Option<Vec<u8>> {
    if parts.is_empty() || sum != expected {
        return None;
    }
    // Stored last part first, numbered from 1 (the first part) up.
    let n = parts.len();
    if parts.iter().enumerate().any(|(i, p)| p.0 as usize != n - i) {
        return None;
    }
    let units: Vec<u16> = parts
        .iter()
        .rev()
        .flat_map(|p| p.1)
        .take_while(|&u| u != 0)
        .collect();
    let s: String = char::decode_utf16(units)
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect();
    Some(s.into_bytes())
}

impl<D: CachedDevice + 'static> FileSystem for Fat<D> {
    fn type_name(&self) -> &'static str {
        "vfat"
    }

    fn subtree_key(&self, ino: u64) -> Option<Vec<u8>> {
        crate::filesystem::root_key(&self.dev, ROOT, ino)
    }

    fn root(&self) -> u64 {
        ROOT
    }

    fn attr(&self, ino: u64) -> io::Result<Attr> {
        named(ino, self.attr_of(ino))
    }

    fn read_dir(&self, ino: u64) -> io::Result<Vec<Entry>> {
        named(ino, self.list(ino))
    }

    fn read_link(&self, _ino: u64) -> io::Result<Vec<u8>> {
        Err(io::ErrorKind::InvalidInput.into())
    }

    fn open(self: Arc<Self>, ino: u64) -> io::Result<Arc<dyn FileData>> {
        named(ino, self.open_file(ino))
    }
}

/// Damage in what concerns inode `ino`, named by it where the message does not already.
fn named<T>(ino: u64, r: io::Result<T>) -> io::Result<T> {
    r.map_err(|e| {
        let m = e.to_string();
        if e.kind() == io::ErrorKind::InvalidData && !m.contains(&format!(" {ino}")) {
            corrupt(format!("inode {ino}: {}", m.trim_start_matches("fat: ")))
        } else {
            e
        }
    })
}

impl<D: CachedDevice + 'static> Fat<D> {
    fn attr_of(&self, ino: u64) -> io::Result<Attr> {
        if ino == ROOT {
            let epoch = UNIX_EPOCH;
            let size = match self.l.kind {
                FatType::Fat32 => {
                    let n = self.chain(self.l.root_cluster, MAX_DIR_BYTES / self.l.cluster + 1)?;
                    n.len() as u64 * self.l.cluster
                }
                _ => self.l.root_region.1,
            };
            return Ok(Attr {
                kind: Kind::Dir,
                perm: 0o755,
                size,
                blocks: size.div_ceil(512),
                nlink: 2,
                uid: 0,
                gid: 0,
                rdev: 0,
                atime: epoch,
                mtime: epoch,
                ctime: epoch,
                crtime: epoch,
            });
        }
        let e = self.entry(ino)?;
        let (kind, size) = if e.is_dir() {
            let n = self
                .chain(e.first, MAX_DIR_BYTES / self.l.cluster + 1)?
                .len() as u64;
            (Kind::Dir, n * self.l.cluster)
        } else {
            (Kind::File, e.size as u64)
        };
        let perm = if e.attr & ATTR_RO != 0 && kind == Kind::File {
            0o555
        } else {
            0o755
        };
        Ok(Attr {
            kind,
            perm,
            size,
            blocks: size.next_multiple_of(self.l.cluster) / 512,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            atime: e.atime,
            mtime: e.mtime,
            ctime: e.mtime,
            crtime: e.ctime,
        })
    }

    fn open_file(self: Arc<Self>, ino: u64) -> io::Result<Arc<dyn FileData>> {
        if ino == ROOT {
            return Err(io::ErrorKind::IsADirectory.into());
        }
        let e = self.entry(ino)?;
        if e.is_dir() {
            return Err(io::ErrorKind::IsADirectory.into());
        }
        let size = e.size as u64;
        let extents = if size == 0 {
            Vec::new()
        } else {
            self.extents(e.first, size.div_ceil(self.l.cluster))
                .map_err(|err| corrupt(format!("inode {ino}: {err}")))?
        };
        let unit = self.l.sector;
        Ok(Arc::new(MappedFile {
            fs: self,
            extents,
            unit,
            size,
        }))
    }
}

impl<D: CachedDevice + 'static> HasDevice for Fat<D> {
    type Device = D;
    fn dev(&self) -> &D {
        &self.dev
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat_times_are_calendar_times() {
        // 2024-02-29 13:45:58.50 (date and time fields as FAT packs them).
        let date = (2024 - 1980) << 9 | 2 << 5 | 29;
        let time = 13 << 11 | 45 << 5 | 29;
        let t = fat_time(date, time, 50);
        let d = t.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(d.as_secs(), 1_709_214_358);
        assert_eq!(d.subsec_millis(), 500);
        // Month 0 and day 0 (common in zeroed fields) clamp instead of panicking.
        assert!(fat_time(0, 0, 255) >= UNIX_EPOCH);
    }

    #[test]
    fn long_names_need_their_checksum_and_order() {
        let mut a = [0u16; 13];
        for (i, c) in "hello.txt".encode_utf16().enumerate() {
            a[i] = c;
        }
        assert_eq!(long_name(&[(1, a)], 7, 7), Some(b"hello.txt".to_vec()));
        assert_eq!(long_name(&[(1, a)], 7, 8), None);
        assert_eq!(long_name(&[(2, a)], 7, 7), None);
    }
}
