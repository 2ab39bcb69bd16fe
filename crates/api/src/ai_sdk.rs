//! `/v1/ai-sdk/chat…`: the AI SDK's UI message stream protocol (`v1`), so a
//! `useChat` front end talks to Baton with nothing in between.
//!
//! This module owns the mapping between a chat of the AI SDK and a Baton
//! session, and between a turn's log and the protocol's chunks:
//!
//! - A chat `id` is a Baton session id the caller owns, or any other string
//!   (1 to 128 of `A-Z a-z 0-9 . _ : -`), which names one session per owner:
//!   the session created with the idempotency key `ai-sdk-chat:<id>`, on the
//!   first submit (concurrent first submits create it once).
//! - `POST /v1/ai-sdk/chat` stores the last user message with its UIMessage
//!   `id` as the idempotency key (a retried submit is stored once, I3) and
//!   answers with the stream of the turn that consumes it: the turn whose
//!   input range holds the message's seq. Until that turn starts (the
//!   message queued, merged, interrupted a turn, or waits for a debounce
//!   window) the stream carries only a transient `data-baton-disposition`
//!   chunk, so the client shows the position without adding a part.
//! - One turn is one assistant UIMessage whose id is the turn id. Its stream
//!   is always rebuilt from the log: the turn's stored entries from its
//!   `turn_started`, then live. Stored entries are the truth; deltas are a
//!   preview of the run of text being written.
//!
//! The text streamed so far is part of every replay, on any node: a run of
//! text is numbered by the assistant message it becomes (the turn's first,
//! second, …), and each delta carries that number and its byte offset in
//! the run. A reader that has sent the turn's first `n` stored assistant
//! messages drops deltas of runs up to `n` (already sent whole), opens run
//! `n + 1` only at offset 0, and sends only the bytes past what it sent. A
//! reader that joins in the middle of a run asks the worker running the
//! turn for the run so far (`TextWanted` on the bus, which reaches the
//! other nodes); the worker answers with the run from offset 0
//! (`TextSoFar`), the deltas after it follow in order. When the run is
//! stored, whatever the reader had not sent of it is sent then. So the text
//! a client holds is always a prefix of the stored message, and equal to it
//! once stored: nothing twice, nothing missing, whichever node streams. A
//! run that is never stored (the turn was cancelled or failed mid-sentence)
//! ends where the stream was; the stored transcript leaves it out.
//!
//! Closing a stream never cancels a turn; `POST …/stop` does.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use baton_core::late::DeltaFilter;
use baton_core::{
    DispositionType, Entry, EntryType, Epoch, Policy, Role, Seq, Session, SessionId, Turn, TurnId,
    TurnStatus,
};
use baton_engine::BusEvent;
use baton_store::{CreateSession, PostMessage, SharedStore, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{JsonBody, Owner};
use crate::AppState;

/// The idempotency key prefix of the session a chat name stands for.
const CHAT_KEY: &str = "ai-sdk-chat:";

/// How many entries one store read fetches.
const PAGE: u32 = 500;

/// How often a stream checks the store for what the bus did not bring
/// (the bus is a hint across nodes), and a waiting submit for its turn
/// (steered input joins a turn without an entry of its own).
const RESYNC: Duration = Duration::from_secs(1);

/// `POST /v1/ai-sdk/chat` body: what `useChat`'s default transport sends
/// (`{id, messages, trigger, messageId, …}`, other fields ignored) or the
/// trimmed `{id, message}` of the resume guide.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    /// The chat: a session id the caller owns, or a name.
    pub id: String,
    /// The whole conversation as the client holds it; only the last message
    /// is used (Baton holds the log).
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub messages: Option<Vec<Value>>,
    /// The new user message (wins over `messages`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub message: Option<Value>,
    /// `submit-message` (default); `regenerate-message` is refused.
    #[serde(default)]
    pub trigger: Option<String>,
    /// The id of the message the submit replaces, if any.
    #[serde(default, rename = "messageId")]
    pub message_id: Option<String>,
    /// The agent of a chat created by this request (default: the server's).
    #[serde(default)]
    pub agent: Option<String>,
    /// The busy policy for this message, and of a chat created by it.
    #[serde(default)]
    pub policy: Option<Policy>,
}

/// `POST /v1/ai-sdk/chat/{id}/stop`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Stopped {
    /// The turn being cancelled; `null` when none was running.
    #[schema(value_type = Option<String>)]
    pub turn_id: Option<TurnId>,
}

