//! `elastio iscan` through the real binary, on file RPs and on ext4 file systems (made by
//! mkfs.ext4 -d inside a GPT disk) of one source tree: an attack (10 % of the documents
//! encrypted with AES-CTR by openssl and renamed `.locked`, a large file encrypted every other
//! MiB, ransom notes) is ransomware and names those files; benign changes of the same tree
//! (gzip/xz/zstd of logs, log rotation, new JPEG/PNG/zip files, a package upgrade, a rewritten
//! SQLite database) find nothing, incrementally and in full; YARA rules, damaged file systems.
//! No root needed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use elastio_tests::*;
use serde_json::Value;

const NOTE: &str = "Your files are encrypted. To get them back visit \
http://vww6ybal4bd7szmgncyruucpgfkqahzddi37ktceo3ah7ngmcopnpyyd.onion/ with your id.\n";

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn python(script: &str, args: &[&str]) {
    let mut a = vec!["-c", script];
    a.extend(args);
    run("python3", &a);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Text that reads like documents: words, numbers, lines.
fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "invoice", "customer", "total", "amount", "the", "of", "and", "shipping", "order",
        "quarter", "revenue", "north", "south", "region", "item", "price", "due", "paid",
    ];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = WORDS[(x % WORDS.len() as u64) as usize];
        out.extend_from_slice(w.as_bytes());
        out.push(if x.is_multiple_of(11) { b'\n' } else { b' ' });
        if x.is_multiple_of(7) {
            out.extend_from_slice(format!("{} ", x % 100_000).as_bytes());
        }
    }
    out.truncate(len);
    out
}

/// A photo-like picture as a JPEG (cjpeg from a PPM of gradients and noise).
fn jpeg(dir: &Path, name: &str, seed: u64) {
    let (w, h) = (320usize, 240usize);
    let noise = pseudo_random(seed, w * h * 3);
    let mut ppm = format!("P6 {w} {h} 255\n").into_bytes();
    for y in 0..h {
        for x in 0..w {
            let n = noise[(y * w + x) * 3] as usize / 8;
            ppm.extend([
                ((x + n) % 256) as u8,
                ((y + n) % 256) as u8,
                ((x + y) / 3 % 256) as u8,
            ]);
        }
    }
    let src = dir.join(format!("{name}.ppm"));
    std::fs::write(&src, ppm).unwrap();
    run(
        "cjpeg",
        &["-quality", "85", "-outfile", s(&dir.join(name)), s(&src)],
    );
    std::fs::remove_file(src).unwrap();
}

const MAKE_ZIP: &str = r#"
import sys, zipfile
out, *files = sys.argv[1:]
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    for f in files:
        z.write(f, f.rsplit("/", 1)[-1])
"#;

const MAKE_PNG: &str = r#"
import sys, zlib, struct
out, seed = sys.argv[1], int(sys.argv[2])
w = h = 200
rows = b"".join(b"\x00" + b"".join(bytes(((x * seed + y) % 256, (y * 3) % 256, (x ^ y) % 256)) for x in range(w)) for y in range(h))
def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")
open(out, "wb").write(png)
"#;

const SQLITE: &str = r#"
import sys, sqlite3
db, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = sqlite3.connect(db)
c.execute("create table if not exists orders (id integer primary key, customer text, amount real, note text)")
c.execute("delete from orders")
c.executemany("insert into orders values (?, ?, ?, ?)", [(i, "customer %d" % ((i * seed) % 997), i * 1.25 + seed, "order note %d for region %d" % (i, i % 13)) for i in range(n)])
c.commit()
c.execute("vacuum")
c.close()
"#;

