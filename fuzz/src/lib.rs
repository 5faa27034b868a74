//! The parsers under fuzzing, compiled from the very source files of their crates (see
//! Cargo.toml for why), and the walk the ext4 target does.

#[path = "../../mount/src/ext4.rs"]
pub mod ext4;
#[path = "../../mount/src/partitions.rs"]
pub mod partitions;
#[path = "../../agent/src/block/ranges.rs"]
pub mod ranges;
#[path = "../../iscan/src/entropy.rs"]
pub mod entropy;
#[path = "../../iscan/src/magic.rs"]
pub mod magic;
#[path = "../../iscan/src/notes.rs"]
pub mod notes;

use ext4::{Ext4, Kind, ReadAt};

/// Bounds of one walk, far above what a small input holds legitimately and low enough that
/// every input finishes within libFuzzer's timeout.
const MAX_INODES: u32 = 512;
const MAX_DIRS: u32 = 32;
const MAX_FILE_BYTES: u64 = 1 << 20;
const MAX_DEPTH: u32 = 32;

/// Opens `bytes` as an ext file system and reads everything reachable from the root: every
/// directory listed, every symlink followed to its target, every file read (up to 1 MiB).
pub fn walk_ext4(bytes: &[u8]) {
    let Ok(Some(fs)) = Ext4::open(bytes, bytes.len() as u64) else {
        return;
    };
    let _ = fs.label();
    if let Ok(free) = fs.free_extents(64) {
        assert!(free.len() <= 64, "free ranges over the budget");
        assert!(
            free.windows(2).all(|w| w[0].1 < w[1].0) && free.iter().all(|r| r.0 < r.1),
            "free ranges unsorted, touching or empty"
        );
        assert!(free.last().is_none_or(|r| r.1 <= bytes.len() as u64), "free past the end");
    }
    let mut left = (MAX_INODES, MAX_DIRS);
    walk(&fs, fs.root(), 0, &mut left);
}

fn walk<R: ReadAt>(fs: &Ext4<R>, ino: u32, depth: u32, left: &mut (u32, u32)) {
    if depth > MAX_DEPTH || left.0 == 0 {
        return;
    }
    left.0 -= 1;
    let Ok(inode) = fs.inode(ino) else { return };
    match inode.kind() {
        Some(Kind::Dir) => {
            if left.1 == 0 {
                return;
            }
            left.1 -= 1;
            for e in fs.read_dir(&inode).unwrap_or_default() {
                walk(fs, e.ino, depth + 1, left);
            }
        }
        Some(Kind::Symlink) => {
            let _ = fs.read_link(&inode);
        }
        Some(Kind::File) => {
            let Ok(data) = fs.data(&inode) else { return };
            let end = inode.size.min(MAX_FILE_BYTES);
            let mut buf = Vec::new();
            let mut at = 0;
            while at < end {
                let n = (end - at).min(64 << 10);
                buf.clear();
                if fs.read_append(&data, at, n as usize, &mut buf).is_err() {
                    break;
                }
                let _ = fs.disk_ranges(&data, at, n);
                at += n;
            }
        }
        _ => {}
    }
}

/// The size of the image a sparse-sector fuzz input describes (mkfs.xfs makes 300 MB at least).
pub const XFS_IMAGE: u64 = 1 << 30;

/// Opens `records` (sparse-sector records) as an XFS file system and reads everything
/// reachable from the root within the walk's limits.
pub fn walk_xfs(records: &[u8]) {
    walk_sparse(records, |img| {
        let fs = mount::xfs::Xfs::open(img, XFS_IMAGE).ok()??;
        // The free space a used-blocks backup skips, and whether the log allows trusting it.
        let _ = fs.log_is_clean();
        if let Ok(free) = fs.free_extents(64) {
            assert!(free.len() <= 64, "free ranges over the budget");
            assert!(
                free.windows(2).all(|w| w[0].1 <= w[1].0) && free.iter().all(|r| r.0 < r.1),
                "free ranges unsorted, overlapping or empty"
            );
            assert!(free.last().is_none_or(|r| r.1 <= XFS_IMAGE), "free past the end");
        }
        Some(std::sync::Arc::new(fs) as _)
    });
}

