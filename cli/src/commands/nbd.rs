use crate::cli::parse_size;
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use mount::nbd::{attach, server, Disk, Export, Listen, Server, ServerOptions};
use mount::overlay::{save_as_rp, Overlay};
use mount::DiskReader;
use scalez::{RecoveryPoint, RpKind, Vault};
use serde_json::json;

use crate::cli::OutputFormat;
use crate::context::resolve_rp;
use crate::context::Ctx;
use crate::output::bytes;

pub fn run(ctx: &Ctx, cmd: NbdCommand) -> Result<()> {
    match cmd {
        NbdCommand::Serve(a) => serve(ctx, a),
        NbdCommand::Attach(a) => attach_device(ctx, a),
    }
}

type Overlays = Vec<(RecoveryPoint, Arc<Overlay>)>;

/// Where `nbd serve` listens without --listen (and without --writable).
const DEFAULT_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    10809,
));

/// One export per RP spec, with an overlay each when writable.
fn build_exports(
    vault: &Arc<Vault>,
    specs: &[String],
    a: &ExportArgs,
) -> Result<(Vec<Export>, Overlays)> {
    let mut exports = Vec::new();
    let mut overlays = Vec::new();
    let overlay_dir = a.overlay_dir.clone().unwrap_or_else(std::env::temp_dir);
    for spec in specs {
        let rp = resolve_rp(vault, spec, None, Some(RpKind::Disk))?;
        let map = rp.disk()?.clone();
        let reader = Arc::new(DiskReader::new(vault.clone(), map, a.cache_size as usize));
        // 2 MiB ahead of sequential readers (nbdcopy, qemu-img convert, a guest's dd).
        reader.enable_readahead(16, 2);
        let disk = if a.writable {
            let overlay = Arc::new(Overlay::create(reader, &overlay_dir).with_context(|| {
                format!("cannot create an overlay file in {}", overlay_dir.display())
            })?);
            overlays.push((rp.clone(), overlay.clone()));
            Disk::Writable(overlay)
        } else {
            Disk::ReadOnly(reader)
        };
        exports.push(Export {
            name: rp.id.to_string(),
            aliases: vec![rp.asset.name.clone()],
            description: format!(
                "{} of {} on {}, {}",
                rp.id, rp.asset.name, rp.asset.host, rp.created
            ),
            disk,
        });
    }
    Ok((exports, overlays))
}

/// After serving: save overlays as RPs (--save-as-rp) or say they were discarded.
fn finish_overlays(
    ctx: &Ctx,
    vault: &Arc<Vault>,
    a: &ExportArgs,
    overlays: &Overlays,
) -> Result<()> {
    if !a.save_as_rp {
        if overlays.iter().any(|(_, o)| o.dirty_slots() > 0) {
            eprintln!("writes to the overlay were discarded (use --save-as-rp to keep them)");
        }
        return Ok(());
    }
    let mut saved = Vec::new();
    for (base, overlay) in overlays {
        if overlay.dirty_slots() == 0 {
            eprintln!(
                "{}: nothing was written, no recovery point created",
                base.id
            );
            continue;
        }
        let rp = save_as_rp(vault, base, overlay)
            .with_context(|| format!("saving the overlay of {} as a recovery point", base.id))?;
        saved.push(rp);
    }
    // The client that started us may have closed our stdout by now: never panic on that.
    let mut out = std::io::stdout();
    match ctx.global.output_format {
        OutputFormat::Json => {
            let _ = writeln!(out, "{}", json!({ "saved": saved }));
        }
        OutputFormat::Human => {
            for rp in &saved {
                let parent = rp
                    .parent
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                let new = bytes(rp.new_bytes_stored);
                let _ = writeln!(out, "saved {} (parent {parent}, {new} new)", rp.id);
            }
        }
    }
    Ok(())
}

/// The server's TLS from --tls and --tls-certificates (loaded before the vault is opened).
fn tls(a: &NbdServeArgs) -> Result<Option<mount::nbd::Tls>> {
    let mode = a.tls.unwrap_or(match a.tls_certificates {
        Some(_) => TlsArg::Require,
        None => TlsArg::Off,
    });
    match (mode, &a.tls_certificates) {
        // Verifying clients means nothing if one may skip TLS altogether.
        (TlsArg::Off | TlsArg::On, _) if a.tls_verify_peer => anyhow::bail!(
            "--tls-verify-peer needs --tls require (the default with --tls-certificates): with \
             --tls {}, clients without a certificate would be served in plain text",
            if mode == TlsArg::Off { "off" } else { "on" }
        ),
        (TlsArg::Off, _) => Ok(None),
        (_, None) => anyhow::bail!("--tls on|require needs --tls-certificates DIR"),
        (mode, Some(dir)) => mount::nbd::Tls::load(dir, mode == TlsArg::Require, a.tls_verify_peer)
            .map(Some)
            .with_context(|| format!("loading the TLS certificate and key from {}", dir.display())),
    }
}

