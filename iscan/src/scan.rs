//! The scan: which files to judge, how each is judged, and the verdict.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;
use std::time::Instant;

use mount::browse::{self, Change, Item, Skipped, Walker};
use mount::filesystem::{FileSystem, Kind};
use serde::Serialize;

use crate::entropy::{Class, Histogram, MIN_WINDOW, WINDOW};
use crate::magic::{self, Promise};
use crate::notes;
use crate::rules::{self, Rules};

/// Signal weights and thresholds (documented in the crate's docs; the report repeats them).
pub mod thresholds {
    /// Score at which an RP is judged hit by ransomware.
    pub const RANSOMWARE_SCORE: u32 = 100;
    /// A file that became ciphertext, whole or in part, or lost or contradicts its magic.
    pub const ENCRYPTED_FILE: u32 = 25;
    /// A new small file named like a ransom note.
    pub const RANSOM_NOTE: u32 = 40;
    /// A new small file carrying a Tor onion address.
    pub const ONION_ADDRESS: u32 = 40;
    /// A new file of uniform bytes without magic and with no other sign.
    pub const UNIFORM_NEW_FILE: u32 = 1;
    /// Renames in one folder (Veeam's threshold).
    pub const RENAME_BURST_COUNT: u64 = 200;
    pub const RENAME_BURST: u32 = 50;
    /// Deletions of one extension, and the share of that extension's files they must be
    /// (Veeam's: ≥ 100 and > 50 %).
    pub const DELETION_BURST_COUNT: u64 = 100;
    pub const DELETION_BURST_SHARE: f64 = 0.5;
    pub const DELETION_BURST: u32 = 50;
    /// New or renamed files of uniform bytes sharing one extension the baseline did not have.
    pub const EXTENSION_BURST_COUNT: u64 = 10;
    pub const EXTENSION_BURST: u32 = 100;
    /// Share of a file's windows that must be uniform for it to count as encrypted whole.
    pub const ENCRYPTED_SHARE: f64 = 0.75;
    /// Share (and least number) of a file's windows that turned uniform for partial
    /// (intermittent) encryption.
    pub const PARTIAL_SHARE: f64 = 0.10;
    pub const PARTIAL_MIN_WINDOWS: u64 = 2;
    /// Windows of the baseline file read to compare with at most, per file.
    pub const BASELINE_SAMPLES: usize = 16;
}
use thresholds::*;

/// What the scan may spend.
#[derive(Debug, Clone)]
pub struct Options {
    /// Judge every file, not only those changed since the baseline.
    pub full: bool,
    /// A file's bytes held for YARA at most (larger files: their first this many bytes, and
    /// the report counts them as truncated). Memory is about this much per scan.
    pub max_yara_bytes: usize,
    /// Stop after this many findings (the verdict is already clear; memory stays bounded).
    pub max_findings: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            full: false,
            max_yara_bytes: 64 << 20,
            max_findings: 10_000,
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
    /// `encrypted`, `partial_encryption`, `magic_lost`, `magic_mismatch`,
    /// `ransomware_extension`, `uniform_new_file`, `ransom_note`, `onion_address`,
    /// `rename_burst`, `deletion_burst`, `extension_burst`, `yara`, `damaged`, `unreadable`.
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
    /// Files larger than the YARA limit: only their first bytes were matched.
    pub yara_truncated: u64,
    /// Files the rules could not scan (time limit).
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
    /// Findings left out past [`Options::max_findings`].
    pub findings_dropped: u64,
    pub stats: Stats,
    pub filesystems: Vec<FsStatus>,
}

impl Outcome {
    /// The exit code: 0 clean, 201 ransomware, 202 malware, 203 both, 204 only file-system
    /// damage.
    pub fn exit_code(&self) -> i32 {
        match (self.ransomware, self.malware, self.damaged) {
            (true, true, _) => 203,
            (true, false, _) => 201,
            (false, true, _) => 202,
            (false, false, true) => 204,
            (false, false, false) => 0,
        }
    }

