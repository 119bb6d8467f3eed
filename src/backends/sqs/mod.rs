//! The SQS backend (aws-sdk-sqs): a namespace's entries on SQS queues, for
//! Netflix's most common WAL persona, the delayed queue.
//!
//! # Mapping
//! - Shard `n` is queue `n` of the namespace's queue list, so a key always
//!   lands on one queue, as it lands on one partition on Kafka.
//! - The body is the payload, base64-encoded (a body must be text). Message
//!   attributes carry `walden.id`, `walden.key`, `walden.sequence`,
//!   `walden.attempts`, `walden.timestamp_ms`, `walden.due_ms` (when
//!   delayed), the entry's
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
//! consumer groups), so producer and consumer processes scale apart with no
//! rebalancing. A receive long-polls for up to `wait_time`; a poll that finds
//! nothing waits `poll_interval` before the next. A received message stays
//! hidden while its entry is applied: its visibility timeout is extended
//! every third of the timeout for as long as the delivery is held, so a slow target
//! does not get a second copy. A crashed consumer's messages show again one
//! timeout later; a delivery dropped unsettled shows again at once. A
//! message is deleted only when acked (applied, parked or dead-lettered); a
//! nack makes it visible again at once. There is nothing to commit.
//!
//! Delays and dead letters live on queues too ([`delays`], [`dlq`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::SdkError;
use aws_sdk_sqs::types::{
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use base64::Engine;

use futures_util::future::BoxFuture;

use super::{
    Appended, BackendError, Consumer, Delivery, EntryRejected, Producer, PutBack, WriteReply,
};
use crate::entry::{Durable, Entry, ShardRef, now_ms};

mod archive;
mod delays;
pub mod dlq;

pub use archive::SqsArchive;
pub use delays::SqsDelays;
pub use dlq::SqsDlq;
pub(crate) use dlq::letter_from;

const ID: &str = "walden.id";
const KEY: &str = "walden.key";
const SEQUENCE: &str = "walden.sequence";
const TIMESTAMP: &str = "walden.timestamp_ms";
const DUE: &str = "walden.due_ms";
const HEADERS: &str = "walden.headers";
const TRACEPARENT: &str = "traceparent";
/// Apply attempts before this send: 0 for a write, a letter's attempts in
/// the DLQ.
const ATTEMPTS: &str = "walden.attempts";
/// Room left for a caller's own attributes (SQS allows ten per message).
const EXTRA: usize = 2;

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
    /// The pause after a poll that found nothing.
    pub poll_interval: Duration,
}

impl SqsSettings {
    /// A client for these settings; credentials come from the standard AWS
    /// chain (environment, profile, instance role).
    pub async fn client(&self) -> Client {
        Self::client_for(&self.region, self.endpoint_url.as_deref()).await
    }

