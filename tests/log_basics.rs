//! The embedded log on the real filesystem: appends, reads, reopen, rolls,
//! the time index, checkpoints and retention.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{entry, payloads, read_all};
use walden::backends::embedded::{
    EmbeddedLog, FsyncMode, HardMax, LogConfig, LogError, Record, Retention, ShardReader,
};
use walden::entry::{Durable, ShardRef};

fn small_segments() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        ..LogConfig::default()
    }
}

#[test]
fn appends_are_durable_dense_and_read_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap();
    let a = ShardRef::new("orders", 0);
    let b = ShardRef::new("orders", 1);
    for i in 0..10 {
        let ack = log
            .append(&a, entry(format!("a{i}"), format!("a{i}")))
            .wait()
            .unwrap();
        assert_eq!(ack.sequence, i);
        assert_eq!(ack.durable, Durable::True);
        let ack = log
            .append(&b, entry(format!("b{i}"), format!("b{i}")))
            .wait()
            .unwrap();
        assert_eq!(ack.sequence, i);
    }
    let got = read_all(&log, &a, 0);
    assert_eq!(got.len(), 10);
    assert!(got.iter().enumerate().all(|(i, r)| r.offset == i as u64));
    assert_eq!(payloads(&got)[3], "a3");
    assert_eq!(got[3].entry.key.as_deref(), Some("k"));
    assert_eq!(
        got[3].entry.headers,
        vec![("h".to_string(), "v".to_string())]
    );
    assert_eq!(payloads(&read_all(&log, &b, 7)), vec!["b7", "b8", "b9"]);
    assert!(log.stats().fsyncs.get() >= 1);
}

/// A shard's readers (one per target) reading a backlog share what the
/// first reads; each still gets every record once, in order, across segment
/// rolls and other shards' records, and goes on reading the journal after
/// what it took.
#[test]
fn readers_of_one_shard_share_reads_and_each_gets_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), small_segments()).unwrap();
    let (a, b) = (ShardRef::new("ns", 0), ShardRef::new("ns", 1));
    append_both(&log, &a, &b, 0..200);
    // Opened after the writes: nothing is in the committer's tail for them.
    let mut first = log.reader(&a, 0).unwrap();
    let mut second = log.reader(&a, 0).unwrap();
    let (mut got_first, mut got_second) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        // The first reads in small steps, the second in larger ones: it
        // takes what the first read, then overtakes it.
        for _ in 0..3 {
            got_first.extend(first.read_batch(7).unwrap());
        }
        got_second.extend(second.read_batch(30).unwrap());
    }
    drain(&mut first, &mut got_first);
    drain(&mut second, &mut got_second);
    let want: Vec<String> = (0..200).map(|n| format!("a{n}")).collect();
    assert_eq!(payloads(&got_first), want);
    assert_eq!(payloads(&got_second), want);
    assert!(
        got_second
            .iter()
            .enumerate()
            .all(|(i, r)| r.offset == i as u64)
    );
    // Whichever reader is ahead reads each record from the journal; the
    // other takes it.
    assert_eq!(log.stats().shared_reads.get(), 200);
    assert_eq!(log.stats().tail_reads.get(), 0);
    // A reader opened later, behind both, reads the journal itself.
    assert_eq!(payloads(&read_all(&log, &a, 150)), want[150..]);
}

