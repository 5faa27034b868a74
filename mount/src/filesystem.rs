//! The one read-only file-system interface every reader of a disk RP's file systems implements
//! (ext2/3/4 today; XFS, NTFS, FAT, btrfs to come), and that the FUSE view, `rp ls/cat/find/diff`
//! and file restores from disk RPs use without knowing which file system it is.
//!
//! Readers parse bytes from images that may come from a compromised host: each bounds its work
//! and memory (see [`crate::ext4::Budget`]) and reports damage as `InvalidData` errors naming
//! the inode, never a panic. Inode numbers are the file system's own.

use std::io;
use std::sync::Arc;
use std::time::SystemTime;

pub use crate::ext4::Kind;
use crate::ext4::{self, Ext4, ReadAt};

/// What `stat` shows of an inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub kind: Kind,
    /// Permission bits, setuid, setgid and sticky included.
    pub perm: u16,
    pub size: u64,
    /// Allocated space in 512-byte units (as `st_blocks`).
    pub blocks: u64,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Device number of character and block devices (Linux `dev_t` encoding).
    pub rdev: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Creation time where the file system records one, else the change time.
    pub crtime: SystemTime,
}

/// One directory entry ("." and ".." are not listed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    pub ino: u64,
    /// From the entry itself where the file system records types; else ask [`FileSystem::attr`].
    pub kind: Option<Kind>,
}

/// A read-only file system inside a disk RP.
pub trait FileSystem: Send + Sync {
    /// The kind of file system, as users name it ("ext4", "xfs").
    fn type_name(&self) -> &'static str;
    /// The root directory's inode number.
    fn root(&self) -> u64;
    fn attr(&self, ino: u64) -> io::Result<Attr>;
    /// The entries of directory `ino`; `NotADirectory` for anything else.
    fn read_dir(&self, ino: u64) -> io::Result<Vec<Entry>>;
    /// The target of symlink `ino`.
    fn read_link(&self, ino: u64) -> io::Result<Vec<u8>>;
    /// Regular file `ino`, mapped for reading (this is where a file's block map is parsed, so
    /// reads after it do no metadata work); `IsADirectory` for anything but a regular file.
    fn open(self: Arc<Self>, ino: u64) -> io::Result<Arc<dyn FileData>>;
}

/// An open regular file.
pub trait FileData: Send + Sync {
    fn size(&self) -> u64;
    /// Appends the bytes `[offset, offset + len)` (clipped by the caller to the size) to `out`.
    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()>;
    /// Where `[offset, offset + len)` of the file lies on the device, as (device offset, length)
    /// runs, holes left out: the file's allocation map.
    fn disk_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)>;
    /// Whether reading `[offset, offset + len)` needs no fetch from the vault (its blocks are
    /// cached), so a caller can serve it inline instead of on a worker.
    fn is_cached(&self, offset: u64, len: u64) -> bool;
}

/// A device whose byte ranges can say whether they are cached (a partition of a disk RP).
pub trait CachedDevice: ReadAt + Send + Sync {
    fn is_range_cached(&self, offset: u64, len: u64) -> bool;
}

/// A plain file (an image on local disk): nothing is "cached" in the vault's sense.
impl CachedDevice for std::fs::File {
    fn is_range_cached(&self, _offset: u64, _len: u64) -> bool {
        false
    }
}

fn ext_ino(ino: u64) -> io::Result<u32> {
    u32::try_from(ino).map_err(|_| io::Error::from(io::ErrorKind::NotFound))
}

