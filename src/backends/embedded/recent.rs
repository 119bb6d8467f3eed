//! The records a shard's readers need next, kept in memory.
//!
//! Two runs per shard, each a stretch of consecutive records with where each
//! one's frame ends in the journal (a reader that takes a record goes on
//! reading from there):
//!
//! - **the tail**: what the committer just made durable, handed over as it
//!   answers the writers. A reader that keeps up takes its records from
//!   here: no read of the journal, no CRC check, no decode, and no trip to
//!   the blocking pool. Kept for every shard with a reader open.
//! - **the read run**: what a reader just read from the journal, for the
//!   shard's other readers (another target's), so a backlog read after a
//!   restart is read once, not once per target. Kept only for a shard with
//!   two readers or more.
//!
//! A reader behind both runs, or at a gap in them (a record lost to damage,
//! a payload too large to keep), reads the journal itself, as it always
//! could: damage handling does not change. What is kept is bounded in
//! records and bytes, per shard and in all.
//!
//! Each shard with a reader also has a watch of its next offset, moved on
//! each commit that wrote to it, so a waiting consumer is woken by its own
//! shard's writes only.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use super::format::Record;
use crate::backends::Limit;
use crate::entry::{Entry, ShardRef};

/// Records kept per run, at most: a reader may lag by this many and still
/// take them from memory.
const KEEP_RECORDS: usize = 4096;
/// Bytes kept per run, and in all, at most, counted by [`weight`]: many
/// shards' runs of small records are bounded by memory, not only by count.
const KEEP_BYTES: usize = 4 << 20;
const KEEP_BYTES_ALL: usize = 64 << 20;
/// A larger payload is not kept in the tail: copying it on the committer's
/// thread would hold up the writers behind it. Its reader reads the journal.
const KEEP_PAYLOAD_MAX: usize = 64 << 10;

/// What a kept record holds in memory, about: its payload, id, key and
/// headers, and the record's own structures.
fn weight(record: &Record) -> usize {
    let e = &record.entry;
    let headers: usize = e.headers.iter().map(|(n, v)| n.len() + v.len() + 48).sum();
    e.payload.len() + e.id.len() + e.key.as_ref().map_or(0, String::len) + headers + 160
}

/// A record and where its frame ends in the journal.
struct Kept {
    record: Record,
    segment: u64,
    end: u64,
}

/// Consecutive records of one shard, with their [`weight`].
#[derive(Default)]
struct Span {
    kept: VecDeque<Kept>,
    bytes: usize,
}

impl Span {
    /// Add `k` where it carries the span on. A record at or before the
    /// span's last is already covered (an old read); one past a gap starts
    /// the span afresh, as a span never holds a gap. `all` is the bytes kept
    /// in every span, which bounds this one too.
    fn push(&mut self, k: Kept, all: &mut usize) {
        if let Some(last) = self.kept.back().map(|k| k.record.offset) {
            if k.record.offset <= last {
                return;
            }
            if k.record.offset != last + 1 {
                self.clear(all);
            }
        }
        let n = weight(&k.record);
        self.bytes += n;
        *all += n;
        self.kept.push_back(k);
        while self.kept.len() > KEEP_RECORDS
            || (self.kept.len() > 1 && (self.bytes > KEEP_BYTES || *all > KEEP_BYTES_ALL))
        {
            self.pop_front(all);
        }
    }

    fn pop_front(&mut self, all: &mut usize) {
        if let Some(k) = self.kept.pop_front() {
            let n = weight(&k.record);
            self.bytes -= n;
            *all -= n;
        }
    }

    fn clear(&mut self, all: &mut usize) {
        *all -= self.bytes;
        self.kept.clear();
        self.bytes = 0;
    }

