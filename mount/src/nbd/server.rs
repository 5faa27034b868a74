//! The NBD server: handshake, option negotiation and the transmission phase on tokio.
//!
//! Per connection, one task reads requests and one task writes replies; each request runs in its
//! own task (reads go through `spawn_blocking`, since the vault reader is synchronous), so many
//! requests are in flight and replies go out in completion order, each as one whole frame. Reads
//! take permits from a server-wide budget of in-flight bytes, which bounds memory whatever clients
//! send. Anything malformed ends only the offending connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use scalez::reader::{DiskReader, Segment};

use crate::overlay::Overlay;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::proto::*;

/// Largest request payload (read or write) the server accepts: 32 MiB, advertised as the
/// maximum block size.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Option data larger than this closes the connection (real clients send a few hundred bytes).
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Extents per block-status reply.
const MAX_EXTENTS: usize = 4096;
/// The only metadata context, `base:allocation`.
const CONTEXT_ID: u32 = 1;

/// One exported disk RP.
pub struct Export {
    /// The RP id, the primary export name.
    pub name: String,
    /// Other names that select this export (the asset name).
    pub aliases: Vec<String>,
    pub description: String,
    pub disk: Disk,
}

/// What an export serves: the RP itself (read-only) or a copy-on-write overlay over it.
#[derive(Clone)]
pub enum Disk {
    ReadOnly(Arc<DiskReader>),
    Writable(Arc<Overlay>),
}

impl Disk {
    pub fn size(&self) -> u64 {
        match self {
            Disk::ReadOnly(r) => r.size(),
            Disk::Writable(o) => o.size(),
        }
    }

    fn reader(&self) -> &Arc<DiskReader> {
        match self {
            Disk::ReadOnly(r) => r,
            Disk::Writable(o) => o.base(),
        }
    }

    /// `len` bytes at `offset` (the range was checked against the size) as buffer slices.
    fn read_segments(&self, offset: u64, len: usize) -> io::Result<Vec<Segment>> {
        match self {
            Disk::ReadOnly(r) => r.read_segments(offset, len).map_err(io::Error::from),
            Disk::Writable(o) => {
                let mut buf = vec![0u8; len];
                o.read_at(offset, &mut buf)?;
                Ok(vec![Segment {
                    data: Arc::new(buf),
                    range: 0..len,
                }])
            }
        }
    }

    fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<(u64, bool)>> {
        match self {
            Disk::ReadOnly(r) => r.extents(offset, len, max).map_err(io::Error::from),
            Disk::Writable(o) => o.extents(offset, len, max),
        }
    }

    fn flags(&self) -> u16 {
        let common = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_DF | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
        match self {
            Disk::ReadOnly(_) => common | TF_READ_ONLY,
            Disk::Writable(_) => common | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub max_connections: usize,
    /// Bytes of read data in flight across all connections.
    pub inflight_bytes: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 64,
            inflight_bytes: 256 << 20,
        }
    }
}

pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

pub struct Server {
    exports: Arc<Vec<Export>>,
    by_name: Arc<HashMap<String, usize>>,
    opts: ServerOptions,
}

const PERMIT: usize = 1 << 20;

impl Server {
    pub fn new(exports: Vec<Export>, opts: ServerOptions) -> Self {
        let mut by_name = HashMap::new();
        for (i, e) in exports.iter().enumerate() {
            by_name.insert(e.name.clone(), i);
            for a in &e.aliases {
                by_name.entry(a.clone()).or_insert(i);
            }
        }
        Server {
            exports: Arc::new(exports),
            by_name: Arc::new(by_name),
            opts,
        }
    }

