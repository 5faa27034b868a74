//! A read-only view of a versioned store as it was at one moment (`--point-in-time`).
//!
//! For every key, the view holds the newest version written at or before the moment, unless
//! that is a delete marker (then the key did not exist). So objects that were deleted or
//! overwritten since (by an attacker with the vault's credentials, say) read as they were, as
//! long as their versions still exist, which S3 Object Lock guarantees for one retention period
//! ([`crate::immutable`]). Writes and deletes are refused.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::lock::{ObjectLockStore, ObjectVersion};
use super::{ObjectMeta, ObjectStore, PutMode, StoreError, StoreStats};

/// Of one key's versions (newest first, as [`ObjectLockStore::versions`] sorts them), the
/// position of the one that was current at `at`, object or delete marker (None: the key did not
/// exist then).
pub fn position_at(versions: &[ObjectVersion], at: SystemTime) -> Option<usize> {
    versions
        .iter()
        .position(|v| v.modified.is_some_and(|m| m <= at))
}

/// The object version that was current at `at` (None if the key did not exist then, or was
/// hidden by a delete marker).
pub fn version_at(versions: &[ObjectVersion], at: SystemTime) -> Option<&ObjectVersion> {
    position_at(versions, at)
        .map(|i| &versions[i])
        .filter(|v| !v.is_delete_marker)
}

#[derive(Debug)]
pub struct PointInTimeStore {
    inner: Arc<dyn ObjectStore>,
    at: SystemTime,
    /// Key → the version in the view (None: absent), filled by listings and lookups.
    chosen: Mutex<HashMap<String, Option<(String, u64)>>>,
}

impl PointInTimeStore {
    /// `inner` must keep versions (an S3 store).
    pub fn new(inner: Arc<dyn ObjectStore>, at: SystemTime) -> Result<Self, StoreError> {
        if inner.object_lock().is_none() {
            return Err(StoreError::Remote {
                store: inner.location(),
                key: String::new(),
                op: "point-in-time open",
                reason: "only a versioned S3 bucket keeps the versions a point in time needs"
                    .into(),
                retryable: false,
            });
        }
        Ok(PointInTimeStore {
            inner,
            at,
            chosen: Mutex::new(HashMap::new()),
        })
    }

    /// The versioned store underneath.
    fn lock(&self) -> &dyn ObjectLockStore {
        self.inner.object_lock().expect("checked at new")
    }

    /// Of one key's versions (newest first), the one in the view.
    fn pick(&self, versions: &[ObjectVersion]) -> Option<(String, u64)> {
        version_at(versions, self.at).map(|v| (v.version_id.clone(), v.size))
    }

    fn version_of(&self, key: &str) -> Result<(String, u64), StoreError> {
        if let Some(c) = self.chosen.lock().expect("view").get(key) {
            return c.clone().ok_or_else(|| self.not_found(key));
        }
        let versions: Vec<ObjectVersion> = self
            .lock()
            .versions(key)?
            .into_iter()
            .filter(|v| v.key == key)
            .collect();
        let picked = self.pick(&versions);
        self.chosen
            .lock()
            .expect("view")
            .insert(key.to_string(), picked.clone());
        picked.ok_or_else(|| self.not_found(key))
    }

    fn not_found(&self, key: &str) -> StoreError {
        StoreError::NotFound {
            store: self.location(),
            key: key.to_string(),
        }
    }

    fn read_only(&self, op: &'static str, key: &str) -> StoreError {
        StoreError::Remote {
            store: self.location(),
            key: key.to_string(),
            op,
            reason: "the vault is open as it was at a point in time: read only".into(),
            retryable: false,
        }
    }
}

impl ObjectStore for PointInTimeStore {
    fn location(&self) -> String {
        format!(
            "{} at {}",
            self.inner.location(),
            humantime::format_rfc3339_seconds(self.at)
        )
    }

    fn put(&self, key: &str, _data: &[u8], _mode: PutMode) -> Result<(), StoreError> {
        Err(self.read_only("put", key))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let (version, _) = self.version_of(key)?;
        self.lock().get_version(key, &version)
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        let (version, size) = self.version_of(key)?;
        if range.start > range.end || range.end > size {
            return Err(StoreError::BadRange {
                store: self.location(),
                key: key.to_string(),
                start: range.start,
                end: range.end,
                size,
            });
        }
        self.lock().get_version_range(key, &version, range)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let versions = self.lock().versions(prefix)?;
        let mut out = Vec::new();
        let mut chosen = self.chosen.lock().expect("view");
        for group in versions.chunk_by(|a, b| a.key == b.key) {
            let picked = self.pick(group);
            if let Some((_, size)) = &picked {
                out.push(ObjectMeta {
                    key: group[0].key.clone(),
                    size: *size,
                });
            }
            chosen.insert(group[0].key.clone(), picked);
        }
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        Err(self.read_only("delete", key))
    }

    fn read_parallelism(&self) -> usize {
        self.inner.read_parallelism()
    }

    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }

    /// The view's own: it reads versions, never changes a lock or destroys anything (so no
    /// prune upkeep runs against it).
    fn object_lock(&self) -> Option<&dyn ObjectLockStore> {
        Some(self)
    }
}

impl ObjectLockStore for PointInTimeStore {
    /// Nothing is written through the view: the policy has nothing to apply to.
    fn set_policy(&self, _policy: super::lock::LockPolicy) {}
    fn policy(&self) -> Option<super::lock::LockPolicy> {
        None
    }
    fn bucket_lock(&self) -> Result<super::lock::BucketLock, StoreError> {
        self.lock().bucket_lock()
    }
    fn ensure_lock_bucket(&self) -> Result<(), StoreError> {
        Err(self.read_only("Object Lock set-up", "(bucket)"))
    }
    /// The history up to the view's moment: what came later is not there, and the latest
    /// of each key is the one current then.
    fn versions(&self, prefix: &str) -> Result<Vec<ObjectVersion>, StoreError> {
        let mut out: Vec<ObjectVersion> = self
            .lock()
            .versions(prefix)?
            .into_iter()
            .filter(|v| v.modified.is_some_and(|m| m <= self.at))
            .collect();
        for group in out.chunk_by_mut(|a, b| a.key == b.key) {
            for (i, v) in group.iter_mut().enumerate() {
                v.is_latest = i == 0;
            }
        }
        Ok(out)
    }
    fn retention(
        &self,
        key: &str,
        version_id: &str,
    ) -> Result<Option<(super::lock::LockMode, SystemTime)>, StoreError> {
        self.lock().retention(key, version_id)
    }
    fn extend(&self, key: &str, _version_id: &str, _until: SystemTime) -> Result<(), StoreError> {
        Err(self.read_only("retention extension", key))
    }
    fn delete_version(&self, key: &str, _version_id: &str) -> Result<(), StoreError> {
        Err(self.read_only("version delete", key))
    }
    fn get_version(&self, key: &str, version_id: &str) -> Result<Vec<u8>, StoreError> {
        self.lock().get_version(key, version_id)
    }
    fn get_version_range(
        &self,
        key: &str,
        version_id: &str,
        range: Range<u64>,
    ) -> Result<Vec<u8>, StoreError> {
        self.lock().get_version_range(key, version_id, range)
    }
    fn restore_version(&self, key: &str, _version_id: &str) -> Result<(), StoreError> {
        Err(self.read_only("version restore", key))
    }
}
