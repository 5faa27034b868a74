//! A read-only NTFS reader in user space, for the Windows volumes inside disk RPs (EC2 Windows
//! instances, VM disks), shown the way ntfs-3g shows them with default options.
//!
//! Written here rather than with the `ntfs` crate: its index traversal has no guard against a
//! node that points back at itself (unbounded time and memory, an abort `catch_unwind` cannot
//! stop), it allocates index records of any size the image claims, and it returns compressed
//! data raw without an error; all three are reachable from a hostile image.
//!
//! Model: [`Ntfs::open`] validates the boot sector and maps the MFT from record 0's `$DATA`
//! runs. An inode number is an MFT record number. A record is read with its update-sequence
//! fixups applied; its attributes, and those of the extension records its `$ATTRIBUTE_LIST`
//! names, are gathered into one list. A directory is its `$INDEX_ROOT` entries plus those of
//! every in-use `INDX` record of its `$INDEX_ALLOCATION` (order does not matter to a listing,
//! so the B+tree is not walked). Files are their unnamed `$DATA` runs (sparse runs read as
//! zeros; bytes past the initialized size too); named `$DATA` streams are extended attributes
//! `user.<name>`, as ntfs-3g's default `streams_interface=xattr` shows them. A file's security
//! descriptor (owner, group, ACLs; self-relative, as Windows stores it) is the extended
//! attribute `system.ntfs_acl`, ntfs-3g's name for it, so `getfattr -n system.ntfs_acl` reads
//! the same bytes on either mount and a restore onto an ntfs-3g volume sets it back.
//!
//! Shown as ntfs-3g shows it without user mapping: owner 0:0, mode 0777 for directories and
//! files alike (the DOS read-only attribute does not show in the mode), system files (records below 16) hidden, DOS-only names
//! hidden, hard links as links, symlinks and junctions (reparse points) and Interix symlinks as
//! symlinks. Compressed and encrypted files are refused with an error saying so.
//!
//! Invariants: nothing is written; every number is checked; records and index blocks are
//! bounded in size (MFT records 256 B–4 KiB, index records 512 B–64 KiB), run lists in runs
//! ([`MAX_RUNS`]), attribute lists in entries and extension records, listings in bytes and
//! entries; a damaged object is an error naming its record, never a panic or a hang.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ext4::{read_extents_append, runs, Extent, Kind, ReadAt};
use crate::filesystem::{Attr, CachedDevice, Entry, FileData, FileSystem, Le, Xattrs};

/// Runs decoded for one attribute (all its pieces together).
pub const MAX_RUNS: usize = 1 << 20;
/// Index bytes read for one listing.
pub const MAX_DIR_BYTES: u64 = 64 << 20;
/// Entries of one listing.
pub const MAX_DIR_ENTRIES: usize = 1 << 20;
/// Bytes of names in one listing.
pub const MAX_DIR_NAME_BYTES: usize = 32 << 20;
/// Extension records gathered for one file.
const MAX_EXTENSIONS: usize = 1024;
/// Named streams shown for one file.
const MAX_STREAMS: usize = 1024;
/// Bytes of extended attributes (named streams) kept for one file.
pub const MAX_XATTR_BYTES: u64 = 4 << 20;
/// The root directory's record.
const ROOT: u64 = 5;
/// `$Secure`, the volume's shared security descriptors.
const SECURE: u64 = 9;
/// The largest security descriptor read (Windows caps an ACL at 64 KiB).
const MAX_SECURITY: u64 = 1 << 16;
/// The largest `$Secure:$SDS` indexed (a descriptor per distinct ACL: real volumes hold a few
/// MiB).
const MAX_SDS: u64 = 32 << 20;
/// Records below this are the file system's own ($MFT, $Bitmap, ...): hidden, as ntfs-3g does.
const FIRST_USER: u64 = 16;

const AT_STANDARD_INFORMATION: u32 = 0x10;
const AT_ATTRIBUTE_LIST: u32 = 0x20;
const AT_FILE_NAME: u32 = 0x30;
const AT_SECURITY_DESCRIPTOR: u32 = 0x50;
const AT_DATA: u32 = 0x80;
const AT_INDEX_ROOT: u32 = 0x90;
const AT_INDEX_ALLOCATION: u32 = 0xa0;
const AT_BITMAP: u32 = 0xb0;
const AT_REPARSE_POINT: u32 = 0xc0;
const AT_END: u32 = 0xffff_ffff;

/// Any compression method (LZNT1 is 1); resident data is never compressed.
const COMPRESSION_MASK: u16 = 0x00ff;
const FLAG_ENCRYPTED: u16 = 0x4000;
const FILE_ATTR_SYSTEM: u32 = 0x0004;
const REPARSE_SYMLINK: u32 = 0xa000_000c;
const REPARSE_MOUNT_POINT: u32 = 0xa000_0003;
const REPARSE_LX_SYMLINK: u32 = 0xa000_001d;

fn corrupt(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("ntfs: {what}"))
}

fn unsupported(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, format!("ntfs: {what}"))
}

/// NTFS time (100 ns since 1601) as a system time.
fn nt_time(t: u64) -> SystemTime {
    const TO_UNIX: u64 = 116_444_736_000_000_000;
    if t >= TO_UNIX {
        let d = t - TO_UNIX;
        UNIX_EPOCH + Duration::new(d / 10_000_000, (d % 10_000_000) as u32 * 100)
    } else {
        let d = TO_UNIX - t;
        UNIX_EPOCH - Duration::new(d / 10_000_000, (d % 10_000_000) as u32 * 100)
    }
}