    /// Serves connections from `listener` until `shutdown` completes.
    pub async fn run(
        self,
        listen: Listen,
        ready: impl FnOnce(&str),
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let conns = Arc::new(Semaphore::new(self.opts.max_connections));
        let budget = Arc::new(Semaphore::new(
            (self.opts.inflight_bytes / PERMIT).max((MAX_REQUEST as usize) / PERMIT),
        ));
        let shared = Arc::new(Shared {
            exports: self.exports.clone(),
            by_name: self.by_name.clone(),
            budget,
        });
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        match listen {
            Listen::Tcp(addr) => {
                let l = tokio::net::TcpListener::bind(addr).await?;
                ready(&l.local_addr()?.to_string());
                loop {
                    tokio::select! {
                        _ = &mut shutdown => break,
                        accepted = l.accept() => {
                            let Ok((s, peer)) = accepted else { continue };
                            let _ = s.set_nodelay(true);
                            spawn_conn(&mut tasks, &conns, &shared, s, peer.to_string());
                        }
                        Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                    }
                }
            }
            Listen::Unix(path) => {
                let _ = std::fs::remove_file(&path);
                let l = tokio::net::UnixListener::bind(&path)?;
                ready(&path.display().to_string());
                loop {
                    tokio::select! {
                        _ = &mut shutdown => break,
                        accepted = l.accept() => {
                            let Ok((s, _)) = accepted else { continue };
                            spawn_conn(&mut tasks, &conns, &shared, s, "unix".into());
                        }
                        Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                    }
                }
                let _ = std::fs::remove_file(&path);
            }
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}

struct Shared {
    exports: Arc<Vec<Export>>,
    by_name: Arc<HashMap<String, usize>>,
    budget: Arc<Semaphore>,
}

impl Shared {
    /// The export a client names; "" selects the first.
    fn find(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return (!self.exports.is_empty()).then_some(0);
        }
        self.by_name.get(name).copied()
    }
}

fn spawn_conn<S>(
    tasks: &mut JoinSet<()>,
    conns: &Arc<Semaphore>,
    shared: &Arc<Shared>,
    stream: S,
    peer: String,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(permit) = conns.clone().try_acquire_owned() else {
        tracing::warn!("refusing connection from {peer}: connection limit reached");
        return; // dropping the stream closes it
    };
    let shared = shared.clone();
    tasks.spawn(async move {
        match connection(stream, &shared).await {
            Ok(()) => tracing::debug!("{peer}: disconnected"),
            Err(e) => tracing::info!("{peer}: connection closed: {e}"),
        }
        drop(permit);
    });
}

/// What the handshake agreed on.
struct Session {
    export: usize,
    structured: bool,
    allocation_context: bool,
}

async fn connection<S>(stream: S, shared: &Arc<Shared>) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    wr.write_all(&greeting()).await?;
    let client_flags = rd.read_u32().await?;
    if client_flags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(io::Error::other("client does not speak fixed newstyle"));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let Some(session) = negotiate(&mut rd, &mut wr, shared, no_zeroes).await? else {
        return Ok(());
    };
    transmission(rd, wr, shared, session).await
}

/// The option error for an export name that matches nothing.
fn unknown_export(option: u32, name: &str) -> Vec<u8> {
    option_error(
        option,
        REP_ERR_UNKNOWN,
        &format!("no export named {name:?}"),
    )
}

