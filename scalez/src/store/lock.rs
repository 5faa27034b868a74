//! S3 Object Lock: what a store that keeps versions under retention offers on top of
//! [`ObjectStore`](super::ObjectStore).
//!
//! Model (S3's): the bucket is versioned; a put makes a new version, a plain delete hides the
//! key behind a delete marker, and only deleting a *version* destroys bytes, which S3 refuses
//! while that version's retain-until date is in the future (in compliance mode, for everyone;
//! in governance mode, for everyone without the bypass permission, which elastio never uses).
//! A locked vault writes every object (but `leases/` and `locks/`, which are scratch) with the
//! vault's mode and a retain-until date of now + retention; prune extends the dates of what is
//! still live and destroys hidden versions only once their locks have expired
//! ([`crate::immutable`]).

use std::time::{Duration, SystemTime};

use super::StoreError;

/// S3's two Object Lock modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Versions cannot be destroyed before their date except by principals granted
    /// `s3:BypassGovernanceRetention`.
    Governance,
    /// Versions cannot be destroyed before their date by anyone, root included.
    Compliance,
}

impl LockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Governance => "governance",
            LockMode::Compliance => "compliance",
        }
    }
}

impl std::fmt::Display for LockMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a locked vault writes: mode and how long each version is kept at least.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockPolicy {
    pub mode: LockMode,
    pub retention: Duration,
}

/// Key prefixes written without a lock: scratch objects overwritten or deleted in normal work.
pub const UNLOCKED_PREFIXES: &[&str] = &["leases/", "locks/"];

/// Whether a vault key is written under the lock.
pub fn is_locked_key(key: &str) -> bool {
    !UNLOCKED_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// One version of an object, or a delete marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectVersion {
    /// Vault key (the store's prefix removed).
    pub key: String,
    pub version_id: String,
    /// The version a plain GET returns (or the marker that hides the key).
    pub is_latest: bool,
    pub is_delete_marker: bool,
    pub size: u64,
    pub modified: Option<SystemTime>,
    /// The server's ETag (an MD5 of the bytes for a single-part put): tells versions apart.
    pub etag: Option<String>,
}

/// The keys a vault writes (FORMAT.md): lock upkeep and repairs touch nothing else.
pub fn is_vault_key(key: &str) -> bool {
    key == "config"
        || [
            "keys/", "catalog/", "tags/", "scans/", "index/", "packs/", "gc/", "leases/", "locks/",
        ]
        .iter()
        .any(|p| key.starts_with(p))
}

/// The bucket's Object Lock configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketLock {
    pub enabled: bool,
    /// A default retention the bucket applies to puts without their own.
    pub default: Option<(LockMode, Duration)>,
}

/// What a store with Object Lock does besides the [`ObjectStore`](super::ObjectStore)
/// operations. Every method speaks of vault keys.
pub trait ObjectLockStore: Send + Sync {
    /// From now on, puts of locked keys carry this mode and a date of now + retention.
    fn set_policy(&self, policy: LockPolicy);
    fn policy(&self) -> Option<LockPolicy>;
    /// The bucket's lock configuration (`enabled: false` if it has none).
    fn bucket_lock(&self) -> Result<BucketLock, StoreError>;
    /// Creates the bucket with Object Lock if it does not exist; an existing bucket must have
    /// it enabled.
    fn ensure_lock_bucket(&self) -> Result<(), StoreError>;
    /// Every version and delete marker under `prefix`, sorted by key, the latest first per key,
    /// then newest first (ties in the listing's order).
    fn versions(&self, prefix: &str) -> Result<Vec<ObjectVersion>, StoreError>;
    /// The mode and retain-until date of one version (None: not locked).
    fn retention(
        &self,
        key: &str,
        version_id: &str,
    ) -> Result<Option<(LockMode, SystemTime)>, StoreError>;
    /// Moves a version's retain-until date to `until` (later only) in the policy's mode.
    fn extend(&self, key: &str, version_id: &str, until: SystemTime) -> Result<(), StoreError>;
    /// Destroys one version or delete marker; [`StoreError::Remote`] (access denied) while it
    /// is locked.
    fn delete_version(&self, key: &str, version_id: &str) -> Result<(), StoreError>;
    /// The bytes of one version (to restore what an attacker hid or overwrote).
    fn get_version(&self, key: &str, version_id: &str) -> Result<Vec<u8>, StoreError>;
    /// Bytes `range` of one version (inside it).
    fn get_version_range(
        &self,
        key: &str,
        version_id: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<u8>, StoreError>;
    /// Makes version `version_id` of `key` current again: a server-side copy of it as a new
    /// version (locked like any put).
    fn restore_version(&self, key: &str, version_id: &str) -> Result<(), StoreError>;
}

/// The longest retention a vault may have (100 years).
pub const MAX_RETENTION_SECS: u64 = 100 * 365 * 86400;

/// Parses a retention such as `30d`, `12h`, `90s` (days, hours, minutes, seconds; `y` = 365
/// days): at least one second, at most 100 years.
pub fn parse_retention(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a retention like 30d, 12h or 90s"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" | "" => 86400,
        "y" => 365 * 86400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h, d or y")),
    };
    let total = n
        .checked_mul(secs)
        .filter(|&t| (1..=MAX_RETENTION_SECS).contains(&t))
        .ok_or_else(|| format!("{s:?}: a retention is between 1 second and 100 years"))?;
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retentions_parse() {
        assert_eq!(
            parse_retention("30d").unwrap(),
            Duration::from_secs(30 * 86400)
        );
        assert_eq!(parse_retention("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_retention("7").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_retention("2h").unwrap(), Duration::from_secs(7200));
        for bad in ["", "0s", "d", "5w", "101y", "99999999999999999999d", "-3d"] {
            assert!(parse_retention(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scratch_keys_are_not_locked() {
        assert!(!is_locked_key("leases/01abc"));
        assert!(!is_locked_key("locks/probe-00"));
        assert!(is_locked_key("packs/00/0011"));
        assert!(is_locked_key("config"));
    }
}
