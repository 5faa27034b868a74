//! Scan reports: what an integrity scan (`elastio iscan`) found in an RP, kept in the vault
//! beside it as immutable objects `scans/<rp-id>/<ulid>` (sealed JSON, aad `"scan:"+key`,
//! written create-only). An RP may be scanned again (new rules); its status is its newest
//! report's. The engine stores and lists reports; what a scan looks for is the scanner's
//! business, so the body beyond the summary is opaque JSON here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::scan_aad;
use crate::ids::RecoveryPointId;
use crate::store::PutMode;
use crate::vault::Vault;

/// The verdict of a report that found nothing.
pub const CLEAN: &str = "clean";

/// One scan of one RP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanReport {
    pub rp: RecoveryPointId,
    /// RFC 3339, when the scan finished.
    pub time: String,
    /// `clean`, `ransomware`, `malware`, `ransomware+malware` or `damaged`.
    pub verdict: String,
    /// The ransomware score (the threshold is in `report`).
    pub score: u32,
    /// The RP the scan compared with (None: a full scan).
    pub baseline: Option<RecoveryPointId>,
    /// Findings, counters and thresholds, as the scanner wrote them.
    pub report: serde_json::Value,
}

impl ScanReport {
    pub fn is_clean(&self) -> bool {
        self.verdict == CLEAN
    }
}

/// Whether `key` is a name [`Vault::put_scan`] writes: `scans/<rp>/<lower-case ulid>`.
pub(crate) fn is_canonical_scan_key(key: &str) -> Option<RecoveryPointId> {
    let rest = key.strip_prefix("scans/")?;
    let (rp, u) = rest.split_once('/')?;
    let rp = RecoveryPointId::from_object_name(rp)?;
    let ok = ulid::Ulid::from_string(u)
        .ok()
        .is_some_and(|p| p.to_string().to_ascii_lowercase() == u);
    ok.then_some(rp)
}

impl Vault {
    /// Stores a report of RP `report.rp` (which must exist); returns its key.
    pub fn put_scan(&self, report: &ScanReport) -> Result<String> {
        self.get_rp(&report.rp)?;
        let key = format!(
            "{}{}",
            report.rp.scans_prefix(),
            ulid::Ulid::new().to_string().to_ascii_lowercase()
        );
        let body = serde_json::to_vec(report).expect("serialisable");
        let sealed = self.keys().seal(&scan_aad(&key), &body, None);
        self.store().put(&key, &sealed, PutMode::Create)?;
        Ok(key)
    }

    fn read_scan(&self, key: &str, rp: &RecoveryPointId) -> Result<Option<ScanReport>> {
        let sealed = match self.store().get(key) {
            Ok(s) => s,
            // Deleted with its RP since the listing.
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let plain = self
            .keys()
            .open(&scan_aad(key), &sealed)
            .map_err(|e| self.corrupt(key, e.to_string()))?;
        let report: ScanReport =
            serde_json::from_slice(&plain).map_err(|e| self.corrupt(key, e.to_string()))?;
        if &report.rp != rp {
            return Err(self.corrupt(key, format!("holds a report of {}", report.rp)));
        }
        Ok(Some(report))
    }

    /// The reports of RP `rp`, oldest first.
    pub fn scans_of(&self, rp: &RecoveryPointId) -> Result<Vec<ScanReport>> {
        let mut keys: Vec<String> = self
            .store()
            .list(&rp.scans_prefix())?
            .into_iter()
            .map(|o| o.key)
            .filter(|k| is_canonical_scan_key(k).as_ref() == Some(rp))
            .collect();
        keys.sort();
        let mut out = Vec::new();
        for k in keys {
            out.extend(self.read_scan(&k, rp)?);
        }
        Ok(out)
    }

    /// Each scanned RP's newest report (one listing of `scans/`, one read per RP).
    pub fn latest_scans(&self) -> Result<BTreeMap<RecoveryPointId, ScanReport>> {
        let mut newest: BTreeMap<RecoveryPointId, String> = BTreeMap::new();
        for obj in self.store().list("scans/")? {
            let Some(rp) = is_canonical_scan_key(&obj.key) else {
                tracing::warn!(key = %obj.key, "ignoring a scan object whose name is not canonical");
                continue;
            };
            let slot = newest.entry(rp).or_default();
            if obj.key > *slot {
                *slot = obj.key;
            }
        }
        let mut out = BTreeMap::new();
        for (rp, key) in newest {
            match self.read_scan(&key, &rp) {
                Ok(Some(r)) => {
                    out.insert(rp, r);
                }
                Ok(None) => {}
                Err(e @ Error::Corrupt { .. }) => {
                    // A damaged or planted report must not make an RP look clean, nor stop the
                    // listing: the RP shows as unscanned and check names the object.
                    tracing::warn!("{e}");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_scan_keys() {
        let rp = RecoveryPointId::generate();
        let u = ulid::Ulid::new().to_string();
        assert_eq!(
            is_canonical_scan_key(&format!("scans/{rp}/{}", u.to_ascii_lowercase())),
            Some(rp.clone())
        );
        assert_eq!(is_canonical_scan_key(&format!("scans/{rp}/{u}")), None);
        assert_eq!(is_canonical_scan_key(&format!("scans/{rp}/x")), None);
        assert_eq!(is_canonical_scan_key(&format!("tags/{rp}/{u}")), None);
    }
}
