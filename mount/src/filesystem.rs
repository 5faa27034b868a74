//! The one read-only file-system interface every reader of a disk RP's file systems implements
//! (ext2/3/4, XFS, NTFS, FAT, btrfs; and a file RP's tree), and that the FUSE view, `rp ls/cat/
//! find/diff` and file restores from disk RPs use without knowing which file system it is.
//!
//! Readers parse bytes from images that may come from a compromised host: each bounds its work
//! and memory (its module says how) and reports damage as `InvalidData` errors naming the inode,
//! and what it does not read as `Unsupported` errors saying what, never a panic. Inode numbers
//! are the file system's own (an MFT record, a FAT entry's position for FAT).

use std::io;
use std::sync::Arc;
use std::time::SystemTime;

pub use crate::ext4::Kind;
use crate::ext4::{self, Ext4, ReadAt, Run};

/// What `stat` shows of an inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub kind: Kind,
    /// Permission bits, setuid, setgid and sticky included.
    pub perm: u16,
    pub size: u64,
    /// Allocated space in 512-byte units (as `st_blocks`).
    pub blocks: u64,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Device number of character and block devices (Linux `dev_t` encoding).
    pub rdev: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Creation time where the file system records one, else the change time.
    pub crtime: SystemTime,
}

/// One directory entry ("." and ".." are not listed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    pub ino: u64,
    /// From the entry itself where the file system records types; else ask [`FileSystem::attr`].
    pub kind: Option<Kind>,
}

/// Extended attributes as (full name, value) pairs.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// A read-only file system inside a disk RP.
pub trait FileSystem: Send + Sync {
    /// The kind of file system, as users name it ("ext4", "xfs").
    fn type_name(&self) -> &'static str;
    /// The root directory's inode number.
    fn root(&self) -> u64;
    fn attr(&self, ino: u64) -> io::Result<Attr>;
    /// The entries of directory `ino`; `NotADirectory` for anything else.
    fn read_dir(&self, ino: u64) -> io::Result<Vec<Entry>>;
    /// The target of symlink `ino`.
    fn read_link(&self, ino: u64) -> io::Result<Vec<u8>>;
    /// The extended attributes of `ino` as (full name, value) pairs, named as Linux shows them
    /// (`user.`, `trusted.`, `security.`, `system.posix_acl_access`). Readers that do not read
    /// attributes yet return none.
    fn xattrs(&self, _ino: u64) -> io::Result<Xattrs> {
        Ok(Vec::new())
    }
    /// A key equal for two trees (of two RPs of one vault) only if every byte under directory
    /// `ino` is: `rp diff` skips such a subtree unread. Readers give one for their root (the
    /// chunks of their whole device); None when they cannot tell.
    fn subtree_key(&self, ino: u64) -> Option<Vec<u8>> {
        let _ = ino;
        None
    }
    /// Regular file `ino`, mapped for reading (this is where a file's block map is parsed, so
    /// reads after it do no metadata work); `IsADirectory` for anything but a regular file.
    fn open(self: Arc<Self>, ino: u64) -> io::Result<Arc<dyn FileData>>;
}

/// An open regular file.
pub trait FileData: Send + Sync {
    fn size(&self) -> u64;
    /// Appends the bytes `[offset, offset + len)` (clipped by the caller to the size) to `out`.
    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()>;
    /// Where `[offset, offset + len)` of the file lies on the device, as (device offset, length)
    /// runs, holes left out: the file's allocation map.
    fn disk_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)>;
    /// The device [`Self::disk_ranges`] are on (None: a file not on a device, a file RP's).
    fn device(&self) -> Option<&dyn CachedDevice> {
        None
    }
    /// Whether reading `[offset, offset + len)` needs no fetch from the vault (its blocks are
    /// cached), so a caller can serve it inline instead of on a worker.
    fn is_cached(&self, offset: u64, len: u64) -> bool {
        self.device().is_some_and(|dev| {
            self.disk_ranges(offset, len)
                .iter()
                .all(|&(at, n)| dev.is_range_cached(at, n))
        })
    }
    /// A key equal for bytes `[offset, offset + len)` of two files of equal size (of two RPs
    /// of one vault) only if those bytes are equal: `rp diff` compares keys instead of contents,
    /// of whole files first, then piece by piece. None when the reader cannot tell.
    fn range_key(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        let _ = (offset, len);
        None
    }
    /// [`Self::range_key`] of the whole file.
    fn content_key(&self) -> Option<Vec<u8>> {
        self.range_key(0, self.size())
    }
}

