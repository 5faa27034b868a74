//! A read-only XFS reader in user space (v4 and v5 file systems), so a mount, `rp ls` or a file
//! restore can show the files of an Amazon Linux or RHEL root volume inside a disk RP without
//! root, a loop device or a kernel module.
//!
//! Model: [`Xfs::open`] reads and validates the primary superblock and keeps its geometry;
//! everything else is read on demand through [`ReadAt`]. An inode number names its allocation
//! group, block and slot directly, so no inode B+tree is read. A fork (data or attributes) is
//! local (bytes in the inode), a list of extents in the inode, or the root of an extent B+tree;
//! all three become a sorted list of [`Extent`]s in file-system blocks, unwritten (preallocated)
//! extents left out so they read as zeros like holes. Directories in short form are parsed from
//! the inode; block, leaf and node directories are read as their data blocks (every block below
//! the 32 GiB leaf offset): the leaf, node and free-index blocks above only speed up lookups.
//! Attributes are short form, one leaf block, or a dabtree whose leaves are all visited; values
//! may be local or in remote blocks. Reflinked files are ordinary extents (shared blocks read
//! the same from every owner).
//!
//! Supported: v4 (directory v2) and v5 (CRC) file systems; inode versions 1–3; big timestamps;
//! 64-bit extent counters; the file-type, sparse-inode, meta-UUID, exchange-range and
//! parent-pointer features. Refused clearly: v1–v3 superblocks, directory v1, a superblock that
//! says it needs `xfs_repair`, unknown incompatible features, and file data on a realtime
//! subvolume (that lives on another device). Checksums are not verified (the structure checks
//! and budgets below are what protect the reader); the log is not replayed, like
//! `mount -o ro,norecovery`.
//!
//! Invariants: nothing is written; every on-disk number is bounds-checked with checked
//! arithmetic, so a damaged or hostile image gives an `InvalidData` error naming the inode,
//! never a panic or an unbounded allocation. Budgets (exceeding one fails that one inode):
//!
//! * a fork's extent map: at most [`MAX_MAP_NODES`] B+tree blocks, each visited once, at most
//!   [`MAX_BTREE_LEVELS`] deep, at most [`MAX_EXTENTS`] extents;
//! * a directory: at most [`MAX_DIR_BYTES`] of data blocks, [`MAX_DIR_ENTRIES`] entries and
//!   [`MAX_DIR_NAME_BYTES`] bytes of names;
//! * attributes: at most [`MAX_ATTR_BLOCKS`] blocks and [`MAX_ATTR_BYTES`] of names and values;
//! * a symlink target: at most 1024 bytes (the format's own limit).

use std::collections::{BTreeSet, HashSet};
use std::io;
use std::sync::Arc;

use crate::ext4::{read_extents_append, Extent, Kind, ReadAt, Time};
use crate::filesystem::{
    Attr, CachedDevice, Entry, FileData, FileSystem, HasDevice, MappedFile, Xattrs,
};

/// B+tree blocks visited to map one fork.
pub const MAX_MAP_NODES: u64 = 1 << 16;
/// Extents kept for one fork (24 bytes each).
pub const MAX_EXTENTS: usize = 1 << 20;
/// Deeper extent B+trees than this are corrupt (real ones stay far below it).
pub const MAX_BTREE_LEVELS: u16 = 10;
/// Directory data-block bytes scanned for one listing.
pub const MAX_DIR_BYTES: u64 = 64 << 20;
/// Entries of one directory listing.
pub const MAX_DIR_ENTRIES: usize = 1 << 20;
/// Bytes of names in one directory listing.
pub const MAX_DIR_NAME_BYTES: usize = 32 << 20;
/// Attribute blocks (tree nodes, leaves and remote values) read for one inode.
pub const MAX_ATTR_BLOCKS: u64 = 1 << 12;
/// Bytes of attribute names and values kept for one inode.
pub const MAX_ATTR_BYTES: usize = 4 << 20;
/// The longest symlink target XFS stores.
const MAX_SYMLINK: u64 = 1024;

const INODE_MAGIC: u16 = 0x494e; // "IN"
const BMAP_MAGIC: u32 = 0x424d_4150; // "BMAP"
const BMAP3_MAGIC: u32 = 0x424d_4133; // "BMA3"
const DIR2_BLOCK_MAGIC: u32 = 0x5844_3242; // "XD2B"
const DIR2_DATA_MAGIC: u32 = 0x5844_3244; // "XD2D"
const DIR3_BLOCK_MAGIC: u32 = 0x5844_4233; // "XDB3"
const DIR3_DATA_MAGIC: u32 = 0x5844_4433; // "XDD3"
const SYMLINK3_MAGIC: u32 = 0x5853_4c4d; // "XSLM"
const ATTR3_RMT_MAGIC: u32 = 0x5841_524d; // "XARM"
const ATTR_LEAF_MAGIC: u16 = 0xfbee;
const ATTR3_LEAF_MAGIC: u16 = 0x3bee;
const DA_NODE_MAGIC: u16 = 0xfebe;
const DA3_NODE_MAGIC: u16 = 0x3ebe;
/// Directory data blocks lie below this byte offset; leaf and free-index blocks above it.
const DIR_LEAF_OFFSET: u64 = 32 << 30;

const FORMAT_DEV: u8 = 0;
const FORMAT_LOCAL: u8 = 1;
const FORMAT_EXTENTS: u8 = 2;
const FORMAT_BTREE: u8 = 3;

/// `di_flags`: the file's data is on the realtime subvolume.
const DIFLAG_REALTIME: u16 = 0x1;
/// `di_flags2`: timestamps are 64-bit nanosecond counts.
const DIFLAG2_BIGTIME: u64 = 1 << 3;
/// `di_flags2`: 64-bit extent counters.
const DIFLAG2_NREXT64: u64 = 1 << 4;

