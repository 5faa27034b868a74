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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ec2::types::{Filter, ResourceType, SnapshotState, Tag, TagSpecification, VolumeState};
use futures_util::stream::{FuturesUnordered, StreamExt};
use scalez::disk_map::MapBuilder;
use scalez::reader::DiskReader;
use scalez::{
    Asset, BackupSession, ChunkId, DiskMapRef, RecoveryPoint, RpBody, RpDraft, RpFigures, RpKind,
    SessionStats, Vault,
};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::aws::{call, classify, Aws, CallStats, Failure, RateLimiter};
use crate::block::is_zero;
use crate::error::AgentError;
use crate::progress::{Cancel, Progress};

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
    pub cancel: Cancel,
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
        .await?;
        out.snapshot_id
            .ok_or_else(|| AgentError::Ebs("CreateSnapshot returned no snapshot id".into()))
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
        read_snapshot(vault, aws, &ctx, &info, asset, opts, progress).map(|r| (r, snapshot_wait))
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
    let mut report = read_snapshot(vault, aws, &ctx, &info, asset, opts, progress)?;
    report.calls = ctx.calls();
    report.elapsed = started.elapsed();
    Ok(report)
}

/// A block to read (token) or one that became zeros (None), in index order.
struct Listed {
    index: u64,
    token: Option<String>,
}

type Page = (Vec<Listed>, Option<String>);

async fn list_page(
    aws: &Aws,
    ctx: &Ctx,
    snapshot: &str,
    base: Option<&str>,
    token: Option<String>,
) -> Result<Page, AgentError> {
    let what = || match base {
        Some(b) => format!("ListChangedBlocks {b} -> {snapshot}"),
        None => format!("ListSnapshotBlocks {snapshot}"),
    };
    call(&ctx.aws_calls, None, &what, || async {
        if let Some(base) = base {
            let out = aws
                .ebs
                .list_changed_blocks()
                .first_snapshot_id(base)
                .second_snapshot_id(snapshot)
                .max_results(ctx.page_size)
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(classify)?;
            check_block_size(out.block_size())?;
            let blocks = out
                .changed_blocks()
                .iter()
                .map(|b| Listed {
                    index: b.block_index().unwrap_or(-1) as u64,
                    token: b.second_block_token().map(str::to_string),
                })
                .collect();
            Ok((blocks, out.next_token().map(str::to_string)))
        } else {
            let out = aws
                .ebs
                .list_snapshot_blocks()
                .snapshot_id(snapshot)
                .max_results(ctx.page_size)
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(classify)?;
            check_block_size(out.block_size())?;
            let blocks = out
                .blocks()
                .iter()
                .map(|b| Listed {
                    index: b.block_index().unwrap_or(-1) as u64,
                    token: b.block_token().map(str::to_string),
                })
                .collect();
            Ok((blocks, out.next_token().map(str::to_string)))
        }
    })
    .await
}

fn check_block_size(size: Option<i32>) -> Result<(), Failure> {
    match size {
        Some(s) if s as usize == EBS_BLOCK => Ok(()),
        other => Err(Failure {
            code: None,
            reason: format!("EBS reported block size {other:?}, expected {EBS_BLOCK}"),
            retryable: false,
            throttled: false,
        }),
    }
}

/// Result of one listed block: its sequence number, index and the chunk ids of its slots.
type BlockIds = (u64, u64, Vec<Option<ChunkId>>);

