//! Typed configuration. Loaded from TOML or YAML with the `config` crate,
//! then overridden by `WALDEN__SECTION__KEY` environment variables, then
//! validated purely ([`validate`]) before anything connects.
//!
//! Every field is documented where it is declared: these docs are the
//! reference for `config/walden.toml`.

mod de;
mod postgres;
mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use postgres::{PostgresUrl, SslMode, parse_postgres_url};
pub use validate::{ConfigError, ConfigErrors, validate};

pub use crate::routing::RouteHash;

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub otel: OtelConfig,
    /// Namespaces by name. Each has its own backend, target, retry policy,
    /// DLQ and limits.
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceConfig>,
}

/// `[server]`: the process itself.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP API listens on. Port 0 picks a free port.
    pub listen: String,
    /// Directory of the embedded log and Walden's own state.
    pub data_dir: PathBuf,
    /// How long a write waits for its backend. Past it the answer is 504
    /// with `durable: "unknown"`, never `"true"`.
    pub ack_timeout_ms: u64,
    /// Writes in flight across the whole server; past it, writes get 429.
    pub max_in_flight: usize,
    /// Writes handed to one shard's backend and not yet answered, at most
    /// (counted per request); past it a write gets 429 rather than queueing.
    pub mailbox_capacity: usize,
    /// Largest request body, in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// How long a graceful shutdown waits for in-flight work.
    pub shutdown_timeout_ms: u64,
    /// Threads serving HTTP; 0 (the default) means one per CPU core. On a
    /// small host shared with a busy client library (librdkafka's broker
    /// thread) or the broker itself, fewer workers mean fewer threads
    /// competing for the cores and fewer wakeups per answer.
    pub http_workers: usize,
    /// What this process does: `"all"`, or only `"producer"` (accepts
    /// writes) or `"consumer"` (applies). Split roles need a broker backend.
    /// `walden serve --role` sets it too.
    pub role: Role,
    /// This process's stable name in Kafka consumer groups
    /// (`group.instance.id`, static membership): restarted under the same
    /// name, it takes its partitions back at once instead of waiting out its
    /// old session. Empty (the default): one is generated at first start and
    /// kept in `data_dir/instance-id`. Two processes must never share one:
    /// the group fences the older out, and it stops with an error.
    pub instance_id: String,
    /// Join Kafka consumer groups as a static member (under `instance_id`).
    /// Off: a dynamic member, whose partitions move to the others as soon
    /// as the broker notices it is gone, and which a restart must wait out.
    pub static_membership: bool,
    /// `[[server.tokens]]`: who may call the API. None: no authentication,
    /// and then Walden listens only on a loopback address.
    pub tokens: Vec<TokenConfig>,
    /// `/metrics` needs no token.
    pub metrics_public: bool,
    /// Listen beyond loopback with no tokens, on purpose.
    pub allow_unauthenticated: bool,
    /// How long a client has to send a request's head (its line and
    /// headers); past it, 408 and the connection closes.
    pub request_head_timeout_ms: u64,
    /// How long a client has to send a whole request body; past it, 408 and
    /// the connection closes.
    pub body_timeout_ms: u64,
    /// Open connections each HTTP worker serves at most (actix counts per
    /// worker: the process takes `http_workers` times this); past it, new
    /// connections wait to be accepted.
    pub max_connections: usize,
    /// `[server.tls]`: serve HTTPS instead of HTTP.
    pub tls: Option<ServerTlsConfig>,
    /// Threads (actix arbiters) that shards' actors run on; 0: one per
    /// CPU core (at least 2).
    pub arbiters: usize,
    /// `[server.rebalance]`: moving shards off a busy arbiter.
    pub rebalance: RebalanceConfig,
}

/// `[server.rebalance]`: the supervisor moves a shard's actors from an
/// arbiter that stays busy to one that is not. Each sample compares the
/// arbiters' busy time over the last `every_ms`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RebalanceConfig {
    pub enabled: bool,
    /// How often the arbiters' busy time is sampled.
    pub every_ms: u64,
    /// An arbiter busy more than this share of a sample is hot (0 to 1).
    pub hot: f64,
    /// ...and a move needs another arbiter less busy by at least this.
    pub gap: f64,
    /// Samples in a row that must find the same imbalance before a move.
    pub sustain: u32,
    /// A shard that moved stays where it is for at least this long.
    pub cooldown_ms: u64,
    /// How long a move lets the shard's sink call in flight settle before
    /// the shard's new actors read again (what was not acknowledged by
    /// then is delivered again).
    pub settle_ms: u64,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            every_ms: 1_000,
            hot: 0.75,
            gap: 0.3,
            sustain: 10,
            cooldown_ms: 60_000,
            settle_ms: 5_000,
        }
    }
}

/// `[server.tls]`: the API over HTTPS (rustls). A SIGHUP reads `cert` and
/// `key` again; if they do not load, the pair in use stays.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM: the server's certificate, then any intermediates.
    pub cert: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CA that signs client certificates. Set, only clients that
    /// present one it signed may connect (mutual TLS). Read at start only.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// `[[server.tokens]]`: one bearer token, kept as its SHA-256 only.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it: named in audit lines.
    pub name: String,
    /// The hex SHA-256 of the token's bytes (`walden token new` prints it).
    pub sha256: String,
    /// The namespaces it may act on, or `["*"]` for all.
    pub namespaces: Vec<String>,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

