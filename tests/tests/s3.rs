//! S3 vaults against real S3 servers on 127.0.0.1, started by `cargo xtask test`: Ceph RGW
//! (production S3) and moto. Every scenario runs on both.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use elastio_tests::*;
use scalez::store::fault::{FaultPlan, FaultStore};
use scalez::store::retry::{RetryPolicy, RetryStore};
use scalez::store::s3::{S3Config, S3Store};
use scalez::store::{conformance, ObjectStore, PutMode};

fn store(endpoint: &str, prefix: &str) -> S3Store {
    let s = S3Store::connect(S3Config {
        bucket: unique_bucket(),
        prefix: prefix.into(),
        endpoint_url: Some(endpoint.into()),
        attempt_timeout: Some(Duration::from_secs(20)),
        ..S3Config::default()
    })
    .unwrap();
    s.ensure_bucket().unwrap();
    s
}

#[test]
fn conformance_on_every_server() {
    for (name, url) in s3_servers() {
        let s = store(&url, "conf");
        conformance::run_all(&s);
        assert!(s.stats().requests > 0, "{name}: requests are counted");
        // A store with no prefix, and keys that page past one listing page.
        let s = store(&url, "");
        for i in 0..1005 {
            s.put(&format!("many/{i:05}"), b"", PutMode::Create)
                .unwrap();
        }
        let listed = s.list("many/").unwrap();
        assert_eq!(listed.len(), 1005, "{name}: listing pages");
        assert_eq!(listed[1004].key, "many/01004");
        // Objects above the multipart threshold.
        let big: Vec<u8> = (0..(scalez::store::s3::MULTIPART_THRESHOLD + 3_000_000))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        s.put("big/x", &big, PutMode::Create).unwrap();
        assert_eq!(s.get("big/x").unwrap(), big, "{name}: multipart round trip");
        assert!(
            matches!(
                s.put("big/x", &big, PutMode::Create),
                Err(scalez::store::StoreError::AlreadyExists { .. })
            ),
            "{name}: create-only multipart"
        );
        assert_eq!(
            s.get_range("big/x", 70_000_000..70_000_010).unwrap(),
            &big[70_000_000..70_000_010]
        );
    }
}

#[test]
fn conformance_through_injected_faults() {
    for (name, url) in s3_servers() {
        let plan = FaultPlan {
            fail_every: 4,
            latency: Duration::from_millis(2),
            ..FaultPlan::default()
        };
        let policy = RetryPolicy {
            base: Duration::from_millis(2),
            ..RetryPolicy::default()
        };
        let s = RetryStore::new(FaultStore::new(store(&url, "faults"), plan), policy);
        conformance::run_all(&s);
        assert!(s.stats().retries > 10, "{name}: {:?}", s.stats());
    }
}

fn rp_of(v: &serde_json::Value) -> String {
    v["rp"]["id"].as_str().unwrap().to_string()
}

