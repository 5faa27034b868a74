//! The NBD server: handshake, option negotiation and the transmission phase on tokio.
//!
//! Per connection, one task reads requests and one task writes replies; each request runs in its
//! own task (reads go through `spawn_blocking`, since the vault reader is synchronous), so many
//! requests are in flight and replies go out in completion order, each as one whole frame.
//! Anything malformed ends only the offending connection.
//!
//! Invariants (each a limit in [`ServerOptions`], so memory and connection slots are bounded
//! whatever clients send, including clients that send and never read):
//! * **Every request is paid for before it is processed.** After its 28-byte header is read, a
//!   request takes a request slot of its connection (`connection_requests`, default 128) and
//!   permits for its cost in bytes from its connection's budget (`connection_bytes`, 48 MiB) and
//!   from the server-wide one (`inflight_bytes`, 256 MiB). The cost is [`REQUEST_COST`] plus the
//!   bytes the request brings or the reply may carry: a READ's length, a WRITE's payload,
//!   BLOCK_STATUS's largest reply. Permits travel with the reply and are released only once it is
//!   written to the socket. Until then the reader does not read the next request: a connection at
//!   its cap gets TCP backpressure, never an unbounded queue.
//! * **No connection can take the whole budget, nor can many.** A connection's byte budget is
//!   well under the server's, and a quarter of the server's is a reserve shared out per
//!   admitted connection (1 MiB each by default, [`RESERVE_REQUEST`]), which a small request
//!   may draw on when the rest is taken, one per connection at a time; a connection's place
//!   under the limit is freed only when its last request lets go of its budget. However many
//!   connections hold the rest (clients that pipeline and never read), every connection so
//!   gets small requests through, one at a time; larger ones wait until the write timeout
//!   drops a stalled connection.
//! * **Requests have bounded work.** READ and WRITE at most [`MAX_REQUEST`] (32 MiB, advertised);
//!   BLOCK_STATUS looks at most [`MAX_BLOCK_STATUS`] (1 GiB) and answers with at most
//!   [`MAX_EXTENTS`] descriptors (the spec lets a server describe less than asked); CACHE is a
//!   hint and prefetches at most [`MAX_CACHE`] (32 MiB) of what it names.
//! * **Every connection ends.** The handshake must finish within `handshake_timeout` (10 s); a
//!   connection with no request in flight and no traffic for `idle_timeout` (10 min) is closed,
//!   and so is one whose replies make no progress into the socket for `write_timeout` (60 s: a
//!   client that sends but never reads). Silent or stuck clients so cannot hold the connection
//!   limit (`max_connections`) forever.
//! * Export sizes need not be a multiple of 512: such an export advertises a minimum block size
//!   of 1, so clients neither round its size nor refuse the unaligned tail.
//!
//! TLS, as qemu-nbd and nbdkit do it ([`Tls`], `--tls-certificates DIR --tls off|on|require`):
//! NBD_OPT_STARTTLS in fixed-newstyle option haggling is answered NBD_REP_ACK, the TLS handshake
//! (rustls on ring, TLS 1.2/1.3; client certificates signed by the directory's CA are required
//! with `--tls-verify-peer`, not asked for otherwise) follows
//! on the same socket, and haggling starts over inside TLS, with nothing agreed in plain text kept.
//! With `require`, every option before TLS but STARTTLS and ABORT is answered
//! NBD_REP_ERR_TLS_REQD and NBD_OPT_EXPORT_NAME closes the connection; a second STARTTLS inside
//! TLS is NBD_REP_ERR_INVALID; without TLS set up STARTTLS is NBD_REP_ERR_POLICY
//! ([`tls_gate`] decides, purely). The socket becomes a `Stream` that is plain or TLS; the TLS
//! handshake counts against `handshake_timeout`, and inside TLS the budgets, idle and write
//! timeouts work as on a plain socket. The reply writer flushes whenever it has no frame queued,
//! since TLS may hold the end of a frame in its buffer (a flush is a no-op on a plain socket).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use scalez::reader::{DiskReader, Segment};

use crate::overlay::Overlay;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::proto::*;

/// Largest request payload (read or write) the server accepts: 32 MiB, advertised as the
/// maximum block size.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Option data larger than this closes the connection (real clients send a few hundred bytes).
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Extents per block-status reply (a reply of at most 32 KiB).
pub const MAX_EXTENTS: usize = 4096;
/// Bytes one BLOCK_STATUS looks at: longer requests are answered for their first 1 GiB, which the
/// spec allows (the client asks again from where the reply ended).
pub const MAX_BLOCK_STATUS: u64 = 1 << 30;
/// Bytes one CACHE prefetches: it is only a hint, the rest of a longer range is ignored.
pub const MAX_CACHE: u64 = 32 << 20;
/// Largest request that may draw on the server's reserve, one per connection at a time (see
/// `Budget`): 1 MiB with the default limits (the reserve for 64 connections is then 64 MiB, a
/// quarter of the budget); with more connections, less.
pub const RESERVE_REQUEST: u32 = 1 << 20;
/// What every request costs in the byte budgets besides its data: its task, reply header and
/// bookkeeping, rounded up generously, so that requests without payload are paid for too.
pub const REQUEST_COST: u32 = 4096;
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

/// Limits of a [`Server`]; see the module documentation for what each guarantees.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Connections served at once (handshakes included); more are closed right away.
    pub max_connections: usize,
    /// Bytes in flight across all connections: request payloads, reply data and
    /// [`REQUEST_COST`] per request.
    pub inflight_bytes: usize,
    /// Bytes one connection may have in flight (raised to fit one largest request).
    pub connection_bytes: usize,
    /// Requests one connection may have in flight.
    pub connection_requests: usize,
    /// Time a client has from connecting to finishing option negotiation.
    pub handshake_timeout: Option<Duration>,
    /// A connection with no request in flight that sends nothing for this long is closed.
    pub idle_timeout: Option<Duration>,
    /// A connection whose socket accepts no reply bytes for this long (the client does not read)
    /// is closed.
    pub write_timeout: Option<Duration>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 64,
            inflight_bytes: 256 << 20,
            connection_bytes: 48 << 20,
            connection_requests: 128,
            handshake_timeout: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(600)),
            write_timeout: Some(Duration::from_secs(60)),
        }
    }
}