/// What a token may do.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// WriteToLog, batches and sets of mutations.
    Write,
    /// Stats, and the DLQ, delayed-entry, replay and log listings.
    Read,
    /// Redrive, purge, cancel and replay (and what `read` may).
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Write => "write",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

impl TokenConfig {
    /// Whether the token may act on `namespace` (`None`: on every one).
    pub fn covers(&self, namespace: Option<&str>) -> bool {
        self.namespaces.iter().any(|n| n == "*")
            || namespace.is_some_and(|ns| self.namespaces.iter().any(|n| n == ns))
    }

    /// Whether the token has `scope` (admin includes read).
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
            || (scope == Scope::Read && self.scopes.contains(&Scope::Admin))
    }
}

/// What a process does with its namespaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Accept writes and apply them.
    #[default]
    All,
    /// Only accept writes.
    Producer,
    /// Only apply what producers wrote.
    Consumer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Producer => "producer",
            Role::Consumer => "consumer",
        }
    }

    pub fn writes(self) -> bool {
        self != Role::Consumer
    }

    pub fn applies(self) -> bool {
        self != Role::Producer
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7070".into(),
            data_dir: PathBuf::from("./data"),
            ack_timeout_ms: 5000,
            max_in_flight: 10_000,
            mailbox_capacity: 1024,
            max_body_bytes: 16 << 20,
            shutdown_timeout_ms: 30_000,
            http_workers: 0,
            role: Role::All,
            instance_id: String::new(),
            static_membership: true,
            tokens: Vec::new(),
            metrics_public: false,
            allow_unauthenticated: false,
            request_head_timeout_ms: 5_000,
            body_timeout_ms: 30_000,
            max_connections: 25_000,
            tls: None,
            arbiters: 0,
            rebalance: RebalanceConfig::default(),
        }
    }
}

impl ServerConfig {
    /// Whether `listen` is a loopback address (`127.0.0.0/8` or `::1`),
    /// reachable from this host only.
    pub fn listens_on_loopback(&self) -> bool {
        self.listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|addr| addr.ip().is_loopback())
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }

    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

/// `[otel]`: tracing export.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelConfig {
    /// OTLP/HTTP traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces`.
    /// Empty: no export (logs still go to stderr).
    pub endpoint: String,
    /// The `service.name` resource attribute.
    pub service_name: String,
}

impl Default for OtelConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            service_name: "walden".into(),
        }
    }
}

/// `[namespaces.NAME]`. Only `backend`, and `target` or `targets`, are required.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Number of shards. A key always maps to the same shard. Fixed once the
    /// namespace holds data.
    #[serde(default = "default_shards")]
    pub shards: u32,
    /// `"per_key"`: entries with the same key are applied in order.
    /// `"none"`: no ordering.
    #[serde(default)]
    pub ordering: Ordering,
    /// How keys map to shards.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Where entries are stored until applied.
    #[serde(deserialize_with = "de::by_type")]
    pub backend: BackendConfig,
    /// `[namespaces.N.target]`: the one target of a namespace that has one.
    /// [`Config::resolve_targets`] moves it into `targets`; read those.
    #[serde(default, deserialize_with = "de::some_by_type")]
    pub target: Option<TargetConfig>,
    /// `[namespaces.N.targets.NAME]`: where entries are delivered. Every
    /// entry goes to each of them (or to those its write names), and each
    /// keeps its own progress, retries, breaker and dead letters.
    #[serde(default, deserialize_with = "de::targets")]
    pub targets: Vec<TargetSpec>,
    /// Targets with `live = false`: never fed by the log, only by a replay
    /// that names them. [`Config::resolve_targets`] moves them here from
    /// `targets`, so everything that delivers live reads `targets` alone.
    #[serde(skip)]
    pub replay_targets: Vec<TargetSpec>,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub breaker: BreakerConfig,
    #[serde(default)]
    pub dlq: DlqConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub delay: DelayConfig,
    #[serde(default)]
    pub replay: ReplayConfig,
    #[serde(default)]
    pub shedding: SheddingConfig,
    #[serde(default)]
    pub scale: ScaleConfig,
    /// `[namespaces.N.concurrency]`: requests in flight to each target.
    #[serde(default)]
    pub concurrency: ConcurrencyConfig,
    /// A write whose client `id` was accepted within this window gets the
    /// original answer and is not appended again; 0 turns it off.
    #[serde(default = "default_dedup_window_ms")]
    pub dedup_window_ms: u64,
}

fn default_dedup_window_ms() -> u64 {
    10 * 60 * 1000
}

fn default_shards() -> u32 {
    4
}

/// `[namespaces.NAME.routing]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// `"murmur2"` (Kafka's, the default for a new namespace), `"crc32"`
    /// (librdkafka's default) or `"crc32c"` (Walden's before murmur2). An
    /// embedded namespace keeps the hash it was created with (recorded in
    /// `data_dir/namespaces.json`); a Kafka or SQS namespace written before
    /// must set `"crc32c"` to keep its keys where they are.
    #[serde(default)]
    pub hash: Option<RouteHash>,
}