pub(crate) fn read_snapshot(
    vault: &Arc<Vault>,
    aws: &Aws,
    ctx: &Ctx,
    info: &SnapshotInfo,
    asset: Asset,
    opts: &EbsOptions,
    progress: &dyn Progress,
) -> Result<EbsBackupReport, AgentError> {
    let started = Instant::now();
    let cs = vault.config().chunk_size as usize;
    if cs > EBS_BLOCK || (EBS_BLOCK / cs) * cs != EBS_BLOCK {
        return Err(AgentError::Ebs(format!(
            "this vault's chunk size ({cs} bytes) does not divide the EBS block size ({EBS_BLOCK}); \
             back up EBS volumes into a vault made with a chunk size of at most 512 KiB"
        )));
    }
    let per_block = (EBS_BLOCK / cs) as u64;
    let size = info.size_gib * GIB;
    let slots = size / cs as u64;
    let blocks_total = size / EBS_BLOCK as u64;

    // The parent RP and the snapshot it recorded, if that snapshot can still be diffed against.
    let parent = vault.latest_rp(RpKind::Disk, &asset)?;
    let mut draft = RpDraft::new(
        asset,
        parent.as_ref().map(|p| p.id.clone()),
        opts.tags.clone(),
    );
    let parent_map = parent
        .as_ref()
        .and_then(|p| p.disk.clone())
        .filter(|m| m.size == size && m.chunk_size as usize == cs);
    let mut base = match (&parent, &parent_map) {
        (Some(p), Some(_)) => p.tags.get(RP_TAG_SNAPSHOT).cloned(),
        _ => None,
    };
    if let Some(b) = base.clone() {
        let exists = aws.rt.block_on(describe_snapshot(aws, ctx, &b))?;
        if exists.is_none_or(|s| s.state != SnapshotState::Completed.as_str()) {
            progress.message(&format!("previous snapshot {b} is gone: full read"));
            base = None;
        }
    }
    // The first page decides: EBS refuses to diff unrelated snapshots.
    let first_page = aws.rt.block_on(async {
        if let Some(b) = base.as_deref() {
            match list_page(aws, ctx, &info.id, Some(b), None).await {
                Ok(p) => return Ok((p, true)),
                Err(AgentError::Aws { code: Some(c), .. }) if c == "ValidationException" => {
                    progress.message(&format!("EBS cannot diff {b} and {}: full read", info.id));
                }
                Err(e) => return Err(e),
            }
        }
        list_page(aws, ctx, &info.id, None, None)
            .await
            .map(|p| (p, false))
    })?;
    let (first_page, incremental) = first_page;
    if !incremental {
        base = None;
    }
    let parent_reader = if incremental {
        parent_map.map(|m| DiskReader::new(vault.clone(), m, 1 << 20))
    } else {
        None
    };
    progress.start(size);

    let mut session = BackupSession::new(vault.clone())?;
    let workers = opts.workers.max(1);
    // Blocks between the oldest one not yet in the map and the newest one requested: bounds the
    // blocks held in memory (fetched, waiting for a worker or for an earlier block).
    let window = Arc::new(Semaphore::new((opts.concurrency * 2).max(32)));
    let (res_tx, res_rx) = crossbeam_channel::unbounded::<Result<BlockIds, AgentError>>();
    let (work_tx, work_rx) = crossbeam_channel::unbounded::<(u64, u64, Vec<u8>)>();
    let listed = AtomicU64::new(0);
    let fetched = AtomicU64::new(0);

    let (collected, dispatched) = std::thread::scope(|s| {
        let collector = {
            let (window, session, parent_reader) = (&window, &session, &parent_reader);
            s.spawn(move || {
                let r = collect(
                    res_rx,
                    slots,
                    per_block,
                    parent_reader.as_ref(),
                    session,
                    window,
                    progress,
                );
                // Wakes a dispatcher waiting for room in the window.
                window.close();
                r
            })
        };
        for _ in 0..workers {
            let (work_rx, res_tx, session) = (work_rx.clone(), res_tx.clone(), &session);
            s.spawn(move || {
                let keys = session.vault().keys();
                for (seq, index, data) in work_rx {
                    let mut ids = Vec::with_capacity(per_block as usize);
                    let mut r = Ok(());
                    for chunk in data.chunks(cs) {
                        if is_zero(chunk) {
                            ids.push(None);
                        } else {
                            let id = keys.chunk_id(chunk);
                            if let Err(e) = session.store_chunk(id, chunk) {
                                r = Err(e.into());
                                break;
                            }
                            ids.push(Some(id));
                        }
                    }
                    let failed = r.is_err();
                    let _ = res_tx.send(r.map(|()| (seq, index, ids)));
                    if failed {
                        return;
                    }
                }
            });
        }
        drop(work_rx);
        let dispatched = aws.rt.block_on(dispatch(
            Dispatch {
                aws,
                ctx,
                snapshot: &info.id,
                base: base.as_deref(),
                blocks_total,
                concurrency: opts.concurrency.max(1),
                cancel: &opts.cancel,
                window: &window,
                listed: &listed,
                fetched: &fetched,
                per_block,
                res_tx: &res_tx,
                work_tx,
            },
            first_page,
        ));
        if let Err(e) = &dispatched {
            let _ = res_tx.send(Err(AgentError::Ebs(e.to_string())));
        }
        drop(res_tx);
        let collected = collector.join().unwrap_or(Err(AgentError::Panicked));
        (collected, dispatched)
    });
    let read_elapsed = started.elapsed();
    let (depth, root) = match (dispatched, collected) {
        (Err(e), _) => return Err(crate::pipeline::session_cause(e, session)),
        (_, Err(e)) => return Err(crate::pipeline::session_cause(e, session)),
        (Ok(()), Ok(m)) => m,
    };
    let stats = session.finish()?;
    let tags = &mut draft.tags;
    tags.insert(RP_TAG_SNAPSHOT.into(), info.id.clone());
    tags.insert(RP_TAG_REGION.into(), aws.region.clone());
    if info.volume_id.starts_with("vol-") && info.volume_id != "vol-ffffffff" {
        tags.insert(RP_TAG_VOLUME.into(), info.volume_id.clone());
    }
    let blocks_read = fetched.load(Ordering::Relaxed);
    let rp = draft.finish(
        RpBody::Disk(DiskMapRef {
            chunk_size: cs as u32,
            size,
            depth,
            root,
        }),
        RpFigures::stored(size, blocks_read * EBS_BLOCK as u64, &stats),
    );
    session.commit(&rp)?;
    Ok(EbsBackupReport {
        rp,
        snapshot_id: info.id.clone(),
        base_snapshot: base,
        blocks_listed: listed.load(Ordering::Relaxed),
        blocks_read,
        calls: ctx.calls(),
        deleted_snapshots: Vec::new(),
        session: stats,
        snapshot_wait: Duration::ZERO,
        read_elapsed,
        elapsed: started.elapsed(),
    })
}

