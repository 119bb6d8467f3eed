//! The `walden` command: run the service, check a config, write an entry or
//! a set of mutations, act on the DLQ, replay, or make a token.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "walden", version, about = "A durable write-ahead-log service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The bearer token for a server that requires one.
    #[arg(long, global = true, env = "WALDEN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A PEM file of CA certificates to trust for an `https` --url, beside
    /// the system's roots (a private CA, or a self-signed server).
    #[arg(long, global = true, env = "WALDEN_CACERT")]
    cacert: Option<PathBuf>,
}

/// The `--token` of this run, for every API call.
static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
/// The `--cacert` certificates of this run.
static CACERT: std::sync::OnceLock<Vec<reqwest::Certificate>> = std::sync::OnceLock::new();

/// The certificates of a `--cacert` file.
fn cacert(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    walden::tls::certificates("--cacert", path)
        .map_err(|e| e.to_string())?
        .iter()
        .map(|der| reqwest::Certificate::from_der(der).map_err(|e| format!("--cacert: {e}")))
        .collect()
}

/// A client for the service's API, sending the token when there is one and
/// trusting the `--cacert` roots.
fn http_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(Some(token)) = TOKEN.get()
        && let Ok(mut value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
    {
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let mut builder = reqwest::Client::builder().default_headers(headers);
    for cert in CACERT.get().into_iter().flatten() {
        builder = builder.add_root_certificate(cert.clone());
    }
    builder.build().expect("an HTTP client")
}

#[derive(Subcommand)]
enum Command {
    /// Run the service until SIGTERM or SIGINT.
    Serve {
        /// The config file (TOML or YAML).
        #[arg(long, env = "WALDEN_CONFIG", default_value = "config/walden.toml")]
        config: PathBuf,
        /// Only accept writes (`producer`), only apply (`consumer`), or both.
        /// Overrides `server.role`; split roles need a broker backend.
        #[arg(long, value_enum)]
        role: Option<walden::config::Role>,
    },
    /// Check a config file: prints every error, exits non-zero if there is one.
    Validate {
        /// The config file (TOML or YAML).
        #[arg(value_name = "PATH")]
        path: Option<PathBuf>,
        /// The config file, named as `serve` takes it; PATH wins over it.
        #[arg(long, env = "WALDEN_CONFIG", default_value = "config/walden.toml")]
        config: PathBuf,
    },
    /// Write one entry through a running service's API.
    Write {
        namespace: String,
        /// Routes the entry to a shard and orders entries that share it.
        #[arg(long)]
        key: Option<String>,
        /// Deliver no sooner than this many milliseconds from now.
        #[arg(long)]
        delay_ms: Option<u64>,
        /// The entry's id (idempotency key); generated if absent.
        #[arg(long)]
        id: Option<String>,
        /// Under load `batch` writes are refused first, `critical` last;
        /// the namespace's `shedding.priority` if absent.
        #[arg(long, value_parser = ["critical", "normal", "batch"])]
        priority: Option<String>,
        /// The service's base URL.
        #[arg(long, env = "WALDEN_URL", default_value = "http://127.0.0.1:7070")]
        url: String,
        /// The payload: JSON is sent as JSON, anything else as a JSON string,
        /// and bytes that are not UTF-8 as base64. `-` reads standard input.
        payload: String,
    },
    /// Write a set of mutations (applied whole and in order) from a JSON
    /// file: `{"id", "mutations": [{"key", "payload", "headers"}, ...],
    /// "lifecycle"}`. A set without an `id` gets one here, so an answer of
    /// "unknown" is retried with it, safely.
    Mutate {
        namespace: String,
        /// The set's JSON; `-` reads standard input.
        file: PathBuf,
        /// Retries of an answer that is not definite ("unknown", 429, 503).
        #[arg(long, default_value_t = 5)]
        retries: u32,
        /// The service's base URL.
        #[arg(long, env = "WALDEN_URL", default_value = "http://127.0.0.1:7070")]
        url: String,
    },
    /// Replay a namespace's log from a time (after restoring its datastore
    /// from a backup), leaving out the writes named. Shows progress, and
    /// ends with the counts; Ctrl-C leaves the replay running.
    Replay {
        namespace: String,
        /// Where the replay starts: RFC 3339 (`2026-12-01T10:00:00Z`) or
        /// epoch milliseconds.
        #[arg(long)]
        from: String,
        /// Where it ends (the same forms); now if absent.
        #[arg(long)]
        to: Option<String>,
        /// What the times mean: `applied_after` (every entry the target had
        /// not applied at `--from`: what a backup taken then lacks) or
        /// `written` (write times).
        #[arg(long, default_value = "applied_after")]
        select: String,
        /// Leave out the entry with this id (repeatable).
        #[arg(long = "exclude-id")]
        exclude_ids: Vec<String>,
        /// Leave out every entry of this routing key (repeatable).
        #[arg(long = "exclude-key")]
        exclude_keys: Vec<String>,
        /// Send every entry to this target (one of the namespace's, or a
        /// replay-only one); each entry's own targets if absent.
        #[arg(long)]
        target: Option<String>,
        /// Count what a replay would do, applying nothing.
        #[arg(long)]
        dry_run: bool,
        /// The service's base URL.
        #[arg(long, env = "WALDEN_URL", default_value = "http://127.0.0.1:7070")]
        url: String,
    },
    /// Make API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Inspect and act on a namespace's dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
        /// The service's base URL.
        #[arg(
            long,
            global = true,
            env = "WALDEN_URL",
            default_value = "http://127.0.0.1:7070"
        )]
        url: String,
        /// Only the letters of this target (a namespace with several).
        #[arg(long, global = true)]
        target: Option<String>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a fresh token, and the `[[server.tokens]]` lines to paste into
    /// the config (which keep only its SHA-256).
    New {
        /// Who will hold it (named in audit lines).
        name: String,
        /// The namespaces it may act on, comma-separated, or `*`.
        #[arg(long, value_delimiter = ',', required = true)]
        namespaces: Vec<String>,
        /// `write`, `read` and/or `admin`, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        namespace: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this DLQ sequence.
        #[arg(long)]
        after: Option<u64>,
    },
    /// Show one dead letter.
    Show { namespace: String, id: String },
    /// Send dead letters back to their origin, with fresh attempts.
    Redrive {
        namespace: String,
        #[command(flatten)]
        select: Select,
    },
    /// Delete dead letters.
    Purge {
        namespace: String,
        #[command(flatten)]
        select: Select,
    },
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Select {
    /// Every dead letter of the namespace.
    #[arg(long)]
    all: bool,
    /// These ids (repeatable).
    #[arg(long = "id")]
    ids: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = TOKEN.set(cli.token);
    if let Some(path) = &cli.cacert {
        match cacert(path) {
            Ok(certs) => {
                let _ = CACERT.set(certs);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    match cli.command {
        Command::Token {
            command:
                TokenCommand::New {
                    name,
                    namespaces,
                    scopes,
                },
        } => new_token(&name, &namespaces, &scopes),
        Command::Serve { config, role } => serve(config, role),
        Command::Validate { path, config } => validate(path.unwrap_or(config)),
        Command::Write {
            namespace,
            key,
            delay_ms,
            id,
            priority,
            url,
            payload,
        } => write(&url, &namespace, key, delay_ms, id, priority, &payload),
        Command::Mutate {
            namespace,
            file,
            retries,
            url,
        } => mutate(&url, &namespace, &file, retries),
        Command::Dlq {
            command,
            url,
            target,
        } => dlq(&url, target.as_deref(), command),
        Command::Replay {
            namespace,
            from,
            to,
            select,
            exclude_ids,
            exclude_keys,
            target,
            dry_run,
            url,
        } => {
            let times = epoch_ms(&from, "--from").and_then(|from| {
                let to = to.as_deref().map(|t| epoch_ms(t, "--to")).transpose()?;
                Ok((from, to))
            });
            let (from_ms, to_ms) = match times {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("walden: {e}");
                    return ExitCode::from(2);
                }
            };
            let body = serde_json::json!({
                "from_ms": from_ms,
                "to_ms": to_ms,
                "select": select,
                "exclude_ids": exclude_ids,
                "exclude_keys": exclude_keys,
                "target": target,
                "dry_run": dry_run,
            });
            replay(&url, &namespace, body)
        }
    }
}

/// Print a fresh token and its config lines.
fn new_token(name: &str, namespaces: &[String], scopes: &[String]) -> ExitCode {
    if let Some(bad) = scopes
        .iter()
        .find(|s| !matches!(s.as_str(), "write" | "read" | "admin"))
    {
        eprintln!("walden: --scopes: {bad:?} is not a scope (write, read, admin)");
        return ExitCode::from(2);
    }
    use rand::RngExt;
    use sha2::Digest;
    let secret: [u8; 32] = rand::rng().random();
    let token = format!("wld_{}", hex::encode(secret));
    let sha256 = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    let list = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("{token}");
    eprintln!(
        "\nGive the token above to {name:?}; it is shown once. Paste these lines into the config (they keep only its SHA-256):\n"
    );
    eprintln!(
        "[[server.tokens]]\nname = {name:?}\nsha256 = \"{sha256}\"\nnamespaces = [{}]\nscopes = [{}]",
        list(namespaces),
        list(scopes)
    );
    ExitCode::SUCCESS
}

/// A time given on the command line, in epoch milliseconds: digits are
/// milliseconds already; anything else is read as RFC 3339.
fn epoch_ms(t: &str, flag: &str) -> Result<u64, String> {
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map_err(|e| format!("{flag} {t:?}: {e}"));
    }
    let at = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!("{flag} {t:?} is neither epoch milliseconds nor an RFC 3339 time ({e})")
        })?;
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("{flag} {t:?} is before 1970"))
}

