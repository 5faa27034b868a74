//! Partition tables (MBR and GPT) parsed from a disk image, so a mount can show each partition as
//! its own file. Pure: the caller supplies a reader. The logical partitions of the first
//! extended MBR partition are followed (numbered from 5, as Linux numbers them).
//!
//! Invariants (the table is untrusted input):
//!
//! * work and memory are bounded: one MBR sector, two GPT header sectors and at most
//!   [`MAX_GPT_ENTRIES`] entries of at most 4096 bytes (4 MiB) are read;
//! * a GPT is used only if its header CRC32 and its entry-array CRC32 match; a bad primary
//!   header falls back to the backup header in the last sector (as the kernel does); if both
//!   are bad the disk has no partitions (it may still hold a bare file system);
//! * the partitions returned lie inside the disk (one that starts inside and runs past the end
//!   is clipped, as the kernel does with a truncated image), do not overlap each other or the
//!   table, and are at most [`MAX_GPT_ENTRIES`]; bad entries are dropped and logged;
//! * an extended partition's chain of boot records is followed for at most [`MAX_LOGICAL`]
//!   links, each strictly inside the extended partition and never twice;
//! * all arithmetic on numbers from the disk is checked.

use std::io;

/// One partition: its number in the table (1-based) and its byte range on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub start: u64,
    pub len: u64,
}

const SECTOR: u64 = 512;
/// Frozen by the specs: the GPT header signature and the "protective MBR" type byte.
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
const MBR_PROTECTIVE: u8 = 0xee;
const MBR_EXTENDED: [u8; 3] = [0x05, 0x0f, 0x85];
/// Bound on logical partitions followed in an extended partition.
pub const MAX_LOGICAL: u32 = 128;
/// Bound on GPT entries read (the spec's default is 128).
pub const MAX_GPT_ENTRIES: u32 = 1024;
/// The GPT header is at least 92 bytes (UEFI 2.x) and fits in its sector.
const GPT_HEADER_MIN: u32 = 92;

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
}

