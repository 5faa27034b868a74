//! Random access to a disk RP: `read_at(offset, buf)` over its map, with a chunk cache.
//!
//! The restore pipeline walks the map directly (sequential, parallel, no cache needed); this
//! reader serves random access (FUSE, NBD). Map pages and chunks are cached in LRU caches bounded
//! in bytes; RPs are immutable, so cached data never goes stale.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::catalog::DiskMapRef;
use crate::disk_map::{MapReader, Page};
use crate::error::{Error, Result};
use crate::ids::ChunkId;
use crate::vault::Vault;

pub struct DiskReader {
    vault: Arc<Vault>,
    map: DiskMapRef,
    chunks: Mutex<LruCache<ChunkId, Arc<Vec<u8>>>>,
    pages: Mutex<LruCache<ChunkId, Arc<Page>>>,
}

impl DiskReader {
    /// `cache_bytes` bounds the chunk cache (at least one chunk is always cached).
    pub fn new(vault: Arc<Vault>, map: DiskMapRef, cache_bytes: usize) -> Self {
        let chunks = (cache_bytes / map.chunk_size as usize).max(1);
        DiskReader {
            vault,
            map,
            chunks: Mutex::new(LruCache::new(NonZeroUsize::new(chunks).unwrap())),
            pages: Mutex::new(LruCache::new(NonZeroUsize::new(64).unwrap())),
        }
    }

    pub fn size(&self) -> u64 {
        self.map.size
    }

    fn page(&self, id: &ChunkId) -> Result<Arc<Page>> {
        if let Some(p) = self.pages.lock().unwrap().get(id) {
            return Ok(p.clone());
        }
        let p = Arc::new(self.vault.load_page(id)?);
        self.pages.lock().unwrap().put(*id, p.clone());
        Ok(p)
    }

    /// The chunk at `slot`, None for zeros.
    pub fn slot(&self, slot: u64) -> Result<Option<Arc<Vec<u8>>>> {
        let mut load = |id: &ChunkId| -> Result<Page> { Ok((*self.page(id)?).clone()) };
        let mut r = MapReader {
            root: self.map.root,
            depth: self.map.depth,
            slots: self.map.slots(),
            load: &mut load,
        };
        let Some(id) = r.lookup(slot)? else {
            return Ok(None);
        };
        if let Some(c) = self.chunks.lock().unwrap().get(&id) {
            return Ok(Some(c.clone()));
        }
        let data = Arc::new(self.vault.read_chunk(&id)?);
        if data.len() != self.map.chunk_size as usize {
            let key = self
                .vault
                .locate(&id)
                .map(|l| l.pack.key())
                .unwrap_or_default();
            return Err(self.vault.corrupt(
                &key,
                format!(
                    "chunk {id} has {} bytes, the grid needs {}",
                    data.len(),
                    self.map.chunk_size
                ),
            ));
        }
        self.chunks.lock().unwrap().put(id, data.clone());
        Ok(Some(data))
    }

    /// Fills `buf` from `offset`; returns the bytes read (short only at the end of the disk).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.map.size {
            return Ok(0);
        }
        let len = buf.len().min((self.map.size - offset) as usize);
        let cs = self.map.chunk_size as u64;
        let mut done = 0;
        while done < len {
            let pos = offset + done as u64;
            let (slot, within) = (pos / cs, (pos % cs) as usize);
            let n = (cs as usize - within).min(len - done);
            match self.slot(slot)? {
                Some(c) => buf[done..done + n].copy_from_slice(&c[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(len)
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        std::io::Error::other(e)
    }
}
