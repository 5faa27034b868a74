//! `cargo xtask bench live` (issue 19): backups of disks that live on.
//!
//! Used-blocks-only full backups: an ext4 and an XFS image of 2 GiB, each filled to ~90 % with
//! files of pseudo-random bytes of which a third is then deleted (~60 % used, the deleted
//! files' bytes left in the free space), backed up with `--skip-free` and without, each into
//! a vault of its own. Bars: bytes read ≤ used bytes + 5 % (used as the file system counts it:
//! its allocated blocks, metadata included), stored bytes less than without.
//!
//! Dirty-bitmap incrementals: the bench's base image as a qcow2 with a persistent dirty bitmap
//! (4 KiB granularity), backed up in full over NBD (qemu-nbd); then the bytes that differ
//! between base.img and changed.img written into it through qemu-storage-daemon (a FUSE export,
//! as a guest would), and the incremental read over NBD with `--dirty-bitmap`. Bars: bytes read
//! (the 1 % verification sample aside) ≤ 1.1 × the bytes that changed, and ≥ 10× faster than
//! restic's backup of changed.img after base.img. The RP is restored and compared.
//! Needs root (loop mounts and FUSE): otherwise nothing is measured.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::{elastio_cmd, measure, restic_cmd};
use crate::util::{run_cmd, sha256, warm};

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

pub struct BitmapFigures {
    pub changed: u64,
    pub read: u64,
    pub verified: u64,
    pub secs: f64,
    pub full_secs: f64,
    pub restic_secs: f64,
    pub restored_equal: bool,
}