/// The source tree: documents, office files, photos, logs, a database, a program.
fn make_tree(root: &Path) {
    for d in [
        "docs/office",
        "photos",
        "var/log",
        "db",
        "usr/bin",
        "usr/share/doc/tool",
        "big",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for i in 0..60u64 {
        let len = 6_000 + (i as usize * 2_731) % 150_000;
        std::fs::write(root.join(format!("docs/doc{i:02}.txt")), text(i, len)).unwrap();
    }
    for i in 0..6u64 {
        let src = root.join(format!("docs/office/part{i}.xml"));
        std::fs::write(&src, text(100 + i, 40_000)).unwrap();
        python(
            MAKE_ZIP,
            &[
                s(&root.join(format!("docs/office/report{i}.docx"))),
                s(&src),
            ],
        );
        std::fs::remove_file(src).unwrap();
    }
    for i in 0..4 {
        jpeg(&root.join("photos"), &format!("img{i}.jpg"), i);
    }
    std::fs::write(root.join("var/log/syslog"), text(200, 1 << 20)).unwrap();
    std::fs::write(root.join("var/log/app.log"), text(201, 600_000)).unwrap();
    python(SQLITE, &[s(&root.join("db/app.sqlite")), "1", "20000"]);
    std::fs::copy("/usr/bin/ls", root.join("usr/bin/tool")).unwrap();
    std::fs::write(root.join("usr/share/doc/tool/changelog"), text(300, 30_000)).unwrap();
    run(
        "gzip",
        &["-9", s(&root.join("usr/share/doc/tool/changelog"))],
    );
    std::fs::write(root.join("big/ledger.csv"), text(400, 6 << 20)).unwrap();
}

fn copy_tree(from: &Path, to: &Path) {
    run("cp", &["-a", s(from), s(to)]);
}

/// AES-256-CTR of `data` with a key made from `seed` (openssl, as ransomware would).
fn aes_ctr(env: &Env, data: &[u8], seed: u64) -> Vec<u8> {
    let (i, o) = (env.path("aes.in"), env.path("aes.out"));
    std::fs::write(&i, data).unwrap();
    let key = format!("{:064x}", seed.wrapping_mul(0x1234_5678_9abc_def1) | 1);
    run(
        "openssl",
        &[
            "enc",
            "-aes-256-ctr",
            "-K",
            &key,
            "-iv",
            &"0".repeat(32),
            "-in",
            s(&i),
            "-out",
            s(&o),
        ],
    );
    std::fs::read(o).unwrap()
}

/// The attack: 10 % of the documents (6 texts, 1 docx) encrypted and renamed `.locked`, the
/// ledger encrypted every other MiB in place, notes dropped. Returns the encrypted paths.
fn attack(env: &Env, root: &Path) -> Vec<String> {
    let mut hit = Vec::new();
    let victims: Vec<String> = (0..6)
        .map(|i| format!("docs/doc{:02}.txt", i * 10 + 3))
        .chain(["docs/office/report2.docx".to_string()])
        .collect();
    for (k, v) in victims.iter().enumerate() {
        let p = root.join(v);
        let enc = aes_ctr(env, &std::fs::read(&p).unwrap(), k as u64);
        std::fs::write(root.join(format!("{v}.locked")), enc).unwrap();
        std::fs::remove_file(p).unwrap();
        hit.push(format!("{v}.locked"));
    }
    let ledger = root.join("big/ledger.csv");
    let mut data = std::fs::read(&ledger).unwrap();
    for (i, piece) in data
        .chunks_mut(1 << 20)
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
    {
        let enc = aes_ctr(env, piece, 1000 + i as u64);
        piece.copy_from_slice(&enc);
    }
    std::fs::write(&ledger, data).unwrap();
    hit.push("big/ledger.csv".into());
    std::fs::write(root.join("docs/HOW_TO_DECRYPT.txt"), NOTE).unwrap();
    std::fs::write(root.join("photos/HOW_TO_DECRYPT.txt"), NOTE).unwrap();
    hit
}

/// Benign changes: compressed and rotated logs, new pictures and archives, a package upgrade,
/// a rewritten database.
fn benign(root: &Path) {
    let log = root.join("var/log");
    std::fs::rename(log.join("syslog"), log.join("syslog.1")).unwrap();
    std::fs::write(log.join("syslog"), text(500, 20_000)).unwrap();
    run("gzip", &["-k", s(&log.join("syslog.1"))]);
    run("xz", &["-k", s(&log.join("app.log"))]);
    run("zstd", &["-q", "-k", s(&log.join("app.log"))]);
    std::fs::write(log.join("app.log"), text(501, 100_000)).unwrap();
    for i in 10..16 {
        jpeg(&root.join("photos"), &format!("new{i}.jpg"), i);
    }
    python(MAKE_PNG, &[s(&root.join("photos/chart.png")), "7"]);
    python(
        MAKE_ZIP,
        &[
            s(&root.join("docs/office/bundle.zip")),
            s(&root.join("docs/doc01.txt")),
            s(&root.join("docs/doc02.txt")),
        ],
    );
    // The package upgrade: a new binary, a new changelog, a new library.
    std::fs::copy("/usr/bin/cp", root.join("usr/bin/tool")).unwrap();
    std::fs::remove_file(root.join("usr/share/doc/tool/changelog.gz")).unwrap();
    std::fs::write(root.join("usr/share/doc/tool/changelog"), text(301, 35_000)).unwrap();
    run(
        "gzip",
        &["-9", s(&root.join("usr/share/doc/tool/changelog"))],
    );
    std::fs::copy("/usr/bin/cat", root.join("usr/bin/tool-helper")).unwrap();
    python(SQLITE, &[s(&root.join("db/app.sqlite")), "2", "25000"]);
    // Edited documents.
    std::fs::write(root.join("docs/doc05.txt"), text(9005, 70_000)).unwrap();
}

/// A GPT disk with the ext4 file system of `tree` in partition 1.
fn disk_of(env: &Env, tree: &Path, name: &str) -> PathBuf {
    let fs = ext4_image_of(env, &format!("{name}.ext4"), 64 << 20, tree);
    disk_with(env, &fs, name)
}

/// A GPT disk with file-system image `fs` in partition 1.
fn disk_with(env: &Env, fs: &Path, name: &str) -> PathBuf {
    let disk = env.path(name);
    make_disk(
        &disk,
        80 << 20,
        "gpt",
        &[(2048, (64 << 20) / 512, Some(fs))],
    );
    std::fs::remove_file(fs).unwrap();
    disk
}

fn iscan(env: &Env, args: &[&str]) -> (i32, Value) {
    let mut a = vec!["iscan"];
    a.extend(args);
    a.extend(["--output-format", "json"]);
    let out = env.run(&a);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iscan {args:?}: {e} ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), v)
}