#[test]
fn backup_restore_mount_and_nbd_from_s3() {
    for (name, url) in s3_servers() {
        let env = Env::s3(&url);
        let img = ext4_image(&env, "a.img", 48 << 20);
        let first = env.backup(&img, None);
        assert!(first["store_requests"].as_u64().unwrap() > 0);
        let rp1 = rp_of(&first);
        let orig = env.path("orig.img");
        sh(
            "cp",
            &[
                "--sparse=always",
                img.to_str().unwrap(),
                orig.to_str().unwrap(),
            ],
        );
        write_at(&img, 20 << 20, &pseudo_random(5, 3 << 20));
        let rp2 = rp_of(&env.backup(&img, None));
        let out = env.path("out.img");
        env.restore(&rp2, &out);
        assert_eq!(sha256_file(&out), sha256_file(&img), "{name}: restore");
        env.restore(&rp1, &out);
        assert_eq!(
            sha256_file(&out),
            sha256_file(&orig),
            "{name}: restore of the first RP"
        );

        // NBD from the S3 vault.
        let mut server = NbdServer::start(&env, &[&rp2], &[]);
        let copy = env.path("nbd.img");
        sh("nbdcopy", &[&server.uri(&rp2), copy.to_str().unwrap()]);
        assert_eq!(sha256_file(&copy), sha256_file(&img), "{name}: nbdcopy");
        server.stop();

        // FUSE from the S3 vault: the files inside.
        let mnt = env.path("mnt");
        std::fs::create_dir(&mnt).unwrap();
        // The endpoint as a flag, not in the environment: the background process needs it too.
        let m = Env::json_of(
            env.command(&[
                "--endpoint-url",
                &url,
                "mount",
                &rp2,
                mnt.to_str().unwrap(),
                "--output-format",
                "json",
            ])
            .env_remove("AWS_ENDPOINT_URL"),
        );
        let same = std::fs::read(mnt.join("fs/etc/passwd")).unwrap()
            == std::fs::read(fixture_tree().join("etc/passwd")).unwrap();
        env.ok(&["umount", mnt.to_str().unwrap()]);
        assert!(same, "{name}: a file read through the mount");
        assert!(m["pid"].as_u64().is_some());

        // The metadata cache: index and catalog objects are kept locally after first use.
        let cache = env.dir.path().join("cache/elastio");
        let vault_dir = std::fs::read_dir(&cache)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        assert!(
            vault_dir.join("index").is_dir(),
            "{name}: index objects cached"
        );
        assert!(vault_dir.join("catalog").is_dir(), "{name}: catalog cached");
        // Opening with a cold cache downloads every index and catalog object; with a warm one
        // only the listings and the few uncached objects.
        std::fs::remove_dir_all(&cache).unwrap();
        let cold = env.json(&["vault", "info"])["store_requests"]
            .as_u64()
            .unwrap();
        let warm = env.json(&["vault", "info"])["store_requests"]
            .as_u64()
            .unwrap();
        assert!(
            warm < cold,
            "{name}: warm open {warm} requests, cold {cold}"
        );
    }
}

#[test]
fn injected_throttling_is_retried_and_reported() {
    for (name, url) in s3_servers() {
        let env = Env::s3(&url);
        let img = env.path("r.img");
        std::fs::write(&img, pseudo_random(9, 20 << 20)).unwrap();
        let out = env
            .command(&[
                "block",
                "backup",
                img.to_str().unwrap(),
                "--output-format",
                "json",
            ])
            .env("ELASTIO_FAULTS", "fail_first=3,fail_every=5,latency_ms=3")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            report["store_retries"].as_u64().unwrap() >= 3,
            "{name}: retries counted: {report}"
        );
        let restored = env.path("back.img");
        let out = env
            .command(&[
                "block",
                "restore",
                "--rp",
                &rp_of(&report),
                restored.to_str().unwrap(),
            ])
            .env("ELASTIO_FAULTS", "fail_every=6")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(sha256_file(&restored), sha256_file(&img), "{name}");
    }
}

