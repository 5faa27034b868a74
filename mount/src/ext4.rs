//! A read-only ext2/ext3/ext4 reader in user space, so a mount can show the files inside a disk
//! RP without root, a loop device or a kernel module.
//!
//! Model: [`Ext4::open`] reads the superblock and the group descriptors (one `u64` per group is
//! kept: where its inode table starts); everything else is read on demand through [`ReadAt`]
//! (the caller's chunk cache makes repeated metadata reads cheap). Files map to [`Extent`]s
//! (extent trees of any depth, or the ext2/3 indirect block map), directories are read linearly
//! (hashed-tree directories are ordinary entry blocks plus index blocks that look like empty
//! entries), symlinks are fast (in the inode) or stored in a block, and small files or
//! directories may be inline in the inode (`inline_data`).
//!
//! Invariants: nothing is ever written; every on-disk number is bounds-checked with checked
//! arithmetic before use, so a damaged or hostile image gives an `InvalidData` error (carrying an
//! [`Error`]) naming the inode, never a panic or an unbounded allocation. The journal is not
//! replayed (like `mount -o ro,noload`): a file system captured while mounted shows its last
//! checkpointed state.
//!
//! Budgets (each an invariant; exceeding one is an [`Error::Budget`] for that one inode, the rest
//! of the file system stays readable):
//!
//! * open: the geometry is validated as the kernel does (block size 1..64 KiB, blocks and inodes
//!   per group within `8..=8 * block_size`, inode size a power of two in `128..=block_size`,
//!   `s_inodes_count` equal to groups × inodes per group) and the group count is at most
//!   [`MAX_GROUPS`] and what the device can hold, so memory at open is at most 8 bytes a group.
//! * a file's block map: at most [`MAX_MAP_NODES`] extent-tree or indirect blocks are visited
//!   (never more than the file's size in blocks can need, nor the file system's block count),
//!   each at most once (a node reached twice is a corrupt tree, not a loop of reads), extent
//!   trees at most [`MAX_EXTENT_DEPTH`] deep; the list has at most [`MAX_EXTENTS`] entries.
//! * inline data: never more than the inode can hold (60 bytes of `i_block` plus its
//!   `system.data` attribute); a larger `i_size` is an error.
//! * a directory listing: at most [`MAX_DIR_BYTES`] of blocks scanned (a block at a time),
//!   [`MAX_DIR_ENTRIES`] entries and [`MAX_DIR_NAME_BYTES`] bytes of names.

use std::collections::HashSet;
use std::io;

/// Random access to the bytes of one file system (a partition or a whole disk).
pub trait ReadAt: Send + Sync {
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Appends `len` bytes from `offset` to `out`. The default zero-fills then reads; devices
    /// that can copy straight into spare capacity override it.
    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let start = out.len();
        out.resize(start + len, 0);
        self.read_at(offset, &mut out[start..])
    }
}

impl ReadAt for std::fs::File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

/// An image in memory (tests, fuzzing).
impl ReadAt for [u8] {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|at| self.get(at..at.checked_add(buf.len())?))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for std::sync::Arc<T> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
}

const SUPERBLOCK_OFFSET: u64 = 1024;
const MAGIC: u16 = 0xef53;
const ROOT_INO: u32 = 2;

// Feature bits (from the ext4 on-disk format documentation).
const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;
const INCOMPAT_RECOVER: u32 = 0x4;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
/// Features under which the block bitmaps say exactly what is free: filetype, recover (checked
/// apart), meta_bg, extents, 64bit, flex_bg, ea_inode, csum_seed, largedir, inline_data.
const INCOMPAT_FREE_SPACE_OK: u32 =
    0x2 | 0x4 | 0x10 | 0x40 | 0x80 | 0x200 | 0x400 | 0x2000 | 0x4000 | 0x8000;
/// sparse_super, large_file, btree_dir, huge_file, gdt_csum, dir_nlink, extra_isize, quota,
/// bigalloc (refused apart), metadata_csum, readonly, project, shared_blocks, verity.
const RO_COMPAT_FREE_SPACE_OK: u32 = 0x1
    | 0x2
    | 0x4
    | 0x8
    | 0x10
    | 0x20
    | 0x40
    | 0x100
    | 0x200
    | 0x400
    | 0x1000
    | 0x2000
    | 0x4000
    | 0x8000;
const STATE_VALID: u16 = 0x1;
const STATE_ERROR: u16 = 0x2;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
/// Group descriptor flag: the block bitmap is not initialised (only its metadata is in use).
const BG_BLOCK_UNINIT: u16 = 0x2;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;

// Inode flags.
const FL_HUGE_FILE: u32 = 0x4_0000;
const FL_EXTENTS: u32 = 0x8_0000;
const FL_INLINE_DATA: u32 = 0x1000_0000;
const FL_ENCRYPT: u32 = 0x800;

const EXTENT_MAGIC: u16 = 0xf30a;
/// Deeper extent trees than this are corrupt (the kernel's limit is 5).
pub const MAX_EXTENT_DEPTH: u16 = 5;
/// Inline data in an inode: `i_block` (60 bytes) then the `system.data` attribute.
const INLINE_BLOCK: usize = 60;
const XATTR_MAGIC: u32 = 0xea02_0000;
/// `system.` name index of the in-inode attribute that holds the rest of inline data.
const XATTR_INDEX_SYSTEM: u8 = 7;
/// At most this many block groups (8 bytes of memory each): 128 TiB with 4 KiB blocks.
pub const MAX_GROUPS: u64 = 1 << 20;
/// Extent-tree or indirect blocks visited to map one file: with 4 KiB blocks, a fully
/// fragmented file of 256 GiB through indirect blocks, far more for extent trees.
pub const MAX_MAP_NODES: u64 = 1 << 16;
/// Extents kept for one file (24 bytes each).
pub const MAX_EXTENTS: usize = 1 << 20;
/// Directory blocks scanned for one listing.
pub const MAX_DIR_BYTES: u64 = 64 << 20;
/// Entries of one directory listing.
pub const MAX_DIR_ENTRIES: usize = 1 << 20;
/// Bytes of names in one directory listing.
pub const MAX_DIR_NAME_BYTES: usize = 32 << 20;
/// The largest extended-attribute value read (the kernel's limit is 64 KiB).
pub const MAX_XATTR_VALUE: usize = 64 << 10;

/// Why an image could not be read, for the one object concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image contradicts the format (or this reader's understanding of it).
    #[error("ext4: {0}")]
    Corrupt(String),
    /// Reading the object would take more work or memory than its budget allows.
    #[error("ext4: inode {ino}: more than {limit} {what}")]
    Budget { ino: u32, what: Budget, limit: u64 },
}

/// Which budget an object exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Extent-tree or indirect blocks visited to map the file.
    MapNodes,
    /// Extents in the file's block map.
    Extents,
    /// Directory bytes scanned.
    DirBytes,
    /// Entries in a directory.
    DirEntries,
    /// Bytes of names in a directory.
    DirNameBytes,
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Budget::MapNodes => "block-map nodes (extent-tree or indirect blocks)",
            Budget::Extents => "extents",
            Budget::DirBytes => "directory bytes",
            Budget::DirEntries => "directory entries",
            Budget::DirNameBytes => "bytes of directory entry names",
        })
    }
}

