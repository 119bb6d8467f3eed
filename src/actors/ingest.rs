//! Ingest: the write side of one shard. Its mailbox is bounded; the HTTP
//! handler uses `try_send`, so a full mailbox answers 429 instead of growing
//! memory. It hands each append, with the handler's reply channel, straight
//! to the backend (the embedded log's committer). A Kafka namespace's writes
//! skip it: librdkafka queues them itself
//! ([`NamespaceBackend::queues_writes_itself`]).

use actix::{Actor, Context, Handler, Message, Supervised};

use super::guarded;
use crate::backends::shard::{NamespaceBackend, WriteReply};
use crate::entry::{Entry, ShardRef};

pub struct Ingest {
    backend: NamespaceBackend,
    shard: ShardRef,
    mailbox_capacity: usize,
}

impl Ingest {
    pub fn new(backend: NamespaceBackend, shard: ShardRef, mailbox_capacity: usize) -> Self {
        Self {
            backend,
            shard,
            mailbox_capacity,
        }
    }
}

impl Actor for Ingest {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
    }
}

impl Supervised for Ingest {}

/// Append these entries; each answer goes to its own reply channel.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Write(pub Vec<(Entry, WriteReply)>);

impl Handler<Write> for Ingest {
    type Result = ();

    fn handle(&mut self, msg: Write, ctx: &mut Context<Self>) {
        // A panic here drops the reply channels still in `msg`: those writes
        // are answered "unknown" by the handler, never "true".
        guarded(self, ctx, |act, _| {
            crate::failpoint!("ingest.write");
            act.backend.append_all(&act.shard, msg.0);
        });
    }
}
