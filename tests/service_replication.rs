//! Walden-to-Walden replication (`target.type = "walden"`): entries reach the
//! other Walden's log with their ids, payloads and headers, and with their
//! origin recorded; a loop is refused; the bearer token is sent, and a wrong
//! one holds entries behind the breaker instead of dead-lettering them; and
//! a receiver SIGKILLed in the middle of the run ends with every
//! acknowledged entry once in its log, and its version-guarded target equal
//! to applying the writes in per-key order.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use common::target::HttpTarget;
use common::{
    free_port, get_json, post, postgres_table, postgres_values, start_walden, test_server,
    wait_healthy,
};
use serde_json::{Value, json};
use walden::entry::ShardRef;
use walden::service::Spawned;

fn service(data_dir: &Path, listen: &str, target: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
data_dir = "{}"

[namespaces.ns]
shards = 4
{extra}

[namespaces.ns.backend]
type = "embedded"

[namespaces.ns.target]
{target}

[namespaces.ns.retry]
initial_backoff_ms = 20
max_backoff_ms = 200
max_attempts = 5
"#,
        data_dir.display()
    )
}

fn spawn(text: &str) -> Spawned {
    let config = walden::config::from_toml(text).unwrap();
    walden::config::validate(&config).expect("valid");
    Spawned::start(config).unwrap()
}

fn walden_target(url: &str, extra: &str) -> String {
    format!("type = \"walden\"\nurl = \"{url}\"\nnamespace = \"ns\"\ntimeout_ms = 2000\n{extra}")
}

/// Region B delivering to a fresh HTTP target, and region A forwarding to
/// B: (B's target, A, B).
fn two_regions(a_dir: &Path, b_dir: &Path) -> (HttpTarget, Spawned, Spawned) {
    let sink = HttpTarget::start();
    let b = spawn(&service(
        b_dir,
        "127.0.0.1:0",
        &format!("type = \"http\"\nurl = \"{}\"", sink.url()),
        "",
    ));
    let a = spawn(&service(
        a_dir,
        "127.0.0.1:0",
        &walden_target(&format!("http://{}", b.addr), ""),
        "",
    ));
    (sink, a, b)
}