struct Dispatch<'a> {
    aws: &'a Aws,
    ctx: &'a Ctx,
    snapshot: &'a str,
    base: Option<&'a str>,
    blocks_total: u64,
    concurrency: usize,
    cancel: &'a Cancel,
    window: &'a Semaphore,
    listed: &'a AtomicU64,
    fetched: &'a AtomicU64,
    per_block: u64,
    res_tx: &'a crossbeam_channel::Sender<Result<BlockIds, AgentError>>,
    /// Fetched and verified blocks for the hash/compress/encrypt workers.
    work_tx: crossbeam_channel::Sender<(u64, u64, Vec<u8>)>,
}

/// Walks the listed pages in order (listing the next page while reading the current one) and
/// keeps up to `concurrency` block fetches in flight, each within the window; returns when every
/// fetch has finished. Verified blocks go to the workers; a failure stops everything.
async fn dispatch(d: Dispatch<'_>, first_page: Page) -> Result<(), AgentError> {
    let mut page = first_page;
    let mut seq = 0u64;
    let mut last: Option<u64> = None;
    let mut in_flight = FuturesUnordered::new();
    loop {
        let (blocks, next) = page;
        let next_page = async {
            match next {
                Some(t) => list_page(d.aws, d.ctx, d.snapshot, d.base, Some(t))
                    .await
                    .map(Some),
                None => Ok(None),
            }
        };
        tokio::pin!(next_page);
        let mut next_result = None;
        for b in blocks {
            if d.cancel.is_cancelled() {
                return Err(AgentError::Cancelled);
            }
            if b.index >= d.blocks_total || last.is_some_and(|l| b.index <= l) {
                return Err(AgentError::Ebs(format!(
                    "EBS listed block {} of snapshot {} out of order or beyond its size",
                    b.index as i64, d.snapshot
                )));
            }
            last = Some(b.index);
            // Room in the window and a request slot, while finishing fetches in flight (the
            // collector may be waiting for one of them) and the next page's listing.
            loop {
                let full = in_flight.len() >= d.concurrency;
                tokio::select! {
                    biased;
                    Some(r) = in_flight.next(), if !in_flight.is_empty() => d.finished(r)?,
                    p = &mut next_page, if next_result.is_none() => next_result = Some(p),
                    permit = d.window.acquire(), if !full => match permit {
                        Ok(p) => { p.forget(); break; }
                        Err(_) => return Err(AgentError::Stopped), // the collector stopped
                    },
                }
            }
            d.listed.fetch_add(1, Ordering::Relaxed);
            let my_seq = seq;
            seq += 1;
            match b.token {
                None => {
                    let _ = d
                        .res_tx
                        .send(Ok((my_seq, b.index, vec![None; d.per_block as usize])));
                }
                Some(token) => in_flight.push(fetch_block(
                    d.aws, d.ctx, d.snapshot, my_seq, b.index, token,
                )),
            }
        }
        let next = match next_result {
            Some(r) => r?,
            None => next_page.await?,
        };
        match next {
            Some(p) => page = p,
            None => break,
        }
    }
    while let Some(r) = in_flight.next().await {
        d.finished(r)?;
    }
    Ok(())
}

