//! Replays, end to end on the embedded log: the incident-recovery persona
//! (a Postgres table restored from a backup, then the log replayed without
//! the write that corrupted it), dry runs, exclusions, a replay SIGKILLed
//! half-way, a replay beside live writes, and bad requests.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use common::{eventually, get_json, post, write_batch};
use serde_json::{Value, json};
use walden::service::Spawned;

const EMBEDDED: &str = "type = \"embedded\"";

/// One namespace `ns` on `backend` with `target` as its live target `default`
/// and a replay-only file target `scratch` at `scratch`; `extra` goes in the
/// namespace's table.
fn config_text(
    dir: &Path,
    listen: &str,
    backend: &str,
    target: &str,
    scratch: &Path,
    extra: &str,
) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
data_dir = "{}"

[namespaces.ns]
shards = 4
{extra}

[namespaces.ns.backend]
{backend}

[namespaces.ns.targets.default]
{target}

[namespaces.ns.targets.scratch]
type = "file"
path = "{}"
live = false

[namespaces.ns.retry]
initial_backoff_ms = 20
max_backoff_ms = 500
"#,
        dir.display(),
        scratch.display()
    )
}

fn config(dir: &Path, target: &str, scratch: &Path, extra: &str) -> walden::config::Config {
    config_on(dir, EMBEDDED, target, scratch, extra)
}

fn config_on(
    dir: &Path,
    backend: &str,
    target: &str,
    scratch: &Path,
    extra: &str,
) -> walden::config::Config {
    let text = config_text(dir, "127.0.0.1:0", backend, target, scratch, extra);
    let config = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&config).unwrap();
    config
}

/// A test's data directory, with where its live and scratch file targets
/// write.
struct Files {
    dir: tempfile::TempDir,
    live: std::path::PathBuf,
    scratch: std::path::PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let (live, scratch) = (
        dir.path().join("live.jsonl"),
        dir.path().join("scratch.jsonl"),
    );
    Files { dir, live, scratch }
}

/// An embedded namespace delivering to the live file, with `extra`.
fn file_service(f: &Files, extra: &str) -> (Spawned, String) {
    let svc = Spawned::start(config(
        f.dir.path(),
        &file_target(&f.live),
        &f.scratch,
        extra,
    ))
    .unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    (svc, base)
}

/// Replay every entry the log holds to the replay-only `scratch` target.
async fn replay_all_to_scratch(base: &str) -> String {
    let started = start_replay(
        base,
        json!({"from_ms": 0, "select": "written", "target": "scratch"}),
    )
    .await;
    started["replay"].as_str().unwrap().to_string()
}

