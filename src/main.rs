//! The `walden` command: run the service, check a config, or write an entry.

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
}

#[derive(Subcommand)]
enum Command {
    /// Run the service until SIGTERM or SIGINT.
    Serve {
        /// The config file (TOML or YAML).
        #[arg(long, env = "WALDEN_CONFIG", default_value = "config/walden.toml")]
        config: PathBuf,
    },
    /// Check a config file: prints every error, exits non-zero if there is one.
    Validate {
        /// The config file (TOML or YAML).
        path: PathBuf,
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
        /// The service's base URL.
        #[arg(long, env = "WALDEN_URL", default_value = "http://127.0.0.1:7070")]
        url: String,
        /// The payload: JSON is sent as JSON, anything else as a JSON string,
        /// and bytes that are not UTF-8 as base64. `-` reads standard input.
        payload: String,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve { config } => serve(config),
        Command::Validate { path } => validate(path),
        Command::Write {
            namespace,
            key,
            delay_ms,
            id,
            url,
            payload,
        } => write(&url, &namespace, key, delay_ms, id, &payload),
    }
}

fn serve(path: PathBuf) -> ExitCode {
    let config = match walden::config::load(&path) {
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
    let result = walden::service::run(config);
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
    if let Some(d) = delay_ms {
        body.insert("lifecycle".into(), serde_json::json!({ "delay_ms": d }));
    }
    let endpoint = format!(
        "{}/v1/namespaces/{namespace}/log",
        url.trim_end_matches('/')
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = runtime.block_on(async {
        let resp = reqwest::Client::new()
            .post(&endpoint)
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        Ok::<_, reqwest::Error>((status, text))
    });
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
            eprintln!("walden: POST {endpoint}: {e}");
            ExitCode::FAILURE
        }
    }
}
