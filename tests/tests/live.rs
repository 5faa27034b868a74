//! End-to-end: backups of disks that live on — changed-block incrementals from a changed map,
//! checked by sampled verification; full backups that skip the file systems' free space.

use std::path::Path;

use elastio_tests::*;

fn backup_with(env: &Env, img: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["block", "backup", img.to_str().unwrap()];
    args.extend_from_slice(extra);
    env.json(&args)
}

fn fails_with(env: &Env, args: &[&str]) -> String {
    let out = env.run(args);
    assert!(!out.status.success(), "elastio {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn restored_equals(env: &Env, report: &serde_json::Value, img: &Path) {
    let target = env.path("restored.img");
    let _ = std::fs::remove_file(&target);
    env.restore(report["rp"]["id"].as_str().unwrap(), &target);
    assert_eq!(
        sha256_file(&target),
        sha256_file(img),
        "restore of {report}"
    );
}

#[test]
fn changed_map_incremental_reads_only_the_listed_ranges() {
    let env = Env::new();
    let img = env.path("disk.img");
    let size = 32 << 20;
    std::fs::write(&img, pseudo_random(1, size)).unwrap();
    let first = backup_with(&env, &img, &[]);
    // Five changes: one inside a chunk, one across a chunk boundary, one of whole 4 KiB units.
    let changes: [(u64, usize); 3] = [
        (1 << 20, 100),
        (5 * CHUNK as u64 - 10, 20),
        (20 << 20, 8192),
    ];
    for (i, (at, len)) in changes.iter().enumerate() {
        write_at(&img, *at, &pseudo_random(50 + i as u64, *len));
    }
    let map = env.path("changed.txt");
    std::fs::write(
        &map,
        format!(
            "# elastio changed-map 1\nparent {}\n{} {}\n{:#x},{}\n\n{} {}  # 4 KiB units below would do too\n",
            first["rp"]["id"].as_str().unwrap(),
            changes[0].0, changes[0].1, changes[1].0, changes[1].1, changes[2].0, changes[2].1
        ),
    )
    .unwrap();
    let m = map.to_str().unwrap();
    let second = backup_with(&env, &img, &["--changed-map", m, "--verify-share", "0"]);
    assert_eq!(second["rp"]["parent"], first["rp"]["id"]);
    // Four chunks hold the changes (the second straddles two); only their changed 4 KiB pages
    // are read, the rest of each chunk comes from the parent.
    let f = &second["figures"];
    assert_eq!(f["bytes_read"], 5 * 4096, "{second}");
    assert_eq!(f["unchanged_kept"], (size - 4 * CHUNK) as u64);
    assert_eq!(second["rp"]["bytes_read"], 5 * 4096);
    restored_equals(&env, &second, &img);

    // The default sample: 1 % of the kept chunks re-read, the result the same.
    write_at(&img, 30 << 20, &pseudo_random(60, 4096));
    std::fs::write(&map, "unit 4096\n7680 1\n").unwrap();
    let second_id = second["rp"]["id"].as_str().unwrap();
    let third = backup_with(&env, &img, &["--changed-map", m, "--parent", second_id]);
    let f = &third["figures"];
    let read = f["bytes_read"].as_u64().unwrap();
    assert!(read >= 4096 && read < size as u64 / 20, "{third}");
    assert_eq!(read - f["unchanged_verified"].as_u64().unwrap(), 4096);
    restored_equals(&env, &third, &img);
}

#[test]
fn a_wrong_changed_map_is_caught_by_verification() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo_random(2, 8 << 20)).unwrap();
    let first = backup_with(&env, &img, &[]);
    let first = first["rp"]["id"].as_str().unwrap();
    // Two changes, the map lists one.
    write_at(&img, 4096, &pseudo_random(70, 512));
    write_at(&img, 6 << 20, &pseudo_random(71, 512));
    let map = env.path("wrong.txt");
    std::fs::write(&map, format!("parent {first}\n4096 512\n")).unwrap();
    let m = map.to_str().unwrap();
    let img_s = img.to_str().unwrap();
    let err = fails_with(
        &env,
        &[
            "block",
            "backup",
            img_s,
            "--changed-map",
            m,
            "--verify-share",
            "100",
        ],
    );
    assert!(
        err.contains("bytes 6291456..6422528") && err.contains("differ from parent recovery point"),
        "{err}"
    );
    assert_eq!(
        env.json(&["rp", "list"]).as_array().unwrap().len(),
        1,
        "no RP was made"
    );
    // By option, the backup starts over as a full read and is right.
    let report = backup_with(
        &env,
        &img,
        &[
            "--changed-map",
            m,
            "--verify-share",
            "100",
            "--on-mismatch",
            "full-read",
        ],
    );
    assert!(report["fell_back_to_full_read"]
        .as_str()
        .unwrap()
        .contains("6291456"));
    assert_eq!(report["figures"]["unchanged_kept"], 0);
    restored_equals(&env, &report, &img);
}

