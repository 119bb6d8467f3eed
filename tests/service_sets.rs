//! Sets of mutations (`POST /v1/namespaces/{ns}/mutations`): written whole,
//! applied whole and in order, dead-lettered and redriven whole; bad input
//! gets a clear error and nothing is applied; the set's id is an
//! idempotency key.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::target::HttpTarget;
use common::{eventually, get_json, post, test_server};
use serde_json::{Value, json};
use walden::service::Spawned;

const PG: &str = "WALDEN_TEST_POSTGRES_URL";

/// One embedded namespace `kv` (4 shards) with `target` as its target
/// table's body; `extra` goes after it.
fn config(data_dir: &Path, target: &str, extra: &str) -> walden::config::Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"

[namespaces.kv]
shards = 4
[namespaces.kv.backend]
type = "embedded"
[namespaces.kv.target]
{target}
[namespaces.kv.retry]
initial_backoff_ms = 10
max_backoff_ms = 50
{extra}
"#,
        data_dir.display()
    );
    let c = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&c).expect("the test config is valid");
    c
}

/// The namespace `kv` delivering to a fresh HTTP target.
fn http_service(dir: &Path, extra: &str) -> (HttpTarget, Spawned) {
    let target = HttpTarget::start();
    let target_table = format!("type = \"http\"\nurl = \"{}\"", target.url());
    let svc = Spawned::start(config(dir, &target_table, extra)).unwrap();
    (target, svc)
}

