//! File-tree restores into a target directory, safe against a hostile tree and a hostile target.
//!
//! * Every path is checked by the tree decoder ([`scalez::tree::path_problem`]): nothing empty,
//!   absolute, `.` or `..` gets here, whatever the vault holds.
//! * Writes are relative to directory file descriptors opened one component at a time with
//!   `O_NOFOLLOW | O_DIRECTORY` from the target down: a symlink where a parent directory should
//!   be (planted in the target, or restored from the tree itself) stops the restore with an
//!   error naming it; nothing is ever written through a symlink.
//! * Files are written to a fresh temporary name (`O_CREAT | O_EXCL | O_NOFOLLOW`), given their
//!   metadata, and renamed over their final name only when complete; a rename replaces a
//!   symlink itself, never its target. Symlinks, devices, FIFOs and directories are created with
//!   `symlinkat`, `mknodat`, `mkdirat`; metadata uses the `AT_SYMLINK_NOFOLLOW` forms.
//! * Existing paths are left alone (and reported) unless `overwrite`.
//! * Directories are created private (0700) and get their recorded mode, owner, xattrs and times
//!   last, deepest first, so restoring their contents does not change their mtime afterwards.
//!
//! Owners are restored by numeric id when running as root (names are recorded for reference).
//! File data is fetched and written by N threads while the calling thread walks the tree.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use scalez::tree::{self, Entry, EntryKind};
use scalez::{RecoveryPoint, Vault};

use crate::error::AgentError;
use crate::fsx::{self, show};
use crate::progress::{Cancel, Progress};

#[derive(Debug, Clone)]
pub struct FileRestoreOptions {
    /// Restore only these paths (and everything below them); empty: everything.
    pub includes: Vec<Vec<u8>>,
    /// Replace existing paths in the target.
    pub overwrite: bool,
    pub workers: usize,
    pub cancel: Cancel,
}

impl Default for FileRestoreOptions {
    fn default() -> Self {
        FileRestoreOptions {
            includes: Vec::new(),
            overwrite: false,
            workers: crate::file::default_file_workers(),
            cancel: Cancel::new(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct FileRestoreReport {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    /// Paths that existed in the target and were left alone (no `overwrite`).
    pub skipped: Vec<String>,
    /// Metadata that could not be applied (e.g. an owner when not root); the data is restored.
    pub warnings: Vec<String>,
    /// Paths that could not be restored (their data or the path itself).
    pub failed: Vec<String>,
    pub elapsed: Duration,
}

/// Normalises an `--include` path (`/usr/share/` → `usr/share`) and checks it.
pub fn include_path(p: &str) -> Result<Vec<u8>, AgentError> {
    let b = p.trim_matches('/').as_bytes().to_vec();
    match tree::path_problem(&b) {
        None => Ok(b),
        Some(why) => Err(AgentError::Target {
            path: p.into(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("--include path {why}"),
            ),
        }),
    }
}

fn under(path: &[u8], prefix: &[u8]) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.len() > prefix.len() && path.starts_with(prefix) && path[prefix.len()] == b'/')
}

fn selected(path: &[u8], includes: &[Vec<u8>]) -> bool {
    includes.is_empty()
        || includes
            .iter()
            .any(|inc| under(path, inc) || under(inc, path))
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn refuse(path: &[u8], at: &[u8], e: std::io::Error) -> AgentError {
    AgentError::Target {
        path: PathBuf::from(show(path)),
        source: std::io::Error::new(
            e.kind(),
            format!(
                "refusing to write through {}: it is a symlink or not a directory in the target ({e})",
                show(at)
            ),
        ),
    }
}

/// The chain of open directories from the target down to the current parent.
struct DirStack {
    stack: Vec<(Vec<u8>, Arc<OwnedFd>)>,
}

impl DirStack {
    /// Opens `parent` (relative to the target), creating missing directories (0700).
    fn enter(&mut self, parent: &[u8], for_path: &[u8]) -> Result<Arc<OwnedFd>, AgentError> {
        while !under(parent, &self.stack.last().unwrap().0) {
            self.stack.pop();
        }
        let (top, _) = self.stack.last().unwrap();
        let rest: Vec<u8> = if top.is_empty() {
            parent.to_vec()
        } else {
            parent[top.len()..].to_vec()
        };
        for comp in rest.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            let (top_path, top_fd) = self.stack.last().unwrap();
            let mut path = top_path.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(comp);
            let fd = match fsx::open_dir_at(top_fd.as_raw_fd(), comp) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    fsx::mkdir_at(top_fd.as_raw_fd(), comp, 0o700)
                        .and_then(|_| fsx::open_dir_at(top_fd.as_raw_fd(), comp))
                        .map_err(|e| AgentError::Target {
                            path: PathBuf::from(show(&path)),
                            source: e,
                        })?
                }
                Err(e) => return Err(refuse(for_path, &path, e)),
            };
            self.stack.push((path, Arc::new(fd)));
        }
        Ok(self.stack.last().unwrap().1.clone())
    }
}

