//! Command-line definition (clap derive). One subcommand module per noun in `commands/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  error (bad input, I/O, missing object, ...)
  2  usage error (unknown flag, missing argument)
  3  data in the vault is damaged (authentication or format failure); the message names the object
  4  wrong password
  75  raced a prune: the backup's recovery point was not committed (others of the same command may
      have been), or a prune that raced another deleted nothing; run the command again
  130  interrupted (SIGINT/SIGTERM): no recovery point was created, no partial restore is left";

#[derive(Parser, Debug)]
#[command(
    name = "elastio",
    version,
    about = "Deduplicated, compressed, encrypted backups of disks, with instant restore",
    long_about = "elastio backs up disks (block devices, image files) into a vault: a local \
directory or an S3 bucket (AWS or any S3-compatible store), deduplicated, zstd-compressed and AES-256-GCM encrypted. \
Each backup is a recovery point (RP) that restores byte-exact on its own.\n\n\
Vault: --vault, else $ELASTIO_VAULT, else ~/.local/share/elastio/vault. S3 vaults \
(s3://bucket/prefix) take region and credentials from the standard AWS chain (environment, \
profile, SSO, IMDS); --endpoint-url selects an S3-compatible store.\n\
Password: --password-file, else $ELASTIO_PASSWORD, else a prompt on a terminal.",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Vault location: a directory, or s3://bucket[/prefix]
    #[arg(long, global = true, env = "ELASTIO_VAULT", value_name = "PATH|URL")]
    pub vault: Option<PathBuf>,
    /// S3-compatible endpoint for s3:// vaults (path-style addressing), e.g. http://127.0.0.1:7480
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL", value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// AWS region for s3:// vaults (default: from the AWS configuration, else us-east-1)
    #[arg(long, global = true, env = "AWS_REGION", value_name = "REGION")]
    pub region: Option<String>,
    /// Encrypt objects written to an s3:// vault with this KMS key (SSE-KMS), on top of elastio's
    /// own encryption
    #[arg(long, global = true, env = "ELASTIO_KMS_KEY_ID", value_name = "KEY")]
    pub kms_key_id: Option<String>,
    /// Read the vault password from the first line of this file
    #[arg(long, global = true, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Output format: human-readable tables or JSON for scripts
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Human)]
    pub output_format: OutputFormat,
    /// No progress bar
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Read the password from the first line of standard input (used by `mount` to hand the
    /// password to its background process without putting it in the environment)
    #[arg(long, global = true, hide = true)]
    pub password_stdin: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create or inspect a vault
    #[command(subcommand)]
    Vault(VaultCommand),
    /// Back up and restore block devices and disk images
    #[command(subcommand)]
    Block(BlockCommand),
    /// Back up files and directory trees; restore all of them or some paths
    #[command(subcommand)]
    File(FileCommand),
    /// Back up a stream (stdin or a file) and restore it byte-exact
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Back up a Kafka topic incrementally (one RP per run) and produce it back
    #[command(subcommand)]
    Kafka(KafkaCommand),
    /// Back up EBS volumes and snapshots through the EBS direct APIs; restore to new snapshots
    #[command(subcommand)]
    Ebs(EbsCommand),
    /// Back up EC2 instances (all attached volumes, crash-consistent) and recreate them
    #[command(subcommand)]
    Ec2(Ec2Command),
    /// List, show and tag recovery points
    #[command(subcommand)]
    Rp(RpCommand),
    /// Serve recovery points as NBD block devices
    #[command(subcommand)]
    Nbd(NbdCommand),
    /// Mount a recovery point read-only through FUSE: a disk (the disk, its partitions and their
    /// files), a file RP (its tree) or a stream (one file)
    #[command(
        after_help = "The mountpoint shows `disk.img` (the whole disk), `partN.img` for each \
MBR/GPT partition, and `partN/` (`fs/` for a file system on the bare disk) with the files inside \
each ext2/3/4 file system, read in user space: no root, loop device or kernel module needed. \
Copy files out with `cp -a`. With --kernel (root), each partition is instead loop-mounted \
read-only by the kernel's own driver at `partN/`, for file systems the built-in reader does not \
know (XFS, NTFS, ...). Risk: the kernel then parses the image's bytes in ring 0, and a disk from a \
compromised host can be crafted to exploit a file system driver; only use --kernel on images you \
trust. Its mounts use the type blkid detects (ext2/3/4, xfs, btrfs, vfat, ntfs; never a probe of \
every driver) and nosuid,nodev,noexec. A file RP shows the paths it backed up under their absolute paths (`/etc` \
as `etc/`), with modes, owners, times, symlinks, hard links and extended attributes; a stream RP \
shows one file named after the stream.\n\nBy default the command returns once the mount is ready and a \
background process serves it until `elastio umount <mountpoint>`; its log (read errors name the \
damaged object) is printed. Nothing is ever written to the vault."
    )]
    Mount(MountArgs),
    /// Verify the vault: index, packs, catalog, maps (and with --read-data, every chunk)
    #[command(
        after_help = "Without --read-data, check reads every index object, each pack's \
trailer (one ranged read per pack), every catalog entry and every map page, and verifies that \
every chunk a recovery point needs is indexed in a pack that exists, is long enough and agrees \
with the index. --read-data also reads, authenticates and re-hashes every chunk; \
--read-data-subset reads a fixed share of the packs (the same ones each run).\n\nEach problem \
names the damaged object and the recovery points it affects. Exit code 0: healthy; 3: damaged."
    )]
    Check(CheckArgs),
    /// Apply a retention policy and reclaim the space of deleted recovery points
    #[command(
        after_help = "Retention is applied per asset (and RP type): --keep-last N keeps \
the N newest; --keep-daily N keeps the newest RP of each of the N most recent days that have one \
(likewise hourly, weekly (ISO weeks), monthly, yearly, all in UTC); --keep-tag keeps RPs with \
that tag. An RP is kept if any rule keeps it; volume RPs of a kept instance RP are kept. Without \
any --keep option nothing is deleted and prune only collects garbage (data of RPs deleted with \
`rp delete`, leftovers of interrupted backups). Protected RPs (`elastio rp protect`) are always \
kept. A policy that would keep no RP of an asset is refused unless --allow-empty is given. \
--asset matches one asset exactly; --asset-glob takes a pattern.\n\nSafe with backups running at the same time \
(in this or other processes or hosts): prune writes a plan of the packs it will delete, waits \
for backups that were running to finish, and spares anything they turned out to need. Backups \
that started earlier and deduplicated against condemned data fail before committing and can be \
rerun. Packs whose live data is below --repack-below are rewritten."
    )]
    Prune(PruneArgs),
    /// Unmount a mount made by `elastio mount`
    Umount {
        /// The mountpoint
        mountpoint: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<usize>,
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<usize>,
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<usize>,
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<usize>,
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<usize>,
    /// Keep RPs with this tag (repeatable)
    #[arg(long = "keep-tag", value_name = "KEY=VALUE")]
    pub keep_tags: Vec<String>,
    /// Apply the policy only to this asset (its exact name); others are kept
    #[arg(long, conflicts_with = "asset_glob")]
    pub asset: Option<String>,
    /// Apply the policy only to assets whose whole name matches this glob, e.g. '/dev/sd*'
    #[arg(long, value_name = "PATTERN")]
    pub asset_glob: Option<String>,
    /// Go on even if the policy keeps no RP of some asset (refused otherwise)
    #[arg(long)]
    pub allow_empty: bool,
    /// Show what would be deleted and reclaimed; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Rewrite packs whose live data is below this share, e.g. 50%
    #[arg(long, default_value = "50%", value_parser = parse_percent)]
    pub repack_below: f64,
    /// Leave at most this share of the reclaimable space unreclaimed in partly used packs
    /// (more packs are rewritten, most garbage first, until it holds; up to 1 MiB may always
    /// stay)
    #[arg(long, default_value = "5%", value_parser = parse_percent)]
    pub max_unused: f64,
    /// Longest wait for backups that were running, in seconds (default: the lease TTL + 60)
    #[arg(long, value_name = "SECS")]
    pub max_wait: Option<u64>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Also read and verify every chunk
    #[arg(long, conflicts_with = "read_data_subset")]
    pub read_data: bool,
    /// Read and verify the chunks of this share of the packs, e.g. 10%
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    pub read_data_subset: Option<f64>,
}

