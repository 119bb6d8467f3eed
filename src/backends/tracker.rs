//! What a shard consumer has handed out: deliveries not yet acked, and nacked
//! ones waiting to be handed out again. Its low watermark is what a consumer
//! commits, on every backend: every entry before it is done with.

use std::collections::{BTreeMap, VecDeque};

pub(crate) struct Tracker<R> {
    /// Delivered and not yet acked (sequence → timestamp ms); a nacked entry
    /// stays here until acked.
    outstanding: BTreeMap<u64, u64>,
    redeliver: VecDeque<R>,
    /// One past the last sequence delivered.
    delivered_end: u64,
    /// Anything was handed out since the start.
    any_delivered: bool,
}

impl<R> Tracker<R> {
    /// A tracker that starts reading at `from`.
    pub fn starting_at(from: u64) -> Self {
        Self {
            outstanding: BTreeMap::new(),
            redeliver: VecDeque::new(),
            delivered_end: from,
            any_delivered: false,
        }
    }

    /// Everything before this sequence has been acked.
    pub fn low_watermark(&self) -> u64 {
        self.outstanding
            .keys()
            .next()
            .copied()
            .unwrap_or(self.delivered_end)
    }

    /// These (sequence, timestamp) were handed out; the next read starts at
    /// `end`.
    pub fn delivered(&mut self, items: impl IntoIterator<Item = (u64, u64)>, end: u64) {
        self.outstanding.extend(items);
        self.delivered_end = self.delivered_end.max(end);
        self.any_delivered = true;
    }

    /// Whether anything was handed out since the start: before that, the low
    /// watermark is only the starting point, which may be a guess.
    pub fn any_delivered(&self) -> bool {
        self.any_delivered
    }

    pub fn ack(&mut self, sequence: u64) {
        self.outstanding.remove(&sequence);
    }

    /// Hand `record` out again; it stays outstanding until acked.
    pub fn nack(&mut self, record: R) {
        self.redeliver.push_back(record);
    }

    /// Up to `max` nacked records, oldest first.
    pub fn take_redeliveries(&mut self, max: usize) -> Vec<R> {
        let n = self.redeliver.len().min(max);
        self.redeliver.drain(..n).collect()
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Timestamp of the oldest delivery not yet acked.
    pub fn oldest_outstanding_ms(&self) -> Option<u64> {
        self.outstanding.values().next().copied()
    }
}
