//! Request extraction with the API's own errors: the owner from the bearer
//! token, JSON bodies (size judged on the bytes actually read), path ids,
//! strict query integers and the `Idempotency-Key` header.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::BodyDataStream;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use baton_core::SessionId;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::AppState;

/// The authenticated owner of the request.
#[derive(Clone, Debug)]
pub struct Owner(pub String);

impl FromRequestParts<AppState> for Owner {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state.auth.owner(&parts.headers).map(Owner)
    }
}

/// Maps bearer secrets to owners. Empty: every request is owner `local`.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    tokens: Vec<(String, String)>,
}

impl Auth {
    /// From `(owner, secret)` pairs.
    pub fn new(tokens: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            tokens: tokens.into_iter().collect(),
        }
    }

    /// Whether requests need a bearer token (tokens are configured).
    pub fn requires_token(&self) -> bool {
        !self.tokens.is_empty()
    }

    fn owner(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        if self.tokens.is_empty() {
            return Ok("local".to_owned());
        }
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::unauthorized("Authorization must be Bearer <token>"))?;
        // Compare against every secret without stopping early, so timing
        // does not reveal which prefix matched.
        let mut found = None;
        for (owner, secret) in &self.tokens {
            if constant_eq(secret.as_bytes(), token.as_bytes()) {
                found = Some(owner.clone());
            }
        }
        found.ok_or_else(|| ApiError::unauthorized("unknown token"))
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A JSON body, rejected with the API's errors.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        match read_json(req, state).await? {
            Some(v) => Ok(JsonBody(v)),
            None => Err(ApiError::invalid(
                "the body is empty; expected a JSON object",
            )),
        }
    }
}

/// A JSON body that may be left out (an empty body is `None`).
pub struct MaybeJsonBody<T>(pub Option<T>);

impl<T: DeserializeOwned> FromRequest<AppState> for MaybeJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        read_json(req, state).await.map(MaybeJsonBody)
    }
}

async fn read_json<T: DeserializeOwned>(
    req: Request,
    state: &AppState,
) -> Result<Option<T>, ApiError> {
    let content_type = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.is_empty() && !content_type.starts_with("application/json") {
        return Err(ApiError::invalid(format!(
            "Content-Type must be application/json, not {content_type:?}"
        )));
    }
    // Read here (not with axum's `Bytes`) so an oversized body is judged
    // on the bytes read, chunked or not, and drained before the `413`.
    let limit = state.cfg.max_body;
    let mut body = req.into_body().into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::invalid(format!("could not read the body: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            drain(body).await;
            return Err(ApiError::too_large(limit));
        }
        bytes.extend_from_slice(&chunk);
    }
    if bytes.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

/// How much of a refused (oversized) body is still read and discarded, and
/// for how long at most. A client that is still sending when the server
/// answers and closes would get a connection reset instead of the `413`
/// (closing a socket with unread data resets it, and the reset can destroy
/// the response before the client reads it), so the rest of the body is
/// consumed first, within these bounds.
const DRAIN_MAX_BYTES: usize = 4 * 1024 * 1024;
const DRAIN_MAX_TIME: Duration = Duration::from_secs(2);

async fn drain(mut body: BodyDataStream) {
    let _ = tokio::time::timeout(DRAIN_MAX_TIME, async {
        let mut seen = 0usize;
        while let Some(Ok(chunk)) = body.next().await {
            seen += chunk.len();
            if seen > DRAIN_MAX_BYTES {
                break;
            }
        }
    })
    .await;
}

/// Parses a session id from the path.
pub fn session_id(raw: &str) -> Result<SessionId, ApiError> {
    SessionId::parse(raw).map_err(|e| ApiError::invalid(e.to_string()))
}

/// A non-negative integer query parameter; anything else is a `400`.
pub fn query_u64(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    q.get(name).map(|v| parse_u64(name, v)).transpose()
}

/// Parses a non-negative decimal integer strictly (no sign, no spaces).
pub fn parse_u64(name: &str, v: &str) -> Result<u64, ApiError> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::invalid(format!(
            "{name} must be a non-negative integer, got {v:?}"
        )));
    }
    v.parse()
        .map_err(|_| ApiError::invalid(format!("{name} is out of range: {v:?}")))
}

/// The `Idempotency-Key` header, if any: 1–255 visible ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| ApiError::invalid("Idempotency-Key must be visible ASCII"))?;
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid(
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(Some(s.to_owned()))
}
