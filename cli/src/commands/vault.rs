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
    }
}

fn init(ctx: &Ctx, a: VaultInitArgs) -> Result<()> {
    let opts = VaultOptions {
        chunk_size: u32::try_from(a.chunk_size).context("chunk size too large")?,
        pack_size: u32::try_from(a.pack_size).context("pack size too large")?,
        zstd_level: a.zstd_level,
        kdf: KdfParams {
            memory_kib: a.kdf_memory_mib.saturating_mul(1024),
            iterations: a.kdf_iterations,
            parallelism: KdfParams::default().parallelism,
        },
    };
    let store = ctx.new_store()?;
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
