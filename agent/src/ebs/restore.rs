//! Writing a disk RP into a new EBS snapshot (and volume): see the module docs, "Restore".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ec2::types::{ResourceType, TagSpecification, VolumeState};
use scalez::reader::DiskReader;
use scalez::{RecoveryPoint, Vault};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::*;
use crate::aws::{call, classify, Aws};
use crate::error::AgentError;
use crate::progress::Progress;
use scalez::disk_writer::is_zero;

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
    let ctx = Arc::new(Ctx::new(opts.ebs.rate, opts.ebs.page_size));
    let size_gib = map.size.div_ceil(GIB).max(1);
    let snapshot_id = aws
        .rt
        .block_on(start_snapshot(aws, &ctx, rp, size_gib, opts))?;
    progress.message(&format!("writing snapshot {snapshot_id}"));
    progress.start(map.size);
    let reader = Arc::new(DiskReader::new(vault.clone(), map.clone(), 64 << 20));
    reader.enable_readahead(
        (32 * EBS_BLOCK as u64) / map.chunk_size as u64,
        opts.ebs.workers,
    );
    let count = match put_blocks(aws, &ctx, &reader, &snapshot_id, &opts.ebs, progress) {
        Ok(n) => n,
        Err(e) => {
            // A pending snapshot with missing blocks must not be completed; EBS fails it after
            // its timeout, and deleting it now frees it at once.
            let _ = aws.rt.block_on(delete_snapshot(aws, &ctx, &snapshot_id));
            return Err(e);
        }
    };
    let volume_id = aws.rt.block_on(async {
        complete_snapshot(aws, &ctx, &snapshot_id, count, &opts.ebs, progress).await?;
        match &opts.create_volume {
            None => Ok(None),
            Some(cv) => create_volume(aws, &ctx, rp, &snapshot_id, cv, opts)
                .await
                .map(Some),
        }
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

/// StartSnapshot of `size_gib` for RP `rp` (idempotent through its client token); returns the
/// new snapshot's id.
async fn start_snapshot(
    aws: &Aws,
    ctx: &Ctx,
    rp: &RecoveryPoint,
    size_gib: u64,
    opts: &EbsRestoreOptions,
) -> Result<String, AgentError> {
    let client_token = format!("elastio-{}-{:016x}", rp.id, rand::random::<u64>());
    let what = || format!("StartSnapshot for RP {}", rp.id);
    let tag = |k: &str, v: String| aws_sdk_ebs::types::Tag::builder().key(k).value(v).build();
    let out = call(&ctx.aws_calls, None, &what, || async {
        let mut req = aws
            .ebs
            .start_snapshot()
            .volume_size(size_gib as i64)
            .description(format!(
                "elastio restore of RP {} ({})",
                rp.id, rp.asset.name
            ))
            .client_token(&client_token)
            .timeout(60)
            .tags(tag(TAG_CREATED_BY, "elastio".into()))
            .tags(tag(TAG_RP, rp.id.to_string()));
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
}

/// PutSnapshotBlock of every block of `reader` that holds data, at most `concurrency` in
/// flight; returns how many were written. The first failure stops it.
fn put_blocks(
    aws: &Aws,
    ctx: &Arc<Ctx>,
    reader: &Arc<DiskReader>,
    snapshot_id: &str,
    opts: &EbsOptions,
    progress: &dyn Progress,
) -> Result<u64, AgentError> {
    let blocks = reader.size().div_ceil(EBS_BLOCK as u64);
    let written = Arc::new(AtomicU64::new(0));
    let failed: Arc<Mutex<Option<AgentError>>> = Arc::new(Mutex::new(None));
    let conc = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    for b in 0..blocks {
        if opts.cancel.is_cancelled() {
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
        let (reader, written, failed, ctx) =
            (reader.clone(), written.clone(), failed.clone(), ctx.clone());
        let (ebs, sid) = (aws.ebs.clone(), snapshot_id.to_string());
        aws.rt.spawn(async move {
            match put_block(&ebs, &ctx, &reader, &sid, b).await {
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
    let all = opts.concurrency.max(1) as u32;
    let _all = aws
        .rt
        .block_on(conc.acquire_many(all))
        .map_err(|_| AgentError::Stopped)?;
    let first_failure = failed.lock().unwrap().take();
    match first_failure {
        Some(e) => Err(e),
        None => Ok(written.load(Ordering::Relaxed)),
    }
}

/// CompleteSnapshot with the number of blocks written, then waits until it is `completed`.
async fn complete_snapshot(
    aws: &Aws,
    ctx: &Ctx,
    snapshot_id: &str,
    count: u64,
    opts: &EbsOptions,
    progress: &dyn Progress,
) -> Result<(), AgentError> {
    let what = || format!("CompleteSnapshot {snapshot_id}");
    let out = call(&ctx.aws_calls, None, &what, || async {
        aws.ebs
            .complete_snapshot()
            .snapshot_id(snapshot_id)
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
    wait_snapshot(aws, ctx, snapshot_id, opts.poll, progress, &opts.cancel).await?;
    Ok(())
}

/// CreateVolume from the restored snapshot; waits until it is available.
async fn create_volume(
    aws: &Aws,
    ctx: &Ctx,
    rp: &RecoveryPoint,
    snapshot_id: &str,
    cv: &CreateVolume,
    opts: &EbsRestoreOptions,
) -> Result<String, AgentError> {
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
            .snapshot_id(snapshot_id)
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
    wait_volume(aws, ctx, &vol, opts.ebs.poll).await?;
    Ok(vol)
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
