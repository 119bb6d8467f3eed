//! Walden served on the SQS backend, against a real SQS-protocol server
//! (moto): HTTP → FIFO queues → HTTP target in per-key order through
//! retries; a long delay hopping through the delay queue; the DLQ queue and
//! redrive; what an SQS namespace refuses; the server going away.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::target::HttpTarget;
use common::{get_json, post, test_server, unique};
use serde_json::{Value, json};
use walden::service::Spawned;

const WAIT: Duration = Duration::from_secs(30);

/// A service with one SQS namespace `ns` on `queues`; `extra` adds lines to
/// the namespace's table (after `[namespaces.ns]`).
fn start(
    dir: &std::path::Path,
    url: &str,
    queues: &[String],
    target: &HttpTarget,
    extra: &str,
) -> Spawned {
    Spawned::start(config(dir, url, queues, target, extra)).unwrap()
}

fn config(
    dir: &std::path::Path,
    url: &str,
    queues: &[String],
    target: &HttpTarget,
    extra: &str,
) -> walden::config::Config {
    let queues: Vec<String> = queues.iter().map(|q| format!("{q:?}")).collect();
    let fifo = queues[0].ends_with(".fifo\"");
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
[namespaces.ns]
shards = {}
ordering = "{}"
{extra}
[namespaces.ns.retry]
initial_backoff_ms = 50
max_backoff_ms = 200
max_attempts = 1000
[namespaces.ns.backend]
type = "sqs"
queues = [{}]
region = "us-east-1"
endpoint_url = "{url}"
wait_time_s = 1
poll_interval_ms = 100
visibility_timeout_s = 4
delay_hop_s = 1
[namespaces.ns.target]
type = "http"
url = "{}"
"#,
        dir.display(),
        queues.len(),
        if fifo { "per_key" } else { "none" },
        queues.join(", "),
        target.url()
    );
    let config = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&config).expect("a valid config");
    config
}

