//! What a FUSE mount of a recovery point shows, assembled from the RP alone (the CLI only picks
//! the RP and serves the result):
//! * a disk RP: `disk.img`, a `partN.img` per partition (MBR or GPT), and the files of each
//!   file system elastio reads (ext2/3/4, XFS, NTFS, FAT) as `partN/` (or `fs/` on an
//!   unpartitioned disk), and of each LVM logical volume as `lvm/<vg>/<lv>/`; with `kernel`,
//!   those directories stay empty mountpoints for the kernel's own drivers instead (LVs are not
//!   offered: they need device-mapper);
//! * a stream RP: one file named after the stream.
//!
//! Timestamps are the RP's creation time; files belong to `owner` (the user serving the mount).

use std::io;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use scalez::stream_map::StreamReader;
use scalez::{RecoveryPoint, Vault};

use crate::fuse::{DiskView, FsView, ImageSource, PartDev, ViewFile};
use crate::DiskReader;
use crate::{lvm, partitions};

/// A disk RP's view, and with `kernel` the (image file, directory) pairs to loop-mount once the
/// FUSE mount is up.
pub struct DiskMount {
    pub view: DiskView,
    pub kernel_targets: Vec<(String, String)>,
    /// One line per file-system place (`fs`, `partN`): what it holds and whether its files
    /// show, e.g. `part2: xfs, not readable by elastio yet`.
    pub status: Vec<String>,
}

/// Sizes of a view's reader and read-ahead.
pub struct ViewOptions {
    pub cache_bytes: usize,
    /// Leave file systems to the kernel (`--kernel`): empty directories, no user-space reader.
    pub kernel: bool,
    /// (uid, gid) the files are shown as owned by.
    pub owner: (u32, u32),
}

/// The view of disk RP `rp`: the image, its partitions and their file systems.
pub fn disk(vault: &Arc<Vault>, rp: &RecoveryPoint, opts: &ViewOptions) -> io::Result<DiskMount> {
    let map = rp.disk()?.clone();
    let reader = Arc::new(DiskReader::new(vault.clone(), map, opts.cache_bytes));
    reader.enable_readahead(128, 2);
    let mut files = vec![ViewFile {
        name: "disk.img".into(),
        start: 0,
        len: reader.size(),
        stored_bytes: reader.stored_bytes()?,
    }];
    let mut read = |off: u64, buf: &mut [u8]| {
        reader
            .read_at(off, buf)
            .map(|_| ())
            .map_err(io::Error::from)
    };
    let parts = partitions::parse(reader.size(), &mut read)?;
    let mut filesystems = Vec::new();
    let mut kernel_targets = Vec::new();
    let mut status = Vec::new();
    let mut extra_status = Vec::new();
    // The places file systems can be: the partitions, or the whole disk.
    let places: Vec<(String, String, u64, u64)> = if parts.is_empty() {
        vec![("fs".into(), "disk.img".into(), 0, reader.size())]
    } else {
        parts
            .iter()
            .map(|p| {
                let n = p.number;
                (format!("part{n}"), format!("part{n}.img"), p.start, p.len)
            })
            .collect()
    };
    let mut add = |name: String, image: &str, dev: PartDev| {
        if filesystems.len() >= crate::filesystem::MAX_FILESYSTEMS {
            status.push(format!(
                "{name}: not shown, a view holds at most {} file systems",
                crate::filesystem::MAX_FILESYSTEMS
            ));
        } else if opts.kernel {
            filesystems.push(FsView {
                name: name.clone(),
                fs: None,
            });
            kernel_targets.push((image.to_string(), name));
        } else {
            let (fs, line) = dev.open_fs(&name);
            filesystems.extend(fs);
            status.push(line);
        }
    };
    let dev = |start: u64, len: u64, lv: Option<Arc<lvm::LvMap>>| PartDev {
        reader: reader.clone(),
        start,
        len,
        lv,
    };
    // LVM physical volumes hold volume groups instead of a file system: their LVs show as
    // lvm/<vg>/<lv> once every place has been looked at (a VG may span partitions).
    let mut volumes = Volumes::default();
    for (name, image, start, len) in &places {
        let place = dev(*start, *len, None);
        if opts.kernel || crate::filesystem::detect(&place, *len) != Some("lvm2") {
            add(name.clone(), image, place);
            continue;
        }
        let mut lines = Vec::new();
        volumes.add_pv(name, &place, *start, &mut lines);
        extra_status.extend(lines);
    }
    for (path, map) in volumes.lvs(&mut extra_status) {
        let size = map.size();
        add(path, "", dev(0, size, Some(Arc::new(map))));
    }
    status.extend(extra_status);
    for p in parts {
        let stored = reader
            .extents(p.start, p.len, usize::MAX)?
            .iter()
            .filter(|(_, data)| *data)
            .map(|(len, _)| len)
            .sum();
        files.push(ViewFile {
            name: format!("part{}.img", p.number),
            start: p.start,
            len: p.len,
            stored_bytes: stored,
        });
    }
    let view = DiskView {
        reader: reader as Arc<dyn ImageSource>,
        files,
        filesystems,
        time: created(rp),
        uid: opts.owner.0,
        gid: opts.owner.1,
        status: status.iter().map(|l| format!("{l}\n")).collect(),
    };
    Ok(DiskMount {
        view,
        kernel_targets,
        status,
    })
}

