//! Dead letters on SQS: a namespace's DLQ is a queue (`<queue>-dlq`, or
//! `<queue>-dlq.fifo` beside FIFO queues), managed by Walden.
//!
//! A letter is the entry's own message (its body and attributes, with the
//! origin sequence as `walden.sequence`) plus one JSON attribute,
//! `walden.dlq`: origin shard and target, attempts, failure times, the last
//! error and the letter's DLQ sequence (a clock reading, so letters list in
//! the order they died). On a FIFO DLQ each letter is its own message group,
//! so one letter never hides the others. A shard stores a key's letters one
//! after another, so the queue takes them in the key's order, and a redrive
//! puts them back in that order ([`SqsDlq::redrive_selected`]).
//!
//! # Listing is a best-effort peek
//! SQS cannot read a queue without receiving it, and a receive hides what it
//! returns. A list or get receives every letter it can (hiding each for a
//! few seconds), then shows them all again at once. Two admins listing at
//! the same moment may each see part; SQS's own receive may also miss a
//! message on a large queue. The count in a list is SQS's approximate one.
//!
//! # Native redrive
//! A `RedrivePolicy` on the namespace's queues (SQS moving a message after
//! `maxReceiveCount` receives) is respected: Walden neither sets nor removes
//! one. Messages SQS moves there lack `walden.dlq`; they list with
//! `attempts = 0` and the error "moved by the queue's RedrivePolicy", and
//! redrive like any other letter.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use aws_sdk_sqs::Client;
use serde::{Deserialize, Serialize};

use super::{Hlc, Outgoing, SqsError, SqsProducer, SqsQueue, decode, encode, later_dedup, text};
use futures_util::StreamExt;

use crate::backends::{BackendError, DeadLetter, DeadLetters, Origin, RedriveReport, Selection};
use crate::entry::{Entry, ShardRef};
use crate::routing::RouteHash;

const LETTER: &str = "walden.dlq";
/// Longest last error kept in a letter, in bytes.
const MAX_ERROR: usize = 1024;
/// Room a letter's `walden.dlq` attribute needs beyond the entry's message;
/// ingest keeps every entry this far under the SQS limit.
pub const LETTER_OVERHEAD: usize = MAX_ERROR + 512;
/// How long a peek hides what it received before showing it again.
const PEEK_HIDE_S: i32 = 10;
/// Most letters one peek gathers.
const PEEK_MAX: usize = 10_000;
/// How long a redrive hides the letters it took while it puts them back.
const REDRIVE_HIDE_S: i32 = 300;
/// Keys a redrive puts back at once (each key's letters one at a time).
const REDRIVE_KEYS_AT_ONCE: usize = 8;

/// What a letter adds to its entry's message.
#[derive(Serialize, Deserialize)]
struct LetterMeta {
    namespace: String,
    shard: u32,
    target: String,
    attempts: u32,
    first_failure_ms: u64,
    last_failure_ms: u64,
    last_error: String,
    dlq_sequence: u64,
}

/// A namespace's dead-letter queue, and the way back to its queues.
pub struct SqsDlq {
    queue: SqsQueue,
    clock: Arc<Hlc>,
    /// Shard `n`'s queue, for redrive.
    origins: Vec<SqsProducer>,
    /// How the namespace routes keys to `origins`.
    hash: RouteHash,
    namespace: String,
}

/// A received letter, its receipt handle, and when the DLQ queue took it.
struct Received {
    letter: DeadLetter,
    receipt: String,
    sent_ms: u64,
}

impl SqsDlq {
    /// Open (creating if missing) DLQ queue `name` of `namespace`, whose
    /// shards are `origins`, routed to by `hash`.
    pub async fn open(
        client: &Client,
        name: &str,
        namespace: &str,
        origins: Vec<SqsProducer>,
        hash: RouteHash,
        clock: Arc<Hlc>,
    ) -> Result<Arc<Self>, SqsError> {
        Ok(Arc::new(Self {
            queue: SqsQueue::open(client, name).await?,
            clock,
            origins,
            hash,
            namespace: namespace.to_string(),
        }))
    }

    pub fn queue(&self) -> &SqsQueue {
        &self.queue
    }