/// Entries of three keys over two FIFO queues, one key's target failing for
/// a while (503, retried): every entry arrives once, and each key's entries
/// arrive in write order with growing sequences, the failing key's too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_queues_keep_key_order_through_retries() {
    let Some(url) = test_server("WALDEN_TEST_SQS_URL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key("k1", 503);
    let base_name = unique("orders");
    let queues = [format!("{base_name}-a.fifo"), format!("{base_name}-b.fifo")];
    let svc = start(dir.path(), &url, &queues, &target, "");
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);

    let mut ids = Vec::new();
    for i in 0..9 {
        let (status, body) = post(
            &format!("{base}/log"),
            json!({"payload": {"n": i}, "key": format!("k{}", i % 3)}),
        )
        .await;
        assert_eq!(
            (status, body["durable"].as_str()),
            (200, Some("true")),
            "{body}"
        );
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let entries: Vec<Value> = (9..21)
        .map(|i| json!({"payload": {"n": i}, "key": format!("k{}", i % 3)}))
        .collect();
    let (status, body) = post(&format!("{base}/log/batch"), json!({ "entries": entries })).await;
    assert_eq!(status, 200, "{body}");
    for r in body["results"].as_array().unwrap() {
        assert_eq!(r["durable"], "true", "{r}");
        ids.push(r["id"].as_str().unwrap().to_string());
    }

    // k0 and k2 get through while k1 is refused.
    let early = target.wait_for(14, WAIT);
    assert!(early.iter().all(|r| r.key() != Some("k1")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    target.reject_key("k1", 0);
    let got = target.wait_for(21, WAIT);
    let delivered: Vec<&str> = got.iter().map(|r| r.id()).collect();
    assert_eq!(
        delivered.iter().copied().collect::<HashSet<_>>(),
        ids.iter().map(String::as_str).collect::<HashSet<_>>(),
        "every entry, each once: {delivered:?}"
    );
    assert_eq!(delivered.len(), 21, "no entry twice: {delivered:?}");
    for k in ["k0", "k1", "k2"] {
        let of_key: Vec<(u64, u64)> = got
            .iter()
            .filter(|r| r.key() == Some(k))
            .map(|r| (r.body["payload"]["n"].as_u64().unwrap(), r.sequence()))
            .collect();
        assert_eq!(of_key.len(), 7, "key {k}: {of_key:?}");
        assert!(
            of_key
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1),
            "key {k} in write order with growing sequences: {of_key:?}"
        );
    }
    svc.stop();
}

/// `late` (written with `sequence`) fired at its due time, up to 3 s after
/// (DelaySeconds counts whole seconds, and a worker polls), never before, and
/// kept its sequence.
fn assert_on_time(late: &common::target::Received, sequence: u64) {
    let due = late.body["due_ms"].as_u64().unwrap();
    assert!(late.at_ms >= due, "fired {} ms early", due - late.at_ms);
    assert!(
        late.at_ms <= due + 3_000,
        "fired {} ms late",
        late.at_ms - due
    );
    assert_eq!(late.sequence(), sequence, "it keeps its sequence");
}

/// A long delay hops through the delay queue until due. A 20-minute delay
/// is two hops at the default 900 s cap (`delay_hop_s`); here the cap is
/// 1 s, so a 3.5 s delay takes four hops through the same code, and a FIFO
/// entry comes back into its key's group. It never fires early, and an
/// undelayed write after it is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_delay_hops_through_the_delay_queue() {
    let Some(url) = test_server("WALDEN_TEST_SQS_URL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let queues = [unique("delayed") + ".fifo"];
    let svc = start(dir.path(), &url, &queues, &target, "");
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);

    let (status, body) = post(
        &format!("{base}/log"),
        json!({"payload": "later", "key": "d", "id": "late-1", "lifecycle": {"delay_ms": 3500}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sequence = body["sequence"].as_u64().unwrap();
    let (status, _) = post(
        &format!("{base}/log"),
        json!({"payload": "now", "key": "other", "id": "now-1"}),
    )
    .await;
    assert_eq!(status, 200);

    let got = target.wait_for(2, WAIT);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].id(), "now-1");
    assert_eq!(got[1].id(), "late-1");
    assert_on_time(&got[1], sequence);
    svc.stop();
}

/// An entry the target refuses for good goes to the DLQ queue with why; it
/// lists and shows over HTTP, and a redrive puts it back on its queue with
/// its original sequence, where it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_go_to_the_dlq_queue_and_redrive() {
    let Some(url) = test_server("WALDEN_TEST_SQS_URL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key("poison", 400);
    let queues = [unique("letters") + ".fifo"];
    let svc = start(dir.path(), &url, &queues, &target, "");
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);

    let (status, body) = post(
        &format!("{base}/log"),
        json!({"payload": {"bad": true}, "key": "poison", "id": "bad-1"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sequence = body["sequence"].as_u64().unwrap();
    let (status, _) = post(
        &format!("{base}/log"),
        json!({"payload": {"good": true}, "key": "fine", "id": "good-1"}),
    )
    .await;
    assert_eq!(status, 200);
    target.wait_for(1, WAIT);

    let deadline = std::time::Instant::now() + WAIT;
    let listed = loop {
        let listed: Value = get_json(&format!("{base}/dlq")).await;
        if !listed["entries"].as_array().unwrap().is_empty() {
            break listed;
        }
        assert!(std::time::Instant::now() < deadline, "no letter: {listed}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let letter = &listed["entries"][0];
    assert_eq!(letter["id"], "bad-1", "{listed}");
    assert_eq!(letter["origin"]["sequence"], sequence);
    assert!(
        letter["last_error"].as_str().unwrap().contains("400"),
        "{letter}"
    );
    let shown: Value = get_json(&format!("{base}/dlq/bad-1")).await;
    assert_eq!(shown["id"], "bad-1");

    target.reject_key("poison", 0);
    let (status, body) = post(&format!("{base}/dlq/redrive"), json!({"ids": ["bad-1"]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["redriven"], 1, "{body}");
    let got = target.wait_for(2, WAIT);
    let back = got.iter().find(|r| r.id() == "bad-1").expect("redriven");
    assert_eq!(back.sequence(), sequence, "it keeps its sequence");
    let listed: Value = get_json(&format!("{base}/dlq")).await;
    assert_eq!(listed["entries"], json!([]), "{listed}");
    svc.stop();
}

/// What an SQS namespace refuses at ingest, with a 4xx that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_sqs_cannot_take_are_refused_clearly() {
    let Some(url) = test_server("WALDEN_TEST_SQS_URL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let queues = [unique("limits") + ".fifo"];
    let svc = start(dir.path(), &url, &queues, &target, "");
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);

    // 200 KB is under limits.max_payload_bytes (1 MiB) but, base64-encoded,
    // over an SQS message.
    let big = "x".repeat(200_000);
    let (status, body) = post(&format!("{base}/log"), json!({"payload": big})).await;
    assert_eq!(status, 413, "{body}");
    assert!(body["message"].as_str().unwrap().contains("SQS"), "{body}");
    let (status, body) = post(
        &format!("{base}/log"),
        json!({"payload": 1, "id": "has a space"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("FIFO"), "{body}");
    let (status, body) = post(
        &format!("{base}/log"),
        json!({"payload": "x".repeat(150_000)}),
    )
    .await;
    assert_eq!(status, 200, "150 KB fits: {body}");
    // A set of mutations spans several queues: refused, saying why.
    let (status, body) = post(
        &format!("{base}/mutations"),
        json!({"id": "s1", "mutations": [{"key": "a", "payload": 1}]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["id"], "s1", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("not supported on SQS"),
        "{body}"
    );
    svc.stop();

    // A smaller `max_message_bytes` is the bound, and the error names it.
    let dir = tempfile::tempdir().unwrap();
    let mut smaller = config(dir.path(), &url, &queues, &target, "");
    if let walden::config::BackendConfig::Sqs(q) =
        &mut smaller.namespaces.get_mut("ns").unwrap().backend
    {
        q.max_message_bytes = 65_536;
    }
    let svc = Spawned::start(smaller).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    let (status, body) = post(
        &format!("{base}/log"),
        json!({"payload": "x".repeat(60_000)}),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("backend.max_message_bytes"),
        "{body}"
    );
    let (status, body) = post(
        &format!("{base}/log"),
        json!({"payload": "x".repeat(40_000)}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    svc.stop();
}

/// The SQS server goes away under the service: writes get 503 `false` (or
/// 504 `unknown`), never a `true`; once it is back, writes succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_going_away_never_gets_a_false_true() {
    let Some(bin) = test_server("WALDEN_TEST_MOTO_BIN") else {
        return;
    };
    let port = common::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut moto = common::start_moto(&bin, port);
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let queues = [unique("outage")];
    let svc = start(dir.path(), &url, &queues, &target, "");
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    let (status, _) = post(&format!("{base}/log"), json!({"payload": 0})).await;
    assert_eq!(status, 200);

    moto.kill().unwrap();
    moto.wait().unwrap();
    for i in 1..4 {
        let (status, body) = post(&format!("{base}/log"), json!({"payload": i})).await;
        assert!(
            matches!(
                (status, body["durable"].as_str()),
                (503, Some("false")) | (504, Some("unknown"))
            ),
            "{status} {body}"
        );
    }

    // A new server is empty: its queues are made again, as an operator
    // would after losing them.
    let mut moto = common::start_moto(&bin, port);
    let settings = walden::backends::sqs::SqsSettings {
        queue: queues[0].clone(),
        region: "us-east-1".into(),
        endpoint_url: Some(url.clone()),
        wait_time: Duration::from_secs(1),
        visibility_timeout: Duration::from_secs(4),
        max_messages_per_poll: 10,
        poll_interval: Duration::from_millis(100),
    };
    settings
        .ensure_queue(&settings.client().await)
        .await
        .unwrap();
    let (status, body) = post(&format!("{base}/log"), json!({"payload": 9, "id": "after"})).await;
    assert_eq!(
        (status, body["durable"].as_str()),
        (200, Some("true")),
        "{body}"
    );
    let got = target.wait_for(2, WAIT);
    assert!(got.iter().any(|r| r.id() == "after"), "{got:?}");
    svc.stop();
    moto.kill().unwrap();
    moto.wait().unwrap();
}

/// `type = "composite"`: entries on Kafka, delays on an SQS queue. A delayed
/// write comes back to its partition when due, with its sequence, and no
/// Kafka delay tier carries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_composite_namespace_keeps_entries_on_kafka_and_delays_on_sqs() {
    let (Some(url), Some(brokers)) = (
        test_server("WALDEN_TEST_SQS_URL"),
        test_server("WALDEN_TEST_KAFKA_BROKERS"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let topic = unique("composite");
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
[namespaces.ns]
shards = 2
[namespaces.ns.backend]
type = "composite"
[namespaces.ns.backend.entries]
type = "kafka"
brokers = "{brokers}"
topic = "{topic}"
group = "{topic}-group"
[namespaces.ns.backend.delays]
type = "sqs"
queue = "{topic}-delay"
region = "us-east-1"
endpoint_url = "{url}"
wait_time_s = 1
delay_hop_s = 1
[namespaces.ns.target]
type = "http"
url = "{}"
"#,
        dir.path().display(),
        target.url()
    );
    let config = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&config).expect("a valid config");
    let svc = Spawned::start(config).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);

    let (status, body) = post(
        &format!("{base}/log"),
        json!({"payload": "later", "key": "d", "id": "late-1", "lifecycle": {"delay_ms": 2500}}),
    )
    .await;
    assert_eq!(
        (status, body["durable"].as_str()),
        (200, Some("true")),
        "{body}"
    );
    let sequence = body["sequence"].as_u64().unwrap();
    let got = target.wait_for(1, WAIT);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_on_time(&got[0], sequence);
    // noida-db creates a topic when asked about it, so look for records:
    // the Kafka tier an entry of 2.5 s would pass through holds none.
    let tier = format!("{topic}.delay-1s");
    let reader: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", unique("probe"))
        .create()
        .unwrap();
    let records = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer;
        (0..2)
            .map(|p| {
                let (low, high) = reader
                    .fetch_watermarks(&tier, p, Duration::from_secs(10))
                    .unwrap_or((0, 0));
                high - low
            })
            .sum::<i64>()
    })
    .await
    .unwrap();
    assert_eq!(records, 0, "nothing went through a Kafka delay tier");
    svc.stop();
}

/// Operators may add a standard queue to an unordered namespace that holds
/// data (keys may move: there is no order to keep), not a FIFO one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_queues_may_be_added_fifo_ones_not() {
    let Some(url) = test_server("WALDEN_TEST_SQS_URL") else {
        return;
    };
    let target = HttpTarget::start();
    for fifo in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let suffix = if fifo { ".fifo" } else { "" };
        let name = unique("grow");
        let one = [format!("{name}-a{suffix}")];
        let two = [one[0].clone(), format!("{name}-b{suffix}")];
        let svc = start(dir.path(), &url, &one, &target, "");
        let (status, _) = post(
            &format!("http://{}/v1/namespaces/ns/log", svc.addr),
            json!({"payload": 1}),
        )
        .await;
        assert_eq!(status, 200);
        svc.stop();
        let grown = Spawned::start(config(dir.path(), &url, &two, &target, ""));
        match (fifo, grown) {
            (false, Ok(svc)) => svc.stop(),
            (true, Err(e)) => assert!(e.to_string().contains("shards"), "{e}"),
            (false, Err(e)) => panic!("a standard queue could not be added: {e}"),
            (true, Ok(_)) => panic!("a FIFO queue was added to a namespace with data"),
        }
    }
}

/// A FIFO namespace: key `bad` is refused until its 30 entries are in the
/// DLQ, while 570 entries of other keys flow; the target is fixed and the
/// whole DLQ redriven. The 30 arrive in the order they were written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_puts_a_key_s_letters_back_in_the_order_they_were_written() {
    let Some(url) = test_server("WALDEN_TEST_SQS_URL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key("bad", 422);
    let queues = [unique("redrive-a") + ".fifo", unique("redrive-b") + ".fifo"];
    let mut cfg = config(dir.path(), &url, &queues, &target, "");
    // moto is slow under a full test run; a late answer is not the point,
    // nor is a message shown again (and dead-lettered twice) because an
    // extension of its 4 s visibility came late. Nor is moto's own race: two
    // DeleteMessage calls at once each rebuild the queue's list from the
    // same copy, so one delete can be undone. A dead-lettered entry's message
    // then shows again when its visibility runs out and, once the target is
    // fixed, is applied ahead of the redrive (a CI run saw e527 arrive
    // before e147). SQS itself keeps a delete; 120 s puts such a message
    // past the end of the test.
    cfg.server.ack_timeout_ms = 60_000;
    if let walden::config::BackendConfig::Sqs(q) =
        &mut cfg.namespaces.get_mut("ns").unwrap().backend
    {
        q.visibility_timeout_s = 120;
    }
    let svc = Spawned::start(cfg).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    let mut entries = Vec::new();
    for i in 0..600 {
        let key = if i % 20 == 7 {
            "bad".to_string()
        } else {
            format!("k{}", i % 13)
        };
        entries.push(json!({"payload": {"i": i}, "key": key, "id": format!("e{i}")}));
    }
    for chunk in entries.chunks(25) {
        common::write_batch(&format!("{base}/log/batch"), chunk).await;
    }
    target.wait_for(570, WAIT);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let listed: Value = get_json(&format!("{base}/dlq?limit=1000")).await;
        if listed["entries"].as_array().unwrap().len() == 30 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{listed}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    target.reject_key("bad", 0);
    let (status, body) = post(&format!("{base}/dlq/redrive"), json!({"all": true})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["redriven"], 30, "{body}");
    // Delivery is at least once: a message shown again is applied twice, so
    // the count of requests can reach 600 before the last letter arrives.
    // Wait for the 30 ids, and judge the order by first arrivals. One key's
    // letters go one at a time, each a round of SQS calls: on a loaded
    // machine moto took over 30 s for them (a CI run).
    common::eventually("the 30 redriven letters", 3 * WAIT, || async {
        let ids: std::collections::HashSet<String> = target.ids();
        match (0..600)
            .filter(|i| i % 20 == 7)
            .find(|i| !ids.contains(&format!("e{i}")))
        {
            None => Ok(()),
            Some(i) => Err(format!("e{i} has not arrived")),
        }
    })
    .await;
    // Every arrival of the key, repeats included: a repeat tells a message
    // shown again from a letter put back out of turn.
    let arrivals: Vec<u64> = target
        .received()
        .iter()
        .filter(|r| r.key() == Some("bad"))
        .map(|r| r.body["payload"]["i"].as_u64().unwrap())
        .collect();
    let mut bad: Vec<u64> = Vec::new();
    for &i in &arrivals {
        if !bad.contains(&i) {
            bad.push(i);
        }
    }
    let written: Vec<u64> = (0..600).filter(|i| i % 20 == 7).collect();
    assert_eq!(
        bad, written,
        "redriven out of order; every arrival: {arrivals:?}"
    );
    svc.stop();
}
