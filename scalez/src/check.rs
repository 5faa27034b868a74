//! `check`: proves a vault intact, or names each damaged object and the RPs it affects.
//!
//! Levels:
//! 1. **Structure** (always): every index object opens; every pack the index names exists and is
//!    long enough; every pack's trailer authenticates and agrees with the index; every catalog
//!    entry and tag update opens; every map page of every disk RP loads (authenticated and
//!    re-hashed) and every chunk a map references is indexed in a sound pack; instance RPs name
//!    existing volume RPs. One ranged read per pack trailer, plus the map pages.
//! 2. **Data** (`--read-data`, or a deterministic subset of packs): every chunk of the selected
//!    packs is read, authenticated, decompressed and re-hashed to its id.
//!
//! Problems are grouped by object (a pack, an index object, a catalog entry) with the set of RPs
//! that cannot be restored because of it. Packs that no index names are reported separately:
//! they are what an interrupted backup leaves (garbage for prune), or the packs of a lost index
//! object, in which case the RPs needing their chunks are reported as damaged too.
//!
//! Memory: a count per pack and one entry per damaged chunk; the index itself is the vault's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::Serialize;

use crate::catalog::{RecoveryPoint, RpKind};
use crate::error::{Error, Result};
use crate::ids::{ChunkId, PackId, RecoveryPointId};
use crate::index::Location;
use crate::pack;
use crate::vault::{Vault, Verify};
use crate::walk;

/// How much chunk data to read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DataCheck {
    /// Structure only.
    None,
    /// Every pack.
    All,
    /// This fraction (0..=1) of the packs, chosen by pack id (the same subset on every run with
    /// the same fraction; different fractions nest).
    Subset(f64),
}

/// One damaged object and the RPs it makes unrestorable (fully or partly).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Problem {
    pub object: String,
    pub problem: String,
    pub rps: BTreeSet<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub rps: usize,
    pub index_objects: usize,
    pub packs: usize,
    pub pack_bytes: u64,
    pub chunks_indexed: usize,
    /// Chunk references checked across all RP maps (a chunk shared by two RPs counts twice).
    pub chunk_references: u64,
    pub packs_read: usize,
    pub bytes_read: u64,
    /// Packs no index object names (interrupted backups, or a lost index object).
    pub unindexed_packs: Vec<String>,
    pub problems: Vec<Problem>,
    /// Every RP named by a problem.
    pub damaged_rps: BTreeSet<String>,
}

impl CheckReport {
    pub fn healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Problems collected while checking, each keyed by its object.
#[derive(Default)]
struct Problems {
    by_object: BTreeMap<String, Problem>,
}

impl Problems {
    fn add(&mut self, object: &str, problem: impl Into<String>) {
        self.by_object
            .entry(object.to_string())
            .or_insert_with(|| Problem {
                object: object.to_string(),
                problem: problem.into(),
                rps: BTreeSet::new(),
            });
    }

    fn affect(&mut self, object: &str, rp: &RecoveryPointId) {
        if let Some(p) = self.by_object.get_mut(object) {
            p.rps.insert(rp.to_string());
        }
    }
}

/// Object named by problems with chunks that are in no readable index object.
const UNINDEXED: &str = "index";

/// Records an unreadable part of an RP's map, named by its object (the pack holding it).
fn map_problem(problems: &mut Problems, e: &Error, rp: &RecoveryPointId, what: &str) {
    let object = match e {
        Error::Corrupt { key, .. } => key.clone(),
        Error::MissingChunk { .. } => UNINDEXED.to_string(),
        _ => format!("{what} of {rp}"),
    };
    problems.add(&object, format!("{what} unreadable: {e}"));
    problems.affect(&object, rp);
}

/// Whether `pack` is in the subset of packs a fraction selects.
fn selected(pack: &PackId, fraction: f64) -> bool {
    let h = blake3::hash(&pack.0);
    let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap());
    (x as f64 / u64::MAX as f64) < fraction
}