const VERSION_DIRV2: u16 = 0x2000;
const VERSION_MOREBITS: u16 = 0x8000;
const FEATURES2_FTYPE: u32 = 0x200;
const INCOMPAT_FTYPE: u32 = 1 << 0;
const INCOMPAT_NEEDSREPAIR: u32 = 1 << 4;
/// ftype, sparse inodes, meta UUID, big time, 64-bit extent counts, exchange range, parent
/// pointers: none changes what this reader reads (needsrepair is refused on its own).
const INCOMPAT_KNOWN: u32 = 0b1110_1111;

/// Attribute entry flags.
const ATTR_LOCAL: u8 = 0x01;
const ATTR_ROOT: u8 = 0x02;
const ATTR_SECURE: u8 = 0x04;
const ATTR_PARENT: u8 = 0x08;
const ATTR_INCOMPLETE: u8 = 0x80;

/// Why an image could not be read, for the one object concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image contradicts the format (or this reader's understanding of it).
    #[error("xfs: {0}")]
    Corrupt(String),
    /// A valid image this reader does not read.
    #[error("xfs: {0}")]
    Unsupported(String),
    /// Reading the object would take more work or memory than its budget allows.
    #[error("xfs: inode {ino}: more than {limit} {what}")]
    Budget {
        ino: u64,
        what: &'static str,
        limit: u64,
    },
}

impl Error {
    /// The [`Error`] inside an error returned by this module, if it carries one.
    pub fn of(e: &io::Error) -> Option<&Error> {
        e.get_ref()?.downcast_ref()
    }
}

fn corrupt(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, Error::Corrupt(what.to_string()))
}

fn unsupported(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        Error::Unsupported(what.to_string()),
    )
}

fn over_budget(ino: u64, what: &'static str, limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        Error::Budget { ino, what, limit },
    )
}

/// Bounds-checked big-endian reads of an on-disk structure.
#[derive(Clone, Copy)]
struct Be<'a>(&'a [u8]);

impl<'a> Be<'a> {
    fn bytes(self, at: usize, n: usize) -> io::Result<&'a [u8]> {
        at.checked_add(n)
            .and_then(|end| self.0.get(at..end))
            .ok_or_else(|| corrupt(format!("a structure runs past its {} bytes", self.0.len())))
    }
    fn u8(self, at: usize) -> io::Result<u8> {
        Ok(self.bytes(at, 1)?[0])
    }
    fn u16(self, at: usize) -> io::Result<u16> {
        Ok(u16::from_be_bytes(self.bytes(at, 2)?.try_into().unwrap()))
    }
    fn u32(self, at: usize) -> io::Result<u32> {
        Ok(u32::from_be_bytes(self.bytes(at, 4)?.try_into().unwrap()))
    }
    fn u64(self, at: usize) -> io::Result<u64> {
        Ok(u64::from_be_bytes(self.bytes(at, 8)?.try_into().unwrap()))
    }
    /// A big-endian unsigned number of `n` (1..=8) bytes.
    fn uint(self, at: usize, n: usize) -> io::Result<u64> {
        Ok(self
            .bytes(at, n)?
            .iter()
            .fold(0u64, |v, &b| v << 8 | b as u64))
    }
}

#[derive(Debug, Clone)]
struct Super {
    block_size: u64,
    dblocks: u64,
    ag_blocks: u64,
    ag_count: u64,
    ag_blk_log: u8,
    inode_size: u64,
    inop_blog: u8,
    root: u64,
    dir_block: u64,
    v5: bool,
    ftype: bool,
    label: String,
}

/// Which fork of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fork {
    Data,
    Attr,
}

/// One inode's metadata and forks.
#[derive(Debug, Clone)]
pub struct Inode {
    pub ino: u64,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    /// Blocks allocated (data, attributes and B+tree blocks), in file-system blocks.
    pub nblocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    /// Creation time (v5 inodes only).
    pub crtime: Option<Time>,
    pub flags: u16,
    format: u8,
    aformat: u8,
    nextents: u64,
    anextents: u64,
    raw: Vec<u8>,
    /// Byte ranges of the data and attribute forks in `raw`.
    data_fork: (usize, usize),
    attr_fork: Option<(usize, usize)>,
}

impl Inode {
    pub fn kind(&self) -> Option<Kind> {
        Kind::of_mode(self.mode)
    }

    fn fork(&self, which: Fork) -> &[u8] {
        let (start, end) = match which {
            Fork::Data => self.data_fork,
            Fork::Attr => self.attr_fork.unwrap_or((0, 0)),
        };
        &self.raw[start..end]
    }

    /// Device number of a character or block device, in Linux's `dev_t` encoding.
    fn rdev(&self) -> u32 {
        if self.format != FORMAT_DEV {
            return 0;
        }
        let Ok(dev) = Be(self.fork(Fork::Data)).u32(0) else {
            return 0;
        };
        // As the kernel decodes it (xfs_to_linux_dev_t): 9 bits of major, 18 of minor.
        let (major, minor) = ((dev >> 18) & 0x1ff, dev & 0x3_ffff);
        (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
    }
}

/// A read-only XFS file system on `R`.
pub struct Xfs<R> {
    dev: R,
    sb: Super,
}

fn time(b: Be, at: usize, bigtime: bool) -> io::Result<Time> {
    if bigtime {
        // Nanoseconds since 1901-12-13 20:45:52 UTC (the smallest 32-bit time).
        let ns = b.u64(at)?;
        return Ok(Time {
            secs: (ns / 1_000_000_000) as i64 - (1 << 31),
            nanos: (ns % 1_000_000_000) as u32,
        });
    }
    Ok(Time {
        secs: b.u32(at)? as i32 as i64,
        nanos: b.u32(at + 4)?.min(999_999_999),
    })
}

impl<R: ReadAt> Xfs<R> {
    /// Opens the XFS file system on `dev` (`size` bytes). `Ok(None)` when there is no XFS
    /// superblock; an error when there is one this reader cannot trust or read.
    pub fn open(dev: R, size: u64) -> io::Result<Option<Self>> {
        if size < 512 {
            return Ok(None);
        }
        let mut b = [0u8; 512];
        dev.read_at(0, &mut b)?;
        if &b[..4] != b"XFSB" {
            return Ok(None);
        }
        let sb = Self::parse_super(Be(&b), size)?;
        Ok(Some(Xfs { dev, sb }))
    }