#[test]
fn changed_map_errors_name_the_line_and_need_a_parent() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo_random(3, 1 << 20)).unwrap();
    let map = env.path("map.txt");
    std::fs::write(&map, "0 4096\n").unwrap();
    let (i, m) = (img.to_str().unwrap(), map.to_str().unwrap());
    let err = fails_with(&env, &["block", "backup", i, "--changed-map", m]);
    assert!(
        err.contains("has none yet: make a full backup first"),
        "{err}"
    );
    let first = backup_with(&env, &img, &[]);
    let first = first["rp"]["id"].as_str().unwrap().to_string();
    // A map must name the RP its changes count from, and that must be the latest.
    let err = fails_with(&env, &["block", "backup", i, "--changed-map", m]);
    assert!(err.contains("must name the recovery point"), "{err}");
    std::fs::write(&map, "parent rp-0000000000000000000000000\n0 4096\n").unwrap();
    let err = fails_with(&env, &["block", "backup", i, "--changed-map", m]);
    assert!(
        err.contains("changes between them would be missed"),
        "{err}"
    );
    std::fs::write(&map, "0 4096\n# fine\n1052672 4096\n").unwrap();
    let err = fails_with(&env, &["block", "backup", i, "--changed-map", m]);
    assert!(
        err.contains("map.txt") && err.contains("line 3") && err.contains("past the disk"),
        "{err}"
    );
    std::fs::write(&map, "0 4096 junk\n").unwrap();
    let err = fails_with(&env, &["block", "backup", i, "--changed-map", m]);
    assert!(err.contains("line 1: expected START LENGTH"), "{err}");
    // A source that grew: the parent's map cannot apply.
    append_random(&img, 4, 1 << 20);
    std::fs::write(&map, format!("parent {first}\n0 4096\n")).unwrap();
    let err = fails_with(&env, &["block", "backup", i, "--changed-map", m]);
    assert!(err.contains("cannot apply"), "{err}");
}

/// A tree of `count` files of pseudo-random bytes, `len` each; returns its path.
fn random_tree(env: &Env, name: &str, count: usize, len: usize) -> std::path::PathBuf {
    let root = env.path(name);
    std::fs::create_dir_all(root.join("d")).unwrap();
    for i in 0..count {
        std::fs::write(
            root.join(format!("d/f{i:03}")),
            pseudo_random(1000 + i as u64, len),
        )
        .unwrap();
    }
    root
}

/// Used bytes of an ext4 image, from its superblock.
fn ext4_used(img: &Path) -> u64 {
    let out = sh("dumpe2fs", &["-h", img.to_str().unwrap()]);
    let field = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("{name} in {out}"))
    };
    (field("Block count:") - field("Free blocks:")) * field("Block size:")
}

/// Every file of `tree` under `dir` (a mount or dump of a restore) with the same bytes.
fn same_files(tree: &Path, dir: &Path, skip: &dyn Fn(&str) -> bool) {
    let mut n = 0;
    for e in std::fs::read_dir(tree.join("d")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if skip(&name) {
            continue;
        }
        let (a, b) = (tree.join("d").join(&name), dir.join("d").join(&name));
        assert_eq!(sha256_file(&a), sha256_file(&b), "{name}");
        n += 1;
    }
    assert!(n > 0);
}

