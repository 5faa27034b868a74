//! FUSE view of a file RP: its tree as it was backed up (paths under their source's absolute
//! path, e.g. `usr/share/doc/...`), read-only, with modes, owners, times, symlinks, device
//! numbers, hard links (one inode per link group) and extended attributes. File data is read
//! through the chunks listed in the tree, holes read as zeros.
//!
//! The whole tree is loaded when mounting (one [`Entry`] per path, about 200 bytes plus its
//! chunk list); decoded chunks are kept in an LRU bounded by the mount's cache size. Reads run
//! on the mount's read pool. Inode 1 is the root; entry `i` of the tree is inode `i + 2`.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, ReplyXattr, Request,
};
use scalez::cache::ChunkCache;
use scalez::tree::{split_path, Entry, EntryKind, TreeReader};
use scalez::{ChunkId, RecoveryPoint, Vault};

use crate::filesystem::{Attr, Entry as DirEntry, FileData, FileSystem, Kind, Xattrs};
use crate::fuse::{serve_fs, ReadJob};

const ROOT: u64 = 1;
const TTL: Duration = Duration::from_secs(3600);
const KEEP_CACHE: u32 = 1 << 1;

struct Node {
    entry: Entry,
    /// Children (name, inode), sorted by name bytes.
    children: Vec<(OsString, u64)>,
    parent: u64,
    /// Start of each chunk in the file's data (regular files).
    offsets: Vec<u64>,
}

/// A file RP loaded for mounting.
pub struct TreeView {
    vault: Arc<Vault>,
    /// `nodes[0]` is the root; inode = index + 1.
    nodes: Vec<Node>,
    cache: ChunkCache,
}

fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn kind(kind: EntryKind) -> Kind {
    match kind {
        EntryKind::File => Kind::File,
        EntryKind::Dir => Kind::Dir,
        EntryKind::Symlink => Kind::Symlink,
        EntryKind::CharDev => Kind::CharDevice,
        EntryKind::BlockDev => Kind::BlockDevice,
        EntryKind::Fifo => Kind::Fifo,
        EntryKind::Socket => Kind::Socket,
    }
}

fn file_type(k: EntryKind) -> FileType {
    crate::fuse::file_type(kind(k))
}

impl TreeView {
    /// Reads the tree of file RP `rp`; `cache_bytes` bounds the decoded chunks kept.
    #[allow(unsafe_code)]
    pub fn load(vault: Arc<Vault>, rp: &RecoveryPoint, cache_bytes: usize) -> scalez::Result<Self> {
        let tree = rp.tree()?;
        let time = humantime::parse_rfc3339_weak(&rp.created).unwrap_or(UNIX_EPOCH);
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let mut root = Entry::new(Vec::new(), EntryKind::Dir);
        root.mode = 0o555;
        root.uid = uid;
        root.gid = gid;
        let ns = time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        root.mtime_ns = ns;
        root.ctime_ns = ns;
        let mut nodes = vec![Node {
            entry: root,
            children: Vec::new(),
            parent: ROOT,
            offsets: Vec::new(),
        }];
        let mut by_path: std::collections::HashMap<Vec<u8>, u64> = std::collections::HashMap::new();
        by_path.insert(Vec::new(), ROOT);
        for e in TreeReader::open(&vault, &tree.stream, &rp.id.to_string())? {
            let mut e = e?;
            let (parent_path, name) = split_path(&e.path);
            let name = OsStr::from_bytes(name).to_os_string();
            // A tree lists parents before children; a parent missing (or not a directory)
            // leaves the entry out rather than inventing one.
            let Some(&parent) = by_path.get(parent_path) else {
                tracing::warn!("{}: no parent directory in the tree", e.path.escape_ascii());
                continue;
            };
            if nodes[(parent - 1) as usize].entry.kind != EntryKind::Dir {
                continue;
            }
            if !e.hardlink.is_empty() {
                if let Some(&target) = by_path.get(&e.hardlink) {
                    nodes[(parent - 1) as usize].children.push((name, target));
                    continue;
                }
            }
            let mut offsets = Vec::with_capacity(e.chunks.len());
            let mut at = 0u64;
            for (_, len) in &e.chunks {
                offsets.push(at);
                at += *len as u64;
            }
            let ino = nodes.len() as u64 + 1;
            let path = std::mem::take(&mut e.path);
            nodes[(parent - 1) as usize].children.push((name, ino));
            nodes.push(Node {
                entry: e,
                children: Vec::new(),
                parent,
                offsets,
            });
            by_path.insert(path, ino);
        }
        for n in &mut nodes {
            n.children
                .sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        }
        Ok(TreeView {
            vault,
            nodes,
            cache: ChunkCache::new(cache_bytes),
        })
    }

    /// Paths in the view (the root excluded).
    pub fn len(&self) -> usize {
        self.nodes.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 1
    }

