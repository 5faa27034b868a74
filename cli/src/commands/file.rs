use agent::file::{backup_files, FileBackupOptions};
use agent::file_restore::{include_path, restore_files, FileRestoreOptions};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use scalez::RpKind;
use serde_json::json;
use std::path::PathBuf;

use crate::cli::OutputFormat;
use crate::context::resolve_rp;
use crate::context::Ctx;
use crate::output::print_json;
use crate::output::{bytes, rate, Bar};

/// Exit code when some paths could not be restored (as `check` for a damaged vault).
const DAMAGED: i32 = 3;
/// Paths listed in human output before "and N more".
const LIST_MAX: usize = 20;

pub fn run(ctx: &Ctx, cmd: FileCommand) -> Result<()> {
    match cmd {
        FileCommand::Backup(a) => backup(ctx, a),
        FileCommand::Restore(a) => restore(ctx, a),
    }
}

fn list(title: &str, items: &[String]) {
    if items.is_empty() {
        return;
    }
    eprintln!("{title} ({}):", items.len());
    for i in items.iter().take(LIST_MAX) {
        eprintln!("  {i}");
    }
    if items.len() > LIST_MAX {
        eprintln!("  ... and {} more", items.len() - LIST_MAX);
    }
}

fn backup(ctx: &Ctx, a: FileBackupArgs) -> Result<()> {
    let tags = scalez::catalog::parse_tags(a.tags.iter().map(String::as_str))?;
    let vault = ctx.open_vault()?;
    let mut opts = FileBackupOptions {
        tags,
        excludes: a.excludes,
        one_file_system: a.one_file_system,
        cancel: crate::cancel_token(),
        ..FileBackupOptions::default()
    };
    if let Some(w) = a.workers {
        opts.workers = w.max(1);
    }
    let bar = Bar::new(ctx.global.quiet);
    let names: Vec<String> = a.paths.iter().map(|p| p.display().to_string()).collect();
    let report = backup_files(&vault, &a.paths, &opts, &bar)
        .with_context(|| format!("backup of {} failed", names.join(", ")))?;
    bar.finish();
    let rp = &report.rp;
    let scan = crate::commands::iscan::AfterBackup::run(ctx, &vault, &rp.id, &a.scan)?;
    let printed = match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "iscan": scan.as_ref().map(|s| s.json()),
            "rp": rp,
            "entries": report.entries,
            "files": report.files,
            "files_read": report.files_read,
            "files_unchanged": report.files_unchanged,
            "bytes_read": report.bytes_read,
            "changed_while_read": report.changed,
            "unreadable": report.unreadable,
            "packs_written": report.session.packs,
            "elapsed_ms": report.elapsed.as_millis() as u64,
        })),
        OutputFormat::Human => {
            println!(
                "created {} (files {} on {})",
                rp.id, rp.asset.name, rp.asset.host
            );
            if let Some(p) = &rp.parent {
                println!("  parent        {p}");
            }
            println!(
                "  paths         {} ({} files, {})",
                report.entries,
                report.files,
                bytes(rp.logical_size)
            );
            println!(
                "  read          {} files, {} ({} unchanged files not read)",
                report.files_read,
                bytes(report.bytes_read),
                report.files_unchanged
            );
            println!(
                "  new stored    {} ({} new chunks)",
                bytes(rp.new_bytes_stored),
                rp.new_chunks
            );
            println!(
                "  time          {:.2} s ({})",
                report.elapsed.as_secs_f64(),
                rate(report.bytes_read, report.elapsed)
            );
            list(
                "warning: files changed while being read (stored as last read, flagged)",
                &report.changed,
            );
            list(
                "warning: unreadable paths (recorded without data)",
                &report.unreadable,
            );
            Ok(())
        }
    };
    printed?;
    match scan {
        Some(s) => s.finish(ctx),
        None => Ok(()),
    }
}

