//! File-tree backups: walk, read changed files in parallel, store a tree ([`scalez::tree`]).
//!
//! Backup:
//! Steps 1-3 overlap: the walk runs on its own thread and reading starts with the first file.
//!
//! 1. **Walk** each source (never following symlinks; `--exclude` globs, `--one-file-system`),
//!    recording metadata, xattrs, user and group names. The ancestors of each source are
//!    recorded too, so a restore recreates `usr/share/...` under the target. Only the
//!    directory holding a source is opened by path; everything under it is reached by
//!    `openat(O_PATH | O_NOFOLLOW)` from its directory's handle and stat'ed, listed and read
//!    for xattrs through that handle, so a directory another user swaps for a symlink
//!    mid-walk cannot lead the walk elsewhere (say, into /etc).
//! 2. **Match** against the parent RP of the same asset (same sources, same host): a regular file
//!    with the same size, mtime, ctime and inode keeps its chunk list and is not read again.
//! 3. **Read** the other regular files on N threads: data regions found with SEEK_DATA/SEEK_HOLE
//!    (holes are recorded, not stored), FastCDC chunks ([`MIN_CHUNK`], [`AVG_CHUNK`],
//!    [`MAX_CHUNK`]; a file under the minimum chunk size is one chunk), hashed, compressed
//!    and sealed on the same thread. Readers open each file beneath its source's directory
//!    with no symlink allowed on the way (`openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`):
//!    a file replaced by rename since the walk is stored flagged changed, a path that now
//!    leads through a symlink stores nothing. The file is fstat'ed after reading: if its size, mtime or
//!    ctime moved, it is read again (up to 3 times) and then recorded with
//!    [`scalez::tree::FLAG_CHANGED`] and reported.
//! 4. **Commit**: the tree stream, then the catalog entry.
//!
//! Memory: the walk keeps one [`Entry`] per path (about 150 bytes plus names and chunk lists), so
//! a tree of a million files needs a few hundred MB; file data is bounded by the worker count
//! times the largest chunk.
//!
//! Restore is in [`crate::file_restore`].

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use scalez::tree::{self, Entry, EntryKind, FLAG_CHANGED, FLAG_SPARSE, FLAG_UNREADABLE};
use scalez::{
    Asset, BackupSession, ChunkId, RecoveryPoint, RpBody, RpDraft, RpFigures, RpKind, SessionStats,
    TreeRef, Vault,
};

use crate::error::AgentError;
use crate::fsx;
use crate::progress::{Cancel, Progress};

/// File chunking: 128 KiB / 512 KiB / 2 MiB (min / average / max). Half the stream sizes: a
/// 1-byte insert at the start of a 100 MiB file then rewrites one chunk (~0.6 % new data,
/// `tests/tests/file.rs`), where 1 MiB chunks cost ~1.9 %; the per-chunk overhead (44 index
/// bytes, one AEAD tag) stays small. Files up to the minimum are one chunk.
pub const MIN_CHUNK: u32 = 128 * 1024;
pub const AVG_CHUNK: u32 = 512 * 1024;
pub const MAX_CHUNK: u32 = 2 * 1024 * 1024;

/// Internal mark (never stored: such entries are dropped before the tree is written) of a file
/// deleted between the walk and its read.
const VANISHED: u8 = 0x80;

/// Directory levels the walk descends below a source; deeper ones are reported, not walked.
/// The walk holds a descriptor per level ([`fsx::raise_fd_limit`] makes room).
const MAX_WALK_DEPTH: usize = 1024;

/// Reads of a file that keeps changing before it is recorded as [`FLAG_CHANGED`].
const READ_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone)]
pub struct FileBackupOptions {
    pub tags: BTreeMap<String, String>,
    /// Glob patterns: with a `/` matched against the absolute path, without one against each
    /// name. A matching directory is skipped with everything below it.
    pub excludes: Vec<String>,
    /// Do not descend into directories on another file system than their source.
    pub one_file_system: bool,
    /// Reader threads (reading, hashing, compressing, sealing).
    pub workers: usize,
    pub cancel: Cancel,
}

impl Default for FileBackupOptions {
    fn default() -> Self {
        FileBackupOptions {
            tags: BTreeMap::new(),
            excludes: Vec::new(),
            one_file_system: false,
            workers: default_file_workers(),
            cancel: Cancel::new(),
        }
    }
}

/// Twice the cores: small files make reading latency-bound, not CPU-bound.
pub fn default_file_workers() -> usize {
    crate::pipeline::default_workers() * 2
}

