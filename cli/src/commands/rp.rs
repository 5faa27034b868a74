use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use scalez::scans::ScanReport;
use scalez::{RecoveryPoint, TagUpdate};

use crate::cli::OutputFormat;
use crate::commands::browse;
use crate::context::{resolve_rp, Ctx};
use crate::output::print_json;
use crate::output::{bytes, table};

pub fn run(ctx: &Ctx, cmd: RpCommand) -> Result<()> {
    match cmd {
        RpCommand::List(a) => list(ctx, a),
        RpCommand::Show { rp } => show(ctx, &rp),
        RpCommand::LastClean(a) => last_clean(ctx, a),
        RpCommand::Tag(a) => tag(ctx, a),
        RpCommand::Delete { rps, force } => delete(ctx, &rps, force),
        RpCommand::Protect { rps } => protect(ctx, &rps, true),
        RpCommand::Unprotect { rps } => protect(ctx, &rps, false),
        RpCommand::Ls(a) => browse::ls(ctx, a),
        RpCommand::Cat(a) => browse::cat(ctx, a),
        RpCommand::Find(a) => browse::find(ctx, a),
        RpCommand::Diff(a) => browse::diff(ctx, a),
    }
}

fn list(ctx: &Ctx, a: RpListArgs) -> Result<()> {
    let vault = ctx.open_vault()?;
    let want_tags = scalez::catalog::parse_tags(a.tags.iter().map(String::as_str))?;
    let rps: Vec<RecoveryPoint> = vault
        .list_rps()?
        .into_iter()
        .filter(|rp| a.kind.is_none_or(|k| rp.kind == k))
        .filter(|rp| {
            a.asset
                .as_deref()
                .is_none_or(|s| rp.asset.name == s || rp.asset.name.contains(s))
        })
        .filter(|rp| want_tags.iter().all(|(k, v)| rp.tags.get(k) == Some(v)))
        .collect();
    let scans = vault.scan_status(&rps)?;
    let rps: Vec<RecoveryPoint> = rps
        .into_iter()
        .filter(|rp| !a.clean || crate::commands::iscan::clean_chain(&scans, &rp.id))
        .collect();
    match ctx.global.output_format {
        OutputFormat::Json => print_json(
            &rps.iter()
                .map(|rp| with_scan(rp, scans.get(&rp.id)))
                .collect::<Vec<_>>(),
        ),
        OutputFormat::Human => {
            if rps.is_empty() {
                println!("no recovery points");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = rps
                .iter()
                .map(|rp| {
                    vec![
                        rp.id.to_string(),
                        rp.created
                            .chars()
                            .take(19)
                            .collect::<String>()
                            .replace('T', " "),
                        rp.kind.to_string(),
                        format!("{} ({})", rp.asset.name, rp.asset.host),
                        bytes(rp.logical_size),
                        bytes(rp.new_bytes_stored),
                        scans.get(&rp.id).map_or("-".into(), |s| s.verdict.clone()),
                        rp.tags
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                })
                .collect();
            table(
                &[
                    "ID",
                    "CREATED (UTC)",
                    "TYPE",
                    "ASSET",
                    "SIZE",
                    "NEW STORED",
                    "SCAN",
                    "TAGS",
                ],
                &rows,
            );
            Ok(())
        }
    }
}

fn print_rp(rp: &RecoveryPoint) {
    println!("id            {}", rp.id);
    println!("type          {}", rp.kind);
    println!("asset         {}", rp.asset.name);
    println!("host          {}", rp.asset.host);
    println!("created       {}", rp.created);
    println!(
        "parent        {}",
        rp.parent.as_ref().map_or("-".into(), |p| p.to_string())
    );
    println!(
        "logical size  {} ({} bytes)",
        bytes(rp.logical_size),
        rp.logical_size
    );
    println!("bytes read    {}", bytes(rp.bytes_read));
    println!(
        "new stored    {} ({} chunks)",
        bytes(rp.new_bytes_stored),
        rp.new_chunks
    );
    println!("duration      {:.2} s", rp.duration_ms as f64 / 1000.0);
    if let Some(d) = &rp.disk {
        println!("chunk size    {}", bytes(d.chunk_size as u64));
        println!(
            "map root      {}",
            d.root.map_or("- (all zeros)".into(), |r| r.to_hex())
        );
    }
    if let Some(s) = &rp.stream {
        println!("stream        {} in {} chunks", bytes(s.size), s.chunks);
    }
    if let Some(t) = &rp.tree {
        println!("sources       {}", t.sources.join(" "));
        println!(
            "paths         {} ({} files, {} directories, {} in files)",
            t.entries,
            t.files,
            t.dirs,
            bytes(t.file_bytes)
        );
    }
    if rp.tags.is_empty() {
        println!("tags          -");
    }
    for (i, (k, v)) in rp.tags.iter().enumerate() {
        println!(
            "{}{k}={v}",
            if i == 0 {
                "tags          "
            } else {
                "              "
            }
        );
    }
}

fn show(ctx: &Ctx, spec: &str) -> Result<()> {
    let vault = ctx.open_vault()?;
    let rp = resolve_rp(&vault, spec, None, None)?;
    let scan = ScanReport::status_of(&vault.scans_of(&rp.id)?).cloned();
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&with_scan(&rp, scan.as_ref())),
        OutputFormat::Human => {
            print_rp(&rp);
            print_scan(scan.as_ref());
            Ok(())
        }
    }
}

