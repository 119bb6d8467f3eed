//! Sends entries to a namespace's topic, answering from the delivery report.

use rdkafka::ClientContext;
use rdkafka::bindings::{rd_kafka_message_status, rd_kafka_msg_status_t};
use rdkafka::message::Message;
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use tokio::sync::oneshot;

use super::{KafkaError, KafkaSettings, headers};
use crate::backends::{Appended, BackendError, Producer, WriteReply};
use crate::entry::{
    Durable, Entry, SET_ATTEMPT_HEADER, SET_DEADLINE_HEADER, SET_MARKER_SHARD, ShardRef,
    TARGETS_HEADER, now_ms,
};

type Report = Result<i64, (rdkafka::error::KafkaError, Durable)>;

/// Who a delivery report goes to.
enum Waiter {
    /// A send awaiting its report ([`PendingReport`]).
    Report(oneshot::Sender<Report>),
    /// A write answered straight from the callback: one wakeup fewer per
    /// entry on the HTTP path.
    Write {
        reply: WriteReply,
        timestamp_ms: u64,
    },
}

/// Routes each delivery report to the send waiting for it.
struct Reports;

impl ClientContext for Reports {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        super::log(level, facility, message);
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<Waiter>;

    fn delivery(&self, result: &DeliveryResult<'_>, waiter: Self::DeliveryOpaque) {
        let report = match result {
            Ok(msg) => Ok(msg.offset()),
            Err((e, msg)) => {
                // SAFETY: the message is valid for the length of this callback.
                let status = unsafe { rd_kafka_message_status(msg.ptr()) };
                let durable = match status {
                    rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_NOT_PERSISTED => Durable::False,
                    // Persisted and yet failed, or possibly persisted: the
                    // broker may have it.
                    _ => Durable::Unknown,
                };
                Err((e.clone(), durable))
            }
        };
        // The sender may have given up waiting; that is fine.
        match *waiter {
            Waiter::Report(tx) => {
                let _ = tx.send(report);
            }
            Waiter::Write {
                reply,
                timestamp_ms,
            } => {
                let answer = match report {
                    Ok(offset) => Ok(Appended {
                        sequence: offset as u64,
                        timestamp_ms,
                        durable: Durable::True,
                    }),
                    Err((e, durable)) => {
                        let (topic, partition) = match result {
                            Ok(m) | Err((_, m)) => (m.topic(), m.partition()),
                        };
                        let partition = u32::try_from(partition).ok();
                        Err(pending_error(topic, partition, e, durable).into())
                    }
                };
                let _ = reply.send(answer);
            }
        }
    }
}

/// Produces entries with `acks=all` and idempotence, one partition per shard.
#[derive(Clone)]
pub struct KafkaProducer {
    producer: std::sync::Arc<ThreadedProducer<Reports>>,
    topic: String,
    ack_timeout: std::time::Duration,
}