impl Dispatch<'_> {
    fn finished(&self, r: Result<(u64, u64, Vec<u8>), AgentError>) -> Result<(), AgentError> {
        let block = r?;
        self.fetched.fetch_add(1, Ordering::Relaxed);
        self.work_tx.send(block).map_err(|_| AgentError::Stopped)
    }
}

/// Fetches one block with retries until its data matches the SHA-256 checksum EBS sent.
async fn fetch_block(
    aws: &Aws,
    ctx: &Ctx,
    snapshot: &str,
    seq: u64,
    index: u64,
    token: String,
) -> Result<(u64, u64, Vec<u8>), AgentError> {
    let mut mismatches = 0;
    loop {
        let what = || format!("GetSnapshotBlock {snapshot} block {index}");
        let (data, checksum) = call(&ctx.block_calls, Some(&ctx.limiter), &what, || async {
            let out = aws
                .ebs
                .get_snapshot_block()
                .snapshot_id(snapshot)
                .block_index(index as i32)
                .block_token(&token)
                .send()
                .await
                .map_err(classify)?;
            let checksum = out.checksum().unwrap_or_default().to_string();
            let data = out
                .block_data
                .collect()
                .await
                .map_err(|e| Failure::transient(format!("reading the block body: {e}")))?;
            Ok((data.to_vec(), checksum))
        })
        .await?;
        let sum = aws_smithy_types::base64::encode(Sha256::digest(&data));
        if data.len() == EBS_BLOCK && sum == checksum {
            return Ok((seq, index, data));
        }
        mismatches += 1;
        ctx.checksum_mismatches.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "block {index} of {snapshot}: {} bytes, checksum {checksum:?} but data hashes to {sum:?}",
            data.len()
        );
        if mismatches >= CHECKSUM_ATTEMPTS {
            return Err(AgentError::BlockChecksum {
                snapshot: snapshot.to_string(),
                index,
                attempts: mismatches,
            });
        }
        ctx.block_calls.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(crate::aws::backoff(mismatches)).await;
    }
}