/// UTF-16 (little-endian) as UTF-8, unpaired surrogates replaced.
fn utf16(b: &[u8]) -> Vec<u8> {
    let units = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
    char::decode_utf16(units)
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect::<String>()
        .into_bytes()
}

/// One attribute of a file (from its base record or an extension record).
#[derive(Debug, Clone)]
struct Attribute {
    kind: u32,
    name: Vec<u8>,
    flags: u16,
    body: Body,
}

#[derive(Debug, Clone)]
enum Body {
    Resident(Vec<u8>),
    NonResident {
        first_vcn: u64,
        /// (VCN, LCN or None for a sparse run, clusters)
        runs: Vec<(u64, Option<u64>, u64)>,
        size: u64,
        initialized: u64,
    },
}

/// A file's record and attributes.
#[derive(Debug, Clone)]
struct Record {
    number: u64,
    links: u16,
    dir: bool,
    attrs: Vec<Attribute>,
}

impl Record {
    fn find(&self, kind: u32, name: &[u8]) -> impl Iterator<Item = &Attribute> + '_ {
        let name = name.to_vec();
        self.attrs
            .iter()
            .filter(move |a| a.kind == kind && a.name == name)
    }

    fn resident(&self, kind: u32, name: &[u8]) -> Option<&[u8]> {
        self.find(kind, name).find_map(|a| match &a.body {
            Body::Resident(v) => Some(&v[..]),
            _ => None,
        })
    }
}

#[derive(Debug, Clone)]
struct Geometry {
    cluster: u64,
    record: u64,
    index_record: u64,
    clusters: u64,
}

/// A read-only NTFS volume on `R`.
pub struct Ntfs<R> {
    dev: R,
    g: Geometry,
    /// The MFT's own runs (clusters).
    mft: Vec<Extent>,
    mft_records: u64,
    label: String,
    /// `$Secure:$SDS`, indexed on first use (see [`Ntfs::security`]).
    sds: OnceLock<Result<Sds, String>>,
}

/// The shared security descriptors of a volume (`$Secure:$SDS`): where each id's is.
struct Sds {
    extents: Vec<Extent>,
    /// Security id → (offset of the descriptor in the stream, its length).
    by_id: HashMap<u32, (u64, u32)>,
}

impl<R: ReadAt> Ntfs<R> {
    /// Opens the NTFS volume on `dev` (`size` bytes). `Ok(None)` without an NTFS boot sector.
    pub fn open(dev: R, size: u64) -> io::Result<Option<Self>> {
        if size < 512 {
            return Ok(None);
        }
        let mut b = [0u8; 512];
        dev.read_at(0, &mut b)?;
        if &b[3..11] != b"NTFS    " {
            return Ok(None);
        }
        let l = Le(&b);
        let sector = l.u16(11)? as u64;
        let spc = match l.u8(13)? {
            v @ 1..=0x80 => v as u64,
            v => 1u64.checked_shl(256 - v as u32).unwrap_or(0),
        };
        // Checked before any use: a hostile sector count or shift must not overflow.
        let cluster = sector
            .checked_mul(spc)
            .filter(|c| c.is_power_of_two() && (512..=2 << 20).contains(c))
            .ok_or_else(|| corrupt(format!("{spc} sectors of {sector} bytes per cluster")))?;
        let size_of = |v: u8| -> u64 {
            if v < 0x80 {
                v as u64 * cluster
            } else {
                1u64.checked_shl(256 - v as u32).unwrap_or(0)
            }
        };
        let record = size_of(l.u8(64)?);
        let index_record = size_of(l.u8(68)?);
        let sectors = l.u64(40)?;
        let ok = sector.is_power_of_two()
            && (512..=4096).contains(&sector)
            && cluster.is_power_of_two()
            && cluster <= 2 << 20
            && record.is_power_of_two()
            && (256..=4096).contains(&record)
            && index_record.is_power_of_two()
            && (512..=65536).contains(&index_record)
            && sectors.checked_mul(sector).is_some_and(|n| n <= size);
        if !ok {
            return Err(corrupt(format!(
                "boot sector geometry is inconsistent ({sector}-byte sectors, {cluster}-byte \
                 clusters, {record}-byte records, {index_record}-byte index records)"
            )));
        }
        let g = Geometry {
            cluster,
            record,
            index_record,
            clusters: sectors * sector / cluster,
        };
        let mft_lcn = l.u64(48)?;
        if mft_lcn >= g.clusters {
            return Err(corrupt(format!(
                "the MFT at cluster {mft_lcn} is outside the volume"
            )));
        }
        // Record 0 describes the MFT itself: map it from its own $DATA runs.
        let mut fs = Ntfs {
            dev,
            g,
            mft: vec![Extent {
                logical: 0,
                physical: mft_lcn,
                len: 1,
            }],
            mft_records: 1,
            label: String::new(),
            sds: OnceLock::new(),
        };
        fs.mft = vec![Extent {
            logical: 0,
            physical: mft_lcn,
            len: (fs.g.record * 16).div_ceil(fs.g.cluster),
        }];
        fs.mft_records = 16;
        // Record 0's own first $DATA piece maps at least the start of the MFT, where its
        // extension records are (Windows and ntfs-3g put them in records 16-23); with that
        // map the whole record, attribute list included, can be read.
        let raw = fs.raw_record(0)?;
        let mut base = Vec::new();
        fs.parse_attrs(0, &raw, &mut base)?;
        let first = base.iter().find_map(|a| match &a.body {
            Body::NonResident {
                first_vcn: 0,
                runs,
                size,
                ..
            } if a.kind == AT_DATA && a.name.is_empty() => Some((extents(runs), *size)),
            _ => None,
        });
        if let Some((ext, size)) = first {
            fs.mft = ext;
            fs.mft_records = size / fs.g.record;
        }
        let mft = fs.record(0)?;
        let data = fs.runs_of(&mft, AT_DATA, b"")?;
        let (extents, size, _) = data.ok_or_else(|| corrupt("the MFT has no data"))?;
        fs.mft = extents;
        fs.mft_records = size / fs.g.record;
        if let Ok(vol) = fs.record(3) {
            if let Some(v) = vol.resident(0x60, b"") {
                fs.label = String::from_utf8_lossy(&utf16(v)).into_owned();
            }
        }
        Ok(Some(fs))
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn device(&self) -> &R {
        &self.dev
    }

    /// Reads `len` bytes at byte `offset` of something mapped by `extents` (in clusters).
    fn read_mapped(&self, extents: &[Extent], offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len as usize);
        read_extents_append(
            &self.dev,
            extents,
            self.g.cluster,
            offset,
            len as usize,
            &mut out,
        )?;
        Ok(out)
    }