/// An RP as JSON with its newest scan's summary (`scan`: null when never scanned).
fn with_scan(rp: &RecoveryPoint, scan: Option<&ScanReport>) -> serde_json::Value {
    let mut v = serde_json::to_value(rp).expect("serialisable");
    v["scan"] = match scan {
        Some(s) => serde_json::json!({
            "verdict": s.verdict,
            "score": s.score,
            "time": s.time,
            "baseline": s.baseline,
            "findings": s.report.get("findings").and_then(|f| f.as_array()).map_or(0, Vec::len),
        }),
        None => serde_json::Value::Null,
    };
    v
}

fn print_scan(scan: Option<&ScanReport>) {
    let Some(s) = scan else {
        println!("scan          - (never scanned: elastio iscan --rp <id>)");
        return;
    };
    println!(
        "scan          {} (score {}, {}, {})",
        s.verdict,
        s.score,
        s.time,
        s.baseline
            .as_ref()
            .map_or("full".to_string(), |b| format!("against {b}"))
    );
    let findings = s.report.get("findings").and_then(|f| f.as_array());
    for f in findings.into_iter().flatten().take(20) {
        let field = |k: &str| f.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_string();
        println!(
            "              {} {} {}",
            field("signal"),
            field("path"),
            field("evidence")
        );
    }
}

/// The newest RP of an asset whose newest scan is clean.
fn last_clean(ctx: &Ctx, a: RpLastCleanArgs) -> Result<()> {
    let vault = ctx.open_vault()?;
    let rps = vault.list_rps()?;
    let scans = vault.scan_status(&rps)?;
    let of_asset =
        |rp: &&RecoveryPoint| rp.asset.name == a.asset && a.kind.is_none_or(|k| rp.kind == k);
    if !rps.iter().any(|rp| of_asset(&rp)) {
        bail!(
            "no recovery point of asset {} in vault {}",
            a.asset,
            vault.location()
        );
    }
    let Some(rp) = rps
        .iter()
        .filter(of_asset)
        .rfind(|rp| crate::commands::iscan::clean_chain(&scans, &rp.id))
    else {
        bail!(
            "no recovery point of asset {} scanned clean (elastio iscan --rp <id>; \
             elastio rp list --asset {} shows each RP's scan)",
            a.asset,
            a.asset
        );
    };
    let scan = scans.get(&rp.id);
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&with_scan(rp, scan)),
        OutputFormat::Human => {
            println!("{}", rp.id);
            if !ctx.global.quiet {
                eprintln!(
                    "{} {} of {}, scanned clean {}",
                    rp.created,
                    rp.kind,
                    rp.asset.name,
                    scan.map_or("", |s| s.time.as_str())
                );
            }
            Ok(())
        }
    }
}

fn tag(ctx: &Ctx, a: RpTagArgs) -> Result<()> {
    if a.tags.is_empty() && a.remove.is_empty() {
        bail!("nothing to do: give KEY=VALUE tags to set or --remove KEY");
    }
    let vault = ctx.open_vault()?;
    let rp = resolve_rp(&vault, &a.rp, None, None)?;
    let update = TagUpdate {
        set: scalez::catalog::parse_tags(a.tags.iter().map(String::as_str))?,
        remove: a.remove,
    };
    let rp = vault.update_tags(&rp.id, &update)?;
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&rp),
        OutputFormat::Human => {
            print_rp(&rp);
            Ok(())
        }
    }
}