impl KafkaProducer {
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        let timeout = settings.ack_timeout.as_millis().max(1).to_string();
        let producer = settings
            .client_config(&[
                ("acks", "all"),
                ("enable.idempotence", "true"),
                // A send is answered within the server's ack timeout.
                ("message.timeout.ms", &timeout),
                ("linger.ms", "1"),
            ])
            .create_with_context(Reports)
            .map_err(|e| KafkaError::client("producer", &settings.topic, e))?;
        Ok(Self {
            producer: std::sync::Arc::new(producer),
            topic: settings.topic.clone(),
            ack_timeout: settings.ack_timeout,
        })
    }

    /// Run one of librdkafka's blocking transaction calls off the async
    /// threads, bounded by the ack timeout.
    async fn blocking(
        &self,
        what: &'static str,
        call: impl FnOnce(
            &ThreadedProducer<Reports>,
            std::time::Duration,
        ) -> rdkafka::error::KafkaResult<()>
        + Send
        + 'static,
    ) -> Result<(), KafkaError> {
        let (producer, timeout, topic) =
            (self.producer.clone(), self.ack_timeout, self.topic.clone());
        tokio::task::spawn_blocking(move || call(&producer, timeout))
            .await
            .map_err(|e| KafkaError::Topic {
                topic: topic.clone(),
                message: format!("{what}: {e}"),
            })?
            .map_err(|e| KafkaError::client(what, &topic, e))
    }

    /// A producer to `topic` on the same client: one librdkafka instance (its
    /// threads and connections) serves every topic of a namespace.
    pub(crate) fn to_topic(&self, topic: &str) -> Self {
        Self {
            producer: self.producer.clone(),
            topic: topic.to_string(),
            ack_timeout: self.ack_timeout,
        }
    }

    /// Produce `entry` to `partition` (or where its key hashes, if `None`),
    /// with `extra` headers after the entry's; resolves with its offset and
    /// timestamp once the delivery report says it is written.
    pub(crate) async fn produce(
        &self,
        partition: Option<u32>,
        entry: &Entry,
        extra: &[(&str, String)],
    ) -> Result<(u64, u64), KafkaError> {
        let key = entry.key.as_deref().unwrap_or(&entry.id);
        self.produce_record(
            partition,
            key,
            Some(entry.payload.as_ref()),
            headers(entry, extra),
        )
        .await
    }

    /// Produce one record (`payload` `None`: a tombstone); resolves with its
    /// offset and timestamp from the delivery report.
    pub(crate) async fn produce_record(
        &self,
        partition: Option<u32>,
        key: &str,
        payload: Option<&[u8]>,
        headers: rdkafka::message::OwnedHeaders,
    ) -> Result<(u64, u64), KafkaError> {
        let pending = self.enqueue(partition, key, payload, headers)?;
        // librdkafka can overrun `message.timeout.ms` while a connection is
        // being re-established, so the wait is bounded here too. Past it, the
        // message may still be written: the answer is "unknown".
        match tokio::time::timeout(self.ack_timeout, pending.wait()).await {
            Ok(answer) => answer,
            Err(_) => Err(self.timed_out(partition)),
        }
    }

    /// Queue `entry` for `partition`; `reply` is answered from its delivery
    /// report (or at once, if librdkafka refuses it). The caller bounds its
    /// wait (the HTTP path by `server.ack_timeout_ms`).
    pub(crate) fn write(&self, partition: u32, entry: &Entry, reply: WriteReply) {
        let timestamp_ms = now_ms();
        let key = entry.key.as_deref().unwrap_or(&entry.id);
        let waiter = Box::new(Waiter::Write {
            reply,
            timestamp_ms,
        });
        let record = BaseRecord::with_opaque_to(&self.topic, waiter)
            .key(key)
            .payload(entry.payload.as_ref())
            .headers(headers(entry, &[]))
            .timestamp(timestamp_ms as i64)
            .partition(partition as i32);
        if let Err((e, record)) = self.producer.send(record) {
            // Refused before it was queued (queue full, too large): never sent.
            if let Waiter::Write { reply, .. } = *record.delivery_opaque {
                let error = pending_error(&self.topic, Some(partition), e, Durable::False);
                let _ = reply.send(Err(error.into()));
            }
        }
    }

    fn enqueue(
        &self,
        partition: Option<u32>,
        key: &str,
        payload: Option<&[u8]>,
        headers: rdkafka::message::OwnedHeaders,
    ) -> Result<PendingReport, KafkaError> {
        let (tx, rx) = oneshot::channel();
        let timestamp_ms = now_ms();
        let mut record = BaseRecord::with_opaque_to(&self.topic, Box::new(Waiter::Report(tx)))
            .key(key)
            .headers(headers)
            .timestamp(timestamp_ms as i64);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        if let Some(p) = partition {
            record = record.partition(p as i32);
        }
        if let Err((e, _)) = self.producer.send(record) {
            // Refused before it was queued (queue full, too large): never sent.
            return Err(pending_error(&self.topic, partition, e, Durable::False));
        }
        Ok(PendingReport {
            rx,
            topic: self.topic.clone(),
            partition,
            timestamp_ms,
        })
    }
}

fn pending_error(
    topic: &str,
    partition: Option<u32>,
    source: rdkafka::error::KafkaError,
    durable: Durable,
) -> KafkaError {
    KafkaError::Produce {
        topic: topic.to_string(),
        partition,
        durable,
        source: Box::new(source),
    }
}

/// A queued record's delivery report, to come.
pub(crate) struct PendingReport {
    rx: oneshot::Receiver<Report>,
    topic: String,
    partition: Option<u32>,
    timestamp_ms: u64,
}

impl PendingReport {
    /// The record's offset and timestamp once the broker has it. Unbounded:
    /// librdkafka answers by `message.timeout.ms`, but can overrun it.
    pub(crate) async fn wait(self) -> Result<(u64, u64), KafkaError> {
        match self.rx.await {
            Ok(Ok(offset)) => Ok((offset as u64, self.timestamp_ms)),
            Ok(Err((e, durable))) => Err(pending_error(&self.topic, self.partition, e, durable)),
            // The producer went away with the message queued.
            Err(_) => Err(pending_error(
                &self.topic,
                self.partition,
                rdkafka::error::KafkaError::Canceled,
                Durable::Unknown,
            )),
        }
    }
}