/// `GET /v1/ai-sdk/chat/{id}/messages`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Transcript {
    /// The session the chat names (`null`: a name not used yet).
    #[schema(value_type = Option<String>)]
    pub session_id: Option<SessionId>,
    /// The turn running now, if any (resume its stream).
    #[schema(value_type = Option<String>)]
    pub running_turn_id: Option<TurnId>,
    /// User and assistant `UIMessage`s in the log's order.
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
}

/// The chat named by the path's `{id}`: a malformed name is a `400`; a
/// session id the caller does not own a `404` from the lookup.
pub struct ChatPath(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ChatPath {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid(e.body_text()))?;
        chat_name(&raw)?;
        Ok(ChatPath(raw))
    }
}

impl crate::answers::Answers for ChatPath {
    fn answers() -> std::collections::BTreeMap<u16, std::collections::BTreeSet<&'static str>> {
        crate::answers::map(&[(400, "invalid_request"), (404, "not_found")])
    }
}

/// A chat message: a session id the caller does not own is a `404`; the
/// post can meet a busy session, a reused message id or a full queue.
impl crate::answers::Answers for ChatRequest {
    fn answers() -> std::collections::BTreeMap<u16, std::collections::BTreeSet<&'static str>> {
        crate::answers::map(&[
            (404, "not_found"),
            (409, "session_busy"),
            (409, "idempotency_conflict"),
            (429, "queue_full"),
        ])
    }
}

/// Checks a chat id: a session id, or a name of safe characters.
fn chat_name(raw: &str) -> ApiResult<()> {
    let ok = !raw.is_empty()
        && raw.len() <= 128
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "chat id {:?} must be a session id or 1 to 128 of A-Z a-z 0-9 . _ : -",
            raw.chars().take(64).collect::<String>()
        )))
    }
}

/// The session a chat id names, if it exists. Another owner's session id
/// is `404`, like a missing one (I10); an unused name is `None`.
async fn find_chat(state: &AppState, owner: &str, raw: &str) -> ApiResult<Option<Session>> {
    chat_name(raw)?;
    if let Ok(id) = SessionId::parse(raw) {
        return Ok(Some(state.engine.session(owner, id).await?));
    }
    let key = format!("{CHAT_KEY}{raw}");
    Ok(state.engine.store().session_by_key(owner, &key).await?)
}

/// The session a submit goes to, created for a name on first use.
async fn chat_for_submit(state: &AppState, owner: &str, body: &ChatRequest) -> ApiResult<Session> {
    if let Some(s) = find_chat(state, owner, &body.id).await? {
        return Ok(s);
    }
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
    let created = state
        .engine
        .create_session(CreateSession {
            owner: owner.to_owned(),
            agent,
            policy: body.policy.unwrap_or(state.cfg.default_policy),
            metadata: json!({ "ai_sdk_chat": body.id }),
            idempotency_key: Some(format!("{CHAT_KEY}{}", body.id)),
            // Constant: concurrent first submits with different fields all
            // get the one session.
            fingerprint: "ai-sdk-chat".to_owned(),
            message: None,
            permission: None,
            node: state.engine.node().to_owned(),
            debounce_ms: state.cfg.default_debounce_ms,
        })
        .await?;
    Ok(created.session)
}

/// The user message to store: its UIMessage id and its text.
fn user_message(body: &ChatRequest) -> ApiResult<(String, String)> {
    let message = match (&body.message, &body.messages) {
        (Some(m), _) => m,
        (None, Some(all)) => all
            .last()
            .ok_or_else(|| ApiError::invalid("messages is empty; expected a user message last"))?,
        (None, None) => {
            return Err(ApiError::invalid(
                "the body needs `messages` (useChat's transport) or `message`",
            ))
        }
    };
    let role = message.get("role").and_then(Value::as_str);
    if role != Some("user") {
        return Err(ApiError::invalid(format!(
            "the last message must have role \"user\", not {}",
            role.map_or("none".to_owned(), |r| format!("{r:?}"))
        )));
    }
    let id = message
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("the user message needs a string `id`"))?;
    if id.is_empty() || id.len() > 255 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid(
            "the user message's id must be 1 to 255 visible ASCII characters",
        ));
    }
    let parts = message
        .get("parts")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("the user message needs `parts`"))?;
    let mut text = Vec::new();
    for part in parts {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => match part.get("text").and_then(Value::as_str) {
                Some(t) => text.push(t),
                None => return Err(ApiError::invalid("a text part needs a string `text`")),
            },
            other => {
                return Err(ApiError::invalid(format!(
                    "only text parts are supported in a user message, not {other:?}"
                )))
            }
        }
    }
    let text = text.join("\n");
    crate::sessions::non_empty(&text)?;
    Ok((id.to_owned(), text))
}