/// Puts block results back in order and builds the map: slots between listed blocks come from
/// the parent (incremental) or are zeros (full read).
fn collect(
    results: crossbeam_channel::Receiver<Result<BlockIds, AgentError>>,
    slots: u64,
    per_block: u64,
    parent: Option<&DiskReader>,
    session: &BackupSession,
    window: &Semaphore,
    progress: &dyn Progress,
) -> Result<(u8, Option<ChunkId>), AgentError> {
    let mut builder = MapBuilder::new(slots);
    let mut store = |page: Vec<u8>| session.store_blob(&page);
    let mut pending: BTreeMap<u64, (u64, Vec<Option<ChunkId>>)> = BTreeMap::new();
    let (mut next_seq, mut next_slot) = (0u64, 0u64);
    let cs = session.vault().config().chunk_size as u64;
    for r in results {
        let (seq, index, ids) = r?;
        pending.insert(seq, (index, ids));
        while let Some((index, ids)) = pending.remove(&next_seq) {
            let first = index * per_block;
            fill(parent, next_slot..first, session, &mut builder, &mut store)?;
            for id in ids {
                builder.push(id, &mut store)?;
            }
            progress.advance((first + per_block - next_slot) * cs);
            next_slot = first + per_block;
            next_seq += 1;
            window.add_permits(1);
        }
    }
    if !pending.is_empty() {
        return Err(AgentError::Stopped);
    }
    fill(parent, next_slot..slots, session, &mut builder, &mut store)?;
    progress.advance((slots - next_slot) * cs);
    let depth = builder.depth();
    Ok((depth, builder.finish(&mut store)?))
}

/// Pushes `range`'s slots from the parent map (or zeros without a parent).
fn fill(
    parent: Option<&DiskReader>,
    range: std::ops::Range<u64>,
    session: &BackupSession,
    builder: &mut MapBuilder,
    store: &mut impl FnMut(Vec<u8>) -> scalez::Result<ChunkId>,
) -> Result<(), AgentError> {
    for slot in range {
        let id = match parent {
            Some(p) => p.chunk_id(slot)?,
            None => None,
        };
        if let Some(id) = &id {
            // Kept from the parent RP: prune must know this RP relies on it.
            session.note_reference(id)?;
        }
        builder.push(id, store)?;
    }
    Ok(())
}

