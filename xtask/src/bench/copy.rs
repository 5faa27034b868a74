//! `cargo xtask bench copy`: a second copy off site. The same three disk images (base.img,
//! changed.img, small.img) are backed up into a local elastio vault and a local restic
//! repository, then copied to Ceph RGW on loopback: `elastio vault copy` against
//! `restic copy --from-repo`. Requests are counted by a proxy in front of RGW (neither tool
//! reports them the same way), and the copied RPs are restored and compared.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::{measure, verify};
use crate::util::sha256;

/// Counts the HTTP requests that pass through it to `upstream` (one connection thread each;
/// request bodies are skipped by their Content-Length, responses streamed back unread).
struct CountingProxy {
    url: String,
    requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl CountingProxy {
    fn start(upstream: &str) -> Result<CountingProxy> {
        let target = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}", listener.local_addr()?);
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let (r, target) = (r.clone(), target.clone());
                std::thread::spawn(move || {
                    let _ = relay(client, &target, &r);
                });
            }
        });
        Ok(CountingProxy {
            url,
            requests,
            stop,
        })
    }

    fn count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

/// Forwards one client connection, counting each request head.
fn relay(client: TcpStream, target: &str, requests: &AtomicU64) -> Result<()> {
    let server = TcpStream::connect(target)?;
    let (mut to_client, mut from_server) = (client.try_clone()?, server.try_clone()?);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_server, &mut to_client);
        let _ = to_client.shutdown(std::net::Shutdown::Write);
    });
    let mut reader = BufReader::new(client);
    let mut to_server = server;
    loop {
        let mut head = Vec::new();
        let mut length = 0u64;
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            let text = String::from_utf8_lossy(&line).to_ascii_lowercase();
            if let Some(v) = text.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            head.extend_from_slice(&line);
            if line == b"\r\n" {
                break;
            }
        }
        requests.fetch_add(1, Ordering::Relaxed);
        to_server.write_all(&head)?;
        let copied = std::io::copy(&mut (&mut reader).take(length), &mut to_server)?;
        if copied < length {
            return Ok(());
        }
    }
}

pub struct CopyFigures {
    /// Logical bytes of the three RPs.
    pub bytes: u64,
    pub elastio_secs: f64,
    pub elastio_requests: u64,
    pub elastio_again_secs: f64,
    pub elastio_again_requests: u64,
    pub restic_secs: f64,
    pub restic_requests: u64,
}

