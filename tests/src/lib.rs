//! Helpers for end-to-end tests: they drive the real `elastio` binary against real files, loop
//! devices and vault directories, each test in its own temporary directory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

pub mod kafka;

/// The `elastio` binary: `$ELASTIO_BIN`, else `target/<profile>/elastio` next to this test.
pub fn elastio_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ELASTIO_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = profile_dir.join("elastio");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p elastio-cli`, which `cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// A vault in a fresh temporary directory (or a fresh bucket of an S3 server), with a password
/// set in the environment.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// A directory, or an `s3://` URL.
    pub vault: PathBuf,
    pub password: String,
    /// The S3 endpoint of an S3 vault.
    pub endpoint: Option<String>,
}

/// The S3 servers `cargo xtask test` started, as (name, endpoint URL): Ceph RGW and moto.
pub fn s3_servers() -> Vec<(String, String)> {
    let spec = std::env::var("ELASTIO_TEST_S3").unwrap_or_else(|_| {
        panic!(
            "ELASTIO_TEST_S3 is not set: run the tests with `cargo xtask test`, which starts \
             Ceph RGW and moto on 127.0.0.1 (or `cargo xtask servers` and export what it prints)"
        )
    });
    spec.split(',')
        .filter_map(|p| p.split_once('='))
        .map(|(n, u)| (n.to_string(), u.to_string()))
        .collect()
}

/// The endpoint of one of [`s3_servers`] by name (`rgw`, `moto`).
pub fn s3_server(name: &str) -> String {
    s3_servers()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, u)| u)
        .unwrap_or_else(|| panic!("no S3 server {name} in ELASTIO_TEST_S3"))
}

/// A bucket name no other test uses.
pub fn unique_bucket() -> String {
    format!("t-{}", hex::encode(rand::random::<[u8; 8]>()))
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    /// Creates the vault with a cheap KDF (tests run many commands) and the given extra args.
    pub fn with_init_args(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let vault = dir.path().join("vault");
        Self::init(dir, vault, None, args)
    }

    /// A vault in a new bucket of the S3 server at `endpoint`.
    pub fn s3(endpoint: &str) -> Self {
        Self::s3_with_init_args(endpoint, &[])
    }

    /// A vault in a new bucket on `endpoint`, made with `vault init ARGS`.
    pub fn s3_with_init_args(endpoint: &str, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let vault = PathBuf::from(format!("s3://{}/vault", unique_bucket()));
        Self::init(dir, vault, Some(endpoint.to_string()), args)
    }

    fn init(
        dir: tempfile::TempDir,
        vault: PathBuf,
        endpoint: Option<String>,
        args: &[&str],
    ) -> Self {
        let env = Env {
            dir,
            vault,
            password: "correct horse".into(),
            endpoint,
        };
        let mut init = vec![
            "vault",
            "init",
            "--kdf-memory-mib",
            "8",
            "--kdf-iterations",
            "1",
        ];
        init.extend_from_slice(args);
        env.ok(&init);
        env
    }

    pub fn new() -> Self {
        Self::with_init_args(&[])
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(elastio_bin());
        c.args(args)
            .env("ELASTIO_VAULT", &self.vault)
            .env("ELASTIO_PASSWORD", &self.password)
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .env_remove("ELASTIO_IO_ENGINE")
            .env_remove("ELASTIO_FAULTS");
        match &self.endpoint {
            Some(e) => c.env("AWS_ENDPOINT_URL", e),
            None => c.env_remove("AWS_ENDPOINT_URL"),
        };
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run elastio")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "elastio {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs a command made with [`Env::command`] (and adjusted by the caller), asserts success
    /// and parses its JSON stdout.
    pub fn json_of(cmd: &mut Command) -> serde_json::Value {
        let out = cmd.output().expect("run elastio");
        assert!(
            out.status.success(),
            "elastio failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json output")
    }

    /// Runs with `--output-format json` and parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--output-format", "json"]);
        serde_json::from_str(&self.ok(&a)).expect("json output")
    }

    /// `block backup` with optional engine; returns the JSON report.
    pub fn backup(&self, image: &Path, engine: Option<&str>) -> serde_json::Value {
        let mut c = self.command(&[
            "block",
            "backup",
            image.to_str().unwrap(),
            "--output-format",
            "json",
        ]);
        if let Some(e) = engine {
            c.env("ELASTIO_IO_ENGINE", e);
        }
        let out = c.output().expect("run elastio");
        assert!(
            out.status.success(),
            "backup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    }

    pub fn restore(&self, rp: &str, target: &Path) {
        self.ok(&[
            "block",
            "restore",
            "--rp",
            rp,
            target.to_str().unwrap(),
            "--force",
        ]);
    }

    /// Total bytes of all files in the vault directory.
    pub fn vault_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            std::fs::read_dir(p)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| {
                            let m = e.metadata().unwrap();
                            if m.is_dir() {
                                walk(&e.path())
                            } else {
                                m.len()
                            }
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(&self.vault)
    }

    /// All pack object paths in the vault.
    pub fn packs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in std::fs::read_dir(self.vault.join("packs"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                out.push(f.path());
            }
        }
        out.sort();
        out
    }
}

pub fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for hundreds of MiB.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `data` at `offset` of `path` (creating it), keeping the rest as it is.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    f.write_all_at(data, offset).unwrap();
}

/// Creates a sparse file of `size` bytes (all holes).
pub fn sparse_file(path: &Path, size: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Appends `len` pseudo-random bytes to a file.
pub fn append_random(path: &Path, seed: u64, len: usize) {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap();
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(&pseudo_random(seed, len)).unwrap();
}

/// True when running as root (loop devices need it).
#[allow(unsafe_code)]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command and asserts success; returns stdout.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd}: {e} (is it installed? `cargo xtask test` installs it)")
    });
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub const CHUNK: usize = 128 * 1024;

