use crate::cli::AwsArgs;
use agent::ebs::EbsRestoreOptions;
use agent::ec2::{backup_instance, restore_instance, Ec2RestoreOptions};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use scalez::RpKind;
use serde_json::json;

use crate::cli::OutputFormat;
use crate::commands::ebs::{
    backup_json, connect, connect_here, options, print_backup_human, QuiesceArgs,
};
use crate::context::resolve_rp;
use crate::context::Ctx;
use crate::output::print_json;
use crate::output::{bytes, Bar};

pub fn run(ctx: &Ctx, cmd: Ec2Command) -> Result<()> {
    match cmd {
        Ec2Command::Backup(a) => backup(ctx, a),
        Ec2Command::Restore(a) => restore(ctx, a),
    }
}

fn backup(ctx: &Ctx, a: Ec2BackupArgs) -> Result<()> {
    let mut opts = options(&a.aws, &a.tags)?;
    opts.keep_snapshots = a.keep_snapshots;
    opts.quiesce = a.quiesce.hook()?;
    opts.verify_share = a.quiesce.verify_share()?;
    opts.full_read_on_mismatch =
        a.quiesce.on_mismatch == crate::commands::block::MismatchArg::FullRead;
    let vault = ctx.open_vault()?;
    let (instance_id, aws) = match (&a.instance_id, a.self_) {
        (Some(id), false) => (id.clone(), connect(ctx, &a.aws)?),
        (None, true) => {
            let (id, region) = agent::aws::imds_identity()?;
            let aws = if ctx.global.region.is_some() || std::env::var_os("AWS_REGION").is_some() {
                connect(ctx, &a.aws)?
            } else {
                connect_here(ctx, &a.aws, true)?
            };
            if aws.region != region {
                anyhow::bail!(
                    "this instance {id} runs in {region}, but the region given is {}",
                    aws.region
                );
            }
            (id, aws)
        }
        _ => anyhow::bail!("give --instance-id or --self (one of them)"),
    };
    let bar = Bar::new(ctx.global.quiet);
    let r = backup_instance(&vault, &aws, &instance_id, &opts, &bar)
        .with_context(|| format!("backup of EC2 instance {instance_id} failed"))?;
    bar.finish();
    let scan = crate::commands::iscan::AfterBackup::run(ctx, &vault, &r.rp.id, &a.scan)?;
    let printed = match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "iscan": scan.as_ref().map(|s| s.json()),
            "rp": r.rp,
            "volumes": r.volumes.iter().map(|(device, v)| {
                let mut j = backup_json(v);
                j["device"] = json!(device);
                j
            }).collect::<Vec<_>>(),
            "elapsed_ms": r.elapsed.as_millis() as u64,
        })),
        OutputFormat::Human => {
            println!(
                "created {} (instance {} on {}, {} volumes, {})",
                r.rp.id,
                r.rp.asset.name,
                r.rp.asset.host,
                r.volumes.len(),
                bytes(r.rp.logical_size)
            );
            for (device, v) in &r.volumes {
                println!("{device}:");
                print_backup_human(v);
            }
            println!("  total time    {:.2} s", r.elapsed.as_secs_f64());
            Ok(())
        }
    };
    printed?;
    match scan {
        Some(s) => s.finish(ctx),
        None => Ok(()),
    }
}

