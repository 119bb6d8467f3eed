//! Config validation: every error names its namespace and field, and
//! `walden validate` exits non-zero on each.

use std::process::Command;

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:7070"
data_dir = "./data"

[namespaces.orders.backend]
type = "embedded"

[namespaces.orders.target]
type = "http"
url = "http://127.0.0.1:9000/apply"
"#;

/// Run `walden validate` on `text`; returns (exit ok, stderr + stdout).
fn run_validate(text: &str, ext: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("walden.{ext}"));
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_walden"))
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    (out.status.success(), text)
}

#[test]
fn the_default_config_and_a_minimal_one_are_valid() {
    let default =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/walden.toml"))
            .unwrap();
    let (ok, out) = run_validate(&default, "toml");
    assert!(ok, "config/walden.toml: {out}");
    let (ok, out) = run_validate(GOOD, "toml");
    assert!(ok, "{out}");
    // Only backend.type and target are required; the rest has defaults.
    let config = walden::config::from_toml(GOOD).unwrap();
    let ns = &config.namespaces["orders"];
    assert_eq!(ns.shards, 4);
    assert_eq!(ns.ordering, walden::config::Ordering::PerKey);
    assert_eq!(ns.targets[0].name(), "default");
    assert!(ns.dlq.enabled);
    assert_eq!(ns.retry.max_attempts, 8);
    assert_eq!(config.server.ack_timeout_ms, 5000);
    match &ns.backend {
        walden::config::BackendConfig::Embedded(e) => {
            assert_eq!(e.fsync, walden::config::FsyncSetting::Always)
        }
        other => panic!("the default backend is embedded, not {other:?}"),
    }
}

#[test]
fn yaml_works_too() {
    let yaml = r#"
server:
  listen: "127.0.0.1:7070"
namespaces:
  orders:
    shards: 2
    backend: { type: embedded, fsync: interval, fsync_interval_ms: 5 }
    target: { type: stdout }
"#;
    let (ok, out) = run_validate(yaml, "yaml");
    assert!(ok, "{out}");
}

/// A namespace whose tables are replaced by `tables`.
fn with_namespace(tables: &str) -> String {
    format!("[server]\nlisten = \"127.0.0.1:7070\"\n{tables}")
}