fn restore(ctx: &Ctx, a: FileRestoreArgs) -> Result<()> {
    let vault = ctx.open_vault()?;
    // `latest` is the newest file RP, as before disk RPs restored files too.
    let kind = (a.rp == "latest").then_some(RpKind::File);
    let rp = resolve_rp(&vault, &a.rp, a.asset.as_deref(), kind)?;
    if rp.kind != RpKind::File && rp.kind != RpKind::Disk {
        anyhow::bail!(
            "recovery point {} is a {} recovery point: files restore from file and disk RPs",
            rp.id,
            rp.kind
        );
    }
    let mut opts = FileRestoreOptions {
        includes: a
            .includes
            .iter()
            .map(|p| include_path(p))
            .collect::<Result<_, _>>()?,
        overwrite: a.overwrite,
        cancel: crate::cancel_token(),
        ..FileRestoreOptions::default()
    };
    if let Some(w) = a.workers {
        opts.workers = w.max(1);
    }
    let bar = Bar::new(ctx.global.quiet);
    let report = if rp.kind == RpKind::Disk {
        restore_from_disk(&vault, &rp, &a, &opts, &bar)
    } else {
        restore_files(&vault, &rp, &a.target, &opts, &bar).map_err(anyhow::Error::from)
    }
    .with_context(|| format!("restore of {} to {} failed", rp.id, a.target.display()))?;
    bar.finish();
    if report.entries == 0 && !a.includes.is_empty() {
        anyhow::bail!(
            "no path of {} matches --include {} (paths are as backed up, e.g. {})",
            rp.id,
            a.includes.join(", "),
            rp.tree
                .as_ref()
                .and_then(|t| t.sources.first())
                .map_or("/etc", String::as_str)
        );
    }
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "rp": rp.id,
            "target": a.target,
            "entries": report.entries,
            "files": report.files,
            "bytes": report.bytes,
            "skipped_existing": report.skipped,
            "warnings": report.warnings,
            "failed": report.failed,
            "elapsed_ms": report.elapsed.as_millis() as u64,
        }))?,
        OutputFormat::Human => {
            println!(
                "restored {} to {}: {} paths, {} files, {} in {:.2} s ({})",
                rp.id,
                a.target.display(),
                report.entries,
                report.files,
                bytes(report.bytes),
                report.elapsed.as_secs_f64(),
                rate(report.bytes, report.elapsed)
            );
            list(
                "skipped: already in the target (pass --overwrite to replace)",
                &report.skipped,
            );
            list("warning: metadata not applied", &report.warnings);
            list("error: not restored", &report.failed);
        }
    }
    if !report.failed.is_empty() {
        eprintln!(
            "error: {} paths of {} could not be restored",
            report.failed.len(),
            rp.id
        );
        std::process::exit(DAMAGED);
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum FileCommand {
    /// Back up files and directories (recursively) into a new file RP
    #[command(
        after_help = "Records every path with its type, mode, owner (ids and names), times, \
size, symlink target, hard links, extended attributes and holes; symlinks are never followed. \
File data is cut in content-defined chunks (FastCDC, 128 KiB / 512 KiB / 2 MiB), so an insert \
into a big file stores only the chunks around it. The next backup of the same paths on the same \
host is incremental: a file with the same size, mtime, ctime and inode as in the previous RP is \
not read again. A file that keeps changing while it is read is reported (and flagged in the RP); \
unreadable paths are reported and the backup goes on.\n\nExample: `elastio file backup /etc \
/home --exclude '*.tmp' --exclude /home/*/.cache --tag kind=config`."
    )]
    Backup(FileBackupArgs),
    /// Restore a file RP (or some of its paths) into a directory
    #[command(
        after_help = "Paths are recreated under --target as they were backed up (`/etc/hosts` \
becomes TARGET/etc/hosts), with modes, times, extended attributes and, when run as root, owners \
(numeric ids). Existing paths are left alone and listed unless --overwrite. The restore never \
writes outside the target: paths with `..` or a leading `/` in a (tampered) RP are refused, \
and it never follows a symlink in the target. Exit code 3 if some data could not be restored."
    )]
    Restore(FileRestoreArgs),
}

