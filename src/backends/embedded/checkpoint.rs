//! Consumer-group checkpoints: the next offset to read, per shard.
//!
//! File: `magic "WALDENCK" | u32 n | n × (u16 len, namespace, u32 shard, u64
//! offset) | u32 crc32c`. Written atomically (temp file, fsync, rename, fsync
//! the directory), so a crash leaves either the old or the new checkpoint,
//! never a mix.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tracing::warn;

use super::format::Cursor;
use super::{LogError, Shared, write_atomic};
use crate::entry::ShardRef;
use crate::fs::Fs;

const MAGIC: &[u8; 8] = b"WALDENCK";
const SUFFIX: &str = ".ckpt";

type Offsets = BTreeMap<ShardRef, u64>;

fn valid_group(group: &str) -> bool {
    !group.is_empty()
        && group.len() <= 200
        && group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !group.starts_with('.')
}

/// Merge `offsets` into the group's checkpoint and write it.
pub(crate) fn commit(shared: &Arc<Shared>, group: &str, offsets: &Offsets) -> Result<(), LogError> {
    if !valid_group(group) {
        return Err(LogError::BadGroupName(group.to_string()));
    }
    // One writer at a time, so two commits can't race on the temp file.
    let _guard = shared.checkpoint_write.lock().unwrap();
    let mut merged = shared
        .checkpoints
        .lock()
        .unwrap()
        .get(group)
        .cloned()
        .unwrap_or_default();
    merged.extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
    store(shared, group, merged)
}

/// Write the group's whole checkpoint, then keep it in memory. The caller
/// holds `checkpoint_write`.
fn store(shared: &Arc<Shared>, group: &str, offsets: Offsets) -> Result<(), LogError> {
    let path = shared.checkpoint_dir.join(format!("{group}{SUFFIX}"));
    write_atomic(
        shared.fs.as_ref(),
        &shared.checkpoint_dir,
        &path,
        &encode(&offsets),
        true,
    )?;
    shared
        .checkpoints
        .lock()
        .unwrap()
        .insert(group.to_string(), offsets);
    Ok(())
}

/// Drop `shards` from the group's checkpoint (a target removed from their
/// namespace): retention no longer waits for it there.
pub(crate) fn forget(
    shared: &Arc<Shared>,
    group: &str,
    shards: &[ShardRef],
) -> Result<(), LogError> {
    let _guard = shared.checkpoint_write.lock().unwrap();
    let Some(mut kept) = shared.checkpoints.lock().unwrap().get(group).cloned() else {
        return Ok(());
    };
    let before = kept.len();
    kept.retain(|shard, _| !shards.contains(shard));
    if kept.len() == before {
        return Ok(());
    }
    store(shared, group, kept)
}

/// Load every group's checkpoint. Leftover temp files are torn writes of a
/// checkpoint that was never renamed into place, and are removed.
pub(crate) fn load_all(fs: &dyn Fs, dir: &Path) -> Result<BTreeMap<String, Offsets>, LogError> {
    let mut out = BTreeMap::new();
    for name in fs.list(dir).map_err(LogError::io("list", dir))? {
        let path = dir.join(&name);
        if name.ends_with(".tmp") {
            warn!(path = %path.display(), "Removing a torn checkpoint write.");
            fs.remove_file(&path)
                .map_err(LogError::io("remove", &path))?;
            continue;
        }
        let Some(group) = name.strip_suffix(SUFFIX) else {
            continue;
        };
        let file = fs.open(&path).map_err(LogError::io("open", &path))?;
        let mut bytes = vec![0; file.len().map_err(LogError::io("stat", &path))? as usize];
        file.read_exact_at(&mut bytes, 0)
            .map_err(LogError::io("read", &path))?;
        let offsets = decode(&bytes).map_err(|reason| LogError::BadCheckpoint {
            path: path.clone(),
            reason: reason.to_string(),
        })?;
        out.insert(group.to_string(), offsets);
    }
    Ok(out)
}

fn encode(offsets: &Offsets) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&(offsets.len() as u32).to_le_bytes());
    for (shard, offset) in offsets {
        b.extend_from_slice(&(shard.namespace.len() as u16).to_le_bytes());
        b.extend_from_slice(shard.namespace.as_bytes());
        b.extend_from_slice(&shard.shard.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Result<Offsets, &'static str> {
    if b.len() < MAGIC.len() + 8 || &b[..8] != MAGIC {
        return Err("not a checkpoint file");
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
        return Err("checksum mismatch");
    }
    let mut r = Cursor {
        buf: &body[8..],
        pos: 0,
    };
    let bad = |_| "malformed entry";
    let n = r.u32().map_err(bad)?;
    let mut out = Offsets::new();
    for _ in 0..n {
        let ns = r.string16().map_err(bad)?;
        let shard = r.u32().map_err(bad)?;
        let offset = r.u64().map_err(bad)?;
        out.insert(ShardRef::new(ns, shard), offset);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_damage() {
        let mut o = Offsets::new();
        o.insert(ShardRef::new("a", 1), 5);
        o.insert(ShardRef::new("b", 0), 9);
        let bytes = encode(&o);
        assert_eq!(decode(&bytes).unwrap(), o);
        let mut bad = bytes.clone();
        bad[12] ^= 1;
        assert!(decode(&bad).is_err());
    }

    #[test]
    fn group_names_are_checked() {
        assert!(valid_group("orders-consumer_1.v2"));
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(!valid_group(bad), "{bad:?}");
        }
    }
}
