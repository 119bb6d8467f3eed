//! Who may call what. Every route is registered from [`ENDPOINTS`], which
//! gives each its rule, so a route cannot exist without one; [`admit`]
//! checks the rule, before the handler runs.
//!
//! A request carries `Authorization: Bearer <token>`. Tokens are configured
//! as SHA-256 hashes (`[[server.tokens]]`); the presented token is hashed
//! and compared with each in constant time. With no tokens configured every
//! request is admitted, and validation keeps the server on loopback.

use actix_web::dev::ServiceRequest;
use actix_web::http::{Method, StatusCode};
use actix_web::{Route, web};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::info;

use super::{ApiError, AppState, Caller, admin, delayed, dlq, replay, write};
use crate::config::{Scope, ServerConfig, TokenConfig};

/// What a route asks of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone (health and readiness).
    Open,
    /// `scope` on the namespace in the path.
    Scoped(Scope),
    /// `read`; the answer covers only the token's namespaces.
    ReadListed,
    /// `read` on every namespace, unless `server.metrics_public`.
    Metrics,
}

/// One route: its method, path, rule, and handler.
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    route: fn() -> Route,
}

const NS: &str = "/v1/namespaces/{ns}";

/// Every route of the API, with its rule.
pub static ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        method: Method::POST,
        path: "/v1/namespaces/{ns}/log",
        access: Access::Scoped(Scope::Write),
        route: || web::post().to(write::write_one),
    },
    Endpoint {
        method: Method::POST,
        path: "/v1/namespaces/{ns}/log/batch",
        access: Access::Scoped(Scope::Write),
        route: || web::post().to(write::write_batch),
    },
    Endpoint {
        method: Method::POST,
        path: "/v1/namespaces/{ns}/mutations",
        access: Access::Scoped(Scope::Write),
        route: || web::post().to(write::write_set),
    },
    Endpoint {
        method: Method::GET,
        path: "/v1/namespaces/{ns}/delayed",
        access: Access::Scoped(Scope::Read),
        route: || web::get().to(delayed::list),
    },
    Endpoint {
        method: Method::DELETE,
        path: "/v1/namespaces/{ns}/delayed/{id}",
        access: Access::Scoped(Scope::Admin),
        route: || web::delete().to(delayed::cancel),
    },
    Endpoint {
        method: Method::GET,
        path: "/v1/namespaces/{ns}/dlq",
        access: Access::Scoped(Scope::Read),
        route: || web::get().to(dlq::list),
    },
    Endpoint {
        method: Method::POST,
        path: "/v1/namespaces/{ns}/dlq/redrive",
        access: Access::Scoped(Scope::Admin),
        route: || web::post().to(dlq::redrive),
    },
    Endpoint {
        method: Method::POST,
        path: "/v1/namespaces/{ns}/dlq/purge",
        access: Access::Scoped(Scope::Admin),
        route: || web::post().to(dlq::purge),
    },
    Endpoint {
        method: Method::GET,
        path: "/v1/namespaces/{ns}/dlq/{id}",
        access: Access::Scoped(Scope::Read),
        route: || web::get().to(dlq::show),
    },
    Endpoint {
        method: Method::POST,
        path: "/v1/namespaces/{ns}/replays",
        access: Access::Scoped(Scope::Admin),
        route: || web::post().to(replay::start),
    },
    Endpoint {
        method: Method::GET,
        path: "/v1/namespaces/{ns}/replays",
        access: Access::Scoped(Scope::Read),
        route: || web::get().to(replay::list),
    },
    Endpoint {
        method: Method::GET,
        path: "/v1/namespaces/{ns}/replays/{id}",
        access: Access::Scoped(Scope::Read),
        route: || web::get().to(replay::show),
    },
    Endpoint {
        method: Method::DELETE,
        path: "/v1/namespaces/{ns}/replays/{id}",
        access: Access::Scoped(Scope::Admin),
        route: || web::delete().to(replay::cancel),
    },
    Endpoint {
        method: Method::GET,
        path: "/v1/namespaces/{ns}/entries",
        access: Access::Scoped(Scope::Read),
        route: || web::get().to(replay::entries),
    },
    Endpoint {
        method: Method::GET,
        path: "/v1/namespaces",
        access: Access::ReadListed,
        route: || web::get().to(admin::list_namespaces),
    },
    Endpoint {
        method: Method::GET,
        path: NS,
        access: Access::Scoped(Scope::Read),
        route: || web::get().to(admin::namespace_stats),
    },
    Endpoint {
        method: Method::GET,
        path: "/v1/namespaces/{ns}/scale",
        access: Access::Scoped(Scope::Read),
        route: || web::get().to(admin::scale),
    },
    Endpoint {
        method: Method::GET,
        path: "/healthz",
        access: Access::Open,
        route: || web::get().to(admin::healthz),
    },
    Endpoint {
        method: Method::GET,
        path: "/readyz",
        access: Access::Open,
        route: || web::get().to(admin::readyz),
    },
    Endpoint {
        method: Method::GET,
        path: "/metrics",
        access: Access::Metrics,
        route: || web::get().to(admin::metrics),
    },
];