    fn parse_super(b: Be, size: u64) -> io::Result<Super> {
        let block_size = b.u32(4)? as u64;
        let dblocks = b.u64(8)?;
        let root = b.u64(56)?;
        let ag_blocks = b.u32(84)? as u64;
        let ag_count = b.u32(88)? as u64;
        let version = b.u16(100)?;
        let sect_size = b.u16(102)? as u64;
        let inode_size = b.u16(104)? as u64;
        let inop_block = b.u16(106)? as u64;
        let label = b.bytes(108, 12)?;
        let (block_log, inode_log, inop_blog, ag_blk_log) =
            (b.u8(120)?, b.u8(122)?, b.u8(123)?, b.u8(124)?);
        let dir_blk_log = b.u8(192)?;
        let features2 = b.u32(200)?;
        let v5 = match version & 0xf {
            4 => false,
            5 => true,
            v => return Err(unsupported(format!("superblock version {v}"))),
        };
        let pow2 = |v: u64, log: u8| v.is_power_of_two() && log < 64 && v == 1 << log;
        let geometry_ok = pow2(block_size, block_log)
            && (512..=65536).contains(&block_size)
            && sect_size.is_power_of_two()
            && (512..=32768).contains(&sect_size)
            && pow2(inode_size, inode_log)
            && (256..=2048).contains(&inode_size)
            && inode_size <= block_size
            && inop_block == block_size / inode_size
            && pow2(inop_block, inop_blog)
            && ag_blocks >= 1
            && ag_count >= 1
            && ag_blocks.next_power_of_two() == 1 << ag_blk_log.min(63)
            && ag_blk_log < 32
            && dblocks > 0
            && dblocks <= ag_count * ag_blocks
            && dblocks > (ag_count - 1) * ag_blocks
            && dir_blk_log <= 16
            && (block_size << dir_blk_log) <= 65536;
        if !geometry_ok {
            return Err(corrupt(format!(
                "superblock geometry is inconsistent (block size {block_size}, inode size \
                 {inode_size}, {ag_count} groups of {ag_blocks} blocks, {dblocks} blocks)"
            )));
        }
        if dblocks.checked_mul(block_size).is_none_or(|n| n > size) {
            return Err(corrupt(format!(
                "{dblocks} blocks of {block_size} bytes do not fit in {size} bytes"
            )));
        }
        let ftype = if v5 {
            let incompat = b.u32(216)?;
            if incompat & INCOMPAT_NEEDSREPAIR != 0 {
                return Err(unsupported("the file system needs xfs_repair"));
            }
            let unknown = incompat & !INCOMPAT_KNOWN & !INCOMPAT_NEEDSREPAIR;
            if unknown != 0 {
                return Err(unsupported(format!(
                    "incompatible features {unknown:#x} are not known"
                )));
            }
            incompat & INCOMPAT_FTYPE != 0
        } else {
            if version & VERSION_DIRV2 == 0 {
                return Err(unsupported("version 1 directories"));
            }
            version & VERSION_MOREBITS != 0 && features2 & FEATURES2_FTYPE != 0
        };
        let label = label.split(|&c| c == 0).next().unwrap_or_default();
        Ok(Super {
            block_size,
            dblocks,
            ag_blocks,
            ag_count,
            ag_blk_log,
            inode_size,
            inop_blog,
            root,
            dir_block: block_size << dir_blk_log,
            v5,
            ftype,
            label: String::from_utf8_lossy(label).into_owned(),
        })
    }

    pub fn block_size(&self) -> u64 {
        self.sb.block_size
    }

    pub fn label(&self) -> &str {
        &self.sb.label
    }

    /// Whether this is a v5 (CRC) file system.
    pub fn is_v5(&self) -> bool {
        self.sb.v5
    }

    pub fn root(&self) -> u64 {
        self.sb.root
    }

    pub fn device(&self) -> &R {
        &self.dev
    }

    /// The linear block number of file-system block `fsb` (allocation group in the high bits),
    /// checked to lie with `len` blocks inside the file system.
    fn linear(&self, fsb: u64, len: u64) -> io::Result<u64> {
        let ag = fsb >> self.sb.ag_blk_log;
        let agbno = fsb & ((1 << self.sb.ag_blk_log) - 1);
        let block = (ag < self.sb.ag_count && agbno < self.sb.ag_blocks)
            .then(|| ag * self.sb.ag_blocks + agbno)
            .filter(|b| b.checked_add(len).is_some_and(|end| end <= self.sb.dblocks))
            .ok_or_else(|| {
                corrupt(format!(
                    "block {fsb:#x} (+{len}) is outside the file system"
                ))
            })?;
        Ok(block)
    }

    fn read_block(&self, linear: u64, n: u64) -> io::Result<Vec<u8>> {
        let len = n * self.sb.block_size;
        let mut b = vec![0u8; len as usize];
        self.dev.read_at(linear * self.sb.block_size, &mut b)?;
        Ok(b)
    }

    /// Reads and parses inode `ino`.
    pub fn inode(&self, ino: u64) -> io::Result<Inode> {
        let mut raw = vec![0u8; self.sb.inode_size as usize];
        self.dev.read_at(self.inode_offset(ino)?, &mut raw)?;
        self.parse_inode(ino, raw)
            .map_err(|e| corrupt(format!("inode {ino}: {}", inner(&e))))
    }

