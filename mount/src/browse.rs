//! A recovery point as one read-only [`FileSystem`], for the commands that work without a
//! mount (`rp ls`, `rp cat`, `rp find`, `rp diff`, file restores from disk RPs).
//!
//! A file RP is its tree ([`TreeView`]). A disk RP is a directory per file system, named as the
//! mount names them (`part1`, `fs`), whose inodes are packed with [`join`]; partitions holding
//! nothing elastio reads are left out and their status lines returned. Paths are byte strings
//! relative to that root (`part1/etc/hosts`, `home/alice/notes.txt`); a leading `/` is allowed.
//!
//! Invariants: nothing is written; walks ([`Walker`]) visit a directory inode at most once, so a
//! hostile file system whose directories form a cycle or a huge DAG ends instead of looping, and
//! they keep one stack entry per pending directory, never the whole tree.

use std::collections::HashSet;
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use scalez::{RecoveryPoint, RpKind, Vault};

use crate::filesystem::{
    join, split, Attr, Entry, FileData, FileSystem, Kind, NameTarget, NameTree, Xattrs,
};
use crate::tree_view::TreeView;
use crate::views::{self, ViewOptions};

/// The root of a disk RP's file systems.
const ROOT: u64 = 1;

/// An opened RP: its files, and what each partition of a disk RP holds.
pub struct Opened {
    pub fs: Arc<dyn FileSystem>,
    /// One line per partition of a disk RP (`part2: swap, not readable by elastio yet`).
    pub status: Vec<String>,
}

/// Opens RP `rp`'s files; `cache_bytes` bounds the decoded chunks kept.
pub fn open(vault: &Arc<Vault>, rp: &RecoveryPoint, cache_bytes: usize) -> io::Result<Opened> {
    match rp.kind {
        RpKind::File => Ok(Opened {
            fs: Arc::new(TreeView::load(vault.clone(), rp, cache_bytes)?),
            status: Vec::new(),
        }),
        RpKind::Disk => {
            let opts = ViewOptions {
                cache_bytes,
                kernel: false,
                owner: (0, 0),
            };
            let mount = views::disk(vault, rp, &opts)?;
            let members = mount
                .view
                .filesystems
                .into_iter()
                .filter_map(|v| Some((v.name, v.fs?)))
                .collect();
            let volumes = Volumes::new(members, mount.view.time);
            Ok(Opened {
                fs: Arc::new(volumes),
                status: mount.status,
            })
        }
        RpKind::Stream => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a stream RP: it holds bytes, not files (elastio stream restore)",
                rp.id
            ),
        )),
        RpKind::Instance => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is an instance RP: name the disk RP of one of its volumes                  (elastio rp show {})",
                rp.id, rp.id
            ),
        )),
    }
}

/// Several file systems as the directories of one root (names with `/` nest: `lvm/vg0/root`).
struct Volumes {
    members: Vec<(String, Arc<dyn FileSystem>)>,
    names: NameTree,
    time: SystemTime,
}

/// Inodes of the directories a [`NameTree`] implies: the root is 1, directory `i` is 2 + i.
const FIRST_NAME_DIR: u64 = 2;

impl Volumes {
    fn new(members: Vec<(String, Arc<dyn FileSystem>)>, time: SystemTime) -> Self {
        let names = NameTree::new(members.iter().map(|m| m.0.as_str()));
        Volumes {
            members,
            names,
            time,
        }
    }

    /// The name-tree directory `ino` is ("" for the root), if it is one.
    fn name_dir(&self, ino: u64) -> Option<&str> {
        self.names.dir_of(ino, ROOT, FIRST_NAME_DIR)
    }

    fn member(&self, ino: u64) -> io::Result<(&Arc<dyn FileSystem>, usize, u64)> {
        let (k, i) = split(ino).ok_or(io::ErrorKind::NotFound)?;
        let fs = &self.members.get(k).ok_or(io::ErrorKind::NotFound)?.1;
        Ok((fs, k, i))
    }
}

