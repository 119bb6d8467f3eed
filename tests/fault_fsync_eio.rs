//! Fault case: EIO on fsync. The log is poisoned: the appends that fsync
//! covered are answered "unknown", and nothing is acknowledged after it.

mod common;

use common::{entry, open_sim, read_all};
use walden::backends::embedded::LogError;
use walden::backends::embedded::{FsyncMode, LogConfig};
use walden::entry::{Durable, ShardRef};
use walden::fs::SimFs;

#[test]
fn a_failed_fsync_poisons_the_log() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let log = open_sim(&fs, LogConfig::default());
    // Open before the writes: the committer hands it what it makes durable.
    let mut keeping_up = log.reader(&shard, 0).unwrap();
    for i in 0..3 {
        log.append(&shard, entry(i.to_string(), "ok"))
            .wait()
            .unwrap();
    }
    fs.fail_next_syncs(1);
    let err = log.append(&shard, entry("3", "lost?")).wait().unwrap_err();
    assert!(matches!(err, LogError::SyncFailed { .. }), "{err}");
    assert_eq!(err.durable(), Durable::Unknown);
    assert!(log.is_poisoned());

    // Later appends fail at once, even though fsync would work again.
    for i in 4..10 {
        let err = log
            .append(&shard, entry(i.to_string(), "x"))
            .wait()
            .unwrap_err();
        assert!(matches!(err, LogError::Poisoned { .. }), "{err}");
        assert_eq!(err.durable(), Durable::False);
        assert!(
            err.to_string().contains("fsync"),
            "the cause is named: {err}"
        );
    }
    // Readers never saw the record whose fsync failed: neither one the
    // committer handed records to, nor one reading the journal.
    let mut taken = Vec::new();
    for _ in 0..3 {
        taken.extend(keeping_up.read_batch(100).unwrap());
    }
    assert_eq!(taken.len(), 3);
    assert_eq!(log.stats().tail_reads.get(), 3);
    drop(keeping_up);
    assert_eq!(read_all(&log, &shard, 0).len(), 3);
    assert_eq!(log.stats().appends.get(), 4);

    // After a power cut and a reopen, the acknowledged records are there and
    // the log accepts appends again.
    let after = fs.power_cut();
    drop(log);
    let log = open_sim(&after, LogConfig::default());
    assert_eq!(read_all(&log, &shard, 0).len(), 3);
    let ack = log.append(&shard, entry("again", "x")).wait().unwrap();
    assert_eq!((ack.sequence, ack.durable), (3, Durable::True));
}

#[test]
fn interval_mode_fails_every_append_the_bad_fsync_covered() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let config = LogConfig {
        fsync: FsyncMode::Interval(std::time::Duration::from_millis(50)),
        ..LogConfig::default()
    };
    let log = open_sim(&fs, config);
    log.append(&shard, entry("first", "x")).wait().unwrap();
    fs.fail_next_syncs(1);
    let pending: Vec<_> = (0..20)
        .map(|i| log.append(&shard, entry(i.to_string(), "x")))
        .collect();
    for p in pending {
        let err = p.wait().unwrap_err();
        assert_ne!(err.durable(), Durable::True);
    }
    assert_eq!(read_all(&log, &shard, 0).len(), 1);
}