/// (signal, path) of every finding, paths without the RP's prefix (`tmp/.../src/` of a file RP,
/// `part1/` of a disk RP).
fn findings(v: &Value, prefix: &str) -> BTreeSet<(String, String)> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let p = f["path"].as_str().unwrap_or("");
            (
                f["signal"].as_str().unwrap().to_string(),
                p.strip_prefix(prefix).unwrap_or(p).to_string(),
            )
        })
        .collect()
}

fn backup_files(env: &Env, dir: &Path) -> String {
    let v = env.json(&["file", "backup", s(dir)]);
    v["rp"]["id"].as_str().unwrap().to_string()
}

fn backup_disk(env: &Env, disk: &Path) -> String {
    let v = env.json(&["block", "backup", s(disk), "--asset-name", "web-1-disk"]);
    v["rp"]["id"].as_str().unwrap().to_string()
}

/// What the attack must show, whatever the RP kind.
fn assert_attack(code: i32, v: &Value, prefix: &str, hit: &[String]) {
    let f = findings(v, prefix);
    assert_eq!(code, 201, "{f:?}");
    assert_eq!(v["verdict"], "ransomware");
    for h in hit {
        // A text that became ciphertext is `encrypted`; a zip (dense already) lost its magic.
        let signal = match h.as_str() {
            "docs/office/report2.docx.locked" => "magic_lost",
            h if h.ends_with(".locked") => "encrypted",
            _ => "partial_encryption",
        };
        assert!(
            f.contains(&(signal.into(), h.clone())),
            "{signal} {h} not in {f:?}"
        );
    }
    for note in ["docs/HOW_TO_DECRYPT.txt", "photos/HOW_TO_DECRYPT.txt"] {
        assert!(f.contains(&("ransom_note".into(), note.into())), "{f:?}");
        assert!(f.contains(&("onion_address".into(), note.into())), "{f:?}");
    }
    // Nothing but the attack is named.
    let named: BTreeSet<&String> = f.iter().map(|(_, p)| p).collect();
    for p in named {
        assert!(
            hit.contains(p) || p.ends_with("HOW_TO_DECRYPT.txt"),
            "unexpected finding on {p}: {f:?}"
        );
    }
    assert!(v["score"].as_u64().unwrap() >= 100);
}

