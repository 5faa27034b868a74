//! FUSE view of a disk or stream recovery point, read-only (a stream RP shows as one file named
//! after the stream, read through [`StreamReader`]). For a disk RP:
//!
//! * `disk.img`: the whole disk byte for byte, and `partN.img` for each partition of an MBR or
//!   GPT table. Holes are reported through `st_blocks` and SEEK_DATA/SEEK_HOLE.
//! * `partN/` (or `fs/` for a file system on the bare disk): the files inside each ext2/3/4 file
//!   system, read in user space by [`crate::ext4`] with their names, sizes, modes, owners, times,
//!   symlinks, device numbers and hard links (one inode number per inode).
//!
//! Inode numbers: 1 is the root, 2.. the image files, and inode `i` of file system `k` is
//! `(k + 1) << 32 | i`. Permissions are shown but not enforced (no `default_permissions`): the
//! mount is visible only to the user who mounted it, who holds the vault's key anyway.
//!
//! Reads run on a small thread pool so the kernel can keep several in flight; RPs are immutable,
//! so entries, attributes and the page cache are kept for long.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crossbeam_channel::{bounded, Sender};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEntry, ReplyLseek, ReplyOpen, ReplyXattr, Request,
};
use lru::LruCache;
use scalez::reader::DiskReader;
use scalez::stream_map::StreamReader;

use crate::ext4::{self, Ext4};
use crate::filesystem::{CachedDevice, FileData, FileSystem, Kind};
use crate::xfs::Xfs;
use std::io;

const ROOT: u64 = 1;
/// `disk.img` is inode 2; partition files follow.
const FIRST_FILE: u64 = 2;
/// `.elastio-status` in the root: below the first file system's inode range.
const STATUS: u64 = (1 << 32) - 1;
/// The first inode of the directories nested file-system names imply (`lvm`, `lvm/vg0`).
const FIRST_NAME_DIR: u64 = 1 << 40;
/// RPs never change: the kernel may cache attributes and entries for long.
const TTL: Duration = Duration::from_secs(3600);
/// FOPEN_KEEP_CACHE: keep the page cache across opens.
const KEEP_CACHE: u32 = 1 << 1;
/// The largest read the kernel sends (`max_readahead` in `init` sets max_pages to match).
const MAX_READ: usize = 1 << 20;
/// Replies for holes come from here: no allocation, no copy in user space.
static ZEROS: [u8; MAX_READ] = [0; MAX_READ];
/// `st_blksize` of every file: `cat` and `cp` then read a whole FUSE request per call.
const PREFERRED_IO: u32 = MAX_READ as u32;

thread_local! {
    /// Each thread's reply buffer, reused across reads: a fresh 1 MiB allocation per read costs
    /// page faults on every request.
    static REPLY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether `[start, start + size)` is all zeros by the map (answered from [`ZEROS`]). Only one
/// run is asked for: it covers the request only if no data follows within it.
fn is_hole(reader: &dyn ImageSource, start: u64, size: usize) -> bool {
    size <= ZEROS.len()
        && matches!(
            reader.extents(start, size as u64, 1).as_deref(),
            Ok([(n, false)]) if *n == size as u64
        )
}

/// Runs `f` with this thread's reply buffer, emptied and able to hold `size` bytes.
fn with_reply_buffer<T>(size: usize, f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
    REPLY.with(|b| {
        let mut b = b.borrow_mut();
        b.clear();
        b.reserve(size);
        let out = f(&mut b);
        // Keep up to one maximal request; release anything an odd larger read grew it to.
        if b.capacity() > MAX_READ {
            *b = Vec::new();
        }
        out
    })
}

/// Parsed directories kept for lookups and readdir, by their estimated size in memory (a hostile
/// directory is within the ext4 listing budgets, but a thousand of them are not).
const DIR_CACHE_BYTES: usize = 256 << 20;

/// A file of the view: a byte range of the disk.
pub struct ViewFile {
    pub name: String,
    pub start: u64,
    pub len: u64,
    /// Bytes of stored (non-zero) chunks in the range, for `st_blocks`.
    pub stored_bytes: u64,
}

/// A byte range of a disk RP (a partition, the whole disk) or a logical volume inside it, as a
/// device for the file-system readers.
pub struct PartDev {
    pub reader: Arc<DiskReader>,
    pub start: u64,
    pub len: u64,
    /// An LVM logical volume: where its bytes are (`start` is then unused).
    pub lv: Option<Arc<crate::lvm::LvMap>>,
}

impl PartDev {
    /// Fails unless `[offset, offset + len)` lies inside the partition.
    fn check_range(&self, offset: u64, len: usize) -> std::io::Result<()> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "read at {offset} past the end of the partition ({} bytes)",
                    self.len
                ),
            ));
        }
        Ok(())
    }
}

