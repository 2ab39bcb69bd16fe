//! The served API document: utoipa's, made exact where its derive cannot
//! say it. Every error status a route can answer is added from the route
//! table ([`crate::routes`], derived from each handler's signature); routes
//! that need no token say so (`security: []`); `Entry` is a union tagged by
//! `type`; the stream's events are described; parameters carry their real
//! bounds and defaults; no schema is named after a Rust integer type.

use serde_json::{json, Map, Value};
use utoipa::OpenApi;

use crate::ApiDoc;

/// The fields every entry has.
const COMMON: [&str; 4] = ["seq", "session_id", "type", "created_at"];

/// Each entry type: its schema name, the fields it always has and those it
/// may have (beyond [`COMMON`]).
const ENTRY_TYPES: [(&str, &str, &[&str], &[&str]); 8] = [
    (
        "message",
        "MessageEntry",
        &["role", "content"],
        &["turn_id"],
    ),
    ("thought", "ThoughtEntry", &["turn_id", "content"], &[]),
    ("tool_call", "ToolCallEntry", &["turn_id", "tool"], &[]),
    (
        "tool_result",
        "ToolResultEntry",
        &["turn_id", "content", "tool"],
        &["status", "reason"],
    ),
    (
        "permission_request",
        "PermissionRequestEntry",
        &["turn_id", "permission"],
        &[],
    ),
    (
        "permission_decision",
        "PermissionDecisionEntry",
        &["turn_id", "permission"],
        &[],
    ),
    (
        "turn_started",
        "TurnStartedEntry",
        &["turn_id", "input"],
        &[],
    ),
    (
        "turn_ended",
        "TurnEndedEntry",
        &["turn_id", "status"],
        &["reason"],
    ),
];

/// The API document as served at `/openapi.json`.
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|e| {
        tracing::error!(error = %e, "serializing the API document");
        json!({})
    });
    inline_integers(&mut doc);
    entry_union(&mut doc);
    stream_events(&mut doc);
    parameters(&mut doc);
    optional_cancel_body(&mut doc);
    answers(&mut doc);
    doc
}

/// utoipa names a schema `u64` for the `Seq` alias: inline it.
fn inline_integers(doc: &mut Value) {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(m) => {
                if m.get("$ref").and_then(Value::as_str) == Some("#/components/schemas/u64") {
                    m.remove("$ref");
                    m.insert("type".into(), json!("integer"));
                    m.insert("format".into(), json!("int64"));
                    m.insert("minimum".into(), json!(0));
                }
                m.values_mut().for_each(walk);
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(doc);
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        schemas.remove("u64");
    }
}

/// `Entry` as one schema per `type`, tagged by it.
fn entry_union(doc: &mut Value) {
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let Some(props) = schemas
        .get("Entry")
        .and_then(|e| e.get("properties"))
        .and_then(Value::as_object)
        .cloned()
    else {
        return;
    };
    let mut one_of = Vec::new();
    let mut mapping = Map::new();
    for (kind, name, always, maybe) in ENTRY_TYPES {
        let mut properties = Map::new();
        for field in COMMON.iter().chain(always).chain(maybe) {
            if let Some(p) = props.get(*field) {
                properties.insert((*field).to_owned(), p.clone());
            }
        }
        properties.insert("type".into(), json!({"type": "string", "enum": [kind]}));
        let required: Vec<&str> = COMMON.iter().chain(always).copied().collect();
        schemas.insert(
            name.to_owned(),
            json!({
                "type": "object",
                "description": format!("An entry of type `{kind}`."),
                "required": required,
                "properties": properties,
            }),
        );
        let reference = format!("#/components/schemas/{name}");
        one_of.push(json!({"$ref": reference}));
        mapping.insert(kind.to_owned(), json!(reference));
    }
    schemas.insert(
        "Entry".into(),
        json!({
            "description": "A committed entry of a session's log, by `type`.",
            "oneOf": one_of,
            "discriminator": {"propertyName": "type", "mapping": mapping},
        }),
    );
}

