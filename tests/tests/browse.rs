//! `elastio rp ls|cat|find|diff` and file restores from disk RPs, through the real binary, on
//! a GPT disk holding an ext4 (mkfs.ext4 -d), an XFS (mkfs.xfs -p) and a btrfs (mkfs.btrfs
//! --rootdir) file system made from one source tree, and on a file RP of the same tree. No root
//! needed.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use elastio_tests::*;
use serde_json::Value;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_src(src: &Path) {
    for d in ["etc/ssh", "home/alice", "var/log", "data"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    std::fs::write(src.join("etc/hostname"), b"web-1\n").unwrap();
    std::fs::write(src.join("etc/ssh/sshd_config"), b"PermitRootLogin no\n").unwrap();
    std::fs::write(src.join("etc/ssh/moduli"), pseudo_random(1, 300_000)).unwrap();
    std::fs::write(src.join("home/alice/notes.txt"), b"remember the milk\n").unwrap();
    std::fs::write(src.join("home/alice/big.bin"), pseudo_random(2, 3 << 20)).unwrap();
    std::os::unix::fs::symlink("notes.txt", src.join("home/alice/link")).unwrap();
    std::fs::write(src.join("var/log/empty"), b"").unwrap();
    std::fs::write(src.join("data/unchanged.bin"), pseudo_random(3, 2 << 20)).unwrap();
    std::fs::set_permissions(src.join("etc/ssh"), std::fs::Permissions::from_mode(0o700)).unwrap();
}

/// `path -> (type, size)` of every path under `root`, as `rp ls -R` shows them under `prefix`.
fn expected(root: &Path, prefix: &str) -> BTreeMap<String, (String, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap();
            let (t, size) = if m.is_dir() {
                stack.push(p.clone());
                ("dir", None)
            } else if m.file_type().is_symlink() {
                ("symlink", Some(m.len()))
            } else {
                ("file", Some(m.len()))
            };
            out.insert(
                format!("{prefix}/{rel}"),
                (t.to_string(), size.unwrap_or(0)),
            );
        }
    }
    out
}

fn listed(v: &Value, dirs_size: bool) -> BTreeMap<String, (String, u64)> {
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["path"].as_str().unwrap() != "/part1/lost+found")
        .filter(|e| {
            !e["path"]
                .as_str()
                .unwrap()
                .starts_with("/part1/lost+found/")
        })
        .map(|e| {
            let t = e["type"].as_str().unwrap().to_string();
            let size = if t == "dir" && !dirs_size {
                0
            } else {
                e["size"].as_u64().unwrap()
            };
            (e["path"].as_str().unwrap().to_string(), (t, size))
        })
        .collect()
}