impl FileSystem for Volumes {
    fn type_name(&self) -> &'static str {
        "volumes"
    }

    fn root(&self) -> u64 {
        ROOT
    }

    fn attr(&self, ino: u64) -> io::Result<Attr> {
        if self.name_dir(ino).is_some() {
            return Ok(Attr {
                kind: Kind::Dir,
                perm: 0o555,
                size: 0,
                blocks: 0,
                nlink: 2,
                uid: 0,
                gid: 0,
                rdev: 0,
                atime: self.time,
                mtime: self.time,
                ctime: self.time,
                crtime: self.time,
            });
        }
        let (fs, _, i) = self.member(ino)?;
        fs.attr(i)
    }

    fn read_dir(&self, ino: u64) -> io::Result<Vec<Entry>> {
        if let Some(dir) = self.name_dir(ino) {
            let names = self.members.iter().map(|m| m.0.as_str());
            return Ok(self
                .names
                .entries(names, dir)
                .into_iter()
                .filter_map(|(name, target)| {
                    let ino = match target {
                        NameTarget::Member(k) => join(k, self.members[k].1.root())?,
                        NameTarget::Dir(i) => FIRST_NAME_DIR + i as u64,
                    };
                    Some(Entry {
                        name: name.into_bytes(),
                        ino,
                        kind: Some(Kind::Dir),
                    })
                })
                .collect());
        }
        let (fs, k, i) = self.member(ino)?;
        Ok(fs
            .read_dir(i)?
            .into_iter()
            .filter_map(|e| {
                Some(Entry {
                    ino: join(k, e.ino)?,
                    ..e
                })
            })
            .collect())
    }

    fn read_link(&self, ino: u64) -> io::Result<Vec<u8>> {
        let (fs, _, i) = self.member(ino)?;
        fs.read_link(i)
    }

    fn subtree_key(&self, ino: u64) -> Option<Vec<u8>> {
        let (fs, _, i) = self.member(ino).ok()?;
        fs.subtree_key(i)
    }

    fn xattrs(&self, ino: u64) -> io::Result<Xattrs> {
        if self.name_dir(ino).is_some() {
            return Ok(Vec::new());
        }
        let (fs, _, i) = self.member(ino)?;
        fs.xattrs(i)
    }

    fn open(self: Arc<Self>, ino: u64) -> io::Result<Arc<dyn FileData>> {
        let (fs, _, i) = self.member(ino)?;
        fs.clone().open(i)
    }
}

/// The inode at `path` (components split on `/`, empty ones and a leading `/` ignored; `.`
/// and `..` refused; symlinks not followed). Errors name the path.
pub fn resolve(fs: &dyn FileSystem, path: &[u8]) -> io::Result<u64> {
    let mut ino = fs.root();
    let shown = || String::from_utf8_lossy(path).into_owned();
    for part in path.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
        if part == b"." || part == b".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: `.` and `..` are not allowed in RP paths", shown()),
            ));
        }
        let entries = fs.read_dir(ino).map_err(|e| match e.kind() {
            io::ErrorKind::NotADirectory => io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{}: a path component is not a directory", shown()),
            ),
            _ => io::Error::new(e.kind(), format!("{}: {e}", shown())),
        })?;
        ino = entries
            .iter()
            .find(|e| e.name == part)
            .map(|e| e.ino)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: no such file or directory in the RP", shown()),
                )
            })?;
    }
    Ok(ino)
}

/// One path of a [`Walker`].
#[derive(Debug, Clone)]
pub struct Item {
    /// Relative to the walk's start (empty for the start itself).
    pub path: Vec<u8>,
    pub ino: u64,
    pub attr: Attr,
    pub depth: usize,
}

/// A failure the walk stepped over: the path, and why.
#[derive(Debug)]
pub struct Skipped {
    pub path: Vec<u8>,
    pub error: io::Error,
}

