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

/// `sb_versionnum`: log records are version 2 (always so on v5).
const VERSION_LOGV2: u16 = 0x0400;
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
    /// Bytes per sector (`sb_sectsize`). The superblock, AGF, AGI and AGFL each take one
    /// sector at the start of every allocation group.
    sect_size: u64,
    /// File-system block where the internal log starts (`sb_logstart`); 0 for an external log.
    log_start: u64,
    /// The log's length in file-system blocks (`sb_logblocks`).
    log_blocks: u64,
    /// Log records are version 2 (v5, or the v4 LOGV2 version bit).
    log_v2: bool,
    /// `sb_features_log_incompat` (v5; 0 on v4). The kernel sets these bits while the log may
    /// hold items that older kernels cannot replay, and clears them when it quiesces the log
    /// to unmount.
    log_incompat: u32,
    /// `sb_uuid`, which every log record header repeats.
    uuid: [u8; 16],
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
        let uuid: [u8; 16] = b.bytes(32, 16)?.try_into().expect("16 bytes");
        let log_start = b.u64(48)?;
        let log_blocks = b.u32(96)? as u64;
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
        let log_v2 = v5 || version & VERSION_LOGV2 != 0;
        let log_incompat = if v5 { b.u32(220)? } else { 0 };
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
            sect_size,
            log_start,
            log_blocks,
            log_v2,
            log_incompat,
            uuid,
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

/// `agf_magicnum`.
const AGF_MAGIC: u32 = 0x5841_4746; // "XAGF"
/// `agf_versionnum`.
const AGF_VERSION: u32 = 1;
/// Blocks of the free-space B+tree by block number (bnobt), v4 and v5.
const ABTB_MAGIC: u32 = 0x4142_5442; // "ABTB"
const AB3B_MAGIC: u32 = 0x4142_3342; // "AB3B"
/// Header of a short-form (per-group) B+tree block: magic, level, record count and siblings.
/// v5 adds the block's own address, LSN, UUID, owning group and CRC.
const SHORT_BLOCK_LEN: usize = 16;
const SHORT_BLOCK_CRC_LEN: usize = 56;
/// Per-group B+trees deeper than this are corrupt. This is the kernel's old static bound;
/// the deepest free-space tree possible (2^31 blocks of 512 bytes) needs 7 levels.
const MAX_AG_BTREE_LEVELS: u32 = 9;
/// Free-space B+tree blocks that one [`Xfs::free_extents`] call reads, each at most once.
pub const MAX_FREE_NODES: u64 = 1 << 20;
/// Free ranges returned at most, whatever the caller asks (16 bytes each).
pub const MAX_FREE_RANGES: usize = 1 << 20;

/// The log's unit: basic blocks of 512 bytes.
const BB: u64 = 512;
/// A log record header block starts with this instead of a cycle number.
const LOG_HEADER_MAGIC: u32 = 0xfeed_babe;
const LOG_VERSION_1: u32 = 1;
const LOG_VERSION_2: u32 = 2;
/// The data bytes covered by the first words saved in one record header block (64 basic
/// blocks).
const LOG_CYCLE_SIZE: u64 = 32 << 10;
/// The largest log record (one in-core log buffer).
const LOG_MAX_RECORD: u64 = 256 << 10;
/// `struct xlog_op_header`: tid, len, clientid, flags, reserved.
const LOG_OP_HEADER: u64 = 12;
/// `oh_flags`: this operation is an unmount record.
const LOG_UNMOUNT_TRANS: u8 = 0x20;
/// Basic blocks checked on each side of the head. At most eight in-core logs of 256 KiB can
/// be in flight, so a crash leaves torn writes only within these 2 MiB.
const LOG_WINDOW: u64 = 8 * LOG_MAX_RECORD / BB;