/// Parses `10%` or `10` as 0.10.
fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("invalid percentage {s:?}"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("percentage {s:?} is not between 0 and 100"));
    }
    Ok(v / 100.0)
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Recovery point id, or `latest` (the newest disk RP; with --asset, the newest RP of that
    /// asset, e.g. a stream or file paths)
    pub rp: String,
    /// An existing, empty directory
    pub mountpoint: PathBuf,
    /// With `latest`: the asset whose newest RP to mount
    #[arg(long)]
    pub asset: Option<String>,
    /// Stay in the foreground until Ctrl-C or unmount
    #[arg(long)]
    pub foreground: bool,
    /// Chunk cache
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub cache_size: u64,
    /// Loop-mount each partition read-only with the kernel's driver instead of parsing it (root;
    /// the kernel parses untrusted bytes: see below)
    #[arg(long)]
    pub kernel: bool,
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

#[derive(Subcommand, Debug)]
pub enum VaultCommand {
    /// Create a new vault with a random master key wrapped by your password (Argon2id)
    Init(VaultInitArgs),
    /// Show a vault's parameters and contents
    Info,
}

#[derive(Args, Debug)]
pub struct VaultInitArgs {
    /// Disk chunk size: a power of two from 4KiB to 512KiB (suffixes K, KiB, M, MiB)
    #[arg(long, default_value = "128KiB", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Target pack object size (1MiB to 1GiB)
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pub pack_size: u64,
    /// zstd compression level (-7 to 22; the default 3 is the measured sweet spot for disk images)
    #[arg(long, default_value_t = scalez::vault::DEFAULT_ZSTD_LEVEL, allow_negative_numbers = true)]
    pub zstd_level: i32,
    /// Argon2id memory in MiB for the password key
    #[arg(long, default_value_t = 64)]
    pub kdf_memory_mib: u32,
    /// Argon2id passes
    #[arg(long, default_value_t = 3)]
    pub kdf_iterations: u32,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectIoArg {
    /// O_DIRECT for block devices, page cache for image files
    Auto,
    /// O_DIRECT whenever the file system accepts it
    Always,
    /// Always read through the page cache
    Never,
}

#[derive(Subcommand, Debug)]
pub enum BlockCommand {
    /// Back up a block device or disk image into a new recovery point
    #[command(
        after_help = "The I/O engine is io_uring when the kernel allows it, else pread; \
set ELASTIO_IO_ENGINE=io_uring|pread to force one."
    )]
    Backup(BlockBackupArgs),
    /// Restore a disk recovery point to a file or block device
    Restore(BlockRestoreArgs),
}

