//! `elastio rp ls|cat|find|diff`: the files of RPs without mounting them (file RPs and the file
//! systems inside disk RPs alike, through `mount::browse`).

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use mount::browse::{self, Change, Item, Walker};
use mount::filesystem::{FileSystem, Kind};
use scalez::{RecoveryPoint, RpKind, Vault};
use serde_json::{json, Value};

use crate::cli::{parse_size, OutputFormat};
use crate::context::{resolve_rp, Ctx};

#[derive(Args, Debug)]
#[command(
    after_help = "A disk RP shows each file system it holds as a directory named as \
`elastio mount` names them (part1/, part2/, fs/ for an unpartitioned disk); a file RP shows its \
tree.\n\nExamples:\n  elastio rp ls latest\n  elastio rp ls rp-01m80mb7eb9rts308j4hc4b1xn \
part1/etc --long\n  elastio rp ls latest --asset web-1 / --recursive --output-format json"
)]
pub struct RpLsArgs {
    /// Recovery point id, or `latest`
    pub rp: String,
    /// Directory (or file) inside the RP
    #[arg(default_value = "/")]
    pub path: String,
    /// Mode, owner, size and modification time of each entry
    #[arg(long, short = 'l')]
    pub long: bool,
    /// Everything below PATH, not only its entries
    #[arg(long, short = 'R')]
    pub recursive: bool,
    /// With `latest`: the asset whose newest RP to list
    #[arg(long)]
    pub asset: Option<String>,
    /// Chunk cache
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub cache_size: u64,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  elastio rp cat latest part1/etc/hostname\n  elastio rp cat \
rp-01m80mb7eb9rts308j4hc4b1xn home/alice/notes.txt > notes.txt"
)]
pub struct RpCatArgs {
    /// Recovery point id, or `latest`
    pub rp: String,
    /// A regular file inside the RP
    pub path: String,
    /// With `latest`: the asset whose newest RP to read
    #[arg(long)]
    pub asset: Option<String>,
    /// Chunk cache
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub cache_size: u64,
}

#[derive(Args, Debug)]
#[command(
    after_help = "A pattern without `/` matches file names (`*.conf`); one with `/` \
matches whole paths inside the RP (`part1/etc/**/*.conf`). Disk RPs are searched in the file \
systems elastio reads.\n\nExamples:\n  elastio rp find sshd_config\n  elastio rp find --asset \
web-1 '*.log' 'part1/var/lib/**'"
)]
pub struct RpFindArgs {
    /// Glob patterns; a path matching any is shown
    #[arg(required = true)]
    pub patterns: Vec<String>,
    /// Only RPs of this asset (exact name, or a substring of it)
    #[arg(long)]
    pub asset: Option<String>,
    /// Only this type of RP: disk or file
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<RpKind>,
    /// Chunk cache
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub cache_size: u64,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Lines start with + (added), - (removed) or M (changed, with what \
changed: type, content, target, device, mode, owner, mtime, xattrs). A file system whose chunks \
are all the same in both RPs is skipped whole; files whose data lies in the same chunks in both \
RPs are not read.\n\nExamples:\n  elastio rp diff \
rp-01m80mb7eb9rts308j4hc4b1xn rp-01m80q0exmx4mr1kh8rkgkg9q4\n  elastio rp diff OLD NEW \
--output-format json"
)]
pub struct RpDiffArgs {
    /// The older recovery point
    pub old: String,
    /// The newer recovery point
    pub new: String,
    /// Chunk cache (each RP gets this much)
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub cache_size: u64,
}

