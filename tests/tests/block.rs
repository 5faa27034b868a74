//! End-to-end: `elastio block backup/restore` and `rp` commands on real files and devices.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use elastio_tests::*;

struct Image {
    name: &'static str,
    path: PathBuf,
}

/// Images covering the shapes a disk takes: holes, explicit zero runs, random data, repeated
/// blocks, sizes off the chunk grid, tiny and empty.
fn make_images(dir: &Path) -> Vec<Image> {
    let mut out = Vec::new();
    let mut add = |name: &'static str, f: &dyn Fn(&Path)| {
        let path = dir.join(format!("{name}.img"));
        f(&path);
        out.push(Image { name, path });
    };
    add("holes", &|p| {
        sparse_file(p, 40 << 20);
        write_at(p, 0, &pseudo_random(1, 1 << 20));
        write_at(p, 10 << 20, &pseudo_random(2, 512 << 10));
        write_at(p, (40 << 20) - 100_000, &pseudo_random(3, 100_000));
    });
    add("zero-runs", &|p| {
        let mut d = pseudo_random(4, 8 << 20);
        d[2 << 20..5 << 20].fill(0);
        d[6 << 20..(6 << 20) + 1000].fill(0);
        std::fs::write(p, d).unwrap();
    });
    add("random", &|p| {
        std::fs::write(p, pseudo_random(5, 16 << 20)).unwrap()
    });
    add("repeated", &|p| {
        let block = pseudo_random(6, CHUNK);
        let mut d: Vec<u8> = block.iter().copied().cycle().take(16 << 20).collect();
        d[(7 << 20) + 5] ^= 0xff;
        std::fs::write(p, d).unwrap();
    });
    add("odd-size", &|p| {
        std::fs::write(p, pseudo_random(7, (5 << 20) + 12345)).unwrap()
    });
    add("tiny", &|p| {
        std::fs::write(p, pseudo_random(8, 1000)).unwrap()
    });
    add("empty", &|p| std::fs::write(p, b"").unwrap());
    out
}

fn round_trips(engine: &str, extra_env: &[(&str, &str)], direct: Option<&str>) {
    let env = Env::new();
    let images = make_images(env.dir.path());
    for img in &images {
        let mut args = vec![
            "block",
            "backup",
            img.path.to_str().unwrap(),
            "--output-format",
            "json",
        ];
        if let Some(d) = direct {
            args.extend(["--direct-io", d]);
        }
        let mut c = env.command(&args);
        c.env("ELASTIO_IO_ENGINE", engine);
        for (k, v) in extra_env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            img.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["engine"], engine, "{}", img.name);
        let rp = report["rp"]["id"].as_str().unwrap().to_string();
        let size = std::fs::metadata(&img.path).unwrap().len();
        assert_eq!(report["rp"]["logical_size"], size, "{}", img.name);

        let target = env.path(&format!("{}.restored", img.name));
        env.restore(&rp, &target);
        assert_eq!(
            sha256_file(&target),
            sha256_file(&img.path),
            "{} ({engine}) restores byte-exact",
            img.name
        );
        if img.name == "holes" {
            assert!(
                report["rp"]["bytes_read"].as_u64().unwrap() < 4 << 20,
                "holes are skipped: {report}"
            );
            assert!(
                allocated(&target) < 8 << 20,
                "zero chunks restore as holes ({} bytes allocated)",
                allocated(&target)
            );
        }
    }
}

#[test]
fn round_trips_with_pread_engine() {
    round_trips("pread", &[], None);
}

#[test]
fn round_trips_with_io_uring_engine() {
    round_trips("io_uring", &[], None);
}

#[test]
fn round_trips_with_o_direct() {
    // The vault's temp dir is on a disk file system that accepts O_DIRECT; tmpfs falls back.
    round_trips("io_uring", &[], Some("always"));
    round_trips("pread", &[], Some("always"));
}

#[test]
fn unchanged_rebackup_stores_nothing_and_records_parent() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo_random(10, 24 << 20)).unwrap();
    let first = env.backup(&img, None);
    let before = env.vault_bytes();
    let second = env.backup(&img, None);
    assert_eq!(second["rp"]["parent"], first["rp"]["id"]);
    assert_eq!(second["rp"]["new_chunks"], 0, "{second}");
    assert_eq!(second["rp"]["new_bytes_stored"], 0);
    let growth = env.vault_bytes() - before;
    assert!(
        growth < 4096,
        "only a catalog entry is added, grew {growth}"
    );
    let target = env.path("r.img");
    env.restore(second["rp"]["id"].as_str().unwrap(), &target);
    assert_eq!(sha256_file(&target), sha256_file(&img));
}