/// Opens directory `path` below `root` without following any symlink.
fn open_chain(root: &OwnedFd, path: &[u8]) -> std::io::Result<OwnedFd> {
    let mut fd = fsx::open_dir_at(root.as_raw_fd(), b".")?;
    for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
        fd = fsx::open_dir_at(fd.as_raw_fd(), comp)?;
    }
    Ok(fd)
}

struct Job {
    dir: Arc<OwnedFd>,
    entry: Entry,
}

enum Done {
    Ok { bytes: u64, warnings: Vec<String> },
    Failed(String),
}

fn temp_name() -> Vec<u8> {
    format!(".elastio-restore-{:016x}", rand::random::<u64>()).into_bytes()
}

/// Where the bytes of restored regular files come from: a file RP's chunks, or a file system
/// inside a disk RP (the CLI's adapter reads it through elastio-mount).
pub trait FileSource: Sync {
    /// Writes the data of regular file `e` into `file` (already `e.size` bytes long, all
    /// holes); returns the bytes written. Errors name what failed, not the path (the caller
    /// adds it).
    fn write_data(&self, e: &Entry, file: &std::fs::File) -> Result<u64, String>;
}

/// A file RP's chunks, as its tree lists them.
struct Chunks<'a>(&'a Vault);

impl FileSource for Chunks<'_> {
    fn write_data(&self, e: &Entry, file: &std::fs::File) -> Result<u64, String> {
        let vault = self.0;
        let regions = e.data_regions();
        let mut region = 0usize;
        let mut in_region = 0u64;
        let mut written = 0u64;
        for (id, len) in &e.chunks {
            let data = vault.read_chunk(id).map_err(|err| err.to_string())?;
            if data.len() != *len as usize {
                return Err(format!(
                    "chunk {id} holds {} bytes, the tree says {len}",
                    data.len()
                ));
            }
            let mut rest = &data[..];
            while !rest.is_empty() {
                let Some(&(off, rlen)) = regions.get(region) else {
                    return Err("the tree's chunks exceed the file's data regions".into());
                };
                let n = rest.len().min((rlen - in_region) as usize);
                file.write_all_at(&rest[..n], off + in_region)
                    .map_err(|err| err.to_string())?;
                rest = &rest[n..];
                in_region += n as u64;
                written += n as u64;
                if in_region == rlen {
                    region += 1;
                    in_region = 0;
                }
            }
        }
        Ok(written)
    }
}

