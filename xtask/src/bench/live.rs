//! `cargo xtask bench live` (issue 19): backups of disks that live on.
//!
//! Used-blocks-only full backups: an ext4 and an XFS image of 2 GiB, each filled to ~90 % with
//! files of pseudo-random bytes of which a third is then deleted (~60 % used, the deleted
//! files' bytes left in the free space), backed up with `--skip-free` and without, each into
//! a vault of its own. Bars: bytes read ≤ used bytes + 5 %, stored bytes less than without.
//! Needs root (loop mounts to fill the images): otherwise nothing is measured.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::{elastio_cmd, measure};
use crate::util::run_cmd;

const IMAGE: u64 = 2 << 30;
/// Bumped when the images change.
const DATA_VERSION: &str = "2";

pub struct UsedFigures {
    pub fs: &'static str,
    pub size: u64,
    pub used: u64,
    pub read: u64,
    pub free_skipped: u64,
    pub stored: u64,
    pub stored_without: u64,
    pub read_without: u64,
    pub secs: f64,
    pub secs_without: f64,
}

#[derive(Default)]
pub struct LiveFigures {
    pub used: Vec<UsedFigures>,
}

/// Fast pseudo-random bytes (xorshift64*), distinct per seed.
fn random_file(path: &Path, seed: u64, len: u64) -> Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            w.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// Used bytes of the file system mounted at `dir` (statvfs).
fn used_bytes(dir: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(dir.to_str().unwrap())?;
    // SAFETY: statvfs is plain data, filled by the call for a NUL-terminated path.
    #[allow(unsafe_code)]
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            bail!(
                "statvfs {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            );
        }
        st
    };
    Ok((st.f_blocks - st.f_bfree) * st.f_frsize)
}