    /// A client for `region`, at `endpoint_url` if set.
    pub async fn client_for(region: &str, endpoint_url: Option<&str>) -> Client {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()));
        if let Some(url) = endpoint_url {
            loader = loader.endpoint_url(url);
        }
        Client::new(&loader.load().await)
    }

    /// The queue's URL, creating it if it does not exist.
    pub async fn ensure_queue(&self, client: &Client) -> Result<String, SqsError> {
        Ok(SqsQueue::open(client, &self.queue).await?.url)
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

/// One queue: the client, URL and name every call needs.
#[derive(Clone)]
pub struct SqsQueue {
    client: Client,
    url: String,
    name: String,
}

/// A message to send: an encoded entry and how SQS should treat it.
struct Outgoing {
    body: String,
    attributes: HashMap<String, MessageAttributeValue>,
    /// MessageGroupId and MessageDeduplicationId, on a FIFO queue.
    fifo: Option<(String, String)>,
    delay_s: i32,
}

impl SqsQueue {
    /// Open queue `name`, creating it if it does not exist (a FIFO queue if
    /// the name ends in `.fifo`).
    pub async fn open(client: &Client, name: &str) -> Result<Self, SqsError> {
        let mut create = client.create_queue().queue_name(name);
        if name.ends_with(".fifo") {
            create = create.attributes(QueueAttributeName::FifoQueue, "true");
        }
        // CreateQueue returns the existing queue's URL when the attributes
        // match, so it is safe to repeat.
        let out = create
            .send()
            .await
            .map_err(|e| SqsError::call("CreateQueue", name, e))?;
        let url = out.queue_url.ok_or_else(|| SqsError::Queue {
            queue: name.to_string(),
            message: "CreateQueue answered without a queue URL".into(),
        })?;
        Ok(Self {
            client: client.clone(),
            url,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_fifo(&self) -> bool {
        self.name.ends_with(".fifo")
    }

    /// The FIFO ids of `entry` on this queue (`None` on a standard queue):
    /// its key as the group, and `dedup` as the deduplication id.
    fn fifo_ids(&self, entry: &Entry, dedup: &str) -> Result<Option<(String, String)>, SqsError> {
        if !self.is_fifo() {
            return Ok(None);
        }
        if !fifo_token(dedup) {
            return Err(SqsError::Queue {
                queue: self.name.clone(),
                message: format!(
                    "id {dedup:?} cannot be a FIFO MessageDeduplicationId (1 to 128 ASCII letters, digits or punctuation)"
                ),
            });
        }
        Ok(Some((group_id(entry), dedup.to_string())))
    }

    async fn send(&self, m: Outgoing) -> Result<(), SqsError> {
        let mut send = self
            .client
            .send_message()
            .queue_url(&self.url)
            .message_body(m.body)
            .set_message_attributes(Some(m.attributes));
        if m.delay_s > 0 {
            send = send.delay_seconds(m.delay_s);
        }
        if let Some((group, dedup)) = m.fifo {
            send = send.message_group_id(group).message_deduplication_id(dedup);
        }
        send.send()
            .await
            .map_err(|e| SqsError::call("SendMessage", &self.name, e))?;
        Ok(())
    }

    /// Send up to ten messages in one SendMessageBatch; one answer per
    /// message, in order. A message SQS refused within a batch that went
    /// through is `false`: it was not stored.
    async fn send_ten(&self, messages: Vec<Outgoing>) -> Vec<Result<(), SqsError>> {
        let mut answers: Vec<Result<(), SqsError>> = (0..messages.len()).map(|_| Ok(())).collect();
        let request: Vec<_> = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let mut item = SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(m.body)
                    .set_message_attributes(Some(m.attributes));
                if m.delay_s > 0 {
                    item = item.delay_seconds(m.delay_s);
                }
                if let Some((group, dedup)) = m.fifo {
                    item = item.message_group_id(group).message_deduplication_id(dedup);
                }
                item.build().expect("id and body are set")
            })
            .collect();
        if request.is_empty() {
            return answers;
        }
        let sent = self
            .client
            .send_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(request))
            .send()
            .await;
        match sent {
            Ok(out) => {
                for failed in out.failed {
                    if let Some(slot) = failed
                        .id
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| answers.get_mut(i))
                    {
                        *slot = Err(SqsError::Call {
                            call: "SendMessageBatch",
                            queue: self.name.clone(),
                            durable: Durable::False,
                            message: format!(
                                "{}: {}",
                                failed.code,
                                failed.message.unwrap_or_default()
                            ),
                        });
                    }
                }
            }
            Err(e) => {
                let e = SqsError::call("SendMessageBatch", &self.name, e);
                answers.iter_mut().for_each(|a| *a = Err(e.clone()));
            }
        }
        answers
    }

    async fn receive(
        &self,
        max: usize,
        wait_s: i32,
        visibility_s: i32,
    ) -> Result<Vec<aws_sdk_sqs::types::Message>, SqsError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(wait_s.clamp(0, 20))
            .visibility_timeout(visibility_s)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .map_err(|e| SqsError::call("ReceiveMessage", &self.name, e))?;
        Ok(out.messages.unwrap_or_default())
    }

    async fn delete(&self, receipt: &str) -> Result<(), SqsError> {
        self.client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| SqsError::call("DeleteMessage", &self.name, e))?;
        Ok(())
    }

    async fn set_visibility(&self, receipt: &str, seconds: i32) -> Result<(), SqsError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(seconds)
            .send()
            .await
            .map_err(|e| SqsError::call("ChangeMessageVisibility", &self.name, e))?;
        Ok(())
    }

    /// How many messages the queue holds (visible, hidden and delayed), as
    /// SQS estimates it.
    pub async fn approximate_len(&self) -> Result<u64, SqsError> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(|e| SqsError::call("GetQueueAttributes", &self.name, e))?;
        Ok(out
            .attributes
            .unwrap_or_default()
            .values()
            .filter_map(|v| v.parse::<u64>().ok())
            .sum())
    }
}

