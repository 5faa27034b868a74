//! The io_uring read loop: up to `depth` block reads in flight into aligned buffers.
// io_uring submissions: the kernel reads and writes buffers the ring owns.
#![allow(unsafe_code)]

use std::io;
use std::os::unix::io::AsRawFd;

use io_uring::{opcode, types, IoUring};

use super::engine::{shrank, source_err, Block, Planner, Req};
use super::{BlockSource, BufPool, PooledBuf, ALIGN};
use crate::error::AgentError;

pub(crate) struct Ring {
    ring: IoUring,
    depth: usize,
}

struct InFlight {
    req: Req,
    buf: PooledBuf,
    /// The piece being read, and its bytes read so far.
    piece: usize,
    done: usize,
}

impl Ring {
    /// Probes io_uring by creating a ring.
    pub(super) fn new(depth: u32) -> io::Result<Self> {
        Ok(Ring {
            ring: IoUring::new(depth)?,
            depth: depth as usize,
        })
    }

    fn push(&mut self, fd: i32, slot: usize, f: &mut InFlight) -> io::Result<()> {
        let (at, len) = f.req.pieces[f.piece];
        let from = at + f.done;
        let want = (len - f.done)
            .next_multiple_of(ALIGN)
            .min(f.buf.capacity() - from);
        // SAFETY: the pointer is into a live heap buffer of `capacity` bytes that stays in
        // `slots` (not moved or freed) until its completion is reaped; `from + want <= capacity`.
        let ptr = unsafe { f.buf.as_mut_ptr().add(from) };
        let sqe = opcode::Read::new(types::Fd(fd), ptr, want as u32)
            .offset(f.req.offset + from as u64)
            .build()
            .user_data(slot as u64);
        // SAFETY: the entry refers to the buffer above, which outlives the operation (see
        // `read_all`: every submitted slot is reaped before its buffer is dropped).
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    pub(super) fn read_all(
        mut self,
        src: &BlockSource,
        file: &std::fs::File,
        plan: Planner<'_>,
        pool: &BufPool,
        sink: &mut dyn FnMut(Block) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        let fd = file.as_raw_fd();
        let mut slots: Vec<Option<InFlight>> = (0..self.depth).map(|_| None).collect();
        let mut plan = plan;
        let mut in_flight = 0usize;
        let result = (|| -> Result<(), AgentError> {
            loop {
                // Fill free slots; what is not read goes straight to the sink.
                while in_flight < self.depth {
                    let Some(req) = plan.next() else { break };
                    let req = req.map_err(|e| source_err(src, e))?;
                    if !req.reads() {
                        sink(Block::unread(&req))?;
                        continue;
                    }
                    let slot = slots.iter().position(Option::is_none).expect("free slot");
                    let mut buf = pool.get(req.len);
                    if req.partial() {
                        buf.fill(0);
                    }
                    let mut f = InFlight {
                        req,
                        buf,
                        piece: 0,
                        done: 0,
                    };
                    self.push(fd, slot, &mut f)
                        .map_err(|e| source_err(src, e))?;
                    slots[slot] = Some(f);
                    in_flight += 1;
                }
                if in_flight == 0 {
                    return Ok(());
                }
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    // A signal (Ctrl-C) interrupted the wait: the sink sees the cancellation.
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(source_err(src, e)),
                }
                let done: Vec<(usize, i32)> = self
                    .ring
                    .completion()
                    .map(|c| (c.user_data() as usize, c.result()))
                    .collect();
                // Reaped now, whatever happens below; resubmissions count themselves back in.
                in_flight -= done.len();
                for (slot, res) in done {
                    let mut f = slots[slot].take().expect("completion for a used slot");
                    if res < 0 {
                        let e = io::Error::from_raw_os_error(-res);
                        if matches!(-res, libc::EINTR | libc::EAGAIN) {
                            self.push(fd, slot, &mut f)
                                .map_err(|e| source_err(src, e))?;
                            slots[slot] = Some(f);
                            in_flight += 1;
                            continue;
                        }
                        return Err(source_err(src, e));
                    }
                    let (at, len) = f.req.pieces[f.piece];
                    if res == 0 {
                        return Err(shrank(src, f.req.offset + (at + f.done) as u64));
                    }
                    f.done += res as usize;
                    if f.done >= len && f.piece + 1 < f.req.pieces.len() {
                        f.piece += 1;
                        f.done = 0;
                    }
                    if f.done < f.req.pieces[f.piece].1 {
                        // A short read or the next piece: ask for the rest.
                        self.push(fd, slot, &mut f)
                            .map_err(|e| source_err(src, e))?;
                        slots[slot] = Some(f);
                        in_flight += 1;
                        continue;
                    }
                    f.buf.set_len(f.req.len);
                    sink(Block::read(f.req, f.buf))?;
                }
            }
        })();
        // Never free a buffer the kernel may still write into: reap what is in flight.
        while in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    // Leak the buffers rather than risk a use-after-free.
                    std::mem::forget(slots);
                    return result;
                }
            }
            in_flight -= self.ring.completion().count();
        }
        result
    }
}
