//! The chunk index: chunk id → (pack, offset, length).
//!
//! On the store, index objects (`index/<random 128-bit hex>`) are written by backups after the packs
//! they describe are durable; each is sealed with aad `"index:"+name`. In memory, all index objects
//! are merged into one sorted vector of 44-byte records (32-byte id, 4-byte pack number into a pack
//! table, offset, length), searched by bisection: 44 bytes per chunk resident (440 MB for 10
//! million chunks, ~350 MiB per TiB of unique data at 128 KiB chunks). Chunks added after opening
//! go to a small hash map folded into the vector as it grows.
//!
//! ```text
//! index object plaintext = "EZIX" | version u8 (=1) | pack count u32 | pack ids (16 each)
//!                          | entry count u32 | entries: id (32) | pack number u32 | offset u32 | len u32
//! ```

use std::collections::HashMap;

use crate::ids::{ChunkId, PackId};

pub use crate::format::INDEX_MAGIC;
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

/// The merged in-memory index: the chunks loaded at open in one sorted vector of 44-byte records
/// (binary search; no table overhead), plus a hash map of the chunks added since (this process's
/// backups), folded into the vector when it grows past an eighth of it.
#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<PackId>,
    pack_numbers: HashMap<PackId, u32>,
    sorted: Vec<(ChunkId, Slot)>,
    recent: HashMap<ChunkId, Slot>,
}

/// Entries gathered for [`Index::add_bulk`].
pub struct Bulk(Vec<(ChunkId, Slot)>);

impl Index {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes this index holds in memory (capacity, not just length), for the documented bound.
    pub fn memory_bytes(&self) -> usize {
        self.sorted.capacity() * std::mem::size_of::<(ChunkId, Slot)>()
            + self.recent.capacity() * (std::mem::size_of::<(ChunkId, Slot)>() + 1)
            + self.packs.capacity() * 16
            + self.pack_numbers.capacity() * (std::mem::size_of::<(PackId, u32)>() + 1)
    }

    fn slot(&self, id: &ChunkId) -> Option<&Slot> {
        if let Some(s) = self.recent.get(id) {
            return Some(s);
        }
        self.sorted
            .binary_search_by(|(k, _)| k.0.cmp(&id.0))
            .ok()
            .map(|i| &self.sorted[i].1)
    }

    fn slot_mut(&mut self, id: &ChunkId) -> Option<&mut Slot> {
        if let Some(s) = self.recent.get_mut(id) {
            return Some(s);
        }
        match self.sorted.binary_search_by(|(k, _)| k.0.cmp(&id.0)) {
            Ok(i) => Some(&mut self.sorted[i].1),
            Err(_) => None,
        }
    }

    fn number(&mut self, pack: PackId) -> u32 {
        let next = self.packs.len() as u32;
        let n = *self.pack_numbers.entry(pack).or_insert(next);
        if n == next {
            self.packs.push(pack);
        }
        n
    }

    fn location(&self, s: &Slot) -> Location {
        Location {
            pack: self.packs[s.pack as usize],
            offset: s.offset,
            len: s.len & !MARK,
        }
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.slot(id).is_some()
    }

    pub fn get(&self, id: &ChunkId) -> Option<Location> {
        self.slot(id).map(|s| self.location(s))
    }

    /// Marks `id` (prune's "referenced" bit, kept in the entry so marking costs no memory).
    /// False if `id` is not indexed.
    pub fn mark(&mut self, id: &ChunkId) -> bool {
        match self.slot_mut(id) {
            Some(s) => {
                s.len |= MARK;
                true
            }
            None => false,
        }
    }

    pub fn is_marked(&self, id: &ChunkId) -> bool {
        self.slot(id).is_some_and(|s| s.len & MARK != 0)
    }

    pub fn clear_marks(&mut self) {
        for (_, s) in self.sorted.iter_mut() {
            s.len &= !MARK;
        }
        for s in self.recent.values_mut() {
            s.len &= !MARK;
        }
    }

    /// Points `id` at `loc` even if it is already indexed elsewhere.
    pub fn replace(&mut self, id: ChunkId, loc: Location) {
        let slot = Slot {
            pack: self.number(loc.pack),
            offset: loc.offset,
            len: loc.len,
        };
        match self.slot_mut(&id) {
            Some(s) => *s = slot,
            None => self.add_recent(id, slot),
        }
    }

    /// Adds an entry; the first location of a chunk wins (duplicates from racing writers are
    /// harmless, both copies are valid).
    pub fn insert(&mut self, id: ChunkId, loc: Location) {
        if self.contains(&id) {
            return;
        }
        let slot = Slot {
            pack: self.number(loc.pack),
            offset: loc.offset,
            len: loc.len,
        };
        self.add_recent(id, slot);
    }

    fn add_recent(&mut self, id: ChunkId, slot: Slot) {
        self.recent.insert(id, slot);
        if self.recent.len() > 4096 && self.recent.len() > self.sorted.len() / 8 {
            self.fold_recent();
        }
    }

    /// Moves the recent entries into the sorted vector.
    fn fold_recent(&mut self) {
        let mut add: Vec<(ChunkId, Slot)> = self.recent.drain().collect();
        add.sort_unstable_by_key(|e| e.0 .0);
        self.recent.shrink_to_fit();
        let old = std::mem::take(&mut self.sorted);
        let mut merged = Vec::with_capacity(old.len() + add.len());
        let (mut a, mut b) = (old.into_iter().peekable(), add.into_iter().peekable());
        loop {
            let take_a = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => x.0 .0 <= y.0 .0,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            merged.push(if take_a { a.next() } else { b.next() }.unwrap());
        }
        self.sorted = merged;
    }

