//! A read-only btrfs reader in user space (single-device file systems), so a mount, `rp ls` or a
//! file restore can show the files of a Fedora or openSUSE disk inside a disk RP without root, a
//! loop device or a kernel module.
//!
//! Model: [`Btrfs::open`] reads the primary superblock, maps logical to physical addresses with
//! the system chunks it carries, then reads the whole chunk tree into a sorted chunk list (one
//! entry per chunk, kept in memory: at most [`MAX_CHUNKS`]). Everything else is read on demand:
//! B-tree nodes through a bounded cache, every lookup a descent from a tree's root. The root
//! tree names the subvolumes; the file system shown is the default subvolume (what the kernel
//! mounts without `subvol=`), and every subvolume or snapshot inside it is a directory, as the
//! kernel shows it. A subvolume entry that is not the subvolume's own place (a snapshot's copy
//! of a nested subvolume) is an empty directory, as in the kernel.
//!
//! Inode numbers: inode `i` of the default subvolume is `i`; inode `i` of the `n`th other
//! subvolume met is `n << 40 | i` (at most [`MAX_SUBVOLUMES`] of them; inodes numbered past
//! 2^40, some 10^12 files, are refused).
//!
//! Supported: single, DUP and RAID1-family chunks (any copy on this device is read); inline,
//! regular, preallocated (read as zeros) and hole extents; zlib, LZO and zstd compression;
//! reflinks and snapshots (shared extents read the same from every owner); xattrs and POSIX ACLs
//! (stored by btrfs exactly as Linux shows them); the no-holes, skinny-metadata, extended-iref,
//! metadata-UUID, big-metadata, free-space-tree, block-group-tree and simple-quota features.
//! Refused clearly: file systems spanning several devices, RAID0/10/5/6 chunks, zoned and
//! extent-tree-v2 and raid-stripe-tree file systems, encrypted or otherwise encoded extents,
//! and unknown incompatible features. Node checksums are verified when they are CRC32C (the
//! default); other checksum kinds rely on the structure checks below. The log tree is not
//! replayed, like `mount -o ro,nologreplay`.
//!
//! Invariants: nothing is written; every on-disk number is bounds-checked with checked
//! arithmetic, so a damaged or hostile image gives an `InvalidData` error naming the inode,
//! never a panic or an unbounded allocation. Every node read must name its own address, the
//! file system, and the level its parent expects (so descents end), and keys must rise
//! strictly within every node and a child must start with the key its parent points at it by (so
//! no node is reached twice in one search); extents and chunks must lie on sectors and only a
//! file's first extent may be inline, as the kernel's tree checker requires. Budgets (exceeding
//! one fails that one inode or search):
//!
//! * one search: at most [`MAX_SEARCH_NODES`] nodes;
//! * a file's extents: at most [`MAX_EXTENTS`]; a compressed extent: at most
//!   [`MAX_COMPRESSED`] bytes on disk and uncompressed;
//! * a directory: at most [`MAX_DIR_ENTRIES`] entries; attributes: [`MAX_XATTR_BYTES`];
//! * the node cache: [`NODE_CACHE`] nodes (at most 64 KiB each).

use std::collections::HashMap;
use std::io;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use crate::ext4::{Kind, ReadAt, Time};
use crate::filesystem::{Attr, CachedDevice, Entry, FileData, FileSystem, Le, Xattrs};

/// Chunks of one file system (a chunk is ≥ 1 MiB: this covers 64 TiB at the smallest).
pub const MAX_CHUNKS: usize = 1 << 16;
/// Nodes visited by one tree search.
pub const MAX_SEARCH_NODES: u32 = 1 << 18;
/// Extents kept for one open file.
pub const MAX_EXTENTS: usize = 1 << 20;
/// Entries of one directory listing.
pub const MAX_DIR_ENTRIES: usize = 1 << 20;
/// Bytes of attribute names and values of one inode.
pub const MAX_XATTR_BYTES: usize = 4 << 20;
/// Subvolumes besides the default one that get inode numbers.
pub const MAX_SUBVOLUMES: usize = (1 << 16) - 1;
/// The largest compressed extent the kernel writes (on disk and uncompressed).
pub const MAX_COMPRESSED: u64 = 128 << 10;
/// Tree nodes kept in memory.
pub const NODE_CACHE: usize = 1024;
/// B-trees are at most this many levels deep (`BTRFS_MAX_LEVEL`).
const MAX_LEVEL: u8 = 8;
/// Inode numbers below this fit the packing (see the module comment).
const INO_BITS: u32 = 40;
/// The longest name of an entry or attribute (`BTRFS_NAME_LEN`).
const MAX_NAME: usize = 255;
/// The longest symlink target (`PATH_MAX` with its terminator).
const MAX_SYMLINK: u64 = 4095;

const SUPER_OFFSET: u64 = 0x10000;
const SUPER_SIZE: usize = 4096;
const HEADER: usize = 101;
const KEY: usize = 17;
const LEAF_ITEM: usize = KEY + 8;
const KEY_PTR: usize = KEY + 16;
const CHUNK_ITEM_SIZE: usize = 48;
const STRIPE_SIZE: usize = 32;
const DIR_ITEM_SIZE: usize = 30;
const INODE_ITEM_SIZE: usize = 160;

// Item types.
const INODE_ITEM: u8 = 1;
const XATTR_ITEM: u8 = 24;
const DIR_ITEM: u8 = 84;
const DIR_INDEX: u8 = 96;
const EXTENT_DATA: u8 = 108;
const ROOT_ITEM: u8 = 132;
const ROOT_REF: u8 = 156;
const CHUNK_ITEM: u8 = 228;

// Object ids.
const FS_TREE: u64 = 5;
const ROOT_TREE_DIR: u64 = 6;
const FIRST_CHUNK_TREE: u64 = 256;
/// What the kernel shows for a snapshot's copy of a nested subvolume: an empty directory.
const EMPTY_SUBVOL_DIR: u64 = 2;

// Chunk profile bits.
const RAID0: u64 = 1 << 3;
const RAID10: u64 = 1 << 6;
const RAID5: u64 = 1 << 7;
const RAID6: u64 = 1 << 8;

const CSUM_CRC32C: u16 = 0;
const INCOMPAT_METADATA_UUID: u64 = 1 << 10;
/// Mixed backrefs, default subvolume, mixed groups, LZO, zstd, big metadata, extended irefs,
/// RAID5/6 (its chunks are refused one by one), skinny metadata, no holes, metadata UUID,
/// RAID1C3/4, simple quotas: none changes how this reader reads files.
const INCOMPAT_KNOWN: u64 = 0b1_0000_1111_1111_1111;

const COMPRESS_ZLIB: u8 = 1;
const COMPRESS_LZO: u8 = 2;
const COMPRESS_ZSTD: u8 = 3;