#[test]
fn two_agents_back_up_into_one_vault_at_once() {
    for (name, url) in s3_servers() {
        let env = Env::s3(&url);
        let (a, b) = (env.path("a.img"), env.path("b.img"));
        std::fs::write(&a, pseudo_random(11, 24 << 20)).unwrap();
        std::fs::write(&b, pseudo_random(12, 24 << 20)).unwrap();
        let spawn = |p: &Path| {
            env.command(&[
                "block",
                "backup",
                p.to_str().unwrap(),
                "--output-format",
                "json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        };
        let (ca, cb) = (spawn(&a), spawn(&b));
        let (oa, ob) = (
            ca.wait_with_output().unwrap(),
            cb.wait_with_output().unwrap(),
        );
        for (o, img) in [(oa, &a), (ob, &b)] {
            assert!(
                o.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let rp = rp_of(&serde_json::from_slice(&o.stdout).unwrap());
            let out = env.path("out.img");
            env.restore(&rp, &out);
            assert_eq!(sha256_file(&out), sha256_file(img), "{name}: {rp}");
        }
    }
}

/// A second radosgw process on the test cluster, which this test may kill and restart without
/// disturbing the shared one.
struct OwnGateway {
    dir: PathBuf,
    port: u16,
    pid_file: PathBuf,
}

impl OwnGateway {
    fn start(work: &Path) -> OwnGateway {
        let dir = PathBuf::from(
            std::env::var("ELASTIO_TEST_RGW_DIR").expect("ELASTIO_TEST_RGW_DIR (cargo xtask test)"),
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let g = OwnGateway {
            dir,
            port,
            pid_file: work.join("rgw.pid"),
        };
        g.launch();
        g
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn launch(&self) {
        let status = Command::new("radosgw")
            .arg("-c")
            .arg(self.dir.join("ceph.conf"))
            .args(["-n", "client.rgw"])
            .arg(format!(
                "--rgw-frontends=beast endpoint=127.0.0.1:{}",
                self.port
            ))
            .arg(format!("--pid-file={}", self.pid_file.display()))
            .arg(format!(
                "--admin-socket={}",
                self.pid_file.with_extension("asok").display()
            ))
            .arg(format!(
                "--log-file={}",
                self.pid_file.with_extension("log").display()
            ))
            .status()
            .unwrap();
        assert!(status.success(), "radosgw did not start");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "radosgw did not listen in 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[allow(unsafe_code)]
    fn kill(&self) {
        let pid: i32 = std::fs::read_to_string(&self.pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill(2) on the radosgw this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "radosgw still answers");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for OwnGateway {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: as in kill().
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

#[test]
fn s3_server_killed_mid_backup() {
    let work = tempfile::tempdir().unwrap();
    let gw = OwnGateway::start(work.path());
    let env = Env::s3(&gw.url());
    let img = env.path("big.img");
    for i in 0..12 {
        append_random(&img, 40 + i, 32 << 20);
    }
    let started = Instant::now();
    // Slow requests down a little so the backup is surely mid-way when the server dies.
    let backup = env
        .command(&["block", "backup", img.to_str().unwrap()])
        .env("ELASTIO_FAULTS", "latency_ms=100")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first pack to land, then take the server away.
    let bucket = env.vault.to_str().unwrap()["s3://".len()..]
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let probe = S3Store::connect(S3Config {
        bucket,
        prefix: "vault".into(),
        endpoint_url: Some(gw.url()),
        ..S3Config::default()
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while probe.list("packs/").map(|l| l.is_empty()).unwrap_or(true) {
        assert!(Instant::now() < deadline, "no pack was uploaded in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    gw.kill();
    let out = backup.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the backup cannot succeed without its store"
    );
    assert!(
        err.contains("s3://") && err.contains("packs/")
            || err.contains("index/")
            || err.contains("catalog/"),
        "the error names the bucket and object: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "gave up in bounded time"
    );
    gw.launch();
    let rps = env.json(&["rp", "list"]);
    assert_eq!(rps.as_array().unwrap().len(), 0, "no partial RP is visible");
    let report = env.backup(&img, None);
    let out = env.path("out.img");
    env.restore(&rp_of(&report), &out);
    assert_eq!(sha256_file(&out), sha256_file(&img), "the rerun restores");
}

/// moto does not check signatures: a fixed Authorization header names the service and region.
fn moto_call(args: &[&str], service: &str) -> String {
    let auth = format!(
        "Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=x"
    );
    let out = Command::new("curl")
        .args(["-s", "-H", &auth])
        .args(args)
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl {args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn sse_kms_on_every_object() {
    let moto = s3_server("moto");
    let created = moto_call(
        &[
            "-X",
            "POST",
            &format!("{moto}/"),
            "-H",
            "X-Amz-Target: TrentService.CreateKey",
            "-H",
            "Content-Type: application/x-amz-json-1.1",
            "-d",
            "{}",
        ],
        "kms",
    );
    let key: serde_json::Value = serde_json::from_str(&created).unwrap();
    let key = key["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let env = Env::s3(&moto);
    let img = env.path("k.img");
    std::fs::write(&img, pseudo_random(21, 3 << 20)).unwrap();
    let report = env.json(&[
        "--kms-key-id",
        &key,
        "block",
        "backup",
        img.to_str().unwrap(),
    ]);
    let bucket = env.vault.to_str().unwrap()["s3://".len()..]
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let listing = moto_call(
        &[&format!("{moto}/{bucket}?list-type=2&prefix=vault/packs/")],
        "s3",
    );
    let pack = listing
        .split("<Key>")
        .nth(1)
        .and_then(|k| k.split("</Key>").next())
        .expect("a pack in the listing");
    let head = moto_call(&["-I", &format!("{moto}/{bucket}/{pack}")], "s3");
    assert!(
        head.contains("x-amz-server-side-encryption: aws:kms") && head.contains(&key),
        "the pack is stored with SSE-KMS under the key: {head}"
    );
    let out = env.path("back.img");
    env.restore(&rp_of(&report), &out);
    assert_eq!(sha256_file(&out), sha256_file(&img));
}

/// The S3 store under an [`Env::s3`] vault, to look at (and attack) its objects directly.
fn vault_store(env: &Env, url: &str) -> S3Store {
    let s = env.vault.to_str().unwrap();
    let mut c = S3Config::from_url(s).unwrap();
    c.endpoint_url = Some(url.into());
    c.attempt_timeout = Some(Duration::from_secs(20));
    S3Store::connect(c).unwrap()
}

#[test]
fn object_lock_on_every_server() {
    use scalez::store::lock::{is_locked_key, ObjectLockStore};
    use std::time::SystemTime;
    let retention = 8u64;
    for (name, url) in s3_servers() {
        let env = Env::s3_with_init_args(
            &url,
            &[
                "--object-lock",
                "governance",
                "--retention",
                &format!("{retention}s"),
            ],
        );
        let img = env.path("l.img");
        std::fs::write(&img, pseudo_random(40, 3 << 20)).unwrap();
        let rp1 = rp_of(&env.backup(&img, None));
        std::fs::write(&img, pseudo_random(41, 3 << 20)).unwrap();
        let rp2 = rp_of(&env.backup(&img, None));
        let s = vault_store(&env, &url);
        let lock: &dyn ObjectLockStore = &s;

        // Every object but the scratch ones is locked in the vault's mode, for the retention.
        let now = SystemTime::now();
        let versions = lock.versions("").unwrap();
        let current: Vec<_> = versions
            .iter()
            .filter(|v| v.is_latest && !v.is_delete_marker)
            .collect();
        assert!(
            current.iter().any(|v| v.key.starts_with("packs/")),
            "{name}"
        );
        assert!(current.iter().any(|v| v.key == "config"), "{name}");
        for v in &current {
            let r = lock.retention(&v.key, &v.version_id).unwrap();
            if is_locked_key(&v.key) {
                let (mode, until) = r.unwrap_or_else(|| panic!("{name}: {} is not locked", v.key));
                assert_eq!(mode, scalez::store::lock::LockMode::Governance, "{name}");
                assert!(
                    until > now && until < now + Duration::from_secs(retention + 60),
                    "{name}: {} until {until:?}",
                    v.key
                );
            } else {
                assert!(r.is_none(), "{name}: scratch {} is locked", v.key);
            }
        }
        let st = env.json(&["vault", "lock", "status"]);
        assert_eq!(st["lock"]["mode"], "governance", "{name}: {st}");
        assert_eq!(
            st["lock"]["unlocked"].as_array().unwrap().len(),
            0,
            "{name}: {st}"
        );
        assert!(st["lock"]["objects"].as_u64().unwrap() >= current.len() as u64 - 2);
        assert!(
            st["lock"]["oldest_lock_expires"].is_string(),
            "{name}: {st}"
        );
        assert_eq!(st["lock"]["bucket_lock_enabled"], true, "{name}: {st}");

        // Someone with the vault's credentials cannot destroy a locked version.
        let pack = current
            .iter()
            .find(|v| v.key.starts_with("packs/"))
            .unwrap();
        let before = lock.get_version(&pack.key, &pack.version_id).unwrap();
        assert!(
            lock.delete_version(&pack.key, &pack.version_id).is_err(),
            "{name}: a locked version was destroyed"
        );
        assert_eq!(s.get(&pack.key).unwrap(), before, "{name}");

        // Prune: RP1's packs are only hidden, and kept while locked and in their grace period.
        env.ok(&["rp", "delete", &rp1]);
        let p = env.json(&["prune"]);
        assert!(p["packs_deleted"].as_u64().unwrap() > 0, "{name}: {p}");
        assert!(p["lock"]["postponed"].as_u64().unwrap() > 0, "{name}: {p}");
        let hidden: Vec<_> = lock
            .versions("packs/")
            .unwrap()
            .into_iter()
            .filter(|v| !v.is_latest && !v.is_delete_marker)
            .collect();
        assert!(
            !hidden.is_empty(),
            "{name}: the deleted packs stay as old versions"
        );
        // Past a retention the live objects' locks are extended; past two, the hidden versions
        // (a retention old, unlocked) are destroyed.
        std::thread::sleep(Duration::from_secs(retention * 2 + 2));
        let p = env.json(&["prune"]);
        assert!(p["lock"]["extended"].as_u64().unwrap() > 0, "{name}: {p}");
        assert_eq!(p["lock"]["postponed"], 0, "{name}: {p}");
        assert!(
            p["lock"]["destroyed"].as_u64().unwrap() >= hidden.len() as u64,
            "{name}: {p}"
        );
        assert!(
            lock.versions("packs/")
                .unwrap()
                .iter()
                .all(|v| v.is_latest && !v.is_delete_marker),
            "{name}: only live packs remain"
        );
        let st = env.json(&["vault", "lock", "status"]);
        assert_eq!(
            st["lock"]["unlocked"].as_array().unwrap().len(),
            0,
            "{name}: {st}"
        );
        let out = env.path("out.img");
        env.restore(&rp2, &out);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            pseudo_random(41, 3 << 20),
            "{name}"
        );
        env.ok(&["check", "--read-data"]);

        // An overwrite of a pack makes a new version; the locked one is intact, and prune
        // leaves the key alone and says so.
        let live = lock
            .versions("packs/")
            .unwrap()
            .into_iter()
            .find(|v| v.is_latest)
            .unwrap();
        let original = s.get(&live.key).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let before = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        std::thread::sleep(Duration::from_millis(1500));
        s.put(&live.key, b"ransom", PutMode::Overwrite).unwrap();
        assert_eq!(
            lock.get_version(&live.key, &live.version_id).unwrap(),
            original
        );
        env.ok(&["rp", "delete", &rp2]);
        let out = env
            .command(&["prune", "--output-format", "json", "--allow-empty"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{name}: prune went on over an overwritten pack"
        );
        let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let tampered = p["lock"]["tampered"].as_array().unwrap();
        assert!(
            tampered
                .iter()
                .any(|t| t.as_str().unwrap().contains(&live.key)),
            "{name}: {p}"
        );
        assert_eq!(p["packs_deleted"], 0, "{name}: nothing deleted: {p}");
        // The repair: the pack as it was, and prune goes on.
        let r = env.json(&["vault", "restore-versions", "--to", &before]);
        assert_eq!(r["report"]["restored"][0], live.key.as_str(), "{name}: {r}");
        assert_eq!(s.get(&live.key).unwrap(), original, "{name}");
        let p = env.json(&["prune", "--allow-empty"]);
        assert!(
            p["lock"]["tampered"].as_array().unwrap().is_empty(),
            "{name}: {p}"
        );
    }
}

/// An RGW user with its own keys; returns (access key, secret).
fn rgw_user(uid: &str) -> (String, String) {
    let dir = std::env::var("ELASTIO_TEST_RGW_DIR").expect("ELASTIO_TEST_RGW_DIR");
    let (access, secret) = (format!("{uid}-key"), format!("{uid}-secret"));
    sh(
        "radosgw-admin",
        &[
            "-c",
            &format!("{dir}/ceph.conf"),
            "user",
            "create",
            &format!("--uid={uid}"),
            &format!("--display-name={uid}"),
            &format!("--access-key={access}"),
            &format!("--secret={secret}"),
        ],
    );
    (access, secret)
}

/// Runs `code` (Python with boto3) with `c`, an S3 client on `url` with the given keys, and
/// `bucket` defined; returns what it prints.
fn boto3(url: &str, keys: (&str, &str), bucket: &str, code: &str) -> String {
    let python = std::env::var("ELASTIO_TEST_PYTHON").expect("ELASTIO_TEST_PYTHON");
    let script = format!(
        "import boto3, botocore, sys\n\
         c = boto3.client('s3', endpoint_url={url:?}, aws_access_key_id={:?}, \
         aws_secret_access_key={:?}, region_name='us-east-1')\n\
         bucket = {bucket:?}\n{code}\n",
        keys.0, keys.1
    );
    let out = Command::new(python).args(["-c", &script]).output().unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn roles_that_cannot_hurt_on_rgw() {
    let url = s3_server("rgw");
    let env = Env::s3_with_init_args(&url, &["--object-lock", "governance", "--retention", "1d"]);
    let vault = env.vault.to_str().unwrap().to_string();
    let bucket = vault["s3://".len()..]
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let tag = hex::encode(rand::random::<[u8; 4]>());
    let users: Vec<(&str, (String, String))> = ["backup", "restore", "prune"]
        .iter()
        .map(|r| (*r, rgw_user(&format!("{r}-{tag}"))))
        .collect();
    // One bucket policy: each user gets what `vault iam-policy` prints for its role.
    let mut statements = Vec::new();
    for (role, _) in &users {
        let p = env.json(&[
            "vault",
            "iam-policy",
            "--role",
            role,
            "--principal",
            &format!("arn:aws:iam:::user/{role}-{tag}"),
        ]);
        statements.extend(p["Statement"].as_array().unwrap().iter().cloned());
    }
    let policy = serde_json::json!({"Version": "2012-10-17", "Statement": statements});
    boto3(
        &url,
        ("testing", "testing"),
        &bucket,
        &format!(
            "c.put_bucket_policy(Bucket=bucket, Policy={:?})",
            policy.to_string()
        ),
    );
    let as_user = |role: &str, args: &[&str]| {
        let (_, (access, secret)) = users.iter().find(|(r, _)| *r == role).unwrap();
        let mut c = env.command(args);
        c.env("AWS_ACCESS_KEY_ID", access)
            .env("AWS_SECRET_ACCESS_KEY", secret);
        c.output().unwrap()
    };
    let keys = |role: &str| {
        let (_, (a, s)) = users.iter().find(|(r, _)| *r == role).unwrap();
        (a.clone(), s.clone())
    };

    // Backup and restore with their own credentials.
    let img = env.path("r.img");
    std::fs::write(&img, pseudo_random(50, 3 << 20)).unwrap();
    let out = as_user(
        "backup",
        &[
            "block",
            "backup",
            img.to_str().unwrap(),
            "--output-format",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "backup with the backup role: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rp = rp_of(&serde_json::from_slice(&out.stdout).unwrap());
    let back = env.path("back.img");
    let out = as_user(
        "restore",
        &["block", "restore", "--rp", &rp, back.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "restore with the restore role: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&back).unwrap(), pseudo_random(50, 3 << 20));

    // The backup role cannot remove anything: not an RP, not a pack, not a version.
    let out = as_user("backup", &["rp", "delete", &rp]);
    assert!(!out.status.success(), "rp delete with the backup role");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("access denied"), "{err}");
    let (a, s) = keys("backup");
    let attack = boto3(
        &url,
        (&a, &s),
        &bucket,
        r#"
out = []
key = c.list_objects_v2(Bucket=bucket, Prefix='vault/packs/')['Contents'][0]['Key']
for call in (lambda: c.delete_object(Bucket=bucket, Key=key),
             lambda: c.delete_objects(Bucket=bucket, Delete={'Objects': [{'Key': key}]})):
    try:
        r = call()
        out.append('denied' if r.get('Errors') else 'deleted')
    except botocore.exceptions.ClientError:
        out.append('denied')
print(' '.join(out))
"#,
    );
    assert_eq!(
        attack.trim(),
        "denied denied",
        "the backup role deleted a pack"
    );
    // Nor can the prune role destroy a locked version.
    let (a, s) = keys("prune");
    let attack = boto3(
        &url,
        (&a, &s),
        &bucket,
        r#"
key = c.list_objects_v2(Bucket=bucket, Prefix='vault/packs/')['Contents'][0]['Key']
vid = c.list_object_versions(Bucket=bucket, Prefix=key)['Versions'][0]['VersionId']
try:
    c.delete_object(Bucket=bucket, Key=key, VersionId=vid)
    print('destroyed')
except botocore.exceptions.ClientError as e:
    print('refused', e.response['Error']['Code'])
"#,
    );
    assert!(attack.starts_with("refused"), "a locked version: {attack}");
    let out = as_user("restore", &["check", "--read-data"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The prune role deletes RPs and prunes (hiding, since everything is locked).
    let out = as_user("prune", &["rp", "delete", &rp]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_user("prune", &["prune", "--output-format", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(p["lock"]["postponed"].as_u64().unwrap() > 0, "{p}");
}

#[test]
fn point_in_time_recovers_from_an_attacker_on_every_server() {
    use scalez::store::lock::ObjectLockStore;
    for (name, url) in s3_servers() {
        let env =
            Env::s3_with_init_args(&url, &["--object-lock", "governance", "--retention", "1d"]);
        let img = env.path("p.img");
        std::fs::write(&img, pseudo_random(60, 3 << 20)).unwrap();
        let rp1 = rp_of(&env.backup(&img, None));
        std::fs::write(&img, pseudo_random(61, 3 << 20)).unwrap();
        let rp2 = rp_of(&env.backup(&img, None));
        // Listings give times to the second on some servers.
        std::thread::sleep(Duration::from_millis(1500));
        let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        std::thread::sleep(Duration::from_millis(1500));

        // The attacker, with the vault's own credentials: a catalog entry deleted, an index
        // object and a pack overwritten.
        let s = vault_store(&env, &url);
        s.delete(&format!("catalog/{rp1}")).unwrap();
        let index = s.list("index/").unwrap()[0].key.clone();
        s.put(&index, b"encrypted by ransomware", PutMode::Overwrite)
            .unwrap();
        // The config too: the vault no longer opens.
        s.put("config", b"{\"config\": {}}", PutMode::Overwrite)
            .unwrap();
        let packs = s.list("packs/").unwrap();
        for p in &packs {
            s.put(&p.key, b"encrypted by ransomware", PutMode::Overwrite)
                .unwrap();
        }
        let listed = env.command(&["rp", "list"]).output().unwrap();
        assert!(
            !listed.status.success(),
            "{name}: the vault does not open any more"
        );
        let out = env.path("o.img");
        let failed = env
            .command(&["block", "restore", "--rp", &rp2, out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!failed.status.success(), "{name}: the damage is real");
        assert!(
            !out.exists(),
            "{name}: a failed restore left its target: {}",
            String::from_utf8_lossy(&failed.stderr)
        );

        // As it was: every RP restores.
        let then = env.json(&["--point-in-time", &at, "rp", "list"]);
        assert_eq!(then.as_array().unwrap().len(), 2, "{name}: {then}");
        for (rp, seed) in [(&rp1, 60), (&rp2, 61)] {
            let out = env.path(&format!("then-{seed}.img"));
            env.ok(&[
                "--point-in-time",
                &at,
                "block",
                "restore",
                "--rp",
                rp,
                out.to_str().unwrap(),
            ]);
            assert_eq!(
                std::fs::read(&out).unwrap(),
                pseudo_random(seed, 3 << 20),
                "{name}"
            );
        }
        let denied = env
            .command(&["--point-in-time", &at, "rp", "delete", &rp2])
            .output()
            .unwrap();
        assert!(
            !denied.status.success(),
            "{name}: a point in time is read only"
        );

        // The repair: the vault is as it was, and new backups go on.
        let r = env.json(&["vault", "restore-versions", "--to", &at]);
        let report = &r["report"];
        assert_eq!(
            report["unhidden"].as_array().unwrap().len(),
            1,
            "{name}: {r}"
        );
        assert_eq!(
            // Every pack, the index object and the config.
            report["restored"].as_array().unwrap().len(),
            packs.len() + 2,
            "{name}: {r}"
        );
        for (rp, seed) in [(&rp1, 60), (&rp2, 61)] {
            let out = env.path(&format!("now-{seed}.img"));
            env.restore(rp, &out);
            assert_eq!(
                std::fs::read(&out).unwrap(),
                pseudo_random(seed, 3 << 20),
                "{name}"
            );
        }
        env.ok(&["check", "--read-data"]);
        let lock: &dyn ObjectLockStore = &s;
        // The attacker's versions (unlocked) are gone: each pack is its one first version.
        assert!(
            lock.versions("packs/").unwrap().len() == packs.len(),
            "{name}"
        );
    }
}
