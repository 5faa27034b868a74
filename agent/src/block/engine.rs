//! I/O engines: how a source's blocks get read.
//!
//! Both engines read the same plan (aligned blocks, holes skipped) and hand each block to a sink.
//! The io_uring engine keeps [`QUEUE_DEPTH`] reads in flight, so device latency overlaps with
//! hashing and compression; blocks may complete out of order (the pipeline reorders by offset).
//! The pread engine reads one block at a time. `ELASTIO_IO_ENGINE=io_uring|pread|auto` forces
//! one (tests cover both); `auto` probes io_uring and falls back when the kernel or a seccomp
//! policy refuses it.

use std::io;
use std::os::unix::fs::FileExt;

use super::ranges::RangeSet;
use super::{BlockSource, BufPool, PooledBuf};
use crate::error::AgentError;

/// Reads in flight with io_uring.
pub const QUEUE_DEPTH: u32 = 8;
pub const ENGINE_ENV: &str = "ELASTIO_IO_ENGINE";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngine {
    #[default]
    Auto,
    IoUring,
    Pread,
}

impl IoEngine {
    /// The engine named by `ELASTIO_IO_ENGINE` (Auto when unset).
    pub fn from_env() -> Result<Self, AgentError> {
        match std::env::var(ENGINE_ENV).as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(IoEngine::Auto),
            Ok("io_uring") | Ok("io-uring") | Ok("uring") => Ok(IoEngine::IoUring),
            Ok("pread") => Ok(IoEngine::Pread),
            Ok(other) => Err(AgentError::Engine(format!(
                "{ENGINE_ENV}={other:?}: expected io_uring, pread or auto"
            ))),
        }
    }
}

/// What a backup does with a planned range of its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Read and stored.
    Data,
    /// Zeros, not read: a hole of the source, or free space of its file system.
    Zeros,
    /// Unchanged since the parent RP: its slots are taken from the parent map, not read.
    Keep,
    /// Unchanged since the parent by the changed-block source's word, read anyway (a sample) to
    /// check that word: the pipeline compares its chunk ids with the parent's.
    Verify,
    /// Changed in part: only the changed pieces are read, the rest comes from the parent's
    /// chunks (so an incremental reads what changed, not whole chunks around it).
    Patch,
}

/// One planned request: `len` bytes at `offset` (chunk-aligned), of one kind. Reads fill
/// `pieces` (offset in the block, length); the rest of the block is zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Req {
    pub offset: u64,
    pub len: usize,
    pub kind: BlockKind,
    pub pieces: Vec<(usize, usize)>,
}

impl Req {
    pub(crate) fn reads(&self) -> bool {
        matches!(
            self.kind,
            BlockKind::Data | BlockKind::Verify | BlockKind::Patch
        )
    }

    /// Whether the pieces leave parts of the block unread (which must then be zeroed).
    pub(crate) fn partial(&self) -> bool {
        self.pieces.iter().map(|p| p.1).sum::<usize>() < self.len
    }

    pub(crate) fn bytes_read(&self) -> u64 {
        self.pieces.iter().map(|p| p.1 as u64).sum()
    }
}

/// A block handed to the pipeline; `data` is None unless it was read.
pub struct Block {
    pub offset: u64,
    pub len: usize,
    pub kind: BlockKind,
    /// Bytes read from the source for it.
    pub bytes_read: u64,
    /// For [`BlockKind::Patch`]: the pieces read (offset in the block, length); the rest of
    /// `data` is zeros, to be filled from the parent.
    pub patch: Vec<(usize, usize)>,
    pub data: Option<PooledBuf>,
}

impl Block {
    pub(crate) fn unread(req: &Req) -> Self {
        Block {
            offset: req.offset,
            len: req.len,
            kind: req.kind,
            bytes_read: 0,
            patch: Vec::new(),
            data: None,
        }
    }

    /// A block read for `req` into `buf`.
    pub(crate) fn read(req: Req, buf: PooledBuf) -> Self {
        Block {
            offset: req.offset,
            len: req.len,
            kind: req.kind,
            bytes_read: req.bytes_read(),
            patch: if req.kind == BlockKind::Patch {
                req.pieces
            } else {
                Vec::new()
            },
            data: Some(buf),
        }
    }
}

