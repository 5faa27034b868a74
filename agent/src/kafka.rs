//! Kafka topics as stream RPs: each backup consumes a topic from where the previous backup of it
//! ended (read from that RP's tags) up to the end offsets seen at its start, and stores the raw
//! messages as one stream RP; a restore produces them back, per partition in the original order.
//!
//! Stream content (`"EZK1"`, then one frame per message, in consumption order, which keeps each
//! partition's order):
//!
//! ```text
//! frame = length u32 ‖ partition i32 ‖ offset i64 ‖ timestamp type u8 (0 none, 1 create,
//!         2 log append) ‖ timestamp ms i64 ‖ key (i32 len, -1 = null ‖ bytes)
//!         ‖ value (i32 len, -1 = null ‖ bytes) ‖ header count u32
//!         ‖ count × ( name (u16 len ‖ bytes) ‖ value (i32 len, -1 = null ‖ bytes) )
//! ```
//! Integers little-endian. Tags of each RP: `source=kafka`, `topic_name`, `partition_count`,
//! `messages`, and per partition `partition.<p>.next_offset` (where the next backup starts) and,
//! when the RP holds messages of it, `partition.<p>.first_offset`, `.last_offset`,
//! `.first_timestamp`, `.last_timestamp` (ms since the epoch).
//!
//! Consumption uses manual assignment (no consumer group, nothing committed to the cluster):
//! the vault alone records progress, so an RP that was never committed (a crash) is simply
//! consumed again by the next run.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, Timestamp, TopicPartitionList};
use scalez::{RecoveryPoint, RpKind, Vault};

use crate::error::AgentError;
use crate::progress::Progress;
use crate::stream::{restore_stream, StreamOptions, StreamReport};

const MAGIC: &[u8; 4] = b"EZK1";
/// Timeout of metadata and watermark requests.
const META_TIMEOUT: Duration = Duration::from_secs(30);

/// The stream (asset) name of a topic's RPs.
pub fn stream_name(topic: &str) -> String {
    format!("kafka:{topic}")
}

fn kafka_err(what: impl std::fmt::Display, e: KafkaError) -> AgentError {
    AgentError::Kafka(format!("{what}: {e}"))
}

/// One message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    /// 0 none, 1 create time, 2 log-append time.
    pub timestamp_type: u8,
    pub timestamp: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

fn put_opt(out: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        None => out.extend_from_slice(&(-1i32).to_le_bytes()),
        Some(b) => {
            out.extend_from_slice(&(b.len() as i32).to_le_bytes());
            out.extend_from_slice(b);
        }
    }
}

pub fn encode_record(r: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&r.partition.to_le_bytes());
    out.extend_from_slice(&r.offset.to_le_bytes());
    out.push(r.timestamp_type);
    out.extend_from_slice(&r.timestamp.to_le_bytes());
    put_opt(out, r.key.as_deref());
    put_opt(out, r.value.as_deref());
    out.extend_from_slice(&(r.headers.len() as u32).to_le_bytes());
    for (k, v) in &r.headers {
        out.extend_from_slice(&(k.len() as u16).to_le_bytes());
        out.extend_from_slice(k);
        put_opt(out, v.as_deref());
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

struct Frame<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Frame<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.b.len() - self.at < n {
            return Err("message frame ends early".into());
        }
        self.at += n;
        Ok(&self.b[self.at - n..self.at])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    fn opt(&mut self) -> Result<Option<Vec<u8>>, String> {
        let n = i32::from_le_bytes(self.array()?);
        if n < 0 {
            Ok(None)
        } else {
            Ok(Some(self.take(n as usize)?.to_vec()))
        }
    }
}

/// Decodes one frame body.
pub fn decode_record(b: &[u8]) -> Result<Record, String> {
    let mut f = Frame { b, at: 0 };
    let partition = i32::from_le_bytes(f.array()?);
    let offset = i64::from_le_bytes(f.array()?);
    let timestamp_type = f.take(1)?[0];
    let timestamp = i64::from_le_bytes(f.array()?);
    let key = f.opt()?;
    let value = f.opt()?;
    let count = u32::from_le_bytes(f.array()?);
    let mut headers = Vec::new();
    for _ in 0..count {
        let n = u16::from_le_bytes(f.array()?) as usize;
        let k = f.take(n)?.to_vec();
        headers.push((k, f.opt()?));
    }
    if f.at != b.len() {
        return Err("trailing bytes in a message frame".into());
    }
    Ok(Record {
        partition,
        offset,
        timestamp_type,
        timestamp,
        key,
        value,
        headers,
    })
}