#[derive(Args, Debug)]
pub struct BlockBackupArgs {
    /// Block device or image file to back up
    pub source: PathBuf,
    /// Tag the recovery point (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Record the asset under this name instead of the source's canonical path
    #[arg(long)]
    pub asset_name: Option<String>,
    /// Bypass the page cache when reading
    #[arg(long, value_enum, default_value_t = DirectIoArg::Auto)]
    pub direct_io: DirectIoArg,
}

#[derive(Args, Debug)]
pub struct BlockRestoreArgs {
    /// Recovery point id, or `latest` (the newest disk RP, of --asset if given)
    #[arg(long)]
    pub rp: String,
    /// With --rp latest: the asset whose newest RP to restore
    #[arg(long)]
    pub asset: Option<String>,
    /// Target file (created; zero chunks become holes) or block device
    pub target: PathBuf,
    /// Overwrite an existing target file or device
    #[arg(long)]
    pub force: bool,
}

/// Where EC2 and the EBS direct APIs are, and how hard to drive them.
#[derive(Args, Debug, Clone)]
pub struct AwsArgs {
    /// Endpoint for EC2 and EBS (an emulator); default: the AWS configuration
    /// (AWS_ENDPOINT_URL_EC2, AWS_ENDPOINT_URL_EBS, AWS_ENDPOINT_URL) or the public endpoints
    #[arg(long, env = "ELASTIO_AWS_ENDPOINT_URL", value_name = "URL")]
    pub aws_endpoint_url: Option<String>,
    /// Block requests (GetSnapshotBlock / PutSnapshotBlock) in flight
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,
    /// Block requests per second at most (AWS allows 1000 per snapshot)
    #[arg(long, default_value_t = 1000.0)]
    pub max_rate: f64,
    /// Per-attempt timeout of each AWS request, in seconds
    #[arg(long, default_value_t = 30)]
    pub request_timeout: u64,
    /// How often to poll a pending snapshot or volume, in milliseconds
    #[arg(long, default_value_t = 1000, hide = true)]
    pub poll_ms: u64,
    /// Blocks per list page (AWS's maximum by default; smaller to test paging)
    #[arg(long, default_value_t = 10000, hide = true, value_parser = clap::value_parser!(i32).range(100..=10000))]
    pub page_size: i32,
}

