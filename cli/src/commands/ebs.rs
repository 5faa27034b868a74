use std::time::Duration;

use agent::aws::{Aws, AwsConfig};
use agent::ebs::{
    backup_volume, import_snapshot, restore_to_snapshot, CreateVolume, EbsBackupReport, EbsOptions,
    EbsRestoreOptions,
};
use anyhow::{Context, Result};
use scalez::RpKind;
use serde_json::json;

use crate::cli::{AwsArgs, EbsBackupArgs, EbsCommand, EbsImportArgs, EbsRestoreArgs, OutputFormat};
use crate::context::resolve_rp;
use crate::context::Ctx;
use crate::output::print_json;
use crate::output::{bytes, rate, Bar};

pub fn run(ctx: &Ctx, cmd: EbsCommand) -> Result<()> {
    match cmd {
        EbsCommand::Backup(a) => backup(ctx, a),
        EbsCommand::ImportSnapshot(a) => import(ctx, a),
        EbsCommand::Restore(a) => restore(ctx, a),
    }
}

pub fn connect(ctx: &Ctx, a: &AwsArgs) -> Result<Aws> {
    let cfg = AwsConfig {
        region: ctx.global.region.clone(),
        endpoint_url: a.aws_endpoint_url.clone(),
        attempt_timeout: Duration::from_secs(a.request_timeout.max(1)),
    };
    Ok(Aws::connect(&cfg)?)
}

pub fn options(a: &AwsArgs, tags: &[String]) -> Result<EbsOptions> {
    if !a.max_rate.is_finite() || a.max_rate <= 0.0 {
        anyhow::bail!("--max-rate must be a positive number of requests per second");
    }
    Ok(EbsOptions {
        tags: scalez::catalog::parse_tags(tags.iter().map(String::as_str))?,
        concurrency: a.concurrency as usize,
        rate: a.max_rate,
        poll: Duration::from_millis(a.poll_ms.max(10)),
        page_size: a.page_size,
        cancel: crate::cancel_token(),
        ..EbsOptions::default()
    })
}

fn backup(ctx: &Ctx, a: EbsBackupArgs) -> Result<()> {
    let mut opts = options(&a.aws, &a.tags)?;
    opts.keep_snapshots = a.keep_snapshots;
    let vault = ctx.open_vault()?;
    let aws = connect(ctx, &a.aws)?;
    let bar = Bar::new(ctx.global.quiet);
    let report = backup_volume(&vault, &aws, &a.volume_id, &opts, &bar)
        .with_context(|| format!("backup of EBS volume {} failed", a.volume_id))?;
    bar.finish();
    print_backup(ctx, &report)
}

fn import(ctx: &Ctx, a: EbsImportArgs) -> Result<()> {
    let opts = options(&a.aws, &a.tags)?;
    let vault = ctx.open_vault()?;
    let aws = connect(ctx, &a.aws)?;
    let bar = Bar::new(ctx.global.quiet);
    let report = import_snapshot(&vault, &aws, &a.snapshot_id, &opts, &bar)
        .with_context(|| format!("import of EBS snapshot {} failed", a.snapshot_id))?;
    bar.finish();
    print_backup(ctx, &report)
}

fn print_backup(ctx: &Ctx, r: &EbsBackupReport) -> Result<()> {
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&backup_json(r)),
        OutputFormat::Human => {
            print_backup_human(r);
            Ok(())
        }
    }
}

pub fn backup_json(r: &EbsBackupReport) -> serde_json::Value {
    let read_s = r.read_elapsed.as_secs_f64().max(1e-9);
    json!({
        "rp": r.rp,
        "snapshot_id": r.snapshot_id,
        "base_snapshot_id": r.base_snapshot,
        "incremental": r.base_snapshot.is_some(),
        "blocks_listed": r.blocks_listed,
        "blocks_read": r.blocks_read,
        "calls": r.calls,
        "deleted_snapshots": r.deleted_snapshots,
        "snapshot_wait_ms": r.snapshot_wait.as_millis() as u64,
        "read_ms": r.read_elapsed.as_millis() as u64,
        "block_requests_per_s": r.calls.block_requests as f64 / read_s,
        "elapsed_ms": r.elapsed.as_millis() as u64,
    })
}

