//! The one cache of decoded chunks that every random-access reader uses (disk, stream and
//! file-tree views): an LRU bounded in bytes, single-flight loading (a chunk wanted by several
//! threads at once is fetched and decoded once, the others wait for it), and reuse of the
//! buffers it evicts (decoding into a fresh buffer costs a page fault per 4 KiB).
//!
//! Chunks are content-addressed and immutable, so a cached chunk never goes stale.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::error::Result;
use crate::ids::ChunkId;
use crate::vault::Vault;

/// Evicted buffers kept for reuse (8 MiB at the default disk chunk size).
const SPARE_MAX: usize = 64;

/// Decoded chunks by id, at most `max_bytes` of them (always at least the last one put).
pub struct ChunkCache {
    lru: Mutex<Lru>,
    /// Chunks being loaded right now, each with a gate later readers wait on.
    loading: Mutex<HashMap<ChunkId, Arc<Mutex<()>>>>,
    /// Buffers of evicted chunks nobody else held, to decode into again.
    spare: Mutex<Vec<Vec<u8>>>,
}

struct Lru {
    chunks: LruCache<ChunkId, Arc<Vec<u8>>>,
    bytes: usize,
    max_bytes: usize,
}

impl Lru {
    /// Caches `data`; returns the buffers of chunks this evicted that nobody else holds.
    fn put(&mut self, id: ChunkId, data: Arc<Vec<u8>>, freed: &mut Vec<Vec<u8>>) {
        self.bytes += data.len();
        if let Some((_, old)) = self.chunks.push(id, data) {
            self.bytes -= old.len();
            freed.extend(Arc::try_unwrap(old).ok());
        }
        while self.bytes > self.max_bytes && self.chunks.len() > 1 {
            let (_, old) = self.chunks.pop_lru().expect("not empty");
            self.bytes -= old.len();
            freed.extend(Arc::try_unwrap(old).ok());
        }
    }
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lru = self.lru.lock().unwrap();
        f.debug_struct("ChunkCache")
            .field("chunks", &lru.chunks.len())
            .field("bytes", &lru.bytes)
            .field("max_bytes", &lru.max_bytes)
            .finish()
    }
}

impl ChunkCache {
    pub fn new(max_bytes: usize) -> Self {
        ChunkCache {
            lru: Mutex::new(Lru {
                chunks: LruCache::unbounded(),
                bytes: 0,
                max_bytes,
            }),
            loading: Mutex::new(HashMap::new()),
            spare: Mutex::new(Vec::new()),
        }
    }

    pub fn get(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.lru.lock().unwrap().chunks.get(id).cloned()
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lru.lock().unwrap().chunks.contains(id)
    }

    /// Bytes of decoded chunks held now.
    pub fn bytes(&self) -> usize {
        self.lru.lock().unwrap().bytes
    }

    /// The chunk `id`, loaded by `load` on a miss. Single flight: while one thread loads a chunk,
    /// others asking for it wait and then find it cached. `load` gets recycled buffers to decode
    /// into (it may take one).
    pub fn get_or_load(
        &self,
        id: &ChunkId,
        load: impl FnOnce(&mut Vec<Vec<u8>>) -> Result<Vec<u8>>,
    ) -> Result<Arc<Vec<u8>>> {
        if let Some(c) = self.get(id) {
            return Ok(c);
        }
        let gate = self
            .loading
            .lock()
            .unwrap()
            .entry(*id)
            .or_insert_with(|| Arc::new(Mutex::new(())))
            .clone();
        let turn = gate.lock().unwrap();
        let result = match self.get(id) {
            Some(c) => Ok(c),
            None => {
                let mut spare = self.take_spare(1);
                let read = load(&mut spare).map(|d| {
                    let d = Arc::new(d);
                    self.lru.lock().unwrap().put(*id, d.clone(), &mut spare);
                    d
                });
                self.give_spare(spare);
                read
            }
        };
        drop(turn);
        let mut loading = self.loading.lock().unwrap();
        // The last waiter out removes the gate (the map's reference and ours are the two left).
        if loading.get(id).is_some_and(|g| Arc::ptr_eq(g, &gate)) && Arc::strong_count(&gate) == 2 {
            loading.remove(id);
        }
        result
    }

    /// Chunk `id` of `len` bytes, as `what` (a stream map, a file tree) names it: read from
    /// `vault` on a miss, and checked against `len` on every use, since a damaged structure can
    /// name one chunk with two lengths and the cache holds the chunk by id alone.
    pub fn get_sized(
        &self,
        vault: &Vault,
        id: &ChunkId,
        len: u32,
        what: &str,
    ) -> Result<Arc<Vec<u8>>> {
        let data = self.get_or_load(id, |spare| vault.read_chunk_sized(id, len, what, spare))?;
        if data.len() != len as usize {
            return Err(vault.chunk_len_error(id, data.len(), len, what));
        }
        Ok(data)
    }

