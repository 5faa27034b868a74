//! A blocking NBD client, the source side of `elastio block backup nbd://…`: fixed newstyle
//! handshake, structured replies, meta contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`),
//! reads and block status — what backing up a QEMU disk over NBD needs (qemu-nbd,
//! qemu-storage-daemon, nbdkit).
//!
//! The server is untrusted (anyone on the machine may listen where the user points): every
//! length it sends is checked before anything is allocated for it (option replies at most
//! [`MAX_OPTION_REPLY`], a read's chunks within the request, block status at most
//! [`MAX_STATUS_REPLY`] bytes), the chunks of one reply are bounded in number, arithmetic is
//! checked, and one request is outstanding at a time, so a reply's cookie must be that
//! request's. Timeouts are the socket's (set by the caller). Errors name what the server did.

use std::io::{self, Read, Write};

use super::proto::*;

/// Longest option reply read (an export description or error message is far shorter).
pub const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Longest block-status chunk accepted: 64 Ki extents.
pub const MAX_STATUS_REPLY: u32 = 4 + 8 * (64 << 10);
/// Most option replies to one option (meta contexts granted, infos).
const MAX_OPTION_REPLIES: usize = 64;
/// Largest read request sent.
pub const MAX_READ: u32 = 32 << 20;
/// Most reads in flight on one connection ([`Client::send_read`]).
pub const MAX_IN_FLIGHT: usize = 16;

/// A read sent and not yet answered in full.
struct InFlight {
    cookie: u64,
    offset: u64,
    data: Vec<u8>,
    covered: u64,
    chunks: u64,
    /// The byte ranges chunks have filled, by start: chunks may not overlap.
    filled: std::collections::BTreeMap<u64, u64>,
}

impl InFlight {
    /// Records `[at, at + n)` as filled; false when it overlaps what was.
    fn fill(&mut self, at: u64, n: u64) -> bool {
        let end = at + n;
        let before = self.filled.range(..end).next_back();
        if before.is_some_and(|(_, &e)| e > at) {
            return false;
        }
        self.filled.insert(at, end);
        self.covered += n;
        true
    }
}

/// Errors of an NBD client; each says what the server did.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the NBD server broke the protocol: {0}")]
    Protocol(String),
    #[error("the NBD server refused {what}: {message}")]
    Refused { what: String, message: String },
}

