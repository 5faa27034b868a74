use crate::cli::parse_size;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use scalez::crypto::KdfParams;
use scalez::{Vault, VaultOptions};
use serde_json::json;

use crate::cli::OutputFormat;
use crate::context::Ctx;
use crate::output::bytes;
use crate::output::print_json;

pub fn run(ctx: &Ctx, cmd: VaultCommand) -> Result<()> {
    match cmd {
        VaultCommand::Init(a) => init(ctx, a),
        VaultCommand::Info => info(ctx),
        VaultCommand::Lock(LockCommand::Status) => lock_status(ctx),
        VaultCommand::IamPolicy(a) => iam_policy(ctx, a),
        VaultCommand::RestoreVersions(a) => restore_versions(ctx, a),
        VaultCommand::Copy(a) => copy(ctx, a),
    }
}

/// Opens the vault at `location` (a path or s3:// URL) with `password`.
/// `keep_point_in_time`: the source of a copy may be read as it was (`--point-in-time`); a
/// target never is.
fn open_other(
    ctx: &Ctx,
    location: &std::path::Path,
    password: &[u8],
    keep_point_in_time: bool,
) -> Result<std::sync::Arc<Vault>> {
    let mut global = ctx.global.clone();
    global.vault = Some(location.to_path_buf());
    if !keep_point_in_time {
        global.point_in_time = None;
    }
    let other = Ctx { global };
    let store = other.store()?;
    Vault::read_config(store.as_ref())?;
    Ok(std::sync::Arc::new(Vault::open(store, password)?))
}

fn copy(ctx: &Ctx, a: CopyArgs) -> Result<()> {
    // The source's password is read once (it may come from standard input).
    let source_password = ctx.password(false)?;
    let from = match &a.from {
        Some(f) => open_other(ctx, f, &source_password, true)?,
        None => {
            let store = ctx.store()?;
            Vault::read_config(store.as_ref())?;
            std::sync::Arc::new(Vault::open(store, &source_password)?)
        }
    };
    let password = match (&a.to_password_file, std::env::var_os("ELASTIO_TO_PASSWORD")) {
        (Some(f), _) => {
            let mut global = ctx.global.clone();
            global.password_file = Some(f.clone());
            global.password_stdin = false;
            Ctx { global }.password(false)?
        }
        (None, Some(p)) if !p.is_empty() => zeroize::Zeroizing::new(p.into_encoded_bytes()),
        _ => source_password.clone(),
    };
    let to = open_other(ctx, &a.to, &password, false)
        .with_context(|| format!("cannot open the target vault {}", a.to.display()))?;
    if from.config().vault_id == to.config().vault_id {
        anyhow::bail!(
            "{} and {} are the same vault (id {})",
            from.location(),
            to.location(),
            to.config().vault_id
        );
    }
    let tags = scalez::catalog::parse_tags(a.tags.iter().map(String::as_str))?;
    let all = from.list_rps()?;
    let mut picked: Vec<scalez::RecoveryPoint> = all
        .iter()
        .filter(|rp| a.asset.as_deref().is_none_or(|x| rp.asset.name == x))
        .filter(|rp| a.kind.is_none_or(|k| rp.kind == k))
        .filter(|rp| tags.iter().all(|(k, v)| rp.tags.get(k) == Some(v)))
        .filter(|rp| {
            a.since.is_none_or(|t| {
                humantime::parse_rfc3339_weak(rp.created.trim_end_matches('Z'))
                    .is_ok_and(|c| c >= t)
            })
        })
        .cloned()
        .collect();
    // An instance RP needs the disk RPs of its volumes.
    let volumes: Vec<_> = picked
        .iter()
        .filter_map(|rp| rp.instance.as_ref())
        .flat_map(|i| i.volumes.iter().map(|v| v.rp.clone()))
        .collect();
    for id in volumes {
        if !picked.iter().any(|rp| rp.id == id) {
            if let Some(rp) = all.iter().find(|rp| rp.id == id) {
                picked.push(rp.clone());
            }
        }
    }
    if picked.is_empty() {
        anyhow::bail!(
            "no recovery point of {} matches the selection",
            from.location()
        );
    }
    let bar = crate::output::Bar::new(ctx.global.quiet);
    let r = scalez::copy::copy_rps(&from, &to, &picked, a.dry_run, &|m| {
        agent::Progress::message(&bar, m)
    })
    .with_context(|| format!("copy from {} to {} failed", from.location(), to.location()))?;
    bar.finish();
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "from": from.location(),
            "to": to.location(),
            "selected": picked.len(),
            "report": r,
        })),
        OutputFormat::Human => {
            let verb = if r.dry_run { "would copy" } else { "copied" };
            println!(
                "{verb} {} of {} recovery points from {} to {} ({} already there)",
                r.copied.len(),
                picked.len(),
                from.location(),
                to.location(),
                r.already_there
            );
            if !r.deleted_in_target.is_empty() {
                println!(
                    "  not copied again: {} deleted in the target since ({})",
                    r.deleted_in_target.len(),
                    r.deleted_in_target[..r.deleted_in_target.len().min(3)].join(", ")
                );
            }
            println!(
                "  read     {} chunks ({}); {} disk slots taken from the copied parent unread",
                r.chunks_read,
                bytes(r.bytes_read),
                r.slots_kept
            );
            println!(
                "  sent     {} new chunks ({}); {} stored, {} requests",
                r.chunks_sent,
                bytes(r.bytes_sent),
                bytes(r.stored_bytes),
                r.requests
            );
            if r.dry_run {
                println!(
                    "  would send about {} requests at most",
                    r.requests_estimate
                );
            }
            println!("  time     {:.2} s", r.elapsed_ms as f64 / 1000.0);
            Ok(())
        }
    }
}