#[test]
fn every_validation_error_names_its_namespace_and_field() {
    let ns = |extra_ns: &str, backend: &str, target: &str| {
        with_namespace(&format!(
            "[namespaces.orders]\n{extra_ns}\n[namespaces.orders.backend]\ntype = \"embedded\"\n{backend}\n[namespaces.orders.target]\n{target}\n"
        ))
    };
    let http = "type = \"http\"\nurl = \"http://127.0.0.1:9000/x\"";
    let kafka = |extra_ns: &str, backend: &str, target: &str| {
        with_namespace(&format!(
            "[namespaces.orders]\nshards = 2\n{extra_ns}\n[namespaces.orders.backend]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\n{backend}\n[namespaces.orders.target]\n{target}\n"
        ))
    };
    let sqs = |extra_ns: &str, backend: &str| {
        with_namespace(&format!(
            "[namespaces.orders]\nshards = 1\n{extra_ns}\n[namespaces.orders.backend]\ntype = \"sqs\"\nregion = \"us-east-1\"\n{backend}\n[namespaces.orders.target]\n{http}\n"
        ))
    };
    let cases: Vec<(&str, String, Option<&str>, &str)> = vec![
        (
            "sqs per-key order on a standard queue",
            sqs("", "queues = [\"orders\"]"),
            Some("orders"),
            "ordering",
        ),
        (
            "sqs queues differ from shards",
            sqs("", "queues = [\"a.fifo\", \"b.fifo\"]"),
            Some("orders"),
            "backend.queues",
        ),
        (
            "sqs mixed queue kinds",
            sqs("ordering = \"none\"", "queues = [\"a.fifo\", \"b\"]")
                .replace("shards = 1", "shards = 2"),
            Some("orders"),
            "backend.queues",
        ),
        (
            "sqs bad queue name",
            sqs("", "queues = [\"a b.fifo\"]"),
            Some("orders"),
            "backend.queues",
        ),
        (
            "sqs more than ten messages per poll",
            sqs("", "queues = [\"a.fifo\"]\nmax_messages_per_poll = 100"),
            Some("orders"),
            "backend.max_messages_per_poll",
        ),
        (
            "sqs long poll over 20 s",
            sqs("", "queues = [\"a.fifo\"]\nwait_time_s = 21"),
            Some("orders"),
            "backend.wait_time_s",
        ),
        (
            "sqs delay hop over 900 s",
            sqs("", "queues = [\"a.fifo\"]\ndelay_hop_s = 901"),
            Some("orders"),
            "backend.delay_hop_s",
        ),
        (
            "sqs messages over 1 MiB",
            sqs("", "queues = [\"a.fifo\"]\nmax_message_bytes = 2000000"),
            Some("orders"),
            "backend.max_message_bytes",
        ),
        (
            "sqs FIFO delay queue",
            sqs("", "queues = [\"a.fifo\"]\ndelay_queue = \"a-delay.fifo\""),
            Some("orders"),
            "backend.delay_queue",
        ),
        (
            "sqs endpoint not a URL",
            sqs("", "queues = [\"a.fifo\"]\nendpoint_url = \"localhost\""),
            Some("orders"),
            "backend.endpoint_url",
        ),
        (
            "sqs hold_key",
            sqs(
                "[namespaces.orders.dlq]\non_dead_letter = \"hold_key\"",
                "queues = [\"a.fifo\"]",
            ),
            Some("orders"),
            "dlq.on_dead_letter",
        ),
        (
            "kafka partitions differ from shards",
            kafka("", "partitions = 3", http),
            Some("orders"),
            "backend.partitions",
        ),
        (
            "kafka sets retention shorter than the wait for a marker",
            kafka("", "sets_retention_ms = 1000", http),
            Some("orders"),
            "backend.sets_retention_ms",
        ),
        (
            "kafka bad topic",
            kafka("", "topic = \"a b\"", http),
            Some("orders"),
            "backend.topic",
        ),
        (
            "kafka empty brokers",
            kafka("", "", http).replace("brokers = \"127.0.0.1:9092\"", "brokers = \" \""),
            Some("orders"),
            "backend.brokers",
        ),
        (
            "kafka target without a topic name",
            ns(
                "",
                "",
                "type = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\ntopic = \"\"",
            ),
            Some("orders"),
            "target.topic",
        ),
        (
            "kafka target naming its own transactional id",
            ns(
                "",
                "",
                "type = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\ntopic = \"t\"\ntransactions = true\nlibrdkafka = { \"transactional.id\" = \"mine\" }",
            ),
            Some("orders"),
            "target.librdkafka",
        ),
        (
            "embedded with a split role",
            ns("", "", http).replace("[server]", "[server]\nrole = \"producer\""),
            Some("orders"),
            "backend",
        ),
        (
            "bad listen",
            GOOD.replace("127.0.0.1:7070", "not-an-address"),
            None,
            "server.listen",
        ),
        (
            "zero ack timeout",
            GOOD.replace("[server]", "[server]\nack_timeout_ms = 0"),
            None,
            "server.ack_timeout_ms",
        ),
        (
            "zero mailbox",
            GOOD.replace("[server]", "[server]\nmailbox_capacity = 0"),
            None,
            "server.mailbox_capacity",
        ),
        (
            "absurd http workers",
            GOOD.replace("[server]", "[server]\nhttp_workers = 100000"),
            None,
            "server.http_workers",
        ),
        (
            "absurd arbiters",
            GOOD.replace("[server]", "[server]\narbiters = 100000"),
            None,
            "server.arbiters",
        ),
        (
            "rebalance hot above 1",
            format!("{GOOD}\n[server.rebalance]\nhot = 1.5\n"),
            None,
            "server.rebalance.hot",
        ),
        (
            "rebalance sustain 0",
            format!("{GOOD}\n[server.rebalance]\nsustain = 0\n"),
            None,
            "server.rebalance.sustain",
        ),
        (
            "bad otel endpoint",
            format!("{GOOD}\n[otel]\nendpoint = \"collector:4318\"\n"),
            None,
            "otel.endpoint",
        ),
        (
            "no namespaces",
            "[server]\nlisten = \"127.0.0.1:7070\"\n".to_string(),
            None,
            "namespaces",
        ),
        (
            "zero shards",
            ns("shards = 0", "", http),
            Some("orders"),
            "shards",
        ),
        (
            "too many shards",
            ns("shards = 5000", "", http),
            Some("orders"),
            "shards",
        ),
        (
            "interval of 0",
            ns("", "fsync = \"interval\"\nfsync_interval_ms = 0", http),
            Some("orders"),
            "backend.fsync_interval_ms",
        ),
        (
            "tiny segments",
            ns("", "segment_bytes = 100", http),
            Some("orders"),
            "backend.segment_bytes",
        ),
        (
            "bad url",
            ns("", "", "type = \"http\"\nurl = \"not a url\""),
            Some("orders"),
            "target.url",
        ),
        (
            "ftp url",
            ns("", "", "type = \"http\"\nurl = \"ftp://x/y\""),
            Some("orders"),
            "target.url",
        ),
        (
            "empty file path",
            ns("", "", "type = \"file\"\npath = \"\""),
            Some("orders"),
            "target.path",
        ),
        (
            "empty target name",
            ns("", "", "type = \"stdout\"\nname = \"\""),
            Some("orders"),
            "target.name",
        ),
        (
            "multiplier below 1",
            ns(
                "[namespaces.orders.retry]\nbackoff_multiplier = 0.5",
                "",
                http,
            ),
            Some("orders"),
            "retry.backoff_multiplier",
        ),
        (
            "max below initial",
            ns(
                "[namespaces.orders.retry]\ninitial_backoff_ms = 500\nmax_backoff_ms = 100",
                "",
                http,
            ),
            Some("orders"),
            "retry.max_backoff_ms",
        ),
        (
            "no attempts",
            ns("[namespaces.orders.retry]\nmax_attempts = 0", "", http),
            Some("orders"),
            "retry.max_attempts",
        ),
        (
            "a breaker that one key trips",
            ns("[namespaces.orders.breaker]\ntrip_after_keys = 1", "", http),
            Some("orders"),
            "breaker.trip_after_keys",
        ),
        (
            "probe cap below the first probe",
            ns(
                "[namespaces.orders.breaker]\nprobe_initial_ms = 500\nprobe_max_ms = 100",
                "",
                http,
            ),
            Some("orders"),
            "breaker.probe_max_ms",
        ),
        (
            "zero payload limit",
            ns(
                "[namespaces.orders.limits]\nmax_payload_bytes = 0",
                "",
                http,
            ),
            Some("orders"),
            "limits.max_payload_bytes",
        ),
        (
            "zero batch limit",
            ns(
                "[namespaces.orders.limits]\nmax_batch_entries = 0",
                "",
                http,
            ),
            Some("orders"),
            "limits.max_batch_entries",
        ),
        (
            "zero replay rate",
            ns("[namespaces.orders.replay]\nmax_per_s = 0", "", http),
            Some("orders"),
            "replay.max_per_s",
        ),
        (
            "only replay-only targets",
            with_namespace(&format!(
                "[namespaces.orders.backend]\ntype = \"embedded\"\n[namespaces.orders.targets.scratch]\n{http}\nlive = false\n"
            )),
            Some("orders"),
            "targets",
        ),
        (
            "a replay-only target on SQS",
            with_namespace(&format!(
                "[namespaces.orders]\nshards = 1\n[namespaces.orders.backend]\ntype = \"sqs\"\nregion = \"us-east-1\"\nqueues = [\"a.fifo\"]\n[namespaces.orders.targets.db]\n{http}\n[namespaces.orders.targets.scratch]\n{http}\nlive = false\n"
            )),
            Some("orders"),
            "targets",
        ),
    ];
    for (name, text, namespace, field) in cases {
        let config = walden::config::from_toml(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let errors = walden::config::validate(&config).expect_err(name).0;
        assert!(
            errors
                .iter()
                .any(|e| e.field == field && e.namespace.as_deref() == namespace),
            "{name}: expected {namespace:?}/{field}, got {errors:?}"
        );
        let (ok, out) = run_validate(&text, "toml");
        assert!(!ok, "{name}: walden validate must fail");
        assert!(out.contains(field), "{name}: {out}");
        if let Some(ns) = namespace {
            assert!(out.contains(&format!("namespace `{ns}`")), "{name}: {out}");
        }
    }
}

#[test]
fn embedded_namespaces_must_agree_on_the_log_s_settings() {
    // One log serves every embedded namespace: its settings cannot differ.
    for (setting, field) in [
        ("fsync = \"never\"", "backend.fsync"),
        ("segment_bytes = 131072", "backend.segment_bytes"),
        (
            "retention_hard_max_bytes = 134217728",
            "backend.retention_hard_max_bytes",
        ),
        (
            "retention_hard_max_policy = \"drop_oldest\"",
            "backend.retention_hard_max_policy",
        ),
    ] {
        let text = format!(
            "{GOOD}\n[namespaces.users.backend]\ntype = \"embedded\"\n{setting}\n[namespaces.users.target]\ntype = \"stdout\"\n"
        );
        let config = walden::config::from_toml(&text).unwrap();
        let errors = walden::config::validate(&config).unwrap_err().0;
        let e = errors
            .iter()
            .find(|e| e.field == field)
            .unwrap_or_else(|| panic!("{setting}: {errors:?}"));
        assert_eq!(e.namespace.as_deref(), Some("users"));
        assert!(e.message.contains("orders"), "{}", e.message);
    }
}

#[test]
fn validate_prints_every_error_at_once() {
    let text = GOOD.replace("127.0.0.1:7070", "nowhere").replace(
        "[namespaces.orders.backend]",
        "[namespaces.orders]\nshards = 0\n[namespaces.orders.backend]",
    );
    let (ok, out) = run_validate(&text, "toml");
    assert!(!ok);
    assert!(
        out.contains("server.listen") && out.contains("shards"),
        "{out}"
    );
}

#[test]
fn parse_errors_name_the_key() {
    let cases = [
        (
            "unknown field",
            GOOD.replace("type = \"http\"", "type = \"http\"\ncolour = 1"),
            "colour",
        ),
        (
            "unknown backend",
            GOOD.replace("\"embedded\"", "\"kafkaa\""),
            "kafkaa",
        ),
        (
            "wrong type",
            GOOD.replace(
                "[namespaces.orders.backend]",
                "[namespaces.orders]\nshards = \"four\"\n[namespaces.orders.backend]",
            ),
            "namespaces.orders.shards",
        ),
        (
            "missing target",
            "[namespaces.orders.backend]\ntype = \"embedded\"\n".to_string(),
            "namespaces.orders.target",
        ),
        (
            "bad ordering",
            GOOD.replace(
                "[namespaces.orders.backend]",
                "[namespaces.orders]\nordering = \"sorted\"\n[namespaces.orders.backend]",
            ),
            "sorted",
        ),
    ];
    for (name, text, needle) in cases {
        let (ok, out) = run_validate(&text, "toml");
        assert!(!ok, "{name}");
        assert!(out.contains(needle), "{name}: {out}");
        assert!(
            out.contains("namespaces.orders"),
            "{name} names the namespace: {out}"
        );
    }
    let (ok, out) = run_validate("this is = = not toml", "toml");
    assert!(!ok);
    assert!(out.contains("walden.toml"), "{out}");
}

/// `backend` and `target` tables are chosen by `type`; an error inside one
/// names its field, not only the table.
#[test]
fn errors_inside_backend_and_target_tables_name_the_field() {
    let kafka = |fields: &str| {
        GOOD.replace(
            "type = \"embedded\"",
            &format!("type = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\n{fields}"),
        )
    };
    let composite = GOOD.replace(
        "type = \"embedded\"",
        "type = \"composite\"\n[namespaces.orders.backend.entries]\ntype = \"kafka\"\nbrokers = 5\n\
         [namespaces.orders.backend.delays]\ntype = \"sqs\"\nqueue = \"d\"\nregion = \"us-east-1\"",
    );
    let cases = [
        (
            "a wrong type in the backend",
            kafka("rebalance_drain_ms = \"ten\""),
            &[
                "`rebalance_drain_ms`",
                "\"ten\"",
                "namespaces.orders.backend",
            ][..],
        ),
        (
            "a bad value in the target",
            GOOD.replace("type = \"http\"", "type = \"http\"\ntimeout_ms = -5"),
            &["`timeout_ms`", "namespaces.orders.target"],
        ),
        (
            "a librdkafka option that is not a scalar",
            kafka("librdkafka = { \"linger.ms\" = [1] }"),
            &["`librdkafka.linger.ms`", "a string, a number or a boolean"],
        ),
        (
            "a field inside a composite's entries",
            composite,
            &["`entries`", "`brokers`", "namespaces.orders.backend"],
        ),
        (
            "a type that is not a string",
            GOOD.replace("type = \"embedded\"", "type = 3"),
            &["`type`", "namespaces.orders.backend"],
        ),
        (
            "no type",
            GOOD.replace("type = \"http\"", "tpye = \"http\""),
            &["namespaces.orders.target.type"],
        ),
    ];
    for (name, text, needles) in cases {
        let (ok, out) = run_validate(&text, "toml");
        assert!(!ok, "{name}");
        for needle in needles {
            assert!(out.contains(needle), "{name}: {needle} in {out}");
        }
    }
}

/// librdkafka takes every option as a string; numbers and booleans are
/// taken as written rather than refused.
#[test]
fn librdkafka_options_take_numbers_and_booleans() {
    let text = GOOD
        .replace(
            "type = \"embedded\"",
            "type = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\n\
             librdkafka = { \"linger.ms\" = 5, \"enable.idempotence\" = true, \"x\" = 0.5, \"y\" = \"z\" }",
        )
        .replace(
            "type = \"http\"\nurl = \"http://127.0.0.1:9000/apply\"",
            "type = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"t\"\nlibrdkafka = { \"linger.ms\" = 0 }",
        );
    let config = walden::config::from_toml(&text).unwrap();
    let ns = &config.namespaces["orders"];
    let walden::config::BackendConfig::Kafka(kafka) = &ns.backend else {
        panic!("a kafka backend: {:?}", ns.backend)
    };
    let options: Vec<(&str, &str)> = kafka
        .librdkafka
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        options,
        [
            ("enable.idempotence", "true"),
            ("linger.ms", "5"),
            ("x", "0.5"),
            ("y", "z")
        ]
    );
    let walden::config::TargetConfig::Kafka { librdkafka, .. } = &ns.targets[0].config else {
        panic!("a kafka target: {:?}", ns.target)
    };
    assert_eq!(librdkafka.get("linger.ms").map(String::as_str), Some("0"));
    let (ok, out) = run_validate(&text, "toml");
    assert!(ok, "{out}");
}

