//! The backend conformance suite on the SQS backend, against a real
//! SQS-protocol server (moto, started by `scripts/test.sh`), on a standard
//! queue and on a FIFO queue. moto checks that requests are signed, not by
//! whom: the script sets dummy credentials.

mod common;
mod conformance;

use std::sync::Arc;
use std::time::Duration;

use walden::backends::DelayStore;
use walden::backends::sqs::{
    Hlc, SqsConsumer, SqsDelays, SqsDlq, SqsProducer, SqsSettings, SqsShards,
};
use walden::entry::ShardRef;

fn settings(url: String, queue: String) -> SqsSettings {
    SqsSettings {
        queue,
        region: "us-east-1".into(),
        endpoint_url: Some(url),
        wait_time: Duration::from_secs(1),
        // Short, so unacked messages of a "restarted" consumer show again
        // within the suite's wait.
        visibility_timeout: Duration::from_secs(2),
        max_messages_per_poll: 10,
        poll_interval: Duration::from_millis(100),
    }
}

/// `FIFO`: a `.fifo` queue, or a standard one.
struct Sqs<const FIFO: bool> {
    settings: SqsSettings,
    producer: SqsProducer,
    delays: Option<Arc<SqsDelays>>,
}

impl<const FIFO: bool> Sqs<FIFO> {
    async fn start() -> Option<Self> {
        let url = common::test_server("WALDEN_TEST_SQS_URL")?;
        let queue = common::unique("conformance") + if FIFO { ".fifo" } else { "" };
        let settings = settings(url, queue);
        let producer = SqsProducer::new(&settings).await.expect("producer");
        Some(Self {
            settings,
            producer,
            delays: None,
        })
    }
}

type Standard = Sqs<false>;
type Fifo = Sqs<true>;

macro_rules! harness {
    ($h:ty, ordered: $ordered:expr) => {
        impl conformance::Harness for $h {
            type P = SqsShards;
            type C = SqsConsumer;
            const ORDERED: bool = $ordered;
            const LOG: bool = false;

            async fn new() -> Option<Self> {
                Self::start().await
            }

            fn shard(&self) -> ShardRef {
                ShardRef::new("conformance", 0)
            }

            /// The namespace's write path: shard 0 is this queue.
            fn producer(&self) -> SqsShards {
                SqsShards(vec![self.producer.clone()])
            }

            async fn consumer(&self, _group: &str) -> SqsConsumer {
                SqsConsumer::new(&self.settings, &self.shard())
                    .await
                    .expect("consumer")
            }

            async fn restart(&mut self) {
                self.producer = SqsProducer::new(&self.settings).await.expect("producer");
            }

            async fn open_delays(&mut self) -> Option<Arc<dyn DelayStore>> {
                let client = self.settings.client().await;
                let name = self.settings.queue.trim_end_matches(".fifo").to_string() + "-delay";
                let back = Arc::new(SqsShards(vec![self.producer.clone()]));
                let delays = SqsDelays::open(
                    &client,
                    &name,
                    "conformance",
                    Duration::from_secs(900),
                    back,
                )
                .await
                .expect("delay queue");
                self.delays = Some(delays.clone());
                Some(delays)
            }

            async fn start_firing(&mut self) {
                let delays = self.delays.as_ref().expect("open_delays first");
                delays.start_worker(Duration::from_secs(1));
            }
        }
    };
}

harness!(Standard, ordered: false);
harness!(Fifo, ordered: true);

mod standard {
    use super::*;
    conformance_suite!(Standard);
}

mod fifo {
    use super::*;
    conformance_suite!(Fifo);
}

