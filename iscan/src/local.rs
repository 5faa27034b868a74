//! A local directory as a read-only [`FileSystem`], for `elastio iscan --path` (often run as
//! root over trees other users write).
//!
//! Nothing is followed and no path is resolved again: the root directory is opened once, and
//! every entry is reached from it through a chain of directory descriptors, one component at a
//! time with `O_NOFOLLOW|O_DIRECTORY` (`openat` semantics through `/proc/self/fd/N/name`, where
//! the kernel starts from the open directory, not from a path). Entries are looked at with
//! `lstat` on their parent's descriptor, files opened with `O_NOFOLLOW|O_NONBLOCK`. A symlink
//! planted in the tree, or a directory swapped for a symlink during the scan, is reported or
//! fails; it is never read through. Inode numbers are positions in a table of (parent, name)
//! pairs seen (one entry per directory entry listed).

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use mount::filesystem::{Attr, Entry, FileData, FileSystem, Kind};

pub struct LocalDir {
    shown: PathBuf,
    root: File,
    /// (parent inode, name); the root is entry 0.
    entries: Mutex<Vec<(usize, OsString)>>,
}

/// `name` inside the directory open as `dir`, for the *at-style calls below.
fn at(dir: &File, name: &OsString) -> PathBuf {
    Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name)
}

fn open_dir_at(dir: &File, name: &OsString) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(at(dir, name))
}

impl LocalDir {
    pub fn new(root: PathBuf) -> io::Result<Self> {
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&root)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", root.display())))?;
        if !Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).exists() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "scanning a directory needs /proc mounted",
            ));
        }
        Ok(LocalDir {
            shown: root,
            root: dir,
            entries: Mutex::new(vec![(0, OsString::new())]),
        })
    }

    /// The names from the root down to `ino` (empty for the root).
    fn chain(&self, ino: u64) -> io::Result<Vec<OsString>> {
        let entries = self.entries.lock().unwrap();
        let mut at = usize::try_from(ino)
            .ok()
            .filter(|&i| i < entries.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no inode {ino}")))?;
        let mut names = Vec::new();
        while at != 0 {
            let (parent, name) = &entries[at];
            names.push(name.clone());
            at = *parent;
        }
        names.reverse();
        Ok(names)
    }

    /// `ino`'s parent directory, opened through the chain, and `ino`'s name in it (None for
    /// the root).
    fn parent_of(&self, ino: u64) -> io::Result<(File, Option<OsString>)> {
        let mut names = self.chain(ino)?;
        let last = names.pop();
        let mut dir = self.root.try_clone()?;
        for n in &names {
            dir = open_dir_at(&dir, n).map_err(|e| self.err(&names, e))?;
        }
        Ok((dir, last))
    }

    /// `ino` as a directory.
    fn dir(&self, ino: u64) -> io::Result<File> {
        match self.parent_of(ino)? {
            (dir, None) => Ok(dir),
            (parent, Some(name)) => open_dir_at(&parent, &name).map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOTDIR) || e.raw_os_error() == Some(libc::ELOOP)
                {
                    io::Error::new(io::ErrorKind::NotADirectory, "not a directory")
                } else {
                    e
                }
            }),
        }
    }

    fn err(&self, names: &[OsString], e: io::Error) -> io::Error {
        let mut p = self.shown.clone();
        p.extend(names);
        io::Error::new(e.kind(), format!("{}: {e}", p.display()))
    }

    fn lstat(&self, ino: u64) -> io::Result<std::fs::Metadata> {
        match self.parent_of(ino)? {
            (dir, None) => dir.metadata(),
            (parent, Some(name)) => std::fs::symlink_metadata(at(&parent, &name)),
        }
    }
}

fn time(secs: i64, nanos: i64) -> std::time::SystemTime {
    let d = Duration::new(secs.unsigned_abs(), nanos.clamp(0, 999_999_999) as u32);
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(d)
    } else {
        UNIX_EPOCH.checked_sub(d)
    };
    t.unwrap_or(UNIX_EPOCH)
}

