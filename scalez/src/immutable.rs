//! Keeping a locked vault locked (S3 Object Lock; the store side is [`crate::store::lock`]).
//!
//! Invariants, kept by every prune of a locked vault ([`maintain`], which runs before prune
//! deletes anything):
//! * **What is live stays locked.** Every current version of a locked key (everything but
//!   `leases/` and `locks/`) whose retain-until date is less than half the retention away is
//!   extended to now + retention. So a live object can never be destroyed, whoever holds the
//!   credentials.
//! * **Hidden versions are destroyed only late.** Prune's deletions (and anyone else's) only
//!   hide a key behind a delete marker. A hidden key's one version is destroyed once the marker
//!   is older than the retention *and* its own lock has expired, so whatever was hidden can be
//!   brought back (`--point-in-time`) for at least one retention period. Until then it is
//!   reported as postponed, never an error.
//! * **Signs of tampering stop deletion.** elastio writes each object once (a repair copies the
//!   first version back), so a key whose current bytes differ from its first version's (by
//!   ETag) was overwritten: prune then deletes nothing, every version of that key is kept
//!   locked, and the keys are named. A hidden key with several versions, and a hidden pack the
//!   index still names, are never destroyed and stay locked.
//! * **One bad key does not stop the upkeep.** Errors are collected per key; keys outside the
//!   vault's namespace are ignored.
//!
//! Scratch keys (`leases/`, `locks/`) are written unlocked; their old versions and markers are
//! destroyed as soon as they are hidden or replaced (markers last).

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::Result;
use crate::store::lock::{is_locked_key, is_vault_key, ObjectLockStore, ObjectVersion};
use crate::vault::Vault;

/// Errors listed in a report at most (the count goes on).
const MAX_LISTED: usize = 20;

/// What [`maintain`] did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LockReport {
    pub mode: String,
    pub retention_secs: u64,
    /// Versions (and markers) listed.
    pub versions: usize,
    /// Versions whose retain-until date was moved to now + retention.
    pub extended: usize,
    /// Hidden or replaced versions destroyed.
    pub destroyed: usize,
    pub destroyed_bytes: u64,
    /// Hidden versions kept until their marker is a retention old and their lock expired.
    pub postponed: usize,
    pub postponed_bytes: u64,
    /// When the earliest postponed version can go (RFC 3339).
    pub next_release: Option<String>,
    /// Keys overwritten since they were written: while there is one, prune deletes nothing.
    pub tampered: Vec<String>,
    /// Hidden keys kept for good (several versions, or a pack the index names).
    pub kept: Vec<String>,
    /// Keys the upkeep failed on (it went on with the others), and how many in all.
    pub errors: Vec<String>,
    pub error_count: usize,
}