fn corrupt(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("btrfs: {what}"))
}

fn unsupported(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, format!("btrfs: {what}"))
}

/// btrfs's structures on top of the bounds-checked reads.
impl Le<'_> {
    fn key(self, at: usize) -> io::Result<Key> {
        Ok(Key {
            objectid: self.u64(at)?,
            kind: self.u8(at + 8)?,
            offset: self.u64(at + 9)?,
        })
    }
    fn time(self, at: usize) -> io::Result<Time> {
        // Within ±2^40 s (35,000 years) of 1970, so every time is a valid SystemTime.
        const LIMIT: i64 = 1 << 40;
        Ok(Time {
            secs: (self.u64(at)? as i64).clamp(-LIMIT, LIMIT),
            nanos: self.u32(at + 8)?.min(999_999_999),
        })
    }
}

/// A B-tree key, ordered as btrfs orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    objectid: u64,
    kind: u8,
    offset: u64,
}

impl Key {
    /// Every key of `objectid` and `kind`, as a search range.
    fn all(objectid: u64, kind: u8) -> (Key, Key) {
        (
            Key {
                objectid,
                kind,
                offset: 0,
            },
            Key {
                objectid,
                kind,
                offset: u64::MAX,
            },
        )
    }
}

/// A logical address range and where its copy on this device starts.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    logical: u64,
    len: u64,
    physical: u64,
}

#[derive(Debug, Clone)]
struct Super {
    sector: u64,
    node_size: usize,
    root: u64,
    root_level: u8,
    chunk_root: u64,
    chunk_root_level: u8,
    devid: u64,
    /// The id nodes carry (the metadata UUID where the file system has one).
    fsid: [u8; 16],
    crc32c: bool,
    label: String,
}

/// A subvolume's tree.
#[derive(Debug, Clone, Copy)]
struct Tree {
    id: u64,
    bytenr: u64,
    level: u8,
    root_dir: u64,
}

#[derive(Default)]
struct Trees {
    /// Index 0 is the default subvolume.
    list: Vec<Tree>,
    by_id: HashMap<u64, usize>,
}

/// A read-only single-device btrfs file system on `R`.
pub struct Btrfs<R> {
    dev: R,
    size: u64,
    sb: Super,
    chunks: Vec<Chunk>,
    trees: Mutex<Trees>,
    nodes: Mutex<lru::LruCache<u64, Arc<Vec<u8>>>>,
}

/// One inode's metadata.
#[derive(Debug, Clone)]
struct Inode {
    size: u64,
    nbytes: u64,
    nlink: u32,
    uid: u32,
    gid: u32,
    mode: u32,
    rdev: u64,
    atime: Time,
    ctime: Time,
    mtime: Time,
    otime: Time,
}

fn crc32c(b: &[u8]) -> u32 {
    const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    CRC.checksum(b)
}

fn parse_super(b: Le, size: u64) -> io::Result<Super> {
    if b.u64(48)? != SUPER_OFFSET {
        return Err(corrupt("the superblock does not name its own place"));
    }
    let csum_type = b.u16(196)?;
    // Fuzzing checks everything else: a mutated byte would fail the checksum first.
    let crc = csum_type == CSUM_CRC32C && !cfg!(fuzzing);
    if crc && b.u32(0)? != crc32c(b.bytes(32, SUPER_SIZE - 32)?) {
        return Err(corrupt("the superblock's checksum does not match"));
    }
    let incompat = b.u64(188)?;
    if incompat & !INCOMPAT_KNOWN != 0 {
        return Err(unsupported(format!(
            "incompatible features {:#x} (zoned, extent tree v2, raid stripe tree or newer)",
            incompat & !INCOMPAT_KNOWN
        )));
    }
    let num_devices = b.u64(136)?;
    if num_devices != 1 {
        return Err(unsupported(format!(
            "the file system spans {num_devices} devices; elastio reads single-device btrfs"
        )));
    }
    let sector = b.u32(144)? as u64;
    let node_size = b.u32(148)? as usize;
    if !sector.is_power_of_two() || !(512..=65536).contains(&sector) {
        return Err(corrupt(format!("sector size {sector}")));
    }
    if !node_size.is_power_of_two() || !(4096..=65536).contains(&node_size) {
        return Err(corrupt(format!("node size {node_size}")));
    }
    let (root_level, chunk_root_level) = (b.u8(198)?, b.u8(199)?);
    if root_level >= MAX_LEVEL || chunk_root_level >= MAX_LEVEL {
        return Err(corrupt("a tree root deeper than btrfs allows"));
    }
    let fsid_at = if incompat & INCOMPAT_METADATA_UUID != 0 {
        0x23b
    } else {
        32
    };
    let label = b.bytes(0x12b, 256)?;
    let label = &label[..label.iter().position(|&c| c == 0).unwrap_or(256)];
    let total = b.u64(112)?;
    if total > size.saturating_add(1 << 20) {
        tracing::debug!("btrfs: the superblock says {total} bytes, the device has {size}");
    }
    Ok(Super {
        sector,
        node_size,
        root: b.u64(80)?,
        root_level,
        chunk_root: b.u64(88)?,
        chunk_root_level,
        devid: b.u64(0xc9)?,
        fsid: b.bytes(fsid_at, 16)?.try_into().unwrap(),
        crc32c: crc,
        label: String::from_utf8_lossy(label).into_owned(),
    })
}

/// The chunk item at `at` of `b` as a chunk on device `devid`; its size in bytes.
fn parse_chunk(b: Le, at: usize, logical: u64, sb: &Super) -> io::Result<(Option<Chunk>, usize)> {
    let devid = sb.devid;
    let len = b.u64(at)?;
    let kind = b.u64(at + 24)?;
    let stripes = b.u16(at + 44)? as usize;
    let size = CHUNK_ITEM_SIZE + stripes * STRIPE_SIZE;
    b.bytes(at, size)?;
    let sector = sb.sector;
    if stripes == 0 || len == 0 || logical.checked_add(len).is_none() {
        return Err(corrupt(format!(
            "chunk at {logical}: {stripes} stripes of {len} bytes"
        )));
    }
    if kind & (RAID0 | RAID10 | RAID5 | RAID6) != 0 && stripes > 1 {
        return Err(unsupported(format!(
            "chunk at {logical} is striped (profile {kind:#x}); elastio reads single, DUP and RAID1 chunks"
        )));
    }
    // Every stripe of a single, DUP or RAID1-family chunk holds the whole chunk.
    for s in 0..stripes {
        let st = at + CHUNK_ITEM_SIZE + s * STRIPE_SIZE;
        if b.u64(st)? == devid {
            let physical = b.u64(st + 8)?;
            if [logical, len, physical]
                .iter()
                .any(|v| !v.is_multiple_of(sector))
            {
                return Err(corrupt(format!("chunk at {logical} is not on sectors")));
            }
            physical
                .checked_add(len)
                .ok_or_else(|| corrupt(format!("chunk at {logical} ends past 2^64")))?;
            let chunk = Chunk {
                logical,
                len,
                physical,
            };
            return Ok((Some(chunk), size));
        }
    }
    Ok((None, size))
}