pub fn print_backup_human(r: &EbsBackupReport) {
    let rp = &r.rp;
    let read_s = r.read_elapsed.as_secs_f64().max(1e-9);
    println!(
        "created {} (disk {} on {}) from snapshot {}",
        rp.id, rp.asset.name, rp.asset.host, r.snapshot_id
    );
    if let Some(p) = &rp.parent {
        println!("  parent        {p}");
    }
    match &r.base_snapshot {
        Some(b) => println!(
            "  read          incremental: {} changed blocks since {b}, {} read",
            r.blocks_listed, r.blocks_read
        ),
        None => println!(
            "  read          full: {} blocks listed, {} read",
            r.blocks_listed, r.blocks_read
        ),
    }
    println!("  volume size   {}", bytes(rp.logical_size));
    println!(
        "  new stored    {} ({} new chunks)",
        bytes(rp.new_bytes_stored),
        rp.new_chunks
    );
    println!(
        "  requests      {} block, {} other; {} retried ({} throttled, {} bad checksums)",
        r.calls.block_requests,
        r.calls.other_requests,
        r.calls.retries,
        r.calls.throttled,
        r.calls.checksum_mismatches
    );
    println!(
        "  time          {:.2} s (snapshot {:.2} s, read {:.2} s: {}, {:.0} blocks/s)",
        r.elapsed.as_secs_f64(),
        r.snapshot_wait.as_secs_f64(),
        r.read_elapsed.as_secs_f64(),
        rate(rp.bytes_read, r.read_elapsed),
        r.blocks_read as f64 / read_s
    );
    if !r.deleted_snapshots.is_empty() {
        println!(
            "  deleted       older snapshots {}",
            r.deleted_snapshots.join(", ")
        );
    }
}

fn restore(ctx: &Ctx, a: EbsRestoreArgs) -> Result<()> {
    let ebs = options(&a.aws, &[])?;
    let vault = ctx.open_vault()?;
    let rp = resolve_rp(&vault, &a.rp, a.asset.as_deref(), Some(RpKind::Disk))?;
    let aws = connect(ctx, &a.aws)?;
    let opts = EbsRestoreOptions {
        ebs,
        kms_key_id: ctx.global.kms_key_id.clone(),
        create_volume: match (a.create_volume, a.availability_zone) {
            (true, Some(az)) => Some(CreateVolume {
                availability_zone: az,
                volume_type: a.volume_type,
            }),
            _ => None,
        },
    };
    let bar = Bar::new(ctx.global.quiet);
    let r = restore_to_snapshot(&vault, &aws, &rp, &opts, &bar)
        .with_context(|| format!("restore of {} to an EBS snapshot failed", rp.id))?;
    bar.finish();
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "rp": rp.id,
            "snapshot_id": r.snapshot_id,
            "volume_id": r.volume_id,
            "volume_size_gib": r.size_gib,
            "blocks_written": r.blocks_written,
            "calls": r.calls,
            "elapsed_ms": r.elapsed.as_millis() as u64,
        })),
        OutputFormat::Human => {
            println!("restored {} to snapshot {}", rp.id, r.snapshot_id);
            if let Some(v) = &r.volume_id {
                println!("  volume        {v}");
            }
            println!("  size          {} GiB", r.size_gib);
            println!(
                "  blocks        {} written ({}; zero blocks skipped)",
                r.blocks_written,
                bytes(r.blocks_written * agent::ebs::EBS_BLOCK as u64)
            );
            println!(
                "  requests      {} block, {} other; {} retried ({} throttled)",
                r.calls.block_requests, r.calls.other_requests, r.calls.retries, r.calls.throttled
            );
            println!(
                "  time          {:.2} s ({})",
                r.elapsed.as_secs_f64(),
                rate(rp.logical_size, r.elapsed)
            );
            Ok(())
        }
    }
}
