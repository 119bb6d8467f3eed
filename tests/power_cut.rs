//! The power-cut model test. Appenders and a checkpoint writer run against
//! the simulated filesystem; at a random instant the power is cut, which drops
//! every write that no fsync covered and every directory entry that no
//! directory fsync covered. Every record acknowledged before the cut must
//! survive, intact and in order, and the log must accept appends again.
//!
//! A SIGKILL keeps the page cache, so only a model like this catches a
//! missing `fdatasync` or directory fsync.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{entry, open_sim, read_all};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use walden::backends::embedded::{FsyncMode, LogConfig};
use walden::entry::{Durable, ShardRef};
use walden::fs::SimFs;

const ROUNDS: u64 = 40;

fn shards() -> Vec<ShardRef> {
    let mut v = Vec::new();
    for ns in ["orders", "users"] {
        for s in 0..2 {
            v.push(ShardRef::new(ns, s));
        }
    }
    v
}

fn config(round: u64) -> LogConfig {
    LogConfig {
        // Small segments, so cuts land during rolls too.
        segment_bytes: 2048,
        fsync: if round.is_multiple_of(2) {
            FsyncMode::Always
        } else {
            FsyncMode::Interval(Duration::from_millis(2))
        },
        ..LogConfig::default()
    }
}

type Acked = Arc<Mutex<HashMap<(ShardRef, u64), Vec<u8>>>>;

#[test]
fn every_acknowledged_record_survives_a_power_cut() {
    for round in 0..ROUNDS {
        run_round(round);
    }
}

fn run_round(round: u64) {
    let fs = SimFs::new();
    let log = Arc::new(open_sim(&fs, config(round)));
    let acked: Acked = Arc::default();
    let committed = Arc::new(Mutex::new(0u64));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();

    for t in 0..4u64 {
        let (log, acked, stop) = (log.clone(), acked.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(round * 100 + t);
            let shards = shards();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let shard = &shards[rng.random_range(0..shards.len())];
                let len = rng.random_range(1..300);
                let payload: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                match log
                    .append(shard, entry(format!("{t}-{i}"), &payload))
                    .wait()
                {
                    Ok(ack) => {
                        assert_eq!(ack.durable, Durable::True);
                        acked
                            .lock()
                            .unwrap()
                            .insert((shard.clone(), ack.sequence), payload);
                    }
                    Err(_) => break,
                }
                i += 1;
            }
        }));
    }
    {
        let (log, committed, stop) = (log.clone(), committed.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let shard = ShardRef::new("orders", 0);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if log
                    .commit("g", &BTreeMap::from([(shard.clone(), n)]))
                    .is_err()
                {
                    break;
                }
                *committed.lock().unwrap() = n;
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
    }

    // The cut falls at a random instant after the first acknowledgement:
    // a cut before it would check nothing, and on a loaded machine the
    // appenders can take longer than any fixed sleep to get going.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "round {round}: nothing was acknowledged within 30 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut rng = StdRng::seed_from_u64(round);
    std::thread::sleep(Duration::from_millis(rng.random_range(0..55)));
    // What was acknowledged before the cut must be in what the cut leaves.
    let acked_before = acked.lock().unwrap().clone();
    let committed_before = *committed.lock().unwrap();
    let after = fs.power_cut();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    drop(log);

    let log = open_sim(&after, config(round));
    for shard in shards() {
        let records = read_all(&log, &shard, 0);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.offset, i as u64, "round {round}: {shard} is not dense");
        }
        for ((s, offset), payload) in &acked_before {
            if *s != shard {
                continue;
            }
            let got = records.get(*offset as usize).unwrap_or_else(|| {
                panic!(
                    "round {round}: acknowledged {shard}@{offset} is lost ({} records survived)",
                    records.len()
                )
            });
            assert_eq!(
                &got.entry.payload[..],
                &payload[..],
                "round {round}: {shard}@{offset}"
            );
        }
    }
    let ck = log
        .committed("g")
        .get(&ShardRef::new("orders", 0))
        .copied()
        .unwrap_or(0);
    assert!(
        ck >= committed_before,
        "round {round}: checkpoint went back"
    );

    let shard = ShardRef::new("orders", 1);
    let next = log.next_offset(&shard);
    let ack = log.append(&shard, entry("after", "x")).wait().unwrap();
    assert_eq!(
        ack.sequence, next,
        "round {round}: the log accepts appends again"
    );
}
