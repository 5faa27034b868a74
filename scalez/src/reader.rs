//! Random access to a disk RP: `read_at(offset, buf)` over its map, with a chunk cache.
//!
//! The restore pipeline walks the map directly (sequential, parallel, no cache needed); this
//! reader serves random access (FUSE, NBD). Chunks go through the shared [`crate::cache::ChunkCache`]
//! (bounded in bytes, single flight); a small LRU keeps the last 64 decoded map pages.
//! RPs are immutable, so cached data never goes stale.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, OnceLock};

use crossbeam_channel::Sender;

use lru::LruCache;

use crate::cache::ChunkCache;
use crate::catalog::DiskMapRef;
use crate::disk_map::{MapReader, Page};
use crate::error::{Error, Result};
use crate::fetch::plan_reads;
use crate::ids::ChunkId;
use crate::vault::{Vault, Verify};

pub struct DiskReader {
    vault: Arc<Vault>,
    map: DiskMapRef,
    chunks: ChunkCache,
    pages: Mutex<LruCache<ChunkId, Arc<Page>>>,
    readahead: OnceLock<ReadAhead>,
    /// One chunk of zeros, shared by every zero run [`DiskReader::read_segments`] returns.
    zeros: OnceLock<Arc<Vec<u8>>>,
}

/// A slice of a shared buffer (a cached chunk, or zeros).
#[derive(Clone)]
pub struct Segment {
    pub data: Arc<Vec<u8>>,
    pub range: std::ops::Range<usize>,
}

impl Segment {
    pub fn bytes(&self) -> &[u8] {
        &self.data[self.range.clone()]
    }
}

/// Slots per read-ahead job: remote stores fetch a job's chunks in few large ranged reads;
/// local ones keep jobs small so the threads share the work evenly.
const GROUP_REMOTE: u64 = 64;
const GROUP_LOCAL: u64 = 4;
/// Slots a demand miss on a remote store fetches together (1 MiB of disk at the default chunk
/// size: a ranged GET of that size costs about as much as one of a single chunk).
const DEMAND_GROUP: u64 = 8;
/// Groups a sequential stream is kept fetched ahead (at least). Measured with nbdcopy from an
/// RGW vault: 3 groups starve the fetch threads, 16 overflow a 256 MiB cache with 4 streams.
const RA_GROUPS: u64 = 8;

/// Sequential streams followed at once (e.g. nbdcopy's connections, several FUSE readers).
const MAX_STREAMS: usize = 16;
/// Slots a read may start past its stream's end and still continue it.
const STREAM_SLACK: u64 = 32;

/// One sequential reader: where its last read ended and how far ahead it is queued.
struct Stream {
    next: u64,
    /// The group after the last one queued, so a stream queues each group once.
    queued_to: u64,
}

/// Sequential-read detection and the queue of slot groups to prefetch.
struct ReadAhead {
    queue: Sender<u64>,
    /// Recently seen streams, most recent first.
    streams: Mutex<Vec<Stream>>,
    /// Slots to keep fetched ahead of a sequential reader.
    window: u64,
    /// Slots per read-ahead job.
    group: u64,
}

impl DiskReader {
    /// `cache_bytes` bounds the chunk cache (at least one chunk is always cached).
    pub fn new(vault: Arc<Vault>, map: DiskMapRef, cache_bytes: usize) -> Self {
        DiskReader {
            vault,
            map,
            chunks: ChunkCache::new(cache_bytes),
            pages: Mutex::new(LruCache::new(NonZeroUsize::new(64).unwrap())),
            readahead: OnceLock::new(),
            zeros: OnceLock::new(),
        }
    }

