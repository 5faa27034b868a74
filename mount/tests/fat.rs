//! The FAT reader against FAT12, FAT16 and FAT32 images made by mkfs.vfat and filled by mtools
//! (this kernel has no vfat driver), entry by entry: names as mtools lists them (`mdir -/ -b`),
//! and types, sizes, contents and modification times as the source tree has them. No root.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{random, set_times, walk_fs};
use mount::fat::{Fat, FatType};
use mount::filesystem::{FileSystem, Kind};

fn make_src(src: &Path) {
    fs::create_dir_all(src.join("EFI/BOOT")).unwrap();
    fs::write(src.join("EFI/BOOT/BOOTX64.EFI"), random(1, 300_000)).unwrap();
    fs::write(src.join("README.TXT"), b"upper-case 8.3 name\n").unwrap();
    fs::write(src.join("notes.md"), b"lower-case 8.3 name\n").unwrap();
    fs::write(src.join("A long file name with spaces.txt"), b"long name\n").unwrap();
    fs::write(src.join("h\u{e9}llo-w\u{f6}rld \u{2603}.txt"), b"unicode\n").unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    fs::write(src.join("big.bin"), random(2, 5 << 20)).unwrap();
    fs::create_dir(src.join("many")).unwrap();
    for i in 0..600 {
        fs::write(
            src.join(format!("many/entry number {i:04}.dat")),
            format!("{i}"),
        )
        .unwrap();
    }
    let mut deep = src.join("deep");
    for i in 0..20 {
        deep = deep.join(format!("level{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom.txt"), b"deep down").unwrap();
    // FAT keeps modification times in 2-second steps.
    for (i, p) in common::walkdir(src).iter().enumerate() {
        if p.is_file() {
            set_times(p, 1_600_000_000 + 2 * i as i64, 0);
        }
    }
}

fn mtools(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| panic!("{cmd} (apt: mtools): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn check(bits: &str, kib: u64, kind: FatType) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    make_src(&src);
    let img = dir.path().join(format!("fat{bits}.img"));
    let kib = kib.to_string();
    let mut mkfs = vec!["-C", "-F", bits, "-n", "ELASTIO"];
    mkfs.extend([img.to_str().unwrap(), kib.as_str()]);
    common::run("mkfs.vfat", &mkfs);
    let i = img.to_str().unwrap();
    let mut args = vec!["-s", "-m", "-i", i];
    let names: Vec<String> = fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path().to_str().unwrap().to_string())
        .collect();
    args.extend(names.iter().map(String::as_str));
    args.push("::/");
    mtools("mcopy", &args);
    let size = fs::metadata(&img).unwrap().len();
    let fat = Fat::open(File::open(&img).unwrap(), size)
        .unwrap()
        .expect("a FAT volume");
    assert_eq!(fat.fat_type(), kind);
    assert_eq!(fat.label(), "ELASTIO");
    let fs: Arc<dyn FileSystem> = Arc::new(fat);
    let nodes = walk_fs(fs.as_ref());
    // Names: exactly what mtools lists.
    let listed: Vec<String> = mtools("mdir", &["-/", "-b", "-i", i, "::/"])
        .lines()
        .map(|l| {
            l.trim_start_matches("::/")
                .trim_end_matches('/')
                .to_string()
        })
        .filter(|l| !l.is_empty())
        .collect();
    let mut ours: Vec<String> = nodes
        .keys()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| p.to_str().unwrap().to_string())
        .collect();
    let mut theirs = listed.clone();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs, "FAT{bits}: names");
    // Types, sizes, contents and times: as in the source tree.
    let mut seen = BTreeMap::new();
    for p in common::walkdir(&src) {
        let rel = p.strip_prefix(&src).unwrap();
        let &ino = nodes
            .get(rel)
            .unwrap_or_else(|| panic!("{} missing", rel.display()));
        let a = fs.attr(ino).unwrap();
        let m = fs::metadata(&p).unwrap();
        if m.is_dir() {
            assert_eq!(a.kind, Kind::Dir, "{}", rel.display());
            continue;
        }
        assert_eq!((a.kind, a.size), (Kind::File, m.len()), "{}", rel.display());
        assert_eq!(a.mtime, m.modified().unwrap(), "mtime of {}", rel.display());
        let f = fs.clone().open(ino).unwrap();
        let mut got = Vec::new();
        f.read_append(0, f.size() as usize, &mut got).unwrap();
        assert!(got == fs::read(&p).unwrap(), "content of {}", rel.display());
        seen.insert(rel.to_path_buf(), ());
    }
    assert!(seen.len() > 600, "FAT{bits}: {} files compared", seen.len());
}