/// Register every endpoint.
pub fn register(cfg: &mut web::ServiceConfig) {
    for e in ENDPOINTS {
        cfg.route(e.path, (e.route)());
    }
}

/// The configured tokens, their hashes decoded.
pub struct Tokens(Vec<([u8; 32], TokenConfig)>);

impl Tokens {
    /// From validated config (a hash that does not decode matches nothing).
    pub fn new(server: &ServerConfig) -> Self {
        Self(
            server
                .tokens
                .iter()
                .map(|t| {
                    let mut hash = [0u8; 32];
                    if hex::decode_to_slice(&t.sha256, &mut hash).is_err() {
                        hash = [0xff; 32];
                    }
                    (hash, t.clone())
                })
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The token whose hash is `token`'s, compared in constant time with
    /// every configured hash.
    fn find(&self, token: &[u8]) -> Option<&TokenConfig> {
        let presented: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for (hash, t) in &self.0 {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(t);
            }
        }
        found
    }
}

/// Whether `req` may go on to its handler; the caller, when it showed a
/// token.
pub fn admit(req: &ServiceRequest) -> Result<Option<Caller>, ApiError> {
    let Some(state) = req.app_data::<web::Data<AppState>>() else {
        return Ok(None);
    };
    let pattern = req.match_pattern();
    let Some(endpoint) = ENDPOINTS
        .iter()
        .find(|e| e.method == req.method() && pattern.as_deref() == Some(e.path))
    else {
        // No such route: the router answers 404 (or 405).
        return Ok(None);
    };
    let tokens = state
        .tokens
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if tokens.is_empty() {
        if endpoint.access == Access::Scoped(Scope::Admin) {
            audit("(no token: loopback or allow_unauthenticated)", req);
        }
        return Ok(None);
    }
    let scope = match endpoint.access {
        Access::Open => return Ok(None),
        Access::Metrics if state.server.metrics_public => return Ok(None),
        Access::Metrics | Access::ReadListed => Scope::Read,
        Access::Scoped(scope) => scope,
    };
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(presented) = presented.filter(|t| !t.is_empty()) else {
        return Err(ApiError::rejected(
            StatusCode::UNAUTHORIZED,
            "a token is required: send `Authorization: Bearer <token>`",
        ));
    };
    let Some(token) = tokens.find(presented.as_bytes()) else {
        return Err(ApiError::rejected(
            StatusCode::UNAUTHORIZED,
            "the token is not known here (revoked, or for another server)",
        ));
    };
    // Every scoped path is /v1/namespaces/{ns}/...
    let namespace = match endpoint.access {
        Access::Scoped(_) => req.path().split('/').nth(3),
        _ => None,
    };
    let covered = match endpoint.access {
        Access::ReadListed => true,
        _ => token.covers(namespace),
    };
    if !token.may(scope) || !covered {
        return Err(ApiError::rejected(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} may not do this: it needs {:?} on {}",
                token.name,
                scope.as_str(),
                namespace.map_or("every namespace".to_string(), |ns| format!(
                    "namespace {ns:?}"
                )),
            ),
        ));
    }
    if scope == Scope::Admin {
        audit(&token.name, req);
    }
    Ok(Some(Caller(token.clone())))
}

/// One line per admin action (redrive, purge, cancel, replay), naming who.
fn audit(who: &str, req: &ServiceRequest) {
    info!(target: "walden::audit", token = %who, method = %req.method(), path = %req.path(),
        "Admin action.");
}
