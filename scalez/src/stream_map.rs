//! Stream maps: the ordered list of content-defined chunks of a stream RP.
//!
//! ```text
//! manifest blob = "EZSM" ‖ count u32 ‖ count × (chunk id (32) ‖ length u32)     (≤ 1024 entries)
//! root blob     = "EZSR" ‖ count u32 ‖ count × manifest id (32)
//! ```
//! Both are stored as ordinary chunks (sealed, packed, indexed, deduplicated). The catalog entry
//! holds the root id, the stream size and the chunk count ([`crate::catalog::StreamRef`]).

use crate::cache::ChunkCache;
use crate::catalog::StreamRef;
use crate::error::{Error, Result};
use crate::ids::ChunkId;
use crate::vault::Vault;

/// Entries per manifest blob (36 KiB).
pub const MANIFEST_ENTRIES: usize = 1024;
use crate::format::{STREAM_MANIFEST_MAGIC as MANIFEST_MAGIC, STREAM_ROOT_MAGIC as ROOT_MAGIC};

pub fn encode_manifest(entries: &[(ChunkId, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + entries.len() * 36);
    out.extend_from_slice(MANIFEST_MAGIC);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (id, len) in entries {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&len.to_le_bytes());
    }
    out
}

pub fn encode_root(manifests: &[ChunkId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + manifests.len() * 32);
    out.extend_from_slice(ROOT_MAGIC);
    out.extend_from_slice(&(manifests.len() as u32).to_le_bytes());
    for id in manifests {
        out.extend_from_slice(&id.0);
    }
    out
}

fn header(data: &[u8], magic: &[u8; 4], entry: usize) -> Option<usize> {
    if data.len() < 8 || &data[..4] != magic {
        return None;
    }
    let n = u32::from_le_bytes(data[4..8].try_into().unwrap()) as usize;
    (data.len() == 8 + n.checked_mul(entry)?).then_some(n)
}

pub fn decode_manifest(data: &[u8]) -> Option<Vec<(ChunkId, u32)>> {
    let n = header(data, MANIFEST_MAGIC, 36)?;
    Some(
        data[8..]
            .chunks_exact(36)
            .take(n)
            .map(|e| {
                (
                    ChunkId(e[..32].try_into().unwrap()),
                    u32::from_le_bytes(e[32..].try_into().unwrap()),
                )
            })
            .collect(),
    )
}

pub fn decode_root(data: &[u8]) -> Option<Vec<ChunkId>> {
    let n = header(data, ROOT_MAGIC, 32)?;
    Some(
        data[8..]
            .chunks_exact(32)
            .take(n)
            .map(|e| ChunkId(e.try_into().unwrap()))
            .collect(),
    )
}

/// The manifest ids of a stream (empty for an empty stream).
pub fn manifests(vault: &Vault, s: &StreamRef) -> Result<Vec<ChunkId>> {
    let Some(root) = &s.root else {
        return Ok(Vec::new());
    };
    let data = vault.read_chunk(root)?;
    decode_root(&data).ok_or_else(|| Error::Corrupt {
        location: vault.location(),
        key: format!("chunk {root}"),
        detail: "not a stream root".into(),
    })
}

/// The (chunk, length) entries of one manifest.
pub fn manifest(vault: &Vault, id: &ChunkId) -> Result<Vec<(ChunkId, u32)>> {
    let data = vault.read_chunk(id)?;
    decode_manifest(&data).ok_or_else(|| Error::Corrupt {
        location: vault.location(),
        key: format!("chunk {id}"),
        detail: "not a stream manifest".into(),
    })
}

/// Random access to a stream RP (for mounts): the chunk list is loaded once (44 bytes per chunk)
/// and decoded chunks are kept in a small LRU cache.
pub struct StreamReader {
    vault: std::sync::Arc<Vault>,
    size: u64,
    /// (start offset, chunk, length), in stream order.
    chunks: Vec<(u64, ChunkId, u32)>,
    cache: ChunkCache,
}

impl StreamReader {
    /// `cache_bytes` bounds the decoded chunks kept (at least one).
    pub fn open(vault: std::sync::Arc<Vault>, s: &StreamRef, cache_bytes: usize) -> Result<Self> {
        let mut chunks = Vec::with_capacity(s.chunks as usize);
        let mut at = 0u64;
        for m in manifests(&vault, s)? {
            for (id, len) in manifest(&vault, &m)? {
                chunks.push((at, id, len));
                at += len as u64;
            }
        }
        if at != s.size {
            return Err(Error::Corrupt {
                location: vault.location(),
                key: "stream map".into(),
                detail: format!("chunks add up to {at} bytes, the RP says {}", s.size),
            });
        }
        Ok(StreamReader {
            vault,
            size: s.size,
            chunks,
            cache: ChunkCache::new(cache_bytes),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Equal for two streams (of one vault) only if their bytes are: the keyed ids of their
    /// chunks in order, hashed. No chunk is read.
    pub fn content_key(&self) -> Vec<u8> {
        let mut h = blake3::Hasher::new();
        h.update(&self.size.to_le_bytes());
        for (_, id, len) in &self.chunks {
            h.update(&id.0);
            h.update(&len.to_le_bytes());
        }
        h.finalize().as_bytes().to_vec()
    }

    fn chunk(&self, i: usize) -> Result<std::sync::Arc<Vec<u8>>> {
        let (_, id, len) = self.chunks[i];
        self.cache
            .get_sized(&self.vault, &id, len, "the stream map")
    }

    /// Appends up to `len` bytes from `offset` (fewer at the end of the stream).
    pub fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<usize> {
        let end = offset.saturating_add(len as u64).min(self.size);
        let mut pos = offset;
        let mut i = match self.chunks.binary_search_by(|(s, _, _)| s.cmp(&offset)) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        while pos < end && i < self.chunks.len() {
            let (start, _, clen) = self.chunks[i];
            let data = self.chunk(i)?;
            let from = (pos - start) as usize;
            let to = ((end - start) as usize).min(clen as usize);
            out.extend_from_slice(&data[from..to]);
            pos = start + to as u64;
            i += 1;
        }
        Ok((pos - offset.min(pos)) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects() {
        let entries: Vec<(ChunkId, u32)> =
            (0..5u8).map(|i| (ChunkId([i; 32]), i as u32 * 7)).collect();
        let m = encode_manifest(&entries);
        assert_eq!(decode_manifest(&m).unwrap(), entries);
        let ids: Vec<ChunkId> = entries.iter().map(|e| e.0).collect();
        let r = encode_root(&ids);
        assert_eq!(decode_root(&r).unwrap(), ids);
        assert!(decode_root(&m).is_none());
        assert!(decode_manifest(&m[..m.len() - 1]).is_none());
        let mut bad = m.clone();
        bad[4] = 200;
        assert!(decode_manifest(&bad).is_none());
    }
}
