//! FUSE view of a disk recovery point: a read-only directory holding `disk.img`, the whole disk
//! byte for byte, and `partN.img` for each partition of an MBR or GPT table. Holes are reported
//! through `st_blocks` and SEEK_DATA/SEEK_HOLE. Reads run on a small thread pool so the kernel can
//! keep several in flight; RPs are immutable, so the kernel's page cache is kept across opens.
//! Views of the files inside file systems come with the rest of the FUSE issue.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{bounded, Sender};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEntry, ReplyLseek, ReplyOpen, Request,
};
use scalez::reader::DiskReader;

const ROOT: u64 = 1;
/// `disk.img` is inode 2; partition files follow.
const FIRST_FILE: u64 = 2;
/// RPs never change: the kernel may cache attributes and entries for long.
const TTL: Duration = Duration::from_secs(3600);
/// FOPEN_KEEP_CACHE: keep the page cache across opens.
const KEEP_CACHE: u32 = 1 << 1;

/// A file of the view: a byte range of the disk.
pub struct ViewFile {
    pub name: String,
    pub start: u64,
    pub len: u64,
    /// Bytes of stored (non-zero) chunks in the range, for `st_blocks`.
    pub stored_bytes: u64,
}

/// What to mount.
pub struct DiskView {
    pub reader: Arc<DiskReader>,
    /// `disk.img` first, then partitions.
    pub files: Vec<ViewFile>,
    /// The RP's creation time (shown as every timestamp).
    pub time: SystemTime,
    pub uid: u32,
    pub gid: u32,
}

struct Fs {
    view: Arc<DiskView>,
    reads: Sender<Box<dyn FnOnce() + Send>>,
}

impl Fs {
    fn file(&self, ino: u64) -> Option<&ViewFile> {
        self.view.files.get(ino.checked_sub(FIRST_FILE)? as usize)
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let v = &self.view;
        let (kind, perm, size, blocks, nlink) = match (ino, self.file(ino)) {
            (ROOT, _) => (FileType::Directory, 0o555, 0, 0, 2),
            (_, Some(f)) => (
                FileType::RegularFile,
                0o444,
                f.len,
                f.stored_bytes.div_ceil(512),
                1,
            ),
            _ => return None,
        };
        Some(FileAttr {
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
            blksize: v.reader.chunk_size(),
            flags: 0,
        })
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // Large reads: up to 1 MiB of read-ahead per request where the kernel allows it.
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let found = (parent == ROOT)
            .then(|| {
                self.view
                    .files
                    .iter()
                    .position(|f| name.to_str() == Some(&f.name))
            })
            .flatten();
        match found {
            Some(i) => reply.entry(&TTL, &self.attr(FIRST_FILE + i as u64).unwrap(), 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if self.file(ino).is_none() {
            return reply.error(libc::EISDIR);
        }
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        reply.opened(0, KEEP_CACHE);
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
        let Some(f) = self.file(ino) else {
            return reply.error(libc::EINVAL);
        };
        if offset < 0 {
            return reply.error(libc::EINVAL);
        }
        let offset = (offset as u64).min(f.len);
        let (start, size) = (f.start + offset, (size as u64).min(f.len - offset) as usize);
        let view = self.view.clone();
        let job = Box::new(move || {
            let mut buf = Vec::with_capacity(size);
            match view.reader.read_append(start, size, &mut buf) {
                Ok(_) => reply.data(&buf),
                Err(e) => {
                    tracing::error!("read of {size} bytes at {offset}: {e}");
                    reply.error(libc::EIO)
                }
            }
        });
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
            return reply.error(libc::EINVAL);
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
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let mut entries = vec![
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
        ];
        for (i, f) in self.view.files.iter().enumerate() {
            entries.push((
                FIRST_FILE + i as u64,
                FileType::RegularFile,
                f.name.as_str(),
            ));
        }
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Mounts `view` read-only at `mountpoint` and serves it until `stop()` returns true or the file
/// system is unmounted from outside (`fusermount3 -u`, `elastio umount`). `ready` runs once the
/// kernel has the mount.
pub fn serve(
    view: DiskView,
    mountpoint: &Path,
    fsname: &str,
    ready: impl FnOnce(),
    stop: impl Fn() -> bool,
) -> std::io::Result<()> {
    let (tx, rx) = bounded::<Box<dyn FnOnce() + Send>>(64);
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
    let fs = Fs {
        view: Arc::new(view),
        reads: tx,
    };
    let options = [
        MountOption::RO,
        MountOption::FSName(fsname.to_string()),
        MountOption::Subtype("elastio".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    let session = fuser::spawn_mount2(fs, mountpoint, &options)?;
    ready();
    while !stop() && !session.guard.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Dropping the session unmounts (if still mounted) and ends the loop; the read workers stop
    // when the file system's sender is dropped with it.
    drop(session);
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}
