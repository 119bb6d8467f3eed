//! Recovery case: a torn checkpoint write. A crash leaves the old checkpoint
//! or the new one, never a mix, and never an error.

mod common;

use common::{DIR, open_sim};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use walden::backends::embedded::{EmbeddedLog, LogConfig, LogError};
use walden::entry::ShardRef;
use walden::fs::SimFs;

fn ckpt(name: &str) -> std::path::PathBuf {
    Path::new(DIR).join("checkpoints").join(name)
}

#[test]
fn a_half_written_temp_file_leaves_the_old_checkpoint() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let log = open_sim(&fs, LogConfig::default());
    log.commit("g", &BTreeMap::from([(shard.clone(), 5)]))
        .unwrap();
    drop(log);
    // The crash hit while the next checkpoint was being written.
    let good = fs.read_file(&ckpt("g.ckpt")).unwrap();
    fs.write_file(&ckpt("g.ckpt.tmp"), good[..good.len() / 2].to_vec());

    let log = open_sim(&fs, LogConfig::default());
    assert_eq!(log.committed("g"), BTreeMap::from([(shard, 5)]));
    assert!(
        fs.read_file(&ckpt("g.ckpt.tmp")).is_none(),
        "the torn temp file is removed"
    );
}

#[test]
fn a_power_cut_before_the_rename_is_durable_keeps_old_or_new() {
    let fs = SimFs::new();
    let shard = ShardRef::new("ns", 0);
    let log = open_sim(&fs, LogConfig::default());
    log.commit("g", &BTreeMap::from([(shard.clone(), 5)]))
        .unwrap();
    fs.fail_dir_syncs(true);
    let err = log
        .commit("g", &BTreeMap::from([(shard.clone(), 9)]))
        .unwrap_err();
    assert!(matches!(err, LogError::Io { .. }), "{err}");
    let after_cut = fs.power_cut();
    drop(log);
    let log = open_sim(&after_cut, LogConfig::default());
    let got = log.committed("g")[&shard];
    assert!(got == 5 || got == 9, "got {got}");
}

#[test]
fn a_damaged_checkpoint_is_a_clear_error() {
    let fs = SimFs::new();
    let log = open_sim(&fs, LogConfig::default());
    log.commit("g", &BTreeMap::from([(ShardRef::new("ns", 0), 5)]))
        .unwrap();
    drop(log);
    let mut bytes = fs.read_file(&ckpt("g.ckpt")).unwrap();
    bytes[10] ^= 1;
    fs.write_file(&ckpt("g.ckpt"), bytes);
    let err = EmbeddedLog::open_with_fs(Arc::new(fs.clone()), DIR, LogConfig::default())
        .err()
        .expect("open must fail");
    assert!(matches!(err, LogError::BadCheckpoint { .. }), "{err}");
    assert!(err.to_string().contains("g.ckpt"), "{err}");
}