fn restore_versions(ctx: &Ctx, a: RestoreVersionsArgs) -> Result<()> {
    let store = ctx.raw_s3_store()?;
    // The vault as it was then, opened with the password: its authenticated config says how
    // the copies brought back must be locked.
    let then = {
        let mut global = ctx.global.clone();
        global.point_in_time = Some(a.to);
        let then_ctx = Ctx { global };
        then_ctx
            .open_vault()
            .context("cannot open the vault as it was at --to (the repair needs its config)")?
    };
    let policy = then.config().object_lock.map(|l| l.policy());
    let bar = crate::output::Bar::new(ctx.global.quiet);
    let r = scalez::immutable::restore_versions(store.as_ref(), a.to, policy, a.dry_run, &|m| {
        agent::Progress::message(&bar, m)
    })?;
    bar.finish();
    if !a.dry_run {
        // The metadata cache may hold bytes read while the vault was damaged.
        if let Ok(dir) = crate::context::cache_dir(&then.config().vault_id) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    if let Some(w) = &r.warning {
        eprintln!("warning: {w}");
    }
    match ctx.global.output_format {
        OutputFormat::Json => {
            print_json(&json!({ "vault": store.location(), "dry_run": a.dry_run, "report": r }))?;
            if !r.errors.is_empty() {
                anyhow::bail!("{} objects could not be brought back", r.errors.len());
            }
            Ok(())
        }
        OutputFormat::Human => {
            let verb = if a.dry_run {
                "would bring back"
            } else {
                "brought back"
            };
            println!(
                "{verb} {} deleted and {} overwritten objects as they were at {}",
                r.unhidden.len(),
                r.restored.len(),
                r.at
            );
            for k in r.unhidden.iter().chain(&r.restored).take(20) {
                println!("  {k}");
            }
            println!(
                "{} objects unchanged since; {} newer ones kept{}",
                r.unchanged,
                r.newer_count,
                if r.newer.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({}{})",
                        r.newer[..r.newer.len().min(5)].join(", "),
                        if r.newer_count > 5 { ", ..." } else { "" }
                    )
                }
            );
            for e in &r.errors {
                println!("  FAILED {e}");
            }
            if !r.errors.is_empty() {
                anyhow::bail!("{} objects could not be brought back", r.errors.len());
            }
            Ok(())
        }
    }
}