/// Bounds-checked little-endian reads of an on-disk structure (NTFS, btrfs): a read past its
/// end is an `InvalidData` error, never a panic.
#[derive(Clone, Copy)]
pub(crate) struct Le<'a>(pub(crate) &'a [u8]);

impl<'a> Le<'a> {
    pub(crate) fn bytes(self, at: usize, n: usize) -> io::Result<&'a [u8]> {
        at.checked_add(n)
            .and_then(|end| self.0.get(at..end))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a structure runs past its {} bytes", self.0.len()),
                )
            })
    }
    pub(crate) fn u8(self, at: usize) -> io::Result<u8> {
        Ok(self.bytes(at, 1)?[0])
    }
    pub(crate) fn u16(self, at: usize) -> io::Result<u16> {
        Ok(u16::from_le_bytes(self.bytes(at, 2)?.try_into().unwrap()))
    }
    pub(crate) fn u32(self, at: usize) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(at, 4)?.try_into().unwrap()))
    }
    pub(crate) fn u64(self, at: usize) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(at, 8)?.try_into().unwrap()))
    }
}

/// A reader that owns its device (what [`MappedFile`] reads through).
pub trait HasDevice: Send + Sync {
    type Device: CachedDevice;
    fn dev(&self) -> &Self::Device;
}

/// An open file whose bytes are runs of the device (`extents` in units of `unit` bytes, holes
/// read as zeros): how XFS and FAT files are read.
pub struct MappedFile<F> {
    pub fs: Arc<F>,
    pub extents: Vec<crate::ext4::Extent>,
    pub unit: u64,
    pub size: u64,
}

impl<F: HasDevice> FileData for MappedFile<F> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        crate::ext4::read_extents_append(self.fs.dev(), &self.extents, self.unit, offset, len, out)
    }

    fn disk_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        crate::ext4::runs(&self.extents, self.unit, offset, len)
            .into_iter()
            .filter_map(|r| Some((r.disk?, r.len)))
            .collect()
    }

    fn device(&self) -> Option<&dyn CachedDevice> {
        Some(self.fs.dev())
    }

    fn range_key(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        let runs = crate::ext4::runs(&self.extents, self.unit, offset, len);
        runs_key(self.fs.dev(), offset, len, &runs)
    }
}

/// The key of bytes `[offset, offset + len)` of a file whose runs there are `runs` (in order,
/// holes as `None`): the range, each run's length and device position (or a hole mark), and
/// the names of the chunks under them. None when the device cannot name its chunks.
pub fn runs_key(dev: &dyn CachedDevice, offset: u64, len: u64, runs: &[Run]) -> Option<Vec<u8>> {
    // At most this many bytes of device data named (a sparse file's extents can claim far
    // more than any device holds); past it, callers compare bytes.
    const MAX_NAMED: u64 = 1 << 40;
    if runs
        .iter()
        .filter(|r| r.disk.is_some())
        .map(|r| r.len)
        .sum::<u64>()
        > MAX_NAMED
    {
        return None;
    }
    let mut key = [offset.to_le_bytes(), len.to_le_bytes()].concat();
    for r in runs {
        key.extend_from_slice(&r.len.to_le_bytes());
        match r.disk {
            Some(at) => {
                key.extend_from_slice(&at.to_le_bytes());
                dev.range_key(at, r.len, &mut key)?;
            }
            None => key.extend_from_slice(&u64::MAX.to_le_bytes()),
        }
    }
    Some(key)
}

/// A device whose byte ranges can say whether they are cached (a partition of a disk RP).
pub trait CachedDevice: ReadAt + Send + Sync {
    fn is_range_cached(&self, offset: u64, len: u64) -> bool;
    /// Appends to `key` the names of the chunks holding `[offset, offset + len)` (equal names,
    /// equal bytes); None when the device has no such names.
    fn range_key(&self, _offset: u64, _len: u64, _key: &mut Vec<u8>) -> Option<()> {
        None
    }
    /// The names of the chunks holding the whole device (its length first), if it has them.
    fn whole_key(&self) -> Option<Vec<u8>> {
        None
    }
}

/// [`FileSystem::subtree_key`] of a reader on `dev` whose root is `root`.
pub fn root_key(dev: &dyn CachedDevice, root: u64, ino: u64) -> Option<Vec<u8>> {
    (ino == root).then(|| dev.whole_key()).flatten()
}

