//! `/v1/sessions` and everything under a session except the stream.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use baton_core::{
    Disposition, Entry, Policy, Seq, Session, SessionId, SessionStatus, Timestamp, Turn, TurnId,
};
use baton_store::{AnswerPermission, CreateSession, ListCursor, PostMessage, SessionQuery};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::answers::{map, Answers};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{
    query_u64, IdempotencyKey, JsonBody, MaybeJsonBody, Owner, PermissionPath, SessionPath,
};
use crate::AppState;

/// `POST /v1/sessions` body.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSessionBody {
    /// The agent (default: the server's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The busy policy (default: the server's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// Free-form JSON object kept with the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    /// A first message: stored as entry 1, and the first turn starts (when
    /// the session debounces, once its window closes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What the agent's permission requests get in this session: `allow`,
    /// `deny` or `ask` (default: the agent's own policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission: Option<baton_core::PermissionPolicy>,
    /// Debounce window in milliseconds (default: the server's; 0: off): a
    /// message that would start a turn on an idle session waits until no
    /// message came for this long (at most 10 windows after the first), and
    /// the turn takes every message waiting then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debounce_ms: Option<u64>,
}

/// `POST /v1/sessions/{id}/messages` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostMessageBody {
    /// The message; a non-empty string without NUL characters.
    pub content: String,
    /// Overrides the session's policy for this message. `steer` hands it
    /// to the running turn when its agent takes input mid-turn (`steered`),
    /// else it is queued.
    #[serde(default)]
    pub policy: Option<Policy>,
}

/// `201` (or `200` on a retry) for a message.
#[derive(Debug, Serialize, ToSchema)]
pub struct Posted {
    pub entry: Entry,
    pub disposition: Disposition,
}

/// `POST /v1/sessions/{id}/permissions/{request_id}` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AnswerBody {
    /// One of the request's options.
    pub option_id: String,
}

/// `201` (or `200` on an identical retry) for an answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct PermissionAnswered {
    /// The `permission_decision` entry.
    pub decision: Entry,
}

/// `GET /v1/sessions/{id}/permissions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PermissionList {
    /// The pending requests' `permission_request` entries, oldest first.
    pub permissions: Vec<Entry>,
}

/// `GET /v1/sessions`: one page, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<ListedSession>,
    /// Pass as `?cursor=` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// A session in a list: the session, and when its log last moved.
#[derive(Debug, Serialize, ToSchema)]
pub struct ListedSession {
    #[serde(flatten)]
    pub session: Session,
    /// The time of the session's latest entry (its creation if none).
    pub last_activity_at: Timestamp,
}

/// The opaque `next_cursor` of a page ending with this session.
fn encode_cursor(c: ListCursor) -> String {
    format!("{}.{}", c.created_at.micros(), c.id)
}

fn decode_cursor(raw: &str) -> ApiResult<ListCursor> {
    let bad = || ApiError::invalid(format!("cursor {raw:?} is not a next_cursor this API gave"));
    let (micros, id) = raw.split_once('.').ok_or_else(bad)?;
    if micros.is_empty() || !micros.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    Ok(ListCursor {
        created_at: Timestamp(micros.parse().map_err(|_| bad())?),
        id: SessionId::parse(id).map_err(|_| bad())?,
    })
}

/// `GET /v1/sessions/{id}/entries`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntryPage {
    pub entries: Vec<Entry>,
    pub last_seq: Seq,
}

/// `GET /v1/sessions/{id}/turns`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TurnList {
    pub turns: Vec<Turn>,
}

/// `POST /v1/sessions/{id}/cancel`'s optional body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    /// Cancel only this turn: if it is not the session's active turn (it
    /// ended, or another turn runs now), nothing is cancelled.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub turn_id: Option<TurnId>,
}

/// `POST /v1/sessions/{id}/cancel`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Cancelled {
    /// The turn being cancelled; `null` when nothing was cancelled.
    pub turn_id: Option<TurnId>,
    /// Whether a cancel was requested by this call.
    pub cancelled: bool,
    /// The session's active turn when nothing was cancelled because the
    /// body named another one (`null`: the session is idle).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub active_turn_id: Option<Option<TurnId>>,
}

