//! The committer: the one thread that writes the journal.
//!
//! It takes whatever appends are waiting, encodes them into one buffer, makes
//! one write and one `fdatasync`, publishes the batch to readers, and only then
//! answers the appenders. Offsets are assigned here, so they are dense per
//! shard without any locking.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use tracing::{error, warn};

use super::format;
use super::index::{self, DurableMark, SegmentInfo, SparsePoint};
use super::recent::Committed;
use super::recovery::{self, WriterState};
use super::{
    AppendReply, AppendRequest, Appended, Command, FsyncMode, HardMax, LogError, RetentionReport,
    Shared, retention, write_atomic,
};
use crate::entry::{Durable, Entry, ShardRef, now_ms};
use crate::fs::FsFile;

/// How far ahead of the writes the active segment is zero-filled. An
/// fdatasync that does not change the file's size need not write the inode
/// (on this project's ext4 test hosts, 100-115 µs against 135-210 µs for
/// one that does), so only one fdatasync per chunk pays for the size change.
const PREALLOCATE: u64 = 1 << 20;
static ZEROS: [u8; PREALLOCATE as usize] = [0; PREALLOCATE as usize];

/// How often age-based retention is checked when nothing else wakes us.
const RETENTION_TICK: Duration = Duration::from_secs(1);

/// An append that is written but not yet answered.
struct Pending {
    reply: AppendReply,
    shard: ShardRef,
    offset: u64,
    pos: u64,
    ts: u64,
    /// Handed to the shard's readers once durable ([`super::recent`]).
    entry: Entry,
    /// Where its frame ends.
    end: u64,
}

pub(crate) struct Committer {
    shared: Arc<Shared>,
    rx: Receiver<Command>,
    w: WriterState,
    buf: Vec<u8>,
    /// Written to the file, waiting for the fsync that covers them.
    pending: Vec<Pending>,
    /// Interval mode: when the next fsync is due.
    next_sync: Instant,
    next_retention: Instant,
}

impl Committer {
    pub fn new(shared: Arc<Shared>, rx: Receiver<Command>, w: WriterState) -> Self {
        let now = Instant::now();
        Self {
            shared,
            rx,
            w,
            buf: Vec::with_capacity(1 << 20),
            pending: Vec::new(),
            next_sync: now,
            next_retention: now + RETENTION_TICK,
        }
    }