    /// Redrive the letters of `namespace` that `selection` picks: each
    /// entry goes back to its origin queue with its original sequence, then
    /// its letter is deleted. Any process can do this; whichever consumer
    /// receives an entry applies it.
    ///
    /// A key's letters go back one after another, in the order the DLQ queue
    /// took them (its SentTimestamp, then the letter's DLQ sequence), so a
    /// FIFO queue keeps the key's order; keys go several at once. Sorting by
    /// the entries' own sequences would not do: with several producers, the
    /// clock that stamps them is not the queue's order. A letter that cannot
    /// be put back stays, and so do the later letters of its key. The queue
    /// is taken in windows of up to 10,000 letters, each hidden while it is
    /// worked on; SQS hands out the oldest first.
    pub async fn redrive_selected(
        &self,
        namespace: &str,
        selection: &Selection,
    ) -> Result<RedriveReport, SqsError> {
        let mut report = RedriveReport::default();
        let mut picked_ids = Vec::new();
        loop {
            let window = self.gather(REDRIVE_HIDE_S).await?;
            let full = window.len() >= PEEK_MAX;
            let (picked, rest): (Vec<_>, Vec<_>) = window.into_iter().partition(|r| {
                *r.letter.origin.shard.namespace == *namespace && selection.picks(&r.letter)
            });
            self.release(&rest).await;
            if picked.is_empty() {
                break;
            }
            // Only named ids need looking for (all of a large DLQ would not).
            if selection.names_ids() {
                picked_ids.extend(picked.iter().map(|r| r.letter.entry.id.clone()));
            }
            let (routable, unroutable): (Vec<_>, Vec<_>) = picked
                .into_iter()
                .partition(|r| (r.letter.origin.shard.shard as usize) < self.origins.len());
            report
                .unroutable
                .extend(unroutable.iter().map(|r| r.letter.entry.id.clone()));
            self.release(&unroutable).await;
            let mut by_key: BTreeMap<String, Vec<Received>> = BTreeMap::new();
            for r in routable {
                let e = &r.letter.entry;
                let key = e.key.clone().unwrap_or_else(|| e.id.clone());
                by_key.entry(key).or_default().push(r);
            }
            let keys = by_key.into_values().map(|mut letters| {
                letters.sort_by_key(|r| (r.sent_ms, r.letter.dlq_sequence));
                self.put_back_in_order(letters)
            });
            let mut failed = false;
            let mut done = futures_util::stream::iter(keys).buffer_unordered(REDRIVE_KEYS_AT_ONCE);
            while let Some((redriven, failure)) = done.next().await {
                report.redriven += redriven;
                if let Some(f) = failure {
                    failed = true;
                    report.failed.push(f);
                }
            }
            if !full || failed {
                break;
            }
        }
        report.not_found = selection.missing(picked_ids.iter().map(String::as_str));
        Ok(report)
    }

    /// Put one key's letters back, in order: how many went back, and the
    /// first that did not (the rest of the key stays behind it).
    async fn put_back_in_order(&self, letters: Vec<Received>) -> (usize, Option<(String, String)>) {
        for (i, r) in letters.iter().enumerate() {
            let l = &r.letter;
            let origin = &self.origins[l.origin.shard.shard as usize];
            let why = format!("r{}", l.dlq_sequence);
            if let Err(e) = origin.put_back(&l.entry, l.origin.sequence, &why).await {
                self.release(&letters[i..]).await;
                return (i, Some((l.entry.id.clone(), e.to_string())));
            }
            if let Err(error) = self.queue.delete(&r.receipt).await {
                // The entry is back; its letter shows again when its hiding
                // ends, and a second redrive of it is harmless (the version
                // guard, the idempotency key).
                tracing::warn!(id = %l.entry.id, %error, "A redriven letter could not be deleted.");
            }
        }
        (letters.len(), None)
    }

    /// The shard `entry`'s key routes to.
    fn route(&self, entry: &crate::entry::Entry) -> u32 {
        crate::routing::shard_of(
            self.hash,
            entry.key.as_deref(),
            &entry.id,
            self.origins.len() as u32,
        )
    }

