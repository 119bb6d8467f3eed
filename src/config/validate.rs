//! Pure validation: no I/O, and every error names its namespace and field.

use std::fmt;
use std::net::SocketAddr;

use super::{
    BackendConfig, CompositeConfig, Config, DelaysConfig, FsyncSetting, KafkaConfig,
    MAX_PAYLOAD_LIMIT, NamespaceConfig, SqsConfig, TargetConfig,
};

/// More HTTP worker threads than this is a typo, not a tuning.
const MAX_HTTP_WORKERS: usize = 1024;
/// More arbiters than this is a typo, not a machine.
const MAX_ARBITERS: usize = 1024;

/// One problem in a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// `None` for the `[server]` and `[otel]` sections.
    pub namespace: Option<String>,
    /// The field's path inside its section, e.g. `retry.max_attempts`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "namespace `{ns}`: `{}`: {}", self.field, self.message),
            None => write!(f, "`{}`: {}", self.field, self.message),
        }
    }
}

/// Every problem found, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

struct Errors(Vec<ConfigError>);

impl Errors {
    fn server(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(ConfigError {
            namespace: None,
            field: field.into(),
            message: message.into(),
        });
    }

    fn ns(&mut self, ns: &str, field: &str, message: impl Into<String>) {
        self.0.push(ConfigError {
            namespace: Some(ns.into()),
            field: field.into(),
            message: message.into(),
        });
    }
}

/// A valid namespace name: it appears in URLs, file names and metrics.
pub fn valid_namespace_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