    /// Where inode `ino` is on the device: its number names its allocation group, block and
    /// slot.
    pub fn inode_offset(&self, ino: u64) -> io::Result<u64> {
        let sb = &self.sb;
        let bits = sb.ag_blk_log as u32 + sb.inop_blog as u32;
        let (ag, agino) = (ino >> bits, ino & ((1 << bits) - 1));
        let (agbno, slot) = (agino >> sb.inop_blog, agino & ((1 << sb.inop_blog) - 1));
        let outside = || corrupt(format!("inode {ino} is outside the file system"));
        if ag >= sb.ag_count {
            return Err(outside());
        }
        let block = self
            .linear(ag << sb.ag_blk_log | agbno, 1)
            .map_err(|_| outside())?;
        Ok(block * sb.block_size + slot * sb.inode_size)
    }

    fn parse_inode(&self, ino: u64, raw: Vec<u8>) -> io::Result<Inode> {
        let b = Be(&raw);
        if b.u16(0)? != INODE_MAGIC {
            return Err(corrupt("bad magic"));
        }
        let mode = b.u16(2)?;
        let version = b.u8(4)?;
        let (core, nlink) = match version {
            1 if !self.sb.v5 => (100, b.u16(6)? as u32),
            2 if !self.sb.v5 => (100, b.u32(16)?),
            3 if self.sb.v5 => (176, b.u32(16)?),
            v => return Err(corrupt(format!("inode version {v}"))),
        };
        if version == 3 && b.u64(152)? != ino {
            return Err(corrupt(format!(
                "it says it is inode {} (misplaced)",
                b.u64(152)?
            )));
        }
        let flags2 = if version == 3 { b.u64(120)? } else { 0 };
        let bigtime = flags2 & DIFLAG2_BIGTIME != 0;
        let (nextents, anextents) = if flags2 & DIFLAG2_NREXT64 != 0 {
            (b.u64(24)?, b.u32(76)? as u64)
        } else {
            (b.u32(76)? as u64, b.u16(80)? as u64)
        };
        let size = b.u64(56)?;
        if size > i64::MAX as u64 {
            return Err(corrupt(format!("size {size}")));
        }
        let forkoff = b.u8(82)? as usize * 8;
        let isize = raw.len();
        let lit = isize - core;
        if forkoff > lit {
            return Err(corrupt(format!("attribute fork offset {forkoff}")));
        }
        let data_fork = (core, if forkoff == 0 { isize } else { core + forkoff });
        let attr_fork = (forkoff != 0).then_some((core + forkoff, isize));
        Ok(Inode {
            ino,
            mode,
            uid: b.u32(8)?,
            gid: b.u32(12)?,
            nlink,
            size,
            nblocks: b.u64(64)?,
            atime: time(b, 32, bigtime)?,
            mtime: time(b, 40, bigtime)?,
            ctime: time(b, 48, bigtime)?,
            crtime: if version == 3 {
                Some(time(b, 144, bigtime)?)
            } else {
                None
            },
            flags: b.u16(90)?,
            format: b.u8(5)?,
            aformat: b.u8(83)?,
            nextents,
            anextents,
            data_fork,
            attr_fork,
            raw,
        })
    }

    /// The extents of one fork of `inode` (extents or B+tree format), sorted, non-overlapping,
    /// unwritten extents left out.
    fn extents(&self, inode: &Inode, which: Fork) -> io::Result<Vec<Extent>> {
        let (format, count) = match which {
            Fork::Data => (inode.format, inode.nextents),
            Fork::Attr => (inode.aformat, inode.anextents),
        };
        let fork = Be(inode.fork(which));
        let mut map = Mapper {
            fs: self,
            ino: inode.ino,
            out: Vec::new(),
            visited: HashSet::new(),
        };
        match format {
            FORMAT_EXTENTS => {
                let n = usize::try_from(count)
                    .ok()
                    .filter(|&n| n <= fork.0.len() / 16)
                    .ok_or_else(|| corrupt(format!("{count} extents do not fit in the inode")))?;
                map.records(fork, 0, n)?;
            }
            FORMAT_BTREE => {
                let (level, n) = (fork.u16(0)?, fork.u16(2)? as usize);
                let max = fork.0.len().saturating_sub(4) / 16;
                if level == 0 || level > MAX_BTREE_LEVELS || n == 0 || n > max {
                    return Err(corrupt(format!(
                        "extent B+tree root of level {level} with {n} records"
                    )));
                }
                for i in 0..n {
                    map.node(fork.u64(4 + max * 8 + i * 8)?, level - 1)?;
                }
            }
            FORMAT_LOCAL if count == 0 => {}
            f => return Err(corrupt(format!("fork format {f} has no extents"))),
        }
        let mut out = map.out;
        out.sort_unstable_by_key(|e| e.logical);
        if out
            .windows(2)
            .any(|w| w[0].logical + w[0].len > w[1].logical)
        {
            return Err(corrupt("extents overlap"));
        }
        Ok(out)
    }

    /// Reads `len` bytes at byte `offset` of a fork mapped by `extents` (holes read as zeros).
    fn read_mapped(&self, extents: &[Extent], offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len as usize);
        read_extents_append(
            &self.dev,
            extents,
            self.sb.block_size,
            offset,
            len as usize,
            &mut out,
        )?;
        Ok(out)
    }