fn iam_policy(ctx: &Ctx, a: IamPolicyArgs) -> Result<()> {
    let crate::context::Location::S3(c) = ctx.location()? else {
        anyhow::bail!("vault iam-policy is for S3 vaults (--vault s3://bucket/prefix)");
    };
    // The vault's lock, when it exists (unauthenticated: it only shapes the policy printed).
    let lock = match ctx
        .raw_s3_store()
        .and_then(|s| Ok(Vault::read_config(s.as_ref())?))
    {
        Ok(c) => c.object_lock,
        Err(e) => {
            eprintln!(
                "warning: the vault's config cannot be read ({e}): the policy does not bound \
                 the locks a backup may set"
            );
            None
        }
    };
    let p =
        crate::commands::iam::policy(a.role, &c.bucket, &c.prefix, a.principal.as_deref(), lock);
    print_json(&p)
}

fn lock_status(ctx: &Ctx) -> Result<()> {
    let vault = ctx.open_vault()?;
    let bar = crate::output::Bar::new(ctx.global.quiet);
    let st = scalez::immutable::status(&vault, &|m| agent::Progress::message(&bar, m))?;
    bar.finish();
    let Some(st) = st else {
        anyhow::bail!(
            "{} has no Object Lock (create a locked vault with `vault init --object-lock \
             governance|compliance --retention 30d` on S3)",
            vault.location()
        );
    };
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({ "vault": vault.location(), "lock": st })),
        OutputFormat::Human => {
            println!("vault          {}", vault.location());
            println!(
                "mode           {} (every object kept at least {})",
                st.mode,
                humantime::format_duration(std::time::Duration::from_secs(st.retention_secs))
            );
            println!(
                "bucket         Object Lock {}{}",
                if st.bucket_lock_enabled {
                    "enabled"
                } else {
                    "NOT enabled"
                },
                st.bucket_default
                    .as_deref()
                    .map(|d| format!(", default retention {d}"))
                    .unwrap_or_default()
            );
            println!("objects        {} locked", st.objects - st.unlocked.len());
            if let Some(t) = &st.oldest_lock_expires {
                println!("oldest lock    expires {t} (prune extends live ones)");
            }
            println!("old versions   {} (hidden or replaced)", st.hidden_versions);
            if !st.unlocked.is_empty() {
                println!(
                    "NOT LOCKED     {} objects, e.g. {} (run prune to lock them again)",
                    st.unlocked.len(),
                    st.unlocked[..st.unlocked.len().min(3)].join(", ")
                );
            }
            Ok(())
        }
    }
}

fn init(ctx: &Ctx, a: VaultInitArgs) -> Result<()> {
    let object_lock = match (a.object_lock, &a.retention) {
        (Some(mode), Some(r)) => Some(scalez::vault::ObjectLock {
            mode: mode.into(),
            retention_secs: scalez::store::lock::parse_retention(r)
                .map_err(|e| anyhow::anyhow!("--retention {e}"))?
                .as_secs(),
        }),
        (None, None) => None,
        (Some(_), None) => anyhow::bail!("--object-lock needs --retention (e.g. 30d)"),
        (None, Some(_)) => anyhow::bail!("--retention goes with --object-lock"),
    };
    let opts = VaultOptions {
        object_lock,
        chunk_size: u32::try_from(a.chunk_size).context("chunk size too large")?,
        pack_size: u32::try_from(a.pack_size).context("pack size too large")?,
        zstd_level: a.zstd_level,
        kdf: KdfParams {
            memory_kib: a.kdf_memory_mib.saturating_mul(1024),
            iterations: a.kdf_iterations,
            parallelism: KdfParams::default().parallelism,
        },
    };
    let store = ctx.new_store(object_lock.is_some())?;
    let password = ctx.password(true)?;
    let vault = Vault::init(store, &password, opts)?;
    let c = vault.config();
    let location = vault.location();
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({ "vault": location, "config": c }))?,
        OutputFormat::Human => {
            println!("created vault {location} (id {})", c.vault_id);
            println!(
                "  chunk size {}, pack size {}, zstd level {}",
                bytes(c.chunk_size as u64),
                bytes(c.pack_size as u64),
                c.zstd_level
            );
            if let Some(l) = &c.object_lock {
                println!(
                    "  S3 Object Lock: {} mode, every object kept at least {}",
                    l.mode,
                    humantime::format_duration(std::time::Duration::from_secs(l.retention_secs))
                );
            }
            println!("  keep your password safe: without it the data cannot be recovered");
        }
    }
    Ok(())
}

