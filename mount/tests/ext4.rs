//! The user-space ext reader against images made by `mkfs.ext4 -d` (several layouts), checked
//! against the source tree and, when running as root, against the kernel's own ext4 driver on a
//! read-only loop mount of the same image.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mount::ext4::{Data, Ext4, Inode, Kind};

mod common;
use common::{is_root, random, run, set_times, walkdir};

/// A tree with the cases that trip file-system readers.
#[allow(unsafe_code)]
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::write(root.join("small.txt"), b"hello, ext4\n").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("dir/mid.bin"), random(1, 200_000)).unwrap();
    fs::write(root.join("dir/big.bin"), random(2, 5 << 20)).unwrap();
    fs::hard_link(root.join("dir/big.bin"), root.join("big.link")).unwrap();
    fs::hard_link(root.join("small.txt"), root.join("dir/sub/small.2")).unwrap();
    fs::hard_link(root.join("small.txt"), root.join("small.3")).unwrap();
    // 1500 separate 4 KiB islands: more extents than fit in one level of index blocks.
    let f = File::create(root.join("islands.bin")).unwrap();
    for i in 0..1500u64 {
        f.write_all_at(&random(i + 10, 4096), i * 12288).unwrap();
    }
    // Ends in data: mkfs.ext4 -d with inline_data (1.47) drops a trailing hole from the size.
    f.write_all_at(b"end", 1500 * 12288 + 777).unwrap();
    let f = File::create(root.join("sparse.bin")).unwrap();
    f.write_all_at(b"tail", 40 << 20).unwrap();
    std::os::unix::fs::symlink("small.txt", root.join("short.lnk")).unwrap();
    let long = format!("dir/{}/../../small.txt", "x".repeat(90));
    std::os::unix::fs::symlink(long, root.join("long.lnk")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", root.join("dangling.lnk")).unwrap();
    fs::create_dir(root.join("many")).unwrap();
    for i in 0..3000 {
        fs::write(root.join(format!("many/file-{i:05}")), format!("{i}")).unwrap();
    }
    fs::write(root.join("h\u{e9}llo w\u{f6}rld.txt"), b"unicode").unwrap();
    let c = CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0);
    fs::set_permissions(root.join("dir/mid.bin"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("dir/sub"), fs::Permissions::from_mode(0o1777)).unwrap();
    if is_root() {
        std::os::unix::fs::lchown(root.join("dir/mid.bin"), Some(1234), Some(70000)).unwrap();
        std::os::unix::fs::lchown(root.join("short.lnk"), Some(99), Some(98)).unwrap();
    }
    set_times(&root.join("small.txt"), 1_500_000_000, 123_456_789);
    set_times(&root.join("dir/big.bin"), -300_000_000, 5);
}

/// Everything the reader knows about a path.
#[derive(Debug)]
struct Node {
    inode: Inode,
    link: Option<Vec<u8>>,
    content: Option<Vec<u8>>,
}

fn walk(fs: &Ext4<File>, ino: u32, path: PathBuf, out: &mut BTreeMap<PathBuf, Node>) {
    let inode = fs.inode(ino).unwrap();
    let (mut link, mut content) = (None, None);
    match inode.kind().unwrap() {
        Kind::Dir => {
            for e in fs.read_dir(&inode).unwrap() {
                if e.name == b"lost+found" {
                    continue;
                }
                let name = std::ffi::OsStr::from_bytes(&e.name);
                walk(fs, e.ino, path.join(name), out);
            }
        }
        Kind::Symlink => link = Some(fs.read_link(&inode).unwrap()),
        Kind::File => {
            let data = fs.data(&inode).unwrap();
            let mut buf = vec![0u8; inode.size as usize];
            // Read in odd pieces so runs cross extent and block boundaries.
            let mut at = 0;
            while at < buf.len() {
                let n = (buf.len() - at).min(100_003);
                fs.read(&data, at as u64, &mut buf[at..at + n]).unwrap();
                at += n;
            }
            if let Data::Extents(e) = &data {
                assert!(e
                    .windows(2)
                    .all(|w| w[0].logical + w[0].len <= w[1].logical));
            }
            content = Some(buf);
        }
        _ => {}
    }
    out.insert(
        path,
        Node {
            inode,
            link,
            content,
        },
    );
}