impl Error {
    /// The [`Error`] inside an error returned by this module, if it carries one.
    pub fn of(e: &io::Error) -> Option<&Error> {
        e.get_ref()?.downcast_ref()
    }
}

fn over_budget(ino: u32, what: Budget, limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        Error::Budget { ino, what, limit },
    )
}

fn le16(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn le32(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
}

fn corrupt(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, Error::Corrupt(what.to_string()))
}

/// The kind of an inode, from its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl Kind {
    /// The kind a POSIX mode's type bits name (as ext and XFS inodes store them).
    pub fn of_mode(mode: u16) -> Option<Kind> {
        Some(match mode & 0xf000 {
            0x8000 => Kind::File,
            0x4000 => Kind::Dir,
            0xa000 => Kind::Symlink,
            0x2000 => Kind::CharDevice,
            0x6000 => Kind::BlockDevice,
            0x1000 => Kind::Fifo,
            0xc000 => Kind::Socket,
            _ => return None,
        })
    }
}

/// Seconds and nanoseconds since the epoch (may be negative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

impl Time {
    pub fn to_system(self) -> std::time::SystemTime {
        let base = if self.secs >= 0 {
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.secs as u64)
        } else {
            std::time::UNIX_EPOCH - std::time::Duration::from_secs(self.secs.unsigned_abs())
        };
        base + std::time::Duration::from_nanos(self.nanos as u64)
    }
}

/// One inode's metadata.
#[derive(Debug, Clone)]
pub struct Inode {
    pub ino: u32,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u16,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    /// Creation time, where the inode is large enough to record it.
    pub crtime: Option<Time>,
    /// Allocated space in 512-byte units (as `st_blocks`).
    pub blocks: u64,
    pub flags: u32,
    /// Device number for character and block devices (Linux `dev_t` encoding).
    pub rdev: u32,
    block: [u8; INLINE_BLOCK],
    file_acl: u64,
    /// The in-inode extended attribute area (after `i_extra_isize`), for inline data.
    xattrs: Vec<u8>,
}

impl Inode {
    pub fn kind(&self) -> Option<Kind> {
        Kind::of_mode(self.mode)
    }

    /// Permission bits including setuid, setgid and sticky.
    pub fn perm(&self) -> u16 {
        self.mode & 0o7777
    }

    fn inline(&self) -> bool {
        self.flags & FL_INLINE_DATA != 0
    }
}

/// A run of a file's initialized blocks: `len` blocks from file block `logical` stored at
/// `physical`. Blocks in no extent (holes, preallocated space) read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
}

/// Where the bytes of a file's data come from.
#[derive(Debug, Clone)]
pub enum Data {
    /// Blocks on the device.
    Extents(Vec<Extent>),
    /// Stored in the inode itself (`inline_data`).
    Inline(Vec<u8>),
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u32,
    pub name: Vec<u8>,
    /// From the entry itself where the file system records types (`filetype` feature).
    pub kind: Option<Kind>,
}

#[derive(Debug, Clone)]
struct Super {
    block_size: u64,
    blocks: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    inodes_per_group: u32,
    inodes: u32,
    inode_size: u64,
    desc_size: u64,
    incompat: u32,
    ro_compat: u32,
    compat: u32,
    first_meta_bg: u64,
    backup_bgs: [u32; 2],
    reserved_gdt_blocks: u64,
    /// `s_state`: [`STATE_VALID`] when cleanly unmounted, [`STATE_ERROR`] when errors were seen.
    state: u16,
    label: String,
}

impl Super {
    /// Checks the geometry as the kernel does at mount and returns the number of block groups.
    fn validate(&self, size: u64) -> io::Result<u64> {
        let bs = self.block_size;
        let bad = |what: String| Err(corrupt(format!("superblock: {what}")));
        if !(8..=8 * bs).contains(&self.blocks_per_group) {
            return bad(format!(
                "{} blocks per group (must be 8..={})",
                self.blocks_per_group,
                8 * bs
            ));
        }
        let inodes_per_block = bs / self.inode_size.max(1);
        if !(128..=bs).contains(&self.inode_size) || !self.inode_size.is_power_of_two() {
            return bad(format!("inode size {} is invalid", self.inode_size));
        }
        if !(inodes_per_block..=8 * bs).contains(&u64::from(self.inodes_per_group)) {
            return bad(format!(
                "{} inodes per group is invalid",
                self.inodes_per_group
            ));
        }
        if self.desc_size > 1024
            || !self.desc_size.is_power_of_two()
            || (self.incompat & INCOMPAT_64BIT != 0 && self.desc_size < 64)
        {
            return bad(format!(
                "group descriptor size {} is invalid",
                self.desc_size
            ));
        }
        // The first data block is 1 with 1 KiB blocks (the boot block and superblock share
        // block 0 otherwise) and 0 with larger ones.
        if self.first_data_block != u64::from(bs == 1024) || self.blocks <= self.first_data_block {
            return bad(format!(
                "first data block {} of {} blocks",
                self.first_data_block, self.blocks
            ));
        }
        if self.blocks.checked_mul(bs).is_none_or(|end| end > size) {
            return bad(format!(
                "the file system ({} blocks of {bs}) is larger than its device ({size} bytes)",
                self.blocks
            ));
        }
        let groups = (self.blocks - self.first_data_block).div_ceil(self.blocks_per_group);
        // Every group's descriptor is stored on the device, so a device of `size` bytes holds
        // at most size / desc_size of them.
        if groups > MAX_GROUPS || groups.saturating_mul(self.desc_size) > size {
            return bad(format!("{groups} block groups is too many"));
        }
        if groups.checked_mul(u64::from(self.inodes_per_group)) != Some(u64::from(self.inodes)) {
            return bad(format!(
                "{} inodes is not {groups} groups of {}",
                self.inodes, self.inodes_per_group
            ));
        }
        Ok(groups)
    }
}

/// A mounted-for-reading ext file system.
pub struct Ext4<R> {
    dev: R,
    sb: Super,
    /// Inode table start block of each group.
    inode_tables: Vec<u64>,
}