    /// When the queue took `msg` (its SentTimestamp), in ms.
    fn sent_ms(msg: &aws_sdk_sqs::types::Message) -> u64 {
        msg.attributes
            .as_ref()
            .and_then(|a| a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::SentTimestamp))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    }

    fn letter_of(&self, msg: &aws_sdk_sqs::types::Message) -> DeadLetter {
        letter_from(msg, &self.namespace, |entry| self.route(entry))
    }

    /// Receive every letter that can be had (up to [`PEEK_MAX`]), hidden for
    /// `hide_s` seconds.
    async fn gather(&self, hide_s: i32) -> Result<Vec<Received>, SqsError> {
        let mut seen = HashMap::new();
        while seen.len() < PEEK_MAX {
            let batch = self.queue.receive(10, 0, hide_s).await?;
            let before = seen.len();
            for msg in batch {
                let Some(receipt) = msg.receipt_handle.clone() else {
                    continue;
                };
                let letter = self.letter_of(&msg);
                seen.insert(
                    msg.message_id.clone().unwrap_or_default(),
                    Received {
                        letter,
                        receipt,
                        sent_ms: Self::sent_ms(&msg),
                    },
                );
            }
            // Nothing new: the queue is read out, or a slow peek sees its
            // first letters again as their hiding runs out.
            if seen.len() == before {
                break;
            }
        }
        let mut all: Vec<Received> = seen.into_values().collect();
        all.sort_by_key(|r| r.letter.dlq_sequence);
        Ok(self.one_letter_per_entry(all).await)
    }

    /// One entry dead-lettered twice (shown again when its visibility ran
    /// out, and buried by both deliveries) is one letter: the oldest stays,
    /// in its place in its key's order, and the later ones are deleted, so
    /// a redrive does not deliver the entry twice. Another entry with the
    /// same id (another origin) is a letter of its own.
    async fn one_letter_per_entry(&self, all: Vec<Received>) -> Vec<Received> {
        let mut firsts = HashSet::new();
        let (keep, again): (Vec<_>, Vec<_>) = all.into_iter().partition(|r| {
            let (l, o) = (&r.letter, &r.letter.origin);
            firsts.insert((
                o.shard.namespace.clone(),
                o.shard.shard,
                o.sequence,
                l.entry.id.clone(),
            ))
        });
        for r in &again {
            if let Err(error) = self.queue.delete(&r.receipt).await {
                // It is left out again by the next read.
                tracing::debug!(%error, "Cannot delete a second letter of one entry.");
            }
        }
        keep
    }

    /// Show received letters again at once.
    async fn release(&self, letters: &[Received]) {
        let shows = letters
            .iter()
            .map(|r| self.queue.set_visibility(&r.receipt, 0));
        for result in futures_util::future::join_all(shows).await {
            if let Err(error) = result {
                // It shows again when the peek's hiding runs out.
                tracing::debug!(%error, "Cannot show a peeked letter again.");
            }
        }
    }

    /// A peek: the live letters, in DLQ order, shown again before this
    /// returns.
    async fn peek(&self) -> Result<Vec<DeadLetter>, SqsError> {
        let all = self.gather(PEEK_HIDE_S).await?;
        self.release(&all).await;
        Ok(all.into_iter().map(|r| r.letter).collect())
    }

    /// Delete the letters that match; how many were deleted.
    async fn remove_where(&self, matches: impl Fn(&DeadLetter) -> bool) -> Result<usize, SqsError> {
        let all = self.gather(PEEK_HIDE_S).await?;
        let (gone, keep): (Vec<_>, Vec<_>) = all.into_iter().partition(|r| matches(&r.letter));
        self.release(&keep).await;
        let mut deleted = 0;
        for r in &gone {
            self.queue.delete(&r.receipt).await?;
            deleted += 1;
        }
        Ok(deleted)
    }
}