/// `elastio nbd serve` running in the background on a free loopback port; stopped with SIGINT
/// when dropped.
pub struct NbdServer {
    pub child: std::process::Child,
    /// `host:port`.
    pub addr: String,
}

impl NbdServer {
    pub fn start(env: &Env, rps: &[&str], extra: &[&str]) -> Self {
        use std::io::BufRead;
        let mut args = vec![
            "nbd",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--output-format",
            "json",
        ];
        args.extend_from_slice(rps);
        args.extend_from_slice(extra);
        let mut child = env
            .command(&args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn elastio nbd serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // First line: the ready report. Later lines are drained so the server never sees a
            // closed stdout.
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            let mut rest = String::new();
            while reader.read_line(&mut rest).is_ok_and(|n| n > 0) {
                rest.clear();
            }
        });
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("nbd server did not become ready in 30 s");
        let ready: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad ready line {line:?}: {e}"));
        NbdServer {
            child,
            addr: ready["listen"].as_str().unwrap().to_string(),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// The `nbds://` URI of `export` for libnbd, trusting the CA in `client_dir` (see
    /// [`tls_certificates`]).
    pub fn tls_uri(&self, export: &str, client_dir: &Path) -> String {
        format!(
            "nbds://{}/{export}?tls-certificates={}",
            self.addr,
            client_dir.display()
        )
    }

    /// Resident memory of the server process, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
            * 1024
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Stops the server with SIGINT and returns its exit code.
    #[allow(unsafe_code)]
    pub fn stop(&mut self) -> Option<i32> {
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if self.is_running() {
            self.stop();
        }
    }
}

/// Certificate directories made by [`tls_certificates`], in the qemu-nbd/nbdkit/libnbd layout.
pub struct TlsDirs {
    /// ca-cert.pem, server-cert.pem, server-key.pem: the server's `--tls-certificates`.
    pub server: PathBuf,
    /// ca-cert.pem, client-cert.pem, client-key.pem: libnbd's `tls-certificates` for a client
    /// the CA vouches for.
    pub client: PathBuf,
    /// ca-cert.pem only: a client that verifies the server but has no certificate of its own.
    pub anonymous: PathBuf,
}

/// A throw-away CA, a server certificate it signed for IP:127.0.0.1 and DNS:localhost, and a
/// client certificate it signed, made with the `openssl` CLI.
pub fn tls_certificates(env: &Env) -> TlsDirs {
    let work = env.path("tls-work");
    let dirs = TlsDirs {
        server: env.path("tls-server"),
        client: env.path("tls-client"),
        anonymous: env.path("tls-anonymous"),
    };
    for d in [&work, &dirs.server, &dirs.client, &dirs.anonymous] {
        std::fs::create_dir_all(d).unwrap();
    }
    let p = |d: &Path, f: &str| d.join(f).to_str().unwrap().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    let (ca_key, ca_cert) = (p(&work, "ca-key.pem"), p(&dirs.server, "ca-cert.pem"));
    ca.extend_from_slice(&[
        "-keyout",
        &ca_key,
        "-out",
        &ca_cert,
        "-days",
        "2",
        "-subj",
        "/CN=elastio test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    sh("openssl", &ca);
    // A key and a certificate signed by the CA, as `<dir>/<role>-key.pem`, `<role>-cert.pem`.
    let issue = |dir: &Path, role: &str, subject: &str, ext: &str, serial: &str| {
        let (key, csr) = (p(dir, &format!("{role}-key.pem")), p(&work, "req.csr"));
        let mut req = vec!["req"];
        req.extend_from_slice(&ec);
        req.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", subject]);
        sh("openssl", &req);
        let ext_file = p(&work, "ext.cnf");
        std::fs::write(&ext_file, ext).unwrap();
        let cert = p(dir, &format!("{role}-cert.pem"));
        sh(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-set_serial",
                serial,
                "-days",
                "2",
                "-extfile",
                &ext_file,
                "-out",
                &cert,
            ],
        );
    };
    issue(
        &dirs.server,
        "server",
        "/CN=localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        "2",
    );
    issue(
        &dirs.client,
        "client",
        "/CN=elastio test client",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        "3",
    );
    for d in [&dirs.client, &dirs.anonymous] {
        std::fs::copy(&ca_cert, d.join("ca-cert.pem")).unwrap();
    }
    dirs
}

/// `fixtures/tree`, the small directory tree the ext4 images are made from.
pub fn fixture_tree() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tree")
}

/// A sparse ext4 image of `size` bytes made from the fixture tree with `mkfs.ext4 -d`.
pub fn ext4_image(env: &Env, name: &str, size: u64) -> PathBuf {
    ext4_image_of(env, name, size, &fixture_tree())
}

/// The fixture tree plus what git cannot store: hard links, a sparse file, a file larger than a
/// small cache, a long symlink, a FIFO and a big directory. Returns its path under `env`.
pub fn rich_tree(env: &Env, big_len: usize) -> PathBuf {
    let root = env.path("rich-tree");
    sh(
        "cp",
        &[
            "-a",
            fixture_tree().to_str().unwrap(),
            root.to_str().unwrap(),
        ],
    );
    std::fs::write(root.join("big.bin"), pseudo_random(77, big_len)).unwrap();
    std::fs::hard_link(root.join("big.bin"), root.join("home/big.link")).unwrap();
    std::fs::hard_link(root.join("etc/passwd"), root.join("home/passwd.2")).unwrap();
    std::fs::hard_link(root.join("etc/passwd"), root.join("home/passwd.3")).unwrap();
    let sparse = root.join("var/sparse.bin");
    write_at(&sparse, 5 << 20, b"after the hole");
    std::os::unix::fs::symlink(
        format!("{}/../../etc/passwd", "d".repeat(120)),
        root.join("home/long.lnk"),
    )
    .unwrap();
    sh("mkfifo", &[root.join("var/fifo").to_str().unwrap()]);
    std::fs::create_dir(root.join("many")).unwrap();
    for i in 0..500 {
        std::fs::write(root.join(format!("many/{i:04}.txt")), format!("file {i}\n")).unwrap();
    }
    std::fs::set_permissions(
        root.join("etc/app.conf"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    root
}

/// `elastio umount`s `mnt` and waits (up to 10 s) for the background mount process `pid` to end.
pub fn unmount_and_wait(env: &Env, mnt: &Path, pid: u64) {
    env.ok(&["umount", mnt.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(std::time::Instant::now() < deadline, "mount still running");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// An ext4 image of `size` bytes made from `tree` with `mkfs.ext4 -d`.
pub fn ext4_image_of(env: &Env, name: &str, size: u64, tree: &Path) -> PathBuf {
    let img = env.path(name);
    sparse_file(&img, size);
    sh(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            tree.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    img
}

/// Asserts that the tree at `got` equals `want`: names, types, sizes, modes, owners, mtimes
/// (seconds), symlink targets, hard-link counts and contents. `lost+found` is ignored.
pub fn assert_same_tree(got: &Path, want: &Path) {
    use std::os::unix::fs::MetadataExt;
    fn names(dir: &Path) -> Vec<std::ffi::OsString> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "lost+found")
            .collect();
        v.sort();
        v
    }
    let (g, w) = (names(got), names(want));
    assert_eq!(g, w, "entries of {}", got.display());
    for name in w {
        let (gp, wp) = (got.join(&name), want.join(&name));
        let (gm, wm) = (
            std::fs::symlink_metadata(&gp).unwrap(),
            std::fs::symlink_metadata(&wp).unwrap(),
        );
        let what = gp.display();
        assert_eq!(gm.mode(), wm.mode(), "mode of {what}");
        assert_eq!(
            (gm.uid(), gm.gid()),
            (wm.uid(), wm.gid()),
            "owner of {what}"
        );
        assert_eq!(gm.mtime(), wm.mtime(), "mtime of {what}");
        if gm.is_dir() {
            assert_same_tree(&gp, &wp);
            continue;
        }
        assert_eq!(gm.nlink(), wm.nlink(), "link count of {what}");
        assert_eq!(gm.len(), wm.len(), "size of {what}");
        if gm.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&gp).unwrap(),
                std::fs::read_link(&wp).unwrap(),
                "target of {what}"
            );
        } else if gm.is_file() {
            assert_eq!(sha256_file(&gp), sha256_file(&wp), "content of {what}");
        }
    }
}

/// An AWS emulator of our own (`xtask/servers/aws-emulator.py`: moto plus a faithful EBS direct
/// API) on a free 127.0.0.1 port, stopped when dropped. One per test, since tests inject faults.
pub struct AwsEmulator {
    pub url: String,
    child: std::process::Child,
}

impl AwsEmulator {
    pub fn start() -> Self {
        let (python, script) = match (
            std::env::var("ELASTIO_TEST_PYTHON"),
            std::env::var("ELASTIO_TEST_AWS_EMULATOR"),
        ) {
            (Ok(p), Ok(s)) => (p, s),
            _ => panic!(
                "ELASTIO_TEST_PYTHON / ELASTIO_TEST_AWS_EMULATOR are not set: run the tests with \
                 `cargo xtask test` (or `cargo xtask servers` and export what it prints)"
            ),
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(python)
            .args([script.as_str(), "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the AWS emulator");
        let emu = AwsEmulator {
            url: format!("http://127.0.0.1:{port}"),
            child,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while emu.try_control("GET", "config", None).is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the AWS emulator did not start within 60 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        emu.config(serde_json::json!({"snapshot_seconds": 0.3}));
        emu
    }

    fn try_control(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Option<serde_json::Value> {
        let mut c = Command::new("curl");
        c.args([
            "-sf",
            "-X",
            method,
            &format!("{}/_emulator/{path}", self.url),
        ]);
        if let Some(b) = body {
            c.args(["-d", &b.to_string()]);
        }
        let out = c.output().expect("curl");
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn control(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> serde_json::Value {
        self.try_control(method, path, body)
            .unwrap_or_else(|| panic!("emulator control call {method} {path} failed"))
    }

    /// Changes fault injection: `latency_ms`, `throttle_rate`, `corrupt_index`, `corrupt_first`,
    /// `snapshot_seconds`.
    pub fn config(&self, settings: serde_json::Value) {
        self.control("POST", "config", Some(&settings));
    }

    /// An EC2 volume whose data is the image file at `image` (read at each snapshot).
    pub fn volume(&self, image: &Path) -> String {
        let body = serde_json::json!({"image": image});
        let v = self.control("POST", "volumes", Some(&body));
        v["VolumeId"].as_str().expect("volume id").to_string()
    }

    /// Calls per EBS action since the last reset (`GetSnapshotBlock`, `ListChangedBlocks`, ...).
    pub fn stats(&self) -> serde_json::Value {
        self.control("GET", "stats", None)
    }

    pub fn calls(&self, action: &str) -> u64 {
        self.stats()[action].as_u64().unwrap_or(0)
    }

    pub fn reset_stats(&self) {
        self.control("POST", "stats/reset", None);
    }

    /// An EC2 Query API call (`Action=...&...`); the emulator does not check signatures.
    pub fn ec2(&self, query: &str) -> String {
        let out = Command::new("curl")
            .args([
                "-s",
                "-H",
                "Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=x",
                "-d",
                &format!("{query}&Version=2016-11-15"),
                &self.url,
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs an `elastio` command from `env` against this emulator (fast polling).
    pub fn command(&self, env: &Env, args: &[&str]) -> Command {
        let mut c = env.command(args);
        c.env("ELASTIO_AWS_ENDPOINT_URL", &self.url)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .args(["--poll-ms", "100"]);
        c
    }

    /// Runs with `--output-format json`, asserts success and parses stdout.
    pub fn json(&self, env: &Env, args: &[&str]) -> serde_json::Value {
        let mut c = self.command(env, args);
        c.args(["--output-format", "json"]);
        Env::json_of(&mut c)
    }
}

impl Drop for AwsEmulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sparse disk image of `size` bytes with partition table `label` (gpt, dos) and partitions
/// (first sector, sectors, the image written into it if any).
pub fn make_disk(disk: &Path, size: u64, label: &str, parts: &[(u64, u64, Option<&Path>)]) {
    sparse_file(disk, size);
    let mut sfdisk = std::process::Command::new("sfdisk")
        .args(["--quiet", disk.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (apt: fdisk)");
    let mut script = format!("label: {label}\n");
    for (start, sectors, _) in parts {
        script += &format!("start={start}, size={sectors}, type=L\n");
    }
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk failed");
    // The images are copied piece by piece, runs of zeros left as holes.
    for (start, _, image) in parts {
        if let Some(image) = image {
            let data = std::fs::read(image).unwrap();
            for (i, piece) in data.chunks(1 << 20).enumerate() {
                if piece.iter().any(|&b| b != 0) {
                    write_at(disk, start * 512 + (i as u64) * (1 << 20), piece);
                }
            }
        }
    }
}