impl LockReport {
    fn error(&mut self, key: &str, e: impl std::fmt::Display) {
        self.error_count += 1;
        if self.errors.len() < MAX_LISTED {
            self.errors.push(format!("{key}: {e}"));
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A key's object versions, newest first (markers left out).
fn objects(group: &[ObjectVersion]) -> Vec<&ObjectVersion> {
    group.iter().filter(|v| !v.is_delete_marker).collect()
}

/// Whether a key's current bytes are not the ones first written (see the module doc). ETags
/// decide when they match; when they differ (they are no MD5 under SSE-KMS or SSE-C, so a
/// repaired key's do too), the bytes of both versions are compared.
pub fn overwritten(lock: &dyn ObjectLockStore, group: &[ObjectVersion]) -> Result<bool> {
    let objs = objects(group);
    let (Some(latest), Some(first)) = (group.first(), objs.last()) else {
        return Ok(false);
    };
    if latest.is_delete_marker || objs.len() < 2 {
        return Ok(false);
    }
    if latest.etag.is_some() && latest.etag == first.etag {
        return Ok(false);
    }
    let now = lock.get_version(&latest.key, &latest.version_id)?;
    let then = lock.get_version(&first.key, &first.version_id)?;
    Ok(now != then)
}

/// Runs the invariants above over every version in the vault. `indexed_packs`: the pack keys
/// the index names. `destroy`: whether hidden versions may be destroyed at all (not when the
/// index could not be read). Does nothing (None) on a vault without Object Lock.
pub fn maintain(
    vault: &Vault,
    indexed_packs: &HashSet<String>,
    destroy: bool,
    dry_run: bool,
    progress: &dyn Fn(&str),
) -> Result<Option<LockReport>> {
    let Some(lock) = vault.store().object_lock() else {
        return Ok(None);
    };
    let Some(policy) = lock.policy() else {
        return Ok(None);
    };
    progress("checking object locks");
    let now = SystemTime::now();
    let retention = policy.retention;
    let mut report = LockReport {
        mode: policy.mode.to_string(),
        retention_secs: retention.as_secs(),
        ..LockReport::default()
    };
    let versions = lock.versions("")?;
    report.versions = versions.len();
    let mut next: Option<SystemTime> = None;
    // First, tampering: while there is any, nothing at all is destroyed.
    let mut tampered: HashSet<&str> = HashSet::new();
    for group in versions.chunk_by(|a, b| a.key == b.key) {
        let key = &group[0].key;
        if !is_vault_key(key) || !is_locked_key(key) {
            continue;
        }
        match overwritten(lock, group) {
            Ok(false) => {}
            Ok(true) => {
                tampered.insert(key);
            }
            Err(e) => {
                // Undecided: treated as tampered (nothing destroyed), and said.
                tampered.insert(key);
                report.error(key, e);
            }
        }
    }
    let destroy = destroy && tampered.is_empty();
    let mut up = Upkeep {
        lock,
        retention,
        now,
        dry_run,
        destroy,
        report: &mut report,
    };
    for group in versions.chunk_by(|a, b| a.key == b.key) {
        let key = &group[0].key;
        if !is_vault_key(key) {
            continue;
        }
        let latest = &group[0];
        if !is_locked_key(key) {
            // Scratch: keep the current object only; markers go last.
            let (markers, objs): (Vec<_>, Vec<_>) = group.iter().partition(|v| v.is_delete_marker);
            for v in objs.into_iter().filter(|v| !v.is_latest).chain(markers) {
                up.destroy(v);
            }
            continue;
        }
        let objs = objects(group);
        if !latest.is_delete_marker {
            if tampered.contains(key.as_str()) {
                up.report.tampered.push(format!(
                    "{key}: overwritten ({} versions, the current one differs from the first)",
                    objs.len()
                ));
                // Every version stays: the first is the one to bring back.
                for v in &objs {
                    up.extend(v, false);
                }
            } else {
                up.extend(latest, objs.len() == 1);
            }
            continue;
        }
        // Hidden.
        if objs.len() > 1 || (key.starts_with("packs/") && indexed_packs.contains(key)) {
            up.report.kept.push(match objs.len() {
                1 => format!("{key}: hidden, but the index still names it"),
                n => format!("{key}: hidden, with {n} versions"),
            });
            for v in &objs {
                up.extend(v, false);
            }
            continue;
        }
        let grace_ends = latest.modified.unwrap_or(now) + retention;
        let mut kept = false;
        for v in &objs {
            if grace_ends > now {
                kept = true;
                up.report.postponed += 1;
                up.report.postponed_bytes += v.size;
                next = Some(next.map_or(grace_ends, |n| n.min(grace_ends)));
                continue;
            }
            match lock.retention(&v.key, &v.version_id) {
                Ok(Some((_, until))) if until > now => {
                    kept = true;
                    up.report.postponed += 1;
                    up.report.postponed_bytes += v.size;
                    next = Some(next.map_or(until, |n| n.min(until)));
                }
                Ok(_) => kept |= !up.destroy(v),
                Err(e) => {
                    kept = true;
                    up.report.error(key, e);
                }
            }
        }
        if !kept {
            // Nothing left under the markers: they go too (a marker over nothing hides nothing).
            for v in group.iter().filter(|v| v.is_delete_marker) {
                up.destroy(v);
            }
        }
    }
    report.next_release = next.map(rfc3339);
    Ok(Some(report))
}

/// The upkeep of one prune.
struct Upkeep<'a> {
    lock: &'a dyn ObjectLockStore,
    retention: Duration,
    now: SystemTime,
    dry_run: bool,
    /// Whether anything may be destroyed in this run (see [`maintain`]).
    destroy: bool,
    report: &'a mut LockReport,
}

impl Upkeep<'_> {
    /// Moves a version's lock to now + retention when less than half of it is left.
    /// `trust_age`: a version written (locked until write + retention) less than half a
    /// retention ago needs no look.
    fn extend(&mut self, v: &ObjectVersion, trust_age: bool) {
        let half = self.retention / 2;
        if trust_age && v.modified.is_some_and(|m| m + half > self.now) {
            return;
        }
        let until = match self.lock.retention(&v.key, &v.version_id) {
            Ok(r) => r.map(|(_, u)| u).unwrap_or(SystemTime::UNIX_EPOCH),
            Err(e) => return self.report.error(&v.key, e),
        };
        if until > self.now + half {
            return;
        }
        if !self.dry_run {
            if let Err(e) = self
                .lock
                .extend(&v.key, &v.version_id, self.now + self.retention)
            {
                return self.report.error(&v.key, e);
            }
        }
        self.report.extended += 1;
    }

    /// Destroys a version; whether it went (a refusal is an error in the report). In a run
    /// that may destroy nothing, it is counted as postponed.
    fn destroy(&mut self, v: &ObjectVersion) -> bool {
        if !self.destroy {
            self.report.postponed += 1;
            self.report.postponed_bytes += v.size;
            return false;
        }
        if !self.dry_run {
            if let Err(e) = self.lock.delete_version(&v.key, &v.version_id) {
                self.report.error(&v.key, e);
                return false;
            }
        }
        self.report.destroyed += 1;
        self.report.destroyed_bytes += v.size;
        true
    }
}

/// What `vault lock status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct LockStatus {
    pub mode: String,
    pub retention_secs: u64,
    pub bucket_lock_enabled: bool,
    /// The bucket's own default retention, if any ("mode days").
    pub bucket_default: Option<String>,
    /// Current versions of locked keys.
    pub objects: usize,
    /// Of those, the ones not locked now (an expired or missing lock: destroyable).
    pub unlocked: Vec<String>,
    /// The earliest retain-until date of a current version (RFC 3339).
    pub oldest_lock_expires: Option<String>,
    pub hidden_versions: usize,
}

