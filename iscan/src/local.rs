//! A local directory as a read-only [`FileSystem`], for `elastio iscan --path`.
//!
//! Nothing is followed: entries are looked at with `lstat`, files opened with `O_NOFOLLOW`, so a
//! symlink planted in the tree is reported as a symlink, never read through. Inode numbers are
//! positions in a table of the paths seen (one entry per directory entry listed).

use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use mount::filesystem::{Attr, Entry, FileData, FileSystem, Kind};

pub struct LocalDir {
    paths: Mutex<Vec<PathBuf>>,
}

impl LocalDir {
    pub fn new(root: PathBuf) -> Self {
        LocalDir {
            paths: Mutex::new(vec![root]),
        }
    }

    fn path(&self, ino: u64) -> io::Result<PathBuf> {
        self.paths
            .lock()
            .unwrap()
            .get(ino as usize)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no inode {ino}")))
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
        let p = self.path(ino)?;
        let m = std::fs::symlink_metadata(&p)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
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
        let p = self.path(ino)?;
        let m = std::fs::symlink_metadata(&p)?;
        if !m.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{}: not a directory", p.display()),
            ));
        }
        let mut names = Vec::new();
        for e in std::fs::read_dir(&p)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?
        {
            names.push(e?.file_name());
        }
        let mut paths = self.paths.lock().unwrap();
        Ok(names
            .into_iter()
            .map(|n| {
                paths.push(p.join(&n));
                Entry {
                    name: n.as_bytes().to_vec(),
                    ino: paths.len() as u64 - 1,
                    kind: None,
                }
            })
            .collect())
    }

    fn read_link(&self, ino: u64) -> io::Result<Vec<u8>> {
        Ok(std::fs::read_link(self.path(ino)?)?
            .as_os_str()
            .as_bytes()
            .to_vec())
    }

    fn open(self: Arc<Self>, ino: u64) -> io::Result<Arc<dyn FileData>> {
        let p = self.path(ino)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc_o_nofollow())
            .open(&p)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
        let m = file.metadata()?;
        if !m.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("{}: not a regular file", p.display()),
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
