//! A vault: config, keys and the index. Chunk reads live in [`crate::fetch`], catalog entries
//! and tags in [`crate::catalog`], key files in `keyring`. See FORMAT.md for the objects.

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::crypto::{KdfParams, KeyFile, Keys, MasterKey};
use crate::error::{Error, Result};
use crate::ids::ChunkId;
use crate::index::{self, Index, Location};
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
/// Parameters of a new vault.
#[derive(Debug, Clone)]
pub struct VaultOptions {
    pub chunk_size: u32,
    pub pack_size: u32,
    pub zstd_level: i32,
    pub kdf: KdfParams,
    /// S3 Object Lock for every object the vault's writers make (the store must offer it).
    pub object_lock: Option<ObjectLock>,
}

impl Default for VaultOptions {
    fn default() -> Self {
        VaultOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            pack_size: DEFAULT_PACK_SIZE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            kdf: KdfParams::default(),
            object_lock: None,
        }
    }
}

/// A locked vault's policy, in its config (so it is under the config MAC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectLock {
    pub mode: crate::store::lock::LockMode,
    /// Every version written is kept at least this long; prune keeps what is live locked.
    pub retention_secs: u64,
}

impl ObjectLock {
    pub fn policy(&self) -> crate::store::lock::LockPolicy {
        crate::store::lock::LockPolicy {
            mode: self.mode,
            retention: std::time::Duration::from_secs(self.retention_secs),
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
    /// Absent in vaults without Object Lock (format 1), so their MAC is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_lock: Option<ObjectLock>,
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

/// On a versioned store: refuses a config whose current bytes are not the ones first written
/// (someone with write access replaced it, e.g. to turn Object Lock off): `vault
/// restore-versions` brings the first one back.
fn check_config_versions(store: &dyn ObjectStore) -> Result<()> {
    let Some(lock) = store.object_lock() else {
        return Ok(());
    };
    let versions = match lock.versions(CONFIG_KEY) {
        Ok(v) => v,
        // A store or a role that cannot list versions: nothing to compare.
        Err(e) => {
            tracing::debug!("{}: config versions not listed: {e}", store.location());
            return Ok(());
        }
    };
    let group: Vec<_> = versions
        .into_iter()
        .filter(|v| v.key == CONFIG_KEY)
        .collect();
    let changed = match crate::immutable::overwritten(lock, &group) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("{}: config versions not compared: {e}", store.location());
            false
        }
    };
    let objs = group.iter().filter(|v| !v.is_delete_marker).count();
    {
        if changed {
            return Err(Error::Corrupt {
                location: store.location(),
                key: CONFIG_KEY.into(),
                detail: format!(
                    "it was replaced after the vault was made ({objs} versions): bring the \
                     first one back with `vault restore-versions`"
                ),
            });
        }
    }
    Ok(())
}

/// Makes `store` write under `lock`; a store without Object Lock cannot hold a locked vault.
fn apply_lock(store: &dyn ObjectStore, lock: &ObjectLock) -> Result<()> {
    match store.object_lock() {
        Some(l) => {
            l.set_policy(lock.policy());
            Ok(())
        }
        None => Err(Error::InvalidParameter(format!(
            "{}: this vault is under S3 Object Lock ({} mode), which this store cannot apply \
             (only an S3 store can)",
            store.location(),
            lock.mode
        ))),
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// An unlocked vault with its index loaded: it cannot be used before both succeed.
pub struct Vault {
    store: Arc<dyn ObjectStore>,
    keys: Arc<Keys>,
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
        if let Some(lock) = &opts.object_lock {
            // The key file and the config are locked too: set before the first write.
            apply_lock(store.as_ref(), lock)?;
        }
        let config = VaultConfig {
            format: CONFIG_FORMAT.into(),
            version: match opts.object_lock {
                Some(_) => FORMAT_VERSION,
                None => crate::format::FORMAT_VERSION_UNLOCKED,
            },
            vault_id: hex::encode(rand::random::<[u8; 16]>()),
            chunk_size: opts.chunk_size,
            pack_size: opts.pack_size,
            zstd_level: opts.zstd_level,
            created: now_rfc3339(),
            object_lock: opts.object_lock,
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
        Ok(Vault::unloaded(store, keys, config))
    }

    /// A vault whose index is not loaded yet.
    fn unloaded(store: Arc<dyn ObjectStore>, keys: Keys, config: VaultConfig) -> Vault {
        Vault {
            store,
            keys: Arc::new(keys),
            config,
            index: RwLock::new(Index::new()),
            damaged_index: Default::default(),
            condemned: Default::default(),
            loaded_index: Default::default(),
        }
    }

    /// Reads the config (refusing newer formats), unlocks a key file with `password`, verifies the
    /// config MAC and loads the index.
    pub fn open(store: Arc<dyn ObjectStore>, password: &[u8]) -> Result<Vault> {
        let config = Self::read_config(store.as_ref())?;
        let location = store.location();
        let master = crate::keyring::unlock(store.as_ref(), password, &config.vault_id)?;
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
        if let Some(lock) = &config.object_lock {
            let bad = |detail: String| Error::Corrupt {
                location: location.clone(),
                key: CONFIG_KEY.into(),
                detail,
            };
            if config.version < 2 {
                return Err(bad(format!(
                    "version {} cannot have object_lock",
                    config.version
                )));
            }
            if !(1..=crate::store::lock::MAX_RETENTION_SECS).contains(&lock.retention_secs) {
                return Err(bad(format!(
                    "object_lock retention of {} seconds is out of range",
                    lock.retention_secs
                )));
            }
            apply_lock(store.as_ref(), lock)?;
        }
        check_config_versions(store.as_ref())?;
        let vault = Vault::unloaded(store, keys, config);
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
        let plans = crate::gc::read_plans_lenient(&self.gc())?;
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

    /// The store and keys, as the gc protocol (leases, prune plans) uses them.
    pub(crate) fn gc(&self) -> crate::gc::GcStore {
        crate::gc::GcStore::new(self.store.clone(), self.keys.clone())
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
}

/// The index pre-sizing hint is clamped to this many listed bytes (~1.5 M entries).
const MAX_INDEX_PRESIZE: u64 = 64 << 20;

pub use crate::format::index_aad;

#[cfg(test)]
mod tests;