/// Check everything that can be checked without touching the outside world.
pub fn validate(config: &Config) -> Result<(), ConfigErrors> {
    let mut e = Errors(Vec::new());
    let s = &config.server;
    if s.listen.parse::<SocketAddr>().is_err() {
        e.server(
            "server.listen",
            format!("{:?} is not an address like 127.0.0.1:7070", s.listen),
        );
    }
    if s.tokens.is_empty() && !s.allow_unauthenticated && !s.listens_on_loopback() {
        e.server(
            "server.listen",
            format!(
                "{:?} is reachable beyond this host, and no [[server.tokens]] are configured: anyone who reaches the port could write, read dead letters and purge them. Add tokens (`walden token new`), listen on 127.0.0.1, or set server.allow_unauthenticated = true on purpose",
                s.listen
            ),
        );
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, t) in s.tokens.iter().enumerate() {
        let at = |f: &str| format!("server.tokens[{i}].{f}");
        if t.name.is_empty() {
            e.server(&at("name"), "must not be empty");
        } else if !names.insert(t.name.as_str()) {
            e.server(&at("name"), format!("{:?} names two tokens", t.name));
        }
        if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            e.server(
                &at("sha256"),
                "must be 64 hex digits: the SHA-256 of the token, never the token itself (`walden token new` prints it)",
            );
        }
        if t.namespaces.is_empty() {
            e.server(&at("namespaces"), "must name a namespace, or \"*\" for all");
        }
        for ns in t.namespaces.iter().filter(|n| *n != "*") {
            if !config.namespaces.contains_key(ns) {
                e.server(
                    &at("namespaces"),
                    format!("no namespace {ns:?} is configured"),
                );
            }
        }
        if t.scopes.is_empty() {
            e.server(&at("scopes"), "must give \"write\", \"read\" or \"admin\"");
        }
    }
    if let Some(tls) = &s.tls {
        for (field, path) in [
            ("server.tls.cert", Some(&tls.cert)),
            ("server.tls.key", Some(&tls.key)),
            ("server.tls.client_ca", tls.client_ca.as_ref()),
        ] {
            if path.is_some_and(|p| p.as_os_str().is_empty()) {
                e.server(field, "must name a PEM file");
            }
        }
    }
    if s.data_dir.as_os_str().is_empty() {
        e.server("server.data_dir", "must not be empty");
    }
    for (field, value) in [
        ("server.ack_timeout_ms", s.ack_timeout_ms as usize),
        ("server.max_in_flight", s.max_in_flight),
        ("server.mailbox_capacity", s.mailbox_capacity),
        ("server.max_body_bytes", s.max_body_bytes),
        (
            "server.request_head_timeout_ms",
            s.request_head_timeout_ms as usize,
        ),
        ("server.body_timeout_ms", s.body_timeout_ms as usize),
        ("server.max_connections", s.max_connections),
    ] {
        if value == 0 {
            e.server(field, "must be greater than 0");
        }
    }
    let r = &s.rebalance;
    for (field, value) in [
        ("server.rebalance.hot", r.hot),
        ("server.rebalance.gap", r.gap),
    ] {
        if !(value > 0.0 && value <= 1.0) {
            e.server(field, format!("{value} must be more than 0 and at most 1"));
        }
    }
    for (field, value) in [
        ("server.rebalance.every_ms", r.every_ms),
        ("server.rebalance.sustain", u64::from(r.sustain)),
    ] {
        if value == 0 {
            e.server(field, "must be greater than 0");
        }
    }
    if s.arbiters > MAX_ARBITERS {
        e.server(
            "server.arbiters",
            format!(
                "{} is more than {MAX_ARBITERS}; 0 means one per CPU core",
                s.arbiters
            ),
        );
    }
    let id = &s.instance_id;
    if id.len() > 200 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        e.server(
            "server.instance_id",
            format!("{id:?} must be at most 200 printable ASCII characters without spaces"),
        );
    }
    if s.http_workers > MAX_HTTP_WORKERS {
        e.server(
            "server.http_workers",
            format!(
                "{} is more than {MAX_HTTP_WORKERS}; 0 means one per CPU core",
                s.http_workers
            ),
        );
    }
    let endpoint = &config.otel.endpoint;
    let is_url = endpoint.starts_with("http://") || endpoint.starts_with("https://");
    if !endpoint.is_empty() && !is_url {
        e.server(
            "otel.endpoint",
            format!("{endpoint:?} must be empty or an http(s) URL"),
        );
    }
    if config.namespaces.is_empty() {
        e.server("namespaces", "no namespace is configured");
    }

    // All embedded namespaces share one log, so one durability setting.
    // The first embedded namespace's log-wide settings, to hold the rest to.
    let mut embedded: Option<(&str, &super::EmbeddedConfig)> = None;

    for (name, ns) in &config.namespaces {
        if !valid_namespace_name(name) {
            e.ns(
                name,
                "name",
                "use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'",
            );
        }
        if !(1..=1024).contains(&ns.shards) {
            e.ns(
                name,
                "shards",
                format!("must be between 1 and 1024 (got {})", ns.shards),
            );
        }
        match &ns.backend {
            BackendConfig::Kafka(_) | BackendConfig::Composite(_) => {}
            BackendConfig::Sqs(q) => validate_sqs(&mut e, name, ns, q),
            BackendConfig::Embedded(b) => {
                if b.fsync == FsyncSetting::Interval && b.fsync_interval_ms == 0 {
                    e.ns(
                        name,
                        "backend.fsync_interval_ms",
                        "must be greater than 0 with fsync = \"interval\"",
                    );
                }
                if b.segment_bytes < 64 << 10 {
                    e.ns(
                        name,
                        "backend.segment_bytes",
                        format!("must be at least 65536 (got {})", b.segment_bytes),
                    );
                }
                if b.retention_hard_max_bytes > 0 && b.retention_hard_max_bytes < b.segment_bytes {
                    e.ns(
                        name,
                        "backend.retention_hard_max_bytes",
                        "must be 0 or at least backend.segment_bytes",
                    );
                }
                match embedded {
                    None => embedded = Some((name, b)),
                    Some((other, first)) => {
                        if let Some(field) = log_wide_difference(first, b) {
                            e.ns(
                                name,
                                &format!("backend.{field}"),
                                format!(
                                    "embedded namespaces share one log, and namespace `{other}` sets \
                                     {field} otherwise; the log's settings (fsync, fsync_interval_ms, \
                                     segment_bytes, on_corruption and the retention_ fields) must match"
                                ),
                            );
                        }
                    }
                }
            }
        }
        if matches!(ns.backend, BackendConfig::Embedded(_))
            && config.server.role != super::Role::All
        {
            e.ns(
                name,
                "backend",
                format!(
                    "the embedded log is local to one process, so it needs role \"all\" (this process is {:?})",
                    config.server.role.as_str()
                ),
            );
        }
        match &ns.backend {
            BackendConfig::Kafka(k) => validate_kafka(&mut e, name, ns, k, "backend"),
            BackendConfig::Composite(c) => validate_composite(&mut e, name, ns, c),
            _ => {}
        }
        validate_targets(&mut e, name, ns);
        let r = &ns.retry;
        if r.initial_backoff_ms == 0 {
            e.ns(name, "retry.initial_backoff_ms", "must be greater than 0");
        }
        if !(r.backoff_multiplier.is_finite() && r.backoff_multiplier >= 1.0) {
            e.ns(
                name,
                "retry.backoff_multiplier",
                format!("must be at least 1.0 (got {})", r.backoff_multiplier),
            );
        }
        if r.max_backoff_ms < r.initial_backoff_ms {
            e.ns(
                name,
                "retry.max_backoff_ms",
                "must be at least retry.initial_backoff_ms",
            );
        }
        if r.max_attempts == 0 {
            e.ns(name, "retry.max_attempts", "must be at least 1");
        }
        let b = &ns.breaker;
        if b.trip_after_keys < 2 {
            // One key failing alone may be poison: it must reach the DLQ.
            e.ns(
                name,
                "breaker.trip_after_keys",
                "must be at least 2 (one failing key alone is treated as poison, not an outage)",
            );
        }
        if b.probe_initial_ms == 0 {
            e.ns(name, "breaker.probe_initial_ms", "must be greater than 0");
        }
        if b.probe_max_ms < b.probe_initial_ms {
            e.ns(
                name,
                "breaker.probe_max_ms",
                "must be at least breaker.probe_initial_ms",
            );
        }
        if ns.delay.catch_up_per_s == 0 {
            e.ns(name, "delay.catch_up_per_s", "must be greater than 0");
        }
        if ns.delay.jitter_ms > ns.delay.max_delay_ms {
            e.ns(
                name,
                "delay.jitter_ms",
                "must not exceed delay.max_delay_ms",
            );
        }
        if ns.scale.target_lag_s == 0 {
            e.ns(name, "scale.target_lag_s", "must be greater than 0");
        }
        let c = &ns.concurrency;
        if c.min == 0 || c.min > c.max {
            e.ns(
                name,
                "concurrency.min",
                format!(
                    "must be at least 1 and at most concurrency.max ({}) (got {})",
                    c.max, c.min
                ),
            );
        }
        if c.adaptive && !(c.min..=c.max).contains(&c.initial) {
            e.ns(
                name,
                "concurrency.initial",
                format!(
                    "must be between concurrency.min ({}) and concurrency.max ({}) (got {})",
                    c.min, c.max, c.initial
                ),
            );
        }
        let sh = &ns.shedding;
        if sh.min_limit == 0 || sh.min_limit > sh.max_limit {
            e.ns(
                name,
                "shedding.min_limit",
                format!(
                    "must be at least 1 and at most shedding.max_limit ({}) (got {})",
                    sh.max_limit, sh.min_limit
                ),
            );
        }
        if !(sh.min_limit..=sh.max_limit).contains(&sh.initial_limit) {
            e.ns(
                name,
                "shedding.initial_limit",
                format!(
                    "must be between shedding.min_limit ({}) and shedding.max_limit ({}) (got {})",
                    sh.min_limit, sh.max_limit, sh.initial_limit
                ),
            );
        }
        for (field, share) in [
            ("shedding.normal_share", sh.normal_share),
            ("shedding.batch_share", sh.batch_share),
        ] {
            if !(share > 0.0 && share <= 1.0) {
                e.ns(
                    name,
                    field,
                    format!("must be more than 0 and at most 1 (got {share})"),
                );
            }
        }
        if sh.batch_share > sh.normal_share {
            e.ns(
                name,
                "shedding.batch_share",
                format!(
                    "must not exceed shedding.normal_share ({}): batch writes are refused first (got {})",
                    sh.normal_share, sh.batch_share
                ),
            );
        }
        let l = &ns.limits;
        if l.max_batch_entries > s.max_in_flight {
            // A batch takes one in-flight slot per entry: a larger one could
            // never be accepted.
            e.ns(
                name,
                "limits.max_batch_entries",
                format!(
                    "{} is more than server.max_in_flight ({}); a full batch could never be accepted",
                    l.max_batch_entries, s.max_in_flight
                ),
            );
        }
        if l.max_set_mutations >= s.max_in_flight {
            // A set takes one in-flight slot per mutation, and one for its
            // marker.
            e.ns(
                name,
                "limits.max_set_mutations",
                format!(
                    "{} is not less than server.max_in_flight ({}); a full set could never be accepted",
                    l.max_set_mutations, s.max_in_flight
                ),
            );
        }
        if l.max_payload_bytes == 0 || l.max_payload_bytes > MAX_PAYLOAD_LIMIT {
            e.ns(
                name,
                "limits.max_payload_bytes",
                format!(
                    "must be between 1 and {} (got {})",
                    MAX_PAYLOAD_LIMIT, l.max_payload_bytes
                ),
            );
        }
        for (field, value, max) in [
            ("limits.max_key_bytes", l.max_key_bytes, 60_000),
            ("limits.max_id_bytes", l.max_id_bytes, 60_000),
            ("limits.max_headers", l.max_headers, 60_000),
            ("limits.max_batch_entries", l.max_batch_entries, 100_000),
            ("limits.max_payload_depth", l.max_payload_depth, 10_000),
            ("limits.max_set_mutations", l.max_set_mutations, 100_000),
            ("limits.max_set_bytes", l.max_set_bytes, MAX_PAYLOAD_LIMIT),
        ] {
            if value == 0 || value > max {
                e.ns(
                    name,
                    field,
                    format!("must be between 1 and {max} (got {value})"),
                );
            }
        }
    }
    shared_row_spaces(&mut e, config);
    if e.0.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(e.0))
    }
}