/// A plain file (an image on local disk): nothing is "cached" in the vault's sense.
impl CachedDevice for std::fs::File {
    fn is_range_cached(&self, _offset: u64, _len: u64) -> bool {
        false
    }
}

fn ext_ino(ino: u64) -> io::Result<u32> {
    u32::try_from(ino).map_err(|_| io::Error::from(io::ErrorKind::NotFound))
}

impl<D: CachedDevice + 'static> FileSystem for Ext4<D> {
    fn type_name(&self) -> &'static str {
        "ext4"
    }

    fn root(&self) -> u64 {
        Ext4::root(self) as u64
    }

    fn attr(&self, ino: u64) -> io::Result<Attr> {
        let inode = self.inode(ext_ino(ino)?)?;
        let kind = inode.kind().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("inode {ino} has no known file type"),
            )
        })?;
        Ok(Attr {
            kind,
            perm: inode.perm(),
            size: inode.size,
            blocks: inode.blocks,
            nlink: inode.links as u32,
            uid: inode.uid,
            gid: inode.gid,
            rdev: inode.rdev,
            atime: inode.atime.to_system(),
            mtime: inode.mtime.to_system(),
            ctime: inode.ctime.to_system(),
            crtime: inode.crtime.unwrap_or(inode.ctime).to_system(),
        })
    }

    fn read_dir(&self, ino: u64) -> io::Result<Vec<Entry>> {
        let inode = self.inode(ext_ino(ino)?)?;
        if inode.kind() != Some(Kind::Dir) {
            return Err(io::ErrorKind::NotADirectory.into());
        }
        Ok(Ext4::read_dir(self, &inode)?
            .into_iter()
            .map(|e| Entry {
                name: e.name,
                ino: e.ino as u64,
                kind: e.kind,
            })
            .collect())
    }

    fn read_link(&self, ino: u64) -> io::Result<Vec<u8>> {
        let inode = self.inode(ext_ino(ino)?)?;
        Ext4::read_link(self, &inode)
    }

    fn xattrs(&self, ino: u64) -> io::Result<Xattrs> {
        let inode = self.inode(ext_ino(ino)?)?;
        Ext4::xattrs(self, &inode)
    }

    fn subtree_key(&self, ino: u64) -> Option<Vec<u8>> {
        root_key(self.device(), Ext4::root(self) as u64, ino)
    }

    fn open(self: Arc<Self>, ino: u64) -> io::Result<Arc<dyn FileData>> {
        let inode = self.inode(ext_ino(ino)?)?;
        if inode.kind() != Some(Kind::File) {
            return Err(io::ErrorKind::IsADirectory.into());
        }
        let data = self.data(&inode)?;
        Ok(Arc::new(ExtFile {
            size: inode.size,
            data,
            fs: self,
        }))
    }
}

/// An open ext file: its mapped blocks.
struct ExtFile<D> {
    fs: Arc<Ext4<D>>,
    data: ext4::Data,
    size: u64,
}

impl<D: CachedDevice> FileData for ExtFile<D> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        self.fs.read_append(&self.data, offset, len, out)
    }

    fn disk_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        self.fs.disk_ranges(&self.data, offset, len)
    }

    fn device(&self) -> Option<&dyn CachedDevice> {
        Some(self.fs.device())
    }

    fn range_key(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        match &self.data {
            ext4::Data::Inline(bytes) => Some(inline_key(bytes, offset, len)),
            ext4::Data::Extents(ext) => {
                let runs = ext4::runs(ext, self.fs.block_size(), offset, len);
                runs_key(self.fs.device(), offset, len, &runs)
            }
        }
    }
}

/// [`FileData::range_key`] of bytes held in metadata (inline or resident data): the bytes.
pub fn inline_key(bytes: &[u8], offset: u64, len: u64) -> Vec<u8> {
    let start = offset.min(bytes.len() as u64) as usize;
    let end = offset.saturating_add(len).min(bytes.len() as u64) as usize;
    let head = [
        b"inline".as_slice(),
        &offset.to_le_bytes(),
        &len.to_le_bytes(),
    ]
    .concat();
    [head.as_slice(), &bytes[start..end]].concat()
}