#[derive(Debug, Clone)]
pub struct FileBackupReport {
    pub rp: RecoveryPoint,
    pub session: SessionStats,
    pub elapsed: Duration,
    pub entries: u64,
    pub files: u64,
    /// Regular files read this time.
    pub files_read: u64,
    /// Regular files whose chunks came from the parent RP.
    pub files_unchanged: u64,
    pub bytes_read: u64,
    /// Paths that changed on every read attempt (stored as last read, flagged).
    pub changed: Vec<String>,
    /// Paths that could not be read or listed (recorded without data or children).
    pub unreadable: Vec<String>,
}

/// The asset of a file backup: its sources, on this host.
pub fn file_asset(sources: &[PathBuf]) -> Asset {
    Asset {
        name: sources
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(","),
        host: crate::pipeline::hostname(),
    }
}

/// Absolute, normalised (no `.`, `..` resolved lexically, no trailing `/`), symlinks kept.
pub fn absolute_source(p: &Path) -> Result<PathBuf, AgentError> {
    let abs = std::path::absolute(p).map_err(|e| AgentError::Source {
        path: p.into(),
        source: e,
    })?;
    let mut out = PathBuf::from("/");
    for c in abs.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    Ok(out)
}

fn rel_bytes(abs: &Path) -> Vec<u8> {
    abs.as_os_str().as_bytes()[1..].to_vec()
}

struct Excludes {
    full: globset::GlobSet,
    names: globset::GlobSet,
}

impl Excludes {
    fn new(patterns: &[String]) -> Result<Self, AgentError> {
        let mut full = globset::GlobSetBuilder::new();
        let mut names = globset::GlobSetBuilder::new();
        for p in patterns {
            let g = globset::GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(|e| AgentError::Source {
                    path: p.into(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("bad --exclude pattern: {e}"),
                    ),
                })?;
            if p.contains('/') {
                full.add(g);
            } else {
                names.add(g);
            }
        }
        let build = |b: globset::GlobSetBuilder| {
            b.build().map_err(|e| AgentError::Source {
                path: "--exclude".into(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
            })
        };
        Ok(Excludes {
            full: build(full)?,
            names: build(names)?,
        })
    }

    fn excluded(&self, abs: &Path) -> bool {
        self.full.is_match(abs) || abs.file_name().is_some_and(|n| self.names.is_match(n))
    }
}

fn entry_from(rel: Vec<u8>, md: &std::fs::Metadata, names: &mut fsx::Names) -> Option<Entry> {
    let ft = md.file_type();
    use std::os::unix::fs::FileTypeExt;
    let kind = if ft.is_file() {
        EntryKind::File
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_char_device() {
        EntryKind::CharDev
    } else if ft.is_block_device() {
        EntryKind::BlockDev
    } else if ft.is_fifo() {
        EntryKind::Fifo
    } else if ft.is_socket() {
        EntryKind::Socket
    } else {
        return None;
    };
    let mut e = Entry::new(rel, kind);
    e.mode = md.mode() & 0o7777;
    e.uid = md.uid();
    e.gid = md.gid();
    e.user = names.user(e.uid);
    e.group = names.group(e.gid);
    e.mtime_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
    e.ctime_ns = md.ctime() * 1_000_000_000 + md.ctime_nsec();
    e.size = if kind == EntryKind::File || kind == EntryKind::Symlink {
        md.size()
    } else {
        0
    };
    e.inode = md.ino();
    e.dev = md.dev();
    e.nlink = md.nlink() as u32;
    e.rdev = md.rdev();
    Some(e)
}

/// A walked path: its entry, where it is, and the allocated blocks (for hole detection).
struct Walked {
    entry: Entry,
    abs: PathBuf,
    blocks: u64,
    /// The directory its source was walked from: readers open `abs` beneath it.
    anchor: Arc<Anchor>,
}

/// The directory holding a source (the source itself for `/`), opened once when the backup
/// starts. The walk reaches everything under it by `openat` from handle to handle and readers
/// open files beneath it with no symlink allowed on the way, so nothing is found through a
/// path that another user re-pointed after the walk started (a directory swapped for a
/// symlink to /etc stores nothing of /etc).
struct Anchor {
    dir: std::fs::File,
    path: PathBuf,
}

impl Anchor {
    /// `abs` relative to the anchor (`abs` is under it: the walk made it from the anchor).
    fn rel<'p>(&self, abs: &'p Path) -> &'p [u8] {
        let rel = abs.strip_prefix(&self.path).unwrap_or(abs);
        rel.as_os_str().as_bytes()
    }
}