    pub fn run(mut self) {
        loop {
            let cmd = match self.deadline() {
                Some(at) => match self.rx.recv_deadline(at) {
                    Ok(cmd) => Some(cmd),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => Some(Command::Shutdown),
                },
                None => Some(self.rx.recv().unwrap_or(Command::Shutdown)),
            };
            let Some(cmd) = cmd else {
                self.on_timer();
                continue;
            };
            let mut next = Some(cmd);
            while let Some(cmd) = next.take() {
                next = match cmd {
                    Command::Append(first) => self.append_batch(vec![first]),
                    Command::AppendSet(set) => self.append_batch(set),
                    Command::Flush(reply) => {
                        let _ = reply.send(self.flush());
                        None
                    }
                    Command::Retention(reply) => {
                        let _ = reply.send(self.retention());
                        None
                    }
                    Command::Shutdown => {
                        self.shutdown();
                        return;
                    }
                };
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        let sync = match self.shared.config.fsync {
            FsyncMode::Interval(_) if !self.pending.is_empty() => Some(self.next_sync),
            _ => None,
        };
        let retention = self
            .shared
            .config
            .retention
            .max_age
            .map(|_| self.next_retention);
        sync.into_iter().chain(retention).min()
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if !self.pending.is_empty() && now >= self.next_sync {
            self.sync_point();
        }
        if now >= self.next_retention {
            self.next_retention = now + RETENTION_TICK;
            if let Err(error) = self.retention() {
                warn!(%error, "Retention failed.");
            }
        }
    }

    /// Take `first` and whatever else is waiting, write it as one batch, and
    /// make it durable as the mode asks. Returns a control command met while
    /// draining, to be handled next.
    fn append_batch(&mut self, first: Vec<AppendRequest>) -> Option<Command> {
        let max_bytes = self.shared.config.max_batch_bytes;
        let mut batch = vec![first];
        let mut bytes = 0;
        let mut deferred = None;
        while bytes < max_bytes {
            match self.rx.try_recv() {
                Ok(Command::Append(req)) => {
                    bytes += req.entry.payload.len() + 64;
                    batch.push(vec![req]);
                }
                Ok(Command::AppendSet(set)) => {
                    bytes += set
                        .iter()
                        .map(|r| r.entry.payload.len() + 64)
                        .sum::<usize>();
                    batch.push(set);
                }
                Ok(other) => {
                    deferred = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        // Tests stall the committer here, to hold writes in flight.
        crate::failpoint!("log.commit");
        self.write_batch(batch);
        match self.shared.config.fsync {
            FsyncMode::Always => self.sync_point(),
            FsyncMode::Interval(_) => {
                if Instant::now() >= self.next_sync {
                    self.sync_point();
                }
            }
            FsyncMode::Never => self.publish(Durable::Unknown),
        }
        deferred
    }

    /// Write `batch`, a list of units: a single append, or a set's appends,
    /// which go into one segment back to back, all of them or none.
    fn write_batch(&mut self, batch: Vec<Vec<AppendRequest>>) {
        if self.is_poisoned() {
            for req in batch.into_iter().flatten() {
                let _ = req.reply.send(Err(self.shared.poisoned_error()));
            }
            return;
        }
        let mut staged = Vec::with_capacity(batch.len());
        self.buf.clear();
        let mut freed = false;
        for unit in batch {
            self.stage(unit, &mut staged, &mut freed);
        }
        self.write_buf(&mut staged);
    }

    /// Encode one unit into the buffer, or refuse all of it.
    fn stage(&mut self, unit: Vec<AppendRequest>, staged: &mut Vec<Pending>, freed: &mut bool) {
        let refuse = |unit: Vec<AppendRequest>, err: &dyn Fn() -> LogError| {
            for req in unit {
                let _ = req.reply.send(Err(err()));
            }
        };
        let segment_bytes = self.shared.config.segment_bytes;
        let len: u64 = unit
            .iter()
            .map(|r| format::encoded_len(&r.shard.namespace, &r.entry) as u64)
            .sum();
        if self.room().is_some_and(|room| len > room) {
            // Once per batch: delete what consumers are done with to make
            // room, then look again.
            if !*freed {
                *freed = true;
                let need = len + self.size().1;
                if let Err(error) = retention::apply(&self.shared, self.w.segment, need) {
                    warn!(%error, "Retention failed.");
                }
            }
            if let (Some(cap), Some(room)) = (self.cap(), self.room())
                && len > room
            {
                self.shared.stats.refused_full.add(unit.len() as u64);
                return refuse(unit, &|| LogError::Full { cap });
            }
        }
        let end = self.w.pos + self.buf.len() as u64;
        if end + len > segment_bytes
            && end > self.header_len()
            && (!self.write_buf(staged) || !self.roll())
        {
            // Poisoned, or the write was rolled back: refuse this one.
            return refuse(unit, &|| self.refusal());
        }
        if self.is_poisoned() {
            return refuse(unit, &|| self.shared.poisoned_error());
        }
        let ts = now_ms().max(self.w.last_ts);
        let (buf_start, staged_start) = (self.buf.len(), staged.len());
        let mut unit = unit.into_iter();
        while let Some(AppendRequest {
            shard,
            mut entry,
            reply,
        }) = unit.next()
        {
            entry.timestamp_ms = ts;
            let next = self.w.next_offsets.entry(shard.clone()).or_insert(0);
            let offset = *next;
            let pos = self.w.pos + self.buf.len() as u64;
            if let Err(e) =
                format::encode_record(&mut self.buf, &shard.namespace, shard.shard, offset, &entry)
            {
                // Take back what this unit staged: a set goes whole or not.
                self.buf.truncate(buf_start);
                for p in staged.drain(staged_start..).rev() {
                    self.w.next_offsets.insert(p.shard.clone(), p.offset);
                    let _ = p.reply.send(Err(e.clone().into()));
                }
                let _ = reply.send(Err(e.clone().into()));
                return refuse(unit.collect(), &|| e.clone().into());
            }
            *next += 1;
            staged.push(Pending {
                reply,
                shard,
                offset,
                pos,
                ts,
                entry,
                end: self.w.pos + self.buf.len() as u64,
            });
        }
        self.w.last_ts = ts;
    }

    /// The hard size cap, when appends are refused at it
    /// ([`HardMax::RefuseWrites`]).
    fn cap(&self) -> Option<u64> {
        let r = self.shared.config.retention;
        r.hard_max_bytes
            .filter(|_| r.on_hard_max == HardMax::RefuseWrites)
    }

    /// Bytes left under the cap, counting what is written or staged but not
    /// yet published; `None` without a cap to refuse at.
    fn room(&self) -> Option<u64> {
        let cap = self.cap()?;
        let (published, unpublished) = self.size();
        Some(cap.saturating_sub(published + unpublished))
    }

    /// The log's size as the index has it (published), and the bytes of the
    /// active segment written or staged since.
    fn size(&self) -> (u64, u64) {
        let idx = self.shared.index.read().unwrap();
        let active = idx.segments.get(&self.w.segment).map_or(0, |s| s.len);
        let unpublished = self.w.pos.saturating_sub(active) + self.buf.len() as u64;
        (idx.total_bytes(), unpublished)
    }

    fn refusal(&self) -> LogError {
        if self.is_poisoned() {
            self.shared.poisoned_error()
        } else {
            LogError::WriteFailed {
                path: self.shared.segment_path(self.w.segment),
                rolled_back: true,
                source: io::Error::other("an earlier write in this batch failed"),
            }
        }
    }

    /// Write the encoded buffer. On success the staged appends become
    /// pending; on failure the write is rolled back and they are refused.
    fn write_buf(&mut self, staged: &mut Vec<Pending>) -> bool {
        if self.buf.is_empty() {
            return true;
        }
        let start = self.w.pos;
        let result = self.w.file.write_all_at(&self.buf, start);
        let written = self.buf.len() as u64;
        self.buf.clear();
        match result {
            Ok(()) => {
                self.w.pos += written;
                self.preallocate();
                self.shared.stats.batches.inc();
                self.shared.stats.appends.add(staged.len() as u64);
                self.shared.stats.bytes.add(written);
                self.pending.append(staged);
                true
            }
            Err(source) => {
                let path = self.shared.segment_path(self.w.segment);
                // Give the offsets back: nothing of this batch is visible.
                for p in staged.iter().rev() {
                    self.w.next_offsets.insert(p.shard.clone(), p.offset);
                }
                let rolled_back = self.w.file.set_len(start).is_ok();
                self.w.filled = self.w.filled.min(start);
                if !rolled_back {
                    self.shared.poison(format!(
                        "write to {} failed ({source}) and could not be rolled back",
                        path.display()
                    ));
                }
                error!(path = %path.display(), %source, rolled_back, "Log write failed.");
                for p in staged.drain(..) {
                    let _ = p.reply.send(Err(LogError::WriteFailed {
                        path: path.clone(),
                        rolled_back,
                        source: copy_io_error(&source),
                    }));
                }
                false
            }
        }
    }

    /// Zero-fill the active segment a chunk ahead of `pos`, when the writes
    /// have passed what is filled. A failure only costs speed: the next
    /// write tries again, and recovery trims zeros either way.
    fn preallocate(&mut self) {
        let pos = self.w.pos;
        if pos <= self.w.filled || !self.syncs() {
            return;
        }
        let target = pos
            .next_multiple_of(PREALLOCATE)
            .min(self.shared.config.segment_bytes)
            .max(pos);
        self.w.filled = pos;
        if target > pos
            && self
                .w
                .file
                .write_all_at(&ZEROS[..(target - pos) as usize], pos)
                .is_ok()
        {
            self.w.filled = target;
        }
    }

    /// Cut the zero-filled part off the active segment, durably: a sealed
    /// segment, or a log closed cleanly, ends at its last record.
    fn trim(&mut self) {
        if self.w.filled <= self.w.pos {
            return;
        }
        let trimmed = self
            .w
            .file
            .set_len(self.w.pos)
            .and_then(|()| self.w.file.sync_data());
        match trimmed {
            Ok(()) => self.w.filled = self.w.pos,
            // Recovery trims it instead.
            Err(error) => {
                warn!(segment = self.w.segment, %error, "Could not trim a segment's zero-filled tail.")
            }
        }
    }

    /// fsync the active segment, then publish and answer everything pending.
    /// A failed fsync poisons the log and answers "unknown".
    fn sync_point(&mut self) {
        if let FsyncMode::Interval(every) = self.shared.config.fsync {
            self.next_sync = Instant::now() + every;
        }
        if self.pending.is_empty() {
            return;
        }
        match self.w.file.sync_data() {
            Ok(()) => {
                self.shared.stats.fsyncs.inc();
                self.publish(Durable::True);
            }
            Err(source) => self.sync_failed(source),
        }
    }

    fn sync_failed(&mut self, source: io::Error) {
        let path = self.shared.segment_path(self.w.segment);
        self.shared
            .poison(format!("fsync of {} failed: {source}", path.display()));
        error!(path = %path.display(), %source, "fsync failed; the log is poisoned.");
        for p in self.pending.drain(..) {
            let _ = p.reply.send(Err(LogError::SyncFailed {
                path: path.clone(),
                source: copy_io_error(&source),
            }));
        }
    }

    /// Make the pending appends visible to readers, then answer them.
    fn publish(&mut self, durable: Durable) {
        if self.pending.is_empty() {
            return;
        }
        let segment = self.w.segment;
        let mark = DurableMark {
            segment,
            end: self.w.pos,
        };
        {
            let mut idx = self.shared.index.write().unwrap();
            for p in &self.pending {
                let point = SparsePoint {
                    offset: p.offset,
                    pos: p.pos,
                    ts: p.ts,
                };
                idx.add(segment, &p.shard, point);
            }
            if let Some(info) = idx.segments.get_mut(&segment) {
                info.len = mark.end;
            }
            idx.mark = mark;
        }
        // Appenders first, readers after: the index already shows the batch,
        // and a client waiting on its answer is the latency that counts.
        let mut kept = Vec::with_capacity(self.pending.len());
        for p in self.pending.drain(..) {
            let _ = p.reply.send(Ok(Appended {
                sequence: p.offset,
                timestamp_ms: p.ts,
                durable,
            }));
            kept.push(Committed {
                shard: p.shard,
                offset: p.offset,
                entry: p.entry,
                end: p.end,
            });
        }
        self.shared.recent.publish(segment, kept);
        self.shared.durable_tx.send_replace(mark);
    }

    fn header_len(&self) -> u64 {
        let idx = self.shared.index.read().unwrap();
        idx.segments
            .get(&self.w.segment)
            .map_or(0, |s| s.header_len)
    }

    fn syncs(&self) -> bool {
        self.shared.config.fsync != FsyncMode::Never
    }

    /// Seal the active segment and start the next one. Returns false if the
    /// log is poisoned afterwards.
    fn roll(&mut self) -> bool {
        if self.syncs() {
            self.sync_point();
        } else {
            self.publish(Durable::Unknown);
        }
        if self.is_poisoned() {
            return false;
        }
        self.trim();
        let old = self.w.segment;
        if let Err(error) = self.write_idx(old) {
            // The index can be rebuilt from the segment; losing it costs a
            // scan at the next open, not data.
            warn!(segment = old, %error, "Could not write a segment index.");
        }
        match self.create_segment(old + 1) {
            Ok((file, header_len)) => {
                {
                    let mut idx = self.shared.index.write().unwrap();
                    if let Some(info) = idx.segments.get_mut(&old) {
                        info.sealed = true;
                        info.len = self.w.pos;
                    }
                    idx.segments.insert(
                        old + 1,
                        SegmentInfo {
                            header_len,
                            len: header_len,
                            sealed: false,
                            max_ts: 0,
                        },
                    );
                    idx.mark = DurableMark {
                        segment: old + 1,
                        end: header_len,
                    };
                    self.shared.durable_tx.send_replace(idx.mark);
                }
                self.w.segment = old + 1;
                self.w.file = file;
                self.w.pos = header_len;
                self.w.filled = header_len;
                self.shared.stats.segments_rolled.inc();
            }
            Err(e) => {
                self.shared
                    .poison(format!("could not start a new segment: {e}"));
                error!(error = %e, "Could not start a new segment; the log is poisoned.");
                return false;
            }
        }
        if let Err(error) = self.retention() {
            warn!(%error, "Retention failed.");
        }
        true
    }

    fn write_idx(&self, segment: u64) -> Result<(), LogError> {
        let bytes = {
            let idx = self.shared.index.read().unwrap();
            let info = &idx.segments[&segment];
            index::encode_idx(self.w.pos, info.max_ts, &idx.segment_part(segment))
        };
        let path = super::index_path(&self.shared.log_dir, segment);
        write_atomic(
            self.shared.fs.as_ref(),
            &self.shared.log_dir,
            &path,
            &bytes,
            self.syncs(),
        )
    }

    fn create_segment(&self, id: u64) -> Result<(Arc<dyn FsFile>, u64), LogError> {
        recovery::create_segment(
            self.shared.fs.as_ref(),
            &self.shared.log_dir,
            id,
            &self.w.next_offsets,
            self.syncs(),
        )
    }

    fn retention(&mut self) -> Result<RetentionReport, LogError> {
        retention::apply(&self.shared, self.w.segment, 0)
    }

    fn flush(&mut self) -> Result<(), LogError> {
        if self.is_poisoned() {
            return Err(self.shared.poisoned_error());
        }
        if !self.syncs() {
            self.publish(Durable::Unknown);
        }
        match self.w.file.sync_data() {
            Ok(()) => {
                self.shared.stats.fsyncs.inc();
                self.publish(Durable::True);
                Ok(())
            }
            Err(source) => {
                let path = self.shared.segment_path(self.w.segment);
                self.sync_failed(copy_io_error(&source));
                Err(LogError::SyncFailed { path, source })
            }
        }
    }

    fn shutdown(&mut self) {
        if !self.is_poisoned() {
            let _ = self.flush();
            self.trim();
        }
        // Anything still queued was never written.
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::Append(req) => {
                    let _ = req.reply.send(Err(LogError::Closed));
                }
                Command::AppendSet(set) => {
                    for req in set {
                        let _ = req.reply.send(Err(LogError::Closed));
                    }
                }
                Command::Flush(reply) => {
                    let _ = reply.send(Err(LogError::Closed));
                }
                Command::Retention(reply) => {
                    let _ = reply.send(Err(LogError::Closed));
                }
                Command::Shutdown => {}
            }
        }
    }

    fn is_poisoned(&self) -> bool {
        self.shared
            .poisoned
            .load(std::sync::atomic::Ordering::Acquire)
    }
}

/// `io::Error` is not `Clone`; keep its kind and text.
pub(crate) fn copy_io_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}