impl From<ClientError> for io::Error {
    fn from(e: ClientError) -> io::Error {
        match e {
            ClientError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

/// What haggling does with one option reply (its type and data).
type OptionReply<'a> = dyn FnMut(u32, &[u8]) -> Result<(), ClientError> + 'a;

fn bad(what: impl Into<String>) -> ClientError {
    ClientError::Protocol(what.into())
}

/// An open export.
pub struct Client<S> {
    sock: S,
    size: u64,
    flags: u16,
    /// Meta contexts granted: (id, name).
    contexts: Vec<(u32, String)>,
    cookie: u64,
    /// The server's preferred and largest request sizes (NBD_INFO_BLOCK_SIZE), if it said.
    max_request: u32,
    in_flight: Vec<InFlight>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl<S: Read + Write> Client<S> {
    /// Haggles for `export` with structured replies and the meta contexts `contexts` (each must
    /// be granted), and enters transmission.
    pub fn connect(mut sock: S, export: &str, contexts: &[&str]) -> Result<Self, ClientError> {
        let mut hello = [0u8; 18];
        sock.read_exact(&mut hello)?;
        if be64(&hello, 0) != NBD_MAGIC || be64(&hello, 8) != IHAVEOPT {
            return Err(bad("not an NBD server speaking the newstyle handshake"));
        }
        let hflags = be16(&hello, 16);
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("the server does not speak fixed newstyle"));
        }
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let cflags = CLIENT_FIXED_NEWSTYLE | if no_zeroes { CLIENT_NO_ZEROES } else { 0 };
        sock.write_all(&cflags.to_be_bytes())?;
        let mut c = Client {
            sock,
            size: 0,
            flags: 0,
            contexts: Vec::new(),
            cookie: 0,
            max_request: MAX_READ,
            in_flight: Vec::new(),
        };
        c.option(OPT_STRUCTURED_REPLY, &[])?;
        c.replies(OPT_STRUCTURED_REPLY, "structured replies", &mut |_, _| {
            Ok(())
        })?;
        if !contexts.is_empty() {
            let mut d = name_field(export);
            d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                d.extend_from_slice(&name_field(q));
            }
            c.option(OPT_SET_META_CONTEXT, &d)?;
            let mut granted = Vec::new();
            c.replies(OPT_SET_META_CONTEXT, "meta contexts", &mut |kind, data| {
                if kind == REP_META_CONTEXT {
                    if data.len() < 4 {
                        return Err(bad("a meta context reply shorter than its id"));
                    }
                    let name = String::from_utf8_lossy(&data[4..]).into_owned();
                    granted.push((be32(data, 0), name));
                }
                Ok(())
            })?;
            for q in contexts {
                if !granted.iter().any(|(_, n)| n == q) {
                    return Err(ClientError::Refused {
                        what: format!("meta context {q:?} of export {export:?}"),
                        message: "not offered (no such dirty bitmap, or not exported with it)"
                            .into(),
                    });
                }
            }
            c.contexts = granted;
        }
        let mut d = name_field(export);
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        c.option(OPT_GO, &d)?;
        let mut export_info = None;
        let mut max = MAX_READ;
        c.replies(OPT_GO, &format!("export {export:?}"), &mut |kind, data| {
            if kind != REP_INFO || data.len() < 2 {
                return Ok(());
            }
            match be16(data, 0) {
                INFO_EXPORT if data.len() == 12 => {
                    export_info = Some((be64(data, 2), be16(data, 10)))
                }
                INFO_BLOCK_SIZE if data.len() == 14 => max = be32(data, 10),
                _ => {}
            }
            Ok(())
        })?;
        let (size, flags) =
            export_info.ok_or_else(|| bad("NBD_OPT_GO ended without the export's size"))?;
        if size > i64::MAX as u64 {
            return Err(bad(format!("export size {size} is beyond 2^63")));
        }
        c.size = size;
        c.flags = flags;
        c.max_request = max.clamp(4096, MAX_READ);
        Ok(c)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags (NBD_FLAG_*).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// The id the server gave meta context `name`.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
    }

    /// Largest request length to send.
    pub fn max_request(&self) -> u32 {
        self.max_request
    }

    fn option(&mut self, option: u32, data: &[u8]) -> Result<(), ClientError> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.sock.write_all(&b)?;
        self.sock.flush()?;
        Ok(())
    }

