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
pub(crate) fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
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
pub(crate) fn open_dir_at(dir: RawFd, name: &[u8]) -> io::Result<OwnedFd> {
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
pub(crate) fn create_excl_at(dir: RawFd, name: &[u8]) -> io::Result<std::fs::File> {
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

/// An `O_PATH` handle on `path` (following symlinks only if `follow`): a name pinned to its
/// inode, for `fstat` (`File::metadata`), [`read_link`], [`list_xattrs`] and as the base of
/// `*at` calls; it cannot read data.
pub(crate) fn open_path(path: &Path, follow: bool) -> io::Result<std::fs::File> {
    let c = cstr(path.as_os_str().as_bytes())?;
    let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
    // SAFETY: a NUL-terminated path from `cstr`; the result is checked before use.
    let fd = check(unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | nofollow) })?;
    // SAFETY: the fd was just returned by a successful syscall; nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// An `O_PATH` handle on entry `name` of directory `dir` itself (a symlink is not followed).
pub(crate) fn open_path_at(dir: RawFd, name: &[u8]) -> io::Result<std::fs::File> {
    let c = cstr(name)?;
    // SAFETY: a NUL-terminated name and a directory fd the caller owns; checked before use.
    let fd = check(unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: the fd was just returned by a successful syscall; nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// The `/proc/self/fd` entry of `fd`: opening it reaches the descriptor's own inode, never a
/// name (how `O_PATH` handles are listed, read for xattrs or re-opened).
fn proc_fd(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// The names in directory `dir` (an `O_PATH` or open directory handle), without `.` and `..`,
/// unsorted. Read through the handle's `/proc/self/fd` entry, so it is that directory even if
/// its path now leads elsewhere.
pub(crate) fn list_dir(dir: &impl AsRawFd) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for d in std::fs::read_dir(proc_fd(dir))? {
        names.push(d?.file_name().as_bytes().to_vec());
    }
    Ok(names)
}

/// The target of the symlink `link` (an `O_PATH | O_NOFOLLOW` handle on it).
pub(crate) fn read_link(link: &impl AsRawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: an empty NUL-terminated path names the fd's own inode (readlinkat(2)); at
        // most `buf.len()` bytes are written.
        let n = check_ssize(unsafe {
            libc::readlinkat(
                link.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        })?;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        if buf.len() >= 1 << 16 {
            return Err(io::Error::other("symlink target over 64 KiB"));
        }
        buf.resize(buf.len() * 4, 0);
    }
}

/// The kernel's `struct open_how` (openat2(2)); defined here because the libc crate gates its own.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// An `O_PATH` handle on `rel` (a relative path, `/`-separated) under directory `dir`, with no
/// symlink anywhere on the way and never leaving `dir`: what is reached is the node at that
/// place in the tree `dir` holds, not something a swapped directory points to, and nothing is
/// opened (a device node or FIFO put there is not touched: check its type, then
/// [`reopen_read`]). ELOOP when a component is a symlink. `openat2(RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS)` where the kernel has it (5.6), else the same walk one
/// `openat(O_NOFOLLOW)` per component.
pub(crate) fn open_path_beneath(dir: RawFd, rel: &[u8]) -> io::Result<std::fs::File> {
    let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    match openat2_beneath(dir, rel, flags) {
        // No openat2 (a kernel before 5.6, or a seccomp filter refusing it), or a path longer
        // than PATH_MAX, which one component at a time never is.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOSYS | libc::EPERM | libc::ENAMETOOLONG)
            ) =>
        {
            open_beneath_by_hand(dir, rel, flags)
        }
        r => r,
    }
}

/// Opens the node `handle` holds (an `O_PATH` handle) for reading, through its
/// `/proc/self/fd` entry: that inode, whatever its path leads to now. O_NOATIME when allowed;
/// O_NONBLOCK so that no open blocks.
pub(crate) fn reopen_read(handle: &impl AsRawFd) -> io::Result<std::fs::File> {
    let c = cstr(proc_fd(handle).as_bytes())?;
    let flags = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: a NUL-terminated path from `cstr`; the result is checked before use.
    let mut fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_NOATIME) };
    if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
        // SAFETY: as above.
        fd = unsafe { libc::open(c.as_ptr(), flags) };
    }
    check(fd)?;
    // SAFETY: the fd was just returned by a successful syscall; nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Raises this process's soft limit on open descriptors to `want` (never above the hard limit,