/// SendMessageBatch in groups of ten: one answer per entry, in order; on a
/// FIFO queue an id that cannot be a deduplication id is refused alone, and
/// the rest arrive in order.
async fn batches<const FIFO: bool>() {
    use walden::backends::{Consumer, Delivery};
    use walden::entry::{Durable, Entry};
    let Some(h) = Sqs::<FIFO>::start().await else {
        return;
    };
    let mut entries: Vec<Entry> = (0..25)
        .map(|i| Entry {
            id: format!("b-{i}"),
            key: Some("k".into()),
            headers: vec![("n".into(), i.to_string())],
            payload: bytes::Bytes::from(format!("p{i}")),
            ..Entry::default()
        })
        .collect();
    entries[12].id = "not a dedup id".into();
    let answers = h.producer.send_batch(&entries).await;
    assert_eq!(answers.len(), 25);
    let mut seqs = Vec::new();
    for (i, a) in answers.iter().enumerate() {
        match (i, a) {
            (12, Err(e)) if FIFO => assert_eq!(e.durable(), Durable::False),
            (_, Ok(seq)) => seqs.push(*seq),
            (_, Err(e)) => panic!("entry {i}: {e}"),
        }
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let want = if FIFO { 24 } else { 25 };

    let mut c = SqsConsumer::new(&h.settings, &ShardRef::new("conformance", 0))
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while got.len() < want && std::time::Instant::now() < deadline {
        for d in c.receive(10, Duration::from_secs(1)).await.unwrap() {
            got.push((d.sequence(), d.entry().id.clone()));
            d.ack().await.map_err(|(e, _)| e).unwrap();
        }
    }
    assert_eq!(got.len(), want, "{got:?}");
    if !FIFO {
        got.sort();
    }
    let ids: Vec<&str> = got.iter().map(|(_, id)| id.as_str()).collect();
    let expected: Vec<String> = entries
        .iter()
        .map(|e| e.id.clone())
        .filter(|id| !FIFO || id != "not a dedup id")
        .collect();
    assert_eq!(ids, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_a_standard_queue() {
    batches::<false>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_a_fifo_queue() {
    batches::<true>().await;
}

/// A DLQ queue of its own, with no origin queues; `None` without a server.
async fn dlq_queue(prefix: &str) -> Option<Arc<SqsDlq>> {
    let url = common::test_server("WALDEN_TEST_SQS_URL")?;
    let settings = settings(url, common::unique(prefix) + "-dlq");
    let client = settings.client().await;
    let dlq = SqsDlq::open(
        &client,
        &settings.queue,
        "conformance",
        Vec::new(),
        walden::routing::RouteHash::default(),
        Arc::new(Hlc::default()),
    )
    .await
    .unwrap();
    Some(dlq)
}

/// The DLQ half of the suite on a DLQ queue (a best-effort peek lists it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters() {
    let Some(dlq) = dlq_queue("conformance").await else {
        return;
    };
    conformance::dead_letters_append_list_get_remove(dlq.as_ref(), "conformance").await;
}

/// One entry dead-lettered twice (its message shown again when a
/// visibility extension came late, and buried by both deliveries) lists as
/// one letter, and the second is deleted; another entry with the same id
/// stays a letter of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_dead_lettered_twice_is_one_letter() {
    use walden::backends::{DeadLetter, DeadLetters, Origin};
    let Some(dlq) = dlq_queue("twice").await else {
        return;
    };
    let letter = |sequence: u64| DeadLetter {
        dlq_sequence: 0,
        entry: walden::entry::Entry {
            id: "twice".into(),
            key: Some("k".into()),
            payload: bytes::Bytes::from_static(b"p"),
            ..Default::default()
        },
        origin: Origin {
            shard: ShardRef::new("conformance", 0),
            sequence,
            target: "default".into(),
        },
        attempts: 1,
        first_failure_ms: 1,
        last_failure_ms: 2,
        last_error: "boom".into(),
    };
    let first = dlq.append(letter(7)).await.unwrap();
    dlq.append(letter(7)).await.unwrap();
    let other = dlq.append(letter(8)).await.unwrap();
    let seqs = |ls: Vec<DeadLetter>| ls.iter().map(|l| l.dlq_sequence).collect::<Vec<_>>();
    assert_eq!(
        seqs(dlq.get("conformance", "twice").await.unwrap()),
        [first, other]
    );
    // The second letter was deleted, not only left out.
    let (all, total) = dlq.list("conformance", None, 10).await.unwrap();
    assert_eq!((seqs(all), total), (vec![first, other], 2));
    assert_eq!(dlq.queue().approximate_len().await.unwrap(), 2);
}

/// A native RedrivePolicy on the queue is respected: SQS moves a message
/// received too often to the DLQ queue, where it lists as a letter (attempts
/// 0, "moved by the queue's RedrivePolicy") and redrives to its queue with
/// its sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_redrive_policy_moves_messages_walden_lists_and_redrives() {
    use aws_sdk_sqs::types::QueueAttributeName;
    use walden::backends::{Consumer, DeadLetters, Delivery};
    let Some(url) = common::test_server("WALDEN_TEST_SQS_URL") else {
        return;
    };
    let settings = settings(url, common::unique("native"));
    let client = settings.client().await;
    let clock = Arc::new(Hlc::default());
    let dlq_name = format!("{}-dlq", settings.queue);
    let dlq_url = client
        .create_queue()
        .queue_name(&dlq_name)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let arn = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone();
    client
        .create_queue()
        .queue_name(&settings.queue)
        .attributes(
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"1"}}"#),
        )
        .send()
        .await
        .unwrap();
    let producer = SqsProducer::with_client(&client, &settings.queue, clock.clone())
        .await
        .unwrap();
    let dlq = SqsDlq::open(
        &client,
        &dlq_name,
        "conformance",
        vec![producer.clone()],
        walden::routing::RouteHash::default(),
        clock,
    )
    .await
    .unwrap();
    let entry = walden::entry::Entry {
        id: "native-1".into(),
        key: Some("k".into()),
        payload: bytes::Bytes::from_static(b"moved"),
        ..Default::default()
    };
    let sequence = producer.send_entry(&entry).await.unwrap();

    let shard = ShardRef::new("conformance", 0);
    let mut consumer = SqsConsumer::new(&settings, &shard).await.unwrap();
    let first = consumer.receive(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(first.len(), 1);
    for d in first {
        d.nack().await.map_err(|(e, _)| e).unwrap();
    }
    // The next receive is past maxReceiveCount: SQS moves it instead.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let letter = loop {
        assert!(
            consumer
                .receive(10, Duration::from_secs(1))
                .await
                .unwrap()
                .is_empty()
        );
        let (letters, _) = dlq.list("conformance", None, 10).await.unwrap();
        if let Some(l) = letters.into_iter().next() {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "SQS never moved it");
    };
    assert_eq!(letter.entry.id, "native-1");
    assert_eq!(letter.entry.payload, entry.payload);
    assert_eq!(letter.attempts, 0);
    assert!(
        letter.last_error.contains("RedrivePolicy"),
        "{}",
        letter.last_error
    );
    assert_eq!(letter.origin.shard, shard);
    assert_eq!(letter.origin.sequence, sequence);

    let picks = walden::backends::Selection::ids(vec!["native-1".into()]);
    let report = dlq.redrive_selected("conformance", &picks).await.unwrap();
    assert_eq!((report.redriven, report.failed.len()), (1, 0), "{report:?}");
    let back = consumer.receive(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].entry().id, "native-1");
    assert_eq!(back[0].sequence(), sequence);
    assert_eq!(
        dlq.list("conformance", None, 10).await.unwrap().0,
        Vec::new()
    );
}

