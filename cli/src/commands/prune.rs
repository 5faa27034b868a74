use crate::cli::parse_percent;
use clap::Args;
use std::time::Duration;

use anyhow::Result;
use scalez::prune::{prune, PruneOptions};
use scalez::retention::{AssetFilter, Retention};

use crate::cli::OutputFormat;
use crate::context::Ctx;
use crate::output::print_json;
use crate::output::{bytes, table};

pub fn run(ctx: &Ctx, a: PruneArgs) -> Result<()> {
    let keep_tags = scalez::catalog::parse_tags(a.keep_tags.iter().map(String::as_str))?
        .into_iter()
        .collect();
    let opts = PruneOptions {
        retention: Retention {
            keep_last: a.keep_last,
            keep_hourly: a.keep_hourly,
            keep_daily: a.keep_daily,
            keep_weekly: a.keep_weekly,
            keep_monthly: a.keep_monthly,
            keep_yearly: a.keep_yearly,
            keep_tags,
        },
        asset: match (a.asset, a.asset_glob) {
            (Some(name), _) => Some(AssetFilter::Exact(name)),
            (None, Some(pattern)) => Some(AssetFilter::glob(&pattern)?),
            (None, None) => None,
        },
        allow_empty: a.allow_empty,
        dry_run: a.dry_run,
        repack_below: a.repack_below,
        max_unused: a.max_unused,
        max_wait: a
            .max_wait
            .map(Duration::from_secs)
            .unwrap_or(PruneOptions::default().max_wait),
    };
    let vault = ctx.open_vault()?;
    let quiet = ctx.global.quiet || ctx.global.output_format == OutputFormat::Json;
    let r = prune(&vault, &opts, &|stage| {
        if !quiet {
            eprintln!("{stage}");
        }
    })?;
    print(ctx, &opts, &r)?;
    // Unextended locks put live data at risk: a failure the caller must see.
    match &r.lock {
        Some(l) if l.error_count > 0 => anyhow::bail!(
            "object lock upkeep failed on {} objects (listed above); their locks may run out",
            l.error_count
        ),
        _ if r.lock.as_ref().is_some_and(|l| !l.tampered.is_empty()) => {
            anyhow::bail!("objects of this vault were overwritten; nothing was deleted (see above)")
        }
        _ => Ok(()),
    }
}

fn print(ctx: &Ctx, opts: &PruneOptions, r: &scalez::prune::PruneReport) -> Result<()> {
    match ctx.global.output_format {
        OutputFormat::Json => print_json(r),
        OutputFormat::Human => {
            let verb = if r.dry_run { "would delete" } else { "deleted" };
            let rows: Vec<Vec<String>> = r
                .decisions
                .iter()
                .map(|d| {
                    vec![
                        if d.keep { "keep" } else { "delete" }.to_string(),
                        d.rp.clone(),
                        d.kind.clone(),
                        d.asset.clone(),
                        d.created.clone(),
                        d.reasons.join(", "),
                    ]
                })
                .collect();
            if !opts.retention.is_empty() {
                table(&["", "RP", "TYPE", "ASSET", "CREATED", "WHY"], &rows);
            }
            println!("{verb} {} recovery points", r.rps_deleted);
            println!(
                "vault had {} packs ({}); {} unreferenced",
                r.packs_before,
                bytes(r.bytes_before),
                bytes(r.reclaimable_bytes)
            );
            println!(
                "{verb} {} packs ({}); {} repacked ({} of live data copied)",
                r.packs_deleted,
                bytes(r.bytes_deleted),
                r.packs_repacked,
                bytes(r.bytes_copied)
            );
            if r.packs_spared > 0 {
                println!(
                    "spared {} packs needed by backups that finished meanwhile",
                    r.packs_spared
                );
            }
            if let Some(p) = &r.postponed {
                println!("deletion postponed: {p}");
            }
            if let Some(l) = &r.lock {
                println!(
                    "object lock ({}): {} live objects' locks extended; {} hidden versions \
                     destroyed ({})",
                    l.mode,
                    l.extended,
                    l.destroyed,
                    bytes(l.destroyed_bytes)
                );
                if l.postponed > 0 {
                    println!(
                        "  {} hidden versions ({}) kept until their lock expires and they are \
                         a retention old{}",
                        l.postponed,
                        bytes(l.postponed_bytes),
                        l.next_release
                            .as_deref()
                            .map(|t| format!(" (first at {t})"))
                            .unwrap_or_default()
                    );
                }
                for t in &l.tampered {
                    println!("  TAMPERED: {t}");
                }
                for k in &l.kept {
                    println!("  kept for good: {k}");
                }
                for e in &l.errors {
                    println!("  FAILED: {e}");
                }
                if l.error_count > l.errors.len() {
                    println!("  ... and {} more failures", l.error_count - l.errors.len());
                }
            }
            println!("time {:.2} s", r.elapsed_ms as f64 / 1000.0);
            Ok(())
        }
    }
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<usize>,
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<usize>,
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<usize>,
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<usize>,
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<usize>,
    /// Keep RPs with this tag (repeatable)
    #[arg(long = "keep-tag", value_name = "KEY=VALUE")]
    pub keep_tags: Vec<String>,
    /// Apply the policy only to this asset (its exact name); others are kept
    #[arg(long, conflicts_with = "asset_glob")]
    pub asset: Option<String>,
    /// Apply the policy only to assets whose whole name matches this glob, e.g. '/dev/sd*'
    #[arg(long, value_name = "PATTERN")]
    pub asset_glob: Option<String>,
    /// Go on even if the policy keeps no RP of some asset (refused otherwise)
    #[arg(long)]
    pub allow_empty: bool,
    /// Show what would be deleted and reclaimed; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Rewrite packs whose live data is below this share, e.g. 50%
    #[arg(long, default_value = "50%", value_parser = parse_percent)]
    pub repack_below: f64,
    /// Leave at most this share of the reclaimable space unreclaimed in partly used packs
    /// (more packs are rewritten, most garbage first, until it holds; up to 1 MiB may always
    /// stay)
    #[arg(long, default_value = "5%", value_parser = parse_percent)]
    pub max_unused: f64,
    /// Longest wait for backups that were running, in seconds (default: the lease TTL + 60)
    #[arg(long, value_name = "SECS")]
    pub max_wait: Option<u64>,
}