    /// Turns on read-ahead: when a read continues one of the recent sequential streams (see
    /// `note_read`), the next `window` slots of that stream are fetched and decoded into the
    /// cache by `threads` background threads, a group of slots at a time (more threads, larger
    /// groups and a wider window on remote stores). The threads hold only a weak reference and
    /// stop when the reader is dropped.
    pub fn enable_readahead(self: &Arc<Self>, window: u64, threads: usize) {
        // Remote stores: more fetches in flight, each a coalesced read of many chunks.
        let remote = self.vault.store().read_parallelism() > 1;
        let threads = threads.max(self.vault.store().read_parallelism()).max(1);
        let group = if remote { GROUP_REMOTE } else { GROUP_LOCAL };
        // Enough ahead to keep the threads busy, little enough that several streams' windows
        // fit in the cache.
        let window = if remote {
            window.max(RA_GROUPS * group)
        } else {
            window
        };
        // Room for every stream's window: a full queue silently drops read-ahead.
        let (tx, rx) =
            crossbeam_channel::bounded::<u64>((window / group) as usize * MAX_STREAMS + 16);
        let ra = ReadAhead {
            queue: tx,
            streams: Mutex::new(Vec::new()),
            window,
            group,
        };
        if self.readahead.set(ra).is_err() {
            return; // already enabled
        }
        for _ in 0..threads {
            let (weak, rx) = (Arc::downgrade(self), rx.clone());
            std::thread::Builder::new()
                .name("scalez-readahead".into())
                .spawn(move || {
                    for g in rx {
                        let Some(reader) = weak.upgrade() else { break };
                        // Errors surface when the slot is really read; prefetch stays quiet.
                        let _ = reader.prefetch_group(g, group);
                    }
                })
                .expect("spawn read-ahead thread");
        }
    }

    /// Loads the uncached chunks of slots `[g * group, (g + 1) * group)`, sorted by where they
    /// sit in the packs and fetched as coalesced reads (one request per run on S3). Each run is
    /// claimed under one gate that readers of any of its chunks wait on.
    fn prefetch_group(&self, g: u64, group: u64) -> Result<()> {
        let (lo, hi) = (g * group, ((g + 1) * group).min(self.map.slots()));
        let mut items = Vec::new();
        for slot in lo..hi {
            if let Some(id) = self.chunk_id(slot)? {
                if !self.chunks.contains(&id) {
                    items.push((slot, id));
                }
            }
        }
        plan_reads(&self.vault, items, usize::MAX, |run| self.load_run(run))
    }

    /// Fetches `run` (chunks a coalesced read can cover) into the cache, skipping chunks
    /// someone else is already loading.
    fn load_run(&self, run: Vec<(u64, ChunkId)>) -> Result<()> {
        self.chunks.load_many(run, |run, spare| {
            self.vault
                .read_disk_chunks_with(&self.map, run, Verify::AeadOnly, spare)
        })
    }

    /// Records a read of slots `[first, end)` and queues read-ahead if it continues the last one.
    fn note_read(&self, first: u64, end: u64) {
        let Some(ra) = self.readahead.get() else {
            return;
        };
        let mut streams = ra.streams.lock().unwrap();
        // A read continues a stream if it starts in the slot where the stream ended (unaligned
        // reads, e.g. of files in a file system, end and start inside one chunk) or a little
        // after it (clients with many requests in flight, like nbdcopy, complete them out of
        // order).
        let hit = streams
            .iter()
            .position(|s| first + 1 >= s.next && first <= s.next + STREAM_SLACK);
        let Some(i) = hit else {
            streams.insert(
                0,
                Stream {
                    next: end,
                    queued_to: 0,
                },
            );
            streams.truncate(MAX_STREAMS);
            return;
        };
        let mut st = streams.remove(i);
        st.next = st.next.max(end);
        let stop = (st.next + ra.window).min(self.map.slots());
        let from = st.queued_to.max(st.next / ra.group);
        let to = stop.div_ceil(ra.group);
        let mut queued = from;
        for g in from..to {
            if ra.queue.try_send(g).is_err() {
                break;
            }
            queued = g + 1;
        }
        st.queued_to = st.queued_to.max(queued);
        streams.insert(0, st);
    }