/// The first setting of the one shared log that two embedded namespaces set
/// differently, if any.
fn log_wide_difference(
    a: &super::EmbeddedConfig,
    b: &super::EmbeddedConfig,
) -> Option<&'static str> {
    [
        ("fsync", a.fsync == b.fsync),
        (
            "fsync_interval_ms",
            a.fsync_interval_ms == b.fsync_interval_ms,
        ),
        ("segment_bytes", a.segment_bytes == b.segment_bytes),
        ("on_corruption", a.on_corruption == b.on_corruption),
        (
            "retention_max_age_ms",
            a.retention_max_age_ms == b.retention_max_age_ms,
        ),
        (
            "retention_max_bytes",
            a.retention_max_bytes == b.retention_max_bytes,
        ),
        (
            "retention_hard_max_bytes",
            a.retention_hard_max_bytes == b.retention_hard_max_bytes,
        ),
        (
            "retention_hard_max_policy",
            a.retention_hard_max_policy == b.retention_hard_max_policy,
        ),
    ]
    .into_iter()
    .find(|(_, same)| !same)
    .map(|(field, _)| field)
}

/// Where a database target keeps its rows, as far as the config shows.
#[derive(Debug, PartialEq, Eq)]
enum RowSpace {
    /// A Postgres table: hosts, ports, database, `schema.table`.
    Table(String),
    /// A Redis database and the key prefix within it.
    Keys { server: String, prefix: String },
}