/// Where to put a restored snapshot.
#[derive(Debug, Clone)]
pub struct CreateVolume {
    pub availability_zone: String,
    pub volume_type: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct EbsRestoreOptions {
    pub ebs: EbsOptions,
    pub kms_key_id: Option<String>,
    pub create_volume: Option<CreateVolume>,
}

#[derive(Debug, Clone)]
pub struct EbsRestoreReport {
    pub snapshot_id: String,
    pub volume_id: Option<String>,
    pub size_gib: u64,
    pub blocks_written: u64,
    pub calls: EbsCalls,
    pub elapsed: Duration,
}

/// Writes disk RP `rp` into a new EBS snapshot (and optionally a volume made from it).
pub fn restore_to_snapshot(
    vault: &Arc<Vault>,
    aws: &Aws,
    rp: &RecoveryPoint,
    opts: &EbsRestoreOptions,
    progress: &dyn Progress,
) -> Result<EbsRestoreReport, AgentError> {
    let started = Instant::now();
    let map = rp.disk()?.clone();
    let ctx = Ctx::new(opts.ebs.rate, opts.ebs.page_size);
    let size_gib = map.size.div_ceil(GIB).max(1);
    let blocks = map.size.div_ceil(EBS_BLOCK as u64);
    let client_token = format!("elastio-{}-{:016x}", rp.id, rand::random::<u64>());
    let snapshot_id = aws.rt.block_on(async {
        let what = || format!("StartSnapshot for RP {}", rp.id);
        let out = call(&ctx.aws_calls, None, &what, || async {
            let mut req = aws
                .ebs
                .start_snapshot()
                .volume_size(size_gib as i64)
                .description(format!("elastio restore of RP {} ({})", rp.id, rp.asset.name))
                .client_token(&client_token)
                .timeout(60)
                .tags(
                    aws_sdk_ebs::types::Tag::builder()
                        .key(TAG_CREATED_BY)
                        .value("elastio")
                        .build(),
                )
                .tags(
                    aws_sdk_ebs::types::Tag::builder()
                        .key(TAG_RP)
                        .value(rp.id.to_string())
                        .build(),
                );
            if let Some(k) = &opts.kms_key_id {
                req = req.encrypted(true).kms_key_arn(k);
            }
            req.send().await.map_err(classify)
        })
        .await?;
        match (out.snapshot_id, out.block_size) {
            (Some(id), Some(bs)) if bs as usize == EBS_BLOCK => Ok(id),
            (id, bs) => Err(AgentError::Ebs(format!(
                "StartSnapshot answered snapshot {id:?} with block size {bs:?}, expected {EBS_BLOCK}"
            ))),
        }
    })?;
    progress.message(&format!("writing snapshot {snapshot_id}"));
    progress.start(map.size);

    let reader = Arc::new(DiskReader::new(vault.clone(), map.clone(), 64 << 20));
    reader.enable_readahead(
        (32 * EBS_BLOCK as u64) / map.chunk_size as u64,
        opts.ebs.workers,
    );
    let written = Arc::new(AtomicU64::new(0));
    let failed: Arc<Mutex<Option<AgentError>>> = Arc::new(Mutex::new(None));
    let conc = Arc::new(Semaphore::new(opts.ebs.concurrency.max(1)));
    let ctx = Arc::new(ctx);
    let ebs = aws.ebs.clone();
    let put = (|| {
        for b in 0..blocks {
            if opts.ebs.cancel.is_cancelled() {
                return Err(AgentError::Cancelled);
            }
            if failed.lock().unwrap().is_some() {
                break;
            }
            let offset = b * EBS_BLOCK as u64;
            let runs = reader.extents(offset, EBS_BLOCK as u64, 2)?;
            if !runs.iter().any(|(_, data)| *data) {
                progress.advance(EBS_BLOCK as u64);
                continue;
            }
            let permit = aws
                .rt
                .block_on(conc.clone().acquire_owned())
                .map_err(|_| AgentError::Stopped)?;
            let (reader, written, failed, ctx, ebs) = (
                reader.clone(),
                written.clone(),
                failed.clone(),
                ctx.clone(),
                ebs.clone(),
            );
            let sid = snapshot_id.clone();
            aws.rt.spawn(async move {
                let r = put_block(&ebs, &ctx, &reader, &sid, b).await;
                match r {
                    Ok(true) => {
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        failed.lock().unwrap().get_or_insert(e);
                    }
                }
                drop(permit);
            });
            progress.advance(EBS_BLOCK as u64);
        }
        // Every permit back = every write finished.
        let all = opts.ebs.concurrency.max(1) as u32;
        let _all = aws
            .rt
            .block_on(conc.acquire_many(all))
            .map_err(|_| AgentError::Stopped)?;
        match failed.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })();
    if let Err(e) = put {
        // A pending snapshot with missing blocks must not be completed; EBS fails it after its
        // timeout, and deleting it now frees it at once.
        let _ = aws.rt.block_on(delete_snapshot(aws, &ctx, &snapshot_id));
        return Err(e);
    }
    let count = written.load(Ordering::Relaxed);
    let volume_id = aws.rt.block_on(async {
        let what = || format!("CompleteSnapshot {snapshot_id}");
        let out = call(&ctx.aws_calls, None, &what, || async {
            aws.ebs
                .complete_snapshot()
                .snapshot_id(&snapshot_id)
                .changed_blocks_count(count as i32)
                .send()
                .await
                .map_err(classify)
        })
        .await?;
        if out.status().is_some_and(|s| s.as_str() == "error") {
            return Err(AgentError::Ebs(format!(
                "EBS failed snapshot {snapshot_id} at completion ({count} blocks written)"
            )));
        }
        wait_snapshot(
            aws,
            &ctx,
            &snapshot_id,
            opts.ebs.poll,
            progress,
            &opts.ebs.cancel,
        )
        .await?;
        let Some(cv) = &opts.create_volume else {
            return Ok(None);
        };
        let what = || format!("CreateVolume from {snapshot_id}");
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::Volume)
            .tags(ec2_tag(TAG_CREATED_BY, "elastio"))
            .tags(ec2_tag(TAG_RP, &rp.id.to_string()))
            .build();
        let out = call(&ctx.aws_calls, None, &what, || async {
            let mut req = aws
                .ec2
                .create_volume()
                .snapshot_id(&snapshot_id)
                .availability_zone(&cv.availability_zone)
                .tag_specifications(tags.clone());
            if let Some(t) = &cv.volume_type {
                req = req.volume_type(t.as_str().into());
            }
            if let Some(k) = &opts.kms_key_id {
                req = req.encrypted(true).kms_key_id(k);
            }
            req.send().await.map_err(classify)
        })
        .await?;
        let vol = out
            .volume_id
            .ok_or_else(|| AgentError::Ebs("CreateVolume returned no volume id".into()))?;
        wait_volume(aws, &ctx, &vol, opts.ebs.poll).await?;
        Ok(Some(vol))
    })?;
    Ok(EbsRestoreReport {
        snapshot_id,
        volume_id,
        size_gib,
        blocks_written: count,
        calls: ctx.calls(),
        elapsed: started.elapsed(),
    })
}

