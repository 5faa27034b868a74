//! The catalog: one object per recovery point, `catalog/<rp-id>`, sealed with aad `"rp:"+id`, written
//! create-only and **last** (after every pack, index and map page it references is durable). Its
//! existence is what makes an RP visible, so a crashed backup leaves only unreferenced garbage.
//!
//! Tags added after the fact go to separate immutable objects `tags/<rp-id>/<ulid>` (each a
//! [`TagUpdate`]); readers apply them in key order over the tags recorded at creation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{ChunkId, RecoveryPointId};
use crate::store::PutMode;
use crate::vault::Vault;

/// Frozen catalog entry version within format 1.
pub use crate::format::RP_FORMAT;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum RpKind {
    Disk,
    File,
    Stream,
    /// An EC2 instance: its shape and one disk RP per attached volume ([`InstanceRecord`]).
    Instance,
}

impl std::fmt::Display for RpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RpKind::Disk => "disk",
            RpKind::File => "file",
            RpKind::Stream => "stream",
            RpKind::Instance => "instance",
        })
    }
}

impl std::str::FromStr for RpKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "disk" | "block" => Ok(RpKind::Disk),
            "file" => Ok(RpKind::File),
            "stream" => Ok(RpKind::Stream),
            "instance" => Ok(RpKind::Instance),
            _ => Err(format!(
                "unknown RP type {s:?} (disk, file, stream or instance)"
            )),
        }
    }
}

/// What was backed up: a device path, image file, volume id or stream name, and the host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Asset {
    pub name: String,
    pub host: String,
}

/// Where a disk RP's block map lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskMapRef {
    pub chunk_size: u32,
    /// Disk size in bytes; the last slot may be partial.
    pub size: u64,
    pub depth: u8,
    /// None: the whole disk is zeros.
    pub root: Option<ChunkId>,
}

impl DiskMapRef {
    pub fn slots(&self) -> u64 {
        self.size.div_ceil(self.chunk_size as u64)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    pub format: u32,
    pub id: RecoveryPointId,
    pub kind: RpKind,
    pub asset: Asset,
    /// RFC 3339, UTC, milliseconds.
    pub created: String,
    pub parent: Option<RecoveryPointId>,
    /// Bytes of the source (disk size).
    pub logical_size: u64,
    /// Bytes actually read from the source (holes are skipped).
    pub bytes_read: u64,
    /// Bytes this backup added to the vault (packs and index objects).
    pub new_bytes_stored: u64,
    pub new_chunks: u64,
    pub duration_ms: u64,
    pub tags: BTreeMap<String, String>,
    pub disk: Option<DiskMapRef>,
    /// Instance RPs only: what is needed to recreate the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceRecord>,
    /// Stream RPs only: where the chunk list is ([`crate::stream_map`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamRef>,
    /// File RPs only: where the file tree is ([`crate::tree`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<TreeRef>,
}

impl RecoveryPoint {
    /// A disk RP's block map; an error naming the RP and its kind for any other.
    pub fn disk(&self) -> crate::Result<&DiskMapRef> {
        self.body_of(RpKind::Disk, self.disk.as_ref())
    }

    /// A stream RP's chunk list; an error naming the RP and its kind for any other.
    pub fn stream(&self) -> crate::Result<&StreamRef> {
        self.body_of(RpKind::Stream, self.stream.as_ref())
    }

    /// A file RP's tree; an error naming the RP and its kind for any other.
    pub fn tree(&self) -> crate::Result<&TreeRef> {
        self.body_of(RpKind::File, self.tree.as_ref())
    }

    /// An instance RP's record; an error naming the RP and its kind for any other.
    pub fn instance(&self) -> crate::Result<&InstanceRecord> {
        self.body_of(RpKind::Instance, self.instance.as_ref())
    }

    fn body_of<'a, T>(&self, wanted: RpKind, body: Option<&'a T>) -> crate::Result<&'a T> {
        match body {
            Some(b) if self.kind == wanted => Ok(b),
            // Its own kind without the body of that kind: the entry is damaged, not misused.
            None if self.kind == wanted => Err(crate::Error::MissingBody {
                id: self.id.clone(),
                kind: wanted,
            }),
            _ => Err(crate::Error::WrongKind {
                id: self.id.clone(),
                kind: self.kind,
                wanted,
            }),
        }
    }
}

