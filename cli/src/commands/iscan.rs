//! `elastio iscan`: integrity scans of RPs (and of local directories), reports kept in the
//! vault, and the scan that `--iscan` runs after a backup.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use iscan::rules::Rules;
use iscan::{FindingKind, Options, Outcome};
use mount::filesystem::FileSystem;
use scalez::scans::ScanReport;
use scalez::{RecoveryPoint, RpKind, Vault};
use serde_json::json;

use crate::cli::{parse_size, OutputFormat};
use crate::context::{resolve_rp, Ctx};
use crate::output::{bytes, print_json};

#[derive(Args, Debug)]
#[command(
    after_help = "Judges the files of a recovery point (a file RP's tree, every file \
system in a disk RP) for ransomware, malware and file-system damage. By default only the files \
that changed since the baseline are read (the asset's newest earlier RP that scanned clean with \
the same rules; unchanged files are told apart by their chunks, unread, and count as judged by \
that scan); --full reads every file.\n\nRansomware signals: files whose content became \
uniform bytes (Shannon entropy and a χ² test of each 64 KiB window: ciphertext is uniform, \
compressed formats are not, and dense formats are recognised by their magic), whole or in part \
(intermittent encryption); magic numbers lost or contradicting the extension (a .docx that is no \
zip); ransom notes and Tor onion addresses in small new files; bursts of renames (≥ 200 in a \
folder), deletions (≥ 100 and > 50 % of an extension) and uniform files with one new extension \
(≥ 10). Each signal has a weight; a score of 100 means ransomware. Malware: YARA rules (the \
built-in test set: EICAR and elastio's marker, plus --yara-rules). File systems: damaged \
partitions and unreadable directories, inodes or block maps are named.\n\nThe report is kept in \
the vault beside the RP (`elastio rp show`, `rp list --clean`, `rp last-clean --asset A`).\n\n\
Exit codes: 0 clean, 201 ransomware, 202 malware, 203 both, 204 file-system damage only, 205 \
suspicious (signals below the ransomware score, or files not judged whole: never clean, never a \
baseline), 3 a damaged vault.\n\nExamples:\n  elastio iscan --rp latest --asset web-1\n  elastio iscan --rp \
rp-01m80mb7eb9rts308j4hc4b1xn --full --yara-rules /etc/yara\n  elastio iscan --path /srv/share \
--output-format json"
)]
pub struct IscanArgs {
    /// The RP to scan: an id, or `latest` (of --asset when given)
    #[arg(long, required_unless_present = "path", conflicts_with = "path")]
    pub rp: Option<String>,
    /// Scan this local directory instead (every file; nothing is saved)
    #[arg(long, value_name = "DIR")]
    pub path: Option<PathBuf>,
    /// With `--rp latest`: the asset
    #[arg(long)]
    pub asset: Option<String>,
    /// The RP to compare with: an id (an earlier RP of the asset that scanned clean with the
    /// same rules, unless --no-save), or `auto` (the newest such RP; a full scan when there is
    /// none)
    #[arg(long, default_value = "auto")]
    pub baseline: String,
    #[command(flatten)]
    pub opts: ScanOpts,
    /// Do not keep the report in the vault
    #[arg(long)]
    pub no_save: bool,
}

/// The options a scan shares with `--iscan` of the backup commands.
#[derive(Args, Debug, Clone)]
pub struct ScanOpts {
    /// Read every file, not only those changed since the baseline
    #[arg(long)]
    pub full: bool,
    /// YARA rules: a .yar/.yara file or a directory of them (the built-in test set is always on)
    #[arg(long, value_name = "PATH")]
    pub yara_rules: Option<PathBuf>,
    /// Bytes of a file the YARA rules see at once (larger files are matched piece by piece,
    /// pieces overlapping by 1 MiB; 2 MiB to 1 GiB)
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub max_yara_bytes: u64,
    /// Decoded chunks kept in memory while reading
    #[arg(long = "scan-cache-size", default_value = "256MiB", value_parser = parse_size)]
    pub cache_size: u64,
    /// Ransomware and malware findings named in the report at most, each (the verdict counts
    /// them all)
    #[arg(long, default_value_t = 5000)]
    pub max_findings: usize,
}