impl PartDev {
    /// The disk byte ranges `[offset, offset + len)` of this device lies in.
    fn pieces(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
        match &self.lv {
            Some(lv) => lv.pieces(offset, len),
            None => {
                self.check_range(offset, len as usize)?;
                Ok(vec![(self.start + offset, len)])
            }
        }
    }
}

impl ext4::ReadAt for PartDev {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0;
        for (at, n) in self.pieces(offset, buf.len() as u64)? {
            let piece = &mut buf[done..done + n as usize];
            if self.reader.read_at(at, piece)? < piece.len() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n as usize;
        }
        Ok(())
    }

    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
        for (at, n) in self.pieces(offset, len as u64)? {
            if self.reader.read_append(at, n as usize, out)? < n as usize {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }
}

impl CachedDevice for PartDev {
    fn is_range_cached(&self, offset: u64, len: u64) -> bool {
        self.pieces(offset, len).is_ok_and(|p| {
            p.iter()
                .all(|&(at, n)| self.reader.is_range_cached(at, n).unwrap_or(false))
        })
    }

    fn whole_key(&self) -> Option<Vec<u8>> {
        let mut key = self.len.to_le_bytes().to_vec();
        self.range_key(0, self.len, &mut key)?;
        Some(key)
    }

    fn range_key(&self, offset: u64, len: u64, key: &mut Vec<u8>) -> Option<()> {
        let cs = self.reader.chunk_size() as u64;
        for (start, n) in self.pieces(offset, len).ok()? {
            // Only slots of the disk have names (a damaged map could point past it).
            if start.checked_add(n)? > self.reader.size() {
                return None;
            }
            // Each piece's place and length (an LV's pieces can move without their chunks
            // changing), then each slot tagged: a chunk's name, or zeros.
            key.extend_from_slice(&start.to_le_bytes());
            key.extend_from_slice(&n.to_le_bytes());
            for slot in start / cs..(start + n).div_ceil(cs) {
                match self.reader.chunk_id(slot).ok()? {
                    Some(id) => {
                        key.push(1);
                        key.extend_from_slice(&id.0);
                    }
                    None => key.push(0),
                }
            }
        }
        Some(())
    }
}

/// A file system shown as a directory of the view.
pub struct FsView {
    /// The directory name (`part1`, `fs`).
    pub name: String,
    /// `None`: an empty directory, a mountpoint for the kernel's own driver (`--kernel`).
    pub fs: Option<Arc<dyn FileSystem>>,
}

/// The inode number of an empty mountpoint directory's root.
const EMPTY_ROOT: u64 = 1;

impl PartDev {
    /// Opens the file system in this range if elastio reads it (ext2/3/4 today). The status
    /// line says what the range holds either way: a file system whose files are shown, one it
    /// does not read yet, a damaged one, or nothing known (its image file still shows).
    pub fn open_fs(self, name: &str) -> (Option<FsView>, String) {
        let len = self.len;
        let found = crate::filesystem::detect(&self, len);
        let opened: io::Result<Option<Arc<dyn FileSystem>>> = match found {
            Some("ext4") => Ext4::open(self, len).map(|f| f.map(|f| Arc::new(f) as _)),
            Some("xfs") => Xfs::open(self, len).map(|f| f.map(|f| Arc::new(f) as _)),
            Some("vfat") => crate::fat::Fat::open(self, len).map(|f| f.map(|f| Arc::new(f) as _)),
            Some("ntfs") => crate::ntfs::Ntfs::open(self, len).map(|f| f.map(|f| Arc::new(f) as _)),
            Some("btrfs") => {
                crate::btrfs::Btrfs::open(self, len).map(|f| f.map(|f| Arc::new(f) as _))
            }
            _ => Ok(None),
        };
        match opened {
            Ok(Some(fs)) => {
                let line = format!("{name}: {}, files in {name}/", fs.type_name());
                let view = FsView {
                    name: name.to_string(),
                    fs: Some(fs),
                };
                (Some(view), line)
            }
            Err(e) => {
                let t = found.unwrap_or("?");
                tracing::warn!("{name}: file view unavailable: {e}");
                let why = if e.kind() == io::ErrorKind::Unsupported {
                    "not readable by elastio"
                } else {
                    "damaged"
                };
                (None, format!("{name}: {t}, {why}: {e}"))
            }
            Ok(None) => (
                None,
                match found {
                    Some(t) => format!("{name}: {t}, not readable by elastio yet"),
                    None => format!("{name}: no known file system"),
                },
            ),
        }
    }
}