/// Option haggling. Returns the session to serve, or None when the client aborted.
async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    shared: &Shared,
    no_zeroes: bool,
) -> io::Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut structured = false;
    let mut allocation_context = false;
    loop {
        let mut h = [0u8; 16];
        rd.read_exact(&mut h).await?;
        let h = parse_option_header(&h).map_err(io::Error::other)?;
        if h.len > MAX_OPTION_DATA {
            return Err(io::Error::other(format!(
                "option {} carries {} bytes",
                h.option, h.len
            )));
        }
        let mut data = vec![0u8; h.len as usize];
        rd.read_exact(&mut data).await?;
        let reply = |kind, d: &[u8]| option_reply(h.option, kind, d);
        match h.option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                // No way to report an error here: the spec says close.
                let Some(i) = shared.find(&name) else {
                    return Err(io::Error::other(format!("unknown export {name:?}")));
                };
                let disk = &shared.exports[i].disk;
                let mut out = disk.size().to_be_bytes().to_vec();
                out.extend_from_slice(&disk.flags().to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                wr.write_all(&out).await?;
                return Ok(Some(Session {
                    export: i,
                    structured,
                    allocation_context,
                }));
            }
            OPT_ABORT => {
                let _ = wr.write_all(&reply(REP_ACK, &[])).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    wr.write_all(&option_error(
                        h.option,
                        REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    ))
                    .await?;
                    continue;
                }
                for e in shared.exports.iter() {
                    wr.write_all(&reply(REP_SERVER, &server_entry(&e.name)))
                        .await?;
                }
                wr.write_all(&reply(REP_ACK, &[])).await?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    wr.write_all(&option_error(h.option, REP_ERR_INVALID, "no data expected"))
                        .await?;
                    continue;
                }
                structured = true;
                wr.write_all(&reply(REP_ACK, &[])).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = h.option == OPT_SET_META_CONTEXT;
                if !structured {
                    wr.write_all(&option_error(
                        h.option,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    ))
                    .await?;
                    continue;
                }
                let (name, queries) = match parse_meta_request(&data) {
                    Ok(x) => x,
                    Err(e) => {
                        wr.write_all(&option_error(h.option, REP_ERR_INVALID, &e.to_string()))
                            .await?;
                        continue;
                    }
                };
                if shared.find(&name).is_none() {
                    wr.write_all(&unknown_export(h.option, &name)).await?;
                    continue;
                }
                let matches =
                    |q: &str| q == BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty()));
                let wanted = if queries.is_empty() {
                    !set
                } else {
                    queries.iter().any(|q| matches(q))
                };
                if set {
                    allocation_context = wanted;
                }
                if wanted {
                    wr.write_all(&reply(
                        REP_META_CONTEXT,
                        &meta_context(CONTEXT_ID, BASE_ALLOCATION),
                    ))
                    .await?;
                }
                wr.write_all(&reply(REP_ACK, &[])).await?;
            }
            OPT_INFO | OPT_GO => {
                let (name, infos) = match parse_info_request(&data) {
                    Ok(x) => x,
                    Err(e) => {
                        wr.write_all(&option_error(h.option, REP_ERR_INVALID, &e.to_string()))
                            .await?;
                        continue;
                    }
                };
                let Some(i) = shared.find(&name) else {
                    wr.write_all(&unknown_export(h.option, &name)).await?;
                    continue;
                };
                let e = &shared.exports[i];
                wr.write_all(&reply(
                    REP_INFO,
                    &info_export(e.disk.size(), e.disk.flags()),
                ))
                .await?;
                if infos.contains(&INFO_BLOCK_SIZE) {
                    let d = info_block_size(512, e.disk.reader().chunk_size(), MAX_REQUEST);
                    wr.write_all(&reply(REP_INFO, &d)).await?;
                }
                if infos.contains(&INFO_NAME) {
                    wr.write_all(&reply(REP_INFO, &info_text(INFO_NAME, &e.name)))
                        .await?;
                }
                if infos.contains(&INFO_DESCRIPTION) {
                    wr.write_all(&reply(
                        REP_INFO,
                        &info_text(INFO_DESCRIPTION, &e.description),
                    ))
                    .await?;
                }
                wr.write_all(&reply(REP_ACK, &[])).await?;
                if h.option == OPT_GO {
                    return Ok(Some(Session {
                        export: i,
                        structured,
                        allocation_context,
                    }));
                }
            }
            _ => {
                wr.write_all(&option_error(
                    h.option,
                    REP_ERR_UNSUP,
                    "option not supported",
                ))
                .await?;
            }
        }
    }
}

/// Builds complete reply frames for one request.
#[derive(Clone, Copy)]
struct Replier {
    structured: bool,
    cookie: u64,
}

impl Replier {
    fn ok(self) -> Vec<u8> {
        if self.structured {
            chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, self.cookie, 0).to_vec()
        } else {
            simple_reply(0, self.cookie).to_vec()
        }
    }

    fn error(self, errno: u32, msg: &str) -> Vec<u8> {
        if self.structured {
            chunk_error(self.cookie, errno, msg)
        } else {
            simple_reply(errno, self.cookie).to_vec()
        }
    }

    /// A successful read: the header, then `data` sent from the buffers it points into.
    fn read_ok(self, offset: u64, data: Vec<Segment>) -> Reply {
        let len: usize = data.iter().map(|s| s.range.len()).sum();
        let head = if self.structured {
            let mut h = chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                self.cookie,
                8 + len as u32,
            )
            .to_vec();
            h.extend_from_slice(&offset.to_be_bytes());
            h
        } else {
            simple_reply(0, self.cookie).to_vec()
        };
        Reply { head, body: data }
    }
}