impl<R: ReadAt> Ext4<R> {
    /// Opens the file system on `dev` (`size` bytes). `Ok(None)`: no ext2/3/4 superblock there.
    /// An error: it is ext, but uses a feature this reader does not understand, or is damaged.
    pub fn open(dev: R, size: u64) -> io::Result<Option<Self>> {
        if size < SUPERBLOCK_OFFSET + 1024 {
            return Ok(None);
        }
        let mut b = [0u8; 1024];
        dev.read_at(SUPERBLOCK_OFFSET, &mut b)?;
        if le16(&b, 0x38) != MAGIC {
            return Ok(None);
        }
        let log = le32(&b, 0x18);
        if log > 6 {
            return Err(corrupt(format!(
                "block size 2^(10 + {log}) is invalid (1 KiB to 64 KiB)"
            )));
        }
        let incompat = le32(&b, 0x60);
        let rev = le32(&b, 0x4c);
        let unsupported = [
            (INCOMPAT_COMPRESSION, "compression"),
            (INCOMPAT_JOURNAL_DEV, "external journal device"),
            (INCOMPAT_DIRDATA, "dirdata"),
            (INCOMPAT_ENCRYPT, "encryption"),
            (INCOMPAT_CASEFOLD, "casefold"),
        ];
        for (bit, name) in unsupported {
            if incompat & bit != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("ext4: the {name} feature is not supported by the file view"),
                ));
            }
        }
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let blocks = le32(&b, 0x4) as u64
            | if is64 {
                (le32(&b, 0x150) as u64) << 32
            } else {
                0
            };
        let sb = Super {
            block_size: 1024 << log,
            blocks,
            first_data_block: le32(&b, 0x14) as u64,
            blocks_per_group: le32(&b, 0x20) as u64,
            inodes_per_group: le32(&b, 0x28),
            inodes: le32(&b, 0x0),
            inode_size: if rev == 0 { 128 } else { le16(&b, 0x58) as u64 },
            desc_size: if is64 {
                le16(&b, 0xfe).max(32) as u64
            } else {
                32
            },
            incompat,
            ro_compat: le32(&b, 0x64),
            compat: le32(&b, 0x5c),
            first_meta_bg: le32(&b, 0x104) as u64,
            backup_bgs: [le32(&b, 0x24c), le32(&b, 0x250)],
            reserved_gdt_blocks: le16(&b, 0xce) as u64,
            state: le16(&b, 0x3a),
            label: String::from_utf8_lossy(&b[0x78..0x88])
                .trim_end_matches('\0')
                .to_string(),
        };
        let groups = sb.validate(size)?;
        let mut fs = Ext4 {
            dev,
            sb,
            inode_tables: Vec::new(),
        };
        fs.inode_tables = fs.read_descriptors(groups)?;
        Ok(Some(fs))
    }

    pub fn block_size(&self) -> u64 {
        self.sb.block_size
    }

    /// The volume label (may be empty).
    pub fn label(&self) -> &str {
        &self.sb.label
    }

    pub fn root(&self) -> u32 {
        ROOT_INO
    }

    /// Whether group `g` holds a superblock backup (and so its descriptor copy comes after it).
    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.sb.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return u32::try_from(g).is_ok_and(|g| self.sb.backup_bgs.contains(&g));
        }
        if self.sb.ro_compat & RO_COMPAT_SPARSE_SUPER == 0 || g == 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&base| {
            let mut p = base;
            while p < g {
                p *= base;
            }
            p == g
        })
    }

    fn read_descriptors(&self, groups: u64) -> io::Result<Vec<u64>> {
        let bs = self.sb.block_size;
        let per_block = bs / self.sb.desc_size;
        let desc_blocks = groups.div_ceil(per_block);
        let meta_bg = self.sb.incompat & INCOMPAT_META_BG != 0;
        let mut tables = Vec::with_capacity(groups as usize);
        let mut buf = vec![0u8; bs as usize];
        for i in 0..desc_blocks {
            let block = if !meta_bg || i < self.sb.first_meta_bg {
                self.sb.first_data_block + 1 + i
            } else {
                // meta_bg: the descriptors of meta group i sit in the first block group of it.
                let g = i * per_block;
                self.sb.first_data_block + g * self.sb.blocks_per_group + self.has_super(g) as u64
            };
            self.read_block(block, &mut buf)?;
            for d in buf.chunks_exact(self.sb.desc_size as usize) {
                if tables.len() as u64 == groups {
                    break;
                }
                let mut t = le32(d, 0x8) as u64;
                if self.sb.desc_size >= 64 {
                    t |= (le32(d, 0x28) as u64) << 32;
                }
                tables.push(t);
            }
        }
        Ok(tables)
    }

    /// The block of group descriptor `i` (the caller keeps `i` below the group count).
    fn descriptor_at(&self, i: u64) -> (u64, usize) {
        let per_block = self.sb.block_size / self.sb.desc_size;
        let b = i / per_block;
        let meta_bg = self.sb.incompat & INCOMPAT_META_BG != 0;
        let block = if !meta_bg || b < self.sb.first_meta_bg {
            self.sb.first_data_block + 1 + b
        } else {
            let g = b * per_block;
            self.sb.first_data_block + g * self.sb.blocks_per_group + self.has_super(g) as u64
        };
        (block, ((i % per_block) * self.sb.desc_size) as usize)
    }

    /// The file system's free space as sorted, disjoint byte ranges of its device, from the
    /// block bitmaps: what a backup of the used blocks only need not read.
    ///
    /// Conservative, as a wrong "free" loses data: a group whose bitmap disagrees with its
    /// descriptor's free count counts as wholly used; uninitialised bitmaps are trusted only
    /// with group checksums (as the kernel does), and then everything but the group's own
    /// metadata is free; a journal that needs recovery is refused (its transactions may
    /// allocate blocks the bitmaps still show free). Work: one bitmap block per group
    /// ([`MAX_GROUPS`] at most); memory: at most `max_ranges` ranges (the smallest are dropped
    /// past that, which only means reading them).
    pub fn free_extents(&self, max_ranges: usize) -> io::Result<Vec<(u64, u64)>> {
        let sb = &self.sb;
        if sb.incompat & INCOMPAT_RECOVER != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "ext4: the journal needs recovery, so the block bitmaps may be stale",
            ));
        }
        // Cleared while mounted read-write (and after a crash): without a journal to replay,
        // the bitmaps then lag behind data already written (ext2's fsync leaves them behind).
        if sb.state & STATE_VALID == 0 || sb.state & STATE_ERROR != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "ext4: not cleanly unmounted (state {:#x}), so the block bitmaps may be stale",
                    sb.state
                ),
            ));
        }
        // Only features whose block accounting is the plain bitmaps' are trusted (not MMP in
        // use elsewhere, pending orphans, snapshots, or what this code does not know).
        let unknown_incompat = sb.incompat & !INCOMPAT_FREE_SPACE_OK;
        let unknown_ro = sb.ro_compat & !RO_COMPAT_FREE_SPACE_OK;
        if unknown_incompat != 0 || unknown_ro != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "ext4: features incompat {unknown_incompat:#x} / ro_compat {unknown_ro:#x} \
                     are not trusted for free space"
                ),
            ));
        }
        if sb.ro_compat & RO_COMPAT_BIGALLOC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "ext4: bigalloc bitmaps (one bit a cluster) are not read for free space",
            ));
        }
        let bs = sb.block_size;
        let groups = self.inode_tables.len() as u64;
        let csum = sb.ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0;
        let wide = sb.desc_size >= 64;
        let field = |d: &[u8], lo: usize, hi: usize| -> u64 {
            le32(d, lo) as u64 | if wide { (le32(d, hi) as u64) << 32 } else { 0 }
        };
        let half = |d: &[u8], lo: usize, hi: usize| -> u64 {
            le16(d, lo) as u64 | if wide { (le16(d, hi) as u64) << 16 } else { 0 }
        };
        // Per group: block bitmap, inode bitmap, inode table, free count, flags.
        let mut descs: Vec<(u64, u64, u64, u64, u16)> = Vec::with_capacity(groups as usize);
        let mut buf = vec![0u8; bs as usize];
        let mut loaded = None;
        for g in 0..groups {
            let (block, at) = self.descriptor_at(g);
            if loaded != Some(block) {
                self.read_block(block, &mut buf)?;
                loaded = Some(block);
            }
            let d = &buf[at..at + sb.desc_size as usize];
            descs.push((
                field(d, 0x0, 0x20),
                field(d, 0x4, 0x24),
                field(d, 0x8, 0x28),
                half(d, 0xc, 0x2c),
                le16(d, 0x12),
            ));
        }
        // Where every group's bitmaps and inode table lie (flex_bg packs them together).
        let itable_blocks = (u64::from(sb.inodes_per_group) * sb.inode_size).div_ceil(bs);
        let mut meta: Vec<(u64, u64)> = descs
            .iter()
            .flat_map(|&(b, i, t, _, _)| [(b, 1), (i, 1), (t, itable_blocks)])
            .collect();
        meta.sort_unstable();
        let gdt_blocks = groups.div_ceil(bs / sb.desc_size);
        let mut out = Ranges::new(max_ranges);
        let mut bitmap = vec![0u8; bs as usize];
        for (g, &(bitmap_at, _, _, free, flags)) in descs.iter().enumerate() {
            let g = g as u64;
            let start = sb.first_data_block + g * sb.blocks_per_group;
            let end = (start + sb.blocks_per_group).min(sb.blocks);
            let count = end - start;
            if csum && flags & BG_BLOCK_UNINIT != 0 {
                if sb.incompat & INCOMPAT_META_BG != 0 {
                    continue; // where meta_bg puts descriptors is not worth guessing: used
                }
                // Used: the superblock copy with the descriptors and their reserve, and any
                // group's bitmaps and inode table that lie here; all else is free.
                let head = if self.has_super(g) {
                    (1 + gdt_blocks + sb.reserved_gdt_blocks).min(count)
                } else {
                    0
                };
                let mut used: Vec<(u64, u64)> = vec![(start, start + head)];
                let first = meta.partition_point(|&(b, n)| b.saturating_add(n) <= start);
                for &(b, n) in meta[first..].iter().take_while(|&&(b, _)| b < end) {
                    used.push((b.max(start), b.saturating_add(n).min(end)));
                }
                used.sort_unstable();
                let mut at = start;
                let mut free_here = 0;
                let mut pieces = Vec::new();
                for (s, e) in used {
                    if s > at {
                        pieces.push((at, s));
                        free_here += s - at;
                    }
                    at = at.max(e);
                }
                if end > at {
                    pieces.push((at, end));
                    free_here += end - at;
                }
                if free_here == free {
                    for (s, e) in pieces {
                        out.push(s * bs, e * bs);
                    }
                }
                continue;
            }
            if bitmap_at < sb.first_data_block || bitmap_at >= sb.blocks {
                return Err(corrupt(format!(
                    "group {g}: block bitmap at block {bitmap_at}, outside the file system"
                )));
            }
            self.read_block(bitmap_at, &mut bitmap)?;
            let zeros = (0..count)
                .filter(|&i| bitmap[(i / 8) as usize] & (1 << (i % 8)) == 0)
                .count() as u64;
            if zeros != free {
                continue; // the bitmap and the descriptor disagree: trust neither
            }
            let mut run: Option<u64> = None;
            for i in 0..=count {
                let is_free = i < count && bitmap[(i / 8) as usize] & (1 << (i % 8)) == 0;
                match (is_free, run) {
                    (true, None) => run = Some(i),
                    (false, Some(r)) => {
                        out.push((start + r) * bs, (start + i) * bs);
                        run = None;
                    }
                    _ => {}
                }
            }
        }
        Ok(out.finish())
    }

    fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        if block >= self.sb.blocks {
            return Err(corrupt(format!(
                "block {block} is past the end of the file system"
            )));
        }
        // block < blocks and blocks * block_size fits (checked at open).
        self.dev.read_at(block * self.sb.block_size, buf)
    }

    /// Where inode `ino` is stored on the device (for tools and tests that patch images).
    pub fn inode_offset(&self, ino: u32) -> io::Result<u64> {
        if ino == 0 || ino > self.sb.inodes {
            return Err(corrupt(format!("inode number {ino} out of range")));
        }
        let (g, i) = (
            (ino - 1) / self.sb.inodes_per_group,
            (ino - 1) % self.sb.inodes_per_group,
        );
        let table = *self
            .inode_tables
            .get(g as usize)
            .ok_or_else(|| corrupt(format!("inode {ino}: group {g} out of range")))?;
        // The end of the file system fits in a u64 (checked at open); the table may not.
        let fs_end = self.sb.blocks * self.sb.block_size;
        table
            .checked_mul(self.sb.block_size)
            .and_then(|t| t.checked_add(u64::from(i) * self.sb.inode_size))
            .filter(|&o| {
                o.checked_add(self.sb.inode_size)
                    .is_some_and(|end| end <= fs_end)
            })
            .ok_or_else(|| {
                corrupt(format!(
                    "inode {ino}: inode table of group {g} (block {table}) out of range"
                ))
            })
    }

    /// Reads inode `ino`.
    pub fn inode(&self, ino: u32) -> io::Result<Inode> {
        let offset = self.inode_offset(ino)?;
        let mut b = vec![0u8; self.sb.inode_size as usize];
        self.dev.read_at(offset, &mut b)?;
        Ok(self.parse_inode(ino, &b))
    }

    fn parse_inode(&self, ino: u32, b: &[u8]) -> Inode {
        let extra = if b.len() > 128 {
            (le16(b, 0x80) as usize).min(b.len() - 128)
        } else {
            0
        };
        // A field of the extended area exists when i_extra_isize covers it.
        let has = |end: usize| 128 + extra >= end;
        let time = |lo: usize, extra_at: usize| {
            let mut t = Time {
                secs: le32(b, lo) as i32 as i64,
                nanos: 0,
            };
            if has(extra_at + 4) {
                let x = le32(b, extra_at);
                t.secs += ((x & 3) as i64) << 32;
                t.nanos = (x >> 2).min(999_999_999);
            }
            t
        };
        let flags = le32(b, 0x20);
        let huge = self.sb.ro_compat & RO_COMPAT_HUGE_FILE != 0;
        let mut blocks = le32(b, 0x1c) as u64
            | if huge {
                (le16(b, 0x74) as u64) << 32
            } else {
                0
            };
        if huge && flags & FL_HUGE_FILE != 0 {
            blocks *= self.sb.block_size / 512;
        }
        let size = le32(b, 0x4) as u64 | (le32(b, 0x6c) as u64) << 32;
        if flags & FL_INLINE_DATA != 0 && le16(b, 0) & 0xf000 == 0x8000 {
            // As the kernel reports regular files, so inline ones do not look all sparse.
            blocks += size.div_ceil(512);
        }
        let mut block = [0u8; INLINE_BLOCK];
        block.copy_from_slice(&b[0x28..0x28 + INLINE_BLOCK]);
        let mode = le16(b, 0);
        let rdev = match mode & 0xf000 {
            0x2000 | 0x6000 => {
                let old = le32(&block, 0);
                if old != 0 {
                    ((old >> 8) & 0xff) << 8 | (old & 0xff)
                } else {
                    le32(&block, 4)
                }
            }
            _ => 0,
        };
        Inode {
            ino,
            mode,
            uid: le16(b, 0x2) as u32 | (le16(b, 0x78) as u32) << 16,
            gid: le16(b, 0x18) as u32 | (le16(b, 0x7a) as u32) << 16,
            size,
            links: le16(b, 0x1a),
            atime: time(0x8, 0x8c),
            mtime: time(0x10, 0x88),
            ctime: time(0xc, 0x84),
            crtime: has(0x98).then(|| time(0x90, 0x94)),
            blocks,
            flags,
            rdev,
            block,
            file_acl: le32(b, 0x68) as u64 | (le16(b, 0x76) as u64) << 32,
            xattrs: b[(128 + extra).min(b.len())..].to_vec(),
        }
    }

    /// Where the data of `inode` lives. Encrypted inodes are refused.
    pub fn data(&self, inode: &Inode) -> io::Result<Data> {
        if inode.flags & FL_ENCRYPT != 0 {
            return Err(corrupt(format!("inode {} is encrypted", inode.ino)));
        }
        if inode.inline() {
            return Ok(Data::Inline(self.inline_data(inode)?));
        }
        let bs = self.sb.block_size;
        // The largest logical block a map can address: 2^32 for extent trees (32-bit logical
        // block numbers), 12 + p + p^2 + p^3 for indirect maps of p pointers a block. Keeps
        // every `block * block_size` below 2^59.
        let per = bs / 4;
        let addressable = if inode.flags & FL_EXTENTS != 0 {
            1 << 32
        } else {
            12 + per + per * per + per * per * per
        };
        let max_blocks = inode.size.div_ceil(bs).min(addressable);
        // Nodes a valid map of max_blocks blocks can need: for an extent tree, at each level
        // disjoint subtrees each covering a block (at most depth × blocks); for an indirect map,
        // one pointer block per per - 1 blocks plus the three roots.
        let needed = if inode.flags & FL_EXTENTS != 0 {
            max_blocks.saturating_mul(u64::from(MAX_EXTENT_DEPTH))
        } else {
            max_blocks.div_ceil(per - 1) + 3
        };
        let mut walk = MapWalk {
            ino: inode.ino,
            max_blocks,
            fs_blocks: self.sb.blocks,
            node_budget: needed.min(self.sb.blocks).min(MAX_MAP_NODES),
            seen: HashSet::new(),
            out: Vec::new(),
        };
        if inode.flags & FL_EXTENTS != 0 {
            let root_depth = extent_header(inode.ino, &inode.block)?.1;
            if root_depth > MAX_EXTENT_DEPTH {
                return Err(corrupt(format!(
                    "inode {}: extent tree {root_depth} levels deep (at most {MAX_EXTENT_DEPTH})",
                    inode.ino
                )));
            }
            self.walk_extents(&mut walk, &inode.block, root_depth)?;
        } else {
            self.walk_indirect(&mut walk, inode)?;
        }
        Ok(Data::Extents(walk.out))
    }

    /// The inline data of `inode`: `i_block` then the `system.data` attribute, never more than
    /// those hold (an `i_size` beyond them is corrupt, not a request to allocate).
    fn inline_data(&self, inode: &Inode) -> io::Result<Vec<u8>> {
        let rest = self
            .inode_xattr(inode, XATTR_INDEX_SYSTEM, b"data")
            .unwrap_or_default();
        let capacity = INLINE_BLOCK + rest.len();
        let size = usize::try_from(inode.size)
            .ok()
            .filter(|&n| n <= capacity)
            .ok_or_else(|| {
                corrupt(format!(
                    "inode {}: {} bytes of inline data but the inode holds at most {capacity}",
                    inode.ino, inode.size
                ))
            })?;
        let mut data = Vec::with_capacity(size);
        data.extend_from_slice(&inode.block[..size.min(INLINE_BLOCK)]);
        data.extend_from_slice(&rest[..size - data.len()]);
        Ok(data)
    }

    /// The value of an attribute stored in the inode body, if any.
    fn inode_xattr<'a>(&self, inode: &'a Inode, index: u8, name: &[u8]) -> Option<&'a [u8]> {
        let x = &inode.xattrs;
        if x.len() < 4 || le32(x, 0) != XATTR_MAGIC {
            return None;
        }
        let area = &x[4..];
        xattr_headers(area)
            .map_while(Option::from)
            .find(|h: &XattrHeader| h.index == index && h.name == name && h.value_inum == 0)
            .and_then(|h| area.get(h.value_off..h.value_off.checked_add(h.value_size)?))
    }

    /// Walks the extent-tree node `node` (the inode's `i_block` or a tree block) of `depth`.
    fn walk_extents(&self, walk: &mut MapWalk, node: &[u8], depth: u16) -> io::Result<()> {
        let ino = walk.ino;
        let bad = |what: &str| corrupt(format!("inode {ino}: {what} in the extent tree"));
        let (entries, node_depth) = extent_header(ino, node)?;
        if node_depth != depth {
            return Err(bad("a node of the wrong depth"));
        }
        let mut child = Vec::new();
        for e in node[12..12 + entries * 12].chunks_exact(12) {
            let logical = u64::from(le32(e, 0));
            if logical >= walk.max_blocks {
                // Past the end of the file (preallocated with KEEP_SIZE): nothing to read.
                continue;
            }
            if depth == 0 {
                let raw = u64::from(le16(e, 4));
                let physical = u64::from(le16(e, 6)) << 32 | u64::from(le32(e, 8));
                // Lengths above 32768 mark preallocated (uninitialized) extents: zeros.
                if raw > 32768 || raw == 0 {
                    continue;
                }
                walk.push(logical, physical, raw)?;
            } else {
                let block = u64::from(le16(e, 8)) << 32 | u64::from(le32(e, 4));
                walk.visit(block)?;
                if child.is_empty() {
                    child = vec![0u8; self.sb.block_size as usize];
                }
                self.read_block(block, &mut child)?;
                self.walk_extents(walk, &child, depth - 1)?;
            }
        }
        Ok(())
    }

    fn walk_indirect(&self, walk: &mut MapWalk, inode: &Inode) -> io::Result<()> {
        let per = self.sb.block_size / 4;
        let ptr = |i: usize| u64::from(le32(&inode.block, i * 4));
        for i in 0..12 {
            let p = ptr(i);
            if p != 0 && (i as u64) < walk.max_blocks {
                walk.push(i as u64, p, 1)?;
            }
        }
        // Single, double and triple indirect trees cover the blocks after the direct ones.
        let mut base = 12u64;
        for level in 0..3u32 {
            if base >= walk.max_blocks {
                break;
            }
            let root = ptr(12 + level as usize);
            if root != 0 {
                self.walk_indirect_block(walk, root, level, base)?;
            }
            base += per.pow(level + 1);
        }
        Ok(())
    }

    /// Walks pointer block `block` whose entries each cover `per^level` blocks from `base`.
    fn walk_indirect_block(
        &self,
        walk: &mut MapWalk,
        block: u64,
        level: u32,
        base: u64,
    ) -> io::Result<()> {
        walk.visit(block)?;
        let per = self.sb.block_size / 4;
        let mut buf = vec![0u8; self.sb.block_size as usize];
        self.read_block(block, &mut buf)?;
        // per^3 <= 2^42 and base < 2^43: no overflow.
        let span = per.pow(level);
        for (i, p) in buf.chunks_exact(4).enumerate() {
            let logical = base + i as u64 * span;
            if logical >= walk.max_blocks {
                break;
            }
            let p = u64::from(le32(p, 0));
            if p == 0 {
                continue;
            }
            if level == 0 {
                walk.push(logical, p, 1)?;
            } else {
                self.walk_indirect_block(walk, p, level - 1, logical)?;
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of a file from `offset` (the caller clips to the file size).
    pub fn read(&self, data: &Data, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match data {
            Data::Inline(d) => {
                buf.fill(0);
                let start = usize::try_from(offset).map_or(d.len(), |o| o.min(d.len()));
                let n = (d.len() - start).min(buf.len());
                buf[..n].copy_from_slice(&d[start..start + n]);
                Ok(())
            }
            Data::Extents(ext) => {
                for run in runs(ext, self.sb.block_size, offset, buf.len() as u64) {
                    let piece =
                        &mut buf[run.buf_offset as usize..(run.buf_offset + run.len) as usize];
                    match run.disk {
                        Some(at) => self.dev.read_at(at, piece)?,
                        None => piece.fill(0),
                    }
                }
                Ok(())
            }
        }
    }

    /// Like [`Ext4::read`], appending `len` bytes to `out` without zero-filling data runs first
    /// (a FUSE read of 1 MiB otherwise clears the buffer it then overwrites).
    pub fn read_append(
        &self,
        data: &Data,
        offset: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        match data {
            Data::Inline(_) => {
                let start = out.len();
                out.resize(start + len, 0);
                self.read(data, offset, &mut out[start..])
            }
            Data::Extents(ext) => {
                read_extents_append(&self.dev, ext, self.sb.block_size, offset, len, out)
            }
        }
    }

    /// The device byte ranges a read of `len` bytes at `offset` touches (none for inline data).
    pub fn disk_ranges(&self, data: &Data, offset: u64, len: u64) -> Vec<(u64, u64)> {
        match data {
            Data::Inline(_) => Vec::new(),
            Data::Extents(ext) => runs(ext, self.sb.block_size, offset, len)
                .into_iter()
                .filter_map(|r| Some((r.disk?, r.len)))
                .collect(),
        }
    }

    /// The device this file system reads from.
    pub fn device(&self) -> &R {
        &self.dev
    }

    /// Reads a whole small object (directory or symlink) into memory.
    fn read_all(&self, inode: &Inode, limit: u64) -> io::Result<Vec<u8>> {
        if inode.size > limit {
            return Err(corrupt(format!(
                "inode {}: {} bytes is too large",
                inode.ino, inode.size
            )));
        }
        let data = self.data(inode)?;
        // Within `limit` (a block or two): no truncation.
        let mut buf = vec![0u8; inode.size as usize];
        self.read(&data, 0, &mut buf)?;
        Ok(buf)
    }

    /// The entries of directory `inode`, in on-disk order, without `.` and `..`.
    pub fn read_dir(&self, inode: &Inode) -> io::Result<Vec<DirEntry>> {
        if inode.kind() != Some(Kind::Dir) {
            return Err(corrupt(format!("inode {} is not a directory", inode.ino)));
        }
        let filetype = self.sb.incompat & INCOMPAT_FILETYPE != 0;
        let mut out = Vec::new();
        if inode.inline() {
            // Inline directories: the parent inode number, then entries (in i_block and then
            // in the system.data attribute), each area parsed on its own.
            let data = self.inline_data(inode)?;
            if data.len() < 4 {
                return Err(corrupt(format!(
                    "inode {}: short inline directory",
                    inode.ino
                )));
            }
            let split = INLINE_BLOCK.min(data.len());
            parse_entries(inode.ino, &data[4..split], filetype, &mut out)?;
            parse_entries(inode.ino, &data[split..], filetype, &mut out)?;
            return Ok(out);
        }
        if inode.size > MAX_DIR_BYTES {
            return Err(over_budget(inode.ino, Budget::DirBytes, MAX_DIR_BYTES));
        }
        // A block at a time: memory is what the entries take, within their budgets.
        let data = self.data(inode)?;
        let bs = self.sb.block_size;
        let mut block = vec![0u8; bs as usize];
        let mut name_bytes = 0usize;
        let mut at = 0;
        while at < inode.size {
            let n = (inode.size - at).min(bs) as usize;
            self.read(&data, at, &mut block[..n])?;
            let before = out.len();
            parse_entries(inode.ino, &block[..n], filetype, &mut out)?;
            name_bytes += out[before..].iter().map(|e| e.name.len()).sum::<usize>();
            if out.len() > MAX_DIR_ENTRIES {
                return Err(over_budget(
                    inode.ino,
                    Budget::DirEntries,
                    MAX_DIR_ENTRIES as u64,
                ));
            }
            if name_bytes > MAX_DIR_NAME_BYTES {
                return Err(over_budget(
                    inode.ino,
                    Budget::DirNameBytes,
                    MAX_DIR_NAME_BYTES as u64,
                ));
            }
            at += bs;
        }
        Ok(out)
    }

    /// The extended attributes of `inode`, in-inode ones then the attribute block's, named as
    /// Linux shows them (ACLs converted from ext4's compact form to the POSIX xattr form).
    /// Values stored in their own inode (`ea_inode`) are read up to [`MAX_XATTR_VALUE`] bytes.
    /// The system.data attribute of inline data is the file's own bytes, not shown.
    pub fn xattrs(&self, inode: &Inode) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let x = &inode.xattrs;
        if x.len() >= 4 && le32(x, 0) == XATTR_MAGIC {
            // In-inode values are relative to the first entry.
            self.xattr_entries(inode.ino, &x[4..], &x[4..], &mut out)?;
        }
        if inode.file_acl != 0 {
            let block = inode.file_acl;
            if block >= self.sb.blocks {
                return Err(corrupt(format!(
                    "inode {}: attribute block {block} is outside the file system",
                    inode.ino
                )));
            }
            let mut b = vec![0u8; self.sb.block_size as usize];
            self.dev.read_at(block * self.sb.block_size, &mut b)?;
            if le32(&b, 0) != XATTR_MAGIC {
                return Err(corrupt(format!(
                    "inode {}: attribute block {block} has no magic",
                    inode.ino
                )));
            }
            // Block values are relative to the block; entries start after the 32-byte header.
            self.xattr_entries(inode.ino, &b[32..], &b, &mut out)?;
        }
        Ok(out)
    }

    fn xattr_entries(
        &self,
        ino: u32,
        entries: &[u8],
        values: &[u8],
        out: &mut Vec<(Vec<u8>, Vec<u8>)>,
    ) -> io::Result<()> {
        let bad = |what: &str| corrupt(format!("inode {ino}: {what} in its extended attributes"));
        for h in xattr_headers(entries) {
            let Some(h) = h else {
                return Err(bad("a name past the end"));
            };
            let XattrHeader {
                index: idx,
                name,
                value_off,
                value_inum,
                value_size,
            } = h;
            if value_size > MAX_XATTR_VALUE {
                return Err(bad("a value too large"));
            }
            let value = if value_inum != 0 {
                let v = self.inode(value_inum)?;
                let mut all = self.read_all(&v, MAX_XATTR_VALUE as u64)?;
                all.truncate(value_size);
                all
            } else {
                values
                    .get(value_off..value_off + value_size)
                    .ok_or_else(|| bad("a value past the end"))?
                    .to_vec()
            };
            let prefix: &[u8] = match idx {
                1 => b"user.",
                2 => b"system.posix_acl_access",
                3 => b"system.posix_acl_default",
                4 => b"trusted.",
                6 => b"security.",
                7 if name == b"data" => continue,
                7 => b"system.",
                8 => b"system.richacl",
                _ => continue,
            };
            let value = match idx {
                2 | 3 => acl(&value).ok_or_else(|| bad("a malformed ACL"))?,
                _ => value,
            };
            out.push(([prefix, name].concat(), value));
            if out.len() > 1 << 16 {
                return Err(bad("too many"));
            }
        }
        Ok(())
    }

    /// The target of symlink `inode`.
    pub fn read_link(&self, inode: &Inode) -> io::Result<Vec<u8>> {
        if inode.kind() != Some(Kind::Symlink) {
            return Err(corrupt(format!("inode {} is not a symlink", inode.ino)));
        }
        let ea_blocks = if inode.file_acl != 0 {
            self.sb.block_size / 512
        } else {
            0
        };
        if !inode.inline() && inode.blocks.saturating_sub(ea_blocks) == 0 {
            let n = inode.size.min(INLINE_BLOCK as u64) as usize;
            return Ok(inode.block[..n].to_vec());
        }
        self.read_all(inode, self.sb.block_size.max(4096))
    }
}

/// One entry header of an ext4 extended-attribute area.
struct XattrHeader<'a> {
    index: u8,
    name: &'a [u8],
    value_off: usize,
    value_inum: u32,
    value_size: usize,
}

