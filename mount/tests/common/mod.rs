//! What every file-system reader's test shares: a fixture tree with the cases that trip readers,
//! and an entry-by-entry comparison of a [`FileSystem`] with a directory the kernel (or another
//! reference driver) shows.
#![allow(dead_code, unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use mount::filesystem::{FileSystem, Kind};

pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

pub fn set_times(path: &Path, secs: i64, nanos: i64) {
    let c = cstr(path);
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    };
    // SAFETY: valid C string and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", path.display());
}

pub fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let (c, n) = (cstr(path), CString::new(name).unwrap());
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// The extended attributes of `path` (not following a symlink), sorted by name; and
/// `system.ntfs_acl`, which ntfs-3g gives by name without listing it.
pub fn xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = cstr(path);
    let mut names = vec![0u8; 1 << 16];
    // SAFETY: valid C string and a buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "listxattr {}", path.display());
    let get = |name: &[u8]| -> Option<Vec<u8>> {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 1 << 16];
        // SAFETY: valid C strings and a buffer of the given length.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        (m >= 0).then(|| {
            v.truncate(m as usize);
            v
        })
    };
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let v = get(name).unwrap_or_else(|| panic!("getxattr {name:?} {}", path.display()));
        out.push((name.to_vec(), v));
    }
    let hidden = b"system.ntfs_acl";
    if !out.iter().any(|(n, _)| n == hidden) {
        out.extend(get(hidden).map(|v| (hidden.to_vec(), v)));
    }
    out.sort();
    out
}

/// A POSIX ACL in Linux's xattr form: user::rw-, user:`uid`:r--, group::r--, mask::r--,
/// other::---.
pub fn acl_with_user(uid: u32) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 4, uid),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// What the fixture tree holds, so tests can say which cases a file system could not take.
pub struct TreeOptions {
    /// Character and block devices, sockets, owners (needs root).
    pub special: bool,
    /// `user.` and `trusted.` attributes and an ACL (needs a kernel mount that takes them).
    pub xattrs: bool,
    /// Entries in the huge directory.
    pub huge: usize,
    /// Only what a prototype file (`mkfs.xfs -p`) can describe: no hard links, no sticky bit,
    /// no names with spaces.
    pub simple: bool,
    /// Names must be UTF-8 (NTFS stores UTF-16: ntfs-3g refuses other bytes).
    pub utf8_only: bool,
}

