//! Reading chunks back: one chunk, or the chunks of several disk slots with one coalesced
//! ranged read (the **planner**: [`ReadRun`] groups chunks of one pack that a single request can
//! cover; [`FetchedChunks`] fetches them, then decodes each in place into its slot's buffer).
//!
//! Every byte is authenticated (AEAD bound to the chunk id) and, with [`Verify::Rehash`],
//! re-hashed to its id. A pack that vanished under a reader (a prune moved its live chunks) is
//! looked up again after one [`Vault::refresh`].

use std::collections::{HashMap, HashSet};

use crate::catalog;
use crate::disk_map::Page;
use crate::error::{Error, Result};
use crate::ids::ChunkId;
use crate::index::Location;
use crate::pack::chunk_aad;
use crate::store::StoreError;
use crate::vault::{Vault, Verify};

/// Bytes of unrelated data a coalesced read may fetch and skip.
pub const COALESCE_GAP: u64 = 256 * 1024;
/// Largest span of a pack one coalesced read fetches (large ranged GETs are what make S3 fast:
/// ~170 MB/s in 256 KiB requests, ~780 MB/s in 4 MiB ones on Ceph RGW here).
pub const COALESCE_MAX: u64 = 8 << 20;

/// Sealed disk chunks fetched by [`FetchedChunks::fetch`], to be opened by
/// [`FetchedChunks::open_to`].
pub struct FetchedChunks {
    /// One range holds every chunk; otherwise one range per slot.
    coalesced: bool,
    ranges: Vec<FetchedRange>,
    locs: Vec<Location>,
}

struct FetchedRange {
    key: String,
    start: u64,
    bytes: Vec<u8>,
}

/// A byte range of one pack that a coalesced read will fetch.
#[derive(Debug, Clone, Copy)]
pub struct ReadRun {
    pack: crate::ids::PackId,
    start: u64,
    end: u64,
    /// Bytes of wanted chunks inside the span.
    wanted: u64,
}

