//! A backup session: the write path into a vault.
//!
//! Any number of worker threads call [`BackupSession::store_chunk`] concurrently. A chunk the vault
//! (or this session) already has is skipped; a new one is sealed on the calling thread (so sealing
//! uses every worker) and handed to one packer thread through a bounded channel. The packer fills
//! packs, writes each create-only, and after every few packs writes an index object describing
//! them; only then are those chunks added to the in-memory index. [`BackupSession::finish`] flushes
//! the last pack and index; the caller then writes the catalog entry. Memory: the channel (a few
//! sealed chunks) plus one pack buffer.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender};

use crate::error::{Error, Result};
use crate::ids::ChunkId;
use crate::index::{self, Location};
use crate::pack::{chunk_aad, PackBuilder};
use crate::store::PutMode;
use crate::vault::{index_aad, Vault};

/// An index object is written after this many packs (or [`INDEX_FLUSH_ENTRIES`] entries), so a
/// killed backup loses at most that much work: the next run finds those chunks in the index.
const INDEX_FLUSH_PACKS: u64 = 8;
const INDEX_FLUSH_ENTRIES: usize = 4096;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionStats {
    /// Chunks (and map pages) this session stored.
    pub new_chunks: u64,
    /// Bytes written to the store: packs and index objects.
    pub bytes_written: u64,
    pub packs: u64,
    pub index_objects: u64,
}

pub struct BackupSession {
    vault: Arc<Vault>,
    claimed: Mutex<HashSet<ChunkId>>,
    tx: Option<Sender<(ChunkId, Vec<u8>)>>,
    packer: Option<JoinHandle<Result<SessionStats>>>,
    sealed_bytes: AtomicU64,
}

impl BackupSession {
    pub fn new(vault: Arc<Vault>) -> Self {
        let (tx, rx) = bounded::<(ChunkId, Vec<u8>)>(32);
        let v = vault.clone();
        let packer = std::thread::Builder::new()
            .name("scalez-packer".into())
            .spawn(move || {
                let mut packer = Packer::new(v);
                for (id, sealed) in rx {
                    packer.add(id, &sealed)?;
                }
                packer.finish()
            })
            .expect("spawn packer thread");
        BackupSession {
            vault,
            claimed: Mutex::new(HashSet::new()),
            tx: Some(tx),
            packer: Some(packer),
            sealed_bytes: AtomicU64::new(0),
        }
    }

    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    /// Stores `plaintext` under `id` unless it is already stored. Returns whether it was new.
    pub fn store_chunk(&self, id: ChunkId, plaintext: &[u8]) -> Result<bool> {
        if self.vault.has_chunk(&id) || !self.claimed.lock().unwrap().insert(id) {
            return Ok(false);
        }
        let sealed = self.vault.keys().seal(
            &chunk_aad(&id),
            plaintext,
            Some(self.vault.config().zstd_level),
        );
        self.sealed_bytes
            .fetch_add(sealed.len() as u64, Ordering::Relaxed);
        let tx = self.tx.as_ref().expect("session not finished");
        if tx.send((id, sealed)).is_err() {
            // The packer stopped on an error; `finish` reports it.
            return Err(Error::SessionFailed(
                "the pack writer stopped; see the error at the end of the backup".into(),
            ));
        }
        Ok(true)
    }

    /// Hashes and stores a blob (used for map pages); returns its id.
    pub fn store_blob(&self, plaintext: &[u8]) -> Result<ChunkId> {
        let id = self.vault.keys().chunk_id(plaintext);
        self.store_chunk(id, plaintext)?;
        Ok(id)
    }

    /// Sealed bytes handed to the packer so far (for progress).
    pub fn sealed_bytes(&self) -> u64 {
        self.sealed_bytes.load(Ordering::Relaxed)
    }

    /// Flushes everything. After `Ok`, every chunk stored is durable and indexed.
    pub fn finish(mut self) -> Result<SessionStats> {
        drop(self.tx.take());
        self.packer
            .take()
            .expect("finished once")
            .join()
            .map_err(|_| Error::SessionFailed("the pack writer panicked".into()))?
    }
}

impl Drop for BackupSession {
    fn drop(&mut self) {
        // An abandoned session (error elsewhere): stop the packer; whatever it wrote is
        // unreferenced garbage for prune, never part of a visible RP.
        drop(self.tx.take());
        if let Some(p) = self.packer.take() {
            let _ = p.join();
        }
    }
}

struct Packer {
    vault: Arc<Vault>,
    pack: PackBuilder,
    unindexed: Vec<(ChunkId, Location)>,
    unindexed_packs: u64,
    stats: SessionStats,
}

impl Packer {
    fn new(vault: Arc<Vault>) -> Self {
        Packer {
            vault,
            pack: PackBuilder::new(),
            unindexed: Vec::new(),
            unindexed_packs: 0,
            stats: SessionStats::default(),
        }
    }

    fn add(&mut self, id: ChunkId, sealed: &[u8]) -> Result<()> {
        self.pack.add(id, sealed);
        self.stats.new_chunks += 1;
        if self.pack.len() >= self.vault.config().pack_size as usize {
            self.write_pack()?;
            if self.unindexed.len() >= INDEX_FLUSH_ENTRIES
                || self.unindexed_packs >= INDEX_FLUSH_PACKS
            {
                self.write_index()?;
            }
        }
        Ok(())
    }

    fn write_pack(&mut self) -> Result<()> {
        let pack = std::mem::take(&mut self.pack);
        if pack.is_empty() {
            return Ok(());
        }
        let (pid, bytes, entries) = pack.finish(self.vault.keys());
        self.vault
            .store()
            .put(&pid.key(), &bytes, PutMode::Create)?;
        self.stats.bytes_written += bytes.len() as u64;
        self.stats.packs += 1;
        self.unindexed_packs += 1;
        self.unindexed.extend(entries.into_iter().map(|e| {
            (
                e.id,
                Location {
                    pack: pid,
                    offset: e.offset,
                    len: e.len,
                },
            )
        }));
        Ok(())
    }

    fn write_index(&mut self) -> Result<()> {
        if self.unindexed.is_empty() {
            return Ok(());
        }
        let key = format!("index/{}", hex::encode(rand::random::<[u8; 16]>()));
        let plain = index::encode(&self.unindexed);
        let sealed = self.vault.keys().seal(&index_aad(&key), &plain, None);
        self.vault.store().put(&key, &sealed, PutMode::Create)?;
        self.stats.bytes_written += sealed.len() as u64;
        self.stats.index_objects += 1;
        self.vault.index_insert(&self.unindexed);
        self.unindexed.clear();
        self.unindexed_packs = 0;
        Ok(())
    }

    fn finish(mut self) -> Result<SessionStats> {
        self.write_pack()?;
        self.write_index()?;
        Ok(self.stats)
    }
}
