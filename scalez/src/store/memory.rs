//! An in-memory store for unit tests. Never the only proof of anything: see the conformance
//! suite, which runs the same checks against the local directory backend.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::{validate_key, ObjectMeta, ObjectStore, PutMode, StoreError};

#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    objects: Arc<Mutex<BTreeMap<String, Arc<Vec<u8>>>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn not_found(&self, key: &str) -> StoreError {
        StoreError::NotFound {
            store: self.location(),
            key: key.to_string(),
        }
    }

    /// Test helper: mutate an object in place (to simulate tampering).
    pub fn tamper(&self, key: &str, f: impl FnOnce(&mut Vec<u8>)) {
        let mut objects = self.objects.lock().unwrap();
        let mut data = objects[key].as_ref().clone();
        f(&mut data);
        objects.insert(key.to_string(), Arc::new(data));
    }
}

impl ObjectStore for MemoryStore {
    fn location(&self) -> String {
        "memory:".to_string()
    }

    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<(), StoreError> {
        validate_key(key)?;
        let mut objects = self.objects.lock().unwrap();
        if mode == PutMode::Create && objects.contains_key(key) {
            return Err(StoreError::AlreadyExists {
                store: self.location(),
                key: key.to_string(),
            });
        }
        objects.insert(key.to_string(), Arc::new(data.to_vec()));
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        validate_key(key)?;
        let objects = self.objects.lock().unwrap();
        objects
            .get(key)
            .map(|d| d.as_ref().clone())
            .ok_or_else(|| self.not_found(key))
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        validate_key(key)?;
        let data = {
            let objects = self.objects.lock().unwrap();
            objects
                .get(key)
                .cloned()
                .ok_or_else(|| self.not_found(key))?
        };
        let size = data.len() as u64;
        if range.start > range.end || range.end > size {
            return Err(StoreError::BadRange {
                store: self.location(),
                key: key.to_string(),
                start: range.start,
                end: range.end,
                size,
            });
        }
        Ok(data[range.start as usize..range.end as usize].to_vec())
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let objects = self.objects.lock().unwrap();
        Ok(objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conformance() {
        super::super::conformance::run_all(&super::MemoryStore::new());
        super::super::conformance::racing_creates(std::sync::Arc::new(super::MemoryStore::new()));
    }
}