/// Readers that keep up take what the committer just made durable, with no
/// read of the journal: the same records the journal holds, across segment
/// rolls, each reader all of them in order.
#[test]
fn readers_that_keep_up_take_the_committers_records() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), small_segments()).unwrap();
    let (a, b) = (ShardRef::new("ns", 0), ShardRef::new("ns", 1));
    let mut first = log.reader(&a, 0).unwrap();
    let mut second = log.reader(&a, 0).unwrap();
    let (mut got_first, mut got_second) = (Vec::new(), Vec::new());
    for round in 0..5 {
        append_both(&log, &a, &b, round * 40..(round + 1) * 40);
        drain(&mut first, &mut got_first);
        for _ in 0..2 {
            got_second.extend(second.read_batch(15).unwrap());
        }
    }
    drain(&mut second, &mut got_second);
    assert!(log.stats().segments_rolled.get() > 2);
    assert_eq!(log.stats().tail_reads.get(), 400);
    assert_eq!(log.stats().shared_reads.get(), 0);
    // Exactly what a reader of the journal decodes. With the shard's
    // readers closed, nothing is kept: the next reader reads the journal.
    drop((first, second));
    let journal = read_all(&log, &a, 0);
    assert_eq!(log.stats().tail_reads.get(), 400);
    assert_eq!(journal.len(), 200);
    assert_eq!(got_first, journal);
    assert_eq!(got_second, journal);
}

/// Records `range` of shard `a` (payload `a<n>`), each beside one of `b`.
fn append_both(log: &EmbeddedLog, a: &ShardRef, b: &ShardRef, range: std::ops::Range<u64>) {
    for n in range {
        log.append(a, entry(format!("a{n}"), format!("a{n}")))
            .wait()
            .unwrap();
        log.append(b, entry(format!("b{n}"), [b'x'; 50]))
            .wait()
            .unwrap();
    }
}

/// Read what `reader` has left into `got`.
fn drain(reader: &mut ShardReader, got: &mut Vec<Record>) {
    loop {
        let batch = reader.read_batch(11).unwrap();
        if batch.is_empty() {
            return;
        }
        got.extend(batch);
    }
}

#[test]
fn offsets_continue_after_reopen_and_across_segment_rolls() {
    let dir = tempfile::tempdir().unwrap();
    let shard = ShardRef::new("ns", 2);
    {
        let log = EmbeddedLog::open(dir.path(), small_segments()).unwrap();
        for i in 0..200 {
            log.append(&shard, entry(i.to_string(), [b'x'; 100]))
                .wait()
                .unwrap();
        }
        assert!(
            log.stats().segments_rolled.get() > 3,
            "segments should roll"
        );
    }
    let log = EmbeddedLog::open(dir.path(), small_segments()).unwrap();
    assert_eq!(
        log.recovery_report().rebuilt_indexes,
        0,
        "sealed segments keep their index"
    );
    assert_eq!(log.next_offset(&shard), 200);
    let ack = log.append(&shard, entry("next", "n")).wait().unwrap();
    assert_eq!(ack.sequence, 200);
    let all = read_all(&log, &shard, 0);
    assert_eq!(all.len(), 201);
    assert!(all.iter().enumerate().all(|(i, r)| r.offset == i as u64));
    // Seeking into the middle of a sealed segment uses the sparse index.
    assert_eq!(read_all(&log, &shard, 150)[0].offset, 150);
}

#[test]
fn a_missing_index_file_is_rebuilt_from_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let shard = ShardRef::new("ns", 0);
    {
        let log = EmbeddedLog::open(dir.path(), small_segments()).unwrap();
        for i in 0..100 {
            log.append(&shard, entry(i.to_string(), [b'x'; 100]))
                .wait()
                .unwrap();
        }
    }
    let idx = dir.path().join("log").join(format!("{:020}.idx", 1));
    std::fs::remove_file(&idx).unwrap();
    let log = EmbeddedLog::open(dir.path(), small_segments()).unwrap();
    assert_eq!(log.recovery_report().rebuilt_indexes, 1);
    assert!(idx.exists());
    assert_eq!(read_all(&log, &shard, 0).len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tailing_reader_wakes_for_new_durable_records() {
    let dir = tempfile::tempdir().unwrap();
    let log = std::sync::Arc::new(EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap());
    let shard = ShardRef::new("ns", 0);
    let mut reader = log.reader(&shard, 0).unwrap();
    let writer = {
        let log = log.clone();
        let shard = shard.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            log.append(&shard, entry("1", "late")).await.unwrap()
        })
    };
    let batch = tokio::time::timeout(Duration::from_secs(5), reader.next_batch(10))
        .await
        .expect("reader woke")
        .unwrap();
    assert_eq!(payloads(&batch), vec!["late"]);
    writer.await.unwrap();
}

