//! Helpers shared by the agent's integration tests: real local vaults on disk with a cheap KDF.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;
use std::sync::Arc;

use scalez::crypto::KdfParams;
use scalez::store::local::LocalStore;
use scalez::store::ObjectStore;
use scalez::{Vault, VaultOptions};

/// Deterministic incompressible bytes (xorshift).
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn store(dir: &Path) -> Arc<dyn ObjectStore> {
    std::fs::create_dir_all(dir.join("vault")).unwrap();
    Arc::new(LocalStore::open(dir.join("vault")).unwrap())
}

/// A new vault in `dir/vault`: 64 KiB chunks, 1 MiB packs (several packs from a few MiB).
pub fn vault(dir: &Path) -> Arc<Vault> {
    let opts = VaultOptions {
        chunk_size: 64 * 1024,
        pack_size: 1 << 20,
        kdf: KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        },
        ..VaultOptions::default()
    };
    Arc::new(Vault::init(store(dir), b"pw", opts).unwrap())
}

/// The vault in `dir/vault`, opened afresh (its index read from the store again).
pub fn reopen(dir: &Path) -> Arc<Vault> {
    Arc::new(Vault::open(store(dir), b"pw").unwrap())
}