    /// The records from offset `next` on, within `limit`; `None` if `next`
    /// is not here.
    fn take(&self, next: u64, limit: Limit) -> Option<Taken> {
        let first = self.kept.front()?.record.offset;
        let skip = usize::try_from(next.checked_sub(first)?).ok()?;
        let mut records = Vec::new();
        let (mut segment, mut end, mut bytes) = (0, 0, 0);
        for k in self.kept.iter().skip(skip) {
            let full =
                records.len() >= limit.entries || (!records.is_empty() && bytes >= limit.bytes);
            if full {
                break;
            }
            bytes += k.record.entry.payload.len();
            (segment, end) = (k.segment, k.end);
            records.push(k.record.clone());
        }
        (!records.is_empty()).then_some(Taken {
            records,
            segment,
            end,
            from_tail: false,
        })
    }
}

struct Run {
    readers: usize,
    /// What the committer made durable last.
    tail: Span,
    /// What a reader read from the journal last (two readers or more).
    read: Span,
    /// The shard's next offset once its last commit is durable.
    next: watch::Sender<u64>,
}

/// Records taken from a run, and where the last one's frame ends.
pub(crate) struct Taken {
    pub records: Vec<Record>,
    pub segment: u64,
    pub end: u64,
    /// From the tail (the committer), not from another reader's read.
    pub from_tail: bool,
}

/// A record the committer just made durable, for [`Recent::publish`].
pub(crate) struct Committed {
    pub shard: ShardRef,
    pub offset: u64,
    pub entry: Entry,
    /// Where its frame ends in the segment.
    pub end: u64,
}

