//! End-to-end: `elastio nbd serve` against real NBD clients (libnbd's nbdinfo, nbdcopy, nbdfuse;
//! qemu-img, qemu-io) and against a raw socket client that misbehaves on purpose.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use elastio_tests::*;

/// An ext4 image made from the fixture tree (mostly holes), backed up; returns (image, rp id).
fn ext4_rp(env: &Env) -> (PathBuf, String) {
    let img = ext4_image(env, "ext4.img", 48 << 20);
    let rp = env.backup(&img, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    (img, rp)
}

#[test]
fn real_clients_read_the_rp_byte_exact() {
    let env = Env::new();
    let (img, rp) = ext4_rp(&env);
    let server = NbdServer::start(&env, &[&rp], &[]);
    let uri = server.uri(&rp);

    let list = sh("nbdinfo", &["--list", &format!("nbd://{}", server.addr)]);
    assert!(list.contains(&rp), "{list}");
    assert!(list.contains("base:allocation"), "{list}");
    assert!(list.contains("is_read_only: true"), "{list}");
    assert!(list.contains("block_size_preferred: 131072"), "{list}");

    let map = sh("nbdinfo", &["--map", &uri]);
    assert!(map.contains("hole,zero") && map.contains("data"), "{map}");

    let copy = env.path("copy.img");
    sh("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    assert_eq!(
        sha256_file(&copy),
        sha256_file(&img),
        "nbdcopy is byte-exact"
    );

    qemu_compare(&uri, &img);

    // Random reads with qemu-io, checked against the image: a pattern check where the image is
    // zero, and a byte-exact check of a data region read through a second client.
    let data = std::fs::read(&img).unwrap();
    let mut cmds = Vec::new();
    for i in 0..50u64 {
        let off = (i * 7_919 * 4096) % (data.len() as u64 - 65536);
        cmds.push(format!("read {off} 4096"));
    }
    let zero_at = (40u64 << 20) + 12345;
    assert!(data[zero_at as usize..zero_at as usize + 4096]
        .iter()
        .all(|b| *b == 0));
    cmds.push(format!("read -P 0 {zero_at} 4096"));
    let mut args = vec!["-r".to_string(), "-f".into(), "raw".into()];
    for c in &cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(uri.clone());
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "{text}"
    );
    assert_eq!(text.matches("read 4096/4096 bytes").count(), 51, "{text}");

    // The asset name is an alias for the RP.
    let alias = std::fs::canonicalize(&img).unwrap();
    let out = sh(
        "nbdinfo",
        &[
            "--size",
            &format!("nbd://{}/{}", server.addr, alias.display()),
        ],
    );
    assert_eq!(out.trim(), (48u64 << 20).to_string());
}

