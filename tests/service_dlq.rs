//! The dead-letter queue: a poisoned key goes to the DLQ while the rest
//! flow; redrive sends it back in order with its original sequences; purge;
//! attempts and status overrides; and nothing is dropped with the DLQ off.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::post;
use common::target::HttpTarget;
use serde_json::{Value, json};
use walden::service::Spawned;

const WAIT: Duration = Duration::from_secs(20);

fn config(dir: &std::path::Path, target: &str, retry: &str, dlq: &str) -> walden::config::Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
[namespaces.ns]
shards = 4
[namespaces.ns.backend]
type = "embedded"
[namespaces.ns.target]
type = "http"
url = "{target}"
[namespaces.ns.retry]
initial_backoff_ms = 10
max_backoff_ms = 50
{retry}
[namespaces.ns.dlq]
{dlq}
"#,
        dir.display()
    );
    let c = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&c).unwrap();
    c
}

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn dlq_total(base: &str) -> u64 {
    get(&format!("{base}/v1/namespaces/ns/dlq?limit=0")).await.1["total"]
        .as_u64()
        .unwrap()
}

async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_key_waits_in_the_dlq_and_redrive_delivers_it_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key("A", 400);
    let svc = Spawned::start(config(dir.path(), &target.url(), "", "")).unwrap();
    let base = format!("http://{}", svc.addr);
    let url = format!("{base}/v1/namespaces/ns/log");
    let keys: Vec<String> = ('A'..='Z').map(|c| c.to_string()).collect();
    for round in 0..5 {
        for k in &keys {
            let (status, _) = post(
                &url,
                json!({"payload": {"n": round}, "key": k, "id": format!("{k}-{round}")}),
            )
            .await;
            assert_eq!(status, 200);
        }
    }
    // B..Z are delivered without waiting for A.
    let others = 25 * 5;
    assert_eq!(target.wait_for(others, WAIT).len(), others);
    until("A's entries in the DLQ", || async {
        dlq_total(&base).await == 5
    })
    .await;
    let (status, list) = get(&format!("{base}/v1/namespaces/ns/dlq?limit=10")).await;
    assert_eq!(status, 200);
    let letters = list["entries"].as_array().unwrap();
    assert_eq!(letters.len(), 5);
    let mut origin_seqs = Vec::new();
    for (i, l) in letters.iter().enumerate() {
        assert_eq!(l["key"], "A");
        assert_eq!(l["payload"]["n"], i, "in their original order");
        assert_eq!(l["attempts"], 1, "a 400 is permanent: no retries");
        assert!(l["last_error"].as_str().unwrap().contains("400"), "{l}");
        assert_eq!(l["origin"]["target"], "default");
        assert!(l["first_failure_ms"].as_u64().unwrap() > 0);
        origin_seqs.push(l["origin"]["sequence"].as_u64().unwrap());
    }
    let (status, one) = get(&format!("{base}/v1/namespaces/ns/dlq/A-2")).await;
    assert_eq!(status, 200);
    assert_eq!(one["entries"][0]["payload"]["n"], 2);
    let st = get(&format!("{base}/v1/namespaces/ns")).await.1;
    assert_eq!(st["dead_lettered"], 5, "{st}");
    assert_eq!(
        st["pending"], 0,
        "dead letters no longer hold the watermark: {st}"
    );

    // The cause is fixed; one command sends them back.
    target.reject_key("A", 0);
    let out = cli(&["dlq", "redrive", "ns", "--all", "--url", &base]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"redriven\":5"));
    let got = target.wait_for(others + 5, WAIT);
    let a: Vec<&Value> = got
        .iter()
        .filter(|r| r.key() == Some("A"))
        .map(|r| &r.body)
        .collect();
    assert_eq!(a.len(), 5);
    for (i, body) in a.iter().enumerate() {
        assert_eq!(body["payload"]["n"], i, "redriven in their original order");
        assert_eq!(
            body["sequence"].as_u64().unwrap(),
            origin_seqs[i],
            "with their original sequence"
        );
    }
    until("an empty DLQ", || async { dlq_total(&base).await == 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_use_up_max_attempts_and_statuses_can_be_made_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key("X", 503);
    let svc = Spawned::start(config(dir.path(), &target.url(), "max_attempts = 3", "")).unwrap();
    let base = format!("http://{}", svc.addr);
    post(
        &format!("{base}/v1/namespaces/ns/log"),
        json!({"payload": 1, "key": "X", "id": "x"}),
    )
    .await;
    until("x in the DLQ", || async { dlq_total(&base).await == 1 }).await;
    let (_, x) = get(&format!("{base}/v1/namespaces/ns/dlq/x")).await;
    let x = &x["entries"][0];
    assert_eq!(x["attempts"], 3);
    assert!(x["last_error"].as_str().unwrap().contains("503"));
    drop(svc);

    let dir = tempfile::tempdir().unwrap();
    let retry = "max_attempts = 50\npermanent_http_statuses = [503]";
    let svc = Spawned::start(config(dir.path(), &target.url(), retry, "")).unwrap();
    let base = format!("http://{}", svc.addr);
    post(
        &format!("{base}/v1/namespaces/ns/log"),
        json!({"payload": 1, "key": "X", "id": "y"}),
    )
    .await;
    until("y in the DLQ", || async { dlq_total(&base).await == 1 }).await;
    let (_, y) = get(&format!("{base}/v1/namespaces/ns/dlq/y")).await;
    assert_eq!(y["entries"][0]["attempts"], 1, "503 was made permanent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_show_errors_and_the_dlq_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key("bad", 422);
    let cfg = config(dir.path(), &target.url(), "", "");
    {
        let svc = Spawned::start(cfg.clone()).unwrap();
        let base = format!("http://{}", svc.addr);
        for i in 0..3 {
            post(
                &format!("{base}/v1/namespaces/ns/log"),
                json!({"payload": i, "key": "bad", "id": format!("p{i}")}),
            )
            .await;
        }
        until("three dead letters", || async {
            dlq_total(&base).await == 3
        })
        .await;
        let (status, r) = post(
            &format!("{base}/v1/namespaces/ns/dlq/purge"),
            json!({"ids": ["p0", "nope"]}),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(
            (r["purged"].as_u64(), r["not_found"][0].as_str()),
            (Some(1), Some("nope"))
        );
        assert_eq!(get(&format!("{base}/v1/namespaces/ns/dlq/p0")).await.0, 404);
        let (status, e) = post(&format!("{base}/v1/namespaces/ns/dlq/redrive"), json!({})).await;
        assert_eq!(status, 400, "{e}");
        let (status, _) = post(
            &format!("{base}/v1/namespaces/ns/dlq/redrive"),
            json!({"ids": ["x"], "all": true}),
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(get(&format!("{base}/v1/namespaces/nope/dlq")).await.0, 404);
    }
    let svc = Spawned::start(cfg).unwrap();
    let base = format!("http://{}", svc.addr);
    assert_eq!(dlq_total(&base).await, 2, "dead letters survive a restart");
    let out = cli(&["dlq", "show", "ns", "p1", "--url", &base]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("422"));
    let out = cli(&["dlq", "purge", "ns", "--all", "--url", &base]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dlq_total(&base).await, 0);
    // And the purge is durable too.
    drop(svc);
    let svc = Spawned::start(config(dir.path(), &target.url(), "", "")).unwrap();
    assert_eq!(dlq_total(&format!("http://{}", svc.addr)).await, 0);
    let out = cli(&[
        "dlq",
        "show",
        "ns",
        "p1",
        "--url",
        &format!("http://{}", svc.addr),
    ]);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_dlq_off_nothing_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key("K", 400);
    let svc = Spawned::start(config(
        dir.path(),
        &target.url(),
        "max_attempts = 2",
        "enabled = false",
    ))
    .unwrap();
    let base = format!("http://{}", svc.addr);
    post(
        &format!("{base}/v1/namespaces/ns/log"),
        json!({"payload": 1, "key": "K", "id": "k"}),
    )
    .await;
    until("several failed attempts", || async {
        get(&format!("{base}/v1/namespaces/ns")).await.1["failed_deliveries"]
            .as_u64()
            .unwrap()
            > 4
    })
    .await;
    assert_eq!(dlq_total(&base).await, 0);
    assert_eq!(
        get(&format!("{base}/v1/namespaces/ns")).await.1["pending"],
        1
    );
    target.reject_key("K", 0);
    let got = target.wait_for(1, WAIT);
    assert_eq!(got[0].id(), "k");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_letters_with_one_id_are_both_kept_and_acted_on_together() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key("dup", 422);
    let mut cfg = config(dir.path(), &target.url(), "", "");
    // Without dedup the same client id can be written twice.
    cfg.namespaces.get_mut("ns").unwrap().dedup_window_ms = 0;
    let svc = Spawned::start(cfg).unwrap();
    let base = format!("http://{}", svc.addr);
    let url = format!("{base}/v1/namespaces/ns/log");
    for (id, n) in [("same", 1), ("same", 2), ("again", 3), ("again", 4)] {
        let (status, _) = post(&url, json!({"payload": n, "key": "dup", "id": id})).await;
        assert_eq!(status, 200);
    }
    until("four dead letters", || async {
        dlq_total(&base).await == 4
    })
    .await;
    let (_, list) = get(&format!("{base}/v1/namespaces/ns/dlq")).await;
    let ns: Vec<u64> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["payload"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, [1, 2, 3, 4], "a second letter with an id hides nothing");
    let (status, same) = get(&format!("{base}/v1/namespaces/ns/dlq/same")).await;
    assert_eq!(status, 200);
    let both: Vec<u64> = same["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["payload"].as_u64().unwrap())
        .collect();
    assert_eq!(both, [1, 2], "{same}");

    // Purge and redrive by id act on every letter of the id.
    let (status, r) = post(
        &format!("{base}/v1/namespaces/ns/dlq/purge"),
        json!({"ids": ["again"]}),
    )
    .await;
    assert_eq!((status, r["purged"].as_u64()), (200, Some(2)), "{r}");
    target.reject_key("dup", 0);
    let (status, r) = post(
        &format!("{base}/v1/namespaces/ns/dlq/redrive"),
        json!({"ids": ["same"]}),
    )
    .await;
    assert_eq!((status, r["redriven"].as_u64()), (200, Some(2)), "{r}");
    let got = target.wait_for(2, WAIT);
    let payloads: Vec<u64> = got
        .iter()
        .map(|r| r.body["payload"].as_u64().unwrap())
        .collect();
    assert_eq!(payloads, [1, 2], "both, in their order");
    until("an empty DLQ", || async { dlq_total(&base).await == 0 }).await;
    assert_eq!(
        get(&format!("{base}/v1/namespaces/ns/dlq/same")).await.0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_after_the_largest_sequence_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key("bad", 422);
    let svc = Spawned::start(config(dir.path(), &target.url(), "", "")).unwrap();
    let base = format!("http://{}", svc.addr);
    post(
        &format!("{base}/v1/namespaces/ns/log"),
        json!({"payload": 1, "key": "bad"}),
    )
    .await;
    until("a dead letter", || async { dlq_total(&base).await == 1 }).await;
    let (status, list) = get(&format!("{base}/v1/namespaces/ns/dlq?after={}", u64::MAX)).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["entries"].as_array().unwrap().len(), 0);
    assert_eq!(list["total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_target_s_credentials_never_reach_errors() {
    let dir = tempfile::tempdir().unwrap();
    let target = HttpTarget::start();
    target.reject_key("bad", 422);
    // The target answers an error; then a port where nothing listens.
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = refused.local_addr().unwrap();
    drop(refused);
    for (url, refused) in [
        (
            format!("http://walden:s3cret@{}/apply?token=t0ken&x=1", target.addr),
            false,
        ),
        (
            format!("http://walden:s3cret@{closed}/apply?token=t0ken"),
            true,
        ),
    ] {
        let dir = dir
            .path()
            .join(closed.port().to_string() + &url.len().to_string());
        let svc = Spawned::start(config(&dir, &url, "max_attempts = 2", "")).unwrap();
        let base = format!("http://{}", svc.addr);
        post(
            &format!("{base}/v1/namespaces/ns/log"),
            json!({"payload": 1, "key": "bad", "id": "b"}),
        )
        .await;
        let error = if refused {
            // A target that refuses connections is down, not failing the
            // entry: the breaker opens, and its error is what stats show.
            until("the breaker opens", || async {
                let st = get(&format!("{base}/v1/namespaces/ns")).await.1;
                st["target"]["breaker"]["state"] != "closed"
            })
            .await;
            let st = get(&format!("{base}/v1/namespaces/ns")).await.1;
            st["target"]["breaker"]["last_error"]
                .as_str()
                .unwrap()
                .to_string()
        } else {
            until("a dead letter", || async { dlq_total(&base).await == 1 }).await;
            let (_, letter) = get(&format!("{base}/v1/namespaces/ns/dlq/b")).await;
            letter["entries"][0]["last_error"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert!(!error.is_empty());
        for secret in ["s3cret", "t0ken"] {
            assert!(!error.contains(secret), "{secret} leaked: {error}");
        }
        let stats = get(&format!("{base}/v1/namespaces/ns")).await.1.to_string();
        for secret in ["s3cret", "t0ken"] {
            assert!(
                !stats.contains(secret),
                "{secret} leaked into stats: {stats}"
            );
        }
    }
}
