//! The behaviour every [`ObjectStore`] must have, as one suite run against each backend
//! (memory and local here, S3 servers in the end-to-end tests).

use std::sync::{Arc, Barrier};

use super::{ObjectStore, PutMode, StoreError};

/// Runs every check against `store`, which must be empty. Panics on the first violation.
pub fn run_all(store: &dyn ObjectStore) {
    put_get_roundtrip(store);
    create_only(store);
    overwrite(store);
    ranges(store);
    listing(store);
    deletion(store);
    invalid_keys(store);
}

fn put_get_roundtrip(store: &dyn ObjectStore) {
    store.put("rt/empty", b"", PutMode::Create).unwrap();
    assert_eq!(store.get("rt/empty").unwrap(), b"");
    let big: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7) as u8).collect();
    store.put("rt/big", &big, PutMode::Create).unwrap();
    assert_eq!(store.get("rt/big").unwrap(), big);
    assert!(store.get("rt/missing").unwrap_err().is_not_found());
}

fn create_only(store: &dyn ObjectStore) {
    store.put("co/x", b"first", PutMode::Create).unwrap();
    let err = store.put("co/x", b"second", PutMode::Create).unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    assert_eq!(store.get("co/x").unwrap(), b"first");
}

fn overwrite(store: &dyn ObjectStore) {
    store.put("ow/x", b"first", PutMode::Overwrite).unwrap();
    store.put("ow/x", b"second", PutMode::Overwrite).unwrap();
    assert_eq!(store.get("ow/x").unwrap(), b"second");
}

fn ranges(store: &dyn ObjectStore) {
    store.put("rg/x", b"0123456789", PutMode::Create).unwrap();
    assert_eq!(store.get_range("rg/x", 2..5).unwrap(), b"234");
    assert_eq!(store.get_range("rg/x", 0..10).unwrap(), b"0123456789");
    assert_eq!(store.get_range("rg/x", 10..10).unwrap(), b"");
    assert!(matches!(
        store.get_range("rg/x", 5..11).unwrap_err(),
        StoreError::BadRange { .. }
    ));
    assert!(store.get_range("rg/nope", 0..1).unwrap_err().is_not_found());
}

fn listing(store: &dyn ObjectStore) {
    for k in ["ls/a/1", "ls/a/2", "ls/b/1", "ls/ab", "lsx"] {
        store.put(k, k.as_bytes(), PutMode::Create).unwrap();
    }
    let keys =
        |p: &str| -> Vec<String> { store.list(p).unwrap().into_iter().map(|m| m.key).collect() };
    assert_eq!(keys("ls/a/"), ["ls/a/1", "ls/a/2"]);
    assert_eq!(keys("ls/a"), ["ls/a/1", "ls/a/2", "ls/ab"]);
    assert_eq!(keys("ls/"), ["ls/a/1", "ls/a/2", "ls/ab", "ls/b/1"]);
    assert!(keys("nothing/").is_empty());
    let sizes: Vec<u64> = store.list("ls/b").unwrap().iter().map(|m| m.size).collect();
    assert_eq!(sizes, [6]);
}

fn deletion(store: &dyn ObjectStore) {
    store.put("del/x", b"x", PutMode::Create).unwrap();
    store.delete("del/x").unwrap();
    assert!(store.get("del/x").unwrap_err().is_not_found());
    store.delete("del/x").unwrap();
    store.put("del/x", b"again", PutMode::Create).unwrap();
    assert_eq!(store.get("del/x").unwrap(), b"again");
}

fn invalid_keys(store: &dyn ObjectStore) {
    for k in ["", "../x", "a/../b", "/abs", "a//b", ".hidden", "a b"] {
        assert!(
            matches!(
                store.put(k, b"x", PutMode::Create),
                Err(StoreError::InvalidKey { .. })
            ),
            "key {k:?} accepted"
        );
    }
}

/// Many threads race a create-only put on one key: exactly one may win.
pub fn racing_creates(store: Arc<dyn ObjectStore>) {
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let store = store.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                store
                    .put("race/x", format!("{i}").as_bytes(), PutMode::Create)
                    .is_ok()
            })
        })
        .collect();
    let wins = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|w| *w)
        .count();
    assert_eq!(wins, 1);
}