fn assert_clean(code: i32, v: &Value, what: &str) {
    assert_eq!(
        (
            code,
            v["verdict"].as_str(),
            v["findings"].as_array().map(Vec::len)
        ),
        (0, Some("clean"), Some(0)),
        "{what}: {v:#}"
    );
}

#[test]
fn ransomware_in_file_rps_is_found_named_and_the_parent_is_last_clean() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src);
    let base = backup_files(&env, &src);
    let (code, v) = iscan(&env, &["--rp", &base]);
    assert_clean(code, &v, "first RP (a full scan: no baseline)");
    assert!(v["baseline"].is_null());

    // The benign RP: every benign change at once, scanned against its parent and in full.
    let benign_src = env.path("benign");
    copy_tree(&src, &benign_src);
    benign(&benign_src);
    // Backed up as the same asset: the attack below comes after it.
    std::fs::remove_dir_all(&src).unwrap();
    std::fs::rename(&benign_src, &src).unwrap();
    let ok = backup_files(&env, &src);
    let (code, v) = iscan(&env, &["--rp", &ok]);
    assert_clean(code, &v, "benign changes");
    assert_eq!(v["baseline"], base.as_str());
    assert!(
        v["stats"]["files_unchanged"].as_u64().unwrap() > 50,
        "{v:#}"
    );
    let (code, v) = iscan(&env, &["--rp", &ok, "--full", "--no-save"]);
    assert_clean(code, &v, "benign tree, full scan");

    // The attack, backed up with --iscan: the backup commits, then exits 201.
    let hit = attack(&env, &src);
    let out = env.run(&[
        "file",
        "backup",
        s(&src),
        "--iscan",
        "--output-format",
        "json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(201),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bad = v["rp"]["id"].as_str().unwrap().to_string();
    let prefix = format!("{}/", s(&src).trim_start_matches('/'));
    assert_attack(201, &v["iscan"][0], &prefix, &hit);
    // Only what changed was read: the unchanged documents were told apart by their chunks.
    let stats = &v["iscan"][0]["stats"];
    assert!(stats["files_scanned"].as_u64().unwrap() <= 12, "{stats}");
    // The same RP scanned in full (no baseline) is still ransomware: the .locked files are
    // uniform with a ransomware extension, the notes are notes. (The ledger's partial
    // encryption needs its baseline to show.)
    let (code, v) = iscan(&env, &["--rp", &bad, "--full", "--no-save"]);
    assert_eq!(code, 201, "{v:#}");
    // The next RP, unchanged since the attack: its baseline is the last RP scanned clean, not
    // its parent, so the encrypted files it carries are judged again.
    let after = backup_files(&env, &src);
    let (code, v) = iscan(&env, &["--rp", &after]);
    assert_eq!(
        (code, v["baseline"].as_str()),
        (201, Some(ok.as_str())),
        "{v:#}"
    );
    // A baseline that never scanned clean is refused for a kept report.
    let out = env.run(&["iscan", "--rp", &after, "--baseline", &bad]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&bad) && err.contains("no clean scan"),
        "{err}"
    );

    // The reports are in the vault.
    let list = env.json(&["rp", "list"]);
    let verdicts: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|rp| rp["scan"]["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(verdicts, ["clean", "clean", "ransomware", "ransomware"]);
    let last = env.ok(&["rp", "last-clean", "--asset", s(&src)]);
    assert_eq!(last.trim(), ok, "the parent of the attacked RP");
    let clean = env.json(&["rp", "list", "--clean"]);
    assert_eq!(clean.as_array().unwrap().len(), 2);
    let show = env.json(&["rp", "show", &bad]);
    assert_eq!(show["scan"]["verdict"], "ransomware");
    // check reads the reports too; deleting the RP deletes its reports.
    env.ok(&["check"]);
    env.ok(&["rp", "delete", &bad, &after]);
    let reports = env.path("vault").join("scans").join(&bad);
    assert!(
        std::fs::read_dir(&reports).map_or(0, |d| d.count()) == 0,
        "reports of a deleted RP left in {}",
        reports.display()
    );

    // Malware: a planted string matched by a user rule (202), and with the attack (203).
    let rules = env.path("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("planted.yar"),
        "rule planted_backdoor { strings: $a = \"evil-planted-marker-91\" condition: $a }",
    )
    .unwrap();
    std::fs::write(
        src.join("usr/bin/helper.sh"),
        "#!/bin/sh\n# evil-planted-marker-91\n",
    )
    .unwrap();
    let both = backup_files(&env, &src);
    // The clean baseline was scanned with the built-in rules only: a kept report needs a full
    // scan under the new rules, an ad-hoc comparison may use it.
    let (code, v) = iscan(
        &env,
        &[
            "--rp",
            &both,
            "--baseline",
            &ok,
            "--yara-rules",
            s(&rules),
            "--no-save",
        ],
    );
    assert_eq!(code, 203, "{v:#}");
    assert!(findings(&v, &prefix).contains(&("yara".into(), "usr/bin/helper.sh".into())));
    let yara: Vec<&Value> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["signal"] == "yara")
        .collect();
    assert_eq!(yara.len(), 1);
    assert_eq!(yara[0]["evidence"], "rule planted:planted_backdoor");
    // The malware alone, in a local directory.
    let (code, v) = iscan(
        &env,
        &["--path", s(&src.join("usr")), "--yara-rules", s(&rules)],
    );
    assert_eq!(code, 202, "{v:#}");
    assert_eq!(v["verdict"], "malware");

    // A baseline found infected later (new rules) taints every clean report built on it.
    std::fs::write(
        rules.join("words.yar"),
        "rule invoice_word { strings: $a = \"invoice\" condition: $a }",
    )
    .unwrap();
    let (code, _) = iscan(&env, &["--rp", &base, "--full", "--yara-rules", s(&rules)]);
    assert_eq!(code, 202);
    let clean = env.json(&["rp", "list", "--clean"]);
    assert_eq!(clean.as_array().unwrap().len(), 0, "{clean:#}");
    let out = env.run(&["rp", "last-clean", "--asset", s(&src)]);
    assert!(!out.status.success());
}

