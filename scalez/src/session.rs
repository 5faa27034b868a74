//! A backup session: the write path into a vault.
//!
//! Any number of worker threads call [`BackupSession::store_chunk`] concurrently. A chunk the vault
//! (or this session) already has is skipped; a new one is sealed on the calling thread (so sealing
//! uses every worker) and handed to one packer thread through a bounded channel. The packer fills
//! packs and hands each full one to an upload thread, which writes it create-only; after every few
//! packs the packer queues an index object describing them, which the uploader writes after those
//! packs, and only then are the chunks added to the in-memory index. [`BackupSession::finish`]
//! flushes the last pack and index; the caller then writes the catalog entry. Memory: the channel
//! (a few sealed chunks) plus two packs (one filling, one being written).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::catalog::RecoveryPoint;
use crate::error::{Error, Result};
use crate::gc::{self, Lease};
use crate::ids::{ChunkId, PackId};
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

type Claimed = Arc<Mutex<HashSet<ChunkId>>>;

pub struct BackupSession {
    vault: Arc<Vault>,
    /// Chunks this session stored that are not yet in the vault's index. Entries leave once their
    /// index object is written, so the set stays as small as the unindexed tail (a few packs).
    claimed: Claimed,
    tx: Option<Sender<(ChunkId, Vec<u8>)>>,
    packer: Option<JoinHandle<Result<SessionStats>>>,
    sealed_bytes: AtomicU64,
    /// Held until the catalog entry is written (see [`crate::gc`]).
    lease: Option<Lease>,
    /// Packs condemned by prune plans: never deduplicated against.
    condemned: HashSet<PackId>,
    /// Packs holding chunks this session references without storing them.
    referenced: Mutex<HashSet<PackId>>,
}

impl BackupSession {
    /// Starts a session: writes its lease and loads the prune plans (see [`crate::gc`]).
    pub fn new(vault: Arc<Vault>) -> Result<Self> {
        let lease = Lease::acquire(&vault.gc())?;
        let condemned = gc::condemned_packs(&gc::read_plans(&vault.gc())?);
        vault.set_condemned(&condemned);
        let (tx, rx) = bounded::<(ChunkId, Vec<u8>)>(32);
        let v = vault.clone();
        let claimed = Claimed::default();
        let c = claimed.clone();
        let packer = std::thread::Builder::new()
            .name("scalez-packer".into())
            .spawn(move || {
                let mut packer = Packer::new(v, c);
                for (id, sealed) in rx {
                    packer.add(id, &sealed)?;
                }
                packer.finish()
            })
            .expect("spawn packer thread");
        Ok(BackupSession {
            vault,
            claimed,
            tx: Some(tx),
            packer: Some(packer),
            sealed_bytes: AtomicU64::new(0),
            lease: Some(lease),
            condemned,
            referenced: Mutex::new(HashSet::new()),
        })
    }

    /// The vault's copy of `id` this session may reference (None: store it), recording its pack.
    fn existing(&self, id: &ChunkId) -> bool {
        match self.vault.locate(id) {
            Some(loc) if !self.condemned.contains(&loc.pack) => {
                self.referenced.lock().unwrap().insert(loc.pack);
                true
            }
            _ => false,
        }
    }

    /// Records that the RP being written references chunk `id` without storing it (e.g. a slot
    /// taken from the parent RP's map). Fails if the vault no longer has it usable.
    pub fn note_reference(&self, id: &ChunkId) -> Result<()> {
        if self.existing(id) || self.claimed.lock().unwrap().contains(id) {
            return Ok(());
        }
        Err(Error::MissingChunk {
            location: self.vault.location(),
            chunk: *id,
        })
    }

    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    /// Stores `plaintext` under `id` unless it is already stored. Returns whether it was new.
    pub fn store_chunk(&self, id: ChunkId, plaintext: &[u8]) -> Result<bool> {
        if self.existing(&id) || !self.claimed.lock().unwrap().insert(id) {
            return Ok(false);
        }
        let sealed = self.vault.keys().seal(
            &chunk_aad(&id),
            plaintext,
            Some(self.vault.config().zstd_level),
        );
        self.send(id, sealed)
    }

    /// Stores an already sealed chunk again, even if the vault has it (prune moving live chunks
    /// out of a pack it will delete). Sealed chunks do not depend on their pack, so the bytes are
    /// copied as they are. Returns false if this session already stored `id`.
    pub fn store_sealed(&self, id: ChunkId, sealed: Vec<u8>) -> Result<bool> {
        if !self.claimed.lock().unwrap().insert(id) {
            return Ok(false);
        }
        self.send(id, sealed)
    }