/// The lock state of every current object of a locked vault (one HEAD each). None without
/// Object Lock.
pub fn status(vault: &Vault, progress: &dyn Fn(&str)) -> Result<Option<LockStatus>> {
    let Some(lock) = vault.store().object_lock() else {
        return Ok(None);
    };
    let Some(policy) = lock.policy() else {
        return Ok(None);
    };
    let bucket = lock.bucket_lock()?;
    let versions = lock.versions("")?;
    let now = SystemTime::now();
    let mut st = LockStatus {
        mode: policy.mode.to_string(),
        retention_secs: policy.retention.as_secs(),
        bucket_lock_enabled: bucket.enabled,
        bucket_default: bucket
            .default
            .map(|(m, d)| format!("{m} {} days", d.as_secs() / 86400)),
        objects: 0,
        unlocked: Vec::new(),
        oldest_lock_expires: None,
        hidden_versions: 0,
    };
    let current: Vec<&ObjectVersion> = versions
        .iter()
        .filter(|v| v.is_latest && !v.is_delete_marker && is_locked_key(&v.key))
        .collect();
    st.hidden_versions = versions.iter().filter(|v| !v.is_latest).count();
    progress(&format!("reading the locks of {} objects", current.len()));
    let mut oldest: Option<SystemTime> = None;
    for v in current {
        st.objects += 1;
        match lock.retention(&v.key, &v.version_id)? {
            Some((_, until)) if until > now => {
                oldest = Some(oldest.map_or(until, |o| o.min(until)));
            }
            _ => st.unlocked.push(v.key.clone()),
        }
    }
    st.oldest_lock_expires = oldest.map(rfc3339);
    Ok(Some(st))
}

