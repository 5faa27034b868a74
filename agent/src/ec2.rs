//! EC2 instances: every attached EBS volume in one crash-consistent snapshot set
//! (`CreateSnapshots`), one disk RP per volume, and an instance RP that groups them with the
//! instance's shape (type, AZ, image, device names, tags) so the instance can be recreated.
//!
//! The volume RPs are committed first and the instance RP last: a backup that fails half-way
//! leaves only complete volume RPs (each restores on its own) and no instance RP.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{
    CopyTagsFromSource, InstanceSpecification, InstanceStateName, Placement, ResourceType,
    TagSpecification,
};
use scalez::{
    InstanceRecord, InstanceVolume, RecoveryPoint, RpBody, RpDraft, RpFigures, RpKind, Vault,
};

use crate::aws::{call, classify, Aws};
use crate::ebs::{
    delete_snapshot, ec2_tag, free_on_volumes, prune_snapshots, read_snapshot, restore_to_snapshot,
    volume_asset, wait_snapshot, wait_volume, CreateVolume, Ctx, EbsBackupReport, EbsOptions,
    EbsRestoreOptions, EbsRestoreReport, TAG_CREATED_BY, TAG_VAULT, TAG_VOLUME,
};
use crate::error::AgentError;
use crate::progress::Progress;

pub const TAG_INSTANCE: &str = "elastio:instance-id";
pub const RP_TAG_INSTANCE: &str = "ec2:instance-id";
pub const RP_TAG_DEVICE: &str = "ec2:device";

#[derive(Debug, Clone)]
pub struct Ec2BackupReport {
    pub rp: RecoveryPoint,
    pub volumes: Vec<(String, EbsBackupReport)>,
    pub elapsed: Duration,
}

struct Attached {
    device: String,
    volume_id: String,
    delete_on_termination: bool,
}

/// Describes the instance, or fails naming it.
async fn describe_instance(
    aws: &Aws,
    ctx: &Ctx,
    id: &str,
) -> Result<aws_sdk_ec2::types::Instance, AgentError> {
    let what = || format!("DescribeInstances {id}");
    let out = call(&ctx.aws_calls, None, &what, || async {
        aws.ec2
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(classify)
    })
    .await?;
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .next()
        .cloned()
        .ok_or_else(|| AgentError::Ebs(format!("instance {id} not found in {}", aws.region)))
}

/// An instance, its attached EBS volumes and the snapshot set just made of them.
struct SnapshotSet {
    inst: aws_sdk_ec2::types::Instance,
    attached: Vec<Attached>,
    /// Volume id → (volume type, size in GiB).
    types: BTreeMap<String, (Option<String>, u64)>,
    /// (volume id, snapshot id).
    snapshots: Vec<(String, String)>,
}

