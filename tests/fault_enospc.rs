//! Fault case: the disk fills up (ENOSPC, with a short write). The failed
//! batch is rolled back and answered "false"; nothing acknowledged is lost,
//! and the log works again once there is room.

mod common;

use common::{entry, open_sim, payloads, read_all};
use walden::backends::embedded::LogConfig;
use walden::backends::embedded::LogError;
use walden::entry::{Durable, ShardRef};
use walden::fs::SimFs;

#[test]
fn a_full_disk_refuses_cleanly_and_recovers() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let log = open_sim(&fs, LogConfig::default());
    log.append(&shard, entry("0", "fits")).wait().unwrap();
    // The active segment is zero-filled ahead of the writes. Leave the disk
    // a few bytes past it: the write that runs beyond it is short.
    let used = fs
        .read_file(&common::segment(std::path::Path::new(common::DIR), 1))
        .unwrap()
        .len();
    fs.set_capacity(Some(used as u64 + 10));
    let big = "z".repeat(100_000);
    let mut acked = vec!["fits".to_string()];
    let err = loop {
        assert!(acked.len() < 100, "the disk never filled");
        match log
            .append(&shard, entry(acked.len().to_string(), &big))
            .wait()
        {
            Ok(_) => acked.push(big.clone()),
            Err(e) => break e,
        }
    };
    match &err {
        LogError::WriteFailed {
            rolled_back,
            source,
            ..
        } => {
            assert!(rolled_back);
            assert_eq!(source.raw_os_error(), Some(28));
        }
        other => panic!("expected WriteFailed, got {other}"),
    }
    assert_eq!(err.durable(), Durable::False);
    assert!(
        !log.is_poisoned(),
        "a rolled-back write does not poison the log"
    );

    fs.set_capacity(None);
    let ack = log.append(&shard, entry("after", "after")).wait().unwrap();
    assert_eq!(
        ack.sequence,
        acked.len() as u64,
        "the refused record gave its offset back"
    );
    acked.push("after".into());
    assert_eq!(payloads(&read_all(&log, &shard, 0)), acked);

    let after = fs.power_cut();
    drop(log);
    let log = open_sim(&after, LogConfig::default());
    assert_eq!(payloads(&read_all(&log, &shard, 0)), acked);
}
