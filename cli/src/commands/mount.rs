use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mount::fuse::{serve, DiskView, PartDev, ViewFile};
use mount::partitions;
use mount::DiskReader;
use scalez::RpKind;
use serde_json::json;

use crate::cli::{MountArgs, OutputFormat};
use crate::commands::print_json;
use crate::commands::rp::resolve_rp;
use crate::context::Ctx;

/// Whether `path` is a mountpoint of an elastio FUSE file system (from /proc/self/mountinfo).
fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(path) else {
        return false;
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        // "... mountpoint ... - fstype source options": ours are FUSE with source "elastio:<rp>".
        let mut tail = l.split(" - ").nth(1).unwrap_or_default().split(' ');
        let (fstype, source) = (
            tail.next().unwrap_or_default(),
            tail.next().unwrap_or_default(),
        );
        f.get(4).is_some_and(|m| Path::new(m) == canon)
            && fstype.starts_with("fuse")
            && source.starts_with("elastio:")
    })
}

fn check_fuse(mountpoint: &Path) -> Result<()> {
    if !Path::new("/dev/fuse").exists() {
        bail!("FUSE is unavailable: /dev/fuse does not exist (load the fuse module, or use `elastio nbd serve`)");
    }
    let fusermount = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").is_file()));
    if !fusermount {
        bail!("fusermount3 is not installed (Debian: apt-get install fuse3)");
    }
    let meta = std::fs::metadata(mountpoint)
        .with_context(|| format!("mountpoint {} does not exist", mountpoint.display()))?;
    if !meta.is_dir() {
        bail!("mountpoint {} is not a directory", mountpoint.display());
    }
    if is_mounted(mountpoint) {
        bail!(
            "{} is already an elastio mount; unmount it first",
            mountpoint.display()
        );
    }
    if std::fs::read_dir(mountpoint)?.next().is_some() {
        bail!("mountpoint {} is not empty", mountpoint.display());
    }
    Ok(())
}

pub fn mount(ctx: &Ctx, a: MountArgs) -> Result<()> {
    check_fuse(&a.mountpoint)?;
    if !a.foreground {
        return mount_in_background(ctx, &a);
    }
    let vault = ctx.open_vault()?;
    let rp = resolve_rp(&vault, &a.rp, a.asset.as_deref(), Some(RpKind::Disk))?;
    let map = rp.disk.clone().context("disk RP without a map")?;
    let reader = Arc::new(DiskReader::new(vault.clone(), map, a.cache_size as usize));
    reader.enable_readahead(16, 2);
    let mut files = vec![ViewFile {
        name: "disk.img".into(),
        start: 0,
        len: reader.size(),
        stored_bytes: reader.stored_bytes()?,
    }];
    let mut read = |off: u64, buf: &mut [u8]| {
        reader
            .read_at(off, buf)
            .map(|_| ())
            .map_err(std::io::Error::from)
    };
    let parts = partitions::parse(reader.size(), &mut read)?;
    let mut filesystems = Vec::new();
    if parts.is_empty() {
        let dev = PartDev {
            reader: reader.clone(),
            start: 0,
            len: reader.size(),
        };
        filesystems.extend(dev.open_fs("fs"));
    }
    for p in parts {
        let dev = PartDev {
            reader: reader.clone(),
            start: p.start,
            len: p.len,
        };
        filesystems.extend(dev.open_fs(&format!("part{}", p.number)));
        let stored = reader
            .extents(p.start, p.len, usize::MAX)?
            .iter()
            .filter(|(_, data)| *data)
            .map(|(len, _)| len)
            .sum();
        files.push(ViewFile {
            name: format!("part{}.img", p.number),
            start: p.start,
            len: p.len,
            stored_bytes: stored,
        });
    }
    let time = humantime::parse_rfc3339_weak(&rp.created).unwrap_or(std::time::UNIX_EPOCH);
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let view = DiskView {
        reader,
        files,
        filesystems,
        time,
        uid,
        gid,
    };
    let cancel = crate::cancel_token();
    let format = ctx.global.output_format;
    let (id, mp) = (rp.id.to_string(), a.mountpoint.clone());
    serve(
        view,
        &a.mountpoint,
        &format!("elastio:{}", rp.id),
        || {
            let mut out = std::io::stdout();
            let _ = match format {
                OutputFormat::Json => writeln!(out, "{}", json!({"rp": id, "mountpoint": mp})),
                OutputFormat::Human => writeln!(out, "mounted {id} at {}", mp.display()),
            };
            let _ = out.flush();
        },
        || cancel.is_cancelled(),
    )
    .with_context(|| format!("mounting {} at {}", rp.id, a.mountpoint.display()))?;
    if let Some(log) = std::env::var_os(LOG_ENV) {
        if std::fs::metadata(&log).is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(log);
        }
    }
    Ok(())
}

/// Tells a detached mount process where its log is, so it can remove an empty one at exit.
const LOG_ENV: &str = "ELASTIO_MOUNT_LOG";

/// Runs this same command with `--foreground` in a new process group, hands it the password on
/// stdin, and returns once the mount is visible (or reports the child's error).
fn mount_in_background(ctx: &Ctx, a: &MountArgs) -> Result<()> {
    let password = ctx.password(false)?;
    let exe = std::env::current_exe().context("cannot find the elastio executable")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "--vault",
        ctx.vault_path()?
            .to_str()
            .context("vault path is not UTF-8")?,
    ])
    .args(["mount", &a.rp])
    .arg(&a.mountpoint)
    .args(["--foreground", "--password-stdin", "--quiet"])
    .args(["--cache-size", &a.cache_size.to_string()]);
    if let Some(asset) = &a.asset {
        cmd.args(["--asset", asset]);
    }
    use std::os::unix::process::CommandExt;
    // The detached process logs (read errors name the damaged object) to a file next to other
    // per-user runtime state; its path is printed.
    let log_dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let log_path = log_dir.join(format!("elastio-mount-{}-{}.log", a.rp, std::process::id()));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create the mount log {}", log_path.display()))?;
    let mut child = cmd
        .env_remove("ELASTIO_PASSWORD")
        .env(LOG_ENV, &log_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start the mount process")?;
    {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&password)?;
        stdin.write_all(b"\n")?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if is_mounted(&a.mountpoint) {
            break;
        }
        if let Some(status) = child.try_wait()? {
            let err = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = std::fs::remove_file(&log_path);
            bail!(
                "the mount process exited ({status}): {}",
                err.trim().trim_start_matches("error: ")
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the mount did not become ready within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "rp": a.rp, "mountpoint": a.mountpoint, "pid": child.id(), "log": log_path,
        }))?,
        OutputFormat::Human => println!(
            "mounted {} at {} (pid {}, log {}); unmount with `elastio umount {}`",
            a.rp,
            a.mountpoint.display(),
            child.id(),
            log_path.display(),
            a.mountpoint.display()
        ),
    }
    Ok(())
}

pub fn umount(_ctx: &Ctx, mountpoint: &Path) -> Result<()> {
    if !is_mounted(mountpoint) {
        bail!("{} is not an elastio mount", mountpoint.display());
    }
    let status = Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .status()
        .context("cannot run fusermount3")?;
    if !status.success() {
        bail!(
            "fusermount3 -u {} failed (is it busy?)",
            mountpoint.display()
        );
    }
    println!("unmounted {}", mountpoint.display());
    Ok(())
}
