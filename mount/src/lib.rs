//! # elastio mount: instant access to recovery points
//!
//! FUSE views (disk image, partitions, files inside file systems) and an NBD server over any RP
//! arrive with their own issues. Both are built on [`scalez::reader::DiskReader`], the one
//! random-access reader with its chunk cache, so they share caching and verification with every
//! other reader of a vault.

pub use scalez::reader::DiskReader;