impl DeadLetters for SqsDlq {
    async fn append(&self, letter: DeadLetter) -> Result<u64, BackendError> {
        let dlq_sequence = self.clock.next();
        let mut last_error = letter.last_error;
        if last_error.len() > MAX_ERROR {
            let mut cut = MAX_ERROR;
            while !last_error.is_char_boundary(cut) {
                cut -= 1;
            }
            last_error.truncate(cut);
        }
        let meta = LetterMeta {
            namespace: letter.origin.shard.namespace.to_string(),
            shard: letter.origin.shard.shard,
            target: letter.origin.target,
            attempts: letter.attempts,
            first_failure_ms: letter.first_failure_ms,
            last_failure_ms: letter.last_failure_ms,
            last_error,
            dlq_sequence,
        };
        let (body, mut attributes) = encode(&letter.entry, letter.origin.sequence);
        attributes.insert(
            super::ATTEMPTS.to_string(),
            super::number_attribute(letter.attempts.into()),
        );
        attributes.insert(
            LETTER.to_string(),
            super::string_attribute(&serde_json::to_string(&meta).expect("plain struct")),
        );
        // One group per letter: a FIFO DLQ then never holds one letter back
        // behind another.
        let fifo = self.queue.is_fifo().then(|| {
            let dedup = later_dedup(&letter.entry, &format!("l{dlq_sequence}"));
            (dedup.clone(), dedup)
        });
        self.queue
            .send(Outgoing {
                body,
                attributes,
                fifo,
                delay_s: 0,
            })
            .await?;
        Ok(dlq_sequence)
    }

    async fn list(
        &self,
        namespace: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, usize), BackendError> {
        if limit == 0 {
            let total = self.queue.approximate_len().await?;
            return Ok((Vec::new(), total as usize));
        }
        let all: Vec<DeadLetter> = self
            .peek()
            .await?
            .into_iter()
            .filter(|l| &*l.origin.shard.namespace == namespace)
            .collect();
        let total = all.len();
        let page = match crate::backends::listing_start(after) {
            Some(from) => all
                .into_iter()
                .filter(|l| l.dlq_sequence >= from)
                .take(limit)
                .collect(),
            None => Vec::new(),
        };
        Ok((page, total))
    }

    async fn get(&self, namespace: &str, id: &str) -> Result<Vec<DeadLetter>, BackendError> {
        Ok(self
            .peek()
            .await?
            .into_iter()
            .filter(|l| &*l.origin.shard.namespace == namespace && l.entry.id == id)
            .collect())
    }

    async fn remove(
        &self,
        namespace: &str,
        dlq_sequence: u64,
        _reason: &str,
    ) -> Result<bool, BackendError> {
        let removed = self
            .remove_where(|l| {
                &*l.origin.shard.namespace == namespace && l.dlq_sequence == dlq_sequence
            })
            .await?;
        Ok(removed > 0)
    }
}

/// The letter an SQS message of the DLQ holds. A message moved here by a
/// queue's RedrivePolicy carries no letter attribute: its shard is the one
/// `route` gives its entry, as at ingest.
pub(crate) fn letter_from(
    msg: &aws_sdk_sqs::types::Message,
    namespace: &str,
    route: impl Fn(&Entry) -> u32,
) -> DeadLetter {
    let (entry, sequence) = decode(msg);
    let meta: Option<LetterMeta> = text(msg, LETTER).and_then(|j| serde_json::from_str(&j).ok());
    let sent_ms = SqsDlq::sent_ms(msg);
    match meta {
        Some(m) => DeadLetter {
            dlq_sequence: m.dlq_sequence,
            entry,
            origin: Origin {
                shard: ShardRef::new(m.namespace.as_str(), m.shard),
                sequence,
                target: m.target,
            },
            attempts: m.attempts,
            first_failure_ms: m.first_failure_ms,
            last_failure_ms: m.last_failure_ms,
            last_error: m.last_error,
        },
        // Moved here by a RedrivePolicy: no letter attribute. Its shard
        // is the one its key routes to, as at ingest.
        None => DeadLetter {
            dlq_sequence: sent_ms << 20,
            origin: Origin {
                shard: ShardRef::new(namespace, route(&entry)),
                sequence,
                target: String::new(),
            },
            attempts: 0,
            first_failure_ms: sent_ms,
            last_failure_ms: sent_ms,
            last_error: "moved by the queue's RedrivePolicy".into(),
            entry,
        },
    }
}