impl NamespaceConfig {
    /// The hash this namespace routes keys with (the service fills in what
    /// the data directory recorded).
    pub fn route_hash(&self) -> RouteHash {
        self.routing.hash.unwrap_or_default()
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    #[default]
    PerKey,
    None,
}

/// `[namespaces.NAME.backend]`, chosen by `type` (read by [`de::by_type`]:
/// the derive below is the externally tagged form it builds).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendConfig {
    /// The durable log on local disk, under `server.data_dir`. All embedded
    /// namespaces share one log, so their durability settings must agree.
    Embedded(EmbeddedConfig),
    /// A Kafka topic: the broker carries durability, and producer and
    /// consumer processes can run apart (`walden serve --role`).
    Kafka(KafkaConfig),
    /// SQS queues, one per shard: SQS carries durability, delays past its
    /// 15-minute cap hop through a companion queue, and the DLQ is a queue.
    Sqs(SqsConfig),
    /// Entries on one backend and delayed entries on another, as Netflix's
    /// namespaces combine Kafka and SQS.
    Composite(CompositeConfig),
}

/// `type = "composite"`: `[…backend.entries]` is a Kafka backend (its topic,
/// DLQ topic and consumer group), and `[…backend.delays]` the SQS queue
/// where delayed entries wait instead of Kafka's delay-tier topics.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositeConfig {
    #[serde(deserialize_with = "de::by_type")]
    pub entries: Box<BackendConfig>,
    #[serde(deserialize_with = "de::by_type")]
    pub delays: DelaysConfig,
}

/// Where a composite namespace's delayed entries wait, chosen by `type`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DelaysConfig {
    Sqs(SqsDelaysConfig),
}

/// A standard SQS queue for delayed entries (see `SqsConfig::delay_queue`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsDelaysConfig {
    pub queue: String,
    pub region: String,
    #[serde(default)]
    pub endpoint_url: Option<String>,
    #[serde(default = "default_sqs_wait_time_s")]
    pub wait_time_s: u32,
    #[serde(default = "default_sqs_delay_hop_s")]
    pub delay_hop_s: u32,
}

/// The SQS backend's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsConfig {
    /// The namespace's queues by name, one per shard (so their number must
    /// equal `shards`). A name ending in `.fifo` is a FIFO queue; all must be
    /// of one kind. Missing queues are created.
    pub queues: Vec<String>,
    pub region: String,
    /// For a local or compatible server (`http://127.0.0.1:4566`); unset is
    /// AWS itself. Credentials come from the standard AWS chain.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// The pause between polls that found nothing (long polls aside).
    #[serde(default = "default_sqs_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Messages per ReceiveMessage, 1 to 10 (the SQS limit).
    #[serde(default = "default_sqs_max_messages")]
    pub max_messages_per_poll: u32,
    /// How long a received message stays hidden; Walden extends it while the
    /// entry is being applied.
    #[serde(default = "default_sqs_visibility_timeout_s")]
    pub visibility_timeout_s: u32,
    /// Long polling: how long a receive waits for a message, 0 to 20 s.
    #[serde(default = "default_sqs_wait_time_s")]
    pub wait_time_s: u32,
    /// The dead-letter queue; `<first queue>-dlq` (`-dlq.fifo` for FIFO
    /// queues) if unset.
    #[serde(default)]
    pub dlq_queue: Option<String>,
    /// The companion standard queue where delayed entries wait;
    /// `<first queue>-delay` if unset.
    #[serde(default)]
    pub delay_queue: Option<String>,
    /// The longest single hop of a delayed entry through the delay queue,
    /// 1 to 900 s (SQS's own cap on DelaySeconds). Longer delays hop again
    /// until due. Lower it only to test long delays quickly.
    #[serde(default = "default_sqs_delay_hop_s")]
    pub delay_hop_s: u32,
    /// The largest message the queues take, body (the payload in base64)
    /// and attributes together; a larger entry is refused at ingest (413).
    /// 262144 (256 KiB) works on every SQS-compatible server; AWS takes up
    /// to 1048576 (1 MiB).
    #[serde(default = "default_sqs_max_message_bytes")]
    pub max_message_bytes: u32,
    /// Keep a copy of each entry sent in a local embedded log
    /// (`data_dir/archive/<namespace>`), so a replay can read it: SQS
    /// deletes a message once applied.
    #[serde(default)]
    pub archive: bool,
    /// How long the archive keeps an entry (0: until `archive_max_bytes`).
    #[serde(default = "default_archive_max_age_ms")]
    pub archive_max_age_ms: u64,
    /// The archive's size cap, oldest segments first (0: none).
    #[serde(default)]
    pub archive_max_bytes: u64,
}

fn default_archive_max_age_ms() -> u64 {
    7 * 24 * 3600 * 1000
}

fn default_sqs_max_message_bytes() -> u32 {
    256 * 1024
}

fn default_sqs_poll_interval_ms() -> u64 {
    1_000
}

fn default_sqs_max_messages() -> u32 {
    10
}

fn default_sqs_visibility_timeout_s() -> u32 {
    30
}

fn default_sqs_wait_time_s() -> u32 {
    10
}

fn default_sqs_delay_hop_s() -> u32 {
    900
}

impl SqsConfig {
    pub fn is_fifo(&self) -> bool {
        self.queues.first().is_some_and(|q| q.ends_with(".fifo"))
    }

    fn base_name(&self) -> &str {
        let first = self.queues.first().map(String::as_str).unwrap_or("walden");
        first.strip_suffix(".fifo").unwrap_or(first)
    }