/// What the image files of a view read from: a disk RP ([`DiskReader`]) or a stream RP
/// ([`StreamReader`]).
pub trait ImageSource: Send + Sync {
    fn size(&self) -> u64;
    /// Preferred I/O size (`st_blksize`).
    fn block_size(&self) -> u32;
    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> scalez::Result<usize>;
    /// Whether a read would be served from memory (answered inline, not on the pool).
    fn is_range_cached(&self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// Data (`true`) and zero runs from `offset`, for SEEK_DATA/SEEK_HOLE.
    fn extents(
        &self,
        _offset: u64,
        len: u64,
        _max_runs: usize,
    ) -> scalez::Result<Vec<(u64, bool)>> {
        Ok(vec![(len, true)])
    }
}

impl ImageSource for DiskReader {
    fn size(&self) -> u64 {
        DiskReader::size(self)
    }
    fn block_size(&self) -> u32 {
        self.chunk_size()
    }
    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> scalez::Result<usize> {
        DiskReader::read_append(self, offset, len, out)
    }
    fn is_range_cached(&self, offset: u64, len: u64) -> bool {
        DiskReader::is_range_cached(self, offset, len).unwrap_or(false)
    }
    fn extents(&self, offset: u64, len: u64, max_runs: usize) -> scalez::Result<Vec<(u64, bool)>> {
        DiskReader::extents(self, offset, len, max_runs)
    }
}

impl ImageSource for StreamReader {
    fn size(&self) -> u64 {
        StreamReader::size(self)
    }
    fn block_size(&self) -> u32 {
        1 << 20
    }
    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> scalez::Result<usize> {
        StreamReader::read_append(self, offset, len, out)
    }
}

/// What to mount.
pub struct DiskView {
    pub reader: Arc<dyn ImageSource>,
    /// `disk.img` first, then partitions.
    pub files: Vec<ViewFile>,
    /// File systems shown as directories.
    pub filesystems: Vec<FsView>,
    /// The RP's creation time (shown as every timestamp of the image files).
    pub time: SystemTime,
    pub uid: u32,
    pub gid: u32,
    /// What each file-system place holds, one line each; shown as `.elastio-status` in the
    /// root unless empty.
    pub status: String,
}

/// A directory listing with a name index for lookups.
struct Listing {
    entries: Vec<(u64, FileType, OsString)>,
    by_name: HashMap<OsString, usize>,
}

impl Listing {
    /// Memory the listing holds, roughly: each entry, its name twice and a map slot.
    fn weight(&self) -> usize {
        let per_entry = 2 * std::mem::size_of::<(u64, FileType, OsString)>() + 16;
        self.entries
            .iter()
            .map(|(_, _, n)| per_entry + 2 * n.len())
            .sum()
    }
}

/// Listings kept, bounded by their total [`Listing::weight`].
struct DirCache {
    lru: LruCache<u64, (Arc<Listing>, usize)>,
    bytes: usize,
    limit: usize,
}

impl DirCache {
    fn new(limit: usize) -> Self {
        DirCache {
            lru: LruCache::unbounded(),
            bytes: 0,
            limit,
        }
    }

    fn get(&mut self, ino: u64) -> Option<Arc<Listing>> {
        self.lru.get(&ino).map(|(l, _)| l.clone())
    }

