//! Partition tables (MBR and GPT) parsed from a disk image, so a mount can show each partition as
//! its own file. Pure: the caller supplies a reader. Extended MBR partitions are not followed.

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
/// Sanity bound on GPT entries (the spec's default is 128).
const MAX_GPT_ENTRIES: u32 = 1024;

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
}

/// The partitions of a disk of `size` bytes, read through `read_at(offset, buf)`. A disk without
/// a recognised table has none (it may hold a bare file system).
pub fn parse(
    size: u64,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<Vec<Partition>> {
    if size < 2 * SECTOR {
        return Ok(Vec::new());
    }
    let mut mbr = [0u8; 512];
    read_at(0, &mut mbr)?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Ok(Vec::new());
    }
    let entries: Vec<&[u8]> = (0..4)
        .map(|i| &mbr[446 + 16 * i..446 + 16 * (i + 1)])
        .collect();
    if entries.iter().any(|e| e[4] == MBR_PROTECTIVE) {
        return parse_gpt(size, read_at);
    }
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let (kind, start, sectors) = (e[4], u32_at(e, 8) as u64, u32_at(e, 12) as u64);
        if kind == 0 || MBR_EXTENDED.contains(&kind) || sectors == 0 {
            continue;
        }
        push_clipped(
            &mut out,
            i as u32 + 1,
            start * SECTOR,
            sectors * SECTOR,
            size,
        );
    }
    Ok(out)
}

fn push_clipped(out: &mut Vec<Partition>, number: u32, start: u64, len: u64, size: u64) {
    if start >= size || len == 0 {
        return;
    }
    out.push(Partition {
        number,
        start,
        len: len.min(size - start),
    });
}

fn parse_gpt(
    size: u64,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<Vec<Partition>> {
    let mut hdr = [0u8; 512];
    read_at(SECTOR, &mut hdr)?;
    if &hdr[..8] != GPT_SIGNATURE {
        return Ok(Vec::new());
    }
    let entries_lba = u64_at(&hdr, 72);
    let count = u32_at(&hdr, 80).min(MAX_GPT_ENTRIES);
    let entry_size = u32_at(&hdr, 84) as u64;
    if !(128..=4096).contains(&entry_size) {
        return Ok(Vec::new());
    }
    let table_start = entries_lba.saturating_mul(SECTOR);
    let table_len = entry_size * count as u64;
    if table_start.saturating_add(table_len) > size {
        return Ok(Vec::new());
    }
    let mut table = vec![0u8; table_len as usize];
    read_at(table_start, &mut table)?;
    let mut out = Vec::new();
    for (i, e) in table.chunks_exact(entry_size as usize).enumerate() {
        if e[..16].iter().all(|b| *b == 0) {
            continue; // unused entry
        }
        let (first, last) = (u64_at(e, 32), u64_at(e, 40));
        if last < first {
            continue;
        }
        let len = (last - first + 1).saturating_mul(SECTOR);
        push_clipped(
            &mut out,
            i as u32 + 1,
            first.saturating_mul(SECTOR),
            len,
            size,
        );
    }
    Ok(out)
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
        put(1, 0x05, 4096, 100); // extended: skipped
        put(3, 0x83, 1000, 1_000_000); // clipped to the disk
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
                    start: 1000 * 512,
                    len: (2 << 20) - 1000 * 512
                },
            ]
        );
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