/// A delivery held longer than the visibility timeout (2 s here) stays
/// hidden from other consumers while it is held, and shows again soon after
/// it is dropped unacked (a consumer that died).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_delivery_stays_hidden_until_dropped() {
    use walden::backends::{Consumer, Delivery};
    let Some(h) = Standard::start().await else {
        return;
    };
    let shard = ShardRef::new("conformance", 0);
    let entry = walden::entry::Entry {
        id: "held-1".into(),
        payload: bytes::Bytes::from_static(b"slow"),
        ..Default::default()
    };
    h.producer.send_entry(&entry).await.unwrap();
    let mut holder = SqsConsumer::new(&h.settings, &shard).await.unwrap();
    let mut other = SqsConsumer::new(&h.settings, &shard).await.unwrap();
    let held = holder.receive(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(held.len(), 1);
    let until = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < until {
        let seen = other.receive(10, Duration::from_secs(1)).await.unwrap();
        assert!(
            seen.is_empty(),
            "shown while held: {:?}",
            seen[0].entry().id
        );
    }
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = other.receive(10, Duration::from_secs(1)).await.unwrap();
        if let Some(d) = seen.into_iter().next() {
            assert_eq!(d.entry().id, "held-1");
            d.ack().await.map_err(|(e, _)| e).unwrap();
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never shown again");
    }
}

/// A delivery dropped unsettled (a rewind, a shutdown) shows its message
/// again at once, not after its visibility timeout (30 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_delivery_shows_again_at_once() {
    use walden::backends::{Consumer, Delivery};
    let Some(mut h) = Standard::start().await else {
        return;
    };
    h.settings.visibility_timeout = Duration::from_secs(30);
    let shard = ShardRef::new("conformance", 0);
    let entry = walden::entry::Entry {
        id: "dropped-1".into(),
        payload: bytes::Bytes::from_static(b"again"),
        ..Default::default()
    };
    h.producer.send_entry(&entry).await.unwrap();
    let mut first = SqsConsumer::new(&h.settings, &shard).await.unwrap();
    let got = first.receive(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(got.len(), 1);
    drop(got);
    let mut other = SqsConsumer::new(&h.settings, &shard).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(d) = other
            .receive(10, Duration::from_secs(1))
            .await
            .unwrap()
            .pop()
        {
            assert_eq!(d.entry().id, "dropped-1");
            d.ack().await.map_err(|(e, _)| e).unwrap();
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still hidden");
    }
}
