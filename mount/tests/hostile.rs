//! Hostile ext images: each test crafts (or replays from `fixtures/hostile/`) an image that
//! attacked the reader at df046ba and checks that the damage stays an error for the one object:
//! no panic, no abort, bounded time, the rest of the file system still readable.
//!
//! Small images (64 KiB) are checked in under `fixtures/hostile/` and replayed as they are;
//! `cargo test -p elastio-mount --test hostile -- --ignored regenerate` rewrites them from
//! `mkfs.ext4`. Images that need a larger file system are made by the test itself.
//!
//! How each failed on the old code is said at each test.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mount::ext4::{Budget, Data, Error, Ext4, ReadAt};

mod common;
use common::random;

/// An image in memory that claims to be `size` bytes: past its bytes it reads as zeros (a big
/// sparse disk without a big file).
struct Sparse {
    bytes: Vec<u8>,
    size: u64,
}

impl ReadAt for Sparse {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.fill(0);
        if offset < self.bytes.len() as u64 {
            let to = (end as usize).min(self.bytes.len());
            buf[..to - offset as usize].copy_from_slice(&self.bytes[offset as usize..to]);
        }
        Ok(())
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hostile")
}

fn fixture(name: &str) -> Vec<u8> {
    fs::read(fixtures().join(name)).unwrap_or_else(|e| panic!("fixtures/hostile/{name}: {e}"))
}

fn open(bytes: &[u8]) -> Ext4<&[u8]> {
    Ext4::open(bytes, bytes.len() as u64).unwrap().unwrap()
}

/// The inode number of `name` in the root directory.
fn lookup<R: ReadAt>(fs: &Ext4<R>, name: &str) -> u32 {
    let root = fs.inode(fs.root()).unwrap();
    fs.read_dir(&root)
        .unwrap()
        .into_iter()
        .find(|e| e.name == name.as_bytes())
        .unwrap_or_else(|| panic!("{name} not in the root directory"))
        .ino
}

fn read_file<R: ReadAt>(fs: &Ext4<R>, name: &str) -> io::Result<Vec<u8>> {
    let inode = fs.inode(lookup(fs, name))?;
    let data = fs.data(&inode)?;
    let mut buf = vec![0u8; inode.size as usize];
    fs.read(&data, 0, &mut buf)?;
    Ok(buf)
}

/// The device blocks of `name`, in file order.
fn blocks<R: ReadAt>(fs: &Ext4<R>, name: &str) -> Vec<u64> {
    let inode = fs.inode(lookup(fs, name)).unwrap();
    let Data::Extents(ext) = fs.data(&inode).unwrap() else {
        panic!("{name} is inline")
    };
    ext.iter()
        .flat_map(|e| e.physical..e.physical + e.len)
        .collect()
}

fn put(img: &mut [u8], at: u64, bytes: &[u8]) {
    let at = usize::try_from(at).unwrap();
    let end = at.checked_add(bytes.len()).unwrap();
    img[at..end].copy_from_slice(bytes);
}

fn get32(img: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_le_bytes(img[at..at + 4].try_into().unwrap())
}

fn set_size(img: &mut [u8], inode_at: u64, size: u64) {
    put(img, inode_at + 0x4, &(size as u32).to_le_bytes());
    put(img, inode_at + 0x6c, &((size >> 32) as u32).to_le_bytes());
}

fn budget_of(e: &io::Error) -> Option<Budget> {
    match Error::of(e)? {
        Error::Budget { what, .. } => Some(*what),
        Error::Corrupt(_) => None,
    }
}

/// Runs `f` and fails if it took longer than `limit` (a frozen mount is the bug).
fn timed<T>(limit: Duration, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    assert!(took < limit, "took {took:?} (limit {limit:?})");
    out
}

/// `mkfs` (`mkfs.ext4` or `mkfs.ext2`) of a small tree into an image of `kib` KiB.
fn mkfs(mkfs: &str, args: &[&str], kib: u64, tree: &dyn Fn(&Path)) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    tree(&src);
    let img = dir.path().join("x.img");
    fs::File::create(&img).unwrap().set_len(kib << 10).unwrap();
    let mut all = vec!["-q", "-F", "-E", "root_owner=0:0"];
    all.extend_from_slice(args);
    all.extend(["-d", src.to_str().unwrap(), img.to_str().unwrap()]);
    let out = Command::new(mkfs).args(&all).output().unwrap();
    assert!(
        out.status.success(),
        "{mkfs} {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::read(&img).unwrap()
}