impl<R: ReadAt> Xfs<R> {
    /// The data device's free space from each allocation group's free-space B+tree by block
    /// number, as sorted, disjoint byte ranges `[start, end)` from the start of the device.
    /// At most `max_ranges` are returned, and never more than [`MAX_FREE_RANGES`].
    ///
    /// The trees are the whole truth only when [`Xfs::log_is_clean`]: a dirty log may hold
    /// transactions that allocated blocks which the on-disk trees still show free. When the
    /// budget is exceeded, the minimum range length doubles (starting from one block) until
    /// few enough ranges remain. Dropping a free range is always safe, because the caller then
    /// reads it.
    ///
    /// Checks (any failure is an error naming the group): each AGF's magic, version, group
    /// number and length; the tree's depth (1 to 9 levels); each tree block's magic, its level
    /// (one less per step down), its record count within the block's capacity and, on v5, its
    /// own address and owning group. Records must be non-empty, lie inside the group after its
    /// headers, ascend and not overlap, and add up to `agf_freeblks`. No returned range may
    /// cover a block of these trees, a by-size tree root or the internal log.
    ///
    /// Budgets: at most [`MAX_FREE_NODES`] tree blocks, each read once, and their block numbers
    /// kept (8 bytes each, plus set overhead). The ranges in memory never exceed
    /// max(2 × the budget, 1024).
    pub fn free_extents(&self, max_ranges: usize) -> io::Result<Vec<(u64, u64)>> {
        let sb = &self.sb;
        let log = match sb.log_start {
            0 => None,
            fsb => {
                let first = self.linear(fsb, sb.log_blocks)?;
                Some((first, first + sb.log_blocks))
            }
        };
        let mut walk = FreeWalk {
            fs: self,
            log,
            keep: max_ranges.min(MAX_FREE_RANGES),
            min_len: sb.block_size,
            out: Vec::new(),
            nodes: BTreeSet::new(),
            ag: 0,
            first: 0,
            len: 0,
            headers: 0,
            next: 0,
            blocks: 0,
            cnt_root: 0,
        };
        for ag in 0..sb.ag_count {
            walk.group(ag).map_err(|e| in_group(ag, e))?;
        }
        walk.trim();
        // A free range must not hold a block of the trees that describe it. Dropped ranges
        // are not checked: they will be read anyway.
        let bs = sb.block_size;
        for &(start, end) in &walk.out {
            if let Some(node) = walk.nodes.range(start / bs..end / bs).next() {
                return Err(corrupt(format!(
                    "free space at byte {start} covers its own B+tree block {node}"
                )));
            }
        }
        Ok(walk.out)
    }