    /// `clean`, `ransomware`, `malware`, `ransomware+malware` or `damaged`.
    pub fn verdict(&self) -> &'static str {
        match self.exit_code() {
            203 => "ransomware+malware",
            201 => "ransomware",
            202 => "malware",
            204 => "damaged",
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
    buf: Vec<u8>,
    progress: &'a dyn Fn(&Stats),
}

/// Scans file system `new`, against `base` (the baseline RP's) unless `opts.full` or there is
/// none. `status` lines of a disk RP's places (`part2: ext4, damaged: …`) become file-system
/// findings. `progress` is called after each file.
pub fn scan(
    new: &Arc<dyn FileSystem>,
    base: Option<&Arc<dyn FileSystem>>,
    status: &[String],
    rules: &Rules,
    opts: &Options,
    progress: &dyn Fn(&Stats),
) -> io::Result<Outcome> {
    let started = Instant::now();
    let mut s = Scan {
        new: new.clone(),
        base: if opts.full { None } else { base.cloned() },
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
        buf: Vec::new(),
        progress,
    };
    s.check_places(status);
    s.check_structure()?;
    match s.base.clone() {
        Some(base) => s.incremental(&base)?,
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
    String::from_utf8_lossy(path).into_owned()
}

fn name_of(path: &[u8]) -> &[u8] {
    path.rsplit(|&b| b == b'/').next().unwrap_or(path)
}

fn dir_of(path: &[u8]) -> &[u8] {
    path.iter()
        .rposition(|&b| b == b'/')
        .map_or(&[][..], |p| &path[..p])
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
        // The verdict does not depend on the cap on findings kept.
        match kind {
            FindingKind::Ransomware => self.out.score = self.out.score.saturating_add(weight),
            FindingKind::Malware => self.out.malware = true,
            FindingKind::Filesystem => self.out.damaged = true,
        }
        if self.out.findings.len() >= self.opts.max_findings {
            self.out.findings_dropped += 1;
            return;
        }
        self.out.findings.push(Finding {
            kind,
            signal,
            path: path.map(shown),
            evidence,
            weight,
        });
    }

    /// A disk RP's places: damaged ones are findings; every one is listed.
    fn check_places(&mut self, status: &[String]) {
        for line in status {
            let (place, what) = line.split_once(": ").unwrap_or((line.as_str(), ""));
            if what.contains("damaged") {
                self.add(
                    FindingKind::Filesystem,
                    "damaged",
                    Some(place.as_bytes()),
                    what.to_string(),
                    0,
                );
            }
            self.out.filesystems.push(FsStatus {
                place: place.to_string(),
                status: what.to_string(),
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
            self.add(FindingKind::Filesystem, "unreadable", Some(&path), error.to_string(), 0);
        }
        Ok(())
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
        let stats = {
            let this = &mut *self;
            browse::diff_all(
                base,
                &new,
                &mut |item, change| {
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
                            let from = this.rename_source(&item.path);
                            this.judge(item, from.map(|(p, ino)| (p, ino, true)))?;
                        }
                        Change::Changed(what) => {
                            this.count_base_ext(&item.path);
                            if what.contains(&"content") || what.contains(&"type") {
                                this.out.stats.files_changed += 1;
                                let old = browse::resolve(base.as_ref(), &item.path).ok();
                                this.judge(item, old.map(|ino| (item.path.clone(), ino, false)))?;
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
                // The structure check walked the scanned RP already; the baseline's damage is
                // its own scan's business.
                &mut |_| {},
            )?
        };
        for (ext, n) in unchanged {
            *self.base_exts.entry(ext).or_default() += n;
        }
        self.out.stats.files_unchanged = stats.same_by_key;
        Ok(())
    }

    fn count_base_ext(&mut self, path: &[u8]) {
        if let Some(e) = magic::extension(name_of(path)) {
            *self.base_exts.entry(e).or_default() += 1;
        }
    }

    /// The removed file `path` was renamed from: same directory, `path` is its name plus
    /// an extension (`report.docx` → `report.docx.locked`).
    fn rename_source(&mut self, path: &[u8]) -> Option<(Vec<u8>, u64)> {
        let dot = path.iter().rposition(|&b| b == b'.')?;
        let stem = &path[..dot];
        if stem.ends_with(b"/") || stem.is_empty() {
            return None;
        }
        let r = self.removed.get_mut(stem)?;
        if r.paired {
            return None;
        }
        r.paired = true;
        self.out.stats.files_renamed += 1;
        *self
            .renames_by_dir
            .entry(dir_of(path).to_vec())
            .or_default() += 1;
        Some((stem.to_vec(), r.ino))
    }

    /// Reads file `ino` of `fs` window by window; with `keep`, holds up to the YARA limit.
    fn read(&mut self, fs: &Arc<dyn FileSystem>, ino: u64, keep: bool) -> io::Result<Read> {
        let file = fs.clone().open(ino)?;
        let size = file.size();
        let mut classes = Vec::new();
        let mut head = Vec::new();
        let mut hist = Histogram::default();
        let mut piece = Vec::with_capacity(WINDOW);
        self.buf.clear();
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(WINDOW as u64) as usize;
            piece.clear();
            file.read_append(off, n, &mut piece)?;
            if piece.len() != n {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read"));
            }
            if off == 0 {
                head = piece.clone();
            }
            hist.add(&piece);
            classes.push(hist.class());
            hist = Histogram::default();
            if keep && self.buf.len() < self.opts.max_yara_bytes {
                let room = self.opts.max_yara_bytes - self.buf.len();
                self.buf.extend_from_slice(&piece[..piece.len().min(room)]);
            }
            off += n as u64;
        }
        Ok(Read {
            size,
            classes,
            head,
        })
    }

    /// Classes of the baseline file's windows at `at` (window indexes).
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
            out.push(Histogram::of(&piece).class());
        }
        Ok((out, head))
    }

    /// Judges one new or changed file; `old` is the baseline's version (its path, inode, and
    /// whether it was renamed to this one).
    fn judge(&mut self, item: &Item, old: Option<(Vec<u8>, u64, bool)>) -> io::Result<()> {
        let path = item.path.clone();
        let fs = self.new.clone();
        let read = match self.read(&fs, item.ino, true) {
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
        // Malware.
        if read.size > self.opts.max_yara_bytes as u64 {
            self.out.stats.yara_truncated += 1;
        }
        let bytes = std::mem::take(&mut self.buf);
        match rules::matches(&mut self.yara, &bytes) {
            Ok(hits) => {
                for rule in hits {
                    self.add(
                        FindingKind::Malware,
                        "yara",
                        Some(&path),
                        format!("rule {rule}"),
                        0,
                    );
                }
            }
            Err(e) => {
                self.out.stats.yara_errors += 1;
                tracing::warn!(path = %shown(&path), "YARA rules did not finish: {e}");
            }
        }
        // Ransom notes: small new or changed files.
        if read.size <= notes::MAX_NOTE_BYTES && read.size > 0 {
            if notes::is_note_name(name_of(&path)) {
                self.add(
                    FindingKind::Ransomware,
                    "ransom_note",
                    Some(&path),
                    "named like a ransom note".into(),
                    RANSOM_NOTE,
                );
            }
            if let Some(onion) = notes::onion_address(&bytes) {
                self.add(
                    FindingKind::Ransomware,
                    "onion_address",
                    Some(&path),
                    format!("carries the Tor address {onion}"),
                    ONION_ADDRESS,
                );
            }
        }
        self.buf = bytes;
        self.judge_content(&path, &read, old)?;
        (self.progress)(&self.out.stats);
        Ok(())
    }

    fn judge_content(
        &mut self,
        path: &[u8],
        read: &Read,
        old: Option<(Vec<u8>, u64, bool)>,
    ) -> io::Result<()> {
        let ext = magic::extension(name_of(path));
        let found = magic::detect(&read.head);
        let promise = ext.as_deref().and_then(magic::promise);
        // Dense content explained by a format that is dense by nature and matches the name.
        let explained = found.is_some_and(|f| {
            f.dense
                && match promise {
                    None => true,
                    Some(Promise::Formats(names)) => names.contains(&f.name),
                    Some(Promise::Text) => false,
                }
        });
        if explained || read.judged() == 0 {
            return Ok(());
        }
        let uniform = read.uniform();
        let judged = read.judged();
        if let Some((old_path, old_ino, renamed)) = old {
            if uniform == 0 {
                return Ok(());
            }
            // Compare the windows that are uniform now with the same windows before (a sample).
            let idx: Vec<usize> = read
                .classes
                .iter()
                .enumerate()
                .filter(|(_, c)| **c == Some(Class::Uniform))
                .map(|(i, _)| i)
                .collect();
            let step = idx.len().div_ceil(BASELINE_SAMPLES).max(1);
            let sample: Vec<usize> = idx.iter().copied().step_by(step).collect();
            let (before, old_head) = match self.sample_base(old_ino, &sample) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(path = %shown(&old_path), "baseline file unreadable: {e}");
                    return Ok(());
                }
            };
            let turned_in_sample = before
                .iter()
                .filter(|c| matches!(c, Some(Class::Low | Class::High)))
                .count();
            // Scale the sample back to all uniform windows.
            let turned = (turned_in_sample as u64 * uniform).div_ceil(sample.len() as u64);
            let old_magic = magic::detect(&old_head);
            let lost = old_magic.is_some()
                && found.is_none()
                && read.classes.first() == Some(&Some(Class::Uniform));
            if turned == 0 && !lost {
                // Uniform before too (a dense file rewritten): nothing new.
                return Ok(());
            }
            let how = if renamed {
                format!("renamed from {}; ", shown(&old_path))
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
            } else if read.mostly_uniform() {
                (
                    "encrypted",
                    format!(
                        "{how}{uniform} of {judged} 64 KiB windows are uniform (χ²), they were not"
                    ),
                )
            } else if turned >= PARTIAL_MIN_WINDOWS
                && turned as f64 >= judged as f64 * PARTIAL_SHARE
            {
                (
                    "partial_encryption",
                    format!("{how}{turned} of {judged} 64 KiB windows turned uniform (χ²): intermittent encryption"),
                )
            } else {
                return Ok(());
            };
            if let Some(e) = ext.filter(|_| renamed) {
                *self.uniform_by_ext.entry(e).or_default() += 1;
            }
            self.add(
                FindingKind::Ransomware,
                signal,
                Some(path),
                evidence,
                ENCRYPTED_FILE,
            );
            return Ok(());
        }
        if !read.mostly_uniform() {
            return Ok(());
        }
        let what = format!("{uniform} of {judged} 64 KiB windows uniform (χ²)");
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
                ENCRYPTED_FILE,
            ),
            (Some(Promise::Text), Some(e)) => (
                "magic_mismatch",
                format!("a .{e} file of uniform bytes, not text; {what}"),
                ENCRYPTED_FILE,
            ),
            (None, Some(e)) if magic::ransomware_extension(e) => (
                "ransomware_extension",
                format!("extension .{e} of ransomware families, and {what}"),
                ENCRYPTED_FILE,
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
        for r in self.removed.values().filter(|r| !r.paired) {
            if let Some(e) = &r.ext {
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
        let exts: Vec<(String, u64)> = self
            .uniform_by_ext
            .iter()
            // Only extensions the baseline did not have (all of them when there is none).
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
            "uniform_new_file": UNIFORM_NEW_FILE,
            "rename_burst": RENAME_BURST,
            "deletion_burst": DELETION_BURST,
            "extension_burst": EXTENSION_BURST,
        },
        "rename_burst_count": RENAME_BURST_COUNT,
        "deletion_burst": { "count": DELETION_BURST_COUNT, "share": DELETION_BURST_SHARE },
        "extension_burst_count": EXTENSION_BURST_COUNT,
        "encrypted_share": ENCRYPTED_SHARE,
        "partial": { "share": PARTIAL_SHARE, "min_windows": PARTIAL_MIN_WINDOWS },
        "window_bytes": WINDOW,
        "min_window_bytes": MIN_WINDOW,
        "uniform": { "entropy": crate::entropy::UNIFORM_ENTROPY, "chi2": crate::entropy::UNIFORM_CHI2 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::LocalDir;
    use std::path::Path;

    fn random(n: usize, mut x: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                (z ^ (z >> 31)) as u8
            })
            .collect()
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
        let new: Arc<dyn FileSystem> = Arc::new(LocalDir::new(new.to_path_buf()));
        let base: Option<Arc<dyn FileSystem>> =
            base.map(|b| Arc::new(LocalDir::new(b.to_path_buf())) as _);
        let opts = Options {
            full,
            ..Options::default()
        };
        scan(&new, base.as_ref(), &[], &rules, &opts, &|_| {}).unwrap()
    }

    fn signals(o: &Outcome) -> Vec<(&'static str, String)> {
        o.findings
            .iter()
            .map(|f| (f.signal, f.path.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn encrypted_renamed_files_and_notes_are_ransomware_and_named() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        tree(&a);
        tree(&b);
        for i in 0..4u64 {
            let p = b.join(format!("docs/report{i}.txt"));
            let n = std::fs::metadata(&p).unwrap().len() as usize;
            std::fs::remove_file(&p).unwrap();
            std::fs::write(b.join(format!("docs/report{i}.txt.locked")), random(n, i)).unwrap();
        }
        std::fs::write(
            b.join("docs/HOW_TO_DECRYPT.txt"),
            "pay at http://vww6ybal4bd7szmgncyruucpgfkqahzddi37ktceo3ah7ngmcopnpyyd.onion/",
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
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        tree(&a);
        tree(&b);
        // An xz file (uniform bytes behind its magic), a rotated log, a rewritten document.
        let mut xz = b"\xfd7zXZ\x00".to_vec();
        xz.extend(random(300_000, 5));
        std::fs::write(b.join("big.log.1.xz"), &xz).unwrap();
        std::fs::write(b.join("big.log"), text(1 << 20, 7)).unwrap();
        std::fs::write(b.join("docs/report3.txt"), text(50_000, 1234)).unwrap();
        for i in 0..12 {
            let mut jpg = b"\xff\xd8\xff\xe0".to_vec();
            jpg.extend(random(70_000, 50 + i));
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
        assert!(s.iter().any(|(sig, _)| *sig == "extension_burst"), "{s:?}");
        assert!(s.contains(&("yara", "dropper.sh".into())), "{s:?}");
        assert_eq!(o.exit_code(), 203);
    }
}
