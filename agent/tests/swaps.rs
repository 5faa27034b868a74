//! Paths swapped by another user while elastio (often root) works on them. Deterministic: the
//! file backup's test hook swaps a directory for a symlink inside the windows between the walk
//! listing a directory and descending, and between the walk and the read; restore targets are planted before the restore starts. Real local vaults.
//! One test binary of its own: the backup hook is process-wide.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use agent::file::{backup_files, set_race_hook, FileBackupOptions, RaceWindow};
use agent::file_restore::{restore_files, FileRestoreOptions};
use agent::pipeline::{backup_block, restore_block, BackupOptions, RestoreOptions};
use agent::NoProgress;

mod common;
use common::vault;

/// The race hook for every test here (process-wide, set once): just before a reader opens
/// `.../home/docs/notes.txt`, `docs` becomes a symlink to `../etc`; before it opens
/// `.../edited/report.txt`, the file is replaced by rename, as editors save; just before the
/// walk lists `.../walked/a/etc`, `a` becomes a symlink to `../root`.
fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        set_race_hook(Box::new(|w: RaceWindow, p: &Path| {
            if w == RaceWindow::BeforeList && p.ends_with("walked/a/etc") {
                let a = p.parent().unwrap();
                std::fs::rename(a, a.with_extension("moved")).unwrap();
                let root = a.parent().unwrap().parent().unwrap().join("root");
                std::os::unix::fs::symlink(root, a).unwrap();
            }
            if w != RaceWindow::BeforeRead {
                return;
            }
            if p.ends_with("home/docs/notes.txt") {
                let docs = p.parent().unwrap();
                let moved = docs.with_extension("moved");
                if !moved.exists() {
                    std::fs::rename(docs, &moved).unwrap();
                    let etc = docs.parent().unwrap().parent().unwrap().join("etc");
                    std::os::unix::fs::symlink(etc, docs).unwrap();
                }
            }
            if p.ends_with("owned/pub.txt") {
                // Another file renamed into place: one the walk did not see, mode 0600.
                let tmp = p.with_extension("tmp");
                std::fs::write(&tmp, b"SECRET of another mode").unwrap();
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
                std::fs::rename(&tmp, p).unwrap();
            }
            if p.ends_with("edited/report.txt") {
                let tmp = p.with_extension("tmp");
                if !p.with_extension("done").exists() {
                    std::fs::write(&tmp, b"saved by the editor").unwrap();
                    std::fs::rename(&tmp, p).unwrap();
                    std::fs::write(p.with_extension("done"), b"").unwrap();
                }
            }
        }));
    });
}

/// Backs up `src` into a vault under `dir` (with the race hook installed) and restores the RP
/// to `dir/restored`; returns the report and where `src` was restored.
fn back_up_and_restore(
    dir: &Path,
    src: &Path,
) -> (agent::file::FileBackupReport, std::path::PathBuf) {
    install_hook();
    let v = vault(dir);
    let r = backup_files(
        &v,
        &[src.to_path_buf()],
        &FileBackupOptions::default(),
        &NoProgress,
    )
    .unwrap();
    let out = dir.join("restored");
    restore_files(&v, &r.rp, &out, &FileRestoreOptions::default(), &NoProgress).unwrap();
    let root = out.join(src.strip_prefix("/").unwrap());
    (r, root)
}

/// A file replaced by rename between the walk and the read (how editors save) is stored with
/// its new content and flagged changed, not dropped.
#[test]
fn a_file_replaced_by_rename_is_stored_and_flagged() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("edited");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("report.txt"), b"draft").unwrap();
    let (r, root) = back_up_and_restore(tmp.path(), &src);
    assert!(r.unreadable.is_empty(), "{:?}", r.unreadable);
    assert!(
        r.changed.iter().any(|p| p.contains("report.txt")),
        "{:?}",
        r.changed
    );
    assert_eq!(
        std::fs::read(root.join("report.txt")).unwrap(),
        b"saved by the editor"
    );
}

/// A parent directory replaced by a symlink to a directory holding a secret, after the walk saw
/// the user's file and before a reader opens it. The backup used to open the path again and
/// store the secret under the user's name, unflagged. Now the opened inode must be the walked
/// one: the file is recorded without data and reported.
#[test]
fn a_parent_swapped_for_a_symlink_between_walk_and_read_stores_nothing_of_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("home");
    std::fs::create_dir_all(src.join("docs")).unwrap();
    std::fs::write(src.join("docs/notes.txt"), b"the user's notes").unwrap();
    std::fs::write(src.join("other.txt"), b"untouched").unwrap();
    let secret_dir = tmp.path().join("etc");
    std::fs::create_dir(&secret_dir).unwrap();
    std::fs::write(
        secret_dir.join("notes.txt"),
        b"root:SECRET-HASH:19000::::::",
    )
    .unwrap();

    let (r, root) = back_up_and_restore(tmp.path(), &src);
    assert!(
        r.unreadable.iter().any(|p| p.contains("notes.txt")),
        "the swapped file is reported: {:?} / {:?}",
        r.unreadable,
        r.changed
    );
    let notes = std::fs::read(root.join("docs/notes.txt")).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&notes).contains("SECRET"),
        "the secret was stored under the user's path"
    );
    assert_eq!(std::fs::read(root.join("other.txt")).unwrap(), b"untouched");
}