async fn wait_until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_reach_the_other_walden_with_their_ids_payloads_and_origin() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (sink, a, b) = two_regions(a_dir.path(), b_dir.path());
    let url = format!("http://{}/v1/namespaces/ns/log", a.addr);
    let mut sequences = HashMap::new();
    for i in 0..20 {
        let body = match i % 2 {
            0 => {
                json!({"id": format!("e{i}"), "key": format!("k{}", i % 3), "payload": {"i": i, "big": 12345678901234567890u64}, "headers": {"h": "v"}})
            }
            _ => {
                json!({"id": format!("e{i}"), "key": format!("k{}", i % 3), "payload_base64": "AAEC/w=="})
            }
        };
        let (status, answer) = post(&url, body).await;
        assert_eq!(status, 200, "{answer}");
        sequences.insert(format!("e{i}"), answer["sequence"].as_u64().unwrap());
    }
    let got = sink.wait_for(20, Duration::from_secs(20));
    assert_eq!(got.len(), 20, "every entry reached the far side's target");
    for r in &got {
        let id = r.id();
        let i: u64 = id[1..].parse().unwrap();
        let h = &r.body["headers"];
        assert_eq!(h["walden.origin_namespace"], "ns", "{}", r.body);
        assert_eq!(
            h["walden.origin_sequence"].as_str().unwrap(),
            sequences[id].to_string()
        );
        assert!(h["walden.hops"].as_str().unwrap().len() == 16, "{}", r.body);
        assert!(
            h.get("walden.original_write_time_ms").is_some(),
            "{}",
            r.body
        );
        if i.is_multiple_of(2) {
            assert_eq!(r.body["payload"]["i"], i);
            // Written as it was, digit for digit.
            assert_eq!(r.body["payload"]["big"].to_string(), "12345678901234567890");
            assert_eq!(h["h"], "v");
        } else {
            assert_eq!(r.body["payload_base64"], "AAEC/w==");
        }
    }
    // Sent again (a retry after "unknown"), an entry is dropped there by id.
    let st = get_json(&format!("http://{}/v1/namespaces/ns", b.addr)).await;
    assert_eq!(st["written"], 20, "{st}");
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_reaches_the_other_walden_whole_as_a_set() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (sink, a, b) = two_regions(a_dir.path(), b_dir.path());
    let set = json!({"id": "s-1", "mutations": [
        {"key": "x", "payload": {"n": 1}, "headers": {"h": "v"}},
        {"key": "y", "payload_base64": "AAEC"},
        {"key": "z", "payload": [3]},
    ]});
    let (status, answer) = post(
        &format!("http://{}/v1/namespaces/ns/mutations", a.addr),
        set,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let got = sink.wait_for(1, Duration::from_secs(20));
    let body = &got[0].body;
    assert_eq!(
        body["set"], "s-1",
        "one request for the whole set on the far side: {body}"
    );
    let muts = body["mutations"].as_array().unwrap();
    let keys: Vec<&str> = muts.iter().map(|m| m["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["x", "y", "z"]);
    assert_eq!(muts[0]["payload"], json!({"n": 1}));
    assert_eq!(muts[0]["headers"]["h"], "v");
    assert_eq!(muts[1]["payload_base64"], "AAEC");
    for m in muts {
        assert_eq!(m["headers"]["walden.origin_namespace"], "ns", "{m}");
        assert!(
            m["headers"]["walden.origin_sequence"].as_str().is_some(),
            "{m}"
        );
        assert_eq!(
            m["headers"]["walden.hops"].as_str().unwrap().len(),
            16,
            "{m}"
        );
    }
    let st = get_json(&format!("http://{}/v1/namespaces/ns", b.addr)).await;
    assert_eq!(st["sets_written"], 1, "{st}");
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_between_two_waldens_is_refused() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_port, b_port) = (free_port(), free_port());
    let a = spawn(&service(
        a_dir.path(),
        &format!("127.0.0.1:{a_port}"),
        &walden_target(&format!("http://127.0.0.1:{b_port}"), ""),
        "",
    ));
    let b = spawn(&service(
        b_dir.path(),
        &format!("127.0.0.1:{b_port}"),
        &walden_target(&format!("http://127.0.0.1:{a_port}"), ""),
        "",
    ));
    let (status, _) = post(
        &format!("http://127.0.0.1:{a_port}/v1/namespaces/ns/log"),
        json!({"id": "round-trip", "payload": 1}),
    )
    .await;
    assert_eq!(status, 200);
    // A → B is written; B → A comes back to A, which refuses it for good.
    let b_dlq = format!("http://127.0.0.1:{b_port}/v1/namespaces/ns/dlq");
    let mut dlq = Value::Null;
    wait_until(
        "B dead-letters the looping entry",
        Duration::from_secs(20),
        async || {
            dlq = get_json(&b_dlq).await;
            dlq["total"] == 1
        },
    )
    .await;
    let error = dlq["entries"][0]["last_error"].as_str().unwrap();
    assert!(error.contains("508") && error.contains("loop"), "{error}");
    let a_stats = get_json(&format!("http://127.0.0.1:{a_port}/v1/namespaces/ns")).await;
    assert_eq!(a_stats["written"], 1, "A wrote it once: {a_stats}");
    a.stop();
    b.stop();
}

/// A receiver that answers like Walden's batch endpoint, but only with the
/// right bearer token.
struct Guarded {
    addr: std::net::SocketAddr,
    ids: Arc<Mutex<HashSet<String>>>,
    _server: actix_web::dev::ServerHandle,
}

impl Guarded {
    fn start(token: &'static str) -> Self {
        let ids = Arc::new(Mutex::new(HashSet::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let seen = ids.clone();
        std::thread::spawn(move || {
            actix::System::new().block_on(async move {
                let authorized = move |req: &HttpRequest| {
                    req.headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        == Some(&format!("Bearer {token}"))
                };
                let server = HttpServer::new(move || {
                    let seen = seen.clone();
                    App::new()
                        .route(
                            "/v1/namespaces/ns/log/batch",
                            web::post().to(move |req: HttpRequest, body: web::Json<Value>| {
                                let seen = seen.clone();
                                async move {
                                    if !authorized(&req) {
                                        return HttpResponse::Unauthorized()
                                            .json(json!({"durable": "false", "message": "no"}));
                                    }
                                    let entries = body["entries"].as_array().unwrap().clone();
                                    let results: Vec<Value> = entries
                                        .iter()
                                        .map(|e| {
                                            seen.lock()
                                                .unwrap()
                                                .insert(e["id"].as_str().unwrap().to_string());
                                            json!({"status": 200, "durable": "true", "id": e["id"]})
                                        })
                                        .collect();
                                    HttpResponse::Ok().json(json!({ "results": results }))
                                }
                            }),
                        )
                        .route(
                            "/v1/namespaces/ns",
                            web::get().to(move |req: HttpRequest| async move {
                                match authorized(&req) {
                                    true => HttpResponse::Ok().json(json!({})),
                                    false => HttpResponse::Unauthorized().finish(),
                                }
                            }),
                        )
                })
                .workers(1)
                .disable_signals()
                .bind("127.0.0.1:0")
                .unwrap();
                let addr = server.addrs()[0];
                let server = server.run();
                tx.send((addr, server.handle())).unwrap();
                let _ = server.await;
            })
        });
        let (addr, server) = rx.recv().unwrap();
        Self {
            addr,
            ids,
            _server: server,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_sent_and_a_wrong_one_holds_entries_instead_of_dead_lettering() {
    let far = Guarded::start("s3cret");
    for (token, arrives) in [("s3cret", true), ("wrong", false)] {
        let dir = tempfile::tempdir().unwrap();
        let a = spawn(&service(
            dir.path(),
            "127.0.0.1:0",
            &walden_target(
                &format!("http://{}", far.addr),
                &format!("token = \"{token}\""),
            ),
            "",
        ));
        let base = format!("http://{}/v1/namespaces/ns", a.addr);
        for i in 0..5 {
            let (status, _) = post(
                &format!("{base}/log"),
                json!({"id": format!("{token}-{i}"), "key": format!("k{i}"), "payload": i}),
            )
            .await;
            assert_eq!(status, 200);
        }
        if arrives {
            wait_until(
                "the entries arrive with the token",
                Duration::from_secs(10),
                async || far.ids.lock().unwrap().len() == 5,
            )
            .await;
        } else {
            wait_until("the breaker opens", Duration::from_secs(20), async || {
                get_json(&base).await["target"]["breaker"]["state"] != "closed"
            })
            .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let st = get_json(&base).await;
            assert_eq!(
                st["dead_lettered"], 0,
                "a wrong token is not the entries' fault: {st}"
            );
            assert_eq!(st["pending"], 5, "{st}");
            assert!(
                st["target"]["last_error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("token"),
                "{st}"
            );
        }
        a.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_mid_run_ends_with_every_entry_once_and_the_rows_in_key_order() {
    let Some(pg) = test_server("WALDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let (client, table) = postgres_table(&pg, "replicated").await;
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let b_port = free_port();
    let b_config = b_dir.path().join("walden.toml");
    std::fs::write(
        &b_config,
        service(
            &b_dir.path().join("data"),
            &format!("127.0.0.1:{b_port}"),
            &format!("type = \"postgres\"\nurl = \"{pg}\"\ntable = \"{table}\""),
            "",
        ),
    )
    .unwrap();
    let mut b = start_walden(&b_config);
    wait_healthy(b_port).await;
    let a = spawn(&service(
        a_dir.path(),
        "127.0.0.1:0",
        &walden_target(&format!("http://127.0.0.1:{b_port}"), ""),
        "[namespaces.ns.breaker]\nprobe_initial_ms = 100\nprobe_max_ms = 500",
    ));
    let url = format!("http://{}/v1/namespaces/ns/log", a.addr);
    let last: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (url, last, acked) = (url.clone(), last.clone(), acked.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let started = Instant::now();
                let mut i = 0i64;
                while started.elapsed() < Duration::from_secs(4) {
                    let key = format!("row-{w}-{}", i % 5);
                    let id = format!("w{w}-{i}");
                    // The entry's key orders the row's writes at A, as the
                    // row does at B (without one, A routes by id and its
                    // shards may forward a row's writes in either order).
                    let body = json!({"id": id, "key": key,
                        "payload": {"op": "put", "key": key, "value": i}});
                    let r = client.post(&url).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    // One writer per key: its last acknowledged write is the
                    // key's final value.
                    last.lock().unwrap().insert(key, i);
                    acked.lock().unwrap().insert(id);
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    b.0.kill().unwrap(); // SIGKILL the receiving region mid-run
    b.0.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut b = start_walden(&b_config);
    wait_healthy(b_port).await;
    for w in writers {
        w.await.unwrap();
    }
    let want = last.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = postgres_values(&client, &table).await;
        if rows == want {
            break;
        }
        if Instant::now() >= deadline {
            // What the sending side did with the entries, to tell a lost or
            // dead-lettered entry from one applied out of order.
            let a_stats = get_json(&format!("http://{}/v1/namespaces/ns", a.addr)).await;
            let b_stats = get_json(&format!("http://127.0.0.1:{b_port}/v1/namespaces/ns")).await;
            let differ: Vec<_> = want
                .iter()
                .filter(|(k, v)| rows.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k}: want {v}, got {:?}", rows.get(k)))
                .collect();
            panic!(
                "the far side's rows differ from per-key order: {differ:?}; A's stats: {a_stats}; B's stats: {b_stats}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Stop B cleanly, then read its log: every acknowledged id, once.
    let pid = b.0.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    b.0.wait().unwrap();
    a.stop();
    let log = walden::backends::embedded::EmbeddedLog::open(
        b_dir.path().join("data"),
        Default::default(),
    )
    .unwrap();
    let mut count: HashMap<String, usize> = HashMap::new();
    for shard in 0..4 {
        for r in common::read_all(&log, &ShardRef::new("ns", shard), 0) {
            *count.entry(r.entry.id.clone()).or_default() += 1;
        }
    }
    log.close();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "only {} writes", acked.len());
    for id in &acked {
        assert_eq!(
            count.get(id),
            Some(&1),
            "{id} is in the far side's log once"
        );
    }
    assert_eq!(count.len(), acked.len(), "nothing else is there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_relay_headers_get_a_clear_error_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sink = HttpTarget::start();
    let svc = spawn(&service(
        dir.path(),
        "127.0.0.1:0",
        &format!("type = \"http\"\nurl = \"{}\"", sink.url()),
        "",
    ));
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    let client = reqwest::Client::new();
    let body = json!({"entries": [{"id": "r1", "payload": 1}, {"id": "r2", "payload": 2}]});
    let send = |headers: Vec<(&'static str, String)>| {
        let mut req = client.post(format!("{base}/log/batch")).json(&body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let hop = "0123456789abcdef".to_string();
    let (status, answer) = send(vec![
        ("walden-hops", hop.clone()),
        ("walden-origin-sequences", "5".into()),
    ])
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("1 sequences for 2 entries"),
        "{answer}"
    );
    let (status, answer) = send(vec![
        ("walden-hops", hop.clone()),
        ("walden-origin-sequences", "5,x".into()),
    ])
    .await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = send(vec![("walden-hops", vec![hop; 9].join(","))]).await;
    assert_eq!(status, 508, "{answer}");
    assert_eq!(answer["durable"], "false", "{answer}");
    let st = get_json(&base).await;
    assert_eq!(st["written"], 0, "nothing was written: {st}");
    svc.stop();
}
