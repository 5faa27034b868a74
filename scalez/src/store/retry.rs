//! Retries with exponential backoff and full jitter around any store.
//!
//! Only failures the inner store marks retryable ([`StoreError::is_retryable`]: throttling,
//! server errors, timeouts, dropped connections) are retried; answers such as "not found" or
//! "already exists" are returned at once. A create-only put is the subtle case: if an attempt
//! failed after the server stored the object (the response was lost), the retry sees
//! `AlreadyExists`. The object is then read back and, if it holds exactly our bytes, the put
//! succeeded; otherwise someone else won the race and `AlreadyExists` is the right answer.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use super::{ObjectMeta, ObjectStore, PutMode, StoreError, StoreStats};

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles each time up to `cap`.
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    /// Nine attempts over about 20 s in the worst case: rides out a server restart or a burst of
    /// throttling without hanging a backup for minutes on a dead endpoint.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 9,
            base: Duration::from_millis(50),
            cap: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Full jitter: a uniform delay in `[0, min(cap, base * 2^retry))`.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << retry.min(20))
            .min(self.cap);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

#[derive(Debug)]
pub struct RetryStore<S> {
    inner: S,
    policy: RetryPolicy,
    retries: AtomicU64,
}

impl<S: ObjectStore> RetryStore<S> {
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        RetryStore {
            inner,
            policy,
            retries: AtomicU64::new(0),
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn run<T>(
        &self,
        op: &str,
        key: &str,
        mut f: impl FnMut() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut attempt = 1;
        loop {
            match f() {
                Err(e) if e.is_retryable() && attempt < self.policy.max_attempts => {
                    let wait = self.policy.delay(attempt - 1);
                    tracing::debug!(
                        "{op} {key}: attempt {attempt} failed ({e}); retrying in {wait:?}"
                    );
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(wait);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Retries `put` (one attempt of storing `data` at `key`). A create-only put that finds
    /// the object after a failed attempt succeeds if the stored bytes are `data`: an earlier
    /// attempt stored it and only its answer was lost.
    fn put_with(
        &self,
        key: &str,
        data: &[u8],
        mode: PutMode,
        mut put: impl FnMut() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut failed_once = false;
        let result = self.run("put", key, || {
            let r = put();
            if r.as_ref().is_err_and(|e| e.is_retryable()) {
                failed_once = true;
            }
            r
        });
        match result {
            Err(StoreError::AlreadyExists { .. })
                if failed_once
                    && mode == PutMode::Create
                    && self
                        .run("get", key, || self.inner.get(key))
                        .is_ok_and(|b| b == data) =>
            {
                // An earlier attempt stored it; only its answer was lost.
                Ok(())
            }
            other => other,
        }
    }
}

impl<S: ObjectStore> ObjectStore for RetryStore<S> {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<(), StoreError> {
        self.put_with(key, data, mode, || self.inner.put(key, data, mode))
    }

    fn put_bytes(&self, key: &str, data: &Bytes, mode: PutMode) -> Result<(), StoreError> {
        self.put_with(key, data, mode, || self.inner.put_bytes(key, data, mode))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.run("get", key, || self.inner.get(key))
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        self.run("get", key, || self.inner.get_range(key, range.clone()))
    }

    fn get_range_meta(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        self.run("get", key, || self.inner.get_range_meta(key, range.clone()))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.run("list", prefix, || self.inner.list(prefix))
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.run("delete", key, || self.inner.delete(key))
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
        let inner = self.inner.stats();
        StoreStats {
            requests: inner.requests,
            retries: inner.retries + self.retries.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fault::{FaultPlan, FaultStore};
    use crate::store::memory::MemoryStore;

    fn quick() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 6,
            base: Duration::from_millis(1),
            cap: Duration::from_millis(4),
        }
    }

    #[test]
    fn transient_failures_are_retried_and_counted() {
        let faults = FaultStore::new(
            MemoryStore::new(),
            FaultPlan {
                fail_first: 4,
                ..FaultPlan::default()
            },
        );
        let store = RetryStore::new(faults, quick());
        store.put("a/b", b"x", PutMode::Create).unwrap();
        assert_eq!(store.get("a/b").unwrap(), b"x");
        assert_eq!(store.stats().retries, 4);
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let faults = FaultStore::new(
            MemoryStore::new(),
            FaultPlan {
                fail_first: 100,
                ..FaultPlan::default()
            },
        );
        let store = RetryStore::new(faults, quick());
        let err = store.get("a/b").unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert_eq!(store.stats().retries, 5);
    }

    #[test]
    fn semantic_errors_are_not_retried() {
        let store = RetryStore::new(MemoryStore::new(), quick());
        assert!(store.get("missing").unwrap_err().is_not_found());
        store.put("k", b"1", PutMode::Create).unwrap();
        assert!(matches!(
            store.put("k", b"2", PutMode::Create),
            Err(StoreError::AlreadyExists { .. })
        ));
        assert_eq!(store.stats().retries, 0);
    }

    #[test]
    fn a_create_whose_answer_was_lost_succeeds_on_retry() {
        // The first put is stored but reported as failed (a lost response).
        let plan = FaultPlan {
            lose_first_put_answer: true,
            ..FaultPlan::default()
        };
        let store = RetryStore::new(FaultStore::new(MemoryStore::new(), plan), quick());
        store.put("k", b"mine", PutMode::Create).unwrap();
        // Someone else's object under the same key is still a conflict.
        let plan = FaultPlan {
            lose_first_put_answer: true,
            ..FaultPlan::default()
        };
        let inner = MemoryStore::new();
        inner.put("k", b"theirs", PutMode::Create).unwrap();
        let store = RetryStore::new(FaultStore::new(inner, plan), quick());
        assert!(matches!(
            store.put("k", b"mine", PutMode::Create),
            Err(StoreError::AlreadyExists { .. })
        ));
    }

    #[test]
    fn conformance_through_faults_and_retries() {
        let plan = FaultPlan {
            fail_every: 3,
            ..FaultPlan::default()
        };
        let store = RetryStore::new(FaultStore::new(MemoryStore::new(), plan), quick());
        crate::store::conformance::run_all(&store);
        assert!(store.stats().retries > 0);
    }
}