/// The stream's events.
fn stream_events(doc: &mut Value) {
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        schemas.insert(
            "StreamEntryEvent".into(),
            json!({
                "type": "object",
                "description": "`event: entry`, `id:` the entry's seq (send it back as `Last-Event-ID` to resume), `data:` the entry as JSON.",
                "required": ["event", "id", "data"],
                "properties": {
                    "event": {"type": "string", "enum": ["entry"]},
                    "id": {"type": "string", "description": "The entry's seq."},
                    "data": {
                        "type": "string",
                        "description": "The entry, as JSON.",
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": "#/components/schemas/Entry"},
                    },
                },
            }),
        );
        schemas.insert(
            "StreamDeltaEvent".into(),
            json!({
                "type": "object",
                "description": "`event: delta`, no id, `data:` a piece of the running turn's reply as it streams (a preview: the stored message is the record). None follows its turn's `turn_ended`.",
                "required": ["event", "data"],
                "properties": {
                    "event": {"type": "string", "enum": ["delta"]},
                    "data": {
                        "type": "string",
                        "description": "`{\"turn_id\", \"text\"}` as JSON.",
                        "contentMediaType": "application/json",
                        "contentSchema": {
                            "type": "object",
                            "required": ["turn_id", "text"],
                            "properties": {
                                "turn_id": {"type": "string", "format": "uuid"},
                                "text": {"type": "string"},
                            },
                        },
                    },
                },
            }),
        );
    }
    // The AI SDK's UI message stream: `data: <chunk>` lines, then `data: [DONE]`.
    for pointer in [
        "/paths/~1v1~1ai-sdk~1chat/post/responses/200",
        "/paths/~1v1~1ai-sdk~1chat~1{id}~1stream/get/responses/200",
    ] {
        if let Some(response) = doc.pointer_mut(pointer) {
            response["content"] = json!({
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "description": "The AI SDK UI message stream protocol (v1): each event `data: <JSON chunk>`, the last `data: [DONE]`.",
                        "required": ["data"],
                        "properties": {
                            "data": {"type": "string", "description": "A UI message chunk as JSON, or `[DONE]`."},
                        },
                    },
                },
            });
        }
    }
    if let Some(content) =
        doc.pointer_mut("/paths/~1v1~1sessions~1{id}~1stream/get/responses/200/content")
    {
        *content = json!({
            "text/event-stream": {
                "schema": {
                    "description": "Server-Sent Events, each one of these; comments (`: keep-alive`) every 15 s. The stream ends when the server shuts down, after the entries its turns stored last.",
                    "oneOf": [
                        {"$ref": "#/components/schemas/StreamEntryEvent"},
                        {"$ref": "#/components/schemas/StreamDeltaEvent"},
                    ],
                },
            },
        });
    }
}

/// The real bounds and defaults of the query parameters.
fn parameters(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for item in paths.values_mut().filter_map(Value::as_object_mut) {
        for op in item.values_mut() {
            let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) else {
                continue;
            };
            for p in params {
                let schema = match (p["in"].as_str(), p["name"].as_str()) {
                    (Some("query"), Some("limit")) => {
                        json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 100})
                    }
                    (Some("query"), Some("after")) => {
                        json!({"type": "integer", "format": "int64", "minimum": 0, "default": 0})
                    }
                    (Some("query"), Some("upto")) => {
                        json!({"type": "integer", "format": "int64", "minimum": 0})
                    }
                    (Some("query"), Some("format")) => {
                        json!({"type": "string", "enum": ["openai", "anthropic"], "default": "openai"})
                    }
                    (Some("query"), Some("include_running" | "include_thoughts")) => {
                        json!({"type": "boolean", "default": false})
                    }
                    (Some("query"), Some("status")) => {
                        json!({"type": "string", "enum": ["idle", "running"]})
                    }
                    (Some("header"), Some("Last-Event-ID")) => {
                        json!({"type": "string", "pattern": "^[0-9]+$"})
                    }
                    (Some("header"), Some("Idempotency-Key")) => {
                        json!({"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x21-\\x7e]+$"})
                    }
                    _ => continue,
                };
                p["schema"] = schema;
                p["required"] = json!(false);
            }
        }
    }
}

/// A cancel's body may be left out, but when sent it is an object (`null`
/// is refused like any non-object body).
fn optional_cancel_body(doc: &mut Value) {
    if let Some(body) = doc.pointer_mut("/paths/~1v1~1sessions~1{id}~1cancel/post/requestBody") {
        body["required"] = json!(false);
        body["content"] = json!({
            "application/json": {"schema": {"$ref": "#/components/schemas/CancelBody"}}
        });
    }
}

/// Every error status each route can answer, from the route table; the
/// routes that need no token say so.
fn answers(doc: &mut Value) {
    for route in crate::routes() {
        let pointer = format!("/paths/{}/{}", route.path.replace('/', "~1"), route.method);
        let Some(op) = doc.pointer_mut(&pointer).and_then(Value::as_object_mut) else {
            tracing::error!(
                path = route.path,
                method = route.method,
                "a route the API document lacks"
            );
            continue;
        };
        if !route.answers.contains_key(&401) {
            op.insert("security".into(), json!([]));
        }
        let responses = op
            .entry("responses")
            .or_insert_with(|| json!({}))
            .as_object_mut();
        let Some(responses) = responses else {
            continue;
        };
        for (status, codes) in &route.answers {
            let codes: Vec<String> = codes.iter().map(|c| format!("`{c}`")).collect();
            let response = responses
                .entry(status.to_string())
                .or_insert_with(|| json!({"description": format!("Error {}", codes.join(", "))}));
            response["content"] = json!({
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
            });
        }
    }
}