/// Makes `img` (2 GiB) with `mkfs`, fills it to ~90 % with random files, deletes every third
/// and returns the used bytes as the kernel counts them.
fn make_image(img: &Path, mkfs: &[&str], work: &Path) -> Result<u64> {
    File::create(img)?.set_len(IMAGE)?;
    let mut args = mkfs[1..].to_vec();
    args.push(img.to_str().unwrap());
    run_cmd(mkfs[0], &args, &[])?;
    let mnt = work.join("mnt-live-fill");
    fs::create_dir_all(&mnt)?;
    run_cmd(
        "mount",
        &["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
        &[],
    )?;
    let filled = (|| -> Result<u64> {
        let mut total = 0u64;
        let mut i = 0u64;
        // Sizes from 64 KiB to ~8 MiB, mixed, so the free space left is fragmented.
        while total < IMAGE / 10 * 9 - (64 << 20) {
            let len = (64 << 10) << (i % 8);
            random_file(&mnt.join(format!("f{i:05}")), 7 + i, len)?;
            total += len;
            i += 1;
        }
        // Written back before the deletions, so the deleted files' bytes are on the disk (XFS
        // would otherwise drop never-written delayed allocations).
        // SAFETY: sync(2) has no preconditions.
        #[allow(unsafe_code)]
        unsafe {
            libc::sync()
        };
        for j in (0..i).step_by(3) {
            fs::remove_file(mnt.join(format!("f{j:05}")))?;
        }
        // SAFETY: sync(2) has no preconditions.
        #[allow(unsafe_code)]
        unsafe {
            libc::sync()
        };
        used_bytes(&mnt)
    })();
    run_cmd("umount", &[mnt.to_str().unwrap()], &[])?;
    filled
}

fn prepare(data: &Path, work: &Path) -> Result<Vec<(&'static str, u64)>> {
    let stamp = data.join("live-stamp");
    let read_stamp = || -> Option<Vec<(&'static str, u64)>> {
        let text = fs::read_to_string(&stamp).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        (v["version"] == DATA_VERSION).then_some(())?;
        Some(vec![
            ("ext4", v["ext4"].as_u64()?),
            ("xfs", v["xfs"].as_u64()?),
        ])
    };
    if let Some(v) = read_stamp() {
        return Ok(v);
    }
    println!("==> making the used-blocks images (2 GiB each, ~60 % used)");
    let ext4 = make_image(
        &data.join("used-ext4.img"),
        &["mkfs.ext4", "-q", "-F"],
        work,
    )?;
    let xfs = make_image(&data.join("used-xfs.img"), &["mkfs.xfs", "-q", "-f"], work)?;
    fs::write(
        &stamp,
        serde_json::json!({"version": DATA_VERSION, "ext4": ext4, "xfs": xfs}).to_string(),
    )?;
    Ok(vec![("ext4", ext4), ("xfs", xfs)])
}

pub fn bench(root: &Path, data: &Path, work: &Path) -> Result<LiveFigures> {
    let mut f = LiveFigures::default();
    if !crate::util::is_root() {
        println!("bench live: needs root (loop mounts); skipped");
        return Ok(f);
    }
    let bin = root.join("target/release/elastio");
    let images = prepare(data, work)?;
    for (fs_name, used) in images {
        let img = data.join(format!("used-{fs_name}.img"));
        let run = |vault: &Path, extra: &[&str]| -> Result<(f64, serde_json::Value)> {
            let _ = fs::remove_dir_all(vault);
            let init = elastio_cmd(&bin, vault, &["vault", "init"]).output()?;
            if !init.status.success() {
                bail!("vault init: {}", String::from_utf8_lossy(&init.stderr));
            }
            let mut args = vec![
                "block",
                "backup",
                img.to_str().unwrap(),
                "--output-format",
                "json",
            ];
            args.extend_from_slice(extra);
            let (wall, _, _, out) = measure(&mut elastio_cmd(&bin, vault, &args))?;
            let v: serde_json::Value = serde_json::from_str(&out).context("backup json")?;
            Ok((wall.as_secs_f64(), v))
        };
        let (secs, with) = run(&work.join(format!("live-{fs_name}-free")), &["--skip-free"])?;
        let (secs_without, without) = run(&work.join(format!("live-{fs_name}-all")), &[])?;
        let n = |v: &serde_json::Value, k: &[&str]| -> u64 {
            k.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0)
        };
        f.used.push(UsedFigures {
            fs: fs_name,
            size: IMAGE,
            used,
            read: n(&with, &["figures", "bytes_read"]),
            free_skipped: n(&with, &["figures", "free_skipped"]),
            stored: n(&with, &["rp", "new_bytes_stored"]),
            stored_without: n(&without, &["rp", "new_bytes_stored"]),
            read_without: n(&without, &["figures", "bytes_read"]),
            secs,
            secs_without,
        });
    }
    Ok(f)
}

pub fn report(f: &LiveFigures) -> String {
    let mut s = String::new();
    if f.used.is_empty() {
        return s;
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    s.push_str("\n== used blocks only (full backup of a 2 GiB image, ~60 % used, deleted files' bytes in its free space)\n");
    s.push_str("fs     used MiB  read MiB  read/used  bar ≤1.05   stored MiB  without  ratio  time s  without s\n");
    for u in &f.used {
        let ratio = u.read as f64 / u.used.max(1) as f64;
        s.push_str(&format!(
            "{:<6} {:>8.0}  {:>8.0}  {:>9.3}  {:<9}   {:>10.0}  {:>7.0}  {:>5.2}  {:>6.2}  {:>9.2}\n",
            u.fs,
            mib(u.used),
            mib(u.read),
            ratio,
            if ratio <= 1.05 { "met" } else { "MISSED" },
            mib(u.stored),
            mib(u.stored_without),
            u.stored as f64 / u.stored_without.max(1) as f64,
            u.secs,
            u.secs_without,
        ));
        let _ = (u.size, u.free_skipped, u.read_without);
    }
    s
}
