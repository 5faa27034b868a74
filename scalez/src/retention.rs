//! Retention: which recovery points a policy keeps (per kind, host and asset: the last N, one per
//! hour/day/ISO week/month/year, tagged ones, protected ones, the volumes of a kept instance).
//! Pure selection over the catalog; [`crate::prune`] acts on it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::catalog::{RecoveryPoint, RpKind};
use crate::error::{Error, Result};
use crate::ids::RecoveryPointId;

/// How many RPs to keep per asset. Empty: keep everything (prune then only collects garbage).
#[derive(Debug, Clone, Default)]
pub struct Retention {
    pub keep_last: Option<usize>,
    pub keep_hourly: Option<usize>,
    pub keep_daily: Option<usize>,
    pub keep_weekly: Option<usize>,
    pub keep_monthly: Option<usize>,
    pub keep_yearly: Option<usize>,
    /// RPs with any of these tags are kept.
    pub keep_tags: Vec<(String, String)>,
}

impl Retention {
    /// How many periods of `period` to keep one RP of (None: the policy says nothing).
    pub fn keep_per(&self, period: Period) -> Option<usize> {
        match period {
            Period::Hourly => self.keep_hourly,
            Period::Daily => self.keep_daily,
            Period::Weekly => self.keep_weekly,
            Period::Monthly => self.keep_monthly,
            Period::Yearly => self.keep_yearly,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_hourly.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
            && self.keep_yearly.is_none()
            && self.keep_tags.is_empty()
    }
}

/// The tag that protects an RP: kept by every prune whatever the policy, and refused by
/// `rp delete` unless forced. Set and cleared like any tag (`rp protect` / `rp unprotect`), so
/// the change is an immutable, authenticated object like every other tag update.
pub const PROTECTED_TAG: &str = "elastio.protected";

/// Whether `rp` is protected from prune and deletion.
pub fn is_protected(rp: &RecoveryPoint) -> bool {
    rp.tags.contains_key(PROTECTED_TAG)
}

/// Which assets a prune applies its policy to. Names match exactly; a pattern only when asked
/// for (a substring match once pruned `db-archive` with `--asset db`).
#[derive(Debug, Clone)]
pub enum AssetFilter {
    Exact(String),
    /// A glob (`*`, `?`, `[...]`) over the whole asset name.
    Glob(globset::GlobMatcher),
}

impl std::fmt::Display for AssetFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AssetFilter::Exact(a) => write!(f, "{a:?}"),
            AssetFilter::Glob(g) => write!(f, "the pattern {:?}", g.glob().glob()),
        }
    }
}

impl AssetFilter {
    pub fn glob(pattern: &str) -> Result<Self> {
        let g = globset::GlobBuilder::new(pattern)
            .literal_separator(false)
            .build()
            .map_err(|e| Error::InvalidParameter(format!("asset pattern {pattern:?}: {e}")))?;
        Ok(AssetFilter::Glob(g.compile_matcher()))
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            AssetFilter::Exact(a) => a == name,
            AssetFilter::Glob(g) => g.is_match(name),
        }
    }
}

/// A retention decision.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub rp: String,
    pub kind: String,
    pub asset: String,
    pub created: String,
    pub keep: bool,
    /// Why it is kept ("last 3", "daily 2026-11-22", "tag k=v", "volume of instance RP ...").
    pub reasons: Vec<String>,
}

/// A calendar period retention keeps one RP per (the newest of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Hourly,
    Daily,
    /// ISO weeks (Monday to Sunday, UTC).
    Weekly,
    Monthly,
    Yearly,
}

