//! Thin, checked wrappers over the `*at` system calls and xattr calls that file backup and
//! restore need (std has no directory-relative API). Every name passed here is one path
//! component; nothing here follows a symlink unless a function says so.
// The *at and xattr syscalls: this module is the safe wrapper around them.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a name"))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn check_ssize(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Opens directory `path` (following symlinks: used for a restore target the user named).
pub fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path from `cstr`; the result is checked before use.
    let fd = check(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: the fd was just returned by a successful syscall; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens child directory `name` of `dir`, refusing a symlink (ELOOP) or a non-directory (ENOTDIR).
pub fn open_dir_at(dir: RawFd, name: &[u8]) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: a NUL-terminated path from `cstr`; the result is checked before use.
    let fd = check(unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: the fd was just returned by a successful syscall; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates file `name` in `dir` exclusively (never through a symlink), mode 0600.
pub fn create_excl_at(dir: RawFd, name: &[u8]) -> io::Result<std::fs::File> {
    let c = cstr(name)?;
    // SAFETY: a NUL-terminated path from `cstr`; the result is checked before use.
    let fd = check(unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    })?;
    // SAFETY: the fd was just returned by a successful syscall; nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Opens a regular file for reading without following a final symlink; O_NOATIME when allowed.
pub fn open_read_nofollow(path: &Path) -> io::Result<std::fs::File> {
    let c = cstr(path.as_os_str().as_bytes())?;
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: a NUL-terminated path from `cstr`; the result is checked before use.
    let mut fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_NOATIME) };
    if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
        // SAFETY: a NUL-terminated path from `cstr`; the result is checked before use.
        fd = unsafe { libc::open(c.as_ptr(), flags) };
    }
    check(fd)?;
    // SAFETY: the fd was just returned by a successful syscall; nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// The kernel's `struct open_how` (openat2(2)); defined here because the libc crate gates its own.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `path` for reading only if no component of it is a symlink (openat2 with
/// `RESOLVE_NO_SYMLINKS`): what is opened is then the file at that path, not something a swapped
/// parent directory points to. ELOOP when a component is a symlink; ENOSYS on kernels before 5.6.
pub fn open_read_no_symlinks(path: &Path) -> io::Result<std::fs::File> {
    let c = cstr(path.as_os_str().as_bytes())?;
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK) as u64,
        mode: 0,
        resolve: libc::RESOLVE_NO_SYMLINKS,
    };
    // SAFETY: openat2 reads a NUL-terminated path and an open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    let fd = check(fd as libc::c_int)?;
    // SAFETY: the fd was just returned by a successful syscall; nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// lstat-like `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; `None` when it does not exist.
pub fn stat_at(dir: RawFd, name: &[u8]) -> io::Result<Option<libc::stat>> {
    let c = cstr(name)?;
    // SAFETY: an all-zero bit pattern is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the stat struct is valid for writes and the name (if any) NUL-terminated.
    let r = unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(st))
}

pub fn mkdir_at(dir: RawFd, name: &[u8], mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::mkdirat(dir, c.as_ptr(), mode as libc::mode_t) }).map(|_| ())
}

pub fn symlink_at(target: &[u8], dir: RawFd, name: &[u8]) -> io::Result<()> {
    let (t, c) = (cstr(target)?, cstr(name)?);
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir, c.as_ptr()) }).map(|_| ())
}

pub fn mknod_at(dir: RawFd, name: &[u8], mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::mknodat(dir, c.as_ptr(), mode as libc::mode_t, rdev as libc::dev_t) })
        .map(|_| ())
}

pub fn link_at(from_dir: RawFd, from: &[u8], to_dir: RawFd, to: &[u8]) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::linkat(from_dir, f.as_ptr(), to_dir, t.as_ptr(), 0) }).map(|_| ())
}

pub fn rename_at(dir: RawFd, from: &[u8], to: &[u8]) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::renameat(dir, f.as_ptr(), dir, t.as_ptr()) }).map(|_| ())
}