/// Describes the instance and its volumes, then snapshots them all at once (CreateSnapshots:
/// one crash-consistent set) and tags each snapshot with its volume.
async fn snapshot_instance(
    aws: &Aws,
    ctx: &Ctx,
    instance_id: &str,
    vault_id: &str,
    quiesce: Option<&crate::ebs::Hook>,
) -> Result<SnapshotSet, AgentError> {
    let inst = describe_instance(aws, ctx, instance_id).await?;
    let attached: Vec<Attached> = inst
        .block_device_mappings()
        .iter()
        .filter_map(|m| {
            let ebs = m.ebs()?;
            Some(Attached {
                device: m.device_name()?.to_string(),
                volume_id: ebs.volume_id()?.to_string(),
                delete_on_termination: ebs.delete_on_termination().unwrap_or(false),
            })
        })
        .collect();
    if attached.is_empty() {
        return Err(AgentError::Ebs(format!(
            "instance {instance_id} has no EBS volumes attached"
        )));
    }
    let what = || format!("DescribeVolumes of {instance_id}");
    let ids: Vec<String> = attached.iter().map(|a| a.volume_id.clone()).collect();
    let vols = call(&ctx.aws_calls, None, &what, || async {
        aws.ec2
            .describe_volumes()
            .set_volume_ids(Some(ids.clone()))
            .send()
            .await
            .map_err(classify)
    })
    .await?;
    let types: BTreeMap<String, (Option<String>, u64)> = vols
        .volumes()
        .iter()
        .filter_map(|v| {
            Some((
                v.volume_id()?.to_string(),
                (
                    v.volume_type().map(|t| t.as_str().to_string()),
                    v.size().unwrap_or(0).max(0) as u64,
                ),
            ))
        })
        .collect();
    let what = || format!("CreateSnapshots of {instance_id}");
    let tags = TagSpecification::builder()
        .resource_type(ResourceType::Snapshot)
        .tags(ec2_tag(TAG_CREATED_BY, "elastio"))
        .tags(ec2_tag(TAG_VAULT, vault_id))
        .tags(ec2_tag(TAG_INSTANCE, instance_id))
        .build();
    if let Some(h) = quiesce {
        h.0.before()?;
    }
    let out = call(&ctx.aws_calls, None, &what, || async {
        aws.ec2
            .create_snapshots()
            .instance_specification(
                InstanceSpecification::builder()
                    .instance_id(instance_id)
                    .exclude_boot_volume(false)
                    .build(),
            )
            .description(format!("elastio backup of {instance_id}"))
            .tag_specifications(tags.clone())
            .copy_tags_from_source(CopyTagsFromSource::Volume)
            .send()
            .await
            .map_err(classify)
    })
    .await;
    let resumed = quiesce.map_or(Ok(()), |h| h.0.after());
    let out = out?;
    let snapshots: Vec<(String, String)> = out
        .snapshots()
        .iter()
        .filter_map(|s| Some((s.volume_id()?.to_string(), s.snapshot_id()?.to_string())))
        .collect();
    if let Err(e) = resumed {
        // Not the consistent point in time asked for: no backup from it.
        for (_, snap) in &snapshots {
            if let Err(de) = delete_snapshot(aws, ctx, snap).await {
                tracing::warn!("cannot delete snapshot {snap}: {de}");
            }
        }
        return Err(e);
    }
    // Each snapshot also names its volume, for the per-volume snapshot lifecycle.
    for (vol, snap) in &snapshots {
        let what = || format!("CreateTags on {snap}");
        call(&ctx.aws_calls, None, &what, || async {
            aws.ec2
                .create_tags()
                .resources(snap)
                .tags(ec2_tag(TAG_VOLUME, vol))
                .send()
                .await
                .map_err(classify)
        })
        .await?;
    }
    Ok(SnapshotSet {
        inst,
        attached,
        types,
        snapshots,
    })
}

/// Reads each volume's snapshot into a disk RP (tagged with the instance and device).
fn read_volumes(
    vault: &Arc<Vault>,
    aws: &Aws,
    ctx: &Ctx,
    instance_id: &str,
    set: (&[Attached], &[(String, String)]),
    opts: &EbsOptions,
    progress: &dyn Progress,
) -> Result<Vec<(String, EbsBackupReport)>, AgentError> {
    let (attached, snapshots) = set;
    let free = free_on_volumes(opts.quiesce.as_ref(), progress);
    let mut reports = Vec::new();
    for a in attached {
        let snap = snapshots
            .iter()
            .find(|(v, _)| *v == a.volume_id)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| {
                AgentError::Ebs(format!(
                    "CreateSnapshots of {instance_id} returned no snapshot of {} ({})",
                    a.volume_id, a.device
                ))
            })?;
        progress.message(&format!("{} ({}): snapshot {snap}", a.device, a.volume_id));
        let info = aws.rt.block_on(wait_snapshot(
            aws,
            ctx,
            &snap,
            opts.poll,
            progress,
            &opts.cancel,
        ))?;
        let mut vopts = opts.clone();
        vopts
            .tags
            .insert(RP_TAG_INSTANCE.into(), instance_id.into());
        vopts.tags.insert(RP_TAG_DEVICE.into(), a.device.clone());
        let asset = volume_asset(&aws.region, &a.volume_id);
        let free = free.get(&a.volume_id).map(Vec::as_slice);
        let r = read_snapshot(vault, aws, ctx, &info, asset, &vopts, free, progress)?;
        reports.push((a.device.clone(), r));
    }
    Ok(reports)
}