/// The paths under a directory, depth first, each directory's entries in name-byte order:
/// the order in which two walks of two RPs can be merged path by path (compare paths with
/// [`path_order`]). A directory reached twice (a cycle or a directory hard link in a damaged
/// file system) is entered once; an entry that cannot be read comes out as [`Skipped`] and
/// the walk goes on. Memory: the pending entries of the directories on the current path and
/// one inode number per directory entered.
pub struct Walker<'a> {
    fs: &'a dyn FileSystem,
    recursive: bool,
    stack: Vec<(Vec<u8>, u64, usize)>,
    seen: HashSet<u64>,
    pending: Option<Skipped>,
    /// The stack's length before the last item's entries were pushed.
    before_entries: usize,
}

impl<'a> Walker<'a> {
    /// Walks `start` (shown as the empty path) and its entries; everything below too when
    /// `recursive`.
    pub fn new(fs: &'a dyn FileSystem, start: u64, recursive: bool) -> Self {
        Walker {
            fs,
            recursive,
            stack: vec![(Vec::new(), start, 0)],
            seen: HashSet::new(),
            pending: None,
            before_entries: 0,
        }
    }
}

impl Iterator for Walker<'_> {
    type Item = Result<Item, Skipped>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(s) = self.pending.take() {
            return Some(Err(s));
        }
        let (path, ino, depth) = self.stack.pop()?;
        self.before_entries = self.stack.len();
        let attr = match self.fs.attr(ino) {
            Ok(a) => a,
            Err(error) => return Some(Err(Skipped { path, error })),
        };
        let enter = attr.kind == Kind::Dir && (depth == 0 || self.recursive);
        if enter && self.seen.insert(ino) {
            match self.fs.read_dir(ino) {
                Ok(mut entries) => {
                    entries.sort_by(|a, b| b.name.cmp(&a.name));
                    for e in entries {
                        let mut p = path.clone();
                        if !p.is_empty() {
                            p.push(b'/');
                        }
                        p.extend_from_slice(&e.name);
                        self.stack.push((p, e.ino, depth + 1));
                    }
                }
                Err(error) => {
                    self.pending = Some(Skipped {
                        path: path.clone(),
                        error,
                    })
                }
            }
        }
        Some(Ok(Item {
            path,
            ino,
            attr,
            depth,
        }))
    }
}

impl Walker<'_> {
    /// Leaves out everything below the item just returned (a directory known to be unchanged).
    pub fn skip_entries(&mut self) {
        self.stack.truncate(self.before_entries);
        self.pending = None;
    }
}

/// The order of a [`Walker`]'s paths: component by component, each by its bytes.
pub fn path_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.split(|&c| c == b'/').cmp(b.split(|&c| c == b'/'))
}

/// Copies regular file `ino` to `out` in pieces of at most 1 MiB; returns the bytes written.
pub fn copy_file(fs: &Arc<dyn FileSystem>, ino: u64, out: &mut dyn io::Write) -> io::Result<u64> {
    let f = fs.clone().open(ino)?;
    let mut buf = Vec::with_capacity(1 << 20);
    let mut at = 0;
    while at < f.size() {
        let n = (f.size() - at).min(1 << 20) as usize;
        buf.clear();
        f.read_append(at, n, &mut buf)?;
        out.write_all(&buf)?;
        at += n as u64;
    }
    Ok(at)
}

/// How a path differs between two RPs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added,
    Removed,
    /// What differs: any of "type", "content", "target", "mode", "owner", "mtime", "xattrs".
    Changed(Vec<&'static str>),
}

/// What [`diff`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DiffStats {
    /// Paths present in both RPs.
    pub compared: u64,
    /// Files whose content keys matched, so their bytes were not read.
    pub same_by_key: u64,
    /// Whole file systems whose chunks are all the same in both RPs, skipped unread.
    pub same_subtrees: u64,
    /// Bytes read to compare files whose keys could not tell.
    pub bytes_read: u64,
    pub added: u64,
    pub removed: u64,
    pub changed: u64,
}