struct Walker<'a> {
    excludes: Excludes,
    one_fs: bool,
    names: fsx::Names,
    out: crossbeam_channel::Sender<Walked>,
    count: usize,
    unreadable: Vec<String>,
    next_message: usize,
    cancel: &'a Cancel,
    progress: &'a dyn Progress,
}

impl Walker<'_> {
    /// Records `abs`, whose `O_PATH` handle is `node` and metadata `md` (from the handle).
    fn add(
        &mut self,
        anchor: &Arc<Anchor>,
        abs: &Path,
        node: &std::fs::File,
        md: &std::fs::Metadata,
    ) -> Option<()> {
        let mut e = entry_from(rel_bytes(abs), md, &mut self.names)?;
        if e.kind == EntryKind::Symlink {
            match fsx::read_link(node) {
                Ok(t) => e.target = t,
                Err(err) => {
                    self.unreadable.push(format!("{}: {err}", abs.display()));
                }
            }
        }
        match fsx::list_xattrs(node) {
            Ok(x) => e.xattrs = x,
            Err(err) => self
                .unreadable
                .push(format!("{} (extended attributes): {err}", abs.display())),
        }
        self.count += 1;
        // The receiver stops only on an error of its own, which it reports.
        self.out
            .send(Walked {
                entry: e,
                abs: abs.to_path_buf(),
                blocks: md.blocks(),
                anchor: anchor.clone(),
            })
            .ok()
    }

    /// Records `abs` and, for a directory, everything under it: each child is opened from
    /// its directory's handle without following symlinks, and stat'ed through that handle.
    fn walk(
        &mut self,
        anchor: &Arc<Anchor>,
        abs: &Path,
        node: std::fs::File,
        md: &std::fs::Metadata,
        root_dev: u64,
        depth: usize,
    ) -> Result<(), AgentError> {
        if self.cancel.is_cancelled() {
            return Err(AgentError::Cancelled);
        }
        if self.add(anchor, abs, &node, md).is_none() || !md.is_dir() {
            return Ok(());
        }
        if self.one_fs && md.dev() != root_dev {
            return Ok(());
        }
        if depth >= MAX_WALK_DEPTH {
            // Each level holds a descriptor and a stack frame: a tree any user can make a
            // million levels deep must not exhaust either.
            self.unreadable.push(format!(
                "{}: deeper than {MAX_WALK_DEPTH} levels below its source; not descended into",
                abs.display()
            ));
            return Ok(());
        }
        self.walk_children(anchor, abs, &node, root_dev, depth + 1)
    }

    fn walk_children(
        &mut self,
        anchor: &Arc<Anchor>,
        abs: &Path,
        dir: &std::fs::File,
        root_dev: u64,
        depth: usize,
    ) -> Result<(), AgentError> {
        race_window(RaceWindow::BeforeList, abs);
        let mut names = match fsx::list_dir(dir) {
            Ok(names) => names,
            Err(err) => {
                self.unreadable.push(format!("{}: {err}", abs.display()));
                return Ok(());
            }
        };
        names.sort();
        for name in names {
            let child = abs.join(std::ffi::OsStr::from_bytes(&name));
            if self.excludes.excluded(&child) {
                continue;
            }
            match fsx::open_path_at(dir.as_raw_fd(), &name).and_then(|h| Ok((h.metadata()?, h))) {
                Ok((cmd, handle)) => self.walk(anchor, &child, handle, &cmd, root_dev, depth)?,
                // Vanished since the listing.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => self.unreadable.push(format!("{}: {err}", child.display())),
            }
        }
        if self.out.len() >= self.next_message {
            self.next_message += 20_000;
            self.progress
                .message(&format!("scanned {} paths", self.out.len()));
        }
        Ok(())
    }
}