/// Opens `records` (sparse-sector records) as a btrfs file system and reads everything
/// reachable from the root within the walk's limits.
pub fn walk_btrfs(records: &[u8]) {
    walk_sparse(records, |img| {
        Some(std::sync::Arc::new(mount::btrfs::Btrfs::open(img, XFS_IMAGE).ok()??) as _)
    });
}

/// Opens `records` (sparse-sector records) as a FAT volume and reads everything reachable from
/// the root within the walk's limits.
pub fn walk_fat(records: &[u8]) {
    walk_sparse(records, |img| {
        Some(std::sync::Arc::new(mount::fat::Fat::open(img, XFS_IMAGE).ok()??) as _)
    });
}

/// Opens `records` (sparse-sector records) as an NTFS volume and reads everything reachable
/// from the root within the walk's limits.
pub fn walk_ntfs(records: &[u8]) {
    walk_sparse(records, |img| {
        Some(std::sync::Arc::new(mount::ntfs::Ntfs::open(img, XFS_IMAGE).ok()??) as _)
    });
}

fn walk_sparse(
    records: &[u8],
    open: impl FnOnce(
        mount::filesystem::SparseImage,
    ) -> Option<std::sync::Arc<dyn mount::filesystem::FileSystem>>,
) {
    use mount::filesystem::{walk, SparseImage, WalkLimits};
    if let Some(fs) = open(SparseImage::parse(records, XFS_IMAGE)) {
        walk(&fs, WalkLimits::default());
    }
}

/// Reads `bytes` as an LVM2 PV (or, without a label, as metadata text) and maps every LV of
/// its VG piece by piece (at most 64 pieces each).
pub fn lvm(bytes: &[u8]) {
    mount::lvm::check(bytes);
}