/// A FIFO MessageGroupId for `entry`: its key (its id if it has none). A key
/// that is not a valid group id is hashed: two keys may then share a group,
/// which orders them together and loses nothing.
fn group_id(entry: &Entry) -> String {
    let key = entry.key.as_deref().unwrap_or(&entry.id);
    match fifo_token(key) {
        true => key.to_string(),
        false => format!("h-{:08x}", crc32c::crc32c(key.as_bytes())),
    }
}

/// A deduplication id for a later send of an entry (a delay hop coming due,
/// a redrive): distinct from the first send's, which SQS would drop as a
/// repeat within five minutes, and the same if this send is retried.
fn later_dedup(entry: &Entry, suffix: &str) -> String {
    let id = format!("{}:{suffix}", entry.id);
    match fifo_token(&id) {
        true => id,
        false => format!(
            "{:08x}-{}:{suffix}",
            crc32c::crc32c(entry.id.as_bytes()),
            uuid::Uuid::now_v7().simple()
        ),
    }
}

/// An entry as a message: the base64 body and the attributes.
fn encode(entry: &Entry, sequence: u64) -> (String, HashMap<String, MessageAttributeValue>) {
    (
        base64::engine::general_purpose::STANDARD.encode(&entry.payload),
        attributes(entry, sequence),
    )
}

/// A received message's entry and sequence (0 if it carries none).
fn decode(msg: &aws_sdk_sqs::types::Message) -> (Entry, u64) {
    let number = |k: &str| text(msg, k).and_then(|v| v.parse::<u64>().ok());
    let payload = msg
        .body
        .as_deref()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_default();
    let headers = text(msg, HEADERS)
        .and_then(|h| serde_json::from_str(&h).ok())
        .unwrap_or_default();
    let id = text(msg, ID)
        .or_else(|| msg.message_id.clone())
        .unwrap_or_default();
    let entry = Entry {
        id,
        key: text(msg, KEY),
        headers,
        payload: payload.into(),
        timestamp_ms: number(TIMESTAMP).unwrap_or(0),
        due_ms: number(DUE).unwrap_or(0),
    };
    (entry, number(SEQUENCE).unwrap_or(0))
}

/// A string message attribute of `msg`.
fn text(msg: &aws_sdk_sqs::types::Message, name: &str) -> Option<String> {
    msg.message_attributes
        .as_ref()
        .and_then(|a| a.get(name))
        .and_then(|v| v.string_value.clone())
}

/// The size SQS counts for an entry's message: the body (the payload in
/// base64, counted, not encoded: ingest checks every write), and each
/// attribute's name, type and value.
fn message_size(entry: &Entry) -> usize {
    let body = entry.payload.len().div_ceil(3) * 4;
    body + attributes(entry, u64::MAX)
        .iter()
        .map(|(k, v)| k.len() + v.data_type.len() + v.string_value.as_deref().map_or(0, str::len))
        .sum::<usize>()
}

/// Why `entry` cannot go onto an SQS queue, if it cannot: too large for a
/// message (with base64 and the attributes, and room for a DLQ letter's), or
/// an id a FIFO queue cannot deduplicate on. Checked at ingest, so the client
/// gets a 413 or a 400 instead of a failed send.
pub fn check_entry(entry: &Entry, fifo: bool, max_bytes: usize) -> Result<(), EntryRejected> {
    let size = message_size(entry) + dlq::LETTER_OVERHEAD;
    if size > max_bytes {
        return Err(EntryRejected::TooLarge(format!(
            "the entry would be a {size}-byte SQS message (payload {} bytes, base64-encoded, plus its \
             attributes and room for a dead letter's); the queues take at most {max_bytes} \
             (backend.max_message_bytes)",
            entry.payload.len()
        )));
    }
    if fifo && !fifo_token(&entry.id) {
        return Err(EntryRejected::Invalid(format!(
            "`id` {:?} cannot deduplicate on a FIFO queue: use 1 to 128 ASCII letters, digits or punctuation",
            entry.id
        )));
    }
    Ok(())
}

