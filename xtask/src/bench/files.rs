//! `cargo xtask bench files`: a real tree (≥ 50 000 files from /usr) backed up by elastio,
//! restic and borg: first backup, unchanged second backup, full restore, repository bytes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use super::{dir_bytes, elastio_cmd, measure, restic_cmd};

/// Sources, all backed up together by every tool: about 58 000 files, 0.9 GiB here.
const SOURCES: &[&str] = &["/usr/share", "/usr/include", "/usr/lib/python3"];

pub struct FileFigures {
    pub files: u64,
    pub bytes: u64,
    /// (first, unchanged second, restore) seconds and repository bytes, per tool.
    pub elastio: Tool,
    pub restic: Tool,
    pub borg: Tool,
}

#[derive(Default)]
pub struct Tool {
    pub first_s: f64,
    pub second_s: f64,
    pub restore_s: f64,
    pub repo_bytes: u64,
    pub first_rss: f64,
}

fn sources() -> Vec<&'static str> {
    SOURCES
        .iter()
        .copied()
        .filter(|s| Path::new(s).is_dir())
        .collect()
}

/// Reads every file once so no tool pays for cold caches the others do not.
fn warm(srcs: &[&str]) -> Result<()> {
    let mut tar = Command::new("tar")
        .args(["-cf", "-"])
        .args(srcs)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    std::io::copy(&mut tar.stdout.take().unwrap(), &mut std::io::sink())?;
    tar.wait()?;
    Ok(())
}

/// Counts regular files and their bytes.
fn census(srcs: &[&str]) -> (u64, u64) {
    fn walk(p: &Path, acc: &mut (u64, u64)) {
        let Ok(md) = fs::symlink_metadata(p) else {
            return;
        };
        if md.is_dir() {
            if let Ok(rd) = fs::read_dir(p) {
                for e in rd.flatten() {
                    walk(&e.path(), acc);
                }
            }
        } else if md.is_file() {
            acc.0 += 1;
            acc.1 += md.len();
        }
    }
    let mut acc = (0, 0);
    for s in srcs {
        walk(Path::new(s), &mut acc);
    }
    acc
}

/// Asserts that `restored/<source>` equals each source: names, types, sizes, modes, mtimes
/// (seconds), symlink targets and file contents.
fn verify_tree(restored: &Path, srcs: &[&str], tool: &str) -> Result<u64> {
    fn cmp(got: &Path, want: &Path, n: &mut u64) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let (g, w) = (fs::symlink_metadata(got), fs::symlink_metadata(want)?);
        let g = g.with_context(|| format!("{} missing", got.display()))?;
        if g.file_type() != w.file_type()
            || g.mode() != w.mode()
            || g.mtime() != w.mtime()
            || (!w.is_dir() && g.len() != w.len())
        {
            bail!("{} differs from {}", got.display(), want.display());
        }
        if w.is_dir() {
            let mut names: Vec<_> = fs::read_dir(want)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()?;
            names.sort();
            let got_count = fs::read_dir(got)?.count();
            if got_count != names.len() {
                bail!(
                    "{}: {got_count} entries, want {}",
                    got.display(),
                    names.len()
                );
            }
            for name in names {
                cmp(&got.join(&name), &want.join(&name), n)?;
            }
        } else if w.file_type().is_symlink() {
            if fs::read_link(got)? != fs::read_link(want)? {
                bail!("{}: symlink target differs", got.display());
            }
        } else if w.is_file() {
            *n += 1;
            if blake3::hash(&fs::read(got)?) != blake3::hash(&fs::read(want)?) {
                bail!("{}: content differs", got.display());
            }
        }
        Ok(())
    }
    let mut n = 0;
    for s in srcs {
        cmp(&restored.join(&s[1..]), Path::new(s), &mut n)
            .with_context(|| format!("{tool} restore is not equal to {s}"))?;
    }
    Ok(n)
}

