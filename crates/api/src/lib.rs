//! Baton's HTTP API: REST and Server-Sent Events over axum, JSON errors,
//! bearer-token owners, an OpenAPI document and Prometheus metrics.
//!
//! The API is thin: it authenticates, validates (I11: a bad request is a
//! `4xx` JSON error and writes nothing), calls the engine, and maps errors.
//! Ownership is checked on every session route; another owner's session is
//! answered exactly like a missing one (I10).

pub mod ai_sdk;
pub mod error;
pub mod export;
pub mod extract;
pub mod inspector;
pub mod metrics;
pub mod sessions;
pub mod stream;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use baton_core::Policy;
use baton_engine::Engine;
use utoipa::OpenApi;

pub use extract::Auth;
pub use metrics::Metrics;

/// API settings.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// The largest request body accepted, in bytes: a declared length over
    /// it is refused before the body is read, an undeclared one on the
    /// bytes read.
    pub max_body: usize,
    /// How long a request body may take to arrive in full (`408` past it).
    pub body_timeout: std::time::Duration,
    /// The agent of a session created without one.
    pub default_agent: String,
    /// The policy of a session created without one.
    pub default_policy: Policy,
    /// The debounce window (ms) of a session created without one.
    pub default_debounce_ms: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_body: 256 * 1024,
            body_timeout: std::time::Duration::from_secs(30),
            default_agent: "demo".into(),
            default_policy: Policy::Queue,
            default_debounce_ms: 0,
        }
    }
}

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub auth: Arc<Auth>,
    pub cfg: Arc<ApiConfig>,
    pub metrics: Arc<Metrics>,
}

/// The API document, generated from the handlers and types.
#[derive(OpenApi)]
#[openapi(
    info(title = "Baton", description = "A session runtime for AI agents: ordered logs, one turn at a time, busy policies, resumable streams."),
    paths(
        sessions::create, sessions::list, sessions::get, sessions::delete, sessions::post_message,
        sessions::entries, sessions::turns, sessions::cancel, sessions::permissions,
        sessions::answer_permission, stream::stream, export::export, agents, healthz,
        metrics::render, openapi, ai_sdk::chat, ai_sdk::resume, ai_sdk::stop, ai_sdk::messages
    ),
    components(schemas(baton_core::Entry, baton_core::Session, sessions::ListedSession, baton_core::PermissionInfo,
        baton_core::PermissionOptionInfo, baton_core::PermissionPolicy, baton_core::PermissionStatus, baton_core::Turn, baton_core::Disposition, baton_core::Policy,
        ai_sdk::ChatRequest, ai_sdk::Stopped, ai_sdk::Transcript)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

/// The configured agents.
#[utoipa::path(get, path = "/v1/agents", responses((status = 200, description = "`{agents: [{name, kind, mid_turn_input, command?, process?, capabilities?}]}`: the configured agents, whether a running turn takes more input (`steer` joins it), their capabilities from `initialize`, and process status")))]
async fn agents(State(state): State<AppState>, _owner: extract::Owner) -> impl IntoResponse {
    let agents: Vec<_> = state
        .engine
        .agents()
        .names()
        .filter_map(|name| {
            let driver = state.engine.agents().get(name)?;
            let mut about = driver.describe();
            about["name"] = serde_json::json!(name);
            about["mid_turn_input"] = serde_json::json!(driver.takes_mid_turn_input());
            Some(about)
        })
        .collect();
    Json(serde_json::json!({ "agents": agents }))
}

/// Liveness and store reachability.
#[utoipa::path(get, path = "/healthz", security(()), responses((status = 200), (status = 503, body = error::ErrorBody)))]
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match state.engine.store().ping().await {
        Ok(()) => (
            StatusCode::OK,
            Json(serde_json::json!({"status": "ok", "node": state.engine.node()})),
        )
            .into_response(),
        Err(e) => error::ApiError::from(e).into_response(),
    }
}

/// This API document.
#[utoipa::path(get, path = "/openapi.json", security(()), responses((status = 200, description = "The OpenAPI document")))]
async fn openapi() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

async fn fallback() -> error::ApiError {
    error::ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: "no such route".into(),
        turn_id: None,
        permission: None,
    }
}

async fn method_not_allowed() -> error::ApiError {
    error::ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        message: "method not allowed on this route".into(),
        turn_id: None,
        permission: None,
    }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let max_body = state.cfg.max_body;
    Router::new()
        .route("/v1/sessions", post(sessions::create).get(sessions::list))
        .route(
            "/v1/sessions/{id}",
            get(sessions::get).delete(sessions::delete),
        )
        .route("/v1/sessions/{id}/messages", post(sessions::post_message))
        .route("/v1/sessions/{id}/entries", get(sessions::entries))
        .route("/v1/sessions/{id}/stream", get(stream::stream))
        .route("/v1/sessions/{id}/cancel", post(sessions::cancel))
        .route("/v1/sessions/{id}/turns", get(sessions::turns))
        .route("/v1/sessions/{id}/permissions", get(sessions::permissions))
        .route(
            "/v1/sessions/{id}/permissions/{request_id}",
            post(sessions::answer_permission),
        )
        .route("/v1/sessions/{id}/export", get(export::export))
        .route("/v1/ai-sdk/chat", post(ai_sdk::chat))
        .route("/v1/ai-sdk/chat/{id}/stream", get(ai_sdk::resume))
        .route("/v1/ai-sdk/chat/{id}/stop", post(ai_sdk::stop))
        .route("/v1/ai-sdk/chat/{id}/messages", get(ai_sdk::messages))
        .route("/v1/agents", get(agents))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(openapi))
        .merge(inspector::routes())
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}