/// The partitions of a disk of `size` bytes, read through `read_at(offset, buf)`. A disk without
/// a recognised (and intact) table has none (it may hold a bare file system).
pub fn parse(
    size: u64,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<Vec<Partition>> {
    Ok(parse_table(size, read_at)?.parts)
}

/// Like [`parse`], but None when the table had entries that were dropped or clipped
/// (overlapping, outside the disk) or primaries overlapping the extended partition: then where
/// data lies is in doubt, and nothing may be skipped on the strength of one partition's maps.
pub fn parse_strict(
    size: u64,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<Option<Vec<Partition>>> {
    let t = parse_table(size, read_at)?;
    Ok((t.doubts == 0).then_some(t.parts))
}

fn parse_table(
    size: u64,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<Table> {
    let none = Table::new(size, SECTOR);
    if size < 2 * SECTOR {
        return Ok(none);
    }
    let mut mbr = [0u8; 512];
    read_at(0, &mut mbr)?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Ok(none);
    }
    let entries: Vec<&[u8]> = (0..4)
        .map(|i| &mbr[446 + 16 * i..446 + 16 * (i + 1)])
        .collect();
    if entries.iter().any(|e| e[4] == MBR_PROTECTIVE) {
        return parse_gpt(size, read_at);
    }
    let mut table = Table::new(size, SECTOR);
    let mut extended = None;
    for (i, e) in entries.iter().enumerate() {
        let (kind, start, sectors) = (e[4], u64::from(u32_at(e, 8)), u64::from(u32_at(e, 12)));
        if kind == 0 || sectors == 0 {
            continue;
        }
        if MBR_EXTENDED.contains(&kind) {
            extended.get_or_insert((start, sectors));
            continue;
        }
        // u32 sectors of 512 bytes: below 2^41, no overflow.
        table.add(i as u32 + 1, start * SECTOR, sectors * SECTOR);
    }
    if let Some((start, sectors)) = extended {
        let (s, e) = (start * SECTOR, (start + sectors) * SECTOR);
        if table
            .parts
            .iter()
            .any(|p| p.start < e && s < p.start + p.len)
        {
            tracing::warn!("a primary partition overlaps the extended partition");
            table.doubts += 1;
        }
        logical_partitions(&mut table, start, sectors, read_at)?;
    }
    Ok(table)
}

/// Follows the chain of extended boot records of the extended partition at sector `base`
/// (`sectors` long): each holds one logical partition (relative to itself) and the link to the
/// next record (relative to `base`).
fn logical_partitions(
    table: &mut Table,
    base: u64,
    sectors: u64,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<()> {
    let end = base + sectors;
    let mut seen = std::collections::HashSet::new();
    let mut ebr = base;
    for number in 5..5 + MAX_LOGICAL {
        if ebr >= end || (ebr + 1) * SECTOR > table.size || !seen.insert(ebr) {
            break;
        }
        let mut b = [0u8; 512];
        read_at(ebr * SECTOR, &mut b)?;
        if b[510..512] != [0x55, 0xaa] {
            tracing::warn!("extended boot record at sector {ebr} has no signature: chain ends");
            break;
        }
        let (e, link) = (&b[446..462], &b[462..478]);
        let (rel, n) = (u64::from(u32_at(e, 8)), u64::from(u32_at(e, 12)));
        if e[4] != 0 && n > 0 {
            if ebr + rel + n > end || rel == 0 {
                tracing::warn!("logical partition {number} lies outside its extended partition");
                table.doubts += 1;
            } else {
                table.add(number, (ebr + rel) * SECTOR, n * SECTOR);
            }
        }
        if link[4] == 0 || u32_at(link, 12) == 0 {
            break;
        }
        ebr = base + u64::from(u32_at(link, 8));
    }
    Ok(())
}

/// Partitions accepted so far, and the bytes the table itself takes (no partition may cover
/// them).
struct Table {
    size: u64,
    reserved: u64,
    parts: Vec<Partition>,
    /// Entries dropped or clipped.
    doubts: u32,
}

impl Table {
    fn new(size: u64, reserved: u64) -> Self {
        Table {
            size,
            reserved,
            parts: Vec::new(),
            doubts: 0,
        }
    }

    /// Adds partition `number` of `len` bytes at `start` unless it lies outside the disk or
    /// overlaps the table or an earlier partition (logged and dropped).
    fn add(&mut self, number: u32, start: u64, len: u64) {
        if start < self.reserved || start >= self.size || len == 0 {
            tracing::warn!(
                "partition {number} ({len} bytes at {start}) is outside the disk \
                 ({} bytes, table in the first {}): ignored",
                self.size,
                self.reserved
            );
            self.doubts += 1;
            return;
        }
        let len = if len > self.size - start {
            tracing::warn!("partition {number} runs past the end of the disk: clipped");
            self.doubts += 1;
            self.size - start
        } else {
            len
        };
        if let Some(other) = self
            .parts
            .iter()
            .find(|p| start < p.start + p.len && p.start < start + len)
        {
            tracing::warn!(
                "partition {number} overlaps partition {}: ignored",
                other.number
            );
            self.doubts += 1;
            return;
        }
        self.parts.push(Partition { number, start, len });
    }
}

fn parse_gpt(
    size: u64,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<Table> {
    let last_lba = size / SECTOR - 1;
    let gpt = match read_gpt(size, 1, read_at)? {
        Ok(g) => g,
        Err(why) => {
            tracing::warn!("primary GPT header: {why}; trying the backup in the last sector");
            match read_gpt(size, last_lba, read_at)? {
                Ok(g) => g,
                Err(why) => {
                    tracing::warn!("backup GPT header: {why}; no partitions");
                    return Ok(Table::new(size, SECTOR));
                }
            }
        }
    };
    // Partitions must lie in the usable area the header declares (which excludes both copies
    // of the table); the header's own bounds are checked against the disk.
    let usable_start = gpt.first_usable * SECTOR;
    let usable_end = (gpt.last_usable + 1) * SECTOR;
    let mut table = Table::new(usable_end, usable_start);
    for (i, e) in gpt.entries.chunks_exact(gpt.entry_size).enumerate() {
        if e[..16].iter().all(|b| *b == 0) {
            continue; // unused entry
        }
        let number = i as u32 + 1;
        let (first, last) = (u64_at(e, 32), u64_at(e, 40));
        let range = last
            .checked_sub(first)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| n.checked_mul(SECTOR))
            .zip(first.checked_mul(SECTOR));
        match range {
            Some((len, start)) => table.add(number, start, len),
            None => {
                tracing::warn!("GPT entry {number}: sectors {first}..={last} are invalid");
                table.doubts += 1;
            }
        }
    }
    Ok(table)
}

/// A GPT header and its entry array, both CRC-checked.
struct Gpt {
    first_usable: u64,
    last_usable: u64,
    entry_size: usize,
    entries: Vec<u8>,
}

/// Reads the GPT header at sector `lba`. The outer error is an I/O failure; the inner one says
/// why this header cannot be used.
fn read_gpt(
    size: u64,
    lba: u64,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<Result<Gpt, String>> {
    let sectors = size / SECTOR;
    let mut hdr = [0u8; 512];
    read_at(lba * SECTOR, &mut hdr)?;
    if &hdr[..8] != GPT_SIGNATURE {
        return Ok(Err("no signature".into()));
    }
    let header_size = u32_at(&hdr, 12);
    if !(GPT_HEADER_MIN..=SECTOR as u32).contains(&header_size) {
        return Ok(Err(format!("header size {header_size} is invalid")));
    }
    let stored_crc = u32_at(&hdr, 16);
    let mut h = hdr[..header_size as usize].to_vec();
    h[16..20].fill(0);
    if crc32fast::hash(&h) != stored_crc {
        return Ok(Err("header CRC32 mismatch".into()));
    }
    let (my_lba, first_usable, last_usable) =
        (u64_at(&hdr, 24), u64_at(&hdr, 40), u64_at(&hdr, 48));
    let (entries_lba, count, entry_size) = (u64_at(&hdr, 72), u32_at(&hdr, 80), u32_at(&hdr, 84));
    if my_lba != lba {
        return Ok(Err(format!(
            "header at sector {lba} says it is at {my_lba}"
        )));
    }
    if first_usable > last_usable || last_usable >= sectors || first_usable < 2 {
        return Ok(Err(format!(
            "usable sectors {first_usable}..={last_usable} do not fit a disk of {sectors}"
        )));
    }
    if count > MAX_GPT_ENTRIES {
        return Ok(Err(format!("{count} entries (at most {MAX_GPT_ENTRIES})")));
    }
    if !(128..=4096).contains(&entry_size) || entry_size % 8 != 0 {
        return Ok(Err(format!("entry size {entry_size} is invalid")));
    }
    // At most 1024 × 4096 bytes: no overflow.
    let table_len = u64::from(entry_size) * u64::from(count);
    let table_sectors = table_len.div_ceil(SECTOR);
    let in_disk = entries_lba >= 2
        && entries_lba
            .checked_add(table_sectors)
            .is_some_and(|end| end <= sectors);
    let outside_usable = entries_lba
        .checked_add(table_sectors)
        .is_some_and(|end| end <= first_usable)
        || entries_lba > last_usable;
    if !in_disk || !outside_usable {
        return Ok(Err(format!(
            "entry array at sector {entries_lba} ({table_sectors} sectors) is misplaced"
        )));
    }
    let mut entries = vec![0u8; table_len as usize];
    read_at(entries_lba * SECTOR, &mut entries)?;
    if crc32fast::hash(&entries) != u32_at(&hdr, 88) {
        return Ok(Err("entry array CRC32 mismatch".into()));
    }
    Ok(Ok(Gpt {
        first_usable,
        last_usable,
        entry_size: entry_size as usize,
        entries,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reader(disk: &[u8]) -> impl FnMut(u64, &mut [u8]) -> io::Result<()> + '_ {
        move |off, buf| {
            let off = off as usize;
            buf.copy_from_slice(&disk[off..off + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn mbr_primary_partitions() {
        let mut disk = vec![0u8; 2 << 20];
        disk[510] = 0x55;
        disk[511] = 0xaa;
        let mut put = |i: usize, kind: u8, start: u32, sectors: u32| {
            let e = 446 + 16 * i;
            disk[e + 4] = kind;
            disk[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
            disk[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
        };
        put(0, 0x83, 2048, 100);
        put(1, 0x05, 4096, 100); // extended, with no boot record: no logical partitions
        put(3, 0x83, 3000, 1_000_000); // clipped to the disk
        let parts = parse(disk.len() as u64, &mut reader(&disk)).unwrap();
        assert_eq!(
            parts,
            vec![
                Partition {
                    number: 1,
                    start: 2048 * 512,
                    len: 100 * 512
                },
                Partition {
                    number: 4,
                    start: 3000 * 512,
                    len: (2 << 20) - 3000 * 512
                },
            ]
        );
    }

    /// A GPT disk of `sectors` sectors with `count` entries of 128 bytes (primary at LBA 1,
    /// backup at the last LBA) whose entries are `(first, last)` sector pairs.
    fn gpt_disk(sectors: u64, count: u32, parts: &[(u64, u64)]) -> Vec<u8> {
        let mut disk = vec![0u8; (sectors * SECTOR) as usize];
        disk[446 + 4] = MBR_PROTECTIVE;
        disk[510] = 0x55;
        disk[511] = 0xaa;
        let mut entries = vec![0u8; count as usize * 128];
        for (i, &(first, last)) in parts.iter().enumerate() {
            let e = &mut entries[i * 128..(i + 1) * 128];
            e[..16].fill(0xaa); // type GUID
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
        }
        let table_sectors = (count as u64 * 128).div_ceil(SECTOR);
        let last = sectors - 1;
        for (my, other, entries_lba) in [(1, last, 2), (last, 1, last - table_sectors)] {
            let at = (entries_lba * SECTOR) as usize;
            disk[at..at + entries.len()].copy_from_slice(&entries);
            let mut h = [0u8; 92];
            h[..8].copy_from_slice(GPT_SIGNATURE);
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&my.to_le_bytes());
            h[32..40].copy_from_slice(&other.to_le_bytes());
            h[40..48].copy_from_slice(&(2 + table_sectors).to_le_bytes());
            h[48..56].copy_from_slice(&(last - table_sectors - 1).to_le_bytes());
            h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
            h[80..84].copy_from_slice(&count.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
            let crc = crc32fast::hash(&h);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            let at = (my * SECTOR) as usize;
            disk[at..at + 92].copy_from_slice(&h);
        }
        disk
    }

    fn part(number: u32, first: u64, last: u64) -> Partition {
        Partition {
            number,
            start: first * SECTOR,
            len: (last - first + 1) * SECTOR,
        }
    }

    #[test]
    fn gpt_partitions() {
        let disk = gpt_disk(2048, 128, &[(40, 999), (1000, 1999)]);
        let parts = parse(disk.len() as u64, &mut reader(&disk)).unwrap();
        assert_eq!(parts, vec![part(1, 40, 999), part(2, 1000, 1999)]);
    }

    /// Old code: 1024 partitions of the whole disk, each opened as a file system and scanned
    /// for its stored bytes before the mount became ready; now overlapping ones are dropped.
    #[test]
    fn gpt_overlapping_whole_disk_entries_keep_only_the_first() {
        let whole = (2 + 256, 4096 - 256 - 2);
        let disk = gpt_disk(4096, 1024, &[whole; 1024]);
        let parts = parse(disk.len() as u64, &mut reader(&disk)).unwrap();
        assert_eq!(parts, vec![part(1, whole.0, whole.1)]);
    }

    /// Old code: `last - first + 1` overflowed (panic in debug builds, wrapped in release).
    #[test]
    fn gpt_entry_spanning_all_sectors_is_dropped() {
        let disk = gpt_disk(2048, 128, &[(0, u64::MAX), (40, 999), (999, 5000)]);
        let parts = parse(disk.len() as u64, &mut reader(&disk)).unwrap();
        assert_eq!(parts, vec![part(2, 40, 999)]);
    }

    /// Old code: no CRCs were checked, so a damaged primary header or entry array was used.
    #[test]
    fn gpt_crcs_are_checked_and_the_backup_used() {
        let good = gpt_disk(2048, 128, &[(40, 999)]);
        let backup = parse(good.len() as u64, &mut reader(&good)).unwrap();
        // Primary header damaged: the backup is used.
        let mut disk = good.clone();
        disk[512 + 80] = 5; // entry count, not covered by a new CRC
        assert_eq!(
            parse(disk.len() as u64, &mut reader(&disk)).unwrap(),
            backup
        );
        // Primary entry array damaged: the backup is used.
        let mut disk = good.clone();
        disk[2 * 512 + 40] ^= 1;
        assert_eq!(
            parse(disk.len() as u64, &mut reader(&disk)).unwrap(),
            backup
        );
        // Both damaged: no partitions.
        let n = disk.len();
        disk[n - 512 + 16] ^= 1;
        assert!(parse(disk.len() as u64, &mut reader(&disk))
            .unwrap()
            .is_empty());
    }

    /// The checked-in hostile fixture: a GPT whose entries overflow, overlap and leave the disk.
    #[test]
    fn hostile_gpt_fixture() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/hostile/gpt-overlap.img"
        );
        let disk = std::fs::read(path).unwrap();
        assert_eq!(
            disk,
            hostile_gpt(),
            "regenerate fixtures/hostile/gpt-overlap.img"
        );
        let parts = parse(disk.len() as u64, &mut reader(&disk)).unwrap();
        assert_eq!(parts, vec![part(2, 40, 90)]);
    }

    fn hostile_gpt() -> Vec<u8> {
        gpt_disk(
            128,
            128,
            &[
                (0, u64::MAX),
                (40, 90),
                (34, 95),
                (100, 1 << 40),
                (u64::MAX, 0),
            ],
        )
    }

    /// The checked-in fixture is what the generator makes (`ELASTIO_REGENERATE_FIXTURES=1`
    /// rewrites it after a change to the generator).
    #[test]
    fn the_gpt_fixture_matches_its_generator() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/hostile/gpt-overlap.img"
        );
        if std::env::var_os("ELASTIO_REGENERATE_FIXTURES").is_some() {
            std::fs::write(path, hostile_gpt()).unwrap();
        }
        assert!(std::fs::read(path).unwrap() == hostile_gpt());
    }

    /// Old code: both overlapping MBR partitions were shown.
    #[test]
    fn mbr_overlaps_and_the_table_sector_are_refused() {
        let mut disk = vec![0u8; 2 << 20];
        disk[510] = 0x55;
        disk[511] = 0xaa;
        for (i, (start, sectors)) in [(2048u32, 100u32), (2100, 100), (0, 10)].iter().enumerate() {
            let e = 446 + 16 * i;
            disk[e + 4] = 0x83;
            disk[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
            disk[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
        }
        let parts = parse(disk.len() as u64, &mut reader(&disk)).unwrap();
        assert_eq!(parts, vec![part(1, 2048, 2147)]);
    }

    #[test]
    fn logical_partitions_follow_the_extended_chain() {
        let mut disk = vec![0u8; 4 << 20];
        let sig = |d: &mut Vec<u8>, sector: usize| {
            d[sector * 512 + 510..sector * 512 + 512].copy_from_slice(&[0x55, 0xaa])
        };
        let put = |d: &mut Vec<u8>, sector: usize, i: usize, kind: u8, start: u32, n: u32| {
            let e = sector * 512 + 446 + 16 * i;
            d[e + 4] = kind;
            d[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
            d[e + 12..e + 16].copy_from_slice(&n.to_le_bytes());
        };
        sig(&mut disk, 0);
        put(&mut disk, 0, 0, 0x83, 2048, 100);
        put(&mut disk, 0, 1, 0x05, 4000, 4000);
        // EBR 1 at 4000: logical at 4000+10, next EBR at 4000+1000.
        sig(&mut disk, 4000);
        put(&mut disk, 4000, 0, 0x83, 10, 500);
        put(&mut disk, 4000, 1, 0x05, 1000, 600);
        // EBR 2 at 5000: logical at 5000+20, next links back to EBR 1 (a loop: ignored).
        sig(&mut disk, 5000);
        put(&mut disk, 5000, 0, 0x83, 20, 300);
        put(&mut disk, 5000, 1, 0x05, 0, 600);
        let parts = parse(disk.len() as u64, &mut reader(&disk)).unwrap();
        assert_eq!(
            parts,
            vec![
                part(1, 2048, 2147),
                part(5, 4010, 4509),
                part(6, 5020, 5319)
            ]
        );
        // A logical partition reaching past the extended partition is dropped.
        put(&mut disk, 5000, 0, 0x83, 20, 5000);
        let parts = parse(disk.len() as u64, &mut reader(&disk)).unwrap();
        assert_eq!(parts, vec![part(1, 2048, 2147), part(5, 4010, 4509)]);
    }

    #[test]
    fn no_table_means_no_partitions() {
        let disk = vec![0u8; 1 << 16];
        assert!(parse(disk.len() as u64, &mut reader(&disk))
            .unwrap()
            .is_empty());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 1024..8192), tail in any::<bool>()) {
            let mut disk = data;
            if tail { let n = disk.len(); disk[510] = 0x55; disk[511] = 0xaa; disk[446 + 4] = 0xee; let _ = n; }
            let _ = parse(disk.len() as u64, &mut reader(&disk));
        }
    }
}
