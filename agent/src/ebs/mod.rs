//! EBS volumes without an agent on them: snapshot, read the snapshot through the EBS direct APIs
//! into a disk RP, and write an RP back as a new snapshot (and volume).
//!
//! ## Backup
//! 1. `CreateSnapshot` of the volume, tagged `elastio:created-by`, `elastio:volume-id` and
//!    `elastio:vault`; wait until it is `completed`.
//! 2. The asset is the volume id on host `aws:<region>`. When the asset's latest RP recorded a
//!    snapshot (`ebs:snapshot-id`) that still exists and the volume size is unchanged,
//!    `ListChangedBlocks(previous, new)` gives the blocks to read and every other slot keeps the
//!    parent RP's chunk; otherwise `ListSnapshotBlocks` (a full read). Blocks EBS does not list
//!    are zeros. Pages are listed at the maximum size (10000), the next one while the current is
//!    being read.
//! 3. `GetSnapshotBlock` runs with at most `concurrency` requests in flight and at most `rate`
//!    requests per second; each 512 KiB block's SHA-256 is checked against the checksum EBS sends
//!    (a mismatch is fetched again, and fails the backup naming the snapshot and block after
//!    three). The blocks are cut into vault chunks, hashed, compressed and encrypted on `workers`
//!    threads; the map is assembled in block order as results come in (a sliding window of
//!    blocks bounds memory whatever order they finish in).
//! 4. The RP is committed (tags `ebs:snapshot-id`, `ebs:volume-id`, `ebs:region`), then the
//!    snapshots this tool made of the volume for this vault before the new one are deleted unless
//!    asked to keep them: the newest one stays for the next incremental. A failed backup deletes
//!    the snapshot it made and leaves no RP.
//!
//! ## Restore
//! `StartSnapshot` → `PutSnapshotBlock` of every 512 KiB block that holds data (zero blocks are
//! skipped: a new snapshot reads them as zeros), in parallel with checksums → `CompleteSnapshot`
//! with the number of blocks written → wait for `completed` → optionally `CreateVolume`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{Filter, ResourceType, SnapshotState, Tag, TagSpecification};
use scalez::{Asset, RecoveryPoint, SessionStats, Vault};

use crate::aws::{call, classify, Aws, CallStats, RateLimiter};
use crate::error::AgentError;
use crate::progress::{Cancel, Progress};

mod read;
mod restore;

pub(crate) use read::read_snapshot;
pub(crate) use restore::wait_volume;
pub use restore::{restore_to_snapshot, CreateVolume, EbsRestoreOptions, EbsRestoreReport};

/// The EBS direct APIs' block size.
pub const EBS_BLOCK: usize = 512 * 1024;
const GIB: u64 = 1 << 30;
/// Largest page ListSnapshotBlocks / ListChangedBlocks return.
const MAX_PAGE: i32 = 10000;
/// Consecutive checksum mismatches of one block before the backup fails.
const CHECKSUM_ATTEMPTS: u32 = 3;

pub const TAG_CREATED_BY: &str = "elastio:created-by";
pub const TAG_VOLUME: &str = "elastio:volume-id";
pub const TAG_VAULT: &str = "elastio:vault";
pub const TAG_RP: &str = "elastio:rp-id";
/// RP tags of an EBS backup.
pub const RP_TAG_SNAPSHOT: &str = "ebs:snapshot-id";
pub const RP_TAG_VOLUME: &str = "ebs:volume-id";
pub const RP_TAG_REGION: &str = "ebs:region";
/// RP tag of a backup that stored zeros where the snapshot held stale bytes of free space
/// (`--skip-free`), or kept such zeros from its parent: an incremental on top of it cannot take
/// "not listed as changed" to mean "as the parent RP holds it" for the blocks the parent holds
/// as zeros. The value is the count of blocks skipped by that backup.
pub const RP_TAG_FREE_SKIPPED: &str = "ebs:free-skipped";

