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
    // Four chunks hold the changes (the second straddles two): exactly those are read.
    let f = &second["figures"];
    assert_eq!(f["bytes_read"], 4 * CHUNK as u64, "{second}");
    assert_eq!(f["unchanged_kept"], (size - 4 * CHUNK) as u64);
    assert_eq!(second["rp"]["bytes_read"], 4 * CHUNK as u64);
    restored_equals(&env, &second, &img);

    // The default sample: 1 % of the kept chunks re-read, the result the same.
    write_at(&img, 30 << 20, &pseudo_random(60, 4096));
    std::fs::write(&map, "unit 4096\n7680 1\n").unwrap();
    let second_id = second["rp"]["id"].as_str().unwrap();
    let third = backup_with(&env, &img, &["--changed-map", m, "--parent", second_id]);
    let f = &third["figures"];
    let read = f["bytes_read"].as_u64().unwrap();
    assert!(read >= CHUNK as u64 && read < size as u64 / 20, "{third}");
    assert_eq!(
        read - f["unchanged_verified"].as_u64().unwrap(),
        CHUNK as u64
    );
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
