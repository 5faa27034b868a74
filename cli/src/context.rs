//! Resolving the vault location and password, and opening the vault.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use scalez::store::cache::CachedStore;
use scalez::store::fault::{FaultPlan, FaultStore};
use scalez::store::local::LocalStore;
use scalez::store::retry::{RetryPolicy, RetryStore};
use scalez::store::s3::{S3Config, S3Store};
use scalez::store::ObjectStore;
use scalez::{RecoveryPoint, RecoveryPointId, RpKind, Vault};
use zeroize::Zeroizing;

use crate::cli::GlobalArgs;

pub const PASSWORD_ENV: &str = "ELASTIO_PASSWORD";

/// Injects store faults (`fail_first=N,fail_every=N,latency_ms=N`): a testing aid for the retry
/// paths, on any backend.
pub const FAULTS_ENV: &str = "ELASTIO_FAULTS";

pub struct Ctx {
    pub global: GlobalArgs,
}

/// Where a vault lives.
pub enum Location {
    Local(PathBuf),
    S3(S3Config),
}

impl Ctx {
    /// `--vault`, else `$ELASTIO_VAULT` (clap), else `~/.local/share/elastio/vault`.
    pub fn location(&self) -> Result<Location> {
        if let Some(p) = &self.global.vault {
            let text = p.to_string_lossy();
            if text.starts_with("s3://") {
                let mut c = S3Config::from_url(&text).map_err(anyhow::Error::msg)?;
                c.endpoint_url = self.global.endpoint_url.clone();
                c.region = self.global.region.clone();
                c.kms_key_id = self.global.kms_key_id.clone();
                return Ok(Location::S3(c));
            }
            return Ok(Location::Local(p.clone()));
        }
        let home = std::env::var_os("HOME")
            .context("cannot pick the default vault location: $HOME is not set; pass --vault")?;
        Ok(Location::Local(
            PathBuf::from(home).join(".local/share/elastio/vault"),
        ))
    }

    /// The vault as given on a command line (a path or an s3:// URL), for child processes.
    pub fn vault_arg(&self) -> Result<String> {
        Ok(match self.location()? {
            Location::Local(p) => p.to_str().context("vault path is not UTF-8")?.to_string(),
            Location::S3(c) => c.url(),
        })
    }

