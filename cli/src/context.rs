//! Resolving the vault location and password, and opening the vault.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use scalez::store::local::LocalStore;
use scalez::store::ObjectStore;
use scalez::Vault;

use crate::cli::GlobalArgs;

pub const PASSWORD_ENV: &str = "ELASTIO_PASSWORD";

pub struct Ctx {
    pub global: GlobalArgs,
}

impl Ctx {
    /// `--vault`, else `$ELASTIO_VAULT` (clap), else `~/.local/share/elastio/vault`.
    pub fn vault_path(&self) -> Result<PathBuf> {
        if let Some(p) = &self.global.vault {
            if p.to_string_lossy().starts_with("s3://") {
                bail!("S3 vaults are not supported by this build yet: use a local directory");
            }
            return Ok(p.clone());
        }
        let home = std::env::var_os("HOME")
            .context("cannot pick the default vault location: $HOME is not set; pass --vault")?;
        Ok(PathBuf::from(home).join(".local/share/elastio/vault"))
    }

    /// The password from `--password-file`, else `$ELASTIO_PASSWORD`, else a terminal prompt.
    pub fn password(&self, confirm: bool) -> Result<Vec<u8>> {
        if self.global.password_stdin {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                bail!("no password on standard input");
            }
            return Ok(line.as_bytes().to_vec());
        }
        if let Some(f) = &self.global.password_file {
            let text = std::fs::read(f)
                .with_context(|| format!("cannot read password file {}", f.display()))?;
            let line = text.split(|b| *b == b'\n').next().unwrap_or(&[]);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                bail!("password file {} is empty", f.display());
            }
            return Ok(line.to_vec());
        }
        if let Some(p) = std::env::var_os(PASSWORD_ENV) {
            return Ok(p.into_encoded_bytes());
        }
        if !std::io::stdin().is_terminal() {
            bail!(
                "no vault password: set {PASSWORD_ENV}, pass --password-file, or run on a terminal"
            );
        }
        let p = rpassword::prompt_password("vault password: ")?;
        if confirm {
            let again = rpassword::prompt_password("repeat password: ")?;
            if again != p {
                bail!("the passwords do not match");
            }
        }
        if p.is_empty() {
            bail!("empty password");
        }
        Ok(p.into_bytes())
    }

    pub fn store(&self) -> Result<Arc<dyn ObjectStore>> {
        let path = self.vault_path()?;
        if !path.exists() {
            return Err(scalez::Error::NotAVault {
                location: path.display().to_string(),
            }
            .into());
        }
        Ok(Arc::new(LocalStore::open(&path)?))
    }

    pub fn open_vault(&self) -> Result<Arc<Vault>> {
        let store = self.store()?;
        // Check the format before asking for a password.
        Vault::read_config(store.as_ref())?;
        let password = self.password(false)?;
        Ok(Arc::new(Vault::open(store, &password)?))
    }
}