impl RowSpace {
    fn of(target: &TargetConfig) -> Option<Self> {
        match target {
            TargetConfig::Postgres { url, table, .. } => {
                let pg = super::parse_postgres_url(url).ok()?.config;
                let hosts: Vec<String> = pg
                    .get_hosts()
                    .iter()
                    .map(|h| match h {
                        tokio_postgres::config::Host::Tcp(h) => h.clone(),
                        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                    })
                    .collect();
                let db = pg.get_dbname().or(pg.get_user()).unwrap_or_default();
                let table = match table.contains('.') {
                    true => table.clone(),
                    false => format!("public.{table}"),
                };
                Some(RowSpace::Table(format!(
                    "{} {:?} {db} {table}",
                    hosts.join(","),
                    pg.get_ports()
                )))
            }
            TargetConfig::Memcached {
                url, key_prefix, ..
            } => Some(RowSpace::Keys {
                server: url.clone(),
                prefix: key_prefix.clone(),
            }),
            TargetConfig::Redis {
                url, key_prefix, ..
            } => {
                let info = redis::Client::open(url.as_str())
                    .ok()?
                    .get_connection_info()
                    .clone();
                Some(RowSpace::Keys {
                    server: format!("{} db {}", info.addr(), info.redis_settings().db()),
                    prefix: key_prefix.clone(),
                })
            }
            _ => None,
        }
    }

    /// Two targets could write one row.
    fn overlaps(&self, other: &RowSpace) -> bool {
        match (self, other) {
            (RowSpace::Table(a), RowSpace::Table(b)) => a == b,
            (
                RowSpace::Keys { server, prefix },
                RowSpace::Keys {
                    server: s2,
                    prefix: p2,
                },
            ) => {
                server == s2 && (prefix.starts_with(p2.as_str()) || p2.starts_with(prefix.as_str()))
            }
            _ => false,
        }
    }
}

