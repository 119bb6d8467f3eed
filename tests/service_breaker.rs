//! An outage is not a failure of the entry. Under the default `[retry]`
//! (no table at all), a target down for a fixed 30 s loses nothing: every
//! acknowledged entry arrives in per-key order, nothing reaches the DLQ, and
//! while the breaker is open the target sees only probes. Poison still goes
//! to the DLQ: one key failing alone never opens the breaker.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::proxy::{Proxy, addr_of, through};
use common::target::HttpTarget;
use common::{eventually, get_json, test_server};
use serde_json::{Value, json};
use walden::service::Spawned;

/// Fixed, not `WALDEN_TEST_OUTAGE_S`: at 5 s the old defaults survived too.
const OUTAGE: Duration = Duration::from_secs(30);
const KEYS: usize = 6;
const WRITES: usize = 300;

/// A namespace with no `[retry]` and no `[breaker]` table: the defaults.
fn config(dir: &std::path::Path, target: &str, extra: &str) -> walden::config::Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
[namespaces.ns]
[namespaces.ns.backend]
type = "embedded"
[namespaces.ns.target]
{target}
timeout_ms = 1000
{extra}
"#,
        dir.display()
    );
    let c = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&c).unwrap();
    c
}

async fn stats(base: &str) -> Value {
    get_json(&format!("{base}/v1/namespaces/ns")).await
}