#[test]
fn used_blocks_only_backup_of_ext4_skips_free_space_and_garbage() {
    let env = Env::new();
    // 60 files of 1 MiB in 96 MiB; 20 of them deleted afterwards, their bytes left behind.
    let tree = random_tree(&env, "tree", 60, 1 << 20);
    let img = env.path("ext4.img");
    sh("truncate", &["-s", "96M", img.to_str().unwrap()]);
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
    let deleted = |name: &str| name.ends_with('0') || name.ends_with('3') || name.ends_with('6');
    for i in 0..60 {
        let name = format!("f{i:03}");
        if deleted(&name) {
            sh(
                "debugfs",
                &["-w", "-R", &format!("rm /d/{name}"), img.to_str().unwrap()],
            );
        }
    }
    let used = ext4_used(&img);
    let size = std::fs::metadata(&img).unwrap().len();
    let report = backup_with(&env, &img, &["--skip-free"]);
    let f = &report["figures"];
    let read = f["bytes_read"].as_u64().unwrap();
    assert!(
        read <= used + used / 20,
        "read {read} of {used} used bytes: {report}"
    );
    assert!(
        read >= used / 2,
        "read {read}: too little for {used} used bytes"
    );
    assert_eq!(f["free_skipped"].as_u64().unwrap(), size - used, "{report}");
    let lines = report["free_space"].to_string();
    assert!(lines.contains("disk: ext4"), "{lines}");
    // Restored: fsck clean, every remaining file equal.
    let target = env.path("restored.img");
    env.restore(report["rp"]["id"].as_str().unwrap(), &target);
    sh("e2fsck", &["-fn", target.to_str().unwrap()]);
    let dump = env.path("dump");
    std::fs::create_dir(&dump).unwrap();
    sh(
        "debugfs",
        &[
            "-R",
            &format!("rdump /d {}", dump.display()),
            target.to_str().unwrap(),
        ],
    );
    same_files(&tree, &dump, &deleted);
    // Without --skip-free, the garbage is stored too.
    let other = Env::new();
    let plain = backup_with(&other, &img, &[]);
    let (with, without) = (
        report["rp"]["new_bytes_stored"].as_u64().unwrap(),
        plain["rp"]["new_bytes_stored"].as_u64().unwrap(),
    );
    assert!(
        with + (15 << 20) < without,
        "stored {with} with --skip-free, {without} without"
    );
}

#[test]
fn used_blocks_only_refuses_stale_maps() {
    let env = Env::new();
    let tree = random_tree(&env, "tree", 4, 1 << 20);
    let img = env.path("ext4.img");
    sh("truncate", &["-s", "32M", img.to_str().unwrap()]);
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
    // A journal that needs recovery: the bitmaps may not be current, so nothing is skipped.
    sh(
        "debugfs",
        &["-w", "-R", "feature needs_recovery", img.to_str().unwrap()],
    );
    let report = backup_with(&env, &img, &["--skip-free"]);
    assert_eq!(report["figures"]["free_skipped"], 0, "{report}");
    assert!(
        report["free_space"]
            .to_string()
            .contains("journal needs recovery"),
        "{report}"
    );
    // Not cleanly unmounted (ext2 and journal-less ext4 have no journal flag to tell).
    sh(
        "debugfs",
        &["-w", "-R", "feature ^needs_recovery", img.to_str().unwrap()],
    );
    sh(
        "debugfs",
        &["-w", "-R", "ssv state 0", img.to_str().unwrap()],
    );
    let report = backup_with(&env, &img, &["--skip-free"]);
    assert_eq!(report["figures"]["free_skipped"], 0, "{report}");
    assert!(
        report["free_space"]
            .to_string()
            .contains("not cleanly unmounted"),
        "{report}"
    );
    // A file system the maps are not read for: read whole, said so.
    let raw = env.path("raw.img");
    std::fs::write(&raw, pseudo_random(5, 1 << 20)).unwrap();
    let report = backup_with(&env, &raw, &["--skip-free"]);
    assert!(
        report["free_space"].to_string().contains("read whole"),
        "{report}"
    );
    assert_eq!(report["figures"]["bytes_read"], 1 << 20);
}

