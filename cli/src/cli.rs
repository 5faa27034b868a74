//! Command-line definition (clap derive): the global flags and the command list. Each command's
//! arguments live with its code in `commands/<noun>.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::commands::block::BlockCommand;
use crate::commands::check::CheckArgs;
use crate::commands::ebs::EbsCommand;
use crate::commands::ec2::Ec2Command;
use crate::commands::file::FileCommand;
use crate::commands::kafka::KafkaCommand;
use crate::commands::mount::MountArgs;
use crate::commands::nbd::NbdCommand;
use crate::commands::prune::PruneArgs;
use crate::commands::rp::RpCommand;
use crate::commands::stream::StreamCommand;
use crate::commands::vault::VaultCommand;

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
    /// Open an S3 vault read-only as it was at this moment (UTC, e.g. 2026-12-01T10:00:00Z):
    /// objects deleted or overwritten since read as they were (the bucket must be versioned,
    /// as an Object Lock bucket is)
    #[arg(long, global = true, value_name = "TIME", value_parser = parse_time)]
    pub point_in_time: Option<std::time::SystemTime>,
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
MBR/GPT partition, `partN/` (`fs/` for a file system on the bare disk) with the files inside \
each ext2/3/4, XFS, NTFS, FAT or btrfs file system, and `lvm/<vg>/<lv>/` with those of each LVM logical \
volume, read in user space: no root, loop device or kernel module needed. `.elastio-status` (and \
the command's output) says what each partition holds and why one shows no files. Copy files out \
with `cp -a`, or without mounting: `elastio rp ls|cat|find|diff` and `elastio file restore --rp \
<disk rp> --include /part1/etc`. With --kernel (root), each partition is instead loop-mounted \
read-only by the kernel's own driver at `partN/`, for file systems the built-in readers do not \
know (multi-device btrfs, LUKS after unlocking elsewhere, ...). Risk: the kernel then parses the image's bytes in ring 0, and a disk from a \
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
    /// Scan a recovery point (or a directory) for ransomware, malware and file-system damage
    Iscan(crate::commands::iscan::IscanArgs),
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

/// Parses `10%` or `10` as 0.10.
pub fn parse_percent(s: &str) -> Result<f64, String> {
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

/// A moment in UTC: RFC 3339 (`2026-12-01T10:00:00Z`), or `2026-12-01 10:00:00`.
pub fn parse_time(s: &str) -> Result<std::time::SystemTime, String> {
    humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
        .map_err(|e| format!("{s:?} is not a time like 2026-12-01T10:00:00Z: {e}"))
}