/// What an RP holds, one body per kind.
#[derive(Debug, Clone)]
pub enum RpBody {
    Disk(DiskMapRef),
    Stream(StreamRef),
    Tree(TreeRef),
    Instance(InstanceRecord),
}

impl RpBody {
    pub fn kind(&self) -> RpKind {
        match self {
            RpBody::Disk(_) => RpKind::Disk,
            RpBody::Stream(_) => RpKind::Stream,
            RpBody::Tree(_) => RpKind::File,
            RpBody::Instance(_) => RpKind::Instance,
        }
    }
}

/// What a backup measured, for its catalog entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpFigures {
    /// Bytes of the source (disk size, stream length, sum of file sizes).
    pub logical_size: u64,
    /// Bytes actually read from the source.
    pub bytes_read: u64,
    /// Bytes this backup added to the vault (packs and index objects).
    pub new_bytes_stored: u64,
    pub new_chunks: u64,
}

impl RpFigures {
    /// The figures of a backup that read `bytes_read` of `logical_size` and stored what
    /// `stats` counts.
    pub fn stored(logical_size: u64, bytes_read: u64, stats: &crate::SessionStats) -> Self {
        RpFigures {
            logical_size,
            bytes_read,
            new_bytes_stored: stats.bytes_written,
            new_chunks: stats.new_chunks,
        }
    }
}

/// An RP being made. Its id and creation time are fixed when the backup starts, with its
/// asset, parent and tags; [`RpDraft::finish`] adds what it holds and what the backup
/// measured, and times it. The only way RPs are made (the catalog entry's format version,
/// id and timestamps are filled here, never by callers).
#[derive(Debug, Clone)]
pub struct RpDraft {
    pub id: RecoveryPointId,
    pub asset: Asset,
    pub parent: Option<RecoveryPointId>,
    pub tags: BTreeMap<String, String>,
    created: String,
    started: std::time::Instant,
}

impl RpDraft {
    /// A new RP of `asset`, created now.
    pub fn new(
        asset: Asset,
        parent: Option<RecoveryPointId>,
        tags: BTreeMap<String, String>,
    ) -> Self {
        RpDraft {
            id: RecoveryPointId::generate(),
            asset,
            parent,
            tags,
            created: crate::vault::now_rfc3339(),
            started: std::time::Instant::now(),
        }
    }

    /// When the backup started (RFC 3339, UTC, milliseconds).
    pub fn created(&self) -> &str {
        &self.created
    }

    /// The catalog entry: this draft with its body and figures; its duration is the time since
    /// [`RpDraft::new`].
    pub fn finish(self, body: RpBody, figures: RpFigures) -> RecoveryPoint {
        let kind = body.kind();
        let (mut disk, mut stream, mut tree, mut instance) = (None, None, None, None);
        match body {
            RpBody::Disk(d) => disk = Some(d),
            RpBody::Stream(s) => stream = Some(s),
            RpBody::Tree(t) => tree = Some(t),
            RpBody::Instance(i) => instance = Some(i),
        }
        RecoveryPoint {
            format: RP_FORMAT,
            id: self.id,
            kind,
            asset: self.asset,
            created: self.created,
            parent: self.parent,
            logical_size: figures.logical_size,
            bytes_read: figures.bytes_read,
            new_bytes_stored: figures.new_bytes_stored,
            new_chunks: figures.new_chunks,
            duration_ms: self.started.elapsed().as_millis() as u64,
            tags: self.tags,
            disk,
            instance,
            stream,
            tree,
        }
    }
}

/// Where a file RP's tree lives, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeRef {
    /// The tree stream (records of [`crate::tree`]) as a stream map.
    pub stream: StreamRef,
    /// The source paths as given (absolute).
    pub sources: Vec<String>,
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    /// Sum of regular-file sizes.
    pub file_bytes: u64,
}

/// Where a stream RP's chunk list lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRef {
    /// Stream length in bytes.
    pub size: u64,
    pub chunks: u64,
    /// The root blob listing the manifests (None: an empty stream).
    pub root: Option<ChunkId>,
}

