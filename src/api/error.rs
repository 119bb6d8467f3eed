//! The API's error type: every failure is a status and a JSON body
//! `{"durable": "false" | "unknown", "message": ...}` (with the entry's `id`
//! on an answer to a write); never a panic or a bare 500.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::entry::Durable;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub durable: Durable,
    pub message: String,
    /// Seconds for a `Retry-After` header (429 and 503).
    pub retry_after: Option<u64>,
    /// The entry's id, on an answer to a write: a client that got
    /// `"unknown"` retries with it safely.
    pub id: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    durable: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
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
            retry_after: Some(1),
            ..Self::rejected(StatusCode::TOO_MANY_REQUESTS, message)
        }
    }

    pub fn unavailable(durable: Durable, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            durable,
            message: message.into(),
            retry_after: Some(1),
            id: None,
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
        if let Some(secs) = self.retry_after {
            resp.insert_header(("Retry-After", secs.to_string()));
        }
        resp.json(self.body())
    }
}
