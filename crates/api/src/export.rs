//! `GET /v1/sessions/{id}/export`: the transcript for a model API, as
//! OpenAI Chat Completions messages (`format=openai`) or as an Anthropic
//! Messages API request (`format=anthropic`). The rendering and each API's
//! rules live in `baton_core::export`; this route reads the log and the
//! query.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::Json;
use baton_core::export::{self, Options};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use crate::extract::{query_u64, Owner, SessionPath};
use crate::AppState;

/// The exported transcript.
#[derive(Debug, Serialize, ToSchema)]
pub struct Export {
    /// `format=anthropic` only, when the log has notes before its first
    /// message: the request's top-level `system`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// `openai`: Chat Completions messages (`role` `user`, `assistant` with
    /// `tool_calls`, `tool` with `tool_call_id`, `system`). `anthropic`:
    /// Messages API messages (`role` `user` or `assistant`, alternating,
    /// content blocks `text`, `tool_use`, `tool_result`).
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
}

/// A `true`/`false` query flag; anything else is a `400`.
fn flag(q: &HashMap<String, String>, name: &str) -> ApiResult<bool> {
    match q.get(name).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::invalid(format!(
            "{name} must be true or false, got {other:?}"
        ))),
    }
}

/// Export the transcript for a model API.
#[utoipa::path(get, path = "/v1/sessions/{id}/export", operation_id = "exportSession",
    params(
        ("id" = String, Path),
        ("format" = Option<String>, Query, description = "`openai` (default): Chat Completions `messages`; `anthropic`: a Messages API request's `{system, messages}`"),
        ("after" = Option<u64>, Query, description = "only entries after this seq"),
        ("upto" = Option<u64>, Query, description = "only entries up to this seq (inclusive)"),
        ("include_running" = Option<bool>, Query, description = "include the running turn (its open tool calls get a placeholder result); default false: left out whole"),
        ("include_thoughts" = Option<bool>, Query, description = "include the agent's thoughts as `<thinking>` text; default false"),
    ),
    responses((status = 200, body = Export), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn export(
    State(state): State<AppState>,
    Owner(owner): Owner,
    SessionPath(id): SessionPath,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Export>> {
    let anthropic = match q.get("format").map(String::as_str) {
        Some("openai") | None => false,
        Some("anthropic") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "unknown export format {other:?}; supported: openai, anthropic"
            )))
        }
    };
    let opts = Options {
        after: query_u64(&q, "after")?.unwrap_or(0),
        upto: query_u64(&q, "upto")?,
        include_running: flag(&q, "include_running")?,
        include_thoughts: flag(&q, "include_thoughts")?,
    };
    if opts.upto.is_some_and(|u| u < opts.after) {
        return Err(ApiError::invalid("upto must not be below after"));
    }
    state.engine.session(&owner, id).await?;
    // The whole log: which turn is running, and which turn consumed a user
    // message, are read from entries outside the range too.
    let mut entries = Vec::new();
    let mut after = 0;
    loop {
        let page = state.engine.store().entries(id, after, 1000).await?;
        let Some(last) = page.entries.last() else {
            break;
        };
        after = last.seq;
        entries.extend(page.entries);
        if after >= page.last_seq {
            break;
        }
    }
    Ok(Json(if anthropic {
        let mut req = export::anthropic(&entries, &opts);
        Export {
            system: req["system"].as_str().map(str::to_owned),
            messages: match req["messages"].take() {
                Value::Array(m) => m,
                _ => Vec::new(),
            },
        }
    } else {
        Export {
            system: None,
            messages: export::openai(&entries, &opts),
        }
    }))
}
