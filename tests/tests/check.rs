//! `elastio check` on healthy and damaged vaults: each problem names the object and exactly the
//! RPs it affects, and RPs it does not affect still restore.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use elastio_tests::*;

/// Objects under `prefix` of a local vault.
fn objects(vault: &Path, prefix: &str) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut dirs = vec![vault.join(prefix)];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                out.insert(e.path());
            }
        }
    }
    out
}

/// Two assets backed up into one vault; the packs and index objects of each.
struct Two {
    env: Env,
    a_img: PathBuf,
    b_img: PathBuf,
    a_rp: String,
    b_rp: String,
    a_packs: Vec<PathBuf>,
    a_index: Vec<PathBuf>,
}

fn two_assets() -> Two {
    let env = Env::new();
    let a_img = env.path("a.img");
    std::fs::write(&a_img, pseudo_random(1, 40 << 20)).unwrap();
    let b_img = env.path("b.img");
    std::fs::write(&b_img, pseudo_random(2, 24 << 20)).unwrap();
    let a_rp = env.backup(&a_img, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a_packs: Vec<PathBuf> = objects(&env.vault, "packs").into_iter().collect();
    let a_index: Vec<PathBuf> = objects(&env.vault, "index").into_iter().collect();
    let b_rp = env.backup(&b_img, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    Two {
        env,
        a_img,
        b_img,
        a_rp,
        b_rp,
        a_packs,
        a_index,
    }
}

/// Runs `check` with JSON output: (exit code, report).
fn check(env: &Env, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut args = vec!["check", "--output-format", "json"];
    args.extend_from_slice(extra);
    let out = env.run(&args);
    let code = out.status.code().unwrap_or(-1);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "check gave no JSON (exit {code}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, v)
}

fn key_of(vault: &Path, path: &Path) -> String {
    path.strip_prefix(vault)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

/// Asserts one problem, on `object`, affecting exactly `rps`; returns its text.
fn only_problem(report: &serde_json::Value, object: &str, rps: &[&str]) -> String {
    let problems = report["problems"].as_array().unwrap();
    let p = problems
        .iter()
        .find(|p| p["object"] == object)
        .unwrap_or_else(|| panic!("no problem on {object}: {report:#}"));
    let got: BTreeSet<&str> = p["rps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(got, rps.iter().copied().collect(), "{report:#}");
    let damaged: BTreeSet<&str> = report["damaged_rps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(damaged, rps.iter().copied().collect(), "{report:#}");
    p["problem"].as_str().unwrap().to_string()
}

fn assert_restores(t: &Two, rp: &str, img: &Path) {
    let out = t.env.path(&format!("{rp}.out"));
    t.env.restore(rp, &out);
    assert_eq!(sha256_file(&out), sha256_file(img));
}

#[test]
fn a_healthy_vault_passes_every_level() {
    let t = two_assets();
    for extra in [&[][..], &["--read-data"], &["--read-data-subset", "50%"]] {
        let (code, r) = check(&t.env, extra);
        assert_eq!(code, 0, "{r:#}");
        assert_eq!(r["healthy"], true);
        assert_eq!(r["rps"], 2);
        assert!(r["chunk_references"].as_u64().unwrap() >= 500);
    }
    let (_, all) = check(&t.env, &["--read-data"]);
    assert_eq!(all["packs_read"], all["packs"]);
    let human = t.env.ok(&["check"]);
    assert!(human.contains("no problems found"), "{human}");
}

#[test]
fn a_flipped_byte_is_found_by_reading_data() {
    let t = two_assets();
    let pack = &t.a_packs[0];
    let mut data = std::fs::read(pack).unwrap();
    data[5000] ^= 0x40;
    std::fs::write(pack, data).unwrap();
    // The trailer is intact: only reading the data finds it.
    assert_eq!(check(&t.env, &[]).0, 0);
    let (code, r) = check(&t.env, &["--read-data"]);
    assert_eq!(code, 3);
    let text = only_problem(&r, &key_of(&t.env.vault, pack), &[&t.a_rp]);
    assert!(text.contains("damaged chunk"), "{text}");
    assert_restores(&t, &t.b_rp, &t.b_img);
}

#[test]
fn truncated_missing_and_swapped_packs_are_named() {
    // Truncated.
    let t = two_assets();
    let pack = &t.a_packs[0];
    let len = std::fs::metadata(pack).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(pack)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (code, r) = check(&t.env, &[]);
    assert_eq!(code, 3);
    let text = only_problem(&r, &key_of(&t.env.vault, pack), &[&t.a_rp]);
    assert!(text.contains("truncated"), "{text}");
    assert_restores(&t, &t.b_rp, &t.b_img);

    // Missing.
    let t = two_assets();
    std::fs::remove_file(&t.a_packs[1]).unwrap();
    let (code, r) = check(&t.env, &[]);
    assert_eq!(code, 3);
    let text = only_problem(&r, &key_of(&t.env.vault, &t.a_packs[1]), &[&t.a_rp]);
    assert!(text.contains("missing pack"), "{text}");
    assert_restores(&t, &t.b_rp, &t.b_img);

    // Two packs swapped: each one's trailer is bound to its own name, so both are named. (When
    // one holds the RP's map, the chunks the RP needs are unknown beyond it: the RP is damaged
    // either way.)
    let t = two_assets();
    let (p0, p1) = (&t.a_packs[0], &t.a_packs[1]);
    let tmp = t.env.path("swap");
    std::fs::rename(p0, &tmp).unwrap();
    std::fs::rename(p1, p0).unwrap();
    std::fs::rename(&tmp, p1).unwrap();
    let (code, r) = check(&t.env, &[]);
    assert_eq!(code, 3);
    for p in [p0, p1] {
        let key = key_of(&t.env.vault, p);
        assert!(
            r["problems"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["object"] == key.as_str()),
            "{key} not named: {r:#}"
        );
    }
    assert_eq!(r["damaged_rps"], serde_json::json!([t.a_rp]));
    assert_restores(&t, &t.b_rp, &t.b_img);
}

#[test]
fn a_missing_or_damaged_index_object_names_the_rps_that_need_it() {
    let t = two_assets();
    for i in &t.a_index {
        std::fs::remove_file(i).unwrap();
    }
    let (code, r) = check(&t.env, &[]);
    assert_eq!(code, 3);
    only_problem(&r, "index", &[&t.a_rp]);
    // The packs are still there, listed as in no index object.
    assert_eq!(
        r["unindexed_packs"].as_array().unwrap().len(),
        t.a_packs.len(),
        "{r:#}"
    );
    assert_restores(&t, &t.b_rp, &t.b_img);

    // A damaged index object: the vault still opens, check names it.
    let t = two_assets();
    let index = &t.a_index[0];
    let mut data = std::fs::read(index).unwrap();
    let n = data.len();
    data[n / 2] ^= 1;
    std::fs::write(index, data).unwrap();
    let (code, r) = check(&t.env, &[]);
    assert_eq!(code, 3);
    let key = key_of(&t.env.vault, index);
    assert!(
        r["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["object"] == key.as_str()),
        "{r:#}"
    );
    assert_eq!(r["damaged_rps"], serde_json::json!([t.a_rp]));
    assert_restores(&t, &t.b_rp, &t.b_img);
    let failed = t.env.run(&[
        "block",
        "restore",
        "--rp",
        &t.a_rp,
        t.env.path("a.out").to_str().unwrap(),
    ]);
    assert!(!failed.status.success());
    let _ = &t.a_img;
}

#[test]
fn a_damaged_catalog_entry_and_a_newer_vault_are_reported() {
    let t = two_assets();
    let entry = t.env.vault.join("catalog").join(&t.a_rp);
    let mut data = std::fs::read(&entry).unwrap();
    data[20] ^= 1;
    std::fs::write(&entry, data).unwrap();
    let (code, r) = check(&t.env, &[]);
    assert_eq!(code, 3);
    only_problem(&r, &format!("catalog/{}", t.a_rp), &[&t.a_rp]);

    // A vault of a newer format: a clear refusal, before any password is needed.
    let config = t.env.vault.join("config");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    v["config"]["version"] = serde_json::json!(99);
    std::fs::write(&config, v.to_string()).unwrap();
    let out = t.env.run(&["check"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("99"), "{err}");
}
