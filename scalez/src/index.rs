//! The chunk index: chunk id → (pack, offset, length).
//!
//! On the store, index objects (`index/<random 128-bit hex>`) are written by backups after the packs
//! they describe are durable; each is sealed with aad `"index:"+name`. In memory, all index objects
//! are merged into one hash table of 44-byte records (32-byte id, 4-byte pack number into a pack
//! table, offset, length): about 50 bytes per chunk with the table's load factor, i.e. ~400 MiB
//! per TiB of unique data at 128 KiB chunks. Loading it in pieces (a sorted, paged index) is the
//! planned next step for very large vaults; the on-store format already allows it.
//!
//! ```text
//! index object plaintext = "EZIX" | version u8 (=1) | pack count u32 | pack ids (16 each)
//!                          | entry count u32 | entries: id (32) | pack number u32 | offset u32 | len u32
//! ```

use std::collections::HashMap;

use crate::ids::{ChunkId, PackId};

pub const INDEX_MAGIC: &[u8; 4] = b"EZIX";
const INDEX_VERSION: u8 = 1;
const ENTRY_LEN: usize = 44;
/// High bit of a slot's length: prune's mark. Sealed chunks are far below 2 GiB.
const MARK: u32 = 1 << 31;

/// Location of a sealed chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: PackId,
    pub offset: u32,
    pub len: u32,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    pack: u32,
    offset: u32,
    len: u32,
}

/// The merged in-memory index.
#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<PackId>,
    pack_numbers: HashMap<PackId, u32>,
    chunks: HashMap<ChunkId, Slot>,
}

impl Index {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.chunks.contains_key(id)
    }

    pub fn get(&self, id: &ChunkId) -> Option<Location> {
        self.chunks.get(id).map(|s| Location {
            pack: self.packs[s.pack as usize],
            offset: s.offset,
            len: s.len & !MARK,
        })
    }

    /// Marks `id` (prune's "referenced" bit, kept in the entry so marking costs no memory).
    /// False if `id` is not indexed.
    pub fn mark(&mut self, id: &ChunkId) -> bool {
        match self.chunks.get_mut(id) {
            Some(s) => {
                s.len |= MARK;
                true
            }
            None => false,
        }
    }

    pub fn is_marked(&self, id: &ChunkId) -> bool {
        self.chunks.get(id).is_some_and(|s| s.len & MARK != 0)
    }

    pub fn clear_marks(&mut self) {
        for s in self.chunks.values_mut() {
            s.len &= !MARK;
        }
    }

    /// Points `id` at `loc` even if it is already indexed elsewhere.
    pub fn replace(&mut self, id: ChunkId, loc: Location) {
        self.chunks.remove(&id);
        self.insert(id, loc);
    }

    /// Adds an entry; the first location of a chunk wins (duplicates from racing writers are
    /// harmless, both copies are valid).
    pub fn insert(&mut self, id: ChunkId, loc: Location) {
        let next = self.packs.len() as u32;
        let pack = *self.pack_numbers.entry(loc.pack).or_insert_with(|| next);
        if pack == next {
            self.packs.push(loc.pack);
        }
        self.chunks.entry(id).or_insert(Slot {
            pack,
            offset: loc.offset,
            len: loc.len,
        });
    }

    pub fn iter(&self) -> impl Iterator<Item = (ChunkId, Location)> + '_ {
        self.chunks.keys().map(|id| (*id, self.get(id).unwrap()))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("malformed index object: {0}")]
pub struct IndexDecodeError(&'static str);

/// Encodes entries into an index object's plaintext.
pub fn encode(entries: &[(ChunkId, Location)]) -> Vec<u8> {
    let mut packs: Vec<PackId> = Vec::new();
    let mut numbers: HashMap<PackId, u32> = HashMap::new();
    for (_, l) in entries {
        numbers.entry(l.pack).or_insert_with(|| {
            packs.push(l.pack);
            packs.len() as u32 - 1
        });
    }
    let mut out = Vec::with_capacity(13 + packs.len() * 16 + entries.len() * ENTRY_LEN);
    out.extend_from_slice(INDEX_MAGIC);
    out.push(INDEX_VERSION);
    out.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for p in &packs {
        out.extend_from_slice(&p.0);
    }
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (id, l) in entries {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&numbers[&l.pack].to_le_bytes());
        out.extend_from_slice(&l.offset.to_le_bytes());
        out.extend_from_slice(&l.len.to_le_bytes());
    }
    out
}

pub fn decode(data: &[u8]) -> Result<Vec<(ChunkId, Location)>, IndexDecodeError> {
    let err = IndexDecodeError;
    if data.len() < 13 || &data[..4] != INDEX_MAGIC {
        return Err(err("bad magic"));
    }
    if data[4] != INDEX_VERSION {
        return Err(err("unknown index version"));
    }
    let u32_at = |i: usize| -> Result<u32, IndexDecodeError> {
        data.get(i..i + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .ok_or(err("truncated"))
    };
    let npacks = u32_at(5)? as usize;
    let mut pos: usize = 9;
    let packs_end = pos
        .checked_add(npacks.checked_mul(16).ok_or(err("pack count"))?)
        .ok_or(err("pack count"))?;
    let packs: Vec<PackId> = data
        .get(pos..packs_end)
        .ok_or(err("truncated pack table"))?
        .chunks_exact(16)
        .map(|p| PackId(p.try_into().unwrap()))
        .collect();
    pos = packs_end;
    let n = u32_at(pos)? as usize;
    pos += 4;
    let body = data.get(pos..).ok_or(err("truncated"))?;
    if body.len() != n.checked_mul(ENTRY_LEN).ok_or(err("entry count"))? {
        return Err(err("entry count does not match length"));
    }
    body.chunks_exact(ENTRY_LEN)
        .map(|e| {
            let pack = u32::from_le_bytes(e[32..36].try_into().unwrap()) as usize;
            Ok((
                ChunkId(e[..32].try_into().unwrap()),
                Location {
                    pack: *packs.get(pack).ok_or(err("pack number out of range"))?,
                    offset: u32::from_le_bytes(e[36..40].try_into().unwrap()),
                    len: u32::from_le_bytes(e[40..44].try_into().unwrap()),
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_decode(entries in proptest::collection::vec(
            (any::<[u8; 32]>(), 0u8..4, any::<u32>(), any::<u32>()), 0..200)) {
            let packs: Vec<PackId> = (0..4).map(|_| PackId::random()).collect();
            let entries: Vec<(ChunkId, Location)> = entries.into_iter().map(|(id, p, o, l)|
                (ChunkId(id), Location { pack: packs[p as usize], offset: o, len: l })).collect();
            let back = decode(&encode(&entries)).unwrap();
            prop_assert_eq!(back, entries);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&data);
        }
    }

    #[test]
    fn first_location_wins() {
        let mut ix = Index::new();
        let id = ChunkId([1; 32]);
        let a = Location {
            pack: PackId::random(),
            offset: 8,
            len: 10,
        };
        let b = Location {
            pack: PackId::random(),
            offset: 9,
            len: 11,
        };
        ix.insert(id, a);
        ix.insert(id, b);
        assert_eq!(ix.get(&id), Some(a));
        assert_eq!(ix.len(), 1);
    }
}
