//! Retention and prune: reclaiming space, with backups running at the same time and processes
//! killed at random moments, on local and S3 vaults. After everything: every RP that was reported
//! created (and not expired by the policy) restores byte-exact and `check --read-data` passes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use elastio_tests::*;

const MIB: usize = 1 << 20;

fn rp_of(v: &serde_json::Value) -> String {
    v["rp"]["id"].as_str().expect("rp id").to_string()
}

fn listed(env: &Env) -> Vec<String> {
    env.json(&["rp", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn check_clean(env: &Env) {
    let out = env.run(&["check", "--read-data", "--output-format", "json"]);
    assert!(
        out.status.success(),
        "check failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Rewrites `n` random 1 MiB stretches of `img` with fresh data; returns their offsets.
fn mutate(img: &Path, seed: u64, n: u64) -> Vec<u64> {
    let len = std::fs::metadata(img).unwrap().len();
    (0..n)
        .map(|i| {
            let off = (seed.wrapping_mul(7919).wrapping_add(i * 104729) % (len / MIB as u64))
                * MIB as u64;
            write_at(img, off, &pseudo_random(seed * 1000 + i, MIB));
            off
        })
        .collect()
}

#[test]
fn retention_deletes_per_asset_and_prune_reclaims_the_space() {
    let env = Env::new();
    let a = env.path("a.img");
    std::fs::write(&a, pseudo_random(1, 24 * MIB)).unwrap();
    let b = env.path("b.img");
    std::fs::write(&b, pseudo_random(2, 8 * MIB)).unwrap();
    let mut a_rps = Vec::new();
    for round in 0..4 {
        if round > 0 {
            mutate(&a, round, 6);
        }
        a_rps.push((rp_of(&env.backup(&a, None)), sha256_file(&a)));
    }
    let b_rp = rp_of(&env.backup(&b, None));
    let before = env.vault_bytes();

    let dry = env.json(&[
        "prune",
        "--keep-last",
        "1",
        "--asset",
        a.to_str().unwrap(),
        "--dry-run",
    ]);
    assert_eq!(dry["rps_deleted"], 3);
    assert_eq!(listed(&env).len(), 5, "a dry run changes nothing");
    assert_eq!(env.vault_bytes(), before);

    let r = env.json(&["prune", "--keep-last", "1", "--asset", a.to_str().unwrap()]);
    assert_eq!(r["rps_deleted"], 3);
    let reclaimable = r["reclaimable_bytes"].as_u64().unwrap();
    let deleted = r["bytes_deleted"].as_u64().unwrap() - r["bytes_copied"].as_u64().unwrap();
    assert!(
        deleted as f64 >= 0.9 * reclaimable as f64,
        "freed {deleted} of {reclaimable} reclaimable bytes: {r:#}"
    );
    let after = env.vault_bytes();
    assert!(after < before, "{after} >= {before}");
    let mut left = listed(&env);
    left.sort();
    let mut want = vec![a_rps[3].0.clone(), b_rp.clone()];
    want.sort();
    assert_eq!(left, want);
    check_clean(&env);
    let out = env.path("a.out");
    env.restore(&a_rps[3].0, &out);
    assert_eq!(sha256_file(&out), a_rps[3].1);
    env.restore(&b_rp, &out);
    assert_eq!(sha256_file(&out), sha256_file(&b));

    // rp delete + prune without a policy: garbage only.
    env.ok(&["rp", "delete", &b_rp]);
    let r = env.json(&["prune"]);
    assert_eq!(r["rps_deleted"], 0);
    assert!(
        r["bytes_deleted"].as_u64().unwrap() >= 8 * MIB as u64,
        "{r:#}"
    );
    assert_eq!(listed(&env), vec![a_rps[3].0.clone()]);
    check_clean(&env);
}

/// What a racing backup made, to check it restores: the kind and the sha256 of its content
/// (a disk image, a stream, or a file tree's files in name order).
#[derive(Clone, Debug)]
struct Made {
    kind: &'static str,
    sha: String,
}

/// The sha256 of `dir`'s files (a.bin, b.bin) concatenated.
fn tree_sha(dir: &Path) -> String {
    let mut all = std::fs::read(dir.join("a.bin")).unwrap();
    all.extend(std::fs::read(dir.join("b.bin")).unwrap());
    let p = dir.with_extension("concat");
    std::fs::write(&p, &all).unwrap();
    sha256_file(&p)
}

/// Rounds of block, file and stream backups and a prune (`--keep-last 2`) at once; returns the
/// RPs reported created. Content cycles with period 3, so each round's backups deduplicate
/// against data of the RP that round's prune expires: exactly the data prune condemns. The
/// second disk is backed up as a changed-map incremental from its last RP once it has one: its
/// unchanged chunks are kept from that parent unread, the reference prune must see.
fn backups_racing_prune(env: &Env, rounds: u64, size: usize) -> BTreeMap<String, Made> {
    let imgs: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = env.path(&format!("disk{i}.img"));
            std::fs::write(&p, pseudo_random(100 + i, size)).unwrap();
            p
        })
        .collect();
    let tree = env.path("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("a.bin"), pseudo_random(200, size)).unwrap();
    let stream_src = env.path("stream.bin");
    let mut created = BTreeMap::new();
    let (mut retried, mut spared) = (0, 0);
    // The second disk: changes since its last RP (kept across failed rounds), and that RP.
    let (mut pending, mut last_ok): (Vec<u64>, Option<String>) = (Vec::new(), None);
    let map = env.path("disk1.map");
    for round in 0..rounds {
        let variant = round % 3;
        let mut expect = Vec::new();
        for (i, img) in imgs.iter().enumerate() {
            let changed = mutate(img, variant * 10 + i as u64 + 1, 2);
            if i == 1 {
                pending.extend(changed);
            }
            expect.push(Made {
                kind: "disk",
                sha: sha256_file(img),
            });
        }
        std::fs::write(tree.join("b.bin"), pseudo_random(300 + variant, size / 2)).unwrap();
        expect.push(Made {
            kind: "file",
            sha: tree_sha(&tree),
        });
        let mut stream = pseudo_random(400, size);
        stream.extend(pseudo_random(500 + variant, size / 2));
        std::fs::write(&stream_src, &stream).unwrap();
        expect.push(Made {
            kind: "stream",
            sha: sha256_file(&stream_src),
        });
        let mut commands: Vec<Vec<&str>> = imgs
            .iter()
            .map(|img| vec!["block", "backup", img.to_str().unwrap()])
            .collect();
        if let Some(parent) = &last_ok {
            let mut text = format!("parent {parent}\n");
            for off in &pending {
                text += &format!("{off} {MIB}\n");
            }
            std::fs::write(&map, text).unwrap();
            commands[1].extend([
                "--changed-map",
                map.to_str().unwrap(),
                "--verify-share",
                "5",
            ]);
        }
        commands.push(vec!["file", "backup", tree.to_str().unwrap()]);
        commands.push(vec![
            "stream",
            "backup",
            "--stream-name",
            "orders",
            "--from-file",
            stream_src.to_str().unwrap(),
        ]);
        let backups: Vec<Child> = commands
            .iter()
            .map(|args| {
                let mut a = args.clone();
                a.extend(["--output-format", "json"]);
                env.command(&a)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let prune = env
            .command(&[
                "prune",
                "--keep-last",
                "2",
                "--max-wait",
                "120",
                "--output-format",
                "json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        for (k, (child, made)) in backups.into_iter().zip(expect).enumerate() {
            let out = child.wait_with_output().unwrap();
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                if k == 1 {
                    if last_ok.is_some() {
                        // Read: the listed changes (and the verified sample), no more.
                        let f = &v["figures"];
                        let read = f["bytes_read"].as_u64().unwrap()
                            - f["unchanged_verified"].as_u64().unwrap();
                        assert!(read <= (pending.len() * MIB) as u64, "{v}");
                    }
                    last_ok = Some(rp_of(&v));
                    pending.clear();
                }
                created.insert(rp_of(&v), made);
            } else {
                // Allowed only for the documented reason: a concurrent prune condemned data
                // the backup deduplicated against.
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    err.contains("run the backup again") && out.status.code() == Some(75),
                    "{} backup failed ({:?}): {err}",
                    made.kind,
                    out.status
                );
                retried += 1;
            }
        }
        let out = prune.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "prune failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        spared += r["packs_spared"].as_u64().unwrap_or(0);
    }
    eprintln!(
        "{} RPs made, {retried} backups told to run again, {spared} packs spared",
        created.len()
    );
    created
}

/// Every RP still listed that a backup reported restores to what it was made from; returns
/// how many of each kind were checked.
fn verify_listed(env: &Env, created: &BTreeMap<String, Made>) -> BTreeMap<&'static str, usize> {
    let mut n = BTreeMap::new();
    for rp in listed(env) {
        let Some(made) = created.get(&rp) else {
            continue;
        };
        let got = match made.kind {
            "disk" => {
                let out = env.path("verify.img");
                env.restore(&rp, &out);
                sha256_file(&out)
            }
            "stream" => {
                let out = env.path("verify.stream");
                env.ok(&[
                    "stream",
                    "restore",
                    "--rp",
                    &rp,
                    "--to-file",
                    out.to_str().unwrap(),
                    "--force",
                ]);
                sha256_file(&out)
            }
            _ => {
                let target = env.path(&format!("verify-{rp}"));
                env.ok(&[
                    "file",
                    "restore",
                    "--rp",
                    &rp,
                    "--target",
                    target.to_str().unwrap(),
                ]);
                let tree = env.path("tree");
                tree_sha(&target.join(tree.strip_prefix("/").unwrap()))
            }
        };
        assert_eq!(got, made.sha, "{} RP {rp} restores byte-exact", made.kind);
        *n.entry(made.kind).or_default() += 1;
    }
    n
}

#[test]
fn backups_and_prune_at_the_same_time_local() {
    let env = Env::new();
    let created = backups_racing_prune(&env, 5, 4 * MIB);
    assert!(
        created.len() >= 15,
        "most of 20 backups succeed: {}",
        created.len()
    );
    let n = verify_listed(&env, &created);
    for kind in ["disk", "file", "stream"] {
        assert!(n.get(kind).copied().unwrap_or(0) >= 1, "{kind}: {n:?}");
    }
    assert!(
        n.values().sum::<usize>() >= 6,
        "two kept per asset at least: {n:?}"
    );
    check_clean(&env);
}

#[test]
fn backups_and_prune_at_the_same_time_s3() {
    let env = Env::s3(&s3_server("rgw"));
    let created = backups_racing_prune(&env, 4, 2 * MIB);
    assert!(created.len() >= 10, "{}", created.len());
    let n = verify_listed(&env, &created);
    for kind in ["disk", "file", "stream"] {
        assert!(n.get(kind).copied().unwrap_or(0) >= 1, "{kind}: {n:?}");
    }
    check_clean(&env);
}

/// The same race on a vault under S3 Object Lock: prune's lock upkeep runs too, and hides
/// instead of destroying.
#[test]
fn backups_and_prune_at_the_same_time_on_a_locked_vault() {
    let env = Env::s3_with_init_args(
        &s3_server("rgw"),
        &["--object-lock", "governance", "--retention", "1d"],
    );
    let created = backups_racing_prune(&env, 4, 2 * MIB);
    assert!(created.len() >= 10, "{}", created.len());
    let n = verify_listed(&env, &created);
    for kind in ["disk", "file", "stream"] {
        assert!(n.get(kind).copied().unwrap_or(0) >= 1, "{kind}: {n:?}");
    }
    check_clean(&env);
    let st = env.json(&["vault", "lock", "status"]);
    assert_eq!(st["lock"]["unlocked"].as_array().unwrap().len(), 0, "{st}");
}

#[allow(unsafe_code)]
fn kill_after(mut child: Child, after: Duration) -> bool {
    let deadline = Instant::now() + after;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    true
}

#[test]
fn killed_backups_and_prunes_leave_a_sound_vault() {
    let env = Env::new();
    let img = env.path("disk.img");
    std::fs::write(&img, pseudo_random(7, 16 * MIB)).unwrap();
    let mut created = BTreeMap::new();
    let (mut killed_backups, mut killed_prunes) = (0, 0);
    let with_ttl = |mut c: Command| {
        // Short leases so prune does not wait minutes for the killed backups' leases.
        c.env("ELASTIO_LEASE_TTL", "1");
        c
    };
    let mut round_shas = std::collections::BTreeSet::new();
    for i in 0..10u64 {
        mutate(&img, 500 + i, 3);
        let sha = sha256_file(&img);
        round_shas.insert(sha.clone());
        // A backup killed somewhere in its run...
        let child = with_ttl(env.command(&["block", "backup", img.to_str().unwrap(), "-q"]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if kill_after(child, Duration::from_millis(20 + (i * 37) % 200)) {
            killed_backups += 1;
        }
        // ...then one that completes...
        let out = with_ttl(env.command(&[
            "block",
            "backup",
            img.to_str().unwrap(),
            "--output-format",
            "json",
        ]))
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        created.insert(rp_of(&v), Made { kind: "disk", sha });
        // ...and a prune killed somewhere in its run.
        let child = with_ttl(env.command(&["prune", "--keep-last", "3", "--max-wait", "10", "-q"]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if kill_after(child, Duration::from_millis(10 + (i * 53) % 300)) {
            killed_prunes += 1;
        }
        // After each: every visible RP restores and check passes.
        verify_listed(&env, &created);
        check_clean(&env);
    }
    eprintln!("killed {killed_backups} backups and {killed_prunes} prunes");
    // The next complete prune reclaims the garbage: afterwards nothing unreferenced is left but
    // what partly live packs hold below the repack threshold.
    std::thread::sleep(Duration::from_millis(1100)); // leases of killed processes go stale
    let out = with_ttl(env.command(&["prune", "--keep-last", "3", "--output-format", "json"]))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let after = with_ttl(env.command(&["prune", "--dry-run", "--output-format", "json"]))
        .output()
        .unwrap();
    let after: serde_json::Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(
        after["packs_deleted"], 0,
        "nothing left to delete: {after:#} after {r:#}"
    );
    assert_eq!(listed(&env).len(), 3);
    // A killed backup may have committed its RP just before dying: it restores to that round's
    // image like the completed one.
    let out = env.path("any.img");
    for rp in listed(&env) {
        env.restore(&rp, &out);
        assert!(round_shas.contains(&sha256_file(&out)), "{rp}");
    }
    verify_listed(&env, &created);
    check_clean(&env);
}

/// Retention that cannot surprise (each of these deleted data on the first release):
/// `--keep-daily 0` wiped every RP with exit 0; `--asset db` also pruned `db-archive`; an RP
/// tagged as the README showed was deleted anyway; `ELASTIO_PASSWORD=` made a vault with an
/// empty password.
#[test]
fn retention_refuses_surprises_and_protects_rps() {
    let env = Env::new();
    let db = env.path("db");
    let archive = env.path("db-archive");
    std::fs::write(&db, pseudo_random(7, MIB)).unwrap();
    std::fs::write(&archive, pseudo_random(8, MIB)).unwrap();
    let db_rps: Vec<String> = (0..2).map(|_| rp_of(&env.backup(&db, None))).collect();
    let archive_rp = rp_of(&env.backup(&archive, None));

    for policy in [["--keep-daily", "0"], ["--keep-last", "0"]] {
        let out = env.run(&["prune", policy[0], policy[1]]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{policy:?} must be refused");
        assert!(err.contains("--allow-empty"), "{err}");
        assert_eq!(listed(&env).len(), 3, "nothing deleted by {policy:?}");
    }

    // Exact asset names: `--asset <db>` leaves db-archive alone, whatever its name shares.
    let db_name = db.to_str().unwrap();
    let r = env.json(&["prune", "--keep-last", "1", "--asset", db_name]);
    assert_eq!(r["rps_deleted"], 1);
    let left = listed(&env);
    assert!(
        left.contains(&db_rps[1]) && left.contains(&archive_rp),
        "{left:?}"
    );

    // Protected RPs survive any policy and `rp delete` without --force.
    env.ok(&["rp", "protect", &archive_rp]);
    let out = env.run(&["rp", "delete", &archive_rp]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("protected"));
    let r = env.json(&[
        "prune",
        "--keep-last",
        "0",
        "--allow-empty",
        "--asset-glob",
        &format!("{}*", db_name),
    ]);
    assert_eq!(
        r["rps_deleted"], 1,
        "db's RP goes, the protected one stays: {r:#}"
    );
    assert_eq!(listed(&env), vec![archive_rp.clone()]);
    env.ok(&["rp", "unprotect", &archive_rp]);
    env.ok(&["rp", "delete", &archive_rp]);
    assert!(listed(&env).is_empty());

    // An empty password is refused from the environment too.
    let fresh = env.path("fresh-vault");
    let out = env
        .command(&["vault", "init"])
        .env("ELASTIO_VAULT", &fresh)
        .env("ELASTIO_PASSWORD", "")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!fresh.join("config").exists());
}
