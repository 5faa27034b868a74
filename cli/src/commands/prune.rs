use std::time::Duration;

use anyhow::Result;
use scalez::prune::{prune, PruneOptions};
use scalez::retention::{AssetFilter, Retention};

use crate::cli::{OutputFormat, PruneArgs};
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
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&r),
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
            println!("time {:.2} s", r.elapsed_ms as f64 / 1000.0);
            Ok(())
        }
    }
}