/// Removes `name` (a directory only if `dir_flag` and it is empty).
pub fn unlink_at(dir: RawFd, name: &[u8], dir_flag: bool) -> io::Result<()> {
    let c = cstr(name)?;
    let flags = if dir_flag { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::unlinkat(dir, c.as_ptr(), flags) }).map(|_| ())
}

/// Owner of `name` itself (not a symlink's target).
pub fn chown_at(dir: RawFd, name: &[u8], uid: u32, gid: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::fchownat(dir, c.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
        .map(|_| ())
}

/// A node just created in `dir` (by `mknodat` or `symlinkat`), pinned by an `O_PATH |
/// O_NOFOLLOW` descriptor so its metadata is changed on that inode and never through a name
/// another user could swap in the meantime (for a symlink to /etc/shadow, or a hard link to
/// it). Opening checks that the inode is of the type just created and has one link.
pub struct Node {
    fd: OwnedFd,
}

impl Node {
    /// Opens `name` in `dir`; `kind` is the expected `S_IFMT` bits.
    pub fn open_at(dir: RawFd, name: &[u8], kind: u32) -> io::Result<Node> {
        let c = cstr(name)?;
        // SAFETY: a NUL-terminated name and a directory fd the caller owns; the result is
        // checked and wrapped at once.
        let fd = check(unsafe {
            libc::openat(
                dir,
                c.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just returned by openat and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: fstat writes into a zeroed stat of the right type.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: the stat struct is valid for writes and the name (if any) NUL-terminated.
        check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
        if st.st_mode & libc::S_IFMT != kind || st.st_nlink != 1 {
            return Err(io::Error::other(
                "replaced while being restored (another user changed the target directory)",
            ));
        }
        Ok(Node { fd })
    }

    /// Owner of the pinned inode (`AT_EMPTY_PATH` on the descriptor).
    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: an empty NUL-terminated path with AT_EMPTY_PATH names the fd's own inode.
        check(unsafe {
            libc::fchownat(
                self.fd.as_raw_fd(),
                c"".as_ptr(),
                uid,
                gid,
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(|_| ())
    }

    /// Mode of the pinned inode (not a symlink: Linux cannot chmod one). `fchmod` refuses
    /// `O_PATH` descriptors, so this goes through the descriptor's `/proc/self/fd` entry, which
    /// resolves to the inode itself, not to a name; without /proc it fails (never falls back
    /// to the name).
    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        let path = cstr(format!("/proc/self/fd/{}", self.fd.as_raw_fd()).as_bytes())?;
        // SAFETY: a NUL-terminated path; fchmodat does not keep it.
        check(unsafe { libc::fchmodat(libc::AT_FDCWD, path.as_ptr(), mode as libc::mode_t, 0) })
            .map(|_| ())
    }
}

fn timespec(ns: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000) as libc::time_t,
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    }
}

/// Sets atime and mtime of `name` itself (not a symlink's target).
pub fn utimes_at(dir: RawFd, name: &[u8], mtime_ns: i64) -> io::Result<()> {
    let c = cstr(name)?;
    let t = [timespec(mtime_ns), timespec(mtime_ns)];
    // SAFETY: two timespecs, as the call expects; the name (if any) is NUL-terminated.
    check(unsafe { libc::utimensat(dir, c.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
        .map(|_| ())
}

pub fn futimes(fd: &impl AsRawFd, mtime_ns: i64) -> io::Result<()> {
    let t = [timespec(mtime_ns), timespec(mtime_ns)];
    // SAFETY: two timespecs, as the call expects; the name (if any) is NUL-terminated.
    check(unsafe { libc::futimens(fd.as_raw_fd(), t.as_ptr()) }).map(|_| ())
}

pub fn fchown(fd: &impl AsRawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(|_| ())
}

pub fn fchmod(fd: &impl AsRawFd, mode: u32) -> io::Result<()> {
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) }).map(|_| ())
}

pub fn fsetxattr(fd: &impl AsRawFd, name: &[u8], value: &[u8]) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: name NUL-terminated, value pointer and length from one slice.
    check(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            c.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(|_| ())
}

/// The extended attributes of `path` itself (not a symlink's target), sorted by name. A file
/// system without xattr support gives none.
pub fn list_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = cstr(path.as_os_str().as_bytes())?;
    let mut names = vec![0u8; 1024];
    let n = loop {
        // SAFETY: NUL-terminated path and name; at most the length passed is written.
        let r = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => {
                let need =
                    // SAFETY: NUL-terminated path and name; at most the length passed is written.
                    check_ssize(unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) })?;
                names.resize(need.max(names.len() * 2), 0);
            }
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let cn = cstr(name)?;
        let mut value = vec![0u8; 256];
        loop {
            // SAFETY: NUL-terminated path and name; at most the length passed is written.
            let r = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    cn.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            if r >= 0 {
                value.truncate(r as usize);
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) => {
                    // SAFETY: NUL-terminated path and name; at most the length passed is written.
                    let need = check_ssize(unsafe {
                        libc::lgetxattr(c.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0)
                    })?;
                    value.resize(need.max(value.len() * 2), 0);
                }
                // Removed between list and get.
                Some(libc::ENODATA) => {
                    value.clear();
                    break;
                }
                _ => return Err(e),
            }
        }
        out.push((name.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

/// Data regions (offset, length) of an open file by SEEK_DATA/SEEK_HOLE, or None when the file
/// system cannot tell (then the whole file is data).
pub fn data_regions(file: &std::fs::File, size: u64) -> Option<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on a descriptor the caller keeps open; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            return match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => Some(out),
                _ => None,
            };
        }
        // SAFETY: lseek on a descriptor the caller keeps open; no memory is passed.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        let end = (hole as u64).min(size);
        if end > data as u64 {
            out.push((data as u64, end - data as u64));
        }
        pos = hole;
    }
    Some(out)
}