/// The shape of a backed-up EC2 instance and the disk RPs of its volumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub instance_id: String,
    pub instance_type: String,
    pub availability_zone: String,
    pub image_id: Option<String>,
    pub root_device_name: Option<String>,
    pub subnet_id: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub volumes: Vec<InstanceVolume>,
}

/// One attached volume of an instance RP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceVolume {
    pub device_name: String,
    pub volume_id: String,
    pub volume_type: Option<String>,
    pub size_gib: u64,
    pub delete_on_termination: bool,
    /// The volume's disk RP.
    pub rp: RecoveryPointId,
}

/// A later change to an RP's tags (`tags/<rp-id>/<ulid>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagUpdate {
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

impl TagUpdate {
    pub fn apply(&self, tags: &mut BTreeMap<String, String>) {
        for k in &self.remove {
            tags.remove(k);
        }
        for (k, v) in &self.set {
            tags.insert(k.clone(), v.clone());
        }
    }
}

pub use crate::format::{rp_aad, tag_aad};

/// Checks a tag key: non-empty, printable, no `=`.
pub fn validate_tag_key(k: &str) -> Result<(), String> {
    if k.is_empty() || k.len() > 128 || k.contains('=') || k.chars().any(char::is_control) {
        return Err(format!(
            "invalid tag key {k:?}: 1-128 printable characters without '='"
        ));
    }
    Ok(())
}

/// Reading and writing catalog entries and tag updates.
impl Vault {
    /// Makes `rp` visible. Call only after the session that wrote its data finished.
    pub fn commit_rp(&self, rp: &RecoveryPoint) -> Result<()> {
        let body = serde_json::to_vec(rp).expect("serialisable");
        let sealed = self.keys().seal(&rp_aad(&rp.id), &body, Some(1));
        self.store()
            .put(&rp.id.catalog_key(), &sealed, PutMode::Create)?;
        Ok(())
    }

