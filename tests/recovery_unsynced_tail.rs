//! Recovery case: records that reached the page cache but no fsync (a SIGKILL
//! between the write and its fsync, or a failed fsync). A kill keeps the
//! page cache, so recovery finds them valid and readers may see them; they
//! must then survive a power cut too, or their offsets could be given to
//! other records after it.
//!
//! The model: kill, restart, read, cut the power, restart.

mod common;

use common::{entry, open_sim, payloads, read_all};
use walden::backends::embedded::LogConfig;
use walden::entry::ShardRef;
use walden::fs::SimFs;

#[test]
fn what_recovery_lets_readers_see_survives_a_power_cut() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let log = open_sim(&fs, LogConfig::default());
    for i in 0..3 {
        log.append(&shard, entry(i.to_string(), format!("p{i}")))
            .wait()
            .unwrap();
    }
    // Written, never fsynced, never acknowledged: the fsync fails, and the
    // process dies with the record in the page cache.
    fs.fail_next_syncs(1);
    assert!(log.append(&shard, entry("3", "p3")).wait().is_err());
    drop(log);

    // Restart (same page cache) and read: the tail is valid, so it is kept
    // and delivered.
    let log = open_sim(&fs, LogConfig::default());
    let seen = payloads(&read_all(&log, &shard, 0));
    assert_eq!(seen, ["p0", "p1", "p2", "p3"]);

    // Power cut while it runs (a clean close would fsync), restart: what a
    // reader saw is still there, and its offsets are not reused.
    let after = fs.power_cut();
    drop(log);
    let log = open_sim(&after, LogConfig::default());
    assert_eq!(
        payloads(&read_all(&log, &shard, 0)),
        seen,
        "a record readers saw was lost in a power cut after recovery"
    );
    let next = log.append(&shard, entry("4", "p4")).wait().unwrap();
    assert_eq!(next.sequence, 4, "offsets a reader saw are never reused");
}
