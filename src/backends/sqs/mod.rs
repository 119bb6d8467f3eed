//! The SQS backend (aws-sdk-sqs): a namespace's entries on SQS queues, for
//! Netflix's most common WAL persona, the delayed queue.
//!
//! # Mapping
//! - Shard `n` is queue `n` of the namespace's queue list, so a key always
//!   lands on one queue, as it lands on one partition on Kafka.
//! - The body is the payload, base64-encoded (a body must be text). Message
//!   attributes carry `walden.id`, `walden.key`, `walden.sequence`,
//!   `walden.timestamp_ms`, `walden.due_ms` (when delayed), the entry's
//!   headers as one JSON attribute (`walden.headers`: SQS allows only ten
//!   attributes), and `traceparent`.
//! - On a FIFO queue (`.fifo`) the key is the MessageGroupId and the entry id
//!   the MessageDeduplicationId: SQS then keeps per-key order and drops a
//!   repeated id within its five-minute window. A standard queue keeps
//!   neither: entries of one key may arrive out of order or twice.
//!
//! # Sequence
//! SQS has no offset, so the sequence is a hybrid logical clock taken when
//! the entry is sent: milliseconds since the epoch shifted left 20 bits,
//! plus a counter, monotonic in each process ([`Hlc`]). With several producer
//! processes, the order inside a FIFO group is the order SQS accepted the
//! sends, while a target's version guard follows the clock, as Netflix
//! Key-Value's client timestamps do.
//!
//! # Durability
//! A send resolves `true` only on a successful SendMessage. A request the
//! server answered with an error, or that never left (the connection was
//! refused), is `false`; one that may have reached the server and got no
//! answer is `unknown`.
//!
//! # Consuming
//! Every consumer of a queue competes for its messages (there are no
//! consumer groups). A receive long-polls; a message stays invisible for the
//! visibility timeout while it is applied, and is deleted only when acked. A
//! nack makes it visible again at once. There is nothing to commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::SdkError;
use aws_sdk_sqs::types::{
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use base64::Engine;

use super::{BackendError, Consumer, Delivery, Producer, Sent};
use crate::entry::{Durable, Entry, ShardRef, now_ms};

const ID: &str = "walden.id";
const KEY: &str = "walden.key";
const SEQUENCE: &str = "walden.sequence";
const TIMESTAMP: &str = "walden.timestamp_ms";
const DUE: &str = "walden.due_ms";
const HEADERS: &str = "walden.headers";
const TRACEPARENT: &str = "traceparent";

/// The most a SendMessage may carry (body and attributes), in bytes.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Where one namespace's queue lives, and how to read it.
#[derive(Clone, Debug)]
pub struct SqsSettings {
    /// The queue's name (`.fifo` for a FIFO queue).
    pub queue: String,
    pub region: String,
    /// For a local or compatible server; `None` is AWS itself.
    pub endpoint_url: Option<String>,
    /// The longest a receive waits for a message (long polling), at most 20 s.
    pub wait_time: Duration,
    /// How long a received message stays hidden while it is applied.
    pub visibility_timeout: Duration,
    /// Messages per receive, at most 10.
    pub max_messages_per_poll: u32,
}

impl SqsSettings {
    pub fn is_fifo(&self) -> bool {
        self.queue.ends_with(".fifo")
    }

    /// A client for these settings; credentials come from the standard AWS
    /// chain (environment, profile, instance role).
    pub async fn client(&self) -> Client {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(self.region.clone()));
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        Client::new(&loader.load().await)
    }

    /// The queue's URL, creating it if it does not exist.
    pub async fn ensure_queue(&self, client: &Client) -> Result<String, SqsError> {
        let mut create = client.create_queue().queue_name(&self.queue);
        if self.is_fifo() {
            create = create.attributes(QueueAttributeName::FifoQueue, "true");
        }
        // CreateQueue returns the existing queue's URL when the attributes
        // match, so it is safe to repeat.
        let out = create
            .send()
            .await
            .map_err(|e| SqsError::call("CreateQueue", &self.queue, e))?;
        out.queue_url.ok_or_else(|| SqsError::Queue {
            queue: self.queue.clone(),
            message: "CreateQueue answered without a queue URL".into(),
        })
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum SqsError {
    /// A call failed; `durable` says whether a send may have taken effect.
    #[error("sqs {call} ({queue}): {message}")]
    Call {
        call: &'static str,
        queue: String,
        durable: Durable,
        message: String,
    },
    #[error("sqs queue {queue}: {message}")]
    Queue { queue: String, message: String },
}

impl SqsError {
    pub fn durable(&self) -> Durable {
        match self {
            SqsError::Call { durable, .. } => *durable,
            SqsError::Queue { .. } => Durable::False,
        }
    }

    fn call<E, R>(call: &'static str, queue: &str, e: SdkError<E, R>) -> Self
    where
        E: std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let durable = match &e {
            // Never sent, or answered with an error: nothing was stored.
            SdkError::ConstructionFailure(_) | SdkError::ServiceError(_) => Durable::False,
            SdkError::DispatchFailure(d) if d.as_connector_error().is_some_and(refused) => {
                Durable::False
            }
            // Sent, and no usable answer: the server may have it.
            _ => Durable::Unknown,
        };
        SqsError::Call {
            call,
            queue: queue.to_string(),
            durable,
            message: aws_sdk_sqs::error::DisplayErrorContext(&e).to_string(),
        }
    }
}

/// The connection was refused: the request never reached a server.
fn refused(e: &aws_sdk_sqs::error::ConnectorError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// A hybrid logical clock: `(ms << 20) + counter`, strictly increasing in
/// this process even when the wall clock stalls or steps back.
#[derive(Default)]
pub struct Hlc(AtomicU64);

impl Hlc {
    const COUNTER_BITS: u32 = 20;

    pub fn next(&self) -> u64 {
        let floor = now_ms() << Self::COUNTER_BITS;
        let mut last = self.0.load(Ordering::Relaxed);
        loop {
            let next = floor.max(last + 1);
            match self
                .0
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

/// A FIFO MessageGroupId or MessageDeduplicationId: 1 to 128 characters,
/// alphanumeric or ASCII punctuation.
fn fifo_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b.is_ascii_punctuation())
}

fn string_attribute(value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .expect("data type is set")
}

fn number_attribute(value: u64) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("Number")
        .string_value(value.to_string())
        .build()
        .expect("data type is set")
}

/// Sends entries to one queue.
#[derive(Clone)]
pub struct SqsProducer {
    client: Client,
    queue_url: String,
    settings: SqsSettings,
    clock: Arc<Hlc>,
}

impl SqsProducer {
    pub async fn new(settings: &SqsSettings) -> Result<Self, SqsError> {
        let client = settings.client().await;
        let queue_url = settings.ensure_queue(&client).await?;
        Ok(Self {
            client,
            queue_url,
            settings: settings.clone(),
            clock: Arc::new(Hlc::default()),
        })
    }

    /// Send one entry; resolves with its sequence once SQS has stored it.
    pub async fn send_entry(&self, entry: &Entry) -> Result<u64, SqsError> {
        let sequence = self.clock.next();
        let fifo = self.fifo_ids(entry)?;
        let mut send = self
            .client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(base64::engine::general_purpose::STANDARD.encode(&entry.payload))
            .set_message_attributes(Some(attributes(entry, sequence)));
        if let Some((group, dedup)) = fifo {
            send = send.message_group_id(group).message_deduplication_id(dedup);
        }
        send.send()
            .await
            .map_err(|e| SqsError::call("SendMessage", &self.settings.queue, e))?;
        Ok(sequence)
    }

    /// Send entries with SendMessageBatch, ten per call (the SQS limit), in
    /// order; one answer per entry, in order. An entry SQS refused within a
    /// batch that went through is `false`: it was not stored.
    pub async fn send_batch(&self, entries: &[Entry]) -> Vec<Result<u64, SqsError>> {
        let mut answers = Vec::with_capacity(entries.len());
        for chunk in entries.chunks(10) {
            answers.extend(self.send_ten(chunk).await);
        }
        answers
    }

    async fn send_ten(&self, entries: &[Entry]) -> Vec<Result<u64, SqsError>> {
        let queue = &self.settings.queue;
        let mut answers: Vec<Option<Result<u64, SqsError>>> = Vec::with_capacity(entries.len());
        let mut request = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let sequence = self.clock.next();
            let fifo = match self.fifo_ids(entry) {
                Ok(fifo) => fifo,
                Err(e) => {
                    answers.push(Some(Err(e)));
                    continue;
                }
            };
            let mut item = SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(base64::engine::general_purpose::STANDARD.encode(&entry.payload))
                .set_message_attributes(Some(attributes(entry, sequence)));
            if let Some((group, dedup)) = fifo {
                item = item.message_group_id(group).message_deduplication_id(dedup);
            }
            request.push(item.build().expect("id and body are set"));
            answers.push(Some(Ok(sequence)));
        }
        if !request.is_empty() {
            let sent = self
                .client
                .send_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(request))
                .send()
                .await;
            match sent {
                Ok(out) => {
                    for failed in out.failed {
                        let Some(slot) = failed
                            .id
                            .parse::<usize>()
                            .ok()
                            .and_then(|i| answers.get_mut(i))
                        else {
                            continue;
                        };
                        *slot = Some(Err(SqsError::Call {
                            call: "SendMessageBatch",
                            queue: queue.clone(),
                            durable: Durable::False,
                            message: format!(
                                "{}: {}",
                                failed.code,
                                failed.message.unwrap_or_default()
                            ),
                        }));
                    }
                }
                Err(e) => {
                    let e = SqsError::call("SendMessageBatch", queue, e);
                    for slot in answers.iter_mut() {
                        if matches!(slot, Some(Ok(_))) {
                            *slot = Some(Err(e.clone()));
                        }
                    }
                }
            }
        }
        answers.into_iter().map(|a| a.expect("answered")).collect()
    }

    /// A FIFO queue's MessageGroupId and MessageDeduplicationId for `entry`;
    /// `None` on a standard queue.
    fn fifo_ids(&self, entry: &Entry) -> Result<Option<(String, String)>, SqsError> {
        if !self.settings.is_fifo() {
            return Ok(None);
        }
        if !fifo_token(&entry.id) {
            return Err(SqsError::Queue {
                queue: self.settings.queue.clone(),
                message: format!(
                    "id {:?} cannot be a FIFO MessageDeduplicationId (1 to 128 ASCII letters, digits or punctuation)",
                    entry.id
                ),
            });
        }
        // A key that is not a valid group id is hashed: two keys may then
        // share a group, which orders them together and loses nothing.
        let key = entry.key.as_deref().unwrap_or(&entry.id);
        let group = match fifo_token(key) {
            true => key.to_string(),
            false => format!("h-{:08x}", crc32c::crc32c(key.as_bytes())),
        };
        Ok(Some((group, entry.id.clone())))
    }
}

/// An entry's message attributes.
fn attributes(entry: &Entry, sequence: u64) -> HashMap<String, MessageAttributeValue> {
    let mut a = HashMap::new();
    a.insert(ID.to_string(), string_attribute(&entry.id));
    a.insert(SEQUENCE.to_string(), number_attribute(sequence));
    a.insert(TIMESTAMP.to_string(), number_attribute(now_ms()));
    if let Some(key) = &entry.key {
        a.insert(KEY.to_string(), string_attribute(key));
    }
    if entry.due_ms > 0 {
        a.insert(DUE.to_string(), number_attribute(entry.due_ms));
    }
    if !entry.headers.is_empty() {
        let json = serde_json::to_string(&entry.headers).expect("strings serialize");
        a.insert(HEADERS.to_string(), string_attribute(&json));
    }
    if let Some((_, tp)) = entry.headers.iter().find(|(k, _)| k == TRACEPARENT) {
        a.insert(TRACEPARENT.to_string(), string_attribute(tp));
    }
    a
}

impl Producer for SqsProducer {
    async fn send(&self, _shard: &ShardRef, entry: Entry) -> Result<Sent, BackendError> {
        let sequence = self.send_entry(&entry).await?;
        Ok(Sent {
            sequence,
            durable: Durable::True,
        })
    }
}

/// Reads one queue (one shard).
pub struct SqsConsumer {
    client: Client,
    queue_url: String,
    settings: SqsSettings,
    shard: ShardRef,
}

impl SqsConsumer {
    pub async fn new(settings: &SqsSettings, shard: &ShardRef) -> Result<Self, SqsError> {
        let client = settings.client().await;
        let queue_url = settings.ensure_queue(&client).await?;
        Ok(Self {
            client,
            queue_url,
            settings: settings.clone(),
            shard: shard.clone(),
        })
    }

    fn entry_of(&self, msg: &aws_sdk_sqs::types::Message) -> (Entry, u64) {
        let attrs = msg.message_attributes.as_ref();
        let text = |k: &str| {
            attrs
                .and_then(|a: &HashMap<String, MessageAttributeValue>| a.get(k))
                .and_then(|v| v.string_value.clone())
        };
        let number = |k: &str| text(k).and_then(|v| v.parse::<u64>().ok());
        let payload = msg
            .body
            .as_deref()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .unwrap_or_default();
        let headers = text(HEADERS)
            .and_then(|h| serde_json::from_str(&h).ok())
            .unwrap_or_default();
        let id = text(ID)
            .or_else(|| msg.message_id.clone())
            .unwrap_or_default();
        let entry = Entry {
            id,
            key: text(KEY),
            headers,
            payload: payload.into(),
            timestamp_ms: number(TIMESTAMP).unwrap_or(0),
            due_ms: number(DUE).unwrap_or(0),
        };
        (entry, number(SEQUENCE).unwrap_or(0))
    }
}

impl Consumer for SqsConsumer {
    type Delivery = SqsDelivery;

    async fn receive(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<SqsDelivery>, BackendError> {
        let wait = timeout.min(self.settings.wait_time).as_secs().min(20) as i32;
        let max = max.clamp(1, self.settings.max_messages_per_poll.clamp(1, 10) as usize);
        let out = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(max as i32)
            .wait_time_seconds(wait)
            .visibility_timeout(self.settings.visibility_timeout.as_secs() as i32)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .map_err(|e| SqsError::call("ReceiveMessage", &self.settings.queue, e))?;
        let mut deliveries = Vec::new();
        for msg in out.messages.unwrap_or_default() {
            let (entry, sequence) = self.entry_of(&msg);
            let Some(receipt) = msg.receipt_handle else {
                continue;
            };
            deliveries.push(SqsDelivery {
                client: self.client.clone(),
                queue_url: self.queue_url.clone(),
                queue: self.settings.queue.clone(),
                receipt,
                shard: self.shard.clone(),
                sequence,
                entry,
            });
        }
        // A short wait (under a second) is a plain poll: SQS answers at once.
        if deliveries.is_empty() && wait == 0 {
            tokio::time::sleep(timeout.min(Duration::from_millis(200))).await;
        }
        Ok(deliveries)
    }

    /// Nothing to commit: an acked message is deleted.
    async fn commit(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// One received message; its receipt handle deletes it or shows it again.
pub struct SqsDelivery {
    client: Client,
    queue_url: String,
    queue: String,
    receipt: String,
    shard: ShardRef,
    sequence: u64,
    entry: Entry,
}

impl Delivery for SqsDelivery {
    fn entry(&self) -> &Entry {
        &self.entry
    }

    fn shard(&self) -> &ShardRef {
        &self.shard
    }

    fn sequence(&self) -> u64 {
        self.sequence
    }

    async fn ack(self) -> Result<(), (BackendError, Self)> {
        let done = self
            .client
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(&self.receipt)
            .send()
            .await;
        match done {
            Ok(_) => Ok(()),
            Err(e) => Err((SqsError::call("DeleteMessage", &self.queue, e).into(), self)),
        }
    }

    async fn nack(self) -> Result<(), (BackendError, Self)> {
        let shown = self
            .client
            .change_message_visibility()
            .queue_url(&self.queue_url)
            .receipt_handle(&self.receipt)
            .visibility_timeout(0)
            .send()
            .await;
        match shown {
            Ok(_) => Ok(()),
            // It shows again anyway once its visibility timeout runs out.
            Err(e) => Err((
                SqsError::call("ChangeMessageVisibility", &self.queue, e).into(),
                self,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_only_grows() {
        let clock = Hlc::default();
        let mut last = 0;
        for _ in 0..100_000 {
            let next = clock.next();
            assert!(next > last);
            last = next;
        }
        assert!(last >> Hlc::COUNTER_BITS >= now_ms() - 60_000);
    }

    #[test]
    fn fifo_tokens_are_checked() {
        assert!(fifo_token("order-7.v2"));
        assert!(!fifo_token(""));
        assert!(!fifo_token("has space"));
        assert!(!fifo_token("ünïcode"));
        assert!(!fifo_token(&"x".repeat(129)));
    }
}
