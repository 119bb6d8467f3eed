//! Recovery case: one flipped bit in a payload. It is detected, reported with
//! its segment and position, and never delivered.

mod common;

use common::{DIR, entry, open_sim, payloads, read_all, segment, small_segments};
use std::path::Path;
use walden::backends::embedded::{LogConfig, LogError, OnCorruption};
use walden::entry::ShardRef;
use walden::fs::SimFs;

/// 60 records over two shards in small segments; then one payload byte of
/// shard 0's record 5 (in sealed segment 1) has one bit flipped.
fn damaged_log(fs: &SimFs) -> (ShardRef, ShardRef) {
    let a = ShardRef::new("ns", 0);
    let b = ShardRef::new("ns", 1);
    let log = open_sim(fs, small_segments());
    for i in 0..30 {
        log.append(&a, entry(format!("a{i}"), format!("payload-a-{i:03}")))
            .wait()
            .unwrap();
        log.append(&b, entry(format!("b{i}"), format!("payload-b-{i:03}")))
            .wait()
            .unwrap();
    }
    assert!(log.stats().segments_rolled.get() >= 1);
    drop(log);
    let path = segment(Path::new(DIR), 1);
    let mut bytes = fs.read_file(&path).unwrap();
    let needle = b"payload-a-005";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    bytes[at + 9] ^= 0x04;
    fs.write_file(&path, bytes);
    (a, b)
}

fn config(on_corruption: OnCorruption) -> LogConfig {
    LogConfig {
        on_corruption,
        ..small_segments()
    }
}

#[test]
fn stop_delivers_up_to_the_bad_record_and_reports_where_it_is() {
    let fs = SimFs::new();
    let (a, b) = damaged_log(&fs);
    let log = open_sim(&fs, config(OnCorruption::Stop));
    let mut r = log.reader(&a, 0).unwrap();
    let first = r.read_batch(100).unwrap();
    assert_eq!(
        payloads(&first).len(),
        5,
        "records 0..5 come before the damage"
    );
    let err = r.read_batch(100).unwrap_err();
    match &err {
        LogError::Corrupt {
            segment, offset, ..
        } => {
            assert_eq!((*segment, *offset), (1, 5));
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    // It stays stopped: the bad record is never delivered.
    assert!(r.read_batch(100).is_err());
    assert!(
        read_all(&log, &b, 0).len() == 30,
        "another shard's reader steps over a frame that is not its own"
    );
}

#[test]
fn skip_drops_only_the_bad_record_and_counts_it() {
    let fs = SimFs::new();
    let (a, _) = damaged_log(&fs);
    let log = open_sim(&fs, config(OnCorruption::Skip));
    let got = read_all(&log, &a, 0);
    let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
    let want: Vec<u64> = (0..30).filter(|&o| o != 5).collect();
    assert_eq!(offsets, want);
    assert!(!payloads(&got).iter().any(|p| p.contains("005")));
    assert_eq!(log.stats().corrupt_skipped.get(), 1);
}

#[test]
fn a_bad_record_in_the_active_segment_keeps_its_offset_reserved() {
    // The damaged record is the shard's newest: its offset must not be handed
    // to a new record, or a target would take the new record for an old one.
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let other = ShardRef::new("ns", 1);
    let log = open_sim(&fs, LogConfig::default());
    for i in 0..3 {
        log.append(&shard, entry(i.to_string(), format!("mine-{i}")))
            .wait()
            .unwrap();
    }
    log.append(&other, entry("o", "theirs")).wait().unwrap();
    drop(log);
    let path = segment(Path::new(DIR), 1);
    let mut bytes = fs.read_file(&path).unwrap();
    let at = bytes.windows(6).position(|w| w == b"mine-2").unwrap();
    bytes[at] ^= 1;
    fs.write_file(&path, bytes);

    let log = open_sim(&fs, LogConfig::default());
    assert_eq!(log.recovery_report().corrupt_frames.len(), 1);
    assert_eq!(
        log.append(&shard, entry("new", "new"))
            .wait()
            .unwrap()
            .sequence,
        3
    );
    let mut r = log.reader(&shard, 0).unwrap();
    assert_eq!(r.read_batch(10).unwrap().len(), 2);
    assert!(matches!(
        r.read_batch(10),
        Err(LogError::Corrupt { offset: 2, .. })
    ));
}
