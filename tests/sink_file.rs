//! The file target: durable lines that survive a power cut, and a file that
//! log rotation moves or truncates under it.

mod common;

use std::path::Path;
use std::sync::Arc;

use walden::entry::Delivered;
use walden::fs::{Fs, SimFs};
use walden::sinks::{FileSink, Outcome, Sink};

fn batch(from: u64, n: u64) -> Vec<Delivered> {
    (from..from + n)
        .map(|i| common::mutation(i, serde_json::json!({"op": "put", "key": "k", "value": i})))
        .collect()
}

async fn apply(sink: &FileSink, from: u64, n: u64) {
    for r in sink.apply(&batch(from, n)).await {
        assert_eq!(r.unwrap(), Outcome::Applied);
    }
}

/// The sequences of the JSON lines in `bytes`; every line must be whole.
fn sequences(bytes: &[u8]) -> Vec<u64> {
    assert!(
        bytes.is_empty() || bytes.ends_with(b"\n"),
        "a torn last line"
    );
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_slice(l).unwrap_or_else(|e| {
                panic!("not a JSON line ({e}): {}", String::from_utf8_lossy(l))
            });
            v["sequence"].as_u64().unwrap()
        })
        .collect()
}

#[tokio::test]
async fn a_new_file_and_its_lines_survive_a_power_cut() {
    let fs = SimFs::new();
    let dir = Path::new("/out");
    fs.create_dir_all(dir).unwrap();
    let path = dir.join("events.jsonl");
    let sink = FileSink::with_fs("t", &path, Arc::new(fs.clone())).unwrap();
    apply(&sink, 0, 3).await;
    // Flushed means durable: the file's name as well as its bytes.
    sink.flush().await.unwrap();
    let after = fs.power_cut();
    let bytes = after.read_file(&path).expect("the new file survives");
    assert_eq!(sequences(&bytes), [0, 1, 2]);
}

#[tokio::test]
async fn lines_wait_for_the_flush_even_in_a_file_rotated_away() {
    let fs = SimFs::new();
    let dir = Path::new("/out");
    fs.create_dir_all(dir).unwrap();
    let path = dir.join("events.jsonl");
    let sink = FileSink::with_fs("t", &path, Arc::new(fs.clone())).unwrap();
    assert!(sink.flush_within().is_some());
    apply(&sink, 0, 2).await;
    sink.flush().await.unwrap();
    apply(&sink, 2, 2).await;
    // Applied, not flushed: a power cut may take them (the simulated disk
    // keeps nothing unsynced), which is why the applier acknowledges an
    // entry only after a flush.
    assert_eq!(sequences(&fs.power_cut().read_file(&path).unwrap()), [0, 1]);
    // Rotated away before its flush: the flush still covers the old file.
    let rotated = dir.join("events.jsonl.1");
    fs.rename(&path, &rotated).unwrap();
    fs.sync_dir(dir).unwrap();
    apply(&sink, 4, 1).await;
    sink.flush().await.unwrap();
    let after = fs.power_cut();
    assert_eq!(sequences(&after.read_file(&rotated).unwrap()), [0, 1, 2, 3]);
    assert_eq!(sequences(&after.read_file(&path).unwrap()), [4]);
}

#[tokio::test]
async fn a_full_disk_leaves_no_torn_line_for_the_retry_to_follow() {
    let fs = SimFs::new();
    let dir = Path::new("/out");
    fs.create_dir_all(dir).unwrap();
    let path = dir.join("events.jsonl");
    let sink = FileSink::with_fs("t", &path, Arc::new(fs.clone())).unwrap();
    apply(&sink, 0, 2).await;
    let used = fs.read_file(&path).unwrap().len() as u64;
    // Room for half a batch: the write is short, then fails.
    fs.set_capacity(Some(used + 150));
    let failed = sink.apply(&batch(2, 3)).await;
    assert!(
        failed
            .iter()
            .all(|r| r.as_ref().is_err_and(|e| e.is_transient()))
    );
    fs.set_capacity(None);
    apply(&sink, 2, 3).await;
    assert_eq!(sequences(&fs.read_file(&path).unwrap()), [0, 1, 2, 3, 4]);
    // A torn tail left by a crash (nothing of it acknowledged) is cut on
    // open, by a fresh sink.
    let mut torn = fs.read_file(&path).unwrap();
    torn.extend_from_slice(b"{\"namespace\":\"ns\",\"seq");
    fs.write_file(&path, torn);
    let sink = FileSink::with_fs("t", &path, Arc::new(fs.clone())).unwrap();
    apply(&sink, 5, 1).await;
    assert_eq!(sequences(&fs.read_file(&path).unwrap()), [0, 1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn a_file_rotated_away_is_let_go_and_one_truncated_in_place_is_not_holed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let sink = FileSink::new("t", &path).unwrap();
    apply(&sink, 0, 2).await;
    // logrotate's default: rename the file away; the next lines go to a new
    // file at the path.
    let rotated = dir.path().join("events.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    apply(&sink, 2, 2).await;
    assert_eq!(sequences(&std::fs::read(&rotated).unwrap()), [0, 1]);
    assert_eq!(sequences(&std::fs::read(&path).unwrap()), [2, 3]);
    // Deleted: the same.
    std::fs::remove_file(&path).unwrap();
    apply(&sink, 4, 1).await;
    assert_eq!(sequences(&std::fs::read(&path).unwrap()), [4]);
    // copytruncate: the file is emptied in place; the next line goes at its
    // new start, not after a hole of zeros.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    apply(&sink, 5, 1).await;
    assert_eq!(sequences(&std::fs::read(&path).unwrap()), [5]);
}