impl Producer for KafkaProducer {
    /// Each entry goes to librdkafka's queue for the shard's partition; its
    /// reply is answered from the delivery report (acks=all).
    fn append(&self, shard: &ShardRef, writes: Vec<(Entry, WriteReply)>) {
        for (entry, tx) in writes {
            self.write(shard.shard, &entry, tx);
        }
    }

    /// The set's mutations first, then (once all are acked, and before the
    /// deadline) its marker: see `super::sets`.
    fn append_set(&self, writes: Vec<(ShardRef, Entry, WriteReply)>) {
        let this = self.clone();
        tokio::spawn(async move { this.write_set(writes).await });
    }

    fn check_set(&self) -> Result<(), String> {
        Ok(())
    }
}

impl KafkaProducer {
    /// Write a set in two phases; every reply gets the set's outcome.
    async fn write_set(&self, mut writes: Vec<(ShardRef, Entry, WriteReply)>) {
        let Some((_, marker, marker_reply)) = writes.pop() else {
            return;
        };
        let attempt = format!("{:016x}", rand::random::<u64>());
        // The marker is written by then, or never: past it (plus the
        // clocks' skew), the mutations may ask for the set to be given up.
        let deadline = now_ms() + 2 * self.ack_timeout.as_millis() as u64;
        let extra = [
            (SET_ATTEMPT_HEADER, attempt),
            (SET_DEADLINE_HEADER, deadline.to_string()),
        ];
        let sends: Vec<_> = writes
            .iter()
            .map(|(shard, entry, _)| {
                let key = entry.key.as_deref().unwrap_or(&entry.id);
                let payload = Some(entry.payload.as_ref());
                self.enqueue(Some(shard.shard), key, payload, headers(entry, &extra))
            })
            .collect();
        let mut written = Vec::with_capacity(sends.len());
        let mut failed: Option<KafkaError> = None;
        for send in sends {
            let answer = match send {
                Ok(pending) => tokio::time::timeout(self.ack_timeout, pending.wait())
                    .await
                    .unwrap_or_else(|_| Err(self.timed_out(None))),
                Err(e) => Err(e),
            };
            match answer {
                Ok(at) => written.push(at),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        // Without its marker the set is never applied: "false" whatever
        // became of its mutations.
        let why = match failed {
            Some(e) => Some(format!("a mutation of the set was not written ({e})")),
            None if now_ms() >= deadline => {
                Some("the set's mutations were not all written before its deadline".into())
            }
            None => None,
        };
        let not_written = |why: &str| KafkaError::Topic {
            topic: self.topic.clone(),
            message: format!("{why}; the set was not written, and none of it will be applied"),
        };
        if let Some(why) = why {
            for (_, _, reply) in writes {
                let _ = reply.send(Err(not_written(&why).into()));
            }
            let _ = marker_reply.send(Err(not_written(&why).into()));
            return;
        }
        let answer = match self.produce(Some(SET_MARKER_SHARD), &marker, &extra).await {
            Ok(at) if now_ms() < deadline => Ok(at),
            // It may be given up yet: a mutation may have asked first.
            Ok(_) => Err(self.timed_out(Some(SET_MARKER_SHARD))),
            Err(e) => Err(e),
        };
        match answer {
            Ok((sequence, timestamp_ms)) => {
                let appended = |(sequence, timestamp_ms)| Appended {
                    sequence,
                    timestamp_ms,
                    durable: Durable::True,
                };
                for ((_, _, reply), at) in writes.into_iter().zip(written) {
                    let _ = reply.send(Ok(appended(at)));
                }
                let _ = marker_reply.send(Ok(appended((sequence, timestamp_ms))));
            }
            Err(e) => {
                let durable = e.durable();
                let again = |e: &KafkaError| KafkaError::Produce {
                    topic: self.topic.clone(),
                    partition: Some(SET_MARKER_SHARD),
                    durable,
                    source: Box::new(match e {
                        KafkaError::Produce { source, .. } => (**source).clone(),
                        _ => rdkafka::error::KafkaError::Canceled,
                    }),
                };
                for (_, _, reply) in writes {
                    let _ = reply.send(Err(again(&e).into()));
                }
                let _ = marker_reply.send(Err(e.into()));
            }
        }
    }

    /// A send whose report did not come in time: it may yet be written.
    fn timed_out(&self, partition: Option<u32>) -> KafkaError {
        pending_error(
            &self.topic,
            partition,
            rdkafka::error::KafkaError::MessageProduction(
                rdkafka::types::RDKafkaErrorCode::MessageTimedOut,
            ),
            Durable::Unknown,
        )
    }
}

/// A delay that came due elsewhere (a composite namespace's SQS delay queue)
/// returns to its partition with its original sequence, as a redrive does.
impl crate::backends::PutBack for KafkaProducer {
    fn put_back<'a>(
        &'a self,
        shard: u32,
        entry: &'a Entry,
        sequence: u64,
    ) -> futures_util::future::BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let sequence = sequence.to_string();
            self.produce(Some(shard), entry, &[(super::REDRIVEN_SEQUENCE, sequence)])
                .await?;
            Ok(())
        })
    }
}

