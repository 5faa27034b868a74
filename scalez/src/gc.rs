//! Safe garbage collection with concurrent writers: session leases and prune plans.
//!
//! ## The protocol
//! Backups never take a lock; prune never deletes data a backup could still commit a reference
//! to. Two kinds of small sealed objects coordinate them:
//!
//! * `leases/<session>`: written when a backup session starts, rewritten (heartbeat) every
//!   TTL/4, deleted after its catalog entry is written (or when it is abandoned). TTL is 10
//!   minutes (`ELASTIO_LEASE_TTL` seconds overrides it). A lease whose heartbeat is older than
//!   the TTL belongs to a dead (or frozen) process.
//! * `gc/<plan>`: written by prune **before** it deletes anything: the packs it condemns (no
//!   chunk in them is referenced by any RP) and the leases alive at that moment. Plans are never
//!   deleted; their ULID names order them in time.
//!
//! Backup session (B) and prune (P):
//! * B1. Write the lease. Load every plan: chunks in condemned packs are treated as absent (stored
//!   again, never deduplicated against), and the index prefers their new copies.
//! * B2. Every chunk the session references without storing it (a dedup hit, or a chunk taken from
//!   the parent RP's map) records its pack.
//! * B3. Before committing (`finish`): the lease must be fresh (heartbeat within TTL/2); no plan
//!   may condemn a recorded pack; every recorded pack must still exist. Otherwise the backup fails
//!   ("run it again") and commits nothing.
//! * B4. Write the catalog entry, then delete the lease.
//! * P1. Compute the referenced chunks from every RP retention keeps (map pages included) and
//!   the dead packs: packs none of whose index entries (in any index object, duplicates
//!   included) is referenced. Then delete the expired RPs' catalog entries (a prune that fails
//!   before this point deleted nothing). Every RP not kept here, committed at any time since the
//!   listing, is caught by P4.
//! * P2. Write the plan (condemned = dead packs older than the grace period, sessions = live
//!   leases).
//! * P3. Wait until every lease of the plan is gone or stale.
//! * P4. Re-read the catalog: a pack referenced by an RP that appeared since P1 is spared.
//! * P5. Write new index objects holding the entries of surviving packs, delete the old index
//!   objects, then the condemned packs (killed in between, the index names no missing pack:
//!   the packs left are unindexed garbage for the next prune). Then release what it spared
//!   (a release record for its plan): it will never delete those, so sessions may use them
//!   again. A prune postponed at P3 releases all its packs the same way.
//!
//! ### Why it is safe
//! | race | outcome |
//! |---|---|
//! | B started before P2, deduplicates against a condemned pack | B3 finds the plan (written before B's check) and fails: no RP |
//! | B started after P2 | B1 loaded the plan: never references condemned packs |
//! | B commits between P1 and P3 | P3 waits for B's lease (deleted only after its catalog entry) and P4 spares what B references |
//! | B's process frozen > TTL, then resumes | B3: lease not fresh, fails; see the residual window below |
//! | P killed at any step | plans and deletions are idempotent; the next prune redoes them; unreferenced packs remain garbage, never referenced data |
//! | two prunes at once | both condemn only packs no RP references; deleting twice is harmless. A prune that finds an index object it listed gone (the other rewrote it: its entries moved to an object this one never listed) deletes nothing and stops ("run prune again"), since deciding without those entries could take a live pack for dead; P5 rewrites from fresh listings until no object vanishes under it |
//! | restore reading while P deletes | a live RP never references a condemned pack |
//!
//! Residual window: a process frozen for more than the TTL exactly between its B3 check and its
//! catalog write (microseconds apart) could commit an RP referencing a pack deleted meanwhile;
//! `check` would report it. Clocks of hosts sharing a vault must agree within the TTL.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::crypto::Keys;
use crate::error::Error;
use crate::error::Result;
use crate::ids::PackId;
use crate::store::ObjectStore;
use crate::store::PutMode;

pub const LEASES: &str = "leases/";
pub const PLANS: &str = "gc/";

/// How long a lease lives without a heartbeat.
pub fn lease_ttl() -> Duration {
    std::env::var("ELASTIO_LEASE_TTL")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(600))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseBody {
    pub host: String,
    pub pid: u32,
    pub started_ms: u64,
    pub heartbeat_ms: u64,
}

use crate::format::{lease_aad, plan_aad};

/// What the gc protocol needs of a vault: its store and keys, nothing of its index or catalog
/// (so the vault reads plans through this module without the two depending on each other).
#[derive(Clone)]
pub struct GcStore {
    store: Arc<dyn ObjectStore>,
    keys: Arc<Keys>,
}

impl GcStore {
    pub(crate) fn new(store: Arc<dyn ObjectStore>, keys: Arc<Keys>) -> GcStore {
        GcStore { store, keys }
    }

    fn store(&self) -> &dyn ObjectStore {
        self.store.as_ref()
    }