/// `walden validate --config FILE`, as `serve` takes it, checks FILE.
#[test]
fn validate_takes_config_as_serve_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walden.toml");
    std::fs::write(&path, GOOD.replace("type = \"http\"", "type = \"htp\"")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`htp`"), "{err}");
}

#[test]
fn environment_overrides_apply_and_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walden.toml");
    std::fs::write(&path, GOOD).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_walden"))
        .arg("validate")
        .arg(&path)
        .env("WALDEN__NAMESPACES__ORDERS__SHARDS", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("namespace `orders`") && err.contains("shards"),
        "{err}"
    );
}

#[test]
fn a_batch_limit_above_the_in_flight_limit_is_refused() {
    // A batch takes one in-flight slot per entry: with the default batch
    // limit of 1000, max_in_flight = 10 would refuse every full batch.
    let text = GOOD.replace("[server]", "[server]\nmax_in_flight = 10");
    let config = walden::config::from_toml(&text).unwrap();
    let errors = walden::config::validate(&config).unwrap_err().0;
    let e = errors
        .iter()
        .find(|e| e.field == "limits.max_batch_entries")
        .expect("the batch limit is named");
    assert_eq!(e.namespace.as_deref(), Some("orders"));
    assert!(e.message.contains("max_in_flight"), "{}", e.message);
    let (ok, out) = run_validate(&text, "toml");
    assert!(!ok && out.contains("limits.max_batch_entries"), "{out}");
}

