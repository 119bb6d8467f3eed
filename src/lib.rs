//! Walden: a durable write-ahead-log service.
//!
//! # Layout
//! - [`entry`]: the `Entry` every layer shares, the three-valued `Durable`,
//!   and [`entry::frame`], the CRC-checked byte form of an entry wherever
//!   Walden stores one (log segments, parked and delayed entries).
//! - [`routing`]: which shard a key goes to (murmur2, crc32 or crc32c).
//! - [`config`]: typed configuration and its pure validation; plain data
//!   that imports nothing above it.
//! - [`api`]: the HTTP API (actix-web) and its JSON error type; it only
//!   turns HTTP into calls and answers back. [`api::auth`] holds the route
//!   table, each route with the token scope it needs.
//! - [`actors`]: [`actors::ingest`], the one write path (a plain call, every
//!   backend through one `Producer`); per-target, per-shard actors
//!   (consumer, delay scheduler, applier, dead letter) whose messages live in
//!   [`actors::messages`]; the target's circuit breaker
//!   ([`actors::breaker`]); [`actors::sets`], which gathers a target's sets
//!   of mutations and applies each whole; [`actors::replay`], which reads a
//!   namespace's log again from a time through the targets' sinks;
//!   [`actors::concurrency`], each target's adaptive limit on the requests
//!   in flight to it; the per-namespace supervisor; and
//!   [`actors::rebalance`], its part that moves a shard's actors off a busy
//!   arbiter.
//! - [`backends`]: queue backends behind capability traits;
//!   [`backends::embedded`] is the durable log on local disk, the default;
//!   [`backends::kafka`] puts a namespace on a Kafka topic (with its consumer
//!   group, DLQ topic, delay tiers, and the `.sets` topic where a set's
//!   partitions meet); [`backends::sqs`] puts it on SQS
//!   queues (with a DLQ queue and a delay queue); [`backends::open`] opens a
//!   namespace's backend from its config and the process's role;
//!   [`backends::shard`] is the one face the actors see of any of them. The
//!   rest of the crate asks for capabilities (`Producer`, `KeyHolds`,
//!   `DelayStore`, `Topic`, `LogHealth`, ...), never for a backend.
//! - [`sinks`]: targets that entries are delivered to.
//! - [`state`]: the fjall-backed state store (idempotency keys, parked and
//!   delayed entries, the sets each target is done with, and replays: their
//!   state and each target's committed position over time).
//! - [`service`]: wiring: config → log → actors → HTTP server, and shutdown.
//! - [`telemetry`]: logging, tracing and OTLP export.
//! - [`tls`]: rustls for the HTTPS API (a certificate a SIGHUP reloads,
//!   client certificates) and for outbound clients (a private CA, libpq's
//!   `verify-ca`); a leaf that takes paths, not config.
//! - [`fs`]: the filesystem seam (real, or simulated with faults and power
//!   cuts) under the embedded log and the file target.
//! - [`shedding`]: each namespace's adaptive concurrency limit (Gradient2,
//!   Vegas or fixed) and the priorities that share it; a leaf over config.
//! - [`stats`]: counters and gauges; [`failpoints`]: test-only panics.
//! - [`fuzz`]: the decoders' entry points for `fuzz/` (cargo-fuzz) and for
//!   `tests/fuzz_corpora.rs`, which replays the corpora.
//!
//! The arrows point one way: api → actors → state → backends and sinks →
//! config → entry. `tests/layering.rs` holds the actors free of circles,
//! config free of upward imports, and the concrete backends to
//! `src/backends/` and `service.rs`.

/// mimalloc, for every binary that links Walden (the service, its tests and
/// benchmarks): entries are allocated on HTTP workers and freed on the
/// backend's threads, and glibc's malloc spent a fifth of the write path's
/// CPU on that (`cargo bench --bench kafka`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod actors;
pub mod api;
pub mod backends;
pub mod config;
pub mod entry;
pub mod failpoints;
pub mod fs;
pub mod fuzz;
pub mod routing;
pub mod service;
pub mod shedding;
pub mod sinks;
pub mod state;
pub mod stats;
pub mod telemetry;
pub mod tls;
