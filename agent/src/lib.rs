//! # elastio agent: sources, restore targets and the pipelines between them and a vault
//!
//! * [`block`]: image files and block devices. Sizes come from metadata or `BLKGETSIZE64`; reads go
//!   through an I/O engine ([`block::engine`]): io_uring with several reads in flight (O_DIRECT for
//!   block devices), or positional reads as a fallback. Holes are found with SEEK_DATA/SEEK_HOLE
//!   and never read. A [`block::engine::SourcePlan`] adds what outside knowledge says: free
//!   space of the file systems (never read, stored as zeros) and, for a changed-block
//!   incremental, the changed ranges ([`block::ranges`], the `--changed-map` format); every other
//!   chunk is kept from the parent RP unread, but for a random sample read to verify it.
//! * [`pipeline`]: disk backup and restore. Backup = one reader thread → N worker threads feeding
//!   scalez's `DiskWriter` (zero check, keyed hash, dedup, compress + encrypt, packer), while the
//!   calling thread assembles the disk map in order (`MapAssembly`). Restore = the calling thread
//!   walks the map and cuts it into jobs with scalez's read planner (`plan_reads`); N workers fetch
//!   each job, then decode and verify it straight into an aligned buffer from a fixed pool, laid
//!   out in disk order; writer threads write each run of consecutive slots with one positional
//!   (O_DIRECT when allowed) write. The agent reads sources and writes targets; how an RP is
//!   written, walked and read belongs to scalez.
//!
//! * [`qemu`]: pull-mode backups of a QEMU block node over QMP: a point-in-time fleece overlay
//!   exported over NBD with a rotating dirty bitmap, torn down on every exit path.
//!
//! * [`stream`]: streams of unknown length (stdin, a file) in content-defined chunks, restored
//!   in order to any writer.
//! * [`mod@file`] and [`file_restore`]: directory trees (metadata, hard links, xattrs, holes),
//!   incremental by size/mtime/ctime/inode, restored without ever writing through a symlink.
//! * [`kafka`]: a Kafka topic as a stream RP per run, resuming where the last one ended (tags),
//!   produced back in per-partition order.
//! * [`ebs`] and [`ec2`]: EBS volumes and EC2 instances without an agent on them. Snapshots are
//!   read through the EBS direct APIs (full, or only the blocks `ListChangedBlocks` reports, the
//!   rest taken from the parent RP's map) into ordinary disk RPs, and RPs are written back as new
//!   snapshots and volumes (`ebs/`: the snapshot life cycle, the direct-API read, the restore).
//!   [`aws`] holds the call discipline: rate limit, per-attempt timeout, retries with backoff and
//!   jitter (the error classification and backoff shared with scalez's S3 store), counted for the
//!   summaries. File-system syscalls (`fsx`) stay private to this crate.
//!
//! ## Invariants
//! * Memory is bounded by queue depths and block sizes (see [`pipeline::BackupOptions`]), never by
//!   the size of the disk.
//! * A backup commits its RP only after every chunk and map page is durable; any error before that
//!   leaves no visible RP.
//! * A restore into a file writes a temporary sibling and renames it over the target only when
//!   complete and fsynced: a failed restore never leaves a target that looks complete.
//! * EBS: every block read is checked against the SHA-256 checksum EBS sends; blocks in memory are
//!   bounded by a window of twice the request concurrency whatever order requests finish in. A
//!   failed backup deletes the snapshot it made and commits nothing; a failed restore deletes the
//!   pending snapshot instead of completing it.
//! * A chunk is kept from the parent unread only where a changed-block source says nothing
//!   changed, and only from a parent of the same size and chunk size; a sampled chunk that differs
//!   fails the backup (or starts it over as a full read). Bytes are skipped as free only where a
//!   file system's own maps say so and those maps are current (not a mounted device, no journal
//!   or log awaiting recovery), or where a mounted file system told the kernel's GETFSMAP
//!   ([`fsmap`]) while frozen for the very snapshot being read ([`freeze`], EBS and EC2).

// Every `pub` item is reachable from the crate root (or it is `pub(crate)`), so the public
// surface is what lib.rs exports and nothing else.
#![warn(unreachable_pub)]

pub mod aws;
pub mod block;
pub mod ebs;
pub mod ec2;
mod error;
pub mod file;
pub mod file_restore;
pub mod freeze;
pub mod fsmap;
mod fsx;
pub mod kafka;
pub mod pipeline;
mod progress;
pub mod qemu;
pub mod stream;

pub use error::AgentError;
pub use progress::{Cancel, NoProgress, Progress};