impl Vault {
    /// Fetches, authenticates, decompresses and re-hashes one chunk (or map page).
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.fetch_chunk(id, Verify::Rehash, &mut Vec::new())
    }

    /// [`Vault::read_chunk`] for a chunk whose length `what` (the structure naming it) records:
    /// any other length is damage. Decodes into one of the `spare` buffers when there is one.
    pub fn read_chunk_sized(
        &self,
        id: &ChunkId,
        len: u32,
        what: &str,
        spare: &mut Vec<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let data = self.fetch_chunk(id, Verify::Rehash, spare)?;
        if data.len() != len as usize {
            return Err(self.chunk_len_error(id, data.len(), len, what));
        }
        Ok(data)
    }

    /// Chunk `id` has `have` bytes where `what` says `len`: damage, named by the chunk's pack.
    pub(crate) fn chunk_len_error(&self, id: &ChunkId, have: usize, len: u32, what: &str) -> Error {
        let key = self.locate(id).map(|l| l.pack.key()).unwrap_or_default();
        self.corrupt(
            &key,
            format!("chunk {id} has {have} bytes, {what} says {len}"),
        )
    }

    fn fetch_chunk(
        &self,
        id: &ChunkId,
        verify: Verify,
        spare: &mut Vec<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        self.fetch(id, verify, false, spare)
    }

    /// `meta`: the chunk is metadata (a map page), which a caching store may keep locally. A
    /// pack that vanished (prune moved its live chunks elsewhere) triggers one [`Vault::refresh`]
    /// and a second attempt at the chunk's new location.
    ///
    /// `spare`: recycled buffers; the plaintext goes into one of them when there is one.
    fn fetch(
        &self,
        id: &ChunkId,
        verify: Verify,
        meta: bool,
        spare: &mut Vec<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        self.after_refresh(|| self.fetch_once(id, verify, meta, &mut *spare))
    }

    /// Runs `read`, and once more after a [`Vault::refresh`] if an object it needed is gone (a
    /// prune moved the live chunks of a pack elsewhere since the index was read).
    fn after_refresh<T>(&self, mut read: impl FnMut() -> Result<T>) -> Result<T> {
        match read() {
            // A pack gone (repacked by a prune), or a chunk this handle's index lacks: an
            // index object a prune rewrote between this handle's listing and its read of it
            // (the entries moved to an object the listing did not have). Both are found again
            // in the index as it is now.
            Err(Error::Store(e)) if e.is_not_found() => {
                self.refresh()?;
                read()
            }
            Err(Error::MissingChunk { .. }) => {
                self.refresh()?;
                read()
            }
            r => r,
        }
    }

    fn fetch_once(
        &self,
        id: &ChunkId,
        verify: Verify,
        meta: bool,
        spare: &mut Vec<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let loc = self.locate(id).ok_or_else(|| Error::MissingChunk {
            location: self.location(),
            chunk: *id,
        })?;
        let key = loc.pack.key();
        let range = loc.offset as u64..loc.offset as u64 + loc.len as u64;
        let sealed = if meta {
            self.store().get_range_meta(&key, range)
        } else {
            self.store().get_range(&key, range)
        };
        let mut sealed = sealed.map_err(|e| match e {
            StoreError::BadRange { .. } => self.corrupt(
                &key,
                format!("pack is shorter than chunk {id} needs (truncated)"),
            ),
            e => e.into(),
        })?;
        let out = spare.pop().unwrap_or_default();
        self.open_chunk_in_place(id, &key, &loc, &mut sealed, verify, out)
    }

    /// Authenticates, decompresses and (if asked) re-hashes one sealed chunk.
    pub(crate) fn open_chunk(
        &self,
        id: &ChunkId,
        key: &str,
        loc: &Location,
        sealed: &[u8],
        verify: Verify,
    ) -> Result<Vec<u8>> {
        self.open_chunk_in_place(id, key, loc, &mut sealed.to_vec(), verify, Vec::new())
    }

    /// [`Vault::open_chunk`] decrypting inside `sealed`, for callers that own the fetched bytes,
    /// into `out` (a recycled buffer, or empty).
    fn open_chunk_in_place(
        &self,
        id: &ChunkId,
        key: &str,
        loc: &Location,
        sealed: &mut [u8],
        verify: Verify,
        out: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let plain = self
            .keys()
            .open_in_place_into(&chunk_aad(id), sealed, out)
            .map_err(|e| self.corrupt(key, format!("chunk {id} at offset {}: {e}", loc.offset)))?;
        if verify == Verify::Rehash && self.keys().chunk_id(&plain) != *id {
            return Err(self.corrupt(key, format!("chunk {id} content does not match its id")));
        }
        Ok(plain)
    }

    /// Reads the chunk at `slot` of a disk map and checks its length: every slot holds a whole
    /// chunk except a disk's short last one.
    pub fn read_disk_chunk(
        &self,
        map: &catalog::DiskMapRef,
        slot: u64,
        id: &ChunkId,
        verify: Verify,
    ) -> Result<Vec<u8>> {
        self.read_disk_chunk_with(map, slot, id, verify, &mut Vec::new())
    }

    /// [`Vault::read_disk_chunk`] decoding into one of the `spare` buffers when there is one
    /// (readers that recycle evicted chunks skip faulting in fresh memory for every chunk).
    pub fn read_disk_chunk_with(
        &self,
        map: &catalog::DiskMapRef,
        slot: u64,
        id: &ChunkId,
        verify: Verify,
        spare: &mut Vec<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let data = self.fetch_chunk(id, verify, spare)?;
        self.check_slot_len(map, slot, id, data)
    }

    /// Every slot holds a whole chunk except a disk's short last one.
    fn check_slot_len(
        &self,
        map: &catalog::DiskMapRef,
        slot: u64,
        id: &ChunkId,
        data: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let cs = map.chunk_size as u64;
        let want = cs.min(map.size.saturating_sub(slot * cs)) as usize;
        if data.len() != want {
            return Err(self.slot_len_error(slot, id, data.len(), want));
        }
        Ok(data)
    }

    fn slot_len_error(&self, slot: u64, id: &ChunkId, have: usize, want: usize) -> Error {
        let key = self.locate(id).map(|l| l.pack.key()).unwrap_or_default();
        self.corrupt(
            &key,
            format!("chunk {id} has {have} bytes, disk slot {slot} needs {want}"),
        )
    }

    /// Reads the chunks of several disk slots with a single ranged read when one can cover them
    /// all (see [`ReadRun::extend`]: one request on S3 instead of one per chunk), then
    /// authenticates and decodes each. Falls back to one read per chunk otherwise.
    pub fn read_disk_chunks(
        &self,
        map: &catalog::DiskMapRef,
        slots: &[(u64, ChunkId)],
        verify: Verify,
    ) -> Result<Vec<Vec<u8>>> {
        self.read_disk_chunks_with(map, slots, verify, &mut Vec::new())
    }

    /// [`Vault::read_disk_chunks`] decoding into the `spare` buffers while they last.
    pub fn read_disk_chunks_with(
        &self,
        map: &catalog::DiskMapRef,
        slots: &[(u64, ChunkId)],
        verify: Verify,
        spare: &mut Vec<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>> {
        self.after_refresh(|| self.read_disk_chunks_once(map, slots, verify, &mut *spare))
    }

    fn read_disk_chunks_once(
        &self,
        map: &catalog::DiskMapRef,
        slots: &[(u64, ChunkId)],
        verify: Verify,
        spare: &mut Vec<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>> {
        let coalesced = slots.len() > 1 && {
            let mut run = ReadRun::start(self, &slots[0].1);
            slots[1..]
                .iter()
                .all(|(_, id)| run.as_mut().is_some_and(|r| r.extend(self, id)))
        };
        let locs: Option<Vec<Location>> = slots.iter().map(|(_, id)| self.locate(id)).collect();
        let (Some(locs), true) = (locs, coalesced) else {
            return slots
                .iter()
                .map(|(slot, id)| self.read_disk_chunk_with(map, *slot, id, verify, spare))
                .collect();
        };
        let FetchedRange {
            key,
            start,
            mut bytes,
        } = self.fetch_range(&locs)?;
        // Chunks are decrypted where they lie in the fetched range. A chunk listed twice (the
        // same content at two slots) is opened once and its plaintext kept for the repeat.
        let mut seen = HashSet::new();
        let repeated: HashSet<u32> = locs
            .iter()
            .filter(|l| !seen.insert(l.offset))
            .map(|l| l.offset)
            .collect();
        let mut opened: HashMap<u32, Vec<u8>> = HashMap::new();
        slots
            .iter()
            .zip(&locs)
            .map(|((slot, id), loc)| {
                let plain = match opened.get(&loc.offset) {
                    Some(p) => p.clone(),
                    None => {
                        let at = (loc.offset as u64 - start) as usize;
                        let sealed = &mut bytes[at..at + loc.len as usize];
                        let out = spare.pop().unwrap_or_default();
                        let p = self.open_chunk_in_place(id, &key, loc, sealed, verify, out)?;
                        if repeated.contains(&loc.offset) {
                            opened.insert(loc.offset, p.clone());
                        }
                        p
                    }
                };
                self.check_slot_len(map, *slot, id, plain)
            })
            .collect()
    }

    /// [`Vault::read_disk_chunks`] writing each slot's plaintext into `dst` (one slice per slot,
    /// each exactly the slot's length) instead of returning buffers: a restore decodes straight
    /// into the aligned buffer it writes from, with no copy and no fresh memory per chunk.
    pub fn read_disk_chunks_to(
        &self,
        map: &catalog::DiskMapRef,
        slots: &[(u64, ChunkId)],
        verify: Verify,
        dst: &mut [&mut [u8]],
    ) -> Result<()> {
        let fetched = FetchedChunks::fetch(self, slots)?;
        fetched.open_to(self, map, slots, verify, dst)
    }

    /// One ranged read covering the chunks at `locs` (all in one pack).
    fn fetch_range(&self, locs: &[Location]) -> Result<FetchedRange> {
        let key = locs[0].pack.key();
        let start = locs.iter().map(|l| l.offset as u64).min().unwrap_or(0);
        let end = locs
            .iter()
            .map(|l| l.offset as u64 + l.len as u64)
            .max()
            .unwrap_or(0);
        let bytes = self
            .store()
            .get_range(&key, start..end)
            .map_err(|e| match e {
                StoreError::BadRange { .. } => {
                    self.corrupt(&key, "pack is shorter than its index says (truncated)")
                }
                e => e.into(),
            })?;
        Ok(FetchedRange { key, start, bytes })
    }

    pub fn load_page(&self, id: &ChunkId) -> Result<Page> {
        let bytes = self.fetch(id, Verify::Rehash, true, &mut Vec::new())?;
        Page::decode(&bytes).map_err(|e| {
            let key = self.locate(id).map(|l| l.pack.key()).unwrap_or_default();
            self.corrupt(&key, format!("map page {id}: {e}"))
        })
    }
}

impl ReadRun {
    /// Starts a coalesced read at chunk `id` (None if the chunk is not in the index).
    pub fn start(vault: &Vault, id: &ChunkId) -> Option<ReadRun> {
        let l = vault.locate(id)?;
        Some(ReadRun {
            pack: l.pack,
            start: l.offset as u64,
            end: l.offset as u64 + l.len as u64,
            wanted: l.len as u64,
        })
    }

    /// Adds chunk `id` to `run` if one ranged read can still cover them all: same pack, the
    /// span at most [`COALESCE_MAX`] bytes, of which at most [`COALESCE_GAP`] not wanted.
    /// Chunks need not be in order (parallel backup workers interleave them a little).
    pub fn extend(&mut self, vault: &Vault, id: &ChunkId) -> bool {
        let Some(l) = vault.locate(id) else {
            return false;
        };
        let (s, e) = (l.offset as u64, l.offset as u64 + l.len as u64);
        let (start, end) = (self.start.min(s), self.end.max(e));
        let wanted = self.wanted + l.len as u64;
        if l.pack != self.pack || end - start > COALESCE_MAX || end - start > wanted + COALESCE_GAP
        {
            return false;
        }
        *self = ReadRun {
            pack: self.pack,
            start,
            end,
            wanted,
        };
        true
    }
}

impl FetchedChunks {
    /// The first half of [`Vault::read_disk_chunks_to`]: fetches the sealed chunks of `slots`,
    /// with one ranged read when one can cover them all (see [`ReadRun::extend`]), else one
    /// per chunk. A restore fetches before it takes a buffer to decode into, so buffers are not
    /// held while requests are in flight.
    pub fn fetch(vault: &Vault, slots: &[(u64, ChunkId)]) -> Result<FetchedChunks> {
        vault.after_refresh(|| {
            let locs = slots
                .iter()
                .map(|(_, id)| {
                    vault.locate(id).ok_or_else(|| Error::MissingChunk {
                        location: vault.location(),
                        chunk: *id,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let coalesced = !slots.is_empty() && {
                let mut run = ReadRun::start(vault, &slots[0].1);
                slots[1..]
                    .iter()
                    .all(|(_, id)| run.as_mut().is_some_and(|r| r.extend(vault, id)))
            };
            let ranges = if coalesced {
                vec![vault.fetch_range(&locs)?]
            } else {
                locs.iter()
                    .map(|l| vault.fetch_range(std::slice::from_ref(l)))
                    .collect::<Result<_>>()?
            };
            Ok(FetchedChunks {
                coalesced,
                ranges,
                locs,
            })
        })
    }

    /// The second half of [`Vault::read_disk_chunks_to`]: authenticates each chunk where it lies
    /// in the fetched bytes and decodes it into its slot's slice of `dst`.
    pub fn open_to(
        mut self,
        vault: &Vault,
        map: &catalog::DiskMapRef,
        slots: &[(u64, ChunkId)],
        verify: Verify,
        dst: &mut [&mut [u8]],
    ) -> Result<()> {
        assert_eq!(slots.len(), dst.len(), "one destination per slot");
        assert_eq!(slots.len(), self.locs.len(), "fetched for these slots");
        let cs = map.chunk_size as u64;
        // A chunk listed twice (the same content at two slots) is opened once, then copied.
        let mut first_at: HashMap<u32, usize> = HashMap::new();
        for (i, ((slot, id), loc)) in slots.iter().zip(&self.locs).enumerate() {
            let want = cs.min(map.size.saturating_sub(slot * cs)) as usize;
            assert_eq!(
                dst[i].len(),
                want,
                "the destination of slot {slot} is its length"
            );
            if let Some(&j) = first_at.get(&loc.offset).filter(|_| self.coalesced) {
                let (done, rest) = dst.split_at_mut(i);
                rest[0].copy_from_slice(done[j]);
                continue;
            }
            first_at.insert(loc.offset, i);
            let range = &mut self.ranges[if self.coalesced { 0 } else { i }];
            let at = (loc.offset as u64 - range.start) as usize;
            let sealed = &mut range.bytes[at..at + loc.len as usize];
            let key = &range.key;
            let n = vault
                .keys()
                .open_in_place_to(&chunk_aad(id), sealed, dst[i])
                .map_err(|e| {
                    vault.corrupt(key, format!("chunk {id} at offset {}: {e}", loc.offset))
                })?;
            if n != want {
                return Err(vault.slot_len_error(*slot, id, n, want));
            }
            if verify == Verify::Rehash && vault.keys().chunk_id(dst[i]) != *id {
                return Err(vault.corrupt(key, format!("chunk {id} content does not match its id")));
            }
        }
        Ok(())
    }
}

/// The read planner: sorts `slots` by where their chunks sit in the packs and cuts them into
/// batches of at most `max_batch` slots that one coalesced read each can cover (see
/// [`ReadRun::extend`]), calling `emit` once per batch in pack order. Chunks missing from the
/// index end up in batches of their own, where fetching them reports them.
pub fn plan_reads<E>(
    vault: &Vault,
    slots: impl IntoIterator<Item = (u64, ChunkId)>,
    max_batch: usize,
    mut emit: impl FnMut(Vec<(u64, ChunkId)>) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let mut located: Vec<_> = slots
        .into_iter()
        .map(|(slot, id)| (vault.locate(&id), slot, id))
        .collect();
    located.sort_by_key(|(loc, slot, _)| (loc.map(|l| (l.pack, l.offset)), *slot));
    let mut batch: Vec<(u64, ChunkId)> = Vec::new();
    let mut run: Option<ReadRun> = None;
    for (_, slot, id) in located {
        let extends = batch.len() < max_batch && run.as_mut().is_some_and(|r| r.extend(vault, &id));
        if !extends {
            if !batch.is_empty() {
                emit(std::mem::take(&mut batch))?;
            }
            run = ReadRun::start(vault, &id);
        }
        batch.push((slot, id));
    }
    if !batch.is_empty() {
        emit(batch)?;
    }
    Ok(())
}