/// A tree with the cases that trip file-system readers: every file type, hard links, long and
/// non-UTF-8 names, attributes, sparse and big files, a deep and a huge directory, odd times.
pub fn fixture_tree(root: &Path, opts: &TreeOptions) {
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::write(root.join("small.txt"), b"hello, file systems\n").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("dir/mid.bin"), random(1, 200_000)).unwrap();
    fs::write(root.join("dir/big.bin"), random(2, 5 << 20)).unwrap();
    if !opts.simple {
        fs::hard_link(root.join("dir/big.bin"), root.join("big.link")).unwrap();
        fs::hard_link(root.join("small.txt"), root.join("dir/sub/small.2")).unwrap();
        fs::hard_link(root.join("small.txt"), root.join("small.3")).unwrap();
        fs::write(root.join("h\u{e9}llo w\u{f6}rld.txt"), b"unicode").unwrap();
        fs::set_permissions(root.join("dir/sub"), fs::Permissions::from_mode(0o1777)).unwrap();
    }
    // 1500 separate 4 KiB islands: more extents than fit in an inode.
    let f = File::create(root.join("islands.bin")).unwrap();
    for i in 0..1500u64 {
        f.write_all_at(&random(i + 10, 4096), i * 12288).unwrap();
    }
    f.write_all_at(b"end", 1500 * 12288 + 777).unwrap();
    let f = File::create(root.join("sparse.bin")).unwrap();
    f.write_all_at(b"tail", 40 << 20).unwrap();
    std::os::unix::fs::symlink("small.txt", root.join("short.lnk")).unwrap();
    let long = format!("dir/{}/../../small.txt", "x".repeat(200));
    std::os::unix::fs::symlink(long, root.join("long.lnk")).unwrap();
    let longest = format!("{}/end", "y/".repeat(500));
    std::os::unix::fs::symlink(longest, root.join("longest.lnk")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", root.join("dangling.lnk")).unwrap();
    fs::create_dir(root.join("many")).unwrap();
    for i in 0..opts.huge {
        fs::write(root.join(format!("many/file-{i:05}")), format!("{i}")).unwrap();
    }
    // Directories a little and somewhat larger than fit in an inode (XFS block and leaf form).
    for (dir, n) in [("medium", 60), ("leafy", 400)] {
        fs::create_dir(root.join(dir)).unwrap();
        for i in 0..n {
            fs::write(root.join(format!("{dir}/entry-number-{i:04}")), b"x").unwrap();
        }
    }
    fs::write(root.join("h\u{e9}llo-w\u{f6}rld.txt"), b"unicode").unwrap();
    if !opts.utf8_only {
        let latin1 = root.join(OsStr::from_bytes(b"latin1-\xe9t\xe9"));
        fs::write(latin1, b"not utf-8").unwrap();
    }
    fs::write(root.join("n".repeat(255)), b"longest name").unwrap();
    let mut deep = root.join("deep");
    for i in 0..40 {
        deep = deep.join(format!("level{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom"), b"deep down").unwrap();
    let c = cstr(&root.join("fifo"));
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0);
    fs::set_permissions(root.join("dir/mid.bin"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o600)).unwrap();
    if opts.special {
        for (name, kind, dev) in [
            ("null", libc::S_IFCHR, libc::makedev(1, 3)),
            ("loopy", libc::S_IFBLK, libc::makedev(7, 300)),
            ("bigdev", libc::S_IFCHR, libc::makedev(259, 262_143)),
        ] {
            let c = cstr(&root.join(name));
            // SAFETY: valid C string.
            assert_eq!(unsafe { libc::mknod(c.as_ptr(), kind | 0o640, dev) }, 0);
        }
        drop(std::os::unix::net::UnixListener::bind(root.join("socket")).unwrap());
        std::os::unix::fs::lchown(root.join("dir/mid.bin"), Some(1234), Some(70000)).unwrap();
        std::os::unix::fs::lchown(root.join("short.lnk"), Some(99), Some(98)).unwrap();
    }
    if opts.xattrs {
        set_xattr(&root.join("small.txt"), "user.note", b"a short value");
        set_xattr(&root.join("dir"), "user.empty", b"");
        set_xattr(&root.join("dir/mid.bin"), "trusted.big", &random(3, 3000));
        // More than an XFS inode holds (a leaf block), within what ext4's block and a
        // 1 KiB inode hold together.
        for i in 0..30 {
            let name = format!("user.many-{i:02}-{}", "z".repeat(40));
            set_xattr(&root.join("dir/big.bin"), &name, &random(i, 60));
        }
        set_xattr(&root.join("dir/sub"), "user.huge", &random(4, 60_000));
        set_xattr(
            &root.join("empty"),
            "system.posix_acl_access",
            &acl_with_user(1234),
        );
    }
    set_times(&root.join("small.txt"), 1_500_000_000, 123_456_789);
    set_times(&root.join("dir/big.bin"), -300_000_000, 5);
    set_times(&root.join("empty"), 4_200_000_000, 999_999_999);
    set_times(&root.join("long.lnk"), 1_700_000_000, 1);
}

/// Every path under `root` (not following symlinks), sorted, `lost+found` left out.
pub fn walkdir(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p == root.join("lost+found") {
                continue;
            }
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Every path of `fs` (relative, the root as "") with its inode number, by walking from the
/// root.
pub fn walk_fs(fs: &dyn FileSystem) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(PathBuf::new(), fs.root())];
    while let Some((path, ino)) = stack.pop() {
        out.insert(path.clone(), ino);
        if fs.attr(ino).unwrap().kind != Kind::Dir {
            continue;
        }
        for e in fs.read_dir(ino).unwrap() {
            if path.as_os_str().is_empty() && e.name == b"lost+found" {
                continue;
            }
            let name = OsStr::from_bytes(&e.name);
            let kind = fs.attr(e.ino).unwrap().kind;
            if let Some(k) = e.kind {
                assert_eq!(k, kind, "entry type of {}", path.join(name).display());
            }
            stack.push((path.join(name), e.ino));
        }
    }
    out
}

/// What to compare beyond type, mode, owners, links, size, mtime, content, targets.
pub struct Exact {
    /// ctime, atime and creation time as the kernel shows them.
    pub kernel: bool,
    /// Inode numbers as the kernel shows them (btrfs numbers each subvolume's inodes anew).
    pub inos: bool,
    /// Block counts as the kernel shows them.
    pub blocks: bool,
    /// Link counts (file systems without hard links show their own convention).
    pub nlink: bool,
    pub xattrs: bool,
    pub rdev: bool,
}

fn read_all(fs: &Arc<dyn FileSystem>, ino: u64) -> Vec<u8> {
    let f = fs.clone().open(ino).unwrap();
    let mut out = Vec::new();
    // Odd piece sizes so reads cross extent and block boundaries.
    while (out.len() as u64) < f.size() {
        let n = (f.size() - out.len() as u64).min(100_003) as usize;
        f.read_append(out.len() as u64, n, &mut out).unwrap();
    }
    out
}

