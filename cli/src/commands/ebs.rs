use clap::{Args, Subcommand};
use std::time::Duration;

use agent::aws::{Aws, AwsConfig};
use agent::ebs::{
    backup_volume, import_snapshot, restore_to_snapshot, CreateVolume, EbsBackupReport, EbsOptions,
    EbsRestoreOptions,
};
use anyhow::{Context, Result};
use scalez::RpKind;
use serde_json::json;

use crate::cli::{AwsArgs, OutputFormat};
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

/// Like [`connect`], but on an instance (`on_instance`) without a region given, the region is
/// the instance's own (from its metadata service).
pub fn connect_here(ctx: &Ctx, a: &AwsArgs, on_instance: bool) -> Result<Aws> {
    if on_instance && ctx.global.region.is_none() && std::env::var_os("AWS_REGION").is_none() {
        let (_, region) = agent::aws::imds_identity()?;
        let cfg = AwsConfig {
            region: Some(region),
            endpoint_url: a.aws_endpoint_url.clone(),
            attempt_timeout: Duration::from_secs(a.request_timeout.max(1)),
        };
        return Ok(Aws::connect(&cfg)?);
    }
    connect(ctx, a)
}

/// What runs around the snapshot call: `--pre-cmd`, `--freeze`, `--post-cmd`.
#[derive(Args, Debug, Default)]
pub struct QuiesceArgs {
    /// Freeze this mounted file system (FIFREEZE) from just before the snapshot call until it
    /// returns, for an application-consistent snapshot (repeatable; needs root)
    #[arg(long = "freeze", value_name = "MOUNTPOINT")]
    pub freeze: Vec<std::path::PathBuf>,
    /// Longest a freeze may last: past it a watchdog thaws and the backup fails (the snapshot
    /// could postdate the thaw)
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub freeze_timeout: f64,
    /// With --freeze: ask each frozen file system (XFS, ext4) for its free space while it is
    /// frozen (FS_IOC_GETFSMAP), and neither read nor store the 512 KiB blocks of the snapshot
    /// that are wholly free; they restore as zeros
    #[arg(long, requires = "freeze")]
    pub skip_free: bool,
    /// Run this (with sh -c) before the freeze, e.g. to flush a database; its failure aborts
    /// the backup
    #[arg(long, value_name = "COMMAND")]
    pub pre_cmd: Option<String>,
    /// Run this after the thaw (also when --pre-cmd failed, to undo what it did)
    #[arg(long, value_name = "COMMAND")]
    pub post_cmd: Option<String>,
    /// Share of the blocks an incremental takes from the previous snapshot unread (EBS lists
    /// them as unchanged) that are read anyway and compared, in percent
    #[arg(long, value_name = "PERCENT", default_value_t = 1.0)]
    pub verify_share: f64,
    /// What a verified block that differs from the parent does
    #[arg(long, value_enum, default_value_t = crate::commands::block::MismatchArg::Fail)]
    pub on_mismatch: crate::commands::block::MismatchArg,
}

impl QuiesceArgs {
    /// --verify-share as a fraction.
    pub fn verify_share(&self) -> Result<f64> {
        if !(0.0..=100.0).contains(&self.verify_share) {
            anyhow::bail!(
                "--verify-share {} is not a percentage from 0 to 100",
                self.verify_share
            );
        }
        Ok(self.verify_share / 100.0)
    }

