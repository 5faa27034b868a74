//! The real S3 servers the tests and benchmarks talk to, on 127.0.0.1: Ceph RGW (a production
//! S3 implementation; a throw-away single-node cluster with an in-memory OSD) and moto (a quick
//! S3/EC2/EBS emulator in a Python venv). Installed on first use; stopped when dropped.
//!
//! The EBS tests start their own AWS emulators (`servers/aws-emulator.py`: moto plus an EBS direct
//! API that follows the AWS documentation), one per test, since each injects its own faults.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{ensure_tools, run_cmd};

/// Commands the servers need, and the Debian package of each.
pub const SERVER_TOOLS: &[(&str, &str)] = &[
    ("radosgw", "radosgw"),
    ("ceph-mon", "ceph-mon"),
    ("ceph-osd", "ceph-osd"),
    ("uuidgen", "uuid-runtime"),
    ("curl", "curl"),
];
/// Pinned so test behaviour does not drift with new releases.
const MOTO: &str = "moto[server]==5.2.5";

pub struct Servers {
    pub rgw_url: String,
    pub rgw_dir: PathBuf,
    pub moto_url: String,
    /// The venv's python, which has moto and boto3 (runs the AWS emulator).
    pub python: PathBuf,
    moto: Child,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_http(url: &str, what: &str, secs: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        let ok = Command::new("curl")
            .args(["-s", "-o", "/dev/null", url])
            .status()?
            .success();
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{what} did not answer on {url} within {secs} s")
}

/// The moto venv under `target/`, created (and moto installed) on first use.
pub fn moto_venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target/test-servers/venv");
    let bin = venv.join("bin/moto_server");
    if bin.exists() {
        return Ok(bin);
    }
    println!("==> installing {MOTO} into {}", venv.display());
    run_cmd("python3", &["-m", "venv", venv.to_str().unwrap()], &[])?;
    run_cmd(
        venv.join("bin/pip").to_str().unwrap(),
        &["install", "-q", MOTO],
        &[],
    )?;
    if !bin.exists() {
        bail!("moto_server is missing after pip install");
    }
    Ok(bin)
}

/// Environment for clients of these servers: test credentials, no instance metadata lookups,
/// no user AWS configuration.
pub fn client_env(s: &Servers) -> Vec<(&'static str, String)> {
    vec![
        (
            "ELASTIO_TEST_S3",
            format!("rgw={},moto={}", s.rgw_url, s.moto_url),
        ),
        ("ELASTIO_TEST_RGW_DIR", s.rgw_dir.display().to_string()),
        ("ELASTIO_TEST_PYTHON", s.python.display().to_string()),
        (
            "ELASTIO_TEST_AWS_EMULATOR",
            crate::util::root_dir()
                .join("xtask/servers/aws-emulator.py")
                .display()
                .to_string(),
        ),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
    ]
}

pub fn start(root: &Path) -> Result<Servers> {
    ensure_tools(SERVER_TOOLS)?;
    let moto_bin = moto_venv(root)?;
    let moto_port = free_port()?;
    let moto = Command::new(&moto_bin)
        .args(["-H", "127.0.0.1", "-p", &moto_port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start moto_server")?;
    let moto_url = format!("http://127.0.0.1:{moto_port}");

    let rgw_dir = root.join("target/test-servers/ceph");
    stop_ceph(&rgw_dir);
    let (rgw_port, mon_port) = (free_port()?, free_port()?);
    println!("==> starting Ceph RGW on 127.0.0.1:{rgw_port} and moto on 127.0.0.1:{moto_port}");
    let started = Instant::now();
    let script = root.join("xtask/servers/ceph-rgw.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&rgw_dir)
        .arg(rgw_port.to_string())
        .arg(mon_port.to_string())
        .output()
        .context("cannot run ceph-rgw.sh")?;
    let servers = Servers {
        rgw_url: format!("http://127.0.0.1:{rgw_port}"),
        rgw_dir,
        moto_url,
        python: moto_bin.with_file_name("python"),
        moto,
    };
    if !out.status.success() {
        bail!(
            "Ceph RGW did not start:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_http(&servers.moto_url, "moto", 60)?;
    println!(
        "==> S3 servers up in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(servers)
}

/// Stops the daemons of a cluster made by ceph-rgw.sh (their pid files are in DIR/run).
#[allow(unsafe_code)]
fn stop_ceph(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir.join("run")) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "pid") {
            if let Some(pid) = std::fs::read_to_string(&p)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) on a pid we started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.moto.kill();
        let _ = self.moto.wait();
        stop_ceph(&self.rgw_dir);
    }
}