/// Start a replay (or a dry run) and follow it to its end.
fn replay(url: &str, namespace: &str, body: serde_json::Value) -> ExitCode {
    let base = url.trim_end_matches('/').to_string();
    let client = http_client();
    let endpoint = format!("{base}/v1/namespaces/{namespace}/replays");
    let result: Result<bool, String> = block_on(async {
        let started = call(client.post(&endpoint).json(&body)).await?;
        let Some(id) = started["replay"].as_str().map(str::to_string) else {
            // A dry run: its counts are the answer.
            println!(
                "{}",
                serde_json::to_string_pretty(&started).unwrap_or_default()
            );
            return Ok(true);
        };
        eprintln!("replay {id} started (Ctrl-C stops following it, not the replay)");
        let bar = indicatif::ProgressBar::new(started["to_read"].as_u64().unwrap_or(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} read ({eta})")
                .expect("a valid template"),
        );
        loop {
            let status = call(client.get(format!("{endpoint}/{id}"))).await?;
            bar.set_length(status["to_read"].as_u64().unwrap_or(0));
            bar.set_position(status["read"].as_u64().unwrap_or(0));
            bar.set_message(format!(
                "{id}: {} replayed, {} excluded, {} failed",
                status["replayed"], status["excluded"], status["failed"]
            ));
            if status["state"] != "running" {
                bar.finish();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
                return Ok(status["state"] == "done");
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("walden: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Run an async client call on a small runtime.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(f)
}

async fn call(req: reqwest::RequestBuilder) -> Result<serde_json::Value, String> {
    let resp = req.send().await.map_err(|e| causes(&e))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!(
            "{status}: {}",
            body["message"].as_str().unwrap_or("(no message)")
        ))
    }
}

fn dlq(url: &str, target: Option<&str>, command: DlqCommand) -> ExitCode {
    let base = url.trim_end_matches('/').to_string();
    let client = http_client();
    // `?target=` on every call, when given.
    let target: Vec<(&str, &str)> = target.map(|t| ("target", t)).into_iter().collect();
    let result = block_on(async {
        match command {
            DlqCommand::List {
                namespace,
                limit,
                after,
            } => {
                let mut req = client
                    .get(format!("{base}/v1/namespaces/{namespace}/dlq"))
                    .query(&[("limit", limit)])
                    .query(&target);
                if let Some(a) = after {
                    req = req.query(&[("after", a)]);
                }
                let body = call(req).await?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(&body).unwrap_or_default()
                );
                Ok(())
            }
            DlqCommand::Show { namespace, id } => {
                let req = client.get(format!("{base}/v1/namespaces/{namespace}/dlq/{id}"));
                let body = call(req).await?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(&body).unwrap_or_default()
                );
                Ok(())
            }
            DlqCommand::Redrive { namespace, select } => {
                let on = On {
                    client: &client,
                    base: &base,
                    namespace: &namespace,
                    target: &target,
                };
                act_on(on, "redrive", "redriven", select).await
            }
            DlqCommand::Purge { namespace, select } => {
                let on = On {
                    client: &client,
                    base: &base,
                    namespace: &namespace,
                    target: &target,
                };
                act_on(on, "purge", "purged", select).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walden: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where a redrive or purge acts: a namespace's DLQ, maybe one target's.
struct On<'a> {
    client: &'a reqwest::Client,
    base: &'a str,
    namespace: &'a str,
    target: &'a [(&'a str, &'a str)],
}

/// Redrive or purge: named ids in one call; `--all` page by page, with a
/// progress bar, so a large DLQ is never held in one request.
async fn act_on(on: On<'_>, verb: &str, counted: &str, select: Select) -> Result<(), String> {
    let On {
        client,
        base,
        namespace,
        target,
    } = on;
    let endpoint = format!("{base}/v1/namespaces/{namespace}/dlq/{verb}");
    if !select.all {
        let body = call(
            client
                .post(&endpoint)
                .query(target)
                .json(&serde_json::json!({ "ids": select.ids })),
        )
        .await?;
        println!("{body}");
        return Ok(());
    }
    let list = format!("{base}/v1/namespaces/{namespace}/dlq");
    let first = call(client.get(&list).query(&[("limit", 0)]).query(target)).await?;
    let total = first["total"].as_u64().unwrap_or(0);
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({eta})")
            .expect("a valid template"),
    );
    bar.set_message(format!("{verb} {namespace}"));
    let mut after: Option<u64> = None;
    let mut done = 0u64;
    loop {
        let mut req = client.get(&list).query(&[("limit", 100)]).query(target);
        if let Some(a) = after {
            req = req.query(&[("after", a)]);
        }
        let page = call(req).await?;
        let entries = page["entries"].as_array().cloned().unwrap_or_default();
        if entries.is_empty() {
            break;
        }
        let ids: Vec<_> = entries.iter().filter_map(|e| e["id"].as_str()).collect();
        let body = call(
            client
                .post(&endpoint)
                .query(target)
                .json(&serde_json::json!({ "ids": ids })),
        )
        .await?;
        let n = body[counted].as_u64().unwrap_or(0);
        done += n;
        bar.inc(n);
        after = entries.last().and_then(|e| e["dlq_sequence"].as_u64());
    }
    bar.finish();
    println!("{{\"{counted}\":{done}}}");
    Ok(())
}

fn serve(path: PathBuf, role: Option<walden::config::Role>) -> ExitCode {
    let config = match walden::config::load_as(&path, role) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("walden: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match walden::telemetry::init(&config.otel) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("walden: {e}");
            return ExitCode::FAILURE;
        }
    };
    let source = walden::service::ConfigSource { path, role };
    let result = walden::service::run(config, Some(source));
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walden: {e}");
            ExitCode::FAILURE
        }
    }
}

fn validate(path: PathBuf) -> ExitCode {
    match walden::config::load(&path) {
        Ok(config) => {
            println!(
                "{}: ok ({} namespace{})",
                path.display(),
                config.namespaces.len(),
                if config.namespaces.len() == 1 {
                    ""
                } else {
                    "s"
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("walden: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write(
    url: &str,
    namespace: &str,
    key: Option<String>,
    delay_ms: Option<u64>,
    id: Option<String>,
    priority: Option<String>,
    payload: &str,
) -> ExitCode {
    let bytes = if payload == "-" {
        let mut buf = Vec::new();
        if let Err(e) = std::io::stdin().read_to_end(&mut buf) {
            eprintln!("walden: reading standard input: {e}");
            return ExitCode::FAILURE;
        }
        buf
    } else {
        payload.as_bytes().to_vec()
    };
    let mut body = serde_json::Map::new();
    match std::str::from_utf8(&bytes) {
        Ok(text) => {
            let value = serde_json::from_str(text.trim())
                .unwrap_or_else(|_| serde_json::Value::String(text.to_string()));
            body.insert("payload".into(), value);
        }
        Err(_) => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
            body.insert("payload_base64".into(), b64.into());
        }
    }
    if let Some(k) = key {
        body.insert("key".into(), k.into());
    }
    if let Some(i) = id {
        body.insert("id".into(), i.into());
    }
    if let Some(p) = priority {
        body.insert("priority".into(), p.into());
    }
    if let Some(d) = delay_ms {
        body.insert("lifecycle".into(), serde_json::json!({ "delay_ms": d }));
    }
    let endpoint = format!(
        "{}/v1/namespaces/{namespace}/log",
        url.trim_end_matches('/')
    );
    answered(
        &endpoint,
        post_json(&endpoint, &serde_json::Value::Object(body)),
    )
}

/// An error with its causes, which say why (a certificate the client does
/// not trust, a refused connection) where reqwest's own text does not.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    text
}

/// POST `body` as JSON; the answer's status and text.
fn post_json(
    endpoint: &str,
    body: &serde_json::Value,
) -> Result<(reqwest::StatusCode, String), reqwest::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let resp = http_client().post(endpoint).json(body).send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        Ok((status, text))
    })
}

/// Read a set from `file` and write it, retrying with its id while the
/// answer is not definite.
fn mutate(url: &str, namespace: &str, file: &std::path::Path, retries: u32) -> ExitCode {
    let text = if file.as_os_str() == "-" {
        let mut buf = String::new();
        std::io::stdin()
            .read_to_string(&mut buf)
            .map(|_| buf)
            .map_err(|e| format!("reading standard input: {e}"))
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))
    };
    let mut body: serde_json::Value = match text
        .and_then(|t| serde_json::from_str(&t).map_err(|e| format!("{}: {e}", file.display())))
    {
        Ok(body) => body,
        Err(e) => {
            eprintln!("walden: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(set) = body.as_object_mut() else {
        eprintln!("walden: {}: a set is a JSON object", file.display());
        return ExitCode::FAILURE;
    };
    set.entry("id")
        .or_insert_with(|| uuid::Uuid::now_v7().to_string().into());
    let endpoint = format!(
        "{}/v1/namespaces/{namespace}/mutations",
        url.trim_end_matches('/')
    );
    let mut attempt = 0;
    loop {
        let result = post_json(&endpoint, &body);
        let definite = match &result {
            Ok((status, _)) => !matches!(status.as_u16(), 429 | 503 | 504),
            Err(e) => !(e.is_connect() || e.is_timeout()),
        };
        if definite || attempt >= retries {
            return answered(&endpoint, result);
        }
        attempt += 1;
        eprintln!(
            "walden: no definite answer; retrying with the set's id ({attempt} of {retries})"
        );
        std::thread::sleep(std::time::Duration::from_millis(200 << attempt.min(5)));
    }
}

/// Print a write's answer; success only for `durable: "true"`.
fn answered(
    endpoint: &str,
    result: Result<(reqwest::StatusCode, String), reqwest::Error>,
) -> ExitCode {
    match result {
        Ok((status, text)) => {
            println!("{text}");
            let durable = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["durable"].as_str().map(str::to_owned));
            if status.is_success() && durable.as_deref() == Some("true") {
                ExitCode::SUCCESS
            } else {
                eprintln!("walden: {status}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("walden: POST {endpoint}: {}", causes(&e));
            ExitCode::FAILURE
        }
    }
}
