//! Reading a snapshot through the EBS direct APIs into a disk RP (steps 2 and 3 of the backup).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::SnapshotState;
use futures_util::stream::{FuturesUnordered, StreamExt};
use scalez::disk_writer::{DiskWriter, MapAssembly};
use scalez::reader::DiskReader;
use scalez::{Asset, ChunkId, DiskMapRef, RecoveryPoint, RpDraft, RpKind, Vault};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::*;
use crate::aws::{call, classify, Aws, Failure};
use crate::error::AgentError;
use crate::progress::{Cancel, Progress};

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
        other => Err(Failure::fatal(format!(
            "EBS reported block size {other:?}, expected {EBS_BLOCK}"
        ))),
    }
}

/// Result of one listed block: its sequence number, index and the chunk ids of its slots.
type BlockIds = (u64, u64, Vec<Option<ChunkId>>);

/// Reads snapshot `info` into a disk RP of `asset`. The listed blocks wholly inside `free`
/// (byte ranges the volume's file systems, frozen for this very snapshot, reported free) are
/// not fetched and stored as zeros.
#[allow(clippy::too_many_arguments)]
pub(crate) fn read_snapshot(
    vault: &Arc<Vault>,
    aws: &Aws,
    ctx: &Ctx,
    info: &SnapshotInfo,
    asset: Asset,
    opts: &EbsOptions,
    free: Option<&[(u64, u64)]>,
    progress: &dyn Progress,
) -> Result<EbsBackupReport, AgentError> {
    let free = free.map(FreeBlocks::new);
    let free = free.as_ref();
    match read_snapshot_once(
        vault,
        aws,
        ctx,
        info,
        asset.clone(),
        opts,
        free,
        progress,
        false,
    ) {
        Err(AgentError::UnchangedDiffers(why)) if opts.full_read_on_mismatch => {
            progress.message(&format!("{why}: starting over with a full read"));
            let mut r =
                read_snapshot_once(vault, aws, ctx, info, asset, opts, free, progress, true)?;
            r.fell_back = Some(why);
            Ok(r)
        }
        r => r,
    }
}

