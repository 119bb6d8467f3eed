//! The records a shard's readers read last, shared between them.
//!
//! A namespace with several targets has a reader per target on each shard,
//! and every reader walks the whole journal (all shards' frames, each
//! CRC-checked) to find its own. A reader that keeps up with another takes
//! the records the other just read from here instead: no second read, CRC
//! check or decode. A reader behind the kept run, or past a gap in it (a
//! record lost to damage), reads the journal itself, as it always did.
//!
//! Only a shard with two readers or more keeps anything, and what it keeps
//! is bounded in records and bytes, per shard and in all.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::format::Record;
use crate::backends::Limit;
use crate::entry::ShardRef;

/// Records kept per shard, at most: a reader may lag the first by this many
/// and still share its read.
const KEEP_RECORDS: usize = 4096;
/// Payload bytes kept per shard, and in all, at most.
const KEEP_BYTES: usize = 4 << 20;
const KEEP_BYTES_ALL: usize = 64 << 20;

/// A record and where its frame ends in the journal: a reader that takes it
/// goes on reading from there.
struct Kept {
    record: Record,
    segment: u64,
    end: u64,
}

#[derive(Default)]
struct Run {
    readers: usize,
    kept: VecDeque<Kept>,
    bytes: usize,
}

impl Run {
    fn pop_front(&mut self) -> Option<usize> {
        let k = self.kept.pop_front()?;
        let n = k.record.entry.payload.len();
        self.bytes -= n;
        Some(n)
    }
}

/// Records taken from the run, and where the last one's frame ends.
pub(crate) struct Taken {
    pub records: Vec<Record>,
    pub segment: u64,
    pub end: u64,
}

#[derive(Default)]
pub(crate) struct Recent {
    /// Each shard's run, and the payload bytes kept in all of them.
    runs: Mutex<(HashMap<ShardRef, Run>, usize)>,
}

impl Recent {
    /// A reader of `shard` opened; see [`Recent::closed`].
    pub fn opened(&self, shard: &ShardRef) {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.0.entry(shard.clone()).or_default().readers += 1;
    }

    /// A reader of `shard` closed: with one left, nobody shares its reads.
    pub fn closed(&self, shard: &ShardRef) {
        let mut guard = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let (runs, all) = &mut *guard;
        let Some(run) = runs.get_mut(shard) else {
            return;
        };
        run.readers -= 1;
        if run.readers < 2 {
            *all -= run.bytes;
            if run.readers == 0 {
                runs.remove(shard);
            } else {
                run.kept.clear();
                run.bytes = 0;
            }
        }
    }

    /// The kept records of `shard` from offset `next` on, while their
    /// offsets run on without a gap, within `limit`; `None` if `next` is
    /// not kept.
    pub fn take(&self, shard: &ShardRef, next: u64, limit: Limit) -> Option<Taken> {
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let run = runs.0.get(shard)?;
        let first = run.kept.front()?.record.offset;
        let skip = usize::try_from(next.checked_sub(first)?).ok()?;
        let mut records = Vec::new();
        let (mut segment, mut end, mut bytes) = (0, 0, 0);
        for k in run.kept.iter().skip(skip) {
            let expected = next + records.len() as u64;
            let full =
                records.len() >= limit.entries || (!records.is_empty() && bytes >= limit.bytes);
            if k.record.offset != expected || full {
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
        })
    }

    /// Keep what a reader just read from the journal (`ends[i]` is where
    /// `records[i]`'s frame ends), where it carries the run on or starts
    /// past it; a read behind the run keeps nothing.
    pub fn keep(&self, shard: &ShardRef, records: &[Record], ends: &[(u64, u64)]) {
        let mut guard = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let (runs, all) = &mut *guard;
        let Some(run) = runs.get_mut(shard).filter(|r| r.readers >= 2) else {
            return;
        };
        for (record, &(segment, end)) in records.iter().zip(ends) {
            if let Some(last) = run.kept.back().map(|k| k.record.offset) {
                if record.offset <= last {
                    continue;
                }
                // A gap (records lost to damage, or a read that starts past
                // the run): the run starts afresh, as it never holds one.
                if record.offset != last + 1 {
                    while let Some(n) = run.pop_front() {
                        *all -= n;
                    }
                }
            }
            let n = record.entry.payload.len();
            run.bytes += n;
            *all += n;
            run.kept.push_back(Kept {
                record: record.clone(),
                segment,
                end,
            });
            while run.kept.len() > KEEP_RECORDS
                || (run.kept.len() > 1 && (run.bytes > KEEP_BYTES || *all > KEEP_BYTES_ALL))
            {
                let Some(n) = run.pop_front() else { break };
                *all -= n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::entry::Entry;

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

    /// A shard with `readers` readers open.
    fn opened(readers: usize) -> (Recent, ShardRef) {
        let (recent, shard) = (Recent::default(), ShardRef::new("ns", 0));
        (0..readers).for_each(|_| recent.opened(&shard));
        (recent, shard)
    }

    /// How many records a reader at `next` takes, up to `max`.
    fn taken(recent: &Recent, shard: &ShardRef, next: u64, max: usize) -> usize {
        recent
            .take(shard, next, Limit::entries(max))
            .map_or(0, |t| t.records.len())
    }

    #[test]
    fn one_reader_keeps_nothing() {
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
        assert_eq!((some.segment, some.end), (1, 70));
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
}
