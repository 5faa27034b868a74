//! File-tree backups: every file type and its metadata round-trips, sub-path restores,
//! incremental backups skip unchanged files, inserts store little, and a tampered tree cannot
//! write outside the restore target.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use elastio_tests::*;

#[allow(unsafe_code)]
fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: NUL-terminated path and name (CString); the value pointer and length come from one slice.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr {name} on {}", path.display());
}

#[allow(unsafe_code)]
fn xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: a NUL-terminated path and name; the kernel writes at most the length passed into the buffer (or nothing for a null one).
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "listxattr {}", path.display());
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
    {
        let c = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: a NUL-terminated path and name; the kernel writes at most the length passed into the buffer (or nothing for a null one).
        let m = unsafe { libc::lgetxattr(p.as_ptr(), c.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(m >= 0);
        v.truncate(m as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

/// Everything we restore about one path, comparable across trees (inodes mapped to the first
/// path that has them, so hard-link structure compares too).
#[derive(Debug, PartialEq)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
    size: u64,
    rdev: u64,
    link_group: Option<PathBuf>,
    target: Option<PathBuf>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    sha: Option<String>,
    sparse: bool,
}

fn snapshot(root: &Path) -> Vec<(PathBuf, Meta)> {
    fn walk(
        root: &Path,
        rel: &Path,
        groups: &mut HashMap<u64, PathBuf>,
        out: &mut Vec<(PathBuf, Meta)>,
    ) {
        let abs = root.join(rel);
        let md = std::fs::symlink_metadata(&abs).unwrap();
        let ft = md.file_type();
        let link_group = (!ft.is_dir() && md.nlink() > 1).then(|| {
            groups
                .entry(md.ino())
                .or_insert_with(|| rel.to_path_buf())
                .clone()
        });
        out.push((
            rel.to_path_buf(),
            Meta {
                mode: md.mode(),
                uid: md.uid(),
                gid: md.gid(),
                mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
                size: if ft.is_dir() { 0 } else { md.size() },
                rdev: md.rdev(),
                link_group,
                target: ft.is_symlink().then(|| std::fs::read_link(&abs).unwrap()),
                xattrs: if ft.is_symlink() {
                    Vec::new()
                } else {
                    xattrs(&abs)
                },
                sha: ft.is_file().then(|| sha256_file(&abs)),
                sparse: ft.is_file() && md.blocks() * 512 + (1 << 20) < md.size(),
            },
        ));
        if ft.is_dir() {
            let mut names: Vec<OsString> = std::fs::read_dir(&abs)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                walk(root, &rel.join(n), groups, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut HashMap::new(), &mut out);
    out.remove(0); // the roots themselves differ (a temp dir vs the restore path)
    out
}

fn assert_trees_equal(got: &Path, want: &Path) {
    let (g, w) = (snapshot(got), snapshot(want));
    let gp: Vec<_> = g.iter().map(|e| &e.0).collect();
    let wp: Vec<_> = w.iter().map(|e| &e.0).collect();
    assert_eq!(gp, wp, "paths of {} vs {}", got.display(), want.display());
    for ((p, gm), (_, wm)) in g.iter().zip(w.iter()) {
        assert_eq!(gm, wm, "metadata of {}", p.display());
    }
}

/// The rich fixture tree plus what only a file backup can show: xattrs, owners, special files,
/// non-UTF-8 and 255-byte names, an empty file, setuid bits, a socket.
fn file_fixture(env: &Env) -> PathBuf {
    let root = rich_tree(env, 3 << 20);
    set_xattr(
        &root.join("etc/passwd"),
        "user.origin",
        b"fixture\0binary\xff",
    );
    set_xattr(&root.join("etc"), "user.dir", b"a directory attribute");
    set_xattr(&root.join("big.bin"), "user.big", &vec![7u8; 3000]);
    let odd = root.join(OsStr::from_bytes(b"odd-\xff\xfe-name"));
    std::fs::write(&odd, b"not utf-8").unwrap();
    std::fs::write(root.join("x".repeat(255)), b"long name").unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::set_permissions(root.join("empty"), std::fs::Permissions::from_mode(0o4751)).unwrap();
    std::os::unix::fs::chown(&odd, Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(root.join("home/long.lnk"), Some(42), Some(43)).unwrap();
    sh(
        "mknod",
        &[root.join("var/null").to_str().unwrap(), "c", "1", "3"],
    );
    let _sock = std::os::unix::net::UnixListener::bind(root.join("var/sock")).unwrap();
    std::fs::create_dir_all(root.join("deep/a/b/c/d")).unwrap();
    std::fs::write(root.join("deep/a/b/c/d/leaf"), b"leaf").unwrap();
    std::fs::set_permissions(
        root.join("deep/a/b"),
        std::fs::Permissions::from_mode(0o555),
    )
    .unwrap();
    root
}

fn backup(env: &Env, paths: &[&Path], extra: &[&str]) -> serde_json::Value {
    let mut args: Vec<&str> = vec!["file", "backup"];
    args.extend(paths.iter().map(|p| p.to_str().unwrap()));
    args.extend(extra);
    env.json(&args)
}

/// `elastio file restore --rp RP --target TARGET [extra...]`, which must succeed.
fn restore(env: &Env, rp: &str, target: &Path, extra: &[&str]) {
    let mut args = vec![
        "file",
        "restore",
        "--rp",
        rp,
        "--target",
        target.to_str().unwrap(),
    ];
    args.extend(extra);
    env.ok(&args);
}

/// `root` as it appears under a restore target (`/tmp/x/tree` → `target/tmp/x/tree`).
fn under(target: &Path, root: &Path) -> PathBuf {
    target.join(root.strip_prefix("/").unwrap())
}

#[test]
fn every_file_type_and_its_metadata_round_trips() {
    let env = Env::new();
    let root = file_fixture(&env);
    let b = backup(&env, &[&root], &["--tag", "kind=fixture"]);
    let rp = b["rp"]["id"].as_str().unwrap().to_string();
    assert!(b["changed_while_read"].as_array().unwrap().is_empty());
    assert!(b["unreadable"].as_array().unwrap().is_empty(), "{b}");

    let target = env.path("restored");
    restore(&env, &rp, &target, &[]);
    let got = under(&target, &root);
    assert_trees_equal(&got, &root);
    // The sparse file kept its hole.
    let md = std::fs::metadata(got.join("var/sparse.bin")).unwrap();
    assert!(
        md.blocks() * 512 < 1 << 20,
        "sparse file restored dense: {} blocks",
        md.blocks()
    );

    // A second restore into the same target leaves everything alone without --overwrite...
    std::fs::write(got.join("etc/passwd"), b"local edit").unwrap();
    let out = env.json(&[
        "file",
        "restore",
        "--rp",
        &rp,
        "--target",
        target.to_str().unwrap(),
    ]);
    assert!(
        out["skipped_existing"].as_array().unwrap().len() > 500,
        "{out}"
    );
    assert_eq!(
        std::fs::read(got.join("etc/passwd")).unwrap(),
        b"local edit"
    );
    // ...and puts it back with --overwrite (replacing a symlink planted over a file, not its target).
    let outside = env.path("outside.txt");
    std::fs::write(&outside, b"must not change").unwrap();
    std::fs::remove_file(got.join("etc/app.conf")).unwrap();
    std::os::unix::fs::symlink(&outside, got.join("etc/app.conf")).unwrap();
    restore(&env, &rp, &target, &["--overwrite"]);
    assert_eq!(std::fs::read(&outside).unwrap(), b"must not change");
    assert_trees_equal(&got, &root);
}

#[test]
fn sub_path_restore_and_unchanged_files_are_not_read_again() {
    let env = Env::new();
    let root = file_fixture(&env);
    // The tree records the source's ancestors too, and /tmp changes whenever a test running
    // beside this one makes its temporary directory there.
    let ancestors = || -> Vec<(i64, i64, u64)> {
        root.ancestors()
            .skip(1)
            .map(|a| std::fs::symlink_metadata(a).unwrap())
            .map(|m| (m.mtime(), m.mtime_nsec(), m.nlink()))
            .collect()
    };
    let before = ancestors();
    let first = backup(&env, &[&root], &[]);
    let files = first["files"].as_u64().unwrap();
    assert_eq!(
        first["files_read"].as_u64().unwrap(),
        files - 3,
        "hard links are read once"
    );

    // Unchanged: nothing read, nothing new stored (the tree deduplicates too).
    let second = backup(&env, &[&root], &[]);
    assert_eq!(second["files_read"], 0, "{second}");
    assert_eq!(second["bytes_read"], 0, "{second}");
    assert_eq!(second["rp"]["parent"], first["rp"]["id"]);
    let stored = second["rp"]["new_bytes_stored"].as_u64().unwrap();
    if ancestors() == before {
        assert_eq!(stored, 0, "{second}");
    } else {
        // Only tree records changed: less than the tree itself, nothing of the 11 MB of files.
        let tree = second["rp"]["tree"]["stream"]["size"].as_u64().unwrap();
        assert!(stored <= tree, "{second}");
    }

    // One file changed: only it is read.
    std::fs::write(root.join("many/0007.txt"), b"changed\n").unwrap();
    let third = backup(&env, &[&root], &[]);
    assert_eq!(third["files_read"], 1, "{third}");

    let rp = third["rp"]["id"].as_str().unwrap();
    let target = env.path("sub");
    let inc = root.join("many");
    restore(&env, rp, &target, &["--include", inc.to_str().unwrap()]);
    let got = under(&target, &root);
    assert_trees_equal(&got.join("many"), &root.join("many"));
    assert_eq!(
        std::fs::read(got.join("many/0007.txt")).unwrap(),
        b"changed\n"
    );
    let top: Vec<_> = std::fs::read_dir(&got)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        top,
        vec![OsString::from("many")],
        "only the included path is restored"
    );

    // A hard link restored alone still has its data.
    let target2 = env.path("one-link");
    let link = root.join("home/passwd.3");
    restore(&env, rp, &target2, &["--include", link.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(under(&target2, &link)).unwrap(),
        std::fs::read(&link).unwrap()
    );

    // Excludes: by name and by path.
    let ex = backup(
        &env,
        &[&root],
        &[
            "--exclude",
            "*.txt",
            "--exclude",
            &format!("{}/var", root.display()),
        ],
    );
    let target3 = env.path("excluded");
    restore(&env, ex["rp"]["id"].as_str().unwrap(), &target3, &[]);
    let got3 = under(&target3, &root);
    assert!(!got3.join("var").exists());
    assert!(got3.join("many").is_dir());
    assert_eq!(std::fs::read_dir(got3.join("many")).unwrap().count(), 0);
    assert!(got3.join("etc/passwd").is_file());

    // prune and check walk file trees: everything still referenced survives.
    env.ok(&["prune", "--keep-last", "1"]);
    env.ok(&["check", "--read-data"]);
    let target4 = env.path("after-prune");
    restore(&env, ex["rp"]["id"].as_str().unwrap(), &target4, &[]);
    assert_trees_equal(&under(&target4, &root), &got3);
}

#[test]
fn an_insert_at_the_start_of_a_big_file_stores_little() {
    let env = Env::new();
    let dir = env.path("data");
    std::fs::create_dir(&dir).unwrap();
    let mut data = pseudo_random(5, 100 << 20);
    std::fs::write(dir.join("big.bin"), &data).unwrap();
    backup(&env, &[&dir], &[]);
    data.insert(0, b'!');
    std::fs::write(dir.join("big.bin"), &data).unwrap();
    let second = backup(&env, &[&dir], &[]);
    let new = second["rp"]["new_bytes_stored"].as_u64().unwrap();
    assert!(
        new <= (100 << 20) / 100,
        "1-byte insert stored {new} new bytes"
    );
    let target = env.path("r");
    restore(&env, "latest", &target, &[]);
    assert_eq!(
        sha256_file(&under(&target, &dir).join("big.bin")),
        sha256_file(&dir.join("big.bin"))
    );
}

/// Writes a file RP whose tree holds `entries` (as a tampered vault would), returns its id.
fn forge_rp(env: &Env, entries: Vec<scalez::tree::Entry>) -> String {
    let store = Arc::new(scalez::store::local::LocalStore::open(&env.vault).unwrap());
    let vault = Arc::new(scalez::Vault::open(store, env.password.as_bytes()).unwrap());
    let mut session = scalez::BackupSession::new(vault.clone()).unwrap();
    let data = b"payload of a forged entry".to_vec();
    let id = session.store_blob(&data).unwrap();
    let entries: Vec<_> = entries
        .into_iter()
        .map(|mut e| {
            if e.kind == scalez::tree::EntryKind::File {
                e.size = data.len() as u64;
                e.mode = 0o644;
                e.chunks = vec![(id, data.len() as u32)];
            }
            e
        })
        .collect();
    let tree = scalez::tree::store_tree(&session, &entries).unwrap();
    session.finish().unwrap();
    let asset = scalez::Asset {
        name: "/forged".into(),
        host: "attacker".into(),
    };
    let rp = scalez::RpDraft::new(asset, None, Default::default()).finish(
        scalez::RpBody::Tree(scalez::TreeRef {
            stream: tree,
            sources: vec!["/forged".into()],
            entries: entries.len() as u64,
            files: 1,
            dirs: 0,
            file_bytes: 0,
        }),
        scalez::RpFigures::default(),
    );
    session.commit(&rp).unwrap();
    rp.id.to_string()
}

#[test]
fn a_tampered_tree_cannot_write_outside_the_target() {
    use scalez::tree::{Entry, EntryKind};
    let env = Env::new();
    // The attacker's goal: files next to the target, or in a directory the target links to.
    let victim = env.path("victim");
    std::fs::create_dir(&victim).unwrap();
    let target = env.path("target");
    std::fs::create_dir(&target).unwrap();
    let file = |p: &[u8]| Entry::new(p.to_vec(), EntryKind::File);
    let dir = |p: &[u8]| {
        let mut e = Entry::new(p.to_vec(), EntryKind::Dir);
        e.mode = 0o755;
        e
    };
    let mut hops = Vec::new();
    let mut deep = b"victim/x".to_vec();
    for _ in 0..3 {
        deep.splice(0..0, b"../".iter().copied());
        hops.push(deep.clone());
    }
    for (i, bad) in [
        b"../victim/escaped".to_vec(),
        b"a/../../victim/escaped".to_vec(),
        victim.join("abs").as_os_str().as_bytes()[1..].to_vec(), // fine: relative inside target
        b"/etc/elastio-escaped".to_vec(),
        hops[2].clone(),
    ]
    .into_iter()
    .enumerate()
    {
        let rp = forge_rp(&env, vec![dir(b"a"), file(&bad)]);
        let t = env.path(&format!("t{i}"));
        let out = env.run(&[
            "file",
            "restore",
            "--rp",
            &rp,
            "--target",
            t.to_str().unwrap(),
        ]);
        if i == 2 {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            continue;
        }
        assert!(!out.status.success(), "restore of {bad:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("file tree of") && err.contains(&rp), "{err}");
    }
    assert_eq!(
        std::fs::read_dir(&victim).unwrap().count(),
        0,
        "something escaped"
    );
    assert!(!Path::new("/etc/elastio-escaped").exists());

    // A symlink in the tree, then a file "through" it: refused, nothing written via the link.
    let mut link = Entry::new(b"link".to_vec(), EntryKind::Symlink);
    link.target = victim.as_os_str().as_bytes().to_vec();
    let rp = forge_rp(&env, vec![link, file(b"link/through")]);
    let out = env.run(&[
        "file",
        "restore",
        "--rp",
        &rp,
        "--target",
        target.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to write through link"), "{err}");
    assert_eq!(
        std::fs::read_dir(&victim).unwrap().count(),
        0,
        "written through a symlink"
    );

    // A symlink planted in the target where the tree has a directory: also refused with --overwrite
    // only replacing it, never following it.
    let t2 = env.path("t-planted");
    std::fs::create_dir(&t2).unwrap();
    std::os::unix::fs::symlink(&victim, t2.join("a")).unwrap();
    let rp = forge_rp(&env, vec![dir(b"a"), file(b"a/f")]);
    let out = env.run(&[
        "file",
        "restore",
        "--rp",
        &rp,
        "--target",
        t2.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_dir(&victim).unwrap().count(),
        0,
        "followed a planted symlink"
    );
    restore(&env, &rp, &t2, &["--overwrite"]);
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
    assert!(t2.join("a").is_dir() && !t2.join("a").is_symlink());
    assert_eq!(
        std::fs::read(t2.join("a/f")).unwrap(),
        b"payload of a forged entry"
    );
}

#[test]
fn a_file_changing_while_read_is_reported() {
    let env = Env::new();
    let dir = env.path("busy");
    std::fs::create_dir(&dir).unwrap();
    let busy = dir.join("growing.log");
    std::fs::write(&busy, pseudo_random(1, 64 << 20)).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (busy, stop) = (busy.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&busy)
                .unwrap();
            // A slow, steady writer (like a log): every read attempt sees it move. Bounded in
            // time in case the backup never stops it.
            let started = std::time::Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && started.elapsed() < std::time::Duration::from_secs(120)
            {
                f.write_all(b"another line appended while the backup reads\n")
                    .unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    let b = backup(&env, &[&dir], &["--workers", "1"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let changed: Vec<String> = b["changed_while_read"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(changed, vec![busy.display().to_string()], "{b}");
    // The next backup reads it again (a flagged file is never reused).
    let again = backup(&env, &[&dir], &[]);
    assert_eq!(again["files_read"], 1, "{again}");
    assert!(again["changed_while_read"].as_array().unwrap().is_empty());
}

#[test]
fn a_file_rp_mounts_as_its_tree() {
    let env = Env::new();
    let root = file_fixture(&env);
    let b = backup(&env, &[&root], &[]);
    let rp = b["rp"]["id"].as_str().unwrap().to_string();
    let mnt = env.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let m = env.json(&["mount", &rp, mnt.to_str().unwrap()]);
    let pid = m["pid"].as_u64().unwrap();
    let result = std::panic::catch_unwind(|| {
        let seen = under(&mnt, &root);
        // Same names, types, modes, owners, times (ns), sizes, device numbers, hard-link
        // groups, symlink targets, xattrs, contents and holes as the source.
        assert_trees_equal(&seen, &root);
        // Random reads across chunk boundaries and through the hole of the sparse file.
        use std::os::unix::fs::FileExt;
        let want = std::fs::read(root.join("big.bin")).unwrap();
        let f = std::fs::File::open(seen.join("big.bin")).unwrap();
        for off in [0usize, 1, 131_071, 524_288 + 17, want.len() - 5] {
            let mut buf = vec![0u8; 700_000.min(want.len() - off)];
            f.read_exact_at(&mut buf, off as u64).unwrap();
            assert!(buf == want[off..off + buf.len()], "read at {off}");
        }
        let s = std::fs::File::open(seen.join("var/sparse.bin")).unwrap();
        let mut buf = vec![1u8; 4096];
        s.read_exact_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "hole reads as zeros");
        assert!(
            std::fs::write(seen.join("etc/passwd"), b"x").is_err(),
            "read-only"
        );
    });
    unmount_and_wait(&env, &mnt, pid);
    result.unwrap();
}
