//! End-to-end: `elastio mount` through the kernel's FUSE (/dev/fuse, fusermount3).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use elastio_tests::*;

/// Mounts and returns the pid of the background process.
fn mount(env: &Env, rp: &str, mnt: &Path) -> u32 {
    mount_with(env, rp, mnt, &[])
}

fn mount_with(env: &Env, rp: &str, mnt: &Path, extra: &[&str]) -> u32 {
    std::fs::create_dir_all(mnt).unwrap();
    let mut args = vec!["mount", rp, mnt.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = env.json(&args);
    out["pid"].as_u64().unwrap() as u32
}

fn umount(env: &Env, mnt: &Path, pid: u32) {
    env.ok(&["umount", mnt.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if state.contains(") Z") {
            break; // exited, waiting to be reaped by its (gone) parent
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mount process {pid} still running after umount"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
#[allow(unsafe_code)]
fn mounted_disk_img_is_byte_exact_sparse_and_read_only() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: this test needs FUSE"
    );
    let env = Env::new();
    let img = ext4_image(&env, "a.img", 48 << 20);
    let rp = env.backup(&img, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mnt = env.path("mnt");
    let pid = mount(&env, &rp, &mnt);
    let disk = mnt.join("disk.img");

    assert_eq!(
        sha256_file(&disk),
        sha256_file(&img),
        "disk.img is the image"
    );
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), 48 << 20);
    assert!(
        meta.blocks() * 512 < 8 << 20,
        "st_blocks counts stored data only: {}",
        meta.blocks()
    );
    let f = std::fs::File::open(&disk).unwrap();
    use std::os::unix::io::AsRawFd;
    // SAFETY: lseek on an fd we own.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert!(
        hole > 0 && hole < 48 << 20,
        "SEEK_HOLE finds the first hole: {hole}"
    );
    // SAFETY: as above.
    let data = unsafe { libc::lseek(f.as_raw_fd(), hole, libc::SEEK_DATA) };
    assert!(data > hole, "SEEK_DATA skips it: {data}");

    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "writes fail with EROFS"
    );
    let err = std::fs::write(mnt.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));

    // Mounting over a busy mountpoint and an unknown RP fail fast with a message.
    let out = env.run(&["mount", &rp, mnt.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already an elastio mount"));
    let other = env.path("other");
    std::fs::create_dir(&other).unwrap();
    let started = std::time::Instant::now();
    let out = env.run(&[
        "mount",
        "rp-01m80q0exmx4mr1kh8rkgkg9q4",
        other.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed().as_secs() < 10, "fails fast");
    let missing = env.path("missing");
    let out = env.run(&["mount", &rp, missing.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env
        .command(&["mount", &rp, other.to_str().unwrap()])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fusermount3 is not installed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Root can loop-mount the image and read the files.
    if is_root() {
        let fsmnt = env.path("fs");
        std::fs::create_dir(&fsmnt).unwrap();
        sh(
            "mount",
            &[
                "-o",
                "loop,ro,noload",
                disk.to_str().unwrap(),
                fsmnt.to_str().unwrap(),
            ],
        );
        let same = std::fs::read(fsmnt.join("var/log/app.log")).unwrap()
            == std::fs::read(fixture_tree().join("var/log/app.log")).unwrap();
        let _ = Command::new("umount").arg(&fsmnt).status();
        assert!(same, "a file read through FUSE + loop equals the fixture");
    }
    drop(f);
    umount(&env, &mnt, pid);
    assert!(
        std::fs::read_dir(&mnt).unwrap().next().is_none(),
        "the mountpoint is empty again"
    );
}

#[test]
fn two_mounts_at_once_while_a_backup_runs() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: this test needs FUSE"
    );
    let env = Env::new();
    let a = ext4_image(&env, "a.img", 48 << 20);
    let b = env.path("b.img");
    std::fs::write(&b, pseudo_random(70, 8 << 20)).unwrap();
    let ra = env.backup(&a, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let rb = env.backup(&b, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let big = env.path("big.img");
    for i in 0..4 {
        append_random(&big, 80 + i, 32 << 20);
    }
    let mut backup = env
        .command(&["block", "backup", big.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (ma, mb) = (env.path("ma"), env.path("mb"));
    let pa = mount(&env, &ra, &ma);
    let pb = mount(&env, &rb, &mb);
    assert_eq!(sha256_file(&ma.join("disk.img")), sha256_file(&a));
    assert_eq!(sha256_file(&mb.join("disk.img")), sha256_file(&b));
    assert!(
        backup.wait().unwrap().success(),
        "the backup ran alongside the mounts"
    );
    umount(&env, &ma, pa);
    umount(&env, &mb, pb);
}

/// A disk with a partition table (GPT or MBR) holding an ext4 partition.
fn partitioned_image(env: &Env, label: &str) -> (PathBuf, PathBuf) {
    let part = ext4_image(env, &format!("{label}-part.img"), 40 << 20);
    let disk = env.path(&format!("{label}-disk.img"));
    make_disk(&disk, 64 << 20, label, &[(2048, 81920, Some(&part))]);
    (disk, part)
}

#[test]
fn partitions_appear_as_files() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: this test needs FUSE"
    );
    let env = Env::new();
    for label in ["gpt", "dos"] {
        let (disk, part) = partitioned_image(&env, label);
        let rp = env.backup(&disk, None)["rp"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let mnt = env.path(&format!("mnt-{label}"));
        let pid = mount(&env, &rp, &mnt);
        let names: Vec<String> = std::fs::read_dir(&mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.contains(&"part1.img".to_string()),
            "{label}: {names:?}"
        );
        let p1 = mnt.join("part1.img");
        assert_eq!(std::fs::metadata(&p1).unwrap().len(), 40 << 20);
        assert_eq!(
            sha256_file(&p1),
            sha256_file(&part),
            "{label}: part1.img is the partition"
        );
        assert_eq!(sha256_file(&mnt.join("disk.img")), sha256_file(&disk));
        // The files inside, parsed in user space.
        assert_same_tree(&mnt.join("part1"), &fixture_tree());
        if is_root() {
            let fsmnt = env.path(&format!("fs-{label}"));
            std::fs::create_dir(&fsmnt).unwrap();
            sh(
                "mount",
                &[
                    "-o",
                    "loop,ro,noload",
                    p1.to_str().unwrap(),
                    fsmnt.to_str().unwrap(),
                ],
            );
            let ok = std::fs::read(fsmnt.join("home/alice/blob.bin")).ok()
                == std::fs::read(
                    Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("../fixtures/tree/home/alice/blob.bin"),
                )
                .ok();
            let _ = Command::new("umount").arg(&fsmnt).status();
            assert!(ok, "{label}: a file inside the partition reads back");
        }
        umount(&env, &mnt, pid);
    }
}

#[test]
fn files_inside_the_file_system_are_browsable_and_copyable() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: this test needs FUSE"
    );
    let env = Env::new();
    let tree = rich_tree(&env, 24 << 20);
    let img = ext4_image_of(&env, "rich.img", 96 << 20, &tree);
    let rp = env.backup(&img, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mnt = env.path("mnt");
    // A cache far smaller than big.bin, so reading it goes through eviction.
    let pid = mount_with(&env, &rp, &mnt, &["--cache-size", "2MiB"]);
    let fs = mnt.join("fs");
    assert_same_tree(&fs, &tree);

    let ino = |p: &str| std::fs::metadata(fs.join(p)).unwrap().ino();
    assert_eq!(
        ino("big.bin"),
        ino("home/big.link"),
        "hard links share an inode"
    );
    assert_ne!(ino("big.bin"), ino("etc/passwd"));
    let sparse = std::fs::metadata(fs.join("var/sparse.bin")).unwrap();
    assert!(
        sparse.blocks() * 512 < 64 << 10,
        "a sparse file shows its allocation only: {} blocks",
        sparse.blocks()
    );
    let bytes = std::fs::read(fs.join("var/sparse.bin")).unwrap();
    assert!(
        bytes[..5 << 20].iter().all(|&b| b == 0),
        "holes read as zeros"
    );

    // cp -a out of the mount gives back the same tree, hard links included (cp keys them by
    // inode number).
    let copy = env.path("copy");
    sh("cp", &["-a", fs.to_str().unwrap(), copy.to_str().unwrap()]);
    assert_same_tree(&copy, &tree);
    let copy_ino = |p: &str| std::fs::metadata(copy.join(p)).unwrap().ino();
    assert_eq!(copy_ino("big.bin"), copy_ino("home/big.link"));

    let err = std::fs::OpenOptions::new()
        .append(true)
        .open(fs.join("etc/passwd"))
        .unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "writes fail with EROFS"
    );
    let err = std::fs::create_dir(fs.join("new")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    umount(&env, &mnt, pid);

    // Damage one byte in the middle of every pack and mount again (a fresh page cache): the
    // damaged reads fail with EIO, logged with the object name, and the mount stays up.
    for pack in env.packs() {
        let len = std::fs::metadata(&pack).unwrap().len();
        let mut b = [0u8];
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pack)
            .unwrap();
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut b, len / 2).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], len / 2).unwrap();
    }
    std::fs::create_dir_all(&mnt).unwrap();
    let out = env.json(&["mount", &rp, mnt.to_str().unwrap()]);
    let (pid, log) = (
        out["pid"].as_u64().unwrap() as u32,
        PathBuf::from(out["log"].as_str().unwrap()),
    );
    let (mut ok, mut eio) = (0, 0);
    for f in [
        "big.bin",
        "etc/passwd",
        "home/alice/blob.bin",
        "var/sparse.bin",
        "README.txt",
    ] {
        match std::fs::read(fs.join(f)) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{f}: {e}");
                eio += 1
            }
        }
    }
    assert!(eio >= 1, "a damaged chunk fails the read");
    assert!(ok >= 1, "undamaged files still read ({eio} failed)");
    assert!(std::fs::read_dir(&fs).is_ok(), "the mount is still up");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("packs/"),
        "the log names the object: {logged}"
    );
    // The log (it names RPs and objects) is private: 0600 in a 0700 directory of this user's
    // (it was a predictable name in /tmp, created through any symlink planted there).
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&log), 0o600, "{}", log.display());
    assert_eq!(mode(log.parent().unwrap()), 0o700, "{}", log.display());
    umount(&env, &mnt, pid);
}