    /// Applies the update-sequence fixups of a FILE or INDX block.
    fn fixup(&self, b: &mut [u8], what: &str) -> io::Result<()> {
        let l = Le(b);
        let (off, count) = (l.u16(4)? as usize, l.u16(6)? as usize);
        let strides = b.len() / 512;
        if count == 0 || count - 1 != strides || off + 2 * count > b.len() {
            return Err(corrupt(format!(
                "{what}: update sequence of {count} at {off}"
            )));
        }
        let usn = [b[off], b[off + 1]];
        for i in 1..count {
            let end = i * 512;
            if b[end - 2..end] != usn {
                return Err(corrupt(format!("{what}: torn write (sector {i})")));
            }
            let fix = [b[off + 2 * i], b[off + 2 * i + 1]];
            b[end - 2..end].copy_from_slice(&fix);
        }
        Ok(())
    }

    /// The raw record `n` (fixups applied), checked to be an in-use FILE record.
    fn raw_record(&self, n: u64) -> io::Result<Vec<u8>> {
        if n >= self.mft_records {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("ntfs: no record {n}"),
            ));
        }
        let mut b = self.read_mapped(&self.mft, n * self.g.record, self.g.record)?;
        if &b[..4] != b"FILE" {
            return Err(corrupt(format!("record {n} is not a FILE record")));
        }
        self.fixup(&mut b, &format!("record {n}"))?;
        if Le(&b).u16(22)? & 1 == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("ntfs: record {n} is not in use"),
            ));
        }
        Ok(b)
    }

    /// The attributes of one record's bytes.
    fn parse_attrs(&self, n: u64, b: &[u8], out: &mut Vec<Attribute>) -> io::Result<()> {
        let l = Le(b);
        let used = (l.u32(24)? as usize).min(b.len());
        let mut at = l.u16(20)? as usize;
        while at + 8 <= used {
            let kind = l.u32(at)?;
            if kind == AT_END {
                break;
            }
            let len = l.u32(at + 4)? as usize;
            if len < 16 || at + len > used || !len.is_multiple_of(8) {
                return Err(corrupt(format!(
                    "record {n}: an attribute of {len} bytes at {at}"
                )));
            }
            let a = Le(&b[at..at + len]);
            let (nonres, name_len, name_off) = (a.u8(8)?, a.u8(9)? as usize, a.u16(10)? as usize);
            let name = utf16(a.bytes(name_off, name_len * 2)?);
            let flags = a.u16(12)?;
            let body = if nonres == 0 {
                let (vlen, voff) = (a.u32(16)? as usize, a.u16(20)? as usize);
                Body::Resident(a.bytes(voff, vlen)?.to_vec())
            } else {
                let first_vcn = a.u64(16)?;
                let run_off = a.u16(32)? as usize;
                let size = a.u64(48)?;
                let initialized = a.u64(56)?.min(size);
                if size > i64::MAX as u64 {
                    return Err(corrupt(format!("record {n}: an attribute of {size} bytes")));
                }
                let runs =
                    self.decode_runs(n, a.bytes(run_off, len.saturating_sub(run_off))?, first_vcn)?;
                Body::NonResident {
                    first_vcn,
                    runs,
                    size,
                    initialized,
                }
            };
            out.push(Attribute {
                kind,
                name,
                flags,
                body,
            });
            if out.len() > 1 << 16 {
                return Err(corrupt(format!("record {n}: too many attributes")));
            }
            at += len;
        }
        Ok(())
    }

    /// A run list: (VCN, LCN or None when sparse, clusters) from `vcn` on.
    fn decode_runs(
        &self,
        n: u64,
        b: &[u8],
        mut vcn: u64,
    ) -> io::Result<Vec<(u64, Option<u64>, u64)>> {
        let mut out = Vec::new();
        let mut lcn: i64 = 0;
        let mut at = 0;
        while let Some(&h) = b.get(at) {
            if h == 0 {
                break;
            }
            let (ls, os) = ((h & 0xf) as usize, (h >> 4) as usize);
            if ls == 0 || ls > 8 || os > 8 {
                return Err(corrupt(format!("record {n}: a run header {h:#x}")));
            }
            let field = b.get(at + 1..at + 1 + ls + os).ok_or_else(|| {
                corrupt(format!("record {n}: a run list runs past its attribute"))
            })?;
            let len = field[..ls]
                .iter()
                .rev()
                .fold(0u64, |v, &c| v << 8 | c as u64);
            let delta = if os == 0 {
                None
            } else {
                let raw = field[ls..]
                    .iter()
                    .rev()
                    .fold(0u64, |v, &c| v << 8 | c as u64);
                let shift = 64 - 8 * os as u32;
                Some(((raw << shift) as i64) >> shift)
            };
            at += 1 + ls + os;
            let run = match delta {
                None => None,
                Some(d) => {
                    lcn = lcn
                        .checked_add(d)
                        .ok_or_else(|| corrupt(format!("record {n}: a run offset overflows")))?;
                    let start = u64::try_from(lcn)
                        .ok()
                        .filter(|&s| s.checked_add(len).is_some_and(|e| e <= self.g.clusters));
                    Some(start.ok_or_else(|| {
                        corrupt(format!(
                            "record {n}: a run at cluster {lcn} is outside the volume"
                        ))
                    })?)
                }
            };
            if len == 0 {
                return Err(corrupt(format!("record {n}: an empty run")));
            }
            out.push((vcn, run, len));
            vcn = vcn
                .checked_add(len)
                .filter(|&v| v <= i64::MAX as u64 / self.g.cluster)
                .ok_or_else(|| corrupt(format!("record {n}: runs past any file size")))?;
            if out.len() > MAX_RUNS {
                return Err(corrupt(format!("record {n}: more than {MAX_RUNS} runs")));
            }
        }
        Ok(out)
    }

    /// Record `n` with its attributes, those of its extension records included.
    fn record(&self, n: u64) -> io::Result<Record> {
        let b = self.raw_record(n)?;
        let l = Le(&b);
        if l.u64(32)? & 0xffff_ffff_ffff != 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("ntfs: record {n} is an extension record"),
            ));
        }
        let mut attrs = Vec::new();
        self.parse_attrs(n, &b, &mut attrs)?;
        let links = l.u16(18)?;
        let dir = l.u16(22)? & 2 != 0;
        // The attribute list names the extension records holding the rest.
        let list = attrs.iter().find(|a| a.kind == AT_ATTRIBUTE_LIST).cloned();
        if let Some(list) = list {
            let bytes = match &list.body {
                Body::Resident(v) => v.clone(),
                Body::NonResident { runs, size, .. } => {
                    if *size > 16 << 20 {
                        return Err(corrupt(format!(
                            "record {n}: an attribute list of {size} bytes"
                        )));
                    }
                    self.read_mapped(&extents(runs), 0, *size)?
                }
            };
            let mut others = Vec::new();
            let mut seen = std::collections::HashSet::new();
            let mut at = 0;
            while at + 26 <= bytes.len() {
                let e = Le(&bytes[at..]);
                let len = e.u16(4)? as usize;
                if len < 26 {
                    return Err(corrupt(format!(
                        "record {n}: an attribute-list entry of {len} bytes"
                    )));
                }
                let r = e.u64(16)? & 0xffff_ffff_ffff;
                if r != n && seen.insert(r) {
                    others.push(r);
                    if others.len() > MAX_EXTENSIONS {
                        return Err(corrupt(format!(
                            "record {n}: more than {MAX_EXTENSIONS} extension records"
                        )));
                    }
                }
                at += len;
            }
            for r in others {
                let eb = self.raw_record(r)?;
                if Le(&eb).u64(32)? & 0xffff_ffff_ffff != n {
                    return Err(corrupt(format!(
                        "record {r} is not an extension of record {n}"
                    )));
                }
                self.parse_attrs(r, &eb, &mut attrs)?;
            }
        }
        Ok(Record {
            number: n,
            links,
            dir,
            attrs,
        })
    }

    /// The runs of non-resident attribute `kind`/`name` (its pieces joined): (extents in
    /// clusters, data size, initialized size). None when the record has no such attribute;
    /// an error when it is resident.
    fn runs_of(
        &self,
        r: &Record,
        kind: u32,
        name: &[u8],
    ) -> io::Result<Option<(Vec<Extent>, u64, u64)>> {
        let mut pieces: Vec<&Attribute> = r.find(kind, name).collect();
        if pieces.is_empty() {
            return Ok(None);
        }
        pieces.sort_by_key(|a| match a.body {
            Body::NonResident { first_vcn, .. } => first_vcn,
            _ => 0,
        });
        let (mut all, mut size, mut init) = (Vec::new(), None, 0);
        for a in pieces {
            match &a.body {
                Body::Resident(_) => {
                    return Err(corrupt(format!(
                        "record {}: a resident attribute {kind:#x} in pieces",
                        r.number
                    )))
                }
                Body::NonResident {
                    runs,
                    size: s,
                    initialized,
                    first_vcn,
                } => {
                    if *first_vcn == 0 {
                        size = Some(*s);
                        init = *initialized;
                    }
                    all.extend(runs.iter().copied());
                    if all.len() > MAX_RUNS {
                        return Err(corrupt(format!(
                            "record {}: more than {MAX_RUNS} runs",
                            r.number
                        )));
                    }
                }
            }
        }
        let size = size.ok_or_else(|| {
            corrupt(format!(
                "record {}: attribute {kind:#x} has no first piece",
                r.number
            ))
        })?;
        let ext = extents(&all);
        if ext
            .windows(2)
            .any(|w| w[0].logical + w[0].len > w[1].logical)
        {
            return Err(corrupt(format!("record {}: runs overlap", r.number)));
        }
        Ok(Some((ext, size, init)))
    }

    /// The whole value of attribute `kind`/`name` (resident, or read when at most `limit`).
    fn value(&self, r: &Record, kind: u32, name: &[u8], limit: u64) -> io::Result<Option<Vec<u8>>> {
        if let Some(v) = r.resident(kind, name) {
            return Ok(Some(v.to_vec()));
        }
        if r.find(kind, name)
            .any(|a| a.flags & (COMPRESSION_MASK | FLAG_ENCRYPTED) != 0)
        {
            return Err(unsupported(format!(
                "record {}: attribute {kind:#x} is compressed or encrypted",
                r.number
            )));
        }
        match self.runs_of(r, kind, name)? {
            None => Ok(None),
            Some((_, size, _)) if size > limit => Err(corrupt(format!(
                "record {}: attribute {kind:#x} of {size} bytes",
                r.number
            ))),
            Some((ext, size, init)) => {
                let mut v = self.read_mapped(&ext, 0, size)?;
                v[init as usize..].fill(0);
                Ok(Some(v))
            }
        }
    }

    /// The security descriptor of record `r` (self-relative, as Windows stores it): the one
    /// its standard information's security id names in `$Secure:$SDS`, else its own
    /// `$SECURITY_DESCRIPTOR` attribute (NTFS 1.x). None when it has neither.
    fn security(&self, r: &Record) -> io::Result<Option<Vec<u8>>> {
        // As ntfs-3g: the shared descriptor of a non-zero security id first (chkdsk can leave
        // both), the record's own attribute otherwise.
        let si = r.resident(AT_STANDARD_INFORMATION, b"").unwrap_or_default();
        let id = Le(si).u32(0x34).unwrap_or(0);
        if id != 0 {
            let sds = match self.sds.get() {
                Some(known) => known,
                None => {
                    // What the image says is kept (it does not change); a failed read of the
                    // vault is tried again.
                    let indexed = self.index_sds();
                    if let Err(e) = &indexed {
                        if e.kind() == io::ErrorKind::Other {
                            return Err(io::Error::new(e.kind(), format!("$Secure: {e}")));
                        }
                    }
                    self.sds.get_or_init(|| indexed.map_err(|e| e.to_string()))
                }
            };
            let sds = sds.as_ref().map_err(|e| corrupt(format!("$Secure: {e}")))?;
            if let Some(&(at, n)) = sds.by_id.get(&id) {
                return Ok(Some(self.read_mapped(&sds.extents, at, n as u64)?));
            }
        }
        self.value(r, AT_SECURITY_DESCRIPTOR, b"", MAX_SECURITY)
    }

    /// Indexes `$Secure:$SDS`: 256 KiB blocks of entries (each a 20-byte header — hash, id,
    /// its own offset, length — and the descriptor, 16-byte aligned), every block followed by
    /// its mirror copy, which is skipped.
    fn index_sds(&self) -> io::Result<Sds> {
        const BLOCK: u64 = 256 << 10;
        let r = self.record(SECURE)?;
        if r.find(AT_DATA, b"$SDS")
            .any(|a| a.flags & (COMPRESSION_MASK | FLAG_ENCRYPTED) != 0)
        {
            return Err(corrupt("$SDS is compressed or encrypted"));
        }
        let (extents, size, init) = self
            .runs_of(&r, AT_DATA, b"$SDS")?
            .ok_or_else(|| corrupt("no $SDS stream"))?;
        let size = size.min(init);
        if size > MAX_SDS {
            return Err(corrupt(format!("$SDS of {size} bytes")));
        }
        let mut by_id = HashMap::new();
        for block in (0..size).step_by(2 * BLOCK as usize) {
            let b = self.read_mapped(&extents, block, BLOCK.min(size - block))?;
            let mut p = 0usize;
            while p + 20 <= b.len() {
                let h = Le(&b[p..]);
                let (id, at, n) = (h.u32(4)?, h.u64(8)?, h.u32(16)? as u64);
                if n < 20 || at != block + p as u64 || p as u64 + n > b.len() as u64 {
                    break;
                }
                // A descriptor past Windows' own limit is left out (its files show none).
                if n - 20 <= MAX_SECURITY {
                    by_id.insert(id, (at + 20, (n - 20) as u32));
                }
                p += n.next_multiple_of(16) as usize;
            }
        }
        Ok(Sds { extents, by_id })
    }

    /// The entries of directory record `r`.
    fn list(&self, r: &Record) -> io::Result<Vec<Entry>> {
        if !r.dir {
            return Err(io::ErrorKind::NotADirectory.into());
        }
        let mut out = Vec::new();
        let mut name_bytes = 0;
        let root = r
            .resident(AT_INDEX_ROOT, b"$I30")
            .ok_or_else(|| corrupt(format!("directory {} has no index root", r.number)))?;
        // The root: 16 bytes of index header, then a node header.
        self.node_entries(r.number, root, 16, &mut out, &mut name_bytes)?;
        let Some((ext, size, _)) = self.runs_of(r, AT_INDEX_ALLOCATION, b"$I30")? else {
            return Ok(out);
        };
        if size > MAX_DIR_BYTES {
            return Err(corrupt(format!(
                "directory {} has {size} bytes of index",
                r.number
            )));
        }
        let bitmap = self
            .value(r, AT_BITMAP, b"$I30", 1 << 20)?
            .unwrap_or_default();
        let ir = self.g.index_record;
        for i in 0..size / ir {
            let used = bitmap
                .get((i / 8) as usize)
                .is_some_and(|b| b >> (i % 8) & 1 == 1);
            if !used {
                continue;
            }
            let mut b = self.read_mapped(&ext, i * ir, ir)?;
            if &b[..4] != b"INDX" {
                return Err(corrupt(format!(
                    "directory {}: index record {i} is not INDX",
                    r.number
                )));
            }
            self.fixup(&mut b, &format!("directory {} index record {i}", r.number))?;
            self.node_entries(r.number, &b, 24, &mut out, &mut name_bytes)?;
        }
        Ok(out)
    }

    /// The file-name entries of the index node whose header is at `hdr` of `b`.
    fn node_entries(
        &self,
        dir: u64,
        b: &[u8],
        hdr: usize,
        out: &mut Vec<Entry>,
        name_bytes: &mut usize,
    ) -> io::Result<()> {
        let l = Le(b);
        let first = l.u32(hdr)? as usize;
        let total = l.u32(hdr + 4)? as usize;
        let end = (hdr + total).min(b.len());
        let mut at = hdr + first;
        while at + 16 <= end {
            let e = Le(&b[at..end]);
            let (len, key_len, flags) = (e.u16(8)? as usize, e.u16(10)? as usize, e.u32(12)?);
            if flags & 2 != 0 {
                break; // The last entry holds no key.
            }
            if len < 16 || at + len > end {
                return Err(corrupt(format!(
                    "directory {dir}: an index entry of {len} bytes"
                )));
            }
            let reference = e.u64(0)? & 0xffff_ffff_ffff;
            if 16 + key_len > len {
                return Err(corrupt(format!(
                    "directory {dir}: an index key of {key_len} bytes in an entry of {len}"
                )));
            }
            let key = Le(e.bytes(16, key_len)?);
            let name_len = key.u8(64)? as usize;
            let namespace = key.u8(65)?;
            let name = utf16(key.bytes(66, name_len * 2)?);
            at += len;
            // DOS names duplicate the Win32 ones; system files and "." stay hidden.
            if namespace == 2
                || reference < FIRST_USER
                || name.is_empty()
                || name == b"."
                || name.contains(&b'/')
                || name.contains(&0)
            {
                continue;
            }
            if out.len() >= MAX_DIR_ENTRIES {
                return Err(corrupt(format!(
                    "directory {dir} has more than {MAX_DIR_ENTRIES} entries"
                )));
            }
            *name_bytes += name.len();
            if *name_bytes > MAX_DIR_NAME_BYTES {
                return Err(corrupt(format!(
                    "directory {dir} has more than {MAX_DIR_NAME_BYTES} bytes of names"
                )));
            }
            out.push(Entry {
                name,
                ino: reference,
                kind: None,
            });
        }
        Ok(())
    }

    /// A symlink's target, if record `r` is one (a reparse point or an Interix symlink).
    fn link_target(&self, r: &Record, attrs: u32) -> io::Result<Option<Vec<u8>>> {
        if let Some(rp) = self.value(r, AT_REPARSE_POINT, b"", 16 << 10)? {
            let l = Le(&rp);
            let tag = l.u32(0)?;
            let data = l.bytes(8, (l.u16(4)? as usize).min(rp.len().saturating_sub(8)))?;
            let d = Le(data);
            let path = |base: usize| -> io::Result<Vec<u8>> {
                // Substitute name (offset, length), print name (offset, length), in bytes.
                let (po, pl) = (d.u16(4)? as usize, d.u16(6)? as usize);
                let (so, sl) = (d.u16(0)? as usize, d.u16(2)? as usize);
                let (o, n) = if pl > 0 { (po, pl) } else { (so, sl) };
                let mut t = utf16(d.bytes(base + o, n)?);
                for c in &mut t {
                    if *c == b'\\' {
                        *c = b'/';
                    }
                }
                Ok(t)
            };
            return match tag {
                REPARSE_SYMLINK => Ok(Some(path(12)?)),
                REPARSE_MOUNT_POINT => Ok(Some(path(8)?)),
                REPARSE_LX_SYMLINK => Ok(Some(d.bytes(4, data.len().saturating_sub(4))?.to_vec())),
                _ => Ok(None),
            };
        }
        // Interix (and ntfs-3g) symlinks: a system file holding a magic and the UTF-16
        // target, resident or not (a long target does not fit the record).
        if attrs & FILE_ATTR_SYSTEM != 0 && !r.dir {
            let size = match r.resident(AT_DATA, b"") {
                Some(v) => v.len() as u64,
                None => self.runs_of(r, AT_DATA, b"")?.map_or(0, |d| d.1),
            };
            if (9..=8 + 2 * 4096).contains(&size) {
                if let Some(v) = self.value(r, AT_DATA, b"", 16 << 10)? {
                    if &v[..8] == b"IntxLNK\x01" {
                        return Ok(Some(utf16(&v[8..])));
                    }
                }
            }
        }
        Ok(None)
    }
}

