use agent::kafka::{
    backup_topic, latest_topic_rp, restore_topic, KafkaBackupOptions, KafkaRestoreOptions,
};
use agent::stream::StreamOptions;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use scalez::RpKind;
use serde_json::json;

use crate::cli::OutputFormat;
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
    let scan = crate::commands::iscan::AfterBackup::run(ctx, &vault, &rp.id, &a.scan)?;
    let printed = match ctx.global.output_format {
        OutputFormat::Json => print_json(&json!({
            "iscan": scan.as_ref().map(|s| s.json()),
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
    };
    printed?;
    match scan {
        Some(s) => s.finish(ctx),
        None => Ok(()),
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

#[derive(Subcommand, Debug)]
pub enum KafkaCommand {
    /// Consume a topic from where its last backup ended to its current end, into a new RP
    #[command(
        after_help = "Each run reads every partition from the `partition.<p>.next_offset` tag \
of the topic's newest RP (from the earliest offset the first time) up to the end offsets seen \
when the run starts, and stores the messages raw (key, value, headers, timestamp, partition, \
offset) as a stream RP named `kafka:<topic>`. Tags record topic_name, partition_count, \
messages and per partition the first/last offset and timestamp. Nothing is committed to the \
cluster (no consumer group offsets): the vault alone holds the progress, so a failed run is \
simply repeated. Example: `elastio kafka backup --brokers k1:9092 --topic orders`."
    )]
    Backup(KafkaBackupArgs),
    /// Produce the messages of a topic RP back, each partition in its original order
    Restore(KafkaRestoreArgs),
}

#[derive(Args, Debug)]
pub struct KafkaBackupArgs {
    #[command(flatten)]
    pub scan: crate::commands::iscan::BackupScan,
    /// Bootstrap brokers (host:port, comma-separated)
    #[arg(long, env = "ELASTIO_KAFKA_BROKERS")]
    pub brokers: String,
    #[arg(long)]
    pub topic: String,
    /// A librdkafka property (repeatable), e.g. security.protocol=SASL_SSL
    #[arg(long = "property", short = 'X', value_name = "KEY=VALUE")]
    pub properties: Vec<String>,
    /// Tag the recovery point (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Fail when no message arrives for this long before the end offsets are reached
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: std::time::Duration,
}

#[derive(Args, Debug)]
pub struct KafkaRestoreArgs {
    /// Recovery point id, or `latest` (the newest RP of --topic-name)
    #[arg(long)]
    pub rp: String,
    /// With --rp latest: the topic whose newest RP to restore
    #[arg(long)]
    pub topic_name: Option<String>,
    /// Bootstrap brokers (host:port, comma-separated)
    #[arg(long, env = "ELASTIO_KAFKA_BROKERS")]
    pub brokers: String,
    /// Produce to this topic instead of the original (it must exist with enough partitions)
    #[arg(long)]
    pub to_topic: Option<String>,
    /// A librdkafka property (repeatable)
    #[arg(long = "property", short = 'X', value_name = "KEY=VALUE")]
    pub properties: Vec<String>,
    /// How long to wait for the last messages to be acknowledged
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub flush_timeout: std::time::Duration,
}