fn read_image(img: &Path) -> (Ext4<File>, BTreeMap<PathBuf, Node>) {
    let size = fs::metadata(img).unwrap().len();
    let fs = Ext4::open(File::open(img).unwrap(), size).unwrap().unwrap();
    let mut nodes = BTreeMap::new();
    walk(&fs, fs.root(), PathBuf::new(), &mut nodes);
    (fs, nodes)
}

/// Compares what the reader shows with a directory tree of the same content (the source, or
/// the kernel's mount of the image). `exact` also compares inode numbers, ctimes and block counts.
fn compare(nodes: &BTreeMap<PathBuf, Node>, root: &Path, exact: bool) {
    let mut seen = 0;
    for entry in walkdir(root) {
        let rel = entry.strip_prefix(root).unwrap().to_path_buf();
        if rel.starts_with("lost+found") {
            continue;
        }
        seen += 1;
        let m = fs::symlink_metadata(&entry).unwrap();
        let n = nodes
            .get(&rel)
            .unwrap_or_else(|| panic!("{} missing from the reader's view", rel.display()));
        let i = &n.inode;
        let what = rel.display();
        assert_eq!(i.mode as u32, m.mode(), "mode of {what}");
        assert_eq!((i.uid, i.gid), (m.uid(), m.gid()), "owner of {what}");
        assert_eq!(i.links as u64, m.nlink(), "links of {what}");
        assert_eq!(i.mtime.secs, m.mtime(), "mtime of {what}");
        if !m.is_dir() {
            assert_eq!(i.size, m.len(), "size of {what}");
        }
        if m.file_type().is_symlink() {
            let target = fs::read_link(&entry).unwrap();
            assert_eq!(
                n.link.as_deref(),
                Some(target.as_os_str().as_bytes()),
                "target of {what}"
            );
        }
        if m.is_file() {
            assert!(
                n.content.as_deref() == Some(&fs::read(&entry).unwrap()[..]),
                "content of {what}"
            );
        }
        if exact {
            // mkfs.ext4 -d (1.47) keeps whole seconds only; the kernel shows what is stored.
            assert_eq!(i.mtime.nanos as i64, m.mtime_nsec(), "mtime ns of {what}");
            assert_eq!(i.ino as u64, m.ino(), "inode number of {what}");
            assert_eq!(
                (i.ctime.secs, i.ctime.nanos as i64),
                (m.ctime(), m.ctime_nsec()),
                "ctime of {what}"
            );
            assert_eq!(
                (i.atime.secs, i.atime.nanos as i64),
                (m.atime(), m.atime_nsec()),
                "atime of {what}"
            );
            assert_eq!(i.blocks, m.blocks(), "blocks of {what}");
        }
    }
    assert_eq!(
        seen + 1,
        nodes.len(),
        "entry count (the reader also has the root)"
    );
}

/// `mkfs.ext4 -q -F [extra] -d src img` on a fresh image of `size` bytes.
fn mkfs_from(src: &Path, img: &Path, size: u64, extra: &[&str]) {
    File::create(img).unwrap().set_len(size).unwrap();
    let mut args = vec!["-q", "-F"];
    args.extend_from_slice(extra);
    args.extend(["-d", src.to_str().unwrap(), img.to_str().unwrap()]);
    run("mkfs.ext4", &args);
}

