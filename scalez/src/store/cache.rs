//! A local, verified copy of a remote vault's immutable metadata, so opening a large S3 vault
//! does not download every index and catalog object again, and map pages read once stay local.
//!
//! What is cached: whole objects under `index/`, `catalog/` and `tags/` (written once, never
//! changed; write-through on put) and the byte ranges the vault marks as metadata through
//! [`ObjectStore::get_range_meta`] (map pages inside packs). Each cache file starts with the
//! BLAKE3 hash of its bytes; a file that does not match is dropped and the object fetched
//! again. The cache is only an accelerator: deleting it costs downloads, never data, and every
//! byte from it is still authenticated by the vault's AEAD like bytes from the store.

use std::fs;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{ObjectMeta, ObjectStore, PutMode, StoreError, StoreStats};

const CACHED_PREFIXES: [&str; 3] = ["index/", "catalog/", "tags/"];
const HASH: usize = 32;

#[derive(Debug)]
pub struct CachedStore<S> {
    inner: S,
    dir: PathBuf,
}

impl<S: ObjectStore> CachedStore<S> {
    /// Caches under `dir` (created when needed), e.g. `~/.cache/elastio/<vault id>`.
    pub fn new(inner: S, dir: &Path) -> Self {
        CachedStore {
            inner,
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn load(&self, name: &str) -> Option<Vec<u8>> {
        let path = self.path(name);
        let raw = fs::read(&path).ok()?;
        if raw.len() >= HASH && blake3::hash(&raw[HASH..]).as_bytes() == &raw[..HASH] {
            return Some(raw[HASH..].to_vec());
        }
        tracing::warn!("cache file {} is damaged; fetching again", path.display());
        let _ = fs::remove_file(&path);
        None
    }

    /// Best effort: a cache that cannot be written only costs speed.
    fn save(&self, name: &str, data: &[u8]) {
        let path = self.path(name);
        let write = || -> std::io::Result<()> {
            let parent = path.parent().unwrap_or(&self.dir);
            fs::create_dir_all(parent)?;
            let mut tmp = tempfile_in(parent)?;
            tmp.1.write_all(blake3::hash(data).as_bytes())?;
            tmp.1.write_all(data)?;
            drop(tmp.1);
            fs::rename(&tmp.0, &path)
        };
        if let Err(e) = write() {
            tracing::debug!("cannot cache {}: {e}", path.display());
        }
    }
}

/// A uniquely named new file in `dir`.
fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, fs::File)> {
    let p = dir.join(format!(".tmp-{}", hex::encode(rand::random::<[u8; 8]>())));
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)?;
    Ok((p, f))
}

fn cacheable(key: &str) -> bool {
    CACHED_PREFIXES.iter().any(|p| key.starts_with(p))
}

impl<S: ObjectStore> ObjectStore for CachedStore<S> {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<(), StoreError> {
        self.inner.put(key, data, mode)?;
        if cacheable(key) {
            self.save(key, data);
        }
        Ok(())
    }

    fn put_bytes(&self, key: &str, data: &Bytes, mode: PutMode) -> Result<(), StoreError> {
        self.inner.put_bytes(key, data, mode)?;
        if cacheable(key) {
            self.save(key, data);
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        if !cacheable(key) {
            return self.inner.get(key);
        }
        super::validate_key(key)?;
        if let Some(d) = self.load(key) {
            return Ok(d);
        }
        let d = self.inner.get(key)?;
        self.save(key, &d);
        Ok(d)
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        self.inner.get_range(key, range)
    }

    fn get_range_meta(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        super::validate_key(key)?;
        let name = format!("ranges/{key}@{}-{}", range.start, range.end);
        if let Some(d) = self.load(&name) {
            return Ok(d);
        }
        let d = self.inner.get_range(key, range)?;
        self.save(&name, &d);
        Ok(d)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.inner.list(prefix)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key)?;
        if cacheable(key) {
            let _ = fs::remove_file(self.path(key));
        }
        Ok(())
    }

    fn put_parallelism(&self) -> usize {
        self.inner.put_parallelism()
    }
    fn read_parallelism(&self) -> usize {
        self.inner.read_parallelism()
    }

    fn object_lock(&self) -> Option<&dyn super::lock::ObjectLockStore> {
        self.inner.object_lock()
    }
    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use std::sync::Arc;

    #[test]
    fn metadata_is_served_locally_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(MemoryStore::new());
        let store = CachedStore::new(mem.clone(), dir.path());
        store.put("index/aa", b"entries", PutMode::Create).unwrap();
        mem.put("catalog/rp-1", b"rp", PutMode::Create).unwrap();
        assert_eq!(store.get("catalog/rp-1").unwrap(), b"rp");
        // Gone from the store: still served (immutable objects), from the cache.
        mem.delete("index/aa").unwrap();
        mem.delete("catalog/rp-1").unwrap();
        assert_eq!(store.get("index/aa").unwrap(), b"entries");
        assert_eq!(store.get("catalog/rp-1").unwrap(), b"rp");
        // A damaged cache file is dropped and fetched again.
        mem.put("catalog/rp-1", b"rp", PutMode::Create).unwrap();
        let f = dir.path().join("catalog/rp-1");
        let mut raw = fs::read(&f).unwrap();
        *raw.last_mut().unwrap() ^= 1;
        fs::write(&f, raw).unwrap();
        assert_eq!(store.get("catalog/rp-1").unwrap(), b"rp");
        // Packs are not cached, but metadata ranges inside them are.
        mem.put("packs/00/p", b"0123456789", PutMode::Create)
            .unwrap();
        assert_eq!(store.get_range_meta("packs/00/p", 2..4).unwrap(), b"23");
        mem.delete("packs/00/p").unwrap();
        assert_eq!(store.get_range_meta("packs/00/p", 2..4).unwrap(), b"23");
        assert!(store.get_range("packs/00/p", 2..4).is_err());
    }

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        crate::store::conformance::run_all(&CachedStore::new(MemoryStore::new(), dir.path()));
    }
}
