//! The user-space XFS reader against images made by mkfs.xfs, checked entry by entry against
//! the kernel's own XFS driver on a loop mount of the same image (v5 layouts; needs root, as CI
//! runs), and against the source tree for v4, which this kernel no longer mounts
//! (`CONFIG_XFS_SUPPORT_V4` is off): v4 images are filled by `mkfs.xfs -p` from a prototype file.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use common::{compare, fixture_tree, is_root, run, Exact, TreeOptions};
use mount::filesystem::FileSystem;
use mount::xfs::Xfs;

/// mkfs.xfs refuses file systems under 300 MB; the image is sparse.
const IMAGE: u64 = 320 << 20;

fn open(img: &Path) -> Arc<dyn FileSystem> {
    let size = fs::metadata(img).unwrap().len();
    let fs = Xfs::open(File::open(img).unwrap(), size)
        .unwrap()
        .expect("an XFS file system");
    Arc::new(fs)
}

fn mkfs(img: &Path, args: &[&str]) {
    File::create(img).unwrap().set_len(IMAGE).unwrap();
    let mut all = vec!["-q", "-f"];
    all.extend_from_slice(args);
    all.push(img.to_str().unwrap());
    run("mkfs.xfs", &all);
}

/// Makes an image with `args`, fills it through the kernel, and compares the reader with the
/// kernel's read-only mount of it.
fn check_with_kernel(name: &str, args: &[&str]) {
    if !is_root() {
        eprintln!("{name}: skipped, a loop mount needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join(format!("{name}.img"));
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    mkfs(&img, args);
    let (i, m) = (img.to_str().unwrap(), mnt.to_str().unwrap());
    run("mount", &["-o", "loop", i, m]);
    let opts = TreeOptions {
        special: true,
        xattrs: true,
        huge: 20_000,
        simple: false,
        utf8_only: false,
    };
    let filled = std::panic::catch_unwind(|| {
        fixture_tree(&mnt, &opts);
        // Shared blocks (reflink) and preallocated, unwritten space around written bytes.
        run(
            "cp",
            &[
                "--reflink=always",
                mnt.join("dir/big.bin").to_str().unwrap(),
                mnt.join("reflinked.bin").to_str().unwrap(),
            ],
        );
        let f = File::create(mnt.join("prealloc.bin")).unwrap();
        run(
            "fallocate",
            &["-l", "1M", mnt.join("prealloc.bin").to_str().unwrap()],
        );
        std::os::unix::fs::FileExt::write_all_at(&f, b"middle", 500_000).unwrap();
        drop(f);
    });
    run("umount", &[m]);
    filled.unwrap();
    let fs = open(&img);
    assert_eq!(fs.type_name(), "xfs");
    let exact = Exact {
        kernel: true,
        inos: true,
        blocks: true,
        nlink: true,
        xattrs: true,
        rdev: true,
    };
    let seen = common::compare_mounted(&fs, &["mount", "-o", "ro,loop", i, m], &mnt, &exact);
    assert!(seen > 20_000, "{name}: {seen} entries compared");
}

#[test]
fn v5_default_layout_matches_the_kernel() {
    check_with_kernel("v5", &[]);
}

#[test]
fn v5_small_blocks_big_directory_blocks_and_64bit_extent_counts_match_the_kernel() {
    check_with_kernel(
        "v5-small",
        &[
            "-b",
            "size=1024",
            "-n",
            "size=8192",
            "-i",
            "size=512,nrext64=1",
            "-m",
            "bigtime=0",
        ],
    );
}

/// A `mkfs.xfs -p` prototype file describing the tree at `src`.
fn prototype(src: &Path, out: &mut String) {
    let mut entries: Vec<_> = fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let m = fs::symlink_metadata(&p).unwrap();
        let name = std::str::from_utf8(p.file_name().unwrap().as_bytes())
            .map(str::to_string)
            .unwrap_or_else(|_| String::from_utf8_lossy(p.file_name().unwrap().as_bytes()).into());
        let mode = m.mode();
        let flags = format!(
            "{}{}{:03o}",
            if mode & 0o4000 != 0 { 'u' } else { '-' },
            if mode & 0o2000 != 0 { 'g' } else { '-' },
            mode & 0o777
        );
        let ids = format!("{} {}", m.uid(), m.gid());
        let t = m.file_type();
        if t.is_dir() {
            out.push_str(&format!("{name} d{flags} {ids}\n"));
            prototype(&p, out);
            out.push_str("$\n");
        } else if t.is_symlink() {
            let target = fs::read_link(&p).unwrap();
            out.push_str(&format!("{name} l{flags} {ids} {}\n", target.display()));
        } else if t.is_file() {
            out.push_str(&format!("{name} -{flags} {ids} {}\n", p.display()));
        } else {
            out.push_str(&format!("{name} p{flags} {ids}\n"));
        }
    }
}

#[test]
fn v4_without_file_types_matches_its_source_tree() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fixture_tree(
        &src,
        &TreeOptions {
            special: false,
            xattrs: false,
            huge: 3000,
            simple: true,
            utf8_only: false,
        },
    );
    // The prototype format has no names that are not UTF-8.
    fs::remove_file(src.join(std::ffi::OsStr::from_bytes(b"latin1-\xe9t\xe9"))).unwrap();
    let root = fs::metadata(&src).unwrap();
    let mut proto = format!(
        "boot\n0 0\nd--{:03o} {} {}\n",
        root.mode() & 0o777,
        root.uid(),
        root.gid()
    );
    prototype(&src, &mut proto);
    proto.push_str("$\n");
    let proto_path = dir.path().join("proto");
    File::create(&proto_path)
        .unwrap()
        .write_all(proto.as_bytes())
        .unwrap();
    let img = dir.path().join("v4.img");
    mkfs(
        &img,
        &[
            "-m",
            "crc=0",
            "-n",
            "ftype=0",
            "-p",
            proto_path.to_str().unwrap(),
        ],
    );
    let fs = open(&img);
    let exact = Exact {
        kernel: false,
        inos: false,
        blocks: false,
        nlink: true,
        xattrs: false,
        rdev: false,
    };
    // mkfs.xfs -p copies contents, modes and owners but not times: the source takes the
    // image's times, then everything must match.
    let nodes = common::walk_fs(fs.as_ref());
    for (rel, ino) in &nodes {
        let a = fs.attr(*ino).unwrap();
        let t = a.mtime.duration_since(std::time::UNIX_EPOCH).unwrap();
        common::set_times(&src.join(rel), t.as_secs() as i64, t.subsec_nanos() as i64);
    }
    let seen = compare(&fs, &src, &exact);
    assert!(seen > 3000, "{seen} entries compared");
}