    /// Starts a bulk load (opening a vault): entries are gathered, then sorted once. `bytes`:
    /// total size of the index objects to load, to allocate once (an object holds 44 bytes per
    /// entry plus a small header and pack table).
    pub fn bulk(&self, bytes: u64) -> Bulk {
        Bulk(Vec::with_capacity((bytes / ENTRY_LEN as u64) as usize))
    }

    pub fn bulk_push(&mut self, bulk: &mut Bulk, id: ChunkId, loc: Location) {
        let slot = Slot {
            pack: self.number(loc.pack),
            offset: loc.offset,
            len: loc.len,
        };
        bulk.0.push((id, slot));
    }

    /// Adds gathered entries. For a chunk listed several times the first listing wins, except
    /// that a location in a pack `avoid` rejects loses to one it accepts.
    pub fn add_bulk(&mut self, bulk: Bulk, avoid: &dyn Fn(&PackId) -> bool) {
        let mut v = bulk.0;
        if !self.is_empty() {
            for (id, s) in v {
                let loc = self.location(&s);
                match self.get(&id) {
                    Some(old) if avoid(&old.pack) && !avoid(&loc.pack) => self.replace(id, loc),
                    _ => self.insert(id, loc),
                }
            }
            return;
        }
        // In place, no second buffer: peak memory is the vector itself. Which of two valid copies
        // of a chunk wins does not matter, except that one in an avoided pack loses.
        v.sort_unstable_by_key(|e| e.0 .0);
        let packs = &self.packs;
        v.dedup_by(|later, kept| {
            if later.0 != kept.0 {
                return false;
            }
            if avoid(&packs[kept.1.pack as usize]) && !avoid(&packs[later.1.pack as usize]) {
                kept.1 = later.1;
            }
            true
        });
        v.shrink_to_fit();
        self.sorted = v;
    }

    pub fn iter(&self) -> impl Iterator<Item = (ChunkId, Location)> + '_ {
        self.sorted
            .iter()
            .map(|(id, s)| (*id, self.location(s)))
            .chain(self.recent.iter().map(|(id, s)| (*id, self.location(s))))
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

    fn loc(pack: PackId, n: u32) -> Location {
        Location {
            pack,
            offset: n,
            len: n + 1,
        }
    }

    proptest! {
        /// Bulk loads, inserts (folded into the sorted part as they accumulate), replaces and
        /// marks behave like a hash map with first-wins inserts.
        #[test]
        fn behaves_like_a_map(
            bulk in proptest::collection::vec((0u16..3000, 0u32..1000), 0..3000),
            ops in proptest::collection::vec((0u8..3, 0u16..12000, 0u32..1000), 0..9000),
        ) {
            let pack = PackId::random();
            let mut ix = Index::new();
            let mut model: HashMap<u16, Location> = HashMap::new();
            let mut b = ix.bulk(0);
            for (k, n) in &bulk {
                // Which copy of a duplicate wins a bulk load is unspecified: keep keys unique.
                if model.contains_key(k) {
                    continue;
                }
                let mut id = [0u8; 32];
                id[..2].copy_from_slice(&k.to_be_bytes());
                ix.bulk_push(&mut b, ChunkId(id), loc(pack, *n));
                model.insert(*k, loc(pack, *n));
            }
            ix.add_bulk(b, &|_| false);
            for (op, k, n) in ops {
                let mut id = [0u8; 32];
                id[..2].copy_from_slice(&k.to_be_bytes());
                let id = ChunkId(id);
                match op {
                    0 => {
                        ix.insert(id, loc(pack, n));
                        model.entry(k).or_insert(loc(pack, n));
                    }
                    1 => {
                        ix.replace(id, loc(pack, n));
                        model.insert(k, loc(pack, n));
                    }
                    _ => {
                        prop_assert_eq!(ix.mark(&id), model.contains_key(&k));
                        prop_assert_eq!(ix.is_marked(&id), model.contains_key(&k));
                    }
                }
                prop_assert_eq!(ix.get(&id), model.get(&k).copied());
            }
            prop_assert_eq!(ix.len(), model.len());
            ix.clear_marks();
            for (id, l) in ix.iter() {
                let k = u16::from_be_bytes([id.0[0], id.0[1]]);
                prop_assert_eq!(Some(l), model.get(&k).copied());
                prop_assert!(!ix.is_marked(&id));
            }
        }
    }

    #[test]
    fn bulk_prefers_copies_outside_avoided_packs() {
        let (old, new) = (PackId::random(), PackId::random());
        let id = ChunkId([9; 32]);
        for order in [[old, new], [new, old]] {
            let mut ix = Index::new();
            let mut b = ix.bulk(0);
            for (i, p) in order.iter().enumerate() {
                ix.bulk_push(&mut b, id, loc(*p, i as u32));
            }
            ix.add_bulk(b, &|p| *p == old);
            assert_eq!(ix.get(&id).unwrap().pack, new);
            assert_eq!(ix.len(), 1);
        }
    }

    /// The documented bound: at most 64 bytes per chunk resident after open.
    #[test]
    fn memory_per_chunk_after_open() {
        let packs: Vec<PackId> = (0..200).map(|_| PackId::random()).collect();
        let mut ix = Index::new();
        let n = 300_000u32;
        let mut b = ix.bulk(n as u64 * ENTRY_LEN as u64);
        for i in 0..n {
            let id = ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes());
            ix.bulk_push(&mut b, id, loc(packs[(i % 200) as usize], i));
        }
        ix.add_bulk(b, &|_| false);
        let per = ix.memory_bytes() as f64 / n as f64;
        assert!(per <= 64.0, "{per} bytes per chunk");
        assert!(per >= 44.0);
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
