use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::sync::Arc;

use agent::block::engine::IoEngine;
use agent::block::DirectIo;
use agent::pipeline::{backup_block, restore_block, BackupOptions, RestoreOptions};
use anyhow::{Context, Result};
use scalez::RpKind;
use serde_json::json;

use crate::cli::OutputFormat;
use crate::context::resolve_rp;
use crate::context::Ctx;
use crate::output::print_json;
use crate::output::{bytes, rate, Bar};

pub fn run(ctx: &Ctx, cmd: BlockCommand) -> Result<()> {
    match cmd {
        BlockCommand::Backup(a) => backup(ctx, a),
        BlockCommand::Restore(a) => restore(ctx, a),
    }
}

fn backup(ctx: &Ctx, a: BlockBackupArgs) -> Result<()> {
    let tags = scalez::catalog::parse_tags(a.tags.iter().map(String::as_str))?;
    let engine = IoEngine::from_env()?;
    let vault = ctx.open_vault()?;
    let opts = BackupOptions {
        tags,
        engine,
        direct: match a.direct_io {
            DirectIoArg::Auto => DirectIo::Auto,
            DirectIoArg::Always => DirectIo::Always,
            DirectIoArg::Never => DirectIo::Never,
        },
        asset_name: a.asset_name,
        cancel: crate::cancel_token(),
        ..BackupOptions::default()
    };
    let bar = Bar::new(ctx.global.quiet);
    let report = backup_block(&vault, &a.source, &opts, &bar)
        .with_context(|| format!("backup of {} failed", a.source.display()))?;
    bar.finish();
    let rp = &report.rp;
    let reduction = rp.logical_size as f64 / rp.new_bytes_stored.max(1) as f64;
    let stats = vault.store().stats();
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "rp": rp,
            "engine": report.engine,
            "direct_io": report.direct_io,
            "packs_written": report.session.packs,
            "reduction_ratio": reduction,
            "elapsed_ms": report.elapsed.as_millis() as u64,
            "store_requests": stats.requests,
            "store_retries": stats.retries,
        }))?,
        OutputFormat::Human => {
            println!(
                "created {} ({} {} on {})",
                rp.id, rp.kind, rp.asset.name, rp.asset.host
            );
            if let Some(p) = &rp.parent {
                println!("  parent        {p}");
            }
            println!("  logical size  {}", bytes(rp.logical_size));
            println!("  bytes read    {}", bytes(rp.bytes_read));
            println!(
                "  new stored    {} ({} new chunks)",
                bytes(rp.new_bytes_stored),
                rp.new_chunks
            );
            if rp.new_bytes_stored == 0 {
                println!("  reduction     all data was already in the vault");
            } else {
                println!("  reduction     {reduction:.1}x (logical size / new bytes stored)");
            }
            println!(
                "  time          {:.2} s ({}, {} engine{})",
                report.elapsed.as_secs_f64(),
                rate(rp.logical_size, report.elapsed),
                report.engine,
                if report.direct_io { ", O_DIRECT" } else { "" }
            );
            print_store_stats(stats);
        }
    }
    Ok(())
}

/// Request and retry counts of remote stores (local vaults have nothing to say).
fn print_store_stats(stats: scalez::store::StoreStats) {
    if stats.requests > 0 || stats.retries > 0 {
        println!(
            "  store         {} requests, {} retried",
            stats.requests, stats.retries
        );
    }
}

fn restore(ctx: &Ctx, a: BlockRestoreArgs) -> Result<()> {
    let vault = ctx.open_vault()?;
    let rp = resolve_rp(&vault, &a.rp, a.asset.as_deref(), Some(RpKind::Disk))?;
    let bar = Bar::new(ctx.global.quiet);
    let opts = RestoreOptions {
        force: a.force,
        cancel: crate::cancel_token(),
        ..RestoreOptions::default()
    };
    let report = restore_block(&Arc::clone(&vault), &rp, &a.target, &opts, &bar)
        .with_context(|| format!("restore of {} to {} failed", rp.id, a.target.display()))?;
    bar.finish();
    let stats = vault.store().stats();
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "rp": rp.id,
            "store_requests": stats.requests,
            "store_retries": stats.retries,
            "target": report.target,
            "size": report.size,
            "bytes_written": report.bytes_written,
            "elapsed_ms": report.elapsed.as_millis() as u64,
        }))?,
        OutputFormat::Human => {
            println!("restored {} to {}", rp.id, report.target.display());
            println!("  size           {}", bytes(report.size));
            println!("  data written   {}", bytes(report.bytes_written));
            println!(
                "  time           {:.2} s ({})",
                report.elapsed.as_secs_f64(),
                rate(report.size, report.elapsed)
            );
            print_store_stats(stats);
        }
    }
    Ok(())
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectIoArg {
    /// O_DIRECT for block devices, page cache for image files
    Auto,
    /// O_DIRECT whenever the file system accepts it
    Always,
    /// Always read through the page cache
    Never,
}

#[derive(Subcommand, Debug)]
pub enum BlockCommand {
    /// Back up a block device or disk image into a new recovery point
    #[command(
        after_help = "The I/O engine is io_uring when the kernel allows it, else pread; \
set ELASTIO_IO_ENGINE=io_uring|pread to force one."
    )]
    Backup(BlockBackupArgs),
    /// Restore a disk recovery point to a file or block device
    Restore(BlockRestoreArgs),
}

#[derive(Args, Debug)]
pub struct BlockBackupArgs {
    /// Block device or image file to back up
    pub source: PathBuf,
    /// Tag the recovery point (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Record the asset under this name instead of the source's canonical path
    #[arg(long)]
    pub asset_name: Option<String>,
    /// Bypass the page cache when reading
    #[arg(long, value_enum, default_value_t = DirectIoArg::Auto)]
    pub direct_io: DirectIoArg,
}

#[derive(Args, Debug)]
pub struct BlockRestoreArgs {
    /// Recovery point id, or `latest` (the newest disk RP, of --asset if given)
    #[arg(long)]
    pub rp: String,
    /// With --rp latest: the asset whose newest RP to restore
    #[arg(long)]
    pub asset: Option<String>,
    /// Target file (created; zero chunks become holes) or block device
    pub target: PathBuf,
    /// Overwrite an existing target file or device
    #[arg(long)]
    pub force: bool,
}
