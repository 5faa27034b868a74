//! A copy-on-write overlay over a disk RP: writes land in a local sparse file, never in the vault.
//!
//! The overlay tracks which chunk-sized slots it holds. The first write to a slot copies the RP's
//! chunk into the overlay file (unless the write covers the whole slot), then applies the write;
//! reads of such slots come from the file, all others from the RP. Zeroing a whole slot punches a
//! hole in the file. The file is unlinked as soon as it is created, so it disappears with the
//! process; [`save_as_rp`] turns the overlay into a new recovery point of the same asset.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use scalez::disk_map::{MapReader, Page};
use scalez::disk_writer::DiskWriter;
use scalez::reader::DiskReader;
use scalez::{ChunkId, RecoveryPoint, RpDraft, Vault};

pub struct Overlay {
    base: Arc<DiskReader>,
    file: File,
    /// Slots whose current content lives in `file`.
    dirty: Mutex<BTreeSet<u64>>,
    cs: u64,
    size: u64,
}

impl Overlay {
    /// Creates the overlay's sparse file in `dir`, nameless: `O_TMPFILE` (mode 0600), so the
    /// writes to the disk (often secrets) are never reachable by a name. Where the file
    /// system lacks `O_TMPFILE`, a 0600 file under a random name, created exclusively without
    /// following symlinks and unlinked at once.
    pub fn create(base: Arc<DiskReader>, dir: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
        {
            Ok(f) => f,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
                let path = dir.join(format!(".elastio-overlay-{:032x}", rand::random::<u128>()));
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)?;
                std::fs::remove_file(&path)?;
                f
            }
            Err(e) => return Err(e),
        };
        file.set_len(base.size())?;
        Ok(Overlay {
            cs: base.chunk_size() as u64,
            size: base.size(),
            base,
            file,
            dirty: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn base(&self) -> &Arc<DiskReader> {
        &self.base
    }

    fn slot_len(&self, slot: u64) -> u64 {
        self.cs.min(self.size - slot * self.cs)
    }

    /// Splits `[offset, offset+len)` into (slot, offset within slot, length) pieces.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let slot = pos / self.cs;
            let within = pos % self.cs;
            let n = (self.cs - within).min(end - pos);
            pos += n;
            Some((slot, within, n))
        })
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        for (slot, within, n) in self.pieces(offset, buf.len() as u64) {
            let dst = &mut buf[done..done + n as usize];
            if self.dirty.lock().unwrap().contains(&slot) {
                self.file.read_exact_at(dst, slot * self.cs + within)?;
            } else {
                self.base.read_at(slot * self.cs + within, dst)?;
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Makes `slot` live in the overlay, copying the RP's bytes unless `whole` is overwritten.
    fn own(&self, slot: u64, whole: bool) -> io::Result<()> {
        let mut dirty = self.dirty.lock().unwrap();
        if dirty.contains(&slot) {
            return Ok(());
        }
        if !whole {
            if let Some(chunk) = self.base.slot(slot)? {
                self.file.write_all_at(&chunk, slot * self.cs)?;
            }
        }
        dirty.insert(slot);
        Ok(())
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut done = 0usize;
        for (slot, within, n) in self.pieces(offset, data.len() as u64) {
            self.own(slot, within == 0 && n == self.slot_len(slot))?;
            self.file
                .write_all_at(&data[done..done + n as usize], slot * self.cs + within)?;
            done += n as usize;
        }
        Ok(())
    }

    /// TRIM and WRITE_ZEROES: whole slots become holes in the overlay file.
    pub fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        for (slot, within, n) in self.pieces(offset, len) {
            let whole = within == 0 && n == self.slot_len(slot);
            self.own(slot, whole)?;
            punch_hole(&self.file, slot * self.cs + within, n)?;
        }
        Ok(())
    }

    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Like [`DiskReader::extents`], counting overlay slots as data.
    pub fn extents(&self, offset: u64, len: u64, max_runs: usize) -> io::Result<Vec<(u64, bool)>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        for (slot, _, n) in self.pieces(offset, end.saturating_sub(offset)) {
            let data =
                self.dirty.lock().unwrap().contains(&slot) || self.base.chunk_id(slot)?.is_some();
            if let Some((l, _)) = runs.last_mut().filter(|(_, d)| *d == data) {
                *l += n;
            } else if runs.len() == max_runs {
                break;
            } else {
                runs.push((n, data));
            }
        }
        Ok(runs)
    }

    pub fn dirty_slots(&self) -> usize {
        self.dirty.lock().unwrap().len()
    }
}

#[allow(unsafe_code)]
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an fd we own; no memory is involved.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    // File systems without hole punching: write zeros.
    let zeros = vec![0u8; len as usize];
    file.write_all_at(&zeros, offset)
}