/// The longest debounce window a session may set (an hour): a turn held
/// back longer than 10 of these is not a burst.
pub const MAX_DEBOUNCE_MS: u64 = 3_600_000;

pub(crate) fn non_empty(content: &str) -> ApiResult<()> {
    if content.trim().is_empty() {
        return Err(ApiError::invalid("content must be a non-empty string"));
    }
    // PostgreSQL's text cannot hold one: refused before either store sees it,
    // so both stores answer the same.
    if content.contains('\0') {
        return Err(ApiError::invalid(
            "content must not contain a NUL character",
        ));
    }
    Ok(())
}

/// Create a session.
#[utoipa::path(post, path = "/v1/sessions", operation_id = "createSession", request_body = CreateSessionBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the create idempotent per owner")),
    responses((status = 201, body = Session), (status = 200, description = "An idempotent retry", body = Session),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    Owner(owner): Owner,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(body): JsonBody<CreateSessionBody>,
) -> ApiResult<Response> {
    let agent = body
        .agent
        .clone()
        .unwrap_or_else(|| state.cfg.default_agent.clone());
    if state.engine.agents().get(&agent).is_none() {
        let known: Vec<&str> = state.engine.agents().names().collect();
        return Err(ApiError::invalid(format!(
            "unknown agent {agent:?}; this server has {known:?}"
        )));
    }
    let metadata = body
        .metadata
        .clone()
        .unwrap_or_else(|| serde_json::json!({}));
    if !metadata.is_object() {
        return Err(ApiError::invalid("metadata must be a JSON object"));
    }
    if let Some(m) = &body.message {
        non_empty(m)?;
    }
    let debounce_ms = body.debounce_ms.unwrap_or(state.cfg.default_debounce_ms);
    if debounce_ms > MAX_DEBOUNCE_MS {
        return Err(ApiError::invalid(format!(
            "debounce_ms must be at most {MAX_DEBOUNCE_MS} (one hour)"
        )));
    }
    let fingerprint = serde_json::to_string(&body).map_err(|e| ApiError::invalid(e.to_string()))?;
    let created = state
        .engine
        .create_session(CreateSession {
            owner,
            agent,
            policy: body.policy.unwrap_or(state.cfg.default_policy),
            metadata,
            idempotency_key: key,
            fingerprint,
            message: body.message,
            permission: body.permission,
            node: state.engine.node().to_owned(),
            debounce_ms,
        })
        .await?;
    let status = if created.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(created.session)).into_response())
}

/// List the caller's sessions, newest first, one page at a time.
#[utoipa::path(get, path = "/v1/sessions", operation_id = "listSessions",
    params(("limit" = Option<u32>, Query, description = "1 to 1000, default 100"),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the previous page"),
        ("status" = Option<String>, Query, description = "`idle` or `running`: only sessions in that status"),
        ("agent" = Option<String>, Query, description = "Only sessions of this agent")),
    responses((status = 200, body = SessionList), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Owner(owner): Owner,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<SessionList>> {
    if let Some(unknown) = q
        .keys()
        .find(|k| !matches!(k.as_str(), "limit" | "cursor" | "status" | "agent"))
    {
        return Err(ApiError::invalid(format!(
            "unknown query parameter {unknown:?}; expected limit, cursor, status or agent"
        )));
    }
    let limit = query_u64(&q, "limit")?.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 1000"));
    }
    let status = match q.get("status").map(String::as_str) {
        None => None,
        Some("idle") => Some(SessionStatus::Idle),
        Some("running") => Some(SessionStatus::Running),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "status must be idle or running, not {other:?}"
            )))
        }
    };
    let query = SessionQuery {
        after: q.get("cursor").map(|c| decode_cursor(c)).transpose()?,
        limit: limit as u32,
        status,
        agent: q.get("agent").cloned(),
    };
    let page = state.engine.store().list_sessions(&owner, &query).await?;
    let next_cursor = match page.sessions.last() {
        Some(last) if page.more => Some(encode_cursor(last.cursor())),
        _ => None,
    };
    let sessions = page
        .sessions
        .into_iter()
        .map(|l| ListedSession {
            session: l.session,
            last_activity_at: l.last_activity_at,
        })
        .collect();
    Ok(Json(SessionList {
        sessions,
        next_cursor,
    }))
}

