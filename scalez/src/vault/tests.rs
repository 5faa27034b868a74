use super::*;
use crate::catalog::{self, parse_tags, RecoveryPoint, RpKind, TagUpdate};
use crate::disk_map::{MapBuilder, MapReader};
use crate::ids::RecoveryPointId;
use crate::keyring::unwrap_order;
use crate::session::BackupSession;
use crate::store::memory::MemoryStore;

fn opts() -> VaultOptions {
    VaultOptions {
        kdf: KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        },
        pack_size: 1 << 20,
        ..VaultOptions::default()
    }
}

#[test]
fn write_read_reopen() {
    let mem = MemoryStore::new();
    let store: Arc<dyn ObjectStore> = Arc::new(mem.clone());
    let vault = Arc::new(Vault::init(store.clone(), b"pw", opts()).unwrap());
    let mut session = BackupSession::new(vault.clone()).unwrap();
    // Incompressible so that 40 x 100 kB spill over 1 MiB packs.
    let chunks: Vec<Vec<u8>> = (0..40)
        .map(|_| (0..100_000).map(|_| rand::random::<u8>()).collect())
        .collect();
    let mut ids = Vec::new();
    for c in &chunks {
        ids.push(session.store_blob(c).unwrap());
    }
    assert!(!session.store_chunk(ids[0], &chunks[0]).unwrap(), "dedup");
    let stats = session.finish().unwrap();
    assert_eq!(stats.new_chunks, 40);
    assert!(stats.packs >= 2, "small packs roll over");

    let reopened = Vault::open(store.clone(), b"pw").unwrap();
    for (id, c) in ids.iter().zip(&chunks) {
        assert_eq!(&reopened.read_chunk(id).unwrap(), c);
    }
    assert!(matches!(
        Vault::open(store.clone(), b"nope"),
        Err(Error::WrongPassword { .. })
    ));
    assert!(matches!(
        Vault::init(store.clone(), b"pw", opts()),
        Err(Error::VaultExists { .. })
    ));

    // Flip one byte inside the first chunk of a pack: the read names the pack.
    let loc = reopened.locate(&ids[0]).unwrap();
    mem.tamper(&loc.pack.key(), |d| d[loc.offset as usize + 20] ^= 1);
    match reopened.read_chunk(&ids[0]) {
        Err(Error::Corrupt { key, .. }) => assert_eq!(key, loc.pack.key()),
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn newer_format_and_tampered_config() {
    let mem = MemoryStore::new();
    let store: Arc<dyn ObjectStore> = Arc::new(mem.clone());
    Vault::init(store.clone(), b"pw", opts()).unwrap();
    let original = store.get(CONFIG_KEY).unwrap();
    mem.tamper(CONFIG_KEY, |d| {
        let s = String::from_utf8(d.clone())
            .unwrap()
            .replace("131072", "65536");
        *d = s.into_bytes();
    });
    assert!(matches!(
        Vault::open(store.clone(), b"pw"),
        Err(Error::Corrupt { .. })
    ));
    mem.tamper(CONFIG_KEY, |d| {
        let s = String::from_utf8(original.clone())
            .unwrap()
            .replace("\"version\": 1", "\"version\": 7");
        *d = s.into_bytes();
    });
    let err = Vault::open(store.clone(), b"pw").unwrap_err();
    assert!(matches!(err, Error::NewerFormat { found: 7, .. }), "{err}");
    assert!(err.to_string().contains("upgrade"));
}

#[test]
fn catalog_and_tags() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let vault = Arc::new(Vault::init(store, b"pw", opts()).unwrap());
    let mut session = BackupSession::new(vault.clone()).unwrap();
    let mut b = MapBuilder::new(3);
    let mut put = |p: Vec<u8>| session.store_blob(&p);
    let data = vec![5u8; 1000];
    let id = session.store_blob(&data).unwrap();
    for s in [None, Some(id), None] {
        b.push(s, &mut put).unwrap();
    }
    let root = b.finish(&mut put).unwrap();
    session.finish().unwrap();
    let rp = RecoveryPoint {
        format: catalog::RP_FORMAT,
        id: RecoveryPointId::generate(),
        kind: RpKind::Disk,
        asset: catalog::Asset {
            name: "/dev/x".into(),
            host: "h".into(),
        },
        created: now_rfc3339(),
        parent: None,
        logical_size: 3 * 131072,
        bytes_read: 0,
        new_bytes_stored: 0,
        new_chunks: 0,
        duration_ms: 0,
        tags: parse_tags(["a=1"]).unwrap(),
        disk: Some(catalog::DiskMapRef {
            chunk_size: 131072,
            size: 3 * 131072,
            depth: 0,
            root,
        }),
        instance: None,
        stream: None,
        tree: None,
    };
    vault.commit_rp(&rp).unwrap();
    assert!(
        vault.commit_rp(&rp).is_err(),
        "catalog entries are create-only"
    );
    let got = vault
        .update_tags(
            &rp.id,
            &TagUpdate {
                set: parse_tags(["b=2"]).unwrap(),
                remove: vec!["a".into()],
            },
        )
        .unwrap();
    assert_eq!(got.tags, parse_tags(["b=2"]).unwrap());
    assert_eq!(vault.list_rps().unwrap(), vec![got.clone()]);
    let mut load = |i: &ChunkId| vault.load_page(i).map(Arc::new);
    let mut r = MapReader::new(root, 0, 3, &mut load);
    assert_eq!(r.lookup(1).unwrap(), Some(id));
    assert!(parse_tags(["novalue"]).is_err());
    assert!(vault
        .get_rp(&RecoveryPointId::generate())
        .unwrap_err()
        .to_string()
        .contains("not found"));
}

/// A vault on a real directory, with one disk of incompressible data stored.
fn local_vault(dir: &std::path::Path) -> (Arc<dyn ObjectStore>, Arc<Vault>) {
    let store: Arc<dyn ObjectStore> = Arc::new(crate::store::local::LocalStore::open(dir).unwrap());
    let vault = Arc::new(Vault::init(store.clone(), b"pw", opts()).unwrap());
    let disk: Vec<u8> = (0..(1 << 20)).map(|_| rand::random::<u8>()).collect();
    crate::testing::store_disk(&vault, &disk);
    (store, vault)
}

#[test]
fn key_files_are_tried_cheapest_first() {
    let kf = |memory_kib, iterations| KeyFile {
        kdf: "argon2id".into(),
        params: KdfParams {
            memory_kib,
            iterations,
            parallelism: 4,
        },
        salt: vec![0; 16],
        nonce: vec![0; 12],
        wrapped: vec![0; 48],
        created: String::new(),
    };
    let mut c = vec![
        ("keys/0".to_string(), kf(2 << 20, 4)),
        ("keys/b".to_string(), kf(64 << 10, 3)),
        ("keys/a".to_string(), kf(64 << 10, 3)),
        ("keys/1".to_string(), kf(1 << 20, 1)),
    ];
    unwrap_order(&mut c);
    let names: Vec<&str> = c.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["keys/a", "keys/b", "keys/1", "keys/0"]);
}