    fn node(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    fn node_attr(&self, ino: u64) -> Option<Attr> {
        let n = self.node(ino)?;
        let e = &n.entry;
        let size = match e.kind {
            EntryKind::File => e.size,
            EntryKind::Symlink => e.target.len() as u64,
            _ => 0,
        };
        let nlink = match e.kind {
            EntryKind::Dir => {
                2 + n
                    .children
                    .iter()
                    .filter(|(_, c)| {
                        self.node(*c)
                            .is_some_and(|c| c.entry.kind == EntryKind::Dir)
                    })
                    .count() as u32
            }
            _ => e.nlink.max(1),
        };
        Some(Attr {
            kind: kind(e.kind),
            perm: (e.mode & 0o7777) as u16,
            size,
            blocks: e.stored_len().div_ceil(512),
            nlink,
            uid: e.uid,
            gid: e.gid,
            rdev: e.rdev as u32,
            atime: system_time(e.mtime_ns),
            mtime: system_time(e.mtime_ns),
            ctime: system_time(e.ctime_ns),
            crtime: system_time(e.mtime_ns),
        })
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        Some(crate::fuse::file_attr(
            ino,
            &self.node_attr(ino)?,
            128 << 10,
        ))
    }

    fn chunk(&self, id: &ChunkId, len: u32) -> scalez::Result<Arc<Vec<u8>>> {
        self.cache.get_sized(&self.vault, id, len, "the file tree")
    }

    /// Copies file data bytes [`from`, `from + out.len()`) (offsets in the chunk stream).
    fn read_data(&self, n: &Node, from: u64, out: &mut [u8]) -> scalez::Result<()> {
        let mut i = match n.offsets.binary_search(&from) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        let mut pos = from;
        let mut done = 0usize;
        while done < out.len() && i < n.entry.chunks.len() {
            let (id, len) = n.entry.chunks[i];
            let data = self.chunk(&id, len)?;
            let skip = (pos - n.offsets[i]) as usize;
            let take = (data.len() - skip).min(out.len() - done);
            out[done..done + take].copy_from_slice(&data[skip..skip + take]);
            done += take;
            pos += take as u64;
            i += 1;
        }
        Ok(())
    }

    /// Reads up to `size` bytes of file `ino` at `offset`; holes are zeros.
    fn read(&self, ino: u64, offset: u64, size: u32) -> scalez::Result<Vec<u8>> {
        let Some(n) = self.node(ino) else {
            return Ok(Vec::new());
        };
        let end = offset.saturating_add(size as u64).min(n.entry.size);
        if end <= offset {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let mut data_start = 0u64;
        for (roff, rlen) in n.entry.data_regions() {
            let (s, e) = (roff.max(offset), (roff + rlen).min(end));
            if s < e {
                let from = data_start + (s - roff);
                let dst = &mut out[(s - offset) as usize..(e - offset) as usize];
                self.read_data(n, from, dst)?;
            }
            data_start += rlen;
            if roff >= end {
                break;
            }
        }
        Ok(out)
    }

    fn show(&self, ino: u64) -> String {
        // Rebuild the path from parents (only for error messages).
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let Some(n) = self.node(cur) else { break };
            let parent = self.node(n.parent);
            if let Some(name) = parent.and_then(|p| p.children.iter().find(|c| c.1 == cur)) {
                parts.push(name.0.to_string_lossy().into_owned());
            }
            cur = n.parent;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }
}

/// A file RP's tree through the interface every reader implements (`rp ls/cat/find/diff`).
impl FileSystem for TreeView {
    fn type_name(&self) -> &'static str {
        "file tree"
    }

    fn root(&self) -> u64 {
        ROOT
    }

    fn attr(&self, ino: u64) -> io::Result<Attr> {
        self.node_attr(ino)
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    fn read_dir(&self, ino: u64) -> io::Result<Vec<DirEntry>> {
        let n = self.node(ino).ok_or(io::ErrorKind::NotFound)?;
        if n.entry.kind != EntryKind::Dir {
            return Err(io::ErrorKind::NotADirectory.into());
        }
        Ok(n.children
            .iter()
            .map(|(name, ino)| DirEntry {
                name: name.as_bytes().to_vec(),
                ino: *ino,
                kind: self.node(*ino).map(|c| kind(c.entry.kind)),
            })
            .collect())
    }

    fn read_link(&self, ino: u64) -> io::Result<Vec<u8>> {
        match self.node(ino) {
            Some(n) if n.entry.kind == EntryKind::Symlink => Ok(n.entry.target.clone()),
            Some(_) => Err(io::ErrorKind::InvalidInput.into()),
            None => Err(io::ErrorKind::NotFound.into()),
        }
    }

    fn xattrs(&self, ino: u64) -> io::Result<Xattrs> {
        let n = self.node(ino).ok_or(io::ErrorKind::NotFound)?;
        Ok(n.entry.xattrs.clone())
    }

    fn open(self: Arc<Self>, ino: u64) -> io::Result<Arc<dyn FileData>> {
        let n = self.node(ino).ok_or(io::ErrorKind::NotFound)?;
        if n.entry.kind != EntryKind::File {
            return Err(io::ErrorKind::IsADirectory.into());
        }
        Ok(Arc::new(TreeFile { view: self, ino }))
    }
}

/// An open file of a file RP.
struct TreeFile {
    view: Arc<TreeView>,
    ino: u64,
}

impl TreeFile {
    fn entry(&self) -> &Entry {
        &self.view.nodes[(self.ino - 1) as usize].entry
    }
}

impl FileData for TreeFile {
    fn size(&self) -> u64 {
        self.entry().size
    }

    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let mut at = offset;
        let end = offset + len as u64;
        while at < end {
            let n = (end - at).min(1 << 30) as u32;
            let piece = self.view.read(self.ino, at, n)?;
            // A read past the end gives fewer bytes; the caller asked for zeros there.
            out.extend_from_slice(&piece);
            out.resize(out.len() + (n as usize - piece.len()), 0);
            at += n as u64;
        }
        Ok(())
    }

    fn disk_ranges(&self, _offset: u64, _len: u64) -> Vec<(u64, u64)> {
        Vec::new()
    }

    fn is_cached(&self, _offset: u64, _len: u64) -> bool {
        false
    }

    fn content_key(&self) -> Option<Vec<u8>> {
        // The size, where the data regions are, and the chunks that hold them.
        let e = self.entry();
        let mut key = e.size.to_le_bytes().to_vec();
        for (at, n) in e.data_regions() {
            key.extend_from_slice(&at.to_le_bytes());
            key.extend_from_slice(&n.to_le_bytes());
        }
        for (id, len) in &e.chunks {
            key.extend_from_slice(&id.0);
            key.extend_from_slice(&len.to_le_bytes());
        }
        Some(key)
    }
}

struct TreeFs {
    view: Arc<TreeView>,
    reads: Sender<ReadJob>,
}

impl Filesystem for TreeFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let Some(p) = self.view.node(parent) else {
            return reply.error(libc::ENOENT);
        };
        match p
            .children
            .binary_search_by(|c| c.0.as_bytes().cmp(name.as_bytes()))
            .ok()
            .and_then(|i| self.view.attr(p.children[i].1))
        {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.view.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        match self.view.node(ino) {
            Some(n) if n.entry.kind == EntryKind::Symlink => reply.data(&n.entry.target),
            Some(_) => reply.error(libc::EINVAL),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        match self.view.node(ino) {
            Some(n) if n.entry.kind == EntryKind::Dir => reply.error(libc::EISDIR),
            Some(_) => reply.opened(0, KEEP_CACHE),
            None => reply.error(libc::ENOENT),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        if offset < 0 {
            return reply.error(libc::EINVAL);
        }
        let view = self.view.clone();
        let job: ReadJob = Box::new(move || match view.read(ino, offset as u64, size) {
            Ok(data) => reply.data(&data),
            Err(e) => {
                tracing::error!("{}: {e}", view.show(ino));
                reply.error(libc::EIO)
            }
        });
        if let Err(e) = self.reads.send(job) {
            (e.0)();
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let Some(n) = self.view.node(ino) else {
            return reply.error(libc::ENOENT);
        };
        if n.entry.kind != EntryKind::Dir {
            return reply.error(libc::ENOTDIR);
        }
        let dots = [
            (ino, FileType::Directory, OsStr::new(".")),
            (n.parent, FileType::Directory, OsStr::new("..")),
        ];
        let kids = n.children.iter().map(|(name, c)| {
            let kind = self
                .view
                .node(*c)
                .map_or(FileType::RegularFile, |k| file_type(k.entry.kind));
            (*c, kind, name.as_os_str())
        });
        for (i, (ino, kind, name)) in dots
            .into_iter()
            .chain(kids)
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(ino, (i + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        let Some(n) = self.view.node(ino) else {
            return reply.error(libc::ENOENT);
        };
        match n.entry.xattrs.iter().find(|(k, _)| k == name.as_bytes()) {
            None => reply.error(libc::ENODATA),
            Some((_, v)) => crate::fuse::reply_xattr(reply, size, v),
        }
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        let Some(n) = self.view.node(ino) else {
            return reply.error(libc::ENOENT);
        };
        let mut names = Vec::new();
        for (k, _) in &n.entry.xattrs {
            names.extend_from_slice(k);
            names.push(0);
        }
        crate::fuse::reply_xattr(reply, size, &names)
    }
}

/// Mounts `view` read-only at `mountpoint` (see [`crate::fuse::serve`] for the lifecycle).
pub fn serve_tree(
    view: TreeView,
    mountpoint: &Path,
    fsname: &str,
    ready: impl FnOnce(),
    stop: impl Fn() -> bool,
    before_unmount: impl FnOnce(),
) -> std::io::Result<()> {
    serve_fs(
        |reads| TreeFs {
            view: Arc::new(view),
            reads,
        },
        mountpoint,
        fsname,
        ready,
        stop,
        before_unmount,
    )
}