/// The entry headers of an attribute area (in the inode after its magic, or in a block after
/// its header), until the terminating zero entry; `None` for an entry whose name runs past the
/// area (and nothing after it).
fn xattr_headers(area: &[u8]) -> impl Iterator<Item = Option<XattrHeader<'_>>> {
    let mut at = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done || at + 16 > area.len() || le32(area, at) == 0 {
            return None;
        }
        let name_len = area[at] as usize;
        let Some(name) = area.get(at + 16..at + 16 + name_len) else {
            done = true;
            return Some(None);
        };
        let h = XattrHeader {
            index: area[at + 1],
            name,
            value_off: le16(area, at + 2) as usize,
            value_inum: le32(area, at + 4),
            value_size: le32(area, at + 8) as usize,
        };
        at += (16 + name_len).div_ceil(4) * 4;
        Some(Some(h))
    })
}

/// An ext4 ACL (version 1: tag and permissions, plus an id for named users and groups) in
/// the POSIX xattr form Linux shows (version 2: tag, permissions, id for every entry).
fn acl(v: &[u8]) -> Option<Vec<u8>> {
    if v.len() < 4 || le32(v, 0) != 1 {
        return None;
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    let mut at = 4;
    while at < v.len() {
        let (tag, perm) = (le16(v.get(at..at + 2)?, 0), le16(v.get(at + 2..at + 4)?, 0));
        // Named users (2) and groups (8) carry an id; the others do not.
        let id = if tag == 2 || tag == 8 {
            let id = le32(v.get(at + 4..at + 8)?, 0);
            at += 8;
            id
        } else {
            at += 4;
            u32::MAX
        };
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Some(out)
}

/// The number of entries and the depth of an extent-tree node, checked against its size.
fn extent_header(ino: u32, node: &[u8]) -> io::Result<(usize, u16)> {
    if node.len() < 12 || le16(node, 0) != EXTENT_MAGIC {
        return Err(corrupt(format!(
            "inode {ino}: bad magic in the extent tree"
        )));
    }
    let entries = usize::from(le16(node, 2));
    if 12 + entries * 12 > node.len() {
        return Err(corrupt(format!(
            "inode {ino}: {entries} entries overflow an extent-tree node"
        )));
    }
    Ok((entries, le16(node, 6)))
}

/// The state of mapping one file's blocks, with its budgets.
struct MapWalk {
    ino: u32,
    /// Blocks of the file (past them nothing is read); at most 2^48.
    max_blocks: u64,
    fs_blocks: u64,
    /// Tree or pointer blocks that may still be visited.
    node_budget: u64,
    /// Blocks visited as nodes: a block reached twice makes the map a DAG (or a loop).
    seen: HashSet<u64>,
    out: Vec<Extent>,
}

impl MapWalk {
    /// Accounts for reading map node `block`.
    fn visit(&mut self, block: u64) -> io::Result<()> {
        let limit = self.node_budget_limit();
        self.node_budget = self
            .node_budget
            .checked_sub(1)
            .ok_or_else(|| over_budget(self.ino, Budget::MapNodes, limit))?;
        if !self.seen.insert(block) {
            return Err(corrupt(format!(
                "inode {}: block {block} appears twice in the block map",
                self.ino
            )));
        }
        Ok(())
    }

    fn node_budget_limit(&self) -> u64 {
        self.node_budget + self.seen.len() as u64
    }

    /// Adds `len` blocks from file block `logical` (< max_blocks) at `physical`, clipped to the
    /// file; extents come in increasing logical order.
    fn push(&mut self, logical: u64, physical: u64, len: u64) -> io::Result<()> {
        let len = len.min(self.max_blocks - logical);
        if physical
            .checked_add(len)
            .is_none_or(|end| end > self.fs_blocks)
        {
            return Err(corrupt(format!(
                "inode {}: block {physical} of the block map is past the end of the file system",
                self.ino
            )));
        }
        let full = self.out.len() >= MAX_EXTENTS;
        match self.out.last_mut() {
            Some(l) if l.logical + l.len > logical => {
                return Err(corrupt(format!(
                    "inode {}: overlapping extents at file block {logical}",
                    self.ino
                )))
            }
            Some(l) if l.logical + l.len == logical && l.physical + l.len == physical => {
                l.len += len
            }
            _ if full => return Err(over_budget(self.ino, Budget::Extents, MAX_EXTENTS as u64)),
            _ => self.out.push(Extent {
                logical,
                physical,
                len,
            }),
        }
        Ok(())
    }
}

fn parse_entries(ino: u32, b: &[u8], filetype: bool, out: &mut Vec<DirEntry>) -> io::Result<()> {
    let mut at = 0;
    while at + 8 <= b.len() {
        let (entry_ino, rec_len) = (le32(b, at), le16(b, at + 4) as usize);
        let name_len = if filetype {
            b[at + 6] as usize
        } else {
            le16(b, at + 6) as usize
        };
        if rec_len < 8 || at + rec_len > b.len() || 8 + name_len > rec_len {
            return Err(corrupt(format!(
                "directory inode {ino}: bad entry at byte {at}"
            )));
        }
        let name = &b[at + 8..at + 8 + name_len];
        if entry_ino != 0 && name != b"." && name != b".." && !name.is_empty() {
            let kind = match b[at + 7] {
                _ if !filetype => None,
                1 => Some(Kind::File),
                2 => Some(Kind::Dir),
                3 => Some(Kind::CharDevice),
                4 => Some(Kind::BlockDevice),
                5 => Some(Kind::Fifo),
                6 => Some(Kind::Socket),
                7 => Some(Kind::Symlink),
                _ => None,
            };
            out.push(DirEntry {
                ino: entry_ino,
                name: name.to_vec(),
                kind,
            });
        }
        at += rec_len;
    }
    Ok(())
}

/// A piece of a read: `len` bytes at `buf_offset` in the caller's buffer, from `disk` (or zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub buf_offset: u64,
    pub len: u64,
    pub disk: Option<u64>,
}

/// Splits a read of `len` bytes at file `offset` into disk ranges and zero ranges.
/// Appends `len` bytes from byte `offset` of a file mapped by `extents` (in `block_size` blocks
/// of `dev`) to `out`, holes as zeros.
pub fn read_extents_append(
    dev: &(impl ReadAt + ?Sized),
    extents: &[Extent],
    block_size: u64,
    offset: u64,
    len: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    for run in runs(extents, block_size, offset, len as u64) {
        match run.disk {
            Some(at) => dev.read_append(at, run.len as usize, out)?,
            None => out.resize(out.len() + run.len as usize, 0),
        }
    }
    Ok(())
}

pub fn runs(extents: &[Extent], block_size: u64, offset: u64, len: u64) -> Vec<Run> {
    let mut out = Vec::new();
    let end = offset + len;
    // The first extent that ends after `offset`.
    let first = extents.partition_point(|e| (e.logical + e.len) * block_size <= offset);
    let mut pos = offset;
    for e in &extents[first..] {
        let (e_start, e_end) = (e.logical * block_size, (e.logical + e.len) * block_size);
        if e_start >= end {
            break;
        }
        if e_start > pos {
            out.push(Run {
                buf_offset: pos - offset,
                len: e_start - pos,
                disk: None,
            });
            pos = e_start;
        }
        let n = e_end.min(end) - pos;
        out.push(Run {
            buf_offset: pos - offset,
            len: n,
            disk: Some(e.physical * block_size + (pos - e_start)),
        });
        pos += n;
    }
    if pos < end {
        out.push(Run {
            buf_offset: pos - offset,
            len: end - pos,
            disk: None,
        });
    }
    out
}

/// Free byte ranges found in disk order, merged when they touch, at most `max` of them: past
/// that the smallest go (reading them is the cost), as a doubling minimum length.
pub struct Ranges {
    out: Vec<(u64, u64)>,
    max: usize,
    min_len: u64,
}

impl Ranges {
    pub fn new(max: usize) -> Self {
        Ranges {
            out: Vec::new(),
            max: max.max(1),
            min_len: 0,
        }
    }

    /// Adds `[s, e)`, which starts at or after every range so far.
    pub fn push(&mut self, s: u64, e: u64) {
        if s >= e {
            return;
        }
        match self.out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => self.out.push((s, e)),
        }
        while self.out.len() > self.max {
            self.min_len = self.min_len.saturating_mul(2).max(1);
            let min = self.min_len;
            // The last range may still grow: keep it whatever its length.
            let last = self.out.pop();
            self.out.retain(|(s, e)| e - s >= min);
            self.out.extend(last);
        }
    }

    pub fn finish(mut self) -> Vec<(u64, u64)> {
        let min = self.min_len;
        self.out.retain(|(s, e)| e - s >= min);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_the_read_exactly() {
        let ext = [
            Extent {
                logical: 1,
                physical: 100,
                len: 2,
            },
            Extent {
                logical: 5,
                physical: 50,
                len: 1,
            },
        ];
        let r = runs(&ext, 10, 5, 50);
        assert_eq!(
            r,
            vec![
                Run {
                    buf_offset: 0,
                    len: 5,
                    disk: None
                },
                Run {
                    buf_offset: 5,
                    len: 20,
                    disk: Some(1000)
                },
                Run {
                    buf_offset: 25,
                    len: 20,
                    disk: None
                },
                Run {
                    buf_offset: 45,
                    len: 5,
                    disk: Some(500)
                },
            ]
        );
        assert_eq!(
            runs(&ext, 10, 60, 10),
            vec![Run {
                buf_offset: 0,
                len: 10,
                disk: None
            }]
        );
        assert_eq!(
            runs(&ext, 10, 12, 3),
            vec![Run {
                buf_offset: 0,
                len: 3,
                disk: Some(1002)
            }]
        );
    }

    #[test]
    fn entries_parse_and_reject_bad_lengths() {
        let mut b = vec![0u8; 32];
        b[0..4].copy_from_slice(&12u32.to_le_bytes());
        b[4..6].copy_from_slice(&16u16.to_le_bytes());
        b[6] = 3;
        b[7] = 1;
        b[8..11].copy_from_slice(b"abc");
        // A deleted entry (inode 0) spanning the rest.
        b[20..22].copy_from_slice(&12u16.to_le_bytes());
        b[16..20].copy_from_slice(&0u32.to_le_bytes());
        let mut out = Vec::new();
        parse_entries(2, &b[..16], true, &mut out).unwrap();
        assert_eq!(
            out,
            vec![DirEntry {
                ino: 12,
                name: b"abc".to_vec(),
                kind: Some(Kind::File),
            }]
        );
        b[4..6].copy_from_slice(&4u16.to_le_bytes());
        assert!(parse_entries(2, &b, true, &mut Vec::new()).is_err());
        b[4..6].copy_from_slice(&64u16.to_le_bytes());
        assert!(parse_entries(2, &b, true, &mut Vec::new()).is_err());
    }

    #[test]
    fn not_ext_is_none() {
        struct Zeros;
        impl ReadAt for Zeros {
            fn read_at(&self, _: u64, buf: &mut [u8]) -> io::Result<()> {
                buf.fill(0);
                Ok(())
            }
        }
        assert!(Ext4::open(Zeros, 1 << 20).unwrap().is_none());
        assert!(Ext4::open(Zeros, 100).unwrap().is_none());
    }
}
