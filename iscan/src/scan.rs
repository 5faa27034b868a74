//! The scan: which files to judge, how each is judged, and the verdict.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::Arc;
use std::time::Instant;

use mount::browse::{self, Change, Item, Skipped, Walker};
use mount::filesystem::{FileSystem, Kind};
use serde::Serialize;

use crate::entropy::{self, Class, Histogram, MIN_WINDOW, WINDOW};
use crate::magic::{self, Promise};
use crate::notes;
use crate::rules::{self, Rules};

/// Signal weights and thresholds (documented in the crate's docs; the report repeats them).
pub mod thresholds {
    /// Score at which an RP is judged hit by ransomware. Any score above 0 makes it
    /// `suspicious`: never clean, never a baseline.
    pub const RANSOMWARE_SCORE: u32 = 100;
    /// A file that became ciphertext, whole or in part, or lost or contradicts its magic.
    pub const ENCRYPTED_FILE: u32 = 25;
    /// A new small text file named like a ransom note that speaks of encryption.
    pub const RANSOM_NOTE: u32 = 40;
    /// A new small file carrying a Tor onion address.
    pub const ONION_ADDRESS: u32 = 40;
    /// Notes and onion addresses together add at most this much: alone they never make
    /// ransomware.
    pub const NOTES_CAP: u32 = 80;
    /// A new file of uniform bytes without magic and with no other sign: listed, weighs
    /// nothing alone (videos, squashfs images, firmware blobs are such files); ten with one
    /// new extension are a burst.
    pub const UNIFORM_NEW_FILE: u32 = 0;
    /// Renames in one folder (Veeam's threshold).
    pub const RENAME_BURST_COUNT: u64 = 200;
    pub const RENAME_BURST: u32 = 50;
    /// Deletions of one extension, and the share of that extension's files they must be
    /// (Veeam's: ≥ 100 and > 50 %).
    pub const DELETION_BURST_COUNT: u64 = 100;
    pub const DELETION_BURST_SHARE: f64 = 0.5;
    pub const DELETION_BURST: u32 = 50;
    /// New or renamed files of uniform bytes sharing one extension the baseline did not have
    /// (incremental scans only: a full scan has no baseline to say what is new).
    pub const EXTENSION_BURST_COUNT: u64 = 10;
    pub const EXTENSION_BURST: u32 = 100;
    /// A file system the baseline read that is now unreadable (a whole volume encrypted).
    pub const FILESYSTEM_LOST: u32 = 100;
    /// Share of a file's windows that must be uniform for it to count as encrypted whole, and
    /// share of them that must have turned uniform since the baseline.
    pub const ENCRYPTED_SHARE: f64 = 0.75;
    pub const TURNED_SHARE: f64 = 0.5;
    /// Share (and least number) of a file's windows that turned uniform for partial
    /// (intermittent) encryption.
    pub const PARTIAL_SHARE: f64 = 0.10;
    pub const PARTIAL_MIN_WINDOWS: u64 = 2;
    /// Windows of the baseline file read to compare with at most, per file.
    pub const BASELINE_SAMPLES: usize = 16;
    /// File-system findings kept at most (each kind has its own cap, so thousands of damaged
    /// inodes cannot push the encrypted files out of the report).
    pub const MAX_FS_FINDINGS: usize = 1000;
    /// Bytes of a path shown in a finding.
    pub const MAX_PATH_SHOWN: usize = 1024;
    /// Bytes the rule pieces of a large file overlap by (a match across the cut is seen).
    pub const YARA_OVERLAP: usize = 1 << 20;
}
use thresholds::*;

/// What the scan may spend.
#[derive(Debug, Clone)]
pub struct Options {
    /// Judge every file, not only those changed since the baseline.
    pub full: bool,
    /// Bytes of a file the rules see at once; larger files are matched piece by piece (pieces
    /// overlapping by [`YARA_OVERLAP`]). Memory is about this much per scan.
    pub max_yara_bytes: usize,
    /// Bytes of one file judged at most (a sparse file of a petabyte must not read forever);
    /// a file cut short makes the RP `suspicious`.
    pub max_file_bytes: u64,
    /// Ransomware and malware findings kept at most (the verdict counts past the cap).
    pub max_findings: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            full: false,
            max_yara_bytes: 64 << 20,
            max_file_bytes: 64 << 30,
            max_findings: 5_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FindingKind {
    Ransomware,
    Malware,
    Filesystem,
}

/// One thing the scan found: the file (or place), the signal, the evidence.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    /// `encrypted`, `partial_encryption`, `header_encrypted`, `magic_lost`, `magic_mismatch`,
    /// `ransomware_extension`, `uniform_new_file`, `ransom_note`, `onion_address`,
    /// `rename_burst`, `deletion_burst`, `extension_burst`, `filesystem_lost`, `yara`,
    /// `damaged`, `unreadable`.
    pub signal: &'static str,
    /// The file or directory (for a disk RP, under its file system's place: `part1/etc/x`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub evidence: String,
    /// What it adds to the ransomware score.
    pub weight: u32,
}

/// Counters of one scan.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Files judged (read).
    pub files_scanned: u64,
    /// Bytes of judged files read.
    pub bytes_read: u64,
    /// Bytes of baseline files read to compare with.
    pub baseline_bytes_read: u64,
    /// Files whose content keys equal the baseline's: skipped unread.
    pub files_unchanged: u64,
    pub files_added: u64,
    pub files_changed: u64,
    pub files_removed: u64,
    pub files_renamed: u64,
    /// Hard links to a file already judged in this scan.
    pub hard_links_skipped: u64,
    /// Files judged only up to `max_file_bytes`.
    pub files_truncated: u64,
    /// Files the rules could not finish (time limit).
    pub yara_errors: u64,
    pub elapsed_ms: u64,
}

/// One file system of the scanned RP and its check.
#[derive(Debug, Clone, Serialize)]
pub struct FsStatus {
    pub place: String,
    pub status: String,
}

/// What a scan found.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub score: u32,
    pub ransomware: bool,
    pub malware: bool,
    pub damaged: bool,
    pub findings: Vec<Finding>,
    /// Findings left out past the caps.
    pub findings_dropped: u64,
    pub stats: Stats,
    pub filesystems: Vec<FsStatus>,
}