/// A special file as ntfs-3g (and Interix) store them: a system file whose data is empty (a
/// FIFO), one byte (a socket), or `IntxCHR`/`IntxBLK` with the device's major and minor.
fn interix(r: &Record, attrs: u32) -> Option<(Kind, u32)> {
    if attrs & FILE_ATTR_SYSTEM == 0 {
        return None;
    }
    let v = r.resident(AT_DATA, b"")?;
    let dev = |v: &[u8]| -> Option<u32> {
        let l = Le(v);
        let (major, minor) = (l.u64(8).ok()?, l.u64(16).ok()?);
        let (major, minor) = (u32::try_from(major).ok()?, u32::try_from(minor).ok()?);
        Some((minor & 0xff) | (major & 0xfff) << 8 | (minor & !0xff) << 12)
    };
    match v {
        [] => Some((Kind::Fifo, 0)),
        [_] => Some((Kind::Socket, 0)),
        _ if v.len() == 24 && &v[..8] == b"IntxCHR\0" => Some((Kind::CharDevice, dev(v)?)),
        _ if v.len() == 24 && &v[..8] == b"IntxBLK\0" => Some((Kind::BlockDevice, dev(v)?)),
        _ => None,
    }
}

/// Runs as extents (sparse runs left out).
fn extents(runs: &[(u64, Option<u64>, u64)]) -> Vec<Extent> {
    let mut out: Vec<Extent> = runs
        .iter()
        .filter_map(|&(vcn, lcn, len)| {
            Some(Extent {
                logical: vcn,
                physical: lcn?,
                len,
            })
        })
        .collect();
    out.sort_by_key(|e| e.logical);
    out
}