/// Walks every source (sorted, so the walk is in tree order), with its ancestors first.
fn walk_sources(walker: &mut Walker<'_>, sources: &[PathBuf]) -> Result<(), AgentError> {
    let mut sorted: Vec<&PathBuf> = sources.iter().collect();
    sorted.sort_by(|a, b| tree_order(&rel_bytes(a), &rel_bytes(b)));
    for src in sorted {
        let source_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AgentError::Source { path, source }
        };
        // The source's directory, resolved from `/` through no symlink another user could
        // change; everything below is reached from its handle. Its ancestors are recorded as
        // the directories they resolve to, so the tree has directories all the way down.
        let anchor_path = src.parent().unwrap_or(Path::new("/"));
        let mut handles = fsx::open_dir_trusted(anchor_path).map_err(source_error(src))?;
        let anchor = Arc::new(Anchor {
            dir: handles.pop().expect("/ at least"),
            path: anchor_path.to_path_buf(),
        });
        let mut ancestors: Vec<&Path> = src.ancestors().skip(1).collect();
        ancestors.reverse();
        let ancestors = ancestors.into_iter().filter(|a| *a != Path::new("/"));
        for (a, handle) in ancestors.zip(handles.iter().skip(1).chain([&anchor.dir])) {
            let amd = handle.metadata().map_err(source_error(a))?;
            walker.add(&anchor, a, handle, &amd);
        }
        if src == Path::new("/") {
            // The root itself has no name in a tree: record its children.
            let md = anchor.dir.metadata().map_err(source_error(src))?;
            walker.walk_children(&anchor, src, &anchor.dir, md.dev(), 0)?;
        } else {
            let name = src.file_name().map_or(&[][..], |n| n.as_bytes());
            let handle =
                fsx::open_path_at(anchor.dir.as_raw_fd(), name).map_err(source_error(src))?;
            let md = handle.metadata().map_err(source_error(src))?;
            walker.walk(&anchor, src, handle, &md, md.dev(), 0)?;
        }
    }
    Ok(())
}

/// Pre-order comparison of relative paths: component by component.
fn tree_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.split(|&c| c == b'/').cmp(b.split(|&c| c == b'/'))
}

/// A file for a reader, as the walk found it.
struct ReadJob {
    /// Its place in the walk.
    index: usize,
    /// Its source's directory: the file is opened beneath it.
    anchor: Arc<Anchor>,
    abs: PathBuf,
    /// (size, mtime, ctime) at the walk.
    expect: (u64, i64, i64),
    /// Allocated 512-byte blocks (fewer than the size: look for holes).
    blocks: u64,
    /// (st_dev, st_ino) at the walk.
    identity: (u64, u64),
    /// (uid, gid, mode) at the walk.
    owner: (u32, u32, u32),
}

/// What a reader thread made of one file.
struct ReadResult {
    index: usize,
    /// Outer error: the vault failed (stops the backup); inner: the file could not be read.
    outcome: Result<Result<ReadFile, std::io::Error>, scalez::Error>,
}

struct ReadFile {
    chunks: Vec<(ChunkId, u32)>,
    /// Some when the file has holes.
    extents: Option<Vec<(u64, u64)>>,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    changed: bool,
    bytes_read: u64,
    /// The xattrs of what was read, when it changed since the walk (the walk's may be another
    /// file's, or gone).
    xattrs: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// Reads the data regions of `file` in order as one stream.
struct RegionReader<'f> {
    file: &'f std::fs::File,
    regions: std::vec::IntoIter<(u64, u64)>,
    current: Option<(u64, u64)>,
}

impl Read for RegionReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let (pos, left) = match self.current {
                Some((_, 0)) | None => match self.regions.next() {
                    Some(r) => {
                        self.current = Some(r);
                        continue;
                    }
                    None => return Ok(0),
                },
                Some(c) => c,
            };
            let n = buf.len().min(left as usize);
            let got = self.file.read_at(&mut buf[..n], pos)?;
            if got == 0 {
                // Shrank while read: the fstat afterwards reports it.
                self.current = None;
                self.regions = Vec::new().into_iter();
                return Ok(0);
            }
            self.current = Some((pos + got as u64, left - got as u64));
            return Ok(got);
        }
    }
}

fn stat_times(md: &std::fs::Metadata) -> (u64, i64, i64) {
    (
        md.size(),
        md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        md.ctime() * 1_000_000_000 + md.ctime_nsec(),
    )
}

/// The windows a race test can act in (see [`set_race_hook`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RaceWindow {
    /// The walk opened a directory and is about to list it (its path is passed).
    BeforeList,
    /// A reader is about to open a file the walk found (its path is passed).
    BeforeRead,
}

type RaceHook = Box<dyn Fn(RaceWindow, &Path) + Send + Sync>;
static RACE_HOOK: std::sync::OnceLock<RaceHook> = std::sync::OnceLock::new();

/// For race tests only: runs `hook` inside the windows of [`RaceWindow`], where another user
/// could swap paths. Process-wide, set once.
#[doc(hidden)]
pub fn set_race_hook(hook: RaceHook) {
    let _ = RACE_HOOK.set(hook);
}

