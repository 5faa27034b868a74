//! EBS volumes and snapshots against the AWS emulator (moto + a faithful EBS direct API, see
//! `xtask/servers/aws-emulator.py`), each test with its own emulator on 127.0.0.1.

use std::path::{Path, PathBuf};

use elastio_tests::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 512 * 1024;

/// A 1 GiB volume image: 20 MiB of data at the start, 3 MiB at 600 MiB, zeros elsewhere.
fn volume_image(env: &Env) -> PathBuf {
    let img = env.path("vol.img");
    sparse_file(&img, 1 << 30);
    write_at(&img, 0, &pseudo_random(1, 20 * MIB as usize));
    write_at(&img, 600 * MIB, &pseudo_random(2, 3 * MIB as usize));
    img
}

/// 512 KiB blocks of `path` that are not all zeros.
fn data_blocks(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap();
    data.chunks(BLOCK as usize)
        .filter(|b| b.iter().any(|x| *x != 0))
        .count() as u64
}

fn rp_id(report: &serde_json::Value) -> String {
    report["rp"]["id"].as_str().expect("rp id").to_string()
}

fn restored(env: &Env, rp: &str, name: &str) -> PathBuf {
    let out = env.path(name);
    env.ok(&["block", "restore", "--rp", rp, out.to_str().unwrap()]);
    out
}