#[test]
fn the_time_index_finds_the_first_record_at_or_after_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), small_segments()).unwrap();
    let shard = ShardRef::new("ns", 0);
    let mut stamps = Vec::new();
    for i in 0..300 {
        let ack = log
            .append(&shard, entry(i.to_string(), [b'y'; 50]))
            .wait()
            .unwrap();
        stamps.push(ack.timestamp_ms);
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(3));
        }
    }
    for probe in [0usize, 49, 50, 151, 299] {
        let ts = stamps[probe];
        let want = stamps.iter().position(|&t| t >= ts).unwrap() as u64;
        assert_eq!(
            log.offset_for_time(&shard, ts).unwrap(),
            want,
            "probe {probe}"
        );
    }
    assert_eq!(log.offset_for_time(&shard, u64::MAX).unwrap(), 300);
    assert_eq!(log.offset_for_time(&shard, 0).unwrap(), 0);
}

#[test]
fn reading_outside_the_log_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap();
    let shard = ShardRef::new("ns", 0);
    log.append(&shard, entry("1", "x")).wait().unwrap();
    let err = log.reader(&shard, 5).err().unwrap();
    assert!(
        matches!(
            err,
            LogError::OffsetOutOfRange {
                requested: 5,
                next: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn checkpoints_survive_reopen_and_merge_per_shard() {
    let dir = tempfile::tempdir().unwrap();
    let a = ShardRef::new("ns", 0);
    let b = ShardRef::new("ns", 1);
    {
        let log = EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap();
        log.commit("g1", &BTreeMap::from([(a.clone(), 5)])).unwrap();
        log.commit("g1", &BTreeMap::from([(b.clone(), 7)])).unwrap();
        assert!(matches!(
            log.commit("../evil", &BTreeMap::new()),
            Err(LogError::BadGroupName(_))
        ));
    }
    let log = EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap();
    assert_eq!(log.committed("g1"), BTreeMap::from([(a, 5), (b, 7)]));
    assert!(log.committed("other").is_empty());
}

#[tokio::test]
async fn retention_keeps_uncommitted_segments_until_the_hard_cap() {
    let dir = tempfile::tempdir().unwrap();
    let shard = ShardRef::new("ns", 0);
    let config = LogConfig {
        retention: Retention {
            max_bytes: Some(1),
            ..Retention::default()
        },
        ..small_segments()
    };
    let log = EmbeddedLog::open(dir.path(), config.clone()).unwrap();
    for i in 0..100 {
        log.append(&shard, entry(i.to_string(), [b'x'; 100]))
            .await
            .unwrap();
    }
    // No consumer group has committed anything: nothing may go.
    let report = log.enforce_retention().await.unwrap();
    assert!(report.deleted_segments.is_empty());
    assert_eq!(log.earliest_offset(&shard), 0);

    // A group commits up to 40: only segments wholly below 40 may go.
    log.commit("g", &BTreeMap::from([(shard.clone(), 40)]))
        .unwrap();
    let report = log.enforce_retention().await.unwrap();
    assert!(!report.deleted_segments.is_empty());
    assert!(report.forced.is_empty());
    let earliest = log.earliest_offset(&shard);
    assert!(earliest > 0 && earliest <= 40, "earliest {earliest}");
    assert_eq!(read_all(&log, &shard, 40).len(), 60);
    drop(log);

    // Offsets stay monotonic after the segments that held them are gone.
    let log = EmbeddedLog::open(dir.path(), config).unwrap();
    assert_eq!(
        log.append(&shard, entry("x", "x")).await.unwrap().sequence,
        100
    );
    drop(log);

    // A hard cap that drops the oldest deletes even uncommitted segments,
    // and counts it.
    let hard = LogConfig {
        retention: Retention {
            hard_max_bytes: Some(1),
            on_hard_max: HardMax::DropOldest,
            ..Retention::default()
        },
        ..small_segments()
    };
    let log = EmbeddedLog::open(dir.path(), hard).unwrap();
    let report = log.enforce_retention().await.unwrap();
    assert!(!report.forced.is_empty());
    assert_eq!(
        log.stats().retention_forced.get(),
        report.forced.len() as u64
    );
    assert_eq!(log.next_offset(&shard), 101);
}

#[test]
fn interval_mode_acknowledges_only_after_the_timed_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        fsync: FsyncMode::Interval(Duration::from_millis(30)),
        ..LogConfig::default()
    };
    let log = EmbeddedLog::open(dir.path(), config).unwrap();
    let shard = ShardRef::new("ns", 0);
    let pending: Vec<_> = (0..50)
        .map(|i| log.append(&shard, entry(i.to_string(), "x")))
        .collect();
    for (i, p) in pending.into_iter().enumerate() {
        let ack = p.wait().unwrap();
        assert_eq!((ack.sequence, ack.durable), (i as u64, Durable::True));
    }
    // Far fewer fsyncs than appends.
    assert!(log.stats().fsyncs.get() < 50);
}

#[test]
fn never_mode_answers_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        fsync: FsyncMode::Never,
        ..LogConfig::default()
    };
    let log = EmbeddedLog::open(dir.path(), config).unwrap();
    let shard = ShardRef::new("ns", 0);
    let ack = log.append(&shard, entry("1", "x")).wait().unwrap();
    assert_eq!(ack.durable, Durable::Unknown);
    assert_eq!(log.stats().fsyncs.get(), 0);
    assert_eq!(read_all(&log, &shard, 0).len(), 1);
}