/// Planted key files: junk JSON, absurd Argon2 parameters (2^32-1 passes hung every open),
/// an oversized object. Each used to make the vault unopenable; now they are skipped.
#[test]
fn damaged_or_absurd_key_files_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = local_vault(tmp.path());
    store.put("keys/0", b"junk", PutMode::Create).unwrap();
    let mut absurd: serde_json::Value = serde_json::from_slice(
        &store
            .get(&store.list("keys/").unwrap().last().unwrap().key)
            .unwrap(),
    )
    .unwrap();
    absurd["params"]["iterations"] = u32::MAX.into();
    store
        .put(
            "keys/1",
            &serde_json::to_vec(&absurd).unwrap(),
            PutMode::Create,
        )
        .unwrap();
    std::fs::File::create(tmp.path().join("keys/2"))
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let started = std::time::Instant::now();
    // (Listing order puts the planted ones first.)
    Vault::open(store.clone(), b"pw").expect("opens past the planted key files");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert!(matches!(
        Vault::open(store, b"wrong"),
        Err(Error::WrongPassword { keys: 1, .. })
    ));
}

/// A planted 1 TiB sparse object under index/ aborted every open (the index was pre-sized
/// from listing sizes); a real pack made 1 TiB long, its authentic trailer kept at the end,
/// aborted `check` (which zero-filled a buffer the size of the pack). Both are reported as
/// damaged now, and nothing is allocated for them.
#[test]
fn a_chunk_whose_index_object_was_rewritten_under_a_reader_is_found_again() {
    let tmp = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(crate::store::local::LocalStore::open(tmp.path()).unwrap());
    let v = Arc::new(Vault::init(store.clone(), b"pw", opts()).unwrap());
    let disk: Vec<u8> = (0..(1 << 18)).map(|_| rand::random::<u8>()).collect();
    let rp_map = crate::testing::store_disk(&v, &disk);
    // What a reader sees when a prune rewrote an index object between its listing and its
    // read: the object gone, its entries in one the reader never listed.
    let key = store.list("index/").unwrap().pop().unwrap().key;
    let plain = v
        .keys()
        .open(&index_aad(&key), &store.get(&key).unwrap())
        .unwrap();
    store.delete(&key).unwrap();
    let reader = Arc::new(Vault::open(store.clone(), b"pw").unwrap());
    let new_key = format!("index/{}", "ab".repeat(16));
    let sealed = v.keys().seal(&index_aad(&new_key), &plain, None);
    store.put(&new_key, &sealed, PutMode::Create).unwrap();
    let reader_disk = crate::reader::DiskReader::new(reader, rp_map, 1 << 20);
    let mut out = Vec::new();
    reader_disk
        .read_append(0, 4096, &mut out)
        .expect("found in the rewritten index object");
    assert_eq!(out, disk[..4096]);
}

#[test]
fn huge_planted_objects_are_damage_not_allocations() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = local_vault(tmp.path());
    std::fs::File::create(tmp.path().join("index/ffff"))
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let vault = Arc::new(Vault::open(store.clone(), b"pw").unwrap());
    assert!(vault
        .damaged_index()
        .iter()
        .any(|(k, why)| k == "index/ffff" && why.contains("larger than any index object")));
    std::fs::remove_file(tmp.path().join("index/ffff")).unwrap();

    let pack = store.list("packs/").unwrap()[0].key.clone();
    let path = tmp.path().join(&pack);
    let bytes = std::fs::read(&path).unwrap();
    let tlen = u32::from_le_bytes(bytes[bytes.len() - 8..bytes.len() - 4].try_into().unwrap());
    let tail = &bytes[bytes.len() - 8 - tlen as usize..];
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let huge = 1u64 << 40;
    f.set_len(huge).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, tail, huge - tail.len() as u64).unwrap();
    drop(f);
    let vault = Arc::new(Vault::open(store, b"pw").unwrap());
    let r = crate::check::check(&vault, crate::check::DataCheck::All, &|_| {}).unwrap();
    assert!(
        r.problems
            .iter()
            .any(|p| p.object == pack && p.problem.contains("oversize")),
        "{:?}",
        r.problems
    );
}
