//! Stream backups: stdin of unknown length, bounded memory, byte-exact restore to stdout, tags,
//! content-defined chunking that survives inserts; prune and check know stream RPs.

use std::io::{Read, Write};
use std::process::Stdio;

use elastio_tests::*;
use sha2::{Digest, Sha256};

/// Deterministic JSON lines (compressible, like logs or a topic's messages).
fn json_lines(seed: u64, bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + 200);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut i = 0u64;
    while out.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(
            format!(
                "{{\"seq\":{i},\"user\":\"u{}\",\"amount\":{}.{:02},\"note\":\"event {:x}\"}}\n",
                x % 100_000,
                x % 997,
                x % 100,
                x >> 20
            )
            .as_bytes(),
        );
        i += 1;
    }
    out
}

fn backup_bytes(env: &Env, name: &str, data: &[u8], tags: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "stream",
        "backup",
        "--stream-name",
        name,
        "--output-format",
        "json",
    ];
    for t in tags {
        args.extend(["--tag", t]);
    }
    let mut child = env
        .command(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn restored(env: &Env, rp: &str) -> Vec<u8> {
    let out = env
        .command(&["stream", "restore", "--rp", rp])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
#[allow(unsafe_code)]
fn a_gibibyte_from_a_pipe_with_bounded_memory() {
    let env = Env::new();
    const LEN: u64 = 1 << 30;
    let mut child = env
        .command(&[
            "stream",
            "backup",
            "--stream-name",
            "big",
            "--output-format",
            "json",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut stdin = child.stdin.take().unwrap();
    // The producer hashes what it writes: nothing is kept in memory on either side.
    let writer = std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut written = 0u64;
        let mut seed = 1;
        while written < LEN {
            let block = pseudo_random(seed, 4 << 20);
            seed += 1;
            h.update(&block);
            stdin.write_all(&block).unwrap();
            written += block.len() as u64;
        }
        hex::encode(h.finalize())
    });
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let want = writer.join().unwrap();
    let mut out = Vec::new();
    stdout.read_to_end(&mut out).unwrap();
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 on our own child, not yet reaped.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pointers to live locals.
    assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut ru) }, pid);
    let _ = child.wait(); // already reaped by wait4 (which also gave its peak RSS)
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{err}"
    );
    let rss_mib = ru.ru_maxrss as f64 / 1024.0;
    assert!(
        rss_mib < 300.0,
        "peak RSS {rss_mib:.0} MiB for a 1 GiB stream"
    );
    let report: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(report["rp"]["logical_size"], LEN);
    let rp = report["rp"]["id"].as_str().unwrap().to_string();

    // Restore to stdout, hashed as it arrives.
    let mut child = env
        .command(&["stream", "restore", "--rp", &rp])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n as u64;
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(got, LEN);
    assert_eq!(hex::encode(h.finalize()), want);
}

#[test]
fn an_insert_at_the_start_stores_little_and_tags_filter() {
    let env = Env::new();
    let data = json_lines(1, 100 << 20);
    let first = backup_bytes(&env, "events", &data, &["topic_name=orders", "kind=json"]);
    let mut shifted = b"x".to_vec();
    shifted.extend_from_slice(&data);
    let second = backup_bytes(&env, "events", &shifted, &["topic_name=orders"]);
    let new = second["rp"]["new_bytes_stored"].as_u64().unwrap();
    assert!(
        new as f64 <= 0.01 * shifted.len() as f64,
        "{new} new bytes after a 1-byte insert into {} bytes",
        shifted.len()
    );
    assert_eq!(second["rp"]["parent"], first["rp"]["id"]);
    let rp2 = second["rp"]["id"].as_str().unwrap();
    assert!(restored(&env, rp2) == shifted, "restore differs");
    let rp1 = first["rp"]["id"].as_str().unwrap();
    assert!(restored(&env, rp1) == data);

    // Tags filter, and `rp tag` after the fact.
    let other = backup_bytes(&env, "other", b"hello\n", &["topic_name=payments"]);
    let listed = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["rp", "list"];
        a.extend_from_slice(args);
        env.json(&a)
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        listed(&["--type", "stream", "--tag", "topic_name=orders"]),
        vec![rp1.to_string(), rp2.to_string()]
    );
    assert_eq!(
        listed(&["--type", "stream", "--tag", "kind=json"]),
        vec![rp1.to_string()]
    );
    let other_rp = other["rp"]["id"].as_str().unwrap();
    env.ok(&["rp", "tag", other_rp, "kind=json"]);
    assert_eq!(
        listed(&["--type", "stream", "--tag", "kind=json"]),
        vec![rp1.to_string(), other_rp.to_string()]
    );
    assert!(listed(&["--type", "disk"]).is_empty());

    // Restore to a file, latest by name.
    let out = env.path("events.jsonl");
    env.ok(&[
        "stream",
        "restore",
        "--rp",
        "latest",
        "--stream-name",
        "events",
        "--to-file",
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&out).unwrap() == shifted);

    // Streams survive prune and pass check (their chunks are referenced).
    env.ok(&["prune"]);
    let check = env.run(&["check", "--read-data"]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert!(restored(&env, rp2) == shifted);
    env.ok(&["rp", "delete", rp1]);
    let r = env.json(&["prune"]);
    assert!(r["reclaimable_bytes"].as_u64().unwrap() > 0, "{r:#}");
    assert!(restored(&env, rp2) == shifted);
}

#[test]
fn an_empty_stream_round_trips() {
    let env = Env::new();
    let r = backup_bytes(&env, "empty", b"", &[]);
    assert_eq!(r["rp"]["logical_size"], 0);
    assert!(restored(&env, r["rp"]["id"].as_str().unwrap()).is_empty());
}

#[test]
fn a_stream_rp_mounts_as_one_file() {
    use std::os::unix::fs::FileExt;
    let env = Env::new();
    let data = json_lines(9, 20 << 20);
    let r = backup_bytes(&env, "orders", &data, &[]);
    let rp = r["rp"]["id"].as_str().unwrap().to_string();
    let mnt = env.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let m = env.json(&[
        "mount",
        "latest",
        "--asset",
        "orders",
        mnt.to_str().unwrap(),
    ]);
    assert_eq!(m["rp"], rp.as_str(), "{m}");
    let pid = m["pid"].as_u64().unwrap();
    let result = std::panic::catch_unwind(|| {
        let file = mnt.join("orders");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), data.len() as u64);
        assert!(std::fs::read(&file).unwrap() == data, "whole file differs");
        // Random reads, across chunk boundaries.
        let f = std::fs::File::open(&file).unwrap();
        for (i, off) in [0u64, 1, 1 << 20, 7_654_321, data.len() as u64 - 10]
            .iter()
            .enumerate()
        {
            let mut buf = vec![0u8; 300_000.min(data.len() - *off as usize)];
            f.read_exact_at(&mut buf, *off).unwrap();
            assert!(
                buf == data[*off as usize..*off as usize + buf.len()],
                "read {i} at {off}"
            );
        }
    });
    unmount_and_wait(&env, &mnt, pid);
    result.unwrap();
}