    /// Reads the replies to `option` until its ACK, passing the others to `each`.
    fn replies(
        &mut self,
        option: u32,
        what: &str,
        each: &mut OptionReply<'_>,
    ) -> Result<(), ClientError> {
        for _ in 0..MAX_OPTION_REPLIES {
            let mut h = [0u8; 20];
            self.sock.read_exact(&mut h)?;
            if be64(&h, 0) != OPT_REPLY_MAGIC || be32(&h, 8) != option {
                return Err(bad(format!(
                    "an option reply with a wrong magic or option to {what}"
                )));
            }
            let (kind, len) = (be32(&h, 12), be32(&h, 16));
            if len > MAX_OPTION_REPLY {
                return Err(bad(format!("a {len}-byte option reply to {what}")));
            }
            let mut data = vec![0u8; len as usize];
            self.sock.read_exact(&mut data)?;
            if kind & (1 << 31) != 0 {
                let message = String::from_utf8_lossy(&data).into_owned();
                return Err(ClientError::Refused {
                    what: what.to_string(),
                    message: if message.is_empty() {
                        format!("error {:#x}", kind)
                    } else {
                        message
                    },
                });
            }
            if kind == REP_ACK {
                return Ok(());
            }
            each(kind, &data)?;
        }
        Err(bad(format!(
            "more than {MAX_OPTION_REPLIES} replies to {what}"
        )))
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> Result<u64, ClientError> {
        self.cookie += 1;
        let r = Request {
            flags,
            kind,
            cookie: self.cookie,
            offset,
            len,
        };
        self.sock.write_all(&encode_request(&r))?;
        self.sock.flush()?;
        Ok(self.cookie)
    }

    /// Reads one structured chunk header: (flags, type, length, cookie), the cookie one of
    /// `expected` (the requests in flight).
    fn chunk_of(
        &mut self,
        expected: &dyn Fn(u64) -> bool,
    ) -> Result<(u16, u16, u32, u64), ClientError> {
        let mut h = [0u8; 20];
        self.sock.read_exact(&mut h[..4])?;
        let magic = be32(&h, 0);
        if magic == SIMPLE_REPLY_MAGIC {
            // Only an error may come as a simple reply once structured replies are on.
            self.sock.read_exact(&mut h[4..16])?;
            let (error, c) = (be32(&h, 4), be64(&h, 8));
            if !expected(c) || error == 0 {
                return Err(bad("a simple reply after structured replies were agreed"));
            }
            return Err(ClientError::Io(io::Error::from_raw_os_error(error as i32)));
        }
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(bad(format!("reply magic {magic:#x}")));
        }
        self.sock.read_exact(&mut h[4..])?;
        let c = be64(&h, 8);
        if !expected(c) {
            return Err(bad(format!(
                "a reply to cookie {c}, which is not in flight"
            )));
        }
        Ok((be16(&h, 4), be16(&h, 6), be32(&h, 16), c))
    }

    /// Reads one structured chunk header of the reply to `cookie`: (flags, type, length).
    fn chunk(&mut self, cookie: u64) -> Result<(u16, u16, u32), ClientError> {
        let (f, k, l, _) = self.chunk_of(&|c| c == cookie)?;
        Ok((f, k, l))
    }

    /// Reads an error chunk's payload and returns it as an error.
    fn chunk_error(&mut self, kind: u16, len: u32, what: &str) -> ClientError {
        if !(6..=MAX_OPTION_REPLY).contains(&len) {
            return bad(format!("an error chunk of {len} bytes to {what}"));
        }
        let mut p = vec![0u8; len as usize];
        if let Err(e) = self.sock.read_exact(&mut p) {
            return e.into();
        }
        let (error, mlen) = (be32(&p, 0), be16(&p, 4) as usize);
        let message = String::from_utf8_lossy(&p[6..(6 + mlen).min(p.len())]).into_owned();
        let _ = kind;
        ClientError::Io(io::Error::new(
            io::Error::from_raw_os_error(error as i32).kind(),
            format!("NBD server: {what} failed (error {error}): {message}"),
        ))
    }