/// A directory swapped for a symlink while the walk is inside it: the walk has listed `a`
/// and opened `a/etc`, then `a` becomes a symlink to a tree holding `etc/shadow`. The walk used
/// to list `a/etc` again by path, so it recorded the target's `etc/shadow` under the user's
/// path and the read (same inode) stored its content. Now `a/etc` is listed through the handle
/// the walk opened: the user's own files are what is recorded, and reading them through the
/// symlink fails, so nothing of the target is stored.
#[test]
fn a_directory_swapped_for_a_symlink_during_the_walk_leads_it_nowhere() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("walked");
    std::fs::create_dir_all(src.join("a/etc")).unwrap();
    std::fs::write(src.join("a/etc/hosts.txt"), b"the user's hosts").unwrap();
    std::fs::create_dir_all(tmp.path().join("root/etc")).unwrap();
    std::fs::write(
        tmp.path().join("root/etc/shadow"),
        b"root:SECRET-HASH:19000::::::",
    )
    .unwrap();

    let (r, root) = back_up_and_restore(tmp.path(), &src);
    assert!(
        std::fs::symlink_metadata(src.join("a"))
            .unwrap()
            .is_symlink(),
        "the hook ran"
    );
    assert!(
        r.unreadable.iter().any(|p| p.contains("hosts.txt")),
        "the file behind the swapped directory is reported: {:?}",
        r.unreadable
    );
    let etc = root.join("a/etc");
    let names: Vec<_> = std::fs::read_dir(&etc)
        .unwrap()
        .map(|d| d.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        ["hosts.txt"],
        "only the user's own names are recorded"
    );
    assert!(
        !String::from_utf8_lossy(&std::fs::read(etc.join("hosts.txt")).unwrap_or_default())
            .contains("SECRET")
    );
}

/// A file replaced by rename with one of another mode (or owner): the restore would apply the
/// walk's owner and mode to it, handing the user a file they could not read. Not stored.
#[test]
fn a_file_of_another_mode_renamed_into_place_is_not_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("owned");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("pub.txt"), b"public").unwrap();
    std::fs::set_permissions(src.join("pub.txt"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (r, root) = back_up_and_restore(tmp.path(), &src);
    assert!(
        r.unreadable
            .iter()
            .any(|p| p.contains("pub.txt") && p.contains("another owner or mode")),
        "{:?}",
        r.unreadable
    );
    let got = std::fs::read(root.join("pub.txt")).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&got).contains("SECRET"));
}

/// A tree deeper than the walk descends (each level holds a descriptor): the backup finishes
/// and reports where it stopped, instead of running out of descriptors or stack.
#[test]
fn a_tree_deeper_than_the_walk_goes_is_reported_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("deep");
    let mut p = src.clone();
    for _ in 0..1100 {
        p.push("d");
    }
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(src.join("top.txt"), b"top").unwrap();
    let (r, root) = back_up_and_restore(tmp.path(), &src);
    assert!(
        r.unreadable
            .iter()
            .any(|p| p.contains("deeper than 1024 levels")),
        "{:?}",
        r.unreadable
    );
    assert_eq!(std::fs::read(root.join("top.txt")).unwrap(), b"top");
}

/// `block restore --force` onto a symlink: it used to follow it (to a block device, or here to
/// a file the user does not own) and overwrite the target. Only links under /dev to a block
/// device are followed now; anything else is refused and left as it was.
#[test]
fn a_block_restore_does_not_follow_a_planted_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    std::fs::write(&img, vec![0x5a; 256 * 1024]).unwrap();
    let v = vault(tmp.path());
    let rp = backup_block(&v, &img, &BackupOptions::default(), &NoProgress)
        .unwrap()
        .rp;
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let target = tmp.path().join("restore.img");
    std::os::unix::fs::symlink(&victim, &target).unwrap();
    let force = RestoreOptions {
        force: true,
        ..RestoreOptions::default()
    };
    let err = restore_block(&v, &rp, &target, &force, &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(err.contains("symlink"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&target)
        .unwrap()
        .file_type()
        .is_symlink());
    // A regular file is still replaced with --force (by rename: never written through).
    std::fs::remove_file(&target).unwrap();
    std::fs::write(&target, b"old").unwrap();
    restore_block(&v, &rp, &target, &force, &NoProgress).unwrap();
    assert_eq!(
        std::fs::read(&target).unwrap(),
        std::fs::read(&img).unwrap()
    );
}
