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

/// Writes one regular file under a temporary name, applies its metadata, renames it in place.
fn write_file(vault: &Vault, dir: &OwnedFd, e: &Entry, as_root: bool) -> Done {
    let (_, name) = e.split();
    let tmp = temp_name();
    let file = match fsx::create_excl_at(dir.as_raw_fd(), &tmp) {
        Ok(f) => f,
        Err(err) => return Done::Failed(format!("{}: {err}", show(&e.path))),
    };
    let mut warnings = Vec::new();
    let result = (|| -> Result<u64, String> {
        file.set_len(e.size).map_err(|err| err.to_string())?;
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
        for (k, v) in &e.xattrs {
            if let Err(err) = fsx::fsetxattr(&file, k, v) {
                warnings.push(format!("{}: xattr {}: {err}", show(&e.path), show(k)));
            }
        }
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
#[allow(unsafe_code)]
pub fn restore_files(
    vault: &Arc<Vault>,
    rp: &RecoveryPoint,
    target: &Path,
    opts: &FileRestoreOptions,
    progress: &dyn Progress,
) -> Result<FileRestoreReport, AgentError> {
    let started = Instant::now();
    let t = rp.tree()?.clone();
    std::fs::create_dir_all(target).map_err(|e| AgentError::Target {
        path: target.into(),
        source: e,
    })?;
    let root = Arc::new(fsx::open_dir_path(target).map_err(|e| AgentError::Target {
        path: target.into(),
        source: e,
    })?);
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    progress.start(if opts.includes.is_empty() {
        t.file_bytes
    } else {
        0
    });
    let mut report = FileRestoreReport::default();
    let mut dirs: Vec<Entry> = Vec::new();
    let mut links: Vec<Entry> = Vec::new();
    let mut written_files: HashSet<Vec<u8>> = HashSet::new();
    let mut skipped_dirs: Vec<Vec<u8>> = Vec::new();
    let mut stack = DirStack {
        stack: vec![(Vec::new(), root.clone())],
    };
    let workers = opts.workers.max(1);
    let (jtx, jrx) = bounded::<Job>(workers * 8);
    let (dtx, drx) = bounded::<(Vec<u8>, Done)>(workers * 8);

    let walk = std::thread::scope(|s| -> Result<(), AgentError> {
        let mut handles = Vec::new();
        for _ in 0..workers {
            let (jrx, dtx) = (jrx.clone(), dtx.clone());
            let vault = &**vault;
            handles.push(s.spawn(move || {
                for job in jrx {
                    let done = write_file(vault, &job.dir, &job.entry, as_root);
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
            for e in tree::TreeReader::open(vault, &t.stream, &rp.id.to_string())? {
                let e = e?;
                if opts.cancel.is_cancelled() {
                    return Err(AgentError::Cancelled);
                }
                if !selected(&e.path, &opts.includes)
                    || skipped_dirs.iter().any(|d| under(&e.path, d))
                {
                    continue;
                }
                report.entries += 1;
                let (parent, name) = e.split();
                let dir = stack.enter(parent, &e.path)?;
                let fd = dir.as_raw_fd();
                let existing = fsx::stat_at(fd, name).map_err(|err| AgentError::Target {
                    path: PathBuf::from(show(&e.path)),
                    source: err,
                })?;
                let exists_as_dir = existing.as_ref().is_some_and(is_dir);
                if existing.is_some() && !(e.kind == EntryKind::Dir && exists_as_dir) {
                    if !opts.overwrite {
                        report.skipped.push(show(&e.path));
                        if e.kind == EntryKind::Dir {
                            skipped_dirs.push(e.path.clone());
                        }
                        continue;
                    }
                    if exists_as_dir {
                        // Replacing a directory by something else: only an empty one.
                        if let Err(err) = fsx::unlink_at(fd, name, true) {
                            report.failed.push(format!(
                                "{}: a directory is in the way ({err})",
                                show(&e.path)
                            ));
                            continue;
                        }
                    } else if e.kind != EntryKind::File || !e.hardlink.is_empty() {
                        // Regular files replace atomically by rename; the rest is unlinked.
                        if let Err(err) = fsx::unlink_at(fd, name, false) {
                            report.failed.push(format!("{}: {err}", show(&e.path)));
                            continue;
                        }
                    }
                }
                match e.kind {
                    EntryKind::Dir => {
                        if !exists_as_dir {
                            if let Err(err) = fsx::mkdir_at(fd, name, 0o700) {
                                report.failed.push(format!("{}: {err}", show(&e.path)));
                                skipped_dirs.push(e.path.clone());
                                continue;
                            }
                        }
                        let mut d = e;
                        d.chunks = Vec::new();
                        dirs.push(d);
                    }
                    EntryKind::File => {
                        report.files += 1;
                        if !e.hardlink.is_empty() && written_files.contains(&e.hardlink) {
                            links.push(e);
                            continue;
                        }
                        if e.nlink > 1 {
                            written_files.insert(e.path.clone());
                        }
                        if jtx.send(Job { dir, entry: e }).is_err() {
                            return Err(AgentError::Stopped);
                        }
                    }
                    EntryKind::Symlink => match fsx::symlink_at(&e.target, fd, name) {
                        Ok(()) => apply_meta_at(&dir, name, &e, as_root, &mut report.warnings),
                        Err(err) => report.failed.push(format!("{}: {err}", show(&e.path))),
                    },
                    EntryKind::CharDev
                    | EntryKind::BlockDev
                    | EntryKind::Fifo
                    | EntryKind::Socket => {
                        let mode = e.kind.mode_bits() | e.mode;
                        match fsx::mknod_at(fd, name, mode, e.rdev) {
                            Ok(()) => apply_meta_at(&dir, name, &e, as_root, &mut report.warnings),
                            Err(err) => report.failed.push(format!(
                                "{} ({}): {err}",
                                show(&e.path),
                                e.kind.name()
                            )),
                        }
                    }
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
                    report.bytes += bytes;
                    report.warnings.extend(warnings);
                }
                Done::Failed(why) => {
                    written_files.remove(&path);
                    report.failed.push(why);
                }
            }
        }
        walked
    });
    walk?;

    // Hard links whose source was written in this run.
    for e in links {
        let (sp, sn) = tree::split_path(&e.hardlink);
        let (dp, dn) = e.split();
        let linked = if written_files.contains(&e.hardlink) {
            open_chain(&root, sp).and_then(|s| {
                let d = open_chain(&root, dp)?;
                fsx::link_at(s.as_raw_fd(), sn, d.as_raw_fd(), dn)
            })
        } else {
            Err(std::io::Error::other("its source could not be restored"))
        };
        if let Err(err) = linked {
            report.failed.push(format!(
                "{} (hard link to {}): {err}",
                show(&e.path),
                show(&e.hardlink)
            ));
        }
    }

    // Directory metadata last, deepest first.
    for d in dirs.iter().rev() {
        let applied = open_chain(&root, &d.path).and_then(|fd| {
            if as_root {
                if let Err(err) = fsx::fchown(&fd, d.uid, d.gid) {
                    report
                        .warnings
                        .push(format!("{}: owner: {err}", show(&d.path)));
                }
            }
            for (k, v) in &d.xattrs {
                if let Err(err) = fsx::fsetxattr(&fd, k, v) {
                    report
                        .warnings
                        .push(format!("{}: xattr {}: {err}", show(&d.path), show(k)));
                }
            }
            fsx::fchmod(&fd, d.mode)?;
            fsx::futimes(&fd, d.mtime_ns)
        });
        if let Err(err) = applied {
            report
                .warnings
                .push(format!("{}: directory metadata: {err}", show(&d.path)));
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
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