#[test]
fn set_limits_are_checked_and_named() {
    let text = GOOD.replace("[server]", "[server]\nmax_in_flight = 500")
        + "\n[namespaces.orders.limits]\nmax_set_mutations = 0\nmax_set_bytes = 999999999999\n";
    let config = walden::config::from_toml(&text).unwrap();
    let errors = walden::config::validate(&config).unwrap_err().0;
    for field in ["limits.max_set_mutations", "limits.max_set_bytes"] {
        let e = errors
            .iter()
            .find(|e| e.field == field)
            .unwrap_or_else(|| panic!("{field} is named: {errors:?}"));
        assert_eq!(e.namespace.as_deref(), Some("orders"));
    }
    // A set takes one in-flight slot per mutation and one for its marker.
    let text = GOOD.replace("[server]", "[server]\nmax_in_flight = 1000");
    let config = walden::config::from_toml(&text).unwrap();
    let errors = walden::config::validate(&config).unwrap_err().0;
    let e = errors
        .iter()
        .find(|e| e.field == "limits.max_set_mutations")
        .expect("the default set limit against max_in_flight");
    assert!(e.message.contains("max_in_flight"), "{}", e.message);
}

#[test]
fn every_example_config_is_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let mut seen = 0;
    for f in std::fs::read_dir(dir).unwrap() {
        let path = f.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml" || e == "yaml") {
            walden::config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 4, "found {seen} example configs");
}

