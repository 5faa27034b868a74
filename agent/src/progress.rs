//! Progress reporting as a trait, so the library has no terminal code (the CLI draws bars).

/// Receives progress of a long operation. Implementations must be cheap and thread-safe.
pub trait Progress: Send + Sync {
    /// Total bytes the operation will cover (logical size); called again when it starts over
    /// (a read that falls back to a full read), which resets what was done.
    fn start(&self, _total: u64) {}
    /// `bytes` more of the total are done.
    fn advance(&self, _bytes: u64) {}
    /// A stage of the operation worth telling the user about (e.g. "snapshot snap-1 40%").
    fn message(&self, _msg: &str) {}
}

/// Discards progress.
pub struct NoProgress;

impl Progress for NoProgress {}

/// A cancellation flag shared by an operation's threads. Pipelines check it between blocks and
/// stop with [`crate::AgentError::Cancelled`], cleaning up as on any other error.
#[derive(Clone, Default, Debug)]
pub struct Cancel(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}