/// Compares RP `a` (old) with RP `b` (new) path by path, calling `report` for each path that
/// was added, removed or changed (a directory's own change, then its entries'). Paths that
/// cannot be read on either side go to `skipped`. Files are compared by content key where both
/// readers give one (unchanged chunks mean unchanged bytes), else byte by byte.
pub fn diff(
    a: &Arc<dyn FileSystem>,
    b: &Arc<dyn FileSystem>,
    report: &mut dyn FnMut(&Item, Change) -> io::Result<()>,
    skipped: &mut dyn FnMut(Skipped),
) -> io::Result<DiffStats> {
    diff_all(
        a,
        b,
        &mut |item, change, _| report(item, change),
        &mut |_| {},
        skipped,
    )
}

/// What [`diff_all`] calls for each change: the path's item in the new RP (the old one's for a
/// removal), what changed, and for a change the item in the old RP.
pub type ChangeReport<'a> = dyn FnMut(&Item, Change, Option<&Item>) -> io::Result<()> + 'a;

/// [`diff`], also giving `report` the path's item in `a` for a change (the same path, so a
/// caller needs no lookup), and calling `unchanged` with each path of `b` found the same in `a`
/// (the paths under a skipped identical file system excepted).
pub fn diff_all(
    a: &Arc<dyn FileSystem>,
    b: &Arc<dyn FileSystem>,
    report: &mut ChangeReport<'_>,
    unchanged: &mut dyn FnMut(&Item),
    skipped: &mut dyn FnMut(Skipped),
) -> io::Result<DiffStats> {
    let mut stats = DiffStats::default();
    let next = |w: &mut Walker, skipped: &mut dyn FnMut(Skipped)| loop {
        match w.next() {
            None => return None,
            Some(Ok(item)) => return Some(item),
            Some(Err(s)) => skipped(s),
        }
    };
    let (mut wa, mut wb) = (
        Walker::new(a.as_ref(), a.root(), true),
        Walker::new(b.as_ref(), b.root(), true),
    );
    let (mut x, mut y) = (next(&mut wa, skipped), next(&mut wb, skipped));
    loop {
        let order = match (&x, &y) {
            (None, None) => return Ok(stats),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(p), Some(q)) => path_order(&p.path, &q.path),
        };
        match order {
            std::cmp::Ordering::Less => {
                let p = x.take().unwrap();
                stats.removed += 1;
                report(&p, Change::Removed, None)?;
                x = next(&mut wa, skipped);
            }
            std::cmp::Ordering::Greater => {
                let q = y.take().unwrap();
                stats.added += 1;
                report(&q, Change::Added, None)?;
                y = next(&mut wb, skipped);
            }
            std::cmp::Ordering::Equal => {
                let (p, q) = (x.take().unwrap(), y.take().unwrap());
                // The roots themselves are the RPs, not paths of them.
                // A file system whose every chunk is the same in both RPs: nothing below it
                // differs, nothing of it is read.
                let same = p.attr.kind == Kind::Dir
                    && a.subtree_key(p.ino)
                        .is_some_and(|k| b.subtree_key(q.ino).as_ref() == Some(&k));
                if same {
                    wa.skip_entries();
                    wb.skip_entries();
                    stats.same_subtrees += 1;
                }
                let compare = if p.depth == 0 || same {
                    Ok(Vec::new())
                } else {
                    stats.compared += 1;
                    differences(a, b, &p, &q, &mut stats)
                };
                match compare {
                    Ok(what) if what.is_empty() => {
                        if p.depth > 0 {
                            unchanged(&q)
                        }
                    }
                    Ok(what) => {
                        stats.changed += 1;
                        report(&q, Change::Changed(what), Some(&p))?;
                    }
                    Err(error) => skipped(Skipped {
                        path: q.path.clone(),
                        error,
                    }),
                }
                x = next(&mut wa, skipped);
                y = next(&mut wb, skipped);
            }
        }
    }
}