/// Reads and authenticates a pack's trailer from its tail.
fn read_trailer(
    vault: &Vault,
    pack: &PackId,
    size: u64,
) -> std::result::Result<Vec<pack::PackEntry>, String> {
    let key = pack.key();
    if size < 16 {
        return Err(format!("{size} bytes: too short to be a pack"));
    }
    let store = vault.store();
    let tail = store
        .get_range(&key, size - 8..size)
        .map_err(|e| e.to_string())?;
    if &tail[4..] != crate::format::TRAILER_MAGIC {
        return Err("no pack trailer (truncated or overwritten)".into());
    }
    let tlen = u32::from_le_bytes(tail[..4].try_into().unwrap()) as u64;
    let start = (size - 8)
        .checked_sub(tlen)
        .filter(|s| *s >= 8)
        .ok_or("trailer length points outside the pack")?;
    let max = vault.config().max_pack_object();
    if tlen > max {
        return Err(format!(
            "trailer of {tlen} bytes is larger than any pack of this vault (at most {max})"
        ));
    }
    let trailer = store
        .get_range(&key, start..size - 8)
        .map_err(|e| e.to_string())?;
    pack::read_trailer(vault.keys(), pack, &trailer, start).map_err(|e| e.to_string())
}

/// Checks `vault`; `progress` gets a line per stage.
pub fn check(vault: &Arc<Vault>, data: DataCheck, progress: &dyn Fn(&str)) -> Result<CheckReport> {
    let mut c = Checker {
        vault,
        report: CheckReport::default(),
        problems: Problems::default(),
        bad_packs: HashMap::new(),
        bad_chunks: HashMap::new(),
    };
    c.index_and_plans()?;
    progress("checking packs against the index");
    let (listed, per_pack) = c.packs()?;
    if data != DataCheck::None {
        c.pack_data(data, &listed, &per_pack, progress)?;
    }
    progress("checking recovery points");
    let rps = c.catalog()?;
    c.tags()?;
    c.scans()?;
    c.references(&rps)?;
    let Checker {
        mut report,
        problems,
        ..
    } = c;
    report.problems = problems.by_object.into_values().collect();
    // A problem that affects no RP is still damage (e.g. a damaged index object whose chunks no
    // RP needs), but the damaged RP list holds only RPs.
    report.damaged_rps = report
        .problems
        .iter()
        .flat_map(|p| p.rps.iter().cloned())
        .collect();
    Ok(report)
}

/// One check in progress: what is found so far, and the packs and chunks found damaged (the
/// RPs that need them are damaged too).
struct Checker<'v> {
    vault: &'v Vault,
    report: CheckReport,
    problems: Problems,
    bad_packs: HashMap<PackId, String>,
    bad_chunks: HashMap<ChunkId, String>,
}

/// Per pack: indexed chunk count and the end of the furthest chunk.
type PackExtent = HashMap<PackId, (u64, u64)>;