    /// The dead-letter queue's name.
    pub fn dlq_queue(&self) -> String {
        self.dlq_queue
            .clone()
            .unwrap_or_else(|| match self.is_fifo() {
                true => format!("{}-dlq.fifo", self.base_name()),
                false => format!("{}-dlq", self.base_name()),
            })
    }

    /// The delay queue's name (always a standard queue: only those delay
    /// each message on its own).
    pub fn delay_queue(&self) -> String {
        self.delay_queue
            .clone()
            .unwrap_or_else(|| format!("{}-delay", self.base_name()))
    }
}

/// The Kafka backend's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `"127.0.0.1:9092"`.
    pub brokers: String,
    /// The namespace's topic; the namespace's name if unset.
    #[serde(default)]
    pub topic: Option<String>,
    /// Partitions the topic is created with if it does not exist; must equal
    /// the namespace's `shards` (each shard is one partition). Defaults to
    /// `shards`.
    #[serde(default)]
    pub partitions: Option<u32>,
    /// Extra librdkafka options for every client, passed through unchanged.
    #[serde(default, deserialize_with = "de::options")]
    pub librdkafka: BTreeMap<String, String>,
    /// The consumer group; `walden.{namespace}` if unset.
    #[serde(default)]
    pub group: Option<String>,
    /// The dead-letter topic; `<topic>.dlq` if unset.
    #[serde(default)]
    pub dlq_topic: Option<String>,
    /// On a rebalance, how long a revoked partition waits for its entries in
    /// flight before it commits what is done and lets go.
    #[serde(default = "default_rebalance_drain_ms")]
    pub rebalance_drain_ms: u64,
    /// How long past its deadline a set's mutation waits for the set's
    /// marker before it asks for the set to be given up (its producer died
    /// half-way). Room for the clocks of two machines to differ.
    #[serde(default = "default_set_abandon_after_ms")]
    pub set_abandon_after_ms: u64,
    /// How long `<topic>.sets` keeps its records (its `retention.ms` when
    /// Walden creates it), and how long a process remembers a settled set.
    /// At least as long as a set's mutation may wait in the topic unapplied.
    #[serde(default = "default_sets_retention_ms")]
    pub sets_retention_ms: u64,
}

fn default_set_abandon_after_ms() -> u64 {
    60_000
}

/// Kafka's own default `retention.ms`: seven days.
fn default_sets_retention_ms() -> u64 {
    7 * 24 * 3600 * 1000
}

fn default_rebalance_drain_ms() -> u64 {
    10_000
}

impl BackendConfig {
    /// How long a revoked partition drains (0 where there are no partitions).
    pub fn rebalance_drain(&self) -> Duration {
        match self {
            BackendConfig::Kafka(k) => Duration::from_millis(k.rebalance_drain_ms),
            BackendConfig::Composite(c) => c.entries.rebalance_drain(),
            BackendConfig::Embedded(_) | BackendConfig::Sqs(_) => Duration::ZERO,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Embedded(_) => "embedded",
            BackendConfig::Kafka(_) => "kafka",
            BackendConfig::Sqs(_) => "sqs",
            BackendConfig::Composite(_) => "composite",
        }
    }

    /// Where the entries live: the backend itself, or a composite's
    /// `entries`.
    pub fn entries(&self) -> &BackendConfig {
        match self {
            BackendConfig::Composite(c) => c.entries.entries(),
            other => other,
        }
    }
}

impl NamespaceConfig {
    /// The consumer group of the namespace's own target (see
    /// [`TargetSpec::group`]): `walden` on the embedded log, the topic's
    /// group on Kafka.
    pub fn namespace_group(&self, namespace: &str) -> String {
        match self.backend.entries() {
            BackendConfig::Kafka(k) => k.group(namespace),
            _ => EMBEDDED_GROUP.to_string(),
        }
    }
}

/// The consumer group the embedded log is read with, for a namespace's own
/// target.
pub const EMBEDDED_GROUP: &str = "walden";

/// A consumer group's name, as the embedded log stores it in a file name.
pub fn valid_group_name(group: &str) -> bool {
    (1..=200).contains(&group.len())
        && group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !group.starts_with('.')
}

impl KafkaConfig {
    /// The consumer group of namespace `namespace`.
    pub fn group(&self, namespace: &str) -> String {
        self.group
            .clone()
            .unwrap_or_else(|| format!("walden.{namespace}"))
    }

    /// The topic of namespace `namespace`.
    pub fn topic(&self, namespace: &str) -> String {
        self.topic.clone().unwrap_or_else(|| namespace.to_string())
    }

    /// The dead-letter topic of namespace `namespace`.
    pub fn dlq_topic(&self, namespace: &str) -> String {
        self.dlq_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.topic(namespace)))
    }
}