impl FileSystem for LocalDir {
    fn type_name(&self) -> &'static str {
        "directory"
    }

    fn root(&self) -> u64 {
        0
    }

    fn attr(&self, ino: u64) -> io::Result<Attr> {
        let m = self.lstat(ino)?;
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_block_device() {
            Kind::BlockDevice
        } else if ft.is_char_device() {
            Kind::CharDevice
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            Kind::Socket
        };
        Ok(Attr {
            kind,
            perm: (m.mode() & 0o7777) as u16,
            size: m.len(),
            blocks: m.blocks(),
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            atime: time(m.atime(), m.atime_nsec()),
            mtime: time(m.mtime(), m.mtime_nsec()),
            ctime: time(m.ctime(), m.ctime_nsec()),
            crtime: time(m.ctime(), m.ctime_nsec()),
        })
    }

    fn read_dir(&self, ino: u64) -> io::Result<Vec<Entry>> {
        let dir = self.dir(ino)?;
        let mut names = Vec::new();
        for e in std::fs::read_dir(Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())))? {
            names.push(e?.file_name());
        }
        let mut entries = self.entries.lock().unwrap();
        let parent = ino as usize;
        Ok(names
            .into_iter()
            .map(|n| {
                let name = n.as_bytes().to_vec();
                entries.push((parent, n));
                Entry {
                    name,
                    ino: entries.len() as u64 - 1,
                    kind: None,
                }
            })
            .collect())
    }

    fn read_link(&self, ino: u64) -> io::Result<Vec<u8>> {
        match self.parent_of(ino)? {
            (_, None) => Err(io::Error::new(io::ErrorKind::InvalidInput, "not a symlink")),
            (parent, Some(name)) => Ok(std::fs::read_link(at(&parent, &name))?
                .as_os_str()
                .as_bytes()
                .to_vec()),
        }
    }

    fn open(self: Arc<Self>, ino: u64) -> io::Result<Arc<dyn FileData>> {
        let (parent, Some(name)) = self.parent_of(ino)? else {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "the root is a directory",
            ));
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc_o_nofollow())
            .open(at(&parent, &name))
            .map_err(|e| self.err(&self.chain(ino).unwrap_or_default(), e))?;
        let m = file.metadata()?;
        if !m.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "not a regular file",
            ));
        }
        Ok(Arc::new(LocalFile {
            file,
            size: m.len(),
        }))
    }
}

/// A symlink swapped in is not followed; a FIFO swapped in does not block the open.
fn libc_o_nofollow() -> i32 {
    libc::O_NOFOLLOW | libc::O_NONBLOCK
}

struct LocalFile {
    file: File,
    size: u64,
}

impl FileData for LocalFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let start = out.len();
        out.resize(start + len, 0);
        let mut done = 0;
        while done < len {
            let n = self
                .file
                .read_at(&mut out[start + done..], offset + done as u64)?;
            if n == 0 {
                // The file shrank since it was opened: what is left reads as zeros.
                break;
            }
            done += n;
        }
        Ok(())
    }

    fn disk_ranges(&self, _offset: u64, _len: u64) -> Vec<(u64, u64)> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mount::browse::Walker;

    /// Symlinks to elsewhere are listed as symlinks and never read through; a directory
    /// swapped for a symlink after it was listed fails instead of leading outside.
    #[test]
    fn nothing_outside_the_tree_is_read() {
        let d = tempfile::tempdir().unwrap();
        let (tree, outside) = (d.path().join("tree"), d.path().join("outside"));
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "not yours").unwrap();
        std::fs::write(tree.join("sub/mine"), "yours").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), tree.join("file-link")).unwrap();
        let fs: Arc<dyn FileSystem> = Arc::new(LocalDir::new(tree.clone()).unwrap());
        let mut seen = Vec::new();
        for item in Walker::new(fs.as_ref(), fs.root(), true).flatten() {
            seen.push((
                String::from_utf8(item.path.clone()).unwrap(),
                item.attr.kind,
            ));
        }
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            seen,
            [
                (String::new(), Kind::Dir),
                ("file-link".into(), Kind::Symlink),
                ("link".into(), Kind::Symlink),
                ("sub".into(), Kind::Dir),
                ("sub/mine".into(), Kind::File),
            ]
        );
        let ino = |path: &str| mount::browse::resolve(fs.as_ref(), path.as_bytes()).unwrap();
        let (file_link, mine) = (ino("file-link"), ino("sub/mine"));
        assert!(fs.clone().open(file_link).is_err(), "a symlink was opened");
        let data = fs.clone().open(mine).unwrap();
        let mut out = Vec::new();
        data.read_append(0, 5, &mut out).unwrap();
        assert_eq!(out, b"yours");
        // `sub` swapped for a symlink to outside after listing: `sub/mine` must not resolve
        // to anything there.
        std::fs::rename(tree.join("sub"), d.path().join("moved")).unwrap();
        std::fs::create_dir_all(outside.join("x")).unwrap();
        std::fs::write(outside.join("mine"), "not yours either").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("sub")).unwrap();
        assert!(
            fs.clone().open(mine).is_err(),
            "followed a swapped-in symlink"
        );
    }
}
