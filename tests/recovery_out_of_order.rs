//! Recovery case (found by the `log_recovery` fuzzer): a valid record whose
//! offset its shard has already passed, such as a frame copied further on in
//! the segment. Recovery panicked on it (an offset subtraction in the
//! index); now the copy is reported as corruption, stepped over and never
//! delivered, and every record is read once.

mod common;

use common::{DIR, entry, open_sim, payloads, read_all, segment};
use std::path::Path;
use walden::backends::embedded::LogConfig;
use walden::backends::embedded::format::decode_segment_header;
use walden::entry::ShardRef;
use walden::entry::frame::{Frame, decode_frame};
use walden::fs::SimFs;

#[test]
fn a_copied_record_is_reported_and_delivered_once() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let log = open_sim(&fs, LogConfig::default());
    for i in 0..3 {
        log.append(&shard, entry(format!("e{i}"), format!("payload-{i}")))
            .wait()
            .unwrap();
    }
    drop(log);

    // Put a copy of record 0's frame right after record 2's.
    let path = segment(Path::new(DIR), 1);
    let mut bytes = fs.read_file(&path).unwrap();
    let (_, header_len) = decode_segment_header(&bytes).unwrap();
    let Frame::Valid { len, .. } = decode_frame(&bytes[header_len..]) else {
        panic!("record 0 is a valid frame");
    };
    let first = bytes[header_len..header_len + len].to_vec();
    bytes.truncate(end_of_frames(&bytes, header_len));
    bytes.extend_from_slice(&first);
    fs.write_file(&path, bytes);

    let log = open_sim(&fs, LogConfig::default());
    let report = log.recovery_report();
    assert_eq!(report.corrupt_frames.len(), 1, "{report:?}");
    assert!(report.corrupt_frames[0].reason.contains("offset 0"));
    log.append(&shard, entry("e3", "payload-3")).wait().unwrap();
    let got = read_all(&log, &shard, 0);
    assert_eq!(
        payloads(&got),
        ["payload-0", "payload-1", "payload-2", "payload-3"]
    );
}

/// Where the valid frames after the header end (before any zeros).
fn end_of_frames(bytes: &[u8], mut at: usize) -> usize {
    while let Frame::Valid { len, .. } = decode_frame(&bytes[at..]) {
        at += len;
    }
    at
}