#[derive(Debug, Clone)]
pub struct KafkaBackupOptions {
    pub brokers: String,
    pub topic: String,
    /// Extra librdkafka properties (`security.protocol`, `sasl.*`, ...).
    pub properties: Vec<(String, String)>,
    pub tags: BTreeMap<String, String>,
    /// Give up when no message arrives for this long before the end offsets are reached.
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, Default)]
struct PartitionProgress {
    start: i64,
    end: i64,
    first: Option<(i64, i64)>,
    last: Option<(i64, i64)>,
    done: bool,
}

#[derive(Debug, Clone)]
pub struct KafkaBackupReport {
    pub stream: StreamReport,
    pub messages: u64,
    /// Per partition: (first offset, end offset) consumed.
    pub partitions: BTreeMap<i32, (i64, i64)>,
    /// Partitions whose resume offset had already been deleted by retention (messages lost
    /// between the two backups): (partition, wanted, earliest available).
    pub gaps: Vec<(i32, i64, i64)>,
}

fn client_config(brokers: &str, properties: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        c.set(k, v);
    }
    c
}

/// The newest RP of `topic` (by its tags) in the vault.
pub fn latest_topic_rp(vault: &Vault, topic: &str) -> Result<Option<RecoveryPoint>, AgentError> {
    Ok(vault.list_rps()?.into_iter().rev().find(|rp| {
        rp.kind == RpKind::Stream
            && rp.tags.get("source").map(String::as_str) == Some("kafka")
            && rp.tags.get("topic_name").map(String::as_str) == Some(topic)
    }))
}

/// Reads the assigned partitions up to their end offsets as a byte stream of frames.
struct TopicReader {
    consumer: BaseConsumer,
    topic: String,
    state: Arc<Mutex<BTreeMap<i32, PartitionProgress>>>,
    messages: Arc<Mutex<u64>>,
    buf: Vec<u8>,
    pos: usize,
    idle_timeout: Duration,
    last_progress: Instant,
}

impl TopicReader {
    fn all_done(&self) -> bool {
        self.state.lock().unwrap().values().all(|p| p.done)
    }

    /// Appends at least one frame to `buf`, or returns false at the end.
    fn fill(&mut self) -> std::io::Result<bool> {
        loop {
            if self.all_done() {
                return Ok(false);
            }
            if self.last_progress.elapsed() > self.idle_timeout {
                let state = self.state.lock().unwrap();
                let missing: Vec<String> = state
                    .iter()
                    .filter(|(_, p)| !p.done)
                    .map(|(n, p)| format!("partition {n} (end offset {})", p.end))
                    .collect();
                return Err(std::io::Error::other(format!(
                    "topic {}: no message for {:?} before reaching the end offsets of {}",
                    self.topic,
                    self.idle_timeout,
                    missing.join(", ")
                )));
            }
            match self.consumer.poll(Duration::from_millis(200)) {
                None => self.check_positions()?,
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    self.last_progress = Instant::now();
                    self.check_positions()?;
                }
                Some(Err(e)) => {
                    return Err(std::io::Error::other(format!(
                        "consuming topic {}: {e}",
                        self.topic
                    )))
                }
                Some(Ok(m)) => {
                    self.last_progress = Instant::now();
                    let p = m.partition();
                    let offset = m.offset();
                    let mut state = self.state.lock().unwrap();
                    let Some(st) = state.get_mut(&p) else {
                        continue;
                    };
                    if st.done || offset >= st.end {
                        // Written after this backup started: the next backup takes it.
                        st.done = true;
                        continue;
                    }
                    let (tt, ts) = match m.timestamp() {
                        Timestamp::NotAvailable => (0, -1),
                        Timestamp::CreateTime(t) => (1, t),
                        Timestamp::LogAppendTime(t) => (2, t),
                    };
                    let headers = m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.as_bytes().to_vec(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default();
                    let r = Record {
                        partition: p,
                        offset,
                        timestamp_type: tt,
                        timestamp: ts,
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                        headers,
                    };
                    st.first.get_or_insert((offset, ts));
                    st.last = Some((offset, ts));
                    if offset + 1 >= st.end {
                        st.done = true;
                    }
                    drop(state);
                    *self.messages.lock().unwrap() += 1;
                    encode_record(&r, &mut self.buf);
                    return Ok(true);
                }
            }
        }
    }