    /// Keeps `listing` unless it alone exceeds the limit, dropping the least recently used.
    fn put(&mut self, ino: u64, listing: Arc<Listing>) {
        let weight = listing.weight();
        if weight > self.limit {
            return;
        }
        if let Some((_, old)) = self.lru.put(ino, (listing, weight)) {
            self.bytes -= old;
        }
        self.bytes += weight;
        while self.bytes > self.limit {
            match self.lru.pop_lru() {
                Some((_, (_, w))) => self.bytes -= w,
                None => break,
            }
        }
    }
}

/// What an open handle reads.
enum Open {
    Image,
    File(Arc<dyn FileData>),
    /// `.elastio-status`.
    Status,
}

/// The state of a mount that the session thread and the read workers share.
struct Shared {
    view: Arc<DiskView>,
    /// The directories that file-system names with `/` imply (`lvm/vg0`).
    names: NameTree,
    dirs: Mutex<DirCache>,
    open: Mutex<HashMap<u64, Arc<Open>>>,
    next_fh: AtomicU64,
}

/// The FUSE session's file system. Work that parses image metadata at length (listing a
/// directory, mapping a file's blocks at open) runs on the read workers, so the session thread
/// keeps answering other requests meanwhile; the ext4 budgets bound each such job.
struct Fs {
    shared: Arc<Shared>,
    reads: Sender<ReadJob>,
}

impl std::ops::Deref for Fs {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Fs {
    /// Runs `job` on a read worker (here if the pool is gone).
    fn offload(&self, job: impl FnOnce(&Shared) + Send + 'static) {
        let shared = self.shared.clone();
        let job: ReadJob = Box::new(move || job(&shared));
        if let Err(e) = self.reads.send(job) {
            (e.into_inner())();
        }
    }
}

pub(crate) fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
    }
}

fn errno(e: &std::io::Error) -> i32 {
    match e.kind() {
        std::io::ErrorKind::NotFound => libc::ENOENT,
        std::io::ErrorKind::NotADirectory => libc::ENOTDIR,
        std::io::ErrorKind::IsADirectory => libc::EISDIR,
        _ => libc::EIO,
    }
}

/// What FUSE shows of an inode's [`crate::filesystem::Attr`].
pub(crate) fn file_attr(ino: u64, a: &crate::filesystem::Attr, blksize: u32) -> FileAttr {
    FileAttr {
        ino,
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.crtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize,
        flags: 0,
    }
}

/// Answers a getxattr or listxattr: the size when asked for it (`size` 0), else the bytes if
/// they fit.
pub(crate) fn reply_xattr(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32)
    } else if data.len() > size as usize {
        reply.error(libc::ERANGE)
    } else {
        reply.data(data)
    }
}

use crate::filesystem::{join, split, NameTarget, NameTree, FS_INO_MASK};

impl Shared {
    fn file(&self, ino: u64) -> Option<&ViewFile> {
        self.view.files.get(ino.checked_sub(FIRST_FILE)? as usize)
    }

    fn filesystem(&self, k: usize) -> Option<&Arc<dyn FileSystem>> {
        self.view.filesystems.get(k)?.fs.as_ref()
    }

    /// The inode number of file system `k`'s root directory.
    fn root_of(&self, k: usize) -> u64 {
        self.filesystem(k).map_or(EMPTY_ROOT, |fs| fs.root())
    }