/// The tree of the small images: a good file, a victim and blocks to build trees in.
fn small_tree(src: &Path) {
    fs::write(src.join("good.txt"), b"hello\n").unwrap();
    fs::write(src.join("victim.txt"), b"tiny").unwrap();
    fs::write(src.join("victim.bin"), random(1, 3000)).unwrap();
    fs::write(src.join("pad.bin"), random(2, 8192)).unwrap();
}

const SMALL_EXT4: &[&str] = &[
    "-b",
    "1024",
    "-N",
    "16",
    "-O",
    "^has_journal,^resize_inode,inline_data",
];

/// The rest of the image is intact: the root lists and the good file reads.
fn others_still_readable<R: ReadAt>(fs: &Ext4<R>) {
    assert_eq!(read_file(fs, "good.txt").unwrap(), b"hello\n");
}

// ---- 1. inline data with a 1 TiB i_size -------------------------------------------------

fn make_inline_1tib() -> Vec<u8> {
    let mut img = mkfs("mkfs.ext4", SMALL_EXT4, 64, &small_tree);
    let fs = open(&img);
    let at = fs.inode_offset(lookup(&fs, "victim.txt")).unwrap();
    drop(fs);
    set_size(&mut img, at, 1 << 40);
    img
}

/// Old code: `inline_data` resized a Vec to i_size: a 1 TiB allocation aborted the process.
#[test]
fn inline_data_larger_than_the_inode() {
    let img = fixture("inline-1tib.img");
    let fs = open(&img);
    let inode = fs.inode(lookup(&fs, "victim.txt")).unwrap();
    assert_eq!(inode.size, 1 << 40);
    let e = timed(Duration::from_secs(1), || fs.data(&inode)).unwrap_err();
    assert!(e.to_string().contains("inline data"), "{e}");
    others_still_readable(&fs);
}

// ---- 2. extent tree shaped as a DAG, depth 5 --------------------------------------------

fn make_extent_dag() -> Vec<u8> {
    let mut img = mkfs("mkfs.ext4", SMALL_EXT4, 64, &small_tree);
    let fs = open(&img);
    let bs = fs.block_size();
    let pad = blocks(&fs, "pad.bin");
    let at = fs.inode_offset(lookup(&fs, "victim.bin")).unwrap();
    drop(fs);
    let per = ((bs - 12) / 12) as u16;
    // Node of depth d (4..=1) in pad[4 - d]: every entry points at the node below; the leaf
    // (pad[4]) maps one block.
    let node = |depth: u16, entries: u16, child: u64| {
        let mut n = vec![0u8; 12 + 12 * entries as usize];
        n[0..2].copy_from_slice(&0xf30au16.to_le_bytes());
        n[2..4].copy_from_slice(&entries.to_le_bytes());
        n[4..6].copy_from_slice(&entries.to_le_bytes());
        n[6..8].copy_from_slice(&depth.to_le_bytes());
        for j in 0..entries as usize {
            let e = &mut n[12 + 12 * j..24 + 12 * j];
            e[0..4].copy_from_slice(&(j as u32).to_le_bytes());
            e[4..8].copy_from_slice(&(child as u32).to_le_bytes());
        }
        n
    };
    for depth in 1..=4u16 {
        let here = pad[4 - depth as usize];
        let child = pad[5 - depth as usize];
        put(&mut img, here * bs, &node(depth, per, child));
    }
    // The leaf holds only preallocated (uninitialized) extents: nothing to read, so walking
    // it again and again never looks like overlapping extents.
    let mut leaf = node(0, per, 0);
    for j in 0..per as usize {
        let e = &mut leaf[12 + 12 * j..24 + 12 * j];
        e[4..6].copy_from_slice(&(32768u16 + 1).to_le_bytes()); // uninitialized, 1 block
        e[6..8].fill(0);
        e[8..12].copy_from_slice(&(pad[5] as u32).to_le_bytes()); // physical
    }
    put(&mut img, pad[4] * bs, &leaf);
    put(&mut img, at + 0x28, &node(5, 4, pad[0]));
    set_size(&mut img, at, 1 << 30);
    img
}