/// Errors of record `n` named by it where the message does not already.
fn named<T>(n: u64, r: io::Result<T>) -> io::Result<T> {
    r.map_err(|e| {
        let m = e.to_string();
        let names = [format!("record {n}"), format!("directory {n}")];
        if e.kind() == io::ErrorKind::InvalidData && !names.iter().any(|x| m.contains(x.as_str())) {
            corrupt(format!("record {n}: {}", m.trim_start_matches("ntfs: ")))
        } else {
            e
        }
    })
}

impl<D: CachedDevice + 'static> FileSystem for Ntfs<D> {
    fn type_name(&self) -> &'static str {
        "ntfs"
    }

    fn subtree_key(&self, ino: u64) -> Option<Vec<u8>> {
        crate::filesystem::root_key(&self.dev, ROOT, ino)
    }

    fn root(&self) -> u64 {
        ROOT
    }

    fn attr(&self, ino: u64) -> io::Result<Attr> {
        named(
            ino,
            (|| {
                let r = self.record(ino)?;
                let si = Le(r
                    .resident(AT_STANDARD_INFORMATION, b"")
                    .ok_or_else(|| corrupt("no standard information"))?);
                let file_attrs = si.u32(32)?;
                let link = self.link_target(&r, file_attrs)?;
                let special = if link.is_none() && !r.dir {
                    interix(&r, file_attrs)
                } else {
                    None
                };
                let (kind, size) = match (&link, r.dir, special) {
                    (Some(t), _, _) => (Kind::Symlink, t.len() as u64),
                    // As ntfs-3g: the index allocation's size, 0 for an index that fits the record.
                    (None, true, _) => (
                        Kind::Dir,
                        self.runs_of(&r, AT_INDEX_ALLOCATION, b"$I30")?
                            .map_or(0, |x| x.1),
                    ),
                    (None, false, Some((k, _))) => {
                        // ntfs-3g shows the size of the data that describes the device.
                        (k, r.resident(AT_DATA, b"").map_or(0, |v| v.len() as u64))
                    }
                    (None, false, None) => {
                        let size = match r.resident(AT_DATA, b"") {
                            Some(v) => v.len() as u64,
                            None => self.runs_of(&r, AT_DATA, b"")?.map_or(0, |d| d.1),
                        };
                        (Kind::File, size)
                    }
                };
                // ntfs-3g without user mapping shows every mode as 0777 (the DOS read-only
                // attribute included: it shows in `system.ntfs_attrib_be`, not in the mode).
                let perm = 0o777;
                // Names other than DOS ones are the links ntfs-3g counts.
                let nlink = r
                    .find(AT_FILE_NAME, b"")
                    .filter(|a| matches!(&a.body, Body::Resident(v) if v.get(65) != Some(&2)))
                    .count()
                    .max(1) as u32;
                let allocated: u64 = r
                    .find(AT_DATA, b"")
                    .map(|a| match &a.body {
                        Body::Resident(_) => 0,
                        Body::NonResident { runs, .. } => {
                            runs.iter()
                                .filter(|x| x.1.is_some())
                                .map(|x| x.2)
                                .sum::<u64>()
                                * self.g.cluster
                        }
                    })
                    .sum();
                Ok(Attr {
                    kind,
                    perm,
                    size,
                    blocks: allocated / 512,
                    nlink: if kind == Kind::Dir {
                        1
                    } else {
                        nlink.min(r.links.max(1) as u32)
                    },
                    uid: 0,
                    gid: 0,
                    rdev: special.map_or(0, |s| s.1),
                    atime: nt_time(si.u64(24)?),
                    mtime: nt_time(si.u64(8)?),
                    ctime: nt_time(si.u64(16)?),
                    crtime: nt_time(si.u64(0)?),
                })
            })(),
        )
    }

    fn read_dir(&self, ino: u64) -> io::Result<Vec<Entry>> {
        named(ino, self.record(ino).and_then(|r| self.list(&r)))
    }

    fn read_link(&self, ino: u64) -> io::Result<Vec<u8>> {
        named(
            ino,
            (|| {
                let r = self.record(ino)?;
                let si = Le(r
                    .resident(AT_STANDARD_INFORMATION, b"")
                    .ok_or_else(|| corrupt("no standard information"))?);
                self.link_target(&r, si.u32(32)?)?
                    .ok_or_else(|| io::ErrorKind::InvalidInput.into())
            })(),
        )
    }

    fn xattrs(&self, ino: u64) -> io::Result<Xattrs> {
        named(
            ino,
            (|| {
                let r = self.record(ino)?;
                let mut names: Vec<Vec<u8>> = r
                    .attrs
                    .iter()
                    .filter(|a| a.kind == AT_DATA && !a.name.is_empty())
                    .map(|a| a.name.clone())
                    .collect();
                names.sort();
                names.dedup();
                if names.len() > MAX_STREAMS {
                    return Err(corrupt(format!("more than {MAX_STREAMS} named streams")));
                }
                let mut out = Vec::new();
                let mut bytes = 0u64;
                for name in names {
                    let v = self
                        .value(&r, AT_DATA, &name, MAX_XATTR_BYTES)?
                        .unwrap_or_default();
                    bytes += (v.len() + name.len()) as u64;
                    if bytes > MAX_XATTR_BYTES {
                        return Err(corrupt(format!(
                            "more than {MAX_XATTR_BYTES} bytes of named streams"
                        )));
                    }
                    out.push(([b"user.", &name[..]].concat(), v));
                }
                // A damaged $Secure costs the descriptor, not the file's other attributes.
                match self.security(&r) {
                    Ok(Some(sd)) => out.push((b"system.ntfs_acl".to_vec(), sd)),
                    Ok(None) => {}
                    Err(e) => tracing::warn!("ntfs: record {ino}: no security descriptor: {e}"),
                }
                Ok(out)
            })(),
        )
    }

    fn open(self: Arc<Self>, ino: u64) -> io::Result<Arc<dyn FileData>> {
        let r = named(ino, self.record(ino))?;
        if r.dir {
            return Err(io::ErrorKind::IsADirectory.into());
        }
        if let Some(tag) = self
            .value(&r, AT_REPARSE_POINT, b"", 16 << 10)?
            .and_then(|v| Some(u32::from_le_bytes(v.get(..4)?.try_into().ok()?)))
        {
            return Err(unsupported(format!(
                "record {ino}: a reparse point of tag {tag:#010x} (a Windows-compressed, \
                 deduplicated or cloud file): its data is not in the file, and elastio does \
                 not read it"
            )));
        }
        let nonresident = r
            .find(AT_DATA, b"")
            .find(|a| matches!(a.body, Body::NonResident { .. }));
        if let Some(a) = nonresident {
            if a.flags & FLAG_ENCRYPTED != 0 {
                return Err(unsupported(format!("record {ino}: the file is encrypted (EFS); elastio reads no encrypted NTFS files")));
            }
            if a.flags & COMPRESSION_MASK != 0 {
                return Err(unsupported(format!(
                    "record {ino}: the file is NTFS-compressed, which elastio does not read yet"
                )));
            }
        }
        let data = match r.resident(AT_DATA, b"") {
            Some(v) => Data::Resident(v.to_vec()),
            None => match named(ino, self.runs_of(&r, AT_DATA, b""))? {
                Some((extents, size, initialized)) => Data::Runs {
                    extents,
                    size,
                    initialized,
                },
                None => Data::Resident(Vec::new()),
            },
        };
        Ok(Arc::new(NtfsFile { fs: self, data }))
    }
}