#[test]
fn ransomware_and_damage_in_ext4_file_systems_of_disk_rps() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src);
    let base = backup_disk(&env, &disk_of(&env, &src, "d0.img"));
    let (code, v) = iscan(&env, &["--rp", &base]);
    assert_clean(code, &v, "first disk RP");
    assert!(
        v["filesystems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["place"] == "part1"),
        "{v:#}"
    );

    let ok_src = env.path("benign");
    copy_tree(&src, &ok_src);
    benign(&ok_src);
    let ok = backup_disk(&env, &disk_of(&env, &ok_src, "d1.img"));
    let (code, v) = iscan(&env, &["--rp", &ok]);
    assert_clean(code, &v, "benign changes in ext4");
    assert_eq!(v["baseline"], base.as_str());
    let (code, v) = iscan(&env, &["--rp", &ok, "--full", "--no-save"]);
    assert_clean(code, &v, "benign ext4, full scan");

    let hit = attack(&env, &ok_src);
    let bad = backup_disk(&env, &disk_of(&env, &ok_src, "d2.img"));
    let (code, v) = iscan(&env, &["--rp", &bad]);
    assert_attack(code, &v, "part1/", &hit);
    assert_eq!(v["baseline"], ok.as_str());
    let last = env.ok(&["rp", "last-clean", "--asset", "web-1-disk"]);
    assert_eq!(last.trim(), ok);

    // A damaged superblock: the partition is named, exit 204 (damage only).
    let sb = ext4_image_of(&env, "sb.ext4", 64 << 20, &src);
    // s_log_block_size (superblock offset 24) set to an impossible 2^40-byte block.
    write_at(&sb, 1024 + 24, &30u32.to_le_bytes());
    let damaged = backup_disk(&env, &disk_with(&env, &sb, "sb.img"));
    let (code, v) = iscan(&env, &["--rp", &damaged, "--full"]);
    assert_eq!(code, 204, "{v:#}");
    let f = findings(&v, "");
    assert!(
        f.iter().any(|(sig, p)| sig == "damaged" && p == "part1"),
        "{f:?}"
    );

    // A damaged inode table: the files whose inodes were overwritten are named under part1.
    let fs_img = ext4_image_of(&env, "it.ext4", 64 << 20, &src);
    let dump = Command::new("dumpe2fs").arg(s(&fs_img)).output().unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    let table = dump
        .lines()
        .find_map(|l| l.trim().strip_prefix("Inode table at "))
        .and_then(|r| r.split('-').next())
        .and_then(|b| b.trim().parse::<u64>().ok())
        .expect("dumpe2fs names group 0's inode table");
    let block = dump
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|b| b.trim().parse::<u64>().ok())
        .unwrap();
    // Inodes 12.. of group 0 (the tree's first files and directories) become garbage.
    write_at(
        &fs_img,
        table * block + 11 * 256,
        &pseudo_random(77, 64 * 256),
    );
    let damaged = backup_disk(&env, &disk_with(&env, &fs_img, "it.img"));
    let (code, v) = iscan(&env, &["--rp", &damaged, "--full"]);
    let f = findings(&v, "");
    assert!(
        f.iter()
            .any(|(sig, p)| (sig == "unreadable" || sig == "damaged") && p.starts_with("part1")),
        "{f:?}"
    );
    assert!(code == 204 || code == 201 || code == 203, "{code}: {v:#}");
}

