//! The NTFS reader against volumes made by mkntfs and filled through ntfs-3g (this kernel has
//! no ntfs3 driver), entry by entry against ntfs-3g's own read-only mount of the same image:
//! types, modes, owners, links, sizes, times, contents, symlink targets, device numbers and
//! named streams (ntfs-3g's `user.*` attributes). Needs root and /dev/fuse, as CI has.

mod common;

use std::fs::{self, File};
use std::path::Path;
use std::sync::Arc;

use common::{fixture_tree, is_root, run, set_xattr, Exact, TreeOptions};
use mount::filesystem::FileSystem;
use mount::ntfs::Ntfs;

fn open(img: &Path) -> Arc<dyn FileSystem> {
    let size = fs::metadata(img).unwrap().len();
    let fs = Ntfs::open(File::open(img).unwrap(), size)
        .unwrap()
        .expect("an NTFS volume");
    Arc::new(fs)
}

#[test]
fn ntfs_matches_ntfs_3g() {
    if !is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: ntfs-3g needs root and /dev/fuse (CI has both)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ntfs.img");
    File::create(&img).unwrap().set_len(256 << 20).unwrap();
    run(
        "mkntfs",
        &["-F", "-Q", "-q", "-L", "ELASTIO", img.to_str().unwrap()],
    );
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let (i, m) = (img.to_str().unwrap(), mnt.to_str().unwrap());
    run("ntfs-3g", &[i, m]);
    let filled = std::panic::catch_unwind(|| {
        let opts = TreeOptions {
            special: false,
            xattrs: false,
            huge: 3000,
            simple: false,
            utf8_only: true,
        };
        fixture_tree(&mnt, &opts);
        // Named streams (ntfs-3g shows them as user.* attributes), a device, a read-only file.
        set_xattr(&mnt.join("small.txt"), "user.note", b"a short value");
        set_xattr(
            &mnt.join("dir/big.bin"),
            "user.big",
            &common::random(9, 3000),
        );
        run(
            "mknod",
            &[mnt.join("null").to_str().unwrap(), "c", "1", "3"],
        );
        // The DOS read-only attribute, through ntfs-3g's attribute interface.
        set_xattr(
            &mnt.join("dir/mid.bin"),
            "system.ntfs_attrib_be",
            &[0, 0, 0, 1],
        );
    });
    run("umount", &[m]);
    filled.unwrap();
    let fs = open(&img);
    assert_eq!(fs.type_name(), "ntfs");
    let exact = Exact {
        kernel: true,
        inos: true,
        blocks: false,
        nlink: true,
        xattrs: true,
        rdev: true,
    };
    let seen = common::compare_mounted(&fs, &["ntfs-3g", "-o", "ro", i, m], &mnt, &exact);
    assert!(seen > 3000, "{seen} entries compared");

    // NTFS compression (a directory flagged compressed compresses what is written into it):
    // such a file is refused with an error saying why, its neighbours still read.
    run("ntfs-3g", &[i, m]);
    let made = std::panic::catch_unwind(|| {
        fs::create_dir(mnt.join("packed")).unwrap();
        set_xattr(
            &mnt.join("packed"),
            "system.ntfs_attrib_be",
            &[0, 0, 0x08, 0x10],
        );
        fs::write(mnt.join("packed/text.txt"), "compress me ".repeat(10_000)).unwrap();
        // A file whose data Windows keeps elsewhere (WOF, tag 0x80000017): a reparse point.
        fs::write(mnt.join("wof.bin"), b"placeholder").unwrap();
        let mut rp = 0x8000_0017u32.to_le_bytes().to_vec();
        rp.extend_from_slice(&[8, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0]);
        set_xattr(&mnt.join("wof.bin"), "system.ntfs_reparse_data", &rp);
    });
    run("umount", &[m]);
    made.unwrap();
    let fs = open(&img);
    let packed = fs
        .read_dir(fs.root())
        .unwrap()
        .into_iter()
        .find(|e| e.name == b"packed")
        .unwrap();
    let text = fs
        .read_dir(packed.ino)
        .unwrap()
        .into_iter()
        .find(|e| e.name == b"text.txt")
        .unwrap();
    let err = fs
        .clone()
        .open(text.ino)
        .err()
        .expect("a compressed file is refused");
    assert_eq!(err.kind(), std::io::ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("compressed"), "{err}");
    let wof = fs
        .read_dir(fs.root())
        .unwrap()
        .into_iter()
        .find(|e| e.name == b"wof.bin")
        .unwrap();
    let err = fs
        .clone()
        .open(wof.ino)
        .err()
        .expect("a WOF file is refused");
    assert!(
        err.to_string().contains("reparse point of tag 0x80000017"),
        "{err}"
    );
    let small = fs
        .read_dir(fs.root())
        .unwrap()
        .into_iter()
        .find(|e| e.name == b"small.txt")
        .unwrap();
    assert!(fs.clone().open(small.ino).is_ok());
}

/// The fuzz target's seeds and every crafted input found by fuzzing (fixtures/hostile/ntfs-*)
/// walk whole within the fuzz walk's limits (no root needed).
#[test]
fn fuzz_seeds_and_crafted_inputs_walk() {
    let opened = common::walk_fuzz_inputs("ntfs", &|img| {
        Some(Arc::new(Ntfs::open(img, 1 << 30).ok()??) as Arc<dyn FileSystem>)
    });
    assert!(opened >= 1, "{opened} seeds opened");
}
