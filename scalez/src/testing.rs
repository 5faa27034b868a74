//! Helpers for unit tests here and in the crates built on scalez (in-memory vaults holding disks).
//! Not part of the stable API.

use std::sync::Arc;

use crate::catalog::DiskMapRef;
use crate::crypto::KdfParams;
use crate::disk_map::MapBuilder;
use crate::session::BackupSession;
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
    let cs = vault.config().chunk_size as usize;
    let mut session = BackupSession::new(vault.clone()).expect("session");
    let mut b = MapBuilder::new(disk.len().div_ceil(cs) as u64);
    let mut put = |p: Vec<u8>| session.store_blob(&p);
    for chunk in disk.chunks(cs) {
        let id =
            (!chunk.iter().all(|b| *b == 0)).then(|| session.store_blob(chunk).expect("store"));
        b.push(id, &mut put).expect("push");
    }
    let depth = b.depth();
    let root = b.finish(&mut put).expect("finish");
    session.finish().expect("session");
    DiskMapRef {
        chunk_size: cs as u32,
        size: disk.len() as u64,
        depth,
        root,
    }
}