    pub(crate) fn read_rp(&self, key: &str, id: &RecoveryPointId) -> Result<RecoveryPoint> {
        let sealed = match self.store().get(key) {
            Ok(s) => s,
            Err(e) if e.is_not_found() => {
                return Err(Error::RpNotFound {
                    location: self.location(),
                    id: id.clone(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let plain = self
            .keys()
            .open(&rp_aad(id), &sealed)
            .map_err(|e| self.corrupt(key, e.to_string()))?;
        let mut rp: RecoveryPoint =
            serde_json::from_slice(&plain).map_err(|e| self.corrupt(key, e.to_string()))?;
        if &rp.id != id {
            return Err(self.corrupt(key, format!("holds recovery point {}", rp.id)));
        }
        for t in self.store().list(&id.tags_prefix())? {
            if !is_canonical_tag_key(&t.key, id) {
                tracing::warn!(key = %t.key, "ignoring a tag object whose name is not canonical");
                continue;
            }
            let sealed = match self.store().get(&t.key) {
                Ok(s) => s,
                // Deleted with its RP since the listing (rp delete, prune).
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            };
            let plain = self
                .keys()
                .open(&tag_aad(&t.key), &sealed)
                .map_err(|e| self.corrupt(&t.key, e.to_string()))?;
            let update: TagUpdate =
                serde_json::from_slice(&plain).map_err(|e| self.corrupt(&t.key, e.to_string()))?;
            update.apply(&mut rp.tags);
        }
        Ok(rp)
    }

    pub fn get_rp(&self, id: &RecoveryPointId) -> Result<RecoveryPoint> {
        self.read_rp(&id.catalog_key(), id)
    }

    /// All visible RPs, oldest first, with later tag updates applied.
    pub fn list_rps(&self) -> Result<Vec<RecoveryPoint>> {
        let mut out = Vec::new();
        for obj in self.store().list("catalog/")? {
            let name = obj.key.trim_start_matches("catalog/");
            // Only this engine names catalog entries, always canonically: anything else was
            // planted (or is junk) and is ignored here; `check` reports it.
            let Some(id) = RecoveryPointId::from_object_name(name) else {
                tracing::warn!(key = %obj.key, "ignoring a catalog object whose name is not a canonical RP id");
                continue;
            };
            match self.read_rp(&obj.key, &id) {
                Ok(rp) => out.push(rp),
                // Deleted (rp delete, prune) between the listing and the read: gone, not
                // damage. Backups list the catalog to find their parent while prunes run.
                Err(Error::RpNotFound { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// The newest RP of `kind` for `asset`, the parent of the next backup.
    pub fn latest_rp(&self, kind: RpKind, asset: &Asset) -> Result<Option<RecoveryPoint>> {
        Ok(self
            .list_rps()?
            .into_iter()
            .rfind(|rp| rp.kind == kind && &rp.asset == asset))
    }

    /// Records a tag change as a new immutable object and returns the updated RP.
    pub fn update_tags(&self, id: &RecoveryPointId, update: &TagUpdate) -> Result<RecoveryPoint> {
        for k in update.set.keys().chain(&update.remove) {
            validate_tag_key(k).map_err(Error::InvalidParameter)?;
        }
        self.get_rp(id)?;
        // Updates apply in key order, so a new one must sort after every update already there
        // (two in the same millisecond got random order: `protect` then `unprotect` could
        // leave the RP protected).
        let mut next = ulid::Ulid::new();
        for t in self.store().list(&id.tags_prefix())? {
            if !is_canonical_tag_key(&t.key, id) {
                continue;
            }
            if let Ok(u) = ulid::Ulid::from_string(&t.key[id.tags_prefix().len()..]) {
                if u >= next {
                    next = u.increment().ok_or_else(|| {
                        Error::InvalidParameter(format!("{id}: no tag update can follow {u}"))
                    })?;
                }
            }
        }
        let key = format!(
            "{}{}",
            id.tags_prefix(),
            next.to_string().to_ascii_lowercase()
        );
        let body = serde_json::to_vec(update).expect("serialisable");
        let sealed = self.keys().seal(&tag_aad(&key), &body, None);
        self.store().put(&key, &sealed, PutMode::Create)?;
        self.get_rp(id)
    }
}

/// Whether `key` is a name [`Vault::update_tags`] writes for `rp`: `tags/<rp>/<lower-case ulid>`.
pub(crate) fn is_canonical_tag_key(key: &str, rp: &RecoveryPointId) -> bool {
    key.strip_prefix(&rp.tags_prefix())
        .and_then(|u| {
            ulid::Ulid::from_string(u)
                .ok()
                .filter(|p| p.to_string().to_ascii_lowercase() == u)
        })
        .is_some()
}

/// Parses `k=v` tag arguments.
pub fn parse_tags<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in args {
        let (k, v) = a.split_once('=').ok_or_else(|| {
            Error::InvalidParameter(format!("tag {a:?} is not of the form key=value"))
        })?;
        validate_tag_key(k).map_err(Error::InvalidParameter)?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A draft becomes an RP of its body's kind; asking it for another kind's body names the
    /// RP and both kinds (a stream restore of a disk RP used to say "... not a disk").
    #[test]
    fn drafts_make_rps_of_their_body_and_accessors_name_the_kind() {
        let asset = Asset {
            name: "db".into(),
            host: "h".into(),
        };
        let draft = RpDraft::new(asset, None, BTreeMap::new());
        let id = draft.id.clone();
        let stream = StreamRef {
            size: 10,
            chunks: 1,
            root: None,
        };
        let rp = draft.finish(
            RpBody::Stream(stream.clone()),
            RpFigures {
                logical_size: 10,
                ..Default::default()
            },
        );
        assert_eq!(
            (rp.kind, rp.format, &rp.id),
            (RpKind::Stream, RP_FORMAT, &id)
        );
        assert_eq!(rp.stream().unwrap(), &stream);
        assert!(rp.disk.is_none() && rp.tree.is_none() && rp.instance.is_none());
        let err = rp.disk().unwrap_err().to_string();
        assert!(
            err.contains(&id.to_string()) && err.contains("stream") && err.contains("not a disk"),
            "{err}"
        );
        // A stream RP whose entry lost its stream body is damage, not the wrong kind.
        let mut damaged = rp.clone();
        damaged.stream = None;
        let err = damaged.stream().unwrap_err();
        assert!(matches!(err, Error::MissingBody { .. }), "{err}");
        assert!(err.to_string().contains("run check"), "{err}");
    }
}
