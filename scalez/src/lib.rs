//! # ScaleZ, the elastio vault engine
//!
//! A **vault** is one deduplication namespace in an [`store::ObjectStore`] (a local directory, or
//! an S3 bucket prefix: [`store::s3`]). Everything a backup writes is an immutable object named by its content hash
//! or a random id; the on-store format is documented object by object in `scalez/FORMAT.md`.
//!
//! ## Model
//! * Sources are cut into **chunks**: a fixed grid for disks (chunk size is a vault parameter),
//!   content-defined for files and streams (FastCDC). All-zero disk chunks are never stored.
//! * A chunk's id is BLAKE3 keyed with a vault secret ([`crypto`]); its payload is zstd then
//!   AES-256-GCM, sealed with its id as associated data.
//! * Sealed chunks are appended to **packs** (FORMAT.md, "Packs"); **index** objects ([`index`]) map chunk ids
//!   to (pack, offset, length). The in-memory index is the union of all index objects.
//! * A disk RP's block map is a tree of content-addressed **map pages** ([`disk_map`]) stored as
//!   chunks, so an incremental RP writes only changed pages.
//! * The **catalog** ([`catalog`]) has one object per recovery point, holding the map root.
//!
//! ## Operations
//! The engine owns the life cycle of an RP; callers feed bytes in and get bytes out:
//! * **write**: a disk RP through [`disk_writer::DiskWriter`] (`put` from any worker, a
//!   `MapAssembly` in slot order, `commit` of an [`RpDraft`]); stream and file RPs through a
//!   [`BackupSession`] and their own map formats ([`stream_map`], [`tree`]).
//! * **walk**: every chunk an RP references, map pages included, through one walker used by
//!   prune and check.
//! * **read**: [`fetch`] (one chunk, or coalesced runs of disk slots planned by
//!   [`fetch::plan_reads`]), [`reader::DiskReader`] for random access, all through one
//!   [`cache::ChunkCache`].
//! * **keep or drop**: [`retention::select`], then [`prune::PrunePlan`] (plan, then execute);
//!   [`check::check`] proves a vault or names what is damaged.
//!
//! ## Invariants
//! 1. Objects are immutable: packs, index objects and catalog entries are written with create-only
//!    puts under random or content-derived names. Tag changes are new objects, never edits.
//! 2. Write order is packs → index objects → catalog entry ([`BackupSession::finish`] must
//!    return before [`BackupSession::commit`]). A crash at any point leaves only
//!    unreferenced garbage; an RP is visible only once complete.
//! 3. An RP is self-contained: its map references every chunk directly; restoring never walks a
//!    chain of parents.
//! 4. Every byte read back is authenticated (AEAD, bound to the object's name); restores also
//!    re-hash each chunk to its id ([`vault::Verify`]); errors name the object.
//! 5. Memory is bounded by configuration (channel depths, pack size, cache sizes), not by disk size;
//!    the index costs ~50 bytes per chunk (a 44-byte entry in a hash table at up to 7/8 load:
//!    51-58 bytes per chunk, e.g. ≤ 580 MB for 10 million chunks). Prune needs nothing more per
//!    chunk: its "referenced" mark is a bit inside the index entry.
//! 6. Remote stores are reached through [`store::retry::RetryStore`] (transient failures retried
//!    with backoff; a create whose answer was lost is recognised), and read in coalesced ranged
//!    requests ([`vault::Vault::read_disk_chunks`]): about one request per 16 MiB pack written
//!    and per 8 MiB of disk restored. A local metadata cache ([`store::cache`]) is only an
//!    accelerator: its files are hash-checked and everything in them is AEAD-sealed anyway.
//! 7. Anyone with write access to the store can plant objects: names that are not canonical are
//!    ignored, listing sizes are capped before anything is allocated, unauthenticated key files
//!    are skipped when damaged and their KDF cost is capped before hashing (see FORMAT.md).
//! 8. What an RP references is defined once, by one walk (`walk::for_each_chunk`): prune's mark and spare steps and check
//!    all use it, so they cannot disagree about what must be kept.
//! 9. A locked vault (S3 Object Lock, [`store::lock`]) cannot lose data to stolen credentials:
//!    every object but the scratch leases is written locked, prune keeps live objects locked and
//!    destroys hidden versions only a retention after they were hidden ([`immutable`]).
//!
//! ## Concurrency
//! | operation | may run with | why it is safe |
//! |---|---|---|
//! | backup | backups (any asset, any host), restores, listing | random pack/index names; catalog is create-only (`If-None-Match: *` on S3) |
//! | restore / read | everything above | objects never change after they appear |
//! | tag | everything above | each change is a new object; readers merge in key order |
//! | rp delete | everything | removes the catalog entry only; data stays until prune |
//! | prune | everything, including other prunes | the lease/plan protocol of [`gc`] |
//! | check | everything | read-only |
//!
//! Deleting data is the one exception to immutability; [`gc`] documents the protocol (backup
//! leases, prune plans, the pre-commit check) and the table of races it covers.

// Every `pub` item is reachable from the crate root (or it is `pub(crate)`), so the public
// surface is what lib.rs exports and nothing else.
#![warn(unreachable_pub)]

#[cfg(feature = "aws")]
pub mod aws_error;
pub mod cache;
pub mod catalog;
pub mod check;
pub mod copy;
pub mod crypto;
pub mod disk_map;
pub mod disk_writer;
mod error;
pub mod fetch;
pub mod format;
pub mod gc;
mod ids;
pub mod immutable;
pub mod index;
mod keyring;
mod pack;
pub mod prune;
pub mod reader;
pub mod retention;
pub mod scans;
mod session;
pub mod store;
pub mod stream_map;
#[doc(hidden)]
pub mod testing;
pub mod tree;
pub mod vault;
mod walk;

pub use catalog::{
    Asset, DiskMapRef, InstanceRecord, InstanceVolume, RecoveryPoint, RpBody, RpDraft, RpFigures,
    RpKind, StreamRef, TagUpdate, TreeRef,
};
pub use error::{Error, Result};
pub use ids::{ChunkId, PackId, RecoveryPointId};
pub use session::{BackupSession, SessionStats};
pub use vault::{Vault, VaultConfig, VaultOptions};
