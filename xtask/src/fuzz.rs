//! `cargo xtask fuzz [--seconds N] [target...]`: runs the cargo-fuzz targets under `fuzz/` (all
//! of them by default: the `[[bin]]` entries of `fuzz/Cargo.toml`) for N seconds each, with
//! the memory and time limits every target must live within, and fails if any finds a crash,
//! a timeout or an out-of-memory input (written under `fuzz/artifacts/<target>/`).
//!
//! Each target's corpus is `fuzz/corpus/<target>` (kept between runs, not checked in), seeded
//! from `fuzz/seeds/<target>` (small checked-in inputs; `fuzz/make-seeds.sh` makes them).

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::util::root_dir;

/// cargo-fuzz, pinned: installed with `cargo install --locked` when missing or different.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Limits every input must stay within (a mount must survive any image on a small machine).
const LIBFUZZER_LIMITS: &[&str] = &["-rss_limit_mb=512", "-timeout=2", "-print_final_stats=1"];
const DEFAULT_SECONDS: u64 = 60;

pub fn run(args: &[String]) -> Result<()> {
    let mut seconds = DEFAULT_SECONDS;
    let mut chosen = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let n = it.next().context("--seconds needs a number")?;
                seconds = n.parse().with_context(|| format!("--seconds {n:?}"))?;
            }
            _ if a.starts_with('-') => bail!("unknown option {a:?}"),
            _ => chosen.push(a.clone()),
        }
    }
    let dir = root_dir().join("fuzz");
    let all = targets(&dir.join("Cargo.toml"))?;
    for t in &chosen {
        if !all.contains(t) {
            bail!("no fuzz target {t:?} (targets: {})", all.join(", "));
        }
    }
    let targets = if chosen.is_empty() { all } else { chosen };
    ensure_cargo_fuzz()?;
    let mut failed = Vec::new();
    let mut summary = Vec::new();
    for t in &targets {
        let outcome = run_target(&dir, t, seconds)?;
        if !outcome.ok {
            failed.push(t.clone());
        }
        summary.push(format!(
            "{t:<16} {:>12} executions  corpus {:>6} inputs  {}",
            outcome.executions.map_or("?".into(), |n| n.to_string()),
            outcome.corpus,
            if outcome.ok { "ok" } else { "FAILED" }
        ));
    }
    println!("\nfuzz results ({seconds} s each):");
    for line in summary {
        println!("  {line}");
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (inputs under fuzz/artifacts/)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// The `[[bin]]` names of the fuzz crate's manifest.
fn targets(manifest: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    let mut out = Vec::new();
    let mut in_bin = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if let Some(v) = line.strip_prefix("name").map(str::trim_start) {
            if let (true, Some(v)) = (in_bin, v.strip_prefix('=')) {
                out.push(v.trim().trim_matches('"').to_string());
            }
        }
    }
    if out.is_empty() {
        bail!("no [[bin]] targets in {}", manifest.display());
    }
    Ok(out)
}

fn ensure_cargo_fuzz() -> Result<()> {
    let version = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if version
        .as_deref()
        .is_some_and(|v| v.contains(CARGO_FUZZ_VERSION))
    {
        return Ok(());
    }
    println!("==> cargo install cargo-fuzz --locked --version {CARGO_FUZZ_VERSION}");
    let status = Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed ({status})");
    }
    Ok(())
}

struct Outcome {
    ok: bool,
    executions: Option<u64>,
    corpus: usize,
}

fn run_target(dir: &Path, target: &str, seconds: u64) -> Result<Outcome> {
    let corpus = dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    let artifacts = dir.join("artifacts").join(target);
    std::fs::create_dir_all(&artifacts)?;
    let seeds = dir.join("seeds").join(target);
    let time = format!("-max_total_time={seconds}");
    let prefix = format!("-artifact_prefix={}/", artifacts.display());
    let mut args = vec!["+nightly", "fuzz", "run", target];
    let (corpus_s, seeds_s) = (corpus.display().to_string(), seeds.display().to_string());
    args.push(&corpus_s);
    if seeds.is_dir() {
        args.push(&seeds_s);
    }
    args.push("--");
    args.extend(LIBFUZZER_LIMITS);
    args.extend([time.as_str(), prefix.as_str()]);
    println!("==> cargo {}", args.join(" "));
    // AddressSanitizer keeps 256 MiB of freed memory in quarantine by default, which counts
    // against -rss_limit_mb though no input uses it; safe Rust gains little from a large one.
    let asan = std::env::var("ASAN_OPTIONS").unwrap_or_else(|_| "quarantine_size_mb=32".into());
    // The toolchain of this xtask run must not leak into the nightly build.
    let out = Command::new("cargo")
        .args(&args)
        .current_dir(dir)
        .env("ASAN_OPTIONS", asan)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .output()
        .context("cannot run cargo fuzz")?;
    let log = String::from_utf8_lossy(&out.stderr);
    std::fs::write(artifacts.join("last-run.log"), log.as_bytes())?;
    // Show the interesting part: the final stats and any failure report.
    for line in log.lines() {
        if line.starts_with("stat::")
            || line.contains("ERROR")
            || line.contains("Test unit written")
            || line.contains("panicked")
            || line.starts_with("SUMMARY")
        {
            eprintln!("  [{target}] {line}");
        }
    }
    let executions = log
        .lines()
        .filter_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .find_map(|v| v.trim().parse().ok());
    Ok(Outcome {
        ok: out.status.success(),
        executions,
        corpus: std::fs::read_dir(&corpus)?.count(),
    })
}