/// Old code: every index entry was followed, 4 × 84^4 ≈ 2·10^8 block reads on the FUSE session
/// thread for one open (the mount stopped answering; ~5·10^10 with 4 KiB blocks); now the
/// second visit of a node is an error.
#[test]
fn extent_tree_dag() {
    let img = fixture("extent-dag.img");
    let fs = open(&img);
    let inode = fs.inode(lookup(&fs, "victim.bin")).unwrap();
    let e = timed(Duration::from_secs(1), || fs.data(&inode)).unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
    others_still_readable(&fs);
}

// ---- 3. triple-indirect DAG with a 4 TiB size -------------------------------------------

fn make_indirect_dag() -> Vec<u8> {
    let mut img = mkfs("mkfs.ext2", &["-b", "1024", "-N", "16"], 64, &small_tree);
    let fs = open(&img);
    let bs = fs.block_size();
    let pad = blocks(&fs, "pad.bin");
    let at = fs.inode_offset(lookup(&fs, "victim.bin")).unwrap();
    drop(fs);
    // Triple pad[0] -> double pad[1] -> single pad[2] -> data pad[3], every pointer alike.
    for level in 0..3 {
        let ptrs: Vec<u8> = (0..bs / 4)
            .flat_map(|_| (pad[level + 1] as u32).to_le_bytes())
            .collect();
        put(&mut img, pad[level] * bs, &ptrs);
    }
    put(&mut img, at + 0x28 + 14 * 4, &(pad[0] as u32).to_le_bytes());
    set_size(&mut img, at, 4 << 40);
    img
}

/// Old code: 256^3 one-block extents (400 MB with 1 KiB blocks, 24 GiB with 4 KiB ones) and
/// 65 536 reads of the same block; now the second visit of the double-indirect block is an
/// error.
#[test]
fn indirect_dag_with_a_huge_size() {
    let img = fixture("indirect-dag.img");
    let fs = open(&img);
    let inode = fs.inode(lookup(&fs, "victim.bin")).unwrap();
    assert_eq!(inode.size, 4 << 40);
    let e = timed(Duration::from_secs(1), || fs.data(&inode)).unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
    others_still_readable(&fs);
}

// ---- 4. one block per group on a 1 TiB partition ----------------------------------------

fn make_blocks_per_group_1() -> Vec<u8> {
    let mut img = mkfs("mkfs.ext4", SMALL_EXT4, 64, &small_tree);
    put(&mut img, 1024 + 0x4, &(1u32 << 30).to_le_bytes()); // s_blocks_count: 1 TiB
    put(&mut img, 1024 + 0x20, &1u32.to_le_bytes()); // s_blocks_per_group
    img
}

/// Old code: 2^30 groups, a Vec of 8 GiB and 2^25 descriptor block reads at open; now the
/// geometry is refused at once.
#[test]
fn one_block_per_group_is_refused_at_open() {
    let dev = Sparse {
        bytes: fixture("bpg1.img"),
        size: 1 << 40,
    };
    let e = timed(Duration::from_secs(1), || Ext4::open(dev, 1 << 40))
        .err()
        .expect("open must fail");
    assert!(e.to_string().contains("blocks per group"), "{e}");
}