/// No two namespaces may write one table, or overlapping Redis keys: a row's
/// version is its namespace's shard sequence, which another namespace's
/// cannot be compared with, so one namespace's older write could win. Hosts
/// are compared as written (`localhost` and `127.0.0.1` look different).
fn shared_row_spaces(e: &mut Errors, config: &Config) {
    let spaces: Vec<(&str, String, RowSpace)> = config
        .namespaces
        .iter()
        .flat_map(|(name, ns)| {
            ns.targets.iter().filter_map(move |t| {
                let field = match t.sole {
                    true => "target".to_string(),
                    false => format!("targets.{}", t.name()),
                };
                Some((name.as_str(), field, RowSpace::of(&t.config)?))
            })
        })
        .collect();
    for (i, (name, field, space)) in spaces.iter().enumerate() {
        // Two targets of one namespace version rows alike.
        if let Some((first, _, _)) = spaces[..i]
            .iter()
            .find(|(n, _, s)| n != name && s.overlaps(space))
        {
            let field = match space {
                RowSpace::Table(_) => format!("{field}.table"),
                RowSpace::Keys { .. } => format!("{field}.key_prefix"),
            };
            e.ns(
                name,
                &field,
                format!(
                    "namespace `{first}`'s target writes the same rows; each row's version is its namespace's shard sequence, which cannot be compared across namespaces, so give each namespace its own table or a key prefix that does not overlap"
                ),
            );
        }
    }
}

fn validate_kafka(e: &mut Errors, name: &str, ns: &NamespaceConfig, k: &KafkaConfig, prefix: &str) {
    if k.brokers.trim().is_empty() {
        e.ns(
            name,
            &format!("{prefix}.brokers"),
            "must name at least one host:port",
        );
    }
    let topic = k.topic(name);
    if !valid_topic_name(&topic) {
        e.ns(
            name,
            &format!("{prefix}.topic"),
            format!("{topic:?} must be 1-249 characters of letters, digits, '.', '_', '-'"),
        );
    }
    let dlq_topic = k.dlq_topic(name);
    if !valid_topic_name(&dlq_topic) || dlq_topic == topic {
        e.ns(
            name,
            &format!("{prefix}.dlq_topic"),
            format!("{dlq_topic:?} must be a valid topic name other than the namespace's topic"),
        );
    }
    if let Some(p) = k.partitions
        && p != ns.shards
    {
        e.ns(
            name,
            &format!("{prefix}.partitions"),
            format!(
                "must equal shards ({}): each shard is one partition (got {p})",
                ns.shards
            ),
        );
    }
    // A set's records must outlive the wait for its marker, or a late
    // mutation would find its set forgotten.
    if k.sets_retention_ms < 60_000 || k.sets_retention_ms <= k.set_abandon_after_ms {
        e.ns(
            name,
            &format!("{prefix}.sets_retention_ms"),
            format!(
                "must be at least 60000 and more than set_abandon_after_ms ({}) (got {})",
                k.set_abandon_after_ms, k.sets_retention_ms
            ),
        );
    }
}

/// A composite namespace: Kafka entries (checked as a Kafka backend, under
/// `backend.entries`) and an SQS delay queue.
fn validate_composite(e: &mut Errors, name: &str, ns: &NamespaceConfig, c: &CompositeConfig) {
    match c.entries.as_ref() {
        BackendConfig::Kafka(k) => validate_kafka(e, name, ns, k, "backend.entries"),
        other => e.ns(
            name,
            "backend.entries.type",
            format!(
                "{:?} cannot hold a composite's entries yet; use \"kafka\" (an SQS namespace keeps its delays on SQS already)",
                other.kind()
            ),
        ),
    }
    let DelaysConfig::Sqs(d) = &c.delays;
    if !valid_queue_name(&d.queue) || d.queue.ends_with(".fifo") {
        e.ns(
            name,
            "backend.delays.queue",
            format!(
                "{:?} must be a standard queue name (no `.fifo`: only those delay each message)",
                d.queue
            ),
        );
    }
    if d.region.trim().is_empty() {
        e.ns(
            name,
            "backend.delays.region",
            "must name a region, e.g. \"us-east-1\"",
        );
    }
    if let Some(url) = &d.endpoint_url {
        check_http_url(e, name, "backend.delays.endpoint_url", url);
    }
    for (field, value, range) in [
        ("backend.delays.wait_time_s", d.wait_time_s, 0..=20),
        ("backend.delays.delay_hop_s", d.delay_hop_s, 1..=900),
    ] {
        check_range(e, name, field, value, range);
    }
}