#[derive(Subcommand, Debug)]
pub enum EbsCommand {
    /// Snapshot a volume and back the snapshot up (incrementally when the last one still exists)
    #[command(
        after_help = "The snapshot is tagged elastio:created-by, elastio:volume-id and \
elastio:vault. After the recovery point is committed, older snapshots this tool made of the \
volume for this vault are deleted (--keep-snapshots keeps them); the newest stays so the next \
backup only reads the blocks that changed (ListChangedBlocks). Every block is checked against \
its SHA-256 checksum. The RP records the snapshot as tag ebs:snapshot-id."
    )]
    Backup(EbsBackupArgs),
    /// Back up an existing snapshot (incremental against the asset's previous RP when EBS
    /// relates the two snapshots)
    ImportSnapshot(EbsImportArgs),
    /// Write a disk recovery point to a new EBS snapshot, and optionally a volume
    Restore(EbsRestoreArgs),
}

#[derive(Args, Debug)]
pub struct EbsBackupArgs {
    /// The volume to back up (vol-...)
    #[arg(long)]
    pub volume_id: String,
    /// Tag the recovery point (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Keep the older snapshots this tool made of the volume
    #[arg(long)]
    pub keep_snapshots: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Args, Debug)]
pub struct EbsImportArgs {
    /// The snapshot to back up (snap-...)
    #[arg(long)]
    pub snapshot_id: String,
    /// Tag the recovery point (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Args, Debug)]
pub struct EbsRestoreArgs {
    /// Recovery point id, or `latest` (the newest disk RP, of --asset if given)
    #[arg(long)]
    pub rp: String,
    /// With --rp latest: the asset (volume id) whose newest RP to restore
    #[arg(long)]
    pub asset: Option<String>,
    /// Also create a volume from the new snapshot
    #[arg(long, requires = "availability_zone")]
    pub create_volume: bool,
    /// Availability zone of the new volume
    #[arg(long, value_name = "AZ")]
    pub availability_zone: Option<String>,
    /// Type of the new volume (gp3, gp2, io2, st1, ...; default: the EC2 default)
    #[arg(long, value_name = "TYPE")]
    pub volume_type: Option<String>,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Subcommand, Debug)]
pub enum Ec2Command {
    /// Snapshot every attached EBS volume at once (CreateSnapshots) and back each one up
    #[command(
        after_help = "Creates one disk RP per volume (asset = the volume id, tags \
ec2:instance-id and ec2:device, incremental like `ebs backup`) and then an instance RP that \
records the instance type, AZ, image, tags and device names with the volume RPs."
    )]
    Backup(Ec2BackupArgs),
    /// Recreate the volumes of an instance RP (and with --launch, the instance)
    Restore(Ec2RestoreArgs),
}

#[derive(Args, Debug)]
pub struct Ec2BackupArgs {
    /// The instance to back up (i-...)
    #[arg(long)]
    pub instance_id: String,
    /// Tag the recovery points (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Keep the older snapshots this tool made of the volumes
    #[arg(long)]
    pub keep_snapshots: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Args, Debug)]
pub struct Ec2RestoreArgs {
    /// Instance recovery point id, or `latest` (of --asset, the instance id, if given)
    #[arg(long)]
    pub rp: String,
    /// With --rp latest: the instance id whose newest RP to restore
    #[arg(long)]
    pub asset: Option<String>,
    /// Create the volumes here instead of the instance's recorded AZ
    #[arg(long, value_name = "AZ")]
    pub availability_zone: Option<String>,
    /// Also launch an instance of the recorded type and image, with the restored volumes
    /// attached at the recorded device names
    #[arg(long)]
    pub launch: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Subcommand, Debug)]