impl Outcome {
    /// The exit code: 0 clean, 201 ransomware, 202 malware, 203 both, 204 only file-system
    /// damage, 205 suspicious (signals below the ransomware score, or files the scan could
    /// not judge whole).
    pub fn exit_code(&self) -> i32 {
        let suspicious =
            self.score > 0 || self.stats.yara_errors > 0 || self.stats.files_truncated > 0;
        match (self.ransomware, self.malware, self.damaged) {
            (true, true, _) => 203,
            (true, false, _) => 201,
            (false, true, _) => 202,
            (false, false, true) => 204,
            (false, false, false) if suspicious => 205,
            (false, false, false) => 0,
        }
    }

    /// `clean`, `suspicious`, `ransomware`, `malware`, `ransomware+malware` or `damaged`.
    pub fn verdict(&self) -> &'static str {
        match self.exit_code() {
            203 => "ransomware+malware",
            201 => "ransomware",
            202 => "malware",
            204 => "damaged",
            205 => "suspicious",
            _ => "clean",
        }
    }
}

/// A removed file, kept until the walk shows whether it was renamed.
struct Removed {
    ino: u64,
    ext: Option<String>,
    paired: bool,
}

/// The baseline version of a judged file.
struct Old {
    path: Vec<u8>,
    ino: u64,
    renamed: bool,
}

struct Scan<'a> {
    new: Arc<dyn FileSystem>,
    base: Option<Arc<dyn FileSystem>>,
    yara: yara_x::Scanner<'a>,
    opts: &'a Options,
    out: Outcome,
    removed: HashMap<Vec<u8>, Removed>,
    /// Extension → files of it in the baseline (unchanged, changed or removed).
    base_exts: HashMap<String, u64>,
    /// Extension → new or renamed files of uniform bytes without magic.
    uniform_by_ext: BTreeMap<String, u64>,
    renames_by_dir: HashMap<Vec<u8>, u64>,
    /// Inodes judged (hard links are read once).
    judged: HashSet<u64>,
    /// Paths of the scanned RP that did not read (the first [`MAX_FS_FINDINGS`]).
    unreadable: HashSet<Vec<u8>>,
    /// Files added since the baseline, judged once every removal is known (renames pair in
    /// any name order).
    added: Vec<Item>,
    /// Removed files by their path without the last extension (`dir/a` for `dir/a.docx`).
    removed_stems: HashMap<Vec<u8>, Vec<u8>>,
    notes_score: u32,
    fs_findings: usize,
    malware_findings: usize,
    other_findings: usize,
    buf: Vec<u8>,
    hits: Vec<String>,
    progress: &'a dyn Fn(&Stats),
}

/// Scans file system `new`, against `base` (the baseline RP's) unless `opts.full` or there is
/// none. `status` and `base_status` are the places of the two disk RPs (`part2: ext4, damaged:
/// …`): damaged places are findings, and a place the baseline read that is unreadable now is
/// ransomware. `progress` is called after each file.
pub fn scan(
    new: &Arc<dyn FileSystem>,
    base: Option<(&Arc<dyn FileSystem>, &[String])>,
    status: &[String],
    rules: &Rules,
    opts: &Options,
    progress: &dyn Fn(&Stats),
) -> io::Result<Outcome> {
    let started = Instant::now();
    let base = if opts.full { None } else { base };
    let mut s = Scan {
        new: new.clone(),
        base: base.map(|(b, _)| b.clone()),
        yara: rules.scanner(),
        opts,
        out: Outcome {
            score: 0,
            ransomware: false,
            malware: false,
            damaged: false,
            findings: Vec::new(),
            findings_dropped: 0,
            stats: Stats::default(),
            filesystems: Vec::new(),
        },
        removed: HashMap::new(),
        base_exts: HashMap::new(),
        uniform_by_ext: BTreeMap::new(),
        renames_by_dir: HashMap::new(),
        judged: HashSet::new(),
        unreadable: HashSet::new(),
        added: Vec::new(),
        removed_stems: HashMap::new(),
        notes_score: 0,
        fs_findings: 0,
        malware_findings: 0,
        other_findings: 0,
        buf: Vec::new(),
        hits: Vec::new(),
        progress,
    };
    s.check_places(status, base.map(|(_, st)| st));
    s.check_structure()?;
    match s.base.clone() {
        Some(b) => s.incremental(&b)?,
        None => s.full()?,
    }
    s.bursts();
    let out = &mut s.out;
    out.ransomware = out.score >= RANSOMWARE_SCORE;
    out.stats.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(s.out)
}

/// Whether a read failed because the vault is damaged (a chunk missing or not authentic): the
/// scan stops (exit 3) instead of blaming the file system inside the RP.
fn vault_damage(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<scalez::Error>())
        .is_some_and(|s| {
            matches!(
                s,
                scalez::Error::Corrupt { .. }
                    | scalez::Error::MissingChunk { .. }
                    | scalez::Error::MissingBody { .. }
            )
        })
}

fn shown(path: &[u8]) -> String {
    let cut = &path[..path.len().min(MAX_PATH_SHOWN)];
    String::from_utf8_lossy(cut).into_owned()
}

fn name_of(path: &[u8]) -> &[u8] {
    path.rsplit(|&b| b == b'/').next().unwrap_or(path)
}

fn dir_of(path: &[u8]) -> &[u8] {
    path.iter()
        .rposition(|&b| b == b'/')
        .map_or(&[][..], |p| &path[..p])
}

/// Whether a place's status line says its files were read.
fn readable(status: &str) -> bool {
    status.contains(", files in ")
}

/// What reading one file showed.
struct Read {
    size: u64,
    /// The class of each window (None: too short to judge).
    classes: Vec<Option<Class>>,
    head: Vec<u8>,
}

