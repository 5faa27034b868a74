//! A vault: config, keys, index, catalog, and chunk reads. See FORMAT.md for the objects.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::catalog::{self, RecoveryPoint, RpKind, TagUpdate};
use crate::crypto::{KdfParams, KeyFile, Keys, MasterKey};
use crate::disk_map::Page;
use crate::error::{Error, Result};
use crate::ids::{ChunkId, RecoveryPointId};
use crate::index::{self, Index, Location};
use crate::pack::chunk_aad;
use crate::store::{ObjectStore, PutMode, StoreError};

/// How much a chunk read checks beyond the AEAD tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Also re-hash the plaintext to its id: restores and checks, end-to-end proof.
    Rehash,
    /// The AEAD tag alone (it binds the ciphertext to the chunk id under the vault key, so only a
    /// holder of the key could have produced a mismatch): random access, where the hash costs
    /// ~7 % of a sequential read.
    AeadOnly,
}

/// Newest vault format this build reads and the one it writes. Bump on any incompatible change.
pub use crate::format::FORMAT_VERSION;
/// Frozen: the `format` field of every vault config.
use crate::format::{CONFIG_FORMAT, CONFIG_KEY};

/// Default grid for disks; chosen by measurement, see FORMAT.md ("Chunk size").
pub const DEFAULT_CHUNK_SIZE: u32 = 128 * 1024;
/// Default pack target size: large enough for few objects, small enough to buffer while sealing.
pub const DEFAULT_PACK_SIZE: u32 = 16 * 1024 * 1024;
/// zstd level: 3 costs ~8 % more CPU than 1 and stores ~5 % less on file-system images (FORMAT.md).
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Bytes of unrelated data a coalesced read may fetch and skip.
pub const COALESCE_GAP: u64 = 256 * 1024;
/// Largest span of a pack one coalesced read fetches (large ranged GETs are what make S3 fast:
/// ~170 MB/s in 256 KiB requests, ~780 MB/s in 4 MiB ones on Ceph RGW here).
pub const COALESCE_MAX: u64 = 8 << 20;

/// Sealed disk chunks fetched by [`Vault::fetch_disk_chunks`], to be opened by
/// [`Vault::open_disk_chunks_to`].
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

/// Parameters of a new vault.
#[derive(Debug, Clone)]
pub struct VaultOptions {
    pub chunk_size: u32,
    pub pack_size: u32,
    pub zstd_level: i32,
    pub kdf: KdfParams,
}

impl Default for VaultOptions {
    fn default() -> Self {
        VaultOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            pack_size: DEFAULT_PACK_SIZE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            kdf: KdfParams::default(),
        }
    }
}

/// The `config` object's body (plain JSON so the version can be read before unlocking).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultConfig {
    pub format: String,
    pub version: u32,
    pub vault_id: String,
    pub chunk_size: u32,
    pub pack_size: u32,
    pub zstd_level: i32,
    pub created: String,
}

impl VaultConfig {
    /// The largest pack object this vault's writers make: a pack is closed once it reaches
    /// `pack_size`, so it holds at most one more chunk (≤ 4 MiB of stream data, sealed) and a
    /// trailer (40 bytes per chunk of at least 29 sealed bytes). Three times the pack size plus
    /// 64 MiB bounds all of it;
    /// readers never load a larger object whole (a planted sparse object could be any size).
    pub fn max_pack_object(&self) -> u64 {
        3 * self.pack_size as u64 + (64 << 20)
    }

    /// The largest index object this vault's writers make. An index object is written after
    /// at most 8 packs (or once 4096 entries are reached, checked per pack), each of at most
    /// `pack_size / 29` chunks (a sealed chunk is at least nonce + tag + 1 byte), at 44 bytes
    /// an entry: under 13 × `pack_size`. Never less than 256 MiB.
    pub fn max_index_object(&self) -> u64 {
        (13 * self.pack_size as u64).max(256 << 20)
    }
}

