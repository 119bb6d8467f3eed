//! Recovery case: a segment file is missing from the middle of the log.

mod common;

use common::{entry, segment, small_segments};
use walden::backends::embedded::{EmbeddedLog, LogError};
use walden::entry::ShardRef;

#[test]
fn a_missing_segment_is_a_clear_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let shard = ShardRef::new("ns", 0);
    {
        let log = EmbeddedLog::open(dir.path(), small_segments()).unwrap();
        for i in 0..100 {
            log.append(&shard, entry(i.to_string(), [b'x'; 100]))
                .wait()
                .unwrap();
        }
        assert!(log.stats().segments_rolled.get() >= 3);
    }
    std::fs::remove_file(segment(dir.path(), 2)).unwrap();
    let err = EmbeddedLog::open(dir.path(), small_segments())
        .err()
        .expect("open must fail");
    match &err {
        LogError::MissingSegment { id, path } => {
            assert_eq!(*id, 2);
            assert_eq!(path, &segment(dir.path(), 2));
        }
        other => panic!("expected MissingSegment, got {other}"),
    }
    assert!(err.to_string().contains("segment 2 is missing"), "{err}");
}