impl<D: CachedDevice + 'static> FileSystem for Ext4<D> {
    fn type_name(&self) -> &'static str {
        "ext4"
    }

    fn root(&self) -> u64 {
        Ext4::root(self) as u64
    }

    fn attr(&self, ino: u64) -> io::Result<Attr> {
        let inode = self.inode(ext_ino(ino)?)?;
        let kind = inode.kind().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("inode {ino} has no known file type"),
            )
        })?;
        Ok(Attr {
            kind,
            perm: inode.perm(),
            size: inode.size,
            blocks: inode.blocks,
            nlink: inode.links as u32,
            uid: inode.uid,
            gid: inode.gid,
            rdev: inode.rdev,
            atime: inode.atime.to_system(),
            mtime: inode.mtime.to_system(),
            ctime: inode.ctime.to_system(),
            crtime: inode.crtime.unwrap_or(inode.ctime).to_system(),
        })
    }

    fn read_dir(&self, ino: u64) -> io::Result<Vec<Entry>> {
        let inode = self.inode(ext_ino(ino)?)?;
        if inode.kind() != Some(Kind::Dir) {
            return Err(io::ErrorKind::NotADirectory.into());
        }
        Ok(Ext4::read_dir(self, &inode)?
            .into_iter()
            .map(|e| Entry {
                name: e.name,
                ino: e.ino as u64,
                kind: e.kind,
            })
            .collect())
    }

    fn read_link(&self, ino: u64) -> io::Result<Vec<u8>> {
        let inode = self.inode(ext_ino(ino)?)?;
        Ext4::read_link(self, &inode)
    }

    fn open(self: Arc<Self>, ino: u64) -> io::Result<Arc<dyn FileData>> {
        let inode = self.inode(ext_ino(ino)?)?;
        if inode.kind() != Some(Kind::File) {
            return Err(io::ErrorKind::IsADirectory.into());
        }
        let data = self.data(&inode)?;
        Ok(Arc::new(ExtFile {
            size: inode.size,
            data,
            fs: self,
        }))
    }
}

/// An open ext file: its mapped blocks.
struct ExtFile<D> {
    fs: Arc<Ext4<D>>,
    data: ext4::Data,
    size: u64,
}

impl<D: CachedDevice> FileData for ExtFile<D> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        self.fs.read_append(&self.data, offset, len, out)
    }

    fn disk_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        self.fs.disk_ranges(&self.data, offset, len)
    }

    fn is_cached(&self, offset: u64, len: u64) -> bool {
        let dev = self.fs.device();
        self.disk_ranges(offset, len)
            .iter()
            .all(|&(at, n)| dev.is_range_cached(at, n))
    }
}

/// The file system (or volume format) a byte range holds, from its magic numbers alone: a few
/// small reads at fixed offsets, nothing parsed. None when nothing known is there.
pub fn detect(dev: &dyn ReadAt, len: u64) -> Option<&'static str> {
    let at = |offset: u64, n: usize| -> Option<Vec<u8>> {
        let end = offset.checked_add(n as u64)?;
        if end > len {
            return None;
        }
        let mut b = vec![0u8; n];
        dev.read_at(offset, &mut b).ok()?;
        Some(b)
    };
    let is = |offset: u64, magic: &[u8]| at(offset, magic.len()).is_some_and(|b| b == magic);
    if is(0x438, &[0x53, 0xef]) {
        return Some("ext4");
    }
    if is(0, b"XFSB") {
        return Some("xfs");
    }
    if is(0x10040, b"_BHRfS_M") {
        return Some("btrfs");
    }
    if is(3, b"NTFS    ") {
        return Some("ntfs");
    }
    if is(0, b"LUKS\xba\xbe") {
        return Some("luks");
    }
    // An LVM2 physical volume: the label is in one of the first four sectors.
    if (0..4).any(|s| is(s * 512, b"LABELONE") && is(s * 512 + 24, b"LVM2 001")) {
        return Some("lvm2");
    }
    if is(510, &[0x55, 0xaa]) && (is(0x36, b"FAT1") || is(0x52, b"FAT32   ")) {
        return Some("vfat");
    }
    if is(4086, b"SWAPSPACE2") {
        return Some("swap");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_numbers_name_the_file_system() {
        let mut b = vec![0u8; 0x10100];
        assert_eq!(detect(&&b[..], b.len() as u64), None);
        b[..4].copy_from_slice(b"XFSB");
        assert_eq!(detect(&&b[..], b.len() as u64), Some("xfs"));
        b[..4].fill(0);
        b[3..11].copy_from_slice(b"NTFS    ");
        assert_eq!(detect(&&b[..], b.len() as u64), Some("ntfs"));
        b[3..11].fill(0);
        b[512..520].copy_from_slice(b"LABELONE");
        b[536..544].copy_from_slice(b"LVM2 001");
        assert_eq!(detect(&&b[..], b.len() as u64), Some("lvm2"));
        b[512..544].fill(0);
        b[0x52..0x5a].copy_from_slice(b"FAT32   ");
        b[510..512].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(detect(&&b[..], b.len() as u64), Some("vfat"));
        // A range too short for a magic's offset is read nowhere past its end.
        assert_eq!(detect(&&b[..0x40], 0x40), None);
        b[0x438..0x43a].copy_from_slice(&[0x53, 0xef]);
        assert_eq!(detect(&&b[..], b.len() as u64), Some("ext4"));
    }
}
