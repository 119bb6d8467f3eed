//! The active segment is zero-filled a chunk ahead of the writes, so that
//! most fdatasyncs need not change the file's size. The zeros never reach a
//! reader, a sealed segment or a clean close, and a crash that leaves them
//! on loses nothing.

mod common;

use common::{DIR, entry, open_sim, payloads, read_all, segment, small_segments};
use std::path::Path;
use walden::backends::embedded::LogConfig;
use walden::entry::ShardRef;
use walden::fs::SimFs;

fn append(
    log: &walden::backends::embedded::EmbeddedLog,
    shard: &ShardRef,
    n: usize,
    size: usize,
) -> Vec<String> {
    (0..n)
        .map(|i| {
            let p = format!("{i:0size$}");
            log.append(shard, entry(i.to_string(), &p)).wait().unwrap();
            p
        })
        .collect()
}

#[test]
fn the_active_segment_runs_ahead_in_zeros_and_a_clean_close_trims_them() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let log = open_sim(&fs, LogConfig::default());
    let written = append(&log, &shard, 10, 10);
    let open = fs.read_file(&segment(Path::new(DIR), 1)).unwrap();
    assert_eq!(open.len(), 1 << 20, "zero-filled to the first MiB");
    assert_eq!(open.last(), Some(&0));
    drop(log);

    let closed = fs.read_file(&segment(Path::new(DIR), 1)).unwrap();
    assert!(
        closed.len() < 4096,
        "{} bytes after a clean close",
        closed.len()
    );
    assert_eq!(closed[..], open[..closed.len()]);
    let log = open_sim(&fs, LogConfig::default());
    assert_eq!(log.recovery_report().truncated_bytes, 0);
    assert_eq!(payloads(&read_all(&log, &shard, 0)), written);
}

#[test]
fn a_power_cut_leaves_the_zeros_on_and_recovery_trims_them() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let log = open_sim(&fs, LogConfig::default());
    let written = append(&log, &shard, 10, 10);
    let after = fs.power_cut();
    drop(log);

    let log = open_sim(&after, LogConfig::default());
    let report = log.recovery_report();
    assert!(report.truncated_bytes > 0, "the zeros were on disk");
    assert!(report.corrupt_frames.is_empty());
    assert_eq!(payloads(&read_all(&log, &shard, 0)), written);
    let next = log.append(&shard, entry("n", "next")).wait().unwrap();
    assert_eq!(
        next.sequence, 10,
        "offsets continue after the trimmed zeros"
    );
}

#[test]
fn a_sealed_segment_that_kept_its_zeros_is_trimmed_and_read_whole() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let log = open_sim(&fs, small_segments());
    // 1 KiB records in 4 KiB segments: several rolls.
    let written = append(&log, &shard, 12, 1000);
    drop(log);
    let first = segment(Path::new(DIR), 1);
    let sealed = fs.read_file(&first).unwrap();
    // A crash between sealing's trim and its fsync.
    let mut zeros = sealed.clone();
    zeros.extend_from_slice(&[0; 8192]);
    fs.write_file(&first, zeros);

    let log = open_sim(&fs, small_segments());
    assert_eq!(log.recovery_report().rebuilt_indexes, 1);
    assert_eq!(payloads(&read_all(&log, &shard, 0)), written);
    assert_eq!(fs.read_file(&first).unwrap(), sealed);
}
