//! `GET /v1/sessions/{id}/export?format=openai`: the transcript as OpenAI
//! chat messages, ready to replay to a model: consecutive assistant messages
//! merged (across turns too), tool calls attached to their assistant message, each tool result
//! after it (open calls already have synthetic `cancelled` results).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::Json;
use baton_core::{Entry, EntryType, Role};
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use crate::extract::{session_id, Owner};
use crate::AppState;

/// The exported transcript.
#[derive(Debug, Serialize, ToSchema)]
pub struct Export {
    /// OpenAI chat messages (`role`, `content`, `tool_calls`, `tool_call_id`).
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
}

/// Converts a log to OpenAI chat messages.
pub fn openai_messages(entries: &[Entry]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    // Whether the last message out is an assistant message that may still
    // take content or tool calls.
    let mut open_assistant = false;
    for e in entries {
        match (e.kind, e.role) {
            (EntryType::Message, Some(Role::Assistant)) => {
                let text = e.content.clone().unwrap_or_default();
                match out.last_mut().filter(|_| open_assistant) {
                    Some(last) => {
                        let merged = match last["content"].as_str() {
                            Some(prev) if !prev.is_empty() => format!("{prev}\n{text}"),
                            _ => text,
                        };
                        last["content"] = Value::String(merged);
                    }
                    None => {
                        out.push(json!({"role": "assistant", "content": text}));
                        open_assistant = true;
                    }
                }
            }
            (EntryType::Message, Some(role)) => {
                out.push(json!({"role": role.as_str(), "content": e.content.clone().unwrap_or_default()}));
                open_assistant = false;
            }
            (EntryType::ToolCall, _) => {
                let Some(tool) = &e.tool else { continue };
                let arguments = match &tool.arguments {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => "{}".to_owned(),
                };
                let call = json!({
                    "id": tool.id,
                    "type": "function",
                    "function": {"name": tool.name.clone().unwrap_or_default(), "arguments": arguments},
                });
                if !open_assistant {
                    out.push(json!({"role": "assistant", "content": Value::Null}));
                    open_assistant = true;
                }
                if let Some(last) = out.last_mut() {
                    match last.get_mut("tool_calls").and_then(Value::as_array_mut) {
                        Some(calls) => calls.push(call),
                        None => last["tool_calls"] = json!([call]),
                    }
                }
            }
            (EntryType::ToolResult, _) => {
                let id = e.tool.as_ref().map(|t| t.id.clone()).unwrap_or_default();
                out.push(json!({"role": "tool", "tool_call_id": id, "content": e.content.clone().unwrap_or_default()}));
                open_assistant = false;
            }
            // Turn boundaries are not messages: assistant messages of
            // consecutive turns with no user message between them merge too.
            (EntryType::TurnStarted | EntryType::TurnEnded, _) => {}
            (
                EntryType::Thought | EntryType::PermissionRequest | EntryType::PermissionDecision,
                _,
            ) => {}
            (EntryType::Message, None) => {}
        }
    }
    out
}

/// Export the transcript.
#[utoipa::path(get, path = "/v1/sessions/{id}/export", params(("id" = String, Path), ("format" = String, Query, description = "openai")),
    responses((status = 200, body = Export), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn export(
    State(state): State<AppState>,
    Owner(owner): Owner,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Export>> {
    let id = session_id(&id)?;
    match q.get("format").map(String::as_str) {
        Some("openai") | None => {}
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "unknown export format {other:?}; supported: openai"
            )))
        }
    }
    state.engine.session(&owner, id).await?;
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
    Ok(Json(Export {
        messages: openai_messages(&entries),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::{InputRange, NewEntry, SessionId, Timestamp, ToolInfo, TurnId, TurnStatus};

    #[test]
    fn merges_assistant_messages_and_attaches_tool_calls() {
        let s = SessionId::new();
        let t = TurnId::new();
        let log: Vec<Entry> = [
            NewEntry::user_message("hi"),
            NewEntry::turn_started(t, InputRange { from: 1, to: 1 }),
            NewEntry::assistant_message(t, "a"),
            NewEntry::assistant_message(t, "b"),
            NewEntry::tool_call(
                t,
                ToolInfo {
                    id: "c1".into(),
                    name: Some("grep".into()),
                    arguments: Some(json!({"q": 1})),
                },
            ),
            NewEntry::tool_result(t, "c1".into(), "found"),
            NewEntry::assistant_message(t, "done"),
            NewEntry::turn_ended(t, TurnStatus::Completed, None),
        ]
        .into_iter()
        .zip(1..)
        .map(|(e, seq)| e.committed(s, seq, Timestamp(0)))
        .collect();
        let msgs = openai_messages(&log);
        assert_eq!(
            msgs,
            vec![
                json!({"role": "user", "content": "hi"}),
                json!({"role": "assistant", "content": "a\nb", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "grep", "arguments": "{\"q\":1}"}}
                ]}),
                json!({"role": "tool", "tool_call_id": "c1", "content": "found"}),
                json!({"role": "assistant", "content": "done"}),
            ]
        );
    }
}