    /// Whether the internal log ends with an unmount record. If it does, nothing in the log
    /// awaits replay, and the on-disk metadata (above all the free-space B+trees) is the whole
    /// truth. `Ok(false)` means "not known clean", which is always the safe answer. An external
    /// log is refused as unsupported. Log geometry in the superblock that lies outside the file
    /// system is an error, because that is superblock damage. I/O errors pass through.
    ///
    /// The method follows the kernel's head and tail search, simplified and stricter, because
    /// any doubt answers `false`:
    ///
    /// * v5 log-incompatible feature bits set: `false`. A clean unmount clears them.
    /// * Each 512-byte basic block starts with the cycle (pass) number that wrote it. A record
    ///   header block instead starts with 0xFEEDBABE and has its cycle at byte 4. Block 0
    ///   holds the current cycle. A cycle of 0 means the log was never written: `false`.
    /// * If the last block's cycle equals block 0's, the head is at the physical end. If it
    ///   is one less, or 0 (first pass), a binary search (O(log n) one-sector reads) finds
    ///   the first block of that older cycle. Any other cycle answers `false`.
    /// * The window of `LOG_WINDOW` blocks on each side of the head (2 MiB each, wrapping)
    ///   must be exactly the current cycle before the head and the older cycle after it. A
    ///   clean unmount waits for every log write to finish, so torn writes (the mixed cycles a
    ///   crash leaves) mean `false`.
    /// * The last record header before the head, found within that window, must have the
    ///   log's record version, an LSN naming its own cycle and block, this file system's UUID
    ///   (or none, as IRIX wrote), one operation, and a length that ends the record exactly at
    ///   the head. The first word of its first data block must carry the record's cycle. Once
    ///   that word is restored from `h_cycle_data[0]`, the operation header must fit the record
    ///   and have XLOG_UNMOUNT_TRANS set.
    ///
    /// Reads: two sectors, the binary search, and one window of at most 4 MiB.
    pub fn log_is_clean(&self) -> io::Result<bool> {
        let sb = &self.sb;
        if sb.log_start == 0 {
            return Err(unsupported("an external log"));
        }
        if sb.log_blocks == 0 {
            return Err(corrupt("the internal log has no blocks"));
        }
        let first = self.linear(sb.log_start, sb.log_blocks)?;
        if sb.log_incompat != 0 {
            return Ok(false);
        }
        // Both fit: the log lies inside the file system, whose bytes fit in the device size.
        let log = LogRing {
            dev: &self.dev,
            start: first * sb.block_size,
            n: sb.log_blocks * (sb.block_size / BB),
        };
        let n = log.n;

        // The head: the block the next write would go to (n when the whole log has one cycle).
        let current = log.cycle(0)?;
        if current == 0 {
            return Ok(false);
        }
        let last = log.cycle(n - 1)?;
        let (head, older) = if last == current {
            (n, current)
        } else if last == current - 1 || last == 0 {
            // Invariant: block `lo` has the current cycle and block `hi` does not.
            let (mut lo, mut hi) = (0, n - 1);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if log.cycle(mid)? == current {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            (hi, last)
        } else {
            return Ok(false);
        };
        let head_at = head % n;

        // The window around the head: the current cycle before it, the older one after it.
        let span = (2 * LOG_WINDOW).min(n);
        let from = if span == n {
            0
        } else {
            (head_at + n - LOG_WINDOW) % n
        };
        let win = LogWindow {
            buf: log.read(from, span)?,
            from,
            n,
        };
        for i in 0..span {
            let b = (from + i) % n;
            let want = if head == n || b < head {
                current
            } else {
                older
            };
            if cycle_of(win.block(b))? != want {
                return Ok(false);
            }
        }

        // The last record header before the head. Data blocks never start with the magic: the
        // cycle stamp replaces their first word, and cycles skip the magic value.
        let before = if span == n { n } else { LOG_WINDOW };
        let found = (1..=before)
            .map(|dist| (dist, (head_at + n - dist) % n))
            .find(|&(_, b)| Be(win.block(b)).u32(0).ok() == Some(LOG_HEADER_MAGIC));
        let Some((dist, rec)) = found else {
            return Ok(false);
        };
        let h = Be(win.block(rec));
        let cycle = h.u32(4)?;
        let version = h.u32(8)?;
        let len = h.u32(12)? as u64;
        let lsn = h.u64(16)?;
        let ops = h.u32(40)?;
        let saved = h.u32(44)?; // h_cycle_data[0]: the first data block's own first word
        let uuid = h.bytes(304, 16)?;
        let size = h.u32(320)? as u64;
        let want_version = if sb.log_v2 {
            LOG_VERSION_2
        } else {
            LOG_VERSION_1
        };
        if version != want_version
            || lsn >> 32 != cycle as u64
            || lsn & 0xffff_ffff != rec
            || (uuid != sb.uuid && uuid.iter().any(|&c| c != 0))
        {
            return Ok(false);
        }
        // Header blocks: one, or one per 32 KiB of in-core log on v2 logs with larger buffers.
        let hblks = if version == LOG_VERSION_2 && size > LOG_CYCLE_SIZE {
            if size > LOG_MAX_RECORD {
                return Ok(false);
            }
            size.div_ceil(LOG_CYCLE_SIZE)
        } else {
            1
        };
        if !(LOG_OP_HEADER..=LOG_MAX_RECORD).contains(&len) {
            return Ok(false);
        }
        let data = len.div_ceil(BB);
        if data > hblks * (LOG_CYCLE_SIZE / BB) || dist != hblks + data || ops != 1 {
            return Ok(false);
        }
        // The first data block: stamped with the record's cycle (one more where the record
        // wrapped past the log's end). Its own first word (oh_tid) is restored from the header.
        let raw = Be(win.block((rec + hblks) % n));
        let stamp = if rec + hblks >= n {
            next_cycle(cycle)
        } else {
            cycle
        };
        if raw.u32(0)? != stamp {
            return Ok(false);
        }
        let mut op = [0u8; LOG_OP_HEADER as usize];
        op.copy_from_slice(raw.bytes(0, LOG_OP_HEADER as usize)?);
        op[..4].copy_from_slice(&saved.to_be_bytes());
        let op = Be(&op);
        let (op_len, flags) = (op.u32(4)? as u64, op.u8(9)?);
        Ok(op_len + LOG_OP_HEADER <= len && flags & LOG_UNMOUNT_TRANS != 0)
    }
}

/// `e` with the allocation group named, if it is this module's own damage report.
fn in_group(ag: u64, e: io::Error) -> io::Error {
    if let Some(Error::Corrupt(m)) = Error::of(&e) {
        return corrupt(format!("allocation group {ag}: {m}"));
    }
    e
}

/// The free space being collected from the groups' free-space B+trees, with its budgets.
struct FreeWalk<'a, R> {
    fs: &'a Xfs<R>,
    /// The internal log's linear blocks `[start, end)`, which no free range may touch.
    log: Option<(u64, u64)>,
    /// At most this many ranges are returned. Past that, only ranges of `min_len` bytes or
    /// more are kept (it doubles from one block).
    keep: usize,
    min_len: u64,
    out: Vec<(u64, u64)>,
    /// Linear numbers of the tree blocks read: each read once, and none may be free.
    nodes: BTreeSet<u64>,
    /// The group being walked: its number, first linear block and length in blocks.
    ag: u64,
    first: u64,
    len: u64,
    /// Group blocks taken by the superblock, AGF, AGI and AGFL sectors.
    headers: u64,
    /// The next record must start here or later (ascending, disjoint, past the headers).
    next: u64,
    /// Free blocks counted in this group, for `agf_freeblks`.
    blocks: u64,
    /// The root of the group's by-size free-space tree, which cannot itself be free.
    cnt_root: u64,
}