pub fn run(ctx: &Ctx, a: IscanArgs) -> Result<()> {
    let rules = Rules::load(a.opts.yara_rules.as_deref())?;
    if let Some(dir) = &a.path {
        let meta = std::fs::metadata(dir).with_context(|| format!("{}", dir.display()))?;
        if !meta.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        let fs: Arc<dyn FileSystem> = Arc::new(iscan::local::LocalDir::new(dir.clone())?);
        let opts = options(&a.opts);
        let out = with_progress(ctx, |p| iscan::scan(&fs, None, &[], &rules, &opts, p))?;
        let s = Scanned {
            target: dir.display().to_string(),
            baseline: None,
            out,
            saved: None,
        };
        s.print(ctx, &rules)?;
        exit(s.out.exit_code());
    }
    let vault = ctx.open_vault()?;
    let rp = resolve_rp(
        &vault,
        a.rp.as_deref().unwrap_or("latest"),
        a.asset.as_deref(),
        None,
    )?;
    let baseline = match a.baseline.as_str() {
        _ if a.opts.full => None,
        "auto" => auto_baseline(&vault, &rp, &rules)?,
        spec => {
            let b = resolve_rp(&vault, spec, None, None)?;
            if !a.no_save && (b.id >= rp.id || b.asset != rp.asset) {
                bail!(
                    "baseline {} is not an earlier RP of {}'s asset {}: a kept report compares \
                     with the asset's past (or add --no-save)",
                    b.id,
                    rp.id,
                    rp.asset.name
                );
            }
            // Unchanged files are not read: they count as judged by the baseline's scan. A
            // report built on a baseline that never scanned clean with these rules would call
            // an RP clean that carries the baseline's encrypted or infected files.
            if !a.no_save && !judged_clean(&vault, &b, &rules)? {
                bail!(
                    "baseline {} has no clean scan with these rules (its newest report is not \
                     clean, or used other YARA rules): scan it first, use --full, or add \
                     --no-save for a comparison that is not kept",
                    b.id
                );
            }
            Some(b)
        }
    };
    let scans = scan_rp(
        ctx,
        &vault,
        &rp,
        baseline.as_ref(),
        &rules,
        &a.opts,
        !a.no_save,
    )?;
    if ctx.global.output_format == OutputFormat::Json && scans.len() > 1 {
        print_json(&scans.iter().map(|s| s.json(&rules)).collect::<Vec<_>>())?;
    } else {
        for s in &scans {
            s.print(ctx, &rules)?;
        }
    }
    exit(exit_code(&scans));
}

/// `--iscan` (and `--yara-rules`) of the backup commands.
#[derive(Args, Debug, Clone)]
pub struct BackupScan {
    /// Scan the new RP right after the backup (`elastio iscan`, against its parent), keep the
    /// report in the vault, and exit with the scan's code (201 ransomware, 202 malware, 203
    /// both, 204 file-system damage) when it found something
    #[arg(long)]
    pub iscan: bool,
    /// With --iscan: YARA rules (a .yar/.yara file or a directory of them)
    #[arg(long, value_name = "PATH", requires = "iscan")]
    pub yara_rules: Option<PathBuf>,
}

/// The scan a backup asked for with `--iscan`, run before the backup prints its result.
pub struct AfterBackup {
    scans: Vec<Scanned>,
    rules: Rules,
}

impl AfterBackup {
    pub fn run(
        ctx: &Ctx,
        vault: &Arc<Vault>,
        rp: &scalez::RecoveryPointId,
        flags: &BackupScan,
    ) -> Result<Option<Self>> {
        if !flags.iscan {
            return Ok(None);
        }
        let rules = Rules::load(flags.yara_rules.as_deref())?;
        let so = ScanOpts {
            full: false,
            yara_rules: None,
            max_yara_bytes: 64 << 20,
            cache_size: 256 << 20,
            max_findings: 5000,
        };
        let rp = vault.get_rp(rp)?;
        let base = auto_baseline(vault, &rp, &rules)?;
        let scans = scan_rp(ctx, vault, &rp, base.as_ref(), &rules, &so, true)
            .with_context(|| format!("the backup committed {}, but its scan failed", rp.id))?;
        Ok(Some(AfterBackup { scans, rules }))
    }

