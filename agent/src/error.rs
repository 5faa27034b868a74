use std::path::PathBuf;

/// Errors of sources, targets and pipelines; each names the path or RP involved.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Vault(#[from] scalez::Error),
    #[error("cannot read source {path}: {source}")]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write restore target {path}: {source}")]
    Target {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("restore target {path} already exists; pass --force to overwrite it")]
    TargetExists { path: PathBuf },
    #[error("restore target {path} holds {have} bytes, recovery point {rp} needs {need}")]
    TargetTooSmall {
        path: PathBuf,
        rp: String,
        have: u64,
        need: u64,
    },
    /// An AWS call failed for good; `what` names the operation and the volume, snapshot or block.
    #[error("{what}: {reason}")]
    Aws {
        what: String,
        code: Option<String>,
        reason: String,
    },
    #[error("block {index} of snapshot {snapshot} failed its SHA-256 checksum {attempts} times in a row (the data EBS sent does not match the checksum it sent)")]
    BlockChecksum {
        snapshot: String,
        index: u64,
        attempts: u32,
    },
    #[error("{0}")]
    Ebs(String),
    #[error("{0}")]
    Kafka(String),
    /// A pre- or post-command, a freeze or a thaw failed.
    #[error("{0}")]
    Quiesce(String),
    /// QEMU (over QMP) refused or failed a step of a pull-mode backup.
    #[error("qemu: {0}")]
    Qemu(String),
    /// A backup plan that cannot apply (a changed map without a fitting parent).
    #[error("{0}")]
    Plan(String),
    /// A chunk a changed-block source called unchanged differs from the parent's.
    #[error("{0}")]
    UnchangedDiffers(String),
    #[error("i/o engine: {0}")]
    Engine(String),
    #[error("interrupted")]
    Cancelled,
    /// A pipeline stage stopped because another one failed; that stage's error is what gets
    /// reported, so users should not see this one.
    #[error("pipeline stopped because another stage failed")]
    Stopped,
    #[error("a pipeline thread panicked")]
    Panicked,
}