fn check_http_url(e: &mut Errors, name: &str, field: &str, url: &str) {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
        Ok(_) => e.ns(name, field, format!("{url:?} must be an http(s) URL")),
        Err(err) => e.ns(name, field, format!("{url:?} is not a URL: {err}")),
    }
}

fn check_range(
    e: &mut Errors,
    name: &str,
    field: &str,
    value: u32,
    range: std::ops::RangeInclusive<u32>,
) {
    if !range.contains(&value) {
        e.ns(
            name,
            field,
            format!(
                "must be between {} and {} (got {value})",
                range.start(),
                range.end()
            ),
        );
    }
}

fn validate_sqs(e: &mut Errors, name: &str, ns: &NamespaceConfig, q: &SqsConfig) {
    if q.queues.is_empty() {
        e.ns(name, "backend.queues", "must name at least one queue");
    } else if q.queues.len() != ns.shards as usize {
        e.ns(
            name,
            "backend.queues",
            format!(
                "names {} queues, but shards = {}: each shard is one queue, so they must be equal",
                q.queues.len(),
                ns.shards
            ),
        );
    }
    for queue in &q.queues {
        if !valid_queue_name(queue) {
            e.ns(
                name,
                "backend.queues",
                format!("{queue:?} must be 1-80 letters, digits, '-' or '_' (then `.fifo` for a FIFO queue)"),
            );
        }
    }
    let fifo = q.is_fifo();
    if q.queues
        .iter()
        .any(|queue| queue.ends_with(".fifo") != fifo)
    {
        e.ns(
            name,
            "backend.queues",
            "mixes FIFO (`.fifo`) and standard queues; use one kind",
        );
    }
    if ns.ordering == super::Ordering::PerKey && !fifo {
        e.ns(
            name,
            "ordering",
            "\"per_key\" needs FIFO queues (names ending in `.fifo`): a standard queue may deliver \
             a key's entries out of order. Use FIFO queues, or set ordering = \"none\"",
        );
    }
    if q.region.trim().is_empty() {
        e.ns(
            name,
            "backend.region",
            "must name a region, e.g. \"us-east-1\"",
        );
    }
    if let Some(url) = &q.endpoint_url {
        check_http_url(e, name, "backend.endpoint_url", url);
    }
    let dlq = q.dlq_queue();
    if !valid_queue_name(&dlq) || q.queues.contains(&dlq) {
        e.ns(
            name,
            "backend.dlq_queue",
            format!("{dlq:?} must be a valid queue name other than the namespace's queues"),
        );
    }
    let delay = q.delay_queue();
    if !valid_queue_name(&delay)
        || delay.ends_with(".fifo")
        || q.queues.contains(&delay)
        || delay == dlq
    {
        e.ns(
            name,
            "backend.delay_queue",
            format!(
                "{delay:?} must be a standard queue (no `.fifo`: only those delay each message) \
                 other than the namespace's queues and DLQ"
            ),
        );
    }
    for (field, value, range) in [
        (
            "backend.max_messages_per_poll",
            q.max_messages_per_poll,
            1..=10,
        ),
        ("backend.wait_time_s", q.wait_time_s, 0..=20),
        (
            "backend.visibility_timeout_s",
            q.visibility_timeout_s,
            2..=43_200,
        ),
        ("backend.delay_hop_s", q.delay_hop_s, 1..=900),
        (
            "backend.max_message_bytes",
            q.max_message_bytes,
            16_384..=1_048_576,
        ),
    ] {
        check_range(e, name, field, value, range);
    }
    // Holds live on one machine's disk, and an SQS namespace's consumers
    // compete for every queue.
    if ns.dlq.on_dead_letter == super::OnDeadLetter::HoldKey {
        e.ns(
            name,
            "dlq.on_dead_letter",
            "\"hold_key\" keeps its holds on local disk, so it is not available on the sqs backend",
        );
    }
}

