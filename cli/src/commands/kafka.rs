use agent::kafka::{
    backup_topic, latest_topic_rp, restore_topic, KafkaBackupOptions, KafkaRestoreOptions,
};
use agent::stream::StreamOptions;
use anyhow::{anyhow, bail, Context, Result};
use scalez::RpKind;
use serde_json::json;

use crate::cli::{KafkaBackupArgs, KafkaCommand, KafkaRestoreArgs, OutputFormat};
use crate::context::resolve_rp;
use crate::context::Ctx;
use crate::output::print_json;
use crate::output::{bytes, Bar};

pub fn run(ctx: &Ctx, cmd: KafkaCommand) -> Result<()> {
    match cmd {
        KafkaCommand::Backup(a) => backup(ctx, a),
        KafkaCommand::Restore(a) => restore(ctx, a),
    }
}

fn properties(raw: &[String]) -> Result<Vec<(String, String)>> {
    raw.iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("--property {p:?}: expected KEY=VALUE"))
        })
        .collect()
}

fn backup(ctx: &Ctx, a: KafkaBackupArgs) -> Result<()> {
    let tags = scalez::catalog::parse_tags(a.tags.iter().map(String::as_str))?;
    let vault = ctx.open_vault()?;
    let opts = KafkaBackupOptions {
        brokers: a.brokers.clone(),
        topic: a.topic.clone(),
        properties: properties(&a.properties)?,
        tags,
        idle_timeout: a.idle_timeout,
    };
    let sopts = StreamOptions {
        cancel: crate::cancel_token(),
        ..StreamOptions::default()
    };
    let bar = Bar::new(ctx.global.quiet);
    let report = backup_topic(&vault, &opts, &sopts, &bar)
        .with_context(|| format!("backup of topic {} from {} failed", a.topic, a.brokers))?;
    bar.finish();
    let rp = &report.stream.rp;
    for (p, wanted, earliest) in &report.gaps {
        eprintln!(
            "warning: partition {p}: offsets {wanted}..{earliest} were deleted by retention \
             before this backup (messages lost between backups)"
        );
    }
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "rp": rp,
            "messages": report.messages,
            "partitions": report.partitions.iter().map(|(p, (s, e))| json!({
                "partition": p, "from_offset": s, "end_offset": e,
            })).collect::<Vec<_>>(),
            "gaps": report.gaps.iter().map(|(p, w, e)| json!({
                "partition": p, "wanted_offset": w, "earliest_offset": e,
            })).collect::<Vec<_>>(),
        })),
        OutputFormat::Human => {
            println!(
                "created {} (topic {}: {} messages, {})",
                rp.id,
                a.topic,
                report.messages,
                bytes(rp.logical_size)
            );
            for (p, (s, e)) in &report.partitions {
                println!("  partition {p:<4} offsets {s}..{e}");
            }
            println!("  new stored    {}", bytes(rp.new_bytes_stored));
            Ok(())
        }
    }
}

fn restore(ctx: &Ctx, a: KafkaRestoreArgs) -> Result<()> {
    let vault = ctx.open_vault()?;
    let rp = if a.rp == "latest" {
        let topic = a
            .topic_name
            .as_deref()
            .context("--rp latest needs --topic-name (the topic whose newest RP to restore)")?;
        latest_topic_rp(&vault, topic)?
            .ok_or_else(|| anyhow!("no backup of topic {topic} in vault {}", vault.location()))?
    } else {
        resolve_rp(&vault, &a.rp, None, Some(RpKind::Stream))?
    };
    if rp.tags.get("source").map(String::as_str) != Some("kafka") {
        bail!("recovery point {} is not a Kafka topic backup", rp.id);
    }
    let opts = KafkaRestoreOptions {
        brokers: a.brokers.clone(),
        topic: a.to_topic.clone(),
        properties: properties(&a.properties)?,
        flush_timeout: a.flush_timeout,
    };
    let bar = Bar::new(ctx.global.quiet);
    let report = restore_topic(&vault, &rp, &opts, &bar)
        .with_context(|| format!("restore of {} to {} failed", rp.id, a.brokers))?;
    bar.finish();
    match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "rp": rp.id, "topic": report.topic, "messages": report.messages,
        })),
        OutputFormat::Human => {
            println!(
                "produced {} messages of {} to topic {}",
                report.messages, rp.id, report.topic
            );
            Ok(())
        }
    }
}