    /// Adds fault injection (if asked for) and retries around a backend.
    fn wrap<S: ObjectStore + 'static>(&self, inner: S) -> Result<Arc<dyn ObjectStore>> {
        let policy = RetryPolicy::default();
        Ok(match std::env::var(FAULTS_ENV) {
            Ok(spec) if !spec.is_empty() => {
                let plan = FaultPlan::parse(&spec).map_err(anyhow::Error::msg)?;
                Arc::new(RetryStore::new(FaultStore::new(inner, plan), policy))
            }
            _ => Arc::new(RetryStore::new(inner, policy)),
        })
    }

    /// The store of an existing vault (local, or S3 with retries and the metadata cache; with
    /// `--point-in-time`, a read-only view of the versions current then).
    pub fn store(&self) -> Result<Arc<dyn ObjectStore>> {
        if let Some(at) = self.global.point_in_time {
            let Location::S3(c) = self.location()? else {
                bail!("--point-in-time needs an S3 vault in a versioned bucket");
            };
            let raw = self.wrap(S3Store::connect(c)?)?;
            return Ok(Arc::new(
                scalez::store::point_in_time::PointInTimeStore::new(raw, at)?,
            ));
        }
        match self.location()? {
            Location::Local(path) => {
                if !path.exists() {
                    return Err(scalez::Error::NotAVault {
                        location: path.display().to_string(),
                    }
                    .into());
                }
                self.wrap(LocalStore::open(&path)?)
            }
            Location::S3(c) => {
                let store = self.wrap(S3Store::connect(c)?)?;
                let id = Vault::read_config(store.as_ref())?.vault_id;
                Ok(Arc::new(CachedStore::new(store, &cache_dir(&id)?)))
            }
        }
    }

    /// The S3 store of a vault with retries, nothing else (no cache, no config read): for
    /// repairs of a vault that may not open.
    pub fn raw_s3_store(&self) -> Result<Arc<dyn ObjectStore>> {
        let Location::S3(c) = self.location()? else {
            bail!("this needs an S3 vault (--vault s3://bucket/prefix)");
        };
        self.wrap(S3Store::connect(c)?)
    }

    /// The store for `vault init`: created (directory, or bucket if missing) and empty.
    /// `object_lock`: the bucket must have S3 Object Lock (made with it when new).
    pub fn new_store(&self, object_lock: bool) -> Result<Arc<dyn ObjectStore>> {
        match self.location()? {
            Location::Local(_) if object_lock => {
                bail!("--object-lock needs an S3 vault (s3://bucket/prefix): a local directory has no Object Lock")
            }
            Location::Local(path) => {
                if path.join("config").exists() {
                    bail!("a vault already exists at {}", path.display());
                }
                if let Ok(mut entries) = std::fs::read_dir(&path) {
                    if entries.next().is_some() {
                        bail!(
                            "{} is not empty: choose an empty or new directory",
                            path.display()
                        );
                    }
                }
                let store = LocalStore::create(&path)
                    .with_context(|| format!("cannot create vault directory {}", path.display()))?;
                self.wrap(store)
            }
            Location::S3(c) => {
                let url = c.url();
                let s3 = S3Store::connect(c)?;
                if object_lock {
                    use scalez::store::lock::ObjectLockStore;
                    s3.ensure_lock_bucket()?;
                } else {
                    s3.ensure_bucket()?;
                }
                // A vault deleted here before still has versions of its config: a new one would
                // be taken for a replaced config.
                {
                    use scalez::store::lock::ObjectLockStore;
                    if s3.versions("config")?.iter().any(|v| v.key == "config") {
                        bail!(
                            "{url} held a vault before (its config has old versions): choose \
                             a new prefix or bucket"
                        );
                    }
                }
                let store = self.wrap(s3)?;
                let existing = store.list("")?;
                if existing.iter().any(|o| o.key == "config") {
                    bail!("a vault already exists at {url}");
                }
                if !existing.is_empty() {
                    bail!("{url} is not empty: choose an empty bucket or a new prefix");
                }
                Ok(store)
            }
        }
    }

    /// The password from `--password-file`, else `$ELASTIO_PASSWORD`, else a terminal prompt.
    /// Empty passwords are refused from every source; every copy is wiped when dropped.
    pub fn password(&self, confirm: bool) -> Result<Zeroizing<Vec<u8>>> {
        if self.global.password_stdin {
            let mut line = Zeroizing::new(String::new());
            std::io::stdin().read_line(&mut line)?;
            let trimmed = line.trim_end_matches(['\n', '\r']);
            if trimmed.is_empty() {
                bail!("no password on standard input");
            }
            return Ok(Zeroizing::new(trimmed.as_bytes().to_vec()));
        }
        if let Some(f) = &self.global.password_file {
            let text = Zeroizing::new(
                std::fs::read(f)
                    .with_context(|| format!("cannot read password file {}", f.display()))?,
            );
            warn_if_readable_by_others(f);
            let line = text.split(|b| *b == b'\n').next().unwrap_or(&[]);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                bail!("password file {} is empty", f.display());
            }
            return Ok(Zeroizing::new(line.to_vec()));
        }
        if let Some(p) = std::env::var_os(PASSWORD_ENV) {
            if p.is_empty() {
                bail!("{PASSWORD_ENV} is set but empty: an empty password is refused");
            }
            return Ok(Zeroizing::new(p.into_encoded_bytes()));
        }
        if !std::io::stdin().is_terminal() {
            bail!(
                "no vault password: set {PASSWORD_ENV}, pass --password-file, or run on a terminal"
            );
        }
        let p = Zeroizing::new(rpassword::prompt_password("vault password: ")?);
        if confirm {
            let again = Zeroizing::new(rpassword::prompt_password("repeat password: ")?);
            if *again != *p {
                bail!("the passwords do not match");
            }
        }
        if p.is_empty() {
            bail!("empty password");
        }
        Ok(Zeroizing::new(p.as_bytes().to_vec()))
    }

    /// Opens the vault, asking for the password after checking the format.
    pub fn open_vault(&self) -> Result<Arc<Vault>> {
        let store = self.store()?;
        // Check the format before asking for a password.
        Vault::read_config(store.as_ref())?;
        let password = self.password(false)?;
        Ok(Arc::new(Vault::open(store, &password)?))
    }
}

