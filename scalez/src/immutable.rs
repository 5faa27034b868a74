//! Keeping a locked vault locked (S3 Object Lock; the store side is [`crate::store::lock`]).
//!
//! Invariants, kept by every prune of a locked vault ([`maintain`]):
//! * **What is live stays locked.** Every current version of a locked key (everything but
//!   `leases/` and `locks/`) whose retain-until date is less than half the retention away is
//!   extended to now + retention. So a live object can never be destroyed, whoever holds the
//!   credentials.
//! * **Hidden versions are destroyed only late.** Prune's deletions (and anyone else's) only
//!   hide a key behind a delete marker. Its versions are destroyed once the marker is older
//!   than the retention *and* their own locks have expired, so whatever was hidden can be
//!   brought back (`--point-in-time`) for at least one retention period. Until then they are
//!   reported as postponed, never an error.
//! * **Signs of tampering are never cleaned up.** A locked key with more than one object
//!   version (elastio writes each of them once), or a hidden pack that the index still names,
//!   is reported and left alone.
//!
//! Scratch keys (`leases/`, `locks/`) are written unlocked; their old versions and markers are
//! destroyed as soon as they are hidden or replaced.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::Result;
use crate::store::lock::{is_locked_key, ObjectLockStore, ObjectVersion};
use crate::vault::Vault;

/// What [`maintain`] did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LockReport {
    pub mode: String,
    pub retention_secs: u64,
    /// Versions (and markers) listed.
    pub versions: usize,
    /// Current versions whose retain-until date was moved to now + retention.
    pub extended: usize,
    /// Hidden or replaced versions destroyed.
    pub destroyed: usize,
    pub destroyed_bytes: u64,
    /// Hidden versions kept until their marker is a retention old and their lock expired.
    pub postponed: usize,
    pub postponed_bytes: u64,
    /// When the earliest postponed version can go (RFC 3339).
    pub next_release: Option<String>,
    /// Keys left alone because they look tampered with (see the module doc).
    pub tampered: Vec<String>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Runs the invariants above over every version in the vault. `indexed_packs`: the pack keys
/// the index still names. Does nothing (None) on a vault without Object Lock.
pub fn maintain(
    vault: &Vault,
    indexed_packs: &HashSet<String>,
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
    for group in versions.chunk_by(|a, b| a.key == b.key) {
        let key = &group[0].key;
        let latest = group.iter().find(|v| v.is_latest).unwrap_or(&group[0]);
        let objects: Vec<&ObjectVersion> = group.iter().filter(|v| !v.is_delete_marker).collect();
        if !is_locked_key(key) {
            // Scratch: keep the current object only.
            for v in group.iter().filter(|v| !v.is_latest || v.is_delete_marker) {
                destroy(lock, v, dry_run, &mut report);
            }
            continue;
        }
        if !latest.is_delete_marker {
            if objects.len() > 1 {
                report.tampered.push(format!(
                    "{key}: {} versions of an object written once",
                    objects.len()
                ));
            }
            extend(lock, latest, retention, now, dry_run, &mut report)?;
            continue;
        }
        // Hidden.
        if key.starts_with("packs/") && indexed_packs.contains(key) {
            report
                .tampered
                .push(format!("{key}: hidden, but the index still names it"));
            continue;
        }
        let hidden_at = latest.modified.unwrap_or(now);
        let grace_ends = hidden_at + retention;
        let mut kept = false;
        for v in &objects {
            let until = lock
                .retention(&v.key, &v.version_id)?
                .map(|(_, u)| u)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let release = until.max(grace_ends);
            if release > now {
                kept = true;
                report.postponed += 1;
                report.postponed_bytes += v.size;
                next = Some(next.map_or(release, |n| n.min(release)));
            } else {
                destroy(lock, v, dry_run, &mut report);
            }
        }
        if !kept {
            // Nothing left under the markers: they go too (a marker over nothing hides nothing).
            for v in group.iter().filter(|v| v.is_delete_marker) {
                destroy(lock, v, dry_run, &mut report);
            }
        }
    }
    report.next_release = next.map(rfc3339);
    Ok(Some(report))
}