/// Compares `fs` entry by entry with the tree at `root`; returns how many entries matched.
pub fn compare(fs: &Arc<dyn FileSystem>, root: &Path, exact: &Exact) -> usize {
    let nodes = walk_fs(fs.as_ref());
    let paths = walkdir(root);
    let mut seen = 0;
    for entry in &paths {
        let rel = entry.strip_prefix(root).unwrap().to_path_buf();
        let what = rel.display();
        let &ino = nodes
            .get(&rel)
            .unwrap_or_else(|| panic!("{what} missing from the reader's view"));
        let m = fs::symlink_metadata(entry).unwrap();
        let a = fs.attr(ino).unwrap();
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = match () {
            _ if ft.is_dir() => Kind::Dir,
            _ if ft.is_symlink() => Kind::Symlink,
            _ if ft.is_file() => Kind::File,
            _ if ft.is_char_device() => Kind::CharDevice,
            _ if ft.is_block_device() => Kind::BlockDevice,
            _ if ft.is_fifo() => Kind::Fifo,
            _ => Kind::Socket,
        };
        assert_eq!(a.kind, kind, "type of {what}");
        assert_eq!(a.perm as u32, m.mode() & 0o7777, "mode of {what}");
        assert_eq!((a.uid, a.gid), (m.uid(), m.gid()), "owner of {what}");
        if exact.nlink {
            assert_eq!(a.nlink as u64, m.nlink(), "links of {what}");
        }
        assert_eq!(a.mtime, m.modified().unwrap(), "mtime of {what}");
        if !m.is_dir() || exact.kernel {
            assert_eq!(a.size, m.len(), "size of {what}");
        }
        if exact.rdev && (ft.is_char_device() || ft.is_block_device()) {
            assert_eq!(a.rdev as u64, m.rdev(), "rdev of {what}");
        }
        if ft.is_symlink() {
            let target = fs::read_link(entry).unwrap();
            assert_eq!(
                fs.read_link(ino).unwrap(),
                target.as_os_str().as_bytes(),
                "target of {what}"
            );
        }
        if ft.is_file() {
            assert!(
                read_all(fs, ino) == fs::read(entry).unwrap(),
                "content of {what}"
            );
        }
        if exact.kernel {
            if exact.inos {
                assert_eq!(ino, m.ino(), "inode number of {what}");
            }
            assert_eq!(
                a.ctime,
                std::time::UNIX_EPOCH
                    + std::time::Duration::new(m.ctime() as u64, m.ctime_nsec() as u32),
                "ctime of {what}"
            );
            assert_eq!(a.atime, m.accessed().unwrap(), "atime of {what}");
            if let Ok(born) = m.created() {
                assert_eq!(a.crtime, born, "creation time of {what}");
            }
        }
        if exact.blocks {
            assert_eq!(a.blocks, m.blocks(), "blocks of {what}");
        }
        if exact.xattrs {
            let mut got = fs.xattrs(ino).unwrap();
            got.sort();
            assert_eq!(got, xattrs(entry), "attributes of {what}");
        }
        seen += 1;
    }
    assert_eq!(
        seen + 1,
        nodes.len(),
        "entry count (the reader also has the root)"
    );
    seen
}

/// Mounts with `mount` (the command and its arguments, `mnt` last), compares `fs` with what
/// it shows, unmounts (also when the comparison fails); returns the entries compared.
pub fn compare_mounted(
    fs: &Arc<dyn FileSystem>,
    mount: &[&str],
    mnt: &Path,
    exact: &Exact,
) -> usize {
    run(mount[0], &mount[1..]);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compare(fs, mnt, exact)));
    run("umount", &[mnt.to_str().unwrap()]);
    result.unwrap()
}

/// Every file-system fuzz target's seeds (`fuzz/seeds/<target>`) and the crafted inputs found
/// for it (`fixtures/hostile/<target>-*`), opened by `open` and walked within the fuzz walk's
/// limits; returns how many opened.
pub fn walk_fuzz_inputs(
    target: &str,
    open: &dyn Fn(mount::filesystem::SparseImage) -> Option<Arc<dyn FileSystem>>,
) -> usize {
    use mount::filesystem::{walk, SparseImage, WalkLimits};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut opened = 0;
    let hostile = format!("{target}-");
    for (d, prefix) in [
        (format!("fuzz/seeds/{target}"), ""),
        ("fixtures/hostile".to_string(), hostile.as_str()),
    ] {
        for e in fs::read_dir(root.join(d)).unwrap() {
            let p = e.unwrap().path();
            if !p.file_name().unwrap().to_str().unwrap().starts_with(prefix) {
                continue;
            }
            let started = std::time::Instant::now();
            if let Some(fs) = open(SparseImage::parse(&fs::read(&p).unwrap(), 1 << 30)) {
                assert!(walk(&fs, WalkLimits::default()) > 0, "{}", p.display());
                opened += 1;
            }
            assert!(
                started.elapsed().as_secs() < 10,
                "{} took too long",
                p.display()
            );
        }
    }
    opened
}