#[test]
fn streams_are_judged_as_one_file() {
    let env = Env::new();
    let dump = env.path("dump.sql");
    std::fs::write(&dump, text(1, 3 << 20)).unwrap();
    let backup = |extra: &[&str]| -> (i32, Value) {
        let mut a = vec![
            "stream",
            "backup",
            "--stream-name",
            "pg/main",
            "--from-file",
            s(&dump),
        ];
        a.extend(extra);
        a.extend(["--output-format", "json"]);
        let out = env.run(&a);
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        (out.status.code().unwrap(), v)
    };
    let (code, v) = backup(&["--iscan"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["iscan"][0]["verdict"], "clean");
    // The same dump again: unchanged, not read.
    let (code, v) = backup(&["--iscan"]);
    assert_eq!(code, 0);
    assert_eq!(v["iscan"][0]["stats"]["files_scanned"], 0, "{v:#}");
    // Encrypted by an attacker: the stream turned ciphertext.
    let enc = aes_ctr(&env, &std::fs::read(&dump).unwrap(), 5);
    std::fs::write(&dump, enc).unwrap();
    let (code, v) = backup(&["--iscan"]);
    assert_eq!(code, 201, "{v:#}");
    assert_eq!(
        findings(&v["iscan"][0], ""),
        [("encrypted".to_string(), "pg_main".to_string())].into()
    );
    // A planted string: malware (judged against the last stream that scanned clean).
    let mut planted = text(2, 1 << 20);
    planted.extend_from_slice(b"-- ELASTIO-ISCAN-TEST-MALWARE-5f0c1a\n");
    std::fs::write(&dump, planted).unwrap();
    let (code, v) = backup(&["--iscan"]);
    assert_eq!(code, 202, "{v:#}");
    assert_eq!(
        v["iscan"][0]["findings"][0]["evidence"],
        "rule builtin:elastio_test_malware"
    );
}

/// A scan report written by the first release of integrity scans
/// (fixtures/golden-scan-report-v1, over the golden vault of format 1) keeps reading: this fails
/// when the report's format changes by accident.
#[test]
fn golden_scan_report_still_reads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let env = Env::new();
    let vault = env.path("golden");
    run("cp", &["-r", s(&root.join("golden-vault-v1")), s(&vault)]);
    run(
        "cp",
        &[
            "-r",
            s(&root.join("golden-scan-report-v1/scans")),
            s(&vault),
        ],
    );
    let json = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--output-format", "json"]);
        let mut c = env.command(&a);
        c.env("ELASTIO_VAULT", &vault)
            .env("ELASTIO_PASSWORD", "golden");
        Env::json_of(&mut c)
    };
    let rp = "rp-01m80q0exmx4mr1kh8rkgkg9q4";
    let show = json(&["rp", "show", rp]);
    assert_eq!(show["scan"]["verdict"], "clean", "{show:#}");
    assert_eq!(show["scan"]["score"], 0);
    assert!(show["scan"]["baseline"].is_null());
    assert_eq!(json(&["rp", "list", "--clean"])[0]["id"], rp);
    assert_eq!(
        json(&["rp", "last-clean", "--asset", "golden.img"])["id"],
        rp
    );
    let mut c = env.command(&["check"]);
    c.env("ELASTIO_VAULT", &vault)
        .env("ELASTIO_PASSWORD", "golden");
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Prune deletes the reports of the RPs it deletes, of every kind, while scans of those RPs run
/// (a scan racing the deletion may leave a report of a gone RP: listing never reads it, check
/// stays clean); the RPs kept keep their status.
#[test]
fn prune_racing_scans_deletes_reports_with_their_rps() {
    let env = Env::new();
    let dir = env.path("files");
    std::fs::create_dir(&dir).unwrap();
    let dump = env.path("dump.sql");
    let img = ext4_image(&env, "d.img", 32 << 20);
    let mut ids = Vec::new();
    for round in 0..3u64 {
        std::fs::write(dir.join(format!("doc{round}.txt")), text(round, 50_000)).unwrap();
        std::fs::write(&dump, text(100 + round, 200_000)).unwrap();
        write_at(&img, 20 << 20, &text(200 + round, 100_000));
        for args in [
            vec!["file", "backup", s(&dir), "--iscan"],
            vec![
                "stream",
                "backup",
                "--stream-name",
                "db",
                "--from-file",
                s(&dump),
                "--iscan",
            ],
            vec!["block", "backup", s(&img), "--iscan"],
        ] {
            let mut a = args.clone();
            a.extend(["--output-format", "json"]);
            let v: Value = serde_json::from_str(&env.ok(&a)).unwrap();
            assert_eq!(v["iscan"][0]["verdict"], "clean", "{v:#}");
            ids.push(v["rp"]["id"].as_str().unwrap().to_string());
        }
    }
    // Rescans of every RP, while prune keeps one RP per asset.
    let scans = std::thread::scope(|sc| {
        let scanner = sc.spawn(|| {
            ids.iter()
                .map(|id| {
                    let out = env.run(&["iscan", "--rp", id, "--full", "-q"]);
                    let err = String::from_utf8_lossy(&out.stderr).into_owned();
                    (id.clone(), out.status.code(), err)
                })
                .collect::<Vec<_>>()
        });
        let pruned = env.json(&["prune", "--keep-last", "1"]);
        assert!(pruned.is_object(), "{pruned:#}");
        scanner.join().unwrap()
    });
    assert_eq!(scans.len(), ids.len());
    let left = env.json(&["rp", "list"]);
    let left = left.as_array().unwrap();
    assert_eq!(left.len(), 3, "one RP per asset: {left:#?}");
    let kept: Vec<&str> = left.iter().map(|r| r["id"].as_str().unwrap()).collect();
    for (id, code, err) in &scans {
        if kept.contains(&id.as_str()) {
            // The RPs kept scan clean whatever the prune did meanwhile.
            assert_eq!(*code, Some(0), "iscan {id}: {err}");
        } else {
            // A deleted RP: scanned before its deletion, not found after it, or its chunks gone
            // under the scan (3): never a wrong verdict.
            assert!(
                matches!(code, Some(0 | 1 | 3)),
                "iscan {id}: {code:?} {err}"
            );
        }
    }
    for rp in left {
        assert_eq!(rp["scan"]["verdict"], "clean", "{rp:#}");
    }
    // Every report left belongs to a kept RP, but for one a racing scan wrote after the delete.
    let orphans = std::fs::read_dir(env.path("vault").join("scans"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| !kept.contains(&e.file_name().to_str().unwrap()))
        .filter(|e| std::fs::read_dir(e.path()).map_or(0, |d| d.count()) > 0)
        .count();
    assert!(orphans <= 1, "{orphans} deleted RPs still have reports");
    env.ok(&["check"]);
}