/// Writes one regular file under a temporary name, applies its metadata, renames it in place.
fn write_file(source: &dyn FileSource, dir: &OwnedFd, e: &Entry, as_root: bool) -> Done {
    let (_, name) = e.split();
    let tmp = temp_name();
    let file = match fsx::create_excl_at(dir.as_raw_fd(), &tmp) {
        Ok(f) => f,
        Err(err) => return Done::Failed(format!("{}: {err}", show(&e.path))),
    };
    let mut warnings = Vec::new();
    let result = (|| -> Result<u64, String> {
        file.set_len(e.size).map_err(|err| err.to_string())?;
        let written = source.write_data(e, &file)?;
        if as_root {
            if let Err(err) = fsx::fchown(&file, e.uid, e.gid) {
                warnings.push(format!(
                    "{}: owner {}:{}: {err}",
                    show(&e.path),
                    e.uid,
                    e.gid
                ));
            }
        }
        fsx::fchmod(&file, e.mode).map_err(|err| err.to_string())?;
        set_xattrs(&file, e, &mut warnings);
        fsx::futimes(&file, e.mtime_ns).map_err(|err| err.to_string())?;
        fsx::rename_at(dir.as_raw_fd(), &tmp, name).map_err(|err| err.to_string())?;
        Ok(written)
    })();
    match result {
        Ok(bytes) => Done::Ok { bytes, warnings },
        Err(err) => {
            let _ = fsx::unlink_at(dir.as_raw_fd(), &tmp, false);
            Done::Failed(format!("{}: {err}", show(&e.path)))
        }
    }
}

/// Sets `e`'s extended attributes on `fd`; each failure is a warning, except an NTFS security
/// descriptor (`system.ntfs_acl`, from an NTFS volume in a disk RP) on a target that has no
/// such attribute: only an ntfs-3g mount takes it, and anywhere else it is simply not restored.
fn set_xattrs(fd: &impl AsRawFd, e: &Entry, warnings: &mut Vec<String>) {
    for (k, v) in &e.xattrs {
        if let Err(err) = fsx::fsetxattr(fd, k, v) {
            let unsupported = err.raw_os_error() == Some(libc::EOPNOTSUPP);
            if !(unsupported && k.starts_with(b"system.ntfs_")) {
                warnings.push(format!("{}: xattr {}: {err}", show(&e.path), show(k)));
            }
        }
    }
}

/// Owner (root only), mode and times of a non-regular entry just created as `name` in `dir`.
/// Owner and mode are changed through a descriptor of the created inode ([`fsx::Node`]): the
/// target directory may be writable by someone who swaps the name for a link to another file
/// between the creation and these calls.
fn apply_meta_at(dir: &OwnedFd, name: &[u8], e: &Entry, as_root: bool, warnings: &mut Vec<String>) {
    let fd = dir.as_raw_fd();
    let node = match fsx::Node::open_at(fd, name, e.kind.mode_bits()) {
        Ok(n) => n,
        Err(err) => {
            warnings.push(format!("{}: metadata not restored: {err}", show(&e.path)));
            return;
        }
    };
    if as_root {
        if let Err(err) = node.chown(e.uid, e.gid) {
            warnings.push(format!("{}: owner: {err}", show(&e.path)));
        }
    }
    if e.kind != EntryKind::Symlink {
        if let Err(err) = node.chmod(e.mode) {
            warnings.push(format!("{}: mode: {err}", show(&e.path)));
        }
    }
    // Times through the name with AT_SYMLINK_NOFOLLOW: a swapped name gets a timestamp at
    // worst, never a mode or an owner.
    if let Err(err) = fsx::utimes_at(fd, name, e.mtime_ns) {
        warnings.push(format!("{}: times: {err}", show(&e.path)));
    }
}

/// Restores file RP `rp` into `target` (created if missing).
pub fn restore_files(
    vault: &Arc<Vault>,
    rp: &RecoveryPoint,
    target: &Path,
    opts: &FileRestoreOptions,
    progress: &dyn Progress,
) -> Result<FileRestoreReport, AgentError> {
    let t = rp.tree()?.clone();
    let total = if opts.includes.is_empty() {
        t.file_bytes
    } else {
        0
    };
    let mut entries = tree::TreeReader::open(vault, &t.stream, &rp.id.to_string())?
        .map(|e| e.map_err(AgentError::from));
    restore_entries(&mut entries, &Chunks(vault), target, opts, total, progress)
}

