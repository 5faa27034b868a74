//! `cargo xtask bench filesystems` (issue 18): every file of an XFS and an NTFS image (the
//! base image's ~1.1 GiB of /usr files copied into each) found and read through `elastio mount`
//! of its disk RP, against the kernel's XFS driver (NTFS: ntfs-3g, this kernel has no ntfs3)
//! reading the same raw image, page cache dropped before each; and `elastio rp diff` of two disk
//! RPs of one asset against walking both trees (`rp ls -R`): the XFS image before and after a
//! file-level change (every 30th file appended to, every 97th removed, 100 added).
//! Needs root (loop mounts, ntfs-3g, dropping the page cache): otherwise nothing is measured.

use std::fs::{self, File};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::{elastio_cmd, elastio_mount, elastio_umount, find_and_read};
use crate::util::run_cmd;

/// Size of each file-system image (sparse).
const FS_IMAGE: u64 = 2 << 30;
/// Bumped when the images change.
const FS_DATA_VERSION: &str = "2";

/// One file system read both ways.
pub struct Pair {
    pub files: usize,
    pub elastio: f64,
    pub reference: f64,
    pub reference_name: &'static str,
}

pub struct DiffFigures {
    pub diff_s: f64,
    pub compared: u64,
    pub same_by_key: u64,
    pub bytes_read: u64,
    pub changes: u64,
    pub walk_s: f64,
    pub walked: u64,
}

