//! Deterministic prune races, one per RP kind: a backup that deduplicates against data no RP
//! references any more, and commits after prune decided what is referenced but before it
//! deletes anything. Prune must spare every pack such a backup needs, whatever its kind.
//!
//! The backup runs inside prune's progress callback at the "finding referenced chunks" stage,
//! which prune reports after reading the catalog and before marking: the new RP is in neither
//! the kept list nor the marks, so its packs are condemned, and only the spare step (P4) can
//! save them. Before the spare step walked every RP kind (it walked disk maps only), the stream
//! and file cases lost their packs here. Real local vaults on disk, real files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use agent::file::{backup_files, FileBackupOptions};
use agent::file_restore::{restore_files, FileRestoreOptions};
use agent::pipeline::{backup_block, restore_block, BackupOptions, RestoreOptions};
use agent::stream::{backup_stream, restore_stream, StreamOptions};
use agent::NoProgress;
use scalez::check::{check, DataCheck};
use scalez::prune::{delete_rps, prune, PruneOptions};
use scalez::{RecoveryPoint, Vault};

mod common;
use common::{pseudo_random, reopen, vault};

/// Backs up with `backup` (which returns the new RP), deletes that RP, then prunes while
/// `backup` runs again at the racy moment. Returns the RP of the racing backup and the report.
fn race(
    dir: &Path,
    backup: &(dyn Fn(&Arc<Vault>) -> RecoveryPoint + Sync),
) -> (RecoveryPoint, scalez::prune::PruneReport) {
    let v = vault(dir);
    let first = backup(&v);
    delete_rps(&v, std::slice::from_ref(&first.id)).unwrap();
    let v = reopen(dir);
    let raced: Mutex<Option<RecoveryPoint>> = Mutex::new(None);
    let report = prune(&v, &PruneOptions::default(), &|stage| {
        if stage.starts_with("finding referenced chunks") {
            let rp = backup(&reopen(dir));
            *raced.lock().unwrap() = Some(rp);
        }
    })
    .unwrap();
    let rp = raced
        .into_inner()
        .unwrap()
        .expect("prune reports the marking stage");
    (rp, report)
}

fn assert_sound(dir: &Path) {
    let v = reopen(dir);
    let r = check(&v, DataCheck::All, &|_| {}).unwrap();
    assert!(r.healthy(), "check after the race: {:#?}", r.problems);
}

#[test]
fn a_stream_backup_committed_during_prune_keeps_its_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pseudo_random(1, 3 << 20);
    let (rp, report) = race(tmp.path(), &|v| {
        backup_stream(
            v,
            &data[..],
            "db-dump",
            &StreamOptions::default(),
            &NoProgress,
        )
        .unwrap()
        .rp
    });
    assert!(report.packs_spared > 0, "{report:?}");
    let v = reopen(tmp.path());
    let mut out = Vec::new();
    restore_stream(&v, &rp, &mut out, 2, &NoProgress).unwrap();
    assert!(out == data, "the raced stream RP restores byte-exact");
    assert_sound(tmp.path());
}

#[test]
fn a_file_backup_committed_during_prune_keeps_its_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let src: PathBuf = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a.bin"), pseudo_random(2, 2 << 20)).unwrap();
    std::fs::write(src.join("b.bin"), pseudo_random(3, 1 << 20)).unwrap();
    let (rp, report) = race(tmp.path(), &|v| {
        backup_files(
            v,
            std::slice::from_ref(&src),
            &FileBackupOptions::default(),
            &NoProgress,
        )
        .unwrap()
        .rp
    });
    assert!(report.packs_spared > 0, "{report:?}");
    let v = reopen(tmp.path());
    let out = tmp.path().join("out");
    restore_files(&v, &rp, &out, &FileRestoreOptions::default(), &NoProgress).unwrap();
    let restored = out.join(src.strip_prefix("/").unwrap());
    for f in ["a.bin", "b.bin"] {
        assert!(
            std::fs::read(restored.join(f)).unwrap() == std::fs::read(src.join(f)).unwrap(),
            "{f} restores byte-exact"
        );
    }
    assert_sound(tmp.path());
}

#[test]
fn a_block_backup_committed_during_prune_keeps_its_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    std::fs::write(&img, pseudo_random(4, 3 << 20)).unwrap();
    let (rp, report) = race(tmp.path(), &|v| {
        backup_block(v, &img, &BackupOptions::default(), &NoProgress)
            .unwrap()
            .rp
    });
    assert!(report.packs_spared > 0, "{report:?}");
    let v = reopen(tmp.path());
    let out = tmp.path().join("restored.img");
    restore_block(&v, &rp, &out, &RestoreOptions::default(), &NoProgress).unwrap();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap());
    assert_sound(tmp.path());
}
