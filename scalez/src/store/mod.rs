//! The object-store abstraction every vault sits on.
//!
//! A store is a flat namespace of immutable-by-convention objects addressed by `/`-separated keys.
//! The vault needs only five operations, so that is all the trait has: create-only put (the
//! building block of "the catalog entry is written once"), overwrite put, ranged get, list by
//! prefix and delete (only prune uses it). Backends: [`local::LocalStore`] (a directory; the
//! embedded default), [`memory::MemoryStore`] (unit tests) and [`s3::S3Store`] (any S3-compatible
//! service). Every backend must pass [`conformance::run_all`]. Wrappers add behaviour to any
//! backend: [`retry::RetryStore`] (exponential backoff with jitter on transient failures),
//! [`fault::FaultStore`] (injected failures and latency, to test the retry paths everywhere) and
//! [`cache::CachedStore`] (a verified local copy of immutable metadata objects).
//!
//! The trait is synchronous on purpose: the backup and restore pipelines are thread pools over
//! CPU-bound work, and FUSE callbacks are threads too. An async backend (S3) owns its runtime and
//! blocks inside these calls; callers inside a runtime use `spawn_blocking`.

pub mod cache;
pub mod conformance;
pub mod fault;
pub mod local;
pub mod lock;
pub mod memory;
pub mod point_in_time;
pub mod retry;
#[cfg(feature = "s3")]
pub mod s3;

use bytes::Bytes;
use std::fmt;
use std::ops::Range;

/// How [`ObjectStore::put`] treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Fail with [`StoreError::AlreadyExists`] if the key exists. Atomic: of two racing writers
    /// exactly one succeeds.
    Create,
    /// Replace the object atomically: readers see the old or the new bytes, never a mix.
    Overwrite,
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
}

/// Errors of a store. Variants are semantic so callers can react (`NotFound` during open means
/// "not a vault", `AlreadyExists` during a create-only put means "someone else won").
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {key} not found in {store}")]
    NotFound { store: String, key: String },
    #[error("object {key} already exists in {store}")]
    AlreadyExists { store: String, key: String },
    #[error("range {start}..{end} is outside object {key} ({size} bytes) in {store}")]
    BadRange {
        store: String,
        key: String,
        start: u64,
        end: u64,
        size: u64,
    },
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    /// A remote store refused or failed a request (throttling, 5xx, timeouts, access denied).
    #[error("{op} of {key} in {store} failed: {reason}")]
    Remote {
        store: String,
        key: String,
        op: &'static str,
        reason: String,
        /// Throttling, server errors, timeouts and dropped connections: worth retrying.
        retryable: bool,
    },
    #[error("i/o error on {key} in {store}: {source}")]
    Io {
        store: String,
        key: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether retrying the same call may succeed (transient I/O as opposed to a semantic answer).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            ),
            StoreError::Remote { retryable, .. } => *retryable,
            _ => false,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// A flat key → bytes store. Keys are ASCII, `/`-separated, without `.` or `..` components.
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// Where this store lives, for messages (`/var/backups/vault`, `s3://bucket/prefix`).
    fn location(&self) -> String;
    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<(), StoreError>;
    /// [`ObjectStore::put`] of bytes the caller gives up: a remote store sends them without
    /// copying them first (a pack is 16 MiB, and several are in flight).
    fn put_bytes(&self, key: &str, data: &Bytes, mode: PutMode) -> Result<(), StoreError> {
        self.put(key, data, mode)
    }
    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError>;
    /// Bytes `range` of the object; the range must lie inside it.
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError>;
    /// Like [`ObjectStore::get_range`], for metadata (map pages) that a cache may keep.
    fn get_range_meta(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        self.get_range(key, range)
    }
    /// All objects whose key starts with `prefix`, sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError>;
    /// Remove an object; removing a missing object is not an error.
    fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// How many puts a writer should keep in flight (remote stores gain from parallelism).
    fn put_parallelism(&self) -> usize {
        1
    }
    /// How many reads a reader should keep in flight to hide request latency.
    fn read_parallelism(&self) -> usize {
        1
    }
    /// Requests sent and retried so far (remote stores and wrappers count; local ones say 0).
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
    /// The Object Lock operations, for a store that has them (S3).
    fn object_lock(&self) -> Option<&dyn lock::ObjectLockStore> {
        None
    }
}

/// Counters of a store, for summaries and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Requests sent to a remote service (every attempt counts).
    pub requests: u64,
    /// Attempts repeated after a transient failure.
    pub retries: u64,
}

impl<T: ObjectStore + ?Sized> ObjectStore for std::sync::Arc<T> {
    fn location(&self) -> String {
        (**self).location()
    }
    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<(), StoreError> {
        (**self).put(key, data, mode)
    }
    fn put_bytes(&self, key: &str, data: &Bytes, mode: PutMode) -> Result<(), StoreError> {
        (**self).put_bytes(key, data, mode)
    }
    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        (**self).get(key)
    }
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        (**self).get_range(key, range)
    }
    fn get_range_meta(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        (**self).get_range_meta(key, range)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        (**self).list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), StoreError> {
        (**self).delete(key)
    }
    fn put_parallelism(&self) -> usize {
        (**self).put_parallelism()
    }
    fn read_parallelism(&self) -> usize {
        (**self).read_parallelism()
    }
    fn stats(&self) -> StoreStats {
        (**self).stats()
    }
    fn object_lock(&self) -> Option<&dyn lock::ObjectLockStore> {
        (**self).object_lock()
    }
}

/// Rejects keys that could escape a directory or collide with temporary files.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason| {
        Err(StoreError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    {
        return bad("only ASCII letters, digits, '-', '_', '.' and '/' are allowed");
    }
    if key
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == ".." || c.starts_with('.'))
    {
        return bad("empty, '.', '..' or hidden path component");
    }
    Ok(())
}
