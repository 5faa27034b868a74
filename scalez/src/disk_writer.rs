//! Writing a disk RP: the one path every disk source takes (block devices and images, EBS
//! snapshots, EC2 volumes, the NBD overlay).
//!
//! ```text
//! workers ──put(bytes)──▶ zero check · keyed id · seal into packs ──▶ ids
//!                                                                      │
//! one assembler ──MapAssembly: put_at(slot, ids) | push(ids) | keep(id from the parent)
//!                 ──▶ map pages, in slot order ──finish()──▶ DiskMapRef
//! DiskWriter::commit(draft, map, bytes_read) ──▶ packs and index durable, then the catalog entry
//! ```
//!
//! Invariants: an all-zero chunk is never stored (its slot is `None`); a slot taken from the
//! parent RP is recorded as a reference of this session before the map names it, so a prune
//! running meanwhile keeps it or fails the commit ([`crate::gc`]); the map has exactly one entry
//! per slot of the disk, or nothing is committed.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::catalog::{DiskMapRef, RecoveryPoint, RpBody, RpDraft, RpFigures};
use crate::disk_map::MapBuilder;
use crate::error::{Error, Result};
use crate::ids::ChunkId;
use crate::session::{BackupSession, SessionStats};
use crate::vault::Vault;

/// Whether every byte of `data` is zero (vectorises to 16 or 32 bytes per step).
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(256);
    blocks
        .by_ref()
        .all(|b| b.iter().fold(0u8, |a, x| a | x) == 0)
        && blocks.remainder().iter().all(|b| *b == 0)
}

/// One disk RP being written: shared by the workers that [`DiskWriter::put`] data; the map is
/// assembled by one [`MapAssembly`] at a time.
pub struct DiskWriter {
    session: BackupSession,
    size: u64,
    chunk_size: u32,
}

impl DiskWriter {
    /// A writer of a disk of `size` bytes cut into the vault's chunk size.
    pub fn new(vault: &Arc<Vault>, size: u64) -> Result<Self> {
        let chunk_size = vault.config().chunk_size;
        Self::with_chunk_size(vault, size, chunk_size)
    }

    /// A writer keeping the chunk size of an existing map (an RP derived from another one).
    pub fn with_chunk_size(vault: &Arc<Vault>, size: u64, chunk_size: u32) -> Result<Self> {
        Ok(DiskWriter {
            session: BackupSession::new(vault.clone())?,
            size,
            chunk_size,
        })
    }

    pub fn chunk_size(&self) -> usize {
        self.chunk_size as usize
    }

    /// Slots of the disk (the last one may be short).
    pub fn slots(&self) -> u64 {
        self.size.div_ceil(self.chunk_size as u64)
    }

    pub fn vault(&self) -> &Arc<Vault> {
        self.session.vault()
    }

    /// Stores the chunks of `data` (whole chunks, the disk's last one may be short) and returns
    /// their ids, `None` for all-zero chunks (never stored). Safe to call from many threads.
    pub fn put(&self, data: &[u8]) -> Result<Vec<Option<ChunkId>>> {
        let keys = self.vault().keys();
        data.chunks(self.chunk_size())
            .map(|chunk| {
                if is_zero(chunk) {
                    return Ok(None);
                }
                let id = keys.chunk_id(chunk);
                self.session.store_chunk(id, chunk)?;
                Ok(Some(id))
            })
            .collect()
    }

    /// Assembles the map, in slot order; one at a time (it borrows the writer).
    pub fn map(&self) -> MapAssembly<'_> {
        MapAssembly {
            writer: self,
            builder: MapBuilder::new(self.slots()),
            next: 0,
            early: BTreeMap::new(),
        }
    }

    /// Flushes every pack and index object, then makes the RP of `draft` visible with `map`.
    /// `bytes_read`: what the source read (for the RP's figures).
    pub fn commit(
        mut self,
        draft: RpDraft,
        map: DiskMapRef,
        bytes_read: u64,
    ) -> Result<(RecoveryPoint, SessionStats)> {
        let stats = self.session.finish()?;
        let rp = draft.finish(
            RpBody::Disk(map),
            RpFigures::stored(self.size, bytes_read, &stats),
        );
        self.session.commit(&rp)?;
        Ok((rp, stats))
    }

    /// Flushes every pack and index object, then makes `rp` visible as it is (a copy of an RP
    /// from another vault, whose map this writer assembled: [`crate::copy`]).
    /// `check` runs once everything is flushed and indexed, before the RP becomes visible.
    pub(crate) fn commit_as(
        mut self,
        rp: &RecoveryPoint,
        check: impl FnOnce(&RecoveryPoint) -> Result<()>,
    ) -> Result<SessionStats> {
        let stats = self.session.finish()?;
        check(rp)?;
        self.session.commit(rp)?;
        Ok(stats)
    }

    /// Gives up the RP: flushes what was stored (it stays unreferenced until a prune) and returns
    /// the session's own error, if it had one — the real cause behind a worker's "the pack writer
    /// stopped".
    pub fn abandon(self) -> Option<Error> {
        self.session.abandon()
    }
}

/// The map of a [`DiskWriter`]'s RP, filled in slot order.
pub struct MapAssembly<'w> {
    writer: &'w DiskWriter,
    builder: MapBuilder,
    /// The next slot the map needs.
    next: u64,
    /// Runs [`MapAssembly::put_at`] received ahead of `next`, by first slot.
    early: BTreeMap<u64, Vec<Option<ChunkId>>>,
}

