//! Opening a log: find the segments, load the indexes of sealed ones, scan
//! the active one, and cut off a torn tail.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tracing::{debug, error, info, warn};

use super::format::{self, Claimed, Frame, SegmentHeader};
use super::index::{self, DurableMark, Index, SegmentInfo, SparsePoint};
use super::{FsyncMode, LogConfig, LogError, index_path, segment_path, write_atomic};
use crate::entry::{ShardRef, now_ms};
use crate::fs::{Fs, FsFile};

/// What the committer needs to continue writing where the log left off.
pub(crate) struct WriterState {
    pub next_offsets: HashMap<ShardRef, u64>,
    pub segment: u64,
    pub file: Arc<dyn FsFile>,
    /// End of the active segment: where the next write goes.
    pub pos: u64,
    /// The file's length: written, or zero-filled ahead of `pos`.
    pub filled: u64,
    pub last_ts: u64,
}

/// What recovery found and did.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    /// Bytes of the active segment that were scanned.
    pub scanned_bytes: u64,
    /// Bytes cut off the end of the active segment (a torn tail).
    pub truncated_bytes: u64,
    /// Damaged frames found in the active segment (left in place).
    pub corrupt_frames: Vec<CorruptFrame>,
    /// Sealed segments whose `.idx` file had to be rebuilt by a scan.
    pub rebuilt_indexes: usize,
    /// The active segment's header was torn (a crash while rolling) and was
    /// written again.
    pub rewrote_header: bool,
}

#[derive(Clone, Debug)]
pub struct CorruptFrame {
    pub segment: u64,
    pub position: u64,
    /// The frame's own (unverified) claim about whose record it was.
    pub claimed: Option<Claimed>,
    pub reason: String,
}

pub(crate) struct Recovered {
    pub index: Index,
    pub writer: WriterState,
    pub report: RecoveryReport,
}