impl<R: ReadAt> FreeWalk<'_, R> {
    /// Group `ag`: its AGF, then its by-block-number tree.
    fn group(&mut self, ag: u64) -> io::Result<()> {
        let fs = self.fs;
        let sb = &fs.sb;
        // parse_super ensures (ag_count - 1) * ag_blocks < dblocks <= ag_count * ag_blocks.
        let first = ag * sb.ag_blocks;
        let len = sb
            .dblocks
            .checked_sub(first)
            .ok_or_else(|| corrupt("the group starts past the file system"))?
            .min(sb.ag_blocks);
        // The AGF is the group's second sector. `end` fits: dblocks * block_size <= size.
        let end = (first + len) * sb.block_size;
        let at = first
            .checked_mul(sb.block_size)
            .and_then(|b| b.checked_add(sb.sect_size))
            .filter(|&a| a.checked_add(BB).is_some_and(|e| e <= end))
            .ok_or_else(|| corrupt(format!("{len} blocks cannot hold the group's headers")))?;
        let mut raw = [0u8; BB as usize];
        fs.dev.read_at(at, &mut raw)?;
        let b = Be(&raw);
        let (magic, version) = (b.u32(0)?, b.u32(4)?);
        let (seqno, length) = (b.u32(8)? as u64, b.u32(12)? as u64);
        if magic != AGF_MAGIC || version != AGF_VERSION || seqno != ag || length != len {
            return Err(corrupt(format!(
                "AGF of magic {magic:#x}, version {version}, group {seqno} and {length} blocks \
                 ({len} expected)"
            )));
        }
        let (root, cnt_root) = (b.u32(16)? as u64, b.u32(20)? as u64);
        let (levels, freeblks) = (b.u32(28)?, b.u32(52)? as u64);
        if levels == 0 || levels > MAX_AG_BTREE_LEVELS || freeblks > len {
            return Err(corrupt(format!(
                "AGF with a free-space B+tree of {levels} levels and {freeblks} free blocks"
            )));
        }
        let headers = (4 * sb.sect_size).div_ceil(sb.block_size);
        (self.ag, self.first, self.len, self.headers) = (ag, first, len, headers);
        (self.next, self.blocks, self.cnt_root) = (headers, 0, cnt_root);
        self.node(root, levels - 1, true)?;
        if self.blocks != freeblks {
            return Err(corrupt(format!(
                "the free-space B+tree holds {} free blocks, the AGF says {freeblks}",
                self.blocks
            )));
        }
        Ok(())
    }

    /// Tree block `agbno` of the group, which must be at `level` (0: a leaf).
    fn node(&mut self, agbno: u64, level: u32, root: bool) -> io::Result<()> {
        let fs = self.fs;
        let sb = &fs.sb;
        if agbno < self.headers || agbno >= self.len {
            return Err(corrupt(format!(
                "free-space B+tree block {agbno} is outside the group"
            )));
        }
        let linear = fs.linear(self.ag << sb.ag_blk_log | agbno, 1)?;
        if self.nodes.len() as u64 >= MAX_FREE_NODES {
            return Err(corrupt(format!(
                "more than {MAX_FREE_NODES} free-space B+tree blocks"
            )));
        }
        if !self.nodes.insert(linear) {
            return Err(corrupt(format!(
                "free-space B+tree block {agbno} is reached twice"
            )));
        }
        let raw = fs.read_block(linear, 1)?;
        let b = Be(&raw);
        let (hdr, magic) = if sb.v5 {
            (SHORT_BLOCK_CRC_LEN, AB3B_MAGIC)
        } else {
            (SHORT_BLOCK_LEN, ABTB_MAGIC)
        };
        let (m, lvl, n) = (b.u32(0)?, b.u16(4)? as u32, b.u16(6)? as usize);
        // Leaves hold 8-byte records. Nodes hold `max` 8-byte keys, then `max` 4-byte pointers.
        let body = raw.len().saturating_sub(hdr);
        let max = if level == 0 { body / 8 } else { body / 12 };
        // Only the root leaf of a full group may be empty.
        let mut bad = m != magic || lvl != level || n > max || (n == 0 && !(root && level == 0));
        if sb.v5 && !bad {
            // Its own address in 512-byte units (fits: linear < dblocks), and its group.
            let daddr = linear * (sb.block_size / BB);
            bad = b.u64(16)? != daddr || b.u32(48)? as u64 != self.ag;
        }
        if bad {
            return Err(corrupt(format!(
                "free-space B+tree block {agbno} (magic {m:#x}, level {lvl}, {n} records)"
            )));
        }
        if level == 0 {
            return self.records(b, hdr, n);
        }
        for i in 0..n {
            let ptr = b.u32(hdr + max * 8 + i * 4)? as u64;
            self.node(ptr, level - 1, false)?;
        }
        Ok(())
    }

    /// `n` records (start block and block count within the group) from byte `at` of a leaf.
    fn records(&mut self, b: Be, at: usize, n: usize) -> io::Result<()> {
        let bs = self.fs.sb.block_size;
        for i in 0..n {
            let start = b.u32(at + i * 8)? as u64;
            let count = b.u32(at + i * 8 + 4)? as u64;
            let end = start + count; // two u32s
            if count == 0 || start < self.next || end > self.len {
                return Err(corrupt(format!(
                    "free extent of {count} blocks at block {start} (free space may start at \
                     block {} and ends at {})",
                    self.next, self.len
                )));
            }
            if (start..end).contains(&self.cnt_root) {
                return Err(corrupt(format!(
                    "free extent at block {start} covers the by-size tree's root"
                )));
            }
            self.next = end;
            self.blocks += count;
            let (first, last) = (self.first + start, self.first + end);
            if self.log.is_some_and(|(ls, le)| first < le && ls < last) {
                return Err(corrupt(format!(
                    "free extent at block {start} overlaps the log"
                )));
            }
            // Fits: `last` <= dblocks, and dblocks * block_size <= size.
            self.push(first * bs, last * bs);
        }
        Ok(())
    }

    /// Adds free bytes `[start, end)`, which come after every range so far.
    fn push(&mut self, start: u64, end: u64) {
        if let Some(last) = self.out.last_mut().filter(|l| l.1 == start) {
            last.1 = end;
        } else if end - start >= self.min_len {
            self.out.push((start, end));
        }
        if self.out.len() > self.keep.saturating_mul(2).max(1024) {
            self.trim();
        }
    }

    /// Drops the shortest ranges, doubling the minimum length, until at most `keep` remain.
    /// At most 64 rounds: the minimum grows beyond any range, and at u64::MAX nothing is kept.
    fn trim(&mut self) {
        while self.out.len() > self.keep {
            if self.min_len == u64::MAX {
                self.out.clear();
                break;
            }
            self.min_len = self.min_len.saturating_mul(2);
            let min = self.min_len;
            self.out.retain(|&(s, e)| e - s >= min);
        }
    }
}