/// What differs between `p` of `a` and `q` of `b` (the same path).
fn differences(
    a: &Arc<dyn FileSystem>,
    b: &Arc<dyn FileSystem>,
    p: &Item,
    q: &Item,
    stats: &mut DiffStats,
) -> io::Result<Vec<&'static str>> {
    let (s, t) = (&p.attr, &q.attr);
    if s.kind != t.kind {
        return Ok(vec!["type"]);
    }
    let mut what = Vec::new();
    match s.kind {
        Kind::File if !same_content(a, b, p.ino, q.ino, stats)? => what.push("content"),
        Kind::Symlink if a.read_link(p.ino)? != b.read_link(q.ino)? => what.push("target"),
        Kind::CharDevice | Kind::BlockDevice if s.rdev != t.rdev => what.push("device"),
        _ => {}
    }
    if s.perm != t.perm {
        what.push("mode");
    }
    if (s.uid, s.gid) != (t.uid, t.gid) {
        what.push("owner");
    }
    if s.mtime != t.mtime {
        what.push("mtime");
    }
    let sorted = |mut x: Xattrs| {
        x.sort();
        x
    };
    if sorted(a.xattrs(p.ino)?) != sorted(b.xattrs(q.ino)?) {
        what.push("xattrs");
    }
    Ok(what)
}