    /// The entries of directory `inode` ("." and ".." left out).
    pub fn read_dir(&self, inode: &Inode) -> io::Result<Vec<Entry>> {
        if inode.kind() != Some(Kind::Dir) {
            return Err(io::ErrorKind::NotADirectory.into());
        }
        let mut list = Listing {
            ino: inode.ino,
            out: Vec::new(),
            name_bytes: 0,
        };
        if inode.format == FORMAT_LOCAL {
            self.short_dir(inode, &mut list)?;
            return Ok(list.out);
        }
        let extents = self.extents(inode, Fork::Data)?;
        let (bs, dblk) = (self.sb.block_size, self.sb.dir_block);
        let per = dblk / bs;
        let leaf = DIR_LEAF_OFFSET / bs;
        // The directory blocks that hold data: every one an extent below the leaf offset touches.
        let mut blocks = BTreeSet::new();
        for e in extents.iter().take_while(|e| e.logical < leaf) {
            let last = (e.logical + e.len).min(leaf) - 1;
            for d in e.logical / per..=last / per {
                blocks.insert(d);
                if blocks.len() as u64 * dblk > MAX_DIR_BYTES {
                    return Err(over_budget(inode.ino, "directory bytes", MAX_DIR_BYTES));
                }
            }
        }
        let single = blocks.len() == 1 && inode.size == dblk;
        for d in blocks {
            let b = self.read_mapped(&extents, d * dblk, dblk)?;
            self.dir_block(Be(&b), single, &mut list)
                .map_err(|e| match Error::of(&e) {
                    Some(Error::Corrupt(m)) => {
                        corrupt(format!("directory {} block {d}: {m}", inode.ino))
                    }
                    _ => e,
                })?;
        }
        Ok(list.out)
    }

    fn short_dir(&self, inode: &Inode, list: &mut Listing) -> io::Result<()> {
        let fork = inode.fork(Fork::Data);
        let b = Be(&fork[..(inode.size as usize).min(fork.len())]);
        let (count, wide) = (b.u8(0)?, b.u8(1)? != 0);
        let ino_len = if wide { 8 } else { 4 };
        let mut p = 2 + ino_len;
        for _ in 0..count {
            let n = b.u8(p)? as usize;
            let name = b.bytes(p + 3, n)?;
            p += 3 + n;
            let kind = if self.sb.ftype {
                p += 1;
                ftype(b.u8(p - 1)?)
            } else {
                None
            };
            let ino = b.uint(p, ino_len)?;
            p += ino_len;
            list.push(name, ino, kind)?;
        }
        Ok(())
    }

    /// The entries of one directory data block (or the single block of a block directory).
    fn dir_block(&self, b: Be, single: bool, list: &mut Listing) -> io::Result<()> {
        let magic = b.u32(0)?;
        let (hdr, block) = match (self.sb.v5, magic) {
            (false, DIR2_BLOCK_MAGIC) => (16, true),
            (false, DIR2_DATA_MAGIC) => (16, false),
            (true, DIR3_BLOCK_MAGIC) => (64, true),
            (true, DIR3_DATA_MAGIC) => (64, false),
            _ => return Err(corrupt(format!("bad magic {magic:#x}"))),
        };
        if block && !single {
            return Err(corrupt("a block-form header in a multi-block directory"));
        }
        let len = b.0.len();
        let end = if block {
            // The block's leaf entries and tail (count, stale) sit at its end.
            let count = b.u32(len - 8)? as usize;
            count
                .checked_mul(8)
                .and_then(|n| (len - 8).checked_sub(n))
                .filter(|&e| e >= hdr)
                .ok_or_else(|| corrupt(format!("{count} leaf entries do not fit")))?
        } else {
            len
        };
        let mut p = hdr;
        while p < end {
            if b.u16(p)? == 0xffff {
                let n = b.u16(p + 2)? as usize;
                if n < 8 || !n.is_multiple_of(8) || p + n > end {
                    return Err(corrupt(format!("free space of {n} bytes at {p}")));
                }
                p += n;
                continue;
            }
            let ino = b.u64(p)?;
            let n = b.u8(p + 8)? as usize;
            if n == 0 {
                return Err(corrupt(format!("an empty name at {p}")));
            }
            let name = b.bytes(p + 9, n)?;
            let ft = self.sb.ftype as usize;
            let kind = if ft == 1 {
                ftype(b.u8(p + 9 + n)?)
            } else {
                None
            };
            let size = (9 + n + ft + 2).next_multiple_of(8);
            if p + size > end {
                return Err(corrupt(format!("an entry at {p} runs past the data")));
            }
            p += size;
            if name != b"." && name != b".." {
                list.push(name, ino, kind)?;
            }
        }
        Ok(())
    }