/// Get a session, with its running turn's pending permission requests.
#[utoipa::path(get, path = "/v1/sessions/{id}", operation_id = "getSession", params(("id" = String, Path)),
    responses((status = 200, body = Session), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    Owner(owner): Owner,
    SessionPath(id): SessionPath,
) -> ApiResult<Json<Session>> {
    Ok(Json(
        state.engine.session_with_permissions(&owner, id).await?,
    ))
}

/// The permission requests waiting for an answer.
#[utoipa::path(get, path = "/v1/sessions/{id}/permissions", operation_id = "listPermissions", params(("id" = String, Path)),
    responses((status = 200, body = PermissionList), (status = 404, body = ErrorBody)))]
pub async fn permissions(
    State(state): State<AppState>,
    Owner(owner): Owner,
    SessionPath(id): SessionPath,
) -> ApiResult<Json<PermissionList>> {
    let permissions = state.engine.permissions(&owner, id).await?;
    Ok(Json(PermissionList { permissions }))
}

/// Answer a permission request, exactly once: the decision is stored, then
/// sent to the agent. An identical retry returns the original decision; any
/// other answer after the first, or one after the request was closed (timed
/// out, its turn cancelled or ended), is `409 permission_closed` with the
/// request's state.
#[utoipa::path(post, path = "/v1/sessions/{id}/permissions/{request_id}", operation_id = "answerPermission", request_body = AnswerBody,
    params(("id" = String, Path), ("request_id" = String, Path)),
    responses((status = 201, body = PermissionAnswered), (status = 200, description = "An identical retry: the original decision", body = PermissionAnswered),
        (status = 400, description = "Malformed body or an option the request does not offer", body = ErrorBody),
        (status = 404, description = "No such session, or no such request in it", body = ErrorBody),
        (status = 409, description = "Already answered otherwise, or closed: `permission` gives its state", body = ErrorBody)))]
pub async fn answer_permission(
    State(state): State<AppState>,
    Owner(owner): Owner,
    PermissionPath(id, request_id): PermissionPath,
    JsonBody(body): JsonBody<AnswerBody>,
) -> ApiResult<Response> {
    if body.option_id.is_empty() {
        return Err(ApiError::invalid("option_id must be a non-empty string"));
    }
    let answered = state
        .engine
        .answer_permission(AnswerPermission {
            owner,
            session_id: id,
            request_id,
            option_id: body.option_id,
        })
        .await?;
    let status = if answered.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let body = PermissionAnswered {
        decision: answered.decision,
    };
    Ok((status, Json(body)).into_response())
}