#[test]
fn full_then_incremental_reads_only_changed_blocks() {
    let env = Env::new();
    let emu = AwsEmulator::start();
    let img = volume_image(&env);
    let vol = emu.volume(&img);
    let blocks = data_blocks(&img);
    assert_eq!(blocks, 46);

    // Pages of 100 blocks: the 46 data blocks are listed in one page, the paging is exercised on
    // the incremental below with its own small page.
    let full = emu.json(
        &env,
        &["ebs", "backup", "--volume-id", &vol, "--page-size", "100"],
    );
    assert_eq!(full["incremental"], false);
    assert_eq!(full["blocks_read"], blocks);
    assert_eq!(emu.calls("GetSnapshotBlock"), blocks, "{}", emu.stats());
    assert_eq!(emu.calls("ListSnapshotBlocks"), 1);
    let first_snap = full["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(full["rp"]["tags"]["ebs:snapshot-id"], first_snap.as_str());
    assert_eq!(full["rp"]["asset"]["name"], vol.as_str());
    let full_rp = rp_id(&full);
    assert_eq!(
        sha256_file(&restored(&env, &full_rp, "full.img")),
        sha256_file(&img)
    );

    // Change a few blocks: one rewritten, one new, one zeroed; and 150 new blocks so the changed
    // list spans two pages of 100.
    write_at(&img, 3 * BLOCK + 17, b"changed");
    write_at(&img, 900 * MIB, &pseudo_random(3, 4096));
    write_at(&img, 601 * MIB, &vec![0u8; BLOCK as usize]);
    write_at(&img, 300 * MIB, &pseudo_random(4, 150 * BLOCK as usize));
    emu.reset_stats();
    let inc = emu.json(
        &env,
        &[
            "ebs",
            "backup",
            "--volume-id",
            &vol,
            "--page-size",
            "100",
            "--verify-share",
            "0",
        ],
    );
    assert_eq!(inc["incremental"], true);
    assert_eq!(
        inc["blocks_verified"], 0,
        "no sample asked for: exact call counts"
    );
    assert_eq!(inc["base_snapshot_id"], first_snap.as_str());
    assert_eq!(inc["rp"]["parent"], full_rp.as_str());
    // 153 changed blocks listed; the zeroed one needs no read.
    assert_eq!(inc["blocks_listed"], 153);
    assert_eq!(inc["blocks_read"], 152);
    assert_eq!(emu.calls("GetSnapshotBlock"), 152, "{}", emu.stats());
    assert_eq!(emu.calls("ListChangedBlocks"), 2, "two pages");
    assert_eq!(emu.calls("ListSnapshotBlocks"), 0);
    assert_eq!(inc["deleted_snapshots"], serde_json::json!([first_snap]));
    let inc_rp = rp_id(&inc);
    assert_eq!(
        sha256_file(&restored(&env, &inc_rp, "inc.img")),
        sha256_file(&img)
    );
    // The older RP still restores as it was.
    let before = restored(&env, &full_rp, "full-again.img");
    assert_ne!(sha256_file(&before), sha256_file(&img));

    // The RP is a disk RP like any other: NBD serves it byte-exact.
    let nbd = NbdServer::start(&env, &[&inc_rp], &[]);
    let copy = env.path("nbd.img");
    sh("nbdcopy", &[&nbd.uri(&inc_rp), copy.to_str().unwrap()]);
    assert_eq!(sha256_file(&copy), sha256_file(&img));
}

#[test]
fn a_deleted_base_snapshot_means_a_full_read() {
    let env = Env::new();
    let emu = AwsEmulator::start();
    let img = env.path("small.img");
    sparse_file(&img, 1 << 30);
    write_at(&img, 0, &pseudo_random(5, 2 * MIB as usize));
    let vol = emu.volume(&img);
    let first = emu.json(&env, &["ebs", "backup", "--volume-id", &vol]);
    let snap = first["snapshot_id"].as_str().unwrap();
    let gone = emu.ec2(&format!("Action=DeleteSnapshot&SnapshotId={snap}"));
    assert!(gone.contains("DeleteSnapshotResponse"), "{gone}");
    write_at(&img, 5 * MIB, b"more");
    emu.reset_stats();
    let second = emu.json(&env, &["ebs", "backup", "--volume-id", &vol]);
    assert_eq!(second["incremental"], false);
    assert_eq!(second["blocks_read"], 5);
    assert_eq!(emu.calls("ListChangedBlocks"), 0);
    assert_eq!(
        sha256_file(&restored(&env, &rp_id(&second), "out.img")),
        sha256_file(&img)
    );
}

#[test]
fn restore_to_a_snapshot_and_a_volume() {
    let env = Env::new();
    let emu = AwsEmulator::start();
    let img = volume_image(&env);
    let blocks = data_blocks(&img);
    let rp = rp_id(&env.backup(&img, None));

    emu.reset_stats();
    let r = emu.json(
        &env,
        &[
            "ebs",
            "restore",
            "--rp",
            &rp,
            "--create-volume",
            "--availability-zone",
            "us-east-1a",
            "--volume-type",
            "gp3",
        ],
    );
    // Zero blocks are skipped; the emulator refuses a wrong checksum, length or block count.
    assert_eq!(r["blocks_written"], blocks);
    assert_eq!(emu.calls("PutSnapshotBlock"), blocks);
    assert_eq!(emu.calls("CompleteSnapshot"), 1);
    let snap = r["snapshot_id"].as_str().unwrap().to_string();
    let vol = r["volume_id"].as_str().unwrap().to_string();
    let described = emu.ec2(&format!("Action=DescribeVolumes&VolumeId.1={vol}"));
    assert!(
        described.contains(&snap),
        "volume made from the snapshot: {described}"
    );

    // The snapshot's blocks equal the RP...
    let imported = emu.json(&env, &["ebs", "import-snapshot", "--snapshot-id", &snap]);
    assert_eq!(imported["blocks_read"], blocks);
    assert_eq!(
        sha256_file(&restored(&env, &rp_id(&imported), "snap.img")),
        sha256_file(&img)
    );
    // ...and so does the volume made from it.
    let backed = emu.json(&env, &["ebs", "backup", "--volume-id", &vol]);
    assert_eq!(
        sha256_file(&restored(&env, &rp_id(&backed), "from-volume.img")),
        sha256_file(&img)
    );
}

#[test]
fn throttling_is_retried_and_reported() {
    let env = Env::new();
    let emu = AwsEmulator::start();
    let img = volume_image(&env);
    let vol = emu.volume(&img);
    emu.config(serde_json::json!({"throttle_rate": 0.3}));
    let r = emu.json(&env, &["ebs", "backup", "--volume-id", &vol]);
    let calls = &r["calls"];
    assert!(calls["throttled"].as_u64().unwrap() > 0, "{calls}");
    assert!(calls["retries"].as_u64().unwrap() >= calls["throttled"].as_u64().unwrap());
    assert!(emu.calls("Throttled") > 0);
    let rp = rp_id(&r);

    // Restoring into a new snapshot under the same throttling works too.
    let back = emu.json(&env, &["ebs", "restore", "--rp", &rp]);
    assert!(back["calls"]["throttled"].as_u64().unwrap() > 0, "{back}");
    emu.config(serde_json::json!({"throttle_rate": 0.0}));
    let snap = back["snapshot_id"].as_str().unwrap();
    let imported = emu.json(&env, &["ebs", "import-snapshot", "--snapshot-id", snap]);
    assert_eq!(
        sha256_file(&restored(&env, &rp_id(&imported), "out.img")),
        sha256_file(&img)
    );
}

#[test]
fn a_bad_checksum_is_refetched_then_fails_naming_the_block() {
    let env = Env::new();
    let emu = AwsEmulator::start();
    let img = volume_image(&env);
    let vol = emu.volume(&img);

    // Two bad answers: fetched again, the backup succeeds and counts them.
    emu.config(serde_json::json!({"corrupt_first": 2}));
    let ok = emu.json(&env, &["ebs", "backup", "--volume-id", &vol]);
    assert_eq!(ok["calls"]["checksum_mismatches"], 2);
    let first_snap = ok["snapshot_id"].as_str().unwrap().to_string();

    // Block 5 always bad: the backup fails naming the snapshot and block; no RP, and the
    // snapshot it made is deleted while the previous one stays for the next incremental.
    write_at(&img, 5 * BLOCK, b"new data in block 5");
    emu.config(serde_json::json!({"corrupt_index": 5}));
    let out = emu
        .command(&env, &["ebs", "backup", "--volume-id", &vol])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("block 5 of snapshot snap-"), "{err}");
    assert!(err.contains("checksum"), "{err}");
    let rps = env.json(&["rp", "list"]);
    assert_eq!(rps.as_array().unwrap().len(), 1, "{rps}");
    let snaps = emu.ec2(&format!(
        "Action=DescribeSnapshots&Filter.1.Name=tag:elastio:volume-id&Filter.1.Value.1={vol}"
    ));
    assert_eq!(snaps.matches("<snapshotId>").count(), 1, "{snaps}");
    assert!(snaps.contains(&first_snap));

    emu.config(serde_json::json!({"corrupt_index": null}));
    let again = emu.json(&env, &["ebs", "backup", "--volume-id", &vol]);
    assert_eq!(again["incremental"], true);
    assert_eq!(
        sha256_file(&restored(&env, &rp_id(&again), "out.img")),
        sha256_file(&img)
    );
}

