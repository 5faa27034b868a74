use agent::file::{backup_files, FileBackupOptions};
use agent::file_restore::{include_path, restore_files, FileRestoreOptions};
use anyhow::{Context, Result};
use scalez::RpKind;
use serde_json::json;

use crate::cli::{FileBackupArgs, FileCommand, FileRestoreArgs, OutputFormat};
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
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
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
    }
}

fn restore(ctx: &Ctx, a: FileRestoreArgs) -> Result<()> {
    let vault = ctx.open_vault()?;
    let rp = resolve_rp(&vault, &a.rp, a.asset.as_deref(), Some(RpKind::File))?;
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
    let report = restore_files(&vault, &rp, &a.target, &opts, &bar)
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