/// Inodes of a view of several file systems (a FUSE mount, [`crate::browse`]): inode `ino` of
/// file system `k` is `(k + 1) << FS_SHIFT | ino`: the top byte names the
/// file system, the low 56 bits hold its own inode number. That fits every real file system (an
/// XFS inode number past 2^56 would need a volume of some 2^60 bytes); an entry whose number does
/// not fit is left out of its listing with an error in the log. The view's own inodes (root,
/// images, status) have a zero top byte.
pub const FS_SHIFT: u32 = 56;
pub const FS_INO_MASK: u64 = (1 << FS_SHIFT) - 1;
/// At most this many file systems in one view (the top byte's values, zero excluded).
pub const MAX_FILESYSTEMS: usize = 255;

/// Splits a FUSE inode into (file system index, its inode) for inodes inside file systems.
pub fn split(ino: u64) -> Option<(usize, u64)> {
    let k = (ino >> FS_SHIFT).checked_sub(1)?;
    Some((k as usize, ino & FS_INO_MASK))
}

/// The FUSE inode of inode `ino` of file system `k`; None when it does not fit.
pub fn join(k: usize, ino: u64) -> Option<u64> {
    (k < MAX_FILESYSTEMS && ino <= FS_INO_MASK).then(|| (k as u64 + 1) << FS_SHIFT | ino)
}

/// The directories that view names with `/` in them imply (`lvm/vg0/root` implies `lvm` and
/// `lvm/vg0`): how a view nests file systems without a file system of its own.
#[derive(Debug, Clone, Default)]
pub struct NameTree {
    /// Every proper prefix of a name, sorted.
    pub dirs: Vec<String>,
}

/// What an entry of a [`NameTree`] directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameTarget {
    /// The root of the view's `k`th file system.
    Member(usize),
    /// Directory `i` of [`NameTree::dirs`].
    Dir(usize),
}

impl NameTree {
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut dirs: Vec<String> = names
            .into_iter()
            .flat_map(|n| {
                n.match_indices('/')
                    .map(|(i, _)| n[..i].to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        NameTree { dirs }
    }

    /// The directory inode `ino` names in a view whose root is `root` and whose name
    /// directories are numbered from `first` ("" for the root); None for any other inode.
    pub fn dir_of(&self, ino: u64, root: u64, first: u64) -> Option<&str> {
        if ino == root {
            return Some("");
        }
        let i = usize::try_from(ino.checked_sub(first)?).ok()?;
        self.dirs.get(i).map(String::as_str)
    }

    /// The entries of directory `dir` ("" for the view's root) among `names`.
    pub fn entries<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
        dir: &str,
    ) -> Vec<(String, NameTarget)> {
        let child = |full: &str| -> Option<String> {
            let rest = if dir.is_empty() {
                full
            } else {
                full.strip_prefix(dir)?.strip_prefix('/')?
            };
            (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_string())
        };
        let mut out: Vec<(String, NameTarget)> = self
            .dirs
            .iter()
            .enumerate()
            .filter_map(|(i, d)| Some((child(d)?, NameTarget::Dir(i))))
            .collect();
        for (k, n) in names.into_iter().enumerate() {
            if let Some(c) = child(n) {
                out.push((c, NameTarget::Member(k)));
            }
        }
        out
    }
}

/// A disk image carried as its non-zero 512-byte sectors, every other byte zero: how fuzz inputs
/// and crafted fixtures hold a file system whose format wants hundreds of MiB of mostly zeros
/// (mkfs.xfs makes nothing under 300 MB). The encoding is a sequence of records, each a
/// little-endian `u32` sector number and the sector's 512 bytes; a short tail is ignored and a
/// later record for the same sector wins.
pub struct SparseImage {
    size: u64,
    sectors: std::collections::BTreeMap<u64, Box<[u8]>>,
}

impl SparseImage {
    pub const SECTOR: usize = 512;

    /// The image of `size` bytes that `records` describe (sectors past `size` are dropped).
    pub fn parse(records: &[u8], size: u64) -> Self {
        let sectors = records
            .chunks_exact(4 + Self::SECTOR)
            .map(|r| {
                let n = u32::from_le_bytes(r[..4].try_into().unwrap()) as u64;
                (n, r[4..].to_vec().into_boxed_slice())
            })
            .filter(|(n, _)| (n + 1) * Self::SECTOR as u64 <= size)
            .collect();
        SparseImage { size, sectors }
    }