#[test]
fn two_namespaces_may_not_write_one_table_or_overlapping_keys() {
    let ns = |name: &str, target: &str| {
        format!(
            "[namespaces.{name}.backend]\ntype = \"embedded\"\n[namespaces.{name}.target]\n{target}\n"
        )
    };
    let pg = |table: &str| {
        format!("type = \"postgres\"\nurl = \"postgres://u@db1:5432/app\"\ntable = \"{table}\"")
    };
    let redis = |db: u32, prefix: &str| {
        format!("type = \"redis\"\nurl = \"redis://cache:6379/{db}\"\nkey_prefix = \"{prefix}\"")
    };
    let cases = [
        (
            ns("a", &pg("kv")) + &ns("b", &pg("kv")),
            Some(("b", "target.table")),
        ),
        (
            ns("a", &pg("kv")) + &ns("b", &pg("public.kv")),
            Some(("b", "target.table")),
        ),
        (
            ns("a", &redis(0, "app:")) + &ns("b", &redis(0, "app:users:")),
            Some(("b", "target.key_prefix")),
        ),
        (
            ns("a", &redis(0, "")) + &ns("b", &redis(0, "x:")),
            Some(("b", "target.key_prefix")),
        ),
        // Apart: other tables, other prefixes, another database.
        (ns("a", &pg("kv")) + &ns("b", &pg("kv2")), None),
        (ns("a", &redis(0, "a:")) + &ns("b", &redis(0, "b:")), None),
        (
            ns("a", &redis(0, "app:")) + &ns("b", &redis(1, "app:")),
            None,
        ),
    ];
    for (tables, want) in cases {
        let (ok, out) = run_validate(&with_namespace(&tables), "toml");
        match want {
            None => assert!(ok, "{tables}\n{out}"),
            Some((name, field)) => {
                assert!(!ok, "{tables}");
                assert!(
                    out.contains(&format!("namespace `{name}`: `{field}`"))
                        && out.contains("namespace `a`"),
                    "{out}"
                );
            }
        }
    }
}