#[test]
fn rp_ls_cat_find_diff_and_restore_from_disk_rps() {
    let env = Env::new();
    let src = env.path("src");
    make_src(&src);
    // part1: ext4 from the tree; part2: XFS from a prototype of the same tree.
    let p1 = env.path("p1.img");
    sparse_file(&p1, 40 << 20);
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            src.to_str().unwrap(),
            p1.to_str().unwrap(),
        ],
    );
    let mut proto = String::from("boot\n0 0\nd--755 0 0\n");
    fn proto_of(dir: &Path, out: &mut String) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let m = std::fs::symlink_metadata(&p).unwrap();
            let name = p.file_name().unwrap().to_str().unwrap();
            let perm = m.mode() & 0o777;
            if m.is_dir() {
                *out += &format!("{name} d--{perm:03o} 0 0\n");
                proto_of(&p, out);
                *out += "$\n";
            } else if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                *out += &format!("{name} l--777 0 0 {}\n", t.display());
            } else {
                *out += &format!("{name} ---{perm:03o} 0 0 {}\n", p.display());
            }
        }
    }
    proto_of(&src, &mut proto);
    proto += "$\n";
    let proto_path = env.path("proto");
    std::fs::write(&proto_path, proto).unwrap();
    let p2 = env.path("p2.img");
    sparse_file(&p2, 320 << 20);
    run(
        "mkfs.xfs",
        &[
            "-q",
            "-f",
            "-p",
            proto_path.to_str().unwrap(),
            p2.to_str().unwrap(),
        ],
    );
    let p3 = env.path("p3.img");
    sparse_file(&p3, 128 << 20);
    run(
        "mkfs.btrfs",
        &[
            "-q",
            "-m",
            "single",
            "--rootdir",
            src.to_str().unwrap(),
            p3.to_str().unwrap(),
        ],
    );
    let disk = env.path("disk.img");
    let parts = [
        (2048u64, 81920u64, Some(p1.as_path())),
        (83968, 655360, Some(p2.as_path())),
        (741376, 262144, Some(p3.as_path())),
    ];
    make_disk(&disk, 520 << 20, "gpt", &parts);
    let a = env.backup(&disk, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    // ls: the file systems, then each tree whole, as the source has it.
    let top = env.json(&["rp", "ls", &a]);
    let names: Vec<&str> = top
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["/part1", "/part2", "/part3"]);
    for part in ["part1", "part2", "part3"] {
        let all = env.json(&["rp", "ls", &a, part, "--recursive"]);
        assert_eq!(
            listed(&all, false),
            expected(&src, &format!("/{part}")),
            "{part}"
        );
    }
    let long = env.ok(&["rp", "ls", &a, "/part2/etc/ssh", "-l"]);
    assert!(long.contains("/part2/etc/ssh/sshd_config"), "{long}");
    assert!(
        long.starts_with("-rw-r--r--") || long.contains("\n-rw-r--r--"),
        "{long}"
    );
    let link = env.ok(&["rp", "ls", &a, "/part1/home/alice/link", "-l"]);
    assert!(
        link.trim_end()
            .ends_with("/part1/home/alice/link -> notes.txt"),
        "{link}"
    );

    // cat: bytes as in the source, from both readers.
    for path in [
        "part1/etc/ssh/moduli",
        "part2/home/alice/big.bin",
        "/part2/var/log/empty",
        "part3/home/alice/big.bin",
        "/part3/etc/ssh/sshd_config",
    ] {
        let out = env.command(&["rp", "cat", &a, path]).output().unwrap();
        assert!(out.status.success(), "{path}");
        let rel = path.trim_start_matches('/').split_once('/').unwrap().1;
        assert!(
            out.stdout == std::fs::read(src.join(rel)).unwrap(),
            "{path}"
        );
    }
    let missing = env.run(&["rp", "cat", &a, "part1/etc/nope"]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("part1/etc/nope") && err.contains(&a), "{err}");
    let dir = env.run(&["rp", "cat", &a, "part1/etc"]);
    assert!(String::from_utf8_lossy(&dir.stderr).contains("not a regular file"));

    // A second RP: part1 changed in place with debugfs (other files keep their blocks),
    // part2 unchanged.
    let src2 = env.path("new.conf");
    std::fs::write(&src2, b"added\n").unwrap();
    let host2 = env.path("hostname");
    std::fs::write(&host2, b"web-2\n").unwrap();
    for cmd in [
        format!("write {} etc/new.conf", src2.display()),
        "rm home/alice/notes.txt".to_string(),
        "rm etc/hostname".to_string(),
        format!("write {} etc/hostname", host2.display()),
        "set_inode_field etc/ssh/moduli mode 0100600".to_string(),
    ] {
        run("debugfs", &["-w", "-R", &cmd, p1.to_str().unwrap()]);
    }
    make_disk(&disk, 520 << 20, "gpt", &parts);
    let b = env.backup(&disk, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let d = env.json(&["rp", "diff", &a, &b]);
    let changes: BTreeMap<String, (String, Vec<String>)> = d["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let what = c["what"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w.as_str().unwrap().to_string())
                .collect();
            (
                c["path"].as_str().unwrap().to_string(),
                (c["change"].as_str().unwrap().to_string(), what),
            )
        })
        .collect();
    let change = |p: &str| changes.get(p).unwrap_or_else(|| panic!("{p} not in {d}"));
    assert_eq!(change("/part1/etc/new.conf").0, "added");
    assert_eq!(change("/part1/home/alice/notes.txt").0, "removed");
    assert!(
        change("/part1/etc/hostname")
            .1
            .contains(&"content".to_string()),
        "{d}"
    );
    assert_eq!(change("/part1/etc/ssh/moduli").1, ["mode"], "{d}");
    for (path, (kind, what)) in &changes {
        // Nothing else changed but the directories written to (their times).
        let dir_times = kind == "changed" && what.iter().all(|w| w == "mtime");
        let expected = [
            "/part1/etc/new.conf",
            "/part1/home/alice/notes.txt",
            "/part1/etc/hostname",
            "/part1/etc/ssh/moduli",
        ];
        assert!(
            expected.contains(&path.as_str()) || dir_times,
            "unexpected change {path}: {d}"
        );
        assert!(
            !path.starts_with("/part2") && !path.starts_with("/part3"),
            "part2 and part3 did not change: {d}"
        );
    }
    // part2 and part3 did not change: their chunks are all the same, so they were skipped
    // whole, unread.
    // part1's files share chunks with the metadata debugfs rewrote, so they were read (at most
    // all of them, from both RPs).
    assert_eq!(d["same_filesystems"].as_u64(), Some(2), "{d}");
    assert!(d["bytes_read"].as_u64().unwrap() <= 2 * 5_700_000, "{d}");

    // find: which RPs hold a name, in both file systems.
    let found = env.json(&["rp", "find", "moduli", "part2/home/**"]);
    let hits: Vec<(String, String)> = found
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["rp"].as_str().unwrap().to_string(),
                h["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for rp in [&a, &b] {
        for p in [
            "/part1/etc/ssh/moduli",
            "/part2/etc/ssh/moduli",
            "/part2/home/alice/big.bin",
            "/part3/etc/ssh/moduli",
        ] {
            assert!(
                hits.contains(&(rp.to_string(), p.to_string())),
                "{rp} {p}: {found}"
            );
        }
    }
    assert!(
        !hits.iter().any(|(_, p)| p == "/part1/home/alice/big.bin"),
        "path patterns match whole paths"
    );

    // Restore from a disk RP through the safe restore path.
    let target = env.path("restored");
    let r = env.json(&[
        "file",
        "restore",
        "--rp",
        &a,
        "--include",
        "/part2/etc/ssh",
        "--include",
        "/part1/home",
        "--include",
        "/part3/etc/ssh",
        "--target",
        target.to_str().unwrap(),
    ]);
    assert_eq!(r["failed"].as_array().unwrap().len(), 0, "{r}");
    for (part, rel) in [
        ("part2", "etc/ssh/sshd_config"),
        ("part2", "etc/ssh/moduli"),
        ("part1", "home/alice/big.bin"),
        ("part3", "etc/ssh/moduli"),
    ] {
        let got = std::fs::read(target.join(part).join(rel)).unwrap();
        assert!(got == std::fs::read(src.join(rel)).unwrap(), "{part}/{rel}");
    }
    let ssh = std::fs::metadata(target.join("part2/etc/ssh")).unwrap();
    assert_eq!(ssh.mode() & 0o777, 0o700, "directory modes restored");
    assert_eq!(
        std::fs::read_link(target.join("part1/home/alice/link")).unwrap(),
        Path::new("notes.txt")
    );
    assert!(!target.join("part2/home").exists() && !target.join("part1/etc").exists());
    let bad = env.run(&[
        "file",
        "restore",
        "--rp",
        &a,
        "--include",
        "/part4/etc",
        "--target",
        target.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("part4/etc"));

    // A file RP of the same tree lists and reads the same way.
    let f = env.json(&["file", "backup", src.to_str().unwrap()]);
    let frp = f["rp"]["id"].as_str().unwrap().to_string();
    let prefix = src.to_str().unwrap().trim_start_matches('/');
    let all = env.json(&["rp", "ls", &frp, prefix, "-R"]);
    assert_eq!(listed(&all, false), expected(&src, &format!("/{prefix}")));
    let out = env
        .command(&["rp", "cat", &frp, &format!("{prefix}/etc/ssh/moduli")])
        .output()
        .unwrap();
    assert!(out.stdout == std::fs::read(src.join("etc/ssh/moduli")).unwrap());
    // Two file RPs: files with the same chunks compare by their keys, unread.
    std::fs::write(src.join("etc/hostname"), b"web-3\n").unwrap();
    let f2 = env.json(&["file", "backup", src.to_str().unwrap()]);
    let frp2 = f2["rp"]["id"].as_str().unwrap().to_string();
    let fd = env.json(&["rp", "diff", &frp, &frp2]);
    let changed: Vec<&str> = fd["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["what"].as_array().unwrap().iter().any(|w| w == "content"))
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        changed,
        [format!("/{prefix}/etc/hostname").as_str()],
        "{fd}"
    );
    assert!(fd["same_by_key"].as_u64().unwrap() >= 5, "{fd}");
    assert!(fd["bytes_read"].as_u64().unwrap() < 100, "{fd}");
    let stream = env.run(&["rp", "diff", &a, &frp]);
    assert!(String::from_utf8_lossy(&stream.stderr).contains("only RPs of one type compare"));
}