    /// The target of symlink `inode`.
    pub fn read_link(&self, inode: &Inode) -> io::Result<Vec<u8>> {
        if inode.kind() != Some(Kind::Symlink) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let size = inode.size;
        if size == 0 || size > MAX_SYMLINK {
            return Err(corrupt(format!("symlink {} of {size} bytes", inode.ino)));
        }
        if inode.format == FORMAT_LOCAL {
            let fork = inode.fork(Fork::Data);
            return fork
                .get(..size as usize)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| corrupt(format!("symlink {} of {size} bytes", inode.ino)));
        }
        let extents = self.extents(inode, Fork::Data)?;
        let bs = self.sb.block_size;
        if !self.sb.v5 {
            return self.read_mapped(&extents, 0, size);
        }
        // v5: each extent (one buffer to the kernel) starts with a header saying which bytes
        // of the target it holds.
        if extents.len() > 3 {
            // The kernel reads a symlink from at most 3 maps.
            return Err(corrupt(format!(
                "symlink {} in {} extents",
                inode.ino,
                extents.len()
            )));
        }
        let mut out = Vec::new();
        for e in &extents {
            let bytes = e.len * bs;
            if out.len() as u64 >= size || bytes > MAX_SYMLINK + bs {
                return Err(corrupt(format!(
                    "symlink {}: an extent of {} blocks",
                    inode.ino, e.len
                )));
            }
            let b = self.read_mapped(&extents, e.logical * bs, bytes)?;
            let b = Be(&b);
            let (magic, at, n) = (b.u32(0)?, b.u32(4)? as u64, b.u32(8)? as usize);
            if magic != SYMLINK3_MAGIC || at != out.len() as u64 || n == 0 {
                return Err(corrupt(format!(
                    "symlink {}: the header at block {}",
                    inode.ino, e.logical
                )));
            }
            out.extend_from_slice(b.bytes(56, n)?);
        }
        if out.len() as u64 != size {
            return Err(corrupt(format!(
                "symlink {} holds {} bytes",
                inode.ino,
                out.len()
            )));
        }
        Ok(out)
    }

    /// The extended attributes of `inode`, named as Linux shows them (`user.`, `trusted.`,
    /// `security.`; XFS's own ACL attributes as `system.posix_acl_access`/`_default`).
    pub fn xattrs(&self, inode: &Inode) -> io::Result<Xattrs> {
        let mut attrs = Attrs {
            ino: inode.ino,
            out: Vec::new(),
            bytes: 0,
            blocks: 0,
        };
        if inode.attr_fork.is_none() {
            return Ok(Vec::new());
        }
        match inode.aformat {
            FORMAT_LOCAL => {
                let b = Be(inode.fork(Fork::Attr));
                let total = (b.u16(0)? as usize).min(b.0.len());
                let b = Be(&b.0[..total]);
                let mut p = 4;
                for _ in 0..b.u8(2)? {
                    let (n, v, flags) = (b.u8(p)? as usize, b.u8(p + 1)? as usize, b.u8(p + 2)?);
                    let name = b.bytes(p + 3, n)?;
                    let value = b.bytes(p + 3 + n, v)?;
                    attrs.push(flags, name, value.to_vec())?;
                    p += 3 + n + v;
                }
            }
            FORMAT_EXTENTS | FORMAT_BTREE => {
                let extents = self.extents(inode, Fork::Attr)?;
                if extents.is_empty() {
                    return Ok(Vec::new()); // An attribute fork whose last attribute went.
                }
                let mut seen = HashSet::new();
                self.attr_block(&extents, 0, 0, &mut seen, &mut attrs)?;
            }
            f => {
                return Err(corrupt(format!(
                    "inode {}: attribute fork format {f}",
                    inode.ino
                )))
            }
        }
        Ok(attrs.out)
    }

    /// Visits attribute block `blk` (a tree node or a leaf) and everything under it.
    fn attr_block(
        &self,
        extents: &[Extent],
        blk: u64,
        depth: u16,
        seen: &mut HashSet<u64>,
        attrs: &mut Attrs,
    ) -> io::Result<()> {
        if !seen.insert(blk) || depth > MAX_BTREE_LEVELS {
            return Err(corrupt(format!(
                "inode {}: attribute tree loops",
                attrs.ino
            )));
        }
        attrs.count_block()?;
        let bs = self.sb.block_size;
        let b = self.read_mapped(extents, blk * bs, bs)?;
        let b = Be(&b);
        let (v5, magic) = (self.sb.v5, b.u16(8)?);
        match (v5, magic) {
            (false, DA_NODE_MAGIC) | (true, DA3_NODE_MAGIC) => {
                let hdr = if v5 { 64 } else { 16 };
                let count = b.u16(if v5 { 56 } else { 12 })? as usize;
                for i in 0..count {
                    let child = b.u32(hdr + i * 8 + 4)? as u64;
                    self.attr_block(extents, child, depth + 1, seen, attrs)?;
                }
                Ok(())
            }
            (false, ATTR_LEAF_MAGIC) | (true, ATTR3_LEAF_MAGIC) => {
                self.attr_leaf(extents, b, if v5 { 80 } else { 32 }, attrs)
            }
            _ => Err(corrupt(format!(
                "inode {}: attribute block {blk} has magic {magic:#x}",
                attrs.ino
            ))),
        }
    }

    fn attr_leaf(
        &self,
        extents: &[Extent],
        b: Be,
        hdr: usize,
        attrs: &mut Attrs,
    ) -> io::Result<()> {
        let count = b.u16(hdr - if self.sb.v5 { 24 } else { 20 })? as usize;
        for i in 0..count {
            let e = hdr + i * 8;
            let (at, flags) = (b.u16(e + 4)? as usize, b.u8(e + 6)?);
            if flags & ATTR_INCOMPLETE != 0 {
                continue;
            }
            if flags & ATTR_LOCAL != 0 {
                let (v, n) = (b.u16(at)? as usize, b.u8(at + 2)? as usize);
                let name = b.bytes(at + 3, n)?;
                attrs.push(flags, name, b.bytes(at + 3 + n, v)?.to_vec())?;
            } else {
                let (blk, v, n) = (
                    b.u32(at)? as u64,
                    b.u32(at + 4)? as usize,
                    b.u8(at + 8)? as usize,
                );
                let name = b.bytes(at + 9, n)?;
                if v > MAX_ATTR_BYTES {
                    return Err(over_budget(
                        attrs.ino,
                        "bytes of attributes",
                        MAX_ATTR_BYTES as u64,
                    ));
                }
                let value = self.remote_value(extents, blk, v, attrs)?;
                attrs.push(flags, name, value)?;
            }
        }
        Ok(())
    }

    /// A value stored in attribute blocks from `blk` on.
    fn remote_value(
        &self,
        extents: &[Extent],
        blk: u64,
        len: usize,
        attrs: &mut Attrs,
    ) -> io::Result<Vec<u8>> {
        let bs = self.sb.block_size;
        if !self.sb.v5 {
            let blocks = (len as u64).div_ceil(bs);
            for _ in 0..blocks {
                attrs.count_block()?;
            }
            return self.read_mapped(extents, blk * bs, len as u64);
        }
        let mut out = Vec::with_capacity(len);
        let mut at = blk;
        while out.len() < len {
            attrs.count_block()?;
            let b = self.read_mapped(extents, at * bs, bs)?;
            let b = Be(&b);
            let (magic, off, n) = (b.u32(0)?, b.u32(4)? as usize, b.u32(8)? as usize);
            if magic != ATTR3_RMT_MAGIC || off != out.len() || n == 0 || out.len() + n > len {
                return Err(corrupt(format!(
                    "inode {}: remote attribute block {at}",
                    attrs.ino
                )));
            }
            out.extend_from_slice(b.bytes(56, n)?);
            at += 1;
        }
        Ok(out)
    }
}

