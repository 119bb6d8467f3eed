//! The backend conformance suite: written once against the backend traits,
//! run on every backend. A backend's test file implements [`Harness`] and
//! calls [`conformance_suite!`].
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use walden::backends::{Consumer, DelayStore, Delivery, Producer, append_one};
use walden::entry::{Delivered, Durable, Entry, ShardRef, now_ms};

const WAIT: Duration = Duration::from_secs(5);

/// Sets up one backend for a test. Each harness uses its own fresh names.
/// Its producer is the one the service writes through (Ingest calls the
/// same [`Producer::append`]).
pub trait Harness: Sized {
    type P: Producer;
    type C: Consumer;
    /// Entries of one key arrive in the order they were sent (not so on a
    /// standard SQS queue).
    const ORDERED: bool = true;
    /// A log: each group has its own position, progress is a commit, and
    /// what is after it comes again after a restart. A queue (SQS) instead
    /// deletes what is acked and shows again, after its visibility timeout,
    /// what is not.
    const LOG: bool = true;
    /// `None` when the backend's server is not configured (the harness says
    /// so loudly): the case is skipped.
    fn new() -> impl Future<Output = Option<Self>>;
    fn shard(&self) -> ShardRef;
    fn producer(&self) -> Self::P;
    fn consumer(&self, group: &str) -> impl Future<Output = Self::C>;
    /// Stop and start the backend's local state (the process restarts).
    fn restart(&mut self) -> impl Future<Output = ()>;
    /// Open the backend's delay store afresh (as a restarted process would);
    /// `None` where the backend has none yet (the case says so and skips).
    fn open_delays(&mut self) -> impl Future<Output = Option<Arc<dyn DelayStore>>>;
    /// Start whatever fires a store that fires itself (the broker's tier
    /// workers); nothing for a store the scheduler polls.
    fn start_firing(&mut self) -> impl Future<Output = ()>;
}

fn entry(i: usize, key: &str) -> Entry {
    Entry {
        id: format!("id-{i}"),
        key: Some(key.to_string()),
        headers: vec![("n".into(), i.to_string())],
        payload: Bytes::from(format!("payload-{i}")),
        ..Entry::default()
    }
}

async fn send_n<H: Harness>(h: &H, n: usize, key: impl Fn(usize) -> String) -> Vec<u64> {
    let p = h.producer();
    let mut seqs = Vec::new();
    for i in 0..n {
        let sent = append_one(&p, &h.shard(), entry(i, &key(i)))
            .await
            .expect("append");
        assert_eq!(sent.durable, Durable::True);
        seqs.push(sent.sequence);
    }
    seqs
}

/// Receive until `n` deliveries arrived (or the wait runs out).
async fn receive_n<C: Consumer>(c: &mut C, n: usize) -> Vec<C::Delivery> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while out.len() < n && tokio::time::Instant::now() < deadline {
        out.extend(
            c.receive(n - out.len(), Duration::from_millis(200))
                .await
                .expect("receive"),
        );
    }
    out
}

fn ids<D: Delivery>(ds: &[D]) -> Vec<String> {
    ds.iter().map(|d| d.entry().id.clone()).collect()
}

/// What a test keeps of a delivery once it is acked.
struct Seen {
    id: String,
    key: Option<String>,
    payload: Bytes,
    headers: Vec<(String, String)>,
    sequence: u64,
    shard: ShardRef,
}

/// Receive until `n` entries arrived, acking each as it comes (a FIFO queue
/// hands out no more of a group while one of it is unacked).
async fn receive_acking<C: Consumer>(c: &mut C, n: usize) -> Vec<Seen> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while out.len() < n && tokio::time::Instant::now() < deadline {
        for d in c
            .receive(n - out.len(), Duration::from_millis(200))
            .await
            .expect("receive")
        {
            let e = d.entry();
            out.push(Seen {
                id: e.id.clone(),
                key: e.key.clone(),
                payload: e.payload.clone(),
                headers: e.headers.clone(),
                sequence: d.sequence(),
                shard: d.shard().clone(),
            });
            d.ack().await.map_err(|(e, _)| e).unwrap();
        }
    }
    out
}