/// Geometry checks one by one, from a good image: each bad field is refused at open.
#[test]
fn superblock_geometry_is_validated() {
    let good = fixture("bpg1.img");
    let mut base = good.clone();
    // Restore the good geometry of the fixture's source image: 64 blocks, 8192 per group.
    put(&mut base, 1024 + 0x4, &64u32.to_le_bytes());
    put(&mut base, 1024 + 0x20, &8192u32.to_le_bytes());
    assert!(Ext4::open(&base[..], base.len() as u64).unwrap().is_some());
    let cases: [(u64, u32, &str); 6] = [
        (0x20, 8 * 1024 + 8, "blocks per group"),
        (0x20, 7, "blocks per group"),
        (0x28, 0, "inodes per group"),
        (0x28, 100_000, "inodes per group"),
        (0x0, 17, "inodes is not"),
        (0x14, 0, "first data block"),
    ];
    for (field, value, what) in cases {
        let mut img = base.clone();
        put(&mut img, 1024 + field, &value.to_le_bytes());
        let e = Ext4::open(&img[..], img.len() as u64)
            .err()
            .unwrap_or_else(|| panic!("field {field:#x} = {value} accepted"));
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
    // Inode size not a power of two.
    let mut img = base.clone();
    put(&mut img, 1024 + 0x58, &200u16.to_le_bytes());
    assert!(Ext4::open(&img[..], img.len() as u64).is_err());
}

// ---- 5. a huge directory made of one repeated block -------------------------------------

/// A 4 MiB file system whose directory `big` maps 4 × 84 extents of `run` blocks, all onto the
/// same `run` blocks of entries, and claims `size` bytes.
fn make_repeated_directory(run: u64, size: u64) -> Vec<u8> {
    let mut img = mkfs(
        "mkfs.ext4",
        &["-b", "1024", "-O", "^has_journal"],
        4096,
        &|src: &Path| {
            small_tree(src);
            fs::write(
                src.join("big-pad.bin"),
                random(3, (run as usize + 32) << 10),
            )
            .unwrap();
            fs::create_dir(src.join("big")).unwrap();
        },
    );
    let fs = open(&img);
    let bs = fs.block_size();
    let pad = blocks(&fs, "big-pad.bin");
    let at = fs.inode_offset(lookup(&fs, "big")).unwrap();
    drop(fs);
    // A block of 85 entries of 12 bytes ("e" + 3 digits), the last one taking the slack.
    let mut entries = vec![0u8; bs as usize];
    let n = bs as usize / 12;
    for j in 0..n {
        let e = &mut entries[12 * j..];
        e[0..4].copy_from_slice(&11u32.to_le_bytes());
        let rec = if j + 1 == n { bs as usize - 12 * j } else { 12 };
        e[4..6].copy_from_slice(&(rec as u16).to_le_bytes());
        e[6] = 4;
        e[7] = 1;
        e[8..12].copy_from_slice(format!("e{j:03}").as_bytes());
    }
    // The run of entry blocks: the pad's last blocks, contiguous on disk (mkfs places the
    // first few blocks of a file in gaps, the rest in one stretch).
    let tail = &pad[pad.len() - run as usize..];
    assert!(tail.windows(2).all(|w| w[1] == w[0] + 1), "{pad:?}");
    let data = tail[0];
    for b in 0..run {
        put(&mut img, (data + b) * bs, &entries);
    }
    let per = (bs - 12) / 12;
    let header = |entries: u64, depth: u16| {
        let mut h = vec![0u8; 12];
        h[0..2].copy_from_slice(&0xf30au16.to_le_bytes());
        h[2..4].copy_from_slice(&(entries as u16).to_le_bytes());
        h[4..6].copy_from_slice(&(entries as u16).to_le_bytes());
        h[6..8].copy_from_slice(&depth.to_le_bytes());
        h
    };
    let mut root = header(4, 1);
    for leaf in 0..4u64 {
        let mut node = header(per, 0);
        for j in 0..per {
            let logical = (leaf * per + j) * run;
            node.extend((logical as u32).to_le_bytes());
            node.extend((run as u16).to_le_bytes());
            node.extend(0u16.to_le_bytes());
            node.extend((data as u32).to_le_bytes());
        }
        put(&mut img, pad[leaf as usize] * bs, &node);
        root.extend(((leaf * per * run) as u32).to_le_bytes());
        root.extend((pad[leaf as usize] as u32).to_le_bytes());
        root.extend([0u8; 4]);
    }
    put(&mut img, at + 0x28, &root);
    set_size(&mut img, at, size);
    img
}

/// Old code: read the whole 249 MiB directory into memory and parsed ~21 million entries
/// (~1.3 GB for one listing, and the FUSE view cached up to 1024 listings); now the size
/// budget refuses it before reading.
#[test]
fn directory_larger_than_its_byte_budget() {
    let img = make_repeated_directory(760, 4 * 84 * 760 * 1024);
    let fs = open(&img);
    let inode = fs.inode(lookup(&fs, "big")).unwrap();
    let e = timed(Duration::from_secs(2), || fs.read_dir(&inode)).unwrap_err();
    assert_eq!(budget_of(&e), Some(Budget::DirBytes), "{e}");
    others_still_readable(&fs);
}

/// Old code: 4 million entries listed (and cached); now the listing stops at the entry
/// budget, a block after it is crossed.
#[test]
fn directory_with_more_entries_than_its_budget() {
    let img = make_repeated_directory(760, 48 << 20);
    let fs = open(&img);
    let inode = fs.inode(lookup(&fs, "big")).unwrap();
    let e = timed(Duration::from_secs(10), || fs.read_dir(&inode)).unwrap_err();
    assert_eq!(budget_of(&e), Some(Budget::DirEntries), "{e}");
    others_still_readable(&fs);
}

// ---- block-map budgets: distinct nodes, but too many extents or nodes -------------------

/// An ext2 image of 100 MiB (1 KiB blocks) where `victim.bin`'s triple-indirect tree has
/// `doubles` distinct double-indirect blocks of 256 distinct single-indirect blocks each, every
/// single-indirect block filled with `single`.
fn make_wide_indirect(doubles: u64, single: &[u8]) -> Vec<u8> {
    let mut img = mkfs(
        "mkfs.ext2",
        &["-b", "1024", "-N", "1024"],
        100 << 10,
        &small_tree,
    );
    let fs = open(&img);
    let at = fs.inode_offset(lookup(&fs, "victim.bin")).unwrap();
    drop(fs);
    let first = 20_000u64; // past group 0's metadata and files
    let triple = first;
    let ptrs = |from: u64, n: u64| -> Vec<u8> {
        (0..256u64)
            .flat_map(|i| if i < n { (from + i) as u32 } else { 0 }.to_le_bytes())
            .collect()
    };
    put(&mut img, triple * 1024, &ptrs(first + 1, doubles));
    for d in 0..doubles {
        let singles = first + 1 + doubles + d * 256;
        put(&mut img, (first + 1 + d) * 1024, &ptrs(singles, 256));
        for s in 0..256 {
            put(&mut img, (singles + s) * 1024, single);
        }
    }
    put(&mut img, at + 0x28 + 14 * 4, &(triple as u32).to_le_bytes());
    set_size(&mut img, at, 4 << 40);
    img
}

/// 16 × 256 distinct pointer blocks whose pointers alternate between two data blocks: 2^20
/// one-block extents that do not merge. Old code: kept all of them (any number, 24 bytes each);
/// now the list stops at its budget.
#[test]
fn extent_list_budget() {
    let single: Vec<u8> = (0..256u32)
        .flat_map(|i| (100 + 100 * (i % 2)).to_le_bytes())
        .collect();
    let img = make_wide_indirect(16, &single);
    let fs = open(&img);
    let inode = fs.inode(lookup(&fs, "victim.bin")).unwrap();
    let e = timed(Duration::from_secs(5), || fs.data(&inode)).unwrap_err();
    assert_eq!(budget_of(&e), Some(Budget::Extents), "{e}");
    others_still_readable(&fs);
}

/// 256 × 256 distinct, empty single-indirect blocks: more nodes than the node budget. Old
/// code: read them all (any number).
#[test]
fn block_map_node_budget() {
    let img = make_wide_indirect(256, &[0u8; 1024]);
    let fs = open(&img);
    let inode = fs.inode(lookup(&fs, "victim.bin")).unwrap();
    let e = timed(Duration::from_secs(5), || fs.data(&inode)).unwrap_err();
    assert_eq!(budget_of(&e), Some(Budget::MapNodes), "{e}");
    others_still_readable(&fs);
}

// ---- 6. inode table offset overflow -----------------------------------------------------

/// Old code: `offset + inode_size` overflowed (a panic in debug builds, a wrapped offset in
/// release) for an inode table near 2^54 blocks; now the inode is an error and the other
/// groups read.
#[test]
fn inode_table_offset_overflow() {
    let mut img = mkfs(
        "mkfs.ext4",
        &["-b", "1024", "-g", "1024", "-O", "64bit,^has_journal"],
        4096,
        &small_tree,
    );
    let ipg = u64::from(get32(&img, 1024 + 0x28));
    // Descriptors (64 bytes) in block 2; group 1's inode table at 2^54 - 1: the table offset
    // is 2^64 - 1024, inode 4 of the group ends at 2^64.
    let desc = 2 * 1024 + 64;
    put(&mut img, desc + 0x8, &u32::MAX.to_le_bytes());
    put(&mut img, desc + 0x28, &((1u32 << 22) - 1).to_le_bytes());
    let fs = open(&img);
    let e = fs.inode((ipg + 4) as u32).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    others_still_readable(&fs);
}

// ---- found by the fuzzer (fuzz/, `cargo xtask fuzz`) ----------------------------------

/// Found by the `ext4` fuzz target: an s_log_block_size near 2^32 overflowed `10 + log` in
/// the error message (a panic in debug builds); now it is an error.
#[test]
fn fuzz_huge_log_block_size() {
    let img = fixture("fuzz-ext4-log-block-size.img");
    let e = Ext4::open(&img[..], img.len() as u64)
        .err()
        .expect("open must fail");
    assert!(e.to_string().contains("block size"), "{e}");
}

// ---- replay of every checked-in hostile image -------------------------------------------

/// Every image under fixtures/hostile/ (including fuzzer finds): walking it recursively with
/// budgets ends in bounded time without a panic.
#[test]
fn every_fixture_walks_without_panic() {
    let mut seen = 0;
    for entry in fs::read_dir(fixtures()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "img") {
            continue;
        }
        let bytes = fs::read(&path).unwrap();
        timed(Duration::from_secs(5), || walk_image(&bytes));
        seen += 1;
    }
    assert!(seen >= 4, "fixtures missing");
}