pub fn bench(root: &Path, data: &Path, work: &Path) -> Result<CopyFigures> {
    println!("==> copy: three disk RPs from a local vault / repository to Ceph RGW");
    let servers = crate::servers::start(root)?;
    let env = crate::servers::client_env(&servers);
    let bin = root.join("target/release/elastio");
    let dir = work.join("copy");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let images = ["base.img", "changed.img", "small.img"];
    let bytes: u64 = images
        .iter()
        .map(|i| std::fs::metadata(data.join(i)).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()
        .context("the bench images")?;
    let proxy = CountingProxy::start(&servers.rgw_url)?;
    let local = dir.join("vault");
    let elastio = |vault: &str, args: &[&str]| {
        let mut c = Command::new(&bin);
        c.args(args)
            .env("ELASTIO_VAULT", vault)
            .env("ELASTIO_PASSWORD", "bench")
            .env("AWS_ENDPOINT_URL", &proxy.url)
            .env("XDG_CACHE_HOME", dir.join("cache"));
        for (k, v) in &env {
            c.env(k, v);
        }
        c
    };
    let local_s = local.to_str().context("path")?;
    measure(elastio(local_s, &["--quiet", "vault", "init"]).arg("--quiet"))?;
    let mut rps = Vec::new();
    for img in images {
        let p = data.join(img);
        let m = measure(&mut elastio(
            local_s,
            &[
                "--quiet",
                "block",
                "backup",
                p.to_str().context("path")?,
                "--asset-name",
                "disk",
                "--output-format",
                "json",
            ],
        ))?;
        let v: serde_json::Value = serde_json::from_str(&m.3)?;
        rps.push((v["rp"]["id"].as_str().unwrap_or_default().to_string(), img));
    }
    let remote = "s3://bench-copy/vault";
    measure(&mut elastio(remote, &["--quiet", "vault", "init"]))?;
    // (seconds, requests) of one `vault copy` of every RP to RGW.
    let copy_all = || -> Result<(f64, u64)> {
        let before = proxy.count();
        let started = Instant::now();
        let out = elastio(
            local_s,
            &[
                "--quiet",
                "vault",
                "copy",
                "--to",
                remote,
                "--output-format",
                "json",
            ],
        )
        .output()
        .context("vault copy")?;
        if !out.status.success() {
            bail!("vault copy: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok((started.elapsed().as_secs_f64(), proxy.count() - before))
    };
    let (elastio_secs, elastio_requests) = copy_all()?;
    let (elastio_again_secs, elastio_again_requests) = copy_all()?;
    // Every copied RP restores from RGW as the image it was made of.
    for (rp, img) in &rps {
        let target = dir.join(format!("restored-{img}"));
        let m = measure(&mut elastio(
            remote,
            &[
                "--quiet",
                "block",
                "restore",
                "--rp",
                rp,
                target.to_str().context("path")?,
            ],
        ))?;
        let _ = m;
        verify(
            &target,
            &sha256(&data.join(img))?,
            "elastio (copied to RGW)",
        )?;
    }

    // restic: the same three into a local repository, then `copy` to one in RGW.
    let repo = dir.join("restic-local");
    let restic = |repo: &str| {
        let mut c = Command::new("restic");
        c.env("RESTIC_REPOSITORY", repo)
            .env("RESTIC_PASSWORD", "bench")
            .env("RESTIC_CACHE_DIR", dir.join("restic-cache"))
            .arg("--quiet");
        for (k, v) in &env {
            c.env(k, v);
        }
        c.env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing");
        c
    };
    let repo_s = repo.to_str().context("path")?;
    measure(restic(repo_s).args(["init", "--repository-version", "2"]))?;
    for img in images {
        measure(
            restic(repo_s)
                .args([
                    "backup",
                    "--stdin",
                    "--stdin-filename",
                    "disk.img",
                    "--host",
                    "bench",
                ])
                .stdin(std::process::Stdio::from(std::fs::File::open(
                    data.join(img),
                )?)),
        )?;
    }
    let remote_repo = format!("s3:{}/bench-restic-copy", proxy.url);
    measure(restic(&remote_repo).args([
        "init",
        "--repository-version",
        "2",
        "--copy-chunker-params",
        "--from-repo",
        repo_s,
        "--from-password-command",
        "echo bench",
    ]))?;
    let before = proxy.count();
    let started = Instant::now();
    let out = restic(&remote_repo)
        .args([
            "copy",
            "--from-repo",
            repo_s,
            "--from-password-command",
            "echo bench",
        ])
        .output()?;
    if !out.status.success() {
        bail!("restic copy: {}", String::from_utf8_lossy(&out.stderr));
    }
    let restic_secs = started.elapsed().as_secs_f64();
    let restic_requests = proxy.count() - before;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(CopyFigures {
        bytes,
        elastio_secs,
        elastio_requests,
        elastio_again_secs,
        elastio_again_requests,
        restic_secs,
        restic_requests,
    })
}

pub fn report(f: &CopyFigures) -> String {
    let gib = f.bytes as f64 / (1u64 << 30) as f64;
    let mib = f.bytes as f64 / (1u64 << 20) as f64;
    let mut s = String::new();
    s.push_str(&format!(
        "\n== copy to Ceph RGW: three disk RPs ({mib:.0} MiB logical), local -> RGW\n"
    ));
    s.push_str("tool                 time s   MiB/s   requests  requests/GiB\n");
    for (name, secs, req) in [
        ("elastio vault copy", f.elastio_secs, f.elastio_requests),
        ("restic copy", f.restic_secs, f.restic_requests),
    ] {
        s.push_str(&format!(
            "{name:<20} {secs:>6.2}  {:>6.0}  {req:>9}  {:>12.1}\n",
            mib / secs.max(1e-3),
            req as f64 / gib
        ));
    }
    s.push_str(&format!(
        "ratios: elastio/restic time {:.2}, requests {:.2}; a second elastio copy (nothing new): {:.2} s, {} requests\n",
        f.elastio_secs / f.restic_secs.max(1e-3),
        f.elastio_requests as f64 / f.restic_requests.max(1) as f64,
        f.elastio_again_secs,
        f.elastio_again_requests
    ));
    s
}