/// never lowering it). Best effort: the limit stays as it was if the call fails.
pub(crate) fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct, which `lim` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let target = (want as libc::rlim_t).min(lim.rlim_max);
    if target > lim.rlim_cur {
        lim.rlim_cur = target;
        // SAFETY: setrlimit reads one rlimit struct; a failure changes nothing.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// Most symlinks followed while resolving one path (the kernel's limit).
const MAX_SYMLINK_HOPS: u32 = 40;

/// Opens directory `path` (absolute) one component at a time from `/`, following a symlink
/// only if it is trusted: owned by root, in a directory owned by root that no one else may
/// write (`/var/run -> /run`, not a link in /tmp or in a user's home). Returns the handle of
/// each component of `path` (the directory it resolves to), `/` first: where a backup's source
/// is, resolved so that no other user can redirect it.
pub(crate) fn open_dir_trusted(path: &Path) -> io::Result<Vec<std::fs::File>> {
    let mut hops = 0;
    let mut out = vec![open_path(Path::new("/"), false)?];
    for c in path.components() {
        match c {
            std::path::Component::Normal(name) => {
                let cur = out.last().expect("starts with /");
                let next = step_trusted(cur, name.as_bytes(), &mut hops)?;
                out.push(next);
            }
            std::path::Component::RootDir => {}
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
    Ok(out)
}

/// Entry `name` of directory `cur` as a directory, through trusted symlinks only.
fn step_trusted(cur: &std::fs::File, name: &[u8], hops: &mut u32) -> io::Result<std::fs::File> {
    let h = open_path_at(cur.as_raw_fd(), name)?;
    let md = h.metadata()?;
    if md.is_dir() {
        return Ok(h);
    }
    if !md.file_type().is_symlink() {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    *hops += 1;
    if *hops > MAX_SYMLINK_HOPS {
        return Err(io::Error::from_raw_os_error(libc::ELOOP));
    }
    use std::os::unix::fs::MetadataExt;
    let dir = cur.metadata()?;
    if md.uid() != 0 || dir.uid() != 0 || dir.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "{} is a symlink another user can change (link owned by uid {}, in a directory \
             owned by uid {}, mode {:o}): name the directory it leads to instead",
            show(name),
            md.uid(),
            dir.uid(),
            dir.mode() & 0o7777
        )));
    }
    let target = read_link(&h)?;
    let mut at = if target.first() == Some(&b'/') {
        open_path(Path::new("/"), false)?
    } else {
        cur.try_clone()?
    };
    for part in target
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
    {
        at = if part == b".." {
            open_path_at(at.as_raw_fd(), b"..")?
        } else {
            step_trusted(&at, part, hops)?
        };
    }
    Ok(at)
}

fn openat2_beneath(dir: RawFd, rel: &[u8], flags: libc::c_int) -> io::Result<std::fs::File> {
    let c = cstr(rel)?;
    let how = OpenHow {
        flags: flags as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads a NUL-terminated path and an open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    let fd = check(fd as libc::c_int)?;
    // SAFETY: the fd was just returned by a successful syscall; nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

fn open_beneath_by_hand(dir: RawFd, rel: &[u8], flags: libc::c_int) -> io::Result<std::fs::File> {
    let parts: Vec<&[u8]> = rel
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty())
        .collect();
    let Some((last, dirs)) = parts.split_last() else {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    };
    // What RESOLVE_BENEATH refuses: a way out of `dir`.
    if rel.first() == Some(&b'/') || parts.iter().any(|p| *p == b"..") {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    let mut held: Option<OwnedFd> = None;
    for part in dirs {
        let base = held.as_ref().map_or(dir, |f| f.as_raw_fd());
        let fd = open_path_at(base, part)?;
        let kind = fd.metadata()?.file_type();
        if kind.is_symlink() {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        if !kind.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        held = Some(fd.into());
    }
    let base = held.as_ref().map_or(dir, |f| f.as_raw_fd());
    let c = cstr(last)?;
    // SAFETY: a NUL-terminated name and a directory fd owned here or by the caller.
    let fd = check(unsafe { libc::openat(base, c.as_ptr(), flags) })?;
    // SAFETY: the fd was just returned by a successful syscall; nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// lstat-like `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; `None` when it does not exist.
pub(crate) fn stat_at(dir: RawFd, name: &[u8]) -> io::Result<Option<libc::stat>> {
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

pub(crate) fn mkdir_at(dir: RawFd, name: &[u8], mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::mkdirat(dir, c.as_ptr(), mode as libc::mode_t) }).map(|_| ())
}

pub(crate) fn symlink_at(target: &[u8], dir: RawFd, name: &[u8]) -> io::Result<()> {
    let (t, c) = (cstr(target)?, cstr(name)?);
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir, c.as_ptr()) }).map(|_| ())
}

pub(crate) fn mknod_at(dir: RawFd, name: &[u8], mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::mknodat(dir, c.as_ptr(), mode as libc::mode_t, rdev as libc::dev_t) })
        .map(|_| ())
}

pub(crate) fn link_at(from_dir: RawFd, from: &[u8], to_dir: RawFd, to: &[u8]) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::linkat(from_dir, f.as_ptr(), to_dir, t.as_ptr(), 0) }).map(|_| ())
}

