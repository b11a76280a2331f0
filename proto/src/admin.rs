//! The admin HTTP listener every Ferry program runs: binding rules (loopback unless a
//! token is configured), bearer-token checks in constant time, and the Prometheus text
//! endpoint. Each program adds its own routes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "the admin listener {addr} is not on loopback, so it needs a token: set admin_token_file (or --admin-token-file) or listen on 127.0.0.1"
    )]
    TokenRequired { addr: SocketAddr },
    #[error("cannot read the admin token file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the admin token file {path} is empty; put a long random string in it")]
    EmptyToken { path: String },
    #[error("cannot listen for admin HTTP on {addr}: {source}; pick another address with --admin")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Reads the token file (first line, trimmed) if one is configured.
pub fn load_token(path: Option<&Path>) -> Result<Option<Arc<str>>, AdminError> {
    let Some(path) = path else { return Ok(None) };
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| AdminError::TokenFile {
        path: shown.clone(),
        source,
    })?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(AdminError::EmptyToken { path: shown });
    }
    Ok(Some(Arc::from(token)))
}

/// Binds the admin listener, refusing a non-loopback address without a token.
pub async fn bind(
    addr: SocketAddr,
    token: &Option<Arc<str>>,
) -> Result<tokio::net::TcpListener, AdminError> {
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(AdminError::TokenRequired { addr });
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Paths a load balancer or orchestrator probes; they reveal nothing but liveness,
/// so they answer without the token.
const OPEN_PATHS: &[&str] = &["/healthz", "/readyz"];

async fn require_token(State(token): State<Arc<str>>, request: Request, next: Next) -> Response {
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            "admin token required: send Authorization: Bearer <token>\n",
        )
            .into_response()
    }
}

/// Serves `router` on `listener` until the task is dropped, requiring `token` if set.
pub async fn serve(listener: tokio::net::TcpListener, router: Router, token: Option<Arc<str>>) {
    let router = match token {
        Some(token) => router.layer(middleware::from_fn_with_state(token, require_token)),
        None => router,
    };
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!("admin HTTP server stopped: {e}");
    }
}

/// Renders a Prometheus registry in the text exposition format.
pub fn metrics_response(registry: &prometheus::Registry) -> Response {
    let mut body = String::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode_utf8(&registry.gather(), &mut body) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response()
}