    /// The reports, for the backup's JSON.
    pub fn json(&self) -> serde_json::Value {
        json!(self
            .scans
            .iter()
            .map(|s| s.json(&self.rules))
            .collect::<Vec<_>>())
    }

    /// Prints the reports (human output) and ends the process with the scan's exit code when it
    /// found something.
    pub fn finish(self, ctx: &Ctx) -> Result<()> {
        if ctx.global.output_format == OutputFormat::Human {
            for s in &self.scans {
                s.print(ctx, &self.rules)?;
            }
        }
        match exit_code(&self.scans) {
            0 => Ok(()),
            code => exit(code),
        }
    }
}

fn exit_code(scans: &[Scanned]) -> i32 {
    scans.iter().map(|s| s.out.exit_code()).fold(0, worse)
}

/// One RP scanned.
pub struct Scanned {
    target: String,
    baseline: Option<String>,
    out: Outcome,
    saved: Option<String>,
}

impl Scanned {
    fn json(&self, rules: &Rules) -> serde_json::Value {
        let mut v = report_json(&self.out, rules);
        v["target"] = json!(self.target);
        v["baseline"] = json!(self.baseline);
        v["saved_as"] = json!(self.saved);
        v
    }

    fn print(&self, ctx: &Ctx, rules: &Rules) -> Result<()> {
        if ctx.global.output_format == OutputFormat::Json {
            return print_json(&self.json(rules));
        }
        print(
            &self.target,
            self.baseline.as_deref(),
            &self.out,
            self.saved.as_deref(),
        );
        Ok(())
    }
}