/// What an instance RP records: the instance's shape and one volume RP per attached volume.
fn instance_record(
    instance_id: &str,
    inst: &aws_sdk_ec2::types::Instance,
    attached: &[Attached],
    types: &BTreeMap<String, (Option<String>, u64)>,
    reports: &[(String, EbsBackupReport)],
) -> InstanceRecord {
    let tags: BTreeMap<String, String> = inst
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
        .collect();
    InstanceRecord {
        instance_id: instance_id.to_string(),
        instance_type: inst
            .instance_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default(),
        availability_zone: inst
            .placement()
            .and_then(|p| p.availability_zone())
            .unwrap_or_default()
            .to_string(),
        image_id: inst.image_id().map(str::to_string),
        root_device_name: inst.root_device_name().map(str::to_string),
        subnet_id: inst.subnet_id().map(str::to_string),
        tags,
        volumes: attached
            .iter()
            .zip(reports)
            .map(|(a, (_, r))| {
                let (volume_type, size_gib) = types.get(&a.volume_id).cloned().unwrap_or_default();
                InstanceVolume {
                    device_name: a.device.clone(),
                    volume_id: a.volume_id.clone(),
                    volume_type,
                    size_gib,
                    delete_on_termination: a.delete_on_termination,
                    rp: r.rp.id.clone(),
                }
            })
            .collect(),
    }
}

/// Backs up every EBS volume attached to `instance_id` from one multi-volume snapshot set.
pub fn backup_instance(
    vault: &Arc<Vault>,
    aws: &Aws,
    instance_id: &str,
    opts: &EbsOptions,
    progress: &dyn Progress,
) -> Result<Ec2BackupReport, AgentError> {
    let started = Instant::now();
    let ctx = Ctx::new(opts.rate, opts.page_size);
    let vault_id = vault.config().vault_id.clone();
    // The instance RP is created as the backup starts (its volumes' RPs follow).
    let asset = scalez::Asset {
        name: instance_id.to_string(),
        host: format!("aws:{}", aws.region),
    };
    let parent = vault.latest_rp(RpKind::Instance, &asset)?.map(|p| p.id);
    let mut rp_tags = opts.tags.clone();
    rp_tags.insert(RP_TAG_INSTANCE.into(), instance_id.into());
    let draft = RpDraft::new(asset, parent, rp_tags);
    let SnapshotSet {
        inst,
        attached,
        types,
        snapshots,
    } = aws.rt.block_on(snapshot_instance(
        aws,
        &ctx,
        instance_id,
        &vault_id,
        opts.quiesce.as_ref(),
    ))?;
    let result = read_volumes(
        vault,
        aws,
        &ctx,
        instance_id,
        (&attached, &snapshots),
        opts,
        progress,
    );
    let mut reports: Vec<(String, EbsBackupReport)> = match result {
        Ok(r) => r,
        Err(e) => {
            for (_, snap) in &snapshots {
                let _ = aws.rt.block_on(delete_snapshot(aws, &ctx, snap));
            }
            return Err(e);
        }
    };
    let record = instance_record(instance_id, &inst, &attached, &types, &reports);
    let sum = |f: fn(&RecoveryPoint) -> u64| reports.iter().map(|(_, r)| f(&r.rp)).sum::<u64>();
    let rp = draft.finish(
        RpBody::Instance(record),
        RpFigures {
            logical_size: sum(|r| r.logical_size),
            bytes_read: sum(|r| r.bytes_read),
            new_bytes_stored: sum(|r| r.new_bytes_stored),
            new_chunks: sum(|r| r.new_chunks),
        },
    );
    vault.commit_rp(&rp)?;
    if !opts.keep_snapshots {
        for (device, r) in reports.iter_mut() {
            let vol = r.rp.asset.name.clone();
            r.deleted_snapshots = aws
                .rt
                .block_on(prune_snapshots(aws, &ctx, &vol, &vault_id, &r.snapshot_id))
                .map_err(|e| AgentError::Ebs(format!("{device}: {e}")))?;
        }
    }
    for (_, r) in reports.iter_mut() {
        r.calls = ctx.calls();
    }
    Ok(Ec2BackupReport {
        rp,
        volumes: reports,
        elapsed: started.elapsed(),
    })
}