pub async fn send_and_receive<H: Harness>() {
    let Some(h) = H::new().await else {
        return;
    };
    let seqs = send_n(&h, 10, |_| "k".into()).await;
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequences grow: {seqs:?}"
    );
    let mut c = h.consumer("g").await;
    let mut got = receive_acking(&mut c, 10).await;
    if !H::ORDERED {
        got.sort_by_key(|s| s.sequence);
    }
    assert_eq!(
        got.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        (0..10).map(|i| format!("id-{i}")).collect::<Vec<_>>()
    );
    let d = &got[3];
    assert_eq!(&d.payload[..], b"payload-3");
    assert_eq!(d.key.as_deref(), Some("k"));
    assert_eq!(d.headers, vec![("n".to_string(), "3".to_string())]);
    assert_eq!(d.sequence, seqs[3]);
    assert_eq!(d.shard, h.shard());
    assert!(
        c.receive(10, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn ack_and_nack<H: Harness>() {
    let Some(h) = H::new().await else {
        return;
    };
    send_n(&h, 3, |_| "k".into()).await;
    let mut c = h.consumer("g").await;
    let got = receive_n(&mut c, 3).await;
    assert_eq!(got.len(), 3);
    for d in got {
        match d.entry().id == "id-1" {
            true => d.nack().await.map_err(|(e, _)| e).unwrap(),
            false => d.ack().await.map_err(|(e, _)| e).unwrap(),
        }
    }
    let again = receive_n(&mut c, 1).await;
    assert_eq!(ids(&again), vec!["id-1"], "the nacked entry comes back");
    for d in again {
        d.ack().await.map_err(|(e, _)| e).unwrap();
    }
    assert!(
        c.receive(10, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn order_per_key<H: Harness>() {
    if !H::ORDERED {
        eprintln!("order_per_key: skipped, this backend does not keep per-key order");
        return;
    }
    let Some(h) = H::new().await else {
        return;
    };
    let keys = ["a", "b", "c"];
    send_n(&h, 30, |i| keys[i % 3].to_string()).await;
    let mut c = h.consumer("g").await;
    let got = receive_acking(&mut c, 30).await;
    assert_eq!(got.len(), 30);
    let mut last: HashMap<String, u64> = HashMap::new();
    for d in &got {
        let key = d.key.clone().unwrap();
        let n: u64 = d.headers[0].1.parse().unwrap();
        if let Some(prev) = last.insert(key.clone(), n) {
            assert!(prev < n, "key {key}: {n} after {prev}");
        }
    }
}

pub async fn commit_and_resume<H: Harness>() {
    let Some(mut h) = H::new().await else {
        return;
    };
    // On a queue, one key per entry: a FIFO queue hands out nothing more of
    // a key while an entry of it is unacked.
    send_n(
        &h,
        10,
        |i| if H::LOG { "k".into() } else { format!("k{i}") },
    )
    .await;
    {
        let mut c = h.consumer("g").await;
        let got = receive_n(&mut c, 10).await;
        // Ack 0..5 and 7: the low watermark is 5.
        for d in got {
            let n: usize = d.entry().headers[0].1.parse().unwrap();
            if n < 5 || n == 7 {
                d.ack().await.map_err(|(e, _)| e).unwrap();
            }
        }
        c.commit().await.unwrap();
    }
    h.restart().await;
    let mut c = h.consumer("g").await;
    if !H::LOG {
        // A queue: what was acked is gone; the rest shows again once its
        // visibility timeout runs out.
        let mut got = ids(&receive_n(&mut c, 4).await);
        got.sort();
        assert_eq!(got, vec!["id-5", "id-6", "id-8", "id-9"]);
        return;
    }
    let got = receive_n(&mut c, 5).await;
    // At least once: everything from the watermark on comes again, 7 included.
    assert_eq!(ids(&got), vec!["id-5", "id-6", "id-7", "id-8", "id-9"]);
    // Another group starts from the beginning.
    let mut other = h.consumer("other").await;
    assert_eq!(receive_n(&mut other, 10).await.len(), 10);
}

pub async fn uncommitted_work_is_delivered_again<H: Harness>() {
    if !H::LOG {
        eprintln!("uncommitted_work_is_delivered_again: skipped, on a queue an ack is the commit");
        return;
    }
    let Some(mut h) = H::new().await else {
        return;
    };
    send_n(&h, 4, |_| "k".into()).await;
    {
        let mut c = h.consumer("g").await;
        for d in receive_n(&mut c, 4).await {
            d.ack().await.map_err(|(e, _)| e).unwrap();
        }
        // No commit: a crash here loses the progress, not the entries.
    }
    h.restart().await;
    let mut c = h.consumer("g").await;
    assert_eq!(receive_n(&mut c, 4).await.len(), 4);
}

/// Delayed entries survive a reopen of the store, and each comes back on its
/// shard no sooner than its due time, in due order (dues 1.2 s apart: a
/// broker's tiers are exact only to their smallest tier, 1 s).
pub async fn delays_come_back_when_due<H: Harness>() {
    let Some(mut h) = H::new().await else {
        return;
    };
    let shard = h.shard();
    let start = now_ms();
    let dues = [
        start + 2_400,
        start.saturating_sub(5),
        start + 3_600,
        start + 1_200,
    ];
    let items: Vec<Delivered> = dues
        .iter()
        .enumerate()
        .map(|(i, &due_ms)| Delivered {
            shard: shard.clone(),
            sequence: 100 + i as u64,
            entry: Arc::new(Entry {
                id: format!("delayed-{i}"),
                due_ms,
                ..entry(i, &format!("dk-{i}"))
            }),
        })
        .collect();
    let Some(store) = h.open_delays().await else {
        eprintln!("delays_come_back_when_due: skipped, this backend has no delay store yet");
        return;
    };
    store.delay(items).await.expect("delay");
    drop(store);

    let store = h.open_delays().await.expect("reopen");
    h.start_firing().await;
    let mut consumer = h.consumer("delays").await;
    let mut back: Vec<(String, u64)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while back.len() < dues.len() && tokio::time::Instant::now() < deadline {
        if store.fires_itself() {
            for d in consumer
                .receive(10, Duration::from_millis(100))
                .await
                .expect("receive")
            {
                assert_eq!(d.shard(), &shard);
                back.push((d.entry().id.clone(), now_ms()));
                d.ack().await.map_err(|(e, _)| e).unwrap();
            }
        } else {
            let due = store
                .due_between(
                    &shard,
                    0,
                    now_ms() + 1,
                    walden::backends::Limit::entries(10),
                )
                .await
                .expect("due_between");
            for d in due {
                assert!(
                    d.entry.due_ms <= now_ms(),
                    "{} was handed out early",
                    d.entry.id
                );
                back.push((d.entry.id.clone(), now_ms()));
                store.undelay(d).await.expect("undelay");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let order: Vec<&str> = back.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(order, ["delayed-1", "delayed-3", "delayed-0", "delayed-2"]);
    for (id, at) in &back {
        let i: usize = id["delayed-".len()..].parse().unwrap();
        assert!(*at >= dues[i], "{id} came back {} ms early", dues[i] - at);
    }
}

/// One `#[tokio::test]` per suite case, for harness `$h`.
#[macro_export]
macro_rules! conformance_suite {
    ($h:ty) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn send_and_receive() {
            conformance::send_and_receive::<$h>().await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn ack_and_nack() {
            conformance::ack_and_nack::<$h>().await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn order_per_key() {
            conformance::order_per_key::<$h>().await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn commit_and_resume() {
            conformance::commit_and_resume::<$h>().await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn uncommitted_work_is_delivered_again() {
            conformance::uncommitted_work_is_delivered_again::<$h>().await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn delays_come_back_when_due() {
            conformance::delays_come_back_when_due::<$h>().await;
        }
    };
}

/// The dead-letter half of the suite, for any [`DeadLetters`] store. `ns` is
/// a namespace no other test uses.
pub async fn dead_letters_append_list_get_remove<D: walden::backends::DeadLetters>(
    dlq: &D,
    ns: &str,
) {
    use walden::backends::{DeadLetter, Origin};
    let letter = |i: u64| DeadLetter {
        dlq_sequence: 0,
        entry: Entry {
            id: format!("dead-{i}"),
            key: Some("k".into()),
            headers: vec![("h".into(), i.to_string())],
            payload: Bytes::from(format!("payload-{i}")),
            timestamp_ms: 1000 + i,
            due_ms: 0,
        },
        origin: Origin {
            shard: ShardRef::new(ns, 2),
            sequence: 40 + i,
            target: "default".into(),
        },
        attempts: 3,
        first_failure_ms: 10,
        last_failure_ms: 20 + i,
        last_error: format!("error {i}"),
    };
    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(dlq.append(letter(i)).await.expect("append"));
    }
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "DLQ sequences grow: {seqs:?}"
    );

    // Listing pages in order, and a letter comes back unchanged.
    let (page, total) = dlq.list(ns, None, 2).await.unwrap();
    assert_eq!(total, 5);
    assert_eq!(
        page.iter().map(|l| l.entry.id.as_str()).collect::<Vec<_>>(),
        ["dead-0", "dead-1"]
    );
    let (rest, _) = dlq.list(ns, Some(page[1].dlq_sequence), 10).await.unwrap();
    assert_eq!(rest.len(), 3);
    let (none, total) = dlq.list(ns, Some(u64::MAX), 10).await.unwrap();
    assert_eq!(
        (none.len(), total),
        (0, 5),
        "nothing is after the largest sequence"
    );
    let mut want = letter(3);
    want.dlq_sequence = seqs[3];
    assert_eq!(dlq.get(ns, "dead-3").await.unwrap(), [want]);
    assert_eq!(dlq.get(ns, "nope").await.unwrap(), []);
    assert_eq!(dlq.list("another-namespace", None, 10).await.unwrap().1, 0);

    // Removing takes a letter out of the listing, once.
    assert!(dlq.remove(ns, seqs[1], "purged").await.unwrap());
    assert!(!dlq.remove(ns, seqs[1], "purged").await.unwrap());
    assert_eq!(dlq.get(ns, "dead-1").await.unwrap(), []);
    let (all, total) = dlq.list(ns, None, 10).await.unwrap();
    assert_eq!(total, 4);
    assert!(all.iter().all(|l| l.entry.id != "dead-1"));

    // Another entry with the same id (written again past the dedup window)
    // is a second letter: it hides nothing, and each goes on its own.
    let mut other = letter(2);
    other.origin.sequence = 99;
    let again = dlq.append(other).await.unwrap();
    let (all, total) = dlq.list(ns, None, 10).await.unwrap();
    assert_eq!(total, 5);
    let ids: Vec<_> = all.iter().map(|l| l.entry.id.as_str()).collect();
    assert_eq!(ids, ["dead-0", "dead-2", "dead-3", "dead-4", "dead-2"]);
    let both = dlq.get(ns, "dead-2").await.unwrap();
    assert_eq!(
        both.iter().map(|l| l.dlq_sequence).collect::<Vec<_>>(),
        [seqs[2], again],
        "every letter of the id, oldest first"
    );
    assert!(dlq.remove(ns, seqs[2], "redriven").await.unwrap());
    let left = dlq.get(ns, "dead-2").await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].dlq_sequence, again, "the newer letter stays");

    // One entry dead-lettered twice (delivered again after a crash or a
    // rebalance, and buried both times) is one letter.
    dlq.append(letter(4)).await.unwrap();
    let (_, total) = dlq.list(ns, None, 10).await.unwrap();
    assert_eq!(total, 4);
    let fours = dlq.get(ns, "dead-4").await.unwrap();
    assert_eq!(
        fours.iter().map(|l| l.dlq_sequence).collect::<Vec<_>>(),
        [seqs[4]]
    );
}