fn race_window(w: RaceWindow, path: &Path) {
    if let Some(hook) = RACE_HOOK.get() {
        hook(w, path);
    }
}

/// Reads the file the walk found, opened beneath its source's directory.
fn read_file(
    session: &BackupSession,
    job: &ReadJob,
    progress: &dyn Progress,
) -> Result<std::io::Result<ReadFile>, scalez::Error> {
    race_window(RaceWindow::BeforeRead, &job.abs);
    let vault_error = std::cell::RefCell::new(None);
    let r = read_file_inner(session, job, progress, &vault_error);
    match vault_error.into_inner() {
        Some(e) => Err(e),
        None => Ok(r),
    }
}

fn read_file_inner(
    session: &BackupSession,
    job: &ReadJob,
    progress: &dyn Progress,
    vault_error: &std::cell::RefCell<Option<scalez::Error>>,
) -> std::io::Result<ReadFile> {
    let keys = session.vault().keys();
    let store = |data: &[u8]| -> std::io::Result<(ChunkId, u32)> {
        let id = keys.chunk_id(data);
        if let Err(e) = session.store_chunk(id, data) {
            *vault_error.borrow_mut() = Some(e);
            return Err(std::io::Error::other("vault failure"));
        }
        Ok((id, data.len() as u32))
    };
    let mut expect = job.expect;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (file, md) = open_walked(job, &mut expect)?;
        let before = stat_times(&md);
        let size = before.0;
        let extents = if job.blocks * 512 < size {
            fsx::data_regions(&file, size).filter(|r| r.len() != 1 || r[0] != (0, size))
        } else {
            None
        };
        let regions = extents.clone().unwrap_or_else(|| {
            if size > 0 {
                vec![(0, size)]
            } else {
                Vec::new()
            }
        });
        let data_len: u64 = regions.iter().map(|r| r.1).sum();
        let (chunks, bytes_read) = chunk_regions(&file, regions, &store, progress)?;
        let after = stat_times(&file.metadata()?);
        let stored: u64 = chunks.iter().map(|c| c.1 as u64).sum();
        let stable = after == before && before == expect && stored == data_len;
        if stable || attempt >= READ_ATTEMPTS {
            // A torn read is recorded with what was read, as regions that match it.
            let (extents, size) = if stored == data_len {
                (extents, size)
            } else {
                (None, stored)
            };
            // Changed since the walk: its xattrs as they are now (never the walk's of another
            // file: a restore would put them, capabilities included, on this content).
            let xattrs = if stable {
                None
            } else {
                Some(fsx::list_xattrs(&file)?)
            };
            return Ok(ReadFile {
                chunks,
                extents,
                size,
                mtime_ns: before.1,
                ctime_ns: before.2,
                changed: !stable,
                bytes_read,
                xattrs,
            });
        }
        expect = after;
    }
}

/// Opens the file the walk found at `job`'s place for reading, with its metadata. No symlink
/// on the way and never above the source: a directory swapped for a symlink since the walk
/// fails here (ELOOP) rather than leading to another file. Nothing is opened before its type
/// is known (a device node renamed into place is not touched). Another inode there resets
/// `expect` so the read is never taken as stable.
fn open_walked(
    job: &ReadJob,
    expect: &mut (u64, i64, i64),
) -> std::io::Result<(std::fs::File, std::fs::Metadata)> {
    let anchor = &job.anchor;
    let handle =
        fsx::open_path_beneath(anchor.dir.as_raw_fd(), anchor.rel(&job.abs)).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                std::io::Error::other(format!(
                    "its path leads through a symlink since the walk ({e}); recorded without data"
                ))
            } else {
                e
            }
        })?;
    let md = handle.metadata()?;
    if !md.is_file() {
        return Err(std::io::Error::other(
            "replaced between the walk and the read by something not a regular file",
        ));
    }
    if (md.dev(), md.ino()) != job.identity {
        // Another inode at the walked place, replaced by rename (how editors and package
        // managers save): its content is the file's now, stored and flagged changed, if it
        // has the owner and mode the walk recorded (a restore applies those). Another owner's
        // file renamed into place (one the user could not read, or a hard link to
        // /etc/shadow) is not stored under them.
        if (md.uid(), md.gid(), md.mode() & 0o7777) != job.owner {
            return Err(std::io::Error::other(
                "replaced between the walk and the read by a file of another owner or mode; \
                 recorded without data",
            ));
        }
        *expect = (u64::MAX, 0, 0); // never "stable"
    }
    Ok((fsx::reopen_read(&handle)?, md))
}