    /// Bytes of the disk held in stored chunks (the rest is zeros), from a walk of the map pages
    /// (one page per 1024 slots, never the chunks).
    pub fn stored_bytes(&self) -> Result<u64> {
        let cs = self.map.chunk_size as u64;
        let size = self.map.size;
        let mut load = |id: &ChunkId| self.page(id);
        let mut total = 0u64;
        MapReader::of(&self.map, &mut load).walk(&mut |first, entries| {
            for (i, e) in entries.iter().enumerate() {
                if e.is_some() {
                    let slot = first + i as u64;
                    total += cs.min(size - slot * cs);
                }
            }
            Ok(())
        })?;
        Ok(total)
    }

    /// Whether every chunk of `[offset, offset+len)` is cached (or zeros), so a read of it will
    /// not fetch or decode anything.
    pub fn is_range_cached(&self, offset: u64, len: u64) -> Result<bool> {
        let cs = self.map.chunk_size as u64;
        let end = (offset + len).min(self.map.size);
        for slot in offset / cs..end.div_ceil(cs) {
            if !self.is_cached(slot)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether the chunk at `slot` is in the cache (zero slots count as cached).
    pub fn is_cached(&self, slot: u64) -> Result<bool> {
        Ok(match self.chunk_id(slot)? {
            None => true,
            Some(id) => self.chunks.contains(&id),
        })
    }

    pub fn size(&self) -> u64 {
        self.map.size
    }

    fn page(&self, id: &ChunkId) -> Result<Arc<Page>> {
        if let Some(p) = self.pages.lock().unwrap().get(id) {
            return Ok(p.clone());
        }
        let p = Arc::new(self.vault.load_page(id)?);
        self.pages.lock().unwrap().put(*id, p.clone());
        Ok(p)
    }

    pub fn chunk_size(&self) -> u32 {
        self.map.chunk_size
    }

    /// The chunk id at `slot` (None: zeros), from the map alone.
    pub fn chunk_id(&self, slot: u64) -> Result<Option<ChunkId>> {
        let mut load = |id: &ChunkId| self.page(id);
        MapReader::of(&self.map, &mut load).lookup(slot)
    }

    /// Splits `[offset, offset + len)` (clipped to the disk) into runs of stored data (`true`) and
    /// zeros (`false`), at chunk granularity, reading only the map. At most `max_runs` runs.
    pub fn extents(&self, offset: u64, len: u64, max_runs: usize) -> Result<Vec<(u64, bool)>> {
        let end = offset.saturating_add(len).min(self.map.size);
        let cs = self.map.chunk_size as u64;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let slot = pos / cs;
            let n = ((slot + 1) * cs).min(end) - pos;
            let data = self.chunk_id(slot)?.is_some();
            if let Some((l, _)) = runs.last_mut().filter(|(_, d)| *d == data) {
                *l += n;
            } else if runs.len() == max_runs {
                break;
            } else {
                runs.push((n, data));
            }
            pos += n;
        }
        Ok(runs)
    }

    /// The chunk at `slot`, None for zeros.
    pub fn slot(&self, slot: u64) -> Result<Option<Arc<Vec<u8>>>> {
        let Some(id) = self.chunk_id(slot)? else {
            return Ok(None);
        };
        if let Some(c) = self.chunks.get(&id) {
            return Ok(Some(c));
        }
        if self.vault.store().read_parallelism() > 1 {
            // Remote store: a miss fetches its aligned neighbourhood in one coalesced request,
            // so clients with many small reads in flight (nbdcopy) cost a request per MiB, not
            // per chunk. A failure here is retried below for this chunk alone.
            let _ = self.prefetch_group(slot / DEMAND_GROUP, DEMAND_GROUP);
        }
        // Single flight: read-ahead and parallel requests would otherwise decode a chunk twice.
        self.chunks
            .get_or_load(&id, |spare| {
                self.vault
                    .read_disk_chunk_with(&self.map, slot, &id, Verify::AeadOnly, spare)
            })
            .map(Some)
    }

    /// The bytes `[offset, offset+len)` (clipped to the disk) as slices of cached chunks, without
    /// copying: for servers that write them straight to a socket. Zero runs share one buffer.
    pub fn read_segments(&self, offset: u64, len: usize) -> Result<Vec<Segment>> {
        if offset >= self.map.size {
            return Ok(Vec::new());
        }
        let len = len.min((self.map.size - offset) as usize);
        let cs = self.map.chunk_size as u64;
        self.note_read(offset / cs, (offset + len as u64).div_ceil(cs));
        let mut out = Vec::with_capacity(len.div_ceil(cs as usize) + 1);
        let mut done = 0;
        while done < len {
            let pos = offset + done as u64;
            let (slot, within) = (pos / cs, (pos % cs) as usize);
            let n = (cs as usize - within).min(len - done);
            let data = match self.slot(slot)? {
                Some(c) => c,
                None => self
                    .zeros
                    .get_or_init(|| Arc::new(vec![0u8; cs as usize]))
                    .clone(),
            };
            out.push(Segment {
                data,
                range: within..within + n,
            });
            done += n;
        }
        Ok(out)
    }

    /// Appends the bytes `[offset, offset+len)` (clipped to the disk) to `out`, copying chunks
    /// straight from the cache without zero-filling first; returns the bytes appended.
    pub fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<usize> {
        let segments = self.read_segments(offset, len)?;
        let start = out.len();
        for seg in &segments {
            out.extend_from_slice(seg.bytes());
        }
        Ok(out.len() - start)
    }

    /// Fills `buf` from `offset`; returns the bytes read (short only at the end of the disk).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        for seg in self.read_segments(offset, buf.len())? {
            let bytes = seg.bytes();
            buf[done..done + bytes.len()].copy_from_slice(bytes);
            done += bytes.len();
        }
        Ok(done)
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        std::io::Error::other(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::DiskMapRef;

    const CS: usize = 4096;

    fn store_disk(disk: &[u8]) -> (Arc<Vault>, DiskMapRef) {
        let vault = crate::testing::memory_vault(CS as u32);
        let map = crate::testing::store_disk(&vault, disk);
        (vault, map)
    }

    /// A disk of 5.5 chunks of 4 KiB: data, zeros, data, a repeat of slot 0, zeros, a short tail.
    #[test]
    fn random_reads_match_the_disk() {
        let cs = CS;
        let mut disk = vec![0u8; cs * 5 + cs / 2];
        for (i, b) in disk.iter_mut().enumerate() {
            let slot = i / cs;
            if slot == 0 || slot == 2 || slot == 5 {
                *b = (i * 7 + slot) as u8 | 1;
            }
        }
        let first = disk[..cs].to_vec();
        disk[3 * cs..4 * cs].copy_from_slice(&first);
        let (vault, map) = store_disk(&disk);
        let reader = DiskReader::new(vault, map, 2 * cs);
        for (off, len) in [
            (0, 10),
            (4090, 20),
            (0, disk.len()),
            (3 * cs + 5, cs),
            (5 * cs, 5000),
            (100, 0),
        ] {
            let mut buf = vec![0xAAu8; len];
            let n = reader.read_at(off as u64, &mut buf).unwrap();
            let want = &disk[off.min(disk.len())..(off + len).min(disk.len())];
            assert_eq!(n, want.len(), "read at {off}+{len}");
            assert_eq!(&buf[..n], want, "read at {off}+{len}");
            let segs: Vec<u8> = reader
                .read_segments(off as u64, len)
                .unwrap()
                .iter()
                .flat_map(|s| s.bytes().to_vec())
                .collect();
            assert_eq!(&segs[..], want, "segments at {off}+{len}");
            let mut appended = b"head".to_vec();
            assert_eq!(
                reader.read_append(off as u64, len, &mut appended).unwrap(),
                n
            );
            assert_eq!(&appended[4..], want, "append at {off}+{len}");
        }
        let mut buf = [0u8; 8];
        assert_eq!(
            reader.read_at(disk.len() as u64, &mut buf).unwrap(),
            0,
            "past the end"
        );
        let whole = disk.len() as u64;
        let c = cs as u64;
        assert_eq!(
            reader.extents(0, whole, 100).unwrap(),
            vec![
                (c, true),
                (c, false),
                (2 * c, true),
                (c, false),
                (c / 2, true)
            ]
        );
        assert_eq!(
            reader.extents(c + 10, 100, 100).unwrap(),
            vec![(100, false)]
        );
        assert_eq!(
            reader.extents(0, whole, 2).unwrap(),
            vec![(c, true), (c, false)]
        );
        assert_eq!(reader.extents(whole, 10, 5).unwrap(), vec![]);
        assert_eq!(reader.stored_bytes().unwrap(), 3 * c + c / 2);
    }

    #[test]
    fn coalesced_reads_return_each_slot_in_any_order() {
        let cs = CS;
        let disk: Vec<u8> = (0..40u32).flat_map(|i| vec![i as u8 + 1; cs]).collect();
        let (vault, map) = store_disk(&disk);
        let reader = DiskReader::new(vault.clone(), map.clone(), cs);
        let mut slots: Vec<(u64, ChunkId)> = (0..40)
            .map(|s| (s, reader.chunk_id(s).unwrap().unwrap()))
            .collect();
        // Reverse and interleave: one span still covers them (same pack, nothing skipped).
        slots.reverse();
        slots.swap(3, 17);
        let mut run = crate::fetch::ReadRun::start(&vault, &slots[0].1).unwrap();
        assert!(slots[1..].iter().all(|(_, id)| run.extend(&vault, id)));
        let chunks = vault
            .read_disk_chunks(&map, &slots, Verify::Rehash)
            .unwrap();
        for ((slot, _), data) in slots.iter().zip(chunks) {
            assert_eq!(data, vec![*slot as u8 + 1; cs], "slot {slot}");
        }
    }

    /// Chunks are decrypted in place in the fetched range: a chunk that two slots share (or one
    /// slot listed twice) must still come back as plaintext for each.
    #[test]
    fn coalesced_reads_return_a_shared_chunk_for_each_slot() {
        let cs = CS;
        let disk: Vec<u8> = (0..6u32)
            .flat_map(|i| vec![if i % 2 == 0 { 7 } else { i as u8 }; cs])
            .collect();
        let (vault, map) = store_disk(&disk);
        let reader = DiskReader::new(vault.clone(), map.clone(), cs);
        let mut slots: Vec<(u64, ChunkId)> = (0..6)
            .map(|s| (s, reader.chunk_id(s).unwrap().unwrap()))
            .collect();
        slots.push(slots[1]);
        assert_eq!(slots[0].1, slots[2].1, "slots 0, 2 and 4 share a chunk");
        let chunks = vault
            .read_disk_chunks(&map, &slots, Verify::Rehash)
            .unwrap();
        assert_eq!(chunks.len(), slots.len());
        for ((slot, _), data) in slots.iter().zip(chunks) {
            let want = disk[*slot as usize * cs..(*slot as usize + 1) * cs].to_vec();
            assert_eq!(data, want, "slot {slot}");
        }
    }

    #[test]
    fn chunks_decode_into_caller_slices_and_tampering_names_the_pack() {
        let cs = CS;
        let disk: Vec<u8> = (0..6u32)
            .flat_map(|i| vec![if i % 2 == 0 { 7 } else { i as u8 }; cs])
            .chain(vec![9u8; cs / 2])
            .collect();
        let (vault, store) = crate::testing::memory_vault_and_store(cs as u32);
        let map = crate::testing::store_disk(&vault, &disk);
        let reader = DiskReader::new(vault.clone(), map.clone(), cs);
        // Out of disk order, with slots 0, 2 and 4 sharing one chunk and a short last slot.
        let slots: Vec<(u64, ChunkId)> = [6u64, 4, 1, 0, 3, 2, 5]
            .iter()
            .map(|&s| (s, reader.chunk_id(s).unwrap().unwrap()))
            .collect();
        let len = |s: u64| if s == 6 { cs / 2 } else { cs };
        let mut bufs: Vec<Vec<u8>> = slots.iter().map(|(s, _)| vec![0xEE; len(*s)]).collect();
        let mut dst: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        vault
            .read_disk_chunks_to(&map, &slots, Verify::Rehash, &mut dst)
            .unwrap();
        for ((slot, _), data) in slots.iter().zip(&bufs) {
            let at = *slot as usize * cs;
            assert_eq!(data[..], disk[at..at + len(*slot)], "slot {slot}");
        }

        // One flipped byte in slot 3's chunk fails the batch and names the pack.
        let loc = vault.locate(&slots[4].1).unwrap();
        store.tamper(&loc.pack.key(), |d| d[loc.offset as usize + 20] ^= 1);
        let mut dst: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        match vault.read_disk_chunks_to(&map, &slots, Verify::Rehash, &mut dst) {
            Err(crate::Error::Corrupt { key, .. }) => assert_eq!(key, loc.pack.key()),
            other => panic!("expected corruption, got {other:?}"),
        }
        // A chunk the index does not know is named.
        let unknown = vault.keys().chunk_id(b"never stored");
        let mut one = vec![0u8; cs];
        match vault.read_disk_chunks_to(&map, &[(1, unknown)], Verify::Rehash, &mut [&mut one]) {
            Err(crate::Error::MissingChunk { chunk, .. }) => assert_eq!(chunk, unknown),
            other => panic!("expected a missing chunk, got {other:?}"),
        }
    }

    #[test]
    fn interleaved_sequential_streams_each_prefetch() {
        let cs = CS;
        let disk: Vec<u8> = (0..200u32)
            .flat_map(|i| vec![(i % 250) as u8 + 1; cs])
            .collect();
        let (vault, map) = store_disk(&disk);
        let reader = Arc::new(DiskReader::new(vault, map, 200 * cs));
        reader.enable_readahead(8, 2);
        let mut buf = vec![0u8; cs];
        // Two readers, one from slot 0 and one from slot 100, their reads interleaved (like two
        // connections of nbdcopy); the second stream also skips ahead a little.
        for (a, b) in [(0u64, 100u64), (1, 101), (2, 103)] {
            reader.read_at(a * cs as u64, &mut buf).unwrap();
            reader.read_at(b * cs as u64, &mut buf).unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !(3..8).chain(104..110).all(|s| reader.is_cached(s).unwrap()) {
            assert!(
                std::time::Instant::now() < deadline,
                "read-ahead did not follow both streams"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            !reader.is_cached(60).unwrap(),
            "nothing between the streams"
        );
        reader.read_at(105 * cs as u64, &mut buf).unwrap();
        assert_eq!(buf, vec![106u8; cs]);
    }

    #[test]
    fn sequential_reads_prefetch_ahead() {
        let cs = CS;
        let disk: Vec<u8> = (0..64u8).flat_map(|i| vec![i + 1; cs]).collect();
        let (vault, map) = store_disk(&disk);
        let reader = Arc::new(DiskReader::new(vault, map, 64 * cs));
        reader.enable_readahead(8, 2);
        let mut buf = vec![0u8; cs];
        reader.read_at(0, &mut buf).unwrap();
        assert!(
            !reader.is_cached(20).unwrap(),
            "a single read prefetches nothing"
        );
        reader.read_at(cs as u64, &mut buf).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !(2..10).all(|s| reader.is_cached(s).unwrap()) {
            assert!(
                std::time::Instant::now() < deadline,
                "read-ahead did not fill slots 2..10"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!reader.is_cached(20).unwrap(), "the window is bounded");
        reader.read_at(10 * cs as u64, &mut buf).unwrap();
        assert_eq!(buf, vec![11u8; cs]);
    }
}