/// Knobs of an EBS backup or restore.
#[derive(Debug, Clone)]
pub struct EbsOptions {
    pub tags: BTreeMap<String, String>,
    /// Block requests in flight. AWS allows 1000 GetSnapshotBlock requests/s per snapshot; at
    /// the typical 50-100 ms per request 64 in flight reach it.
    pub concurrency: usize,
    /// Block requests per second at most.
    pub rate: f64,
    /// Hash/compress/encrypt threads.
    pub workers: usize,
    /// Keep the older snapshots this tool made of the volume (default: delete all but the newest).
    pub keep_snapshots: bool,
    /// How often to poll a snapshot's state.
    pub poll: Duration,
    /// Blocks per list page (100..=10000; AWS's maximum unless testing paging).
    pub page_size: i32,
    /// Runs around the snapshot call (pre-command, freeze, thaw, post-command).
    pub quiesce: Option<Hook>,
    /// Share (0..=1) of the blocks an incremental takes from the parent unread (EBS did not list
    /// them as changed) that are read anyway and compared; a difference fails the backup.
    pub verify_share: f64,
    /// A sampled block that differs starts the read over in full (else the backup fails).
    pub full_read_on_mismatch: bool,
    pub cancel: Cancel,
}

/// Free byte ranges on each EBS volume (by id): sorted, disjoint.
pub(crate) type VolumesFree = BTreeMap<String, Vec<(u64, u64)>>;

/// Places the free space the file systems frozen for a snapshot reported on the EBS volumes
/// under them (a partition's ranges shifted by its start, as sysfs said while they were
/// frozen). A file system not directly on an EBS volume, or one that did not answer, is read
/// whole (said through `progress`); so is a volume where two of them overlap.
pub(crate) fn free_on_volumes(hook: Option<&Hook>, progress: &dyn Progress) -> VolumesFree {
    // Per volume: (start, end, free ranges) of each file system on it.
    type Part = (u64, u64, Vec<(u64, u64)>);
    let mut extents: BTreeMap<String, Vec<Part>> = BTreeMap::new();
    let Some(hook) = hook else {
        return VolumesFree::new();
    };
    for m in hook.0.free_space() {
        let (ext, ranges) = match (m.extent, m.free) {
            (Ok(x), Ok(r)) => (x, r),
            (Err(e), _) => {
                progress.message(&format!("{}: free space not used ({e})", m.mount.display()));
                continue;
            }
            (_, Err(e)) => {
                progress.message(&format!(
                    "{}: no free-space map ({e}); read whole",
                    m.mount.display()
                ));
                continue;
            }
        };
        let shifted = ranges
            .into_iter()
            .filter_map(|(s, e)| {
                let (s, e) = (s.min(ext.len), e.min(ext.len));
                (s < e).then(|| (ext.start + s, ext.start + e))
            })
            .collect();
        extents
            .entry(ext.volume_id)
            .or_default()
            .push((ext.start, ext.start + ext.len, shifted));
    }
    let mut out = VolumesFree::new();
    for (volume, mut parts) in extents {
        parts.sort_by_key(|p| p.0);
        if parts.windows(2).any(|w| w[1].0 < w[0].1) {
            progress.message(&format!(
                "{volume}: frozen file systems overlap on it; free space not used"
            ));
            continue;
        }
        out.insert(volume, parts.into_iter().flat_map(|p| p.2).collect());
    }
    out
}

/// A [`SnapshotHook`](crate::freeze::SnapshotHook) shared by the calls of one backup.
#[derive(Clone)]
pub struct Hook(pub Arc<dyn crate::freeze::SnapshotHook>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotHook")
    }
}

impl Default for EbsOptions {
    fn default() -> Self {
        EbsOptions {
            tags: BTreeMap::new(),
            concurrency: 64,
            rate: 1000.0,
            workers: crate::pipeline::default_workers(),
            keep_snapshots: false,
            poll: Duration::from_secs(1),
            page_size: MAX_PAGE,
            quiesce: None,
            verify_share: 0.01,
            full_read_on_mismatch: false,
            cancel: Cancel::new(),
        }
    }
}

