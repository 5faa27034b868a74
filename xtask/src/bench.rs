//! `cargo xtask bench`: elastio against restic and borg on the same ext4 images, in one run.
//!
//! Data (built once, cached under `target/bench-data/`):
//! * `base.img`: a 2 GiB ext4 image holding ~1.1 GiB of real files copied from `/usr`, made with
//!   `mkfs.ext4 -d` (no root needed);
//! * `changed.img`: base with ~7 % of its used blocks rewritten, in runs of 64 KiB to 1 MiB, with
//!   bytes taken from elsewhere in the image (so the new data compresses like real data);
//! * `third.img`: base plus ~400 MiB of other real files written into its free space (a clone
//!   that shares the base but has other data);
//! * `small.img`: the first 256 MiB of base, to show backup memory does not grow with size.
//!
//! Steps per tool: full backup of base, incremental backup of changed (same asset), backup of
//! third, restore of the full backup (sha256 verified). elastio also times an unchanged re-backup.
//! Each step reports wall and CPU seconds, peak RSS (wait4), and the repository size after it.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::util::{cargo, dir_bytes, ensure_tools, root_dir, run_cmd, sha256, warm};
use crate::{BENCH_TOOLS, TEST_TOOLS};

const IMAGE_SIZE: u64 = 2 << 30;
const BASE_BUDGET: u64 = 1100 << 20;
const THIRD_EXTRA: u64 = 400 << 20;
/// Bump when the way images are made changes, to rebuild the cache.
const DATA_VERSION: &str = "3";

struct Sample {
    tool: &'static str,
    step: &'static str,
    wall: Duration,
    cpu: f64,
    rss_mib: f64,
    vault_bytes: u64,
    image_bytes: u64,
}

pub fn run(_args: &[String]) -> Result<()> {
    ensure_tools(TEST_TOOLS)?;
    ensure_tools(BENCH_TOOLS)?;
    cargo(
        &["build", "--release", "--locked", "-p", "elastio-cli"],
        &[],
    )?;
    let root = root_dir();
    let data = root.join("target/bench-data");
    prepare(&data)?;
    let work = root.join("target/bench");
    if work.exists() {
        fs::remove_dir_all(&work)?;
        // Deleting the previous run's repositories frees GiBs; on file systems mounted with
        // `discard` that keeps the disk busy for a while. Let it settle before timing anything.
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        std::thread::sleep(Duration::from_secs(5));
    }
    fs::create_dir_all(&work)?;
    let base = data.join("base.img");
    let base_sha = sha256(&base)?;

    let mut samples = Vec::new();
    let (elastio, full_rp) = bench_elastio(&root, &data, &work, &base_sha)?;
    samples.extend(elastio);
    samples.extend(bench_restic(&data, &work, &base_sha)?);
    samples.extend(bench_borg(&data, &work, &base_sha)?);
    let nbd = bench_nbd(&root, &data, &work, &full_rp)?;
    report(&samples, &nbd, &work)
}

fn prepare(data: &Path) -> Result<()> {
    let stamp = data.join("stamp");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(DATA_VERSION) {
        println!("==> using cached images in {}", data.display());
        return Ok(());
    }
    let _ = fs::remove_dir_all(data);
    fs::create_dir_all(data)?;
    let tree = data.join("tree");
    fs::create_dir_all(&tree)?;
    let candidates = [
        "/usr/bin",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/share/doc",
        "/usr/share/man",
        "/usr/include",
        "/usr/lib/gcc",
        "/usr/lib/python3.11",
        "/usr/share/locale",
        "/usr/lib/jvm",
        "/usr/sbin",
        "/usr/libexec",
        "/usr/share",
    ];
    let mut total = 0;
    for (i, c) in candidates.iter().enumerate() {
        if total >= BASE_BUDGET || !Path::new(c).is_dir() {
            continue;
        }
        let dst = tree.join(format!("{i:02}{}", c.replace('/', "_")));
        println!("==> copying {c} into the base tree");
        let _ = Command::new("cp").args(["-a", c]).arg(&dst).status()?;
        total = dir_bytes(&tree);
    }
    println!("==> base tree holds {} MiB", total >> 20);
    if total < 1 << 30 {
        bail!("could not gather 1 GiB of real files from /usr for the base image");
    }
    let base = data.join("base.img");
    File::create(&base)?.set_len(IMAGE_SIZE)?;
    run_cmd(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            tree.to_str().unwrap(),
            base.to_str().unwrap(),
        ],
        &[],
    )?;
    fs::remove_dir_all(&tree)?;

    let changed = data.join("changed.img");
    run_cmd(
        "cp",
        &[
            "--sparse=always",
            base.to_str().unwrap(),
            changed.to_str().unwrap(),
        ],
        &[],
    )?;
    let pct = mutate(&changed, 0.07)?;
    println!("==> changed.img: rewrote {pct:.1} % of the used bytes");

    let third = data.join("third.img");
    run_cmd(
        "cp",
        &[
            "--sparse=always",
            base.to_str().unwrap(),
            third.to_str().unwrap(),
        ],
        &[],
    )?;
    let wrote = write_other_data(&third, IMAGE_SIZE * 5 / 8, THIRD_EXTRA)?;
    println!(
        "==> third.img: base plus {} MiB of other files",
        wrote >> 20
    );

    let small = data.join("small.img");
    copy_prefix(&base, &small, 256 << 20)?;
    fs::write(&stamp, DATA_VERSION)?;
    Ok(())
}