/// The embedded backend's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// `"always"`: acknowledge after the fsync that covers the entry.
    /// `"interval"`: fsync every `fsync_interval_ms`; acknowledge after it.
    /// `"never"`: no fsync; writes answer `durable: "unknown"`. Unsafe: for
    /// benchmarks only.
    pub fsync: FsyncSetting,
    /// The fsync period in `"interval"` mode.
    pub fsync_interval_ms: u64,
    /// Roll to a new segment at this size.
    pub segment_bytes: u64,
    /// A record whose checksum fails is never delivered. `"stop"`: its shard
    /// stops there and says why. `"skip"`: it is skipped and counted.
    pub on_corruption: CorruptionSetting,
    /// Delete sealed segments older than this, once every consumer has
    /// committed them. 0: keep.
    pub retention_max_age_ms: u64,
    /// Delete the oldest committed segments while the log is larger. 0: no
    /// limit.
    pub retention_max_bytes: u64,
    /// The most the log may hold. 0: no limit. Committed segments are
    /// deleted first; what happens when that is not enough is
    /// `retention_hard_max_policy`.
    pub retention_hard_max_bytes: u64,
    /// At `retention_hard_max_bytes` with the oldest entries not yet applied:
    /// `"refuse_writes"` (the default) answers writes 503 `"false"` until
    /// they are, and loses nothing; `"drop_oldest"` deletes them anyway, and a
    /// shard skips to the earliest entry left, counting what it lost
    /// (`lost_to_retention` in stats).
    pub retention_hard_max_policy: HardMaxPolicy,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HardMaxPolicy {
    #[default]
    RefuseWrites,
    DropOldest,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            fsync: FsyncSetting::Always,
            fsync_interval_ms: 10,
            segment_bytes: 64 << 20,
            on_corruption: CorruptionSetting::Stop,
            retention_max_age_ms: 0,
            retention_max_bytes: 0,
            retention_hard_max_bytes: 0,
            retention_hard_max_policy: HardMaxPolicy::RefuseWrites,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FsyncSetting {
    Always,
    Interval,
    Never,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CorruptionSetting {
    Stop,
    Skip,
}

/// `[namespaces.NAME.target]`, chosen by `type` (read by [`de::by_type`]).
/// Every target has a `name` (`"default"` if left out); a write may name it
/// in its `target` field.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TargetConfig {
    /// JSON lines of the delivered entries on standard output.
    Stdout {
        #[serde(default = "default_target_name")]
        name: String,
    },
    /// JSON lines of the delivered entries, appended to `path` and fsynced
    /// before an entry counts as applied.
    File {
        #[serde(default = "default_target_name")]
        name: String,
        /// The file to append to; created if missing.
        path: PathBuf,
    },
    /// POST each entry as JSON to `url`, with `Idempotency-Key` (the entry
    /// id) and `traceparent` headers. A 2xx answer is success.
    Http {
        #[serde(default = "default_target_name")]
        name: String,
        url: String,
        /// Per-request timeout.
        #[serde(default = "default_http_timeout_ms")]
        timeout_ms: u64,
        /// PEM: a private CA to trust for an `https` URL, beside the
        /// system's roots.
        #[serde(default)]
        ca_file: Option<PathBuf>,
    },
    /// Apply mutation payloads (`{"op": "put"|"delete", "key", "value"}`) to a
    /// table with columns `key TEXT PRIMARY KEY, value JSONB, version BIGINT,
    /// deleted BOOLEAN`, guarded by version. Walden does not create the table.
    Postgres {
        #[serde(default = "default_target_name")]
        name: String,
        /// e.g. `postgres://user@127.0.0.1:5432/db`. TLS as libpq's
        /// `sslmode` (`disable`, `prefer`, the default, `require`,
        /// `verify-ca`, `verify-full`) and `sslrootcert` (a CA file; the
        /// system's roots without one) say, in the URL's query or as
        /// `key=value` pairs.
        url: String,
        /// `table` or `schema.table`.
        table: String,
        /// Connections in the pool.
        #[serde(default = "default_pool_size")]
        pool_size: usize,
        /// Per-statement and connect timeout.
        #[serde(default = "default_http_timeout_ms")]
        timeout_ms: u64,
    },
    /// Apply mutation payloads to Redis with an atomic, version-guarded Lua
    /// script: the value at `key_prefix + key`, its version beside it.
    Redis {
        #[serde(default = "default_target_name")]
        name: String,
        /// e.g. `redis://127.0.0.1:6379/0`; `rediss://` for TLS, which
        /// verifies the server against the system's roots and `ca_file`.
        url: String,
        /// Prepended to every mutation key.
        #[serde(default)]
        key_prefix: String,
        /// Per-command and connect timeout.
        #[serde(default = "default_http_timeout_ms")]
        timeout_ms: u64,
        /// PEM: a private CA to trust for a `rediss://` URL.
        #[serde(default)]
        ca_file: Option<PathBuf>,
    },
    /// Apply mutation payloads to Memcached (the EVCache persona), each
    /// item guarded by its version: `gets`, compare, then `cas` (or `add`
    /// for a new key). A delete leaves a versioned tombstone.
    Memcached {
        #[serde(default = "default_target_name")]
        name: String,
        /// e.g. `memcache://127.0.0.1:11211`. Walden speaks the binary
        /// protocol, whose `add` says whether it stored.
        url: String,
        /// Prepended to every mutation key.
        #[serde(default)]
        key_prefix: String,
        /// Items (and tombstones) expire after this many seconds; 0: never.
        /// Past 30 days Memcached takes an expiry as a point in time, so
        /// Walden sends now + `ttl_s` then.
        #[serde(default)]
        ttl_s: u64,
        /// Connections in the pool.
        #[serde(default = "default_pool_size")]
        pool_size: usize,
        /// Per-command and connect timeout.
        #[serde(default = "default_http_timeout_ms")]
        timeout_ms: u64,
    },
    /// Forward each entry to another Walden's WriteToLog (its batch
    /// endpoint), keeping its id, key, payload and headers: replication
    /// between regions. The far side's `dedup_window_ms` must outlast the
    /// outages this side rides out, so that a resend is dropped there.
    Walden {
        #[serde(default = "default_target_name")]
        name: String,
        /// The other Walden's base URL, e.g. `http://walden.eu-west-1:7070`.
        url: String,
        /// The namespace there.
        namespace: String,
        /// Sent as `Authorization: Bearer <token>` when set.
        #[serde(default)]
        token: Option<String>,
        /// Per-request timeout.
        #[serde(default = "default_http_timeout_ms")]
        timeout_ms: u64,
        /// PEM: a private CA to trust for an `https` URL, beside the
        /// system's roots.
        #[serde(default)]
        ca_file: Option<PathBuf>,
    },
    /// Produce each entry to a Kafka topic (which must exist), keeping its
    /// key and headers: cross-region replication.
    Kafka {
        #[serde(default = "default_target_name")]
        name: String,
        /// `bootstrap.servers`, e.g. `"127.0.0.1:9092"`.
        brokers: String,
        topic: String,
        /// Extra librdkafka producer options, passed through unchanged.
        #[serde(default, deserialize_with = "de::options")]
        librdkafka: BTreeMap<String, String>,
        /// The most one delivery waits for its report.
        #[serde(default = "default_http_timeout_ms")]
        timeout_ms: u64,
        /// Produce each set of mutations in one Kafka transaction, which
        /// `read_committed` readers see whole or not at all. The brokers
        /// must support transactions (noida-db and tansu do not). Off: a
        /// set's mutations are produced one after another, in order.
        #[serde(default)]
        transactions: bool,
    },
}

/// One of a namespace's targets, with where its progress lives.
#[derive(Clone, Debug)]
pub struct TargetSpec {
    pub config: TargetConfig,
    /// Where a target with no progress yet starts reading.
    pub start: TargetStart,
    /// The consumer group that keeps its progress; `None`: the default (see
    /// [`TargetSpec::owns_namespace_group`]).
    pub group: Option<String>,
    /// It came from the single `[namespaces.N.target]` table.
    pub sole: bool,
    /// `live = false`: a replay-only target, which only a replay naming it
    /// delivers to (for example a scratch table to compare with).
    pub live: bool,
}

/// `start`: where a new target begins.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TargetStart {
    /// At the oldest entry the log still holds: nothing retained is missed.
    #[default]
    Earliest,
    /// At the next entry written: only what comes after it starts.
    Latest,
}