/// Opens `bytes` as a partitioned disk or a bare file system and reads everything it can.
fn walk_image(bytes: &[u8]) {
    let mut read = |off: u64, buf: &mut [u8]| bytes.read_at(off, buf);
    let parts = mount::partitions::parse(bytes.len() as u64, &mut read).unwrap_or_default();
    let mut ranges: Vec<(u64, u64)> = parts.iter().map(|p| (p.start, p.len)).collect();
    ranges.push((0, bytes.len() as u64));
    for (start, len) in ranges {
        let Some(part) = bytes.get(start as usize..(start + len) as usize) else {
            continue;
        };
        if let Ok(Some(fs)) = Ext4::open(part, len) {
            let mut budget = 10_000;
            walk(&fs, fs.root(), 0, &mut budget);
        }
    }
}

fn walk<R: ReadAt>(fs: &Ext4<R>, ino: u32, depth: u32, budget: &mut u32) {
    if depth > 16 || *budget == 0 {
        return;
    }
    *budget -= 1;
    let Ok(inode) = fs.inode(ino) else { return };
    match inode.kind() {
        Some(mount::ext4::Kind::Dir) => {
            for e in fs.read_dir(&inode).unwrap_or_default() {
                walk(fs, e.ino, depth + 1, budget);
            }
        }
        Some(mount::ext4::Kind::Symlink) => {
            let _ = fs.read_link(&inode);
        }
        Some(mount::ext4::Kind::File) => {
            if let Ok(data) = fs.data(&inode) {
                let mut buf = vec![0u8; 1 << 16];
                let mut at = 0;
                while at < inode.size.min(4 << 20) {
                    let _ = fs.read(&data, at, &mut buf);
                    at += buf.len() as u64;
                }
            }
        }
        _ => {}
    }
}