/// Restores `entries` (in tree order: every directory before what it holds; hard links after
/// their first path) into `target` (created if missing), file data from `source`.
/// `total_bytes` sizes the progress bar (0: unknown). Entries with a path that could escape
/// the target (absolute, `.`, `..`, empty components) are refused and reported, whatever their
/// source.
#[allow(unsafe_code)]
pub fn restore_entries(
    entries: &mut dyn Iterator<Item = Result<Entry, AgentError>>,
    source: &dyn FileSource,
    target: &Path,
    opts: &FileRestoreOptions,
    total_bytes: u64,
    progress: &dyn Progress,
) -> Result<FileRestoreReport, AgentError> {
    let started = Instant::now();
    std::fs::create_dir_all(target).map_err(|e| AgentError::Target {
        path: target.into(),
        source: e,
    })?;
    let root = Arc::new(fsx::open_dir_path(target).map_err(|e| AgentError::Target {
        path: target.into(),
        source: e,
    })?);
    progress.start(total_bytes);
    let mut r = Restorer {
        stack: DirStack {
            stack: vec![(Vec::new(), root.clone())],
        },
        root,
        // SAFETY: geteuid has no preconditions.
        as_root: unsafe { libc::geteuid() } == 0,
        overwrite: opts.overwrite,
        report: FileRestoreReport::default(),
        dirs: Vec::new(),
        links: Vec::new(),
        written_files: HashSet::new(),
        skipped_dirs: Vec::new(),
    };
    let workers = opts.workers.max(1);
    let (jtx, jrx) = bounded::<Job>(workers * 8);
    let (dtx, drx) = bounded::<(Vec<u8>, Done)>(workers * 8);
    let as_root = r.as_root;
    let walk = std::thread::scope(|s| -> Result<(), AgentError> {
        let mut handles = Vec::new();
        for _ in 0..workers {
            let (jrx, dtx) = (jrx.clone(), dtx.clone());
            handles.push(s.spawn(move || {
                for job in jrx {
                    let done = write_file(source, &job.dir, &job.entry, as_root);
                    if let Done::Ok { bytes, .. } = &done {
                        progress.advance(*bytes);
                    }
                    if dtx.send((job.entry.path, done)).is_err() {
                        return;
                    }
                }
            }));
        }
        drop((jrx, dtx));
        let collector = s.spawn(move || drx.iter().collect::<Vec<_>>());
        let walked = (|| -> Result<(), AgentError> {
            for e in entries {
                let e = e?;
                if opts.cancel.is_cancelled() {
                    return Err(AgentError::Cancelled);
                }
                if let Some(why) = tree::path_problem(&e.path) {
                    r.report
                        .failed
                        .push(format!("{}: path {why}", show(&e.path)));
                    continue;
                }
                if selected(&e.path, &opts.includes)
                    && !r.skipped_dirs.iter().any(|d| under(&e.path, d))
                {
                    r.place(e, &jtx)?;
                }
            }
            Ok(())
        })();
        drop(jtx);
        for h in handles {
            let _ = h.join();
        }
        let done = collector.join().map_err(|_| AgentError::Panicked)?;
        for (path, d) in done {
            match d {
                Done::Ok { bytes, warnings } => {
                    r.report.bytes += bytes;
                    r.report.warnings.extend(warnings);
                }
                Done::Failed(why) => {
                    r.written_files.remove(&path);
                    r.report.failed.push(why);
                }
            }
        }
        walked
    });
    walk?;
    r.link_hard_links();
    r.apply_dir_metadata();
    r.report.elapsed = started.elapsed();
    Ok(r.report)
}

/// One restore into a target directory, entry by entry in tree order.
struct Restorer {
    root: Arc<OwnedFd>,
    stack: DirStack,
    as_root: bool,
    overwrite: bool,
    report: FileRestoreReport,
    /// Directories restored, for their metadata at the end.
    dirs: Vec<Entry>,
    /// Hard links to make once their source file is written.
    links: Vec<Entry>,
    /// Files written with more than one link (the sources of `links`).
    written_files: HashSet<Vec<u8>>,
    /// Directories not restored: nothing under them is either.
    skipped_dirs: Vec<Vec<u8>>,
}

