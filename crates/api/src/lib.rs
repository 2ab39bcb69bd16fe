//! Baton's HTTP API: REST and Server-Sent Events over axum, JSON errors,
//! bearer-token owners, an OpenAPI document and Prometheus metrics.
//!
//! The API is thin: it authenticates, validates (I11: a bad request is a
//! `4xx` JSON error and writes nothing), calls the engine, and maps errors.
//! Ownership is checked on every session route; another owner's session is
//! answered exactly like a missing one (I10).

pub mod ai_sdk;
pub mod answers;
pub mod document;
pub mod error;
pub mod export;
pub mod extract;
pub mod inspector;
pub mod metrics;
pub mod sessions;
pub mod stream;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::MethodRouter;
use axum::{Json, Router};
use baton_core::Policy;
use baton_engine::Engine;
use utoipa::OpenApi;

pub use document::document;
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
    info(title = "Baton", description = "A session runtime for AI agents: ordered logs, one turn at a time, busy policies, resumable streams.\n\nEvery error is a JSON body `{\"error\": {\"code\", \"message\"}}`. Besides the answers each operation lists, the server answers requests it cannot route or parse itself, with the same body: `400 invalid_request` (a malformed request line or header, a duplicate `Content-Length`), `404 not_found` (no such route), `405 method_not_allowed`, `414 uri_too_long`, `431 header_too_large`, and `503 too_many_connections` past its connection cap. Bodies are JSON objects sent as `application/json`; no text in them may hold a NUL character (U+0000)."),
    paths(
        sessions::create, sessions::list, sessions::get, sessions::delete, sessions::post_message,
        sessions::entries, sessions::turns, sessions::cancel, sessions::permissions,
        sessions::answer_permission, stream::stream, export::export, agents, healthz,
        metrics::render, openapi, ai_sdk::chat, ai_sdk::resume, ai_sdk::stop, ai_sdk::messages
    ),
    components(schemas(AgentList, AgentInfo, Health, error::ErrorBody, baton_core::Entry, baton_core::Session, sessions::ListedSession, baton_core::PermissionInfo,
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

/// `GET /v1/agents`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct AgentList {
    pub agents: Vec<AgentInfo>,
}

/// A configured agent.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct AgentInfo {
    pub name: String,
    /// `demo` or `acp`.
    pub kind: String,
    /// Whether a running turn takes more input (`steer` joins it).
    pub mid_turn_input: bool,
    /// ACP: the command line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// ACP: the agent process's status.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub process: Option<serde_json::Value>,
    /// ACP: the capabilities from `initialize`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub capabilities: Option<serde_json::Value>,
}

/// The configured agents.
#[utoipa::path(get, path = "/v1/agents", operation_id = "listAgents",
    responses((status = 200, description = "The configured agents, whether a running turn takes more input, their capabilities from `initialize`, and process status", body = AgentList)))]
async fn agents(State(state): State<AppState>, _owner: extract::Owner) -> Json<serde_json::Value> {
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

/// `GET /healthz`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// This node's id.
    pub node: String,
}

/// Liveness and store reachability.
#[utoipa::path(get, path = "/healthz", operation_id = "getHealth",
    responses((status = 200, description = "The store answers", body = Health)))]
async fn healthz(State(state): State<AppState>) -> error::ApiResult<Json<Health>> {
    state.engine.store().ping().await?;
    Ok(Json(Health {
        status: "ok".into(),
        node: state.engine.node().to_owned(),
    }))
}

/// This API document (OpenAPI 3.1).
#[utoipa::path(get, path = "/openapi.json", operation_id = "getOpenApi",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
async fn openapi() -> Json<serde_json::Value> {
    Json(document())
}

async fn fallback() -> error::ApiError {
    error::ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: "no such route: the API is described at /openapi.json, and the inspector (a browser UI) is at /".into(),
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

/// One API route: its method, its path, and what its handler can answer
/// (derived from the handler's signature, see [`answers`]).
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub answers: BTreeMap<u16, BTreeSet<&'static str>>,
}

/// Declares the API's routes once: [`routes`] lists them, and the router is
/// built from the same list, so the two cannot differ.
macro_rules! api_routes {
    ($($path:literal => { $($method:ident $handler:path),+ })*) => {
        /// Every API route (the inspector's pages aside).
        pub fn routes() -> Vec<Route> {
            vec![$($(Route {
                method: stringify!($method),
                path: $path,
                answers: answers::of(&$handler),
            },)+)*]
        }

        fn api_router() -> Router<AppState> {
            Router::new()$(.route($path, MethodRouter::new()$(.$method($handler))+))*
        }
    };
}

api_routes! {
    "/v1/sessions" => { post sessions::create, get sessions::list }
    "/v1/sessions/{id}" => { get sessions::get, delete sessions::delete }
    "/v1/sessions/{id}/messages" => { post sessions::post_message }
    "/v1/sessions/{id}/entries" => { get sessions::entries }
    "/v1/sessions/{id}/stream" => { get stream::stream }
    "/v1/sessions/{id}/cancel" => { post sessions::cancel }
    "/v1/sessions/{id}/turns" => { get sessions::turns }
    "/v1/sessions/{id}/permissions" => { get sessions::permissions }
    "/v1/sessions/{id}/permissions/{request_id}" => { post sessions::answer_permission }
    "/v1/sessions/{id}/export" => { get export::export }
    "/v1/ai-sdk/chat" => { post ai_sdk::chat }
    "/v1/ai-sdk/chat/{id}/stream" => { get ai_sdk::resume }
    "/v1/ai-sdk/chat/{id}/stop" => { post ai_sdk::stop }
    "/v1/ai-sdk/chat/{id}/messages" => { get ai_sdk::messages }
    "/v1/agents" => { get agents }
    "/healthz" => { get healthz }
    "/metrics" => { get metrics::render }
    "/openapi.json" => { get openapi }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let max_body = state.cfg.max_body;
    api_router()
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
