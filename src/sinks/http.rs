//! `type = "http"`: POST each entry as JSON, with `Idempotency-Key` (the
//! entry id) and `traceparent`; a set of mutations goes as one request,
//! under the set's id. 2xx is success; 5xx, 408, 429, timeouts and
//! connection errors are transient; other 4xx are permanent.
//!
//! Errors name the URL without its user info and query, where credentials
//! and tokens ride: they reach logs and the DLQ's `last_error`.

use std::path::Path;
use std::time::Duration;

use futures_util::future::{BoxFuture, join_all};
use reqwest::StatusCode;
use serde::Serialize;

use super::{ApplyResult, DeliveredJson, Headers, Outcome, Sink, SinkError};
use crate::entry::Delivered;

pub struct HttpSink {
    name: String,
    url: reqwest::Url,
    /// The URL as errors show it ([`redacted`]).
    shown: String,
    client: reqwest::Client,
    timeout: Duration,
}

/// `url` without its user info and query: `https://host:port/path?…`.
pub(super) fn redacted(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    let query = shown.query().is_some();
    shown.set_query(None);
    shown.set_fragment(None);
    let mut shown = shown.to_string();
    if query {
        shown.push_str("?…");
    }
    shown
}

/// The client of an HTTP-speaking sink: `timeout` per request, no Nagle,
/// and `ca_file`'s certificates trusted beside the system's roots.
pub(super) fn client(
    name: &str,
    timeout: Duration,
    ca_file: Option<&Path>,
) -> Result<reqwest::Client, SinkError> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .tcp_nodelay(true);
    if let Some(path) = ca_file {
        for cert in crate::tls::certificates("ca_file", path)
            .map_err(|e| SinkError::permanent(name, e.to_string()))?
        {
            let cert = reqwest::Certificate::from_der(&cert)
                .map_err(|e| SinkError::permanent(name, format!("ca_file: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| SinkError::permanent(name, format!("http client: {e}")))
}

/// An answer's `Retry-After`, in seconds.
pub(super) fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

impl HttpSink {
    pub fn new(
        name: &str,
        url: &str,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<Self, SinkError> {
        // The parse error alone: the text may hold credentials.
        let url = reqwest::Url::parse(url)
            .map_err(|e| SinkError::permanent(name, format!("bad url: {e}")))?;
        let client = client(name, timeout, ca_file)?;
        Ok(Self {
            name: name.into(),
            shown: redacted(&url),
            url,
            client,
            timeout,
        })
    }

    async fn post(&self, d: &Delivered) -> ApplyResult {
        crate::failpoint!("sink.http.key", d.entry.key.as_deref().unwrap_or_default());
        let body = serde_json::to_vec(&DeliveredJson::new(d)).expect("JSON of owned data");
        // A replay may ask for a key of its own, so a deduplicating target
        // applies the entry again.
        let key = d
            .entry
            .header(crate::entry::IDEMPOTENCY_KEY_HEADER)
            .unwrap_or(&d.entry.id);
        self.send(body, key, d.entry.header("traceparent")).await
    }

    /// POST `body` with its idempotency key, and classify the answer.
    async fn send(
        &self,
        body: Vec<u8>,
        idempotency_key: &str,
        traceparent: Option<&str>,
    ) -> ApplyResult {
        let mut req = self
            .client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .header("idempotency-key", idempotency_key)
            .body(body);
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        let resp = req.send().await.map_err(|e| {
            let e = e.without_url();
            SinkError::transient(
                &self.name,
                format!("POST {}: {}", self.shown, super::with_causes(&e)),
            )
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(Outcome::Applied);
        }
        let retry_after = retry_after(&resp);
        let body = resp.text().await.unwrap_or_default();
        let message = format!(
            "POST {} answered {status}: {}",
            self.shown,
            truncate(&body, 200)
        );
        let transient = status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS;
        let mut err = if transient {
            SinkError::transient(&self.name, message)
        } else {
            SinkError::permanent(&self.name, message)
        };
        err.retry_after = retry_after;
        err.http_status = Some(status.as_u16());
        Err(err)
    }
}

/// The body of a set's request.
#[derive(Serialize)]
struct SetBody<'a> {
    set: &'a str,
    mutations: Vec<SetMutation<'a>>,
}

#[derive(Serialize)]
struct SetMutation<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    sequence: u64,
    headers: Headers<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a serde_json::value::RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

impl<'a> SetMutation<'a> {
    fn new(d: &'a Delivered) -> Self {
        let j = DeliveredJson::new(d);
        Self {
            id: j.id,
            key: j.key,
            sequence: j.sequence,
            headers: j.headers,
            payload: j.payload,
            payload_base64: j.payload_base64,
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn concurrent_entries(&self) -> bool {
        true
    }

    fn apply<'a>(&'a self, batch: &'a [Delivered]) -> BoxFuture<'a, Vec<ApplyResult>> {
        // At most one entry per key in a batch, so these may run at once.
        Box::pin(join_all(batch.iter().map(|d| self.post(d))))
    }

    /// One request for the whole set, with the set's id as its
    /// `Idempotency-Key`: `{"set", "mutations": [{"id", "key", "sequence",
    /// "headers", "payload" | "payload_base64"}, ...]}`, in the set's order.
    fn apply_set<'a>(&'a self, set: &'a [Delivered]) -> BoxFuture<'a, Result<Outcome, SinkError>> {
        Box::pin(async move {
            let Some(id) = set.first().and_then(|d| d.entry.set_place()).map(|p| p.set) else {
                return Err(SinkError::permanent(&self.name, "a set without its id"));
            };
            let body = SetBody {
                set: &id,
                mutations: set.iter().map(SetMutation::new).collect(),
            };
            let body = serde_json::to_vec(&body).expect("JSON of owned data");
            self.send(body, &id, set[0].entry.header("traceparent"))
                .await
        })
    }

    fn healthcheck(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        // Reachability only: a request would hit the user's endpoint with a
        // method or body it does not expect.
        Box::pin(async move {
            let host = self.url.host_str().unwrap_or_default().to_string();
            let port = self.url.port_or_known_default().unwrap_or(80);
            let connect = tokio::net::TcpStream::connect((host.as_str(), port));
            match tokio::time::timeout(self.timeout, connect).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(SinkError::transient(
                    &self.name,
                    format!("connect {host}:{port}: {e}"),
                )),
                Err(_) => Err(SinkError::transient(
                    &self.name,
                    format!("connect {host}:{port}: timed out"),
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_show_the_url_without_secrets() {
        let shown = |u: &str| redacted(&reqwest::Url::parse(u).unwrap());
        assert_eq!(
            shown("https://me:s3cret@hooks.example:8443/in/x?token=t0ken#f"),
            "https://hooks.example:8443/in/x?…"
        );
        assert_eq!(shown("http://127.0.0.1:80/apply"), "http://127.0.0.1/apply");
    }
}
