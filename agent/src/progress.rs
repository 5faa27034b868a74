//! Progress reporting as a trait, so the library has no terminal code (the CLI draws bars).

/// Receives progress of a long operation. Implementations must be cheap and thread-safe.
pub trait Progress: Send + Sync {
    /// Total bytes the operation will cover (logical size).
    fn start(&self, _total: u64) {}
    /// `bytes` more of the total are done.
    fn advance(&self, _bytes: u64) {}
}

/// Discards progress.
pub struct NoProgress;

impl Progress for NoProgress {}