/// Writes `image` into the PV file `pv` as an LV whose pieces `map` gives (LV offset → PV
/// offset, length), so the PV holds the file system as device-mapper would have written it.
fn write_lv(pv: &Path, image: &Path, map: &dyn Fn(u64) -> (u64, u64)) {
    let data = std::fs::read(image).unwrap();
    let mut at = 0u64;
    while at < data.len() as u64 {
        let (to, n) = map(at);
        let n = n.min(data.len() as u64 - at);
        let piece = &data[at as usize..(at + n) as usize];
        if piece.iter().any(|&b| b != 0) {
            write_at(pv, to, piece);
        }
        at += n;
    }
}

/// LVM volume groups are made by pvcreate/vgcreate on a loop device and their LVs described
/// with vgcfgrestore (no device-mapper on this kernel, so no lvcreate); the file systems are
/// written at the LVs' extents. A linear LV in two segments holds XFS, a two-stripe LV ext4:
/// `rp ls/cat`, the FUSE mount and the status lines show them as lvm/<vg>/<lv>.
#[test]
fn lvm_logical_volumes_show_as_lvm_vg_lv() {
    if !is_root() {
        eprintln!("skipped: a loop device for pvcreate needs root (CI runs as root)");
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    make_src(&src);
    let vg = format!("elastio_t{}", std::process::id());
    let pv = env.path("pv.img");
    sparse_file(&pv, 800 << 20);
    let out = Command::new("losetup")
        .args(["-f", "--show", pv.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "losetup");
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let meta = env.path("meta.txt");
    let lvm = (|| -> Result<(), String> {
        let q = |cmd: &str, args: &[&str]| {
            let o = Command::new(cmd)
                .args(args)
                .output()
                .map_err(|e| e.to_string())?;
            o.status
                .success()
                .then_some(())
                .ok_or_else(|| format!("{cmd}: {}", String::from_utf8_lossy(&o.stderr)))
        };
        q("pvcreate", &["-q", &dev])?;
        q("vgcreate", &["-q", "-s", "4M", &vg, &dev])?;
        q("vgcfgbackup", &["-q", "-f", meta.to_str().unwrap(), &vg])?;
        let text = std::fs::read_to_string(&meta).unwrap();
        let lvs = r#"
logical_volumes {
root {
id = "aaaaaa-bbbb-cccc-dddd-eeee-ffff-000001"
status = ["READ", "WRITE", "VISIBLE"]
flags = []
segment_count = 2
segment1 {
start_extent = 0
extent_count = 40
type = "striped"
stripe_count = 1
stripes = ["pv0", 100]
}
segment2 {
start_extent = 40
extent_count = 40
type = "striped"
stripe_count = 1
stripes = ["pv0", 10]
}
}
home {
id = "aaaaaa-bbbb-cccc-dddd-eeee-ffff-000002"
status = ["READ", "WRITE", "VISIBLE"]
flags = []
segment_count = 1
segment1 {
start_extent = 0
extent_count = 8
type = "striped"
stripe_count = 2
stripe_size = 128
stripes = ["pv0", 60, "pv0", 70]
}
}
}
"#;
        let mut lines: Vec<&str> = text.lines().collect();
        let end = lines
            .iter()
            .position(|l| *l == "}")
            .ok_or("no end of the VG section")?;
        lines.insert(end, lvs);
        std::fs::write(&meta, lines.join("\n")).unwrap();
        q("vgcfgrestore", &["-q", "-f", meta.to_str().unwrap(), &vg])
    })();
    let _ = Command::new("vgchange").args(["-an", &vg]).output();
    let _ = Command::new("losetup").args(["-d", &dev]).output();
    lvm.unwrap();
    let text = std::fs::read_to_string(&meta).unwrap();
    let pe_start: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("pe_start = "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (base, ext) = (pe_start * 512, 4u64 << 20);
    // root: XFS, extents 0..40 at PV extent 100, 40..80 at PV extent 10.
    let root = env.path("root.img");
    sparse_file(&root, 80 * ext);
    let mut proto = String::from("boot\n0 0\nd--755 0 0\n");
    for (name, rel) in [("hostname", "etc/hostname"), ("moduli", "etc/ssh/moduli")] {
        proto += &format!("{name} ---644 0 0 {}\n", src.join(rel).display());
    }
    proto += "$\n";
    std::fs::write(env.path("proto"), proto).unwrap();
    run(
        "mkfs.xfs",
        &[
            "-q",
            "-f",
            "-p",
            env.path("proto").to_str().unwrap(),
            root.to_str().unwrap(),
        ],
    );
    write_lv(&pv, &root, &|at| {
        let (seg, pe) = if at < 40 * ext {
            (0, 100)
        } else {
            (40 * ext, 10)
        };
        (base + pe * ext + at - seg, 40 * ext - (at - seg))
    });
    // home: ext4 striped over PV extents 60.. and 70.. in 64 KiB stripes.
    let home = env.path("home.img");
    sparse_file(&home, 8 * ext);
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            src.to_str().unwrap(),
            home.to_str().unwrap(),
        ],
    );
    write_lv(&pv, &home, &|at| {
        let (chunk, within) = (at / 65536, at % 65536);
        let pe = if chunk % 2 == 0 { 60 } else { 70 };
        (
            base + pe * ext + (chunk / 2) * 65536 + within,
            65536 - within,
        )
    });
    let disk = env.path("disk.img");
    make_disk(
        &disk,
        820 << 20,
        "gpt",
        &[(2048, 1638400, Some(pv.as_path()))],
    );
    let rp = env.backup(&disk, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let top = env.json(&["rp", "ls", &rp, "lvm", "-R"]);
    let paths: Vec<&str> = top
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    let why = String::from_utf8_lossy(&env.run(&["rp", "ls", &rp]).stderr).into_owned();
    assert!(
        paths.contains(&format!("/lvm/{vg}/root/hostname").as_str()),
        "{why}\n{top}"
    );
    let home_list = env.json(&["rp", "ls", &rp, &format!("lvm/{vg}/home"), "-R"]);
    let got: BTreeMap<String, (String, u64)> = listed(&home_list, false)
        .into_iter()
        .filter(|(p, _)| !p.contains("/lost+found"))
        .collect();
    assert_eq!(got, expected(&src, &format!("/lvm/{vg}/home")));
    for (path, rel) in [
        ("root/moduli", "etc/ssh/moduli"),
        ("home/home/alice/big.bin", "home/alice/big.bin"),
    ] {
        let out = env
            .command(&["rp", "cat", &rp, &format!("lvm/{vg}/{path}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stdout == std::fs::read(src.join(rel)).unwrap(),
            "{path}"
        );
    }
    // The mount: the same names, and the PV's status line.
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = env.json(&["mount", &rp, mnt.to_str().unwrap()]);
    let pid = m["pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(mnt.join(".elastio-status")).unwrap();
    let hostname = std::fs::read(mnt.join(format!("lvm/{vg}/root/hostname")));
    let listing: Vec<String> = std::fs::read_dir(mnt.join("lvm").join(&vg))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    env.ok(&["umount", mnt.to_str().unwrap()]);
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        status.contains(&format!(
            "part1: LVM physical volume of VG {vg}, its volumes in lvm/{vg}/"
        )),
        "{status}"
    );
    assert!(
        status.contains(&format!("lvm/{vg}/root: xfs, files in lvm/{vg}/root/")),
        "{status}"
    );
    assert!(
        status.contains(&format!("lvm/{vg}/home: ext4, files in lvm/{vg}/home/")),
        "{status}"
    );
    assert_eq!(hostname.unwrap(), b"web-1\n");
    let mut listing = listing;
    listing.sort();
    assert_eq!(listing, ["home", "root"]);
}

/// `rp ls|cat|find|diff` and file restores on the two file systems the kernel here cannot
/// mount: FAT (made by mkfs.vfat, filled by mtools) and NTFS (mkntfs, filled through ntfs-3g,
/// which needs root and /dev/fuse, as CI has).
#[test]
fn fat_and_ntfs_volumes_list_read_diff_and_restore() {
    if !is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: ntfs-3g needs root and /dev/fuse (CI has both)");
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    make_src(&src);
    // Neither file system keeps a symlink the way the source has it.
    std::fs::remove_file(src.join("home/alice/link")).unwrap();
    let top: Vec<String> = ["etc", "home", "var", "data"]
        .iter()
        .map(|d| src.join(d).to_str().unwrap().to_string())
        .collect();
    let p1 = env.path("fat.img");
    sparse_file(&p1, 64 << 20);
    run(
        "mkfs.vfat",
        &["-F", "32", "-n", "EFI", p1.to_str().unwrap()],
    );
    let mtools = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    let mut copy = vec!["mcopy", "-s", "-i", p1.to_str().unwrap()];
    copy.extend(top.iter().map(String::as_str));
    copy.push("::/");
    mtools(&copy);
    let p2 = env.path("ntfs.img");
    sparse_file(&p2, 64 << 20);
    run("mkntfs", &["-F", "-Q", "-q", p2.to_str().unwrap()]);
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ntfs = |f: &dyn Fn(&Path)| {
        run("ntfs-3g", &[p2.to_str().unwrap(), mnt.to_str().unwrap()]);
        f(&mnt);
        run("umount", &[mnt.to_str().unwrap()]);
    };
    ntfs(&|m| {
        run(
            "cp",
            &["-r", &format!("{}/.", src.display()), m.to_str().unwrap()],
        )
    });
    let disk = env.path("disk.img");
    let parts = [
        (2048u64, 131072u64, Some(p1.as_path())),
        (133120, 131072, Some(p2.as_path())),
    ];
    make_disk(&disk, 140 << 20, "gpt", &parts);
    let a = env.backup(&disk, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    for part in ["part1", "part2"] {
        let all = env.json(&["rp", "ls", &a, part, "--recursive"]);
        assert_eq!(
            listed(&all, false),
            expected(&src, &format!("/{part}")),
            "{part}"
        );
        for rel in ["etc/ssh/moduli", "home/alice/big.bin"] {
            let out = env
                .command(&["rp", "cat", &a, &format!("{part}/{rel}")])
                .output()
                .unwrap();
            assert!(
                out.stdout == std::fs::read(src.join(rel)).unwrap(),
                "{part}/{rel}"
            );
        }
    }
    let found = env.json(&["rp", "find", "moduli"]);
    let paths: Vec<&str> = found
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/part1/etc/ssh/moduli", "/part2/etc/ssh/moduli"]);

    // A second RP: one file rewritten on each volume.
    let host = env.path("hostname");
    std::fs::write(&host, b"web-2\n").unwrap();
    mtools(&[
        "mcopy",
        "-o",
        "-i",
        p1.to_str().unwrap(),
        host.to_str().unwrap(),
        "::/etc/hostname",
    ]);
    ntfs(&|m| std::fs::write(m.join("home/alice/notes.txt"), b"buy bread\n").unwrap());
    make_disk(&disk, 140 << 20, "gpt", &parts);
    let b = env.backup(&disk, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let d = env.json(&["rp", "diff", &a, &b]);
    let content: Vec<&str> = d["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["what"].as_array().unwrap().iter().any(|w| w == "content"))
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        content,
        ["/part1/etc/hostname", "/part2/home/alice/notes.txt"],
        "{d}"
    );

    let target = env.path("restored");
    let r = env.json(&[
        "file",
        "restore",
        "--rp",
        &b,
        "--include",
        "/part1/home",
        "--include",
        "/part2/etc",
        "--target",
        target.to_str().unwrap(),
    ]);
    assert_eq!(r["failed"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(
        r["warnings"].as_array().map_or(0, |w| w.len()),
        0,
        "the NTFS security descriptors are not restored onto ext4, quietly: {r}"
    );
    for (part, rel) in [
        ("part1", "home/alice/big.bin"),
        ("part2", "etc/ssh/moduli"),
        ("part2", "etc/hostname"),
    ] {
        let got = std::fs::read(target.join(part).join(rel)).unwrap();
        assert!(got == std::fs::read(src.join(rel)).unwrap(), "{part}/{rel}");
    }
}