#[derive(Default)]
pub struct LiveFigures {
    pub used: Vec<UsedFigures>,
    pub bitmap: Option<BitmapFigures>,
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

/// Bytes the file system on `img` has allocated, from its own superblock counters.
fn fs_used(fs: &str, img: &Path) -> Result<u64> {
    let out = |cmd: &str, args: &[&str]| -> Result<String> {
        let o = std::process::Command::new(cmd).args(args).output()?;
        if !o.status.success() {
            bail!("{cmd} failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let field = |text: &str, name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_start_matches('=').trim().parse().ok())
            .with_context(|| format!("{name} in {text}"))
    };
    let img = img.to_str().unwrap();
    Ok(if fs == "ext4" {
        let t = out("dumpe2fs", &["-h", img])?;
        (field(&t, "Block count:")? - field(&t, "Free blocks:")?) * field(&t, "Block size:")?
    } else {
        let t = out(
            "xfs_db",
            &[
                "-r",
                "-c",
                "sb 0",
                "-c",
                "p dblocks fdblocks blocksize",
                img,
            ],
        )?;
        (field(&t, "dblocks")? - field(&t, "fdblocks")?) * field(&t, "blocksize")?
    })
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
    for (fs_name, _statvfs_used) in images {
        let img = data.join(format!("used-{fs_name}.img"));
        // Used as the file system counts it: every allocated block, metadata, journal and log
        // included (statvfs leaves ext4's overhead out).
        let used = fs_used(fs_name, &img)?;
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
    f.bitmap = Some(bench_bitmap(&bin, data, work)?);
    Ok(f)
}

/// Runs of 4 KiB pages that differ between `a` and `b` (same size).
fn differing(a: &Path, b: &Path) -> Result<Vec<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    let size = fa.metadata()?.len();
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = 0;
    while at < size {
        let n = ((size - at) as usize).min(x.len());
        fa.read_exact_at(&mut x[..n], at)?;
        fb.read_exact_at(&mut y[..n], at)?;
        for (i, (p, q)) in x[..n].chunks(4096).zip(y[..n].chunks(4096)).enumerate() {
            if p != q {
                let s = at + i as u64 * 4096;
                let e = s + p.len() as u64;
                match out.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => out.push((s, e)),
                }
            }
        }
        at += n as u64;
    }
    Ok(out)
}

/// A child process killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_path(p: &Path) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !p.exists() {
        if std::time::Instant::now() > deadline {
            bail!("{} did not appear", p.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

fn qemu_nbd(image: &Path, sock: &Path, bitmap: Option<&str>) -> Result<Child> {
    let _ = fs::remove_file(sock);
    let mut c = std::process::Command::new("qemu-nbd");
    c.args(["-r", "-t", "-f", "qcow2", "-x", "vm", "-k"])
        .arg(sock);
    if let Some(b) = bitmap {
        c.args(["-B", b]);
    }
    let child = Child(c.arg(image).spawn().context("qemu-nbd")?);
    wait_for_path(sock)?;
    // Serving (image opened, bitmap loaded) before anything is timed: one client, then it
    // waits for the next (-t).
    let uri = format!("nbd+unix:///vm?socket={}", sock.display());
    run_cmd("nbdinfo", &["--size", &uri], &[])?;
    Ok(child)
}

fn bench_bitmap(bin: &Path, data: &Path, work: &Path) -> Result<BitmapFigures> {
    let base = data.join("base.img");
    let changed_img = data.join("changed.img");
    let qcow_base = data.join("base.qcow2");
    if !qcow_base.exists() {
        println!("==> base.qcow2 from base.img");
        run_cmd(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                base.to_str().unwrap(),
                qcow_base.to_str().unwrap(),
            ],
            &[],
        )?;
    }
    let dir = work.join("bitmap");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let vm = dir.join("vm.qcow2");
    run_cmd(
        "cp",
        &[
            "--sparse=always",
            qcow_base.to_str().unwrap(),
            vm.to_str().unwrap(),
        ],
        &[],
    )?;
    run_cmd(
        "qemu-img",
        &["bitmap", "--add", "-g", "4096", vm.to_str().unwrap(), "b0"],
        &[],
    )?;
    let vault = dir.join("vault");
    let init = elastio_cmd(bin, &vault, &["vault", "init"]).output()?;
    if !init.status.success() {
        bail!("vault init: {}", String::from_utf8_lossy(&init.stderr));
    }
    let sock = dir.join("nbd.sock");
    let uri = format!("nbd+unix:///vm?socket={}", sock.display());
    let backup = |extra: &[&str]| -> Result<(f64, serde_json::Value)> {
        let mut args = vec![
            "block",
            "backup",
            uri.as_str(),
            "--asset-name",
            "vm",
            "--output-format",
            "json",
        ];
        args.extend_from_slice(extra);
        let (wall, _, _, out) = measure(&mut elastio_cmd(bin, &vault, &args))?;
        Ok((
            wall.as_secs_f64(),
            serde_json::from_str(&out).context("backup json")?,
        ))
    };
    let nbd = qemu_nbd(&vm, &sock, None)?;
    let (full_secs, full) = backup(&[])?;
    drop(nbd);
    let parent = full["rp"]["id"].as_str().context("rp id")?.to_string();

    // The changes, written into the qcow2 through qemu-storage-daemon as a guest would.
    let runs = differing(&base, &changed_img)?;
    let changed: u64 = runs.iter().map(|(s, e)| e - s).sum();
    let (qmp, fuse) = (dir.join("qmp.sock"), dir.join("fuse.img"));
    fs::write(&fuse, b"")?;
    let qsd = Child(
        std::process::Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                vm.display()
            ))
            .args(["--blockdev", "driver=qcow2,node-name=disk0,file=file0"])
            .arg("--export")
            .arg(format!(
                "type=fuse,id=w0,node-name=disk0,mountpoint={},writable=on",
                fuse.display()
            ))
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qmp0",
                qmp.display()
            ))
            .args(["--monitor", "chardev=qmp0"])
            .spawn()
            .context("qemu-storage-daemon")?,
    );
    wait_for_path(&qmp)?;
    {
        use std::os::unix::fs::FileExt;
        while fs::metadata(&fuse)?.len() == 0 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let src = File::open(&changed_img)?;
        let dst = File::options().write(true).open(&fuse)?;
        let mut buf = vec![0u8; 1 << 20];
        for &(s, e) in &runs {
            let mut at = s;
            while at < e {
                let n = ((e - at) as usize).min(buf.len());
                src.read_exact_at(&mut buf[..n], at)?;
                dst.write_all_at(&buf[..n], at)?;
                at += n as u64;
            }
        }
        dst.sync_all()?;
    }
    // A clean stop stores the persistent bitmap in the qcow2.
    // SAFETY: kill(2) with a live child's pid.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(qsd.0.id() as i32, libc::SIGTERM)
    };
    let mut qsd = qsd;
    qsd.0.wait()?;
    let _ = run_cmd("umount", &["-l", fuse.to_str().unwrap()], &[]);

    // Both tools read their source from the page cache.
    warm(&vm)?;
    let nbd = qemu_nbd(&vm, &sock, Some("b0"))?;
    let (secs, inc) = backup(&["--dirty-bitmap", "b0", "--parent", &parent])?;
    drop(nbd);
    let n = |k: &str| inc["figures"][k].as_u64().unwrap_or(0);
    let target = dir.join("restored.img");
    let r = elastio_cmd(
        bin,
        &vault,
        &[
            "block",
            "restore",
            "--rp",
            inc["rp"]["id"].as_str().unwrap_or(""),
            target.to_str().unwrap(),
        ],
    )
    .output()?;
    if !r.status.success() {
        bail!("restore: {}", String::from_utf8_lossy(&r.stderr));
    }
    let restored_equal = sha256(&target)? == sha256(&changed_img)?;
    let _ = fs::remove_file(&target);

    // restic: the same two images, the second timed.
    let repo = dir.join("restic-repo");
    let cache = dir.join("restic-cache");
    measure(restic_cmd(&repo, &cache).args(["init", "--repository-version", "2"]))?;
    let restic = |img: &Path| -> Result<f64> {
        warm(img)?;
        let (wall, ..) = measure(
            restic_cmd(&repo, &cache)
                .args([
                    "backup",
                    "--stdin",
                    "--stdin-filename",
                    "disk.img",
                    "--host",
                    "bench",
                ])
                .stdin(std::process::Stdio::from(File::open(img)?)),
        )?;
        Ok(wall.as_secs_f64())
    };
    restic(&base)?;
    let restic_secs = restic(&changed_img)?;
    let _ = fs::remove_dir_all(&repo);
    Ok(BitmapFigures {
        changed,
        read: n("bytes_read"),
        verified: n("unchanged_verified"),
        secs,
        full_secs,
        restic_secs,
        restored_equal,
    })
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
    if let Some(b) = &f.bitmap {
        let ratio = (b.read - b.verified) as f64 / b.changed.max(1) as f64;
        let speedup = b.restic_secs / b.secs.max(1e-3);
        s.push_str("\n== dirty-bitmap incremental over NBD (changed.img's changes written into a qcow2 through qemu-storage-daemon)\n");
        s.push_str(&format!(
            "changed {:.1} MiB, read {:.1} MiB + {:.1} MiB verification sample: read/changed {:.3} (bar ≤ 1.1: {})\n",
            mib(b.changed),
            mib(b.read - b.verified),
            mib(b.verified),
            ratio,
            if ratio <= 1.1 { "met" } else { "MISSED" }
        ));
        s.push_str(&format!(
            "elastio incremental {:.2} s (full {:.2} s), restic {:.2} s: {:.1}x faster (bar ≥ 10x: {}); restored RP equals changed.img: {}\n",
            b.secs,
            b.full_secs,
            b.restic_secs,
            speedup,
            if speedup >= 10.0 { "met" } else { "MISSED" },
            b.restored_equal
        ));
    }
    s
}