/// Parses `bytes` as a partitioned disk and checks what comes out: inside the disk, no overlaps.
/// Unless the (unused) first byte of the boot code is odd, the GPT CRCs are made right first, so
/// mutations reach the code past the checksums.
pub fn check_partitions(data: &[u8]) {
    let mut disk = data.to_vec();
    if data.first().is_some_and(|b| b & 1 == 0) {
        fix_gpt_crcs(&mut disk);
    }
    let bytes = &disk[..];
    let mut read = |off: u64, buf: &mut [u8]| bytes.read_at(off, buf);
    let Ok(parts) = partitions::parse(bytes.len() as u64, &mut read) else {
        return;
    };
    for (i, p) in parts.iter().enumerate() {
        let end = p.start.checked_add(p.len).expect("partition end overflows");
        assert!(
            p.len > 0 && end <= bytes.len() as u64,
            "{p:?} outside the disk"
        );
        for q in &parts[i + 1..] {
            assert!(
                end <= q.start || q.start + q.len <= p.start,
                "{p:?} overlaps {q:?}"
            );
        }
    }
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Rewrites the entry-array and header CRC32s of both GPT headers, where their fields allow.
fn fix_gpt_crcs(disk: &mut [u8]) {
    let sectors = disk.len() / 512;
    for lba in [1, sectors.saturating_sub(1)] {
        let at = lba * 512;
        // Only whole sectors hold a header (the parser ignores a partial last one).
        if lba == 0 || at + 512 > disk.len() || disk.get(at..at + 8) != Some(b"EFI PART") {
            continue;
        }
        let hdr = &disk[at..];
        let (Some(size), Some(lba_entries), Some(count), Some(entry)) =
            (le32(hdr, 12), le64(hdr, 72), le32(hdr, 80), le32(hdr, 84))
        else {
            continue;
        };
        let len = u64::from(count.min(4096)) * u64::from(entry.min(4096));
        let table = lba_entries
            .checked_mul(512)
            .and_then(|s| Some((s, s.checked_add(len)?)))
            .and_then(|(s, e)| disk.get(usize::try_from(s).ok()?..usize::try_from(e).ok()?));
        if let Some(t) = table {
            let crc = crc32fast::hash(t);
            disk[at + 88..at + 92].copy_from_slice(&crc.to_le_bytes());
        }
        let size = (size as usize).clamp(92, 512);
        if let Some(h) = disk.get(at..at + size) {
            let mut h = h.to_vec();
            h[16..20].fill(0);
            let crc = crc32fast::hash(&h);
            disk[at + 16..at + 20].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

#[path = "../../mount/src/nbd/proto.rs"]
pub mod nbd_proto;

/// A client's byte stream as the server's parsers see it: option haggling (16-byte headers,
/// then their data, dispatched by option as the server does) until NBD_OPT_GO or
/// NBD_OPT_EXPORT_NAME, then 28-byte transmission requests, each WRITE followed by its payload.
/// Option data longer than the input is cut short, as a closed connection would.
pub fn nbd_client_stream(mut data: &[u8]) {
    use nbd_proto::*;
    let take = |data: &mut &[u8], n: usize| -> Option<Vec<u8>> {
        let n = n.min(data.len());
        let (head, rest) = data.split_at(n);
        *data = rest;
        Some(head.to_vec())
    };
    // Client flags.
    if data.len() < 4 {
        return;
    }
    data = &data[4..];
    loop {
        let Some(h) = data.get(..16).map(|h| <[u8; 16]>::try_from(h).unwrap()) else {
            return;
        };
        data = &data[16..];
        let Ok(h) = parse_option_header(&h) else {
            return;
        };
        // The server refuses option data over its limit (64 KiB) before reading it.
        if h.len > 64 << 10 {
            return;
        }
        let Some(body) = take(&mut data, h.len as usize) else {
            return;
        };
        match h.option {
            OPT_INFO | OPT_GO => {
                if let Ok((name, infos)) = parse_info_request(&body) {
                    assert!(infos.len() * 2 + name.len() <= body.len());
                    if h.option == OPT_GO {
                        break;
                    }
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if let Ok((_, queries)) = parse_meta_request(&body) {
                    assert!(queries.len() * 4 <= body.len());
                }
            }
            OPT_EXPORT_NAME => break,
            OPT_ABORT => return,
            _ => {}
        }
    }
    while let Some(b) = data.get(..REQUEST_LEN) {
        let b: [u8; REQUEST_LEN] = b.try_into().unwrap();
        data = &data[REQUEST_LEN..];
        let Ok(r) = parse_request(&b) else { return };
        assert_eq!(parse_request(&encode_request(&r)), Ok(r));
        if r.kind == 1 {
            // NBD_CMD_WRITE: its payload follows.
            let _ = take(&mut data, r.len as usize);
        }
    }
}

/// The whole NBD server (`mount::nbd::Server`) fed one client's bytes through an
/// in-memory pipe: handshake, option haggling, then transmission with its budgets, reply
/// writer, block status, cache, and the copy-on-write overlay of a writable export. Two
/// exports of a small vault disk (1 MiB of data, a hole, a size not a multiple of 512): "ro"
/// and "rw". No timeouts: the input ends with an EOF, so a server that still waits is a hang
/// (libFuzzer's -timeout reports it). Replies are read and dropped as they come, so a server
/// that stops reading while its replies wait is not stuck on a client that never reads.
pub fn nbd_server_session(data: &[u8]) {
    use mount::DiskReader;
    use std::sync::{Arc, OnceLock};

    static DISK: OnceLock<Arc<DiskReader>> = OnceLock::new();
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let disk = DISK.get_or_init(|| {
        let mut bytes = vec![0u8; (4 << 20) + 300];
        for (i, b) in bytes[..1 << 20].iter_mut().enumerate() {
            *b = (i % 251) as u8 | 1;
        }
        let vault = scalez::testing::memory_vault(64 << 10);
        let map = scalez::testing::store_disk(&vault, &bytes);
        Arc::new(DiskReader::new(vault, map, 1 << 20))
    });
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    });
    let server = mount::nbd::server::fuzz_server(disk).expect("an overlay in the temp dir");
    rt.block_on(server.serve_client_bytes(data));
}

/// A changed map from the fuzzer's bytes, for a disk whose size the first 8 bytes give: parsing
/// never panics, and what it returns is a sorted, disjoint set inside the disk, within budget.
pub fn changed_map(data: &[u8]) {
    let Some(size) = le64(data, 0) else { return };
    let text = &data[8..];
    let max = 64;
    let Ok(map) = ranges::parse_changed_map(text, size, max) else {
        return;
    };
    let set = map.ranges;
    assert!(set.len() <= max, "{} ranges over the budget", set.len());
    let mut last = None;
    for &(s, e) in set.ranges() {
        assert!(s < e && e <= size, "range {s}..{e} of a {size}-byte disk");
        assert!(last.is_none_or(|l| l < s), "ranges out of order or touching");
        last = Some(e);
    }
}

/// The NBD client's side of a session whose server bytes are the fuzzer's: handshake with
/// meta contexts, then reads and block status, all within the client's bounds.
pub fn nbd_client(data: &[u8]) {
    struct Duplex<'a>(&'a [u8]);
    impl std::io::Read for Duplex<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            std::io::Read::read(&mut self.0, buf)
        }
    }
    impl std::io::Write for Duplex<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    use mount::nbd::client::Client;
    let contexts = ["base:allocation", "qemu:dirty-bitmap:b0"];
    let Ok(mut c) = Client::connect(Duplex(data), "vm0", &contexts) else {
        return;
    };
    let size = c.size();
    let mut buf = vec![0u8; 1 << 16];
    let n = (size.min(1 << 16)) as usize;
    let _ = c.read(0, &mut buf[..n]);
    // Two reads in flight, their chunks interleaved as the server likes.
    if n >= 2 && c.send_read(0, n / 2).is_ok() && c.send_read((n / 2) as u64, n / 2).is_ok() {
        for _ in 0..2 {
            match c.recv_read() {
                Ok((_, off, data)) => assert!(off + data.len() as u64 <= size, "data past the end"),
                Err(_) => break,
            }
        }
    }
    for name in contexts {
        if let Some(id) = c.context_id(name) {
            if let Ok(extents) = c.block_status(id, 0, size.min(1 << 20).max(1) as u32) {
                let total: u64 = extents.iter().map(|e| e.0 as u64).sum();
                assert!(total <= size.min(1 << 20).max(1), "extents past the request");
            }
        }
    }
}

/// What an integrity scan reads of a file's bytes and name (iscan: magic, extension, promise,
/// note names, onion addresses, window classes): the first byte is the name's length.
pub fn iscan_content(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else { return };
    let n = (n as usize).min(rest.len());
    let (name, content) = rest.split_at(n);
    let _ = magic::detect(content);
    if let Some(ext) = magic::extension(name) {
        assert!(!ext.is_empty() && ext.len() <= 16, "extension {ext:?}");
        let _ = magic::promise(&ext);
        let _ = magic::ransomware_extension(&ext);
    }
    let _ = notes::is_note_name(name);
    if let Some(onion) = notes::onion_address(content) {
        assert!(onion.ends_with(".onion") && (onion.len() == 62 || onion.len() == 22), "{onion}");
    }
    let mut total = 0;
    for w in content.chunks(entropy::MIN_WINDOW) {
        let h = entropy::Histogram::of(w);
        total += h.len();
        let e = h.entropy();
        assert!((0.0..=8.0 + 1e-9).contains(&e), "entropy {e}");
        assert!(h.chi2() >= 0.0);
        let _ = h.class();
    }
    assert_eq!(total, content.len() as u64);
}