/// The protocol's response headers, around an SSE body.
fn ui_stream(rx: mpsc::Receiver<Result<Event, Infallible>>) -> Response {
    let sse = Sse::new(ReceiverStream::new(rx)).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text("keep-alive"),
    );
    (
        [
            (
                HeaderName::from_static("x-vercel-ai-ui-message-stream"),
                HeaderValue::from_static("v1"),
            ),
            (
                HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        sse,
    )
        .into_response()
}

/// Send a user message; the answer is the UI message stream of the turn
/// that consumes it.
#[utoipa::path(post, path = "/v1/ai-sdk/chat", operation_id = "aiSdkChat", request_body = ChatRequest,
    responses((status = 200, description = "text/event-stream, `x-vercel-ai-ui-message-stream: v1`: `data: <chunk>` lines (a transient `data-baton-disposition`, then `start` with the turn id as `messageId`, `start-step`, text, reasoning and tool chunks, `finish-step`, `message-metadata` with the turn's status and seq range, `finish`, `abort` or `error`), then `data: [DONE]`"),
        (status = 400, description = "Malformed body, `regenerate-message`, a last message that is not a user message with text parts, or an unknown agent", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "A session id the caller does not own", body = ErrorBody),
        (status = 409, description = "`session_busy` under the `reject` policy, or the message id was used with another text", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn chat(
    State(state): State<AppState>,
    Owner(owner): Owner,
    JsonBody(body): JsonBody<ChatRequest>,
) -> ApiResult<Response> {
    match body.trigger.as_deref() {
        None | Some("submit-message") => {}
        Some("regenerate-message") => {
            return Err(ApiError::invalid(
                "regenerate-message is not supported: the session's log keeps every reply; send the message again as a new message",
            ))
        }
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "trigger must be submit-message, not {other:?}"
            )))
        }
    }
    let (message_id, content) = user_message(&body)?;
    let session = chat_for_submit(&state, &owner, &body).await?;
    let id = session.id;
    // Subscribed before the post: nothing of the turn it starts is missed.
    let live = state.engine.bus().subscribe(id);
    let posted = match state
        .engine
        .post_message(PostMessage {
            owner,
            session_id: id,
            content,
            policy: body.policy,
            idempotency_key: Some(message_id),
            node: state.engine.node().to_owned(),
            mid_turn_agents: Vec::new(),
        })
        .await
    {
        Ok(p) => p,
        Err(e) => {
            drop(live);
            state.engine.bus().prune(id);
            return Err(e.into());
        }
    };
    state
        .metrics
        .message(posted.disposition.kind, posted.replayed);
    let disposition = json!({
        "type": "data-baton-disposition",
        "data": {
            "session_id": id,
            "seq": posted.entry.seq,
            "disposition": posted.disposition,
            "replayed": posted.replayed,
        },
        "transient": true,
    });
    let seq = posted.entry.seq;
    let known = (posted.disposition.kind == DispositionType::Started)
        .then_some(posted.disposition.turn_id)
        .flatten();
    Ok(spawn_stream(&state, id, live, move |f| {
        Box::pin(async move {
            f.out.chunk(&disposition).await?;
            let turn = f.consumer(seq, known).await?;
            f.turn(turn).await
        })
    }))
}

