//! The Kafka scenario shared by the mock-cluster test (`tests/kafka.rs`) and the end-to-end run
//! against a real broker (`cargo xtask e2e-kafka`, `tests/kafka_e2e.rs`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::Env;

/// (key, value, headers, timestamp) of one message.
type Msg = (
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<(String, Option<Vec<u8>>)>,
    i64,
);

pub const PARTITIONS: i32 = 3;

pub fn produce(brokers: &str, topic: &str, from: usize, count: usize) -> BTreeMap<i32, Vec<Msg>> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut sent: BTreeMap<i32, Vec<Msg>> = BTreeMap::new();
    for i in from..from + count {
        let p = (i % PARTITIONS as usize) as i32;
        let key = (i % 5 != 0).then(|| format!("customer-{}", i % 97).into_bytes());
        let value = (i % 50 != 7).then(|| {
            format!(
                "{{\"order\":{i},\"amount\":{}.{:02}}}",
                i * 7 % 1000,
                i % 100
            )
            .into_bytes()
        });
        let mut headers = Vec::new();
        if i % 3 == 0 {
            headers.push(("trace-id".to_string(), Some(format!("t{i}").into_bytes())));
            headers.push(("empty".to_string(), None));
        }
        let ts = 1_700_000_000_000 + i as i64;
        let mut oh = OwnedHeaders::new();
        for (k, v) in &headers {
            oh = oh.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).partition(p).timestamp(ts);
        if let Some(k) = &key {
            rec = rec.key(k);
        }
        if let Some(v) = &value {
            rec = rec.payload(v);
        }
        if !headers.is_empty() {
            rec = rec.headers(oh);
        }
        producer.send(rec).map_err(|(e, _)| e).unwrap();
        producer.poll(Duration::ZERO);
        sent.entry(p).or_default().push((key, value, headers, ts));
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    sent
}

pub fn consume_all(brokers: &str, topic: &str, expect: usize) -> BTreeMap<i32, Vec<Msg>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut got: BTreeMap<i32, Vec<Msg>> = BTreeMap::new();
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while n < expect {
        assert!(
            Instant::now() < deadline,
            "only {n} of {expect} messages in {topic}"
        );
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.unwrap();
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        got.entry(m.partition()).or_default().push((
            m.key().map(<[u8]>::to_vec),
            m.payload().map(<[u8]>::to_vec),
            headers,
            m.timestamp().to_millis().unwrap(),
        ));
        n += 1;
    }
    // Nothing more than expected.
    assert!(
        consumer.poll(Duration::from_millis(500)).is_none(),
        "extra messages in {topic}"
    );
    got
}

/// The Kafka scenario against any broker: `create_topic(name, partitions)` makes a topic.
/// Three backups of `orders` (3000 messages, 600 more, nothing new), tags checked, both RPs
/// with data restored into a new topic and compared message by message, per partition;
/// a topic with too few partitions refused.
pub fn topic_scenario(brokers: &str, create_topic: &dyn Fn(&str, i32)) {
    let env = Env::new();
    let brokers = brokers.to_string();
    create_topic("orders", PARTITIONS);
    let mut all = produce(&brokers, "orders", 0, 3000);

    let backup = |env: &Env| {
        env.json(&[
            "kafka",
            "backup",
            "--brokers",
            &brokers,
            "--topic",
            "orders",
            "--tag",
            "env=test",
        ])
    };
    let first = backup(&env);
    assert_eq!(first["messages"], 3000, "{first}");
    let tags = &first["rp"]["tags"];
    assert_eq!(tags["topic_name"], "orders");
    assert_eq!(tags["partition_count"], "3");
    assert_eq!(tags["env"], "test");
    for p in 0..PARTITIONS {
        assert_eq!(tags[format!("partition.{p}.first_offset")], "0");
        assert_eq!(tags[format!("partition.{p}.last_offset")], "999");
        assert_eq!(tags[format!("partition.{p}.next_offset")], "1000");
        assert!(tags[format!("partition.{p}.last_timestamp")]
            .as_str()
            .unwrap()
            .starts_with("17"));
    }

    // New messages: the next run takes exactly those.
    let more = produce(&brokers, "orders", 3000, 600);
    let second = backup(&env);
    assert_eq!(second["messages"], 600, "{second}");
    let tags2 = &second["rp"]["tags"];
    assert_eq!(tags2["partition.0.first_offset"], "1000");
    assert_eq!(tags2["partition.0.last_offset"], "1199");
    // Nothing new: an empty RP that keeps the resume offsets.
    let third = backup(&env);
    assert_eq!(third["messages"], 0, "{third}");
    assert_eq!(third["rp"]["tags"]["partition.2.next_offset"], "1200");
    assert!(third["rp"]["tags"]
        .get("partition.2.first_offset")
        .is_none());

    let listed = env.json(&[
        "rp",
        "list",
        "--type",
        "stream",
        "--tag",
        "topic_name=orders",
    ]);
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");

    // Restore both RPs with data into a new topic: same messages, same per-partition order.
    create_topic("orders-restored", PARTITIONS);
    for rp in [&first, &second] {
        env.ok(&[
            "kafka",
            "restore",
            "--rp",
            rp["rp"]["id"].as_str().unwrap(),
            "--brokers",
            &brokers,
            "--to-topic",
            "orders-restored",
        ]);
    }
    for (p, msgs) in more {
        all.entry(p).or_default().extend(msgs);
    }
    let got = consume_all(&brokers, "orders-restored", 3600);
    for p in 0..PARTITIONS {
        assert_eq!(got[&p].len(), all[&p].len(), "partition {p}");
        for (i, (g, w)) in got[&p].iter().zip(&all[&p]).enumerate() {
            assert_eq!(g, w, "partition {p} message {i}");
        }
    }
    // Null keys and values survived.
    assert!(got[&0].iter().any(|m| m.0.is_none()) && got[&1].iter().any(|m| m.1.is_none()));

    // A topic with too few partitions is refused before anything is produced.
    create_topic("narrow", 1);
    let out = env.run(&[
        "kafka",
        "restore",
        "--rp",
        first["rp"]["id"].as_str().unwrap(),
        "--brokers",
        &brokers,
        "--to-topic",
        "narrow",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has 1 partitions"));
}