#[test]
fn an_oversized_id_is_refused_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap();
    let shard = ShardRef::new("ns", 0);
    let err = log
        .append(&shard, entry("i".repeat(100_000), "x"))
        .wait()
        .unwrap_err();
    assert!(matches!(err, LogError::InvalidRecord(_)), "{err}");
    assert_eq!(err.durable(), Durable::False);
    // The refused record took no offset.
    assert_eq!(
        log.append(&shard, entry("ok", "x"))
            .wait()
            .unwrap()
            .sequence,
        0
    );
}

#[test]
fn age_retention_runs_on_its_own_and_only_past_commits() {
    let dir = tempfile::tempdir().unwrap();
    let shard = ShardRef::new("ns", 0);
    let config = LogConfig {
        retention: Retention {
            max_age: Some(Duration::from_millis(100)),
            ..Retention::default()
        },
        ..small_segments()
    };
    let log = EmbeddedLog::open(dir.path(), config).unwrap();
    for i in 0..100 {
        log.append(&shard, entry(i.to_string(), [b'x'; 100]))
            .wait()
            .unwrap();
    }
    log.commit("g", &BTreeMap::from([(shard.clone(), 100)]))
        .unwrap();
    // The committer checks age once a second with nothing else to do.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while log.stats().retention_deleted.get() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        log.stats().retention_deleted.get() > 0,
        "old segments were deleted"
    );
    assert_eq!(log.stats().retention_forced.get(), 0);
    // The active segment stays, and so do the offsets.
    assert_eq!(
        log.append(&shard, entry("n", "n")).wait().unwrap().sequence,
        100
    );
}

#[test]
fn a_read_stops_at_its_byte_limit_but_always_brings_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap();
    let shard = ShardRef::new("ns", 0);
    for i in 0..10 {
        log.append(&shard, entry(i.to_string(), vec![b'x'; 1000]))
            .wait()
            .unwrap();
    }
    let mut reader = log.reader(&shard, 0).unwrap();
    let limit = |bytes| walden::backends::Limit {
        entries: 100,
        bytes,
    };
    assert_eq!(reader.read_within(limit(2500)).unwrap().len(), 3);
    assert_eq!(reader.read_within(limit(1)).unwrap().len(), 1);
    assert_eq!(reader.read_within(limit(usize::MAX)).unwrap().len(), 6);
}