impl Period {
    pub const ALL: [Period; 5] = [
        Period::Hourly,
        Period::Daily,
        Period::Weekly,
        Period::Monthly,
        Period::Yearly,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Yearly => "yearly",
        }
    }

    /// The period an RFC 3339 UTC time falls in: hour, day, ISO week, month, year.
    fn bucket(self, created: &str) -> String {
        let date = created.get(..10).unwrap_or(created);
        match self {
            Period::Hourly => created.get(..13).unwrap_or(created).to_string(),
            Period::Daily => date.to_string(),
            Period::Monthly => created.get(..7).unwrap_or(created).to_string(),
            Period::Yearly => created.get(..4).unwrap_or(created).to_string(),
            Period::Weekly => {
                // ISO week: days since 1970-01-05 (a Monday) / 7.
                let days = days_from_civil(date).unwrap_or(0);
                format!("w{}", (days - 4).div_euclid(7))
            }
        }
    }
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` date (proleptic Gregorian).
fn days_from_civil(date: &str) -> Option<i64> {
    let y: i64 = date.get(..4)?.parse().ok()?;
    let m: i64 = date.get(5..7)?.parse().ok()?;
    let d: i64 = date.get(8..10)?.parse().ok()?;
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146097 + doe - 719468)
}

/// What retention decided: one decision per RP, and the groups (kind, host, asset) the policy
/// selected but would leave without any RP.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub decisions: Vec<Decision>,
    /// `"<kind> RPs of <asset> on <host>"`, for every group that would be emptied.
    pub emptied: Vec<String>,
}

/// Applies `policy` per (kind, asset) to the RPs `asset` selects (all when None); RPs of other
/// assets are kept untouched. Volume RPs of a kept instance RP are kept, and so are protected
/// RPs ([`PROTECTED_TAG`]).
pub fn select(rps: &[RecoveryPoint], policy: &Retention, asset: Option<&AssetFilter>) -> Selection {
    // The groups the policy applies to, checked for emptiness once every rule has run.
    let mut selected_groups = Vec::new();
    let mut groups: BTreeMap<(String, String, String), Vec<&RecoveryPoint>> = BTreeMap::new();
    for rp in rps {
        groups
            .entry((
                rp.kind.to_string(),
                rp.asset.host.clone(),
                rp.asset.name.clone(),
            ))
            .or_default()
            .push(rp);
    }
    let mut reasons: HashMap<RecoveryPointId, Vec<String>> = HashMap::new();
    for ((kind, host, name), mut group) in groups {
        let selected = asset.is_none_or(|a| a.matches(&name));
        if !selected || policy.is_empty() {
            for rp in group {
                reasons
                    .entry(rp.id.clone())
                    .or_default()
                    .push(if selected { "no policy" } else { "other asset" }.into());
            }
            continue;
        }
        group.sort_by(|a, b| b.id.cmp(&a.id)); // newest first
        if let Some(n) = policy.keep_last {
            for rp in group.iter().take(n) {
                reasons
                    .entry(rp.id.clone())
                    .or_default()
                    .push(format!("last {n}"));
            }
        }
        for period in Period::ALL {
            let Some(n) = policy.keep_per(period) else {
                continue;
            };
            let mut seen = BTreeSet::new();
            for rp in &group {
                if seen.len() == n {
                    break;
                }
                let b = period.bucket(&rp.created);
                if seen.insert(b.clone()) {
                    reasons
                        .entry(rp.id.clone())
                        .or_default()
                        .push(format!("{} {b}", period.name()));
                }
            }
        }
        for rp in &group {
            if is_protected(rp) {
                reasons
                    .entry(rp.id.clone())
                    .or_default()
                    .push("protected".into());
            }
            for (k, v) in &policy.keep_tags {
                if rp.tags.get(k) == Some(v) {
                    reasons
                        .entry(rp.id.clone())
                        .or_default()
                        .push(format!("tag {k}={v}"));
                }
            }
        }
        selected_groups.push((
            format!("{kind} RPs of {name} on {host}"),
            group.iter().map(|rp| rp.id.clone()).collect::<Vec<_>>(),
        ));
    }
    // An instance RP that stays keeps its volumes.
    for rp in rps {
        if rp.kind == RpKind::Instance && reasons.contains_key(&rp.id) {
            for v in rp.instance.iter().flat_map(|i| &i.volumes) {
                reasons
                    .entry(v.rp.clone())
                    .or_default()
                    .push(format!("volume of instance RP {}", rp.id));
            }
        }
    }
    let emptied = selected_groups
        .into_iter()
        .filter(|(_, ids)| !ids.iter().any(|id| reasons.contains_key(id)))
        .map(|(what, _)| what)
        .collect();
    let decisions = rps
        .iter()
        .map(|rp| {
            let r = reasons.remove(&rp.id).unwrap_or_default();
            Decision {
                rp: rp.id.to_string(),
                kind: rp.kind.to_string(),
                asset: rp.asset.name.clone(),
                created: rp.created.clone(),
                keep: !r.is_empty(),
                reasons: r,
            }
        })
        .collect();
    Selection { decisions, emptied }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_and_iso_weeks() {
        assert_eq!(days_from_civil("1970-01-01"), Some(0));
        assert_eq!(days_from_civil("2000-03-01"), Some(11017));
        // 2026-11-22 is a Sunday, 2026-11-23 a Monday: different ISO weeks.
        let sun = Period::Weekly.bucket("2026-11-22T10:00:00.000Z");
        let mon = Period::Weekly.bucket("2026-11-23T10:00:00.000Z");
        let prev_mon = Period::Weekly.bucket("2026-11-16T00:00:00.000Z");
        assert_ne!(sun, mon);
        assert_eq!(sun, prev_mon);
        assert_eq!(
            Period::Hourly.bucket("2026-11-22T10:59:00.000Z"),
            "2026-11-22T10"
        );
    }
}
