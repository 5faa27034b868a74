//! Retention (which RPs to keep) and prune (reclaiming the space of the others), following the
//! protocol in [`crate::gc`].
//!
//! Space is reclaimed per pack: a pack none of whose chunks is referenced is deleted; a pack
//! whose referenced chunks are less than `repack_below` of its bytes has them copied (sealed
//! bytes as they are) into new packs first, then is deleted too. Memory: the vault's index (the
//! "referenced" mark is a bit inside each entry, so it costs nothing more) and a few numbers per
//! pack; index objects are streamed one at a time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::catalog::RecoveryPoint;
use crate::error::{Error, Result};
use crate::gc::{self, Plan};
use crate::ids::{ChunkId, PackId, RecoveryPointId};
use crate::index::{self, Location};
use crate::retention::{select, AssetFilter, Decision, Retention};
use crate::session::BackupSession;
use crate::store::PutMode;
use crate::vault::{index_aad, Vault};
use crate::walk;

/// Deletes RPs' catalog entries, tag updates and scan reports. Their data stays until the next
/// prune.
pub fn delete_rps(vault: &Vault, ids: &[RecoveryPointId]) -> Result<()> {
    for id in ids {
        // The catalog entry first: once it is gone the RP is invisible.
        vault.store().delete(&id.catalog_key())?;
        for prefix in [id.tags_prefix(), id.scans_prefix()] {
            for t in vault.store().list(&prefix)? {
                vault.store().delete(&t.key)?;
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub retention: Retention,
    pub asset: Option<AssetFilter>,
    /// Go on even when the policy would leave an asset without any RP (refused otherwise: a
    /// `--keep-daily 0` or a typo must not wipe a vault).
    pub allow_empty: bool,
    pub dry_run: bool,
    /// Packs whose live bytes are below this fraction are repacked.
    pub repack_below: f64,
    /// Share of the reclaimable bytes prune may leave unreclaimed in partly used packs; more
    /// packs are repacked (most garbage first) until that holds. Up to [`MIN_REPACK_GAIN`]
    /// bytes may always stay, so a prune right after a prune (whose leftover is below that)
    /// has nothing to do instead of repacking the last few chunks over and over.
    pub max_unused: f64,
    /// How long to wait for backups that were running when the plan was written; past it the
    /// deletion is left to the next prune.
    pub max_wait: Duration,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            retention: Retention::default(),
            asset: None,
            allow_empty: false,
            dry_run: false,
            repack_below: 0.5,
            max_unused: 0.05,
            max_wait: gc::lease_ttl() + Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub decisions: Vec<Decision>,
    pub rps_deleted: usize,
    pub packs_before: usize,
    pub bytes_before: u64,
    /// Bytes of chunks no remaining RP references (what a perfect prune would free).
    pub reclaimable_bytes: u64,
    pub packs_deleted: usize,
    pub bytes_deleted: u64,
    pub packs_repacked: usize,
    /// Live chunk bytes copied out of repacked packs.
    pub bytes_copied: u64,
    pub packs_written: u64,
    pub index_objects_rewritten: usize,
    pub stale_leases_removed: usize,
    /// Packs a backup that finished during the prune turned out to need.
    pub packs_spared: usize,
    pub plan: Option<String>,
    /// Set when deletion was postponed (a backup still running past `max_wait`).
    pub postponed: Option<String>,
    pub waited_ms: u64,
    pub elapsed_ms: u64,
    /// A locked vault's upkeep (S3 Object Lock): extended, destroyed and postponed versions.
    pub lock: Option<crate::immutable::LockReport>,
}

/// Marks the chunks (map pages included) every RP in `rps` references. A referenced chunk that is
/// not indexed means a damaged vault: prune refuses to go on.
fn mark_referenced(vault: &Vault, rps: &[RecoveryPoint]) -> Result<()> {
    let mut mark = |id: &ChunkId| -> Result<()> {
        if vault.mark(id) {
            Ok(())
        } else {
            Err(Error::MissingChunk {
                location: vault.location(),
                chunk: *id,
            })
        }
    };
    for rp in rps {
        walk::for_each_chunk(vault, rp, &mut walk::stop_on_damage, &mut mark)?;
    }
    Ok(())
}

/// The condemned packs that RPs committed since the plan's retention step need (P4): the same
/// walk as the mark step, so every kind of RP keeps what it references.
fn packs_to_spare(
    vault: &Vault,
    new_rps: &[RecoveryPoint],
    condemned: &HashSet<PackId>,
) -> Result<HashSet<PackId>> {
    let mut spared = HashSet::new();
    for rp in new_rps {
        walk::for_each_chunk(
            vault,
            rp,
            &mut walk::stop_on_damage,
            &mut |id| match vault.locate(id) {
                Some(loc) if condemned.contains(&loc.pack) => {
                    spared.insert(loc.pack);
                    Ok(())
                }
                Some(_) => Ok(()),
                None => Err(Error::SessionFailed(format!(
                    "recovery point {} committed during prune references chunk {id}, which \
                     is in no index object; nothing was deleted",
                    rp.id
                ))),
            },
        )?;
    }
    Ok(spared)
}

/// Per pack: sealed bytes of distinct chunks, and of those referenced.
#[derive(Default, Clone, Copy)]
struct Usage {
    total: u64,
    live: u64,
}

/// Applies retention, then reclaims unreferenced data. See [`crate::gc`] for the protocol.
pub fn prune(
    vault: &Arc<Vault>,
    opts: &PruneOptions,
    progress: &dyn Fn(&str),
) -> Result<PruneReport> {
    let started = Instant::now();
    let plan = match PrunePlan::new(vault, opts, progress) {
        Ok(p) => p,
        Err(e) => {
            // A locked vault's live objects stay locked even when the plan fails (a planted
            // object, a damaged index): every pack counts as indexed, so none is destroyed.
            if vault.store().object_lock().is_some() && !opts.dry_run {
                let all: HashSet<String> = vault
                    .store()
                    .list("packs/")
                    .map(|l| l.into_iter().map(|o| o.key).collect())
                    .unwrap_or_default();
                // Extend only: without the index, no hidden pack is known to be unneeded.
                if let Err(le) = crate::immutable::maintain(vault, &all, false, false, progress) {
                    tracing::warn!("lock upkeep after a failed prune plan: {le}");
                }
            }
            return Err(e);
        }
    };
    let mut report = plan.report(opts.dry_run);
    // Lock upkeep first, on what the index names now: nothing this prune hides can be
    // destroyed in the same run anyway (grace), and tampering must stop the deletions below.
    let indexed: HashSet<String> = plan.usage.keys().map(PackId::key).collect();
    report.lock = crate::immutable::maintain(vault, &indexed, true, opts.dry_run, progress)?;
    let tampered = report.lock.as_ref().is_some_and(|l| !l.tampered.is_empty());
    if tampered && !opts.dry_run {
        report.postponed = Some(
            "objects of this vault were overwritten (listed below): nothing was deleted; \
             bring them back with `vault restore-versions --to <a time before>`"
                .into(),
        );
        report.rps_deleted = 0;
        report.packs_deleted = 0;
        report.bytes_deleted = 0;
    } else if !opts.dry_run {
        plan.execute(vault, opts, progress, &mut report)?;
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// What a prune will do, decided before anything is deleted: the retention decisions (P1),
/// and from the index, which packs are dead and which are worth repacking.
pub struct PrunePlan {
    pub decisions: Vec<Decision>,
    forget: Vec<RecoveryPointId>,
    /// The RPs that stay (what P4 compares newly committed ones against).
    known: HashSet<RecoveryPointId>,
    /// Every pack object listed, with its size.
    listed: HashMap<PackId, u64>,
    index_keys: Vec<String>,
    usage: HashMap<PackId, Usage>,
    /// Packs nothing references (or no index names): deleted outright.
    dead: Vec<PackId>,
    /// Partly used packs whose live chunks are copied out before they are deleted.
    repack: Vec<PackId>,
    reclaimable: u64,
}

impl PrunePlan {
    /// P1 (retention) and the usage count. Deletes nothing; marks what the kept RPs reference
    /// in the vault's index.
    pub fn new(vault: &Vault, opts: &PruneOptions, progress: &dyn Fn(&str)) -> Result<Self> {
        let (decisions, keep) = retain(vault, opts)?;
        let forget: Vec<RecoveryPointId> = decisions
            .iter()
            .filter(|d| !d.keep)
            .filter_map(|d| d.rp.parse().ok())
            .collect();
        progress("finding referenced chunks");
        vault.clear_marks();
        mark_referenced(vault, &keep)?;

        let store = vault.store();
        let listed: HashMap<PackId, u64> = store
            .list("packs/")?
            .into_iter()
            .filter_map(|o| PackId::from_key(&o.key).map(|p| (p, o.size)))
            .collect();
        let index_objects = store.list("index/")?;
        let max_index = vault.config().max_index_object();
        if let Some(o) = index_objects.iter().find(|o| o.size > max_index) {
            // Its entries could be referenced: deciding without them could delete live data.
            return Err(vault.corrupt(
                &o.key,
                format!(
                    "{} bytes: larger than any index object (at most {max_index}); no data was \
                     deleted (run check)",
                    o.size
                ),
            ));
        }
        let index_keys: Vec<String> = index_objects.into_iter().map(|o| o.key).collect();
        progress(&format!("reading {} index objects", index_keys.len()));
        let usage = pack_usage(vault, &index_keys)?;
        // Dead: listed packs no index names (interrupted backups) or with nothing referenced.
        let mut dead: Vec<PackId> = listed
            .keys()
            .filter(|p| usage.get(p).is_none_or(|u| u.live == 0))
            .copied()
            .collect();
        dead.sort();
        // Dead packs free their whole size; partly used ones their unreferenced chunk bytes
        // (the pack framing of a live pack is not garbage).
        let reclaimable: u64 = listed
            .iter()
            .map(|(p, size)| match usage.get(p) {
                Some(u) if u.live > 0 => u.total.saturating_sub(u.live),
                _ => *size,
            })
            .sum();
        let partial: Vec<(PackId, u64, f64)> = usage
            .iter()
            .filter(|(p, u)| listed.contains_key(p) && u.live > 0 && u.total > u.live)
            .map(|(p, u)| (*p, u.total - u.live, u.live as f64 / u.total as f64))
            .collect();
        let repack = choose_repack(partial, reclaimable, opts.repack_below, opts.max_unused);
        Ok(PrunePlan {
            decisions,
            forget,
            known: keep.into_iter().map(|r| r.id).collect(),
            listed,
            index_keys,
            usage,
            dead,
            repack,
            reclaimable,
        })
    }

    /// The report before execution: what a dry run prints.
    pub fn report(&self, dry_run: bool) -> PruneReport {
        let mut report = PruneReport {
            dry_run,
            decisions: self.decisions.clone(),
            rps_deleted: self.forget.len(),
            packs_before: self.listed.len(),
            bytes_before: self.listed.values().sum(),
            reclaimable_bytes: self.reclaimable,
            ..PruneReport::default()
        };
        if dry_run {
            let doomed = || self.dead.iter().chain(&self.repack);
            report.packs_deleted = doomed().count();
            report.packs_repacked = self.repack.len();
            report.bytes_deleted = doomed().map(|p| self.listed[p]).sum();
            report.bytes_copied = self.repack.iter().map(|p| self.usage[p].live).sum();
        }
        report
    }

    /// Deletes the expired RPs, repacks, then runs the deletion protocol of [`crate::gc`]
    /// (P2 plan, P3 wait, P4 spare, P5 delete).
    pub fn execute(
        self,
        vault: &Arc<Vault>,
        opts: &PruneOptions,
        progress: &dyn Fn(&str),
        report: &mut PruneReport,
    ) -> Result<()> {
        progress(&format!("deleting {} recovery points", self.forget.len()));
        delete_rps(vault, &self.forget)?;
        if !self.repack.is_empty() {
            progress(&format!("repacking {} packs", self.repack.len()));
            self.repack(vault, report)?;
        }
        // P2: the plan.
        let mut condemned: Vec<PackId> = self.dead.iter().chain(&self.repack).copied().collect();
        condemned.sort();
        condemned.dedup();
        let live_sessions = clear_stale_leases(vault, report)?;
        if condemned.is_empty() {
            return Ok(());
        }
        let plan = Plan {
            created_ms: gc::now_ms(),
            condemned: condemned.iter().map(PackId::hex).collect(),
            sessions: live_sessions.clone(),
            finishes: None,
            released: Vec::new(),
        };
        let plan_key = gc::write_plan(&vault.gc(), &plan)?;
        report.plan = Some(plan_key.clone());

        // P3: wait for the sessions that were running.
        if let Some(running) = wait_for(vault, &live_sessions, opts.max_wait, progress, report)? {
            report.postponed = Some(format!(
                "backup session {running} is still running; the next prune deletes the \
                 condemned packs"
            ));
            // This prune deletes nothing more: its packs are no longer condemned by it (the
            // next prune decides them anew).
            return gc::release_packs(&vault.gc(), &plan_key, &condemned);
        }

        // P4: RPs committed since P1 keep what they reference.
        vault.refresh()?;
        let condemned_set: HashSet<PackId> = condemned.iter().copied().collect();
        let new_rps: Vec<RecoveryPoint> = vault
            .list_rps()?
            .into_iter()
            .filter(|rp| !self.known.contains(&rp.id))
            .collect();
        let spared = packs_to_spare(vault, &new_rps, &condemned_set)?;
        report.packs_spared = spared.len();

        // P5: drop the condemned packs from the index objects, then delete the packs. In this
        // order a prune killed at any point leaves the index naming only packs that exist (what
        // it has not deleted yet is unindexed garbage, which the next prune deletes), never
        // entries of a missing pack.
        let deleted: HashSet<PackId> = condemned_set.difference(&spared).copied().collect();
        report.index_objects_rewritten = unindex_packs(vault, &deleted)?;
        progress(&format!("deleting {} packs", deleted.len()));
        for p in &deleted {
            vault.store().delete(&p.key())?;
            report.packs_deleted += 1;
            report.bytes_deleted += self.listed.get(p).copied().unwrap_or(0);
        }
        // The spared packs stay: RPs reference them, so sessions must be able to again (they
        // stayed condemned forever, and an EBS incremental over such an RP failed every time).
        let mut spared: Vec<PackId> = spared.into_iter().collect();
        spared.sort();
        gc::release_packs(&vault.gc(), &plan_key, &spared)
    }

    /// Copies the live chunks of the packs to repack into new packs (indexed) before anything
    /// is deleted; each chunk is authenticated first, so damaged data never spreads.
    fn repack(&self, vault: &Arc<Vault>, report: &mut PruneReport) -> Result<()> {
        let repack_set: HashSet<PackId> = self.repack.iter().copied().collect();
        let mut session = BackupSession::new(vault.clone())?;
        let mut copied: HashSet<ChunkId> = HashSet::new();
        // The live entries of each repacked pack, one index object at a time.
        let mut live: HashMap<PackId, Vec<(ChunkId, Location)>> = HashMap::new();
        for key in &self.index_keys {
            let Some(entries) = read_index(vault, key)? else {
                return Err(vanished(key));
            };
            for (id, loc) in entries {
                if repack_set.contains(&loc.pack) && vault.is_marked(&id) {
                    live.entry(loc.pack).or_default().push((id, loc));
                }
            }
        }
        for pack in &self.repack {
            let Some(entries) = live.remove(pack) else {
                continue;
            };
            let size = self.listed.get(pack).copied().unwrap_or(0);
            if size > vault.config().max_pack_object() {
                return Err(vault.corrupt(
                    &pack.key(),
                    format!(
                        "oversize pack ({size} bytes); no data was deleted (the expired RPs' \
                         catalog entries were; run check)"
                    ),
                ));
            }
            let bytes = vault.store().get(&pack.key())?;
            for (id, loc) in entries {
                if !copied.insert(id) {
                    continue;
                }
                let end = loc.offset as usize + loc.len as usize;
                let sealed = bytes.get(loc.offset as usize..end).ok_or_else(|| {
                    vault.corrupt(&pack.key(), "shorter than its index says (truncated)")
                })?;
                vault.open_chunk(
                    &id,
                    &pack.key(),
                    &loc,
                    sealed,
                    crate::vault::Verify::AeadOnly,
                )?;
                report.bytes_copied += sealed.len() as u64;
                if let Err(e) = session.store_sealed(id, sealed.to_vec()) {
                    // A stopped pack writer: its own error is the one to report.
                    return Err(session.abandon().unwrap_or(e));
                }
            }
        }
        let stats = session.finish()?;
        report.packs_written = stats.packs;
        drop(session); // releases the lease: the plan must not wait for ourselves
        report.packs_repacked = self.repack.len();
        Ok(())
    }
}

/// P1: the retention decisions and the RPs that stay. Refuses a filter that matches nothing
/// and a policy that would empty an asset (unless allowed).
fn retain(vault: &Vault, opts: &PruneOptions) -> Result<(Vec<Decision>, Vec<RecoveryPoint>)> {
    let rps = vault.list_rps()?;
    let ids: HashSet<&RecoveryPointId> = rps.iter().map(|r| &r.id).collect();
    if ids.len() != rps.len() {
        // list_rps only returns canonical names, so this cannot happen; if it ever does, a
        // duplicate would be "deleted" through the canonical name.
        return Err(Error::InvalidParameter(
            "the catalog lists a recovery point twice; nothing was deleted (run check)".into(),
        ));
    }
    if let Some(filter) = &opts.asset {
        if !rps.iter().any(|rp| filter.matches(&rp.asset.name)) {
            // A cron job whose filter no longer matches anything must not look like success.
            return Err(Error::InvalidParameter(format!(
                "no recovery point of an asset matching {filter} in this vault (--asset matches \
                 the whole name; --asset-glob takes a pattern)"
            )));
        }
    }
    let selection = select(&rps, &opts.retention, opts.asset.as_ref());
    if !selection.emptied.is_empty() && !opts.allow_empty {
        return Err(Error::InvalidParameter(format!(
            "the retention policy keeps no recovery point of {}{}; nothing was deleted \
             (give --allow-empty to delete them all)",
            selection.emptied[..selection.emptied.len().min(3)].join(", "),
            match selection.emptied.len() {
                n if n > 3 => format!(" and {} more", n - 3),
                _ => String::new(),
            }
        )));
    }
    let kept: HashSet<&str> = selection
        .decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| d.rp.as_str())
        .collect();
    let keep = rps
        .iter()
        .filter(|rp| kept.contains(rp.id.as_str()))
        .cloned()
        .collect();
    Ok((selection.decisions, keep))
}

/// One index object's entries; None if it vanished since it was listed.
fn read_index(vault: &Vault, key: &str) -> Result<Option<Vec<(ChunkId, Location)>>> {
    let sealed = match vault.store().get(key) {
        Ok(s) => s,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let plain = vault
        .keys()
        .open(&index_aad(key), &sealed)
        .map_err(|e| vault.corrupt(key, e.to_string()))?;
    Ok(Some(
        index::decode(&plain).map_err(|e| vault.corrupt(key, e.to_string()))?,
    ))
}

/// An index object that vanished since the listing was rewritten by another prune (its entries
/// moved to an object this listing does not have): deciding without them could take a live pack
/// for dead. Nothing is deleted then.
fn vanished(key: &str) -> Error {
    Error::RunAgain {
        reason: format!(
            "index object {key} was rewritten by another prune while this one read the index; \
             nothing was deleted"
        ),
        what: "prune",
    }
}

/// Pack usage from every index object: total and referenced (marked) sealed bytes per pack.
/// (A chunk listed twice for one pack, by two index objects, is counted twice: rare, and it
/// only nudges the repack decision.)
fn pack_usage(vault: &Vault, index_keys: &[String]) -> Result<HashMap<PackId, Usage>> {
    let mut usage: HashMap<PackId, Usage> = HashMap::new();
    for key in index_keys {
        let Some(entries) = read_index(vault, key)? else {
            return Err(vanished(key));
        };
        for (id, loc) in entries {
            let u = usage.entry(loc.pack).or_default();
            u.total += loc.len as u64;
            if vault.is_marked(&id) {
                u.live += loc.len as u64;
            }
        }
    }
    Ok(usage)
}

/// Deletes the leases of dead (or frozen: B3 refuses them) sessions; returns the live ones.
fn clear_stale_leases(vault: &Vault, report: &mut PruneReport) -> Result<Vec<String>> {
    let leases = gc::read_leases(&vault.gc())?;
    for (key, body) in &leases {
        if !gc::is_live(body) {
            vault.store().delete(key)?;
            report.stale_leases_removed += 1;
        }
    }
    Ok(leases
        .into_iter()
        .filter(|(_, b)| gc::is_live(b))
        .map(|(k, _)| k)
        .collect())
}

/// P3: waits until none of `sessions` is live any more; Some(a session still running) once
/// `max_wait` has passed.
fn wait_for(
    vault: &Vault,
    sessions: &[String],
    max_wait: Duration,
    progress: &dyn Fn(&str),
    report: &mut PruneReport,
) -> Result<Option<String>> {
    let waited = Instant::now();
    if !sessions.is_empty() {
        progress(&format!(
            "waiting for {} running backups to finish",
            sessions.len()
        ));
    }
    let still = loop {
        let leases = gc::read_leases(&vault.gc())?;
        let running = leases
            .into_iter()
            .find(|(k, b)| sessions.contains(k) && gc::is_live(b));
        match running {
            None => break None,
            Some((key, _)) if waited.elapsed() > max_wait => break Some(key),
            Some(_) => std::thread::sleep(Duration::from_millis(200).min(gc::lease_ttl() / 8)),
        }
    };
    report.waited_ms = waited.elapsed().as_millis() as u64;
    Ok(still)
}

/// P5, first half: rewrites every index object naming a pack in `deleted` without those
/// entries. A fresh listing each pass: an object another prune rewrote since (its entries moved
/// to one this prune has not seen) is read in its new form on the next pass. Returns how many
/// objects were rewritten.
fn unindex_packs(vault: &Vault, deleted: &HashSet<PackId>) -> Result<usize> {
    let store = vault.store();
    let mut rewritten = 0;
    let mut written: HashSet<String> = HashSet::new();
    for pass in 0.. {
        let mut rewrote_under_us = false;
        for o in store.list("index/")? {
            if written.contains(&o.key) {
                continue;
            }
            let Some(entries) = read_index(vault, &o.key)? else {
                rewrote_under_us = true;
                continue;
            };
            if !entries.iter().any(|(_, l)| deleted.contains(&l.pack)) {
                continue;
            }
            let keep: Vec<(ChunkId, Location)> = entries
                .into_iter()
                .filter(|(_, l)| !deleted.contains(&l.pack))
                .collect();
            if !keep.is_empty() {
                let new_key = format!("index/{}", hex::encode(rand::random::<[u8; 16]>()));
                let sealed = vault
                    .keys()
                    .seal(&index_aad(&new_key), &index::encode(&keep), None);
                store.put(&new_key, &sealed, PutMode::Create)?;
                written.insert(new_key);
            }
            store.delete(&o.key)?;
            rewritten += 1;
        }
        if !rewrote_under_us {
            break;
        }
        if pass >= 8 {
            // Still rewritten under us: leave the packs (unindexed garbage later, never
            // missing data) for the next prune.
            return Err(Error::RunAgain {
                reason: "another prune keeps rewriting the index; no pack was deleted".into(),
                what: "prune",
            });
        }
    }
    Ok(rewritten)
}

/// Unreferenced bytes in partly used packs that are never worth rewriting packs for.
pub const MIN_REPACK_GAIN: u64 = 1 << 20;

/// Which partly used packs (pack, unreferenced bytes, live share) to repack: those under
/// `repack_below`, then the most garbage-laden until the unreferenced bytes left are within
/// `max_unused` of `reclaimable` or under [`MIN_REPACK_GAIN`]. Sorted by pack id.
fn choose_repack(
    mut partial: Vec<(PackId, u64, f64)>,
    reclaimable: u64,
    repack_below: f64,
    max_unused: f64,
) -> Vec<PackId> {
    partial.sort_by(|a, b| a.2.total_cmp(&b.2).then(a.0.cmp(&b.0)));
    let mut left: u64 = partial.iter().map(|(_, dead, _)| dead).sum();
    let mut repack: Vec<PackId> = Vec::new();
    for (p, dead, share) in &partial {
        if *share < repack_below
            || (left as f64 > max_unused * reclaimable as f64 && left > MIN_REPACK_GAIN)
        {
            repack.push(*p);
            left -= dead;
        }
    }
    repack.sort();
    repack
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::RpKind;
    use crate::catalog::{Asset, TagUpdate, RP_FORMAT};
    use crate::retention::{is_protected, Selection, PROTECTED_TAG};
    use crate::store::{ObjectStore, PutMode, StoreError};
    use std::collections::BTreeMap;

    /// A disk RP of `asset` (one stored chunk) committed to `vault`, created `created`.
    fn disk_rp(vault: &Arc<Vault>, asset: &str, created: &str, seed: u8) -> RecoveryPoint {
        let map = crate::testing::store_disk(vault, &vec![seed; 4096]);
        let rp = RecoveryPoint {
            format: RP_FORMAT,
            id: RecoveryPointId::generate(),
            kind: RpKind::Disk,
            asset: Asset {
                name: asset.into(),
                host: "h".into(),
            },
            created: created.into(),
            parent: None,
            logical_size: map.size,
            bytes_read: 0,
            new_bytes_stored: 0,
            new_chunks: 0,
            duration_ms: 0,
            tags: BTreeMap::new(),
            disk: Some(map),
            instance: None,
            stream: None,
            tree: None,
        };
        vault.commit_rp(&rp).unwrap();
        std::thread::sleep(Duration::from_millis(2)); // distinct, ordered ids
        rp
    }

    fn kept(s: &Selection) -> Vec<(String, bool)> {
        s.decisions
            .iter()
            .map(|d| (d.asset.clone(), d.keep))
            .collect()
    }

    #[test]
    fn assets_match_exactly_unless_a_pattern_is_asked_for() {
        let v = crate::testing::memory_vault(4096);
        let rps: Vec<RecoveryPoint> = ["db", "db-archive", "/dev/sda", "/dev/sda1"]
            .iter()
            .enumerate()
            .flat_map(|(i, a)| {
                let a = *a;
                let v = &v;
                (0..2).map(move |j| disk_rp(v, a, "2026-11-30T10:00:00.000Z", (i * 2 + j) as u8))
            })
            .collect();
        let last1 = Retention {
            keep_last: Some(1),
            ..Retention::default()
        };
        // `--asset db` prunes db only (a substring match also pruned db-archive).
        let s = select(&rps, &last1, Some(&AssetFilter::Exact("db".into())));
        let deleted: Vec<&str> = s
            .decisions
            .iter()
            .filter(|d| !d.keep)
            .map(|d| d.asset.as_str())
            .collect();
        assert_eq!(deleted, vec!["db"]);
        let s = select(&rps, &last1, Some(&AssetFilter::Exact("/dev/sda".into())));
        assert_eq!(s.decisions.iter().filter(|d| !d.keep).count(), 1);
        assert!(s
            .decisions
            .iter()
            .filter(|d| d.asset == "/dev/sda1")
            .all(|d| d.keep));
        // A glob applies to the whole name.
        let s = select(&rps, &last1, Some(&AssetFilter::glob("/dev/sd*").unwrap()));
        assert_eq!(s.decisions.iter().filter(|d| !d.keep).count(), 2);
        let s = select(&rps, &last1, Some(&AssetFilter::glob("db").unwrap()));
        assert_eq!(s.decisions.iter().filter(|d| !d.keep).count(), 1);
        assert!(s.emptied.is_empty());
        assert_eq!(kept(&s).len(), 8);
    }

    /// Two prunes at once: while one reads the index objects it listed, the other rewrites
    /// them (their entries move to objects the first never listed). The first used to skip a
    /// vanished object, take the packs only it indexed for dead and delete them: live RPs lost
    /// data. Now it stops, deleting nothing, and says to run it again.
    #[test]
    fn a_prune_that_finds_the_index_rewritten_by_another_deletes_nothing() {
        let v = crate::testing::memory_vault(4096);
        let rps: Vec<RecoveryPoint> = (0..5)
            .map(|i| disk_rp(&v, "a", "2026-11-30T10:00:00.000Z", i))
            .collect();
        let opts = |keep| PruneOptions {
            retention: Retention {
                keep_last: Some(keep),
                ..Retention::default()
            },
            ..PruneOptions::default()
        };
        let other_ran = std::cell::Cell::new(false);
        let other = |msg: &str| {
            if msg.starts_with("reading") && !other_ran.replace(true) {
                let r = prune(&v, &opts(3), &|_| {}).unwrap();
                assert!(r.index_objects_rewritten > 0, "{r:?}");
            }
        };
        let err = prune(&v, &opts(4), &other).unwrap_err();
        assert!(matches!(err, Error::RunAgain { .. }), "{err}");
        assert!(err.to_string().contains("run prune again"), "{err}");
        // Every RP the second prune kept still reads, and the vault is sound.
        let v = Arc::new(Vault::open(v.store().clone(), b"pw").unwrap());
        let kept = v.list_rps().unwrap();
        assert_eq!(kept.len(), 3);
        for rp in &kept {
            assert!(rps.iter().any(|r| r.id == rp.id));
            let reader =
                crate::reader::DiskReader::new(v.clone(), rp.disk().unwrap().clone(), 1 << 20);
            let mut out = Vec::new();
            reader.read_append(0, 4096, &mut out).unwrap();
            assert_eq!(out.len(), 4096);
        }
        let report = crate::check::check(&v, crate::check::DataCheck::All, &|_| {}).unwrap();
        assert!(report.healthy(), "{report:?}");
    }

    /// A pack spared by P4 (an RP committed during the prune deduplicated against it) used to
    /// stay condemned by the plan forever: every later session treated its chunks as absent,
    /// so an incremental that takes unchanged chunks from its parent's map (EBS, an NBD
    /// overlay saved as an RP) failed with a missing chunk on every run. The finished prune
    /// now releases what it spared.
    #[test]
    fn packs_spared_by_a_prune_are_usable_again_after_it() {
        let v = crate::testing::memory_vault(4096);
        disk_rp(&v, "a", "2026-11-30T10:00:00.000Z", 1);
        disk_rp(&v, "a", "2026-11-30T10:00:00.000Z", 2);
        let opts = PruneOptions {
            retention: Retention {
                keep_last: Some(1),
                ..Retention::default()
            },
            ..PruneOptions::default()
        };
        // While the prune reads the index (after its retention step), a backup of another
        // asset stores what the expired RP held: it deduplicates against the condemned pack.
        let late = std::cell::RefCell::new(None);
        let r = prune(&v, &opts, &|msg: &str| {
            if msg.starts_with("reading") && late.borrow().is_none() {
                *late.borrow_mut() = Some(disk_rp(&v, "b", "2026-11-30T11:00:00.000Z", 1));
            }
        })
        .unwrap();
        assert_eq!(r.packs_spared, 1, "{r:?}");
        let late = late.into_inner().unwrap();
        let plans = gc::read_plans(&v.gc()).unwrap();
        assert!(
            gc::condemned_packs(&plans).is_empty(),
            "the spared pack is released: {plans:?}"
        );
        // A session taking the late RP's chunks from its map finds them.
        let v = Arc::new(Vault::open(v.store().clone(), b"pw").unwrap());
        let session = BackupSession::new(v.clone()).unwrap();
        let map = late.disk().unwrap().clone();
        let mut load = |id: &ChunkId| v.load_page(id).map(Arc::new);
        let mut ids = Vec::new();
        crate::disk_map::MapReader::of(&map, &mut load)
            .walk(&mut |_, entries| {
                ids.extend(entries.iter().flatten().copied());
                Ok(())
            })
            .unwrap();
        assert!(!ids.is_empty());
        for id in &ids {
            session.note_reference(id).unwrap();
        }
    }

    /// A store whose deletes of packs fail after the first: a prune stopped (killed, or
    /// failing) in the middle of deleting packs.
    #[derive(Debug)]
    struct PackDeletesFailAfterOne {
        inner: Arc<dyn ObjectStore>,
        deleted: std::sync::atomic::AtomicUsize,
    }

    impl ObjectStore for PackDeletesFailAfterOne {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<(), StoreError> {
            self.inner.put(key, data, mode)
        }
        fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
            self.inner.get(key)
        }
        fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Vec<u8>, StoreError> {
            self.inner.get_range(key, range)
        }
        fn list(&self, prefix: &str) -> Result<Vec<crate::store::ObjectMeta>, StoreError> {
            self.inner.list(prefix)
        }
        fn delete(&self, key: &str) -> Result<(), StoreError> {
            let n = self.deleted.load(std::sync::atomic::Ordering::Relaxed);
            if key.starts_with("packs/") {
                if n >= 1 {
                    return Err(StoreError::Remote {
                        store: self.location(),
                        key: key.into(),
                        op: "delete",
                        reason: "the prune was stopped here".into(),
                        retryable: false,
                    });
                }
                self.deleted
                    .store(n + 1, std::sync::atomic::Ordering::Relaxed);
            }
            self.inner.delete(key)
        }
    }

    /// A prune stopped after deleting one of the packs it condemned: the index must name only
    /// packs that exist (check healthy, every RP readable), and the next prune finishes the
    /// job. Deleting the packs before rewriting the index (the order until now) left index
    /// entries of a missing pack: check reported the vault damaged (seen once in the
    /// multi-process kill test).
    #[test]
    fn a_prune_stopped_while_deleting_packs_leaves_an_index_of_existing_packs() {
        let (v, store) = crate::testing::memory_vault_and_store(4096);
        for i in 0..4 {
            disk_rp(&v, "a", "2026-11-30T10:00:00.000Z", i);
        }
        let failing: Arc<dyn ObjectStore> = Arc::new(PackDeletesFailAfterOne {
            inner: store.clone(),
            deleted: 0.into(),
        });
        let stopped = Arc::new(Vault::open(failing, b"pw").unwrap());
        let opts = PruneOptions {
            retention: Retention {
                keep_last: Some(1),
                ..Retention::default()
            },
            ..PruneOptions::default()
        };
        let err = prune(&stopped, &opts, &|_| {}).unwrap_err().to_string();
        assert!(err.contains("the prune was stopped here"), "{err}");
        let v = Arc::new(Vault::open(store.clone(), b"pw").unwrap());
        let report = crate::check::check(&v, crate::check::DataCheck::All, &|_| {}).unwrap();
        assert!(report.healthy(), "{report:?}");
        assert!(
            !report.unindexed_packs.is_empty(),
            "the packs not yet deleted are garbage"
        );
        let r = prune(&v, &opts, &|_| {}).unwrap();
        assert!(r.packs_deleted > 0, "{r:?}");
        let report = crate::check::check(&v, crate::check::DataCheck::All, &|_| {}).unwrap();
        assert!(
            report.healthy() && report.unindexed_packs.is_empty(),
            "{report:?}"
        );
    }

    #[test]
    fn a_policy_that_keeps_nothing_is_refused_and_protected_rps_stay() {
        let v = crate::testing::memory_vault(4096);
        let a: Vec<RecoveryPoint> = (0..3)
            .map(|i| disk_rp(&v, "a", "2026-11-30T10:00:00.000Z", i))
            .collect();
        let b = disk_rp(&v, "b", "2026-11-30T10:00:00.000Z", 9);
        let zero_daily = Retention {
            keep_daily: Some(0),
            ..Retention::default()
        };
        let s = select(&v.list_rps().unwrap(), &zero_daily, None);
        assert_eq!(s.emptied.len(), 2, "{:?}", s.emptied);
        let opts = PruneOptions {
            retention: zero_daily.clone(),
            ..PruneOptions::default()
        };
        let err = prune(&v, &opts, &|_| {}).unwrap_err().to_string();
        assert!(err.contains("keeps no recovery point"), "{err}");
        assert!(err.contains("--allow-empty"), "{err}");
        assert_eq!(v.list_rps().unwrap().len(), 4, "nothing was deleted");

        // Protected RPs are kept by any policy, so the asset is not emptied.
        let protect = TagUpdate {
            set: [(PROTECTED_TAG.to_string(), "true".to_string())].into(),
            remove: Vec::new(),
        };
        v.update_tags(&a[0].id, &protect).unwrap();
        v.update_tags(&b.id, &protect).unwrap();
        let r = prune(&v, &opts, &|_| {}).unwrap();
        assert_eq!(r.rps_deleted, 2);
        let left: Vec<RecoveryPointId> = v.list_rps().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(left, vec![a[0].id.clone(), b.id.clone()]);
        assert!(r
            .decisions
            .iter()
            .filter(|d| d.keep)
            .all(|d| d.reasons == vec!["protected".to_string()]));

        // Updates made in quick succession apply in the order they were made (they used to get
        // random order within a millisecond).
        for i in 0..20 {
            let u = if i % 2 == 0 {
                TagUpdate {
                    set: BTreeMap::new(),
                    remove: vec![PROTECTED_TAG.into()],
                }
            } else {
                protect.clone()
            };
            let rp = v.update_tags(&b.id, &u).unwrap();
            assert_eq!(is_protected(&rp), i % 2 == 1, "update {i}");
        }
        // Given explicitly, an emptying policy goes on.
        v.update_tags(
            &b.id,
            &TagUpdate {
                set: BTreeMap::new(),
                remove: vec![PROTECTED_TAG.into()],
            },
        )
        .unwrap();
        let r = prune(
            &v,
            &PruneOptions {
                allow_empty: true,
                ..opts
            },
            &|_| {},
        )
        .unwrap();
        assert_eq!(r.rps_deleted, 1);
        assert_eq!(v.list_rps().unwrap().len(), 1);
    }

    /// An upper-case copy of a catalog entry authenticates (the sealed body is bound to the
    /// lower-cased id). It used to be listed as a second RP, and prune, deciding the "older
    /// duplicate" was surplus, deleted the canonical entry: `--keep-last 2` over three RPs
    /// and one alias deleted two. Now the alias is ignored, check names it, and prune
    /// deletes exactly one RP.
    #[test]
    fn a_non_canonical_catalog_copy_is_ignored_and_reported() {
        let (v, store) = crate::testing::memory_vault_and_store(4096);
        let rps: Vec<RecoveryPoint> = (0..3)
            .map(|i| disk_rp(&v, "a", "2026-11-30T10:00:00.000Z", i))
            .collect();
        let newest = &rps[2].id;
        let alias = format!("catalog/rp-{}", newest.as_str()[3..].to_ascii_uppercase());
        let body = store.get(&newest.catalog_key()).unwrap();
        store
            .put(&alias, &body, crate::store::PutMode::Create)
            .unwrap();
        let listed: Vec<RecoveryPointId> =
            v.list_rps().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(listed, rps.iter().map(|r| r.id.clone()).collect::<Vec<_>>());

        let report = crate::check::check(&v, crate::check::DataCheck::None, &|_| {}).unwrap();
        assert!(
            report.problems.iter().any(|p| p.object == alias),
            "{:?}",
            report.problems
        );
        assert_eq!(report.rps, 3);

        let opts = PruneOptions {
            retention: Retention {
                keep_last: Some(2),
                ..Retention::default()
            },
            ..PruneOptions::default()
        };
        let r = prune(&v, &opts, &|_| {}).unwrap();
        assert_eq!(r.rps_deleted, 1);
        let left: Vec<RecoveryPointId> = v.list_rps().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(left, vec![rps[1].id.clone(), rps[2].id.clone()]);
        // A tag object under a non-canonical name is ignored too.
        let tag_alias = format!("{}JUNK", newest.tags_prefix());
        store
            .put(&tag_alias, b"junk", crate::store::PutMode::Create)
            .unwrap();
        assert_eq!(
            v.list_rps().unwrap().len(),
            2,
            "junk tags do not break listing"
        );
    }

    #[test]
    fn repack_choice_settles() {
        let p = |i: u8| PackId([i; 16]);
        let mib = 1u64 << 20;
        // Packs 40 %, 80 %, 95 % and 99 % live, with 60, 20, 5 and 1 MiB of garbage.
        let partial = vec![
            (p(1), 60 * mib, 0.4),
            (p(2), 20 * mib, 0.8),
            (p(3), 5 * mib, 0.95),
            (p(4), mib, 0.99),
        ];
        // Under 50 % goes; then the most garbage first until at most 10 % of 86 MiB stays.
        assert_eq!(
            choose_repack(partial.clone(), 86 * mib, 0.5, 0.1),
            vec![p(1), p(2)]
        );
        assert_eq!(
            choose_repack(partial.clone(), 86 * mib, 0.5, 0.05),
            vec![p(1), p(2), p(3)]
        );
        assert_eq!(choose_repack(partial, 86 * mib, 0.5, 0.5), vec![p(1)]);
        // What is left under MIN_REPACK_GAIN is not worth rewriting: a prune right after a
        // prune has nothing to do.
        assert!(choose_repack(vec![(p(4), mib, 0.99)], mib, 0.5, 0.1).is_empty());
        assert!(choose_repack(vec![(p(5), 4147, 0.99)], 4147, 0.5, 0.1).is_empty());
        // Above it, the rule applies again.
        assert_eq!(
            choose_repack(vec![(p(6), 3 * mib, 0.9)], 3 * mib, 0.5, 0.1),
            vec![p(6)]
        );
    }
}
