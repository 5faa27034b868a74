//! Kafka topics: incremental backups (one RP per run, resuming from the newest RP's tags) and a
//! restore that produces every message back in per-partition order, against librdkafka's mock
//! cluster (a real Kafka protocol implementation on 127.0.0.1).

use elastio_tests::kafka::topic_scenario;
use elastio_tests::*;
use rdkafka::mocking::MockCluster;

#[test]
fn a_topic_backs_up_incrementally_and_restores_in_partition_order() {
    let cluster = MockCluster::new(3).unwrap();
    topic_scenario(&cluster.bootstrap_servers(), &|name, partitions| {
        cluster.create_topic(name, partitions, 1).unwrap()
    });
}

#[test]
fn an_unknown_topic_is_a_clear_error() {
    let env = Env::new();
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let out = env.run(&[
        "kafka",
        "backup",
        "--brokers",
        &brokers,
        "--topic",
        "nope",
        "--idle-timeout",
        "5s",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope"), "{err}");
    assert_eq!(env.json(&["rp", "list"]).as_array().unwrap().len(), 0);
}