/// The RP's files, with the status lines of a disk RP's partitions (shown on stderr).
fn open_files(
    ctx: &Ctx,
    vault: &Arc<Vault>,
    rp: &RecoveryPoint,
    cache: u64,
) -> Result<Arc<dyn FileSystem>> {
    let opened = browse::open(vault, rp, cache as usize)
        .with_context(|| format!("reading the files of {}", rp.id))?;
    if !ctx.global.quiet {
        for line in opened.status.iter().filter(|l| !l.contains(", files in ")) {
            eprintln!("{}: {line}", rp.id);
        }
    }
    Ok(opened.fs)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn secs(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn time_text(t: SystemTime) -> String {
    if t < UNIX_EPOCH {
        return format!("{:.0}", secs(t));
    }
    humantime::format_rfc3339_seconds(t).to_string()
}

fn type_name(k: Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::CharDevice => "chardev",
        Kind::BlockDevice => "blockdev",
        Kind::Fifo => "fifo",
        Kind::Socket => "socket",
    }
}

/// `drwxr-xr-x`, as ls shows it.
fn mode_text(k: Kind, perm: u16) -> String {
    let t = match k {
        Kind::File => '-',
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::CharDevice => 'c',
        Kind::BlockDevice => 'b',
        Kind::Fifo => 'p',
        Kind::Socket => 's',
    };
    let mut s = String::from(t);
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        let bit = 1 << (8 - i);
        let special = match i {
            2 if perm & 0o4000 != 0 => Some('s'),
            5 if perm & 0o2000 != 0 => Some('s'),
            8 if perm & 0o1000 != 0 => Some('t'),
            _ => None,
        };
        s.push(match (special, perm & bit != 0) {
            (Some(x), true) => x,
            (Some(x), false) => x.to_ascii_uppercase(),
            (None, true) => c,
            (None, false) => '-',
        });
    }
    s
}

/// A path of an RP as the commands show it: `/` then the path inside the RP.
fn shown(prefix: &[u8], path: &[u8]) -> Vec<u8> {
    let mut p = b"/".to_vec();
    for part in [prefix, path] {
        let part = part.strip_prefix(b"/").unwrap_or(part);
        if part.is_empty() {
            continue;
        }
        if p.len() > 1 {
            p.push(b'/');
        }
        p.extend_from_slice(part.strip_suffix(b"/").unwrap_or(part));
    }
    p
}

fn item_json(fs: &dyn FileSystem, path: &[u8], item: &Item) -> Value {
    let a = &item.attr;
    let mut v = json!({
        "path": lossy(path),
        "type": type_name(a.kind),
        "mode": a.perm,
        "size": a.size,
        "uid": a.uid,
        "gid": a.gid,
        "nlink": a.nlink,
        "mtime": secs(a.mtime),
    });
    if a.kind == Kind::Symlink {
        v["target"] = json!(fs
            .read_link(item.ino)
            .map(|t| lossy(&t))
            .unwrap_or_default());
    }
    v
}

/// Prints a JSON array one element at a time (a listing can be large).
struct JsonArray {
    first: bool,
}

impl JsonArray {
    fn new() -> Self {
        print!("[");
        JsonArray { first: true }
    }
    fn push(&mut self, v: &Value) -> Result<()> {
        let sep = if self.first { "\n  " } else { ",\n  " };
        self.first = false;
        print!("{sep}{}", serde_json::to_string(v)?);
        Ok(())
    }
    fn end(self) {
        println!("{}]", if self.first { "" } else { "\n" });
    }
}

pub fn ls(ctx: &Ctx, a: RpLsArgs) -> Result<()> {
    let vault = ctx.open_vault()?;
    let rp = resolve_rp(&vault, &a.rp, a.asset.as_deref(), None)?;
    let fs = open_files(ctx, &vault, &rp, a.cache_size)?;
    let start =
        browse::resolve(fs.as_ref(), a.path.as_bytes()).with_context(|| format!("in {}", rp.id))?;
    let json = ctx.global.output_format == OutputFormat::Json;
    let mut out = json.then(JsonArray::new);
    let mut skipped = 0;
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    for item in Walker::new(fs.as_ref(), start, a.recursive) {
        let item = match item {
            Ok(i) => i,
            Err(s) => {
                skipped += 1;
                eprintln!(
                    "{}: {}: {}",
                    rp.id,
                    lossy(&shown(a.path.as_bytes(), &s.path)),
                    s.error
                );
                continue;
            }
        };
        // The start directory itself is not listed (ls shows a file given by name).
        if item.depth == 0 && item.attr.kind == Kind::Dir {
            continue;
        }
        let path = shown(a.path.as_bytes(), &item.path);
        if let Some(out) = &mut out {
            w.flush()?;
            out.push(&item_json(fs.as_ref(), &path, &item))?;
            continue;
        }
        if a.long {
            let t = &item.attr;
            write!(
                w,
                "{} {:>5} {:>5} {:>12}  {}  ",
                mode_text(t.kind, t.perm),
                t.uid,
                t.gid,
                t.size,
                time_text(t.mtime)
            )?;
        }
        w.write_all(&path)?;
        if a.long && item.attr.kind == Kind::Symlink {
            if let Ok(target) = fs.read_link(item.ino) {
                w.write_all(b" -> ")?;
                w.write_all(&target)?;
            }
        }
        w.write_all(b"\n")?;
    }
    w.flush()?;
    if let Some(out) = out {
        out.end();
    }
    if skipped > 0 {
        bail!(
            "{skipped} entries of {} could not be read (listed above)",
            rp.id
        );
    }
    Ok(())
}

