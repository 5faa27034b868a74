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
//!   as uniform as ciphertext, which is why magic numbers ([`magic`]) are read too.
//! * **A changed or renamed file** (renames are paired when the new name extends the old one,
//!   `x.docx` → `x.docx.id[…].eking`, or replaces its extension, `x.docx` → `x.crypt`) is
//!   compared with its baseline version, window by window (a sample of at most 16; zero
//!   windows before are no evidence): `encrypted` (≥ 75 % of its windows uniform, at least half
//!   of them turned so), `partial_encryption` (≥ 2 and ≥ 10 % turned: intermittent
//!   encryption), `magic_lost` (its magic gave way to uniform bytes), `header_encrypted` (no
//!   magic now, and its first 4 KiB turned uniform). Magic excuses nothing here (ciphertext
//!   behind a forged header is still windows that turned), except a file named as and being
//!   an xz (`xz file`), or a 7z/rar/age/LUKS/KeePass file that already was one.
//! * **A new file** (every file of a full scan): its magic matching its name, or a dense
//!   format's magic its name does not contradict, explains uniform bytes (deflate and zstd
//!   output can be as uniform as ciphertext, so a forged header over ciphertext in a *new*
//!   file goes unseen; changed and renamed files are compared with their baseline instead).
//!   Otherwise, mostly uniform: `magic_mismatch` (a
//!   `.docx` that is no zip, a `.txt` of uniform bytes), `ransomware_extension` (`.locked`,
//!   `.lockbit` …), or `uniform_new_file` (weight 0: videos, squashfs images and firmware are
//!   such files; ten with one extension the baseline lacked are a burst). Extensions encrypted
//!   by design (`.gpg`, `.kdbx`, `.p12` …) are never judged uniform. File signals weigh 25; a
//!   stream RP is one file, so its signal weighs the full 100.
//! * **Notes** ([`notes`]): a new small text file (≤ 64 KiB, a note-type extension) named
//!   like a ransom note that speaks of encryption *and* of payment or contact (40); a new small
//!   file carrying a Tor onion address (40). Notes weigh at most 80 together.
//! * **Bursts**: ≥ 200 renames in one folder (50, Veeam's threshold); ≥ 100 deletions that are
//!   more than 50 % of an extension's files (50, Veeam's; files under a path that does not read
//!   are damage, not deletions); ≥ 10 new or renamed uniform files with one extension the
//!   baseline did not have (100; incremental scans only).
//! * **Lost file systems**: a place (partition, LV) the baseline read that is gone or reads as
//!   nothing known now: `filesystem_lost` (100: a whole volume encrypted).
//! * **Verdict**: score ≥ **100** is ransomware (exit 201); a score above 0, or files not judged
//!   whole (rules timed out, files over `max_file_bytes`), is `suspicious` (205): never clean,
//!   never a baseline. Each report lists every finding with its file, signal, evidence and
//!   weight, and the thresholds.
//! * **Malware** ([`rules`]): YARA rules (yara-x) over the judged files — the built-in test set
//!   (EICAR, elastio's test marker) plus the user's rule files; a match is malware (202; 203
//!   with ransomware). Files larger than `max_yara_bytes` are matched piece by piece (pieces
//!   overlap by 1 MiB): string rules see everything, conditions on the whole file (`filesize`,
//!   offsets past the first piece, the `pe` module's view of a huge file) see each piece.
//! * **File systems**: every place of a disk RP a reader found damaged, and every directory,
//!   inode or block map of the scanned file systems that does not read (204 when nothing else).
//!
//! ## Baselines
//! Unchanged files are not read: they count as judged by the baseline's scan. So a baseline is
//! an earlier RP of the asset whose status is clean with the same rules (the rules'
//! fingerprint is in each report), chosen by the caller (the CLI), and an RP counts as clean
//! only if every baseline its clean report relied on still does.
//!
//! ## Invariants and budgets
//! * Nothing is written to the RPs scanned; every byte read was authenticated by the vault; a
//!   read the vault cannot authenticate stops the scan (exit 3), it does not blame the file
//!   system.
//! * Memory: `max_yara_bytes` (64 MiB by default) for the rules, one window class per 64 KiB of
//!   the file being judged, the paths of files removed and added since the baseline (to pair
//!   renames in any order), one counter per extension, the inodes judged (hard links are read
//!   once), and at most `max_findings` ransomware and as many malware findings plus 1000
//!   file-system ones (the verdict counts past the caps; RP-level findings are always kept).
//! * Work: each judged file is read once, up to `max_file_bytes` (64 GiB); baseline files are
//!   sampled; the rules run under a per-file time limit.

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