#[derive(Default)]
pub(crate) struct Recent {
    /// Each shard's runs, and the bytes kept in all of them.
    runs: Mutex<(HashMap<ShardRef, Run>, usize)>,
}

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<ShardRef, Run>, usize)> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reader of `shard` opened; `next` is the shard's next offset in the
    /// index. The caller holds the index's read lock, so no commit falls
    /// between that and the watch it gets: the watch moves on every commit
    /// to the shard from here on. See [`Recent::closed`].
    pub fn opened(&self, shard: &ShardRef, next: u64) -> watch::Receiver<u64> {
        let mut runs = self.lock();
        let run = runs.0.entry(shard.clone()).or_insert_with(|| Run {
            readers: 0,
            tail: Span::default(),
            read: Span::default(),
            next: watch::channel(next).0,
        });
        run.readers += 1;
        run.next.send_if_modified(|n| {
            let moved = next > *n;
            *n = (*n).max(next);
            moved
        });
        run.next.subscribe()
    }

    /// A reader of `shard` closed: with one left, nobody shares its reads;
    /// with none, nothing is kept.
    pub fn closed(&self, shard: &ShardRef) {
        let mut guard = self.lock();
        let (runs, all) = &mut *guard;
        let Some(run) = runs.get_mut(shard) else {
            return;
        };
        run.readers -= 1;
        if run.readers < 2 {
            run.read.clear(all);
        }
        if run.readers == 0 {
            run.tail.clear(all);
            runs.remove(shard);
        }
    }

    /// The kept records of `shard` from offset `next` on, while their
    /// offsets run on without a gap, within `limit`; `None` if `next` is
    /// not kept.
    pub fn take(&self, shard: &ShardRef, next: u64, limit: Limit) -> Option<Taken> {
        let runs = self.lock();
        let run = runs.0.get(shard)?;
        match run.tail.take(next, limit) {
            Some(taken) => Some(Taken {
                from_tail: true,
                ..taken
            }),
            None => run.read.take(next, limit),
        }
    }

    /// Keep what a reader just read from the journal (`ends[i]` is where
    /// `records[i]`'s frame ends), where it carries the read run on or
    /// starts past it; a read behind the run keeps nothing.
    pub fn keep(&self, shard: &ShardRef, records: &[Record], ends: &[(u64, u64)]) {
        let mut guard = self.lock();
        let (runs, all) = &mut *guard;
        let Some(run) = runs.get_mut(shard).filter(|r| r.readers >= 2) else {
            return;
        };
        for (record, &(segment, end)) in records.iter().zip(ends) {
            let record = record.clone();
            run.read.push(
                Kept {
                    record,
                    segment,
                    end,
                },
                all,
            );
        }
    }

    /// What the committer just made durable in `segment`, in offset order
    /// per shard: kept in the tail of each shard with a reader, whose watch
    /// then moves. A payload is copied out of its request's body, which it
    /// may share, so a kept record never holds a whole body.
    pub fn publish(&self, segment: u64, committed: Vec<Committed>) {
        let mut guard = self.lock();
        let (runs, all) = &mut *guard;
        if runs.is_empty() {
            return;
        }
        let mut moved: Vec<(ShardRef, u64)> = Vec::new();
        for d in committed {
            let Some(run) = runs.get_mut(&d.shard) else {
                continue;
            };
            match moved.iter_mut().find(|(s, _)| *s == d.shard) {
                Some((_, next)) => *next = d.offset + 1,
                None => moved.push((d.shard.clone(), d.offset + 1)),
            }
            let mut entry = d.entry;
            if entry.payload.len() > KEEP_PAYLOAD_MAX {
                // Its reader reads it from the journal; what follows starts
                // the tail afresh.
                continue;
            }
            entry.payload = Bytes::copy_from_slice(&entry.payload);
            let record = Record {
                namespace: d.shard.namespace,
                shard: d.shard.shard,
                offset: d.offset,
                entry: Arc::new(entry),
            };
            run.tail.push(
                Kept {
                    record,
                    segment,
                    end: d.end,
                },
                all,
            );
        }
        for (shard, next) in moved {
            if let Some(run) = runs.get(&shard) {
                run.next.send_replace(next);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn record(offset: u64) -> Record {
        Record {
            namespace: "ns".into(),
            shard: 0,
            offset,
            entry: Arc::new(Entry::default()),
        }
    }

    fn keep(recent: &Recent, shard: &ShardRef, offsets: std::ops::Range<u64>) {
        let records: Vec<Record> = offsets.clone().map(record).collect();
        let ends: Vec<(u64, u64)> = offsets.map(|o| (1, o * 10 + 10)).collect();
        recent.keep(shard, &records, &ends);
    }

    /// The committer's records `offsets` of `shard`, each with `payload`.
    fn publish(recent: &Recent, shard: &ShardRef, offsets: std::ops::Range<u64>, payload: &Bytes) {
        let durable = offsets
            .map(|offset| Committed {
                shard: shard.clone(),
                offset,
                entry: Entry {
                    payload: payload.clone(),
                    ..Entry::default()
                },
                end: offset * 10 + 10,
            })
            .collect();
        recent.publish(2, durable);
    }

    /// A shard with `readers` readers open.
    fn opened(readers: usize) -> (Recent, ShardRef) {
        let (recent, shard) = (Recent::default(), ShardRef::new("ns", 0));
        (0..readers).for_each(|_| drop(recent.opened(&shard, 0)));
        (recent, shard)
    }

    /// How many records a reader at `next` takes, up to `max`.
    fn taken(recent: &Recent, shard: &ShardRef, next: u64, max: usize) -> usize {
        recent
            .take(shard, next, Limit::entries(max))
            .map_or(0, |t| t.records.len())
    }

    #[test]
    fn one_reader_keeps_nothing_it_reads() {
        let (recent, shard) = opened(1);
        keep(&recent, &shard, 0..10);
        assert_eq!(taken(&recent, &shard, 0, 10), 0);
    }

    #[test]
    fn a_second_reader_takes_what_the_first_read_and_goes_on_after_it() {
        let (recent, shard) = opened(2);
        keep(&recent, &shard, 0..10);
        let some = recent.take(&shard, 3, Limit::entries(4)).unwrap();
        let offsets: Vec<u64> = some.records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, [3, 4, 5, 6]);
        assert_eq!((some.segment, some.end, some.from_tail), (1, 70, false));
        // Past the run, or behind it: the journal.
        assert_eq!(taken(&recent, &shard, 10, 4), 0);
        keep(&recent, &shard, 10..12);
        assert_eq!(taken(&recent, &shard, 10, 9), 2);
        // An old read (a replay) does not disturb the run.
        keep(&recent, &shard, 0..5);
        assert_eq!(taken(&recent, &shard, 0, 99), 12);
    }

    #[test]
    fn a_gap_starts_the_run_afresh_and_a_closed_reader_ends_sharing() {
        let (recent, shard) = opened(2);
        keep(&recent, &shard, 0..5);
        // Records 5..7 were lost to damage: nobody takes across the gap.
        keep(&recent, &shard, 7..9);
        assert_eq!(taken(&recent, &shard, 4, 9), 0);
        assert_eq!(taken(&recent, &shard, 7, 9), 2);
        recent.closed(&shard);
        assert_eq!(taken(&recent, &shard, 7, 9), 0);
    }

    #[test]
    fn the_run_is_bounded() {
        let (recent, shard) = opened(2);
        keep(&recent, &shard, 0..(KEEP_RECORDS as u64 + 100));
        assert_eq!(taken(&recent, &shard, 99, 1), 0);
        assert_eq!(taken(&recent, &shard, 100, 1), 1);
    }

    #[test]
    fn the_tail_is_bounded_in_bytes() {
        let (recent, shard) = opened(1);
        let payload = Bytes::from(vec![0; KEEP_PAYLOAD_MAX]);
        publish(&recent, &shard, 0..200, &payload);
        // 63 records of 64 KiB and their entries fit in 4 MiB.
        assert_eq!(taken(&recent, &shard, 136, 999), 0);
        assert_eq!(taken(&recent, &shard, 137, 999), 63);
    }

    #[test]
    fn a_reader_takes_the_committers_records_and_its_watch_moves() {
        let (recent, shard) = (Recent::default(), ShardRef::new("ns", 0));
        let body = Bytes::from(vec![b'p'; 300]);
        let payload = body.slice(100..200);
        // No reader yet: nothing is kept.
        publish(&recent, &shard, 0..3, &payload);
        let mut next = recent.opened(&shard, 3);
        assert_eq!(
            (*next.borrow_and_update(), taken(&recent, &shard, 0, 9)),
            (3, 0)
        );
        publish(&recent, &shard, 3..6, &payload);
        assert!(next.has_changed().unwrap());
        assert_eq!(*next.borrow_and_update(), 6);
        let t = recent.take(&shard, 3, Limit::entries(9)).unwrap();
        assert_eq!(
            (t.records.len(), t.segment, t.end, t.from_tail),
            (3, 2, 60, true)
        );
        // The payload is the same bytes, copied out of the body it shared.
        let kept = &t.records[0].entry.payload;
        assert_eq!(kept, &payload);
        assert_ne!(kept.as_ptr(), payload.as_ptr());
        // Another shard's commit does not move this shard's watch.
        publish(&recent, &ShardRef::new("ns", 1), 0..2, &payload);
        assert!(!next.has_changed().unwrap());
        recent.closed(&shard);
        assert_eq!(taken(&recent, &shard, 3, 9), 0);
    }

    #[test]
    fn a_payload_too_large_to_keep_is_read_from_the_journal() {
        let (recent, shard) = opened(1);
        let small = Bytes::from_static(b"small");
        publish(&recent, &shard, 0..2, &small);
        publish(
            &recent,
            &shard,
            2..3,
            &Bytes::from(vec![0; KEEP_PAYLOAD_MAX + 1]),
        );
        publish(&recent, &shard, 3..5, &small);
        // The tail starts afresh after it: a reader at 0 to 2 reads the journal.
        assert_eq!(taken(&recent, &shard, 0, 9), 0);
        assert_eq!(taken(&recent, &shard, 2, 9), 0);
        assert_eq!(taken(&recent, &shard, 3, 9), 2);
    }
}