    /// The records of `image`'s non-zero sectors.
    pub fn encode(image: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, s) in image.chunks(Self::SECTOR).enumerate() {
            if s.iter().any(|&b| b != 0) && s.len() == Self::SECTOR {
                out.extend_from_slice(&(n as u32).to_le_bytes());
                out.extend_from_slice(s);
            }
        }
        out
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

impl ReadAt for SparseImage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.fill(0);
        let sector = Self::SECTOR as u64;
        for (&n, data) in self.sectors.range(offset / sector..end.div_ceil(sector)) {
            let (start, stop) = ((n * sector).max(offset), ((n + 1) * sector).min(end));
            let from = (start - n * sector) as usize..(stop - n * sector) as usize;
            buf[(start - offset) as usize..(stop - offset) as usize].copy_from_slice(&data[from]);
        }
        Ok(())
    }
}

impl CachedDevice for SparseImage {
    fn is_range_cached(&self, _offset: u64, _len: u64) -> bool {
        true
    }
}

/// Bounds of [`walk`]: far above what a small crafted image holds legitimately and low enough
/// that every walk ends quickly.
#[derive(Debug, Clone, Copy)]
pub struct WalkLimits {
    pub inodes: u32,
    pub dirs: u32,
    pub file_bytes: u64,
    pub depth: u32,
}

impl Default for WalkLimits {
    fn default() -> Self {
        WalkLimits {
            inodes: 512,
            dirs: 32,
            file_bytes: 1 << 20,
            depth: 32,
        }
    }
}

/// Reads everything of `fs` reachable from its root within `limits`: every directory listed,
/// every inode's attributes and extended attributes, every symlink's target, every file read
/// and mapped. Errors are skipped (a hostile image's only acceptable outcomes are errors and
/// data); returns how many inodes were visited.
pub fn walk(fs: &Arc<dyn FileSystem>, limits: WalkLimits) -> u32 {
    let mut left = limits;
    let mut stack = vec![(fs.root(), 0u32)];
    while let Some((ino, depth)) = stack.pop() {
        if depth > limits.depth || left.inodes == 0 {
            continue;
        }
        left.inodes -= 1;
        let _ = fs.xattrs(ino);
        let Ok(attr) = fs.attr(ino) else { continue };
        match attr.kind {
            Kind::Dir if left.dirs > 0 => {
                left.dirs -= 1;
                for e in fs.read_dir(ino).unwrap_or_default() {
                    stack.push((e.ino, depth + 1));
                }
            }
            Kind::Symlink => {
                let _ = fs.read_link(ino);
            }
            Kind::File => {
                let Ok(f) = fs.clone().open(ino) else {
                    continue;
                };
                let end = f.size().min(limits.file_bytes);
                let mut buf = Vec::new();
                let mut at = 0;
                while at < end {
                    let n = (end - at).min(64 << 10);
                    buf.clear();
                    if f.read_append(at, n as usize, &mut buf).is_err() {
                        break;
                    }
                    let _ = f.disk_ranges(at, n);
                    at += n;
                }
            }
            _ => {}
        }
    }
    limits.inodes - left.inodes
}