pub(crate) fn rename_at(dir: RawFd, from: &[u8], to: &[u8]) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::renameat(dir, f.as_ptr(), dir, t.as_ptr()) }).map(|_| ())
}

/// Removes `name` (a directory only if `dir_flag` and it is empty).
pub(crate) fn unlink_at(dir: RawFd, name: &[u8], dir_flag: bool) -> io::Result<()> {
    let c = cstr(name)?;
    let flags = if dir_flag { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::unlinkat(dir, c.as_ptr(), flags) }).map(|_| ())
}

/// A node just created in `dir` (by `mknodat` or `symlinkat`), pinned by an `O_PATH |
/// O_NOFOLLOW` descriptor so its metadata is changed on that inode and never through a name
/// another user could swap in the meantime (for a symlink to /etc/shadow, or a hard link to
/// it). Opening checks that the inode is of the type just created and has one link.
pub(crate) struct Node {
    fd: OwnedFd,
}

impl Node {
    /// Opens `name` in `dir`; `kind` is the expected `S_IFMT` bits.
    pub(crate) fn open_at(dir: RawFd, name: &[u8], kind: u32) -> io::Result<Node> {
        let fd: OwnedFd = open_path_at(dir, name)?.into();
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
    pub(crate) fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
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
    pub(crate) fn chmod(&self, mode: u32) -> io::Result<()> {
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
pub(crate) fn utimes_at(dir: RawFd, name: &[u8], mtime_ns: i64) -> io::Result<()> {
    let c = cstr(name)?;
    let t = [timespec(mtime_ns), timespec(mtime_ns)];
    // SAFETY: two timespecs, as the call expects; the name (if any) is NUL-terminated.
    check(unsafe { libc::utimensat(dir, c.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
        .map(|_| ())
}

pub(crate) fn futimes(fd: &impl AsRawFd, mtime_ns: i64) -> io::Result<()> {
    let t = [timespec(mtime_ns), timespec(mtime_ns)];
    // SAFETY: two timespecs, as the call expects; the name (if any) is NUL-terminated.
    check(unsafe { libc::futimens(fd.as_raw_fd(), t.as_ptr()) }).map(|_| ())
}

pub(crate) fn fchown(fd: &impl AsRawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(|_| ())
}

pub(crate) fn fchmod(fd: &impl AsRawFd, mode: u32) -> io::Result<()> {
    // SAFETY: NUL-terminated names from `cstr`, descriptors the caller owns; nothing is kept.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) }).map(|_| ())
}

pub(crate) fn fsetxattr(fd: &impl AsRawFd, name: &[u8], value: &[u8]) -> io::Result<()> {
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

/// The extended attributes of the inode `node` holds (an `O_PATH` handle: a symlink's own
/// when it is one), sorted by name. Read through the handle's `/proc/self/fd` entry, which
/// resolves to that inode and no further. A file system without xattr support gives none.
pub(crate) fn list_xattrs(node: &impl AsRawFd) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = cstr(proc_fd(node).as_bytes())?;
    let mut names = vec![0u8; 1024];
    let n = loop {
        // SAFETY: NUL-terminated path and name; at most the length passed is written.
        let r = unsafe { libc::listxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => {
                let need =
                    // SAFETY: NUL-terminated path and name; at most the length passed is written.
                    check_ssize(unsafe { libc::listxattr(c.as_ptr(), std::ptr::null_mut(), 0) })?;
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
        let value = loop {
            // SAFETY: NUL-terminated path and name; at most the length passed is written.
            let r = unsafe {
                libc::getxattr(
                    c.as_ptr(),
                    cn.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            if r >= 0 {
                value.truncate(r as usize);
                break Some(value);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) => {
                    // SAFETY: NUL-terminated path and name; at most the length passed is written.
                    let need = check_ssize(unsafe {
                        libc::getxattr(c.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0)
                    })?;
                    value.resize(need.max(value.len() * 2), 0);
                }
                // Removed between list and get: not recorded (an empty value would be
                // restored as one).
                Some(libc::ENODATA) => break None,
                _ => return Err(e),
            }
        };
        if let Some(value) = value {
            out.push((name.to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

/// Data regions (offset, length) of an open file by SEEK_DATA/SEEK_HOLE, or None when the file
/// system cannot tell (then the whole file is data).
pub(crate) fn data_regions(file: &std::fs::File, size: u64) -> Option<Vec<(u64, u64)>> {
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
pub(crate) struct Names {
    users: std::collections::HashMap<u32, Vec<u8>>,
    groups: std::collections::HashMap<u32, Vec<u8>>,
}

impl Names {
    pub(crate) fn user(&mut self, uid: u32) -> Vec<u8> {
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

    pub(crate) fn group(&mut self, gid: u32) -> Vec<u8> {
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
pub(crate) fn show(path: &[u8]) -> String {
    Path::new(OsStr::from_bytes(path)).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Both ways of opening beneath a directory (openat2, and the walk by hand used where the
    /// kernel has no openat2) agree: the file at the place, never through a symlink or `..`.
    #[test]
    fn opening_beneath_follows_no_symlink_and_never_leaves_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("top");
        std::fs::create_dir_all(top.join("a/b")).unwrap();
        std::fs::write(top.join("a/b/f"), b"inside").unwrap();
        std::fs::write(tmp.path().join("outside"), b"outside").unwrap();
        std::os::unix::fs::symlink(top.join("a"), top.join("link")).unwrap();
        std::os::unix::fs::symlink(top.join("a/b/f"), top.join("a/flink")).unwrap();
        let dir = open_path(&top, true).unwrap();
        let errno = |r: io::Result<std::fs::File>| r.err().and_then(|e| e.raw_os_error());
        let by_hand = |rel: &[u8]| {
            open_beneath_by_hand(dir.as_raw_fd(), rel, libc::O_PATH | libc::O_NOFOLLOW)
        };
        for open in [
            &(|rel: &[u8]| open_path_beneath(dir.as_raw_fd(), rel)) as &dyn Fn(&[u8]) -> _,
            &by_hand,
        ] {
            let f = reopen_read(&open(b"a/b/f").unwrap()).unwrap();
            assert_eq!(std::io::read_to_string(f).unwrap(), "inside");
            assert_eq!(errno(open(b"link/b/f")), Some(libc::ELOOP));
            // A final symlink is the link itself (O_PATH | O_NOFOLLOW), never its target.
            let link = open(b"a/flink").unwrap().metadata().unwrap();
            assert!(link.file_type().is_symlink());
            assert_eq!(errno(open(b"../outside")), Some(libc::EXDEV));
            assert_eq!(errno(open(b"a/missing")), Some(libc::ENOENT));
        }
    }

    /// A source's directory is reached through root's symlinks in root's directories only.
    #[test]
    fn trusted_resolution_follows_only_symlinks_no_one_else_controls() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let (real, link) = (tmp.path().join("real"), tmp.path().join("link"));
        std::fs::create_dir_all(real.join("sub")).unwrap();
        std::os::unix::fs::symlink("real", &link).unwrap();
        let ino = std::fs::metadata(real.join("sub")).unwrap().ino();
        let trusted =
            |p: &Path| open_dir_trusted(p).map(|h| h.last().unwrap().metadata().unwrap().ino());
        assert_eq!(trusted(&real.join("sub")).unwrap(), ino);
        let handles = open_dir_trusted(&link.join("sub")).unwrap();
        assert_eq!(handles.len(), link.join("sub").components().count());
        if tmp.path().metadata().unwrap().uid() == 0 {
            // Root's link in root's private directory: followed.
            assert_eq!(trusted(&link.join("sub")).unwrap(), ino);
            // The same link in a directory others may write: refused.
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
            let err = trusted(&link.join("sub")).unwrap_err();
            assert!(err.to_string().contains("another user can change"), "{err}");
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
            // Another user's link: refused.
            let c = cstr(link.as_os_str().as_bytes()).unwrap();
            // SAFETY: a NUL-terminated path; lchown does not keep it.
            assert_eq!(unsafe { libc::lchown(c.as_ptr(), 1000, 1000) }, 0);
            assert!(trusted(&link.join("sub")).is_err());
        }
        assert!(trusted(&real.join("missing")).is_err());
    }

    #[test]
    fn handles_list_read_links_and_xattrs_of_the_inode_itself() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), b"x").unwrap();
        std::os::unix::fs::symlink("f", tmp.path().join("l")).unwrap();
        let dir = open_path(tmp.path(), true).unwrap();
        let mut names = list_dir(&dir).unwrap();
        names.sort();
        assert_eq!(names, [b"f".to_vec(), b"l".to_vec()]);
        let link = open_path_at(dir.as_raw_fd(), b"l").unwrap();
        assert!(link.metadata().unwrap().file_type().is_symlink());
        assert_eq!(read_link(&link).unwrap(), b"f");
        let file = open_path_at(dir.as_raw_fd(), b"f").unwrap();
        assert!(read_link(&file).is_err());
        // A user xattr where the file system has them (tmpfs since 6.6, ext4, xfs).
        let path = cstr(tmp.path().join("f").as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated path and name; the value is a 2-byte slice.
        let set = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"user.t".as_ptr(),
                b"v1".as_ptr().cast(),
                2,
                0,
            )
        };
        if set == 0 {
            assert_eq!(
                list_xattrs(&file).unwrap(),
                [(b"user.t".to_vec(), b"v1".to_vec())]
            );
        }
        assert!(list_xattrs(&link).unwrap().is_empty());
    }
}
