//! Request extraction with the API's own errors: the owner from the bearer
//! token, JSON bodies (size judged on the bytes actually read), path ids,
//! strict query integers and the `Idempotency-Key` header.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use axum::body::BodyDataStream;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use baton_core::SessionId;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::answers::{map, Answers};
use crate::error::ApiError;
use crate::AppState;

impl Answers for Owner {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>> {
        map(&[(401, "unauthorized")])
    }
}

/// The session named by the path's `{id}`: malformed is a `400`; missing
/// (or another owner's) a `404` from the handler's lookup.
pub struct SessionPath(pub SessionId);

impl<S: Send + Sync> FromRequestParts<S> for SessionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid(e.body_text()))?;
        session_id(&raw).map(SessionPath)
    }
}

impl Answers for SessionPath {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>> {
        map(&[(400, "invalid_request"), (404, "not_found")])
    }
}

/// A session's permission request: `{id}` and `{request_id}`.
pub struct PermissionPath(pub SessionId, pub String);

impl<S: Send + Sync> FromRequestParts<S> for PermissionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path((raw, request_id)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid(e.body_text()))?;
        Ok(PermissionPath(session_id(&raw)?, request_id))
    }
}

impl Answers for PermissionPath {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>> {
        map(&[(400, "invalid_request"), (404, "not_found")])
    }
}

/// The `Idempotency-Key` header: malformed is a `400`; reused with another
/// request a `409`.
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        idempotency_key(&parts.headers).map(IdempotencyKey)
    }
}

impl Answers for IdempotencyKey {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>> {
        map(&[(400, "invalid_request"), (409, "idempotency_conflict")])
    }
}

/// Other headers a handler reads itself.
impl Answers for HeaderMap {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>> {
        map(&[(400, "invalid_request")])
    }
}

/// What reading a JSON body can answer, and what the body's request can.
fn body_answers<T: Answers>() -> BTreeMap<u16, BTreeSet<&'static str>> {
    let mut out = map(&[
        (400, "invalid_request"),
        (408, "request_timeout"),
        (413, "payload_too_large"),
        (503, "unavailable"),
    ]);
    for (status, codes) in T::answers() {
        out.entry(status).or_default().extend(codes);
    }
    out
}

impl<T: Answers> Answers for JsonBody<T> {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>> {
        body_answers::<T>()
    }
}

impl<T: Answers> Answers for MaybeJsonBody<T> {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>> {
        body_answers::<T>()
    }
}

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
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim_start_matches(' '))
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
        match read_json(req, state, true).await? {
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
        read_json(req, state, false).await.map(MaybeJsonBody)
    }
}

/// Whether the request says it carries a body.
fn declares_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// `application/json`, with parameters allowed, compared without case.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("");
    essence.trim().eq_ignore_ascii_case("application/json")
}

async fn read_json<T: DeserializeOwned>(
    req: Request,
    state: &AppState,
    required: bool,
) -> Result<Option<T>, ApiError> {
    let headers = req.headers();
    match headers.get(header::CONTENT_TYPE) {
        Some(v) => {
            let ct = v.to_str().unwrap_or("");
            if !is_json(ct) {
                return Err(ApiError::invalid(format!(
                    "Content-Type must be application/json, not {:?}",
                    String::from_utf8_lossy(v.as_bytes())
                )));
            }
        }
        // An optional body left out needs no type; a body does.
        None if required || declares_body(headers) => {
            return Err(ApiError::invalid(
                "Content-Type must be application/json (it is missing)",
            ))
        }
        None => return Ok(None),
    }
    let limit = state.cfg.max_body;
    // A declared length over the limit is refused before a byte of the body
    // is read: hyper sends `100 Continue` only once the body is polled, so a
    // client that asked for it gets the 413 instead.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(len) = declared.filter(|&len| len > limit as u64) {
        let expects = headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !expects && len <= DRAIN_MAX_BYTES as u64 {
            drain(req.into_body().into_data_stream()).await;
        }
        return Err(ApiError::too_large(limit));
    }
    // Read here (not with axum's `Bytes`) so an undeclared (chunked) body is
    // judged on the bytes read, and drained before the `413`.
    let mut body = req.into_body().into_data_stream();
    let read = async {
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
        Ok(bytes)
    };
    // A body still arriving when the server has stopped its turns is not
    // waited for: shutdown never hangs on a half-sent request.
    let mut closed = state.engine.shutdown_signal();
    let bytes = tokio::select! {
        read = tokio::time::timeout(state.cfg.body_timeout, read) => {
            read.map_err(|_| ApiError::body_timeout(state.cfg.body_timeout))??
        }
        _ = closed.wait_for(|c| *c) => return Err(ApiError::shutting_down()),
    };
    if bytes.is_empty() {
        return if required {
            Err(ApiError::invalid(
                "the body is empty; expected a JSON object",
            ))
        } else {
            Ok(None)
        };
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))?;
    // serde would read an array as a struct, field by field.
    if !value.is_object() {
        return Err(ApiError::invalid("the body must be a JSON object"));
    }
    if let Some(path) = nul_at(&value, String::new()) {
        return Err(ApiError::invalid(format!(
            "text must not contain a NUL character (U+0000); found at {path}"
        )));
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| ApiError::invalid(format!("invalid body: {e}")))
}

/// Where a NUL character sits in a JSON value (a key or a string), if
/// anywhere. One rule on both stores: PostgreSQL's `text` and `jsonb` cannot
/// hold one, so no body that has one is accepted.
fn nul_at(value: &serde_json::Value, path: String) -> Option<String> {
    match value {
        serde_json::Value::String(s) if s.contains('\0') => {
            Some(if path.is_empty() { "/".into() } else { path })
        }
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_at(v, format!("{path}/{i}"))),
        serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                Some(format!("{path}/{}", k.replace('\0', "\\u0000")))
            } else {
                nul_at(v, format!("{path}/{k}"))
            }
        }),
        _ => None,
    }
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