/// Sends entries to one queue.
#[derive(Clone)]
pub struct SqsProducer {
    queue: SqsQueue,
    clock: Arc<Hlc>,
}

impl SqsProducer {
    pub async fn new(settings: &SqsSettings) -> Result<Self, SqsError> {
        let client = settings.client().await;
        Self::with_client(&client, &settings.queue, Arc::new(Hlc::default())).await
    }

    /// A producer on `queue` that shares a client and a clock (one clock per
    /// process keeps sequences monotonic across the namespace's queues).
    pub async fn with_client(
        client: &Client,
        queue: &str,
        clock: Arc<Hlc>,
    ) -> Result<Self, SqsError> {
        Ok(Self {
            queue: SqsQueue::open(client, queue).await?,
            clock,
        })
    }

    fn outgoing(&self, entry: &Entry, sequence: u64, dedup: &str) -> Result<Outgoing, SqsError> {
        let (body, attributes) = encode(entry, sequence);
        Ok(Outgoing {
            fifo: self.queue.fifo_ids(entry, dedup)?,
            body,
            attributes,
            delay_s: 0,
        })
    }

    /// Send one entry; resolves with its sequence once SQS has stored it.
    pub async fn send_entry(&self, entry: &Entry) -> Result<u64, SqsError> {
        let sequence = self.clock.next();
        self.queue
            .send(self.outgoing(entry, sequence, &entry.id)?)
            .await?;
        Ok(sequence)
    }

    /// Put an entry back with the sequence it was first given (a delay that
    /// came due, a redrive), so a target's version guard ranks it where it
    /// was written. `why` keeps the FIFO deduplication id apart from the
    /// first send's.
    pub async fn put_back(&self, entry: &Entry, sequence: u64, why: &str) -> Result<(), SqsError> {
        let m = self.outgoing(entry, sequence, &later_dedup(entry, why))?;
        self.queue.send(m).await
    }

    /// Send entries with SendMessageBatch, ten per call (the SQS limit), in
    /// order; one answer per entry, in order.
    pub async fn send_batch(&self, entries: &[Entry]) -> Vec<Result<u64, SqsError>> {
        let mut answers = Vec::with_capacity(entries.len());
        for chunk in entries.chunks(10) {
            let mut slots = Vec::with_capacity(chunk.len());
            let mut messages = Vec::with_capacity(chunk.len());
            for entry in chunk {
                let sequence = self.clock.next();
                match self.outgoing(entry, sequence, &entry.id) {
                    Ok(m) => {
                        messages.push(m);
                        slots.push(Ok(sequence));
                    }
                    Err(e) => slots.push(Err(e)),
                }
            }
            let mut sent = self.queue.send_ten(messages).await.into_iter();
            for slot in slots {
                answers.push(match slot {
                    Ok(sequence) => sent
                        .next()
                        .expect("one answer per message")
                        .map(|()| sequence),
                    Err(e) => Err(e),
                });
            }
        }
        answers
    }
}