/// Reads block `b` of the RP and writes it unless it is all zeros; true if written.
async fn put_block(
    ebs: &aws_sdk_ebs::Client,
    ctx: &Ctx,
    reader: &Arc<DiskReader>,
    snapshot: &str,
    b: u64,
) -> Result<bool, AgentError> {
    let r = reader.clone();
    let (data, checksum) = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; EBS_BLOCK];
        // Past the end of the RP (a size that is not a whole GiB) the block stays zeros.
        r.read_at(b * EBS_BLOCK as u64, &mut buf)?;
        let sum = aws_smithy_types::base64::encode(Sha256::digest(&buf));
        Ok::<_, AgentError>((buf, sum))
    })
    .await
    .map_err(|_| AgentError::Panicked)??;
    if is_zero(&data) {
        return Ok(false);
    }
    let what = || format!("PutSnapshotBlock {snapshot} block {b}");
    call(&ctx.block_calls, Some(&ctx.limiter), &what, || async {
        ebs.put_snapshot_block()
            .snapshot_id(snapshot)
            .block_index(b as i32)
            .block_data(ByteStream::from(data.clone()))
            .data_length(EBS_BLOCK as i32)
            .checksum(&checksum)
            .checksum_algorithm(aws_sdk_ebs::types::ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .send()
            .await
            .map_err(classify)
    })
    .await?;
    Ok(true)
}

pub(crate) async fn wait_volume(
    aws: &Aws,
    ctx: &Ctx,
    id: &str,
    poll: Duration,
) -> Result<(), AgentError> {
    for _ in 0..3600 {
        let what = || format!("DescribeVolumes {id}");
        let out = call(&ctx.aws_calls, None, &what, || async {
            aws.ec2
                .describe_volumes()
                .volume_ids(id)
                .send()
                .await
                .map_err(classify)
        })
        .await?;
        let state = out.volumes().first().and_then(|v| v.state().cloned());
        match state {
            Some(VolumeState::Available) | Some(VolumeState::InUse) => return Ok(()),
            Some(VolumeState::Error) => {
                return Err(AgentError::Ebs(format!("volume {id} failed (state error)")))
            }
            _ => tokio::time::sleep(poll).await,
        }
    }
    Err(AgentError::Ebs(format!(
        "volume {id} did not become available"
    )))
}
