//! `cargo xtask e2e-kafka`: the Kafka scenario (`tests/src/kafka.rs`) against tansu, a real
//! Kafka-compatible broker, on 127.0.0.1 with sqlite storage (its memory engine misreports end
//! offsets). tansu is built once with `cargo install` into `target/tools/` (about 40 minutes on
//! 2 cores) unless `ELASTIO_TANSU` names a binary.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{cargo, root_dir};

const TANSU_VERSION: &str = "0.6.0";

/// Stops the broker when dropped.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tansu_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ELASTIO_TANSU") {
        return Ok(PathBuf::from(p));
    }
    let root = root_dir().join("target/tools");
    let bin = root.join("bin/tansu");
    if !bin.exists() {
        println!(
            "==> building tansu {TANSU_VERSION} into {} (about 40 minutes, once)",
            root.display()
        );
        let status = Command::new("cargo")
            .args(["install", "tansu", "--version", TANSU_VERSION, "--locked"])
            .args(["--features", "dynostore,libsql", "--root"])
            .arg(&root)
            .status()
            .context("cannot run cargo install")?;
        if !status.success() {
            bail!("cargo install tansu failed ({status})");
        }
    }
    Ok(bin)
}

pub fn run() -> Result<()> {
    let tansu = tansu_binary()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = tempfile_dir()?;
    let url = format!("tcp://127.0.0.1:{port}");
    let log = std::fs::File::create(dir.join("tansu.log"))?;
    println!(
        "==> tansu broker on 127.0.0.1:{port} (data and log in {})",
        dir.display()
    );
    let mut broker = Broker(
        Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            // A path relative to the working directory (an absolute one gets the working
            // directory prepended again).
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&dir)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("cannot start {}", tansu.display()))?,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let log_path = dir.join("tansu.log");
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = broker.0.try_wait()? {
            bail!(
                "tansu exited ({status}):\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "tansu did not listen on {port} within 60 s (log: {})",
                dir.join("tansu.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    cargo(&["build", "--locked", "-p", "elastio-cli"], &[])?;
    let brokers = format!("127.0.0.1:{port}");
    cargo(
        &[
            "test",
            "--locked",
            "-p",
            "elastio-tests",
            "--features",
            "e2e-kafka",
            "--test",
            "kafka_e2e",
            "--",
            "--nocapture",
        ],
        &[("ELASTIO_TEST_KAFKA_BROKERS", &brokers)],
    )?;
    println!("e2e-kafka OK against tansu {TANSU_VERSION}");
    Ok(())
}

/// A fresh directory under target/ for the broker's database and log.
fn tempfile_dir() -> Result<PathBuf> {
    let dir = root_dir().join(format!("target/e2e-kafka/{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