/// An entry's message attributes.
fn attributes(entry: &Entry, sequence: u64) -> HashMap<String, MessageAttributeValue> {
    let mut a = HashMap::with_capacity(8 + EXTRA);
    a.insert(ID.to_string(), string_attribute(&entry.id));
    a.insert(SEQUENCE.to_string(), number_attribute(sequence));
    a.insert(ATTEMPTS.to_string(), number_attribute(0));
    let timestamp = match entry.timestamp_ms {
        0 => now_ms(),
        t => t,
    };
    a.insert(TIMESTAMP.to_string(), number_attribute(timestamp));
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

/// A namespace on SQS as the service runs it: one client, and shard `n`'s
/// queue settings at `queues[n]`.
pub struct SqsNamespace {
    pub client: Client,
    pub queues: Vec<SqsSettings>,
    pub fifo: bool,
    /// The largest message the queues take (`backend.max_message_bytes`).
    pub max_message_bytes: usize,
    /// `None` in a consumer-only process.
    pub producers: Option<Arc<SqsShards>>,
    /// Where a copy of each entry sent is kept for replays
    /// (`backend.archive`).
    pub archive: Option<Arc<SqsArchive>>,
}

impl Producer for SqsNamespace {
    fn append(&self, shard: &ShardRef, writes: Vec<(Entry, WriteReply)>) {
        let Some(shards) = &self.producers else {
            return super::NoWrites.append(shard, writes);
        };
        let Some(archive) = self.archive.clone() else {
            return shards.append(shard, writes);
        };
        // Each answer waits for the entry's copy in the archive.
        let mut sent = Vec::with_capacity(writes.len());
        let mut waiting = Vec::with_capacity(writes.len());
        for (entry, reply) in writes {
            let (tx, rx) = tokio::sync::oneshot::channel();
            waiting.push((entry.clone(), reply, rx));
            sent.push((entry, tx));
        }
        shards.append(shard, sent);
        let n = shard.shard;
        tokio::spawn(async move {
            let mut answers = Vec::with_capacity(waiting.len());
            let mut copies = Vec::new();
            for (entry, reply, rx) in waiting {
                let answer = rx.await.unwrap_or(Err(BackendError::Lost(
                    "the SQS send ended without an answer",
                )));
                if let Ok(a) = &answer {
                    let entry = Entry {
                        timestamp_ms: a.timestamp_ms,
                        ..entry
                    };
                    copies.push((n, entry, a.sequence));
                }
                answers.push((reply, answer));
            }
            archive.keep(copies).await;
            for (reply, answer) in answers {
                let _ = reply.send(answer);
            }
        });
    }

    fn check_entry(&self, entry: &Entry) -> Result<(), EntryRejected> {
        check_entry(entry, self.fifo, self.max_message_bytes)
    }

    fn check_set(&self) -> Result<(), String> {
        Err("sets of mutations are not supported on SQS: a set spans several queues, and SQS cannot make several sends durable as one or replay them; use the embedded backend for this namespace".into())
    }
}

impl SqsNamespace {
    pub async fn consumer(&self, shard: &ShardRef) -> Result<SqsConsumer, SqsError> {
        let settings = self
            .queues
            .get(shard.shard as usize)
            .ok_or_else(|| SqsError::Queue {
                queue: String::new(),
                message: format!("shard {shard} has no queue"),
            })?;
        SqsConsumer::with_client(&self.client, settings, shard).await
    }
}

/// A namespace's queues, shard `n` being queue `n`: where writes go, and
/// the way back for delayed entries that come due.
pub struct SqsShards(pub Vec<SqsProducer>);

impl Producer for SqsShards {
    /// SendMessageBatch, ten at a time, on a task of its own; each reply is
    /// answered once SQS has stored that entry (or refused it).
    fn append(&self, shard: &ShardRef, writes: Vec<(Entry, WriteReply)>) {
        let Some(producer) = self.0.get(shard.shard as usize).cloned() else {
            for (_, tx) in writes {
                let _ = tx.send(Err(BackendError::NotHere(
                    "a write names a shard the namespace does not have",
                )));
            }
            return;
        };
        let timestamp_ms = now_ms();
        let (entries, replies): (Vec<Entry>, Vec<WriteReply>) = writes
            .into_iter()
            .map(|(entry, tx)| {
                (
                    Entry {
                        timestamp_ms,
                        ..entry
                    },
                    tx,
                )
            })
            .unzip();
        tokio::spawn(async move {
            let answers = producer.send_batch(&entries).await;
            for (tx, answer) in replies.into_iter().zip(answers) {
                let _ = tx.send(answer.map_err(BackendError::from).map(|sequence| Appended {
                    sequence,
                    timestamp_ms,
                    durable: Durable::True,
                }));
            }
        });
    }
}

impl PutBack for SqsShards {
    fn put_back<'a>(
        &'a self,
        shard: u32,
        entry: &'a Entry,
        sequence: u64,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let queue = self.0.get(shard as usize).ok_or(BackendError::NotHere(
                "a delayed entry names a shard the namespace does not have",
            ))?;
            // The due time keeps this send's deduplication id apart from the
            // first one's.
            queue
                .put_back(entry, sequence, &format!("d{}", entry.due_ms))
                .await?;
            Ok(())
        })
    }
}