/// Chunks sorted by logical address, duplicates (the superblock's copies) dropped; overlaps
/// are damage.
fn sorted_chunks(mut chunks: Vec<Chunk>) -> io::Result<Vec<Chunk>> {
    chunks.sort_by_key(|c| (c.logical, c.len));
    chunks.dedup_by(|b, a| a.logical == b.logical && a.len == b.len);
    for w in chunks.windows(2) {
        if w[0].logical + w[0].len > w[1].logical {
            return Err(corrupt(format!(
                "chunks at {} and {} overlap",
                w[0].logical, w[1].logical
            )));
        }
    }
    Ok(chunks)
}

impl<R: ReadAt> Btrfs<R> {
    /// Opens the btrfs file system on `dev` (`size` bytes). `Ok(None)` when there is no btrfs
    /// superblock; an error when there is one this reader cannot trust or read.
    pub fn open(dev: R, size: u64) -> io::Result<Option<Self>> {
        if size < SUPER_OFFSET + SUPER_SIZE as u64 {
            return Ok(None);
        }
        let mut raw = vec![0u8; SUPER_SIZE];
        dev.read_at(SUPER_OFFSET, &mut raw)?;
        if &raw[64..72] != b"_BHRfS_M" {
            return Ok(None);
        }
        let b = Le(&raw);
        let sb = parse_super(b, size)?;
        // The system chunks the superblock carries map the chunk tree.
        let array_len = b.u32(160)? as usize;
        let array = Le(b.bytes(0x32b, array_len.min(2048))?);
        let mut sys = Vec::new();
        let mut at = 0;
        while at < array.0.len() {
            let key = array.key(at)?;
            if key.kind != CHUNK_ITEM {
                return Err(corrupt(
                    "the superblock's system chunks hold something else",
                ));
            }
            let (chunk, n) = parse_chunk(array, at + KEY, key.offset, &sb)?;
            sys.extend(chunk);
            at += KEY + n;
        }
        let mut fs = Btrfs {
            dev,
            size,
            sb,
            chunks: sorted_chunks(sys)?,
            trees: Mutex::default(),
            nodes: Mutex::new(lru::LruCache::new(NonZeroUsize::new(NODE_CACHE).unwrap())),
        };
        let mut chunks = Vec::new();
        let (lo, hi) = Key::all(FIRST_CHUNK_TREE, CHUNK_ITEM);
        let (root, level) = (fs.sb.chunk_root, fs.sb.chunk_root_level);
        fs.search(root, level, lo, hi, &mut |key, item| {
            if chunks.len() >= MAX_CHUNKS {
                return Err(corrupt(format!("more than {MAX_CHUNKS} chunks")));
            }
            chunks.extend(parse_chunk(Le(item), 0, key.offset, &fs.sb)?.0);
            Ok(true)
        })?;
        fs.chunks = sorted_chunks(chunks)?;
        fs.nodes.lock().unwrap().clear();
        let default = fs.default_subvolume()?;
        let tree = fs
            .find_tree(default)?
            .ok_or_else(|| corrupt(format!("the default subvolume {default} has no root")))?;
        Self::ino(0, tree.root_dir)?;
        let mut trees = fs.trees.lock().unwrap();
        trees.list.push(tree);
        trees.by_id.insert(tree.id, 0);
        drop(trees);
        Ok(Some(fs))
    }

    pub fn label(&self) -> &str {
        &self.sb.label
    }

    pub fn device(&self) -> &R {
        &self.dev
    }

    /// The device range holding logical `[logical, logical + len)` when it lies in one chunk.
    fn physical(&self, logical: u64, len: u64) -> io::Result<(u64, u64)> {
        let i = self.chunks.partition_point(|c| c.logical <= logical);
        let c = i
            .checked_sub(1)
            .map(|i| self.chunks[i])
            .filter(|c| logical - c.logical < c.len)
            .ok_or_else(|| {
                corrupt(format!(
                    "logical address {logical} is in no chunk on this device"
                ))
            })?;
        let n = len.min(c.len - (logical - c.logical));
        let at = c.physical + (logical - c.logical);
        if at.checked_add(n).is_none_or(|end| end > self.size) {
            return Err(corrupt(format!(
                "logical address {logical} maps past the device's end"
            )));
        }
        Ok((at, n))
    }

