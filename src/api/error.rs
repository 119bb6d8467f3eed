//! The API's error type: every failure is a status and a JSON body
//! `{"durable": "false" | "unknown", "message": ...}` (with the entry's `id`
//! on an answer to a write); never a panic or a bare 500.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::entry::Durable;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub durable: Durable,
    pub message: String,
    /// When to try again (429 and 503): a `Retry-After` header in whole
    /// seconds, and `retry_after_ms` in the body.
    pub retry_after: Option<Duration>,
    /// The entry's id, on an answer to a write: a client that got
    /// `"unknown"` retries with it safely.
    pub id: Option<String>,
    /// Close the connection after answering (the client was cut off).
    pub close: bool,
}

#[derive(Serialize)]
struct Body<'a> {
    durable: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

impl ApiError {
    /// The write was not accepted; retrying is safe.
    pub fn rejected(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            durable: Durable::False,
            message: message.into(),
            retry_after: None,
            id: None,
            close: false,
        }
    }

    /// The same error, and the connection closed after it.
    pub fn closing(self) -> Self {
        Self {
            close: true,
            ..self
        }
    }

    /// The same error, answering the write of entry `id`.
    pub fn with_id(self, id: &str) -> Self {
        Self {
            id: Some(id.to_string()),
            ..self
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::rejected(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::rejected(StatusCode::NOT_FOUND, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::rejected(StatusCode::PAYLOAD_TOO_LARGE, message)
    }

    /// Shed: a mailbox or the in-flight limit is full.
    pub fn shed(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(Duration::from_secs(1)),
            ..Self::rejected(StatusCode::TOO_MANY_REQUESTS, message)
        }
    }

    pub fn unavailable(durable: Durable, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            durable,
            message: message.into(),
            retry_after: Some(Duration::from_secs(1)),
            id: None,
            close: false,
        }
    }

    /// The write was submitted and its outcome is not known.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::GATEWAY_TIMEOUT,
            durable: Durable::Unknown,
            message: message.into(),
            retry_after: None,
            id: None,
            close: false,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::to_value(self.body()).expect("plain struct")
    }

    fn body(&self) -> Body<'_> {
        Body {
            durable: self.durable.as_str(),
            message: &self.message,
            id: self.id.as_deref(),
            retry_after_ms: self.retry_after.map(|d| d.as_millis().max(1) as u64),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status);
        if let Some(after) = self.retry_after {
            // The header has whole seconds only: rounded up, at least one.
            let secs = after.as_millis().div_ceil(1000).max(1);
            resp.insert_header(("Retry-After", secs.to_string()));
        }
        if self.close {
            resp.force_close();
        }
        resp.json(self.body())
    }
}