pub enum FileCommand {
    /// Back up files and directories (recursively) into a new file RP
    #[command(
        after_help = "Records every path with its type, mode, owner (ids and names), times, \
size, symlink target, hard links, extended attributes and holes; symlinks are never followed. \
File data is cut in content-defined chunks (FastCDC, 128 KiB / 512 KiB / 2 MiB), so an insert \
into a big file stores only the chunks around it. The next backup of the same paths on the same \
host is incremental: a file with the same size, mtime, ctime and inode as in the previous RP is \
not read again. A file that keeps changing while it is read is reported (and flagged in the RP); \
unreadable paths are reported and the backup goes on.\n\nExample: `elastio file backup /etc \
/home --exclude '*.tmp' --exclude /home/*/.cache --tag kind=config`."
    )]
    Backup(FileBackupArgs),
    /// Restore a file RP (or some of its paths) into a directory
    #[command(
        after_help = "Paths are recreated under --target as they were backed up (`/etc/hosts` \
becomes TARGET/etc/hosts), with modes, times, extended attributes and, when run as root, owners \
(numeric ids). Existing paths are left alone and listed unless --overwrite. The restore never \
writes outside the target: paths with `..` or a leading `/` in a (tampered) RP are refused, \
and it never follows a symlink in the target. Exit code 3 if some data could not be restored."
    )]
    Restore(FileRestoreArgs),
}

#[derive(Args, Debug)]
pub struct FileBackupArgs {
    /// Files or directories to back up
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Skip paths matching this glob (repeatable): with a `/` it is matched against the absolute
    /// path, without one against each name; `*` does not cross `/`, `**` does
    #[arg(long = "exclude", value_name = "GLOB")]
    pub excludes: Vec<String>,
    /// Do not descend into directories on other file systems (mount points are recorded empty)
    #[arg(long)]
    pub one_file_system: bool,
    /// Tag the recovery point (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Files read in parallel (default: twice the cores)
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
}

#[derive(Args, Debug)]
pub struct FileRestoreArgs {
    /// Recovery point id, or `latest` (the newest file RP, of --asset if given)
    #[arg(long)]
    pub rp: String,
    /// With --rp latest: the asset (the backed-up paths, comma-separated as in `rp list`)
    #[arg(long)]
    pub asset: Option<String>,
    /// Directory to restore into (created if missing)
    #[arg(long, value_name = "DIR")]
    pub target: PathBuf,
    /// Restore only this path and what is below it (repeatable; as backed up, e.g. /etc/ssh)
    #[arg(long = "include", value_name = "PATH")]
    pub includes: Vec<String>,
    /// Replace paths that already exist in the target
    #[arg(long)]
    pub overwrite: bool,
    /// Files written in parallel (default: twice the cores)
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
}

#[derive(Subcommand, Debug)]
pub enum KafkaCommand {
    /// Consume a topic from where its last backup ended to its current end, into a new RP
    #[command(
        after_help = "Each run reads every partition from the `partition.<p>.next_offset` tag \
of the topic's newest RP (from the earliest offset the first time) up to the end offsets seen \
when the run starts, and stores the messages raw (key, value, headers, timestamp, partition, \
offset) as a stream RP named `kafka:<topic>`. Tags record topic_name, partition_count, \
messages and per partition the first/last offset and timestamp. Nothing is committed to the \
cluster (no consumer group offsets): the vault alone holds the progress, so a failed run is \
simply repeated. Example: `elastio kafka backup --brokers k1:9092 --topic orders`."
    )]
    Backup(KafkaBackupArgs),
    /// Produce the messages of a topic RP back, each partition in its original order
    Restore(KafkaRestoreArgs),
}

#[derive(Args, Debug)]
pub struct KafkaBackupArgs {
    /// Bootstrap brokers (host:port, comma-separated)
    #[arg(long, env = "ELASTIO_KAFKA_BROKERS")]
    pub brokers: String,
    #[arg(long)]
    pub topic: String,
    /// A librdkafka property (repeatable), e.g. security.protocol=SASL_SSL
    #[arg(long = "property", short = 'X', value_name = "KEY=VALUE")]
    pub properties: Vec<String>,
    /// Tag the recovery point (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Fail when no message arrives for this long before the end offsets are reached
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: std::time::Duration,
}