fn serve(ctx: &Ctx, a: NbdServeArgs) -> Result<()> {
    let tls = tls(&a)?;
    let vault = ctx.open_vault()?;
    let (exports, overlays) = build_exports(&vault, &a.rps, &a.export)?;
    let names: Vec<(String, String, u64)> = exports
        .iter()
        .map(|e| (e.name.clone(), e.aliases[0].clone(), e.disk.size()))
        .collect();
    let scheme = if tls.is_some() { "nbds" } else { "nbd" };
    let mut server = Server::new(
        exports,
        ServerOptions {
            max_connections: a.max_connections,
            handshake_timeout: Some(a.handshake_timeout),
            idle_timeout: Some(a.idle_timeout),
            write_timeout: Some(a.write_timeout),
            ..ServerOptions::default()
        },
    );
    let authenticated = tls
        .as_ref()
        .is_some_and(mount::nbd::Tls::authenticates_clients);
    if let Some(tls) = tls {
        server = server.with_tls(tls);
    }
    // A writable export hands out write access to a disk: by default only to this user,
    // through a 0600 Unix socket in a private directory, unless an address is asked for.
    let unix = match (&a.unix, a.listen, a.export.writable) {
        (Some(p), _, _) => Some(p.clone()),
        (None, None, true) => Some(
            crate::context::private_runtime_dir()?.join(format!("nbd-{}.sock", std::process::id())),
        ),
        _ => None,
    };
    let tcp = a.listen.unwrap_or(DEFAULT_LISTEN);
    let listen = match &unix {
        Some(p) => Listen::Unix(p.clone()),
        None => Listen::Tcp(tcp),
    };
    // The server logs this too; say it where the user looks for the address as well.
    let exposed = match (&unix, tcp.ip().is_loopback()) {
        (None, false) if !authenticated => Some(server::exposed_warning(&tcp)),
        _ => None,
    };
    let format = ctx.global.output_format;
    let ready = move |addr: &str| {
        let uri = |name: &str| match &unix {
            Some(p) => format!("{scheme}+unix:///{name}?socket={}", p.display()),
            None => format!("{scheme}://{addr}/{name}"),
        };
        let mut out = std::io::stdout();
        match format {
            OutputFormat::Json => {
                let list: Vec<_> = names
                    .iter()
                    .map(|(n, asset, size)| json!({"name": n, "asset": asset, "size": size, "uri": uri(n)}))
                    .collect();
                let mut ready = json!({"listen": addr, "exports": list});
                if let Some(w) = &exposed {
                    ready["warning"] = json!(w);
                }
                let _ = writeln!(out, "{ready}");
            }
            OutputFormat::Human => {
                for (n, asset, size) in &names {
                    let _ = writeln!(out, "export {n} ({asset}, {}): {}", bytes(*size), uri(n));
                }
                if let Some(w) = &exposed {
                    let _ = writeln!(out, "warning: {w}");
                }
                let _ = writeln!(out, "serving on {addr}; press Ctrl-C to stop");
            }
        }
        let _ = out.flush();
    };
    let cancel = crate::cancel_token();
    let shutdown = async move {
        while !cancel.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()?;
    rt.block_on(server.run(listen, ready, shutdown))
        .context("NBD server failed")?;
    rt.shutdown_timeout(Duration::from_secs(2));
    finish_overlays(ctx, &vault, &a.export, &overlays)
}

fn attach_device(ctx: &Ctx, a: NbdAttachArgs) -> Result<()> {
    if !a.device.exists() {
        // Fail before asking for a password when the kernel cannot do this at all.
        anyhow::bail!("{}", attach::no_module_help(&a.device));
    }
    let vault = ctx.open_vault()?;
    let (mut exports, overlays) = build_exports(&vault, std::slice::from_ref(&a.rp), &a.export)?;
    let export = exports.remove(0);
    eprintln!(
        "attaching {} to {}; press Ctrl-C to detach",
        export.name,
        a.device.display()
    );
    let cancel = crate::cancel_token();
    attach::attach(&a.device, export, || cancel.is_cancelled())
        .with_context(|| format!("attaching to {}", a.device.display()))?;
    finish_overlays(ctx, &vault, &a.export, &overlays)
}

#[derive(Subcommand, Debug)]
pub enum NbdCommand {
    /// Export disk recovery points over NBD until Ctrl-C (read-only unless --writable)
    #[command(
        after_help = "Each RP is exported under its id and, as an alias, its asset name. \
Connect with e.g. `nbdinfo nbd://127.0.0.1:10809/<rp>`, `nbdcopy`, `qemu-img`, or attach it \
without the kernel's nbd module: `nbdfuse DIR/disk nbd://127.0.0.1:10809/<rp> &` then \
`mount -o loop,ro DIR/disk /mnt`.\n\nTLS, as qemu-nbd and nbdkit do it: with \
`--tls-certificates DIR`, DIR holding ca-cert.pem, server-cert.pem and server-key.pem, e.g. \
`elastio nbd serve --tls-certificates /etc/pki/elastio-nbd <rp>`, clients must start TLS \
(NBD_OPT_STARTTLS) before anything else (`--tls on` lets them choose). Connect with \
`nbdcopy 'nbds://127.0.0.1:10809/<rp>?tls-certificates=CLIENTDIR' disk.img`, CLIENTDIR holding \
the ca-cert.pem that signed the server's certificate (whose names must include the host in the \
URI). Without --tls-verify-peer the server asks clients for no certificate: TLS encrypts and \
authenticates the server only, and any local user can still connect. With `--tls-verify-peer`, \
clients must present a certificate signed by DIR/ca-cert.pem (libnbd sends CLIENTDIR/client-cert.pem \
and client-key.pem): only holders of such a key read the disk."
    )]
    Serve(NbdServeArgs),
    /// Attach a disk recovery point to a kernel nbd device (/dev/nbdX) until Ctrl-C
    #[command(
        after_help = "Needs the kernel's nbd module. Without it, use `elastio nbd serve` \
and nbdfuse + a loop mount (see `elastio nbd serve --help`)."
    )]
    Attach(NbdAttachArgs),
}