    pub fn hook(&self) -> Result<Option<agent::ebs::Hook>> {
        if self.freeze.is_empty() && self.pre_cmd.is_none() && self.post_cmd.is_none() {
            return Ok(None);
        }
        if !(self.freeze_timeout > 0.0 && self.freeze_timeout <= 3600.0) {
            anyhow::bail!("--freeze-timeout must be between 0 and 3600 seconds");
        }
        let mut q = agent::freeze::Quiesce::new(
            self.pre_cmd.clone(),
            self.post_cmd.clone(),
            self.freeze.clone(),
            Duration::from_secs_f64(self.freeze_timeout),
        )?;
        q.skip_free = self.skip_free;
        Ok(Some(agent::ebs::Hook(std::sync::Arc::new(q))))
    }
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
    opts.quiesce = a.quiesce.hook()?;
    opts.verify_share = a.quiesce.verify_share()?;
    opts.full_read_on_mismatch =
        a.quiesce.on_mismatch == crate::commands::block::MismatchArg::FullRead;
    let volume_id = match (&a.volume_id, &a.device) {
        (Some(v), None) => v.clone(),
        (None, Some(d)) => agent::aws::volume_of_device(d, &agent::aws::sys_root())?,
        _ => anyhow::bail!("give --volume-id or --device (one of them)"),
    };
    let vault = ctx.open_vault()?;
    let aws = connect_here(ctx, &a.aws, a.device.is_some())?;
    let bar = Bar::new(ctx.global.quiet);
    let report = backup_volume(&vault, &aws, &volume_id, &opts, &bar)
        .with_context(|| format!("backup of EBS volume {volume_id} failed"))?;
    bar.finish();
    let scan = crate::commands::iscan::AfterBackup::run(ctx, &vault, &report.rp.id, &a.scan)?;
    match (&scan, ctx.global.output_format) {
        (Some(s), OutputFormat::Json) => {
            let mut j = backup_json(&report);
            j["iscan"] = s.json();
            print_json(&j)?;
        }
        _ => print_backup(ctx, &report)?,
    }
    match scan {
        Some(s) => s.finish(ctx),
        None => Ok(()),
    }
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
        "blocks_verified": r.blocks_verified,
        "blocks_free": r.blocks_free,
        "fell_back_to_full_read": r.fell_back,
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
            "  read          incremental: {} changed blocks since {b}, {} read, {} unchanged \
             ones verified",
            r.blocks_listed, r.blocks_read, r.blocks_verified
        ),
        None => println!(
            "  read          full: {} blocks listed, {} read",
            r.blocks_listed, r.blocks_read
        ),
    }
    if r.blocks_free > 0 {
        println!(
            "  skipped       {} listed blocks free in the frozen file systems ({}), not read",
            r.blocks_free,
            bytes(r.blocks_free * agent::ebs::EBS_BLOCK as u64)
        );
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

#[derive(Subcommand, Debug)]
pub enum EbsCommand {
    /// Snapshot a volume and back the snapshot up (incrementally when the last one still exists)
    #[command(
        after_help = "The snapshot is tagged elastio:created-by, elastio:volume-id and \
elastio:vault. After the recovery point is committed, older snapshots this tool made of the \
volume for this vault are deleted (--keep-snapshots keeps them); the newest stays so the next \
backup only reads the blocks that changed (ListChangedBlocks). Every block is checked against \
its SHA-256 checksum. The RP records the snapshot as tag ebs:snapshot-id.

Examples:
  elastio ebs backup --volume-id vol-0123456789abcdef0
  elastio ebs backup --device /dev/nvme1n1 --freeze /data --skip-free

On the instance itself, --freeze holds the file systems still only while CreateSnapshot runs;
with --skip-free they also report their free space at that moment (GETFSMAP), and the blocks
of the snapshot that are wholly free are neither read nor stored."
    )]
    Backup(EbsBackupArgs),
    /// Back up an existing snapshot (incremental against the asset's previous RP when EBS
    /// relates the two snapshots)
    ImportSnapshot(EbsImportArgs),
    /// Write a disk recovery point to a new EBS snapshot, and optionally a volume
    Restore(EbsRestoreArgs),
}

#[derive(Args, Debug)]
pub struct EbsBackupArgs {
    #[command(flatten)]
    pub scan: crate::commands::iscan::BackupScan,
    /// The volume to back up (vol-...)
    #[arg(long, conflicts_with = "device")]
    pub volume_id: Option<String>,
    /// On an EC2 (Nitro) instance: back up the EBS volume behind this NVMe device of the
    /// instance itself (its id from the device's serial number; the region from the instance)
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub quiesce: QuiesceArgs,
    /// Tag the recovery point (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Keep the older snapshots this tool made of the volume
    #[arg(long)]
    pub keep_snapshots: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Args, Debug)]
pub struct EbsImportArgs {
    /// The snapshot to back up (snap-...)
    #[arg(long)]
    pub snapshot_id: String,
    /// Tag the recovery point (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Args, Debug)]
pub struct EbsRestoreArgs {
    /// Recovery point id, or `latest` (the newest disk RP, of --asset if given)
    #[arg(long)]
    pub rp: String,
    /// With --rp latest: the asset (volume id) whose newest RP to restore
    #[arg(long)]
    pub asset: Option<String>,
    /// Also create a volume from the new snapshot
    #[arg(long, requires = "availability_zone")]
    pub create_volume: bool,
    /// Availability zone of the new volume
    #[arg(long, value_name = "AZ")]
    pub availability_zone: Option<String>,
    /// Type of the new volume (gp3, gp2, io2, st1, ...; default: the EC2 default)
    #[arg(long, value_name = "TYPE")]
    pub volume_type: Option<String>,
    #[command(flatten)]
    pub aws: AwsArgs,
}