#[test]
fn one_percent_change_stores_about_one_percent() {
    let env = Env::new();
    let img = env.path("disk.img");
    let size = 64 << 20;
    std::fs::write(&img, pseudo_random(11, size)).unwrap();
    let first = env.backup(&img, None);
    let full = first["rp"]["new_bytes_stored"].as_u64().unwrap();
    // Change 1 % of the chunks, spread over the disk.
    let chunks = size / CHUNK;
    let changed = chunks / 100;
    for i in 0..changed {
        let off = (i * (chunks / changed) * CHUNK + 4096) as u64;
        write_at(&img, off, &pseudo_random(100 + i as u64, 512));
    }
    let second = env.backup(&img, None);
    let new = second["rp"]["new_bytes_stored"].as_u64().unwrap();
    let pct = new as f64 * 100.0 / full as f64;
    assert_eq!(
        second["rp"]["new_chunks"].as_u64().unwrap(),
        changed as u64 + 1,
        "changed chunks plus the one leaf page"
    );
    assert!(
        (0.5..2.0).contains(&pct),
        "changing 1 % stored {pct:.2} % ({new} of {full} bytes)"
    );
    let target = env.path("r.img");
    env.restore(second["rp"]["id"].as_str().unwrap(), &target);
    assert_eq!(sha256_file(&target), sha256_file(&img));
    // The first RP still restores its own content.
    let target1 = env.path("r1.img");
    env.restore(first["rp"]["id"].as_str().unwrap(), &target1);
    assert_eq!(sha256_file(&target1), hex_of(&pseudo_random(11, size)));
}