impl Checker<'_> {
    /// Index objects that did not open, and prune plans (backups rely on them).
    fn index_and_plans(&mut self) -> Result<()> {
        let vault = self.vault;
        let store = vault.store();
        let Checker {
            report, problems, ..
        } = self;
        // Index objects.
        report.index_objects = store.list("index/")?.len();
        for (key, reason) in vault.damaged_index() {
            problems.add(
                &key,
                format!("index object damaged: {reason}; the chunks it lists are unavailable"),
            );
        }

        // Prune plans must open: backups rely on them to avoid condemned packs.
        for obj in store.list(crate::gc::PLANS)? {
            let key = obj.key;
            if let Err(e) = store.get(&key).map_err(Error::from).and_then(|sealed| {
                vault
                    .keys()
                    .open(&crate::format::plan_aad(&key), &sealed)
                    .map_err(|e| vault.corrupt(&key, e.to_string()))
            }) {
                problems.add(&key, format!("damaged prune plan: {e}"));
            }
        }
        Ok(())
    }

    /// Packs: sizes from the listing, then each pack's trailer against the index.
    fn packs(&mut self) -> Result<(HashMap<PackId, u64>, PackExtent)> {
        let vault = self.vault;
        let store = vault.store();
        let Checker {
            report,
            problems,
            bad_packs,
            ..
        } = self;
        // Packs: sizes from the listing, then the index against them.
        let listed: HashMap<PackId, u64> = store
            .list("packs/")?
            .into_iter()
            .filter_map(|o| PackId::from_key(&o.key).map(|p| (p, o.size)))
            .collect();
        report.packs = listed.len();
        report.pack_bytes = listed.values().sum();
        // Per pack: indexed chunk count and the end of the furthest chunk.
        let mut per_pack: HashMap<PackId, (u64, u64)> = HashMap::new();
        vault.for_each_index_entry(|_, loc| {
            let e = per_pack.entry(loc.pack).or_default();
            e.0 += 1;
            e.1 = e.1.max(loc.offset as u64 + loc.len as u64);
            report.chunks_indexed += 1;
        });
        let mut packs: Vec<(&PackId, &(u64, u64))> = per_pack.iter().collect();
        packs.sort_by_key(|(p, _)| p.key());
        for (pack, (count, end)) in packs {
            let key = pack.key();
            let problem = match listed.get(pack) {
                None => Some(format!("missing pack ({count} indexed chunks are in it)")),
                Some(size) if *size < *end => Some(format!(
                    "truncated pack: {size} bytes, the index needs at least {end}"
                )),
                Some(size) => match read_trailer(vault, pack, *size) {
                    Err(e) => Some(format!("damaged pack: {e}")),
                    Ok(entries) => {
                        // Every trailer entry the index maps to this pack must agree with it, and
                        // every index entry for this pack must be in the trailer.
                        let mut agreeing = 0u64;
                        let mut disagree = None;
                        for e in &entries {
                            if let Some(loc) = vault.locate(&e.id).filter(|l| l.pack == *pack) {
                                if loc.offset == e.offset && loc.len == e.len {
                                    agreeing += 1;
                                } else {
                                    disagree = Some(e.id);
                                }
                            }
                        }
                        match disagree {
                            Some(id) => Some(format!(
                                "the index and the pack trailer disagree on chunk {id}"
                            )),
                            None if agreeing != *count => Some(format!(
                                "the index lists {count} chunks in this pack, its trailer {agreeing}"
                            )),
                            None => None,
                        }
                    }
                },
            };
            if let Some(p) = problem {
                problems.add(&key, p.clone());
                bad_packs.insert(*pack, key);
            }
        }
        let mut unindexed: Vec<String> = listed
            .keys()
            .filter(|p| !per_pack.contains_key(p))
            .map(PackId::key)
            .collect();
        unindexed.sort();
        report.unindexed_packs = unindexed;
        Ok((listed, per_pack))
    }

    /// Reads every chunk of the selected packs, authenticated and re-hashed.
    fn pack_data(
        &mut self,
        data: DataCheck,
        listed: &HashMap<PackId, u64>,
        per_pack: &PackExtent,
        progress: &dyn Fn(&str),
    ) -> Result<()> {
        let vault = self.vault;
        let store = vault.store();
        let Checker {
            report,
            problems,
            bad_packs,
            bad_chunks,
            ..
        } = self;
        let mut to_read: Vec<PackId> = per_pack
            .keys()
            .filter(|p| !bad_packs.contains_key(p))
            .filter(|p| match data {
                DataCheck::Subset(f) => selected(p, f),
                _ => true,
            })
            .copied()
            .collect();
        to_read.sort_by_key(PackId::key);
        progress(&format!("reading {} packs", to_read.len()));
        let max_pack = vault.config().max_pack_object();
        for pack in to_read {
            let key = pack.key();
            let size = listed.get(&pack).copied().unwrap_or(0);
            if size > max_pack {
                // Never read whole into memory: a planted sparse object could be any size.
                problems.add(
                    &key,
                    format!(
                        "oversize pack: {size} bytes, larger than any pack of this vault \
                         (at most {max_pack}); not read"
                    ),
                );
                bad_packs.insert(pack, key);
                continue;
            }
            let bytes = match store.get(&key) {
                Ok(b) => b,
                Err(e) => {
                    problems.add(&key, format!("cannot read pack: {e}"));
                    bad_packs.insert(pack, key);
                    continue;
                }
            };
            report.packs_read += 1;
            report.bytes_read += bytes.len() as u64;
            let entries = match pack::read_entries(vault.keys(), &pack, &bytes) {
                Ok(e) => e,
                Err(e) => {
                    problems.add(&key, format!("damaged pack: {e}"));
                    bad_packs.insert(pack, key);
                    continue;
                }
            };
            let mut damaged = 0;
            let mut first = None;
            for e in entries {
                let Some(loc) = vault.locate(&e.id).filter(|l| l.pack == pack) else {
                    continue;
                };
                let sealed = &bytes[e.offset as usize..(e.offset + e.len) as usize];
                if let Err(err) = vault.open_chunk(&e.id, &key, &loc, sealed, Verify::Rehash) {
                    damaged += 1;
                    first.get_or_insert_with(|| match err {
                        Error::Corrupt { detail, .. } => detail,
                        e => e.to_string(),
                    });
                    bad_chunks.insert(e.id, key.clone());
                }
            }
            if damaged > 0 {
                problems.add(
                    &key,
                    format!(
                        "{damaged} damaged chunk(s) (first: {})",
                        first.unwrap_or_default()
                    ),
                );
            }
        }
        Ok(())
    }

    /// Catalog entries: every canonical one opens.
    fn catalog(&mut self) -> Result<Vec<RecoveryPoint>> {
        let vault = self.vault;
        let store = vault.store();
        let Checker {
            report, problems, ..
        } = self;
        let mut rps: Vec<RecoveryPoint> = Vec::new();
        for obj in store.list("catalog/")? {
            let name = obj.key.trim_start_matches("catalog/");
            let Some(id) = RecoveryPointId::from_object_name(name) else {
                problems.add(
                    &obj.key,
                    if name.parse::<RecoveryPointId>().is_ok() {
                        "catalog object under a non-canonical spelling of an RP id (a planted copy?); \
                         listing and prune ignore it"
                    } else {
                        "catalog object with a malformed name; listing and prune ignore it"
                    },
                );
                continue;
            };
            report.rps += 1;
            match vault.read_rp(&obj.key, &id) {
                Ok(rp) => rps.push(rp),
                Err(e) => {
                    problems.add(&obj.key, format!("damaged catalog entry: {e}"));
                    problems.affect(&obj.key, &id);
                }
            }
        }
        Ok(rps)
    }

    /// Tag updates: canonical names, and each opens.
    fn tags(&mut self) -> Result<()> {
        let vault = self.vault;
        let store = vault.store();
        let Checker { problems, .. } = self;
        for obj in store.list("tags/")? {
            let Some((rp, _)) = obj.key.trim_start_matches("tags/").split_once('/') else {
                continue;
            };
            let canonical = RecoveryPointId::from_object_name(rp)
                .is_some_and(|id| crate::catalog::is_canonical_tag_key(&obj.key, &id));
            if !canonical {
                problems.add(
                    &obj.key,
                    "tag object with a non-canonical name (a planted copy?); listing ignores it",
                );
                continue;
            }
            if let Err(e) = store.get(&obj.key).map_err(Error::from).and_then(|sealed| {
                vault
                    .keys()
                    .open(&crate::catalog::tag_aad(&obj.key), &sealed)
                    .map_err(|e| vault.corrupt(&obj.key, e.to_string()))
            }) {
                problems.add(&obj.key, format!("damaged tag update: {e}"));
                if let Ok(id) = rp.parse::<RecoveryPointId>() {
                    problems.affect(&obj.key, &id);
                }
            }
        }
        Ok(())
    }

    /// Scan reports: canonical names, each opens and speaks of its own RP.
    fn scans(&mut self) -> Result<()> {
        let vault = self.vault;
        let store = vault.store();
        let Checker { problems, .. } = self;
        for obj in store.list("scans/")? {
            let Some(rp) = crate::scans::is_canonical_scan_key(&obj.key) else {
                problems.add(
                    &obj.key,
                    "scan report with a non-canonical name (a planted copy?); listing ignores it",
                );
                continue;
            };
            let opened = store.get(&obj.key).map_err(Error::from).and_then(|sealed| {
                let plain = vault
                    .keys()
                    .open(&crate::format::scan_aad(&obj.key), &sealed)
                    .map_err(|e| vault.corrupt(&obj.key, e.to_string()))?;
                let r: crate::scans::ScanReport = serde_json::from_slice(&plain)
                    .map_err(|e| vault.corrupt(&obj.key, e.to_string()))?;
                if r.rp != rp {
                    return Err(vault.corrupt(&obj.key, format!("holds a report of {}", r.rp)));
                }
                Ok(())
            });
            if let Err(e) = opened {
                problems.add(&obj.key, format!("damaged scan report: {e}"));
                problems.affect(&obj.key, &rp);
            }
        }
        Ok(())
    }

    /// Everything each RP references: loads (map pages, trees, manifests) and is indexed in a
    /// sound pack; instance RPs name existing volume RPs.
    fn references(&mut self, rps: &[RecoveryPoint]) -> Result<()> {
        let vault = self.vault;
        let Checker {
            report,
            problems,
            bad_packs,
            bad_chunks,
            ..
        } = self;
        let known: BTreeSet<&RecoveryPointId> = rps.iter().map(|r| &r.id).collect();
        for rp in rps {
            if rp.kind == RpKind::Instance {
                for v in rp.instance.iter().flat_map(|i| &i.volumes) {
                    if !known.contains(&v.rp) {
                        let key = format!("catalog/{}", v.rp);
                        problems.add(
                            &key,
                            format!("volume RP of {} ({}) is missing", rp.id, v.device_name),
                        );
                        problems.affect(&key, &rp.id);
                    }
                }
            }
            let check_chunk = |id: &ChunkId, problems: &mut Problems| match vault.locate(id) {
                None => {
                    problems.add(
                        UNINDEXED,
                        "chunks referenced by recovery points are in no readable index object \
                             (a lost or damaged index object, see the other problems)",
                    );
                    problems.affect(UNINDEXED, &rp.id);
                }
                Some(Location { pack, .. }) => {
                    if let Some(key) = bad_packs.get(&pack).or_else(|| bad_chunks.get(id)) {
                        problems.affect(&key.clone(), &rp.id);
                    }
                }
            };
            // Damaged parts are recorded and skipped, so the RP is attributed to every damaged
            // object it needs (named by its object: the pack holding it).
            let what = match rp.kind {
                RpKind::Disk => "map page",
                RpKind::Stream => "stream map",
                RpKind::File => "file tree",
                RpKind::Instance => "instance record",
            };
            let mut damaged: Vec<Error> = Vec::new();
            let mut refs = 0u64;
            walk::for_each_chunk(
                vault,
                rp,
                &mut |e| {
                    damaged.push(e);
                    Ok(())
                },
                &mut |id| {
                    refs += 1;
                    check_chunk(id, problems);
                    Ok(())
                },
            )?;
            for e in damaged {
                map_problem(problems, &e, &rp.id, what);
            }
            report.chunk_references += refs;
        }
        Ok(())
    }
}