    /// Marks partitions whose consumer position reached their end offset (compacted topics and
    /// transaction markers leave offsets without messages).
    fn check_positions(&mut self) -> std::io::Result<()> {
        let pos = self
            .consumer
            .position()
            .map_err(|e| std::io::Error::other(format!("topic {}: position: {e}", self.topic)))?;
        let mut state = self.state.lock().unwrap();
        for e in pos.elements() {
            if let (Some(st), Offset::Offset(o)) = (state.get_mut(&e.partition()), e.offset()) {
                if o >= st.end {
                    st.done = true;
                }
            }
        }
        Ok(())
    }
}

impl Read for TopicReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            // Batch frames so reads are not one message each.
            while self.buf.len() < 256 * 1024 {
                if !self.fill()? {
                    break;
                }
            }
            if self.buf.is_empty() {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Consumes `opts.topic` from the end of its newest RP (or from the beginning) to the end
/// offsets seen now, into one new stream RP.
pub fn backup_topic(
    vault: &Arc<Vault>,
    opts: &KafkaBackupOptions,
    stream_opts: &StreamOptions,
    progress: &dyn Progress,
) -> Result<KafkaBackupReport, AgentError> {
    let topic = &opts.topic;
    let consumer: BaseConsumer = client_config(&opts.brokers, &opts.properties)
        .set("group.id", "elastio-backup")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| kafka_err(format!("cannot create a consumer for {}", opts.brokers), e))?;
    let meta = consumer
        .fetch_metadata(Some(topic), META_TIMEOUT)
        .map_err(|e| {
            kafka_err(
                format!("metadata of topic {topic} from {}", opts.brokers),
                e,
            )
        })?;
    let partitions: Vec<i32> = meta
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(AgentError::Kafka(format!(
            "topic {topic} does not exist on {} (or has no partitions)",
            opts.brokers
        )));
    }
    let previous = latest_topic_rp(vault, topic)?;
    let mut state = BTreeMap::new();
    let mut gaps = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, META_TIMEOUT)
            .map_err(|e| kafka_err(format!("end offsets of {topic} partition {p}"), e))?;
        let resume = previous
            .as_ref()
            .and_then(|rp| rp.tags.get(&format!("partition.{p}.next_offset")))
            .and_then(|v| v.parse::<i64>().ok());
        let start = match resume {
            Some(r) if r < low => {
                gaps.push((p, r, low));
                low
            }
            Some(r) => r,
            None => low,
        };
        let done = start >= high;
        state.insert(
            p,
            PartitionProgress {
                start,
                end: high,
                done,
                ..Default::default()
            },
        );
        if !done {
            tpl.add_partition_offset(topic, p, Offset::Offset(start))
                .map_err(|e| kafka_err(format!("{topic} partition {p}"), e))?;
        }
    }
    consumer
        .assign(&tpl)
        .map_err(|e| kafka_err(format!("assigning {topic}"), e))?;
    let state = Arc::new(Mutex::new(state));
    let messages = Arc::new(Mutex::new(0u64));
    let reader = TopicReader {
        consumer,
        topic: topic.clone(),
        state: state.clone(),
        messages: messages.clone(),
        buf: MAGIC.to_vec(),
        pos: 0,
        idle_timeout: opts.idle_timeout,
        last_progress: Instant::now(),
    };
    // The offsets reached are known only once the topic has been read: tags added at the end.
    let mut sopts = stream_opts.clone();
    sopts.tags = opts.tags.clone();
    let tags_hook = TagsAtEnd {
        state: state.clone(),
        messages: messages.clone(),
        topic: topic.clone(),
        partitions: partitions.len(),
    };
    let report = crate::stream::backup_stream_with(
        vault,
        reader,
        &stream_name(topic),
        &sopts,
        progress,
        &|| tags_hook.tags(),
    )?;
    let final_state = state.lock().unwrap();
    let partitions = final_state
        .iter()
        .map(|(p, s)| (*p, (s.start, s.end)))
        .collect();
    let messages = *messages.lock().unwrap();
    Ok(KafkaBackupReport {
        stream: report,
        messages,
        partitions,
        gaps,
    })
}