/// What a backup reads of its source beyond the holes it finds itself.
#[derive(Debug, Clone, Default)]
pub struct SourcePlan {
    /// Bytes known to be free space of the source's file systems: never read, stored as zeros.
    pub free: RangeSet,
    /// A changed-block incremental: the bytes that may have changed since the parent RP. Chunks
    /// outside them are taken from the parent unread (but for the verified sample).
    pub changed: Option<RangeSet>,
    /// The recovery point `changed` counts from: it must be the asset's latest.
    pub changed_since: Option<String>,
    /// Share (0..=1) of the chunks kept from the parent that are read anyway and compared.
    pub verify_share: f64,
    /// Whether a partly changed chunk reads only its changed pieces and takes the rest from the
    /// parent's chunk (set by the pipeline where that chunk is cheap to fetch).
    pub patch: bool,
}

/// Splits a source into chunk-aligned requests of at most one block each: holes and free space
/// become zeros, unchanged chunks (with a plan's changed map) keeps or sampled verifications.
pub(crate) struct Planner<'a> {
    src: &'a BlockSource,
    plan: &'a SourcePlan,
    block_size: u64,
    chunk_size: u64,
    next: u64,
    extent: Option<(u64, u64)>,
    started: bool,
    queue: std::collections::VecDeque<Req>,
    rng: rand::rngs::StdRng,
}

impl<'a> Planner<'a> {
    pub(crate) fn new(
        src: &'a BlockSource,
        plan: &'a SourcePlan,
        block_size: usize,
        chunk_size: usize,
    ) -> Self {
        use rand::SeedableRng;
        assert!(block_size.is_multiple_of(chunk_size));
        Planner {
            src,
            plan,
            block_size: block_size as u64,
            chunk_size: chunk_size as u64,
            next: 0,
            extent: None,
            started: false,
            queue: Default::default(),
            rng: rand::rngs::StdRng::from_entropy(),
        }
    }

    /// Whether `[start, end)` lies entirely in a hole of the source.
    fn in_hole(&mut self, start: u64, end: u64) -> io::Result<bool> {
        let stale = match self.extent {
            None => !self.started,
            Some((_, e)) => e <= start,
        };
        if stale {
            self.started = true;
            self.extent = self.src.next_data(start)?;
        }
        Ok(match self.extent {
            None => true,
            Some((s, _)) => s >= end,
        })
    }

    /// The kind of the chunk at `[s, e)`.
    fn kind_of(&mut self, s: u64, e: u64) -> BlockKind {
        use rand::Rng;
        if self.plan.free.covers(s, e) {
            return BlockKind::Zeros;
        }
        match &self.plan.changed {
            Some(changed)
                if self.plan.patch && changed.intersects(s, e) && !changed.covers(s, e) =>
            {
                BlockKind::Patch
            }
            Some(changed) if !changed.intersects(s, e) => {
                let share = self.plan.verify_share.clamp(0.0, 1.0);
                // A chunk with free space reads with zeros there, while the parent may hold
                // the bytes (or the reverse): only wholly used chunks can be compared.
                if share > 0.0 && self.rng.gen_bool(share) && !self.plan.free.intersects(s, e) {
                    BlockKind::Verify
                } else {
                    BlockKind::Keep
                }
            }
            _ => BlockKind::Data,
        }
    }

    /// The pieces of `[s, e)` to read: all but the free space, widened to [`ALIGN`] for
    /// O_DIRECT (and clipped to the source's end).
    fn pieces(&self, s: u64, e: u64) -> Vec<(usize, usize)> {
        let mut used = Vec::new();
        let mut at = s;
        for (fs, fe) in self.plan.free.within(s, e).chain(std::iter::once((e, e))) {
            if fs > at {
                used.push((at, fs));
            }
            at = at.max(fe);
        }
        aligned_pieces(used.into_iter(), s, e)
    }

    /// The pieces of `[s, e)` a patch reads: the changed bytes, widened to [`ALIGN`].
    fn changed_pieces(&self, s: u64, e: u64) -> Vec<(usize, usize)> {
        match &self.plan.changed {
            Some(changed) => aligned_pieces(changed.within(s, e), s, e),
            None => vec![(0, (e - s) as usize)],
        }
    }

    fn plan_block(&mut self, start: u64, end: u64) -> io::Result<()> {
        if self.in_hole(start, end)? {
            self.queue.push_back(Req {
                offset: start,
                len: (end - start) as usize,
                kind: BlockKind::Zeros,
                pieces: Vec::new(),
            });
            return Ok(());
        }
        let mut run: Option<(u64, BlockKind)> = None;
        let mut s = start;
        while s < end {
            let e = (s + self.chunk_size).min(end);
            let kind = self.kind_of(s, e);
            match run {
                Some((_, k))
                    if k == kind && !matches!(kind, BlockKind::Verify | BlockKind::Patch) => {}
                Some((from, k)) => {
                    self.push(from, s, k);
                    run = Some((s, kind));
                }
                None => run = Some((s, kind)),
            }
            s = e;
        }
        if let Some((from, k)) = run {
            self.push(from, end, k);
        }
        Ok(())
    }