pub fn cat(ctx: &Ctx, a: RpCatArgs) -> Result<()> {
    let vault = ctx.open_vault()?;
    let rp = resolve_rp(&vault, &a.rp, a.asset.as_deref(), None)?;
    let fs = open_files(ctx, &vault, &rp, a.cache_size)?;
    let ino =
        browse::resolve(fs.as_ref(), a.path.as_bytes()).with_context(|| format!("in {}", rp.id))?;
    let kind = fs.attr(ino)?.kind;
    if kind != Kind::File {
        bail!(
            "{}: {} is a {}, not a regular file",
            rp.id,
            a.path,
            type_name(kind)
        );
    }
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    browse::copy_file(&fs, ino, &mut w)
        .with_context(|| format!("reading {} of {}", a.path, rp.id))?;
    w.flush()?;
    Ok(())
}

/// Compiled find patterns: names (no `/`) and whole paths.
struct Patterns {
    names: globset::GlobSet,
    paths: globset::GlobSet,
}

impl Patterns {
    fn new(patterns: &[String]) -> Result<Self> {
        let (mut names, mut paths) = (
            globset::GlobSetBuilder::new(),
            globset::GlobSetBuilder::new(),
        );
        for p in patterns {
            let g = globset::GlobBuilder::new(p.trim_start_matches('/'))
                .literal_separator(true)
                .build()
                .with_context(|| format!("pattern {p:?}"))?;
            if p.contains('/') {
                paths.add(g);
            } else {
                names.add(g);
            }
        }
        Ok(Patterns {
            names: names.build()?,
            paths: paths.build()?,
        })
    }

    fn matches(&self, path: &[u8]) -> bool {
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
        let os = |b: &[u8]| std::ffi::OsStr::from_bytes(b).to_owned();
        self.names.is_match(os(name)) || self.paths.is_match(os(path))
    }
}

pub fn find(ctx: &Ctx, a: RpFindArgs) -> Result<()> {
    let patterns = Patterns::new(&a.patterns)?;
    if a.kind == Some(RpKind::Stream) {
        bail!("stream RPs hold no files to find");
    }
    let vault = ctx.open_vault()?;
    let rps: Vec<RecoveryPoint> = vault
        .list_rps()?
        .into_iter()
        .filter(|rp| matches!(rp.kind, RpKind::Disk | RpKind::File))
        .filter(|rp| a.kind.is_none_or(|k| rp.kind == k))
        .filter(|rp| {
            a.asset
                .as_deref()
                .is_none_or(|s| rp.asset.name == s || rp.asset.name.contains(s))
        })
        .collect();
    let json = ctx.global.output_format == OutputFormat::Json;
    let mut out = json.then(JsonArray::new);
    let (mut found, mut failed) = (0u64, 0u64);
    for (i, rp) in rps.iter().enumerate() {
        if !ctx.global.quiet {
            eprintln!(
                "searching {} ({}, {}) [{}/{}]",
                rp.id,
                rp.asset.name,
                rp.created,
                i + 1,
                rps.len()
            );
        }
        let fs = match open_files(ctx, &vault, rp, a.cache_size) {
            Ok(fs) => fs,
            Err(e) => {
                failed += 1;
                eprintln!("{}: {e:#}", rp.id);
                continue;
            }
        };
        for item in Walker::new(fs.as_ref(), fs.root(), true) {
            let item = match item {
                Ok(i) => i,
                Err(s) => {
                    eprintln!("{}: /{}: {}", rp.id, lossy(&s.path), s.error);
                    continue;
                }
            };
            if item.depth == 0 || !patterns.matches(&item.path) {
                continue;
            }
            found += 1;
            let path = shown(b"", &item.path);
            match &mut out {
                Some(out) => {
                    let mut v = item_json(fs.as_ref(), &path, &item);
                    v["rp"] = json!(rp.id.to_string());
                    v["asset"] = json!(rp.asset.name);
                    v["rp_created"] = json!(rp.created);
                    out.push(&v)?;
                }
                None => println!(
                    "{}  {}  {:>12}  {}  {}",
                    rp.id,
                    rp.created,
                    item.attr.size,
                    time_text(item.attr.mtime),
                    lossy(&path)
                ),
            }
        }
    }
    if let Some(out) = out {
        out.end();
    } else if !ctx.global.quiet {
        eprintln!("{found} matches in {} recovery points", rps.len());
    }
    if failed > 0 {
        bail!("{failed} recovery points could not be searched (see above)");
    }
    Ok(())
}