    /// The name-tree directory `ino` is ("" for the root), if it is one.
    fn name_dir(&self, ino: u64) -> Option<&str> {
        self.names.dir_of(ino, ROOT, FIRST_NAME_DIR)
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, i32> {
        if let Some((k, i)) = split(ino) {
            return self.fs_attr(k, i);
        }
        if ino != ROOT && self.name_dir(ino).is_some() {
            let mut a = self.attr(ROOT)?;
            (a.ino, a.nlink) = (ino, 2);
            return Ok(a);
        }
        let v = &self.view;
        let (kind, perm, size, blocks, nlink) = match (ino, self.file(ino)) {
            (STATUS, _) if !v.status.is_empty() => {
                (FileType::RegularFile, 0o444, v.status.len() as u64, 0, 1)
            }
            (ROOT, _) => (
                FileType::Directory,
                0o555,
                0,
                0,
                2 + v.filesystems.len() as u32,
            ),
            (_, Some(f)) => (
                FileType::RegularFile,
                0o444,
                f.len,
                f.stored_bytes.div_ceil(512),
                1,
            ),
            _ => return Err(libc::ENOENT),
        };
        Ok(FileAttr {
            ino,
            size,
            blocks,
            atime: v.time,
            mtime: v.time,
            ctime: v.time,
            crtime: v.time,
            kind,
            perm,
            nlink,
            uid: v.uid,
            gid: v.gid,
            rdev: 0,
            blksize: v.reader.block_size().max(PREFERRED_IO),
            flags: 0,
        })
    }

    fn fs_attr(&self, k: usize, i: u64) -> Result<FileAttr, i32> {
        let view = self.view.filesystems.get(k).ok_or(libc::ENOENT)?;
        let Some(fs) = &view.fs else {
            // An empty mountpoint directory.
            if i != EMPTY_ROOT {
                return Err(libc::ENOENT);
            }
            let mut a = self.attr(ROOT)?;
            (a.ino, a.nlink) = (join(k, i).ok_or(libc::ENOENT)?, 2);
            return Ok(a);
        };
        let a = fs.attr(i).map_err(|e| {
            tracing::error!("{}: inode {i}: {e}", view.name);
            errno(&e)
        })?;
        Ok(file_attr(
            join(k, i).ok_or(libc::EOVERFLOW)?,
            &a,
            PREFERRED_IO,
        ))
    }

    /// The entries of name-tree directory `dir`: file-system roots and deeper name directories.
    fn name_entries(&self, dir: &str) -> Vec<(u64, FileType, OsString)> {
        let names = self.view.filesystems.iter().map(|f| f.name.as_str());
        self.names
            .entries(names, dir)
            .into_iter()
            .filter_map(|(name, target)| {
                let ino = match target {
                    NameTarget::Member(k) => join(k, self.root_of(k))?,
                    NameTarget::Dir(i) => FIRST_NAME_DIR + i as u64,
                };
                Some((ino, FileType::Directory, name.into()))
            })
            .collect()
    }

    /// The listing of directory `ino` (cached).
    fn listing(&self, ino: u64) -> Result<Arc<Listing>, i32> {
        if let Some(l) = self.cached_listing(ino) {
            return Ok(l);
        }
        let mut entries = Vec::new();
        if ino == ROOT {
            for (i, f) in self.view.files.iter().enumerate() {
                entries.push((
                    FIRST_FILE + i as u64,
                    FileType::RegularFile,
                    f.name.clone().into(),
                ));
            }
            if !self.view.status.is_empty() {
                entries.push((STATUS, FileType::RegularFile, ".elastio-status".into()));
            }
            entries.extend(self.name_entries(""));
        } else if let Some(dir) = self.name_dir(ino) {
            entries.extend(self.name_entries(dir));
        } else {
            let (k, i) = split(ino).ok_or(libc::ENOTDIR)?;
            let view = self.view.filesystems.get(k).ok_or(libc::ENOENT)?;
            let Some(fs) = view.fs.clone() else {
                let listing = Arc::new(Listing {
                    entries: Vec::new(),
                    by_name: HashMap::new(),
                });
                return Ok(listing);
            };
            let name = &self.view.filesystems[k].name;
            for e in fs.read_dir(i).map_err(|e| {
                tracing::error!("{name}: directory inode {i}: {e}");
                errno(&e)
            })? {
                let Some(ino) = join(k, e.ino) else {
                    tracing::error!("{name}: inode number {} is out of range", e.ino);
                    continue;
                };
                let kind = match e.kind {
                    Some(kind) => kind,
                    None => match fs.attr(e.ino) {
                        Ok(a) => a.kind,
                        Err(_) => continue,
                    },
                };
                let name = OsStr::from_bytes(&e.name).to_os_string();
                entries.push((ino, file_type(kind), name));
            }
        }
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, (_, _, n))| (n.clone(), i))
            .collect();
        let listing = Arc::new(Listing { entries, by_name });
        self.dirs.lock().unwrap().put(ino, listing.clone());
        Ok(listing)
    }

    /// The listing of `ino` if it is cached (the image root's is cheap to build, so it counts).
    fn cached_listing(&self, ino: u64) -> Option<Arc<Listing>> {
        self.dirs.lock().unwrap().get(ino)
    }

    fn lookup(&self, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let found = self.listing(parent).and_then(|l| {
            let i = *l.by_name.get(name).ok_or(libc::ENOENT)?;
            self.attr(l.entries[i].0)
        });
        match found {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, ino: u64, offset: i64, mut reply: ReplyDirectory) {
        let listing = match self.listing(ino) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        let dots = [
            (ino, FileType::Directory, OsStr::new(".")),
            (self.parent_hint(ino), FileType::Directory, OsStr::new("..")),
        ];
        let all = dots.into_iter().chain(
            listing
                .entries
                .iter()
                .map(|(i, k, n)| (*i, *k, n.as_os_str())),
        );
        for (i, (ino, kind, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    /// Opens file `i` of file system `k`: maps its blocks (bounded by the reader's budgets).
    fn open_file(&self, k: usize, i: u64, fs: Arc<dyn FileSystem>, reply: ReplyOpen) {
        match fs.open(i) {
            Ok(file) => reply.opened(self.register(Open::File(file)), KEEP_CACHE),
            Err(e) => {
                if e.kind() != std::io::ErrorKind::IsADirectory {
                    tracing::error!("{}: inode {i}: {e}", self.view.filesystems[k].name);
                }
                reply.error(errno(&e))
            }
        }
    }

    /// The extended attributes of `ino` (none for the view's own files).
    fn xattrs(&self, ino: u64) -> Result<crate::filesystem::Xattrs, i32> {
        let Some((k, i)) = split(ino) else {
            return Ok(Vec::new());
        };
        let Some(fs) = self.filesystem(k) else {
            return Ok(Vec::new());
        };
        fs.xattrs(i).map_err(|e| {
            tracing::error!(
                "{}: attributes of inode {i}: {e}",
                self.view.filesystems[k].name
            );
            errno(&e)
        })
    }

    /// The parent of directory `ino`, for its `..` entry.
    fn parent_hint(&self, ino: u64) -> u64 {
        // The kernel resolves `..` itself; the number only shows in readdir.
        match split(ino) {
            Some((k, i)) if i == self.root_of(k) => ROOT,
            _ => ino,
        }
    }

    fn register(&self, open: Open) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.open.lock().unwrap().insert(fh, Arc::new(open));
        fh
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // Large reads: up to 1 MiB of read-ahead per request where the kernel allows it.
        let _ = config.set_max_readahead(MAX_READ as u32);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        // The view's root and cached listings answer here; a directory to parse goes to a worker.
        if parent == ROOT || self.cached_listing(parent).is_some() {
            return self.shared.lookup(parent, name, reply);
        }
        let name = name.to_os_string();
        self.offload(move |s| s.lookup(parent, &name, reply));
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        let name = name.as_bytes().to_vec();
        self.offload(move |s| match s.xattrs(ino) {
            Ok(x) => match x.iter().find(|(k, _)| *k == name) {
                Some((_, v)) => reply_xattr(reply, size, v),
                None => reply.error(libc::ENODATA),
            },
            Err(e) => reply.error(e),
        });
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        self.offload(move |s| match s.xattrs(ino) {
            Ok(x) => {
                let names: Vec<u8> = x
                    .iter()
                    .flat_map(|(k, _)| k.iter().chain(&[0]))
                    .copied()
                    .collect();
                reply_xattr(reply, size, &names)
            }
            Err(e) => reply.error(e),
        });
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        let Some((k, i)) = split(ino) else {
            return reply.error(libc::EINVAL);
        };
        let Some(fs) = self.filesystem(k) else {
            return reply.error(libc::ENOENT);
        };
        match fs.read_link(i) {
            Ok(target) => reply.data(&target),
            Err(e) => {
                tracing::error!("{}: symlink inode {i}: {e}", self.view.filesystems[k].name);
                reply.error(errno(&e))
            }
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        if self.file(ino).is_some() {
            return reply.opened(self.register(Open::Image), KEEP_CACHE);
        }
        if ino == STATUS && !self.view.status.is_empty() {
            return reply.opened(self.register(Open::Status), KEEP_CACHE);
        }
        let Some((k, i)) = split(ino) else {
            return reply.error(libc::EISDIR);
        };
        let Some(fs) = self.filesystem(k).cloned() else {
            return reply.error(libc::ENOENT);
        };
        self.offload(move |s| s.open_file(k, i, fs, reply));
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        self.open.lock().unwrap().remove(&fh);
        reply.ok();
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        if offset < 0 {
            return reply.error(libc::EINVAL);
        }
        let Some(open) = self.open.lock().unwrap().get(&fh).cloned() else {
            return reply.error(libc::EBADF);
        };
        let offset = offset as u64;
        let (job, cached): (Box<dyn FnOnce() + Send>, bool) = match &*open {
            Open::Status => {
                let text = self.view.status.as_bytes();
                let start = (offset as usize).min(text.len());
                let end = start.saturating_add(size as usize).min(text.len());
                return reply.data(&text[start..end]);
            }
            Open::Image => {
                let Some(f) = self.file(ino) else {
                    return reply.error(libc::EINVAL);
                };
                let offset = offset.min(f.len);
                let (start, size) = (f.start + offset, (size as u64).min(f.len - offset) as usize);
                let view = self.view.clone();
                let cached = view.reader.is_range_cached(start, size as u64);
                let job = Box::new(move || {
                    // A hole (half of a typical disk image) needs no buffer at all.
                    if is_hole(view.reader.as_ref(), start, size) {
                        return reply.data(&ZEROS[..size]);
                    }
                    with_reply_buffer(size, |buf| {
                        match view.reader.read_append(start, size, buf) {
                            Ok(_) => reply.data(buf),
                            Err(e) => {
                                tracing::error!("read of {size} bytes at {start}: {e}");
                                reply.error(libc::EIO)
                            }
                        }
                    })
                });
                (job, cached)
            }
            Open::File(file) => {
                let len = file.size();
                let offset = offset.min(len);
                let size = (size as u64).min(len - offset);
                let cached = file.is_cached(offset, size);
                let (view, file) = (self.view.clone(), file.clone());
                let job = Box::new(move || {
                    with_reply_buffer(size as usize, |buf| {
                        match file.read_append(offset, size as usize, buf) {
                            Ok(()) => reply.data(buf),
                            Err(e) => {
                                let name = split(ino)
                                    .and_then(|(k, _)| view.filesystems.get(k))
                                    .map_or("?", |v| v.name.as_str());
                                tracing::error!(
                                    "{name}: inode {}: read of {size} bytes at {offset}: {e}",
                                    ino & FS_INO_MASK
                                );
                                reply.error(libc::EIO)
                            }
                        }
                    })
                });
                (job, cached)
            }
        };
        // Reads of cached chunks are served right here (a copy is cheaper than handing the
        // request to a worker); reads that fetch and decode go to the workers, so they overlap.
        if cached {
            return job();
        }
        if let Err(e) = self.reads.send(job) {
            (e.into_inner())();
        }
    }

    fn lseek(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(libc::ENOSYS);
        };
        if offset < 0 {
            return reply.error(libc::EINVAL);
        }
        let (size, base) = (f.len, f.start);
        let offset = offset as u64;
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return reply.error(libc::EINVAL);
        }
        if offset >= size {
            return reply.error(libc::ENXIO);
        }
        let runs = match self.view.reader.extents(base + offset, size - offset, 1) {
            Ok(r) => r,
            Err(_) => return reply.error(libc::EIO),
        };
        let (len, data) = runs[0];
        let want_data = whence == libc::SEEK_DATA;
        if data == want_data {
            reply.offset(offset as i64)
        } else if offset + len < size || !want_data {
            // The next run has the other kind; past the last run is the implicit hole at EOF.
            reply.offset((offset + len) as i64)
        } else {
            reply.error(libc::ENXIO)
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        reply: ReplyDirectory,
    ) {
        if ino == ROOT || self.cached_listing(ino).is_some() {
            return self.shared.readdir(ino, offset, reply);
        }
        self.offload(move |s| s.readdir(ino, offset, reply));
    }
}

/// Mounts `view` read-only at `mountpoint` and serves it until `stop()` returns true or the file
/// system is unmounted from outside (`fusermount3 -u`, `elastio umount`). `ready` runs once the
/// kernel has the mount (requests are served meanwhile); `before_unmount` runs before this
/// process unmounts it (to take down mounts stacked on top).
pub fn serve(
    view: DiskView,
    mountpoint: &Path,
    fsname: &str,
    ready: impl FnOnce(),
    stop: impl Fn() -> bool,
    before_unmount: impl FnOnce(),
) -> std::io::Result<()> {
    serve_fs(
        |reads| Fs {
            shared: Arc::new(Shared {
                names: NameTree::new(view.filesystems.iter().map(|f| f.name.as_str())),
                view: Arc::new(view),
                dirs: Mutex::new(DirCache::new(DIR_CACHE_BYTES)),
                open: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
            }),
            reads,
        },
        mountpoint,
        fsname,
        ready,
        stop,
        before_unmount,
    )
}

/// A job for the read pool of a mount.
pub(crate) type ReadJob = Box<dyn FnOnce() + Send>;

/// The mount loop of every view: a pool of 4 read threads (the file system gets the sender),
/// mount, `ready`, wait for `stop` or an outside unmount, `before_unmount`, unmount.
pub(crate) fn serve_fs<F: Filesystem + Send + 'static>(
    make: impl FnOnce(Sender<ReadJob>) -> F,
    mountpoint: &Path,
    fsname: &str,
    ready: impl FnOnce(),
    stop: impl Fn() -> bool,
    before_unmount: impl FnOnce(),
) -> std::io::Result<()> {
    let (tx, rx) = bounded::<ReadJob>(64);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let rx = rx.clone();
            std::thread::spawn(move || {
                for job in rx {
                    job();
                }
            })
        })
        .collect();
    let fs = make(tx);
    let options = [
        MountOption::RO,
        MountOption::FSName(fsname.to_string()),
        MountOption::Subtype("elastio".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    let session = fuser::spawn_mount2(fs, mountpoint, &options)?;
    widen_readahead(mountpoint);
    ready();
    while !stop() && !session.guard.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
    }
    if !session.guard.is_finished() {
        before_unmount();
    }
    // Dropping the session unmounts (if still mounted) and ends the loop; the read workers stop
    // when the file system's sender is dropped with it.
    drop(session);
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

/// Read-ahead the kernel does on this mount, in KiB. The kernel starts FUSE mounts at 128 KiB,
/// which keeps only one or two requests in flight for a sequential reader; deeper read-ahead
/// lets the read workers decode chunks in parallel (cat of a 2 GiB image: 1.33 s -> 1.13 s).
const READ_AHEAD_KB: u32 = 4096;

/// Raises the read-ahead of the mount's backing device info (sysfs; needs root, and is
/// skipped quietly otherwise: it only changes speed).
fn widen_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, READ_AHEAD_KB.to_string()) {
        tracing::debug!("cannot raise read-ahead ({path}): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(n: usize, name_len: usize) -> Arc<Listing> {
        let entries: Vec<_> = (0..n)
            .map(|i| {
                let name = format!("{i:0name_len$}");
                (i as u64, FileType::RegularFile, OsString::from(name))
            })
            .collect();
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, (_, _, n))| (n.clone(), i))
            .collect();
        Arc::new(Listing { entries, by_name })
    }

    /// Old code: the cache held 1024 listings whatever their size (up to ~900 MB each for a
    /// hostile directory); now it holds listings up to a byte budget.
    #[test]
    fn directory_cache_is_bounded_in_bytes() {
        let one = listing(1000, 20).weight();
        let mut cache = DirCache::new(10 * one);
        for ino in 0..100 {
            cache.put(ino, listing(1000, 20));
            assert!(cache.bytes <= 10 * one);
        }
        assert_eq!(cache.lru.len(), 10);
        assert!(cache.get(99).is_some() && cache.get(0).is_none());
        // A listing larger than the whole budget is not kept (it is rebuilt when asked again).
        cache.put(1000, listing(20_000, 20));
        assert!(cache.get(1000).is_none() && cache.bytes <= 10 * one);
        // Replacing an entry does not count it twice.
        cache.put(99, listing(1000, 20));
        assert!(cache.bytes <= 10 * one);
    }

    /// A request that starts in a hole and runs into data is not a hole (a reply of zeros for
    /// it corrupted disk.img once).
    #[test]
    fn only_requests_wholly_inside_a_hole_are_holes() {
        let cs = 4096usize;
        // Slots: data, zeros, zeros, data.
        let mut disk = vec![0u8; 4 * cs];
        disk[..cs].fill(7);
        disk[3 * cs..].fill(9);
        let vault = scalez::testing::memory_vault(cs as u32);
        let map = scalez::testing::store_disk(&vault, &disk);
        let reader = DiskReader::new(vault, map, 4 * cs);
        assert!(is_hole(&reader, cs as u64, 2 * cs));
        assert!(is_hole(&reader, cs as u64 + 100, cs));
        assert!(!is_hole(&reader, cs as u64, 3 * cs), "hole then data");
        assert!(!is_hole(&reader, 0, 2 * cs), "data then hole");
        assert!(!is_hole(&reader, 2 * cs as u64, 2 * cs), "hole then data");
        assert!(
            !is_hole(&reader, cs as u64, ZEROS.len() + 1),
            "larger than ZEROS"
        );
    }
}