#[derive(Args, Debug)]
pub struct FileBackupArgs {
    #[command(flatten)]
    pub scan: crate::commands::iscan::BackupScan,
    /// Files or directories to back up
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Skip paths matching this glob (repeatable): with a `/` it is matched against the absolute
    /// path, without one against each name; `*` does not cross `/`, `**` does
    #[arg(long = "exclude", value_name = "GLOB")]
    pub excludes: Vec<String>,
    /// Do not descend into directories on other file systems (mount points are recorded empty)
    #[arg(long)]
    pub one_file_system: bool,
    /// Tag the recovery point (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Files read in parallel (default: twice the cores)
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
}

/// Restores files of the file systems inside disk RP `rp` (paths as `rp ls` shows them:
/// `part1/etc/ssh`) through the same safe restore as file RPs.
fn restore_from_disk(
    vault: &std::sync::Arc<scalez::Vault>,
    rp: &scalez::RecoveryPoint,
    a: &FileRestoreArgs,
    opts: &FileRestoreOptions,
    bar: &Bar,
) -> Result<agent::file_restore::FileRestoreReport> {
    let opened = mount::browse::open(vault, rp, 256 << 20)
        .with_context(|| format!("reading the files of {}", rp.id))?;
    let fs = opened.fs;
    // Every include must exist: a typo is an error, not an empty restore.
    for inc in &opts.includes {
        mount::browse::resolve(fs.as_ref(), inc).with_context(|| {
            format!(
                "--include /{} (disk RP paths start with the file system: {})",
                String::from_utf8_lossy(inc),
                opened.status.join("; ")
            )
        })?;
    }
    // An entry that cannot be read is reported and the rest restored.
    let unreadable = std::sync::Mutex::new(Vec::new());
    let mut entries = mount::browse::restore_entries(&fs, &opts.includes).filter_map(|r| match r {
        Ok(e) => Some(Ok(e)),
        Err(e) => {
            unreadable.lock().unwrap().push(e.to_string());
            None
        }
    });
    let source = FsFiles(fs.clone());
    let mut report =
        agent::file_restore::restore_entries(&mut entries, &source, &a.target, opts, 0, bar)?;
    report.failed.extend(unreadable.into_inner().unwrap());
    Ok(report)
}

/// File data from a file system inside a disk RP: read in 1 MiB pieces, pieces of zeros left
/// as holes.
struct FsFiles(std::sync::Arc<dyn mount::filesystem::FileSystem>);

impl agent::file_restore::FileSource for FsFiles {
    fn write_data(&self, e: &scalez::tree::Entry, file: &std::fs::File) -> Result<u64, String> {
        use std::os::unix::fs::FileExt;
        let f = self
            .0
            .clone()
            .open(e.inode)
            .map_err(|err| err.to_string())?;
        let size = f.size().min(e.size);
        let mut buf = Vec::with_capacity(1 << 20);
        let mut at = 0;
        while at < size {
            let n = (size - at).min(1 << 20) as usize;
            buf.clear();
            f.read_append(at, n, &mut buf)
                .map_err(|err| err.to_string())?;
            if buf.iter().any(|&b| b != 0) {
                file.write_all_at(&buf, at).map_err(|err| err.to_string())?;
            }
            at += n as u64;
        }
        Ok(size)
    }
}

#[derive(Args, Debug)]
pub struct FileRestoreArgs {
    /// Recovery point id, or `latest` (the newest RP, of --asset if given): a file RP, or a disk
    /// RP whose file systems elastio reads (paths as `elastio rp ls` shows them, e.g.
    /// /part1/etc/ssh)
    #[arg(long)]
    pub rp: String,
    /// With --rp latest: the asset (the backed-up paths, comma-separated as in `rp list`)
    #[arg(long)]
    pub asset: Option<String>,
    /// Directory to restore into (created if missing)
    #[arg(long, value_name = "DIR")]
    pub target: PathBuf,
    /// Restore only this path and what is below it (repeatable; as backed up, e.g. /etc/ssh)
    #[arg(long = "include", value_name = "PATH")]
    pub includes: Vec<String>,
    /// Replace paths that already exist in the target
    #[arg(long)]
    pub overwrite: bool,
    /// Files written in parallel (default: twice the cores)
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
}