/// Computes the RP's Kafka tags once the topic has been read.
struct TagsAtEnd {
    state: Arc<Mutex<BTreeMap<i32, PartitionProgress>>>,
    messages: Arc<Mutex<u64>>,
    topic: String,
    partitions: usize,
}

impl TagsAtEnd {
    fn tags(&self) -> BTreeMap<String, String> {
        let mut t = BTreeMap::new();
        t.insert("source".into(), "kafka".into());
        t.insert("topic_name".into(), self.topic.clone());
        t.insert("partition_count".into(), self.partitions.to_string());
        t.insert("messages".into(), self.messages.lock().unwrap().to_string());
        for (p, s) in self.state.lock().unwrap().iter() {
            let next = s.last.map_or(s.start, |(o, _)| o + 1).max(s.start);
            t.insert(format!("partition.{p}.next_offset"), next.to_string());
            if let (Some((fo, ft)), Some((lo, lt))) = (s.first, s.last) {
                t.insert(format!("partition.{p}.first_offset"), fo.to_string());
                t.insert(format!("partition.{p}.last_offset"), lo.to_string());
                t.insert(format!("partition.{p}.first_timestamp"), ft.to_string());
                t.insert(format!("partition.{p}.last_timestamp"), lt.to_string());
            }
        }
        t
    }
}