    /// Hands a sealed chunk to the packer.
    fn send(&self, id: ChunkId, sealed: Vec<u8>) -> Result<bool> {
        self.sealed_bytes
            .fetch_add(sealed.len() as u64, Ordering::Relaxed);
        let tx = self.tx.as_ref().expect("session not finished");
        if tx.send((id, sealed)).is_err() {
            // The packer stopped on an error; `finish` reports it.
            return Err(Error::WriterStopped {
                what: "pack writer",
            });
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

    /// Flushes everything and checks that the RP may be committed ([`crate::gc`] B3). After
    /// `Ok`, every chunk stored is durable and indexed; commit with [`BackupSession::commit`].
    pub fn finish(&mut self) -> Result<SessionStats> {
        drop(self.tx.take());
        let stats = self
            .packer
            .take()
            .ok_or_else(|| Error::SessionFailed("session already finished".into()))?
            .join()
            .map_err(|_| Error::SessionFailed("the pack writer panicked".into()))??;
        self.check_commit()?;
        Ok(stats)
    }

    /// B3: the lease is fresh, no plan condemns a pack this session references, and those packs
    /// still exist.
    fn check_commit(&self) -> Result<()> {
        let lease = self.lease.as_ref().expect("lease held until commit");
        if !lease.fresh() {
            return Err(Error::RunAgain {
                reason: format!(
                    "this backup's lease {} was not refreshed for over half its TTL ({:?}), so a \
                     concurrent prune may have removed data it relies on",
                    lease.key(),
                    gc::lease_ttl() / 2
                ),
                what: "the backup",
            });
        }
        let referenced = self.referenced.lock().unwrap();
        if referenced.is_empty() {
            return Ok(());
        }
        let condemned = gc::condemned_packs(&gc::read_plans(&self.vault.gc())?);
        if let Some(p) = referenced.iter().find(|p| condemned.contains(p)) {
            return Err(Error::RunAgain {
                reason: format!(
                    "prune condemned pack {} while this backup was running",
                    p.key()
                ),
                what: "the backup",
            });
        }
        let listed: HashSet<PackId> = self
            .vault
            .store()
            .list("packs/")?
            .iter()
            .filter_map(|o| PackId::from_key(&o.key))
            .collect();
        if let Some(p) = referenced.iter().find(|p| !listed.contains(p)) {
            return Err(Error::RunAgain {
                reason: format!("pack {} is gone from the vault", p.key()),
                what: "the backup",
            });
        }
        Ok(())
    }

    /// Gives up the RP this session was writing: flushes what was stored (unreferenced until a
    /// prune) and returns the session's own error, if it had one — the real cause behind a
    /// worker's "the pack writer stopped".
    pub fn abandon(mut self) -> Option<Error> {
        self.finish().err()
    }

    /// Writes the RP's catalog entry (B4) and releases the lease.
    pub fn commit(mut self, rp: &RecoveryPoint) -> Result<()> {
        if self.packer.is_some() {
            return Err(Error::SessionFailed("commit before finish".into()));
        }
        self.vault.commit_rp(rp)?;
        drop(self.lease.take());
        Ok(())
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

/// Writes queued by the packer, executed in order by the uploader thread: an index object is
/// only written after every pack it names has been written.
enum Upload {
    Pack { key: String, bytes: Vec<u8> },
    Index { entries: Vec<(ChunkId, Location)> },
}

/// The store side of a session: runs the puts so sealing and packing continue meanwhile. Packs
/// go up on as many threads as the store asks for ([`ObjectStore::put_parallelism`]: one for a
/// local directory, several for S3); an index object waits until every pack before it is stored.
fn upload_loop(vault: &Vault, claimed: &Claimed, rx: Receiver<Upload>) -> Result<SessionStats> {
    let parallel = vault.store().put_parallelism().max(1);
    let mut stats = SessionStats::default();
    std::thread::scope(|scope| -> Result<()> {
        let (packs_tx, packs_rx) = bounded::<(String, Vec<u8>)>(0);
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Result<u64>>();
        for _ in 0..parallel {
            let (packs_rx, done_tx) = (packs_rx.clone(), done_tx.clone());
            scope.spawn(move || {
                for (key, bytes) in packs_rx {
                    // Handed over whole: a remote store sends the pack without copying it.
                    let bytes = bytes::Bytes::from(bytes);
                    let r = vault.store().put_bytes(&key, &bytes, PutMode::Create);
                    let _ = done_tx.send(r.map(|_| bytes.len() as u64).map_err(Into::into));
                }
            });
        }
        // Only the writers hold these now: if they all die (a panic), sends and receives below
        // fail instead of waiting forever.
        drop((packs_rx, done_tx));
        let mut outstanding = 0usize;
        let settle = |r: Result<u64>, stats: &mut SessionStats| -> Result<()> {
            stats.bytes_written += r?;
            stats.packs += 1;
            Ok(())
        };
        // Waits for every pack in flight (before an index object that names them, and at the end).
        let drain = |outstanding: &mut usize, stats: &mut SessionStats| -> Result<()> {
            while *outstanding > 0 {
                let r = done_rx.recv().map_err(|_| Error::WriterStopped {
                    what: "pack writers",
                })?;
                *outstanding -= 1;
                settle(r, stats)?;
            }
            Ok(())
        };
        for job in rx {
            match job {
                Upload::Pack { key, bytes } => {
                    while let Ok(r) = done_rx.try_recv() {
                        outstanding -= 1;
                        settle(r, &mut stats)?;
                    }
                    packs_tx
                        .send((key, bytes))
                        .map_err(|_| Error::WriterStopped {
                            what: "pack writers",
                        })?;
                    outstanding += 1;
                }
                Upload::Index { entries } => {
                    drain(&mut outstanding, &mut stats)?;
                    let key = format!("index/{}", hex::encode(rand::random::<[u8; 16]>()));
                    let plain = index::encode(&entries);
                    let sealed = vault.keys().seal(&index_aad(&key), &plain, None);
                    vault.store().put(&key, &sealed, PutMode::Create)?;
                    stats.bytes_written += sealed.len() as u64;
                    stats.index_objects += 1;
                    vault.index_insert(&entries);
                    let mut c = claimed.lock().unwrap();
                    for (id, _) in &entries {
                        c.remove(id);
                    }
                }
            }
        }
        drop(packs_tx);
        drain(&mut outstanding, &mut stats)
    })?;
    Ok(stats)
}

struct Packer {
    vault: Arc<Vault>,
    pack: PackBuilder,
    unindexed: Vec<(ChunkId, Location)>,
    unindexed_packs: u64,
    new_chunks: u64,
    uploads: Option<Sender<Upload>>,
    uploader: Option<JoinHandle<Result<SessionStats>>>,
}

impl Packer {
    fn new(vault: Arc<Vault>, claimed: Claimed) -> Self {
        // Rendezvous channel: at most one pack is being written while the next one fills.
        let (tx, rx) = bounded::<Upload>(0);
        let v = vault.clone();
        let uploader = std::thread::Builder::new()
            .name("scalez-upload".into())
            .spawn(move || upload_loop(&v, &claimed, rx))
            .expect("spawn upload thread");
        Packer {
            pack: PackBuilder::with_capacity(vault.config().pack_size as usize),
            vault,
            unindexed: Vec::new(),
            unindexed_packs: 0,
            new_chunks: 0,
            uploads: Some(tx),
            uploader: Some(uploader),
        }
    }

    fn add(&mut self, id: ChunkId, sealed: &[u8]) -> Result<()> {
        self.pack.add(id, sealed);
        self.new_chunks += 1;
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

    fn send(&mut self, job: Upload) -> Result<()> {
        let sent = self.uploads.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if sent {
            return Ok(());
        }
        // The uploader stopped: its error is the one to report.
        Err(self.join().err().unwrap_or(Error::WriterStopped {
            what: "upload thread",
        }))
    }

    fn join(&mut self) -> Result<SessionStats> {
        drop(self.uploads.take());
        match self.uploader.take() {
            Some(h) => h
                .join()
                .map_err(|_| Error::SessionFailed("the upload thread panicked".into()))?,
            None => Err(Error::SessionFailed(
                "the upload thread already stopped".into(),
            )),
        }
    }

    fn write_pack(&mut self) -> Result<()> {
        if self.pack.is_empty() {
            return Ok(());
        }
        let next = PackBuilder::with_capacity(self.vault.config().pack_size as usize);
        let pack = std::mem::replace(&mut self.pack, next);
        let (pid, bytes, entries) = pack.finish(self.vault.keys());
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
        self.unindexed_packs += 1;
        self.send(Upload::Pack {
            key: pid.key(),
            bytes,
        })
    }

    fn write_index(&mut self) -> Result<()> {
        if self.unindexed.is_empty() {
            return Ok(());
        }
        let entries = std::mem::take(&mut self.unindexed);
        self.unindexed_packs = 0;
        self.send(Upload::Index { entries })
    }

    fn finish(mut self) -> Result<SessionStats> {
        self.write_pack()?;
        self.write_index()?;
        let mut stats = self.join()?;
        stats.new_chunks = self.new_chunks;
        Ok(stats)
    }
}

impl Drop for Packer {
    fn drop(&mut self) {
        drop(self.uploads.take());
        if let Some(h) = self.uploader.take() {
            let _ = h.join();
        }
    }
}