#[derive(Args, Debug)]
pub struct KafkaRestoreArgs {
    /// Recovery point id, or `latest` (the newest RP of --topic-name)
    #[arg(long)]
    pub rp: String,
    /// With --rp latest: the topic whose newest RP to restore
    #[arg(long)]
    pub topic_name: Option<String>,
    /// Bootstrap brokers (host:port, comma-separated)
    #[arg(long, env = "ELASTIO_KAFKA_BROKERS")]
    pub brokers: String,
    /// Produce to this topic instead of the original (it must exist with enough partitions)
    #[arg(long)]
    pub to_topic: Option<String>,
    /// A librdkafka property (repeatable)
    #[arg(long = "property", short = 'X', value_name = "KEY=VALUE")]
    pub properties: Vec<String>,
    /// How long to wait for the last messages to be acknowledged
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub flush_timeout: std::time::Duration,
}

#[derive(Subcommand, Debug)]
pub enum StreamCommand {
    /// Read standard input (or --from-file) to its end into a new stream RP
    #[command(
        after_help = "Content-defined chunks (FastCDC, 256 KiB / 1 MiB / 4 MiB min / \
average / max), so the next backup of a similar stream stores only what changed even when \
bytes were inserted. Memory stays bounded whatever the stream's length. Example: \
`pg_dump db | elastio stream backup --stream-name db --tag kind=dump`."
    )]
    Backup(StreamBackupArgs),
    /// Write a stream RP to standard output (or --to-file)
    Restore(StreamRestoreArgs),
}

#[derive(Args, Debug)]
pub struct StreamBackupArgs {
    /// Name of the stream (the asset its RPs are listed under)
    #[arg(long)]
    pub stream_name: String,
    /// Tag the recovery point (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Read this file instead of standard input
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct StreamRestoreArgs {
    /// Recovery point id, or `latest` (the newest stream RP, of --stream-name if given)
    #[arg(long)]
    pub rp: String,
    /// With --rp latest: the stream whose newest RP to restore
    #[arg(long)]
    pub stream_name: Option<String>,
    /// Write this file (created; replaced only with --force) instead of standard output
    #[arg(long, value_name = "FILE")]
    pub to_file: Option<PathBuf>,
    /// Overwrite an existing --to-file
    #[arg(long)]
    pub force: bool,
}

#[derive(Subcommand, Debug)]
pub enum RpCommand {
    /// List recovery points, oldest first
    List(RpListArgs),
    /// Show one recovery point in full
    Show { rp: String },
    /// Add, change or remove tags of a recovery point
    Tag(RpTagArgs),
    /// Delete recovery points (their data is freed by the next `elastio prune`)
    #[command(
        after_help = "Protected RPs (`elastio rp protect`) are refused unless --force is \
given.\n\nExample:\n  elastio rp delete rp-01m80mb7eb9rts308j4hc4b1xn"
    )]
    Delete {
        /// Recovery point ids
        #[arg(required = true)]
        rps: Vec<String>,
        /// Delete protected RPs too
        #[arg(long)]
        force: bool,
    },
    /// Protect recovery points: every prune keeps them and `rp delete` refuses them
    #[command(
        after_help = "Protection is the tag elastio.protected; `elastio rp unprotect` \
removes it.\n\nExample:\n  elastio rp protect rp-01m80mb7eb9rts308j4hc4b1xn"
    )]
    Protect {
        /// Recovery point ids (or `latest`)
        #[arg(required = true)]
        rps: Vec<String>,
    },
    /// Remove the protection of recovery points
    Unprotect {
        /// Recovery point ids (or `latest`)
        #[arg(required = true)]
        rps: Vec<String>,
    },
}

#[derive(Args, Debug)]
pub struct RpListArgs {
    /// Only this type: disk, file or stream
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<scalez::RpKind>,
    /// Only RPs of this asset (exact name, or a substring of it)
    #[arg(long)]
    pub asset: Option<String>,
    /// Only RPs having this tag (repeatable; all must match)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RpTagArgs {
    pub rp: String,
    /// Tags to set
    #[arg(value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Tag keys to remove (repeatable)
    #[arg(long = "remove", value_name = "KEY")]
    pub remove: Vec<String>,
}

/// Parses sizes like `128KiB`, `16M`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("invalid size unit in {s:?} (use K, M or G)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} too large"))
}
