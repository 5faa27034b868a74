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

/// One planned read: `len` bytes at `offset`; `hole` when it lies entirely in a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Req {
    pub offset: u64,
    pub len: usize,
    pub hole: bool,
}

/// A block handed to the pipeline; `data` is None for a hole (all zeros, not read).
pub struct Block {
    pub offset: u64,
    pub len: usize,
    pub data: Option<PooledBuf>,
}

impl Block {
    pub(crate) fn hole(req: Req) -> Self {
        Block {
            offset: req.offset,
            len: req.len,
            data: None,
        }
    }
}

/// Splits a source into blocks and marks those inside holes.
pub(crate) struct Planner<'a> {
    src: &'a BlockSource,
    block_size: u64,
    next: u64,
    extent: Option<(u64, u64)>,
    started: bool,
}

impl<'a> Planner<'a> {
    pub(crate) fn new(src: &'a BlockSource, block_size: usize) -> Self {
        Planner {
            src,
            block_size: block_size as u64,
            next: 0,
            extent: None,
            started: false,
        }
    }
}

impl Iterator for Planner<'_> {
    type Item = io::Result<Req>;

    fn next(&mut self) -> Option<io::Result<Req>> {
        if self.next >= self.src.size {
            return None;
        }
        let start = self.next;
        let end = (start + self.block_size).min(self.src.size);
        self.next = end;
        let stale = match self.extent {
            None => !self.started,
            Some((_, e)) => e <= start,
        };
        if stale {
            self.started = true;
            self.extent = match self.src.next_data(start) {
                Ok(x) => x,
                Err(e) => return Some(Err(e)),
            };
        }
        let hole = match self.extent {
            None => true,
            Some((s, _)) => s >= end,
        };
        Some(Ok(Req {
            offset: start,
            len: (end - start) as usize,
            hole,
        }))
    }
}

/// Reads all of `src` in `block_size` blocks, calling `sink` for each (holes included).
/// Returns the name of the engine used.
/// Buffers come from `pool`, which bounds the blocks alive at once. Returns the engine used.
pub fn read_source(
    src: &BlockSource,
    block_size: usize,
    engine: IoEngine,
    pool: &BufPool,
    sink: &mut dyn FnMut(Block) -> Result<(), AgentError>,
) -> Result<&'static str, AgentError> {
    assert!(block_size.is_multiple_of(super::ALIGN));
    let plan = Planner::new(src, block_size);
    match engine {
        IoEngine::Pread => read_pread(src, plan, pool, sink).map(|_| "pread"),
        IoEngine::IoUring => match super::uring::Ring::new(QUEUE_DEPTH) {
            Ok(ring) => ring.read_all(src, plan, pool, sink).map(|_| "io_uring"),
            Err(e) => Err(AgentError::Engine(format!(
                "io_uring is unavailable ({e}); unset {ENGINE_ENV} or set it to pread"
            ))),
        },
        IoEngine::Auto => match super::uring::Ring::new(QUEUE_DEPTH) {
            Ok(ring) => ring.read_all(src, plan, pool, sink).map(|_| "io_uring"),
            Err(e) => {
                tracing::info!("io_uring unavailable ({e}), reading with pread");
                read_pread(src, plan, pool, sink).map(|_| "pread")
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
    plan: Planner<'_>,
    pool: &BufPool,
    sink: &mut dyn FnMut(Block) -> Result<(), AgentError>,
) -> Result<(), AgentError> {
    for req in plan {
        let req = req.map_err(|e| source_err(src, e))?;
        if req.hole {
            sink(Block::hole(req))?;
            continue;
        }
        let mut buf = pool.get(req.len.next_multiple_of(super::ALIGN));
        let mut done = 0;
        while done < req.len {
            // O_DIRECT needs aligned lengths: read whole aligned units; EOF makes it short.
            let want = (req.len - done).next_multiple_of(super::ALIGN);
            let n = match src
                .file
                .read_at(&mut buf[done..done + want], req.offset + done as u64)
            {
                Ok(0) => return Err(shrank(src, req.offset + done as u64)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(source_err(src, e)),
            };
            done += n;
        }
        buf.set_len(req.len);
        sink(Block {
            offset: req.offset,
            len: req.len,
            data: Some(buf),
        })?;
    }
    Ok(())
}