#[derive(Debug, Clone, Default)]
pub struct Ec2RestoreOptions {
    pub ebs: EbsRestoreOptions,
    /// Where to create the volumes (default: the instance's recorded AZ).
    pub availability_zone: Option<String>,
    /// Also launch an instance of the recorded type and image with the volumes attached.
    pub launch: bool,
}

#[derive(Debug, Clone)]
pub struct Ec2RestoreReport {
    /// (device name, original volume id, restore report with the new snapshot and volume).
    pub volumes: Vec<(String, String, EbsRestoreReport)>,
    pub instance_id: Option<String>,
    pub elapsed: Duration,
}

/// Recreates the volumes of instance RP `rp` (and optionally the instance).
pub fn restore_instance(
    vault: &Arc<Vault>,
    aws: &Aws,
    rp: &RecoveryPoint,
    opts: &Ec2RestoreOptions,
    progress: &dyn Progress,
) -> Result<Ec2RestoreReport, AgentError> {
    let started = Instant::now();
    let record = rp.instance()?.clone();
    let az = opts
        .availability_zone
        .clone()
        .unwrap_or_else(|| record.availability_zone.clone());
    let mut volumes = Vec::new();
    for v in &record.volumes {
        let member = vault.get_rp(&v.rp)?;
        let mut o = opts.ebs.clone();
        o.create_volume = Some(CreateVolume {
            availability_zone: az.clone(),
            volume_type: v.volume_type.clone(),
        });
        progress.message(&format!("{}: restoring {}", v.device_name, v.rp));
        let r = restore_to_snapshot(vault, aws, &member, &o, progress)?;
        volumes.push((v.device_name.clone(), v.volume_id.clone(), r));
    }
    let instance_id = if opts.launch {
        Some(launch(aws, &record, &az, &volumes, opts, progress)?)
    } else {
        None
    };
    Ok(Ec2RestoreReport {
        volumes,
        instance_id,
        elapsed: started.elapsed(),
    })
}

async fn wait_instance(
    aws: &Aws,
    ctx: &Ctx,
    id: &str,
    want: InstanceStateName,
    poll: Duration,
) -> Result<(), AgentError> {
    for _ in 0..3600 {
        let inst = describe_instance(aws, ctx, id).await?;
        let state = inst.state().and_then(|s| s.name()).cloned();
        if state.as_ref() == Some(&want) {
            return Ok(());
        }
        if matches!(
            state,
            Some(InstanceStateName::Terminated) | Some(InstanceStateName::ShuttingDown)
        ) {
            return Err(AgentError::Ebs(format!("instance {id} terminated")));
        }
        tokio::time::sleep(poll).await;
    }
    Err(AgentError::Ebs(format!(
        "instance {id} did not reach state {}",
        want.as_str()
    )))
}