pub fn diff(ctx: &Ctx, a: RpDiffArgs) -> Result<()> {
    let vault = ctx.open_vault()?;
    let old = resolve_rp(&vault, &a.old, None, None)?;
    let new = resolve_rp(&vault, &a.new, None, None)?;
    if old.kind != new.kind {
        bail!(
            "{} is a {} RP and {} a {} RP: only RPs of one type compare",
            old.id,
            old.kind,
            new.id,
            new.kind
        );
    }
    let started = std::time::Instant::now();
    let (fa, fb) = (
        open_files(ctx, &vault, &old, a.cache_size)?,
        open_files(ctx, &vault, &new, a.cache_size)?,
    );
    let json = ctx.global.output_format == OutputFormat::Json;
    let mut changes = Vec::new();
    let mut skipped = 0u64;
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    let stats = browse::diff(
        &fa,
        &fb,
        &mut |item, change| {
            let path = shown(b"", &item.path);
            if json {
                let (kind, what) = match &change {
                    Change::Added => ("added", Vec::new()),
                    Change::Removed => ("removed", Vec::new()),
                    Change::Changed(w) => ("changed", w.clone()),
                };
                changes.push(json!({
                    "path": lossy(&path),
                    "change": kind,
                    "what": what,
                    "type": type_name(item.attr.kind),
                }));
                return Ok(());
            }
            match change {
                Change::Added => w.write_all(b"+  ")?,
                Change::Removed => w.write_all(b"-  ")?,
                Change::Changed(_) => w.write_all(b"M  ")?,
            }
            w.write_all(&path)?;
            if let Change::Changed(what) = change {
                write!(w, "  ({})", what.join(", "))?;
            }
            w.write_all(b"\n")
        },
        &mut |s| {
            skipped += 1;
            eprintln!("/{}: {}", lossy(&s.path), s.error);
        },
    )?;
    w.flush()?;
    let seconds = started.elapsed().as_secs_f64();
    if json {
        crate::output::print_json(&json!({
            "old": old.id.to_string(),
            "new": new.id.to_string(),
            "changes": changes,
            "added": stats.added,
            "removed": stats.removed,
            "changed": stats.changed,
            "compared": stats.compared,
            "same_by_key": stats.same_by_key,
            "same_filesystems": stats.same_subtrees,
            "bytes_read": stats.bytes_read,
            "skipped": skipped,
            "seconds": seconds,
        }))?;
    } else if !ctx.global.quiet {
        eprintln!(
            "{} added, {} removed, {} changed; {} paths compared ({} files by their chunks, {} file systems unchanged and skipped, {} read) in {seconds:.1} s",
            stats.added,
            stats.removed,
            stats.changed,
            stats.compared,
            stats.same_by_key,
            stats.same_subtrees,
            crate::output::bytes(stats.bytes_read)
        );
    }
    if skipped > 0 {
        bail!("{skipped} paths could not be compared (listed above)");
    }
    Ok(())
}