    /// Fills `buf` from `offset` (one request of at most [`Client::max_request`] bytes).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        if !self.in_flight.is_empty() {
            return Err(bad("a read while others are in flight"));
        }
        self.send_read(offset, buf.len())?;
        let (_, _, data) = self.recv_read()?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Sends a read of `len` bytes at `offset` (at most [`Client::max_request`] bytes, at most
    /// [`MAX_IN_FLIGHT`] reads at once) and returns its cookie; [`Client::recv_read`] returns its
    /// data when it comes.
    pub fn send_read(&mut self, offset: u64, len: usize) -> Result<u64, ClientError> {
        let len64 = len as u64;
        if len == 0
            || len64 > self.max_request as u64
            || offset.checked_add(len64).is_none_or(|e| e > self.size)
        {
            return Err(bad(format!(
                "read of {len} bytes at {offset} is outside the export"
            )));
        }
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            return Err(bad("too many reads in flight"));
        }
        let cookie = self.request(CMD_READ, 0, offset, len as u32)?;
        self.in_flight.push(InFlight {
            cookie,
            offset,
            data: vec![0u8; len],
            covered: 0,
            chunks: 0,
            filled: Default::default(),
        });
        Ok(cookie)
    }

    /// Reads reply chunks until one read in flight is complete: (cookie, offset, data).
    pub fn recv_read(&mut self) -> Result<(u64, u64, Vec<u8>), ClientError> {
        if self.in_flight.is_empty() {
            return Err(bad("no read in flight"));
        }
        loop {
            let cookies: Vec<u64> = self.in_flight.iter().map(|r| r.cookie).collect();
            let (flags, kind, clen, cookie) = self.chunk_of(&|c| cookies.contains(&c))?;
            let k = self
                .in_flight
                .iter()
                .position(|r| r.cookie == cookie)
                .expect("in flight");
            let (offset, len) = (
                self.in_flight[k].offset,
                self.in_flight[k].data.len() as u64,
            );
            let what = format!("read of {len} bytes at {offset}");
            // Each chunk covers at least one byte: a reply holds at most `len` of them, plus NONE.
            self.in_flight[k].chunks += 1;
            if self.in_flight[k].chunks > len + 1 {
                return Err(bad(format!("too many chunks in the reply to the {what}")));
            }
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let n = (clen as u64)
                        .checked_sub(8)
                        .ok_or_else(|| bad(format!("a short data chunk to the {what}")))?;
                    let mut o = [0u8; 8];
                    self.sock.read_exact(&mut o)?;
                    let at = u64::from_be_bytes(o)
                        .checked_sub(offset)
                        .filter(|&at| n > 0 && at.checked_add(n).is_some_and(|e| e <= len))
                        .ok_or_else(|| bad(format!("a data chunk outside the {what}")))?;
                    let r = &mut self.in_flight[k];
                    if !r.fill(at, n) {
                        return Err(bad(format!("chunks overlap in the reply to the {what}")));
                    }
                    self.sock
                        .read_exact(&mut r.data[at as usize..(at + n) as usize])?;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    if clen != 12 {
                        return Err(bad(format!("a hole chunk of {clen} bytes")));
                    }
                    let mut p = [0u8; 12];
                    self.sock.read_exact(&mut p)?;
                    let n = be32(&p, 8) as u64;
                    let at = be64(&p, 0)
                        .checked_sub(offset)
                        .filter(|&at| n > 0 && at.checked_add(n).is_some_and(|e| e <= len))
                        .ok_or_else(|| bad(format!("a hole chunk outside the {what}")))?;
                    let r = &mut self.in_flight[k];
                    if !r.fill(at, n) {
                        return Err(bad(format!("chunks overlap in the reply to the {what}")));
                    }
                    r.data[at as usize..(at + n) as usize].fill(0);
                }
                REPLY_TYPE_NONE if clen == 0 && flags & REPLY_FLAG_DONE != 0 => {}
                t if t & (1 << 15) != 0 => return Err(self.chunk_error(t, clen, &what)),
                t => return Err(bad(format!("chunk type {t} (length {clen}) to a read"))),
            }
            let r = &self.in_flight[k];
            if r.covered > len {
                return Err(bad(format!("chunks overlap in the reply to the {what}")));
            }
            if flags & REPLY_FLAG_DONE != 0 {
                if r.covered != len {
                    return Err(bad(format!(
                        "{} of {len} bytes in the reply to the {what}",
                        r.covered
                    )));
                }
                let r = self.in_flight.swap_remove(k);
                return Ok((r.cookie, r.offset, r.data));
            }
        }
    }

    /// The extents of meta context `context` from `offset` for up to `len` bytes, as (length,
    /// flags), clipped to the request; at least one byte is described or it is an error.
    pub fn block_status(
        &mut self,
        context: u32,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, u32)>, ClientError> {
        if offset.checked_add(len as u64).is_none_or(|e| e > self.size) || len == 0 {
            return Err(bad(format!(
                "block status of {len} bytes at {offset} is outside the export"
            )));
        }
        if !self.in_flight.is_empty() {
            return Err(bad("block status while reads are in flight"));
        }
        let what = format!("block status of {len} bytes at {offset}");
        let cookie = self.request(CMD_BLOCK_STATUS, 0, offset, len)?;
        let mut out: Vec<(u32, u32)> = Vec::new();
        for _ in 0..=self.contexts.len() + 1 {
            let (flags, kind, clen) = self.chunk(cookie)?;
            match kind {
                REPLY_TYPE_BLOCK_STATUS => {
                    if !(12..=MAX_STATUS_REPLY).contains(&clen) || (clen - 4) % 8 != 0 {
                        return Err(bad(format!("a block status chunk of {clen} bytes")));
                    }
                    let mut p = vec![0u8; clen as usize];
                    self.sock.read_exact(&mut p)?;
                    if be32(&p, 0) == context && out.is_empty() {
                        let mut left = len;
                        for d in p[4..].chunks_exact(8) {
                            let (n, f) = (be32(d, 0), be32(d, 4));
                            if n == 0 {
                                return Err(bad(format!("an empty extent in the {what}")));
                            }
                            let n = n.min(left);
                            out.push((n, f));
                            left -= n;
                            if left == 0 {
                                break;
                            }
                        }
                    }
                }
                REPLY_TYPE_NONE if clen == 0 => {}
                k if k & (1 << 15) != 0 => return Err(self.chunk_error(k, clen, &what)),
                k => {
                    return Err(bad(format!(
                        "chunk type {k} (length {clen}) to block status"
                    )))
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                if out.is_empty() {
                    return Err(bad(format!(
                        "no extents of context {context} in the {what}"
                    )));
                }
                return Ok(out);
            }
        }
        Err(bad(format!("too many chunks in the reply to the {what}")))
    }

    /// Ends the session politely (NBD_CMD_DISC).
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0);
    }
}