enum Data {
    Resident(Vec<u8>),
    Runs {
        extents: Vec<Extent>,
        size: u64,
        initialized: u64,
    },
}

/// An open NTFS file.
struct NtfsFile<D> {
    fs: Arc<Ntfs<D>>,
    data: Data,
}

impl<D: CachedDevice> FileData for NtfsFile<D> {
    fn size(&self) -> u64 {
        match &self.data {
            Data::Resident(v) => v.len() as u64,
            Data::Runs { size, .. } => *size,
        }
    }

    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        match &self.data {
            Data::Resident(v) => {
                let start = (offset as usize).min(v.len());
                let end = start.saturating_add(len).min(v.len());
                out.extend_from_slice(&v[start..end]);
                out.resize(out.len() + len - (end - start), 0);
                Ok(())
            }
            Data::Runs {
                extents,
                initialized,
                ..
            } => {
                let start = out.len();
                read_extents_append(&self.fs.dev, extents, self.fs.g.cluster, offset, len, out)?;
                // Bytes past the initialized size read as zeros, whatever the clusters hold.
                if offset + len as u64 > *initialized {
                    let from = initialized.saturating_sub(offset) as usize;
                    out[start + from.min(len)..].fill(0);
                }
                Ok(())
            }
        }
    }

    fn disk_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        match &self.data {
            Data::Resident(_) => Vec::new(),
            Data::Runs { extents, .. } => runs(extents, self.fs.g.cluster, offset, len)
                .into_iter()
                .filter_map(|r| Some((r.disk?, r.len)))
                .collect(),
        }
    }

    fn device(&self) -> Option<&dyn CachedDevice> {
        Some(&self.fs.dev)
    }

    fn range_key(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        match &self.data {
            Data::Resident(v) => Some(crate::filesystem::inline_key(v, offset, len)),
            Data::Runs {
                extents,
                initialized,
                ..
            } => {
                let runs = runs(extents, self.fs.g.cluster, offset, len);
                let mut key = crate::filesystem::runs_key(&self.fs.dev, offset, len, &runs)?;
                // Bytes past the initialized size read as zeros, whatever the clusters hold.
                key.extend_from_slice(&initialized.to_le_bytes());
                Some(key)
            }
        }
    }
}