/// What [`restore_versions`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreVersionsReport {
    pub at: String,
    /// Keys hidden since then, shown again (the newer delete markers removed).
    pub unhidden: Vec<String>,
    /// Keys overwritten since then, made current again as they were (the newer versions
    /// destroyed, or where they are locked, the old version copied back on top).
    pub restored: Vec<String>,
    /// Keys unchanged since then.
    pub unchanged: usize,
    /// Keys created since then (later backups, or planted): kept, and named.
    pub newer: Vec<String>,
    pub newer_count: usize,
    /// Keys the repair failed on (it went on with the others).
    pub errors: Vec<String>,
    /// The moment is more than one retention ago: versions from before it may be gone.
    pub warning: Option<String>,
}

/// Undoes deletions and overwrites since `at` (a versioned store): every key that existed then
/// is made current again in the version it had, by removing the delete markers above it and the
/// versions written since (or, where those are locked, copying it back under `policy`'s lock).
/// Keys created since are kept and named. Works on the raw store, so it repairs a vault too
/// damaged to open.
pub fn restore_versions(
    store: &dyn crate::store::ObjectStore,
    at: SystemTime,
    policy: Option<crate::store::lock::LockPolicy>,
    dry_run: bool,
    progress: &dyn Fn(&str),
) -> Result<RestoreVersionsReport> {
    let lock = store.object_lock().ok_or_else(|| {
        crate::error::Error::InvalidParameter(format!(
            "{}: only a versioned S3 bucket keeps old versions",
            store.location()
        ))
    })?;
    // Copies must be locked like everything else.
    if let Some(p) = policy {
        lock.set_policy(p);
    }
    progress("listing versions");
    let versions = lock.versions("")?;
    let mut report = RestoreVersionsReport {
        at: rfc3339(at),
        ..RestoreVersionsReport::default()
    };
    if let Some(p) = policy {
        if SystemTime::now().duration_since(at).unwrap_or_default() > p.retention {
            report.warning = Some(format!(
                "{} is more than one retention ({}) ago: versions from before it may have been \
                 destroyed since, and the repair may be partial",
                report.at,
                humantime::format_duration(p.retention)
            ));
        }
    }
    for group in versions.chunk_by(|a, b| a.key == b.key) {
        let key = &group[0].key;
        if !is_locked_key(key) || !is_vault_key(key) {
            continue;
        }
        let latest = &group[0];
        // Newest first: the first version at or before the moment is the one it had.
        let Some(pos) = crate::store::point_in_time::position_at(group, at) else {
            if !latest.is_delete_marker {
                report.newer_count += 1;
                if report.newer.len() < 50 {
                    report.newer.push(key.clone());
                }
            }
            continue;
        };
        if pos == 0 {
            report.unchanged += 1;
            continue;
        }
        let (newer, wanted) = (&group[..pos], &group[pos]);
        let hidden_only = newer.iter().all(|v| v.is_delete_marker);
        let mut failed: Option<String> = None;
        if !dry_run {
            for v in newer {
                if let Err(e) = lock.delete_version(key, &v.version_id) {
                    failed = Some(format!("version {} not destroyed: {e}", v.version_id));
                    break;
                }
            }
            if let (Some(why), false) = (&failed, hidden_only) {
                // A newer version is locked: bring the old state back on top of it (the bytes,
                // or a delete marker if the key was hidden then).
                let back = if wanted.is_delete_marker {
                    store.delete(key)
                } else {
                    lock.restore_version(key, &wanted.version_id)
                };
                failed = back
                    .err()
                    .map(|e| format!("{why}; bringing the old version back failed: {e}"));
            }
        }
        match failed {
            Some(e) => report.errors.push(format!("{key}: {e}")),
            None if hidden_only => report.unhidden.push(key.clone()),
            None => report.restored.push(key.clone()),
        }
    }
    Ok(report)
}
