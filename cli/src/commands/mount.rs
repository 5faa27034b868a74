use crate::cli::parse_size;
use clap::Args;
use std::io::{BufRead, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mount::fuse::{serve, DiskView};
use mount::tree_view::{serve_tree, TreeView};
use mount::views;
use scalez::RpKind;
use serde_json::json;

use crate::cli::OutputFormat;
use crate::context::resolve_rp;
use crate::context::Ctx;
use crate::output::print_json;

/// One line of /proc/self/mountinfo: where, what type, from what.
struct MountLine {
    point: PathBuf,
    fstype: String,
    source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn mounts() -> Vec<MountLine> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let point = l.split(' ').nth(4)?;
            let mut tail = l.split(" - ").nth(1)?.split(' ');
            Some(MountLine {
                point: unescape(point),
                fstype: tail.next()?.to_string(),
                source: tail.next()?.to_string(),
            })
        })
        .collect()
}

/// Whether `path` is a mountpoint of an elastio FUSE file system (source `elastio:<rp>`).
fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(path) else {
        return false;
    };
    mounts().iter().any(|m| {
        m.point == canon && m.fstype.starts_with("fuse") && m.source.starts_with("elastio:")
    })
}

/// Unmounts everything mounted below `mountpoint` (the `--kernel` loop mounts), deepest first.
fn unmount_nested(mountpoint: &Path) -> Result<()> {
    let canon = std::fs::canonicalize(mountpoint)?;
    let mut nested: Vec<PathBuf> = mounts()
        .into_iter()
        .map(|m| m.point)
        .filter(|p| p != &canon && p.starts_with(&canon))
        .collect();
    nested.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in nested {
        let out = Command::new("umount")
            .arg(&p)
            .output()
            .context("cannot run umount")?;
        if !out.status.success() {
            bail!(
                "cannot unmount {} (is it busy?): {}",
                p.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// File systems `--kernel` hands to the kernel. Each is a kernel parser of untrusted bytes
/// running in ring 0, so only the common, well-fuzzed ones, named explicitly (no probing of
/// every driver the kernel has).
const KERNEL_TYPES: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "ntfs3", "ntfs",
];

/// The file system type of `image` as blkid reads it (probing its superblocks, no mounting).
fn detect_fs_type(image: &Path) -> Result<String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(image)
        .output()
        .context("cannot run blkid (util-linux)")?;
    let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if t.is_empty() {
        bail!("no known file system found by blkid");
    }
    if !KERNEL_TYPES.contains(&t.as_str()) {
        bail!(
            "file system type {t:?} is not one --kernel mounts ({})",
            KERNEL_TYPES.join(", ")
        );
    }
    Ok(t)
}

/// Loop-mounts `image` read-only at `dir` with the kernel's driver for its detected type
/// (`-t`), `nosuid,nodev,noexec` (a hostile image's setuid binaries and device nodes are inert),
/// trying the options that keep journaling file systems from replaying their log first.
/// Returns the options used.
fn kernel_mount(image: &Path, dir: &Path) -> Result<String> {
    let fstype = detect_fs_type(image)?;
    let mut last = String::new();
    for opts in ["ro,noload", "ro,norecovery", "ro"] {
        let opts = format!("{opts},nosuid,nodev,noexec");
        let out = Command::new("mount")
            .args(["-t", &fstype, "-o", &format!("loop,{opts}")])
            .arg(image)
            .arg(dir)
            .output()
            .context("cannot run mount")?;
        if out.status.success() {
            return Ok(format!("-t {fstype} -o {opts}"));
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_string();
    }
    bail!("{last}")
}

#[allow(unsafe_code)]
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
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
    if a.kernel && !is_root() {
        bail!("--kernel loop-mounts partitions and needs root; without it, the files of ext2/3/4, XFS, NTFS, FAT, btrfs and LVM volumes are shown by the built-in readers");
    }
    if !a.foreground {
        return mount_in_background(ctx, &a);
    }
    let vault = ctx.open_vault()?;
    // `latest` means the newest disk RP, unless --asset names the asset (a stream, say).
    let kind = (a.rp == "latest" && a.asset.is_none()).then_some(RpKind::Disk);
    let rp = resolve_rp(&vault, &a.rp, a.asset.as_deref(), kind)?;
    if rp.kind == RpKind::Stream {
        let view = views::stream(&vault, &rp, &view_options(&a))
            .with_context(|| format!("cannot read stream RP {}", rp.id))?;
        return serve_view(ctx, &a, &rp, View::Disk(view), Vec::new(), Vec::new());
    }
    if rp.kind == RpKind::File {
        let view = TreeView::load(vault.clone(), &rp, a.cache_size as usize)
            .with_context(|| format!("cannot read the file tree of {}", rp.id))?;
        return serve_view(ctx, &a, &rp, View::Tree(view), Vec::new(), Vec::new());
    }
    if rp.kind != RpKind::Disk {
        bail!(
            "recovery point {} is a {} recovery point: only disk, file and stream RPs can be mounted",
            rp.id,
            rp.kind
        );
    }
    let mounted = views::disk(&vault, &rp, &view_options(&a))
        .with_context(|| format!("cannot read disk RP {}", rp.id))?;
    serve_view(
        ctx,
        &a,
        &rp,
        View::Disk(mounted.view),
        mounted.kernel_targets,
        mounted.status,
    )
}

fn view_options(a: &MountArgs) -> views::ViewOptions {
    // SAFETY: getuid/getgid have no preconditions.
    #[allow(unsafe_code)]
    let owner = unsafe { (libc::getuid(), libc::getgid()) };
    views::ViewOptions {
        cache_bytes: a.cache_size as usize,
        kernel: a.kernel,
        owner,
    }
}

/// What a mount shows.
enum View {
    /// A disk or stream RP: image files (and file systems inside them).
    Disk(DiskView),
    /// A file RP: its tree.
    Tree(TreeView),
}

/// Serves `view` until unmounted; reports readiness (a JSON line for the background parent).
fn serve_view(
    ctx: &Ctx,
    a: &MountArgs,
    rp: &scalez::RecoveryPoint,
    view: View,
    kernel_targets: Vec<(String, String)>,
    status: Vec<String>,
) -> Result<()> {
    let cancel = crate::cancel_token();
    let format = ctx.global.output_format;
    let (id, mp) = (rp.id.to_string(), a.mountpoint.clone());
    let fsname = format!("elastio:{}", rp.id);
    let ready = || {
        let mut kernel = Vec::new();
        for (image, dir) in &kernel_targets {
            let result = kernel_mount(&mp.join(image), &mp.join(dir));
            if let Err(e) = &result {
                tracing::warn!("{dir}: the kernel could not mount {image}: {e}");
            }
            kernel.push(json!({
                "dir": dir,
                "image": image,
                "options": result.as_ref().ok(),
                "error": result.as_ref().err().map(|e| e.to_string()),
            }));
        }
        let mut out = std::io::stdout();
        let _ = match format {
            OutputFormat::Json => writeln!(
                out,
                "{}",
                json!({"rp": id, "mountpoint": mp, "kernel_mounts": kernel, "filesystems": status})
            ),
            OutputFormat::Human => writeln!(
                out,
                "mounted {id} at {}{}",
                mp.display(),
                status
                    .iter()
                    .map(|l| format!("\n  {l}"))
                    .collect::<String>()
            ),
        };
        let _ = out.flush();
    };
    let stop = || cancel.is_cancelled();
    let before_unmount = || {
        if let Err(e) = unmount_nested(&mp) {
            tracing::warn!("{e:#}");
        }
    };
    match view {
        View::Disk(v) => serve(v, &a.mountpoint, &fsname, ready, stop, before_unmount),
        View::Tree(v) => serve_tree(v, &a.mountpoint, &fsname, ready, stop, before_unmount),
    }
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
    let mut cmd = foreground_command(ctx, a)?;
    use std::os::unix::process::CommandExt;
    // The detached process logs (read errors name the damaged object) to a file next to other
    // per-user runtime state; its path is printed.
    let log_dir = crate::context::private_runtime_dir()?;
    let log_path = log_dir.join(format!(
        "mount-{}-{}-{:08x}.log",
        a.rp.replace('/', "_"),
        std::process::id(),
        rand::random::<u32>()
    ));
    let log = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&log_path)
        .with_context(|| format!("cannot create the mount log {}", log_path.display()))?;
    let mut child = cmd
        .env_remove("ELASTIO_PASSWORD")
        .env(LOG_ENV, &log_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start the mount process")?;
    {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&password)?;
        stdin.write_all(b"\n")?;
    }
    // The child prints one JSON line once the mount (and any --kernel mounts) is ready, or
    // exits with its error in the log.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(line) if !line.trim().is_empty() => line,
        Ok(_) => {
            let status = child.wait()?;
            let err = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = std::fs::remove_file(&log_path);
            bail!(
                "the mount process exited ({status}): {}",
                err.trim().trim_start_matches("error: ")
            );
        }
        Err(_) => {
            let _ = child.kill();
            bail!(
                "the mount did not become ready within 120 s (log: {})",
                log_path.display()
            );
        }
    };
    let ready: serde_json::Value =
        serde_json::from_str(&line).context("unexpected output from the mount process")?;
    print_mounted(ctx, a, &ready, child.id(), &log_path)
}