/// Loop-mounts `img` at `mnt` (root).
fn mount_loop(img: &Path, mnt: &Path) {
    std::fs::create_dir_all(mnt).unwrap();
    sh(
        "mount",
        &["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
    );
}

#[test]
fn used_blocks_only_backup_of_xfs_skips_free_space_and_refuses_a_dirty_log() {
    if !is_root() {
        eprintln!("skipped: needs root for loop mounts");
        return;
    }
    let env = Env::new();
    let img = env.path("xfs.img");
    sh("truncate", &["-s", "300M", img.to_str().unwrap()]);
    sh("mkfs.xfs", &["-q", "-f", img.to_str().unwrap()]);
    let mnt = env.path("mnt");
    mount_loop(&img, &mnt);
    let tree = random_tree(&env, "tree", 120, 1 << 20);
    sh(
        "cp",
        &[
            "-a",
            tree.join("d").to_str().unwrap(),
            mnt.to_str().unwrap(),
        ],
    );
    let deleted = |name: &str| name.ends_with('1') || name.ends_with('4') || name.ends_with('7');
    for e in std::fs::read_dir(mnt.join("d")).unwrap() {
        let e = e.unwrap();
        if deleted(e.file_name().to_str().unwrap()) {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    sh("sync", &[]);
    let out = sh("df", &["-B1", "--output=used", mnt.to_str().unwrap()]);
    let used: u64 = out.lines().nth(1).unwrap().trim().parse().unwrap();
    sh("umount", &[mnt.to_str().unwrap()]);

    let report = backup_with(&env, &img, &["--skip-free"]);
    let read = report["figures"]["bytes_read"].as_u64().unwrap();
    // df leaves out the internal log, which is read (it is not free space).
    assert!(
        read <= used + (16 << 20),
        "read {read} of {used} used bytes: {report}"
    );
    assert!(
        report["free_space"].to_string().contains("disk: xfs"),
        "{report}"
    );
    let target = env.path("restored.img");
    env.restore(report["rp"]["id"].as_str().unwrap(), &target);
    sh("xfs_repair", &["-n", "-f", target.to_str().unwrap()]);
    let rmnt = env.path("rmnt");
    std::fs::create_dir_all(&rmnt).unwrap();
    sh(
        "mount",
        &[
            "-o",
            "loop,ro",
            target.to_str().unwrap(),
            rmnt.to_str().unwrap(),
        ],
    );
    let compared = std::panic::catch_unwind(|| same_files(&tree, &rmnt, &deleted));
    sh("umount", &[rmnt.to_str().unwrap()]);
    compared.unwrap();

    // A mounted device is refused: its maps on disk are not current.
    let dev = sh("losetup", &["-f", "--show", img.to_str().unwrap()])
        .trim()
        .to_string();
    sh("mount", &[&dev, mnt.to_str().unwrap()]);
    let out = env.run(&["block", "backup", &dev, "--skip-free"]);
    let attached = env.run(&["block", "backup", img.to_str().unwrap(), "--skip-free"]);
    // A log left dirty: a shutdown without a log flush, then the unmount.
    std::fs::write(mnt.join("late"), b"written before the shutdown").unwrap();
    sh("sync", &[]); // the transactions reach the log; the shutdown stops it short of a clean end
    sh("xfs_io", &["-x", "-c", "shutdown", mnt.to_str().unwrap()]);
    sh("umount", &[mnt.to_str().unwrap()]);
    sh("losetup", &["-d", &dev]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use (mounted?)"), "{err}");
    let err = String::from_utf8_lossy(&attached.stderr);
    assert!(
        !attached.status.success() && err.contains("is attached to /dev/loop"),
        "{err}"
    );
    let report = backup_with(&env, &img, &["--skip-free"]);
    assert_eq!(report["figures"]["free_skipped"], 0, "{report}");
    assert!(
        report["free_space"]
            .to_string()
            .contains("log needs recovery"),
        "{report}"
    );
}

/// `qemu-nbd` serving `image` (read-only, persistent, `args` added) on a Unix socket; killed on
/// drop.
struct QemuNbd {
    child: std::process::Child,
    uri: String,
}

impl QemuNbd {
    fn start(env: &Env, image: &Path, args: &[&str]) -> QemuNbd {
        let sock = env.path("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let child = std::process::Command::new("qemu-nbd")
            .args(["-r", "-t", "-f", "qcow2", "-x", "vm0", "-k"])
            .arg(&sock)
            .args(args)
            .arg(image)
            .spawn()
            .expect("qemu-nbd (qemu-utils) is installed by cargo xtask test");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-nbd did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        QemuNbd {
            child,
            uri: format!("nbd+unix:///vm0?socket={}", sock.display()),
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nbd_source_full_then_dirty_bitmap_incremental() {
    let env = Env::new();
    // 64 MiB: 40 MiB of data, the rest never written (a hole the export reports as zeros).
    let raw = env.path("raw.img");
    std::fs::write(&raw, pseudo_random(9, 40 << 20)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let qcow = env.path("disk.qcow2");
    let (raw_s, qcow_s) = (raw.to_str().unwrap(), qcow.to_str().unwrap());
    sh(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", raw_s, qcow_s],
    );
    sh("qemu-img", &["bitmap", "--add", qcow_s, "b0"]);

    let nbd = QemuNbd::start(&env, &qcow, &[]);
    let full = env.json(&["block", "backup", &nbd.uri, "--asset-name", "vm0"]);
    drop(nbd);
    let f = &full["figures"];
    assert_eq!(
        f["bytes_read"],
        40 << 20,
        "the zero tail is not read: {full}"
    );
    restored_equals(&env, &full, &raw);

    // 2 % of the disk changes through QEMU, which marks the bitmap: 10 writes of 4 KiB, in
    // 10 distinct chunks, plus one of 1 MiB across 8 more.
    let mut cmds = Vec::new();
    for i in 0..10u64 {
        cmds.push(format!("write -P 0x5a {} 4096", i * 3 * 1024 * 1024 + 8192));
    }
    cmds.push(format!("write -P 0x33 {} {}", 50 << 20, 1 << 20));
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(qcow_s);
    sh("qemu-io", &args);
    let now = env.path("now.raw");
    sh(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            qcow_s,
            now.to_str().unwrap(),
        ],
    );

    let nbd = QemuNbd::start(&env, &qcow, &["-B", "b0"]);
    let parent = full["rp"]["id"].as_str().unwrap();
    let base = [
        "block",
        "backup",
        &nbd.uri,
        "--asset-name",
        "vm0",
        "--dirty-bitmap",
        "b0",
    ];
    let mut args = base.to_vec();
    args.extend(["--parent", parent, "--verify-share", "0"]);
    let inc = env.json(&args);
    let read = inc["figures"]["bytes_read"].as_u64().unwrap();
    // What the bitmap marks: 64 KiB granules around the small writes, the 1 MiB one whole.
    assert_eq!(
        read,
        10 * 65536 + (1 << 20),
        "only the dirty ranges are read: {inc}"
    );
    assert_eq!(inc["rp"]["parent"], full["rp"]["id"]);
    restored_equals(&env, &inc, &now);
    // The same point in time read whole (a full backup into another vault) is the same disk.
    let other = Env::new();
    let whole = other.json(&["block", "backup", &nbd.uri, "--asset-name", "vm0"]);
    assert_eq!(whole["rp"]["logical_size"], inc["rp"]["logical_size"]);
    restored_equals(&other, &whole, &now);

    // The bitmap must count from a named parent, and must exist.
    let err = fails_with(&env, &base);
    assert!(err.contains("--parent"), "{err}");
    let mut args = base.to_vec();
    args[6] = "nosuch";
    args.extend(["--parent", parent]);
    let err = fails_with(&env, &args);
    assert!(
        err.contains("qemu:dirty-bitmap:nosuch") && err.contains("not offered"),
        "{err}"
    );
}

/// A minimal QMP client for checking what QEMU holds (connected only for one look: a monitor
/// serves one client at a time).
struct QmpProbe(std::io::BufReader<std::os::unix::net::UnixStream>);

/// Exports, elastio's nodes, bitmaps of `node` and jobs of the QEMU on `sock`.
fn qemu_state(sock: &Path, node: &str) -> String {
    QmpProbe::connect(sock).state(node)
}

impl QmpProbe {
    fn connect(sock: &Path) -> QmpProbe {
        let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        let mut q = QmpProbe(std::io::BufReader::new(s));
        q.line();
        q.run("qmp_capabilities");
        q
    }
    fn line(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        loop {
            let mut l = String::new();
            self.0.read_line(&mut l).unwrap();
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        }
    }
    fn run(&mut self, cmd: &str) -> serde_json::Value {
        self.run_with(cmd, serde_json::json!({}))
    }
    fn run_with(&mut self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        use std::io::Write;
        let msg = format!(
            "{}\n",
            serde_json::json!({"execute": cmd, "arguments": args})
        );
        self.0.get_mut().write_all(msg.as_bytes()).unwrap();
        self.line()["return"].clone()
    }
    /// Exports, elastio's nodes, bitmaps of `node` and jobs, for comparing with a clean state.
    fn state(&mut self, node: &str) -> String {
        let exports = self.run("query-block-exports");
        let nodes = self.run("query-named-block-nodes");
        let names: Vec<&str> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["node-name"].as_str())
            .filter(|n| n.contains("elastio"))
            .collect();
        let bitmaps: Vec<String> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["node-name"] == node)
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .map(|b| {
                // Generations (`b0@<16 hex>`) compare as one name.
                let name = b["name"].as_str().unwrap_or_default();
                let base = name.rsplit_once('@').map_or(name, |(b, _)| b);
                let generation = if name.contains('@') { "@G" } else { "" };
                format!("{base}{generation}:{}", b["recording"])
            })
            .collect();
        let jobs = self.run("query-block-jobs");
        format!("exports {exports} elastio nodes {names:?} bitmaps {bitmaps:?} jobs {jobs}")
    }
}

/// Block `i` (64 KiB) of the writer's pattern: where it lies on the 64 MiB disk.
fn pattern_block(i: u64) -> u64 {
    i * (1 << 20) + 192 * 1024
}

/// Whether the 32 pattern blocks of `img` read like one moment of the writer: round r written
/// into blocks 0..j, round r - 1 still in the rest.
fn consistent(img: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(img).unwrap();
    let mut rounds = Vec::new();
    for i in 0..32 {
        let mut b = vec![0u8; 65536];
        f.read_exact_at(&mut b, pattern_block(i)).unwrap();
        let r = u64::from_le_bytes(b[..8].try_into().unwrap());
        if b.chunks_exact(8)
            .any(|w| u64::from_le_bytes(w.try_into().unwrap()) != r)
        {
            return Err(format!("block {i} is torn"));
        }
        rounds.push(r);
    }
    let top = rounds[0];
    let ok = rounds.windows(2).all(|w| w[0] >= w[1]) && rounds.iter().all(|&r| r + 1 >= top);
    if ok {
        Ok(())
    } else {
        Err(format!("rounds {rounds:?} are no single moment"))
    }
}

#[test]
fn pull_mode_backup_of_a_live_qemu_node_with_a_dirty_bitmap() {
    if !is_root() {
        eprintln!("skipped: needs root (the writer goes through a FUSE export)");
        return;
    }
    let env = Env::new();
    let raw = env.path("raw.img");
    std::fs::write(&raw, pseudo_random(12, 64 << 20)).unwrap();
    let qcow = env.path("disk.qcow2");
    sh(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            qcow.to_str().unwrap(),
        ],
    );
    let (qmp, fuse) = (env.path("qmp.sock"), env.path("fuse.img"));
    std::fs::write(&fuse, b"").unwrap();
    let qsd = std::process::Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            qcow.display()
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
        .expect("qemu-storage-daemon (qemu-utils)");
    let _qsd = KillOnDrop(qsd, Some(fuse.clone()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !qmp.exists() || std::fs::metadata(&fuse).unwrap().len() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-storage-daemon did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The writer: rounds of 32 blocks of 64 KiB, each block written whole with its round
    // number, synchronously, until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, fuse) = (stop.clone(), fuse.clone());
        std::thread::spawn(move || {
            use std::os::unix::fs::{FileExt, OpenOptionsExt};
            let f = std::fs::File::options()
                .write(true)
                .custom_flags(libc::O_DSYNC)
                .open(&fuse)
                .unwrap();
            let mut round = 1u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let block: Vec<u8> = round.to_le_bytes().repeat(8192);
                for i in 0..32 {
                    f.write_all_at(&block, pattern_block(i)).unwrap();
                }
                round += 1;
            }
            round
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let q = qmp.to_str().unwrap();
    let args = [
        "block",
        "backup",
        "--qmp",
        q,
        "--node",
        "disk0",
        "--dirty-bitmap",
        "b0",
    ];
    let full = env.json(&args);
    assert_eq!(
        full["rp"]["asset"]["name"],
        format!("qemu:{}:disk0", qmp.display()),
        "the monitor names the VM"
    );
    assert!(full["rp"]["tags"]["qemu:dirty-bitmap"]
        .as_str()
        .unwrap()
        .starts_with("b0@"));
    assert!(
        full["figures"]["unchanged_kept"] == 0,
        "the first is a full read: {full}"
    );
    let target = env.path("full.img");
    env.restore(full["rp"]["id"].as_str().unwrap(), &target);
    consistent(&target).unwrap();

    std::thread::sleep(std::time::Duration::from_millis(300));
    let inc = env.json(&args);
    assert_eq!(inc["rp"]["parent"], full["rp"]["id"]);
    let f = &inc["figures"];
    let read = f["bytes_read"].as_u64().unwrap();
    let verified = f["unchanged_verified"].as_u64().unwrap();
    // The dirty ranges: the 32 pattern blocks (the bitmap's granularity is 64 KiB).
    assert_eq!(read - verified, 32 * 65536, "{inc}");
    let target2 = env.path("inc.img");
    env.restore(inc["rp"]["id"].as_str().unwrap(), &target2);
    consistent(&target2).unwrap();
    // Everything but the pattern blocks is the original disk.
    {
        use std::os::unix::fs::FileExt;
        let (a, b) = (
            std::fs::File::open(&target2).unwrap(),
            std::fs::File::open(&raw).unwrap(),
        );
        for at in (0..64u64 << 20).step_by(1 << 20) {
            let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
            a.read_exact_at(&mut x, at).unwrap();
            b.read_exact_at(&mut y, at).unwrap();
            let p = (pattern_block(at >> 20) - at) as usize;
            x[p..p + 65536].fill(0);
            y[p..p + 65536].fill(0);
            assert!(
                x == y,
                "MiB {} differs outside the writer's block",
                at >> 20
            );
        }
    }
    let clean = qemu_state(&qmp, "disk0");
    assert!(
        clean.contains("exports [{")
            && clean.contains("elastio nodes []")
            && clean.contains("jobs []"),
        "{clean}"
    );
    assert!(
        clean.contains("bitmaps [\"b0@G:true\"]"),
        "one recording bitmap: {clean}"
    );

    // A backup killed mid-way leaves its view behind; the next run removes it and carries on.
    let mut c = env.command(&args);
    c.env("ELASTIO_FAULTS", "latency_ms=400")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !qemu_state(&qmp, "disk0").contains("elastio-fleece") {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the backup ended first: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the view never appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        qemu_state(&qmp, "disk0").contains("elastio-fleece"),
        "left behind by the kill"
    );
    // An explicit clean-up, without a backup, leaves QEMU as it was.
    let mut cleanup = args.to_vec();
    cleanup.push("--qmp-cleanup");
    let out = env.json(&cleanup);
    assert_eq!(out["cleaned_up"], "disk0");
    assert_eq!(qemu_state(&qmp, "disk0"), clean);
    let after = env.json(&args);
    assert_eq!(
        after["rp"]["parent"], inc["rp"]["id"],
        "the bitmap still counts from inc"
    );
    assert_eq!(qemu_state(&qmp, "disk0"), clean);

    // A bitmap generation that went away (qemu-img convert without --bitmaps, a crash left it
    // inconsistent and someone removed it): the next backup is a full read, not an incremental
    // from a parent the bitmap no longer counts from.
    let current = after["rp"]["tags"]["qemu:dirty-bitmap"]
        .as_str()
        .unwrap()
        .to_string();
    QmpProbe::connect(&qmp).run_with(
        "block-dirty-bitmap-remove",
        serde_json::json!({"node": "disk0", "name": current}),
    );
    let full_again = env.json(&args);
    assert_eq!(full_again["figures"]["unchanged_kept"], 0, "{full_again}");
    consistent(&{
        let t = env.path("full-again.img");
        env.restore(full_again["rp"]["id"].as_str().unwrap(), &t);
        t
    })
    .unwrap();
    // Two pulls of one node at once: the second is refused, the first unharmed.
    let mut c = env.command(&args);
    c.env("ELASTIO_FAULTS", "latency_ms=300")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut slow = c.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !qemu_state(&qmp, "disk0").contains("elastio-fleece") {
        assert!(
            std::time::Instant::now() < deadline,
            "the first pull never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let err = fails_with(&env, &args);
    assert!(
        err.contains("another pull-mode backup of disk0 is running"),
        "{err}"
    );
    assert!(slow.wait().unwrap().success(), "the first pull failed");
    assert_eq!(qemu_state(&qmp, "disk0"), clean);

    // A node QEMU does not have: a clear error, nothing made.
    let err = fails_with(&env, &["block", "backup", "--qmp", q, "--node", "nosuch"]);
    assert!(
        err.contains("QEMU has no block node named \"nosuch\""),
        "{err}"
    );
    assert_eq!(qemu_state(&qmp, "disk0"), clean);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = writer.join().unwrap();
    assert!(
        rounds > 3,
        "the writer kept writing during the backups ({rounds} rounds)"
    );
}

/// A child process killed (and reaped) when the test ends, passed or not, and the FUSE export
/// it served unmounted.
struct KillOnDrop(std::process::Child, Option<std::path::PathBuf>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if let Some(m) = &self.1 {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(m)
                .status();
        }
    }
}