/// The internal log as a ring of `n` basic blocks from byte `start` of the device.
struct LogRing<'a, R> {
    dev: &'a R,
    start: u64,
    n: u64,
}

impl<R: ReadAt> LogRing<'_, R> {
    /// `count` (at most `n`, and at most twice [`LOG_WINDOW`]) basic blocks from block `first`
    /// (below `n`), wrapping at the log's end.
    fn read(&self, first: u64, count: u64) -> io::Result<Vec<u8>> {
        let tail = count.min(self.n.saturating_sub(first));
        let mut buf = vec![0u8; (count * BB) as usize];
        let (a, b) = buf.split_at_mut((tail * BB) as usize);
        self.dev.read_at(self.start + first * BB, a)?;
        if !b.is_empty() {
            self.dev.read_at(self.start, b)?;
        }
        Ok(buf)
    }

    /// The cycle number of basic block `b`.
    fn cycle(&self, b: u64) -> io::Result<u32> {
        cycle_of(&self.read(b, 1)?)
    }
}

/// Consecutive basic blocks of the log ring read from block `from`.
struct LogWindow {
    buf: Vec<u8>,
    from: u64,
    n: u64,
}

impl LogWindow {
    /// Basic block `b` (below `n`). Outside the window this is empty, so reading it is an error
    /// rather than a panic.
    fn block(&self, b: u64) -> &[u8] {
        let i = ((b + self.n - self.from) % self.n * BB) as usize;
        self.buf.get(i..i + BB as usize).unwrap_or_default()
    }
}

/// The cycle number a basic block was written in (a record header keeps it at byte 4).
fn cycle_of(bb: &[u8]) -> io::Result<u32> {
    let b = Be(bb);
    match b.u32(0)? {
        LOG_HEADER_MAGIC => b.u32(4),
        c => Ok(c),
    }
}

/// The cycle after `c`. Cycles never take the header magic's value.
fn next_cycle(c: u32) -> u32 {
    match c.wrapping_add(1) {
        LOG_HEADER_MAGIC => LOG_HEADER_MAGIC.wrapping_add(1),
        c => c,
    }
}