/// Detaches and deletes the volumes instance `id` was launched with (it is stopped).
async fn drop_own_volumes(
    aws: &Aws,
    ctx: &Ctx,
    id: &str,
    poll: Duration,
) -> Result<(), AgentError> {
    let inst = describe_instance(aws, ctx, id).await?;
    for m in inst.block_device_mappings() {
        let Some(vol) = m.ebs().and_then(|e| e.volume_id()) else {
            continue;
        };
        let what = || format!("DetachVolume {vol}");
        call(&ctx.aws_calls, None, &what, || async {
            aws.ec2
                .detach_volume()
                .volume_id(vol)
                .instance_id(id)
                .send()
                .await
                .map_err(classify)
        })
        .await?;
        wait_volume(aws, ctx, vol, poll).await?;
        let what = || format!("DeleteVolume {vol}");
        call(&ctx.aws_calls, None, &what, || async {
            aws.ec2
                .delete_volume()
                .volume_id(vol)
                .send()
                .await
                .map_err(classify)
        })
        .await?;
    }
    Ok(())
}

/// Runs an instance of the recorded image and type, stopped, swaps its volumes for the
/// restored ones at the recorded device names, and starts it.
fn launch(
    aws: &Aws,
    record: &InstanceRecord,
    az: &str,
    volumes: &[(String, String, EbsRestoreReport)],
    opts: &Ec2RestoreOptions,
    progress: &dyn Progress,
) -> Result<String, AgentError> {
    let image = record.image_id.clone().ok_or_else(|| {
        AgentError::Ebs(format!(
            "the RP does not record the image of {}: cannot launch",
            record.instance_id
        ))
    })?;
    let ctx = Ctx::new(opts.ebs.ebs.rate, opts.ebs.ebs.page_size);
    let poll = opts.ebs.ebs.poll;
    aws.rt.block_on(async {
        let what = || format!("RunInstances of {image}");
        let mut tags = TagSpecification::builder()
            .resource_type(ResourceType::Instance)
            .tags(ec2_tag(TAG_CREATED_BY, "elastio"))
            .tags(ec2_tag("elastio:restored-from", &record.instance_id));
        for (k, v) in &record.tags {
            if !k.starts_with("aws:") {
                tags = tags.tags(ec2_tag(k, v));
            }
        }
        let tags = tags.build();
        let out = call(&ctx.aws_calls, None, &what, || async {
            let mut req = aws
                .ec2
                .run_instances()
                .image_id(&image)
                .instance_type(record.instance_type.as_str().into())
                .min_count(1)
                .max_count(1)
                .placement(Placement::builder().availability_zone(az).build())
                .tag_specifications(tags.clone());
            if opts.availability_zone.is_none() {
                req = req.set_subnet_id(record.subnet_id.clone());
            }
            req.send().await.map_err(classify)
        })
        .await?;
        let id = out
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .ok_or_else(|| AgentError::Ebs("RunInstances returned no instance".into()))?
            .to_string();
        progress.message(&format!("instance {id}: replacing its volumes"));
        wait_instance(aws, &ctx, &id, InstanceStateName::Running, poll).await?;
        let what = || format!("StopInstances {id}");
        call(&ctx.aws_calls, None, &what, || async {
            aws.ec2
                .stop_instances()
                .instance_ids(&id)
                .send()
                .await
                .map_err(classify)
        })
        .await?;
        wait_instance(aws, &ctx, &id, InstanceStateName::Stopped, poll).await?;
        // The launch created volumes of its own: detach and delete them.
        drop_own_volumes(aws, &ctx, &id, poll).await?;
        for (device, _, r) in volumes {
            let Some(vol) = &r.volume_id else { continue };
            let what = || format!("AttachVolume {vol} to {id} as {device}");
            call(&ctx.aws_calls, None, &what, || async {
                aws.ec2
                    .attach_volume()
                    .volume_id(vol)
                    .instance_id(&id)
                    .device(device)
                    .send()
                    .await
                    .map_err(classify)
            })
            .await?;
        }
        let what = || format!("StartInstances {id}");
        call(&ctx.aws_calls, None, &what, || async {
            aws.ec2
                .start_instances()
                .instance_ids(&id)
                .send()
                .await
                .map_err(classify)
        })
        .await?;
        wait_instance(aws, &ctx, &id, InstanceStateName::Running, poll).await?;
        Ok(id)
    })
}
