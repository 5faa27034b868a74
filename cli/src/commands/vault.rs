use anyhow::{Context, Result};
use scalez::crypto::KdfParams;
use scalez::{Vault, VaultOptions};
use serde_json::json;

use crate::cli::{OutputFormat, VaultCommand, VaultInitArgs};
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