/// Counts of the calls an operation made.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EbsCalls {
    /// GetSnapshotBlock or PutSnapshotBlock attempts.
    pub block_requests: u64,
    /// Other EBS and EC2 attempts (list pages, snapshot and volume calls, polls).
    pub other_requests: u64,
    pub retries: u64,
    pub throttled: u64,
    pub checksum_mismatches: u64,
}

#[derive(Debug, Clone)]
pub struct EbsBackupReport {
    pub rp: RecoveryPoint,
    pub snapshot_id: String,
    /// The earlier snapshot the changed blocks were listed against (None: full read).
    pub base_snapshot: Option<String>,
    /// Blocks listed (changed blocks, or every block of a full read).
    pub blocks_listed: u64,
    /// Blocks read with GetSnapshotBlock.
    pub blocks_read: u64,
    /// Of the blocks an incremental took from the parent, those read anyway and compared.
    pub blocks_verified: u64,
    /// Listed blocks not read because the file systems on the volume, frozen for the snapshot,
    /// reported them free (`--skip-free`); they are stored as zeros.
    pub blocks_free: u64,
    /// Why an incremental started over as a full read (a sampled block differed).
    pub fell_back: Option<String>,
    pub calls: EbsCalls,
    pub deleted_snapshots: Vec<String>,
    pub session: SessionStats,
    /// Waiting for the snapshot to complete.
    pub snapshot_wait: Duration,
    /// Listing and reading blocks.
    pub read_elapsed: Duration,
    pub elapsed: Duration,
}

pub(crate) struct Ctx {
    page_size: i32,
    pub(crate) aws_calls: CallStats,
    block_calls: CallStats,
    checksum_mismatches: AtomicU64,
    limiter: RateLimiter,
}

impl Ctx {
    pub(crate) fn new(rate: f64, page_size: i32) -> Ctx {
        Ctx {
            page_size: page_size.clamp(100, MAX_PAGE),
            aws_calls: CallStats::default(),
            block_calls: CallStats::default(),
            checksum_mismatches: AtomicU64::new(0),
            limiter: RateLimiter::new(rate),
        }
    }

    pub(crate) fn calls(&self) -> EbsCalls {
        let (oc, or, ot) = self.aws_calls.get();
        let (bc, br, bt) = self.block_calls.get();
        EbsCalls {
            block_requests: bc,
            other_requests: oc,
            retries: or + br,
            throttled: ot + bt,
            checksum_mismatches: self.checksum_mismatches.load(Ordering::Relaxed),
        }
    }
}

pub(crate) fn ec2_tag(k: &str, v: &str) -> Tag {
    Tag::builder().key(k).value(v).build()
}

/// The asset an EBS volume is recorded as.
pub fn volume_asset(region: &str, volume_id: &str) -> Asset {
    Asset {
        name: volume_id.to_string(),
        host: format!("aws:{region}"),
    }
}

/// Facts about a snapshot from EC2.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub id: String,
    pub volume_id: String,
    pub size_gib: u64,
    pub state: String,
    pub progress: String,
}

pub(crate) async fn describe_snapshot(
    aws: &Aws,
    ctx: &Ctx,
    id: &str,
) -> Result<Option<SnapshotInfo>, AgentError> {
    let what = || format!("DescribeSnapshots {id}");
    let out = call(&ctx.aws_calls, None, &what, || async {
        match aws.ec2.describe_snapshots().snapshot_ids(id).send().await {
            Ok(o) => Ok(Some(o)),
            Err(e) => {
                let f = classify(e);
                if f.code.as_deref() == Some("InvalidSnapshot.NotFound") {
                    Ok(None)
                } else {
                    Err(f)
                }
            }
        }
    })
    .await?;
    let Some(s) = out.and_then(|o| o.snapshots.unwrap_or_default().into_iter().next()) else {
        return Ok(None);
    };
    Ok(Some(SnapshotInfo {
        id: id.to_string(),
        volume_id: s.volume_id().unwrap_or_default().to_string(),
        size_gib: s.volume_size().unwrap_or(0).max(0) as u64,
        state: s
            .state()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        progress: s.progress().unwrap_or_default().to_string(),
    }))
}