/// One reply frame: header bytes, then slices of shared buffers (written without copying).
struct Reply {
    head: Vec<u8>,
    body: Vec<Segment>,
}

impl From<Vec<u8>> for Reply {
    fn from(head: Vec<u8>) -> Self {
        Reply {
            head,
            body: Vec::new(),
        }
    }
}

/// Runs `f` on the blocking pool and sends the frame it returns (an EIO reply if it panicked).
/// `hold` (the request's share of the byte budgets) travels with the frame and is released only
/// once the frame is written to the socket, so memory held for slow readers stays counted.
fn reply_with<R: Into<Reply> + Send + 'static>(
    tx: &mpsc::Sender<Frame>,
    r: Replier,
    hold: Option<Budget>,
    f: impl FnOnce() -> R + Send + 'static,
) {
    let tx = tx.clone();
    tokio::spawn(async move {
        let frame = tokio::task::spawn_blocking(move || f().into())
            .await
            .unwrap_or_else(|e| r.error(EIO, &e.to_string()).into());
        let _ = tx.send((frame, hold)).await;
    });
}

/// A reply on its way to the socket, with the budget it holds.
type Frame = (Reply, Option<Budget>);

/// Permits for a request's bytes: from its connection's budget and the server-wide one.
type Budget = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// Bytes of request data one connection may have in flight (replies not yet written included).
const CONNECTION_BUDGET: usize = 64 << 20;