/// Write `writes` entries over `KEYS` keys, spread over the outage, which
/// `cut` starts at the first write and `restore` ends after `outage`.
/// Returns each key's values in write order.
async fn write_through(
    base: &str,
    mutation: bool,
    (outage, writes): (Duration, usize),
    cut: impl Fn(),
    restore: impl Fn(),
) -> HashMap<String, Vec<i64>> {
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/namespaces/ns/log");
    let mut written: HashMap<String, Vec<i64>> = HashMap::new();
    let started = Instant::now();
    cut();
    for i in 0..writes {
        let key = format!("key-{}", i % KEYS);
        let payload = if mutation {
            json!({"op": "put", "key": key, "value": i})
        } else {
            json!({"n": i})
        };
        let r = client
            .post(&url)
            .json(&json!({"payload": payload, "key": key}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "writes go on during the outage");
        written.entry(key).or_default().push(i as i64);
        // Spread over nine tenths of the outage.
        tokio::time::sleep(outage * 9 / 10 / writes as u32).await;
    }
    tokio::time::sleep(outage.saturating_sub(started.elapsed())).await;
    restore();
    written
}

async fn assert_breaker_opened_and_closed(base: &str) {
    let st = stats(base).await;
    let breaker = &st["target"]["breaker"];
    assert!(breaker["trips"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(breaker["state"], "closed", "{st}");
    assert_eq!(st["dead_lettered"], 0, "{st}");
}

/// Samples of the breaker and the target's request count, every 200 ms.
async fn watch(base: String, target: Arc<HttpTarget>, stop: Arc<AtomicBool>) -> Vec<(Value, u64)> {
    let mut samples = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        // The request count first: anything counted is before the state.
        let requests = target.requests();
        let breaker = stats(&base).await["target"]["breaker"].clone();
        samples.push((breaker, requests));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    samples
}

/// Between samples taken while the breaker stayed open (the same trip,
/// with an open sample before, so no call begun while it was closed is
/// still landing), the target sees no more requests than probes were sent.
/// Returns how long the breaker was seen open that way.
fn assert_only_probes(samples: &[(Value, u64)]) -> Duration {
    let open = |b: &Value| b["state"] != "closed";
    let mut seen = Duration::ZERO;
    for w in samples.windows(3) {
        let [(b0, _), (b1, r1), (b2, r2)] = w else {
            unreachable!()
        };
        if !(open(b0) && open(b1) && open(b2)) || b0["trips"] != b2["trips"] {
            continue;
        }
        let probes = b2["probes"].as_u64().unwrap() - b1["probes"].as_u64().unwrap();
        // A probe granted just before the sample can land just after it.
        assert!(
            r2 - r1 <= probes + 1,
            "the target saw {} requests while {probes} probes went: {b1} -> {b2}",
            r2 - r1
        );
        seen += Duration::from_millis(200);
    }
    seen
}

/// Each key's values arrive in write order (a retry may repeat a value,
/// never after a later one), and every value arrives.
fn assert_all_in_key_order(received: &[(String, i64)], written: &HashMap<String, Vec<i64>>) {
    let mut last: HashMap<&str, i64> = HashMap::new();
    for (key, n) in received {
        let prev = last.insert(key, *n);
        assert!(prev.is_none_or(|p| p <= *n), "{key}: {n} after {prev:?}");
    }
    let got: HashSet<i64> = received.iter().map(|(_, n)| *n).collect();
    let want: HashSet<i64> = written.values().flatten().copied().collect();
    assert_eq!(got, want);
}

/// Wait up to `limit` until every written value has arrived, then check
/// each key's order.
async fn assert_all_delivered(
    target: &HttpTarget,
    written: &HashMap<String, Vec<i64>>,
    limit: Duration,
) {
    let want = written.values().map(Vec::len).sum::<usize>();
    eventually("every entry delivered", limit, || async {
        let got: HashSet<i64> = received(target).into_iter().map(|(_, n)| n).collect();
        if got.len() >= want {
            Ok(())
        } else {
            Err(format!("{} of {want}", got.len()))
        }
    })
    .await;
    assert_all_in_key_order(&received(target), written);
}

fn received(target: &HttpTarget) -> Vec<(String, i64)> {
    target
        .received()
        .iter()
        .map(|r| {
            (
                r.key().unwrap().to_string(),
                r.body["payload"]["n"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// The target answers 503 to everything for 30 s. It is up (its
/// healthcheck passes), so the breaker opens on failures from several keys.
/// While it is open the target sees only probes; afterwards everything
/// arrives, in per-key order, and the DLQ is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_target_failing_for_30_s_under_the_defaults_loses_nothing() {
    let target = Arc::new(HttpTarget::start());
    let dir = tempfile::tempdir().unwrap();
    let url = format!("type = \"http\"\nurl = \"{}\"", target.url());
    let svc = Spawned::start(config(dir.path(), &url, "")).unwrap();
    let base = format!("http://{}", svc.addr);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch(base.clone(), target.clone(), stop.clone()));
    let written = write_through(
        &base,
        false,
        (OUTAGE, WRITES),
        || target.fail_with(503),
        || {},
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let samples = watcher.await.unwrap();
    let open_for = assert_only_probes(&samples);
    assert!(
        open_for >= OUTAGE / 2,
        "the breaker was open for most of the outage (seen {open_for:?}): {:?}",
        samples
            .iter()
            .map(|(b, _)| b["state"].clone())
            .collect::<Vec<_>>()
    );
    let during = target.requests();
    target.fail_with(0);
    assert_all_delivered(&target, &written, Duration::from_secs(60)).await;
    assert_breaker_opened_and_closed(&base).await;
    assert!(
        during < 100,
        "a 30 s outage cost {during} requests to the target, probes included"
    );
    svc.stop();
}

/// The target refuses connections for 30 s (its healthcheck fails too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_target_down_for_30_s_under_the_defaults_loses_nothing() {
    let target = HttpTarget::start();
    let proxy = Proxy::start(target.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("type = \"http\"\nurl = \"http://{}/apply\"", proxy.addr);
    let svc = Spawned::start(config(dir.path(), &url, "")).unwrap();
    let base = format!("http://{}", svc.addr);
    let written = write_through(
        &base,
        false,
        (OUTAGE, WRITES),
        || proxy.cut(),
        || proxy.restore(),
    )
    .await;
    assert_all_delivered(&target, &written, Duration::from_secs(60)).await;
    assert_breaker_opened_and_closed(&base).await;
    svc.stop();
}

/// The target refuses connections for 10 minutes under the defaults, while
/// 600 entries arrive. Run by hand:
/// `cargo test --test service_breaker -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes 11 minutes; run by hand"]
async fn a_ten_minute_outage_under_the_defaults_loses_nothing() {
    const LONG: Duration = Duration::from_secs(600);
    let target = HttpTarget::start();
    let proxy = Proxy::start(target.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("type = \"http\"\nurl = \"http://{}/apply\"", proxy.addr);
    let svc = Spawned::start(config(dir.path(), &url, "")).unwrap();
    let base = format!("http://{}", svc.addr);
    let written = write_through(
        &base,
        false,
        (LONG, 600),
        || proxy.cut(),
        || proxy.restore(),
    )
    .await;
    let during = stats(&base).await;
    let restored = Instant::now();
    assert_all_delivered(&target, &written, Duration::from_secs(120)).await;
    assert_breaker_opened_and_closed(&base).await;
    let st = stats(&base).await;
    println!(
        "10-minute outage: 600 written, {} delivered {:?} after the target came back; breaker at the end of the outage: {}; after: {}; dead letters: {}",
        received(&target).len(),
        restored.elapsed(),
        during["target"]["breaker"],
        st["target"]["breaker"],
        st["dead_lettered"]
    );
    svc.stop();
}

/// The Postgres target cut through the test's proxy for 30 s (the shared
/// server is never stopped): every row ends at its last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_target_cut_for_30_s_under_the_defaults_loses_nothing() {
    let Some(url) = test_server("WALDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let proxy = Proxy::start(addr_of(&url, 5432)).await;
    let via = through(&url, &proxy);
    let (client, table) = common::postgres_table(&url, "walden_breaker").await;
    let dir = tempfile::tempdir().unwrap();
    let target = format!("type = \"postgres\"\nurl = \"{via}\"\ntable = \"{table}\"");
    let svc = Spawned::start(config(dir.path(), &target, "")).unwrap();
    let base = format!("http://{}", svc.addr);
    let written = write_through(
        &base,
        true,
        (OUTAGE, WRITES),
        || proxy.cut(),
        || proxy.restore(),
    )
    .await;
    let last: HashMap<String, i64> = written
        .iter()
        .map(|(k, v)| (k.clone(), *v.last().unwrap()))
        .collect();
    eventually("postgres caught up", Duration::from_secs(60), || async {
        let got = common::postgres_values(&client, &table).await;
        if got == last {
            Ok(())
        } else {
            Err(format!("{got:?} != {last:?}"))
        }
    })
    .await;
    assert_breaker_opened_and_closed(&base).await;
    svc.stop();
}

/// Short retries, so poison reaches the DLQ quickly.
const QUICK_RETRY: &str =
    "[namespaces.ns.retry]\ninitial_backoff_ms = 10\nmax_backoff_ms = 50\nmax_attempts = 5";

async fn letters(base: &str) -> Vec<Value> {
    get_json(&format!("{base}/v1/namespaces/ns/dlq?limit=100")).await["entries"]
        .as_array()
        .unwrap()
        .clone()
}

/// The target fails one key only (500, a transient status) while the others
/// succeed: that key reaches the DLQ after `max_attempts`, and the breaker
/// never opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_among_healthy_keys_still_reaches_the_dlq() {
    let target = HttpTarget::start();
    target.reject_key("poison", 500);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("type = \"http\"\nurl = \"{}\"", target.url());
    let svc = Spawned::start(config(dir.path(), &url, QUICK_RETRY)).unwrap();
    let base = format!("http://{}", svc.addr);
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/namespaces/ns/log");
    let write = |key: String, n: usize| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = client
                .post(&url)
                .json(&json!({"id": format!("{key}-{n}"), "payload": {"n": n}, "key": key}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    write("poison".into(), 0).await;
    // Others keep flowing while the poison entry is retried.
    for n in 0..60 {
        write(format!("ok-{}", n % 5), n).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eventually(
        "the poison entry is dead-lettered",
        Duration::from_secs(30),
        || async {
            let l = letters(&base).await;
            if l.len() == 1 {
                Ok(())
            } else {
                Err(format!("{l:?}"))
            }
        },
    )
    .await;
    let l = &letters(&base).await[0];
    assert_eq!(l["id"], "poison-0");
    assert_eq!(l["attempts"], 5, "{l}");
    assert_eq!(target.wait_for(60, Duration::from_secs(30)).len(), 60);
    let st = stats(&base).await;
    assert_eq!(st["target"]["breaker"]["trips"], 0, "{st}");
    svc.stop();
}

/// The poison key is the only one in traffic. Its target is up (the
/// healthcheck passes), so one key failing alone is the key's fault: it
/// reaches the DLQ after `max_attempts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_key_alone_in_traffic_still_reaches_the_dlq() {
    let target = HttpTarget::start();
    target.reject_key("poison", 503);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("type = \"http\"\nurl = \"{}\"", target.url());
    let svc = Spawned::start(config(dir.path(), &url, QUICK_RETRY)).unwrap();
    let base = format!("http://{}", svc.addr);
    for n in 0..3 {
        let (status, body) = common::post(
            &format!("{base}/v1/namespaces/ns/log"),
            json!({"id": format!("poison-{n}"), "payload": {"n": n}, "key": "poison"}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    eventually(
        "the poison entries are dead-lettered",
        Duration::from_secs(30),
        || async {
            let l = letters(&base).await;
            if l.len() == 3 {
                Ok(())
            } else {
                Err(format!("{} letters", l.len()))
            }
        },
    )
    .await;
    for l in letters(&base).await {
        assert_eq!(l["attempts"], 5, "{l}");
    }
    let st = stats(&base).await;
    assert_eq!(st["target"]["breaker"]["trips"], 0, "{st}");
    svc.stop();
}