pub fn bench_files(root: &Path, work: &Path) -> Result<FileFigures> {
    let srcs = sources();
    let (files, bytes) = census(&srcs);
    println!(
        "==> files: {} ({files} files, {} MiB): elastio, restic, borg",
        srcs.join(" "),
        bytes >> 20
    );
    if files < 50_000 {
        println!("    (only {files} regular files on this machine; the bar asks for 50 000)");
    }
    let dir = work.join("files");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let restore_dir = |tool: &str| -> Result<PathBuf> {
        let p = dir.join(format!("restore-{tool}"));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p)?;
        Ok(p)
    };

    // elastio
    let bin = root.join("target/release/elastio");
    let vault = dir.join("vault");
    let elastio = |args: &[&str]| {
        let mut c = elastio_cmd(&bin, &vault, &["--quiet"]);
        c.args(args);
        c
    };
    measure(elastio(&["vault", "init"]).arg("--quiet"))?;
    let mut e = Tool::default();
    warm(&srcs)?;
    let m = measure(elastio(&["file", "backup"]).args(&srcs))?;
    (e.first_s, e.first_rss) = (m.0.as_secs_f64(), m.2);
    e.second_s = measure(elastio(&["file", "backup"]).args(&srcs))?
        .0
        .as_secs_f64();
    e.repo_bytes = dir_bytes(&vault);
    let target = restore_dir("elastio")?;
    e.restore_s = measure(&mut elastio(&[
        "file",
        "restore",
        "--rp",
        "latest",
        "--target",
        target.to_str().unwrap(),
    ]))?
    .0
    .as_secs_f64();
    let checked = verify_tree(&target, &srcs, "elastio")?;
    println!("    elastio restore verified ({checked} files)");
    fs::remove_dir_all(&target)?;

    // restic
    let repo = dir.join("restic");
    let cache = dir.join("restic-cache");
    let restic = || restic_cmd(&repo, &cache);
    measure(restic().args(["init", "--repository-version", "2"]))?;
    let mut r = Tool::default();
    warm(&srcs)?;
    let backup = || {
        let mut c = restic();
        c.args(["backup", "--compression", "auto", "--host", "bench"])
            .args(&srcs);
        c
    };
    let m = measure(&mut backup())?;
    (r.first_s, r.first_rss) = (m.0.as_secs_f64(), m.2);
    r.second_s = measure(&mut backup())?.0.as_secs_f64();
    r.repo_bytes = dir_bytes(&repo);
    let target = restore_dir("restic")?;
    r.restore_s =
        measure(restic().args(["restore", "latest", "--target", target.to_str().unwrap()]))?
            .0
            .as_secs_f64();
    fs::remove_dir_all(&target)?;

    // borg
    let brepo = dir.join("borg");
    let base_dir = dir.join("borg-home");
    let borg = || {
        let mut c = Command::new("borg");
        c.env("BORG_PASSPHRASE", "bench")
            .env("BORG_BASE_DIR", &base_dir)
            .env("BORG_REPO", &brepo);
        c
    };
    measure(borg().args(["init", "--encryption", "repokey-blake2"]))?;
    let mut b = Tool::default();
    warm(&srcs)?;
    let m = measure(
        borg()
            .args(["create", "--compression", "zstd", "::first"])
            .args(&srcs),
    )?;
    (b.first_s, b.first_rss) = (m.0.as_secs_f64(), m.2);
    b.second_s = measure(
        borg()
            .args(["create", "--compression", "zstd", "::second"])
            .args(&srcs),
    )?
    .0
    .as_secs_f64();
    b.repo_bytes = dir_bytes(&brepo);
    let target = restore_dir("borg")?;
    b.restore_s = measure(borg().args(["extract", "::second"]).current_dir(&target))?
        .0
        .as_secs_f64();
    fs::remove_dir_all(&target)?;

    Ok(FileFigures {
        files,
        bytes,
        elastio: e,
        restic: r,
        borg: b,
    })
}

pub fn report_files(f: &FileFigures) -> String {
    let mut s = format!(
        "file trees ({} regular files, {:.0} MiB: {}):\n",
        f.files,
        f.bytes as f64 / (1 << 20) as f64,
        sources().join(" ")
    );
    s += "  tool      first s  unchanged s  restore s  repo MiB  first RSS MiB\n";
    for (name, t) in [
        ("elastio", &f.elastio),
        ("restic", &f.restic),
        ("borg", &f.borg),
    ] {
        s += &format!(
            "  {name:<8} {:>8.2} {:>12.2} {:>10.2} {:>9.1} {:>14.0}\n",
            t.first_s,
            t.second_s,
            t.restore_s,
            t.repo_bytes as f64 / (1 << 20) as f64,
            t.first_rss
        );
    }
    let e = &f.elastio;
    for (name, p) in [("restic", &f.restic), ("borg", &f.borg)] {
        s += &format!(
            "  vs {name:<6}: first {:.2}x, unchanged {:.2}x faster (bar >= 2), repo {:.3} (bar <= 1), restore {:.2}x{}\n",
            p.first_s / e.first_s.max(1e-9),
            p.second_s / e.second_s.max(1e-9),
            e.repo_bytes as f64 / p.repo_bytes.max(1) as f64,
            p.restore_s / e.restore_s.max(1e-9),
            if name == "restic" { " (bar >= 2)" } else { "" }
        );
    }
    s
}

pub fn files_json(f: &FileFigures) -> serde_json::Value {
    let t = |t: &Tool| {
        serde_json::json!({
            "first_s": t.first_s, "second_s": t.second_s, "restore_s": t.restore_s,
            "repo_bytes": t.repo_bytes, "first_rss_mib": t.first_rss,
        })
    };
    serde_json::json!({
        "files": f.files, "bytes": f.bytes,
        "elastio": t(&f.elastio), "restic": t(&f.restic), "borg": t(&f.borg),
    })
}