/// Stores one chunk, returning its id and length.
type StoreChunk<'a> = dyn Fn(&[u8]) -> std::io::Result<(ChunkId, u32)> + 'a;

/// Cuts the data `regions` of `file` into content-defined chunks (one chunk for small files)
/// and stores each; returns (chunks, bytes read).
fn chunk_regions(
    file: &std::fs::File,
    regions: Vec<(u64, u64)>,
    store: &StoreChunk,
    progress: &dyn Progress,
) -> std::io::Result<(Vec<(ChunkId, u32)>, u64)> {
    let data_len: u64 = regions.iter().map(|r| r.1).sum();
    let mut chunks = Vec::new();
    let mut bytes_read = 0u64;
    let mut reader = RegionReader {
        file,
        regions: regions.into_iter(),
        current: None,
    };
    if data_len <= MIN_CHUNK as u64 {
        let mut buf = Vec::with_capacity(data_len as usize);
        reader.read_to_end(&mut buf)?;
        if !buf.is_empty() {
            chunks.push(store(&buf)?);
        }
        bytes_read += buf.len() as u64;
        progress.advance(buf.len() as u64);
    } else {
        for c in fastcdc::v2020::StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
            let c = c.map_err(|e| match e {
                fastcdc::v2020::Error::IoError(e) => e,
                other => std::io::Error::other(other.to_string()),
            })?;
            chunks.push(store(&c.data)?);
            bytes_read += c.length as u64;
            progress.advance(c.length as u64);
        }
    }
    Ok((chunks, bytes_read))
}

/// Backs up `sources` (files or directories) as one file RP.
pub fn backup_files(
    vault: &Arc<Vault>,
    sources: &[PathBuf],
    opts: &FileBackupOptions,
    progress: &dyn Progress,
) -> Result<FileBackupReport, AgentError> {
    let started = Instant::now();
    if sources.is_empty() {
        return Err(AgentError::Source {
            path: "".into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no paths to back up"),
        });
    }
    let sources: Vec<PathBuf> = sources
        .iter()
        .map(|p| absolute_source(p))
        .collect::<Result<_, _>>()?;
    let asset = file_asset(&sources);
    // Room for a descriptor per walked level beside the readers' and the vault's.
    fsx::raise_fd_limit(MAX_WALK_DEPTH as u64 + 4096);

    let session = BackupSession::new(vault.clone())?;
    let parent_rp = vault.latest_rp(RpKind::File, &asset)?;
    let draft = RpDraft::new(
        asset,
        parent_rp.as_ref().map(|rp| rp.id.clone()),
        opts.tags.clone(),
    );
    let parent_files = parent_files(vault, parent_rp.as_ref(), progress)?;
    let mut matched = Matched {
        parent_files,
        walked: Vec::new(),
        files: 0,
        files_unchanged: 0,
        files_read: 0,
        linked: HashMap::new(),
    };
    let scoped = walk_and_read(&session, &sources, opts, progress, &mut matched);
    let (mut unreadable, results) = match scoped {
        Ok(r) => r,
        Err(e) => return Err(crate::pipeline::session_cause(e, session.abandon())),
    };
    let mut outcomes = Vec::with_capacity(results.len());
    for r in results {
        match r.outcome {
            Ok(o) => outcomes.push((r.index, o)),
            Err(e) => {
                return Err(crate::pipeline::session_cause(
                    AgentError::Vault(e),
                    session.abandon(),
                ))
            }
        }
    }
    let Matched {
        mut walked,
        files,
        files_unchanged,
        files_read,
        linked,
        ..
    } = matched;
    let (changed, bytes_read) = record_reads(&mut walked, outcomes, &mut unreadable);
    walked.retain(|w| w.entry.flags & VANISHED == 0);
    let mut entries: Vec<Entry> = walked.into_iter().map(|w| w.entry).collect();
    entries.sort_by(|a, b| tree_order(&a.path, &b.path));
    // The data of each hard-linked inode is with the path that was read (or reused).
    share_hard_link_data(&mut entries, &linked);

    // 4. Commit.
    let tree_stream = match tree::store_tree(&session, &entries) {
        Ok(t) => t,
        Err(e) => {
            return Err(crate::pipeline::session_cause(
                AgentError::Vault(e),
                session.abandon(),
            ))
        }
    };
    let mut session = session;
    let stats = session.finish()?;
    let dirs = entries.iter().filter(|e| e.kind == EntryKind::Dir).count() as u64;
    let file_bytes: u64 = entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| e.size)
        .sum();
    let rp = draft.finish(
        RpBody::Tree(TreeRef {
            stream: tree_stream,
            sources: sources.iter().map(|s| s.display().to_string()).collect(),
            entries: entries.len() as u64,
            files,
            dirs,
            file_bytes,
        }),
        RpFigures::stored(file_bytes, bytes_read, &stats),
    );
    session.commit(&rp)?;
    Ok(FileBackupReport {
        rp,
        session: stats,
        elapsed: started.elapsed(),
        entries: entries.len() as u64,
        files,
        files_read,
        files_unchanged,
        bytes_read,
        changed,
        unreadable,
    })
}

