//! The SQS server goes away under a producer: no send is answered `true`
//! while it is down, and a refused connection is a clear `false` (nothing
//! was sent). Uses its own moto server (`WALDEN_TEST_MOTO_BIN`), so it can
//! stop it.

mod common;

use std::time::Duration;

use walden::backends::sqs::{SqsProducer, SqsSettings};
use walden::entry::{Durable, Entry};

fn entry(i: u32) -> Entry {
    Entry {
        id: format!("out-{i}"),
        key: Some("k".into()),
        payload: bytes::Bytes::from(format!("p{i}")),
        ..Entry::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_goes_away_never_gets_a_false_true() {
    let Some(bin) = common::test_server("WALDEN_TEST_MOTO_BIN") else {
        return;
    };
    let port = common::free_port();
    let mut moto = common::start_moto(&bin, port);
    let settings = SqsSettings {
        queue: common::unique("outage"),
        region: "us-east-1".into(),
        endpoint_url: Some(format!("http://127.0.0.1:{port}")),
        wait_time: Duration::from_secs(1),
        visibility_timeout: Duration::from_secs(30),
        max_messages_per_poll: 10,
        poll_interval: Duration::from_millis(100),
    };
    let producer = SqsProducer::new(&settings).await.expect("producer");
    producer
        .send_entry(&entry(0))
        .await
        .expect("a send while up");

    moto.kill().unwrap();
    moto.wait().unwrap();
    for i in 1..4 {
        let e = producer
            .send_entry(&entry(i))
            .await
            .expect_err("no send succeeds while the server is down");
        assert_eq!(e.durable(), Durable::False, "connection refused: {e}");
    }
}