impl ServerOptions {
    /// The limits actually applied: every budget fits at least one largest request.
    fn effective(&self) -> ServerOptions {
        let largest = (MAX_REQUEST + REQUEST_COST) as usize;
        let connection_bytes = self.connection_bytes.max(largest);
        ServerOptions {
            max_connections: self.max_connections.max(1),
            // Enough that the pool holds at least one connection's budget (so one largest
            // request) beside the reserve `Budget::new` takes: the reserve is at most a quarter
            // of the budget plus 4 KiB per connection, or 8 KiB per connection at its floor.
            inflight_bytes: self.inflight_bytes.max(
                2 * (connection_bytes + self.max_connections.max(1) * 2 * REQUEST_COST as usize),
            ),
            connection_bytes,
            connection_requests: self.connection_requests.max(1),
            ..self.clone()
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
    tls: Option<Tls>,
}

/// The server's TLS: its certificate and key, whether clients must use it, and whether they
/// must present a certificate.
#[derive(Clone)]
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    require: bool,
    verify_peer: bool,
}

impl Tls {
    /// Loads `server-cert.pem` (the certificate, optionally followed by its chain) and
    /// `server-key.pem` from `dir`, the layout of qemu-nbd's and nbdkit's `--tls-certificates`.
    /// With `verify_peer` (nbdkit's `--tls-verify-peer`, qemu's `verify-peer`), clients must
    /// present a certificate that `dir/ca-cert.pem` signed (libnbd sends `client-cert.pem` and
    /// `client-key.pem` from its own certificate directory): that is what authenticates clients;
    /// without it the server asks for no certificate and TLS authenticates the server only.
    /// `verify_peer` implies `require`. rustls on the ring provider, TLS 1.2 and 1.3.
    pub fn load(dir: &Path, require: bool, verify_peer: bool) -> io::Result<Tls> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |file: &str, e: &dyn std::fmt::Display| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", dir.join(file).display()),
            )
        };
        let pem_certs = |file: &str| {
            let certs = CertificateDer::pem_file_iter(dir.join(file))
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(file, &e))?;
            if certs.is_empty() {
                return Err(bad(file, &"no certificate in the file"));
            }
            Ok(certs)
        };
        let certs = pem_certs("server-cert.pem")?;
        let key = PrivateKeyDer::from_pem_file(dir.join("server-key.pem"))
            .map_err(|e| bad("server-key.pem", &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?;
        let builder = if verify_peer {
            let mut roots = rustls::RootCertStore::empty();
            for ca in pem_certs("ca-cert.pem")? {
                roots.add(ca).map_err(|e| bad("ca-cert.pem", &e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| bad("ca-cert.pem", &e))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| bad("server-key.pem", &e))?;
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            // Verified clients only, so never plain-text ones.
            require: require || verify_peer,
            verify_peer,
        })
    }

    /// Whether only clients the CA vouches for are served: TLS required, with client
    /// certificates verified.
    pub fn authenticates_clients(&self) -> bool {
        self.require && self.verify_peer
    }

    fn mode(tls: &Option<Tls>) -> TlsMode {
        match tls {
            None => TlsMode::Off,
            Some(t) if t.require => TlsMode::Require,
            Some(_) => TlsMode::On,
        }
    }
}

/// A connection's byte stream: the socket, then (after NBD_OPT_STARTTLS) TLS over it.
enum Stream<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, b),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

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
            opts: opts.effective(),
            tls: None,
        }
    }

    /// Offers TLS (NBD_OPT_STARTTLS), or requires it (see [`Tls::load`]).
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    fn shared(&self) -> Arc<Shared> {
        Arc::new(Shared {
            exports: self.exports.clone(),
            by_name: self.by_name.clone(),
            budget: Budget::new(&self.opts),
            opts: self.opts.clone(),
            tls: self.tls.clone(),
        })
    }

    /// Serves one client on `stream` (any byte stream) until it disconnects, as [`Self::run`]
    /// serves each accepted connection: for the fuzz target of the whole server, which feeds
    /// it client bytes through an in-memory pipe.
    #[doc(hidden)]
    pub async fn serve_stream<S>(&self, stream: S) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        connection(stream, &self.shared(), None).await
    }

    /// Serves `data` as one client's bytes through an in-memory pipe until the session ends,
    /// reading and dropping the replies as they come: the `nbd_server` fuzz target's driver
    /// (and its replay test's). Client errors end the session; a panic or a session that
    /// never ends is the server's fault.
    #[doc(hidden)]
    pub async fn serve_client_bytes(&self, data: &[u8]) {
        let (client, server_end) = tokio::io::duplex(16 << 10);
        let (mut rd, mut wr) = tokio::io::split(client);
        let send = async {
            // The server may close first (a protocol error): the rest is not delivered.
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let receive = async {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::join!(self.serve_stream(server_end), send, receive);
    }

    /// Serves connections from `listener` until `shutdown` completes.
    pub async fn run(
        self,
        listen: Listen,
        ready: impl FnOnce(&str),
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let conns = Arc::new(Semaphore::new(self.opts.max_connections));
        let shared = self.shared();
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        match listen {
            Listen::Tcp(addr) => {
                let l = tokio::net::TcpListener::bind(addr).await?;
                let authenticated = self.tls.as_ref().is_some_and(Tls::authenticates_clients);
                if !addr.ip().is_loopback() && !authenticated {
                    tracing::warn!("{}", exposed_warning(&addr));
                }
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
                let l = bind_private_unix(&path)?;
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

/// The server the `nbd_server` fuzz target (and its replay test) feeds: `disk` exported
/// read-only as "ro" (alias "disk") and writable as "rw" (a fresh overlay in the temp dir, so
/// nothing carries over between inputs), with small budgets so inputs reach the waits for
/// permits, and no timeouts (the input's end must end every session).
#[doc(hidden)]
pub fn fuzz_server(disk: &Arc<DiskReader>) -> io::Result<Server> {
    let overlay = Overlay::create(disk.clone(), &std::env::temp_dir())?;
    let exports = vec![
        Export {
            name: "ro".into(),
            aliases: vec!["disk".into()],
            description: "read-only".into(),
            disk: Disk::ReadOnly(disk.clone()),
        },
        Export {
            name: "rw".into(),
            aliases: Vec::new(),
            description: String::new(),
            disk: Disk::Writable(Arc::new(overlay)),
        },
    ];
    let opts = ServerOptions {
        max_connections: 1,
        inflight_bytes: 0,
        connection_bytes: 0,
        connection_requests: 4,
        handshake_timeout: None,
        idle_timeout: None,
        write_timeout: None,
    };
    Ok(Server::new(exports, opts))
}

/// What to tell the operator when `addr` can be reached from other machines.
pub fn exposed_warning(addr: &SocketAddr) -> String {
    format!(
        "listening on {addr}, which is not a loopback address: the NBD exports are \
         unauthenticated, readable (and, if writable, writable) by anyone who can reach it \
         (--tls-certificates DIR --tls-verify-peer admits only clients with a certificate \
         DIR/ca-cert.pem signed)"
    )
}

struct Shared {
    exports: Arc<Vec<Export>>,
    by_name: Arc<HashMap<String, usize>>,
    /// Bytes in flight across all connections.
    budget: Budget,
    opts: ServerOptions,
    tls: Option<Tls>,
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
        // The connection's place under the limit goes with its budget holds: a request still
        // being served after the connection ended keeps it taken (and its reserve ticket).
        match connection(stream, &shared, Some(permit)).await {
            Ok(()) => tracing::debug!("{peer}: disconnected"),
            Err(e) => tracing::info!("{peer}: connection closed: {e}"),
        }
    });
}

/// What the handshake agreed on.
struct Session {
    export: usize,
    structured: bool,
    allocation_context: bool,
}

async fn connection<S>(
    stream: S,
    shared: &Arc<Shared>,
    admission: Option<OwnedSemaphorePermit>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut stream = Stream::Plain(stream);
    // The TLS handshake is part of the handshake and of its timeout.
    let handshake = async move {
        stream.write_all(&greeting()).await?;
        let client_flags = stream.read_u32().await?;
        if client_flags & CLIENT_FIXED_NEWSTYLE == 0 {
            return Err(io::Error::other("client does not speak fixed newstyle"));
        }
        let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
        loop {
            match negotiate(&mut stream, shared, no_zeroes).await? {
                Negotiated::Serve(session) => {
                    stream.flush().await?;
                    return Ok(Some((stream, session)));
                }
                Negotiated::Abort => {
                    let _ = stream.flush().await;
                    return Ok(None);
                }
                Negotiated::StartTls => {
                    let (Stream::Plain(s), Some(tls)) = (stream, &shared.tls) else {
                        unreachable!("STARTTLS is only accepted in plain text with TLS set up");
                    };
                    stream = Stream::Tls(Box::new(tls.acceptor.accept(s).await?));
                }
            }
        }
    };
    let session = match shared.opts.handshake_timeout {
        Some(t) => tokio::time::timeout(t, handshake).await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("handshake not finished within {t:?}"),
            )
        })??,
        None => handshake.await?,
    };
    let Some((stream, session)) = session else {
        return Ok(());
    };
    let (rd, wr) = tokio::io::split(stream);
    transmission(rd, wr, shared, session, admission).await
}