/// key → (value, deleted)
async fn rows(url: &str, table: &str) -> std::collections::HashMap<String, (Option<Value>, bool)> {
    common::pg(url)
        .await
        .query(&format!("SELECT key, value, deleted FROM {table}"), &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

fn the_issue_s_set(id: &str) -> Value {
    json!({"id": id,
      "mutations": [
        {"key": "cart:7",   "payload": {"op": "delete", "key": "cart:7"}},
        {"key": "order:991","payload": {"op": "put", "key": "order:991", "value": {"total": 42}}},
        {"key": "stock:12", "payload": {"op": "put", "key": "stock:12", "value": 9}, "headers": {"h": "v"}}
      ],
      "lifecycle": {"delay_ms": 0}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_is_applied_whole_to_postgres_and_counted() {
    let Some(url) = test_server(PG) else { return };
    let table = common::postgres_table_checked(&url, "walden_sets", "").await;
    let dir = tempfile::tempdir().unwrap();
    let target = format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"");
    let svc = Spawned::start(config(dir.path(), &target, "")).unwrap();
    let base = format!("http://{}/v1/namespaces/kv", svc.addr);
    // cart:7 exists before; the set deletes it.
    let (status, _) = post(
        &format!("{base}/log"),
        json!({"payload": {"op": "put", "key": "cart:7", "value": 1}}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = post(&format!("{base}/mutations"), the_issue_s_set("order-991")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["durable"], "true");
    assert_eq!(body["id"], "order-991");
    assert_eq!(body["namespace"], "kv");
    assert_eq!(body["mutations"], 3);
    assert!(body["sequence"].is_u64(), "{body}");
    eventually("the set in the table", Duration::from_secs(10), || async {
        let got = rows(&url, &table).await;
        let want = [
            ("cart:7", (None, true)),
            ("order:991", (Some(json!({"total": 42})), false)),
            ("stock:12", (Some(json!(9)), false)),
        ];
        for (k, v) in want {
            if got.get(k) != Some(&v) {
                return Err(format!("{k}: {:?}", got.get(k)));
            }
        }
        Ok(())
    })
    .await;
    let st = get_json(&base).await;
    assert_eq!(st["sets_written"], 1, "{st}");
    assert_eq!(st["targets"][0]["sets"]["applied"], 1, "{st}");
    assert_eq!(st["targets"][0]["sets"]["dead_lettered"], 0, "{st}");
    let metrics = reqwest::get(format!("http://{}/metrics", svc.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("walden_sets_applied_total{namespace=\"kv\",target=\"default\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("walden_sets_written_total{namespace=\"kv\"} 1"));

    // The set's id is its idempotency key: the same body gets the same
    // answer, another body a 409; both name the id.
    let (status, again) = post(&format!("{base}/mutations"), the_issue_s_set("order-991")).await;
    assert_eq!(
        (status, &again["sequence"]),
        (200, &body["sequence"]),
        "{again}"
    );
    let mut other = the_issue_s_set("order-991");
    other["mutations"][1]["payload"]["value"]["total"] = json!(43);
    let (status, conflict) = post(&format!("{base}/mutations"), other).await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["id"], "order-991", "{conflict}");
    // A set without an id gets one, in the answer.
    let mut unnamed = the_issue_s_set("x");
    unnamed.as_object_mut().unwrap().remove("id");
    let (status, answer) = post(&format!("{base}/mutations"), unnamed).await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["id"].as_str().is_some_and(|id| id.len() >= 32),
        "{answer}"
    );
    svc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sets_get_a_clear_error_and_nothing_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (target, svc) = http_service(
        dir.path(),
        "[namespaces.kv.limits]\nmax_set_mutations = 3\nmax_set_bytes = 200",
    );
    let url = format!("http://{}/v1/namespaces/kv/mutations", svc.addr);
    let m = |k: &str| json!({"key": k, "payload": {"k": k}});
    let big = |k: &str| json!({"key": k, "payload": "x".repeat(90)});
    let cases = [
        (
            json!({"id": "s1", "mutations": []}),
            400,
            "`mutations` is empty",
        ),
        (
            json!({"id": "s2", "mutations": [m("a"), {"key": "b", "payload": 1, "payload_base64": "AA=="}]}),
            400,
            "`mutations[1]`",
        ),
        (
            json!({"id": "s3", "mutations": [{"payload": 1}, m("b")]}),
            400,
            "`mutations[0].key`",
        ),
        (
            json!({"id": "s4", "mutations": [m("a"), m("b"), m("c"), m("d")]}),
            413,
            "limits.max_set_mutations",
        ),
        (
            json!({"id": "s5", "mutations": [big("a"), big("b"), big("c")]}),
            413,
            "limits.max_set_bytes",
        ),
        (
            json!({"id": "s6", "mutations": [{"key": "a", "payload": 1, "headers": {"walden.set": "x"}}]}),
            400,
            "reserved",
        ),
        (json!({"id": "s7", "mutations": 5}), 400, "mutations"),
        (
            json!({"id": "s8", "mutations": [m("a")], "extra": 1}),
            400,
            "extra",
        ),
    ];
    for (body, status, says) in cases {
        let (got, answer) = post(&url, body.clone()).await;
        assert_eq!(got, status, "{body} → {answer}");
        assert_eq!(answer["durable"], "false", "{answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(says),
            "{body}: {message:?} should say {says:?}"
        );
        // A body that parses names its set in the answer.
        let parsed = body["mutations"].is_array() && body.get("extra").is_none();
        if parsed {
            assert_eq!(
                answer["id"], body["id"],
                "the answer names the set: {answer}"
            );
        }
    }
    // A good set after them is the only thing the target ever gets.
    let (status, answer) = post(&url, json!({"id": "good", "mutations": [m("a"), m("b")]})).await;
    assert_eq!(status, 200, "{answer}");
    let got = target.wait_for(1, Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(target.received().len(), 1, "{got:?}");
    assert_eq!(got[0].body["set"], "good");
    svc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_target_gets_one_request_per_set_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (target, svc) = http_service(dir.path(), "");
    let base = format!("http://{}/v1/namespaces/kv", svc.addr);
    let set = json!({"id": "s-http", "mutations": [
        {"key": "z", "payload": {"n": 1}},
        {"key": "a", "payload_base64": "AAEC", "headers": {"h": "v"}},
        {"key": "m", "payload": [1, 2]},
    ]});
    let (status, answer) = post(&format!("{base}/mutations"), set).await;
    assert_eq!(status, 200, "{answer}");
    let got = target.wait_for(1, Duration::from_secs(10));
    let r = &got[0];
    assert_eq!(r.idempotency_key.as_deref(), Some("s-http"));
    assert_eq!(r.body["set"], "s-http", "{}", r.body);
    let muts = r.body["mutations"].as_array().unwrap();
    let keys: Vec<&str> = muts.iter().map(|m| m["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["z", "a", "m"], "the set's own order");
    assert_eq!(muts[0]["payload"], json!({"n": 1}));
    assert_eq!(muts[1]["payload_base64"], "AAEC");
    assert_eq!(
        muts[1]["headers"],
        json!({"h": "v"}),
        "walden's own headers stay out"
    );
    assert_eq!(muts[2]["payload"], json!([1, 2]));
    for m in muts {
        assert!(m["id"].as_str().unwrap().starts_with("s-http."), "{m}");
        assert!(m["sequence"].is_u64(), "{m}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(target.requests(), 1, "one request for the whole set");
    svc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_a_target_rejects_goes_to_the_dlq_whole_and_its_redrive_applies_it_whole() {
    let Some(url) = test_server(PG) else { return };
    // The third mutation breaks this constraint: a permanent error.
    let table = common::postgres_table_checked(
        &url,
        "walden_sets",
        ", CHECK (value IS NULL OR value->>'bad' IS NULL)",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let target = format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"");
    let svc = Spawned::start(config(dir.path(), &target, "max_attempts = 3")).unwrap();
    let base = format!("http://{}/v1/namespaces/kv", svc.addr);
    let put = |k: &str, v: Value| json!({"key": k, "payload": {"op": "put", "key": k, "value": v}});
    let set = json!({"id": "doomed", "mutations": [
        put("p", json!(1)), put("q", json!(2)), put("r", json!({"bad": true})), put("s", json!(4)),
    ]});
    let (status, answer) = post(&format!("{base}/mutations"), set).await;
    assert_eq!(status, 200, "{answer}");
    eventually("one letter", Duration::from_secs(10), || async {
        match get_json(&format!("{base}/dlq")).await["total"].as_u64() {
            Some(1) => Ok(()),
            n => Err(format!("{n:?} letters")),
        }
    })
    .await;
    let dlq = get_json(&format!("{base}/dlq")).await;
    let letter = &dlq["entries"][0];
    assert_eq!(letter["id"], "doomed", "{letter}");
    assert!(
        letter["last_error"].as_str().unwrap().contains("check"),
        "{letter}"
    );
    assert!(
        rows(&url, &table).await.is_empty(),
        "nothing of the set was applied"
    );
    let st = get_json(&base).await;
    assert_eq!(st["targets"][0]["sets"]["dead_lettered"], 1, "{st}");

    // Fix the table, redrive: the whole set lands, at its own versions.
    common::pg(&url)
        .await
        .batch_execute(&format!(
            "ALTER TABLE {table} DROP CONSTRAINT {table}_value_check"
        ))
        .await
        .unwrap();
    let (status, body) = post(&format!("{base}/dlq/redrive"), json!({"ids": ["doomed"]})).await;
    assert_eq!((status, &body["redriven"]), (200, &json!(1)), "{body}");
    eventually("the redriven set", Duration::from_secs(10), || async {
        let got = rows(&url, &table).await;
        let keys: HashSet<&str> = got.keys().map(String::as_str).collect();
        match keys == HashSet::from(["p", "q", "r", "s"]) {
            true => Ok(()),
            false => Err(format!("{got:?}")),
        }
    })
    .await;
    eventually("the letter gone", Duration::from_secs(10), || async {
        match get_json(&format!("{base}/dlq")).await["total"].as_u64() {
            Some(0) => Ok(()),
            n => Err(format!("{n:?} letters")),
        }
    })
    .await;
    svc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walden_mutate_writes_a_set_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let (target, svc) = http_service(dir.path(), "");
    let file = dir.path().join("set.json");
    let mut set = the_issue_s_set("cli-1");
    set.as_object_mut().unwrap().remove("lifecycle");
    std::fs::write(&file, set.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["mutate", "kv"])
        .arg(&file)
        .args(["--url", &format!("http://{}", svc.addr)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["id"], "cli-1");
    assert_eq!(answer["mutations"], 3);
    target.wait_for(1, Duration::from_secs(10));
    svc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_set_arrives_whole_when_due() {
    let dir = tempfile::tempdir().unwrap();
    let (target, svc) = http_service(dir.path(), "");
    let base = format!("http://{}/v1/namespaces/kv", svc.addr);
    // A single write to one of its keys, written after the set, is applied
    // first: a delayed set holds no keys until it is due.
    let written = Instant::now();
    let set = json!({"id": "later", "lifecycle": {"delay_ms": 600, "jitter_ms": 0},
        "mutations": [{"key": "a", "payload": 1}, {"key": "b", "payload": 2}, {"key": "c", "payload": 3}]});
    let (status, answer) = post(&format!("{base}/mutations"), set).await;
    assert_eq!(status, 200, "{answer}");
    let (status, _) = post(
        &format!("{base}/log"),
        json!({"id": "now", "key": "a", "payload": 0}),
    )
    .await;
    assert_eq!(status, 200);
    // One mutation of it cannot be cancelled: the rest would wait for it.
    let cancel = reqwest::Client::new()
        .delete(format!("{base}/delayed/later.1"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 409);
    let got = target.wait_for(2, Duration::from_secs(10));
    assert_eq!(got[0].id(), "now", "the set held no key while it waited");
    assert_eq!(got[1].body["set"], "later", "{}", got[1].body);
    assert_eq!(got[1].body["mutations"].as_array().unwrap().len(), 3);
    assert!(
        got[1].at.duration_since(written) >= Duration::from_millis(600),
        "not before it was due"
    );
    svc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_half_way_through_a_set_sends_it_whole_again_under_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    // The target holds its answer: the set is in flight when the kill comes.
    target.answer_after(Duration::from_secs(3));
    let port = common::free_port();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n[namespaces.kv]\nshards = 4\n[namespaces.kv.backend]\ntype = \"embedded\"\n[namespaces.kv.target]\ntype = \"http\"\nurl = \"{}\"\n",
        dir.path().join("data").display(),
        target.url()
    );
    let path = dir.path().join("walden.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = common::start_walden(&path);
    common::wait_healthy(port).await;
    let set = json!({"id": "mid-kill", "mutations": [
        {"key": "a", "payload": 1}, {"key": "b", "payload": 2}, {"key": "c", "payload": 3}]});
    let (status, answer) = post(
        &format!("http://127.0.0.1:{port}/v1/namespaces/kv/mutations"),
        set,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    target.wait_for(1, Duration::from_secs(10));
    child.kill().unwrap(); // SIGKILL while the target holds the set
    child.wait().unwrap();
    target.answer_after(Duration::ZERO);
    let mut child = common::start_walden(&path);
    common::wait_healthy(port).await;
    let got = target.wait_for(2, Duration::from_secs(20));
    for r in &got {
        assert_eq!(r.idempotency_key.as_deref(), Some("mid-kill"));
        assert_eq!(r.body["mutations"].as_array().unwrap().len(), 3, "whole");
    }
    assert_eq!(
        got[0].body, got[1].body,
        "the same set, at the same sequences"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutation_delivered_again_alone_finds_its_set_done() {
    // After a crash, one mutation of a set that was applied comes back on
    // its own (its shard's checkpoint had not passed it; the others' had).
    let dir = tempfile::tempdir().unwrap();
    let (target, svc) = http_service(dir.path(), "");
    let base = format!("http://{}/v1/namespaces/kv", svc.addr);
    let set = json!({"id": "once", "mutations": [
        {"key": "a", "payload": 1}, {"key": "b", "payload": 2}, {"key": "c", "payload": 3}]});
    let (status, answer) = post(&format!("{base}/mutations"), set).await;
    assert_eq!(status, 200, "{answer}");
    target.wait_for(1, Duration::from_secs(10));
    svc.stop();

    // Rewind one mutation's shard to it, as a crash before its commit would.
    let log = walden::backends::embedded::EmbeddedLog::open(
        dir.path(),
        walden::backends::embedded::LogConfig::default(),
    )
    .unwrap();
    let (shard, sequence) = (0..4)
        .map(|s| walden::entry::ShardRef::new("kv", s))
        .find_map(|shard| {
            common::read_all(&log, &shard, 0)
                .into_iter()
                .find(|r| r.entry.id == "once.1")
                .map(|r| (shard, r.offset))
        })
        .expect("the mutation is in the log");
    let committed = log.committed(walden::config::EMBEDDED_GROUP);
    assert!(committed[&shard] > sequence, "{committed:?}");
    log.commit(
        walden::config::EMBEDDED_GROUP,
        &std::collections::BTreeMap::from([(shard, sequence)]),
    )
    .unwrap();
    drop(log);

    let config = config(
        dir.path(),
        &format!("type = \"http\"\nurl = \"{}\"", target.url()),
        "",
    );
    let svc = Spawned::start(config).unwrap();
    let base = format!("http://{}/v1/namespaces/kv", svc.addr);
    eventually(
        "the lone mutation is acked",
        Duration::from_secs(10),
        || async {
            let st = get_json(&base).await;
            match st["pending"].as_u64() {
                Some(0) => Ok(()),
                n => Err(format!("pending {n:?}")),
            }
        },
    )
    .await;
    assert_eq!(target.requests(), 1, "the set was not applied again");
    svc.stop();
}