    fn push(&mut self, s: u64, e: u64, kind: BlockKind) {
        let pieces = match kind {
            BlockKind::Data | BlockKind::Verify => self.pieces(s, e),
            BlockKind::Patch => self.changed_pieces(s, e),
            BlockKind::Zeros | BlockKind::Keep => Vec::new(),
        };
        // A read with no piece left (every byte free) reads nothing: zeros, or a plain keep.
        let kind = match kind {
            BlockKind::Data if pieces.is_empty() => BlockKind::Zeros,
            BlockKind::Verify if pieces.is_empty() => BlockKind::Keep,
            k => k,
        };
        self.queue.push_back(Req {
            offset: s,
            len: (e - s) as usize,
            kind,
            pieces,
        });
    }
}

/// Byte ranges within `[s, e)` (sorted, disjoint) as pieces of a block starting at `s`, each
/// widened to [`ALIGN`] (O_DIRECT) within the block, overlapping ones merged.
fn aligned_pieces(ranges: impl Iterator<Item = (u64, u64)>, s: u64, e: u64) -> Vec<(usize, usize)> {
    let align = super::ALIGN as u64;
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (rs, re) in ranges {
        let a = (rs / align * align).max(s);
        let b = re.next_multiple_of(align).min(e);
        if a >= b {
            continue;
        }
        match out.last_mut() {
            Some(last) if (last.0 + last.1) as u64 + s >= a => last.1 = (b - s) as usize - last.0,
            _ => out.push(((a - s) as usize, (b - a) as usize)),
        }
    }
    out
}

impl Iterator for Planner<'_> {
    type Item = io::Result<Req>;

    fn next(&mut self) -> Option<io::Result<Req>> {
        while self.queue.is_empty() {
            if self.next >= self.src.size {
                return None;
            }
            let start = self.next;
            let end = (start + self.block_size).min(self.src.size);
            self.next = end;
            if let Err(e) = self.plan_block(start, end) {
                return Some(Err(e));
            }
        }
        self.queue.pop_front().map(Ok)
    }
}

/// Reads `src` as `plan` says in blocks of at most `block_size` bytes (whole chunks of
/// `chunk_size`), calling `sink` for each in disk order of planning (holes, free space and kept
/// chunks included, unread). Buffers come from `pool`, which bounds the blocks alive at once.
/// Returns the name of the engine used.
pub fn read_source(
    src: &BlockSource,
    plan: &SourcePlan,
    block_size: usize,
    chunk_size: usize,
    engine: IoEngine,
    pool: &BufPool,
    sink: &mut dyn FnMut(Block) -> Result<(), AgentError>,
) -> Result<&'static str, AgentError> {
    assert!(block_size.is_multiple_of(super::ALIGN));
    let plan = Planner::new(src, plan, block_size, chunk_size);
    let file = match &src.backing {
        super::Backing::File(f) => f,
        super::Backing::Remote(r) => {
            return read_remote(src, &**r, plan, pool, sink).map(|_| "nbd")
        }
    };
    match engine {
        IoEngine::Pread => read_pread(src, file, plan, pool, sink).map(|_| "pread"),
        IoEngine::IoUring => match super::uring::Ring::new(QUEUE_DEPTH) {
            Ok(ring) => ring
                .read_all(src, file, plan, pool, sink)
                .map(|_| "io_uring"),
            Err(e) => Err(AgentError::Engine(format!(
                "io_uring is unavailable ({e}); unset {ENGINE_ENV} or set it to pread"
            ))),
        },
        IoEngine::Auto => match super::uring::Ring::new(QUEUE_DEPTH) {
            Ok(ring) => ring
                .read_all(src, file, plan, pool, sink)
                .map(|_| "io_uring"),
            Err(e) => {
                tracing::info!("io_uring unavailable ({e}), reading with pread");
                read_pread(src, file, plan, pool, sink).map(|_| "pread")
            }
        },
    }
}

pub(crate) fn source_err(src: &BlockSource, source: io::Error) -> AgentError {
    AgentError::Source {
        path: src.path.clone(),
        source,
    }
}

/// Error for a source that ended before its recorded size.
pub(crate) fn shrank(src: &BlockSource, offset: u64) -> AgentError {
    source_err(
        src,
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "source ended at byte {offset}, before its size {} (did it shrink?)",
                src.size
            ),
        ),
    )
}