    /// Loads the chunks of `run` that are neither cached nor being loaded by someone else, all
    /// with one call of `load` (a coalesced read), and caches them. Readers of any of them wait
    /// on one gate until it is done. `load` returns one chunk per item it is given, in order.
    pub fn load_many<K>(
        &self,
        mut run: Vec<(K, ChunkId)>,
        load: impl FnOnce(&[(K, ChunkId)], &mut Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>,
    ) -> Result<()> {
        let gate = Arc::new(Mutex::new(()));
        let _held = gate.lock().unwrap();
        {
            let mut loading = self.loading.lock().unwrap();
            run.retain(|(_, id)| {
                if loading.contains_key(id) || self.contains(id) {
                    return false;
                }
                loading.insert(*id, gate.clone());
                true
            });
        }
        if run.is_empty() {
            return Ok(());
        }
        let mut spare = self.take_spare(run.len());
        let result = load(&run, &mut spare).map(|chunks| {
            let mut lru = self.lru.lock().unwrap();
            for ((_, id), data) in run.iter().zip(chunks) {
                lru.put(*id, Arc::new(data), &mut spare);
            }
        });
        self.give_spare(spare);
        let mut loading = self.loading.lock().unwrap();
        for (_, id) in &run {
            if loading.get(id).is_some_and(|g| Arc::ptr_eq(g, &gate)) {
                loading.remove(id);
            }
        }
        result
    }

    /// Up to `n` recycled buffers.
    fn take_spare(&self, n: usize) -> Vec<Vec<u8>> {
        let mut spare = self.spare.lock().unwrap();
        let keep = spare.len().saturating_sub(n);
        spare.split_off(keep)
    }

    /// Returns unused or freed buffers to the pool, up to its bound.
    fn give_spare(&self, bufs: Vec<Vec<u8>>) {
        let mut spare = self.spare.lock().unwrap();
        let room = SPARE_MAX.saturating_sub(spare.len());
        spare.extend(bufs.into_iter().take(room));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[test]
    fn bounded_in_bytes_and_recycles_what_it_evicts() {
        let cache = ChunkCache::new(3000);
        for n in 0..5u8 {
            let got = cache
                .get_or_load(&id(n), |spare| {
                    let mut b = spare.pop().unwrap_or_default();
                    b.clear();
                    b.resize(1000, n);
                    Ok(b)
                })
                .unwrap();
            assert_eq!(*got, vec![n; 1000]);
        }
        assert_eq!(cache.bytes(), 3000);
        assert!(!cache.contains(&id(1)) && cache.contains(&id(4)));
        // Evicted buffers went to the pool and were decoded into again.
        assert!(!cache.spare.lock().unwrap().is_empty());
        // A chunk larger than the whole cache is still kept (alone).
        cache.get_or_load(&id(9), |_| Ok(vec![9; 10_000])).unwrap();
        assert_eq!(cache.bytes(), 10_000);
    }

    #[test]
    fn one_load_for_many_waiters_and_errors_are_not_cached() {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..8 {
                let (cache, loads) = (cache.clone(), loads.clone());
                s.spawn(move || {
                    cache
                        .get_or_load(&id(1), |_| {
                            loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(vec![1; 10])
                        })
                        .unwrap()
                });
            }
        });
        assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 1);
        let failed = cache.get_or_load(&id(2), |_| {
            Err(crate::Error::InvalidParameter("unreadable".into()))
        });
        assert!(failed.is_err() && !cache.contains(&id(2)));
        assert!(cache.loading.lock().unwrap().is_empty());
        // load_many skips what is cached and loads the rest in one call.
        cache
            .load_many(vec![(0u64, id(1)), (1, id(3))], |run, _| {
                assert_eq!(run, &[(1, id(3))]);
                Ok(vec![vec![3; 10]])
            })
            .unwrap();
        assert_eq!(*cache.get(&id(3)).unwrap(), vec![3; 10]);
    }

    #[test]
    fn a_chunk_named_with_two_lengths_is_damage_not_a_panic() {
        let vault = crate::testing::memory_vault(4096);
        let mut session = crate::BackupSession::new(vault.clone()).unwrap();
        let id = session.store_blob(&[5u8; 100]).unwrap();
        session.finish().unwrap();
        let cache = ChunkCache::new(1 << 20);
        assert_eq!(
            cache.get_sized(&vault, &id, 100, "the map").unwrap().len(),
            100
        );
        // Cached now: the second, wrong length is still caught.
        let err = cache.get_sized(&vault, &id, 90, "the map").unwrap_err();
        assert!(matches!(err, crate::Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("the map says 90"), "{err}");
    }
}