/// Turns `overlay` over `base` into a new RP of the same asset (parent: `base`). Only the slots
/// the overlay holds are read and hashed; the rest of the map is taken from `base` as it is.
pub fn save_as_rp(
    vault: &Arc<Vault>,
    base: &RecoveryPoint,
    overlay: &Overlay,
) -> scalez::Result<RecoveryPoint> {
    let map = base.disk()?.clone();
    let mut tags = base.tags.clone();
    tags.insert(
        "elastio:source".into(),
        format!("nbd overlay of {}", base.id),
    );
    let draft = RpDraft::new(base.asset.clone(), Some(base.id.clone()), tags);
    let cs = map.chunk_size as u64;
    let dirty: BTreeSet<u64> = overlay.dirty.lock().unwrap().clone();
    let writer = DiskWriter::with_chunk_size(vault, map.size, map.chunk_size)?;
    let mut out = writer.map();
    let mut load =
        |id: &ChunkId| -> scalez::Result<Arc<Page>> { Ok(Arc::new(vault.load_page(id)?)) };
    let mut bytes_read = 0u64;
    let walked = MapReader::of(&map, &mut load).walk(&mut |first, entries| {
        for (i, entry) in entries.iter().enumerate() {
            let slot = first + i as u64;
            if !dirty.contains(&slot) {
                out.keep(*entry)?;
                continue;
            }
            let mut buf = vec![0u8; cs.min(map.size - slot * cs) as usize];
            overlay
                .file
                .read_exact_at(&mut buf, slot * cs)
                .map_err(|e| scalez::Error::SessionFailed(format!("reading the overlay: {e}")))?;
            bytes_read += buf.len() as u64;
            out.push(writer.put(&buf)?)?;
        }
        Ok(())
    });
    let map = match walked.and_then(|()| out.finish()) {
        Ok(map) => map,
        // A stopped pack writer is explained by the session's own error.
        Err(e) => {
            return Err(match (e, writer.abandon()) {
                (scalez::Error::WriterStopped { .. }, Some(real)) => real,
                (e, _) => e,
            })
        }
    };
    Ok(writer.commit(draft, map, bytes_read)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use scalez::catalog::Asset;
    use scalez::{RpBody, RpFigures};

    const CS: usize = 4096;

    /// A vault holding one disk RP of `disk` on a 4 KiB grid.
    fn disk_rp(disk: &[u8]) -> (Arc<Vault>, RecoveryPoint) {
        let vault = scalez::testing::memory_vault(CS as u32);
        let map = scalez::testing::store_disk(&vault, disk);
        let asset = Asset {
            name: "disk".into(),
            host: "h".into(),
        };
        let rp = RpDraft::new(asset, None, Default::default()).finish(
            RpBody::Disk(map),
            RpFigures {
                logical_size: disk.len() as u64,
                ..Default::default()
            },
        );
        vault.commit_rp(&rp).unwrap();
        (vault, rp)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        Zero(u64, u64),
    }

    fn op(size: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..size, proptest::collection::vec(any::<u8>(), 1..3 * CS)).prop_map(move |(o, d)| {
                let n = d.len().min((size - o) as usize);
                Op::Write(o, d[..n].to_vec())
            }),
            (0..size, 1..3 * CS as u64).prop_map(move |(o, n)| Op::Zero(o, n.min(size - o))),
        ]
    }

    /// The overlay holds what a client writes to the disk (often secrets): it used to be a
    /// 0644 file with a predictable name in /tmp until unlinked. Now it never has a name, and
    /// its mode is 0600.
    #[test]
    fn the_overlay_file_is_nameless_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let (vault, rp) = disk_rp(&vec![7u8; 2 * CS]);
        let reader = Arc::new(DiskReader::new(vault, rp.disk().unwrap().clone(), 1 << 20));
        let dir = tempfile::tempdir().unwrap();
        let overlay = Overlay::create(reader, dir.path()).unwrap();
        overlay.write_at(0, b"secret").unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mode = overlay.file.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Any sequence of writes and zeroings reads back like the same edits on a plain buffer,
        /// and saving the overlay produces an RP with exactly those bytes.
        #[test]
        fn overlay_behaves_like_a_buffer(ops in proptest::collection::vec(op(5 * CS as u64 + 1000), 1..12)) {
            let mut model: Vec<u8> = (0..5 * CS + 1000).map(|i| if i / CS == 1 { 0 } else { (i % 251) as u8 }).collect();
            let (vault, rp) = disk_rp(&model);
            let reader = Arc::new(DiskReader::new(vault.clone(), rp.disk().unwrap().clone(), 1 << 20));
            let dir = tempfile::tempdir().unwrap();
            let overlay = Overlay::create(reader, dir.path()).unwrap();
            for o in &ops {
                match o {
                    Op::Write(off, d) => {
                        overlay.write_at(*off, d).unwrap();
                        model[*off as usize..*off as usize + d.len()].copy_from_slice(d);
                    }
                    Op::Zero(off, n) => {
                        overlay.zero(*off, *n).unwrap();
                        model[*off as usize..(*off + *n) as usize].fill(0);
                    }
                }
            }
            let mut got = vec![0u8; model.len()];
            overlay.read_at(0, &mut got).unwrap();
            prop_assert_eq!(&got, &model);
            prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the overlay file is unlinked");

            let saved = save_as_rp(&vault, &rp, &overlay).unwrap();
            prop_assert_eq!(saved.parent.as_ref(), Some(&rp.id));
            let back = DiskReader::new(vault.clone(), saved.disk().unwrap().clone(), 1 << 20);
            let mut restored = vec![0u8; model.len()];
            back.read_at(0, &mut restored).unwrap();
            prop_assert_eq!(&restored, &model);
        }
    }
}