#[test]
fn unknown_volume_is_a_clear_error() {
    let env = Env::new();
    let emu = AwsEmulator::start();
    let out = emu
        .command(
            &env,
            &["ebs", "backup", "--volume-id", "vol-0123456789abcdef0"],
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vol-0123456789abcdef0"), "{err}");
}

/// The text of the first `<tag>...</tag>` in `xml`.
fn xml_field(xml: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"))
        + open.len();
    let end = xml[start..].find('<').unwrap() + start;
    xml[start..end].to_string()
}

#[test]
fn ec2_instance_with_three_volumes_backs_up_and_relaunches() {
    let env = Env::new();
    let emu = AwsEmulator::start();
    let run = emu.ec2(
        "Action=RunInstances&ImageId=ami-12c6146b&MinCount=1&MaxCount=1&InstanceType=t3.micro\
         &Placement.AvailabilityZone=us-east-1a&TagSpecification.1.ResourceType=instance\
         &TagSpecification.1.Tag.1.Key=Name&TagSpecification.1.Tag.1.Value=web-1",
    );
    let instance = xml_field(&run, "instanceId");
    let root_vol = xml_field(&run, "volumeId");
    let root_img = env.path("root.img");
    sparse_file(&root_img, 64 * MIB);
    write_at(&root_img, 0, &pseudo_random(10, 8 * MIB as usize));
    let body = serde_json::json!({"volume_id": root_vol, "image": root_img});
    let out = std::process::Command::new("curl")
        .args([
            "-sf",
            "-d",
            &body.to_string(),
            &format!("{}/_emulator/volumes", emu.url),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut images = vec![("/dev/sda1".to_string(), root_vol.clone(), root_img)];
    for (i, dev) in ["/dev/sdf", "/dev/sdg"].iter().enumerate() {
        let img = env.path(&format!("data{i}.img"));
        sparse_file(&img, 1 << 30);
        write_at(
            &img,
            (i as u64 + 1) * 100 * MIB,
            &pseudo_random(20 + i as u64, 5 * MIB as usize),
        );
        let vol = emu.volume(&img);
        let attached = emu.ec2(&format!(
            "Action=AttachVolume&VolumeId={vol}&InstanceId={instance}&Device={dev}"
        ));
        assert!(
            attached.contains("attaching") || attached.contains("attached"),
            "{attached}"
        );
        images.push((dev.to_string(), vol, img));
    }

    let b = emu.json(&env, &["ec2", "backup", "--instance-id", &instance]);
    assert_eq!(b["rp"]["kind"], "instance");
    let rec = &b["rp"]["instance"];
    assert_eq!(rec["instance_type"], "t3.micro");
    assert_eq!(rec["availability_zone"], "us-east-1a");
    assert_eq!(rec["tags"]["Name"], "web-1");
    let vols = rec["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 3, "{rec}");
    // One snapshot set: every volume RP comes from its own snapshot of the same CreateSnapshots.
    assert_eq!(
        emu.calls("GetSnapshotBlock"),
        16 + 10 + 10,
        "{}",
        emu.stats()
    );
    let mut roots = std::collections::BTreeMap::new();
    for (dev, vol, img) in &images {
        let v = vols
            .iter()
            .find(|v| v["device_name"] == dev.as_str())
            .unwrap_or_else(|| panic!("no {dev} in {rec}"));
        assert_eq!(v["volume_id"], vol.as_str());
        let rp = v["rp"].as_str().unwrap();
        let shown = env.json(&["rp", "show", rp]);
        assert_eq!(shown["tags"]["ec2:instance-id"], instance.as_str());
        assert_eq!(shown["tags"]["ec2:device"], dev.as_str());
        roots.insert(dev.clone(), shown["disk"]["root"].clone());
        // Each volume RP restores to its volume's data (the root volume is 8 GiB: compare the
        // image's part).
        if dev == "/dev/sdf" {
            assert_eq!(
                sha256_file(&restored(&env, rp, "sdf.img")),
                sha256_file(img)
            );
        }
    }

    let r = emu.json(&env, &["ec2", "restore", "--rp", &rp_id(&b), "--launch"]);
    let new_instance = r["instance_id"].as_str().unwrap().to_string();
    assert_ne!(new_instance, instance);
    let described = emu.ec2(&format!(
        "Action=DescribeInstances&InstanceId.1={new_instance}"
    ));
    assert!(described.contains("<name>running</name>"), "{described}");
    let restored_vols = r["volumes"].as_array().unwrap();
    assert_eq!(restored_vols.len(), 3);
    for v in restored_vols {
        let new_vol = v["volume_id"].as_str().unwrap();
        let dev = v["device"].as_str().unwrap();
        assert!(
            described.contains(new_vol),
            "{new_vol} attached to {new_instance}: {described}"
        );
        // Same data: a backup of the new volume has the same map root (chunk ids are content
        // hashes, so equal roots mean equal disks).
        let again = emu.json(&env, &["ebs", "backup", "--volume-id", new_vol]);
        assert_eq!(again["rp"]["disk"]["root"], roots[dev], "{dev}");
    }
}

#[test]
fn files_of_an_ebs_volume_are_browsable_through_fuse() {
    let env = Env::new();
    let emu = AwsEmulator::start();
    let tree = rich_tree(&env, 3 << 20);
    let img = ext4_image_of(&env, "ext4.img", 1 << 30, &tree);
    let vol = emu.volume(&img);
    let b = emu.json(&env, &["ebs", "backup", "--volume-id", &vol]);
    let rp = rp_id(&b);
    let mnt = env.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let m = env.json(&["mount", "latest", "--asset", &vol, mnt.to_str().unwrap()]);
    assert_eq!(m["rp"], rp.as_str(), "{m}");
    let pid = m["pid"].as_u64().unwrap();
    let same = std::panic::catch_unwind(|| {
        assert_same_tree(&mnt.join("fs"), &tree);
        assert_eq!(sha256_file(&mnt.join("disk.img")), sha256_file(&img));
    });
    unmount_and_wait(&env, &mnt, pid);
    same.unwrap();
}

/// A writer appending to a file on `dir` with an fsync per write, recording the longest wait
/// of one write and the writes done, until told to stop.
struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stats: std::sync::Arc<std::sync::Mutex<(std::time::Duration, u64, std::time::Instant)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(dir: &Path) -> Writer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stats = std::sync::Arc::new(std::sync::Mutex::new((
            std::time::Duration::ZERO,
            0u64,
            std::time::Instant::now(),
        )));
        let (s, st, path) = (stop.clone(), stats.clone(), dir.join("log"));
        let thread = std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(&path).unwrap();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let t = std::time::Instant::now();
                f.write_all(&[7u8; 4096]).unwrap();
                f.sync_data().unwrap();
                let mut g = st.lock().unwrap();
                g.0 = g.0.max(t.elapsed());
                g.1 += 1;
                g.2 = std::time::Instant::now();
                drop(g);
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        Writer {
            stop,
            stats,
            thread: Some(thread),
        }
    }
    /// (longest wait, writes, since the last write).
    fn stats(&self) -> (std::time::Duration, u64, std::time::Duration) {
        let g = self.stats.lock().unwrap();
        (g.0, g.1, g.2.elapsed())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Thaws and unmounts `mnt` whatever the test did.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let m = self.0.to_str().unwrap();
        // Not frozen (EINVAL) is the usual case: say nothing.
        let _ = std::process::Command::new("fsfreeze")
            .args(["-u", m])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::process::Command::new("umount").arg(m).status();
    }
}

/// An instance of the emulator whose root volume reads `image` and for which its IMDS answers
/// (the machine elastio runs on, for `--self`): (instance id, volume id).
fn own_instance(emu: &AwsEmulator, image: &Path) -> (String, String) {
    let run = emu.ec2(
        "Action=RunInstances&ImageId=ami-12c6146b&MinCount=1&MaxCount=1&InstanceType=t3.micro\
         &Placement.AvailabilityZone=us-east-1a",
    );
    let instance = xml_field(&run, "instanceId");
    let vol = xml_field(&run, "volumeId");
    let body = serde_json::json!({"volume_id": vol, "image": image});
    let out = std::process::Command::new("curl")
        .args([
            "-sf",
            "-d",
            &body.to_string(),
            &format!("{}/_emulator/volumes", emu.url),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    emu.config(serde_json::json!({"imds_instance_id": instance, "imds_region": "us-east-1"}));
    (instance, vol)
}

fn snapshots_in(emu: &AwsEmulator) -> usize {
    emu.ec2("Action=DescribeSnapshots&Owner.1=self")
        .matches("<snapshotId>")
        .count()
}

#[test]
fn ec2_self_backup_with_a_freeze_and_hooks() {
    if !is_root() {
        eprintln!("skipped: needs root (a loop-mounted file system to freeze)");
        return;
    }
    let env = Env::new();
    let emu = AwsEmulator::start();
    let root_img = env.path("root.img");
    sparse_file(&root_img, 64 * MIB);
    write_at(&root_img, 0, &pseudo_random(30, 4 * MIB as usize));
    let (instance, _) = own_instance(&emu, &root_img);
    // The file system to freeze: a loop-mounted ext4 with a writer on it.
    let img = ext4_image(&env, "data.img", 64 * MIB);
    let mnt = env.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(
        "mount",
        &["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
    );
    let _mounted = Mounted(mnt.clone());
    let writer = Writer::start(&mnt);
    let m = mnt.to_str().unwrap();
    let self_backup = |extra: &[&str]| {
        let mut args = vec!["ec2", "backup", "--self", "--freeze", m];
        args.extend_from_slice(extra);
        let mut c = emu.command(&env, &args);
        // The instance and its region come from the emulator's IMDS.
        c.env_remove("AWS_REGION")
            .env_remove("AWS_EC2_METADATA_DISABLED")
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &emu.url);
        c
    };

    // CreateSnapshots takes 400 ms here: the writer waits that long, then carries on.
    emu.config(serde_json::json!({"latency_ms": 400}));
    let marker = env.path("hooks");
    let pre = format!("echo pre >> {}", marker.display());
    let post = format!("echo post >> {}", marker.display());
    let before = writer.stats().1;
    let mut c = self_backup(&[
        "--pre-cmd",
        &pre,
        "--post-cmd",
        &post,
        "--output-format",
        "json",
    ]);
    let b = Env::json_of(&mut c);
    assert_eq!(b["rp"]["asset"]["name"], instance.as_str());
    assert_eq!(b["volumes"].as_array().unwrap().len(), 1);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "pre\npost\n");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (longest, writes, _) = writer.stats();
    assert!(
        longest >= std::time::Duration::from_millis(300),
        "the writer never waited: {longest:?}"
    );
    assert!(
        longest < std::time::Duration::from_secs(5),
        "the freeze lasted {longest:?}"
    );
    assert!(
        writes > before + 5,
        "the writer resumed ({before} -> {writes})"
    );
    assert!(emu.calls("IMDS") >= 2, "{}", emu.stats());

    // A failing pre-command: no snapshot, nothing frozen, the post-command still runs.
    let snaps = snapshots_in(&emu);
    let out = self_backup(&["--pre-cmd", "echo flushing; exit 3", "--post-cmd", &post])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--pre-cmd") && err.contains("exit status: 3"),
        "{err}"
    );
    assert_eq!(snapshots_in(&emu), snaps, "no snapshot was made");
    assert!(std::fs::read_to_string(&marker)
        .unwrap()
        .ends_with("post\npost\n"));
    std::fs::write(mnt.join("after-pre"), b"not frozen").unwrap();

    // A freeze that outlasts its timeout: the watchdog thaws, the backup fails and removes
    // its snapshots.
    emu.config(serde_json::json!({"latency_ms": 1500}));
    let out = self_backup(&["--freeze-timeout", "0.3"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outlasted its timeout"), "{err}");
    assert_eq!(
        snapshots_in(&emu),
        snaps,
        "the inconsistent snapshots were deleted"
    );

    // elastio killed mid-freeze: its watchdog thaws at once (not at the 60 s timeout).
    let mut child = self_backup(&["--freeze-timeout", "60"]).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while writer.stats().2 < std::time::Duration::from_millis(500) {
        assert!(
            std::time::Instant::now() < deadline,
            "the freeze never came"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = std::time::Instant::now();
    while writer.stats().2 > std::time::Duration::from_millis(100) {
        assert!(
            killed.elapsed() < std::time::Duration::from_secs(3),
            "still frozen after the kill"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_lying_changed_block_list_is_caught_by_sampled_verification() {
    let env = Env::new();
    let emu = AwsEmulator::start();
    let img = volume_image(&env);
    let vol = emu.volume(&img);
    let first = emu.json(&env, &["ebs", "backup", "--volume-id", &vol]);
    // Two blocks change; EBS "forgets" to list the second.
    write_at(&img, 2 * BLOCK + 100, b"changed");
    write_at(&img, 5 * BLOCK + 100, b"changed too");
    emu.config(serde_json::json!({"hide_changed": 5}));
    let mut c = emu.command(
        &env,
        &[
            "ebs",
            "backup",
            "--volume-id",
            &vol,
            "--verify-share",
            "100",
        ],
    );
    let out = c.output().unwrap();
    assert!(!out.status.success(), "the lie went unnoticed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("EBS block 5 of snapshot") && err.contains(&rp_id(&first)),
        "{err}"
    );
    // By option, the backup starts over as a full read and is right.
    let full = emu.json(
        &env,
        &[
            "ebs",
            "backup",
            "--volume-id",
            &vol,
            "--verify-share",
            "100",
            "--on-mismatch",
            "full-read",
        ],
    );
    assert!(
        full["fell_back_to_full_read"]
            .as_str()
            .unwrap()
            .contains("EBS block 5"),
        "{full}"
    );
    assert_eq!(full["incremental"], false);
    assert_eq!(
        sha256_file(&restored(&env, &rp_id(&full), "f.img")),
        sha256_file(&img)
    );
    // Without the lie, the default sample (1 %) passes and is counted.
    emu.config(serde_json::json!({"hide_changed": null}));
    let ok = emu.json(
        &env,
        &["ebs", "backup", "--volume-id", &vol, "--verify-share", "50"],
    );
    assert_eq!(ok["incremental"], true);
    let verified = ok["blocks_verified"].as_u64().unwrap();
    assert!(
        verified > 500 && verified < 1600,
        "about half of 2046 unchanged blocks: {verified}"
    );
    let restored = restored(&env, &rp_id(&ok), "r.img");
    assert_eq!(sha256_file(&restored), sha256_file(&img));
}

/// Pseudo-random files `name0..` of `each` bytes under `dir`, `count` of them.
fn fill_files(dir: &Path, seed: u64, count: usize, each: usize) {
    for i in 0..count {
        std::fs::write(
            dir.join(format!("f{i}")),
            pseudo_random(seed + i as u64, each),
        )
        .unwrap();
    }
}

/// Bytes a mounted file system holds (its blocks minus its free blocks).
fn used_bytes(mnt: &Path) -> u64 {
    let out = sh("stat", &["-f", "-c", "%S %b %f", mnt.to_str().unwrap()]);
    let v: Vec<u64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    v[0] * (v[1] - v[2])
}

/// Copies bytes `start..start+len` of `from` into a new file `to`.
fn extract(from: &Path, start: u64, len: u64, to: &Path) {
    use std::io::{Read, Seek};
    let mut f = std::fs::File::open(from).unwrap();
    f.seek(std::io::SeekFrom::Start(start)).unwrap();
    let mut out = std::fs::File::create(to).unwrap();
    std::io::copy(&mut f.take(len), &mut out).unwrap();
}

/// Loop devices over parts of a file, detached when dropped.
struct Loop(String);

impl Loop {
    fn over(file: &Path, offset: u64, len: u64) -> Loop {
        let dev = sh(
            "losetup",
            &[
                "-f",
                "--show",
                "-o",
                &offset.to_string(),
                "--sizelimit",
                &len.to_string(),
                file.to_str().unwrap(),
            ],
        );
        Loop(dev.trim().to_string())
    }

    /// (major, minor).
    fn numbers(&self) -> (u64, u64) {
        let out = sh("stat", &["-c", "%t %T", &self.0]);
        let v: Vec<u64> = out
            .split_whitespace()
            .map(|x| u64::from_str_radix(x, 16).unwrap())
            .collect();
        (v[0], v[1])
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

#[test]
fn ec2_self_backup_skips_what_the_frozen_file_systems_report_free() {
    if !is_root() {
        eprintln!("skipped: needs root (loop-mounted file systems to freeze)");
        return;
    }
    let env = Env::new();
    let emu = AwsEmulator::start();
    // The instance's volume holds two partitions: XFS at 1 MiB, ext4 at 330 MiB. Each is a
    // loop device over its part of the volume's image, as a partition is over its disk.
    let img = env.path("volume.img");
    sparse_file(&img, 512 * MIB);
    let parts = [(MIB, 320 * MIB), (330 * MIB, 128 * MIB)];
    let p1 = Loop::over(&img, parts[0].0, parts[0].1);
    let p2 = Loop::over(&img, parts[1].0, parts[1].1);
    sh("mkfs.xfs", &["-q", "-f", &p1.0]);
    sh("mkfs.ext4", &["-q", "-F", &p2.0]);
    let (m1, m2) = (env.path("xfs"), env.path("ext4"));
    let mut mounted = Vec::new();
    for (dev, m) in [(&p1.0, &m1), (&p2.0, &m2)] {
        std::fs::create_dir_all(m).unwrap();
        sh("mount", &[dev.as_str(), m.to_str().unwrap()]);
        mounted.push(Mounted(m.clone()));
    }
    // Files, a third of them deleted: their bytes stay behind in free space.
    fill_files(&m1, 100, 24, 5 * MIB as usize);
    fill_files(&m2, 200, 12, 5 * MIB as usize);
    sh("sync", &[]);
    for (m, n) in [(&m1, 24), (&m2, 12)] {
        for i in (0..n).step_by(3) {
            std::fs::remove_file(m.join(format!("f{i}"))).unwrap();
        }
    }
    sh("sync", &[]);
    let deleted = (8 + 4) * 5 * MIB;
    let used = used_bytes(&m1) + used_bytes(&m2);
    let (_, vol) = own_instance(&emu, &img);
    // The NVMe view of the instance: both loop devices are partitions of the EBS volume's
    // disk, whose serial number names the volume (as sysfs shows it on a Nitro instance).
    let sys = env.path("sys");
    let disk = sys.join("devices/pci0000:00/nvme/nvme1/nvme1n1");
    std::fs::create_dir_all(disk.join("device")).unwrap();
    std::fs::write(disk.join("device/serial"), vol.replace('-', "")).unwrap();
    std::fs::write(disk.join("size"), format!("{}\n", 8u64 << 21)).unwrap();
    std::fs::create_dir_all(sys.join("dev/block")).unwrap();
    for (k, (p, (start, len))) in [(&p1, parts[0]), (&p2, parts[1])].into_iter().enumerate() {
        let dir = disk.join(format!("nvme1n1p{}", k + 1));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("partition"), format!("{}\n", k + 1)).unwrap();
        std::fs::write(dir.join("start"), format!("{}\n", start / 512)).unwrap();
        std::fs::write(dir.join("size"), format!("{}\n", len / 512)).unwrap();
        let (maj, min) = p.numbers();
        std::os::unix::fs::symlink(&dir, sys.join(format!("dev/block/{maj}:{min}"))).unwrap();
    }
    let self_backup = |env: &Env, extra: &[&str]| {
        let mut args = vec!["ec2", "backup", "--self"];
        args.extend_from_slice(extra);
        args.extend(["--output-format", "json"]);
        let mut c = emu.command(env, &args);
        c.env_remove("AWS_REGION")
            .env_remove("AWS_EC2_METADATA_DISABLED")
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &emu.url)
            .env("ELASTIO_SYSFS", &sys);
        Env::json_of(&mut c)
    };
    let (s1, s2) = (m1.to_str().unwrap(), m2.to_str().unwrap());

    // The same instance into a second vault without --skip-free: every written block is read.
    let plain = Env::new();
    let full = self_backup(&plain, &["--freeze", s1, "--freeze", s2]);
    let full = &full["volumes"][0];
    assert_eq!(full["blocks_free"], 0);

    let b = self_backup(&env, &["--freeze", s1, "--freeze", s2, "--skip-free"]);
    let v = &b["volumes"][0];
    let (read, free) = (
        v["blocks_read"].as_u64().unwrap(),
        v["blocks_free"].as_u64().unwrap(),
    );
    eprintln!(
        "listed {}, read {read}, free {free} blocks; {used} bytes in use, {deleted} deleted",
        v["blocks_listed"]
    );
    assert_eq!(v["blocks_listed"], full["blocks_listed"]);
    assert_eq!(
        read + free,
        full["blocks_read"].as_u64().unwrap(),
        "every listed block was read or skipped as free: {v}"
    );
    assert!(
        free * BLOCK >= deleted * 8 / 10,
        "the deleted files' {deleted} bytes were mostly skipped: {free} blocks"
    );
    assert!(
        read * BLOCK <= used + 8 * MIB,
        "read {read} blocks for {used} bytes in use"
    );
    assert!(
        v["rp"]["new_bytes_stored"].as_u64().unwrap()
            < full["rp"]["new_bytes_stored"].as_u64().unwrap(),
        "less stored"
    );

    // The restored volume: each file system mounts (XFS replays the log a freeze leaves),
    // holds every file, and then checks clean.
    let back = restored(&env, v["rp"]["id"].as_str().unwrap(), "back.img");
    for (k, (live, opts, n, seed)) in [(&m1, "loop,nouuid", 24, 100), (&m2, "loop", 12, 200)]
        .into_iter()
        .enumerate()
    {
        let part = env.path(&format!("back-p{k}.img"));
        extract(&back, parts[k].0, parts[k].1, &part);
        let m = env.path(&format!("check-{k}"));
        std::fs::create_dir_all(&m).unwrap();
        sh(
            "mount",
            &["-o", opts, part.to_str().unwrap(), m.to_str().unwrap()],
        );
        let unmount = Mounted(m.clone());
        for i in 0..n {
            let name = format!("f{i}");
            assert_eq!(m.join(&name).exists(), i % 3 != 0, "{name}");
            if i % 3 != 0 {
                assert_eq!(
                    std::fs::read(m.join(&name)).unwrap(),
                    pseudo_random(seed + i as u64, 5 * MIB as usize),
                    "{name} of {}",
                    live.display()
                );
            }
        }
        drop(unmount);
        match k {
            0 => sh("xfs_repair", &["-n", "-f", part.to_str().unwrap()]),
            _ => sh("e2fsck", &["-fn", part.to_str().unwrap()]),
        };
    }
    assert!(v["rp"]["tags"]["ebs:free-skipped"].is_string(), "{v}");

    // An incremental on top, every unlisted block verified: the blocks the parent skipped are
    // free now too, so none of them is taken for a lie.
    let inc = self_backup(
        &env,
        &[
            "--freeze",
            s1,
            "--freeze",
            s2,
            "--skip-free",
            "--verify-share",
            "100",
        ],
    );
    let inc = &inc["volumes"][0];
    assert!(inc["base_snapshot_id"].is_string(), "incremental: {inc}");
    assert!(inc["blocks_verified"].as_u64().unwrap() > 0, "{inc}");
    assert!(inc["rp"]["tags"]["ebs:free-skipped"].is_string(), "{inc}");

    // Then, unmounted, a plain incremental: it reads the stale bytes its parents hold as zeros,
    // and the RP is the volume byte for byte.
    drop(mounted);
    let mut c = emu.command(
        &env,
        &[
            "ebs",
            "backup",
            "--volume-id",
            &vol,
            "--verify-share",
            "100",
            "--output-format",
            "json",
        ],
    );
    let last = Env::json_of(&mut c);
    assert!(last["base_snapshot_id"].is_string(), "incremental: {last}");
    assert!(
        last["blocks_read"].as_u64().unwrap() >= free * 9 / 10,
        "the {free} skipped blocks were read: {last}"
    );
    assert!(last["rp"]["tags"]["ebs:free-skipped"].is_null(), "{last}");
    let whole = restored(&env, last["rp"]["id"].as_str().unwrap(), "whole.img");
    let head = env.path("whole-head.img");
    extract(&whole, 0, 512 * MIB, &head);
    assert_eq!(
        sha256_file(&head),
        sha256_file(&img),
        "the volume, byte for byte"
    );
}
