use clap::{Args, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agent::block::engine::IoEngine;
use agent::block::engine::SourcePlan;
use agent::block::ranges::{parse_changed_map, RangeSet, MAX_RANGES};
use agent::block::DirectIo;
use agent::block::RemoteSource;
use agent::pipeline::{
    backup_block, backup_remote, restore_block, BackupOptions, OnMismatch, RestoreOptions,
};
use anyhow::{Context, Result};
use scalez::RpKind;
use serde_json::json;

use super::nbd_source;
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
    if !(0.0..=100.0).contains(&a.verify_share) {
        anyhow::bail!(
            "--verify-share {} is not a percentage from 0 to 100",
            a.verify_share
        );
    }
    let mut free_lines = Vec::new();
    let mut held = None;
    let mut pull = None;
    let mut tags = tags;
    let mut asset_name = a.asset_name.clone();
    let source = match (&a.source, &a.qmp) {
        (Some(s), None) => s.to_string_lossy().into_owned(),
        (None, Some(_)) => String::new(),
        _ => anyhow::bail!("give a source to back up, or --qmp SOCKET --node NODE (not both)"),
    };
    // Before any QEMU object exists: a Ctrl-C from here on cancels (and cleans up), it does not
    // end the process on the spot.
    let cancel = crate::cancel_token();
    // With --qmp: the asset, its latest RP, and the bitmap generation that RP was tagged with.
    let pulled = match (&a.qmp, &a.node) {
        (Some(qmp), Some(node)) => {
            let name = asset_name
                .get_or_insert_with(|| format!("qemu:{}:{node}", qmp.display()))
                .clone();
            let latest = vault.latest_rp(
                RpKind::Disk,
                &scalez::Asset {
                    name,
                    host: agent::pipeline::hostname(),
                },
            )?;
            let current = latest
                .as_ref()
                .and_then(|rp| rp.tags.get(RP_TAG_BITMAP).cloned());
            Some((qmp.clone(), node.clone(), latest, current))
        }
        (Some(_), None) => anyhow::bail!("--qmp needs --node NODE (the block node to back up)"),
        _ => None,
    };
    let pull_base = std::env::var_os("ELASTIO_PULL_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    if a.qmp_cleanup {
        let Some((qmp, node, _, current)) = &pulled else {
            anyhow::bail!("--qmp-cleanup needs --qmp SOCKET --node NODE");
        };
        agent::qemu::clean_up(
            qmp,
            node,
            a.dirty_bitmap.as_deref(),
            current.as_deref(),
            &pull_base,
        )
        .with_context(|| format!("cleaning up after a pull-mode backup of {node}"))?;
        if ctx.global.output_format == OutputFormat::Json {
            print_json(&json!({"cleaned_up": node}))?;
        } else {
            println!("removed what a pull-mode backup of {node} left behind (if anything)");
        }
        return Ok(());
    }
    let (plan, nbd) = if let Some((qmp, node, latest, current)) = &pulled {
        let p = agent::qemu::Pull::begin(
            qmp,
            node,
            a.dirty_bitmap.as_deref(),
            current.as_deref(),
            &pull_base,
        )
        .with_context(|| format!("setting up the pull-mode backup of {node}"))?;
        // An incremental only from the RP the exported bitmap generation counts from, and only
        // while the disk has that RP's size (a resized disk is read whole).
        let parent = latest
            .as_ref()
            .filter(|_| p.incremental)
            .filter(|rp| rp.disk.as_ref().is_some_and(|m| m.size == p.size))
            .map(|rp| rp.id.to_string());
        if p.incremental && parent.is_none() {
            eprintln!("note: {node} changed size since its last backup: a full read");
        }
        if let Some(n) = &p.new_bitmap {
            tags.insert(RP_TAG_BITMAP.into(), n.clone());
        }
        let bitmap = current.as_deref().filter(|_| parent.is_some());
        let uri = p.uri.clone();
        pull = Some(p);
        let (plan, nbd) = nbd_plan(&a, &uri, bitmap, parent, &mut free_lines)?;
        (plan, Some((uri, nbd)))
    } else if nbd_source::is_nbd_uri(&source) {
        let (plan, nbd) = nbd_plan(
            &a,
            &source,
            a.dirty_bitmap.as_deref(),
            a.parent.clone(),
            &mut free_lines,
        )?;
        (plan, Some((source.clone(), nbd)))
    } else {
        if a.dirty_bitmap.is_some() {
            anyhow::bail!("--dirty-bitmap needs an NBD source (nbd://… or nbd+unix://…) or --qmp");
        }
        (source_plan(&a, &mut free_lines, &mut held)?, None)
    };
    let opts = BackupOptions {
        tags,
        engine,
        direct: match a.direct_io {
            DirectIoArg::Auto => DirectIo::Auto,
            DirectIoArg::Always => DirectIo::Always,
            DirectIoArg::Never => DirectIo::Never,
        },
        asset_name,
        plan,
        on_mismatch: match a.on_mismatch {
            MismatchArg::Fail => OnMismatch::Fail,
            MismatchArg::FullRead => OnMismatch::FullRead,
        },
        cancel,
        ..BackupOptions::default()
    };
    let bar = Bar::new(ctx.global.quiet);
    let report = match &nbd {
        Some((uri, remote)) => backup_remote(&vault, uri, remote.clone(), &opts, &bar),
        None => backup_block(&vault, Path::new(&source), &opts, &bar),
    };
    drop(nbd);
    drop(held);
    if let Some(p) = pull {
        // The bitmap moves on only when the RP is committed.
        let torn_down = p.finish(report.is_ok());
        if let (Ok(_), Err(e)) = (&report, torn_down) {
            eprintln!(
                "warning: the backup committed, but tearing down the pull-mode view failed: {e}"
            );
        }
    }
    let what = opts.asset_name.as_deref().unwrap_or(&source);
    let report = report.with_context(|| format!("backup of {what} failed"))?;
    bar.finish();
    let rp = &report.rp;
    let scan = crate::commands::iscan::AfterBackup::run(ctx, &vault, &rp.id, &a.scan)?;
    let reduction = rp.logical_size as f64 / rp.new_bytes_stored.max(1) as f64;
    let stats = vault.store().stats();
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "iscan": scan.as_ref().map(|s| s.json()),
            "rp": rp,
            "engine": report.engine,
            "direct_io": report.direct_io,
            "packs_written": report.session.packs,
            "reduction_ratio": reduction,
            "figures": report.figures,
            "free_space": free_lines,
            "fell_back_to_full_read": report.fell_back,
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
            let f = &report.figures;
            for l in &free_lines {
                println!("  free space    {l}");
            }
            if f.free_skipped > 0 {
                println!(
                    "  free skipped  {} (file-system free space, not read)",
                    bytes(f.free_skipped)
                );
            }
            if f.unchanged_kept > 0 {
                println!(
                    "  unchanged     {} kept from the parent, {} of it re-read and verified",
                    bytes(f.unchanged_kept),
                    bytes(f.unchanged_verified)
                );
            }
            if let Some(why) = &report.fell_back {
                println!("  full read     {why}");
            }
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
    match scan {
        Some(s) => s.finish(ctx),
        None => Ok(()),
    }
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

const BACKUP_HELP: &str = "\
Examples:
  elastio block backup /dev/nvme1n1
  elastio block backup disk.img --tag env=prod
  elastio block backup disk.img --skip-free                    # not the file systems' free space
  elastio block backup disk.img --changed-map changed.txt      # read only what changed
  elastio block backup nbd+unix:///vm0?socket=/run/qsd.sock --dirty-bitmap b0 --parent RP
  elastio block backup --qmp /run/qsd-qmp.sock --node disk0 --dirty-bitmap elastio  # pull mode

Changed maps (--changed-map): a text file of the byte ranges that may have changed since the
asset's latest recovery point, one `START LENGTH` per line (decimal or 0x-hex), in any order;
`# comments` and blank lines are ignored. A `parent RP-ID` line (or --parent) names the
recovery point the changes count from, which must be the asset's latest. An optional `unit
BYTES` line before the ranges (a power of two) makes both numbers count units, so thin_delta
blocks or bitmap clusters need no arithmetic:
    parent rp-01m80mb7eb9rts308j4hc4b1xn
    unit 65536
    0 1
    17 4
Chunks outside the ranges are taken from the parent unread; --verify-share of them (1 % by
default) is read anyway and compared, and a difference fails the backup naming the range (or,
with --on-mismatch full-read, starts it over as a full read).

The I/O engine is io_uring when the kernel allows it, else pread; set
ELASTIO_IO_ENGINE=io_uring|pread to force one.";

#[derive(Subcommand, Debug)]
pub enum BlockCommand {
    /// Back up a block device or disk image into a new recovery point
    #[command(
        after_help = BACKUP_HELP
    )]
    Backup(BlockBackupArgs),
    /// Restore a disk recovery point to a file or block device
    Restore(BlockRestoreArgs),
}

#[derive(Args, Debug)]
pub struct BlockBackupArgs {
    #[command(flatten)]
    pub scan: crate::commands::iscan::BackupScan,
    /// Block device, image file, or NBD export (nbd://HOST:PORT/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH) to back up; none with --qmp
    pub source: Option<PathBuf>,
    /// Back up block node --node of the QEMU (or qemu-storage-daemon) listening for QMP on this
    /// socket, from a point-in-time view it makes and removes (pull mode, as libvirt); with
    /// --dirty-bitmap, QEMU tracks the changes between backups in that persistent bitmap. The
    /// view's overlay holds what the guest overwrites during the backup: it lives under
    /// $ELASTIO_PULL_DIR (default /var/tmp), which needs room for it (QEMU before the
    /// `on-cbw-error` option of blockdev-backup fails guest writes when the overlay cannot grow)
    #[arg(long, value_name = "SOCKET", requires = "node")]
    pub qmp: Option<PathBuf>,
    /// With --qmp: the block node to back up (`node-name`, as `query-named-block-nodes` lists)
    #[arg(long, value_name = "NODE", requires = "qmp")]
    pub node: Option<String>,
    /// With --qmp --node (and --dirty-bitmap): only remove what a killed pull-mode backup left
    /// in QEMU (its export, overlay and job; the bitmap's new changes merged back), back nothing
    /// up. The next backup does this by itself first
    #[arg(long, requires = "qmp")]
    pub qmp_cleanup: bool,
    /// Tag the recovery point (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Record the asset under this name instead of the source's canonical path
    #[arg(long)]
    pub asset_name: Option<String>,
    /// Bypass the page cache when reading
    #[arg(long, value_enum, default_value_t = DirectIoArg::Auto)]
    pub direct_io: DirectIoArg,
    /// Neither read nor store the free space of the image's ext2/3/4 and XFS file systems (from
    /// their block bitmaps and free-space trees); it restores as zeros. Refused for a block
    /// device in use (mounted), whose on-disk maps are not current
    #[arg(long)]
    pub skip_free: bool,
    /// Read only the byte ranges this file lists as changed since the asset's latest recovery
    /// point; take the rest from it. Format: `START LENGTH` per line, optional `unit BYTES`
    /// first (see the changed-map section of `elastio block backup --help`)
    #[arg(long, value_name = "FILE")]
    pub changed_map: Option<PathBuf>,
    /// The recovery point the changed map or dirty bitmap counts from (instead of a `parent`
    /// line in a map); it must be the asset's latest
    #[arg(long, value_name = "RP")]
    pub parent: Option<String>,
    /// With an NBD source: read only what this QEMU dirty bitmap (exported as meta context
    /// `qemu:dirty-bitmap:NAME`) marks changed since --parent. With --qmp: the persistent
    /// bitmap elastio keeps (made on the first run) to read only what changed since its last RP
    #[arg(long, value_name = "NAME")]
    pub dirty_bitmap: Option<String>,
    /// Share of the chunks a changed map calls unchanged that are read anyway and compared with
    /// the parent, in percent
    #[arg(long, value_name = "PERCENT", default_value_t = 1.0)]
    pub verify_share: f64,
    /// What a verified chunk that differs from the parent does
    #[arg(long, value_enum, default_value_t = MismatchArg::Fail)]
    pub on_mismatch: MismatchArg,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MismatchArg {
    /// Fail the backup, naming the range that differs
    #[default]
    Fail,
    /// Start over with a full read of the source
    FullRead,
}

/// The read plan of a block backup from its flags; what free space was found goes to
/// `free_lines`.
/// `held`: with --skip-free, the source opened exclusively (a block device cannot be mounted
/// while it is open), to keep until the backup ends.
fn source_plan(
    a: &BlockBackupArgs,
    free_lines: &mut Vec<String>,
    held: &mut Option<std::fs::File>,
) -> Result<SourcePlan> {
    if !(0.0..=100.0).contains(&a.verify_share) {
        anyhow::bail!(
            "--verify-share {} is not a percentage from 0 to 100",
            a.verify_share
        );
    }
    let mut plan = SourcePlan {
        verify_share: a.verify_share / 100.0,
        ..SourcePlan::default()
    };
    if let Some(path) = &a.changed_map {
        let source = a
            .source
            .as_deref()
            .context("a changed map needs a source")?;
        let size = agent::block::BlockSource::open(source, DirectIo::Never)?.size;
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open changed map {}", path.display()))?;
        let map = parse_changed_map(std::io::BufReader::new(file), size, MAX_RANGES)
            .with_context(|| format!("changed map {}", path.display()))?;
        plan.changed_since = match (&a.parent, map.parent) {
            (Some(flag), Some(line)) if *flag != line => anyhow::bail!(
                "--parent {flag} but changed map {} names parent {line}",
                path.display()
            ),
            (flag, line) => flag.clone().or(line),
        };
        plan.changed = Some(map.ranges);
    }
    if a.skip_free {
        let source = a.source.as_deref().context("--skip-free needs a source")?;
        let (free, lines, claim) = free_space(source)?;
        plan.free = free;
        free_lines.extend(lines);
        *held = Some(claim);
    }
    Ok(plan)
}

/// The read plan of a backup of NBD export `uri`, and the connection to read it through: zeros
/// from `base:allocation`, free space with --skip-free, changes from --dirty-bitmap.
fn nbd_plan(
    a: &BlockBackupArgs,
    uri: &str,
    bitmap: Option<&str>,
    parent: Option<String>,
    free_lines: &mut Vec<String>,
) -> Result<(SourcePlan, Arc<nbd_source::NbdSource>)> {
    if a.changed_map.is_some() {
        anyhow::bail!("--changed-map is for files and devices; an NBD source takes --dirty-bitmap");
    }
    let bitmap_context = bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
    let mut contexts = vec![mount::nbd::proto::BASE_ALLOCATION];
    contexts.extend(bitmap_context.as_deref());
    let mut client = nbd_source::connect(uri, &contexts)?;
    let mut plan = SourcePlan {
        verify_share: a.verify_share / 100.0,
        ..SourcePlan::default()
    };
    let zeros = nbd_source::zero_ranges(&mut client)?;
    if let Some(bitmap) = bitmap {
        if parent.is_none() {
            anyhow::bail!(
                "--dirty-bitmap {bitmap}: name the recovery point the bitmap counts changes \
                 from with --parent (it must be the asset's latest)"
            );
        }
        plan.changed = Some(nbd_source::dirty_ranges(&mut client, bitmap)?);
        plan.changed_since = parent;
    }
    let source = Arc::new(nbd_source::NbdSource::new(client));
    let mut free = zeros.ranges().to_vec();
    if a.skip_free {
        let dev = nbd_source::ReadAtRemote(&source);
        let found = mount::usage::free_space(&dev, RemoteSource::size(&*source), MAX_FREE_RANGES)
            .with_context(|| format!("cannot read the partitions of {uri}"))?;
        free.extend(found.ranges);
        free_lines.extend(found.lines);
    }
    plan.free = RangeSet::from_unsorted(free);
    Ok((plan, source))
}

/// The tag of RPs made with --qmp --dirty-bitmap: the bitmap that counts changes since them.
const RP_TAG_BITMAP: &str = "qemu:dirty-bitmap";

/// Most free ranges a backup skips (16 bytes each); past that the smallest are read instead.
const MAX_FREE_RANGES: usize = 1 << 20;

/// The free space of the file systems on `source`, a line per place saying what was found, and
/// the source opened exclusively.
fn free_space(source: &std::path::Path) -> Result<(RangeSet, Vec<String>, std::fs::File)> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let is_device = std::fs::metadata(source)
        .with_context(|| format!("cannot read {}", source.display()))?
        .file_type()
        .is_block_device();
    // O_EXCL on a block device fails with EBUSY while it is mounted (or otherwise held): a
    // live file system's on-disk free-space maps are not current, and trusting them loses data.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(if is_device { libc::O_EXCL } else { 0 })
        .open(source)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => anyhow::anyhow!(
                "--skip-free: {} is in use (mounted?): its file systems' free-space maps on \
                 disk are not current; back up a snapshot of it, or leave out --skip-free",
                source.display()
            ),
            _ => anyhow::Error::new(e).context(format!("cannot open {}", source.display())),
        })?;
    if !is_device {
        if let Some(dev) = loop_device_of(source) {
            anyhow::bail!(
                "--skip-free: {} is attached to {dev}, whose file systems may be in use: its \
                 free-space maps on disk are not current; detach it, or leave out --skip-free",
                source.display()
            );
        }
    }
    let size = agent::block::BlockSource::open(source, DirectIo::Never)?.size;
    let found = mount::usage::free_space(&file, size, MAX_FREE_RANGES)
        .with_context(|| format!("cannot read the partitions of {}", source.display()))?;
    Ok((RangeSet::from_unsorted(found.ranges), found.lines, file))
}

/// The loop device an image file is attached to, if any (from /sys/block/loop*/loop/backing_file).
fn loop_device_of(image: &std::path::Path) -> Option<String> {
    let image = std::fs::canonicalize(image).ok()?;
    let entries = std::fs::read_dir("/sys/block").ok()?;
    entries.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
        let backing = backing
            .trim_end_matches('\n')
            .trim_end_matches(" (deleted)");
        (std::path::Path::new(backing) == image).then(|| format!("/dev/{name}"))
    })
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