fn restore(ctx: &Ctx, a: Ec2RestoreArgs) -> Result<()> {
    let ebs = options(&a.aws, &[])?;
    let vault = ctx.open_vault()?;
    let rp = resolve_rp(&vault, &a.rp, a.asset.as_deref(), Some(RpKind::Instance))?;
    let aws = connect(ctx, &a.aws)?;
    let opts = Ec2RestoreOptions {
        ebs: EbsRestoreOptions {
            ebs,
            kms_key_id: ctx.global.kms_key_id.clone(),
            create_volume: None,
        },
        availability_zone: a.availability_zone,
        launch: a.launch,
    };
    let bar = Bar::new(ctx.global.quiet);
    let r = restore_instance(&vault, &aws, &rp, &opts, &bar)
        .with_context(|| format!("restore of instance RP {} failed", rp.id))?;
    bar.finish();
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "rp": rp.id,
            "instance_id": r.instance_id,
            "volumes": r.volumes.iter().map(|(device, old, v)| json!({
                "device": device,
                "original_volume_id": old,
                "snapshot_id": v.snapshot_id,
                "volume_id": v.volume_id,
                "blocks_written": v.blocks_written,
                "calls": v.calls,
            })).collect::<Vec<_>>(),
            "elapsed_ms": r.elapsed.as_millis() as u64,
        })),
        OutputFormat::Human => {
            println!("restored instance RP {} ({})", rp.id, rp.asset.name);
            for (device, old, v) in &r.volumes {
                println!(
                    "  {device:<12} {old} -> volume {} (snapshot {}, {} blocks)",
                    v.volume_id.as_deref().unwrap_or("-"),
                    v.snapshot_id,
                    v.blocks_written
                );
            }
            if let Some(i) = &r.instance_id {
                println!("  instance     {i} (running, volumes attached)");
            }
            println!("  time         {:.2} s", r.elapsed.as_secs_f64());
            Ok(())
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Ec2Command {
    /// Snapshot every attached EBS volume at once (CreateSnapshots) and back each one up
    #[command(
        after_help = "Creates one disk RP per volume (asset = the volume id, tags \
ec2:instance-id and ec2:device, incremental like `ebs backup`) and then an instance RP that \
records the instance type, AZ, image, tags and device names with the volume RPs.

Examples:
  elastio ec2 backup --instance-id i-0123456789abcdef0
  elastio ec2 backup --self --freeze /var/lib/db --pre-cmd 'psql -c CHECKPOINT'
  elastio ec2 backup --self --freeze / --freeze /data --skip-free

With --freeze, the file systems are frozen only while CreateSnapshots runs (milliseconds to a
second): a watchdog process thaws them after --freeze-timeout or as soon as elastio exits, even
if it is killed. With --skip-free, each frozen XFS or ext4 file system also reports its free
space while frozen (GETFSMAP), which is exactly the snapshot's; the blocks of its EBS volume
(found through the NVMe serial number, a partition through its offset) that are wholly free are
neither read nor stored, and restore as zeros. That question holds the freeze a little longer
(a quarter of --freeze-timeout, 2 s at most; a file system that has not answered by then is
read whole). The RPs are tagged ebs:free-skipped, and the next incremental also reads the blocks
they hold as zeros that are in use again."
    )]
    Backup(Ec2BackupArgs),
    /// Recreate the volumes of an instance RP (and with --launch, the instance)
    Restore(Ec2RestoreArgs),
}

#[derive(Args, Debug)]
pub struct Ec2BackupArgs {
    #[command(flatten)]
    pub scan: crate::commands::iscan::BackupScan,
    /// The instance to back up (i-...)
    #[arg(long, conflicts_with = "self_")]
    pub instance_id: Option<String>,
    /// Back up the instance this runs on (its id and region from the instance metadata
    /// service, IMDSv2)
    #[arg(long = "self")]
    pub self_: bool,
    #[command(flatten)]
    pub quiesce: QuiesceArgs,
    /// Tag the recovery points (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Keep the older snapshots this tool made of the volumes
    #[arg(long)]
    pub keep_snapshots: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Args, Debug)]
pub struct Ec2RestoreArgs {
    /// Instance recovery point id, or `latest` (of --asset, the instance id, if given)
    #[arg(long)]
    pub rp: String,
    /// With --rp latest: the instance id whose newest RP to restore
    #[arg(long)]
    pub asset: Option<String>,
    /// Create the volumes here instead of the instance's recorded AZ
    #[arg(long, value_name = "AZ")]
    pub availability_zone: Option<String>,
    /// Also launch an instance of the recorded type and image, with the restored volumes
    /// attached at the recorded device names
    #[arg(long)]
    pub launch: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
}