fn same_content(
    a: &Arc<dyn FileSystem>,
    b: &Arc<dyn FileSystem>,
    x: u64,
    y: u64,
    stats: &mut DiffStats,
) -> io::Result<bool> {
    let (f, g) = (a.clone().open(x)?, b.clone().open(y)?);
    if f.size() != g.size() {
        return Ok(false);
    }
    if let (Some(k), Some(l)) = (f.content_key(), g.content_key()) {
        if k == l {
            stats.same_by_key += 1;
            return Ok(true);
        }
    }
    // Piece by piece: a piece whose keys match (the chunks under it are the same) is not read,
    // so a file that changed in one place costs that place.
    let (mut u, mut v) = (Vec::new(), Vec::new());
    let mut at = 0;
    while at < f.size() {
        let n = (f.size() - at).min(1 << 20) as usize;
        let same = f
            .range_key(at, n as u64)
            .is_some_and(|k| g.range_key(at, n as u64) == Some(k));
        if same {
            at += n as u64;
            continue;
        }
        u.clear();
        v.clear();
        f.read_append(at, n, &mut u)?;
        g.read_append(at, n, &mut v)?;
        stats.bytes_read += 2 * n as u64;
        if u != v {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// The entries of `fs` under `includes` (paths inside the RP; everything when empty) as a file
/// restore takes them (`agent::file_restore::restore_entries`): each include's ancestors, then
/// the include and everything below it in walk order, paths relative to the RP's root. A file
/// with more than one link names its first path as `hardlink`; the entry's `inode` is the
/// file system's inode, for reading the data. Includes inside other includes are dropped.
pub fn restore_entries<'a>(
    fs: &'a Arc<dyn FileSystem>,
    includes: &[Vec<u8>],
) -> RestoreEntries<'a> {
    let mut inc: Vec<Vec<u8>> = includes
        .iter()
        .map(|p| {
            p.split(|&b| b == b'/')
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
                .join(&b'/')
        })
        .collect();
    if inc.is_empty() || inc.iter().any(|p| p.is_empty()) {
        inc = vec![Vec::new()];
    }
    inc.sort_by(|a, b| path_order(a, b));
    inc.dedup();
    let under = |p: &[u8], q: &[u8]| p.len() > q.len() && p.starts_with(q) && p[q.len()] == b'/';
    let kept: Vec<Vec<u8>> = inc
        .iter()
        .filter(|p| !inc.iter().any(|q| !q.is_empty() && under(p, q)))
        .cloned()
        .collect();
    RestoreEntries {
        fs,
        includes: kept.into_iter().rev().collect(),
        queue: Vec::new(),
        walker: None,
        links: std::collections::HashMap::new(),
        emitted_dirs: HashSet::new(),
    }
}

/// See [`restore_entries`].
pub struct RestoreEntries<'a> {
    fs: &'a Arc<dyn FileSystem>,
    /// Includes not started yet, the next last.
    includes: Vec<Vec<u8>>,
    /// Ancestors of the current include still to emit, the next last.
    queue: Vec<(Vec<u8>, u64)>,
    /// The current include's walk, and its path.
    walker: Option<(Walker<'a>, Vec<u8>)>,
    /// First path of each multiply-linked file.
    links: std::collections::HashMap<u64, Vec<u8>>,
    /// Ancestor directories already emitted (for several includes under one directory).
    emitted_dirs: HashSet<Vec<u8>>,
}

fn nanos(t: SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

impl RestoreEntries<'_> {
    fn entry(&mut self, path: Vec<u8>, ino: u64, a: &Attr) -> io::Result<scalez::tree::Entry> {
        use scalez::tree::{Entry as TreeEntry, EntryKind};
        let kind = match a.kind {
            Kind::File => EntryKind::File,
            Kind::Dir => EntryKind::Dir,
            Kind::Symlink => EntryKind::Symlink,
            Kind::CharDevice => EntryKind::CharDev,
            Kind::BlockDevice => EntryKind::BlockDev,
            Kind::Fifo => EntryKind::Fifo,
            Kind::Socket => EntryKind::Socket,
        };
        let mut e = TreeEntry::new(path, kind);
        e.mode = a.perm as u32;
        (e.uid, e.gid) = (a.uid, a.gid);
        e.mtime_ns = nanos(a.mtime);
        e.ctime_ns = nanos(a.ctime);
        e.inode = ino;
        e.nlink = a.nlink;
        e.rdev = a.rdev as u64;
        e.xattrs = self.fs.xattrs(ino)?;
        match a.kind {
            Kind::File => {
                e.size = a.size;
                if a.nlink > 1 {
                    match self.links.get(&ino) {
                        Some(first) => e.hardlink = first.clone(),
                        None => {
                            self.links.insert(ino, e.path.clone());
                        }
                    }
                }
            }
            Kind::Symlink => e.target = self.fs.read_link(ino)?,
            _ => {}
        }
        Ok(e)
    }

    /// Starts the next include: queues its ancestors, opens its walk.
    fn start(&mut self, include: Vec<u8>) -> io::Result<()> {
        let fs = self.fs.as_ref();
        let mut ino = fs.root();
        let mut path = Vec::new();
        let mut ancestors = Vec::new();
        let parts: Vec<&[u8]> = include
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                ancestors.push((path.clone(), ino));
                path.push(b'/');
            } else if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(part);
            ino = resolve(fs, &path)?;
        }
        for (p, i) in ancestors.into_iter().rev() {
            if !self.emitted_dirs.contains(&p) {
                self.queue.push((p, i));
            }
        }
        self.walker = Some((Walker::new(fs, ino, true), include));
        Ok(())
    }
}

impl Iterator for RestoreEntries<'_> {
    type Item = io::Result<scalez::tree::Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((path, ino)) = self.queue.pop() {
                self.emitted_dirs.insert(path.clone());
                let r = self.fs.attr(ino).and_then(|a| self.entry(path, ino, &a));
                return Some(r);
            }
            if let Some((walker, base)) = &mut self.walker {
                match walker.next() {
                    Some(Ok(item)) => {
                        let mut path = base.clone();
                        if !item.path.is_empty() {
                            if !path.is_empty() {
                                path.push(b'/');
                            }
                            path.extend_from_slice(&item.path);
                        }
                        if path.is_empty() {
                            continue; // The RP's root itself is the target.
                        }
                        return Some(self.entry(path, item.ino, &item.attr));
                    }
                    Some(Err(s)) => {
                        let shown = String::from_utf8_lossy(&s.path).into_owned();
                        return Some(Err(io::Error::new(
                            s.error.kind(),
                            format!("{shown}: {}", s.error),
                        )));
                    }
                    None => self.walker = None,
                }
                continue;
            }
            let include = self.includes.pop()?;
            if let Err(e) = self.start(include) {
                return Some(Err(e));
            }
        }
    }
}
