//! The Kafka scenario against a real Kafka-compatible broker (tansu), started by
//! `cargo xtask e2e-kafka`, which builds this test with the `e2e-kafka` feature and passes the
//! broker in `ELASTIO_TEST_KAFKA_BROKERS`. Not part of `cargo xtask test` (building tansu takes
//! about 40 minutes).
#![cfg(feature = "e2e-kafka")]

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake};
use std::time::Duration;

use elastio_tests::kafka::topic_scenario;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

/// Runs a future to completion on this thread (the admin client's futures complete from
/// librdkafka's own threads).
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

#[test]
fn a_topic_on_a_real_broker() {
    let brokers = std::env::var("ELASTIO_TEST_KAFKA_BROKERS")
        .expect("ELASTIO_TEST_KAFKA_BROKERS is not set: run `cargo xtask e2e-kafka`");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    topic_scenario(&brokers, &|name, partitions| {
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let results = block_on(admin.create_topics([&topic], &AdminOptions::new())).unwrap();
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
        }
    });
}
