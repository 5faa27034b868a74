//! Scan reports: what an integrity scan (`elastio iscan`) found in an RP, kept in the vault
//! beside it as immutable objects `scans/<rp-id>/<ulid>` (sealed JSON, aad `"scan:"+key`,
//! written create-only). An RP may be scanned again (new rules). Its **status** is its newest
//! report that is not clean, if any, else its newest report: a later scan with weaker rules
//! cannot wash a finding away. The engine stores and lists reports; what a scan looks for is the
//! scanner's business, so the body beyond the summary is opaque JSON here.
//!
//! Listing reads only the reports of RPs in the catalog (at most [`MAX_REPORTS`] per RP, the
//! newest), and skips (with a warning; `check` names them) objects that do not authenticate, so
//! planted objects under `scans/` cost a listing entry each, never a read or a failure.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::scan_aad;
use crate::ids::RecoveryPointId;
use crate::store::PutMode;
use crate::vault::Vault;

/// The verdict of a report that found nothing.
pub const CLEAN: &str = "clean";

/// The verdict standing for a report that does not read.
pub const UNREADABLE: &str = "unreadable";

/// Reports of one RP read for its status at most (the newest).
pub const MAX_REPORTS: usize = 64;

/// A report's largest sealed size (findings are capped by the scanner well below it).
pub const MAX_REPORT_BYTES: usize = 64 << 20;

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

    /// The status of an RP with these reports (oldest first): the newest that is not clean,
    /// else the newest.
    pub fn status_of(reports: &[ScanReport]) -> Option<&ScanReport> {
        reports
            .iter()
            .rev()
            .find(|r| !r.is_clean())
            .or_else(|| reports.last())
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
        if body.len() > MAX_REPORT_BYTES / 2 {
            return Err(Error::InvalidParameter(format!(
                "the scan report of {} is {} bytes, more than {} (fewer findings kept: \
                 --max-findings)",
                report.rp,
                body.len(),
                MAX_REPORT_BYTES / 2
            )));
        }
        let sealed = self.keys().seal(&scan_aad(&key), &body, None);
        self.store().put(&key, &sealed, PutMode::Create)?;
        Ok(key)
    }

    /// One report; None if it vanished (deleted with its RP). A report that does not read (too
    /// large, not authentic: damaged or planted) stands as verdict [`UNREADABLE`], so it can
    /// only make the RP's status worse, never fall back to an older clean one; `check` names it.
    fn read_scan(&self, key: &str, rp: &RecoveryPointId) -> Result<Option<ScanReport>> {
        match self.read_scan_strict(key, rp) {
            Err(e @ Error::Corrupt { .. }) => {
                tracing::warn!("{e}");
                Ok(Some(ScanReport {
                    rp: rp.clone(),
                    time: String::new(),
                    verdict: UNREADABLE.into(),
                    score: 0,
                    baseline: None,
                    report: serde_json::json!({ "error": e.to_string(), "key": key }),
                }))
            }
            other => other,
        }
    }

    fn read_scan_strict(&self, key: &str, rp: &RecoveryPointId) -> Result<Option<ScanReport>> {
        let sealed = match self.store().get(key) {
            Ok(s) if s.len() > MAX_REPORT_BYTES + 64 => {
                return Err(
                    self.corrupt(key, format!("{} bytes, more than a report holds", s.len()))
                )
            }
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

    /// The reports of RP `rp` (the newest [`MAX_REPORTS`]), oldest first.
    pub fn scans_of(&self, rp: &RecoveryPointId) -> Result<Vec<ScanReport>> {
        let mut keys: Vec<String> = self
            .store()
            .list(&rp.scans_prefix())?
            .into_iter()
            .filter(|o| o.size <= MAX_REPORT_BYTES as u64)
            .map(|o| o.key)
            .filter(|k| is_canonical_scan_key(k).as_ref() == Some(rp))
            .collect();
        keys.sort();
        let skip = keys.len().saturating_sub(MAX_REPORTS);
        let mut out = Vec::new();
        for k in &keys[skip..] {
            out.extend(self.read_scan(k, rp)?);
        }
        Ok(out)
    }

    /// The status ([`ScanReport::status_of`]) of each of `rps` that was scanned: one listing
    /// of `scans/`, then reads of those RPs' reports only.
    pub fn scan_status(
        &self,
        rps: &[crate::catalog::RecoveryPoint],
    ) -> Result<BTreeMap<RecoveryPointId, ScanReport>> {
        let wanted: std::collections::BTreeSet<&RecoveryPointId> =
            rps.iter().map(|r| &r.id).collect();
        let mut keys: BTreeMap<RecoveryPointId, Vec<String>> = BTreeMap::new();
        for obj in self.store().list("scans/")? {
            match is_canonical_scan_key(&obj.key) {
                Some(rp) if wanted.contains(&rp) && obj.size <= MAX_REPORT_BYTES as u64 => {
                    keys.entry(rp).or_default().push(obj.key)
                }
                Some(_) => {}
                None => {
                    tracing::warn!(key = %obj.key, "ignoring a scan object whose name is not canonical")
                }
            }
        }
        let mut out = BTreeMap::new();
        for (rp, mut ks) in keys {
            ks.sort();
            let skip = ks.len().saturating_sub(MAX_REPORTS);
            let mut reports = Vec::new();
            for k in &ks[skip..] {
                reports.extend(self.read_scan(k, &rp)?);
            }
            if let Some(s) = ScanReport::status_of(&reports) {
                out.insert(rp, s.clone());
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