pub(crate) fn recover(
    fs: &dyn Fs,
    log_dir: &Path,
    config: &LogConfig,
) -> Result<Recovered, LogError> {
    let sync = config.fsync != FsyncMode::Never;
    let names = fs.list(log_dir).map_err(LogError::io("list", log_dir))?;
    let mut ids = Vec::new();
    for name in &names {
        if name.ends_with(".tmp") {
            // A torn index write; the segment is scanned instead.
            let p = log_dir.join(name);
            fs.remove_file(&p).map_err(LogError::io("remove", &p))?;
        } else if let Some(Ok(id)) = name.strip_suffix(".seg").map(str::parse::<u64>) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    for pair in ids.windows(2) {
        if pair[1] != pair[0] + 1 {
            let id = pair[0] + 1;
            return Err(LogError::MissingSegment {
                id,
                path: segment_path(log_dir, id),
            });
        }
    }

    let mut report = RecoveryReport {
        segments: ids.len(),
        ..Default::default()
    };
    let mut next: HashMap<ShardRef, u64> = HashMap::new();
    let mut index = Index::new(DurableMark { segment: 1, end: 0 });

    let Some((&last, sealed)) = ids.split_last() else {
        let (file, header_len) = create_segment(fs, log_dir, 1, &next, sync)?;
        index
            .segments
            .insert(1, active_info(header_len, header_len, 0));
        index.mark = DurableMark {
            segment: 1,
            end: header_len,
        };
        report.segments = 1;
        let writer = WriterState {
            next_offsets: next,
            segment: 1,
            file,
            pos: header_len,
            filled: header_len,
            last_ts: 0,
        };
        return Ok(Recovered {
            index,
            writer,
            report,
        });
    };

    for &id in sealed {
        let path = segment_path(log_dir, id);
        let file = fs.open(&path).map_err(LogError::io("open", &path))?;
        let mut len = file.len().map_err(LogError::io("stat", &path))?;
        let (header, header_len) = read_header(file.as_ref(), &path, len)?;
        merge_table(&mut next, &header);
        let idx = fs
            .open(&index_path(log_dir, id))
            .ok()
            .and_then(|f| read_all(f.as_ref()).ok())
            .and_then(|b| index::decode_idx(&b).ok())
            .filter(|idx| idx.len == len);
        let (parts, max_ts) = match idx {
            Some(idx) => (idx.parts, idx.max_ts),
            None => {
                warn!(
                    segment = id,
                    "Segment index missing or stale; rebuilding it."
                );
                let bytes = read_all(file.as_ref()).map_err(LogError::io("read", &path))?;
                let mut scratch = Index::new(index.mark);
                scratch.segments.insert(id, active_info(header_len, len, 0));
                let end = scan(
                    &bytes,
                    header_len as usize,
                    id,
                    &mut scratch,
                    &mut |_, _| {},
                )
                .end;
                // A crash while sealing can leave the preallocated zeros on.
                if end < bytes.len() && zeros(&bytes[end..]) {
                    file.set_len(end as u64)
                        .map_err(LogError::io("truncate", &path))?;
                    if sync {
                        file.sync_data().map_err(LogError::io("fsync", &path))?;
                    }
                    len = end as u64;
                }
                let parts = scratch.segment_part(id);
                let max_ts = scratch.segments[&id].max_ts;
                let idx_bytes = index::encode_idx(len, max_ts, &parts);
                write_atomic(fs, log_dir, &index_path(log_dir, id), &idx_bytes, sync)?;
                report.rebuilt_indexes += 1;
                (parts, max_ts)
            }
        };
        for (shard, part) in parts {
            let n = next.entry(shard.clone()).or_insert(0);
            *n = (*n).max(part.last + 1);
            index.note_next(&shard, part.last + 1);
            index.shards.entry(shard).or_default().segs.insert(id, part);
        }
        index.segments.insert(
            id,
            SegmentInfo {
                header_len,
                len,
                sealed: true,
                max_ts,
            },
        );
    }

    // The active segment: the only one scanned.
    let path = segment_path(log_dir, last);
    let file = fs.open(&path).map_err(LogError::io("open", &path))?;
    let bytes = read_all(file.as_ref()).map_err(LogError::io("read", &path))?;
    let header_len = match format::decode_segment_header(&bytes) {
        Ok((header, len)) => {
            merge_table(&mut next, &header);
            len as u64
        }
        // A crash while rolling can leave a new segment with a torn header.
        // Nothing can have been written after it, since records follow only a
        // durable header; anything else is damage, not a torn write.
        Err(e) if format::find_next_valid(&bytes, 0).is_none() => {
            warn!(segment = last, error = %e, "Active segment header is torn; writing it again.");
            report.rewrote_header = true;
            let header = header_bytes(last, &next);
            file.set_len(0).map_err(LogError::io("truncate", &path))?;
            file.write_all_at(&header, 0)
                .map_err(LogError::io("write header", &path))?;
            if sync {
                file.sync_data().map_err(LogError::io("fsync", &path))?;
            }
            let n = header.len() as u64;
            index.segments.insert(last, active_info(n, n, 0));
            return Ok(finish(index, next, last, file, n, report));
        }
        Err(source) => return Err(LogError::BadSegmentHeader { path, source }),
    };

    index
        .segments
        .insert(last, active_info(header_len, header_len, 0));
    let outcome = scan(
        &bytes,
        header_len as usize,
        last,
        &mut index,
        &mut |record, _| {
            let shard = ShardRef {
                namespace: record.namespace.clone(),
                shard: record.shard,
            };
            let n = next.entry(shard).or_insert(0);
            *n = (*n).max(record.offset + 1);
        },
    );
    report.scanned_bytes = bytes.len() as u64;
    for frame in &outcome.corrupt {
        error!(
            segment = frame.segment,
            position = frame.position,
            reason = %frame.reason,
            "Corrupt record in the active segment; readers will not deliver it."
        );
        // If the damaged frame names the very offset its shard expects next,
        // reserve that offset so it is never given to a different record.
        if let Some(c) = &frame.claimed {
            let shard = ShardRef::new(c.namespace.as_str(), c.shard);
            if next.get(&shard) == Some(&c.offset) {
                next.insert(shard.clone(), c.offset + 1);
                index.note_next(&shard, c.offset + 1);
            }
        }
    }
    report.corrupt_frames = outcome.corrupt;
    let end = outcome.end as u64;
    if end < bytes.len() as u64 {
        report.truncated_bytes = bytes.len() as u64 - end;
        if zeros(&bytes[end as usize..]) {
            debug!(segment = last, at = end, "Trimming the zero-filled tail.");
        } else {
            info!(
                segment = last,
                at = end,
                bytes = report.truncated_bytes,
                "Truncating a torn tail."
            );
        }
        file.set_len(end).map_err(LogError::io("truncate", &path))?;
    }
    // What the scan keeps may be only in the page cache (a kill between a
    // write and its fsync). Readers will see it, so it must survive a power
    // cut before they do, or its offsets could be given to other records.
    if sync {
        file.sync_data().map_err(LogError::io("fsync", &path))?;
    }
    if let Some(info) = index.segments.get_mut(&last) {
        info.len = end;
    }
    Ok(finish(index, next, last, file, end, report))
}

fn finish(
    mut index: Index,
    next: HashMap<ShardRef, u64>,
    segment: u64,
    file: Arc<dyn FsFile>,
    pos: u64,
    report: RecoveryReport,
) -> Recovered {
    for (shard, n) in &next {
        index.note_next(shard, *n);
    }
    index.mark = DurableMark { segment, end: pos };
    let last_ts = index.segments.values().map(|s| s.max_ts).max().unwrap_or(0);
    Recovered {
        index,
        writer: WriterState {
            next_offsets: next,
            segment,
            file,
            pos,
            filled: pos,
            last_ts,
        },
        report,
    }
}

fn active_info(header_len: u64, len: u64, max_ts: u64) -> SegmentInfo {
    SegmentInfo {
        header_len,
        len,
        sealed: false,
        max_ts,
    }
}

fn merge_table(next: &mut HashMap<ShardRef, u64>, header: &SegmentHeader) {
    for (ns, shard, n) in &header.next_offsets {
        let e = next.entry(ShardRef::new(ns.clone(), *shard)).or_insert(0);
        *e = (*e).max(*n);
    }
}

pub(crate) struct ScanOutcome {
    /// Where the valid data ends: after the last valid frame.
    pub end: usize,
    pub corrupt: Vec<CorruptFrame>,
}

/// A set of mutations read up to, not yet including, its marker.
struct OpenSet {
    id: String,
    /// Where its first frame starts.
    start: usize,
    frames: Vec<(format::Record, usize)>,
}

/// Walk the frames of one segment, adding each valid record to `index`.
/// A bad frame followed by a valid one is recorded as corruption and stepped
/// over; a bad frame with nothing valid after it ends the scan (a torn tail).
///
/// A set of mutations is written in one write with its marker last, and
/// answered only once all of it is durable. Its frames are indexed when its
/// marker is read; a set that the valid data ends in, before its marker, was
/// never acknowledged, and the valid data ends where it began, so it is cut
/// off with the torn tail and nothing of it is ever delivered.
fn scan(
    buf: &[u8],
    header_len: usize,
    segment: u64,
    index: &mut Index,
    on_record: &mut dyn FnMut(&format::Record, usize),
) -> ScanOutcome {
    let mut pos = header_len;
    let mut end = header_len;
    let mut corrupt = Vec::new();
    let mut open: Option<OpenSet> = None;
    let mut keep = |record: &format::Record, at: usize, index: &mut Index| {
        on_record(record, at);
        let shard = ShardRef {
            namespace: record.namespace.clone(),
            shard: record.shard,
        };
        let point = SparsePoint {
            offset: record.offset,
            pos: at as u64,
            ts: record.entry.timestamp_ms,
        };
        index.add(segment, &shard, point);
    };
    // Each shard's next offset as the frames read so far leave it: a valid
    // frame below it (a copy, or bytes moved by damage) is not indexed.
    let mut next: HashMap<ShardRef, u64> = HashMap::new();
    while pos < buf.len() {
        match format::decode_frame(&buf[pos..]) {
            Frame::Valid { record, len } => {
                let shard = ShardRef {
                    namespace: record.namespace.clone(),
                    shard: record.shard,
                };
                let expected = next
                    .get(&shard)
                    .copied()
                    .unwrap_or_else(|| index.shards.get(&shard).map_or(0, |s| s.next_offset));
                if record.offset < expected {
                    corrupt.push(CorruptFrame {
                        segment,
                        position: pos as u64,
                        claimed: None,
                        reason: format!(
                            "a valid record at offset {} of {shard}, which is already at {expected}",
                            record.offset
                        ),
                    });
                    pos += len;
                    continue;
                }
                next.insert(shard, record.offset + 1);
                let place = record.entry.set_place();
                let continues = open
                    .as_ref()
                    .is_some_and(|o| place.as_ref().is_some_and(|p| p.set == o.id));
                if !continues && let Some(o) = open.take() {
                    // Its marker, or (after damage) other valid frames: the
                    // set is not a torn tail, and its frames stay.
                    for (r, at) in &o.frames {
                        keep(r, *at, index);
                    }
                }
                match place {
                    Some(p) if continues || p.index == 0 => {
                        open.get_or_insert_with(|| OpenSet {
                            id: p.set,
                            start: pos,
                            frames: Vec::new(),
                        })
                        .frames
                        .push((record, pos));
                    }
                    _ => keep(&record, pos, index),
                }
                pos += len;
                if open.is_none() {
                    end = pos;
                }
            }
            bad => match format::find_next_valid(buf, pos) {
                None => break,
                Some(next) => {
                    let reason = match bad {
                        Frame::Bad(e) => e.to_string(),
                        _ => "frame runs past a valid frame".to_string(),
                    };
                    corrupt.push(CorruptFrame {
                        segment,
                        position: pos as u64,
                        claimed: format::claimed_header(&buf[pos..]),
                        reason,
                    });
                    pos = next;
                }
            },
        }
    }
    if let Some(o) = open {
        end = o.start;
    }
    ScanOutcome { end, corrupt }
}

fn read_header(file: &dyn FsFile, path: &Path, len: u64) -> Result<(SegmentHeader, u64), LogError> {
    let mut prefix = vec![0; (len as usize).min(format::SEGMENT_HEADER_PREFIX)];
    file.read_exact_at(&mut prefix, 0)
        .map_err(LogError::io("read header", path))?;
    let need = match format::decode_segment_header(&prefix) {
        Err(format::HeaderError::Truncated { need, .. }) if need as u64 <= len => need,
        Err(source) => {
            return Err(LogError::BadSegmentHeader {
                path: path.to_path_buf(),
                source,
            });
        }
        Ok((h, n)) => return Ok((h, n as u64)),
    };
    let mut full = vec![0; need];
    file.read_exact_at(&mut full, 0)
        .map_err(LogError::io("read header", path))?;
    format::decode_segment_header(&full)
        .map(|(h, n)| (h, n as u64))
        .map_err(|source| LogError::BadSegmentHeader {
            path: path.to_path_buf(),
            source,
        })
}

/// Whether `bytes` are all zero: the committer's preallocation, never
/// written (a frame never starts with a zero length).
fn zeros(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

fn read_all(file: &dyn FsFile) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0; file.len()? as usize];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

fn header_bytes(id: u64, next: &HashMap<ShardRef, u64>) -> Vec<u8> {
    let mut table: Vec<_> = next
        .iter()
        .map(|(s, n)| (s.namespace.clone(), s.shard, *n))
        .collect();
    table.sort();
    format::encode_segment_header(&SegmentHeader {
        segment_id: id,
        created_ms: now_ms(),
        next_offsets: table,
    })
}

/// Create segment `id` with its header, durably when `sync` is set.
pub(crate) fn create_segment(
    fs: &dyn Fs,
    log_dir: &Path,
    id: u64,
    next: &HashMap<ShardRef, u64>,
    sync: bool,
) -> Result<(Arc<dyn FsFile>, u64), LogError> {
    let path = segment_path(log_dir, id);
    let header = header_bytes(id, next);
    let file = fs.create(&path).map_err(LogError::io("create", &path))?;
    file.write_all_at(&header, 0)
        .map_err(LogError::io("write header", &path))?;
    if sync {
        file.sync_data().map_err(LogError::io("fsync", &path))?;
        fs.sync_dir(log_dir)
            .map_err(LogError::io("fsync directory", log_dir))?;
    }
    Ok((file, header.len() as u64))
}