/// The parent RP's regular files by path (those read cleanly), matched while walking.
fn parent_files(
    vault: &Arc<Vault>,
    parent: Option<&RecoveryPoint>,
    progress: &dyn Progress,
) -> Result<HashMap<Vec<u8>, Entry>, AgentError> {
    let mut files = HashMap::new();
    let Some((rp, t)) = parent.and_then(|rp| Some((rp, rp.tree.as_ref()?))) else {
        return Ok(files);
    };
    progress.message("loading the parent RP's tree");
    for e in tree::TreeReader::open(vault, &t.stream, &rp.id.to_string())? {
        let e = e?;
        if e.kind == EntryKind::File && e.flags & (FLAG_CHANGED | FLAG_UNREADABLE) == 0 {
            files.insert(e.path.clone(), e);
        }
    }
    Ok(files)
}

/// What the walk found, matched against the parent RP.
struct Matched {
    /// Files of the parent RP not met yet.
    parent_files: HashMap<Vec<u8>, Entry>,
    walked: Vec<Walked>,
    files: u64,
    files_unchanged: u64,
    files_read: u64,
    /// The walk index of the path each hard-linked inode is read (or reused) through.
    linked: HashMap<(u64, u64), usize>,
}

impl Matched {
    /// Records `w`; a regular file unchanged since the parent RP takes its chunks (each still
    /// usable in the vault), any other one is returned to be read.
    fn add(&mut self, w: Walked, session: &BackupSession) -> Option<ReadJob> {
        let i = self.walked.len();
        self.walked.push(w);
        let w = &mut self.walked[i];
        let e = &mut w.entry;
        if e.kind != EntryKind::File {
            return None;
        }
        self.files += 1;
        if e.nlink > 1 {
            // Other paths of an inode already seen take its data after reading.
            if self.linked.contains_key(&(e.dev, e.inode)) {
                return None;
            }
            self.linked.insert((e.dev, e.inode), i);
        }
        let reused = self.parent_files.remove(&e.path).filter(|p| {
            p.size == e.size
                && p.mtime_ns == e.mtime_ns
                && p.ctime_ns == e.ctime_ns
                && p.inode == e.inode
                && p.chunks
                    .iter()
                    .all(|(id, _)| session.note_reference(id).is_ok())
        });
        if let Some(p) = reused {
            e.chunks = p.chunks;
            e.extents = p.extents;
            e.flags |= p.flags & FLAG_SPARSE;
            self.files_unchanged += 1;
            return None;
        }
        self.files_read += 1;
        Some(ReadJob {
            index: i,
            anchor: w.anchor.clone(),
            abs: w.abs.clone(),
            expect: (e.size, e.mtime_ns, e.ctime_ns),
            blocks: w.blocks,
            identity: (e.dev, e.inode),
            owner: (e.uid, e.gid, e.mode),
        })
    }
}

