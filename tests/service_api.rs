//! The service as a user meets it: the real server on 127.0.0.1:0, a
//! temporary data dir, and a real HTTP target.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::service_config;
use common::target::HttpTarget;
use serde_json::{Value, json};
use walden::service::Spawned;

const WAIT: Duration = Duration::from_secs(15);

fn base(s: &Spawned) -> String {
    format!("http://{}", s.addr)
}

async fn post(client: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let resp = client.post(url).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn stats(client: &reqwest::Client, s: &Spawned) -> Value {
    let url = format!("{}/v1/namespaces/ns", base(s));
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// The sum of every shard's next sequence: how many entries the log holds.
async fn entries_in_log(client: &reqwest::Client, s: &Spawned) -> u64 {
    stats(client, s).await["per_shard"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sh| sh["next_sequence"].as_u64().unwrap())
        .sum()
}

/// A JSON object's field names, sorted.
fn field_names(v: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    names.sort_unstable();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_acknowledged_and_delivered_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 4, "")).unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/namespaces/ns/log", base(&svc));
    let mut ids = Vec::new();
    for i in 0..40 {
        let key = ["a", "b", "c"][i % 3];
        let (status, body) = post(
            &client,
            &url,
            json!({"payload": {"op": "put", "key": key, "value": i}, "key": key, "headers": {"x-n": i.to_string()}}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["durable"], "true");
        assert_eq!(body["namespace"], "ns");
        // A single write's status is the HTTP status, not a field.
        assert_eq!(
            field_names(&body),
            ["durable", "id", "namespace", "sequence", "shard"]
        );
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let got = target.wait_for(40, WAIT);
    assert_eq!(got.len(), 40);
    // Per key, values arrive in the order they were written.
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in &got {
        let v = r.body["payload"]["value"].as_i64().unwrap();
        let k = r.key().unwrap().to_string();
        if let Some(prev) = last.insert(k.clone(), v) {
            assert!(prev < v, "key {k}: {v} after {prev}");
        }
        assert_eq!(r.idempotency_key.as_deref(), Some(r.id()));
        assert_eq!(r.body["headers"]["x-n"], v.to_string());
    }
    let delivered: std::collections::HashSet<_> = got.iter().map(|r| r.id().to_string()).collect();
    assert!(ids.iter().all(|id| delivered.contains(id)));

    let deadline = Instant::now() + WAIT;
    loop {
        let st = stats(&client, &svc).await;
        if st["applied"] == 40 && st["pending"] == 0 {
            assert_eq!(st["written"], 40);
            assert_eq!(st["target"]["healthy"], true);
            break;
        }
        assert!(Instant::now() < deadline, "stats never settled: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = client
        .get(format!("{}/metrics", base(&svc)))
        .send()
        .await
        .unwrap();
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains("walden_applied_total{namespace=\"ns\""),
        "{text}"
    );
    for lag in ["walden_state_memtable_bytes ", "walden_state_journals "] {
        assert!(text.contains(lag), "no {lag}in {text}");
    }
    let ready = client
        .get(format!("{}/readyz", base(&svc)))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_endpoint_answers_each_entry_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 2, "")).unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/namespaces/ns/log/batch", base(&svc));
    let (status, body) = post(
        &client,
        &url,
        json!({"entries": [
            {"payload": 1, "key": "k", "id": "first"},
            {"payload_base64": "not base64!"},
            {"payload_base64": "aGVsbG8=", "key": "k", "id": "third"},
        ]}),
    )
    .await;
    assert_eq!(status, 200);
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    // A written entry's result is its write answer plus its status.
    let first = &results[0];
    assert_eq!(
        field_names(first),
        ["durable", "id", "namespace", "sequence", "shard", "status"]
    );
    assert_eq!(
        (first["status"].as_u64(), first["id"].as_str()),
        (Some(200), Some("first"))
    );
    assert_eq!(
        (&first["durable"], &first["namespace"]),
        (&json!("true"), &json!("ns"))
    );
    assert_eq!(results[1]["status"], 400);
    assert_eq!(results[1]["durable"], "false");
    assert!(
        results[1]["message"]
            .as_str()
            .unwrap()
            .contains("entries[1]")
            || results[1]["message"].as_str().unwrap().contains("base64")
    );
    assert_eq!(results[2]["status"], 200);
    assert!(results[2]["sequence"].as_u64() > results[0]["sequence"].as_u64());
    let got = target.wait_for(2, WAIT);
    let third = got.iter().find(|r| r.id() == "third").unwrap();
    assert_eq!(third.body["payload_base64"], "aGVsbG8=");

    // An entry that is not a write at all (a number for a key, a field
    // nobody knows) fails alone, named by its place; the others go in.
    let (status, body) = post(
        &client,
        &url,
        json!({"entries": [
            {"payload": 1, "id": "fourth"},
            {"payload": 2, "key": 7},
            {"payload": 3, "colour": "red"},
            {"payload": 4, "id": "fifth"},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    let statuses: Vec<u64> = results
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 400, 400, 200], "{body}");
    assert!(
        results[1]["message"]
            .as_str()
            .unwrap()
            .contains("entries[1]"),
        "{body}"
    );
    assert!(
        results[2]["message"].as_str().unwrap().contains("colour"),
        "{body}"
    );
    assert_eq!(results[3]["id"], "fifth");
    // Entries that went in from a batch parsed entry by entry carry their
    // own payloads (each a slice of the one request body).
    let got = target.wait_for(4, WAIT);
    for (id, payload) in [("fourth", 1), ("fifth", 4)] {
        let r = got.iter().find(|r| r.id() == id).expect(id);
        assert_eq!(r.body["payload"], payload, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let extra = "[namespaces.ns.limits]\nmax_payload_bytes = 1024\n[namespaces.ns.delay]\nmax_delay_ms = 60000\n";
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 2, extra)).unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/namespaces/ns/log", base(&svc));
    let big = "x".repeat(100_000);
    let json_cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "both payloads",
            json!({"payload": 1, "payload_base64": "AA=="}),
            400,
            "exactly one",
        ),
        ("no payload", json!({"key": "k"}), 400, "exactly one"),
        (
            "bad base64",
            json!({"payload_base64": "%%%"}),
            400,
            "base64",
        ),
        (
            "oversized payload",
            json!({"payload": "y".repeat(2000)}),
            413,
            "max_payload_bytes",
        ),
        (
            "oversized base64",
            json!({"payload_base64": "A".repeat(4000)}),
            413,
            "max_payload_bytes",
        ),
        (
            "unknown field",
            json!({"payload": 1, "colour": "red"}),
            400,
            "colour",
        ),
        (
            "100 KB key",
            json!({"payload": 1, "key": big}),
            400,
            "`key`",
        ),
        ("100 KB id", json!({"payload": 1, "id": big}), 400, "`id`"),
        ("empty id", json!({"payload": 1, "id": ""}), 400, "`id`"),
        (
            "negative delay",
            json!({"payload": 1, "lifecycle": {"delay_ms": -1}}),
            400,
            "lifecycle.delay_ms",
        ),
        (
            "text delay",
            json!({"payload": 1, "lifecycle": {"delay_ms": "soon"}}),
            400,
            "lifecycle.delay_ms",
        ),
        (
            "delay too long",
            json!({"payload": 1, "lifecycle": {"delay_ms": 3_600_000}}),
            400,
            "max_delay_ms",
        ),
        (
            "reserved header",
            json!({"payload": 1, "headers": {"walden.x": "1"}}),
            400,
            "reserved",
        ),
        (
            "unknown target",
            json!({"payload": 1, "target": "elsewhere"}),
            400,
            "target",
        ),
    ];
    for (name, body, want, needle) in json_cases {
        let (status, answer) = post(&client, &url, body).await;
        assert_eq!(status, want, "{name}: {answer}");
        assert_eq!(answer["durable"], "false", "{name}");
        let msg = answer["message"].as_str().unwrap_or("");
        assert!(
            msg.contains(needle),
            "{name}: {msg:?} should mention {needle:?}"
        );
    }
    let raw_cases: Vec<(&str, &str, &str, u16)> = vec![
        ("malformed JSON", "application/json", "{\"payload\": ", 400),
        ("not an object", "application/json", "[1,2]", 400),
        ("wrong content type", "text/plain", "{\"payload\":1}", 415),
        ("no content type", "", "{\"payload\":1}", 415),
    ];
    for (name, ct, body, want) in raw_cases {
        let mut req = client.post(&url).body(body.to_string());
        if !ct.is_empty() {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), want, "{name}");
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["durable"], "false", "{name}");
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}"
        );
    }
    let (status, answer) = post(
        &client,
        &format!("{}/v1/namespaces/nope/log", base(&svc)),
        json!({"payload": 1}),
    )
    .await;
    assert_eq!(status, 404);
    assert!(answer["message"].as_str().unwrap().contains("nope"));

    assert_eq!(
        entries_in_log(&client, &svc).await,
        0,
        "nothing was written"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(target.received().is_empty(), "nothing was delivered");
    // And the service is fine afterwards.
    let (status, _) = post(&client, &url, json!({"payload": "ok"})).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_in_flight_limit_sheds_with_429() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    // Interval fsync holds each write until the timed fsync, so writes overlap.
    let mut config = service_config(dir.path(), &target.url(), 2, "");
    config.server.max_in_flight = 1;
    common::interval_fsync(&mut config, 300);
    let svc = Spawned::start(config).unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/namespaces/ns/log", base(&svc));
    let writes: Vec<_> = (0..64)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let resp = client
                    .post(&url)
                    .json(&json!({"payload": i}))
                    .send()
                    .await
                    .unwrap();
                let retry_after = resp.headers().get("retry-after").is_some();
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap();
                (status, retry_after, body)
            })
        })
        .collect();
    let mut ok = 0;
    let mut shed = 0;
    for w in writes {
        let (status, retry_after, body) = w.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                shed += 1;
                assert!(retry_after, "429 carries Retry-After");
                assert_eq!(body["durable"], "false");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(ok > 0 && shed > 0, "ok {ok}, shed {shed}");
    assert_eq!(target.wait_for(ok, WAIT).len(), ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_entry_fires_no_sooner_than_its_delay() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 1, "")).unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/namespaces/ns/log", base(&svc));
    let start = Instant::now();
    let before_ms = walden::entry::now_ms();
    let (status, _) = post(
        &client,
        &url,
        json!({"payload": "later", "lifecycle": {"delay_ms": 600, "jitter_ms": 0}}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = post(&client, &url, json!({"payload": "now"})).await;
    assert_eq!(status, 200);
    let first = target.wait_for(1, WAIT);
    assert_eq!(
        first[0].body["payload"], "now",
        "the undelayed entry does not wait behind the delayed one"
    );
    let both = target.wait_for(2, WAIT);
    assert_eq!(both.len(), 2);
    assert!(start.elapsed() >= Duration::from_millis(600));
    let due = both[1].body["due_ms"].as_u64().unwrap();
    let ts = both[1].body["timestamp_ms"].as_u64().unwrap();
    // With no jitter, due is the ingest time plus the delay: the ingest time
    // lies between the request and the append's timestamp.
    assert!(
        (before_ms + 600..=ts + 600).contains(&due),
        "due {due}, request at {before_ms}, appended at {ts}"
    );
    assert!(
        both[1].at_ms >= due,
        "arrived at {} before its due time {due}",
        both[1].at_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_is_retried_until_it_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.fail_with(503);
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 2, "")).unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/namespaces/ns/log", base(&svc));
    for i in 0..10 {
        let (status, _) = post(
            &client,
            &url,
            json!({"payload": i, "key": format!("k{}", i % 2)}),
        )
        .await;
        assert_eq!(status, 200, "a target outage does not stop writes");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = stats(&client, &svc).await;
    assert!(st["failed_deliveries"].as_u64().unwrap() > 0, "{st}");
    assert!(st["pending"].as_u64().unwrap() > 0, "{st}");
    let ready = client
        .get(format!("{}/readyz", base(&svc)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        200,
        "a down target does not make Walden unready"
    );
    target.fail_with(0);
    let got = target.wait_for(10, WAIT);
    assert_eq!(got.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_sequences_keep_growing() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let config = service_config(dir.path(), &target.url(), 4, "");
    let client = reqwest::Client::new();
    let first = {
        let svc = Spawned::start(config.clone()).unwrap();
        let url = format!("{}/v1/namespaces/ns/log", base(&svc));
        let (status, body) =
            post(&client, &url, json!({"payload": {"v": 1}, "key": "user-7"})).await;
        assert_eq!(status, 200);
        target.wait_for(1, WAIT);
        svc.stop();
        body
    };
    let svc = Spawned::start(config).unwrap();
    let url = format!("{}/v1/namespaces/ns/log", base(&svc));
    let (status, second) = post(&client, &url, json!({"payload": {"v": 2}, "key": "user-7"})).await;
    assert_eq!(status, 200);
    assert_eq!(
        first["shard"], second["shard"],
        "a key always maps to the same shard"
    );
    assert!(second["sequence"].as_u64() > first["sequence"].as_u64());
    let got = target.wait_for(2, WAIT);
    let newest = got.iter().max_by_key(|r| r.sequence()).unwrap();
    assert_eq!(
        newest.body["payload"]["v"], 2,
        "the target sees the new value as the newest"
    );
    // Nothing was delivered twice: the first entry's progress was committed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(target.received().len(), 2);
}

/// A clean stop while the target is still answering waits for the answer,
/// and commits it: the entry is not delivered again after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_waits_for_the_delivery_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.answer_after(Duration::from_millis(1500));
    let config = service_config(dir.path(), &target.url(), 1, "");
    let client = reqwest::Client::new();
    {
        let svc = Spawned::start(config.clone()).unwrap();
        let url = format!("{}/v1/namespaces/ns/log", base(&svc));
        let (status, body) = post(&client, &url, json!({"payload": 1, "id": "once"})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(target.wait_for(1, WAIT).len(), 1);
        // The target has it; its answer is 1.5 s away.
        let started = std::time::Instant::now();
        svc.stop();
        assert!(
            started.elapsed() >= Duration::from_millis(1000),
            "the stop did not wait for the answer ({:?})",
            started.elapsed()
        );
    }
    target.answer_after(Duration::ZERO);
    let svc = Spawned::start(config).unwrap();
    let url = format!("{}/v1/namespaces/ns/log", base(&svc));
    let (status, body) = post(&client, &url, json!({"payload": 2, "id": "after"})).await;
    assert_eq!(status, 200, "{body}");
    target.wait_for(2, WAIT);
    // Time for a second copy of "once", had it come.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: Vec<String> = target.ids();
    assert_eq!(ids, ["once", "after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_shard_count_of_a_namespace_with_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    {
        let svc = Spawned::start(service_config(dir.path(), &target.url(), 2, "")).unwrap();
        let url = format!("{}/v1/namespaces/ns/log", base(&svc));
        let (status, _) = post(&reqwest::Client::new(), &url, json!({"payload": 1})).await;
        assert_eq!(status, 200);
    }
    let err = Spawned::start(service_config(dir.path(), &target.url(), 4, ""))
        .err()
        .expect("a changed shard count must not start");
    let msg = err.to_string();
    assert!(
        msg.contains("namespace `ns`") && msg.contains("shards") && msg.contains("2"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_past_the_ack_timeout_is_504_unknown_never_true() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    // The timed fsync comes long after the ack timeout.
    let mut config = service_config(dir.path(), &target.url(), 1, "");
    config.server.ack_timeout_ms = 150;
    common::interval_fsync(&mut config, 1500);
    let svc = Spawned::start(config).unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/namespaces/ns/log", base(&svc));
    // The first write after idle is synced at once; the next waits.
    let (status, _) = post(&client, &url, json!({"payload": 0, "id": "first"})).await;
    assert_eq!(status, 200);
    let (status, body) = post(&client, &url, json!({"payload": 1, "id": "slow"})).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["durable"], "unknown");
    assert!(body["message"].as_str().unwrap().contains("ack_timeout_ms"));
    // Its outcome was unknown, not failed: it is in fact written, and delivered.
    let got = target.wait_for(2, WAIT);
    assert!(got.iter().any(|r| r.id() == "slow"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_traceparent_travels_to_the_target_without_export() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 1, "")).unwrap();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/namespaces/ns/log", base(&svc)))
        .header("traceparent", tp)
        .json(&json!({"payload": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = target.wait_for(1, WAIT);
    assert_eq!(got[0].traceparent.as_deref(), Some(tp));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walden_write_command_writes_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 2, "")).unwrap();
    let url = base(&svc);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
            .args([
                "write",
                "ns",
                "--key",
                "k1",
                "--id",
                "from-cli",
                "--url",
                &url,
                r#"{"op":"put"}"#,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["durable"], "true");
    let got = target.wait_for(1, WAIT);
    assert_eq!(got[0].id(), "from-cli");
    assert_eq!(got[0].body["payload"]["op"], "put");
    assert_eq!(got[0].key(), Some("k1"));
    // An unknown namespace: non-zero exit, the reason printed.
    let url = base(&svc);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
            .args(["write", "nope", "--url", &url, "x"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("unknown namespace"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_nested_past_the_limit_is_refused_naming_payload() {
    let target = HttpTarget::start();
    let client = reqwest::Client::new();
    let nested = |depth: usize, open: &str, close: &str| {
        format!(
            r#"{{"payload": {}1{}}}"#,
            open.repeat(depth),
            close.repeat(depth)
        )
    };
    let send = |url: String, body: String| {
        client
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let refused = |resp: reqwest::Response, limit: &'static str| async move {
        assert_eq!(resp.status(), 400);
        let answer: Value = resp.json().await.unwrap();
        let msg = answer["message"].as_str().unwrap().to_string();
        assert!(msg.contains("`payload`") && msg.contains(limit), "{msg}");
    };

    // The default limit is 128; 100,000 arrays deep is refused, not delivered.
    let dir = tempfile::tempdir().unwrap();
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 1, "")).unwrap();
    let url = format!("{}/v1/namespaces/ns/log", base(&svc));
    refused(
        send(url.clone(), nested(100_000, "[", "]")).await.unwrap(),
        "128",
    )
    .await;
    refused(
        send(url.clone(), nested(129, "[", "]")).await.unwrap(),
        "128",
    )
    .await;
    assert_eq!(
        send(url, nested(128, "[", "]")).await.unwrap().status(),
        200
    );
    assert_eq!(target.wait_for(1, WAIT).len(), 1);
    drop(svc);

    // A namespace's own limit; objects count as arrays do, and brackets
    // inside strings do not count.
    let dir = tempfile::tempdir().unwrap();
    let extra = "[namespaces.ns.limits]\nmax_payload_depth = 16\n";
    let svc = Spawned::start(service_config(dir.path(), &target.url(), 2, extra)).unwrap();
    let url = format!("{}/v1/namespaces/ns/log", base(&svc));
    refused(send(url.clone(), nested(17, "[", "]")).await.unwrap(), "16").await;
    refused(
        send(url.clone(), nested(17, r#"{"a":"#, "}"))
            .await
            .unwrap(),
        "16",
    )
    .await;
    assert_eq!(
        send(url.clone(), nested(16, "[", "]"))
            .await
            .unwrap()
            .status(),
        200
    );
    let brackets = json!({"payload": {"s": "[[[[[[[[[[[[[[[[[[[[[[[[[[\"{{{{{{{{{{{{{{{{{{{{{{"}});
    assert_eq!(post(&client, &url, brackets).await.0, 200);
    assert_eq!(target.wait_for(3, WAIT).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_to_a_write_carries_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    let mut config = service_config(dir.path(), &target.url(), 1, "");
    config.server.ack_timeout_ms = 150;
    common::interval_fsync(&mut config, 1500);
    let svc = Spawned::start(config).unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/namespaces/ns/log", base(&svc));
    let (status, first) = post(&client, &url, json!({"payload": 0})).await;
    assert_eq!(status, 200);
    assert!(first["id"].as_str().is_some_and(|id| !id.is_empty()));
    // No id given, and the answer is "unknown": the generated id comes back,
    // so a retry with it is safe.
    let (status, body) = post(&client, &url, json!({"payload": 1})).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["durable"], "unknown");
    let id = body["id"]
        .as_str()
        .expect("a 504 carries the id")
        .to_string();
    let (status, retry) = post(&client, &url, json!({"payload": 1, "id": id})).await;
    assert!(status == 200 || status == 504, "{retry}");
    assert_eq!(retry["id"], id.as_str());
    target.wait_for(2, WAIT);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let copies = target.received().iter().filter(|r| r.id() == id).count();
    assert_eq!(
        copies, 1,
        "the retry was deduplicated against the first write"
    );
    // A refused write names the id it was given.
    let (status, body) = post(
        &client,
        &url,
        json!({"payload": 1, "id": "mine", "target": "elsewhere"}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["id"], "mine");
    // In a batch, each result carries its id.
    let (status, body) = post(
        &client,
        &format!("{url}/batch"),
        json!({"entries": [{"payload": 1, "target": "elsewhere"}, {"payload": 2, "id": "b"}]}),
    )
    .await;
    assert_eq!(status, 200);
    let results = body["results"].as_array().unwrap();
    assert_eq!(results[0]["status"], 400);
    assert!(results[0]["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_eq!(results[1]["id"], "b");
}

/// The file target applies a batch whole and in order, so it takes several
/// entries of one key per call: each key's entries still land in the order
/// they were written, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_target_takes_a_key_s_entries_together_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    let config = common::file_target_config(&dir.path().join("data"), &path, 2);
    let svc = Spawned::start(config).unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/namespaces/ns/log/batch", base(&svc));
    let (keys, per_batch, batches) = (3, 300, 4);
    for b in 0..batches {
        let entries: Vec<Value> = (0..per_batch)
            .map(|i| {
                let n = b * per_batch + i;
                json!({"payload": {"n": n}, "key": format!("k{}", n % keys)})
            })
            .collect();
        let (status, body) = post(&client, &url, json!({ "entries": entries })).await;
        assert_eq!(status, 200, "{body}");
    }
    let total = per_batch * batches;
    let deadline = Instant::now() + WAIT;
    let lines = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= total || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(lines.len(), total, "each entry once");
    let mut last: HashMap<String, i64> = HashMap::new();
    for l in &lines {
        let (key, n) = (
            l["key"].as_str().unwrap(),
            l["payload"]["n"].as_i64().unwrap(),
        );
        if let Some(prev) = last.insert(key.to_string(), n) {
            assert!(prev < n, "{key}: {n} after {prev}");
        }
    }
    svc.stop();
}