impl TargetSpec {
    pub fn name(&self) -> &str {
        self.config.name()
    }

    /// The target keeps the namespace's own consumer group (the progress of
    /// the days of one target per namespace): it is the single `target`
    /// table, or the one named `default`. Other targets get a group of
    /// their own, named after them.
    pub fn owns_namespace_group(&self) -> bool {
        self.sole || self.name() == DEFAULT_TARGET
    }

    /// The consumer group of this target's progress, given the namespace's
    /// own (`walden` on the embedded log, `walden.{ns}` on Kafka).
    pub fn group(&self, namespace_group: &str) -> String {
        match &self.group {
            Some(g) => g.clone(),
            None if self.owns_namespace_group() => namespace_group.to_string(),
            None => format!("{namespace_group}.{}", self.name()),
        }
    }
}

/// The name of a target that names none.
pub const DEFAULT_TARGET: &str = "default";

/// A target name from a `targets` table: it names consumer groups and goes
/// in an entry's header, so it is short and plain.
pub fn valid_target_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

fn default_pool_size() -> usize {
    8
}

fn default_target_name() -> String {
    DEFAULT_TARGET.into()
}

fn default_http_timeout_ms() -> u64 {
    10_000
}

impl TargetConfig {
    pub fn name(&self) -> &str {
        match self {
            TargetConfig::Stdout { name } => name,
            TargetConfig::File { name, .. } => name,
            TargetConfig::Http { name, .. } => name,
            TargetConfig::Postgres { name, .. } => name,
            TargetConfig::Redis { name, .. } => name,
            TargetConfig::Kafka { name, .. } => name,
            TargetConfig::Walden { name, .. } => name,
            TargetConfig::Memcached { name, .. } => name,
        }
    }

    /// Whether the target keeps a version per row, guarded by the entry's
    /// sequence (the database targets). Writes to such a namespace are
    /// routed by their mutation's key (see `sinks::mutation::row_of`).
    pub fn versions_rows(&self) -> bool {
        matches!(
            self,
            TargetConfig::Postgres { .. }
                | TargetConfig::Redis { .. }
                | TargetConfig::Memcached { .. }
        )
    }

    pub fn kind(&self) -> &'static str {
        match self {
            TargetConfig::Stdout { .. } => "stdout",
            TargetConfig::File { .. } => "file",
            TargetConfig::Http { .. } => "http",
            TargetConfig::Postgres { .. } => "postgres",
            TargetConfig::Redis { .. } => "redis",
            TargetConfig::Kafka { .. } => "kafka",
            TargetConfig::Walden { .. } => "walden",
            TargetConfig::Memcached { .. } => "memcached",
        }
    }
}