/// An entry type from a directory's file-type byte.
fn ftype(t: u8) -> Option<Kind> {
    Some(match t {
        1 => Kind::File,
        2 => Kind::Dir,
        3 => Kind::CharDevice,
        4 => Kind::BlockDevice,
        5 => Kind::Fifo,
        6 => Kind::Socket,
        7 => Kind::Symlink,
        _ => return None,
    })
}

/// The message of an error without this module's "xfs: " prefix (for re-wrapping with context).
fn inner(e: &io::Error) -> String {
    match Error::of(e) {
        Some(Error::Corrupt(m)) => m.clone(),
        _ => e.to_string(),
    }
}

/// A fork's extent map being collected, with its budgets.
struct Mapper<'a, R> {
    fs: &'a Xfs<R>,
    ino: u64,
    out: Vec<Extent>,
    visited: HashSet<u64>,
}

impl<R: ReadAt> Mapper<'_, R> {
    /// `n` packed extent records from byte `at` of `b`.
    fn records(&mut self, b: Be, at: usize, n: usize) -> io::Result<()> {
        for i in 0..n {
            let (hi, lo) = (b.u64(at + i * 16)?, b.u64(at + i * 16 + 8)?);
            let unwritten = hi >> 63 != 0;
            let logical = (hi & (u64::MAX >> 1)) >> 9;
            let start = (hi & 0x1ff) << 43 | lo >> 21;
            let len = lo & 0x1f_ffff;
            if len == 0 {
                return Err(corrupt(format!("inode {}: an empty extent", self.ino)));
            }
            let physical = self.fs.linear(start, len)?;
            // Byte offsets of the extent's end must fit in a file size (2^63).
            if (logical + len)
                .checked_mul(self.fs.sb.block_size)
                .is_none_or(|end| end > i64::MAX as u64)
            {
                return Err(corrupt(format!(
                    "inode {}: an extent at block {logical}",
                    self.ino
                )));
            }
            if unwritten {
                continue;
            }
            if self.out.len() >= MAX_EXTENTS {
                return Err(over_budget(self.ino, "extents", MAX_EXTENTS as u64));
            }
            self.out.push(Extent {
                logical,
                physical,
                len,
            });
        }
        Ok(())
    }

    /// B+tree block `fsb`, which must be at `level`.
    fn node(&mut self, fsb: u64, level: u16) -> io::Result<()> {
        if self.visited.len() as u64 >= MAX_MAP_NODES {
            return Err(over_budget(self.ino, "extent B+tree blocks", MAX_MAP_NODES));
        }
        if !self.visited.insert(fsb) {
            return Err(corrupt(format!(
                "inode {}: B+tree block {fsb:#x} is reached twice",
                self.ino
            )));
        }
        let block = self.fs.linear(fsb, 1)?;
        let raw = self.fs.read_block(block, 1)?;
        let b = Be(&raw);
        let (hdr, magic) = if self.fs.sb.v5 {
            (72, BMAP3_MAGIC)
        } else {
            (24, BMAP_MAGIC)
        };
        let (m, lvl, n) = (b.u32(0)?, b.u16(4)?, b.u16(6)? as usize);
        let max = (raw.len() - hdr) / 16;
        if m != magic || lvl != level || n == 0 || n > max {
            return Err(corrupt(format!(
                "inode {}: B+tree block {fsb:#x} (magic {m:#x}, level {lvl}, {n} records)",
                self.ino
            )));
        }
        if level == 0 {
            return self.records(b, hdr, n);
        }
        for i in 0..n {
            self.node(b.u64(hdr + max * 8 + i * 8)?, level - 1)?;
        }
        Ok(())
    }
}

/// A directory listing being collected, with its budgets.
struct Listing {
    ino: u64,
    out: Vec<Entry>,
    name_bytes: usize,
}

impl Listing {
    fn push(&mut self, name: &[u8], ino: u64, kind: Option<Kind>) -> io::Result<()> {
        if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
            return Err(corrupt(format!("directory {}: an invalid name", self.ino)));
        }
        if name == b"." || name == b".." {
            return Ok(()); // Never listed, whatever a damaged directory holds.
        }
        if self.out.len() >= MAX_DIR_ENTRIES {
            return Err(over_budget(
                self.ino,
                "directory entries",
                MAX_DIR_ENTRIES as u64,
            ));
        }
        self.name_bytes += name.len();
        if self.name_bytes > MAX_DIR_NAME_BYTES {
            return Err(over_budget(
                self.ino,
                "bytes of directory entry names",
                MAX_DIR_NAME_BYTES as u64,
            ));
        }
        self.out.push(Entry {
            name: name.to_vec(),
            ino,
            kind,
        });
        Ok(())
    }
}

/// Attributes being collected, with their budgets.
struct Attrs {
    ino: u64,
    out: Xattrs,
    bytes: usize,
    blocks: u64,
}

impl Attrs {
    fn count_block(&mut self) -> io::Result<()> {
        self.blocks += 1;
        if self.blocks > MAX_ATTR_BLOCKS {
            return Err(over_budget(self.ino, "attribute blocks", MAX_ATTR_BLOCKS));
        }
        Ok(())
    }

