//! The fuzzers' corpora (`fuzz/corpus/<target>/`) and the crashes they found
//! (`fuzz/regressions/<target>/`, each fixed), replayed through the same
//! entry points on stable Rust: none may panic.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs = 0;
    for dir in [
        fuzz.join("corpus").join(target),
        fuzz.join("regressions").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{} panics", path.display());
            inputs += 1;
        }
    }
    assert!(inputs > 0, "fuzz/corpus/{target} holds no inputs");
    eprintln!("{target}: {inputs} inputs");
}

#[test]
fn write_body() {
    replay("write_body", walden::fuzz::write_body);
}

#[test]
fn mutation_payload() {
    replay("mutation_payload", walden::fuzz::mutation_payload);
}

#[test]
fn config() {
    replay("config", walden::fuzz::config);
}

#[test]
fn log_recovery() {
    replay("log_recovery", |data| {
        walden::fuzz::log_recovery(data);
    });
    // The harness reaches the records: a whole segment reads back all 24,
    // once stopping at corruption and once skipping it.
    assert_eq!(walden::fuzz::log_recovery(&log_segment()), 48);
}

#[test]
fn dlq_letters() {
    replay("dlq_letters", walden::fuzz::dlq_letters);
}

/// The first segment of a real log: 24 entries across four shards of `ns`.
fn log_segment() -> Vec<u8> {
    use std::sync::Arc;
    use walden::backends::embedded::{EmbeddedLog, LogConfig};
    use walden::entry::{Entry, ShardRef};

    let fs = walden::fs::SimFs::new();
    let log =
        EmbeddedLog::open_with_fs(Arc::new(fs.clone()), "/data", LogConfig::default()).unwrap();
    for i in 0..24u32 {
        let entry = Entry {
            id: format!("e{i}"),
            key: Some(format!("k{}", i % 3)),
            headers: vec![("h".into(), "v".into())],
            payload: bytes::Bytes::from(format!("{{\"n\":{i}}}")),
            timestamp_ms: 1_700_000_000_000 + u64::from(i),
            due_ms: 0,
        };
        log.append(&ShardRef::new("ns", i % 4), entry)
            .wait()
            .unwrap();
    }
    log.close();
    let mut names = walden::fs::Fs::list(&fs, Path::new("/data/log")).unwrap();
    names.sort();
    let first = names.iter().find(|n| n.ends_with(".seg")).unwrap();
    fs.read_file(&Path::new("/data/log").join(first)).unwrap()
}

/// Writes seeds for `log_recovery`: a real segment, whole and cut short.
/// Run with `cargo test --test fuzz_corpora -- --ignored` after a format
/// change, then fuzz from them.
#[test]
#[ignore]
fn write_log_seeds() {
    let segment = log_segment();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/log_recovery");
    for (name, bytes) in [
        ("seed-segment", &segment[..]),
        ("seed-segment-torn", &segment[..segment.len() * 2 / 3]),
        ("seed-header-only", &segment[..segment.len().min(64)]),
    ] {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