#[test]
fn several_targets_are_checked_each_with_its_name() {
    let ns = |targets: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:7070\"\ndata_dir = \"./data\"\n[namespaces.orders.backend]\ntype = \"embedded\"\n{targets}"
        )
    };
    let http = |name: &str, extra: &str| {
        format!(
            "[namespaces.orders.targets.{name}]\ntype = \"http\"\nurl = \"http://127.0.0.1:9000/\"\n{extra}\n"
        )
    };
    let (ok, out) = run_validate(
        &ns(&(http("db", "") + &http("search", "start = \"latest\""))),
        "toml",
    );
    assert!(ok, "{out}");
    let config = walden::config::from_toml(&ns(&(http("db", "") + &http("default", "")))).unwrap();
    let targets = &config.namespaces["orders"].targets;
    let groups: Vec<String> = targets.iter().map(|t| t.group("walden")).collect();
    assert_eq!(
        groups,
        ["walden.db", "walden"],
        "the target named default keeps the namespace's group"
    );
    let cases = [
        (
            ns(&format!(
                "[namespaces.orders.target]\ntype = \"stdout\"\n{}",
                http("db", "")
            )),
            "`targets`: give either one `target` table or `targets` tables",
        ),
        (ns(&http("\"bad name!\"", "")), "`targets.bad name!`"),
        (ns(&http("db", "name = \"other\"")), "named by its key"),
        (ns(&http("db", "start = \"middle\"")), "`start`"),
        (
            ns(&(http("a", "group = \"g\"") + &http("b", "group = \"g\""))),
            "`targets.b.group`",
        ),
        (
            ns(&http("db", "timeout_ms = \"soon\"")),
            "`db`: `timeout_ms`",
        ),
        (ns(&http("db", "timeout_ms = 0")), "`targets.db.timeout_ms`"),
    ];
    for (text, needle) in cases {
        let (ok, out) = run_validate(&text, "toml");
        assert!(!ok, "{text}");
        assert!(out.contains(needle), "{needle}: {out}");
        assert!(out.contains("orders"), "{out}");
    }
    // SQS deletes a message once applied: one target only, and the error
    // says why.
    let sqs = format!(
        "[server]\nlisten = \"127.0.0.1:7070\"\ndata_dir = \"./data\"\n[namespaces.orders]\nshards = 1\n[namespaces.orders.backend]\ntype = \"sqs\"\nregion = \"us-east-1\"\nqueues = [\"q\"]\n{}{}",
        http("a", ""),
        http("b", "")
    );
    let (ok, out) = run_validate(&sqs, "toml");
    assert!(
        !ok && out.contains("an SQS namespace has one target"),
        "{out}"
    );
}

#[test]
fn a_secret_can_come_from_the_environment() {
    let text = r#"
[server]
listen = "127.0.0.1:7070"
[namespaces.orders.backend]
type = "embedded"
[namespaces.orders.target]
type = "http"
url_env = "WALDEN_TEST_TARGET_URL_FROM_ENV"
"#;
    // Unset here: a clear error naming the field and the variable.
    let err = walden::config::from_toml(text).unwrap_err().to_string();
    assert!(
        err.contains("url_env") && err.contains("WALDEN_TEST_TARGET_URL_FROM_ENV"),
        "{err}"
    );
    // Set: the value comes from it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walden.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_walden"))
        .arg("validate")
        .arg(&path)
        .env(
            "WALDEN_TEST_TARGET_URL_FROM_ENV",
            "http://127.0.0.1:9000/apply",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both is ambiguous.
    let both = text.replace("url_env", "url = \"http://x\"\nurl_env");
    let err = walden::config::from_toml(&both).unwrap_err().to_string();
    assert!(err.contains("not both"), "{err}");
}