/// Counts deliveries and keeps the first failure.
#[derive(Default)]
struct Deliveries {
    delivered: std::sync::atomic::AtomicU64,
    failed: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err((e, m)) => {
                let mut f = self.failed.lock().unwrap();
                if f.is_none() {
                    *f = Some(format!(
                        "partition {} (message from offset {:?}): {e}",
                        m.partition(),
                        m.offset()
                    ));
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct KafkaRestoreOptions {
    pub brokers: String,
    /// Topic to produce to (default: the RP's topic).
    pub topic: Option<String>,
    pub properties: Vec<(String, String)>,
    /// Delivery timeout for the final flush.
    pub flush_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct KafkaRestoreReport {
    pub topic: String,
    pub messages: u64,
}

/// Parses frames out of the restored stream and produces each message.
struct Producing<'p> {
    producer: &'p BaseProducer<Deliveries>,
    topic: String,
    partitions: i32,
    buf: Vec<u8>,
    header_seen: bool,
    sent: u64,
}

impl Producing<'_> {
    fn send(&mut self, r: Record) -> std::io::Result<()> {
        if r.partition < 0 || r.partition >= self.partitions {
            return Err(std::io::Error::other(format!(
                "message of partition {} but topic {} has {} partitions",
                r.partition, self.topic, self.partitions
            )));
        }
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
        for (k, v) in &r.headers {
            let key = String::from_utf8_lossy(k);
            headers = headers.insert(Header {
                key: &key,
                value: v.as_deref(),
            });
        }
        let mut rec: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(&self.topic).partition(r.partition);
        if let Some(k) = &r.key {
            rec = rec.key(k);
        }
        if let Some(v) = &r.value {
            rec = rec.payload(v);
        }
        if r.timestamp_type != 0 && r.timestamp >= 0 {
            rec = rec.timestamp(r.timestamp);
        }
        if !r.headers.is_empty() {
            rec = rec.headers(headers);
        }
        let mut rec = rec;
        loop {
            match self.producer.send(rec) {
                Ok(()) => break,
                Err((
                    KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    back,
                )) => {
                    self.producer.poll(Duration::from_millis(50));
                    rec = back;
                }
                Err((e, _)) => {
                    return Err(std::io::Error::other(format!(
                        "producing to {} partition {}: {e}",
                        self.topic, r.partition
                    )))
                }
            }
        }
        self.sent += 1;
        self.producer.poll(Duration::ZERO);
        if let Some(f) = self.producer.context().failed.lock().unwrap().clone() {
            return Err(std::io::Error::other(format!(
                "delivery to {} failed: {f}",
                self.topic
            )));
        }
        Ok(())
    }
}

impl Write for Producing<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        let mut at = 0usize;
        if !self.header_seen {
            if self.buf.len() < 4 {
                return Ok(data.len());
            }
            if &self.buf[..4] != MAGIC {
                return Err(std::io::Error::other(
                    "not a Kafka topic stream (no EZK1 header)",
                ));
            }
            self.header_seen = true;
            at = 4;
        }
        loop {
            if self.buf.len() - at < 4 {
                break;
            }
            let len = u32::from_le_bytes(self.buf[at..at + 4].try_into().unwrap()) as usize;
            if self.buf.len() - at - 4 < len {
                break;
            }
            let r =
                decode_record(&self.buf[at + 4..at + 4 + len]).map_err(std::io::Error::other)?;
            at += 4 + len;
            self.send(r)?;
        }
        self.buf.drain(..at);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Produces the messages of topic RP `rp` to the brokers, per partition in their original order.
pub fn restore_topic(
    vault: &Arc<Vault>,
    rp: &RecoveryPoint,
    opts: &KafkaRestoreOptions,
    progress: &dyn Progress,
) -> Result<KafkaRestoreReport, AgentError> {
    if rp.tags.get("source").map(String::as_str) != Some("kafka") {
        return Err(AgentError::Kafka(format!(
            "recovery point {} is not a Kafka topic backup (no source=kafka tag)",
            rp.id
        )));
    }
    let source_topic = rp.tags.get("topic_name").cloned().unwrap_or_default();
    let topic = opts.topic.clone().unwrap_or(source_topic);
    let need: i32 = rp
        .tags
        .get("partition_count")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let producer: BaseProducer<Deliveries> = client_config(&opts.brokers, &opts.properties)
        // Idempotence keeps each partition's order through retries.
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create_with_context(Deliveries::default())
        .map_err(|e| kafka_err(format!("cannot create a producer for {}", opts.brokers), e))?;
    let meta = producer
        .client()
        .fetch_metadata(Some(&topic), META_TIMEOUT)
        .map_err(|e| kafka_err(format!("metadata of topic {topic}"), e))?;
    let have = meta
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len() as i32);
    if have < need {
        return Err(AgentError::Kafka(format!(
            "topic {topic} on {} has {have} partitions; recovery point {} needs {need} \
             (create the topic with at least {need} partitions first)",
            opts.brokers, rp.id
        )));
    }
    let mut sink = Producing {
        producer: &producer,
        topic: topic.clone(),
        partitions: have,
        buf: Vec::new(),
        header_seen: false,
        sent: 0,
    };
    restore_stream(vault, rp, &mut sink, 2, progress)?;
    let sent = sink.sent;
    if !sink.buf.is_empty() {
        return Err(AgentError::Kafka(format!(
            "recovery point {} ends inside a message frame",
            rp.id
        )));
    }
    producer
        .flush(opts.flush_timeout)
        .map_err(|e| kafka_err(format!("flushing messages to {topic}"), e))?;
    if let Some(f) = producer.context().failed.lock().unwrap().clone() {
        return Err(AgentError::Kafka(format!(
            "delivery to {topic} failed: {f}"
        )));
    }
    let delivered = producer
        .context()
        .delivered
        .load(std::sync::atomic::Ordering::Relaxed);
    if delivered != sent {
        return Err(AgentError::Kafka(format!(
            "{delivered} of {sent} messages to {topic} confirmed"
        )));
    }
    Ok(KafkaRestoreReport {
        topic,
        messages: sent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_roundtrip() {
        let r = Record {
            partition: 2,
            offset: 99,
            timestamp_type: 1,
            timestamp: 1_700_000_000_000,
            key: None,
            value: Some(b"{\"a\":1}".to_vec()),
            headers: vec![(b"h".to_vec(), None), (b"trace".to_vec(), Some(vec![0, 1]))],
        };
        let mut out = Vec::new();
        encode_record(&r, &mut out);
        assert_eq!(decode_record(&out[4..]).unwrap(), r);
        assert!(decode_record(&out[4..out.len() - 1]).is_err());
    }
}