/// User and group names by id, cached.
#[derive(Default)]
pub struct Names {
    users: std::collections::HashMap<u32, Vec<u8>>,
    groups: std::collections::HashMap<u32, Vec<u8>>,
}

impl Names {
    pub fn user(&mut self, uid: u32) -> Vec<u8> {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                let mut buf = vec![0 as libc::c_char; 4096];
                // SAFETY: an all-zero bit pattern is a valid value of this plain C struct.
                let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
                let mut res: *mut libc::passwd = std::ptr::null_mut();
                // SAFETY: the reentrant lookup writes only into the struct and `buf` (length passed).
                let r = unsafe {
                    libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut res)
                };
                if r == 0 && !res.is_null() {
                    // SAFETY: on success, a NUL-terminated string inside `buf`, which outlives this use.
                    unsafe { CStr::from_ptr(pw.pw_name) }.to_bytes().to_vec()
                } else {
                    Vec::new()
                }
            })
            .clone()
    }

    pub fn group(&mut self, gid: u32) -> Vec<u8> {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                let mut buf = vec![0 as libc::c_char; 4096];
                // SAFETY: an all-zero bit pattern is a valid value of this plain C struct.
                let mut gr: libc::group = unsafe { std::mem::zeroed() };
                let mut res: *mut libc::group = std::ptr::null_mut();
                // SAFETY: the reentrant lookup writes only into the struct and `buf` (length passed).
                let r = unsafe {
                    libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut res)
                };
                if r == 0 && !res.is_null() {
                    // SAFETY: on success, a NUL-terminated string inside `buf`, which outlives this use.
                    unsafe { CStr::from_ptr(gr.gr_name) }.to_bytes().to_vec()
                } else {
                    Vec::new()
                }
            })
            .clone()
    }
}

/// Display form of a raw path (lossy for non-UTF-8 bytes).
pub fn show(path: &[u8]) -> String {
    Path::new(OsStr::from_bytes(path)).display().to_string()
}