/// Polls until the snapshot is `completed`; `error` or disappearance fail.
pub(crate) async fn wait_snapshot(
    aws: &Aws,
    ctx: &Ctx,
    id: &str,
    poll: Duration,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<SnapshotInfo, AgentError> {
    loop {
        if cancel.is_cancelled() {
            return Err(AgentError::Cancelled);
        }
        let info = describe_snapshot(aws, ctx, id)
            .await?
            .ok_or_else(|| AgentError::Ebs(format!("snapshot {id} disappeared while pending")))?;
        match info.state.as_str() {
            s if s == SnapshotState::Completed.as_str() => return Ok(info),
            s if s == SnapshotState::Error.as_str() => {
                return Err(AgentError::Ebs(format!(
                    "snapshot {id} failed (state error)"
                )))
            }
            _ => progress.message(&format!("snapshot {id} {}", info.progress)),
        }
        tokio::time::sleep(poll).await;
    }
}

pub(crate) async fn delete_snapshot(aws: &Aws, ctx: &Ctx, id: &str) -> Result<(), AgentError> {
    let what = || format!("DeleteSnapshot {id}");
    call(&ctx.aws_calls, None, &what, || async {
        aws.ec2
            .delete_snapshot()
            .snapshot_id(id)
            .send()
            .await
            .map(|_| ())
            .map_err(classify)
    })
    .await
}

/// Snapshots `volume_id`, reads the snapshot into a new disk RP (incrementally when possible),
/// then deletes the older snapshots this tool made of the volume for this vault.
pub fn backup_volume(
    vault: &Arc<Vault>,
    aws: &Aws,
    volume_id: &str,
    opts: &EbsOptions,
    progress: &dyn Progress,
) -> Result<EbsBackupReport, AgentError> {
    let started = Instant::now();
    let ctx = Ctx::new(opts.rate, opts.page_size);
    let vault_id = vault.config().vault_id.clone();
    let snapshot_id = aws.rt.block_on(async {
        let what = || format!("DescribeVolumes {volume_id}");
        let vols = call(&ctx.aws_calls, None, &what, || async {
            aws.ec2
                .describe_volumes()
                .volume_ids(volume_id)
                .send()
                .await
                .map_err(classify)
        })
        .await?;
        if vols.volumes().is_empty() {
            return Err(AgentError::Ebs(format!(
                "volume {volume_id} not found in {}",
                aws.region
            )));
        }
        let what = || format!("CreateSnapshot of {volume_id}");
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::Snapshot)
            .tags(ec2_tag(TAG_CREATED_BY, "elastio"))
            .tags(ec2_tag(TAG_VOLUME, volume_id))
            .tags(ec2_tag(TAG_VAULT, &vault_id))
            .build();
        if let Some(h) = &opts.quiesce {
            h.0.before()?;
        }
        let out = call(&ctx.aws_calls, None, &what, || async {
            aws.ec2
                .create_snapshot()
                .volume_id(volume_id)
                .description(format!("elastio backup of {volume_id}"))
                .tag_specifications(tags.clone())
                .send()
                .await
                .map_err(classify)
        })
        .await;
        let resumed = opts.quiesce.as_ref().map_or(Ok(()), |h| h.0.after());
        let id = out?
            .snapshot_id
            .ok_or_else(|| AgentError::Ebs("CreateSnapshot returned no snapshot id".into()))?;
        if let Err(e) = resumed {
            // Not the consistent point in time asked for: no backup from it.
            if let Err(de) = delete_snapshot(aws, &ctx, &id).await {
                tracing::warn!("cannot delete snapshot {id}: {de}");
            }
            return Err(e);
        }
        Ok(id)
    })?;
    progress.message(&format!("snapshot {snapshot_id} of {volume_id} started"));
    let result = (|| {
        let waited = Instant::now();
        let info = aws.rt.block_on(wait_snapshot(
            aws,
            &ctx,
            &snapshot_id,
            opts.poll,
            progress,
            &opts.cancel,
        ))?;
        let snapshot_wait = waited.elapsed();
        let asset = volume_asset(&aws.region, volume_id);
        let free = free_on_volumes(opts.quiesce.as_ref(), progress);
        let free = free.get(volume_id).map(Vec::as_slice);
        read_snapshot(vault, aws, &ctx, &info, asset, opts, free, progress)
            .map(|r| (r, snapshot_wait))
    })();
    let (mut report, snapshot_wait) = match result {
        Ok(r) => r,
        Err(e) => {
            // Nothing references the new snapshot: remove it (the previous one stays).
            if let Err(de) = aws.rt.block_on(delete_snapshot(aws, &ctx, &snapshot_id)) {
                tracing::warn!("cannot delete snapshot {snapshot_id} after a failed backup: {de}");
            }
            return Err(e);
        }
    };
    report.snapshot_wait = snapshot_wait;
    if !opts.keep_snapshots {
        report.deleted_snapshots = aws.rt.block_on(prune_snapshots(
            aws,
            &ctx,
            volume_id,
            &vault_id,
            &snapshot_id,
        ))?;
    }
    report.calls = ctx.calls();
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Deletes the snapshots this tool made of `volume_id` for vault `vault_id`, except `keep`.
pub(crate) async fn prune_snapshots(
    aws: &Aws,
    ctx: &Ctx,
    volume_id: &str,
    vault_id: &str,
    keep: &str,
) -> Result<Vec<String>, AgentError> {
    let what = || format!("DescribeSnapshots of {volume_id}");
    let out = call(&ctx.aws_calls, None, &what, || async {
        aws.ec2
            .describe_snapshots()
            .owner_ids("self")
            .filters(
                Filter::builder()
                    .name(format!("tag:{TAG_VOLUME}"))
                    .values(volume_id)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name(format!("tag:{TAG_VAULT}"))
                    .values(vault_id)
                    .build(),
            )
            .send()
            .await
            .map_err(classify)
    })
    .await?;
    let mut deleted = Vec::new();
    for s in out.snapshots() {
        let Some(id) = s.snapshot_id() else { continue };
        let ours = s
            .tags()
            .iter()
            .any(|t| t.key() == Some(TAG_CREATED_BY) && t.value() == Some("elastio"));
        if id != keep && ours {
            delete_snapshot(aws, ctx, id).await?;
            deleted.push(id.to_string());
        }
    }
    Ok(deleted)
}

/// Backs up an existing snapshot (made by anyone): incremental against the asset's previous RP
/// when EBS relates the two snapshots.
pub fn import_snapshot(
    vault: &Arc<Vault>,
    aws: &Aws,
    snapshot_id: &str,
    opts: &EbsOptions,
    progress: &dyn Progress,
) -> Result<EbsBackupReport, AgentError> {
    let started = Instant::now();
    let ctx = Ctx::new(opts.rate, opts.page_size);
    let info = aws.rt.block_on(async {
        let info = describe_snapshot(aws, &ctx, snapshot_id)
            .await?
            .ok_or_else(|| {
                AgentError::Ebs(format!(
                    "snapshot {snapshot_id} not found in {}",
                    aws.region
                ))
            })?;
        wait_snapshot(aws, &ctx, snapshot_id, opts.poll, progress, &opts.cancel).await?;
        Ok::<_, AgentError>(info)
    })?;
    // Snapshots made through the EBS direct APIs report the placeholder volume vol-ffffffff.
    let name = if info.volume_id.is_empty() || info.volume_id == "vol-ffffffff" {
        snapshot_id.to_string()
    } else {
        info.volume_id.clone()
    };
    let asset = volume_asset(&aws.region, &name);
    let mut report = read_snapshot(vault, aws, &ctx, &info, asset, opts, None, progress)?;
    report.calls = ctx.calls();
    report.elapsed = started.elapsed();
    Ok(report)
}
