//! Packs: many sealed chunks in one object, so a backup writes few large objects.
//!
//! ```text
//! pack = "EZPACK01"                       8 bytes, frozen magic
//!        sealed chunk 0 .. sealed chunk n  each as produced by Keys::seal (aad "chunk:"+id)
//!        trailer                           sealed (aad "pack:"+pack id) list of entries
//!        trailer length                    u32 LE
//!        "EZPT"                            4 bytes, frozen magic
//! entry  = chunk id (32) | offset (u32 LE) | sealed length (u32 LE)
//! ```
//! The index is the fast path to a chunk; the trailer makes each pack self-describing so `check`
//! can verify the index against packs and a lost index can be rebuilt from packs alone.

use crate::crypto::{CryptoError, Keys};
use crate::ids::{ChunkId, PackId};

/// Frozen magic numbers (format version 1).
pub(crate) use crate::format::{PACK_MAGIC, TRAILER_MAGIC};
const ENTRY_LEN: usize = 40;

/// Where one chunk sits in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PackEntry {
    pub id: ChunkId,
    pub offset: u32,
    pub len: u32,
}

pub(crate) use crate::format::chunk_aad;
use crate::format::trailer_aad;

/// Accumulates sealed chunks in memory until the pack is full.
pub(crate) struct PackBuilder {
    id: PackId,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PackBuilder {
    pub(crate) fn new() -> Self {
        Self::with_capacity(0)
    }

    /// A builder whose buffer will not reallocate for a pack of about `target` bytes.
    pub(crate) fn with_capacity(target: usize) -> Self {
        // Room for the last chunk that crosses the target and the trailer.
        let mut buf = Vec::with_capacity(if target == 0 { 0 } else { target + (2 << 20) });
        buf.extend_from_slice(PACK_MAGIC);
        PackBuilder {
            id: PackId::random(),
            buf,
            entries: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, id: ChunkId, sealed: &[u8]) {
        let offset = u32::try_from(self.buf.len()).expect("packs stay below 4 GiB");
        self.buf.extend_from_slice(sealed);
        self.entries.push(PackEntry {
            id,
            offset,
            len: sealed.len() as u32,
        });
    }

    /// Bytes so far (the pack object will be this plus the trailer).
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The finished object and its entries.
    pub(crate) fn finish(mut self, keys: &Keys) -> (PackId, Vec<u8>, Vec<PackEntry>) {
        let mut plain = Vec::with_capacity(self.entries.len() * ENTRY_LEN);
        for e in &self.entries {
            plain.extend_from_slice(&e.id.0);
            plain.extend_from_slice(&e.offset.to_le_bytes());
            plain.extend_from_slice(&e.len.to_le_bytes());
        }
        let trailer = keys.seal(&trailer_aad(&self.id), &plain, None);
        self.buf.extend_from_slice(&trailer);
        self.buf
            .extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(TRAILER_MAGIC);
        (self.id, self.buf, self.entries)
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum PackError {
    #[error("not a pack (bad magic)")]
    BadMagic,
    #[error("trailer: {0}")]
    Trailer(#[from] CryptoError),
    #[error("trailer entries out of bounds")]
    OutOfBounds,
}

/// Decodes the entries of a whole pack object, checking its framing and trailer.
pub(crate) fn read_entries(
    keys: &Keys,
    pack: &PackId,
    data: &[u8],
) -> Result<Vec<PackEntry>, PackError> {
    if data.len() < PACK_MAGIC.len() + 8
        || &data[..8] != PACK_MAGIC
        || !data.ends_with(TRAILER_MAGIC)
    {
        return Err(PackError::BadMagic);
    }
    let n = data.len();
    let tlen = u32::from_le_bytes(data[n - 8..n - 4].try_into().unwrap()) as usize;
    let tstart = (n - 8).checked_sub(tlen).ok_or(PackError::OutOfBounds)?;
    if tstart < PACK_MAGIC.len() {
        return Err(PackError::OutOfBounds);
    }
    read_trailer(keys, pack, &data[tstart..n - 8], tstart as u64)
}

/// Decodes a pack's sealed trailer alone (`sealed`: the bytes between the last chunk and the
/// 8-byte tail), given where it starts in the pack: what `check` reads with two ranged reads
/// instead of the whole pack.
pub(crate) fn read_trailer(
    keys: &Keys,
    pack: &PackId,
    sealed: &[u8],
    tstart: u64,
) -> Result<Vec<PackEntry>, PackError> {
    let plain = keys.open(&trailer_aad(pack), sealed)?;
    if plain.len() % ENTRY_LEN != 0 {
        return Err(PackError::OutOfBounds);
    }
    let entries: Vec<PackEntry> = plain
        .chunks_exact(ENTRY_LEN)
        .map(|e| PackEntry {
            id: ChunkId(e[..32].try_into().unwrap()),
            offset: u32::from_le_bytes(e[32..36].try_into().unwrap()),
            len: u32::from_le_bytes(e[36..40].try_into().unwrap()),
        })
        .collect();
    if entries.iter().any(|e| {
        (e.offset as u64) < PACK_MAGIC.len() as u64 || e.offset as u64 + e.len as u64 > tstart
    }) {
        return Err(PackError::OutOfBounds);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    #[test]
    fn pack_roundtrip_and_tamper() {
        let keys = Keys::derive(&MasterKey::generate());
        let mut b = PackBuilder::new();
        let chunks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000 + i as usize]).collect();
        for c in &chunks {
            let id = keys.chunk_id(c);
            b.add(id, &keys.seal(&chunk_aad(&id), c, Some(1)));
        }
        let (pid, data, entries) = b.finish(&keys);
        assert_eq!(read_entries(&keys, &pid, &data).unwrap(), entries);
        for (e, c) in entries.iter().zip(&chunks) {
            let sealed = &data[e.offset as usize..(e.offset + e.len) as usize];
            assert_eq!(&keys.open(&chunk_aad(&e.id), sealed).unwrap(), c);
        }
        let mut bad = data.clone();
        let n = bad.len();
        bad[n - 20] ^= 1;
        assert!(read_entries(&keys, &pid, &bad).is_err());
        assert!(read_entries(&keys, &PackId::random(), &data).is_err());
        assert!(read_entries(&keys, &pid, &data[..n - 1]).is_err());
    }
}