/// The kernel here has no nbd module: attach through nbdfuse and a loop device, mount the ext4 file
/// system and compare a file with the fixture.
#[test]
fn nbdfuse_and_loop_mount_show_the_files() {
    assert!(
        is_root(),
        "this test needs root for mount; run the suite as root (CI does)"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: FUSE is needed for nbdfuse"
    );
    let env = Env::new();
    let (_, rp) = ext4_rp(&env);
    let server = NbdServer::start(&env, &[&rp], &[]);
    let fuse_dir = env.path("fuse");
    let mnt = env.path("mnt");
    std::fs::create_dir(&fuse_dir).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let disk = fuse_dir.join("disk");
    let mut nbdfuse = Command::new("nbdfuse")
        .args(["--readonly", disk.to_str().unwrap(), &server.uri(&rp)])
        .spawn()
        .expect("nbdfuse");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !disk.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "nbdfuse did not attach"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mounted = Command::new("mount")
        .args([
            "-o",
            "loop,ro,noload",
            disk.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    let check = std::panic::catch_unwind(|| {
        assert!(mounted.success(), "loop mount of the NBD disk failed");
        let fixture = fixture_tree();
        for f in [
            "home/alice/docs/notes.md",
            "home/alice/blob.bin",
            "var/log/app.log",
        ] {
            assert_eq!(
                std::fs::read(mnt.join(f)).unwrap(),
                std::fs::read(fixture.join(f)).unwrap(),
                "{f} through NBD"
            );
        }
        assert_eq!(
            std::fs::read_link(mnt.join("home/alice/app.conf")).unwrap(),
            Path::new("../../etc/app.conf")
        );
    });
    let _ = Command::new("umount").arg(&mnt).status();
    let _ = Command::new("fusermount3")
        .arg("-u")
        .arg(&fuse_dir)
        .status();
    let _ = nbdfuse.wait();
    check.unwrap();
}

/// A minimal client speaking the fixed newstyle handshake with NBD_OPT_GO and simple replies.
struct RawClient(TcpStream);

impl RawClient {
    fn connect(addr: &str) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = RawClient(s);
        let mut greeting = [0u8; 18];
        c.0.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        c
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }

    /// Reads one option reply: (reply type, data).
    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.0.read_exact(&mut d).unwrap();
        (kind, d)
    }

    /// Client flags, then NBD_OPT_GO for `export`; returns the export size.
    fn go(addr: &str, export: &str) -> (Self, u64) {
        let mut c = Self::connect(addr);
        c.0.write_all(&3u32.to_be_bytes()).unwrap();
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        c.send_option(7, &d);
        let mut size = 0;
        loop {
            let (kind, data) = c.option_reply();
            match kind {
                3 if data[..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap())
                }
                3 => {}
                1 => break,
                other => panic!(
                    "unexpected option reply {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
        (c, size)
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32) {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        self.0.write_all(&r).unwrap();
    }

    /// A simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes());
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, cookie, offset, len);
        let (err, c) = self.reply();
        assert_eq!(c, cookie);
        if err != 0 {
            return Err(err);
        }
        let mut d = vec![0u8; len as usize];
        self.0.read_exact(&mut d).unwrap();
        Ok(d)
    }

    fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn misbehaving_clients_lose_only_their_connection() {
    let env = Env::new();
    let (img, rp) = ext4_rp(&env);
    let data = std::fs::read(&img).unwrap();
    let mut server = NbdServer::start(&env, &[&rp], &[]);
    let addr = server.addr.clone();

    // Not fixed newstyle: closed.
    let mut c = RawClient::connect(&addr);
    c.0.write_all(&0u32.to_be_bytes()).unwrap();
    assert!(c.closed_by_server());

    // Garbage instead of an option: closed.
    let mut c = RawClient::connect(&addr);
    c.0.write_all(&3u32.to_be_bytes()).unwrap();
    c.0.write_all(b"GARBAGE!GARBAGE!").unwrap();
    assert!(c.closed_by_server());

    // An absurd option length: closed without reading it.
    let mut c = RawClient::connect(&addr);
    c.0.write_all(&3u32.to_be_bytes()).unwrap();
    let mut m = b"IHAVEOPT".to_vec();
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    c.0.write_all(&m).unwrap();
    assert!(c.closed_by_server());

    // Unknown option: an error reply, and the connection carries on; unknown export too.
    let mut c = RawClient::connect(&addr);
    c.0.write_all(&3u32.to_be_bytes()).unwrap();
    c.send_option(0x4242, b"whatever");
    assert_eq!(c.option_reply().0, (1 << 31) + 1, "NBD_REP_ERR_UNSUP");
    let mut d = 7u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"no-such");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.send_option(7, &d);
    assert_eq!(c.option_reply().0, (1 << 31) + 6, "NBD_REP_ERR_UNKNOWN");
    c.send_option(2, &[]);
    assert_eq!(c.option_reply().0, 1, "abort is acknowledged");

    // Transmission: bad requests get errors, the connection stays usable.
    let (mut c, size) = RawClient::go(&addr, &rp);
    assert_eq!(size, data.len() as u64);
    assert_eq!(
        c.read(1, size - 10, 20),
        Err(22),
        "read past the end: EINVAL"
    );
    assert_eq!(
        c.read(2, 0, 2 << 30),
        Err(22),
        "a 2 GiB read: EINVAL, nothing allocated"
    );
    assert_eq!(
        c.read(3, u64::MAX - 5, 10),
        Err(22),
        "offset overflow: EINVAL"
    );
    c.request(1, 4, 0, 4);
    c.0.write_all(b"data").unwrap();
    assert_eq!(c.reply(), (1, 4), "write to a read-only export: EPERM");
    c.request(99, 5, 0, 0);
    assert_eq!(c.reply(), (22, 5), "unknown command: EINVAL");
    assert_eq!(c.read(6, 4096, 8192).unwrap(), &data[4096..12288]);
    c.request(3, 7, 0, 0);
    assert_eq!(c.reply(), (0, 7), "flush");

    // Many requests in flight; replies may come in any order but each matches its cookie.
    let offsets: Vec<u64> = (0..32).map(|i| (i * 1_234_567) % (size - 65536)).collect();
    for (i, off) in offsets.iter().enumerate() {
        c.request(0, 100 + i as u64, *off, 65536);
    }
    let mut seen = 0;
    while seen < offsets.len() {
        let (err, cookie) = c.reply();
        assert_eq!(err, 0);
        let off = offsets[(cookie - 100) as usize] as usize;
        let mut d = vec![0u8; 65536];
        c.0.read_exact(&mut d).unwrap();
        assert_eq!(d, &data[off..off + 65536], "reply {cookie}");
        seen += 1;
    }

    // A client that asks for 32 MiB and hangs up before reading the reply.
    let (mut c, _) = RawClient::go(&addr, &rp);
    c.request(0, 1, 0, 32 << 20);
    drop(c);

    // A client that asks for 1.25 GiB and never reads the replies: its replies wait within its
    // byte budget, memory stays bounded and others are still served.
    let (mut hog, _) = RawClient::go(&addr, &rp);
    for i in 0..40 {
        hog.request(0, i, 0, 32 << 20);
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss = server.rss();
    assert!(
        rss < 400 << 20,
        "a client that does not read costs bounded memory: {rss} bytes"
    );
    let (mut other, _) = RawClient::go(&addr, &rp);
    assert_eq!(other.read(1, 4096, 4096).unwrap(), &data[4096..8192]);
    drop(hog);

    // A request with a bad magic ends that connection only.
    let (mut c, _) = RawClient::go(&addr, &rp);
    c.0.write_all(&[0u8; 28]).unwrap();
    assert!(c.closed_by_server());

    // 64 clients at once, each reading and checking.
    let handles: Vec<_> = (0..64u64)
        .map(|i| {
            let (addr, rp, data) = (addr.clone(), rp.clone(), data.clone());
            std::thread::spawn(move || {
                let (mut c, _) = RawClient::go(&addr, &rp);
                for j in 0..8u64 {
                    let off = ((i * 8 + j) * 524_288 + 4096) % (data.len() as u64 - 131072);
                    let got = c.read(j, off, 131072).unwrap();
                    assert_eq!(got, &data[off as usize..off as usize + 131072]);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(server.is_running(), "the server survived everything");
    let rss = server.rss();
    assert!(rss < 512 << 20, "server memory stays bounded: {rss} bytes");
    let list = sh("nbdinfo", &["--list", &format!("nbd://{addr}")]);
    assert!(list.contains(&rp));
    assert_eq!(server.stop(), Some(0), "Ctrl-C stops the server cleanly");
}

#[test]
fn connections_over_the_limit_are_closed_and_unknown_rps_fail_fast() {
    let env = Env::new();
    let (_, rp) = ext4_rp(&env);
    let server = NbdServer::start(&env, &[&rp], &["--max-connections", "2"]);
    let (_a, _) = RawClient::go(&server.addr, &rp);
    let (_b, _) = RawClient::go(&server.addr, &rp);
    let mut c = TcpStream::connect(&server.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 18];
    assert!(
        matches!(c.read(&mut buf), Ok(0) | Err(_)),
        "a third connection is closed at once"
    );
    drop((_a, _b));

    let out = env.run(&[
        "nbd",
        "serve",
        "rp-01m80q0exmx4mr1kh8rkgkg9q4",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn writable_overlay_never_touches_the_vault_and_can_be_saved() {
    let env = Env::new();
    let (img, rp) = ext4_rp(&env);
    let before = env.vault_bytes();
    let original = sha256_file(&img);

    // Writes, zeroes and trims land in the overlay and read back.
    let mut server = NbdServer::start(&env, &[&rp], &["--writable"]);
    let uri = server.uri(&rp);
    qemu_io(
        &uri,
        &[
            "write -P 0xab 1048576 65536",   // inside a chunk that holds data
            "write -P 0xcd 41943040 131072", // a whole chunk that was a hole
            "write -P 0xee 47185920 100",    // a partial write into a hole
            "write -z 0 4096",               // WRITE_ZEROES over the superblock area
            "discard 2097152 131072",        // TRIM
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0xab 1048576 65536",
            "read -P 0xcd 41943040 131072",
            "read -P 0xee 47185920 100",
            "read -P 0 47186020 1000",
            "read -P 0 0 4096",
            "read -P 0 2097152 131072",
        ],
    );
    assert_eq!(server.stop(), Some(0));
    assert_eq!(env.vault_bytes(), before, "the vault is unchanged");

    // Discarded: the RP still serves the original bytes.
    let server = NbdServer::start(&env, &[&rp], &[]);
    let copy = env.path("copy.img");
    sh("nbdcopy", &[&server.uri(&rp), copy.to_str().unwrap()]);
    assert_eq!(sha256_file(&copy), original, "the original RP is unchanged");
    drop(server);

    // --save-as-rp: the same writes become a new RP of the same asset.
    let mut server = NbdServer::start(&env, &[&rp], &["--writable", "--save-as-rp"]);
    let uri = server.uri(&rp);
    qemu_io(
        &uri,
        &[
            "write -P 0xab 1048576 65536",
            "write -P 0xcd 41943040 131072",
            "discard 2097152 131072",
        ],
    );
    assert_eq!(server.stop(), Some(0));
    let rps = env.json(&["rp", "list"]);
    let rps = rps.as_array().unwrap();
    assert_eq!(rps.len(), 2, "one new RP: {rps:?}");
    let saved = &rps[1];
    assert_eq!(saved["parent"], rp.as_str());
    assert_eq!(saved["asset"], rps[0]["asset"]);
    let restored = env.path("saved.img");
    env.restore(saved["id"].as_str().unwrap(), &restored);
    let mut expect = std::fs::read(&img).unwrap();
    expect[1048576..1048576 + 65536].fill(0xab);
    expect[41943040..41943040 + 131072].fill(0xcd);
    expect[2097152..2097152 + 131072].fill(0);
    assert_eq!(
        std::fs::read(&restored).unwrap(),
        expect,
        "the saved RP holds the writes"
    );
    assert_eq!(sha256_file(&copy), original);
}

#[test]
fn attach_without_the_nbd_module_says_what_to_do() {
    let env = Env::new();
    let img = env.path("d.img");
    std::fs::write(&img, pseudo_random(90, 1 << 20)).unwrap();
    let rp = env.backup(&img, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let device = "/dev/nbd0";
    if Path::new(device).exists() && Path::new("/sys/module/nbd").exists() {
        panic!("this kernel has nbd devices: extend this test to attach for real");
    }
    let out = env.run(&["nbd", "attach", &rp, device]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no nbd module") && err.contains("nbdfuse"),
        "{err}"
    );
}

/// Fixed newstyle, structured replies, `base:allocation` and NBD_OPT_GO on a raw socket.
fn structured_client(addr: &str, export: &str) -> RawClient {
    let mut c = RawClient::connect(addr);
    c.0.write_all(&3u32.to_be_bytes()).unwrap();
    c.send_option(8, &[]);
    assert_eq!(c.option_reply().0, 1, "structured replies acknowledged");
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&15u32.to_be_bytes());
    d.extend_from_slice(b"base:allocation");
    c.send_option(10, &d);
    assert_eq!(c.option_reply().0, 4, "base:allocation selected");
    assert_eq!(c.option_reply().0, 1);
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    c.send_option(7, &d);
    while c.option_reply().0 != 1 {}
    c
}

/// A client pipelines up to a million BLOCK_STATUS requests and never reads a reply: the server
/// stops reading from it (backpressure) and its memory stays under 128 MiB. Before, BLOCK_STATUS
/// took no budget: the server read every request, spawned a task and queued a reply for each,
/// and grew past 1.5 GiB (this test failed on the RSS bound, with all 1 M requests sent).
#[test]
fn a_block_status_flood_that_is_never_read_costs_bounded_memory() {
    const LIMIT: u64 = 1_000_000;
    let env = Env::new();
    let (img, rp) = ext4_rp(&env);
    let data = std::fs::read(&img).unwrap();
    let server = NbdServer::start(&env, &[&rp], &[]);
    let before = server.rss();
    let c = structured_client(&server.addr, &rp);
    let mut flood = c.0.try_clone().unwrap();
    flood
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let sender = std::thread::spawn(move || {
        let mut sent = 0u64;
        while sent < LIMIT {
            let mut batch = Vec::with_capacity(28 * 1000);
            for i in sent..sent + 1000 {
                batch.extend_from_slice(&0x2560_9513u32.to_be_bytes());
                batch.extend_from_slice(&0u16.to_be_bytes());
                batch.extend_from_slice(&7u16.to_be_bytes());
                batch.extend_from_slice(&i.to_be_bytes());
                batch.extend_from_slice(&0u64.to_be_bytes());
                batch.extend_from_slice(&u32::MAX.to_be_bytes());
            }
            if flood.write_all(&batch).is_err() {
                break; // the server stopped reading: backpressure
            }
            sent += 1000;
        }
        sent
    });
    let mut peak = 0;
    while !sender.is_finished() {
        peak = peak.max(server.rss());
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    peak = peak.max(server.rss());
    println!(
        "BLOCK_STATUS flood: {sent} requests sent before backpressure; server RSS {} MiB \
         before, peak {} MiB",
        before >> 20,
        peak >> 20
    );
    assert!(peak <= 128 << 20, "server RSS {peak} bytes under the flood");
    assert!(sent < LIMIT, "the server read all {sent} requests");
    // Others are still served.
    let (mut other, _) = RawClient::go(&server.addr, &rp);
    assert_eq!(other.read(1, 8192, 4096).unwrap(), &data[8192..12288]);
    drop(c);
}

/// An export whose size is not a multiple of 512 is copied byte-exact by nbdcopy and qemu-img
/// and reported with its exact size. Before, the server advertised a minimum block size of 512:
/// nbdcopy failed with "nbd_block_status: request is unaligned" and qemu-img rounded the size
/// down to a multiple of 512.
#[test]
fn an_export_of_unaligned_size_copies_byte_exact() {
    let env = Env::new();
    let size: usize = (5 << 20) + 1234;
    let mut disk = pseudo_random(7, size);
    disk[1 << 20..3 << 20].fill(0); // a hole, so block status has more than one extent
    let img = env.path("odd.img");
    std::fs::write(&img, &disk).unwrap();
    let rp = env.backup(&img, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let server = NbdServer::start(&env, &[&rp], &[]);
    let uri = server.uri(&rp);

    let info: serde_json::Value = serde_json::from_str(&sh("nbdinfo", &["--json", &uri])).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], size as u64, "{info}");
    assert_eq!(export["block_size_minimum"], 1, "{info}");
    let map = sh("nbdinfo", &["--map", &uri]);
    assert!(map.contains("hole,zero") && map.contains("data"), "{map}");

    let copy = env.path("nbdcopy.img");
    sh("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    assert_eq!(
        sha256_file(&copy),
        sha256_file(&img),
        "nbdcopy is byte-exact"
    );

    // qemu counts sizes in 512-byte sectors, for local files too: it reports the export exactly
    // as it reports the image file itself (rounded up, the tail read as zeros), where a minimum
    // block size of 512 made it round the export down and lose the tail.
    let qsize = |target: &str| {
        let info: serde_json::Value = serde_json::from_str(&sh(
            "qemu-img",
            &["info", "--output=json", "-f", "raw", target],
        ))
        .unwrap();
        info["virtual-size"].as_u64().unwrap()
    };
    assert_eq!(qsize(&uri), qsize(img.to_str().unwrap()));
    assert_eq!(qsize(&uri), size.next_multiple_of(512) as u64);
    qemu_compare(&uri, &img);
    let converted = env.path("qemu.img");
    sh(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            converted.to_str().unwrap(),
        ],
    );
    let got = std::fs::read(&converted).unwrap();
    assert_eq!(
        got.len(),
        size.next_multiple_of(512),
        "qemu's sector padding"
    );
    assert!(got[size..].iter().all(|b| *b == 0), "the padding is zeros");
    assert!(got[..size] == disk[..], "qemu-img convert is byte-exact");
}

/// Listening on an address other machines can reach is allowed, with a warning that the export is
/// unauthenticated (in the ready report and the log). Only 127.0.0.1 is ever connected to.
#[test]
fn a_non_loopback_listen_address_is_warned_about() {
    use std::io::BufRead;
    let env = Env::new();
    let img = env.path("d.img");
    std::fs::write(&img, pseudo_random(3, 1 << 20)).unwrap();
    let rp = env.backup(&img, None)["rp"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut child = env
        .command(&[
            "nbd",
            "serve",
            &rp,
            "--listen",
            "0.0.0.0:0",
            "--output-format",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    let port = ready["listen"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap();
    let mut server = NbdServer {
        child,
        addr: format!("127.0.0.1:{port}"),
    };
    let warning = ready["warning"].as_str().unwrap_or_default().to_string();
    assert!(
        warning.contains("unauthenticated") && warning.contains("anyone who can reach"),
        "{ready}"
    );
    assert_eq!(server.stop(), Some(0));
    let mut log = String::new();
    server
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("WARN") && log.contains("unauthenticated"),
        "{log}"
    );
}

/// `--writable` without an address listens on a private Unix socket (mode 0600 in a 0700
/// directory of this user's): write access to a disk is not handed to every local user over
/// loopback TCP, as it was.
#[test]
#[allow(unsafe_code)] // kill(2) to stop the server
fn a_writable_export_defaults_to_a_private_unix_socket() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let (_, rp) = ext4_rp(&env);
    let runtime = env.path("run");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut child = env
        .command(&["nbd", "serve", &rp, "--writable", "--output-format", "json"])
        .env("XDG_RUNTIME_DIR", &runtime)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    let socket = std::path::PathBuf::from(ready["listen"].as_str().unwrap());
    assert!(socket.starts_with(runtime.join("elastio")), "{ready}");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    let uri = ready["exports"][0]["uri"].as_str().unwrap().to_string();
    assert!(uri.starts_with("nbd+unix://"), "{uri}");
    let out = std::process::Command::new("nbdinfo")
        .args(["--size", &uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    assert!(!socket.exists(), "the socket is removed on exit");
}

/// `--tls-certificates` with `--tls require`: libnbd's nbdcopy over `nbds://` copies the RP
/// byte-exact and nbdinfo reports TLS, while a plain `nbd://` client is refused (every option
/// answered NBD_REP_ERR_TLS_REQD with the server's message). With `--tls on` both are served.
#[test]
fn tls_clients_copy_byte_exact_and_plain_clients_are_refused() {
    let env = Env::new();
    let (img, rp) = ext4_rp(&env);
    let dirs = tls_certificates(&env);
    let (server_dir, client_dir) = (&dirs.server, &dirs.anonymous);
    let server = NbdServer::start(
        &env,
        &[&rp],
        &[
            "--tls-certificates",
            server_dir.to_str().unwrap(),
            "--tls",
            "require",
        ],
    );
    let info = tls_copy_is_byte_exact(&env, &server.tls_uri(&rp, client_dir), &img);
    assert!(info.contains("is_read_only: true"), "{info}");

    // libnbd reports the server's option error (NBD_REP_ERR_TLS_REQD, with its message) only in
    // its debug output.
    let plain = Command::new("nbdinfo")
        .arg(server.uri(&rp))
        .env("LIBNBD_DEBUG", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(!plain.status.success(), "a plain client was served");
    assert!(
        stderr.contains("server error message: this server requires TLS"),
        "{stderr}"
    );
    drop(server);

    // `--tls on`: both kinds of client are served.
    let server = NbdServer::start(
        &env,
        &[&rp],
        &[
            "--tls-certificates",
            server_dir.to_str().unwrap(),
            "--tls",
            "on",
        ],
    );
    let tls = sh("nbdinfo", &[&server.tls_uri(&rp, client_dir)]);
    assert!(tls.contains("with TLS"), "{tls}");
    let plain = sh("nbdinfo", &[&server.uri(&rp)]);
    assert!(
        !plain.contains("with TLS") && plain.contains("export-size"),
        "{plain}"
    );
}

/// `--tls-verify-peer`: only clients with a certificate the CA signed are served (nbdinfo and
/// nbdcopy with libnbd's client-cert.pem); a TLS client without one is refused in the TLS
/// handshake. Before, the server asked for no certificate: TLS kept no local user out.
#[test]
fn tls_verify_peer_serves_only_clients_with_a_certificate() {
    let env = Env::new();
    let (img, rp) = ext4_rp(&env);
    let dirs = tls_certificates(&env);
    let server = NbdServer::start(
        &env,
        &[&rp],
        &[
            "--tls-certificates",
            dirs.server.to_str().unwrap(),
            "--tls-verify-peer",
        ],
    );
    tls_copy_is_byte_exact(&env, &server.tls_uri(&rp, &dirs.client), &img);

    let anonymous = Command::new("nbdinfo")
        .arg(server.tls_uri(&rp, &dirs.anonymous))
        .output()
        .unwrap();
    assert!(
        !anonymous.status.success(),
        "a client without a certificate was served: {}",
        String::from_utf8_lossy(&anonymous.stdout)
    );
    let plain = Command::new("nbdinfo")
        .arg(server.uri(&rp))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a plain-text client was served");
    drop(server);

    // Where clients could skip TLS there is nothing to verify: refused before the vault is
    // opened.
    let server_dir = dirs.server.to_str().unwrap();
    for extra in [
        &["--tls-verify-peer"][..],
        &[
            "--tls-certificates",
            server_dir,
            "--tls",
            "on",
            "--tls-verify-peer",
        ],
        &[
            "--tls-certificates",
            server_dir,
            "--tls",
            "off",
            "--tls-verify-peer",
        ],
    ] {
        let mut args = vec!["nbd", "serve", &rp];
        args.extend_from_slice(extra);
        let out = env.run(&args);
        assert!(!out.status.success(), "{extra:?}");
    }
}

/// Over `uri` (nbds://), nbdinfo reports TLS and nbdcopy copies the export byte-exact to
/// `img`; returns what nbdinfo printed.
fn tls_copy_is_byte_exact(env: &Env, uri: &str, img: &Path) -> String {
    let info = sh("nbdinfo", &[uri]);
    assert!(info.contains("with TLS"), "{info}");
    let copy = env.path("copy.img");
    sh("nbdcopy", &[uri, copy.to_str().unwrap()]);
    assert_eq!(
        sha256_file(&copy),
        sha256_file(img),
        "nbdcopy over TLS is byte-exact"
    );
    info
}

/// `qemu-img compare` of an NBD export with a raw image, which must succeed.
fn qemu_compare(uri: &str, img: &Path) {
    sh(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            uri,
            img.to_str().unwrap(),
        ],
    );
}