fn exit(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

fn options(o: &ScanOpts) -> Options {
    Options {
        full: o.full,
        max_yara_bytes: o.max_yara_bytes.clamp(2 << 20, 1 << 30) as usize,
        max_findings: o.max_findings.clamp(1, 50_000),
        ..Options::default()
    }
}

/// The RP a scan of `rp` compares with by default: the newest earlier RP of its asset (and
/// type) whose newest scan is clean with the same rules, so every file the scan does not read
/// was judged clean before. None (a full scan) when there is no such RP.
fn auto_baseline(
    vault: &Vault,
    rp: &RecoveryPoint,
    rules: &Rules,
) -> Result<Option<RecoveryPoint>> {
    let rps = vault.list_rps()?;
    let scans = vault.scan_status(&rps)?;
    Ok(rps.into_iter().rfind(|o| {
        o.kind == rp.kind
            && o.asset == rp.asset
            && o.id < rp.id
            && scans.get(&o.id).is_some_and(|s| clean_with(s, rules))
            && clean_chain(&scans, &o.id)
    }))
}

/// Whether RP `id` counts as clean: its status is clean, and so is the status of the baseline
/// its clean report relied on, and that one's, … (a baseline found infected later taints every
/// report built on it). A baseline deleted since (pruned) is taken as it was judged.
pub fn clean_chain(
    scans: &std::collections::BTreeMap<scalez::RecoveryPointId, ScanReport>,
    id: &scalez::RecoveryPointId,
) -> bool {
    let mut seen = std::collections::HashSet::new();
    let mut at = id;
    loop {
        let Some(s) = scans.get(at) else {
            // Never scanned: not clean; a baseline gone since: as it was judged.
            return at != id;
        };
        if !s.is_clean() || !seen.insert(at.clone()) {
            return false;
        }
        match &s.baseline {
            Some(b) => at = b,
            None => return true,
        }
    }
}

fn clean_with(s: &ScanReport, rules: &Rules) -> bool {
    s.is_clean()
        && s.report.get("rules_fingerprint").and_then(|f| f.as_str())
            == Some(rules.fingerprint.as_str())
}

fn judged_clean(vault: &Vault, rp: &RecoveryPoint, rules: &Rules) -> Result<bool> {
    let rps = vault.list_rps()?;
    let scans = vault.scan_status(&rps)?;
    Ok(scans.get(&rp.id).is_some_and(|s| clean_with(s, rules)) && clean_chain(&scans, &rp.id))
}

/// Scans `rp` (each volume of an instance RP) and saves the reports.
fn scan_rp(
    ctx: &Ctx,
    vault: &Arc<Vault>,
    rp: &RecoveryPoint,
    baseline: Option<&RecoveryPoint>,
    rules: &Rules,
    so: &ScanOpts,
    save: bool,
) -> Result<Vec<Scanned>> {
    let opts = &options(so);
    match rp.kind {
        RpKind::Disk | RpKind::File | RpKind::Stream => {}
        RpKind::Instance => {
            let mut all = Vec::new();
            for v in &rp.instance()?.volumes {
                let vrp = vault.get_rp(&v.rp)?;
                let base = if opts.full {
                    None
                } else {
                    auto_baseline(vault, &vrp, rules)?
                };
                all.extend(scan_rp(ctx, vault, &vrp, base.as_ref(), rules, so, save)?);
            }
            if save {
                // The instance's own report: its volumes' worst, so `rp list --clean` and
                // `rp last-clean` answer for instance assets too.
                let verdict = all
                    .iter()
                    .map(|s| s.out.verdict())
                    .max_by_key(|v| verdict_rank(v))
                    .unwrap_or("clean");
                let report = ScanReport {
                    rp: rp.id.clone(),
                    time: scalez::vault::now_rfc3339(),
                    verdict: verdict.to_string(),
                    score: all.iter().map(|s| s.out.score).max().unwrap_or(0),
                    baseline: None,
                    report: json!({
                        "volumes": all.iter().map(|s| json!({
                            "rp": s.target,
                            "verdict": s.out.verdict(),
                            "saved_as": s.saved,
                        })).collect::<Vec<_>>(),
                        "rules_fingerprint": rules.fingerprint,
                    }),
                };
                vault
                    .put_scan(&report)
                    .with_context(|| format!("saving the scan report of {}", rp.id))?;
            }
            return Ok(all);
        }
    }
    let cache = so.cache_size.min(usize::MAX as u64) as usize;
    let open = |r: &RecoveryPoint| -> Result<mount::browse::Opened> {
        if r.kind == RpKind::Stream {
            let reader = scalez::stream_map::StreamReader::open(vault.clone(), r.stream()?, cache)
                .with_context(|| format!("reading stream {}", r.id))?;
            let time = humantime::parse_rfc3339_weak(r.created.trim_end_matches('Z'))
                .unwrap_or(std::time::UNIX_EPOCH);
            return Ok(mount::browse::Opened {
                fs: Arc::new(iscan::stream::StreamFs::new(reader, &r.asset.name, time)),
                status: Vec::new(),
            });
        }
        mount::browse::open(vault, r, cache)
            .with_context(|| format!("reading the files of {}", r.id))
    };
    let new = open(rp)?;
    let base = match baseline {
        Some(b) if b.kind != rp.kind => bail!(
            "{} is a {} RP and the baseline {} a {} RP: only RPs of one type compare",
            rp.id,
            rp.kind,
            b.id,
            b.kind
        ),
        Some(b) => Some(open(b)?),
        None => None,
    };
    let out = with_progress(ctx, |p| {
        iscan::scan(
            &new.fs,
            base.as_ref().map(|b| (&b.fs, b.status.as_slice())),
            &new.status,
            rules,
            opts,
            p,
        )
    })
    .with_context(|| format!("scanning {}", rp.id))?;
    let baseline_id = baseline.filter(|_| !opts.full).map(|b| b.id.clone());
    let saved = if save {
        let report = ScanReport {
            rp: rp.id.clone(),
            time: scalez::vault::now_rfc3339(),
            verdict: out.verdict().to_string(),
            score: out.score,
            baseline: baseline_id.clone(),
            report: report_json(&out, rules),
        };
        Some(
            vault
                .put_scan(&report)
                .with_context(|| format!("saving the scan report of {}", rp.id))?,
        )
    } else {
        None
    };
    Ok(vec![Scanned {
        target: rp.id.to_string(),
        baseline: baseline_id.map(|b| b.to_string()),
        out,
        saved,
    }])
}

/// How bad a verdict is (for an instance's report: its worst volume's).
fn verdict_rank(v: &str) -> u8 {
    match v {
        "clean" => 0,
        "suspicious" => 1,
        "damaged" => 2,
        "malware" => 3,
        "ransomware" => 4,
        _ => 5,
    }
}

/// The exit code of two scans together.
fn worse(a: i32, b: i32) -> i32 {
    let bits = |c: i32| match c {
        201 => 1,
        202 => 2,
        203 => 3,
        204 => 4,
        205 => 8,
        _ => 0,
    };
    match bits(a) | bits(b) {
        x if x & 3 == 3 => 203,
        x if x & 1 == 1 => 201,
        x if x & 2 == 2 => 202,
        x if x & 4 == 4 => 204,
        x if x & 8 == 8 => 205,
        _ => 0,
    }
}

fn with_progress<T>(
    ctx: &Ctx,
    f: impl FnOnce(&dyn Fn(&iscan::Stats)) -> std::io::Result<T>,
) -> Result<T> {
    let bar = (!ctx.global.quiet && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .expect("valid template"),
        );
        pb
    });
    let progress = |s: &iscan::Stats| {
        if let Some(pb) = &bar {
            pb.set_message(format!(
                "scanning: {} files judged, {} read",
                s.files_scanned,
                bytes(s.bytes_read)
            ));
            pb.tick();
        }
    };
    let out = f(&progress);
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    Ok(out?)
}