impl Restorer {
    /// Restores entry `e`: directories, symlinks and special files here, regular files by the
    /// writers (a job on `jobs`), hard links later.
    fn place(&mut self, e: Entry, jobs: &crossbeam_channel::Sender<Job>) -> Result<(), AgentError> {
        self.report.entries += 1;
        let (parent, name) = e.split();
        let dir = self.stack.enter(parent, &e.path)?;
        let fd = dir.as_raw_fd();
        let Some(exists_as_dir) = self.clear_way(fd, name, &e)? else {
            return Ok(());
        };
        let report = &mut self.report;
        match e.kind {
            EntryKind::Dir => {
                if !exists_as_dir {
                    if let Err(err) = fsx::mkdir_at(fd, name, 0o700) {
                        report.failed.push(format!("{}: {err}", show(&e.path)));
                        self.skipped_dirs.push(e.path.clone());
                        return Ok(());
                    }
                }
                let mut d = e;
                d.chunks = Vec::new();
                self.dirs.push(d);
            }
            EntryKind::File => {
                report.files += 1;
                if !e.hardlink.is_empty() && self.written_files.contains(&e.hardlink) {
                    self.links.push(e);
                    return Ok(());
                }
                if e.nlink > 1 {
                    self.written_files.insert(e.path.clone());
                }
                if jobs.send(Job { dir, entry: e }).is_err() {
                    return Err(AgentError::Stopped);
                }
            }
            EntryKind::Symlink => match fsx::symlink_at(&e.target, fd, name) {
                Ok(()) => apply_meta_at(&dir, name, &e, self.as_root, &mut report.warnings),
                Err(err) => report.failed.push(format!("{}: {err}", show(&e.path))),
            },
            EntryKind::CharDev | EntryKind::BlockDev | EntryKind::Fifo | EntryKind::Socket => {
                let mode = e.kind.mode_bits() | e.mode;
                match fsx::mknod_at(fd, name, mode, e.rdev) {
                    Ok(()) => apply_meta_at(&dir, name, &e, self.as_root, &mut report.warnings),
                    Err(err) => {
                        report
                            .failed
                            .push(format!("{} ({}): {err}", show(&e.path), e.kind.name()))
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes room for `e` at `name` in directory `fd`. None: leave it (skipped, or what is in
    /// the way could not be removed; both reported); Some(whether a directory is there, which
    /// a restored directory reuses).
    fn clear_way(&mut self, fd: i32, name: &[u8], e: &Entry) -> Result<Option<bool>, AgentError> {
        let existing = fsx::stat_at(fd, name).map_err(|err| AgentError::Target {
            path: PathBuf::from(show(&e.path)),
            source: err,
        })?;
        let exists_as_dir = existing.as_ref().is_some_and(is_dir);
        if existing.is_none() || (e.kind == EntryKind::Dir && exists_as_dir) {
            return Ok(Some(exists_as_dir));
        }
        if !self.overwrite {
            self.report.skipped.push(show(&e.path));
            if e.kind == EntryKind::Dir {
                self.skipped_dirs.push(e.path.clone());
            }
            return Ok(None);
        }
        if exists_as_dir {
            // Replacing a directory by something else: only an empty one.
            if let Err(err) = fsx::unlink_at(fd, name, true) {
                self.report.failed.push(format!(
                    "{}: a directory is in the way ({err})",
                    show(&e.path)
                ));
                return Ok(None);
            }
        } else if e.kind != EntryKind::File || !e.hardlink.is_empty() {
            // Regular files replace atomically by rename; the rest is unlinked.
            if let Err(err) = fsx::unlink_at(fd, name, false) {
                self.report.failed.push(format!("{}: {err}", show(&e.path)));
                return Ok(None);
            }
        }
        Ok(Some(exists_as_dir))
    }

    /// Hard links whose source was written in this run.
    fn link_hard_links(&mut self) {
        for e in std::mem::take(&mut self.links) {
            let (sp, sn) = tree::split_path(&e.hardlink);
            let (dp, dn) = e.split();
            let linked = if self.written_files.contains(&e.hardlink) {
                open_chain(&self.root, sp).and_then(|s| {
                    let d = open_chain(&self.root, dp)?;
                    fsx::link_at(s.as_raw_fd(), sn, d.as_raw_fd(), dn)
                })
            } else {
                Err(std::io::Error::other("its source could not be restored"))
            };
            if let Err(err) = linked {
                self.report.failed.push(format!(
                    "{} (hard link to {}): {err}",
                    show(&e.path),
                    show(&e.hardlink)
                ));
            }
        }
    }

    /// Directory metadata last, deepest first (writing into a directory changes its times).
    fn apply_dir_metadata(&mut self) {
        let warnings = &mut self.report.warnings;
        for d in self.dirs.iter().rev() {
            let applied = open_chain(&self.root, &d.path).and_then(|fd| {
                if self.as_root {
                    if let Err(err) = fsx::fchown(&fd, d.uid, d.gid) {
                        warnings.push(format!("{}: owner: {err}", show(&d.path)));
                    }
                }
                // After the mode, as for files: a chmod on an ntfs-3g target rewrites the
                // security descriptor that `system.ntfs_acl` sets.
                fsx::fchmod(&fd, d.mode)?;
                set_xattrs(&fd, d, warnings);
                fsx::futimes(&fd, d.mtime_ns)
            });
            if let Err(err) = applied {
                warnings.push(format!("{}: directory metadata: {err}", show(&d.path)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_selection() {
        let inc = vec![b"usr/share".to_vec()];
        assert!(selected(b"usr", &inc));
        assert!(selected(b"usr/share", &inc));
        assert!(selected(b"usr/share/doc/x", &inc));
        assert!(!selected(b"usr/shared", &inc));
        assert!(!selected(b"usr/lib", &inc));
        assert!(selected(b"anything", &[]));
        assert_eq!(include_path("/usr/share/").unwrap(), b"usr/share");
        assert!(include_path("../etc").is_err());
    }

    /// The window between creating a node and giving it its metadata, made deterministic: the
    /// name is swapped for a symlink (then a hard link) to a victim file before the metadata
    /// is applied, as another user of a writable target directory could. The victim keeps its
    /// mode. (Before the metadata went through a pinned descriptor, `fchmodat` followed the
    /// symlink and made the victim 0666.)
    #[test]
    fn a_node_swapped_before_its_metadata_is_applied_is_left_alone() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("shadow");
        std::fs::write(&victim, b"secret").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let target = tmp.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let dir = fsx::open_dir_path(&target).unwrap();
        let mut e = Entry::new(b"fifo".to_vec(), EntryKind::Fifo);
        e.mode = 0o666;
        for swap in ["symlink", "hardlink"] {
            fsx::mknod_at(dir.as_raw_fd(), b"fifo", libc::S_IFIFO | 0o600, 0).unwrap();
            std::fs::remove_file(target.join("fifo")).unwrap();
            match swap {
                "symlink" => std::os::unix::fs::symlink(&victim, target.join("fifo")).unwrap(),
                _ => std::fs::hard_link(&victim, target.join("fifo")).unwrap(),
            }
            let mut warnings = Vec::new();
            apply_meta_at(&dir, b"fifo", &e, false, &mut warnings);
            let mode = std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{swap}: the victim's mode is unchanged");
            assert!(
                warnings.iter().any(|w| w.contains("replaced")),
                "{swap}: {warnings:?}"
            );
            std::fs::remove_file(target.join("fifo")).unwrap();
        }
        // Not swapped: the mode is applied.
        fsx::mknod_at(dir.as_raw_fd(), b"fifo", libc::S_IFIFO | 0o600, 0).unwrap();
        let mut warnings = Vec::new();
        apply_meta_at(&dir, b"fifo", &e, false, &mut warnings);
        assert!(warnings.is_empty(), "{warnings:?}");
        let mode = std::fs::metadata(target.join("fifo"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o666);
    }
}
