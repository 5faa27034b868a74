//! Disk maps: which chunk sits at each slot of a disk's fixed grid, as a tree of
//! content-addressed pages.
//!
//! Slot `i` covers bytes `[i*chunk_size, (i+1)*chunk_size)` of the disk. A **leaf page** holds up
//! to [`FANOUT`] slots; an **interior page** holds up to [`FANOUT`] child page ids. A missing entry
//! (bit clear in the page's bitmap) means "all zeros": a zero chunk, or a whole zero subtree. Pages
//! are stored as ordinary chunks (id = keyed BLAKE3 of the page bytes, sealed, packed, indexed),
//! so an incremental RP re-stores only the pages whose content changed plus their path to the root:
//! with 128 KiB chunks one leaf covers 128 MiB, and a 16 TiB disk with 1 % of its leaves changed
//! writes ~1 % of the map.
//!
//! ```text
//! page  = kind u8 ('L' leaf, 'I' interior) | level u8 (0 for leaves) | count u32 LE
//!         | bitmap ceil(count/8) bytes (bit i of byte i/8, LSB first) | 32-byte id per set bit
//! ```
//! The tree is uniform: its depth follows from the slot count alone, so a reader can descend to
//! slot `i` without any other metadata.

use std::sync::Arc;

use crate::ids::ChunkId;

/// Frozen: entries per page (format version 1).
pub const FANOUT: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// 0 for leaves.
    pub level: u8,
    pub entries: Vec<Option<ChunkId>>,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed map page: {0}")]
