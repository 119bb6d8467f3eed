//! Recovery case: a set of mutations whose marker never reached the disk (a
//! crash between its mutations and its marker). The set was never
//! acknowledged, so nothing of it is ever delivered, its frames are cut off
//! with the torn tail, and its offsets are given to later records.

mod common;

use common::{DIR, entry, open_sim, payloads, read_all, segment};
use std::path::Path;
use tokio::sync::oneshot;
use walden::backends::embedded::{AppendReply, EmbeddedLog, LogConfig, format};
use walden::entry::{
    Entry, SET_HEADER, SET_INDEX_HEADER, SET_MARKER_HEADER, SET_SIZE_HEADER, ShardRef,
};
use walden::fs::SimFs;

fn member(set: &str, i: usize, n: usize, payload: &str) -> Entry {
    let mut e = entry(format!("{set}.{i}"), payload);
    e.headers.push((SET_HEADER.into(), set.into()));
    e.headers.push((SET_INDEX_HEADER.into(), i.to_string()));
    e.headers.push((SET_SIZE_HEADER.into(), n.to_string()));
    e
}

fn marker(set: &str, n: usize) -> Entry {
    let mut e = entry(set, "{}");
    e.key = None;
    e.headers = vec![
        (SET_MARKER_HEADER.into(), set.into()),
        (SET_SIZE_HEADER.into(), n.to_string()),
    ];
    e
}

/// Append a set (members to shards 0 and 1, marker to shard 0) and wait
/// for every answer.
fn append_set(log: &EmbeddedLog, set: &str) -> Entry {
    let (s0, s1) = (ShardRef::new("ns", 0), ShardRef::new("ns", 1));
    let last = marker(set, 2);
    let writes = vec![
        (s0.clone(), member(set, 0, 2, &format!("{set}-a"))),
        (s1, member(set, 1, 2, &format!("{set}-b"))),
        (s0, last.clone()),
    ];
    let mut answers = Vec::new();
    let writes = writes
        .into_iter()
        .map(|(shard, e)| {
            let (tx, rx) = oneshot::channel();
            answers.push(rx);
            (shard, e, AppendReply::Log(tx))
        })
        .collect();
    log.append_set(writes);
    for rx in answers {
        rx.blocking_recv().unwrap().unwrap();
    }
    last
}

#[test]
fn a_set_cut_before_its_marker_is_never_delivered_and_its_offsets_are_reused() {
    let fs = SimFs::new();
    let (s0, s1) = (ShardRef::new("ns", 0), ShardRef::new("ns", 1));
    let log = open_sim(&fs, LogConfig::default());
    log.append(&s0, entry("before", "before")).wait().unwrap();
    append_set(&log, "whole");
    let last = append_set(&log, "torn");
    drop(log);
    // The marker of the last set did not make it to disk.
    let path = segment(Path::new(DIR), 1);
    let clean = fs.read_file(&path).unwrap();
    let cut = clean.len() - format::encoded_len("ns", &last);
    fs.write_file(&path, clean[..cut].to_vec());

    let log = open_sim(&fs, LogConfig::default());
    assert!(log.recovery_report().truncated_bytes > 0);
    assert!(log.recovery_report().corrupt_frames.is_empty());
    // The whole set stays; nothing of the torn one is delivered.
    assert_eq!(
        payloads(&read_all(&log, &s0, 0)),
        ["before", "whole-a", "{}"]
    );
    assert_eq!(payloads(&read_all(&log, &s1, 0)), ["whole-b"]);
    // Its offsets go to the next records: nothing delivered ever had them.
    assert_eq!(
        log.append(&s1, entry("n1", "next"))
            .wait()
            .unwrap()
            .sequence,
        1
    );
    assert_eq!(
        log.append(&s0, entry("n0", "next"))
            .wait()
            .unwrap()
            .sequence,
        3
    );
}

#[test]
fn a_whole_set_survives_a_reopen() {
    let fs = SimFs::new();
    let (s0, s1) = (ShardRef::new("ns", 0), ShardRef::new("ns", 1));
    let log = open_sim(&fs, LogConfig::default());
    append_set(&log, "one");
    append_set(&log, "two");
    drop(log);
    let log = open_sim(&fs, LogConfig::default());
    assert_eq!(log.recovery_report().truncated_bytes, 0);
    assert_eq!(
        payloads(&read_all(&log, &s0, 0)),
        ["one-a", "{}", "two-a", "{}"]
    );
    assert_eq!(payloads(&read_all(&log, &s1, 0)), ["one-b", "two-b"]);
}
