//! NBD exports as backup sources (`elastio block backup nbd://…`): the connection, and what its
//! meta contexts say about the disk (zeros from `base:allocation`, changes from a QEMU dirty
//! bitmap) as byte ranges for the read plan.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use agent::block::ranges::RangeSet;
use agent::block::RemoteSource;
use anyhow::{bail, Context, Result};
use mount::nbd::client::{Address, Client};
use mount::nbd::proto::{BASE_ALLOCATION, STATE_ZERO};

/// How long one NBD request may wait for its reply.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Most extents taken from one meta context (a hostile server could describe a disk byte by
/// byte): past that the walk fails.
const MAX_EXTENTS: u64 = 1 << 24;
/// Most ranges held per set; past that zero ranges are dropped (read instead) and changed ones
/// merged (read more).
const MAX_SET: usize = 1 << 20;

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Whether a backup source names an NBD export rather than a file.
pub fn is_nbd_uri(source: &str) -> bool {
    source.starts_with("nbd://") || source.starts_with("nbd+unix://")
}

/// Connects to `uri`, asking for `contexts`.
pub fn connect(uri: &str, contexts: &[&str]) -> Result<Client<Stream>> {
    let addr = Address::parse(uri).with_context(|| {
        format!(
            "{uri} is not an NBD URI (nbd://HOST[:PORT]/EXPORT or \
             nbd+unix:///EXPORT?socket=PATH)"
        )
    })?;
    let stream = match &addr {
        Address::Tcp { host, port, .. } => {
            let s = TcpStream::connect((host.as_str(), *port))
                .with_context(|| format!("cannot connect to {host}:{port}"))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            s.set_write_timeout(Some(TIMEOUT))?;
            Stream::Tcp(s)
        }
        Address::Unix { socket, .. } => {
            let s = UnixStream::connect(socket)
                .with_context(|| format!("cannot connect to {}", socket.display()))?;
            s.set_read_timeout(Some(TIMEOUT))?;
            s.set_write_timeout(Some(TIMEOUT))?;
            Stream::Unix(s)
        }
    };
    Client::connect(stream, addr.export(), contexts).with_context(|| format!("NBD export {uri}"))
}

/// One NBD connection as a backup source.
pub struct NbdSource {
    client: Mutex<Client<Stream>>,
    size: u64,
    max: usize,
}

impl NbdSource {
    pub fn new(client: Client<Stream>) -> Self {
        NbdSource {
            size: client.size(),
            max: client.max_request() as usize,
            client: Mutex::new(client),
        }
    }
}

impl RemoteSource for NbdSource {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut c = self.client.lock().expect("nbd client");
        Ok(c.read(offset, buf)?)
    }
    fn max_read(&self) -> usize {
        self.max
    }
    fn max_in_flight(&self) -> usize {
        8
    }
    fn submit(&self, offset: u64, len: usize) -> io::Result<u64> {
        let mut c = self.client.lock().expect("nbd client");
        Ok(c.send_read(offset, len)?)
    }
    fn complete(&self) -> io::Result<(u64, Vec<u8>)> {
        let mut c = self.client.lock().expect("nbd client");
        let (id, _, data) = c.recv_read()?;
        Ok((id, data))
    }
}

/// The byte ranges whose extents in meta context `name` have any of `flags`: (ranges, extents
/// seen). `shrink`: what to do past [`MAX_SET`] ranges (merge for sets that may grow, drop for
/// sets that may shrink).
pub fn ranges_with(
    client: &mut Client<Stream>,
    name: &str,
    flags: u32,
    may_grow: bool,
) -> Result<RangeSet> {
    let Some(id) = client.context_id(name) else {
        bail!("the NBD server did not grant meta context {name}");
    };
    let size = client.size();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut set = RangeSet::default();
    let mut at = 0u64;
    let mut extents = 0u64;
    while at < size {
        let len = (size - at).min(1 << 30) as u32;
        let got = client
            .block_status(id, at, len)
            .with_context(|| format!("block status of {name}"))?;
        for (n, f) in got {
            extents += 1;
            if extents > MAX_EXTENTS {
                bail!("the NBD server described {name} in more than {MAX_EXTENTS} extents");
            }
            if f & flags != 0 {
                match out.last_mut() {
                    Some(last) if last.1 == at => last.1 += n as u64,
                    _ => out.push((at, at + n as u64)),
                }
            }
            at += n as u64;
        }
        if out.len() > MAX_SET {
            out.extend_from_slice(set.ranges());
            set = RangeSet::from_unsorted(std::mem::take(&mut out));
            if may_grow {
                set.coarsen(MAX_SET / 2);
            } else {
                let mut min = 2 * 4096;
                while set.len() > MAX_SET / 2 {
                    set.keep_at_least(min);
                    min *= 2;
                }
            }
        }
    }
    out.extend_from_slice(set.ranges());
    Ok(RangeSet::from_unsorted(out))
}

/// The ranges an export reads as zeros (`base:allocation`'s ZERO flag).
pub fn zero_ranges(client: &mut Client<Stream>) -> Result<RangeSet> {
    ranges_with(client, BASE_ALLOCATION, STATE_ZERO, false)
}

/// The ranges a QEMU dirty bitmap marks dirty.
pub fn dirty_ranges(client: &mut Client<Stream>, bitmap: &str) -> Result<RangeSet> {
    ranges_with(client, &format!("qemu:dirty-bitmap:{bitmap}"), 1, true)
}

/// A remote source as the file-system readers' [`mount::ext4::ReadAt`], in requests it accepts.
pub struct ReadAtRemote<'a>(pub &'a NbdSource);

impl mount::ext4::ReadAt for ReadAtRemote<'_> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let max = self.0.max_read().max(4096);
        for (i, piece) in buf.chunks_mut(max).enumerate() {
            self.0.read_at(offset + (i * max) as u64, piece)?;
        }
        Ok(())
    }
}
