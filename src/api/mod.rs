//! The HTTP API the CRM calls: authentication, validation and the error shape.
//! Handlers call into the store, the scheduler and the IMAP connector; no sync
//! rule lives here.

pub mod auto_bcc;
pub mod contacts;
pub mod dead_letters;
pub mod error;
pub mod inspect;
pub mod mailboxes;
pub mod messages;
pub mod oauth;
pub mod openapi;
pub mod skipped;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use sha2::{Digest as _, Sha256};
use utoipa_swagger_ui::SwaggerUi;

use crate::{
    config::ProvidersConfig, imap::ImapConnector, scheduler::Scheduler, store::Store,
    webhook::OutboxSignal,
};
use error::{ApiError, ErrorBody};

/// Requests up to this size are read; a bulk contact upload may be larger.
const BODY_LIMIT: usize = 48 * 1024 * 1024;
const BULK_BODY_LIMIT: usize = 256 * 1024 * 1024;
/// A message to inspect: as large as one the bridge syncs.
const INSPECT_BODY_LIMIT: usize = 64 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub scheduler: Arc<Scheduler>,
    pub connector: ImapConnector,
    pub providers: ProvidersConfig,
    pub signal: OutboxSignal,
    /// SHA-256 of every accepted API key.
    pub key_hashes: Arc<Vec<[u8; 32]>>,
    pub ready: Arc<AtomicBool>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The integrations' Auto BCC addresses (R15).
    pub smart: crate::smart_address::SmartAddresses,
    /// Explains routing decisions (`POST /v1/inspect`).
    pub ingest: crate::ingest::Ingest,
    /// Wakes the worker that makes the CRM's changes in mailboxes.
    pub changes_signal: crate::wakeup::Wakeup,
    pub send_signal: crate::send_queue::SendSignal,
    pub public_url: String,
    pub auth: Arc<crate::auth::Auth>,
    /// Signs the `state` of OAuth sign-ins.
    pub oauth_state: crate::oauth::state::StateSigner,
    /// Which core workers are down (restarting).
    pub health: crate::supervise::Health,
    /// `/metrics` without the API key (`[server] metrics_public`).
    pub metrics_public: bool,
    /// Where each mailbox's sessions stand.
    pub sync_status: crate::sync_status::SyncStatus,
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Whether `key` is one of the accepted ones, compared in constant time
/// (and against every one, so the time says nothing of which matched).
fn key_accepted(hashes: &[[u8; 32]], key: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    let presented = hash_key(key);
    hashes
        .iter()
        .fold(subtle::Choice::from(0), |found, hash| {
            found | hash.ct_eq(&presented)
        })
        .into()
}

pub fn router(state: AppState) -> Router {
    let mut described = openapi::Described::new(state.metrics_public);
    described.keyed = described.keyed.route_layer(middleware::from_fn_with_state(
        state.clone(),
        require_api_key,
    ));
    if !state.metrics_public {
        described.metrics = described
            .metrics
            .route_layer(middleware::from_fn_with_state(
                state.clone(),
                require_api_key,
            ));
    }
    let (routes, document) = described.assemble().split_for_parts();
    let docs = SwaggerUi::new("/docs")
        .url("/openapi.json", openapi::complete(document))
        // The page must not call validator.swagger.io: nothing leaves the host.
        .config(utoipa_swagger_ui::Config::default().validator_url("none"));
    routes
        .merge(docs)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(state)
}

async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(key) if key_accepted(&state.key_hashes, key) => next.run(request).await,
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the API key is not valid",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the API key as \"Authorization: Bearer <key>\"",
        )
        .into_response(),
    }
}

/// Liveness and readiness answers.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok` (live) or `ready`.
    status: String,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: started, and no core worker is restarting.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Starting, stopping, or a worker is restarting (`not_ready`)", body = ErrorBody),
    ))]
async fn readyz(State(state): State<AppState>) -> Response {
    let down = state.health.down();
    if !down.is_empty() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("restarting after a crash: {}", down.join(", ")),
        )
        .into_response()
    } else if state.ready.load(Ordering::Relaxed) {
        Json(Health {
            status: "ready".into(),
        })
        .into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "starting up or shutting down",
        )
        .into_response()
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, description = "`[server] metrics_public = false` and the API key is missing or not valid", body = ErrorBody),
        (status = 503, description = "No metrics recorder is installed", body = ErrorBody),
    ))]
/// Costs the same however big the store: gauges such as
/// `mailbridge_outbox_pending` are set by the workers as they go.
async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => {
            // Kept by the panic hook, which must not call into the recorder
            // (a panic inside it would deadlock on its locks).
            metrics::counter!("mailbridge_panics_total").absolute(crate::panics::count());
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
                .into_response()
        }
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics_unavailable",
            "no metrics recorder is installed",
        )
        .into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    // A bug, never the client's fault; the daemon keeps serving.
    tracing::error!("a request handler panicked");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "internal_error",
        "the request failed inside the bridge; retry, and report it if it persists",
    )
    .into_response()
}

pub fn mark_ready(state: &AppState, ready: bool) {
    state.ready.store(ready, Ordering::Relaxed);
}