/// How option haggling ended.
enum Negotiated {
    Serve(Session),
    /// The client sent NBD_OPT_ABORT.
    Abort,
    /// NBD_OPT_STARTTLS was acknowledged: the TLS handshake comes next, then haggling again.
    StartTls,
}

/// The option error for an export name that matches nothing.
fn unknown_export(option: u32, name: &str) -> Vec<u8> {
    option_error(
        option,
        REP_ERR_UNKNOWN,
        &format!("no export named {name:?}"),
    )
}

/// Option haggling on `stream`, until the client picks an export, aborts or starts TLS. Options
/// negotiated before TLS are forgotten once it is up (the spec's advice: a client must not trust
/// what was agreed in plain text).
async fn negotiate<S>(
    stream: &mut Stream<S>,
    shared: &Shared,
    no_zeroes: bool,
) -> io::Result<Negotiated>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let in_tls = matches!(stream, Stream::Tls(_));
    let mode = Tls::mode(&shared.tls);
    let wr = stream;
    let mut haggle = Haggle::default();
    loop {
        // Replies wait in TLS's buffer until flushed: send them before waiting for the client.
        wr.flush().await?;
        let mut h = [0u8; 16];
        wr.read_exact(&mut h).await?;
        let h = parse_option_header(&h).map_err(io::Error::other)?;
        if h.len > MAX_OPTION_DATA {
            return Err(io::Error::other(format!(
                "option {} carries {} bytes",
                h.option, h.len
            )));
        }
        let mut data = vec![0u8; h.len as usize];
        wr.read_exact(&mut data).await?;
        match tls_gate(h.option, mode, in_tls) {
            TlsGate::Pass => {}
            TlsGate::Refuse(err, message) => {
                wr.write_all(&option_error(h.option, err, message)).await?;
                continue;
            }
            TlsGate::Close => {
                return Err(io::Error::other(
                    "NBD_OPT_EXPORT_NAME before TLS, which this server requires",
                ))
            }
            TlsGate::StartTls => {
                if !data.is_empty() {
                    wr.write_all(&option_error(h.option, REP_ERR_INVALID, "no data expected"))
                        .await?;
                    continue;
                }
                wr.write_all(&option_reply(h.option, REP_ACK, &[])).await?;
                wr.flush().await?;
                return Ok(Negotiated::StartTls);
            }
        }
        let (out, done) = haggle.answer(shared, h.option, &data, no_zeroes)?;
        match done {
            // The client may be gone already: nothing more to tell it.
            Some(Negotiated::Abort) => {
                let _ = wr.write_all(&out).await;
                return Ok(Negotiated::Abort);
            }
            Some(n) => {
                wr.write_all(&out).await?;
                return Ok(n);
            }
            None => wr.write_all(&out).await?,
        }
    }
}

/// What option haggling has agreed so far.
#[derive(Default)]
struct Haggle {
    structured: bool,
    allocation_context: bool,
}

impl Haggle {
    /// The replies to option `option` with `data`, and the outcome when it ends haggling. An
    /// error closes the connection (an unknown export name for NBD_OPT_EXPORT_NAME, which has
    /// no way to report one).
    fn answer(
        &mut self,
        shared: &Shared,
        option: u32,
        data: &[u8],
        no_zeroes: bool,
    ) -> io::Result<(Vec<u8>, Option<Negotiated>)> {
        let reply = |kind, d: &[u8]| option_reply(option, kind, d);
        let invalid = |why: &str| option_error(option, REP_ERR_INVALID, why);
        let out = match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data);
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
                return Ok((out, Some(self.serve(i))));
            }
            OPT_ABORT => return Ok((reply(REP_ACK, &[]), Some(Negotiated::Abort))),
            OPT_LIST if !data.is_empty() => invalid("NBD_OPT_LIST takes no data"),
            OPT_LIST => {
                let mut out = Vec::new();
                for e in shared.exports.iter() {
                    out.extend(reply(REP_SERVER, &server_entry(&e.name)));
                }
                out.extend(reply(REP_ACK, &[]));
                out
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => invalid("no data expected"),
            OPT_STRUCTURED_REPLY => {
                self.structured = true;
                reply(REP_ACK, &[])
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT if !self.structured => {
                invalid("negotiate structured replies first")
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(shared, option, data),
            OPT_INFO | OPT_GO => {
                let (name, infos) = match parse_info_request(data) {
                    Ok(x) => x,
                    Err(e) => return Ok((invalid(&e.to_string()), None)),
                };
                let Some(i) = shared.find(&name) else {
                    return Ok((unknown_export(option, &name), None));
                };
                let out = export_info(&shared.exports[i], option, &infos);
                let done = (option == OPT_GO).then(|| self.serve(i));
                return Ok((out, done));
            }
            _ => option_error(option, REP_ERR_UNSUP, "option not supported"),
        };
        Ok((out, None))
    }

    fn serve(&self, export: usize) -> Negotiated {
        Negotiated::Serve(Session {
            export,
            structured: self.structured,
            allocation_context: self.allocation_context,
        })
    }

    /// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: only `base:allocation` exists.
    fn meta_context(&mut self, shared: &Shared, option: u32, data: &[u8]) -> Vec<u8> {
        let set = option == OPT_SET_META_CONTEXT;
        let (name, queries) = match parse_meta_request(data) {
            Ok(x) => x,
            Err(e) => return option_error(option, REP_ERR_INVALID, &e.to_string()),
        };
        if shared.find(&name).is_none() {
            return unknown_export(option, &name);
        }
        let matches = |q: &str| q == BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty()));
        let wanted = if queries.is_empty() {
            !set
        } else {
            queries.iter().any(|q| matches(q))
        };
        if set {
            self.allocation_context = wanted;
        }
        let mut out = Vec::new();
        if wanted {
            out.extend(option_reply(
                option,
                REP_META_CONTEXT,
                &meta_context(CONTEXT_ID, BASE_ALLOCATION),
            ));
        }
        out.extend(option_reply(option, REP_ACK, &[]));
        out
    }
}

/// The replies to NBD_OPT_INFO / NBD_OPT_GO for export `e`: its size and flags, and the
/// information `infos` asks for that this server has.
fn export_info(e: &Export, option: u32, infos: &[u16]) -> Vec<u8> {
    let reply = |kind, d: &[u8]| option_reply(option, kind, d);
    let mut out = reply(REP_INFO, &info_export(e.disk.size(), e.disk.flags()));
    if infos.contains(&INFO_BLOCK_SIZE) {
        let d = info_block_size(
            min_block_size(e.disk.size()),
            e.disk.reader().chunk_size(),
            MAX_REQUEST,
        );
        out.extend(reply(REP_INFO, &d));
    }
    if infos.contains(&INFO_NAME) {
        out.extend(reply(REP_INFO, &info_text(INFO_NAME, &e.name)));
    }
    if infos.contains(&INFO_DESCRIPTION) {
        out.extend(reply(
            REP_INFO,
            &info_text(INFO_DESCRIPTION, &e.description),
        ));
    }
    out.extend(reply(REP_ACK, &[]));
    out
}

