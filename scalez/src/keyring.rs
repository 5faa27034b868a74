//! Key files (`keys/<id>`): the master key wrapped under a password (Argon2id, see FORMAT.md).
//! There may be several (one per password); opening tries them until one unwraps.

use crate::crypto::{KeyFile, MasterKey};
use crate::error::{Error, Result};
use crate::store::ObjectStore;

/// Key files are ~300 bytes of JSON; anything over this is not one (and is not read).
const MAX_KEY_FILE: u64 = 64 << 10;

/// Unwraps the vault's master key with `password` from whichever key file it opens.
///
/// Key files are not authenticated until one unwraps: a damaged or planted one (junk, absurd KDF
/// parameters, any size) is skipped and reported, never fatal, so one bad object cannot lock
/// everyone out. Only when every key file is damaged is that an error of its own.
pub(crate) fn unlock(
    store: &dyn ObjectStore,
    password: &[u8],
    vault_id: &str,
) -> Result<MasterKey> {
    let location = store.location();
    let key_objects = store.list("keys/")?;
    let mut damaged: Vec<(String, String)> = Vec::new();
    let mut candidates: Vec<(String, KeyFile)> = Vec::new();
    for k in &key_objects {
        if k.size > MAX_KEY_FILE {
            damaged.push((k.key.clone(), format!("{} bytes: not a key file", k.size)));
            continue;
        }
        let raw = store.get(&k.key)?;
        match serde_json::from_slice::<KeyFile>(&raw) {
            Ok(kf) => candidates.push((k.key.clone(), kf)),
            Err(e) => damaged.push((k.key.clone(), format!("not a key file: {e}"))),
        }
    }
    unwrap_order(&mut candidates);
    let mut master = None;
    for (key, kf) in candidates {
        match kf.unwrap_key(password, vault_id) {
            Ok(Some(m)) => {
                master = Some(m);
                break;
            }
            Ok(None) => {}
            Err(detail) => damaged.push((key, detail)),
        }
    }
    for (key, detail) in &damaged {
        tracing::warn!("{location}: skipping key file {key}: {detail}");
    }
    match master {
        Some(m) => Ok(m),
        None if damaged.len() == key_objects.len() && !damaged.is_empty() => {
            let (key, detail) = damaged.swap_remove(0);
            Err(Error::Corrupt {
                location,
                key,
                detail: format!("{detail} (and no other key file is usable)"),
            })
        }
        None => Err(Error::WrongPassword {
            location,
            keys: key_objects.len() - damaged.len(),
        }),
    }
}

/// The order key files are tried in: cheapest KDF first (memory times passes, over the lanes
/// that run at once here), then by name. Key files are unauthenticated until one unwraps: the
/// vault's own (default parameters) so come before planted ones made expensive (within the
/// caps) to slow every open down.
pub(crate) fn unwrap_order(candidates: &mut [(String, KeyFile)]) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    candidates.sort_by_cached_key(|(key, kf)| {
        let p = &kf.params;
        let at_once = u64::from(p.parallelism).clamp(1, cores);
        (
            u64::from(p.memory_kib) * u64::from(p.iterations) / at_once,
            key.clone(),
        )
    });
}
