//! Reading one shard out of the shared journal.
//!
//! A reader walks the segments from its start position up to the durable
//! mark, verifies every frame's CRC, and keeps the records of its own shard.
//! Offsets of a shard are dense, so a reader that finds its next record
//! missing knows a record was lost, even when the damaged frame no longer says
//! whose it was.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{error, warn};

use super::format::{self, FRAME_PREFIX, MAX_BODY, MIN_BODY, Record};
use super::index::DurableMark;
use super::{LogError, OnCorruption, Shared};
use crate::backends::Limit;
use crate::entry::ShardRef;
use crate::fs::FsFile;

/// Bytes read from a segment at a time.
const CHUNK: usize = 256 << 10;

/// A cursor over one shard. Start it with [`super::EmbeddedLog::reader`].
pub struct ShardReader {
    shared: Arc<Shared>,
    shard: ShardRef,
    /// The offset this reader delivers next.
    next: u64,
    segment: u64,
    pos: u64,
    file: Option<Arc<dyn FsFile>>,
    buf: Vec<u8>,
    /// File position of `buf[0]`.
    buf_pos: u64,
    durable_rx: watch::Receiver<DurableMark>,
    /// The shard's next offset once its last commit is durable.
    next_rx: watch::Receiver<u64>,
    /// The last damaged frame this reader stepped over, to name it if its
    /// shard then turns out to be missing a record.
    last_damage: Option<(u64, u64, String)>,
}

impl Drop for ShardReader {
    fn drop(&mut self) {
        self.shared.recent.closed(&self.shard);
    }
}

/// The readable extent of the reader's current segment.
struct Bounds {
    end: u64,
    /// There is a later segment to move on to at `end`.
    more: bool,
}

impl ShardReader {
    pub(crate) fn open(shared: Arc<Shared>, shard: ShardRef, from: u64) -> Result<Self, LogError> {
        let durable_rx = shared.durable_tx.subscribe();
        let (segment, pos, next_rx) = {
            let idx = shared.index.read().unwrap();
            let next = idx.next_offset(&shard);
            let earliest = idx.earliest_offset(&shard);
            if from > next || from < earliest {
                return Err(LogError::OffsetOutOfRange {
                    shard,
                    requested: from,
                    earliest,
                    next,
                });
            }
            let found = idx.shards.get(&shard).and_then(|s| {
                s.segs
                    .iter()
                    .find(|(_, part)| part.last >= from)
                    .map(|(id, part)| {
                        let point = part
                            .sparse
                            .iter()
                            .rev()
                            .find(|p| p.offset <= from)
                            .unwrap_or(&part.sparse[0]);
                        (*id, point.pos)
                    })
            });
            // Nothing readable at or after `from` yet: it can only appear
            // after the durable mark.
            let (segment, pos) = found.unwrap_or((idx.mark.segment, idx.mark.end));
            // Under the index's lock, so no commit falls between `next` and
            // the watch.
            (segment, pos, shared.recent.opened(&shard, next))
        };
        Ok(Self {
            shared,
            shard,
            next: from,
            segment,
            pos,
            file: None,
            buf: Vec::new(),
            buf_pos: 0,
            durable_rx,
            next_rx,
            last_damage: None,
        })
    }