/// Data extents of a sparse file.
fn extents(f: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        // SAFETY: lseek on an fd we own.
        let start = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if start < 0 {
            break;
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        out.push((start as u64, end as u64));
        pos = end;
    }
    Ok(out)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Rewrites `fraction` of the used bytes in runs, with data from elsewhere in the image.
fn mutate(path: &Path, fraction: f64) -> Result<f64> {
    let f = OpenOptions::new().read(true).write(true).open(path)?;
    let ex = extents(&f, IMAGE_SIZE)?;
    let used: u64 = ex.iter().map(|(s, e)| e - s).sum();
    let target = (used as f64 * fraction) as u64;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut done = 0;
    let pick = |rng: &mut Rng, len: u64| -> Option<u64> {
        let big: Vec<&(u64, u64)> = ex.iter().filter(|(s, e)| e - s >= len).collect();
        if big.is_empty() {
            return None;
        }
        let (s, e) = big[(rng.next() % big.len() as u64) as usize];
        Some((s + rng.next() % (e - s - len + 1)) & !4095)
    };
    let mut buf = vec![0u8; 1 << 20];
    while done < target {
        let len = (64 << 10) << (rng.next() % 5); // 64 KiB .. 1 MiB
        let (Some(dst), Some(src)) = (pick(&mut rng, len), pick(&mut rng, len + 1024)) else {
            break;
        };
        let b = &mut buf[..len as usize];
        f.read_exact_at(b, src + 1024)?;
        f.write_all_at(b, dst)?;
        done += len;
    }
    f.sync_all()?;
    Ok(done as f64 * 100.0 / used as f64)
}

/// Writes up to `limit` bytes of a tar of other real files at `offset`.
fn write_other_data(path: &Path, offset: u64, limit: u64) -> Result<u64> {
    let sources: Vec<&str> = [
        "usr/lib/llvm-14",
        "opt",
        "usr/lib/google-cloud-sdk",
        "root/.rustup",
    ]
    .into_iter()
    .filter(|p| Path::new("/").join(p).exists())
    .collect();
    let mut child = Command::new("tar")
        .args(["-c", "-C", "/"])
        .args(&sources)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run tar")?;
    let mut out = child.stdout.take().unwrap();
    let f = OpenOptions::new().write(true).open(path)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut written = 0;
    while written < limit {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let n = n.min((limit - written) as usize);
        f.write_all_at(&buf[..n], offset + written)?;
        written += n as u64;
    }
    drop(out);
    let _ = child.kill();
    let _ = child.wait();
    f.sync_all()?;
    Ok(written)
}

fn copy_prefix(src: &Path, dst: &Path, len: u64) -> Result<()> {
    let s = File::open(src)?;
    let d = File::create(dst)?;
    d.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        s.read_exact_at(&mut buf, pos)?;
        if buf.iter().any(|b| *b != 0) {
            d.write_all_at(&buf, pos)?;
        }
        pos += buf.len() as u64;
    }
    Ok(())
}