impl MapAssembly<'_> {
    /// The next slot the map needs.
    pub fn next_slot(&self) -> u64 {
        self.next
    }

    /// Appends the ids of the next slots.
    pub fn push(&mut self, ids: impl IntoIterator<Item = Option<ChunkId>>) -> Result<()> {
        let session = &self.writer.session;
        let mut store = |page: Vec<u8>| session.store_blob(&page);
        for id in ids {
            if self.next == self.writer.slots() {
                return Err(self.overrun());
            }
            self.builder.push(id, &mut store)?;
            self.next += 1;
        }
        Ok(())
    }

    /// Places the ids of slots `first..` from workers that finish out of order; runs are
    /// appended once every slot before them is in.
    pub fn put_at(&mut self, first: u64, ids: Vec<Option<ChunkId>>) -> Result<()> {
        self.early.insert(first, ids);
        while let Some(ids) = self.early.remove(&self.next) {
            self.push(ids)?;
        }
        Ok(())
    }

    /// Appends a slot taken unchanged from the parent RP. Its chunk is recorded as referenced
    /// by this session first, so a prune cannot delete it before the commit (or the commit
    /// fails); a chunk the vault no longer has is an error now.
    pub fn keep(&mut self, id: Option<ChunkId>) -> Result<()> {
        if let Some(id) = &id {
            self.writer.session.note_reference(id)?;
        }
        self.push([id])
    }

    /// Writes the last map pages and returns the map, once every slot is in.
    pub fn finish(self) -> Result<DiskMapRef> {
        let slots = self.writer.slots();
        if self.next != slots || !self.early.is_empty() {
            return Err(Error::SessionFailed(format!(
                "the disk map is incomplete: {} of {slots} slots in order",
                self.next
            )));
        }
        let session = &self.writer.session;
        let depth = self.builder.depth();
        let root = self
            .builder
            .finish(&mut |page: Vec<u8>| session.store_blob(&page))?;
        Ok(DiskMapRef {
            chunk_size: self.writer.chunk_size,
            size: self.writer.size,
            depth,
            root,
        })
    }

    fn overrun(&self) -> Error {
        Error::SessionFailed(format!(
            "more chunks than the disk's {} slots",
            self.writer.slots()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Asset;
    use crate::reader::DiskReader;
    use crate::testing::memory_vault;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 100_003];
        assert!(is_zero(&v));
        assert!(is_zero(&v[1..]));
        for i in [0, 1, 17, 255, 256, 50_000, 100_002] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            assert!(!is_zero(&v[i..]), "from byte {i}");
            v[i] = 0;
        }
    }

    fn asset() -> Asset {
        Asset {
            name: "disk".into(),
            host: "here".into(),
        }
    }

    #[test]
    fn out_of_order_runs_and_kept_slots_make_one_map() {
        let vault = memory_vault(4096);
        let disk: Vec<u8> = (0..5 * 4096 + 100).map(|i| (i / 4096 + 1) as u8).collect();
        // A full RP, its workers finishing in reverse order.
        let w = DiskWriter::new(&vault, disk.len() as u64).unwrap();
        let mut map = w.map();
        for first in (0..6u64).rev() {
            let at = first as usize * 4096;
            let ids = w.put(&disk[at..(at + 4096).min(disk.len())]).unwrap();
            map.put_at(first, ids).unwrap();
        }
        let map = map.finish().unwrap();
        let draft = RpDraft::new(asset(), None, Default::default());
        let (full, _) = w.commit(draft, map.clone(), disk.len() as u64).unwrap();
        let read = |m: &DiskMapRef| {
            let mut out = vec![0u8; m.size as usize];
            DiskReader::new(vault.clone(), m.clone(), 1 << 20)
                .read_at(0, &mut out)
                .unwrap();
            out
        };
        assert_eq!(read(&map), disk);
        // An incremental one: slot 2 zeroed, the rest kept from the parent.
        let parent = DiskReader::new(vault.clone(), map.clone(), 1 << 20);
        let w = DiskWriter::with_chunk_size(&vault, disk.len() as u64, 4096).unwrap();
        let mut m = w.map();
        for slot in 0..6 {
            if slot == 2 {
                m.push(w.put(&[0u8; 4096]).unwrap()).unwrap();
            } else {
                m.keep(parent.chunk_id(slot).unwrap()).unwrap();
            }
        }
        let map2 = m.finish().unwrap();
        let draft = RpDraft::new(asset(), Some(full.id.clone()), Default::default());
        w.commit(draft, map2.clone(), 4096).unwrap();
        let mut want = disk.clone();
        want[2 * 4096..3 * 4096].fill(0);
        assert_eq!(read(&map2), want);
        // A map short of slots, or given too many, is refused and nothing is committed.
        let w = DiskWriter::new(&vault, 3 * 4096).unwrap();
        let mut m = w.map();
        m.push([None, None]).unwrap();
        assert!(m.finish().is_err());
        let mut m = w.map();
        assert!(m.push([None, None, None, None]).is_err());
        // A kept chunk the vault does not have fails at once.
        let mut m = w.map();
        assert!(m.keep(Some(ChunkId([7; 32]))).is_err());
        assert!(w.abandon().is_none());
        assert_eq!(vault.list_rps().unwrap().len(), 2);
    }
}