/// `[namespaces.NAME.retry]`: backoff between delivery attempts.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// The first backoff.
    pub initial_backoff_ms: u64,
    /// Each backoff is the previous one times this.
    pub backoff_multiplier: f64,
    /// Backoffs never grow past this.
    pub max_backoff_ms: u64,
    /// Attempts before an entry goes to the DLQ (with `dlq.enabled = false`,
    /// a failing entry is retried without end instead).
    pub max_attempts: u32,
    /// HTTP statuses to treat as permanent (straight to the DLQ), overriding
    /// the HTTP target's classes (5xx, 408 and 429 are transient).
    pub permanent_http_statuses: Vec<u16>,
    /// A backoff longer than this parks the entry (and the later entries of
    /// its key) durably in the state store instead of holding it in memory.
    pub park_after_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 100,
            backoff_multiplier: 2.0,
            max_backoff_ms: 60_000,
            max_attempts: 8,
            permanent_http_statuses: Vec::new(),
            park_after_ms: 5_000,
        }
    }
}

impl RetryConfig {
    /// The backoff before attempt `attempt + 1` (attempt counts from 1),
    /// before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_multiplier
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let ms = (self.initial_backoff_ms as f64 * exp).min(self.max_backoff_ms as f64);
        Duration::from_millis(ms as u64)
    }
}

/// `[namespaces.NAME.breaker]`: the circuit breaker in front of the target.
///
/// A target that is down is not the entries' fault. When the target's
/// healthcheck fails, or transient failures come from `trip_after_keys`
/// distinct keys with no success between them, the breaker opens: delivery
/// pauses and no entry spends attempts. One entry at a time is tried as a
/// probe (after `probe_initial_ms`, doubling up to `probe_max_ms`), and it
/// spends no attempt either. When a probe succeeds, delivery resumes in order.
/// `retry.max_attempts` and the DLQ are for entries that fail while the
/// target is healthy; one key failing alone is never an outage.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// With false, every failure spends an attempt (the old behaviour).
    pub enabled: bool,
    /// Distinct failing keys, with no success between them, that open it.
    pub trip_after_keys: u32,
    /// The wait before the first probe.
    pub probe_initial_ms: u64,
    /// Probe waits double up to this.
    pub probe_max_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            trip_after_keys: 2,
            probe_initial_ms: 500,
            probe_max_ms: 30_000,
        }
    }
}

/// `[namespaces.NAME.dlq]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqConfig {
    /// Every namespace has a dead-letter queue unless this is false. Without
    /// it, an entry that keeps failing is retried forever, never dropped.
    pub enabled: bool,
    /// What happens to a key when one of its entries is dead-lettered:
    /// `"continue"` delivers its later entries; `"hold_key"` keeps them (parked
    /// durably, or on Kafka dead-lettered behind it) until the dead letter is
    /// redriven or purged. Not on SQS.
    pub on_dead_letter: OnDeadLetter,
}

impl Default for DlqConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            on_dead_letter: OnDeadLetter::Continue,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnDeadLetter {
    #[default]
    Continue,
    HoldKey,
}

/// `[namespaces.NAME.delay]`: delayed delivery.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DelayConfig {
    /// Longest `delay_ms + jitter_ms` a write may ask for; longer is a 400.
    pub max_delay_ms: u64,
    /// The jitter of a delayed write that gives none: its due time is
    /// `delay_ms` plus a uniform random value in `[0, jitter_ms]`.
    pub jitter_ms: u64,
    /// Entries found overdue (after a restart or an outage) fire at most this
    /// many per second per shard, in due order, so the backlog does not
    /// become the spike that delays exist to smooth.
    pub catch_up_per_s: u64,
}

impl Default for DelayConfig {
    fn default() -> Self {
        Self {
            max_delay_ms: 30 * 24 * 3600 * 1000,
            jitter_ms: 0,
            catch_up_per_s: 1000,
        }
    }
}

/// `[namespaces.NAME.replay]`: how replays of the namespace's log run.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// Entries a replay applies per second, at most, over all its shards,
    /// so it runs beside live delivery without crowding it out.
    pub max_per_s: u64,
    /// The `Idempotency-Key` an HTTP target gets for a replayed entry:
    /// `"original"` (the entry's id: a target that deduplicates drops the
    /// replay) or `"replay"` (`{id}.replay.{replay id}`: the target applies
    /// it again). A replay request may choose for itself.
    pub idempotency_key: ReplayIdempotency,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            max_per_s: 10_000,
            idempotency_key: ReplayIdempotency::Original,
        }
    }
}

/// `replay.idempotency_key`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReplayIdempotency {
    #[default]
    Original,
    Replay,
}

/// The largest `limits.max_payload_bytes`: half the embedded log's largest
/// record body, so the entry's id, key and headers fit beside it.
pub const MAX_PAYLOAD_LIMIT: usize = 32 << 20;

/// `[namespaces.NAME.limits]`: what a write may carry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest payload, in bytes (after base64 decoding); larger gets 413.
    pub max_payload_bytes: usize,
    /// Longest key, in bytes.
    pub max_key_bytes: usize,
    /// Longest client id, in bytes.
    pub max_id_bytes: usize,
    /// Most headers per entry.
    pub max_headers: usize,
    /// Most entries in one batch request.
    pub max_batch_entries: usize,
    /// Deepest nesting of arrays and objects in a JSON `payload`; deeper is a
    /// 400. Many JSON parsers downstream refuse (or overflow on) deep input.
    pub max_payload_depth: usize,
    /// Most mutations in one set (`POST .../mutations`); more gets 413.
    pub max_set_mutations: usize,
    /// Most payload bytes of one set, all its mutations together; more gets
    /// 413. A set is written, applied and dead-lettered as one unit.
    pub max_set_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1 << 20,
            max_key_bytes: 1024,
            max_id_bytes: 256,
            max_headers: 64,
            max_batch_entries: 1000,
            max_payload_depth: 128,
            max_set_mutations: 1000,
            max_set_bytes: 4 << 20,
        }
    }
}