/// A small v5 image filled from a prototype file (no root needed), to damage on purpose.
fn small_v5(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("small.txt"), b"still readable\n").unwrap();
    fs::write(src.join("d/mid.bin"), common::random(5, 200_000)).unwrap();
    for i in 0..50 {
        fs::write(src.join(format!("d/entry-with-a-long-name-{i}")), b"x").unwrap();
    }
    std::os::unix::fs::symlink("y/".repeat(300), src.join("long.lnk")).unwrap();
    let mut proto = "boot\n0 0\nd--755 0 0\n".to_string();
    prototype(&src, &mut proto);
    proto.push_str("$\n");
    fs::write(dir.join("proto"), proto).unwrap();
    let img = dir.join("small.img");
    mkfs(&img, &["-p", dir.join("proto").to_str().unwrap()]);
    img
}

fn lookup(fs: &dyn FileSystem, path: &str) -> u64 {
    path.split('/').fold(fs.root(), |ino, name| {
        fs.read_dir(ino)
            .unwrap()
            .into_iter()
            .find(|e| e.name == name.as_bytes())
            .unwrap_or_else(|| panic!("{name} not found"))
            .ino
    })
}

fn poke(img: &Path, at: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, at).unwrap();
}

fn peek(img: &Path, at: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    std::os::unix::fs::FileExt::read_exact_at(&File::open(img).unwrap(), &mut b, at).unwrap();
    b
}

fn inode_at(img: &Path, path: &str) -> (u64, u64) {
    let size = fs::metadata(img).unwrap().len();
    let x = Xfs::open(File::open(img).unwrap(), size).unwrap().unwrap();
    let fs: &dyn FileSystem = &x;
    let ino = lookup(fs, path);
    (ino, x.inode_offset(ino).unwrap())
}

fn error_of(r: std::io::Result<impl Sized>) -> String {
    match r {
        Ok(_) => panic!("a damaged object was read"),
        Err(e) => e.to_string(),
    }
}

fn still_readable(fs: &Arc<dyn FileSystem>) {
    let f = fs.clone().open(lookup(fs.as_ref(), "small.txt")).unwrap();
    let mut got = Vec::new();
    f.read_append(0, f.size() as usize, &mut got).unwrap();
    assert_eq!(got, b"still readable\n");
}

