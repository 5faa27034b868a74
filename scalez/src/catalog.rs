//! The catalog: one object per recovery point, `catalog/<rp-id>`, sealed with aad `"rp:"+id`, written
//! create-only and **last** (after every pack, index and map page it references is durable). Its
//! existence is what makes an RP visible, so a crashed backup leaves only unreferenced garbage.
//!
//! Tags added after the fact go to separate immutable objects `tags/<rp-id>/<ulid>` (each a
//! [`TagUpdate`]); readers apply them in key order over the tags recorded at creation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{ChunkId, RecoveryPointId};

/// Frozen catalog entry version within format 1.
pub const RP_FORMAT: u32 = 1;

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

pub fn rp_aad(id: &RecoveryPointId) -> Vec<u8> {
    format!("rp:{id}").into_bytes()
}

pub fn tag_aad(key: &str) -> Vec<u8> {
    format!("tag:{key}").into_bytes()
}

/// Checks a tag key: non-empty, printable, no `=`.
pub fn validate_tag_key(k: &str) -> Result<(), String> {
    if k.is_empty() || k.len() > 128 || k.contains('=') || k.chars().any(char::is_control) {
        return Err(format!(
            "invalid tag key {k:?}: 1-128 printable characters without '='"
        ));
    }
    Ok(())
}