/// Resume: the running turn's stream, replayed from its `start`, then live.
#[utoipa::path(get, path = "/v1/ai-sdk/chat/{id}/stream", operation_id = "aiSdkResume", params(("id" = String, Path, description = "The chat id")),
    responses((status = 200, description = "The running turn's UI message stream from its `start`, then live (as for `POST /v1/ai-sdk/chat`, without the disposition)"),
        (status = 204, description = "No turn is running"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "A session id the caller does not own", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn resume(
    State(state): State<AppState>,
    Owner(owner): Owner,
    ChatPath(chat): ChatPath,
) -> ApiResult<Response> {
    let Some(session) = find_chat(&state, &owner, &chat).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let id = session.id;
    let live = state.engine.bus().subscribe(id);
    // Read after subscribing: a turn that ends in between is replayed whole.
    let session = state.engine.session(&owner, id).await?;
    let Some(turn_id) = session.turn_id else {
        drop(live);
        state.engine.bus().prune(id);
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    Ok(spawn_stream(&state, id, live, move |f| {
        Box::pin(async move {
            let turn = f.turn_by_id(turn_id).await?;
            f.turn(turn).await
        })
    }))
}

/// Cancel the chat's running turn (closing a stream never does).
#[utoipa::path(post, path = "/v1/ai-sdk/chat/{id}/stop", operation_id = "aiSdkStop", params(("id" = String, Path, description = "The chat id")),
    responses((status = 202, description = "A cancel was requested for this turn", body = Stopped),
        (status = 200, description = "No turn was running", body = Stopped),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "A session id the caller does not own", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn stop(
    State(state): State<AppState>,
    Owner(owner): Owner,
    ChatPath(chat): ChatPath,
) -> ApiResult<Response> {
    let turn_id = match find_chat(&state, &owner, &chat).await? {
        Some(s) => state.engine.cancel(&owner, s.id, None).await?,
        None => None,
    };
    let status = if turn_id.is_some() {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(Stopped { turn_id })).into_response())
}

/// The transcript as `UIMessage`s, for the app to load.
#[utoipa::path(get, path = "/v1/ai-sdk/chat/{id}/messages", operation_id = "aiSdkMessages", params(("id" = String, Path, description = "The chat id")),
    responses((status = 200, body = Transcript),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "A session id the caller does not own", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn messages(
    State(state): State<AppState>,
    Owner(owner): Owner,
    ChatPath(chat): ChatPath,
) -> ApiResult<Json<Transcript>> {
    let Some(session) = find_chat(&state, &owner, &chat).await? else {
        return Ok(Json(Transcript {
            session_id: None,
            running_turn_id: None,
            messages: Vec::new(),
        }));
    };
    let store = state.engine.store();
    let mut entries = Vec::new();
    let mut after = 0;
    loop {
        let page = store.entries(session.id, after, PAGE).await?;
        let Some(last) = page.entries.last() else {
            break;
        };
        after = last.seq;
        entries.extend(page.entries);
    }
    Ok(Json(Transcript {
        session_id: Some(session.id),
        running_turn_id: session.turn_id,
        messages: transcript(&entries),
    }))
}

/// The log as `UIMessage`s: each user message, and each turn as one
/// assistant message (id: the turn id) placed at its `turn_started`, with
/// the parts its stream builds.
pub fn transcript(entries: &[Entry]) -> Vec<Value> {
    let mut messages: Vec<Value> = Vec::new();
    let mut turns: HashMap<TurnId, (usize, Parts)> = HashMap::new();
    for e in entries {
        match (e.kind, e.role, e.turn_id) {
            (EntryType::Message, Some(Role::User), _) => messages.push(json!({
                "id": format!("msg-{}", e.seq),
                "role": "user",
                "parts": [{"type": "text", "text": e.content.as_deref().unwrap_or_default()}],
                "metadata": {"baton": {"seq": e.seq}},
            })),
            (EntryType::TurnStarted, _, Some(t)) => {
                messages.push(Value::Null);
                turns.insert(t, (messages.len() - 1, Parts::new(e.session_id, t)));
                if let Some((_, p)) = turns.get_mut(&t) {
                    p.entry(e);
                }
            }
            (_, _, Some(t)) => {
                if let Some((_, p)) = turns.get_mut(&t) {
                    p.entry(e);
                }
            }
            _ => {}
        }
    }
    for (_, (at, parts)) in turns {
        messages[at] = parts.message();
    }
    messages.retain(|m| !m.is_null());
    messages
}

/// A turn's assistant message built from its stored entries, as the client
/// builds it from the chunks (for the transcript).
struct Parts {
    id: TurnId,
    metadata: Value,
    parts: Vec<Value>,
    tools: HashMap<String, usize>,
    first_seq: Option<Seq>,
}

impl Parts {
    fn new(session: SessionId, turn: TurnId) -> Self {
        Self {
            id: turn,
            metadata: json!({"baton": {"session_id": session, "turn_id": turn}}),
            parts: Vec::new(),
            tools: HashMap::new(),
            first_seq: None,
        }
    }

    fn entry(&mut self, e: &Entry) {
        for chunk in entry_chunks(e) {
            self.chunk(&chunk);
        }
        match e.kind {
            EntryType::TurnStarted => self.first_seq = Some(e.seq),
            EntryType::TurnEnded => {
                let mut meta = ended_metadata(e);
                meta["baton"]["first_seq"] = json!(self.first_seq);
                merge(&mut self.metadata, meta);
            }
            _ => {}
        }
    }

    fn chunk(&mut self, c: &Value) {
        let kind = c["type"].as_str().unwrap_or_default();
        match kind {
            "start-step" => self.parts.push(json!({"type": "step-start"})),
            "text" => self
                .parts
                .push(json!({"type": "text", "text": c["text"], "state": "done"})),
            "reasoning" => self
                .parts
                .push(json!({"type": "reasoning", "text": c["text"], "state": "done"})),
            "tool-input-available" => {
                let id = c["toolCallId"].as_str().unwrap_or_default().to_owned();
                self.parts.push(json!({
                    "type": "dynamic-tool", "toolName": c["toolName"], "toolCallId": id,
                    "state": "input-available", "input": c["input"],
                }));
                self.tools.insert(id, self.parts.len() - 1);
            }
            "tool-output-available" | "tool-output-error" => {
                let id = c["toolCallId"].as_str().unwrap_or_default();
                if let Some(&at) = self.tools.get(id) {
                    let part = &mut self.parts[at];
                    if kind == "tool-output-available" {
                        part["state"] = json!("output-available");
                        part["output"] = c["output"].clone();
                    } else {
                        part["state"] = json!("output-error");
                        part["errorText"] = c["errorText"].clone();
                    }
                }
            }
            k if k.starts_with("data-") => {
                let existing = self
                    .parts
                    .iter_mut()
                    .find(|p| p["type"] == c["type"] && p["id"] == c["id"]);
                match existing {
                    Some(p) => p["data"] = c["data"].clone(),
                    None => self
                        .parts
                        .push(json!({"type": c["type"], "id": c["id"], "data": c["data"]})),
                }
            }
            _ => {}
        }
    }

    fn message(self) -> Value {
        json!({"id": self.id, "role": "assistant", "parts": self.parts, "metadata": self.metadata})
    }
}

/// Merges object `b` into `a`, deeply, as the client merges metadata.
fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// What a stored entry of a turn is, as whole parts (`text` and `reasoning`
/// stand for a start, one delta and an end). Assistant text is handled by
/// the stream itself (it may be streamed already), so here it is whole.
fn entry_chunks(e: &Entry) -> Vec<Value> {
    let content = e.content.as_deref().unwrap_or_default();
    match (e.kind, e.role) {
        (EntryType::TurnStarted, _) => vec![json!({"type": "start-step"})],
        (EntryType::Message, Some(Role::Assistant)) => {
            vec![json!({"type": "text", "text": content})]
        }
        (EntryType::Message, _) => vec![json!({
            "type": "data-baton-note", "id": format!("note-{}", e.seq),
            "data": {"seq": e.seq, "text": content},
        })],
        (EntryType::Thought, _) => vec![json!({"type": "reasoning", "text": content})],
        (EntryType::ToolCall, _) => {
            let tool = e.tool.as_ref();
            vec![json!({
                "type": "tool-input-available",
                "toolCallId": tool.map_or("", |t| t.id.as_str()),
                "toolName": tool.and_then(|t| t.name.as_deref()).unwrap_or("tool"),
                "input": tool.and_then(|t| t.arguments.clone()).unwrap_or_else(|| json!({})),
                "dynamic": true,
            })]
        }
        (EntryType::ToolResult, _) => {
            let id = e.tool.as_ref().map_or("", |t| t.id.as_str());
            // A result the runtime wrote because the turn ended first.
            if e.status.is_some() {
                vec![
                    json!({"type": "tool-output-error", "toolCallId": id, "errorText": content, "dynamic": true}),
                ]
            } else {
                vec![
                    json!({"type": "tool-output-available", "toolCallId": id, "output": content, "dynamic": true}),
                ]
            }
        }
        (EntryType::PermissionRequest | EntryType::PermissionDecision, _) => {
            let Some(p) = &e.permission else {
                return Vec::new();
            };
            let state = if e.kind == EntryType::PermissionRequest {
                "requested"
            } else {
                "decided"
            };
            vec![json!({
                "type": "data-baton-permission", "id": p.request_id,
                "data": {"state": state, "seq": e.seq, "permission": p},
            })]
        }
        (EntryType::TurnEnded, _) => Vec::new(),
    }
}

/// The Baton facts of an ended turn, as message metadata.
fn ended_metadata(e: &Entry) -> Value {
    let mut baton = json!({
        "status": e.status.map(TurnStatus::as_str),
        "last_seq": e.seq,
    });
    if let Some(reason) = &e.reason {
        baton["reason"] = json!(reason);
    }
    json!({ "baton": baton })
}

/// Why a stream stopped early.
#[derive(Debug)]
enum Stop {
    Disconnected,
    Store(StoreError),
    /// The session went away (deleted) before the turn came.
    Gone,
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::Gone,
            e => Self::Store(e),
        }
    }
}

/// The SSE sender.
struct Out {
    tx: mpsc::Sender<Result<Event, Infallible>>,
}

impl Out {
    async fn chunk(&self, chunk: &Value) -> Result<(), Stop> {
        self.tx
            .send(Ok(Event::default().data(chunk.to_string())))
            .await
            .map_err(|_| Stop::Disconnected)
    }

    async fn done(&self) -> Result<(), Stop> {
        self.tx
            .send(Ok(Event::default().data("[DONE]")))
            .await
            .map_err(|_| Stop::Disconnected)
    }
}

type Script = Box<
    dyn for<'a> FnOnce(
            &'a mut Follower,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), Stop>> + Send + 'a>,
        > + Send,
>;

/// Starts the task that writes a stream and returns the response.
fn spawn_stream(
    state: &AppState,
    id: SessionId,
    live: broadcast::Receiver<BusEvent>,
    script: impl for<'a> FnOnce(
            &'a mut Follower,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), Stop>> + Send + 'a>,
        > + Send
        + 'static,
) -> Response {
    let (tx, rx) = mpsc::channel(256);
    let script: Script = Box::new(script);
    let gauge = state.metrics.stream_opened();
    let bus = state.engine.bus().clone();
    let mut f = Follower {
        out: Out { tx },
        store: state.engine.store().clone(),
        bus: bus.clone(),
        session: id,
        live,
        closed: state.engine.shutdown_signal(),
    };
    tokio::spawn(async move {
        let _gauge = gauge;
        let result = script(&mut f).await;
        let why = match &result {
            Err(Stop::Gone) => Some("the chat's session was deleted".to_owned()),
            Err(Stop::Store(e)) => {
                tracing::warn!(session = %id, error = %e, "ai-sdk stream: the store failed");
                Some("the store is unavailable; resume the stream to go on".to_owned())
            }
            _ => None,
        };
        let result = match why {
            // The client learns why its stream stops (it can resume).
            Some(why) => match f
                .out
                .chunk(&json!({"type": "error", "errorText": why}))
                .await
            {
                Ok(()) => f.out.done().await,
                Err(e) => Err(e),
            },
            None => result,
        };
        if let Err(e) = result {
            tracing::debug!(session = %id, error = ?e, "ai-sdk stream ended");
        }
        drop(f);
        bus.prune(id);
    });
    ui_stream(rx)
}

/// Follows one session for one stream.
struct Follower {
    out: Out,
    store: SharedStore,
    bus: baton_engine::Bus,
    session: SessionId,
    live: broadcast::Receiver<BusEvent>,
    closed: tokio::sync::watch::Receiver<bool>,
}

impl Follower {
    /// The turn with this id.
    async fn turn_by_id(&mut self, id: TurnId) -> Result<Turn, Stop> {
        let turns = self.store.turns(self.session).await?;
        turns.into_iter().find(|t| t.id == id).ok_or_else(|| {
            Stop::Store(StoreError::Internal(format!(
                "turn {id} not in its session"
            )))
        })
    }

    /// Waits for the turn that consumes the message at `seq`.
    async fn consumer(&mut self, seq: Seq, known: Option<TurnId>) -> Result<Turn, Stop> {
        if let Some(id) = known {
            return self.turn_by_id(id).await;
        }
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let turns = self.store.turns(self.session).await?;
            if let Some(t) = turns
                .into_iter()
                .find(|t| t.input.from <= seq && seq <= t.input.to)
            {
                return Ok(t);
            }
            // Look again when a turn starts (or the bus lagged), and now and
            // then: steered input joins a turn without an entry.
            loop {
                tokio::select! {
                    ev = self.live.recv() => match ev {
                        Ok(BusEvent::Entry(e)) if e.kind == EntryType::TurnStarted => break,
                        Ok(BusEvent::Committed { .. }) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Closed) => return Err(Stop::Disconnected),
                    },
                    _ = resync.tick() => break,
                    _ = self.out.tx.closed() => return Err(Stop::Disconnected),
                }
            }
        }
    }

    /// Streams `turn` from its start to its end.
    async fn turn(&mut self, turn: Turn) -> Result<(), Stop> {
        let mut t = TurnStream {
            turn: turn.id,
            last: turn.input.from.saturating_sub(1),
            first_seq: None,
            stored: 0,
            open: None,
            tools: HashSet::new(),
            deltas: DeltaFilter::default(),
            ended: false,
            wanted: None,
        };
        self.out
            .chunk(&json!({
                "type": "start",
                "messageId": turn.id,
                "messageMetadata": {"baton": {"session_id": self.session, "turn_id": turn.id}},
            }))
            .await?;
        t.catch_up(self, None).await?;
        if t.ended {
            return self.out.done().await;
        }
        // Joined mid-turn: the run of text streamed so far is only with the
        // worker; ask for it (any node), the deltas after it follow.
        let next = t.stored + 1;
        self.want(&mut t, next);
        let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + RESYNC, RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !t.ended {
            let event = tokio::select! {
                biased;
                ev = self.live.recv() => ev,
                _ = resync.tick() => {
                    t.catch_up(self, None).await?;
                    continue;
                }
                _ = self.out.tx.closed() => return Err(Stop::Disconnected),
                _ = ended(&mut self.closed) => {
                    // The node's turns are over (shutdown): what they stored
                    // last, then the connection closes; the client resumes.
                    t.catch_up(self, None).await?;
                    break;
                }
            };
            match event {
                Ok(BusEvent::Entry(e)) => {
                    if e.seq > t.last + 1 {
                        t.catch_up(self, Some(e.seq - 1)).await?;
                    }
                    t.entry(self, &e).await?;
                }
                Ok(BusEvent::Committed { seq }) => {
                    if seq > t.last {
                        t.catch_up(self, Some(seq)).await?;
                    }
                }
                Ok(BusEvent::Delta {
                    turn_id,
                    epoch,
                    text,
                    run,
                    offset,
                })
                | Ok(BusEvent::TextSoFar {
                    turn_id,
                    epoch,
                    run,
                    offset,
                    text,
                }) => {
                    if let Some(gap) = t.text(self, turn_id, epoch, run, offset, &text).await? {
                        self.want(&mut t, gap);
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => t.catch_up(self, None).await?,
                Err(broadcast::error::RecvError::Closed) => return Err(Stop::Disconnected),
            }
        }
        if t.ended {
            self.out.done().await
        } else {
            Ok(())
        }
    }

    /// Asks the worker for run `run` so far, once per run.
    fn want(&self, t: &mut TurnStream, run: u32) {
        if t.wanted.is_some_and(|w| w >= run) {
            return;
        }
        t.wanted = Some(run);
        self.bus
            .publish(self.session, BusEvent::TextWanted { turn_id: t.turn });
    }
}

/// Resolves once the node's turns have stopped at shutdown.
async fn ended(closed: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = closed.wait_for(|c| *c).await.map(|_| ());
}

/// A run of text whose `text-start` went out.
struct OpenText {
    run: u32,
    id: String,
    sent: String,
}

/// One turn's stream: what has been sent.
struct TurnStream {
    turn: TurnId,
    /// The last stored seq looked at.
    last: Seq,
    first_seq: Option<Seq>,
    /// The turn's assistant messages sent (stored runs and whole messages).
    stored: u32,
    open: Option<OpenText>,
    /// Tool calls sent (a result is sent only for a call the client has).
    tools: HashSet<String>,
    deltas: DeltaFilter,
    ended: bool,
    /// The run asked for with `TextWanted`.
    wanted: Option<u32>,
}

impl TurnStream {
    /// Sends stored entries after `last`, up to `upto` (or the end).
    async fn catch_up(&mut self, f: &Follower, upto: Option<Seq>) -> Result<(), Stop> {
        while !self.ended {
            let page = f.store.entries(f.session, self.last, PAGE).await?;
            let target = upto.unwrap_or(page.last_seq).min(page.last_seq);
            for e in page.entries.iter().take_while(|e| e.seq <= target) {
                self.entry(f, e).await?;
                if self.ended {
                    return Ok(());
                }
            }
            if self.last >= target || page.entries.is_empty() {
                return Ok(());
            }
        }
        Ok(())
    }

    fn text_id(&self, run: u32) -> String {
        format!("text-{run}")
    }

    /// One stored entry (in seq order).
    async fn entry(&mut self, f: &Follower, e: &Entry) -> Result<(), Stop> {
        if e.seq <= self.last || self.ended {
            return Ok(());
        }
        self.last = e.seq;
        self.deltas.entry(e);
        if e.turn_id != Some(self.turn) {
            return Ok(());
        }
        if self.first_seq.is_none() {
            self.first_seq = Some(e.seq);
        }
        match (e.kind, e.role) {
            (EntryType::Message, Some(Role::Assistant)) => {
                let content = e.content.as_deref().unwrap_or_default();
                self.stored += 1;
                match self.open.take() {
                    Some(open) if open.run == self.stored && content.starts_with(&open.sent) => {
                        let rest = &content[open.sent.len()..];
                        if !rest.is_empty() {
                            f.out
                                .chunk(&json!({"type": "text-delta", "id": open.id, "delta": rest}))
                                .await?;
                        }
                        f.out
                            .chunk(&json!({"type": "text-end", "id": open.id}))
                            .await?;
                    }
                    other => {
                        if let Some(open) = other {
                            // Not reachable by construction (a run's deltas
                            // concatenate to its stored message); end the
                            // part rather than leave it open.
                            tracing::warn!(turn = %self.turn, run = open.run, "streamed text does not match the stored message");
                            f.out
                                .chunk(&json!({"type": "text-end", "id": open.id}))
                                .await?;
                        }
                        let id = format!("{}-{}", self.text_id(self.stored), e.seq);
                        f.out
                            .chunk(&json!({"type": "text-start", "id": id}))
                            .await?;
                        f.out
                            .chunk(&json!({"type": "text-delta", "id": id, "delta": content}))
                            .await?;
                        f.out.chunk(&json!({"type": "text-end", "id": id})).await?;
                    }
                }
            }
            (EntryType::Thought, _) => {
                let id = format!("reasoning-{}", e.seq);
                let text = e.content.as_deref().unwrap_or_default();
                f.out
                    .chunk(&json!({"type": "reasoning-start", "id": id}))
                    .await?;
                f.out
                    .chunk(&json!({"type": "reasoning-delta", "id": id, "delta": text}))
                    .await?;
                f.out
                    .chunk(&json!({"type": "reasoning-end", "id": id}))
                    .await?;
            }
            (EntryType::TurnEnded, _) => {
                if let Some(open) = self.open.take() {
                    f.out
                        .chunk(&json!({"type": "text-end", "id": open.id}))
                        .await?;
                }
                f.out.chunk(&json!({"type": "finish-step"})).await?;
                let mut meta = ended_metadata(e);
                meta["baton"]["first_seq"] = json!(self.first_seq);
                f.out
                    .chunk(&json!({"type": "message-metadata", "messageMetadata": meta}))
                    .await?;
                let reason = e.reason.clone().unwrap_or_default();
                let last = match e.status {
                    Some(TurnStatus::Completed) => {
                        json!({"type": "finish", "finishReason": "stop"})
                    }
                    Some(TurnStatus::Cancelled) => json!({"type": "abort", "reason": reason}),
                    status => json!({
                        "type": "error",
                        "errorText": format!(
                            "the turn ended {}{}",
                            status.map_or("", TurnStatus::as_str),
                            if reason.is_empty() { String::new() } else { format!(": {reason}") }
                        ),
                    }),
                };
                f.out.chunk(&last).await?;
                self.ended = true;
            }
            _ => {
                for chunk in entry_chunks(e) {
                    match chunk["type"].as_str() {
                        Some("tool-input-available") => {
                            if let Some(id) = chunk["toolCallId"].as_str() {
                                self.tools.insert(id.to_owned());
                            }
                        }
                        Some("tool-output-available" | "tool-output-error") => {
                            let known = chunk["toolCallId"]
                                .as_str()
                                .is_some_and(|id| self.tools.contains(id));
                            if !known {
                                continue;
                            }
                        }
                        _ => {}
                    }
                    f.out.chunk(&chunk).await?;
                }
            }
        }
        Ok(())
    }

    /// A piece of the run `run` of text, starting at `offset`: sends what
    /// the client does not have yet. Returns the run to ask the worker for
    /// when the piece starts past what was sent (a gap).
    async fn text(
        &mut self,
        f: &Follower,
        turn: TurnId,
        epoch: Epoch,
        run: u32,
        offset: u64,
        text: &str,
    ) -> Result<Option<u32>, Stop> {
        if turn != self.turn || self.ended || self.deltas.admit(turn, epoch).is_err() {
            return Ok(None);
        }
        // Runs up to `stored` were sent whole; a later run than the next
        // waits for its own start (its text also comes stored).
        if run != self.stored + 1 {
            return Ok(None);
        }
        let sent = match &self.open {
            Some(open) if open.run == run => open.sent.len() as u64,
            _ => 0,
        };
        if offset > sent {
            return Ok(Some(run));
        }
        let skip = usize::try_from(sent - offset).unwrap_or(usize::MAX);
        let Some(piece) = text.get(skip..).filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        if self.open.as_ref().is_none_or(|o| o.run != run) {
            let id = format!("{}-live", self.text_id(run));
            f.out
                .chunk(&json!({"type": "text-start", "id": id}))
                .await?;
            self.open = Some(OpenText {
                run,
                id,
                sent: String::new(),
            });
        }
        if let Some(open) = &mut self.open {
            f.out
                .chunk(&json!({"type": "text-delta", "id": open.id, "delta": piece}))
                .await?;
            open.sent.push_str(piece);
        }
        Ok(None)
    }
}
