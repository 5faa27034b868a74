//! `vault copy` between a local vault and Ceph RGW (started by `cargo xtask test`), and back.

use std::path::Path;
use std::time::{Duration, Instant};

use elastio_tests::*;
use scalez::store::s3::{S3Config, S3Store};
use scalez::store::ObjectStore;

fn rp_of(v: &serde_json::Value) -> String {
    v["rp"]["id"].as_str().unwrap().to_string()
}

/// `vault copy` run by `from`'s environment, the target reached through `endpoint`.
fn copy(from: &Env, to: &Env, endpoint: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "--endpoint-url",
        endpoint,
        "vault",
        "copy",
        "--to",
        to.vault.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    from.json(&args)
}

fn store_of(env: &Env, endpoint: &str) -> S3Store {
    let mut c = S3Config::from_url(env.vault.to_str().unwrap()).unwrap();
    c.endpoint_url = Some(endpoint.into());
    S3Store::connect(c).unwrap()
}

/// Every RP of `env` restored and compared: disks with `disks`, the stream, the file tree.
fn assert_restores(env: &Env, disks: &[(&str, &[u8])], stream: (&str, &[u8]), tree: (&str, &Path)) {
    for (rp, want) in disks {
        let out = env.path(&format!("disk-{rp}.img"));
        env.ok(&[
            "block",
            "restore",
            "--force",
            "--rp",
            rp,
            out.to_str().unwrap(),
        ]);
        assert_eq!(
            &std::fs::read(&out).unwrap(),
            want,
            "disk {rp} in {:?}",
            env.vault
        );
    }
    let out = env.path(&format!("stream-{}", stream.0));
    env.ok(&[
        "stream",
        "restore",
        "--force",
        "--rp",
        stream.0,
        "--to-file",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        stream.1,
        "stream in {:?}",
        env.vault
    );
    let target = env.path(&format!(
        "files-{}-{}",
        tree.0,
        hex::encode(rand::random::<[u8; 4]>())
    ));
    env.ok(&[
        "file",
        "restore",
        "--rp",
        tree.0,
        "--target",
        target.to_str().unwrap(),
    ]);
    assert_same_tree(&target.join(tree.1.strip_prefix("/").unwrap()), tree.1);
}

#[test]
fn vault_copy_local_to_rgw_and_back() {
    let rgw = s3_server("rgw");
    let local = Env::new();
    // Two disk RPs (the second a changed copy of the first), a stream and a file tree.
    let img = local.path("d.img");
    let v1 = pseudo_random(70, 6 << 20);
    std::fs::write(&img, &v1).unwrap();
    let d1 = rp_of(&local.json(&[
        "block",
        "backup",
        img.to_str().unwrap(),
        "--tag",
        "tier=gold",
    ]));
    let mut v2 = v1.clone();
    v2[(2 << 20)..(3 << 20)].copy_from_slice(&pseudo_random(71, 1 << 20));
    std::fs::write(&img, &v2).unwrap();
    let d2 = rp_of(&local.json(&["block", "backup", img.to_str().unwrap()]));
    let data = pseudo_random(72, 3 << 20);
    let sfile = local.path("s.bin");
    std::fs::write(&sfile, &data).unwrap();
    let s = rp_of(&local.json(&[
        "stream",
        "backup",
        "--stream-name",
        "db-dump",
        "--from-file",
        sfile.to_str().unwrap(),
    ]));
    let tree = rich_tree(&local, 1 << 20);
    let f = rp_of(&local.json(&["file", "backup", tree.to_str().unwrap()]));

    // Local → RGW: everything, restorable there, same ids, tags and parents.
    let remote = Env::s3(&rgw);
    let r = copy(&local, &remote, &rgw, &[]);
    assert_eq!(r["report"]["copied"].as_array().unwrap().len(), 4, "{r}");
    let listed = remote.json(&["rp", "list"]);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|rp| rp["id"].as_str().unwrap())
        .collect();
    for id in [&d1, &d2, &s, &f] {
        assert!(ids.contains(&id.as_str()), "{id} in {listed}");
    }
    let first = remote.json(&["rp", "show", &d1]);
    assert_eq!(first["tags"]["tier"], "gold", "{first}");
    let second = remote.json(&["rp", "show", &d2]);
    assert_eq!(second["parent"], d1.as_str(), "{second}");
    // The second disk reads only what changed since the first (copied just before it).
    assert!(r["report"]["slots_kept"].as_u64().unwrap() >= 40, "{r}");
    assert_restores(&remote, &[(&d1, &v1), (&d2, &v2)], (&s, &data), (&f, &tree));

    // Again: nothing to send.
    let again = copy(&local, &remote, &rgw, &[]);
    assert_eq!(again["report"]["already_there"], 4, "{again}");
    assert_eq!(again["report"]["bytes_sent"], 0, "{again}");
    assert_eq!(again["report"]["stored_bytes"], 0, "{again}");

    // A copy killed midway: the rerun sends only what is missing.
    let big = local.path("big.img");
    let vb = pseudo_random(73, 24 << 20);
    std::fs::write(&big, &vb).unwrap();
    let b = rp_of(&local.json(&["block", "backup", big.to_str().unwrap()]));
    let small = Env::s3_with_init_args(&rgw, &["--pack-size", "1MiB"]);
    copy(&local, &small, &rgw, &["--asset", img.to_str().unwrap()]);
    let target = store_of(&small, &rgw);
    let indexed = target.list("index/").unwrap().len();
    let mut child = local
        .command(&[
            "--endpoint-url",
            &rgw,
            "vault",
            "copy",
            "--to",
            small.vault.to_str().unwrap(),
            "--asset",
            big.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while target.list("index/").unwrap().len() < indexed + 2 {
        assert!(Instant::now() < deadline, "the copy never indexed a chunk");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the copy ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let rerun = copy(&local, &small, &rgw, &["--asset", big.to_str().unwrap()]);
    let sent = rerun["report"]["bytes_sent"].as_u64().unwrap();
    assert!(
        sent > 0 && sent < vb.len() as u64 * 9 / 10,
        "the rerun sent only what was missing: {rerun}"
    );
    let out = small.path("big.img");
    small.ok(&["block", "restore", "--rp", &b, out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), vb);

    // RGW → a new local vault: the copy of the copy restores too; prune on one vault leaves
    // the other alone.
    let back = Env::new();
    let mut c = remote.command(&[
        "vault",
        "copy",
        "--to",
        back.vault.to_str().unwrap(),
        "--output-format",
        "json",
    ]);
    let r = Env::json_of(&mut c);
    assert_eq!(r["report"]["copied"].as_array().unwrap().len(), 4, "{r}");
    assert_restores(&back, &[(&d1, &v1), (&d2, &v2)], (&s, &data), (&f, &tree));
    back.ok(&["rp", "delete", &d1]);
    back.ok(&["prune"]);
    assert_restores(&remote, &[(&d1, &v1), (&d2, &v2)], (&s, &data), (&f, &tree));
    remote.ok(&["check", "--read-data"]);
    back.ok(&["check", "--read-data"]);

    // A dry run counts and writes nothing.
    let fresh = Env::new();
    let dry = copy(&local, &fresh, &rgw, &["--dry-run"]);
    assert!(dry["report"]["bytes_sent"].as_u64().unwrap() > 0, "{dry}");
    assert!(
        dry["report"]["requests_estimate"].as_u64().unwrap() >= 5 * 4,
        "{dry}"
    );
    assert_eq!(fresh.json(&["rp", "list"]).as_array().unwrap().len(), 0);
}
