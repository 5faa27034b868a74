use crate::cli::parse_percent;
use anyhow::Result;
use clap::Args;
use scalez::check::{check, DataCheck};

use crate::cli::OutputFormat;
use crate::context::Ctx;
use crate::output::print_json;
use crate::output::{bytes, table};

/// Exit code of a vault with problems (the same as for damaged data found by any command).
const DAMAGED: i32 = 3;

pub fn run(ctx: &Ctx, a: CheckArgs) -> Result<()> {
    let vault = ctx.open_vault()?;
    let data = match (a.read_data, a.read_data_subset) {
        (true, _) => DataCheck::All,
        (false, Some(f)) => DataCheck::Subset(f),
        (false, None) => DataCheck::None,
    };
    let quiet = ctx.global.quiet || ctx.global.output_format == OutputFormat::Json;
    let report = check(&vault, data, &|stage| {
        if !quiet {
            eprintln!("{stage}");
        }
    })?;
    match ctx.global.output_format {
        OutputFormat::Json => {
            let mut v = serde_json::to_value(&report)?;
            v["healthy"] = serde_json::json!(report.healthy());
            print_json(&v)?;
        }
        OutputFormat::Human => {
            println!("vault {}", vault.location());
            println!(
                "  {} recovery points, {} index objects, {} chunks indexed",
                report.rps, report.index_objects, report.chunks_indexed
            );
            println!(
                "  {} packs ({}), {} chunk references checked",
                report.packs,
                bytes(report.pack_bytes),
                report.chunk_references
            );
            if data != DataCheck::None {
                println!(
                    "  data: {} packs read ({}), every chunk authenticated and re-hashed",
                    report.packs_read,
                    bytes(report.bytes_read)
                );
            }
            if !report.unindexed_packs.is_empty() {
                println!(
                    "  {} packs are in no index object (left by interrupted backups: prune removes them)",
                    report.unindexed_packs.len()
                );
            }
            if report.healthy() {
                println!("no problems found");
            } else {
                println!("{} problems:", report.problems.len());
                let rows: Vec<Vec<String>> = report
                    .problems
                    .iter()
                    .map(|p| {
                        vec![
                            p.object.clone(),
                            p.problem.clone(),
                            if p.rps.is_empty() {
                                "-".into()
                            } else {
                                p.rps.iter().cloned().collect::<Vec<_>>().join(" ")
                            },
                        ]
                    })
                    .collect();
                table(&["OBJECT", "PROBLEM", "AFFECTED RPS"], &rows);
                println!(
                    "damaged recovery points: {}",
                    if report.damaged_rps.is_empty() {
                        "none".to_string()
                    } else {
                        report
                            .damaged_rps
                            .iter()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(" ")
                    }
                );
            }
        }
    }
    if !report.healthy() {
        std::process::exit(DAMAGED);
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Also read and verify every chunk
    #[arg(long, conflicts_with = "read_data_subset")]
    pub read_data: bool,
    /// Read and verify the chunks of this share of the packs, e.g. 10%
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    pub read_data_subset: Option<f64>,
}