#[test]
fn fat12_matches_mtools_and_its_source() {
    check("12", 16 << 10, FatType::Fat12);
}

#[test]
fn fat16_matches_mtools_and_its_source() {
    check("16", 64 << 10, FatType::Fat16);
}

#[test]
fn fat32_matches_mtools_and_its_source() {
    check("32", 300 << 10, FatType::Fat32);
}

/// A FAT32 volume with fewer clusters than FAT16 could address (as mkfs.vfat -F 32 makes on
/// a small disk with large clusters) is still FAT32: the type comes from the boot sector's
/// 16-bit FAT size being 0, as Linux decides, not from the cluster count. (mtools refuses to
/// write such a volume, so it stays empty: the label, at FAT32's offset, shows the type was
/// read right.)
#[test]
fn a_small_fat32_is_fat32() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("small32.img");
    let i = img.to_str().unwrap();
    common::run(
        "mkfs.vfat",
        &["-C", "-F", "32", "-s", "16", "-n", "ELASTIO", i, "65536"],
    );
    let size = fs::metadata(&img).unwrap().len();
    let fat = Fat::open(File::open(&img).unwrap(), size).unwrap().unwrap();
    assert_eq!((fat.fat_type(), fat.label()), (FatType::Fat32, "ELASTIO"));
    let fs: Arc<dyn FileSystem> = Arc::new(fat);
    assert!(fs.read_dir(fs.root()).unwrap().is_empty());
    assert_eq!(fs.attr(fs.root()).unwrap().kind, Kind::Dir);
}

/// A directory whose cluster chain loops back on itself is an error after at most the
/// volume's cluster count, not a hang; the rest of the volume stays readable.
#[test]
fn a_looping_directory_chain_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("loop.img");
    common::run(
        "mkfs.vfat",
        &["-C", "-F", "12", img.to_str().unwrap(), "1024"],
    );
    let i = img.to_str().unwrap();
    mtools("mmd", &["-i", i, "::/D"]);
    let file = dir.path().join("F.TXT");
    fs::write(&file, b"fine\n").unwrap();
    mtools("mcopy", &["-i", i, file.to_str().unwrap(), "::/F.TXT"]);
    let mut bytes = fs::read(&img).unwrap();
    let le16 = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]) as usize;
    let (bps, reserved, fats, fat_sectors) = (
        le16(&bytes, 11),
        le16(&bytes, 14),
        bytes[16] as usize,
        le16(&bytes, 22),
    );
    let root = (reserved + fats * fat_sectors) * bps;
    let entry = (0..16)
        .map(|k| root + 32 * k)
        .find(|&e| &bytes[e..e + 11] == b"D          ")
        .expect("the D entry");
    let cluster = le16(&bytes, entry + 26);
    // FAT12: cluster c's entry is 12 bits at byte c * 3 / 2; point it at itself.
    for f in 0..fats {
        let at = reserved * bps + f * fat_sectors * bps + cluster * 3 / 2;
        let mut v = le16(&bytes, at) as u16;
        v = if cluster % 2 == 0 {
            (v & 0xf000) | cluster as u16
        } else {
            (v & 0x000f) | (cluster as u16) << 4
        };
        bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fs::write(&img, &bytes).unwrap();
    let fat = Fat::open(File::open(&img).unwrap(), bytes.len() as u64)
        .unwrap()
        .unwrap();
    let fs: Arc<dyn FileSystem> = Arc::new(fat);
    let root_entries = fs.read_dir(fs.root()).unwrap();
    let d = root_entries.iter().find(|e| e.name == b"D").unwrap().ino;
    let started = std::time::Instant::now();
    let err = fs.read_dir(d).unwrap_err().to_string();
    assert!(err.contains("loops"), "{err}");
    assert!(started.elapsed().as_secs() < 5);
    let f = root_entries
        .iter()
        .find(|e| e.name == b"F.TXT")
        .unwrap()
        .ino;
    let data = fs.clone().open(f).unwrap();
    let mut got = Vec::new();
    data.read_append(0, data.size() as usize, &mut got).unwrap();
    assert_eq!(got, b"fine\n");
}

/// The fuzz target's seeds and every crafted input found by fuzzing (fixtures/hostile/fat-*)
/// walk whole within the fuzz walk's limits.
#[test]
fn fuzz_seeds_and_crafted_inputs_walk() {
    let opened = common::walk_fuzz_inputs("fat", &|img| {
        Some(Arc::new(Fat::open(img, 1 << 30).ok()??) as Arc<dyn FileSystem>)
    });
    assert!(opened >= 3, "{opened} seeds opened");
}