/// `$XDG_CACHE_HOME/elastio/<vault id>`, else `~/.cache/elastio/<vault id>`.
pub fn cache_dir(vault_id: &str) -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(
            std::env::var_os("HOME")
                .context("$HOME is not set: cannot place the metadata cache")?,
        )
        .join(".cache"),
    };
    Ok(base.join("elastio").join(vault_id))
}

/// A password file others can read is a leaked password: say so (the command goes on, as ssh
/// does for keys only when it would refuse; here refusing would break existing setups).
fn warn_if_readable_by_others(f: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(f) {
        let mode = m.permissions().mode();
        if mode & 0o077 != 0 {
            eprintln!(
                "warning: password file {} is accessible by group or others (mode {:o}); \
                 chmod 600 it",
                f.display(),
                mode & 0o777
            );
        }
    }
}

/// A 0700 directory only this user can write, for mount logs (they name RPs and objects) and
/// the Unix sockets of writable NBD exports:
/// `$XDG_RUNTIME_DIR/elastio`, else `/tmp/elastio-<uid>`. The latter is in a directory anyone
/// can write, so it is created 0700 and then checked with lstat: a directory, ours, 0700 (not
/// a symlink or a directory someone planted to read or redirect our logs or sockets).
#[allow(unsafe_code)]
pub fn private_runtime_dir() -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() && d.is_dir() => d.join("elastio"),
        _ => std::env::temp_dir().join(format!("elastio-{uid}")),
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let m = std::fs::symlink_metadata(&dir)
        .with_context(|| format!("cannot stat {}", dir.display()))?;
    if !m.is_dir() || m.uid() != uid || m.mode() & 0o077 != 0 {
        bail!(
            "{} is not a private directory of this user (a directory, owned by uid {uid}, mode \
             0700); remove it or set XDG_RUNTIME_DIR",
            dir.display()
        );
    }
    Ok(dir)
}

/// An RP id, or `latest` (newest of `kind`, of `asset` when given).
pub fn resolve_rp(
    vault: &Vault,
    spec: &str,
    asset: Option<&str>,
    kind: Option<RpKind>,
) -> Result<RecoveryPoint> {
    if spec == "latest" {
        return vault
            .list_rps()?
            .into_iter()
            .rfind(|rp| {
                kind.is_none_or(|k| rp.kind == k) && asset.is_none_or(|a| rp.asset.name == a)
            })
            .ok_or_else(|| {
                anyhow!(
                    "no {}recovery point{} in vault {}",
                    kind.map(|k| format!("{k} ")).unwrap_or_default(),
                    asset.map(|a| format!(" of asset {a}")).unwrap_or_default(),
                    vault.location()
                )
            });
    }
    let id: RecoveryPointId = spec.parse()?;
    let rp = vault.get_rp(&id)?;
    if let Some(k) = kind {
        if rp.kind != k {
            bail!(
                "recovery point {id} is a {} recovery point, not {k}",
                rp.kind
            );
        }
    }
    Ok(rp)
}