fn delete(ctx: &Ctx, specs: &[String], force: bool) -> Result<()> {
    let vault = ctx.open_vault()?;
    // Resolve every id first: nothing is deleted if one is wrong or protected.
    let rps = specs
        .iter()
        .map(|s| resolve_rp(&vault, s, None, None))
        .collect::<Result<Vec<_>>>()?;
    if let Some(rp) = rps.iter().find(|rp| scalez::retention::is_protected(rp)) {
        if !force {
            bail!(
                "recovery point {} is protected; nothing was deleted (`elastio rp unprotect {}` \
                 first, or --force)",
                rp.id,
                rp.id
            );
        }
    }
    let ids: Vec<_> = rps.iter().map(|r| r.id.clone()).collect();
    scalez::prune::delete_rps(&vault, &ids)?;
    match ctx.global.output_format {
        OutputFormat::Json => crate::output::print_json(&serde_json::json!({ "deleted": ids })),
        OutputFormat::Human => {
            for rp in &rps {
                println!("deleted {} ({} {})", rp.id, rp.kind, rp.asset.name);
            }
            println!("run `elastio prune` to reclaim their space");
            Ok(())
        }
    }
}

/// Sets or clears the protection tag of RPs (resolved first: all or nothing).
fn protect(ctx: &Ctx, specs: &[String], on: bool) -> Result<()> {
    let vault = ctx.open_vault()?;
    let rps = specs
        .iter()
        .map(|s| resolve_rp(&vault, s, None, None))
        .collect::<Result<Vec<_>>>()?;
    let tag = scalez::retention::PROTECTED_TAG.to_string();
    let mut done = Vec::new();
    for rp in rps {
        let update = if on {
            TagUpdate {
                set: [(tag.clone(), "true".to_string())].into(),
                remove: Vec::new(),
            }
        } else {
            TagUpdate {
                set: Default::default(),
                remove: vec![tag.clone()],
            }
        };
        done.push(vault.update_tags(&rp.id, &update)?);
    }
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&done),
        OutputFormat::Human => {
            let verb = if on { "protected" } else { "unprotected" };
            for rp in &done {
                println!("{verb} {} ({} {})", rp.id, rp.kind, rp.asset.name);
            }
            Ok(())
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum RpCommand {
    /// List recovery points, oldest first
    List(RpListArgs),
    /// Show one recovery point in full
    Show { rp: String },
    /// The newest recovery point of an asset that scanned clean (`elastio iscan`)
    #[command(
        after_help = "Prints the RP's id (the RP to restore after an attack): the newest RP of \
the asset whose newest scan report says clean. RPs never scanned do not count.\n\nExample:\n  \
elastio rp last-clean --asset web-1"
    )]
    LastClean(RpLastCleanArgs),
    /// Add, change or remove tags of a recovery point
    Tag(RpTagArgs),
    /// Delete recovery points (their data is freed by the next `elastio prune`)
    #[command(
        after_help = "Protected RPs (`elastio rp protect`) are refused unless --force is \
given.\n\nExample:\n  elastio rp delete rp-01m80mb7eb9rts308j4hc4b1xn"
    )]
    Delete {
        /// Recovery point ids
        #[arg(required = true)]
        rps: Vec<String>,
        /// Delete protected RPs too
        #[arg(long)]
        force: bool,
    },
    /// Protect recovery points: every prune keeps them and `rp delete` refuses them
    #[command(
        after_help = "Protection is the tag elastio.protected; `elastio rp unprotect` \
removes it.\n\nExample:\n  elastio rp protect rp-01m80mb7eb9rts308j4hc4b1xn"
    )]
    Protect {
        /// Recovery point ids (or `latest`)
        #[arg(required = true)]
        rps: Vec<String>,
    },
    /// Remove the protection of recovery points
    Unprotect {
        /// Recovery point ids (or `latest`)
        #[arg(required = true)]
        rps: Vec<String>,
    },
    /// List the files of an RP without mounting it (file RPs, and the file systems in disk RPs)
    Ls(browse::RpLsArgs),
    /// Write a file of an RP to stdout
    Cat(browse::RpCatArgs),
    /// Find files by name or path across RPs: which RPs hold them, with sizes and times
    Find(browse::RpFindArgs),
    /// What changed between two RPs: added, removed and changed files, and what changed
    Diff(browse::RpDiffArgs),
}

#[derive(Args, Debug)]
pub struct RpListArgs {
    /// Only this type: disk, file or stream
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<scalez::RpKind>,
    /// Only RPs of this asset (exact name, or a substring of it)
    #[arg(long)]
    pub asset: Option<String>,
    /// Only RPs having this tag (repeatable; all must match)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Only RPs whose newest scan (`elastio iscan`) found nothing
    #[arg(long)]
    pub clean: bool,
}

#[derive(Args, Debug)]
pub struct RpLastCleanArgs {
    /// The asset (its exact name)
    #[arg(long)]
    pub asset: String,
    /// Only this type: disk, file or stream
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<scalez::RpKind>,
}

#[derive(Args, Debug)]
pub struct RpTagArgs {
    pub rp: String,
    /// Tags to set
    #[arg(value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Tag keys to remove (repeatable)
    #[arg(long = "remove", value_name = "KEY")]
    pub remove: Vec<String>,
}
