//! Retention: delete the oldest sealed segments by age and by total size.
//!
//! A segment is deleted only when every consumer group that reads a shard
//! has committed past that shard's records in it. Past `hard_max_bytes`, committed segments go first;
//! with [`HardMax::DropOldest`] uncommitted ones go too, and each such
//! deletion is logged and counted, while with [`HardMax::RefuseWrites`] (the
//! default) the committer refuses appends instead. Segments are deleted
//! oldest first and the active segment never, so the remaining segments stay
//! numbered without gaps.

use std::time::Duration;

use tracing::{info, warn};

use super::{HardMax, LogError, Shared, index_path};
use crate::entry::now_ms;

/// What one retention pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub deleted_segments: Vec<u64>,
    pub deleted_bytes: u64,
    /// Deleted although a consumer group had not committed all of it.
    pub forced: Vec<u64>,
}

/// Delete what the limits allow. `need` is room wanted under the hard cap
/// (an append that does not fit yet): committed segments go to make it.
pub(crate) fn apply(shared: &Shared, active: u64, need: u64) -> Result<RetentionReport, LogError> {
    let limits = shared.config.retention;
    let mut report = RetentionReport::default();
    if limits.max_age.is_none() && limits.max_bytes.is_none() && limits.hard_max_bytes.is_none() {
        return Ok(report);
    }
    let now = now_ms();
    loop {
        let (segment, len, committed, may_force) = {
            let idx = shared.index.read().unwrap();
            let Some((&segment, info)) = idx.segments.iter().next() else {
                break;
            };
            if segment >= active || !info.sealed {
                break;
            }
            let total = idx.total_bytes();
            let too_old = limits.max_age.is_some_and(|age| {
                info.max_ts < now.saturating_sub(Duration::as_millis(&age) as u64)
            });
            let too_big = limits.max_bytes.is_some_and(|max| total > max);
            let over_hard = limits
                .hard_max_bytes
                .is_some_and(|max| total.saturating_add(need) > max);
            let may_force = over_hard && limits.on_hard_max == HardMax::DropOldest;
            if !(too_old || too_big || over_hard) {
                break;
            }
            let groups = shared.checkpoints.lock().unwrap();
            // Every shard with records here must be committed past them by
            // every group that reads it (each target of its namespace has
            // one); a shard no group reads yet is not committed.
            let committed = idx.segment_part(segment).iter().all(|(shard, part)| {
                let mut readers = groups.values().filter_map(|g| g.get(shard)).peekable();
                readers.peek().is_some() && readers.all(|&next| next > part.last)
            });
            (segment, info.len, committed, may_force)
        };
        if !committed && !may_force {
            break;
        }
        if !committed {
            warn!(
                segment,
                bytes = len,
                "Deleting a segment that a consumer group has not committed: the hard size cap was reached."
            );
            shared.stats.retention_forced.inc();
            report.forced.push(segment);
        }
        delete(shared, segment)?;
        shared.stats.retention_deleted.inc();
        report.deleted_segments.push(segment);
        report.deleted_bytes += len;
    }
    if !report.deleted_segments.is_empty() {
        info!(segments = ?report.deleted_segments, bytes = report.deleted_bytes, "Retention deleted segments.");
    }
    Ok(report)
}

fn delete(shared: &Shared, segment: u64) -> Result<(), LogError> {
    let fs = shared.fs.as_ref();
    // Forget it first, so no new reader starts there.
    shared.index.write().unwrap().remove_segment(segment);
    let seg = shared.segment_path(segment);
    fs.remove_file(&seg).map_err(LogError::io("remove", &seg))?;
    let idx = index_path(&shared.log_dir, segment);
    match fs.remove_file(&idx) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(LogError::io("remove", &idx)(e));
        }
        _ => {}
    }
    fs.sync_dir(&shared.log_dir)
        .map_err(LogError::io("fsync directory", &shared.log_dir))
}