/// An extent B+tree whose node points at itself is an error for that file, not a loop.
#[test]
fn an_extent_btree_loop_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = small_v5(dir.path());
    let (_, at) = inode_at(&img, "d/mid.bin");
    let isize = 512u64;
    assert_eq!(
        peek(&img, at + 5, 1),
        [2],
        "mid.bin starts in extents format"
    );
    // Root in the inode: level 2, one pointer to block 15000; block 15000: level 1, one
    // pointer to itself.
    let node = 15_000u64;
    let max_root = ((isize - 176 - 4) / 16) as usize;
    let mut root = vec![0u8; (isize - 176) as usize];
    root[..4].copy_from_slice(&[0, 2, 0, 1]);
    root[4 + max_root * 8..][..8].copy_from_slice(&node.to_be_bytes());
    poke(&img, at + 5, &[3]);
    poke(&img, at + 176, &root);
    let mut block = vec![0u8; 4096];
    block[..8].copy_from_slice(b"BMA3\0\x01\0\x01");
    let max = (4096 - 72) / 16;
    block[72 + max * 8..][..8].copy_from_slice(&node.to_be_bytes());
    poke(&img, node * 4096, &block);
    let fs = open(&img);
    let e = error_of(fs.clone().open(lookup(fs.as_ref(), "d/mid.bin")));
    assert!(e.contains("reached twice"), "{e}");
    still_readable(&fs);
}

/// A directory whose extent claims 20000 blocks is cut off at its byte budget.
#[test]
fn a_directory_larger_than_its_budget_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = small_v5(dir.path());
    let (ino, at) = inode_at(&img, "d");
    assert_eq!(peek(&img, at + 5, 1), [2], "d is in extents format");
    // One extent from file block 0 at disk block 1000, 20000 blocks long.
    let (hi, lo) = (0u64, 1000u64 << 21 | 20_000);
    poke(
        &img,
        at + 176,
        &[hi.to_be_bytes(), lo.to_be_bytes()].concat(),
    );
    // The data fork's extent count: 64 bits at 24 with 64-bit counters, else 32 at 76.
    if u64::from_be_bytes(peek(&img, at + 120, 8).try_into().unwrap()) & 1 << 4 != 0 {
        poke(&img, at + 24, &1u64.to_be_bytes());
    } else {
        poke(&img, at + 76, &1u32.to_be_bytes());
    }
    let fs = open(&img);
    let e = error_of(fs.read_dir(ino));
    assert!(e.contains("more than 67108864 directory bytes"), "{e}");
    still_readable(&fs);
}

/// A symlink that says it is longer than the format allows is an error, not a large read.
#[test]
fn an_oversized_symlink_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = small_v5(dir.path());
    let (ino, at) = inode_at(&img, "long.lnk");
    poke(&img, at + 56, &(5000u64).to_be_bytes());
    let fs = open(&img);
    let e = error_of(fs.read_link(ino));
    assert!(e.contains("5000 bytes"), "{e}");
    still_readable(&fs);
}

/// Superblocks that contradict themselves or the device are refused when the file system opens.
#[test]
fn superblock_geometry_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let img = small_v5(dir.path());
    let good = peek(&img, 0, 512);
    let size = fs::metadata(&img).unwrap().len();
    let cases: [(&str, usize, Vec<u8>); 5] = [
        ("no allocation groups", 88, 0u32.to_be_bytes().to_vec()),
        (
            "larger than its device",
            8,
            (1u64 << 40).to_be_bytes().to_vec(),
        ),
        (
            "block size not a power of two",
            4,
            3000u32.to_be_bytes().to_vec(),
        ),
        (
            "an unknown incompatible feature",
            216,
            (1u32 << 20 | 1).to_be_bytes().to_vec(),
        ),
        ("version 3", 100, 0x0003u16.to_be_bytes().to_vec()),
    ];
    for (what, at, bytes) in cases {
        poke(&img, 0, &good);
        poke(&img, at as u64, &bytes);
        let r = Xfs::open(File::open(&img).unwrap(), size);
        assert!(r.is_err(), "{what}: opened");
    }
    poke(&img, 0, &good);
    assert!(Xfs::open(File::open(&img).unwrap(), size)
        .unwrap()
        .is_some());
}

/// The fuzz target's seeds and every crafted input found by fuzzing (fixtures/hostile/xfs-*)
/// walk whole, within the fuzz walk's limits, in bounded time.
#[test]
fn fuzz_seeds_and_crafted_inputs_walk_in_bounded_time() {
    let opened = common::walk_fuzz_inputs("xfs", &|img| {
        Some(Arc::new(Xfs::open(img, 1 << 30).ok()??) as Arc<dyn FileSystem>)
    });
    assert!(opened >= 3, "{opened} seeds opened");
}