fn info(ctx: &Ctx) -> Result<()> {
    let vault = ctx.open_vault()?;
    let rps = vault.list_rps()?;
    let stored: u64 = vault.store().list("")?.iter().map(|o| o.size).sum();
    let c = vault.config();
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "vault": vault.location(),
            "config": c,
            "recovery_points": rps.len(),
            "chunks": vault.chunk_count(),
            "index_memory_bytes": vault.index_memory_bytes(),
            "stored_bytes": stored,
            "store_requests": vault.store().stats().requests,
        }))?,
        OutputFormat::Human => {
            println!("vault       {}", vault.location());
            println!("id          {}", c.vault_id);
            println!("format      {}", c.version);
            println!("created     {}", c.created);
            println!("chunk size  {}", bytes(c.chunk_size as u64));
            println!("pack size   {}", bytes(c.pack_size as u64));
            println!("zstd level  {}", c.zstd_level);
            println!("RPs         {}", rps.len());
            println!(
                "chunks      {} (index in memory: {})",
                vault.chunk_count(),
                bytes(vault.index_memory_bytes() as u64)
            );
            println!("stored      {}", bytes(stored));
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum VaultCommand {
    /// Create a new vault with a random master key wrapped by your password (Argon2id)
    #[command(after_help = "Examples:
  elastio --vault /var/backups/vault vault init
  elastio --vault s3://backups/prod vault init --object-lock compliance --retention 30d

With --object-lock, every object is written under S3 Object Lock with a retain-until date of
now + retention, so nobody (compliance) or nobody without s3:BypassGovernanceRetention
(governance) can destroy it before then, not even with the backup host's credentials. Deleting
only hides objects (a delete marker); prune extends the locks of what recovery points still
need and destroys hidden versions once they are a retention old and unlocked.
`elastio vault lock status` shows the state.")]
    Init(VaultInitArgs),
    /// Show a vault's parameters and contents
    Info,
    /// S3 Object Lock of a locked vault
    #[command(subcommand)]
    Lock(LockCommand),
    /// Print a least-privilege S3 policy for one role on this vault's bucket and prefix
    #[command(after_help = "Examples:
  elastio --vault s3://backups/prod vault iam-policy --role backup > backup-policy.json
  aws iam put-role-policy --role-name elastio-backup --policy-name vault \\
      --policy-document file://backup-policy.json
  elastio --vault s3://backups/prod vault iam-policy --role restore \\
      --principal arn:aws:iam::123456789012:role/restore    # a bucket policy instead

Roles: restore reads; backup also writes new objects and deletes only its own leases/ and
locks/ (never data); prune also deletes (on a locked vault that only hides a key), reads and
extends locks, and destroys versions (refused by S3 while they are locked); admin may do
anything. No role gets s3:BypassGovernanceRetention. Give backup hosts the backup role and run
prune from elsewhere: a stolen backup host can then add to the vault but not remove from it.")]
    IamPolicy(IamPolicyArgs),
    /// Undo deletions and overwrites since a moment: every object that existed then is made
    /// current again as it was (versioned S3 buckets)
    #[command(after_help = "Examples:
  elastio --point-in-time 2026-12-01T10:00:00Z rp list      # what the vault held then
  elastio vault restore-versions --to 2026-12-01T10:00:00Z --dry-run
  elastio vault restore-versions --to 2026-12-01T10:00:00Z

Objects created since (later backups) are kept. Deleted objects come back by removing the delete
markers above them; overwritten ones by a server-side copy of their old version (the newer
versions stay, and prune reports them as tampered). Needs the prune role (or admin). Works on
the bucket directly, so it repairs a vault too damaged to open.

Pick a time before the credentials were stolen, not just before the damage showed: an attacker
holding an open multipart upload can give a later write an earlier time. Versions from before
the time must still exist: they are kept at least one retention after they were hidden.")]
    RestoreVersions(RestoreVersionsArgs),
    /// Copy recovery points, with everything they reference, to another vault
    #[command(after_help = "Examples:
  elastio vault copy --to s3://offsite/prod                      # every RP of --vault
  elastio vault copy --from /var/backups/vault --to s3://offsite/prod --asset /dev/nvme1n1
  elastio vault copy --to s3://offsite/prod --since 2026-12-01T00:00:00Z --dry-run

Chunks are re-hashed and re-sealed with the target's keys; an RP keeps its id, time, tags and
parent, so it is the same RP in both vaults. Incremental: RPs the target has are skipped, chunks
it has are not sent, and a disk RP whose parent was copied reads only what changed. A copy
killed midway is simply run again. The target's password: --to-password-file, else
$ELASTIO_TO_PASSWORD, else the source's.")]
    Copy(CopyArgs),
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The source vault (default: --vault)
    #[arg(long, value_name = "PATH|URL")]
    pub from: Option<std::path::PathBuf>,
    /// The target vault (made beforehand with `vault init`)
    #[arg(long, value_name = "PATH|URL")]
    pub to: std::path::PathBuf,
    /// Only RPs of this asset
    #[arg(long)]
    pub asset: Option<String>,
    /// Only RPs with this tag (repeatable: all must match)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Only RPs of this type: disk, file, stream or instance (with the disks of its volumes)
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<scalez::RpKind>,
    /// Only RPs created at or after this time (UTC)
    #[arg(long, value_name = "TIME", value_parser = crate::cli::parse_time)]
    pub since: Option<std::time::SystemTime>,
    /// Read the target vault's password from this file
    #[arg(long, value_name = "FILE")]
    pub to_password_file: Option<std::path::PathBuf>,
    /// Count what would be read and sent, write nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct RestoreVersionsArgs {
    /// The moment to go back to (UTC, e.g. 2026-12-01T10:00:00Z)
    #[arg(long, value_name = "TIME", value_parser = crate::cli::parse_time)]
    pub to: std::time::SystemTime,
    /// Say what would be brought back, change nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct IamPolicyArgs {
    /// Which commands the credentials will run
    #[arg(long, value_enum)]
    pub role: crate::commands::iam::Role,
    /// Print a bucket policy granting the role to this principal (an IAM ARN, or an RGW user as
    /// arn:aws:iam:::user/NAME) instead of an identity policy
    #[arg(long, value_name = "ARN")]
    pub principal: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum LockCommand {
    /// Mode, retention, the bucket's configuration, and the lock of every live object (one
    /// HEAD each): how many are locked and when the earliest lock expires
    Status,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockModeArg {
    /// Versions cannot be destroyed before their date, except by principals granted
    /// s3:BypassGovernanceRetention (elastio never uses it)
    Governance,
    /// Versions cannot be destroyed before their date by anyone, the account root included
    Compliance,
}

impl From<LockModeArg> for scalez::store::lock::LockMode {
    fn from(m: LockModeArg) -> Self {
        match m {
            LockModeArg::Governance => scalez::store::lock::LockMode::Governance,
            LockModeArg::Compliance => scalez::store::lock::LockMode::Compliance,
        }
    }
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
    /// Write every object under S3 Object Lock in this mode (S3 vaults; the bucket is created
    /// with Object Lock, or an existing one must have it)
    #[arg(long, value_enum, value_name = "MODE", requires = "retention")]
    pub object_lock: Option<LockModeArg>,
    /// With --object-lock: how long every object is kept at least (30d, 12h, 1y, ...; days or
    /// more outside tests). It is also how long an attack can go unnoticed and still be undone;
    /// prune keeps extending the locks of what recovery points still need (run it at least
    /// every half retention)
    #[arg(long, value_name = "DURATION")]
    pub retention: Option<String>,
}