async fn transmission<R, W>(
    mut rd: R,
    mut wr: W,
    shared: &Arc<Shared>,
    s: Session,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Frame>(64);
    let writer = tokio::spawn(async move {
        while let Some((frame, hold)) = rx.recv().await {
            wr.write_all(&frame.head).await?;
            for seg in &frame.body {
                wr.write_all(seg.bytes()).await?;
            }
            drop(hold);
        }
        wr.flush().await
    });
    let disk = shared.exports[s.export].disk.clone();
    let size = disk.size();
    let conn_budget = Arc::new(Semaphore::new(CONNECTION_BUDGET / PERMIT));
    let result: io::Result<()> = async {
        loop {
            let mut h = [0u8; REQUEST_LEN];
            match rd.read_exact(&mut h).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let req = parse_request(&h).map_err(io::Error::other)?;
            let r = Replier {
                structured: s.structured,
                cookie: req.cookie,
            };
            let in_range = req
                .offset
                .checked_add(req.len as u64)
                .is_some_and(|end| end <= size);
            let send = |frame: Vec<u8>| {
                let tx = tx.clone();
                async move {
                    tx.send((Reply::from(frame), None))
                        .await
                        .map_err(|_| io::Error::other("reply writer stopped"))
                }
            };
            let io_reply = move |res: io::Result<()>| match res {
                Ok(()) => r.ok(),
                Err(e) => {
                    tracing::error!("request {} at {}: {e}", req.kind, req.offset);
                    r.error(EIO, &e.to_string())
                }
            };
            let permits = |len: u32| {
                let n = (len as usize).div_ceil(PERMIT).max(1) as u32;
                let (conn, global) = (conn_budget.clone(), shared.budget.clone());
                async move {
                    let c = conn.acquire_many_owned(n).await.map_err(io::Error::other)?;
                    let g = global
                        .acquire_many_owned(n)
                        .await
                        .map_err(io::Error::other)?;
                    io::Result::Ok((c, g))
                }
            };
            match req.kind {
                CMD_READ => {
                    if req.len > MAX_REQUEST {
                        send(r.error(EINVAL, "read larger than the maximum block size")).await?;
                        continue;
                    }
                    if !in_range {
                        send(r.error(EINVAL, "read past the end of the export")).await?;
                        continue;
                    }
                    let permit = permits(req.len).await?;
                    let disk = disk.clone();
                    reply_with(&tx, r, Some(permit), move || {
                        match disk.read_segments(req.offset, req.len as usize) {
                            Ok(data) => r.read_ok(req.offset, data),
                            Err(e) => io_reply(Err(e)).into(),
                        }
                    });
                }
                CMD_WRITE => {
                    if req.len > MAX_REQUEST {
                        return Err(io::Error::other(
                            "write payload larger than the maximum block size",
                        ));
                    }
                    let permit = permits(req.len).await?;
                    let mut data = vec![0u8; req.len as usize];
                    rd.read_exact(&mut data).await?;
                    match &disk {
                        Disk::ReadOnly(_) => {
                            send(r.error(EPERM, "the export is read-only")).await?
                        }
                        Disk::Writable(_) if !in_range => {
                            send(r.error(ENOSPC, "write past the end of the export")).await?
                        }
                        Disk::Writable(o) => {
                            let o = o.clone();
                            reply_with(&tx, r, Some(permit), move || {
                                io_reply(o.write_at(req.offset, &data))
                            });
                        }
                    }
                }
                CMD_TRIM | CMD_WRITE_ZEROES => match &disk {
                    Disk::ReadOnly(_) => send(r.error(EPERM, "the export is read-only")).await?,
                    Disk::Writable(_) if !in_range => {
                        send(r.error(ENOSPC, "request past the end of the export")).await?
                    }
                    Disk::Writable(o) => {
                        let o = o.clone();
                        reply_with(&tx, r, None, move || {
                            io_reply(o.zero(req.offset, req.len as u64))
                        });
                    }
                },
                CMD_FLUSH => match &disk {
                    Disk::ReadOnly(_) => send(r.ok()).await?,
                    Disk::Writable(o) => {
                        let o = o.clone();
                        reply_with(&tx, r, None, move || io_reply(o.flush()));
                    }
                },
                CMD_CACHE => {
                    if !in_range {
                        send(r.error(EINVAL, "cache request past the end")).await?;
                        continue;
                    }
                    let reader = disk.reader().clone();
                    reply_with(&tx, r, None, move || {
                        io_reply(
                            prefetch(&reader, req.offset, req.len as u64).map_err(io::Error::from),
                        )
                    });
                }
                CMD_BLOCK_STATUS => {
                    if !s.allocation_context {
                        send(r.error(EINVAL, "no metadata context was negotiated")).await?;
                        continue;
                    }
                    if req.offset >= size || req.len == 0 {
                        send(r.error(EINVAL, "block status past the end")).await?;
                        continue;
                    }
                    let disk = disk.clone();
                    reply_with(&tx, r, None, move || {
                        let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                            1
                        } else {
                            MAX_EXTENTS
                        };
                        match disk.extents(req.offset, req.len as u64, max) {
                            Ok(runs) => {
                                let d: Vec<(u32, u32)> = runs
                                    .into_iter()
                                    .map(|(len, data)| {
                                        (len as u32, if data { 0 } else { STATE_HOLE | STATE_ZERO })
                                    })
                                    .collect();
                                chunk_block_status(req.cookie, CONTEXT_ID, &d)
                            }
                            Err(e) => io_reply(Err(e)),
                        }
                    });
                }
                CMD_DISC => return Ok(()),
                _ => send(r.error(EINVAL, "unknown command")).await?,
            }
        }
    }
    .await;
    // Let in-flight replies finish, then close.
    drop(tx);
    let written = writer.await.map_err(io::Error::other)?;
    result.and(written)
}

/// Reads a range into the reader's cache (NBD_CMD_CACHE).
fn prefetch(reader: &DiskReader, offset: u64, len: u64) -> scalez::Result<()> {
    let cs = reader.chunk_size() as u64;
    let end = (offset + len).min(reader.size());
    let mut slot = offset / cs;
    while slot * cs < end {
        reader.slot(slot)?;
        slot += 1;
    }
    Ok(())
}

/// Serves the transmission phase only, on a socket whose handshake already happened elsewhere:
/// the kernel's nbd client after `NBD_SET_SOCK` (simple replies, no metadata contexts).
pub async fn serve_kernel<S>(stream: S, export: Export) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = Arc::new(Shared {
        exports: Arc::new(vec![export]),
        by_name: Arc::new(HashMap::new()),
        budget: Arc::new(Semaphore::new(
            ServerOptions::default().inflight_bytes / PERMIT,
        )),
    });
    let (rd, wr) = tokio::io::split(stream);
    let session = Session {
        export: 0,
        structured: false,
        allocation_context: false,
    };
    transmission(rd, wr, &shared, session).await
}

impl Export {
    /// Transmission flags this export advertises.
    pub fn flags(&self) -> u16 {
        self.disk.flags()
    }
}