/// How urgent a write is: under load `batch` is refused first and
/// `critical` last.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Critical,
    #[default]
    Normal,
    Batch,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Normal, Priority::Batch];

    /// 0, 1, 2 from `critical` to `batch`.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Normal => "normal",
            Priority::Batch => "batch",
        }
    }
}

/// How a namespace's concurrency limit moves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShedAlgorithm {
    /// From the ratio of the long-term latency to the latest.
    #[default]
    Gradient2,
    /// From the queue estimated against the least latency seen.
    Vegas,
    /// `initial_limit`, for ever.
    Fixed,
}

/// `[namespaces.NAME.shedding]`: the adaptive limit on write requests in
/// flight (see `shedding`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SheddingConfig {
    pub algorithm: ShedAlgorithm,
    /// Requests in flight, at start (and for ever with `fixed`).
    pub initial_limit: usize,
    pub min_limit: usize,
    pub max_limit: usize,
    /// The priority of a write that names none.
    pub priority: Priority,
    /// The share of the limit `normal` writes may fill (`critical`: all).
    pub normal_share: f64,
    /// The share of the limit `batch` writes may fill.
    pub batch_share: f64,
}

impl Default for SheddingConfig {
    fn default() -> Self {
        Self {
            algorithm: ShedAlgorithm::Gradient2,
            initial_limit: 100,
            min_limit: 10,
            max_limit: 5000,
            priority: Priority::Normal,
            normal_share: 0.9,
            batch_share: 0.8,
        }
    }
}

/// `[namespaces.NAME.concurrency]`: how many requests each of the
/// namespace's targets has in flight at once (entries, for a target that
/// takes each entry as a request; calls, for one that takes a batch in one
/// go), over all shards. Adaptive by default (see `actors::concurrency`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConcurrencyConfig {
    /// Move the limit with the target's round trip and push back; `false`
    /// holds it at `max`.
    pub adaptive: bool,
    /// The limit at start.
    pub initial: usize,
    pub min: usize,
    pub max: usize,
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        Self {
            adaptive: true,
            // Low, so the first round trips are the target's pace without
            // a queue: the floor the latency test compares with.
            initial: 1,
            min: 1,
            max: 256,
        }
    }
}

/// `[namespaces.NAME.scale]`: what `GET .../scale` sizes consumers for.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScaleConfig {
    /// The backlog should clear within this many seconds.
    pub target_lag_s: u64,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        Self { target_lag_s: 60 }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: config::ConfigError,
    },
    #[error("config file {path} is invalid:\n{errors}")]
    Invalid { path: PathBuf, errors: ConfigErrors },
}

/// Parse a TOML document (no environment overrides, no validation). For
/// tests and tools that build a config in memory.
pub fn from_toml(text: &str) -> Result<Config, config::ConfigError> {
    let mut config: Config = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()?
        .try_deserialize()?;
    config.resolve_targets();
    Ok(config)
}

impl Config {
    /// Move each namespace's single `target` table into its `targets`, so
    /// the rest of Walden reads one list. A namespace that gives both, or
    /// neither, is left for [`validate`] to name.
    pub fn resolve_targets(&mut self) {
        for ns in self.namespaces.values_mut() {
            if ns.targets.is_empty()
                && let Some(config) = ns.target.clone()
            {
                ns.targets.push(TargetSpec {
                    config,
                    start: TargetStart::Earliest,
                    group: None,
                    sole: true,
                    live: true,
                });
            }
            let (live, replay_only) = std::mem::take(&mut ns.targets)
                .into_iter()
                .partition(|t| t.live);
            ns.targets = live;
            ns.replay_targets = replay_only;
        }
    }
}

/// Load `path` (TOML or YAML, by extension) with `WALDEN__…` overrides, and
/// validate it.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    load_as(path, None)
}

/// [`load`], with the process's role set (as `serve --role` does) before
/// validation, since what is valid depends on it.
pub fn load_as(path: &Path, role: Option<Role>) -> Result<Config, LoadError> {
    let read = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut config: Config = config::Config::builder()
        .add_source(config::File::from(path))
        .add_source(
            config::Environment::with_prefix("WALDEN")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        )
        .build()
        .map_err(read)?
        .try_deserialize()
        .map_err(read)?;
    config.resolve_targets();
    if let Some(role) = role {
        config.server.role = role;
    }
    validate(&config).map_err(|errors| LoadError::Invalid {
        path: path.to_path_buf(),
        errors,
    })?;
    Ok(config)
}

/// Whether `table` is a valid `table` or `schema.table` name: plain
/// identifiers only, so it can be quoted into SQL safely.
pub fn valid_table_name(table: &str) -> bool {
    let ident = |s: &str| {
        s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let parts: Vec<&str> = table.split('.').collect();
    parts.len() <= 2 && parts.iter().all(|p| ident(p))
}