fn hex_of(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

#[test]
fn wrong_password_is_a_clear_error() {
    let env = Env::new();
    let mut c = env.command(&["rp", "list"]);
    c.env("ELASTIO_PASSWORD", "not the password");
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong password"), "{err}");
    assert!(
        err.contains(env.vault.to_str().unwrap()),
        "names the vault: {err}"
    );

    let mut c = env.command(&["rp", "list"]);
    c.env_remove("ELASTIO_PASSWORD")
        .stdin(std::process::Stdio::null());
    let out = c.output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ELASTIO_PASSWORD"));

    let pwfile = env.path("pw");
    std::fs::write(&pwfile, format!("{}\n", env.password)).unwrap();
    let mut c = env.command(&["rp", "list", "--password-file", pwfile.to_str().unwrap()]);
    c.env_remove("ELASTIO_PASSWORD");
    assert!(
        c.output().unwrap().status.success(),
        "--password-file works"
    );
}

#[test]
fn flipped_byte_in_a_pack_fails_restore_naming_the_object() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo_random(12, 4 << 20)).unwrap();
    let rp = env.backup(&img, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let packs = env.packs();
    assert_eq!(packs.len(), 1);
    let pack = &packs[0];
    let mut data = std::fs::read(pack).unwrap();
    data[100_000] ^= 0x01;
    std::fs::write(pack, &data).unwrap();

    let target = env.path("restored.img");
    std::fs::write(&target, b"previous contents").unwrap();
    let out = env.run(&[
        "block",
        "restore",
        "--rp",
        &rp,
        target.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "damaged data has its own exit code"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let key = pack
        .strip_prefix(&env.vault)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(err.contains(&key), "error names the pack {key}: {err}");
    assert_eq!(
        std::fs::read(&target).unwrap(),
        b"previous contents",
        "a failed restore leaves the old target alone"
    );
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("elastio-partial"))
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");

    let fresh = env.path("fresh.img");
    let out = env.run(&["block", "restore", "--rp", &rp, fresh.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(!fresh.exists(), "no target that looks complete");
}

/// A 192 MiB image of random data (slow enough to interrupt) and a backup of it, started.
fn start_big_backup(env: &Env, seed: u64) -> (PathBuf, std::process::Child) {
    let img = env.path("big.img");
    for i in 0..6 {
        append_random(&img, seed + i, 32 << 20);
    }
    let child = env
        .command(&["block", "backup", img.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    (img, child)
}

/// Sends `signal` to `child` once `ready()` holds; false if the child ended first.
#[allow(unsafe_code)]
fn signal_when(child: &mut std::process::Child, signal: i32, ready: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(child.id() as i32, signal) };
    true
}

#[test]
fn killed_backup_leaves_no_rp_and_the_next_run_resumes() {
    let env = Env::with_init_args(&["--pack-size", "1MiB"]);
    let (img, mut child) = start_big_backup(&env, 20);
    // More than 8 packs: at least one index object exists, so the rerun has something to reuse.
    assert!(
        signal_when(&mut child, libc::SIGKILL, || env.packs().len() >= 12),
        "backup ended before it could be killed"
    );
    child.wait().unwrap();

    let rps = env.json(&["rp", "list"]);
    assert_eq!(rps, serde_json::json!([]), "no partial RP is visible");

    let report = env.backup(&img, None);
    let stored = report["rp"]["new_bytes_stored"].as_u64().unwrap();
    assert!(
        stored < 192 << 20,
        "the rerun reuses what the killed run indexed (stored {stored})"
    );
    let target = env.path("r.img");
    env.restore(report["rp"]["id"].as_str().unwrap(), &target);
    assert_eq!(sha256_file(&target), sha256_file(&img));
    assert_eq!(env.json(&["rp", "list"]).as_array().unwrap().len(), 1);
}

#[test]
fn a_vault_of_a_newer_format_is_refused() {
    let env = Env::new();
    let config = env.vault.join("config");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"version\": 1", "\"version\": 3")).unwrap();
    let out = env.run(&["rp", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("format version 3") && err.contains("upgrade"),
        "{err}"
    );
}

#[test]
fn missing_vault_and_existing_target_are_clear_errors() {
    let env = Env::new();
    let mut c = env.command(&["rp", "list"]);
    c.env("ELASTIO_VAULT", env.path("nowhere"));
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no vault at") && err.contains("vault init"),
        "{err}"
    );

    let img = env.path("d.img");
    std::fs::write(&img, pseudo_random(30, 300_000)).unwrap();
    let rp = env.backup(&img, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = env.run(&["block", "restore", "--rp", &rp, img.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let out = env.run(&["block", "restore", "--rp", "rp-bogus", "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid recovery point id"));
    let out = env.run(&["vault", "init"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let busy = env.path("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("precious.txt"), b"keep").unwrap();
    let mut c = env.command(&["vault", "init"]);
    c.env("ELASTIO_VAULT", &busy);
    let out = c.output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not empty"),
        "a non-empty directory is not turned into a vault"
    );
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);
}

#[test]
fn rp_list_show_and_tags() {
    let env = Env::new();
    let a = env.path("a.img");
    let b = env.path("b.img");
    std::fs::write(&a, pseudo_random(40, 1 << 20)).unwrap();
    std::fs::write(&b, pseudo_random(41, 1 << 20)).unwrap();
    let ra = env.json(&[
        "block",
        "backup",
        a.to_str().unwrap(),
        "--tag",
        "env=prod",
        "--tag",
        "tier=1",
    ]);
    let rb = env.json(&["block", "backup", b.to_str().unwrap(), "--tag", "env=dev"]);
    let ida = ra["rp"]["id"].as_str().unwrap();
    let idb = rb["rp"]["id"].as_str().unwrap();

    let all = env.json(&["rp", "list", "--type", "disk"]);
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert!(env
        .json(&["rp", "list", "--type", "stream"])
        .as_array()
        .unwrap()
        .is_empty());
    let prod = env.json(&["rp", "list", "--tag", "env=prod"]);
    assert_eq!(prod[0]["id"], ida);
    assert_eq!(prod.as_array().unwrap().len(), 1);
    let by_asset = env.json(&["rp", "list", "--asset", "b.img"]);
    assert_eq!(by_asset[0]["id"], idb);
    assert_eq!(
        by_asset[0]["asset"]["name"],
        std::fs::canonicalize(&b).unwrap().to_str().unwrap()
    );

    env.ok(&["rp", "tag", idb, "env=staging", "owner=ops"]);
    let shown = env.json(&["rp", "show", idb]);
    assert_eq!(shown["tags"]["env"], "staging");
    assert_eq!(shown["tags"]["owner"], "ops");
    env.ok(&["rp", "tag", idb, "--remove", "owner"]);
    let shown = env.json(&["rp", "show", idb]);
    assert!(shown["tags"].get("owner").is_none());
    assert_eq!(
        env.json(&["rp", "list", "--tag", "env=staging"])[0]["id"],
        idb
    );

    let table = env.ok(&["rp", "list"]);
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains(ida) && table.contains("env=prod,tier=1"),
        "{table}"
    );
    let show = env.ok(&["rp", "show", ida]);
    assert!(show.contains("parent        -"), "{show}");
    let info = env.json(&["vault", "info"]);
    assert_eq!(info["recovery_points"], 2);
    assert_eq!(info["config"]["chunk_size"], CHUNK);
    assert!(info["stored_bytes"].as_u64().unwrap() > 2 << 20, "{info}");
    let human = env.ok(&["block", "backup", a.to_str().unwrap()]);
    assert!(
        human.contains("logical size") && human.contains("new stored"),
        "{human}"
    );
}

#[test]
fn ext4_image_from_fixture_round_trips_and_fscks() {
    let env = Env::new();
    let img = ext4_image(&env, "ext4.img", 32 << 20);
    let rp = env.backup(&img, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let target = env.path("restored.img");
    env.restore(&rp, &target);
    assert_eq!(sha256_file(&target), sha256_file(&img));
    sh("e2fsck", &["-f", "-n", target.to_str().unwrap()]);
}

/// Block devices: a loop device as the source (BLKGETSIZE64, O_DIRECT) and another as the target.
#[test]
fn loop_device_round_trip() {
    assert!(
        is_root(),
        "this test needs root for losetup; run the suite as root (CI does)"
    );
    let env = Env::new();
    let img = env.path("dev.img");
    sparse_file(&img, 24 << 20);
    write_at(&img, 0, &pseudo_random(50, 3 << 20));
    write_at(&img, 20 << 20, &pseudo_random(51, 1 << 20));
    let src = LoopDev::attach(&img);
    let report = env.backup(Path::new(&src.0), None);
    assert_eq!(report["rp"]["logical_size"], 24 << 20);
    assert_eq!(
        report["direct_io"], true,
        "block devices are read with O_DIRECT"
    );

    let out_img = env.path("out.img");
    std::fs::write(&out_img, pseudo_random(52, 24 << 20)).unwrap(); // garbage to overwrite
    let dst = LoopDev::attach(&out_img);
    let rp = report["rp"]["id"].as_str().unwrap();
    let out = env.run(&["block", "restore", "--rp", rp, &dst.0]);
    assert!(
        !out.status.success(),
        "a device is not overwritten without --force"
    );
    env.ok(&["block", "restore", "--rp", rp, &dst.0, "--force"]);
    drop(dst);
    assert_eq!(
        sha256_file(&out_img),
        sha256_file(&img),
        "zero chunks were zeroed on the device"
    );
}

struct LoopDev(String);

impl LoopDev {
    fn attach(file: &Path) -> Self {
        let dev = sh("losetup", &["--find", "--show", file.to_str().unwrap()]);
        LoopDev(dev.trim().to_string())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn ctrl_c_stops_backup_and_restore_cleanly() {
    let env = Env::with_init_args(&["--pack-size", "1MiB"]);
    let (img, mut child) = start_big_backup(&env, 60);
    assert!(
        signal_when(&mut child, libc::SIGINT, || env.packs().len() >= 3),
        "backup ended before it could be interrupted"
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    assert_eq!(env.json(&["rp", "list"]), serde_json::json!([]));

    let rp = env.backup(&img, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let target = env.path("restored.img");
    let partial = || {
        std::fs::read_dir(env.dir.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("elastio-partial"))
    };
    let mut interrupted = false;
    for _ in 0..5 {
        let mut child = env
            .command(&[
                "block",
                "restore",
                "--rp",
                &rp,
                target.to_str().unwrap(),
                "--force",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let signalled = signal_when(&mut child, libc::SIGINT, partial);
        let status = child.wait().unwrap();
        if signalled && status.code() == Some(130) {
            interrupted = true;
            assert!(!target.exists(), "an interrupted restore leaves no target");
            assert!(!partial(), "and no partial file");
            break;
        }
        let _ = std::fs::remove_file(&target);
    }
    assert!(interrupted, "no restore could be interrupted in 5 tries");
}

/// A vault written by format version 1 (fixtures/golden-vault-v1, see fixtures/README.md) must keep
/// opening and restoring byte-exact: this fails when an on-store format changes by accident.
#[test]
fn golden_vault_of_format_1_still_restores() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/golden-vault-v1");
    let env = Env::new();
    let vault = env.path("golden");
    sh(
        "cp",
        &["-r", fixture.to_str().unwrap(), vault.to_str().unwrap()],
    );
    let run = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--output-format", "json"]);
        let mut c = env.command(&a);
        c.env("ELASTIO_VAULT", &vault)
            .env("ELASTIO_PASSWORD", "golden");
        Env::json_of(&mut c)
    };
    let rps = run(&["rp", "list"]);
    assert_eq!(rps[0]["id"], "rp-01m80q0exmx4mr1kh8rkgkg9q4");
    assert_eq!(rps[0]["tags"]["fixture"], "golden");
    assert_eq!(rps[0]["logical_size"], 1049576);
    let target = env.path("golden.img");
    run(&[
        "block",
        "restore",
        "--rp",
        "rp-01m80q0exmx4mr1kh8rkgkg9q4",
        target.to_str().unwrap(),
    ]);
    assert_eq!(
        sha256_file(&target),
        "8c1cf74b6db0ac1203a0fd144f4ed3dc5a832211bd03cc8afcf04ef1c1dd81ec"
    );
}