/// The minimum block size to advertise: 512 (what clients assume without one) when the size is a
/// multiple of it, else 1 — a client rounds the size down to its minimum block size and refuses
/// requests not aligned to it, so 512 would hide or break the tail of such an export.
fn min_block_size(size: u64) -> u32 {
    if size.is_multiple_of(512) {
        512
    } else {
        1
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
/// `hold` (the request's slot and byte permits) travels with the frame and is released only once
/// the frame is written to the socket, so memory held for slow readers stays counted.
fn reply_with<R: Into<Reply> + Send + 'static>(
    tx: &mpsc::Sender<Frame>,
    r: Replier,
    hold: Hold,
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

/// A reply on its way to the socket, with what its request holds.
type Frame = (Reply, Hold);

/// The server-wide byte budget: a pool any request may draw on, and a reserve that a small
/// request may draw on when the pool is taken, one such request per connection at a time (its
/// connection's reserve ticket). The reserve holds one for every connection the server admits,
/// so however the pool is held (clients that pipeline and never read) every connection still
/// gets small requests through, one at a time. The reserve is a quarter of the budget, shared
/// out per admitted connection: requests of up to [`RESERVE_REQUEST`] (1 MiB) with the default
/// 64 connections, less with more (never under 4 KiB), so `max_connections` does not make the
/// budget grow.
#[derive(Clone)]
struct Budget {
    pool: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    /// Largest cost (with [`REQUEST_COST`]) a request may take from the reserve.
    reserve_cost: u32,
}

impl Budget {
    /// (reserve bytes, largest cost one request may take from it) for these limits.
    fn reserve(inflight_bytes: usize, max_connections: usize) -> (usize, u32) {
        let share = (inflight_bytes / 4 / max_connections.max(1))
            .clamp(4096, RESERVE_REQUEST as usize)
            + REQUEST_COST as usize;
        (share.saturating_mul(max_connections.max(1)), share as u32)
    }

    /// Splits the effective `inflight_bytes` ([`ServerOptions::effective`]) into the reserve
    /// and the pool; the pool then holds at least one connection's budget.
    fn new(opts: &ServerOptions) -> Self {
        let (reserve, reserve_cost) = Self::reserve(opts.inflight_bytes, opts.max_connections);
        debug_assert!(opts.inflight_bytes >= reserve + opts.connection_bytes);
        Budget {
            pool: Arc::new(Semaphore::new(opts.inflight_bytes.saturating_sub(reserve))),
            reserve: Arc::new(Semaphore::new(reserve)),
            reserve_cost,
        }
    }
}

/// What one request holds until its reply is written: a request slot of its connection and its
/// cost in bytes from the connection's and the server's budgets (with the connection's reserve
/// ticket when the server's bytes came from the reserve).
struct Hold {
    _slot: OwnedSemaphorePermit,
    _connection: OwnedSemaphorePermit,
    _server: OwnedSemaphorePermit,
    _ticket: Option<OwnedSemaphorePermit>,
    /// The connection (and so its place under the connection limit) lives as long as any
    /// request of it holds budget.
    _conn: Arc<Conn>,
}

/// One connection's limits and the time of its last traffic.
struct Conn {
    slots: Arc<Semaphore>,
    max_requests: usize,
    bytes: Arc<Semaphore>,
    server: Budget,
    /// One permit: held by the connection's request that draws on the server's reserve.
    ticket: Arc<Semaphore>,
    /// Its place under `max_connections` (none for connections not counted there).
    _admission: Option<OwnedSemaphorePermit>,
    start: Instant,
    /// Milliseconds after `start` when a request was last read or a reply last written.
    last: AtomicU64,
}

impl Conn {
    fn new(opts: &ServerOptions, server: Budget, admission: Option<OwnedSemaphorePermit>) -> Self {
        Conn {
            slots: Arc::new(Semaphore::new(opts.connection_requests)),
            max_requests: opts.connection_requests,
            bytes: Arc::new(Semaphore::new(opts.connection_bytes)),
            server,
            ticket: Arc::new(Semaphore::new(1)),
            _admission: admission,
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Waits for a request slot and `cost` bytes of both budgets. The connection's own limits
    /// come first, so a connection at its cap waits there and leaves the server budget to others.
    /// The server's bytes come from the pool or, for a small request, from the reserve with the
    /// connection's ticket, whichever is free first ([`Budget`]).
    async fn hold(self: &Arc<Self>, cost: u32) -> io::Result<Hold> {
        let closed = |_| io::Error::other("request budget closed");
        let _slot = self.slots.clone().acquire_owned().await.map_err(closed)?;
        let _connection = self
            .bytes
            .clone()
            .acquire_many_owned(cost)
            .await
            .map_err(closed)?;
        let pool = self.server.pool.clone().acquire_many_owned(cost);
        let (_server, _ticket) = if cost <= self.server.reserve_cost {
            let reserve = async {
                let ticket = self.ticket.clone().acquire_owned().await?;
                let bytes = self.server.reserve.clone().acquire_many_owned(cost).await?;
                Ok((bytes, Some(ticket)))
            };
            tokio::select! {
                biased;
                p = pool => (p.map_err(closed)?, None),
                r = reserve => r.map_err(closed)?,
            }
        } else {
            (pool.await.map_err(closed)?, None)
        };
        Ok(Hold {
            _slot,
            _connection,
            _server,
            _ticket,
            _conn: self.clone(),
        })
    }

    fn in_flight(&self) -> usize {
        self.max_requests - self.slots.available_permits()
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    /// Time since the last request read or reply written.
    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// What a request costs in the byte budgets: [`REQUEST_COST`] plus the bytes it brings or its
/// reply may carry. Requests that will be refused cost only the fixed part.
fn request_cost(req: &Request) -> u32 {
    let data = match req.kind {
        CMD_READ | CMD_WRITE if req.len <= MAX_REQUEST => req.len,
        CMD_BLOCK_STATUS if req.flags & CMD_FLAG_REQ_ONE != 0 => 8,
        CMD_BLOCK_STATUS => 8 * MAX_EXTENTS as u32,
        _ => 0,
    };
    REQUEST_COST + data
}

fn timed_out(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

/// Reads the next request header; false when the client closed the connection between requests.
/// Fails when `idle` passes with no request in flight and no traffic either way.
async fn read_request<R: AsyncRead + Unpin>(
    rd: &mut R,
    h: &mut [u8; REQUEST_LEN],
    conn: &Conn,
    idle: Option<Duration>,
) -> io::Result<bool> {
    let mut filled = 0;
    while filled < REQUEST_LEN {
        let n = match idle {
            None => rd.read(&mut h[filled..]).await?,
            Some(idle) => {
                // Wake when the connection would become idle; while requests are in flight, look
                // again a little later. `read` is cancel-safe: a timer that wins loses no bytes.
                let wait = idle.saturating_sub(conn.quiet_for()).max(idle / 16);
                tokio::select! {
                    n = rd.read(&mut h[filled..]) => n?,
                    _ = tokio::time::sleep(wait) => {
                        if conn.in_flight() == 0 && conn.quiet_for() >= idle {
                            return Err(timed_out(format!("idle for {idle:?}")));
                        }
                        continue;
                    }
                }
            }
        };
        if n == 0 {
            return match filled {
                0 => Ok(false),
                _ => Err(io::ErrorKind::UnexpectedEof.into()),
            };
        }
        filled += n;
    }
    conn.touch();
    Ok(true)
}

/// Writes all of `buf`, failing when the socket takes no byte for `stall`: the client has stopped
/// reading its replies.
async fn write_progress<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut buf: &[u8],
    stall: Option<Duration>,
) -> io::Result<()> {
    while !buf.is_empty() {
        let n = match stall {
            Some(t) => tokio::time::timeout(t, wr.write(buf))
                .await
                .map_err(|_| timed_out(format!("the client read no reply for {t:?}")))??,
            None => wr.write(buf).await?,
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

async fn transmission<R, W>(
    mut rd: R,
    mut wr: W,
    shared: &Arc<Shared>,
    s: Session,
    admission: Option<OwnedSemaphorePermit>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let opts = &shared.opts;
    let conn = Arc::new(Conn::new(opts, shared.budget.clone(), admission));
    // Never full: every frame holds a request slot, and there are as many slots as places.
    let (tx, mut rx) = mpsc::channel::<Frame>(opts.connection_requests);
    let stall = opts.write_timeout;
    let writer_conn = conn.clone();
    let mut writer = tokio::spawn(async move {
        while let Some((frame, hold)) = rx.recv().await {
            write_progress(&mut wr, &frame.head, stall).await?;
            for seg in &frame.body {
                write_progress(&mut wr, seg.bytes(), stall).await?;
            }
            // A TLS stream may hold the end of the frame in its buffer until flushed (a no-op
            // on a plain socket). The flush is under the write timeout as well.
            if rx.is_empty() {
                match stall {
                    Some(t) => tokio::time::timeout(t, wr.flush())
                        .await
                        .map_err(|_| timed_out(format!("the client read no reply for {t:?}")))??,
                    None => wr.flush().await?,
                }
            }
            writer_conn.touch();
            drop(hold);
        }
        match stall {
            Some(t) => tokio::time::timeout(t, wr.flush())
                .await
                .map_err(|_| timed_out(format!("the client read no reply for {t:?}")))?,
            None => wr.flush().await,
        }
    });
    let disk = shared.exports[s.export].disk.clone();
    let requests = serve_requests(&mut rd, tx, &conn, disk, &s, opts.idle_timeout);
    tokio::pin!(requests);
    let result = tokio::select! {
        r = &mut requests => r,
        // The writer stops early only on an error (the client is gone or does not read): close
        // the connection now, whatever the reader was waiting for.
        w = &mut writer => {
            let e = match w {
                Ok(Err(e)) => e,
                Ok(Ok(())) => io::Error::other("reply writer stopped"),
                Err(e) => io::Error::other(e),
            };
            return Err(e);
        }
    };
    // The request loop is over and has dropped its sender: let in-flight replies finish, then
    // close.
    let written = writer.await.map_err(io::Error::other)?;
    result.and(written)
}

/// The transmission phase's request loop: reads, pays for and dispatches requests until the
/// client disconnects.
async fn serve_requests<R: AsyncRead + Unpin>(
    rd: &mut R,
    tx: mpsc::Sender<Frame>,
    conn: &Arc<Conn>,
    disk: Disk,
    s: &Session,
    idle: Option<Duration>,
) -> io::Result<()> {
    let size = disk.size();
    let send = |frame: Vec<u8>, hold: Hold| {
        let tx = tx.clone();
        async move {
            tx.send((Reply::from(frame), hold))
                .await
                .map_err(|_| io::Error::other("reply writer stopped"))
        }
    };
    loop {
        let mut h = [0u8; REQUEST_LEN];
        if !read_request(rd, &mut h, conn, idle).await? {
            return Ok(());
        }
        let req = parse_request(&h).map_err(io::Error::other)?;
        let r = Replier {
            structured: s.structured,
            cookie: req.cookie,
        };
        match req.kind {
            CMD_DISC => return Ok(()),
            CMD_WRITE if req.len > MAX_REQUEST => {
                // Its payload cannot be skipped without reading it: close.
                return Err(io::Error::other(
                    "write payload larger than the maximum block size",
                ));
            }
            _ => {}
        }
        // Nothing more is read from this client until the request is paid for.
        let hold = conn.hold(request_cost(&req)).await?;
        let in_range = req
            .offset
            .checked_add(req.len as u64)
            .is_some_and(|end| end <= size);
        let answer = if req.kind == CMD_WRITE {
            let mut data = vec![0u8; req.len as usize];
            match idle {
                Some(t) => tokio::time::timeout(t, rd.read_exact(&mut data))
                    .await
                    .map_err(|_| timed_out(format!("write payload stalled for {t:?}")))??,
                None => rd.read_exact(&mut data).await?,
            };
            conn.touch();
            match &disk {
                Disk::ReadOnly(_) => Answer::Now(r.error(EPERM, "the export is read-only")),
                Disk::Writable(_) if !in_range => {
                    Answer::Now(r.error(ENOSPC, "write past the end of the export"))
                }
                Disk::Writable(o) => {
                    let o = o.clone();
                    Answer::later(move || io_reply(r, &req, o.write_at(req.offset, &data)))
                }
            }
        } else {
            answer(&req, r, &disk, s, in_range)
        };
        match answer {
            Answer::Now(frame) => send(frame, hold).await?,
            Answer::Later(job) => reply_with(&tx, r, hold, job),
        }
    }
}

/// The reply to a request: at once, or by a blocking job (reads and writes of the disk).
enum Answer {
    Now(Vec<u8>),
    Later(Box<dyn FnOnce() -> Reply + Send>),
}

impl Answer {
    fn later<R: Into<Reply>>(job: impl FnOnce() -> R + Send + 'static) -> Answer {
        Answer::Later(Box::new(move || job().into()))
    }
}

/// The reply to a request that ends in an I/O result (errors are logged, and answered EIO).
fn io_reply(r: Replier, req: &Request, res: io::Result<()>) -> Vec<u8> {
    match res {
        Ok(()) => r.ok(),
        Err(e) => {
            tracing::error!("request {} at {}: {e}", req.kind, req.offset);
            r.error(EIO, &e.to_string())
        }
    }
}

/// How to answer `req` (any command but NBD_CMD_WRITE, whose payload comes first).
fn answer(req: &Request, r: Replier, disk: &Disk, s: &Session, in_range: bool) -> Answer {
    let req = *req;
    let read_only = || Answer::Now(r.error(EPERM, "the export is read-only"));
    match req.kind {
        CMD_READ if req.len > MAX_REQUEST => {
            Answer::Now(r.error(EINVAL, "read larger than the maximum block size"))
        }
        CMD_READ if !in_range => Answer::Now(r.error(EINVAL, "read past the end of the export")),
        CMD_READ => {
            let disk = disk.clone();
            Answer::later(
                move || match disk.read_segments(req.offset, req.len as usize) {
                    Ok(data) => r.read_ok(req.offset, data),
                    Err(e) => io_reply(r, &req, Err(e)).into(),
                },
            )
        }
        CMD_TRIM | CMD_WRITE_ZEROES => match disk {
            Disk::ReadOnly(_) => read_only(),
            Disk::Writable(_) if !in_range => {
                Answer::Now(r.error(ENOSPC, "request past the end of the export"))
            }
            Disk::Writable(o) => {
                let o = o.clone();
                Answer::later(move || io_reply(r, &req, o.zero(req.offset, req.len as u64)))
            }
        },
        CMD_FLUSH => match disk {
            Disk::ReadOnly(_) => Answer::Now(r.ok()),
            Disk::Writable(o) => {
                let o = o.clone();
                Answer::later(move || io_reply(r, &req, o.flush()))
            }
        },
        CMD_CACHE if !in_range => Answer::Now(r.error(EINVAL, "cache request past the end")),
        CMD_CACHE => {
            let reader = disk.reader().clone();
            let len = (req.len as u64).min(MAX_CACHE);
            Answer::later(move || {
                let res = prefetch(&reader, req.offset, len).map_err(io::Error::from);
                io_reply(r, &req, res)
            })
        }
        CMD_BLOCK_STATUS if !s.allocation_context => {
            Answer::Now(r.error(EINVAL, "no metadata context was negotiated"))
        }
        CMD_BLOCK_STATUS if req.offset >= disk.size() || req.len == 0 => {
            Answer::Now(r.error(EINVAL, "block status past the end"))
        }
        CMD_BLOCK_STATUS => {
            let disk = disk.clone();
            Answer::later(move || block_status(&disk, &req, r))
        }
        _ => Answer::Now(r.error(EINVAL, "unknown command")),
    }
}

/// NBD_CMD_BLOCK_STATUS: the allocation of `[offset, offset + len)` as base:allocation extents.
fn block_status(disk: &Disk, req: &Request, r: Replier) -> Vec<u8> {
    let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS
    };
    let len = (req.len as u64).min(MAX_BLOCK_STATUS);
    match disk.extents(req.offset, len, max) {
        Ok(runs) => {
            let d: Vec<(u32, u32)> = runs
                .into_iter()
                .map(|(len, data)| (len as u32, if data { 0 } else { STATE_HOLE | STATE_ZERO }))
                .collect();
            chunk_block_status(req.cookie, CONTEXT_ID, &d)
        }
        Err(e) => io_reply(r, req, Err(e)),
    }
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
/// the kernel's nbd client after `NBD_SET_SOCK` (simple replies, no metadata contexts). The
/// kernel is trusted to read its replies and may leave a device unused for days: no timeouts.
pub async fn serve_kernel<S>(stream: S, export: Export) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let opts = ServerOptions {
        handshake_timeout: None,
        idle_timeout: None,
        write_timeout: None,
        ..ServerOptions::default()
    }
    .effective();
    let shared = Arc::new(Shared {
        exports: Arc::new(vec![export]),
        by_name: Arc::new(HashMap::new()),
        budget: Budget::new(&opts),
        opts,
        tls: None,
    });
    let (rd, wr) = tokio::io::split(stream);
    let session = Session {
        export: 0,
        structured: false,
        allocation_context: false,
    };
    transmission(rd, wr, &shared, session, None).await
}

impl Export {
    /// Transmission flags this export advertises.
    pub fn flags(&self) -> u16 {
        self.disk.flags()
    }
}

/// A Unix socket at `path` that only this user can connect to (mode 0600). It is bound inside a
/// fresh 0700 directory beside `path`, made 0600 there, and only then renamed into place, so
/// no other user can connect in between (binding at `path` directly leaves it at the umask's
/// mode until a chmod). An existing socket at `path` (a previous run's) is replaced; anything
/// else there is refused.
pub fn bind_private_unix(path: &std::path::Path) -> io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let staging = parent.join(format!(".elastio-sock-{:016x}", rand::random::<u64>()));
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let result = (|| {
        let tmp = staging.join("s");
        let l = tokio::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

#[cfg(test)]
mod tests {
    //! The server's limits, against raw clients on 127.0.0.1 that misbehave on purpose. Each test
    //! failed on the server before the limits existed (commit df046ba), as its comment says.

    use super::*;
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    const DISK: usize = 32 << 20;
    /// Bytes at the start of the test disk that hold data; the rest is a hole.
    const DATA: usize = 1 << 20;

    fn disk_bytes() -> Vec<u8> {
        let mut d = vec![0u8; DISK];
        for (i, b) in d[..DATA].iter_mut().enumerate() {
            *b = (i % 251) as u8 | 1;
        }
        d
    }

    /// A server on 127.0.0.1:0 exporting `disk` as "disk", on its own runtime; stops when dropped.
    struct TestServer {
        addr: String,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl TestServer {
        fn start(disk: &[u8], opts: ServerOptions) -> Self {
            Self::start_tls(disk, opts, None)
        }

        fn start_tls(disk: &[u8], opts: ServerOptions, tls: Option<Tls>) -> Self {
            let vault = scalez::testing::memory_vault(64 << 10);
            let map = scalez::testing::store_disk(&vault, disk);
            let export = Export {
                name: "disk".into(),
                aliases: Vec::new(),
                description: String::new(),
                disk: Disk::ReadOnly(Arc::new(DiskReader::new(vault, map, 8 << 20))),
            };
            let (addr_tx, addr_rx) = std::sync::mpsc::channel();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                let listen = Listen::Tcp("127.0.0.1:0".parse().unwrap());
                let ready = move |a: &str| addr_tx.send(a.to_string()).unwrap();
                let shutdown = async {
                    let _ = stopped.await;
                };
                let mut server = Server::new(vec![export], opts);
                if let Some(tls) = tls {
                    server = server.with_tls(tls);
                }
                rt.block_on(server.run(listen, ready, shutdown)).unwrap();
                rt.shutdown_background();
            });
            let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            TestServer {
                addr,
                stop: Some(stop),
                thread: Some(thread),
            }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            let _ = self.stop.take().unwrap().send(());
            let _ = self.thread.take().unwrap().join();
        }
    }

    /// A client speaking fixed newstyle, NBD_OPT_GO and simple replies.
    struct Client(TcpStream);

    impl Client {
        fn connect(addr: &str) -> Self {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            Client(s)
        }

        fn go(addr: &str) -> Self {
            let mut c = Self::connect(addr);
            let mut greeting = [0u8; 18];
            c.0.read_exact(&mut greeting).unwrap();
            c.0.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
                .unwrap();
            let mut data = 4u32.to_be_bytes().to_vec();
            data.extend_from_slice(b"disk");
            data.extend_from_slice(&0u16.to_be_bytes());
            let mut m = IHAVEOPT.to_be_bytes().to_vec();
            m.extend_from_slice(&OPT_GO.to_be_bytes());
            m.extend_from_slice(&(data.len() as u32).to_be_bytes());
            m.extend_from_slice(&data);
            c.0.write_all(&m).unwrap();
            loop {
                let mut h = [0u8; 20];
                c.0.read_exact(&mut h).unwrap();
                let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
                let mut d = vec![0u8; len as usize];
                c.0.read_exact(&mut d).unwrap();
                match kind {
                    REP_ACK => return c,
                    REP_INFO => {}
                    other => panic!("option reply {other:#x}"),
                }
            }
        }

        fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32) {
            let r = Request {
                flags: 0,
                kind,
                cookie,
                offset,
                len,
            };
            self.0.write_all(&encode_request(&r)).unwrap();
        }

        fn read(&mut self, cookie: u64, offset: u64, len: u32) -> io::Result<Vec<u8>> {
            self.request(CMD_READ, cookie, offset, len);
            let mut h = [0u8; 16];
            self.0.read_exact(&mut h)?;
            assert_eq!(h, simple_reply(0, cookie), "reply header");
            let mut d = vec![0u8; len as usize];
            self.0.read_exact(&mut d)?;
            Ok(d)
        }

        /// Whether the server closed the connection (reads until end of file, an error or 10 s).
        fn closed_by_server(&mut self) -> bool {
            let mut b = vec![0u8; 1 << 20];
            loop {
                match self.0.read(&mut b) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                    Err(_) => return false,
                }
            }
        }
    }

    /// `hogs` clients pipeline `len`-byte reads and never read the replies; another client's
    /// 4 KiB reads must still be answered quickly. Returns their p99.
    fn p99_beside_clients_that_never_read(hogs: usize, len: u32) -> Duration {
        let disk = disk_bytes();
        let server = TestServer::start(&disk, ServerOptions::default());
        let hogs: Vec<Client> = (0..hogs)
            .map(|_| {
                let mut c = Client::go(&server.addr);
                for i in 0..(80 << 20) / len as u64 {
                    c.request(CMD_READ, i, 0, len);
                }
                c
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let mut c = Client::go(&server.addr);
        let mut times = Vec::new();
        for i in 0..200u64 {
            let off = (i * 4096 * 37) % (DATA as u64 - 4096);
            let t = Instant::now();
            let got = c
                .read(i, off, 4096)
                .unwrap_or_else(|e| panic!("read {i} of the other client: {e}"));
            times.push(t.elapsed());
            assert_eq!(got, &disk[off as usize..off as usize + 4096]);
        }
        times.sort();
        drop(hogs);
        times[times.len() * 99 / 100]
    }

    /// Four clients pipeline 32 MiB reads and never read the replies; a fifth client's 4 KiB
    /// reads are still answered quickly. Before, each connection could hold 64 MiB of the 256 MiB
    /// server budget: the four took all of it and the fifth client's first read was never
    /// answered (this test then failed on its 10 s read timeout).
    #[test]
    fn a_fifth_client_is_served_while_four_never_read() {
        let p99 = p99_beside_clients_that_never_read(4, MAX_REQUEST);
        println!("fifth client: p99 of 4 KiB reads {p99:?} beside four clients that never read");
        assert!(p99 <= Duration::from_millis(100), "p99 {p99:?}");
    }

    /// Every other place under the connection limit (63) taken by clients that pipeline 1 MiB
    /// reads and never read: together they hold the whole pool, and each holds a request from
    /// the reserve behind its unwritten replies. The last client is still served, through its
    /// own share of the reserve. With a fixed per-connection budget alone, its first read
    /// waited until the write timeout (60 s) dropped a stalled client.
    #[test]
    fn a_client_is_served_while_all_the_others_never_read() {
        let p99 = p99_beside_clients_that_never_read(63, 1 << 20);
        println!("p99 of 4 KiB reads {p99:?} beside 63 clients that never read");
        assert!(p99 <= Duration::from_millis(100), "p99 {p99:?}");
    }

    /// However the limits are set, the pool left beside the reserve holds one connection's
    /// budget, so a largest request can always be paid for. (The fuzz target found a split
    /// where it did not: a 32 MiB read waited forever.)
    #[test]
    fn every_budget_split_leaves_the_pool_one_largest_request() {
        for inflight in [0, 1 << 20, 64 << 20, 256 << 20, 4 << 30] {
            for max_connections in [1, 2, 64, 1000, 10_000] {
                for connection_bytes in [0, 48 << 20, 1 << 30] {
                    let opts = ServerOptions {
                        inflight_bytes: inflight,
                        max_connections,
                        connection_bytes,
                        ..ServerOptions::default()
                    }
                    .effective();
                    let b = Budget::new(&opts);
                    let (pool, reserve) =
                        (b.pool.available_permits(), b.reserve.available_permits());
                    let case = format!("{inflight} {max_connections} {connection_bytes}");
                    assert!(pool >= opts.connection_bytes, "{case}");
                    assert_eq!(pool + reserve, opts.inflight_bytes, "{case}");
                    assert!(
                        b.reserve_cost as usize >= 2 * REQUEST_COST as usize,
                        "{case}"
                    );
                    // The limits only grow where they must (here: by at most 16 KiB per
                    // connection beside twice one connection's budget).
                    assert!(
                        opts.inflight_bytes
                            <= inflight.max(2 * (opts.connection_bytes + max_connections * 8192)),
                        "{case}"
                    );
                }
            }
        }
    }

    /// The inputs the fuzz target `nbd_server` found (fixtures/hostile/fuzz-nbd-*.bin), each
    /// one client's bytes, served as the target serves them: every session must end once the
    /// input does.
    #[test]
    fn fuzz_finds_are_served_to_the_end() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hostile");
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("fuzz-nbd-")
            })
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty());
        let vault = scalez::testing::memory_vault(64 << 10);
        let mut bytes = vec![0u8; (4 << 20) + 300];
        bytes[..1 << 20].fill(7);
        let map = scalez::testing::store_disk(&vault, &bytes);
        let disk = Arc::new(DiskReader::new(vault, map, 1 << 20));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let server = fuzz_server(&disk).unwrap();
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), server.serve_client_bytes(&data))
                    .await
                    .unwrap_or_else(|_| panic!("{}: the session did not end", input.display()))
            });
        }
    }

    /// Clients that connect and send nothing are dropped after the handshake timeout, so they
    /// cannot hold the connection limit. Before, there was no timeout: with the limit full of
    /// silent clients no one else could connect, ever (this test failed on `closed_by_server`).
    #[test]
    fn silent_handshakes_are_dropped_and_free_the_connection_limit() {
        let opts = ServerOptions {
            max_connections: 4,
            handshake_timeout: Some(Duration::from_millis(300)),
            ..ServerOptions::default()
        };
        let server = TestServer::start(&disk_bytes(), opts);
        let mut silent: Vec<Client> = (0..4).map(|_| Client::connect(&server.addr)).collect();
        // The limit is full: a fifth connection is closed at once, without a greeting.
        std::thread::sleep(Duration::from_millis(100));
        let mut over = Client::connect(&server.addr);
        let mut b = [0u8; 18];
        assert!(
            matches!(over.0.read(&mut b), Ok(0) | Err(_)),
            "over the limit"
        );
        let t = Instant::now();
        for c in &mut silent {
            assert!(c.closed_by_server(), "a silent client is disconnected");
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let mut c = Client::go(&server.addr);
        assert_eq!(c.read(1, 0, 4096).unwrap(), &disk_bytes()[..4096]);
    }

    /// A connection with nothing in flight that sends nothing is closed after the idle timeout;
    /// one that keeps sending requests is not. Before, idle connections stayed forever.
    #[test]
    fn idle_connections_are_closed_busy_ones_are_not() {
        let opts = ServerOptions {
            idle_timeout: Some(Duration::from_millis(400)),
            ..ServerOptions::default()
        };
        let disk = disk_bytes();
        let server = TestServer::start(&disk, opts);
        let mut idle = Client::go(&server.addr);
        idle.read(1, 0, 4096).unwrap();
        let mut busy = Client::go(&server.addr);
        for i in 0..12 {
            assert_eq!(busy.read(i, 4096, 4096).unwrap(), &disk[4096..8192]);
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(idle.closed_by_server());
        assert_eq!(busy.read(99, 0, 512).unwrap(), &disk[..512]);
    }

    /// A client that pipelines reads and never reads the replies is dropped once its replies make
    /// no progress for the write timeout, which returns its budget. Before, it stayed forever.
    #[test]
    fn clients_that_never_read_are_dropped_after_the_write_timeout() {
        let opts = ServerOptions {
            write_timeout: Some(Duration::from_millis(300)),
            ..ServerOptions::default()
        };
        let server = TestServer::start(&disk_bytes(), opts);
        let mut hog = Client::go(&server.addr);
        for i in 0..10 {
            hog.request(CMD_READ, i, 0, MAX_REQUEST);
        }
        std::thread::sleep(Duration::from_millis(1500));
        assert!(hog.closed_by_server(), "the hog was disconnected");
    }

    /// CACHE is paid for like a read: a client that sends CACHE requests without reading the
    /// replies is stopped by backpressure after a bounded number. Before, only READ and WRITE
    /// took permits: the server read every CACHE and spawned a task for it, so all 1 M were read
    /// (this test failed; FLUSH on a read-only export did block, on the reply channel).
    #[test]
    fn requests_without_payload_are_budgeted_too() {
        const LIMIT: u64 = 1_000_000;
        let server = TestServer::start(&disk_bytes(), ServerOptions::default());
        let mut c = Client::go(&server.addr);
        c.0.set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        // The server stops reading once the connection's request slots are taken and the socket
        // buffers fill, so the writes stall.
        let batch: Vec<u8> = (0..1000u64)
            .flat_map(|i| {
                let r = Request {
                    flags: 0,
                    kind: CMD_CACHE,
                    cookie: i,
                    offset: (i % 16) << 16,
                    len: 4096,
                };
                encode_request(&r)
            })
            .collect();
        let mut sent = 0u64;
        while sent < LIMIT {
            if c.0.write_all(&batch).is_err() {
                break;
            }
            sent += 1000;
        }
        println!("the server stopped reading after about {sent} requests");
        assert!(sent < LIMIT, "the server kept reading: {sent} requests");
    }

    #[test]
    fn unaligned_sizes_advertise_a_minimum_block_size_of_one() {
        assert_eq!(min_block_size(1 << 20), 512);
        assert_eq!(min_block_size((1 << 20) + 1), 1);
        assert_eq!(min_block_size(1000), 1);
    }

    /// A CA and a certificate it signed for IP:127.0.0.1, made with the `openssl` CLI in `dir`
    /// (ca-cert.pem, server-cert.pem, server-key.pem).
    fn make_certs(dir: &Path) {
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend_from_slice(&ec);
        ca.extend_from_slice(&[
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        run(&ca);
        let mut req = vec!["req"];
        req.extend_from_slice(&ec);
        req.extend_from_slice(&["-keyout", "server-key.pem", "-out", "server.csr"]);
        req.extend_from_slice(&["-subj", "/CN=localhost"]);
        run(&req);
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-set_serial",
            "2",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server-cert.pem",
        ]);
    }

    impl Client {
        /// Greeting and client flags; the connection is then in option haggling.
        fn haggle(addr: &str) -> Self {
            let mut c = Self::connect(addr);
            let mut greeting = [0u8; 18];
            c.0.read_exact(&mut greeting).unwrap();
            c.0.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
                .unwrap();
            c
        }
    }

    fn send_option<S: Write>(s: &mut S, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).unwrap();
        s.flush().unwrap();
    }

    /// (option, reply type, data) of the next option reply.
    fn option_reply<S: Read>(s: &mut S) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(h[..8], OPT_REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        (option, kind, d)
    }

    fn go_data(name: &str) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        data
    }

    /// With `require`: every option before NBD_OPT_STARTTLS is answered NBD_REP_ERR_TLS_REQD and
    /// NBD_OPT_EXPORT_NAME closes; STARTTLS is acknowledged, the TLS handshake follows on the
    /// same socket (a rustls client verifying the server against the CA), a second STARTTLS
    /// inside TLS is invalid, and GO and READ then work inside TLS. A client that sends STARTTLS
    /// and never starts the TLS handshake is dropped at the handshake timeout.
    #[test]
    fn starttls_is_required_and_haggling_continues_inside_tls() {
        let dir = tempfile::tempdir().unwrap();
        make_certs(dir.path());
        let tls = Tls::load(dir.path(), true, false).unwrap();
        let opts = ServerOptions {
            handshake_timeout: Some(Duration::from_millis(500)),
            ..ServerOptions::default()
        };
        let disk = disk_bytes();
        let server = TestServer::start_tls(&disk, opts, Some(tls));

        let mut c = Client::haggle(&server.addr);
        for (opt, data) in [
            (OPT_LIST, Vec::new()),
            (OPT_STRUCTURED_REPLY, Vec::new()),
            (OPT_INFO, go_data("disk")),
            (OPT_GO, go_data("disk")),
        ] {
            send_option(&mut c.0, opt, &data);
            let (o, kind, msg) = option_reply(&mut c.0);
            assert_eq!((o, kind), (opt, REP_ERR_TLS_REQD), "option {opt}");
            assert!(String::from_utf8_lossy(&msg).contains("requires TLS"));
        }
        let mut plain = Client::haggle(&server.addr);
        send_option(&mut plain.0, OPT_EXPORT_NAME, b"disk");
        assert!(plain.closed_by_server(), "EXPORT_NAME before TLS closes");

        send_option(&mut c.0, OPT_STARTTLS, &[]);
        assert_eq!(option_reply(&mut c.0), (OPT_STARTTLS, REP_ACK, Vec::new()));
        let mut roots = rustls::RootCertStore::empty();
        let ca = rustls::pki_types::CertificateDer::pem_file_iter(dir.path().join("ca-cert.pem"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        roots.add(ca).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut t = rustls::StreamOwned::new(conn, c.0);
        send_option(&mut t, OPT_STARTTLS, &[]);
        let (o, kind, _) = option_reply(&mut t);
        assert_eq!(
            (o, kind),
            (OPT_STARTTLS, REP_ERR_INVALID),
            "a second STARTTLS"
        );
        send_option(&mut t, OPT_GO, &go_data("disk"));
        loop {
            match option_reply(&mut t) {
                (_, REP_ACK, _) => break,
                (_, REP_INFO, _) => {}
                other => panic!("{other:?}"),
            }
        }
        for (cookie, off) in [(1u64, 0u64), (2, 4096 * 37)] {
            let r = Request {
                flags: 0,
                kind: CMD_READ,
                cookie,
                offset: off,
                len: 4096,
            };
            t.write_all(&encode_request(&r)).unwrap();
            t.flush().unwrap();
            let mut h = [0u8; 16];
            t.read_exact(&mut h).unwrap();
            assert_eq!(h, simple_reply(0, cookie));
            let mut d = vec![0u8; 4096];
            t.read_exact(&mut d).unwrap();
            assert_eq!(
                d,
                &disk[off as usize..off as usize + 4096],
                "read inside TLS"
            );
        }

        // STARTTLS acknowledged, then silence instead of a ClientHello.
        let mut stalled = Client::haggle(&server.addr);
        send_option(&mut stalled.0, OPT_STARTTLS, &[]);
        assert_eq!(option_reply(&mut stalled.0).1, REP_ACK);
        let start = Instant::now();
        assert!(
            stalled.closed_by_server(),
            "a stalled TLS handshake is dropped"
        );
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }
}