impl Read {
    fn judged(&self) -> u64 {
        self.classes.iter().flatten().count() as u64
    }
    fn uniform(&self) -> u64 {
        self.classes
            .iter()
            .filter(|c| **c == Some(Class::Uniform))
            .count() as u64
    }
    fn mostly_uniform(&self) -> bool {
        let n = self.judged();
        n > 0 && self.uniform() as f64 >= n as f64 * ENCRYPTED_SHARE
    }
    /// The class of the first 4 KiB (where headers are, and what "encrypt the first N KiB"
    /// families destroy).
    fn head_class(&self) -> Option<Class> {
        entropy::classify(&self.head[..self.head.len().min(MIN_WINDOW)])
    }
}

impl Scan<'_> {
    fn add(
        &mut self,
        kind: FindingKind,
        signal: &'static str,
        path: Option<&[u8]>,
        evidence: String,
        weight: u32,
    ) {
        // The verdict does not depend on the caps on findings kept.
        match kind {
            FindingKind::Ransomware => self.out.score = self.out.score.saturating_add(weight),
            FindingKind::Malware => self.out.malware = true,
            FindingKind::Filesystem => self.out.damaged = true,
        }
        let (count, cap) = match kind {
            FindingKind::Filesystem => (&mut self.fs_findings, MAX_FS_FINDINGS),
            FindingKind::Malware => (&mut self.malware_findings, self.opts.max_findings),
            FindingKind::Ransomware => (&mut self.other_findings, self.opts.max_findings),
        };
        // RP-level signals (no path) are few and always kept.
        if *count >= cap && path.is_some() {
            self.out.findings_dropped += 1;
            return;
        }
        *count += 1;
        self.out.findings.push(Finding {
            kind,
            signal,
            path: path.map(shown),
            evidence,
            weight,
        });
    }

    /// Notes and onion addresses, their total capped.
    fn add_note(&mut self, signal: &'static str, path: &[u8], evidence: String, weight: u32) {
        let w = weight.min(NOTES_CAP.saturating_sub(self.notes_score));
        self.notes_score += w;
        self.add(FindingKind::Ransomware, signal, Some(path), evidence, w);
    }

    /// A disk RP's places: damaged ones are findings, file systems the baseline read that
    /// are unreadable now are ransomware; every place is listed.
    fn check_places(&mut self, status: &[String], base: Option<&[String]>) {
        let split = |line: &str| -> (String, String) {
            let (p, w) = line.split_once(": ").unwrap_or((line, ""));
            (p.to_string(), w.to_string())
        };
        let before: BTreeMap<String, String> =
            base.unwrap_or(&[]).iter().map(|l| split(l)).collect();
        let now: BTreeMap<String, String> = status.iter().map(|l| split(l)).collect();
        // A file system the baseline read that is gone now (the partition table or an LVM
        // physical volume encrypted: its place vanished or reads as nothing known).
        for (place, was) in before.iter().filter(|(_, w)| readable(w)) {
            let what = now.get(place).map_or("gone from the disk", String::as_str);
            if !readable(what) && !what.contains(", damaged") {
                self.add(
                    FindingKind::Ransomware,
                    "filesystem_lost",
                    Some(place.as_bytes()),
                    format!("the baseline read it ({was}); now: {what}"),
                    FILESYSTEM_LOST,
                );
                self.unreadable.insert(place.as_bytes().to_vec());
            }
        }
        for line in status {
            let (place, what) = split(line);
            if what.contains(", damaged") {
                self.add(
                    FindingKind::Filesystem,
                    "damaged",
                    Some(place.as_bytes()),
                    what.clone(),
                    0,
                );
            }
            self.out.filesystems.push(FsStatus {
                place,
                status: what,
            });
        }
    }

    /// The structure of every file system: each directory lists, each inode reads, each file's
    /// block map parses. Whatever fails is named.
    fn check_structure(&mut self) -> io::Result<()> {
        let fs = self.new.clone();
        let mut walker = Walker::new(fs.as_ref(), fs.root(), true);
        for item in &mut walker {
            let (path, error) = match item {
                Err(Skipped { path, error }) => (path, error),
                Ok(item) if item.attr.kind == Kind::File => match fs.clone().open(item.ino) {
                    Ok(_) => continue,
                    Err(e) => (item.path, e),
                },
                Ok(_) => continue,
            };
            if vault_damage(&error) {
                return Err(error);
            }
            if self.unreadable.len() < MAX_FS_FINDINGS {
                self.unreadable.insert(path.clone());
            }
            self.add(
                FindingKind::Filesystem,
                "unreadable",
                Some(&path),
                error.to_string(),
                0,
            );
        }
        Ok(())
    }

    /// Whether `path` is at or under a path of the scanned RP that did not read (its files
    /// look removed to the diff, but they are damage, not deletions).
    fn under_unreadable(&self, path: &[u8]) -> bool {
        if self.unreadable.is_empty() {
            return false;
        }
        // The path and each of its ancestors (the root is the empty path).
        std::iter::once(path)
            .chain(
                path.iter()
                    .enumerate()
                    .rev()
                    .filter(|(_, &b)| b == b'/')
                    .map(|(i, _)| &path[..i]),
            )
            .chain(std::iter::once(&[][..]))
            .any(|p| self.unreadable.contains(p))
    }

    fn full(&mut self) -> io::Result<()> {
        let fs = self.new.clone();
        let walker = Walker::new(fs.as_ref(), fs.root(), true);
        for item in walker.flatten() {
            if item.attr.kind == Kind::File {
                self.out.stats.files_added += 1;
                self.judge(&item, None)?;
            }
        }
        Ok(())
    }

    fn incremental(&mut self, base: &Arc<dyn FileSystem>) -> io::Result<()> {
        let new = self.new.clone();
        let mut unchanged: HashMap<String, u64> = HashMap::new();
        let mut skipped = Vec::new();
        let stats = {
            let this = &mut *self;
            browse::diff_all(
                base,
                &new,
                &mut |item, change, old| {
                    if item.attr.kind != Kind::File {
                        return Ok(());
                    }
                    match change {
                        Change::Removed => {
                            this.out.stats.files_removed += 1;
                            let ext = magic::extension(name_of(&item.path));
                            if let Some(e) = &ext {
                                *this.base_exts.entry(e.clone()).or_default() += 1;
                            }
                            let name = name_of(&item.path);
                            if let Some(dot) =
                                name.iter().rposition(|&b| b == b'.').filter(|&d| d > 0)
                            {
                                let stem = item.path[..item.path.len() - name.len() + dot].to_vec();
                                this.removed_stems
                                    .entry(stem)
                                    .or_insert_with(|| item.path.clone());
                            }
                            this.removed.insert(
                                item.path.clone(),
                                Removed {
                                    ino: item.ino,
                                    ext,
                                    paired: false,
                                },
                            );
                        }
                        Change::Added => {
                            this.out.stats.files_added += 1;
                            this.added.push(item.clone());
                        }
                        Change::Changed(what) => {
                            this.count_base_ext(&item.path);
                            if what.contains(&"content") || what.contains(&"type") {
                                this.out.stats.files_changed += 1;
                                let old = old.filter(|o| o.attr.kind == Kind::File).map(|o| Old {
                                    path: o.path.clone(),
                                    ino: o.ino,
                                    renamed: false,
                                });
                                this.judge(item, old)?;
                            }
                        }
                    }
                    Ok(())
                },
                &mut |item| {
                    if item.attr.kind == Kind::File {
                        if let Some(e) = magic::extension(name_of(&item.path)) {
                            *unchanged.entry(e).or_default() += 1;
                        }
                    }
                },
                &mut |s| skipped.push(s),
            )?
        };
        for (ext, n) in unchanged {
            *self.base_exts.entry(ext).or_default() += n;
        }
        self.out.stats.files_unchanged = stats.same_by_key;
        for item in std::mem::take(&mut self.added) {
            let from = self.rename_source(&item.path);
            self.judge(&item, from)?;
        }
        // Paths the diff could not compare (a baseline inode that does not read, attributes
        // that do not parse): judged as new files, never skipped.
        for Skipped { path, error } in skipped {
            if vault_damage(&error) {
                return Err(error);
            }
            let Ok(ino) = browse::resolve(new.as_ref(), &path) else {
                continue;
            };
            let Ok(attr) = new.attr(ino) else { continue };
            if attr.kind == Kind::File {
                let item = Item {
                    path,
                    ino,
                    attr,
                    depth: 1,
                };
                self.out.stats.files_changed += 1;
                self.judge(&item, None)?;
            }
        }
        Ok(())
    }

    fn count_base_ext(&mut self, path: &[u8]) {
        if let Some(e) = magic::extension(name_of(path)) {
            *self.base_exts.entry(e).or_default() += 1;
        }
    }

    /// The removed file `path` was renamed from: same directory, `path`'s name is its name
    /// plus an extension (`report.docx` → `report.docx.locked`).
    fn rename_source(&mut self, path: &[u8]) -> Option<Old> {
        let name = name_of(path);
        let dir_len = path.len() - name.len();
        // `x.docx.id[..].[mail].eking` was `x.docx` (the longest removed name it extends), and
        // `x.locked` was `x.docx` (an extension replaced).
        let prefixes: Vec<Vec<u8>> = name
            .iter()
            .enumerate()
            .rev()
            .filter(|&(i, &b)| b == b'.' && i > 0)
            .map(|(i, _)| path[..dir_len + i].to_vec())
            .collect();
        let unpaired = |p: &Vec<u8>| self.removed.get(p).is_some_and(|r| !r.paired);
        let stem = prefixes.iter().find(|p| unpaired(p)).cloned().or_else(|| {
            prefixes
                .iter()
                .filter_map(|p| self.removed_stems.get(p))
                .find(|p| unpaired(p))
                .cloned()
        })?;
        let r = self.removed.get_mut(&stem)?;
        r.paired = true;
        self.out.stats.files_renamed += 1;
        *self
            .renames_by_dir
            .entry(dir_of(path).to_vec())
            .or_default() += 1;
        let ino = r.ino;
        Some(Old {
            path: stem,
            ino,
            renamed: true,
        })
    }

    /// Runs the rules over the bytes held, keeping the last [`YARA_OVERLAP`] of them when
    /// `more` follow.
    fn match_rules(&mut self, path: &[u8], more: bool) {
        let bytes = std::mem::take(&mut self.buf);
        match rules::matches(&mut self.yara, &bytes) {
            Ok(hits) => {
                for h in hits {
                    if !self.hits.contains(&h) {
                        self.hits.push(h);
                    }
                }
            }
            Err(e) => {
                self.out.stats.yara_errors += 1;
                tracing::warn!(path = %shown(path), "YARA rules did not finish: {e}");
            }
        }
        self.buf = bytes;
        if more {
            let keep = self.buf.len().min(YARA_OVERLAP);
            let from = self.buf.len() - keep;
            self.buf.drain(..from);
        } else {
            self.buf.clear();
        }
    }

    /// Reads file `ino` window by window (up to `max_file_bytes`), classifying each window
    /// and matching the rules piece by piece.
    fn read(&mut self, ino: u64, path: &[u8]) -> io::Result<Read> {
        let file = self.new.clone().open(ino)?;
        let size = file.size();
        let end = size.min(self.opts.max_file_bytes);
        if end < size {
            self.out.stats.files_truncated += 1;
        }
        let mut classes = Vec::new();
        let mut head = Vec::new();
        let mut piece = Vec::with_capacity(WINDOW);
        self.buf.clear();
        self.hits.clear();
        let piece_limit = self.opts.max_yara_bytes.max(2 * YARA_OVERLAP);
        let mut off = 0u64;
        while off < end {
            let n = (end - off).min(WINDOW as u64) as usize;
            piece.clear();
            file.read_append(off, n, &mut piece)?;
            if piece.len() != n {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read"));
            }
            if off == 0 {
                head = piece.clone();
            }
            classes.push(Histogram::of(&piece).class());
            self.buf.extend_from_slice(&piece);
            off += n as u64;
            if self.buf.len() >= piece_limit && off < end {
                self.match_rules(path, true);
            }
        }
        self.match_rules(path, false);
        Ok(Read {
            size: end,
            classes,
            head,
        })
    }

    /// Classes of the baseline file's windows at `at` (window indexes), and its head.
    fn sample_base(&mut self, ino: u64, at: &[usize]) -> io::Result<(Vec<Option<Class>>, Vec<u8>)> {
        let base = self.base.clone().expect("a baseline");
        let file = base.open(ino)?;
        let size = file.size();
        let mut head = Vec::new();
        let n = size.min(WINDOW as u64) as usize;
        file.read_append(0, n, &mut head)?;
        self.out.stats.baseline_bytes_read += n as u64;
        let mut out = Vec::new();
        let mut piece = Vec::new();
        for &i in at {
            let off = i as u64 * WINDOW as u64;
            if off >= size {
                out.push(None);
                continue;
            }
            let n = (size - off).min(WINDOW as u64) as usize;
            piece.clear();
            file.read_append(off, n, &mut piece)?;
            self.out.stats.baseline_bytes_read += n as u64;
            // Zeros (preallocated, sparse) filled with encrypted pages since (a database with
            // encryption at rest, a guest-encrypted disk) are no sign.
            if piece.iter().all(|&b| b == 0) {
                out.push(None);
                continue;
            }
            out.push(Histogram::of(&piece).class());
        }
        Ok((out, head))
    }

    /// Judges one new or changed file against its baseline version, if any.
    fn judge(&mut self, item: &Item, old: Option<Old>) -> io::Result<()> {
        let path = item.path.clone();
        if !self.judged.insert(item.ino) {
            self.out.stats.hard_links_skipped += 1;
            return Ok(());
        }
        let read = match self.read(item.ino, &path) {
            Ok(r) => r,
            Err(e) if vault_damage(&e) => return Err(e),
            Err(e) => {
                self.add(
                    FindingKind::Filesystem,
                    "unreadable",
                    Some(&path),
                    e.to_string(),
                    0,
                );
                return Ok(());
            }
        };
        self.out.stats.files_scanned += 1;
        self.out.stats.bytes_read += read.size;
        for rule in std::mem::take(&mut self.hits) {
            self.add(
                FindingKind::Malware,
                "yara",
                Some(&path),
                format!("rule {rule}"),
                0,
            );
        }
        if read.size <= notes::MAX_NOTE_BYTES && read.size > 0 && old.is_none() {
            self.judge_note(&path, &read.head);
        }
        self.judge_content(&path, &read, old)?;
        (self.progress)(&self.out.stats);
        Ok(())
    }

    /// A small new file: a ransom note (a text named like one that reads like one), or a
    /// carrier of an onion address.
    fn judge_note(&mut self, path: &[u8], bytes: &[u8]) {
        let text = !bytes.is_empty()
            && bytes
                .iter()
                .filter(|&&b| b.is_ascii_graphic() || b.is_ascii_whitespace() || b >= 0x80)
                .count()
                * 10
                >= bytes.len() * 9;
        let name = name_of(path);
        let ext = magic::extension(name);
        if text
            && notes::is_note_extension(ext.as_deref())
            && notes::is_note_name(name)
            && notes::reads_like_ransom(bytes)
        {
            self.add_note(
                "ransom_note",
                path,
                "named like a ransom note, and reads like one (encryption, payment or contact)"
                    .into(),
                RANSOM_NOTE,
            );
        }
        if let Some(onion) = notes::onion_address(bytes) {
            self.add_note(
                "onion_address",
                path,
                format!("carries the Tor address {onion}"),
                ONION_ADDRESS,
            );
        }
    }

    fn judge_content(&mut self, path: &[u8], read: &Read, old: Option<Old>) -> io::Result<()> {
        if read.judged() == 0 {
            return Ok(());
        }
        let ext = magic::extension(name_of(path));
        let found = magic::detect(&read.head);
        let promise = ext.as_deref().and_then(magic::promise);
        // The file's name promises the format its magic shows.
        let promised = found.is_some_and(|f| match promise {
            Some(Promise::Formats(names)) => names.contains(&f.name),
            _ => false,
        });
        if let Some(old) = old {
            // Against its baseline version, magic excuses little: ciphertext behind a forged
            // header is still windows that turned uniform (judge_changed).
            return self.judge_changed(path, read, ext, found, promised, old);
        }
        // A new file (or any file of a full scan): its magic matching its name explains it (an
        // encrypted .xlsx is an OLE2 file of uniform bytes), as does a dense format's magic
        // under a name that promises nothing else. (Deflate and zstd output can be as uniform
        // as ciphertext, so a dense format's magic cannot be second-guessed here; changed and
        // renamed files are compared with their baseline instead.)
        let explained = found.is_some_and(|f| {
            f.dense
                && match promise {
                    None => true,
                    Some(Promise::Formats(names)) => names.contains(&f.name),
                    Some(Promise::Text) => false,
                }
        });
        if explained || promised || !read.mostly_uniform() {
            return Ok(());
        }
        if ext.as_deref().is_some_and(magic::encrypted_by_design) {
            return Ok(());
        }
        let (uniform, judged) = (read.uniform(), read.judged());
        let what = format!("{uniform} of {judged} 64 KiB windows uniform (χ²)");
        let heavy = self.file_weight();
        let (signal, evidence, weight) = match (promise, ext.as_deref()) {
            (Some(Promise::Formats(names)), Some(e)) => (
                "magic_mismatch",
                format!(
                    "a .{e} file that is not {}: {}; {what}",
                    names.join("/"),
                    found.map_or("no known magic".to_string(), |f| format!(
                        "starts as {}",
                        f.name
                    ))
                ),
                heavy,
            ),
            (Some(Promise::Text), Some(e)) => (
                "magic_mismatch",
                format!("a .{e} file of uniform bytes, not text; {what}"),
                heavy,
            ),
            (None, Some(e)) if magic::ransomware_extension(e) => (
                "ransomware_extension",
                format!("extension .{e} of ransomware families, and {what}"),
                heavy,
            ),
            _ => ("uniform_new_file", what, UNIFORM_NEW_FILE),
        };
        if let Some(e) = ext.filter(|_| promise.is_none()) {
            *self.uniform_by_ext.entry(e).or_default() += 1;
        }
        self.add(
            FindingKind::Ransomware,
            signal,
            Some(path),
            evidence,
            weight,
        );
        Ok(())
    }

    /// A changed or renamed file against its baseline version.
    fn judge_changed(
        &mut self,
        path: &[u8],
        read: &Read,
        ext: Option<String>,
        found: Option<magic::Format>,
        promised: bool,
        old: Old,
    ) -> io::Result<()> {
        let (uniform, judged) = (read.uniform(), read.judged());
        // Compare the windows that are uniform now with the same windows before (a sample),
        // and the heads.
        let idx: Vec<usize> = read
            .classes
            .iter()
            .enumerate()
            .filter(|(_, c)| **c == Some(Class::Uniform))
            .map(|(i, _)| i)
            .collect();
        let step = idx.len().div_ceil(BASELINE_SAMPLES).max(1);
        let sample: Vec<usize> = idx.iter().copied().step_by(step).collect();
        let (before, old_head) = match self.sample_base(old.ino, &sample) {
            Ok(x) => x,
            Err(e) if vault_damage(&e) => return Err(e),
            Err(e) => {
                // The baseline version does not read: judged as a new file.
                tracing::warn!(path = %shown(&old.path), "baseline file unreadable: {e}");
                return self.judge_content(path, read, None);
            }
        };
        let turned_in_sample = before
            .iter()
            .filter(|c| matches!(c, Some(Class::Low | Class::High)))
            .count() as u64;
        // Scaled back to all uniform windows.
        let turned = (turned_in_sample * uniform)
            .checked_div(sample.len() as u64)
            .unwrap_or(0);
        let old_magic = magic::detect(&old_head);
        // A file named as and being a format uniform by nature: xz (what `xz file` or a log
        // rotation makes of a text), or an archive or container that already was one. A text
        // turned 7z or rar is what Qlocker-style attacks leave.
        if promised
            && found.is_some_and(|f| {
                f.name == "xz"
                    || (magic::uniform_by_nature(f.name)
                        && old_magic.is_some_and(|o| o.name == f.name))
            })
        {
            return Ok(());
        }
        let old_head_class = entropy::classify(&old_head[..old_head.len().min(MIN_WINDOW)]);
        // Only without magic now: a compressor's first 4 KiB can pass for uniform (χ² has
        // little power on 4 KiB), and ransomware that encrypts the head destroys the magic.
        let head_turned = found.is_none()
            && read.head_class() == Some(Class::Uniform)
            && matches!(old_head_class, Some(Class::Low | Class::High));
        let lost =
            old_magic.is_some() && found.is_none() && read.head_class() == Some(Class::Uniform);
        let how = if old.renamed {
            format!("renamed from {}; ", shown(&old.path))
        } else {
            String::new()
        };
        let (signal, evidence) = if lost {
            (
                "magic_lost",
                format!(
                    "{how}was {}, now starts with uniform bytes; {uniform} of {judged} windows uniform",
                    old_magic.map_or("?", |m| m.name)
                ),
            )
        } else if read.mostly_uniform() && turned as f64 >= judged as f64 * TURNED_SHARE {
            (
                "encrypted",
                format!("{how}{uniform} of {judged} 64 KiB windows are uniform (χ²), {turned} of them were not"),
            )
        } else if turned >= PARTIAL_MIN_WINDOWS && turned as f64 >= judged as f64 * PARTIAL_SHARE {
            (
                "partial_encryption",
                format!(
                    "{how}{turned} of {judged} 64 KiB windows turned uniform (χ²): intermittent encryption"
                ),
            )
        } else if head_turned {
            (
                "header_encrypted",
                format!("{how}its first 4 KiB turned uniform (χ²), they were not"),
            )
        } else {
            return Ok(());
        };
        if let Some(e) = ext.filter(|_| old.renamed) {
            *self.uniform_by_ext.entry(e).or_default() += 1;
        }
        let weight = self.file_weight();
        self.add(
            FindingKind::Ransomware,
            signal,
            Some(path),
            evidence,
            weight,
        );
        Ok(())
    }

    /// What one encrypted file weighs: a stream RP is one file, so its turning to ciphertext
    /// is the whole asset's.
    fn file_weight(&self) -> u32 {
        if self.new.type_name() == "stream" {
            RANSOMWARE_SCORE
        } else {
            ENCRYPTED_FILE
        }
    }

    /// The RP-level signals.
    fn bursts(&mut self) {
        let renames: Vec<(Vec<u8>, u64)> = self
            .renames_by_dir
            .iter()
            .filter(|(_, &n)| n >= RENAME_BURST_COUNT)
            .map(|(d, &n)| (d.clone(), n))
            .collect();
        for (dir, n) in renames {
            self.add(
                FindingKind::Ransomware,
                "rename_burst",
                Some(&dir),
                format!("{n} files renamed in this folder (threshold {RENAME_BURST_COUNT})"),
                RENAME_BURST,
            );
        }
        let mut deleted: BTreeMap<String, u64> = BTreeMap::new();
        for (path, r) in self.removed.iter().filter(|(_, r)| !r.paired) {
            if let Some(e) = r.ext.as_ref().filter(|_| !self.under_unreadable(path)) {
                *deleted.entry(e.clone()).or_default() += 1;
            }
        }
        for (ext, n) in deleted {
            let of = self.base_exts.get(&ext).copied().unwrap_or(n).max(n);
            if n >= DELETION_BURST_COUNT && n as f64 > of as f64 * DELETION_BURST_SHARE {
                self.add(
                    FindingKind::Ransomware,
                    "deletion_burst",
                    None,
                    format!("{n} of {of} .{ext} files deleted"),
                    DELETION_BURST,
                );
            }
        }
        if self.base.is_none() {
            // A full scan has no baseline to say which extensions are new.
            return;
        }
        let exts: Vec<(String, u64)> = self
            .uniform_by_ext
            .iter()
            .filter(|(e, &n)| n >= EXTENSION_BURST_COUNT && !self.base_exts.contains_key(*e))
            .map(|(e, &n)| (e.clone(), n))
            .collect();
        for (ext, n) in exts {
            self.add(
                FindingKind::Ransomware,
                "extension_burst",
                None,
                format!("{n} new files of uniform bytes with the new extension .{ext}"),
                EXTENSION_BURST,
            );
        }
    }
}