/// Reads one queue (one shard).
pub struct SqsConsumer {
    queue: SqsQueue,
    settings: SqsSettings,
    shard: ShardRef,
    held: Arc<Held>,
}

/// The deliveries a shard holds (received, not yet acked or nacked), and
/// their payload bytes.
#[derive(Debug, Default)]
struct Held {
    count: AtomicUsize,
    bytes: AtomicUsize,
}

impl SqsConsumer {
    pub async fn new(settings: &SqsSettings, shard: &ShardRef) -> Result<Self, SqsError> {
        let client = settings.client().await;
        Self::with_client(&client, settings, shard).await
    }

    pub async fn with_client(
        client: &Client,
        settings: &SqsSettings,
        shard: &ShardRef,
    ) -> Result<Self, SqsError> {
        Ok(Self {
            queue: SqsQueue::open(client, &settings.queue).await?,
            settings: settings.clone(),
            shard: shard.clone(),
            held: Arc::default(),
        })
    }

    /// Counts the deliveries held; there is no offset to commit.
    pub fn checkpointer(&self) -> SqsCheckpointer {
        SqsCheckpointer {
            held: self.held.clone(),
        }
    }
}

impl Consumer for SqsConsumer {
    type Delivery = SqsDelivery;

    /// Long-polls for up to the queue's `wait_time`, whatever `timeout`
    /// says: SQS waits in whole seconds, and a long poll is what keeps an
    /// idle queue cheap. A poll that finds nothing then waits out the rest
    /// of `poll_interval`.
    async fn receive(
        &mut self,
        max: usize,
        _timeout: Duration,
    ) -> Result<Vec<SqsDelivery>, BackendError> {
        let wait = self.settings.wait_time.as_secs().min(20) as i32;
        let max = max.clamp(1, self.settings.max_messages_per_poll.clamp(1, 10) as usize);
        let visibility = self.settings.visibility_timeout;
        let messages = self
            .queue
            .receive(max, wait, visibility.as_secs() as i32)
            .await?;
        let mut deliveries = Vec::with_capacity(messages.len());
        for msg in messages {
            let (entry, sequence) = decode(&msg);
            let Some(receipt) = msg.receipt_handle else {
                continue;
            };
            let receipt: Arc<str> = receipt.into();
            deliveries.push(SqsDelivery {
                hold: Box::new(Hold::start(
                    self.queue.clone(),
                    receipt,
                    visibility,
                    self.held.clone(),
                    entry.payload.len(),
                )),
                shard: self.shard.clone(),
                sequence,
                entry: entry.into(),
            });
        }
        if deliveries.is_empty() {
            tokio::time::sleep(
                self.settings
                    .poll_interval
                    .saturating_sub(Duration::from_secs(wait as u64)),
            )
            .await;
        }
        Ok(deliveries)
    }

