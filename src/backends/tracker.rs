//! What a shard consumer has handed out: deliveries not yet acked, and nacked
//! ones waiting to be handed out again. Its low watermark is what a consumer
//! commits, on every backend: every entry before it is done with.

use std::collections::{BTreeMap, VecDeque};

pub(crate) struct Tracker<R> {
    /// Delivered and not yet acked (sequence → timestamp ms and payload
    /// bytes); a nacked entry stays here until acked.
    outstanding: BTreeMap<u64, (u64, usize)>,
    /// Payload bytes of `outstanding`: what the shard holds in memory.
    outstanding_bytes: usize,
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
            outstanding_bytes: 0,
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

    /// These (sequence, timestamp, payload bytes) were handed out; the next
    /// read starts at `end`.
    pub fn delivered(&mut self, items: impl IntoIterator<Item = (u64, u64, usize)>, end: u64) {
        for (sequence, ts, bytes) in items {
            if let Some((_, old)) = self.outstanding.insert(sequence, (ts, bytes)) {
                self.outstanding_bytes -= old;
            }
            self.outstanding_bytes += bytes;
        }
        self.delivered_end = self.delivered_end.max(end);
        self.any_delivered = true;
    }

    /// Whether anything was handed out since the start: before that, the low
    /// watermark is only the starting point, which may be a guess.
    pub fn any_delivered(&self) -> bool {
        self.any_delivered
    }

    pub fn ack(&mut self, sequence: u64) {
        if let Some((_, bytes)) = self.outstanding.remove(&sequence) {
            self.outstanding_bytes -= bytes;
        }
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

    /// Payload bytes delivered and not yet acked.
    pub fn outstanding_bytes(&self) -> usize {
        self.outstanding_bytes
    }

    /// Timestamp of the oldest delivery not yet acked.
    pub fn oldest_outstanding_ms(&self) -> Option<u64> {
        self.outstanding.values().next().map(|(ts, _)| *ts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_held_follow_deliveries_and_acks() {
        let mut t: Tracker<()> = Tracker::starting_at(10);
        t.delivered([(10, 1, 100), (11, 2, 50), (12, 3, 7)], 13);
        assert_eq!((t.outstanding(), t.outstanding_bytes()), (3, 157));
        t.ack(11);
        assert_eq!((t.outstanding(), t.outstanding_bytes()), (2, 107));
        // Delivered again (a redelivery): counted once.
        t.delivered([(10, 1, 100)], 13);
        assert_eq!(t.outstanding_bytes(), 107);
        t.ack(10);
        t.ack(12);
        t.ack(12);
        assert_eq!((t.outstanding(), t.outstanding_bytes()), (0, 0));
        assert_eq!(t.low_watermark(), 13);
    }
}