fn report_json(out: &Outcome, rules: &Rules) -> serde_json::Value {
    json!({
        "verdict": out.verdict(),
        "exit_code": out.exit_code(),
        "score": out.score,
        "ransomware": out.ransomware,
        "malware": out.malware,
        "damaged": out.damaged,
        "findings": out.findings,
        "findings_dropped": out.findings_dropped,
        "stats": out.stats,
        "filesystems": out.filesystems,
        "thresholds": iscan::scan::thresholds_json(),
        "rule_files": rules.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "rules_fingerprint": rules.fingerprint,
    })
}

fn print(target: &str, baseline: Option<&str>, out: &Outcome, saved: Option<&str>) {
    let s = &out.stats;
    match baseline {
        Some(b) => println!(
            "scanned {target} against {b}: {} files judged ({} added, {} changed, {} renamed, {} removed), {} read, {} unchanged files skipped, in {:.2} s",
            s.files_scanned,
            s.files_added,
            s.files_changed,
            s.files_renamed,
            s.files_removed,
            bytes(s.bytes_read + s.baseline_bytes_read),
            s.files_unchanged,
            s.elapsed_ms as f64 / 1000.0
        ),
        None => println!(
            "scanned {target} in full: {} files judged, {} read, in {:.2} s",
            s.files_scanned,
            bytes(s.bytes_read),
            s.elapsed_ms as f64 / 1000.0
        ),
    }
    for f in &out.filesystems {
        println!("  {}: {}", f.place, f.status);
    }
    for f in &out.findings {
        let kind = match f.kind {
            FindingKind::Ransomware => "ransomware",
            FindingKind::Malware => "malware",
            FindingKind::Filesystem => "filesystem",
        };
        println!(
            "  {kind:<10} {:<20} {}  ({})",
            f.signal,
            f.path.as_deref().unwrap_or("-"),
            f.evidence
        );
    }
    if out.findings_dropped > 0 {
        println!("  … and {} more findings", out.findings_dropped);
    }
    println!(
        "verdict: {} (ransomware score {} of {})",
        out.verdict(),
        out.score,
        iscan::scan::thresholds::RANSOMWARE_SCORE
    );
    if let Some(k) = saved {
        println!("report saved as {k}");
    }
}
