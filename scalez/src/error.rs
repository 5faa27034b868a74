use crate::ids::{ChunkId, RecoveryPointId};
use crate::store::StoreError;

/// Errors of the vault engine. Each names the vault, object, chunk or RP a user needs to act.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "no vault at {location} (it has no config object); create one with `elastio vault init`"
    )]
    NotAVault { location: String },
    #[error("a vault already exists at {location}")]
    VaultExists { location: String },
    #[error(
        "the vault at {location} has format version {found}, this elastio reads up to version \
         {supported}: upgrade elastio to use it"
    )]
    NewerFormat {
        location: String,
        found: u64,
        supported: u32,
    },
    #[error(
        "wrong password for the vault at {location}: none of its {keys} key file(s) accepted it"
    )]
    WrongPassword { location: String, keys: usize },
    #[error("object {key} in vault {location} is damaged: {detail}")]
    Corrupt {
        location: String,
        key: String,
        detail: String,
    },
    #[error("chunk {chunk} is missing from the index of vault {location}")]
    MissingChunk { location: String, chunk: ChunkId },
    #[error("recovery point {id} not found in vault {location}")]
    RpNotFound {
        location: String,
        id: RecoveryPointId,
    },
    #[error("recovery point {id} is a {kind} recovery point, not a {wanted} one")]
    WrongKind {
        id: RecoveryPointId,
        kind: crate::RpKind,
        wanted: crate::RpKind,
    },
    #[error(
        "recovery point {id} is a {kind} recovery point without its {kind} data: its catalog \
         entry is damaged (run check)"
    )]
    MissingBody {
        id: RecoveryPointId,
        kind: crate::RpKind,
    },
    #[error("invalid vault parameter: {0}")]
    InvalidParameter(String),
    /// A bug or an impossible state of a backup session (never a user's doing).
    #[error("the backup session stopped: {0}")]
    SessionFailed(String),
    /// A session's background writer stopped on an error of its own, which finishing or
    /// abandoning the session returns: that error is the one to report, not this one.
    #[error("the {what} stopped")]
    WriterStopped { what: &'static str },
    /// A backup raced a prune (its lease went stale, or a pack it relies on was condemned or
    /// deleted: the RP it was writing was not committed), or a prune raced another prune
    /// (nothing was deleted). Running `what` again is safe and expected.
    #[error("{reason}; run {what} again")]
    RunAgain { reason: String, what: &'static str },
}

impl Error {
    /// Whether the same operation, tried again, may succeed: a backup that raced a prune, or a
    /// transient store failure (the store already retried it with backoff).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::RunAgain { .. } => true,
            Error::Store(e) => e.is_retryable(),
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