fn check_layout(name: &str, mkfs_args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    make_tree(&src);
    let img = dir.path().join(format!("{name}.img"));
    mkfs_from(&src, &img, 96 << 20, mkfs_args);
    let (fs, nodes) = read_image(&img);
    compare(&nodes, &src, false);
    let islands = &nodes[Path::new("islands.bin")];
    assert!(
        islands.inode.blocks < 1500 * 8 + 200,
        "{name}: islands.bin is sparse"
    );
    let sparse = nodes[Path::new("sparse.bin")].content.as_ref().unwrap();
    assert!(sparse[..40 << 20].iter().all(|&b| b == 0) && &sparse[40 << 20..] == b"tail");
    assert!(fs.block_size() >= 1024);
    if is_root() {
        // Timestamps mkfs does not write (nanoseconds, after 2038, before 1970) set through
        // the kernel, then everything compared with the kernel's view.
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        run(
            "mount",
            &["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
        );
        set_times(&mnt.join("empty"), 4_200_000_000, 999_999_999);
        set_times(&mnt.join("small.txt"), 1_500_000_000, 123_456_789);
        set_times(&mnt.join("dir/big.bin"), -300_000_000, 5);
        set_times(&mnt.join("long.lnk"), 1_700_000_000, 1);
        run("umount", &[mnt.to_str().unwrap()]);
        let (_, nodes) = read_image(&img);
        run(
            "mount",
            &[
                "-o",
                "ro,noload,loop",
                img.to_str().unwrap(),
                mnt.to_str().unwrap(),
            ],
        );
        let result = std::panic::catch_unwind(|| compare(&nodes, &mnt, true));
        run("umount", &[mnt.to_str().unwrap()]);
        result.unwrap();
    }
}

#[test]
fn default_ext4() {
    check_layout("default", &[]);
}

#[test]
fn inline_data() {
    check_layout("inline", &["-O", "inline_data"]);
}

#[test]
fn ext3_indirect_blocks() {
    check_layout("ext3", &["-t", "ext3"]);
}

#[test]
fn small_blocks_and_small_inodes() {
    check_layout("small", &["-b", "1024", "-I", "128"]);
}

#[test]
fn meta_bg_and_64bit() {
    check_layout("metabg", &["-O", "meta_bg,^resize_inode,64bit"]);
}

/// The file-system interface over the same image shows the source tree: every path found by
/// name from the root, with its type, size, content and link target.
#[test]
fn the_filesystem_interface_shows_the_source_tree() {
    use mount::filesystem::{FileSystem, Kind as K};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    make_tree(&src);
    let img = dir.path().join("iface.img");
    mkfs_from(&src, &img, 96 << 20, &[]);
    let dev = File::open(&img).unwrap();
    let ext = Ext4::open(dev, 96 << 20)
        .unwrap()
        .expect("an ext4 file system");
    let fs: Arc<dyn FileSystem> = Arc::new(ext);
    assert_eq!(fs.type_name(), "ext4");
    let lookup = |path: &Path| -> u64 {
        let mut ino = fs.root();
        for part in path.components() {
            let name = part.as_os_str().as_bytes();
            let entries = fs.read_dir(ino).unwrap();
            ino = entries
                .iter()
                .find(|e| e.name == name)
                .map(|e| e.ino)
                .unwrap();
        }
        ino
    };
    let mut files = 0;
    for p in walkdir(&src) {
        let rel = p.strip_prefix(&src).unwrap();
        let md = fs::symlink_metadata(&p).unwrap();
        let ino = lookup(rel);
        let a = fs.attr(ino).unwrap();
        assert_eq!(a.perm as u32, md.mode() & 0o7777, "{}", rel.display());
        if md.is_dir() {
            assert_eq!(a.kind, K::Dir, "{}", rel.display());
            assert!(fs.clone().open(ino).is_err(), "a directory does not open");
        } else if md.file_type().is_symlink() {
            assert_eq!(a.kind, K::Symlink);
            let target = fs::read_link(&p).unwrap();
            assert_eq!(fs.read_link(ino).unwrap(), target.as_os_str().as_bytes());
        } else if md.is_file() {
            assert_eq!(
                (a.kind, a.size, a.nlink as u64),
                (K::File, md.len(), md.nlink())
            );
            let f = fs.clone().open(ino).unwrap();
            let mut got = Vec::new();
            f.read_append(0, f.size() as usize, &mut got).unwrap();
            assert!(got == fs::read(&p).unwrap(), "{}", rel.display());
            let ranges = f.disk_ranges(0, f.size());
            // Nothing on the device (empty, inline): nothing to fetch; else a plain file has
            // nothing cached.
            assert_eq!(f.is_cached(0, f.size()), ranges.is_empty());
            let mapped: u64 = ranges.iter().map(|r| r.1).sum();
            assert!(
                mapped <= f.size().next_multiple_of(4096),
                "{}",
                rel.display()
            );
            assert!(
                matches!(fs.read_dir(ino), Err(e) if e.kind() == std::io::ErrorKind::NotADirectory)
            );
            files += 1;
        }
    }
    assert!(files > 5, "{files} files compared");
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a"), random(3, 100_000)).unwrap();
    let img = dir.path().join("x.img");
    mkfs_from(&src, &img, 16 << 20, &[]);
    let pristine = fs::read(&img).unwrap();
    // Flip bytes all over the metadata area: every outcome must be Ok or Err, never a panic.
    for i in 0..300u64 {
        let mut bytes = pristine.clone();
        let at = (i * 7919 * 13) % (2 << 20);
        bytes[at as usize] ^= 0xff;
        let n = bytes.len();
        bytes[(at as usize + 1025) % n] ^= 0x5a;
        fs::write(&img, &bytes).unwrap();
        let size = bytes.len() as u64;
        if let Ok(Some(fs)) = Ext4::open(File::open(&img).unwrap(), size) {
            if let Ok(root) = fs.inode(fs.root()) {
                for e in fs.read_dir(&root).unwrap_or_default() {
                    if let Ok(inode) = fs.inode(e.ino) {
                        if let Ok(data) = fs.data(&inode) {
                            let mut buf = vec![0u8; inode.size.min(1 << 20) as usize];
                            let _ = fs.read(&data, 0, &mut buf);
                        }
                    }
                }
            }
        }
    }
}

/// The file-system interface over an ext4 image filled through the kernel (owners, devices,
/// sockets, user and trusted attributes, an ACL, a large attribute in the attribute block)
/// equals the kernel's read-only mount entry by entry.
#[test]
fn the_interface_matches_the_kernel_with_attributes() {
    use common::{fixture_tree, Exact, TreeOptions};
    use mount::filesystem::FileSystem;
    use std::sync::Arc;
    if !is_root() {
        eprintln!("skipped: a loop mount needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("attrs.img");
    File::create(&img).unwrap().set_len(256 << 20).unwrap();
    // 4 KiB blocks and 1 KiB inodes for the many attributes, ea_inode for the 60 KB one.
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-I",
            "1024",
            "-O",
            "ea_inode",
            img.to_str().unwrap(),
        ],
    );
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let (i, m) = (img.to_str().unwrap(), mnt.to_str().unwrap());
    run("mount", &["-o", "loop", i, m]);
    let filled = std::panic::catch_unwind(|| {
        let opts = TreeOptions {
            special: true,
            xattrs: true,
            huge: 3000,
            simple: false,
            utf8_only: false,
        };
        fixture_tree(&mnt, &opts);
    });
    run("umount", &[m]);
    filled.unwrap();
    let size = fs::metadata(&img).unwrap().len();
    let fs: Arc<dyn FileSystem> = Arc::new(
        Ext4::open(File::open(&img).unwrap(), size)
            .unwrap()
            .unwrap(),
    );
    let exact = Exact {
        kernel: true,
        inos: true,
        blocks: true,
        nlink: true,
        xattrs: true,
        rdev: true,
    };
    let seen = common::compare_mounted(&fs, &["mount", "-o", "ro,noload,loop", i, m], &mnt, &exact);
    assert!(seen > 3000, "{seen} entries compared");
}
