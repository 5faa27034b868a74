use clap::{Args, Subcommand};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, IsTerminal};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use agent::stream::{backup_stream, restore_stream, StreamOptions};
use anyhow::{bail, Context, Result};
use scalez::RpKind;
use serde_json::json;

use crate::cli::OutputFormat;
use crate::context::resolve_rp;
use crate::context::Ctx;
use crate::output::print_json;
use crate::output::{bytes, rate, Bar};

pub fn run(ctx: &Ctx, cmd: StreamCommand) -> Result<()> {
    match cmd {
        StreamCommand::Backup(a) => backup(ctx, a),
        StreamCommand::Restore(a) => restore(ctx, a),
    }
}

fn backup(ctx: &Ctx, a: StreamBackupArgs) -> Result<()> {
    let tags = scalez::catalog::parse_tags(a.tags.iter().map(String::as_str))?;
    if a.from_file.is_none() && io::stdin().is_terminal() {
        bail!("standard input is a terminal: pipe the stream in, or pass --from-file FILE");
    }
    let vault = ctx.open_vault()?;
    let opts = StreamOptions {
        tags,
        cancel: crate::cancel_token(),
        ..StreamOptions::default()
    };
    let bar = Bar::new(ctx.global.quiet);
    let report = match &a.from_file {
        Some(f) => {
            let file = File::open(f).with_context(|| format!("cannot open {}", f.display()))?;
            backup_stream(&vault, file, &a.stream_name, &opts, &bar)
        }
        None => backup_stream(&vault, io::stdin(), &a.stream_name, &opts, &bar),
    }
    .with_context(|| format!("backup of stream {} failed", a.stream_name))?;
    bar.finish();
    let rp = &report.rp;
    let scan = crate::commands::iscan::AfterBackup::run(ctx, &vault, &rp.id, &a.scan)?;
    let printed = match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "iscan": scan.as_ref().map(|s| s.json()),
            "rp": rp,
            "packs_written": report.session.packs,
            "elapsed_ms": report.elapsed.as_millis() as u64,
            "store_requests": vault.store().stats().requests,
        })),
        OutputFormat::Human => {
            println!(
                "created {} (stream {} on {})",
                rp.id, rp.asset.name, rp.asset.host
            );
            if let Some(p) = &rp.parent {
                println!("  parent        {p}");
            }
            println!("  size          {}", bytes(rp.logical_size));
            println!(
                "  new stored    {} ({} new chunks of {})",
                bytes(rp.new_bytes_stored),
                rp.new_chunks,
                rp.stream.as_ref().map_or(0, |s| s.chunks)
            );
            println!(
                "  time          {:.2} s ({})",
                report.elapsed.as_secs_f64(),
                rate(rp.logical_size, report.elapsed)
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

fn restore(ctx: &Ctx, a: StreamRestoreArgs) -> Result<()> {
    let vault = ctx.open_vault()?;
    let rp = resolve_rp(
        &vault,
        &a.rp,
        a.stream_name.as_deref(),
        Some(RpKind::Stream),
    )?;
    let workers = agent::pipeline::default_workers();
    let bar = Bar::new(ctx.global.quiet || a.to_file.is_none());
    let Some(target) = &a.to_file else {
        // Standard output: nothing else may be printed there.
        let stdout = io::stdout().lock();
        let mut w = BufWriter::with_capacity(4 << 20, stdout);
        restore_stream(&vault, &rp, &mut w, workers, &bar)
            .with_context(|| format!("restore of {} failed", rp.id))?;
        return Ok(());
    };
    if target.exists() && !a.force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            target.display()
        );
    }
    // Build the file beside the target; rename into place once complete.
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = target.file_name().context("--to-file has no file name")?;
    let tmp = dir.join(format!(
        ".{}.elastio-partial-{:08x}",
        name.to_string_lossy(),
        rand::random::<u32>()
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut w = BufWriter::with_capacity(4 << 20, file);
    let r = restore_stream(&vault, &rp, &mut w, workers, &bar)
        .with_context(|| format!("restore of {} failed", rp.id))
        .and_then(|n| {
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            fs::rename(&tmp, target)?;
            Ok(n)
        });
    let n = match r {
        Ok(n) => n,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    bar.finish();
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({ "rp": rp.id, "target": target, "size": n })),
        OutputFormat::Human => {
            println!("restored {} to {} ({})", rp.id, target.display(), bytes(n));
            Ok(())
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum StreamCommand {
    /// Read standard input (or --from-file) to its end into a new stream RP
    #[command(
        after_help = "Content-defined chunks (FastCDC, 256 KiB / 1 MiB / 4 MiB min / \
average / max), so the next backup of a similar stream stores only what changed even when \
bytes were inserted. Memory stays bounded whatever the stream's length. Example: \
`pg_dump db | elastio stream backup --stream-name db --tag kind=dump`."
    )]
    Backup(StreamBackupArgs),
    /// Write a stream RP to standard output (or --to-file)
    Restore(StreamRestoreArgs),
}

#[derive(Args, Debug)]
pub struct StreamBackupArgs {
    #[command(flatten)]
    pub scan: crate::commands::iscan::BackupScan,
    /// Name of the stream (the asset its RPs are listed under)
    #[arg(long)]
    pub stream_name: String,
    /// Tag the recovery point (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Read this file instead of standard input
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct StreamRestoreArgs {
    /// Recovery point id, or `latest` (the newest stream RP, of --stream-name if given)
    #[arg(long)]
    pub rp: String,
    /// With --rp latest: the stream whose newest RP to restore
    #[arg(long)]
    pub stream_name: Option<String>,
    /// Write this file (created; replaced only with --force) instead of standard output
    #[arg(long, value_name = "FILE")]
    pub to_file: Option<PathBuf>,
    /// Overwrite an existing --to-file
    #[arg(long)]
    pub force: bool,
}