    /// Fills `buf` from logical address `logical` (across chunks).
    fn read_logical(&self, mut logical: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let (at, n) = self.physical(logical, (buf.len() - done) as u64)?;
            self.dev.read_at(at, &mut buf[done..done + n as usize])?;
            done += n as usize;
            logical += n;
        }
        Ok(())
    }

    /// The tree node at `logical`, checked to be a node of this file system at `level`.
    fn node(&self, logical: u64, level: u8) -> io::Result<Arc<Vec<u8>>> {
        if let Some(n) = self.nodes.lock().unwrap().get(&logical) {
            if n[100] == level {
                return Ok(n.clone());
            }
            return Err(corrupt(format!(
                "node {logical} is at level {}, not {level}",
                n[100]
            )));
        }
        let mut raw = vec![0u8; self.sb.node_size];
        self.read_logical(logical, &mut raw)?;
        let b = Le(&raw);
        if self.sb.crc32c && b.u32(0)? != crc32c(&raw[32..]) {
            return Err(corrupt(format!("node {logical}: checksum mismatch")));
        }
        if b.bytes(32, 16)? != self.sb.fsid || b.u64(48)? != logical {
            return Err(corrupt(format!("node {logical} belongs elsewhere")));
        }
        if raw[100] != level {
            return Err(corrupt(format!(
                "node {logical} is at level {}, not {level}",
                raw[100]
            )));
        }
        let items = b.u32(96)? as usize;
        let each = if level == 0 { LEAF_ITEM } else { KEY_PTR };
        if items
            .checked_mul(each)
            .is_none_or(|n| HEADER + n > raw.len())
        {
            return Err(corrupt(format!("node {logical} claims {items} items")));
        }
        for i in 1..items {
            if b.key(HEADER + (i - 1) * each)? >= b.key(HEADER + i * each)? {
                return Err(corrupt(format!("node {logical}: keys out of order")));
            }
        }
        let raw = Arc::new(raw);
        self.nodes.lock().unwrap().put(logical, raw.clone());
        Ok(raw)
    }

    /// Calls `f` with every item of the tree at (`root`, `level`) whose key is in `[lo, hi]`,
    /// in key order, until it returns false.
    fn search(
        &self,
        root: u64,
        level: u8,
        lo: Key,
        hi: Key,
        f: &mut dyn FnMut(Key, &[u8]) -> io::Result<bool>,
    ) -> io::Result<()> {
        let mut s = Search {
            nodes: 0,
            last: None,
        };
        self.descend(root, level, None, lo, hi, &mut s, f)
            .map(|_| ())
    }

    /// One node of [`Self::search`]; false when the search is over.
    #[allow(clippy::too_many_arguments)]
    fn descend(
        &self,
        at: u64,
        level: u8,
        first_key: Option<Key>,
        lo: Key,
        hi: Key,
        s: &mut Search,
        f: &mut dyn FnMut(Key, &[u8]) -> io::Result<bool>,
    ) -> io::Result<bool> {
        s.nodes += 1;
        if s.nodes > MAX_SEARCH_NODES {
            return Err(corrupt(format!(
                "a search visits more than {MAX_SEARCH_NODES} nodes"
            )));
        }
        let node = self.node(at, level)?;
        let b = Le(&node);
        let items = b.u32(96)? as usize;
        // A child starts with the key its parent points at it by (so, with keys rising in
        // every node, no node is reached twice) and is never empty.
        if let Some(k) = first_key {
            if items == 0 || b.key(HEADER)? != k {
                return Err(corrupt(format!("node {at} is not where its parent says")));
            }
        }
        if level == 0 {
            for i in 0..items {
                let e = HEADER + i * LEAF_ITEM;
                let key = b.key(e)?;
                if key < lo {
                    continue;
                }
                if key > hi {
                    return Ok(false);
                }
                s.rising(key, at)?;
                let (off, len) = (b.u32(e + KEY)? as usize, b.u32(e + KEY + 4)? as usize);
                let data = Le(&node[HEADER..]).bytes(off, len)?;
                if !f(key, data)? {
                    return Ok(false);
                }
            }
            return Ok(true);
        }
        // Child i holds keys from its key up to the next child's.
        let mut first = 0;
        for i in 0..items {
            if b.key(HEADER + i * KEY_PTR)? <= lo {
                first = i;
            } else {
                break;
            }
        }
        for i in first..items {
            let e = HEADER + i * KEY_PTR;
            let key = b.key(e)?;
            if key > hi {
                return Ok(false);
            }
            if !self.descend(b.u64(e + KEY)?, level - 1, Some(key), lo, hi, s, f)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The subvolume the kernel mounts when no `subvol=` is given.
    fn default_subvolume(&self) -> io::Result<u64> {
        let mut found = FS_TREE;
        let (lo, hi) = Key::all(ROOT_TREE_DIR, DIR_ITEM);
        self.search(self.sb.root, self.sb.root_level, lo, hi, &mut |_, item| {
            for_each_dir_item(item, &mut |loc, _, name, _| {
                if name == b"default" {
                    found = loc.objectid;
                }
                Ok(())
            })?;
            Ok(true)
        })?;
        Ok(found)
    }

    /// The root of subvolume (or tree) `id`, from the root tree.
    fn find_tree(&self, id: u64) -> io::Result<Option<Tree>> {
        let mut found = None;
        let (lo, hi) = Key::all(id, ROOT_ITEM);
        self.search(self.sb.root, self.sb.root_level, lo, hi, &mut |_, item| {
            let b = Le(item);
            let level = b.u8(238)?;
            if level >= MAX_LEVEL {
                return Err(corrupt(format!(
                    "subvolume {id}'s tree is {level} levels deep"
                )));
            }
            found = Some(Tree {
                id,
                bytenr: b.u64(176)?,
                level,
                root_dir: b.u64(168)?,
            });
            Ok(false)
        })?;
        Ok(found)
    }

    /// Whether subvolume `child` is attached to directory `dir` of tree `parent` as `name`.
    fn is_attached(&self, parent: u64, child: u64, dir: u64, name: &[u8]) -> io::Result<bool> {
        let mut yes = false;
        let key = Key {
            objectid: parent,
            kind: ROOT_REF,
            offset: child,
        };
        self.search(
            self.sb.root,
            self.sb.root_level,
            key,
            key,
            &mut |_, item| {
                let b = Le(item);
                let n = b.u16(16)? as usize;
                yes = b.u64(0)? == dir && b.bytes(18, n)? == name;
                Ok(false)
            },
        )?;
        Ok(yes)
    }

    /// (tree, object id) of inode `ino`.
    fn locate(&self, ino: u64) -> io::Result<(Tree, u64)> {
        let idx = (ino >> INO_BITS) as usize;
        let tree = self.trees.lock().unwrap().list.get(idx).copied();
        let tree = tree.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok((tree, ino & ((1 << INO_BITS) - 1)))
    }

    /// The inode number of object `objectid` of the subvolume at index `idx`.
    fn ino(idx: usize, objectid: u64) -> io::Result<u64> {
        if objectid >> INO_BITS != 0 {
            return Err(unsupported(format!(
                "inode number {objectid} is past 2^{INO_BITS}"
            )));
        }
        Ok((idx as u64) << INO_BITS | objectid)
    }

    /// The index of subvolume `id`, given one when first met.
    fn subvolume(&self, id: u64) -> io::Result<Option<(usize, Tree)>> {
        let known = {
            let trees = self.trees.lock().unwrap();
            trees.by_id.get(&id).map(|&i| (i, trees.list[i]))
        };
        if known.is_some() {
            return Ok(known);
        }
        let Some(tree) = self.find_tree(id)? else {
            return Ok(None);
        };
        let mut trees = self.trees.lock().unwrap();
        if let Some(&i) = trees.by_id.get(&id) {
            return Ok(Some((i, trees.list[i])));
        }
        if trees.list.len() > MAX_SUBVOLUMES {
            return Err(unsupported(format!(
                "more than {MAX_SUBVOLUMES} subvolumes"
            )));
        }
        let i = trees.list.len();
        trees.list.push(tree);
        trees.by_id.insert(id, i);
        Ok(Some((i, tree)))
    }

    fn inode(&self, ino: u64) -> io::Result<Inode> {
        let (tree, objectid) = self.locate(ino)?;
        let mut found = None;
        let key = Key {
            objectid,
            kind: INODE_ITEM,
            offset: 0,
        };
        self.search(tree.bytenr, tree.level, key, key, &mut |_, item| {
            let b = Le(item);
            b.bytes(0, INODE_ITEM_SIZE)?;
            found = Some(Inode {
                size: b.u64(16)?,
                nbytes: b.u64(24)?,
                nlink: b.u32(40)?,
                uid: b.u32(44)?,
                gid: b.u32(48)?,
                mode: b.u32(52)?,
                rdev: b.u64(56)?,
                atime: b.time(112)?,
                ctime: b.time(124)?,
                mtime: b.time(136)?,
                otime: b.time(148)?,
            });
            Ok(false)
        })?;
        found.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn list(&self, ino: u64) -> io::Result<Vec<Entry>> {
        let (tree, dir) = self.locate(ino)?;
        let idx = (ino >> INO_BITS) as usize;
        if dir == EMPTY_SUBVOL_DIR {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let (lo, hi) = Key::all(dir, DIR_INDEX);
        self.search(tree.bytenr, tree.level, lo, hi, &mut |_, item| {
            for_each_dir_item(item, &mut |loc, kind, name, _| {
                if out.len() >= MAX_DIR_ENTRIES {
                    return Err(corrupt(format!("more than {MAX_DIR_ENTRIES} entries")));
                }
                if name.contains(&b'/') || name.contains(&0) || name == b"." || name == b".." {
                    return Err(corrupt(format!(
                        "directory {dir}: an entry named {:?}",
                        String::from_utf8_lossy(name)
                    )));
                }
                let ino = match loc.kind {
                    INODE_ITEM => Self::ino(idx, loc.objectid)?,
                    ROOT_ITEM => match self.subvolume(loc.objectid)? {
                        Some((i, t)) if self.is_attached(tree.id, loc.objectid, dir, name)? => {
                            Self::ino(i, t.root_dir)?
                        }
                        _ => Self::ino(idx, EMPTY_SUBVOL_DIR)?,
                    },
                    k => return Err(corrupt(format!("an entry points at an item of type {k}"))),
                };
                out.push(Entry {
                    name: name.to_vec(),
                    ino,
                    kind: dir_kind(kind),
                });
                Ok(())
            })?;
            Ok(true)
        })?;
        Ok(out)
    }

    fn xattr_list(&self, ino: u64) -> io::Result<Xattrs> {
        let (tree, objectid) = self.locate(ino)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        if objectid == EMPTY_SUBVOL_DIR {
            return Ok(out);
        }
        let (lo, hi) = Key::all(objectid, XATTR_ITEM);
        self.search(tree.bytenr, tree.level, lo, hi, &mut |_, item| {
            for_each_dir_item(item, &mut |_, _, name, value| {
                bytes += name.len() + value.len();
                if bytes > MAX_XATTR_BYTES {
                    return Err(corrupt(format!(
                        "more than {MAX_XATTR_BYTES} bytes of xattrs"
                    )));
                }
                out.push((name.to_vec(), value.to_vec()));
                Ok(())
            })?;
            Ok(true)
        })?;
        Ok(out)
    }

    /// The extents of regular file or symlink `ino`, in file order, checked not to overlap.
    fn extents(&self, ino: u64) -> io::Result<Vec<FileExtent>> {
        let (tree, objectid) = self.locate(ino)?;
        let mut out: Vec<FileExtent> = Vec::new();
        let (lo, hi) = Key::all(objectid, EXTENT_DATA);
        self.search(tree.bytenr, tree.level, lo, hi, &mut |key, item| {
            if out.len() >= MAX_EXTENTS {
                return Err(corrupt(format!("more than {MAX_EXTENTS} extents")));
            }
            let e = self.parse_extent(key.offset, Le(item))?;
            if out.last().is_some_and(|p| p.start + p.len > e.start) {
                return Err(corrupt(format!("extents overlap at offset {}", e.start)));
            }
            if e.len > 0 {
                out.push(e);
            }
            Ok(true)
        })?;
        Ok(out)
    }

    fn parse_extent(&self, start: u64, b: Le) -> io::Result<FileExtent> {
        let ram = b.u64(8)?;
        let (compression, encryption, encoding, kind) =
            (b.u8(16)?, b.u8(17)?, b.u16(18)?, b.u8(20)?);
        if encryption != 0 || encoding != 0 {
            return Err(unsupported(format!(
                "the extent at offset {start} is encrypted or encoded"
            )));
        }
        // As the kernel's tree checker: extents start on sectors, and only the first may be
        // inline (so a file holds at most one inline extent in memory).
        let sector = self.sb.sector;
        if !start.is_multiple_of(sector) || (kind == 0 && start != 0) {
            return Err(corrupt(format!(
                "an extent of type {kind} at offset {start}"
            )));
        }
        if compression > COMPRESS_ZSTD {
            return Err(unsupported(format!("compression method {compression}")));
        }
        let end = |len: u64| {
            start
                .checked_add(len)
                .map(|_| len)
                .ok_or_else(|| corrupt(format!("an extent at {start} ends past 2^64")))
        };
        Ok(match kind {
            0 => {
                let data = &b.0[21..];
                let bytes = if compression == 0 {
                    data.to_vec()
                } else {
                    if ram > MAX_COMPRESSED {
                        return Err(corrupt(format!("an inline extent of {ram} bytes")));
                    }
                    decompress(compression, data, ram as usize, self.sb.sector as usize)?
                };
                FileExtent {
                    start,
                    len: end(bytes.len() as u64)?,
                    data: Data::Inline(Arc::new(bytes)),
                }
            }
            1 | 2 => {
                let (disk, disk_len, offset, len) =
                    (b.u64(21)?, b.u64(29)?, b.u64(37)?, end(b.u64(45)?)?);
                if [disk, disk_len, offset, len]
                    .iter()
                    .any(|v| !v.is_multiple_of(sector))
                {
                    return Err(corrupt(format!(
                        "the extent at offset {start} is not on sectors"
                    )));
                }
                let data = if disk == 0 || kind == 2 {
                    Data::Zeros
                } else if compression == 0 {
                    if offset.checked_add(len).is_none_or(|e| e > disk_len) {
                        return Err(corrupt(format!(
                            "the extent at offset {start} reads past its {disk_len} bytes"
                        )));
                    }
                    Data::Plain(disk.checked_add(offset).ok_or_else(|| {
                        corrupt(format!("the extent at offset {start} ends past 2^64"))
                    })?)
                } else {
                    if disk_len > MAX_COMPRESSED || ram > MAX_COMPRESSED {
                        return Err(corrupt(format!(
                            "a compressed extent of {disk_len} bytes holding {ram}"
                        )));
                    }
                    if offset.checked_add(len).is_none_or(|e| e > ram) {
                        return Err(corrupt(format!(
                            "the extent at offset {start} reads past its {ram} bytes"
                        )));
                    }
                    Data::Compressed {
                        disk,
                        disk_len,
                        ram,
                        offset,
                        method: compression,
                    }
                };
                FileExtent { start, len, data }
            }
            k => return Err(corrupt(format!("extent type {k} at offset {start}"))),
        })
    }

    /// The uncompressed bytes of a compressed extent.
    fn inflate(&self, disk: u64, disk_len: u64, ram: u64, method: u8) -> io::Result<Vec<u8>> {
        let mut raw = vec![0u8; disk_len as usize];
        self.read_logical(disk, &mut raw)?;
        decompress(method, &raw, ram as usize, self.sb.sector as usize)
    }
}

/// Where the bytes of one file extent come from.
#[derive(Debug, Clone)]
enum Data {
    /// Stored in the tree item (decompressed already).
    Inline(Arc<Vec<u8>>),
    /// From this logical address on.
    Plain(u64),
    /// Bytes `offset..` of the compressed extent at `disk`.
    Compressed {
        disk: u64,
        disk_len: u64,
        ram: u64,
        offset: u64,
        method: u8,
    },
    /// A hole or preallocated space.
    Zeros,
}

#[derive(Debug, Clone)]
struct FileExtent {
    start: u64,
    len: u64,
    data: Data,
}

struct Search {
    nodes: u32,
    last: Option<Key>,
}

impl Search {
    fn rising(&mut self, key: Key, node: u64) -> io::Result<()> {
        if self.last.is_some_and(|l| l >= key) {
            return Err(corrupt(format!("node {node}: keys out of order")));
        }
        self.last = Some(key);
        Ok(())
    }
}

/// What [`for_each_dir_item`] calls: (location, type, name, data).
type DirItemFn<'a> = dyn FnMut(Key, u8, &[u8], &[u8]) -> io::Result<()> + 'a;

/// Calls `f(location, type, name, data)` for each directory item packed in `item` (a
/// DIR_ITEM, DIR_INDEX or XATTR_ITEM).
fn for_each_dir_item(item: &[u8], f: &mut DirItemFn) -> io::Result<()> {
    let b = Le(item);
    let mut at = 0;
    while at < item.len() {
        let loc = b.key(at)?;
        let (data_len, name_len) = (b.u16(at + 25)? as usize, b.u16(at + 27)? as usize);
        let kind = b.u8(at + 29)?;
        let name = b.bytes(at + DIR_ITEM_SIZE, name_len)?;
        let data = b.bytes(at + DIR_ITEM_SIZE + name_len, data_len)?;
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(corrupt(format!("a name of {} bytes", name.len())));
        }
        f(loc, kind, name, data)?;
        at += DIR_ITEM_SIZE + name_len + data_len;
    }
    Ok(())
}

fn dir_kind(t: u8) -> Option<Kind> {
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

/// `ram` bytes from `data` compressed by `method` (zero-filled past what it holds, as the
/// kernel does).
fn decompress(method: u8, data: &[u8], ram: usize, sector: usize) -> io::Result<Vec<u8>> {
    let mut out = match method {
        COMPRESS_ZLIB => miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(data, ram)
            .map_err(|e| corrupt(format!("zlib: {:?}", e.status)))?,
        COMPRESS_ZSTD => zstd_frame(data, ram)?,
        COMPRESS_LZO => lzo_segments(data, ram, sector)?,
        m => return Err(unsupported(format!("compression method {m}"))),
    };
    out.resize(ram, 0);
    Ok(out)
}

/// The first zstd frame of `data` (btrfs pads it to a sector), at most `limit` bytes of it.
fn zstd_frame(data: &[u8], limit: usize) -> io::Result<Vec<u8>> {
    use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};
    let mut d = Decoder::new()?;
    // The kernel's btrfs writes windows of at most 128 KiB: refuse frames asking for more.
    d.set_parameter(DParameter::WindowLogMax(17))?;
    let mut out = vec![0u8; limit];
    let mut input = InBuffer::around(data);
    let mut output = OutBuffer::around(&mut out[..]);
    loop {
        let before = (input.pos(), output.pos());
        let hint = d
            .run(&mut input, &mut output)
            .map_err(|e| corrupt(format!("zstd: {e}")))?;
        if hint == 0 || output.pos() == limit || (input.pos(), output.pos()) == before {
            break;
        }
    }
    let n = output.pos();
    out.truncate(n);
    Ok(out)
}

/// btrfs's LZO framing: a 4-byte total length, then segments of (4-byte length, LZO1X data of
/// at most one sector uncompressed); a segment header never straddles a sector boundary.
fn lzo_segments(data: &[u8], limit: usize, sector: usize) -> io::Result<Vec<u8>> {
    let b = Le(data);
    let total = (b.u32(0)? as usize).min(data.len());
    let mut out = Vec::with_capacity(limit);
    let mut at = 4;
    while at < total && out.len() < limit {
        if sector - at % sector < 4 {
            at = at.next_multiple_of(sector);
            if at >= total {
                break;
            }
        }
        let n = b.u32(at)? as usize;
        let seg = b.bytes(at + 4, n)?;
        let cap = (limit - out.len()).min(sector);
        lzo1x(seg, &mut out, cap)?;
        at += 4 + n;
    }
    Ok(out)
}

/// Decodes one LZO1X block from `src`, appending at most `cap` bytes to `out`. Written here
/// because the crates that decode it either panic on hostile input or are GPL.
fn lzo1x(src: &[u8], out: &mut Vec<u8>, cap: usize) -> io::Result<()> {
    let base = out.len();
    let limit = base + cap;
    let bad = || corrupt("lzo: damaged data");
    let mut i = 0usize;
    let next = |i: &mut usize| -> io::Result<usize> {
        let v = *src.get(*i).ok_or_else(bad)?;
        *i += 1;
        Ok(v as usize)
    };
    let literals = |i: &mut usize, n: usize, out: &mut Vec<u8>| -> io::Result<()> {
        let s = src.get(*i..*i + n).ok_or_else(bad)?;
        if out.len() + n > limit {
            return Err(bad());
        }
        out.extend_from_slice(s);
        *i += n;
        Ok(())
    };
    // A run length: `base` plus 255 for each zero byte plus the first non-zero byte.
    let long = |i: &mut usize, base: usize| -> io::Result<usize> {
        let mut n = base;
        loop {
            let b = next(i)?;
            if b != 0 {
                return Ok(n + b);
            }
            n += 255;
            if n > cap {
                return Err(bad());
            }
        }
    };
    let copy = |out: &mut Vec<u8>, dist: usize, len: usize| -> io::Result<()> {
        if dist == 0 || dist > out.len() - base || out.len() + len > limit {
            return Err(bad());
        }
        let from = out.len() - dist;
        for k in 0..len {
            let c = out[from + k];
            out.push(c);
        }
        Ok(())
    };
    let mut state = 0usize;
    let first = *src.first().ok_or_else(bad)? as usize;
    if first > 17 {
        i = 1;
        let n = first - 17;
        literals(&mut i, n, out)?;
        state = if n < 4 { n } else { 4 };
    }
    loop {
        let inst = next(&mut i)?;
        let (dist, len, after);
        if inst >= 64 {
            let h = next(&mut i)?;
            dist = (h << 3) + ((inst >> 2) & 7) + 1;
            len = (inst >> 5) + 1;
            after = inst & 3;
        } else if inst >= 32 {
            len = match inst & 31 {
                0 => long(&mut i, 31)? + 2,
                l => l + 2,
            };
            let d = next(&mut i)? | next(&mut i)? << 8;
            dist = (d >> 2) + 1;
            after = d & 3;
        } else if inst >= 16 {
            len = match inst & 7 {
                0 => long(&mut i, 7)? + 2,
                l => l + 2,
            };
            let d = next(&mut i)? | next(&mut i)? << 8;
            let far = 16384 + ((inst & 8) << 11) + (d >> 2);
            if far == 16384 {
                return Ok(());
            }
            dist = far;
            after = d & 3;
        } else if state == 0 {
            let n = match inst {
                0 => long(&mut i, 15)? + 3,
                l => l + 3,
            };
            literals(&mut i, n, out)?;
            state = 4;
            continue;
        } else {
            let h = next(&mut i)?;
            if state == 4 {
                dist = (h << 2) + (inst >> 2) + 2049;
                len = 3;
            } else {
                dist = (h << 2) + (inst >> 2) + 1;
                len = 2;
            }
            after = inst & 3;
        }
        copy(out, dist, len)?;
        literals(&mut i, after, out)?;
        state = after;
    }
}

/// Linux's user-space `dev_t` encoding of a kernel device number as btrfs stores it.
fn user_dev(rdev: u64) -> u32 {
    let (major, minor) = ((rdev >> 20) as u32 & 0xfff, rdev as u32 & 0xf_ffff);
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

impl<D: CachedDevice + 'static> FileSystem for Btrfs<D> {
    fn type_name(&self) -> &'static str {
        "btrfs"
    }

    fn root(&self) -> u64 {
        self.trees.lock().unwrap().list[0].root_dir
    }

    fn subtree_key(&self, ino: u64) -> Option<Vec<u8>> {
        crate::filesystem::root_key(&self.dev, self.root(), ino)
    }

    fn attr(&self, ino: u64) -> io::Result<Attr> {
        let (tree, objectid) = self.locate(ino)?;
        if objectid == EMPTY_SUBVOL_DIR {
            // The kernel makes this directory up when it is looked up, with that moment's
            // times; the times of the subvolume holding it are what does not change.
            let holder = Self::ino((ino >> INO_BITS) as usize, tree.root_dir)?;
            let t = named(holder, self.inode(holder))?;
            return Ok(Attr {
                kind: Kind::Dir,
                perm: 0o755,
                size: 0,
                blocks: 0,
                nlink: 1,
                uid: 0,
                gid: 0,
                rdev: 0,
                atime: t.atime.to_system(),
                mtime: t.mtime.to_system(),
                ctime: t.ctime.to_system(),
                crtime: t.otime.to_system(),
            });
        }
        let i = named(ino, self.inode(ino))?;
        let kind = Kind::of_mode(i.mode as u16)
            .ok_or_else(|| corrupt(format!("inode {ino} has no known file type")))?;
        let sector = self.sb.sector;
        Ok(Attr {
            kind,
            perm: (i.mode & 0o7777) as u16,
            size: i.size,
            blocks: i.nbytes.div_ceil(sector).saturating_mul(sector / 512),
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: user_dev(i.rdev),
            atime: i.atime.to_system(),
            mtime: i.mtime.to_system(),
            ctime: i.ctime.to_system(),
            crtime: i.otime.to_system(),
        })
    }

    fn read_dir(&self, ino: u64) -> io::Result<Vec<Entry>> {
        named(ino, self.list(ino))
    }

    fn read_link(&self, ino: u64) -> io::Result<Vec<u8>> {
        let i = self.inode(ino)?;
        if i.size > MAX_SYMLINK {
            return Err(corrupt(format!(
                "symlink {ino}: a target of {} bytes",
                i.size
            )));
        }
        let extents = named(ino, self.extents(ino))?;
        let f = BtrfsFile {
            fs: self,
            size: i.size,
            extents,
        };
        let mut out = Vec::new();
        named(ino, f.read(0, i.size as usize, &mut out))?;
        Ok(out)
    }

    fn xattrs(&self, ino: u64) -> io::Result<Xattrs> {
        named(ino, self.xattr_list(ino))
    }

    fn open(self: Arc<Self>, ino: u64) -> io::Result<Arc<dyn FileData>> {
        let i = self.inode(ino)?;
        if Kind::of_mode(i.mode as u16) != Some(Kind::File) {
            return Err(io::ErrorKind::IsADirectory.into());
        }
        let extents = named(ino, self.extents(ino))?;
        Ok(Arc::new(OpenFile {
            file: BtrfsFile {
                fs: self,
                size: i.size,
                extents,
            },
            last: Mutex::new(None),
        }))
    }
}

/// Gives the bytes of compressed extent (index, extent) of a file.
type InflateFn<'a> = dyn FnMut(&FileExtent) -> io::Result<Arc<Vec<u8>>> + 'a;

/// A file's extents on its file system (`F` is `&Btrfs` or `Arc<Btrfs>`).
struct BtrfsFile<F> {
    fs: F,
    size: u64,
    extents: Vec<FileExtent>,
}

impl<F: std::ops::Deref<Target = Btrfs<D>>, D: ReadAt> BtrfsFile<F> {
    /// Appends bytes `[offset, offset + len)`; `inflate` gives a compressed extent's bytes.
    fn read_with(
        &self,
        offset: u64,
        len: usize,
        out: &mut Vec<u8>,
        inflate: &mut InflateFn,
    ) -> io::Result<()> {
        let start = out.len();
        out.resize(start + len, 0);
        let end = offset + len as u64;
        let first = self.extents.partition_point(|e| e.start + e.len <= offset);
        for e in &self.extents[first..] {
            if e.start >= end {
                break;
            }
            let (a, b) = (e.start.max(offset), (e.start + e.len).min(end));
            let dst = &mut out[start + (a - offset) as usize..start + (b - offset) as usize];
            let within = a - e.start;
            match &e.data {
                Data::Zeros => {}
                Data::Plain(at) => {
                    let at = at
                        .checked_add(within)
                        .ok_or_else(|| corrupt("an extent past 2^64"))?;
                    self.fs.read_logical(at, dst)?
                }
                Data::Inline(bytes) => copy_from(bytes, within, dst),
                Data::Compressed { offset: o, .. } => {
                    let bytes = inflate(e)?;
                    copy_from(&bytes, o + within, dst);
                }
            }
        }
        Ok(())
    }

    fn read(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        self.read_with(offset, len, out, &mut |e| self.inflate(e))
    }

    fn inflate(&self, e: &FileExtent) -> io::Result<Arc<Vec<u8>>> {
        match e.data {
            Data::Compressed {
                disk,
                disk_len,
                ram,
                method,
                ..
            } => Ok(Arc::new(self.fs.inflate(disk, disk_len, ram, method)?)),
            _ => Ok(Arc::new(Vec::new())),
        }
    }

    /// The device ranges under `[offset, offset + len)`: plain extents' bytes, compressed
    /// extents whole.
    fn ranges(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let end = offset.saturating_add(len);
        let first = self.extents.partition_point(|e| e.start + e.len <= offset);
        for e in self.extents[first..].iter().take_while(|e| e.start < end) {
            let (mut at, mut n) = match e.data {
                Data::Plain(at) => {
                    let (a, b) = (e.start.max(offset), (e.start + e.len).min(end));
                    let at = at
                        .checked_add(a - e.start)
                        .ok_or_else(|| corrupt("an extent past 2^64"))?;
                    (at, b - a)
                }
                Data::Compressed { disk, disk_len, .. } => (disk, disk_len),
                _ => continue,
            };
            while n > 0 {
                let (p, m) = self.fs.physical(at, n)?;
                out.push((p, m));
                at += m;
                n -= m;
            }
        }
        Ok(out)
    }
}

/// Copies `src[from..]` into `dst` (zeros where `src` ends first).
fn copy_from(src: &[u8], from: u64, dst: &mut [u8]) {
    let from = (from.min(src.len() as u64)) as usize;
    let n = dst.len().min(src.len() - from);
    dst[..n].copy_from_slice(&src[from..from + n]);
}

/// A compressed extent: its disk address, disk length and method.
type CompressedId = (u64, u64, u8);

/// An open regular file: its extents, and the last compressed extent it decompressed, by
/// (disk address, disk length, method): reads come in pieces smaller than an extent, and
/// several file extents may share one compressed extent.
struct OpenFile<D> {
    file: BtrfsFile<Arc<Btrfs<D>>>,
    last: Mutex<Option<(CompressedId, Arc<Vec<u8>>)>>,
}

impl<D: CachedDevice + 'static> FileData for OpenFile<D> {
    fn size(&self) -> u64 {
        self.file.size
    }

    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        self.file.read_with(offset, len, out, &mut |e| {
            let id = match e.data {
                Data::Compressed {
                    disk,
                    disk_len,
                    method,
                    ..
                } => (disk, disk_len, method),
                _ => (0, 0, 0),
            };
            if let Some((i, b)) = &*self.last.lock().unwrap() {
                if *i == id {
                    return Ok(b.clone());
                }
            }
            let b = self.file.inflate(e)?;
            *self.last.lock().unwrap() = Some((id, b.clone()));
            Ok(b)
        })
    }

    fn disk_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        self.file.ranges(offset, len).unwrap_or_default()
    }

    fn device(&self) -> Option<&dyn CachedDevice> {
        Some(&self.file.fs.dev)
    }

    fn range_key(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        // Each extent under the range as where its bytes come from, and the chunks under the
        // device ranges it reads (a compressed extent whole).
        const MAX_NAMED: u64 = 1 << 40;
        let mut named = 0u64;
        let mut key = [offset.to_le_bytes(), len.to_le_bytes()].concat();
        let end = offset.saturating_add(len);
        let extents = &self.file.extents;
        let first = extents.partition_point(|e| e.start + e.len <= offset);
        for e in extents[first..].iter().take_while(|e| e.start < end) {
            let (at, n) = (e.start.max(offset), (e.start + e.len).min(end));
            key.extend_from_slice(&at.to_le_bytes());
            key.extend_from_slice(&n.to_le_bytes());
            match &e.data {
                Data::Zeros => key.push(0),
                Data::Inline(bytes) => {
                    key.extend(crate::filesystem::inline_key(bytes, at - e.start, n - at))
                }
                Data::Plain(disk) => {
                    key.push(1);
                    key.extend_from_slice(&disk.wrapping_add(at - e.start).to_le_bytes());
                }
                Data::Compressed {
                    disk,
                    offset,
                    ram,
                    method,
                    ..
                } => {
                    key.push(2);
                    let from = offset.wrapping_add(at - e.start);
                    for v in [*disk, from, *ram, *method as u64] {
                        key.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
            for (p, m) in self.file.ranges(at, n - at).ok()? {
                // Extents sharing a compressed extent name it again each: bounded, like
                // `filesystem::runs_key`, past which callers compare bytes.
                named += m;
                if named > MAX_NAMED {
                    return None;
                }
                key.extend_from_slice(&p.to_le_bytes());
                self.file.fs.dev.range_key(p, m, &mut key)?;
            }
        }
        Some(key)
    }
}

/// A damage report of inode `ino`, named by it where the message does not already say which
/// object it concerns.
fn named<T>(ino: u64, r: io::Result<T>) -> io::Result<T> {
    r.map_err(|e| {
        let m = e.to_string();
        match m.strip_prefix("btrfs: ") {
            Some(rest) if !rest.starts_with("inode ") && !rest.starts_with("symlink ") => {
                io::Error::new(e.kind(), format!("btrfs: inode {ino}: {rest}"))
            }
            _ => e,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lzo_literals_and_matches_decode() {
        // A literal run of 4 ("abcd"), then a match of 3 bytes at distance 4 with no
        // trailing literals (M2: 0b010_001_00 = len 3, dist (h<<3)+D+1 with D=3, h=0), end.
        let src = [
            17 + 4,
            b'a',
            b'b',
            b'c',
            b'd',
            0x40 | (3 << 2),
            0,
            0x11,
            0,
            0,
        ];
        let mut out = Vec::new();
        lzo1x(&src, &mut out, 100).unwrap();
        assert_eq!(out, b"abcdabc");
    }

    #[test]
    fn lzo_refuses_what_runs_outside_its_buffers() {
        // A match reaching before the start of the output.
        let src = [17 + 1, b'a', 0x40 | (7 << 2), 9, 0x11, 0, 0];
        assert!(lzo1x(&src, &mut Vec::new(), 100).is_err());
        // More output than the cap.
        let src = [17 + 4, b'a', b'b', b'c', b'd', 0x11, 0, 0];
        assert!(lzo1x(&src, &mut Vec::new(), 3).is_err());
        // Truncated input.
        assert!(lzo1x(&[17 + 9, b'a'], &mut Vec::new(), 100).is_err());
        assert!(lzo1x(&[], &mut Vec::new(), 100).is_err());
    }

    #[test]
    fn kernel_device_numbers_become_user_space_ones() {
        let kernel = |major: u64, minor: u64| major << 20 | minor;
        assert_eq!(user_dev(kernel(1, 3)), 0x103);
        assert_eq!(
            user_dev(kernel(259, 262_143)) as u64,
            libc::makedev(259, 262_143)
        );
    }
}