/// `DELETE` a replay; its status.
async fn cancel(base: &str, id: &str) -> Value {
    reqwest::Client::new()
        .delete(format!("{base}/replays/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn file_target(path: &Path) -> String {
    format!("type = \"file\"\npath = \"{}\"", path.display())
}

/// The JSON lines of a file target (none if it does not exist yet).
fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The ids of a file target's lines.
fn ids_in(path: &Path) -> HashSet<String> {
    lines(path)
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect()
}

/// Start a replay and wait until it is no longer running; its status.
async fn replay_to_end(base: &str, body: Value) -> Value {
    let started = start_replay(base, body).await;
    finished(
        base,
        started["replay"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await
}

/// Wait until `hook` has taken `n` entries of `key`.
async fn applied_of_key(hook: &common::target::HttpTarget, key: &str, n: usize) {
    eventually(
        &format!("{n} of {key} applied"),
        Duration::from_secs(30),
        || async {
            let got = hook
                .received()
                .iter()
                .filter(|r| r.key() == Some(key))
                .count();
            match got >= n {
                true => Ok(()),
                false => Err(format!("{got}")),
            }
        },
    )
    .await;
}

/// The namespace delivering live to `hook` (an HTTP target), with the
/// replay-only `scratch` file; its service and base URL.
fn hook_service(f: &Files, hook: &common::target::HttpTarget) -> (Spawned, String) {
    let target = format!("type = \"http\"\nurl = \"{}\"", hook.url());
    let svc = Spawned::start(config(f.dir.path(), &target, &f.scratch, "")).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    (svc, base)
}

/// Wait until the namespace at `base` has `n` dead letters.
async fn letters(base: &str, n: u64) {
    eventually(&format!("{n} letters"), Duration::from_secs(30), || async {
        let listed = get_json(&format!("{base}/dlq")).await;
        match listed["total"].as_u64() == Some(n) {
            true => Ok(()),
            false => Err(listed["total"].to_string()),
        }
    })
    .await;
}

/// Each line's sequence, by entry id.
fn sequences(path: &Path) -> HashMap<String, u64> {
    lines(path)
        .iter()
        .map(|l| {
            (
                l["id"].as_str().unwrap().into(),
                l["sequence"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Start a replay; its answer (202).
async fn start_replay(base: &str, body: Value) -> Value {
    let (status, answer) = post(&format!("{base}/replays"), body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["state"], "running", "{answer}");
    answer
}

/// Wait until replay `id` is no longer running; its status.
async fn finished(base: &str, id: &str, limit: Duration) -> Value {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let status = get_json(&format!("{base}/replays/{id}")).await;
        if status["state"] != "running" {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn now_ms() -> u64 {
    walden::entry::now_ms()
}

/// Per key, the sequences of `lines` in the order they appear.
fn by_key(lines: &[Value]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for l in lines {
        out.entry(l["key"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(l["sequence"].as_u64().unwrap());
    }
    out
}

fn increasing(seqs: &[u64]) -> bool {
    seqs.windows(2).all(|w| w[0] < w[1])
}

/// Write `n` entries `{prefix}{i}` over `keys` keys, in batches of 100;
/// their ids.
async fn write_entries(base: &str, prefix: &str, n: usize, keys: usize) -> Vec<String> {
    let entries: Vec<Value> = (0..n)
        .map(|i| json!({"id": format!("{prefix}{i}"), "key": format!("k{}", i % keys), "payload": {"i": i}}))
        .collect();
    for chunk in entries.chunks(100) {
        write_batch(&format!("{base}/log/batch"), chunk).await;
    }
    entries
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// The persona: 1,000 mutations; a backup at T0 taken while the target lags
/// (its table locked) and delayed entries still wait; 1,000 more, the last
/// of them a bad one that corrupts a row; the backup restored; a replay from
/// T0 without the bad write. The table ends as the good writes alone make
/// it, including the delayed writes that were neither in the backup nor
/// written after T0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_and_a_replay_without_the_bad_write_give_the_good_table() {
    restore_and_replay(EMBEDDED).await;
}

/// The same persona on Kafka (noida-db): the topic is the log, read with
/// `offsets_for_times` (or a scan, where the broker cannot answer it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_a_restored_backup_and_a_replay_without_the_bad_write_give_the_good_table() {
    let Some(brokers) = common::test_server("WALDEN_TEST_KAFKA_BROKERS") else {
        return;
    };
    let topic = common::unique("replay");
    let backend = format!(
        "type = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ngroup = \"{topic}-group\""
    );
    restore_and_replay(&backend).await;
}

async fn restore_and_replay(backend: &str) {
    let Some(url) = common::test_server("WALDEN_TEST_POSTGRES_URL") else {
        return;
    };
    let table = common::postgres_table_checked(&url, "replay_persona", "").await;
    let dir = tempfile::tempdir().unwrap();
    let target = format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"");
    let svc = Spawned::start(config_on(
        dir.path(),
        backend,
        &target,
        &dir.path().join("scratch.jsonl"),
        "",
    ))
    .unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    let put = |id: String, key: String, value: i64, delay_ms: u64| {
        let mut w = json!({"id": id, "payload": {"op": "put", "key": key, "value": value}});
        if delay_ms > 0 {
            w["lifecycle"] = json!({"delay_ms": delay_ms});
        }
        w
    };
    // Each key's value is its last write's: sequences grow in write order.
    let mut expected: HashMap<String, i64> = HashMap::new();
    let mut first: Vec<Value> = Vec::new();
    // Ten keys written once, delayed past T0: not in the backup, and only
    // `applied_after` (not a range of write times) finds them.
    for j in 0..10 {
        first.push(put(
            format!("late-{j}"),
            format!("late-{j}"),
            10_000 + j,
            8_000,
        ));
        expected.insert(format!("late-{j}"), 10_000 + j);
    }
    for i in 0..990 {
        first.push(put(format!("a{i}"), format!("row-{}", i % 40), i, 0));
        expected.insert(format!("row-{}", i % 40), i);
    }
    let pg = common::pg(&url).await;
    let backup = format!("{table}_backup");
    let mut locker = common::pg(&url).await;
    for (n, chunk) in first.chunks(100).enumerate() {
        if n == 6 {
            // Let the first 600 apply, then stop the target: the rest lag.
            eventually("the first 590 applied", Duration::from_secs(30), || async {
                let stats = get_json(&base).await;
                match stats["applied"].as_u64() >= Some(590) {
                    true => Ok(()),
                    false => Err(stats["applied"].to_string()),
                }
            })
            .await;
            // Long enough for the target's position to be recorded past
            // the delayed writes (every 2 s while it moves).
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        write_batch(&format!("{base}/log/batch"), chunk).await;
    }
    let t0 = {
        // EXCLUSIVE blocks the target's writes, not reads: the backup is the
        // table as the target left it at T0, with entries still lagging.
        let tx = locker.transaction().await.unwrap();
        tx.batch_execute(&format!("LOCK TABLE {table} IN EXCLUSIVE MODE"))
            .await
            .unwrap();
        let t0 = now_ms();
        tx.batch_execute(&format!("CREATE TABLE {backup} AS SELECT * FROM {table}"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tx.commit().await.unwrap();
        t0
    };
    let in_backup: i64 = pg
        .query_one(
            &format!("SELECT count(*) FROM {backup} WHERE key LIKE 'late-%'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_backup, 0, "the delayed writes were still waiting at T0");
    let mut second: Vec<Value> = (0..999)
        .map(|i| {
            expected.insert(format!("row-{}", i % 40), 1000 + i);
            put(format!("b{i}"), format!("row-{}", i % 40), 1000 + i, 0)
        })
        .collect();
    // The bad write: the last to its row, so the good table has the write
    // before it there.
    second.push(put("bad-write-1".into(), "row-7".into(), -1, 0));
    for chunk in second.chunks(100) {
        write_batch(&format!("{base}/log/batch"), chunk).await;
    }
    let mut corrupted = expected.clone();
    corrupted.insert("row-7".into(), -1);
    eventually("every write applied", Duration::from_secs(60), || async {
        let got = common::postgres_values(&pg, &table).await;
        match got == corrupted {
            true => Ok(()),
            false => Err(format!("{} rows of {}", got.len(), corrupted.len())),
        }
    })
    .await;
    // The incident: restore the backup.
    pg.batch_execute(&format!(
        "BEGIN; TRUNCATE {table}; INSERT INTO {table} SELECT * FROM {backup}; COMMIT"
    ))
    .await
    .unwrap();
    // The operator finds the bad write in the log.
    let listed = get_json(&format!("{base}/entries?key=row-7&from_ms={t0}&limit=1000")).await;
    let ids: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.last(), Some(&"bad-write-1"), "{ids:?}");
    let started = start_replay(
        &base,
        json!({"from_ms": t0, "exclude_ids": ["bad-write-1"]}),
    )
    .await;
    let done = finished(
        &base,
        started["replay"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["excluded"], 1, "{done}");
    assert_eq!(done["failed"], 0, "{done}");
    let got = common::postgres_values(&pg, &table).await;
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: want {v}, got {:?}", got.get(k)))
        .collect();
    assert!(wrong.is_empty(), "{wrong:?}");
    assert_eq!(got.len(), expected.len());
    // Written times alone miss the delayed writes: they were written
    // before T0.
    let (_, by_time) = post(
        &format!("{base}/replays"),
        json!({"from_ms": t0, "select": "written", "dry_run": true}),
    )
    .await;
    let (_, applied_after) = post(
        &format!("{base}/replays"),
        json!({"from_ms": t0, "dry_run": true}),
    )
    .await;
    assert!(
        applied_after["matched"].as_u64() >= Some(by_time["matched"].as_u64().unwrap() + 10),
        "{applied_after} {by_time}"
    );
    svc.stop();
}

/// A dry run's counts are what the replay then does; the dry run applies
/// nothing. An excluded key is left out whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_counts_what_the_replay_then_does_and_an_excluded_key_is_left_out() {
    let f = files();
    let (svc, base) = file_service(&f, "");
    let (live, scratch) = (f.live.clone(), f.scratch.clone());
    write_entries(&base, "old", 300, 10).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let from = now_ms();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let ids = write_entries(&base, "new", 500, 10).await;
    let to = now_ms();
    let ask = json!({"from_ms": from, "to_ms": to, "select": "written", "target": "scratch",
        "exclude_keys": ["k3"], "exclude_ids": ["new0"], "exclude_sequences": [[0, 0]]});
    let mut dry = ask.clone();
    dry["dry_run"] = true.into();
    let (status, counted) = post(&format!("{base}/replays"), dry).await;
    assert_eq!(status, 200, "{counted}");
    assert_eq!(counted["state"], "dry_run");
    assert_eq!(counted["matched"], 500, "{counted}");
    // 50 of k3, and new0 (k0); shard 0's first entry is an old one.
    assert_eq!(counted["excluded"], 51, "{counted}");
    assert_eq!(counted["replayed"], 449, "{counted}");
    assert!(lines(&scratch).is_empty(), "a dry run applied something");

    let started = start_replay(&base, ask).await;
    let done = finished(
        &base,
        started["replay"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done["state"], "done", "{done}");
    for field in ["matched", "excluded", "replayed"] {
        assert_eq!(done[field], counted[field], "{field}: {done} vs {counted}");
    }
    let replayed = lines(&scratch);
    let got: HashSet<&str> = replayed.iter().map(|l| l["id"].as_str().unwrap()).collect();
    let want: HashSet<&str> = ids
        .iter()
        .enumerate()
        .filter(|(i, id)| i % 10 != 3 && *id != "new0")
        .map(|(_, id)| id.as_str())
        .collect();
    assert_eq!(got, want);
    assert_eq!(replayed.len(), 449, "each entry once");
    assert!(replayed.iter().all(|l| l["key"] != "k3"));
    for (key, seqs) in by_key(&replayed) {
        assert!(increasing(&seqs), "{key} out of order: {seqs:?}");
    }
    // Each line names its replay, and the original id and sequence stay.
    assert!(
        replayed
            .iter()
            .all(|l| l["headers"]["walden.replay"] == started["replay"])
    );
    let live_seq = sequences(&live);
    assert!(
        replayed
            .iter()
            .all(|l| live_seq[l["id"].as_str().unwrap()] == l["sequence"])
    );
    // The list shows it, done; cancelling a finished replay leaves it done.
    let listed = get_json(&format!("{base}/replays")).await;
    assert_eq!(listed["replays"].as_array().unwrap().len(), 1, "{listed}");
    let cancelled = cancel(&base, started["replay"].as_str().unwrap()).await;
    assert_eq!(cancelled["state"], "done", "{cancelled}");
    svc.stop();
}

/// A replay SIGKILLed half-way resumes when the process comes back, finishes
/// once, and loses nothing; per key, each run of it applies in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_half_way_resumes_and_finishes_once() {
    let dir = tempfile::tempdir().unwrap();
    let (live, scratch) = (
        dir.path().join("live.jsonl"),
        dir.path().join("scratch.jsonl"),
    );
    let port = common::free_port();
    let cfg = dir.path().join("walden.toml");
    let text = config_text(
        dir.path(),
        &format!("127.0.0.1:{port}"),
        EMBEDDED,
        &file_target(&live),
        &scratch,
        "[namespaces.ns.replay]\nmax_per_s = 1000",
    );
    std::fs::write(&cfg, text).unwrap();
    let mut walden = common::start_walden(&cfg);
    common::wait_healthy(port).await;
    let base = format!("http://127.0.0.1:{port}/v1/namespaces/ns");
    let ids = write_entries(&base, "e", 4000, 37).await;
    let id = replay_all_to_scratch(&base).await;
    eventually("a third replayed", Duration::from_secs(30), || async {
        match lines(&scratch).len() >= 1300 {
            true => Ok(()),
            false => Err("not yet".into()),
        }
    })
    .await;
    walden.kill().unwrap();
    walden.wait().unwrap();
    let before = lines(&scratch);
    assert!(before.len() < 4000, "the replay ended before the kill");
    let mut walden = common::start_walden(&cfg);
    common::wait_healthy(port).await;
    let done = finished(&base, &id, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "done", "{done}");
    let all = lines(&scratch);
    let after = &all[before.len()..];
    let got: HashSet<&str> = all.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(got.len(), 4000, "every entry replayed");
    assert_eq!(got, ids.iter().map(String::as_str).collect());
    for (run, part) in [("before the kill", &before[..]), ("after it", after)] {
        for (key, seqs) in by_key(part) {
            assert!(increasing(&seqs), "{key} out of order {run}: {seqs:?}");
        }
    }
    // At most what the last save had not covered is applied again.
    assert!(all.len() <= 4000 + 1000, "{} lines", all.len());
    // Done once: another restart does not run it again.
    walden.kill().unwrap();
    walden.wait().unwrap();
    let _walden = common::start_walden(&cfg);
    common::wait_healthy(port).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(lines(&scratch).len(), all.len(), "a done replay ran again");
    let status = get_json(&format!("{base}/replays/{id}")).await;
    assert_eq!(status["state"], "done");
    assert_eq!(status["replayed"], done["replayed"]);
}

/// Live writes keep flowing beside a replay: none is lost or reordered,
/// and the replay never moves the live target's progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_writes_flow_beside_a_replay() {
    let f = files();
    let (svc, base) = file_service(&f, "[namespaces.ns.replay]\nmax_per_s = 2000");
    let live = f.live.clone();
    write_entries(&base, "old", 3000, 20).await;
    let id = replay_all_to_scratch(&base).await;
    // Live writes while the replay runs (it takes about 1.5 s).
    let mut fresh = Vec::new();
    for round in 0..10 {
        fresh.extend(write_entries(&base, &format!("live{round}-"), 100, 20).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stats first: a replay they do not show as running must read as done
    // afterwards (the other order races the replay's end).
    let stats = get_json(&base).await;
    let status = get_json(&format!("{base}/replays/{id}")).await;
    let done = finished(&base, &id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "done", "{done}");
    assert!(
        status["state"] == "done" || stats["replays"].as_array().unwrap().len() == 1,
        "the stats show a running replay: {stats}"
    );
    eventually(
        "every live write applied",
        Duration::from_secs(30),
        || async {
            let ids: HashSet<String> = lines(&live)
                .iter()
                .map(|l| l["id"].as_str().unwrap().to_string())
                .collect();
            match fresh.iter().all(|id| ids.contains(id)) {
                true => Ok(()),
                false => Err(format!("{} live lines", ids.len())),
            }
        },
    )
    .await;
    let live_lines = lines(&live);
    assert!(
        live_lines
            .iter()
            .all(|l| l["headers"].get("walden.replay").is_none()),
        "a replayed entry reached the live target"
    );
    for (key, seqs) in by_key(&live_lines) {
        assert!(increasing(&seqs), "{key} out of order: {seqs:?}");
    }
    // The replay read only what was there when it started.
    assert_eq!(done["replayed"], 3000, "{done}");
    svc.stop();
}

/// Bad requests get a 400 that names the field; a range the log no longer
/// holds names the earliest time it does hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replay_requests_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (live, scratch) = (
        dir.path().join("live.jsonl"),
        dir.path().join("scratch.jsonl"),
    );
    // Small segments and a byte cap: retention deletes the oldest entries.
    let mut cfg = config(dir.path(), &file_target(&live), &scratch, "");
    if let walden::config::BackendConfig::Embedded(e) =
        &mut cfg.namespaces.get_mut("ns").unwrap().backend
    {
        e.segment_bytes = 64 << 10;
        e.retention_max_bytes = 256 << 10;
    }
    let svc = Spawned::start(cfg).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    let cases = [
        (json!({}), "from_ms"),
        (json!({"from_ms": 10, "to_ms": 5}), "from_ms"),
        (json!({"from_ms": 0, "target": "nope"}), "target"),
        (json!({"from_ms": 0, "select": "sometimes"}), "select"),
        (json!({"from_ms": 0, "exclude_ids": "x"}), "exclude_ids"),
        (json!({"from_ms": 0, "colour": "red"}), "colour"),
    ];
    for (body, field) in cases {
        let (status, answer) = post(&format!("{base}/replays"), body.clone()).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(field), "{body} -> {message}");
    }
    let missing = reqwest::get(format!("{base}/replays/rp-none"))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let nowhere = reqwest::get(format!("http://{}/v1/namespaces/other/replays", svc.addr))
        .await
        .unwrap();
    assert_eq!(nowhere.status(), 404);
    let entries = reqwest::get(format!("{base}/entries?from_ms=9&to_ms=1"))
        .await
        .unwrap();
    assert_eq!(entries.status(), 400);

    // Fill past the cap; once applied, retention drops the oldest segments.
    let payload = "x".repeat(1000);
    let entries: Vec<Value> = (0..1500)
        .map(|i| json!({"id": format!("f{i}"), "key": format!("k{}", i % 8), "payload": payload}))
        .collect();
    for chunk in entries.chunks(100) {
        write_batch(&format!("{base}/log/batch"), chunk).await;
    }
    eventually(
        "the oldest entries gone",
        Duration::from_secs(30),
        || async {
            let stats = get_json(&base).await;
            let (status, answer) = post(
                &format!("{base}/replays"),
                json!({"from_ms": 0, "select": "written", "dry_run": true}),
            )
            .await;
            match status {
                400 => {
                    let message = answer["message"].as_str().unwrap().to_string();
                    let from = stats["replayable_from_ms"].as_u64().unwrap();
                    assert!(message.contains("no longer holds"), "{message}");
                    assert!(message.contains("written from"), "{message}");
                    assert!(from > 0, "{stats}");
                    Ok(())
                }
                _ => Err(format!("{status}: {answer}")),
            }
        },
    )
    .await;
    svc.stop();
}

/// SQS keeps no log: with `backend.archive = true` a replay reads the copy
/// each entry left in the producer's archive, with the sequence SQS delivery
/// gave it; without one, a replay is a 400 that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqs_a_replay_reads_the_archive_and_without_one_is_refused() {
    let Some(url) = common::test_server("WALDEN_TEST_SQS_URL") else {
        return;
    };
    let sqs = |archive: bool| {
        let queues = [
            common::unique("replay-a") + ".fifo",
            common::unique("replay-b") + ".fifo",
        ];
        format!(
            "type = \"sqs\"\nqueues = [{:?}, {:?}]\nregion = \"us-east-1\"\nendpoint_url = \"{url}\"\n\
             wait_time_s = 1\npoll_interval_ms = 100\narchive = {archive}",
            queues[0], queues[1]
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let (live, scratch) = (
        dir.path().join("live.jsonl"),
        dir.path().join("scratch.jsonl"),
    );
    let text = config_text(
        dir.path(),
        "127.0.0.1:0",
        &sqs(true),
        &file_target(&live),
        &scratch,
        "",
    )
    .replace("shards = 4", "shards = 2")
    // moto takes seconds for a FIFO batch under load: a late answer is not
    // the point here.
    .replace("[server]", "[server]\nack_timeout_ms = 60000");
    let config = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&config).unwrap();
    let svc = Spawned::start(config).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    let ids = write_entries(&base, "s", 200, 7).await;
    // Generous: one loaded CI run still lacked 3 of 200 after 60 s (not
    // seen since); a message received but not handed on shows again only
    // when its 30 s visibility timeout runs out.
    // Counted by id: a message shown again is applied twice, so 200 lines
    // may still lack an entry (a loaded run replayed one the live file did
    // not hold yet).
    eventually("every entry applied", Duration::from_secs(150), || async {
        match ids_in(&live).len() >= 200 {
            true => Ok(()),
            false => Err(format!(
                "{} ids; the namespace: {}",
                ids_in(&live).len(),
                common::get_json(&base).await
            )),
        }
    })
    .await;
    let started = start_replay(
        &base,
        json!({"from_ms": 0, "select": "written", "target": "scratch", "exclude_keys": ["k2"]}),
    )
    .await;
    let done = finished(
        &base,
        started["replay"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done["state"], "done", "{done}");
    let replayed = lines(&scratch);
    let got: HashSet<&str> = replayed.iter().map(|l| l["id"].as_str().unwrap()).collect();
    let want: HashSet<&str> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 7 != 2)
        .map(|(_, id)| id.as_str())
        .collect();
    assert_eq!(got, want);
    assert_eq!(done["excluded"], (200 - want.len()) as u64, "{done}");
    let live_seq = sequences(&live);
    assert!(
        replayed
            .iter()
            .all(|l| live_seq[l["id"].as_str().unwrap()] == l["sequence"]),
        "a replayed entry's sequence is the one SQS delivery gave it"
    );
    for (key, seqs) in by_key(&replayed) {
        assert!(increasing(&seqs), "{key} out of order: {seqs:?}");
    }
    svc.stop();

    // Without an archive there is nothing to read.
    let dir = tempfile::tempdir().unwrap();
    let target = file_target(&dir.path().join("live.jsonl"));
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[namespaces.ns]\nshards = 2\n\
         [namespaces.ns.backend]\n{}\n[namespaces.ns.target]\n{target}\n",
        dir.path().display(),
        sqs(false)
    );
    let svc = Spawned::start(walden::config::from_toml(&text).unwrap()).unwrap();
    let (status, answer) = post(
        &format!("http://{}/v1/namespaces/ns/replays", svc.addr),
        json!({"from_ms": 0}),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("backend.archive"),
        "{answer}"
    );
    svc.stop();
}

/// Entries that fail during a replay go to the DLQ marked with the replay;
/// an HTTP target gets the `Idempotency-Key` the replay asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_failures_are_dead_lettered_and_the_idempotency_key_is_the_one_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let (live, scratch) = (
        dir.path().join("live.jsonl"),
        dir.path().join("scratch.jsonl"),
    );
    let hook = common::target::HttpTarget::start();
    let extra = format!(
        "[namespaces.ns.targets.hook]\ntype = \"http\"\nurl = \"{}\"\nlive = false\n",
        hook.url()
    );
    let svc = Spawned::start(config(dir.path(), &file_target(&live), &scratch, &extra)).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    let ids = write_entries(&base, "e", 100, 10).await;
    hook.reject_key("k3", 422);
    let ask = |key: Option<&str>| {
        let mut body = json!({"from_ms": 0, "select": "written", "target": "hook"});
        if let Some(k) = key {
            body["idempotency_key"] = k.into();
        }
        body
    };
    let started = start_replay(&base, ask(Some("replay"))).await;
    let id = started["replay"].as_str().unwrap().to_string();
    let done = finished(&base, &id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["replayed"], 90, "{done}");
    assert_eq!(done["failed"], 10, "{done}");
    let letters = get_json(&format!("{base}/dlq?limit=100")).await;
    let letters = letters["entries"].as_array().unwrap();
    assert_eq!(letters.len(), 10, "{letters:?}");
    for l in letters {
        assert_eq!(l["key"], "k3");
        assert_eq!(l["headers"]["walden.replay"], id.as_str(), "{l}");
        assert_eq!(l["origin"]["target"], "hook", "{l}");
    }
    let keys: HashSet<String> = hook
        .received()
        .iter()
        .map(|r| r.idempotency_key.clone().unwrap())
        .collect();
    let want: HashSet<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 != 3)
        .map(|(_, e)| format!("{e}.replay.{id}"))
        .collect();
    assert_eq!(keys, want);
    // The default keeps each entry's own id.
    hook.reject_key("k3", 0);
    let before = hook.received().len();
    let again = start_replay(&base, ask(None)).await;
    let done = finished(
        &base,
        again["replay"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done["replayed"], 100, "{done}");
    let keys: HashSet<String> = hook.received()[before..]
        .iter()
        .map(|r| r.idempotency_key.clone().unwrap())
        .collect();
    assert_eq!(keys, ids.iter().cloned().collect());
    // The live target never saw a replayed entry.
    assert!(
        lines(&live)
            .iter()
            .all(|l| l["headers"].get("walden.replay").is_none())
    );
    svc.stop();
}

/// A running replay holds what it has not read against retention, as a
/// consumer does; once it is done, retention deletes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_replay_holds_the_log_against_retention() {
    let dir = tempfile::tempdir().unwrap();
    let (live, scratch) = (
        dir.path().join("live.jsonl"),
        dir.path().join("scratch.jsonl"),
    );
    let mut cfg = config(
        dir.path(),
        &file_target(&live),
        &scratch,
        "[namespaces.ns.replay]\nmax_per_s = 300",
    );
    if let walden::config::BackendConfig::Embedded(e) =
        &mut cfg.namespaces.get_mut("ns").unwrap().backend
    {
        e.segment_bytes = 64 << 10;
        e.retention_max_bytes = 512 << 10;
    }
    let svc = Spawned::start(cfg).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    let payload = "x".repeat(1000);
    let write = |prefix: &'static str, n: usize| {
        let (base, payload) = (base.clone(), payload.clone());
        async move {
            let entries: Vec<Value> = (0..n)
                .map(|i| json!({"id": format!("{prefix}{i}"), "key": format!("k{}", i % 8), "payload": payload}))
                .collect();
            for chunk in entries.chunks(50) {
                write_batch(&format!("{base}/log/batch"), chunk).await;
            }
            entries
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    let first = write("a", 450).await;
    eventually("applied", Duration::from_secs(30), || async {
        match ids_in(&live).len() >= 450 {
            true => Ok(()),
            false => Err("not yet".into()),
        }
    })
    .await;
    let held_from = get_json(&base).await["replayable_from_ms"]
        .as_u64()
        .unwrap();
    let started = start_replay(
        &base,
        json!({"from_ms": held_from, "select": "written", "target": "scratch"}),
    )
    .await;
    // 2 MB more while the replay (1.5 s at 300/s) runs: past the cap.
    write("b", 2000).await;
    let done = finished(
        &base,
        started["replay"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done["state"], "done", "{done}");
    assert!(done["matched"].as_u64() >= Some(450), "{done}");
    let got: HashSet<String> = lines(&scratch)
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect();
    let missing: Vec<&String> = first.iter().filter(|id| !got.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "the replay lost {} entries to retention",
        missing.len()
    );
    // Released: more writes let retention delete what the replay held.
    write("c", 600).await;
    eventually(
        "retention deletes again",
        Duration::from_secs(30),
        || async {
            let now_from = get_json(&base).await["replayable_from_ms"]
                .as_u64()
                .unwrap();
            match now_from > held_from {
                true => Ok(()),
                false => Err(format!("{now_from}")),
            }
        },
    )
    .await;
    svc.stop();
}

/// A cancelled replay stops, says so, and stays cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_can_be_cancelled() {
    let f = files();
    let (svc, base) = file_service(&f, "[namespaces.ns.replay]\nmax_per_s = 200");
    let scratch = f.scratch.clone();
    write_entries(&base, "e", 1000, 10).await;
    let id = replay_all_to_scratch(&base).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cancelled = cancel(&base, &id).await;
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    let n = lines(&scratch).len();
    assert!(n < 1000, "{n} replayed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(lines(&scratch).len(), n, "a cancelled replay went on");
    let listed = get_json(&format!("{base}/replays")).await;
    assert_eq!(listed["replays"][0]["state"], "cancelled", "{listed}");
    svc.stop();
}

/// `walden replay` as an operator runs it: RFC 3339 or epoch-ms times, a
/// dry run, then the replay followed to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_replays_and_dry_runs() {
    let f = files();
    let (svc, base) = file_service(&f, "");
    write_entries(&base, "e", 200, 10).await;
    let url = format!("http://{}", svc.addr);
    let walden = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
            .args(args)
            .args(["--url", &url])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = tokio::task::block_in_place(|| {
        walden(&[
            "replay",
            "ns",
            "--from",
            "1970-01-01T00:00:00Z",
            "--select",
            "written",
            "--target",
            "scratch",
            "--exclude-key",
            "k1",
            "--dry-run",
        ])
    });
    assert_eq!(code, Some(0), "{err}");
    let dry: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (dry["state"].as_str(), dry["replayed"].as_u64()),
        (Some("dry_run"), Some(180))
    );
    assert!(lines(&f.scratch).is_empty());
    let (code, out, err) = tokio::task::block_in_place(|| {
        walden(&[
            "replay",
            "ns",
            "--from",
            "0",
            "--select",
            "written",
            "--target",
            "scratch",
            "--exclude-id",
            "e0",
        ])
    });
    assert_eq!(code, Some(0), "{err}");
    let done: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["replayed"], 199, "{done}");
    assert_eq!(lines(&f.scratch).len(), 199);
    let (code, _, err) =
        tokio::task::block_in_place(|| walden(&["replay", "ns", "--from", "yesterday"]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--from") && err.contains("RFC 3339"), "{err}");
    svc.stop();
}

/// `applied_after` finds the entries that were parked at `from_ms` (a long
/// backoff): the target's committed offset had passed them, yet they were
/// applied only later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_after_finds_what_was_parked_then() {
    let f = files();
    let hook = common::target::HttpTarget::start();
    let target = format!("type = \"http\"\nurl = \"{}\"", hook.url());
    let mut cfg = config(f.dir.path(), &target, &f.scratch, "");
    let retry = &mut cfg.namespaces.get_mut("ns").unwrap().retry;
    retry.park_after_ms = 100;
    retry.max_attempts = 1000;
    let svc = Spawned::start(cfg).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    hook.reject_key("slow", 503);
    let slow: Vec<Value> = (0..20)
        .map(|i| json!({"id": format!("slow{i}"), "key": "slow", "payload": {"i": i}}))
        .collect();
    write_batch(&format!("{base}/log/batch"), &slow).await;
    write_entries(&base, "fast", 200, 10).await;
    eventually(
        "the slow key parked, the rest applied",
        Duration::from_secs(30),
        || async {
            let stats = get_json(&base).await;
            let parked: u64 = stats["per_shard"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["parked"].as_u64().unwrap_or(0))
                .sum();
            match parked > 0 && hook.received().len() >= 200 {
                true => Ok(()),
                false => Err(format!(
                    "parked {parked}, applied {}",
                    hook.received().len()
                )),
            }
        },
    )
    .await;
    // Past the committed offset's next recording, which passes the parked
    // entries.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let t0 = now_ms();
    tokio::time::sleep(Duration::from_millis(50)).await;
    hook.reject_key("slow", 0);
    applied_of_key(&hook, "slow", 20).await;
    let done = replay_to_end(&base, json!({"from_ms": t0, "target": "scratch"})).await;
    assert_eq!(done["state"], "done", "{done}");
    let got = ids_in(&f.scratch);
    let missing: Vec<String> = (0..20)
        .map(|i| format!("slow{i}"))
        .filter(|id| !got.contains(id))
        .collect();
    assert!(missing.is_empty(), "not replayed: {missing:?} ({done})");
    svc.stop();
}

/// An entry whose dead letter was purged stays out of replays, unless
/// `include_purged` asks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_entries_stay_out_unless_asked_for() {
    let f = files();
    let hook = common::target::HttpTarget::start();
    let (svc, base) = hook_service(&f, &hook);
    hook.reject_key("k4", 422);
    write_entries(&base, "e", 50, 10).await;
    letters(&base, 5).await;
    let (status, purged) = post(&format!("{base}/dlq/purge"), json!({"ids": ["e4", "e14"]})).await;
    assert_eq!(
        (status, purged["purged"].as_u64()),
        (200, Some(2)),
        "{purged}"
    );
    let ask = |include: bool| {
        json!({"from_ms": 0, "select": "written", "target": "scratch",
            "include_purged": include, "dry_run": true})
    };
    let (_, without) = post(&format!("{base}/replays"), ask(false)).await;
    assert_eq!(without["excluded"], 2, "{without}");
    assert_eq!(without["replayed"], 48, "{without}");
    let (_, with) = post(&format!("{base}/replays"), ask(true)).await;
    assert_eq!(with["excluded"], 0, "{with}");
    assert_eq!(with["replayed"], 50, "{with}");
    svc.stop();
}

/// `applied_after` finds the entries that sat in the DLQ at `from_ms` and
/// were redriven after it: dead then, applied only later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_after_finds_what_was_redriven_since() {
    let f = files();
    let hook = common::target::HttpTarget::start();
    let (svc, base) = hook_service(&f, &hook);
    hook.reject_key("k5", 422);
    write_entries(&base, "e", 100, 10).await;
    letters(&base, 10).await;
    eventually(
        "the other keys applied",
        Duration::from_secs(30),
        || async {
            match hook.received().len() >= 90 {
                true => Ok(()),
                false => Err(hook.received().len().to_string()),
            }
        },
    )
    .await;
    // Past the committed offset's next recording, which passes the letters.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let t0 = now_ms();
    tokio::time::sleep(Duration::from_millis(50)).await;
    hook.reject_key("k5", 0);
    let (status, body) = post(&format!("{base}/dlq/redrive"), json!({"all": true})).await;
    assert_eq!(
        (status, body["redriven"].as_u64()),
        (200, Some(10)),
        "{body}"
    );
    applied_of_key(&hook, "k5", 10).await;
    let done = replay_to_end(&base, json!({"from_ms": t0, "target": "scratch"})).await;
    let got = ids_in(&f.scratch);
    let missing: Vec<String> = (0..10)
        .map(|i| format!("e{}", i * 10 + 5))
        .filter(|id| !got.contains(id))
        .collect();
    assert!(missing.is_empty(), "not replayed: {missing:?} ({done})");
    svc.stop();
}

/// A graceful shutdown pauses a running replay and the next start resumes
/// it; a replay whose target is gone from the config at the next start
/// fails, saying why, instead of waiting for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replay_resumes_and_one_that_cannot_fails() {
    let f = files();
    let text = config_text(
        f.dir.path(),
        "127.0.0.1:0",
        EMBEDDED,
        &file_target(&f.live),
        &f.scratch,
        "[namespaces.ns.replay]\nmax_per_s = 500",
    );
    let start = |text: &str| {
        let svc = Spawned::start(walden::config::from_toml(text).unwrap()).unwrap();
        let base = format!("http://{}/v1/namespaces/ns", svc.addr);
        (svc, base)
    };
    let (svc, base) = start(&text);
    let ids = write_entries(&base, "e", 1000, 10).await;
    let id = replay_all_to_scratch(&base).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    svc.stop();
    let paused = lines(&f.scratch).len();
    assert!(paused < 1000, "{paused} replayed before the stop");
    let (svc, base) = start(&text);
    let done = finished(&base, &id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "done", "{done}");
    let got = ids_in(&f.scratch);
    assert_eq!(got, ids.iter().cloned().collect());

    let second = replay_all_to_scratch(&base).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    svc.stop();
    let scratch_table = format!(
        "[namespaces.ns.targets.scratch]\ntype = \"file\"\npath = \"{}\"\nlive = false\n",
        f.scratch.display()
    );
    assert!(text.contains(&scratch_table));
    let (svc, base) = start(&text.replace(&scratch_table, ""));
    let status = get_json(&format!("{base}/replays/{second}")).await;
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        status["error"].as_str().unwrap().contains("scratch"),
        "{status}"
    );
    svc.stop();
}

/// A replay paused (a graceful stop) while its target keeps refusing some
/// entries resumes before them: nothing is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_paused_mid_retry_skips_nothing() {
    let f = files();
    let hook = common::target::HttpTarget::start();
    let extra = format!(
        "[namespaces.ns.targets.hook]\ntype = \"http\"\nurl = \"{}\"\nlive = false\n",
        hook.url()
    );
    let cfg = || {
        let mut c = config(f.dir.path(), &file_target(&f.live), &f.scratch, &extra);
        c.namespaces.get_mut("ns").unwrap().retry.max_attempts = 1000;
        c
    };
    let svc = Spawned::start(cfg()).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    let ids = write_entries(&base, "e", 100, 10).await;
    hook.reject_key("k1", 503);
    let started = start_replay(
        &base,
        json!({"from_ms": 0, "select": "written", "target": "hook"}),
    )
    .await;
    let id = started["replay"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(700)).await;
    svc.stop();
    hook.reject_key("k1", 0);
    let svc = Spawned::start(cfg()).unwrap();
    let base = format!("http://{}/v1/namespaces/ns", svc.addr);
    let done = finished(&base, &id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "done", "{done}");
    let got: HashSet<String> = hook.ids();
    let missing: Vec<&String> = ids.iter().filter(|id| !got.contains(*id)).collect();
    assert!(missing.is_empty(), "skipped: {missing:?}");
    svc.stop();
}
