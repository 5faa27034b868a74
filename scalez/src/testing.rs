//! Helpers for unit tests here and in the crates built on scalez (in-memory vaults holding disks).
//! Not part of the stable API.

use std::sync::Arc;

use crate::catalog::DiskMapRef;
use crate::crypto::KdfParams;
use crate::disk_writer::DiskWriter;
use crate::store::memory::MemoryStore;
use crate::vault::{Vault, VaultOptions};

/// A fresh in-memory vault with the given chunk size and a cheap KDF.
pub fn memory_vault(chunk_size: u32) -> Arc<Vault> {
    memory_vault_and_store(chunk_size).0
}

/// [`memory_vault`] and its store (for tests that tamper with objects).
pub fn memory_vault_and_store(chunk_size: u32) -> (Arc<Vault>, Arc<MemoryStore>) {
    let opts = VaultOptions {
        chunk_size,
        kdf: KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        },
        ..VaultOptions::default()
    };
    let store = Arc::new(MemoryStore::new());
    let vault = Vault::init(store.clone(), b"pw", opts).expect("init");
    (Arc::new(vault), store)
}

/// Stores `disk` in `vault` on its chunk grid (zero chunks are not stored) and returns its map.
pub fn store_disk(vault: &Arc<Vault>, disk: &[u8]) -> DiskMapRef {
    let writer = DiskWriter::new(vault, disk.len() as u64).expect("session");
    let mut map = writer.map();
    map.push(writer.put(disk).expect("store")).expect("push");
    let map = map.finish().expect("map");
    assert!(writer.abandon().is_none(), "the session flushed");
    map
}
