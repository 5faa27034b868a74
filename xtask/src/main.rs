//! `cargo xtask test|demo|bench|deps|fuzz`: the project's entry points (see README.md).

mod bench;
mod fuzz;
mod kafka_e2e;
pub mod servers;
mod util;

use anyhow::{bail, Context, Result};

use util::{cargo, ensure_tools, root_dir, run_cmd};

const USAGE: &str = "\
usage: cargo xtask <command>
  test    install missing test tools (as root), check formatting, clippy -D warnings, all tests, docs,
          every fuzz target for 10 s (ELASTIO_FUZZ_SECONDS)
  demo    back up a small ext4 image into a local vault, list it, restore it and verify it
  bench [s3|stream|files|index|prune|ebs|fuse|filesystems|live|copy|iscan]  time elastio against restic, borg
          and the kernel on the same images (release build); one section with its name
  deps    install the test tools and the benchmark peers (restic, borg) from apt
  servers start the S3 test servers (Ceph RGW, moto) and print their environment
  fuzz [--seconds N] [target...]  run the cargo-fuzz targets under fuzz/ (all by default) for
             N seconds each (default 60; nightly, installs cargo-fuzz), fail on any crash
  e2e-kafka  the Kafka scenario against tansu, a real Kafka-compatible broker (builds it once,
             ~40 min, into target/tools/)";

/// Commands the tests run, and the Debian package that provides each.
pub const TEST_TOOLS: &[(&str, &str)] = &[
    ("mkfs.ext4", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("losetup", "mount"),
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("nbdfuse", "libnbd-bin"),
    ("qemu-img", "qemu-utils"),
    ("qemu-io", "qemu-utils"),
    // NBD exports of qcow2 images with dirty bitmaps, and pull-mode backups (issue 19)
    ("qemu-nbd", "qemu-utils"),
    ("qemu-storage-daemon", "qemu-utils"),
    ("xfs_io", "xfsprogs"),
    ("xfs_repair", "xfsprogs"),
    ("dumpe2fs", "e2fsprogs"),
    ("fusermount3", "fuse3"),
    ("sfdisk", "fdisk"),
    // TLS test certificates for the NBD server
    ("openssl", "openssl"),
    // the file system type of `mount --kernel`
    ("blkid", "util-linux"),
    // file systems inside disk RPs, made by their own tools (issue 18)
    ("mkfs.xfs", "xfsprogs"),
    ("mkswap", "util-linux"),
    ("debugfs", "e2fsprogs"),
    ("pvcreate", "lvm2"),
    ("vgcfgrestore", "lvm2"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    ("mkntfs", "ntfs-3g"),
    ("ntfs-3g", "ntfs-3g"),
    ("mkfs.btrfs", "btrfs-progs"),
    ("btrfs", "btrfs-progs"),
    ("filefrag", "e2fsprogs"),
    // integrity scans (issue 21): benign changes made with real tools
    ("cjpeg", "libjpeg-turbo-progs"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
    ("gzip", "gzip"),
];

/// Benchmark peers.
pub const BENCH_TOOLS: &[(&str, &str)] = &[
    ("restic", "restic"),
    ("borg", "borgbackup"),
    ("nbdkit", "nbdkit"),
];

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("demo") => demo(),
        Some("e2e-kafka") => kafka_e2e::run(),
        Some("bench") => bench::run(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("deps") => {
            ensure_tools(TEST_TOOLS)?;
            ensure_tools(servers::SERVER_TOOLS)?;
            ensure_tools(BENCH_TOOLS)
        }
        Some("servers") => {
            // Start the S3 servers and keep them up (for running single tests by hand).
            let s = servers::start(&root_dir())?;
            for (k, v) in servers::client_env(&s) {
                println!("export {k}={v}");
            }
            println!("# Ctrl-C stops them");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        Some("-h") | Some("--help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

fn test() -> Result<()> {
    let started = std::time::Instant::now();
    ensure_tools(TEST_TOOLS)?;
    cargo(&["fmt", "--all", "--", "--check"], &[])?;
    cargo(
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    // The end-to-end tests drive the real binary, against local vaults and real S3 servers.
    cargo(&["build", "--locked", "-p", "elastio-cli"], &[])?;
    let servers = servers::start(&root_dir())?;
    let env = servers::client_env(&servers);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // The AWS emulator's own semantics first: the EBS tests rely on them.
    let emulator_tests = root_dir().join("xtask/servers/test_aws_emulator.py");
    run_cmd(
        servers.python.to_str().context("venv path is not UTF-8")?,
        &[emulator_tests.to_str().context("path is not UTF-8")?],
        &[],
    )?;
    cargo(&["test", "--workspace", "--locked"], &env)?;
    drop(servers);
    cargo(
        &["doc", "--workspace", "--no-deps", "--locked"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    )?;
    // Every fuzz target briefly (the crafted inputs found so far are replayed above, as
    // ordinary tests on stable); ELASTIO_FUZZ_SECONDS=0 skips this step.
    let seconds = std::env::var("ELASTIO_FUZZ_SECONDS").unwrap_or_else(|_| "10".into());
    if seconds != "0" {
        fuzz::run(&["--seconds".to_string(), seconds])?;
    }
    println!(
        "xtask test: all green in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn demo() -> Result<()> {
    ensure_tools(&[("mkfs.ext4", "e2fsprogs")])?;
    cargo(&["build", "--locked", "-p", "elastio-cli"], &[])?;
    let root = root_dir();
    let elastio = root.join("target/debug/elastio");
    let work = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let image = work.join("disk.img");
    let restored = work.join("restored.img");
    let vault = work.join("vault");
    let envs = [
        ("ELASTIO_VAULT", vault.to_str().unwrap()),
        ("ELASTIO_PASSWORD", "demo password"),
    ];

    println!("==> making a 64 MiB ext4 image from fixtures/tree with mkfs.ext4 -d");
    std::fs::File::create(&image)?.set_len(64 << 20)?;
    util::run_cmd(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            root.join("fixtures/tree").to_str().unwrap(),
            image.to_str().unwrap(),
        ],
        &[],
    )?;
    let e = |args: &[&str]| util::run_cmd(elastio.to_str().unwrap(), args, &envs);
    println!("==> elastio vault init");
    e(&["vault", "init"])?;
    println!("==> elastio block backup (full)");
    e(&[
        "block",
        "backup",
        image.to_str().unwrap(),
        "--tag",
        "demo=yes",
    ])?;
    println!("==> elastio block backup (again: nothing new to store)");
    e(&["block", "backup", image.to_str().unwrap()])?;
    println!("==> elastio rp list");
    e(&["rp", "list"])?;
    println!("==> elastio block restore --rp latest");
    e(&[
        "block",
        "restore",
        "--rp",
        "latest",
        restored.to_str().unwrap(),
    ])?;
    let (a, b) = (util::sha256(&image)?, util::sha256(&restored)?);
    println!("source   sha256 {a}\nrestored sha256 {b}");
    if a != b {
        bail!("the restored image differs from the source");
    }
    println!(
        "demo OK: the restored image is byte-identical (files under {})",
        work.display()
    );
    Ok(())
}