/// The thresholds as the report lists them.
pub fn thresholds_json() -> serde_json::Value {
    serde_json::json!({
        "ransomware_score": RANSOMWARE_SCORE,
        "weights": {
            "encrypted_file": ENCRYPTED_FILE,
            "ransom_note": RANSOM_NOTE,
            "onion_address": ONION_ADDRESS,
            "notes_cap": NOTES_CAP,
            "uniform_new_file": UNIFORM_NEW_FILE,
            "rename_burst": RENAME_BURST,
            "deletion_burst": DELETION_BURST,
            "extension_burst": EXTENSION_BURST,
            "filesystem_lost": FILESYSTEM_LOST,
        },
        "rename_burst_count": RENAME_BURST_COUNT,
        "deletion_burst": { "count": DELETION_BURST_COUNT, "share": DELETION_BURST_SHARE },
        "extension_burst_count": EXTENSION_BURST_COUNT,
        "encrypted_share": ENCRYPTED_SHARE,
        "turned_share": TURNED_SHARE,
        "partial": { "share": PARTIAL_SHARE, "min_windows": PARTIAL_MIN_WINDOWS },
        "window_bytes": WINDOW,
        "min_window_bytes": MIN_WINDOW,
        "uniform": { "entropy": entropy::UNIFORM_ENTROPY, "chi2": entropy::UNIFORM_CHI2 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::LocalDir;
    use std::path::Path;

    use crate::entropy::pseudo_random as random;

    /// A baseline tree `a` and its copy `b` to change (the directory holds both).
    fn twins() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        tree(&a);
        tree(&b);
        (d, a, b)
    }

    /// Replaces `docs/report{i}.txt` of `b` with `name` holding `head` and ciphertext of its
    /// length, as ransomware renaming what it encrypts does.
    fn lock(b: &Path, i: u64, name: &str, head: &[u8], seed: u64) {
        let p = b.join(format!("docs/report{i}.txt"));
        let n = std::fs::metadata(&p).unwrap().len() as usize;
        std::fs::remove_file(&p).unwrap();
        let mut bytes = head.to_vec();
        bytes.extend(random(n, seed));
        std::fs::write(b.join("docs").join(name), bytes).unwrap();
    }

    fn text(n: usize, seed: u64) -> Vec<u8> {
        (0..)
            .flat_map(|i| format!("line {i} of document {seed}: some words to read\n").into_bytes())
            .take(n)
            .collect()
    }

    fn tree(dir: &Path) {
        std::fs::create_dir_all(dir.join("docs")).unwrap();
        for i in 0..30u64 {
            std::fs::write(
                dir.join(format!("docs/report{i}.txt")),
                text(20_000 + i as usize * 1000, i),
            )
            .unwrap();
        }
        std::fs::write(dir.join("big.log"), text(2 << 20, 99)).unwrap();
    }

    fn run(base: Option<&Path>, new: &Path, full: bool) -> Outcome {
        let rules = Rules::load(None).unwrap();
        let new: Arc<dyn FileSystem> = Arc::new(LocalDir::new(new.to_path_buf()).unwrap());
        let base: Option<Arc<dyn FileSystem>> =
            base.map(|b| Arc::new(LocalDir::new(b.to_path_buf()).unwrap()) as _);
        let opts = Options {
            full,
            ..Options::default()
        };
        scan(
            &new,
            base.as_ref().map(|b| (b, &[][..])),
            &[],
            &rules,
            &opts,
            &|_| {},
        )
        .unwrap()
    }

    fn signals(o: &Outcome) -> Vec<(&'static str, String)> {
        o.findings
            .iter()
            .map(|f| (f.signal, f.path.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn encrypted_renamed_files_and_notes_are_ransomware_and_named() {
        let (_d, a, b) = twins();
        for i in 0..4u64 {
            lock(&b, i, &format!("report{i}.txt.locked"), b"", i);
        }
        std::fs::write(
            b.join("docs/HOW_TO_DECRYPT.txt"),
            "your files are encrypted; pay at \
             http://vww6ybal4bd7szmgncyruucpgfkqahzddi37ktceo3ah7ngmcopnpyyd.onion/",
        )
        .unwrap();
        // Intermittent: every other 64 KiB of the log encrypted in place.
        let mut log = std::fs::read(b.join("big.log")).unwrap();
        for (k, w) in log
            .chunks_mut(WINDOW)
            .enumerate()
            .filter(|(k, _)| k % 2 == 0)
        {
            let r = random(w.len(), 1000 + k as u64);
            w.copy_from_slice(&r);
        }
        std::fs::write(b.join("big.log"), log).unwrap();
        let o = run(Some(&a), &b, false);
        let s = signals(&o);
        for i in 0..4 {
            assert!(
                s.contains(&("encrypted", format!("docs/report{i}.txt.locked"))),
                "{s:?}"
            );
        }
        assert!(
            s.contains(&("ransom_note", "docs/HOW_TO_DECRYPT.txt".into())),
            "{s:?}"
        );
        assert!(
            s.contains(&("onion_address", "docs/HOW_TO_DECRYPT.txt".into())),
            "{s:?}"
        );
        // Half its windows encrypted, and it starts with ciphertext: text lost nothing to
        // call magic, so it is a partial encryption.
        assert!(
            s.contains(&("partial_encryption", "big.log".into())),
            "{s:?}"
        );
        assert!(o.ransomware && !o.malware && !o.damaged, "{o:?}");
        assert_eq!(o.exit_code(), 201);
        assert_eq!(o.stats.files_renamed, 4);
        // Unchanged files were compared, not judged.
        assert_eq!(o.stats.files_scanned, 6, "{:?}", o.stats);
    }

    #[test]
    fn compressed_and_rewritten_files_are_clean() {
        let (_d, a, b) = twins();
        // An xz file (uniform bytes behind its magic), a rotated log, a rewritten document.
        let mut xz = b"\xfd7zXZ\x00".to_vec();
        xz.extend(random(300_000, 5));
        std::fs::write(b.join("big.log.1.xz"), &xz).unwrap();
        std::fs::write(b.join("big.log"), text(1 << 20, 7)).unwrap();
        std::fs::write(b.join("docs/report3.txt"), text(50_000, 1234)).unwrap();
        for i in 0..12 {
            // Entropy-coded data is dense but skewed (JPEG stuffs a zero after every 0xff);
            // the e2e tests use real cjpeg output.
            let mut jpg = b"\xff\xd8\xff\xe0".to_vec();
            let mut body = random(70_000, 50 + i);
            for b in body.iter_mut().step_by(8) {
                *b &= 0x7f;
            }
            jpg.extend(body);
            std::fs::write(b.join(format!("docs/photo{i}.jpg")), jpg).unwrap();
        }
        let o = run(Some(&a), &b, false);
        assert!(o.findings.is_empty(), "{:?}", o.findings);
        assert_eq!((o.score, o.exit_code()), (0, 0));
        let full = run(None, &b, true);
        assert!(full.findings.is_empty(), "{:?}", full.findings);
        assert_eq!(full.stats.files_scanned, 30 + 1 + 1 + 12);
    }

    #[test]
    fn full_scans_catch_encrypted_files_without_a_baseline_and_rules_catch_malware() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path().join("b");
        tree(&b);
        for i in 0..12u64 {
            std::fs::write(b.join(format!("docs/r{i}.pdf")), random(30_000, i)).unwrap();
            std::fs::write(b.join(format!("docs/x{i}.zzq")), random(30_000, 100 + i)).unwrap();
        }
        std::fs::write(
            b.join("dropper.sh"),
            "#!/bin/sh\n# ELASTIO-ISCAN-TEST-MALWARE-5f0c1a\n",
        )
        .unwrap();
        let o = run(None, &b, true);
        let s = signals(&o);
        assert!(
            s.contains(&("magic_mismatch", "docs/r3.pdf".into())),
            "{s:?}"
        );
        // No baseline to say .zzq is new: one point each, no burst.
        assert!(
            s.contains(&("uniform_new_file", "docs/x3.zzq".into())),
            "{s:?}"
        );
        assert!(!s.iter().any(|(sig, _)| *sig == "extension_burst"), "{s:?}");
        assert!(s.contains(&("yara", "dropper.sh".into())), "{s:?}");
        assert_eq!(o.exit_code(), 203);
    }

    /// What a careful attacker does: ciphertext behind a forged gzip header, only the first
    /// 4 KiB encrypted, a whole file system encrypted; and what must stay quiet: files named
    /// like notes that are no notes.
    #[test]
    fn forged_magic_header_only_encryption_and_lost_file_systems_are_caught() {
        let (_d, a, b) = twins();
        for i in 0..3u64 {
            lock(
                &b,
                i,
                &format!("report{i}.txt.locked"),
                b"\x1f\x8b\x08\x00",
                40 + i,
            );
        }
        for i in 10..12u64 {
            let p = b.join(format!("docs/report{i}.txt"));
            let mut data = std::fs::read(&p).unwrap();
            data[..MIN_WINDOW].copy_from_slice(&random(MIN_WINDOW, i));
            std::fs::write(&p, data).unwrap();
        }
        for n in ["EVP_DecryptInit.txt", "decrypt.py", "how_to_decrypt.md"] {
            std::fs::write(b.join(n), "int main(void) { return 0; }\n").unwrap();
        }
        let o = run(Some(&a), &b, false);
        let s = signals(&o);
        for i in 0..3 {
            assert!(
                s.contains(&("encrypted", format!("docs/report{i}.txt.locked"))),
                "{s:?}"
            );
        }
        for i in 10..12 {
            assert!(
                s.contains(&("header_encrypted", format!("docs/report{i}.txt"))),
                "{s:?}"
            );
        }
        assert!(!s.iter().any(|(sig, _)| *sig == "ransom_note"), "{s:?}");
        assert_eq!(o.score, 5 * ENCRYPTED_FILE, "{s:?}");
        assert!(o.ransomware);

        // A file system the baseline read, unreadable now.
        let rules = Rules::load(None).unwrap();
        let fs: Arc<dyn FileSystem> = Arc::new(LocalDir::new(a.clone()).unwrap());
        let before = [
            "part1: ext4, files in part1/".to_string(),
            "part2: swap, not readable by elastio yet".into(),
        ];
        let now = [
            "part1: no known file system".to_string(),
            "part2: swap, not readable by elastio yet".into(),
        ];
        let o = scan(
            &fs,
            Some((&fs, &before[..])),
            &now,
            &rules,
            &Options::default(),
            &|_| {},
        )
        .unwrap();
        assert_eq!(signals(&o), [("filesystem_lost", "part1".to_string())]);
        assert_eq!(o.exit_code(), 201);
        // Below the score, a signal makes the RP suspicious, never clean.
        let few = Outcome {
            score: 25,
            ransomware: false,
            ..o.clone()
        };
        assert_eq!((few.exit_code(), few.verdict()), (205, "suspicious"));
    }

    /// Benign compression of renamed files stays quiet (`xz x`, `zstd x`, `gzip x`); the same
    /// names over ciphertext (a forged 7z archive, an extension replaced) do not.
    #[test]
    fn compressed_renames_are_quiet_and_archives_of_ciphertext_are_not() {
        let (_d, a, b) = twins();
        // Real compressors, through their command-line tools.
        for (i, tool, ext) in [(1u64, "xz", "xz"), (2, "zstd", "zst"), (3, "gzip", "gz")] {
            let p = b.join(format!("docs/report{i}.txt"));
            let mut cmd = std::process::Command::new(tool);
            if tool == "zstd" {
                cmd.arg("--rm");
            }
            let out = cmd.arg("-q").arg(&p).output().unwrap();
            assert!(
                out.status.success(),
                "{tool}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(b.join(format!("docs/report{i}.txt.{ext}")).exists());
        }
        // Ciphertext behind a 7z header, and under a replaced extension.
        lock(&b, 4, "report4.txt.7z", b"7z\xbc\xaf\x27\x1c", 9);
        lock(&b, 5, "report5.crypt", b"", 10);
        let o = run(Some(&a), &b, false);
        let s = signals(&o);
        assert!(
            s.contains(&("encrypted", "docs/report4.txt.7z".into())),
            "{s:?}"
        );
        assert!(
            s.contains(&("encrypted", "docs/report5.crypt".into())),
            "{s:?}"
        );
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(o.stats.files_renamed, 5, "{:?}", o.stats);
    }
}
