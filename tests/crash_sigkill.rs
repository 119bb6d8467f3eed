//! A real crash test. A child process appends and reports each acknowledged
//! offset; the parent kills it with SIGKILL at random moments, 20 times,
//! reopening the log each time. Every acknowledged record must be present,
//! intact and in order, and the log must accept appends again.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{entry, read_all};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use walden::backends::embedded::{EmbeddedLog, LogConfig};
use walden::entry::{Durable, ShardRef};

const KILLS: usize = 20;
const CHILD_ENV: &str = "WALDEN_CRASH_CHILD_DIR";

fn config() -> LogConfig {
    LogConfig {
        // Small segments, so kills land during rolls too.
        segment_bytes: 16 << 10,
        ..LogConfig::default()
    }
}

fn shards() -> Vec<ShardRef> {
    (0..4).map(|s| ShardRef::new("crash", s)).collect()
}

/// The child: append from 8 threads until killed, printing one line per
/// acknowledged append. Run only by the parent below.
#[test]
#[ignore = "the child process of sigkill_at_random_moments_loses_nothing_acknowledged"]
fn crash_child() {
    let dir = std::env::var(CHILD_ENV).expect("run by the parent test");
    let log = Arc::new(EmbeddedLog::open(&dir, config()).expect("child opens the log"));
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let run = std::process::id();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (log, out) = (log.clone(), out.clone());
            std::thread::spawn(move || {
                let shards = shards();
                for i in 0.. {
                    let shard = &shards[(t + i) % shards.len()];
                    let payload = format!("{run}-{t}-{i}-{}", "x".repeat(i % 200));
                    let ack = log.append(shard, entry(format!("{run}-{t}-{i}"), &payload));
                    let ack = ack.wait().expect("append");
                    assert_eq!(ack.durable, Durable::True);
                    let mut out = out.lock().unwrap();
                    writeln!(out, "ACK {} {} {payload}", shard.shard, ack.sequence).unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut acked: BTreeMap<(u32, u64), String> = BTreeMap::new();

    for kill in 0..KILLS {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let collector = {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap().push(line);
                }
            })
        };
        // Let it get going, then kill it at a random moment.
        let start = Instant::now();
        let has_ack = || lines.lock().unwrap().iter().any(|l| l.starts_with("ACK "));
        while !has_ack() && start.elapsed() < Duration::from_secs(30) {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).ok();
                panic!("kill {kill}: the child exited on its own ({status}): {err}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..150)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        collector.join().unwrap();

        let lines = lines.lock().unwrap();
        let mut this_run = 0;
        for line in lines.iter() {
            let mut parts = line.splitn(4, ' ');
            if parts.next() != Some("ACK") {
                continue;
            }
            let shard: u32 = parts.next().unwrap().parse().unwrap();
            let offset: u64 = parts.next().unwrap().parse().unwrap();
            let payload = parts.next().unwrap().to_string();
            acked.insert((shard, offset), payload);
            this_run += 1;
        }
        assert!(this_run > 0, "kill {kill}: the child acknowledged nothing");

        let log = EmbeddedLog::open(dir.path(), config()).unwrap();
        for shard in shards() {
            let records = read_all(&log, &shard, 0);
            for (i, r) in records.iter().enumerate() {
                assert_eq!(r.offset, i as u64, "kill {kill}: {shard} out of order");
            }
            for ((s, offset), payload) in acked.range((shard.shard, 0)..(shard.shard + 1, 0)) {
                let r = records
                    .get(*offset as usize)
                    .unwrap_or_else(|| panic!("kill {kill}: acknowledged {s}@{offset} is lost"));
                assert_eq!(
                    std::str::from_utf8(&r.entry.payload).unwrap(),
                    payload,
                    "kill {kill}: {s}@{offset} changed"
                );
            }
        }
        // The log accepts appends again; this one must survive too.
        let shard = &shards()[kill % 4];
        let payload = format!("parent-{kill}");
        let ack = log
            .append(shard, entry(payload.clone(), &payload))
            .wait()
            .unwrap();
        acked.insert((shard.shard, ack.sequence), payload);
    }
}