/// Moves a live version's lock to now + retention when less than half of it is left.
fn extend(
    lock: &dyn ObjectLockStore,
    v: &ObjectVersion,
    retention: Duration,
    now: SystemTime,
    dry_run: bool,
    report: &mut LockReport,
) -> Result<()> {
    // Written (and so locked until write + retention) less than half a retention ago.
    if v.modified.is_some_and(|m| m + retention / 2 > now) {
        return Ok(());
    }
    let until = lock
        .retention(&v.key, &v.version_id)?
        .map(|(_, u)| u)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if until > now + retention / 2 {
        return Ok(());
    }
    if !dry_run {
        lock.extend(&v.key, &v.version_id, now + retention)?;
    }
    report.extended += 1;
    Ok(())
}

/// Destroys a version; one still locked (S3 refuses) is counted as postponed instead.
fn destroy(lock: &dyn ObjectLockStore, v: &ObjectVersion, dry_run: bool, report: &mut LockReport) {
    if dry_run {
        report.destroyed += 1;
        report.destroyed_bytes += v.size;
        return;
    }
    match lock.delete_version(&v.key, &v.version_id) {
        Ok(()) => {
            report.destroyed += 1;
            report.destroyed_bytes += v.size;
        }
        Err(e) => {
            tracing::warn!("{} version {}: not destroyed: {e}", v.key, v.version_id);
            report.postponed += 1;
            report.postponed_bytes += v.size;
        }
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
    /// Keys overwritten since then, whose old version was copied back as the current one.
    pub restored: Vec<String>,
    /// Keys unchanged since then.
    pub unchanged: usize,
    /// Keys created since then (later backups): left as they are.
    pub newer: usize,
}

/// Undoes deletions and overwrites since `at` (a versioned store): every key that existed then
/// is made current again in the version it had, by removing the delete markers above it or,
/// where newer versions were written, by copying it back. Keys created since are kept. Works on
/// the raw store, so it repairs a vault too damaged to open.
pub fn restore_versions(
    store: &dyn crate::store::ObjectStore,
    at: SystemTime,
    dry_run: bool,
    progress: &dyn Fn(&str),
) -> Result<RestoreVersionsReport> {
    let lock = store.object_lock().ok_or_else(|| {
        crate::error::Error::InvalidParameter(format!(
            "{}: only a versioned S3 bucket keeps old versions",
            store.location()
        ))
    })?;
    progress("listing versions");
    let versions = lock.versions("")?;
    let mut report = RestoreVersionsReport {
        at: rfc3339(at),
        ..RestoreVersionsReport::default()
    };
    for group in versions.chunk_by(|a, b| a.key == b.key) {
        let key = &group[0].key;
        if !is_locked_key(key) {
            continue;
        }
        let latest = group.iter().find(|v| v.is_latest).unwrap_or(&group[0]);
        let Some(wanted) = crate::store::point_in_time::version_at(group.iter(), at) else {
            if !latest.is_delete_marker {
                report.newer += 1;
            }
            continue;
        };
        if latest.version_id == wanted.version_id {
            report.unchanged += 1;
            continue;
        }
        let newer: Vec<&ObjectVersion> = group
            .iter()
            .filter(|v| v.modified > wanted.modified)
            .collect();
        if newer.iter().all(|v| v.is_delete_marker) {
            if !dry_run {
                for m in &newer {
                    lock.delete_version(key, &m.version_id)?;
                }
            }
            report.unhidden.push(key.clone());
        } else {
            if !dry_run {
                lock.restore_version(key, &wanted.version_id)?;
            }
            report.restored.push(key.clone());
        }
    }
    Ok(report)
}