    fn keys(&self) -> &Keys {
        &self.keys
    }

    fn corrupt(&self, key: &str, detail: String) -> Error {
        Error::Corrupt {
            location: self.store.location(),
            key: key.to_string(),
            detail,
        }
    }
}

/// A backup session's lease; released (deleted) on drop.
pub struct Lease {
    gc: GcStore,
    key: String,
    started_ms: u64,
    last_beat_ms: Arc<AtomicU64>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    beater: Option<JoinHandle<()>>,
}

fn write_lease(gc: &GcStore, key: &str, body: &LeaseBody) -> Result<()> {
    let plain = serde_json::to_vec(body).expect("serialisable");
    let sealed = gc.keys().seal(&lease_aad(key), &plain, None);
    gc.store().put(key, &sealed, PutMode::Overwrite)?;
    Ok(())
}

impl Lease {
    pub fn acquire(gc: &GcStore) -> Result<Lease> {
        let key = format!("{LEASES}{}", ulid::Ulid::new().to_string().to_lowercase());
        let started_ms = now_ms();
        let body = LeaseBody {
            host: hostname(),
            pid: std::process::id(),
            started_ms,
            heartbeat_ms: started_ms,
        };
        write_lease(gc, &key, &body)?;
        let last_beat_ms = Arc::new(AtomicU64::new(started_ms));
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let beater = {
            let (gc, key, last, stop) =
                (gc.clone(), key.clone(), last_beat_ms.clone(), stop.clone());
            std::thread::Builder::new()
                .name("scalez-lease".into())
                .spawn(move || {
                    let period = lease_ttl() / 4;
                    let (lock, cv) = &*stop;
                    loop {
                        // The flag is checked before waiting: a drop that came before this
                        // thread first ran must not leave it (and the drop) waiting a period.
                        let stopped = lock.lock().unwrap();
                        let (stopped, _) = cv.wait_timeout_while(stopped, period, |s| !*s).unwrap();
                        if *stopped {
                            return;
                        }
                        drop(stopped);
                        let now = now_ms();
                        let body = LeaseBody {
                            heartbeat_ms: now,
                            ..body.clone()
                        };
                        match write_lease(&gc, &key, &body) {
                            Ok(()) => last.store(now, Ordering::Relaxed),
                            Err(e) => tracing::warn!("cannot refresh lease {key}: {e}"),
                        }
                    }
                })
                .expect("spawn lease thread")
        };
        Ok(Lease {
            gc: gc.clone(),
            key,
            started_ms,
            last_beat_ms,
            stop,
            beater: Some(beater),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// True if the last heartbeat reached the store within half the TTL: a prune cannot have
    /// judged this session dead.
    pub fn fresh(&self) -> bool {
        now_ms().saturating_sub(self.last_beat_ms.load(Ordering::Relaxed))
            < (lease_ttl() / 2).as_millis() as u64
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.stop;
            *lock.lock().unwrap() = true;
            cv.notify_all();
        }
        if let Some(t) = self.beater.take() {
            let _ = t.join();
        }
        if let Err(e) = self.gc.store().delete(&self.key) {
            tracing::warn!("cannot delete lease {}: {e}", self.key);
        }
    }
}

/// This host's name (leases record it; the agent records it with every asset).
#[allow(unsafe_code)] // gethostname(2)
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Every lease: (key, body). An unreadable lease counts as stale (it cannot be a live session
/// of this vault: those write sealed, authentic leases).
pub fn read_leases(gc: &GcStore) -> Result<Vec<(String, Option<LeaseBody>)>> {
    let mut out = Vec::new();
    for obj in gc.store().list(LEASES)? {
        let body = match gc.store().get(&obj.key) {
            Ok(sealed) => gc
                .keys()
                .open(&lease_aad(&obj.key), &sealed)
                .ok()
                .and_then(|p| serde_json::from_slice(&p).ok()),
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        out.push((obj.key, body));
    }
    Ok(out)
}

/// Whether a lease is live (heartbeat within the TTL).
pub fn is_live(body: &Option<LeaseBody>) -> bool {
    body.as_ref()
        .is_some_and(|b| now_ms().saturating_sub(b.heartbeat_ms) < lease_ttl().as_millis() as u64)
}

/// A prune plan (`gc/<ulid>`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    pub created_ms: u64,
    /// Pack ids (hex) condemned by this plan.
    pub condemned: Vec<String>,
    /// Leases alive when the plan was written.
    pub sessions: Vec<String>,
    /// A release record: the plan (its key) whose prune has finished, without deleting the
    /// packs in `released` (spared by P4 because an RP committed during the prune references
    /// them, or all of them when the prune was postponed at P3). Those packs are no longer
    /// condemned: that prune will never delete them, and sessions may use them again. Other
    /// plans condemning the same packs are not affected (their prunes may still delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finishes: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<String>,
}

pub fn write_plan(gc: &GcStore, plan: &Plan) -> Result<String> {
    let key = format!("{PLANS}{}", ulid::Ulid::new().to_string().to_lowercase());
    let plain = serde_json::to_vec(plan).expect("serialisable");
    let sealed = gc.keys().seal(&plan_aad(&key), &plain, Some(1));
    gc.store().put(&key, &sealed, PutMode::Create)?;
    Ok(key)
}

/// Every plan, oldest first. A plan that does not open is an error: ignoring it could let a
/// backup deduplicate against a deleted pack.
pub fn read_plans(gc: &GcStore) -> Result<Vec<(String, Plan)>> {
    read_plans_with(gc, false)
}

/// Like [`read_plans`], but a damaged plan is skipped with a warning (readers: plans only steer
/// them to the surviving copy of a chunk; `check` reports the damage).
pub fn read_plans_lenient(gc: &GcStore) -> Result<Vec<(String, Plan)>> {
    read_plans_with(gc, true)
}

fn read_plans_with(gc: &GcStore, lenient: bool) -> Result<Vec<(String, Plan)>> {
    let mut keys = gc.store().list(PLANS)?;
    keys.sort_by(|a, b| a.key.cmp(&b.key));
    let mut out = Vec::new();
    for obj in keys {
        let sealed = match gc.store().get(&obj.key) {
            Ok(s) => s,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let plan = gc
            .keys()
            .open(&plan_aad(&obj.key), &sealed)
            .map_err(|e| gc.corrupt(&obj.key, e.to_string()))
            .and_then(|plain| {
                serde_json::from_slice::<Plan>(&plain)
                    .map_err(|e| gc.corrupt(&obj.key, e.to_string()))
            });
        match plan {
            Ok(plan) => out.push((obj.key, plan)),
            Err(e) if lenient => tracing::warn!("skipping a damaged prune plan: {e}"),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The packs any plan condemns.
pub fn condemned_packs(plans: &[(String, Plan)]) -> HashSet<PackId> {
    let mut released: std::collections::HashMap<&str, HashSet<&str>> = Default::default();
    for (_, p) in plans {
        if let Some(of) = &p.finishes {
            let r = released.entry(of.as_str()).or_default();
            r.extend(p.released.iter().map(String::as_str));
        }
    }
    plans
        .iter()
        .flat_map(|(key, p)| {
            let r = released.get(key.as_str());
            p.condemned
                .iter()
                .filter(move |h| r.is_none_or(|r| !r.contains(h.as_str())))
        })
        .filter_map(|h| PackId::from_hex(h))
        .collect()
}

/// Records that the prune of plan `plan_key` has finished without deleting `released` (see
/// [`Plan::finishes`]). Nothing to record when it deleted every pack it condemned.
pub fn release_packs(gc: &GcStore, plan_key: &str, released: &[PackId]) -> Result<()> {
    if released.is_empty() {
        return Ok(());
    }
    let mut released: Vec<String> = released.iter().map(PackId::hex).collect();
    released.sort();
    write_plan(
        gc,
        &Plan {
            created_ms: now_ms(),
            condemned: Vec::new(),
            sessions: Vec::new(),
            finishes: Some(plan_key.to_string()),
            released,
        },
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A release record frees its own plan's packs only: another prune that condemned the
    /// same pack may still delete it, so sessions must keep avoiding it.
    #[test]
    fn a_release_frees_only_its_own_plans_packs() {
        let (x, y) = ("11".repeat(16), "22".repeat(16));
        let plan = |condemned: &[&String]| Plan {
            condemned: condemned.iter().map(|s| s.to_string()).collect(),
            ..Plan::default()
        };
        let release = |of: &str, packs: &[&String]| Plan {
            finishes: Some(of.into()),
            released: packs.iter().map(|s| s.to_string()).collect(),
            ..Plan::default()
        };
        let hex = |set: HashSet<PackId>| {
            let mut v: Vec<String> = set.iter().map(PackId::hex).collect();
            v.sort();
            v
        };
        let plans = vec![
            ("gc/a".to_string(), plan(&[&x, &y])),
            ("gc/b".to_string(), plan(&[&y])),
            ("gc/c".to_string(), release("gc/a", &[&x, &y])),
        ];
        assert_eq!(hex(condemned_packs(&plans)), vec![y.clone()]);
        let plans = vec![plans[0].clone(), plans[2].clone()];
        assert!(condemned_packs(&plans).is_empty());
    }

    /// A lease dropped right after it was taken (a tiny backup) must not wait for its heartbeat
    /// thread's period (150 s by default): the stop flag is seen even if it came first.
    #[test]
    fn a_lease_dropped_at_once_is_released_at_once() {
        let vault = crate::testing::memory_vault(4096);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for _ in 0..50 {
                let lease = Lease::acquire(&vault.gc()).unwrap();
                drop(lease);
            }
            assert!(
                vault.store().list(LEASES).unwrap().is_empty(),
                "leases deleted"
            );
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("50 leases taken and dropped within a minute");
    }
}