/// One read of `info`; `full`: read every block even when an incremental is possible.
#[allow(clippy::too_many_arguments)]
fn read_snapshot_once(
    vault: &Arc<Vault>,
    aws: &Aws,
    ctx: &Ctx,
    info: &SnapshotInfo,
    asset: Asset,
    opts: &EbsOptions,
    free: Option<&FreeBlocks>,
    progress: &dyn Progress,
    full: bool,
) -> Result<EbsBackupReport, AgentError> {
    let started = Instant::now();
    let cs = vault.config().chunk_size as usize;
    if cs > EBS_BLOCK || (EBS_BLOCK / cs) * cs != EBS_BLOCK {
        return Err(AgentError::Ebs(format!(
            "this vault's chunk size ({cs} bytes) does not divide the EBS block size ({EBS_BLOCK}); \
             back up EBS volumes into a vault made with a chunk size of at most 512 KiB"
        )));
    }
    let size = info.size_gib * GIB;
    let parent = vault.latest_rp(RpKind::Disk, &asset)?;
    let parent_skipped = !full
        && parent
            .as_ref()
            .is_some_and(|p| p.tags.contains_key(RP_TAG_FREE_SKIPPED));
    let mut draft = RpDraft::new(
        asset,
        parent.as_ref().map(|p| p.id.clone()),
        opts.tags.clone(),
    );
    let ReadPlan {
        base,
        first_page,
        parent,
    } = plan_read(
        vault,
        aws,
        ctx,
        info,
        parent.as_ref().filter(|_| !full),
        size,
        progress,
    )?;
    // The parent holds zeros where its snapshot held stale free space: the blocks it holds as
    // zeros that this snapshot holds, and that are not free now, are read too.
    let per_block = (EBS_BLOCK / cs) as u64;
    let stale = match (&base, &parent) {
        (Some(_), Some(p)) if parent_skipped => {
            match aws.rt.block_on(stale_blocks(
                aws,
                ctx,
                &info.id,
                p,
                free,
                per_block,
                size / EBS_BLOCK as u64,
            ))? {
                Some(v) => v,
                None => {
                    progress.message(&format!(
                        "more than {MAX_STALE} blocks the parent skipped as free hold data now: \
                         full read"
                    ));
                    return read_snapshot_once(
                        vault,
                        aws,
                        ctx,
                        info,
                        draft.asset,
                        opts,
                        free,
                        progress,
                        true,
                    );
                }
            }
        }
        _ => Vec::new(),
    };
    progress.start(size);
    let writer = DiskWriter::new(vault, size)?;
    let read = ReadBlocks {
        stale: &stale,
        aws,
        ctx,
        opts,
        progress,
        snapshot: &info.id,
        free,
        listed: AtomicU64::new(0),
        fetched: AtomicU64::new(0),
        free_skipped: AtomicU64::new(0),
        sampled: std::sync::Mutex::new(Vec::new()),
    };
    let map = match read.run(&writer, base.as_deref(), first_page, parent.as_ref()) {
        Ok(map) => map,
        Err(e) => return Err(crate::pipeline::session_cause(e, writer.abandon())),
    };
    // Trust but verify: a sample of the blocks EBS did not list is read and compared.
    let sampled = std::mem::take(&mut *read.sampled.lock().expect("samples"));
    let verified = sampled.len() as u64;
    if let (Some(b), Some(p), false) = (&base, &parent, sampled.is_empty()) {
        let parent_id = draft
            .parent
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default();
        let checked = aws.rt.block_on(verify_unlisted(
            aws,
            ctx,
            &info.id,
            b,
            &parent_id,
            p,
            &writer,
            sampled,
            &opts.cancel,
        ));
        if let Err(e) = checked {
            return Err(crate::pipeline::session_cause(e, writer.abandon()));
        }
    }
    let read_elapsed = started.elapsed();
    let tags = &mut draft.tags;
    let skipped = read.free_skipped.load(Ordering::Relaxed);
    // Zeros over stale bytes: skipped now, or kept from a parent that skipped them.
    if skipped > 0 || (parent_skipped && base.is_some() && free.is_some()) {
        tags.insert(RP_TAG_FREE_SKIPPED.into(), skipped.to_string());
    }
    tags.insert(RP_TAG_SNAPSHOT.into(), info.id.clone());
    tags.insert(RP_TAG_REGION.into(), aws.region.clone());
    if info.volume_id.starts_with("vol-") && info.volume_id != "vol-ffffffff" {
        tags.insert(RP_TAG_VOLUME.into(), info.volume_id.clone());
    }
    let blocks_read = read.fetched.load(Ordering::Relaxed);
    let (rp, stats) = writer.commit(draft, map, blocks_read * EBS_BLOCK as u64)?;
    Ok(EbsBackupReport {
        rp,
        snapshot_id: info.id.clone(),
        base_snapshot: base,
        blocks_listed: read.listed.load(Ordering::Relaxed),
        blocks_read,
        blocks_verified: verified,
        blocks_free: skipped,
        fell_back: None,
        calls: ctx.calls(),
        deleted_snapshots: Vec::new(),
        session: stats,
        snapshot_wait: Duration::ZERO,
        read_elapsed,
        elapsed: started.elapsed(),
    })
}

/// What to read: every block, or the blocks changed since the snapshot the parent RP recorded
/// (when that snapshot still exists, the size is unchanged and EBS agrees to diff them).
struct ReadPlan {
    /// The snapshot blocks are listed against (None: full read).
    base: Option<String>,
    first_page: Page,
    /// The parent RP's map, for the slots EBS does not list (incremental reads only).
    parent: Option<DiskReader>,
}

