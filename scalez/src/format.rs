//! Every constant of the vault format ([FORMAT.md](../FORMAT.md)) in one place: versions,
//! magic bytes, key-derivation contexts and the associated data (AAD) that binds each sealed
//! object to its name. **All are frozen**: changing one makes every existing vault unreadable.
//! A new format adds constants (and a version) beside these; the modules that read and write
//! each object import them from here.

use crate::ids::{ChunkId, PackId, RecoveryPointId};

/// Vault format version (`config` object); readers refuse newer ones. Version 2 is version 1
/// plus `object_lock` in the config (S3 Object Lock: writers must lock what they write, so a
/// reader of version 1 must not write there); a vault without it is still written as 1.
pub const FORMAT_VERSION: u32 = 2;
/// The version of vaults without Object Lock.
pub const FORMAT_VERSION_UNLOCKED: u32 = 1;
/// The `format` field of the `config` object.
pub const CONFIG_FORMAT: &str = "elastio-scalez-vault";
/// The key of the config object.
pub const CONFIG_KEY: &str = "config";
/// Catalog entry version within format 1.
pub const RP_FORMAT: u32 = 1;

/// First bytes of a pack object.
pub const PACK_MAGIC: &[u8; 8] = b"EZPACK01";
/// First bytes of a pack's trailer (its table of contents).
pub const TRAILER_MAGIC: &[u8; 4] = b"EZPT";
/// First bytes of a decoded index object.
pub const INDEX_MAGIC: &[u8; 4] = b"EZIX";
/// First bytes of a stream manifest.
pub const STREAM_MANIFEST_MAGIC: &[u8; 4] = b"EZSM";
/// First bytes of a stream root.
pub const STREAM_ROOT_MAGIC: &[u8; 4] = b"EZSR";
/// First bytes of a file-tree record stream.
pub const TREE_MAGIC: &[u8; 4] = b"EZT1";

/// BLAKE3 `derive_key` contexts of the sub-keys derived from the master key.
pub const CTX_CHUNK_ID: &str = "elastio scalez v1 2026-11 chunk id key";
pub const CTX_DATA: &str = "elastio scalez v1 2026-11 data encryption key";
pub const CTX_CONFIG_MAC: &str = "elastio scalez v1 2026-11 config mac key";

/// AAD of a sealed chunk (in a pack): binds it to its id.
pub fn chunk_aad(id: &ChunkId) -> Vec<u8> {
    let mut aad = b"chunk:".to_vec();
    aad.extend_from_slice(&id.0);
    aad
}

/// AAD of a pack's sealed trailer: binds it to its pack.
pub fn trailer_aad(pack: &PackId) -> Vec<u8> {
    let mut aad = b"pack:".to_vec();
    aad.extend_from_slice(&pack.0);
    aad
}

/// AAD of an index object: binds it to its key.
pub fn index_aad(key: &str) -> Vec<u8> {
    format!("index:{key}").into_bytes()
}

/// AAD of a catalog entry: binds it to its RP id (lower case).
pub fn rp_aad(id: &RecoveryPointId) -> Vec<u8> {
    format!("rp:{id}").into_bytes()
}

/// AAD of a tag update: binds it to its key.
pub fn tag_aad(key: &str) -> Vec<u8> {
    format!("tag:{key}").into_bytes()
}

/// AAD of a scan report: binds it to its key (`scans/<rp-id>/<ulid>`).
pub fn scan_aad(key: &str) -> Vec<u8> {
    format!("scan:{key}").into_bytes()
}

/// AAD of a backup session's lease: binds it to its key.
pub fn lease_aad(key: &str) -> Vec<u8> {
    format!("lease:{key}").into_bytes()
}

/// AAD of a prune plan: binds it to its key.
pub fn plan_aad(key: &str) -> Vec<u8> {
    format!("plan:{key}").into_bytes()
}