/// Walks (one thread), matches against the parent (this thread) and reads changed files
/// (`workers` threads) all at once: reading starts with the first file found. Returns the paths
/// the walk could not read and every read's result.
fn walk_and_read(
    session: &BackupSession,
    sources: &[PathBuf],
    opts: &FileBackupOptions,
    progress: &dyn Progress,
    matched: &mut Matched,
) -> Result<(Vec<String>, Vec<ReadResult>), AgentError> {
    let workers = opts.workers.max(1);
    let excludes = Excludes::new(&opts.excludes)?;
    progress.start(0);
    let (wtx, wrx) = bounded::<Walked>(4096);
    let (jtx, jrx) = bounded::<ReadJob>(workers * 4);
    // Unbounded: results are small, and this thread must never block on a full channel while
    // the readers block on it.
    let (rtx, rrx) = crossbeam_channel::unbounded::<ReadResult>();
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (jrx, rtx) = (jrx.clone(), rtx.clone());
            s.spawn(move || {
                for job in jrx {
                    let outcome = read_file(session, &job, progress);
                    let index = job.index;
                    if rtx.send(ReadResult { index, outcome }).is_err() {
                        return;
                    }
                }
            });
        }
        drop((jrx, rtx));
        let cancel = &opts.cancel;
        // Its recursion is MAX_WALK_DEPTH frames deep at most: a stack to match.
        let thread = std::thread::Builder::new()
            .name("file-walk".into())
            .stack_size(64 << 20);
        let walker = thread
            .spawn_scoped(s, move || -> Result<Vec<String>, AgentError> {
                let mut walker = Walker {
                    excludes,
                    one_fs: opts.one_file_system,
                    names: fsx::Names::default(),
                    out: wtx,
                    count: 0,
                    unreadable: Vec::new(),
                    next_message: 20_000,
                    cancel,
                    progress,
                };
                walk_sources(&mut walker, sources)?;
                Ok(walker.unreadable)
            })
            .map_err(|source| AgentError::Source {
                path: "(the walker thread)".into(),
                source,
            })?;
        let mut seen: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
        for w in wrx {
            // Overlapping sources (`/usr /usr/share`) meet the same paths twice.
            if !seen.insert(w.entry.path.clone()) {
                continue;
            }
            if let Some(job) = matched.add(w, session) {
                if jtx.send(job).is_err() {
                    break;
                }
            }
        }
        drop(jtx);
        matched.parent_files = HashMap::new();
        let unreadable = walker.join().unwrap_or(Err(AgentError::Panicked))?;
        Ok((unreadable, rrx.iter().collect()))
    })
}

/// Puts what the readers found into the walked entries: chunks, the size and times read, holes,
/// xattrs; files that changed on every attempt are flagged (and listed), vanished ones marked
/// for removal, unreadable ones flagged and listed. Returns (changed paths, bytes read).
fn record_reads(
    walked: &mut [Walked],
    outcomes: Vec<(usize, std::io::Result<ReadFile>)>,
    unreadable: &mut Vec<String>,
) -> (Vec<String>, u64) {
    let mut changed = Vec::new();
    let mut bytes_read = 0u64;
    for (index, outcome) in outcomes {
        let w = &mut walked[index];
        match outcome {
            Ok(f) => {
                let e = &mut w.entry;
                e.chunks = f.chunks;
                e.size = f.size;
                e.mtime_ns = f.mtime_ns;
                e.ctime_ns = f.ctime_ns;
                bytes_read += f.bytes_read;
                if let Some(x) = f.extents {
                    e.flags |= FLAG_SPARSE;
                    e.extents = x;
                }
                if let Some(x) = f.xattrs {
                    e.xattrs = x;
                }
                if f.changed {
                    e.flags |= FLAG_CHANGED;
                    changed.push(w.abs.display().to_string());
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                // Deleted since the walk: gone from this RP too.
                w.entry.flags |= VANISHED;
            }
            Err(err) => {
                unreadable.push(format!("{}: {err}", w.abs.display()));
                w.entry.flags |= FLAG_UNREADABLE;
                w.entry.size = 0;
            }
        }
    }
    (changed, bytes_read)
}

/// Hard links: the first path of an inode in tree order is the source of the others; every
/// path carries the data (so restoring one path alone still has it). `linked`: the inodes
/// whose data was read or reused through one of their paths.
fn share_hard_link_data(entries: &mut [Entry], linked: &HashMap<(u64, u64), usize>) {
    let mut groups: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        if e.kind == EntryKind::File && e.nlink > 1 && linked.contains_key(&(e.dev, e.inode)) {
            groups.entry((e.dev, e.inode)).or_default().push(i);
        }
    }
    for members in groups.values() {
        let Some(&with_data) = members.iter().find(|&&i| {
            !entries[i].chunks.is_empty()
                || entries[i].size == 0
                || entries[i].flags & FLAG_UNREADABLE != 0
        }) else {
            continue;
        };
        let src = entries[with_data].clone();
        let first_path = entries[members[0]].path.clone();
        for &m in members {
            let e = &mut entries[m];
            if m != with_data {
                e.chunks = src.chunks.clone();
                e.extents = src.extents.clone();
                e.flags = src.flags;
                e.size = src.size;
                e.mtime_ns = src.mtime_ns;
                e.ctime_ns = src.ctime_ns;
            }
            if m != members[0] {
                e.hardlink = first_path.clone();
            }
        }
    }
}