fn plan_read(
    vault: &Arc<Vault>,
    aws: &Aws,
    ctx: &Ctx,
    info: &SnapshotInfo,
    parent: Option<&RecoveryPoint>,
    size: u64,
    progress: &dyn Progress,
) -> Result<ReadPlan, AgentError> {
    let cs = vault.config().chunk_size;
    let parent_map = parent
        .and_then(|p| p.disk.clone())
        .filter(|m| m.size == size && m.chunk_size == cs);
    let mut base = match (parent, &parent_map) {
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
    let (first_page, incremental) = aws.rt.block_on(async {
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
    Ok(ReadPlan {
        base: base.filter(|_| incremental),
        first_page,
        parent: parent_map
            .filter(|_| incremental)
            .map(|m| DiskReader::new(vault.clone(), m, 1 << 20)),
    })
}

/// One read of a snapshot's blocks into a [`DiskWriter`]: the dispatcher fetches blocks,
/// `workers` threads store them, one collector assembles the map in block order.
struct ReadBlocks<'a> {
    aws: &'a Aws,
    ctx: &'a Ctx,
    opts: &'a EbsOptions,
    progress: &'a dyn Progress,
    snapshot: &'a str,
    free: Option<&'a FreeBlocks>,
    /// Unlisted blocks to read anyway (see [`stale_blocks`]), ascending.
    stale: &'a [u64],
    listed: AtomicU64,
    fetched: AtomicU64,
    free_skipped: AtomicU64,
    /// Unlisted blocks picked for verification (incremental reads).
    sampled: std::sync::Mutex<Vec<u64>>,
}

impl ReadBlocks<'_> {
    fn run(
        &self,
        writer: &DiskWriter,
        base: Option<&str>,
        first_page: Page,
        parent: Option<&DiskReader>,
    ) -> Result<DiskMapRef, AgentError> {
        let per_block = (EBS_BLOCK / writer.chunk_size()) as u64;
        // Blocks between the oldest one not yet in the map and the newest one requested: bounds
        // the blocks held in memory (fetched, waiting for a worker or for an earlier block).
        let window = Semaphore::new((self.opts.concurrency * 2).max(32));
        let (res_tx, res_rx) = crossbeam_channel::unbounded::<Result<BlockIds, AgentError>>();
        let (work_tx, work_rx) = crossbeam_channel::unbounded::<(u64, u64, Vec<u8>)>();
        let (collected, dispatched) = std::thread::scope(|s| {
            let collector = s.spawn(|| {
                let r = collect(res_rx, per_block, parent, writer, &window, self.progress);
                // Wakes a dispatcher waiting for room in the window.
                window.close();
                r
            });
            for _ in 0..self.opts.workers.max(1) {
                let (work_rx, res_tx) = (work_rx.clone(), res_tx.clone());
                s.spawn(move || store_blocks(work_rx, res_tx, writer));
            }
            drop(work_rx);
            let dispatched = self.aws.rt.block_on(dispatch(
                Dispatch {
                    aws: self.aws,
                    ctx: self.ctx,
                    snapshot: self.snapshot,
                    base,
                    blocks_total: writer.slots() / per_block,
                    concurrency: self.opts.concurrency.max(1),
                    cancel: &self.opts.cancel,
                    window: &window,
                    listed: &self.listed,
                    free: self.free,
                    stale: self.stale,
                    free_skipped: &self.free_skipped,
                    sample: base.map(|_| (&self.sampled, self.opts.verify_share)),
                    fetched: &self.fetched,
                    per_block,
                    res_tx: &res_tx,
                    work_tx,
                },
                first_page,
            ));
            if dispatched.is_err() {
                // Stops the collector; the dispatcher's own error is the one returned.
                let _ = res_tx.send(Err(AgentError::Stopped));
            }
            drop(res_tx);
            let collected = collector.join().unwrap_or(Err(AgentError::Panicked));
            (collected, dispatched)
        });
        match (dispatched, collected) {
            // The dispatcher stopped because a worker or the collector failed: that is the cause.
            (Err(AgentError::Stopped), Err(e)) => Err(e),
            (Err(e), _) => Err(e),
            (Ok(()), collected) => collected,
        }
    }
}

/// One worker: stores the chunks of each fetched block and sends their ids to the collector.
fn store_blocks(
    work: crossbeam_channel::Receiver<(u64, u64, Vec<u8>)>,
    results: crossbeam_channel::Sender<Result<BlockIds, AgentError>>,
    writer: &DiskWriter,
) {
    for (seq, index, data) in work {
        let r = writer.put(&data).map_err(AgentError::from);
        let failed = r.is_err();
        let _ = results.send(r.map(|ids| (seq, index, ids)));
        if failed {
            return;
        }
    }
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
    free: Option<&'a FreeBlocks>,
    stale: &'a [u64],
    free_skipped: &'a AtomicU64,
    fetched: &'a AtomicU64,
    per_block: u64,
    /// Incremental reads: where to put the unlisted blocks picked, and the share to pick.
    sample: Option<(&'a std::sync::Mutex<Vec<u64>>, f64)>,
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
    let mut last_listed: Option<u64> = None;
    let mut stale = d.stale.iter().copied().peekable();
    let mut in_flight = FuturesUnordered::new();
    loop {
        let (blocks, next) = page;
        // The listed blocks with the stale ones merged in, in index order.
        let mut items: Vec<(u64, Option<String>, bool)> = Vec::with_capacity(blocks.len());
        for b in blocks {
            if b.index >= d.blocks_total || last_listed.is_some_and(|l| b.index <= l) {
                return Err(AgentError::Ebs(format!(
                    "EBS listed block {} of snapshot {} out of order or beyond its size",
                    b.index as i64, d.snapshot
                )));
            }
            last_listed = Some(b.index);
            while let Some(e) = stale.next_if(|&e| e < b.index) {
                items.push((e, None, true));
            }
            stale.next_if_eq(&b.index);
            items.push((b.index, b.token, false));
        }
        if next.is_none() {
            items.extend(stale.by_ref().map(|e| (e, None, true)));
        }
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
        for (index, token, is_stale) in items {
            if d.cancel.is_cancelled() {
                return Err(AgentError::Cancelled);
            }
            d.sample_gap(last.map_or(0, |l| l + 1), index);
            last = Some(index);
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
            if !is_stale {
                d.listed.fetch_add(1, Ordering::Relaxed);
            }
            let my_seq = seq;
            seq += 1;
            let token = match token {
                Some(_) if d.free.is_some_and(|f| f.covers(index)) => {
                    d.free_skipped.fetch_add(1, Ordering::Relaxed);
                    None
                }
                t => t,
            };
            match (token, is_stale) {
                // Not in the snapshot, or free: zeros.
                (None, false) => {
                    let _ = d
                        .res_tx
                        .send(Ok((my_seq, index, vec![None; d.per_block as usize])));
                }
                // A stale block is looked up when its turn comes (tokens expire).
                (token, _) => {
                    in_flight.push(fetch_block(d.aws, d.ctx, d.snapshot, my_seq, index, token))
                }
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
    d.sample_gap(last.map_or(0, |l| l + 1), d.blocks_total);
    Ok(())
}

impl Dispatch<'_> {
    /// Picks the share of the unlisted blocks `from..to` to verify.
    fn sample_gap(&self, from: u64, to: u64) {
        use rand::Rng;
        let Some((into, share)) = self.sample else {
            return;
        };
        let share = share.clamp(0.0, 1.0);
        if share == 0.0 || from >= to {
            return;
        }
        let mut rng = rand::thread_rng();
        let mut picked = into.lock().expect("samples");
        for i in from..to {
            // Memory stays bounded whatever the volume's size and the share asked for.
            if picked.len() >= MAX_SAMPLES {
                return;
            }
            // Free now: what it holds does not matter, and the parent may hold it as zeros.
            if self.free.is_some_and(|f| f.covers(i)) {
                continue;
            }
            if rng.gen_bool(share) {
                picked.push(i);
            }
        }
    }

    fn finished(&self, r: Result<(u64, u64, Vec<u8>), AgentError>) -> Result<(), AgentError> {
        let block = r?;
        self.fetched.fetch_add(1, Ordering::Relaxed);
        self.work_tx.send(block).map_err(|_| AgentError::Stopped)
    }
}

/// The token of block `index` of `snapshot`, if the snapshot holds it (else it reads as zeros).
async fn block_token(
    aws: &Aws,
    ctx: &Ctx,
    snapshot: &str,
    index: u64,
) -> Result<Option<String>, AgentError> {
    let what = || format!("ListSnapshotBlocks {snapshot} from block {index}");
    let out = call(&ctx.aws_calls, None, &what, || async {
        aws.ebs
            .list_snapshot_blocks()
            .snapshot_id(snapshot)
            .starting_block_index(index as i32)
            .max_results(100)
            .send()
            .await
            .map_err(classify)
    })
    .await?;
    Ok(out
        .blocks()
        .iter()
        .find(|b| b.block_index() == Some(index as i32))
        .and_then(|b| b.block_token().map(str::to_string)))
}

/// Fetches one block with retries until its data matches the SHA-256 checksum EBS sends.
/// Without a token, it is looked up first (a block the snapshot does not hold is zeros).
async fn fetch_block(
    aws: &Aws,
    ctx: &Ctx,
    snapshot: &str,
    seq: u64,
    index: u64,
    token: Option<String>,
) -> Result<(u64, u64, Vec<u8>), AgentError> {
    let token = match token {
        Some(t) => t,
        None => match block_token(aws, ctx, snapshot, index).await? {
            Some(t) => t,
            None => return Ok((seq, index, vec![0; EBS_BLOCK])),
        },
    };
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
        tokio::time::sleep(crate::aws::RETRY.delay(mismatches)).await;
    }
}

/// Puts block results back in order and builds the map: slots between listed blocks come from
/// the parent (incremental) or are zeros (full read).
fn collect(
    results: crossbeam_channel::Receiver<Result<BlockIds, AgentError>>,
    per_block: u64,
    parent: Option<&DiskReader>,
    writer: &DiskWriter,
    window: &Semaphore,
    progress: &dyn Progress,
) -> Result<DiskMapRef, AgentError> {
    let mut map = writer.map();
    let mut pending: BTreeMap<u64, (u64, Vec<Option<ChunkId>>)> = BTreeMap::new();
    let mut next_seq = 0u64;
    let cs = writer.chunk_size() as u64;
    let advance = |map: &MapAssembly, from: u64| progress.advance((map.next_slot() - from) * cs);
    for r in results {
        let (seq, index, ids) = r?;
        pending.insert(seq, (index, ids));
        while let Some((index, ids)) = pending.remove(&next_seq) {
            let from = map.next_slot();
            fill(parent, index * per_block, &mut map)?;
            map.push(ids)?;
            advance(&map, from);
            next_seq += 1;
            window.add_permits(1);
        }
    }
    if !pending.is_empty() {
        return Err(AgentError::Stopped);
    }
    let from = map.next_slot();
    fill(parent, writer.slots(), &mut map)?;
    advance(&map, from);
    Ok(map.finish()?)
}

/// Fills the map up to slot `to` from the parent map (or with zeros without a parent).
fn fill(parent: Option<&DiskReader>, to: u64, map: &mut MapAssembly) -> Result<(), AgentError> {
    for slot in map.next_slot()..to {
        map.keep(match parent {
            Some(p) => p.chunk_id(slot)?,
            None => None,
        })?;
    }
    Ok(())
}

/// The EBS blocks wholly inside a volume's free byte ranges.
pub(crate) struct FreeBlocks(Vec<(u64, u64)>);

impl FreeBlocks {
    /// `ranges`: sorted, disjoint byte ranges.
    fn new(ranges: &[(u64, u64)]) -> Self {
        FreeBlocks(ranges.to_vec())
    }

    /// Whether every byte of block `index` is free.
    fn covers(&self, index: u64) -> bool {
        let Some(start) = index.checked_mul(EBS_BLOCK as u64) else {
            return false;
        };
        let Some(end) = start.checked_add(EBS_BLOCK as u64) else {
            return false;
        };
        // The last range starting at or before the block's start.
        let i = self.0.partition_point(|r| r.0 <= start);
        i > 0 && self.0[i - 1].1 >= end
    }
}

/// Most stale blocks one backup reads on top of the changed ones (8 bytes each while listing);
/// past it, the backup reads in full.
const MAX_STALE: usize = 1 << 20;

/// The blocks of `snapshot` that the parent RP holds as zeros (perhaps because it skipped them
/// as free while the snapshot held stale bytes there) and that are not free now: listed by
/// ListSnapshotBlocks, all-zero chunks in the parent map, not covered by `free`. An unchanged
/// block among them holds bytes the parent RP does not, so they are read. `None` when there are
/// more than [`MAX_STALE`].
async fn stale_blocks(
    aws: &Aws,
    ctx: &Ctx,
    snapshot: &str,
    parent: &DiskReader,
    free: Option<&FreeBlocks>,
    per_block: u64,
    blocks_total: u64,
) -> Result<Option<Vec<u64>>, AgentError> {
    let mut out = Vec::new();
    let mut token = None;
    let mut last: Option<u64> = None;
    loop {
        let (blocks, next) = list_page(aws, ctx, snapshot, None, token).await?;
        for b in blocks {
            if b.index >= blocks_total || last.is_some_and(|l| b.index <= l) {
                return Err(AgentError::Ebs(format!(
                    "EBS listed block {} of snapshot {snapshot} out of order or beyond its size",
                    b.index as i64
                )));
            }
            last = Some(b.index);
            if b.token.is_none() || free.is_some_and(|f| f.covers(b.index)) {
                continue;
            }
            let mut zeros = true;
            for k in 0..per_block {
                zeros &= parent.chunk_id(b.index * per_block + k)?.is_none();
            }
            if zeros {
                if out.len() >= MAX_STALE {
                    return Ok(None);
                }
                out.push(b.index);
            }
        }
        match next {
            Some(t) => token = Some(t),
            None => return Ok(Some(out)),
        }
    }
}

/// Most blocks one backup verifies (8 bytes each while listing).
const MAX_SAMPLES: usize = 1 << 20;

/// Reads the sampled blocks `picked` (not listed by ListChangedBlocks between `base` and
/// `snapshot`) and compares their chunks with the parent map's: EBS says they did not change.
#[allow(clippy::too_many_arguments)]
async fn verify_unlisted(
    aws: &Aws,
    ctx: &Ctx,
    snapshot: &str,
    base: &str,
    parent_rp: &str,
    parent: &DiskReader,
    writer: &DiskWriter,
    picked: Vec<u64>,
    cancel: &Cancel,
) -> Result<(), AgentError> {
    let per_block = (EBS_BLOCK / writer.chunk_size()) as u64;
    let check = |index: u64| async move {
        if cancel.is_cancelled() {
            return Err(AgentError::Cancelled);
        }
        let ids = match block_token(aws, ctx, snapshot, index).await? {
            Some(t) => {
                let (_, _, data) = fetch_block(aws, ctx, snapshot, 0, index, Some(t)).await?;
                writer.put(&data)?
            }
            None => vec![None; per_block as usize],
        };
        for (k, id) in ids.into_iter().enumerate() {
            if parent.chunk_id(index * per_block + k as u64)? != id {
                return Err(AgentError::UnchangedDiffers(format!(
                    "EBS block {index} of snapshot {snapshot} differs from parent recovery point \
                     {parent_rp}, though ListChangedBlocks from {base} did not list it (a \
                     sampled check)"
                )));
            }
        }
        Ok::<(), AgentError>(())
    };
    let mut checks = futures_util::stream::iter(picked)
        .map(check)
        .buffer_unordered(16);
    while let Some(r) = checks.next().await {
        r?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wholly_free_blocks_are_skipped() {
        let b = EBS_BLOCK as u64;
        let f = FreeBlocks::new(&[
            (0, b),
            (2 * b + 4096, 5 * b),
            (5 * b, 6 * b),
            (7 * b, 7 * b + 100),
            (7 * b + 100, 8 * b),
        ]);
        assert!(f.covers(0));
        assert!(!f.covers(1)); // used
        assert!(!f.covers(2)); // its first page is used
        assert!(f.covers(3) && f.covers(4) && f.covers(5));
        assert!(!f.covers(6));
        assert!(!f.covers(7)); // split across two ranges (not merged): read
        assert!(!f.covers(8));
        assert!(!f.covers(u64::MAX));
    }
}