#[derive(Serialize, Deserialize)]
struct ConfigObject {
    config: VaultConfig,
    /// Keyed BLAKE3 (config MAC key) of the JSON of `config`.
    mac: String,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// An unlocked vault with its index loaded: it cannot be used before both succeed.
pub struct Vault {
    store: Arc<dyn ObjectStore>,
    keys: Keys,
    config: VaultConfig,
    index: RwLock<Index>,
    /// Index objects that could not be read at open (key, reason): their chunks are missing from
    /// the index, so only the RPs that need them fail; `check` reports them.
    damaged_index: std::sync::Mutex<Vec<(String, String)>>,
    condemned: RwLock<std::collections::HashSet<crate::ids::PackId>>,
    /// Index objects merged so far (a refresh reads only new ones).
    loaded_index: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("store", &self.store.location())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Creates a vault in an empty store. The key file is written first and the config last, so
    /// a crash leaves no half-made vault that `open` would accept.
    pub fn init(store: Arc<dyn ObjectStore>, password: &[u8], opts: VaultOptions) -> Result<Vault> {
        let location = store.location();
        if !opts.chunk_size.is_power_of_two() || !(4096..=512 * 1024).contains(&opts.chunk_size) {
            return Err(Error::InvalidParameter(format!(
                "chunk size {} must be a power of two between 4 KiB and 512 KiB (so 512 KiB EBS \
                 blocks are a whole number of chunks)",
                opts.chunk_size
            )));
        }
        if !(1 << 20..=1 << 30).contains(&opts.pack_size) {
            return Err(Error::InvalidParameter(format!(
                "pack size {} must be between 1 MiB and 1 GiB",
                opts.pack_size
            )));
        }
        if !(-7..=22).contains(&opts.zstd_level) {
            return Err(Error::InvalidParameter(format!(
                "zstd level {} must be between -7 and 22",
                opts.zstd_level
            )));
        }
        match store.get(CONFIG_KEY) {
            Ok(_) => return Err(Error::VaultExists { location }),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        let config = VaultConfig {
            format: CONFIG_FORMAT.into(),
            version: FORMAT_VERSION,
            vault_id: hex::encode(rand::random::<[u8; 16]>()),
            chunk_size: opts.chunk_size,
            pack_size: opts.pack_size,
            zstd_level: opts.zstd_level,
            created: now_rfc3339(),
        };
        let master = MasterKey::generate();
        let keyfile = KeyFile::wrap(&master, password, opts.kdf, &config.vault_id)
            .map_err(Error::InvalidParameter)?;
        let key_name = format!("keys/{}", hex::encode(rand::random::<[u8; 8]>()));
        store.put(
            &key_name,
            &serde_json::to_vec_pretty(&keyfile).expect("serialisable"),
            PutMode::Create,
        )?;
        let keys = Keys::derive(&master);
        let body = serde_json::to_vec(&config).expect("serialisable");
        let object = ConfigObject {
            mac: hex::encode(keys.config_mac(&body)),
            config: config.clone(),
        };
        match store.put(
            CONFIG_KEY,
            &serde_json::to_vec_pretty(&object).expect("serialisable"),
            PutMode::Create,
        ) {
            Ok(()) => {}
            Err(StoreError::AlreadyExists { .. }) => {
                let _ = store.delete(&key_name);
                return Err(Error::VaultExists { location });
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Vault {
            store,
            keys,
            config,
            index: RwLock::new(Index::new()),
            damaged_index: Default::default(),
            condemned: Default::default(),
            loaded_index: Default::default(),
        })
    }

    /// Reads the config (refusing newer formats), unlocks a key file with `password`, verifies the
    /// config MAC and loads the index.
    pub fn open(store: Arc<dyn ObjectStore>, password: &[u8]) -> Result<Vault> {
        let config = Self::read_config(store.as_ref())?;
        let location = store.location();
        let key_objects = store.list("keys/")?;
        let mut master = None;
        // Key files are not authenticated until one unwraps: a damaged or planted one (junk,
        // absurd KDF parameters, any size) is skipped and reported, never fatal, so one bad
        // object cannot lock everyone out.
        let mut damaged: Vec<(String, String)> = Vec::new();
        let mut candidates: Vec<(String, KeyFile)> = Vec::new();
        for k in &key_objects {
            if k.size > MAX_KEY_FILE {
                damaged.push((k.key.clone(), format!("{} bytes: not a key file", k.size)));
                continue;
            }
            let raw = store.get(&k.key)?;
            match serde_json::from_slice::<KeyFile>(&raw) {
                Ok(kf) => candidates.push((k.key.clone(), kf)),
                Err(e) => damaged.push((k.key.clone(), format!("not a key file: {e}"))),
            }
        }
        unwrap_order(&mut candidates);
        for (key, kf) in candidates {
            match kf.unwrap_key(password, &config.vault_id) {
                Ok(Some(m)) => {
                    master = Some(m);
                    break;
                }
                Ok(None) => {}
                Err(detail) => damaged.push((key, detail)),
            }
        }
        for (key, detail) in &damaged {
            tracing::warn!("{location}: skipping key file {key}: {detail}");
        }
        let master = match master {
            Some(m) => m,
            None if damaged.len() == key_objects.len() && !damaged.is_empty() => {
                let (key, detail) = damaged.swap_remove(0);
                return Err(Error::Corrupt {
                    location: location.clone(),
                    key,
                    detail: format!("{detail} (and no other key file is usable)"),
                });
            }
            None => {
                return Err(Error::WrongPassword {
                    location: location.clone(),
                    keys: key_objects.len() - damaged.len(),
                })
            }
        };
        let keys = Keys::derive(&master);
        let raw: ConfigObject =
            serde_json::from_slice(&store.get(CONFIG_KEY)?).map_err(|e| Error::Corrupt {
                location: location.clone(),
                key: CONFIG_KEY.into(),
                detail: e.to_string(),
            })?;
        let body = serde_json::to_vec(&raw.config).expect("serialisable");
        if hex::encode(keys.config_mac(&body)) != raw.mac || raw.config != config {
            return Err(Error::Corrupt {
                location,
                key: CONFIG_KEY.into(),
                detail: "config MAC does not match (the config was modified)".into(),
            });
        }
        let vault = Vault {
            store,
            keys,
            config,
            index: RwLock::new(Index::new()),
            damaged_index: Default::default(),
            condemned: Default::default(),
            loaded_index: Default::default(),
        };
        vault.refresh()?;
        Ok(vault)
    }

    /// The config alone, without unlocking (for `vault info` and version checks).
    pub fn read_config(store: &dyn ObjectStore) -> Result<VaultConfig> {
        let location = store.location();
        let raw = match store.get(CONFIG_KEY) {
            Ok(r) => r,
            Err(e) if e.is_not_found() => return Err(Error::NotAVault { location }),
            Err(e) => return Err(e.into()),
        };
        let corrupt = |detail: String| Error::Corrupt {
            location: location.clone(),
            key: CONFIG_KEY.into(),
            detail,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&raw).map_err(|e| corrupt(format!("not JSON: {e}")))?;
        let c = &value["config"];
        if c["format"] != CONFIG_FORMAT {
            return Err(corrupt(format!(
                "format is {}, not {CONFIG_FORMAT}",
                c["format"]
            )));
        }
        let version = c["version"]
            .as_u64()
            .ok_or_else(|| corrupt("no version".into()))?;
        if version > FORMAT_VERSION as u64 {
            return Err(Error::NewerFormat {
                location,
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        serde_json::from_value(c.clone()).map_err(|e| corrupt(e.to_string()))
    }

    /// Merges every index object. One that fails authentication or decoding is skipped (and
    /// recorded, see [`Vault::damaged_index`]) rather than making the whole vault unreadable: RPs
    /// that do not need its chunks still restore. Store errors (unreachable, denied) still fail.
    fn load_index(&self) -> Result<()> {
        let condemned = self.condemned.read().unwrap().clone();
        let mut loaded = self.loaded_index.lock().unwrap();
        let mut index = self.index.write().unwrap();
        let objects: Vec<_> = self
            .store
            .list("index/")?
            .into_iter()
            .filter(|o| !loaded.contains(&o.key))
            .collect();
        // Listing sizes are unauthenticated: an object over the cap is damage (never read or
        // allocated for), and the pre-sizing only counts objects under it.
        let max = self.config.max_index_object();
        let (objects, oversize): (Vec<_>, Vec<_>) =
            objects.into_iter().partition(|o| o.size <= max);
        for obj in oversize {
            let reason = format!(
                "{} bytes: larger than any index object of this vault (at most {max}); not read",
                obj.size
            );
            tracing::warn!("{}: index object {}: {reason}", self.location(), obj.key);
            self.damaged_index.lock().unwrap().push((obj.key, reason));
        }
        // A hint only, and clamped: many planted objects under the cap must not add up to an
        // allocation either (the vector grows as entries actually decode).
        let listed: u64 = objects.iter().map(|o| o.size).sum();
        let mut bulk = index.bulk(listed.min(MAX_INDEX_PRESIZE));
        for obj in objects {
            let sealed = match self.store.get(&obj.key) {
                Ok(s) => s,
                Err(e) if e.is_not_found() => continue, // deleted since the listing
                Err(e) => return Err(e.into()),
            };
            let entries = self
                .keys
                .open(&index_aad(&obj.key), &sealed)
                .map_err(|e| e.to_string())
                .and_then(|plain| index::decode(&plain).map_err(|e| e.to_string()));
            match entries {
                Ok(entries) => {
                    loaded.insert(obj.key.clone());
                    for (id, loc) in entries {
                        index.bulk_push(&mut bulk, id, loc);
                    }
                }
                Err(reason) => {
                    tracing::warn!(
                        "{}: index object {} is damaged ({reason}); its chunks are unavailable",
                        self.location(),
                        obj.key
                    );
                    self.damaged_index
                        .lock()
                        .unwrap()
                        .push((obj.key.clone(), reason));
                }
            }
        }
        // A copy outside condemned packs wins (prune repacked the chunk).
        index.add_bulk(bulk, &|p| condemned.contains(p));
        Ok(())
    }

    /// Bytes the in-memory index holds (see [`crate::index`] for the bound).
    pub fn index_memory_bytes(&self) -> usize {
        self.index.read().unwrap().memory_bytes()
    }

    /// Re-reads the prune plans and merges index objects written since the last load, so chunks
    /// prune moved out of condemned packs are found in their new packs.
    pub fn refresh(&self) -> Result<()> {
        let plans = crate::gc::read_plans_lenient(self)?;
        let condemned = crate::gc::condemned_packs(&plans);
        let grew = *self.condemned.read().unwrap() != condemned;
        if grew {
            // Entries already merged may point at packs condemned since: rebuild, so that
            // copies outside condemned packs win everywhere.
            *self.index.write().unwrap() = Index::new();
            self.loaded_index.lock().unwrap().clear();
        }
        *self.condemned.write().unwrap() = condemned;
        self.load_index()
    }

    /// Index objects that could not be read when the vault was opened: (key, reason).
    pub fn damaged_index(&self) -> Vec<(String, String)> {
        self.damaged_index.lock().unwrap().clone()
    }

    /// Calls `f` for every (chunk, location) of the merged index, in no particular order.
    pub fn for_each_index_entry(&self, mut f: impl FnMut(ChunkId, Location)) {
        for (id, loc) in self.index.read().unwrap().iter() {
            f(id, loc);
        }
    }

    pub(crate) fn corrupt(&self, key: &str, detail: impl Into<String>) -> Error {
        Error::Corrupt {
            location: self.location(),
            key: key.to_string(),
            detail: detail.into(),
        }
    }

    pub fn location(&self) -> String {
        self.store.location()
    }

    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn chunk_count(&self) -> usize {
        self.index.read().unwrap().len()
    }

    pub fn has_chunk(&self, id: &ChunkId) -> bool {
        self.index.read().unwrap().contains(id)
    }

    pub fn locate(&self, id: &ChunkId) -> Option<Location> {
        self.index.read().unwrap().get(id)
    }

    pub(crate) fn index_insert(&self, entries: &[(ChunkId, Location)]) {
        let condemned = self.condemned.read().unwrap();
        let mut index = self.index.write().unwrap();
        for (id, loc) in entries {
            // A new copy of a chunk whose old one is in a condemned pack replaces it.
            if index
                .get(id)
                .is_some_and(|old| condemned.contains(&old.pack))
            {
                index.replace(*id, *loc);
            } else {
                index.insert(*id, *loc);
            }
        }
    }

    /// Marks chunk `id` as referenced (prune); false if it is not indexed.
    pub(crate) fn mark(&self, id: &ChunkId) -> bool {
        self.index.write().unwrap().mark(id)
    }

    pub(crate) fn is_marked(&self, id: &ChunkId) -> bool {
        self.index.read().unwrap().is_marked(id)
    }

    pub(crate) fn clear_marks(&self) {
        self.index.write().unwrap().clear_marks()
    }

    /// Records the packs prune plans condemn (see [`crate::gc`]).
    pub(crate) fn set_condemned(&self, packs: &std::collections::HashSet<crate::ids::PackId>) {
        *self.condemned.write().unwrap() = packs.clone();
    }

    /// Fetches, authenticates, decompresses and re-hashes one chunk (or map page).
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.fetch_chunk(id, Verify::Rehash, &mut Vec::new())
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
            self.store.get_range_meta(&key, range)
        } else {
            self.store.get_range(&key, range)
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
            .keys
            .open_in_place_into(&chunk_aad(id), sealed, out)
            .map_err(|e| self.corrupt(key, format!("chunk {id} at offset {}: {e}", loc.offset)))?;
        if verify == Verify::Rehash && self.keys.chunk_id(&plain) != *id {
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

    /// Starts a coalesced read at chunk `id` (None if the chunk is not in the index).
    pub fn run_start(&self, id: &ChunkId) -> Option<ReadRun> {
        let l = self.locate(id)?;
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
    pub fn run_extend(&self, run: &mut ReadRun, id: &ChunkId) -> bool {
        let Some(l) = self.locate(id) else {
            return false;
        };
        let (s, e) = (l.offset as u64, l.offset as u64 + l.len as u64);
        let (start, end) = (run.start.min(s), run.end.max(e));
        let wanted = run.wanted + l.len as u64;
        if l.pack != run.pack || end - start > COALESCE_MAX || end - start > wanted + COALESCE_GAP {
            return false;
        }
        *run = ReadRun {
            pack: run.pack,
            start,
            end,
            wanted,
        };
        true
    }

    /// Reads the chunks of several disk slots with a single ranged read when one can cover them
    /// all (see [`Vault::run_extend`]: one request on S3 instead of one per chunk), then
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
            let mut run = self.run_start(&slots[0].1);
            slots[1..]
                .iter()
                .all(|(_, id)| run.as_mut().is_some_and(|r| self.run_extend(r, id)))
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
        let fetched = self.fetch_disk_chunks(slots)?;
        self.open_disk_chunks_to(map, slots, fetched, verify, dst)
    }

    /// The first half of [`Vault::read_disk_chunks_to`]: fetches the sealed chunks of `slots`,
    /// with one ranged read when one can cover them all (see [`Vault::run_extend`]), else one
    /// per chunk. A restore fetches before it takes a buffer to decode into, so buffers are not
    /// held while requests are in flight.
    pub fn fetch_disk_chunks(&self, slots: &[(u64, ChunkId)]) -> Result<FetchedChunks> {
        self.after_refresh(|| {
            let locs = slots
                .iter()
                .map(|(_, id)| {
                    self.locate(id).ok_or_else(|| Error::MissingChunk {
                        location: self.location(),
                        chunk: *id,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let coalesced = !slots.is_empty() && {
                let mut run = self.run_start(&slots[0].1);
                slots[1..]
                    .iter()
                    .all(|(_, id)| run.as_mut().is_some_and(|r| self.run_extend(r, id)))
            };
            let ranges = if coalesced {
                vec![self.fetch_range(&locs)?]
            } else {
                locs.iter()
                    .map(|l| self.fetch_range(std::slice::from_ref(l)))
                    .collect::<Result<_>>()?
            };
            Ok(FetchedChunks {
                coalesced,
                ranges,
                locs,
            })
        })
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
            .store
            .get_range(&key, start..end)
            .map_err(|e| match e {
                StoreError::BadRange { .. } => {
                    self.corrupt(&key, "pack is shorter than its index says (truncated)")
                }
                e => e.into(),
            })?;
        Ok(FetchedRange { key, start, bytes })
    }

    /// The second half of [`Vault::read_disk_chunks_to`]: authenticates each chunk where it lies
    /// in the fetched bytes and decodes it into its slot's slice of `dst`.
    pub fn open_disk_chunks_to(
        &self,
        map: &catalog::DiskMapRef,
        slots: &[(u64, ChunkId)],
        mut fetched: FetchedChunks,
        verify: Verify,
        dst: &mut [&mut [u8]],
    ) -> Result<()> {
        assert_eq!(slots.len(), dst.len(), "one destination per slot");
        assert_eq!(slots.len(), fetched.locs.len(), "fetched for these slots");
        let cs = map.chunk_size as u64;
        // A chunk listed twice (the same content at two slots) is opened once, then copied.
        let mut first_at: HashMap<u32, usize> = HashMap::new();
        for (i, ((slot, id), loc)) in slots.iter().zip(&fetched.locs).enumerate() {
            let want = cs.min(map.size.saturating_sub(slot * cs)) as usize;
            assert_eq!(
                dst[i].len(),
                want,
                "the destination of slot {slot} is its length"
            );
            if let Some(&j) = first_at.get(&loc.offset).filter(|_| fetched.coalesced) {
                let (done, rest) = dst.split_at_mut(i);
                rest[0].copy_from_slice(done[j]);
                continue;
            }
            first_at.insert(loc.offset, i);
            let range = &mut fetched.ranges[if fetched.coalesced { 0 } else { i }];
            let at = (loc.offset as u64 - range.start) as usize;
            let sealed = &mut range.bytes[at..at + loc.len as usize];
            let key = &range.key;
            let n = self
                .keys
                .open_in_place_to(&chunk_aad(id), sealed, dst[i])
                .map_err(|e| {
                    self.corrupt(key, format!("chunk {id} at offset {}: {e}", loc.offset))
                })?;
            if n != want {
                return Err(self.slot_len_error(*slot, id, n, want));
            }
            if verify == Verify::Rehash && self.keys.chunk_id(dst[i]) != *id {
                return Err(self.corrupt(key, format!("chunk {id} content does not match its id")));
            }
        }
        Ok(())
    }

    pub fn load_page(&self, id: &ChunkId) -> Result<Page> {
        let bytes = self.fetch(id, Verify::Rehash, true, &mut Vec::new())?;
        Page::decode(&bytes).map_err(|e| {
            let key = self.locate(id).map(|l| l.pack.key()).unwrap_or_default();
            self.corrupt(&key, format!("map page {id}: {e}"))
        })
    }

    /// Makes `rp` visible. Call only after the session that wrote its data finished.
    pub fn commit_rp(&self, rp: &RecoveryPoint) -> Result<()> {
        let body = serde_json::to_vec(rp).expect("serialisable");
        let sealed = self.keys.seal(&catalog::rp_aad(&rp.id), &body, Some(1));
        self.store
            .put(&rp.id.catalog_key(), &sealed, PutMode::Create)?;
        Ok(())
    }

    pub(crate) fn read_rp(&self, key: &str, id: &RecoveryPointId) -> Result<RecoveryPoint> {
        let sealed = match self.store.get(key) {
            Ok(s) => s,
            Err(e) if e.is_not_found() => {
                return Err(Error::RpNotFound {
                    location: self.location(),
                    id: id.clone(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let plain = self
            .keys
            .open(&catalog::rp_aad(id), &sealed)
            .map_err(|e| self.corrupt(key, e.to_string()))?;
        let mut rp: RecoveryPoint =
            serde_json::from_slice(&plain).map_err(|e| self.corrupt(key, e.to_string()))?;
        if &rp.id != id {
            return Err(self.corrupt(key, format!("holds recovery point {}", rp.id)));
        }
        for t in self.store.list(&id.tags_prefix())? {
            if !is_canonical_tag_key(&t.key, id) {
                tracing::warn!(key = %t.key, "ignoring a tag object whose name is not canonical");
                continue;
            }
            let sealed = match self.store.get(&t.key) {
                Ok(s) => s,
                // Deleted with its RP since the listing (rp delete, prune).
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            };
            let plain = self
                .keys
                .open(&catalog::tag_aad(&t.key), &sealed)
                .map_err(|e| self.corrupt(&t.key, e.to_string()))?;
            let update: TagUpdate =
                serde_json::from_slice(&plain).map_err(|e| self.corrupt(&t.key, e.to_string()))?;
            update.apply(&mut rp.tags);
        }
        Ok(rp)
    }

    pub fn get_rp(&self, id: &RecoveryPointId) -> Result<RecoveryPoint> {
        self.read_rp(&id.catalog_key(), id)
    }

    /// All visible RPs, oldest first, with later tag updates applied.
    pub fn list_rps(&self) -> Result<Vec<RecoveryPoint>> {
        let mut out = Vec::new();
        for obj in self.store.list("catalog/")? {
            let name = obj.key.trim_start_matches("catalog/");
            // Only this engine names catalog entries, always canonically: anything else was
            // planted (or is junk) and is ignored here; `check` reports it.
            let Some(id) = RecoveryPointId::from_object_name(name) else {
                tracing::warn!(key = %obj.key, "ignoring a catalog object whose name is not a canonical RP id");
                continue;
            };
            match self.read_rp(&obj.key, &id) {
                Ok(rp) => out.push(rp),
                // Deleted (rp delete, prune) between the listing and the read: gone, not
                // damage. Backups list the catalog to find their parent while prunes run.
                Err(Error::RpNotFound { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// The newest RP of `kind` for `asset`, the parent of the next backup.
    pub fn latest_rp(&self, kind: RpKind, asset: &catalog::Asset) -> Result<Option<RecoveryPoint>> {
        Ok(self
            .list_rps()?
            .into_iter()
            .rfind(|rp| rp.kind == kind && &rp.asset == asset))
    }

    /// Records a tag change as a new immutable object and returns the updated RP.
    pub fn update_tags(&self, id: &RecoveryPointId, update: &TagUpdate) -> Result<RecoveryPoint> {
        for k in update.set.keys().chain(&update.remove) {
            catalog::validate_tag_key(k).map_err(Error::InvalidParameter)?;
        }
        self.get_rp(id)?;
        // Updates apply in key order, so a new one must sort after every update already there
        // (two in the same millisecond got random order: `protect` then `unprotect` could
        // leave the RP protected).
        let mut next = ulid::Ulid::new();
        for t in self.store.list(&id.tags_prefix())? {
            if !is_canonical_tag_key(&t.key, id) {
                continue;
            }
            if let Ok(u) = ulid::Ulid::from_string(&t.key[id.tags_prefix().len()..]) {
                if u >= next {
                    next = u.increment().ok_or_else(|| {
                        Error::InvalidParameter(format!("{id}: no tag update can follow {u}"))
                    })?;
                }
            }
        }
        let key = format!(
            "{}{}",
            id.tags_prefix(),
            next.to_string().to_ascii_lowercase()
        );
        let body = serde_json::to_vec(update).expect("serialisable");
        let sealed = self.keys.seal(&catalog::tag_aad(&key), &body, None);
        self.store.put(&key, &sealed, PutMode::Create)?;
        self.get_rp(id)
    }
}

/// Whether `key` is a name [`Vault::update_tags`] writes for `rp`: `tags/<rp>/<lower-case ulid>`.
pub(crate) fn is_canonical_tag_key(key: &str, rp: &RecoveryPointId) -> bool {
    key.strip_prefix(&rp.tags_prefix())
        .and_then(|u| {
            ulid::Ulid::from_string(u)
                .ok()
                .filter(|p| p.to_string().to_ascii_lowercase() == u)
        })
        .is_some()
}

/// Key files are ~300 bytes of JSON; anything over this is not one (and is not read).
const MAX_KEY_FILE: u64 = 64 << 10;

/// The order key files are tried in: cheapest KDF first (memory times passes, over the lanes
/// that run at once here), then by name. Key files are unauthenticated until one unwraps: the
/// vault's own (default parameters) so come before planted ones made expensive (within the
/// caps) to slow every open down.
fn unwrap_order(candidates: &mut [(String, KeyFile)]) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    candidates.sort_by_cached_key(|(key, kf)| {
        let p = &kf.params;
        let at_once = u64::from(p.parallelism).clamp(1, cores);
        (
            u64::from(p.memory_kib) * u64::from(p.iterations) / at_once,
            key.clone(),
        )
    });
}

/// The index pre-sizing hint is clamped to this many listed bytes (~1.5 M entries).
const MAX_INDEX_PRESIZE: u64 = 64 << 20;

pub use crate::format::index_aad;

/// Parses `k=v` tag arguments.
pub fn parse_tags<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in args {
        let (k, v) = a.split_once('=').ok_or_else(|| {
            Error::InvalidParameter(format!("tag {a:?} is not of the form key=value"))
        })?;
        catalog::validate_tag_key(k).map_err(Error::InvalidParameter)?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk_map::{MapBuilder, MapReader};
    use crate::session::BackupSession;
    use crate::store::memory::MemoryStore;

    fn opts() -> VaultOptions {
        VaultOptions {
            kdf: KdfParams {
                memory_kib: 64,
                iterations: 1,
                parallelism: 1,
            },
            pack_size: 1 << 20,
            ..VaultOptions::default()
        }
    }

    #[test]
    fn write_read_reopen() {
        let mem = MemoryStore::new();
        let store: Arc<dyn ObjectStore> = Arc::new(mem.clone());
        let vault = Arc::new(Vault::init(store.clone(), b"pw", opts()).unwrap());
        let mut session = BackupSession::new(vault.clone()).unwrap();
        // Incompressible so that 40 x 100 kB spill over 1 MiB packs.
        let chunks: Vec<Vec<u8>> = (0..40)
            .map(|_| (0..100_000).map(|_| rand::random::<u8>()).collect())
            .collect();
        let mut ids = Vec::new();
        for c in &chunks {
            ids.push(session.store_blob(c).unwrap());
        }
        assert!(!session.store_chunk(ids[0], &chunks[0]).unwrap(), "dedup");
        let stats = session.finish().unwrap();
        assert_eq!(stats.new_chunks, 40);
        assert!(stats.packs >= 2, "small packs roll over");

        let reopened = Vault::open(store.clone(), b"pw").unwrap();
        for (id, c) in ids.iter().zip(&chunks) {
            assert_eq!(&reopened.read_chunk(id).unwrap(), c);
        }
        assert!(matches!(
            Vault::open(store.clone(), b"nope"),
            Err(Error::WrongPassword { .. })
        ));
        assert!(matches!(
            Vault::init(store.clone(), b"pw", opts()),
            Err(Error::VaultExists { .. })
        ));

        // Flip one byte inside the first chunk of a pack: the read names the pack.
        let loc = reopened.locate(&ids[0]).unwrap();
        mem.tamper(&loc.pack.key(), |d| d[loc.offset as usize + 20] ^= 1);
        match reopened.read_chunk(&ids[0]) {
            Err(Error::Corrupt { key, .. }) => assert_eq!(key, loc.pack.key()),
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[test]
    fn newer_format_and_tampered_config() {
        let mem = MemoryStore::new();
        let store: Arc<dyn ObjectStore> = Arc::new(mem.clone());
        Vault::init(store.clone(), b"pw", opts()).unwrap();
        let original = store.get(CONFIG_KEY).unwrap();
        mem.tamper(CONFIG_KEY, |d| {
            let s = String::from_utf8(d.clone())
                .unwrap()
                .replace("131072", "65536");
            *d = s.into_bytes();
        });
        assert!(matches!(
            Vault::open(store.clone(), b"pw"),
            Err(Error::Corrupt { .. })
        ));
        mem.tamper(CONFIG_KEY, |d| {
            let s = String::from_utf8(original.clone())
                .unwrap()
                .replace("\"version\": 1", "\"version\": 7");
            *d = s.into_bytes();
        });
        let err = Vault::open(store.clone(), b"pw").unwrap_err();
        assert!(matches!(err, Error::NewerFormat { found: 7, .. }), "{err}");
        assert!(err.to_string().contains("upgrade"));
    }

    #[test]
    fn catalog_and_tags() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let vault = Arc::new(Vault::init(store, b"pw", opts()).unwrap());
        let mut session = BackupSession::new(vault.clone()).unwrap();
        let mut b = MapBuilder::new(3);
        let mut put = |p: Vec<u8>| session.store_blob(&p);
        let data = vec![5u8; 1000];
        let id = session.store_blob(&data).unwrap();
        for s in [None, Some(id), None] {
            b.push(s, &mut put).unwrap();
        }
        let root = b.finish(&mut put).unwrap();
        session.finish().unwrap();
        let rp = RecoveryPoint {
            format: catalog::RP_FORMAT,
            id: RecoveryPointId::generate(),
            kind: RpKind::Disk,
            asset: catalog::Asset {
                name: "/dev/x".into(),
                host: "h".into(),
            },
            created: now_rfc3339(),
            parent: None,
            logical_size: 3 * 131072,
            bytes_read: 0,
            new_bytes_stored: 0,
            new_chunks: 0,
            duration_ms: 0,
            tags: parse_tags(["a=1"]).unwrap(),
            disk: Some(catalog::DiskMapRef {
                chunk_size: 131072,
                size: 3 * 131072,
                depth: 0,
                root,
            }),
            instance: None,
            stream: None,
            tree: None,
        };
        vault.commit_rp(&rp).unwrap();
        assert!(
            vault.commit_rp(&rp).is_err(),
            "catalog entries are create-only"
        );
        let got = vault
            .update_tags(
                &rp.id,
                &TagUpdate {
                    set: parse_tags(["b=2"]).unwrap(),
                    remove: vec!["a".into()],
                },
            )
            .unwrap();
        assert_eq!(got.tags, parse_tags(["b=2"]).unwrap());
        assert_eq!(vault.list_rps().unwrap(), vec![got.clone()]);
        let mut load = |i: &ChunkId| vault.load_page(i).map(Arc::new);
        let mut r = MapReader::new(root, 0, 3, &mut load);
        assert_eq!(r.lookup(1).unwrap(), Some(id));
        assert!(parse_tags(["novalue"]).is_err());
        assert!(vault
            .get_rp(&RecoveryPointId::generate())
            .unwrap_err()
            .to_string()
            .contains("not found"));
    }

    /// A vault on a real directory, with one disk of incompressible data stored.
    fn local_vault(dir: &std::path::Path) -> (Arc<dyn ObjectStore>, Arc<Vault>) {
        let store: Arc<dyn ObjectStore> =
            Arc::new(crate::store::local::LocalStore::open(dir).unwrap());
        let vault = Arc::new(Vault::init(store.clone(), b"pw", opts()).unwrap());
        let disk: Vec<u8> = (0..(1 << 20)).map(|_| rand::random::<u8>()).collect();
        crate::testing::store_disk(&vault, &disk);
        (store, vault)
    }

    #[test]
    fn key_files_are_tried_cheapest_first() {
        let kf = |memory_kib, iterations| KeyFile {
            kdf: "argon2id".into(),
            params: KdfParams {
                memory_kib,
                iterations,
                parallelism: 4,
            },
            salt: vec![0; 16],
            nonce: vec![0; 12],
            wrapped: vec![0; 48],
            created: String::new(),
        };
        let mut c = vec![
            ("keys/0".to_string(), kf(2 << 20, 4)),
            ("keys/b".to_string(), kf(64 << 10, 3)),
            ("keys/a".to_string(), kf(64 << 10, 3)),
            ("keys/1".to_string(), kf(1 << 20, 1)),
        ];
        unwrap_order(&mut c);
        let names: Vec<&str> = c.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["keys/a", "keys/b", "keys/1", "keys/0"]);
    }

    /// Planted key files: junk JSON, absurd Argon2 parameters (2^32-1 passes hung every open),
    /// an oversized object. Each used to make the vault unopenable; now they are skipped.
    #[test]
    fn damaged_or_absurd_key_files_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = local_vault(tmp.path());
        store.put("keys/0", b"junk", PutMode::Create).unwrap();
        let mut absurd: serde_json::Value = serde_json::from_slice(
            &store
                .get(&store.list("keys/").unwrap().last().unwrap().key)
                .unwrap(),
        )
        .unwrap();
        absurd["params"]["iterations"] = u32::MAX.into();
        store
            .put(
                "keys/1",
                &serde_json::to_vec(&absurd).unwrap(),
                PutMode::Create,
            )
            .unwrap();
        std::fs::File::create(tmp.path().join("keys/2"))
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        let started = std::time::Instant::now();
        // (Listing order puts the planted ones first.)
        Vault::open(store.clone(), b"pw").expect("opens past the planted key files");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        assert!(matches!(
            Vault::open(store, b"wrong"),
            Err(Error::WrongPassword { keys: 1, .. })
        ));
    }

    /// A planted 1 TiB sparse object under index/ aborted every open (the index was pre-sized
    /// from listing sizes); a real pack made 1 TiB long, its authentic trailer kept at the end,
    /// aborted `check` (which zero-filled a buffer the size of the pack). Both are reported as
    /// damaged now, and nothing is allocated for them.
    #[test]
    fn a_chunk_whose_index_object_was_rewritten_under_a_reader_is_found_again() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(crate::store::local::LocalStore::open(tmp.path()).unwrap());
        let v = Arc::new(Vault::init(store.clone(), b"pw", opts()).unwrap());
        let disk: Vec<u8> = (0..(1 << 18)).map(|_| rand::random::<u8>()).collect();
        let rp_map = crate::testing::store_disk(&v, &disk);
        // What a reader sees when a prune rewrote an index object between its listing and its
        // read: the object gone, its entries in one the reader never listed.
        let key = store.list("index/").unwrap().pop().unwrap().key;
        let plain = v
            .keys()
            .open(&index_aad(&key), &store.get(&key).unwrap())
            .unwrap();
        store.delete(&key).unwrap();
        let reader = Arc::new(Vault::open(store.clone(), b"pw").unwrap());
        let new_key = format!("index/{}", "ab".repeat(16));
        let sealed = v.keys().seal(&index_aad(&new_key), &plain, None);
        store.put(&new_key, &sealed, PutMode::Create).unwrap();
        let reader_disk = crate::reader::DiskReader::new(reader, rp_map, 1 << 20);
        let mut out = Vec::new();
        reader_disk
            .read_append(0, 4096, &mut out)
            .expect("found in the rewritten index object");
        assert_eq!(out, disk[..4096]);
    }

    #[test]
    fn huge_planted_objects_are_damage_not_allocations() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = local_vault(tmp.path());
        std::fs::File::create(tmp.path().join("index/ffff"))
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        let vault = Arc::new(Vault::open(store.clone(), b"pw").unwrap());
        assert!(vault
            .damaged_index()
            .iter()
            .any(|(k, why)| k == "index/ffff" && why.contains("larger than any index object")));
        std::fs::remove_file(tmp.path().join("index/ffff")).unwrap();

        let pack = store.list("packs/").unwrap()[0].key.clone();
        let path = tmp.path().join(&pack);
        let bytes = std::fs::read(&path).unwrap();
        let tlen = u32::from_le_bytes(bytes[bytes.len() - 8..bytes.len() - 4].try_into().unwrap());
        let tail = &bytes[bytes.len() - 8 - tlen as usize..];
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let huge = 1u64 << 40;
        f.set_len(huge).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, tail, huge - tail.len() as u64).unwrap();
        drop(f);
        let vault = Arc::new(Vault::open(store, b"pw").unwrap());
        let r = crate::check::check(&vault, crate::check::DataCheck::All, &|_| {}).unwrap();
        assert!(
            r.problems
                .iter()
                .any(|p| p.object == pack && p.problem.contains("oversize")),
            "{:?}",
            r.problems
        );
    }
}