/// Runs a command to completion, measuring wall time, CPU time and peak RSS of the child
/// (`wait4` rusage: user + system seconds, `ru_maxrss`).
fn measure(cmd: &mut Command) -> Result<(Duration, f64, f64, String)> {
    // Start every step with no dirty data pending, so no tool pays for another's writeback
    // (or, on file systems mounted with `discard`, for the previous step's deletions).
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child, which std has not reaped.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the pointers are to live locals.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let wall = started.elapsed();
    if r < 0 {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let (out, err) = (stdout.join().unwrap(), stderr.join().unwrap());
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("{cmd:?} failed (wait status {status}): {err}");
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let cpu = secs(ru.ru_utime) + secs(ru.ru_stime);
    Ok((wall, cpu, ru.ru_maxrss as f64 / 1024.0, out))
}

fn stdin_of(path: &Path) -> Result<Stdio> {
    Ok(Stdio::from(File::open(path)?))
}

fn sample(
    tool: &'static str,
    step: &'static str,
    m: (Duration, f64, f64, String),
    repo: &Path,
    image: &Path,
) -> Sample {
    let s = Sample {
        tool,
        step,
        wall: m.0,
        cpu: m.1,
        rss_mib: m.2,
        vault_bytes: dir_bytes(repo),
        image_bytes: fs::metadata(image).map(|m| m.len()).unwrap_or(0),
    };
    println!(
        "    {tool:<8} {step:<10} {:>7.2} s wall {:>7.2} s cpu {:>7.1} MiB rss  repo {} MiB",
        s.wall.as_secs_f64(),
        s.cpu,
        s.rss_mib,
        s.vault_bytes >> 20
    );
    s
}

fn verify(out: &Path, want: &str, tool: &str) -> Result<()> {
    let got = sha256(out)?;
    if got != want {
        bail!("{tool} restore is not byte-exact: {got} != {want}");
    }
    fs::remove_file(out)?;
    Ok(())
}

fn bench_elastio(
    root: &Path,
    data: &Path,
    work: &Path,
    base_sha: &str,
) -> Result<(Vec<Sample>, String)> {
    println!("==> elastio");
    let bin = root.join("target/release/elastio");
    let vault = work.join("elastio-vault");
    let env = |c: &mut Command| {
        c.env("ELASTIO_VAULT", &vault)
            .env("ELASTIO_PASSWORD", "bench")
            .arg("--quiet");
    };
    let run = |args: &[&str]| -> Result<(Duration, f64, f64, String)> {
        let mut c = Command::new(&bin);
        c.args(args);
        env(&mut c);
        measure(&mut c)
    };
    run(&["vault", "init"])?;
    let mut out = Vec::new();
    let record = |out: &mut Vec<Sample>, step, m, img: &str| {
        out.push(sample("elastio", step, m, &vault, &data.join(img)))
    };
    let backup = |img: &str, asset: &str| -> Result<(Duration, f64, f64, String)> {
        let p = data.join(img);
        warm(&p)?;
        run(&[
            "block",
            "backup",
            p.to_str().unwrap(),
            "--asset-name",
            asset,
            "--output-format",
            "json",
        ])
    };
    let m = backup("base.img", "disk")?;
    let full_rp = serde_json::from_str::<serde_json::Value>(&m.3)?["rp"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    record(&mut out, "full", m, "base.img");
    let m = backup("base.img", "disk")?;
    record(&mut out, "unchanged", m, "base.img");
    let m = backup("changed.img", "disk")?;
    record(&mut out, "incr", m, "changed.img");
    let m = backup("third.img", "third")?;
    record(&mut out, "third", m, "third.img");
    let target = work.join("elastio-restore.img");
    let m = run(&[
        "block",
        "restore",
        "--rp",
        &full_rp,
        target.to_str().unwrap(),
    ])?;
    record(&mut out, "restore", m, "base.img");
    verify(&target, base_sha, "elastio")?;
    // Memory must not grow with the disk: back up the 256 MiB image into a fresh vault (all of
    // its data new, like the 2 GiB full backup) and compare peak RSS.
    let small_vault = work.join("elastio-small-vault");
    let small = data.join("small.img");
    let mut c = Command::new(&bin);
    c.args(["vault", "init"]);
    c.env("ELASTIO_VAULT", &small_vault)
        .env("ELASTIO_PASSWORD", "bench");
    measure(&mut c)?;
    warm(&small)?;
    let mut c = Command::new(&bin);
    c.args(["--quiet", "block", "backup", small.to_str().unwrap()]);
    c.env("ELASTIO_VAULT", &small_vault)
        .env("ELASTIO_PASSWORD", "bench");
    let m = measure(&mut c)?;
    out.push(sample("elastio", "small", m, &small_vault, &small));
    Ok((out, full_rp))
}

fn bench_restic(data: &Path, work: &Path, base_sha: &str) -> Result<Vec<Sample>> {
    println!("==> restic");
    let repo = work.join("restic-repo");
    let cache = work.join("restic-cache");
    let cmd = || {
        let mut c = Command::new("restic");
        c.env("RESTIC_REPOSITORY", &repo)
            .env("RESTIC_PASSWORD", "bench")
            .env("RESTIC_CACHE_DIR", &cache)
            .arg("--quiet");
        c
    };
    measure(cmd().args(["init", "--repository-version", "2"]))?;
    let mut out = Vec::new();
    let record = |out: &mut Vec<Sample>, step, m, img: &str| {
        out.push(sample("restic", step, m, &repo, &data.join(img)))
    };
    let backup = |img: &str, name: &str| -> Result<(Duration, f64, f64, String)> {
        let p = data.join(img);
        warm(&p)?;
        measure(
            cmd()
                .args([
                    "backup",
                    "--stdin",
                    "--stdin-filename",
                    name,
                    "--compression",
                    "auto",
                    "--host",
                    "bench",
                    "--json",
                ])
                .stdin(stdin_of(&p)?),
        )
    };
    let m = backup("base.img", "disk.img")?;
    let snap =
        m.3.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v["snapshot_id"].as_str().map(String::from))
            .context("restic printed no snapshot id")?;
    record(&mut out, "full", m, "base.img");
    let m = backup("changed.img", "disk.img")?;
    record(&mut out, "incr", m, "changed.img");
    let m = backup("third.img", "third.img")?;
    record(&mut out, "third", m, "third.img");
    let target = work.join("restic-restore");
    let m = measure(cmd().args(["restore", &snap, "--target", target.to_str().unwrap()]))?;
    record(&mut out, "restore", m, "base.img");
    verify(&target.join("disk.img"), base_sha, "restic")?;
    Ok(out)
}

fn bench_borg(data: &Path, work: &Path, base_sha: &str) -> Result<Vec<Sample>> {
    println!("==> borg");
    let repo = work.join("borg-repo");
    let base_dir = work.join("borg-home");
    let cmd = || {
        let mut c = Command::new("borg");
        c.env("BORG_PASSPHRASE", "bench")
            .env("BORG_BASE_DIR", &base_dir)
            .env("BORG_REPO", &repo);
        c
    };
    measure(cmd().args(["init", "--encryption", "repokey-blake2"]))?;
    let mut out = Vec::new();
    let record = |out: &mut Vec<Sample>, step, m, img: &str| {
        out.push(sample("borg", step, m, &repo, &data.join(img)))
    };
    let backup = |img: &str, archive: &str, name: &str| -> Result<(Duration, f64, f64, String)> {
        let p = data.join(img);
        warm(&p)?;
        measure(
            cmd()
                .args([
                    "create",
                    "--compression",
                    "zstd",
                    "--stdin-name",
                    name,
                    &format!("::{archive}"),
                    "-",
                ])
                .stdin(stdin_of(&p)?),
        )
    };
    let m = backup("base.img", "full", "disk.img")?;
    record(&mut out, "full", m, "base.img");
    let m = backup("changed.img", "incr", "disk.img")?;
    record(&mut out, "incr", m, "changed.img");
    let m = backup("third.img", "third", "third.img")?;
    record(&mut out, "third", m, "third.img");
    let target = work.join("borg-restore");
    fs::create_dir_all(&target)?;
    let m = measure(cmd().args(["extract", "::full"]).current_dir(&target))?;
    record(&mut out, "restore", m, "base.img");
    verify(&target.join("disk.img"), base_sha, "borg")?;
    Ok(out)
}

fn report(samples: &[Sample], nbd: &NbdFigures, work: &Path) -> Result<()> {
    let mut text = String::new();
    let mut line = |s: String| {
        println!("{s}");
        text.push_str(&s);
        text.push('\n');
    };
    line(String::new());
    line(format!(
        "{:<10} {:<8} {:>8} {:>8} {:>9} {:>10} {:>9}",
        "step", "tool", "wall s", "cpu s", "rss MiB", "repo MiB", "MiB/s"
    ));
    for s in samples {
        line(format!(
            "{:<10} {:<8} {:>8.2} {:>8.2} {:>9.1} {:>10.1} {:>9.0}",
            s.step,
            s.tool,
            s.wall.as_secs_f64(),
            s.cpu,
            s.rss_mib,
            s.vault_bytes as f64 / 1048576.0,
            s.image_bytes as f64 / 1048576.0 / s.wall.as_secs_f64()
        ));
    }
    line(String::new());
    line("ratios elastio/peer (speed = peer wall / elastio wall; others elastio / peer):".into());
    line(format!(
        "{:<10} {:<8} {:>8} {:>8} {:>8} {:>8}",
        "step", "peer", "speed", "cpu", "rss", "repo"
    ));
    let find = |tool: &str, step: &str| samples.iter().find(|s| s.tool == tool && s.step == step);
    let mut ratios = Vec::new();
    for peer in ["restic", "borg"] {
        for step in ["full", "incr", "third", "restore"] {
            let (Some(e), Some(p)) = (find("elastio", step), find(peer, step)) else {
                continue;
            };
            let speed = p.wall.as_secs_f64() / e.wall.as_secs_f64();
            let cpu = e.cpu / p.cpu.max(1e-9);
            let rss = e.rss_mib / p.rss_mib.max(1e-9);
            let repo = e.vault_bytes as f64 / p.vault_bytes.max(1) as f64;
            line(format!(
                "{step:<10} {peer:<8} {speed:>7.2}x {cpu:>8.2} {rss:>8.2} {repo:>8.2}"
            ));
            ratios.push(json!({"step": step, "peer": peer, "speed": speed, "cpu": cpu, "rss": rss, "repo": repo}));
        }
    }
    if let (Some(full), Some(unchanged)) = (find("elastio", "full"), find("elastio", "unchanged")) {
        line(format!(
            "elastio unchanged re-backup is {:.2}x faster than its full backup",
            full.wall.as_secs_f64() / unchanged.wall.as_secs_f64()
        ));
    }
    if let (Some(full), Some(small)) = (find("elastio", "full"), find("elastio", "small")) {
        line(format!(
            "elastio backup peak RSS: {:.0} MiB for 2 GiB, {:.0} MiB for 256 MiB",
            full.rss_mib, small.rss_mib
        ));
    }
    let restic_restore = find("restic", "restore").map(|s| s.wall.as_secs_f64());
    line(String::new());
    line(
        "NBD (the full-backup RP served by `elastio nbd serve`, the raw image by `nbdkit file`):"
            .into(),
    );
    line(format!(
        "nbdcopy to /dev/null: elastio {:.2} s ({:.0} MiB/s), nbdkit {:.2} s ({:.0} MiB/s): elastio/nbdkit {:.2}",
        nbd.copy_elastio,
        2048.0 / nbd.copy_elastio,
        nbd.copy_nbdkit,
        2048.0 / nbd.copy_nbdkit,
        nbd.copy_nbdkit / nbd.copy_elastio
    ));
    if let Some(r) = restic_restore {
        line(format!(
            "nbdcopy from elastio vs restic full restore: {:.2}x faster",
            r / nbd.copy_elastio
        ));
    }
    for (name, l) in [("elastio", &nbd.rand_elastio), ("nbdkit", &nbd.rand_nbdkit)] {
        line(format!(
            "qemu-io 4 KiB random reads ({} ops, warm): {name:<8} {:>7.0} IOPS  p50 {:>6.0} us  p99 {:>6.0} us",
            l.ops, l.iops, l.p50_us, l.p99_us
        ));
    }
    let results = json!({
        "nbd": {
            "nbdcopy_elastio_s": nbd.copy_elastio, "nbdcopy_nbdkit_s": nbd.copy_nbdkit,
            "random_elastio": {"iops": nbd.rand_elastio.iops, "p50_us": nbd.rand_elastio.p50_us, "p99_us": nbd.rand_elastio.p99_us},
            "random_nbdkit": {"iops": nbd.rand_nbdkit.iops, "p50_us": nbd.rand_nbdkit.p50_us, "p99_us": nbd.rand_nbdkit.p99_us},
        },
        "samples": samples.iter().map(|s| json!({
            "tool": s.tool, "step": s.step, "wall_s": s.wall.as_secs_f64(), "cpu_s": s.cpu,
            "rss_mib": s.rss_mib, "repo_bytes": s.vault_bytes, "image_bytes": s.image_bytes,
        })).collect::<Vec<_>>(),
        "ratios": ratios,
    });
    fs::write(
        work.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    fs::write(work.join("results.txt"), text)?;
    println!("\nresults in {}", work.display());
    Ok(())
}

struct Latency {
    ops: usize,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

struct NbdFigures {
    copy_elastio: f64,
    copy_nbdkit: f64,
    rand_elastio: Latency,
    rand_nbdkit: Latency,
}

/// A server process killed when dropped.
struct Served(std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for(uri: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let ok = Command::new("nbdinfo")
            .args(["--size", uri])
            .output()?
            .status
            .success();
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{uri} did not come up")
}

fn timed(cmd: &mut Command) -> Result<f64> {
    let started = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// 4 KiB random reads with qemu-io (a warm-up pass, then the measured pass); per-read latency
/// from the rate qemu-io prints for each command.
fn random_reads(uri: &str, size: u64) -> Result<Latency> {
    let ops = 2000;
    let mut rng = Rng(0xfeed_beef_1234_5678);
    let mut args: Vec<String> = vec!["-r".into(), "-f".into(), "raw".into()];
    for _ in 0..ops {
        let off = (rng.next() % (size / 4096)) * 4096;
        args.push("-c".into());
        args.push(format!("read {off} 4096"));
    }
    args.push(uri.into());
    timed(Command::new("qemu-io").args(&args))?;
    let started = Instant::now();
    let out = Command::new("qemu-io").args(&args).output()?;
    let wall = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lat: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split(" and ").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ops_per_sec| 1e6 / ops_per_sec)
        .collect();
    if lat.len() != ops {
        bail!("qemu-io printed {} timings for {ops} reads", lat.len());
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(Latency {
        ops,
        iops: ops as f64 / wall,
        p50_us: lat[ops / 2],
        p99_us: lat[ops * 99 / 100],
    })
}

fn bench_nbd(root: &Path, data: &Path, work: &Path, rp: &str) -> Result<NbdFigures> {
    println!("==> NBD: elastio nbd serve vs nbdkit file");
    let base = data.join("base.img");
    let size = fs::metadata(&base)?.len();
    let port = free_port()?;
    let _elastio = Served(
        Command::new(root.join("target/release/elastio"))
            .args(["nbd", "serve", rp, "--listen", &format!("127.0.0.1:{port}")])
            .env("ELASTIO_VAULT", work.join("elastio-vault"))
            .env("ELASTIO_PASSWORD", "bench")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let e_uri = format!("nbd://127.0.0.1:{port}/{rp}");
    wait_for(&e_uri)?;
    let kport = free_port()?;
    let _nbdkit = Served(
        Command::new("nbdkit")
            .args([
                "-f",
                "-r",
                "-i",
                "127.0.0.1",
                "-p",
                &kport.to_string(),
                "file",
            ])
            .arg(&base)
            .spawn()?,
    );
    let k_uri = format!("nbd://127.0.0.1:{kport}");
    wait_for(&k_uri)?;
    warm(&base)?;
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let copy_elastio = timed(Command::new("nbdcopy").args([&e_uri, "null:"]))?;
    let copy_nbdkit = timed(Command::new("nbdcopy").args([&k_uri, "null:"]))?;
    println!("    nbdcopy elastio {copy_elastio:.2} s, nbdkit {copy_nbdkit:.2} s");
    let rand_elastio = random_reads(&e_uri, size)?;
    let rand_nbdkit = random_reads(&k_uri, size)?;
    Ok(NbdFigures {
        copy_elastio,
        copy_nbdkit,
        rand_elastio,
        rand_nbdkit,
    })
}