pub struct PageDecodeError(&'static str);

impl Page {
    pub fn encode(&self) -> Vec<u8> {
        let n = self.entries.len();
        let present = self.entries.iter().flatten().count();
        let mut out = Vec::with_capacity(6 + n.div_ceil(8) + present * 32);
        out.push(if self.level == 0 { b'L' } else { b'I' });
        out.push(self.level);
        out.extend_from_slice(&(n as u32).to_le_bytes());
        let mut bitmap = vec![0u8; n.div_ceil(8)];
        for (i, e) in self.entries.iter().enumerate() {
            if e.is_some() {
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        out.extend_from_slice(&bitmap);
        for id in self.entries.iter().flatten() {
            out.extend_from_slice(&id.0);
        }
        out
    }

    pub fn decode(data: &[u8]) -> Result<Page, PageDecodeError> {
        let err = PageDecodeError;
        if data.len() < 6 {
            return Err(err("truncated header"));
        }
        let level = data[1];
        match (data[0], level) {
            (b'L', 0) => {}
            (b'I', 1..) => {}
            _ => return Err(err("bad kind or level")),
        }
        let n = u32::from_le_bytes(data[2..6].try_into().unwrap()) as usize;
        if n > FANOUT {
            return Err(err("more entries than the fan-out"));
        }
        let bitmap = data
            .get(6..6 + n.div_ceil(8))
            .ok_or(err("truncated bitmap"))?;
        let mut ids = data[6 + n.div_ceil(8)..].chunks_exact(32);
        if !ids.remainder().is_empty() {
            return Err(err("trailing bytes"));
        }
        let mut entries = Vec::with_capacity(n);
        for i in 0..n {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                let id = ids.next().ok_or(err("fewer ids than bitmap bits"))?;
                entries.push(Some(ChunkId(id.try_into().unwrap())));
            } else {
                entries.push(None);
            }
        }
        if ids.next().is_some() {
            return Err(err("more ids than bitmap bits"));
        }
        Ok(Page { level, entries })
    }
}

/// Levels above the leaves for a disk of `slots` slots (0 when one leaf suffices).
pub fn depth_for(slots: u64) -> u8 {
    let mut count = slots.div_ceil(FANOUT as u64);
    let mut depth = 0;
    while count > 1 {
        count = count.div_ceil(FANOUT as u64);
        depth += 1;
    }
    depth
}

/// Builds a map from slots pushed in order. `store` receives each non-empty page's bytes and
/// returns its id (it hashes and stores it); all-empty pages are never stored.
pub struct MapBuilder {
    slots: u64,
    pushed: u64,
    depth: u8,
    pending: Vec<Vec<Option<ChunkId>>>,
}

impl MapBuilder {
    pub fn new(slots: u64) -> Self {
        let depth = depth_for(slots);
        MapBuilder {
            slots,
            pushed: 0,
            depth,
            pending: vec![Vec::with_capacity(FANOUT); depth as usize + 1],
        }
    }

    pub fn depth(&self) -> u8 {
        self.depth
    }

    pub fn push<E>(
        &mut self,
        slot: Option<ChunkId>,
        store: &mut impl FnMut(Vec<u8>) -> Result<ChunkId, E>,
    ) -> Result<(), E> {
        assert!(self.pushed < self.slots, "more slots pushed than declared");
        self.pushed += 1;
        self.pending[0].push(slot);
        let mut level = 0;
        while level < self.depth as usize && self.pending[level].len() == FANOUT {
            self.flush(level, store)?;
            level += 1;
        }
        Ok(())
    }

    fn flush<E>(
        &mut self,
        level: usize,
        store: &mut impl FnMut(Vec<u8>) -> Result<ChunkId, E>,
    ) -> Result<Option<ChunkId>, E> {
        let entries = std::mem::replace(&mut self.pending[level], Vec::with_capacity(FANOUT));
        let id = if entries.iter().all(Option::is_none) {
            None
        } else {
            Some(store(
                Page {
                    level: level as u8,
                    entries,
                }
                .encode(),
            )?)
        };
        if level < self.depth as usize {
            self.pending[level + 1].push(id);
        }
        Ok(id)
    }

    /// Flushes the partial pages and returns the root page id (None: the whole disk is zeros).
    pub fn finish<E>(
        mut self,
        store: &mut impl FnMut(Vec<u8>) -> Result<ChunkId, E>,
    ) -> Result<Option<ChunkId>, E> {
        assert_eq!(self.pushed, self.slots, "fewer slots pushed than declared");
        if self.slots == 0 {
            return Ok(None);
        }
        for level in 0..self.depth as usize {
            if !self.pending[level].is_empty() {
                self.flush(level, store)?;
            }
        }
        self.flush(self.depth as usize, store)
    }
}

/// Receives `(first slot, entries)` for each leaf range during [`MapReader::walk`].
pub type LeafVisitor<'a, E> = dyn FnMut(u64, &[Option<ChunkId>]) -> Result<(), E> + 'a;

/// Descends the tree. `load` returns a decoded page by id (shared, so callers can cache pages).
pub struct MapReader<'a, E> {
    root: Option<ChunkId>,
    depth: u8,
    slots: u64,
    load: &'a mut dyn FnMut(&ChunkId) -> Result<Arc<Page>, E>,
}

impl<'a, E> MapReader<'a, E> {
    /// A reader of the map a disk RP records, loading pages with `load`.
    pub fn of(
        map: &crate::catalog::DiskMapRef,
        load: &'a mut dyn FnMut(&ChunkId) -> Result<Arc<Page>, E>,
    ) -> Self {
        Self::new(map.root, map.depth, map.slots(), load)
    }

    /// A reader of the map of `slots` slots under `root` (a tree `depth` index levels high).
    pub fn new(
        root: Option<ChunkId>,
        depth: u8,
        slots: u64,
        load: &'a mut dyn FnMut(&ChunkId) -> Result<Arc<Page>, E>,
    ) -> Self {
        MapReader {
            root,
            depth,
            slots,
            load,
        }
    }

    /// Calls `f(first_slot, entries)` for each leaf range in order; zero subtrees are reported as
    /// runs of `None` without loading anything.
    pub fn walk(&mut self, f: &mut LeafVisitor<'_, E>) -> Result<(), E> {
        if self.slots == 0 {
            return Ok(());
        }
        let root = self.root;
        self.walk_node(root, self.depth, 0, f)
    }

    fn span(level: u8) -> u64 {
        (FANOUT as u64).pow(level as u32 + 1)
    }

    fn walk_node(
        &mut self,
        node: Option<ChunkId>,
        level: u8,
        first: u64,
        f: &mut LeafVisitor<'_, E>,
    ) -> Result<(), E> {
        let covered = Self::span(level).min(self.slots - first);
        let Some(id) = node else {
            // A zero subtree: report it in leaf-sized runs so callers see bounded slices.
            let zeros = vec![None; FANOUT];
            let mut s = first;
            while s < first + covered {
                let n = (first + covered - s).min(FANOUT as u64) as usize;
                f(s, &zeros[..n])?;
                s += n as u64;
            }
            return Ok(());
        };
        let page = (self.load)(&id)?;
        if level == 0 {
            return f(first, &page.entries);
        }
        let child_span = Self::span(level - 1);
        for (i, child) in page.entries.iter().enumerate() {
            self.walk_node(*child, level - 1, first + i as u64 * child_span, f)?;
        }
        Ok(())
    }

    /// The chunk at `slot` (None: zeros).
    pub fn lookup(&mut self, slot: u64) -> Result<Option<ChunkId>, E> {
        assert!(slot < self.slots);
        let mut node = self.root;
        let mut level = self.depth;
        loop {
            let Some(id) = node else { return Ok(None) };
            let page = (self.load)(&id)?;
            let index = if level == 0 {
                slot % FANOUT as u64
            } else {
                (slot / Self::span(level - 1)) % FANOUT as u64
            } as usize;
            let entry = page.entries.get(index).copied().flatten();
            if level == 0 {
                return Ok(entry);
            }
            node = entry;
            level -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn id(n: u64) -> ChunkId {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&n.to_le_bytes());
        b[8] = 1;
        ChunkId(b)
    }

    fn build(slots: &[Option<ChunkId>]) -> (Option<ChunkId>, u8, HashMap<ChunkId, Vec<u8>>) {
        let mut pages = HashMap::new();
        let mut b = MapBuilder::new(slots.len() as u64);
        let mut store = |bytes: Vec<u8>| -> Result<ChunkId, ()> {
            let id = ChunkId(*blake3::hash(&bytes).as_bytes());
            pages.insert(id, bytes);
            Ok(id)
        };
        for s in slots {
            b.push(*s, &mut store).unwrap();
        }
        let depth = b.depth();
        let root = b.finish(&mut store).unwrap();
        (root, depth, pages)
    }

    fn read_back(
        slots: u64,
        root: Option<ChunkId>,
        depth: u8,
        pages: &HashMap<ChunkId, Vec<u8>>,
    ) -> (Vec<Option<ChunkId>>, Vec<Option<ChunkId>>) {
        let mut load = |i: &ChunkId| -> Result<Arc<Page>, ()> {
            Ok(Arc::new(Page::decode(&pages[i]).unwrap()))
        };
        let mut r = MapReader::new(root, depth, slots, &mut load);
        let mut walked = Vec::new();
        r.walk(&mut |first, entries| {
            assert_eq!(first, walked.len() as u64);
            walked.extend_from_slice(entries);
            Ok(())
        })
        .unwrap();
        let looked: Vec<_> = (0..slots).map(|s| r.lookup(s).unwrap()).collect();
        (walked, looked)
    }

    proptest! {
        #[test]
        fn page_roundtrip(entries in proptest::collection::vec(proptest::option::of(any::<[u8; 32]>()), 0..FANOUT),
                          level in 0u8..3) {
            let page = Page { level, entries: entries.into_iter().map(|e| e.map(ChunkId)).collect() };
            prop_assert_eq!(Page::decode(&page.encode()).unwrap(), page);
        }

        #[test]
        fn page_decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Page::decode(&data);
        }

        #[test]
        fn map_roundtrip(n in 0usize..5000, density in 0u8..4, seed in any::<u64>()) {
            let slots: Vec<Option<ChunkId>> = (0..n as u64)
                .map(|i| ((i.wrapping_mul(seed | 1) >> 3) % 4 < density as u64).then(|| id(i)))
                .collect();
            let (root, depth, pages) = build(&slots);
            let (walked, looked) = read_back(n as u64, root, depth, &pages);
            prop_assert_eq!(&walked, &slots);
            prop_assert_eq!(&looked, &slots);
        }
    }

    #[test]
    fn three_levels_and_zero_subtrees() {
        // 1024*1024 + 5 slots: depth 2; only a few are set so most subtrees are zero.
        let n = FANOUT * FANOUT + 5;
        let mut slots = vec![None; n];
        slots[3] = Some(id(3));
        slots[n - 1] = Some(id(9));
        let (root, depth, pages) = build(&slots);
        assert_eq!(depth, 2);
        assert_eq!(
            pages.len(),
            2 + 2 + 1,
            "two leaves, two level-1 pages, one root"
        );
        let (walked, looked) = read_back(n as u64, root, depth, &pages);
        assert_eq!(walked, slots);
        assert_eq!(looked, slots);
        assert_eq!(build(&vec![None; 3000]).0, None);
    }

    #[test]
    fn one_changed_slot_rewrites_one_path() {
        let n = FANOUT * 64;
        let slots: Vec<_> = (0..n as u64).map(|i| Some(id(i))).collect();
        let (_, _, before) = build(&slots);
        let mut changed = slots.clone();
        changed[FANOUT * 10 + 7] = Some(id(u64::MAX));
        let (_, _, after) = build(&changed);
        let new_pages = after.keys().filter(|k| !before.contains_key(k)).count();
        assert_eq!(new_pages, 2, "one leaf and the root");
    }
}