/// The mount says what each partition holds: files of the ones elastio reads (ext4, XFS), an
/// image and a reason for the others.
#[test]
fn the_mount_says_what_each_partition_holds() {
    let env = Env::new();
    let ext = ext4_image(&env, "p1.img", 40 << 20);
    let xfs = env.path("p2.img");
    sparse_file(&xfs, 320 << 20);
    let hello = env.path("hello.txt");
    std::fs::write(&hello, b"hello from xfs\n").unwrap();
    let proto = env.path("proto");
    std::fs::write(
        &proto,
        format!(
            "boot\n0 0\nd--755 0 0\nhello.txt ---640 1000 1000 {}\netc d--755 0 0\n$\n$\n",
            hello.display()
        ),
    )
    .unwrap();
    let out = Command::new("mkfs.xfs")
        .args([
            "-q",
            "-f",
            "-p",
            proto.to_str().unwrap(),
            xfs.to_str().unwrap(),
        ])
        .output()
        .expect("mkfs.xfs (apt: xfsprogs)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let swap = env.path("p3.img");
    sparse_file(&swap, 8 << 20);
    let out = Command::new("mkswap").arg(&swap).output().expect("mkswap");
    assert!(out.status.success());
    let disk = env.path("mixed.img");
    // part1: ext4 at 1 MiB (40 MiB); part2: xfs at 41 MiB (320 MiB); part3: swap (8 MiB);
    // part4: nothing (8 MiB).
    make_disk(
        &disk,
        410 << 20,
        "gpt",
        &[
            (2048, 81920, Some(&ext)),
            (83968, 655360, Some(&xfs)),
            (739328, 16384, Some(&swap)),
            (755712, 16384, None),
        ],
    );
    let rp = env.backup(&disk, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = env.json(&["mount", &rp, mnt.to_str().unwrap()]);
    let pid = out["pid"].as_u64().unwrap() as u32;
    let lines: Vec<&str> = out["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            "part1: ext4, files in part1/",
            "part2: xfs, files in part2/",
            "part3: swap, not readable by elastio yet",
            "part4: no known file system",
        ],
        "{out}"
    );
    // The same lines, in the mount root.
    assert_eq!(
        std::fs::read_to_string(mnt.join(".elastio-status")).unwrap(),
        lines.iter().map(|l| format!("{l}\n")).collect::<String>()
    );
    assert!(mnt.join("part1").is_dir() && !mnt.join("part3").exists());
    let file = mnt.join("part2/hello.txt");
    assert_eq!(std::fs::read(&file).unwrap(), b"hello from xfs\n");
    let md = std::fs::metadata(&file).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid()),
        (0o640, 1000, 1000)
    );
    assert!(mnt.join("part2/etc").is_dir());
    assert_eq!(
        std::fs::metadata(mnt.join("part3.img")).unwrap().len(),
        8 << 20,
        "the swap partition still shows as an image"
    );
    umount(&env, &mnt, pid);
}