/// A user's topic that a target publishes to (see [`crate::backends::Topic`]).
pub struct KafkaTopic {
    settings: KafkaSettings,
    producer: KafkaProducer,
    /// For [`Topic::publish_all`](crate::backends::Topic::publish_all) when
    /// a transactional id is set: one transaction at a time.
    transactions: Option<Transactions>,
}

/// A transactional producer, made and initialised on first use, and made
/// again after a transaction fails.
struct Transactions {
    settings: KafkaSettings,
    producer: tokio::sync::Mutex<Option<KafkaProducer>>,
}

impl KafkaTopic {
    pub fn open(address: crate::backends::TopicAddress<'_>) -> Result<Self, KafkaError> {
        let settings = KafkaSettings {
            brokers: address.brokers.into(),
            topic: address.topic.into(),
            // Unused: the topic is the user's, with its own layout.
            partitions: 0,
            librdkafka: address.options.clone(),
            ack_timeout: address.timeout,
        };
        let producer = KafkaProducer::new(&settings)?;
        let transactions = address.transactional_id.map(|id| {
            let mut settings = settings.clone();
            settings.librdkafka.insert("transactional.id".into(), id);
            Transactions {
                settings,
                producer: tokio::sync::Mutex::new(None),
            }
        });
        Ok(Self {
            settings,
            producer,
            transactions,
        })
    }

    /// Produce `entries` in one transaction: committed whole, or aborted.
    async fn transact(
        &self,
        txn: &Transactions,
        entries: &[(&Entry, Vec<(&str, String)>)],
    ) -> Result<(), KafkaError> {
        let mut slot = txn.producer.lock().await;
        let producer = match slot.as_ref() {
            Some(p) => p.clone(),
            None => {
                let p = KafkaProducer::new(&txn.settings)?;
                p.blocking("init transactions", |p, t| p.init_transactions(t))
                    .await?;
                slot.insert(p).clone()
            }
        };
        producer
            .blocking("begin transaction", |p, _| p.begin_transaction())
            .await?;
        let stripped: Vec<_> = entries.iter().map(|(e, _)| strip_targets(e)).collect();
        // Queued in order (join_all polls each once, in turn, before waiting).
        let produced = futures_util::future::join_all(
            stripped
                .iter()
                .zip(entries)
                .map(|(entry, (_, extra))| producer.produce(None, entry.as_ref(), extra)),
        )
        .await;
        let outcome = match produced.into_iter().find_map(Result::err) {
            Some(e) => Err(e),
            None => {
                producer
                    .blocking("commit transaction", |p, t| p.commit_transaction(t))
                    .await
            }
        };
        if outcome.is_err() {
            // Nothing of an aborted transaction is seen by read_committed
            // readers. The producer is then made again: after an abort,
            // librdkafka purged the next transaction's messages (seen on
            // its mock cluster), and a new one starts clean.
            let _ = producer
                .blocking("abort transaction", |p, t| p.abort_transaction(t))
                .await;
            *slot = None;
        }
        outcome
    }
}

/// The targets an entry was for are its namespace's routing, not the topic's
/// readers' (another Walden reading it as its backend would take them for
/// its own targets).
fn strip_targets(entry: &Entry) -> std::borrow::Cow<'_, Entry> {
    match entry.header(TARGETS_HEADER) {
        None => std::borrow::Cow::Borrowed(entry),
        Some(_) => {
            let mut e = entry.clone();
            e.headers.retain(|(k, _)| k != TARGETS_HEADER);
            std::borrow::Cow::Owned(e)
        }
    }
}

impl crate::backends::Topic for KafkaTopic {
    fn publish<'a>(
        &'a self,
        entry: &'a Entry,
        extra: &'a [(&'a str, String)],
    ) -> futures_util::future::BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.producer
                .produce(None, strip_targets(entry).as_ref(), extra)
                .await?;
            Ok(())
        })
    }

    fn publish_all<'a>(
        &'a self,
        entries: &'a [(&'a Entry, Vec<(&'a str, String)>)],
    ) -> futures_util::future::BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            match &self.transactions {
                Some(txn) => Ok(self.transact(txn, entries).await?),
                None => {
                    for (entry, extra) in entries {
                        crate::backends::Topic::publish(self, entry, extra).await?;
                    }
                    Ok(())
                }
            }
        })
    }

    fn check(&self) -> futures_util::future::BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move { Ok(self.settings.topic_exists().await?) })
    }
}