    fn push(&mut self, flags: u8, name: &[u8], value: Vec<u8>) -> io::Result<()> {
        if flags & ATTR_PARENT != 0 {
            return Ok(()); // Parent pointers are the file system's own bookkeeping.
        }
        if name.is_empty()
            || name.contains(&0)
            || flags & ATTR_ROOT != 0 && flags & ATTR_SECURE != 0
        {
            return Err(corrupt(format!(
                "inode {}: an invalid attribute name",
                self.ino
            )));
        }
        // Each attribute costs its name, its value and a fixed overhead, so many empty ones
        // cannot outgrow the budget either.
        self.bytes += name.len() + value.len() + 32;
        if self.bytes > MAX_ATTR_BYTES {
            return Err(over_budget(
                self.ino,
                "bytes of attributes",
                MAX_ATTR_BYTES as u64,
            ));
        }
        // XFS keeps ACLs as trusted attributes in its own format; Linux shows them both as
        // those and as the POSIX ACL attributes.
        let posix = match (flags & (ATTR_ROOT | ATTR_SECURE), name) {
            (ATTR_ROOT, b"SGI_ACL_FILE") => Some(&b"system.posix_acl_access"[..]),
            (ATTR_ROOT, b"SGI_ACL_DEFAULT") => Some(&b"system.posix_acl_default"[..]),
            _ => None,
        };
        // A malformed ACL is left out (as the kernel fails to read it); the rest still shows.
        if let Some(acl) = posix.and_then(|p| Some((p.to_vec(), acl(&value).ok()?))) {
            self.out.push(acl);
        }
        let (full, value) = match (flags & (ATTR_ROOT | ATTR_SECURE), name) {
            (ATTR_ROOT, _) => ([b"trusted.", name].concat(), value),
            (ATTR_SECURE, _) => ([b"security.", name].concat(), value),
            _ => ([b"user.", name].concat(), value),
        };
        self.out.push((full, value));
        Ok(())
    }
}

/// An XFS ACL (big-endian count, then tag, id, permissions) in Linux's xattr form (version 2,
/// little-endian tag, permissions, id).
fn acl(v: &[u8]) -> io::Result<Vec<u8>> {
    let b = Be(v);
    let n = b.u32(0)? as usize;
    if n.checked_mul(12).and_then(|x| x.checked_add(4)) != Some(v.len()) {
        return Err(corrupt(format!(
            "an ACL of {n} entries in {} bytes",
            v.len()
        )));
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    for i in 0..n {
        let e = 4 + i * 12;
        let (tag, id, perm) = (b.u32(e)?, b.u32(e + 4)?, b.u16(e + 8)?);
        out.extend_from_slice(&(tag as u16).to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Ok(out)
}

impl<D: CachedDevice + 'static> FileSystem for Xfs<D> {
    fn type_name(&self) -> &'static str {
        "xfs"
    }

    fn subtree_key(&self, ino: u64) -> Option<Vec<u8>> {
        crate::filesystem::root_key(&self.dev, self.sb.root, ino)
    }

    fn root(&self) -> u64 {
        self.sb.root
    }

    fn attr(&self, ino: u64) -> io::Result<Attr> {
        let i = self.inode(ino)?;
        let kind = i
            .kind()
            .ok_or_else(|| corrupt(format!("inode {ino} has no known file type")))?;
        Ok(Attr {
            kind,
            perm: i.mode & 0o7777,
            size: i.size,
            blocks: i.nblocks.saturating_mul(self.sb.block_size / 512),
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: i.rdev(),
            atime: i.atime.to_system(),
            mtime: i.mtime.to_system(),
            ctime: i.ctime.to_system(),
            crtime: i.crtime.unwrap_or(i.ctime).to_system(),
        })
    }

    fn read_dir(&self, ino: u64) -> io::Result<Vec<Entry>> {
        named(ino, Xfs::read_dir(self, &self.inode(ino)?))
    }

    fn read_link(&self, ino: u64) -> io::Result<Vec<u8>> {
        named(ino, Xfs::read_link(self, &self.inode(ino)?))
    }

    fn xattrs(&self, ino: u64) -> io::Result<Xattrs> {
        named(ino, Xfs::xattrs(self, &self.inode(ino)?))
    }

    fn open(self: Arc<Self>, ino: u64) -> io::Result<Arc<dyn FileData>> {
        let inode = self.inode(ino)?;
        if inode.kind() != Some(Kind::File) {
            return Err(io::ErrorKind::IsADirectory.into());
        }
        if inode.flags & DIFLAG_REALTIME != 0 {
            return Err(unsupported(format!(
                "inode {ino}: its data is on the realtime subvolume, which elastio does not read"
            )));
        }
        let extents = match inode.format {
            FORMAT_EXTENTS | FORMAT_BTREE => named(ino, self.extents(&inode, Fork::Data))?,
            f => {
                return Err(corrupt(format!(
                    "inode {ino}: a regular file in fork format {f}"
                )))
            }
        };
        let unit = self.sb.block_size;
        Ok(Arc::new(MappedFile {
            fs: self,
            extents,
            unit,
            size: inode.size,
        }))
    }
}

/// A damage report of inode `ino`, named by it where the message does not already say which
/// object it concerns.
fn named<T>(ino: u64, r: io::Result<T>) -> io::Result<T> {
    r.map_err(|e| match Error::of(&e) {
        Some(Error::Corrupt(m))
            if !["inode ", "directory ", "symlink "]
                .iter()
                .any(|p| m.starts_with(p)) =>
        {
            corrupt(format!("inode {ino}: {m}"))
        }
        _ => e,
    })
}

impl<D: CachedDevice + 'static> HasDevice for Xfs<D> {
    type Device = D;
    fn dev(&self) -> &D {
        &self.dev
    }
}