/// This same mount command, to run with `--foreground` in the detached process (the password
/// goes on its stdin).
fn foreground_command(ctx: &Ctx, a: &MountArgs) -> Result<Command> {
    let exe = std::env::current_exe().context("cannot find the elastio executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(["--vault", &ctx.vault_arg()?, "--output-format", "json"])
        .args(["mount", &a.rp])
        .arg(&a.mountpoint)
        .args(["--foreground", "--password-stdin", "--quiet"])
        .args(["--cache-size", &a.cache_size.to_string()]);
    if let Some(asset) = &a.asset {
        cmd.args(["--asset", asset]);
    }
    if a.kernel {
        cmd.arg("--kernel");
    }
    // Where an S3 vault is and how to reach it, as given to this process.
    let g = &ctx.global;
    for (flag, value) in [
        ("--endpoint-url", &g.endpoint_url),
        ("--region", &g.region),
        ("--kms-key-id", &g.kms_key_id),
    ] {
        if let Some(v) = value {
            cmd.args([flag, v]);
        }
    }
    Ok(cmd)
}

/// Reports a mount the detached process made ready: its kernel mounts, its pid and log.
fn print_mounted(
    ctx: &Ctx,
    a: &MountArgs,
    ready: &serde_json::Value,
    pid: u32,
    log_path: &Path,
) -> Result<()> {
    let kernel = ready["kernel_mounts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "rp": ready["rp"], "mountpoint": a.mountpoint, "pid": pid, "log": log_path,
            "kernel_mounts": kernel, "filesystems": ready["filesystems"],
        }))?,
        OutputFormat::Human => {
            println!(
                "mounted {} at {} (pid {}, log {}); unmount with `elastio umount {}`",
                ready["rp"].as_str().unwrap_or(&a.rp),
                a.mountpoint.display(),
                pid,
                log_path.display(),
                a.mountpoint.display()
            );
            for k in kernel {
                match (k["options"].as_str(), k["error"].as_str()) {
                    (Some(opts), _) => println!(
                        "  {}/: {} loop-mounted ({opts})",
                        k["dir"].as_str().unwrap_or("?"),
                        k["image"].as_str().unwrap_or("?")
                    ),
                    (_, err) => eprintln!(
                        "  {}/: not mounted: {}",
                        k["dir"].as_str().unwrap_or("?"),
                        err.unwrap_or("?")
                    ),
                }
            }
            for line in ready["filesystems"].as_array().into_iter().flatten() {
                println!("  {}", line.as_str().unwrap_or("?"));
            }
        }
    }
    Ok(())
}

pub fn umount(_ctx: &Ctx, mountpoint: &Path) -> Result<()> {
    if !is_mounted(mountpoint) {
        bail!("{} is not an elastio mount", mountpoint.display());
    }
    unmount_nested(mountpoint)?;
    let out = Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .output()
        .context("cannot run fusermount3")?;
    if !out.status.success() {
        bail!(
            "cannot unmount {} (is it busy?): {}",
            mountpoint.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    println!("unmounted {}", mountpoint.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Recovery point id, or `latest` (the newest disk RP; with --asset, the newest RP of that
    /// asset, e.g. a stream or file paths)
    pub rp: String,
    /// An existing, empty directory
    pub mountpoint: PathBuf,
    /// With `latest`: the asset whose newest RP to mount
    #[arg(long)]
    pub asset: Option<String>,
    /// Stay in the foreground until Ctrl-C or unmount
    #[arg(long)]
    pub foreground: bool,
    /// Chunk cache
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub cache_size: u64,
    /// Loop-mount each partition read-only with the kernel's driver instead of parsing it (root;
    /// the kernel parses untrusted bytes: see below)
    #[arg(long)]
    pub kernel: bool,
}
