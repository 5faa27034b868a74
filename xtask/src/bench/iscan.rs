//! `cargo xtask bench iscan` (issue 21): integrity scans of the bench's disk RPs. xfs.img (the
//! base image's ~1.1 GiB of /usr files in XFS) and xfs-changed.img (the same after file-level
//! changes through the kernel: every 30th file appended to, every 97th removed, 100 added; made
//! by `bench filesystems`, root needed) are backed up as one asset. The base RP is scanned in
//! full (and must be clean: real files, no false positive), then the changed RP incrementally
//! (against the base RP: only files whose chunks changed are read) and in full. Reports wall
//! time, bytes read, files judged, and the scan throughput in MiB/s of file data judged.
//! (changed.img, whose blocks were rewritten at random, holds a damaged ext4: a scan of it is
//! a damage report, not a measure of throughput.)

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::elastio_cmd;

pub struct Scan {
    pub wall_s: f64,
    pub files: u64,
    pub bytes_read: u64,
    pub baseline_bytes_read: u64,
    pub unchanged: u64,
    pub verdict: String,
    pub findings: usize,
    /// (signal, path, evidence) of the first few findings.
    pub first: Vec<String>,
}

pub struct IscanFigures {
    /// The base RP in full: ~1.1 GiB of real /usr files, which must scan clean.
    pub base: Scan,
    pub incremental: Scan,
    pub full: Scan,
}

fn scan(bin: &Path, vault: &Path, args: &[&str], save: bool) -> Result<Scan> {
    let mut a = vec!["iscan", "--output-format", "json"];
    if !save {
        a.push("--no-save");
    }
    a.extend(args);
    let started = Instant::now();
    let out = elastio_cmd(bin, vault, &a).output()?;
    let wall_s = started.elapsed().as_secs_f64();
    if !matches!(out.status.code(), Some(0 | 201 | 202 | 203 | 204)) {
        bail!(
            "elastio {a:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("iscan JSON")?;
    let n = |k: &str| v["stats"][k].as_u64().unwrap_or(0);
    Ok(Scan {
        wall_s,
        files: n("files_scanned"),
        bytes_read: n("bytes_read"),
        baseline_bytes_read: n("baseline_bytes_read"),
        unchanged: n("files_unchanged"),
        verdict: v["verdict"].as_str().unwrap_or("?").to_string(),
        findings: v["findings"].as_array().map_or(0, Vec::len),
        first: v["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .take(5)
            .map(|f| format!("{} {} ({})", f["signal"], f["path"], f["evidence"]))
            .collect(),
    })
}

pub fn bench(root: &Path, data: &Path, work: &Path) -> Result<IscanFigures> {
    let bin = root.join("target/release/elastio");
    super::filesystems::prepare(data, work)
        .context("the XFS images of `bench filesystems` (root needed)")?;
    let dir = work.join("iscan");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let vault = dir.join("vault");
    println!("==> iscan: backing up xfs.img and xfs-changed.img as one asset");
    let ok = |a: &[&str]| -> Result<Value> {
        let out = elastio_cmd(&bin, &vault, a).output()?;
        if !out.status.success() {
            bail!("elastio {a:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    };
    ok(&["vault", "init"])?;
    let mut rps = Vec::new();
    for img in ["xfs.img", "xfs-changed.img"] {
        let v = ok(&[
            "block",
            "backup",
            data.join(img).to_str().unwrap(),
            "--asset-name",
            "bench-iscan",
            "--output-format",
            "json",
        ])?;
        rps.push(v["rp"]["id"].as_str().context("rp id")?.to_string());
    }
    println!("==> iscan: full scan of the base RP (its report kept: the baseline)");
    let base = scan(&bin, &vault, &["--rp", &rps[0], "--full"], true)?;
    println!("==> iscan: incremental scan of the changed RP");
    let incremental = scan(
        &bin,
        &vault,
        &["--rp", &rps[1], "--baseline", &rps[0]],
        false,
    )?;
    println!("==> iscan: full scan of the changed RP");
    let full = scan(&bin, &vault, &["--rp", &rps[1], "--full"], false)?;
    Ok(IscanFigures {
        base,
        incremental,
        full,
    })
}

pub fn report(f: &IscanFigures) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let line = |name: &str, s: &Scan| {
        format!(
            "  {name:<12} {:>7.2} s  {:>6} files judged  {:>8.1} MiB read (+{:.1} MiB of the baseline)  {:>6.1} MiB/s  {} unchanged skipped  verdict {} ({} findings)\n",
            s.wall_s,
            s.files,
            mib(s.bytes_read),
            mib(s.baseline_bytes_read),
            mib(s.bytes_read) / s.wall_s.max(1e-9),
            s.unchanged,
            s.verdict,
            s.findings
        )
    };
    let mut out = String::from(
        "iscan (disk RPs of xfs.img, then xfs-changed.img: files appended to, removed and added):\n",
    );
    out += &line("base, full", &f.base);
    for x in &f.base.first {
        out += &format!("      base finding: {x}\n");
    }
    out += &line("incremental", &f.incremental);
    out += &line("full", &f.full);
    let (i, full) = (&f.incremental, &f.full);
    out += &format!(
        "  incremental vs full: {:.1}x faster, {:.1}x fewer bytes read\n",
        full.wall_s / i.wall_s.max(1e-9),
        full.bytes_read as f64 / (i.bytes_read + i.baseline_bytes_read).max(1) as f64
    );
    out
}