/// Cancel the session's turn, then delete it and all its entries.
#[utoipa::path(delete, path = "/v1/sessions/{id}", operation_id = "deleteSession", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Owner(owner): Owner,
    SessionPath(id): SessionPath,
) -> ApiResult<StatusCode> {
    state.engine.delete(&owner, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Post a user message; its disposition says what happened to it.
#[utoipa::path(post, path = "/v1/sessions/{id}/messages", operation_id = "postMessage", request_body = PostMessageBody,
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Makes the post idempotent per session")),
    responses((status = 201, body = Posted), (status = 200, description = "An idempotent retry", body = Posted),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn post_message(
    State(state): State<AppState>,
    Owner(owner): Owner,
    SessionPath(id): SessionPath,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(body): JsonBody<PostMessageBody>,
) -> ApiResult<Response> {
    non_empty(&body.content)?;
    let posted = state
        .engine
        .post_message(PostMessage {
            owner,
            session_id: id,
            content: body.content,
            policy: body.policy,
            idempotency_key: key,
            node: state.engine.node().to_owned(),
            // The engine knows its agents.
            mid_turn_agents: Vec::new(),
        })
        .await?;
    state
        .metrics
        .message(posted.disposition.kind, posted.replayed);
    if !posted.replayed {
        if let Some(position) = posted.disposition.position {
            state.metrics.queue_depth(position);
        }
    }
    let status = if posted.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let body = Posted {
        entry: posted.entry,
        disposition: posted.disposition,
    };
    Ok((status, Json(body)).into_response())
}

/// Read a session's entries in seq order.
#[utoipa::path(get, path = "/v1/sessions/{id}/entries", operation_id = "listEntries",
    params(("id" = String, Path), ("after" = Option<u64>, Query), ("limit" = Option<u32>, Query, description = "1 to 1000, default 100")),
    responses((status = 200, body = EntryPage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn entries(
    State(state): State<AppState>,
    Owner(owner): Owner,
    SessionPath(id): SessionPath,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<EntryPage>> {
    let after = query_u64(&q, "after")?.unwrap_or(0);
    let limit = query_u64(&q, "limit")?.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 1000"));
    }
    state.engine.session(&owner, id).await?;
    let page = state
        .engine
        .store()
        .entries(id, after, limit as u32)
        .await?;
    Ok(Json(EntryPage {
        entries: page.entries,
        last_seq: page.last_seq,
    }))
}

/// The session's turns in the order of their input (the order they ran in).
#[utoipa::path(get, path = "/v1/sessions/{id}/turns", operation_id = "listTurns", params(("id" = String, Path)),
    responses((status = 200, body = TurnList), (status = 404, body = ErrorBody)))]
pub async fn turns(
    State(state): State<AppState>,
    Owner(owner): Owner,
    SessionPath(id): SessionPath,
) -> ApiResult<Json<TurnList>> {
    state.engine.session(&owner, id).await?;
    let turns = state.engine.store().turns(id).await?;
    Ok(Json(TurnList { turns }))
}

/// Cancel the running (or starting) turn, if any; with `{"turn_id": …}`,
/// only that turn.
#[utoipa::path(post, path = "/v1/sessions/{id}/cancel", operation_id = "cancelTurn", params(("id" = String, Path)),
    request_body(content = Option<CancelBody>, description = "Optional: which turn to cancel"),
    responses((status = 202, description = "A cancel was requested", body = Cancelled),
        (status = 200, description = "Nothing cancelled: the session is idle, or the named turn is not the active one (`active_turn_id` says which is)", body = Cancelled),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn cancel(
    State(state): State<AppState>,
    Owner(owner): Owner,
    SessionPath(id): SessionPath,
    MaybeJsonBody(body): MaybeJsonBody<CancelBody>,
) -> ApiResult<Response> {
    let only = body.and_then(|b| b.turn_id);
    let turn_id = state.engine.cancel(&owner, id, only).await?;
    if turn_id.is_some() {
        return Ok((
            StatusCode::ACCEPTED,
            Json(Cancelled {
                turn_id,
                cancelled: true,
                active_turn_id: None,
            }),
        )
            .into_response());
    }
    // A stale cancel says which turn is active now (informational: read
    // after the refusal).
    let active_turn_id = match only {
        Some(_) => Some(state.engine.session(&owner, id).await?.turn_id),
        None => None,
    };
    Ok((
        StatusCode::OK,
        Json(Cancelled {
            turn_id: None,
            cancelled: false,
            active_turn_id,
        }),
    )
        .into_response())
}

/// What a request body can provoke beyond being malformed.
impl Answers for CreateSessionBody {
    fn answers() -> std::collections::BTreeMap<u16, std::collections::BTreeSet<&'static str>> {
        map(&[])
    }
}

impl Answers for PostMessageBody {
    fn answers() -> std::collections::BTreeMap<u16, std::collections::BTreeSet<&'static str>> {
        // Policy `reject` while a turn runs; the session's queue is full.
        map(&[(409, "session_busy"), (429, "queue_full")])
    }
}

impl Answers for AnswerBody {
    fn answers() -> std::collections::BTreeMap<u16, std::collections::BTreeSet<&'static str>> {
        // Answered otherwise already, or closed.
        map(&[(409, "permission_closed")])
    }
}

impl Answers for CancelBody {
    fn answers() -> std::collections::BTreeMap<u16, std::collections::BTreeSet<&'static str>> {
        map(&[])
    }
}