/// How exports are built: shared by `nbd serve` and `nbd attach`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Chunk cache per export
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub cache_size: u64,
    /// Accept writes, TRIM and WRITE_ZEROES into a copy-on-write overlay (a local sparse file,
    /// never the vault); discarded on exit unless --save-as-rp
    #[arg(long)]
    pub writable: bool,
    /// On exit, turn each export's overlay into a new recovery point of the same asset
    #[arg(long, requires = "writable")]
    pub save_as_rp: bool,
    /// Directory for overlay files (default: the system temporary directory)
    #[arg(long, value_name = "DIR", requires = "writable")]
    pub overlay_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct NbdServeArgs {
    /// Recovery points to export (ids, or `latest` for the newest disk RP)
    #[arg(required = true)]
    pub rps: Vec<String>,
    /// TCP address to listen on [default: 127.0.0.1:10809; with --writable, a private Unix
    /// socket unless this is given]
    #[arg(long, conflicts_with = "unix")]
    pub listen: Option<std::net::SocketAddr>,
    /// Listen on a Unix socket instead of TCP (created mode 0600: only this user connects)
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// Connections served at once; more are closed right away
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
    /// Time a client has to finish the NBD handshake before it is disconnected
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: std::time::Duration,
    /// A client with no request in flight that sends nothing for this long is disconnected
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub idle_timeout: std::time::Duration,
    /// A client that reads none of its replies for this long is disconnected
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub write_timeout: std::time::Duration,
    /// Directory with server-cert.pem and server-key.pem (and ca-cert.pem for clients): the
    /// qemu-nbd/nbdkit layout. Enables TLS (NBD_OPT_STARTTLS)
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// off: plain text only; on: clients may start TLS; require: clients must start TLS before
    /// anything else [default: require with --tls-certificates, else off]
    #[arg(long, value_enum)]
    pub tls: Option<TlsArg>,
    /// Clients must present a TLS certificate signed by DIR/ca-cert.pem (authenticates them)
    #[arg(long, requires = "tls_certificates")]
    pub tls_verify_peer: bool,
    #[command(flatten)]
    pub export: ExportArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsArg {
    Off,
    On,
    Require,
}

#[derive(Args, Debug)]
pub struct NbdAttachArgs {
    /// Recovery point id, or `latest`
    pub rp: String,
    /// The nbd device, e.g. /dev/nbd0
    pub device: PathBuf,
    #[command(flatten)]
    pub export: ExportArgs,
}