#[test]
fn kernel_mode_loop_mounts_partitions() {
    let env = Env::new();
    let (disk, _) = partitioned_image(&env, "gpt");
    let rp = env.backup(&disk, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    if !is_root() {
        let out = env.run(&["mount", &rp, mnt.to_str().unwrap(), "--kernel"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs root"));
        return;
    }
    let out = env.json(&["mount", &rp, mnt.to_str().unwrap(), "--kernel"]);
    let pid = out["pid"].as_u64().unwrap() as u32;
    assert_eq!(out["kernel_mounts"][0]["dir"], "part1", "{out}");
    // The detected type, never the kernel's probing; a hostile image's setuid files and
    // device nodes are inert (the first release mounted with neither).
    assert_eq!(
        out["kernel_mounts"][0]["options"], "-t ext4 -o ro,noload,nosuid,nodev,noexec",
        "{out}"
    );
    // The kernel's ext4 driver shows the same tree as the fixture.
    assert_same_tree(&mnt.join("part1"), &fixture_tree());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(&format!("{} ", mnt.join("part1").display())))
        .expect("part1 is a kernel mount");
    for opt in ["nosuid", "nodev", "noexec"] {
        assert!(line.contains(opt), "{opt}: {line}");
    }
    assert!(line.contains(" - ext4 "), "{line}");
    // umount takes down the loop mount first, then the FUSE mount.
    umount(&env, &mnt, pid);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(mnt.to_str().unwrap()),
        "nothing left mounted"
    );
    assert!(std::fs::read_dir(&mnt).unwrap().next().is_none());
}

/// Hostile file systems (`fixtures/hostile/`, see mount/tests/hostile.rs): every crafted image
/// mounts. While another thread keeps opening and reading the bad file (or listing the mount,
/// where the image's file system or partition table is refused whole), `disk.img` keeps being
/// read byte-exact, each read answered within 1 s; the bad file fails with EIO, promptly, and
/// the image's other files stay readable. On df046ba the extent DAG froze the FUSE session
/// thread (the mount stopped answering) and the 1 TiB inline file aborted the mount process.
#[test]
fn hostile_file_fails_alone_and_the_mount_keeps_answering() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: this test needs FUSE"
    );
    let env = Env::new();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hostile");
    let mut images: Vec<String> = std::fs::read_dir(&fixtures)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".img"))
        .collect();
    images.sort();
    assert!(images.len() >= 6, "{images:?}");
    for image in &images {
        // The file each image makes hostile, where its file system is served at all.
        let victim = match image.as_str() {
            "extent-dag.img" | "indirect-dag.img" => Some("victim.bin"),
            "inline-1tib.img" => Some("victim.txt"),
            _ => None,
        };
        let bytes = std::fs::read(fixtures.join(image)).unwrap();
        let rp = env.backup(&fixtures.join(image), None)["rp"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let mnt = env.path(&format!("mnt-{image}"));
        let pid = mount(&env, &rp, &mnt);
        let fs = mnt.join("fs");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (slowest, bad) = std::thread::scope(|s| {
            let attacker = s.spawn(|| {
                let mut outcomes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let started = std::time::Instant::now();
                    let outcome = match victim {
                        Some(v) => std::fs::read(fs.join(v)).map(|_| ()),
                        None => std::fs::read_dir(&mnt).map(|d| d.for_each(drop)),
                    };
                    outcomes.push((started.elapsed(), outcome));
                }
                outcomes
            });
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut slowest = std::time::Duration::ZERO;
            let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while std::time::Instant::now() < until {
                let started = std::time::Instant::now();
                let got = std::fs::read(mnt.join("disk.img")).unwrap();
                slowest = slowest.max(started.elapsed());
                assert!(got == bytes, "{image}: disk.img is the image");
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (slowest, attacker.join().unwrap())
        });
        println!(
            "{image}: {} tries of the bad file beside 2 s of disk.img reads, slowest {slowest:?}",
            bad.len()
        );
        assert!(
            slowest < std::time::Duration::from_secs(1),
            "{image}: a disk.img read took {slowest:?}"
        );
        assert!(!bad.is_empty(), "{image}");
        for (took, outcome) in &bad {
            assert!(
                *took < std::time::Duration::from_secs(5),
                "{image}: the bad file took {took:?}"
            );
            match (victim, outcome) {
                (Some(_), Err(e)) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{image}: {e}")
                }
                (Some(_), Ok(())) => panic!("{image}: the bad file was read"),
                (None, r) => assert!(r.is_ok(), "{image}: listing the mount: {r:?}"),
            }
        }
        if victim.is_some() {
            assert_eq!(
                std::fs::read(fs.join("good.txt")).unwrap(),
                b"hello\n",
                "{image}"
            );
            let names: Vec<_> = std::fs::read_dir(&fs)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert!(names.iter().any(|n| n == "pad.bin"), "{image}: {names:?}");
        }
        umount(&env, &mnt, pid);
    }
}