#[derive(Default)]
pub struct FsFigures {
    pub xfs: Option<Pair>,
    pub ntfs: Option<Pair>,
    pub diff: Vec<(&'static str, DiffFigures)>,
}

/// Empties the page cache (root).
fn cold() -> Result<()> {
    // SAFETY: sync(2) has no preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::sync()
    };
    fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

fn mount(args: &[&str]) -> Result<()> {
    run_cmd("mount", args, &[])
}

fn umount(dir: &Path) -> Result<()> {
    run_cmd("umount", &[dir.to_str().unwrap()], &[])
}

/// The XFS and NTFS images, made once from the base image's files (cached in `data`).
pub(super) fn prepare(data: &Path, work: &Path) -> Result<()> {
    let stamp = data.join("fs-stamp");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(FS_DATA_VERSION) {
        return Ok(());
    }
    let src = work.join("mnt-base-ro");
    fs::create_dir_all(&src)?;
    let base = data.join("base.img");
    mount(&[
        "-o",
        "loop,ro,noload",
        base.to_str().unwrap(),
        src.to_str().unwrap(),
    ])?;
    let made = (|| -> Result<()> {
        let dst = work.join("mnt-fs-fill");
        fs::create_dir_all(&dst)?;
        let xfs = data.join("xfs.img");
        File::create(&xfs)?.set_len(FS_IMAGE)?;
        run_cmd("mkfs.xfs", &["-q", "-f", xfs.to_str().unwrap()], &[])?;
        mount(&["-o", "loop", xfs.to_str().unwrap(), dst.to_str().unwrap()])?;
        println!("==> copying the base image's files into xfs.img");
        let copied = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(&dst)
            .status();
        umount(&dst)?;
        copied?;
        let ntfs = data.join("ntfs.img");
        File::create(&ntfs)?.set_len(FS_IMAGE)?;
        run_cmd("mkntfs", &["-F", "-Q", "-q", ntfs.to_str().unwrap()], &[])?;
        run_cmd(
            "ntfs-3g",
            &[ntfs.to_str().unwrap(), dst.to_str().unwrap()],
            &[],
        )?;
        println!("==> copying the base image's files into ntfs.img");
        // Owners and modes mean nothing to ntfs-3g without user mapping: times only.
        let copied = Command::new("cp")
            .args(["-rP", "--preserve=timestamps"])
            .arg(format!("{}/.", src.display()))
            .arg(&dst)
            .status();
        umount(&dst)?;
        copied?;
        change_files(data, work)
    })();
    umount(&src)?;
    made?;
    fs::write(&stamp, FS_DATA_VERSION)?;
    Ok(())
}

/// Backs up `img` as a disk RP of asset `asset` in `vault`; returns its id.
fn backup(bin: &Path, vault: &Path, img: &Path, asset: &str) -> Result<String> {
    let out = elastio_cmd(
        bin,
        vault,
        &[
            "block",
            "backup",
            img.to_str().unwrap(),
            "--asset-name",
            asset,
            "--output-format",
            "json",
        ],
    )
    .output()?;
    if !out.status.success() {
        bail!(
            "backup of {} failed: {}",
            img.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["rp"]["id"].as_str().context("no RP id")?.to_string())
}

/// find + cat of every file through `elastio mount` of `rp`, then through `reference`.
fn pair(
    bin: &Path,
    vault: &Path,
    rp: &str,
    work: &Path,
    reference_name: &'static str,
    reference: &dyn Fn(&Path) -> Result<()>,
) -> Result<Pair> {
    let mnt = work.join(format!("mnt-{reference_name}"));
    fs::create_dir_all(&mnt)?;
    cold()?;
    elastio_mount(bin, vault, rp, &mnt)?;
    let read = find_and_read(&mnt.join("fs"));
    elastio_umount(bin, &mnt)?;
    let (elastio, files) = read?;
    cold()?;
    reference(&mnt)?;
    let read = find_and_read(&mnt);
    umount(&mnt)?;
    let (secs, theirs) = read?;
    if theirs != files {
        bail!("{reference_name} shows {theirs} files, elastio {files}");
    }
    Ok(Pair {
        files,
        elastio,
        reference: secs,
        reference_name,
    })
}

pub fn bench(root: &Path, data: &Path, work: &Path) -> Result<FsFigures> {
    println!("==> file systems: XFS and NTFS read through elastio mount vs the kernel / ntfs-3g");
    if !crate::util::is_root() {
        println!("    not measured: loop mounts, ntfs-3g and dropping the page cache need root");
        return Ok(FsFigures::default());
    }
    prepare(data, work)?;
    let bin = root.join("target/release/elastio");
    let vault = work.join("fs-vault");
    let _ = fs::remove_dir_all(&vault);
    let out = elastio_cmd(&bin, &vault, &["--quiet", "vault", "init"]).output()?;
    if !out.status.success() {
        bail!("vault init: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (xfs, ntfs) = (data.join("xfs.img"), data.join("ntfs.img"));
    let xfs_rp = backup(&bin, &vault, &xfs, "xfs")?;
    let ntfs_rp = backup(&bin, &vault, &ntfs, "ntfs")?;
    let mut f = FsFigures::default();
    let x = pair(&bin, &vault, &xfs_rp, work, "kernel-xfs", &|m| {
        mount(&[
            "-o",
            "loop,ro,norecovery",
            xfs.to_str().unwrap(),
            m.to_str().unwrap(),
        ])
    })?;
    println!(
        "    XFS: {} files, elastio {:.2} s, kernel {:.2} s",
        x.files, x.elastio, x.reference
    );
    f.xfs = Some(x);
    let n = pair(&bin, &vault, &ntfs_rp, work, "ntfs-3g", &|m| {
        run_cmd(
            "ntfs-3g",
            &["-o", "ro", ntfs.to_str().unwrap(), m.to_str().unwrap()],
            &[],
        )
    })?;
    println!(
        "    NTFS: {} files, elastio {:.2} s, ntfs-3g {:.2} s",
        n.files, n.elastio, n.reference
    );
    f.ntfs = Some(n);

    // rp diff of two disk RPs of one asset, against walking both trees whole: the XFS image
    // before and after a file-level change through the kernel. (The main bench's changed.img
    // rewrites random blocks, ext4's group descriptors among them: its tree is damaged, which
    // rp diff reports, and there is no file-level change to measure.)
    let label = "xfs -> xfs-changed (files changed)";
    let a = backup(&bin, &vault, &data.join("xfs.img"), "xfs-diff")?;
    let b = backup(&bin, &vault, &data.join("xfs-changed.img"), "xfs-diff")?;
    let d = diff_pair(&bin, &vault, &a, &b)?;
    println!(
        "    rp diff {label}: {:.2} s, {} compared, {} changes; walks {:.2} s",
        d.diff_s, d.compared, d.changes, d.walk_s
    );
    f.diff.push((label, d));
    Ok(f)
}

/// Times `rp diff a b` and, for reference, walking both trees (`rp ls -R`), page cache dropped
/// before each.
fn diff_pair(bin: &Path, vault: &Path, a: &str, b: &str) -> Result<DiffFigures> {
    cold()?;
    let started = Instant::now();
    let out = elastio_cmd(bin, vault, &["rp", "diff", a, b, "--output-format", "json"]).output()?;
    let diff_s = started.elapsed().as_secs_f64();
    let d: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("rp diff: {}", String::from_utf8_lossy(&out.stderr)))?;
    cold()?;
    let started = Instant::now();
    let mut walked = 0;
    for rp in [a, b] {
        let args = ["rp", "ls", rp, "/", "-R", "--output-format", "json"];
        let out = elastio_cmd(bin, vault, &args).output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("rp ls: {}", String::from_utf8_lossy(&out.stderr)))?;
        walked += v.as_array().map_or(0, |a| a.len() as u64);
    }
    let walk_s = started.elapsed().as_secs_f64();
    let n = |k: &str| d[k].as_u64().unwrap_or(0);
    Ok(DiffFigures {
        diff_s,
        compared: n("compared"),
        same_by_key: n("same_by_key"),
        bytes_read: n("bytes_read"),
        changes: n("added") + n("removed") + n("changed"),
        walk_s,
        walked,
    })
}

/// `xfs-changed.img`: `xfs.img` with files changed through the kernel: every 30th file (in
/// path order) appended to, every 97th removed, 100 new files of 64 KiB in a new directory.
fn change_files(data: &Path, work: &Path) -> Result<()> {
    let out = data.join("xfs-changed.img");
    run_cmd(
        "cp",
        &[
            "--sparse=always",
            data.join("xfs.img").to_str().unwrap(),
            out.to_str().unwrap(),
        ],
        &[],
    )?;
    let mnt = work.join("mnt-xfs-change");
    fs::create_dir_all(&mnt)?;
    mount(&["-o", "loop", out.to_str().unwrap(), mnt.to_str().unwrap()])?;
    let changed = (|| -> Result<()> {
        let mut files = Vec::new();
        let mut stack = vec![mnt.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d)? {
                let e = e?;
                let t = e.file_type()?;
                if t.is_dir() {
                    stack.push(e.path());
                } else if t.is_file() {
                    files.push(e.path());
                }
            }
        }
        files.sort();
        for (i, p) in files.iter().enumerate() {
            if i % 97 == 0 {
                fs::remove_file(p)?;
            } else if i % 30 == 0 {
                let mut f = fs::OpenOptions::new().append(true).open(p)?;
                std::io::Write::write_all(&mut f, &[0x5a; 4096])?;
            }
        }
        fs::create_dir(mnt.join("added"))?;
        for i in 0..100u8 {
            fs::write(mnt.join(format!("added/file-{i:03}")), vec![i; 64 << 10])?;
        }
        Ok(())
    })();
    umount(&mnt)?;
    changed
}

pub fn report(f: &FsFigures) -> String {
    let mut t = String::from(
        "File systems in disk RPs (find + cat of every file, page cache dropped before each):\n",
    );
    for (name, p) in [("XFS", &f.xfs), ("NTFS", &f.ntfs)] {
        match p {
            Some(p) => {
                t += &format!(
                    "{name}: {} files: elastio mount {:.2} s, {} {:.2} s: {}/elastio {:.2} (bar: >= 0.5)\n",
                    p.files, p.elastio, p.reference_name, p.reference, p.reference_name, p.reference / p.elastio
                )
            }
            None => t += &format!("{name}: not measured (needs root)\n"),
        }
    }
    if f.diff.is_empty() {
        t += "rp diff: not measured\n";
    }
    for (label, d) in &f.diff {
        t += &format!(
            "rp diff {label}: {:.2} s, {} paths compared ({} files by their chunks, {} MiB read), {} changes; \
             walking both trees (rp ls -R, twice) {:.2} s for {} paths: diff/walks {:.2}\n",
            d.diff_s,
                d.compared,
                d.same_by_key,
                d.bytes_read >> 20,
                d.changes,
                d.walk_s,
                d.walked,
                d.diff_s / d.walk_s
        );
    }
    t
}
