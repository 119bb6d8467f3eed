//! Delays on SQS: a companion standard queue (`<queue>-delay`), so a broker
//! namespace never holds a delayed entry on one machine's disk.
//!
//! SQS delays a message by at most 900 s (DelaySeconds), and a FIFO queue
//! only delays a whole queue. So a delayed entry goes to the delay queue, a
//! standard one, with DelaySeconds set to what remains of its delay, capped
//! at one hop (`delay_hop_s`, 900 s by default). A worker receives each
//! message as it shows: if time remains, it sends it on for another hop;
//! once due, it puts the entry back on its shard with its original sequence
//! (on a FIFO queue, in its key's message group), where the shard's consumer
//! applies it. A message is deleted only after its next hop is stored, so a
//! crash repeats a hop, never loses one.
//!
//! A delay of 20 minutes is two hops. Accuracy: DelaySeconds counts whole
//! seconds, so an entry fires up to about a second late, plus the worker's
//! long poll.
//!
//! Delayed entries cannot be listed or cancelled: a delayed SQS message
//! cannot be read until it shows.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{BoxFuture, join_all};
use tracing::warn;

use super::{Outgoing, SqsError, SqsQueue, decode, encode, number_attribute, text};
use crate::backends::{BackendError, DelayStore, PutBack, Throttle};
use crate::entry::{Delivered, Entry, now_ms};

/// The shard a delayed entry returns to.
const SHARD: &str = "walden.shard";
/// How long a received message stays hidden while its hop is sent.
const HIDE_S: i32 = 60;

/// A namespace's delay queue and the way back to its shards.
pub struct SqsDelays {
    queue: SqsQueue,
    hop_s: u64,
    back: Arc<dyn PutBack>,
    namespace: Arc<str>,
}

impl SqsDelays {
    /// Open (creating if missing) the standard queue `name` for `namespace`;
    /// due entries go back through `back`.
    pub async fn open(
        client: &aws_sdk_sqs::Client,
        name: &str,
        namespace: &str,
        hop: Duration,
        back: Arc<dyn PutBack>,
    ) -> Result<Arc<Self>, SqsError> {
        Ok(Arc::new(Self {
            queue: SqsQueue::open(client, name).await?,
            hop_s: hop.as_secs().clamp(1, 900),
            back,
            namespace: namespace.into(),
        }))
    }

    /// The DelaySeconds of the next hop of an entry due at `due_ms`; 0 once
    /// it is due.
    fn hop_for(&self, due_ms: u64) -> i32 {
        let remaining = due_ms.saturating_sub(now_ms());
        remaining.div_ceil(1000).min(self.hop_s) as i32
    }

    fn outgoing(&self, shard: u32, entry: &Entry, sequence: u64) -> Outgoing {
        let (body, mut attributes) = encode(entry, sequence);
        attributes.insert(SHARD.to_string(), number_attribute(shard as u64));
        Outgoing {
            body,
            attributes,
            fifo: None,
            delay_s: self.hop_for(entry.due_ms),
        }
    }

    /// Run the worker that moves entries along until they are due. Every
    /// consumer process runs one; they share the queue's messages.
    pub fn start_worker(self: &Arc<Self>, wait: Duration) {
        let this = self.clone();
        tokio::spawn(async move { this.work(wait).await });
    }

    async fn work(self: Arc<Self>, wait: Duration) {
        let wait_s = wait.as_secs().clamp(1, 20) as i32;
        let mut error_log = Throttle::new();
        loop {
            let batch = match self.queue.receive(10, wait_s, HIDE_S).await {
                Ok(batch) => batch,
                Err(error) => {
                    if error_log.ready() {
                        warn!(queue = self.queue.name(), %error, "Delay queue read failed; retrying.");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            join_all(batch.iter().map(|msg| self.step(msg))).await;
        }
    }

    /// Move one message a hop on; deleted only once that hop is stored. A
    /// failure leaves it to show again when its hiding runs out.
    async fn step(&self, msg: &aws_sdk_sqs::types::Message) {
        let Some(receipt) = msg.receipt_handle.as_deref() else {
            return;
        };
        let (entry, sequence) = decode(msg);
        let shard = text(msg, SHARD)
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        let moved = match self.hop_for(entry.due_ms) {
            0 => self.back.put_back(shard, &entry, sequence).await,
            _ => self
                .queue
                .send(self.outgoing(shard, &entry, sequence))
                .await
                .map_err(BackendError::from),
        };
        let done = match moved {
            Ok(()) => self.queue.delete(receipt).await,
            Err(error) => {
                warn!(namespace = %self.namespace, id = %entry.id, %error, "Cannot move a delayed entry on; it will be retried.");
                return;
            }
        };
        if let Err(error) = done {
            // It shows again and takes the hop twice: at least once.
            warn!(id = %entry.id, %error, "Cannot delete a moved delayed entry.");
        }
    }
}

/// The DelayScheduler's store for an SQS namespace (or a composite one):
/// `delay` hands entries to the delay queue, and the worker fires them, so
/// the scheduler itself holds nothing.
impl DelayStore for SqsDelays {
    fn fires_itself(&self) -> bool {
        true
    }

    fn delay(&self, items: Vec<Delivered>) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            for chunk in items.chunks(10) {
                let messages = chunk
                    .iter()
                    .map(|d| self.outgoing(d.shard.shard, &d.entry, d.sequence))
                    .collect();
                for result in self.queue.send_ten(messages).await {
                    result?;
                }
            }
            Ok(())
        })
    }

    fn find(&self, _: &str, _: &str) -> BoxFuture<'_, Result<Option<Delivered>, BackendError>> {
        Box::pin(async {
            Err(BackendError::NotHere(
                "delayed entries on SQS cannot be listed or cancelled: SQS does not show a delayed message until it is due",
            ))
        })
    }
}