/// The stricter checks refuse no real layout: the fuzz seeds (mkfs.ext2/ext4 with 1 KiB blocks,
/// inline_data, meta_bg + 64bit, an e2fsck -D hashed-tree directory) open and read whole.
#[test]
fn real_layouts_pass_the_checks() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/ext4");
    let mut seen = 0;
    for entry in fs::read_dir(&seeds).unwrap() {
        let path = entry.unwrap().path();
        let bytes = fs::read(&path).unwrap();
        let fs = Ext4::open(&bytes[..], bytes.len() as u64)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .unwrap();
        assert_eq!(read_file(&fs, "small.txt").unwrap(), b"hello\n");
        let dir = fs.inode(lookup(&fs, "dir")).unwrap();
        let entries = fs.read_dir(&dir).unwrap();
        assert!(entries.iter().any(|e| e.name == b"mid.txt"), "{path:?}");
        for e in entries {
            let inode = fs.inode(e.ino).unwrap();
            if inode.kind() == Some(mount::ext4::Kind::File) {
                let data = fs.data(&inode).unwrap();
                let mut buf = vec![0u8; inode.size as usize];
                fs.read(&data, 0, &mut buf).unwrap();
            }
        }
        seen += 1;
    }
    assert!(seen >= 5);
}

/// The generators still make small fixtures of the checked-in names; with
/// `ELASTIO_REGENERATE_FIXTURES=1` they also rewrite them (after changing a generator).
#[test]
fn fixture_generators_make_small_images() {
    let dir = fixtures();
    let write = std::env::var_os("ELASTIO_REGENERATE_FIXTURES").is_some();
    for (name, img) in [
        ("inline-1tib.img", make_inline_1tib()),
        ("extent-dag.img", make_extent_dag()),
        ("indirect-dag.img", make_indirect_dag()),
        ("bpg1.img", make_blocks_per_group_1()),
    ] {
        assert!(img.len() <= 64 << 10, "{name}: {} bytes", img.len());
        if write {
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join(name), img).unwrap();
        } else {
            assert!(dir.join(name).is_file(), "{name} is checked in");
        }
    }
}
