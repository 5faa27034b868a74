//! A store wrapper that injects transient failures and latency, so retry paths are exercised on
//! every backend (unit tests over memory, end-to-end tests over local directories and S3 through
//! `ELASTIO_FAULTS`).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use super::{ObjectMeta, ObjectStore, PutMode, StoreError, StoreStats};

/// What to inject. Counters are over every operation of the store.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Fail the first N operations.
    pub fail_first: u64,
    /// Then fail every Nth operation (0: never).
    pub fail_every: u64,
    /// Sleep this long before every operation.
    pub latency: Duration,
    /// Store the first put but answer as if it failed (a response lost on the way back).
    pub lose_first_put_answer: bool,
}

impl FaultPlan {
    /// Parses `fail_first=N,fail_every=N,latency_ms=N,lose_first_put=1` (the `ELASTIO_FAULTS`
    /// format).
    pub fn parse(spec: &str) -> Result<FaultPlan, String> {
        let mut plan = FaultPlan::default();
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("fault setting {part:?} is not key=value"))?;
            let n: u64 = v
                .parse()
                .map_err(|_| format!("fault setting {k}: {v:?} is not a number"))?;
            match k {
                "fail_first" => plan.fail_first = n,
                "fail_every" => plan.fail_every = n,
                "latency_ms" => plan.latency = Duration::from_millis(n),
                "lose_first_put" => plan.lose_first_put_answer = n != 0,
                _ => return Err(format!("unknown fault setting {k:?}")),
            }
        }
        Ok(plan)
    }
}

#[derive(Debug)]
pub struct FaultStore<S> {
    inner: S,
    plan: FaultPlan,
    ops: AtomicU64,
    injected: AtomicU64,
    lost_put: AtomicBool,
}

impl<S: ObjectStore> FaultStore<S> {
    pub fn new(inner: S, plan: FaultPlan) -> Self {
        FaultStore {
            inner,
            plan,
            ops: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            lost_put: AtomicBool::new(false),
        }
    }

    /// Failures injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn before(&self, op: &'static str, key: &str) -> Result<(), StoreError> {
        if !self.plan.latency.is_zero() {
            std::thread::sleep(self.plan.latency);
        }
        let n = self.ops.fetch_add(1, Ordering::Relaxed) + 1;
        let fail = n <= self.plan.fail_first || n.checked_rem(self.plan.fail_every) == Some(0);
        if fail {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Remote {
                store: self.inner.location(),
                key: key.to_string(),
                op,
                reason: "injected fault: 503 SlowDown".into(),
                retryable: true,
            });
        }
        Ok(())
    }
}

impl<S: ObjectStore> FaultStore<S> {
    /// The injected loss of the first put's answer (the object is stored, the reply is not).
    fn after_put(&self, key: &str) -> Result<(), StoreError> {
        if self.plan.lose_first_put_answer && !self.lost_put.swap(true, Ordering::Relaxed) {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Remote {
                store: self.inner.location(),
                key: key.to_string(),
                op: "put",
                reason: "injected fault: connection reset after the upload".into(),
                retryable: true,
            });
        }
        Ok(())
    }
}

impl<S: ObjectStore> ObjectStore for FaultStore<S> {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<(), StoreError> {
        self.before("put", key)?;
        self.inner.put(key, data, mode)?;
        self.after_put(key)
    }

    fn put_bytes(&self, key: &str, data: &Bytes, mode: PutMode) -> Result<(), StoreError> {
        self.before("put", key)?;
        self.inner.put_bytes(key, data, mode)?;
        self.after_put(key)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.before("get", key)?;
        self.inner.get(key)
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        self.before("get", key)?;
        self.inner.get_range(key, range)
    }

    fn get_range_meta(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        self.before("get", key)?;
        self.inner.get_range_meta(key, range)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.before("list", prefix)?;
        self.inner.list(prefix)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.before("delete", key)?;
        self.inner.delete(key)
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

    #[test]
    fn plans_parse() {
        let p =
            FaultPlan::parse("fail_first=3,fail_every=7,latency_ms=20,lose_first_put=1").unwrap();
        assert_eq!(
            (p.fail_first, p.fail_every, p.latency),
            (3, 7, Duration::from_millis(20))
        );
        assert!(p.lose_first_put_answer);
        assert!(FaultPlan::parse("nope=1").is_err());
        assert!(FaultPlan::parse("fail_first").is_err());
        assert!(FaultPlan::parse("fail_first=x").is_err());
    }
}