fn read_pread(
    src: &BlockSource,
    file: &std::fs::File,
    plan: Planner<'_>,
    pool: &BufPool,
    sink: &mut dyn FnMut(Block) -> Result<(), AgentError>,
) -> Result<(), AgentError> {
    for req in plan {
        let req = req.map_err(|e| source_err(src, e))?;
        if !req.reads() {
            sink(Block::unread(&req))?;
            continue;
        }
        let mut buf = pool.get(req.len.next_multiple_of(super::ALIGN));
        if req.partial() {
            buf.fill(0);
        }
        for &(at, len) in &req.pieces {
            let mut done = 0;
            while done < len {
                // O_DIRECT needs aligned lengths: read whole aligned units; EOF makes it short.
                let want = (len - done).next_multiple_of(super::ALIGN);
                let from = at + done;
                let n = match file.read_at(&mut buf[from..from + want], req.offset + from as u64) {
                    Ok(0) => return Err(shrank(src, req.offset + from as u64)),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(source_err(src, e)),
                };
                done += n;
            }
        }
        buf.set_len(req.len);
        sink(Block::read(req, buf))?;
    }
    Ok(())
}

/// Reads a remote source's planned pieces in requests of at most its `max_read` bytes, with up
/// to its `max_in_flight` of them sent at once (a network round trip per request otherwise
/// bounds the speed); blocks go to the sink as they complete, in any order.
fn read_remote(
    src: &BlockSource,
    remote: &dyn super::RemoteSource,
    mut plan: Planner<'_>,
    pool: &BufPool,
    sink: &mut dyn FnMut(Block) -> Result<(), AgentError>,
) -> Result<(), AgentError> {
    let max = remote.max_read().max(4096);
    // Blocks hold pool buffers: at most as many as the reads in flight (and the pool's room).
    let window = remote.max_in_flight().clamp(1, QUEUE_DEPTH as usize);
    let err = |e| source_err(src, e);
    if window == 1 {
        for req in plan {
            let req = req.map_err(err)?;
            if !req.reads() {
                sink(Block::unread(&req))?;
                continue;
            }
            let mut buf = pool.get(req.len);
            if req.partial() {
                buf.fill(0);
            }
            for &(at, len) in &req.pieces {
                let end = (at + len).min(req.len);
                let mut from = at;
                while from < end {
                    let n = (end - from).min(max);
                    remote
                        .read_at(req.offset + from as u64, &mut buf[from..from + n])
                        .map_err(err)?;
                    from += n;
                }
            }
            buf.set_len(req.len);
            sink(Block::read(req, buf))?;
        }
        return Ok(());
    }
    // Blocks being filled: the request, its buffer, reads still to come back.
    let mut blocks: Vec<Option<(Req, PooledBuf, usize)>> = Vec::new();
    // Reads sent: id -> (block, offset in it).
    let mut sent: std::collections::HashMap<u64, (usize, usize)> = Default::default();
    // Reads not sent yet: (block, offset in it, length).
    let mut queue: std::collections::VecDeque<(usize, usize, usize)> = Default::default();
    let mut done_planning = false;
    loop {
        while sent.len() < window {
            if let Some((b, at, n)) = queue.pop_front() {
                let id = remote.submit(blocks[b].as_ref().expect("live").0.offset + at as u64, n);
                sent.insert(id.map_err(err)?, (b, at));
                continue;
            }
            if done_planning || blocks.iter().filter(|b| b.is_some()).count() >= window {
                break;
            }
            let Some(req) = plan.next() else {
                done_planning = true;
                break;
            };
            let req = req.map_err(err)?;
            if !req.reads() {
                sink(Block::unread(&req))?;
                continue;
            }
            let mut buf = pool.get(req.len);
            if req.partial() {
                buf.fill(0);
            }
            let b = blocks.iter().position(Option::is_none).unwrap_or_else(|| {
                blocks.push(None);
                blocks.len() - 1
            });
            let mut count = 0;
            for &(at, len) in &req.pieces {
                let end = (at + len).min(req.len);
                let mut from = at;
                while from < end {
                    let n = (end - from).min(max);
                    queue.push_back((b, from, n));
                    from += n;
                    count += 1;
                }
            }
            blocks[b] = Some((req, buf, count));
        }
        if sent.is_empty() {
            return Ok(());
        }
        let (id, data) = remote.complete().map_err(err)?;
        let (b, at) = sent.remove(&id).ok_or_else(|| {
            err(io::Error::other(format!(
                "a reply to read {id}, which was not sent"
            )))
        })?;
        let slot = blocks[b].as_mut().expect("live");
        slot.1[at..at + data.len()].copy_from_slice(&data);
        slot.2 -= 1;
        if slot.2 == 0 {
            let (req, mut buf, _) = blocks[b].take().expect("live");
            buf.set_len(req.len);
            sink(Block::read(req, buf))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::DirectIo;

    /// A file of distinct non-zero bytes, read with free space in odd places: each engine
    /// returns zeros exactly there and the file's bytes elsewhere, reading only the rest.
    #[test]
    fn free_space_reads_as_zeros_and_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let size = 3 * (1 << 20) + 12345;
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, &data).unwrap();
        let src = BlockSource::open(&path, DirectIo::Never).unwrap();
        let free = vec![
            (0, 4096),                         // a whole first page
            (100_000, 300_000),                // unaligned both ends, across chunks
            (1 << 20, 2 << 20),                // a whole block
            (3 * (1 << 20), size as u64 - 10), // to near the end
        ];
        let plan = SourcePlan {
            free: RangeSet::from_unsorted(free.clone()),
            ..SourcePlan::default()
        };
        let pool = BufPool::new(16, 1 << 20);
        for engine in [IoEngine::Pread, IoEngine::IoUring] {
            let mut image = vec![0xeeu8; size];
            let mut read = 0;
            let mut kinds = Vec::new();
            read_source(
                &src,
                &plan,
                1 << 20,
                128 << 10,
                engine,
                &pool,
                &mut |b: Block| {
                    read += b.bytes_read;
                    kinds.push((b.offset, b.kind));
                    let at = b.offset as usize;
                    match &b.data {
                        Some(buf) => image[at..at + b.len].copy_from_slice(&buf[..b.len]),
                        None => image[at..at + b.len].fill(0),
                    }
                    Ok(())
                },
            )
            .unwrap();
            let in_free = |i: u64| free.iter().any(|&(s, e)| (s..e).contains(&i));
            for (i, &b) in image.iter().enumerate() {
                // Free bytes within a read's 4 KiB alignment come back as their data.
                let want_zero = in_free(i as u64)
                    && in_free((i as u64) & !4095)
                    && in_free((i as u64 | 4095).min(size as u64 - 1));
                if want_zero {
                    assert_eq!(b, 0, "{engine:?}: byte {i} is free");
                } else if !in_free(i as u64) {
                    assert_eq!(b, data[i], "{engine:?}: byte {i}");
                }
            }
            assert!(kinds.contains(&(1 << 20, BlockKind::Zeros)), "{kinds:?}");
            let used = size as u64 - free.iter().map(|(s, e)| e - s).sum::<u64>();
            assert!(
                read >= used && read <= used + 5 * 4096,
                "{engine:?}: read {read} of {used}"
            );
        }
    }

    /// Unchanged chunks are kept, sampled ones verified, the rest read.
    #[test]
    fn changed_map_plans_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![1u8; 1 << 20]).unwrap();
        let src = BlockSource::open(&path, DirectIo::Never).unwrap();
        let cs = 128 << 10;
        let plan = |share: f64| SourcePlan {
            changed: Some(RangeSet::from_unsorted(vec![(cs + 5, cs + 6)])),
            verify_share: share,
            patch: true,
            ..SourcePlan::default()
        };
        let kinds = |plan: &SourcePlan| -> Vec<(u64, usize, BlockKind)> {
            Planner::new(&src, plan, 1 << 20, cs as usize)
                .map(|r| r.map(|r| (r.offset, r.len, r.kind)).unwrap())
                .collect()
        };
        assert_eq!(
            kinds(&plan(0.0)),
            [
                (0, cs as usize, BlockKind::Keep),
                (cs, cs as usize, BlockKind::Patch),
                (2 * cs, 6 * cs as usize, BlockKind::Keep)
            ]
        );
        // The patch reads the changed byte's 4 KiB page only.
        let patch = Planner::new(&src, &plan(0.0), 1 << 20, cs as usize)
            .map(Result::unwrap)
            .find(|r| r.kind == BlockKind::Patch)
            .unwrap();
        assert_eq!(patch.pieces, [(0, 4096)]);
        let all = kinds(&plan(1.0));
        assert_eq!(all.len(), 8, "one verify per kept chunk: {all:?}");
        assert_eq!(all.iter().filter(|k| k.2 == BlockKind::Verify).count(), 7);
    }
}