/// The LVM volume groups found on a disk's places, and where their PVs start.
#[derive(Default)]
struct Volumes {
    /// PV UUID (no dashes) → (byte offset, length) of the PV on the disk.
    pv_places: std::collections::BTreeMap<String, (u64, u64)>,
    /// By VG name: the metadata of the first PV read.
    vgs: std::collections::BTreeMap<String, lvm::VolumeGroup>,
}

impl Volumes {
    /// Reads the PV at place `name` (`start` on the disk); says what it holds in `lines`.
    fn add_pv(&mut self, name: &str, dev: &PartDev, start: u64, lines: &mut Vec<String>) {
        let pv = match lvm::read_pv(dev, dev.len) {
            Ok(Some(pv)) => pv,
            Ok(None) => return lines.push(format!("{name}: lvm2, no readable PV label")),
            Err(e) => return lines.push(format!("{name}: lvm2, damaged: {e}")),
        };
        self.pv_places.insert(pv.uuid.clone(), (start, dev.len));
        let Some(text) = pv.metadata else {
            return lines.push(format!(
                "{name}: LVM physical volume (its VG's metadata is on another PV)"
            ));
        };
        match lvm::parse_metadata(&text) {
            Ok(vg) => {
                lines.push(format!(
                    "{name}: LVM physical volume of VG {}, its volumes in lvm/{}/",
                    vg.name, vg.name
                ));
                self.vgs.entry(vg.name.clone()).or_insert(vg);
            }
            Err(e) => lines.push(format!("{name}: lvm2, damaged metadata: {e}")),
        }
    }

    /// Every LV elastio reads, as (view name, map); the others get a status line saying why.
    fn lvs(&self, lines: &mut Vec<String>) -> Vec<(String, lvm::LvMap)> {
        let mut out = Vec::new();
        for vg in self.vgs.values() {
            for lv in &vg.lvs {
                let name = format!("lvm/{}/{}", vg.name, lv.name);
                match lvm::LvMap::new(vg, lv, &self.pv_places) {
                    Ok(map) => out.push((name, map)),
                    Err(why) => lines.push(format!("{name}: not readable by elastio: {why}")),
                }
            }
        }
        out
    }
}

/// The view of stream RP `rp`: one file, named after the stream.
pub fn stream(vault: &Arc<Vault>, rp: &RecoveryPoint, opts: &ViewOptions) -> io::Result<DiskView> {
    let s = rp.stream()?.clone();
    let reader = Arc::new(StreamReader::open(vault.clone(), &s, opts.cache_bytes)?);
    Ok(DiskView {
        files: vec![ViewFile {
            name: file_name(&rp.asset.name),
            start: 0,
            len: s.size,
            stored_bytes: s.size,
        }],
        reader: reader as Arc<dyn ImageSource>,
        filesystems: Vec::new(),
        time: created(rp),
        uid: opts.owner.0,
        gid: opts.owner.1,
        status: String::new(),
    })
}

fn created(rp: &RecoveryPoint) -> SystemTime {
    humantime::parse_rfc3339_weak(&rp.created).unwrap_or(UNIX_EPOCH)
}

/// A stream's name as a file name: no slashes or NULs, not empty, not a dot entry.
fn file_name(stream: &str) -> String {
    let name: String = stream
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    match name.as_str() {
        "" | "." | ".." => "stream".into(),
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_are_safe_file_names() {
        assert_eq!(file_name("db/wal"), "db_wal");
        assert_eq!(file_name("a\0b"), "a_b");
        for bad in ["", ".", ".."] {
            assert_eq!(file_name(bad), "stream");
        }
        assert_eq!(file_name("..."), "...");
    }
}