/// SQS's rule for queue names: 1-80 letters, digits, '-' or '_', the last
/// five of them `.fifo` for a FIFO queue.
fn valid_queue_name(queue: &str) -> bool {
    let base = queue.strip_suffix(".fifo").unwrap_or(queue);
    (1..=80).contains(&queue.len())
        && !base.is_empty()
        && base
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

/// The namespace's targets: one `target` table or `targets` tables, each
/// well formed, with progress of its own.
fn validate_targets(e: &mut Errors, name: &str, ns: &NamespaceConfig) {
    let tables = ns.targets.iter().any(|t| !t.sole);
    if ns.target.is_some() && tables {
        e.ns(
            name,
            "targets",
            "give either one `target` table or `targets` tables, not both (a `target` table is the target `targets.<its name>`)",
        );
    }
    if ns.targets.is_empty() && ns.target.is_none() {
        e.ns(
            name,
            "target",
            format!(
                "missing: give a [namespaces.{name}.target] table, or [namespaces.{name}.targets.<name>] tables"
            ),
        );
    }
    if ns.targets.len() > 1 && matches!(ns.backend, BackendConfig::Sqs(_)) {
        // A message is deleted once acked: it cannot wait for a second
        // target, nor be read again by one.
        e.ns(
            name,
            "targets",
            "an SQS namespace has one target: SQS deletes a message once it is applied, so a second target could neither read it again nor hold it without holding the first; use one namespace per target, or the embedded or Kafka backend",
        );
    }
    if ns.targets.is_empty() && !ns.replay_targets.is_empty() {
        e.ns(
            name,
            "targets",
            "every target has `live = false`: a namespace needs at least one live target to deliver its entries to",
        );
    }
    if !ns.replay_targets.is_empty() && matches!(&ns.backend, BackendConfig::Sqs(q) if !q.archive) {
        e.ns(
            name,
            "targets",
            "a replay-only target (`live = false`) needs a log to replay, and SQS keeps none (a message is deleted once applied): set backend.archive = true",
        );
    }
    for t in &ns.replay_targets {
        let field = format!("targets.{}", t.name());
        if !super::valid_target_name(t.name()) {
            e.ns(
                name,
                &field,
                "a target's name must be 1-64 letters, digits, '-' or '_'",
            );
        }
        if ns.targets.iter().any(|l| l.name() == t.name()) {
            e.ns(name, &field, "a live target has this name too");
        }
        validate_target(e, name, &field, &t.config);
    }
    if ns.replay.max_per_s == 0 {
        e.ns(name, "replay.max_per_s", "must be greater than 0");
    }
    let mut groups: Vec<(String, &str)> = Vec::new();
    for t in &ns.targets {
        let field = match t.sole {
            true => "target".to_string(),
            false => format!("targets.{}", t.name()),
        };
        if t.sole {
            if t.name().is_empty() {
                e.ns(name, "target.name", "must not be empty");
            }
        } else if !super::valid_target_name(t.name()) {
            e.ns(
                name,
                &field,
                "a target's name must be 1-64 letters, digits, '-' or '_' (it names the target's consumer group)",
            );
        }
        if let Some(g) = &t.group
            && !super::valid_group_name(g)
        {
            e.ns(
                name,
                &format!("{field}.group"),
                format!(
                    "{g:?} must be 1-200 letters, digits, '.', '_' or '-', not starting with '.'"
                ),
            );
        }
        let group = t.group(&ns.namespace_group(name));
        if let Some((_, other)) = groups.iter().find(|(g, _)| *g == group) {
            e.ns(
                name,
                &format!("{field}.group"),
                format!("the target {other:?} keeps its progress in group {group:?} too; each target needs its own"),
            );
        }
        groups.push((group, t.name()));
        validate_target(e, name, &field, &t.config);
    }
}

fn validate_target(e: &mut Errors, ns: &str, field: &str, target: &TargetConfig) {
    let at = |f: &str| format!("{field}.{f}");
    if let TargetConfig::Http { ca_file, .. }
    | TargetConfig::Walden { ca_file, .. }
    | TargetConfig::Redis { ca_file, .. } = target
        && ca_file.as_ref().is_some_and(|p| p.as_os_str().is_empty())
    {
        e.ns(ns, &at("ca_file"), "must name a PEM file");
    }
    match target {
        TargetConfig::Stdout { .. } => {}
        TargetConfig::File { path, .. } => {
            if path.as_os_str().is_empty() {
                e.ns(ns, &at("path"), "must not be empty");
            }
        }
        TargetConfig::Http {
            url, timeout_ms, ..
        } => {
            check_http_url(e, ns, &at("url"), url);
            if *timeout_ms == 0 {
                e.ns(ns, &at("timeout_ms"), "must be greater than 0");
            }
        }
        TargetConfig::Postgres {
            url,
            table,
            pool_size,
            timeout_ms,
            ..
        } => {
            if let Err(err) = super::parse_postgres_url(url) {
                e.ns(ns, &at("url"), format!("not a postgres URL: {err}"));
            }
            if !super::valid_table_name(table) {
                e.ns(
                    ns,
                    &at("table"),
                    format!("{table:?} must be `table` or `schema.table` (letters, digits, '_')"),
                );
            }
            if *pool_size == 0 {
                e.ns(ns, &at("pool_size"), "must be greater than 0");
            }
            if *timeout_ms == 0 {
                e.ns(ns, &at("timeout_ms"), "must be greater than 0");
            }
        }
        TargetConfig::Redis {
            url, timeout_ms, ..
        } => {
            if let Err(err) = redis::Client::open(url.as_str()) {
                e.ns(ns, &at("url"), format!("not a redis URL: {err}"));
            }
            if *timeout_ms == 0 {
                e.ns(ns, &at("timeout_ms"), "must be greater than 0");
            }
        }
        TargetConfig::Memcached {
            url,
            key_prefix,
            ttl_s,
            pool_size,
            timeout_ms,
            ..
        } => {
            match reqwest::Url::parse(url) {
                Ok(u) if u.query_pairs().any(|(k, v)| k == "protocol" && v == "ascii") => e.ns(
                    ns,
                    &at("url"),
                    "the text protocol (protocol=ascii) is not offered: its add does not say whether it stored, which the version guard needs",
                ),
                Ok(u) if u.scheme() == "memcache" && u.host().is_some() => {}
                _ => e.ns(
                    ns,
                    &at("url"),
                    format!("{url:?} must be a memcache://host:port URL"),
                ),
            }
            if key_prefix.len() > 200
                || key_prefix
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control())
            {
                e.ns(
                    ns,
                    &at("key_prefix"),
                    "must be at most 200 characters, without spaces",
                );
            }
            if *ttl_s > u64::from(u32::MAX) / 2 {
                e.ns(
                    ns,
                    &at("ttl_s"),
                    format!("{ttl_s} s is longer than Memcached can keep an item"),
                );
            }
            if *pool_size == 0 || *pool_size > 1024 {
                e.ns(ns, &at("pool_size"), "must be 1 to 1024");
            }
            if *timeout_ms == 0 {
                e.ns(ns, &at("timeout_ms"), "must be greater than 0");
            }
        }
        TargetConfig::Walden {
            url,
            namespace,
            token,
            timeout_ms,
            ..
        } => {
            check_http_url(e, ns, &at("url"), url);
            if !valid_namespace_name(namespace) {
                e.ns(
                    ns,
                    &at("namespace"),
                    format!("{namespace:?} is not a namespace name (1-64 letters, digits, '-', '_', '.')"),
                );
            }
            if token
                .as_deref()
                .is_some_and(|t| t.is_empty() || t.chars().any(|c| c.is_control() || c == ' '))
            {
                e.ns(ns, &at("token"), "must be a non-empty token without spaces");
            }
            if *timeout_ms == 0 {
                e.ns(ns, &at("timeout_ms"), "must be greater than 0");
            }
        }
        TargetConfig::Kafka {
            brokers,
            topic,
            timeout_ms,
            librdkafka,
            transactions,
            ..
        } => {
            if brokers.trim().is_empty() {
                e.ns(ns, &at("brokers"), "must name at least one host:port");
            }
            if librdkafka.contains_key("transactional.id") {
                e.ns(
                    ns,
                    &at("librdkafka"),
                    match transactions {
                        true => "transactional.id is Walden's to set (one per process, namespace and target); leave it out",
                        false => "transactional.id is set with transactions = true; leave it out",
                    },
                );
            }
            if !valid_topic_name(topic) {
                e.ns(
                    ns,
                    &at("topic"),
                    format!("{topic:?} must be 1-249 characters of letters, digits, '.', '_', '-'"),
                );
            }
            if *timeout_ms == 0 {
                e.ns(ns, &at("timeout_ms"), "must be greater than 0");
            }
        }
    }
}

/// Kafka's own rule for topic names.
fn valid_topic_name(topic: &str) -> bool {
    (1..=249).contains(&topic.len())
        && topic != "."
        && topic != ".."
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}