fn name_field(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// Where an NBD export is, from an `nbd://HOST[:PORT][/EXPORT]` or
/// `nbd+unix:///EXPORT?socket=PATH` URI (the NBD URI standard; no TLS forms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp {
        host: String,
        port: u16,
        export: String,
    },
    Unix {
        socket: std::path::PathBuf,
        export: String,
    },
}

impl Address {
    pub fn parse(uri: &str) -> Option<Address> {
        let percent = |s: &str| -> Option<String> {
            let b = s.as_bytes();
            let mut out = Vec::with_capacity(b.len());
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'%' {
                    let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                    out.push(u8::from_str_radix(h, 16).ok()?);
                    i += 3;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            String::from_utf8(out).ok()
        };
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?')?;
            let export = percent(path.strip_prefix('/').unwrap_or(path))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .and_then(percent)?;
            return Some(Address::Unix {
                socket: socket.into(),
                export,
            });
        }
        let rest = uri.strip_prefix("nbd://")?;
        let (hostport, export) = match rest.split_once('/') {
            Some((h, e)) => (h, percent(e)?),
            None => (rest, String::new()),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
            _ => (hostport, 10809),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return None;
        }
        Some(Address::Tcp {
            host: host.to_string(),
            port,
            export,
        })
    }

    pub fn export(&self) -> &str {
        match self {
            Address::Tcp { export, .. } | Address::Unix { export, .. } => export,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            Address::parse("nbd://127.0.0.1:10810/disk%201"),
            Some(Address::Tcp {
                host: "127.0.0.1".into(),
                port: 10810,
                export: "disk 1".into()
            })
        );
        assert_eq!(
            Address::parse("nbd://localhost"),
            Some(Address::Tcp {
                host: "localhost".into(),
                port: 10809,
                export: String::new()
            })
        );
        assert_eq!(
            Address::parse("nbd+unix:///vm0?socket=/run/q%20s.sock"),
            Some(Address::Unix {
                socket: "/run/q s.sock".into(),
                export: "vm0".into()
            })
        );
        assert_eq!(Address::parse("nbd+unix:///vm0"), None);
        assert_eq!(Address::parse("http://x"), None);
        assert_eq!(Address::parse("nbd://:99/x"), None);
    }
}
