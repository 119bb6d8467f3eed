//! Recovery case: a torn tail (a crash in the middle of writing a batch).

mod common;

use common::{DIR, entry, open_sim, payloads, read_all, segment};
use std::path::Path;
use walden::backends::embedded::LogConfig;
use walden::entry::ShardRef;
use walden::fs::SimFs;

fn write_ten(fs: &SimFs, shard: &ShardRef) -> Vec<u8> {
    let log = open_sim(fs, LogConfig::default());
    for i in 0..10 {
        log.append(shard, entry(i.to_string(), format!("p{i}")))
            .wait()
            .unwrap();
    }
    drop(log);
    fs.read_file(&segment(Path::new(DIR), 1)).unwrap()
}

#[test]
fn a_partial_last_frame_is_truncated_and_offsets_continue() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let clean = write_ten(&fs, &shard);
    // A frame cut short: its first 20 bytes made it to disk.
    let mut torn = clean.clone();
    torn.extend_from_slice(&clean[clean.len() - 60..clean.len() - 40]);
    fs.write_file(&segment(Path::new(DIR), 1), torn);

    let log = open_sim(&fs, LogConfig::default());
    assert_eq!(log.recovery_report().truncated_bytes, 20);
    assert!(log.recovery_report().corrupt_frames.is_empty());
    assert_eq!(fs.read_file(&segment(Path::new(DIR), 1)).unwrap(), clean);
    let got = read_all(&log, &shard, 0);
    assert_eq!(
        payloads(&got),
        (0..10).map(|i| format!("p{i}")).collect::<Vec<_>>()
    );
    assert_eq!(
        log.append(&shard, entry("n", "next"))
            .wait()
            .unwrap()
            .sequence,
        10
    );
}

#[test]
fn a_zero_filled_tail_is_truncated() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let clean = write_ten(&fs, &shard);
    let mut torn = clean.clone();
    torn.extend_from_slice(&[0; 4096]);
    fs.write_file(&segment(Path::new(DIR), 1), torn);
    let log = open_sim(&fs, LogConfig::default());
    assert_eq!(log.recovery_report().truncated_bytes, 4096);
    assert_eq!(read_all(&log, &shard, 0).len(), 10);
}

#[test]
fn a_bad_frame_with_valid_frames_after_it_is_not_a_torn_tail() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let clean = write_ten(&fs, &shard);
    // Damage a frame in the middle: the frames after it are still valid, so
    // this is corruption, and nothing may be truncated.
    let mut damaged = clean.clone();
    let mid = clean.len() / 2;
    damaged[mid] ^= 0xff;
    fs.write_file(&segment(Path::new(DIR), 1), damaged.clone());
    let log = open_sim(&fs, LogConfig::default());
    let report = log.recovery_report();
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(report.corrupt_frames.len(), 1);
    assert_eq!(
        fs.read_file(&segment(Path::new(DIR), 1)).unwrap()[..damaged.len()],
        damaged[..],
        "fsynced records are never deleted to tidy up"
    );
}
