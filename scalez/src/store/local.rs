//! A vault in a local directory: one file per object.
//!
//! Durability: every put writes a temporary file under `<root>/.tmp/`, fsyncs it, moves it into
//! place and fsyncs the directory, so after `put` returns the object survives a crash and a reader
//! never sees a half-written object. Create-only puts use `link(2)`, which fails atomically when
//! the name exists (unlike `rename`, which would replace it); overwrite puts use `rename(2)`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{validate_key, ObjectMeta, ObjectStore, PutMode, StoreError};

const TMP_DIR: &str = ".tmp";

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// A store rooted at `root`, which must be an existing directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let store = LocalStore { root };
        match fs::metadata(&store.root) {
            Ok(m) if m.is_dir() => Ok(store),
            Ok(_) => Err(store.io("", io::Error::other("not a directory"))),
            Err(e) => Err(store.io("", e)),
        }
    }

    /// Like [`LocalStore::open`], creating the directory (and its parents) first.
    pub fn create(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let store = LocalStore { root };
        fs::create_dir_all(&store.root).map_err(|e| store.io("", e))?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io(&self, key: &str, source: io::Error) -> StoreError {
        if source.kind() == io::ErrorKind::NotFound && !key.is_empty() {
            return StoreError::NotFound {
                store: self.location(),
                key: key.to_string(),
            };
        }
        StoreError::Io {
            store: self.location(),
            key: key.to_string(),
            source,
        }
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    /// Creates `dir` and any missing parents below the root, fsyncing each parent whose entries
    /// changed so the new directories are durable too.
    fn ensure_dir(&self, dir: &Path, key: &str) -> Result<(), StoreError> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            if parent != self.root && parent.starts_with(&self.root) {
                self.ensure_dir(parent, key)?;
            }
        }
        match fs::create_dir(dir) {
            Ok(()) => fsync_dir(dir.parent().unwrap_or(&self.root)).map_err(|e| self.io(key, e)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(self.io(key, e)),
        }
    }

    fn write_temp(&self, key: &str, data: &[u8]) -> Result<PathBuf, StoreError> {
        let tmp_dir = self.root.join(TMP_DIR);
        self.ensure_dir(&tmp_dir, key)?;
        let tmp = tmp_dir.join(format!("{:032x}", rand::random::<u128>()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(self.io(key, e));
        }
        Ok(tmp)
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl ObjectStore for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<(), StoreError> {
        let path = self.path(key)?;
        let dir = path
            .parent()
            .expect("object path has a parent")
            .to_path_buf();
        self.ensure_dir(&dir, key)?;
        let tmp = self.write_temp(key, data)?;
        let placed = match mode {
            PutMode::Overwrite => fs::rename(&tmp, &path),
            PutMode::Create => {
                let r = fs::hard_link(&tmp, &path);
                let _ = fs::remove_file(&tmp);
                r
            }
        };
        if let Err(e) = placed {
            let _ = fs::remove_file(&tmp);
            if e.kind() == io::ErrorKind::AlreadyExists {
                return Err(StoreError::AlreadyExists {
                    store: self.location(),
                    key: key.to_string(),
                });
            }
            return Err(self.io(key, e));
        }
        fsync_dir(&dir).map_err(|e| self.io(key, e))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path(key)?;
        fs::read(path).map_err(|e| self.io(key, e))
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        let path = self.path(key)?;
        let f = File::open(path).map_err(|e| self.io(key, e))?;
        let size = f.metadata().map_err(|e| self.io(key, e))?.len();
        if range.start > range.end || range.end > size {
            return Err(StoreError::BadRange {
                store: self.location(),
                key: key.to_string(),
                start: range.start,
                end: range.end,
                size,
            });
        }
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        f.read_exact_at(&mut buf, range.start)
            .map_err(|e| self.io(key, e))?;
        Ok(buf)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let base = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let mut out = Vec::new();
        let mut stack = vec![(self.root.join(base), base.to_string())];
        while let Some((dir, rel)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io(&rel, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.io(&rel, e))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with('.') {
                    continue;
                }
                let key = if rel.is_empty() {
                    name.to_string()
                } else {
                    format!("{rel}/{name}")
                };
                // An object deleted between the directory read and these calls (a prune, an
                // `rp delete` running alongside) is simply not listed.
                let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
                let ft = match entry.file_type() {
                    Ok(ft) => ft,
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(self.io(&key, e)),
                };
                if ft.is_dir() {
                    // Only descend where keys below can still match the prefix.
                    if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                        stack.push((entry.path(), key));
                    }
                } else if ft.is_file() && key.starts_with(prefix) {
                    let size = match entry.metadata() {
                        Ok(m) => m.len(),
                        Err(e) if gone(&e) => continue,
                        Err(e) => return Err(self.io(&key, e)),
                    };
                    out.push(ObjectMeta { key, size });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io(key, e)),
        }
        fsync_dir(path.parent().unwrap_or(&self.root)).map_err(|e| self.io(key, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Objects deleted while a listing runs are left out of it, never an error (a prune and a
    /// backup listing the catalog at once). Before the fix this failed within a few rounds.
    #[test]
    fn a_listing_racing_deletes_never_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(LocalStore::open(dir.path()).unwrap());
        for round in 0..8 {
            for i in 0..500 {
                store
                    .put(&format!("catalog/rp-{round}-{i:04}"), b"x", PutMode::Create)
                    .unwrap();
            }
            let s = store.clone();
            let deleter = std::thread::spawn(move || {
                for i in 0..500 {
                    s.delete(&format!("catalog/rp-{round}-{i:04}")).unwrap();
                }
            });
            while !deleter.is_finished() {
                let listed = store.list("catalog/").unwrap();
                assert!(listed.len() <= 500);
            }
            deleter.join().unwrap();
        }
    }

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        super::super::conformance::run_all(&LocalStore::open(dir.path()).unwrap());
        let other = tempfile::tempdir().unwrap();
        super::super::conformance::racing_creates(std::sync::Arc::new(
            LocalStore::open(other.path()).unwrap(),
        ));
    }

    #[test]
    fn no_temporary_files_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        store.put("a/b", b"x", PutMode::Create).unwrap();
        assert!(store.put("a/b", b"y", PutMode::Create).is_err());
        let leftovers: Vec<_> = fs::read_dir(dir.path().join(TMP_DIR)).unwrap().collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
        assert_eq!(store.get("a/b").unwrap(), b"x");
    }
}
