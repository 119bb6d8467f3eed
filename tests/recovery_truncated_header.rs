//! Recovery case: a truncated segment header.

mod common;

use common::{DIR, entry, open_sim, read_all, segment, small_segments};
use std::path::Path;
use std::sync::Arc;
use walden::backends::embedded::{EmbeddedLog, LogError};
use walden::entry::ShardRef;
use walden::fs::SimFs;

fn rolled_log(fs: &SimFs, shard: &ShardRef) -> u64 {
    let log = open_sim(fs, small_segments());
    for i in 0..100 {
        log.append(shard, entry(i.to_string(), [b'x'; 100]))
            .wait()
            .unwrap();
    }
    let rolled = log.stats().segments_rolled.get();
    assert!(rolled >= 2);
    rolled + 1
}

#[test]
fn a_torn_header_on_a_new_active_segment_is_rewritten() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let last = rolled_log(&fs, &shard);
    // A crash while rolling: the newest segment has only part of its header
    // and no records.
    let next = last + 1;
    fs.write_file(&segment(Path::new(DIR), next), b"WALDENLG\x01\x00".to_vec());

    let log = open_sim(&fs, small_segments());
    assert!(log.recovery_report().rewrote_header);
    assert_eq!(read_all(&log, &shard, 0).len(), 100);
    assert_eq!(
        log.append(&shard, entry("n", "n")).wait().unwrap().sequence,
        100
    );
    drop(log);
    let log = open_sim(&fs, small_segments());
    assert_eq!(read_all(&log, &shard, 0).len(), 101);
}

#[test]
fn an_empty_new_segment_file_is_rewritten() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let last = rolled_log(&fs, &shard);
    fs.write_file(&segment(Path::new(DIR), last + 1), Vec::new());
    let log = open_sim(&fs, small_segments());
    assert!(log.recovery_report().rewrote_header);
    assert_eq!(
        log.append(&shard, entry("n", "n")).wait().unwrap().sequence,
        100
    );
}

#[test]
fn a_truncated_header_on_a_sealed_segment_is_a_clear_error() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    rolled_log(&fs, &shard);
    let path = segment(Path::new(DIR), 1);
    let bytes = fs.read_file(&path).unwrap();
    fs.write_file(&path, bytes[..12].to_vec());
    let err = EmbeddedLog::open_with_fs(Arc::new(fs.clone()), DIR, small_segments())
        .err()
        .expect("open must fail");
    assert!(matches!(err, LogError::BadSegmentHeader { .. }), "{err}");
    assert!(
        err.to_string().contains("00000000000000000001.seg"),
        "{err}"
    );
}

#[test]
fn a_damaged_header_on_an_active_segment_with_records_is_not_rewritten() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let last = rolled_log(&fs, &shard);
    let path = segment(Path::new(DIR), last);
    let mut bytes = fs.read_file(&path).unwrap();
    bytes[0] = b'X';
    fs.write_file(&path, bytes);
    let err = EmbeddedLog::open_with_fs(Arc::new(fs.clone()), DIR, small_segments())
        .err()
        .expect("open must fail");
    assert!(matches!(err, LogError::BadSegmentHeader { .. }), "{err}");
}