    /// Nothing to commit: an acked message is deleted.
    async fn commit(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// An SQS shard's progress: only what deliveries are held (received, not
/// yet acked or nacked), which bounds how far the shard reads ahead.
#[derive(Clone)]
pub struct SqsCheckpointer {
    held: Arc<Held>,
}

impl SqsCheckpointer {
    pub fn outstanding(&self) -> usize {
        self.held.count.load(Ordering::Relaxed)
    }

    pub fn outstanding_bytes(&self) -> usize {
        self.held.bytes.load(Ordering::Relaxed)
    }
}

/// One log line per interval for every keep-alive of the process: in an
/// outage they all fail at once.
static KEEP_ALIVE_LOG: std::sync::Mutex<super::Throttle> =
    std::sync::Mutex::new(super::Throttle::new());

/// Keeps a received message hidden while its delivery is held: extends the
/// visibility timeout every third of the timeout, until dropped. A delivery dropped
/// unsettled (a rewind, a shutdown) shows its message again at once, so
/// another consumer need not wait out the timeout.
struct Hold {
    keep_alive: tokio::task::AbortHandle,
    held: Arc<Held>,
    /// Payload bytes of the held message.
    bytes: usize,
    queue: SqsQueue,
    receipt: Arc<str>,
    /// Acked or nacked: nothing to show again.
    settled: bool,
}

impl Hold {
    fn start(
        queue: SqsQueue,
        receipt: Arc<str>,
        visibility: Duration,
        held: Arc<Held>,
        bytes: usize,
    ) -> Self {
        held.count.fetch_add(1, Ordering::Relaxed);
        held.bytes.fetch_add(bytes, Ordering::Relaxed);
        let seconds = visibility.as_secs().max(1) as i32;
        let (q, r) = (queue.clone(), receipt.clone());
        let keep_alive = tokio::spawn(async move {
            // A third, not a half: a slow server's answer must not outlast
            // the margin, or the message shows and is delivered twice.
            let every = (visibility / 3).max(Duration::from_millis(500));
            loop {
                tokio::time::sleep(every).await;
                if let Err(error) = q.set_visibility(&r, seconds).await
                    && KEEP_ALIVE_LOG.lock().unwrap().ready()
                {
                    // It shows again when the timeout runs out, and is
                    // delivered again: at least once, never lost.
                    tracing::warn!(queue = q.name(), %error, "Cannot extend a message's visibility.");
                }
            }
        })
        .abort_handle();
        Self {
            keep_alive,
            held,
            bytes,
            queue,
            receipt,
            settled: false,
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.keep_alive.abort();
        self.held.count.fetch_sub(1, Ordering::Relaxed);
        self.held.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
        if self.settled {
            return;
        }
        // Best effort: if it fails, or the runtime is gone, the message
        // shows when its timeout runs out.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (queue, receipt) = (self.queue.clone(), self.receipt.clone());
            runtime.spawn(async move {
                let _ = queue.set_visibility(&receipt, 0).await;
            });
        }
    }
}

/// One received message; its receipt handle deletes it or shows it again.
pub struct SqsDelivery {
    shard: ShardRef,
    sequence: u64,
    entry: Arc<Entry>,
    /// Boxed: it keeps every delivery enum small.
    hold: Box<Hold>,
}

impl Delivery for SqsDelivery {
    fn entry(&self) -> &Arc<Entry> {
        &self.entry
    }

    fn shard(&self) -> &ShardRef {
        &self.shard
    }

    fn sequence(&self) -> u64 {
        self.sequence
    }

    async fn ack(mut self) -> Result<(), (BackendError, Self)> {
        match self.hold.queue.delete(&self.hold.receipt).await {
            Ok(()) => {
                self.hold.settled = true;
                Ok(())
            }
            Err(e) => Err((e.into(), self)),
        }
    }

    async fn nack(mut self) -> Result<(), (BackendError, Self)> {
        // Stop extending first, so the extension cannot hide it again.
        self.hold.keep_alive.abort();
        match self.hold.queue.set_visibility(&self.hold.receipt, 0).await {
            Ok(()) => {
                self.hold.settled = true;
                Ok(())
            }
            // It shows again anyway once its visibility timeout runs out.
            Err(e) => Err((e.into(), self)),
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
    fn the_counted_size_is_the_encoded_size() {
        for n in [0, 1, 2, 3, 4, 100, 190_001] {
            let entry = Entry {
                id: "e".into(),
                key: Some("k".into()),
                payload: vec![7u8; n].into(),
                timestamp_ms: 1_800_000_000_000,
                ..Entry::default()
            };
            let (body, attributes) = encode(&entry, u64::MAX);
            let attrs: usize = attributes
                .iter()
                .map(|(k, v)| {
                    k.len() + v.data_type.len() + v.string_value.as_deref().map_or(0, str::len)
                })
                .sum();
            assert_eq!(message_size(&entry), body.len() + attrs, "payload of {n}");
        }
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