    /// The offset this reader delivers next.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    pub fn shard(&self) -> &ShardRef {
        &self.shard
    }

    /// Up to `max` records that are durable now; empty when caught up.
    pub fn read_batch(&mut self, max: usize) -> Result<Vec<Record>, LogError> {
        self.read_within(Limit::entries(max))
    }

    /// A watch of the shard's next offset once its last commit is durable:
    /// it moves on each commit that writes to this shard, and no other.
    pub fn shard_next(&self) -> watch::Receiver<u64> {
        self.next_rx.clone()
    }

    /// The records from this reader's position that are kept in memory
    /// (the committer's last, or another reader's), within `limit`; `None`
    /// if they are not, and the journal must be read. Never blocks.
    pub fn take_recent(&mut self, limit: Limit) -> Option<Vec<Record>> {
        let taken = self.shared.recent.take(&self.shard, self.next, limit)?;
        if taken.segment != self.segment {
            self.segment = taken.segment;
            self.file = None;
            self.buf.clear();
        }
        self.pos = taken.end;
        self.next += taken.records.len() as u64;
        let counter = match taken.from_tail {
            true => &self.shared.stats.tail_reads,
            false => &self.shared.stats.shared_reads,
        };
        counter.add(taken.records.len() as u64);
        Some(taken.records)
    }

    /// Records that are durable now, within `limit`; empty when caught up.
    pub fn read_within(&mut self, limit: Limit) -> Result<Vec<Record>, LogError> {
        self.durable_rx.borrow_and_update();
        if let Some(records) = self.take_recent(limit) {
            return Ok(records);
        }
        let mut out: Vec<Record> = Vec::new();
        // Where each record's frame ends, for the shard's other readers.
        let mut ends = Vec::new();
        let mut bytes = 0;
        while out.len() < limit.entries && (out.is_empty() || bytes < limit.bytes) {
            let before = out.len();
            let bounds = self.bounds()?;
            if self.pos >= bounds.end {
                if !bounds.more {
                    break;
                }
                self.move_to(self.segment + 1)?;
                continue;
            }
            match self.step(bounds.end, &mut out) {
                Ok(()) => ends.resize(out.len(), (self.segment, self.pos)),
                Err(e) if out.is_empty() => return Err(e),
                // Deliver what came before the damage; the error repeats on
                // the next call because the cursor did not move.
                Err(_) => break,
            }
            bytes += out[before..]
                .iter()
                .map(|r| r.entry.payload.len())
                .sum::<usize>();
        }
        self.shared.recent.keep(&self.shard, &out, &ends);
        Ok(out)
    }

    /// Wait until at least one record is available, then read up to `max`.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Record>, LogError> {
        loop {
            let batch = self.read_batch(max)?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            if self.durable_rx.changed().await.is_err() {
                return Err(LogError::Closed);
            }
        }
    }

    fn bounds(&self) -> Result<Bounds, LogError> {
        let idx = self.shared.index.read().unwrap();
        let mark = idx.mark;
        match idx.segments.get(&self.segment) {
            Some(info) if self.segment < mark.segment => Ok(Bounds {
                end: info.len,
                more: true,
            }),
            Some(_) => Ok(Bounds {
                end: mark.end,
                more: false,
            }),
            None => Err(LogError::OffsetOutOfRange {
                shard: self.shard.clone(),
                requested: self.next,
                earliest: idx.earliest_offset(&self.shard),
                next: idx.next_offset(&self.shard),
            }),
        }
    }

    fn move_to(&mut self, segment: u64) -> Result<(), LogError> {
        let header_len = {
            let idx = self.shared.index.read().unwrap();
            idx.segments.get(&segment).map(|s| s.header_len)
        };
        let Some(header_len) = header_len else {
            return Err(LogError::MissingSegment {
                id: segment,
                path: self.shared.segment_path(segment),
            });
        };
        self.segment = segment;
        self.pos = header_len;
        self.file = None;
        self.buf.clear();
        Ok(())
    }

    /// Read the frame at the cursor. Advances past it unless the policy says
    /// to stop there.
    fn step(&mut self, end: u64, out: &mut Vec<Record>) -> Result<(), LogError> {
        let frame_len = match self.verified_len(end)? {
            Some(len) => len,
            None => return self.damaged(end),
        };
        let frame = self.window(self.pos, frame_len);
        let ours = format::frame_owner(frame).is_some_and(|(ns, shard)| {
            shard == self.shard.shard && ns == self.shard.namespace.as_bytes()
        });
        if !ours {
            self.pos += frame_len as u64;
            return Ok(());
        }
        let record = match format::decode_frame(frame) {
            format::Frame::Valid { record, .. } => record,
            _ => return self.damaged(end),
        };
        if record.offset > self.next {
            self.missing(record.offset)?;
        }
        if record.offset == self.next {
            self.next += 1;
            out.push(record);
        }
        self.pos += frame_len as u64;
        Ok(())
    }

    /// The length of the frame at the cursor if it is whole and its CRC
    /// matches; `None` if it is damaged.
    fn verified_len(&mut self, end: u64) -> Result<Option<usize>, LogError> {
        if end - self.pos < FRAME_PREFIX as u64 {
            return Ok(None);
        }
        self.fill(FRAME_PREFIX, end)?;
        let prefix = self.window(self.pos, FRAME_PREFIX);
        let len = u32::from_le_bytes(prefix[0..4].try_into().unwrap()) as usize;
        let stored = u32::from_le_bytes(prefix[4..8].try_into().unwrap());
        let total = FRAME_PREFIX + len;
        if !(MIN_BODY..=MAX_BODY).contains(&len) || self.pos + total as u64 > end {
            return Ok(None);
        }
        self.fill(total, end)?;
        let body = &self.window(self.pos, total)[FRAME_PREFIX..];
        Ok((crc32c::crc32c(body) == stored).then_some(total))
    }

    /// The frame at the cursor is damaged. If it claims to be this shard's
    /// next record, the policy applies now; otherwise step over it, and a gap
    /// in this shard's offsets will tell whether it was ours.
    fn damaged(&mut self, end: u64) -> Result<(), LogError> {
        let rest = self.read_range(self.pos, end)?;
        let claimed = format::claimed_header(&rest);
        let reason = match format::decode_frame(&rest) {
            format::Frame::Bad(e) => e.to_string(),
            _ => "frame runs past its neighbours".to_string(),
        };
        let skip_to = format::find_next_valid(&rest, 0).map_or(end, |p| self.pos + p as u64);
        let ours = claimed.as_ref().is_some_and(|c| {
            c.shard == self.shard.shard
                && *c.namespace == *self.shard.namespace
                && c.offset == self.next
        });
        warn!(
            shard = %self.shard,
            segment = self.segment,
            position = self.pos,
            %reason,
            ours,
            "Damaged record in the log."
        );
        if ours {
            let err = self.corrupt(self.pos, reason.clone());
            if self.shared.config.on_corruption == OnCorruption::Stop {
                return Err(err);
            }
            self.shared.stats.corrupt_skipped.inc();
            self.next += 1;
        } else {
            self.last_damage = Some((self.segment, self.pos, reason));
        }
        self.pos = skip_to;
        Ok(())
    }

    /// This shard's next record is missing: records `self.next..found` were
    /// lost to damage.
    fn missing(&mut self, found: u64) -> Result<(), LogError> {
        let (segment, position, reason) = self.last_damage.clone().unwrap_or((
            self.segment,
            self.pos,
            "no damaged frame was seen".to_string(),
        ));
        let reason = format!("records {}..{found} are missing ({reason})", self.next);
        error!(shard = %self.shard, segment, position, %reason, "Records lost to damage.");
        if self.shared.config.on_corruption == OnCorruption::Stop {
            return Err(LogError::Corrupt {
                shard: self.shard.clone(),
                segment,
                position,
                offset: self.next,
                reason,
            });
        }
        self.shared.stats.corrupt_skipped.add(found - self.next);
        self.next = found;
        Ok(())
    }

    fn corrupt(&self, position: u64, reason: String) -> LogError {
        LogError::Corrupt {
            shard: self.shard.clone(),
            segment: self.segment,
            position,
            offset: self.next,
            reason,
        }
    }

    fn path(&self) -> PathBuf {
        self.shared.segment_path(self.segment)
    }

    fn file(&mut self) -> Result<Arc<dyn FsFile>, LogError> {
        if let Some(f) = &self.file {
            return Ok(f.clone());
        }
        let path = self.path();
        let f = self
            .shared
            .fs
            .open(&path)
            .map_err(LogError::io("open", &path))?;
        self.file = Some(f.clone());
        Ok(f)
    }

    /// Make sure `buf` holds `need` bytes from the cursor (never past `end`).
    fn fill(&mut self, need: usize, end: u64) -> Result<(), LogError> {
        let have_from = self.pos >= self.buf_pos;
        let have_to = self.buf_pos + self.buf.len() as u64 >= self.pos + need as u64;
        if have_from && have_to {
            return Ok(());
        }
        let len = need.max(CHUNK).min((end - self.pos) as usize);
        let file = self.file()?;
        self.buf.resize(len, 0);
        file.read_exact_at(&mut self.buf, self.pos)
            .map_err(LogError::io("read", &self.path()))?;
        self.buf_pos = self.pos;
        Ok(())
    }

    fn window(&self, pos: u64, len: usize) -> &[u8] {
        let start = (pos - self.buf_pos) as usize;
        &self.buf[start..start + len]
    }

    /// Read `[from, to)` of the current segment (the rare path after damage).
    fn read_range(&mut self, from: u64, to: u64) -> Result<Vec<u8>, LogError> {
        let file = self.file()?;
        let mut bytes = vec![0; (to - from) as usize];
        file.read_exact_at(&mut bytes, from)
            .map_err(LogError::io("read", &self.path()))?;
        Ok(bytes)
    }
}

/// The first offset of `shard` at or after `timestamp_ms`.
pub(crate) fn offset_for_time(
    shared: &Arc<Shared>,
    shard: &ShardRef,
    timestamp_ms: u64,
) -> Result<u64, LogError> {
    let start = {
        let idx = shared.index.read().unwrap();
        let Some(s) = idx.shards.get(shard) else {
            return Ok(0);
        };
        // Timestamps are monotonic per shard, so the last sparse point before
        // the target is a safe place to start scanning.
        s.segs
            .values()
            .flat_map(|part| part.sparse.iter())
            .take_while(|p| p.ts < timestamp_ms)
            .last()
            .map_or_else(|| idx.earliest_offset(shard), |p| p.offset)
    };
    let mut reader = ShardReader::open(shared.clone(), shard.clone(), start)?;
    loop {
        let batch = reader.read_within(super::SCAN)?;
        if batch.is_empty() {
            return Ok(reader.next_offset());
        }
        if let Some(r) = batch.iter().find(|r| r.entry.timestamp_ms >= timestamp_ms) {
            return Ok(r.offset);
        }
    }
}
