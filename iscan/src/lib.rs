//! # elastio iscan: integrity scans of recovery points
//!
//! Restoring a backup that is already encrypted or infected repeats the attack. A scan judges
//! the files of an RP (a file RP's tree, every file system inside a disk RP) — by default only
//! those that changed since a **baseline** RP (the parent), whose content keys tell unchanged
//! files apart without reading them — and says whether the RP shows ransomware, malware or
//! file-system damage.
//!
//! ## Signals
//! * **Ciphertext** ([`entropy`]): each 64 KiB window is *uniform* when its Shannon entropy is
//!   ≥ 7.9 bits/byte *and* Pearson's χ² of its byte histogram is ≤ 420 (255 degrees of freedom:
//!   random bytes stay below it, deflate/zstd/JPEG data do not). Range-coder output (xz, 7z) is
//!   as uniform as ciphertext, so uniform content counts only where no dense format's magic
//!   ([`magic`]) explains it. Per file, weight 25 each: `encrypted` (a changed or renamed file
//!   now ≥ 75 % uniform windows that were not), `partial_encryption` (≥ 2 and ≥ 10 % of its
//!   windows turned uniform: intermittent encryption), `magic_lost` (its magic gave way to
//!   uniform bytes), `magic_mismatch` (a new file of uniform bytes whose extension promises a
//!   format or text it is not: a `.docx` that is no zip), `ransomware_extension` (uniform,
//!   no magic, an extension of known families). A new uniform file with no other sign:
//!   `uniform_new_file`, weight 1. A stream RP is one file: its turning to ciphertext weighs
//!   the full 100.
//! * **Notes** ([`notes`]): a new small file (≤ 64 KiB) named like a ransom note (40), or
//!   carrying a Tor onion address (40).
//! * **Bursts**: ≥ 200 renames in one folder (50, Veeam's threshold); ≥ 100 deletions that are
//!   more than 50 % of an extension's files (50, Veeam's); ≥ 10 new or renamed uniform files
//!   with one extension the baseline did not have (100).
//! * An RP whose score reaches **100** is judged hit by ransomware (exit code 201). Each
//!   report lists every finding with its file, signal, evidence and weight, and the thresholds.
//! * **Malware** ([`rules`]): YARA rules (yara-x) over the judged files — the built-in test set
//!   (EICAR, elastio's test marker) plus the user's rule files; a match is malware (202; 203
//!   with ransomware).
//! * **File systems**: every place of a disk RP a reader found damaged, and every directory,
//!   inode or block map of the scanned file systems that does not read (204 when nothing else).
//!
//! ## Invariants and budgets
//! * Nothing is written to the RPs scanned; every byte read was authenticated by the vault.
//! * Memory: one file's first `max_yara_bytes` (64 MiB by default) for the rules, one window
//!   class per 64 KiB of that file, the paths of files removed since the baseline (to pair
//!   renames), one counter per extension, and at most `max_findings` findings (the verdict
//!   counts past that cap). Baseline files are sampled: at most 16 windows each.
//! * Work: each judged file is read once; the rules run under a per-file time limit.

#![warn(unreachable_pub)]

pub mod entropy;
pub mod local;
pub mod magic;
pub mod notes;
pub mod rules;
pub mod scan;
pub mod stream;

pub use scan::{scan, Finding, FindingKind, FsStatus, Options, Outcome, Stats};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("YARA rules: {0}")]
    Rules(String),
}