/// The file system (or volume format) a byte range holds, from its magic numbers alone: a few
/// small reads at fixed offsets, nothing parsed. None when nothing known is there.
pub fn detect(dev: &dyn ReadAt, len: u64) -> Option<&'static str> {
    let at = |offset: u64, n: usize| -> Option<Vec<u8>> {
        let end = offset.checked_add(n as u64)?;
        if end > len {
            return None;
        }
        let mut b = vec![0u8; n];
        dev.read_at(offset, &mut b).ok()?;
        Some(b)
    };
    let is = |offset: u64, magic: &[u8]| at(offset, magic.len()).is_some_and(|b| b == magic);
    if is(0x438, &[0x53, 0xef]) {
        return Some("ext4");
    }
    if is(0, b"XFSB") {
        return Some("xfs");
    }
    if is(0x10040, b"_BHRfS_M") {
        return Some("btrfs");
    }
    if is(3, b"NTFS    ") {
        return Some("ntfs");
    }
    if is(0, b"LUKS\xba\xbe") {
        return Some("luks");
    }
    // An LVM2 physical volume: the label is in one of the first four sectors.
    if (0..4).any(|s| is(s * 512, b"LABELONE") && is(s * 512 + 24, b"LVM2 001")) {
        return Some("lvm2");
    }
    if is(510, &[0x55, 0xaa]) && (is(0x36, b"FAT1") || is(0x52, b"FAT32   ")) {
        return Some("vfat");
    }
    if is(4086, b"SWAPSPACE2") {
        return Some("swap");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_slashes_imply_directories() {
        let names = ["part1", "lvm/vg0/root", "lvm/vg0/home", "lvm/vg1/data"];
        let t = NameTree::new(names);
        assert_eq!(t.dirs, ["lvm", "lvm/vg0", "lvm/vg1"]);
        let at = |d: &str| {
            let mut e: Vec<_> = t.entries(names, d).into_iter().map(|(n, _)| n).collect();
            e.sort();
            e
        };
        assert_eq!(at(""), ["lvm", "part1"]);
        assert_eq!(at("lvm"), ["vg0", "vg1"]);
        assert_eq!(at("lvm/vg0"), ["home", "root"]);
        assert_eq!(
            t.entries(names, "lvm/vg1"),
            [("data".to_string(), NameTarget::Member(3))]
        );
        assert!(at("part1").is_empty());
    }

    /// A device whose chunk names are its bytes.
    struct Named(Vec<u8>);

    impl ReadAt for Named {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    impl CachedDevice for Named {
        fn is_range_cached(&self, _offset: u64, _len: u64) -> bool {
            true
        }
        fn range_key(&self, offset: u64, len: u64, key: &mut Vec<u8>) -> Option<()> {
            key.extend_from_slice(&self.0[offset as usize..(offset + len) as usize]);
            Some(())
        }
    }

    #[test]
    fn range_keys_tell_where_the_holes_are() {
        let dev = Named((0..8192u32).map(|i| i as u8).collect());
        let run = |disk: Option<u64>| Run {
            buf_offset: 0,
            len: 4096,
            disk,
        };
        // Hole then block 0, block 0 then hole (a collapsed range): the same device range.
        let a = runs_key(&dev, 0, 8192, &[run(None), run(Some(0))]).unwrap();
        let b = runs_key(&dev, 0, 8192, &[run(Some(0)), run(None)]).unwrap();
        assert_ne!(a, b);
        assert_eq!(
            a,
            runs_key(&dev, 0, 8192, &[run(None), run(Some(0))]).unwrap()
        );
        // Another block with other bytes, and the same range of another window.
        assert_ne!(
            a,
            runs_key(&dev, 0, 8192, &[run(None), run(Some(4096))]).unwrap()
        );
        assert_ne!(
            a,
            runs_key(&dev, 4096, 8192, &[run(None), run(Some(0))]).unwrap()
        );
    }

    #[test]
    fn a_sparse_image_reads_as_its_sectors_and_zeros() {
        let mut image = vec![0u8; 8192];
        image[600..700].fill(7);
        image[4095] = 9;
        let img = SparseImage::parse(&SparseImage::encode(&image), 8192);
        for (at, n) in [(0, 8192), (599, 102), (4000, 200), (8191, 1), (512, 512)] {
            let mut b = vec![1u8; n];
            img.read_at(at as u64, &mut b).unwrap();
            assert_eq!(b, image[at..at + n], "{n} bytes at {at}");
        }
        assert!(img.read_at(8000, &mut [0u8; 193]).is_err());
        // Sectors past the image's size are dropped.
        let small = SparseImage::parse(&SparseImage::encode(&image), 4096);
        let mut b = [0u8; 4096];
        small.read_at(0, &mut b).unwrap();
        assert_eq!(b[..], image[..4096]);
    }

    #[test]
    fn magic_numbers_name_the_file_system() {
        let mut b = vec![0u8; 0x10100];
        assert_eq!(detect(&&b[..], b.len() as u64), None);
        b[..4].copy_from_slice(b"XFSB");
        assert_eq!(detect(&&b[..], b.len() as u64), Some("xfs"));
        b[..4].fill(0);
        b[3..11].copy_from_slice(b"NTFS    ");
        assert_eq!(detect(&&b[..], b.len() as u64), Some("ntfs"));
        b[3..11].fill(0);
        b[512..520].copy_from_slice(b"LABELONE");
        b[536..544].copy_from_slice(b"LVM2 001");
        assert_eq!(detect(&&b[..], b.len() as u64), Some("lvm2"));
        b[512..544].fill(0);
        b[0x52..0x5a].copy_from_slice(b"FAT32   ");
        b[510..512].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(detect(&&b[..], b.len() as u64), Some("vfat"));
        // A range too short for a magic's offset is read nowhere past its end.
        assert_eq!(detect(&&b[..0x40], 0x40), None);
        b[0x438..0x43a].copy_from_slice(&[0x53, 0xef]);
        assert_eq!(detect(&&b[..], b.len() as u64), Some("ext4"));
    }
}
