//! The messages the shard's actors send each other, kept apart from the
//! actors so that no actor imports another: each holds its peers as
//! `Recipient`s of these messages, wired by the supervisor.

use std::sync::Arc;
use std::time::Duration;

use actix::{Message, Recipient};

use super::{InMailbox, Work};
use crate::backends::{BackendError, DelayStore};
use crate::entry::{Delivered, Entry};
use crate::state::ParkStore;

/// Deliver these entries (in order); counted in the shard's mailbox until
/// handled.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Apply(pub Vec<Work>, pub InMailbox);

/// Deliver these entries, fired from the delay store (in due order).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ApplyDelayed(pub Vec<Delivered>);

/// Deliver these dead letters again, with their original sequences and fresh
/// attempts. Each is removed from the DLQ once applied.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Redrive(pub Vec<RedrivenLetter>);

/// A dead letter sent back to its shard's applier.
pub struct RedrivenLetter {
    /// The letter's place in the DLQ: the one removed once it applies.
    pub dlq_sequence: u64,
    /// Its entry, with its original shard and sequence.
    pub delivered: Delivered,
}

/// How many redriven entries the applier holds, not yet settled.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct RedriveBacklog;

/// This dead letter was purged: if it held its key, release the key.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Purged(pub Entry);

/// Shutdown: start no new sink call, and answer once the one in flight (if
/// any) has settled, so its acks are in before the shard's last commit.
/// Without it, an entry the target already has is delivered again after a
/// clean restart.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Quiesce;

/// The consumer rewound: drop work read before generation `.0`.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Reset(pub u64);

/// The actors a consumer feeds.
#[derive(Clone)]
pub struct Peers {
    /// The applier takes entries due now, and quiesces at shutdown.
    pub apply: Recipient<Apply>,
    pub quiesce: Recipient<Quiesce>,
    /// The delay scheduler takes entries due later.
    pub delay: Recipient<Delay>,
    /// Told the new generation on every rewind (delay, applier, DLQ).
    pub resets: Vec<Recipient<Reset>>,
}

/// Connect the consumer to its peers and start reading.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Wire(pub Peers);

/// A peer lost its work (it restarted): read again from the committed offset.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Rewind;

/// Stop reading and commit what is done. With a time (`Some`), the Applier
/// first stops starting sink calls and the one in flight gets up to that
/// long to settle, so its entries are in the commit. Answers with the
/// committed offset.
#[derive(Message)]
#[rtype(result = "Option<u64>")]
pub struct Drain(pub Option<Duration>);

/// The shard moves to another arbiter (after a [`Drain`]): drop its work
/// and its peers, and stop for good. What it held is read again from the
/// committed offset by the shard's new actors, exactly as after a restart.
/// The consumer answers once no read of its own is in flight, so the new
/// consumer is the only reader of the shard.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Retire;

/// Stats the API reads: the committed offset and the oldest unacked entry.
#[derive(Message)]
#[rtype(result = "ConsumerState")]
pub struct GetState;

#[derive(Clone, Copy, Debug, Default)]
pub struct ConsumerState {
    pub committed: u64,
    pub low_watermark: u64,
    pub outstanding: usize,
    pub oldest_outstanding_ms: Option<u64>,
    /// The shard's end on a broker, when known.
    pub end_offset: Option<u64>,
}

/// Hold these entries until they are due: store them, then ack them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Delay(pub Vec<Work>);

/// Cancel this waiting entry (as found in the store by its id).
#[derive(Message)]
#[rtype(result = "Result<CancelOutcome, BackendError>")]
pub struct Cancel(pub Delivered);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It will never fire; the store no longer has it.
    Cancelled,
    /// It already fired and is being delivered (or was): too late.
    Fired,
    /// The store no longer has it (delivered, or cancelled already).
    Gone,
}

/// What finishes an entry once its dead letter is durable.
pub enum Done {
    /// It came from the log: ack it, so the watermark can pass.
    Ack(Work),
    /// It came from the delay store: remove it there.
    Undelay(Arc<dyn DelayStore>),
    /// It came from the park store: remove it there.
    Unpark {
        store: ParkStore,
        order_key: String,
        sequence: u64,
    },
}

/// An entry the applier gave up on.
pub struct Doomed {
    pub delivered: Delivered,
    pub done: Done,
    pub attempts: u32,
    pub first_failure_ms: u64,
    pub last_failure_ms: u64,
    pub last_error: String,
    pub target: String,
    /// The key this letter holds (`hold_key` on a broker, where the hold
    /// lives with the letter).
    pub holds: Option<String>,
}

/// Store these entries in the DLQ, then ack them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Bury(pub Vec<Doomed>);

/// A redriven dead letter was applied: remove it from the DLQ.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Redriven {
    pub namespace: String,
    pub dlq_sequence: u64,
}
