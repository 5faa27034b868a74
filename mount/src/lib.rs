//! # elastio mount: instant access to recovery points
//!
//! * [`nbd`]: an NBD server (newstyle fixed handshake, structured replies, `base:allocation`
//!   block status, many requests in flight per connection, replies out of order) exporting disk
//!   RPs read-only to nbdinfo, nbdcopy, qemu, nbdfuse or the kernel's nbd client.
//! * [`fuse`]: a read-only FUSE view of a disk RP: `disk.img` (sparse-aware), `partN.img` per
//!   partition, and a directory with the files of each file system elastio reads in user space,
//!   behind one interface ([`filesystem`]): ext2/3/4 ([`ext4`]), XFS v4/v5 ([`xfs`]), NTFS
//!   ([`ntfs`]), FAT12/16/32 with long names ([`fat`]) and single-device btrfs with its
//!   subvolumes ([`btrfs`]), inside partitions (MBR, logical
//!   partitions included, and GPT: [`partitions`]) and LVM2 logical volumes ([`lvm`]). EROFS on
//!   writes, EIO (logged with the object name) on damaged data. Stream RPs show as one file.
//!   [`views`] assembles what a mount of an RP shows.
//!
//!   Names in a disk RP's mount, stable: `disk.img`; `partN.img` per partition (N its number in
//!   the MBR or GPT, logical MBR partitions from 5); `partN/` (or `fs/` for an unpartitioned
//!   disk) with the files of each file system elastio reads; `lvm/<vg>/<lv>/` with the files of
//!   each LVM logical volume (linear or striped); `.elastio-status`, one line per place saying
//!   what it holds (`part1: xfs, files in part1/`, `part2: LVM physical volume of VG vg0, its
//!   volumes in lvm/vg0/`, `part3: swap, not readable by elastio yet`,
//!   `lvm/vg0/pool: not readable by elastio: a thin-pool LV, ...`), the same lines
//!   `elastio mount` prints. A place whose file system is unknown or damaged still shows as its
//!   image file.
//! * [`browse`]: any RP as one [`filesystem::FileSystem`] (a file RP's tree, a disk RP's file
//!   systems under the names above) for `rp ls/cat/find/diff` and file restores from disk RPs.
//! * [`usage`]: the free space of a disk's ext4 and XFS file systems, from their own allocation
//!   maps, for full backups that read only the used blocks.
//! * [`tree_view`]: a file RP as the tree it backed up (metadata, symlinks, hard links, xattrs,
//!   holes), read through the chunks its tree lists.
//!
//! Every view reads chunks through [`scalez::cache::ChunkCache`] (disks through
//! [`scalez::reader::DiskReader`], stream and file views directly): one cache type, bounded in
//! bytes, single flight, and the vault's verification on every chunk it decodes.
//!
//! Invariants: a recovery point is never modified through this crate; every byte served was
//! authenticated by the vault; one misbehaving client can only lose its own connection; memory
//! is bounded by the in-flight byte budgets (every NBD request is paid for before it is read
//! further, per connection and server-wide) and the cache sizes, not by request sizes or counts;
//! no NBD connection lives forever without progress (handshake, idle and write timeouts).

// Every `pub` item is reachable from the crate root (or it is `pub(crate)`), so the public
// surface is what lib.rs exports and nothing else.
#![warn(unreachable_pub)]

pub mod browse;
pub mod btrfs;
pub mod ext4;
pub mod fat;
pub mod filesystem;
pub mod fuse;
pub mod lvm;
pub mod nbd;
pub mod ntfs;
pub mod overlay;
pub mod partitions;
pub mod tree_view;
pub mod usage;
pub mod views;
pub mod xfs;

pub use scalez::reader::DiskReader;
